//! Property tests: on hostile input (mutated layouts, arbitrary JSON, hostile tar members,
//! arbitrary source and platform strings) the readers return Ok or a clean error, never panic.
//!
//! Strings in generated JSON of the form `@blobN`, `@sizeN` and `@hexN` are replaced with the
//! digest, size or hex of the N-th blob already written, so random documents can point at real
//! blobs and the walk gets past the first lookup.

use std::collections::BTreeSet;
use std::fs;
use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use bundle_format::{Content, Digest};
use bundle_layout::{Platform, Resolved, SourceSpec, resolve};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Number, Value, json};

use crate::fixture::*;

const NAME: &str = "registry.example/app:1.0";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// One byte over the crate's limit for a JSON document.
const OVER_JSON_LIMIT: u64 = (32 << 20) + 1;

/// `default` cases, or `PROPTEST_CASES` when set (for a deeper run).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// JSON strategies
// ---------------------------------------------------------------------------------------------

const KEYS: &[&str] = &[
    "manifests",
    "mediaType",
    "digest",
    "size",
    "platform",
    "annotations",
    "config",
    "layers",
    "schemaVersion",
    "os",
    "architecture",
    "variant",
    "org.opencontainers.image.ref.name",
    "io.containerd.image.name",
    "vnd.docker.reference.type",
    "vnd.docker.reference.digest",
    "imageLayoutVersion",
    "Config",
    "RepoTags",
    "Layers",
];

const STRINGS: &[&str] = &[
    "",
    "1.0",
    "latest",
    "app:1.0",
    OCI_MANIFEST,
    OCI_INDEX,
    OCI_CONFIG,
    LAYER_GZIP,
    LAYER_TAR,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    DOCKER_CONFIG,
    "text/plain",
    "attestation-manifest",
    "linux",
    "amd64",
    "arm64",
    "v8",
    "unknown",
    "1.0.0",
    "2.0.0",
    "sha256:",
    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
    "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85é",
    "sha256:../../../../etc/passwd",
    "../../etc/passwd",
    "/etc/passwd",
    "\u{0}",
    "é/ü",
    "@blob0",
    "@blob1",
    "@blob2",
    "@blob3",
    "@blob4",
    "@blob5",
    "@blob6",
    "@blob7",
    "@size0",
    "@size3",
    "@hex1",
];

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        6 => select(KEYS).prop_map(str::to_owned),
        1 => ".{0,12}",
    ]
    .boxed()
}

fn string() -> BoxedStrategy<String> {
    prop_oneof![
        6 => select(STRINGS).prop_map(str::to_owned),
        1 => ".{0,40}",
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => (0u64..4096).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => select(vec![
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(-1),
            Value::from(OVER_JSON_LIMIT),
            Value::from(1u64 << 40),
            Value::from(0),
        ]),
        1 => any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => number(),
        4 => string().prop_map(Value::String),
    ]
    .boxed()
}

/// Any JSON value, biased towards the keys and strings the readers look at.
fn json_value() -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
        .boxed()
}

/// A value for a `size` field: plausible, hostile, or not a number at all.
fn size_value() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => number(),
        2 => select(vec!["@size0", "@size1", "@size2", "@size3"]).prop_map(Value::from),
        1 => json_value(),
    ]
    .boxed()
}

/// A value for a `digest` field.
fn digest_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => (0usize..12).prop_map(|n| Value::from(format!("@blob{n}"))),
        2 => string().prop_map(Value::from),
        1 => json_value(),
    ]
    .boxed()
}

fn platform_value() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => (
            prop::option::of(select(vec!["linux", "windows", "unknown", ""])),
            prop::option::of(select(vec!["amd64", "arm64", "arm", "unknown", ""])),
            prop::option::of(select(vec!["v8", "v7", ""])),
        )
            .prop_map(|(os, arch, variant)| {
                let mut m = Map::new();
                if let Some(v) = os {
                    m.insert("os".into(), v.into());
                }
                if let Some(v) = arch {
                    m.insert("architecture".into(), v.into());
                }
                if let Some(v) = variant {
                    m.insert("variant".into(), v.into());
                }
                Value::Object(m)
            }),
        1 => json_value(),
    ]
    .boxed()
}

fn annotations_value() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => prop::collection::vec(
            (
                select(vec![
                    "org.opencontainers.image.ref.name",
                    "io.containerd.image.name",
                    "vnd.docker.reference.type",
                    "vnd.docker.reference.digest",
                ]),
                prop_oneof![string(), digest_value().prop_map(|v| v.to_string())],
            ),
            0..4,
        )
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), Value::from(v))).collect())),
        1 => json_value(),
    ]
    .boxed()
}

fn media_type_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => select(vec![OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, OCI_CONFIG, ""])
            .prop_map(Value::from),
        1 => json_value(),
    ]
    .boxed()
}

