//! ragent's eBPF programs. Built for `bpfel-unknown-none` by `agent/build.rs` (aya-build).
//!
//! - `cgroup_skb_ingress` / `cgroup_skb_egress`, attached once at the cgroup2 root, count bytes
//!   and packets per cgroup id (the socket's cgroup), and per remote endpoint for the cgroups
//!   user space put in `WATCH` (only endpoints they connected to). They never drop a packet:
//!   both return 1 (pass).
//! - `connect4` / `connect6` (cgroup sock_addr, at the cgroup2 root) count connect() calls of
//!   watched cgroups per destination. They always allow the call.
//! - `sched_wakeup`, `sched_wakeup_new`, `sched_switch` (classic tracepoints) measure the time
//!   each task waits runnable for a CPU and add it to the cgroup of the waiting task.
//! - `oom_mark_victim` + `sched_process_exit` count OOM kills per cgroup of the victim.
//! - `cgroup_mkdir` keeps the path of every new cgroup2 directory, so user space can name
//!   cgroups that were gone before it looked.
//!
//! Map layouts, names and tracepoint field offsets are in `src/lib.rs` (shared with user space,
//! which checks the offsets against tracefs before attaching).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        EbpfContext,
        bindings::{__sk_buff, BPF_ANY, BPF_F_MMAPABLE, BPF_NOEXIST, bpf_sock_addr},
        helpers::generated::{
            bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
            bpf_probe_read_kernel_str, bpf_skb_cgroup_id,
        },
        macros::{cgroup_skb, cgroup_sock_addr, map, tracepoint},
        maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
        programs::{SkBuffContext, SockAddrContext, TracePointContext},
    };
    use ragent_ebpf::{
        AF_INET, AF_INET6, CGROUP_MKDIR_ID, CGROUP_MKDIR_PATH, CGROUP_MKDIR_ROOT,
        CGROUP_NET_MAX_ENTRIES, CGROUP_PATH_MAX, CGROUP_PATHS_MAX_ENTRIES, CGROUP2_HIERARCHY_ID,
        CONNECTS_MAX_ENTRIES, CgroupPath, ENDPOINT_NET_MAX_ENTRIES, EndpointKey, MARK_VICTIM_PID,
        NetCounters, OOM_KILLS_MAX_ENTRIES, OVERFLOW_SLOTS, Overflow, RUNQ_MAX_ENTRIES,
        SCHED_SWITCH_NEXT_PID, SCHED_SWITCH_PREV_PID, SCHED_SWITCH_PREV_STATE, SCHED_WAKEUP_PID,
        VICTIMS_MAX_ENTRIES, WAKE_TS_MAX_ENTRIES, WATCH_MAX_ENTRIES, WakeSlot, wake_slot,
    };

    #[map]
    static CGROUP_NET: PerCpuHashMap<u64, NetCounters> =
        PerCpuHashMap::with_max_entries(CGROUP_NET_MAX_ENTRIES, 0);

    #[map]
    static OVERFLOW: PerCpuArray<u64> = PerCpuArray::with_max_entries(OVERFLOW_SLOTS, 0);

    #[map]
    static WATCH: HashMap<u64, u8> = HashMap::with_max_entries(WATCH_MAX_ENTRIES, 0);

    #[map]
    static WATCH_COUNT: Array<u32> = Array::with_max_entries(1, 0);

    #[map]
    static ENDPOINT_NET: PerCpuHashMap<EndpointKey, NetCounters> =
        PerCpuHashMap::with_max_entries(ENDPOINT_NET_MAX_ENTRIES, 0);

    #[map]
    static CONNECTS: PerCpuHashMap<EndpointKey, u64> =
        PerCpuHashMap::with_max_entries(CONNECTS_MAX_ENTRIES, 0);

    /// Mmapable, so user space counts the slots in use by scanning memory (a syscall read of
    /// 65536 slots costs ~200 ms).
    #[map]
    static WAKE_TS: Array<WakeSlot> = Array::with_max_entries(WAKE_TS_MAX_ENTRIES, BPF_F_MMAPABLE);

    #[map]
    static PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static RUNQ: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(RUNQ_MAX_ENTRIES, 0);

    #[map]
    static VICTIMS: HashMap<u32, u8> = HashMap::with_max_entries(VICTIMS_MAX_ENTRIES, 0);

    #[map]
    static OOM_KILLS: PerCpuHashMap<u64, u64> =
        PerCpuHashMap::with_max_entries(OOM_KILLS_MAX_ENTRIES, 0);

    #[map]
    static CGROUP_PATHS: HashMap<u64, CgroupPath> =
        HashMap::with_max_entries(CGROUP_PATHS_MAX_ENTRIES, 0);

    /// Room to build a [`CgroupPath`] (too big for the 512-byte stack).
    #[map]
    static PATH_SCRATCH: PerCpuArray<CgroupPath> = PerCpuArray::with_max_entries(1, 0);

    const PASS: i32 = 1;
    const ALLOW: i32 = 1;

    /// Per CPU and [`Overflow`] slot: 1 once the first overflow was logged.
    #[map]
    static LOGGED: PerCpuArray<u8> = PerCpuArray::with_max_entries(OVERFLOW_SLOTS, 0);

    /// Counts `by` in an overflow slot; the first time on this CPU, also says so through
    /// aya-log (the agent logs it), so a full map shows in the log without polling.
    #[inline(always)]
    fn bump_overflow<C: EbpfContext>(ctx: &C, slot: Overflow, by: u64) {
        if let Some(p) = OVERFLOW.get_ptr_mut(slot as u32) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { *p = (*p).wrapping_add(by) };
        }
        if let Some(l) = LOGGED.get_ptr_mut(slot as u32) {
            // SAFETY: as above.
            unsafe {
                if *l == 0 {
                    *l = 1;
                    aya_log_ebpf::warn!(
                        ctx,
                        "eBPF map full: overflow slot {} counts what did not fit (logged once per CPU)",
                        slot as u32
                    );
                }
            }
        }
    }

    /// Adds one packet of `len` bytes to a per-CPU counter value.
    #[inline(always)]
    fn count(c: *mut NetCounters, ingress: bool, len: u64) {
        // SAFETY: `c` points at this CPU's copy of a per-CPU map value.
        unsafe {
            if ingress {
                (*c).rx_bytes += len;
                (*c).rx_packets += 1;
            } else {
                (*c).tx_bytes += len;
                (*c).tx_packets += 1;
            }
        }
    }

    #[inline(always)]
    fn first(ingress: bool, len: u64) -> NetCounters {
        let mut n = NetCounters::default();
        count(&mut n, ingress, len);
        n
    }

    /// Adds to `map[key]`, creating the entry; returns false when the map is full.
    #[inline(always)]
    fn add_net<K>(map: &PerCpuHashMap<K, NetCounters>, key: &K, ingress: bool, len: u64) -> bool {
        if let Some(c) = map.get_ptr_mut(key) {
            count(c, ingress, len);
            return true;
        }
        if map
            .insert(key, first(ingress, len), BPF_NOEXIST as u64)
            .is_ok()
        {
            return true;
        }
        // Either the map is full or another CPU inserted the key first; retry once.
        match map.get_ptr_mut(key) {
            Some(c) => {
                count(c, ingress, len);
                true
            }
            None => false,
        }
    }

    /// Adds `by` to a per-CPU u64 counter `map[key]`; counts a full map in `slot`.
    #[inline(always)]
    fn add_u64<C: EbpfContext, K>(
        ctx: &C,
        map: &PerCpuHashMap<K, u64>,
        key: &K,
        by: u64,
        slot: Overflow,
    ) {
        if let Some(c) = map.get_ptr_mut(key) {
            // SAFETY: this CPU's copy of a per-CPU value.
            unsafe { *c += by };
            return;
        }
        if map.insert(key, by, BPF_NOEXIST as u64).is_ok() {
            return;
        }
        match map.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(c) => unsafe { *c += by },
            None => bump_overflow(ctx, slot, 1),
        }
    }

    /// Whether `cgroup` is in `WATCH`. While nothing is watched (the usual case) the hash
    /// lookup is skipped: `WATCH_COUNT` is an array, whose lookup the verifier inlines.
    #[inline(always)]
    fn watched(cgroup: u64) -> bool {
        match WATCH_COUNT.get_ptr(0) {
            // SAFETY: a slot of an array map; user space writes it whole.
            Some(n) if unsafe { core::ptr::read_volatile(n) } == 0 => false,
            _ => WATCH.get_ptr(cgroup).is_some(),
        }
    }

    /// A port from a context field that holds a network-order u16 in a u32. Depending on the
    /// field and kernel it sits in the low or the high half (`__sk_buff.remote_port` is shifted
    /// up by 16 on little-endian kernels); the other half is zero.
    #[inline(always)]
    fn port_of(raw: u32) -> u16 {
        let v = if raw & 0xffff == 0 { raw >> 16 } else { raw };
        u16::from_be(v as u16)
    }

    /// `addr` as v4-mapped IPv6 for an IPv4 address in network order.
    #[inline(always)]
    fn mapped_v4(ip4: u32) -> [u8; 16] {
        let b = ip4.to_ne_bytes();
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
        ]
    }

    #[inline(always)]
    fn v6(w: [u32; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            a[i * 4] = b[0];
            a[i * 4 + 1] = b[1];
            a[i * 4 + 2] = b[2];
            a[i * 4 + 3] = b[3];
            i += 1;
        }
        a
    }

    #[inline(always)]
    fn account(ctx: &SkBuffContext, ingress: bool) {
        let skb = ctx.as_ptr() as *mut __sk_buff;
        // SAFETY: the context pointer is the program's own __sk_buff.
        let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
        let len = ctx.len() as u64;
        if !add_net(&CGROUP_NET, &cgroup, ingress, len) {
            if ingress {
                bump_overflow(ctx, Overflow::IngressPackets, 1);
                bump_overflow(ctx, Overflow::IngressBytes, len);
            } else {
                bump_overflow(ctx, Overflow::EgressPackets, 1);
                bump_overflow(ctx, Overflow::EgressBytes, len);
            }
        }
        if !watched(cgroup) {
            return;
        }
        // Context fields are read one u32 at a time (the verifier allows only 4-byte loads of
        // these), all of them and before any branch: the verifier wants every context load at a
        // constant offset from the unmodified context pointer, and loads under different
        // branches let LLVM share a moved base pointer between them ("dereference of modified
        // ctx ptr"). Volatile keeps the loads as they are written.
        // SAFETY: reads of the program's own context at constant offsets.
        let f = unsafe {
            [
                core::ptr::read_volatile(&raw const (*skb).family),
                core::ptr::read_volatile(&raw const (*skb).remote_ip4),
                core::ptr::read_volatile(&raw const (*skb).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*skb).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*skb).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*skb).remote_ip6[3]),
                core::ptr::read_volatile(&raw const (*skb).remote_port),
            ]
        };
        let (family, remote_port) = (f[0], f[6]);
        let addr = if family == AF_INET as u32 {
            mapped_v4(f[1])
        } else if family == AF_INET6 as u32 {
            v6([f[2], f[3], f[4], f[5]])
        } else {
            // No socket (or not IP): nothing to attribute to an endpoint.
            return;
        };
        let key = EndpointKey {
            cgroup,
            addr,
            port: port_of(remote_port),
            family: family as u16,
            pad: 0,
        };
        // Only endpoints this cgroup connected to (recorded by connect4/connect6): the
        // registries it pulls from, not the clients of servers it runs (whose ephemeral ports
        // would fill the map).
        if CONNECTS.get_ptr(&key).is_none() {
            return;
        }
        // Registry traffic is counted as TCP payload (the HTTP bytes), so it compares with
        // what the registry says it served whatever the segment sizes on the path were.
        let payload = len.saturating_sub(headers_len(ctx));
        if !add_net(&ENDPOINT_NET, &key, ingress, payload) {
            bump_overflow(ctx, Overflow::EndpointNet, 1);
        }
    }

    /// The IP and TCP header bytes at the start of the packet (cgroup_skb sees it from the
    /// network header on). Only TCP's header is looked into; for anything else (or a packet
    /// too short to read) the IP header alone, or 0.
    /// The IP version is the packet's own (a dual-stack socket sends IPv4 packets).
    #[inline(always)]
    fn headers_len(ctx: &SkBuffContext) -> u64 {
        const IPPROTO_TCP: u8 = 6;
        let Ok(vihl) = ctx.load::<u8>(0) else {
            return 0;
        };
        let (ip_len, proto) = if vihl >> 4 == 4 {
            let Ok(proto) = ctx.load::<u8>(9) else {
                return 0;
            };
            (((vihl & 0x0f) as usize) * 4, proto)
        } else {
            // The fixed IPv6 header; extension headers are not followed (TCP sockets do not
            // send them).
            let Ok(next) = ctx.load::<u8>(6) else {
                return 0;
            };
            (40usize, next)
        };
        if proto != IPPROTO_TCP || ip_len < 20 || ip_len > 60 {
            return ip_len as u64;
        }
        match ctx.load::<u8>(ip_len + 12) {
            Ok(off) => (ip_len + ((off >> 4) as usize) * 4) as u64,
            Err(_) => ip_len as u64,
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

    #[inline(always)]
    fn on_connect(ctx: &SockAddrContext, v4: bool) {
        // SAFETY: the helper takes no arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if !watched(cgroup) {
            return;
        }
        let sa = ctx.as_ptr() as *const bpf_sock_addr;
        // SAFETY: 4-byte reads of the program's own context at constant offsets.
        let (addr, raw_port, family) = unsafe {
            let addr = if v4 {
                mapped_v4(core::ptr::read_volatile(&raw const (*sa).user_ip4))
            } else {
                v6([
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
                ])
            };
            (
                addr,
                core::ptr::read_volatile(&raw const (*sa).user_port),
                core::ptr::read_volatile(&raw const (*sa).user_family),
            )
        };
        let key = EndpointKey {
            cgroup,
            addr,
            port: port_of(raw_port),
            family: family as u16,
            pad: 0,
        };
        add_u64(ctx, &CONNECTS, &key, 1, Overflow::Connects);
    }

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        on_connect(&ctx, true);
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn connect6(ctx: SockAddrContext) -> i32 {
        on_connect(&ctx, false);
        ALLOW
    }

    /// Reads a field of a classic tracepoint record (a direct context load).
    ///
    /// # Safety
    /// `off` must be inside the record and `T` the field's size (user space checks the layout
    /// against tracefs before attaching).
    #[inline(always)]
    unsafe fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
        unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(off) as *const T) }
    }

    /// Records that `pid` became runnable now in its `WAKE_TS` slot; a slot that held another
    /// thread's pending wake time (only thread ids that are equal modulo the slot count share
    /// one) loses that sample, counted as a `WakeTs` overflow.
    #[inline(always)]
    fn mark_runnable(ctx: &TracePointContext, pid: u32) {
        if pid == 0 {
            return;
        }
        let Some(slot) = WAKE_TS.get_ptr_mut(wake_slot(pid)) else {
            return;
        };
        // SAFETY: the helper takes no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: a slot of an array map (only the slot of `pid` is written; two CPUs write the
        // same slot only for the same thread or colliding ids, both rare and at worst one lost
        // sample).
        if unsafe { (*slot).mark(pid, now) } {
            bump_overflow(ctx, Overflow::WakeTs, 1);
        }
    }

    #[tracepoint]
    pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
        // SAFETY: offset checked by user space.
        mark_runnable(&ctx, unsafe { field::<u32>(&ctx, SCHED_WAKEUP_PID.offset) });
        0
    }

    #[tracepoint]
    pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
        // SAFETY: offset checked by user space.
        mark_runnable(&ctx, unsafe { field::<u32>(&ctx, SCHED_WAKEUP_PID.offset) });
        0
    }

    /// At a switch on this CPU: the task going off (`prev`, still the current task) gets the
    /// wait it had before it ran (PENDING) added to its cgroup; `next`'s wait becomes PENDING.
    /// So the wait lands on the right cgroup without reading task_struct.
    #[tracepoint]
    pub fn sched_switch(ctx: TracePointContext) -> u32 {
        // SAFETY: offsets checked by user space.
        let (prev_pid, prev_state, next_pid) = unsafe {
            (
                field::<u32>(&ctx, SCHED_SWITCH_PREV_PID.offset),
                field::<u64>(&ctx, SCHED_SWITCH_PREV_STATE.offset),
                field::<u32>(&ctx, SCHED_SWITCH_NEXT_PID.offset),
            )
        };
        let Some(pending) = PENDING.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: this CPU's slot of a per-CPU array.
        let waited = unsafe { *pending };
        if waited > 0 && prev_pid != 0 {
            // SAFETY: the helper takes no arguments.
            let cgroup = unsafe { bpf_get_current_cgroup_id() };
            add_u64(&ctx, &RUNQ, &cgroup, waited, Overflow::Runq);
        }
        // Still runnable (preempted; the tracepoint reports preemption as TASK_REPORT_MAX,
        // 0x100): it waits from now on.
        if prev_state & 0xff == 0 {
            mark_runnable(&ctx, prev_pid);
        } else if prev_pid != 0 {
            // Going to sleep (or exiting): a wake time recorded while it was still on the run
            // queue (a wakeup that found it runnable) is stale; without this, such a slot would
            // stay in use and count as a collision when another thread id lands on it.
            if let Some(slot) = WAKE_TS.get_ptr_mut(wake_slot(prev_pid)) {
                // SAFETY: a slot of an array map.
                unsafe { (*slot).clear(prev_pid) };
            }
        }
        let mut next_wait = 0;
        if next_pid != 0
            && let Some(slot) = WAKE_TS.get_ptr_mut(wake_slot(next_pid))
        {
            // SAFETY: a slot of an array map.
            if unsafe { (*slot).ts } != 0 {
                // SAFETY: the helper takes no arguments.
                let now = unsafe { bpf_ktime_get_ns() };
                // SAFETY: as above.
                next_wait = unsafe { (*slot).take(next_pid, now) };
            }
        }
        // Written only when it changes: most switches find it 0 and leave it 0.
        if next_wait != waited {
            // SAFETY: this CPU's slot of a per-CPU array.
            unsafe { *pending = next_wait };
        }
        0
    }

    #[tracepoint]
    pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
        // SAFETY: offset checked by user space.
        let pid: u32 = unsafe { field(&ctx, MARK_VICTIM_PID.offset) };
        if VICTIMS.insert(pid, 1u8, BPF_ANY as u64).is_err() {
            bump_overflow(&ctx, Overflow::Victims, 1);
        }
        0
    }

    #[tracepoint]
    pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
        // The exiting task is the current one; the low half is its thread id.
        // SAFETY: the helper takes no arguments.
        let pid = unsafe { bpf_get_current_pid_tgid() } as u32;
        if VICTIMS.get_ptr(pid).is_none() {
            return 0;
        }
        let _ = VICTIMS.remove(pid);
        // SAFETY: the helper takes no arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        add_u64(&ctx, &OOM_KILLS, &cgroup, 1, Overflow::OomKills);
        0
    }

    #[tracepoint]
    pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
        // SAFETY: offsets checked by user space.
        let (root, id, loc) = unsafe {
            (
                field::<i32>(&ctx, CGROUP_MKDIR_ROOT.offset),
                field::<u64>(&ctx, CGROUP_MKDIR_ID.offset),
                field::<u32>(&ctx, CGROUP_MKDIR_PATH.offset),
            )
        };
        if root != CGROUP2_HIERARCHY_ID {
            return 0;
        }
        let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else {
            return 0;
        };
        let off = (loc & 0xffff) as usize;
        // SAFETY: `buf` is this CPU's scratch value; the string is inside the record
        // (__data_loc offset), read with the kernel-string helper that bounds and NUL-ends it.
        let n = unsafe {
            let src = (ctx.as_ptr() as *const u8).add(off);
            bpf_probe_read_kernel_str(
                (*buf).path.as_mut_ptr() as *mut _,
                CGROUP_PATH_MAX as u32,
                src as *const _,
            )
        };
        if n <= 0 {
            return 0;
        }
        // SAFETY: as above; `n` counts the NUL.
        unsafe { (*buf).len = (n - 1) as u32 };
        // SAFETY: as above: the map copies the value.
        if CGROUP_PATHS
            .insert(id, unsafe { &*buf }, BPF_ANY as u64)
            .is_err()
        {
            bump_overflow(&ctx, Overflow::CgroupPaths, 1);
        }
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
