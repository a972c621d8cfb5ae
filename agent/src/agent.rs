//! `ragent agent`: the long-running node agent.
//!
//! Components, each started here and stopped by one shutdown signal:
//! - the containerd watch: connect (with backoff), subscribe to events *then* list, keep the
//!   inventory current; on a lost connection mark not-ready and reconnect;
//! - the pre-pull policy of the config file's `[prepull]` (see [`crate::warm`]);
//! - node insight ([`crate::insight`]): eBPF programs (optional: without them the agent says
//!   why and goes on), cgroupfs, pull traffic attribution;
//! - right-sizing ([`crate::rightsizing`]): a sample of every container each
//!   `--sample-interval`, checkpoints, `GET /api/v1/recommendations`;
//! - the HTTP endpoint: /metrics, /healthz, /readyz, /api/v1/recommendations.
use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use futures::StreamExt;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        containerd::{ContainerRecord, Containerd, ContainerdError},
        procfs,
    },
    config::AgentConfig,
    core::inventory::Inventory,
    insight::{Insight, InsightOptions, PULL_TICK, WALK_EVERY},
    metrics::{self, Metrics},
    scan::Scanner,
};
/// The longest a rebuild waits behind a stream of events.
const MAX_REFRESH_DELAY: Duration = Duration::from_secs(2);
/// Events buffered between containerd's stream and the agent's loop.
const EVENT_BACKLOG: usize = 4096;
/// How long the subscription gets to reach containerd before the first list.
const SUBSCRIBE_SETTLE: Duration = Duration::from_millis(50);
/// A full rescan at this interval even without events (a safety net, cheap: blobs are cached).
pub const RESYNC: Duration = Duration::from_secs(300);

/// Aborts a task when dropped (the subscription ends with the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reconnect backoff: doubles from the first to the last value.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}: {source}; choose another --metrics-addr")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sharing(#[from] crate::sharing::SharingRunError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Kube(#[from] crate::adapters::kube::KubeError),
    #[error(transparent)]
    Rightsizing(#[from] crate::core::rightsizing::RightsizingError),
}

/// What the HTTP handlers read.
struct Shared {
    metrics: Metrics,
    ready: AtomicBool,
    not_ready_reason: Mutex<String>,
    inventory: RwLock<Option<Inventory>>,
    /// Per-pod, per-container and pull-traffic insight (eBPF + cgroupfs + containerd).
    insight: tokio::sync::Mutex<Insight>,
    /// What eBPF could not load on this node, one line each (for /readyz).
    degraded: Vec<String>,
    scrape: tokio::sync::Mutex<()>,
    /// None when `[rightsizing] enabled = false`.
    rightsizing: Option<Arc<tokio::sync::Mutex<crate::rightsizing::Rightsizing>>>,
}

impl Shared {
    fn set_not_ready(&self, reason: String) {
        self.ready.store(false, Ordering::SeqCst);
        self.metrics.containerd_up.set(0);
        if let Ok(mut r) = self.not_ready_reason.lock() {
            *r = reason;
        }
    }

    /// Brings the counters that mirror /proc, cgroupfs and the eBPF maps up to date (at scrape
    /// time). Serialized: two concurrent scrapes must not add the same difference twice.
    async fn refresh_scraped(&self) {
        let _one_at_a_time = self.scrape.lock().await;
        let p = procfs::read_self();
        metrics::advance_to_f64(&self.metrics.process_cpu, p.cpu_seconds);
        self.metrics
            .process_rss
            .set(i64::try_from(p.resident_bytes).unwrap_or(i64::MAX));
        self.metrics
            .process_fds
            .set(i64::try_from(p.open_fds).unwrap_or(i64::MAX));
        self.metrics
            .process_threads
            .set(i64::try_from(p.threads).unwrap_or(i64::MAX));
        let totals = self.insight.lock().await.refresh(None).await;
        if let Some((t, overflow)) = totals {
            let m = &self.metrics;
            for (dir, bytes, packets) in [
                ("ingress", t.rx_bytes, t.rx_packets),
                ("egress", t.tx_bytes, t.tx_packets),
            ] {
                metrics::advance_to(&m.node_net_bytes.with_label_values(&[dir]), bytes);
                metrics::advance_to(&m.node_net_packets.with_label_values(&[dir]), packets);
            }
            metrics::advance_to(
                &m.ebpf_overflow
                    .with_label_values(&[ragent_ebpf::MAP_CGROUP_NET]),
                overflow.rx_bytes.saturating_add(overflow.tx_bytes),
            );
        }
    }