/// A content descriptor, each field present or not, plausible or hostile.
fn descriptor() -> BoxedStrategy<Value> {
    (
        prop::option::weighted(0.8, media_type_value()),
        prop::option::weighted(0.9, digest_value()),
        prop::option::weighted(0.9, size_value()),
        prop::option::weighted(0.4, platform_value()),
        prop::option::weighted(0.3, annotations_value()),
    )
        .prop_map(|(mt, digest, size, platform, annotations)| {
            let mut m = Map::new();
            for (k, v) in [
                ("mediaType", mt),
                ("digest", digest),
                ("size", size),
                ("platform", platform),
                ("annotations", annotations),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

/// Something shaped like an index or a manifest, built from hostile descriptors.
fn document() -> BoxedStrategy<Value> {
    prop_oneof![
        (
            prop::option::of(media_type_value()),
            prop::collection::vec(descriptor(), 0..4)
        )
            .prop_map(|(mt, manifests)| {
                let mut d = json!({"schemaVersion": 2, "manifests": manifests});
                if let Some(mt) = mt {
                    d["mediaType"] = mt;
                }
                d
            }),
        (
            prop::option::of(media_type_value()),
            descriptor(),
            prop::collection::vec(descriptor(), 0..4)
        )
            .prop_map(|(mt, config, layers)| {
                let mut d = json!({"schemaVersion": 2, "config": config, "layers": layers});
                if let Some(mt) = mt {
                    d["mediaType"] = mt;
                }
                d
            }),
    ]
    .boxed()
}

/// Bytes that are nearly JSON: deep nesting, unterminated, huge numbers.
fn awkward_json_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        (1usize..4000).prop_map(|n| "[".repeat(n).into_bytes()),
        (1usize..400).prop_map(|n| {
            let mut s = r#"{"manifests":"#.repeat(n);
            s.push_str("[]");
            s.push_str(&"}".repeat(n));
            s.into_bytes()
        }),
        (1usize..200).prop_map(|n| format!(
            r#"{{"manifests":[{{"digest":"sha256:x","size":{}}}]}}"#,
            "9".repeat(n)
        )
        .into_bytes()),
        Just(br#"{"manifests":[{"digest":"sha256:x","size":-0.0}]}"#.to_vec()),
        Just(b"\xef\xbb\xbf{}".to_vec()),
        Just(br#"{"manifests":null}"#.to_vec()),
        Just(br#"{"manifests":[],"manifests":[1]}"#.to_vec()),
    ]
    .boxed()
}

/// Replaces `@blobN`, `@sizeN` and `@hexN` strings with facts about the N-th known blob.
fn substitute(v: &Value, known: &[(Digest, u64)]) -> Value {
    let pick = |rest: &str| -> Option<(Digest, u64)> {
        let n: usize = rest.parse().ok()?;
        (!known.is_empty()).then(|| known[n % known.len()])
    };
    match v {
        Value::String(s) => {
            if let Some((d, _)) = s.strip_prefix("@blob").and_then(pick) {
                Value::from(d.to_string())
            } else if let Some((_, n)) = s.strip_prefix("@size").and_then(pick) {
                Value::from(n)
            } else if let Some((d, _)) = s.strip_prefix("@hex").and_then(pick) {
                Value::from(d.hex())
            } else {
                v.clone()
            }
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, known)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), substitute(x, known)))
                .collect(),
        ),
        other => other.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Edits to a document
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    At(usize),
}

/// Sets (or, with `None`, removes) the value at `path`, making the containers on the way.
fn set_path(v: &mut Value, path: &[Seg], new: Option<Value>) {
    let Some((first, rest)) = path.split_first() else {
        *v = new.unwrap_or(Value::Null);
        return;
    };
    match first {
        Seg::Key(k) => {
            if !v.is_object() {
                *v = Value::Object(Map::new());
            }
            let obj = v.as_object_mut().expect("object");
            if rest.is_empty() && new.is_none() {
                obj.remove(k);
            } else {
                set_path(obj.entry(k.clone()).or_insert(Value::Null), rest, new);
            }
        }
        Seg::At(i) => {
            if !v.is_array() {
                *v = Value::Array(Vec::new());
            }
            let arr = v.as_array_mut().expect("array");
            if rest.is_empty() && new.is_none() {
                if *i < arr.len() {
                    arr.remove(*i);
                }
            } else if *i < arr.len() {
                set_path(&mut arr[*i], rest, new);
            } else {
                arr.push(Value::Null);
                let last = arr.last_mut().expect("just pushed");
                set_path(last, rest, new);
            }
        }
    }
}

/// Paths the readers care about, in `/`-separated form.
const PATHS: &[&str] = &[
    "manifests",
    "manifests/0",
    "manifests/0/size",
    "manifests/0/digest",
    "manifests/0/mediaType",
    "manifests/0/platform",
    "manifests/0/platform/os",
    "manifests/0/annotations",
    "manifests/0/annotations/org.opencontainers.image.ref.name",
    "manifests/1",
    "manifests/1/size",
    "manifests/1/digest",
    "manifests/1/mediaType",
    "manifests/1/platform/architecture",
    "manifests/2/annotations/vnd.docker.reference.digest",
    "manifests/2/annotations/vnd.docker.reference.type",
    "manifests/3",
    "mediaType",
    "schemaVersion",
    "config",
    "config/size",
    "config/digest",
    "config/mediaType",
    "layers",
    "layers/0",
    "layers/0/size",
    "layers/0/digest",
    "layers/1/mediaType",
    "layers/1/size",
    "os",
    "architecture",
    "variant",
    "rootfs",
];

fn parse_path(p: &str) -> Vec<Seg> {
    p.split('/')
        .map(|s| match s.parse() {
            Ok(i) => Seg::At(i),
            Err(_) => Seg::Key(s.to_owned()),
        })
        .collect()
}

fn path() -> BoxedStrategy<Vec<Seg>> {
    prop_oneof![
        4 => select(PATHS).prop_map(parse_path),
        1 => prop::collection::vec(
            prop_oneof![key().prop_map(Seg::Key), (0usize..4).prop_map(Seg::At)],
            0..4,
        ),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
struct Edit {
    path: Vec<Seg>,
    value: Option<Value>,
}

fn edit() -> BoxedStrategy<Edit> {
    let value = prop_oneof![
        3 => size_value(),
        2 => digest_value(),
        2 => media_type_value(),
        2 => descriptor(),
        2 => json_value(),
        1 => platform_value(),
        1 => annotations_value(),
    ];
    (path(), prop::option::weighted(0.9, value))
        .prop_map(|(path, value)| Edit { path, value })
        .boxed()
}

/// Damage to bytes after they are serialized.
#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, xor: u8 },
    Truncate(usize),
    Append(Vec<u8>),
}

fn damage() -> BoxedStrategy<Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Damage::Flip { at, xor }),
        any::<usize>().prop_map(Damage::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
    ]
    .boxed()
}

fn apply_damage(bytes: &mut Vec<u8>, d: &Damage) {
    match d {
        Damage::Flip { at, xor } => {
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] ^= xor;
            }
        }
        Damage::Truncate(n) => {
            let keep = n % (bytes.len() + 1);
            bytes.truncate(keep);
        }
        Damage::Append(tail) => bytes.extend_from_slice(tail),
    }
}

/// What happens to one JSON document of the layout.
#[derive(Debug, Clone)]
enum Body {
    /// The fixture's document (with its references kept up to date).
    Keep,
    Json(Value),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
struct DocPlan {
    body: Body,
    edits: Vec<Edit>,
    damage: Option<Damage>,
    /// Store the result under its own digest and point the referrer there, so the digest
    /// check passes and the parser sees the bytes; otherwise keep the old name.
    rename: bool,
}

fn doc_plan() -> BoxedStrategy<DocPlan> {
    let unchanged = DocPlan {
        body: Body::Keep,
        edits: Vec::new(),
        damage: None,
        rename: true,
    };
    let body = prop_oneof![
        3 => Just(Body::Keep),
        1 => json_value().prop_map(Body::Json),
        2 => document().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Body::Bytes),
        1 => awkward_json_bytes().prop_map(Body::Bytes),
    ];
    let changed = (
        body,
        prop::collection::vec(edit(), 0..4),
        prop::option::weighted(0.2, damage()),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(body, edits, damage, rename)| DocPlan {
            body,
            edits,
            damage,
            rename,
        });
    // Mostly one or two of a layout's documents change, so the walk gets past the others.
    prop_oneof![3 => Just(unchanged), 1 => changed].boxed()
}

