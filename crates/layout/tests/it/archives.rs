//! oci-archive and docker-archive sources built in Rust: member offsets, compression and
//! unsafe names refused, docker's legacy `<id>/layer.tar` layout.

use std::fs;
use std::path::{Path, PathBuf};

use bundle_format::{Content, Digest};
use bundle_layout::{Error, Platform, SourceSpec, resolve};
use serde_json::{Value, json};

use crate::fixture::*;

const NAME: &str = "registry.example/app:1.0";

fn oci_archive(path: &Path, tag: Option<&str>) -> SourceSpec {
    SourceSpec::OciArchive {
        path: path.to_owned(),
        tag: tag.map(str::to_owned),
    }
}

fn docker_archive(path: &Path, reference: Option<&str>) -> SourceSpec {
    SourceSpec::DockerArchive {
        path: path.to_owned(),
        reference: reference.map(str::to_owned),
    }
}

#[test]
fn oci_archive_resolves_like_the_layout_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(&dir.path().join("layout"));
    let a = l.image("linux/amd64", &["a", "b"]);
    let b = l.image("linux/arm64/v8", &["c"]);
    let idx = l.index(vec![a.descriptor(true), b.descriptor(true)]);
    l.finish(vec![(idx, Some("1.0"))]);
    let tar = dir.path().join("app.tar");
    tar_dir(&l.dir, &tar);

    let from_dir = resolve(
        NAME,
        &SourceSpec::OciLayout {
            path: l.dir.clone(),
            tag: Some("1.0".into()),
        },
        &[],
    )
    .unwrap();
    let from_tar = resolve(NAME, &oci_archive(&tar, Some("1.0")), &[]).unwrap();
    assert_eq!(from_tar.image.digest, from_dir.image.digest);
    assert_eq!(from_tar.image.platforms, from_dir.image.platforms);
    assert_eq!(check_blobs(&from_tar), check_blobs(&from_dir));
    for blob in &from_tar.blobs {
        if let Content::File { path, .. } = &blob.content {
            assert_eq!(path, &tar, "layers are read from the archive in place");
        }
    }
    assert!(
        from_tar
            .blobs
            .iter()
            .any(|b| matches!(&b.content, Content::File { offset, .. } if *offset > 0))
    );

    let filtered = resolve(
        NAME,
        &oci_archive(&tar, Some("1.0")),
        &["linux/arm64".parse::<Platform>().unwrap()],
    )
    .unwrap();
    assert_eq!(filtered.image.platforms, ["linux/arm64/v8"]);
    assert_eq!(filtered.notes.len(), 1);
    write_and_verify(&filtered, dir.path());
}

#[test]
fn oci_archive_errors_name_the_member() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(&dir.path().join("layout"));
    let a = l.image("linux/amd64", &["a"]);
    l.finish(vec![(a.descriptor(false), Some("1.0"))]);
    fs::remove_file(l.blob_path(&a.layers[0])).unwrap();
    let tar = dir.path().join("app.tar");
    tar_dir(&l.dir, &tar);
    let err = resolve(NAME, &oci_archive(&tar, None), &[]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::BlobMissing { digest, .. } if digest == a.layers[0]));
    assert!(
        msg.contains(&tar.display().to_string())
            && msg.contains(&format!("blobs/sha256/{}", a.layers[0].hex())),
        "{msg}"
    );
    match resolve(NAME, &oci_archive(&tar, Some("2.0")), &[]) {
        Err(Error::TagNotFound { layout, tag, .. }) => {
            assert_eq!(layout, tar);
            assert_eq!(tag, "2.0");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn gzip_compressed_archive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(&dir.path().join("layout"));
    let a = l.image("linux/amd64", &["a"]);
    l.finish(vec![(a.descriptor(false), None)]);
    let tar = dir.path().join("app.tar");
    tar_dir(&l.dir, &tar);
    let tgz = dir.path().join("app.tar.gz");
    fs::write(&tgz, gzip(&fs::read(&tar).unwrap())).unwrap();
    for spec in [oci_archive(&tgz, None), docker_archive(&tgz, None)] {
        let err = resolve(NAME, &spec, &[]).unwrap_err();
        let msg = err.to_string();
        match err {
            Error::Compressed { path, kind, .. } => {
                assert_eq!(path, tgz);
                assert_eq!(kind, "gzip");
            }
            other => panic!("{other:?}"),
        }
        assert!(msg.contains("decompress it first"), "{msg}");
    }
}

#[test]
fn dotdot_member_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("evil.tar");
    let mut b = tar::Builder::new(Vec::new());
    append_raw(
        &mut b,
        "./oci-layout",
        tar::EntryType::Regular,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    append_raw(
        &mut b,
        "./blobs/../../etc/passwd",
        tar::EntryType::Regular,
        b"root",
    );
    fs::write(&tar, b.into_inner().unwrap()).unwrap();
    let err = resolve(NAME, &oci_archive(&tar, None), &[]).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::UnsafeMember { archive, member } => {
            assert_eq!(archive, tar);
            assert_eq!(member, "./blobs/../../etc/passwd");
        }
        other => panic!("{other:?}"),
    }
    assert!(msg.contains("./blobs/../../etc/passwd"), "{msg}");
}