    fn publish(&self, inv: Inventory, containers: usize) {
        let m = &self.metrics;
        let s = &inv.summary;
        m.images.set(s.images as i64);
        m.unresolved_images.set(inv.unresolved.len() as i64);
        m.containers.set(containers as i64);
        m.node_layer_bytes
            .with_label_values(&["per_image"])
            .set(i64::try_from(s.total_layer_bytes).unwrap_or(i64::MAX));
        m.node_layer_bytes
            .with_label_values(&["unique"])
            .set(i64::try_from(s.unique_layer_bytes).unwrap_or(i64::MAX));
        m.node_layer_dedup_ratio.set(s.dedup_ratio.unwrap_or(0.0));
        for role in crate::core::cnb::Role::ALL {
            let bytes = s.unique_bytes_by_role.get(&role).copied().unwrap_or(0);
            m.node_layer_role_bytes
                .with_label_values(&[role.as_str()])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let sizes: Vec<(String, u64)> = inv
            .images
            .iter()
            .map(|i| (i.name.clone(), i.size_bytes))
            .collect();
        m.set_image_sizes(&sizes);
        if let Ok(mut slot) = self.inventory.write() {
            *slot = Some(inv);
        }
    }
}

/// Runs the agent until `shutdown` resolves. With `[kubernetes]` on, the API client comes from
/// the pod's service account (or KUBECONFIG).
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let client = match &cfg.kube {
        Some(_) => {
            crate::adapters::registry::install_tls_provider();
            Some(crate::adapters::kube::connect().await?)
        }
        None => None,
    };
    run_with(cfg, client, shutdown).await
}

