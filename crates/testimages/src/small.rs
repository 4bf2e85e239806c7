//! The small set: a few tiny images in every source format `bundle.yaml` accepts, byte-for-byte
//! the same on every run.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::oci::{
    ConfigSpec, Descriptor, Entry, Layout, MEDIA_CONFIG, MEDIA_INDEX, MEDIA_LAYER_GZIP,
    MEDIA_LAYER_TAR, MEDIA_MANIFEST, OCI_LAYOUT, canonical_json, config_json, digest_of, gzip,
    image_index_json, layout_index_json, manifest_json, tar_bytes,
};
use crate::{Error, Result, marker};

/// Docker's config media type (what a `docker save` archive's config is).
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker's uncompressed layer media type.
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

const OUTPUTS: &[&str] = &["layout", "app.oci.tar", "app.docker.tar", "bundle.yaml"];

/// What [`small_set`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmallSet {
    /// The directory holding everything below.
    #[serde(skip)]
    pub dir: PathBuf,
    /// `DIR/layout`: the OCI layout with `app-1.0`, `multi-1.0` and `plain-1.0`.
    #[serde(skip)]
    pub layout: PathBuf,
    /// `DIR/app.oci.tar`: an oci-archive holding `app-1.0` only.
    #[serde(skip)]
    pub oci_archive: PathBuf,
    /// `DIR/app.docker.tar`: a `docker save` archive of `example.com/app:1.0`.
    #[serde(skip)]
    pub docker_archive: PathBuf,
    /// `DIR/bundle.yaml`: names all five images.
    #[serde(skip)]
    pub bundle_yaml: PathBuf,
    /// Whether an existing set was reused rather than written.
    #[serde(skip)]
    pub reused: bool,
    /// The images, in `bundle.yaml` order.
    pub images: Vec<ImageInfo>,
    /// The gzip base layer that `app-1.0` and both platforms of `multi-1.0` share.
    pub base_layer: Descriptor,
}

impl SmallSet {
    fn with_paths(mut self, dir: &Path, reused: bool) -> Self {
        self.dir = dir.to_owned();
        self.reused = reused;
        self.layout = dir.join("layout");
        self.oci_archive = dir.join("app.oci.tar");
        self.docker_archive = dir.join("app.docker.tar");
        self.bundle_yaml = dir.join("bundle.yaml");
        self
    }

    /// The image `bundle.yaml` names `name` (for example `registry.example/team/app:1.0`).
    pub fn image(&self, name: &str) -> Option<&ImageInfo> {
        self.images.iter().find(|i| i.name == name)
    }
}

/// One entry of `bundle.yaml` and what it should turn into.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The name in `bundle.yaml`.
    pub name: String,
    /// The source in `bundle.yaml`.
    pub source: String,
    /// The `org.opencontainers.image.ref.name` in the source's `index.json`, if any.
    pub tag: Option<String>,
    /// The manifest or index the source names. `None` for the docker-archive, which has no
    /// manifest: the importer writes one, so compare its config and layers instead.
    pub descriptor: Option<Descriptor>,
    /// One manifest per platform.
    pub manifests: Vec<ManifestInfo>,
}

impl ImageInfo {
    /// `os/arch` of every manifest, in order.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests.iter().map(|m| m.platform.clone()).collect()
    }
}

/// One platform's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestInfo {
    /// `os/arch`.
    pub platform: String,
    /// The manifest (`None` for the docker-archive).
    pub manifest: Option<Descriptor>,
    /// The config; the docker-archive's is the same bytes as `app-1.0`'s.
    pub config: Descriptor,
    /// The layer blobs (for the docker-archive, its `layer.tar` files).
    pub layers: Vec<Descriptor>,
    /// sha256 of each uncompressed layer.
    pub diff_ids: Vec<String>,
}

