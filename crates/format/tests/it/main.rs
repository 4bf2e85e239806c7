//! Integration tests of the archive format: round trips, splitting, determinism, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod roundtrip;
mod support;
