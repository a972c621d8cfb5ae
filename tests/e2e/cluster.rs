//! The multi-node test bed of issue 8 (`ragent_testkit::cluster`) without ragent: nodes in
//! their own network namespaces, each with its own containerd, pulling from a registry behind
//! a rate-limited link. The baseline the layer-sharing tests and `cargo xtask bench cluster`
//! compare against: every node fetches every blob itself.
use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use ragent_testkit::cluster::{Cluster, ClusterConfig};

use crate::support;

/// The sample set: the four apps on `run:v1` (they share the run-image, launcher and
/// buildpack layers).
const APPS: [(&str, &str); 4] = [
    ("ragent/app-py-web", "v1"),
    ("ragent/app-py-worker", "v1"),
    ("ragent/app-jvm-api", "v1"),
    ("ragent/app-jvm-batch", "v1"),
];

/// Bound on one node's pulls of the whole set (the set is ~17.5 MB unique at scale 1: under
/// 2 s per node on the 200 Mbit/s link).
const PULL_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn three_nodes_without_ragent_each_fetch_every_blob_once_and_leave_nothing() {
    if !support::require(
        support::is_root(),
        "network namespaces, tmpfs and containerd need root",
    ) {
        return;
    }
    let node = support::node();
    let set = support::fixtures(&node);
    let config = ClusterConfig::new(ClusterConfig::slot_from_env(), 3);
    let cluster = Cluster::up(&config).expect("starting a 3-node cluster");
    cluster
        .push(&set, &APPS)
        .expect("pushing the sample apps to the cluster's registry");
    let refs: Vec<String> = APPS
        .iter()
        .map(|(r, t)| format!("{}/{r}:{t}", cluster.registry_host()))
        .collect();
    let unique = set.unique_blob_bytes(&APPS).expect("unique blob bytes");
    let unique_blobs: BTreeSet<String> = APPS
        .iter()
        .filter_map(|(r, t)| set.image(r, t))
        .flat_map(|i| {
            std::iter::once(i.config_digest.clone())
                .chain(i.layers.iter().map(|l| l.digest.clone()))
        })
        .collect();

    let mark = cluster.access_log_mark();
    let pulls = cluster.pull_all(&[1, 2, 3], &refs, PULL_TIMEOUT);
    for p in &pulls {
        eprintln!(
            "node {}: {:.2} s ({})",
            p.node,
            p.seconds,
            p.images
                .iter()
                .map(|(r, s)| format!("{} {s:.2} s", r.rsplit('/').next().unwrap_or(r)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(p.ok, "node {} failed to pull: {}", p.node, p.error);
        assert_eq!(p.images.len(), refs.len());
    }
    // The registry logs a GET right after its body: give the last lines a moment.
    let served = support::wait_for(
        "the access log to show every blob GET",
        Duration::from_secs(10),
        || {
            let s = cluster.served_since(mark);
            (s.blob_bytes >= 3 * unique).then_some(s)
        },
    );
    eprintln!(
        "unique blobs {} ({unique} bytes); served {} blob bytes in {} GETs, {} manifest bytes in {} GETs",
        unique_blobs.len(),
        served.blob_bytes,
        served.blob_gets,
        served.manifest_bytes,
        served.manifest_gets
    );
    assert_eq!(
        served.blob_bytes,
        3 * unique,
        "without sharing each node fetches each distinct blob exactly once"
    );
    assert_eq!(served.blob_gets, 3 * unique_blobs.len());
    assert!(served.manifest_gets >= 3 * APPS.len());
    // The GETs came from the nodes' own addresses, each node's share the same.
    let log = cluster.access_log_text();
    for i in 1..=3 {
        let from = format!("{} ", cluster.node_ip(i));
        let own: String = log
            .lines()
            .skip(mark)
            .filter(|l| l.starts_with(&from))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            ragent_testkit::cluster::Served::from_log(&own, 0).blob_bytes,
            unique,
            "node {i} fetched the unique bytes once"
        );
    }
    // Every node's containerd holds the four images.
    for i in 1..=3 {
        let out = cluster
            .ctr(i)
            .args(["images", "ls", "-q"])
            .output()
            .expect("ctr images ls");
        let listed = String::from_utf8_lossy(&out.stdout);
        for r in &refs {
            assert!(
                listed.lines().any(|l| l == r),
                "node {i} lacks {r}: {listed}"
            );
        }
    }

    // Teardown leaves no namespace, link, mount, process or directory of the slot behind.
    let dir = cluster.dir().to_path_buf();
    let namespaces: Vec<String> = (1..=3)
        .map(|i| cluster.netns(i))
        .chain([cluster.registry_netns()])
        .collect();
    let sockets: Vec<String> = (1..=3)
        .map(|i| cluster.socket(i).display().to_string())
        .collect();
    let done = cluster.down();
    eprintln!("teardown: {}", done.join("; "));
    for ns in &namespaces {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "netns {ns} is left"
        );
    }
    let prefix = format!("rgc{}-", config.slot);
    let links = Command::new("ip")
        .args(["-br", "link"])
        .output()
        .expect("ip link");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&prefix),
        "a link of the cluster is left"
    );
    assert!(!dir.exists(), "{} is left", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&format!(" {} ", dir.display()))
            && !mounts.contains(&format!("{}/", dir.display())),
        "a mount below {} is left",
        dir.display()
    );
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cl = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cl = String::from_utf8_lossy(&cl);
        for s in &sockets {
            assert!(
                !cl.contains(s.as_str()),
                "a process of the cluster is left: {cl}"
            );
        }
    }
}

#[test]
fn an_agent_spawned_in_a_node_is_reached_at_the_node_address_and_stopped_by_teardown() {
    if !support::require(
        support::is_root(),
        "network namespaces, tmpfs and containerd need root",
    ) {
        return;
    }
    let config = ClusterConfig::new(ClusterConfig::slot_from_env(), 1);
    let cluster = Cluster::up(&config).expect("starting a 1-node cluster");
    let log_path = cluster.node_dir(1).join("ragent.log");
    let log = std::fs::File::create(&log_path).expect("agent log");
    let mut cmd = Command::new(support::ragent_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("RAGENT_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["agent", "--no-ebpf", "--metrics-addr", "0.0.0.0:9464"])
        .arg("--containerd")
        .arg(cluster.socket(1))
        .arg("--checkpoint-dir")
        .arg(cluster.node_dir(1).join("rightsizing"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let mut agent = cluster
        .spawn_in(1, &mut cmd)
        .expect("spawning ragent in n1");
    let pid = agent.id();
    // Reached from the root namespace over the cluster's network, at the node's address.
    support::wait_for(
        "the agent in n1 to answer /readyz",
        Duration::from_secs(60),
        || matches!(cluster.http_get(1, 9464, "/readyz"), Ok((200, _))).then_some(()),
    );
    let (status, metrics) = cluster.http_get(1, 9464, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("ragent_"), "{metrics}");
    let done = cluster.down();
    assert!(
        done.iter().any(|d| d.contains(&format!("pid {pid}"))),
        "teardown stopped the agent: {done:?}"
    );
    assert!(
        agent.try_wait().expect("waiting for the agent").is_some(),
        "the agent still runs after teardown"
    );
}
