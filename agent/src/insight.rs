//! Node insight: network, CPU, memory, run-queue wait and OOM kills per pod and container, and
//! pull traffic per image and registry.
//!
//! Joins three sources through the pure core ([`crate::core::workloads`],
//! [`crate::core::pulls`]): the kernel's per-cgroup counters ([`crate::adapters::kernel`]),
//! cgroupfs ([`crate::adapters::cgroupfs`]) and containerd's container, image and content
//! records. Without eBPF (a kernel or node that lacks something) the cgroupfs figures are still
//! served and what is missing is said in `/readyz` and `ragent_ebpf_feature_available`.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ragent_ebpf::NetCounters;
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        cgroupfs::{self, CgroupLayout},
        containerd::{ContainerRecord, Containerd},
        kernel::{Endpoint, Feature, FeatureStatus, Kernel, KernelOptions, Probe},
    },
    core::{
        pulls::{self, UNATTRIBUTED, Windows},
        workloads::{Gauges, Ledger, Owner, PodKey, Workload, container_in_path},
    },
    metrics::{self, InsightMetrics},
};

/// How long a registry must be quiet before its traffic window is attributed.
pub const PULL_QUIET: Duration = Duration::from_secs(2);
/// The longest window (a registry that never rests is attributed window by window).
pub const PULL_WINDOW_MAX: Duration = Duration::from_secs(600);
/// How far around a window its blobs are looked for: before the first reading, one reading
/// interval (plus scheduling); after the last, the gap to containerd's commit.
pub const PULL_SLACK: pulls::Slack = pulls::Slack {
    lead_ms: 750,
    lag_ms: 2_000,
};
/// Distinct registry label values; more endpoints are counted under `other`.
pub const MAX_REGISTRIES: usize = 32;
/// How often the cgroup tree is walked (to retire what is gone and as a safety net for the
/// kernel's record of new cgroups).
pub const WALK_EVERY: Duration = Duration::from_secs(30);
/// How often the pull traffic is read.
pub const PULL_TICK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct InsightOptions {
    /// Load the eBPF programs (`--no-ebpf` turns them off).
    pub ebpf: bool,
    /// Where to attach (`--cgroup-root`; None: the detected cgroup2 mount).
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub tracefs: PathBuf,
    /// Series of pods, containers and images that are gone are removed after this long.
    pub grace: Duration,
}

/// One cgroupfs reading of a container, for right-sizing.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub workload: Workload,
    pub container_id: String,
    /// The cgroup's path: a restarted container has a new one (its CPU counter starts again).
    pub cgroup: String,
    pub image: Option<String>,
    pub at: SystemTime,
    pub cpu_seconds: Option<f64>,
    pub working_set_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub cpu_limit_cores: Option<f64>,
}