/// The bytes `plan` makes of `default`, before damage and after.
fn render(default: &Value, plan: &DocPlan, known: &[(Digest, u64)]) -> (Vec<u8>, Vec<u8>) {
    let clean = match &plan.body {
        Body::Bytes(b) => b.clone(),
        body => {
            let mut v = match body {
                Body::Json(v) => substitute(v, known),
                _ => default.clone(),
            };
            for e in &plan.edits {
                let value = e.value.as_ref().map(|x| substitute(x, known));
                set_path(&mut v, &e.path, value);
            }
            serde_json::to_vec(&v).expect("json")
        }
    };
    let mut out = clean.clone();
    if let Some(d) = &plan.damage {
        apply_damage(&mut out, d);
    }
    (clean, out)
}

/// Every blob in the layout, in name order.
fn known_blobs(l: &Layout) -> Vec<(Digest, u64)> {
    let mut out: Vec<(Digest, u64)> = fs::read_dir(l.dir.join("blobs/sha256"))
        .expect("read blobs")
        .filter_map(|e| {
            let e = e.expect("dir entry");
            let d = format!("sha256:{}", e.file_name().to_string_lossy())
                .parse()
                .ok()?;
            Some((d, e.metadata().expect("metadata").len()))
        })
        .collect();
    out.sort();
    out
}

/// Writes the blob `plan` makes of `default`; returns what the referrer should say.
fn emit_blob(l: &Layout, default: &Value, plan: &DocPlan) -> (Digest, u64) {
    let (clean, out) = render(default, plan, &known_blobs(l));
    let name = if plan.rename { sha(&out) } else { sha(&clean) };
    fs::write(l.blob_path(&name), &out).expect("write blob");
    (name, out.len() as u64)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("read json")).expect("parse json")
}

fn platform_filter() -> BoxedStrategy<Vec<Platform>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => prop::sample::subsequence(
            vec![
                "linux/amd64",
                "linux/arm64",
                "linux/arm64/v8",
                "linux/arm/v7",
                "unknown/unknown",
                "windows/amd64",
            ],
            1..=3,
        )
        .prop_map(|ps| ps.iter().map(|p| p.parse().expect("platform")).collect()),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Checks on an Ok result
// ---------------------------------------------------------------------------------------------

/// A regular member of a tar, as the tar crate reads it.
#[derive(Debug)]
struct TarMember {
    name: Vec<u8>,
    offset: u64,
    size: u64,
    regular: bool,
}

/// The members the tar crate yields before its first error.
fn tar_members(bytes: &[u8]) -> Vec<TarMember> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(Cursor::new(bytes));
    let Ok(entries) = ar.entries_with_seek() else {
        return out;
    };
    for e in entries {
        let Ok(e) = e else { break };
        let kind = e.header().entry_type();
        out.push(TarMember {
            name: e.path_bytes().into_owned(),
            offset: e.raw_file_position(),
            size: e.size(),
            regular: kind.is_file() || kind.is_contiguous(),
        });
    }
    out
}

/// Absolute, or with a `..` component.
fn is_unsafe(name: &[u8]) -> bool {
    name.first() == Some(&b'/') || name.split(|b| *b == b'/').any(|c| c == b"..")
}

/// Where a source's bytes live, for checking `Content::File` against.
enum Origin<'a> {
    Dir(&'a Layout),
    Tar(&'a Path, &'a [TarMember]),
}

fn check_resolved(r: &Resolved, origin: &Origin<'_>) -> Result<(), TestCaseError> {
    let mut seen = std::collections::BTreeMap::new();
    for b in &r.blobs {
        let text = b.digest.to_string();
        prop_assert!(
            text.len() == 71
                && text.starts_with("sha256:")
                && text[7..]
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "malformed digest {text}"
        );
        prop_assert_eq!(text.parse::<Digest>().ok(), Some(b.digest));
        // "Each once" is what `Resolved` promises, but a docker layer equal to the config is
        // listed twice (see `docker_layer_equal_to_config_is_listed_once`); the writer only
        // needs one size per digest.
        if let Some(size) = seen.insert(b.digest, b.size) {
            prop_assert_eq!(
                size,
                b.size,
                "blob {} listed twice with two sizes",
                b.digest
            );
        }
        match (&b.content, origin) {
            (Content::Bytes(bytes), _) => {
                prop_assert_eq!(bytes.len() as u64, b.size, "size of {}", b.digest);
                prop_assert_eq!(sha(bytes), b.digest);
            }
            (Content::File { path, offset }, Origin::Dir(l)) => {
                prop_assert_eq!(path, &l.blob_path(&b.digest));
                prop_assert_eq!(*offset, 0);
                let len = fs::metadata(path).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(len.len(), b.size, "size of {}", b.digest);
            }
            (Content::File { path, offset }, Origin::Tar(tar, members)) => {
                prop_assert_eq!(path, tar);
                let m = members.iter().find(|m| m.offset == *offset && m.regular);
                prop_assert!(
                    m.is_some_and(|m| m.size == b.size && !is_unsafe(&m.name)),
                    "blob {} at offset {offset} is not a safe member of that size: {m:?}",
                    b.digest
                );
            }
        }
    }
    let top = r.blobs.iter().find(|b| b.digest == r.image.digest);
    prop_assert!(
        top.is_some_and(|b| b.size == r.image.size),
        "the image {} is not among its blobs with size {}",
        r.image.digest,
        r.image.size
    );
    Ok(())
}