/// [`run`] with a given Kubernetes client (tests pass kube's mock service); used only when
/// `cfg.kube` is set.
pub async fn run_with(
    cfg: AgentConfig,
    kube: Option<kube::Client>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let metrics = Metrics::new(prometheus::Registry::new())?;
    let insight = Insight::start(
        &InsightOptions {
            ebpf: cfg.ebpf,
            cgroup_root: cfg.cgroup_root.clone(),
            bpffs: cfg.bpffs.clone(),
            tracefs: cfg.tracefs.clone(),
            grace: cfg.series_grace,
        },
        metrics.insight.clone(),
    );
    metrics.ebpf_programs.set(insight.programs() as i64);
    let degraded = insight.degraded();
    let node_capacity = Arc::new(RwLock::new(None));
    let rightsizing = match cfg.rightsizing.clone() {
        Some(settings) => Some(Arc::new(tokio::sync::Mutex::new(
            crate::rightsizing::Rightsizing::start(
                settings,
                metrics.rightsizing.clone(),
                node_name(&cfg),
                node_capacity.clone(),
            )?,
        ))),
        None => None,
    };
    let shared = Arc::new(Shared {
        metrics,
        ready: AtomicBool::new(false),
        not_ready_reason: Mutex::new("not connected to containerd yet".into()),
        inventory: RwLock::new(None),
        insight: tokio::sync::Mutex::new(insight),
        degraded,
        scrape: tokio::sync::Mutex::new(()),
        rightsizing,
    });

    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|source| AgentError::Bind {
            addr: cfg.metrics_addr,
            source,
        })?;
    info!(addr = %cfg.metrics_addr, "serving /metrics, /healthz, /readyz, /api/v1/recommendations");

    let (stop_tx, stop_rx) = watch::channel(false);
    // [sharing] (off by default): the peer server and containerd's certs.d mirror entries.
    let sharing_metrics = if cfg.sharing.enabled {
        Some(shared.metrics.sharing(&cfg.sharing.registries)?)
    } else {
        None
    };
    let sharing = crate::sharing::start(
        &cfg.sharing,
        &cfg.common.containerd,
        &cfg.common.namespace,
        &node_name(&cfg),
        sharing_metrics,
        stop_rx.clone(),
    )
    .await?;
    let mesh = sharing.as_ref().map(|s| s.mesh.clone());
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .route("/api/v1/recommendations", get(recommendations_handler))
        .with_state(shared.clone());
    let mut http_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let warm = (!cfg.prepull.images.is_empty()).then(|| {
        let registry = Arc::new(crate::adapters::registry::Registry::new(
            &cfg.prepull.insecure_registries,
            cfg.prepull.credentials.clone(),
        ));
        tokio::spawn(crate::warm::keep_warm(
            cfg.common.containerd.clone(),
            cfg.common.namespace.clone(),
            cfg.prepull.clone(),
            registry,
            shared.metrics.prepull.clone(),
            None,
            mesh.clone(),
            stop_rx.clone(),
        ))
    });
    let autorebase = (!cfg.rebase.follow.is_empty()).then(|| {
        let registry = Arc::new(crate::adapters::registry::Registry::new(
            &cfg.rebase.insecure_registries,
            cfg.rebase.credentials.clone(),
        ));
        tokio::spawn(crate::autorebase::follow(
            cfg.common.containerd.clone(),
            cfg.common.namespace.clone(),
            cfg.rebase.clone(),
            registry,
            shared.metrics.rebase.clone(),
            stop_rx.clone(),
        ))
    });
    let pods = match (&kube, &cfg.kube) {
        (Some(_), Some(_)) => Some(Arc::new(RwLock::new(crate::core::pods::Index::default()))),
        _ => None,
    };
    let kubernetes = match (kube, cfg.kube.clone(), pods.clone()) {
        (Some(client), Some(settings), Some(pods)) => {
            shared.insight.lock().await.set_pod_index(pods.clone());
            let opts = crate::kubernetes::Options {
                settings,
                socket: cfg.common.containerd.clone(),
                namespace: cfg.common.namespace.clone(),
                prepull: cfg.prepull.clone(),
                reconcile_interval: crate::kubernetes::RECONCILE_INTERVAL,
                node_capacity,
                mesh: mesh.clone(),
            };
            Some(tokio::spawn(crate::kubernetes::run(
                client,
                opts,
                pods,
                shared.metrics.kube()?,
                shared.metrics.prepull.clone(),
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    let sampler = shared.rightsizing.clone().map(|rs| {
        tokio::spawn(sample_usage(
            shared.clone(),
            rs,
            pods.clone(),
            stop_rx.clone(),
        ))
    });
    let pulls = tokio::spawn(watch_pull_traffic(shared.clone(), stop_rx.clone()));
    let walks = tokio::spawn(walk_cgroups(shared.clone(), stop_rx.clone()));
    let watcher = tokio::spawn(watch_containerd(cfg.clone(), shared.clone(), stop_rx));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    if let Err(e) = watcher.await {
        warn!(error = %e, "the containerd watch ended abnormally");
    }
    if let Err(e) = pulls.await {
        warn!(error = %e, "the pull traffic watch ended abnormally");
    }
    if let Err(e) = walks.await {
        warn!(error = %e, "the cgroup walk ended abnormally");
    }
    if let Some(s) = sampler
        && let Err(e) = s.await
    {
        warn!(error = %e, "right-sizing sampling ended abnormally");
    }
    if let Some(w) = warm
        && let Err(e) = w.await
    {
        warn!(error = %e, "the pre-pull policy ended abnormally");
    }
    if let Some(r) = autorebase
        && let Err(e) = r.await
    {
        warn!(error = %e, "the rebase policy ended abnormally");
    }
    if let Some(k) = kubernetes
        && let Err(e) = k.await
    {
        warn!(error = %e, "the Kubernetes watches ended abnormally");
    }
    if let Some(s) = sharing
        && let Err(e) = s.server.await
    {
        warn!(error = %e, "the peer server ended abnormally");
    }
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AgentError::Serve(e)),
        Err(e) => {
            warn!(error = %e, "the HTTP server task ended abnormally");
            Ok(())
        }
    }
}

/// The node's name for reports: the Kubernetes node name when the adapter is configured, else
/// the host name.
fn node_name(cfg: &AgentConfig) -> String {
    if let Some(k) = &cfg.kube {
        return k.node_name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Samples every container each sampling interval, checkpoints the history every checkpoint
/// interval and once more at shutdown.
async fn sample_usage(
    shared: Arc<Shared>,
    rs: Arc<tokio::sync::Mutex<crate::rightsizing::Rightsizing>>,
    pods: Option<Arc<RwLock<crate::core::pods::Index>>>,
    mut stop: watch::Receiver<bool>,
) {
    let (every, checkpoint_every, dir) = {
        let r = rs.lock().await;
        let s = r.settings();
        (
            s.sample_interval,
            s.checkpoint_interval,
            s.checkpoint_dir.clone(),
        )
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoint_tick =
        tokio::time::interval_at(Instant::now() + checkpoint_every, checkpoint_every);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    enum Step {
        Stop,
        Sample,
        Checkpoint,
    }
    loop {
        // Nothing awaits inside the select (a borrowed watch value must not cross one).
        let step = tokio::select! {
            _ = stop.wait_for(|s| *s) => Step::Stop,
            _ = tick.tick() => Step::Sample,
            _ = checkpoint_tick.tick() => Step::Checkpoint,
        };
        match step {
            Step::Stop => break,
            Step::Checkpoint => checkpoint(&rs, &dir).await,
            Step::Sample => {
                shared.refresh_scraped().await;
                let (usage, ooms) = {
                    let i = shared.insight.lock().await;
                    (i.usage().to_vec(), i.oom_kills())
                };
                let jvm_env = |image: &str| -> Option<Vec<String>> {
                    let inv = shared.inventory.read().ok()?;
                    inv.as_ref()?
                        .images
                        .iter()
                        .find(|i| i.names.iter().any(|n| n == image))
                        .and_then(|i| i.jvm_env.clone())
                };
                let mut r = rs.lock().await;
                // No await from here: the pod index lock is a std one.
                let ix = pods.as_ref().map(|p| match p.read() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                });
                r.round(&usage, &ooms, ix.as_deref(), jvm_env);
            }
        }
    }
    checkpoint(&rs, &dir).await;
}

async fn checkpoint(
    rs: &tokio::sync::Mutex<crate::rightsizing::Rightsizing>,
    dir: &std::path::Path,
) {
    let bytes = rs.lock().await.checkpoint_bytes();
    let d = dir.to_path_buf();
    let result =
        match tokio::task::spawn_blocking(move || crate::rightsizing::write_checkpoint(&d, &bytes))
            .await
        {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
    rs.lock().await.checkpoint_written(&result);
}

async fn recommendations_handler(
    State(shared): State<Arc<Shared>>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    match &shared.rightsizing {
        Some(rs) => {
            let report = rs.lock().await.report();
            match serde_json::to_string(&report) {
                Ok(body) => (StatusCode::OK, [("content-type", "application/json")], body),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [("content-type", "text/plain")],
                    format!("cannot encode the report: {e}\n"),
                ),
            }
        }
        None => (
            StatusCode::NOT_FOUND,
            [("content-type", "text/plain")],
            "right-sizing is turned off on this agent ([rightsizing] enabled = false in its config)\n".into(),
        ),
    }
}

async fn metrics_handler(
    State(shared): State<Arc<Shared>>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    shared.refresh_scraped().await;
    match shared.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("{e}\n"),
        ),
    }
}

async fn ready_handler(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    if shared.ready.load(Ordering::SeqCst) {
        let mut body = String::from("ready\n");
        for line in &shared.degraded {
            body.push_str(line);
            body.push('\n');
        }
        (StatusCode::OK, body)
    } else {
        let reason = shared
            .not_ready_reason
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
    }
}

/// Whether an event topic changes the image inventory or the container list.
fn affects(topic: &str) -> (bool, bool) {
    (
        topic.starts_with("/images/") || topic == "/content/delete",
        topic.starts_with("/containers/"),
    )
}

async fn watch_containerd(cfg: AgentConfig, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    let mut scanner = Scanner::default();
    let mut connected_before = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let result = tokio::select! {
            r = session(&cfg, &shared, &mut scanner, &mut connected_before, &mut backoff) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let e = match result {
            Ok(()) => "containerd closed the event stream".to_string(),
            Err(e) => e.to_string(),
        };
        warn!(error = %e, retry_in = ?backoff, "containerd connection lost");
        shared.set_not_ready(e);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Walks the cgroup2 tree every [`WALK_EVERY`] (off the scrape path: the walk runs on a
/// blocking thread without the insight lock) and hands it to a refresh, which retires what is
/// gone. The first walk runs at once.
async fn walk_cgroups(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(root) = shared.insight.lock().await.cgroup2_root() else {
        return;
    };
    let mut tick = tokio::time::interval(WALK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let r = root.clone();
                match tokio::task::spawn_blocking(move || crate::adapters::cgroupfs::walk(&r)).await {
                    Ok(live) => {
                        let _one_at_a_time = shared.scrape.lock().await;
                        shared.insight.lock().await.refresh(Some(live)).await;
                    }
                    Err(e) => warn!(error = %e, "walking the cgroup tree failed"),
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// Reads the pullers' registry traffic every [`PULL_TICK`] until `stop`.
async fn watch_pull_traffic(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PULL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.insight.lock().await.pull_tick().await,
            // (The guard wait_for returns must not live across the await above.)
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

async fn refresh(
    c: &Containerd,
    scanner: &mut Scanner,
    shared: &Shared,
) -> Result<(Inventory, usize), ContainerdError> {
    let inv = scanner.scan(c).await?;
    let containers: Vec<ContainerRecord> = c.list_containers().await?;
    let names: Vec<String> = inv
        .images
        .iter()
        .flat_map(|i| i.names.iter().cloned())
        .collect();
    let resolved = crate::insight::resolve_registries(&names).await;
    let mut insight = shared.insight.lock().await;
    insight.set_containers(&containers);
    insight.set_images(names, resolved);
    Ok((inv, containers.len()))
}

/// One connected session: returns when the connection is lost.
async fn session(
    cfg: &AgentConfig,
    shared: &Shared,
    scanner: &mut Scanner,
    connected_before: &mut bool,
    backoff: &mut Duration,
) -> Result<(), ContainerdError> {
    let c = Containerd::connect(&cfg.common.containerd, &cfg.common.namespace).await?;
    // Subscribe before listing so that nothing between the two is missed. containerd sends the
    // stream's headers only with its first event, so the subscription runs in its own task and
    // hands events over a channel; the list starts once the request is on its way, and a
    // rescan right after the first quiet period covers the moment until containerd registers it.
    let (tx, mut events) =
        mpsc::channel::<Result<crate::adapters::containerd::Event, ContainerdError>>(EVENT_BACKLOG);
    let sub = c.clone();
    let _subscription = AbortOnDrop(tokio::spawn(async move {
        match sub.subscribe().await {
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
    }));
    tokio::time::sleep(SUBSCRIBE_SETTLE).await;
    shared.insight.lock().await.connected(&c).await;
    let (inv, containers) = refresh(&c, scanner, shared).await?;
    info!(
        socket = %cfg.common.containerd.display(),
        namespace = %cfg.common.namespace,
        images = inv.summary.images,
        containers,
        "connected to containerd"
    );
    shared.publish(inv, containers);
    shared
        .metrics
        .inventory_refreshes
        .with_label_values(&["ok"])
        .inc();
    if *connected_before {
        shared.metrics.containerd_reconnects.inc();
    }
    *connected_before = true;
    *backoff = BACKOFF_MIN;
    shared.metrics.containerd_up.set(1);
    shared.ready.store(true, Ordering::SeqCst);

    let debounce = Duration::from_millis(cfg.refresh_debounce_ms).max(SUBSCRIBE_SETTLE);
    let mut pending = Pending::new(debounce);
    // One confirming rescan after the first quiet period (see above), then one per RESYNC.
    pending.touch(Instant::now());
    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
    loop {
        let due = pending.due();
        tokio::select! {
            ev = events.recv() => match ev {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(ev)) => {
                    shared
                        .metrics
                        .containerd_events
                        .with_label_values(&[metrics::topic_label(&ev.topic)])
                        .inc();
                    let (images, containers) = affects(&ev.topic);
                    // Only events that change the inventory postpone the rebuild.
                    if images || containers {
                        pending.touch(Instant::now());
                    }
                }
            },
            _ = resync.tick() => pending.touch(Instant::now()),
            _ = sleep_until_opt(due) => {
                pending.clear();
                match refresh(&c, scanner, shared).await {
                    Ok((inv, containers)) => {
                        debug!(images = inv.summary.images, containers, "inventory refreshed");
                        shared.publish(inv, containers);
                        shared.metrics.inventory_refreshes.with_label_values(&["ok"]).inc();
                    }
                    Err(e) if e.is_disconnect() => return Err(e),
                    Err(e) => {
                        // The last good inventory stays published; the next event or resync retries.
                        warn!(error = %e, "inventory refresh failed");
                        shared.metrics.inventory_refreshes.with_label_values(&["error"]).inc();
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the next inventory rebuild is due: `debounce` after the last relevant event, but never
/// later than `MAX_REFRESH_DELAY` after the first one (a node with constant events still gets
/// rebuilds). Pure, tested below.
#[derive(Debug, Clone, Copy)]
struct Pending {
    debounce: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Pending {
    fn new(debounce: Duration) -> Pending {
        Pending {
            debounce,
            first: None,
            last: None,
        }
    }

    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn clear(&mut self) {
        self.first = None;
        self.last = None;
    }

    fn due(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.debounce).min(first + MAX_REFRESH_DELAY.max(self.debounce)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuild_waits_for_quiet_but_not_forever() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pending::new(ms(250));
        assert_eq!(p.due(), None);
        p.touch(t0);
        assert_eq!(p.due(), Some(t0 + ms(250)));
        p.touch(t0 + ms(200));
        assert_eq!(p.due(), Some(t0 + ms(450)));
        // Events every 200 ms for ever: still due MAX_REFRESH_DELAY after the first.
        for i in 2..100 {
            p.touch(t0 + ms(200 * i));
        }
        assert_eq!(p.due(), Some(t0 + MAX_REFRESH_DELAY));
        p.clear();
        assert_eq!(p.due(), None);
    }

    #[test]
    fn image_and_container_topics_trigger_refresh() {
        assert_eq!(affects("/images/create"), (true, false));
        assert_eq!(affects("/content/delete"), (true, false));
        assert_eq!(affects("/containers/delete"), (false, true));
        assert_eq!(affects("/tasks/exit"), (false, false));
    }
}
