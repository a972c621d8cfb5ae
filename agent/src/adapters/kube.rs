//! The Kubernetes API: watches of this node's pods, of this node and of the `PrePull`
//! resources, reads of named pull secrets, and Events. Objects become the core's model as
//! they arrive ([`PodInfo`], labels, [`Resource`]); nothing here decides.
//!
//! What the agent asks of the API server, and so all its RBAC needs: pods list/watch (field
//! selector `spec.nodeName`), nodes list/watch (field selector `metadata.name`), prepulls
//! get/list/watch, secrets get (by name, in allowed namespaces), events.k8s.io events
//! create (in `default`), and with layer sharing discovery.k8s.io endpointslices list/watch in
//! the agent's namespace (label selector `kubernetes.io/service-name`). It never writes to a
//! `PrePull`.
use std::collections::BTreeMap;

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, ObjectReference, Pod, Secret},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    core::{
        credentials::{Credentials, CredentialsError},
        pods::{PodInfo, Resources, container_id, cpu_cores, memory_bytes, workload_of},
        prepulls::{Notice, Resource, SecretRef, clip_note},
        sharing::SliceEndpoint,
    },
    crd::{PrePull, to_core},
};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes API configuration (in-cluster service account or KUBECONFIG): {0}; \
         set [kubernetes] enabled = false to run without it"
    )]
    Config(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the {0} watch failed: {1}")]
    Watch(&'static str, #[source] watcher::Error),
    #[error("pull secret {secret}: {reason}")]
    Secret { secret: SecretRef, reason: String },
    #[error("pull secret {secret}: {source}")]
    SecretCredentials {
        secret: SecretRef,
        #[source]
        source: CredentialsError,
    },
}

/// A change from a watch, in the core's model.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    /// Added or modified.
    Apply(T),
    Delete(T),
    /// The watch (re)started; `Listed` items follow, then `ListDone`.
    Relist,
    Listed(T),
    ListDone,
}

fn change<K, T>(e: watcher::Event<K>, f: impl Fn(&K) -> T) -> Change<T> {
    match e {
        watcher::Event::Apply(k) => Change::Apply(f(&k)),
        watcher::Event::Delete(k) => Change::Delete(f(&k)),
        watcher::Event::Init => Change::Relist,
        watcher::Event::InitApply(k) => Change::Listed(f(&k)),
        watcher::Event::InitDone => Change::ListDone,
    }
}

/// The in-cluster configuration (service account), else KUBECONFIG / ~/.kube/config.
pub async fn connect() -> Result<Client, KubeError> {
    Client::try_default().await.map_err(KubeError::Config)
}

/// What the agent keeps of a pod.
pub fn pod_info(p: &Pod) -> PodInfo {
    let meta = &p.metadata;
    let workload = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| {
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"))
                .map(String::as_str);
            workload_of(&o.kind, &o.name, hash)
        });
    let mut containers: Vec<(String, Option<String>)> = Vec::new();
    let mut resources = Vec::new();
    if let Some(spec) = &p.spec {
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            let r = c.resources.as_ref();
            let (req, lim) = (
                r.and_then(|r| r.requests.as_ref()),
                r.and_then(|r| r.limits.as_ref()),
            );
            let res = Resources {
                cpu_request_cores: get(req, "cpu").and_then(cpu_cores),
                cpu_limit_cores: get(lim, "cpu").and_then(cpu_cores),
                memory_request_bytes: get(req, "memory").and_then(memory_bytes),
                memory_limit_bytes: get(lim, "memory").and_then(memory_bytes),
            };
            if !res.is_empty() {
                resources.push((c.name.clone(), res));
            }
        }
        let names = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| &c.name)
            .chain(spec.containers.iter().map(|c| &c.name))
            .chain(spec.ephemeral_containers.iter().flatten().map(|c| &c.name));
        containers.extend(names.map(|n| (n.clone(), None)));
    }
    if let Some(status) = &p.status {
        let statuses = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .chain(status.ephemeral_container_statuses.iter().flatten());
        for s in statuses {
            let id = s
                .container_id
                .as_deref()
                .and_then(container_id)
                .map(str::to_string);
            match containers.iter_mut().find(|(n, _)| *n == s.name) {
                Some(slot) => slot.1 = id,
                None => containers.push((s.name.clone(), id)),
            }
        }
    }
    PodInfo {
        uid: meta.uid.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        workload,
        containers,
        resources,
    }
}

type Watch<T> = std::pin::Pin<Box<dyn Stream<Item = Result<Change<T>, KubeError>> + Send>>;

/// The pods of `node`, as [`PodInfo`] (the Pod objects are dropped as they arrive, so the
/// agent's memory follows the number of pods, not the size of their specs).
pub fn watch_pods(client: Client, node: &str) -> Watch<PodInfo> {
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    watcher(api, cfg)
        .default_backoff()
        .map(|r| {
            r.map(|e| change(e, pod_info))
                .map_err(|e| KubeError::Watch("pods", e))
        })
        .boxed()
}

