//! `deploy_with` and `remove` against the fake API server, pushing into a real in-process
//! registry: what each run creates, sends, patches and deletes, and how it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bundle_deploy::objects::{self, SEED_SELECTOR};
use bundle_deploy::{Error, Options, Report, Seed, Storage};
use bundle_format::Digest;
use bundle_oci::push::Target;
use bundle_oci::server::archive::Payload;
use http::Method;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use serde_json::Value;

use crate::fake_api::{FakeApi, Pods, Recorded, State, event, node, storage_class};
use crate::fixtures::{AGENT_NAME, BoxResult, Registry, TestArchive, archive};

const NS: &str = "bundle-system";
const INJECTOR_SELECTOR: &str = "app.kubernetes.io/managed-by=bundle,bundle/role=injector";

/// Three nodes: the one with the smallest image among the usable ones is `node-b`.
fn cluster() -> State {
    let mut s = State::new();
    let mut tainted = node("node-c", &[("docker.io/library/busybox:1.37", 4_000)]);
    tainted["spec"]["taints"] = serde_json::json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]);
    s.nodes = vec![
        node("node-a", &[("docker.io/library/postgres:16", 400_000_000)]),
        node(
            "node-b",
            &[
                ("docker.io/library/nginx:1.27", 70_000_000),
                ("registry.k8s.io/pause:3.10", 320_000),
            ],
        ),
        tainted,
    ];
    s.storage_classes = vec![
        storage_class("slow", false),
        storage_class("local-path", true),
    ];
    s
}

