//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+): a few syscalls per map instead
//! of two per entry (aya 0.14 has no batch API). A scrape with thousands of cgroups in the maps
//! stays in the low milliseconds this way. Callers fall back to aya's iterators when the kernel
//! refuses the command.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `bpf(2)` command number of BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call: a batch must hold at least one whole hash bucket, and buckets
/// are far smaller than this.
const CHUNK: u32 = 1024;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    map_fd: u32,
    _pad0: u32,
    keys: u64,
    values: u64,
    count: u32,
    _pad1: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash map. `cpus` is `Some(n)` for per-CPU maps: each value is then
/// `n` copies of `V`, each padded to 8 bytes, as the kernel lays them out.
///
/// # Safety
/// `K` and `V` must be the map's key and value types: plain-old-data of the map's key and
/// value sizes.
pub unsafe fn lookup_all<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    cpus: Option<usize>,
) -> io::Result<Vec<(K, Vec<V>)>> {
    let key_size = size_of::<K>();
    let (stride, per_value) = match cpus {
        Some(n) => (size_of::<V>().div_ceil(8) * 8, n),
        None => (size_of::<V>(), 1),
    };
    let value_size = stride * per_value;
    let mut keys = vec![0u8; key_size * CHUNK as usize];
    let mut values = vec![0u8; value_size * CHUNK as usize];
    let mut out = Vec::new();
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token_in as u64 },
            out_batch: &raw mut token_out as u64,
            map_fd: fd.as_raw_fd() as u32,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of CHUNK keys and values of the map's sizes, and
        // at u64 tokens (the kernel's hash batch token is a u32); all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let done = if rc == 0 {
            false
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        };
        for i in 0..attr.count as usize {
            // SAFETY: the kernel filled `count` keys and values; reads stay inside the buffers.
            let k: K = unsafe { std::ptr::read_unaligned(keys[i * key_size..].as_ptr().cast()) };
            let base = i * value_size;
            let v: Vec<V> = (0..per_value)
                .map(|c| {
                    // SAFETY: as above.
                    unsafe { std::ptr::read_unaligned(values[base + c * stride..].as_ptr().cast()) }
                })
                .collect();
            out.push((k, v));
        }
        if done {
            return Ok(out);
        }
        first = false;
        token_in = token_out;
    }
}
