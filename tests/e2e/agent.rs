//! `ragent agent` on the real node: metrics that follow containerd, a containerd restart,
//! eBPF counters, a clean SIGTERM. Prometheus scraping it: `dashboards.rs`.
use std::{process::Command, time::Duration};

use crate::support::*;

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    // promtool exits non-zero for lint problems too: show them and fail.
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn images_count(node: &ragent_testkit::node::Node) -> f64 {
    let out = ragent(node, &["images", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["summary"]["images"].as_f64().expect("images")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_follow_containerd_and_survive_a_restart() {
    let mut node = node();
    let set = fixtures(&node);
    cri_pull(&node, &set.reference("ragent/app-py-web", "v1")).await;
    let agent = Agent::start(&node, free_port(), &["--no-ebpf"]);

    let text = agent.metrics();
    promtool_check(&text);
    // Series per pod, container, image, registry or eBPF map exist once there is one (the
    // insight tests check them); the kube adapter's exist when it runs (it does not here; the
    // `kube::` test reads them); everything else is exported from the start.
    let per_entity = ["namespace", "image", "registry", "map", "run_image_digest"];
    let kube_only = |name: &str| {
        ragent::metrics::KUBE_ONLY
            .iter()
            .chain(ragent::metrics::SHARING_ONLY)
            .any(|k| k.name == name)
    };
    // The saving exists only when the machine matches a catalog shape.
    let maybe = ["ragent_recommendation_node_saving_ratio"];
    for d in ragent::metrics::CATALOGUE.iter().filter(|d| {
        (d.name == "ragent_image_size_bytes" || !d.labels.iter().any(|l| per_entity.contains(l)))
            && !kube_only(d.name)
            && !maybe.contains(&d.name)
    }) {
        assert!(
            text.contains(&format!("# TYPE {} ", d.name)),
            "{} missing from /metrics",
            d.name
        );
    }
    for k in ragent::metrics::KUBE_ONLY
        .iter()
        .chain(ragent::metrics::SHARING_ONLY)
    {
        assert!(
            !text.contains(&format!("# TYPE {} ", k.name)),
            "{} exported without the kube adapter or layer sharing",
            k.name
        );
    }
    assert_eq!(agent.value("ragent_containerd_up"), Some(1.0));
    assert_eq!(agent.value("ragent_images"), Some(images_count(&node)));
    let unique = agent
        .value("ragent_node_layer_bytes{scope=\"unique\"}")
        .expect("unique bytes");
    assert!(unique > 0.0);
    assert_eq!(agent.get("/healthz").0, 200);

    // A pull shows up through containerd's events.
    let before = agent.value("ragent_images").expect("images");
    node.ctr_pull("k8s.io", &set.reference("ragent/run-other-distro", "v1"))
        .expect("pull");
    wait_for(
        "ragent_images to grow after a pull",
        Duration::from_secs(20),
        || (agent.value("ragent_images")? > before).then_some(()),
    );
    let name = set.reference("ragent/run-other-distro", "v1");
    let series = format!("ragent_image_size_bytes{{image=\"{name}\"}}");
    let want = set
        .image("ragent/run-other-distro", "v1")
        .expect("fixture")
        .layers
        .iter()
        .map(|l| l.size)
        .sum::<u64>();
    assert_eq!(agent.value(&series), Some(want as f64));

    // Removing it removes its series (bounded labels).
    let out = node
        .ctr("k8s.io")
        .args(["images", "rm"])
        .arg(&name)
        .output()
        .expect("ctr");
    assert!(out.status.success());
    wait_for(
        "the removed image's series to go",
        Duration::from_secs(20),
        || agent.value(&series).is_none().then_some(()),
    );

    // containerd restarts: the agent notices, reconnects and carries on.
    node.restart_containerd().expect("restarting containerd");
    wait_for("a reconnect", Duration::from_secs(30), || {
        (agent.value("ragent_containerd_reconnects_total")? >= 1.0).then_some(())
    });
    agent.wait_ready(Duration::from_secs(30));
    assert_eq!(agent.value("ragent_containerd_up"), Some(1.0));
    let before = agent.value("ragent_images").expect("images");
    node.ctr_pull("k8s.io", &set.reference("ragent/run-other-stack", "v1"))
        .expect("pull after restart");
    wait_for("events after the restart", Duration::from_secs(20), || {
        (agent.value("ragent_images")? > before).then_some(())
    });

    let status = agent.terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "SIGTERM should stop the agent cleanly, got {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_not_ready_without_containerd_and_ready_once_it_comes() {
    let mut node = node();
    node.stop_containerd().expect("stop containerd");
    let port = free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let log = node.dir().join("agent-notready.log");
    let f = std::fs::File::create(&log).expect("log");
    let child = Command::new(ragent_bin())
        .args([
            "agent",
            "--no-ebpf",
            "--metrics-addr",
            &addr.to_string(),
            "--containerd",
        ])
        .arg(node.socket())
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .expect("agent");
    // Killed on drop, also when an assertion below fails.
    let _child = KillOnDrop(child);
    let (status, body) = wait_for("/readyz to answer", Duration::from_secs(20), || {
        ragent_testkit::http::get(addr, "/readyz").ok()
    });
    assert_eq!(status, 503);
    assert!(body.contains("containerd"), "{body}");
    assert_eq!(
        ragent_testkit::http::get(addr, "/healthz")
            .expect("healthz")
            .0,
        200
    );
    node.start_containerd().expect("start containerd");
    wait_for(
        "ready after containerd starts",
        Duration::from_secs(30),
        || {
            ragent_testkit::http::get(addr, "/readyz")
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ebpf_counts_the_bytes_of_a_pull() {
    // The whole end-to-end suite runs as root (it starts containerd); say so if not.
    assert!(
        is_root(),
        "the end-to-end tests need root (containerd, eBPF): run `cargo xtask test` as root"
    );
    let node = node();
    let set = fixtures(&node);
    // run:v2's release layer: make sure it is not in the store, so the pull must fetch it.
    let v2 = set.image("ragent/run", "v2").expect("run:v2");
    let layer = &v2.layers[1];
    let _ = node
        .ctr("k8s.io")
        .args(["images", "rm", "--sync"])
        .arg(set.reference("ragent/run", "v2"))
        .output();
    let _ = node
        .ctr("k8s.io")
        .args(["content", "rm", &layer.digest])
        .output();
    let agent = Agent::start(&node, free_port(), &[]);
    // Every feature works on this kernel: 2 cgroup_skb, 2 connect, 3 sched, 2 oom, 1 mkdir.
    assert_eq!(
        agent.value("ragent_ebpf_programs_loaded"),
        Some(10.0),
        "log: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    // What the pull must fetch: the layers not in the store now.
    let mut payload = 0.0;
    for l in &v2.layers {
        if content_size_opt(&node, &l.digest).await.is_none() {
            payload += l.size as f64;
        }
    }
    assert!(payload >= layer.size as f64);
    let ingress = "ragent_node_network_bytes_total{direction=\"ingress\"}";
    let before = agent.value(ingress).expect("ingress");
    cri_pull(&node, &set.reference("ragent/run", "v2")).await;
    // One read after the pull (polling would add its own traffic to the count).
    std::thread::sleep(Duration::from_millis(300));
    let delta = agent.value(ingress).expect("ingress") - before;
    // At least the layers' bytes crossed a socket into the node; at most that plus the manifest,
    // config, HTTP and the one /metrics response of the read above (~64 KiB).
    assert!(
        delta >= payload,
        "ingress grew by {delta}, less than the {payload}-byte layer pulled"
    );
    assert!(
        delta <= payload * 1.05 + 65_536.0,
        "ingress grew by {delta} for a {payload}-byte layer"
    );
    assert_eq!(
        agent.value("ragent_ebpf_map_overflow_bytes_total{map=\"CGROUP_NET\"}"),
        Some(0.0)
    );
    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success());
}
