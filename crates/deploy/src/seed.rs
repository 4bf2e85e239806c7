//! What seeding sends, derived from the archive alone: the agent image that `bundle create`
//! put in it, stage0 and the agent binary read from that image's layer, the agent cut into
//! ConfigMap-sized parts, and the injector payload (a sub-archive of the agent image whose
//! frames are the archive's own frames).

use std::collections::BTreeSet;

use bundle_format::{Archive, Digest};
use bundle_layout::agent::{AgentFiles, is_agent_image, read_agent_layer};
use bundle_oci::server::archive::Payload;

use crate::objects::{SeedKind, SeedMap};
use crate::{Error, Result};

/// The agent binary is cut into parts of at most this many bytes, each one ConfigMap. The API
/// server refuses a ConfigMap whose data exceeds 1 MiB; a margin keeps small control planes
/// comfortable (etcd's default request limit is 1.5 MiB).
pub const AGENT_PART_MAX: usize = 1_000_000;

/// Everything seeding needs from the archive.
pub struct Seed {
    /// The agent image's name in the archive.
    pub agent_name: String,
    /// Its manifest digest.
    pub agent_digest: Digest,
    /// sha256 of the agent binary (hex), checked by stage0.
    pub agent_sha256: String,
    /// The stage0 ConfigMap.
    pub stage0: SeedMap,
    /// The agent's parts in order.
    pub agent_parts: Vec<SeedMap>,
    /// The payload's index then its frames.
    pub payload: Vec<SeedMap>,
    /// The payload's id (hex).
    pub payload_id: String,
    files: AgentFiles,
    index: Vec<u8>,
    frames: Vec<u32>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Digest::of(bytes).hex()
}

impl Seed {
    /// Reads the agent image of `archive` (frames are checked against their sha256 as they
    /// are read).
    pub fn from_archive(archive: &Archive) -> Result<Seed> {
        let id = archive.id().to_string();
        let img = archive
            .index()
            .images
            .iter()
            .find(|i| is_agent_image(&i.name))
            .ok_or_else(|| Error::Archive {
                archive: id.clone(),
                reason: format!(
                    "holds no agent image ({}:VERSION), so it cannot seed a registry; recreate it without --no-agent, or deploy with --registry URL",
                    bundle_layout::agent::AGENT_IMAGE_REPOSITORY
                ),
            })?;
        let manifest = archive.read_blob(&img.digest)?;
        let doc: serde_json::Value =
            serde_json::from_slice(&manifest).map_err(|e| Error::Archive {
                archive: id.clone(),
                reason: format!("agent image {} manifest {}: {e}", img.name, img.digest),
            })?;
        let layer = doc["layers"][0]["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
            .ok_or_else(|| Error::Archive {
                archive: id.clone(),
                reason: format!(
                    "agent image {} manifest {} names no layer",
                    img.name, img.digest
                ),
            })?;
        let files = read_agent_layer(&archive.read_blob(&layer)?)?;
        let payload = Payload::new(archive, &[img.name.as_str()]).map_err(|e| Error::Archive {
            archive: id.clone(),
            reason: format!("agent image payload: {e}"),
        })?;

        let stage0 = SeedMap {
            kind: SeedKind::Stage0,
            sha256: sha256_hex(&files.stage0),
            key: "stage0".into(),
            size: files.stage0.len() as u64,
        };
        let agent_parts = files
            .agent
            .chunks(AGENT_PART_MAX)
            .map(|c| {
                let sha = sha256_hex(c);
                SeedMap {
                    kind: SeedKind::AgentPart,
                    key: format!("agent-{}", &sha[..16]),
                    sha256: sha,
                    size: c.len() as u64,
                }
            })
            .collect();
        let mut seen = BTreeSet::new();
        let mut maps = vec![SeedMap {
            kind: SeedKind::PayloadIndex,
            sha256: payload.id.hex(),
            key: Payload::INDEX_FILE.into(),
            size: payload.index.len() as u64,
        }];
        for &f in &payload.frames {
            let name = Payload::frame_name(archive, f);
            if seen.insert(name.clone()) {
                maps.push(SeedMap {
                    kind: SeedKind::Frame,
                    sha256: name.clone(),
                    key: name,
                    size: u64::from(archive.index().frames[f as usize].csize()),
                });
            }
        }
        Ok(Seed {
            agent_name: img.name.clone(),
            agent_digest: img.digest,
            agent_sha256: sha256_hex(&files.agent),
            stage0,
            agent_parts,
            payload_id: payload.id.hex(),
            payload: maps,
            files,
            index: payload.index,
            frames: payload.frames,
        })
    }

    /// Every ConfigMap, stage0 first.
    pub fn maps(&self) -> impl Iterator<Item = &SeedMap> {
        std::iter::once(&self.stage0)
            .chain(self.agent_parts.iter())
            .chain(self.payload.iter())
    }

    /// Total bytes of ConfigMap data.
    pub fn bytes(&self) -> u64 {
        self.maps().map(|m| m.size).sum()
    }

    /// The content of `map`.
    pub fn data(&self, archive: &Archive, map: &SeedMap) -> Result<Vec<u8>> {
        Ok(match map.kind {
            SeedKind::Stage0 => self.files.stage0.clone(),
            SeedKind::AgentPart => {
                let i = self
                    .agent_parts
                    .iter()
                    .position(|p| p.sha256 == map.sha256)
                    .unwrap_or(0);
                let start = i * AGENT_PART_MAX;
                let end = (start + AGENT_PART_MAX).min(self.files.agent.len());
                self.files.agent[start..end].to_vec()
            }
            SeedKind::PayloadIndex => self.index.clone(),
            SeedKind::Frame => {
                let f = self
                    .frames
                    .iter()
                    .copied()
                    .find(|&f| Payload::frame_name(archive, f) == map.sha256)
                    .ok_or_else(|| Error::Archive {
                        archive: archive.id().to_string(),
                        reason: format!("payload frame {} is not in the archive", map.sha256),
                    })?;
                archive.frame(f)?.to_vec()
            }
        })
    }
}
