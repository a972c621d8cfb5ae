//! The kernel <-> user ABI of ragent's eBPF programs.
//!
//! This library is `no_std` so the eBPF binary (`src/main.rs`, built for `bpfel-unknown-none`)
//! and the agent share one definition of every map key and value, map and program name, and the
//! tracepoint field offsets the programs read. The `user` feature adds the userspace-only
//! `aya::Pod` impls.
#![no_std]

// ---- maps ----------------------------------------------------------------------------------

/// Per-CPU hash: cgroup id (u64) -> [`NetCounters`] (every cgroup of the node).
pub const MAP_CGROUP_NET: &str = "CGROUP_NET";
/// Per-CPU array with one slot per [`Overflow`] reason.
pub const MAP_OVERFLOW: &str = "OVERFLOW";
/// Hash: cgroup id (u64) -> u8, the cgroups whose remote endpoints and connects are counted.
/// Filled by user space.
pub const MAP_WATCH: &str = "WATCH";
/// Per-CPU hash: [`EndpointKey`] -> [`NetCounters`] for watched cgroups.
pub const MAP_ENDPOINT_NET: &str = "ENDPOINT_NET";
/// Per-CPU hash: [`EndpointKey`] -> u64 connect() calls of watched cgroups.
pub const MAP_CONNECTS: &str = "CONNECTS";
/// Array of [`WAKE_TS_MAX_ENTRIES`] [`WakeSlot`]s indexed by [`wake_slot`]`(thread id)`: when a
/// thread became runnable (woken, or preempted). An array, not a hash: its lookups are a few
/// instructions the verifier inlines, where a hash insert and delete cost hundreds of ns on
/// every wakeup and switch.
pub const MAP_WAKE_TS: &str = "WAKE_TS";
/// Array, one u32 slot: how many cgroups [`MAP_WATCH`] holds (written by user space after every
/// change), so the packet path skips the `WATCH` hash lookup while nothing is watched.
pub const MAP_WATCH_COUNT: &str = "WATCH_COUNT";
/// Per-CPU array, one slot: the run-queue wait (ns) of the task running on this CPU, not yet
/// added to [`MAP_RUNQ`].
pub const MAP_PENDING: &str = "PENDING";
/// Per-CPU hash: cgroup id (u64) -> ns spent runnable but waiting for a CPU.
pub const MAP_RUNQ: &str = "RUNQ";
/// Hash: thread id (u32) -> u8, tasks the OOM killer chose and that have not exited yet.
pub const MAP_VICTIMS: &str = "VICTIMS";
/// Per-CPU hash: cgroup id (u64) -> OOM kills of tasks in that cgroup.
pub const MAP_OOM_KILLS: &str = "OOM_KILLS";
/// Hash: cgroup id (u64) -> [`CgroupPath`] of cgroup2 directories created since load.
pub const MAP_CGROUP_PATHS: &str = "CGROUP_PATHS";

pub const CGROUP_NET_MAX_ENTRIES: u32 = 16_384;
pub const WATCH_MAX_ENTRIES: u32 = 64;
pub const ENDPOINT_NET_MAX_ENTRIES: u32 = 4_096;
pub const CONNECTS_MAX_ENTRIES: u32 = 4_096;
/// Slots of [`MAP_WAKE_TS`] (a power of two, above the usual `pid_max` of 32768, so thread ids
/// below it never share a slot).
pub const WAKE_TS_MAX_ENTRIES: u32 = 65_536;
pub const RUNQ_MAX_ENTRIES: u32 = 16_384;
pub const VICTIMS_MAX_ENTRIES: u32 = 1_024;
pub const OOM_KILLS_MAX_ENTRIES: u32 = 4_096;
pub const CGROUP_PATHS_MAX_ENTRIES: u32 = 8_192;

// ---- programs ------------------------------------------------------------------------------

/// Program names (the function names in `src/main.rs`).
pub const PROG_INGRESS: &str = "cgroup_skb_ingress";
pub const PROG_EGRESS: &str = "cgroup_skb_egress";
pub const PROG_CONNECT4: &str = "connect4";
pub const PROG_CONNECT6: &str = "connect6";
pub const PROG_SCHED_WAKEUP: &str = "sched_wakeup";
pub const PROG_SCHED_WAKEUP_NEW: &str = "sched_wakeup_new";
pub const PROG_SCHED_SWITCH: &str = "sched_switch";
pub const PROG_OOM_MARK_VICTIM: &str = "oom_mark_victim";
pub const PROG_PROCESS_EXIT: &str = "sched_process_exit";
pub const PROG_CGROUP_MKDIR: &str = "cgroup_mkdir";

