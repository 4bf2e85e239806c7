//! The e2e set: the images `cargo xtask e2e` deploys into a real cluster, made of a small
//! static program of ours (`e2e-hello`) so that they run on any linux/amd64 node.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::oci::{
    ConfigSpec, Descriptor, Layer, LayerTar, Layout, MEDIA_CONFIG, MEDIA_MANIFEST, append_file,
    config_json, manifest_json,
};
use crate::{Error, Result, marker};

/// `hello:1.0`: the program alone, `Cmd ["v1"]`.
pub const E2E_HELLO_1: &str = "example.com/e2e/hello:1.0";
/// `hello:2.0`: the program and a `/version` file, `Cmd ["v2"]`.
pub const E2E_HELLO_2: &str = "example.com/e2e/hello:2.0";
/// `data:1.0`: the program and a layer of incompressible bytes, `Cmd ["data"]`.
pub const E2E_DATA: &str = "example.com/e2e/data:1.0";
/// The size of `data:1.0`'s `/data.bin` when none is asked for: 64 MiB.
pub const E2E_DEFAULT_DATA_BYTES: u64 = 64 << 20;

/// The file beside the layout mapping each image name to its manifest digest, for scripts.
const DIGESTS_JSON: &str = "e2e.json";
const OUTPUTS: &[&str] = &[
    "layout",
    "bundle-v1.yaml",
    "bundle-v2.yaml",
    "bundle-hello.yaml",
    DIGESTS_JSON,
];

/// Where the program sits in every image.
const ENTRYPOINT: &str = "/hello";
/// `nobody:nogroup`, numeric, since the images have no `/etc/passwd`.
const USER: &str = "65534:65534";
/// The seed of `/data.bin`'s splitmix64 stream.
const DATA_SEED: u64 = 0xe2e0_da7a;

/// What [`e2e_set`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eSet {
    /// The directory holding everything below.
    #[serde(skip)]
    pub dir: PathBuf,
    /// `DIR/layout`: the OCI layout, each image tagged with its full name
    /// (`oci:DIR/layout:example.com/e2e/hello:1.0` in skopeo).
    #[serde(skip)]
    pub layout: PathBuf,
    /// `DIR/bundle-v1.yaml`: bundle `e2e` 1.0 with `hello:1.0` and `data:1.0`.
    #[serde(skip)]
    pub bundle_v1: PathBuf,
    /// `DIR/bundle-v2.yaml`: bundle `e2e` 2.0 with `hello:1.0`, `data:1.0` and `hello:2.0`.
    #[serde(skip)]
    pub bundle_v2: PathBuf,
    /// `DIR/bundle-hello.yaml`: bundle `e2e-hello` 1.0 with `hello:1.0` only.
    #[serde(skip)]
    pub bundle_hello: PathBuf,
    /// `DIR/e2e.json`: `{"images": {NAME: MANIFEST_DIGEST}}`.
    #[serde(skip)]
    pub digests_json: PathBuf,
    /// Whether an existing set was reused rather than written.
    #[serde(skip)]
    pub reused: bool,
    /// `sha256:<hex>` of the program the images hold.
    pub program_sha256: String,
    /// Size of `data:1.0`'s `/data.bin`.
    pub data_bytes: u64,
    /// `hello:1.0`, `hello:2.0`, `data:1.0`, in that order.
    pub images: Vec<E2eImage>,
}

impl E2eSet {
    fn with_paths(mut self, dir: &Path, reused: bool) -> Self {
        self.dir = dir.to_owned();
        self.layout = dir.join("layout");
        self.bundle_v1 = dir.join("bundle-v1.yaml");
        self.bundle_v2 = dir.join("bundle-v2.yaml");
        self.bundle_hello = dir.join("bundle-hello.yaml");
        self.digests_json = dir.join(DIGESTS_JSON);
        self.reused = reused;
        self
    }

    /// The image named `name` (for example [`E2E_HELLO_1`]).
    pub fn image(&self, name: &str) -> Option<&E2eImage> {
        self.images.iter().find(|i| i.name == name)
    }
}

