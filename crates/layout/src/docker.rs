//! Reads one image out of a `docker save` tar (`manifest.json` + config + layer files) and
//! builds the OCI image manifest such an archive does not carry.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bundle_format::{BlobInput, Content, Digest, Hasher, ImageInput};
use rayon::prelude::*;
use serde::Serialize;

use crate::json::{self, DockerEntry};
use crate::store::{JSON_LIMIT, Located, TarIndex, compression};
use crate::{Error, Platform, Resolved, Result};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutDescriptor {
    media_type: &'static str,
    digest: Digest,
    size: u64,
}

/// The manifest made for the image. Field order is fixed, so equal input gives equal bytes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutManifest {
    schema_version: u32,
    media_type: &'static str,
    config: OutDescriptor,
    layers: Vec<OutDescriptor>,
}

/// Resolves the image `reference` names (or the only one) in the docker archive `tar`.
pub(crate) fn resolve(
    name: &str,
    tar: &TarIndex,
    reference: Option<&str>,
    filter: &[Platform],
) -> Result<Resolved> {
    let archive = tar.path();
    let loc = tar
        .locate("manifest.json")?
        .ok_or_else(|| Error::NotALayout {
            path: archive.to_owned(),
            reason: "not a docker archive: no manifest.json".into(),
        })?;
    let what = loc.place.to_string();
    let bytes = loc.read(&what, JSON_LIMIT)?;
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|cause| Error::Json {
            what: what.clone(),
            cause,
        })?;
    let (i, entry) = select(archive, &entries, reference)?;
    let what = format!("{what} [{i}]");

    let config_loc = member(tar, &entry.config, "config")?;
    let config_what = format!("config {}", config_loc.place);
    let config = config_loc.read(&config_what, JSON_LIMIT)?;
    let config_digest = Digest::of(&config);
    if let Some(named) = digest_in_name(&entry.config, true)
        && named != config_digest
    {
        return Err(Error::DigestMismatch {
            what: config_what,
            expected: named,
            found: config_digest,
        });
    }
    let platform = serde_json::from_slice::<json::JsonPlatform>(&config)
        .map_err(|cause| Error::Json {
            what: config_what,
            cause,
        })?
        .platform();
    if !filter.is_empty()
        && !platform
            .as_ref()
            .is_some_and(|p| filter.iter().any(|f| f.matches(p)))
    {
        let available: BTreeSet<String> = platform.iter().map(Platform::to_string).collect();
        return Err(crate::oci::no_platform(name, filter, available));
    }

    let names = entry.layers.as_deref().unwrap_or_default();
    let mut located = Vec::with_capacity(names.len());
    for n in names {
        located.push((n.as_str(), member(tar, n, "layer")?));
    }
    // Links make several names share one member: hash each member once.
    let mut unique: Vec<&Located> = Vec::new();
    let mut slot: HashMap<u64, usize> = HashMap::new();
    let mut slots = Vec::with_capacity(located.len());
    for (_, loc) in &located {
        let k = *slot.entry(loc.offset).or_insert_with(|| {
            unique.push(loc);
            unique.len() - 1
        });
        slots.push(k);
    }
    let hashed: Vec<(Digest, &'static str)> = unique
        .par_iter()
        .map(|loc| hash_layer(loc))
        .collect::<Result<_>>()?;

    let mut layers = Vec::with_capacity(located.len());
    let mut blobs = Vec::new();
    // The config is listed once, as a config, even when a layer has the same bytes.
    let mut seen = HashSet::from([config_digest]);
    for ((n, loc), k) in located.iter().zip(slots) {
        let (digest, media_type) = hashed[k];
        if let Some(named) = digest_in_name(n, false)
            && named != digest
        {
            return Err(Error::DigestMismatch {
                what: format!("layer {}", loc.place),
                expected: named,
                found: digest,
            });
        }
        layers.push(OutDescriptor {
            media_type,
            digest,
            size: loc.len,
        });
        if seen.insert(digest) {
            blobs.push(BlobInput {
                digest,
                size: loc.len,
                media_type: Some(media_type.to_owned()),
                content: Content::File {
                    path: loc.file.clone(),
                    offset: loc.offset,
                },
            });
        }
    }
    let manifest = OutManifest {
        schema_version: 2,
        media_type: json::OCI_MANIFEST,
        config: OutDescriptor {
            media_type: json::OCI_CONFIG,
            digest: config_digest,
            size: config.len() as u64,
        },
        layers,
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|cause| Error::Json {
        what: format!("manifest made for {what}"),
        cause,
    })?;
    let manifest_digest = Digest::of(&manifest);
    let manifest_size = manifest.len() as u64;
    blobs.push(BlobInput {
        digest: config_digest,
        size: config.len() as u64,
        media_type: Some(json::OCI_CONFIG.to_owned()),
        content: Content::Bytes(Arc::from(config)),
    });
    blobs.push(BlobInput {
        digest: manifest_digest,
        size: manifest_size,
        media_type: Some(json::OCI_MANIFEST.to_owned()),
        content: Content::Bytes(Arc::from(manifest)),
    });
    let notes = vec![format!(
        "{name}: {} is a docker archive, which carries no manifest; the image gets a new OCI \
         manifest {manifest_digest} made from its config and layers",
        archive.display()
    )];
    Ok(Resolved {
        image: ImageInput {
            name: name.to_owned(),
            digest: manifest_digest,
            media_type: json::OCI_MANIFEST.to_owned(),
            size: manifest_size,
            platforms: platform
                .filter(|p| !p.is_unknown())
                .map(|p| p.to_string())
                .into_iter()
                .collect(),
        },
        blobs,
        notes,
    })
}

