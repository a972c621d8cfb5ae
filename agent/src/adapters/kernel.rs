//! The kernel: loading ragent's eBPF programs and reading their maps.
//!
//! [`Kernel::load`] loads one eBPF object (see `ebpf/src/main.rs`) and then each [`Feature`]
//! on its own: a feature whose programs the kernel refuses, whose tracepoint is missing or whose
//! tracepoint record layout differs from the one the programs read is reported unavailable with
//! a one-line reason; the others work. Nothing here panics or stops the agent.
//!
//! The cgroup programs attach at the cgroup2 root; the links are owned by [`Kernel`] and detached
//! when it is dropped.
mod batch;
mod probe;

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, Program, TracePoint,
    },
};
pub use probe::{FormatError, FormatField, Probe, check_layout, parse_format};
pub use ragent_ebpf::NetCounters;
use ragent_ebpf::{
    CGROUP_NET_MAX_ENTRIES, CGROUP_PATHS_MAX_ENTRIES, CONNECTS_MAX_ENTRIES, CgroupPath,
    ENDPOINT_NET_MAX_ENTRIES, EndpointKey, MAP_CGROUP_NET, MAP_CGROUP_PATHS, MAP_CONNECTS,
    MAP_ENDPOINT_NET, MAP_OOM_KILLS, MAP_OVERFLOW, MAP_RUNQ, MAP_VICTIMS, MAP_WAKE_TS, MAP_WATCH,
    MAP_WATCH_COUNT, OOM_KILLS_MAX_ENTRIES, Overflow, PROG_CONNECT4, PROG_CONNECT6, PROG_EGRESS,
    PROG_INGRESS, RUNQ_MAX_ENTRIES, TP_CGROUP_MKDIR, TP_OOM_MARK_VICTIM, TP_PROCESS_EXIT,
    TP_SCHED_SWITCH, TP_SCHED_WAKEUP, TP_SCHED_WAKEUP_NEW, Tracepoint, VICTIMS_MAX_ENTRIES,
    WAKE_TS_MAX_ENTRIES, WATCH_MAX_ENTRIES, WakeSlot,
};

/// The eBPF object built by agent/build.rs (empty when built with AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ragent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this ragent was built without its eBPF programs (AYA_BUILD_SKIP=1); rebuild it after `cargo xtask setup`"
    )]
    NotBuilt,
    #[error(
        "loading the eBPF object failed: {0}; ragent needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN or CAP_SYS_ADMIN)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot read the possible CPUs (/sys/devices/system/cpu/possible): {source}")]
    PossibleCpus {
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot watch cgroup {id}: {WATCH_MAX_ENTRIES} cgroups are watched already; unwatch one first"
    )]
    WatchFull { id: u64 },
}

impl KernelError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            KernelError::NotBuilt => "not_built",
            KernelError::Load(_) => "load",
            KernelError::Missing { .. } => "missing",
            KernelError::Program { .. } => "program",
            KernelError::Cgroup { .. } => "cgroup",
            KernelError::Map { .. } => "map",
            KernelError::PossibleCpus { .. } => "cpus",
            KernelError::WatchFull { .. } => "watch_full",
        }
    }
}

/// Where to attach and what to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// The cgroup2 mount (or a directory below it) the cgroup programs attach to.
    pub cgroup_root: PathBuf,
    /// Where bpffs is expected (default /sys/fs/bpf; only reported, ragent pins nothing).
    pub bpffs: PathBuf,
    /// Where tracefs is (default /sys/kernel/tracing; mounted there when missing).
    pub tracefs: PathBuf,
}

impl KernelOptions {
    pub fn new(cgroup_root: impl Into<PathBuf>) -> KernelOptions {
        KernelOptions {
            cgroup_root: cgroup_root.into(),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            tracefs: PathBuf::from("/sys/kernel/tracing"),
        }
    }
}

/// What ragent's eBPF side can measure; each loads on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// Bytes and packets per cgroup (cgroup_skb at the cgroup2 root).
    Net,
    /// Bytes and packets per remote endpoint of watched cgroups (the same programs).
    Endpoints,
    /// connect() calls per destination of watched cgroups (cgroup sock_addr).
    Connect,
    /// Time runnable tasks wait for a CPU, per cgroup (sched tracepoints).
    Sched,
    /// OOM kills per cgroup (oom/mark_victim + sched/sched_process_exit).
    Oom,
    /// Paths of new cgroup2 directories (cgroup/cgroup_mkdir).
    CgroupPaths,
}

