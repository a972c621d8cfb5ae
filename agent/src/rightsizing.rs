//! Right-sizing in the agent: every sampling interval the cgroupfs readings of the node's
//! containers (from [`crate::insight`]) become samples of the pure [`Recommender`]; OOM kills
//! come from the same ledger as `ragent_container_oom_kills_total`; what each container asks for
//! comes from its pod spec (Kubernetes adapter) or its cgroup; JVM options from its image
//! (inventory). The history is checkpointed to disk atomically and restored at start.
//!
//! Serves [`Report`]s (`GET /api/v1/recommendations`) and the recommendation metrics.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use tracing::{info, warn};

use crate::{
    config::RightsizingSettings,
    core::{
        pods::Index,
        rightsizing::{
            ContainerKey, ContainerRecommendation, Recommender, RightsizingError, advise_shape,
            jvm_memory_from_env, unix_ms,
        },
        usage::{Capacity, CapacitySource, Current, Feed, NodeShape, Reading, Report, entry},
        workloads::Workload,
    },
    insight::Usage,
    metrics::RightsizingMetrics,
};

/// The checkpoint's file name in the checkpoint directory.
pub const CHECKPOINT_FILE: &str = "recommender.ckpt";

/// What the report says of a container besides its recommendation (from the last round that
/// saw it running).
#[derive(Debug, Clone, Default)]
struct Known {
    workload: Option<String>,
    image: Option<String>,
    current: Option<Current>,
    jvm_error: Option<String>,
}

/// The agent's right-sizing state.
pub struct Rightsizing {
    settings: RightsizingSettings,
    recommender: Recommender,
    feed: Feed,
    known: HashMap<ContainerKey, Known>,
    /// Containers running in the last round (the node advice sums these).
    live: HashSet<ContainerKey>,
    metrics: RightsizingMetrics,
    /// Label sets of the exported recommendation series (namespace, pod, container, workload).
    series: BTreeSet<[String; 4]>,
    /// The labels of the node shape series (recommended, current).
    shape_labels: Option<[String; 2]>,
    node: String,
    node_capacity: Arc<RwLock<Option<(f64, u64)>>>,
    machine_capacity: Option<(f64, u64)>,
}

fn key_of(w: &Workload) -> ContainerKey {
    ContainerKey::new(&w.namespace, &w.pod, &w.container)
}