/// Everything the insight part of the agent keeps.
pub struct Insight {
    metrics: InsightMetrics,
    kernel: Option<Kernel>,
    features: Vec<FeatureStatus>,
    probe: Probe,
    layout: Option<CgroupLayout>,
    grace_s: u64,
    started: Instant,
    containerd: Option<Containerd>,
    /// cgroup id -> path relative to the cgroup2 mount (live ones from a walk, short-lived ones
    /// from the kernel's cgroup_mkdir record), with when it was last seen.
    paths: HashMap<u64, (String, u64)>,
    /// container id -> who it is, with when it was last seen.
    containers: HashMap<String, (Workload, u64)>,
    /// container id -> the image it runs (from containerd's records).
    container_images: HashMap<String, String>,
    /// The last cgroupfs reading of every live container (for right-sizing).
    usage: Vec<Usage>,
    /// This node's pods from the Kubernetes API (when the kube adapter runs): names the
    /// containers containerd's records do not (no CRI labels, or no record any more).
    pods: Option<std::sync::Arc<std::sync::RwLock<crate::core::pods::Index>>>,
    /// Where the agent's cgroup namespace root is in the mounted tree (`/`: the host's
    /// namespace); None when the tree does not show it.
    ns_root: Option<String>,
    /// The cgroups of the processes that pull: containerd's and the agent's own.
    watched: HashMap<u64, Owner>,
    pod_bytes: Ledger<(PodKey, &'static str)>,
    pod_packets: Ledger<(PodKey, &'static str)>,
    owner_bytes: Ledger<(Owner, &'static str)>,
    cpu_us: Ledger<Workload>,
    runq_ns: Ledger<Workload>,
    ooms: Ledger<Workload>,
    memory: Gauges<Workload>,
    // Pull traffic.
    endpoint_last: HashMap<Endpoint, NetCounters>,
    connect_last: HashMap<Endpoint, u64>,
    /// Remote endpoints the pullers connected to (so servers they answer are not registries).
    outbound: HashSet<(IpAddr, u16)>,
    /// Endpoint -> registry host, from the references of the node's images.
    registry_names: HashMap<(IpAddr, u16), String>,
    registry_labels: BTreeSet<String>,
    registry_bytes: Ledger<(String, &'static str)>,
    registry_connects: Ledger<String>,
    windows: Windows,
    image_pull: Ledger<(String, String)>,
    /// Image names present in the store (their pull series stay while they do).
    present_images: BTreeSet<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The ledger source of one direction of a cgroup's counters (a source has one reading).
fn directed(cgroup: u64, dir: &str) -> u64 {
    (cgroup << 1) | u64::from(dir == "egress")
}

/// A stable source id for a cgroup path (cgroupfs readings on nodes without cgroup2 ids).
fn path_source(rel: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rel.hash(&mut h);
    h.finish()
}

impl Insight {
    /// Probes the node and loads what it allows. Never fails: what is missing is recorded.
    pub fn start(opts: &InsightOptions, metrics: InsightMetrics) -> Insight {
        let layout = match cgroupfs::detect() {
            Ok(l) => {
                info!(mode = ?l.mode, unified = ?l.unified, "cgroup layout");
                Some(l)
            }
            Err(e) => {
                warn!(error = %e, "cannot read the cgroup layout; container CPU and memory are not available");
                None
            }
        };
        // The cgroup2 directory the network programs attach to (`--cgroup-root` or detected).
        let root = layout
            .as_ref()
            .ok_or_else(|| "the cgroup layout could not be read".to_string())
            .and_then(|l| {
                cgroupfs::resolve_root(opts.cgroup_root.as_deref(), l).map_err(|e| e.to_string())
            });
        let cgroup2 = root.is_ok();
        let (kernel, probe, features) = if opts.ebpf {
            match root {
                Ok(cgroup_root) => Kernel::load(&KernelOptions {
                    cgroup_root,
                    bpffs: opts.bpffs.clone(),
                    tracefs: opts.tracefs.clone(),
                }),
                Err(why) => {
                    // The tracepoint features do not need a cgroup2 root; try them alone.
                    let (k, p, mut f) = Kernel::load(&KernelOptions {
                        cgroup_root: PathBuf::from("/nonexistent-cgroup2-root"),
                        bpffs: opts.bpffs.clone(),
                        tracefs: opts.tracefs.clone(),
                    });
                    for s in f.iter_mut().filter(|s| {
                        matches!(
                            s.feature,
                            Feature::Net | Feature::Endpoints | Feature::Connect
                        )
                    }) {
                        s.available = false;
                        s.detail = why.clone();
                    }
                    (k, p, f)
                }
            }
        } else {
            let f = Feature::ALL
                .iter()
                .map(|&feature| FeatureStatus {
                    feature,
                    available: false,
                    detail: "eBPF is turned off (--no-ebpf / ebpf = false)".into(),
                })
                .collect();
            (None, Probe::default(), f)
        };
        for s in &features {
            metrics
                .ebpf_feature
                .with_label_values(&[s.feature.as_str()])
                .set(i64::from(s.available));
            if s.available {
                info!(feature = s.feature.as_str(), "eBPF feature loaded");
            } else {
                warn!(feature = s.feature.as_str(), detail = %s.detail, "eBPF feature unavailable");
            }
        }
        for note in &probe.notes {
            info!(note = %note, "kernel probe");
        }
        for (cap, ok) in [
            ("btf", probe.btf),
            ("bpffs", probe.bpffs.is_some()),
            ("tracefs", probe.tracefs.is_some()),
            ("cgroup2", cgroup2),
        ] {
            metrics
                .kernel_capability
                .with_label_values(&[cap])
                .set(i64::from(ok));
        }
        let mut insight = Insight {
            metrics,
            kernel,
            features,
            probe,
            layout,
            grace_s: opts.grace.as_secs().max(1),
            started: Instant::now(),
            containerd: None,
            paths: HashMap::new(),
            containers: HashMap::new(),
            container_images: HashMap::new(),
            ns_root: Some("/".into()),
            usage: Vec::new(),
            pods: None,
            watched: HashMap::new(),
            pod_bytes: Ledger::default(),
            pod_packets: Ledger::default(),
            owner_bytes: Ledger::default(),
            cpu_us: Ledger::default(),
            runq_ns: Ledger::default(),
            ooms: Ledger::default(),
            memory: Gauges::default(),
            endpoint_last: HashMap::new(),
            connect_last: HashMap::new(),
            outbound: HashSet::new(),
            registry_names: HashMap::new(),
            registry_labels: BTreeSet::new(),
            registry_bytes: Ledger::default(),
            registry_connects: Ledger::default(),
            windows: Windows::new(
                PULL_QUIET.as_millis() as u64,
                PULL_WINDOW_MAX.as_millis() as u64,
            ),
            image_pull: Ledger::default(),
            present_images: BTreeSet::new(),
        };
        // The agent's own pulls: its cgroup, unless that is the root (then it would count
        // every process of the node that has no cgroup of its own).
        if let Some(u) = insight.cgroup2_root() {
            insight.ns_root = cgroupfs::namespace_root(&u);
            match insight.ns_root.as_deref() {
                Some("/") => {}
                Some(root) => {
                    info!(
                        root,
                        "the agent runs in a cgroup namespace rooted here: other processes' cgroups are resolved from it"
                    )
                }
                None => warn!(
                    "the agent runs in a cgroup namespace and its cgroup2 mount shows only that namespace: containerd's cgroup cannot be found, so its registry traffic is not split out (mount the host's cgroup2 tree)"
                ),
            }
        }
        match insight.path_of_pid("self").as_deref() {
            Some("/") | None => info!(
                "the agent runs in the root cgroup: its own registry traffic is not measured per registry"
            ),
            Some(_) => {
                if let Some(id) = insight.cgroup_of_pid("self") {
                    insight.watch(id, Owner::Ragent);
                }
            }
        }
        insight
    }

    pub fn programs(&self) -> usize {
        self.kernel.as_ref().map_or(0, Kernel::programs)
    }

    /// One line per missing feature, for `/readyz`.
    pub fn degraded(&self) -> Vec<String> {
        self.features
            .iter()
            .filter(|s| !s.available)
            .map(|s| format!("degraded: {}: {}", s.feature.as_str(), s.detail))
            .collect()
    }

    /// What the kernel probe found or had to do (mounts), for the log and `/readyz`.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The cgroup2 mount, which the agent walks every [`WALK_EVERY`].
    pub fn cgroup2_root(&self) -> Option<PathBuf> {
        self.layout.as_ref()?.unified.clone()
    }

    /// Whether every refresh must walk the tree itself: without the kernel's record of new
    /// cgroups, a container that started since the last walk would not be found.
    pub fn walks_on_scrape(&self) -> bool {
        !self.available(Feature::CgroupPaths)
    }

    fn available(&self, f: Feature) -> bool {
        self.features.iter().any(|s| s.feature == f && s.available)
    }

    fn now_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The cgroup id of a process (`self` or a pid), on the cgroup2 mount.
    /// A process's cgroup as a path in the whole mounted tree (resolved through the agent's
    /// cgroup namespace, so it works from a pod's private namespace).
    fn path_of_pid(&self, pid: &str) -> Option<String> {
        cgroupfs::resolve_ns_path(self.ns_root.as_deref()?, &cgroupfs::process_cgroup(pid)?)
    }

    fn cgroup_of_pid(&self, pid: &str) -> Option<u64> {
        let unified = self.layout.as_ref()?.unified.as_ref()?;
        let rel = self.path_of_pid(pid)?;
        cgroupfs::cgroup_id(&unified.join(rel.trim_start_matches('/'))).ok()
    }

    fn watch(&mut self, id: u64, owner: Owner) {
        if self.watched.get(&id) == Some(&owner) {
            return;
        }
        // containerd and the agent may share a cgroup (one service): containerd's name wins.
        if self.watched.get(&id) == Some(&Owner::Containerd) {
            return;
        }
        self.watched.insert(id, owner);
        if let Some(k) = self.kernel.as_mut()
            && let Err(e) = k.watch_cgroup(id)
        {
            warn!(error = %e, cgroup = id, "cannot watch the pullers' cgroup; registry bytes will miss it");
        }
        info!(
            cgroup = id,
            owner = owner.as_str(),
            "watching the registry traffic of this cgroup"
        );
    }

    /// A (re)connected containerd: remember the client and watch its cgroup.
    pub async fn connected(&mut self, c: &Containerd) {
        self.containerd = Some(c.clone());
        match c.server_pid().await {
            Some(pid) => match self.cgroup_of_pid(&pid.to_string()) {
                Some(id) => {
                    if self.path_of_pid(&pid.to_string()).as_deref() == Some("/") {
                        warn!(
                            pid,
                            "containerd runs in the root cgroup: outbound traffic of other processes there counts as registry traffic; run it in a service cgroup"
                        );
                    }
                    // A restarted containerd may sit elsewhere: forget the old one.
                    let old: Vec<u64> = self
                        .watched
                        .iter()
                        .filter(|(i, o)| **o == Owner::Containerd && **i != id)
                        .map(|(i, _)| *i)
                        .collect();
                    for i in old {
                        self.watched.remove(&i);
                        if let Some(k) = self.kernel.as_mut() {
                            let _ = k.unwatch_cgroup(i);
                        }
                    }
                    self.watch(id, Owner::Containerd);
                }
                None => warn!(
                    pid,
                    "cannot find containerd's cgroup; registry bytes of its pulls are not measured"
                ),
            },
            None => warn!(
                "cannot learn containerd's pid from its socket; registry bytes of its pulls are not measured"
            ),
        }
    }

    /// The container records containerd has now (from the agent's watch).
    pub fn set_containers(&mut self, records: &[ContainerRecord]) {
        let now = self.now_s();
        for r in records {
            let w = self.named(&r.id, Workload::from_labels(&r.id, &r.labels));
            self.containers.insert(r.id.clone(), (w, now));
            if !r.image.is_empty() {
                self.container_images.insert(r.id.clone(), r.image.clone());
            }
        }
    }

    /// Names containers through this node's pods from the Kubernetes API.
    pub fn set_pod_index(
        &mut self,
        pods: std::sync::Arc<std::sync::RwLock<crate::core::pods::Index>>,
    ) {
        self.pods = Some(pods);
    }

    /// `w`, or the pod index's name for the container when `w` has no Kubernetes identity.
    fn named(&self, id: &str, w: Workload) -> Workload {
        if !w.namespace.is_empty() {
            return w;
        }
        let from_api = self.pods.as_ref().and_then(|p| match p.read() {
            Ok(ix) => ix.workload(id),
            Err(poisoned) => poisoned.into_inner().workload(id),
        });
        from_api.unwrap_or(w)
    }

    /// The images in the store (their series stay while they do) and the addresses their
    /// registries resolve to (from [`resolve_registries`], called without the insight lock).
    pub fn set_images(&mut self, names: Vec<String>, resolved: HashMap<(IpAddr, u16), String>) {
        self.present_images = names.into_iter().collect();
        self.registry_names.extend(resolved);
    }

    /// The label of a remote endpoint: its registry, else `addr:port`, bounded.
    fn registry_label(&mut self, addr: IpAddr, port: u16) -> String {
        let name = self
            .registry_names
            .get(&(addr, port))
            .cloned()
            .unwrap_or_else(|| match addr {
                IpAddr::V4(a) => format!("{a}:{port}"),
                IpAddr::V6(a) => format!("[{a}]:{port}"),
            });
        if self.registry_labels.contains(&name) {
            return name;
        }
        if self.registry_labels.len() < MAX_REGISTRIES {
            self.registry_labels.insert(name.clone());
            return name;
        }
        "other".into()
    }

    /// Who a cgroup is: a container's workload, or an owner of the rest of the node.
    async fn owner_of(&mut self, id: u64) -> Result<Workload, Owner> {
        // A puller in the root cgroup (no service cgroup) shares it with everything else.
        let is_root = self.paths.get(&id).is_some_and(|(p, _)| p == "/");
        if let Some(o) = self.watched.get(&id)
            && !is_root
        {
            return Err(*o);
        }
        let Some(cid) = self
            .paths
            .get(&id)
            .and_then(|(p, _)| container_in_path(p, |id| self.containers.contains_key(id)))
            .map(str::to_string)
        else {
            return Err(Owner::Other);
        };
        Ok(self.workload_of(&cid).await)
    }

    async fn workload_of(&mut self, cid: &str) -> Workload {
        let now = self.now_s();
        if let Some((w, seen)) = self.containers.get_mut(cid) {
            *seen = now;
            return w.clone();
        }
        // Not listed yet (it started and stopped between two lists): ask containerd once.
        let w = match &self.containerd {
            Some(c) => match c.get_container(cid).await {
                Ok(Some(r)) => Workload::from_labels(&r.id, &r.labels),
                _ => Workload::unknown(cid),
            },
            None => Workload::unknown(cid),
        };
        let w = self.named(cid, w);
        self.containers.insert(cid.to_string(), (w.clone(), now));
        w
    }

    /// Brings every per-pod and per-container series up to date (at scrape time). Returns the
    /// node's totals (every socket, gone cgroups and map overflow included) and the overflow.
    ///
    /// `walked` is a walk of the cgroup2 tree made just before (by the agent's periodic walk, off
    /// the scrape path); rounds with a walk also retire what is gone. Without the kernel's record
    /// of new cgroups, every refresh walks.
    pub async fn refresh(
        &mut self,
        walked: Option<HashMap<u64, String>>,
    ) -> Option<(NetCounters, NetCounters)> {
        let now = self.now_s();
        // 1. The live cgroups (walk first, read after: an entry retired below was already dead
        //    when the maps were read, so its last count is in).
        //    The kernel names new cgroups as they are made, so the tree is walked only every
        //    WALK_EVERY (to retire what is gone), or at every refresh when that record is missing.
        let live = match (walked, self.cgroup2_root()) {
            (Some(w), _) => Some(w),
            (None, Some(u)) if self.walks_on_scrape() => Some(cgroupfs::walk(&u)),
            _ => None,
        };
        for (id, path) in live.iter().flatten() {
            self.paths.insert(*id, (path.clone(), now));
        }
        // 2. The kernel's counters.
        let snap = match self.kernel.as_mut().map(Kernel::read) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                warn!(error = %e, "reading the eBPF maps failed");
                None
            }
            None => None,
        };
        if let Some(snap) = &snap {
            for (id, path) in &snap.cgroup_paths {
                self.paths.entry(*id).or_insert_with(|| (path.clone(), now));
            }
            for (id, c) in &snap.net.by_cgroup {
                match self.owner_of(*id).await {
                    Ok(w) => {
                        let pod = w.pod_key();
                        for (dir, bytes, packets) in [
                            ("ingress", c.rx_bytes, c.rx_packets),
                            ("egress", c.tx_bytes, c.tx_packets),
                        ] {
                            // One reading per source: each direction is its own source.
                            let src = directed(*id, dir);
                            self.pod_bytes.observe(src, &(pod.clone(), dir), bytes, now);
                            self.pod_packets
                                .observe(src, &(pod.clone(), dir), packets, now);
                            self.owner_bytes
                                .observe(src, &(Owner::Pods, dir), bytes, now);
                        }
                    }
                    Err(owner) => {
                        for (dir, bytes) in [("ingress", c.rx_bytes), ("egress", c.tx_bytes)] {
                            self.owner_bytes
                                .observe(directed(*id, dir), &(owner, dir), bytes, now);
                        }
                    }
                }
            }
            for (id, ns) in &snap.runq_ns {
                if let Ok(w) = self.owner_of(*id).await
                    && !w.sandbox
                {
                    self.runq_ns.observe(*id, &w, *ns, now);
                }
            }
            for (id, n) in &snap.oom_kills {
                if let Ok(w) = self.owner_of(*id).await
                    && !w.sandbox
                {
                    self.ooms.observe(*id, &w, *n, now);
                }
            }
            // Node totals include retired cgroups and overflow: exact even then.
            let m = &self.metrics;
            for s in &snap.maps {
                m.map_entries
                    .with_label_values(&[s.name])
                    .set(i64::try_from(s.entries).unwrap_or(i64::MAX));
                m.map_capacity
                    .with_label_values(&[s.name])
                    .set(i64::from(s.capacity));
                metrics::advance_to(&m.map_overflow.with_label_values(&[s.name]), s.overflow);
            }
        }
        // 3. cgroupfs: CPU and memory of every live container.
        if let Some(layout) = self.layout.clone() {
            let known: HashMap<u64, String> = match &live {
                Some(l) => l.clone(),
                None => self
                    .paths
                    .iter()
                    .map(|(id, (p, _))| (*id, p.clone()))
                    .collect(),
            };
            let containers = container_dirs(&layout, &known, |id| self.containers.contains_key(id));
            let oom_from_cgroupfs = !self.available(Feature::Oom);
            self.usage.clear();
            for (rel, cid) in containers {
                let w = self.workload_of(&cid).await;
                if w.sandbox {
                    continue;
                }
                let s = cgroupfs::read_stats(&layout, &rel);
                let src = path_source(&rel);
                // Every live container has its OOM series (0 until a kill) and, when the
                // scheduler feature runs, its run-queue series: dashboards and alerts see 0,
                // not "no data".
                self.ooms.add(&w, 0, now);
                if self.available(Feature::Sched) {
                    self.runq_ns.add(&w, 0, now);
                }
                if let Some(cpu) = s.cpu_seconds {
                    self.cpu_us.observe(src, &w, (cpu * 1e6) as u64, now);
                }
                if let Some(ws) = s.working_set_bytes {
                    self.memory.set(&w, ws, now);
                }
                if oom_from_cgroupfs && let Some(n) = s.oom_kills {
                    self.ooms.observe(src, &w, n, now);
                }
                // A cgroup that is gone (its path is kept for the series grace) has no
                // readings: it is not a running container.
                if s.cpu_seconds.is_none() && s.working_set_bytes.is_none() {
                    continue;
                }
                self.usage.push(Usage {
                    image: self.container_images.get(&cid).cloned(),
                    workload: w,
                    container_id: cid,
                    cgroup: rel,
                    at: SystemTime::now(),
                    cpu_seconds: s.cpu_seconds,
                    working_set_bytes: s.working_set_bytes,
                    memory_limit_bytes: s.memory_limit_bytes,
                    cpu_limit_cores: s.cpu_limit_cores,
                });
            }
        }
        // 4. Retire what is gone (on the rounds that walked the tree).
        if let Some(k) = self.kernel.as_mut()
            && let Some(live) = &live
        {
            // cgroup ids only grow: an id above every live one was created after the walk
            // (and is alive), so it is kept; the others not in the walk were gone before the
            // maps were read, and their last counts are in.
            let max_live = live.keys().max().copied().unwrap_or(0);
            let mut ids: HashSet<u64> = live.keys().copied().collect();
            ids.extend(self.watched.keys().copied());
            if let Some(snap) = &snap {
                ids.extend(
                    snap.net
                        .by_cgroup
                        .keys()
                        .chain(snap.runq_ns.keys())
                        .chain(snap.oom_kills.keys())
                        .filter(|id| **id > max_live)
                        .copied(),
                );
            }
            match k.retire_dead(&ids) {
                Ok(n) if n > 0 => debug!(retired = n, "eBPF entries of gone cgroups retired"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "retiring eBPF entries failed"),
            }
        }
        if let Some(k) = self.kernel.as_mut()
            && let Some(snap) = &snap
            && !snap.cgroup_paths.is_empty()
        {
            let consumed: Vec<u64> = snap.cgroup_paths.keys().copied().collect();
            if let Err(e) = k.forget_paths(&consumed) {
                debug!(error = %e, "cannot clear consumed cgroup paths");
            }
        }
        let grace = self.grace_s;
        self.paths
            .retain(|_, (_, seen)| now.saturating_sub(*seen) <= grace);
        self.containers
            .retain(|_, (_, seen)| now.saturating_sub(*seen) <= grace);
        let containers = &self.containers;
        self.container_images
            .retain(|id, _| containers.contains_key(id));
        // Pull series of images still in the store stay; the unattributed ones stay too.
        let keep: Vec<(String, String)> = self
            .image_pull
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|(image, _)| image == UNATTRIBUTED || self.present_images.contains(image))
            .collect();
        for k in keep {
            self.image_pull.touch(&k, now);
        }
        self.export(now);
        snap.map(|s| (s.net.total(), s.net.overflow))
    }

    /// The cgroupfs readings of the last [`Insight::refresh`], one per live container.
    pub fn usage(&self) -> &[Usage] {
        &self.usage
    }

    /// OOM kills so far per container (a ledger: never goes back while the series lives).
    pub fn oom_kills(&self) -> Vec<(Workload, u64)> {
        self.ooms.iter().map(|(w, n)| (w.clone(), n)).collect()
    }

    /// The image of a container, by id.
    pub fn image_of(&self, container_id: &str) -> Option<&str> {
        self.container_images.get(container_id).map(String::as_str)
    }

    /// Reads the pullers' registry traffic and attributes closed windows (every [`PULL_TICK`]).
    pub async fn pull_tick(&mut self) {
        let now = self.now_s();
        let now_ms = now_ms();
        let Some(k) = self.kernel.as_mut() else {
            return;
        };
        let (endpoints, connects) = match k.read_pullers() {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "reading the endpoint maps failed");
                return;
            }
        };
        for (ep, n) in &connects {
            if !self.watched.contains_key(&ep.cgroup) {
                continue;
            }
            self.outbound.insert((ep.addr, ep.port));
            let last = self.connect_last.insert(*ep, *n).unwrap_or(0);
            let label = self.registry_label(ep.addr, ep.port);
            self.registry_connects
                .add(&label, n.saturating_sub(last), now);
        }
        for (ep, c) in &endpoints {
            if !self.watched.contains_key(&ep.cgroup)
                || !self.outbound.contains(&(ep.addr, ep.port))
            {
                continue;
            }
            let last = self.endpoint_last.insert(*ep, *c).unwrap_or_default();
            let rx = c.rx_bytes.saturating_sub(last.rx_bytes);
            let tx = c.tx_bytes.saturating_sub(last.tx_bytes);
            if rx == 0 && tx == 0 {
                continue;
            }
            let label = self.registry_label(ep.addr, ep.port);
            self.registry_bytes
                .add(&(label.clone(), "ingress"), rx, now);
            self.registry_bytes.add(&(label.clone(), "egress"), tx, now);
            self.windows.traffic(&label, rx, now_ms);
        }
        let closed = self.windows.close_due(now_ms);
        if closed.is_empty() {
            return;
        }
        let listing = match &self.containerd {
            Some(c) => match (c.list_content().await, c.list_image_infos().await) {
                (Ok(b), Ok(i)) => Some((b, i)),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(error = %e, "cannot list content to attribute pull traffic; counted as unattributed");
                    None
                }
            },
            None => None,
        };
        for mut w in closed {
            if let Some((blobs, _)) = &listing {
                self.name_window(&mut w, blobs).await;
            }
            let a = match &listing {
                Some((blobs, images)) => {
                    pulls::attribute(&w, blobs, images, PULL_SLACK, &BTreeSet::new())
                }
                None => pulls::Attribution {
                    unattributed: w.bytes,
                    ..Default::default()
                },
            };
            info!(
                registry = %w.registry,
                wire_bytes = w.bytes,
                blob_bytes = a.blob_bytes,
                images = a.images.len(),
                unattributed = a.unattributed,
                "pull traffic attributed"
            );
            for (image, bytes) in &a.images {
                self.image_pull
                    .add(&(image.clone(), w.registry.clone()), *bytes, now);
            }
            self.image_pull.add(
                &(UNATTRIBUTED.to_string(), w.registry.clone()),
                a.unattributed,
                now,
            );
        }
        self.export(now);
    }

    /// A window labelled by address (the registry's images were not in the store yet when its
    /// traffic started) is renamed after the registry its blobs came from, when that registry
    /// resolves to the address; later traffic then carries the name.
    async fn name_window(&mut self, w: &mut pulls::Window, blobs: &[pulls::BlobInfo]) {
        let Ok(addr) = w.registry.parse::<std::net::SocketAddr>() else {
            return;
        };
        let slack = PULL_SLACK;
        let hosts: BTreeSet<&str> = blobs
            .iter()
            .filter(|b| {
                b.created_ms + slack.lead_ms >= w.start_ms
                    && b.created_ms <= w.last_ms + slack.lag_ms
            })
            .flat_map(|b| b.labels.keys())
            .filter_map(|k| k.strip_prefix(pulls::DISTRIBUTION_SOURCE))
            .collect();
        // The labels name the host without the port: the window's port completes it.
        for host in hosts {
            let Ok(Ok(mut addrs)) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::lookup_host((host, addr.port())),
            )
            .await
            else {
                continue;
            };
            if addrs.any(|a| a.ip() == addr.ip()) {
                let name = if addr.port() == 443 {
                    host.to_string()
                } else if host.contains(':') {
                    format!("[{host}]:{}", addr.port())
                } else {
                    format!("{host}:{}", addr.port())
                };
                if name != w.registry {
                    self.registry_names
                        .insert((addr.ip(), addr.port()), name.clone());
                    w.registry = name;
                }
                return;
            }
        }
    }

    /// Writes the ledgers into the Prometheus series and drops expired ones.
    fn export(&mut self, now: u64) {
        let grace = self.grace_s;
        let m = &self.metrics;
        for ((pod, dir), v) in self.pod_bytes.iter() {
            metrics::advance_to(
                &m.pod_net_bytes.with_label_values(&[
                    pod.namespace.as_str(),
                    pod.pod.as_str(),
                    dir,
                ]),
                v,
            );
        }
        for ((pod, dir), v) in self.pod_packets.iter() {
            metrics::advance_to(
                &m.pod_net_packets.with_label_values(&[
                    pod.namespace.as_str(),
                    pod.pod.as_str(),
                    dir,
                ]),
                v,
            );
        }
        for ((owner, dir), v) in self.owner_bytes.iter() {
            metrics::advance_to(
                &m.owner_net_bytes.with_label_values(&[owner.as_str(), dir]),
                v,
            );
        }
        let labels = |w: &Workload| [w.namespace.clone(), w.pod.clone(), w.container.clone()];
        for (w, us) in self.cpu_us.iter() {
            let l = labels(w);
            metrics::advance_to_f64(
                &m.container_cpu
                    .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str()]),
                us as f64 / 1e6,
            );
        }
        for (w, ns) in self.runq_ns.iter() {
            let l = labels(w);
            metrics::advance_to_f64(
                &m.container_runq
                    .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str()]),
                ns as f64 / 1e9,
            );
        }
        for (w, n) in self.ooms.iter() {
            let l = labels(w);
            metrics::advance_to(
                &m.container_oom
                    .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str()]),
                n,
            );
        }
        for (w, b) in self.memory.iter() {
            let l = labels(w);
            m.container_memory
                .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str()])
                .set(i64::try_from(b).unwrap_or(i64::MAX));
        }
        for ((reg, dir), v) in self.registry_bytes.iter() {
            metrics::advance_to(&m.registry_bytes.with_label_values(&[reg.as_str(), dir]), v);
        }
        for (reg, v) in self.registry_connects.iter() {
            metrics::advance_to(
                &m.registry_connections.with_label_values(&[reg.as_str()]),
                v,
            );
        }
        for ((image, reg), v) in self.image_pull.iter() {
            metrics::advance_to(
                &m.image_pull_bytes
                    .with_label_values(&[image.as_str(), reg.as_str()]),
                v,
            );
        }
        // Gone pods, containers and images: their series go after the grace period.
        for (pod, dir) in self.pod_bytes.expire(now, grace) {
            let _ = m.pod_net_bytes.remove_label_values(&[
                pod.namespace.as_str(),
                pod.pod.as_str(),
                dir,
            ]);
        }
        for (pod, dir) in self.pod_packets.expire(now, grace) {
            let _ = m.pod_net_packets.remove_label_values(&[
                pod.namespace.as_str(),
                pod.pod.as_str(),
                dir,
            ]);
        }
        for (ledger, vec) in [
            (&mut self.cpu_us, &m.container_cpu),
            (&mut self.runq_ns, &m.container_runq),
        ] {
            for w in ledger.expire(now, grace) {
                let _ = vec.remove_label_values(&[
                    w.namespace.as_str(),
                    w.pod.as_str(),
                    w.container.as_str(),
                ]);
            }
        }
        for w in self.ooms.expire(now, grace) {
            let _ = m.container_oom.remove_label_values(&[
                w.namespace.as_str(),
                w.pod.as_str(),
                w.container.as_str(),
            ]);
        }
        for w in self.memory.expire(now, grace) {
            let _ = m.container_memory.remove_label_values(&[
                w.namespace.as_str(),
                w.pod.as_str(),
                w.container.as_str(),
            ]);
        }
        for (image, reg) in self.image_pull.expire(now, grace) {
            let _ = m
                .image_pull_bytes
                .remove_label_values(&[image.as_str(), reg.as_str()]);
        }
        // Owner and registry series are bounded by construction and stay.
    }
}