impl Feature {
    pub const ALL: [Feature; 6] = [
        Feature::Net,
        Feature::Endpoints,
        Feature::Connect,
        Feature::Sched,
        Feature::Oom,
        Feature::CgroupPaths,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Net => "net",
            Feature::Endpoints => "endpoints",
            Feature::Connect => "connect",
            Feature::Sched => "sched",
            Feature::Oom => "oom",
            Feature::CgroupPaths => "cgroup_paths",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStatus {
    pub feature: Feature,
    pub available: bool,
    /// When unavailable: what is missing and what to do, one line. Empty when available.
    pub detail: String,
}

/// A remote endpoint of a watched cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub cgroup: u64,
    /// IPv4 shown as IPv4 (not v4-mapped IPv6).
    pub addr: IpAddr,
    pub port: u16,
}

impl From<&EndpointKey> for Endpoint {
    fn from(k: &EndpointKey) -> Endpoint {
        let v6 = Ipv6Addr::from(k.addr);
        Endpoint {
            cgroup: k.cgroup,
            addr: v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            port: k.port,
        }
    }
}

/// How full one map is.
#[derive(Clone, Debug, Default)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
    /// Inserts that failed because the map was full (for CGROUP_NET: packets).
    pub overflow: u64,
}

/// The network part of a read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetSnapshot {
    pub by_cgroup: BTreeMap<u64, NetCounters>,
    /// Traffic of cgroups that found the map full, by direction.
    pub overflow: NetCounters,
    /// Traffic of cgroups that are gone (their entries were retired).
    pub retired: NetCounters,
}

impl NetSnapshot {
    /// Everything the programs saw: live cgroups, retired ones and overflow.
    pub fn total(&self) -> NetCounters {
        self.by_cgroup
            .values()
            .fold(self.overflow.add(&self.retired), |acc, c| acc.add(c))
    }
}

/// One read of every map.
#[derive(Clone, Debug, Default)]
pub struct KernelSnapshot {
    pub net: NetSnapshot,
    pub endpoints: BTreeMap<Endpoint, NetCounters>,
    pub connects: BTreeMap<Endpoint, u64>,
    /// Nanoseconds tasks of each cgroup waited runnable for a CPU.
    pub runq_ns: BTreeMap<u64, u64>,
    pub oom_kills: BTreeMap<u64, u64>,
    /// Path relative to the cgroup2 root, e.g. "/k8s.io/<id>", of cgroups created since load.
    pub cgroup_paths: BTreeMap<u64, String>,
    pub maps: Vec<MapFill>,
}

/// The loaded programs and their maps.
pub struct Kernel {
    // Keeps programs and links alive.
    _ebpf: Ebpf,
    programs: usize,
    net: PerCpuHashMap<MapData, u64, NetCounters>,
    overflow: PerCpuArray<MapData, u64>,
    watch: HashMap<MapData, u64, u8>,
    /// How many cgroups `watch` holds, for the packet path (0: it skips the `WATCH` lookup).
    watch_count: Array<MapData, u32>,
    endpoints: PerCpuHashMap<MapData, EndpointKey, NetCounters>,
    connects: PerCpuHashMap<MapData, EndpointKey, u64>,
    wake_ts: Array<MapData, WakeSlot>,
    runq: PerCpuHashMap<MapData, u64, u64>,
    victims: HashMap<MapData, u32, u8>,
    oom_kills: PerCpuHashMap<MapData, u64, u64>,
    paths: HashMap<MapData, u64, CgroupPath>,
    /// Possible CPUs (the number of values of a per-CPU map entry).
    cpus: usize,
    /// Reads the programs' aya-log records (rare: a map's first overflow) into the agent's log.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// What cgroups that are gone had counted before their CGROUP_NET entries were deleted.
    retired: NetCounters,
    /// Cgroups the last read returned something for: only their entries may be retired (so a
    /// short-lived cgroup is read at least once before its entries go).
    seen: HashSet<u64>,
}

