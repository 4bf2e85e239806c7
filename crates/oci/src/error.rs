//! The one error type of the distribution client.

use std::path::PathBuf;

use bundle_format::Digest;

/// A boxed error from a transport or body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong talking to a registry. Each variant names the registry,
/// repository, reference or digest at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reference that does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The text.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The registry could not be reached (DNS, connect, TLS, reset) even after retries. The
    /// message carries the cause's whole chain (hyper's "client error (Connect)" says little
    /// without the TLS or socket error under it); the cause is not a `source()` again, so a
    /// chain printer shows it once.
    #[error("{registry}: {action}: {}", chain(cause.as_ref()))]
    Transport {
        /// Registry host.
        registry: String,
        /// What was being done, e.g. `GET /v2/library/nginx/manifests/1.27`.
        action: String,
        /// The cause.
        cause: BoxError,
    },
    /// The registry answered with an unexpected status.
    #[error("{registry}: {action}: {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// Registry host.
        registry: String,
        /// What was being done.
        action: String,
        /// HTTP status.
        status: http::StatusCode,
        /// The start of the error body (OCI error JSON when the registry sends one).
        body: String,
    },
    /// Credentials were refused.
    #[error("{registry}: authentication failed for {scope}: {reason}")]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// The scope asked for.
        scope: String,
        /// What the registry or token service said.
        reason: String,
    },
    /// The manifest or tag does not exist.
    #[error("{reference}: not found in the registry ({what})")]
    NotFound {
        /// The reference.
        reference: String,
        /// What was missing.
        what: String,
    },
    /// Content does not hash to the digest it was asked for by, or the registry said another.
    #[error("{reference}: {what}: expected {expected}, got {found}")]
    DigestMismatch {
        /// Reference being pulled or pushed.
        reference: String,
        /// What: `manifest`, `blob`, `Docker-Content-Digest header`.
        what: String,
        /// Expected digest.
        expected: Digest,
        /// Digest found.
        found: Digest,
    },
    /// Content has another size than its descriptor.
    #[error("{reference}: blob {digest}: expected {expected} bytes, got {found}")]
    SizeMismatch {
        /// Reference.
        reference: String,
        /// Blob digest.
        digest: Digest,
        /// Expected size.
        expected: u64,
        /// Size found.
        found: u64,
    },
    /// A protocol violation: a header or document the spec does not allow.
    #[error("{registry}: {what}")]
    Protocol {
        /// Registry host.
        registry: String,
        /// What was wrong.
        what: String,
    },
    /// Credentials could not be read (docker config, helper).
    #[error("credentials for {registry}: {reason}")]
    Credentials {
        /// Registry host.
        registry: String,
        /// Why.
        reason: String,
    },
    /// A local file error.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A TLS configuration error (CA file, certificate).
    #[error("tls: {0}")]
    Tls(String),
    /// An error from the archive format.
    #[error(transparent)]
    Format(#[from] Box<bundle_format::Error>),
    /// An error from reading image layouts.
    #[error(transparent)]
    Layout(#[from] Box<bundle_layout::Error>),
    /// The lock file says another digest.
    #[error("{}: {reference} is locked to {locked}, the registry now has {found} (rerun without --locked to update the lock)", path.display())]
    LockDrift {
        /// The lock file.
        path: PathBuf,
        /// The reference.
        reference: String,
        /// Digest in the lock.
        locked: Digest,
        /// Digest the registry has.
        found: Digest,
    },
    /// An invalid argument (mapping rule, registry spec).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => {
                status.is_server_error() || *status == http::StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

impl From<bundle_format::Error> for Error {
    fn from(e: bundle_format::Error) -> Error {
        Error::Format(Box::new(e))
    }
}

impl From<bundle_layout::Error> for Error {
    fn from(e: bundle_layout::Error) -> Error {
        Error::Layout(Box::new(e))
    }
}

/// Short for `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, joined by `: `, each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}
