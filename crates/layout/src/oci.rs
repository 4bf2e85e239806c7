//! Reads one image out of an OCI image layout (a directory or an indexed tar): picks the
//! `index.json` entry, walks indexes and manifests verifying every JSON blob, filters platforms.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bundle_format::write::{CONTAINERD_NAME_ANNOTATION, REF_NAME_ANNOTATION};
use bundle_format::{BlobInput, Content, Digest, ImageInput};

use crate::json::{self, Kind};
use crate::store::{JSON_LIMIT, Store};
use crate::{Error, Platform, Resolved, Result};

/// Index nesting this walk follows (real images nest one level).
const MAX_DEPTH: usize = 8;

/// A parsed descriptor.
#[derive(Debug, Clone)]
struct Ref {
    digest: Digest,
    size: u64,
    media_type: Option<String>,
    platform: Option<Platform>,
    /// `Some` for a buildx attestation manifest: the manifest it is about, when named.
    attests: Option<Option<Digest>>,
}

impl Ref {
    fn parse(d: &json::Descriptor, doc: &str, field: &str) -> Result<Ref> {
        let digest = d.digest.parse().map_err(|e| Error::InvalidDigest {
            what: doc.to_owned(),
            field: format!("{field}.digest"),
            cause: Box::new(e),
        })?;
        let attests =
            (d.annotation(json::REFERENCE_TYPE) == Some("attestation-manifest")).then(|| {
                d.annotation(json::REFERENCE_DIGEST)
                    .and_then(|s| s.parse().ok())
            });
        Ok(Ref {
            digest,
            size: d.size,
            media_type: d.media_type.clone().filter(|m| !m.is_empty()),
            platform: d.platform.as_ref().and_then(json::JsonPlatform::platform),
            attests,
        })
    }
}

/// A manifest or index that stays in the image.
#[derive(Clone)]
struct Node {
    digest: Digest,
    size: u64,
    media_type: String,
    /// The digest before the index was rewritten, when it was.
    rewritten_from: Option<Digest>,
    /// Platform manifests of this index, and how many of them were kept.
    children: (usize, usize),
}

struct Walk<'a> {
    store: &'a Store,
    filter: &'a [Platform],
    blobs: Vec<BlobInput>,
    seen: HashSet<Digest>,
    available: BTreeSet<String>,
    kept_platforms: BTreeSet<String>,
    /// Nodes already walked: an index may name the same child many times, at any depth.
    memo: HashMap<(Digest, Option<Platform>, bool), Option<Node>>,
}

/// Resolves the image tagged `tag` (or the only one) in the layout `store`.
pub(crate) fn resolve(
    name: &str,
    store: &Store,
    tag: Option<&str>,
    filter: &[Platform],
) -> Result<Resolved> {
    let root = store.root();
    let not_layout = |reason: String| Error::NotALayout {
        path: root.to_owned(),
        reason,
    };
    let layout_file = store
        .locate("oci-layout")?
        .ok_or_else(|| not_layout("not an OCI image layout: no oci-layout file".into()))?;
    let what = format!("{}", layout_file.place);
    let bytes = layout_file.read(&what, JSON_LIMIT)?;
    let layout: json::LayoutFile =
        serde_json::from_slice(&bytes).map_err(|cause| Error::Json { what, cause })?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(not_layout(format!(
            "unsupported imageLayoutVersion {:?} (this tool reads 1.x)",
            layout.image_layout_version
        )));
    }
    let index_file = store
        .locate("index.json")?
        .ok_or_else(|| not_layout("not an OCI image layout: no index.json".into()))?;
    let what = format!("{}", index_file.place);
    let bytes = index_file.read(&what, JSON_LIMIT)?;
    let index: json::Index = serde_json::from_slice(&bytes).map_err(|cause| Error::Json {
        what: what.clone(),
        cause,
    })?;
    let entries = index.manifests.unwrap_or_default();
    let (i, chosen) = select(root, &entries, tag)?;
    let top = Ref::parse(chosen, &what, &format!("manifests[{i}]"))?;
    resolve_root(name, store, &top, &format!("{what} manifests[{i}]"), filter)
}