/// The addresses the registries of `names` (image references) resolve to, for naming the
/// endpoints the pullers talk to. Each lookup is bounded (2 s); one that fails is skipped.
pub async fn resolve_registries(names: &[String]) -> HashMap<(IpAddr, u16), String> {
    let hosts: BTreeSet<&str> = names
        .iter()
        .filter(|n| !n.starts_with("sha256:"))
        .map(|n| pulls::registry_of(n))
        .collect();
    let mut out = HashMap::new();
    for host in hosts {
        let target = if host == "docker.io" {
            "registry-1.docker.io:443".to_string()
        } else if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:443")
        };
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(target)).await {
            Ok(Ok(addrs)) => {
                for a in addrs {
                    out.insert((a.ip(), a.port()), host.to_string());
                }
            }
            _ => debug!(registry = %host, "cannot resolve the registry"),
        }
    }
    out
}

/// The container cgroups among the live ones: (relative path, container id). Without cgroup2
/// (a v1-only node) the memory (else cpuacct) hierarchy is walked instead.
fn container_dirs(
    layout: &CgroupLayout,
    live: &HashMap<u64, String>,
    known: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = if layout.unified.is_some() {
        live.values()
            .filter_map(|p| container_in_path(p, &known).map(|id| (p.clone(), id.to_string())))
            .collect()
    } else {
        layout
            .v1
            .get("memory")
            .or_else(|| layout.v1.get("cpuacct"))
            .map(|root| {
                cgroupfs::walk(root)
                    .into_values()
                    .filter_map(|p| {
                        container_in_path(&p, &known).map(|id| (p.clone(), id.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_cgroups_are_found_among_the_live_ones() {
        let id = "ab".repeat(32);
        let layout = CgroupLayout {
            mode: cgroupfs::CgroupMode::Hybrid,
            unified: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            v1: Default::default(),
        };
        let live = HashMap::from([
            (1, "/".to_string()),
            (2, "/k8s.io".to_string()),
            (3, format!("/k8s.io/{id}")),
            (4, "/system.slice/containerd.service".to_string()),
            (5, "/k8s.io/nightly-job".to_string()),
        ]);
        assert_eq!(
            container_dirs(&layout, &live, |_| false),
            vec![(format!("/k8s.io/{id}"), id.clone())]
        );
        // A container containerd knows under an id of its own choosing.
        assert_eq!(
            container_dirs(&layout, &live, |c| c == "nightly-job").len(),
            2
        );
    }
}
