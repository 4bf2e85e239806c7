//! The one error type of the format crate.

use std::io;
use std::path::PathBuf;

use crate::Digest;

/// Everything that can go wrong reading or writing an archive. Every variant names the file,
/// part, frame, blob or field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        cause: io::Error,
    },
    /// A string that should be a digest is not one.
    #[error("invalid digest {value:?}: {reason}")]
    InvalidDigest {
        /// The offending text (cut at 80 characters).
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The file does not end with a bundle index frame.
    #[error("{}: not a bundle archive: {reason}", path.display())]
    NotABundle {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The index bytes do not hash to the value the trailer records.
    #[error("{}: index is corrupt: trailer says {expected}, index hashes to {found}", path.display())]
    IndexDigest {
        /// The file.
        path: PathBuf,
        /// Digest in the trailer.
        expected: Digest,
        /// Digest of the bytes found.
        found: Digest,
    },
    /// The index is not valid CBOR for format v1.
    #[error("{}: index cannot be decoded: {message}", path.display())]
    IndexDecode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// The index decodes but breaks a rule of the spec.
    #[error("invalid index: {field}: {reason}")]
    Index {
        /// The field at fault, e.g. `frames[12].dsize` or `blobs[3]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A part of a split archive is not among the files given.
    #[error("part {part} of {count} is missing (expected {})", expected.display())]
    PartMissing {
        /// Zero-based part number.
        part: u32,
        /// Number of parts in the archive.
        count: u32,
        /// Where it was looked for.
        expected: PathBuf,
    },
    /// A part sits where another part was expected.
    #[error("{}: holds part {found} of the archive, expected part {expected}", path.display())]
    PartOutOfOrder {
        /// The file.
        path: PathBuf,
        /// The part number wanted at this position.
        expected: u32,
        /// The part number the file declares.
        found: u32,
    },
    /// A part belongs to another archive.
    #[error("{}: belongs to archive {found}, not {expected}", path.display())]
    PartForeign {
        /// The file.
        path: PathBuf,
        /// Archive id of the first part.
        expected: Digest,
        /// Archive id of this part.
        found: Digest,
    },
    /// A file is longer or shorter than its index says.
    #[error("{}: part {part} is {found} bytes, the index says {expected} (truncated or padded)", path.display())]
    PartSize {
        /// The file.
        path: PathBuf,
        /// Zero-based part number.
        part: u32,
        /// Expected length.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// A frame's compressed bytes do not hash to the index's value.
    #[error("frame {frame} ({member}) in {}: sha256 mismatch: index {}, found {}", path.display(), hex::encode(expected), hex::encode(found))]
    FrameDigest {
        /// Frame number.
        frame: u32,
        /// The member the frame belongs to.
        member: String,
        /// The part file.
        path: PathBuf,
        /// From the index.
        expected: [u8; 32],
        /// Of the bytes found.
        found: [u8; 32],
    },
    /// A frame does not decompress to what the index says.
    #[error("frame {frame} ({member}): {reason}")]
    FrameDecode {
        /// Frame number.
        frame: u32,
        /// The member the frame belongs to.
        member: String,
        /// What failed.
        reason: String,
    },
    /// A blob's content does not hash to its digest.
    #[error("blob {expected} ({place}): content hashes to {found}")]
    BlobDigest {
        /// The digest the blob is named by.
        expected: Digest,
        /// The digest of its content.
        found: Digest,
        /// Where the content came from.
        place: String,
    },
    /// A tar header in the stream is not the one the spec requires.
    #[error("frame {frame}: tar header of {member}: {reason}")]
    TarHeader {
        /// Frame that holds the header.
        frame: u32,
        /// Member path expected.
        member: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob the caller asked for is not in the archive.
    #[error("blob {digest} is not in the archive")]
    NoSuchBlob {
        /// The digest asked for.
        digest: Digest,
    },
    /// Two inputs name the same digest with different sizes.
    #[error("blob {digest} is given with two sizes, {first} and {second}")]
    BlobSizeConflict {
        /// The digest.
        digest: Digest,
        /// One size.
        first: u64,
        /// The other.
        second: u64,
    },
    /// An image names a manifest that is not among the blobs.
    #[error("image {image}: manifest {digest} is not among the blobs")]
    MissingManifest {
        /// Image name.
        image: String,
        /// Its digest.
        digest: Digest,
    },
    /// A blob that was to arrive while the archive was written (a download) did not.
    #[error("blob {digest} did not arrive")]
    Arrival {
        /// The blob.
        digest: Digest,
        /// Why (the download's error).
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writer input breaks a rule.
    #[error("invalid input: {0}")]
    Input(String),
    /// The split size cannot hold one frame plus the index.
    #[error(
        "split size {split} bytes is too small: frame {frame} needs {needed} bytes with the index copy"
    )]
    SplitTooSmall {
        /// The requested split size.
        split: u64,
        /// The frame that does not fit.
        frame: u32,
        /// Bytes it needs.
        needed: u64,
    },
    /// The extraction target cannot be used.
    #[error("{}: {reason}", path.display())]
    Target {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// zstd failed while compressing (out of memory, bad level).
    #[error("compressing frame {frame}: {message}")]
    Compress {
        /// Frame number.
        frame: u32,
        /// zstd's message.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn index(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Index {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Short for `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
