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

/// The cgroup2 path (relative to the cgroup2 root, e.g. "/k8s.io/abc") in the text of
/// `/proc/<pid>/cgroup`: the `0::` line. Pure.
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The cgroup2 id of a process (e.g. containerd's, or ragent's own with `"self"`): what to
/// pass to `Kernel::watch_cgroup`.
pub fn pid_cgroup_id(root: &Path, pid: &str) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let rel = unified_path(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {pid} has no cgroup2 line in /proc/{pid}/cgroup"),
        )
    })?;
    crate::adapters::kernel::cgroup_id(&root.join(rel.trim_start_matches('/')))
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
    fn unified_path_is_the_0_line() {
        let hybrid = "4:memory:/process_api/x\n1:cpu:/\n0::/k8s.io/abc\n";
        assert_eq!(unified_path(hybrid), Some("/k8s.io/abc"));
        assert_eq!(unified_path("0::/\n"), Some("/"));
        assert_eq!(unified_path("4:memory:/a\n"), None);
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }
}
