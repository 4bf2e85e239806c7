//! A read-only store over an open [`Archive`]: `bundle serve` (an archive file or its parts)
//! and the agent's `inject` mode (frame files mounted from ConfigMaps). Images appear under
//! the repository `bundle push` would give them by default (`example.com/team/app:1.0` is
//! `team/app:1.0`); blobs are streamed from the frames, each frame checked against the index
//! as it is read, nothing extracted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

use bundle_format::{Archive, Digest};

use super::error::{ApiError, Code, Error};
use super::route::Ref;
use super::{BlobSink, Listing, ManifestHit, referrer_descriptor};
use crate::Reference;
use crate::manifest::{Doc, OCI_MANIFEST};
use crate::pool::Pool;

#[derive(Default)]
struct Repo {
    tags: BTreeMap<String, Digest>,
    manifests: BTreeSet<Digest>,
    blobs: BTreeSet<Digest>,
    /// subject -> descriptors of the manifests that name it.
    referrers: BTreeMap<Digest, Vec<serde_json::Value>>,
}

/// Decompressed frames (about 1 MiB each) that blob streams hold at once.
pub const OUT_BUFFERS: usize = 40;

/// An archive served read-only.
pub struct ArchiveStore {
    archive: Archive,
    out_pool: Pool,
    hash_frames: bool,
    repos: BTreeMap<String, Repo>,
    media_types: HashMap<Digest, String>,
}

impl ArchiveStore {
    /// Maps every image of `archive` to its repository and tag, reading its manifests once.
    pub fn new(archive: Archive) -> Result<ArchiveStore, Error> {
        let mut repos: BTreeMap<String, Repo> = BTreeMap::new();
        let mut media_types = HashMap::new();
        let mut owner: BTreeMap<(String, String), String> = BTreeMap::new();
        for img in &archive.index().images {
            let bad = |reason: String| Error::Image {
                name: img.name.clone(),
                reason,
            };
            let r: Reference = img.name.parse().map_err(|e| bad(format!("{e}")))?;
            let repo = repos.entry(r.repository.clone()).or_default();
            if let Some(tag) = &r.tag {
                let key = (r.repository.clone(), tag.clone());
                if let Some(first) = owner.get(&key)
                    && repo.tags.get(tag) != Some(&img.digest)
                {
                    return Err(Error::Collision {
                        first: first.clone(),
                        second: img.name.clone(),
                        repo: r.repository.clone(),
                        tag: tag.clone(),
                    });
                }
                owner.insert(key, img.name.clone());
                repo.tags.insert(tag.clone(), img.digest);
            }
            walk(
                &archive,
                repo,
                &mut media_types,
                img.digest,
                &img.media_type,
                0,
            )
            .map_err(bad)?;
        }
        Ok(ArchiveStore {
            archive,
            out_pool: Pool::new(OUT_BUFFERS),
            hash_frames: true,
            repos,
            media_types,
        })
    }

    /// Whether blob streams check each frame's sha256 against the index (once per frame,
    /// the first time it is read; the default). Without it a frame is checked only by its
    /// zstd XXH64 checksum as it decompresses, which catches damaged media; the sha256 check
    /// binds the bytes to the archive id, which matters when that id is trusted (`inject`
    /// verifies every frame at start against an id from its command line; `bundle verify`
    /// does it for a file). Manifests are always fully checked.
    pub fn hash_frames(mut self, on: bool) -> ArchiveStore {
        self.hash_frames = on;
        self
    }

    /// The archive.
    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    fn repo(&self, name: &str) -> Result<&Repo, ApiError> {
        self.repos.get(name).ok_or_else(|| {
            ApiError::new(
                Code::NameUnknown,
                format!("repository {name} is not in this archive"),
            )
        })
    }

    pub(super) fn manifest(&self, name: &str, reference: &Ref) -> Result<ManifestHit, ApiError> {
        let repo = self.repo(name)?;
        let digest = match reference {
            Ref::Tag(t) => *repo.tags.get(t).ok_or_else(|| {
                ApiError::new(
                    Code::ManifestUnknown,
                    format!("{name}:{t} is not in this archive"),
                )
            })?,
            Ref::Digest(d) if repo.manifests.contains(d) => *d,
            Ref::Digest(d) => {
                return Err(ApiError::new(
                    Code::ManifestUnknown,
                    format!("manifest {d} is not in repository {name}"),
                ));
            }
        };
        let body = self
            .archive
            .read_blob(&digest)
            .map_err(|e| ApiError::new(Code::Internal, format!("manifest {digest}: {e}")))?;
        Ok(ManifestHit {
            digest,
            media_type: self
                .media_types
                .get(&digest)
                .cloned()
                .unwrap_or_else(|| OCI_MANIFEST.to_owned()),
            body: Bytes::from(body),
        })
    }

    pub(super) fn blob_size(&self, name: &str, digest: &Digest) -> Result<u64, ApiError> {
        let repo = self.repo(name)?;
        match self.archive.index().blob(digest) {
            Some(b) if repo.blobs.contains(digest) || repo.manifests.contains(digest) => Ok(b.size),
            _ => Err(ApiError::new(
                Code::BlobUnknown,
                format!("blob {digest} is not in repository {name}"),
            )),
        }
    }

