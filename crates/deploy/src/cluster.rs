//! Reading and writing cluster objects the way deploy needs: every create first looks at what
//! exists (so a re-run resumes), 429 answers back off instead of fixed sleeps, and every wait
//! ends with what the pod says about itself and its events.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{describe, status_of};
use crate::{Error, Result};

/// Backoff for 429 and 5xx answers: 100 ms doubling to 5 s, at most this many tries.
const TRIES: u32 = 10;

fn backoff(n: u32) -> Duration {
    Duration::from_millis((100u64 << n.min(6)).min(5_000))
}

fn retryable(e: &kube::Error) -> bool {
    match status_of(e) {
        Some(code) => code == 429 || code >= 500,
        None => matches!(e, kube::Error::HyperError(_) | kube::Error::Service(_)),
    }
}

/// Runs `call` until it succeeds, fails with an answer other than 429 or 5xx (or a transport
/// error), or has been tried [`TRIES`] times, backing off in between.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut n = 0;
    loop {
        match call().await {
            Err(e) if retryable(&e) && n + 1 < TRIES => {
                tokio::time::sleep(backoff(n)).await;
                n += 1;
            }
            other => return other,
        }
    }
}

/// The object kind and name for messages: `configmap bundle-system/x`.
fn what<K: Resource<DynamicType = ()>>(ns: Option<&str>, name: &str) -> String {
    let kind = K::kind(&()).to_lowercase();
    match ns {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Gets an object, `None` when it does not exist.
pub async fn get<K>(api: &Api<K>, ns: Option<&str>, name: &str) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    retrying(|| api.get_opt(name))
        .await
        .map_err(|e| Error::api(format!("get {}", what::<K>(ns, name)), e))
}

/// Whether a create made the object or found it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Made now.
    New,
    /// Already there (409 AlreadyExists).
    Existed,
}

/// Creates an object; an existing one of that name counts as done. 429 and 5xx back off and
/// retry.
pub async fn create<K>(api: &Api<K>, ns: Option<&str>, obj: &K) -> Result<Created>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let pp = PostParams::default();
    match retrying(|| api.create(&pp, obj)).await {
        Ok(_) => Ok(Created::New),
        Err(e) if status_of(&e) == Some(409) => Ok(Created::Existed),
        Err(e) => Err(Error::api(format!("create {}", what::<K>(ns, &name)), e)),
    }
}

/// Creates an object unless one of its name exists. Services need the look first: the API
/// server answers a second create of a Service with a fixed nodePort with 422 "port already
/// allocated", not 409.
pub async fn ensure<K>(api: &Api<K>, ns: Option<&str>, obj: &K) -> Result<Created>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if get(api, ns, &name).await?.is_some() {
        return Ok(Created::Existed);
    }
    create(api, ns, obj).await
}

/// Deletes an object; a missing one is fine.
pub async fn delete<K>(api: &Api<K>, ns: Option<&str>, name: &str) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams::background();
    match retrying(|| api.delete(name, &dp)).await {
        Ok(_) => Ok(true),
        Err(e) if status_of(&e) == Some(404) => Ok(false),
        Err(e) => Err(Error::api(format!("delete {}", what::<K>(ns, name)), e)),
    }
}

/// Names of objects matching a label selector that are not being deleted (metadata only:
/// seeding ConfigMaps are large).
pub async fn names<K>(api: &Api<K>, ns: Option<&str>, selector: &str) -> Result<Vec<String>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let lp = ListParams::default().labels(selector);
    let list = api
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::api(format!("list {} ({selector})", what::<K>(ns, "")), e))?;
    // Objects already being deleted are as good as gone.
    Ok(list
        .items
        .into_iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter_map(|o| o.metadata.name)
        .collect())
}

/// One permission deploy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// API group, "" for core.
    pub group: &'static str,
    /// Resource, e.g. `configmaps`.
    pub resource: &'static str,
    /// Subresource, e.g. `portforward`.
    pub subresource: &'static str,
    /// Verb.
    pub verb: &'static str,
    /// Whether it is checked in the namespace (else cluster-wide).
    pub namespaced: bool,
}

