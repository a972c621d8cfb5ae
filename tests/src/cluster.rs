//! A cluster of 1–5 "nodes" on this one machine, for issue 8 (layer sharing between nodes):
//! each node is a network namespace with its own containerd (root on a tmpfs), and an OCI
//! registry sits in a namespace of its own behind a rate-limited link (`tbf`).
//!
//! ```text
//!   root ns ── rgc<S>-host (10.<200+S>.0.254) ─┐
//!                                              │   namespace rgc<S>-sw: bridge br0
//!   rgc<S>-reg  eth0 10.<200+S>.0.2  (tbf) ────┤   (every eth0's peer is a port of it)
//!   rgc<S>-n1   eth0 10.<200+S>.0.11 ──────────┤
//!   ...                                        │
//!   rgc<S>-n5   eth0 10.<200+S>.0.15 ──────────┘
//! ```
//!
//! The slot `S` (0..=4, `RAGENT_TEST_SLOT`) is in every name and address, so several
//! checkouts can run clusters at once. The bridge lives in a namespace of its own, so deleting
//! the namespaces removes every link but the root one, which goes by name.
//!
//! Processes run in a namespace by `setns(2)` between fork and exec (the network namespace
//! only: the mounts containerd makes stay visible to the teardown). Teardown stops, by PID,
//! what the cluster started and anything else still inside its namespaces (containerd's
//! shims, a `ctr` left by a timed-out pull), unmounts the tmpfs roots and deletes the
//! namespaces; `up` does the same first for what a crashed run of the slot left.
use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    net::{Ipv4Addr, SocketAddr},
    os::{
        fd::AsRawFd,
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Barrier, Mutex},
    thread::{self, sleep},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    accesslog,
    fixtures::FixtureSet,
    http,
    node::{cmdline, containerd_answers, pid_alive, skopeo_copy, stop_shims, unmount_below},
};

/// The most nodes a cluster has (addresses .11 to .15).
pub const MAX_NODES: usize = 5;
/// The highest slot (as `RAGENT_TEST_SLOT`).
pub const MAX_SLOT: u8 = 4;
/// The registry's port inside its namespace.
pub const REGISTRY_PORT: u16 = 5000;
/// Bound on `ip`/`tc` commands.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
const STATE: &str = "cluster.json";
const REGISTRY_YML: &str = include_str!("../../deploy/local/registry.yml");

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// 0..=4: part of every namespace, link name and address (`10.<200+slot>.0.0/24`).
    pub slot: u8,
    /// 1..=5 nodes.
    pub nodes: usize,
    /// Rate of what the registry sends (tbf on its side of the link), Mbit/s.
    pub rate_mbit: u32,
    /// Everything lives here; keep it short (unix sockets under it must stay under 108 bytes).
    /// Removed by teardown.
    pub dir: PathBuf,
    /// Size limit of each node's tmpfs containerd root, MiB (a tmpfs only takes what is
    /// written).
    pub tmpfs_mib: u32,
}

impl ClusterConfig {
    /// `nodes` nodes in `slot` under `/tmp/rgc<slot>`, a 200 Mbit/s registry link and 4 GiB
    /// tmpfs roots.
    pub fn new(slot: u8, nodes: usize) -> ClusterConfig {
        ClusterConfig {
            slot,
            nodes,
            rate_mbit: 200,
            dir: PathBuf::from(format!("/tmp/rgc{slot}")),
            tmpfs_mib: 4096,
        }
    }

    /// The slot of `RAGENT_TEST_SLOT` (0 when unset or out of range).
    pub fn slot_from_env() -> u8 {
        std::env::var("RAGENT_TEST_SLOT")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n <= MAX_SLOT)
            .unwrap_or(0)
    }

    fn validate(&self) -> Result<()> {
        if self.slot > MAX_SLOT {
            bail!(
                "cluster slot {} is out of range: use 0..={MAX_SLOT}",
                self.slot
            );
        }
        if self.nodes == 0 || self.nodes > MAX_NODES {
            bail!(
                "a cluster has 1..={MAX_NODES} nodes, not {}: ask for fewer",
                self.nodes
            );
        }
        if self.rate_mbit == 0 {
            bail!("the registry link's rate must be at least 1 Mbit/s");
        }
        // <dir>/n5/containerd.sock.ttrpc is the longest socket path.
        if self.dir.as_os_str().len() + "/n5/containerd.sock.ttrpc".len() >= 108 {
            bail!(
                "{} is too long for unix socket paths (108 bytes): use a shorter directory",
                self.dir.display()
            );
        }
        if !self.dir.is_absolute() || self.dir.parent().is_none() {
            bail!(
                "the cluster directory {} must be an absolute path below / (it is removed on teardown)",
                self.dir.display()
            );
        }
        Ok(())
    }

    fn prefix(&self) -> String {
        format!("rgc{}", self.slot)
    }

    fn subnet_octet(&self) -> u8 {
        200 + self.slot
    }
}

