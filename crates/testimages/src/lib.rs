#![doc = include_str!("../README.md")]

mod bench;
mod e2e;
mod marker;
mod oci;
mod small;

use std::io;
use std::path::{Path, PathBuf};

pub use bench::{BenchImage, BenchSet, MIN_BENCH_BYTES, bench_set, noise};
pub use e2e::{
    E2E_DATA, E2E_DEFAULT_DATA_BYTES, E2E_HELLO_1, E2E_HELLO_2, E2eImage, E2eSet, e2e_set,
};
pub use oci::{
    Descriptor, MEDIA_CONFIG, MEDIA_INDEX, MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR, MEDIA_MANIFEST,
    REF_NAME_ANNOTATION,
};
pub use small::{ImageInfo, ManifestInfo, SmallSet, small_set};

/// The name of the file, written last, that marks a directory as holding a complete set and
/// records the parameters and the result (the [`SmallSet`] or [`BenchSet`] as JSON).
pub const MARKER: &str = "testimages.json";

/// What can go wrong while generating images.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("i/o error on {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The marker file could not be serialized.
    #[error("cannot write {path}")]
    Json {
        /// The marker file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// None of the source directories of the bench set holds a readable regular file.
    #[error("no readable regular files under {roots}")]
    NoSourceFiles {
        /// The directories searched, comma separated.
        roots: String,
    },
    /// The requested bench set size is below what its structure needs.
    #[error("bench set of {requested} bytes is too small, the least is {min}")]
    TooSmall {
        /// The size asked for.
        requested: u64,
        /// The least size accepted.
        min: u64,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
