//! Split archives: parts at frame boundaries, read as one, verified alone.

use std::process::Command;

use crate::support::{self, fails, ok, tool};

#[test]
fn parts_work_as_one_file_and_alone() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let whole = dir.path().join("whole.bundle");
    support::create(&yaml, &whole, &[]);
    let out = dir.path().join("demo.bundle");
    // Small enough that the small set needs several parts.
    let text = support::create(&yaml, &out, &["--split-size", "8KiB"]);
    assert!(text.contains("demo.bundle.000"), "{text}");
    let parts: Vec<_> = (0..)
        .map(|i| dir.path().join(format!("demo.bundle.{i:03}")))
        .take_while(|p| p.exists())
        .collect();
    assert!(parts.len() >= 2, "{parts:?}");
    for p in &parts {
        assert!(
            std::fs::metadata(p).unwrap().len() <= 8 * 1024,
            "{}",
            p.display()
        );
    }
    // Same images and digests as the unsplit archive.
    let a = support::inspect_json(&out);
    let w = support::inspect_json(&whole);
    assert_eq!(a["images"], w["images"]);
    // verify by base name, by a middle part, by the explicit list, and each part alone.
    let mut c = support::bundle();
    c.args(["verify", "--deep"]).arg(&out);
    ok(c);
    let mut c = support::bundle();
    c.arg("verify").arg(&parts[1]);
    ok(c);
    let mut c = support::bundle();
    c.arg("verify").args(&parts);
    ok(c);
    for (i, p) in parts.iter().enumerate() {
        let mut c = support::bundle();
        c.args(["verify", "--part"]).arg(p);
        let text = ok(c);
        assert!(
            text.contains(&format!("is part {i} of {}", parts.len())),
            "{text}"
        );
    }
    // cat of the parts through stock zstd and tar, then skopeo.
    let layout = dir.path().join("stock");
    std::fs::create_dir(&layout).unwrap();
    tool("zstd");
    let list: Vec<String> = parts.iter().map(|p| format!("'{}'", p.display())).collect();
    let st = Command::new("sh")
        .args([
            "-c",
            &format!(
                "cat {} | zstd -dc | tar -x -C '{}'",
                list.join(" "),
                layout.display()
            ),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = tool("skopeo");
    c.args(["inspect", "--raw"]).arg(format!(
        "oci:{}:registry.example/team/multi:1.0",
        layout.display()
    ));
    let raw = support::run(c);
    assert!(raw.status.success());
    let multi = a["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "registry.example/team/multi:1.0")
        .unwrap();
    assert_eq!(
        support::sha256(&raw.stdout),
        multi["digest"].as_str().unwrap()
    );
    // extract works from a part name too.
    let mut c = support::bundle();
    c.arg("extract").arg(&parts[0]).arg(dir.path().join("x"));
    ok(c);

    // A missing part is named; a swapped part is named.
    let last = parts.last().unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(last, &moved).unwrap();
    let mut c = support::bundle();
    c.arg("verify").arg(&out);
    let e = fails(c);
    assert!(
        e.contains(&format!(
            "part {} of {} is missing",
            parts.len() - 1,
            parts.len()
        )),
        "{e}"
    );
    assert!(
        e.contains(&last.file_name().unwrap().to_string_lossy().into_owned()),
        "{e}"
    );
    std::fs::rename(&moved, last).unwrap();
    let mut c = support::bundle();
    c.arg("verify")
        .arg(&parts[1])
        .arg(&parts[0])
        .args(&parts[2..]);
    let e = fails(c);
    assert!(
        e.contains("demo.bundle.001") && e.contains("expected part 0"),
        "{e}"
    );
}

#[test]
fn split_size_too_small_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let mut c = support::bundle();
    c.arg("create")
        .arg(&yaml)
        .arg("-o")
        .arg(dir.path().join("x.bundle"))
        .args(["--split-size", "2KiB"]);
    let e = fails(c);
    assert!(e.contains("too small"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("images")],
        "left behind: {left:?}"
    );
}
