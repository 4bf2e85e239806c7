//! An in-memory Kubernetes API server behind kube's mock service (tower-test): just the
//! resources and verbs `deploy_with` and `remove` use, answering as the real one does (typed
//! objects, `Status` bodies for errors, metadata-only lists), with simulated controllers
//! (kubelet, Service node ports, the Deployment controller, garbage collection of a
//! Deployment's pods), RBAC by a deny list that the access reviews and the calls both obey,
//! fault injection (429 on ConfigMap creates), and a log of every request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kube::client::Body;
use serde_json::{Value, json};

/// What the simulated kubelet does with every pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pods {
    /// Running and Ready at once.
    Ready,
    /// Pending: its container waits with this reason and message.
    Waiting {
        /// e.g. `ErrImagePull`.
        reason: String,
        /// What the kubelet says.
        message: String,
    },
}

impl Pods {
    /// A pod whose image the node cannot pull from its own 127.0.0.1.
    pub fn err_image_pull() -> Pods {
        Pods::Waiting {
            reason: "ErrImagePull".into(),
            message: "failed to pull and unpack image \"127.0.0.1:30000/bundle/agent\": dial tcp 127.0.0.1:30000: connect: connection refused".into(),
        }
    }
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// URI path.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// The Content-Type header.
    pub content_type: String,
    /// The resource (`configmaps`, `deployments`, `selfsubjectaccessreviews`, ...).
    pub resource: String,
    /// The namespace in the path.
    pub namespace: Option<String>,
    /// The object's name: from the path, or for a create from the body.
    pub name: Option<String>,
    /// The JSON body, if any.
    pub body: Option<Value>,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    /// Whether the request asked to change something (access reviews change nothing).
    pub fn is_mutation(&self) -> bool {
        self.method != Method::GET && self.resource != "selfsubjectaccessreviews"
    }

    /// Whether it was answered with a 2xx.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// `POST configmaps bundle-stage0-... -> 201`, for assertion messages.
    pub fn line(&self) -> String {
        format!(
            "{} {} {} -> {}",
            self.method,
            self.resource,
            self.name.as_deref().unwrap_or(""),
            self.status
        )
    }
}

/// The resources the fake knows: kind, apiVersion, namespaced.
fn kind_of(group: &str, resource: &str) -> Option<(&'static str, &'static str, bool)> {
    Some(match (group, resource) {
        ("", "namespaces") => ("Namespace", "v1", false),
        ("", "nodes") => ("Node", "v1", false),
        ("", "configmaps") => ("ConfigMap", "v1", true),
        ("", "pods") => ("Pod", "v1", true),
        ("", "services") => ("Service", "v1", true),
        ("", "persistentvolumeclaims") => ("PersistentVolumeClaim", "v1", true),
        ("", "events") => ("Event", "v1", true),
        ("apps", "deployments") => ("Deployment", "apps/v1", true),
        ("storage.k8s.io", "storageclasses") => ("StorageClass", "storage.k8s.io/v1", false),
        _ => return None,
    })
}

/// The state of the fake cluster and its configuration. Tests change it through
/// [`FakeApi::with`].
#[derive(Debug)]
pub struct State {
    /// Permissions the user lacks, as `verb resource[/subresource][.group]`: access reviews
    /// answer `allowed: false` and the calls themselves 403.
    pub deny: BTreeSet<String>,
    /// Nodes `list nodes` returns.
    pub nodes: Vec<Value>,
    /// StorageClasses `list storageclasses` returns.
    pub storage_classes: Vec<Value>,
    /// Events (see [`event`]).
    pub events: Vec<Value>,
    /// The next this many ConfigMap creates answer 429 TooManyRequests.
    pub config_map_429s: u32,
    /// Every request, in order.
    pub requests: Vec<Recorded>,
    pods: Pods,
    unpullable: Option<String>,
    pod_names_used: BTreeSet<String>,
    objects: BTreeMap<(String, String, String), Value>,
    next_port: i32,
    version: u64,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code
        }),
    )
}

/// `configmaps` or `deployments.apps`, as the API server names a resource in messages.
fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    }
}

