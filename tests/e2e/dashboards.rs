//! The Grafana dashboards (`dashboards/*.json`) against the node's real Prometheus, which
//! scrapes a real `ragent agent` (on the node's agent port, with the `node` and `cluster`
//! labels relabeling adds in a cluster) while the node is busy: the agent pre-pulls an app
//! (and fails on an image that does not exist), CRI pulls an app while it watches, a pod sends
//! traffic, a pod's memory hog is OOM-killed again and again, the agent samples every container
//! each second for right-sizing (with a catalog that holds this machine's shape) and
//! checkpoints each second, and a followed run-image tag moves so the agent rebases every app.
//!
//! Then every query of every panel is run as Grafana runs it (instant for stat, bar gauge and
//! table panels, else a range), with the variables as a user picks them (All, then this node,
//! cluster and namespace): each must parse and return a finite value, and every label its
//! legend names. With another node, cluster or namespace picked, each must return nothing (so
//! the filter is really applied). Every variable's query must list this node, cluster and
//! namespace, and every metric a query names must be in ragent's catalogue and exported by
//! the running agent. The checks that need no Prometheus (JSON shape, metric names, filters in
//! the text) are unit tests in `tests/src/dashboards.rs`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ragent_testkit::{
    dashboards::{Allowed, Dashboard, Query, label_values_query, legend_labels, substitute},
    node::CLUSTER,
    payload::PayloadServer,
    pod::{Pod, PodSpec},
};
use serde_json::Value;

use crate::support::*;

/// The pod that sends traffic, in a namespace of its own.
const NAMESPACE: &str = "ragent-e2e-dash";
/// What Grafana puts for `$__rate_interval` with a 2 s scrape interval is less; 1m is what a
/// 15 s scrape gives, and long enough for a rate here.
const RATE_INTERVAL: &str = "1m";
/// `$__range` for the dashboards' default time range (last hour).
const RANGE: &str = "1h";
/// How long every query together may take to show data (Prometheus scrapes every 2 s).
const DATA_DEADLINE: Duration = Duration::from_secs(120);
/// How long the agent may take to pre-pull, and to rebase the apps after the tag moved.
const ACTIVITY_DEADLINE: Duration = Duration::from_secs(90);
/// The memory limit of the pod whose hog (a 64 MiB `dd` buffer) the OOM killer kills.
const OOM_LIMIT: u64 = 32 << 20;
/// After an OOM kill the memory recommendation is at least this much above the memory at the
/// kill, which the agent takes to be the limit (docs/rightsizing.md, `oom_min_bump_bytes`).
const OOM_MIN_BUMP: u64 = 100 << 20;
/// The catalog's shapes: this machine (matched from its CPUs and MemTotal, as the agent does
/// without a Node object) and a cheaper one the test's few containers fit in.
const MACHINE_SHAPE: &str = "dash-this-machine";
const SMALL_SHAPE: &str = "dash-small-4x8";

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GETs a Prometheus API path; (status, JSON body).
fn prom_get(prom: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = ragent_testkit::http::get(prom, path)
        .unwrap_or_else(|e| panic!("Prometheus at {prom} did not answer {path}: {e}"));
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v)
}

/// An instant query's value of the first series, if any.
fn prom_value(prom: SocketAddr, expr: &str) -> Option<f64> {
    let (status, v) = prom_get(prom, &format!("/api/v1/query?query={}", urlencode(expr)));
    assert_eq!(status, 200, "{expr}: {v}");
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// What a query gave: its series' labels and values, or why it is not data.
enum Answer {
    /// Series, each with its labels and its last finite value (None: only NaN or infinite).
    Series(Vec<(serde_json::Map<String, Value>, Option<f64>)>),
    /// Prometheus refused the query (a parse or evaluation error): never retried.
    Refused(String),
}

fn run_query(prom: SocketAddr, expr: &str, instant: bool) -> Answer {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let path = if instant {
        format!("/api/v1/query?query={}&time={now:.3}", urlencode(expr))
    } else {
        format!(
            "/api/v1/query_range?query={}&start={:.3}&end={now:.3}&step=15",
            urlencode(expr),
            now - 300.0
        )
    };
    let (status, v) = prom_get(prom, &path);
    if status != 200 || v["status"] != "success" {
        return Answer::Refused(format!("HTTP {status}: {v}"));
    }
    let finite = |s: &Value| {
        s.as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|v| v.is_finite())
    };
    let series = v["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let labels = r["metric"].as_object().cloned().unwrap_or_default();
            let ok = if instant {
                finite(&r["value"][1])
            } else {
                r["values"]
                    .as_array()
                    .and_then(|vs| vs.iter().rev().find_map(|p| finite(&p[1])))
            };
            (labels, ok)
        })
        .collect();
    Answer::Series(series)
}

