#![doc = include_str!("../README.md")]

pub mod agent;
pub mod error;
pub mod spec;

mod docker;
mod json;
mod oci;
mod store;

use std::path::{Path, PathBuf};

use bundle_format::{BlobInput, Digest, ImageInput};

pub use error::{Error, Place, Result};
pub use spec::{Platform, SourceSpec};

/// One image, ready to hand to [`bundle_format::write()`].
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The image: its name in the bundle, manifest or index digest, media type, platforms.
    pub image: ImageInput,
    /// Every blob the image needs (manifests, indexes, configs, layers), each once.
    pub blobs: Vec<BlobInput>,
    /// Things the user should know, e.g. that platform filtering changed the image digest.
    pub notes: Vec<String>,
}

/// Fetches blobs on demand for [`resolve_remote`]: a registry pull puts each manifest,
/// index and config into a content-addressed directory as the walk asks for it, and names
/// the path where each layer will be.
pub trait BlobSource: Send + Sync {
    /// The directory the blobs live in, for messages.
    fn root(&self) -> &Path;
    /// The path of blob `digest` of `size` bytes. For `role` "manifest", "image index" and
    /// "config" the blob must be there, complete and verified, on return; for "layer" the
    /// path may be where it will be once fetched.
    fn locate(&self, digest: &Digest, size: u64, role: &str) -> Result<PathBuf>;
}

/// The top manifest or index of a remote image.
#[derive(Debug, Clone)]
pub struct Root {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// Like [`resolve`], for an image whose blobs come from `source` (a registry pull), starting
/// at `root`. Platform filtering and its notes are the same as for local sources.
pub fn resolve_remote(
    name: &str,
    root: &Root,
    source: std::sync::Arc<dyn BlobSource>,
    platforms: &[Platform],
) -> Result<Resolved> {
    let store = store::Store::Remote(source);
    oci::resolve_remote(name, &store, root, platforms)
}

/// Reads the image `spec` names and returns it as writer input, under the reference `name`
/// it will carry in the bundle (e.g. `registry.example/team/app:1.0`).
///
/// Manifests, indexes and configs are read and their digests checked here; layers are only
/// located (the writer hashes them as it copies them), except in a docker archive, where a
/// manifest has to be made and so every layer is hashed, in parallel.
///
/// With `platforms` non-empty, an image index keeps only the manifests for those platforms
/// (and is rewritten, with a note saying so, when that drops any); a single-platform image
/// must match one of them.
pub fn resolve(name: &str, spec: &SourceSpec, platforms: &[Platform]) -> Result<Resolved> {
    match spec {
        SourceSpec::OciLayout { path, tag } => {
            let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
            if !md.is_dir() {
                return Err(Error::NotALayout {
                    path: path.clone(),
                    reason:
                        "an oci-layout source must be a directory (use oci-archive: for a tar file)"
                            .into(),
                });
            }
            let store = store::Store::Dir(path.clone());
            oci::resolve(name, &store, tag.as_deref(), platforms)
        }
        SourceSpec::OciArchive { path, tag } => {
            let store = store::Store::Tar(store::TarIndex::open(path)?);
            oci::resolve(name, &store, tag.as_deref(), platforms)
        }
        SourceSpec::DockerArchive { path, reference } => {
            let tar = store::TarIndex::open(path)?;
            docker::resolve(name, &tar, reference.as_deref(), platforms)
        }
    }
}
