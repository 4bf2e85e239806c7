//! Deterministic OCI building blocks: canonical JSON, tar entries with fixed metadata, gzip
//! without a timestamp, and an image layout whose blobs are named by their sha256.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

/// OCI image manifest.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// gzip-compressed tar layer.
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Uncompressed tar layer.
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// The `index.json` annotation that tags an image (`oci:DIR:TAG` in skopeo and umoci).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The `created` time of every config and history entry: the epoch, so that bytes never
/// depend on when they were made.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Length in bytes.
    pub size: u64,
}

impl Descriptor {
    /// The hex part of the digest.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }

    /// Where the blob lives inside an image layout.
    pub fn layout_path(&self) -> String {
        format!("blobs/sha256/{}", self.hex())
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({"digest": self.digest, "mediaType": self.media_type, "size": self.size})
    }
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// JSON with object keys sorted bytewise and no whitespace, whatever map type serde_json was
/// built with (another crate enabling `preserve_order` must not change our bytes).
pub(crate) fn canonical_json(v: &Value) -> Vec<u8> {
    fn put(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    put(&map[k.as_str()], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    put(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    put(v, &mut out);
    out.into_bytes()
}

/// What goes in an image config besides its layers.
pub(crate) struct ConfigSpec<'a> {
    pub arch: &'a str,
    pub cmd: &'a [&'a str],
    pub title: &'a str,
    /// One `created_by` line per layer.
    pub history: &'a [String],
}

/// A valid OCI image config: `diff_ids` are the sha256 of the uncompressed layer tars.
pub(crate) fn config_json(spec: &ConfigSpec<'_>, diff_ids: &[String]) -> Value {
    json!({
        "architecture": spec.arch,
        "config": {
            "Cmd": spec.cmd,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.opencontainers.image.title": spec.title},
            "WorkingDir": "/",
        },
        "created": EPOCH,
        "history": spec.history.iter().map(|h| json!({"created": EPOCH, "created_by": h})).collect::<Vec<_>>(),
        "os": "linux",
        "rootfs": {"diff_ids": diff_ids, "type": "layers"},
    })
}

pub(crate) fn manifest_json(config: &Descriptor, layers: &[Descriptor]) -> Value {
    json!({
        "config": config.to_json(),
        "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        "mediaType": MEDIA_MANIFEST,
        "schemaVersion": 2,
    })
}

/// An image index over `(manifest, architecture)` pairs, all `linux`.
pub(crate) fn image_index_json(manifests: &[(Descriptor, &str)]) -> Value {
    json!({
        "manifests": manifests.iter().map(|(d, arch)| {
            let mut v = d.to_json();
            v["platform"] = json!({"architecture": arch, "os": "linux"});
            v
        }).collect::<Vec<_>>(),
        "mediaType": MEDIA_INDEX,
        "schemaVersion": 2,
    })
}

/// The `index.json` of a layout: each descriptor tagged with its ref name.
pub(crate) fn layout_index_json(refs: &[(String, Descriptor)]) -> Value {
    json!({
        "manifests": refs.iter().map(|(tag, d)| {
            let mut v = d.to_json();
            v["annotations"] = json!({REF_NAME_ANNOTATION: tag});
            v
        }).collect::<Vec<_>>(),
        "mediaType": MEDIA_INDEX,
        "schemaVersion": 2,
    })
}

pub(crate) const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// A tar header with fixed metadata: mtime 0, uid/gid 0, no user or group names.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

pub(crate) fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    path: impl AsRef<Path>,
    mode: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data)
}

pub(crate) fn append_dir<W: Write>(
    b: &mut tar::Builder<W>,
    path: impl AsRef<Path>,
) -> io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, path, io::empty())
}

/// An in-memory tar entry.
pub(crate) enum Entry {
    Dir(String),
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
}

impl Entry {
    pub(crate) fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        Entry::File {
            path: path.to_owned(),
            mode,
            data: data.into(),
        }
    }
    fn path(&self) -> &str {
        match self {
            Entry::Dir(p) | Entry::File { path: p, .. } => p,
        }
    }
}

/// A tar of `entries`, sorted by path whatever order they come in.
pub(crate) fn tar_bytes(mut entries: Vec<Entry>) -> io::Result<Vec<u8>> {
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    let mut b = tar::Builder::new(Vec::new());
    for e in &entries {
        match e {
            Entry::Dir(p) => append_dir(&mut b, p)?,
            Entry::File { path, mode, data } => append_file(&mut b, path, *mode, data)?,
        }
    }
    b.into_inner()
}

fn gzip_builder() -> GzBuilder {
    // 255 = "unknown" operating system, as Go's compress/gzip writes.
    GzBuilder::new().mtime(0).operating_system(255)
}

/// gzip at level 6 with a fixed header (no mtime, no file name).
pub(crate) fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = gzip_builder().write(Vec::new(), Compression::new(6));
    enc.write_all(data)?;
    enc.finish()
}

