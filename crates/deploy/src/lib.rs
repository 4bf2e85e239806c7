//! `bundle deploy` and `bundle remove`: get every image of an archive into a registry inside a
//! cluster with nothing but a kubeconfig. Where the namespace has no bundle registry yet, one
//! is seeded: ConfigMaps carry stage0, the agent and the agent image; an injector pod serves
//! that image on a NodePort; the node pulls the registry from it; then every image is pushed
//! through the API server (port-forward or pod proxy) with the push code of bundle-oci, and
//! the registry switches to its own copy of the agent image. Every object has a deterministic
//! name and labels, every step first looks at what exists, so a re-run resumes.

pub mod cluster;
pub mod error;
pub mod objects;
pub mod seed;
pub mod tunnel;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bundle_format::{Archive, Digest};
use bundle_oci::push::{MapRule, PushOptions, PushReport, Target};
use bundle_oci::{Reference, TlsOptions, Transport};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::Semaphore;

pub use cluster::Via;
pub use error::{Error, Result};
pub use objects::Storage;
use objects::{INJECTOR, REGISTRY};
pub use seed::Seed;

/// How to deploy.
#[derive(Debug, Clone)]
pub struct Options {
    /// Namespace of everything deploy creates.
    pub namespace: String,
    /// NodePort of the registry; nodes pull from `127.0.0.1:<node_port>`.
    pub node_port: u16,
    /// `None`: a PVC when the cluster has a default StorageClass, else an emptyDir.
    pub storage: Option<Storage>,
    /// PVC size when a PVC is made.
    pub pvc_size: String,
    /// How pushes reach the registry.
    pub via: Via,
    /// Parallel pushes and ConfigMap creates.
    pub jobs: usize,
    /// Chunk size of large blob uploads.
    pub chunk_size: u64,
    /// Name mapping rules (as `bundle push --map`).
    pub maps: Vec<MapRule>,
    /// How long a pod may take to become ready.
    pub timeout: Duration,
    /// Only print what would happen.
    pub dry_run: bool,
    /// Hash every pushed frame against the archive's index before it leaves (as
    /// `bundle push --verify`); without it the frames' zstd checksums and the registry's
    /// digest check guard the content. Seed ConfigMap frames are always hashed.
    pub verify: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            namespace: "bundle-system".into(),
            node_port: objects::DEFAULT_NODE_PORT,
            storage: None,
            pvc_size: "20Gi".into(),
            via: Via::PortForward,
            jobs: 8,
            chunk_size: bundle_oci::push::DEFAULT_CHUNK,
            maps: Vec::new(),
            timeout: Duration::from_secs(180),
            dry_run: false,
            verify: false,
        }
    }
}

/// Timings and counts of one deploy.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// From the first ConfigMap to the seed registry ready; `None` when the registry existed.
    pub seeding: Option<Duration>,
    /// ConfigMaps created now.
    pub config_maps_created: u32,
    /// ConfigMaps found from an earlier run.
    pub config_maps_existing: u32,
    /// Bytes of ConfigMap data sent now.
    pub config_map_bytes: u64,
    /// The push.
    pub push: Duration,
    /// Switching the registry to its own image and removing the injector.
    pub finish: Duration,
    /// The whole deploy.
    pub total: Duration,
}

/// What a deploy did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The registry as nodes reach it, `127.0.0.1:<nodePort>`.
    pub registry: String,
    /// Whether this run seeded the registry.
    pub seeded: bool,
    /// The storage the registry uses.
    pub storage: Option<Storage>,
    /// The push.
    pub push: PushReport,
    /// Timings.
    pub stats: Stats,
}