/// A program load error on one line: the verifier's output is many lines; keep its verdict
/// (the line before "verification time") and log the whole at debug level.
fn refused(name: &str, e: &aya::programs::ProgramError) -> String {
    let full = super::error_chain(e);
    if !full.contains('\n') {
        return format!("{name}: the kernel refused it: {full}");
    }
    tracing::debug!(program = name, verifier = %full, "program refused");
    let lines: Vec<&str> = full.lines().collect();
    let verdict = lines
        .iter()
        .position(|l| l.starts_with("verification time"))
        .and_then(|i| i.checked_sub(1))
        .map_or("", |i| lines[i]);
    format!(
        "{name}: the kernel's verifier refused it ({}: {verdict}); run with RUST_LOG=debug for its output",
        lines[0]
            .split(". Verifier output")
            .next()
            .unwrap_or(lines[0])
    )
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    ebpf.take_map(name)
        .ok_or(KernelError::Missing { what: "map", name })?
        .try_into()
        .map_err(|source| KernelError::Map { name, source })
}

/// Unloads (and so detaches) a program; used to undo a feature that attached only in part.
fn unload(ebpf: &mut Ebpf, name: &str) {
    let r = match ebpf.program_mut(name) {
        Some(Program::CgroupSkb(p)) => p.unload(),
        Some(Program::CgroupSockAddr(p)) => p.unload(),
        Some(Program::TracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
    if let Err(e) = r {
        tracing::debug!(program = name, error = %e, "unloading a partly attached feature");
    }
}

fn attach_skb(ebpf: &mut Ebpf, cgroup: &File, name: &'static str) -> Result<(), String> {
    let kind = if name == PROG_INGRESS {
        CgroupSkbAttachType::Ingress
    } else {
        CgroupSkbAttachType::Egress
    };
    let prog: &mut CgroupSkb = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e| format!("{name}: {}", super::error_chain(&e)))?;
    prog.load().map_err(|e| refused(name, &e))?;
    // AllowMultiple fails with EINVAL here (environment.md); links stack with Single.
    prog.attach(cgroup, kind, CgroupAttachMode::Single)
        .map_err(|e| format!("{name}: attaching failed: {}", super::error_chain(&e)))?;
    Ok(())
}

fn attach_sock_addr(ebpf: &mut Ebpf, cgroup: &File, name: &'static str) -> Result<(), String> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e| format!("{name}: {}", super::error_chain(&e)))?;
    prog.load().map_err(|e| refused(name, &e))?;
    prog.attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| format!("{name}: attaching failed: {}", super::error_chain(&e)))?;
    Ok(())
}

fn attach_tracepoint(ebpf: &mut Ebpf, tracefs: &Path, tp: &Tracepoint) -> Result<(), String> {
    probe::verify_tracepoint(tracefs, tp)?;
    let prog: &mut TracePoint = ebpf
        .program_mut(tp.program)
        .ok_or_else(|| format!("the eBPF object has no program {}", tp.program))?
        .try_into()
        .map_err(|e| format!("{}: {}", tp.program, super::error_chain(&e)))?;
    prog.load().map_err(|e| refused(tp.program, &e))?;
    prog.attach(tp.category, tp.name).map_err(|e| {
        format!(
            "attaching to tracepoint {}/{} failed: {}",
            tp.category,
            tp.name,
            super::error_chain(&e)
        )
    })?;
    Ok(())
}