fn member(tar: &TarIndex, name: &str, role: &'static str) -> Result<Located> {
    tar.locate(name)?.ok_or_else(|| Error::MemberMissing {
        archive: tar.path().to_owned(),
        member: name.to_owned(),
        role,
    })
}

/// The `manifest.json` entry `reference` names (a RepoTag or `@N`), or the only one.
fn select<'e>(
    archive: &std::path::Path,
    entries: &'e [DockerEntry],
    reference: Option<&str>,
) -> Result<(usize, &'e DockerEntry)> {
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let all_tags = || entries.iter().flat_map(tags).collect::<Vec<_>>();
    let Some(reference) = reference else {
        return match entries {
            [] => Err(Error::NoImage {
                layout: archive.to_owned(),
            }),
            [only] => Ok((0, only)),
            _ => Err(Error::AmbiguousImage {
                layout: archive.to_owned(),
                available: entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let t = tags(e);
                        if t.is_empty() {
                            format!("@{i}")
                        } else {
                            t.join(", ")
                        }
                    })
                    .collect(),
            }),
        };
    };
    if let Some(n) = reference
        .strip_prefix('@')
        .and_then(|n| n.parse::<usize>().ok())
    {
        return entries
            .get(n)
            .map(|e| (n, e))
            .ok_or_else(|| Error::TagNotFound {
                layout: archive.to_owned(),
                tag: reference.to_owned(),
                available: (0..entries.len()).map(|i| format!("@{i}")).collect(),
            });
    }
    let want = familiar(reference);
    entries
        .iter()
        .enumerate()
        .find(|(_, e)| tags(e).iter().any(|t| familiar(t) == want))
        .ok_or_else(|| Error::TagNotFound {
            layout: archive.to_owned(),
            tag: reference.to_owned(),
            available: all_tags(),
        })
}

/// A reference in Docker's short form, with the default tag: `docker.io/library/app` and
/// `app:latest` compare equal.
fn familiar(r: &str) -> String {
    let short = [
        "docker.io/library/",
        "index.docker.io/library/",
        "docker.io/",
        "index.docker.io/",
    ]
    .iter()
    .find_map(|p| r.strip_prefix(p))
    .unwrap_or(r);
    let last = short.rsplit('/').next().unwrap_or(short);
    if last.contains(':') || short.contains('@') {
        short.to_owned()
    } else {
        format!("{short}:latest")
    }
}

