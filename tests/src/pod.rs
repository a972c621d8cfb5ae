//! Pods through containerd's CRI, the way kubelet creates them: a sandbox and one container,
//! both labelled `io.kubernetes.pod.{name,namespace,uid}` (and the container
//! `io.kubernetes.container.name`), host network (the node has no CNI config) and an empty
//! hostname. The container runs a fixture image with a given command, e.g.
//! `/bin/busybox sh -c '...'` on `ragent/run:v1`.
//!
//! A [`Pod`] is always stopped and removed when it drops, together with the cgroup
//! directories containerd leaves behind for its sandbox and container. [`CtrContainer`] is a
//! container started outside Kubernetes (`ctr run`, no `io.kubernetes.*` labels).
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use containerd_client::tonic::{Request, transport::Channel};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, ImageStatusRequest, LinuxContainerConfig,
    LinuxContainerResources, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxFilter,
    PodSandboxMetadata, PullImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};

use crate::node::{Node, remove_leftover_cgroups};

/// The labels kubelet puts on a pod sandbox.
pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
/// The label kubelet adds on a container.
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// kubelet's CFS period, in microseconds.
pub const CPU_PERIOD_US: i64 = 100_000;

/// What to run: one pod with one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// Fresh per spec (like kubelet's UIDs), so a pod left over by a killed test run never
    /// collides with a new one.
    pub uid: String,
    pub container: String,
    /// A full reference, e.g. `127.0.0.1:5057/ragent/run:v1`; pulled through CRI when the
    /// node does not have it (kubelet's `IfNotPresent`).
    pub image: String,
    /// Replaces the image's entrypoint; empty keeps it.
    pub command: Vec<String>,
    /// 0: no limit.
    pub memory_limit_bytes: i64,
    /// A CPU limit as kubelet sets it: a CFS quota of `millicores × 100` µs per 100 ms period
    /// (0: no limit).
    pub cpu_limit_millicores: i64,
}

