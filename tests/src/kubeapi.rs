//! A Kubernetes API server in the test process, behind kube's `tower-test` mock service: the
//! kube client the agent is given sends every request here. It answers lists and watches of
//! realistic objects (pods with owner references and container statuses, nodes with labels,
//! `PrePull` resources), honours field selectors as the API server does, streams watch events
//! as the objects change, can end a watch or expire it with 410 Gone, serves secrets by name
//! with RBAC as a list of namespaces, accepts Events — and records every request, so tests can
//! assert what the agent never does (write to a `PrePull`, list secrets).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::Stream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The collections served (paths of cluster-wide lists).
pub const PODS: &str = "/api/v1/pods";
pub const NODES: &str = "/api/v1/nodes";
pub const PREPULLS: &str = "/apis/ragent.dev/v1alpha1/prepulls";

type Chunks = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
type Body = StreamBody<Chunks>;

/// One request the agent made.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|q| q == "watch=true")
    }
}

/// A field selector `path=value`, or none.
type FieldFilter = Option<(String, String)>;

struct Collection {
    api_version: &'static str,
    list_kind: &'static str,
    objects: BTreeMap<String, Value>,
    watchers: Vec<(FieldFilter, mpsc::UnboundedSender<Bytes>)>,
}

struct State {
    rv: u64,
    collections: BTreeMap<&'static str, Collection>,
    secrets: BTreeMap<(String, String), Value>,
    /// Namespaces where RBAC grants `get` on secrets.
    secret_namespaces: Vec<String>,
    requests: Vec<Recorded>,
}

/// The fake API server; clones share it.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or("")),
        None => m["name"].as_str().unwrap_or("").to_string(),
    }
}

/// `a.b.c` of a JSON object as a string.
fn field<'a>(obj: &'a Value, path: &str) -> Option<&'a str> {
    path.split('.').try_fold(obj, |v, k| v.get(k))?.as_str()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| decode(v))
}

/// A `fieldSelector` of the one form the agent uses: `path=value`.
fn field_selector(query: &str) -> Option<(String, String)> {
    let s = query_param(query, "fieldSelector")?;
    let (k, v) = s.split_once('=')?;
    Some((k.to_string(), v.to_string()))
}

fn selected(filter: &Option<(String, String)>, obj: &Value) -> bool {
    filter
        .as_ref()
        .is_none_or(|(k, v)| field(obj, k) == Some(v.as_str()))
}

fn chunks_of(parts: Vec<Bytes>) -> Body {
    let s = futures::stream::iter(parts.into_iter().map(|b| Ok(Frame::data(b))));
    StreamBody::new(Box::pin(s) as Chunks)
}

fn respond(code: u16, body: Value) -> http::Response<Body> {
    let mut r = http::Response::new(chunks_of(vec![Bytes::from(body.to_string())]));
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn watch_line(kind: &str, obj: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})))
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi::new()
    }
}

impl FakeApi {
    pub fn new() -> FakeApi {
        let mut collections = BTreeMap::new();
        for (path, api_version, list_kind) in [
            (PODS, "v1", "PodList"),
            (NODES, "v1", "NodeList"),
            (PREPULLS, "ragent.dev/v1alpha1", "PrePullList"),
        ] {
            collections.insert(
                path,
                Collection {
                    api_version,
                    list_kind,
                    objects: BTreeMap::new(),
                    watchers: Vec::new(),
                },
            );
        }
        FakeApi {
            state: Arc::new(Mutex::new(State {
                rv: 100,
                collections,
                secrets: BTreeMap::new(),
                secret_namespaces: Vec::new(),
                requests: Vec::new(),
            })),
        }
    }

