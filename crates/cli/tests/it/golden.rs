//! The golden archive pins format v1: the same inputs must give these exact bytes. A change
//! here is a new format version in spec/ (spec/format-v1.md, section 9).

use std::path::PathBuf;

use crate::support::{self, ok};

/// sha256 of testdata/golden/golden.bundle.
const GOLDEN_SHA256: &str =
    "sha256:c2afc5f9372a734d87a3ac8144969e8065be47ab6e3c8f3a88ab6f597a7ac035";

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

#[test]
fn golden_archive_is_pinned_and_recreated_bit_for_bit() {
    let golden = testdata().join("golden.bundle");
    assert_eq!(
        support::sha256_file(&golden),
        GOLDEN_SHA256,
        "testdata/golden/golden.bundle changed"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("golden.bundle");
    let mut c = support::bundle();
    c.env_remove("SOURCE_DATE_EPOCH")
        .arg("create")
        .arg(testdata().join("bundle.yaml"))
        .arg("-o")
        .arg(&out);
    ok(c);
    assert_eq!(
        support::sha256_file(&out),
        GOLDEN_SHA256,
        "create no longer reproduces the golden archive: the format changed (new version in spec/) or reproducibility broke"
    );
}

#[test]
fn golden_archive_verifies_and_inspects_as_recorded() {
    let golden = testdata().join("golden.bundle");
    let mut c = support::bundle();
    c.args(["verify", "--deep"]).arg(&golden);
    ok(c);
    let mut c = support::bundle();
    c.arg("inspect").arg(&golden);
    let text = ok(c);
    let want = std::fs::read_to_string(testdata().join("inspect.txt")).unwrap();
    assert_eq!(
        text, want,
        "inspect output changed; update testdata/golden/inspect.txt if intended"
    );
}
