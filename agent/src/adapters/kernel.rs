//! The kernel: loading ragent's eBPF programs and reading their maps.
//!
//! The programs (see `ebpf/src/main.rs`) are attached once at the cgroup2 root; the links are
//! owned by [`CgroupNet`] and detached when it is dropped.
use std::{collections::BTreeMap, fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
};
use ragent_ebpf::{MAP_CGROUP_NET, MAP_OVERFLOW, NetCounters, Overflow, PROG_EGRESS, PROG_INGRESS};

/// The eBPF object built by agent/build.rs (empty when built with AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ragent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this ragent was built without its eBPF programs (AYA_BUILD_SKIP=1); rebuild it after `cargo xtask setup`"
    )]
    NotBuilt,
    #[error(
        "loading the eBPF object failed: {0}; the kernel may lack BTF or ragent may lack CAP_BPF/CAP_SYS_ADMIN"
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
        source: aya::maps::MapError,
    },
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
        }
    }
}

/// Per-cgroup network counters from the cgroup_skb programs.
pub struct CgroupNet {
    // Keeps programs and links alive.
    _ebpf: Ebpf,
    net: PerCpuHashMap<MapData, u64, NetCounters>,
    overflow: PerCpuArray<MapData, u64>,
    programs: usize,
    /// What cgroups that are gone had counted before their entries were deleted.
    retired: NetCounters,
}

/// What a read of the maps gives.
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

impl CgroupNet {
    /// Loads the programs and attaches them at `cgroup_root` (a cgroup2 directory).
    pub fn attach(cgroup_root: &Path) -> Result<CgroupNet, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(KernelError::Load)?;
        let cgroup = File::open(cgroup_root).map_err(|source| KernelError::Cgroup {
            path: cgroup_root.display().to_string(),
            source,
        })?;
        let mut programs = 0;
        for (name, kind) in [
            (PROG_INGRESS, CgroupSkbAttachType::Ingress),
            (PROG_EGRESS, CgroupSkbAttachType::Egress),
        ] {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(KernelError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| KernelError::Program { name, source })?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
            // AllowMultiple fails with EINVAL here (environment.md); links stack with Single.
            prog.attach(&cgroup, kind, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
            programs += 1;
        }
        let net = ebpf
            .take_map(MAP_CGROUP_NET)
            .ok_or(KernelError::Missing {
                what: "map",
                name: MAP_CGROUP_NET,
            })?
            .try_into()
            .map_err(|source| KernelError::Map {
                name: MAP_CGROUP_NET,
                source,
            })?;
        let overflow = ebpf
            .take_map(MAP_OVERFLOW)
            .ok_or(KernelError::Missing {
                what: "map",
                name: MAP_OVERFLOW,
            })?
            .try_into()
            .map_err(|source| KernelError::Map {
                name: MAP_OVERFLOW,
                source,
            })?;
        Ok(CgroupNet {
            _ebpf: ebpf,
            net,
            overflow,
            programs,
            retired: NetCounters::default(),
        })
    }

    pub fn programs(&self) -> usize {
        self.programs
    }

    /// Sums the per-CPU values of every cgroup.
    pub fn read(&self) -> Result<NetSnapshot, KernelError> {
        let mut snap = NetSnapshot::default();
        for item in self.net.iter() {
            let (cgroup, per_cpu) = item.map_err(|source| KernelError::Map {
                name: MAP_CGROUP_NET,
                source,
            })?;
            let sum = per_cpu
                .iter()
                .fold(NetCounters::default(), |acc, c| acc.add(c));
            snap.by_cgroup.insert(cgroup, sum);
        }
        let slot = |s: Overflow| -> Result<u64, KernelError> {
            let v = self
                .overflow
                .get(&(s as u32), 0)
                .map_err(|source| KernelError::Map {
                    name: MAP_OVERFLOW,
                    source,
                })?;
            Ok(v.iter().copied().fold(0u64, u64::saturating_add))
        };
        snap.overflow = NetCounters {
            rx_packets: slot(Overflow::IngressPackets)?,
            rx_bytes: slot(Overflow::IngressBytes)?,
            tx_packets: slot(Overflow::EgressPackets)?,
            tx_bytes: slot(Overflow::EgressBytes)?,
        };
        snap.retired = self.retired;
        Ok(snap)
    }