type Quantities = BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>;

fn get<'a>(which: Option<&'a Quantities>, name: &str) -> Option<&'a str> {
    which.and_then(|m| m.get(name)).map(|q| q.0.as_str())
}

/// What the agent reads of its own Node: labels (for PrePull selectors) and capacity (cores,
/// bytes) for the instance-shape advice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub labels: BTreeMap<String, String>,
    pub capacity: Option<(f64, u64)>,
}

fn node_facts(n: &Node) -> NodeFacts {
    let capacity = n.status.as_ref().and_then(|s| s.capacity.as_ref());
    NodeFacts {
        labels: n.metadata.labels.clone().unwrap_or_default(),
        capacity: get(capacity, "cpu")
            .and_then(cpu_cores)
            .zip(get(capacity, "memory").and_then(memory_bytes)),
    }
}

/// `node`'s labels and capacity (one object: a field selector on its name).
pub fn watch_node(client: Client, node: &str) -> Watch<NodeFacts> {
    let api: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    watcher(api, cfg)
        .default_backoff()
        .map(|r| {
            r.map(|e| change(e, node_facts))
                .map_err(|e| KubeError::Watch("nodes", e))
        })
        .boxed()
}

/// One EndpointSlice: its name and what its endpoints say.
fn slice_endpoints(s: &EndpointSlice) -> (String, Vec<SliceEndpoint>) {
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| SliceEndpoint {
            addresses: e.addresses.clone(),
            ready: e.conditions.as_ref().and_then(|c| c.ready),
            terminating: e.conditions.as_ref().and_then(|c| c.terminating),
            node_name: e.node_name.clone(),
            zone: e.zone.clone(),
        })
        .collect();
    (s.metadata.name.clone().unwrap_or_default(), endpoints)
}

/// The EndpointSlices of the Service `service` in `namespace` (the agents' headless Service).
pub fn watch_peer_slices(
    client: Client,
    namespace: &str,
    service: &str,
) -> Watch<(String, Vec<SliceEndpoint>)> {
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    watcher(api, cfg)
        .default_backoff()
        .map(|r| {
            r.map(|e| change(e, slice_endpoints))
                .map_err(|e| KubeError::Watch("endpointslices", e))
        })
        .boxed()
}

/// Every `PrePull` resource.
pub fn watch_prepulls(client: Client) -> Watch<(Resource, ObjectReference)> {
    let api: Api<PrePull> = Api::all(client);
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(|r| {
            r.map(|e| change(e, |p: &PrePull| (to_core(p), reference(p))))
                .map_err(|e| KubeError::Watch("prepulls", e))
        })
        .boxed()
}

/// What an Event about `p` points at.
pub fn reference(p: &PrePull) -> ObjectReference {
    ObjectReference {
        api_version: Some("ragent.dev/v1alpha1".into()),
        kind: Some("PrePull".into()),
        name: p.metadata.name.clone(),
        uid: p.metadata.uid.clone(),
        resource_version: p.metadata.resource_version.clone(),
        ..Default::default()
    }
}

/// The registry credentials of the named secrets (kubernetes.io/dockerconfigjson or
/// dockercfg), merged in order. Only `get` by name: the agent never lists secrets.
pub async fn pull_credentials(
    client: &Client,
    secrets: &[SecretRef],
) -> Result<Credentials, KubeError> {
    let mut all = Credentials::anonymous();
    for s in secrets {
        let api: Api<Secret> = Api::namespaced(client.clone(), &s.namespace);
        let secret = api.get(&s.name).await.map_err(|e| match &e {
            kube::Error::Api(status) if status.code == 404 => KubeError::Secret {
                secret: s.clone(),
                reason: "not found".into(),
            },
            kube::Error::Api(status) if status.code == 403 => KubeError::Secret {
                secret: s.clone(),
                reason: "forbidden: the agent's RBAC does not grant get on secrets in this \
                         namespace (the chart's prepull.pullSecretNamespaces)"
                    .into(),
            },
            _ => KubeError::Api {
                what: format!("reading pull secret {s}"),
                source: e,
            },
        })?;
        let text = secret_config(&secret).ok_or_else(|| KubeError::Secret {
            secret: s.clone(),
            reason: format!(
                "type {:?} has no .dockerconfigjson or .dockercfg entry",
                secret.type_.as_deref().unwrap_or("")
            ),
        })?;
        let creds = Credentials::parse(format!("secret {s}"), &text).map_err(|source| {
            KubeError::SecretCredentials {
                secret: s.clone(),
                source,
            }
        })?;
        all.merge(&creds);
    }
    Ok(all)
}