impl Need {
    const fn ns(group: &'static str, resource: &'static str, verb: &'static str) -> Need {
        Need {
            group,
            resource,
            subresource: "",
            verb,
            namespaced: true,
        }
    }
    const fn sub(resource: &'static str, subresource: &'static str, verb: &'static str) -> Need {
        Need {
            group: "",
            resource,
            subresource,
            verb,
            namespaced: true,
        }
    }
    const fn cluster(group: &'static str, resource: &'static str, verb: &'static str) -> Need {
        Need {
            group,
            resource,
            subresource: "",
            verb,
            namespaced: false,
        }
    }

    /// `create configmaps`, `get pods/portforward`, `list nodes (cluster-wide)`, with the
    /// group when not core.
    pub fn describe(&self) -> String {
        let mut r = self.resource.to_owned();
        if !self.subresource.is_empty() {
            r = format!("{r}/{}", self.subresource);
        }
        if !self.group.is_empty() {
            r = format!("{r}.{}", self.group);
        }
        let scope = if self.namespaced {
            ""
        } else {
            " (cluster-wide)"
        };
        format!("{} {r}{scope}", self.verb)
    }
}

/// What the push needs through the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `pods/portforward`.
    PortForward,
    /// `pods/proxy`.
    Proxy,
}

/// Permissions for a deploy: always those of the push and the final state; with `seeding`,
/// those that create and remove the injector.
pub fn needs(seeding: bool, via: Via, pvc: bool) -> Vec<Need> {
    let mut v = vec![
        Need::ns("", "pods", "list"),
        Need::ns("apps", "deployments", "get"),
        Need::ns("apps", "deployments", "patch"),
        Need::ns("", "services", "get"),
        Need::ns("", "configmaps", "list"),
        Need::ns("", "configmaps", "delete"),
        Need::ns("", "pods", "delete"),
        Need::ns("", "services", "delete"),
    ];
    match via {
        // kube-rs opens port-forwards over websockets, which the API server authorizes as
        // `get`; SPDY clients (kubectl before 1.31) need `create`.
        Via::PortForward => v.push(Need::sub("pods", "portforward", "get")),
        Via::Proxy => {
            for verb in ["get", "create", "update", "patch"] {
                v.push(Need::sub("pods", "proxy", verb));
            }
        }
    }
    if seeding {
        v.extend([
            Need::ns("", "configmaps", "create"),
            Need::ns("", "pods", "create"),
            Need::ns("", "pods", "get"),
            Need::ns("", "services", "create"),
            Need::ns("apps", "deployments", "create"),
            Need::ns("", "events", "list"),
            Need::cluster("", "nodes", "list"),
            Need::cluster("storage.k8s.io", "storageclasses", "list"),
        ]);
        if pvc {
            v.push(Need::ns("", "persistentvolumeclaims", "create"));
            v.push(Need::ns("", "persistentvolumeclaims", "get"));
        }
    }
    v
}

/// Asks the API server, with one SelfSubjectAccessReview per permission (in parallel), which
/// of `needs` the current user lacks.
pub async fn missing(client: &Client, namespace: &str, needs: &[Need]) -> Result<Vec<Need>> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let checks = needs.iter().map(|n| {
        let api = api.clone();
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(n.group.to_owned()),
                    resource: Some(n.resource.to_owned()),
                    subresource: (!n.subresource.is_empty()).then(|| n.subresource.to_owned()),
                    verb: Some(n.verb.to_owned()),
                    namespace: n.namespaced.then(|| namespace.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        async move {
            let r = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| Error::api(format!("access review ({})", n.describe()), e))?;
            Ok::<_, Error>((n.clone(), r.status.is_some_and(|s| s.allowed)))
        }
    });
    let results = futures_util::future::try_join_all(checks).await?;
    Ok(results
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n)
        .collect())
}

