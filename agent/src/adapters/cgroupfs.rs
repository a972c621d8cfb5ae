//! Where the cgroup hierarchies are mounted: the cgroup2 ("unified") mount that eBPF attaches
//! to, and the v1 controllers of a hybrid or legacy node. Read from /proc/self/mountinfo.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no cgroup2 hierarchy is mounted on this node; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup-root"
    )]
    NoUnified,
    #[error("--cgroup-root {path} is not a cgroup2 mount ({reason}); pass the cgroup2 mount point")]
    NotCgroup2 { path: PathBuf, reason: String },
}

/// How the node mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Only cgroup2, usually at /sys/fs/cgroup.
    V2,
    /// v1 controllers plus a cgroup2 mount (e.g. /sys/fs/cgroup/unified).
    Hybrid,
    /// Only v1 controllers.
    V1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    pub mode: CgroupMode,
    /// The cgroup2 mount point.
    pub unified: Option<PathBuf>,
    /// v1 controller name -> mount point (`cpu`, `memory`, ... and `name=systemd`).
    pub v1: BTreeMap<String, PathBuf>,
}

/// Parses /proc/self/mountinfo text. Pure: tested on inline text.
pub fn parse_mountinfo(text: &str) -> CgroupLayout {
    let mut unified = None;
    let mut v1 = BTreeMap::new();
    for line in text.lines() {
        // id parent maj:min root mountpoint options [optional fields...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let Some(mount_point) = fields.get(4) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape(mount_point));
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let superopts = r.next().unwrap_or("");
        match fstype {
            "cgroup2" => {
                // Prefer the shortest (outermost) mount if there are several.
                let shorter = unified
                    .as_ref()
                    .is_none_or(|u: &PathBuf| mount_point.as_os_str().len() < u.as_os_str().len());
                if shorter {
                    unified = Some(mount_point);
                }
            }
            "cgroup" => {
                for opt in superopts.split(',') {
                    let is_controller = matches!(
                        opt,
                        "cpu"
                            | "cpuacct"
                            | "cpuset"
                            | "memory"
                            | "devices"
                            | "freezer"
                            | "blkio"
                            | "pids"
                            | "net_cls"
                            | "net_prio"
                            | "perf_event"
                            | "hugetlb"
                            | "rdma"
                            | "misc"
                    ) || opt.starts_with("name=");
                    if is_controller {
                        v1.entry(opt.to_string())
                            .or_insert_with(|| mount_point.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let mode = match (&unified, v1.is_empty()) {
        (Some(_), true) => CgroupMode::V2,
        (Some(_), false) => CgroupMode::Hybrid,
        (None, _) => CgroupMode::V1,
    };
    CgroupLayout { mode, unified, v1 }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads this node's layout.
pub fn detect() -> Result<CgroupLayout, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// The cgroup2 root to use: the one given (checked to be a cgroup2 mount) or the detected one.
pub fn resolve_root(given: Option<&Path>, layout: &CgroupLayout) -> Result<PathBuf, CgroupError> {
    match given {
        Some(p) => {
            if layout.unified.as_deref() == Some(p) {
                return Ok(p.to_path_buf());
            }
            // A sub-directory of the cgroup2 mount is a valid attach point too.
            match &layout.unified {
                Some(u) if p.starts_with(u) && p.is_dir() => Ok(p.to_path_buf()),
                Some(u) => Err(CgroupError::NotCgroup2 {
                    path: p.into(),
                    reason: format!("the cgroup2 mount is {}", u.display()),
                }),
                None => Err(CgroupError::NotCgroup2 {
                    path: p.into(),
                    reason: "this node has no cgroup2 mount".into(),
                }),
            }
        }
        None => layout.unified.clone().ok_or(CgroupError::NoUnified),
    }
}

/// The ids of every cgroup below (and including) a cgroup2 directory: the inode numbers that
/// `bpf_skb_cgroup_id` reports.
pub fn live_ids(root: &Path) -> std::collections::HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut ids = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(m) = std::fs::metadata(&dir) {
            ids.insert(m.ino());
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    ids
}

/// The cgroup id of a cgroup2 directory: its inode number, what `bpf_skb_cgroup_id` and
/// `bpf_get_current_cgroup_id` report.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// Every cgroup2 directory below (and including) `root`: id -> path relative to `root`
/// (`/` for the root itself, `/k8s.io/<id>` below it).
pub fn walk(root: &Path) -> std::collections::HashMap<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        if let Ok(m) = std::fs::metadata(&dir) {
            out.insert(
                m.ino(),
                if rel.is_empty() {
                    "/".into()
                } else {
                    rel.clone()
                },
            );
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let name = e.file_name().to_string_lossy().into_owned();
                stack.push((e.path(), format!("{rel}/{name}")));
            }
        }
    }
    out
}

/// The cgroup2 path of a process (`0::<path>` in /proc/<pid>/cgroup). Pure.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The cgroup2 path of process `pid` (`self` for the agent).
pub fn process_cgroup(pid: &str) -> Option<String> {
    parse_proc_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// A path from `/proc/<pid>/cgroup` as a path from the root of the whole cgroup2 tree. Such
/// paths are relative to the reader's cgroup namespace root and climb out of it with `..`
/// (`/../../system.slice/containerd.service` for containerd, seen from an agent in a pod's
/// private cgroup namespace); `ns_root` is where that root is in the tree (`/` in the host's
/// namespace). None when the path climbs above the tree's root. Pure.
pub fn resolve_ns_path(ns_root: &str, rel: &str) -> Option<String> {
    let mut parts: Vec<&str> = ns_root.split('/').filter(|p| !p.is_empty()).collect();
    for p in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if p == ".." {
            parts.pop()?;
        } else {
            parts.push(p);
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// `full` without its trailing `tail` (both absolute cgroup paths): the namespace root when
/// `full` is where this process is in the tree and `tail` what its namespace shows. Pure.
pub fn strip_tail(full: &str, tail: &str) -> Option<String> {
    let full: Vec<&str> = full.split('/').filter(|p| !p.is_empty()).collect();
    let tail: Vec<&str> = tail.split('/').filter(|p| !p.is_empty()).collect();
    let keep = full.len().checked_sub(tail.len())?;
    (full[keep..] == tail[..]).then(|| format!("/{}", full[..keep].join("/")))
}

/// Where this process's cgroup namespace root is in the cgroup2 tree mounted at `unified`:
/// `/` when the path `/proc/self/cgroup` shows is this process's directory in the tree (the
/// host's namespace); otherwise the directory whose `cgroup.procs` lists this process, less the
/// path its namespace shows. None when this process is not in the mounted tree (a mount of the
/// namespace's own subtree: what is outside it cannot be seen at all).
pub fn namespace_root(unified: &Path) -> Option<String> {
    let me = std::process::id().to_string();
    let lists_me = |rel: &str| {
        std::fs::read_to_string(
            unified
                .join(rel.trim_start_matches('/'))
                .join("cgroup.procs"),
        )
        .is_ok_and(|procs| procs.lines().any(|l| l.trim() == me))
    };
    let shown = process_cgroup("self")?;
    if lists_me(&shown) {
        return Some("/".into());
    }
    walk(unified)
        .into_values()
        .find(|rel| lists_me(rel))
        .and_then(|rel| strip_tail(&rel, &shown))
}

/// CPU and memory of one container's cgroup, from whichever hierarchy has them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupStats {
    pub cpu_seconds: Option<f64>,
    /// Usage minus inactive file pages (what the kubelet evicts on and OOM decisions follow).
    pub working_set_bytes: Option<u64>,
    /// OOM kills the memory controller recorded (v2 memory.events, v1 memory.oom_control).
    pub oom_kills: Option<u64>,
    /// The memory limit (v2 memory.max, v1 memory.limit_in_bytes); None when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// The CPU limit in cores from the CFS quota (v2 cpu.max, v1 cpu.cfs_quota_us over
    /// cpu.cfs_period_us); None when unlimited.
    pub cpu_limit_cores: Option<f64>,
}

/// v1 reports "no limit" as a huge page-aligned number; anything from 2^62 on is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// A memory limit file's content: `max` (v2) or a huge number (v1) is no limit. Pure.
pub fn memory_limit(text: &str) -> Option<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v < V1_UNLIMITED)
}

/// v2 `cpu.max` (`<quota|max> <period>`) in cores. Pure.
pub fn cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next().unwrap_or("100000").parse().ok()?;
    (period > 0).then(|| quota as f64 / period as f64)
}

/// v1 quota and period (`-1` quota is no limit) in cores. Pure.
pub fn cfs_quota(quota: &str, period: &str) -> Option<f64> {
    let q: i64 = quota.trim().parse().ok()?;
    let p: i64 = period.trim().parse().ok()?;
    (q > 0 && p > 0).then(|| q as f64 / p as f64)
}

/// A `key value` line of cpu.stat, memory.stat, memory.events or memory.oom_control. Pure.
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Working set from usage and inactive file bytes (never below zero). Pure.
pub fn working_set(usage: u64, inactive_file: u64) -> u64 {
    usage.saturating_sub(inactive_file)
}

/// Reads the figures of the cgroup at `rel` (a path relative to the cgroup roots, the same in
/// every hierarchy under the cgroupfs driver): cgroup2 first, v1 controllers on a hybrid or
/// legacy node. What no hierarchy has stays `None`.
pub fn read_stats(layout: &CgroupLayout, rel: &str) -> CgroupStats {
    let read = |base: Option<&PathBuf>, file: &str| -> Option<String> {
        std::fs::read_to_string(base?.join(rel.trim_start_matches('/')).join(file)).ok()
    };
    let unified = layout.unified.as_ref();
    let cpu_seconds = read(unified, "cpu.stat")
        .and_then(|t| stat_value(&t, "usage_usec"))
        .map(|us| us as f64 / 1e6)
        .or_else(|| {
            read(layout.v1.get("cpuacct"), "cpuacct.usage")
                .and_then(|t| t.trim().parse::<u64>().ok())
                .map(|ns| ns as f64 / 1e9)
        });
    let v2_memory = read(unified, "memory.current").and_then(|t| t.trim().parse::<u64>().ok());
    let (working_set_bytes, oom_kills) = match v2_memory {
        Some(usage) => {
            let inactive = read(unified, "memory.stat")
                .and_then(|t| stat_value(&t, "inactive_file"))
                .unwrap_or(0);
            let ooms = read(unified, "memory.events").and_then(|t| stat_value(&t, "oom_kill"));
            (Some(working_set(usage, inactive)), ooms)
        }
        None => {
            let mem = layout.v1.get("memory");
            let usage = read(mem, "memory.usage_in_bytes").and_then(|t| t.trim().parse().ok());
            let inactive = read(mem, "memory.stat")
                .and_then(|t| stat_value(&t, "total_inactive_file"))
                .unwrap_or(0);
            let ooms = read(mem, "memory.oom_control").and_then(|t| stat_value(&t, "oom_kill"));
            (usage.map(|u| working_set(u, inactive)), ooms)
        }
    };
    let memory_limit_bytes = match read(unified, "memory.max") {
        Some(t) => memory_limit(&t),
        None => {
            read(layout.v1.get("memory"), "memory.limit_in_bytes").and_then(|t| memory_limit(&t))
        }
    };
    let cpu_limit_cores = match read(unified, "cpu.max") {
        Some(t) => cpu_max(&t),
        None => {
            let cpu = layout.v1.get("cpu");
            read(cpu, "cpu.cfs_quota_us")
                .zip(read(cpu, "cpu.cfs_period_us"))
                .and_then(|(q, p)| cfs_quota(&q, &p))
        }
    };
    CgroupStats {
        cpu_seconds,
        working_set_bytes,
        oom_kills,
        memory_limit_bytes,
        cpu_limit_cores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/systemd rw,relatime shared:13 - cgroup cgroup rw,xattr,name=systemd
";

    const PURE_V2: &str = "\
30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 1 0:27 / /sys/fs/bpf rw,relatime shared:5 - bpf bpf rw,mode=700
";

    #[test]
    fn hybrid_layout() {
        let l = parse_mountinfo(HYBRID);
        assert_eq!(l.mode, CgroupMode::Hybrid);
        assert_eq!(
            l.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(l.v1["memory"], Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(l.v1["name=systemd"], Path::new("/sys/fs/cgroup/systemd"));
        assert!(!l.v1.contains_key("rw"));
    }

    #[test]
    fn pure_v2_layout() {
        let l = parse_mountinfo(PURE_V2);
        assert_eq!(l.mode, CgroupMode::V2);
        assert_eq!(l.unified.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(l.v1.is_empty());
    }

    #[test]
    fn v1_only_layout_has_no_root() {
        let text: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        let l = parse_mountinfo(&text);
        assert_eq!(l.mode, CgroupMode::V1);
        assert!(matches!(
            resolve_root(None, &l),
            Err(CgroupError::NoUnified)
        ));
    }

    #[test]
    fn given_root_must_be_the_cgroup2_mount() {
        let l = parse_mountinfo(HYBRID);
        assert!(resolve_root(Some(Path::new("/sys/fs/cgroup/unified")), &l).is_ok());
        let e = resolve_root(Some(Path::new("/sys/fs/cgroup/cpu")), &l).unwrap_err();
        assert!(e.to_string().contains("/sys/fs/cgroup/unified"), "{e}");
        assert_eq!(
            resolve_root(None, &l).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn paths_seen_from_a_cgroup_namespace_resolve_in_the_whole_tree() {
        let root = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope";
        assert_eq!(
            resolve_ns_path(root, "/../../../system.slice/containerd.service").as_deref(),
            Some("/system.slice/containerd.service")
        );
        assert_eq!(resolve_ns_path(root, "/").as_deref(), Some(root));
        assert_eq!(
            resolve_ns_path("/", "/system.slice/containerd.service").as_deref(),
            Some("/system.slice/containerd.service")
        );
        assert_eq!(resolve_ns_path("/a", "/../.."), None);
        assert_eq!(strip_tail("/a/b/c", "/").as_deref(), Some("/a/b/c"));
        assert_eq!(strip_tail("/a/b/c", "/c").as_deref(), Some("/a/b"));
        assert_eq!(strip_tail("/a/b/c", "/x"), None);
        assert_eq!(strip_tail("/a", "/a/b"), None);
    }

    #[test]
    fn limits_in_both_hierarchies() {
        assert_eq!(memory_limit("max\n"), None);
        assert_eq!(memory_limit("209715200\n"), Some(209_715_200));
        // v1's "unlimited" is the largest page-aligned i64.
        assert_eq!(memory_limit("9223372036854771712\n"), None);
        assert_eq!(cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(cpu_max("max 100000\n"), None);
        assert_eq!(cpu_max("150000 100000"), Some(1.5));
        assert_eq!(cfs_quota("-1\n", "100000\n"), None);
        assert_eq!(cfs_quota("25000\n", "100000\n"), Some(0.25));
    }

    #[test]
    fn stat_files_and_proc_cgroup() {
        let cpu = "usage_usec 5694082\nuser_usec 1425804\nsystem_usec 4268277\n";
        assert_eq!(stat_value(cpu, "usage_usec"), Some(5_694_082));
        assert_eq!(stat_value(cpu, "user"), None);
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(stat_value(oom, "oom_kill"), Some(2));
        assert_eq!(working_set(100, 30), 70);
        assert_eq!(working_set(10, 30), 0);
        let pc = "9:name=systemd:/\n4:memory:/k8s.io/abc\n0::/k8s.io/abc\n";
        assert_eq!(parse_proc_cgroup(pc).as_deref(), Some("/k8s.io/abc"));
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn stats_of_a_real_cgroup() {
        // The agent's own cgroup exists on every node with cgroups; CPU is always readable.
        let Ok(layout) = detect() else { return };
        let Some(rel) = process_cgroup("self") else {
            return;
        };
        let s = read_stats(&layout, &rel);
        if layout.unified.is_some() || layout.v1.contains_key("cpuacct") {
            assert!(s.cpu_seconds.is_some_and(|c| c > 0.0), "{s:?} at {rel}");
        }
        let ids = walk(
            layout
                .unified
                .as_deref()
                .unwrap_or(Path::new("/nonexistent")),
        );
        if let Some(u) = &layout.unified {
            assert_eq!(
                ids.get(&cgroup_id(u).unwrap()).map(String::as_str),
                Some("/")
            );
        }
    }
}
