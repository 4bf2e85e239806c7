//! `bundle deploy` and `bundle remove`: flags in kubectl's habits, output for people and
//! `--json` for scripts, `--stats` for the timings.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bundle_deploy::{Options, Storage, Via};
use bundle_format::Archive;
use serde::Serialize;

/// Flags that pick the cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Path to the kubeconfig [default: $KUBECONFIG or ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use [default: its current context].
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace of the registry and everything deploy creates.
    #[arg(short, long, default_value = "bundle-system")]
    pub namespace: String,
}

/// `bundle deploy`.
#[derive(clap::Args, Debug, Clone)]
pub struct DeployArgs {
    /// The archive, one of its parts, or every part in order.
    #[arg(required = true)]
    pub archive: Vec<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Push to this registry (HOST[:PORT][/PREFIX], or http:// or https:// URL) directly
    /// instead of seeding one.
    #[arg(long)]
    pub registry: Option<String>,
    /// How pushes reach the seeded registry through the API server.
    #[arg(long, value_enum, default_value = "port-forward")]
    pub transport: Transport,
    /// NodePort of the seeded registry; nodes pull from 127.0.0.1:PORT.
    #[arg(long, default_value_t = 31999)]
    pub node_port: u16,
    /// Registry storage: auto (a PVC with the default StorageClass, else emptyDir), emptydir,
    /// or pvc:SIZE.
    #[arg(long, default_value = "auto")]
    pub storage: String,
    /// Ordered SRC_PREFIX=DST_PREFIX rules, as with `bundle push`.
    #[arg(long = "map", value_name = "SRC=DST")]
    pub maps: Vec<bundle_oci::push::MapRule>,
    /// How long a pod may take to become ready, in seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
    /// Print the plan without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Hash every frame against the archive's index before pushing it (as `bundle push --verify`).
    #[arg(long)]
    pub verify: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print timings, sizes and peak memory.
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub access: crate::registry::RegistryArgs,
}

/// `--transport`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Transport {
    /// A pool of `kubectl port-forward`-style tunnels (needs pods/portforward).
    PortForward,
    /// The pod proxy subresource (needs only pods/proxy).
    Proxy,
}

/// `bundle remove`.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Delete the registry's data (its PVC) too.
    #[arg(long)]
    pub purge: bool,
}

fn storage(s: &str) -> Result<Option<Storage>> {
    Ok(match s {
        "auto" => None,
        "emptydir" | "emptyDir" => Some(Storage::EmptyDir),
        other => match other.strip_prefix("pvc:") {
            Some(size) if !size.is_empty() => Some(Storage::Pvc(size.to_owned())),
            _ => bail!("--storage {other:?}: expected auto, emptydir or pvc:SIZE (e.g. pvc:50Gi)"),
        },
    })
}

#[derive(Serialize)]
struct JsonOut<'a> {
    registry: &'a str,
    namespace: &'a str,
    seeded: bool,
    images: Vec<JsonImage>,
    stats: JsonStats,
}

#[derive(Serialize)]
struct JsonImage {
    name: String,
    reference: String,
    digest: String,
}

#[derive(Serialize)]
struct JsonStats {
    seeding_seconds: Option<f64>,
    push_seconds: f64,
    total_seconds: f64,
    config_maps_created: u32,
    config_maps_existing: u32,
    config_map_bytes: u64,
    blobs_uploaded: u64,
    blobs_skipped: u64,
    bytes_sent: u64,
    peak_rss_bytes: Option<u64>,
}

