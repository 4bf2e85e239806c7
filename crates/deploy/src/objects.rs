//! The Kubernetes objects deploy creates, as pure functions of their inputs: names derived
//! from content, fixed labels, and the pod specs that satisfy the security rules (non-root,
//! read-only root filesystem, no capabilities, RuntimeDefault seccomp, resource limits).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{Error, Result};

/// Label on everything deploy creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "bundle");
/// Label key naming the part an object plays: `seed` (ConfigMaps), `injector`, `registry`.
pub const ROLE: &str = "bundle/role";
/// Label key carrying the first 32 hex digits of the archive id that created the object.
pub const ARCHIVE: &str = "bundle/archive";
/// Label selector of the seeding ConfigMaps.
pub const SEED_SELECTOR: &str = "app.kubernetes.io/managed-by=bundle,bundle/role=seed";

/// The registry's Deployment, Service and PVC.
pub const REGISTRY: &str = "bundle-registry";
/// The injector's Service.
pub const INJECTOR: &str = "bundle-injector";
/// The port both the injector and the registry listen on inside their pods.
pub const AGENT_PORT: u16 = bundle_layout::agent::AGENT_PORT;
/// Where the registry keeps its data inside the pod.
pub const REGISTRY_ROOT: &str = "/var/lib/bundle-registry";
/// Default NodePort of the registry.
pub const DEFAULT_NODE_PORT: u16 = 31999;

/// What the content of a seeding ConfigMap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedKind {
    /// The stage0 loader, key `stage0`.
    Stage0,
    /// One part of the agent binary.
    AgentPart,
    /// The injector payload's CBOR index, key `index.cbor`.
    PayloadIndex,
    /// One frame of the payload (the archive's own frame), keyed by its sha256.
    Frame,
}

/// One ConfigMap of the seed: a name derived from the content, one binaryData key.
#[derive(Debug, Clone)]
pub struct SeedMap {
    /// What it carries.
    pub kind: SeedKind,
    /// sha256 of the content, hex.
    pub sha256: String,
    /// The binaryData key, which is also the file name in the pod.
    pub key: String,
    /// Content bytes.
    pub size: u64,
}

impl SeedMap {
    /// `bundle-<kind>-<first 40 hex digits of the content's sha256>`.
    pub fn name(&self) -> String {
        let kind = match self.kind {
            SeedKind::Stage0 => "stage0",
            SeedKind::AgentPart => "agent",
            SeedKind::PayloadIndex => "index",
            SeedKind::Frame => "frame",
        };
        format!("bundle-{kind}-{}", &self.sha256[..40])
    }
}

/// The labels of an object of `role` made for archive `archive_id` (hex).
pub fn labels(role: &str, archive_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (ROLE.to_owned(), role.to_owned()),
        (
            ARCHIVE.to_owned(),
            archive_id[..32.min(archive_id.len())].to_owned(),
        ),
    ])
}

fn typed<T: DeserializeOwned>(kind: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Invalid(format!("building the {kind}: {e}")))
}

/// A seeding ConfigMap holding `data`.
pub fn seed_config_map(map: &SeedMap, data: Vec<u8>, archive_id: &str) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(map.name());
    cm.metadata.labels = Some(labels("seed", archive_id));
    cm.binary_data = Some(BTreeMap::from([(map.key.clone(), ByteString(data))]));
    cm.immutable = Some(true);
    cm
}

/// The name of the injector pod for an agent image: one per agent, so that a re-run with
/// another archive never reuses a pod that serves something else.
pub fn injector_pod_name(agent_image: &bundle_format::Digest) -> String {
    format!("bundle-injector-{}", &agent_image.hex()[..16])
}

/// Where things are mounted in the injector.
const STAGE0_DIR: &str = "/bundle/stage0";
const AGENT_DIR: &str = "/bundle/agent";
const PAYLOAD_DIR: &str = "/bundle/payload";

/// Everything the injector pod needs to know.
#[derive(Debug, Clone)]
pub struct InjectorSpec<'a> {
    /// Pod name.
    pub name: String,
    /// The node it is pinned to.
    pub node: &'a str,
    /// An image present on that node; only its root filesystem is used.
    pub image: &'a str,
    /// The stage0 ConfigMap.
    pub stage0: &'a SeedMap,
    /// The agent's parts in order.
    pub agent_parts: &'a [SeedMap],
    /// sha256 (hex) of the whole agent binary.
    pub agent_sha256: &'a str,
    /// The payload index and frames.
    pub payload: &'a [SeedMap],
    /// The payload's id (its index's sha256, hex).
    pub payload_id: &'a str,
    /// Archive id (hex), for the labels.
    pub archive_id: &'a str,
}

fn security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

fn pod_security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "fsGroup": 65534,
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

fn probe(initial: u32) -> Value {
    json!({
        "httpGet": {"path": "/v2/", "port": AGENT_PORT},
        "initialDelaySeconds": initial,
        "periodSeconds": 1,
        "timeoutSeconds": 2,
        "failureThreshold": 3
    })
}

