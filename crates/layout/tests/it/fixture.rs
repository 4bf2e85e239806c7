//! Small OCI layouts and docker archives built in a tempdir, byte for byte the same every run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bundle_format::{Content, Digest};
use bundle_layout::Resolved;
use serde_json::{Value, json};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

pub fn sha(bytes: &[u8]) -> Digest {
    Digest::of(bytes)
}

/// A tar of `files`, with fixed metadata.
pub fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).expect("tar append");
    }
    b.into_inner().expect("tar finish")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip finish")
}

/// One image written into a layout.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: Digest,
    pub manifest_size: u64,
    pub config: Digest,
    pub layers: Vec<Digest>,
    pub platform: String,
}

impl Image {
    /// The descriptor of its manifest, with the platform when `with_platform`.
    pub fn descriptor(&self, with_platform: bool) -> Value {
        let mut d = json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest.to_string(),
            "size": self.manifest_size,
        });
        if with_platform {
            let parts: Vec<&str> = self.platform.split('/').collect();
            let mut p = json!({"os": parts[0], "architecture": parts[1]});
            if let Some(v) = parts.get(2) {
                p["variant"] = json!(v);
            }
            d["platform"] = p;
        }
        d
    }
}

/// An OCI image layout directory under construction.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
        Layout {
            dir: dir.to_owned(),
        }
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    pub fn blob(&self, bytes: &[u8]) -> (Digest, u64) {
        let d = sha(bytes);
        fs::write(self.blob_path(&d), bytes).expect("write blob");
        (d, bytes.len() as u64)
    }

    /// An image for `platform` with one gzip layer per entry of `layers`: a file holding that
    /// text, named after it, so equal entries make equal layers.
    pub fn image(&self, platform: &str, layers: &[&str]) -> Image {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut digests = Vec::new();
        for content in layers {
            let name = format!("{}.txt", content.replace(' ', "_"));
            let tar = layer_tar(&[(&name, content.as_bytes())]);
            diff_ids.push(sha(&tar).to_string());
            let (d, size) = self.blob(&gzip(&tar));
            descs.push(json!({"mediaType": LAYER_GZIP, "digest": d.to_string(), "size": size}));
            digests.push(d);
        }
        let parts: Vec<&str> = platform.split('/').collect();
        let mut config = json!({
            "architecture": parts[1],
            "os": parts[0],
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(v) = parts.get(2) {
            config["variant"] = json!(v);
        }
        let (config, config_size) = self.blob(&serde_json::to_vec(&config).expect("json"));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.to_string(), "size": config_size},
            "layers": descs,
        });
        let (manifest, manifest_size) =
            self.blob(&serde_json::to_vec_pretty(&manifest).expect("json"));
        Image {
            manifest,
            manifest_size,
            config,
            layers: digests,
            platform: platform.to_owned(),
        }
    }

    /// An image index over `children` (descriptors), returned as a descriptor.
    pub fn index(&self, children: Vec<Value>) -> Value {
        let idx = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": children,
        });
        let (d, size) = self.blob(&serde_json::to_vec_pretty(&idx).expect("json"));
        json!({"mediaType": OCI_INDEX, "digest": d.to_string(), "size": size})
    }

    /// Writes `index.json` listing `entries`, each tagged with its `ref.name` when given.
    pub fn finish(&self, entries: Vec<(Value, Option<&str>)>) {
        let manifests: Vec<Value> = entries
            .into_iter()
            .map(|(mut d, tag)| {
                if let Some(t) = tag {
                    d["annotations"] = json!({"org.opencontainers.image.ref.name": t});
                }
                d
            })
            .collect();
        let idx = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&idx).expect("json"),
        )
        .expect("write");
    }
}

/// Tars the files under `dir` into `out`, names prefixed with `./` (as `tar -C DIR .` writes
/// them), directories included.
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).expect("create tar"));
    append_tree(&mut b, dir, ".");
    b.finish().expect("tar finish");
}

fn append_tree(b: &mut tar::Builder<fs::File>, dir: &Path, name: &str) {
    let mut h = raw_header(&format!("{name}/"), tar::EntryType::Directory, 0);
    h.set_mode(0o755);
    h.set_cksum();
    b.append(&h, &[][..]).expect("tar dir");
    let mut kids: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    kids.sort();
    for k in kids {
        let child = format!("{name}/{}", k.file_name().expect("name").to_string_lossy());
        if k.is_dir() {
            append_tree(b, &k, &child);
        } else {
            let data = fs::read(&k).expect("read file");
            append_raw(b, &child, tar::EntryType::Regular, &data);
        }
    }
}

/// A header whose name is stored as given, `./` and `..` included (the builder would clean it).
pub fn raw_header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    let field = &mut h.as_old_mut().name;
    assert!(
        name.len() <= field.len(),
        "{name} is too long for a plain header"
    );
    field[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    h
}

pub fn append_raw<W: Write>(
    b: &mut tar::Builder<W>,
    name: &str,
    kind: tar::EntryType,
    data: &[u8],
) {
    let h = raw_header(name, kind, data.len() as u64);
    b.append(&h, data).expect("tar append");
}

/// The bytes a blob's content points at.
pub fn content_bytes(c: &Content, size: u64) -> Vec<u8> {
    match c {
        Content::Bytes(b) => b.to_vec(),
        Content::File { path, offset } => {
            let all = fs::read(path).expect("read content file");
            all[*offset as usize..(*offset + size) as usize].to_vec()
        }
    }
}

/// Checks every blob's content hashes to its digest, and returns the digests.
pub fn check_blobs(r: &Resolved) -> Vec<Digest> {
    let mut out = Vec::new();
    for b in &r.blobs {
        assert_eq!(
            sha(&content_bytes(&b.content, b.size)),
            b.digest,
            "blob {}",
            b.digest
        );
        out.push(b.digest);
    }
    let mut sorted = out.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), out.len(), "a blob is listed twice");
    out.sort();
    out
}

/// Writes `r` as a bundle and verifies it, as the CLI would.
pub fn write_and_verify(r: &Resolved, dir: &Path) {
    let input = bundle_format::BundleInput {
        name: "test".into(),
        version: "1".into(),
        created: None,
        images: vec![r.image.clone()],
        blobs: r.blobs.clone(),
    };
    let out = dir.join("out.bundle");
    bundle_format::write(&input, &out, &bundle_format::WriteOptions::default())
        .expect("write bundle");
    let archive = bundle_format::Archive::open(&out).expect("open bundle");
    archive.verify(true).expect("verify bundle");
    assert_eq!(archive.index().images[0].digest, r.image.digest);
}

pub fn sorted(mut v: Vec<Digest>) -> Vec<Digest> {
    v.sort();
    v.dedup();
    v
}
