//! Issue 7's end-to-end tests: right-sizing recommendations from real processes in real
//! cgroups, started through CRI, sampled by the agent every second (`--sample-interval 1`).
//!
//! The figures are checked against ground truth measured outside the agent (the container's
//! cgroup files, CRI's own view of an OOM kill, the image's JVM options) and against the maths
//! of docs/rightsizing.md, written out again below from the page with its default constants
//! (not calling the core's functions), so that the agent, the core and the page must agree.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ragent_testkit::{
    cgroups,
    node::Node,
    pod::{Pod, PodSpec},
    promtext,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::support::*;

const NS: &str = "ragent-e2e-rightsizing";
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
const API: &str = "/api/v1/recommendations";
/// A bound on every wait for the agent to see something (a few sampling intervals, with room
/// for a busy 2-core machine).
const SEEN: Duration = Duration::from_secs(30);

/// The documented maths (docs/rightsizing.md) with its default constants, from the page.
mod doc {
    use super::MIB;

    pub const CPU_FIRST_BUCKET: f64 = 0.01;
    pub const MEMORY_FIRST_BUCKET: f64 = MIB as f64;
    pub const RATIO: f64 = 1.05;
    pub const SAFETY_MARGIN: f64 = 0.15;
    pub const CPU_FLOOR: f64 = 0.01;
    pub const MEMORY_FLOOR: u64 = 20 * MIB;
    pub const UPPER_WIDENING_DAYS: f64 = 1.0;
    pub const MAX_UPPER_FACTOR: f64 = 10.0;
    pub const LOWER_WIDENING_DAYS: f64 = 1.0 / 24.0;
    pub const OOM_BUMP_RATIO: f64 = 1.2;
    pub const OOM_MIN_BUMP: u64 = 100 * MIB;
    pub const DAY_S: f64 = 86_400.0;
    /// Headroom of the node-shape advice.
    pub const HEADROOM: f64 = 0.15;
    pub const RESERVED_CPU: f64 = 0.2;
    pub const RESERVED_MEMORY: u64 = 1024 * MIB;

    /// `start(i + 1) = s × (r^(i+1) − 1) / (r − 1)`: where bucket `i` ends.
    pub fn bucket_end(first: f64, i: u32) -> f64 {
        first * (RATIO.powi(i as i32 + 1) - 1.0) / (RATIO - 1.0)
    }

    /// The bucket `v` falls in (bucket 0 is `[0, s)`).
    pub fn bucket_of(first: f64, v: f64) -> u32 {
        let mut i = 0;
        while bucket_end(first, i) <= v {
            i += 1;
        }
        i
    }

    /// `⌈x⌉ₘ`: up to the millicore, float noise below 10⁻⁶ of a millicore not rounded up.
    pub fn ceil_m(x: f64) -> f64 {
        (x * 1000.0 - 1e-6).ceil() / 1000.0
    }

    /// `⌈x⌉`: up to the byte, float noise below 10⁻⁶ of a byte not rounded up.
    pub fn ceil_b(x: f64) -> u64 {
        (x - 1e-6).ceil() as u64
    }

    /// `max(⌈B × oom_bump_ratio⌉, B + oom_min_bump)`.
    pub fn oom_floor(b: u64) -> u64 {
        ceil_b(b as f64 * OOM_BUMP_RATIO).max(b + OOM_MIN_BUMP)
    }

    #[derive(Debug, PartialEq)]
    pub struct Expected {
        pub cpu_target: f64,
        pub cpu_lower: f64,
        pub cpu_upper: f64,
        pub memory_target: u64,
        pub memory_lower: u64,
        pub memory_upper: u64,
    }

    /// "The recommendation", from the history, the percentiles (bucket ends), the observed
    /// peak and `hard = max(memory_floor, oom_floor, jvm_floor)`.
    pub fn recommendation(
        history_s: f64,
        cpu: [f64; 3],
        memory: [f64; 3],
        peak: u64,
        hard: u64,
    ) -> Expected {
        let d = history_s.max(60.0) / DAY_S;
        let m = 1.0 + SAFETY_MARGIN;
        let up = (1.0 + UPPER_WIDENING_DAYS / d).min(MAX_UPPER_FACTOR);
        let lo = d / (d + LOWER_WIDENING_DAYS);
        let [c50, c90, c95] = cpu;
        let [m50, m90, m95] = memory;
        let cpu_target = ceil_m((c90 * m).max(CPU_FLOOR));
        let cpu_lower = ceil_m((c50 * m * lo).max(CPU_FLOOR)).min(cpu_target);
        let cpu_upper = ceil_m((c95 * m * up).max(CPU_FLOOR)).max(cpu_target);
        let memory_target = ceil_b(m90 * m).max(peak).max(hard);
        let memory_lower = ceil_b(m50 * m * lo).max(hard).min(memory_target);
        let memory_upper = ceil_b(m95 * m * up).max(memory_target);
        Expected {
            cpu_target,
            cpu_lower,
            cpu_upper,
            memory_target,
            memory_lower,
            memory_upper,
        }
    }
}