#[test]
fn unknown_transport_is_named() {
    let err = SourceSpec::parse("docker://registry.example/app:1.0").unwrap_err();
    assert!(matches!(&err, Error::UnknownTransport { transport, .. } if transport == "docker"));
    assert!(err.to_string().contains("\"docker\""), "{err}");
}

/// A `docker save` archive in the legacy layout: `<id>/layer.tar` per layer, config named by
/// its digest, a repeated layer stored as a symlink to the first copy.
struct DockerSave {
    path: PathBuf,
    config: Vec<u8>,
    plain: Vec<u8>,
    gz: Vec<u8>,
}

fn docker_save(dir: &Path, tags: &[&str], config_name: Option<&str>) -> DockerSave {
    let plain = layer_tar(&[("etc/hello", b"hello")]);
    let inner = layer_tar(&[("bin/tool", b"#!/bin/sh\n")]);
    let gz = gzip(&inner);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&plain).to_string(), sha(&inner).to_string(), sha(&plain).to_string()]},
    }))
    .expect("config json");
    let config_name =
        config_name.map_or_else(|| format!("{}.json", sha(&config).hex()), str::to_owned);
    let ids = ["a".repeat(64), "b".repeat(64), "c".repeat(64)];
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": tags,
        "Layers": ids.iter().map(|id| format!("{id}/layer.tar")).collect::<Vec<_>>(),
    }]);
    let mut b = tar::Builder::new(Vec::new());
    for (id, data) in ids.iter().zip([Some(&plain), Some(&gz), None]) {
        append_raw(&mut b, &format!("{id}/"), tar::EntryType::Directory, b"");
        append_raw(
            &mut b,
            &format!("{id}/VERSION"),
            tar::EntryType::Regular,
            b"1.0",
        );
        append_raw(
            &mut b,
            &format!("{id}/json"),
            tar::EntryType::Regular,
            br#"{"id":"x"}"#,
        );
        match data {
            Some(d) => append_raw(
                &mut b,
                &format!("{id}/layer.tar"),
                tar::EntryType::Regular,
                d,
            ),
            None => {
                let mut h = raw_header(&format!("{id}/layer.tar"), tar::EntryType::Symlink, 0);
                h.set_link_name(format!("../{}/layer.tar", ids[0]))
                    .expect("link name");
                h.set_cksum();
                b.append(&h, &[][..]).expect("tar append");
            }
        }
    }
    append_raw(&mut b, &config_name, tar::EntryType::Regular, &config);
    append_raw(
        &mut b,
        "manifest.json",
        tar::EntryType::Regular,
        &serde_json::to_vec(&manifest).expect("manifest json"),
    );
    append_raw(&mut b, "repositories", tar::EntryType::Regular, b"{}");
    let path = dir.join("docker.tar");
    fs::write(&path, b.into_inner().expect("tar")).expect("write tar");
    DockerSave {
        path,
        config,
        plain,
        gz,
    }
}

