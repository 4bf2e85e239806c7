//! oci-layout sources: tag selection, platform filtering, corrupt and missing blobs.

use std::fs;

use bundle_format::{Content, Digest};
use bundle_layout::{Error, Place, Platform, SourceSpec, resolve};
use serde_json::{Value, json};

use crate::fixture::*;

const NAME: &str = "registry.example/app:1.0";

fn spec(dir: &std::path::Path, tag: Option<&str>) -> SourceSpec {
    SourceSpec::OciLayout {
        path: dir.to_owned(),
        tag: tag.map(str::to_owned),
    }
}

fn platforms(list: &[&str]) -> Vec<Platform> {
    list.iter().map(|p| p.parse().expect("platform")).collect()
}

/// Two single-platform images tagged 1.0 and 2.0.
fn two_tags(dir: &std::path::Path) -> (Layout, Image, Image) {
    let l = Layout::new(dir);
    let one = l.image("linux/amd64", &["one"]);
    let two = l.image("linux/amd64", &["two", "two-b"]);
    l.finish(vec![
        (one.descriptor(false), Some("1.0")),
        (two.descriptor(false), Some("2.0")),
    ]);
    (l, one, two)
}

/// An index over amd64, arm64/v8 and arm/v7 images, tagged `multi`.
fn multi(dir: &std::path::Path) -> (Layout, Vec<Image>, Value) {
    let l = Layout::new(dir);
    let imgs = vec![
        l.image("linux/amd64", &["amd64", "shared"]),
        l.image("linux/arm64/v8", &["arm64", "shared"]),
        l.image("linux/arm/v7", &["arm", "shared"]),
    ];
    let idx = l.index(imgs.iter().map(|i| i.descriptor(true)).collect());
    l.finish(vec![(idx.clone(), Some("multi"))]);
    (l, imgs, idx)
}

fn digest_of(desc: &Value) -> Digest {
    desc["digest"]
        .as_str()
        .expect("digest field")
        .parse()
        .expect("sha256 digest")
}

#[test]
fn picks_the_tagged_image() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _one, two) = two_tags(dir.path());
    let r = resolve(NAME, &spec(dir.path(), Some("2.0")), &[]).unwrap();
    assert_eq!(r.image.name, NAME);
    assert_eq!(r.image.digest, two.manifest);
    assert_eq!(r.image.size, two.manifest_size);
    assert_eq!(r.image.media_type, OCI_MANIFEST);
    assert_eq!(r.image.platforms, ["linux/amd64"]);
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    let mut want = vec![two.manifest, two.config];
    want.extend(&two.layers);
    assert_eq!(check_blobs(&r), sorted(want));
    for b in &r.blobs {
        if two.layers.contains(&b.digest) {
            assert_eq!(b.media_type.as_deref(), Some(LAYER_GZIP));
            match &b.content {
                Content::File { path, offset } => {
                    assert_eq!(path, &l.blob_path(&b.digest));
                    assert_eq!(*offset, 0);
                }
                other => panic!("layer {} as {other:?}", b.digest),
            }
        }
        if b.digest == two.manifest {
            assert_eq!(b.media_type.as_deref(), Some(OCI_MANIFEST));
        }
    }
    write_and_verify(&r, dir.path());
}

#[test]
fn containerd_name_annotation_selects_too() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(dir.path());
    let img = l.image("linux/amd64", &["x"]);
    let mut d = img.descriptor(false);
    d["annotations"] = json!({"io.containerd.image.name": "docker.io/library/app:3"});
    l.finish(vec![
        (d, None),
        (l.image("linux/amd64", &["y"]).descriptor(false), Some("y")),
    ]);
    let r = resolve(
        NAME,
        &spec(dir.path(), Some("docker.io/library/app:3")),
        &[],
    )
    .unwrap();
    assert_eq!(r.image.digest, img.manifest);
}