/// Makes sure the namespace exists and is not being deleted.
///
/// `exists` says the caller already found objects in it: then a user who may not read
/// namespaces (a re-deploy needs only the push permissions) goes on without the check.
pub async fn ensure_namespace(client: &Client, name: &str, exists: bool) -> Result<bool> {
    let api: Api<Namespace> = Api::all(client.clone());
    let found = match get(&api, None, name).await {
        Err(Error::Api { cause, .. }) if exists && status_of(&cause) == Some(403) => {
            return Ok(false);
        }
        other => other?,
    };
    match found {
        Some(ns) => {
            if ns.status.and_then(|s| s.phase).as_deref() == Some("Terminating") {
                return Err(Error::NamespaceTerminating(name.to_owned()));
            }
            Ok(false)
        }
        None => {
            let mut ns = Namespace::default();
            ns.metadata.name = Some(name.to_owned());
            ns.metadata.labels = Some(
                [(
                    crate::objects::MANAGED_BY.0.to_owned(),
                    crate::objects::MANAGED_BY.1.to_owned(),
                )]
                .into(),
            );
            create(&api, None, &ns).await?;
            Ok(true)
        }
    }
}

/// Whether the cluster has a default StorageClass.
pub async fn default_storage_class(client: &Client) -> Result<Option<String>> {
    let api: Api<StorageClass> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api("list storageclasses", e))?;
    Ok(list.items.into_iter().find_map(|sc| {
        let ann = sc.metadata.annotations.unwrap_or_default();
        let default = [
            "storageclass.kubernetes.io/is-default-class",
            "storageclass.beta.kubernetes.io/is-default-class",
        ]
        .iter()
        .any(|k| ann.get(*k).is_some_and(|v| v == "true"));
        default.then(|| sc.metadata.name.unwrap_or_default())
    }))
}

/// The node and image the injector runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Node name.
    pub node: String,
    /// An image present on it.
    pub image: String,
    /// That image's size.
    pub image_bytes: i64,
}

fn quantity_bytes(q: &str) -> Option<i64> {
    let units: [(&str, i64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (u, m) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<i64>().ok().map(|n| n * m);
        }
    }
    q.parse().ok()
}

/// Picks the node and image for the injector: Ready, schedulable, linux/amd64, no NoSchedule
/// or NoExecute taint, room for one more pod and its memory request; among those, the node
/// offering the smallest image. `pods_on` counts pods and memory requests per node.
pub fn place(nodes: &[Node], pods: &[Pod], memory_request: i64) -> Result<Placement> {
    let mut reasons = Vec::new();
    let mut best: Option<Placement> = None;
    if nodes.is_empty() {
        reasons.push("the cluster lists no nodes".to_owned());
    }
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let Some(status) = &node.status else {
            reasons.push(format!("{name}: no status"));
            continue;
        };
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if !ready {
            reasons.push(format!("{name}: not Ready"));
            continue;
        }
        let spec = node.spec.clone().unwrap_or_default();
        if spec.unschedulable == Some(true) {
            reasons.push(format!("{name}: cordoned (unschedulable)"));
            continue;
        }
        if let Some(t) = spec
            .taints
            .iter()
            .flatten()
            .find(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        {
            reasons.push(format!("{name}: taint {}:{}", t.key, t.effect));
            continue;
        }
        let info = status.node_info.clone().unwrap_or_default();
        if info.architecture != "amd64" || info.operating_system != "linux" {
            reasons.push(format!(
                "{name}: {}/{} (the agent is built for linux/amd64)",
                info.operating_system, info.architecture
            ));
            continue;
        }
        let alloc = status.allocatable.clone().unwrap_or_default();
        let on_node: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()))
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .collect();
        if let Some(max) = alloc.get("pods").and_then(|q| q.0.parse::<usize>().ok())
            && on_node.len() >= max
        {
            reasons.push(format!("{name}: full ({} of {max} pods)", on_node.len()));
            continue;
        }
        if let Some(mem) = alloc.get("memory").and_then(|q| quantity_bytes(&q.0)) {
            let used: i64 = on_node
                .iter()
                .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
                .filter_map(|c| {
                    c.resources
                        .as_ref()
                        .and_then(|r| r.requests.as_ref())
                        .and_then(|r| r.get("memory"))
                        .and_then(|q| quantity_bytes(&q.0))
                })
                .sum();
            if mem - used < memory_request {
                reasons.push(format!("{name}: not enough memory left for the injector"));
                continue;
            }
        }
        let mut images: Vec<(i64, String)> = status
            .images
            .iter()
            .flatten()
            .filter_map(|i| {
                let names = i.names.clone().unwrap_or_default();
                // A name with a tag reads better in `kubectl describe`; any name works.
                let pick = names
                    .iter()
                    .find(|n| !n.contains('@'))
                    .or_else(|| names.first())?
                    .clone();
                Some((i.size_bytes.unwrap_or(i64::MAX), pick))
            })
            .collect();
        images.sort();
        let Some((size, image)) = images.into_iter().next() else {
            reasons.push(format!("{name}: no image in status.images"));
            continue;
        };
        if best.as_ref().is_none_or(|b| size < b.image_bytes) {
            best = Some(Placement {
                node: name,
                image,
                image_bytes: size,
            });
        }
    }
    best.ok_or(Error::NoNode { reasons })
}

