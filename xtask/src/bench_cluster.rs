//! `cargo xtask bench cluster`: what N nodes pulling the same images cost the registry and
//! how long they take, without ragent (every node fetches every blob itself) and with one
//! `ragent agent` per node sharing layers between peers (issue 8).
//!
//! Each run gets a fresh cluster (`ragent_testkit::cluster`: nodes in network namespaces with
//! their own containerd, the registry behind a `tbf` link); the figures come from the
//! registry's access log (blob and manifest GETs answered 200) and the pulls' wall times.
//! Times are printed, never asserted.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ragent_testkit::{
    cluster::{self, Cluster, ClusterConfig, NodePull, Served},
    fixtures::{self, FixtureSet},
};
use serde_json::json;

use crate::bench::{build_kind, mb, median};

/// The sample set: the four apps on `run:v1` (shared run-image, launcher and buildpack
/// layers; their own app and config layers).
const APPS: [(&str, &str); 4] = [
    ("ragent/app-py-web", "v1"),
    ("ragent/app-py-worker", "v1"),
    ("ragent/app-jvm-api", "v1"),
    ("ragent/app-jvm-batch", "v1"),
];
/// Bound on one node's pulls of the whole set.
const PULL_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Cluster sizes to run, comma-separated (1..=5 each)
    #[arg(long, value_delimiter = ',', default_value = "1,3,5")]
    pub nodes: Vec<usize>,
    /// Rate of what the registry sends (tbf on its link), Mbit/s
    #[arg(long, default_value_t = 200)]
    pub rate_mbit: u32,
    /// Payload multiplier of the sample images (4 ≈ 70 MB unique for the four apps)
    #[arg(long, default_value_t = 4)]
    pub scale: u32,
    /// Measure this ragent binary (e.g. target/release/ragent) instead of building the debug one
    #[arg(long)]
    pub ragent: Option<PathBuf>,
    /// Only the runs without ragent (no agent is built or started)
    #[arg(long)]
    pub without_ragent_only: bool,
    /// Cluster slot 0..=4 (namespaces rgc<slot>-*, 10.<200+slot>.0.0/24); default
    /// RAGENT_TEST_SLOT, else 0
    #[arg(long)]
    pub slot: Option<u8>,
    /// Also write the rows as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measured run: N nodes, one mode.
#[derive(Debug, Clone)]
struct Row {
    nodes: usize,
    mode: &'static str,
    served: Served,
    unique: u64,
    wall: f64,
    per_node: Vec<f64>,
    ok: usize,
    /// Per node: `ragent_blob_bytes_total` summed by source (empty without ragent, or when
    /// the agent does not export it).
    agent_bytes: Vec<BTreeMap<String, f64>>,
    /// Why the run did not complete (an agent that would not start, failed pulls).
    error: Option<String>,
}

fn run_one(
    config: &ClusterConfig,
    set: &FixtureSet,
    unique: u64,
    bin: Option<&Path>,
) -> Result<Row> {
    let mode = if bin.is_some() {
        "with ragent"
    } else {
        "without ragent"
    };
    let t0 = Instant::now();
    let c = Cluster::up(config)?;
    c.push(set, &APPS)?;
    println!(
        "bench: {} node(s), {mode}: cluster up and images pushed in {:.1} s",
        config.nodes,
        t0.elapsed().as_secs_f64()
    );
    let mut row = Row {
        nodes: config.nodes,
        mode,
        served: Served::default(),
        unique,
        wall: 0.0,
        per_node: Vec::new(),
        ok: 0,
        agent_bytes: Vec::new(),
        error: None,
    };
    let mut agents = Vec::new();
    if let Some(bin) = bin {
        match c.start_agents(bin, "") {
            Ok(a) => agents = a,
            Err(e) => {
                row.error = Some(format!("{e:#}"));
                eprintln!("bench: {e:#}");
                return Ok(row);
            }
        }
    }
    let refs: Vec<String> = APPS
        .iter()
        .map(|(r, t)| format!("{}/{r}:{t}", c.registry_host()))
        .collect();
    let nodes: Vec<usize> = (1..=config.nodes).collect();
    let mark = c.access_log_mark();
    let t1 = Instant::now();
    let pulls: Vec<NodePull> = c.pull_all(&nodes, &refs, PULL_TIMEOUT);
    row.wall = t1.elapsed().as_secs_f64();
    // The registry logs a GET right after its body.
    sleep(Duration::from_millis(300));
    row.served = c.served_since(mark);
    row.per_node = pulls.iter().map(|p| p.seconds).collect();
    row.ok = pulls.iter().filter(|p| p.ok).count();
    let failed: Vec<String> = pulls
        .iter()
        .filter(|p| !p.ok)
        .map(|p| p.error.clone())
        .collect();
    if !failed.is_empty() {
        row.error = Some(failed.join("; "));
        eprintln!("bench: pulls failed: {}", failed.join("; "));
    }
    if bin.is_some() {
        for i in 1..=config.nodes {
            let sums = c
                .http_get(i, cluster::METRICS_PORT, "/metrics")
                .map(|(_, text)| cluster::blob_bytes_by_source(&text))
                .unwrap_or_default();
            row.agent_bytes.push(sums);
        }
    }
    for a in &mut agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    let done = c.down();
    println!(
        "bench: {} node(s), {mode}: pulled in {:.2} s, cluster torn down ({} steps)",
        config.nodes,
        row.wall,
        done.len()
    );
    Ok(row)
}

