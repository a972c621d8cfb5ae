//! The pre-pull resource end to end: `PrePull` objects served by the test kit's fake Kubernetes
//! API (kube's tower-test mock client) → the agent, in this process, with its kube side on →
//! images in the node's real containerd, fetched from the real registry — a private one through
//! an htpasswd registry with the credentials of the secret the resource names, and only that
//! resource's. Outcomes come back as Events; the agent writes nothing else.
use std::time::Duration;

use clap::Parser;
use ragent::config::{Cli, Command};
use ragent_testkit::{
    auth::{self, AuthKind, AuthRegistry},
    kubeapi::{self, FakeApi, NODES, PREPULLS},
};
use serde_json::json;

use crate::support::*;

fn reasons(api: &FakeApi, prepull: &str) -> Vec<String> {
    api.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == prepull)
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepull_resources_from_the_api_land_in_containerd() {
    let node = node();
    let set = fixtures(&node);
    let web = set.reference("ragent/app-py-web", "v1");
    let worker = set.reference("ragent/app-py-worker", "v1");
    let batch = set.reference("ragent/app-jvm-batch", "v1");
    for (repo, tag) in [
        ("ragent/app-py-web", "v1"),
        ("ragent/app-py-worker", "v1"),
        ("ragent/app-jvm-api", "v1"),
    ] {
        make_missing(&node, &set, repo, tag).await;
    }
    let _ = node
        .ctr("k8s.io")
        .args(["images", "rm", "--sync", &batch])
        .output();
    let reg = AuthRegistry::start(&node, AuthKind::Htpasswd, "puller", "s3cret").expect("registry");
    let private = reg.reference("ragent/app-jvm-api", "v1");

    let api = FakeApi::new();
    api.grant_secrets_in(&["team-a"]);
    api.put_secret(kubeapi::docker_secret(
        "team-a",
        "regcred",
        &auth::docker_config(&reg.host(), "puller", "s3cret"),
    ));
    api.put(NODES, kubeapi::node("node-1", json!({"pool": "web"})));
    api.put(
        PREPULLS,
        kubeapi::prepull("python-stack", 1, json!({"images": [web, worker]})),
    );
    api.put(
        PREPULLS,
        kubeapi::prepull(
            "private",
            1,
            json!({"images": [private], "pullSecrets": [{"namespace": "team-a", "name": "regcred"}]}),
        ),
    );
    // The same private image without a secret: never pulled with another resource's.
    api.put(
        PREPULLS,
        kubeapi::prepull("private-no-secret", 1, json!({"images": [private]})),
    );
    api.put(
        PREPULLS,
        kubeapi::prepull(
            "gpu-only",
            1,
            json!({"images": [batch], "nodeSelector": {"matchLabels": {"pool": "gpu"}}}),
        ),
    );

    let port = free_port();
    let socket = node.socket();
    let cli = Cli::try_parse_from([
        "ragent".as_ref(),
        "--containerd".as_ref(),
        socket.as_os_str(),
        "agent".as_ref(),
        "--no-ebpf".as_ref(),
        "--metrics-addr".as_ref(),
        format!("127.0.0.1:{port}").as_ref(),
    ])
    .expect("flags");
    let file: ragent::config::FileConfig = toml::from_str(&format!(
        r#"
[prepull]
insecure_registries = ["{}", "{}"]
retry_max_s = 2
[kubernetes]
enabled = true
node_name = "node-1"
pull_secret_namespaces = ["team-a"]
"#,
        node.registry(),
        reg.host()
    ))
    .expect("config");
    let Command::Agent(args) = &cli.command else {
        panic!("agent")
    };
    let cfg = ragent::config::agent(&cli, args, &file).expect("valid config");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(ragent::agent::run_with(cfg, Some(api.client()), async {
        let _ = stop_rx.await;
    }));

    let want_web = set.image("ragent/app-py-web", "v1").expect("fixture");
    let want_worker = set.image("ragent/app-py-worker", "v1").expect("fixture");
    let want_private = set.image("ragent/app-jvm-api", "v1").expect("fixture");
    wait_for_async(
        "the PrePull images in containerd",
        Duration::from_secs(120),
        || async {
            let a = record_target(&node, &web).await?;
            let b = record_target(&node, &worker).await?;
            let c = record_target(&node, &private).await?;
            Some((a, b, c))
        },
    )
    .await;
    assert_eq!(
        record_target(&node, &web).await.as_deref(),
        Some(want_web.manifest_digest.as_str())
    );
    assert_eq!(
        record_target(&node, &worker).await.as_deref(),
        Some(want_worker.manifest_digest.as_str())
    );
    assert_eq!(
        record_target(&node, &private).await.as_deref(),
        Some(want_private.manifest_digest.as_str())
    );
    assert!(unpacked(&node, &set, "ragent/app-py-web", "v1"));
    let outcomes = || {
        reasons(&api, "python-stack")
            .iter()
            .filter(|r| *r == "Pulled")
            .count()
            == 2
            && reasons(&api, "private").contains(&"Pulled".to_string())
            && reasons(&api, "private-no-secret").contains(&"PullFailed".to_string())
    };
    let t0 = std::time::Instant::now();
    while !outcomes() && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(outcomes(), "Events for each outcome: {:#?}", api.events());
    let failed = api
        .events()
        .into_iter()
        .find(|e| e["regarding"]["name"] == "private-no-secret")
        .expect("event");
    assert!(
        failed["note"]
            .as_str()
            .unwrap_or("")
            .contains("credentials")
            || failed["note"].as_str().unwrap_or("").contains("401"),
        "{failed}"
    );
    // The resource for other nodes did nothing here.
    assert!(reasons(&api, "gpu-only").is_empty());
    assert_eq!(record_target(&node, &batch).await, None);

    let (status, metrics) = ragent_testkit::http::get(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        "/metrics",
    )
    .expect("metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&metrics, "ragent_prepull_resources{state=\"applied\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "ragent_prepull_resources{state=\"not_selected\"}"),
        Some(1.0)
    );
    assert_eq!(metric_value(&metrics, "ragent_kube_up"), Some(1.0));
    assert!(metric_value(&metrics, "ragent_prepull_images{state=\"ready\"}") >= Some(3.0));

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent stops within 30 s")
        .expect("no panic")
        .expect("the agent ends cleanly");
    for r in api.requests() {
        if r.method != "GET" {
            assert!(r.path.contains("/events"), "the agent wrote {r:?}");
        }
    }
    let _ = node
        .ctr("k8s.io")
        .args(["images", "rm", "--sync", &private])
        .output();
}

/// Right-sizing with the kube side on: a CRI pod whose Pod object the API serves gets its
/// current requests from the pod spec and its owner as `workload`; the node's capacity (hence
/// its current shape) comes from the Node object, not the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rightsizing_reads_requests_from_the_pod_spec_and_capacity_from_the_node() {
    use ragent_testkit::pod::{Pod, PodSpec};
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    let node = node();
    let set = fixtures(&node);
    let image = set.reference("ragent/run", "v1");
    let pod = Pod::start(
        &node,
        PodSpec::new("shop", "web-rs", &image)
            .container("web")
            .shell("/bin/busybox sleep 3600"),
    )
    .await
    .expect("the pod");
    pod.wait_running(Duration::from_secs(30))
        .await
        .expect("running");

    let api = FakeApi::new();
    // 4 cores and 15.5 GiB: what a general-4x16 machine reports (the kernel keeps some).
    api.put(
        NODES,
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1", "uid": "uid-node-1", "labels": {}},
            "status": {"capacity": {"cpu": "4", "memory": "16252928Ki", "pods": "110"}}
        }),
    );
    api.put(
        kubeapi::PODS,
        kubeapi::pod(
            "shop",
            "web-rs",
            &pod.spec().uid,
            "node-1",
            &[("web", pod.container_id())],
        ),
    );

    let port = free_port();
    let socket = node.socket();
    let cli = Cli::try_parse_from([
        "ragent".as_ref(),
        "--containerd".as_ref(),
        socket.as_os_str(),
        "agent".as_ref(),
        "--no-ebpf".as_ref(),
        "--metrics-addr".as_ref(),
        format!("127.0.0.1:{port}").as_ref(),
        "--sample-interval".as_ref(),
        "1".as_ref(),
        "--checkpoint-dir".as_ref(),
        node.dir().join(format!("rightsizing-{port}")).as_os_str(),
    ])
    .expect("flags");
    let file: ragent::config::FileConfig =
        toml::from_str("[kubernetes]\nenabled = true\nnode_name = \"node-1\"\n").expect("config");
    let Command::Agent(args) = &cli.command else {
        panic!("agent")
    };
    let cfg = ragent::config::agent(&cli, args, &file).expect("valid config");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(ragent::agent::run_with(cfg, Some(api.client()), async {
        let _ = stop_rx.await;
    }));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let report = || -> Option<serde_json::Value> {
        let (status, body) = ragent_testkit::http::get(addr, "/api/v1/recommendations").ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    };
    let entry = wait_for_async(
        "a recommendation for shop/web-rs/web with its pod spec",
        Duration::from_secs(60),
        || async {
            let r = report()?;
            let e = r["containers"]
                .as_array()?
                .iter()
                .find(|c| c["namespace"] == "shop" && c["pod"] == "web-rs")?
                .clone();
            (e["samples"].as_u64()? >= 2 && e["current"]["source"] == "pod_spec").then_some((r, e))
        },
    )
    .await;
    let (r, e) = entry;
    eprintln!("{e:#}\n{:#}", r["node_shape"]);
    assert_eq!(e["container"], "web");
    assert_eq!(e["workload"], "Deployment/web");
    // kubeapi::pod asks for 100m and 128Mi and sets no limits.
    assert_eq!(e["current"]["cpu_request_cores"], 0.1);
    assert_eq!(e["current"]["memory_request_bytes"], 128 << 20);
    assert!(e["current"]["cpu_limit_cores"].is_null());
    assert!(e["current"]["memory_limit_bytes"].is_null());
    let target = e["cpu_target_cores"].as_f64().expect("target");
    let diff = e["cpu_diff_cores"].as_f64().expect("diff");
    assert!(
        (diff - (target - 0.1)).abs() < 1e-9,
        "{diff} vs {target} - 0.1"
    );
    let mem_target = e["memory_target_bytes"].as_i64().expect("memory target");
    assert_eq!(
        e["memory_diff_bytes"].as_i64(),
        Some(mem_target - (128 << 20))
    );

    let shape = &r["node_shape"];
    assert_eq!(shape["capacity"]["source"], "node");
    assert_eq!(shape["capacity"]["cpu_cores"], 4.0);
    assert_eq!(shape["capacity"]["memory_bytes"], 16_252_928u64 * 1024);
    assert_eq!(shape["current"]["name"], "general-4x16");
    let rec = &shape["recommended"];
    let price = rec["hourly_price"].as_f64().expect("price");
    let saving = shape["saving_percent"].as_f64().expect("saving");
    assert!(
        ((0.18 - price) / 0.18 * 100.0 - saving).abs() < 1e-9,
        "{shape}"
    );
    assert!(rec["vcpu"].as_f64() >= shape["needed_cpu_cores"].as_f64());
    assert!(rec["memory_bytes"].as_u64() >= shape["needed_memory_bytes"].as_u64());

    let (_, metrics) = ragent_testkit::http::get(addr, "/metrics").expect("metrics");
    let series = "ragent_recommendation_cpu_cores{bound=\"target\",container=\"web\",namespace=\"shop\",pod=\"web-rs\",workload=\"Deployment/web\"}";
    assert_eq!(metric_value(&metrics, series), Some(target), "{metrics}");
    assert_eq!(
        metric_value(&metrics, "ragent_recommendation_node_saving_ratio"),
        Some(saving / 100.0)
    );

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent stops within 30 s")
        .expect("no panic")
        .expect("the agent ends cleanly");
    assert!(
        node.dir()
            .join(format!("rightsizing-{port}"))
            .join("recommender.ckpt")
            .exists(),
        "the agent checkpoints at shutdown"
    );
    pod.remove().await.expect("remove the pod");
}