/// Recent events of an object, oldest first, as `Reason: message` lines.
pub async fn events(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
    match api.list(&lp).await {
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
            items
                .into_iter()
                .rev()
                .take(8)
                .rev()
                .map(|e| {
                    format!(
                        "{} {}: {}",
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default().trim()
                    )
                })
                .collect()
        }
        Err(e) => vec![format!("(events unavailable: {})", describe(&e))],
    }
}

/// What a pod is doing, in one line, and whether it is ready.
pub fn pod_state(pod: &Pod) -> (bool, String) {
    let Some(status) = &pod.status else {
        return (false, "no status yet".into());
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let mut state = status.phase.clone().unwrap_or_else(|| "Pending".into());
    for cs in status.container_statuses.iter().flatten() {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            state = format!(
                "{state}, container {} waiting: {} {}",
                cs.name,
                w.reason.clone().unwrap_or_default(),
                w.message.clone().unwrap_or_default()
            );
        }
        if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            state = format!(
                "{state}, last exit {} ({}) {}",
                t.exit_code,
                t.reason.clone().unwrap_or_default(),
                t.message.clone().unwrap_or_default().trim()
            );
        }
    }
    if status.phase.as_deref() == Some("Pending") {
        for c in status.conditions.iter().flatten() {
            if c.type_ == "PodScheduled" && c.status == "False" {
                state = format!(
                    "{state}, unschedulable: {}",
                    c.message.clone().unwrap_or_default()
                );
            }
        }
    }
    (ready, state.trim().to_owned())
}

/// The hint for a pod that cannot pull from the node's 127.0.0.1.
pub fn pull_hint(state: &str) -> String {
    if (state.contains("ErrImagePull") || state.contains("ImagePullBackOff"))
        && state.contains("127.0.0.1")
    {
        "\n  hint: the node could not pull from 127.0.0.1:<nodePort>. That path needs kube-proxy to route NodePorts on the node's localhost (iptables mode sets net.ipv4.conf.all.route_localnet=1; nftables mode, IPv6-only clusters and some distributions do not). Check `kube-proxy --proxy-mode` and `sysctl net.ipv4.conf.all.route_localnet` on the node, or deploy with --registry URL to an existing registry.".to_owned()
    } else {
        String::new()
    }
}

/// Waits until the pod is ready; on timeout, says what it is doing and shows its events.
pub async fn wait_pod(client: &Client, ns: &str, name: &str, timeout: Duration) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let mut state = String::from("not created");
    while start.elapsed() < timeout {
        if let Some(pod) = get(&api, Some(ns), name).await? {
            let (ready, s) = pod_state(&pod);
            if ready {
                return Ok(());
            }
            state = s;
            // A loader that exits is not going to fix itself: fail at once with its words.
            if state.contains("CrashLoopBackOff") && start.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::NotReady {
        what: format!("pod {ns}/{name}"),
        seconds: start.elapsed().as_secs(),
        hint: pull_hint(&state),
        state,
        events: events(client, ns, name).await,
    })
}