fn projected(maps: &[&SeedMap], mode: u32) -> Value {
    let sources: Vec<Value> = maps
        .iter()
        .map(|m| json!({"configMap": {"name": m.name(), "items": [{"key": m.key, "path": m.key}]}}))
        .collect();
    json!({"defaultMode": mode, "sources": sources})
}

/// The injector pod: stage0 (mounted from its ConfigMap) joins the agent's parts, checks their
/// sha256 and executes the agent in `inject` mode over the payload frames.
pub fn injector_pod(s: &InjectorSpec<'_>) -> Result<Pod> {
    let mut args = vec![
        "--fallback-dir".to_owned(),
        "/tmp".to_owned(),
        s.agent_sha256.to_owned(),
    ];
    args.extend(
        s.agent_parts
            .iter()
            .map(|p| format!("{AGENT_DIR}/{}", p.key)),
    );
    args.extend(
        [
            "--",
            "inject",
            "--chunks",
            PAYLOAD_DIR,
            "--index",
            &format!("sha256:{}", s.payload_id),
            "--listen",
            &format!("0.0.0.0:{AGENT_PORT}"),
        ]
        .map(str::to_owned),
    );
    let mut labels = labels("injector", s.archive_id);
    labels.insert("app.kubernetes.io/name".into(), INJECTOR.into());
    let agent: Vec<&SeedMap> = s.agent_parts.iter().collect();
    let payload: Vec<&SeedMap> = s.payload.iter().collect();
    typed(
        "injector pod",
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": s.name, "labels": labels},
            "spec": {
                "nodeName": s.node,
                "restartPolicy": "Always",
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "terminationGracePeriodSeconds": 2,
                "securityContext": pod_security_context(),
                "tolerations": [],
                "containers": [{
                    "name": "injector",
                    "image": s.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": [format!("{STAGE0_DIR}/{}", s.stage0.key)],
                    "args": args,
                    "ports": [{"name": "registry", "containerPort": AGENT_PORT}],
                    "readinessProbe": probe(0),
                    "securityContext": security_context(),
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "32Mi"},
                        "limits": {"cpu": "1", "memory": "256Mi"}
                    },
                    "volumeMounts": [
                        {"name": "stage0", "mountPath": STAGE0_DIR, "readOnly": true},
                        {"name": "agent", "mountPath": AGENT_DIR, "readOnly": true},
                        {"name": "payload", "mountPath": PAYLOAD_DIR, "readOnly": true},
                        {"name": "tmp", "mountPath": "/tmp"}
                    ]
                }],
                "volumes": [
                    {"name": "stage0", "configMap": {"name": s.stage0.name(), "defaultMode": 0o555,
                        "items": [{"key": s.stage0.key, "path": s.stage0.key}]}},
                    {"name": "agent", "projected": projected(&agent, 0o444)},
                    {"name": "payload", "projected": projected(&payload, 0o444)},
                    {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
                ]
            }
        }),
    )
}

/// A NodePort service selecting pods labelled `app.kubernetes.io/name=<name>`; `node_port`
/// 0 lets the cluster choose.
pub fn node_port_service(
    name: &str,
    role: &str,
    node_port: u16,
    archive_id: &str,
) -> Result<Service> {
    let mut port = json!({"name": "registry", "port": AGENT_PORT, "targetPort": AGENT_PORT});
    if node_port != 0 {
        port["nodePort"] = json!(node_port);
    }
    typed(
        "service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels(role, archive_id)},
            "spec": {
                "type": "NodePort",
                "selector": {"app.kubernetes.io/name": name},
                "ports": [port]
            }
        }),
    )
}

/// Where the registry stores its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A PersistentVolumeClaim of this size on the default StorageClass.
    Pvc(String),
    /// An emptyDir: the data is lost with the pod.
    EmptyDir,
}

/// The registry's PVC.
pub fn registry_pvc(size: &str, archive_id: &str) -> Result<PersistentVolumeClaim> {
    typed(
        "persistent volume claim",
        json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": REGISTRY, "labels": labels("registry", archive_id)},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": size}}
            }
        }),
    )
}

