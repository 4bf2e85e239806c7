//! The bench set: realistic images made of this machine's own files, sized to a target, with
//! a shared base layer, an incompressible layer and an image of uncompressed layers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::oci::{
    ConfigSpec, Descriptor, Layer, LayerTar, Layout, MEDIA_CONFIG, MEDIA_MANIFEST, append_dir,
    append_file, config_json, manifest_json,
};
use crate::{Error, Result, marker};

const OUTPUTS: &[&str] = &["layout", "bundle.yaml", "bundle-plain.yaml"];

/// Where the files come from, walked in this order; a directory that is itself a root is
/// walked only as that root.
const ROOTS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/bin",
    "/usr/share/doc",
    "/usr/share/locale",
    "/usr/sbin",
    "/usr/libexec",
    "/usr/share",
    "/usr/lib",
];

/// The least target [`bench_set`] accepts.
pub const MIN_BENCH_BYTES: u64 = 2 << 20;

/// Layers built in parallel per round. Fixed, not the core count, so that the bytes do not
/// depend on the machine's parallelism.
const ROUND: usize = 4;

/// The tag of the image with uncompressed layers.
const PLAIN_TAG: &str = "plain-1.0";

/// What [`bench_set`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchSet {
    /// The directory holding everything below.
    #[serde(skip)]
    pub dir: PathBuf,
    /// `DIR/layout`: the OCI layout with every image.
    #[serde(skip)]
    pub layout: PathBuf,
    /// `DIR/bundle.yaml`: names every image.
    #[serde(skip)]
    pub bundle_yaml: PathBuf,
    /// `DIR/bundle-plain.yaml`: names only the image with uncompressed layers.
    #[serde(skip)]
    pub bundle_plain_yaml: PathBuf,
    /// Whether an existing set was reused rather than written.
    #[serde(skip)]
    pub reused: bool,
    /// The size asked for.
    pub target_bytes: u64,
    /// Total size of the distinct layer blobs written.
    pub layer_bytes: u64,
    /// The gzip layer shared by at least three images.
    pub base_layer: Descriptor,
    /// The gzip layer of pseudo-random bytes.
    pub incompressible_layer: Descriptor,
    /// The `bundle.yaml` name of the image with uncompressed layers.
    pub plain_image: String,
    /// That image's manifest, config and layers, as paths inside the layout.
    pub plain_blobs: Vec<String>,
    /// Every image, in `bundle.yaml` order.
    pub images: Vec<BenchImage>,
}

/// One image of the bench set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchImage {
    /// The name in `bundle.yaml`.
    pub name: String,
    /// The `org.opencontainers.image.ref.name` in the layout.
    pub tag: String,
    /// Its manifest.
    pub manifest: Descriptor,
    /// Its config.
    pub config: Descriptor,
    /// Its layers.
    pub layers: Vec<Descriptor>,
}

impl BenchSet {
    fn with_paths(mut self, dir: &Path, reused: bool) -> Self {
        self.dir = dir.to_owned();
        self.layout = dir.join("layout");
        self.bundle_yaml = dir.join("bundle.yaml");
        self.bundle_plain_yaml = dir.join("bundle-plain.yaml");
        self.reused = reused;
        self
    }
}