#[test]
fn docker_archive_legacy_layout_gets_an_oci_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let s = docker_save(
        dir.path(),
        &["registry.example/app:1.0", "app:latest"],
        None,
    );
    let r = resolve(
        NAME,
        &docker_archive(&s.path, Some("registry.example/app:1.0")),
        &[],
    )
    .unwrap();
    let cfg = sha(&s.config);
    let (plain, gz) = (sha(&s.plain), sha(&s.gz));
    let want_manifest = format!(
        concat!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","#,
            r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"#,
            r#""layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}},"#,
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}},"#,
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#
        ),
        cfg,
        s.config.len(),
        plain,
        s.plain.len(),
        gz,
        s.gz.len(),
        plain,
        s.plain.len()
    );
    assert_eq!(r.image.digest, sha(want_manifest.as_bytes()));
    assert_eq!(r.image.size, want_manifest.len() as u64);
    assert_eq!(r.image.media_type, OCI_MANIFEST);
    assert_eq!(r.image.platforms, ["linux/amd64"]);
    // The repeated layer appears once.
    assert_eq!(
        check_blobs(&r),
        sorted(vec![r.image.digest, cfg, plain, gz])
    );
    let m = r.blobs.iter().find(|b| b.digest == r.image.digest).unwrap();
    assert_eq!(content_bytes(&m.content, m.size), want_manifest.as_bytes());
    let types: Vec<(Digest, Option<&str>)> = r
        .blobs
        .iter()
        .map(|b| (b.digest, b.media_type.as_deref()))
        .collect();
    assert!(types.contains(&(gz, Some(LAYER_GZIP))) && types.contains(&(plain, Some(LAYER_TAR))));
    assert!(types.contains(&(cfg, Some(OCI_CONFIG))));
    assert_eq!(r.notes.len(), 1);
    assert!(
        r.notes[0].contains(&r.image.digest.to_string()),
        "{:?}",
        r.notes
    );

    // Docker's short form finds the same entry; so does @0.
    for reference in ["docker.io/library/app:latest", "app", "@0"] {
        let again = resolve(NAME, &docker_archive(&s.path, Some(reference)), &[]).unwrap();
        assert_eq!(again.image.digest, r.image.digest, "{reference}");
    }
    let only = resolve(NAME, &docker_archive(&s.path, None), &[]).unwrap();
    assert_eq!(only.image.digest, r.image.digest);
    write_and_verify(&r, dir.path());
}

#[test]
fn docker_archive_reference_must_be_among_repo_tags() {
    let dir = tempfile::tempdir().unwrap();
    let s = docker_save(dir.path(), &["app:1.0"], None);
    match resolve(NAME, &docker_archive(&s.path, Some("app:2.0")), &[]) {
        Err(Error::TagNotFound {
            layout,
            tag,
            available,
        }) => {
            assert_eq!(layout, s.path);
            assert_eq!(tag, "app:2.0");
            assert_eq!(available, ["app:1.0"]);
        }
        other => panic!("{other:?}"),
    }
    match resolve(
        NAME,
        &docker_archive(&s.path, None),
        &["linux/arm64".parse().unwrap()],
    ) {
        Err(Error::NoMatchingPlatform { available, .. }) => assert_eq!(available, ["linux/amd64"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn docker_archive_config_named_by_another_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = format!("{}.json", "0".repeat(64));
    let s = docker_save(dir.path(), &["app:1.0"], Some(&wrong));
    match resolve(NAME, &docker_archive(&s.path, None), &[]) {
        Err(Error::DigestMismatch {
            what,
            expected,
            found,
        }) => {
            assert_eq!(expected.hex(), "0".repeat(64));
            assert_eq!(found, sha(&s.config));
            assert!(what.contains(&wrong), "{what}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn docker_archive_with_several_images_needs_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let s = docker_save(dir.path(), &["app:1.0"], None);
    // Rewrite manifest.json with a second entry by appending a newer member of the same name.
    let bytes = fs::read(&s.path).unwrap();
    let mut ar = tar::Archive::new(&bytes[..]);
    let mut b = tar::Builder::new(Vec::new());
    let mut manifest: Vec<Value> = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if name == "manifest.json" {
            manifest = serde_json::from_slice(&data).unwrap();
        }
        let h = e.header().clone();
        b.append(&h, &data[..]).unwrap();
    }
    let mut second = manifest[0].clone();
    second["RepoTags"] = json!(["other:2"]);
    manifest.push(second);
    append_raw(
        &mut b,
        "manifest.json",
        tar::EntryType::Regular,
        &serde_json::to_vec(&manifest).unwrap(),
    );
    fs::write(&s.path, b.into_inner().unwrap()).unwrap();
    match resolve(NAME, &docker_archive(&s.path, None), &[]) {
        Err(Error::AmbiguousImage { available, .. }) => {
            assert_eq!(available, ["app:1.0", "other:2"])
        }
        other => panic!("{other:?}"),
    }
    assert!(resolve(NAME, &docker_archive(&s.path, Some("other:2")), &[]).is_ok());
}