/// Attaches every program of one feature, or none: on a failure the ones attached are unloaded.
fn attach_all(
    ebpf: &mut Ebpf,
    names: &[&'static str],
    mut attach: impl FnMut(&mut Ebpf, &'static str) -> Result<(), String>,
) -> Result<usize, String> {
    for (i, name) in names.iter().enumerate() {
        if let Err(e) = attach(ebpf, name) {
            for done in &names[..=i] {
                unload(ebpf, done);
            }
            return Err(e);
        }
    }
    Ok(names.len())
}

fn status(feature: Feature, r: &Result<usize, String>) -> FeatureStatus {
    FeatureStatus {
        feature,
        available: r.is_ok(),
        detail: r.as_ref().err().cloned().unwrap_or_default(),
    }
}

impl Kernel {
    /// Never panics, never fails the agent: loads what this kernel allows, each feature
    /// independently. `None` when nothing could be attached (the statuses say why).
    pub fn load(opts: &KernelOptions) -> (Option<Kernel>, Probe, Vec<FeatureStatus>) {
        let probe = probe::probe(&opts.bpffs, &opts.tracefs);
        let all_off = |detail: String| -> Vec<FeatureStatus> {
            Feature::ALL
                .iter()
                .map(|&feature| FeatureStatus {
                    feature,
                    available: false,
                    detail: detail.clone(),
                })
                .collect()
        };
        if OBJECT.is_empty() {
            return (None, probe, all_off(KernelError::NotBuilt.to_string()));
        }
        let mut ebpf = match EbpfLoader::new().load(OBJECT) {
            Ok(e) => e,
            Err(e) => {
                let e = KernelError::Load(e);
                return (None, probe, all_off(super::error_chain(&e)));
            }
        };

        // cgroup programs: need the cgroup2 root.
        let cgroup = if !probe::is_cgroup2(&opts.cgroup_root) {
            Err(format!(
                "{} is not a cgroup2 directory; pass --cgroup-root with the cgroup2 mount (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)",
                opts.cgroup_root.display()
            ))
        } else {
            File::open(&opts.cgroup_root)
                .map_err(|e| format!("cannot open {}: {e}", opts.cgroup_root.display()))
        };
        let net = match &cgroup {
            Ok(fd) => attach_all(&mut ebpf, &[PROG_INGRESS, PROG_EGRESS], |b, n| {
                attach_skb(b, fd, n)
            }),
            Err(e) => Err(e.clone()),
        };
        let endpoints = match &net {
            Ok(_) => Ok(0),
            Err(e) => Err(format!("needs the net programs: {e}")),
        };
        let connect = match &cgroup {
            Ok(fd) => attach_all(&mut ebpf, &[PROG_CONNECT4, PROG_CONNECT6], |b, n| {
                attach_sock_addr(b, fd, n)
            }),
            Err(e) => Err(e.clone()),
        };

        // tracepoint programs: need tracefs (format files, and aya finds tracepoint ids there).
        let tracefs = probe.tracefs.clone().ok_or_else(|| {
            format!(
                "tracefs is not mounted and ragent could not mount it: mount -t tracefs tracefs {}",
                opts.tracefs.display()
            )
        });
        let tps = |ebpf: &mut Ebpf, list: &[Tracepoint]| -> Result<usize, String> {
            let dir = tracefs.as_ref().map_err(Clone::clone)?;
            let names: Vec<&'static str> = list.iter().map(|t| t.program).collect();
            attach_all(ebpf, &names, |b, n| {
                let tp = list
                    .iter()
                    .find(|t| t.program == n)
                    .ok_or_else(|| format!("no tracepoint for {n}"))?;
                attach_tracepoint(b, dir, tp)
            })
        };
        let sched = tps(
            &mut ebpf,
            &[TP_SCHED_WAKEUP, TP_SCHED_WAKEUP_NEW, TP_SCHED_SWITCH],
        );
        let oom = tps(&mut ebpf, &[TP_OOM_MARK_VICTIM, TP_PROCESS_EXIT]);
        let paths = tps(&mut ebpf, &[TP_CGROUP_MKDIR]);

        let statuses = vec![
            status(Feature::Net, &net),
            status(Feature::Endpoints, &endpoints),
            status(Feature::Connect, &connect),
            status(Feature::Sched, &sched),
            status(Feature::Oom, &oom),
            status(Feature::CgroupPaths, &paths),
        ];
        let programs: usize = [&net, &connect, &sched, &oom, &paths]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .sum();
        if programs == 0 {
            return (None, probe, statuses);
        }
        match Kernel::from_ebpf(ebpf, programs) {
            Ok(k) => (Some(k), probe, statuses),
            Err(e) => {
                let detail = super::error_chain(&e);
                (None, probe, all_off(detail))
            }
        }
    }

    fn from_ebpf(mut ebpf: Ebpf, programs: usize) -> Result<Kernel, KernelError> {
        // The `log` records go to the agent's tracing subscriber (tracing-log).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::info!(error = %e, "eBPF programs' log records will not be shown");
                None
            }
        };
        let cpus =
            aya::util::nr_cpus().map_err(|(_, source)| KernelError::PossibleCpus { source })?;
        Ok(Kernel {
            cpus,
            logger,
            net: take(&mut ebpf, MAP_CGROUP_NET)?,
            overflow: take(&mut ebpf, MAP_OVERFLOW)?,
            watch: take(&mut ebpf, MAP_WATCH)?,
            watch_count: take(&mut ebpf, MAP_WATCH_COUNT)?,
            endpoints: take(&mut ebpf, MAP_ENDPOINT_NET)?,
            connects: take(&mut ebpf, MAP_CONNECTS)?,
            wake_ts: take(&mut ebpf, MAP_WAKE_TS)?,
            runq: take(&mut ebpf, MAP_RUNQ)?,
            victims: take(&mut ebpf, MAP_VICTIMS)?,
            oom_kills: take(&mut ebpf, MAP_OOM_KILLS)?,
            paths: take(&mut ebpf, MAP_CGROUP_PATHS)?,
            _ebpf: ebpf,
            programs,
            retired: NetCounters::default(),
            seen: HashSet::new(),
        })
    }

    /// Programs attached.
    pub fn programs(&self) -> usize {
        self.programs
    }

    /// Counts the remote endpoints and connects of cgroup `id` from now on.
    pub fn watch_cgroup(&mut self, id: u64) -> Result<(), KernelError> {
        match self.watch.insert(id, 1, 0) {
            Ok(()) => self.sync_watch_count(),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Err(KernelError::WatchFull { id })
            }
            Err(source) => Err(KernelError::Map {
                name: MAP_WATCH,
                source,
            }),
        }
    }

    pub fn unwatch_cgroup(&mut self, id: u64) -> Result<(), KernelError> {
        match self.watch.remove(&id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(KernelError::Map {
                    name: MAP_WATCH,
                    source,
                });
            }
        }
        self.sync_watch_count()
    }

    /// Writes how many cgroups `WATCH` holds to `WATCH_COUNT` (after every change of `WATCH`:
    /// inserts before, removals after, so the packet path never skips a watched cgroup).
    fn sync_watch_count(&mut self) -> Result<(), KernelError> {
        let n = self.watch.keys().filter(Result::is_ok).count() as u32;
        self.watch_count
            .set(0, n, 0)
            .map_err(|source| KernelError::Map {
                name: MAP_WATCH_COUNT,
                source,
            })
    }

    fn overflow_slot(&self, s: Overflow) -> Result<u64, KernelError> {
        let v = self
            .overflow
            .get(&(s as u32), 0)
            .map_err(|source| KernelError::Map {
                name: MAP_OVERFLOW,
                source,
            })?;
        Ok(v.iter().copied().fold(0u64, u64::saturating_add))
    }

    /// Sums the per-CPU values of every map.
    pub fn read(&mut self) -> Result<KernelSnapshot, KernelError> {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
        let mut snap = KernelSnapshot::default();
        let cpus = self.cpus;
        for (cgroup, per_cpu) in per_cpu_entries(&self.net, cpus, MAP_CGROUP_NET)? {
            let sum = per_cpu
                .iter()
                .fold(NetCounters::default(), |acc, c| acc.add(c));
            snap.net.by_cgroup.insert(cgroup, sum);
        }
        snap.net.overflow = NetCounters {
            rx_packets: self.overflow_slot(Overflow::IngressPackets)?,
            rx_bytes: self.overflow_slot(Overflow::IngressBytes)?,
            tx_packets: self.overflow_slot(Overflow::EgressPackets)?,
            tx_bytes: self.overflow_slot(Overflow::EgressBytes)?,
        };
        snap.net.retired = self.retired;

        let endpoints = per_cpu_entries(&self.endpoints, cpus, MAP_ENDPOINT_NET)?;
        let endpoint_keys = endpoints.len();
        for (key, per_cpu) in endpoints {
            let sum = per_cpu
                .iter()
                .fold(NetCounters::default(), |acc, c| acc.add(c));
            // An IPv4 peer seen from an IPv4 and an IPv6 socket is one endpoint.
            let e = snap.endpoints.entry(Endpoint::from(&key)).or_default();
            *e = e.add(&sum);
        }
        let connects = per_cpu_entries(&self.connects, cpus, MAP_CONNECTS)?;
        let connect_keys = connects.len();
        for (key, per_cpu) in connects {
            let n = per_cpu.iter().copied().fold(0u64, u64::saturating_add);
            *snap.connects.entry(Endpoint::from(&key)).or_default() += n;
        }
        for (cgroup, per_cpu) in per_cpu_entries(&self.runq, cpus, MAP_RUNQ)? {
            let n = per_cpu.iter().copied().fold(0u64, u64::saturating_add);
            snap.runq_ns.insert(cgroup, n);
        }
        for (cgroup, per_cpu) in per_cpu_entries(&self.oom_kills, cpus, MAP_OOM_KILLS)? {
            let n = per_cpu.iter().copied().fold(0u64, u64::saturating_add);
            snap.oom_kills.insert(cgroup, n);
        }
        for (id, p) in entries(&self.paths, MAP_CGROUP_PATHS)? {
            let len = (p.len as usize).min(p.path.len());
            snap.cgroup_paths
                .insert(id, String::from_utf8_lossy(&p.path[..len]).into_owned());
        }
        let wake_entries = self.wake_slots_in_use()?;
        let victim_entries = entries(&self.victims, MAP_VICTIMS)?.len();

        let fill = |name, entries, capacity, overflow| MapFill {
            name,
            entries,
            capacity,
            overflow,
        };
        snap.maps = vec![
            fill(
                MAP_CGROUP_NET,
                snap.net.by_cgroup.len(),
                CGROUP_NET_MAX_ENTRIES,
                snap.net
                    .overflow
                    .rx_packets
                    .saturating_add(snap.net.overflow.tx_packets),
            ),
            fill(
                MAP_ENDPOINT_NET,
                endpoint_keys,
                ENDPOINT_NET_MAX_ENTRIES,
                self.overflow_slot(Overflow::EndpointNet)?,
            ),
            fill(
                MAP_CONNECTS,
                connect_keys,
                CONNECTS_MAX_ENTRIES,
                self.overflow_slot(Overflow::Connects)?,
            ),
            fill(
                MAP_WAKE_TS,
                wake_entries,
                WAKE_TS_MAX_ENTRIES,
                self.overflow_slot(Overflow::WakeTs)?,
            ),
            fill(
                MAP_RUNQ,
                snap.runq_ns.len(),
                RUNQ_MAX_ENTRIES,
                self.overflow_slot(Overflow::Runq)?,
            ),
            fill(
                MAP_VICTIMS,
                victim_entries,
                VICTIMS_MAX_ENTRIES,
                self.overflow_slot(Overflow::Victims)?,
            ),
            fill(
                MAP_OOM_KILLS,
                snap.oom_kills.len(),
                OOM_KILLS_MAX_ENTRIES,
                self.overflow_slot(Overflow::OomKills)?,
            ),
            fill(
                MAP_CGROUP_PATHS,
                snap.cgroup_paths.len(),
                CGROUP_PATHS_MAX_ENTRIES,
                self.overflow_slot(Overflow::CgroupPaths)?,
            ),
        ];

        self.seen = snap
            .endpoints
            .keys()
            .chain(snap.connects.keys())
            .map(|e| e.cgroup)
            .chain(snap.runq_ns.keys().copied())
            .chain(snap.oom_kills.keys().copied())
            .chain(snap.cgroup_paths.keys().copied())
            .collect();
        Ok(snap)
    }

    /// Only the pullers' endpoint bytes and connects: what the pull-traffic reading needs twice
    /// a second, without walking the per-cgroup maps.
    #[allow(clippy::type_complexity)]
    pub fn read_pullers(
        &mut self,
    ) -> Result<(BTreeMap<Endpoint, NetCounters>, BTreeMap<Endpoint, u64>), KernelError> {
        let cpus = self.cpus;
        let mut endpoints: BTreeMap<Endpoint, NetCounters> = BTreeMap::new();
        for (key, per_cpu) in per_cpu_entries(&self.endpoints, cpus, MAP_ENDPOINT_NET)? {
            let sum = per_cpu
                .iter()
                .fold(NetCounters::default(), |acc, c| acc.add(c));
            let e = endpoints.entry(Endpoint::from(&key)).or_default();
            *e = e.add(&sum);
        }
        let mut connects: BTreeMap<Endpoint, u64> = BTreeMap::new();
        for (key, per_cpu) in per_cpu_entries(&self.connects, cpus, MAP_CONNECTS)? {
            let n = per_cpu.iter().copied().fold(0u64, u64::saturating_add);
            *connects.entry(Endpoint::from(&key)).or_default() += n;
        }
        Ok((endpoints, connects))
    }

    /// Deletes entries of cgroups not in `live` (ids of existing cgroups) from every per-cgroup
    /// map. CGROUP_NET's go at once, their counts kept in the retired total; the other maps'
    /// entries go only once a [`Kernel::read`] has returned them, so a cgroup that lived for a
    /// moment is still reported once. Returns how many entries were deleted.
    pub fn retire_dead(&mut self, live: &HashSet<u64>) -> Result<usize, KernelError> {
        let mut n = 0;
        let cpus = self.cpus;
        for (id, per_cpu) in per_cpu_entries(&self.net, cpus, MAP_CGROUP_NET)? {
            if live.contains(&id) {
                continue;
            }
            let sum = per_cpu
                .iter()
                .fold(NetCounters::default(), |acc, c| acc.add(c));
            let removed = gone(self.net.remove(&id), MAP_CGROUP_NET)?;
            if removed == 1 {
                self.retired = self.retired.add(&sum);
            }
            n += removed;
        }
        let retire = |id: &u64| !live.contains(id) && self.seen.contains(id);
        let keys: Vec<EndpointKey> = per_cpu_entries(&self.endpoints, cpus, MAP_ENDPOINT_NET)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| retire(&k.cgroup))
            .collect();
        for k in &keys {
            n += gone(self.endpoints.remove(k), MAP_ENDPOINT_NET)?;
        }
        let keys: Vec<EndpointKey> = per_cpu_entries(&self.connects, cpus, MAP_CONNECTS)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| retire(&k.cgroup))
            .collect();
        for k in &keys {
            n += gone(self.connects.remove(k), MAP_CONNECTS)?;
        }
        let ids: Vec<u64> = per_cpu_entries(&self.runq, cpus, MAP_RUNQ)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(retire)
            .collect();
        for id in &ids {
            n += gone(self.runq.remove(id), MAP_RUNQ)?;
        }
        let ids: Vec<u64> = per_cpu_entries(&self.oom_kills, cpus, MAP_OOM_KILLS)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(retire)
            .collect();
        for id in &ids {
            n += gone(self.oom_kills.remove(id), MAP_OOM_KILLS)?;
        }
        let ids: Vec<u64> = entries(&self.paths, MAP_CGROUP_PATHS)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(retire)
            .collect();
        for id in &ids {
            n += gone(self.paths.remove(id), MAP_CGROUP_PATHS)?;
        }
        // A dead cgroup cannot send anything: stop watching it.
        let ids: Vec<u64> = self
            .watch
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        for id in &ids {
            n += gone(self.watch.remove(id), MAP_WATCH)?;
        }
        if !ids.is_empty() {
            self.sync_watch_count()?;
        }
        Ok(n)
    }

    /// `WAKE_TS` slots holding a pending wake time (its "entries"; capacity = the slot count).
    fn wake_slots_in_use(&self) -> Result<usize, KernelError> {
        let fd = IterableMap::map(&self.wake_ts).fd().as_fd();
        // The array is mmapable: scanning its 1 MiB is ~100 µs, where a syscall read (even
        // batched) copies slot by slot and took ~200 ms.
        let len = WAKE_TS_MAX_ENTRIES as usize * std::mem::size_of::<WakeSlot>();
        // SAFETY: a read-only shared mapping of the map's value area (BPF_F_MMAPABLE), unmapped
        // below; slots are read with volatile loads (the programs write them concurrently).
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            let slots = mapped as *const WakeSlot;
            let n = (0..WAKE_TS_MAX_ENTRIES as usize)
                // SAFETY: inside the mapping of WAKE_TS_MAX_ENTRIES slots.
                .filter(|&i| unsafe { std::ptr::read_volatile(&raw const (*slots.add(i)).ts) } != 0)
                .count();
            // SAFETY: the mapping made above, no longer used.
            unsafe { libc::munmap(mapped, len) };
            return Ok(n);
        }
        tracing::debug!(map = MAP_WAKE_TS, error = %std::io::Error::last_os_error(), "mmap refused; reading the slots");
        // SAFETY: u32 index and WakeSlot are the array's key and value types.
        match unsafe { batch::lookup_all::<u32, WakeSlot>(fd, None) } {
            Ok(v) => Ok(v
                .iter()
                .filter(|(_, s)| s.first().is_some_and(WakeSlot::in_use))
                .count()),
            Err(e) => {
                tracing::debug!(map = MAP_WAKE_TS, error = %e, "batch lookup refused; reading per slot");
                let mut n = 0;
                for s in self.wake_ts.iter() {
                    let s = s.map_err(|source| KernelError::Map {
                        name: MAP_WAKE_TS,
                        source,
                    })?;
                    n += usize::from(s.in_use());
                }
                Ok(n)
            }
        }
    }

    /// Removes CGROUP_PATHS entries user space has consumed.
    pub fn forget_paths(&mut self, ids: &[u64]) -> Result<(), KernelError> {
        for id in ids {
            gone(self.paths.remove(id), MAP_CGROUP_PATHS)?;
        }
        Ok(())
    }
}