/// Resolves the image whose top manifest or index is `root`.
pub(crate) fn resolve_remote(
    name: &str,
    store: &Store,
    root: &crate::Root,
    filter: &[Platform],
) -> Result<Resolved> {
    let top = Ref {
        digest: root.digest,
        size: root.size,
        media_type: Some(root.media_type.clone()),
        platform: None,
        attests: None,
    };
    resolve_root(name, store, &top, name, filter)
}

fn resolve_root(
    name: &str,
    store: &Store,
    top: &Ref,
    referrer: &str,
    filter: &[Platform],
) -> Result<Resolved> {
    let mut walk = Walk {
        store,
        filter,
        blobs: Vec::new(),
        seen: HashSet::new(),
        available: BTreeSet::new(),
        kept_platforms: BTreeSet::new(),
        memo: HashMap::new(),
    };
    let Some(node) = walk.visit(top, referrer, 0, !filter.is_empty())? else {
        return Err(no_platform(name, filter, walk.available));
    };
    let mut notes = Vec::new();
    if let Some(old) = node.rewritten_from {
        notes.push(rewrite_note(name, filter, node.children, old, node.digest));
    }
    Ok(Resolved {
        image: ImageInput {
            name: name.to_owned(),
            digest: node.digest,
            media_type: node.media_type,
            size: node.size,
            platforms: walk.kept_platforms.into_iter().collect(),
        },
        blobs: walk.blobs,
        notes,
    })
}

pub(crate) fn no_platform(name: &str, filter: &[Platform], available: BTreeSet<String>) -> Error {
    Error::NoMatchingPlatform {
        image: name.to_owned(),
        wanted: filter.iter().map(Platform::to_string).collect(),
        available: available.into_iter().collect(),
    }
}

fn rewrite_note(
    name: &str,
    filter: &[Platform],
    (total, kept): (usize, usize),
    old: Digest,
    new: Digest,
) -> String {
    let wanted: Vec<String> = filter.iter().map(Platform::to_string).collect();
    format!(
        "{name}: --platform {} keeps {kept} of {total} manifests; the image index is rewritten, \
         so its digest changes from {old} to {new} (the per-platform manifest digests are unchanged)",
        wanted.join(",")
    )
}

/// The `index.json` entry for `tag`, or the only entry.
fn select<'e>(
    root: &std::path::Path,
    entries: &'e [json::Descriptor],
    tag: Option<&str>,
) -> Result<(usize, &'e json::Descriptor)> {
    let label = |d: &json::Descriptor| {
        d.annotation(REF_NAME_ANNOTATION)
            .or_else(|| d.annotation(CONTAINERD_NAME_ANNOTATION))
            .map_or_else(|| d.digest.clone(), str::to_owned)
    };
    let Some(tag) = tag else {
        return match entries {
            [] => Err(Error::NoImage {
                layout: root.to_owned(),
            }),
            [only] => Ok((0, only)),
            _ => Err(Error::AmbiguousImage {
                layout: root.to_owned(),
                available: entries.iter().map(label).collect(),
            }),
        };
    };
    let matches = |d: &json::Descriptor| {
        d.annotation(REF_NAME_ANNOTATION) == Some(tag)
            || d.annotation(CONTAINERD_NAME_ANNOTATION) == Some(tag)
    };
    let mut found = entries.iter().enumerate().filter(|(_, d)| matches(d));
    let Some(first) = found.next() else {
        return Err(Error::TagNotFound {
            layout: root.to_owned(),
            tag: tag.to_owned(),
            available: entries
                .iter()
                .filter_map(|d| {
                    d.annotation(REF_NAME_ANNOTATION)
                        .or_else(|| d.annotation(CONTAINERD_NAME_ANNOTATION))
                        .map(str::to_owned)
                })
                .collect(),
        });
    };
    if found.any(|(_, d)| d.digest != first.1.digest) {
        return Err(Error::InvalidDocument {
            what: format!("{}", root.join("index.json").display()),
            reason: format!("tag {tag:?} names more than one image"),
        });
    }
    Ok(first)
}