/// Counts and hashes what passes through.
pub(crate) struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }
    pub(crate) fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.len)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where a streamed layer's tar goes.
pub(crate) enum Sink {
    Plain(BufWriter<File>),
    Gzip(Box<GzEncoder<HashWriter<BufWriter<File>>>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
        }
    }
}

/// A tar stream being written into a layout blob.
pub(crate) type LayerTar = tar::Builder<HashWriter<Sink>>;

/// A layer blob and what its config needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub desc: Descriptor,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// Length of the uncompressed tar.
    pub tar_size: u64,
}

/// An OCI image layout being written.
pub(crate) struct Layout {
    root: PathBuf,
    blobs: PathBuf,
    refs: Vec<(String, Descriptor)>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Layout {
    pub(crate) fn create(root: &Path) -> Result<Self> {
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        let p = root.join("oci-layout");
        fs::write(&p, OCI_LAYOUT).map_err(|e| Error::io(&p, e))?;
        Ok(Layout {
            root: root.to_owned(),
            blobs,
            refs: Vec::new(),
        })
    }

    pub(crate) fn put(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let desc = Descriptor {
            media_type: media_type.to_owned(),
            digest: digest_of(bytes),
            size: bytes.len() as u64,
        };
        let p = self.blobs.join(desc.hex());
        fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        Ok(desc)
    }

    pub(crate) fn put_json(&self, media_type: &str, v: &Value) -> Result<Descriptor> {
        self.put(media_type, &canonical_json(v))
    }

    /// Streams a layer tar into a blob: `fill` appends the entries, the tar end marker and
    /// (for gzip) the gzip trailer are added here, and the blob is renamed to its digest.
    pub(crate) fn put_layer(
        &self,
        gzip: bool,
        fill: impl FnOnce(&mut LayerTar) -> io::Result<()>,
    ) -> Result<Layer> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.blobs.join(format!(".tmp-{}-{n}", std::process::id()));
        let io_err = |e| Error::io(&tmp, e);
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io_err)?);
        let sink = if gzip {
            Sink::Gzip(Box::new(
                gzip_builder().write(HashWriter::new(file), Compression::new(6)),
            ))
        } else {
            Sink::Plain(file)
        };
        let mut b = tar::Builder::new(HashWriter::new(sink));
        let res = fill(&mut b).and_then(|()| b.into_inner());
        let (sink, diff_id, tar_size) = match res {
            Ok(w) => w.finish(),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_err(e));
            }
        };
        let (file, digest, size) = match sink {
            Sink::Plain(file) => (file, diff_id.clone(), tar_size),
            Sink::Gzip(enc) => enc.finish().map_err(io_err)?.finish(),
        };
        file.into_inner().map_err(|e| io_err(e.into_error()))?;
        let desc = Descriptor {
            media_type: if gzip {
                MEDIA_LAYER_GZIP
            } else {
                MEDIA_LAYER_TAR
            }
            .to_owned(),
            digest,
            size,
        };
        let dest = self.blobs.join(desc.hex());
        fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(Layer {
            desc,
            diff_id,
            tar_size,
        })
    }

    /// Tags `desc` in `index.json` (in call order).
    pub(crate) fn tag(&mut self, name: &str, desc: &Descriptor) {
        self.refs.push((name.to_owned(), desc.clone()));
    }

    pub(crate) fn finish(self) -> Result<()> {
        let p = self.root.join("index.json");
        fs::write(&p, canonical_json(&layout_index_json(&self.refs))).map_err(|e| Error::io(&p, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_has_no_spaces() {
        let v = json!({"b": 1, "a": {"d": [true, null, "x\"y"], "c": 2.5}, "B": "é"});
        assert_eq!(
            String::from_utf8_lossy(&canonical_json(&v)),
            r#"{"B":"é","a":{"c":2.5,"d":[true,null,"x\"y"]},"b":1}"#
        );
    }

    #[test]
    fn gzip_header_is_fixed() {
        let gz = gzip(b"hello").expect("gzip");
        // magic, deflate, no flags, mtime 0, xfl 0 (level 6), os 255
        assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    }

    #[test]
    fn tar_entries_are_sorted_with_fixed_metadata() {
        let tar = tar_bytes(vec![
            Entry::file("b", 0o644, "2"),
            Entry::Dir("a/".into()),
            Entry::file("a/x", 0o755, "1"),
        ])
        .expect("tar");
        let mut ar = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!(h.mtime().expect("mtime"), 0);
            assert_eq!(h.uid().expect("uid"), 0);
            assert_eq!(h.gid().expect("gid"), 0);
            seen.push(e.path().expect("path").to_string_lossy().into_owned());
        }
        assert_eq!(seen, ["a/", "a/x", "b"]);
    }
}