fn digests(r: &Resolved) -> BTreeSet<Digest> {
    r.blobs.iter().map(|b| b.digest).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. OCI layouts, as a directory and as an oci-archive
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct LayoutPlan {
    config: DocPlan,
    manifest: DocPlan,
    index: DocPlan,
    index_json: DocPlan,
    /// Indexes wrapped around the image index.
    depth: usize,
    oci_layout: Option<Vec<u8>>,
    tag: Option<String>,
    platforms: Vec<Platform>,
}

fn layout_plan() -> BoxedStrategy<LayoutPlan> {
    (
        doc_plan(),
        doc_plan(),
        doc_plan(),
        doc_plan(),
        prop_oneof![3 => Just(0usize), 1 => 0usize..12],
        prop::option::weighted(
            0.05,
            prop_oneof![
                json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
                Just(br#"{"imageLayoutVersion":"2.0.0"}"#.to_vec()),
                Just(br#"{"imageLayoutVersion":1}"#.to_vec()),
                prop::collection::vec(any::<u8>(), 0..40),
            ],
        ),
        prop_oneof![
            2 => Just(None),
            2 => Just(Some("1.0".to_owned())),
            1 => string().prop_map(Some),
        ],
        platform_filter(),
    )
        .prop_map(
            |(config, manifest, index, index_json, depth, oci_layout, tag, platforms)| LayoutPlan {
                config,
                manifest,
                index,
                index_json,
                depth,
                oci_layout,
                tag,
                platforms,
            },
        )
        .boxed()
}

/// An index over an amd64 image (its config and manifest written through the plan), an
/// arm64/v8 image and an attestation, wrapped in `depth` more indexes, tagged `1.0`.
fn build_layout(dir: &Path, plan: &LayoutPlan) -> Layout {
    let l = Layout::new(&dir.join("layout"));
    let amd = l.image("linux/amd64", &["a", "shared"]);
    let arm = l.image("linux/arm64/v8", &["b", "shared"]);
    let att = l.image("unknown/unknown", &["attestation"]);

    let (config, config_size) = emit_blob(&l, &read_json(&l.blob_path(&amd.config)), &plan.config);
    let mut manifest = read_json(&l.blob_path(&amd.manifest));
    manifest["config"]["digest"] = json!(config.to_string());
    manifest["config"]["size"] = json!(config_size);
    let (manifest, manifest_size) = emit_blob(&l, &manifest, &plan.manifest);

    let mut amd_desc = amd.descriptor(true);
    amd_desc["digest"] = json!(manifest.to_string());
    amd_desc["size"] = json!(manifest_size);
    let mut att_desc = att.descriptor(false);
    att_desc["platform"] = json!({"os": "unknown", "architecture": "unknown"});
    att_desc["annotations"] = json!({
        "vnd.docker.reference.type": "attestation-manifest",
        "vnd.docker.reference.digest": manifest.to_string(),
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [amd_desc, arm.descriptor(true), att_desc],
    });
    let (mut top, mut top_size) = emit_blob(&l, &index, &plan.index);
    for _ in 0..plan.depth {
        let d = l.index(vec![
            json!({"mediaType": OCI_INDEX, "digest": top.to_string(), "size": top_size}),
        ]);
        top = d["digest"]
            .as_str()
            .expect("digest")
            .parse()
            .expect("digest");
        top_size = d["size"].as_u64().expect("size");
    }

    let index_json = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_INDEX,
            "digest": top.to_string(),
            "size": top_size,
            "annotations": {"org.opencontainers.image.ref.name": "1.0"},
        }],
    });
    let (_, bytes) = render(&index_json, &plan.index_json, &known_blobs(&l));
    fs::write(l.dir.join("index.json"), bytes).expect("write index.json");
    if let Some(b) = &plan.oci_layout {
        fs::write(l.dir.join("oci-layout"), b).expect("write oci-layout");
    }
    l
}

/// Resolves the layout both as a directory and as an oci-archive of it: neither panics, an Ok
/// result is well formed, and both read the same image.
fn resolve_both(
    dir: &Path,
    l: &Layout,
    tag: Option<&str>,
    platforms: &[Platform],
) -> Result<bool, TestCaseError> {
    let tar = dir.join("layout.tar");
    tar_dir(&l.dir, &tar);
    let tag = tag.map(str::to_owned);
    let from_dir = resolve(
        NAME,
        &SourceSpec::OciLayout {
            path: l.dir.clone(),
            tag: tag.clone(),
        },
        platforms,
    );
    let from_tar = resolve(
        NAME,
        &SourceSpec::OciArchive {
            path: tar.clone(),
            tag,
        },
        platforms,
    );
    if let Ok(r) = &from_dir {
        check_resolved(r, &Origin::Dir(l))?;
    }
    if let Ok(r) = &from_tar {
        let bytes = fs::read(&tar).expect("read tar");
        check_resolved(r, &Origin::Tar(&tar, &tar_members(&bytes)))?;
    }
    match (&from_dir, &from_tar) {
        (Ok(a), Ok(b)) => {
            prop_assert_eq!(a.image.digest, b.image.digest);
            prop_assert_eq!(&a.image.platforms, &b.image.platforms);
            prop_assert_eq!(digests(a), digests(b));
        }
        (Err(a), Err(b)) => {
            prop_assert!(!a.to_string().is_empty() && !b.to_string().is_empty());
        }
        (a, b) => prop_assert!(false, "directory gave {a:?}, archive gave {b:?}"),
    }
    Ok(from_dir.is_ok())
}

#[test]
fn unmutated_plan_resolves() {
    let keep = DocPlan {
        body: Body::Keep,
        edits: Vec::new(),
        damage: None,
        rename: true,
    };
    for depth in [0, 3] {
        let dir = tempfile::tempdir().unwrap();
        let plan = LayoutPlan {
            config: keep.clone(),
            manifest: keep.clone(),
            index: keep.clone(),
            index_json: keep.clone(),
            depth,
            oci_layout: None,
            tag: None,
            platforms: Vec::new(),
        };
        let l = build_layout(dir.path(), &plan);
        assert!(resolve_both(dir.path(), &l, None, &[]).unwrap());
        let amd = ["linux/amd64".parse().unwrap()];
        assert!(resolve_both(dir.path(), &l, Some("1.0"), &amd).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(192), ..ProptestConfig::default() })]

    /// Mutated layouts: documents replaced by arbitrary JSON or bytes (under their new digest,
    /// so the parser is reached), fields edited to hostile values, bytes flipped, truncated,
    /// nested indexes.
    #[test]
    fn mutated_layouts_resolve_or_fail_cleanly(plan in layout_plan()) {
        let dir = tempfile::tempdir().unwrap();
        let l = build_layout(dir.path(), &plan);
        resolve_both(dir.path(), &l, plan.tag.as_deref(), &plan.platforms)?;
    }

    /// `index.json` is whatever bytes or JSON there are.
    #[test]
    fn any_index_json_resolves_or_fails_cleanly(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
            json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
            document().prop_map(|v| serde_json::to_vec(&v).expect("json")),
            awkward_json_bytes(),
        ],
        tag in prop::option::of(select(vec!["1.0", "", "latest"])),
        platforms in platform_filter(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(&dir.path().join("layout"));
        let a = l.image("linux/amd64", &["a"]);
        let idx = l.index(vec![a.descriptor(true)]);
        l.finish(vec![(idx, Some("1.0"))]);
        // `@blobN` in the bytes is not substituted here; document() output is, via re-parse.
        let bytes = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => serde_json::to_vec(&substitute(&v, &known_blobs(&l))).expect("json"),
            Err(_) => bytes,
        };
        fs::write(l.dir.join("index.json"), &bytes).unwrap();
        resolve_both(dir.path(), &l, tag, &platforms)?;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. oci-archive and docker-archive: arbitrary files, hostile members, arbitrary manifest.json
// ---------------------------------------------------------------------------------------------

/// How a member name is stored.
#[derive(Debug, Clone, Copy)]
enum NameEnc {
    /// In the 100-byte header field (cut to fit).
    Plain,
    /// In a GNU long-name entry before the header.
    GnuLong,
    /// In a PAX extended header.
    Pax,
}