    /// Streams `len` bytes of a blob from `offset` into `sink`, one decompressed frame at a
    /// time into pooled buffers that go out without a copy; the next frame is decompressed
    /// only once `sink` has room, so a stream holds about two frames.
    pub(super) fn stream_blob(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn BlobSink,
    ) -> Result<(), Error> {
        for (frame, range) in self.archive.blob_frames(digest, offset, len)? {
            if !sink.ready() {
                break;
            }
            // Frames are decompressed straight from the archive's pages into a pooled
            // buffer; a stream waits for one only while holding none.
            let mut buf = self.out_pool.take();
            self.archive
                .read_frame(frame, self.hash_frames, &mut buf.0)?;
            if !sink.send(Bytes::from_owner(buf).slice(range)) {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn tags(&self, name: &str) -> Result<Vec<String>, ApiError> {
        Ok(self.repo(name)?.tags.keys().cloned().collect())
    }

    pub(super) fn catalog(&self) -> Listing {
        self.repos.keys().cloned().collect()
    }

    pub(super) fn referrers(
        &self,
        name: &str,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        Ok(self
            .repo(name)?
            .referrers
            .get(subject)
            .cloned()
            .unwrap_or_default())
    }
}

/// Records a manifest and, recursively, what it names.
fn walk(
    archive: &Archive,
    repo: &mut Repo,
    media_types: &mut HashMap<Digest, String>,
    digest: Digest,
    media_type: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > 8 || repo.manifests.contains(&digest) {
        return Ok(());
    }
    let bytes = archive
        .read_blob(&digest)
        .map_err(|e| format!("manifest {digest}: {e}"))?;
    let doc = Doc::parse(&bytes).map_err(|e| format!("manifest {digest}: {e}"))?;
    let mt = doc
        .media_type
        .clone()
        .unwrap_or_else(|| media_type.to_owned());
    repo.manifests.insert(digest);
    if let Some(subject) = doc.subject.as_ref().and_then(|s| s.digest().ok()) {
        repo.referrers
            .entry(subject)
            .or_default()
            .push(referrer_descriptor(&doc, &mt, digest, bytes.len() as u64));
    }
    media_types.insert(digest, mt);
    for child in doc.manifests.iter().flatten() {
        let cd = child
            .digest()
            .map_err(|e| format!("manifest {digest}: {e}"))?;
        if archive.index().blob(&cd).is_none() {
            // A platform dropped at create time: the index names it, the archive lacks it.
            continue;
        }
        let cmt = child.media_type.as_deref().unwrap_or(OCI_MANIFEST);
        walk(archive, repo, media_types, cd, cmt, depth + 1)?;
    }
    for b in doc.blobs() {
        let bd = b.digest().map_err(|e| format!("manifest {digest}: {e}"))?;
        repo.blobs.insert(bd);
    }
    Ok(())
}

/// Every manifest and blob the images `names` of `archive` need: what a sub-archive of them
/// must hold (see [`bundle_format::Index::subset`]).
pub fn closure(archive: &Archive, names: &[&str]) -> Result<BTreeSet<Digest>, Error> {
    let mut repo = Repo::default();
    let mut media_types = HashMap::new();
    for name in names {
        let img = archive
            .index()
            .images
            .iter()
            .find(|i| i.name == *name)
            .ok_or_else(|| Error::Image {
                name: (*name).to_owned(),
                reason: "is not in the archive".into(),
            })?;
        walk(
            archive,
            &mut repo,
            &mut media_types,
            img.digest,
            &img.media_type,
            0,
        )
        .map_err(|reason| Error::Image {
            name: img.name.clone(),
            reason,
        })?;
    }
    let mut out = repo.blobs;
    out.extend(repo.manifests);
    Ok(out)
}

/// The bootstrap payload of the agent's `inject` mode: a sub-archive of some images of an
/// archive, as the files the injector expects in its chunk directory.
pub struct Payload {
    /// The CBOR index (file `index.cbor`).
    pub index: Vec<u8>,
    /// Its sha256, which the injector is told on its command line.
    pub id: Digest,
    /// Frame numbers in the source archive, in the sub-archive's order; each becomes the file
    /// named by the frame's sha256 (hex).
    pub frames: Vec<u32>,
}

impl Payload {
    /// The index file's name among the frame files (the injector opens it by this name).
    pub const INDEX_FILE: &'static str = "index.cbor";

    /// The payload of `names` of `archive`.
    pub fn new(archive: &Archive, names: &[&str]) -> Result<Payload, Error> {
        let blobs = closure(archive, names)?;
        let (sub, frames) = archive.index().subset(names, &blobs)?;
        let index = sub.to_cbor();
        Ok(Payload {
            id: Digest::of(&index),
            index,
            frames,
        })
    }

    /// The file name of a frame: its sha256 in hex.
    pub fn frame_name(archive: &Archive, frame: u32) -> String {
        Digest::from_bytes(*archive.index().frames[frame as usize].sha256()).hex()
    }

    /// Writes `index.cbor` and every frame file into `dir` (which must exist).
    pub fn write_to(&self, archive: &Archive, dir: &std::path::Path) -> Result<(), Error> {
        let p = dir.join(Self::INDEX_FILE);
        std::fs::write(&p, &self.index).map_err(|e| Error::io(&p, "write", e))?;
        for &f in &self.frames {
            let p = dir.join(Self::frame_name(archive, f));
            std::fs::write(&p, archive.frame(f)?).map_err(|e| Error::io(&p, "write", e))?;
        }
        Ok(())
    }
}