/// Every entry of a per-CPU hash map with its per-CPU values: one batch read, or aya's
/// per-key iteration where the kernel has no batch lookup.
fn per_cpu_entries<K: Pod, V: Pod>(
    map: &PerCpuHashMap<MapData, K, V>,
    cpus: usize,
    name: &'static str,
) -> Result<Vec<(K, Vec<V>)>, KernelError> {
    let fd = IterableMap::map(map).fd().as_fd();
    // SAFETY: K and V are the map's own Pod key and value types.
    match unsafe { batch::lookup_all::<K, V>(fd, Some(cpus)) } {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::debug!(map = name, error = %e, "batch lookup refused; reading per key");
            map.iter()
                .map(|r| r.map(|(k, v)| (k, v.iter().copied().collect())))
                .collect::<Result<_, _>>()
                .map_err(|source| KernelError::Map { name, source })
        }
    }
}

/// Every entry of a hash map, as [`per_cpu_entries`].
fn entries<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, KernelError> {
    let fd = IterableMap::map(map).fd().as_fd();
    // SAFETY: K and V are the map's own Pod key and value types.
    match unsafe { batch::lookup_all::<K, V>(fd, None) } {
        Ok(v) => Ok(v
            .into_iter()
            .filter_map(|(k, v)| Some((k, *v.first()?)))
            .collect()),
        Err(e) => {
            tracing::debug!(map = name, error = %e, "batch lookup refused; reading per key");
            map.iter()
                .collect::<Result<_, _>>()
                .map_err(|source| KernelError::Map { name, source })
        }
    }
}

