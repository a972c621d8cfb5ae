//! The eBPF programs on the real kernel, through `ragent::adapters::kernel::Kernel`: each test
//! makes a fresh cgroup2 directory below the cgroup2 root, runs a process in it and checks what
//! the maps say about that cgroup id. They need root and no test node; without root, or when
//! the kernel lacks a feature, they print why and skip.
use std::{
    io::Read,
    net::TcpListener,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ragent::adapters::{
    cgroupfs,
    kernel::{Endpoint, Feature, FeatureStatus, Kernel, KernelOptions, KernelSnapshot},
};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A cgroup directory this test made; removed (children first) on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(parent: &Path, name: &str) -> Dir {
        let p = parent.join(format!("ragent-ktest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir(&p);
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        Dir(p)
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.0).expect("stat cgroup").ino()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // Processes in it have exited (the tests wait for them); a cgroup with a zombie still
        // counts as busy for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn root() -> PathBuf {
    let layout = cgroupfs::detect().expect("reading mountinfo");
    cgroupfs::resolve_root(None, &layout).expect("a cgroup2 mount")
}

/// Loads the programs, or says why the test cannot run. `needs` must all be available.
fn load(needs: &[Feature]) -> Option<(Kernel, PathBuf)> {
    if !is_root() {
        eprintln!("skipped: loading eBPF needs root");
        return None;
    }
    let root = root();
    let (kernel, probe, statuses) = Kernel::load(&KernelOptions::new(&root));
    eprintln!("probe: {probe:?}");
    let missing: Vec<&FeatureStatus> = statuses
        .iter()
        .filter(|s| needs.contains(&s.feature) && !s.available)
        .collect();
    if !missing.is_empty() {
        let why: Vec<String> = missing
            .iter()
            .map(|s| format!("{}: {}", s.feature.as_str(), s.detail))
            .collect();
        if std::env::var("RAGENT_STRICT_TESTS").is_ok_and(|v| v == "1") {
            panic!("this kernel lacks what the test needs: {}", why.join("; "));
        }
        eprintln!("skipped: {}", why.join("; "));
        return None;
    }
    Some((kernel.expect("programs attached"), root))
}

/// A command whose process moves itself into `cgroup_procs` files before exec (and, with
/// `cpu`, pins itself to that CPU).
fn in_cgroups(program: &str, args: &[&str], procs: &[PathBuf], cpu: Option<usize>) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    let procs: Vec<std::ffi::CString> = procs
        .iter()
        .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path"))
        .collect();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe libc
    // functions (open, write, close, sched_setaffinity) on memory prepared before the fork.
    unsafe {
        c.pre_exec(move || {
            let mut digits = [0u8; 16];
            let mut pid = libc::getpid() as u32;
            let mut n = 0;
            loop {
                digits[15 - n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let w = libc::write(fd, digits[16 - n..].as_ptr().cast(), n);
                libc::close(fd);
                if w < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    c
}

fn read(k: &mut Kernel) -> KernelSnapshot {
    k.read().expect("reading the maps")
}

#[test]
fn kernel_counts_bytes_endpoints_and_connects_of_a_cgroup() {
    let Some((mut kernel, root)) = load(&[Feature::Net, Feature::Endpoints, Feature::Connect])
    else {
        return;
    };
    let dir = Dir::new(&root, "net");
    let id = dir.id();
    kernel.watch_cgroup(id).expect("watch");
    // The listener stays in this process's cgroup (another one).
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    const PAYLOAD: u64 = 8 * 1024 * 1024;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    });
    let script = format!("head -c {PAYLOAD} /dev/zero > /dev/tcp/127.0.0.1/{port}");
    let status = in_cgroups(
        "bash",
        &["-c", &script],
        &[dir.0.join("cgroup.procs")],
        None,
    )
    .status()
    .expect("running bash");
    assert!(status.success(), "the sender failed: {status}");
    assert_eq!(reader.join().expect("reader"), PAYLOAD);
    std::thread::sleep(Duration::from_millis(100));
    let snap = read(&mut kernel);
    let net = snap
        .net
        .by_cgroup
        .get(&id)
        .copied()
        .unwrap_or_else(|| panic!("no CGROUP_NET entry for cgroup {id}"));
    let ratio = net.tx_bytes as f64 / PAYLOAD as f64;
    eprintln!("cgroup {id}: {net:?}, tx/payload {ratio:.4}");
    assert!(
        (1.0..=1.05).contains(&ratio),
        "tx {} for a {PAYLOAD}-byte payload",
        net.tx_bytes
    );
    let ep = Endpoint {
        cgroup: id,
        addr: "127.0.0.1".parse().expect("ip"),
        port,
    };
    let mine: Vec<_> = snap
        .endpoints
        .iter()
        .filter(|(e, _)| e.cgroup == id)
        .collect();
    let counted = snap
        .endpoints
        .get(&ep)
        .unwrap_or_else(|| panic!("no endpoint {ep:?}; this cgroup's: {mine:?}"));
    let ratio = counted.tx_bytes as f64 / PAYLOAD as f64;
    eprintln!("endpoint {ep:?}: {counted:?}, tx/payload {ratio:.4}");
    assert!((1.0..=1.05).contains(&ratio), "endpoint tx {counted:?}");
    assert_eq!(mine.len(), 1, "one remote endpoint only: {mine:?}");
    assert_eq!(
        snap.connects.get(&ep).copied(),
        Some(1),
        "connects: {:?}",
        snap.connects
    );
    // Unwatched cgroups get no endpoint entries: this process's own is not watched.
    let own_path = cgroupfs::process_cgroup("self").expect("own cgroup");
    let own =
        cgroupfs::cgroup_id(&root.join(own_path.trim_start_matches('/'))).expect("own cgroup id");
    assert!(snap.endpoints.keys().all(|e| e.cgroup != own));
    kernel.unwatch_cgroup(id).expect("unwatch");
    drop(dir);
    // The cgroup is gone: its entries go once they have been read (they were, above).
    let live = cgroupfs::live_ids(&root);
    assert!(kernel.retire_dead(&live).expect("retire") >= 3);
    let after = read(&mut kernel);
    assert!(!after.net.by_cgroup.contains_key(&id));
    assert!(after.endpoints.keys().all(|e| e.cgroup != id));
    assert!(after.connects.keys().all(|e| e.cgroup != id));
    assert!(after.net.retired.tx_bytes >= net.tx_bytes);
    let fills: Vec<_> = after.maps.iter().map(|m| m.name).collect();
    assert!(fills.contains(&"ENDPOINT_NET"), "{fills:?}");
}

#[test]
fn kernel_measures_run_queue_wait_of_a_cgroup() {
    let Some((mut kernel, root)) = load(&[Feature::Sched]) else {
        return;
    };
    let dir = Dir::new(&root, "sched");
    let id = dir.id();
    // Three busy loops sharing one CPU for a second: each waits about two thirds of it.
    let script = "for i in 1 2 3; do timeout 1 sh -c 'while :; do :; done' & done; wait";
    let t0 = Instant::now();
    let status = in_cgroups(
        "sh",
        &["-c", script],
        &[dir.0.join("cgroup.procs")],
        Some(0),
    )
    .status()
    .expect("running sh");
    assert!(status.success(), "{status}");
    let wall = t0.elapsed();
    let snap = read(&mut kernel);
    let waited = snap.runq_ns.get(&id).copied().unwrap_or(0);
    eprintln!(
        "cgroup {id}: waited {:.3} s runnable over {:.3} s of 3 loops on one CPU",
        waited as f64 / 1e9,
        wall.as_secs_f64()
    );
    assert!(
        waited >= 500_000_000,
        "run-queue wait {waited} ns; expected ≥ 0.5 s"
    );
    // No more than the loops could have waited (3 × the wall time).
    assert!(waited as f64 <= 3.0 * wall.as_secs_f64() * 1e9);
    // Wake times are deleted when their task runs or sleeps: only runnable tasks have one.
    let wake = snap
        .maps
        .iter()
        .find(|m| m.name == "WAKE_TS")
        .expect("WAKE_TS fill");
    eprintln!("WAKE_TS: {wake:?}");
    assert!(wake.entries < 1024 && wake.overflow == 0, "{wake:?}");
}

#[test]
fn kernel_records_paths_of_new_cgroups() {
    let Some((mut kernel, root)) = load(&[Feature::CgroupPaths]) else {
        return;
    };
    let parent = Dir::new(&root, "paths");
    let child = Dir(parent.0.join("short-lived"));
    std::fs::create_dir(&child.0).expect("mkdir child");
    let id = child.id();
    let want = format!(
        "/{}",
        child
            .0
            .strip_prefix(&root)
            .expect("below the root")
            .display()
    );
    // A cgroup removed before anyone looked is still named.
    drop(child);
    let snap = read(&mut kernel);
    assert_eq!(
        snap.cgroup_paths.get(&id),
        Some(&want),
        "paths: {:?}",
        snap.cgroup_paths
    );
    assert_eq!(
        snap.cgroup_paths.get(&parent.id()).map(String::as_str),
        Some(
            format!(
                "/{}",
                parent.0.strip_prefix(&root).expect("below").display()
            )
            .as_str()
        )
    );
    kernel.forget_paths(&[id]).expect("forget");
    assert!(!read(&mut kernel).cgroup_paths.contains_key(&id));
}

/// The v1 memory cgroup of this process (hybrid nodes), where a child memory cgroup can limit
/// a test process.
fn own_memcg_v1() -> Option<PathBuf> {
    let layout = cgroupfs::detect().ok()?;
    let mount = layout.v1.get("memory")?.clone();
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })?;
    Some(mount.join(rel.trim_start_matches('/')))
}

#[test]
fn kernel_counts_an_oom_kill_in_the_victims_cgroup() {
    let Some((mut kernel, root)) = load(&[Feature::Oom]) else {
        return;
    };
    let v2 = Dir::new(&root, "oom");
    let id = v2.id();
    // Where can memory be limited? cgroup2 when its memory controller is there, else v1.
    let v2_memory = std::fs::read_to_string(root.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == "memory");
    let (limit_dir, procs) = if v2_memory {
        std::fs::write(v2.0.join("memory.max"), "33554432").expect("memory.max");
        std::fs::write(v2.0.join("memory.swap.max"), "0").ok();
        (None, vec![v2.0.join("cgroup.procs")])
    } else {
        let Some(parent) = own_memcg_v1() else {
            eprintln!("skipped: no memory controller on cgroup2 nor on v1");
            return;
        };
        let m = Dir::new(&parent, "oom");
        std::fs::write(m.0.join("memory.limit_in_bytes"), "33554432").expect("limit_in_bytes");
        // No swap here; if there were, keep the test process from swapping instead of dying.
        std::fs::write(m.0.join("memory.memsw.limit_in_bytes"), "33554432").ok();
        let procs = vec![v2.0.join("cgroup.procs"), m.0.join("cgroup.procs")];
        (Some(m), procs)
    };
    // `tail` keeps a line in memory until it ends: /dev/zero has none, so it grows until the
    // memory cgroup's OOM killer kills it (only it: it is alone in that memory cgroup).
    let status = in_cgroups("tail", &["/dev/zero"], &procs, None)
        .status()
        .expect("running tail");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "tail was not OOM-killed: {status}"
    );
    let snap = read(&mut kernel);
    assert_eq!(
        snap.oom_kills.get(&id).copied(),
        Some(1),
        "oom kills: {:?}",
        snap.oom_kills
    );
    drop(limit_dir);
}

/// Captures `log` records (aya-log forwards the programs' records to the `log` facade).
struct Captured(std::sync::Mutex<Vec<String>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        if let Ok(mut v) = self.0.lock() {
            v.push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

static CAPTURED: Captured = Captured(std::sync::Mutex::new(Vec::new()));

#[test]
fn kernel_counts_what_does_not_fit_and_says_so_once() {
    // Only this test in the e2e binary sets a logger; before the load, which hands the
    // `log` logger of that moment to aya-log.
    if log::set_logger(&CAPTURED).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    let Some((mut kernel, root)) = load(&[Feature::CgroupPaths]) else {
        return;
    };
    let parent = Dir::new(&root, "full");
    let before = read(&mut kernel);
    let fill = |s: &KernelSnapshot| {
        s.maps
            .iter()
            .find(|m| m.name == "CGROUP_PATHS")
            .cloned()
            .expect("CGROUP_PATHS fill")
    };
    let was = fill(&before);
    let cap = was.capacity;
    // More directories than the map can hold.
    let extra = 64;
    let n = cap as usize - was.entries + extra;
    let made: Vec<PathBuf> = (0..n).map(|i| parent.0.join(format!("c{i}"))).collect();
    for d in &made {
        std::fs::create_dir(d).expect("mkdir");
    }
    let snap = read(&mut kernel);
    for d in made.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
    let now = fill(&snap);
    eprintln!("CGROUP_PATHS before {was:?}, after {now:?}");
    assert_eq!(now.entries, cap as usize);
    assert!(
        now.overflow >= was.overflow + extra as u64,
        "{now:?}: at least {extra} inserts found the map full"
    );
    let logs = CAPTURED.0.lock().expect("logs").clone();
    let said = logs.iter().filter(|l| l.contains("eBPF map full")).count();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        (1..=cpus).contains(&said),
        "{said} aya-log records of the overflow, want 1..={cpus} (once per CPU): {logs:?}"
    );
    let ids: Vec<u64> = snap.cgroup_paths.keys().copied().collect();
    kernel.forget_paths(&ids).expect("forget");
}

#[test]
fn kernel_loads_each_feature_on_its_own() {
    if !is_root() {
        eprintln!("skipped: loading eBPF needs root");
        return;
    }
    // A cgroup root that is not cgroup2: the cgroup features are refused with a reason that
    // names the flag; the tracepoint features load all the same.
    let not_cgroup = std::env::temp_dir();
    let (kernel, _, statuses) = Kernel::load(&KernelOptions::new(&not_cgroup));
    let by = |f: Feature| {
        statuses
            .iter()
            .find(|s| s.feature == f)
            .cloned()
            .unwrap_or_else(|| panic!("no status for {f:?}"))
    };
    for f in [Feature::Net, Feature::Endpoints, Feature::Connect] {
        let s = by(f);
        assert!(!s.available, "{s:?}");
        assert!(s.detail.contains("--cgroup-root"), "{s:?}");
        assert!(!s.detail.contains('\n'), "one line: {s:?}");
    }
    let tracepoints = [Feature::Sched, Feature::Oom, Feature::CgroupPaths];
    for f in tracepoints {
        let s = by(f);
        assert!(s.available, "{s:?}");
        assert!(s.detail.is_empty(), "{s:?}");
    }
    assert_eq!(statuses.len(), Feature::ALL.len());
    let kernel = kernel.expect("the tracepoint features loaded");
    assert_eq!(kernel.programs(), 6, "3 sched + 2 oom + 1 cgroup_mkdir");
}

#[test]
fn kernel_probe_mounts_a_missing_bpffs_and_says_so() {
    if !is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ragent-bpffs-{}", std::process::id()));
    let (kernel, probe, _) = Kernel::load(&KernelOptions {
        cgroup_root: root(),
        bpffs: dir.clone(),
        tracefs: PathBuf::from("/sys/kernel/tracing"),
    });
    drop(kernel);
    // Whatever happens below, the mount goes.
    let c = std::ffi::CString::new(dir.to_string_lossy().as_bytes()).expect("path");
    let mounted = probe.bpffs.as_deref() == Some(dir.as_path());
    // SAFETY: a valid NUL-terminated path; unmounting what this test mounted.
    let unmounted = unsafe { libc::umount2(c.as_ptr(), 0) } == 0;
    let _ = std::fs::remove_dir(&dir);
    assert!(mounted, "probe: {probe:?}");
    assert!(unmounted, "bpffs was not mounted at {}", dir.display());
    assert!(
        probe.notes.iter().any(|n| n.contains("mounted bpffs")),
        "{:?}",
        probe.notes
    );
}