/// Why `q`'s answer is not what a panel needs (None: it is).
fn not_data(q: &Query, answer: &Answer) -> Option<String> {
    match answer {
        Answer::Refused(why) => Some(format!("Prometheus refused it: {why}")),
        Answer::Series(s) if s.is_empty() => Some("no series".into()),
        Answer::Series(s) if s.iter().all(|(_, v)| v.is_none()) => {
            Some("only NaN or infinite values".into())
        }
        Answer::Series(s) => {
            for label in legend_labels(&q.legend) {
                if let Some((l, _)) = s.iter().find(|(l, _)| !l.contains_key(&label)) {
                    return Some(format!(
                        "the legend names {{{{{label}}}}} but a series has no such label: {l:?}"
                    ));
                }
            }
            None
        }
    }
}

/// The variables' values for one choice a user makes.
fn choice(cluster: &str, node: &str, namespace: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("cluster", cluster.to_string()),
        ("node", node.to_string()),
        ("namespace", namespace.to_string()),
        ("__rate_interval", RATE_INTERVAL.to_string()),
        ("__range", RANGE.to_string()),
    ])
}

/// An instance-type catalog with this machine's shape (price 1) and a smaller one (price 0.1).
fn write_catalog(node: &ragent_testkit::node::Node) -> String {
    let (cpus, memory) =
        ragent::adapters::procfs::machine_capacity().expect("this machine's CPUs and MemTotal");
    let path = node.dir().join("dashboards-catalog.toml");
    std::fs::write(
        &path,
        format!(
            "currency = \"USD\"\n\n\
             [[instance_type]]\nname = {MACHINE_SHAPE:?}\nvcpu = {cpus}\nmemory_gib = {:.6}\nhourly_price = 1.0\n\n\
             [[instance_type]]\nname = {SMALL_SHAPE:?}\nvcpu = 4\nmemory_gib = 8\nhourly_price = 0.1\n",
            memory as f64 / (1u64 << 30) as f64
        ),
    )
    .expect("writing the catalog");
    path.display().to_string()
}