    /// Deletes the entries of cgroups not in `live` (cgroup ids of existing cgroups), keeping
    /// their counts in the retired total, so the map holds only what exists. Returns how many.
    pub fn retire_dead(
        &mut self,
        live: &std::collections::HashSet<u64>,
    ) -> Result<usize, KernelError> {
        let map_err = |source| KernelError::Map {
            name: MAP_CGROUP_NET,
            source,
        };
        let dead: Vec<u64> = self
            .net
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        for id in &dead {
            if let Ok(per_cpu) = self.net.get(id, 0) {
                let sum = per_cpu
                    .iter()
                    .fold(NetCounters::default(), |acc, c| acc.add(c));
                self.retired = self.retired.add(&sum);
            }
            match self.net.remove(id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        Ok(dead.len())
    }
}

// ---- TEMPORARY STUB (not committed): the API the kernel helper is building ----
use std::{collections::HashSet, net::IpAddr, path::PathBuf};
pub struct KernelOptions {
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub tracefs: PathBuf,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    Net,
    Endpoints,
    Connect,
    Sched,
    Oom,
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
    pub detail: String,
}
#[derive(Clone, Debug, Default)]
pub struct Probe {
    pub btf: bool,
    pub bpffs: Option<PathBuf>,
    pub tracefs: Option<PathBuf>,
    pub notes: Vec<String>,
}
pub struct Kernel {
    net: CgroupNet,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub cgroup: u64,
    pub addr: IpAddr,
    pub port: u16,
}
#[derive(Clone, Debug, Default)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
    pub overflow: u64,
}
#[derive(Clone, Debug, Default)]
pub struct KernelSnapshot {
    pub net: NetSnapshot,
    pub endpoints: BTreeMap<Endpoint, NetCounters>,
    pub connects: BTreeMap<Endpoint, u64>,
    pub runq_ns: BTreeMap<u64, u64>,
    pub oom_kills: BTreeMap<u64, u64>,
    pub cgroup_paths: BTreeMap<u64, String>,
    pub maps: Vec<MapFill>,
}
impl Kernel {
    pub fn load(opts: &KernelOptions) -> (Option<Kernel>, Probe, Vec<FeatureStatus>) {
        match CgroupNet::attach(&opts.cgroup_root) {
            Ok(net) => (
                Some(Kernel { net }),
                Probe::default(),
                vec![FeatureStatus {
                    feature: Feature::Net,
                    available: true,
                    detail: String::new(),
                }],
            ),
            Err(e) => (
                None,
                Probe::default(),
                vec![FeatureStatus {
                    feature: Feature::Net,
                    available: false,
                    detail: e.to_string(),
                }],
            ),
        }
    }
    pub fn programs(&self) -> usize {
        self.net.programs()
    }
    pub fn watch_cgroup(&mut self, _id: u64) -> Result<(), KernelError> {
        Ok(())
    }
    pub fn unwatch_cgroup(&mut self, _id: u64) -> Result<(), KernelError> {
        Ok(())
    }
    pub fn read(&mut self) -> Result<KernelSnapshot, KernelError> {
        Ok(KernelSnapshot {
            net: self.net.read()?,
            ..Default::default()
        })
    }
    pub fn retire_dead(&mut self, live: &HashSet<u64>) -> Result<usize, KernelError> {
        self.net.retire_dead(live)
    }
    pub fn forget_paths(&mut self, _ids: &[u64]) -> Result<(), KernelError> {
        Ok(())
    }
}
