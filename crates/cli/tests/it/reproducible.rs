//! Byte-for-byte reproducible archives.

use crate::support::{self, ok};

#[test]
fn same_sha256_with_one_and_two_threads_and_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let mut shas = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("t{threads}.bundle"));
        let mut c = support::bundle();
        c.env("RAYON_NUM_THREADS", threads)
            .env_remove("SOURCE_DATE_EPOCH")
            .arg("create")
            .arg(&yaml)
            .arg("-o")
            .arg(&out);
        ok(c);
        shas.push(support::sha256_file(&out));
    }
    // The same inputs generated elsewhere, created from another working directory.
    let other = tempfile::tempdir().unwrap();
    let yaml2 = support::small_set(&other.path().join("elsewhere"));
    let out = other.path().join("x.bundle");
    let mut c = support::bundle();
    c.current_dir(other.path())
        .env_remove("SOURCE_DATE_EPOCH")
        .args(["create", "elsewhere/bundle.yaml", "-o", "x.bundle"]);
    ok(c);
    assert!(yaml2.exists());
    shas.push(support::sha256_file(&out));
    assert!(shas.windows(2).all(|w| w[0] == w[1]), "{shas:?}");
}

#[test]
fn created_comes_only_from_source_date_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let plain = dir.path().join("plain.bundle");
    let mut c = support::bundle();
    c.env_remove("SOURCE_DATE_EPOCH")
        .arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(&plain);
    ok(c);
    assert!(support::inspect_json(&plain)["created"].is_null());
    let dated = dir.path().join("dated.bundle");
    let mut c = support::bundle();
    c.env("SOURCE_DATE_EPOCH", "1700000000")
        .arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(&dated);
    ok(c);
    assert_eq!(
        support::inspect_json(&dated)["created"],
        "2023-11-14T22:13:20Z"
    );
    let mut c = support::bundle();
    c.env("SOURCE_DATE_EPOCH", "yesterday")
        .arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(&dated);
    let e = support::fails(c);
    assert!(e.contains("SOURCE_DATE_EPOCH"), "{e}");
}
