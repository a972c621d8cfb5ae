//! Issue 4's accuracy tests: per-pod network bytes from eBPF, per-image pull traffic on the
//! wire, container CPU and memory from cgroups, and the degraded mode, each against ground
//! truth measured outside the agent (the payload endpoints' own counts, the registry's access
//! log, the container's cgroup files).
//!
//! Pods are made through CRI the way kubelet makes them (`ragent_testkit::pod`), so the agent
//! finds `io.kubernetes.*` labels on containerd's container records. containerd runs in a
//! cgroup of its own (`Node::containerd_cgroup`), so its registry traffic is not the test's.
use std::time::{Duration, Instant};

use ragent_testkit::{
    cgroups,
    node::Node,
    payload::{PayloadServer, TcpSink},
    pod::{CtrContainer, Pod, PodSpec},
    promtext::{self, Sample},
};

use crate::support::*;

const NS: &str = "ragent-e2e-insight";
const MIB: u64 = 1024 * 1024;
/// How long a payload endpoint lives at most (each test finishes well within it).
const ENDPOINT_LIFETIME: Duration = Duration::from_secs(300);
const POD_EXIT: Duration = Duration::from_secs(120);

/// Whether the eBPF accuracy tests can run here; says why not.
fn ebpf_host() -> bool {
    require(
        is_root(),
        "the eBPF accuracy tests need root (run `cargo xtask test` as root)",
    ) && require(
        ragent_testkit::node::cgroup2_mount().is_some(),
        "no cgroup2 mount on this host: the agent attaches its cgroup_skb programs there",
    ) && require(
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "the kernel exposes no BTF (/sys/kernel/btf/vmlinux)",
    )
}

/// The runnable fixture image (static busybox).
fn busybox_image(node: &Node) -> String {
    fixtures(node).reference("ragent/run", "v1")
}

fn scrape(agent: &Agent) -> Vec<Sample> {
    promtext::parse(&agent.metrics())
}

