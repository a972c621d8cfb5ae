//! The local node: containerd (with CRI) + an OCI registry + Prometheus, all under one short
//! private directory, started as our own processes and stopped by PID.
//!
//! `cargo xtask up` uses it for the demo node, `cargo xtask test` for the test node; the
//! end-to-end tests load its state file to find sockets and to restart containerd.
use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{fixtures::FixtureSet, http};

/// Where and on which ports a node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Everything lives here; keep it short (unix socket paths must stay under 108 bytes).
    pub dir: PathBuf,
    pub registry_port: u16,
    pub prometheus_port: u16,
    /// The port Prometheus scrapes ragent on.
    pub agent_port: u16,
}

impl NodeConfig {
    /// The demo node of `cargo xtask up`.
    pub fn demo() -> NodeConfig {
        NodeConfig {
            dir: PathBuf::from("/tmp/ragent-node"),
            registry_port: 5000,
            prometheus_port: 9090,
            agent_port: 9464,
        }
    }

    /// The node of `cargo xtask test` (other ports, so both can run at once).
    ///
    /// `RAGENT_TEST_SLOT=N` (1..=4) moves it to `/tmp/ragent-test-N` and every port up by N, so
    /// several checkouts can run their end-to-end tests side by side.
    pub fn test() -> NodeConfig {
        let slot: u16 = std::env::var("RAGENT_TEST_SLOT")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n <= 4)
            .unwrap_or(0);
        NodeConfig {
            dir: if slot == 0 {
                PathBuf::from("/tmp/ragent-test")
            } else {
                PathBuf::from(format!("/tmp/ragent-test-{slot}"))
            },
            registry_port: 5055 + slot,
            prometheus_port: 9095 + slot,
            agent_port: 9469 + slot,
        }
    }
}

/// A running node, as recorded in `<dir>/node.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub config: NodeConfig,
    /// service name -> PID of the process we started.
    pub pids: BTreeMap<String, u32>,
}

const STATE: &str = "node.json";
// The node's config templates live in deploy/local/ where a reader finds them.
const CONTAINERD_TOML: &str = include_str!("../../deploy/local/containerd.toml");
const REGISTRY_YML: &str = include_str!("../../deploy/local/registry.yml");
const PROMETHEUS_YML: &str = include_str!("../../deploy/local/prometheus.yml");
pub(crate) const HOSTS_TOML: &str = include_str!("../../deploy/local/hosts.toml");
/// The `cluster` label the node's Prometheus adds to what it scrapes from ragent.
pub const CLUSTER: &str = "local";

const SERVICES: [&str; 3] = ["registry", "containerd", "prometheus"];

pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("{what} did not become ready within {timeout:?}")
}

