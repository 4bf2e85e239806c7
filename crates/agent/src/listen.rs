//! What every serving mode shares: the runtime, the listener, the startup line and the
//! signals that stop it.

use std::sync::Arc;

use anyhow::Context as _;
use bundle_oci::server::{Backend, serve};

/// Default listen address of every mode.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";

/// Serves `backend` on `addr` until SIGTERM or SIGINT.
pub fn run(addr: &str, backend: Backend) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr().context("local address")?;
        crate::say(&format!("listening on {local}"));
        serve(listener, Arc::new(backend), stop_signal()).await?;
        Ok(())
    })
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