/// `verb resource[/sub][.group]`, as `Need::describe` writes it (without the scope).
pub fn permission(verb: &str, resource: &str, sub: &str, group: &str) -> String {
    let mut r = resource.to_owned();
    if !sub.is_empty() {
        r = format!("{r}/{sub}");
    }
    if !group.is_empty() {
        r = format!("{r}.{group}");
    }
    format!("{verb} {r}")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 3 <= b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Whether `obj`'s labels match a selector of `k=v`, `k==v`, `k!=v`, `k` and `!k` terms.
pub fn matches_labels(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels[k.trim()].as_str() == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels[k.trim()].is_null()
            } else {
                !labels[term].is_null()
            }
        })
}

/// Whether `obj` matches a field selector of `a.b=v` and `a.b!=v` terms (a missing field
/// reads as "").
pub fn matches_fields(obj: &Value, selector: &str) -> bool {
    let field = |path: &str| -> String {
        let mut v = obj;
        for p in path.trim().split('.') {
            v = &v[p];
        }
        v.as_str().map(str::to_owned).unwrap_or_default()
    };
    selector
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                field(k) != v.trim()
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                field(k) == v.trim()
            } else {
                false
            }
        })
}

/// Merges `patch` into `target`: maps key by key (`null` deletes), and with `strategic`,
/// lists of objects that all carry a `name` are merged by name (as `containers` are).
fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v, strategic);
            }
        }
        return;
    }
    if strategic
        && let (Some(t), Some(p)) = (target.as_array_mut(), patch.as_array())
        && p.iter().all(|e| e["name"].is_string())
    {
        for pe in p {
            match t.iter_mut().find(|te| te["name"] == pe["name"]) {
                Some(te) => merge(te, pe, strategic),
                None => t.push(pe.clone()),
            }
        }
        return;
    }
    *target = patch.clone();
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// A parsed API path.
struct Route {
    group: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", g, _v, rest @ ..] => (*g, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, r, tail @ ..] => (Some((*ns).to_owned()), [&[*r], tail].concat()),
            r => (None, r.to_vec()),
        };
        let resource = (*rest.first()?).to_owned();
        Some(Route {
            group: group.to_owned(),
            resource,
            namespace,
            name: rest.get(1).map(|s| (*s).to_owned()),
            sub: rest.get(2).map(|s| (*s).to_owned()),
        })
    }
}

impl Default for State {
    fn default() -> State {
        State::new()
    }
}

impl State {
    /// An empty cluster: no nodes, no StorageClass, every permission, pods become ready.
    pub fn new() -> State {
        State {
            deny: BTreeSet::new(),
            nodes: Vec::new(),
            storage_classes: Vec::new(),
            events: Vec::new(),
            config_map_429s: 0,
            requests: Vec::new(),
            pods: Pods::Ready,
            unpullable: None,
            pod_names_used: BTreeSet::new(),
            objects: BTreeMap::new(),
            next_port: 30000,
            version: 1,
        }
    }

    // ----- what tests look at -----