fn opts() -> Options {
    Options {
        jobs: 4,
        timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

struct Env {
    client: kube::Client,
    api: FakeApi,
    registry: Registry,
    archive: TestArchive,
    lines: Arc<Mutex<Vec<String>>>,
}

async fn env(state: State, with_agent: bool) -> BoxResult<Env> {
    let (client, api) = FakeApi::start(state);
    Ok(Env {
        client,
        api,
        registry: Registry::start().await?,
        archive: archive(with_agent)?,
        lines: Arc::default(),
    })
}

impl Env {
    async fn deploy(&self, opts: &Options) -> bundle_deploy::Result<Report> {
        let lines = Arc::clone(&self.lines);
        let progress = move |l: &str| {
            lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(l.to_owned());
        };
        #[allow(
            clippy::result_large_err,
            reason = "the signature of deploy_with's tunnels"
        )]
        let tunnels = |pod: &str| self.registry.tunnel(pod);
        bundle_deploy::deploy_with(
            &self.client,
            Arc::clone(&self.archive.archive),
            opts,
            &progress,
            &tunnels,
        )
        .await
    }

    async fn remove(&self, purge: bool) -> bundle_deploy::Result<u32> {
        let lines = Arc::clone(&self.lines);
        let progress = move |l: &str| {
            lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(l.to_owned());
        };
        bundle_deploy::remove(&self.client, NS, purge, &progress).await
    }

    fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn seed(&self) -> BoxResult<Seed> {
        Ok(Seed::from_archive(&self.archive.archive)?)
    }

    /// The mutating requests since `mark`, one line each.
    fn mutations_since(&self, mark: usize) -> Vec<String> {
        self.api
            .with(|s| s.mutations_since(mark).iter().map(|r| r.line()).collect())
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> BoxResult<T> {
    Ok(serde_json::from_value(v.clone())?)
}

/// The bodies of the successful creates of `resource` from request `since` on.
fn created<T: serde::de::DeserializeOwned>(
    s: &State,
    resource: &str,
    since: usize,
) -> BoxResult<Vec<T>> {
    s.requests
        .iter()
        .skip(since)
        .filter(|r| r.method == Method::POST && r.resource == resource && r.succeeded())
        .map(|r| typed(r.body.as_ref().ok_or("a create without a body")?))
        .collect()
}

/// How often each name was created (successfully) from request `since` on.
fn create_counts(s: &State, resource: &str, since: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in s.requests.iter().skip(since) {
        if r.method == Method::POST && r.resource == resource && r.succeeded() {
            *m.entry(r.name.clone().unwrap_or_default()).or_insert(0) += 1;
        }
    }
    m
}

fn seed_names(seed: &Seed) -> BTreeSet<String> {
    seed.maps().map(objects::SeedMap::name).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    Digest::of(b).hex()
}

fn binary(cm: &ConfigMap) -> BoxResult<(String, Vec<u8>)> {
    let data = cm
        .binary_data
        .as_ref()
        .ok_or("a seed ConfigMap without binaryData")?;
    if data.len() != 1 || cm.data.is_some() {
        return Err(format!(
            "{:?} must hold exactly one binaryData key",
            cm.metadata.name
        )
        .into());
    }
    let (k, v) = data.iter().next().ok_or("empty binaryData")?;
    Ok((k.clone(), v.0.clone()))
}

fn container_image(d: &Deployment) -> Option<String> {
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

/// What must be gone once a deploy finished: injector pods and service, seed ConfigMaps.
fn assert_no_injector_left(s: &State) {
    assert_eq!(
        s.names("configmaps", NS, SEED_SELECTOR),
        Vec::<String>::new(),
        "seed ConfigMaps left"
    );
    assert_eq!(
        s.names("pods", NS, INJECTOR_SELECTOR),
        Vec::<String>::new(),
        "injector pods left"
    );
    assert!(
        s.object("services", NS, objects::INJECTOR).is_none(),
        "injector service left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_deploy_seeds_pushes_switches_to_its_own_image_and_cleans_up() -> BoxResult {
    let env = env(cluster(), true).await?;
    let report = env.deploy(&opts()).await?;
    let archive = &env.archive.archive;
    let seed = env.seed()?;
    let agent_digest = env.archive.agent_digest()?;
    let archive_id = archive.id().hex();

    // The report.
    assert!(report.seeded);
    assert_eq!(report.registry, "127.0.0.1:31999");
    assert_eq!(report.storage, Some(Storage::Pvc("20Gi".into())));
    let n_maps = seed.maps().count();
    assert_eq!(report.stats.config_maps_created as usize, n_maps);
    assert_eq!(report.stats.config_maps_existing, 0);
    assert_eq!(report.stats.config_map_bytes, seed.bytes());
    assert!(report.stats.seeding.is_some());
    assert_eq!(report.push.images.len(), archive.index().images.len());
    assert!(report.push.uploaded > 0);

    env.api.with(|s| -> BoxResult {
        // The namespace, created once and labelled.
        let ns_creates = s.calls(&Method::POST, "namespaces");
        assert_eq!(ns_creates.len(), 1);
        assert_eq!(ns_creates[0].name.as_deref(), Some(NS));
        let ns = s.object("namespaces", "", NS).ok_or("no namespace")?;
        assert_eq!(
            ns["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "bundle"
        );

        // Every seed ConfigMap created exactly once, immutable, labelled, one binaryData key.
        let counts = create_counts(s, "configmaps", 0);
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            seed_names(&seed)
        );
        assert!(counts.values().all(|&c| c == 1), "{counts:?}");
        assert_eq!(
            s.calls(&Method::POST, "configmaps").len(),
            n_maps,
            "no create was repeated"
        );
        let cms: Vec<ConfigMap> = created(s, "configmaps", 0)?;
        let mut by_key = BTreeMap::new();
        for cm in &cms {
            assert_eq!(cm.immutable, Some(true), "{:?}", cm.metadata.name);
            let labels = cm.metadata.labels.clone().unwrap_or_default();
            assert_eq!(labels.get("bundle/role").map(String::as_str), Some("seed"));
            assert_eq!(
                labels
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str),
                Some("bundle")
            );
            assert_eq!(
                labels.get("bundle/archive").map(String::as_str),
                Some(&archive_id[..32])
            );
            let (key, data) = binary(cm)?;
            by_key.insert(key, (cm.metadata.name.clone().unwrap_or_default(), data));
        }
        let total: usize = by_key.values().map(|(_, d)| d.len()).sum();
        assert_eq!(total as u64, report.stats.config_map_bytes);

        // stage0, byte for byte.
        let (stage0_name, stage0) = by_key.get("stage0").ok_or("no stage0 ConfigMap")?;
        assert_eq!(stage0, &env.archive.stage0);
        assert_eq!(
            stage0_name,
            &format!("bundle-stage0-{}", &sha256_hex(stage0)[..40])
        );

        // The injector pod: on node-b from its smallest image, running stage0 over the parts.
        let pods: Vec<Pod> = created(s, "pods", 0)?;
        assert_eq!(pods.len(), 1);
        let pod = &pods[0];
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some(objects::injector_pod_name(&agent_digest).as_str())
        );
        let spec = pod.spec.as_ref().ok_or("pod without spec")?;
        assert_eq!(spec.node_name.as_deref(), Some("node-b"));
        let c = spec.containers.first().ok_or("pod without container")?;
        assert_eq!(c.image.as_deref(), Some("registry.k8s.io/pause:3.10"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(
            c.command.clone().unwrap_or_default(),
            ["/bundle/stage0/stage0"]
        );
        let args = c.args.clone().unwrap_or_default();
        let sep = args
            .iter()
            .position(|a| a == "--")
            .ok_or("no -- in the args")?;
        assert_eq!(
            args[..3],
            [
                "--fallback-dir",
                "/tmp",
                sha256_hex(&env.archive.agent).as_str()
            ]
        );
        // The parts in the args, in order, join to the agent.
        let mut joined = Vec::new();
        for a in &args[3..sep] {
            let key = a
                .strip_prefix("/bundle/agent/")
                .ok_or(format!("part arg {a}"))?;
            let (name, data) = by_key
                .get(key)
                .ok_or(format!("no ConfigMap for part {key}"))?;
            assert!(name.starts_with("bundle-agent-"), "{name}");
            joined.extend_from_slice(data);
        }
        assert_eq!(
            sep - 3,
            2,
            "a {} byte agent is cut into 2 parts",
            env.archive.agent.len()
        );
        assert!(joined == env.archive.agent, "the parts join to the agent");
        // The payload: index.cbor whose sha256 the args name, and the archive's own frames.
        let index_arg = args
            .iter()
            .position(|a| a == "--index")
            .ok_or("no --index")?;
        let (_, index) = by_key.get("index.cbor").ok_or("no index ConfigMap")?;
        let payload = Payload::new(archive, &[AGENT_NAME])?;
        assert_eq!(args[index_arg + 1], format!("sha256:{}", sha256_hex(index)));
        assert_eq!(payload.id.hex(), sha256_hex(index));
        assert!(index == &payload.index);
        let frame_keys: BTreeSet<&String> = by_key
            .iter()
            .filter(|(_, (n, _))| n.starts_with("bundle-frame-"))
            .map(|(k, _)| k)
            .collect();
        let mut want = BTreeSet::new();
        for &f in &payload.frames {
            let name = Payload::frame_name(archive, f);
            let (_, data) = by_key.get(&name).ok_or(format!("frame {f} not sent"))?;
            assert!(
                data.as_slice() == archive.frame(f)?,
                "frame {f} differs from the archive's"
            );
            want.insert(name);
        }
        assert_eq!(frame_keys, want.iter().collect());
        assert_eq!(by_key.len(), 1 + 2 + 1 + want.len());
        // The pod mounts exactly the ConfigMaps created.
        let pv = serde_json::to_value(pod)?;
        let mut mounted = BTreeSet::new();
        for v in pv["spec"]["volumes"].as_array().into_iter().flatten() {
            if let Some(n) = v["configMap"]["name"].as_str() {
                mounted.insert(n.to_owned());
            }
            for src in v["projected"]["sources"].as_array().into_iter().flatten() {
                mounted.insert(
                    src["configMap"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
        assert_eq!(mounted, seed_names(&seed));

        // Services: the registry's on 31999 first (so the cluster cannot give that port to the
        // injector, as a real one did once), then the injector's with a port the cluster picks.
        let services: Vec<Service> = created(s, "services", 0)?;
        let svc_ports: Vec<(String, Option<i32>)> = services
            .iter()
            .map(|s| {
                let port = s
                    .spec
                    .as_ref()
                    .and_then(|sp| sp.ports.as_ref())
                    .and_then(|p| p.first())
                    .and_then(|p| p.node_port);
                (s.metadata.name.clone().unwrap_or_default(), port)
            })
            .collect();
        assert_eq!(
            svc_ports,
            [
                ("bundle-registry".to_owned(), Some(31999)),
                ("bundle-injector".to_owned(), None)
            ]
        );

        // The PVC of the default StorageClass, and the Deployment pinned to the node.
        let pvcs: Vec<PersistentVolumeClaim> = created(s, "persistentvolumeclaims", 0)?;
        assert_eq!(pvcs.len(), 1);
        let pvc = serde_json::to_value(&pvcs[0])?;
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "20Gi");
        let deployments: Vec<Deployment> = created(s, "deployments", 0)?;
        assert_eq!(deployments.len(), 1);
        // First from the injector (the fake gives the first NodePort it is asked for, 30000)...
        assert_eq!(
            container_image(&deployments[0]).as_deref(),
            Some(format!("127.0.0.1:30000/bundle/agent@{agent_digest}").as_str())
        );
        let dv = serde_json::to_value(&deployments[0])?;
        assert_eq!(
            dv["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"],
            "node-b"
        );
        // ...then switched to its own copy, by one strategic-merge patch.
        let patches = s.calls(&Method::PATCH, "deployments");
        assert_eq!(patches.len(), 1);
        assert_eq!(
            patches[0].content_type,
            "application/strategic-merge-patch+json"
        );
        let self_hosted = format!("127.0.0.1:31999/bundle/agent@{agent_digest}");
        let body = patches[0].body.as_ref().ok_or("patch without body")?;
        assert_eq!(
            body["spec"]["template"]["spec"]["containers"][0]["name"],
            "registry"
        );
        assert_eq!(
            body["spec"]["template"]["spec"]["containers"][0]["image"],
            self_hosted.as_str()
        );
        let d: Deployment = typed(
            s.object("deployments", NS, objects::REGISTRY)
                .ok_or("no deployment")?,
        )?;
        assert_eq!(container_image(&d), Some(self_hosted.clone()));
        assert_eq!(d.metadata.generation, Some(2));

        // Every namespaced call went to the namespace; the seed ConfigMaps were looked up by
        // label, metadata only; the pods of all namespaces without the finished ones.
        assert!(
            s.requests
                .iter()
                .all(|r| r.namespace.as_deref().is_none_or(|n| n == NS))
        );
        let cm_lists: Vec<&Recorded> = s
            .calls(&Method::GET, "configmaps")
            .into_iter()
            .filter(|r| r.name.is_none())
            .collect();
        assert!(!cm_lists.is_empty());
        assert!(
            cm_lists
                .iter()
                .all(|r| r.query.get("labelSelector").map(String::as_str) == Some(SEED_SELECTOR))
        );
        let all_pods: Vec<&Recorded> = s
            .requests
            .iter()
            .filter(|r| r.path == "/api/v1/pods")
            .collect();
        assert_eq!(all_pods.len(), 1);
        assert_eq!(
            all_pods[0].query.get("fieldSelector").map(String::as_str),
            Some("status.phase!=Succeeded,status.phase!=Failed")
        );

        // Nothing of the injector is left; the registry and its data stay.
        assert_no_injector_left(s);
        assert_eq!(
            s.calls(&Method::DELETE, "configmaps")
                .iter()
                .filter(|r| r.succeeded())
                .count(),
            n_maps
        );
        assert!(s.object("services", NS, objects::REGISTRY).is_some());
        assert!(
            s.object("persistentvolumeclaims", NS, objects::REGISTRY)
                .is_some()
        );
        assert!(
            s.object("pods", NS, "bundle-registry-g2").is_some(),
            "the registry's new pod"
        );
        Ok(())
    })?;

    // The push went to 127.0.0.1:31999 through tunnels to the registry pods: the agent image
    // first, to the pod running from the injector, before the switch (so that the new pod
    // can pull it); then everything to the new pod.
    let sent = env.registry.sent();
    let hosts: BTreeSet<&str> = sent.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(hosts, BTreeSet::from(["127.0.0.1:31999"]));
    assert_eq!(
        env.registry.pods(),
        ["bundle-registry-g1", "bundle-registry-g2"]
    );
    let patched_at = env
        .api
        .with(|s| s.calls(&Method::PATCH, "deployments").first().map(|r| r.at))
        .ok_or("no patch")?;
    let to_old: Vec<&crate::fixtures::Sent> = sent
        .iter()
        .filter(|r| r.pod == "bundle-registry-g1")
        .collect();
    assert!(
        to_old.iter().all(|r| r.at < patched_at),
        "nothing is sent to the old pod after the switch"
    );
    assert!(
        to_old
            .iter()
            .all(|r| r.path == "/v2/" || r.path.starts_with("/v2/bundle/agent/")),
        "only the agent image before the switch"
    );
    assert!(
        to_old
            .iter()
            .any(|r| r.method == Method::PUT && r.path.starts_with("/v2/bundle/agent/manifests/")),
        "the agent manifest was put before the switch"
    );
    let target = Target {
        registry: "127.0.0.1:31999".into(),
        prefix: None,
        maps: Vec::new(),
    };
    for img in &archive.index().images {
        let r = target.map(&img.name)?;
        let body = env
            .registry
            .manifest(&r.repository, &img.digest)
            .await?
            .ok_or(format!("{} not pushed", img.name))?;
        assert_eq!(Digest::of(&body), img.digest, "{}", img.name);
    }
    let lines = env.lines();
    assert!(lines.iter().any(|l| l == &format!("registry now runs 127.0.0.1:31999/bundle/agent@{agent_digest}")), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l
            == &format!(
                "removed the injector and its ConfigMaps ({} objects)",
                n_maps + 2
            )),
        "{lines:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_deploy_of_the_same_archive_creates_and_patches_nothing_and_uploads_no_blob()
-> BoxResult {
    let env = env(cluster(), true).await?;
    let first = env.deploy(&opts()).await?;
    assert!(first.seeded && first.push.uploaded > 0);
    let blobs = env.registry.blob_count()?;
    let mark = env.api.mark();

    let second = env.deploy(&opts()).await?;
    assert!(!second.seeded);
    assert_eq!(second.storage, None);
    assert_eq!(second.push.uploaded, 0);
    assert_eq!(
        second.push.images.len(),
        env.archive.archive.index().images.len()
    );
    assert!(second.push.skipped > 0);
    assert_eq!(second.stats.config_maps_created, 0);
    assert_eq!(env.registry.blob_count()?, blobs);
    env.api.with(|s| {
        let changed: Vec<String> = s
            .mutations_since(mark)
            .iter()
            .filter(|r| r.method != Method::DELETE || r.status != 404)
            .map(|r| r.line())
            .collect();
        assert_eq!(
            changed,
            Vec::<String>::new(),
            "only deletes of what is already gone"
        );
        // Only the push's permissions were asked for.
        let asked: Vec<String> = s.reviews(mark).into_iter().map(|(p, _)| p).collect();
        assert!(
            asked.contains(&"get pods/portforward".to_owned()),
            "{asked:?}"
        );
        assert!(
            !asked
                .iter()
                .any(|p| p == "create configmaps" || p == "list nodes"),
            "{asked:?}"
        );
        assert_eq!(
            s.names("pods", NS, "app.kubernetes.io/name=bundle-registry"),
            ["bundle-registry-g2"]
        );
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_resumes_from_half_the_seed_config_maps_and_leaves_nothing_behind() -> BoxResult {
    let env = env(cluster(), true).await?;
    let seed = env.seed()?;
    let archive = &env.archive.archive;
    let maps: Vec<&objects::SeedMap> = seed.maps().collect();
    let half = maps.len() / 2;
    assert!(half >= 2);
    let id = archive.id().hex();
    env.api.with(|s| -> BoxResult {
        s.put_namespace(NS, "Active")?;
        for m in &maps[..half] {
            let cm = objects::seed_config_map(m, seed.data(archive, m)?, &id);
            s.put("configmaps", NS, serde_json::to_value(&cm)?)?;
        }
        Ok(())
    })?;

    let report = env.deploy(&opts()).await?;
    assert!(report.seeded);
    assert_eq!(report.stats.config_maps_existing as usize, half);
    assert_eq!(report.stats.config_maps_created as usize, maps.len() - half);
    env.api.with(|s| {
        let posted: Vec<String> = s
            .calls(&Method::POST, "configmaps")
            .iter()
            .filter_map(|r| r.name.clone())
            .collect();
        let missing: Vec<String> = maps[half..].iter().map(|m| m.name()).collect();
        assert_eq!(
            posted.iter().collect::<BTreeSet<_>>(),
            missing.iter().collect(),
            "only the missing ones"
        );
        assert_eq!(posted.len(), missing.len(), "each once");
        assert!(s.calls(&Method::POST, "namespaces").is_empty());
        assert_no_injector_left(s);
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_resumes_after_the_registry_came_up_on_the_injector_image() -> BoxResult {
    let env = env(cluster(), true).await?;
    let seed = env.seed()?;
    let archive = &env.archive.archive;
    let id = archive.id().hex();
    let agent_digest = env.archive.agent_digest()?;
    // An earlier run got as far as a running registry pulled from the injector, and stopped.
    env.api.with(|s| -> BoxResult {
        s.put_namespace(NS, "Active")?;
        for m in seed.maps() {
            let cm = objects::seed_config_map(m, seed.data(archive, m)?, &id);
            s.put("configmaps", NS, serde_json::to_value(&cm)?)?;
        }
        let svc = objects::node_port_service(objects::INJECTOR, "injector", 30123, &id)?;
        s.put("services", NS, serde_json::to_value(&svc)?)?;
        let d = objects::registry_deployment(
            &format!("127.0.0.1:30123/bundle/agent@{agent_digest}"),
            &Storage::EmptyDir,
            None,
            &id,
        )?;
        s.put("deployments", NS, serde_json::to_value(&d)?)?;
        Ok(())
    })?;

    let report = env.deploy(&opts()).await?;
    assert!(report.seeded);
    assert_eq!(report.stats.seeding, None, "no seeding step ran");
    assert_eq!(report.push.images.len(), archive.index().images.len());
    env.api.with(|s| {
        let creates: Vec<String> = s
            .requests
            .iter()
            .filter(|r| r.method == Method::POST && r.is_mutation())
            .map(Recorded::line)
            .collect();
        assert_eq!(creates, Vec::<String>::new());
        assert_eq!(s.calls(&Method::PATCH, "deployments").len(), 1);
        let d = s
            .object("deployments", NS, objects::REGISTRY)
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            format!("127.0.0.1:31999/bundle/agent@{agent_digest}").as_str()
        );
        assert_no_injector_left(s);
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_map_creates_answered_429_are_retried_with_backoff() -> BoxResult {
    let mut state = cluster();
    state.config_map_429s = 3;
    let env = env(state, true).await?;
    let report = env.deploy(&opts()).await?;
    let n = env.seed()?.maps().count();
    assert_eq!(report.stats.config_maps_created as usize, n);
    env.api.with(|s| -> BoxResult {
        let posts = s.calls(&Method::POST, "configmaps");
        assert_eq!(posts.len(), n + 3);
        let throttled: Vec<&&Recorded> = posts.iter().filter(|r| r.status == 429).collect();
        assert_eq!(throttled.len(), 3);
        for t in throttled {
            let retry = posts
                .iter()
                .find(|r| r.name == t.name && r.at > t.at)
                .ok_or(format!("{:?} was not retried", t.name))?;
            let waited = retry.at.duration_since(t.at);
            assert!(
                waited >= Duration::from_millis(95),
                "{:?} retried after {waited:?}",
                t.name
            );
            assert!(retry.succeeded());
        }
        assert!(create_counts(s, "configmaps", 0).values().all(|&c| c == 1));
        assert_no_injector_left(s);
        Ok(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_permissions_are_named_before_anything_changes() -> BoxResult {
    let mut state = cluster();
    state.deny = BTreeSet::from([
        "create configmaps".to_owned(),
        "get pods/portforward".to_owned(),
    ]);
    let env = env(state, true).await?;
    let r = env.deploy(&opts()).await;
    let Err(Error::Forbidden { namespace, missing }) = &r else {
        return Err(format!("expected Forbidden, got {:?}", r.map(|_| ())).into());
    };
    assert_eq!(namespace, NS);
    assert_eq!(
        missing.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "create configmaps".to_owned(),
            "get pods/portforward".to_owned()
        ])
    );
    assert_eq!(missing.len(), 2);
    let text = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains("  - create configmaps")
            && text.contains("  - get pods/portforward")
            && text.contains("Role"),
        "{text}"
    );
    assert_eq!(env.mutations_since(0), Vec::<String>::new());
    env.api.with(|s| {
        let reviews = s.reviews(0);
        assert!(reviews.contains(&("create configmaps".to_owned(), Some(NS.to_owned()))));
        assert!(
            reviews.contains(&("list nodes".to_owned(), None)),
            "nodes are checked cluster-wide"
        );
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_namespace_is_refused_before_anything_changes() -> BoxResult {
    let mut state = cluster();
    state.put_namespace(NS, "Terminating")?;
    let env = env(state, true).await?;
    let r = env.deploy(&opts()).await;
    assert!(
        matches!(&r, Err(Error::NamespaceTerminating(ns)) if ns == NS),
        "{:?}",
        r.map(|_| ())
    );
    assert_eq!(env.mutations_since(0), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_node_gives_a_reason_per_node_and_creates_no_config_map() -> BoxResult {
    let mut state = cluster();
    let mut not_ready = node("node-d", &[("registry.k8s.io/pause:3.10", 320_000)]);
    not_ready["status"]["conditions"][0]["status"] = serde_json::json!("False");
    let mut tainted = node("node-c", &[("registry.k8s.io/pause:3.10", 320_000)]);
    tainted["spec"]["taints"] =
        serde_json::json!([{"key": "node.kubernetes.io/disk-pressure", "effect": "NoExecute"}]);
    state.nodes = vec![tainted, not_ready, node("node-e", &[])];
    let env = env(state, true).await?;
    let r = env.deploy(&opts()).await;
    let Err(Error::NoNode { reasons }) = &r else {
        return Err(format!("expected NoNode, got {:?}", r.map(|_| ())).into());
    };
    assert_eq!(
        reasons,
        &[
            "node-c: taint node.kubernetes.io/disk-pressure:NoExecute",
            "node-d: not Ready",
            "node-e: no image in status.images"
        ]
    );
    env.api.with(|s| {
        assert!(s.calls(&Method::POST, "configmaps").is_empty());
        // The namespace is the one thing made before the placement check (see the report).
        let other: Vec<String> = s
            .mutations_since(0)
            .iter()
            .filter(|r| r.resource != "namespaces")
            .map(|r| r.line())
            .collect();
        assert_eq!(other, Vec::<String>::new());
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injector_that_never_gets_ready_is_described_and_a_rerun_completes() -> BoxResult {
    let env = env(cluster(), true).await?;
    let pod = objects::injector_pod_name(&env.archive.agent_digest()?);
    let pull = "Failed to pull image \"127.0.0.1:30000/bundle/agent\": dial tcp 127.0.0.1:30000: connect: connection refused";
    env.api.with(|s| {
        s.set_pods(Pods::err_image_pull());
        s.events = vec![
            event(NS, &pod, "Warning", "Failed", pull, 7),
            event(
                NS,
                &pod,
                "Normal",
                "Scheduled",
                "Successfully assigned bundle-system/x to node-b",
                1,
            ),
            event(
                NS,
                "someone-else",
                "Warning",
                "BackOff",
                "not about the injector",
                3,
            ),
        ];
    });
    let short = Options {
        timeout: Duration::from_secs(1),
        ..opts()
    };
    let r = env.deploy(&short).await;
    let Err(
        e @ Error::NotReady {
            what,
            state,
            events,
            hint,
            ..
        },
    ) = &r
    else {
        return Err(format!("expected NotReady, got {:?}", r.map(|_| ())).into());
    };
    assert_eq!(what, &format!("pod {NS}/{pod}"));
    assert!(
        state.contains("Pending")
            && state.contains("ErrImagePull")
            && state.contains("127.0.0.1:30000"),
        "{state}"
    );
    assert_eq!(
        events,
        &[
            "Normal Scheduled: Successfully assigned bundle-system/x to node-b".to_owned(),
            format!("Warning Failed: {pull}")
        ]
    );
    assert!(hint.contains("route_localnet"), "{hint}");
    let asked = env.api.with(|s| {
        s.calls(&Method::GET, "events")
            .iter()
            .map(|r| r.query.get("fieldSelector").cloned().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    assert_eq!(asked, [format!("involvedObject.name={pod}")]);
    let text = e.to_string();
    assert!(
        text.contains("did not become ready within 1 s")
            && text.contains("events:")
            && text.contains("route_localnet"),
        "{text}"
    );
    let (cms, mark) = env.api.with(|s| {
        (
            s.names("configmaps", NS, SEED_SELECTOR).len(),
            s.requests.len(),
        )
    });
    let n = env.seed()?.maps().count();
    assert_eq!(cms, n, "the first run sent every ConfigMap");

    // The node can pull now: the next run reuses what is there and finishes.
    env.api.with(|s| s.set_pods(Pods::Ready));
    let report = env.deploy(&opts()).await?;
    assert!(report.seeded);
    assert_eq!(report.stats.config_maps_created, 0);
    assert_eq!(report.stats.config_maps_existing as usize, n);
    env.api.with(|s| {
        let posts: Vec<String> = s.requests[mark..]
            .iter()
            .filter(|r| r.method == Method::POST && r.succeeded() && r.is_mutation())
            .map(|r| r.line())
            .collect();
        assert!(
            posts
                .iter()
                .all(|l| !l.starts_with("POST configmaps") && !l.starts_with("POST pods")),
            "{posts:#?}"
        );
        assert!(
            posts.iter().any(|l| l.starts_with("POST deployments")),
            "{posts:#?}"
        );
        assert_no_injector_left(s);
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_plan_and_changes_nothing() -> BoxResult {
    let env = env(cluster(), true).await?;
    let report = env
        .deploy(&Options {
            dry_run: true,
            ..opts()
        })
        .await?;
    assert!(!report.seeded);
    assert!(report.push.images.is_empty());
    assert_eq!(env.mutations_since(0), Vec::<String>::new());
    assert!(
        env.registry
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty(),
        "no tunnel"
    );
    assert_eq!(env.registry.blob_count()?, 0);
    let lines = env.lines();
    let n = env.seed()?.maps().count();
    assert!(lines.iter().all(|l| l.starts_with("would ")), "{lines:#?}");
    let has = |parts: &[&str]| lines.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        has(&[
            "would seed a registry in namespace bundle-system",
            &format!("{n} ConfigMaps"),
            "agent 2 parts"
        ]),
        "{lines:#?}"
    );
    assert!(
        has(&["would push 5 images to 127.0.0.1:31999 through the API server (port-forward)"]),
        "{lines:#?}"
    );
    assert!(
        has(&["injector", "node node-b", "registry.k8s.io/pause:3.10"]),
        "{lines:#?}"
    );
    assert!(
        has(&[
            "deployment bundle-system/bundle-registry",
            "NodePort 31999",
            "PVC 20Gi"
        ]),
        "{lines:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_without_agent_image_cannot_seed_and_says_what_to_do() -> BoxResult {
    let env = env(cluster(), false).await?;
    let r = env.deploy(&opts()).await;
    let Err(e @ Error::Archive { archive, reason }) = &r else {
        return Err(format!("expected Archive, got {:?}", r.map(|_| ())).into());
    };
    assert_eq!(archive, &env.archive.archive.id().to_string());
    assert!(
        reason.contains("without --no-agent") && reason.contains("--registry"),
        "{reason}"
    );
    assert!(
        e.to_string()
            .contains("recreate it without --no-agent, or deploy with --registry URL")
    );
    assert_eq!(env.mutations_since(0), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_storage_class_the_registry_keeps_its_data_in_an_empty_dir_and_warns()
-> BoxResult {
    let mut state = cluster();
    state.storage_classes = vec![storage_class("slow", false)];
    let env = env(state, true).await?;
    let report = env.deploy(&opts()).await?;
    assert_eq!(report.storage, Some(Storage::EmptyDir));
    assert!(
        env.lines()
            .iter()
            .any(|l| l.starts_with("WARNING: the cluster has no default StorageClass"))
    );
    env.api.with(|s| -> BoxResult {
        assert!(s.calls(&Method::POST, "persistentvolumeclaims").is_empty());
        let d = s
            .object("deployments", NS, objects::REGISTRY)
            .ok_or("no deployment")?;
        assert!(d["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].is_object());
        assert!(
            d["spec"]["template"]["spec"]["nodeSelector"].is_null(),
            "not pinned without a PVC"
        );
        Ok(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_deletes_the_registry_but_keeps_its_pvc_unless_purge() -> BoxResult {
    let env = env(cluster(), true).await?;
    env.deploy(&Options {
        storage: Some(Storage::Pvc("1Gi".into())),
        ..opts()
    })
    .await?;
    env.api.with(|s| {
        let pvc = s
            .object("persistentvolumeclaims", NS, objects::REGISTRY)
            .cloned()
            .unwrap_or_default();
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "1Gi");
    });

    assert_eq!(env.remove(false).await?, 2);
    env.api.with(|s| {
        assert!(s.object("deployments", NS, objects::REGISTRY).is_none());
        assert!(s.object("services", NS, objects::REGISTRY).is_none());
        assert_eq!(
            s.names("pods", NS, "app.kubernetes.io/name=bundle-registry"),
            Vec::<String>::new()
        );
        assert!(
            s.object("persistentvolumeclaims", NS, objects::REGISTRY)
                .is_some(),
            "data kept"
        );
        assert!(
            s.calls(&Method::DELETE, "persistentvolumeclaims")
                .is_empty()
        );
    });
    assert!(
        env.lines()
            .iter()
            .any(|l| l.ends_with("(2 objects); its data (PVC) stays unless --purge")),
        "{:#?}",
        env.lines()
    );

    assert_eq!(env.remove(true).await?, 1);
    env.api.with(|s| {
        assert!(
            s.object("persistentvolumeclaims", NS, objects::REGISTRY)
                .is_none()
        );
        assert_eq!(s.calls(&Method::DELETE, "persistentvolumeclaims").len(), 1);
    });
    assert!(
        env.lines()
            .iter()
            .any(|l| l == &format!("removed the registry from {NS} (1 objects), data included"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_needs_no_permission_on_an_existing_namespace() -> BoxResult {
    let env = env(cluster(), true).await?;
    env.deploy(&opts()).await?;
    // README "Permissions": get/create on the namespace only "if it does not exist yet".
    env.api.with(|s| {
        s.deny.insert("get namespaces".into());
        s.deny.insert("create namespaces".into());
    });
    let r = env.deploy(&opts()).await;
    assert!(
        r.is_ok(),
        "{}",
        r.err().map(|e| e.to_string()).unwrap_or_default()
    );
    Ok(())
}

/// Deploys with the node unable to pull from the registry's own NodePort: the switch to the
/// registry's own image cannot finish.
async fn failed_switch(timeout: Duration) -> BoxResult<(Env, bundle_deploy::Result<Report>)> {
    let env = env(cluster(), true).await?;
    env.api.with(|s| s.set_unpullable(Some("127.0.0.1:31999/")));
    let r = env.deploy(&Options { timeout, ..opts() }).await;
    Ok((env, r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_cannot_pull_its_own_image_is_described_and_the_injector_kept() -> BoxResult
{
    let (env, r) = failed_switch(Duration::from_secs(1)).await?;
    let Err(Error::NotReady {
        what, state, hint, ..
    }) = &r
    else {
        return Err(format!("expected NotReady, got {:?}", r.map(|_| ())).into());
    };
    assert_eq!(what, &format!("deployment {NS}/bundle-registry"));
    assert!(
        state.contains("pod bundle-registry-g2")
            && state.contains("ErrImagePull")
            && state.contains("127.0.0.1:31999"),
        "{state}"
    );
    assert!(hint.contains("route_localnet"), "{hint}");
    env.api.with(|s| {
        // The old pod keeps serving (RollingUpdate, maxUnavailable 0) and nothing the next
        // run needs was removed.
        assert_eq!(
            s.names("pods", NS, "app.kubernetes.io/name=bundle-registry"),
            ["bundle-registry-g1", "bundle-registry-g2"]
        );
        assert_eq!(s.names("pods", NS, INJECTOR_SELECTOR).len(), 1);
        assert!(s.object("services", NS, objects::INJECTOR).is_some());
        assert!(!s.names("configmaps", NS, SEED_SELECTOR).is_empty());
    });
    assert_eq!(
        env.registry.pods(),
        ["bundle-registry-g1"],
        "only the agent image was pushed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_a_failed_switch_does_not_succeed_before_the_rollout_does() -> BoxResult {
    let (env, first) = failed_switch(Duration::from_millis(600)).await?;
    assert!(
        matches!(first, Err(Error::NotReady { .. })),
        "{:?}",
        first.map(|_| ())
    );
    // Still unable to pull: the registry has not switched, so the deploy has not succeeded.
    let second = env
        .deploy(&Options {
            timeout: Duration::from_millis(600),
            ..opts()
        })
        .await;
    assert!(
        second.is_err(),
        "a re-run reported success while deployment {NS}/bundle-registry cannot roll out"
    );
    env.api.with(|s| {
        assert!(
            s.object("services", NS, objects::INJECTOR).is_some(),
            "the injector was removed while the registry still runs from its image"
        );
    });
    Ok(())
}
