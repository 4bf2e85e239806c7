//! `bundle`: carry container images into disconnected Kubernetes clusters.
// Doc comments on the clap types are help text (`HOST[:PORT]`), not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

mod config;
mod deploy;
mod registry;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use bundle_format::{Archive, BundleInput, WriteOptions};
use bundle_layout::{Platform, SourceSpec};
use clap::{Parser, Subcommand};
use serde::Serialize;

/// `println!` that returns the write error instead of panicking, so that `bundle ... | head`
/// ends quietly (main treats a broken pipe as success).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}

#[derive(Parser)]
#[command(
    name = "bundle",
    version,
    about = "Carry container images into disconnected Kubernetes clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an archive from the images a bundle.yaml names.
    Create {
        /// The bundle.yaml.
        bundle_yaml: PathBuf,
        /// Where to write the archive (with --split-size: OUT.000, OUT.001, ...).
        #[arg(short, long)]
        output: PathBuf,
        /// Cut the archive into parts of at most this size (e.g. 4GiB, 700MiB), at frame boundaries.
        #[arg(long, value_parser = config::parse_size)]
        split_size: Option<u64>,
        /// zstd level, 1 to 19.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Keep only these platforms of multi-platform images (repeatable, os/arch[/variant]).
        /// An image index that loses manifests is rewritten and gets a new digest.
        #[arg(long = "platform")]
        platforms: Vec<Platform>,
        /// Pull exactly the digests bundle.lock pins; fail if an image is not pinned.
        #[arg(long)]
        locked: bool,
        /// Blob cache for registry pulls [default: $XDG_CACHE_HOME/bundle or ~/.cache/bundle].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Take the static agent from DIR (holding bundle-agent and stage0, as `cargo xtask
        /// static` leaves them in target/agent) [default: $BUNDLE_AGENT_DIR, else
        /// EXE_DIR/../agent, else EXE_DIR/agent, where EXE_DIR holds this bundle].
        #[arg(long, value_name = "DIR")]
        agent: Option<PathBuf>,
        /// Leave the agent image out (or set BUNDLE_NO_AGENT=1): `bundle deploy` needs it, so
        /// such an archive is only for `bundle push --registry` and `bundle serve`.
        #[arg(long, conflicts_with = "agent")]
        no_agent: bool,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Push the images of an archive into a registry, straight from the archive.
    Push {
        /// The archive (or any one of its parts).
        archive: PathBuf,
        /// Target: HOST[:PORT][/PREFIX]. docker.io/library/nginx:1.27 lands at HOST/library/nginx:1.27.
        #[arg(long)]
        registry: String,
        /// Ordered SRC_PREFIX=DST_PREFIX rules, e.g. docker.io/=mirror.local/docker/ (first match wins).
        #[arg(long = "map", value_name = "SRC=DST")]
        maps: Vec<bundle_oci::push::MapRule>,
        /// Push only this image (repeatable).
        #[arg(long = "image", value_name = "NAME")]
        images: Vec<String>,
        /// Chunk size for large blobs (an upload goes on from where the registry stands after
        /// a failure, whatever the size; smaller chunks are for proxies that limit bodies).
        #[arg(long, default_value = "128MiB", value_parser = config::parse_size)]
        chunk_size: u64,
        /// Hash every frame against the archive's index before sending it (without it, the
        /// registry's digest check guards the content, with zstd's checksums of compressed
        /// frames, and a blob the registry refuses has its frames hashed to name the damaged
        /// one).
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        access: registry::RegistryArgs,
    },
    /// Check every frame of an archive against its index (--deep: every blob digest too).
    Verify {
        /// The archive, one of its parts, or every part in order.
        #[arg(required = true)]
        archive: Vec<PathBuf>,
        /// Also decompress everything and check tar headers and blob digests.
        #[arg(long)]
        deep: bool,
        /// Verify each named part on its own, against the index it carries.
        #[arg(long)]
        part: bool,
    },
    /// Show what an archive holds.
    Inspect {
        /// The archive, one of its parts, or every part in order.
        #[arg(required = true)]
        archive: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve an archive as a read-only OCI registry, straight from the file (no extraction).
    Serve {
        /// The archive, one of its parts, or every part in order.
        #[arg(required = true)]
        archive: Vec<PathBuf>,
        /// Address to listen on (port 0 picks a free port; the address bound is printed).
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: String,
        /// Also check each frame's sha256 against the index the first time it is served
        /// (without it, frames are checked by their zstd checksum and clients check blob
        /// digests; `bundle verify` checks every sha256 beforehand).
        #[arg(long)]
        verify: bool,
    },
    /// Deploy an archive into a cluster: seed a registry there if it has none (through
    /// ConfigMaps), push every image through the API server, print the references to use.
    Deploy(deploy::DeployArgs),
    /// Remove what `bundle deploy` created in a namespace (the registry data only with --purge).
    Remove(deploy::RemoveArgs),
    /// Extract an archive as an OCI image layout.
    Extract {
        /// The archive (or any one of its parts).
        archive: PathBuf,
        /// Target directory; must not exist or be empty.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Create {
            bundle_yaml,
            output,
            split_size,
            level,
            platforms,
            locked,
            cache,
            agent,
            no_agent,
            registry,
        } => create(
            &bundle_yaml,
            &output,
            &WriteOptions { level, split_size },
            &platforms,
            &Pulling {
                locked,
                cache,
                registry,
            },
            &AgentChoice {
                dir: agent,
                omit: no_agent,
            },
        ),
        Command::Serve {
            archive,
            listen,
            verify,
        } => serve(&archive, &listen, verify),
        Command::Push {
            archive,
            registry,
            maps,
            images,
            chunk_size,
            verify,
            access,
        } => push(
            &archive,
            &registry,
            maps,
            images,
            (chunk_size, verify),
            &access,
        ),
        Command::Verify {
            archive,
            deep,
            part,
        } => verify(&archive, deep, part),
        Command::Inspect { archive, json } => inspect(&archive, json),
        Command::Deploy(args) => deploy::deploy(args),
        Command::Remove(args) => deploy::remove(args),
        Command::Extract { archive, dir } => {
            let a = Archive::open(&archive)?;
            a.extract(&dir)?;
            out!(
                "extracted {} images ({} blobs) into {}",
                a.index().images.len(),
                a.index().blobs.len(),
                dir.display()
            );
            Ok(())
        }
    }
}

