//! The agent's own CPU and memory, from /proc/self (for the `ragent_process_*` metrics).

/// What the agent costs the node right now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

/// Parses /proc/self/stat: utime (field 14) + stime (15) in clock ticks, threads (20).
/// The command name (field 2) may contain spaces and parentheses: fields are counted after the
/// last ')'.
pub fn parse_stat(stat: &str, ticks_per_second: u64) -> Option<(f64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let threads: u64 = f.get(17)?.parse().ok()?;
    Some((
        (utime + stime) as f64 / ticks_per_second.max(1) as f64,
        threads,
    ))
}

/// Parses /proc/self/statm: resident pages (second field).
pub fn parse_statm(statm: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size)
}

/// Reads the agent's own figures. Missing files give zeros, never an error: these are
/// best-effort observability, not a reason to fail.
pub fn read_self() -> ProcessStats {
    // SAFETY: sysconf has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    // SAFETY: as above.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let (cpu_seconds, threads) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s, ticks))
        .unwrap_or_default();
    let resident_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| parse_statm(&s, page))
        .unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or_default();
    ProcessStats {
        cpu_seconds,
        resident_bytes,
        open_fds,
        threads,
    }
}

/// `MemTotal` of /proc/meminfo in bytes. Pure.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// This machine's capacity: online CPUs and memory (for the instance-shape advice when no
/// Node object says it).
pub fn machine_capacity() -> Option<(f64, u64)> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let memory = parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)?;
    (cpus > 0).then_some((cpus as f64, memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let m = "MemTotal:        8129740 kB\nMemFree:          123 kB\n";
        assert_eq!(parse_mem_total(m), Some(8_129_740 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert!(machine_capacity().is_some_and(|(c, m)| c >= 1.0 && m > 0));
    }

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let stat = "1234 (rag ent (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 100 1000 200 18446744073709551615";
        let (cpu, threads) = parse_stat(stat, 100).unwrap();
        assert!((cpu - 3.0).abs() < 1e-9);
        assert_eq!(threads, 7);
    }

    #[test]
    fn statm_resident() {
        assert_eq!(
            parse_statm("1000 250 100 1 0 300 0", 4096),
            Some(250 * 4096)
        );
        assert_eq!(parse_statm("", 4096), None);
    }

    #[test]
    fn reads_this_process() {
        let s = read_self();
        assert!(s.resident_bytes > 0 && s.open_fds > 0 && s.threads > 0);
    }
}