/// The pods of the Deployment `name` (those labelled `app.kubernetes.io/name=<name>`).
async fn deployment_pods(pods: &Api<Pod>, ns: &str, name: &str) -> Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/name={name}"));
    let list = pods
        .list(&lp)
        .await
        .map_err(|e| Error::api(format!("list pods of deployment {ns}/{name}"), e))?;
    Ok(list.items)
}

/// Waits until the Deployment's rollout is complete (what `kubectl rollout status` checks);
/// on timeout, describes its pods.
///
/// With `retry_refused_pulls`, a pod whose image pull was refused (the node reached no
/// listener: kube-proxy had not yet programmed a new NodePort) is deleted so that its
/// ReplicaSet makes a fresh one at once, instead of waiting out the kubelet's pull back-off
/// (10 s, doubling); at most every 2 s, up to 20 times.
pub async fn wait_rollout(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    retry_refused_pulls: bool,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let mut retries = 0;
    let mut last_retry = Instant::now();
    while start.elapsed() < timeout {
        if let Some(d) = get(&api, Some(ns), name).await?
            && rollout_done(&d)
        {
            return Ok(());
        }
        if retry_refused_pulls && retries < 20 && last_retry.elapsed() >= Duration::from_secs(2) {
            for p in &deployment_pods(&pods, ns, name).await? {
                let (ready, state) = pod_state(p);
                if !ready
                    && p.metadata.deletion_timestamp.is_none()
                    && (state.contains("ErrImagePull") || state.contains("ImagePullBackOff"))
                    && state.contains("connection refused")
                {
                    let pname = p.metadata.name.clone().unwrap_or_default();
                    delete(&pods, Some(ns), &pname).await?;
                    retries += 1;
                    last_retry = Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut state = String::from("no pod");
    let mut evs = Vec::new();
    for p in deployment_pods(&pods, ns, name).await?.iter().rev() {
        let (ready, s) = pod_state(p);
        if !ready {
            let pname = p.metadata.name.clone().unwrap_or_default();
            state = format!("pod {pname}: {s}");
            evs = events(client, ns, &pname).await;
            break;
        }
    }
    Err(Error::NotReady {
        what: format!("deployment {ns}/{name}"),
        seconds: start.elapsed().as_secs(),
        hint: pull_hint(&state),
        state,
        events: evs,
    })
}

/// Whether a Deployment has rolled out: the controller saw the newest spec and every replica
/// is updated and available.
pub fn rollout_done(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(st) = &d.status else { return false };
    st.observed_generation >= d.metadata.generation
        && st.updated_replicas.unwrap_or(0) == want
        && st.replicas.unwrap_or(0) == want
        && st.available_replicas.unwrap_or(0) == want
}

/// Waits until the Deployment `name` has no pod left that is being deleted: a replaced
/// registry pod still answers on the NodePort while it shuts down, and a push or pull that
/// lands there would hang or find nothing.
pub async fn wait_old_pods_gone(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let dying: Vec<String> = deployment_pods(&pods, ns, name)
            .await?
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if dying.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::NotReady {
                what: format!("deployment {ns}/{name}"),
                seconds: start.elapsed().as_secs(),
                state: format!("old pods still terminating: {}", dying.join(", ")),
                events: Vec::new(),
                hint: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A ready pod of the Deployment `name`.
pub async fn ready_pod(client: &Client, ns: &str, name: &str) -> Result<Option<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(deployment_pods(&pods, ns, name)
        .await?
        .into_iter()
        .find_map(|p| {
            let deleting = p.metadata.deletion_timestamp.is_some();
            (pod_state(&p).0 && !deleting).then(|| p.metadata.name.unwrap_or_default())
        }))
}

/// Lists nodes and the pods on them.
pub async fn nodes_and_pods(client: &Client) -> Result<(Vec<Node>, Vec<Pod>)> {
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api("list nodes", e))?;
    let pods: Api<Pod> = Api::all(client.clone());
    // Pods of all namespaces tell how full a node is; without that permission, skip the check.
    let pods = pods
        .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    Ok((nodes.items, pods))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap_or_default()
    }

    fn ready_node(name: &str, arch: &str, images: serde_json::Value) -> serde_json::Value {
        json!({
            "metadata": {"name": name},
            "spec": {},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "nodeInfo": {"architecture": arch, "operatingSystem": "linux", "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "osImage": "", "systemUUID": ""},
                "allocatable": {"pods": "110", "memory": "8Gi"},
                "images": images
            }
        })
    }

    #[test]
    fn place_prefers_the_smallest_image_on_a_usable_node() -> Result<()> {
        let a = node(ready_node(
            "a",
            "amd64",
            json!([{"names": ["big:1"], "sizeBytes": 900}]),
        ));
        let b = node(ready_node(
            "b",
            "amd64",
            json!([
                {"names": ["x@sha256:00", "small:1"], "sizeBytes": 10},
                {"names": ["mid:1"], "sizeBytes": 50}
            ]),
        ));
        let arm = node(ready_node(
            "c",
            "arm64",
            json!([{"names": ["tiny:1"], "sizeBytes": 1}]),
        ));
        let mut tainted = ready_node("d", "amd64", json!([{"names": ["tiny:1"], "sizeBytes": 1}]));
        tainted["spec"]["taints"] =
            json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]);
        let p = place(&[a, b, arm, node(tainted)], &[], 32 << 20)?;
        assert_eq!(
            p,
            Placement {
                node: "b".into(),
                image: "small:1".into(),
                image_bytes: 10
            }
        );
        Ok(())
    }

    #[test]
    fn place_says_why_each_node_was_passed_over() {
        let mut cordoned = ready_node("a", "amd64", json!([{"names": ["i:1"], "sizeBytes": 1}]));
        cordoned["spec"]["unschedulable"] = json!(true);
        let mut notready = ready_node("b", "amd64", json!([]));
        notready["status"]["conditions"][0]["status"] = json!("False");
        let empty = ready_node("c", "amd64", json!([]));
        let mut full = ready_node("d", "amd64", json!([{"names": ["i:1"], "sizeBytes": 1}]));
        full["status"]["allocatable"]["pods"] = json!("1");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"nodeName": "d", "containers": []}, "status": {"phase": "Running"}})).unwrap_or_default();
        let err = place(
            &[node(cordoned), node(notready), node(empty), node(full)],
            &[pod],
            1,
        );
        let Err(Error::NoNode { reasons }) = err else {
            panic!("expected NoNode, got {err:?}");
        };
        assert_eq!(
            reasons,
            [
                "a: cordoned (unschedulable)",
                "b: not Ready",
                "c: no image in status.images",
                "d: full (1 of 1 pods)"
            ]
        );
        let text = Error::NoNode { reasons }.to_string();
        assert!(text.contains("linux/amd64"), "{text}");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("8Gi"), Some(8 << 30));
        assert_eq!(quantity_bytes("1000"), Some(1000));
        assert_eq!(quantity_bytes("5M"), Some(5_000_000));
        assert_eq!(quantity_bytes("x"), None);
    }

    #[test]
    fn pull_hint_only_for_localhost_pulls() {
        assert!(pull_hint("Pending, container registry waiting: ErrImagePull failed to pull 127.0.0.1:30000/bundle/agent").contains("route_localnet"));
        assert_eq!(
            pull_hint("Pending, container x waiting: ErrImagePull quay.io/x"),
            ""
        );
    }

    #[test]
    fn needs_depend_on_what_deploy_does() {
        let push_only: Vec<String> = needs(false, Via::Proxy, false)
            .iter()
            .map(Need::describe)
            .collect();
        assert!(push_only.contains(&"create pods/proxy".to_owned()));
        assert!(!push_only.iter().any(|n| n.contains("nodes")));
        let seed: Vec<String> = needs(true, Via::PortForward, true)
            .iter()
            .map(Need::describe)
            .collect();
        assert!(seed.contains(&"list nodes (cluster-wide)".to_owned()));
        assert!(seed.contains(&"create persistentvolumeclaims".to_owned()));
        assert!(seed.contains(&"create deployments.apps".to_owned()));
        assert!(seed.contains(&"get pods/portforward".to_owned()));
    }
}