/// How `create` pulls registry images.
struct Pulling {
    locked: bool,
    cache: Option<PathBuf>,
    registry: registry::RegistryArgs,
}

/// Which agent `create` puts into the archive.
struct AgentChoice {
    /// `--agent DIR`.
    dir: Option<PathBuf>,
    /// `--no-agent`.
    omit: bool,
}

/// The environment variable naming the agent directory when `--agent` is not given.
const AGENT_DIR_ENV: &str = "BUNDLE_AGENT_DIR";
/// The environment variable that, set to anything but empty or `0`, means `--no-agent`
/// (unless `--agent` is given).
const NO_AGENT_ENV: &str = "BUNDLE_NO_AGENT";

/// The directory to take the agent from, `None` for no agent. An explicit choice
/// (`--agent`, `$BUNDLE_AGENT_DIR`) is the only place looked in; otherwise the directories
/// beside the running executable are tried in order.
fn agent_dir(choice: &AgentChoice) -> Result<Option<PathBuf>> {
    use bundle_layout::agent::{AGENT_FILE, STAGE0_FILE};
    if choice.omit {
        return Ok(None);
    }
    let candidates = if let Some(dir) = &choice.dir {
        vec![dir.clone()]
    } else if std::env::var_os(NO_AGENT_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return Ok(None);
    } else if let Some(dir) = std::env::var_os(AGENT_DIR_ENV).filter(|v| !v.is_empty()) {
        vec![PathBuf::from(dir)]
    } else {
        let exe = std::env::current_exe().context("locating the running bundle executable")?;
        let exe_dir = exe.parent().unwrap_or(Path::new("/"));
        let mut dirs: Vec<PathBuf> = exe_dir
            .parent()
            .map(|p| p.join("agent"))
            .into_iter()
            .collect();
        dirs.push(exe_dir.join("agent"));
        dirs
    };
    if let Some(found) = candidates
        .iter()
        .find(|d| d.join(AGENT_FILE).is_file() && d.join(STAGE0_FILE).is_file())
    {
        return Ok(Some(found.clone()));
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "the static agent was not found (looked in {}); build it with `cargo xtask static`, \
         pass --agent DIR, or --no-agent for an archive that will only be pushed with --registry",
        looked.join(", ")
    )
}