    /// A kube client whose requests this server answers (needs a tokio runtime).
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let api = api.clone();
                tokio::spawn(async move {
                    let resp = api.answer(req).await;
                    send.send_response(resp);
                });
            }
        });
        kube::Client::new(service, "default")
    }

    async fn answer(&self, req: http::Request<kube::client::Body>) -> http::Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let body = req
            .into_body()
            .collect_bytes()
            .await
            .ok()
            .filter(|b| !b.is_empty())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        let rec = Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
        };
        let mut st = lock(&self.state);
        st.requests.push(rec.clone());
        let rv = st.rv;
        if method == "GET"
            && let Some(c) = st.collections.get_mut(path.as_str())
        {
            let filter = field_selector(&query);
            if rec.is_watch() {
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                c.watchers.push((filter, tx));
                let s = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
                });
                return http::Response::new(StreamBody::new(Box::pin(s) as Chunks));
            }
            let items: Vec<&Value> = c
                .objects
                .values()
                .filter(|o| selected(&filter, o))
                .collect();
            return respond(
                200,
                json!({
                    "apiVersion": c.api_version, "kind": c.list_kind,
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            );
        }
        // /api/v1/namespaces/<ns>/secrets/<name>
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if let ["api", "v1", "namespaces", ns, "secrets", name] = parts.as_slice()
            && method == "GET"
        {
            if !st.secret_namespaces.iter().any(|n| n == ns) {
                return respond(
                    403,
                    status(
                        403,
                        "Forbidden",
                        &format!(
                            "secrets \"{name}\" is forbidden: cannot get resource \"secrets\" in namespace \"{ns}\""
                        ),
                    ),
                );
            }
            return match st.secrets.get(&(ns.to_string(), name.to_string())) {
                Some(s) => respond(200, s.clone()),
                None => respond(
                    404,
                    status(404, "NotFound", &format!("secrets \"{name}\" not found")),
                ),
            };
        }
        if let [
            "apis",
            "events.k8s.io",
            "v1",
            "namespaces",
            _ns,
            "events",
            ..,
        ] = parts.as_slice()
        {
            let mut ev = body.unwrap_or(Value::Null);
            ev["metadata"]["resourceVersion"] = json!(rv.to_string());
            return respond(if method == "POST" { 201 } else { 200 }, ev);
        }
        respond(
            404,
            status(
                404,
                "NotFound",
                &format!("the fake API does not serve {method} {path}"),
            ),
        )
    }

    /// Adds or replaces an object of a collection; live watches that select it see it.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut st = lock(&self.state);
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let Some(c) = st.collections.get_mut(collection) else {
            panic!("no collection {collection}")
        };
        let k = key(&obj);
        let kind = if c.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.watchers
            .retain(|(f, tx)| !selected(f, &obj) || tx.send(watch_line(kind, &obj)).is_ok());
        c.objects.insert(k, obj);
    }

    /// Deletes an object (`name`, or `namespace/name`).
    pub fn delete(&self, collection: &str, name: &str) {
        let mut st = lock(&self.state);
        st.rv += 1;
        let rv = st.rv;
        let Some(c) = st.collections.get_mut(collection) else {
            panic!("no collection {collection}")
        };
        if let Some(mut obj) = c.objects.remove(name) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.watchers.retain(|(f, tx)| {
                !selected(f, &obj) || tx.send(watch_line("DELETED", &obj)).is_ok()
            });
        }
    }

    /// Changes an object without telling the live watches (as if they were down meanwhile).
    pub fn put_quietly(&self, collection: &str, obj: Value) {
        let watchers = {
            let mut st = lock(&self.state);
            std::mem::take(
                &mut st
                    .collections
                    .get_mut(collection)
                    .expect("collection")
                    .watchers,
            )
        };
        self.put(collection, obj);
        lock(&self.state)
            .collections
            .get_mut(collection)
            .expect("collection")
            .watchers = watchers;
    }

    /// Deletes without telling the live watches.
    pub fn delete_quietly(&self, collection: &str, name: &str) {
        let mut st = lock(&self.state);
        st.rv += 1;
        st.collections
            .get_mut(collection)
            .expect("collection")
            .objects
            .remove(name);
    }

    /// Ends every live watch of a collection normally (the API server's timeout): clients
    /// watch again from their last resourceVersion.
    pub fn end_watches(&self, collection: &str) {
        lock(&self.state)
            .collections
            .get_mut(collection)
            .expect("collection")
            .watchers
            .clear();
    }

    /// Ends every live watch with a 410 Gone error event (the resourceVersion expired):
    /// clients must list again.
    pub fn expire_watches(&self, collection: &str) {
        let gone = status(410, "Expired", "too old resource version");
        let watchers = std::mem::take(
            &mut lock(&self.state)
                .collections
                .get_mut(collection)
                .expect("collection")
                .watchers,
        );
        for (_, tx) in watchers {
            let _ = tx.send(watch_line("ERROR", &gone));
        }
    }

    /// A secret the API holds; `readable`: RBAC grants get in its namespace.
    pub fn put_secret(&self, secret: Value) {
        let ns = secret["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = secret["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        lock(&self.state).secrets.insert((ns, name), secret);
    }

    /// RBAC: the agent may get secrets in these namespaces.
    pub fn grant_secrets_in(&self, namespaces: &[&str]) {
        lock(&self.state).secret_namespaces = namespaces.iter().map(|n| n.to_string()).collect();
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// The Events created (POST bodies), oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.contains("/events"))
            .filter_map(|r| r.body)
            .collect()
    }

    /// Live watches of a collection.
    pub fn watching(&self, collection: &str) -> usize {
        let mut st = lock(&self.state);
        let c = st.collections.get_mut(collection).expect("collection");
        c.watchers.retain(|(_, tx)| !tx.is_closed());
        c.watchers.len()
    }
}

