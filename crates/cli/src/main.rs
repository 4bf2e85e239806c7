//! `bundle`: carry container images into disconnected Kubernetes clusters.

mod config;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use bundle_format::{Archive, BundleInput, WriteOptions};
use bundle_layout::{Platform, SourceSpec};
use clap::{Parser, Subcommand};
use serde::Serialize;

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
        } => create(&bundle_yaml, &output, split_size, level, &platforms),
        Command::Verify {
            archive,
            deep,
            part,
        } => verify(&archive, deep, part),
        Command::Inspect { archive, json } => inspect(&archive, json),
        Command::Extract { archive, dir } => {
            let a = Archive::open(&archive)?;
            a.extract(&dir)?;
            println!(
                "extracted {} images ({} blobs) into {}",
                a.index().images.len(),
                a.index().blobs.len(),
                dir.display()
            );
            Ok(())
        }
    }
}

fn create(
    yaml: &Path,
    out: &Path,
    split_size: Option<u64>,
    level: i32,
    platforms: &[Platform],
) -> Result<()> {
    let loaded = config::load(yaml)?;
    let mut input = BundleInput {
        name: loaded.config.name.clone(),
        version: loaded.config.version.clone(),
        created: config::created_from_env()?,
        ..BundleInput::default()
    };
    for (i, img) in loaded.config.images.iter().enumerate() {
        let Some(source) = &img.source else {
            bail!(
                "{}: images[{i}] ({}): no `source`; pulling from registries is not supported yet, name a local oci-layout:, oci-archive: or docker-archive: source",
                yaml.display(),
                img.name
            );
        };
        let spec = SourceSpec::parse(source)
            .with_context(|| format!("{}: images[{i}].source", yaml.display()))?
            .relative_to(&loaded.base);
        let resolved = bundle_layout::resolve(&img.name, &spec, platforms)
            .with_context(|| format!("{}: images[{i}] ({})", yaml.display(), img.name))?;
        for note in &resolved.notes {
            eprintln!("note: {note}");
        }
        input.images.push(resolved.image);
        input.blobs.extend(resolved.blobs);
    }
    let summary = bundle_format::write(&input, out, &WriteOptions { level, split_size })
        .with_context(|| format!("creating {}", out.display()))?;
    for p in &summary.paths {
        println!("wrote {}", p.display());
    }
    println!(
        "archive {} : {} images, {} blobs, {} frames, {} bytes",
        summary.id,
        summary.index.images.len(),
        summary.index.blobs.len(),
        summary.index.frames.len(),
        summary.size
    );
    Ok(())
}

fn verify(paths: &[PathBuf], deep: bool, per_part: bool) -> Result<()> {
    if per_part {
        for p in paths {
            let a = Archive::open_part(p)?;
            let r = a.verify(deep)?;
            println!(
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
    println!(
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
