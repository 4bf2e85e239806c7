//! `registry` mode: the cluster's seed registry, read-write, on a directory
//! (spec/registry-storage-v1.md).

use anyhow::Context as _;
use bundle_oci::server::{Backend, FsStore};

use crate::Opts;
use crate::listen::{self, DEFAULT_LISTEN};

/// Runs the registry until stopped.
pub fn run(opts: &Opts) -> anyhow::Result<()> {
    let root = opts.required("root")?;
    let store = FsStore::open(root).with_context(|| format!("opening storage {root}"))?;
    listen::run(
        opts.get("listen").unwrap_or(DEFAULT_LISTEN),
        Backend::Fs(store),
    )
}
