//! ragent's eBPF programs. Built for `bpfel-unknown-none` by `agent/build.rs` (aya-build).
//!
//! `cgroup_skb_ingress` / `cgroup_skb_egress` are attached once at the cgroup2 root and count
//! bytes and packets per cgroup id (the socket's cgroup), so one attach point sees every pod,
//! containerd and the rest of the node. They never drop a packet: both return 1 (pass).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        EbpfContext,
        bindings::BPF_NOEXIST,
        helpers::generated::bpf_skb_cgroup_id,
        macros::{cgroup_skb, map},
        maps::{PerCpuArray, PerCpuHashMap},
        programs::SkBuffContext,
    };
    use ragent_ebpf::{CGROUP_NET_MAX_ENTRIES, NetCounters, OVERFLOW_SLOTS, Overflow};

    #[map]
    static CGROUP_NET: PerCpuHashMap<u64, NetCounters> =
        PerCpuHashMap::with_max_entries(CGROUP_NET_MAX_ENTRIES, 0);

    #[map]
    static OVERFLOW: PerCpuArray<u64> = PerCpuArray::with_max_entries(OVERFLOW_SLOTS, 0);

    const PASS: i32 = 1;

    #[inline(always)]
    fn bump_overflow(slot: Overflow, by: u64) {
        if let Some(p) = OVERFLOW.get_ptr_mut(slot as u32) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *p = (*p).wrapping_add(by) };
        }
    }

    #[inline(always)]
    fn account(ctx: &SkBuffContext, ingress: bool) {
        // SAFETY: the context pointer is the program's own __sk_buff.
        let cgroup = unsafe { bpf_skb_cgroup_id(ctx.as_ptr() as *mut _) };
        let len = ctx.len() as u64;
        if let Some(c) = CGROUP_NET.get_ptr_mut(cgroup) {
            // SAFETY: per-CPU value: no other CPU writes this copy.
            unsafe {
                if ingress {
                    (*c).rx_bytes += len;
                    (*c).rx_packets += 1;
                } else {
                    (*c).tx_bytes += len;
                    (*c).tx_packets += 1;
                }
            }
            return;
        }
        let mut first = NetCounters::default();
        if ingress {
            first.rx_bytes = len;
            first.rx_packets = 1;
        } else {
            first.tx_bytes = len;
            first.tx_packets = 1;
        }
        if CGROUP_NET
            .insert(cgroup, first, BPF_NOEXIST as u64)
            .is_err()
        {
            // Either the map is full or another CPU inserted the key first; retry once.
            if let Some(c) = CGROUP_NET.get_ptr_mut(cgroup) {
                // SAFETY: as above.
                unsafe {
                    if ingress {
                        (*c).rx_bytes += len;
                        (*c).rx_packets += 1;
                    } else {
                        (*c).tx_bytes += len;
                        (*c).tx_packets += 1;
                    }
                }
            } else if ingress {
                bump_overflow(Overflow::IngressPackets, 1);
                bump_overflow(Overflow::IngressBytes, len);
            } else {
                bump_overflow(Overflow::EgressPackets, 1);
                bump_overflow(Overflow::EgressBytes, len);
            }
        }
    }

    #[cgroup_skb]
    pub fn cgroup_skb_ingress(ctx: SkBuffContext) -> i32 {
        account(&ctx, true);
        PASS
    }

    #[cgroup_skb]
    pub fn cgroup_skb_egress(ctx: SkBuffContext) -> i32 {
        account(&ctx, false);
        PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
