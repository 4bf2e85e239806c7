//! Integration tests of bundle-agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod inject;
mod registry;
mod stage0;