/// A pod as kubelet and the controllers leave it: owned by a Deployment's ReplicaSet,
/// scheduled on `node`, with a running container per `(name, container id)`.
pub fn pod(ns: &str, name: &str, uid: &str, node: &str, containers: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": uid,
            "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
                "uid": "0e3b", "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": [{
                "manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}
            }]
        },
        "spec": {
            "nodeName": node,
            "containers": containers.iter().map(|(n, _)| json!({
                "name": n, "image": "registry.example/app:v1",
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}
            })).collect::<Vec<_>>()
        },
        "status": {
            "phase": "Running", "qosClass": "Burstable",
            "containerStatuses": containers.iter().map(|(n, id)| json!({
                "name": n, "image": "registry.example/app:v1", "imageID": "",
                "ready": true, "restartCount": 0, "started": true,
                "containerID": format!("containerd://{id}"),
                "state": {"running": {"startedAt": "2026-11-28T05:00:00Z"}}
            })).collect::<Vec<_>>()
        }
    })
}

pub fn node(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": labels},
        "status": {"capacity": {"cpu": "2", "memory": "24Gi"}}
    })
}

/// A `PrePull` as `kubectl apply` leaves it.
pub fn prepull(name: &str, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "ragent.dev/v1alpha1", "kind": "PrePull",
        "metadata": {
            "name": name, "uid": format!("uid-{name}"), "generation": generation,
            "creationTimestamp": "2026-11-28T05:00:00Z"
        },
        "spec": spec
    })
}

/// A `kubernetes.io/dockerconfigjson` secret.
pub fn docker_secret(ns: &str, name: &str, config_json: &str) -> Value {
    use base64::Engine;
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": ns},
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config_json)}
    })
}