impl Walk<'_> {
    fn push(&mut self, digest: Digest, size: u64, media_type: Option<String>, content: Content) {
        if self.seen.insert(digest) {
            self.blobs.push(BlobInput {
                digest,
                size,
                media_type,
                content,
            });
        }
    }

    fn wanted(&self, p: &Platform) -> bool {
        self.filter.iter().any(|f| f.matches(p))
    }

    fn note_platform(&mut self, p: &Platform) {
        if !p.is_unknown() {
            self.available.insert(p.to_string());
        }
    }

    /// Visits the manifest or index `r` names; `None` when the platform filter drops it.
    fn visit(
        &mut self,
        r: &Ref,
        referrer: &str,
        depth: usize,
        filtering: bool,
    ) -> Result<Option<Node>> {
        if filtering && let Some(p) = &r.platform {
            self.note_platform(p);
            if !self.wanted(p) {
                return Ok(None);
            }
        }
        let key = (r.digest, r.platform.clone(), filtering);
        if let Some(done) = self.memo.get(&key) {
            return Ok(done.clone());
        }
        let node = self.visit_new(r, referrer, depth, filtering)?;
        self.memo.insert(key, node.clone());
        Ok(node)
    }

    fn visit_new(
        &mut self,
        r: &Ref,
        referrer: &str,
        depth: usize,
        filtering: bool,
    ) -> Result<Option<Node>> {
        let role = match r.media_type.as_deref().map(Kind::of) {
            Some(Some(Kind::Index)) => "image index",
            _ => "manifest",
        };
        let bytes = self.store.read_blob(&r.digest, r.size, role)?;
        let what = format!("{role} {} (from {referrer})", r.digest);
        let (kind, media_type) = match r.media_type.as_deref() {
            Some(mt) => match Kind::of(mt) {
                Some(k) => (k, mt.to_owned()),
                None => {
                    return Err(Error::UnsupportedMediaType {
                        what,
                        media_type: mt.to_owned(),
                    });
                }
            },
            None => sniff(&bytes, &what)?,
        };
        match kind {
            Kind::Manifest => self.manifest(r, bytes, media_type, &what, filtering),
            Kind::Index => {
                if depth >= MAX_DEPTH {
                    return Err(Error::TooDeep {
                        what,
                        limit: MAX_DEPTH,
                    });
                }
                self.index(r, bytes, media_type, &what, depth, filtering)
            }
        }
    }

    fn manifest(
        &mut self,
        r: &Ref,
        bytes: Vec<u8>,
        media_type: String,
        what: &str,
        filtering: bool,
    ) -> Result<Option<Node>> {
        let m: json::Manifest = serde_json::from_slice(&bytes).map_err(|cause| Error::Json {
            what: what.to_owned(),
            cause,
        })?;
        let config = Ref::parse(&m.config, what, "config")?;
        let config_bytes = self
            .store
            .read_blob(&config.digest, config.size, "config")?;
        let config_platform = match serde_json::from_slice::<json::JsonPlatform>(&config_bytes) {
            Ok(p) => p.platform(),
            Err(cause)
                if matches!(
                    config.media_type.as_deref(),
                    Some(json::OCI_CONFIG | json::DOCKER_CONFIG)
                ) =>
            {
                return Err(Error::Json {
                    what: format!("config {} (from {what})", config.digest),
                    cause,
                });
            }
            // An artifact's config need not be JSON; it has no platform then.
            Err(_) => None,
        };
        let platform = r.platform.clone().or(config_platform);
        if let Some(p) = &platform {
            self.note_platform(p);
        }
        if filtering && !platform.as_ref().is_some_and(|p| self.wanted(p)) {
            return Ok(None);
        }
        let mut layers = Vec::new();
        for (i, l) in m.layers.iter().flatten().enumerate() {
            let layer = Ref::parse(l, what, &format!("layers[{i}]"))?;
            if self.seen.contains(&layer.digest) {
                continue;
            }
            let loc = self.store.blob(&layer.digest, layer.size, "layer")?;
            layers.push((layer, loc));
        }
        for (layer, loc) in layers {
            self.push(
                layer.digest,
                layer.size,
                layer.media_type,
                Content::File {
                    path: loc.file,
                    offset: loc.offset,
                },
            );
        }
        self.push(
            config.digest,
            config.size,
            config.media_type,
            Content::Bytes(Arc::from(config_bytes)),
        );
        self.push(
            r.digest,
            r.size,
            Some(media_type.clone()),
            Content::Bytes(Arc::from(bytes)),
        );
        if let Some(p) = platform.filter(|p| !p.is_unknown()) {
            self.kept_platforms.insert(p.to_string());
        }
        Ok(Some(Node {
            digest: r.digest,
            size: r.size,
            media_type,
            rewritten_from: None,
            children: (0, 0),
        }))
    }

    fn index(
        &mut self,
        r: &Ref,
        bytes: Vec<u8>,
        media_type: String,
        what: &str,
        depth: usize,
        filtering: bool,
    ) -> Result<Option<Node>> {
        let idx: json::Index = serde_json::from_slice(&bytes).map_err(|cause| Error::Json {
            what: what.to_owned(),
            cause,
        })?;
        let children = idx
            .manifests
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, d)| Ref::parse(d, what, &format!("manifests[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let mut kept: Vec<(usize, Node)> = Vec::new();
        let mut kept_digests = HashSet::new();
        for (i, c) in children.iter().enumerate() {
            if c.attests.is_some() {
                continue;
            }
            let referrer = format!("{what} manifests[{i}]");
            if let Some(n) = self.visit(c, &referrer, depth + 1, filtering)? {
                kept_digests.insert(c.digest);
                kept.push((i, n));
            }
        }
        let platform_total = children.iter().filter(|c| c.attests.is_none()).count();
        let platform_kept = kept.len();
        if filtering && platform_kept == 0 && !children.is_empty() {
            return Ok(None);
        }
        // Attestations follow the manifest they are about.
        for (i, c) in children.iter().enumerate() {
            let Some(about) = c.attests else { continue };
            if filtering && !about.is_some_and(|d| kept_digests.contains(&d)) {
                continue;
            }
            let referrer = format!("{what} manifests[{i}]");
            if let Some(n) = self.visit(c, &referrer, depth + 1, false)? {
                kept.push((i, n));
            }
        }
        kept.sort_by_key(|(i, _)| *i);
        let changed =
            kept.len() < children.len() || kept.iter().any(|(_, n)| n.rewritten_from.is_some());
        if !changed {
            self.push(
                r.digest,
                r.size,
                Some(media_type.clone()),
                Content::Bytes(Arc::from(bytes)),
            );
            return Ok(Some(Node {
                digest: r.digest,
                size: r.size,
                media_type,
                rewritten_from: None,
                children: (platform_total, platform_kept),
            }));
        }
        let new_bytes = rewrite(&bytes, &kept, what)?;
        let digest = Digest::of(&new_bytes);
        let size = new_bytes.len() as u64;
        self.push(
            digest,
            size,
            Some(media_type.clone()),
            Content::Bytes(Arc::from(new_bytes)),
        );
        Ok(Some(Node {
            digest,
            size,
            media_type,
            rewritten_from: Some(r.digest),
            children: (platform_total, platform_kept),
        }))
    }
}

