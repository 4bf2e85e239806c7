//! Integration tests of the `bundle` binary with real peers (zstd, tar, skopeo, umoci).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_image;
mod bad_input;
mod deploy;
mod escape_hatch;
mod golden;
mod platform;
mod registry;
mod reproducible;
mod serve;
mod snapshots;
mod split;
mod support;