/// An EndpointSlice of the agents' headless Service, as the EndpointSlice controller writes it.
fn peer_slice(name: &str, endpoints: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": kubeapi::AGENT_NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": "ragent-peers",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "ragent-peers", "uid": "5b1e", "controller": true}]
        },
        "addressType": "IPv4",
        "ports": [{"name": "peer", "port": 9465, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn endpoint(ip: &str, node: &str, zone: &str, ready: bool, terminating: bool) -> serde_json::Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
        "nodeName": node,
        "zone": zone,
        "targetRef": {"kind": "Pod", "namespace": kubeapi::AGENT_NAMESPACE, "name": format!("ragent-{node}")}
    })
}

/// Layer sharing's membership follows the EndpointSlices of the headless Service: ready
/// endpoints only, one peer per node, a slice of another Service ignored, deletes and a
/// relist after the watch ends applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_peers_follow_the_endpoint_slices() {
    use kubeapi::ENDPOINTSLICES;
    let api = FakeApi::new();
    api.put(
        ENDPOINTSLICES,
        peer_slice(
            "ragent-peers-abcde",
            json!([
                endpoint("10.0.1.11", "node-a", "zone-1", true, false),
                endpoint("10.0.1.12", "node-b", "zone-1", false, false),
            ]),
        ),
    );
    let mut other = peer_slice(
        "web-xyz",
        json!([endpoint("10.0.9.9", "node-z", "zone-9", true, false)]),
    );
    other["metadata"]["labels"]["kubernetes.io/service-name"] = json!("web");
    api.put(ENDPOINTSLICES, other);
    let metrics = ragent::metrics::Metrics::new(prometheus::Registry::new())
        .expect("metrics")
        .kube()
        .expect("kube metrics");
    let (tx, mut rx) = tokio::sync::watch::channel(Vec::new());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(ragent::kubernetes::keep_peers(
        api.client(),
        kubeapi::AGENT_NAMESPACE.into(),
        "ragent-peers".into(),
        9465,
        tx,
        metrics,
        stop_rx,
    ));
    let view = |p: &[ragent::core::sharing::Peer]| -> Vec<(String, String, bool, Option<String>)> {
        p.iter()
            .map(|p| (p.id.clone(), p.addr.clone(), p.ready, p.zone.clone()))
            .collect()
    };
    let mut next = async |want: Vec<(&str, &str, bool)>| {
        let want: Vec<(String, String, bool, Option<String>)> = want
            .into_iter()
            .map(|(id, addr, ready)| (id.into(), addr.into(), ready, Some("zone-1".into())))
            .collect();
        let waited =
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| view(p) == want))
                .await
                .map(|r| r.is_ok());
        assert_eq!(
            waited,
            Ok(true),
            "peers never became {want:?}; last {:?}",
            view(&rx.borrow())
        );
    };
    next(vec![
        ("node-a", "10.0.1.11:9465", true),
        ("node-b", "10.0.1.12:9465", false),
    ])
    .await;
    // The fake API sends changes only to live watches (a real one replays them from the
    // resourceVersion): change nothing until the agent watches.
    let t0 = std::time::Instant::now();
    while api.watching(ENDPOINTSLICES) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the agent never watched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second slice (the controller splits large Services) adds a node; node-b turns ready.
    api.put(
        ENDPOINTSLICES,
        peer_slice(
            "ragent-peers-fghij",
            json!([endpoint("10.0.1.13", "node-c", "zone-1", true, false)]),
        ),
    );
    api.put(
        ENDPOINTSLICES,
        peer_slice(
            "ragent-peers-abcde",
            json!([
                endpoint("10.0.1.11", "node-a", "zone-1", true, true),
                endpoint("10.0.1.12", "node-b", "zone-1", true, false),
            ]),
        ),
    );
    next(vec![
        ("node-a", "10.0.1.11:9465", false),
        ("node-b", "10.0.1.12:9465", true),
        ("node-c", "10.0.1.13:9465", true),
    ])
    .await;
    // A slice deleted unseen (its event lost) is gone after the relist a 410 forces.
    api.delete_quietly(
        ENDPOINTSLICES,
        &format!("{}/ragent-peers-fghij", kubeapi::AGENT_NAMESPACE),
    );
    api.expire_watches(ENDPOINTSLICES);
    next(vec![
        ("node-a", "10.0.1.11:9465", false),
        ("node-b", "10.0.1.12:9465", true),
    ])
    .await;
    let asked: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path == ENDPOINTSLICES)
        .collect();
    assert!(
        asked.iter().all(|r| r
            .query
            .contains("labelSelector=kubernetes.io%2Fservice-name%3Dragent-peers")),
        "{asked:?}"
    );
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("keep_peers stops")
        .expect("no panic");
}