/// A process the cluster started: PID plus its start time (clock ticks since boot, field 22
/// of /proc/PID/stat), so a reused PID is never signalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Proc {
    name: String,
    pid: u32,
    start: u64,
}

/// What `<dir>/cluster.json` records, for the teardown of a crashed run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: ClusterConfig,
    procs: Vec<Proc>,
}

/// One node's pull of a set of images.
#[derive(Debug, Clone)]
pub struct NodePull {
    /// 1-based node index.
    pub node: usize,
    /// Whether every image was pulled.
    pub ok: bool,
    /// Wall time from the common start to the end of the node's last pull, seconds.
    pub seconds: f64,
    /// Per image: reference and seconds.
    pub images: Vec<(String, f64)>,
    /// The first failure (ctr's stderr, or the timeout), empty when ok.
    pub error: String,
}

/// Bytes the registry served (GETs answered 200), from its access log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Served {
    pub blob_bytes: u64,
    pub blob_gets: usize,
    pub manifest_bytes: u64,
    pub manifest_gets: usize,
}

impl Served {
    /// What the access log `text` records after its first `from` lines.
    pub fn from_log(text: &str, from: usize) -> Served {
        let mut s = Served::default();
        for line in text.lines().skip(from) {
            if let Some(b) = accesslog::blob_get_bytes(line) {
                s.blob_bytes += b;
                s.blob_gets += 1;
            } else if let Some(b) = accesslog::manifest_get_bytes(line) {
                s.manifest_bytes += b;
                s.manifest_gets += 1;
            }
        }
        s
    }
}

/// A running cluster; torn down by [`Cluster::down`] or on drop.
pub struct Cluster {
    config: ClusterConfig,
    procs: Mutex<Vec<Proc>>,
    /// Our own children, kept so they can be reaped (no zombies left in the test process).
    children: Mutex<Vec<Child>>,
    torn_down: bool,
}

/// Runs `cmd` and kills it (by PID) if it takes longer than `timeout`.
fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = std::io::Read::read_to_end(o, &mut b);
        }
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = std::io::Read::read_to_end(e, &mut b);
        }
        b
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{:?} took longer than {timeout:?}: killed",
                cmd.get_program()
            );
        }
        sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Runs a command that must succeed within [`IP_TIMEOUT`].
fn must(program: &str, args: &[&str]) -> Result<()> {
    let out = output_within(Command::new(program).args(args), IP_TIMEOUT).with_context(|| {
        format!(
            "{program} {} (iproute2; cargo xtask setup installs it)",
            args.join(" ")
        )
    })?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command whose failure is expected at times (cleanup of what may not exist).
fn quiet(program: &str, args: &[&str]) -> bool {
    output_within(Command::new(program).args(args), IP_TIMEOUT).is_ok_and(|o| o.status.success())
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `p` still runs as the process we started.
fn same_process(p: &Proc) -> bool {
    pid_alive(p.pid) && start_time(p.pid) == Some(p.start)
}

fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        // SAFETY: kill(2) on a PID the caller verified as ours just before.
        unsafe { libc::kill(p, sig) };
    }
}