/// The docker config in a secret, as the JSON text of a `kubernetes.io/dockerconfigjson`
/// (dockercfg's older form is wrapped into `{"auths": ...}`).
fn secret_config(s: &Secret) -> Option<String> {
    let data = s.data.as_ref()?;
    if let Some(b) = data.get(".dockerconfigjson") {
        return String::from_utf8(b.0.clone()).ok();
    }
    let old = String::from_utf8(data.get(".dockercfg")?.0.clone()).ok()?;
    Some(format!("{{\"auths\": {old}}}"))
}

/// Publishes Events about `PrePull` resources as this node (reporting instance = node name).
/// Events about a cluster-scoped object live in the `default` namespace (the API server's
/// rule), so that is where the agent needs `create`. Each is a new Event: the core's
/// [`crate::core::prepulls::Reporter`] already says each change once, and two images of one
/// resource must not fold into one Event (as a cache keyed on the reason would do).
pub struct Events {
    api: Api<k8s_openapi::api::events::v1::Event>,
    node: String,
}

/// Where Events about cluster-scoped objects go.
pub const EVENTS_NAMESPACE: &str = "default";

impl Events {
    pub fn new(client: Client, node: &str) -> Events {
        Events {
            api: Api::namespaced(client, EVENTS_NAMESPACE),
            node: node.into(),
        }
    }

    pub async fn publish(&self, n: &Notice, regarding: &ObjectReference) -> Result<(), KubeError> {
        use k8s_openapi::{
            apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
            jiff::Timestamp,
        };
        let now = Timestamp::now();
        let ev = k8s_openapi::api::events::v1::Event {
            metadata: ObjectMeta {
                // Unique per node and instant; a name Kubernetes accepts (lowercase, <= 253).
                name: Some(format!(
                    "{}.{}.{:x}",
                    n.resource,
                    self.node.to_ascii_lowercase(),
                    now.as_nanosecond()
                )),
                namespace: Some(EVENTS_NAMESPACE.into()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if n.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(n.reason.into()),
            note: Some(clip_note(&n.note)),
            action: Some("PrePull".into()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("ragent.dev/agent".into()),
            reporting_instance: Some(self.node.clone()),
            ..Default::default()
        };
        self.api
            .create(&kube::api::PostParams::default(), &ev)
            .await
            .map(|_| ())
            .map_err(|source| KubeError::Api {
                what: format!(
                    "publishing a {} Event about PrePull {}",
                    n.reason, n.resource
                ),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_becomes_its_containers_and_owner() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-7d9f8c6b5-x2k4p",
                "namespace": "shop",
                "uid": "6f1e0b1a-0000-4000-8000-000000000001",
                "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
                    "uid": "aa", "controller": true, "blockOwnerDeletion": true
                }],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]
            },
            "spec": {
                "nodeName": "node-1",
                "initContainers": [{"name": "migrate", "image": "r/app:v1"}],
                "containers": [
                    {"name": "web", "image": "r/app:v1"},
                    {"name": "proxy", "image": "r/proxy:v1"}
                ]
            },
            "status": {
                "phase": "Running",
                "initContainerStatuses": [{
                    "name": "migrate", "image": "r/app:v1", "imageID": "", "ready": false,
                    "restartCount": 0, "containerID": "containerd://init1"
                }],
                "containerStatuses": [{
                    "name": "web", "image": "r/app:v1", "imageID": "", "ready": true,
                    "restartCount": 1, "containerID": "containerd://abc"
                }, {
                    "name": "proxy", "image": "r/proxy:v1", "imageID": "", "ready": false,
                    "restartCount": 0
                }]
            }
        }))
        .expect("a realistic pod");
        let info = pod_info(&p);
        assert_eq!(info.namespace, "shop");
        assert_eq!(info.workload.as_deref(), Some("Deployment/web"));
        assert_eq!(
            info.containers,
            vec![
                ("migrate".to_string(), Some("init1".to_string())),
                ("web".to_string(), Some("abc".to_string())),
                ("proxy".to_string(), None),
            ]
        );
    }

    #[test]
    fn secrets_give_their_docker_config() {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "regcred", "namespace": "team-a"},
            "type": "kubernetes.io/dockercfg",
            // base64 of {"r.example":{"auth":"dTpw"}}
            "data": {".dockercfg": "eyJyLmV4YW1wbGUiOnsiYXV0aCI6ImRUcHcifX0="}
        }))
        .expect("secret");
        let text = secret_config(&s).expect("config");
        let c = Credentials::parse("secret team-a/regcred", &text).expect("parses");
        assert!(c.for_host("r.example").is_some());
        let opaque: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "x", "namespace": "team-a"},
            "type": "Opaque", "data": {"password": "cA=="}
        }))
        .expect("secret");
        assert!(secret_config(&opaque).is_none());
    }
}