/// One image of the e2e set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eImage {
    /// Its name, in the bundle files and as its tag in the layout.
    pub name: String,
    /// Its manifest.
    pub manifest: Descriptor,
    /// Its config.
    pub config: Descriptor,
    /// Its layers.
    pub layers: Vec<Descriptor>,
}

/// Writes the e2e set under `dir` and returns what it wrote: one OCI layout `DIR/layout` of
/// three linux/amd64 images whose entrypoint is `program` (as `/hello`, mode 0755, run as
/// `65534:65534`), the bundle files `bundle-v1.yaml`, `bundle-v2.yaml`, `bundle-hello.yaml`
/// beside it, and `e2e.json` with every manifest digest.
///
/// - [`E2E_HELLO_1`]: layer A (gzip, `/hello`), `Cmd ["v1"]`;
/// - [`E2E_HELLO_2`]: layer A and layer B (gzip, `/version` = `2.0\n`), `Cmd ["v2"]`;
/// - [`E2E_DATA`]: layer A and layer D (uncompressed tar, `/data.bin` of `data_bytes`
///   pseudo-random bytes, streamed), `Cmd ["data"]`.
///
/// Every byte depends only on `program` and `data_bytes`. When `dir` already holds a complete
/// e2e set of the same program and size made by this version, it is reused as is.
pub fn e2e_set(dir: &Path, program: &Path, data_bytes: u64) -> Result<E2eSet> {
    let bytes = fs::read(program).map_err(|e| Error::io(program, e))?;
    let program_sha256 = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if let Some(set) = marker::load::<E2eSet>(dir, "e2e", Some(data_bytes), OUTPUTS)
        && set.program_sha256 == program_sha256
    {
        return Ok(set.with_paths(dir, true));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    marker::clear(dir, OUTPUTS)?;
    let set = write(dir, &bytes, program_sha256, data_bytes)?.with_paths(dir, false);
    marker::save(dir, "e2e", Some(data_bytes), &set)?;
    Ok(set)
}

/// splitmix64 as a byte stream (each output little-endian), `left` bytes long: the same bytes
/// as [`noise`](crate::noise) without holding them.
struct Noise {
    state: u64,
    word: [u8; 8],
    /// Bytes of `word` already handed out.
    used: usize,
    left: u64,
}

impl Noise {
    fn new(seed: u64, len: u64) -> Self {
        Noise {
            state: seed,
            word: [0; 8],
            used: 8,
            left: len,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    }
}

impl Read for Noise {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.left).map_or(out.len(), |left| left.min(out.len()));
        let mut rest = &mut out[..n];
        // What is left of the last word, then whole words, then the start of a new one.
        let pending = (8 - self.used).min(rest.len());
        rest[..pending].copy_from_slice(&self.word[self.used..self.used + pending]);
        self.used += pending;
        rest = &mut rest[pending..];
        let mut chunks = rest.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            self.used = tail.len();
            tail.copy_from_slice(&self.word[..tail.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Appends `path` (mode 0644, fixed metadata as in [`append_file`]) with `len` bytes read
/// from `data`.
fn append_stream(b: &mut LayerTar, path: &str, len: u64, data: impl Read) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(len);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data)
}

/// Puts an image's config and manifest in the layout and tags it with `name`.
fn image(
    layout: &mut Layout,
    name: &str,
    cmd: &str,
    layers: &[(&Layer, &str)],
) -> Result<E2eImage> {
    let history: Vec<String> = layers
        .iter()
        .map(|(_, what)| format!("bundle-testimages e2e: {what}"))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|(l, _)| l.diff_id.clone()).collect();
    let mut config = config_json(
        &ConfigSpec {
            arch: "amd64",
            cmd: &[cmd],
            title: name,
            history: &history,
        },
        &diff_ids,
    );
    config["config"]["Entrypoint"] = json!([ENTRYPOINT]);
    config["config"]["User"] = json!(USER);
    let config = layout.put_json(MEDIA_CONFIG, &config)?;
    let descs: Vec<Descriptor> = layers.iter().map(|(l, _)| l.desc.clone()).collect();
    let manifest = layout.put_json(MEDIA_MANIFEST, &manifest_json(&config, &descs))?;
    layout.tag(name, &manifest);
    Ok(E2eImage {
        name: name.to_owned(),
        manifest,
        config,
        layers: descs,
    })
}

/// A `bundle.yaml` naming `images` from `DIR/layout` by their tags.
fn bundle_yaml(name: &str, version: &str, images: &[&str]) -> String {
    // Quoted: a bare 1.0 is a YAML number.
    let mut s = format!("name: {name}\nversion: \"{version}\"\nimages:\n");
    for i in images {
        s.push_str(&format!(
            "  - name: {i}\n    source: oci-layout:layout:{i}\n"
        ));
    }
    s
}

fn write(dir: &Path, program: &[u8], program_sha256: String, data_bytes: u64) -> Result<E2eSet> {
    let mut layout = Layout::create(&dir.join("layout"))?;
    let a = layout.put_layer(true, |t| append_file(t, "hello", 0o755, program))?;
    let b = layout.put_layer(true, |t| append_file(t, "version", 0o644, b"2.0\n"))?;
    let d = layout.put_layer(false, |t| {
        append_stream(t, "data.bin", data_bytes, Noise::new(DATA_SEED, data_bytes))
    })?;
    let hello = (&a, "/hello: the e2e-hello program");
    let images = vec![
        image(&mut layout, E2E_HELLO_1, "v1", &[hello])?,
        image(
            &mut layout,
            E2E_HELLO_2,
            "v2",
            &[hello, (&b, "/version: 2.0")],
        )?,
        image(
            &mut layout,
            E2E_DATA,
            "data",
            &[hello, (&d, "/data.bin: pseudo-random bytes")],
        )?,
    ];
    layout.finish()?;

    for (file, text) in [
        (
            "bundle-v1.yaml",
            bundle_yaml("e2e", "1.0", &[E2E_HELLO_1, E2E_DATA]),
        ),
        (
            "bundle-v2.yaml",
            bundle_yaml("e2e", "2.0", &[E2E_HELLO_1, E2E_DATA, E2E_HELLO_2]),
        ),
        (
            "bundle-hello.yaml",
            bundle_yaml("e2e-hello", "1.0", &[E2E_HELLO_1]),
        ),
    ] {
        let p = dir.join(file);
        fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    let digests: BTreeMap<&str, &str> = images
        .iter()
        .map(|i| (i.name.as_str(), i.manifest.digest.as_str()))
        .collect();
    let p = dir.join(DIGESTS_JSON);
    let mut text =
        serde_json::to_vec_pretty(&json!({ "images": digests })).map_err(|source| Error::Json {
            path: p.clone(),
            source,
        })?;
    text.push(b'\n');
    fs::write(&p, text).map_err(|e| Error::io(&p, e))?;

    Ok(E2eSet {
        dir: PathBuf::new(),
        layout: PathBuf::new(),
        bundle_v1: PathBuf::new(),
        bundle_v2: PathBuf::new(),
        bundle_hello: PathBuf::new(),
        digests_json: PathBuf::new(),
        reused: false,
        program_sha256,
        data_bytes,
        images,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::Value;

    use super::*;

    /// Every file under `root` with its bytes, by relative path.
    fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in fs::read_dir(dir).expect("read_dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).expect("under root").to_owned();
                    out.insert(rel, fs::read(&p).expect("read"));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    fn fake_program(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("program");
        fs::write(&p, bytes).expect("write program");
        p
    }

    #[test]
    fn noise_streams_the_bench_bytes() {
        let want = crate::noise(DATA_SEED, 1000);
        let mut got = Vec::new();
        let mut r = Noise::new(DATA_SEED, 1000);
        // Odd read sizes cross word boundaries everywhere.
        for size in [1usize, 3, 8, 5, 13, 64, 7].iter().cycle() {
            let mut buf = vec![0u8; *size];
            let n = r.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn deterministic_and_complete() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let program = fake_program(tmp.path(), b"\x7fELF fake");
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        let set = e2e_set(&one, &program, 10_000).expect("first");
        e2e_set(&two, &program, 10_000).expect("second");
        assert!(!set.reused);
        assert_eq!(tree(&one), tree(&two));

        let names: Vec<&str> = set.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, [E2E_HELLO_1, E2E_HELLO_2, E2E_DATA]);
        let hello = set.image(E2E_HELLO_1).expect("hello 1");
        let data = set.image(E2E_DATA).expect("data");
        assert_eq!(hello.layers.len(), 1);
        assert_eq!(data.layers[0], hello.layers[0]);
        assert_eq!(data.layers[1].media_type, crate::MEDIA_LAYER_TAR);
        // /data.bin's header, its bytes padded to the block, and the two end blocks.
        assert_eq!(data.layers[1].size, 512 + 10_240 + 1024);
        let blob = fs::read(one.join("layout").join(data.layers[1].layout_path())).expect("blob");
        let mut ar = tar::Archive::new(&blob[..]);
        let mut entry = ar
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("entry");
        assert_eq!(entry.path().expect("path").to_str(), Some("data.bin"));
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("content");
        assert_eq!(content, crate::noise(DATA_SEED, 10_000));

        let config: Value = serde_json::from_slice(
            &fs::read(one.join("layout").join(hello.config.layout_path())).expect("config"),
        )
        .expect("json");
        assert_eq!(config["config"]["Entrypoint"], json!(["/hello"]));
        assert_eq!(config["config"]["Cmd"], json!(["v1"]));
        assert_eq!(config["config"]["User"], json!("65534:65534"));

        let digests: Value =
            serde_json::from_slice(&fs::read(one.join("e2e.json")).expect("e2e.json"))
                .expect("json");
        assert_eq!(
            digests["images"][E2E_HELLO_2],
            json!(set.images[1].manifest.digest)
        );
        let v2 = fs::read_to_string(one.join("bundle-v2.yaml")).expect("yaml");
        assert!(v2.starts_with("name: e2e\nversion: \"2.0\"\n"), "{v2}");
        assert!(
            v2.contains("source: oci-layout:layout:example.com/e2e/hello:2.0\n"),
            "{v2}"
        );
    }

    #[test]
    fn reused_only_with_the_same_program_and_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("set");
        let program = fake_program(tmp.path(), b"one");
        let first = e2e_set(&dir, &program, 100).expect("first");
        assert!(e2e_set(&dir, &program, 100).expect("again").reused);
        let bigger = e2e_set(&dir, &program, 200).expect("bigger");
        assert!(!bigger.reused);
        fs::write(&program, b"two").expect("rewrite");
        let other = e2e_set(&dir, &program, 200).expect("other program");
        assert!(!other.reused);
        assert_ne!(first.images[0].manifest, other.images[0].manifest);
    }

    #[test]
    fn skopeo_accepts_the_layout() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let program = fake_program(tmp.path(), b"#!/bin/true\n");
        let set = e2e_set(&tmp.path().join("set"), &program, 1000).expect("set");
        let inspect = |extra: &[&str], name: &str| -> Option<Value> {
            let target = format!("oci:{}:{name}", set.layout.display());
            let out = match Command::new("skopeo")
                .arg("inspect")
                .args(extra)
                .arg(&target)
                .output()
            {
                Ok(o) => o,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
                Err(e) => panic!("skopeo: {e}"),
            };
            assert!(
                out.status.success(),
                "skopeo inspect {target}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(serde_json::from_slice(&out.stdout).expect("skopeo json"))
        };
        let Some(info) = inspect(&[], E2E_HELLO_1) else {
            eprintln!("skopeo not found; skipped");
            return;
        };
        assert_eq!(info["Digest"], json!(set.images[0].manifest.digest));
        assert_eq!(info["Architecture"], json!("amd64"));
        assert_eq!(info["Os"], json!("linux"));
        for (name, cmd) in [(E2E_HELLO_1, "v1"), (E2E_HELLO_2, "v2"), (E2E_DATA, "data")] {
            let config = inspect(&["--config"], name).expect("skopeo ran before");
            assert_eq!(config["config"]["Entrypoint"], json!(["/hello"]), "{name}");
            assert_eq!(config["config"]["Cmd"], json!([cmd]), "{name}");
        }
    }
}