/// The index `bytes` with only the `kept` entries of `manifests`, re-serialized. Everything
/// else is carried over as parsed; the output is a function of the input alone.
fn rewrite(bytes: &[u8], kept: &[(usize, Node)], what: &str) -> Result<Vec<u8>> {
    let json_err = |cause| Error::Json {
        what: what.to_owned(),
        cause,
    };
    let mut doc: serde_json::Value = serde_json::from_slice(bytes).map_err(json_err)?;
    let Some(list) = doc.get_mut("manifests").and_then(|v| v.as_array_mut()) else {
        return Err(Error::InvalidDocument {
            what: what.to_owned(),
            reason: "manifests is not an array".into(),
        });
    };
    let mut out = Vec::with_capacity(kept.len());
    for (i, node) in kept {
        let Some(mut entry) = list.get(*i).cloned() else {
            return Err(Error::InvalidDocument {
                what: what.to_owned(),
                reason: format!("manifests[{i}] is missing"),
            });
        };
        if node.rewritten_from.is_some()
            && let Some(obj) = entry.as_object_mut()
        {
            obj.insert("digest".into(), node.digest.to_string().into());
            obj.insert("size".into(), node.size.into());
        }
        out.push(entry);
    }
    *list = out;
    // Sorted keys whatever serde_json's `preserve_order` feature says: the digest must not
    // depend on how the workspace happens to be built.
    doc.sort_all_objects();
    serde_json::to_vec(&doc).map_err(json_err)
}

