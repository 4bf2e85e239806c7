//! The small set: determinism, structure, and what skopeo and umoci make of it.

use std::os::unix::fs::PermissionsExt;

use bundle_testimages::{
    MEDIA_INDEX, MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR, MEDIA_MANIFEST, SmallSet, small_set,
};

use crate::{files, gunzip, json, peer, sha256};

fn fresh() -> (tempfile::TempDir, SmallSet) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let set = small_set(&tmp.path().join("images")).expect("small set");
    (tmp, set)
}

#[test]
fn two_runs_write_identical_bytes() {
    let (_a, one) = fresh();
    let (_b, two) = fresh();
    let (x, y) = (files(&one.dir), files(&two.dir));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (path, bytes) in &x {
        assert!(bytes == &y[path], "{} differs", path.display());
    }
    let total: usize = x.values().map(Vec::len).sum();
    assert!(total < 1 << 20, "small set is {total} bytes");
}

#[test]
fn a_complete_set_is_reused_and_an_incomplete_one_rewritten() {
    let (_tmp, set) = fresh();
    assert!(!set.reused);
    let again = small_set(&set.dir).expect("again");
    assert!(again.reused);
    assert_eq!(again.layout, set.layout);
    assert_eq!(
        again
            .images
            .iter()
            .map(|i| &i.descriptor)
            .collect::<Vec<_>>(),
        set.images.iter().map(|i| &i.descriptor).collect::<Vec<_>>()
    );
    std::fs::remove_file(&set.docker_archive).expect("rm");
    let rewritten = small_set(&set.dir).expect("rewrite");
    assert!(!rewritten.reused);
    assert!(set.docker_archive.exists());
}

#[test]
fn bundle_yaml_names_every_image() {
    let (_tmp, set) = fresh();
    let yaml = std::fs::read_to_string(&set.bundle_yaml).expect("bundle.yaml");
    assert_eq!(
        yaml,
        "name: demo\nversion: 1.0.0\nimages:\n\
         \x20 - name: registry.example/team/app:1.0\n    source: oci-layout:layout:app-1.0\n\
         \x20 - name: registry.example/team/multi:1.0\n    source: oci-layout:layout:multi-1.0\n\
         \x20 - name: registry.example/team/plain:1.0\n    source: oci-layout:layout:plain-1.0\n\
         \x20 - name: registry.example/team/from-oci-archive:1.0\n    source: oci-archive:app.oci.tar\n\
         \x20 - name: registry.example/team/from-docker:1.0\n    source: docker-archive:app.docker.tar\n"
    );
}

#[test]
fn layout_blobs_match_their_descriptors() {
    let (_tmp, set) = fresh();
    let blob = |digest: &str| {
        std::fs::read(
            set.layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("blob present")
    };
    let index = json(&set.layout.join("index.json"));
    let tags: Vec<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .expect("tag")
        })
        .collect();
    assert_eq!(tags, ["app-1.0", "multi-1.0", "plain-1.0"]);

    for img in set
        .images
        .iter()
        .filter(|i| i.source.starts_with("oci-layout:"))
    {
        let d = img
            .descriptor
            .as_ref()
            .expect("layout images have a descriptor");
        let bytes = blob(&d.digest);
        assert_eq!(
            (sha256(&bytes), bytes.len() as u64),
            (d.digest.clone(), d.size),
            "{}",
            img.name
        );
        for m in &img.manifests {
            let md = m.manifest.as_ref().expect("manifest");
            let manifest: serde_json::Value =
                serde_json::from_slice(&blob(&md.digest)).expect("json");
            assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
            assert_eq!(manifest["config"]["digest"], m.config.digest);
            let config: serde_json::Value =
                serde_json::from_slice(&blob(&m.config.digest)).expect("json");
            assert_eq!(
                format!(
                    "{}/{}",
                    config["os"].as_str().expect("os"),
                    config["architecture"].as_str().expect("arch")
                ),
                m.platform
            );
            assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!(m.diff_ids));
            for (layer, diff_id) in m.layers.iter().zip(&m.diff_ids) {
                let bytes = blob(&layer.digest);
                assert_eq!(sha256(&bytes), layer.digest);
                let tar = match layer.media_type.as_str() {
                    MEDIA_LAYER_GZIP => gunzip(&bytes),
                    MEDIA_LAYER_TAR => bytes,
                    other => panic!("unexpected layer type {other}"),
                };
                assert_eq!(&sha256(&tar), diff_id, "diff_id of {}", layer.digest);
            }
        }
    }

    let multi = set.image("registry.example/team/multi:1.0").expect("multi");
    assert_eq!(
        multi.descriptor.as_ref().expect("index").media_type,
        MEDIA_INDEX
    );
    assert_eq!(multi.platforms(), ["linux/amd64", "linux/arm64"]);
    for m in &multi.manifests {
        assert_eq!(
            m.layers[0], set.base_layer,
            "{} shares the base layer",
            m.platform
        );
    }
    let app = set.image("registry.example/team/app:1.0").expect("app");
    assert_eq!(app.manifests[0].layers[0], set.base_layer);
    let plain = set.image("registry.example/team/plain:1.0").expect("plain");
    assert!(
        plain.manifests[0]
            .layers
            .iter()
            .all(|l| l.media_type == MEDIA_LAYER_TAR)
    );
    // The uncompressed base is the very tar the gzip base layer decompresses to.
    assert_eq!(
        plain.manifests[0].layers[0].digest,
        app.manifests[0].diff_ids[0]
    );
}