impl PodSpec {
    /// A pod `namespace/name` whose container (also called `name`) runs `image`'s entrypoint.
    pub fn new(namespace: &str, name: &str, image: &str) -> PodSpec {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!(
                "{:08x}-{:04x}-4000-8000-{:012x}",
                std::process::id(),
                (nanos >> 48) & 0xffff,
                nanos & 0xffff_ffff_ffff
            ),
            container: name.into(),
            image: image.into(),
            command: Vec::new(),
            memory_limit_bytes: 0,
            cpu_limit_millicores: 0,
        }
    }

    /// Names the container.
    pub fn container(mut self, name: &str) -> PodSpec {
        self.container = name.into();
        self
    }

    /// Runs `argv` instead of the image's entrypoint.
    pub fn command(mut self, argv: &[&str]) -> PodSpec {
        self.command = argv.iter().map(|s| (*s).to_string()).collect();
        self
    }

    /// Runs `/bin/busybox sh -c script` (the runnable fixture images carry Debian's static
    /// busybox; applets without a link are called as `/bin/busybox <applet>`).
    pub fn shell(self, script: &str) -> PodSpec {
        self.command(&["/bin/busybox", "sh", "-c", script])
    }

    /// A memory limit on the container.
    pub fn memory_limit(mut self, bytes: i64) -> PodSpec {
        self.memory_limit_bytes = bytes;
        self
    }

    /// A CPU limit on the container, in millicores (kubelet's `resources.limits.cpu`): the
    /// kernel then lets it run `millicores / 1000` of a core per CFS period.
    pub fn cpu_limit_millicores(mut self, millicores: i64) -> PodSpec {
        self.cpu_limit_millicores = millicores;
        self
    }

    /// The sandbox's labels, as kubelet sets them.
    pub fn pod_labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (POD_NAME.into(), self.name.clone()),
            (POD_NAMESPACE.into(), self.namespace.clone()),
            (POD_UID.into(), self.uid.clone()),
        ])
    }

    /// The container's labels, as kubelet sets them.
    pub fn container_labels(&self) -> HashMap<String, String> {
        let mut l = self.pod_labels();
        l.insert(CONTAINER_NAME.into(), self.container.clone());
        l
    }

    fn sandbox_config(&self, log_dir: &Path) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // No CNI here: host network and an empty hostname (docs/environment.md).
            hostname: String::new(),
            log_directory: log_dir.display().to_string(),
            labels: self.pod_labels(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container_config(&self) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: self.container.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: self.command.clone(),
            labels: self.container_labels(),
            // Relative to the sandbox's log directory, as kubelet lays it out.
            log_path: format!("{}/0.log", self.container),
            linux: Some(LinuxContainerConfig {
                resources: (self.memory_limit_bytes > 0 || self.cpu_limit_millicores > 0).then(
                    || {
                        // kubelet's conversion (MilliCPUToQuota): quota = millicores × period
                        // / 1000 with the default 100 ms period.
                        let (cpu_period, cpu_quota) = if self.cpu_limit_millicores > 0 {
                            (
                                CPU_PERIOD_US,
                                self.cpu_limit_millicores * CPU_PERIOD_US / 1000,
                            )
                        } else {
                            (0, 0)
                        };
                        LinuxContainerResources {
                            memory_limit_in_bytes: self.memory_limit_bytes,
                            cpu_period,
                            cpu_quota,
                            ..Default::default()
                        }
                    },
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// From CRI's status: nanoseconds since the epoch.
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
}

impl Exit {
    /// How long the container ran, as containerd recorded it.
    pub fn ran_for(&self) -> Duration {
        Duration::from_nanos(
            u64::try_from(self.finished_at_ns.saturating_sub(self.started_at_ns)).unwrap_or(0),
        )
    }
}

/// A pod running on a node through CRI; stopped and removed on drop.
pub struct Pod {
    spec: PodSpec,
    socket: PathBuf,
    log_dir: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    sandbox_id: String,
    container_id: String,
}

impl Pod {
    /// Runs `spec` on the node: pulls the image if missing, runs the sandbox, creates and
    /// starts the container. Does not wait for it: see [`Pod::wait_running`] and
    /// [`Pod::wait_exited`].
    pub async fn start(node: &Node, spec: PodSpec) -> Result<Pod> {
        let socket = node.socket();
        let channel = containerd_client::connect(&socket)
            .await
            .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let mut images = ImageServiceClient::new(channel);
        remove_stale(&mut runtime, &spec).await?;
        let present = images
            .image_status(Request::new(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: spec.image.clone(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .await
            .context("CRI ImageStatus")?
            .into_inner()
            .image
            .is_some();
        if !present {
            images
                .pull_image(Request::new(PullImageRequest {
                    image: Some(ImageSpec {
                        image: spec.image.clone(),
                        ..Default::default()
                    }),
                    auth: None,
                    sandbox_config: None,
                }))
                .await
                .with_context(|| format!("CRI PullImage {}", spec.image))?;
        }
        // kubelet's layout: <logs>/<namespace>_<name>_<uid>/<container>/0.log
        let log_dir = node
            .dir()
            .join("pods")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid));
        fs::create_dir_all(log_dir.join(&spec.container))
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let sandbox_config = spec.sandbox_config(&log_dir);
        let sandbox_id = runtime
            .run_pod_sandbox(Request::new(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            }))
            .await
            .with_context(|| format!("CRI RunPodSandbox {}/{}", spec.namespace, spec.name))?
            .into_inner()
            .pod_sandbox_id;
        // From here on the guard removes what was made, also when a step below fails.
        let mut pod = Pod {
            spec,
            socket,
            log_dir,
            runtime,
            sandbox_id,
            container_id: String::new(),
        };
        pod.container_id = pod
            .runtime
            .create_container(Request::new(CreateContainerRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
                config: Some(pod.spec.container_config()),
                sandbox_config: Some(sandbox_config),
            }))
            .await
            .with_context(|| format!("CRI CreateContainer {}", pod.spec.container))?
            .into_inner()
            .container_id;
        pod.runtime
            .start_container(Request::new(StartContainerRequest {
                container_id: pod.container_id.clone(),
            }))
            .await
            .with_context(|| {
                format!(
                    "CRI StartContainer {}; its log: {}",
                    pod.spec.container,
                    pod.log()
                )
            })?;
        Ok(pod)
    }

    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The container's log file (CRI format: `TIME STREAM TAG text` per line).
    pub fn log_path(&self) -> PathBuf {
        self.log_dir.join(&self.spec.container).join("0.log")
    }

    /// What the container wrote to stdout and stderr so far, without CRI's line prefixes.
    pub fn log(&self) -> String {
        cri_log_text(&fs::read_to_string(self.log_path()).unwrap_or_default())
    }

    /// The container's CRI status, and the verbose `info` (JSON with `pid`, `runtimeSpec`...).
    pub async fn status(&self) -> Result<(ContainerStatus, HashMap<String, String>)> {
        let r = self
            .runtime
            .clone()
            .container_status(Request::new(ContainerStatusRequest {
                container_id: self.container_id.clone(),
                verbose: true,
            }))
            .await
            .context("CRI ContainerStatus")?
            .into_inner();
        let status = r.status.context("CRI ContainerStatus without a status")?;
        Ok((status, r.info))
    }

    /// The PID of the container's first process on the host (0 once it exited).
    pub async fn pid(&self) -> Result<u32> {
        let (_, info) = self.status().await?;
        let v: serde_json::Value =
            serde_json::from_str(info.get("info").context("no verbose info")?)?;
        Ok(v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0))
    }

    /// Waits until the container runs; fails if it exits first or `timeout` passes.
    pub async fn wait_running(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let (st, _) = self.status().await?;
            if st.state == ContainerState::ContainerRunning as i32 {
                return Ok(());
            }
            if st.state == ContainerState::ContainerExited as i32 {
                bail!(
                    "{} exited with {} before it was seen running; its log:\n{}",
                    self.spec.container,
                    st.exit_code,
                    self.log()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} was not running within {timeout:?} (state {}); its log:\n{}",
                    self.spec.container,
                    st.state,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the container exited; fails if `timeout` passes first.
    pub async fn wait_exited(&self, timeout: Duration) -> Result<Exit> {
        let start = Instant::now();
        loop {
            let (st, _) = self.status().await?;
            if st.state == ContainerState::ContainerExited as i32 {
                return Ok(Exit {
                    code: st.exit_code,
                    started_at_ns: st.started_at,
                    finished_at_ns: st.finished_at,
                });
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.spec.container,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops and removes the pod now (what drop does, with errors reported).
    pub async fn remove(mut self) -> Result<()> {
        let sandbox = std::mem::take(&mut self.sandbox_id);
        let container = std::mem::take(&mut self.container_id);
        remove_sandbox(&mut self.runtime, &sandbox).await?;
        remove_leftover_cgroups(&[sandbox, container]);
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.sandbox_id.is_empty() {
            return;
        }
        // A runtime of its own on a thread of its own, with a connection of its own: drop may
        // run inside any runtime (or while a test panics), which must not be blocked on.
        let socket = self.socket.clone();
        let ids = [self.sandbox_id.clone(), self.container_id.clone()];
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let channel = containerd_client::connect(&socket).await.ok()?;
                let mut runtime = RuntimeServiceClient::new(channel);
                remove_sandbox(&mut runtime, &ids[0]).await.ok()
            })?;
            remove_leftover_cgroups(&ids);
            Some(())
        })
        .join();
        if !matches!(done, Ok(Some(()))) {
            eprintln!(
                "warning: could not remove pod {}/{} (sandbox {})",
                self.spec.namespace, self.spec.name, self.sandbox_id
            );
        }
    }
}

/// A container started with `ctr run` in namespace `k8s.io`, outside Kubernetes: its record
/// carries the image's labels but no `io.kubernetes.*` ones. Killed and removed on drop.
pub struct CtrContainer {
    id: String,
    socket: PathBuf,
    log: PathBuf,
}

impl CtrContainer {
    /// Runs `argv` in a new container `id` from `image` (already pulled and unpacked in
    /// `k8s.io`, e.g. with `Node::ctr_pull`), detached, its output in `<node dir>/ctr-<id>.log`.
    pub fn start(node: &Node, id: &str, image: &str, argv: &[&str]) -> Result<CtrContainer> {
        let log = node.dir().join(format!("ctr-{id}.log"));
        let me = CtrContainer {
            id: id.into(),
            socket: node.socket(),
            log: log.clone(),
        };
        me.remove();
        let out = node
            .ctr("k8s.io")
            .args(["run", "-d", "--runc-root"])
            .arg(node.dir().join("runc"))
            .arg(format!("--log-uri=file://{}", log.display()))
            .args([image, id])
            .args(argv)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running ctr run")?;
        if !out.status.success() {
            bail!(
                "ctr run {id} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(me)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the container wrote so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The PID of its first process, while its task exists.
    pub fn pid(&self) -> Option<u32> {
        let out = self.ctr().args(["tasks", "ls"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == self.id).then_some(())?;
            f.next()?.parse().ok()
        })
    }

    fn ctr(&self) -> std::process::Command {
        let mut c = std::process::Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"]);
        c
    }

    fn remove(&self) {
        let quiet = |c: &mut std::process::Command| {
            let _ = c
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        quiet(
            self.ctr()
                .args(["tasks", "kill", "-s", "SIGKILL", &self.id]),
        );
        // The task is gone once its exit was reaped: retry the delete for a few seconds.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let deleted = self
                .ctr()
                .args(["tasks", "rm", &self.id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if deleted || self.pid().is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        quiet(self.ctr().args(["containers", "rm", &self.id]));
        remove_leftover_cgroups(std::slice::from_ref(&self.id));
    }
}

impl Drop for CtrContainer {
    fn drop(&mut self) {
        self.remove();
    }
}

/// StopPodSandbox (kills its containers) then RemovePodSandbox (removes them too).
async fn remove_sandbox(runtime: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<()> {
    runtime
        .stop_pod_sandbox(Request::new(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .await
        .with_context(|| format!("CRI StopPodSandbox {id}"))?;
    runtime
        .remove_pod_sandbox(Request::new(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .await
        .with_context(|| format!("CRI RemovePodSandbox {id}"))?;
    Ok(())
}

/// Removes sandboxes of the same namespace/name a killed earlier run may have left.
async fn remove_stale(runtime: &mut RuntimeServiceClient<Channel>, spec: &PodSpec) -> Result<()> {
    let stale = runtime
        .list_pod_sandbox(Request::new(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: HashMap::from([
                    (POD_NAME.into(), spec.name.clone()),
                    (POD_NAMESPACE.into(), spec.namespace.clone()),
                ]),
                ..Default::default()
            }),
        }))
        .await
        .context("CRI ListPodSandbox")?
        .into_inner()
        .items;
    for s in stale {
        remove_sandbox(runtime, &s.id).await?;
        remove_leftover_cgroups(&[s.id]);
    }
    Ok(())
}

/// The text of a CRI log: each line is `TIMESTAMP STREAM P|F text`; `P` lines continue on the
/// next one.
pub fn cri_log_text(log: &str) -> String {
    let mut out = String::new();
    for line in log.lines() {
        let mut f = line.splitn(4, ' ');
        let (_time, _stream, tag) = (f.next(), f.next(), f.next());
        out.push_str(f.next().unwrap_or(""));
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_labels_on_sandbox_and_container() {
        let s = PodSpec::new("ns1", "web", "r/img:v1").container("app");
        assert_eq!(s.pod_labels()[POD_NAME], "web");
        assert_eq!(s.pod_labels()[POD_NAMESPACE], "ns1");
        assert_eq!(s.pod_labels()[POD_UID], s.uid);
        assert!(!s.pod_labels().contains_key(CONTAINER_NAME));
        let c = s.container_config();
        assert_eq!(c.labels[CONTAINER_NAME], "app");
        assert_eq!(c.labels[POD_UID], s.uid);
        assert_eq!(c.log_path, "app/0.log");
        assert_ne!(PodSpec::new("ns1", "web", "i").uid, "", "a uid is set");
        assert!(c.linux.expect("linux").resources.is_none(), "no limits");
    }

    #[test]
    fn limits_as_kubelet_sets_them() {
        let c = PodSpec::new("ns1", "web", "i")
            .cpu_limit_millicores(500)
            .container_config();
        let r = c.linux.expect("linux").resources.expect("resources");
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 50_000));
        assert_eq!(r.memory_limit_in_bytes, 0);
        let c = PodSpec::new("ns1", "web", "i")
            .memory_limit(64 << 20)
            .container_config();
        let r = c.linux.expect("linux").resources.expect("resources");
        assert_eq!((r.cpu_period, r.cpu_quota), (0, 0));
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
    }

    #[test]
    fn reads_cri_log_lines() {
        let log = "2026-11-27T23:00:00.1Z stdout F hello\n\
                   2026-11-27T23:00:00.2Z stderr P par\n\
                   2026-11-27T23:00:00.3Z stderr F tial\n\
                   2026-11-27T23:00:00.4Z stdout F \n";
        assert_eq!(cri_log_text(log), "hello\npartial\n\n");
    }
}