    /// A stored object.
    pub fn object(&self, resource: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource.to_owned(), ns.to_owned(), name.to_owned()))
    }

    /// Names of the stored objects of `resource` in `ns` matching the label `selector`.
    pub fn names(&self, resource: &str, ns: &str, selector: &str) -> Vec<String> {
        self.objects
            .iter()
            .filter(|((r, n, _), o)| r == resource && n == ns && matches_labels(o, selector))
            .map(|((_, _, name), _)| name.clone())
            .collect()
    }

    /// The requests of `method` on `resource`.
    pub fn calls(&self, method: &Method, resource: &str) -> Vec<&Recorded> {
        self.requests
            .iter()
            .filter(|r| r.method == *method && r.resource == resource)
            .collect()
    }

    /// The mutating requests from index `since` on.
    pub fn mutations_since(&self, since: usize) -> Vec<&Recorded> {
        self.requests
            .iter()
            .skip(since)
            .filter(|r| r.is_mutation())
            .collect()
    }

    /// Every permission the access reviews from request `since` on asked about, with their
    /// namespace.
    pub fn reviews(&self, since: usize) -> Vec<(String, Option<String>)> {
        self.requests
            .iter()
            .skip(since)
            .filter(|r| r.method == Method::POST && r.resource == "selfsubjectaccessreviews")
            .filter_map(|r| {
                let a = &r.body.as_ref()?["spec"]["resourceAttributes"];
                let s = |k: &str| a[k].as_str().unwrap_or("").to_owned();
                Some((
                    permission(&s("verb"), &s("resource"), &s("subresource"), &s("group")),
                    a["namespace"].as_str().map(str::to_owned),
                ))
            })
            .collect()
    }

    // ----- how tests set it up -----

    /// Stores an object as if an earlier run (or someone else) had created it; nothing is
    /// recorded.
    pub fn put(&mut self, resource: &str, ns: &str, obj: Value) -> Result<(), String> {
        let group = if resource == "deployments" {
            "apps"
        } else {
            ""
        };
        let (kind, api_version, _) =
            kind_of(group, resource).ok_or(format!("unknown resource {resource}"))?;
        let name = obj["metadata"]["name"]
            .as_str()
            .ok_or("an object without a name")?
            .to_owned();
        self.admit(resource, kind, api_version, ns, &name, obj);
        Ok(())
    }

    /// A namespace in the phase `phase` (e.g. `Terminating`).
    pub fn put_namespace(&mut self, name: &str, phase: &str) -> Result<(), String> {
        self.put(
            "namespaces",
            "",
            json!({"metadata": {"name": name}, "status": {"phase": phase}}),
        )
    }

    /// Changes what the kubelet does, for every pod there is and will be.
    pub fn set_pods(&mut self, pods: Pods) {
        self.pods = pods;
        self.rerun_kubelet();
    }

    /// Makes pulls of images starting with `prefix` fail (connection refused), or with `None`
    /// work again.
    pub fn set_unpullable(&mut self, prefix: Option<&str>) {
        self.unpullable = prefix.map(str::to_owned);
        self.rerun_kubelet();
    }

    fn rerun_kubelet(&mut self) {
        let keys: Vec<_> = self
            .objects
            .keys()
            .filter(|(r, _, _)| r == "pods" || r == "deployments")
            .cloned()
            .collect();
        for key in keys.iter().filter(|(r, _, _)| r == "pods") {
            if let Some(mut p) = self.objects.remove(key) {
                self.set_pod_status(&mut p);
                self.objects.insert(key.clone(), p);
            }
        }
        for (_, ns, name) in keys.iter().filter(|(r, _, _)| r == "deployments") {
            self.reconcile_deployment(ns, name);
        }
    }

    // ----- the API server -----

    fn bump(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    /// What the kubelet reports now for a pod running `image`.
    fn pod_status(&self, image: &str) -> Value {
        let refused;
        let behaviour = match &self.unpullable {
            Some(prefix) if image.starts_with(prefix.as_str()) => {
                let host = image.split('/').next().unwrap_or_default();
                refused = Pods::Waiting {
                    reason: "ErrImagePull".into(),
                    message: format!(
                        "failed to pull and unpack image \"{image}\": failed to do request: Head \"https://{host}/v2/\": dial tcp {host}: connect: connection refused"
                    ),
                };
                &refused
            }
            _ => &self.pods,
        };
        match behaviour {
            Pods::Ready => json!({
                "phase": "Running",
                "podIP": "10.244.0.10",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"}
                ],
                "containerStatuses": [{
                    "name": "", "image": "", "imageID": "", "ready": true, "restartCount": 0,
                    "started": true, "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}
                }]
            }),
            Pods::Waiting { reason, message } => json!({
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}
                ],
                "containerStatuses": [{
                    "name": "", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                    "started": false, "state": {"waiting": {"reason": reason, "message": message}}
                }]
            }),
        }
    }

    fn set_pod_status(&self, pod: &mut Value) {
        pod["status"] =
            self.pod_status(pod["spec"]["containers"][0]["image"].as_str().unwrap_or(""));
        pod["status"]["containerStatuses"][0]["image"] =
            pod["spec"]["containers"][0]["image"].clone();
        pod["status"]["containerStatuses"][0]["name"] =
            pod["spec"]["containers"][0]["name"].clone();
    }

    fn used_ports(&self) -> BTreeSet<i64> {
        self.objects
            .iter()
            .filter(|((r, _, _), _)| r == "services")
            .flat_map(|(_, s)| {
                s["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["nodePort"].as_i64())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Stores a new object the way the API server and its controllers would.
    fn admit(
        &mut self,
        resource: &str,
        kind: &str,
        api_version: &str,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Value {
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        if !ns.is_empty() {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let rv = self.bump();
        obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        obj["metadata"]["resourceVersion"] = json!(rv);
        obj["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
        match resource {
            "namespaces" if obj["status"]["phase"].is_null() => {
                obj["status"] = json!({"phase": "Active"});
            }
            "pods" => self.set_pod_status(&mut obj),
            "services" => {
                let mut used = self.used_ports();
                obj["spec"]["clusterIP"] = json!(format!("10.96.0.{}", self.version % 250));
                if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
                    for p in ports {
                        if p["nodePort"].as_i64().unwrap_or(0) == 0 {
                            while used.contains(&i64::from(self.next_port)) {
                                self.next_port += 1;
                            }
                            p["nodePort"] = json!(self.next_port);
                            used.insert(i64::from(self.next_port));
                            self.next_port += 1;
                        }
                    }
                }
            }
            "deployments" => {
                obj["metadata"]["generation"] = json!(1);
            }
            _ => {}
        }
        let key = (resource.to_owned(), ns.to_owned(), name.to_owned());
        self.objects.insert(key.clone(), obj);
        if resource == "deployments" {
            self.reconcile_deployment(ns, name);
        }
        self.objects.get(&key).cloned().unwrap_or_default()
    }

    fn owned_pods(&self, ns: &str, deployment: &str) -> Vec<String> {
        self.objects
            .iter()
            .filter(|((r, n, _), p)| {
                r == "pods" && n == ns && p["metadata"]["ownerReferences"][0]["name"] == deployment
            })
            .map(|((_, _, name), _)| name.clone())
            .collect()
    }

    /// The Deployment controller, ReplicaSet controller and scheduler in one, as a
    /// RollingUpdate with maxUnavailable 0 does it: one pod of the current generation (made
    /// again when it goes), the older pods kept until it is ready, and the status that says so.
    fn reconcile_deployment(&mut self, ns: &str, name: &str) {
        let key = ("deployments".to_owned(), ns.to_owned(), name.to_owned());
        let Some(d) = self.objects.get(&key).cloned() else {
            return;
        };
        let generation = d["metadata"]["generation"].as_i64().unwrap_or(1);
        let gen_of = |p: &Value| {
            p["metadata"]["annotations"]["fake/generation"]
                .as_str()
                .and_then(|g| g.parse::<i64>().ok())
        };
        let current: Vec<String> = self
            .owned_pods(ns, name)
            .into_iter()
            .filter(|p| {
                self.object("pods", ns, p)
                    .is_some_and(|p| gen_of(p) == Some(generation))
            })
            .collect();
        if current.is_empty() {
            let mut pod_name = format!("{name}-g{generation}");
            if self.pod_names_used.contains(&pod_name) {
                pod_name = format!("{pod_name}-{}", self.bump());
            }
            self.pod_names_used.insert(pod_name.clone());
            let template = &d["spec"]["template"];
            let node = template["spec"]["nodeSelector"]["kubernetes.io/hostname"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| {
                    self.nodes
                        .first()
                        .and_then(|n| n["metadata"]["name"].as_str().map(str::to_owned))
                })
                .unwrap_or_else(|| "node-1".into());
            let mut pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": ns,
                    "labels": template["metadata"]["labels"],
                    "annotations": {"fake/generation": generation.to_string()},
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                        "uid": d["metadata"]["uid"], "controller": true
                    }],
                    "uid": format!("uid-{pod_name}"),
                    "creationTimestamp": "2025-01-01T00:00:00Z"
                },
                "spec": template["spec"]
            });
            pod["spec"]["nodeName"] = json!(node);
            self.set_pod_status(&mut pod);
            self.objects
                .insert(("pods".to_owned(), ns.to_owned(), pod_name), pod);
        }
        let pods: Vec<Value> = self
            .owned_pods(ns, name)
            .iter()
            .filter_map(|p| self.object("pods", ns, p).cloned())
            .collect();
        let new_ready = pods
            .iter()
            .any(|p| gen_of(p) == Some(generation) && is_ready(p));
        if new_ready {
            for p in &pods {
                if gen_of(p) != Some(generation) {
                    let n = p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    self.objects.remove(&("pods".to_owned(), ns.to_owned(), n));
                }
            }
        }
        let pods: Vec<Value> = pods
            .into_iter()
            .filter(|p| !new_ready || gen_of(p) == Some(generation))
            .collect();
        let count = |f: &dyn Fn(&Value) -> bool| {
            i64::try_from(pods.iter().filter(|p| f(p)).count()).unwrap_or(0)
        };
        let replicas = count(&|_| true);
        let updated = count(&|p| gen_of(p) == Some(generation));
        let ready = count(&is_ready);
        if let Some(d) = self.objects.get_mut(&key) {
            d["status"] = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": updated,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": replicas - ready
            });
        }
    }

    fn namespace_phase(&self, ns: &str) -> Option<String> {
        self.object("namespaces", "", ns)
            .map(|n| n["status"]["phase"].as_str().unwrap_or("Active").to_owned())
    }

    /// Answers one request and records it.
    fn handle(&mut self, parts: &http::request::Parts, body: &[u8]) -> Response<Body> {
        let at = Instant::now();
        let header = |h| {
            parts
                .headers
                .get(h)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let accept = header(ACCEPT);
        let content_type = header(CONTENT_TYPE);
        let query = parse_query(parts.uri.query().unwrap_or(""));
        let body: Option<Value> = serde_json::from_slice(body).ok();
        let route = Route::parse(parts.uri.path());
        let (code, answer) = match &route {
            Some(r) => self.dispatch(
                &parts.method,
                r,
                &query,
                &accept,
                &content_type,
                body.as_ref(),
            ),
            None => status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
            ),
        };
        let name = match (&parts.method, &route) {
            (&Method::POST, _) => body
                .as_ref()
                .and_then(|b| b["metadata"]["name"].as_str())
                .map(str::to_owned),
            (_, Some(r)) => r.name.clone(),
            _ => None,
        };
        self.requests.push(Recorded {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query,
            content_type,
            resource: route
                .as_ref()
                .map(|r| r.resource.clone())
                .unwrap_or_default(),
            namespace: route.as_ref().and_then(|r| r.namespace.clone()),
            name,
            body,
            status: code,
            at,
        });
        let bytes = serde_json::to_vec(&answer).unwrap_or_default();
        let mut resp = Response::new(Body::from(bytes));
        *resp.status_mut() =
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    fn dispatch(
        &mut self,
        method: &Method,
        r: &Route,
        query: &BTreeMap<String, String>,
        accept: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let verb = match (method, &r.name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) => "list",
            (&Method::POST, _) => "create",
            (&Method::DELETE, _) => "delete",
            (&Method::PATCH, _) => "patch",
            (&Method::PUT, _) => "update",
            _ => "unknown",
        };
        if r.group == "authorization.k8s.io" && r.resource == "selfsubjectaccessreviews" {
            return match (method, body) {
                (&Method::POST, Some(b)) => self.review(b),
                _ => status(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource".into(),
                ),
            };
        }
        let Some((kind, api_version, namespaced)) = kind_of(&r.group, &r.resource) else {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
            );
        };
        let perm = permission(verb, &r.resource, r.sub.as_deref().unwrap_or(""), &r.group);
        if self.deny.contains(&perm) {
            let scope = match &r.namespace {
                Some(ns) => format!(" in the namespace \"{ns}\""),
                None => " at the cluster scope".into(),
            };
            return status(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: User \"test\" cannot {verb} resource \"{}\" in API group \"{}\"{scope}",
                    qualified(&r.group, &r.resource),
                    r.resource,
                    r.group
                ),
            );
        }
        if r.sub.is_some()
            || (namespaced && r.namespace.is_none() && verb != "list")
            || (!namespaced && r.namespace.is_some())
        {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
            );
        }
        let ns = r.namespace.clone().unwrap_or_default();
        let gr = qualified(&r.group, &r.resource);
        match (verb, &r.name) {
            ("get", Some(name)) => match self.object(&r.resource, &ns, name) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", format!("{gr} \"{name}\" not found")),
            },
            ("list", None) => self.list(r, kind, api_version, query, accept),
            ("create", None) => self.create(r, kind, api_version, body),
            ("delete", Some(name)) => self.delete(r, name),
            ("patch", Some(name)) => self.patch(r, name, content_type, body),
            _ => status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".into(),
            ),
        }
    }

    fn review(&mut self, body: &Value) -> (u16, Value) {
        let a = &body["spec"]["resourceAttributes"];
        let s = |k: &str| a[k].as_str().unwrap_or("").to_owned();
        let perm = permission(&s("verb"), &s("resource"), &s("subresource"), &s("group"));
        let allowed = !self.deny.contains(&perm);
        let mut st = json!({"allowed": allowed});
        if !allowed {
            st["reason"] = json!("no RBAC policy matched");
        }
        (
            201,
            json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "metadata": {"creationTimestamp": null},
                "spec": body["spec"],
                "status": st
            }),
        )
    }

    fn list(
        &self,
        r: &Route,
        kind: &str,
        api_version: &str,
        query: &BTreeMap<String, String>,
        accept: &str,
    ) -> (u16, Value) {
        let in_ns = |o: &Value| {
            r.namespace
                .as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
        };
        let all: Vec<Value> = match r.resource.as_str() {
            "nodes" => self.nodes.clone(),
            "storageclasses" => self.storage_classes.clone(),
            "events" => self.events.iter().filter(|o| in_ns(o)).cloned().collect(),
            res => self
                .objects
                .iter()
                .filter(|((rr, n, _), _)| {
                    rr == res && r.namespace.as_deref().is_none_or(|ns| n == ns)
                })
                .map(|(_, o)| o.clone())
                .collect(),
        };
        let labels = query.get("labelSelector").map_or("", String::as_str);
        let fields = query.get("fieldSelector").map_or("", String::as_str);
        let items: Vec<Value> = all
            .into_iter()
            .filter(|o| matches_labels(o, labels) && matches_fields(o, fields))
            .collect();
        let rv = self.version.to_string();
        if accept.contains("as=PartialObjectMetadataList") {
            let items: Vec<Value> = items
                .into_iter()
                .map(|o| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]}))
                .collect();
            return (
                200,
                json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "items": items}),
            );
        }
        (
            200,
            json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": rv}, "items": items}),
        )
    }

    fn create(
        &mut self,
        r: &Route,
        kind: &str,
        api_version: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let gr = qualified(&r.group, &r.resource);
        let Some(obj) = body.cloned() else {
            return status(
                400,
                "BadRequest",
                "the body of the request was in an unknown format".into(),
            );
        };
        let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
            return status(
                422,
                "Invalid",
                format!(
                    "{kind} \"\" is invalid: metadata.name: Required value: name or generateName is required"
                ),
            );
        };
        if obj["kind"].as_str().is_some_and(|k| k != kind)
            || obj["apiVersion"].as_str().is_some_and(|v| v != api_version)
        {
            return status(
                400,
                "BadRequest",
                format!(
                    "the API version in the data ({}) does not match the expected API version ({api_version})",
                    obj["apiVersion"]
                ),
            );
        }
        if r.resource == "configmaps" && self.config_map_429s > 0 {
            self.config_map_429s -= 1;
            return status(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.".into(),
            );
        }
        let ns = r.namespace.clone().unwrap_or_default();
        if !ns.is_empty() {
            match self.namespace_phase(&ns).as_deref() {
                None => return status(404, "NotFound", format!("namespaces \"{ns}\" not found")),
                Some("Terminating") => {
                    return status(
                        403,
                        "Forbidden",
                        format!(
                            "{gr} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated"
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        // As the API server does, node ports are allocated before the name is checked: a
        // second create of a Service with a fixed nodePort is a 422, not a 409.
        if r.resource == "services" {
            let used = self.used_ports();
            for p in obj["spec"]["ports"].as_array().into_iter().flatten() {
                if let Some(port) = p["nodePort"]
                    .as_i64()
                    .filter(|&p| p != 0 && used.contains(&p))
                {
                    return status(
                        422,
                        "Invalid",
                        format!(
                            "Service \"{name}\" is invalid: spec.ports[0].nodePort: Invalid value: {port}: provided port is already allocated"
                        ),
                    );
                }
            }
        }
        if self.object(&r.resource, &ns, &name).is_some() {
            return status(
                409,
                "AlreadyExists",
                format!("{gr} \"{name}\" already exists"),
            );
        }
        (
            201,
            self.admit(&r.resource, kind, api_version, &ns, &name, obj),
        )
    }

    fn delete(&mut self, r: &Route, name: &str) -> (u16, Value) {
        let ns = r.namespace.clone().unwrap_or_default();
        let key = (r.resource.clone(), ns.clone(), name.to_owned());
        let Some(obj) = self.objects.remove(&key) else {
            return status(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", qualified(&r.group, &r.resource)),
            );
        };
        if r.resource == "deployments" {
            for p in self.owned_pods(&ns, name) {
                self.objects.remove(&("pods".to_owned(), ns.clone(), p));
            }
        }
        if r.resource == "pods"
            && let Some(owner) = obj["metadata"]["ownerReferences"][0]["name"].as_str()
        {
            // The ReplicaSet controller makes a replacement.
            self.reconcile_deployment(&ns, owner);
        }
        self.bump();
        (200, obj)
    }

    fn patch(
        &mut self,
        r: &Route,
        name: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let strategic = match content_type {
            "application/strategic-merge-patch+json" => true,
            "application/merge-patch+json" => false,
            other => {
                return status(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                    ),
                );
            }
        };
        let Some(patch) = body else {
            return status(400, "BadRequest", "empty patch".into());
        };
        let ns = r.namespace.clone().unwrap_or_default();
        let key = (r.resource.clone(), ns.clone(), name.to_owned());
        let rv = self.bump();
        let Some(obj) = self.objects.get_mut(&key) else {
            return status(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", qualified(&r.group, &r.resource)),
            );
        };
        let before = obj["spec"].clone();
        merge(obj, patch, strategic);
        obj["metadata"]["resourceVersion"] = json!(rv);
        if r.resource == "deployments" && obj["spec"] != before {
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        if r.resource == "deployments" {
            self.reconcile_deployment(&ns, name);
        }
        (200, self.objects.get(&key).cloned().unwrap_or_default())
    }
}

/// A Ready, schedulable linux/amd64 node holding `images` (name, size in bytes).
pub fn node(name: &str, images: &[(&str, i64)]) -> Value {
    let images: Vec<Value> = images
        .iter()
        .map(|(n, s)| json!({"names": [format!("{n}@sha256:{}", "0".repeat(64)), n], "sizeBytes": s}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "bootID": "b", "containerRuntimeVersion": "containerd://2.0.0",
                "kernelVersion": "6.1.0", "kubeProxyVersion": "", "kubeletVersion": "v1.33.0", "machineID": "m",
                "osImage": "Debian", "systemUUID": "u"
            },
            "allocatable": {"pods": "110", "memory": "8Gi", "cpu": "4"},
            "images": images
        }
    })
}

/// A StorageClass, the default one when `default`.
pub fn storage_class(name: &str, default: bool) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name, "annotations": {"storageclass.kubernetes.io/is-default-class": default.to_string()}},
        "provisioner": "rancher.io/local-path"
    })
}