/// The registry Deployment running `image` (the agent image) in `registry` mode. With a PVC
/// it is pinned to `node`, so that a rolling update (which keeps the old pod serving the new
/// pod's image) never waits for a volume held on another node.
pub fn registry_deployment(
    image: &str,
    storage: &Storage,
    node: Option<&str>,
    archive_id: &str,
) -> Result<Deployment> {
    let mut labels = labels("registry", archive_id);
    labels.insert("app.kubernetes.io/name".into(), REGISTRY.into());
    let volume = match storage {
        Storage::Pvc(_) => {
            json!({"name": "data", "persistentVolumeClaim": {"claimName": REGISTRY}})
        }
        Storage::EmptyDir => json!({"name": "data", "emptyDir": {}}),
    };
    let mut spec = json!({
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": 10,
        "securityContext": pod_security_context(),
        "containers": [{
            "name": "registry",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["/bundle-agent"],
            "args": ["registry", "--root", REGISTRY_ROOT, "--listen", format!("0.0.0.0:{AGENT_PORT}")],
            "ports": [{"name": "registry", "containerPort": AGENT_PORT}],
            "readinessProbe": probe(0),
            "livenessProbe": {
                "httpGet": {"path": "/v2/", "port": AGENT_PORT},
                "periodSeconds": 10,
                "failureThreshold": 6
            },
            "securityContext": security_context(),
            "resources": {
                "requests": {"cpu": "100m", "memory": "64Mi"},
                "limits": {"cpu": "2", "memory": "512Mi"}
            },
            "volumeMounts": [{"name": "data", "mountPath": REGISTRY_ROOT}]
        }],
        "volumes": [volume]
    });
    if let Some(n) = node {
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": n});
    }
    typed(
        "registry deployment",
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": REGISTRY, "labels": labels.clone()},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": REGISTRY}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": spec
                }
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kind: SeedKind, c: char, key: &str) -> SeedMap {
        SeedMap {
            kind,
            sha256: c.to_string().repeat(64),
            key: key.to_owned(),
            size: 1,
        }
    }

    #[test]
    fn seed_names_are_dns_labels_derived_from_content() {
        let m = map(SeedKind::Frame, 'a', "aaaa");
        assert_eq!(m.name(), format!("bundle-frame-{}", "a".repeat(40)));
        assert!(m.name().len() <= 63);
        let cm = seed_config_map(&m, vec![1, 2, 3], &"f".repeat(64));
        assert_eq!(cm.immutable, Some(true));
        let labels = cm.metadata.labels.unwrap_or_default();
        assert_eq!(labels[ARCHIVE], "f".repeat(32));
        assert_eq!(labels[ROLE], "seed");
    }

    #[test]
    fn injector_pod_is_locked_down_and_runs_stage0() -> Result<()> {
        let stage0 = map(SeedKind::Stage0, 's', "stage0");
        let parts = [
            map(SeedKind::AgentPart, 'a', "agent.0"),
            map(SeedKind::AgentPart, 'b', "agent.1"),
        ];
        let payload = [
            map(SeedKind::PayloadIndex, 'i', "index.cbor"),
            map(SeedKind::Frame, 'c', &"c".repeat(64)),
        ];
        let pod = injector_pod(&InjectorSpec {
            name: "bundle-injector-x".into(),
            node: "node-1",
            image: "registry.k8s.io/pause:3.10",
            stage0: &stage0,
            agent_parts: &parts,
            agent_sha256: &"d".repeat(64),
            payload: &payload,
            payload_id: &"e".repeat(64),
            archive_id: &"f".repeat(64),
        })?;
        let v = serde_json::to_value(&pod).map_err(|e| Error::Invalid(e.to_string()))?;
        let c = &v["spec"]["containers"][0];
        assert_eq!(v["spec"]["nodeName"], "node-1");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["command"][0], "/bundle/stage0/stage0");
        let args: Vec<&str> = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        let d = "d".repeat(64);
        let index = format!("sha256:{}", "e".repeat(64));
        assert_eq!(
            args,
            [
                "--fallback-dir",
                "/tmp",
                d.as_str(),
                "/bundle/agent/agent.0",
                "/bundle/agent/agent.1",
                "--",
                "inject",
                "--chunks",
                "/bundle/payload",
                "--index",
                index.as_str(),
                "--listen",
                "0.0.0.0:5000"
            ]
        );
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(
            c["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/v2/");
        assert!(c["resources"]["limits"]["memory"].is_string());
        assert_eq!(v["spec"]["volumes"][0]["configMap"]["defaultMode"], 0o555);
        let srcs = &v["spec"]["volumes"][2]["projected"]["sources"];
        assert_eq!(srcs[1]["configMap"]["items"][0]["path"], "c".repeat(64));
        Ok(())
    }

    #[test]
    fn registry_deployment_keeps_serving_while_it_switches_image() -> Result<()> {
        let d = registry_deployment(
            "127.0.0.1:31000/bundle/agent@sha256:00",
            &Storage::Pvc("10Gi".into()),
            Some("n1"),
            "ab",
        )?;
        let v = serde_json::to_value(&d).map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(v["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        assert_eq!(
            v["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"],
            "n1"
        );
        assert_eq!(
            v["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            REGISTRY
        );
        let e = registry_deployment("x", &Storage::EmptyDir, None, "ab")?;
        let v = serde_json::to_value(&e).map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(v["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].is_object());
        assert!(v["spec"]["template"]["spec"]["nodeSelector"].is_null());
        Ok(())
    }

    #[test]
    fn node_port_is_fixed_or_left_to_the_cluster() -> Result<()> {
        let s = node_port_service(REGISTRY, "registry", 31999, "ab")?;
        let v = serde_json::to_value(&s).map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(v["spec"]["ports"][0]["nodePort"], 31999);
        let s = node_port_service(INJECTOR, "injector", 0, "ab")?;
        let v = serde_json::to_value(&s).map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(v["spec"]["ports"][0]["nodePort"].is_null());
        Ok(())
    }
}