/// The agent's Kubernetes side against this server (no containerd: the socket does not exist,
/// so applied resources report PullFailed; the e2e test `kube::` pulls for real).
#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, RwLock},
        time::{Duration, Instant},
    };

    use ragent::{
        config::{KubeSettings, PrepullSection, prepull_policy},
        core::pods::Index,
        metrics::{KubeMetrics, Metrics},
    };
    use serde_json::json;
    use tokio::sync::watch;

    use super::*;

    struct Agent {
        pods: Arc<RwLock<Index>>,
        capacity: Arc<RwLock<Option<(f64, u64)>>>,
        metrics: KubeMetrics,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(api: &FakeApi, allowed: &[&str]) -> Agent {
        let m = Metrics::new(prometheus::Registry::new()).expect("metrics");
        let metrics = m.kube().expect("kube metrics");
        let pods = Arc::new(RwLock::new(Index::default()));
        let (stop, stop_rx) = watch::channel(false);
        let capacity = Arc::new(RwLock::new(None));
        let opts = ragent::kubernetes::Options {
            settings: KubeSettings {
                node_name: "node-1".into(),
                pull_secret_namespaces: allowed.iter().map(|s| s.to_string()).collect(),
            },
            socket: "/nonexistent/containerd.sock".into(),
            namespace: "k8s.io".into(),
            prepull: prepull_policy(&PrepullSection::default()).expect("defaults"),
            reconcile_interval: Duration::from_millis(300),
            node_capacity: capacity.clone(),
            mesh: None,
        };
        let task = tokio::spawn(ragent::kubernetes::run(
            api.client(),
            opts,
            pods.clone(),
            metrics.clone(),
            m.prepull.clone(),
            stop_rx,
        ));
        Agent {
            pods,
            capacity,
            metrics,
            stop,
            task,
        }
    }

    impl Agent {
        async fn stop(self) {
            let _ = self.stop.send(true);
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the kube side stops within 10 s")
                .expect("no panic");
        }

        fn pods(&self) -> usize {
            self.pods.read().expect("index").len()
        }

        fn who(&self, container: &str) -> Option<String> {
            let ix = self.pods.read().expect("index");
            ix.workload(container)
                .map(|w| format!("{}/{}/{}", w.namespace, w.pod, w.container))
        }

        fn resources(&self, state: &str) -> i64 {
            self.metrics.resources.with_label_values(&[state]).get()
        }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn reasons_for(api: &FakeApi, prepull: &str) -> Vec<String> {
        api.events()
            .iter()
            .filter(|e| e["regarding"]["name"] == prepull)
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }

    #[tokio::test]
    async fn only_this_nodes_pods_are_indexed_and_watches_recover() {
        let api = FakeApi::new();
        api.put(NODES, node("node-1", json!({"pool": "web"})));
        api.put(PODS, pod("shop", "web-1", "u1", "node-1", &[("web", "c1")]));
        api.put(
            PODS,
            pod(
                "shop",
                "web-2",
                "u2",
                "node-1",
                &[("web", "c2"), ("proxy", "c3")],
            ),
        );
        api.put(PODS, pod("shop", "web-3", "u3", "node-2", &[("web", "c4")]));
        let agent = start(&api, &[]);
        until("the first list", || agent.pods() == 2).await;
        assert_eq!(agent.who("c3").as_deref(), Some("shop/web-2/proxy"));
        assert_eq!(agent.who("c4"), None, "a pod of another node");
        let owner = agent
            .pods
            .read()
            .expect("index")
            .owner("c1")
            .map(str::to_string);
        assert_eq!(owner.as_deref(), Some("Deployment/web"));
        // Requests from the spec, in base units; the Node's capacity for the shape advice.
        let resources = agent
            .pods
            .read()
            .expect("index")
            .by_name("shop", "web-2")
            .map(|p| p.resources.clone())
            .expect("web-2");
        let want = ragent::core::pods::Resources {
            cpu_request_cores: Some(0.1),
            cpu_limit_cores: None,
            memory_request_bytes: Some(128 << 20),
            memory_limit_bytes: None,
        };
        assert_eq!(
            resources,
            vec![("web".to_string(), want), ("proxy".to_string(), want)]
        );
        until("the node's capacity", || {
            *agent.capacity.read().expect("capacity") == Some((2.0, 24 << 30))
        })
        .await;
        // Every pod request was field-selected to this node.
        let pod_requests: Vec<Recorded> = api
            .requests()
            .into_iter()
            .filter(|r| r.path == PODS)
            .collect();
        assert!(!pod_requests.is_empty());
        for r in &pod_requests {
            assert!(
                r.query.contains("fieldSelector=spec.nodeName%3Dnode-1"),
                "{r:?}"
            );
        }
        // Changes arrive through the watch.
        until("the pod watch", || api.watching(PODS) == 1).await;
        api.put(PODS, pod("shop", "web-4", "u4", "node-1", &[("web", "c5")]));
        api.put(PODS, pod("shop", "web-5", "u5", "node-2", &[("web", "c6")]));
        until("the new pod", || agent.who("c5").is_some()).await;
        api.delete(PODS, "shop/web-1");
        until("the deleted pod to go", || agent.who("c1").is_none()).await;
        assert_eq!(agent.pods(), 2);

        // The watch ends (server timeout): the client watches again and misses nothing sent after.
        api.end_watches(PODS);
        until("a new pod watch", || api.watching(PODS) == 1).await;
        api.put(PODS, pod("shop", "web-6", "u6", "node-1", &[("web", "c7")]));
        until("a pod after the restart", || agent.who("c7").is_some()).await;

        // 410 Gone: a pod deleted while the watch was away disappears with the relist.
        let lists_before = api
            .requests()
            .iter()
            .filter(|r| r.path == PODS && !r.is_watch())
            .count();
        api.delete_quietly(PODS, "shop/web-2");
        api.expire_watches(PODS);
        until("the relist to drop the pod deleted meanwhile", || {
            agent.who("c2").is_none()
        })
        .await;
        let lists_after = api
            .requests()
            .iter()
            .filter(|r| r.path == PODS && !r.is_watch())
            .count();
        assert!(lists_after > lists_before, "410 Gone must relist");
        assert_eq!(agent.pods(), 2, "web-4 and web-6");
        assert!(
            agent
                .metrics
                .watch_errors
                .with_label_values(&["pods"])
                .get()
                >= 1
        );
        until("ragent_kube_up", || agent.metrics.up.get() == 1).await;
        assert_eq!(agent.metrics.pods.get(), 2);
        agent.stop().await;
    }

    #[tokio::test]
    async fn prepulls_are_applied_refused_or_skipped_per_node_and_never_written() {
        let api = FakeApi::new();
        api.grant_secrets_in(&["team-a"]);
        api.put(NODES, node("node-1", json!({"pool": "web", "zone": "a"})));
        api.put(NODES, node("node-2", json!({"pool": "gpu"})));
        let img = "127.0.0.1:5000/ragent/app-py-web:v1";
        api.put(PREPULLS, prepull("web", 1, json!({
            "images": [img],
            "nodeSelector": {"matchLabels": {"pool": "web"},
                             "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}
        })));
        api.put(
            PREPULLS,
            prepull(
                "gpu",
                1,
                json!({
                    "images": [img], "nodeSelector": {"matchLabels": {"pool": "gpu"}}
                }),
            ),
        );
        api.put(PREPULLS, prepull("system-secret", 1, json!({
            "images": [img], "pullSecrets": [{"namespace": "kube-system", "name": "regcred"}]
        })));
        api.put(
            PREPULLS,
            prepull(
                "missing-secret",
                1,
                json!({
                    "images": [img], "pullSecrets": [{"namespace": "team-a", "name": "regcred"}]
                }),
            ),
        );
        api.put(
            PREPULLS,
            prepull(
                "bad-selector",
                1,
                json!({
                    "images": [img],
                    "nodeSelector": {"matchExpressions": [{"key": "zone", "operator": "In"}]}
                }),
            ),
        );
        let agent = start(&api, &["team-a"]);
        until("decisions", || {
            agent.resources("applied") == 1
                && agent.resources("not_selected") == 1
                && agent.resources("refused") == 3
        })
        .await;
        until("Refused events", || {
            ["system-secret", "missing-secret", "bad-selector"]
                .iter()
                .all(|n| reasons_for(&api, n).contains(&"Refused".to_string()))
        })
        .await;
        // The applied one cannot reach containerd here: its failure is reported once.
        until("PullFailed for web", || {
            reasons_for(&api, "web").contains(&"PullFailed".to_string())
        })
        .await;
        let ev = api
            .events()
            .into_iter()
            .find(|e| e["regarding"]["name"] == "system-secret")
            .expect("event");
        assert_eq!(ev["reportingInstance"], "node-1");
        assert_eq!(ev["reportingController"], "ragent.dev/agent");
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["regarding"]["kind"], "PrePull");
        // (Its namespace is the request path's: `default`, checked with every write below.)
        assert!(
            ev["note"]
                .as_str()
                .unwrap_or("")
                .contains("kube-system/regcred"),
            "{ev}"
        );
        let missing = api
            .events()
            .into_iter()
            .find(|e| e["regarding"]["name"] == "missing-secret")
            .expect("event");
        assert!(
            missing["note"].as_str().unwrap_or("").contains("not found"),
            "{missing}"
        );
        assert!(
            reasons_for(&api, "gpu").is_empty(),
            "a node not selected says nothing"
        );

        // The secret appears: the next reconcile applies the resource.
        api.put_secret(docker_secret(
            "team-a",
            "regcred",
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dTpw"}}}"#,
        ));
        until("the resource with its secret applied", || {
            agent.resources("applied") == 2
        })
        .await;

        // The node's labels change: the selectors follow.
        api.put(NODES, node("node-1", json!({"pool": "gpu"})));
        until("selectors re-evaluated", || {
            // web needs pool=web; gpu and missing-secret apply; two stay refused.
            agent.resources("not_selected") == 1
                && agent.resources("applied") == 2
                && agent.resources("refused") == 2
        })
        .await;
        // A resource deleted stops counting.
        api.delete(PREPULLS, "bad-selector");
        until("the deletion", || agent.resources("refused") == 1).await;

        // Steady state writes nothing more: the same failures are not reported again.
        let n = api.events().len();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(api.events().len(), n, "{:#?}", &api.events()[n..]);
        agent.stop().await;

        let requests = api.requests();
        for r in &requests {
            // Never a write to a PrePull, never a list of secrets, never a secret outside the
            // allowed namespaces; writes only to Events.
            if r.path.starts_with(PREPULLS) {
                assert_eq!(r.method, "GET", "{r:?}");
            }
            if r.path.contains("/secrets") {
                assert!(
                    r.path.starts_with("/api/v1/namespaces/team-a/secrets/"),
                    "{r:?}"
                );
                assert_eq!(r.method, "GET", "{r:?}");
            }
            if r.method != "GET" {
                assert!(
                    r.path
                        .starts_with("/apis/events.k8s.io/v1/namespaces/default/events"),
                    "{r:?}"
                );
            }
        }
        // The node is watched by name: the agent reads only its own Node.
        for r in requests.iter().filter(|r| r.path == NODES) {
            assert!(
                r.query.contains("fieldSelector=metadata.name%3Dnode-1"),
                "{r:?}"
            );
        }
    }
}