// ---- classic tracepoints: the fields the programs read --------------------------------------

/// One field of a tracepoint record as the programs read it. User space compares these with
/// `<tracefs>/events/<category>/<name>/format` before attaching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpField {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

/// A tracepoint, the program attached to it and the fields that program reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
    pub program: &'static str,
    pub fields: &'static [TpField],
}

pub const SCHED_WAKEUP_PID: TpField = TpField {
    name: "pid",
    offset: 24,
    size: 4,
};
pub const SCHED_SWITCH_PREV_PID: TpField = TpField {
    name: "prev_pid",
    offset: 24,
    size: 4,
};
pub const SCHED_SWITCH_PREV_STATE: TpField = TpField {
    name: "prev_state",
    offset: 32,
    size: 8,
};
pub const SCHED_SWITCH_NEXT_PID: TpField = TpField {
    name: "next_pid",
    offset: 56,
    size: 4,
};
pub const MARK_VICTIM_PID: TpField = TpField {
    name: "pid",
    offset: 8,
    size: 4,
};
pub const CGROUP_MKDIR_ROOT: TpField = TpField {
    name: "root",
    offset: 8,
    size: 4,
};
pub const CGROUP_MKDIR_ID: TpField = TpField {
    name: "id",
    offset: 16,
    size: 8,
};
/// A `__data_loc` field: u32, low 16 bits the offset of the string in the record, high 16 its
/// length (with the NUL).
pub const CGROUP_MKDIR_PATH: TpField = TpField {
    name: "path",
    offset: 24,
    size: 4,
};

/// The hierarchy id the kernel gives the cgroup2 (default) hierarchy: always 0 (v1
/// hierarchies count from 1; see the `hierarchy` column of /proc/cgroups).
pub const CGROUP2_HIERARCHY_ID: i32 = 0;

pub const TP_SCHED_WAKEUP: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_wakeup",
    program: PROG_SCHED_WAKEUP,
    fields: &[SCHED_WAKEUP_PID],
};
pub const TP_SCHED_WAKEUP_NEW: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_wakeup_new",
    program: PROG_SCHED_WAKEUP_NEW,
    fields: &[SCHED_WAKEUP_PID],
};
pub const TP_SCHED_SWITCH: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_switch",
    program: PROG_SCHED_SWITCH,
    fields: &[
        SCHED_SWITCH_PREV_PID,
        SCHED_SWITCH_PREV_STATE,
        SCHED_SWITCH_NEXT_PID,
    ],
};
/// sched_process_exit: the program reads no field (the exiting task is the current one).
pub const TP_PROCESS_EXIT: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_process_exit",
    program: PROG_PROCESS_EXIT,
    fields: &[],
};
pub const TP_OOM_MARK_VICTIM: Tracepoint = Tracepoint {
    category: "oom",
    name: "mark_victim",
    program: PROG_OOM_MARK_VICTIM,
    fields: &[MARK_VICTIM_PID],
};
pub const TP_CGROUP_MKDIR: Tracepoint = Tracepoint {
    category: "cgroup",
    name: "cgroup_mkdir",
    program: PROG_CGROUP_MKDIR,
    fields: &[CGROUP_MKDIR_ROOT, CGROUP_MKDIR_ID, CGROUP_MKDIR_PATH],
};

// ---- values --------------------------------------------------------------------------------

/// Bytes and packets seen by the cgroup_skb programs for one cgroup, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

impl NetCounters {
    /// Sum of two per-CPU values (saturating: counters never wrap back to small values).
    pub fn add(&self, other: &NetCounters) -> NetCounters {
        NetCounters {
            rx_bytes: self.rx_bytes.saturating_add(other.rx_bytes),
            rx_packets: self.rx_packets.saturating_add(other.rx_packets),
            tx_bytes: self.tx_bytes.saturating_add(other.tx_bytes),
            tx_packets: self.tx_packets.saturating_add(other.tx_packets),
        }
    }
}

/// One slot of [`MAP_WAKE_TS`]: thread `pid` became runnable at ktime `ts` (ns); `ts` = 0 when
/// the slot holds no pending wake time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WakeSlot {
    pub pid: u32,
    pub pad: u32,
    pub ts: u64,
}

/// The [`MAP_WAKE_TS`] slot of thread `pid`.
#[inline(always)]
pub fn wake_slot(pid: u32) -> u32 {
    pid & (WAKE_TS_MAX_ENTRIES - 1)
}