fn print_table(rows: &[Row], args: &ClusterArgs, unique: u64, bin: Option<&Path>) {
    println!(
        "\n== cargo xtask bench cluster (scale {}, link {} Mbit/s, sample set {} unique blob bytes = {}{})",
        args.scale,
        args.rate_mbit,
        unique,
        mb(unique as f64),
        bin.map(|b| format!(", ragent: {} ({})", b.display(), build_kind(b)))
            .unwrap_or_default()
    );
    println!(
        "{:>2} {:<15} {:>14} {:>12} {:>6} {:>10} {:>8} {:>24} {:>5}",
        "N",
        "mode",
        "upstream blobs",
        "unique",
        "ratio",
        "manifests",
        "wall s",
        "per node s min/med/max",
        "ok"
    );
    for r in rows {
        if r.per_node.is_empty() {
            println!(
                "{:>2} {:<15} {:>14} {:>12} {:>6} {:>10} {:>8} {:>24} {:>5}",
                r.nodes,
                r.mode,
                "-",
                r.unique,
                "-",
                "-",
                "-",
                "- (did not run)",
                format!("0/{}", r.nodes),
            );
            continue;
        }
        let mn = r.per_node.iter().copied().fold(f64::INFINITY, f64::min);
        let md = median(&r.per_node);
        let mx = r.per_node.iter().copied().fold(0.0, f64::max);
        println!(
            "{:>2} {:<15} {:>14} {:>12} {:>6.2} {:>10} {:>8.2} {:>24} {:>5}",
            r.nodes,
            r.mode,
            r.served.blob_bytes,
            r.unique,
            r.served.blob_bytes as f64 / r.unique as f64,
            r.served.manifest_bytes,
            r.wall,
            format!("{mn:.2}/{md:.2}/{mx:.2}"),
            format!("{}/{}", r.ok, r.nodes),
        );
    }
    for r in rows {
        for (i, sums) in r.agent_bytes.iter().enumerate() {
            if sums.is_empty() {
                continue;
            }
            let s: Vec<String> = sums
                .iter()
                .map(|(k, v)| format!("{k} {}", mb(*v)))
                .collect();
            println!(
                "N={} n{}: ragent_blob_bytes_total by source: {}",
                r.nodes,
                i + 1,
                s.join(", ")
            );
        }
        if r.mode == "with ragent"
            && r.agent_bytes.iter().all(BTreeMap::is_empty)
            && r.error.is_none()
        {
            println!(
                "N={}: the agents export no ragent_blob_bytes_total",
                r.nodes
            );
        }
        if let Some(e) = &r.error {
            println!("N={} {}: FAILED: {e}", r.nodes, r.mode);
        }
    }
}

fn rows_json(rows: &[Row], args: &ClusterArgs) -> serde_json::Value {
    json!({
        "bench": "cluster",
        "scale": args.scale,
        "rate_mbit": args.rate_mbit,
        "rows": rows.iter().map(|r| json!({
            "nodes": r.nodes,
            "mode": r.mode,
            "upstream_blob_bytes": r.served.blob_bytes,
            "upstream_blob_gets": r.served.blob_gets,
            "unique_blob_bytes": r.unique,
            "ratio": r.served.blob_bytes as f64 / r.unique as f64,
            "manifest_bytes": r.served.manifest_bytes,
            "manifest_gets": r.served.manifest_gets,
            "wall_seconds": r.wall,
            "per_node_seconds": r.per_node,
            "nodes_ok": r.ok,
            "agent_blob_bytes_by_source": r.agent_bytes,
            "error": r.error,
        })).collect::<Vec<_>>(),
    })
}

pub fn cluster(args: &ClusterArgs, bin: Option<&Path>) -> Result<()> {
    if args.nodes.is_empty()
        || args
            .nodes
            .iter()
            .any(|n| *n == 0 || *n > cluster::MAX_NODES)
    {
        bail!(
            "--nodes {:?}: each size must be 1..={}",
            args.nodes,
            cluster::MAX_NODES
        );
    }
    let slot = args.slot.unwrap_or_else(ClusterConfig::slot_from_env);
    let mut config = ClusterConfig::new(slot, 1);
    config.rate_mbit = args.rate_mbit;
    // The sample images, built once outside the cluster's directory (teardown removes that).
    let fixtures_dir = PathBuf::from(format!("/tmp/ragent-bench-cluster-{slot}"));
    let t0 = Instant::now();
    // The registry's name is part of the apps' labels: build for the cluster's registry.
    let registry = format!(
        "10.{}.0.2:{}",
        200 + u32::from(slot),
        cluster::REGISTRY_PORT
    );
    let mut opts = fixtures::Options::new(&registry);
    opts.scale = args.scale;
    let set = fixtures::build(&fixtures_dir, &opts)?;
    let unique = set.unique_blob_bytes(&APPS)?;
    println!(
        "bench: sample images at scale {} built in {:.1} s: {} unique blob bytes ({}) in the four apps",
        args.scale,
        t0.elapsed().as_secs_f64(),
        unique,
        mb(unique as f64)
    );
    let mut rows = Vec::new();
    let result = (|| -> Result<()> {
        for &n in &args.nodes {
            config.nodes = n;
            rows.push(run_one(&config, &set, unique, None)?);
            if let Some(b) = bin {
                rows.push(run_one(&config, &set, unique, Some(b))?);
            }
        }
        Ok(())
    })();
    print_table(&rows, args, unique, bin);
    if let Some(p) = &args.json {
        fs::write(p, serde_json::to_vec_pretty(&rows_json(&rows, args))?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("bench: rows written to {}", p.display());
    }
    let _ = fs::remove_dir_all(&fixtures_dir);
    result?;
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        bail!("{failed} of {} runs failed (see FAILED above)", rows.len());
    }
    Ok(())
}