/// Writes the bench set under `dir`: about `target_bytes` of layer blobs in one OCI layout.
///
/// - gzip layers (level 6) of real files from `/usr` (about 75%), walked in sorted order,
///   skipping symlinks and unreadable files, repeated under an `rN/` prefix when the machine
///   has too few;
/// - one base layer shared by `svc-a-1.0`, `svc-b-1.0`, `svc-c-1.0` and `data-1.0`;
/// - one gzip layer of pseudo-random bytes in `data-1.0` (about 10%);
/// - `plain-1.0`, whose layers are uncompressed tars (about 15%).
///
/// The bytes depend only on the files of this machine, not on timing or core count. When
/// `dir` already holds a complete bench set of the same target made by this version, it is
/// reused as is.
pub fn bench_set(dir: &Path, target_bytes: u64) -> Result<BenchSet> {
    if target_bytes < MIN_BENCH_BYTES {
        return Err(Error::TooSmall {
            requested: target_bytes,
            min: MIN_BENCH_BYTES,
        });
    }
    if let Some(set) = marker::load::<BenchSet>(dir, "bench", Some(target_bytes), OUTPUTS) {
        return Ok(set.with_paths(dir, true));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    marker::clear(dir, OUTPUTS)?;
    let set = write(dir, target_bytes)?.with_paths(dir, false);
    marker::save(dir, "bench", Some(target_bytes), &set)?;
    Ok(set)
}

/// A regular file to put in a layer.
#[derive(Debug, Clone)]
struct SourceFile {
    src: PathBuf,
    tar_path: PathBuf,
    size: u64,
    mode: u32,
}

/// Tar bytes a file takes: header plus content padded to the block.
fn tar_cost(size: u64) -> u64 {
    512 + size.div_ceil(512) * 512
}

/// Regular files under [`ROOTS`] in sorted order, forever: each pass after the first puts an
/// `rN/` prefix on the paths.
struct FileSource {
    roots: Vec<PathBuf>,
    max_file: u64,
    pass: u32,
    next_root: usize,
    found_in_pass: bool,
    stack: Vec<std::vec::IntoIter<PathBuf>>,
    peeked: Option<SourceFile>,
}

fn sorted_children(dir: &Path) -> Option<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Some(v)
}

impl FileSource {
    fn new(max_file: u64) -> Self {
        FileSource {
            roots: ROOTS.iter().map(PathBuf::from).collect(),
            max_file,
            pass: 0,
            next_root: 0,
            found_in_pass: false,
            stack: Vec::new(),
            peeked: None,
        }
    }

    fn next(&mut self) -> Result<SourceFile> {
        if let Some(f) = self.peeked.take() {
            return Ok(f);
        }
        loop {
            while let Some(top) = self.stack.last_mut() {
                let Some(path) = top.next() else {
                    self.stack.pop();
                    continue;
                };
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if !self.roots.contains(&path)
                        && let Some(children) = sorted_children(&path)
                    {
                        self.stack.push(children.into_iter());
                    }
                } else if meta.is_file() && meta.len() <= self.max_file {
                    self.found_in_pass = true;
                    let rel = path.strip_prefix("/").unwrap_or(&path);
                    let tar_path = match self.pass {
                        0 => rel.to_owned(),
                        n => Path::new(&format!("r{n}")).join(rel),
                    };
                    return Ok(SourceFile {
                        tar_path,
                        size: meta.len(),
                        mode: if meta.permissions().mode() & 0o111 != 0 {
                            0o755
                        } else {
                            0o644
                        },
                        src: path,
                    });
                }
            }
            if self.next_root == self.roots.len() {
                if !self.found_in_pass {
                    return Err(Error::NoSourceFiles {
                        roots: ROOTS.join(", "),
                    });
                }
                self.pass += 1;
                self.next_root = 0;
                self.found_in_pass = false;
            }
            let root = &self.roots[self.next_root];
            self.next_root += 1;
            if let Some(children) = sorted_children(root) {
                self.stack.push(children.into_iter());
            }
        }
    }

    /// The next files, about `budget` tar bytes of them (at least one file).
    fn take(&mut self, budget: u64) -> Result<Vec<SourceFile>> {
        let mut files = Vec::new();
        let mut used = 0;
        while used < budget {
            let f = self.next()?;
            let cost = tar_cost(f.size);
            // Take the file when that lands nearer the budget than stopping short does.
            if !files.is_empty() && used + cost > budget && used + cost - budget > budget - used {
                self.peeked = Some(f);
                break;
            }
            used += cost;
            files.push(f);
        }
        Ok(files)
    }
}

/// What one layer holds.
enum Content {
    Files(Vec<SourceFile>),
    /// `bytes` of pseudo-random data in files of 1 MiB.
    Random {
        bytes: u64,
    },
}

struct Job {
    content: Content,
    gzip: bool,
}

/// splitmix64: small, fast, and the same everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` deterministic incompressible bytes: splitmix64 seeded with `seed`, little-endian.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    SplitMix(seed).fill(&mut out);
    out
}