#[test]
fn the_only_image_needs_no_tag() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(dir.path());
    let img = l.image("linux/arm64/v8", &["x"]);
    l.finish(vec![(img.descriptor(false), None)]);
    let r = resolve(NAME, &spec(dir.path(), None), &[]).unwrap();
    assert_eq!(r.image.digest, img.manifest);
    assert_eq!(r.image.platforms, ["linux/arm64/v8"]);
}

#[test]
fn missing_tag_names_the_layout_the_tag_and_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    two_tags(dir.path());
    let err = resolve(NAME, &spec(dir.path(), Some("3.0")), &[]).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::TagNotFound {
            layout,
            tag,
            available,
        } => {
            assert_eq!(layout, dir.path());
            assert_eq!(tag, "3.0");
            assert_eq!(available, ["1.0", "2.0"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("\"3.0\"") && msg.contains("1.0, 2.0"), "{msg}");
}

#[test]
fn several_images_without_a_tag_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    two_tags(dir.path());
    match resolve(NAME, &spec(dir.path(), None), &[]) {
        Err(Error::AmbiguousImage { available, .. }) => assert_eq!(available, ["1.0", "2.0"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn multi_platform_index_unfiltered_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, imgs, idx) = multi(dir.path());
    let r = resolve(NAME, &spec(dir.path(), Some("multi")), &[]).unwrap();
    assert_eq!(r.image.digest, digest_of(&idx));
    assert_eq!(r.image.media_type, OCI_INDEX);
    assert_eq!(
        r.image.platforms,
        ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"]
    );
    assert!(r.notes.is_empty());
    let mut want = vec![digest_of(&idx)];
    for i in &imgs {
        want.extend([i.manifest, i.config]);
        want.extend(&i.layers);
    }
    // The "shared" layer is the same blob in all three images and is listed once.
    assert_eq!(check_blobs(&r), sorted(want));
    assert_eq!(r.blobs.len(), 1 + 3 * 3 + 1);
    write_and_verify(&r, dir.path());
}

#[test]
fn platform_filter_rewrites_the_index_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (l, imgs, idx) = multi(dir.path());
    // The dropped manifests are never read: remove them to prove it.
    for i in &imgs[1..] {
        fs::remove_file(l.blob_path(&i.manifest)).unwrap();
    }
    let r = resolve(
        NAME,
        &spec(dir.path(), Some("multi")),
        &platforms(&["linux/amd64"]),
    )
    .unwrap();
    let old = digest_of(&idx);
    assert_ne!(r.image.digest, old);
    assert_eq!(r.image.platforms, ["linux/amd64"]);
    assert_eq!(
        r.notes,
        [format!(
            "{NAME}: --platform linux/amd64 keeps 1 of 3 manifests; the image index is rewritten, \
             so its digest changes from {old} to {} (the per-platform manifest digests are unchanged)",
            r.image.digest
        )]
    );
    let amd = &imgs[0];
    let mut want = vec![r.image.digest, amd.manifest, amd.config];
    want.extend(&amd.layers);
    assert_eq!(check_blobs(&r), sorted(want));

    let new = r.blobs.iter().find(|b| b.digest == r.image.digest).unwrap();
    assert_eq!(new.size, r.image.size);
    assert_eq!(new.media_type.as_deref(), Some(OCI_INDEX));
    let doc: Value = serde_json::from_slice(&content_bytes(&new.content, new.size)).unwrap();
    let kept = doc["manifests"].as_array().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["digest"], amd.manifest.to_string());
    assert_eq!(kept[0]["platform"]["architecture"], "amd64");
    assert_eq!(doc["mediaType"], OCI_INDEX);

    // Same input, same bytes.
    let again = resolve(
        NAME,
        &spec(dir.path(), Some("multi")),
        &platforms(&["linux/amd64"]),
    )
    .unwrap();
    assert_eq!(again.image.digest, r.image.digest);
    write_and_verify(&r, dir.path());
}

