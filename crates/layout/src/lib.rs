#![doc = include_str!("../README.md")]

pub mod error;
pub mod spec;

mod docker;
mod json;
mod oci;
mod store;

use bundle_format::{BlobInput, ImageInput};

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