/// Appends the directories on the way to `parent` that `open` (the chain emitted last) lacks.
fn enter_dirs(b: &mut LayerTar, open: &mut Vec<PathBuf>, parent: &Path) -> std::io::Result<()> {
    let chain: Vec<&Path> = {
        let mut v: Vec<&Path> = parent
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        v.reverse();
        v
    };
    let common = open
        .iter()
        .zip(&chain)
        .take_while(|(a, b)| a.as_path() == **b)
        .count();
    open.truncate(common);
    for dir in &chain[common..] {
        append_dir(b, dir)?;
        open.push(dir.to_path_buf());
    }
    Ok(())
}

fn build(layout: &Layout, job: &Job) -> Result<Layer> {
    layout.put_layer(job.gzip, |b| match &job.content {
        Content::Files(files) => {
            let mut open = Vec::new();
            for f in files {
                // A file that vanished or cannot be read is left out, as promised.
                let Ok(data) = fs::read(&f.src) else { continue };
                if let Some(parent) = f.tar_path.parent() {
                    enter_dirs(b, &mut open, parent)?;
                }
                append_file(b, &f.tar_path, f.mode, &data)?;
            }
            Ok(())
        }
        Content::Random { bytes } => {
            append_dir(b, "data")?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = *bytes;
            let mut i = 0u64;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                SplitMix(0x5eed_0000 + i).fill(&mut buf[..n]);
                append_file(b, format!("data/random-{i:05}.bin"), 0o644, &buf[..n])?;
                left -= n as u64;
                i += 1;
            }
            Ok(())
        }
    })
}

fn build_all(layout: &Layout, jobs: &[Job]) -> Result<Vec<Layer>> {
    jobs.par_iter().map(|j| build(layout, j)).collect()
}

