//! What the node offers eBPF before anything is loaded: BTF, bpffs, tracefs (mounted when
//! missing), whether the cgroup root is a cgroup2 mount, and whether each classic tracepoint's
//! record layout is the one the programs were compiled against.
//!
//! bpffs: ragent pins nothing (its programs and maps live as long as the agent and are loaded
//! again at start), so it needs no bpffs; the probe only reports whether one is mounted.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use ragent_ebpf::Tracepoint;

/// What was found (and mounted) on this node.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// /sys/kernel/btf/vmlinux exists (not needed by ragent's programs, reported for support).
    pub btf: bool,
    /// Where bpffs is mounted, if it is (ragent does not need it).
    pub bpffs: Option<PathBuf>,
    /// Where tracefs is mounted, if it is or ragent mounted it.
    pub tracefs: Option<PathBuf>,
    /// One sentence per thing worth telling the operator (mounted tracefs, no bpffs, ...).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{tracepoint} has no field {field}")]
    MissingField {
        tracepoint: String,
        field: &'static str,
    },
    #[error(
        "{tracepoint}: field {field} is at offset {got_offset} size {got_size} on this kernel, ragent reads offset {want_offset} size {want_size}"
    )]
    Differs {
        tracepoint: String,
        field: &'static str,
        want_offset: usize,
        want_size: usize,
        got_offset: usize,
        got_size: usize,
    },
}

/// One `field:` line of a tracefs `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Parses the text of `<tracefs>/events/<category>/<name>/format`. Pure.
pub fn parse_format(text: &str) -> Vec<FormatField> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for (i, part) in rest.split(';').enumerate() {
            let part = part.trim();
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "char comm[16]" -> comm; "__data_loc char[] path" -> path; "long prev_state" -> prev_state
        let decl = match decl.find('[') {
            Some(i) if decl.ends_with(']') => &decl[..i],
            _ => decl,
        };
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        out.push(FormatField {
            name: name.to_string(),
            offset,
            size,
        });
    }
    out
}

/// Checks that every field a program reads is where it expects it. Pure.
pub fn check_layout(tp: &Tracepoint, format: &str) -> Result<(), FormatError> {
    let fields = parse_format(format);
    let tracepoint = format!("{}/{}", tp.category, tp.name);
    for want in tp.fields {
        let Some(got) = fields.iter().find(|f| f.name == want.name) else {
            return Err(FormatError::MissingField {
                tracepoint,
                field: want.name,
            });
        };
        if got.offset != want.offset || got.size != want.size {
            return Err(FormatError::Differs {
                tracepoint,
                field: want.name,
                want_offset: want.offset,
                want_size: want.size,
                got_offset: got.offset,
                got_size: got.size,
            });
        }
    }
    Ok(())
}

/// Reads the format file of `tp` under `tracefs` and checks it; the error is one line that says
/// what is wrong and what it means.
pub fn verify_tracepoint(tracefs: &Path, tp: &Tracepoint) -> Result<(), String> {
    let path = tracefs
        .join("events")
        .join(tp.category)
        .join(tp.name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "tracepoint {}/{} is not available ({}: {e}); this kernel lacks it",
            tp.category,
            tp.name,
            path.display()
        )
    })?;
    check_layout(tp, &text).map_err(|e| {
        format!("{e}: the record layout differs from the one ragent was built for; use a ragent built for this kernel")
    })
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem magic of `path` (statfs), or None when it cannot be read.
fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// Whether `path` is a directory on a cgroup2 filesystem.
pub fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path) == Some(CGROUP2_SUPER_MAGIC)
}

