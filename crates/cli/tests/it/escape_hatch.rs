//! The archive opens with stock tools: `zstd -dc | tar -x` gives a layout that skopeo and umoci
//! accept, with every digest equal to `bundle inspect --json`.

use std::path::Path;
use std::process::Command;

use crate::support::{self, ok, tool};

fn check_layout_with_skopeo(layout: &Path, inspect: &serde_json::Value, work: &Path) {
    for (i, img) in inspect["images"].as_array().unwrap().iter().enumerate() {
        let name = img["name"].as_str().unwrap();
        let digest = img["digest"].as_str().unwrap();
        let src = format!("oci:{}:{name}", layout.display());
        // The raw manifest or index skopeo reads hashes to our digest.
        let mut c = tool("skopeo");
        c.args(["inspect", "--raw", &src]);
        let raw = support::run(c);
        assert!(
            raw.status.success(),
            "skopeo inspect {src}: {}",
            String::from_utf8_lossy(&raw.stderr)
        );
        assert_eq!(support::sha256(&raw.stdout), digest, "{name}");
        // skopeo copies every platform and keeps the digest.
        let dest = work.join(format!("copy{i}"));
        let mut c = tool("skopeo");
        c.args(["copy", "--all", "--preserve-digests", &src])
            .arg(format!("oci:{}:x", dest.display()));
        ok(c);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["manifests"][0]["digest"].as_str().unwrap(),
            digest,
            "{name} after skopeo copy"
        );
    }
}

#[test]
fn zstd_and_tar_give_a_layout_skopeo_and_umoci_accept() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let archive = dir.path().join("demo.bundle");
    support::create(&yaml, &archive, &[]);
    let inspect = support::inspect_json(&archive);
    assert_eq!(inspect["images"].as_array().unwrap().len(), 5);

    let layout = dir.path().join("stock");
    std::fs::create_dir(&layout).unwrap();
    let pipeline = format!(
        "zstd -dc '{}' | tar -x -C '{}'",
        archive.display(),
        layout.display()
    );
    tool("zstd");
    let st = Command::new("sh").args(["-c", &pipeline]).status().unwrap();
    assert!(st.success(), "{pipeline}");
    check_layout_with_skopeo(&layout, &inspect, dir.path());

    // umoci unpacks a single-platform image from the same layout.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 5);
    let mut c = tool("umoci");
    c.args(["ls", "--layout"]).arg(&layout);
    let tags = ok(c);
    assert!(
        tags.contains("registry.example/team/app:1.0"),
        "umoci ls: {tags}"
    );
    let mut c = tool("umoci");
    c.args(["unpack", "--rootless", "--image"])
        .arg(format!(
            "{}:registry.example/team/app:1.0",
            layout.display()
        ))
        .arg(dir.path().join("rootfs-bundle"));
    ok(c);
    assert!(dir.path().join("rootfs-bundle/rootfs").is_dir());
}

#[test]
fn bundle_extract_gives_the_same_layout() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let archive = dir.path().join("demo.bundle");
    support::create(&yaml, &archive, &[]);
    let inspect = support::inspect_json(&archive);
    let out = dir.path().join("extracted");
    let mut c = support::bundle();
    c.arg("extract").arg(&archive).arg(&out);
    ok(c);
    check_layout_with_skopeo(&out, &inspect, dir.path());
    // The same bytes as the stock pipeline.
    let stock = dir.path().join("stock");
    std::fs::create_dir(&stock).unwrap();
    let st = Command::new("sh")
        .args([
            "-c",
            &format!(
                "zstd -dc '{}' | tar -x -C '{}'",
                archive.display(),
                stock.display()
            ),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("diff")
        .arg("-r")
        .arg(&stock)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "bundle extract and zstd|tar differ");
}
