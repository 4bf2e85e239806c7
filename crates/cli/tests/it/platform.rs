//! `--platform` keeps only the platforms named and says what that does to the digest.

use crate::support::{self, fails, ok};

#[test]
fn platform_filter_rewrites_the_index_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let whole = dir.path().join("whole.bundle");
    support::create(&yaml, &whole, &[]);
    let out = dir.path().join("amd64.bundle");
    let mut c = support::bundle();
    c.arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(&out)
        .args(["--platform", "linux/amd64"]);
    let o = support::run(c);
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let name = "registry.example/team/multi:1.0";
    let find = |v: &serde_json::Value| {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()
            .clone()
    };
    let (before, after) = (
        find(&support::inspect_json(&whole)),
        find(&support::inspect_json(&out)),
    );
    assert_eq!(
        before["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    assert_eq!(after["platforms"], serde_json::json!(["linux/amd64"]));
    assert_ne!(before["digest"], after["digest"]);
    for want in [
        name,
        "keeps 1 of 2",
        before["digest"].as_str().unwrap(),
        after["digest"].as_str().unwrap(),
    ] {
        assert!(stderr.contains(want), "want {want:?} in: {stderr}");
    }
    // The filtered archive is smaller (no arm64 layers) and verifies.
    assert!(std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&whole).unwrap().len());
    let mut c = support::bundle();
    c.args(["verify", "--deep"]).arg(&out);
    ok(c);
    // No image offers s390x: the error names the image and what is available.
    let mut c = support::bundle();
    c.arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(dir.path().join("none.bundle"))
        .args(["--platform", "linux/s390x"]);
    let e = fails(c);
    assert!(
        e.contains("linux/s390x") && e.contains("linux/amd64"),
        "{e}"
    );
    let mut c = support::bundle();
    c.arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(dir.path().join("bad.bundle"))
        .args(["--platform", "linux"]);
    let e = support::run(c);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--platform"));
}
