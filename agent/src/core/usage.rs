//! From cgroupfs readings to right-sizing samples, and from recommendations to the report that
//! `GET /api/v1/recommendations` serves and `ragent recommend` prints.
//!
//! Pure: the agent hands in readings (cumulative CPU seconds and the working set per container
//! cgroup, with their time) and OOM kill totals; [`Feed`] turns them into [`Sample`]s (CPU as
//! the rate between two readings of the same cgroup) and new kills. [`entry`] joins a
//! recommendation with what the container asks for now (pod spec, else cgroup limits).
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::cnb::BuildpackRef;
use super::pods::Resources;
use super::rightsizing::{ContainerKey, ContainerRecommendation, Sample, ShapeAdvice};

/// One cgroupfs reading of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub key: ContainerKey,
    /// The cgroup read: a restarted container has a new one, whose CPU counter starts at 0.
    pub cgroup: String,
    pub at: SystemTime,
    pub cpu_seconds: Option<f64>,
    pub working_set_bytes: Option<u64>,
}

/// What [`Feed`] remembers between two rounds.
#[derive(Debug, Default)]
pub struct Feed {
    /// (container, cgroup) → the last CPU counter and when it was read.
    cpu: HashMap<(ContainerKey, String), (f64, SystemTime)>,
    /// Container → OOM kills counted so far.
    ooms: HashMap<ContainerKey, u64>,
}

impl Feed {
    /// The samples of one round: for every container read twice in the same cgroup, its CPU
    /// rate over the interval (cores) and its working set now. A container's first reading
    /// (and the first after a restart) only primes the rate. Cgroups not read this round are
    /// forgotten.
    pub fn samples(&mut self, readings: &[Reading]) -> Vec<(ContainerKey, Sample)> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for r in readings {
            let slot = (r.key.clone(), r.cgroup.clone());
            seen.insert(slot.clone());
            let Some(cpu) = r.cpu_seconds else { continue };
            let before = self.cpu.insert(slot, (cpu, r.at));
            let (Some((cpu0, at0)), Some(ws)) = (before, r.working_set_bytes) else {
                continue;
            };
            let Ok(dt) = r.at.duration_since(at0) else {
                continue;
            };
            let dt = dt.as_secs_f64();
            // A counter that went back is another cgroup under the same path: prime again.
            if dt <= 0.0 || cpu < cpu0 {
                continue;
            }
            out.push((
                r.key.clone(),
                Sample {
                    at: r.at,
                    cpu_cores: (cpu - cpu0) / dt,
                    memory_bytes: ws,
                },
            ));
        }
        self.cpu.retain(|k, _| seen.contains(k));
        out
    }

    /// New OOM kills per container from running totals. The first total of a container counts
    /// from `known(key)` (kills already in its restored history), so a restart of the agent
    /// does not count the same kill twice. A total that went back (the series was dropped and
    /// started again) starts counting from there.
    pub fn new_oom_kills(
        &mut self,
        totals: &[(ContainerKey, u64)],
        known: impl Fn(&ContainerKey) -> u64,
    ) -> Vec<(ContainerKey, u64)> {
        let mut out = Vec::new();
        for (key, total) in totals {
            let before = *self.ooms.entry(key.clone()).or_insert_with(|| known(key));
            if *total > before {
                out.push((key.clone(), total - before));
            }
            self.ooms.insert(key.clone(), *total);
        }
        out
    }
}

/// Words in a buildpack id that mean it provides or runs a JVM (Paketo's and Heroku's JVM
/// buildpacks, vendors' JDK buildpacks, and the fixtures' `ragent-samples/jre`).
const JVM_WORDS: [&str; 14] = [
    "jre",
    "jdk",
    "jvm",
    "java",
    "openjdk",
    "liberica",
    "graalvm",
    "corretto",
    "zulu",
    "adoptium",
    "temurin",
    "sap-machine",
    "microsoft-openjdk",
    "executable-jar",
];