/// Peak resident memory of this process (VmHWM).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `bundle deploy`.
pub fn deploy(args: DeployArgs) -> Result<()> {
    if let Some(registry) = &args.registry {
        if args.archive.len() != 1 {
            bail!("--registry pushes one archive (or one of its parts)");
        }
        // A URL works too: http:// means plain HTTP (as --insecure-registry HOST).
        let mut access = args.access.clone();
        let target = match registry.split_once("://") {
            Some(("http", rest)) => {
                let host = rest.split('/').next().unwrap_or_default();
                access.insecure.push(host.to_owned());
                rest
            }
            Some(("https", rest)) => rest,
            Some((scheme, _)) => {
                bail!("--registry {registry:?}: scheme {scheme:?} is not http or https")
            }
            None => registry.as_str(),
        };
        return crate::push(
            &args.archive[0],
            target,
            args.maps,
            Vec::new(),
            (Options::default().chunk_size, args.verify),
            &access,
        );
    }
    let archive = Arc::new(Archive::open_parts(&args.archive)?);
    let via = match args.transport {
        Transport::PortForward => Via::PortForward,
        Transport::Proxy => Via::Proxy,
    };
    let opts = Options {
        namespace: args.cluster.namespace.clone(),
        node_port: args.node_port,
        storage: storage(&args.storage)?,
        via,
        jobs: args.access.jobs.max(1),
        // The pod proxy takes whole bodies; keep each one small.
        chunk_size: match via {
            Via::PortForward => Options::default().chunk_size,
            Via::Proxy => 8 << 20,
        },
        maps: args.maps.clone(),
        timeout: Duration::from_secs(args.timeout),
        dry_run: args.dry_run,
        verify: args.verify,
        ..Options::default()
    };
    let rt = crate::registry::runtime()?;
    let say = |line: &str| eprintln!("{line}");
    let report = rt.block_on(async {
        let client = bundle_deploy::connect(
            args.cluster.kubeconfig.as_deref(),
            args.cluster.context.as_deref(),
        )
        .await?;
        bundle_deploy::deploy(&client, Arc::clone(&archive), &opts, &say).await
    })?;
    if args.dry_run {
        return Ok(());
    }
    let stats = JsonStats {
        seeding_seconds: report.stats.seeding.map(|d| d.as_secs_f64()),
        push_seconds: report.stats.push.as_secs_f64(),
        total_seconds: report.stats.total.as_secs_f64(),
        config_maps_created: report.stats.config_maps_created,
        config_maps_existing: report.stats.config_maps_existing,
        config_map_bytes: report.stats.config_map_bytes,
        blobs_uploaded: report.push.uploaded,
        blobs_skipped: report.push.skipped,
        bytes_sent: report.push.bytes_sent,
        peak_rss_bytes: peak_rss(),
    };
    let images: Vec<JsonImage> = report
        .push
        .images
        .iter()
        .map(|(name, to, digest)| JsonImage {
            name: name.clone(),
            reference: to.to_string(),
            digest: digest.to_string(),
        })
        .collect();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let out = JsonOut {
            registry: &report.registry,
            namespace: &opts.namespace,
            seeded: report.seeded,
            images,
            stats,
        };
        serde_json::to_writer_pretty(&mut stdout, &out).context("writing JSON")?;
        writeln!(stdout)?;
        return Ok(());
    }
    for i in &images {
        writeln!(stdout, "{} -> {} ({})", i.name, i.reference, i.digest)?;
    }
    writeln!(
        stdout,
        "deployed {} images into the registry at {} (namespace {}): {} blobs uploaded, {} already present, {} bytes sent",
        images.len(),
        report.registry,
        opts.namespace,
        stats.blobs_uploaded,
        stats.blobs_skipped,
        stats.bytes_sent
    )?;
    if args.stats {
        let mb = stats.bytes_sent as f64 / 1e6;
        writeln!(
            stdout,
            "stats: seeding {} | ConfigMaps {} created, {} existing, {} bytes | push {:.2} s ({:.1} MB/s) | total {:.2} s | peak RSS {} MiB",
            stats.seeding_seconds.map_or_else(
                || "skipped (registry exists)".to_owned(),
                |s| format!("{s:.2} s")
            ),
            stats.config_maps_created,
            stats.config_maps_existing,
            stats.config_map_bytes,
            stats.push_seconds,
            if stats.push_seconds > 0.0 {
                mb / stats.push_seconds
            } else {
                0.0
            },
            stats.total_seconds,
            stats.peak_rss_bytes.map_or(0, |b| b >> 20)
        )?;
    }
    Ok(())
}

/// `bundle remove`.
pub fn remove(args: RemoveArgs) -> Result<()> {
    let rt = crate::registry::runtime()?;
    let say = |line: &str| eprintln!("{line}");
    rt.block_on(async {
        let client = bundle_deploy::connect(
            args.cluster.kubeconfig.as_deref(),
            args.cluster.context.as_deref(),
        )
        .await?;
        bundle_deploy::remove(&client, &args.cluster.namespace, args.purge, &say).await
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_flag() -> Result<()> {
        assert_eq!(storage("auto")?, None);
        assert_eq!(storage("emptydir")?, Some(Storage::EmptyDir));
        assert_eq!(storage("pvc:5Gi")?, Some(Storage::Pvc("5Gi".into())));
        assert!(storage("pvc:").is_err());
        assert!(storage("disk").is_err());
        Ok(())
    }
}