impl Rightsizing {
    /// Restores the checkpoint of `settings.checkpoint_dir` (a missing one is a first start; an
    /// unreadable or corrupt one is reported, kept aside as `<file>.bad` and history starts
    /// afresh).
    pub fn start(
        settings: RightsizingSettings,
        metrics: RightsizingMetrics,
        node: String,
        node_capacity: Arc<RwLock<Option<(f64, u64)>>>,
    ) -> Result<Rightsizing, RightsizingError> {
        let path = settings.checkpoint_dir.join(CHECKPOINT_FILE);
        let now = SystemTime::now();
        let fresh = || Recommender::new(settings.model.clone());
        let recommender = match std::fs::read(&path) {
            Ok(bytes) => match Recommender::restore(settings.model.clone(), &bytes, now) {
                Ok(r) => {
                    info!(path = %path.display(), containers = r.len(), "right-sizing history restored");
                    r
                }
                Err(e) => {
                    metrics
                        .checkpoint_errors
                        .with_label_values(&[e.metric_label()])
                        .inc();
                    let aside = path.with_extension("ckpt.bad");
                    let kept = std::fs::rename(&path, &aside).is_ok();
                    warn!(
                        path = %path.display(),
                        error = %e,
                        kept_as = %if kept { aside.display().to_string() } else { "-".into() },
                        "the right-sizing checkpoint cannot be used"
                    );
                    fresh()?
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                info!(path = %path.display(), "no right-sizing checkpoint yet: history starts now");
                fresh()?
            }
            Err(e) => {
                metrics.checkpoint_errors.with_label_values(&["read"]).inc();
                warn!(path = %path.display(), error = %e, "cannot read the right-sizing checkpoint; history starts afresh (check the directory's permissions)");
                fresh()?
            }
        };
        metrics.containers.set(recommender.len() as i64);
        Ok(Rightsizing {
            settings,
            recommender,
            feed: Feed::default(),
            known: HashMap::new(),
            live: HashSet::new(),
            metrics,
            series: BTreeSet::new(),
            shape_labels: None,
            node,
            node_capacity,
            machine_capacity: crate::adapters::procfs::machine_capacity(),
        })
    }

    pub fn settings(&self) -> &RightsizingSettings {
        &self.settings
    }

    /// One sampling round: `usage` from the last cgroupfs refresh, `ooms` the running OOM kill
    /// totals per container, `pods` this node's pods from the API (when the Kubernetes adapter
    /// runs), `jvm_env` an image's JVM option variables when it runs a JVM.
    pub fn round(
        &mut self,
        usage: &[Usage],
        ooms: &[(Workload, u64)],
        pods: Option<&Index>,
        jvm_env: impl Fn(&str) -> Option<Vec<String>>,
    ) {
        let now = SystemTime::now();
        let readings: Vec<Reading> = usage
            .iter()
            .filter(|u| !u.workload.sandbox)
            .map(|u| Reading {
                key: key_of(&u.workload),
                cgroup: u.cgroup.clone(),
                at: u.at,
                cpu_seconds: u.cpu_seconds,
                working_set_bytes: u.working_set_bytes,
            })
            .collect();
        self.live = readings.iter().map(|r| r.key.clone()).collect();
        // What each running container asks for and runs.
        for u in usage.iter().filter(|u| !u.workload.sandbox) {
            let key = key_of(&u.workload);
            let pod = pods.and_then(|ix| ix.by_name(&u.workload.namespace, &u.workload.pod));
            let spec = pod.map(|p| {
                p.resources
                    .iter()
                    .find(|(c, _)| *c == u.workload.container)
                    .map(|(_, r)| *r)
                    .unwrap_or_default()
            });
            let current = Current::of(spec, u.cpu_limit_cores, u.memory_limit_bytes);
            let (jvm, jvm_error) = match u.image.as_deref().and_then(&jvm_env) {
                None => (None, None),
                Some(env) => match jvm_memory_from_env(&env) {
                    Ok(m) => (m, None),
                    Err(e) => (None, Some(e.to_string())),
                },
            };
            self.recommender
                .describe(&key, current.memory_limit_bytes, jvm);
            self.known.insert(
                key,
                Known {
                    workload: pod.and_then(|p| p.workload.clone()),
                    image: u.image.clone(),
                    current: Some(current),
                    jvm_error,
                },
            );
        }
        let samples = self.feed.samples(&readings);
        for (key, sample) in &samples {
            self.recommender.observe(key, sample);
        }
        self.metrics.samples.inc_by(samples.len() as u64);
        let totals: Vec<(ContainerKey, u64)> = ooms
            .iter()
            .filter(|(w, _)| !w.sandbox)
            .map(|(w, n)| (key_of(w), *n))
            .collect();
        let recommender = &self.recommender;
        let new = self
            .feed
            .new_oom_kills(&totals, |k| recommender.get(k).map_or(0, |s| s.oom_kills()));
        for (key, n) in new {
            warn!(namespace = %key.namespace, pod = %key.pod, container = %key.container, kills = n, "OOM kill: its memory recommendation is raised");
            for _ in 0..n {
                self.recommender.observe_oom(&key, now, None);
            }
        }
        self.recommender.expire(now);
        // Keep what the report says only of containers running or with history.
        let (live, recommender) = (&self.live, &self.recommender);
        self.known
            .retain(|k, _| live.contains(k) || recommender.get(k).is_some());
        // A container not running keeps its history, not its current requests.
        for (k, v) in self.known.iter_mut() {
            if !self.live.contains(k) {
                v.current = None;
            }
        }
        self.export();
    }

    fn export(&mut self) {
        let recs = self.recommender.recommendations();
        self.metrics.containers.set(self.recommender.len() as i64);
        let mut now = BTreeSet::new();
        for r in &recs {
            let workload = self
                .known
                .get(&ContainerKey::new(&r.namespace, &r.pod, &r.container))
                .and_then(|k| k.workload.clone())
                .unwrap_or_default();
            let labels = [
                r.namespace.clone(),
                r.pod.clone(),
                r.container.clone(),
                workload,
            ];
            for (bound, cpu, memory) in [
                ("target", r.cpu_target_cores, r.memory_target_bytes),
                ("lower", r.cpu_lower_cores, r.memory_lower_bytes),
                ("upper", r.cpu_upper_cores, r.memory_upper_bytes),
            ] {
                let l = [
                    labels[0].as_str(),
                    labels[1].as_str(),
                    labels[2].as_str(),
                    labels[3].as_str(),
                    bound,
                ];
                self.metrics.cpu.with_label_values(&l).set(cpu);
                self.metrics.memory.with_label_values(&l).set(memory as f64);
            }
            now.insert(labels);
        }
        for gone in self.series.difference(&now) {
            for bound in ["target", "lower", "upper"] {
                let l = [
                    gone[0].as_str(),
                    gone[1].as_str(),
                    gone[2].as_str(),
                    gone[3].as_str(),
                    bound,
                ];
                let _ = self.metrics.cpu.remove_label_values(&l);
                let _ = self.metrics.memory.remove_label_values(&l);
            }
        }
        self.series = now;
        let shape = self.node_shape(&recs);
        let labels = shape.advice.recommended.as_ref().map(|r| {
            let current = shape
                .advice
                .current
                .as_ref()
                .map_or("", |c| c.name.as_str());
            [r.name.clone(), current.to_string()]
        });
        // Replace the series only when the shapes change: a scrape never sees none.
        if labels != self.shape_labels {
            if let Some(old) = &self.shape_labels {
                let _ = self
                    .metrics
                    .node_shape
                    .remove_label_values(&[old[0].as_str(), old[1].as_str()]);
            }
            if let Some(new) = &labels {
                self.metrics
                    .node_shape
                    .with_label_values(&[new[0].as_str(), new[1].as_str()])
                    .set(1);
            }
            self.shape_labels = labels;
        }
        match shape.advice.saving_percent {
            Some(p) => self
                .metrics
                .node_saving
                .with_label_values::<&str>(&[])
                .set(p / 100.0),
            // Absent rather than a made-up 0.
            None => self.metrics.node_saving.reset(),
        }
    }

    fn capacity(&self) -> Option<Capacity> {
        let from_node = match self.node_capacity.read() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        match (from_node, self.machine_capacity) {
            (Some((c, m)), _) => Some(Capacity {
                cpu_cores: c,
                memory_bytes: m,
                source: CapacitySource::Node,
            }),
            (None, Some((c, m))) => Some(Capacity {
                cpu_cores: c,
                memory_bytes: m,
                source: CapacitySource::Machine,
            }),
            (None, None) => None,
        }
    }

    /// The shape advice for the containers running now.
    fn node_shape(&self, recs: &[ContainerRecommendation]) -> NodeShape {
        let running: Vec<ContainerRecommendation> = recs
            .iter()
            .filter(|r| {
                self.live
                    .contains(&ContainerKey::new(&r.namespace, &r.pod, &r.container))
            })
            .cloned()
            .collect();
        let capacity = self.capacity();
        NodeShape {
            advice: advise_shape(
                &self.settings.catalog,
                &running,
                &self.settings.headroom,
                capacity.map(|c| (c.cpu_cores, c.memory_bytes)),
            ),
            capacity,
            currency: self.settings.catalog.currency.clone(),
        }
    }

    /// The report `GET /api/v1/recommendations` serves.
    pub fn report(&self) -> Report {
        let recs = self.recommender.recommendations();
        let node_shape = self.node_shape(&recs);
        let containers = recs
            .into_iter()
            .map(|r| {
                let k = self
                    .known
                    .get(&ContainerKey::new(&r.namespace, &r.pod, &r.container))
                    .cloned()
                    .unwrap_or_default();
                entry(r, k.workload, k.image, k.current, k.jvm_error)
            })
            .collect();
        Report {
            node: self.node.clone(),
            generated_at_ms: unix_ms(SystemTime::now()),
            sample_interval_seconds: self.settings.sample_interval.as_secs_f64(),
            containers,
            node_shape,
        }
    }

    /// The checkpoint bytes of now (written by [`write_checkpoint`] off the lock).
    pub fn checkpoint_bytes(&self) -> Vec<u8> {
        self.recommender.checkpoint(SystemTime::now())
    }

    /// Records the outcome of a checkpoint write.
    pub fn checkpoint_written(&self, result: &std::io::Result<()>) {
        match result {
            Ok(()) => self
                .metrics
                .checkpoint_time
                .set(unix_ms(SystemTime::now()) as f64 / 1000.0),
            Err(e) => {
                self.metrics
                    .checkpoint_errors
                    .with_label_values(&["write"])
                    .inc();
                warn!(dir = %self.settings.checkpoint_dir.display(), error = %e, "cannot write the right-sizing checkpoint; history is kept in memory (give --checkpoint-dir a writable directory)");
            }
        }
    }
}

/// Writes `bytes` as `dir/recommender.ckpt`: into a temporary file in the same directory,
/// flushed to disk, then renamed over the old one (and the directory synced), so a crash
/// leaves the old checkpoint or the new one, never half of one.
pub fn write_checkpoint(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join(CHECKPOINT_FILE);
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rightsizing::{Catalog, Headroom, RightsizingConfig};
    use std::time::Duration;

    fn settings(dir: &Path) -> RightsizingSettings {
        RightsizingSettings {
            sample_interval: Duration::from_secs(1),
            checkpoint_dir: dir.to_path_buf(),
            checkpoint_interval: Duration::from_secs(60),
            catalog: Catalog::parse(crate::config::BUILTIN_CATALOG).expect("catalog"),
            catalog_source: "built-in".into(),
            model: RightsizingConfig::default(),
            headroom: Headroom::default(),
        }
    }

    fn metrics() -> RightsizingMetrics {
        RightsizingMetrics::new(&prometheus::Registry::new()).expect("metrics")
    }

    fn usage(container: &str, at: SystemTime, cpu: f64, ws: u64, image: Option<&str>) -> Usage {
        Usage {
            workload: Workload {
                namespace: "shop".into(),
                pod: "web-1".into(),
                container: container.into(),
                sandbox: false,
            },
            container_id: format!("id-{container}"),
            cgroup: format!("/kubepods/id-{container}"),
            image: image.map(str::to_string),
            at,
            cpu_seconds: Some(cpu),
            working_set_bytes: Some(ws),
            memory_limit_bytes: Some(256 << 20),
            cpu_limit_cores: Some(0.5),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ragent-rs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn start(d: &Path, m: RightsizingMetrics) -> Rightsizing {
        Rightsizing::start(settings(d), m, "node-a".into(), Arc::new(RwLock::new(None)))
            .expect("start")
    }

    #[test]
    fn rounds_become_recommendations_that_survive_a_checkpoint() {
        let d = dir("roundtrip");
        let m = metrics();
        let mut rs = start(&d, m.clone());
        let t0 = SystemTime::now() - Duration::from_secs(10);
        let jvm = |image: &str| {
            (image == "jvm:v1").then(|| vec!["JAVA_TOOL_OPTIONS=-Xmx384m".to_string()])
        };
        for i in 0..5u64 {
            let at = t0 + Duration::from_secs(i);
            rs.round(
                &[
                    usage("web", at, 0.5 * i as f64, 100 << 20, Some("jvm:v1")),
                    usage("side", at, 0.1 * i as f64, 30 << 20, Some("py:v1")),
                ],
                &[],
                None,
                jvm,
            );
        }
        let report = rs.report();
        assert_eq!(report.containers.len(), 2);
        let web = report
            .containers
            .iter()
            .find(|e| e.recommendation.container == "web")
            .expect("web");
        assert_eq!(web.recommendation.samples, 4);
        assert!(web.recommendation.jvm_floor_bytes.is_some());
        assert!(
            web.recommendation.memory_target_bytes >= web.recommendation.jvm_floor_bytes.unwrap()
        );
        let current = web.current.expect("running");
        assert_eq!(current.cpu_limit_cores, Some(0.5));
        assert_eq!(web.image.as_deref(), Some("jvm:v1"));
        let side = report
            .containers
            .iter()
            .find(|e| e.recommendation.container == "side")
            .expect("side");
        assert_eq!(side.recommendation.jvm_floor_bytes, None);
        assert!(report.node_shape.capacity.is_some());
        assert!(report.node_shape.advice.recommended.is_some());

        // An OOM kill raises memory; a second round with the same total does not count again.
        rs.round(
            &[],
            &[(usage("web", t0, 0.0, 0, None).workload, 1)],
            None,
            jvm,
        );
        rs.round(
            &[],
            &[(usage("web", t0, 0.0, 0, None).workload, 1)],
            None,
            jvm,
        );
        let web = rs
            .report()
            .containers
            .into_iter()
            .find(|e| e.recommendation.container == "web")
            .expect("web");
        assert_eq!(web.recommendation.oom_kills, 1);
        // Gone from the round: kept, without current requests.
        assert!(web.current.is_none());

        let text = {
            let r = prometheus::Registry::new();
            r.register(Box::new(m.cpu.clone())).expect("register");
            let mut buf = Vec::new();
            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf)
                .expect("encode");
            String::from_utf8(buf).expect("utf8")
        };
        assert!(
            text.contains(r#"ragent_recommendation_cpu_cores{bound="target",container="web",namespace="shop",pod="web-1",workload=""}"#),
            "{text}"
        );

        let bytes = rs.checkpoint_bytes();
        write_checkpoint(&d, &bytes).expect("write");
        assert!(!d.join(format!("{CHECKPOINT_FILE}.tmp")).exists());
        let rs2 = start(&d, metrics());
        let web2 = rs2
            .recommender
            .get(&ContainerKey::new("shop", "web-1", "web"))
            .expect("restored");
        assert_eq!(web2.samples(), 4);
        assert_eq!(web2.oom_kills(), 1);
        // The restored kill is not counted again when the ledger reports it after a restart.
        let mut rs2 = rs2;
        rs2.round(
            &[],
            &[(usage("web", t0, 0.0, 0, None).workload, 1)],
            None,
            jvm,
        );
        let web2 = rs2
            .recommender
            .get(&ContainerKey::new("shop", "web-1", "web"))
            .expect("kept");
        assert_eq!(web2.oom_kills(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_checkpoint_is_reported_kept_aside_and_history_starts_afresh() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).expect("dir");
        let mut rs = start(&d, metrics());
        let at = SystemTime::now();
        rs.round(&[usage("web", at, 1.0, 1 << 20, None)], &[], None, |_| None);
        rs.round(
            &[usage(
                "web",
                at + Duration::from_secs(1),
                1.5,
                1 << 20,
                None,
            )],
            &[],
            None,
            |_| None,
        );
        let mut bytes = rs.checkpoint_bytes();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        std::fs::write(d.join(CHECKPOINT_FILE), &bytes).expect("write");
        let m = metrics();
        let rs = start(&d, m.clone());
        assert!(rs.recommender.is_empty());
        assert_eq!(
            m.checkpoint_errors
                .with_label_values(&["checksum_mismatch"])
                .get(),
            1
        );
        assert!(d.join("recommender.ckpt.bad").exists());
        assert!(!d.join(CHECKPOINT_FILE).exists());
        // A directory where the checkpoint should be: a read error, still a start.
        std::fs::create_dir_all(d.join(CHECKPOINT_FILE)).expect("dir");
        let m = metrics();
        let rs = start(&d, m.clone());
        assert!(rs.recommender.is_empty());
        assert_eq!(m.checkpoint_errors.with_label_values(&["read"]).get(), 1);
        // Writing over a directory fails, and says so.
        let e = write_checkpoint(&d, b"x");
        assert!(e.is_err());
        rs.checkpoint_written(&e);
        assert_eq!(m.checkpoint_errors.with_label_values(&["write"]).get(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