/// Whether an image's buildpacks (CNB build metadata) include a JVM buildpack: one whose id
/// has a path segment that is, or is made of `-`-joined words one of which is, a JVM word.
pub fn runs_jvm(buildpacks: &[BuildpackRef]) -> bool {
    buildpacks.iter().any(|b| {
        b.id.to_ascii_lowercase().split(['/', '.']).any(|segment| {
            JVM_WORDS.contains(&segment) || segment.split('-').any(|word| JVM_WORDS.contains(&word))
        })
    })
}

/// Where a container's current requests and limits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CurrentSource {
    /// The pod spec (the Kubernetes adapter runs): requests and limits.
    PodSpec,
    /// The container's cgroup: limits only (a request is not readable back from cgroupfs).
    Cgroup,
}

/// What a container asks for now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Current {
    pub source: CurrentSource,
    pub cpu_request_cores: Option<f64>,
    pub cpu_limit_cores: Option<f64>,
    pub memory_request_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
}

impl Current {
    /// From the pod spec when it is known, else from the cgroup's limits.
    pub fn of(
        pod_spec: Option<Resources>,
        cgroup_cpu_limit: Option<f64>,
        cgroup_memory_limit: Option<u64>,
    ) -> Current {
        match pod_spec {
            Some(r) => Current {
                source: CurrentSource::PodSpec,
                cpu_request_cores: r.cpu_request_cores,
                cpu_limit_cores: r.cpu_limit_cores,
                memory_request_bytes: r.memory_request_bytes,
                memory_limit_bytes: r.memory_limit_bytes,
            },
            None => Current {
                source: CurrentSource::Cgroup,
                cpu_request_cores: None,
                cpu_limit_cores: cgroup_cpu_limit,
                memory_request_bytes: None,
                memory_limit_bytes: cgroup_memory_limit,
            },
        }
    }
}

/// One container of the report: the recommendation and what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub recommendation: ContainerRecommendation,
    /// `Kind/name` of the owning workload, when the Kubernetes adapter knows it.
    pub workload: Option<String>,
    pub image: Option<String>,
    /// None for a container that is gone (its history is kept for the retention).
    pub current: Option<Current>,
    /// Recommended CPU target − current request (or limit, without a request).
    pub cpu_diff_cores: Option<f64>,
    /// Recommended memory target − current request (or limit, without a request).
    pub memory_diff_bytes: Option<i64>,
    /// The image runs a JVM whose options do not parse: recommended without a JVM floor.
    pub jvm_error: Option<String>,
}

/// The recommendation of a container with the difference to what it asks for now.
pub fn entry(
    recommendation: ContainerRecommendation,
    workload: Option<String>,
    image: Option<String>,
    current: Option<Current>,
    jvm_error: Option<String>,
) -> Entry {
    let cpu_now = current.and_then(|c| c.cpu_request_cores.or(c.cpu_limit_cores));
    let memory_now = current.and_then(|c| c.memory_request_bytes.or(c.memory_limit_bytes));
    Entry {
        cpu_diff_cores: cpu_now
            .map(|now| ((recommendation.cpu_target_cores - now) * 1000.0).round() / 1000.0),
        memory_diff_bytes: memory_now.map(|now| {
            i64::try_from(recommendation.memory_target_bytes)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(now).unwrap_or(i64::MAX))
        }),
        recommendation,
        workload,
        image,
        current,
        jvm_error,
    }
}

/// Where the node's capacity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacitySource {
    /// The Kubernetes Node object's `status.capacity`.
    Node,
    /// This machine (online CPUs, MemTotal).
    Machine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu_cores: f64,
    pub memory_bytes: u64,
    pub source: CapacitySource,
}

/// The node's instance-shape advice with the capacity it was matched from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeShape {
    #[serde(flatten)]
    pub advice: ShapeAdvice,
    pub capacity: Option<Capacity>,
    /// The catalog's currency, when it names one.
    pub currency: Option<String>,
}

/// `GET /api/v1/recommendations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub generated_at_ms: u64,
    pub sample_interval_seconds: f64,
    pub containers: Vec<Entry>,
    pub node_shape: NodeShape,
}