/// The agent image built from `dir`'s `bundle-agent` and `stage0`.
fn agent_image(dir: &Path) -> Result<bundle_layout::Resolved> {
    use bundle_layout::agent::{AGENT_FILE, STAGE0_FILE, build_agent_image};
    let read = |name: &str| -> Result<(PathBuf, Vec<u8>)> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok((path, bytes))
    };
    let (agent_path, agent) = read(AGENT_FILE)?;
    let (stage0_path, stage0) = read(STAGE0_FILE)?;
    Ok(build_agent_image(
        &agent,
        &agent_path,
        &stage0,
        &stage0_path,
        env!("CARGO_PKG_VERSION"),
    )?)
}

fn create(
    yaml: &Path,
    out: &Path,
    opts: &WriteOptions,
    platforms: &[Platform],
    pulling: &Pulling,
    agent: &AgentChoice,
) -> Result<()> {
    let loaded = config::load(yaml)?;
    for (i, img) in loaded.config.images.iter().enumerate() {
        if bundle_layout::agent::is_agent_image(&img.name) {
            bail!(
                "{}: images[{i}].name {:?}: {} is reserved for the agent image that create adds \
                 itself",
                yaml.display(),
                img.name,
                bundle_layout::agent::AGENT_IMAGE_REPOSITORY
            );
        }
    }
    // Before any pull: a missing agent should not cost a download first.
    let agent = match agent_dir(agent)? {
        Some(dir) => Some((agent_image(&dir)?, dir)),
        None => None,
    };
    let mut input = BundleInput {
        name: loaded.config.name.clone(),
        version: loaded.config.version.clone(),
        created: config::created_from_env()?,
        ..BundleInput::default()
    };
    let lock_path = config::Lock::path_for(yaml);
    let old_lock = config::Lock::load(&lock_path)?;
    let mut new_lock = config::Lock {
        version: 1,
        images: Vec::new(),
    };
    // Local sources resolve here, in order; registry images are pulled all at once below
    // (one bound on downloads, shared blobs downloaded once).
    let mut slots: Vec<Option<bundle_layout::Resolved>> = Vec::new();
    let mut pulls: Vec<(usize, bundle_oci::Reference)> = Vec::new();
    for (i, img) in loaded.config.images.iter().enumerate() {
        let at = || format!("{}: images[{i}] ({})", yaml.display(), img.name);
        match &img.source {
            Some(source) => {
                let spec = SourceSpec::parse(source)
                    .with_context(|| format!("{}: images[{i}].source", yaml.display()))?
                    .relative_to(&loaded.base);
                slots.push(Some(
                    bundle_layout::resolve(&img.name, &spec, platforms).with_context(at)?,
                ));
            }
            None => {
                let reference: bundle_oci::Reference = img.name.parse().with_context(at)?;
                let target = match (pulling.locked, old_lock.get(&img.name)) {
                    (true, None) => bail!(
                        "{}: --locked, but {} has no entry in {}; run without --locked to pin it",
                        yaml.display(),
                        img.name,
                        lock_path.display()
                    ),
                    (true, Some(d)) => reference.with_digest(
                        d.parse::<bundle_format::Digest>()
                            .with_context(|| format!("{}: {}", lock_path.display(), img.name))?,
                    ),
                    (false, _) => reference,
                };
                pulls.push((i, target));
                slots.push(None);
            }
        }
    }
    let pulling_now = if pulls.is_empty() {
        None
    } else {
        Some(start_pulls(
            yaml,
            &loaded.config.images,
            &pulls,
            platforms,
            pulling,
            &mut slots,
            &mut new_lock,
        )?)
    };
    for resolved in slots.into_iter().flatten() {
        for note in &resolved.notes {
            eprintln!("note: {note}");
        }
        input.images.push(resolved.image);
        input.blobs.extend(resolved.blobs);
    }
    if let Some((image, dir)) = agent {
        eprintln!(
            "agent: {} ({}, from {})",
            image.image.name,
            image.image.digest,
            dir.display()
        );
        input.images.push(image.image);
        input.blobs.extend(image.blobs);
    }
    let summary = bundle_format::write_arriving(
        &input,
        out,
        opts,
        pulling_now
            .as_ref()
            .map(|(_, d)| d as &dyn bundle_format::Arrivals),
    )
    .with_context(|| format!("creating {}", out.display()))?;
    if let Some((rt, downloads)) = pulling_now {
        let n = rt.block_on(downloads.finish())?;
        eprintln!("downloaded {n} bytes");
    }
    if !pulling.locked && !new_lock.images.is_empty() {
        new_lock.save(&lock_path)?;
    }
    for p in &summary.paths {
        out!("wrote {}", p.display());
    }
    out!(
        "archive {} : {} images, {} blobs, {} frames, {} bytes",
        summary.id,
        summary.index.images.len(),
        summary.index.blobs.len(),
        summary.index.frames.len(),
        summary.size
    );
    Ok(())
}

