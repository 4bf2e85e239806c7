//! The one error type of bundle-deploy. Every variant says what happened and, where the user
//! can act, what to do.

use std::path::PathBuf;

/// What went wrong in a deploy or remove.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kubeconfig could not be read or has no such context.
    #[error("kubeconfig {path}: {cause}")]
    Kubeconfig {
        /// The file (or the default search path).
        path: PathBuf,
        /// Why.
        cause: String,
    },
    /// The API server did not answer.
    #[error(
        "cannot reach the Kubernetes API server at {server}: {cause}\n  hint: check --kubeconfig and --context, and that the cluster is up (kubectl get --raw /version)"
    )]
    Unreachable {
        /// The server URL from the kubeconfig.
        server: String,
        /// The transport error.
        cause: String,
    },
    /// A call to the API server failed.
    #[error("{what}: {}", describe(cause))]
    Api {
        /// What was being done, e.g. `create configmap bundle-system/bundle-c-...`.
        what: String,
        /// The API server's answer.
        cause: Box<kube::Error>,
    },
    /// The user lacks permissions deploy needs.
    #[error(
        "the current user may not do what deploy needs in namespace {namespace}:\n{}\n  hint: bind the Role in the README's \"Permissions\" section",
        .missing.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n")
    )]
    Forbidden {
        /// The namespace checked.
        namespace: String,
        /// Each missing permission, e.g. `create configmaps`.
        missing: Vec<String>,
    },
    /// The namespace is being deleted.
    #[error(
        "namespace {0} is being deleted (phase Terminating); wait until it is gone and run deploy again, or pick another with -n"
    )]
    NamespaceTerminating(String),
    /// No node can run the injector.
    #[error(
        "no node can run the injector pod:\n{}\n  hint: deploy needs one Ready, schedulable linux/amd64 node without NoSchedule taints",
        .reasons.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n")
    )]
    NoNode {
        /// Why each node was passed over.
        reasons: Vec<String>,
    },
    /// A pod did not become ready.
    #[error("{what} did not become ready within {seconds} s: {state}{}{hint}",
        if .events.is_empty() { String::new() } else { format!("\n  events:\n{}", .events.iter().map(|e| format!("    {e}")).collect::<Vec<_>>().join("\n")) })]
    NotReady {
        /// The pod or deployment.
        what: String,
        /// How long deploy waited.
        seconds: u64,
        /// The last state seen.
        state: String,
        /// Recent events of the pod.
        events: Vec<String>,
        /// What to try, or empty.
        hint: String,
    },
    /// The archive lacks what seeding needs.
    #[error("{archive}: {reason}")]
    Archive {
        /// The archive's id.
        archive: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// Reading the archive failed (a frame does not match its sha256, a part is missing).
    #[error(transparent)]
    Format(#[from] bundle_format::Error),
    /// The registry protocol failed.
    #[error(transparent)]
    Oci(#[from] bundle_oci::Error),
    /// The agent image in the archive is malformed.
    #[error(transparent)]
    Layout(#[from] bundle_layout::Error),
    /// The registry's volume is full.
    #[error(
        "the registry in namespace {namespace} ran out of space: {cause}\n  hint: its volume is full. Grow the PVC bundle-registry (if its StorageClass allows expansion), or deploy into a new namespace with --storage pvc:SIZE; deploy resumes where it stopped"
    )]
    RegistryFull {
        /// The namespace of the registry.
        namespace: String,
        /// The registry's answer.
        cause: Box<bundle_oci::Error>,
    },
    /// A tunnel to a pod could not be opened.
    #[error("tunnel to pod {namespace}/{pod} port {port}: {cause}")]
    Tunnel {
        /// Namespace of the pod.
        namespace: String,
        /// The pod.
        pod: String,
        /// Its port.
        port: u16,
        /// Why.
        cause: String,
    },
    /// A command-line value is not usable.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an API error with what was being done.
    pub fn api(what: impl Into<String>, cause: kube::Error) -> Error {
        Error::Api {
            what: what.into(),
            cause: Box::new(cause),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An API error in one line: the server's message with its reason and code, or the
/// transport error's chain.
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => {
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(c) = cause {
                let t = c.to_string();
                if !text.contains(&t) {
                    text.push_str(": ");
                    text.push_str(&t);
                }
                cause = c.source();
            }
            text
        }
    }
}

/// The HTTP status of an API error, if the server answered.
pub(crate) fn status_of(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