#[test]
fn skopeo_inspects_every_layout_image_by_tag() {
    let (_tmp, set) = fresh();
    for img in set
        .images
        .iter()
        .filter(|i| i.source.starts_with("oci-layout:"))
    {
        let tag = img.tag.as_deref().expect("tag");
        let reference = format!("oci:{}:{tag}", set.layout.display());
        let raw = peer("skopeo", &["inspect", "--raw", &reference]).stdout;
        assert_eq!(
            Some(sha256(&raw)),
            img.descriptor.as_ref().map(|d| d.digest.clone()),
            "{reference}"
        );
    }
    let reference = format!("oci:{}:app-1.0", set.layout.display());
    let out: serde_json::Value =
        serde_json::from_slice(&peer("skopeo", &["inspect", &reference]).stdout).expect("json");
    let app = set.image("registry.example/team/app:1.0").expect("app");
    assert_eq!(
        out["Digest"],
        app.descriptor.as_ref().expect("manifest").digest
    );
    assert_eq!(out["Architecture"], "amd64");
    assert_eq!(out["Os"], "linux");
}

#[test]
fn skopeo_copies_every_source() {
    let (tmp, set) = fresh();
    for (n, img) in set.images.iter().enumerate() {
        let dir = set.dir.display();
        let src = match img.source.split_once(':').expect("kind:rest") {
            ("oci-layout", rest) => format!("oci:{dir}/{rest}"),
            ("oci-archive", file) => format!("oci-archive:{dir}/{file}"),
            ("docker-archive", file) => format!("docker-archive:{dir}/{file}"),
            (kind, _) => panic!("unexpected source kind {kind}"),
        };
        let out = tmp.path().join(format!("copy{n}"));
        let dest = format!("dir:{}", out.display());
        peer(
            "skopeo",
            &["--insecure-policy", "copy", "--all", "--quiet", &src, &dest],
        );
        // skopeo verified every blob digest on the way; the config must have survived as is.
        for m in &img.manifests {
            assert!(
                out.join(m.config.digest.trim_start_matches("sha256:"))
                    .exists(),
                "{src}: config of {}",
                m.platform
            );
        }
    }
}

#[test]
fn umoci_unpacks_app_and_plain() {
    let (tmp, set) = fresh();
    for (tag, probe) in [("app-1.0", "app/run.sh"), ("plain-1.0", "plain/run.sh")] {
        let bundle = tmp.path().join(format!("unpacked-{tag}"));
        let image = format!("{}:{tag}", set.layout.display());
        peer(
            "umoci",
            &[
                "unpack",
                "--rootless",
                "--image",
                &image,
                &bundle.to_string_lossy(),
            ],
        );
        let rootfs = bundle.join("rootfs");
        let hello = std::fs::read_to_string(rootfs.join("bin/hello"))
            .expect("bin/hello from the base layer");
        assert!(hello.starts_with("#!/bin/sh"));
        let mode = std::fs::metadata(rootfs.join(probe))
            .expect(probe)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{tag}: {probe}");
    }
}
