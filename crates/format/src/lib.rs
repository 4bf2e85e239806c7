#![doc = include_str!("../README.md")]

pub mod digest;
pub mod error;
pub mod index;
pub mod read;
mod sha_pair;
mod sink;
mod stored;
pub mod tar;
pub mod write;

pub use digest::{Digest, Hasher};
pub use error::{Error, Result};
pub use index::Index;
pub use read::{Archive, BlobReader, StoredFrame, VerifyReport};
pub use write::{
    Arrival, ArrivalError, Arrivals, BlobInput, BundleInput, Content, ImageInput, WriteOptions,
    WriteSummary, write, write_arriving,
};

/// Largest decompressed frame: 1 MiB − 8 KiB, a multiple of the tar block. Its zstd
/// compress bound (1,044,448 bytes) stays under [`MAX_FRAME_COMPRESSED`].
pub const CHUNK: u32 = 1_040_384;

/// Largest compressed frame: 1 MiB − 4 KiB, so that one frame plus its key fits the 1 MiB
/// data limit of a Kubernetes ConfigMap.
pub const MAX_FRAME_COMPRESSED: u32 = 1_044_480;

/// The tar end-of-archive marker: two zero blocks, the last frame of every archive.
pub const END_LEN: usize = 1024;