/// A member name: from a pool of hostile and useful names, or a name of the base archive.
#[derive(Debug, Clone)]
enum NameSrc {
    Pool(&'static str),
    Existing(usize),
    Bytes(Vec<u8>),
    /// `n` components, optionally with a `..` in the middle.
    Long(usize, bool),
}

const SAFE_NAMES: &[&str] = &[
    "manifest.json",
    "./manifest.json",
    "index.json",
    "oci-layout",
    "config.json",
    "@cfg.json",
    "blobs/sha256/@layer",
    "aaa/layer.tar",
    "bbb/layer.tar",
    "repositories",
    "",
    ".",
    "./",
    "/./",
    "dir/",
    "link",
    "C:\\evil",
    "..\\evil",
    "...",
    "..a",
];

const UNSAFE_NAMES: &[&str] = &[
    "..",
    "../",
    "../manifest.json",
    "../../etc/passwd",
    "/etc/passwd",
    "/manifest.json",
    "/",
    "//",
    "./..",
    "a/../../b",
    "a/../manifest.json",
    "aaa/..",
    "blobs/sha256/..",
];

fn name_src() -> BoxedStrategy<NameSrc> {
    prop_oneof![
        6 => select(SAFE_NAMES).prop_map(NameSrc::Pool),
        2 => select(UNSAFE_NAMES).prop_map(NameSrc::Pool),
        6 => (0usize..64).prop_map(NameSrc::Existing),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(NameSrc::Bytes),
        1 => (20usize..120, prop::bool::weighted(0.3)).prop_map(|(n, dd)| NameSrc::Long(n, dd)),
    ]
    .boxed()
}

/// Names of the base archive and the hex the `@` names stand for.
struct NameCtx<'a> {
    existing: &'a [Vec<u8>],
    cfg_hex: String,
    layer_hex: String,
}

impl NameSrc {
    fn bytes(&self, ctx: &NameCtx<'_>) -> Vec<u8> {
        match self {
            NameSrc::Pool(s) => s
                .replace("@cfg", &ctx.cfg_hex)
                .replace("@layer", &ctx.layer_hex)
                .into_bytes(),
            NameSrc::Existing(i) if !ctx.existing.is_empty() => {
                ctx.existing[i % ctx.existing.len()].clone()
            }
            NameSrc::Existing(_) => b"manifest.json".to_vec(),
            NameSrc::Bytes(b) => b.clone(),
            NameSrc::Long(n, dotdot) => {
                let mut parts = vec!["d"; *n];
                if *dotdot {
                    parts[n / 2] = "..";
                }
                parts.push("layer.tar");
                parts.join("/").into_bytes()
            }
        }
    }
}

#[derive(Debug, Clone)]
enum KindSpec {
    Regular,
    Contiguous,
    Directory,
    Symlink(NameSrc),
    Hardlink(NameSrc),
    Fifo,
    Sparse,
}

fn kind_spec() -> BoxedStrategy<KindSpec> {
    prop_oneof![
        6 => Just(KindSpec::Regular),
        1 => Just(KindSpec::Contiguous),
        1 => Just(KindSpec::Directory),
        2 => name_src().prop_map(KindSpec::Symlink),
        2 => name_src().prop_map(KindSpec::Hardlink),
        1 => Just(KindSpec::Fifo),
        1 => Just(KindSpec::Sparse),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
enum DataSrc {
    Existing(usize),
    Json(Value),
    Bytes(Vec<u8>),
    Layer,
    GzLayer,
    Config,
}

fn data_src() -> BoxedStrategy<DataSrc> {
    prop_oneof![
        2 => (0usize..64).prop_map(DataSrc::Existing),
        2 => json_value().prop_map(DataSrc::Json),
        1 => document().prop_map(DataSrc::Json),
        2 => prop::collection::vec(any::<u8>(), 0..200).prop_map(DataSrc::Bytes),
        1 => select(vec![
            b"\xfd7zXZ\0rest".to_vec(),
            b"BZh91AY&SY".to_vec(),
            vec![0x28, 0xb5, 0x2f, 0xfd, 0],
            vec![0x1f, 0x8b, 8, 0],
        ])
        .prop_map(DataSrc::Bytes),
        1 => Just(DataSrc::Layer),
        1 => Just(DataSrc::GzLayer),
        1 => Just(DataSrc::Config),
    ]
    .boxed()
}

/// One member to write.
#[derive(Debug, Clone)]
struct MemberSpec {
    name: NameSrc,
    enc: NameEnc,
    kind: KindSpec,
    data: DataSrc,
    /// A size in the header other than the data's length.
    size_lie: Option<u64>,
}

fn member_spec() -> BoxedStrategy<MemberSpec> {
    (
        name_src(),
        prop_oneof![
            4 => Just(NameEnc::Plain),
            1 => Just(NameEnc::GnuLong),
            1 => Just(NameEnc::Pax),
        ],
        kind_spec(),
        data_src(),
        prop::option::weighted(
            0.1,
            prop_oneof![
                0u64..2048,
                select(vec![
                    (1u64 << 33) - 1,
                    1 << 40,
                    u64::MAX >> 1,
                    u64::MAX - 511,
                    u64::MAX
                ]),
            ],
        ),
    )
        .prop_map(|(name, enc, kind, data, size_lie)| MemberSpec {
            name,
            enc,
            kind,
            data,
            size_lie,
        })
        .boxed()
}

/// A base member, already concrete.
#[derive(Debug, Clone)]
struct Raw {
    name: Vec<u8>,
    enc: NameEnc,
    kind: tar::EntryType,
    link: Option<Vec<u8>>,
    data: Vec<u8>,
    size_lie: Option<u64>,
}

impl Raw {
    fn file(name: &str, data: Vec<u8>) -> Raw {
        Raw {
            name: name.as_bytes().to_vec(),
            enc: NameEnc::Plain,
            kind: tar::EntryType::Regular,
            link: None,
            data,
            size_lie: None,
        }
    }
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

fn push_entry(out: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    pad(out);
}

/// A GNU `././@LongLink` entry of type `kind` holding `value`.
fn push_gnu_long(out: &mut Vec<u8>, kind: tar::EntryType, value: &[u8]) {
    let mut h = tar::Header::new_gnu();
    let label = b"././@LongLink";
    h.as_old_mut().name[..label.len()].copy_from_slice(label);
    h.set_entry_type(kind);
    h.set_size(value.len() as u64 + 1);
    h.set_mode(0o644);
    h.set_cksum();
    let mut data = value.to_vec();
    data.push(0);
    push_entry(out, &h, &data);
}

/// A PAX record `LEN key=value\n`, its length counting its own digits.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() + body != len {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// Writes `m` exactly as given: no cleaning of names, sizes as stated.
fn push_raw(out: &mut Vec<u8>, m: &Raw) {
    let long_name = m.name.len() > 100;
    match m.enc {
        NameEnc::GnuLong => push_gnu_long(out, tar::EntryType::GNULongName, &m.name),
        NameEnc::Plain if long_name => {
            push_gnu_long(out, tar::EntryType::GNULongName, &m.name);
        }
        NameEnc::Pax => {
            let mut h = tar::Header::new_ustar();
            h.as_old_mut().name[..9].copy_from_slice(b"PaxHeader");
            h.set_entry_type(tar::EntryType::XHeader);
            let mut data = pax_record("path", &m.name);
            if let Some(l) = &m.link {
                data.extend(pax_record("linkpath", l));
            }
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            push_entry(out, &h, &data);
        }
        NameEnc::Plain => {}
    }
    if let Some(l) = &m.link
        && l.len() > 100
        && !matches!(m.enc, NameEnc::Pax)
    {
        push_gnu_long(out, tar::EntryType::GNULongLink, l);
    }
    let mut h = tar::Header::new_gnu();
    let n = m.name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&m.name[..n]);
    if let Some(l) = &m.link {
        let n = l.len().min(100);
        h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
    }
    h.set_entry_type(m.kind);
    h.set_size(m.size_lie.unwrap_or(m.data.len() as u64));
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    push_entry(out, &h, &m.data);
}

/// How the archive ends.
#[derive(Debug, Clone)]
enum Tail {
    End,
    Nothing,
    Garbage(Vec<u8>),
}

fn tail() -> BoxedStrategy<Tail> {
    prop_oneof![
        4 => Just(Tail::End),
        1 => Just(Tail::Nothing),
        1 => prop::collection::vec(any::<u8>(), 1..700).prop_map(Tail::Garbage),
    ]
    .boxed()
}

/// Changes to a base archive.
#[derive(Debug, Clone)]
struct TarPlan {
    /// Members inserted at positions (mod the member count).
    extra: Vec<(usize, MemberSpec)>,
    /// Base members replaced.
    replace: Vec<(usize, MemberSpec)>,
    drop: Option<usize>,
    tail: Tail,
}

fn tar_plan() -> BoxedStrategy<TarPlan> {
    (
        prop::collection::vec((any::<usize>(), member_spec()), 0..3),
        prop_oneof![
            2 => Just(Vec::new()),
            1 => prop::collection::vec((any::<usize>(), member_spec()), 1..3),
        ],
        prop::option::weighted(0.1, any::<usize>()),
        tail(),
    )
        .prop_map(|(extra, replace, drop, tail)| TarPlan {
            extra,
            replace,
            drop,
            tail,
        })
        .boxed()
}

/// A docker-save config and the two layers a base docker archive holds.
struct DockerParts {
    config: Vec<u8>,
    layer: Vec<u8>,
    gz: Vec<u8>,
}

fn docker_parts() -> &'static DockerParts {
    static PARTS: OnceLock<DockerParts> = OnceLock::new();
    PARTS.get_or_init(|| {
        let layer = layer_tar(&[("etc/hello", b"hello")]);
        let inner = layer_tar(&[("bin/tool", b"#!/bin/sh\n")]);
        let gz = gzip(&inner);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(&layer).to_string(), sha(&inner).to_string()]},
        }))
        .expect("config json");
        DockerParts { config, layer, gz }
    })
}

