//! Integration tests of bundle-layout: fixtures built in Rust, and skopeo as a real peer.

mod archives;
mod fixture;
mod oci_layout;
mod props;
mod skopeo;
