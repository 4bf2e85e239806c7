//! The few fields of OCI and Docker JSON documents this crate reads, parsed leniently (unknown
//! fields ignored) so that both media-type families and older writers get through.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::Platform;

/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed OCI layer.
pub(crate) const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// gzip OCI layer.
pub(crate) const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// zstd OCI layer.
pub(crate) const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The annotation buildx puts on attestation manifests in an index.
pub(crate) const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// The manifest an attestation is about.
pub(crate) const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";

/// What a manifest-like document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Manifest,
    Index,
}

impl Kind {
    /// The kind a media type names, if it is one this crate walks.
    pub fn of(media_type: &str) -> Option<Kind> {
        match media_type {
            OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Manifest),
            OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
            _ => None,
        }
    }
}

/// `oci-layout`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LayoutFile {
    pub image_layout_version: String,
}

/// A content descriptor.
#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub platform: Option<JsonPlatform>,
}

impl Descriptor {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// The platform of an index entry or the os fields of a config.
#[derive(Deserialize, Debug, Clone, Default)]
pub(crate) struct JsonPlatform {
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
}

impl JsonPlatform {
    /// The platform, when os and architecture are both given.
    pub fn platform(&self) -> Option<Platform> {
        let nonempty =
            |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
        Some(Platform {
            os: nonempty(&self.os)?,
            architecture: nonempty(&self.architecture)?,
            variant: nonempty(&self.variant),
        })
    }
}

/// An image index or manifest list (also `index.json`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

/// An image manifest.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

/// What a document says it is: its `mediaType`, else the fields it has.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Sniff {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub config: Option<serde::de::IgnoredAny>,
}

/// One entry of a docker-archive `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerEntry {
    pub config: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(default)]
    pub layers: Option<Vec<String>>,
}
