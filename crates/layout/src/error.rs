//! The one error type of the layout crate.

use std::fmt;
use std::io;
use std::path::PathBuf;

use bundle_format::Digest;

/// Where bytes live: a file, or a member of a tar archive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Place {
    /// A file on disk.
    File(PathBuf),
    /// A member of a tar archive.
    Member {
        /// The archive.
        archive: PathBuf,
        /// The member's name inside it, normalized (no leading `./`).
        member: String,
    },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::File(p) => write!(f, "{}", p.display()),
            Place::Member { archive, member } => {
                write!(f, "{} (member {member})", archive.display())
            }
        }
    }
}

/// Everything that can go wrong reading an image source. Every variant names the file,
/// member, digest or field at fault.
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
    /// A JSON document does not parse into what it should be.
    #[error("{what}: invalid JSON: {cause}")]
    Json {
        /// The document and where it was read from.
        what: String,
        /// The parser's error.
        cause: serde_json::Error,
    },
    /// A source string names a transport this crate does not read.
    #[error(
        "source {spec:?}: unknown transport {transport:?} (known: oci-layout, oci-archive, docker-archive)"
    )]
    UnknownTransport {
        /// The whole source string.
        spec: String,
        /// The part before the first ':'.
        transport: String,
    },
    /// A source string is malformed.
    #[error("source {spec:?}: {reason}")]
    InvalidSpec {
        /// The whole source string.
        spec: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A platform string is not `os/arch[/variant]`.
    #[error("platform {value:?}: {reason}")]
    InvalidPlatform {
        /// The text given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The directory or archive does not hold an OCI image layout (or `docker save` output).
    #[error("{}: {reason}", path.display())]
    NotALayout {
        /// The layout directory or archive.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// No image in the source carries the tag asked for.
    #[error("{}: no image tagged {tag:?} (available: {})", layout.display(), list(available))]
    TagNotFound {
        /// The layout directory or archive.
        layout: PathBuf,
        /// The tag asked for.
        tag: String,
        /// The tags the source has.
        available: Vec<String>,
    },
    /// The source holds several images and none was named.
    #[error("{}: holds {} images, name one of: {}", layout.display(), available.len(), list(available))]
    AmbiguousImage {
        /// The layout directory or archive.
        layout: PathBuf,
        /// The tags (or digests) to choose from.
        available: Vec<String>,
    },
    /// The source holds no image at all.
    #[error("{}: holds no image", layout.display())]
    NoImage {
        /// The layout directory or archive.
        layout: PathBuf,
    },
    /// A digest field is not a sha256 digest.
    #[error("{what}: {field}: {cause}")]
    InvalidDigest {
        /// The document holding the field.
        what: String,
        /// The field, e.g. `layers[2].digest`.
        field: String,
        /// Why the value was refused.
        cause: Box<bundle_format::Error>,
    },
    /// Content does not hash to the digest that names it.
    #[error("{what}: content hashes to {found}, expected {expected}")]
    DigestMismatch {
        /// The blob and where it was read from.
        what: String,
        /// The digest it is named by.
        expected: Digest,
        /// The digest of the bytes found.
        found: Digest,
    },
    /// A blob is not as long as its descriptor says.
    #[error("{what}: {found} bytes, the descriptor says {expected}")]
    SizeMismatch {
        /// The blob and where it was read from.
        what: String,
        /// Size in the descriptor.
        expected: u64,
        /// Size found.
        found: u64,
    },
    /// A blob a descriptor names is not in the layout.
    #[error("blob {digest} is missing: {place} does not exist")]
    BlobMissing {
        /// The blob.
        digest: Digest,
        /// Where it should be.
        place: Place,
    },
    /// A file `manifest.json` of a docker archive names is not in it.
    #[error("{}: manifest.json names {role} {member:?}, which is not in the archive", archive.display())]
    MemberMissing {
        /// The archive.
        archive: PathBuf,
        /// The member name.
        member: String,
        /// `config` or `layer`.
        role: &'static str,
    },
    /// A JSON document is larger than this crate reads into memory.
    #[error("{what}: {size} bytes is over the {limit}-byte limit for a JSON document")]
    TooLarge {
        /// The document and where it is.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A descriptor has a media type this crate cannot walk.
    #[error("{what}: unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        /// The descriptor's target and the document referring to it.
        what: String,
        /// The media type.
        media_type: String,
    },
    /// A JSON document parses but breaks a rule.
    #[error("{what}: {reason}")]
    InvalidDocument {
        /// The document and where it was read from.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Image indexes nest deeper than this crate follows.
    #[error("{what}: image indexes nest deeper than {limit} levels")]
    TooDeep {
        /// The index where the walk stopped.
        what: String,
        /// The limit.
        limit: usize,
    },
    /// Platform filtering left nothing of the image.
    #[error("image {image}: no manifest for platform {} (available: {})", wanted.join(", "), list(available))]
    NoMatchingPlatform {
        /// The image's name in the bundle.
        image: String,
        /// The platforms asked for.
        wanted: Vec<String>,
        /// The platforms the image has.
        available: Vec<String>,
    },
    /// An archive is compressed; the tar reader needs a plain tar to find members by offset.
    #[error("{}: the archive is {kind}-compressed; decompress it first (for example `{tool} -k FILE`)", path.display())]
    Compressed {
        /// The archive.
        path: PathBuf,
        /// `gzip`, `zstd`, `bzip2` or `xz`.
        kind: &'static str,
        /// A command that decompresses it.
        tool: &'static str,
    },
    /// An archive member's name is absolute or climbs out with `..`.
    #[error("{}: unsafe member name {member:?} (absolute or containing '..')", archive.display())]
    UnsafeMember {
        /// The archive.
        archive: PathBuf,
        /// The name as found.
        member: String,
    },
    /// An archive member cannot be used for another reason (non-UTF-8 name, link loop).
    #[error("{}: member {member:?}: {reason}", archive.display())]
    BadMember {
        /// The archive.
        archive: PathBuf,
        /// The name as found (lossy for non-UTF-8 names).
        member: String,
        /// What is wrong.
        reason: String,
    },
    /// A docker-archive layer uses a compression OCI has no media type for.
    #[error("{place}: layer is {kind}-compressed, which has no OCI media type")]
    LayerCompression {
        /// The layer.
        place: Place,
        /// `bzip2` or `xz`.
        kind: &'static str,
    },
    /// A [`crate::BlobSource`] could not fetch a blob.
    #[error("fetching {role} {digest}")]
    Fetch {
        /// The blob.
        digest: Digest,
        /// Its role: manifest, image index, config.
        role: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file given as the agent or stage0 is not a static x86_64 ELF executable.
    #[error("{}: not a static x86_64 ELF executable: {reason}", path.display())]
    NotStaticExecutable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The version an agent image would be tagged with is not a valid tag.
    #[error(
        "agent image version {version:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
    )]
    InvalidAgentVersion {
        /// The version given.
        version: String,
    },
    /// The agent image's layer holds something other than the agent and stage0.
    #[error("agent image layer: entry {entry:?}: {reason}")]
    AgentLayer {
        /// The entry's name.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// The agent image's layer is not a readable tar.
    #[error("agent image layer: {cause}")]
    AgentLayerTar {
        /// The tar reader's error.
        cause: io::Error,
    },
    /// An error from the format crate (boxed: it is large).
    #[error(transparent)]
    Format(Box<bundle_format::Error>),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

impl From<bundle_format::Error> for Error {
    fn from(e: bundle_format::Error) -> Error {
        Error::Format(Box::new(e))
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// Short for `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