/// Progress lines for the user.
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// A client for the cluster of `context` (default: the current one) in `kubeconfig` (default:
/// `$KUBECONFIG` or `~/.kube/config`), checked by asking the server its version.
pub async fn connect(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<Client> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let shown = kubeconfig.map_or_else(
        || {
            std::env::var_os("KUBECONFIG").map_or_else(
                || std::path::PathBuf::from("~/.kube/config"),
                std::path::PathBuf::from,
            )
        },
        std::path::Path::to_path_buf,
    );
    let kc = match kubeconfig {
        Some(p) => Kubeconfig::read_from(p),
        None => Kubeconfig::read(),
    }
    .map_err(|e| Error::Kubeconfig {
        path: shown.clone(),
        cause: e.to_string(),
    })?;
    if let Some(c) = context
        && !kc.contexts.iter().any(|n| n.name == c)
    {
        return Err(Error::Kubeconfig {
            path: shown,
            cause: format!(
                "no context {c:?} (it has: {})",
                kc.contexts
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let opts = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .map_err(|e| Error::Kubeconfig {
            path: shown.clone(),
            cause: e.to_string(),
        })?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| Error::Kubeconfig {
        path: shown,
        cause: error::describe(&e),
    })?;
    client
        .apiserver_version()
        .await
        .map_err(|e| Error::Unreachable {
            server,
            cause: error::describe(&e),
        })?;
    Ok(client)
}

/// The state of the registry in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RegistryState {
    /// No Deployment.
    Absent,
    /// A Deployment runs an image from elsewhere (the injector): seeding was interrupted.
    Seeding,
    /// The registry runs from its own copy of the agent image.
    SelfHosted,
}

fn self_hosted_prefix(node_port: u16) -> String {
    format!("127.0.0.1:{node_port}/")
}

fn deployment_image(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}

/// The reference the registry Deployment runs once self-hosted.
fn agent_ref(target: &Target, seed_name: &str, digest: &Digest) -> Result<String> {
    let r: Reference = target.map(seed_name)?;
    Ok(format!("{}/{}@{digest}", r.registry, r.repository))
}

/// Deploys `archive` into the cluster `client` talks to.
pub async fn deploy(
    client: &Client,
    archive: Arc<Archive>,
    opts: &Options,
    progress: Progress<'_>,
) -> Result<Report> {
    let tunnels = |pod: &str| -> Result<Arc<dyn Transport>> {
        Ok(match opts.via {
            Via::PortForward => Arc::new(tunnel::PortForward::new(
                client.clone(),
                &opts.namespace,
                pod,
                objects::AGENT_PORT,
                opts.jobs,
            )),
            Via::Proxy => Arc::new(tunnel::Proxy::new(
                client.clone(),
                &opts.namespace,
                pod,
                objects::AGENT_PORT,
            )),
        })
    };
    deploy_with(client, archive, opts, progress, &tunnels).await
}

/// Makes the transport to a registry pod.
pub type Tunnels<'a> = &'a (dyn Fn(&str) -> Result<Arc<dyn Transport>> + Sync);

/// [`deploy`] with the transport to the registry pod made by `tunnels` (tests reach an
/// in-process registry this way, below the line where a real API server is needed).
pub async fn deploy_with(
    client: &Client,
    archive: Arc<Archive>,
    opts: &Options,
    progress: Progress<'_>,
    tunnels: Tunnels<'_>,
) -> Result<Report> {
    let total = Instant::now();
    let ns = opts.namespace.as_str();
    let mut stats = Stats::default();
    let target = Target {
        registry: format!("127.0.0.1:{}", opts.node_port),
        prefix: None,
        maps: opts.maps.clone(),
    };
    // Map every name first: a bad --map rule fails before the cluster is touched.
    for img in &archive.index().images {
        target.map(&img.name)?;
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let (state, registry) = registry_state(&deployments, ns, opts.node_port).await?;
    let rolled_out = registry.as_ref().is_some_and(cluster::rollout_done);
    let seeding = state != RegistryState::SelfHosted;
    let want_pvc = opts
        .storage
        .as_ref()
        .is_none_or(|s| matches!(s, Storage::Pvc(_)));
    let missing =
        cluster::missing(client, ns, &cluster::needs(seeding, opts.via, want_pvc)).await?;
    if !missing.is_empty() {
        return Err(Error::Forbidden {
            namespace: ns.to_owned(),
            missing: missing.iter().map(cluster::Need::describe).collect(),
        });
    }

    let mut plan = Vec::new();
    let mut seed = None;
    let mut storage = None;
    if seeding {
        let s = Seed::from_archive(&archive)?;
        plan.push(format!(
            "seed a registry in namespace {ns}: {} ConfigMaps ({} bytes: stage0 {} B, agent {} parts, agent image {} frames)",
            s.maps().count(),
            s.bytes(),
            s.stage0.size,
            s.agent_parts.len(),
            s.payload.len() - 1
        ));
        storage = Some(match &opts.storage {
            Some(st) => st.clone(),
            None => match cluster::default_storage_class(client).await? {
                Some(_) => Storage::Pvc(opts.pvc_size.clone()),
                None => Storage::EmptyDir,
            },
        });
        seed = Some(s);
    } else {
        plan.push(format!("reuse the registry deployment {ns}/{REGISTRY}"));
    }
    plan.push(format!(
        "push {} images to 127.0.0.1:{} through the API server ({})",
        archive.index().images.len(),
        opts.node_port,
        match opts.via {
            Via::PortForward => "port-forward",
            Via::Proxy => "pod proxy",
        }
    ));
    if opts.dry_run {
        if let Some(s) = &seed {
            let (nodes, pods) = cluster::nodes_and_pods(client).await?;
            match cluster::place(&nodes, &pods, 32 << 20) {
                Ok(p) => plan.push(format!(
                    "run the injector on node {} from image {} ({} bytes), stage0 -> agent sha256:{}",
                    p.node, p.image, p.image_bytes, s.agent_sha256
                )),
                Err(e) => plan.push(format!("fail to place the injector: {e}")),
            }
            plan.push(format!(
                "create the registry: deployment {ns}/{REGISTRY}, NodePort {}, storage {}",
                opts.node_port,
                match &storage {
                    Some(Storage::Pvc(size)) => format!("PVC {size}"),
                    _ => "emptyDir (data lost with the pod)".into(),
                }
            ));
        }
        for line in &plan {
            progress(&format!("would {line}"));
        }
        return Ok(Report {
            registry: target.registry.clone(),
            seeded: false,
            storage,
            push: PushReport::default(),
            stats,
        });
    }
    for line in &plan {
        progress(line);
    }

    let created_ns = cluster::ensure_namespace(client, ns, state != RegistryState::Absent).await?;
    if created_ns {
        progress(&format!("created namespace {ns}"));
    }
    let archive_id = archive.id().hex();
    // A run interrupted while the registry switched to its own image (or whose switch
    // failed) waits for that rollout before pushing into it, and keeps the injector until
    // it is done: the new pod may still need to pull from the old one.
    if state == RegistryState::SelfHosted && !rolled_out {
        progress("the registry is still switching to its own image; waiting for that rollout");
        cluster::wait_rollout(client, ns, REGISTRY, opts.timeout, true).await?;
    }

    // A run interrupted after the registry came up (still on the injector's image) goes
    // straight to the push.
    let registry_up = state == RegistryState::Seeding
        && rolled_out
        && cluster::ready_pod(client, ns, REGISTRY).await?.is_some();
    if let (Some(s), Some(st), false) = (&seed, &storage, registry_up) {
        if *st == Storage::EmptyDir {
            progress(
                "WARNING: the cluster has no default StorageClass; the registry keeps its data in an emptyDir and loses every image when its pod goes. Pass --storage pvc:SIZE with a StorageClass, or re-run deploy after a restart.",
            );
        }
        let t = Instant::now();
        seed_registry(
            client,
            &archive,
            s,
            st,
            opts,
            &archive_id,
            &mut stats,
            progress,
        )
        .await?;
        stats.seeding = Some(t.elapsed());
        progress(&format!(
            "seed registry ready in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }

    // Run the registry from its own copy of the agent image before the bulk push: the
    // switch replaces the pod, and an emptyDir goes with the old one. The agent image goes
    // first into the registry as the injector left it; the new pod pulls it from there
    // (RollingUpdate keeps the old pod serving until the new one is ready).
    let t = Instant::now();
    if let Some(s) = &seed {
        let pod = ready_registry_pod(client, ns).await?;
        push_via(
            tunnels(&pod)?,
            &target,
            Arc::clone(&archive),
            opts,
            vec![s.agent_name.clone()],
        )
        .await?;
        let image = agent_ref(&target, &s.agent_name, &s.agent_digest)?;
        set_registry_image(&deployments, ns, &image).await?;
        cluster::wait_rollout(client, ns, REGISTRY, opts.timeout, true).await?;
        cluster::wait_old_pods_gone(client, ns, REGISTRY, opts.timeout).await?;
        progress(&format!("registry now runs {image}"));
    }
    stats.finish = t.elapsed();

    // Push everything through the API server into the (new) registry pod.
    let t = Instant::now();
    let pod = ready_registry_pod(client, ns).await?;
    let push = push_via(
        tunnels(&pod)?,
        &target,
        Arc::clone(&archive),
        opts,
        Vec::new(),
    )
    .await?;
    stats.push = t.elapsed();

    let t = Instant::now();
    clean_injector(client, ns, progress).await?;
    stats.finish += t.elapsed();
    stats.total = total.elapsed();
    Ok(Report {
        registry: target.registry.clone(),
        seeded: seed.is_some(),
        storage,
        push,
        stats,
    })
}

/// Points the registry Deployment's container at `image` (a rollout follows).
async fn set_registry_image(deployments: &Api<Deployment>, ns: &str, image: &str) -> Result<()> {
    let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "registry", "image": image}]}}}});
    deployments
        .patch(REGISTRY, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map_err(|e| {
            Error::api(
                format!("patch deployment {ns}/{REGISTRY} (image {image})"),
                e,
            )
        })?;
    Ok(())
}

