//! A read-write store on a filesystem: the agent's `registry` mode. The layout is normative
//! (spec/registry-storage-v1.md). Content only ever becomes visible by `rename` after its
//! digest was checked and the file synced, so a crash leaves at worst an orphan upload or temp
//! file, never a corrupt blob; everything the store knows is on disk, so a restart resumes
//! where it stopped (uploads included).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use bundle_format::{Digest, Hasher};

use super::error::{ApiError, Code, Error};
use super::route::{Ref, valid_name, valid_upload_id};
use super::{BlobSink, Listing, ManifestHit, referrer_descriptor};
use crate::manifest::{Doc, MANIFEST_TYPES, is_index};
use crate::reference::valid_tag;

/// Largest manifest accepted.
pub const MAX_MANIFEST: usize = 4 << 20;

/// What the store remembers of an upload between requests. Lost on restart, in which case
/// the data file is the truth and is hashed again at the end.
#[derive(Default)]
pub struct UploadState {
    hasher: Option<Hasher>,
    size: u64,
}

/// A registry on a directory.
pub struct FsStore {
    root: PathBuf,
    seed: u64,
    seq: AtomicU64,
    uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<UploadState>>>>,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(path, op, e)
}

impl FsStore {
    /// Opens (creating if needed) a store under `root`. Leftover temp files of a previous
    /// run are removed; uploads in progress are kept.
    pub fn open(root: impl Into<PathBuf>) -> Result<FsStore, Error> {
        let root = root.into();
        for d in ["blobs/sha256", "repositories", "uploads", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p, "create directory"))?;
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp, "list"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let seed = {
            let mut b = [0u8; 8];
            let got = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
            if got.is_err() {
                // Ids only need to be unique per store; time and pid are enough then.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                b = (t ^ u64::from(std::process::id()) << 32).to_le_bytes();
            }
            u64::from_le_bytes(b)
        };
        Ok(FsStore {
            root,
            seed,
            seq: AtomicU64::new(0),
            uploads: Mutex::new(HashMap::new()),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn unique(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n:08x}", self.seed)
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    fn repo_dir(&self, name: &str) -> PathBuf {
        debug_assert!(valid_name(name));
        self.root.join("repositories").join(name)
    }

    fn layer_link(&self, name: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name).join("_layers").join(d.hex())
    }

    fn manifest_link(&self, name: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name).join("_manifests").join(d.hex())
    }

    fn tag_path(&self, name: &str, tag: &str) -> PathBuf {
        self.repo_dir(name).join("_tags").join(tag)
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        debug_assert!(valid_upload_id(id));
        self.root.join("uploads").join(id)
    }