fn mount_fs(path: &Path, fstype: &std::ffi::CStr) -> Result<(), std::io::Error> {
    std::fs::create_dir_all(path)?;
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all pointers are valid NUL-terminated strings; no mount data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Looks at BTF, bpffs and tracefs; mounts bpffs and tracefs where they are missing (ragent
/// needs tracefs for its tracepoints; it pins nothing, but a node agent that loads eBPF leaves
/// the node with bpffs where `bpftool` and other agents expect it).
pub fn probe(bpffs: &Path, tracefs: &Path) -> Probe {
    let mut p = Probe {
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        ..Probe::default()
    };
    if !p.btf {
        p.notes.push(
            "no BTF at /sys/kernel/btf/vmlinux (ragent's programs do not need it)".to_string(),
        );
    }
    if fs_magic(bpffs) == Some(BPF_FS_MAGIC) {
        p.bpffs = Some(bpffs.to_path_buf());
    } else {
        match mount_fs(bpffs, c"bpf") {
            Ok(()) => {
                p.notes.push(format!("mounted bpffs at {}", bpffs.display()));
                p.bpffs = Some(bpffs.to_path_buf());
            }
            Err(e) => p.notes.push(format!(
                "bpffs is not mounted at {} and mounting it failed: {e} (ragent pins nothing and runs on)",
                bpffs.display()
            )),
        }
    }
    if fs_magic(tracefs) == Some(TRACEFS_MAGIC) {
        p.tracefs = Some(tracefs.to_path_buf());
    } else {
        match mount_fs(tracefs, c"tracefs") {
            Ok(()) => {
                p.notes
                    .push(format!("mounted tracefs at {}", tracefs.display()));
                p.tracefs = Some(tracefs.to_path_buf());
            }
            Err(e) => p.notes.push(format!(
                "tracefs is not mounted at {} and mounting it failed: {e}",
                tracefs.display()
            )),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragent_ebpf::{TP_CGROUP_MKDIR, TP_SCHED_SWITCH};

    const SWITCH: &str = "name: sched_switch
ID: 372
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;

print fmt: \"prev_comm=%s\"
";

    const MKDIR: &str = "name: cgroup_mkdir
format:
\tfield:int root;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int level;\toffset:12;\tsize:4;\tsigned:1;
\tfield:u64 id;\toffset:16;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] path;\toffset:24;\tsize:4;\tsigned:0;
";

    #[test]
    fn parses_names_offsets_and_sizes() {
        let f = parse_format(SWITCH);
        assert_eq!(f.len(), 11);
        assert_eq!(
            f[4],
            FormatField {
                name: "prev_comm".into(),
                offset: 8,
                size: 16
            }
        );
        let p = parse_format(MKDIR);
        assert_eq!(p[3].name, "path");
        assert_eq!(p[3].offset, 24);
    }

    #[test]
    fn accepts_this_kernels_layout() {
        assert_eq!(check_layout(&TP_SCHED_SWITCH, SWITCH), Ok(()));
        assert_eq!(check_layout(&TP_CGROUP_MKDIR, MKDIR), Ok(()));
    }

    #[test]
    fn refuses_a_moved_field() {
        // A kernel where prev_state grew a neighbour: next_pid moved.
        let moved = SWITCH.replace("offset:56;", "offset:64;");
        let e = check_layout(&TP_SCHED_SWITCH, &moved).unwrap_err();
        assert_eq!(
            e,
            FormatError::Differs {
                tracepoint: "sched/sched_switch".into(),
                field: "next_pid",
                want_offset: 56,
                want_size: 4,
                got_offset: 64,
                got_size: 4,
            }
        );
        // A field whose size changed is refused too.
        let narrower = SWITCH.replace(
            "long prev_state;\toffset:32;\tsize:8",
            "int prev_state;\toffset:32;\tsize:4",
        );
        assert!(matches!(
            check_layout(&TP_SCHED_SWITCH, &narrower),
            Err(FormatError::Differs {
                field: "prev_state",
                ..
            })
        ));
    }

    #[test]
    fn refuses_a_missing_field() {
        let renamed = MKDIR.replace(" id;", " ident;");
        assert_eq!(
            check_layout(&TP_CGROUP_MKDIR, &renamed),
            Err(FormatError::MissingField {
                tracepoint: "cgroup/cgroup_mkdir".into(),
                field: "id"
            })
        );
    }
}