async fn ready_registry_pod(client: &Client, ns: &str) -> Result<String> {
    cluster::ready_pod(client, ns, REGISTRY)
        .await?
        .ok_or_else(|| Error::NotReady {
            what: format!("deployment {ns}/{REGISTRY}"),
            seconds: 0,
            state: "no ready pod".into(),
            events: Vec::new(),
            hint: String::new(),
        })
}

/// The registry Deployment, if any, and what state it is in.
async fn registry_state(
    deployments: &Api<Deployment>,
    ns: &str,
    node_port: u16,
) -> Result<(RegistryState, Option<Deployment>)> {
    let found = cluster::get(deployments, Some(ns), REGISTRY).await?;
    let state = match &found {
        None => RegistryState::Absent,
        Some(d) => {
            let image = deployment_image(d).unwrap_or_default();
            if image.starts_with(&self_hosted_prefix(node_port)) {
                RegistryState::SelfHosted
            } else {
                RegistryState::Seeding
            }
        }
    };
    Ok((state, found))
}

/// Pushes the images of the archive (all, or those named) through `transport` to the
/// registry `target` names.
pub async fn push_via(
    transport: Arc<dyn Transport>,
    target: &Target,
    archive: Arc<Archive>,
    opts: &Options,
    images: Vec<String>,
) -> Result<PushReport> {
    let mut tls = TlsOptions::default();
    tls.insecure.insert(target.registry.clone());
    let client =
        bundle_oci::Client::new(transport, bundle_oci::auth::CredentialStore::empty(), tls);
    let report = bundle_oci::push::push(
        &client,
        archive,
        &PushOptions {
            target: target.clone(),
            images,
            jobs: opts.jobs,
            chunk_size: opts.chunk_size,
            verify: opts.verify,
        },
    )
    .await
    .map_err(|e| registry_error(&opts.namespace, e))?;
    Ok(report)
}