/// Whether a containerd answers on `sock` (`ctr version` succeeds).
pub(crate) fn containerd_answers(sock: &Path) -> bool {
    sock.exists()
        && Command::new("ctr")
            .arg("--address")
            .arg(sock)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

pub(crate) fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Sends SIGTERM, waits, then SIGKILL. Only to a PID whose command line mentions `marker`
/// (so a PID reused by someone else's process is never signalled).
fn stop_pid(pid: u32, marker: &str, grace: Duration) -> bool {
    if !pid_alive(pid) || !cmdline(pid).contains(marker) {
        return false;
    }
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with a PID we started and verified.
    unsafe { libc::kill(p, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if !pid_alive(pid) {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(p, libc::SIGKILL) };
    let _ = wait_until("exit", Duration::from_secs(5), || !pid_alive(pid));
    true
}

impl Node {
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Whether every service this node started is still running.
    pub fn is_running(&self) -> bool {
        SERVICES
            .iter()
            .all(|s| self.pids.get(*s).is_some_and(|p| pid_alive(*p)))
    }

    pub fn socket(&self) -> PathBuf {
        self.config.dir.join("containerd.sock")
    }

    /// `127.0.0.1:<port>`
    pub fn registry(&self) -> String {
        format!("127.0.0.1:{}", self.config.registry_port)
    }

    /// The node's name in Prometheus: the `node` label its scrape job adds (the directory's
    /// name, e.g. `ragent-node` or `ragent-test-1`), as relabeling adds the Kubernetes node
    /// name in a cluster.
    pub fn name(&self) -> String {
        self.config
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "local".into())
    }

    pub fn prometheus_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.config.prometheus_port))
    }

    pub fn fixtures_dir(&self) -> PathBuf {
        self.config.dir.join("fixtures")
    }

    pub fn hosts_dir(&self) -> PathBuf {
        self.config.dir.join("certs.d")
    }

    /// Loads the state of a running node.
    pub fn load(dir: &Path) -> Result<Node> {
        let p = dir.join(STATE);
        let text = fs::read_to_string(&p).with_context(|| {
            format!(
                "no node at {} (start one with `cargo xtask up` or `cargo xtask test`)",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    fn save(&self) -> Result<()> {
        fs::write(
            self.config.dir.join(STATE),
            serde_json::to_vec_pretty(self)?,
        )?;
        Ok(())
    }

    fn spawn(&self, name: &str, cmd: &mut Command) -> Result<u32> {
        // Appended: a service restarted by a test keeps its earlier lines (tests mark and read on).
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: Ctrl-C in the terminal stops the agent, not the node.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(child.id())
    }

    /// Starts a node. Fails if one is already recorded in the directory and still running.
    pub fn up(config: NodeConfig) -> Result<Node> {
        let dir = &config.dir;
        if let Ok(old) = Node::load(dir)
            && old.pids.values().any(|p| pid_alive(*p))
        {
            {
                bail!(
                    "a node is already running in {} (stop it with `cargo xtask down`)",
                    dir.display()
                );
            }
        }
        if dir.as_os_str().len() + "/containerd.sock.ttrpc".len() >= 108 {
            bail!(
                "{} is too long for unix socket paths (108 bytes); use a shorter directory",
                dir.display()
            );
        }
        fs::create_dir_all(dir)?;
        let mut node = Node {
            config: config.clone(),
            pids: BTreeMap::new(),
        };
        node.write_configs()?;
        node.start_registry()?;
        node.start_containerd()?;
        node.start_prometheus()?;
        Ok(node)
    }

    fn write_configs(&self) -> Result<()> {
        let d = &self.config.dir;
        for sub in [
            "registry",
            "root",
            "state",
            "opt",
            "cni",
            "runc",
            "prometheus",
        ] {
            fs::create_dir_all(d.join(sub))?;
        }
        let fill = |t: &str| {
            t.replace("{{DIR}}", &d.display().to_string())
                .replace("{{REGISTRY}}", &self.registry())
                .replace(
                    "{{AGENT}}",
                    &format!("127.0.0.1:{}", self.config.agent_port),
                )
                .replace("{{NODE}}", &self.name())
                .replace("{{CLUSTER}}", CLUSTER)
        };
        fs::write(d.join("registry.yml"), fill(REGISTRY_YML))?;
        fs::write(d.join("containerd.toml"), fill(CONTAINERD_TOML))?;
        fs::write(d.join("prometheus.yml"), fill(PROMETHEUS_YML))?;
        let hosts = self.hosts_dir().join(self.registry());
        fs::create_dir_all(&hosts)?;
        fs::write(hosts.join("hosts.toml"), fill(HOSTS_TOML))?;
        Ok(())
    }

    /// Starts the registry and waits until `/v2/` answers.
    pub fn start_registry(&mut self) -> Result<()> {
        let cfg = self.config.dir.join("registry.yml");
        let pid = self.spawn(
            "registry",
            Command::new("docker-registry").arg("serve").arg(&cfg),
        )?;
        self.pids.insert("registry".into(), pid);
        self.save()?;
        let addr: SocketAddr = self.registry().parse()?;
        wait_until("the registry", Duration::from_secs(20), || {
            matches!(http::get(addr, "/v2/"), Ok((200, _)))
        })
        .with_context(|| self.log_tail("registry"))
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 5 s): "the registry is unreachable".
    pub fn stop_registry(&mut self) -> Result<()> {
        self.stop_service("registry", Duration::from_secs(5))
    }

    /// The PID of the containerd this node started, while it runs.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.pids
            .get("containerd")
            .copied()
            .filter(|p| pid_alive(*p))
    }

    /// The cgroup2 directory containerd (and the shims it starts) runs in, as systemd would put
    /// it in `containerd.service`: `<cgroup2 mount>/<node dir name>/containerd`, e.g.
    /// `/sys/fs/cgroup/unified/ragent-test-2/containerd` on a hybrid host. None when the host
    /// has no cgroup2 mount (containerd then runs in the caller's cgroup).
    pub fn containerd_cgroup(&self) -> Option<PathBuf> {
        containerd_cgroup_dir(&self.config.dir)
    }

    /// Starts containerd in its own cgroup2 directory ([`Node::containerd_cgroup`], created
    /// when missing) and waits until its socket answers.
    pub fn start_containerd(&mut self) -> Result<()> {
        let cfg = self.config.dir.join("containerd.toml");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&cfg);
        if let Some(cg) = self.containerd_cgroup() {
            fs::create_dir_all(&cg).with_context(|| {
                format!(
                    "creating the cgroup {} for containerd (needs root)",
                    cg.display()
                )
            })?;
            join_cgroup_on_exec(&mut cmd, &cg)?;
        }
        let pid = self.spawn("containerd", &mut cmd)?;
        self.pids.insert("containerd".into(), pid);
        self.save()?;
        let sock = self.socket();
        wait_until("containerd", Duration::from_secs(30), || {
            containerd_answers(&sock)
        })
        .with_context(|| self.log_tail("containerd"))
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s).
    pub fn stop_containerd(&mut self) -> Result<()> {
        self.stop_service("containerd", Duration::from_secs(10))
    }

    /// Stops a service this node started (SIGTERM, SIGKILL after `grace`) and forgets its PID.
    fn stop_service(&mut self, name: &str, grace: Duration) -> Result<()> {
        if let Some(pid) = self.pids.remove(name) {
            stop_pid(pid, &self.config.dir.display().to_string(), grace);
        }
        self.save()
    }

    /// A containerd that has never pulled anything: stops containerd and its shims, unmounts
    /// and deletes its root, state and runc directories (the registry keeps its data) and
    /// starts it again.
    pub fn fresh_containerd(&mut self) -> Result<()> {
        self.stop_containerd()?;
        stop_shims(&self.socket());
        for sub in ["root", "state", "runc"] {
            let d = self.config.dir.join(sub);
            unmount_below(&d);
            if d.exists() {
                fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
            }
            fs::create_dir_all(&d)?;
        }
        self.start_containerd()
    }

    /// Makes containerd pull from `host` (`ip:port`) over plain HTTP (a `certs.d` entry;
    /// containerd reads it on every pull).
    pub fn add_plain_http_registry(&self, host: &str) -> Result<()> {
        let d = self.hosts_dir().join(host);
        fs::create_dir_all(&d)?;
        fs::write(
            d.join("hosts.toml"),
            HOSTS_TOML.replace("{{REGISTRY}}", host),
        )?;
        Ok(())
    }

    /// What a containerd upgrade or crash looks like to ragent.
    pub fn restart_containerd(&mut self) -> Result<()> {
        self.stop_containerd()?;
        self.start_containerd()
    }

    fn start_prometheus(&mut self) -> Result<()> {
        let d = &self.config.dir;
        let pid = self.spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    d.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    d.join("prometheus").display()
                ))
                .arg(format!(
                    "--web.listen-address=127.0.0.1:{}",
                    self.config.prometheus_port
                ))
                .arg("--storage.tsdb.retention.time=1d"),
        )?;
        self.pids.insert("prometheus".into(), pid);
        self.save()?;
        let addr = self.prometheus_addr();
        wait_until("Prometheus", Duration::from_secs(30), || {
            matches!(http::get(addr, "/-/ready"), Ok((200, _)))
        })
        .with_context(|| self.log_tail("prometheus"))
    }

    fn log_tail(&self, name: &str) -> String {
        let p = self.config.dir.join(format!("{name}.log"));
        let text = fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(15).collect();
        format!(
            "last lines of {}:\n{}",
            p.display(),
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// A `ctr` command against this node's containerd.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(namespace);
        c
    }

    /// Pulls an image with `ctr` (plain HTTP to the local registry, unpacked).
    pub fn ctr_pull(&self, namespace: &str, reference: &str) -> Result<()> {
        let out = self
            .ctr(namespace)
            .args(["images", "pull", "--plain-http", "--hosts-dir"])
            .arg(self.hosts_dir())
            .arg(reference)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr pull {reference} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Pushes every fixture image to the node's registry with skopeo, keeping digests.
    pub fn push(&self, set: &FixtureSet) -> Result<usize> {
        let mut n = 0;
        for i in &set.images {
            skopeo_copy(set, &i.layout_ref, &self.registry(), &i.repo, &i.tag, false)?;
            n += 1;
        }
        for i in &set.indexes {
            skopeo_copy(set, &i.layout_ref, &self.registry(), &i.repo, &i.tag, true)?;
            n += 1;
        }
        Ok(n)
    }

    /// Stops everything a node in `dir` started: tasks, shims, services; unmounts what is
    /// mounted below `dir`; removes cgroups containerd left behind. Safe to run twice.
    pub fn down(dir: &Path) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let marker = dir.display().to_string();
        let node = Node::load(dir).ok();
        // The node's own containers: only their cgroups are removed below.
        let mut ids: Vec<String> = Vec::new();
        if let Some(node) = &node {
            // Tasks first, while containerd still runs.
            if node.pids.get("containerd").is_some_and(|p| pid_alive(*p)) {
                for ns in ["k8s.io", "default"] {
                    let list = |what: &str| {
                        node.ctr(ns)
                            .args([what, "list", "-q"])
                            .output()
                            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                            .unwrap_or_default()
                    };
                    for id in list("tasks").lines().filter(|l| !l.is_empty()) {
                        let _ = node
                            .ctr(ns)
                            .args(["tasks", "kill", "-s", "SIGKILL", id])
                            .output();
                        done.push(format!("killed task {ns}/{id}"));
                    }
                    ids.extend(
                        list("containers")
                            .lines()
                            .filter(|l| !l.is_empty())
                            .map(str::to_string),
                    );
                }
            }
            for name in SERVICES.iter().rev() {
                if let Some(pid) = node.pids.get(*name)
                    && stop_pid(*pid, &marker, Duration::from_secs(10))
                {
                    done.push(format!("stopped {name} (pid {pid})"));
                }
            }
        }
        done.extend(stop_shims(&dir.join("containerd.sock")));
        done.extend(unmount_below(dir));
        done.extend(remove_leftover_cgroups(&ids));
        done.extend(remove_containerd_cgroup(dir));
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            done.push(format!("removed {}", dir.display()));
        }
        Ok(done)
    }
}