/// Pulls the registry images of a bundle.yaml (`pulls`: their index and the reference to pull):
/// the manifests and configs of all of them at once, filling their `slots` and the lock; then
/// starts the layer downloads, which go on (in archive order) while the writer compresses the
/// layers already in.
fn start_pulls(
    yaml: &Path,
    images: &[config::ImageConfig],
    pulls: &[(usize, bundle_oci::Reference)],
    platforms: &[Platform],
    pulling: &Pulling,
    slots: &mut [Option<bundle_layout::Resolved>],
    new_lock: &mut config::Lock,
) -> Result<(tokio::runtime::Runtime, bundle_oci::pull::Downloads)> {
    let dir = pulling
        .cache
        .clone()
        .unwrap_or_else(bundle_oci::cache::default_dir);
    let cache = bundle_oci::cache::BlobCache::open(&dir)?;
    let puller =
        bundle_oci::pull::Puller::new(pulling.registry.client()?, cache, pulling.registry.jobs);
    let rt = registry::runtime()?;
    let results = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, target) in pulls {
            let (puller, name, target, platforms) = (
                puller.clone(),
                images[*i].name.clone(),
                target.clone(),
                platforms.to_vec(),
            );
            let i = *i;
            tasks.spawn(async move { (i, puller.resolve(&name, &target, &platforms).await) });
        }
        let mut done = Vec::new();
        while let Some(j) = tasks.join_next().await {
            done.push(j.context("pull task")?);
        }
        done.sort_by_key(|(i, _)| *i);
        anyhow::Ok(done)
    })?;
    let mut missing = Vec::new();
    for ((i, result), (_, target)) in results.into_iter().zip(pulls) {
        let img = &images[i];
        let r =
            result.with_context(|| format!("{}: images[{i}] ({})", yaml.display(), img.name))?;
        eprintln!(
            "pulling {} as {} ({} of its blobs not cached)",
            target,
            r.pulled,
            r.missing.len()
        );
        new_lock.images.push(config::LockEntry {
            name: img.name.clone(),
            digest: r.pulled.to_string(),
        });
        missing.extend(r.missing);
        slots[i] = Some(r.resolved);
    }
    let downloads = {
        let _in_runtime = rt.enter();
        puller.start(missing)
    };
    Ok((rt, downloads))
}

fn serve(archive: &[PathBuf], listen: &str, verify: bool) -> Result<()> {
    use bundle_oci::server::{ArchiveStore, Backend};
    let a = Archive::open_parts(archive)?;
    let store = ArchiveStore::new(a)?.hash_frames(verify);
    let rt = registry::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let local = listener.local_addr()?;
        let idx = store.archive().index();
        out!(
            "serving {} {} ({} images) on http://{local}/v2/",
            idx.name,
            idx.version,
            idx.images.len()
        );
        for img in &idx.images {
            if let Ok(r) = img.name.parse::<bundle_oci::Reference>() {
                out!(
                    "  {local}/{}",
                    r.to_string()
                        .trim_start_matches(&format!("{}/", r.registry))
                );
            }
        }
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        bundle_oci::server::serve(listener, std::sync::Arc::new(Backend::Archive(store)), stop)
            .await?;
        Ok(())
    })
}

