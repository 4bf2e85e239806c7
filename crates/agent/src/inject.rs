//! `inject` mode: the bootstrap registry. It serves the images of a sub-archive whose frames
//! arrive as files mounted from ConfigMaps, one file per frame named by its sha256, beside
//! the CBOR index `index.cbor`. The index is checked against the digest given on the command
//! line and every frame against the index, once at start and again whenever it is read;
//! frames are mapped, never copied into memory.

use std::path::Path;

use anyhow::Context as _;
use bundle_format::{Archive, Digest};
use bundle_oci::server::{ArchiveStore, Backend};

use crate::Opts;
use crate::listen::{self, DEFAULT_LISTEN};

/// The index file's name in the chunk directory.
pub const INDEX_FILE: &str = bundle_oci::server::archive::Payload::INDEX_FILE;

/// Runs the injector until stopped.
pub fn run(opts: &Opts) -> anyhow::Result<()> {
    let dir = Path::new(opts.required("chunks")?);
    let index = opts.required("index")?;
    let digest: Digest = index
        .parse()
        .with_context(|| format!("--index {index:?}"))?;
    let archive = Archive::from_frame_files(&dir.join(INDEX_FILE), digest, dir)
        .with_context(|| format!("opening the payload in {}", dir.display()))?;
    let report = archive
        .verify(false)
        .with_context(|| format!("verifying the payload in {}", dir.display()))?;
    eprintln!(
        "payload {digest}: {} frames verified, {} images",
        report.frames,
        archive.index().images.len()
    );
    let store = ArchiveStore::new(archive).context("indexing the payload's images")?;
    listen::run(
        opts.get("listen").unwrap_or(DEFAULT_LISTEN),
        Backend::Archive(store),
    )
}
