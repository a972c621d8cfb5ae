//! The kernel <-> user ABI of ragent's eBPF programs.
//!
//! This library is `no_std` so the eBPF binary (`src/main.rs`, built for `bpfel-unknown-none`)
//! and the agent share one definition of every map key and value. The `user` feature adds the
//! userspace-only `aya::Pod` impls.
#![no_std]

/// Name of the per-CPU hash map: cgroup id (u64) -> [`NetCounters`].
pub const MAP_CGROUP_NET: &str = "CGROUP_NET";
/// Name of the per-CPU array with one slot per [`Overflow`] reason.
pub const MAP_OVERFLOW: &str = "OVERFLOW";
/// Program names (the function names in `src/main.rs`).
pub const PROG_INGRESS: &str = "cgroup_skb_ingress";
pub const PROG_EGRESS: &str = "cgroup_skb_egress";

/// Capacity of [`MAP_CGROUP_NET`]. When it is full, new cgroups are counted in
/// [`Overflow::CgroupNetFull`] instead of silently dropped.
pub const CGROUP_NET_MAX_ENTRIES: u32 = 16_384;

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

/// Slots of [`MAP_OVERFLOW`]: packets and bytes of cgroups that found [`MAP_CGROUP_NET`] full,
/// by direction, so that node totals stay exact even then.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    IngressPackets = 0,
    IngressBytes = 1,
    EgressPackets = 2,
    EgressBytes = 3,
}

pub const OVERFLOW_SLOTS: u32 = 4;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` struct of u64s, no padding, any bit pattern is valid.
    unsafe impl aya::Pod for super::NetCounters {}
}
