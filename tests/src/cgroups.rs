//! Ground truth for CPU and memory tests: what the kernel's cgroup files say about a process's
//! cgroup, on cgroup v1 controllers (hybrid hosts like this one) and on cgroup v2.
use std::{fs, path::PathBuf};

/// Where a process's cgroup of `controller` lives: the v1 hierarchy that carries the
/// controller if there is one, else the cgroup2 hierarchy.
pub fn controller_dir(pid: u32, controller: &str) -> Option<PathBuf> {
    controller_dir_in(
        &fs::read_to_string("/proc/self/mountinfo").ok()?,
        &fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?,
        controller,
    )
}

fn controller_dir_in(mountinfo: &str, proc_cgroup: &str, controller: &str) -> Option<PathBuf> {
    // v1: a `cgroup` mount whose super options name the controller, and the process's line
    // `N:ctrl[,ctrl]:/path`.
    let v1_mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        if r.next()? != "cgroup" || !r.nth(1)?.split(',').any(|o| o == controller) {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    });
    if let Some(mount) = v1_mount {
        let path = proc_cgroup.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls.split(',').any(|c| c == controller).then_some(path)
        })?;
        return Some(mount.join(path.trim_start_matches('/')));
    }
    let v2_mount = crate::node::cgroup2_mount_in(mountinfo)?;
    let path = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(v2_mount.join(path.trim_start_matches('/')))
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k != key {
            return None;
        }
        v.trim().parse().ok()
    })
}

/// The working set of the process's memory cgroup as kubelet (cAdvisor) computes it: usage
/// minus inactive file pages (v1: `memory.usage_in_bytes - total_inactive_file`, v2:
/// `memory.current - inactive_file`).
pub fn working_set_bytes(pid: u32) -> Option<u64> {
    let d = controller_dir(pid, "memory")?;
    let stat = fs::read_to_string(d.join("memory.stat")).ok()?;
    if let Ok(u) = fs::read_to_string(d.join("memory.usage_in_bytes")) {
        let usage: u64 = u.trim().parse().ok()?;
        return Some(usage.saturating_sub(stat_value(&stat, "total_inactive_file")?));
    }
    let usage: u64 = fs::read_to_string(d.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(usage.saturating_sub(stat_value(&stat, "inactive_file")?))
}

/// CPU time the process's cgroup used, in seconds (v1 `cpuacct.usage`, v2 `cpu.stat`
/// `usage_usec`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let d = controller_dir(pid, "cpuacct")?;
    if let Ok(ns) = fs::read_to_string(d.join("cpuacct.usage")) {
        return Some(ns.trim().parse::<f64>().ok()? / 1e9);
    }
    let stat = fs::read_to_string(d.join("cpu.stat")).ok()?;
    Some(stat_value(&stat, "usage_usec")? as f64 / 1e6)
}

/// The CPU limit of the process's cgroup in cores, `None` without one (v1
/// `cpu.cfs_quota_us / cpu.cfs_period_us`, quota -1 meaning none; v2 `cpu.max`, `max` none).
pub fn cpu_limit_cores(pid: u32) -> Option<f64> {
    let d = controller_dir(pid, "cpu")?;
    if let Ok(q) = fs::read_to_string(d.join("cpu.cfs_quota_us")) {
        let p = fs::read_to_string(d.join("cpu.cfs_period_us")).ok()?;
        return quota_cores(q.trim(), p.trim());
    }
    let max = fs::read_to_string(d.join("cpu.max")).ok()?;
    let (q, p) = max.trim().split_once(' ')?;
    quota_cores(q, p)
}

fn quota_cores(quota: &str, period: &str) -> Option<f64> {
    let q: i64 = quota.parse().ok()?;
    let p: i64 = period.parse().ok()?;
    (q > 0 && p > 0).then(|| q as f64 / p as f64)
}

/// The memory limit of the process's cgroup in bytes, `None` without one (v1
/// `memory.limit_in_bytes`, where no limit reads as a huge page-rounded number; v2
/// `memory.max`, `max` none).
pub fn memory_limit_bytes(pid: u32) -> Option<u64> {
    let d = controller_dir(pid, "memory")?;
    let text = fs::read_to_string(d.join("memory.limit_in_bytes"))
        .or_else(|_| fs::read_to_string(d.join("memory.max")))
        .ok()?;
    memory_limit(text.trim())
}

fn memory_limit(text: &str) -> Option<u64> {
    // v1 reports "no limit" as PAGE_COUNTER_MAX pages: anything from 2^62 up is none.
    text.parse::<u64>().ok().filter(|v| *v < 1 << 62)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 30 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n\
                          35 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                          41 30 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
    const V2: &str = "25 23 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";

    #[test]
    fn finds_v1_controllers_and_falls_back_to_cgroup2() {
        let proc = "4:memory:/k8s.io/abc\n2:cpuacct:/k8s.io/abc\n0::/k8s.io/abc\n";
        assert_eq!(
            controller_dir_in(HYBRID, proc, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/k8s.io/abc"))
        );
        assert_eq!(
            controller_dir_in(HYBRID, proc, "cpuacct"),
            Some(PathBuf::from("/sys/fs/cgroup/cpuacct/k8s.io/abc"))
        );
        assert_eq!(
            controller_dir_in(V2, "0::/k8s.io/abc\n", "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/k8s.io/abc"))
        );
    }

    #[test]
    fn reads_limits_and_their_absence() {
        assert_eq!(quota_cores("50000", "100000"), Some(0.5));
        assert_eq!(quota_cores("-1", "100000"), None);
        assert_eq!(quota_cores("max", "100000"), None);
        assert_eq!(memory_limit("67108864"), Some(64 << 20));
        assert_eq!(memory_limit("9223372036854771712"), None);
        assert_eq!(memory_limit("max"), None);
    }

    #[test]
    fn reads_stat_keys_exactly() {
        let stat = "inactive_file 10\ntotal_inactive_file 30\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(10));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(30));
        assert_eq!(stat_value(stat, "active_file"), None);
    }
}
