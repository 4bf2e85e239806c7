//! Bad input through the command line: a clear error naming the thing at fault, exit 1, no
//! panic, nothing left under the final name.

use crate::support::{self, fails};

fn create_fails(yaml_text: &str, dir: &std::path::Path) -> String {
    let yaml = dir.join("images").join("bad.yaml");
    std::fs::write(&yaml, yaml_text).unwrap();
    let out = dir.join("out.bundle");
    let mut c = support::bundle();
    c.arg("create").arg(&yaml).arg("-o").arg(&out);
    let e = fails(c);
    assert!(!out.exists(), "a failed create left {}", out.display());
    let stray: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out.bundle"))
        .collect();
    assert!(stray.is_empty(), "temp files left: {stray:?}");
    e
}

#[test]
fn bundle_yaml_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    support::small_set(&dir.path().join("images"));
    let cases = [
        (
            "name: x\nversion: 1\nimages:\n  - name: a/b:1\n    sorce: oci-layout:layout:app-1.0\n",
            vec!["bad.yaml", "sorce"],
        ),
        (
            "name: x\nversion: 1\nextra: 2\nimages: []\n",
            vec!["bad.yaml", "extra"],
        ),
        ("version: 1\nimages: []\n", vec!["bad.yaml", "name"]),
        (
            "name: x\nversion: 1\nimages: []\n",
            vec!["bad.yaml", "images"],
        ),
        (
            "name: x\nversion: 1\nimages:\n  - name: a/b:1\n    source: oci-layout:layout:no-such-tag\n",
            vec!["bad.yaml", "images[0]", "no-such-tag"],
        ),
        (
            "name: x\nversion: 1\nimages:\n  - name: a/b:1\n    source: oci-layout:missing-dir:app-1.0\n",
            vec!["images[0]", "missing-dir"],
        ),
        (
            "name: x\nversion: 1\nimages:\n  - name: a/b:1\n    source: ftp:somewhere\n",
            vec!["images[0]", "ftp"],
        ),
        (
            "name: x\nversion: 1\nimages:\n  - name: a/b:1\n    source: docker-archive:nope.tar\n",
            vec!["images[0]", "nope.tar"],
        ),
        (
            // Without a source the name is pulled, so it must be a valid reference.
            "name: x\nversion: 1\nimages:\n  - name: Not/A/Reference:1\n",
            vec!["images[0]", "Not/A/Reference:1", "invalid image reference"],
        ),
        (
            "name: x\nversion: 1\nimages:\n  - name: a/b:1\n    source: oci-layout:layout:app-1.0\n  - name: a/b:1\n    source: oci-layout:layout:app-1.0\n",
            vec!["images[1].name"],
        ),
        ("name: [unclosed\n", vec!["bad.yaml"]),
    ];
    for (text, wants) in cases {
        let e = create_fails(text, dir.path());
        for w in wants {
            assert!(e.contains(w), "want {w:?} in: {e}\nfor:\n{text}");
        }
    }
    // A bundle.yaml that does not exist.
    let mut c = support::bundle();
    c.args(["create", "/nonexistent/bundle.yaml", "-o"])
        .arg(dir.path().join("o.bundle"));
    let e = fails(c);
    assert!(e.contains("/nonexistent/bundle.yaml"), "{e}");
}

#[test]
fn a_corrupt_layer_in_a_layout_aborts_create_naming_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    // Damage the largest blob of the layout (a layer).
    let blobs = dir.path().join("images/layout/blobs/sha256");
    let victim = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let out = dir.path().join("out.bundle");
    let mut c = support::bundle();
    c.arg("create").arg(&yaml).arg("-o").arg(&out);
    let e = fails(c);
    let hex = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(e.contains(&hex), "error does not name blob {hex}: {e}");
    assert!(!out.exists());
}

#[test]
fn damaged_archives_fail_verify_inspect_and_extract_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let archive = dir.path().join("demo.bundle");
    support::create(&yaml, &archive, &[]);
    let good = std::fs::read(&archive).unwrap();
    // Truncated: every command names the file.
    std::fs::write(&archive, &good[..good.len() - 100]).unwrap();
    for cmd in [&["verify"][..], &["inspect"], &["inspect", "--json"]] {
        let mut c = support::bundle();
        c.args(cmd).arg(&archive);
        let e = fails(c);
        assert!(e.contains("demo.bundle"), "{cmd:?}: {e}");
    }
    // A flipped byte in the first frame: verify names frame 0, extract leaves nothing.
    let mut bad = good.clone();
    bad[20] ^= 1;
    std::fs::write(&archive, &bad).unwrap();
    let mut c = support::bundle();
    c.arg("verify").arg(&archive);
    let e = fails(c);
    assert!(e.contains("frame 0 (oci-layout)"), "{e}");
    let target = dir.path().join("out");
    let mut c = support::bundle();
    c.arg("extract").arg(&archive).arg(&target);
    let e = fails(c);
    assert!(e.contains("frame 0"), "{e}");
    assert!(!target.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("out"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Not a bundle at all.
    std::fs::write(&archive, b"hello world, this is not a bundle but it is long enough to have a trailer of sixty-four bytes").unwrap();
    let mut c = support::bundle();
    c.arg("verify").arg(&archive);
    let e = fails(c);
    assert!(e.contains("not a bundle archive"), "{e}");
}