/// Writes the small set under `dir` (see the crate docs for what it holds) and returns what it
/// wrote. Every byte is the same on every run and every machine. When `dir` already holds a
/// complete small set made by this version (its [`MARKER`](crate::MARKER) says so), it is
/// reused as is.
pub fn small_set(dir: &Path) -> Result<SmallSet> {
    if let Some(set) = marker::load::<SmallSet>(dir, "small", None, OUTPUTS) {
        return Ok(set.with_paths(dir, true));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    marker::clear(dir, OUTPUTS)?;
    let set = write(dir)?.with_paths(dir, false);
    marker::save(dir, "small", None, &set)?;
    Ok(set)
}

/// An uncompressed layer tar and its gzip.
struct LayerBytes {
    tar: Vec<u8>,
    gz: Vec<u8>,
}

impl LayerBytes {
    fn new(entries: Vec<Entry>) -> io::Result<Self> {
        let tar = tar_bytes(entries)?;
        let gz = gzip(&tar)?;
        Ok(LayerBytes { tar, gz })
    }
}

fn dirs(paths: &[&str]) -> impl Iterator<Item = Entry> {
    paths.iter().map(|p| Entry::Dir((*p).to_owned()))
}

/// Deterministic filler text, so that layers have something to compress.
fn text(title: &str, lines: usize) -> String {
    (0..lines)
        .map(|i| {
            format!(
                "{title} line {i:04}: the quick brown fox jumps over the lazy dog {}\n",
                i * 7919 % 1000
            )
        })
        .collect()
}

fn base_layer() -> io::Result<LayerBytes> {
    let mut e: Vec<Entry> = dirs(&[
        "bin/",
        "etc/",
        "usr/",
        "usr/share/",
        "usr/share/doc/",
        "usr/share/doc/base/",
    ])
    .collect();
    e.extend([
        Entry::file(
            "bin/hello",
            0o755,
            "#!/bin/sh\necho \"hello from bundle-testimages\"\n",
        ),
        Entry::file("etc/group", 0o644, "root:x:0:\n"),
        Entry::file("etc/hostname", 0o644, "testimage\n"),
        Entry::file(
            "etc/os-release",
            0o644,
            "NAME=\"bundle test image\"\nID=bundle-test\nVERSION_ID=1\n",
        ),
        Entry::file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n"),
        Entry::file("usr/share/doc/base/README", 0o644, text("base", 64)),
    ]);
    LayerBytes::new(e)
}

fn app_layer(name: &str, arch: &str) -> io::Result<LayerBytes> {
    let d = format!("{name}/");
    let mut e = vec![Entry::Dir(d.clone())];
    e.extend([
        Entry::file(&format!("{d}arch"), 0o644, format!("{arch}\n")),
        Entry::file(
            &format!("{d}config.json"),
            0o644,
            format!("{{\"greeting\":\"hello\",\"image\":\"{name}\"}}\n"),
        ),
        Entry::file(&format!("{d}data.txt"), 0o644, text(name, 32)),
        Entry::file(
            &format!("{d}run.sh"),
            0o755,
            format!("#!/bin/sh\nexec /bin/hello {name}\n"),
        ),
    ]);
    LayerBytes::new(e)
}

struct Built {
    manifest: Descriptor,
    manifest_bytes: Vec<u8>,
    config_bytes: Vec<u8>,
    info: ManifestInfo,
}

/// Puts config and layers in the layout and returns the manifest.
fn image(
    layout: &Layout,
    arch: &str,
    title: &str,
    layers: &[(&LayerBytes, bool)],
) -> Result<Built> {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (l, gz) in layers {
        let d = if *gz {
            layout.put(MEDIA_LAYER_GZIP, &l.gz)?
        } else {
            layout.put(MEDIA_LAYER_TAR, &l.tar)?
        };
        descs.push(d);
        diff_ids.push(digest_of(&l.tar));
    }
    let history: Vec<String> = (0..layers.len())
        .map(|i| format!("bundle-testimages {title} layer {i}"))
        .collect();
    let cmd = format!("/{title}/run.sh");
    let config = config_json(
        &ConfigSpec {
            arch,
            cmd: &[cmd.as_str()],
            title,
            history: &history,
        },
        &diff_ids,
    );
    let config_bytes = canonical_json(&config);
    let config = layout.put(MEDIA_CONFIG, &config_bytes)?;
    let manifest_bytes = canonical_json(&manifest_json(&config, &descs));
    let manifest = layout.put(MEDIA_MANIFEST, &manifest_bytes)?;
    Ok(Built {
        manifest: manifest.clone(),
        manifest_bytes,
        config_bytes,
        info: ManifestInfo {
            platform: format!("linux/{arch}"),
            manifest: Some(manifest),
            config,
            layers: descs,
            diff_ids,
        },
    })
}

fn write(dir: &Path) -> Result<SmallSet> {
    // In-memory tars of short ASCII paths; an error here names the layout being written.
    let in_layout = |e| Error::io(&dir.join("layout"), e);
    let base = base_layer().map_err(in_layout)?;
    let app = app_layer("app", "amd64").map_err(in_layout)?;
    let multi_amd64 = app_layer("multi", "amd64").map_err(in_layout)?;
    let multi_arm64 = app_layer("multi", "arm64").map_err(in_layout)?;
    let plain = app_layer("plain", "amd64").map_err(in_layout)?;

    let mut layout = Layout::create(&dir.join("layout"))?;
    let app_img = image(&layout, "amd64", "app", &[(&base, true), (&app, true)])?;
    let m_amd = image(
        &layout,
        "amd64",
        "multi",
        &[(&base, true), (&multi_amd64, true)],
    )?;
    let m_arm = image(
        &layout,
        "arm64",
        "multi",
        &[(&base, true), (&multi_arm64, true)],
    )?;
    let plain_img = image(
        &layout,
        "amd64",
        "plain",
        &[(&base, false), (&plain, false)],
    )?;
    let app_desc = app_img.manifest.clone();
    let multi_index = image_index_json(&[
        (m_amd.manifest.clone(), "amd64"),
        (m_arm.manifest.clone(), "arm64"),
    ]);
    let multi_desc = layout.put_json(MEDIA_INDEX, &multi_index)?;
    let plain_desc = plain_img.manifest.clone();
    layout.tag("app-1.0", &app_desc);
    layout.tag("multi-1.0", &multi_desc);
    layout.tag("plain-1.0", &plain_desc);
    layout.finish()?;

    write_oci_archive(&dir.join("app.oci.tar"), &app_img, &[&base, &app])?;
    let docker = write_docker_archive(&dir.join("app.docker.tar"), &app_img, &[&base, &app])?;

    let oci = |name: &str, tag: &str, desc: &Descriptor, manifests: Vec<ManifestInfo>| ImageInfo {
        name: format!("registry.example/team/{name}:1.0"),
        source: format!("oci-layout:layout:{tag}"),
        tag: Some(tag.to_owned()),
        descriptor: Some(desc.clone()),
        manifests,
    };
    let images = vec![
        oci("app", "app-1.0", &app_desc, vec![app_img.info.clone()]),
        oci(
            "multi",
            "multi-1.0",
            &multi_desc,
            vec![m_amd.info, m_arm.info],
        ),
        oci("plain", "plain-1.0", &plain_desc, vec![plain_img.info]),
        ImageInfo {
            name: "registry.example/team/from-oci-archive:1.0".into(),
            source: "oci-archive:app.oci.tar".into(),
            tag: Some("app-1.0".into()),
            descriptor: Some(app_desc.clone()),
            manifests: vec![app_img.info.clone()],
        },
        ImageInfo {
            name: "registry.example/team/from-docker:1.0".into(),
            source: "docker-archive:app.docker.tar".into(),
            tag: None,
            descriptor: None,
            manifests: vec![docker],
        },
    ];
    let mut yaml = String::from("name: demo\nversion: 1.0.0\nimages:\n");
    for i in &images {
        yaml.push_str(&format!("  - name: {}\n    source: {}\n", i.name, i.source));
    }
    let p = dir.join("bundle.yaml");
    fs::write(&p, yaml).map_err(|e| Error::io(&p, e))?;
    Ok(SmallSet {
        dir: PathBuf::new(),
        layout: PathBuf::new(),
        oci_archive: PathBuf::new(),
        docker_archive: PathBuf::new(),
        bundle_yaml: PathBuf::new(),
        reused: false,
        images,
        base_layer: app_img.info.layers[0].clone(),
    })
}

/// A tar of an OCI layout holding one image, tagged `app-1.0`.
fn write_oci_archive(path: &Path, img: &Built, layers: &[&LayerBytes]) -> Result<()> {
    let blob = |hex: &str, data: &[u8]| Entry::file(&format!("blobs/sha256/{hex}"), 0o644, data);
    let desc = &img.manifest;
    let mut e: Vec<Entry> = dirs(&["blobs/", "blobs/sha256/"]).collect();
    e.push(blob(desc.hex(), &img.manifest_bytes));
    e.push(blob(img.info.config.hex(), &img.config_bytes));
    for (d, l) in img.info.layers.iter().zip(layers) {
        e.push(blob(d.hex(), &l.gz));
    }
    e.push(Entry::file(
        "index.json",
        0o644,
        canonical_json(&layout_index_json(&[("app-1.0".into(), desc.clone())])),
    ));
    e.push(Entry::file("oci-layout", 0o644, OCI_LAYOUT));
    tar_bytes(e)
        .and_then(|bytes| fs::write(path, bytes))
        .map_err(|err| Error::io(path, err))
}

/// A `docker save` archive: `manifest.json`, `repositories`, `<config hex>.json` and one
/// legacy `<id>/` directory per layer with `VERSION`, `json` and the uncompressed
/// `layer.tar`.
fn write_docker_archive(path: &Path, img: &Built, layers: &[&LayerBytes]) -> Result<ManifestInfo> {
    let config_hex = img.info.config.hex().to_owned();
    let mut e = vec![Entry::file(
        &format!("{config_hex}.json"),
        0o644,
        img.config_bytes.clone(),
    )];
    let mut layer_paths = Vec::new();
    let mut descs = Vec::new();
    let mut parent: Option<String> = None;
    for (l, diff_id) in layers.iter().zip(&img.info.diff_ids) {
        // Legacy v1 ids chain each layer to its parent, as docker's did.
        let chain = format!("{}\n{diff_id}", parent.as_deref().unwrap_or(""));
        let id = digest_of(chain.as_bytes())
            .trim_start_matches("sha256:")
            .to_owned();
        let mut v1 = json!({"id": id, "created": "1970-01-01T00:00:00Z", "container_config": {}});
        if let Some(p) = &parent {
            v1["parent"] = json!(p);
        }
        e.push(Entry::Dir(format!("{id}/")));
        e.push(Entry::file(&format!("{id}/VERSION"), 0o644, "1.0"));
        e.push(Entry::file(
            &format!("{id}/json"),
            0o644,
            canonical_json(&v1),
        ));
        e.push(Entry::file(
            &format!("{id}/layer.tar"),
            0o644,
            l.tar.clone(),
        ));
        layer_paths.push(format!("{id}/layer.tar"));
        descs.push(Descriptor {
            media_type: DOCKER_LAYER.into(),
            digest: digest_of(&l.tar),
            size: l.tar.len() as u64,
        });
        parent = Some(id);
    }
    let manifest = json!([{
        "Config": format!("{config_hex}.json"),
        "Layers": layer_paths,
        "RepoTags": ["example.com/app:1.0"],
    }]);
    e.push(Entry::file(
        "manifest.json",
        0o644,
        canonical_json(&manifest),
    ));
    let repositories = json!({"example.com/app": {"1.0": parent}});
    e.push(Entry::file(
        "repositories",
        0o644,
        canonical_json(&repositories),
    ));
    tar_bytes(e)
        .and_then(|bytes| fs::write(path, bytes))
        .map_err(|err| Error::io(path, err))?;
    Ok(ManifestInfo {
        platform: img.info.platform.clone(),
        manifest: None,
        config: Descriptor {
            media_type: DOCKER_CONFIG.into(),
            ..img.info.config.clone()
        },
        layers: descs,
        diff_ids: img.info.diff_ids.clone(),
    })
}
