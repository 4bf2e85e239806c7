//! Against a real peer: archives written by skopeo resolve to the digests skopeo reports, and a
//! platform-filtered index is one skopeo accepts. Needs `skopeo` on PATH (the project's test
//! command installs it); without it these tests fail, they do not skip.

use std::path::Path;
use std::process::Command;

use bundle_format::Digest;
use bundle_layout::{Platform, Resolved, SourceSpec, resolve};
use serde_json::Value;

use crate::fixture::*;

const NAME: &str = "registry.example/app:1.0";

/// Runs `skopeo --insecure-policy ARGS` and returns its stdout.
fn skopeo(tmp: &Path, args: &[&str]) -> Vec<u8> {
    let out = match Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .env("TMPDIR", tmp)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run skopeo ({e}): the bundle-layout tests check archives against a real \
             skopeo; install it (Debian/Ubuntu: apt-get install skopeo) or run the project's \
             test command, which does"
        ),
    };
    assert!(
        out.status.success(),
        "skopeo {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn digest(v: &Value) -> Digest {
    v["digest"]
        .as_str()
        .expect("digest field")
        .parse()
        .expect("sha256 digest")
}

fn blob_digests(r: &Resolved) -> Vec<Digest> {
    sorted(r.blobs.iter().map(|b| b.digest).collect())
}

fn single_image_layout(dir: &Path) -> (Layout, Image) {
    let l = Layout::new(&dir.join("layout"));
    let img = l.image("linux/amd64", &["first layer", "second layer"]);
    l.finish(vec![(img.descriptor(false), Some("1.0"))]);
    (l, img)
}

#[test]
fn skopeo_oci_archive_resolves_to_skopeos_digests() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let (l, img) = single_image_layout(tmp);
    let archive = tmp.join("app-oci.tar");
    let src = format!("oci:{}:1.0", l.dir.display());
    let dst = format!("oci-archive:{}:1.0", archive.display());
    skopeo(tmp, &["copy", "--quiet", &src, &dst]);

    let r = resolve(NAME, &SourceSpec::parse(&dst).unwrap(), &[]).unwrap();
    let raw = skopeo(tmp, &["inspect", "--raw", &dst]);
    let config = skopeo(tmp, &["inspect", "--raw", "--config", &dst]);
    let manifest: Value = serde_json::from_slice(&raw).unwrap();

    assert_eq!(r.image.digest, sha(&raw));
    assert_eq!(r.image.size, raw.len() as u64);
    assert_eq!(digest(&manifest["config"]), sha(&config));
    let layers: Vec<Digest> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(digest)
        .collect();
    let mut want = vec![sha(&raw), sha(&config)];
    want.extend(&layers);
    assert_eq!(blob_digests(&r), sorted(want));
    // skopeo copied the layout unchanged.
    assert_eq!(r.image.digest, img.manifest);
    assert_eq!(layers, img.layers);
    check_blobs(&r);
    write_and_verify(&r, tmp);
}