/// Every series of `name`, for failure messages.
fn listing(samples: &[Sample], name: &str) -> String {
    promtext::find(samples, name, &[])
        .iter()
        .map(|s| format!("  {} {}", s.series(), s.value))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How long a counter of finished work must stay unchanged to count as settled.
const SETTLE: Duration = Duration::from_secs(3);
/// How long a counter may take to appear and settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(45);

/// Waits (bounded) until `read` gives a value that `ok` accepts and that stays the same over
/// [`SETTLE`] of scrapes a second apart: counters of finished work must have stopped moving.
fn settle(
    agent: &Agent,
    what: &str,
    read: impl Fn(&[Sample]) -> Option<f64>,
    ok: impl Fn(f64) -> bool,
    listing_of: &str,
) -> f64 {
    let start = Instant::now();
    let mut stable: Option<(f64, Instant)> = None;
    loop {
        let now = read(&scrape(agent)).filter(|v| ok(*v));
        stable = match (stable, now) {
            (Some((v, since)), Some(n)) if v == n => {
                if since.elapsed() >= SETTLE {
                    return v;
                }
                Some((v, since))
            }
            (_, Some(n)) => Some((n, Instant::now())),
            (_, None) => None,
        };
        if start.elapsed() > SETTLE_DEADLINE {
            panic!(
                "{what} did not appear and stay unchanged for {SETTLE:?} within {SETTLE_DEADLINE:?} \
                 (last {:?}); the agent's {listing_of} series:\n{}\n/readyz: {:?}",
                read(&scrape(agent)),
                listing(&scrape(agent), listing_of),
                agent.get("/readyz").1
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The settled value of one series.
fn settled(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    settle(
        agent,
        &format!("{name}{labels:?}"),
        |s| promtext::value(s, name, labels),
        |_| true,
        name,
    )
}

/// The settled sum over every series of `name`, once it has grown beyond `before`.
fn settled_sum_above(agent: &Agent, name: &str, before: f64) -> f64 {
    settle(
        agent,
        &format!("the sum of {name} (above {before})"),
        |s| Some(promtext::sum(s, name, &[])),
        |v| v > before,
        name,
    )
}

/// Waits until the series exists; returns its value.
fn present(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    let start = Instant::now();
    loop {
        let samples = scrape(agent);
        if let Some(v) = promtext::value(&samples, name, labels) {
            return v;
        }
        if start.elapsed() > Duration::from_secs(30) {
            panic!(
                "{name}{labels:?} did not appear within 30 s; the agent's {name} series:\n{}\n/readyz: {:?}",
                listing(&samples, name),
                agent.get("/readyz").1
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn assert_within(what: &str, got: f64, low: f64, high: f64) {
    assert!(
        (low..=high).contains(&got),
        "{what}: {got} is outside [{low}, {high}] ({:.4} of the low bound)",
        got / low
    );
}

/// The agent with its defaults (eBPF on), before the workload it is to observe.
fn start_agent(node: &Node) -> Agent {
    Agent::start(node, free_port(), &["--namespace", "k8s.io"])
}

/// Checked after the workload and its ground truth, before the figures, so that a failure says
/// why the figures are missing.
fn assert_ebpf_net(agent: &Agent) {
    assert_eq!(
        promtext::value(
            &scrape(agent),
            "ragent_ebpf_feature_available",
            &[("feature", "net")]
        ),
        Some(1.0),
        "the agent's eBPF network counters are not available; /readyz: {:?}; log:\n{}",
        agent.get("/readyz").1,
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runs_in_a_cgroup2_directory_of_its_own() {
    if !require(is_root(), "needs root (the node runs containerd)")
        || !require(
            ragent_testkit::node::cgroup2_mount().is_some(),
            "no cgroup2 mount on this host",
        )
    {
        return;
    }
    let node = node();
    let cg = node.containerd_cgroup().expect("a cgroup2 mount");
    let pid = node.containerd_pid().expect("containerd runs");
    let mount = ragent_testkit::node::cgroup2_mount().expect("cgroup2");
    let rel = format!(
        "/{}",
        cg.strip_prefix(&mount).expect("below the mount").display()
    );
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(
        own.lines().any(|l| l == format!("0::{rel}")),
        "containerd (pid {pid}) is not in {rel}:\n{own}"
    );
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).expect("cgroup.procs");
    assert!(
        procs.split_whitespace().any(|p| p == pid.to_string()),
        "{} lists {procs:?}",
        cg.display()
    );
    // The test process is elsewhere, so the registry traffic of containerd's pulls is not ours.
    let me = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
    assert!(!me.lines().any(|l| l == format!("0::{rel}")), "{me}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_labels_reach_containerd_container_records() {
    let node = node();
    let pod = Pod::start(
        &node,
        PodSpec::new(NS, "insight-labels", &busybox_image(&node))
            .container("main")
            .shell("echo started; exec /bin/busybox sleep 600"),
    )
    .await
    .expect("a pod");
    pod.wait_running(Duration::from_secs(30))
        .await
        .expect("running");
    for (what, id) in [
        ("sandbox", pod.sandbox_id().to_string()),
        ("container", pod.container_id().to_string()),
    ] {
        let out = node
            .ctr("k8s.io")
            .args(["containers", "info", &id])
            .output()
            .expect("ctr containers info");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let labels = &info["Labels"];
        eprintln!("{what} {id} record labels: {labels}");
        let spec = pod.spec();
        assert_eq!(
            labels["io.kubernetes.pod.name"],
            spec.name.as_str(),
            "{what}"
        );
        assert_eq!(labels["io.kubernetes.pod.namespace"], NS, "{what}");
        assert_eq!(labels["io.kubernetes.pod.uid"], spec.uid.as_str(), "{what}");
        let kind = if what == "sandbox" {
            "sandbox"
        } else {
            "container"
        };
        assert_eq!(labels["io.cri-containerd.kind"], kind, "{what}");
        if what == "container" {
            assert_eq!(labels["io.kubernetes.container.name"], "main");
        } else {
            assert!(labels.get("io.kubernetes.container.name").is_none());
        }
    }
    assert!(pod.log().contains("started"), "{}", pod.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_bytes_match_a_download_and_an_upload() {
    if !ebpf_host() {
        return;
    }
    const PAYLOAD: u64 = 20 * MIB;
    let node = node();
    let image = busybox_image(&node);
    let agent = start_agent(&node);
    let server = PayloadServer::start(PAYLOAD, ENDPOINT_LIFETIME).expect("payload server");
    let sink = TcpSink::start(ENDPOINT_LIFETIME).expect("sink");
    let (dl, ul) = ("insight-download", "insight-upload");
    let download = Pod::start(
        &node,
        PodSpec::new(NS, dl, &image)
            .container("fetch")
            .shell(&format!(
                "/bin/busybox wget -q -O /dev/null {}",
                server.url()
            )),
    )
    .await
    .expect("the download pod");
    let upload = Pod::start(
        &node,
        PodSpec::new(NS, ul, &image)
            .container("send")
            .shell(&format!(
                "/bin/busybox head -c {PAYLOAD} /dev/zero | /bin/busybox nc {} {}",
                sink.addr().ip(),
                sink.addr().port()
            )),
    )
    .await
    .expect("the upload pod");
    for pod in [&download, &upload] {
        let exit = pod
            .wait_exited(POD_EXIT)
            .await
            .expect("the pod's container exits");
        assert_eq!(exit.code, 0, "{}: {}", pod.spec().name, pod.log());
    }
    // Ground truth: the payload crossed once each way.
    assert_eq!((server.completed(), server.body_bytes_sent()), (1, PAYLOAD));
    assert!(sink.wait_completed(1, Duration::from_secs(10)));
    assert_eq!(sink.received(), PAYLOAD);
    eprintln!(
        "ground truth: the server sent {} body bytes, the sink received {}",
        server.body_bytes_sent(),
        sink.received()
    );

    // Scraped after the containers exited: the agent still reports them.
    assert_ebpf_net(&agent);
    let bytes = "ragent_pod_network_bytes_total";
    let series = |pod: &'static str, dir: &'static str| {
        [("namespace", NS), ("pod", pod), ("direction", dir)]
    };
    let p = PAYLOAD as f64;
    let dl_in = settled(&agent, bytes, &series(dl, "ingress"));
    eprintln!(
        "download pod ingress: {dl_in} bytes ({:.4} x payload)",
        dl_in / p
    );
    assert_within("download pod ingress bytes", dl_in, p, 1.05 * p);
    let ul_out = settled(&agent, bytes, &series(ul, "egress"));
    eprintln!(
        "upload pod egress: {ul_out} bytes ({:.4} x payload)",
        ul_out / p
    );
    assert_within("upload pod egress bytes", ul_out, p, 1.05 * p);
    // Each payload went to its own pod, in its own direction, and nowhere else.
    let samples = scrape(&agent);
    for (pod, dir) in [(dl, "egress"), (ul, "ingress")] {
        let v = promtext::value(&samples, bytes, &series(pod, dir)).unwrap_or(0.0);
        assert!(
            v < 0.05 * p,
            "{pod} {dir}: {v} bytes, but only acknowledgements and a request went that way"
        );
    }
    for s in promtext::find(&samples, bytes, &[]) {
        if s.labels.get("pod").is_some_and(|p| p == dl || p == ul) {
            assert_eq!(s.labels["namespace"], NS, "{}", s.series());
        }
    }
    // Packets: a loopback segment carries at most 64 KiB.
    let packets = promtext::value(
        &samples,
        "ragent_pod_network_packets_total",
        &series(dl, "ingress"),
    )
    .expect("packets of the download pod");
    assert!(packets >= p / 65536.0, "{packets} packets for {p} bytes");
    eprintln!(
        "download: ingress {dl_in} bytes ({:.4} x payload), {packets} packets; upload: egress {ul_out} bytes ({:.4} x payload)",
        dl_in / p,
        ul_out / p
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_lives_a_fraction_of_a_second_is_counted() {
    if !ebpf_host() {
        return;
    }
    const PAYLOAD: u64 = MIB;
    let node = node();
    let agent = start_agent(&node);
    let sink = TcpSink::start(ENDPOINT_LIFETIME).expect("sink");
    let name = "insight-brief";
    let pod = Pod::start(
        &node,
        PodSpec::new(NS, name, &busybox_image(&node))
            .container("burst")
            .shell(&format!(
                "/bin/busybox head -c {PAYLOAD} /dev/zero | /bin/busybox nc {} {}",
                sink.addr().ip(),
                sink.addr().port()
            )),
    )
    .await
    .expect("the pod");
    let exit = pod.wait_exited(POD_EXIT).await.expect("exits");
    assert_eq!(exit.code, 0, "{}", pod.log());
    assert!(sink.wait_completed(1, Duration::from_secs(10)));
    assert_eq!(sink.received(), PAYLOAD);
    eprintln!(
        "the container ran for {:?} (containerd's start and finish times)",
        exit.ran_for()
    );
    assert_ebpf_net(&agent);
    let p = PAYLOAD as f64;
    let out = settled(
        &agent,
        "ragent_pod_network_bytes_total",
        &[("namespace", NS), ("pod", name), ("direction", "egress")],
    );
    assert_within("the brief container's pod egress bytes", out, p, 1.05 * p);
}

/// Everything the registry served for pulls since `mark`: manifests and blobs.
fn served_pull_bytes_since(node: &Node, mark: usize) -> (u64, usize) {
    ragent_testkit::accesslog::served_pull_bytes(
        &std::fs::read_to_string(node.dir().join("registry.log")).expect("registry log"),
        mark,
    )
}

/// Removes every image and waits for GC, then checks that none of `images`' blobs is left.
async fn empty_store(node: &Node, images: &[(&str, &str)]) {
    remove_all_images(node);
    let set = fixtures(node);
    let all: u64 = blobs_of(&set, images).iter().map(|(_, s)| s).sum();
    assert_eq!(
        missing_bytes(node, &set, images).await,
        all,
        "the store still holds blobs of {images:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_bytes_of_an_image_match_the_registry_access_log() {
    if !ebpf_host() {
        return;
    }
    let node = node();
    let set = fixtures(&node);
    let image = ("ragent/app-py-web", "v1");
    empty_store(&node, &[image]).await;
    let agent = start_agent(&node);
    let reference = set.reference(image.0, image.1);
    let mark = registry_log_mark(&node);
    cri_pull(&node, &reference).await;
    let (served, gets) = served_pull_bytes_since(&node, mark);
    eprintln!("{reference}: the registry served {served} bytes in {gets} GETs");
    // The image's blobs, plus its manifest.
    let blobs: u64 = blobs_of(&set, &[image]).iter().map(|(_, s)| s).sum();
    assert!(
        (blobs..blobs + 64 * 1024).contains(&served),
        "served {served} bytes for {blobs} bytes of blobs"
    );
    assert_ebpf_net(&agent);
    let registry = node.registry();
    let got = settled(
        &agent,
        "ragent_image_pull_bytes_total",
        &[
            ("image", reference.as_str()),
            ("registry", registry.as_str()),
        ],
    );
    let s = served as f64;
    eprintln!("the agent counted {got} ({:.4} of the access log)", got / s);
    assert_within(
        "the image's pull bytes against the access log",
        got,
        0.95 * s,
        1.05 * s,
    );
}

/// The agent in a private cgroup namespace, as in a pod on a cgroup v2 node (with the host's
/// cgroup2 tree mounted): `/proc/<pid>/cgroup` of containerd reads `/../..`-relative there, and
/// the agent must still find containerd's cgroup and split out its registry traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_a_cgroup_namespace_still_measures_containerds_pulls() {
    if !ebpf_host() {
        return;
    }
    let node = node();
    let set = fixtures(&node);
    let image = ("ragent/app-py-worker", "v1");
    empty_store(&node, &[image]).await;
    let root = ragent_testkit::node::cgroup2_mount().expect("cgroup2");
    let cg = root.join(format!("ragent-cgns-test-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("a cgroup for the agent");
    let port = free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let log = node.dir().join(format!("agent-cgns-{port}.log"));
    let f = std::fs::File::create(&log).expect("agent log");
    // Into its own cgroup first, then a new cgroup namespace rooted there, then the agent.
    let child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {procs} && exec unshare --cgroup -- {bin} agent --metrics-addr {addr} --containerd {sock} --namespace k8s.io --checkpoint-dir {ck}",
            procs = cg.join("cgroup.procs").display(),
            bin = ragent_bin().display(),
            sock = node.socket().display(),
            ck = node.dir().join(format!("rightsizing-{port}")).display(),
        ))
        .stdin(std::process::Stdio::null())
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .expect("starting the agent in a cgroup namespace");
    let agent = Agent { child, addr, log };
    agent.wait_ready(Duration::from_secs(30));
    // It is in a namespace of its own, which shows its cgroup as the root.
    let pid = agent.child.id();
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/cgroup")).ok();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "a private cgroup namespace"
    );
    let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroup");
    assert!(
        seen.contains(&format!("ragent-cgns-test-{}", std::process::id())),
        "{seen}"
    );

    let reference = set.reference(image.0, image.1);
    let mark = registry_log_mark(&node);
    cri_pull(&node, &reference).await;
    let (served, _) = served_pull_bytes_since(&node, mark);
    assert_ebpf_net(&agent);
    let got = settled(
        &agent,
        "ragent_image_pull_bytes_total",
        &[
            ("image", reference.as_str()),
            ("registry", node.registry().as_str()),
        ],
    );
    let s = served as f64;
    eprintln!(
        "from a cgroup namespace the agent counted {got} ({:.4} of the access log)",
        got / s
    );
    let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(text.contains("cgroup namespace rooted here"), "{text}");
    assert!(!text.contains("cannot find containerd's cgroup"), "{text}");
    assert_within(
        "the image's pull bytes against the access log",
        got,
        0.95 * s,
        1.05 * s,
    );
    drop(agent);
    // The agent's cgroup is empty once it is gone.
    let t0 = Instant::now();
    while std::fs::remove_dir(&cg).is_err() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_pulls_sharing_layers_add_up_to_the_access_log() {
    if !ebpf_host() {
        return;
    }
    let node = node();
    let set = fixtures(&node);
    let images = [("ragent/app-jvm-api", "v1"), ("ragent/app-jvm-batch", "v1")];
    empty_store(&node, &images).await;
    let agent = start_agent(&node);
    let metric = "ragent_image_pull_bytes_total";
    let mark = registry_log_mark(&node);
    let before = promtext::sum(&scrape(&agent), metric, &[]);
    let (a, b) = (
        set.reference(images[0].0, images[0].1),
        set.reference(images[1].0, images[1].1),
    );
    tokio::join!(cri_pull(&node, &a), cri_pull(&node, &b));
    let (served, gets) = served_pull_bytes_since(&node, mark);
    eprintln!("{a} and {b} at once: the registry served {served} bytes in {gets} GETs");
    // Every distinct blob once (shared layers are not fetched twice), plus the manifests.
    let distinct: u64 = blobs_of(&set, &images).iter().map(|(_, s)| s).sum();
    assert!(
        (distinct..distinct + 64 * 1024).contains(&served),
        "served {served} bytes for {distinct} bytes of distinct blobs"
    );
    assert_ebpf_net(&agent);
    let after = settled_sum_above(&agent, metric, before);
    let counted = after - before;
    let s = served as f64;
    eprintln!(
        "the agent counted {counted} ({:.4} of the access log):\n{}",
        counted / s,
        listing(&scrape(&agent), metric)
    );
    assert_within(
        "attributed plus unattributed pull bytes against the access log",
        counted,
        0.98 * s,
        1.02 * s,
    );
}

/// A running pod whose container holds `held` bytes of anonymous memory (`dd` reads one block
/// into a fresh buffer, then blocks writing to a pipe `sleep` never reads), followed by `more`
/// in the same shell. Returns the pod, its pid and the working set its cgroup files show once
/// they hold the buffer.
async fn holding_pod(
    node: &Node,
    name: &str,
    container: &str,
    held: u64,
    more: &str,
) -> (Pod, u32, u64) {
    let pod = Pod::start(
        node,
        PodSpec::new(NS, name, &busybox_image(node))
            .container(container)
            .shell(&format!(
                "/bin/busybox dd if=/dev/zero bs={held} count=1 2>/dev/null | /bin/busybox sleep 3600{more}"
            )),
    )
    .await
    .expect("the pod");
    pod.wait_running(Duration::from_secs(30))
        .await
        .expect("running");
    let pid = pod.pid().await.expect("pid");
    assert!(pid > 0);
    let ws = wait_for(
        "the container's cgroup to hold the buffer",
        Duration::from_secs(30),
        || cgroups::working_set_bytes(pid).filter(|w| *w >= held),
    );
    (pod, pid, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_cpu_and_memory_come_from_its_cgroup() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    // 64 MiB held by `dd`'s own buffer: dd reads one 64 MiB block from /dev/zero into a
    // malloc'd (mmap'd, so freshly faulted) buffer, then blocks writing it into a pipe that
    // `sleep` never reads. Those are anonymous pages of a process in the container, charged
    // to its memory cgroup and resident (no swap here), unlike tmpfs or page cache, which are
    // charged to whoever touches them first and may sit on the inactive list. The shell's
    // busy loop meanwhile keeps one CPU busy.
    const HELD: u64 = 64 * MIB;
    let node = node();
    let agent = Agent::start(&node, free_port(), &["--namespace", "k8s.io"]);
    let name = "insight-burn";
    // Ground truth first: the cgroup holds the buffer (else the workload, not the agent, broke).
    let (_pod, pid, ours) = holding_pod(&node, name, "burn", HELD, " & while :; do :; done").await;
    eprintln!("the container's cgroup files: working set {ours} bytes");
    let labels = [("namespace", NS), ("pod", name), ("container", "burn")];
    let ws = present(&agent, "ragent_container_memory_working_set_bytes", &labels);
    let ours_now = cgroups::working_set_bytes(pid).expect("working set");
    eprintln!(
        "working set: agent {ws}, cgroup files {ours}..{ours_now}, held {HELD} (+{:.1} MiB)",
        (ws - HELD as f64) / MIB as f64
    );
    // At least the held buffer; at most 16 MiB more: busybox's text and the three processes'
    // stacks, heap and page tables, the pipe's buffer and other kernel memory the cgroup is
    // charged for (a few MiB measured here).
    assert_within(
        "working set against the held memory",
        ws,
        HELD as f64,
        (HELD + 16 * MIB) as f64,
    );
    // And it is this container's cgroup the agent read.
    let (lo, hi) = (ours.min(ours_now) as f64, ours.max(ours_now) as f64);
    assert_within(
        "working set against the cgroup files",
        ws,
        lo - 2.0 * MIB as f64,
        hi + 2.0 * MIB as f64,
    );

    // CPU: the agent's counter over a window, against the wall clock and the cgroup's own.
    let cpu = "ragent_container_cpu_seconds_total";
    present(&agent, cpu, &labels);
    let sample = || {
        let t0 = Instant::now();
        let v = promtext::value(&scrape(&agent), cpu, &labels).expect("cpu series");
        let truth = cgroups::cpu_seconds(pid).expect("cgroup cpu");
        (t0 + (Instant::now() - t0) / 2, v, truth)
    };
    let (t1, a1, c1) = sample();
    std::thread::sleep(Duration::from_secs(10));
    let (t2, a2, c2) = sample();
    let wall = (t2 - t1).as_secs_f64();
    let (agent_rate, truth_rate) = ((a2 - a1) / wall, (c2 - c1) / wall);
    eprintln!(
        "cpu: agent {:.3} s over {wall:.3} s of wall clock ({agent_rate:.3}/s), cgroup files {truth_rate:.3}/s",
        a2 - a1
    );
    // One busy thread runs at most 1 s per second (a bound that catches wrong units); it gets
    // less when the 2-core machine is busy with other work, which the cgroup's own count shows.
    assert!(
        truth_rate > 0.3,
        "the busy loop got only {truth_rate:.3} CPU s/s: the machine is too busy for this test"
    );
    assert_within(
        "cpu seconds per second against the cgroup's own count",
        agent_rate,
        truth_rate * 0.9 - 0.02,
        (truth_rate * 1.1 + 0.02).min(1.05),
    );
    let rq = present(
        &agent,
        "ragent_container_cpu_runqueue_seconds_total",
        &labels,
    );
    assert!(rq >= 0.0, "runqueue seconds {rq}");
    // No OOM kill happened: the counter is absent or 0.
    let oom = promtext::value(&scrape(&agent), "ragent_container_oom_kills_total", &labels);
    assert!(oom.unwrap_or(0.0) == 0.0, "OOM kills {oom:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_without_kubernetes_labels_is_reported_under_its_id() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    const HELD: u64 = 16 * MIB;
    let node = node();
    let image = busybox_image(&node);
    node.ctr_pull("k8s.io", &image)
        .expect("pull the busybox image");
    let agent = start_agent(&node);
    let id = "insight-ctr-run";
    let c = CtrContainer::start(
        &node,
        id,
        &image,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            &format!(
                "/bin/busybox dd if=/dev/zero bs={HELD} count=1 2>/dev/null | /bin/busybox sleep 3600"
            ),
        ],
    )
    .expect("ctr run");
    let pid = wait_for("the task's pid", Duration::from_secs(30), || c.pid());
    wait_for(
        "the container's cgroup to hold the buffer",
        Duration::from_secs(30),
        || cgroups::working_set_bytes(pid).filter(|w| *w >= HELD),
    );
    let labels = [("namespace", ""), ("pod", id), ("container", id)];
    let ws = present(&agent, "ragent_container_memory_working_set_bytes", &labels);
    assert!(
        ws >= HELD as f64,
        "working set {ws} < the {HELD} bytes held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_degrades_without_cgroup2_and_tracefs_and_keeps_cgroupfs_metrics() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    let node = node();
    // A running pod whose cgroup holds a known buffer (see the CPU and memory test).
    const HELD: u64 = 16 * MIB;
    let name = "insight-degraded";
    let (_pod, _pid, _) = holding_pod(&node, name, "hold", HELD, "").await;

    let dir = node.dir().join("insight-degraded");
    let not_cgroup = dir.join("not-cgroup2");
    std::fs::create_dir_all(&not_cgroup).expect("dir");
    // A regular file: no filesystem can be mounted on it, so it cannot become a tracefs.
    let not_tracefs = dir.join("not-tracefs");
    std::fs::write(&not_tracefs, b"not a tracefs\n").expect("file");
    let mut agent = Agent::start(
        &node,
        free_port(),
        &[
            "--namespace",
            "k8s.io",
            "--cgroup-root",
            &not_cgroup.display().to_string(),
            "--tracefs",
            &not_tracefs.display().to_string(),
        ],
    );
    let (status, body) = agent.get("/readyz");
    eprintln!("/readyz:\n{body}");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready"), "{body}");
    let degraded: Vec<(String, String)> = body
        .lines()
        .filter_map(|l| l.strip_prefix("degraded: "))
        .filter_map(|l| l.split_once(": "))
        .map(|(f, why)| (f.to_string(), why.to_string()))
        .collect();
    assert!(
        degraded.iter().any(|(f, why)| f == "net" && why.len() > 10),
        "/readyz does not say why the network counters are missing:\n{body}"
    );
    let samples = scrape(&agent);
    let feature =
        |f: &str| promtext::value(&samples, "ragent_ebpf_feature_available", &[("feature", f)]);
    assert_eq!(feature("net"), Some(0.0));
    // Every feature is exported, and /readyz lists exactly the missing ones.
    for f in [
        "net",
        "endpoints",
        "connect",
        "sched",
        "oom",
        "cgroup_paths",
    ] {
        let v = feature(f)
            .unwrap_or_else(|| panic!("no ragent_ebpf_feature_available{{feature={f:?}}}"));
        let listed = degraded.iter().any(|(d, _)| d == f);
        assert_eq!(
            v == 0.0,
            listed,
            "feature {f} is {v} but /readyz {} it:\n{body}",
            if listed { "lists" } else { "does not list" }
        );
    }
    // The capabilities are exported as 0 or 1. Whether they describe the host or the paths
    // the agent was given is not part of the contract, so their values are only printed.
    for c in ["btf", "bpffs", "tracefs", "cgroup2"] {
        let v = promtext::value(&samples, "ragent_kernel_capability", &[("capability", c)])
            .unwrap_or_else(|| panic!("no ragent_kernel_capability{{capability={c:?}}}"));
        assert!(v == 0.0 || v == 1.0, "capability {c} is {v}");
        eprintln!("ragent_kernel_capability{{capability={c:?}}} {v}");
    }
    assert!(not_tracefs.is_file(), "the agent left the file alone");

    // The cgroupfs metrics of the running pod are still served.
    let labels = [("namespace", NS), ("pod", name), ("container", "hold")];
    let ws = present(&agent, "ragent_container_memory_working_set_bytes", &labels);
    assert!(
        ws >= HELD as f64,
        "working set {ws} < the {HELD} bytes held"
    );
    assert!(
        agent.child.try_wait().expect("agent").is_none(),
        "the agent is still running"
    );
}