/// SIGTERM to every process of `procs` still running as started, up to `grace` for them to
/// exit, then SIGKILL to the rest (and up to 5 s more). Returns what it did.
fn stop_procs(procs: &[Proc], grace: Duration) -> Vec<String> {
    let mut done = Vec::new();
    let live: Vec<&Proc> = procs.iter().filter(|p| same_process(p)).collect();
    for p in &live {
        signal(p.pid, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while live.iter().any(|p| same_process(p)) && t0.elapsed() < grace {
        sleep(Duration::from_millis(50));
    }
    for p in &live {
        if same_process(p) {
            signal(p.pid, libc::SIGKILL);
            done.push(format!("killed {} (pid {})", p.name, p.pid));
        } else {
            done.push(format!("stopped {} (pid {})", p.name, p.pid));
        }
    }
    let t1 = Instant::now();
    while live.iter().any(|p| same_process(p)) && t1.elapsed() < Duration::from_secs(5) {
        sleep(Duration::from_millis(50));
    }
    done
}

/// The PIDs inside network namespace `ns` (`ip netns pids`), as processes to stop.
fn pids_in_netns(ns: &str) -> Vec<Proc> {
    let Ok(out) = output_within(Command::new("ip").args(["netns", "pids", ns]), IP_TIMEOUT) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse::<u32>().ok())
        .filter_map(|pid| {
            Some(Proc {
                name: format!(
                    "{} in {ns}",
                    cmdline(pid).split(' ').next().unwrap_or("process")
                ),
                pid,
                start: start_time(pid)?,
            })
        })
        .collect()
}

/// Makes `cmd` enter network namespace `ns` between fork and exec.
fn enter_netns(cmd: &mut Command, ns: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let f = fs::File::open(&path)
        .with_context(|| format!("opening {} (is the cluster up?)", path.display()))?;
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd it owns
    // (the File lives as long as the Command).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("{what} did not become ready within {timeout:?}")
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(15).collect();
    format!(
        "last lines of {}:\n{}",
        path.display(),
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

impl Cluster {
    /// Starts a cluster: namespaces, links, the registry and one containerd per node. First
    /// removes whatever a crashed run of the same slot left. On error, what was started is
    /// torn down again.
    pub fn up(config: &ClusterConfig) -> Result<Cluster> {
        config.validate()?;
        Cluster::clean_slot(config);
        let mut c = Cluster {
            config: config.clone(),
            procs: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            torn_down: false,
        };
        // On error `c` drops here and tears down what was started.
        c.start().context("starting the cluster")?;
        Ok(c)
    }

    fn start(&mut self) -> Result<()> {
        fs::create_dir_all(&self.config.dir)
            .with_context(|| format!("creating {}", self.config.dir.display()))?;
        self.save()?;
        self.network()?;
        self.start_registry()?;
        for i in 1..=self.config.nodes {
            self.start_containerd(i)?;
        }
        Ok(())
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn nodes(&self) -> usize {
        self.config.nodes
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Network namespace of node `i` (1-based), e.g. `rgc1-n2`.
    pub fn netns(&self, i: usize) -> String {
        format!("{}-n{i}", self.config.prefix())
    }

    /// Network namespace of the registry, e.g. `rgc1-reg`.
    pub fn registry_netns(&self) -> String {
        format!("{}-reg", self.config.prefix())
    }

    fn switch_netns(&self) -> String {
        format!("{}-sw", self.config.prefix())
    }

    fn root_link(&self) -> String {
        format!("{}-host", self.config.prefix())
    }

    fn ip_of(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.config.subnet_octet(), 0, host)
    }

    /// Node `i`'s address: `10.<200+slot>.0.<10+i>`.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.ip_of(10 + i.min(MAX_NODES) as u8)
    }

    /// The root namespace's address on the cluster's network (`.254`).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.ip_of(254)
    }

    /// `10.<200+slot>.0.2:5000`
    pub fn registry_host(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.ip_of(2))
    }

    /// Node `i`'s directory: its containerd's config, root, state and socket, `certs.d`, logs.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.config.dir.join(format!("n{i}"))
    }

    /// Node `i`'s containerd socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("containerd.sock")
    }

    /// Node `i`'s registry host configuration directory (`ctr --hosts-dir`; empty at start,
    /// ragent writes `<host>/hosts.toml` into it).
    pub fn certs_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("certs.d")
    }

    /// The registry's log (its access log included).
    pub fn registry_log(&self) -> PathBuf {
        self.config.dir.join("registry.log")
    }

    /// The registry's log text so far (access-log lines included).
    pub fn access_log_text(&self) -> String {
        fs::read_to_string(self.registry_log()).unwrap_or_default()
    }

    /// How many lines the access log has now: pass it to [`Cluster::served_since`].
    pub fn access_log_mark(&self) -> usize {
        self.access_log_text().lines().count()
    }

    /// What the registry served after line `mark` of its log.
    pub fn served_since(&self, mark: usize) -> Served {
        Served::from_log(&self.access_log_text(), mark)
    }

    fn save(&self) -> Result<()> {
        let state = State {
            config: self.config.clone(),
            procs: self.procs.lock().map(|p| p.clone()).unwrap_or_default(),
        };
        let p = self.config.dir.join(STATE);
        fs::write(&p, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("writing {}", p.display()))
    }

    /// Every namespace of the slot, whether or not this cluster has that many nodes.
    fn slot_namespaces(config: &ClusterConfig) -> Vec<String> {
        let p = config.prefix();
        let mut v = vec![format!("{p}-reg"), format!("{p}-sw")];
        v.extend((1..=MAX_NODES).map(|i| format!("{p}-n{i}")));
        v
    }

    /// Removes what a crashed run of this slot left: its recorded processes, anything in the
    /// slot's namespaces, shims of its sockets, mounts and the directory, the namespaces and
    /// the root link.
    fn clean_slot(config: &ClusterConfig) -> Vec<String> {
        let mut done = Vec::new();
        let state: Option<State> = fs::read_to_string(config.dir.join(STATE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let mut procs = state.map(|s| s.procs).unwrap_or_default();
        let existing = fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let namespaces: Vec<String> = Cluster::slot_namespaces(config)
            .into_iter()
            .filter(|n| existing.contains(n))
            .collect();
        for ns in &namespaces {
            procs.extend(pids_in_netns(ns));
        }
        done.extend(stop_procs(&procs, Duration::from_secs(10)));
        for i in 1..=MAX_NODES {
            done.extend(stop_shims(
                &config.dir.join(format!("n{i}")).join("containerd.sock"),
            ));
        }
        done.extend(unmount_below(&config.dir));
        if config.dir.exists() {
            match fs::remove_dir_all(&config.dir) {
                Ok(()) => done.push(format!("removed {}", config.dir.display())),
                Err(e) => done.push(format!("could not remove {}: {e}", config.dir.display())),
            }
        }
        for ns in &namespaces {
            if quiet("ip", &["netns", "del", ns]) {
                done.push(format!("deleted netns {ns}"));
            }
        }
        let root_link = format!("{}-host", config.prefix());
        if Path::new("/sys/class/net").join(&root_link).exists()
            && quiet("ip", &["link", "del", &root_link])
        {
            done.push(format!("deleted link {root_link}"));
        }
        done
    }

    /// Namespaces, the bridge, one veth pair per namespace (and one to the root namespace),
    /// addresses, and tbf on the registry's side.
    fn network(&self) -> Result<()> {
        let sw = self.switch_netns();
        let cidr = |ip: Ipv4Addr| format!("{ip}/24");
        must("ip", &["netns", "add", &sw])?;
        must("ip", &["-n", &sw, "link", "set", "lo", "up"])?;
        must("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        must("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        // (namespace, port name on the bridge, address)
        let mut members = vec![(self.registry_netns(), "reg".to_string(), self.ip_of(2))];
        for i in 1..=self.config.nodes {
            members.push((self.netns(i), format!("n{i}"), self.node_ip(i)));
        }
        for (ns, port, ip) in &members {
            must("ip", &["netns", "add", ns])?;
            must("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            // Created right inside the namespaces: no temporary names in the root namespace.
            must(
                "ip",
                &[
                    "-n", &sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
            )?;
            must("ip", &["-n", &sw, "link", "set", port, "master", "br0"])?;
            must("ip", &["-n", &sw, "link", "set", port, "up"])?;
            must("ip", &["-n", ns, "addr", "add", &cidr(*ip), "dev", "eth0"])?;
            must("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        }
        let root = self.root_link();
        must(
            "ip",
            &[
                "link", "add", &root, "type", "veth", "peer", "name", "host", "netns", &sw,
            ],
        )?;
        must("ip", &["-n", &sw, "link", "set", "host", "master", "br0"])?;
        must("ip", &["-n", &sw, "link", "set", "host", "up"])?;
        must("ip", &["addr", "add", &cidr(self.host_ip()), "dev", &root])?;
        must("ip", &["link", "set", &root, "up"])?;
        // What the registry sends is limited.
        must(
            "tc",
            &[
                "-n",
                &self.registry_netns(),
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{}mbit", self.config.rate_mbit),
                "burst",
                "256kb",
                "latency",
                "50ms",
            ],
        )?;
        Ok(())
    }

    /// Spawns `cmd` in namespace `ns`, its output appended to `log`, in its own process
    /// group; records it for teardown.
    fn spawn_logged(&self, name: &str, ns: &str, cmd: &mut Command, log: &Path) -> Result<u32> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        let child = self.spawn_raw(name, ns, cmd)?;
        let pid = child.id();
        if let Ok(mut c) = self.children.lock() {
            c.push(child);
        }
        Ok(pid)
    }

    fn spawn_raw(&self, name: &str, ns: &str, cmd: &mut Command) -> Result<Child> {
        enter_netns(cmd, ns)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?}) in netns {ns}", cmd.get_program()))?;
        let pid = child.id();
        let start = start_time(pid).unwrap_or(0);
        if let Ok(mut p) = self.procs.lock() {
            p.push(Proc {
                name: name.into(),
                pid,
                start,
            });
        }
        self.save()?;
        Ok(child)
    }

    /// Runs `cmd` inside node `i`'s network namespace (e.g. `ragent agent`). The cluster
    /// stops it on teardown if it still runs; the caller may stop it earlier.
    pub fn spawn_in(&self, i: usize, cmd: &mut Command) -> Result<Child> {
        self.check_node(i)?;
        let name = format!("{} on n{i}", cmd.get_program().to_string_lossy());
        self.spawn_raw(&name, &self.netns(i), cmd)
    }

    fn check_node(&self, i: usize) -> Result<()> {
        if i == 0 || i > self.config.nodes {
            bail!(
                "node {i} does not exist: the cluster has nodes 1..={}",
                self.config.nodes
            );
        }
        Ok(())
    }

    fn start_registry(&self) -> Result<()> {
        let d = &self.config.dir;
        fs::create_dir_all(d.join("registry"))?;
        let cfg = d.join("registry.yml");
        fs::write(
            &cfg,
            REGISTRY_YML
                .replace("{{DIR}}", &d.display().to_string())
                .replace("{{REGISTRY}}", &self.registry_host()),
        )?;
        self.spawn_logged(
            "registry",
            &self.registry_netns(),
            Command::new("docker-registry").arg("serve").arg(&cfg),
            &self.registry_log(),
        )?;
        let addr: SocketAddr = self.registry_host().parse()?;
        wait_until("the cluster's registry", Duration::from_secs(20), || {
            matches!(http::get(addr, "/v2/"), Ok((200, _)))
        })
        .with_context(|| log_tail(&self.registry_log()))
    }

    fn start_containerd(&self, i: usize) -> Result<()> {
        let d = self.node_dir(i);
        for sub in ["root", "state", "opt", "certs.d"] {
            fs::create_dir_all(d.join(sub))?;
        }
        // The registry is plain HTTP, and the node says so in its certs.d, as a real node
        // with an insecure registry does (ragent's mirror entry keeps these settings).
        let hosts = self.certs_dir(i).join(self.registry_host());
        fs::create_dir_all(&hosts)?;
        fs::write(
            hosts.join("hosts.toml"),
            crate::node::HOSTS_TOML.replace("{{REGISTRY}}", &self.registry_host()),
        )?;
        crate::node::mount_tmpfs(&d.join("root"), self.config.tmpfs_mib)?;
        let cfg = d.join("containerd.toml");
        fs::write(&cfg, crate::node::plain_containerd_toml(&d))?;
        let log = d.join("containerd.log");
        self.spawn_logged(
            &format!("containerd n{i}"),
            &self.netns(i),
            Command::new("containerd").arg("--config").arg(&cfg),
            &log,
        )?;
        let sock = self.socket(i);
        wait_until(
            &format!("containerd of node {i}"),
            Duration::from_secs(30),
            || containerd_answers(&sock),
        )
        .with_context(|| log_tail(&log))
    }

    /// Pushes `images` (`repo:tag`) of the set's OCI layout to the cluster's registry (from the
    /// root namespace, over the unshaped direction of the link), keeping digests.
    pub fn push(&self, set: &FixtureSet, images: &[(&str, &str)]) -> Result<()> {
        for (repo, tag) in images {
            let img = set
                .image(repo, tag)
                .with_context(|| format!("{repo}:{tag} is not in the fixture set"))?;
            skopeo_copy(
                set,
                &img.layout_ref,
                &self.registry_host(),
                repo,
                tag,
                false,
            )?;
        }
        Ok(())
    }

    /// A `ctr` command against node `i`'s containerd in namespace `k8s.io`.
    pub fn ctr(&self, i: usize) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket(i))
            .args(["--namespace", "k8s.io"]);
        c
    }

    /// All `nodes` pull `refs` at once: one thread per node, started together, each running
    /// `ctr images pull --plain-http --hosts-dir <certs_dir(i)>` for the refs one after
    /// another inside the node's namespace (ctr fetches in its own process, so it must run
    /// there: a mirror on the node's loopback or address is then the node's). A pull that
    /// fails or takes longer than `timeout` ends the node's run (killed, by PID).
    pub fn pull_all(&self, nodes: &[usize], refs: &[String], timeout: Duration) -> Vec<NodePull> {
        let barrier = Arc::new(Barrier::new(nodes.len() + 1));
        thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|&i| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        self.pull_on(i, refs, timeout)
                    })
                })
                .collect();
            barrier.wait();
            handles
                .into_iter()
                .zip(nodes)
                .map(|(h, &i)| {
                    h.join().unwrap_or_else(|_| NodePull {
                        node: i,
                        ok: false,
                        seconds: 0.0,
                        images: Vec::new(),
                        error: "the pull thread panicked".into(),
                    })
                })
                .collect()
        })
    }

    fn pull_on(&self, i: usize, refs: &[String], timeout: Duration) -> NodePull {
        let t0 = Instant::now();
        let mut r = NodePull {
            node: i,
            ok: true,
            seconds: 0.0,
            images: Vec::new(),
            error: String::new(),
        };
        if let Err(e) = self.check_node(i) {
            r.ok = false;
            r.error = format!("{e:#}");
            return r;
        }
        for reference in refs {
            let t = Instant::now();
            let mut cmd = self.ctr(i);
            cmd.args(["images", "pull", "--plain-http", "--hosts-dir"])
                .arg(self.certs_dir(i))
                .arg(reference);
            let left = timeout.saturating_sub(t0.elapsed());
            let res =
                enter_netns(&mut cmd, &self.netns(i)).and_then(|()| output_within(&mut cmd, left));
            match res {
                Ok(out) if out.status.success() => {
                    r.images
                        .push((reference.clone(), t.elapsed().as_secs_f64()));
                }
                Ok(out) => {
                    r.ok = false;
                    r.error = format!(
                        "ctr pull {reference} on n{i} failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    break;
                }
                Err(e) => {
                    r.ok = false;
                    r.error = format!("ctr pull {reference} on n{i}: {e:#}");
                    break;
                }
            }
        }
        r.seconds = t0.elapsed().as_secs_f64();
        r
    }

    /// GETs `path` from port `port` of node `i` (from the root namespace, over the cluster's
    /// network), e.g. an agent's `/metrics`.
    pub fn http_get(&self, i: usize, port: u16, path: &str) -> Result<(u16, String)> {
        self.check_node(i)?;
        let addr = SocketAddr::from((self.node_ip(i), port));
        http::get(addr, path).with_context(|| format!("GET http://{addr}{path}"))
    }

    /// Starts one `ragent agent` per node in its namespace (sharing on, every node a static
    /// peer, one random token, `--no-ebpf`; `extra` is appended to each `[sharing]`) and waits
    /// until each answers /readyz. The children are the caller's to stop.
    pub fn start_agents(&self, bin: &Path, extra: &str) -> Result<Vec<Child>> {
        let c = self;
        let token_file = c.dir().join("peer-token");
        fs::write(&token_file, random_token()?)?;
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600))?;
        let mut agents = Vec::new();
        for i in 1..=c.nodes() {
            let nd = c.node_dir(i);
            let cfg = nd.join("ragent.toml");
            let peers: Vec<Ipv4Addr> = (1..=c.nodes()).map(|p| c.node_ip(p)).collect();
            fs::write(
                &cfg,
                agent_config(
                    i,
                    &c.registry_host(),
                    &peers,
                    &c.certs_dir(i),
                    &token_file,
                    &nd.join("spool"),
                    extra,
                ),
            )?;
            let log = fs::File::create(nd.join("ragent.log"))?;
            let mut cmd = Command::new(bin);
            for (k, _) in std::env::vars() {
                if k.starts_with("RAGENT_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("agent")
                .arg("--config")
                .arg(&cfg)
                .arg("--no-ebpf")
                .arg("--metrics-addr")
                .arg(format!("0.0.0.0:{METRICS_PORT}"))
                .arg("--containerd")
                .arg(c.socket(i))
                .arg("--checkpoint-dir")
                .arg(nd.join("rightsizing"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            agents.push(c.spawn_in(i, &mut cmd)?);
        }
        for (idx, agent) in agents.iter_mut().enumerate() {
            let i = idx + 1;
            let log = c.node_dir(i).join("ragent.log");
            let t0 = Instant::now();
            loop {
                if let Ok(Some(status)) = agent.try_wait() {
                    bail!(
                        "ragent agent on n{i} exited ({status}) before it was ready; last lines of {}:\n{}",
                        log.display(),
                        tail(&log)
                    );
                }
                if matches!(c.http_get(i, METRICS_PORT, "/readyz"), Ok((200, _))) {
                    break;
                }
                if t0.elapsed() > READY_TIMEOUT {
                    bail!(
                        "ragent agent on n{i} did not answer /readyz with 200 within {READY_TIMEOUT:?}; last lines of {}:\n{}",
                        log.display(),
                        tail(&log)
                    );
                }
                sleep(Duration::from_millis(200));
            }
        }
        Ok(agents)
    }

    /// Stops everything, unmounts, deletes the namespaces and links and the directory.
    /// Returns what it did. Bounded: about 30 s at most.
    pub fn down(mut self) -> Vec<String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut procs = self.procs.lock().map(|p| p.clone()).unwrap_or_default();
        // Agents and the registry first, containerd after (its shims go with the namespace).
        procs.reverse();
        let mut done = stop_procs(&procs, Duration::from_secs(10));
        if let Ok(mut children) = self.children.lock() {
            for c in children.iter_mut() {
                let _ = c.try_wait();
            }
            children.clear();
        }
        done.extend(Cluster::clean_slot(&self.config));
        done
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// The agents' ports inside their namespaces.
pub const METRICS_PORT: u16 = 9464;
pub const PEER_PORT: u16 = 9465;
/// Bound on an agent answering /readyz.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn random_token() -> Result<String> {
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the peer token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `<node_dir>/ragent.toml` of the sharing contract for node `i` (1-based), whose peers
/// (itself included) are at `peers[0]` = n1, `peers[1]` = n2, ...
pub fn agent_config(
    i: usize,
    registry: &str,
    peers: &[Ipv4Addr],
    certs: &Path,
    token: &Path,
    spool: &Path,
    extra: &str,
) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut t = format!(
        "namespace = \"k8s.io\"\n\
         [rightsizing]\n\
         enabled = false\n\
         [sharing]\n\
         enabled = true\n\
         peer_addr = \"0.0.0.0:{PEER_PORT}\"\n\
         node = \"n{i}\"\n\
         registries = [\"{registry}\"]\n\
         certs_dir = {certs}\n\
         public = [\"{registry}\"]\n\
         insecure_registries = [\"{registry}\"]\n\
         token_file = {token}\n\
         spool_dir = {spool}\n\
         {extra}",
        certs = q(certs),
        token = q(token),
        spool = q(spool),
    );
    for (n, ip) in peers.iter().enumerate() {
        t.push_str(&format!(
            "[[sharing.peers]]\nid = \"n{}\"\naddr = \"{ip}:{PEER_PORT}\"\n",
            n + 1
        ));
    }
    t
}

pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(12).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Starts one agent per node and waits until each answers /readyz.
/// Per-node sums of `ragent_blob_bytes_total` by `source` (`local`, `peer`, `upstream`) from
/// an agent's /metrics text; empty when the metric is absent.
pub fn blob_bytes_by_source(metrics: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for s in crate::promtext::parse(metrics) {
        if s.name != "ragent_blob_bytes_total" {
            continue;
        }
        let source = s
            .labels
            .get("source")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        *m.entry(source).or_insert(0.0) += s.value;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_config_follows_the_contract_and_lists_every_peer() {
        let peers = [
            Ipv4Addr::new(10, 203, 0, 11),
            Ipv4Addr::new(10, 203, 0, 12),
            Ipv4Addr::new(10, 203, 0, 13),
        ];
        let text = agent_config(
            2,
            "10.203.0.2:5000",
            &peers,
            Path::new("/tmp/rgc3/n2/certs.d"),
            Path::new("/tmp/rgc3/peer-token"),
            Path::new("/tmp/rgc3/n2/spool"),
            "keep_s = 600\n",
        );
        // ragent's own parser accepts it (unknown keys would be errors).
        let file: ragent::config::FileConfig = toml::from_str(&text).unwrap();
        assert_eq!(file.sharing.keep_s, Some(600));
        assert_eq!(file.sharing.peers.len(), 3);
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["namespace"].as_str(), Some("k8s.io"));
        assert_eq!(v["rightsizing"]["enabled"].as_bool(), Some(false));
        let s = &v["sharing"];
        assert_eq!(s["enabled"].as_bool(), Some(true));
        assert_eq!(s["node"].as_str(), Some("n2"));
        assert_eq!(s["peer_addr"].as_str(), Some("0.0.0.0:9465"));
        assert_eq!(s["certs_dir"].as_str(), Some("/tmp/rgc3/n2/certs.d"));
        assert_eq!(s["token_file"].as_str(), Some("/tmp/rgc3/peer-token"));
        assert_eq!(s["spool_dir"].as_str(), Some("/tmp/rgc3/n2/spool"));
        for key in ["registries", "public", "insecure_registries"] {
            assert_eq!(
                s[key].as_array().map(|a| a.len()),
                Some(1),
                "{key} names the registry"
            );
            assert_eq!(s[key][0].as_str(), Some("10.203.0.2:5000"));
        }
        let p = s["peers"].as_array().unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0]["id"].as_str(), Some("n1"));
        assert_eq!(p[2]["addr"].as_str(), Some("10.203.0.13:9465"));
    }

    #[test]
    fn config_is_validated_with_clear_errors() {
        let ok = ClusterConfig::new(1, 3);
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.nodes = 0;
        assert!(c.validate().unwrap_err().to_string().contains("1..=5"));
        c.nodes = 6;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.slot = 5;
        assert!(c.validate().unwrap_err().to_string().contains("0..=4"));
        let mut c = ok.clone();
        c.dir = PathBuf::from(format!("/tmp/{}", "x".repeat(90)));
        assert!(c.validate().unwrap_err().to_string().contains("108"));
        let mut c = ok;
        c.dir = PathBuf::from("/");
        assert!(c.validate().is_err());
    }

    #[test]
    fn names_and_addresses_carry_the_slot() {
        let c = Cluster {
            config: ClusterConfig::new(2, 5),
            procs: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            // Nothing to tear down in this test.
            torn_down: true,
        };
        assert_eq!(c.netns(3), "rgc2-n3");
        assert_eq!(c.registry_netns(), "rgc2-reg");
        assert_eq!(c.registry_host(), "10.202.0.2:5000");
        assert_eq!(c.node_ip(1), Ipv4Addr::new(10, 202, 0, 11));
        assert_eq!(c.node_ip(5), Ipv4Addr::new(10, 202, 0, 15));
        assert_eq!(c.host_ip(), Ipv4Addr::new(10, 202, 0, 254));
        assert_eq!(c.socket(2), PathBuf::from("/tmp/rgc2/n2/containerd.sock"));
        // Interface names stay under IFNAMSIZ (15 characters).
        assert!(c.root_link().len() <= 15);
        assert!(c.check_node(0).is_err() && c.check_node(6).is_err());
    }

    #[test]
    fn served_splits_blobs_from_manifests() {
        let log = concat!(
            "10.201.0.11 - - [x] \"GET /v2/r/manifests/v1 HTTP/1.1\" 200 900 \"\" \"c\"\n",
            "10.201.0.11 - - [x] \"HEAD /v2/r/manifests/v1 HTTP/1.1\" 200 0 \"\" \"c\"\n",
            "10.201.0.11 - - [x] \"GET /v2/r/blobs/sha256:aa HTTP/1.1\" 200 100 \"\" \"c\"\n",
            "10.201.0.12 - - [x] \"GET /v2/r/blobs/sha256:aa HTTP/1.1\" 200 100 \"\" \"c\"\n",
            "10.201.0.12 - - [x] \"GET /v2/r/blobs/sha256:bb HTTP/1.1\" 404 19 \"\" \"c\"\n",
        );
        let s = Served::from_log(log, 0);
        assert_eq!(
            s,
            Served {
                blob_bytes: 200,
                blob_gets: 2,
                manifest_bytes: 900,
                manifest_gets: 1
            }
        );
        assert_eq!(Served::from_log(log, 3).blob_bytes, 100);
    }

    #[test]
    fn start_time_reads_field_22() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(same_process(&Proc {
            name: "me".into(),
            pid: me,
            start: start_time(me).unwrap_or(0),
        }));
        assert!(!same_process(&Proc {
            name: "me".into(),
            pid: me,
            start: 1,
        }));
    }

    #[test]
    fn blob_bytes_are_summed_per_source() {
        let text = "ragent_blob_bytes_total{registry=\"r\",source=\"peer\"} 10\n\
                    ragent_blob_bytes_total{registry=\"q\",source=\"peer\"} 5\n\
                    ragent_blob_bytes_total{registry=\"r\",source=\"upstream\"} 7\n\
                    other_total 3\n";
        let m = blob_bytes_by_source(text);
        assert_eq!(m.get("peer"), Some(&15.0));
        assert_eq!(m.get("upstream"), Some(&7.0));
        assert_eq!(m.len(), 2);
        assert!(blob_bytes_by_source("").is_empty());
    }
}