fn push(
    archive: &Path,
    registry: &str,
    maps: Vec<bundle_oci::push::MapRule>,
    images: Vec<String>,
    (chunk_size, verify): (u64, bool),
    access: &registry::RegistryArgs,
) -> Result<()> {
    let a = std::sync::Arc::new(Archive::open(archive)?);
    let mut target: bundle_oci::push::Target = registry.parse()?;
    target.maps = maps;
    let opts = bundle_oci::push::PushOptions {
        target,
        images,
        jobs: access.jobs,
        chunk_size,
        verify,
    };
    let client = access.client()?;
    let rt = registry::runtime()?;
    let started = std::time::Instant::now();
    let report = rt.block_on(bundle_oci::push::push(&client, a, &opts))?;
    for (name, to, digest) in &report.images {
        out!("{name} -> {to} ({digest})");
    }
    out!(
        "pushed {} images in {:.2}s: {} blobs uploaded, {} already present, {} mounted, {} manifests ({} already there), {} bytes sent ({} of them straight from the archive file)",
        report.images.len(),
        started.elapsed().as_secs_f64(),
        report.uploaded,
        report.skipped,
        report.mounted,
        report.manifests,
        report.manifests_present,
        report.bytes_sent,
        report.bytes_from_files
    );
    Ok(())
}

fn verify(paths: &[PathBuf], deep: bool, per_part: bool) -> Result<()> {
    if per_part {
        for p in paths {
            let a = Archive::open_part(p)?;
            let r = a.verify(deep)?;
            out!(
                "ok: {} is part {} of {} of archive {}: {} frames, {} bytes verified",
                p.display(),
                r.parts.first().copied().unwrap_or_default(),
                a.index().parts.len(),
                a.id(),
                r.frames,
                r.compressed_bytes
            );
        }
        return Ok(());
    }
    let a = Archive::open_parts(paths)?;
    let r = a.verify(deep)?;
    out!(
        "ok: archive {} ({} {}): {} parts, {} frames, {} bytes verified{}",
        a.id(),
        a.index().name,
        a.index().version,
        r.parts.len(),
        r.frames,
        r.compressed_bytes,
        if deep {
            format!(
                ", {} blobs and {} content bytes checked",
                r.blobs, r.content_bytes
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InspectJson<'a> {
    id: String,
    format: u32,
    name: &'a str,
    version: &'a str,
    created: Option<&'a str>,
    size: u64,
    content_size: u64,
    parts: Vec<InspectPart>,
    frames: usize,
    blobs: usize,
    blob_bytes: u64,
    images: Vec<InspectImage<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InspectPart {
    path: Option<String>,
    size: u64,
    frames: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InspectImage<'a> {
    name: &'a str,
    digest: String,
    media_type: &'a str,
    platforms: &'a [String],
    size: u64,
}

fn inspect(paths: &[PathBuf], json: bool) -> Result<()> {
    let a = Archive::open_parts(paths)?;
    let ix = a.index();
    let report = InspectJson {
        id: a.id().to_string(),
        format: ix.format,
        name: &ix.name,
        version: &ix.version,
        created: ix.created.as_deref(),
        size: a.size(),
        content_size: ix.tar_size(),
        parts: ix
            .parts
            .iter()
            .zip(a.part_paths())
            .map(|(p, path)| InspectPart {
                path: path.map(|p| p.display().to_string()),
                size: p.size,
                frames: p.frames,
            })
            .collect(),
        frames: ix.frames.len(),
        blobs: ix.blobs.len(),
        blob_bytes: ix.blobs.iter().map(|b| b.size).sum(),
        images: ix
            .images
            .iter()
            .map(|i| InspectImage {
                name: &i.name,
                digest: i.digest.to_string(),
                media_type: &i.media_type,
                platforms: &i.platforms,
                size: i.size,
            })
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "name:     {} {}", report.name, report.version)?;
    writeln!(out, "archive:  {}", report.id)?;
    if let Some(c) = report.created {
        writeln!(out, "created:  {c}")?;
    }
    writeln!(
        out,
        "size:     {} bytes in {} part(s), {} frames; {} bytes of tar",
        report.size,
        report.parts.len(),
        report.frames,
        report.content_size
    )?;
    writeln!(
        out,
        "blobs:    {} ({} bytes, each stored once)",
        report.blobs, report.blob_bytes
    )?;
    writeln!(out, "images:")?;
    for i in &report.images {
        writeln!(
            out,
            "  {}\n    {}  {}  [{}]",
            i.name,
            i.digest,
            i.media_type,
            i.platforms.join(", ")
        )?;
    }
    Ok(())
}