/// The kind of a document whose descriptor has no media type.
fn sniff(bytes: &[u8], what: &str) -> Result<(Kind, String)> {
    let s: json::Sniff = serde_json::from_slice(bytes).map_err(|cause| Error::Json {
        what: what.to_owned(),
        cause,
    })?;
    if let Some(mt) = s.media_type {
        return match Kind::of(&mt) {
            Some(k) => Ok((k, mt)),
            None => Err(Error::UnsupportedMediaType {
                what: what.to_owned(),
                media_type: mt,
            }),
        };
    }
    if s.manifests.is_some() {
        Ok((Kind::Index, json::OCI_INDEX.to_owned()))
    } else if s.config.is_some() {
        Ok((Kind::Manifest, json::OCI_MANIFEST.to_owned()))
    } else {
        Err(Error::UnsupportedMediaType {
            what: what.to_owned(),
            media_type: "(none, and neither manifests nor config)".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_keeps_order_and_is_deterministic() {
        let src = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[{"digest":"a","size":1},{"digest":"b","size":2},{"digest":"c","size":3}],
            "annotations":{"x":"y"}}"#;
        let node = |d: &[u8]| Node {
            digest: Digest::of(d),
            size: 9,
            media_type: String::new(),
            rewritten_from: None,
            children: (0, 0),
        };
        let kept = vec![(0, node(b"a")), (2, node(b"c"))];
        let a = rewrite(src, &kept, "t").unwrap();
        assert_eq!(a, rewrite(src, &kept, "t").unwrap());
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let digests: Vec<&str> = v["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap())
            .collect();
        assert_eq!(digests, ["a", "c"]);
        assert_eq!(v["annotations"]["x"], "y");
    }

    #[test]
    fn sniffs_kinds() {
        assert_eq!(sniff(br#"{"manifests":[]}"#, "t").unwrap().0, Kind::Index);
        assert_eq!(sniff(br#"{"config":{}}"#, "t").unwrap().0, Kind::Manifest);
        let docker = format!(r#"{{"mediaType":"{}"}}"#, json::DOCKER_LIST);
        assert_eq!(sniff(docker.as_bytes(), "t").unwrap().0, Kind::Index);
        assert!(sniff(br#"{"mediaType":"text/plain"}"#, "t").is_err());
        assert!(sniff(b"{}", "t").is_err());
    }
}