impl DataSrc {
    fn bytes(&self, existing: &[Raw]) -> Vec<u8> {
        let p = docker_parts();
        match self {
            DataSrc::Existing(i) if !existing.is_empty() => {
                existing[i % existing.len()].data.clone()
            }
            DataSrc::Existing(_) => Vec::new(),
            DataSrc::Json(v) => serde_json::to_vec(v).expect("json"),
            DataSrc::Bytes(b) => b.clone(),
            DataSrc::Layer => p.layer.clone(),
            DataSrc::GzLayer => p.gz.clone(),
            DataSrc::Config => p.config.clone(),
        }
    }
}

impl MemberSpec {
    fn raw(&self, base: &[Raw], ctx: &NameCtx<'_>) -> Raw {
        let (kind, link) = match &self.kind {
            KindSpec::Regular => (tar::EntryType::Regular, None),
            KindSpec::Contiguous => (tar::EntryType::Continuous, None),
            KindSpec::Directory => (tar::EntryType::Directory, None),
            KindSpec::Symlink(t) => (tar::EntryType::Symlink, Some(t.bytes(ctx))),
            KindSpec::Hardlink(t) => (tar::EntryType::Link, Some(t.bytes(ctx))),
            KindSpec::Fifo => (tar::EntryType::Fifo, None),
            KindSpec::Sparse => (tar::EntryType::GNUSparse, None),
        };
        let data = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.data.bytes(base)
            }
            _ => Vec::new(),
        };
        Raw {
            name: self.name.bytes(ctx),
            enc: self.enc,
            kind,
            link,
            data,
            size_lie: self.size_lie,
        }
    }
}

/// The base archive with `plan` applied, as bytes.
fn assemble(base: &[Raw], plan: &TarPlan) -> Vec<u8> {
    let p = docker_parts();
    let names: Vec<Vec<u8>> = base.iter().map(|m| m.name.clone()).collect();
    let ctx = NameCtx {
        existing: &names,
        cfg_hex: sha(&p.config).hex(),
        layer_hex: sha(&p.layer).hex(),
    };
    let mut members = base.to_vec();
    for (i, spec) in &plan.replace {
        if !members.is_empty() {
            let at = i % members.len();
            members[at] = spec.raw(base, &ctx);
        }
    }
    if let Some(i) = plan.drop
        && !members.is_empty()
    {
        let at = i % members.len();
        members.remove(at);
    }
    for (i, spec) in &plan.extra {
        let at = i % (members.len() + 1);
        members.insert(at, spec.raw(base, &ctx));
    }
    let mut out = Vec::new();
    for m in &members {
        push_raw(&mut out, m);
    }
    match &plan.tail {
        Tail::End => out.extend_from_slice(&[0u8; 1024]),
        Tail::Nothing => {}
        Tail::Garbage(g) => out.extend_from_slice(g),
    }
    out
}

/// The members of a valid OCI layout (index over two platforms, tagged `1.0`), names `./`-led.
fn oci_base() -> &'static [Raw] {
    static BASE: OnceLock<Vec<Raw>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(dir.path());
        let a = l.image("linux/amd64", &["a", "shared"]);
        let b = l.image("linux/arm64/v8", &["b", "shared"]);
        let idx = l.index(vec![a.descriptor(true), b.descriptor(true)]);
        l.finish(vec![(idx, Some("1.0"))]);
        let mut out = vec![
            Raw::file(
                "./oci-layout",
                fs::read(l.dir.join("oci-layout")).expect("read"),
            ),
            Raw::file(
                "./index.json",
                fs::read(l.dir.join("index.json")).expect("read"),
            ),
        ];
        for (d, _) in known_blobs(&l) {
            out.push(Raw::file(
                &format!("./blobs/sha256/{}", d.hex()),
                fs::read(l.blob_path(&d)).expect("read"),
            ));
        }
        out
    })
}