#[test]
fn platform_filter_keeping_all_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, _imgs, idx) = multi(dir.path());
    let filter = platforms(&["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    let r = resolve(NAME, &spec(dir.path(), Some("multi")), &filter).unwrap();
    assert_eq!(r.image.digest, digest_of(&idx));
    assert!(r.notes.is_empty());
}

#[test]
fn variant_filter_selects_one_arm() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, imgs, _idx) = multi(dir.path());
    let r = resolve(
        NAME,
        &spec(dir.path(), Some("multi")),
        &platforms(&["linux/arm64/v8"]),
    )
    .unwrap();
    assert_eq!(r.image.platforms, ["linux/arm64/v8"]);
    assert!(r.blobs.iter().any(|b| b.digest == imgs[1].manifest));
    assert!(
        r.notes[0].contains("keeps 1 of 3 manifests"),
        "{:?}",
        r.notes
    );
}

#[test]
fn no_matching_platform_lists_what_there_is() {
    let dir = tempfile::tempdir().unwrap();
    multi(dir.path());
    let err = resolve(
        NAME,
        &spec(dir.path(), Some("multi")),
        &platforms(&["linux/s390x"]),
    )
    .unwrap_err();
    let msg = err.to_string();
    match err {
        Error::NoMatchingPlatform {
            image,
            wanted,
            available,
        } => {
            assert_eq!(image, NAME);
            assert_eq!(wanted, ["linux/s390x"]);
            assert_eq!(available, ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(msg.contains(NAME) && msg.contains("linux/s390x"), "{msg}");
}

#[test]
fn single_manifest_of_another_platform_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, _one, _two) = two_tags(dir.path());
    match resolve(
        NAME,
        &spec(dir.path(), Some("1.0")),
        &platforms(&["linux/arm64"]),
    ) {
        Err(Error::NoMatchingPlatform { available, .. }) => assert_eq!(available, ["linux/amd64"]),
        other => panic!("{other:?}"),
    }
    let r = resolve(
        NAME,
        &spec(dir.path(), Some("1.0")),
        &platforms(&["linux/amd64"]),
    )
    .unwrap();
    assert!(r.notes.is_empty());
}

#[test]
fn attestations_follow_their_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(dir.path());
    let amd = l.image("linux/amd64", &["amd"]);
    let arm = l.image("linux/arm64", &["arm"]);
    let att = |about: &Image| {
        let a = l.image(
            "unknown/unknown",
            &[&format!("attestation of {}", about.platform)],
        );
        let mut d = a.descriptor(true);
        d["annotations"] = json!({
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": about.manifest.to_string(),
        });
        (a, d)
    };
    let (amd_att, amd_att_d) = att(&amd);
    let (arm_att, arm_att_d) = att(&arm);
    let idx = l.index(vec![
        amd.descriptor(true),
        arm.descriptor(true),
        amd_att_d,
        arm_att_d,
    ]);
    l.finish(vec![(idx, Some("x"))]);

    let all = resolve(NAME, &spec(dir.path(), Some("x")), &[]).unwrap();
    assert_eq!(all.image.platforms, ["linux/amd64", "linux/arm64"]);
    assert!(all.blobs.iter().any(|b| b.digest == arm_att.manifest));

    let r = resolve(
        NAME,
        &spec(dir.path(), Some("x")),
        &platforms(&["linux/amd64"]),
    )
    .unwrap();
    assert_eq!(r.image.platforms, ["linux/amd64"]);
    let ds = check_blobs(&r);
    assert!(ds.contains(&amd_att.manifest) && ds.contains(&amd.manifest));
    assert!(!ds.contains(&arm_att.manifest) && !ds.contains(&arm.manifest));
    assert!(
        r.notes[0].contains("keeps 1 of 2 manifests"),
        "{:?}",
        r.notes
    );
}