    /// Writes `bytes` at `path` via a synced temp file and a rename.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), Error> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        }
        let tmp = self.root.join("tmp").join(self.unique());
        let res = File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(path, "write", e));
        }
        Ok(())
    }

    fn exists(path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok()
    }

    /// Puts verified content in place (once) and syncs it.
    fn store_content(&self, digest: &Digest, bytes: &[u8]) -> Result<(), Error> {
        let p = self.blob_path(digest);
        if Self::exists(&p) {
            return Ok(());
        }
        self.write_atomic(&p, bytes)
    }

    fn link(&self, path: &Path, content: &[u8]) -> Result<(), Error> {
        if Self::exists(path) {
            return Ok(());
        }
        self.write_atomic(path, content)
    }

    // ---- reads -------------------------------------------------------------------------

    pub(super) fn manifest(&self, name: &str, reference: &Ref) -> Result<ManifestHit, ApiError> {
        let digest = match reference {
            Ref::Digest(d) => *d,
            Ref::Tag(t) => self.tag(name, t)?,
        };
        let link = self.manifest_link(name, &digest);
        let media_type = match fs::read_to_string(&link) {
            Ok(mt) => mt,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ApiError::new(
                    Code::ManifestUnknown,
                    format!("manifest {reference} is not in repository {name}"),
                ));
            }
            Err(e) => return Err(Error::io(link, "read", e).into()),
        };
        let p = self.blob_path(&digest);
        let body = fs::read(&p).map_err(|e| Error::io(&p, "read", e))?;
        Ok(ManifestHit {
            digest,
            media_type,
            body: Bytes::from(body),
        })
    }

    fn tag(&self, name: &str, tag: &str) -> Result<Digest, ApiError> {
        let p = self.tag_path(name, tag);
        match fs::read_to_string(&p) {
            Ok(s) => s.trim().parse::<Digest>().map_err(|e| {
                ApiError::new(Code::Internal, format!("tag file {}: {e}", p.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ApiError::new(
                Code::ManifestUnknown,
                format!("{name}:{tag} is not in this registry"),
            )),
            Err(e) => Err(Error::io(p, "read", e).into()),
        }
    }

    pub(super) fn blob_size(&self, name: &str, digest: &Digest) -> Result<u64, ApiError> {
        let unknown = || {
            ApiError::new(
                Code::BlobUnknown,
                format!("blob {digest} is not in repository {name}"),
            )
        };
        if !Self::exists(&self.layer_link(name, digest))
            && !Self::exists(&self.manifest_link(name, digest))
        {
            return Err(unknown());
        }
        let p = self.blob_path(digest);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(unknown()),
            Err(e) => Err(Error::io(p, "stat", e).into()),
        }
    }

    pub(super) fn stream_blob(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn BlobSink,
    ) -> Result<(), Error> {
        let p = self.blob_path(digest);
        let mut f = File::open(&p).map_err(io_err(&p, "open"))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io_err(&p, "seek"))?;
        let mut left = len;
        while left > 0 && sink.ready() {
            let mut buf = vec![0u8; (256 << 10).min(left as usize)];
            let n = f.read(&mut buf).map_err(io_err(&p, "read"))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            left -= n as u64;
            if !sink.send(Bytes::from(buf)) {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn tags(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let dir = self.repo_dir(name);
        if !Self::exists(&dir.join("_manifests")) {
            return Err(ApiError::new(
                Code::NameUnknown,
                format!("repository {name} is not in this registry"),
            ));
        }
        let tags = dir.join("_tags");
        let mut out: Vec<String> = match fs::read_dir(&tags) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|t| valid_tag(t))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(tags, "list", e).into()),
        };
        out.sort();
        Ok(out)
    }

    pub(super) fn catalog(&self) -> Result<Listing, Error> {
        let mut out = Vec::new();
        let base = self.root.join("repositories");
        let mut stack = vec![(base.clone(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            let rd = fs::read_dir(&dir).map_err(io_err(&dir, "list"))?;
            for e in rd.flatten() {
                let Ok(n) = e.file_name().into_string() else {
                    continue;
                };
                if n == "_manifests" {
                    out.push(prefix.clone());
                    continue;
                }
                if n.starts_with('_') || !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let full = if prefix.is_empty() {
                    n
                } else {
                    format!("{prefix}/{n}")
                };
                stack.push((e.path(), full));
            }
        }
        out.retain(|n| valid_name(n));
        out.sort();
        Ok(out)
    }

    pub(super) fn referrers(
        &self,
        name: &str,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let dir = self.repo_dir(name).join("_referrers").join(subject.hex());
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(dir, "list", e).into()),
        };
        let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        let mut out = Vec::new();
        for p in names {
            // A referrer whose manifest was deleted since is dropped here.
            let Some(hex) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            if !Self::exists(&self.manifest_link(name, &d)) {
                continue;
            }
            let bytes = fs::read(&p).map_err(|e| Error::io(&p, "read", e))?;
            if let Ok(v) = serde_json::from_slice(&bytes) {
                out.push(v);
            }
        }
        Ok(out)
    }

    // ---- uploads -----------------------------------------------------------------------

    /// Starts an upload session for repository `name`.
    pub(super) fn start_upload(&self, name: &str) -> Result<String, Error> {
        let id = self.unique();
        let dir = self.upload_dir(&id);
        fs::create_dir_all(&dir).map_err(io_err(&dir, "create directory"))?;
        let data = dir.join("data");
        File::create(&data).map_err(io_err(&data, "create"))?;
        let repo = dir.join("repo");
        fs::write(&repo, name).map_err(io_err(&repo, "write"))?;
        self.state(&id);
        Ok(id)
    }

    fn state(&self, id: &str) -> Arc<tokio::sync::Mutex<UploadState>> {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(UploadState {
                    hasher: Some(Hasher::new()),
                    size: 0,
                }))
            })
            .clone()
    }

    /// The lock of an upload that exists and belongs to `name`.
    pub(super) fn upload(
        &self,
        name: &str,
        id: &str,
    ) -> Result<Arc<tokio::sync::Mutex<UploadState>>, ApiError> {
        let dir = self.upload_dir(id);
        match fs::read_to_string(dir.join("repo")) {
            Ok(r) if r == name => {}
            _ => {
                return Err(ApiError::new(
                    Code::BlobUploadUnknown,
                    format!("upload {id} is not in progress for repository {name}"),
                ));
            }
        }
        let known = self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        Ok(match known {
            Some(s) => s,
            None => {
                // After a restart: the data file is the truth; hash it again at the end.
                let size = fs::metadata(dir.join("data")).map(|m| m.len()).unwrap_or(0);
                let s = Arc::new(tokio::sync::Mutex::new(UploadState { hasher: None, size }));
                self.uploads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(id.to_owned())
                    .or_insert(s)
                    .clone()
            }
        })
    }

    /// Bytes received so far.
    pub(super) fn upload_size(state: &UploadState) -> u64 {
        state.size
    }

    /// Appends what arrives on `rx` to the upload; `start` (from `Content-Range`) must be the
    /// current size. Runs on a blocking thread.
    pub(super) fn append(
        &self,
        id: &str,
        state: &mut UploadState,
        start: Option<u64>,
        rx: &mut mpsc::Receiver<Result<Bytes, String>>,
    ) -> Result<(), ApiError> {
        if let Some(s) = start
            && s != state.size
        {
            return Err(ApiError::new(
                Code::RangeInvalid,
                format!(
                    "upload {id}: chunk starts at {s}, the upload has {} bytes",
                    state.size
                ),
            ));
        }
        let p = self.upload_dir(id).join("data");
        let mut f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| Error::io(&p, "open", e))?;
        f.seek(SeekFrom::Start(state.size))
            .map_err(|e| Error::io(&p, "seek", e))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, f);
        while let Some(chunk) = rx.blocking_recv() {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The client went away: keep what arrived so far, so it can resume.
                    let _ = w.flush();
                    self.resync(state, &p);
                    return Err(ApiError::new(
                        Code::BlobUploadInvalid,
                        format!("upload {id}: request body: {e}"),
                    ));
                }
            };
            if let Err(e) = w.write_all(&chunk) {
                let _ = w.flush();
                self.resync(state, &p);
                return Err(Error::io(&p, "write", e).into());
            }
            if let Some(h) = state.hasher.as_mut() {
                h.update(&chunk);
            }
            state.size += chunk.len() as u64;
        }
        if let Err(e) = w.flush() {
            self.resync(state, &p);
            return Err(Error::io(&p, "write", e).into());
        }
        Ok(())
    }

    /// Undoes a chunk: the upload goes back to `size` bytes.
    pub(super) fn rollback(
        &self,
        id: &str,
        state: &mut UploadState,
        size: u64,
    ) -> Result<(), ApiError> {
        let p = self.upload_dir(id).join("data");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(size))
            .map_err(|e| Error::io(&p, "truncate", e))?;
        state.hasher = None;
        state.size = size;
        Ok(())
    }

    /// After a failed write the file may hold part of a chunk: trust the file, rehash later.
    fn resync(&self, state: &mut UploadState, data: &Path) {
        state.hasher = None;
        state.size = fs::metadata(data).map(|m| m.len()).unwrap_or(0);
    }

    /// Closes an upload: checks the content against `digest`, syncs, renames it into place
    /// and links it into the repository. A mismatch discards the upload.
    pub(super) fn finish(
        &self,
        name: &str,
        id: &str,
        state: &mut UploadState,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        let dir = self.upload_dir(id);
        let data = dir.join("data");
        let found = match state.hasher.take() {
            Some(h) => h.finish(),
            None => hash_file(&data)?,
        };
        if found != *digest {
            self.discard(id);
            return Err(ApiError::new(
                Code::DigestInvalid,
                format!("upload {id}: content is {found}, not {digest}"),
            ));
        }
        let dest = self.blob_path(digest);
        if Self::exists(&dest) {
            self.discard(id);
        } else {
            File::open(&data)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&data, "sync", e))?;
            fs::rename(&data, &dest).map_err(|e| Error::io(&dest, "rename", e))?;
            self.discard(id);
        }
        self.link(&self.layer_link(name, digest), b"")?;
        Ok(())
    }

    /// Drops an upload and its data.
    pub(super) fn discard(&self, id: &str) {
        let _ = fs::remove_dir_all(self.upload_dir(id));
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Mounts `digest` into `name` from `from` (or from anywhere when `from` is not given).
    pub(super) fn mount(
        &self,
        name: &str,
        digest: &Digest,
        from: Option<&str>,
    ) -> Result<bool, ApiError> {
        let linked = match from {
            Some(f) => Self::exists(&self.layer_link(f, digest)),
            None => true,
        };
        if !linked || !Self::exists(&self.blob_path(digest)) {
            return Ok(false);
        }
        self.link(&self.layer_link(name, digest), b"")?;
        Ok(true)
    }

    // ---- manifests and deletes ---------------------------------------------------------

    /// Stores a manifest after checking its JSON, its media type and that everything it
    /// names is in the repository. Returns its digest and, when it has one, its subject.
    pub(super) fn put_manifest(
        &self,
        name: &str,
        reference: &Ref,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(Digest, Option<Digest>), ApiError> {
        let digest = Digest::of(body);
        if let Ref::Digest(d) = reference
            && *d != digest
        {
            return Err(ApiError::new(
                Code::DigestInvalid,
                format!("manifest body is {digest}, the request names {d}"),
            ));
        }
        let invalid = |m: String| ApiError::new(Code::ManifestInvalid, m);
        let doc = Doc::parse(body).map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
        let media_type = match (doc.media_type.as_deref(), content_type) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(format!(
                    "manifest {digest}: mediaType {a} differs from Content-Type {b}"
                )));
            }
            (Some(a), _) => a.to_owned(),
            (None, Some(b)) => b.to_owned(),
            (None, None) => {
                return Err(invalid(format!(
                    "manifest {digest}: no mediaType and no Content-Type"
                )));
            }
        };
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(invalid(format!(
                "manifest {digest}: media type {media_type} is not a manifest type this registry stores ({MANIFEST_TYPES:?})"
            )));
        }
        if doc.schema_version != Some(2) {
            return Err(invalid(format!(
                "manifest {digest}: schemaVersion must be 2"
            )));
        }
        let unknown = |what: String| ApiError::new(Code::ManifestBlobUnknown, what);
        if is_index(&media_type) {
            for m in doc.manifests.iter().flatten() {
                let d = m
                    .digest()
                    .map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
                if !Self::exists(&self.manifest_link(name, &d)) {
                    return Err(unknown(format!(
                        "index {digest} names manifest {d}, which is not in repository {name}"
                    )));
                }
            }
        } else {
            if doc.config.is_none() {
                return Err(invalid(format!("manifest {digest}: no config")));
            }
            for b in doc.blobs() {
                let d = b
                    .digest()
                    .map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
                if b.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                    continue;
                }
                if !Self::exists(&self.layer_link(name, &d)) {
                    return Err(unknown(format!(
                        "manifest {digest} names blob {d}, which is not in repository {name}"
                    )));
                }
            }
        }
        let subject = match &doc.subject {
            Some(s) => Some(
                s.digest()
                    .map_err(|e| invalid(format!("manifest {digest}: subject: {e}")))?,
            ),
            None => None,
        };
        self.store_content(&digest, body)?;
        if let Some(s) = subject {
            let desc = referrer_descriptor(&doc, &media_type, digest, body.len() as u64);
            let p = self
                .repo_dir(name)
                .join("_referrers")
                .join(s.hex())
                .join(digest.hex());
            self.write_atomic(&p, &serde_json::to_vec(&desc).unwrap_or_default())?;
        }
        let link = self.manifest_link(name, &digest);
        if !Self::exists(&link) {
            self.write_atomic(&link, media_type.as_bytes())?;
        }
        if let Ref::Tag(t) = reference {
            self.write_atomic(&self.tag_path(name, t), format!("{digest}\n").as_bytes())?;
        }
        Ok((digest, subject))
    }

    /// Deletes a tag, or a manifest by digest together with the tags that point at it.
    pub(super) fn delete_manifest(&self, name: &str, reference: &Ref) -> Result<(), ApiError> {
        match reference {
            Ref::Tag(t) => {
                self.tag(name, t)?;
                let p = self.tag_path(name, t);
                fs::remove_file(&p).map_err(|e| Error::io(&p, "delete", e))?;
            }
            Ref::Digest(d) => {
                let link = self.manifest_link(name, d);
                if !Self::exists(&link) {
                    return Err(ApiError::new(
                        Code::ManifestUnknown,
                        format!("manifest {d} is not in repository {name}"),
                    ));
                }
                for t in self.tags(name)? {
                    if self.tag(name, &t).ok() == Some(*d) {
                        let p = self.tag_path(name, &t);
                        let _ = fs::remove_file(&p);
                    }
                }
                fs::remove_file(&link).map_err(|e| Error::io(&link, "delete", e))?;
            }
        }
        Ok(())
    }

    /// Unlinks a blob from a repository. The content stays until no repository links it
    /// (there is no garbage collector yet; see the storage spec).
    pub(super) fn delete_blob(&self, name: &str, digest: &Digest) -> Result<(), ApiError> {
        let link = self.layer_link(name, digest);
        match fs::remove_file(&link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ApiError::new(
                Code::BlobUnknown,
                format!("blob {digest} is not in repository {name}"),
            )),
            Err(e) => Err(Error::io(link, "delete", e).into()),
        }
    }
}

fn hash_file(p: &Path) -> Result<Digest, Error> {
    let mut f = File::open(p).map_err(io_err(p, "open"))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(p, "read"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}