/// A `docker save` archive: config named by its digest, a plain and a gzip layer, one of
/// them reached through a symlink.
fn docker_base(manifest: &[u8]) -> Vec<Raw> {
    let p = docker_parts();
    let mut link = Raw::file("ccc/layer.tar", Vec::new());
    link.kind = tar::EntryType::Symlink;
    link.link = Some(b"../aaa/layer.tar".to_vec());
    vec![
        Raw::file("aaa/layer.tar", p.layer.clone()),
        Raw::file("bbb/layer.tar", p.gz.clone()),
        link,
        Raw::file(&format!("{}.json", sha(&p.config).hex()), p.config.clone()),
        Raw::file("manifest.json", manifest.to_vec()),
    ]
}

fn default_docker_manifest() -> Value {
    json!([{
        "Config": format!("{}.json", sha(&docker_parts().config).hex()),
        "RepoTags": ["app:1.0"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }])
}

/// A `manifest.json`: the valid one, a hostile variant of its shape, any JSON, or bytes.
fn docker_manifest() -> BoxedStrategy<Vec<u8>> {
    let entry = (
        prop_oneof![
            3 => name_src().prop_map(|n| Value::from(String::from_utf8_lossy(&n.bytes(&NameCtx {
                existing: &[],
                cfg_hex: sha(&docker_parts().config).hex(),
                layer_hex: sha(&docker_parts().layer).hex(),
            })).into_owned())),
            1 => Just(Value::from(format!("{}.json", sha(&docker_parts().config).hex()))),
            1 => json_value(),
        ],
        prop::option::of(prop_oneof![
            prop::collection::vec(string(), 0..3).prop_map(Value::from),
            json_value(),
        ]),
        prop::option::of(prop_oneof![
            prop::collection::vec(
                select(vec![
                    "aaa/layer.tar",
                    "bbb/layer.tar",
                    "ccc/layer.tar",
                    "./aaa/layer.tar",
                    "../aaa/layer.tar",
                    "/aaa/layer.tar",
                    "manifest.json",
                    "",
                    "nope",
                ]),
                0..5,
            )
            .prop_map(Value::from),
            json_value(),
        ]),
    )
        .prop_map(|(config, tags, layers)| {
            let mut m = Map::new();
            m.insert("Config".into(), config);
            if let Some(t) = tags {
                m.insert("RepoTags".into(), t);
            }
            if let Some(l) = layers {
                m.insert("Layers".into(), l);
            }
            Value::Object(m)
        });
    prop_oneof![
        3 => Just(serde_json::to_vec(&default_docker_manifest()).expect("json")),
        3 => prop::collection::vec(entry, 0..3).prop_map(|e| serde_json::to_vec(&e).expect("json")),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        1 => prop::collection::vec(any::<u8>(), 0..100),
        1 => awkward_json_bytes(),
    ]
    .boxed()
}

fn reference() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        3 => Just(None),
        1 => select(vec!["app:1.0", "docker.io/library/app:1.0", "@0", "@1", "@18446744073709551616", "@", "@-1"])
            .prop_map(|s| Some(s.to_owned())),
        1 => string().prop_map(Some),
    ]
    .boxed()
}

/// Resolves `bytes` as `spec`'s kind of archive: no panic, an unsafe member name means an
/// error, and an Ok result reads only safe regular members.
fn resolve_archive(
    path: &Path,
    bytes: &[u8],
    spec: &SourceSpec,
    platforms: &[Platform],
) -> Result<bool, TestCaseError> {
    fs::write(path, bytes).expect("write archive");
    let got = resolve(NAME, spec, platforms);
    let members = tar_members(bytes);
    if let Some(bad) = members.iter().find(|m| is_unsafe(&m.name)) {
        prop_assert!(
            got.is_err(),
            "member {:?} is unsafe, yet the archive resolved",
            String::from_utf8_lossy(&bad.name)
        );
    }
    match &got {
        Ok(r) => check_resolved(r, &Origin::Tar(path, &members))?,
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(got.is_ok())
}

fn oci_archive_spec(path: &Path, tag: Option<String>) -> SourceSpec {
    SourceSpec::OciArchive {
        path: path.to_owned(),
        tag,
    }
}

fn docker_archive_spec(path: &Path, reference: Option<String>) -> SourceSpec {
    SourceSpec::DockerArchive {
        path: path.to_owned(),
        reference,
    }
}

#[test]
fn base_archives_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar");
    let none = TarPlan {
        extra: Vec::new(),
        replace: Vec::new(),
        drop: None,
        tail: Tail::End,
    };
    let oci = assemble(oci_base(), &none);
    assert!(resolve_archive(&path, &oci, &oci_archive_spec(&path, None), &[]).unwrap());
    let manifest = serde_json::to_vec(&default_docker_manifest()).unwrap();
    let docker = assemble(&docker_base(&manifest), &none);
    assert!(resolve_archive(&path, &docker, &docker_archive_spec(&path, None), &[]).unwrap());
}

/// Flips, truncation and splices of a valid archive.
#[derive(Debug, Clone)]
struct ByteMutation {
    flips: Vec<(usize, u8)>,
    truncate: Option<usize>,
    splice: Option<(usize, Vec<u8>)>,
}

fn byte_mutation() -> BoxedStrategy<ByteMutation> {
    (
        prop::collection::vec((any::<usize>(), 1u8..=255), 0..8),
        prop::option::weighted(0.3, any::<usize>()),
        prop::option::weighted(
            0.2,
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64)),
        ),
    )
        .prop_map(|(flips, truncate, splice)| ByteMutation {
            flips,
            truncate,
            splice,
        })
        .boxed()
}

