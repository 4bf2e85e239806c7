//! Integration tests of bundle-oci against real peers: CNCF distribution and skopeo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_registry;
mod containerd;
mod harness;
mod harness_selftest;
mod registry_e2e;
mod server_conformance;