fn write_config(
    node: &ragent_testkit::node::Node,
    prepull: &[String],
    follow: &str,
    catalog: &str,
) -> String {
    let path = node.dir().join("dashboards-agent.toml");
    let reg = node.registry();
    std::fs::write(
        &path,
        format!(
            "[prepull]\nimages = {prepull:?}\ninsecure_registries = [{reg:?}]\n\
             # never re-resolved: the in-place rebase below moves the tag's record on purpose\n\
             refresh_interval_s = 0\nretry_max_s = 2\n\n\
             [rebase]\nfollow = [{follow:?}]\npoll_interval_s = 1\nretry_max_s = 2\n\
             insecure_registries = [{reg:?}]\n\n\
             [rightsizing]\nsample_interval_s = 1\ncheckpoint_interval_s = 1\ncatalog = {catalog:?}\n"
        ),
    )
    .expect("writing the agent config");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_show_data_from_prometheus_scraping_a_busy_agent() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let prom = node.prometheus_addr();
    let name = node.name();

    // Three apps on run:v1, which share the run image, launcher and (two of them) cpython:
    // one pulled before the agent starts, one the agent pre-pulls (reusing the shared
    // layers), one CRI pulls while the agent watches (pull bytes per image).
    let web = set.reference("ragent/app-py-web", "v1");
    let worker = set.reference("ragent/app-py-worker", "v1");
    let batch = set.reference("ragent/app-jvm-batch", "v1");
    let absent = set.reference("ragent/no-such-image", "v1");
    let follow = set.reference("ragent/run", "follow-dash");
    retag(&set.reference("ragent/run", "v1"), &follow);
    cri_pull(&node, &web).await;
    let catalog = write_catalog(&node);
    let cfg = write_config(&node, &[worker.clone(), absent], &follow, &catalog);
    // A history of this test's containers only: no checkpoint of an earlier run or test.
    let checkpoints = node.dir().join("rightsizing-dashboards");
    let _ = std::fs::remove_dir_all(&checkpoints);
    let checkpoints = checkpoints.display().to_string();
    let agent = Agent::start(
        &node,
        node.config.agent_port,
        &["--config", &cfg, "--checkpoint-dir", &checkpoints],
    );

    // A pod that keeps moving bytes.
    let server = PayloadServer::start(256 << 10, Duration::from_secs(600)).expect("payload server");
    let pod = Pod::start(
        &node,
        PodSpec::new(NAMESPACE, "fetcher", &set.reference("ragent/run", "v1"))
            .container("fetch")
            .shell(&format!(
                "while true; do /bin/busybox wget -q -O /dev/null {}; /bin/busybox sleep 1; done",
                server.url()
            )),
    )
    .await
    .expect("a pod that sends traffic");
    // A pod whose memory hog the OOM killer kills every few seconds; its shell lives on.
    let oom = Pod::start(
        &node,
        PodSpec::new(NAMESPACE, "oom", &set.reference("ragent/run", "v1"))
            .container("hog")
            .memory_limit(OOM_LIMIT as i64)
            .shell(
                "while true; do /bin/busybox dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; \
                 /bin/busybox sleep 2; done",
            ),
    )
    .await
    .expect("a pod that is OOM-killed");
    cri_pull(&node, &batch).await;
    wait_for(
        "the pre-pull of the worker app and a failure for the missing image",
        ACTIVITY_DEADLINE,
        || {
            let m = agent.metrics();
            (metric_value(&m, "ragent_prepull_images{state=\"ready\"}")? >= 1.0
                && metric_value(&m, "ragent_prepull_failures_total{reason=\"not_found\"}")? >= 1.0
                && metric_value(&m, "ragent_prepull_bytes_total{result=\"reused\"}")? > 0.0
                && m.contains("ragent_image_pull_bytes_total{")
                && metric_value(&m, "ragent_run_image_polls_total{result=\"ok\"}")? >= 3.0)
                .then_some(())
        },
    );
    assert!(
        server.wait_completed(2, Duration::from_secs(30)),
        "the pod fetched nothing: {}",
        pod.log()
    );

    // The followed tag moves to the patched run image: the agent rebases the three apps.
    let v2 = set
        .image("ragent/run", "v2")
        .expect("run:v2")
        .manifest_digest
        .clone();
    retag(&set.reference("ragent/run", "v2"), &follow);
    let on_v2 = format!("ragent_images_by_run_image{{run_image_digest=\"{v2}\"}}");
    wait_for(
        "the three apps rebased onto run:v2",
        ACTIVITY_DEADLINE,
        || {
            let m = agent.metrics();
            (metric_value(&m, "ragent_rebases_total{result=\"rebased\"}")? >= 3.0
                && metric_value(&m, &on_v2)? >= 3.0)
                .then_some(())
        },
    );
    // ... and Prometheus has seen it, with the labels relabeling would add.
    let sel = format!("node=\"{name}\", cluster=\"{CLUSTER}\"");
    wait_for(
        "Prometheus to scrape the rebases with the node and cluster labels",
        Duration::from_secs(30),
        || {
            (prom_value(
                prom,
                &format!("ragent_rebases_total{{{sel}, result=\"rebased\"}}"),
            )? >= 3.0)
                .then_some(())
        },
    );
    // Right-sizing: recommendations for both pods, the hog's OOM kills raising its memory
    // recommendation, the node's saving against its shape, and a checkpoint written.
    wait_for(
        "right-sizing: recommendations, the hog's OOM kills, the node's saving and a checkpoint",
        ACTIVITY_DEADLINE,
        || {
            let m = ragent_testkit::promtext::parse(&agent.metrics());
            let v =
                |name: &str, want: &[(&str, &str)]| ragent_testkit::promtext::value(&m, name, want);
            let fetcher = [
                ("namespace", NAMESPACE),
                ("pod", "fetcher"),
                ("container", "fetch"),
            ];
            let hog = [
                ("namespace", NAMESPACE),
                ("pod", "oom"),
                ("container", "hog"),
            ];
            let target = |c: &[(&'static str, &'static str)]| {
                let mut l = c.to_vec();
                l.push(("bound", "target"));
                l
            };
            (v("ragent_recommendation_cpu_cores", &target(&fetcher))? > 0.0
                && v("ragent_container_oom_kills_total", &hog)? >= 1.0
                && v("ragent_recommendation_memory_bytes", &target(&hog))?
                    >= (OOM_LIMIT + OOM_MIN_BUMP) as f64
                && v("ragent_recommendation_node_saving_ratio", &[])?.is_finite()
                && v("ragent_rightsizing_checkpoint_timestamp_seconds", &[])? > 0.0)
                .then_some(())
        },
    );
    let want = agent.value("ragent_images").expect("ragent_images");
    wait_for(
        "Prometheus's ragent_images to match the agent's",
        Duration::from_secs(30),
        || (prom_value(prom, &format!("ragent_images{{{sel}}}"))? == want).then_some(()),
    );

    let dashboards =
        Dashboard::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards"))
            .expect("dashboards/");
    assert!(!dashboards.is_empty(), "no dashboards found");

    // Only metrics of the catalogue, and the running agent exports each of them.
    let allowed = Allowed::new(
        ragent::metrics::CATALOGUE
            .iter()
            .map(|d| (d.name, d.kind.as_str(), d.labels)),
    );
    let text = agent.metrics();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .collect();
    for d in &dashboards {
        for q in d.queries() {
            let names = ragent_testkit::dashboards::metric_names(&q.expr).unwrap_or_else(|e| {
                panic!(
                    "{} panel {:?} ({}): {e}: {}",
                    d.file(),
                    q.panel,
                    q.ref_id,
                    q.expr
                )
            });
            for m in names {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| m.strip_suffix(s).filter(|b| exported.contains(b)))
                    .unwrap_or(&m);
                assert!(
                    allowed.allows(&m)
                        && (m == "up" || m.starts_with("process_") || exported.contains(base)),
                    "{} panel {:?} ({}): {m} is not a metric the agent exports: {}",
                    d.file(),
                    q.panel,
                    q.ref_id,
                    q.expr
                );
            }
        }
    }

    // Every variable's query lists this node, cluster and namespace.
    let expect = BTreeMap::from([
        ("cluster", CLUSTER.to_string()),
        ("node", name.clone()),
        ("namespace", NAMESPACE.to_string()),
    ]);
    let mut variables = 0;
    for d in &dashboards {
        for v in d.variables().into_iter().filter(|v| v.kind == "query") {
            let q = v.query.clone().unwrap_or_default();
            let (sel, label) = label_values_query(&q)
                .unwrap_or_else(|| panic!("{}: variable {}: {q}", d.file(), v.name));
            for values in [choice(".*", ".*", ".*"), choice(CLUSTER, &name, ".*")] {
                let sel = substitute(&sel, &values).expect("variables");
                let path = format!(
                    "/api/v1/label/{label}/values?match%5B%5D={}",
                    urlencode(&sel)
                );
                let got = wait_for(
                    &format!("{}: variable {} ({sel}) to list values", d.file(), v.name),
                    Duration::from_secs(30),
                    || {
                        let (status, body) = prom_get(prom, &path);
                        assert_eq!(status, 200, "{}: variable {}: {body}", d.file(), v.name);
                        let list: Vec<String> = body["data"]
                            .as_array()?
                            .iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect();
                        list.contains(&expect[v.name.as_str()]).then_some(list)
                    },
                );
                assert!(!got.is_empty());
                variables += 1;
            }
        }
    }

    // Every query returns data with All picked, and with this cluster, node and namespace.
    let choices = [
        ("All", choice(".*", ".*", ".*")),
        ("this node", choice(CLUSTER, &name, NAMESPACE)),
    ];
    let mut pending: Vec<(String, &str, Query, String)> = Vec::new();
    for d in &dashboards {
        for q in d.queries() {
            for (what, values) in &choices {
                let expr = substitute(&q.expr, values).unwrap_or_else(|e| {
                    panic!("{} panel {:?} ({}): {e}", d.file(), q.panel, q.ref_id)
                });
                pending.push((d.file(), what, q.clone(), expr));
            }
        }
    }
    let evaluated = pending.len();
    let start = Instant::now();
    loop {
        let mut failing = Vec::new();
        for (file, what, q, expr) in pending {
            let answer = run_query(prom, &expr, q.instant);
            if let Some(why) = not_data(&q, &answer) {
                if let Answer::Refused(_) = answer {
                    panic!(
                        "{file} panel {:?} ({}), variables {what}: {why}\n  {expr}",
                        q.panel, q.ref_id
                    );
                }
                failing.push((file, what, q, expr, why));
            }
        }
        if failing.is_empty() {
            break;
        }
        if start.elapsed() > DATA_DEADLINE {
            let list: Vec<String> = failing
                .iter()
                .map(|(file, what, q, expr, why)| {
                    format!(
                        "{file} panel {:?} ({}), variables {what}: {why}\n  {expr}",
                        q.panel, q.ref_id
                    )
                })
                .collect();
            panic!(
                "{} of {evaluated} dashboard queries show no data after {DATA_DEADLINE:?}:\n{}",
                list.len(),
                list.join("\n")
            );
        }
        pending = failing
            .into_iter()
            .map(|(f, w, q, e, _)| (f, w, q, e))
            .collect();
        std::thread::sleep(Duration::from_secs(2));
    }

    // The panels show the activity, not only zeros: (dashboard, panel, a series' label).
    let v2_digest = v2.as_str();
    let activity = [
        (
            "ragent-images.json",
            "Pre-pull bytes since the agents started: fetched vs reused",
            ("result", "fetched"),
        ),
        (
            "ragent-images.json",
            "Pre-pull bytes since the agents started: fetched vs reused",
            ("result", "reused"),
        ),
        (
            "ragent-images.json",
            "Pull bytes by image (since the agents started)",
            ("image", batch.as_str()),
        ),
        (
            "ragent-rebase.json",
            "Rebase results (time range)",
            ("result", "rebased"),
        ),
        (
            "ragent-rebase.json",
            "App images per run-image digest",
            ("run_image_digest", v2_digest),
        ),
        (
            "ragent-pods.json",
            "Pod receive (top 10)",
            ("pod", "fetcher"),
        ),
        (
            "ragent-node.json",
            "Node traffic by owner",
            ("owner", "pods"),
        ),
    ];
    for (file, panel, (label, value)) in activity {
        let q = dashboards
            .iter()
            .find(|d| d.file() == file)
            .and_then(|d| d.queries().into_iter().find(|q| q.panel == panel))
            .unwrap_or_else(|| panic!("{file} has no panel {panel:?}"));
        let expr = substitute(&q.expr, &choices[1].1).expect("variables");
        let shown = match run_query(prom, &expr, q.instant) {
            Answer::Series(s) => s
                .into_iter()
                .find(|(l, _)| l.get(label).and_then(Value::as_str) == Some(value))
                .and_then(|(_, v)| v),
            Answer::Refused(why) => panic!("{file} panel {panel:?}: {why}"),
        };
        assert!(
            shown.is_some_and(|v| v > 0.0),
            "{file} panel {panel:?} shows {shown:?} for {label}={value}, not the test's activity\n  {expr}"
        );
    }

    // The right-sizing panels show the test's pods: (panel, query, pod, more than this).
    let rightsizing = [
        (
            "Recommended vs used CPU (10 largest targets, cores)",
            "A",
            "fetcher",
            0.0,
        ),
        (
            "Recommended vs used CPU (10 largest targets, cores)",
            "B",
            "fetcher",
            0.0,
        ),
        (
            "Recommended vs working-set memory (10 largest targets)",
            "A",
            "fetcher",
            0.0,
        ),
        (
            "Recommended vs working-set memory (10 largest targets)",
            "B",
            "fetcher",
            0.0,
        ),
        ("OOM kills and raised recommendations", "A", "oom", 0.0),
        // The hog's memory recommendation, raised above its limit by its OOM kills.
        (
            "OOM kills and raised recommendations",
            "B",
            "oom",
            (OOM_LIMIT + OOM_MIN_BUMP) as f64 - 1.0,
        ),
    ];
    let pods = dashboards
        .iter()
        .find(|d| d.file() == "ragent-pods.json")
        .expect("ragent-pods.json");
    let query = |panel: &str, ref_id: &str| {
        pods.queries()
            .into_iter()
            .find(|q| q.panel == panel && q.ref_id == ref_id)
            .unwrap_or_else(|| panic!("ragent-pods.json has no panel {panel:?} query {ref_id}"))
    };
    for (panel, ref_id, pod, least) in rightsizing {
        let q = query(panel, ref_id);
        let expr = substitute(&q.expr, &choices[1].1).expect("variables");
        let shown = match run_query(prom, &expr, q.instant) {
            Answer::Series(s) => s
                .into_iter()
                .find(|(l, _)| l.get("pod").and_then(Value::as_str) == Some(pod))
                .and_then(|(_, v)| v),
            Answer::Refused(why) => panic!("ragent-pods.json panel {panel:?}: {why}"),
        };
        assert!(
            shown.is_some_and(|v| v > least),
            "ragent-pods.json panel {panel:?} ({ref_id}) shows {shown:?} for pod {pod}, not more than {least}\n  {expr}"
        );
    }
    // The node's shape is the catalog's entry for this machine, the advice the smaller entry:
    // a saving of (1.0 - 0.1) / 1.0.
    let q = query("Node shape advice: saving against the current shape", "A");
    let expr = substitute(&q.expr, &choices[1].1).expect("variables");
    match run_query(prom, &expr, q.instant) {
        Answer::Series(s) => {
            let [(labels, saving)] = s.as_slice() else {
                panic!(
                    "the node shape panel shows {} series, not this node's one: {s:?}\n  {expr}",
                    s.len()
                );
            };
            let label = |k: &str| labels.get(k).and_then(Value::as_str).unwrap_or("");
            assert_eq!(
                (label("node"), label("current"), label("recommended")),
                (name.as_str(), MACHINE_SHAPE, SMALL_SHAPE),
                "the node shape panel: {labels:?}\n  {expr}"
            );
            assert!(
                saving.is_some_and(|v| (v - 0.9).abs() < 1e-9),
                "the node shape panel shows a saving of {saving:?}, not 0.9\n  {expr}"
            );
        }
        Answer::Refused(why) => panic!("the node shape panel: {why}"),
    }

    // With another cluster or node picked, every query is empty; with another namespace,
    // every query that filters by namespace.
    let elsewhere = [
        ("another node", choice(".*", "no-such-node", ".*"), true),
        (
            "another cluster",
            choice("no-such-cluster", ".*", ".*"),
            true,
        ),
        (
            "another namespace",
            choice(".*", ".*", "no-such-namespace"),
            false,
        ),
    ];
    let mut filtered = 0;
    for d in &dashboards {
        for q in d.queries() {
            for (what, values, every) in &elsewhere {
                if !every && !q.expr.contains("$namespace") {
                    continue;
                }
                let expr = substitute(&q.expr, values).expect("variables");
                match run_query(prom, &expr, q.instant) {
                    Answer::Series(s) if s.is_empty() => {}
                    Answer::Series(s) => panic!(
                        "{} panel {:?} ({}) shows data with {what} picked: {:?}\n  {expr}",
                        d.file(),
                        q.panel,
                        q.ref_id,
                        s.first().map(|(l, _)| l)
                    ),
                    Answer::Refused(why) => panic!(
                        "{} panel {:?} ({}), {what}: {why}\n  {expr}",
                        d.file(),
                        q.panel,
                        q.ref_id
                    ),
                }
                filtered += 1;
            }
        }
    }
    eprintln!(
        "dashboards: {} dashboards, {evaluated} queries returned data ({} per choice of variables), \
         {filtered} returned nothing for another node, cluster or namespace, {variables} variable queries listed the node",
        dashboards.len(),
        evaluated / choices.len()
    );

    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success());
    drop(pod);
    drop(oom);
    // The rebased apps, their rollback records and the followed tag's record are this test's.
    remove_all_images(&node);
}