/// `GET /api/v1/recommendations`, as the contract of issue 7 describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Recommendations {
    node: String,
    generated_at_ms: u64,
    sample_interval_seconds: f64,
    containers: Vec<Rec>,
    node_shape: NodeShape,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Rec {
    namespace: String,
    pod: String,
    container: String,
    samples: u64,
    history_seconds: f64,
    cpu_target_cores: f64,
    cpu_lower_cores: f64,
    cpu_upper_cores: f64,
    memory_target_bytes: u64,
    memory_lower_bytes: u64,
    memory_upper_bytes: u64,
    memory_peak_bytes: u64,
    oom_kills: u64,
    cpu_p50_cores: f64,
    cpu_p90_cores: f64,
    cpu_p95_cores: f64,
    memory_p50_bytes: u64,
    memory_p90_bytes: u64,
    memory_p95_bytes: u64,
    jvm_floor_bytes: Option<u64>,
    reasons: Vec<String>,
    workload: Option<String>,
    image: Option<String>,
    /// `null` once the container is gone (its history is kept for the retention).
    current: Option<Current>,
    cpu_diff_cores: Option<f64>,
    memory_diff_bytes: Option<i64>,
    jvm_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Current {
    source: String,
    cpu_request_cores: Option<f64>,
    cpu_limit_cores: Option<f64>,
    memory_request_bytes: Option<u64>,
    memory_limit_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct NodeShape {
    needed_cpu_cores: f64,
    needed_memory_bytes: u64,
    recommended: Option<Shape>,
    current: Option<Shape>,
    saving_percent: Option<f64>,
    capacity: Option<Capacity>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Shape {
    name: String,
    vcpu: u32,
    memory_bytes: u64,
    hourly_price: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Capacity {
    cpu_cores: f64,
    memory_bytes: u64,
    source: String,
}

/// Every key of a `containers[]` entry, checked on the raw JSON: serde would read a missing
/// optional key as `null`.
const CONTAINER_KEYS: &[&str] = &[
    "namespace",
    "pod",
    "container",
    "samples",
    "history_seconds",
    "cpu_target_cores",
    "cpu_lower_cores",
    "cpu_upper_cores",
    "memory_target_bytes",
    "memory_lower_bytes",
    "memory_upper_bytes",
    "memory_peak_bytes",
    "oom_kills",
    "cpu_p50_cores",
    "cpu_p90_cores",
    "cpu_p95_cores",
    "memory_p50_bytes",
    "memory_p90_bytes",
    "memory_p95_bytes",
    "jvm_floor_bytes",
    "reasons",
    "workload",
    "image",
    "current",
    "cpu_diff_cores",
    "memory_diff_bytes",
    "jvm_error",
];
const CURRENT_KEYS: &[&str] = &[
    "source",
    "cpu_request_cores",
    "cpu_limit_cores",
    "memory_request_bytes",
    "memory_limit_bytes",
];
const SHAPE_KEYS: &[&str] = &[
    "needed_cpu_cores",
    "needed_memory_bytes",
    "recommended",
    "current",
    "saving_percent",
    "capacity",
];

fn assert_keys(what: &str, v: &serde_json::Value, keys: &[&str]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    let missing: Vec<&&str> = keys.iter().filter(|k| !obj.contains_key(**k)).collect();
    assert!(missing.is_empty(), "{what} lacks {missing:?}: {v}");
}

/// The endpoint's answer, raw and typed; the shape of every entry checked.
fn fetch(agent: &Agent) -> (serde_json::Value, Recommendations) {
    let (status, body) = agent.get(API);
    assert_eq!(status, 200, "{API} answered {status}: {body}");
    parse(&body)
}

fn parse(body: &str) -> (serde_json::Value, Recommendations) {
    let raw: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{API} is not JSON ({e}): {body}"));
    for c in raw["containers"].as_array().into_iter().flatten() {
        assert_keys("a containers[] entry", c, CONTAINER_KEYS);
        if !c["current"].is_null() {
            assert_keys("its current", &c["current"], CURRENT_KEYS);
        }
    }
    assert_keys("node_shape", &raw["node_shape"], SHAPE_KEYS);
    let typed = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{API} does not have the contract's shape ({e}): {body}"));
    (raw, typed)
}

/// This test's entry for `pod`.
fn entry<'a>(recs: &'a Recommendations, pod: &str) -> Option<&'a Rec> {
    recs.containers
        .iter()
        .find(|c| c.namespace == NS && c.pod == pod)
}

/// Waits (bounded) until the entry of `pod` exists and `ok` accepts it.
fn wait_entry(
    agent: &Agent,
    pod: &str,
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut(&Rec) -> bool,
) -> Rec {
    let start = Instant::now();
    loop {
        let (_, recs) = fetch(agent);
        if let Some(r) = entry(&recs, pod).filter(|r| ok(r)) {
            return r.clone();
        }
        if start.elapsed() > timeout {
            panic!(
                "{pod}: {what} did not happen within {timeout:?}; its entry: {:#?}\nthe agent's log:\n{}",
                entry(&recs, pod),
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A fresh, empty checkpoint directory for one test's agent, so that no history of an
/// earlier run (same pod names) is restored.
fn fresh_checkpoint_dir(node: &Node, name: &str) -> PathBuf {
    let dir = node.dir().join("rightsizing-e2e").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("checkpoint dir");
    dir
}

/// The agent with its defaults (eBPF on), sampling every second, its checkpoints in `dir`.
fn start_agent(node: &Node, dir: &Path, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--namespace",
        "k8s.io",
        "--sample-interval",
        "1",
        "--checkpoint-dir",
        dir.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Agent::start(node, free_port(), &args)
}

/// The runnable fixture image (static busybox).
fn busybox_image(node: &Node) -> String {
    fixtures(node).reference("ragent/run", "v1")
}

/// A pod whose container just sleeps.
async fn sleeping_pod(node: &Node, name: &str, image: &str) -> Pod {
    let pod = Pod::start(
        node,
        PodSpec::new(NS, name, image)
            .container("main")
            .shell("exec /bin/busybox sleep 3600"),
    )
    .await
    .expect("the pod");
    pod.wait_running(Duration::from_secs(30))
        .await
        .expect("running");
    pod
}

fn assert_within(what: &str, got: f64, low: f64, high: f64) {
    assert!(
        (low..=high).contains(&got),
        "{what}: {got} is outside [{low}, {high}]"
    );
}

/// The float bucket end a CPU percentile is (it must be one).
fn cpu_bucket_end(what: &str, p: f64) -> f64 {
    let i = doc::bucket_of(doc::CPU_FIRST_BUCKET, p * (1.0 - 1e-9));
    let end = doc::bucket_end(doc::CPU_FIRST_BUCKET, i);
    assert!(
        (end - p).abs() <= 1e-9 * p.max(1e-3),
        "{what} {p} is not the end of a CPU bucket (bucket {i} ends at {end})"
    );
    p
}

/// The float bucket end a memory percentile (reported rounded up to the byte) is.
fn memory_bucket_end(what: &str, p: u64) -> f64 {
    let i = doc::bucket_of(doc::MEMORY_FIRST_BUCKET, (p as f64 - 1.0).max(0.0));
    let end = doc::bucket_end(doc::MEMORY_FIRST_BUCKET, i);
    assert!(
        doc::ceil_b(end).abs_diff(p) <= 1,
        "{what} {p} is not the end of a memory bucket (bucket {i} ends at {end})"
    );
    end
}

/// Checks a container's bounds against the documented formula applied to the percentiles,
/// history and peak it reports, with `hard` the floor it must have.
fn assert_formula(r: &Rec, hard: u64) {
    let cpu = [
        cpu_bucket_end("cpu_p50", r.cpu_p50_cores),
        cpu_bucket_end("cpu_p90", r.cpu_p90_cores),
        cpu_bucket_end("cpu_p95", r.cpu_p95_cores),
    ];
    let memory = [
        memory_bucket_end("memory_p50", r.memory_p50_bytes),
        memory_bucket_end("memory_p90", r.memory_p90_bytes),
        memory_bucket_end("memory_p95", r.memory_p95_bytes),
    ];
    let want = doc::recommendation(r.history_seconds, cpu, memory, r.memory_peak_bytes, hard);
    eprintln!(
        "{}/{}: the documented formula gives {want:?}",
        r.pod, r.container
    );
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(
        close(r.cpu_target_cores, want.cpu_target)
            && close(r.cpu_lower_cores, want.cpu_lower)
            && close(r.cpu_upper_cores, want.cpu_upper),
        "CPU bounds {} / {} / {} (lower/target/upper) are not the formula's {want:?}: {r:#?}",
        r.cpu_lower_cores,
        r.cpu_target_cores,
        r.cpu_upper_cores
    );
    // One byte of slack: the memory percentiles are reported rounded up to the byte.
    let near = |a: u64, b: u64| a.abs_diff(b) <= 1;
    assert!(
        near(r.memory_target_bytes, want.memory_target)
            && near(r.memory_lower_bytes, want.memory_lower)
            && near(r.memory_upper_bytes, want.memory_upper),
        "memory bounds {} / {} / {} (lower/target/upper) are not the formula's {want:?}: {r:#?}",
        r.memory_lower_bytes,
        r.memory_target_bytes,
        r.memory_upper_bytes
    );
}

/// The recommendation series of a container, by bound: (cpu, memory).
fn metric_bounds(samples: &[promtext::Sample], r: &Rec) -> Vec<(String, Option<f64>, Option<f64>)> {
    let workload = r.workload.clone().unwrap_or_default();
    ["target", "lower", "upper"]
        .iter()
        .map(|bound| {
            let labels = [
                ("namespace", r.namespace.as_str()),
                ("pod", r.pod.as_str()),
                ("container", r.container.as_str()),
                ("workload", workload.as_str()),
                ("bound", bound),
            ];
            (
                bound.to_string(),
                promtext::value(samples, "ragent_recommendation_cpu_cores", &labels),
                promtext::value(samples, "ragent_recommendation_memory_bytes", &labels),
            )
        })
        .collect()
}

/// Waits for a moment where two answers of the endpoint around one scrape agree on the entry
/// of `pod`, then checks that the scrape says the same.
fn assert_metrics_equal_json(agent: &Agent, pod: &str) {
    for _ in 0..20 {
        let (_, before) = fetch(agent);
        let text = agent.metrics();
        let (_, after) = fetch(agent);
        let (Some(a), Some(b)) = (entry(&before, pod), entry(&after, pod)) else {
            panic!("{pod} is not in {API}");
        };
        if a != b {
            continue; // a sample landed in between
        }
        let samples = promtext::parse(&text);
        for (bound, cpu, memory) in metric_bounds(&samples, a) {
            let (want_cpu, want_memory) = match bound.as_str() {
                "target" => (a.cpu_target_cores, a.memory_target_bytes),
                "lower" => (a.cpu_lower_cores, a.memory_lower_bytes),
                _ => (a.cpu_upper_cores, a.memory_upper_bytes),
            };
            assert_eq!(
                cpu,
                Some(want_cpu),
                "ragent_recommendation_cpu_cores{{bound={bound:?}}} of {pod}; the series:\n{}",
                series_of(&samples, "ragent_recommendation_cpu_cores")
            );
            assert_eq!(
                memory,
                Some(want_memory as f64),
                "ragent_recommendation_memory_bytes{{bound={bound:?}}} of {pod}; the series:\n{}",
                series_of(&samples, "ragent_recommendation_memory_bytes")
            );
        }
        let count = promtext::value(&samples, "ragent_rightsizing_containers", &[]);
        assert_eq!(
            count,
            Some(before.containers.len() as f64),
            "ragent_rightsizing_containers against the {} entries of {API}",
            before.containers.len()
        );
        return;
    }
    panic!("the entry of {pod} changed between every two answers of {API}");
}

fn series_of(samples: &[promtext::Sample], name: &str) -> String {
    promtext::find(samples, name, &[])
        .iter()
        .map(|s| format!("  {} {}", s.series(), s.value))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_capped_at_half_a_core_holding_200_mib_gets_the_documented_recommendation() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    // The container's CPU quota caps it at 0.5 core whatever else the machine runs; `dd`
    // holds 200 MiB of anonymous memory (one block read into a buffer it then cannot write
    // to a pipe `sleep` never reads) while the shell loop burns CPU.
    const HELD: u64 = 200 * MIB;
    const SAMPLES: u64 = 32;
    let node = node();
    let dir = fresh_checkpoint_dir(&node, "measure");
    let agent = start_agent(&node, &dir, &[]);
    let name = "rs-measure";
    let image = busybox_image(&node);
    let pod = Pod::start(
        &node,
        PodSpec::new(NS, name, &image)
            .container("burn")
            .cpu_limit_millicores(500)
            .shell(&format!(
                "/bin/busybox dd if=/dev/zero bs={HELD} count=1 2>/dev/null | /bin/busybox sleep 3600 & while :; do :; done"
            )),
    )
    .await
    .expect("the pod");
    pod.wait_running(Duration::from_secs(30))
        .await
        .expect("running");
    let pid = pod.pid().await.expect("pid");
    // Ground truth first: the cgroup has the quota and holds the buffer.
    assert_eq!(
        cgroups::cpu_limit_cores(pid),
        Some(0.5),
        "the container's cgroup does not carry the 0.5 core quota"
    );
    let ws_first = wait_for(
        "the container's cgroup to hold the buffer",
        Duration::from_secs(30),
        || cgroups::working_set_bytes(pid).filter(|w| *w >= HELD),
    );
    let cpu_first = (
        Instant::now(),
        cgroups::cpu_seconds(pid).expect("cgroup cpu"),
    );

    let r = wait_entry(
        &agent,
        name,
        &format!("{SAMPLES} samples"),
        Duration::from_secs(90),
        |r| r.samples >= SAMPLES,
    );
    let ws_last = cgroups::working_set_bytes(pid).expect("working set");
    let cpu_rate = (cgroups::cpu_seconds(pid).expect("cgroup cpu") - cpu_first.1)
        / cpu_first.0.elapsed().as_secs_f64();
    eprintln!("{r:#?}");
    eprintln!(
        "ground truth: cgroup working set {ws_first}..{ws_last} bytes (held {HELD}, baseline +{:.2} MiB), \
         CPU {cpu_rate:.3} cores over the sampling",
        (ws_last as f64 - HELD as f64) / MIB as f64
    );
    eprintln!(
        "agent: {} samples over {} s; cpu p50/p90/p95 {}/{}/{}; memory peak {} ({:.4} of the cgroup's working set); \
         target {} cores, {} bytes",
        r.samples,
        r.history_seconds,
        r.cpu_p50_cores,
        r.cpu_p90_cores,
        r.cpu_p95_cores,
        r.memory_peak_bytes,
        r.memory_peak_bytes as f64 / ws_last as f64,
        r.cpu_target_cores,
        r.memory_target_bytes
    );
    assert!(
        cpu_rate > 0.4,
        "the busy loop got only {cpu_rate:.3} cores of its 0.5: the machine is too busy for this test"
    );
    assert_eq!(r.container, "burn");
    assert_eq!(r.oom_kills, 0);
    assert!(
        r.history_seconds >= (r.samples - 1) as f64 * 0.5
            && r.history_seconds <= r.samples as f64 * 2.0,
        "{} samples a second apart over {} s",
        r.samples,
        r.history_seconds
    );
    // CPU: P90 within ±10 % of the cap (a percentile is its bucket's end, ≤ 5 % above).
    assert_within(
        "cpu_p90_cores against the 0.5 core cap",
        r.cpu_p90_cores,
        0.45,
        0.55,
    );
    assert!(r.cpu_p50_cores <= r.cpu_p90_cores && r.cpu_p90_cores <= r.cpu_p95_cores);
    // Memory: the peak within ±10 % of what the cgroup holds (the buffer plus the processes'
    // own baseline).
    let (lo, hi) = (ws_first.min(ws_last) as f64, ws_first.max(ws_last) as f64);
    assert_within(
        "memory_peak_bytes against the cgroup's working set",
        r.memory_peak_bytes as f64,
        0.9 * lo,
        1.1 * hi,
    );
    assert!(
        r.memory_peak_bytes >= HELD,
        "peak {} below the {HELD} bytes held",
        r.memory_peak_bytes
    );
    // Younger than a memory window: the only memory sample is the open window's peak, so
    // every memory percentile is the end of the peak's bucket.
    let peak_end = doc::ceil_b(doc::bucket_end(
        doc::MEMORY_FIRST_BUCKET,
        doc::bucket_of(doc::MEMORY_FIRST_BUCKET, r.memory_peak_bytes as f64),
    ));
    for (what, p) in [
        ("memory_p50", r.memory_p50_bytes),
        ("memory_p90", r.memory_p90_bytes),
        ("memory_p95", r.memory_p95_bytes),
    ] {
        assert!(
            p.abs_diff(peak_end) <= 1,
            "{what} {p}: the end of the peak's bucket is {peak_end}"
        );
    }
    // The recommendation is the documented formula of these measurements.
    assert_formula(&r, doc::MEMORY_FLOOR);
    assert_eq!(
        r.reasons,
        ["short_history"],
        "less than a day of history, nothing else"
    );
    assert_eq!(r.jvm_floor_bytes, None);
    assert_eq!(r.jvm_error, None);
    // What the container has now: its cgroup's limits (no Kubernetes adapter).
    let current = r
        .current
        .as_ref()
        .expect("a running container has its current");
    assert_eq!(current.source, "cgroup");
    assert_eq!(current.cpu_limit_cores, Some(0.5));
    assert_eq!(
        current.memory_limit_bytes, None,
        "the container has no memory limit"
    );
    assert_eq!(
        (current.cpu_request_cores, current.memory_request_bytes),
        (None, None)
    );
    let diff = r
        .cpu_diff_cores
        .expect("a CPU difference against the limit");
    assert!(
        (diff - (r.cpu_target_cores - 0.5)).abs() < 1e-9,
        "cpu_diff_cores {diff} is not the target {} − the 0.5 limit",
        r.cpu_target_cores
    );
    assert_eq!(
        r.memory_diff_bytes, None,
        "nothing to compare the memory target with"
    );
    assert!(
        r.image.as_deref().is_some_and(|i| i.contains("ragent/run")),
        "image {:?}, the pod runs {image}",
        r.image
    );
    // The sandbox is not a container of its own.
    let (_, recs) = fetch(&agent);
    let ours: Vec<(&str, &str)> = recs
        .containers
        .iter()
        .filter(|c| {
            c.namespace == NS || c.pod == pod.sandbox_id() || c.container == pod.sandbox_id()
        })
        .map(|c| (c.pod.as_str(), c.container.as_str()))
        .collect();
    assert_eq!(ours, [(name, "burn")], "the pod's entries");
    assert_eq!(recs.sample_interval_seconds, 1.0);
    assert!(!recs.node.is_empty());
    assert_metrics_equal_json(&agent, name);
    pod.remove().await.expect("removing the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_container_gets_its_memory_raised_above_the_kill() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    const LIMIT: u64 = 64 * MIB;
    let node = node();
    let dir = fresh_checkpoint_dir(&node, "oom");
    let agent = start_agent(&node, &dir, &[]);
    let name = "rs-oom";
    // The container waits for the test's go (a file the test writes into its root), then
    // becomes `dd` reading 128 MiB into one buffer, twice its limit: the kernel kills it.
    let pod = Pod::start(
        &node,
        PodSpec::new(NS, name, &busybox_image(&node))
            .container("greedy")
            .memory_limit(LIMIT as i64)
            .shell(&format!(
                "until [ -e /go ]; do /bin/busybox sleep 1; done; exec /bin/busybox dd if=/dev/zero of=/dev/null bs={} count=1",
                2 * LIMIT
            )),
    )
    .await
    .expect("the pod");
    pod.wait_running(Duration::from_secs(30))
        .await
        .expect("running");
    let pid = pod.pid().await.expect("pid");
    assert_eq!(
        cgroups::memory_limit_bytes(pid),
        Some(LIMIT),
        "the cgroup's limit"
    );
    // Sampled before the kill.
    let before = wait_entry(&agent, name, "two samples", SEEN, |r| r.samples >= 2);
    eprintln!("before the kill: {before:#?}");
    assert_eq!(
        before.current.as_ref().and_then(|c| c.memory_limit_bytes),
        Some(LIMIT),
        "the limit from the cgroup"
    );
    assert_eq!(before.oom_kills, 0);
    assert!(
        !before.reasons.iter().any(|r| r == "oom_kill"),
        "{:?}",
        before.reasons
    );
    std::fs::write(format!("/proc/{pid}/root/go"), b"go\n").expect("the go file");
    let exit = pod
        .wait_exited(Duration::from_secs(30))
        .await
        .expect("the container exits");
    let (status, _) = pod.status().await.expect("status");
    eprintln!("CRI: exit code {}, reason {:?}", exit.code, status.reason);
    // Ground truth: the kernel killed it for its memory.
    assert_eq!(
        (exit.code, status.reason.as_str()),
        (137, "OOMKilled"),
        "the container was not OOM-killed; its log:\n{}",
        pod.log()
    );

    // For the record: which cgroup directories of the exited container are still there.
    let id = pod.container_id().to_string();
    let left: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join("k8s.io").join(&id))
        .filter(|d| d.is_dir())
        .map(|d| d.display().to_string())
        .collect();
    eprintln!("cgroup directories of the exited container: {left:?}");
    // Once the agent has counted the kill and seen the container gone (`current` null).
    let r = wait_entry(
        &agent,
        name,
        "an OOM kill, and the container gone",
        SEEN,
        |r| r.oom_kills >= 1 && r.current.is_none(),
    );
    eprintln!("after the kill: {r:#?}");
    assert_eq!(r.oom_kills, 1, "one process was killed once");
    assert!(
        r.reasons.iter().any(|x| x == "oom_kill"),
        "reasons {:?}",
        r.reasons
    );
    // B: the working set at the kill when the agent knows it, else the limit. The agent
    // counts kills only (the ledger knows no working set at the kill), so B is the memory
    // limit it read from the cgroup while the container ran: the floor is
    // max(⌈1.2 × 64 MiB⌉, 64 MiB + 100 MiB) = 164 MiB.
    let floor = doc::oom_floor(LIMIT);
    assert_eq!(floor, 164 * MIB);
    eprintln!(
        "memory target {} ({:.1} MiB), lower {}, upper {}; the OOM floor for B = {LIMIT} is {floor}",
        r.memory_target_bytes,
        r.memory_target_bytes as f64 / MIB as f64,
        r.memory_lower_bytes,
        r.memory_upper_bytes,
    );
    assert!(
        r.memory_target_bytes >= floor,
        "memory target {} is below the OOM floor {floor}",
        r.memory_target_bytes
    );
    assert!(
        r.memory_lower_bytes >= floor,
        "memory lower bound {} is below the OOM floor {floor}",
        r.memory_lower_bytes
    );
    assert_formula(&r, floor.max(doc::MEMORY_FLOOR));
    pod.remove().await.expect("removing the pod");
}

/// A catalog in which this machine is `this-node` (its vCPUs, its memory at 95 % of the
/// nominal size) at 1.00/h, with smaller shapes around what a couple of containers need.
fn catalog_for_this_machine(cpus: u32, mem_total: u64) -> String {
    let nominal_gib = mem_total as f64 / 0.95 / GIB as f64;
    format!(
        "currency = \"USD\"\n\
         [[instance_type]]\nname = \"this-node\"\nvcpu = {cpus}\nmemory_gib = {nominal_gib}\nhourly_price = 1.0\n\
         [[instance_type]]\nname = \"tiny-1x1\"\nvcpu = 1\nmemory_gib = 1\nhourly_price = 0.01\n\
         [[instance_type]]\nname = \"fit-2x2\"\nvcpu = 2\nmemory_gib = 2\nhourly_price = 0.05\n\
         [[instance_type]]\nname = \"fit-1x2\"\nvcpu = 1\nmemory_gib = 2\nhourly_price = 0.05\n\
         [[instance_type]]\nname = \"roomy-1x4\"\nvcpu = 1\nmemory_gib = 4\nhourly_price = 0.06\n\
         [[instance_type]]\nname = \"big-4x16\"\nvcpu = 4\nmemory_gib = 16\nhourly_price = 0.2\n"
    )
}

/// The documented pick: the cheapest shape that fits; ties to fewer vCPUs, less memory, name.
fn cheapest_fit(catalog: &[(String, u32, u64, f64)], cpu: f64, memory: u64) -> Option<String> {
    catalog
        .iter()
        .filter(|(_, v, m, _)| *v as f64 >= cpu && *m >= memory)
        .min_by(|a, b| {
            a.3.total_cmp(&b.3)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.0.cmp(&b.0))
        })
        .map(|t| t.0.clone())
}

fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .expect("meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("MemTotal")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jvm_app_never_gets_less_than_heap_and_overhead_and_the_node_shape_counts_it() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    let node = node();
    let set = fixtures(&node);
    let cpus = std::thread::available_parallelism().expect("cpus").get() as u32;
    let mem_total = mem_total_bytes();
    let catalog_path = node.dir().join("rightsizing-catalog.toml");
    std::fs::write(&catalog_path, catalog_for_this_machine(cpus, mem_total)).expect("catalog");
    let cfg = node.dir().join("rightsizing-e2e.toml");
    std::fs::write(
        &cfg,
        format!(
            "[rightsizing]\ncatalog = {:?}\n",
            catalog_path.display().to_string()
        ),
    )
    .expect("config");
    let dir = fresh_checkpoint_dir(&node, "jvm");
    let agent = start_agent(
        &node,
        &dir,
        &["--config", cfg.to_str().expect("utf-8 path")],
    );

    let jvm_image = set.reference("ragent/app-jvm-api", "v1");
    let py_image = set.reference("ragent/app-py-web", "v1");
    let jvm = sleeping_pod(&node, "rs-jvm", &jvm_image).await;
    let py = sleeping_pod(&node, "rs-py", &py_image).await;
    let j = wait_entry(&agent, "rs-jvm", "two samples", SEEN, |r| r.samples >= 2);
    let p = wait_entry(&agent, "rs-py", "two samples", SEEN, |r| r.samples >= 2);
    eprintln!("{j:#?}\n{p:#?}");

    // JAVA_TOOL_OPTIONS=-Xmx384m -XX:MaxMetaspaceSize=96m -XX:ReservedCodeCacheSize=64m -Xss1m:
    // heap + metaspace + code cache + 50 × stack + 32 MiB + ⌈5 % of the heap⌉.
    let gc = 20_132_660; // ⌈0.05 × 384 MiB⌉ = ⌈20 132 659.2⌉
    assert_eq!(gc, doc::ceil_b(0.05 * (384 * MIB) as f64));
    let jvm_floor = 384 * MIB + 96 * MIB + 64 * MIB + 50 * MIB + 32 * MIB + gc;
    assert_eq!(jvm_floor, 676_541_236);
    assert_eq!(
        j.jvm_floor_bytes,
        Some(jvm_floor),
        "the JVM floor of {jvm_image}"
    );
    assert_eq!(j.jvm_error, None);
    assert!(
        j.memory_target_bytes >= jvm_floor,
        "memory target {} < the JVM floor",
        j.memory_target_bytes
    );
    assert!(
        j.memory_lower_bytes >= jvm_floor,
        "memory lower {} < the JVM floor",
        j.memory_lower_bytes
    );
    assert!(
        j.reasons.iter().any(|r| r == "jvm_heap"),
        "reasons {:?}",
        j.reasons
    );
    // A sleeping process uses far less: the floor is what the recommendation is.
    assert_formula(&j, jvm_floor);
    assert!(
        j.image
            .as_deref()
            .is_some_and(|i| i.contains("ragent/app-jvm-api")),
        "image {:?}",
        j.image
    );
    // Not a JVM: no floor, no reason, no error.
    assert_eq!(p.jvm_floor_bytes, None, "{py_image} runs no JVM");
    assert_eq!(p.jvm_error, None);
    assert!(
        !p.reasons.iter().any(|r| r == "jvm_heap"),
        "reasons {:?}",
        p.reasons
    );
    assert_formula(&p, doc::MEMORY_FLOOR);

    // The node's shape: this machine is `this-node`; the containers need far less.
    let (_, recs) = fetch(&agent);
    let shape = &recs.node_shape;
    eprintln!("node shape: {shape:#?}");
    let capacity = shape.capacity.as_ref().expect("the machine's capacity");
    assert_eq!(capacity.source, "machine", "no Kubernetes adapter");
    assert_eq!(capacity.cpu_cores, cpus as f64, "online CPUs");
    assert_eq!(
        capacity.memory_bytes, mem_total,
        "MemTotal of /proc/meminfo"
    );
    // The containers running now (a gone one, `current` null, keeps its history, not its
    // place on the node).
    let running: Vec<&Rec> = recs
        .containers
        .iter()
        .filter(|c| c.current.is_some())
        .collect();
    assert!(running.iter().any(|c| c.pod == "rs-jvm") && running.iter().any(|c| c.pod == "rs-py"));
    let cpu_sum: f64 = running.iter().map(|c| c.cpu_target_cores).sum();
    let mem_sum: u64 = running.iter().map(|c| c.memory_target_bytes).sum();
    let needed_cpu = cpu_sum * (1.0 + doc::HEADROOM) + doc::RESERVED_CPU;
    let needed_memory = doc::ceil_b(mem_sum as f64 * (1.0 + doc::HEADROOM)) + doc::RESERVED_MEMORY;
    assert!(
        (shape.needed_cpu_cores - needed_cpu).abs() < 1e-9,
        "needed_cpu_cores {} is not Σ targets × 1.15 + 0.2 = {needed_cpu} over {} running containers",
        shape.needed_cpu_cores,
        running.len()
    );
    assert!(
        shape.needed_memory_bytes.abs_diff(needed_memory) <= 1,
        "needed_memory_bytes {} is not ⌈Σ targets × 1.15⌉ + 1 GiB = {needed_memory}",
        shape.needed_memory_bytes
    );
    let catalog: Vec<(String, u32, u64, f64)> = [
        (
            "this-node",
            cpus,
            (mem_total as f64 / 0.95).round() as u64,
            1.0,
        ),
        ("tiny-1x1", 1, GIB, 0.01),
        ("fit-2x2", 2, 2 * GIB, 0.05),
        ("fit-1x2", 1, 2 * GIB, 0.05),
        ("roomy-1x4", 1, 4 * GIB, 0.06),
        ("big-4x16", 4, 16 * GIB, 0.2),
    ]
    .into_iter()
    .map(|(n, v, m, p)| (n.to_string(), v, m, p))
    .collect();
    let want = cheapest_fit(&catalog, needed_cpu, needed_memory).expect("a shape fits");
    let recommended = shape.recommended.as_ref().expect("a recommended shape");
    assert_eq!(
        recommended.name, want,
        "the cheapest shape for {needed_cpu} cores, {needed_memory} bytes"
    );
    let current = shape
        .current
        .as_ref()
        .expect("this machine matches this-node");
    assert_eq!(current.name, "this-node");
    assert_eq!((current.vcpu, current.hourly_price), (cpus, 1.0));
    let saving = (current.hourly_price - recommended.hourly_price) / current.hourly_price * 100.0;
    let got = shape.saving_percent.expect("a saving");
    assert!(
        (got - saving).abs() < 1e-9,
        "saving_percent {got}, expected {saving}"
    );
    let ratio = agent.value("ragent_recommendation_node_saving_ratio");
    assert!(
        ratio.is_some_and(|r| (r - saving / 100.0).abs() < 1e-9),
        "ragent_recommendation_node_saving_ratio {ratio:?}, expected {}",
        saving / 100.0
    );
    // The CLI's node advice says the same.
    let out = ragent(
        &node,
        &[
            "recommend",
            "--agent",
            &format!("http://{}", agent.addr),
            "--node",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "ragent recommend --node:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ragent recommend --node failed");
    assert!(text.contains(&want) && text.contains("this-node"), "{text}");
    jvm.remove().await.expect("removing the pod");
    py.remove().await.expect("removing the pod");
}

/// Checks the checkpoint format of docs/rightsizing.md (header `ragent-rightsizing 1 <sha256>
/// <length>`, then the JSON body); returns the file's bytes, where the body starts, the body.
fn read_checkpoint(path: &Path) -> (Vec<u8>, usize, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .expect("a header line");
    let header = std::str::from_utf8(&bytes[..nl]).expect("a text header");
    let f: Vec<&str> = header.split(' ').collect();
    assert_eq!(f.len(), 4, "header {header:?}");
    assert_eq!(
        (f[0], f[1]),
        ("ragent-rightsizing", "1"),
        "header {header:?}"
    );
    let body = &bytes[nl + 1..];
    assert_eq!(
        f[3].parse::<usize>().ok(),
        Some(body.len()),
        "header {header:?}"
    );
    assert_eq!(f[2], hex::encode(Sha256::digest(body)), "header {header:?}");
    let json = serde_json::from_slice(body).expect("a JSON body");
    (bytes, nl + 1, json)
}

/// Whether the checkpoint holds the container of `pod`.
fn checkpoint_has(json: &serde_json::Value, pod: &str) -> bool {
    json["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["key"]["namespace"] == NS && c["key"]["pod"] == pod)
}

fn checkpoint_errors(agent: &Agent) -> Vec<(String, f64)> {
    promtext::find(
        &promtext::parse(&agent.metrics()),
        "ragent_rightsizing_checkpoint_errors_total",
        &[],
    )
    .iter()
    .filter(|s| s.value != 0.0)
    .map(|s| (s.labels.get("reason").cloned().unwrap_or_default(), s.value))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_restart_and_a_bad_checkpoint_is_reported_and_ignored() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    let node = node();
    let dir = fresh_checkpoint_dir(&node, "checkpoint");
    let file = dir.join("recommender.ckpt");
    let cfg = node.dir().join("rightsizing-checkpoint.toml");
    std::fs::write(&cfg, "[rightsizing]\ncheckpoint_interval_s = 1\n").expect("config");
    let cfg = cfg.to_str().expect("utf-8 path").to_string();
    let name = "rs-ckpt";
    let pod = sleeping_pod(&node, name, &busybox_image(&node)).await;

    // An empty directory: no error, and a checkpoint appears while the agent runs.
    let agent = start_agent(&node, &dir, &["--config", &cfg]);
    let errors = checkpoint_errors(&agent);
    assert!(
        errors.is_empty(),
        "an empty checkpoint dir is no error: {errors:?}"
    );
    wait_entry(&agent, name, "three samples", SEEN, |r| r.samples >= 3);
    wait_for("a periodic checkpoint with the pod", SEEN, || {
        file.exists()
            .then(|| read_checkpoint(&file).2)
            .filter(|j| checkpoint_has(j, name))
    });
    let (_, recs) = fetch(&agent);
    let before = entry(&recs, name).expect("the pod").clone();
    let status = agent.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );
    let (valid, _, json) = read_checkpoint(&file);
    assert!(
        checkpoint_has(&json, name),
        "the checkpoint written at shutdown lacks {name}"
    );
    let left: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        BTreeSet::from(["recommender.ckpt".to_string()]),
        "no temporary file left"
    );
    eprintln!(
        "before the restart: {} samples over {} s; the checkpoint has {} bytes",
        before.samples,
        before.history_seconds,
        valid.len()
    );

    // Restored: the history continues.
    let agent = start_agent(&node, &dir, &["--config", &cfg]);
    let errors = checkpoint_errors(&agent);
    assert!(
        errors.is_empty(),
        "a good checkpoint is no error: {errors:?}"
    );
    let restored = wait_entry(&agent, name, "its restored history", SEEN, |_| true);
    eprintln!(
        "restored: {} samples over {} s",
        restored.samples, restored.history_seconds
    );
    assert!(
        restored.samples >= before.samples && restored.history_seconds >= before.history_seconds,
        "restored {} samples over {} s, before the restart {} over {} s",
        restored.samples,
        restored.history_seconds,
        before.samples,
        before.history_seconds
    );
    let more = wait_entry(&agent, name, "a new sample after the restart", SEEN, |r| {
        r.samples > restored.samples
    });
    assert!(more.history_seconds > before.history_seconds);
    assert!(agent.terminate(Duration::from_secs(30)).success());
    let (valid, body_at, _) = read_checkpoint(&file);

    // Bad files: each is reported by its reason, ignored, and the agent starts afresh.
    let mut flipped = valid.clone();
    flipped[body_at + (valid.len() - body_at) / 2] ^= 0x01;
    let cases: [(&str, Vec<u8>); 3] = [
        ("checksum_mismatch", flipped),
        ("not_a_checkpoint", b"this is not a checkpoint\n".to_vec()),
        (
            "truncated",
            valid[..body_at + (valid.len() - body_at) / 2].to_vec(),
        ),
    ];
    for (reason, bytes) in cases {
        std::fs::write(&file, &bytes).expect("writing the bad checkpoint");
        let mut agent = start_agent(&node, &dir, &["--config", &cfg]);
        let errors = checkpoint_errors(&agent);
        eprintln!("{reason}: checkpoint errors {errors:?}");
        assert_eq!(
            errors,
            [(reason.to_string(), 1.0)],
            "the {reason} checkpoint"
        );
        let fresh = wait_entry(&agent, name, "a sample", SEEN, |_| true);
        assert!(
            fresh.samples < more.samples,
            "after a {reason} checkpoint the history starts afresh, yet it has {} samples ({} before)",
            fresh.samples,
            more.samples
        );
        assert!(
            agent.child.try_wait().expect("agent").is_none(),
            "the agent keeps running"
        );
        assert_eq!(agent.get("/readyz").0, 200);
        // The bad file is kept aside for a look, byte for byte.
        let aside = dir.join("recommender.ckpt.bad");
        assert_eq!(
            std::fs::read(&aside).ok().as_ref(),
            Some(&bytes),
            "the {reason} checkpoint is not kept as {}",
            aside.display()
        );
        // It replaces the bad file with a good one.
        assert!(agent.terminate(Duration::from_secs(30)).success());
        let (_, _, json) = read_checkpoint(&file);
        assert!(checkpoint_has(&json, name));
    }
    pod.remove().await.expect("removing the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_container_keeps_its_recommendation_and_ragent_recommend_prints_it() {
    if !require(is_root(), "needs root (the node runs containerd)") {
        return;
    }
    let node = node();
    let dir = fresh_checkpoint_dir(&node, "vanish");
    let agent = start_agent(&node, &dir, &[]);
    let name = "rs-vanish";
    let pod = sleeping_pod(&node, name, &busybox_image(&node)).await;
    wait_entry(&agent, name, "three samples", SEEN, |r| r.samples >= 3);
    pod.remove().await.expect("removing the pod");

    // Gone from containerd: its samples stop, its recommendation stays (retention: 7 days).
    let mut last = (0, Instant::now());
    let gone = wait_entry(
        &agent,
        name,
        "its samples to stop (3 s without one) and its current requests to go (null)",
        SEEN,
        |r| {
            if r.samples != last.0 {
                last = (r.samples, Instant::now());
            }
            last.1.elapsed() >= Duration::from_secs(3) && r.current.is_none()
        },
    );
    eprintln!("after the pod was removed: {gone:#?}");
    assert!(gone.samples >= 3);
    assert!(
        gone.current.is_none(),
        "a gone container has no current requests: {:?}",
        gone.current
    );
    assert_eq!(agent.get("/readyz").0, 200, "the agent keeps working");
    assert_metrics_equal_json(&agent, name);
    // It no longer counts in what the node needs: only running containers do.
    let (_, recs) = fetch(&agent);
    let running: Vec<&Rec> = recs
        .containers
        .iter()
        .filter(|c| c.current.is_some())
        .collect();
    let needed_cpu = running.iter().map(|c| c.cpu_target_cores).sum::<f64>()
        * (1.0 + doc::HEADROOM)
        + doc::RESERVED_CPU;
    assert!(
        (recs.node_shape.needed_cpu_cores - needed_cpu).abs() < 1e-9,
        "needed_cpu_cores {} over {} running containers: {needed_cpu}",
        recs.node_shape.needed_cpu_cores,
        running.len()
    );

    let url = format!("http://{}", agent.addr);
    // The table.
    let out = ragent(&node, &["recommend", "--agent", &url]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "ragent recommend:\n{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ragent recommend failed");
    let line = table
        .lines()
        .find(|l| l.contains(name))
        .unwrap_or_else(|| panic!("no line for {name}:\n{table}"));
    assert!(table.contains(NS) && line.contains("main"), "{table}");
    assert!(
        table.contains(&format!("{NS}/{name}/main: not running now")),
        "the table does not say the container is gone:\n{table}"
    );
    // --json: the endpoint's JSON as it is.
    let out = ragent(&node, &["recommend", "--agent", &url, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (cli_raw, cli) = parse(&String::from_utf8_lossy(&out.stdout));
    let (api_raw, api) = fetch(&agent);
    let of = |raw: &serde_json::Value| {
        raw["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["namespace"] == NS && c["pod"] == name)
            .cloned()
    };
    assert!(of(&cli_raw).is_some(), "--json lacks {name}");
    assert_eq!(
        of(&cli_raw),
        of(&api_raw),
        "the vanished container's entry, CLI against the endpoint"
    );
    assert_eq!(
        (&cli.node, cli.sample_interval_seconds),
        (&api.node, api.sample_interval_seconds)
    );
    let keys = |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(keys(&cli_raw), keys(&api_raw));
    assert!(cli.generated_at_ms <= api.generated_at_ms);
    // An agent that is not there: a clear failure naming the URL.
    let out = ragent(&node, &["recommend", "--agent", "http://127.0.0.1:1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("unreachable agent: {err}");
    assert!(
        !out.status.success(),
        "ragent recommend against nothing succeeded"
    );
    assert!(
        err.contains("http://127.0.0.1:1") && err.contains("--agent"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