/// A push error, with the full-volume case named (the agent answers 500 with the errno text).
fn registry_error(namespace: &str, e: bundle_oci::Error) -> Error {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&c.to_string());
        cause = c.source();
    }
    if text.contains("No space left on device") || text.contains("os error 28") {
        Error::RegistryFull {
            namespace: namespace.to_owned(),
            cause: Box::new(e),
        }
    } else {
        Error::Oci(e)
    }
}

/// The node ports a Service holds.
fn node_ports(svc: &Service) -> Vec<i32> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| p.node_port)
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn seed_registry(
    client: &Client,
    archive: &Archive,
    seed: &Seed,
    storage: &Storage,
    opts: &Options,
    archive_id: &str,
    stats: &mut Stats,
    progress: Progress<'_>,
) -> Result<()> {
    let ns = opts.namespace.as_str();
    // 1. Where the injector runs: its pod from an earlier run, else a node that holds an
    //    image (checked before any ConfigMap or pod is made; a failure leaves at most the
    //    namespace, which the next run reuses).
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pod_name = objects::injector_pod_name(&seed.agent_digest);
    let existing_pod = cluster::get(&pods, Some(ns), &pod_name).await?;
    let mut create_pod = None;
    let node = match existing_pod
        .as_ref()
        .and_then(|p| p.spec.as_ref()?.node_name.clone())
    {
        Some(n) => n,
        None => {
            let (nodes, all_pods) = cluster::nodes_and_pods(client).await?;
            let place = cluster::place(&nodes, &all_pods, 32 << 20)?;
            progress(&format!(
                "injector: node {} with image {} ({} bytes)",
                place.node, place.image, place.image_bytes
            ));
            let pod = objects::injector_pod(&objects::InjectorSpec {
                name: pod_name.clone(),
                node: &place.node,
                image: &place.image,
                stage0: &seed.stage0,
                agent_parts: &seed.agent_parts,
                agent_sha256: &seed.agent_sha256,
                payload: &seed.payload,
                payload_id: &seed.payload_id,
                archive_id,
            })?;
            create_pod = Some(pod);
            place.node
        }
    };
    // The services first: kube-proxy needs a moment to program a new NodePort, which it
    // gets while the ConfigMaps go up and the injector starts. The registry's fixed port is
    // taken before the injector's is allocated, so that the allocator cannot hand it to the
    // injector; an injector Service an earlier run left on that port is made again.
    if let Some(old) = cluster::get(&services, Some(ns), INJECTOR).await?
        && node_ports(&old).contains(&i32::from(opts.node_port))
    {
        cluster::delete(&services, Some(ns), INJECTOR).await?;
    }
    let reg_svc = objects::node_port_service(REGISTRY, "registry", opts.node_port, archive_id)?;
    cluster::ensure(&services, Some(ns), &reg_svc).await?;
    let inj_svc = objects::node_port_service(INJECTOR, "injector", 0, archive_id)?;
    cluster::ensure(&services, Some(ns), &inj_svc).await?;

    // 2. ConfigMaps, in parallel, skipping those an earlier run made; then the injector pod.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let existing: std::collections::BTreeSet<String> =
        cluster::names(&cms, Some(ns), objects::SEED_SELECTOR)
            .await?
            .into_iter()
            .collect();
    let sem = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let mut tasks = Vec::new();
    for m in seed.maps() {
        if existing.contains(&m.name()) {
            stats.config_maps_existing += 1;
            continue;
        }
        let data = seed.data(archive, m)?;
        stats.config_map_bytes += data.len() as u64;
        let cm = objects::seed_config_map(m, data, archive_id);
        let cms = cms.clone();
        let sem = Arc::clone(&sem);
        tasks.push(async move {
            let _permit = sem
                .acquire()
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?;
            cluster::create(&cms, Some(ns), &cm).await
        });
    }
    for r in futures_util::future::join_all(tasks).await {
        match r? {
            cluster::Created::New => stats.config_maps_created += 1,
            cluster::Created::Existed => stats.config_maps_existing += 1,
        }
    }
    progress(&format!(
        "ConfigMaps: {} created, {} already there",
        stats.config_maps_created, stats.config_maps_existing
    ));

    if let Some(pod) = create_pod {
        cluster::create(&pods, Some(ns), &pod).await?;
    }
    cluster::wait_pod(client, ns, &pod_name, opts.timeout).await?;
    progress(&format!("injector {pod_name} ready"));
    let svc = cluster::get(&services, Some(ns), INJECTOR)
        .await?
        .ok_or_else(|| Error::Invalid(format!("service {ns}/{INJECTOR} vanished")))?;
    let inj_port = svc
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().and_then(|p| p.node_port))
        .ok_or_else(|| Error::Invalid(format!("service {ns}/{INJECTOR} has no nodePort")))?;

    // 3. The registry: its service, volume and Deployment, the node pulling the agent image
    //    from the injector at 127.0.0.1:<injector nodePort>.
    if let Storage::Pvc(size) = storage {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        cluster::ensure(&pvcs, Some(ns), &objects::registry_pvc(size, archive_id)?).await?;
    }
    let injector_target = Target {
        registry: format!("127.0.0.1:{inj_port}"),
        prefix: None,
        maps: Vec::new(),
    };
    let image = agent_ref(&injector_target, &seed.agent_name, &seed.agent_digest)?;
    let pin = match storage {
        Storage::Pvc(_) => Some(node.as_str()),
        Storage::EmptyDir => None,
    };
    let deployment = objects::registry_deployment(&image, storage, pin, archive_id)?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    if cluster::ensure(&deployments, Some(ns), &deployment).await? == cluster::Created::Existed {
        // An interrupted run left it pointing at an injector port that may have changed.
        set_registry_image(&deployments, ns, &image).await?;
    }
    cluster::wait_rollout(client, ns, REGISTRY, opts.timeout, true).await?;
    Ok(())
}