impl ByteMutation {
    fn apply(&self, mut b: Vec<u8>) -> Vec<u8> {
        for (at, xor) in &self.flips {
            if !b.is_empty() {
                let i = at % b.len();
                b[i] ^= xor;
            }
        }
        if let Some((at, bytes)) = &self.splice {
            let at = at % (b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        if let Some(n) = self.truncate {
            let keep = n % (b.len() + 1);
            b.truncate(keep);
        }
        b
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    /// Arbitrary files, and valid archives with bytes flipped, cut or spliced.
    #[test]
    fn any_archive_file_resolves_or_fails_cleanly(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..3000),
            (1usize..8).prop_map(|n| vec![0u8; 512 * n]),
        ],
        oci_mutation in byte_mutation(),
        docker_mutation in byte_mutation(),
        tag in reference(),
        platforms in platform_filter(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let none = TarPlan { extra: Vec::new(), replace: Vec::new(), drop: None, tail: Tail::End };
        let oci = oci_mutation.apply(assemble(oci_base(), &none));
        let manifest = serde_json::to_vec(&default_docker_manifest()).expect("json");
        let docker = docker_mutation.apply(assemble(&docker_base(&manifest), &none));
        for b in [&bytes, &oci, &docker] {
            resolve_archive(&path, b, &oci_archive_spec(&path, tag.clone()), &platforms)?;
            resolve_archive(&path, b, &docker_archive_spec(&path, tag.clone()), &platforms)?;
        }
    }

    /// An OCI layout tar with hostile members added or swapped in: `..` and absolute names,
    /// long, empty and non-UTF-8 names, links in and out, lying sizes.
    #[test]
    fn oci_archive_with_hostile_members(
        plan in tar_plan(),
        tag in prop::option::of(select(vec!["1.0", "2.0"]).prop_map(str::to_owned)),
        platforms in platform_filter(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let bytes = assemble(oci_base(), &plan);
        resolve_archive(&path, &bytes, &oci_archive_spec(&path, tag), &platforms)?;
    }

    /// A docker archive with an arbitrary `manifest.json` and hostile members.
    #[test]
    fn docker_archive_with_hostile_manifest_and_members(
        manifest in docker_manifest(),
        plan in tar_plan(),
        reference in reference(),
        platforms in platform_filter(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let bytes = assemble(&docker_base(&manifest), &plan);
        resolve_archive(&path, &bytes, &docker_archive_spec(&path, reference), &platforms)?;
    }
}

/// Every unsafe name in the pool, alone in an otherwise valid archive, makes resolve fail
/// with [`bundle_layout::Error::UnsafeMember`], however the name is stored.
#[test]
fn unsafe_member_names_are_refused_in_every_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar");
    let manifest = serde_json::to_vec(&default_docker_manifest()).unwrap();
    let mut names: Vec<Vec<u8>> = UNSAFE_NAMES.iter().map(|s| s.as_bytes().to_vec()).collect();
    names.push(NameSrc::Long(60, true).bytes(&NameCtx {
        existing: &[],
        cfg_hex: String::new(),
        layer_hex: String::new(),
    }));
    for name in names {
        for enc in [NameEnc::Plain, NameEnc::GnuLong, NameEnc::Pax] {
            let evil = Raw {
                name: name.clone(),
                enc,
                kind: tar::EntryType::Regular,
                link: None,
                data: b"{}".to_vec(),
                size_lie: None,
            };
            let label = String::from_utf8_lossy(&name).into_owned();
            for (mut base, spec) in [
                (oci_base().to_vec(), oci_archive_spec(&path, None)),
                (docker_base(&manifest), docker_archive_spec(&path, None)),
            ] {
                base.push(evil.clone());
                let mut bytes = Vec::new();
                for m in &base {
                    push_raw(&mut bytes, m);
                }
                bytes.extend_from_slice(&[0; 1024]);
                fs::write(&path, &bytes).unwrap();
                match resolve(NAME, &spec, &[]) {
                    Err(bundle_layout::Error::UnsafeMember { member, .. }) => {
                        assert_eq!(member.as_bytes(), &name[..], "{label} {enc:?}")
                    }
                    other => panic!("{label} {enc:?}: {other:?}"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Source strings and platforms
// ---------------------------------------------------------------------------------------------

fn spec_string() -> BoxedStrategy<String> {
    let piece = select(vec![
        "oci-layout",
        "oci",
        "oci-archive",
        "docker-archive",
        "docker",
        ":",
        ":",
        "/",
        "./",
        "..",
        "",
        "a",
        "1.0",
        "@0",
        "é",
        "\0",
        " ",
        "registry:5000/app",
    ]);
    prop_oneof![
        any::<String>(),
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat()),
    ]
    .boxed()
}

fn platform_string() -> BoxedStrategy<String> {
    let piece = select(vec![
        "linux", "amd64", "arm64", "v8", "/", "/", "//", "", "é", " ", "\0",
    ]);
    prop_oneof![
        any::<String>(),
        prop::collection::vec(piece, 0..7).prop_map(|p| p.concat()),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    /// Any string parses or is refused with a message; what parses prints back to itself.
    #[test]
    fn source_spec_parse_never_panics(s in spec_string()) {
        match SourceSpec::parse(&s) {
            Ok(spec) => {
                prop_assert!(!spec.path().as_os_str().is_empty());
                let again = SourceSpec::parse(&spec.to_string());
                prop_assert_eq!(again.ok(), Some(spec.clone()));
                let _ = spec.relative_to(Path::new("/base"));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn platform_parse_never_panics(s in platform_string()) {
        match s.parse::<Platform>() {
            Ok(p) => {
                prop_assert_eq!(p.to_string(), s);
                prop_assert!(p.matches(&p));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Findings, pinned: each fails today and passes once the library is fixed
// ---------------------------------------------------------------------------------------------

/// Found by `docker_archive_with_hostile_manifest_and_members`: a docker archive whose layer
/// has the same bytes as the config lists that digest twice in `Resolved::blobs` (once as a
/// layer, once as the config), though `Resolved` promises each blob once. `docker::resolve`
/// pushes the config without checking `seen`. The writer dedups it, keeping the layer's media
/// type for the config.
#[test]
fn docker_layer_equal_to_config_is_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar");
    let manifest = serde_json::to_vec(&default_docker_manifest()).unwrap();
    let mut members = docker_base(&manifest);
    members[0].data = docker_parts().config.clone(); // aaa/layer.tar
    let mut bytes = Vec::new();
    for m in &members {
        push_raw(&mut bytes, m);
    }
    bytes.extend_from_slice(&[0; 1024]);
    fs::write(&path, &bytes).unwrap();
    let r = resolve(NAME, &docker_archive_spec(&path, None), &[]).unwrap();
    let all: Vec<Digest> = r.blobs.iter().map(|b| b.digest).collect();
    assert_eq!(
        digests(&r).len(),
        all.len(),
        "a blob is listed twice: {all:?}"
    );
}

/// Found while writing these tests (not a panic: a hang): `Walk::visit` does not remember the
/// indexes and manifests it has read, so an index listing the same child `n` times, nested
/// `d` deep, makes `n^d` reads. Eight entries and seven levels (a few KB of JSON) take about
/// 90 s in a debug build; wider indexes never finish. Real images walk in milliseconds.
#[test]
fn repeated_index_entries_resolve_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::new(dir.path());
    let a = l.image("linux/amd64", &["a"]);
    let mut desc = a.descriptor(true);
    for _ in 0..7 {
        desc = l.index(vec![desc; 8]);
    }
    l.finish(vec![(desc, None)]);
    let spec = SourceSpec::OciLayout {
        path: l.dir.clone(),
        tag: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(resolve(NAME, &spec, &[]).map(|r| r.blobs.len()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(5)) {
        Ok(r) => assert!(r.is_ok(), "{r:?}"),
        Err(_) => panic!("resolving 8 small indexes took over 5 s"),
    }
}