/// Copies one image (`all`: an index with every platform) of the set's OCI layout to
/// `registry/repo:tag` over plain HTTP with skopeo, keeping digests.
pub fn skopeo_copy(
    set: &FixtureSet,
    layout_ref: &str,
    registry: &str,
    repo: &str,
    tag: &str,
    all: bool,
) -> Result<()> {
    let mut c = Command::new("skopeo");
    c.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if all {
        c.arg("--all");
    }
    let src = format!("oci:{}:{layout_ref}", set.layout.display());
    let dst = format!("docker://{registry}/{repo}:{tag}");
    let out = c
        .arg(&src)
        .arg(&dst)
        .output()
        .context("running skopeo (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "skopeo copy {src} {dst} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The first cgroup2 mount point in /proc/self/mountinfo: `/sys/fs/cgroup` on a pure cgroup v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount_in(&fs::read_to_string("/proc/self/mountinfo").ok()?)
}

pub(crate) fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

/// `<cgroup2 mount>/<file name of the node dir>/containerd`.
fn containerd_cgroup_dir(node_dir: &Path) -> Option<PathBuf> {
    let name = node_dir.file_name()?;
    Some(cgroup2_mount()?.join(name).join("containerd"))
}

/// Makes the child write itself into `<cgroup>/cgroup.procs` between fork and exec, so it
/// and everything it starts run there from their first instruction.
fn join_cgroup_on_exec(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").display().to_string())?;
    // SAFETY: the closure only calls open(2), write(2) and close(2), which are
    // async-signal-safe, on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" is the writing process itself.
            let n = libc::write(fd, c"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Removes containerd's cgroup2 directory and its parent (both named after the node dir, so
/// only ones the kit created), once containerd and its shims are gone.
fn remove_containerd_cgroup(node_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Some(cg) = containerd_cgroup_dir(node_dir) else {
        return done;
    };
    for d in [cg.as_path(), cg.parent().unwrap_or(&cg)] {
        if !d.is_dir() {
            continue;
        }
        // A cgroup goes only once its last process has exited: wait a little for killed ones.
        let start = Instant::now();
        let mut r = fs::remove_dir(d);
        while r.is_err() && start.elapsed() < Duration::from_secs(5) {
            sleep(Duration::from_millis(100));
            r = fs::remove_dir(d);
        }
        match r {
            Ok(()) => done.push(format!("removed cgroup {}", d.display())),
            Err(e) => done.push(format!(
                "could not remove cgroup {} ({e}): processes left in it: {}",
                d.display(),
                fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        }
    }
    done
}

/// Shims outlive containerd: stops those whose `-address` is `socket`, by PID.
pub(crate) fn stop_shims(socket: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let sock = socket.display().to_string();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cl = cmdline(pid);
            if cl.contains("containerd-shim")
                && cl.contains(&sock)
                && stop_pid(pid, &sock, Duration::from_secs(5))
            {
                done.push(format!("stopped shim (pid {pid})"));
            }
        }
    }
    done
}

/// Unmounts everything mounted below `dir`, deepest first.
pub(crate) fn unmount_below(dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        if let Ok(c) = std::ffi::CString::new(m.clone()) {
            // SAFETY: umount2 with a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                done.push(format!("unmounted {m}"));
            }
        }
    }
    done
}

/// containerd leaves `<parent>/<container id>` cgroup directories behind: remove the empty
/// ones of this node's containers (never anybody else's), on v1 controllers and on cgroup2.
pub fn remove_leftover_cgroups(ids: &[String]) -> Vec<String> {
    let mut done = Vec::new();
    if ids.is_empty() {
        return done;
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(ctrls) = fs::read_dir("/sys/fs/cgroup") {
        roots.extend(ctrls.flatten().map(|c| c.path()).filter(|p| p.is_dir()));
    }
    for root in roots {
        for id in ids {
            let p = root.join("k8s.io").join(id);
            if p.is_dir() && fs::remove_dir(&p).is_ok() {
                done.push(format!("removed cgroup {}", p.display()));
            }
        }
    }
    done
}

/// A containerd of its own whose root (content store, metadata, snapshots) is a small tmpfs:
/// what a node with a full disk looks like to ragent. Stopped (by PID) and unmounted on drop.
pub struct TmpfsContainerd {
    dir: PathBuf,
    pid: u32,
}

impl TmpfsContainerd {
    /// Starts containerd under `dir` (created; keep it short, sockets live there) with its
    /// root on a tmpfs of `size_mib` MiB. Needs root (mount(2)).
    pub fn start(dir: &Path, size_mib: u32) -> Result<TmpfsContainerd> {
        if dir.as_os_str().len() + "/containerd.sock.ttrpc".len() >= 108 {
            bail!("{} is too long for unix socket paths", dir.display());
        }
        let root = dir.join("root");
        fs::create_dir_all(&root)?;
        fs::create_dir_all(dir.join("state"))?;
        fs::create_dir_all(dir.join("opt"))?;
        mount_tmpfs(&root, size_mib)?;
        fs::write(dir.join("containerd.toml"), plain_containerd_toml(dir))?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting containerd")?;
        let me = TmpfsContainerd {
            dir: dir.to_path_buf(),
            pid: child.id(),
        };
        let sock = me.socket();
        wait_until("the tmpfs containerd", Duration::from_secs(30), || {
            containerd_answers(&sock)
        })?;
        Ok(me)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// A `ctr` command against this containerd.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(namespace);
        c
    }
}

impl Drop for TmpfsContainerd {
    fn drop(&mut self) {
        stop_pid(
            self.pid,
            &self.dir.display().to_string(),
            Duration::from_secs(10),
        );
        // Reap it (it is our child).
        // SAFETY: waitpid on our own child's PID, non-blocking.
        unsafe {
            libc::waitpid(self.pid as i32, std::ptr::null_mut(), libc::WNOHANG);
        }
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2 with a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Mounts a tmpfs of `size_mib` MiB on `root` (needs root; the caller unmounts it).
pub(crate) fn mount_tmpfs(root: &Path, size_mib: u32) -> Result<()> {
    let c_root = std::ffi::CString::new(root.display().to_string())?;
    let opts = std::ffi::CString::new(format!("size={size_mib}m,mode=0700"))?;
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c_root.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting a tmpfs on {} (needs root): {}",
            root.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The config of a containerd without CRI whose root, state, sockets and opt dir are under
/// `dir`.
pub(crate) fn plain_containerd_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\noom_score = 0\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{d}/containerd.sock\"\n\
         [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_pure_v2_hosts() {
        let hybrid = "30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      41 30 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v2 = "25 23 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_in(v2), Some(PathBuf::from("/sys/fs/cgroup")));
        let v1 = "31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount_in(v1), None);
    }
}