/// Deletes the injector pods, their service and the seeding ConfigMaps.
async fn clean_injector(client: &Client, ns: &str, progress: Progress<'_>) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut n = 0;
    for p in cluster::names(
        &pods,
        Some(ns),
        "app.kubernetes.io/managed-by=bundle,bundle/role=injector",
    )
    .await?
    {
        n += u32::from(cluster::delete(&pods, Some(ns), &p).await?);
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    n += u32::from(cluster::delete(&services, Some(ns), INJECTOR).await?);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for c in cluster::names(&cms, Some(ns), objects::SEED_SELECTOR).await? {
        n += u32::from(cluster::delete(&cms, Some(ns), &c).await?);
    }
    if n > 0 {
        progress(&format!(
            "removed the injector and its ConfigMaps ({n} objects)"
        ));
    }
    Ok(())
}

/// Deletes everything deploy made in the namespace; the registry's PVC only with `purge`.
pub async fn remove(client: &Client, ns: &str, purge: bool, progress: Progress<'_>) -> Result<u32> {
    clean_injector(client, ns, progress).await?;
    let mut n = 0;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    n += u32::from(cluster::delete(&deployments, Some(ns), REGISTRY).await?);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    n += u32::from(cluster::delete(&services, Some(ns), REGISTRY).await?);
    if purge {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        n += u32::from(cluster::delete(&pvcs, Some(ns), REGISTRY).await?);
    }
    progress(&format!(
        "removed the registry from {ns} ({n} objects){}",
        if purge {
            ", data included"
        } else {
            "; its data (PVC) stays unless --purge"
        }
    ));
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_registry_volume_is_named_with_what_to_do() {
        let e = registry_error(
            "ns",
            bundle_oci::Error::Invalid(
                "PUT /v2/x/blobs/uploads/1: 500 INTERNAL_ERROR: /var/lib/bundle-registry/uploads/1/data: write: No space left on device (os error 28)".into(),
            ),
        );
        let text = e.to_string();
        assert!(matches!(e, Error::RegistryFull { .. }), "{text}");
        assert!(text.contains("Grow the PVC bundle-registry"), "{text}");
        let other = registry_error(
            "ns",
            bundle_oci::Error::Invalid("500 INTERNAL_ERROR: boom".into()),
        );
        assert!(matches!(other, Error::Oci(_)));
    }
}
