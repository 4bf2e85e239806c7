//! Errors of the server: [`ApiError`], what a client sees (an HTTP status and an OCI error
//! body), and [`Error`], what stops a server from starting or a store from working.

use std::path::PathBuf;

use http::StatusCode;

/// The OCI distribution error codes (distribution-spec, "Error Codes"), plus the few that
/// registries use beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Code {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content.
    DigestInvalid,
    /// Blob unknown to registry (referenced by a manifest).
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// The operation is unsupported (read-only registry, method not allowed).
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// Invalid number of results requested.
    PaginationNumberInvalid,
    /// Requested range not satisfiable.
    RangeInvalid,
    /// No such endpoint.
    NotFound,
    /// The store failed (disk, archive frame): not the client's fault.
    Internal,
}

impl Code {
    /// The wire name and the default status.
    pub fn parts(self) -> (&'static str, StatusCode) {
        use Code::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
            BlobUploadUnknown => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            DigestInvalid => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestBlobUnknown => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
            ManifestInvalid => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            SizeInvalid => ("SIZE_INVALID", StatusCode::BAD_REQUEST),
            Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            TooManyRequests => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            PaginationNumberInvalid => ("PAGINATION_NUMBER_INVALID", StatusCode::BAD_REQUEST),
            RangeInvalid => ("RANGE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
            NotFound => ("NOT_FOUND", StatusCode::NOT_FOUND),
            Internal => ("INTERNAL_ERROR", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

/// An error answer: status, code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// OCI error code.
    pub code: Code,
    /// HTTP status (the code's default unless overridden).
    pub status: StatusCode,
    /// Human message, naming the repository, digest or field at fault.
    pub message: String,
}

impl ApiError {
    /// An error with the code's default status.
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            status: code.parts().1,
            message: message.into(),
        }
    }

    /// The same error with another status.
    pub fn with_status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    /// The OCI error body: `{"errors":[{"code":...,"message":...}]}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "errors": [{ "code": self.code.parts().0, "message": self.message, "detail": null }]
        }))
        .unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code.parts().0,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// What stops a store or a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{path}: {op}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        cause: std::io::Error,
    },
    /// The archive could not be read.
    #[error(transparent)]
    Format(#[from] bundle_format::Error),
    /// Two images of an archive would be served under the same repository and tag.
    #[error("images {first} and {second} would both be served as {repo}:{tag}")]
    Collision {
        /// The first image name.
        first: String,
        /// The second.
        second: String,
        /// The repository both map to.
        repo: String,
        /// The tag both carry.
        tag: String,
    },
    /// An image of the archive cannot be served (bad name, bad manifest).
    #[error("image {name}: {reason}")]
    Image {
        /// Its name in the archive.
        name: String,
        /// Why.
        reason: String,
    },
    /// The listener failed.
    #[error("listening on {addr}: {cause}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        cause: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, cause: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            op,
            cause,
        }
    }
}

/// A store failure as the client sees it: a 500 naming the operation, while the details go
/// to the server's log.
impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::new(Code::Internal, e.to_string())
    }
}
