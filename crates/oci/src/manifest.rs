//! The parts of image manifests and indexes that pushing and serving need to read: media
//! types, the descriptors they name, and the OCI 1.1 `subject` and `artifactType`.

use std::collections::BTreeMap;

use bundle_format::Digest;

/// `application/vnd.oci.image.manifest.v1+json`
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `application/vnd.oci.image.index.v1+json`
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `application/vnd.docker.distribution.manifest.v2+json`
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// `application/vnd.docker.distribution.manifest.list.v2+json`
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The manifest media types a registry stores and serves.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Whether `media_type` names an index (a list of manifests) rather than an image manifest.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// A manifest or an index, as far as we read it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Doc {
    /// `schemaVersion` (2 for every type we handle).
    pub schema_version: Option<u32>,
    /// `mediaType`, when the document carries it.
    pub media_type: Option<String>,
    /// OCI 1.1 `artifactType`.
    pub artifact_type: Option<String>,
    /// Children of an index.
    pub manifests: Option<Vec<Desc>>,
    /// The config blob of a manifest.
    pub config: Option<Desc>,
    /// The layers of a manifest.
    pub layers: Option<Vec<Desc>>,
    /// OCI 1.1 `subject`: the manifest this one refers to.
    pub subject: Option<Desc>,
    /// Annotations.
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A descriptor.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Desc {
    /// Media type of the content.
    pub media_type: Option<String>,
    /// Its digest, as written (checked by [`Desc::digest`]).
    pub digest: String,
    /// Its size.
    pub size: Option<u64>,
    /// Where non-distributable content can be fetched from instead.
    pub urls: Option<Vec<String>>,
}

impl Desc {
    /// The digest, parsed.
    pub fn digest(&self) -> Result<Digest, bundle_format::Error> {
        self.digest.parse()
    }
}

impl Doc {
    /// Parses a manifest or index.
    pub fn parse(bytes: &[u8]) -> Result<Doc, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The blobs a manifest names: config, then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Desc> {
        self.config.iter().chain(self.layers.iter().flatten())
    }
}
