//! Integration tests against a real registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]