/// 1 when a delete removed an entry, 0 when it was gone already (another delete won).
fn gone(r: Result<(), MapError>, name: &'static str) -> Result<usize, KernelError> {
    match r {
        Ok(()) => Ok(1),
        Err(MapError::KeyNotFound) => Ok(0),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(0),
        Err(source) => Err(KernelError::Map { name, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_are_stable() {
        let names: Vec<&str> = Feature::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "net",
                "endpoints",
                "connect",
                "sched",
                "oom",
                "cgroup_paths"
            ]
        );
    }

    #[test]
    fn endpoints_show_ipv4_as_ipv4() {
        let mut k = EndpointKey {
            cgroup: 7,
            port: 443,
            family: ragent_ebpf::AF_INET,
            ..EndpointKey::default()
        };
        k.addr[10] = 0xff;
        k.addr[11] = 0xff;
        k.addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        let e = Endpoint::from(&k);
        assert_eq!(e.addr, IpAddr::from([127, 0, 0, 1]));
        assert_eq!((e.cgroup, e.port), (7, 443));
        k.addr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(
            Endpoint::from(&k).addr,
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        );
    }

    #[test]
    fn error_chains_read_as_one_line() {
        let inner = std::io::Error::other("inner cause");
        let e = KernelError::Cgroup {
            path: "/x".into(),
            source: inner,
        };
        assert_eq!(
            crate::adapters::error_chain(&e),
            "cannot open cgroup /x: inner cause"
        );
    }
}