/// The digest a member's name claims: `blobs/sha256/HEX`, or `HEX.json` for a config.
fn digest_in_name(name: &str, config: bool) -> Option<Digest> {
    let mut parts = name.trim_start_matches("./").rsplit('/');
    let file = parts.next()?;
    let hex = if parts.next() == Some("sha256") {
        file
    } else if config {
        file.strip_suffix(".json")?
    } else {
        return None;
    };
    format!("sha256:{hex}").parse().ok()
}

/// The digest of a layer member and its media type, told by its first bytes.
fn hash_layer(loc: &Located) -> Result<(Digest, &'static str)> {
    let io_err = |e: std::io::Error| {
        Error::io(
            &loc.file,
            std::io::Error::new(e.kind(), format!("reading layer {}: {e}", loc.place)),
        )
    };
    let mut f = File::open(&loc.file).map_err(io_err)?;
    f.seek(SeekFrom::Start(loc.offset)).map_err(io_err)?;
    let mut f = f.take(loc.len);
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::with_capacity(8);
    let mut done = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if head.len() < 8 {
            let take = (8 - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    if done != loc.len {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("archive ends after {done} of {} bytes", loc.len),
        )));
    }
    let media_type = match compression(&head) {
        None => json::LAYER_TAR,
        Some(("gzip", _)) => json::LAYER_GZIP,
        Some(("zstd", _)) => json::LAYER_ZSTD,
        Some((kind, _)) => {
            return Err(Error::LayerCompression {
                place: loc.place.clone(),
                kind,
            });
        }
    };
    Ok((hasher.finish(), media_type))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Place;

    #[test]
    fn familiar_forms_compare_equal() {
        for (a, b) in [
            ("app", "docker.io/library/app:latest"),
            ("app:1", "docker.io/library/app:1"),
            ("team/app:1", "docker.io/team/app:1"),
            ("registry:5000/app", "registry:5000/app:latest"),
        ] {
            assert_eq!(familiar(a), familiar(b), "{a} {b}");
        }
        assert_ne!(familiar("app:1"), familiar("app:2"));
        assert_ne!(familiar("registry:5000/app"), familiar("app"));
    }

    #[test]
    fn digests_in_names() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{hex}"), false),
            Some(d)
        );
        assert_eq!(
            digest_in_name(&format!("./blobs/sha256/{hex}"), true),
            Some(d)
        );
        assert_eq!(digest_in_name(&format!("{hex}.json"), true), Some(d));
        assert_eq!(digest_in_name(&format!("{hex}.json"), false), None);
        assert_eq!(digest_in_name(&format!("{hex}/layer.tar"), false), None);
        assert_eq!(digest_in_name("config.json", true), None);
    }

    #[test]
    fn layer_media_type_follows_magic() {
        let dir = tempfile::tempdir().unwrap();
        for (bytes, want) in [
            (&b"plain tar bytes"[..], Ok(json::LAYER_TAR)),
            (&[0x1f, 0x8b, 8, 0, 0][..], Ok(json::LAYER_GZIP)),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0][..], Ok(json::LAYER_ZSTD)),
            (&b"\xfd7zXZ\0rest"[..], Err("xz")),
            (&b""[..], Ok(json::LAYER_TAR)),
        ] {
            let path = dir.path().join("f");
            let mut data = b"prefix".to_vec();
            data.extend_from_slice(bytes);
            std::fs::write(&path, &data).unwrap();
            let loc = Located {
                place: Place::File(path.clone()),
                file: path,
                offset: 6,
                len: bytes.len() as u64,
            };
            match (hash_layer(&loc), want) {
                (Ok((d, mt)), Ok(w)) => {
                    assert_eq!(mt, w);
                    assert_eq!(d, Digest::of(bytes));
                }
                (Err(Error::LayerCompression { kind, .. }), Err(w)) => assert_eq!(kind, w),
                (got, w) => panic!("{got:?} vs {w:?}"),
            }
        }
    }
}
