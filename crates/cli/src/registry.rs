//! Registry access shared by `create` (pulls) and `push`: TLS flags, credentials, the client.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bundle_oci::{Client, Direct, TlsOptions, auth::CredentialStore};

/// Flags every command that talks to registries takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Reach this registry (HOST[:PORT]) over plain HTTP, or TLS without verification (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Trust the CA certificates in this PEM file too (repeatable).
    #[arg(long = "registry-ca", value_name = "FILE")]
    pub ca_files: Vec<PathBuf>,
    /// Parallel blob transfers.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

impl RegistryArgs {
    /// A client with the user's docker credentials (`DOCKER_CONFIG` or `~/.docker/config.json`).
    pub fn client(&self) -> Result<Client> {
        let tls = TlsOptions {
            insecure: self.insecure.iter().cloned().collect(),
            ca_files: self.ca_files.clone(),
            // HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY, as docker and skopeo read them.
            proxy: bundle_oci::ProxyConfig::FromEnv,
        };
        let transport = Direct::new(&tls)?;
        let creds = CredentialStore::from_environment().context("reading docker credentials")?;
        Ok(Client::new(Arc::new(transport), creds, tls))
    }
}

/// A multi-threaded runtime for the commands that need one.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