/// An event about the object `object` in `ns`, at second `second` of a fixed minute.
pub fn event(
    ns: &str,
    object: &str,
    type_: &str,
    reason: &str,
    message: &str,
    second: u32,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": format!("{object}.{second}"), "namespace": ns},
        "involvedObject": {"kind": "Pod", "name": object, "namespace": ns},
        "type": type_,
        "reason": reason,
        "message": message,
        "lastTimestamp": format!("2025-01-01T00:00:{second:02}Z")
    })
}

/// The fake API server: a task answering kube's requests from a shared [`State`].
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApi {
    /// Starts the fake on `state` and returns it with a client talking to it.
    pub fn start(state: State) -> (kube::Client, FakeApi) {
        let state = Arc::new(Mutex::new(state));
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = match body.collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(_) => bytes::Bytes::new(),
                };
                let resp = lock(&shared).handle(&parts, &bytes);
                send.send_response(resp);
            }
        });
        (
            kube::Client::new(service, "default"),
            FakeApi { state, task },
        )
    }

    /// Reads or changes the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut lock(&self.state))
    }

    /// How many requests were answered so far (a mark for [`State::mutations_since`]).
    pub fn mark(&self) -> usize {
        self.with(|s| s.requests.len())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// The fake itself, checked against what kube expects of a real API server.

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn the_fake_answers_as_kube_expects() -> TestResult {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use kube::Api;
    use kube::api::{ListParams, PostParams};

    let (client, api) = FakeApi::start(State::new());
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("n".into());
    nss.create(&PostParams::default(), &ns).await?;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "n");
    assert!(cms.get_opt("a").await?.is_none(), "404 reads as absent");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("a".into());
    cm.metadata.labels = Some([("x".to_owned(), "1".to_owned())].into());
    cms.create(&PostParams::default(), &cm).await?;
    match cms.create(&PostParams::default(), &cm).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
        }
        other => return Err(format!("second create: {other:?}").into()),
    }
    cm.metadata.name = Some("b".into());
    cm.metadata.labels = Some([("x".to_owned(), "2".to_owned())].into());
    cms.create(&PostParams::default(), &cm).await?;
    let meta = cms
        .list_metadata(&ListParams::default().labels("x=2"))
        .await?;
    let names: Vec<_> = meta
        .items
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    assert_eq!(names, ["b"]);
    let full = cms.list(&ListParams::default()).await?;
    assert_eq!(full.items.len(), 2);

    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "missing");
    match other.create(&PostParams::default(), &cm).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        r => return Err(format!("create in a missing namespace: {r:?}").into()),
    }
    api.with(|s| s.deny.insert("delete configmaps".into()));
    match cms.delete("a", &Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden")),
        r => return Err(format!("denied delete: {r:?}").into()),
    }
    api.with(|s| s.deny.clear());
    cms.delete("a", &Default::default()).await?;

    // A Service with a fixed nodePort, created twice: the port is checked before the name.
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), "n");
    let svc = serde_json::from_value(json!({
        "metadata": {"name": "s"},
        "spec": {"type": "NodePort", "ports": [{"port": 5000, "nodePort": 31999}]}
    }))?;
    svcs.create(&PostParams::default(), &svc).await?;
    match svcs.create(&PostParams::default(), &svc).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (422, "Invalid")),
        r => return Err(format!("second create of a fixed nodePort: {r:?}").into()),
    }
    assert!(cms.get_opt("a").await?.is_none());
    let creates = api.with(|s| s.calls(&Method::POST, "configmaps").len());
    assert_eq!(creates, 4);
    Ok(())
}

#[test]
fn selectors_and_merges() {
    let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "status": {"phase": "Running"}});
    assert!(matches_labels(&o, "a=1,b=2"));
    assert!(matches_labels(&o, "a==1,c!=3,!c,b"));
    assert!(!matches_labels(&o, "a=1,b=3"));
    assert!(matches_fields(
        &o,
        "status.phase!=Succeeded,status.phase!=Failed"
    ));
    assert!(!matches_fields(&o, "status.phase=Pending"));
    assert_eq!(percent_decode("a%3Db%2Cc+d"), "a=b,c d");
    let mut d = json!({"spec": {"containers": [{"name": "registry", "image": "old", "x": 1}, {"name": "side", "image": "s"}]}});
    merge(
        &mut d,
        &json!({"spec": {"containers": [{"name": "registry", "image": "new"}]}}),
        true,
    );
    assert_eq!(
        d["spec"]["containers"][0],
        json!({"name": "registry", "image": "new", "x": 1})
    );
    assert_eq!(d["spec"]["containers"][1]["image"], "s");
}