#[test]
fn skopeo_docker_archive_resolves_to_skopeos_digests() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    // A repeated layer: skopeo stores it once and links the second name to it.
    let l = Layout::new(&tmp.join("layout"));
    let img = l.image(
        "linux/amd64",
        &["first layer", "second layer", "first layer"],
    );
    l.finish(vec![(img.descriptor(false), Some("1.0"))]);
    let archive = tmp.join("app-docker.tar");
    let src = format!("oci:{}:1.0", l.dir.display());
    let dst = format!(
        "docker-archive:{}:registry.example/app:1.0",
        archive.display()
    );
    skopeo(tmp, &["copy", "--quiet", &src, &dst]);

    let r = resolve(NAME, &SourceSpec::parse(&dst).unwrap(), &[]).unwrap();
    let raw = skopeo(tmp, &["inspect", "--raw", &dst]);
    let config = skopeo(tmp, &["inspect", "--raw", "--config", &dst]);
    let theirs: Value = serde_json::from_slice(&raw).unwrap();

    let ours = r.blobs.iter().find(|b| b.digest == r.image.digest).unwrap();
    let ours: Value = serde_json::from_slice(&content_bytes(&ours.content, ours.size)).unwrap();
    assert_eq!(digest(&ours["config"]), sha(&config));
    assert_eq!(digest(&theirs["config"]), sha(&config));
    assert_eq!(sha(&config), img.config, "the config is carried unchanged");
    let their_layers = theirs["layers"].as_array().unwrap();
    let our_layers = ours["layers"].as_array().unwrap();
    assert_eq!(their_layers.len(), our_layers.len());
    for (t, o) in their_layers.iter().zip(our_layers) {
        assert_eq!(digest(t), digest(o));
        assert_eq!(t["size"], o["size"]);
        // skopeo labels every docker-archive layer `diff.tar.gzip`, compressed or not (and
        // it decompresses layers it writes there), so the bytes decide: they are the
        // uncompressed tars the config's diff_ids name.
        assert_eq!(o["mediaType"], LAYER_TAR);
    }
    let config_json: Value = serde_json::from_slice(&config).unwrap();
    let diff_ids: Vec<Digest> = config_json["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    let our_digests: Vec<Digest> = our_layers.iter().map(digest).collect();
    assert_eq!(our_digests, diff_ids);
    assert_eq!(our_digests[0], our_digests[2]);
    let mut want = vec![r.image.digest, sha(&config)];
    want.extend(their_layers.iter().map(digest));
    assert_eq!(r.blobs.len(), 4, "the repeated layer is listed once");
    assert_eq!(blob_digests(&r), sorted(want));
    check_blobs(&r);
    write_and_verify(&r, tmp);
}

#[test]
fn skopeo_multi_arch_archive_filtered_index_is_accepted_by_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let l = Layout::new(&tmp.join("layout"));
    let amd = l.image("linux/amd64", &["amd64"]);
    let arm = l.image("linux/arm64/v8", &["arm64"]);
    let idx = l.index(vec![amd.descriptor(true), arm.descriptor(true)]);
    l.finish(vec![(idx, Some("multi"))]);
    let archive = tmp.join("multi.tar");
    let src = format!("oci:{}:multi", l.dir.display());
    let dst = format!("oci-archive:{}:multi", archive.display());
    skopeo(tmp, &["copy", "--quiet", "--all", &src, &dst]);
    let raw = skopeo(tmp, &["inspect", "--raw", &dst]);

    let spec = SourceSpec::parse(&dst).unwrap();
    let all = resolve(NAME, &spec, &[]).unwrap();
    assert_eq!(all.image.digest, sha(&raw));
    assert_eq!(all.image.platforms, ["linux/amd64", "linux/arm64/v8"]);

    let arm64: Platform = "linux/arm64".parse().unwrap();
    let r = resolve(NAME, &spec, &[arm64]).unwrap();
    assert!(
        r.notes[0].contains(&format!("from {} to {}", sha(&raw), r.image.digest)),
        "{:?}",
        r.notes
    );
    assert_eq!(
        blob_digests(&r),
        sorted(vec![
            r.image.digest,
            arm.manifest,
            arm.config,
            arm.layers[0]
        ])
    );

    // Write the bundle, unpack it as an OCI layout and let skopeo read and copy the result.
    let input = bundle_format::BundleInput {
        name: "test".into(),
        version: "1".into(),
        created: None,
        images: vec![r.image.clone()],
        blobs: r.blobs.clone(),
    };
    let out = tmp.join("multi.bundle");
    bundle_format::write(&input, &out, &bundle_format::WriteOptions::default()).unwrap();
    let unpacked = tmp.join("unpacked");
    bundle_format::Archive::open(&out)
        .unwrap()
        .extract(&unpacked)
        .unwrap();
    let from_bundle = format!("oci:{}:{NAME}", unpacked.display());
    let raw_filtered = skopeo(tmp, &["inspect", "--raw", &from_bundle]);
    assert_eq!(sha(&raw_filtered), r.image.digest);
    let index: Value = serde_json::from_slice(&raw_filtered).unwrap();
    let kept = index["manifests"].as_array().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(digest(&kept[0]), arm.manifest);
    let copy = format!("oci:{}:copy", tmp.join("copy").display());
    skopeo(tmp, &["copy", "--quiet", "--all", &from_bundle, &copy]);
}