fn write(dir: &Path, target: u64) -> Result<BenchSet> {
    let random_bytes = target / 10;
    let plain_bytes = target * 15 / 100;
    let gz_budget = target - random_bytes - plain_bytes;
    // Uncompressed tar bytes per layer.
    let layer_cap = (target / 8).clamp(1 << 20, 128 << 20);
    let mut source = FileSource::new((layer_cap / 2).min(32 << 20));
    // gzip ratio assumed until the base layer tells the real one.
    let guess_ratio = 0.4;

    // Phase 1: base, incompressible and plain layers.
    let base_tar = ((gz_budget as f64 * 0.2 / guess_ratio) as u64).min(layer_cap);
    let mut jobs = vec![
        Job {
            content: Content::Files(source.take(base_tar)?),
            gzip: true,
        },
        Job {
            // Tar headers and gzip framing add a little; aim the content slightly under.
            content: Content::Random {
                bytes: random_bytes - random_bytes / 200,
            },
            gzip: true,
        },
    ];
    let plain_layers = plain_bytes.div_ceil(layer_cap).max(2);
    for _ in 0..plain_layers {
        jobs.push(Job {
            content: Content::Files(source.take(plain_bytes / plain_layers)?),
            gzip: false,
        });
    }
    let layout_dir = dir.join("layout");
    let mut layout = Layout::create(&layout_dir)?;
    let mut phase1 = build_all(&layout, &jobs)?.into_iter();
    let (Some(base), Some(random)) = (phase1.next(), phase1.next()) else {
        unreachable!("phase 1 has at least two jobs")
    };
    let plain: Vec<Layer> = phase1.collect();

    // Phase 2: app layers in rounds until the gzip budget is met, each round aimed at what is
    // left using the ratio seen so far.
    let mut produced = base.desc.size;
    let (mut sum_c, mut sum_u) = (base.desc.size, base.tar_size.max(1));
    let mut app: Vec<Layer> = Vec::new();
    for _ in 0..256 {
        let left = gz_budget.saturating_sub(produced);
        if app.len() >= 3 && left < (gz_budget / 50).max(64 << 10) {
            break;
        }
        let want_tar = (left as f64 * sum_u as f64 / sum_c as f64) as u64;
        let n = (want_tar.div_ceil(layer_cap) as usize)
            .clamp(1, ROUND)
            .max(3usize.saturating_sub(app.len()));
        let per = (want_tar / n as u64).clamp(64 << 10, layer_cap);
        let jobs = (0..n)
            .map(|_| {
                Ok(Job {
                    content: Content::Files(source.take(per)?),
                    gzip: true,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for l in build_all(&layout, &jobs)? {
            produced += l.desc.size;
            sum_c += l.desc.size;
            sum_u += l.tar_size;
            app.push(l);
        }
    }

    // Images.
    let mut groups: [Vec<&Layer>; 3] = [vec![&base], vec![&base], vec![&base]];
    for (i, l) in app.iter().enumerate() {
        groups[i % 3].push(l);
    }
    let [a, b, c] = groups;
    let specs: Vec<(&str, Vec<&Layer>)> = vec![
        ("svc-a", a),
        ("svc-b", b),
        ("svc-c", c),
        ("data", vec![&base, &random]),
        ("plain", plain.iter().collect()),
    ];
    let mut images = Vec::new();
    for (title, layers) in &specs {
        let history: Vec<String> = (0..layers.len())
            .map(|i| format!("bundle-testimages bench {title} layer {i}"))
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let config = config_json(
            &ConfigSpec {
                arch: "amd64",
                cmd: &["/bin/sh"],
                title,
                history: &history,
            },
            &diff_ids,
        );
        let config = layout.put_json(MEDIA_CONFIG, &config)?;
        let descs: Vec<Descriptor> = layers.iter().map(|l| l.desc.clone()).collect();
        let manifest = layout.put_json(MEDIA_MANIFEST, &manifest_json(&config, &descs))?;
        let tag = format!("{title}-1.0");
        layout.tag(&tag, &manifest);
        images.push(BenchImage {
            name: format!("registry.example/bench/{title}:1.0"),
            tag,
            manifest,
            config,
            layers: descs,
        });
    }
    layout.finish()?;

    let yaml = |name: &str, imgs: &[&BenchImage]| {
        let mut s = format!("name: {name}\nversion: 1.0.0\nimages:\n");
        for i in imgs {
            s.push_str(&format!(
                "  - name: {}\n    source: oci-layout:layout:{}\n",
                i.name, i.tag
            ));
        }
        s
    };
    let Some(plain_img) = images.iter().find(|i| i.tag == PLAIN_TAG) else {
        unreachable!("the plain image is always built")
    };
    for (file, text) in [
        (
            "bundle.yaml",
            yaml("bench", &images.iter().collect::<Vec<_>>()),
        ),
        ("bundle-plain.yaml", yaml("bench-plain", &[plain_img])),
    ] {
        let p = dir.join(file);
        fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }

    let mut distinct: Vec<&Descriptor> = images.iter().flat_map(|i| &i.layers).collect();
    distinct.sort_by(|x, y| x.digest.cmp(&y.digest));
    distinct.dedup_by(|x, y| x.digest == y.digest);
    let mut plain_blobs = vec![
        plain_img.manifest.layout_path(),
        plain_img.config.layout_path(),
    ];
    plain_blobs.extend(plain_img.layers.iter().map(Descriptor::layout_path));
    Ok(BenchSet {
        dir: PathBuf::new(),
        layout: PathBuf::new(),
        bundle_yaml: PathBuf::new(),
        bundle_plain_yaml: PathBuf::new(),
        reused: false,
        target_bytes: target,
        layer_bytes: distinct.iter().map(|d| d.size).sum(),
        base_layer: base.desc.clone(),
        incompressible_layer: random.desc.clone(),
        plain_image: plain_img.name.clone(),
        plain_blobs,
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference() {
        // First outputs of splitmix64 seeded with 0 (reference implementation by Vigna).
        let mut r = SplitMix(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn tar_cost_pads_to_blocks() {
        assert_eq!(tar_cost(0), 512);
        assert_eq!(tar_cost(1), 1024);
        assert_eq!(tar_cost(512), 1024);
        assert_eq!(tar_cost(513), 1536);
    }
}