fn cores(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(c) if c.abs() < 1.0 => format!("{}m", (c * 1000.0).round() as i64),
        Some(c) => format!("{c:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .into(),
    }
}

fn signed_cores(v: Option<f64>) -> String {
    match v {
        Some(c) if c > 0.0 => format!("+{}", cores(Some(c))),
        _ => cores(v),
    }
}

fn bytes(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.2}Gi", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.1}Mi", b as f64 / (1u64 << 20) as f64),
    }
}

fn signed_bytes(v: Option<i64>) -> String {
    match v {
        None => "-".into(),
        Some(d) if d < 0 => format!("-{}", bytes(Some(d.unsigned_abs()))),
        Some(d) => format!("+{}", bytes(Some(d as u64))),
    }
}

fn pair(a: String, b: String) -> String {
    format!("{a}/{b}")
}

/// Lays out rows in columns two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The report as `ragent recommend` prints it: one row per container, then notes.
pub fn render_table(report: &Report) -> String {
    if report.containers.is_empty() {
        return format!(
            "no recommendations yet on node {:?}: the agent samples every {} s and needs two samples of a container\n",
            report.node, report.sample_interval_seconds
        );
    }
    let mut rows = vec![
        [
            "NAMESPACE",
            "POD",
            "CONTAINER",
            "SAMPLES",
            "CPU REQ/LIM",
            "CPU P90",
            "CPU REC",
            "CPU DIFF",
            "MEM REQ/LIM",
            "MEM PEAK",
            "MEM REC",
            "MEM DIFF",
            "OOM",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut notes = Vec::new();
    for e in &report.containers {
        let r = &e.recommendation;
        let c = e.current;
        rows.push(vec![
            if r.namespace.is_empty() {
                "-".into()
            } else {
                r.namespace.clone()
            },
            r.pod.clone(),
            r.container.clone(),
            r.samples.to_string(),
            pair(
                cores(c.and_then(|c| c.cpu_request_cores)),
                cores(c.and_then(|c| c.cpu_limit_cores)),
            ),
            cores(Some(r.cpu_p90_cores)),
            cores(Some(r.cpu_target_cores)),
            signed_cores(e.cpu_diff_cores),
            pair(
                bytes(c.and_then(|c| c.memory_request_bytes)),
                bytes(c.and_then(|c| c.memory_limit_bytes)),
            ),
            bytes(Some(r.memory_peak_bytes)),
            bytes(Some(r.memory_target_bytes)),
            signed_bytes(e.memory_diff_bytes),
            r.oom_kills.to_string(),
        ]);
        let who = format!("{}/{}/{}", r.namespace, r.pod, r.container);
        if let Some(floor) = r.jvm_floor_bytes {
            notes.push(format!(
                "{who}: runs a JVM: memory kept at or above {} for its configured heap and overhead",
                bytes(Some(floor))
            ));
        }
        if let Some(err) = &e.jvm_error {
            notes.push(format!(
                "{who}: runs a JVM whose options do not parse ({err}): no JVM floor"
            ));
        }
        if r.oom_kills > 0 {
            notes.push(format!(
                "{who}: OOM-killed {} time(s): memory raised above what it was killed at",
                r.oom_kills
            ));
        }
        if e.current.is_none() {
            notes.push(format!(
                "{who}: not running now (history kept for the retention period)"
            ));
        }
    }
    let mut out = columns(&rows);
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }
    let _ = writeln!(
        out,
        "\nCPU in cores (m = millicores), memory in MiB/GiB; REC is the recommended request, DIFF is REC minus the current request (or limit). Requests/limits from {}.",
        match report
            .containers
            .iter()
            .find_map(|e| e.current.map(|c| c.source))
        {
            Some(CurrentSource::PodSpec) => "the pod specs",
            _ => "the containers' cgroups (limits only: requests need the Kubernetes API)",
        }
    );
    out
}

/// The node shape advice as `ragent recommend --node` prints it.
pub fn render_node(report: &Report) -> String {
    let s = &report.node_shape;
    let a = &s.advice;
    let money = |p: f64| match &s.currency {
        Some(c) => format!("{p:.3} {c}/h"),
        None => format!("{p:.3}/h"),
    };
    let mut out = String::new();
    let _ = writeln!(out, "node {}", report.node);
    let _ = writeln!(
        out,
        "containers' recommended requests with headroom: {} cores, {}",
        cores(Some(a.needed_cpu_cores)),
        bytes(Some(a.needed_memory_bytes))
    );
    match &s.capacity {
        Some(c) => {
            let _ = writeln!(
                out,
                "capacity: {} cores, {} (from the {})",
                cores(Some(c.cpu_cores)),
                bytes(Some(c.memory_bytes)),
                match c.source {
                    CapacitySource::Node => "Node object",
                    CapacitySource::Machine => "machine",
                }
            );
        }
        None => {
            let _ = writeln!(out, "capacity: unknown");
        }
    }
    match &a.current {
        Some(t) => {
            let _ = writeln!(
                out,
                "current shape: {} ({} vCPU, {}, {})",
                t.name,
                t.vcpu,
                bytes(Some(t.memory_bytes)),
                money(t.hourly_price)
            );
        }
        None => {
            let _ = writeln!(out, "current shape: no catalog entry matches the capacity");
        }
    }
    match &a.recommended {
        Some(t) => {
            let _ = writeln!(
                out,
                "recommended shape: {} ({} vCPU, {}, {})",
                t.name,
                t.vcpu,
                bytes(Some(t.memory_bytes)),
                money(t.hourly_price)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "recommended shape: none in the catalog is big enough; add larger shapes"
            );
        }
    }
    if let Some(p) = a.saving_percent {
        let _ = writeln!(out, "saving: {p:.1} %");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rightsizing::{InstanceType, Reason};
    use std::time::{Duration, UNIX_EPOCH};

    fn t(s: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(1_700_000_000.0 + s)
    }

    fn key(c: &str) -> ContainerKey {
        ContainerKey::new("shop", "web-1", c)
    }

    fn reading(c: &str, cgroup: &str, at: f64, cpu: f64, ws: u64) -> Reading {
        Reading {
            key: key(c),
            cgroup: cgroup.into(),
            at: t(at),
            cpu_seconds: Some(cpu),
            working_set_bytes: Some(ws),
        }
    }

    #[test]
    fn cpu_is_the_rate_between_two_readings_of_one_cgroup() {
        let mut f = Feed::default();
        assert!(
            f.samples(&[reading("web", "/a", 0.0, 10.0, 100)])
                .is_empty()
        );
        let s = f.samples(&[reading("web", "/a", 2.0, 11.0, 200)]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, key("web"));
        assert!((s[0].1.cpu_cores - 0.5).abs() < 1e-12);
        assert_eq!(s[0].1.memory_bytes, 200);
        assert_eq!(s[0].1.at, t(2.0));
        // A restart: a new cgroup primes again, the old one is forgotten.
        assert!(f.samples(&[reading("web", "/b", 3.0, 0.1, 50)]).is_empty());
        let s = f.samples(&[reading("web", "/b", 4.0, 0.35, 60)]);
        assert!((s[0].1.cpu_cores - 0.25).abs() < 1e-12);
        // A counter that goes back under the same path primes again.
        assert!(f.samples(&[reading("web", "/b", 5.0, 0.1, 60)]).is_empty());
        // No time between readings, or a reading without a working set: no sample.
        assert!(f.samples(&[reading("web", "/b", 5.0, 0.2, 60)]).is_empty());
        let mut r = reading("web", "/b", 6.0, 0.3, 0);
        r.working_set_bytes = None;
        assert!(f.samples(&[r]).is_empty());
        // Two containers are independent.
        let mut f = Feed::default();
        f.samples(&[
            reading("web", "/a", 0.0, 0.0, 1),
            reading("side", "/s", 0.0, 0.0, 1),
        ]);
        let s = f.samples(&[
            reading("web", "/a", 1.0, 1.0, 1),
            reading("side", "/s", 1.0, 0.1, 1),
        ]);
        assert_eq!(s.len(), 2);
        assert!((s[1].1.cpu_cores - 0.1).abs() < 1e-12);
    }

    #[test]
    fn oom_kills_are_counted_once_across_agent_restarts() {
        let mut f = Feed::default();
        // A fresh agent: a kill before it started is news.
        assert_eq!(
            f.new_oom_kills(&[(key("web"), 1)], |_| 0),
            vec![(key("web"), 1)]
        );
        assert!(f.new_oom_kills(&[(key("web"), 1)], |_| 0).is_empty());
        assert_eq!(
            f.new_oom_kills(&[(key("web"), 3)], |_| 0),
            vec![(key("web"), 2)]
        );
        // The series was dropped and came back from 0.
        assert!(f.new_oom_kills(&[(key("web"), 0)], |_| 0).is_empty());
        assert_eq!(
            f.new_oom_kills(&[(key("web"), 1)], |_| 0),
            vec![(key("web"), 1)]
        );
        // After a restart, kills already in the restored history are not counted again.
        let mut f = Feed::default();
        assert!(f.new_oom_kills(&[(key("web"), 2)], |_| 2).is_empty());
        assert_eq!(
            f.new_oom_kills(&[(key("web"), 3)], |_| 2),
            vec![(key("web"), 1)]
        );
    }

    #[test]
    fn jvm_buildpacks_are_recognised_and_others_are_not() {
        let bp = |id: &str| {
            vec![BuildpackRef {
                id: id.into(),
                version: "1".into(),
            }]
        };
        for id in [
            "paketo-buildpacks/bellsoft-liberica",
            "paketo-buildpacks/executable-jar",
            "paketo-buildpacks/microsoft-openjdk",
            "heroku/java",
            "heroku/jvm",
            "ragent-samples/jre",
            "paketo-buildpacks/amazon-corretto",
            "paketo-buildpacks/sap-machine",
            "io.buildpacks.java",
        ] {
            assert!(runs_jvm(&bp(id)), "{id}");
        }
        for id in [
            "paketo-buildpacks/python",
            "ragent-samples/cpython",
            "heroku/nodejs",
            "paketo-buildpacks/javascript-ish",
            "paketo-buildpacks/go",
        ] {
            assert!(!runs_jvm(&bp(id)), "{id}");
        }
        assert!(!runs_jvm(&[]));
    }

    fn recommendation() -> ContainerRecommendation {
        ContainerRecommendation {
            namespace: "shop".into(),
            pod: "web-1".into(),
            container: "web".into(),
            samples: 40,
            history_seconds: 39.0,
            cpu_target_cores: 0.588,
            cpu_lower_cores: 0.2,
            cpu_upper_cores: 5.0,
            memory_target_bytes: 300 << 20,
            memory_lower_bytes: 100 << 20,
            memory_upper_bytes: 3000 << 20,
            memory_peak_bytes: 210 << 20,
            oom_kills: 1,
            cpu_p50_cores: 0.5,
            cpu_p90_cores: 0.511,
            cpu_p95_cores: 0.511,
            memory_p50_bytes: 210 << 20,
            memory_p90_bytes: 210 << 20,
            memory_p95_bytes: 210 << 20,
            jvm_floor_bytes: Some(660 << 20),
            reasons: vec![Reason::OomKill, Reason::ShortHistory],
        }
    }

    #[test]
    fn differences_are_against_the_request_else_the_limit() {
        let spec = Resources {
            cpu_request_cores: Some(1.0),
            cpu_limit_cores: Some(2.0),
            memory_request_bytes: None,
            memory_limit_bytes: Some(512 << 20),
        };
        let e = entry(
            recommendation(),
            Some("Deployment/web".into()),
            None,
            Some(Current::of(Some(spec), Some(9.0), Some(1))),
            None,
        );
        let c = e.current.expect("current");
        assert_eq!(c.source, CurrentSource::PodSpec);
        assert_eq!(e.cpu_diff_cores, Some(-0.412));
        assert_eq!(e.memory_diff_bytes, Some((300 << 20) - (512 << 20)));
        // Offline: the cgroup's limits, no requests.
        let e = entry(
            recommendation(),
            None,
            None,
            Some(Current::of(None, Some(0.5), None)),
            None,
        );
        let c = e.current.expect("current");
        assert_eq!(c.source, CurrentSource::Cgroup);
        assert_eq!((c.cpu_request_cores, c.cpu_limit_cores), (None, Some(0.5)));
        assert_eq!(e.cpu_diff_cores, Some(0.088));
        assert_eq!(e.memory_diff_bytes, None);
        // Gone: no current, no difference.
        let e = entry(recommendation(), None, None, None, None);
        assert_eq!((e.cpu_diff_cores, e.memory_diff_bytes), (None, None));
    }

    fn report(entries: Vec<Entry>) -> Report {
        let shape = |name: &str, vcpu, gib: u64, price| InstanceType {
            name: name.into(),
            vcpu,
            memory_bytes: gib << 30,
            hourly_price: price,
        };
        Report {
            node: "node-a".into(),
            generated_at_ms: 1,
            sample_interval_seconds: 15.0,
            containers: entries,
            node_shape: NodeShape {
                advice: ShapeAdvice {
                    needed_cpu_cores: 1.35,
                    needed_memory_bytes: 6 << 30,
                    recommended: Some(shape("general-2x8", 2, 8, 0.09)),
                    current: Some(shape("general-4x16", 4, 16, 0.18)),
                    saving_percent: Some(50.0),
                },
                capacity: Some(Capacity {
                    cpu_cores: 4.0,
                    memory_bytes: 16 << 30,
                    source: CapacitySource::Machine,
                }),
                currency: Some("USD".into()),
            },
        }
    }

    #[test]
    fn the_report_reads_back_and_prints_every_container_and_note() {
        let e = entry(
            recommendation(),
            Some("Deployment/web".into()),
            Some("registry.example/web:v1".into()),
            Some(Current::of(None, Some(0.5), Some(512 << 20))),
            None,
        );
        let r = report(vec![e]);
        let json = serde_json::to_value(&r).expect("json");
        // The field names are flat on each container.
        let c = &json["containers"][0];
        for f in [
            "namespace",
            "pod",
            "container",
            "samples",
            "cpu_target_cores",
            "cpu_lower_cores",
            "cpu_upper_cores",
            "memory_target_bytes",
            "memory_lower_bytes",
            "memory_upper_bytes",
            "memory_peak_bytes",
            "oom_kills",
        ] {
            assert!(!c[f].is_null(), "{f} missing in {c}");
        }
        assert_eq!(json["node_shape"]["recommended"]["name"], "general-2x8");
        assert_eq!(json["node_shape"]["saving_percent"], 50.0);
        let back: Report = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, r);

        let table = render_table(&r);
        let row = table
            .lines()
            .find(|l| l.starts_with("shop"))
            .expect("a row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "shop",
                "web-1",
                "web",
                "40",
                "-/500m",
                "511m",
                "588m",
                "+88m",
                "-/512.0Mi",
                "210.0Mi",
                "300.0Mi",
                "-212.0Mi",
                "1"
            ]
        );
        assert!(table.contains("runs a JVM: memory kept at or above 660.0Mi"));
        assert!(table.contains("OOM-killed 1 time(s)"));
        assert!(table.contains("cgroups (limits only"));

        let node = render_node(&r);
        assert!(node.contains("recommended shape: general-2x8 (2 vCPU, 8.00Gi, 0.090 USD/h)"));
        assert!(node.contains("current shape: general-4x16"));
        assert!(node.contains("saving: 50.0 %"));
        assert!(node.contains("(from the machine)"));

        assert!(render_table(&report(Vec::new())).starts_with("no recommendations yet"));
    }
}