impl WakeSlot {
    /// Thread `pid` became runnable at `now`. Returns true on a collision: the slot held
    /// another thread's pending wake time, which is lost (the caller counts it as an overflow
    /// of [`MAP_WAKE_TS`]).
    #[inline(always)]
    pub fn mark(&mut self, pid: u32, now: u64) -> bool {
        let collided = self.ts != 0 && self.pid != pid;
        self.pid = pid;
        self.ts = now;
        collided
    }

    /// Thread `pid` is switched in at `now`: the time it waited runnable (0 when no wake time
    /// of it is pending), and the slot is cleared.
    #[inline(always)]
    pub fn take(&mut self, pid: u32, now: u64) -> u64 {
        if self.pid != pid || self.ts == 0 {
            return 0;
        }
        let waited = now.saturating_sub(self.ts);
        self.ts = 0;
        waited
    }

    /// Thread `pid` went to sleep or exited: a wake time of it still pending is stale.
    #[inline(always)]
    pub fn clear(&mut self, pid: u32) {
        if self.pid == pid && self.ts != 0 {
            self.ts = 0;
        }
    }

    /// Whether a wake time is pending in this slot.
    pub fn in_use(&self) -> bool {
        self.ts != 0
    }
}

/// AF_INET / AF_INET6 as the kernel reports them in `__sk_buff.family` and `bpf_sock_addr`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A remote endpoint of a watched cgroup. IPv4 addresses are stored v4-mapped
/// (`::ffff:a.b.c.d`); `family` is the socket's (an IPv6 socket may talk to a mapped address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub cgroup: u64,
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub pad: u32,
}

/// Longest cgroup path kept (bytes, with the NUL); longer ones are cut and their `len` says so.
pub const CGROUP_PATH_MAX: usize = 256;

/// A cgroup2 directory's path relative to the hierarchy root, as `cgroup/cgroup_mkdir` gives it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupPath {
    /// Bytes of `path` that hold the string, without the NUL.
    pub len: u32,
    pub path: [u8; CGROUP_PATH_MAX],
}

/// Slots of [`MAP_OVERFLOW`]. The first four keep the node's network totals exact when
/// [`MAP_CGROUP_NET`] is full; the others count inserts that failed because their map was full
/// (nothing is dropped silently).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    IngressPackets = 0,
    IngressBytes = 1,
    EgressPackets = 2,
    EgressBytes = 3,
    /// Packets of watched cgroups whose endpoint found ENDPOINT_NET full.
    EndpointNet = 4,
    Connects = 5,
    WakeTs = 6,
    Runq = 7,
    Victims = 8,
    OomKills = 9,
    CgroupPaths = 10,
}

pub const OVERFLOW_SLOTS: u32 = 11;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` structs of integers with no implicit padding (EndpointKey's is
    // the explicit `pad`); any bit pattern is valid.
    unsafe impl aya::Pod for super::NetCounters {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::CgroupPath {}
    unsafe impl aya::Pod for super::WakeSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_slot_masks_thread_ids() {
        assert_eq!(wake_slot(5), 5);
        assert_eq!(wake_slot(WAKE_TS_MAX_ENTRIES + 5), 5);
        assert_eq!(wake_slot(u32::MAX), WAKE_TS_MAX_ENTRIES - 1);
    }

    #[test]
    fn a_wake_time_is_taken_once_by_its_own_thread() {
        let mut s = WakeSlot::default();
        assert!(!s.mark(7, 100));
        assert!(
            !s.mark(7, 150),
            "a second wakeup of the same thread is no collision"
        );
        assert_eq!(s.take(8, 400), 0, "another thread gets nothing");
        assert_eq!(s.take(7, 400), 250);
        assert!(!s.in_use());
        assert_eq!(s.take(7, 500), 0, "taken once");
    }

    #[test]
    fn sleeping_clears_only_its_own_wake_time() {
        let mut s = WakeSlot::default();
        s.mark(7, 100);
        s.clear(8);
        assert!(s.in_use());
        s.clear(7);
        assert!(!s.in_use());
        assert_eq!(s.take(7, 200), 0);
    }

    #[test]
    fn a_collision_is_reported_and_the_newer_thread_keeps_the_slot() {
        let a = 7;
        let b = 7 + WAKE_TS_MAX_ENTRIES;
        assert_eq!(wake_slot(a), wake_slot(b));
        let mut s = WakeSlot::default();
        assert!(!s.mark(a, 100));
        assert!(s.mark(b, 120), "b overwrote a's pending wake time");
        assert_eq!(s.take(a, 300), 0, "a's sample is lost (and was counted)");
        assert_eq!(s.take(b, 300), 180);
        // A slot whose wake time was taken or cleared is free: no collision.
        assert!(!s.mark(a, 400));
        s.clear(a);
        assert!(!s.mark(b, 500));
    }
}