#[test]
fn docker_media_types_are_walked() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(dir.path());
    let img = l.image("linux/amd64", &["x"]);
    let mut child = img.descriptor(true);
    child["mediaType"] = json!("application/vnd.docker.distribution.manifest.v2+json");
    let list = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [child],
    });
    let (d, size) = l.blob(&serde_json::to_vec(&list).unwrap());
    let list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
    l.finish(vec![(
        json!({"mediaType": list_type, "digest": d.to_string(), "size": size}),
        None,
    )]);
    let r = resolve(NAME, &spec(dir.path(), None), &[]).unwrap();
    assert_eq!(r.image.digest, d);
    assert_eq!(r.image.media_type, list_type);
    assert_eq!(r.image.platforms, ["linux/amd64"]);
    let m = r.blobs.iter().find(|b| b.digest == img.manifest).unwrap();
    assert_eq!(
        m.media_type.as_deref(),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );
}

#[test]
fn corrupted_manifest_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let (l, one, _two) = two_tags(dir.path());
    let path = l.blob_path(&one.manifest);
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] = b' '; // same length, different content: `{` becomes a space
    fs::write(&path, &bytes).unwrap();
    let err = resolve(NAME, &spec(dir.path(), Some("1.0")), &[]).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::DigestMismatch {
            expected, found, ..
        } => {
            assert_eq!(expected, one.manifest);
            assert_eq!(found, sha(&bytes));
        }
        other => panic!("{other:?}"),
    }
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn missing_layer_blob_names_digest_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _one, two) = two_tags(dir.path());
    let gone = two.layers[1];
    fs::remove_file(l.blob_path(&gone)).unwrap();
    let err = resolve(NAME, &spec(dir.path(), Some("2.0")), &[]).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::BlobMissing { digest, place } => {
            assert_eq!(digest, gone);
            assert_eq!(place, Place::File(l.blob_path(&gone)));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        msg.contains(&gone.to_string()) && msg.contains(&l.blob_path(&gone).display().to_string())
    );
}

#[test]
fn truncated_layer_blob_is_a_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (l, one, _two) = two_tags(dir.path());
    let path = l.blob_path(&one.layers[0]);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    match resolve(NAME, &spec(dir.path(), Some("1.0")), &[]) {
        Err(Error::SizeMismatch {
            what,
            expected,
            found,
        }) => {
            assert_eq!(expected, bytes.len() as u64);
            assert_eq!(found, expected - 1);
            assert!(what.contains(&one.layers[0].to_string()), "{what}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn non_sha256_digest_names_the_manifest_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(dir.path());
    let (config, size) = l.blob(br#"{"os":"linux","architecture":"amd64"}"#);
    let manifest = json!({
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": config.to_string(), "size": size},
        "layers": [{"mediaType": LAYER_GZIP, "digest": format!("sha512:{}", "ab".repeat(64)), "size": 3}],
    });
    let (m, msize) = l.blob(&serde_json::to_vec(&manifest).unwrap());
    l.finish(vec![(
        json!({"mediaType": OCI_MANIFEST, "digest": m.to_string(), "size": msize}),
        None,
    )]);
    match resolve(NAME, &spec(dir.path(), None), &[]) {
        Err(Error::InvalidDigest { what, field, .. }) => {
            assert_eq!(field, "layers[0].digest");
            assert!(what.contains(&m.to_string()), "{what}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_directory_without_oci_layout_is_not_a_layout() {
    let dir = tempfile::tempdir().unwrap();
    match resolve(NAME, &spec(dir.path(), None), &[]) {
        Err(Error::NotALayout { path, reason }) => {
            assert_eq!(path, dir.path());
            assert!(reason.contains("oci-layout"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let missing = dir.path().join("nope");
    assert!(matches!(
        resolve(NAME, &spec(&missing, None), &[]),
        Err(Error::Io { path, .. }) if path == missing
    ));
}
