//! The metric catalogue: every metric ragent exports, defined once with its name, help, type
//! and labels. Dashboards, docs and tests use [`CATALOGUE`]. Names are `ragent_<what>_<unit>`,
//! `_total` only on counters; labels are bounded, and series of images that are gone are removed.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

macro_rules! def {
    ($id:ident, $name:literal, $kind:ident, [$($l:literal),*], $help:literal) => {
        pub const $id: MetricDef = MetricDef { name: $name, help: $help, kind: Kind::$kind, labels: &[$($l),*] };
    };
}

def!(
    BUILD_INFO,
    "ragent_build_info",
    Gauge,
    ["version"],
    "Always 1; the version label says which ragent runs."
);
def!(
    CONTAINERD_UP,
    "ragent_containerd_up",
    Gauge,
    [],
    "1 while ragent is connected to containerd and its event stream, else 0."
);
def!(
    CONTAINERD_RECONNECTS,
    "ragent_containerd_reconnects_total",
    Counter,
    [],
    "Times ragent lost containerd and connected again."
);
def!(
    CONTAINERD_EVENTS,
    "ragent_containerd_events_total",
    Counter,
    ["topic"],
    "containerd events received, by topic (/images/create, ...; anything else is 'other')."
);
def!(
    INVENTORY_REFRESHES,
    "ragent_inventory_refreshes_total",
    Counter,
    ["result"],
    "Image inventory rebuilds from containerd, by result (ok, error)."
);
def!(
    IMAGES,
    "ragent_images",
    Gauge,
    [],
    "Images in the namespace: distinct manifests, not names (CRI's sha256:<config> aliases are not counted)."
);
def!(
    UNRESOLVED_IMAGES,
    "ragent_unresolved_images",
    Gauge,
    [],
    "Image records whose manifest or config could not be read (content missing or malformed)."
);
def!(
    CONTAINERS,
    "ragent_containers",
    Gauge,
    [],
    "Container records in the namespace."
);
def!(
    IMAGE_SIZE,
    "ragent_image_size_bytes",
    Gauge,
    ["image"],
    "Compressed size of an image's layers (its first name); removed when the image goes."
);
def!(
    NODE_LAYER_BYTES,
    "ragent_node_layer_bytes",
    Gauge,
    ["scope"],
    "Layer bytes on the node: scope=per_image sums every image's layers (a layer-unaware store), scope=unique counts each blob once."
);
def!(
    NODE_LAYER_ROLE_BYTES,
    "ragent_node_layer_role_bytes",
    Gauge,
    ["role"],
    "Unique layer bytes by CNB role (run-image, launcher, buildpack, app, config, unknown)."
);
def!(
    NODE_LAYER_DEDUP_RATIO,
    "ragent_node_layer_dedup_ratio",
    Gauge,
    [],
    "per_image / unique layer bytes (0 when the node has no layers)."
);
def!(
    EBPF_PROGRAMS,
    "ragent_ebpf_programs_loaded",
    Gauge,
    [],
    "eBPF programs loaded and attached (0: running without eBPF, see the log for why)."
);
def!(
    NODE_NET_BYTES,
    "ragent_node_network_bytes_total",
    Counter,
    ["direction"],
    "Bytes through every socket of the node, seen by cgroup_skb at the cgroup2 root (direction=ingress|egress)."
);
def!(
    NODE_NET_PACKETS,
    "ragent_node_network_packets_total",
    Counter,
    ["direction"],
    "Packets through every socket of the node, seen by cgroup_skb at the cgroup2 root."
);
def!(
    EBPF_OVERFLOW,
    "ragent_ebpf_map_overflow_bytes_total",
    Counter,
    ["map"],
    "Bytes that eBPF could not attribute because a map was full (counted, never silently dropped)."
);
def!(
    PROCESS_CPU,
    "ragent_process_cpu_seconds_total",
    Counter,
    [],
    "CPU time the agent used (user + system)."
);
def!(
    PROCESS_RSS,
    "ragent_process_resident_memory_bytes",
    Gauge,
    [],
    "The agent's resident memory."
);
def!(
    PROCESS_FDS,
    "ragent_process_open_fds",
    Gauge,
    [],
    "File descriptors the agent holds open."
);
def!(
    PROCESS_THREADS,
    "ragent_process_threads",
    Gauge,
    [],
    "Threads of the agent process."
);
def!(
    PREPULL_BYTES,
    "ragent_prepull_bytes_total",
    Counter,
    ["result"],
    "Bytes of blobs pre-pull needed: result=fetched crossed the wire (each blob once per node), result=reused was already in containerd."
);
def!(
    PREPULL_LAYERS,
    "ragent_prepull_layers_total",
    Counter,
    ["result"],
    "Blobs (layers and configs) pre-pull needed, by result (fetched, reused, failed)."
);
def!(
    PREPULL_DURATION,
    "ragent_prepull_duration_seconds",
    Histogram,
    [],
    "Wall time of one pre-pull pass, from resolving the references to the last image record."
);
def!(
    PREPULL_FAILURES,
    "ragent_prepull_failures_total",
    Counter,
    ["reason"],
    "Pre-pull failures by reason (auth_required, not_found, rate_limited, timeout, digest, containerd_lost, disk_full, ...; a fixed list)."
);
def!(
    PREPULL_INFLIGHT,
    "ragent_prepull_inflight_bytes",
    Gauge,
    [],
    "Bytes of the blobs being fetched right now that have not arrived yet."
);
def!(
    PREPULL_IMAGES,
    "ragent_prepull_images",
    Gauge,
    ["state"],
    "Images of the agent's pre-pull policy by state (ready: record and unpacked layers present; failed: last attempt failed; pending)."
);
def!(
    REBASES,
    "ragent_rebases_total",
    Counter,
    ["result"],
    "Automatic rebases by result: rebased, current (the image sat on the run image already), or the failure's reason (a fixed list)."
);
def!(
    RUN_IMAGE_POLLS,
    "ragent_run_image_polls_total",
    Counter,
    ["result"],
    "Polls of the run-image tags the rebase policy follows, by result (ok, or the registry failure's reason)."
);
def!(
    IMAGES_BY_RUN_IMAGE,
    "ragent_images_by_run_image",
    Gauge,
    ["run_image_digest"],
    "CNB app images (tagged records; rollback records left out) per run-image digest they sit on, while the rebase policy is on."
);
def!(
    RUN_IMAGE_OLDEST_UNPATCHED_AGE,
    "ragent_run_image_oldest_unpatched_age_seconds",
    Gauge,
    [],
    "How long the oldest image on a superseded digest of a followed run image has waited since ragent first saw the newer digest (0: none waits)."
);

def!(
    KUBE_UP,
    "ragent_kube_up",
    Gauge,
    [],
    "1 while the Kubernetes watches (pods of this node, this node, PrePull resources) are listed and current, else 0; absent without the kube adapter."
);
def!(
    KUBE_PODS,
    "ragent_kube_pods",
    Gauge,
    [],
    "Pods of this node known from the Kubernetes API (spec.nodeName watch)."
);
def!(
    KUBE_WATCH_ERRORS,
    "ragent_kube_watch_errors_total",
    Counter,
    ["resource"],
    "Errors of the Kubernetes watches by resource (pods, nodes, prepulls); each is retried with backoff, a 410 Gone relists."
);
def!(
    PREPULL_RESOURCES,
    "ragent_prepull_resources",
    Gauge,
    ["state"],
    "PrePull resources as this node sees them: applied, not_selected (the node selector does not pick this node), refused (a pull secret the agent may not read, an invalid selector)."
);
def!(
    KUBE_EVENTS,
    "ragent_kube_events_total",
    Counter,
    ["result"],
    "Kubernetes Events this node published about PrePull resources (published, failed)."
);

def!(
    POD_NET_BYTES,
    "ragent_pod_network_bytes_total",
    Counter,
    ["namespace", "pod", "direction"],
    "Bytes of the pod's sockets (all its containers, IP level, cgroup_skb), by direction."
);
def!(
    POD_NET_PACKETS,
    "ragent_pod_network_packets_total",
    Counter,
    ["namespace", "pod", "direction"],
    "Packets (socket buffers) of the pod's sockets, by direction."
);
def!(
    CONTAINER_CPU,
    "ragent_container_cpu_seconds_total",
    Counter,
    ["namespace", "pod", "container"],
    "CPU time of the container's cgroup (cgroup2 cpu.stat or v1 cpuacct)."
);
def!(
    CONTAINER_MEMORY,
    "ragent_container_memory_working_set_bytes",
    Gauge,
    ["namespace", "pod", "container"],
    "Memory usage minus inactive file pages of the container's cgroup."
);
def!(
    CONTAINER_RUNQ,
    "ragent_container_cpu_runqueue_seconds_total",
    Counter,
    ["namespace", "pod", "container"],
    "Time the container's threads were runnable but waiting for a CPU (scheduler tracepoints)."
);
def!(
    CONTAINER_OOM,
    "ragent_container_oom_kills_total",
    Counter,
    ["namespace", "pod", "container"],
    "Processes of the container killed by the OOM killer."
);
def!(
    IMAGE_PULL_BYTES,
    "ragent_image_pull_bytes_total",
    Counter,
    ["image", "registry"],
    "Bytes registries sent to containerd and ragent for an image (TCP payload: HTTP headers and bodies); image=\"unattributed\" holds what no image explains."
);
def!(
    REGISTRY_BYTES,
    "ragent_registry_bytes_total",
    Counter,
    ["registry", "direction"],
    "TCP payload bytes between the pullers (containerd, ragent) and each registry they connected to, by direction."
);
def!(
    REGISTRY_CONNECTIONS,
    "ragent_registry_connections_total",
    Counter,
    ["registry"],
    "Connections the pullers opened to each registry (connect4/connect6)."
);
def!(
    OWNER_NET_BYTES,
    "ragent_owner_network_bytes_total",
    Counter,
    ["owner", "direction"],
    "The node's socket bytes by owner: pods, containerd, ragent, other."
);
def!(
    EBPF_FEATURE,
    "ragent_ebpf_feature_available",
    Gauge,
    ["feature"],
    "1 when the eBPF feature is loaded and attached, 0 when this node lacks what it needs (see /readyz)."
);
def!(
    KERNEL_CAPABILITY,
    "ragent_kernel_capability",
    Gauge,
    ["capability"],
    "1 when the node offers it: btf, bpffs, tracefs, cgroup2."
);
def!(
    EBPF_MAP_ENTRIES,
    "ragent_ebpf_map_entries",
    Gauge,
    ["map"],
    "Entries in each eBPF map."
);
def!(
    EBPF_MAP_CAPACITY,
    "ragent_ebpf_map_capacity_entries",
    Gauge,
    ["map"],
    "Capacity of each eBPF map."
);
def!(
    EBPF_MAP_OVERFLOW,
    "ragent_ebpf_map_overflow_total",
    Counter,
    ["map"],
    "Inserts into each eBPF map that failed because it was full (counted, never silently dropped)."
);

def!(
    RECOMMENDATION_CPU,
    "ragent_recommendation_cpu_cores",
    Gauge,
    ["namespace", "pod", "container", "workload", "bound"],
    "Recommended CPU request per container (bound=target) and its lower and upper bounds, in cores; workload is the owner (Kind/name) when the Kubernetes adapter knows it, else empty."
);
def!(
    RECOMMENDATION_MEMORY,
    "ragent_recommendation_memory_bytes",
    Gauge,
    ["namespace", "pod", "container", "workload", "bound"],
    "Recommended memory request per container (bound=target) and its lower and upper bounds, in bytes."
);
def!(
    RIGHTSIZING_CONTAINERS,
    "ragent_rightsizing_containers",
    Gauge,
    [],
    "Containers with right-sizing history on this node (gone ones included until the retention ends)."
);
def!(
    RIGHTSIZING_SAMPLES,
    "ragent_rightsizing_samples_total",
    Counter,
    [],
    "Usage samples taken for right-sizing (one per container per sampling interval)."
);
def!(
    RIGHTSIZING_CHECKPOINT_ERRORS,
    "ragent_rightsizing_checkpoint_errors_total",
    Counter,
    ["reason"],
    "Right-sizing checkpoints that could not be read back (reason: not_a_checkpoint, truncated, unsupported_version, checksum_mismatch, corrupt, read) or written (write)."
);
def!(
    RIGHTSIZING_CHECKPOINT_TIME,
    "ragent_rightsizing_checkpoint_timestamp_seconds",
    Gauge,
    [],
    "When the last right-sizing checkpoint was written (Unix time); 0 before the first."
);
def!(
    NODE_SAVING,
    "ragent_recommendation_node_saving_ratio",
    Gauge,
    [],
    "Saving of the recommended instance shape against the node's current one, as a fraction of the current price (negative: the node is too small); absent when either is unknown."
);
def!(
    NODE_SHAPE,
    "ragent_recommendation_node_shape_info",
    Gauge,
    ["recommended", "current"],
    "Always 1; the labels name the recommended catalog shape and the node's current one (\"\" when no entry matches)."
);

def!(
    BLOB_BYTES,
    "ragent_blob_bytes_total",
    Counter,
    ["registry", "source"],
    "Blob bytes this node's pulls received through layer sharing, by where they came from: local (this node's content store), peer (another agent), upstream (the registry, fetched by this agent)."
);
def!(
    UPSTREAM_FETCHES_AVOIDED,
    "ragent_upstream_fetches_avoided_total",
    Counter,
    ["registry"],
    "Blobs this node's pulls got from a peer, or by joining a fetch already in progress, instead of fetching them from the registry themselves."
);
def!(
    PEER_REQUEST_DURATION,
    "ragent_peer_request_duration_seconds",
    Histogram,
    ["outcome"],
    "Time until a peer answered a blob request with its headers (outcome: ok, status, timeout, connect), in seconds."
);
def!(
    PEER_FALLBACKS,
    "ragent_peer_fallbacks_total",
    Counter,
    ["reason"],
    "Times this node went past a peer to the next source (reason: connect, timeout, forbidden, status, cut)."
);
def!(
    PEER_REQUESTS,
    "ragent_peer_requests_total",
    Counter,
    ["caller", "outcome"],
    "Requests the peer server answered (caller: local, peer, stranger; outcome: store, fetched, declined, challenged, forbidden, not_found, failed)."
);
def!(
    PEER_SERVED_BYTES,
    "ragent_peer_served_bytes_total",
    Counter,
    ["registry"],
    "Blob bytes this agent's peer server sent to other agents."
);
def!(
    SHARING_PEERS,
    "ragent_sharing_peers",
    Gauge,
    ["state"],
    "Peers in this agent's membership (state: ready, not_ready, down: left out after a failure)."
);

/// Every metric ragent exports.
pub const CATALOGUE: &[MetricDef] = &[
    BUILD_INFO,
    CONTAINERD_UP,
    CONTAINERD_RECONNECTS,
    CONTAINERD_EVENTS,
    INVENTORY_REFRESHES,
    IMAGES,
    UNRESOLVED_IMAGES,
    CONTAINERS,
    IMAGE_SIZE,
    NODE_LAYER_BYTES,
    NODE_LAYER_ROLE_BYTES,
    NODE_LAYER_DEDUP_RATIO,
    EBPF_PROGRAMS,
    NODE_NET_BYTES,
    NODE_NET_PACKETS,
    EBPF_OVERFLOW,
    PROCESS_CPU,
    PROCESS_RSS,
    PROCESS_FDS,
    PROCESS_THREADS,
    PREPULL_BYTES,
    PREPULL_LAYERS,
    PREPULL_DURATION,
    PREPULL_FAILURES,
    PREPULL_INFLIGHT,
    PREPULL_IMAGES,
    REBASES,
    RUN_IMAGE_POLLS,
    IMAGES_BY_RUN_IMAGE,
    RUN_IMAGE_OLDEST_UNPATCHED_AGE,
    KUBE_UP,
    KUBE_PODS,
    KUBE_WATCH_ERRORS,
    PREPULL_RESOURCES,
    KUBE_EVENTS,
    POD_NET_BYTES,
    POD_NET_PACKETS,
    CONTAINER_CPU,
    CONTAINER_MEMORY,
    CONTAINER_RUNQ,
    CONTAINER_OOM,
    IMAGE_PULL_BYTES,
    REGISTRY_BYTES,
    REGISTRY_CONNECTIONS,
    OWNER_NET_BYTES,
    EBPF_FEATURE,
    KERNEL_CAPABILITY,
    EBPF_MAP_ENTRIES,
    EBPF_MAP_CAPACITY,
    EBPF_MAP_OVERFLOW,
    RECOMMENDATION_CPU,
    RECOMMENDATION_MEMORY,
    RIGHTSIZING_CONTAINERS,
    RIGHTSIZING_SAMPLES,
    RIGHTSIZING_CHECKPOINT_ERRORS,
    RIGHTSIZING_CHECKPOINT_TIME,
    NODE_SAVING,
    NODE_SHAPE,
    BLOB_BYTES,
    UPSTREAM_FETCHES_AVOIDED,
    PEER_REQUEST_DURATION,
    PEER_FALLBACKS,
    PEER_REQUESTS,
    PEER_SERVED_BYTES,
    SHARING_PEERS,
];

/// The containerd event topics counted under their own label value.
pub const EVENT_TOPICS: &[&str] = &[
    "/images/create",
    "/images/update",
    "/images/delete",
    "/containers/create",
    "/containers/update",
    "/containers/delete",
    "/tasks/create",
    "/tasks/start",
    "/tasks/exit",
    "/tasks/delete",
    "/tasks/oom",
    "/content/delete",
    "/snapshot/prepare",
    "/snapshot/commit",
    "/snapshot/remove",
];

/// Bounds a topic to [`EVENT_TOPICS`] or `other`.
pub fn topic_label(topic: &str) -> &'static str {
    EVENT_TOPICS
        .iter()
        .find(|t| **t == topic)
        .copied()
        .unwrap_or("other")
}

fn opts(d: &MetricDef) -> Opts {
    Opts::new(d.name, d.help)
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: C,
) -> Result<C, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Buckets of a pre-pull pass: from a no-op check (tens of ms) to a large set on a slow link.
pub const PREPULL_DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Every reason `ragent_prepull_failures_total` can carry (each error's `metric_label()`),
/// exported at 0 from the start so dashboards show 0 rather than "no data".
pub const PREPULL_FAILURE_REASONS: &[&str] = &[
    "reference",
    "not_found",
    "denied",
    "rate_limited",
    "server",
    "timeout",
    "request",
    "digest",
    "interrupted",
    "too_large",
    "auth_required",
    "auth_refused",
    "auth_unsupported",
    "media_type",
    "manifest",
    "containerd",
    "rejected",
    "containerd_lost",
    "disk_full",
    "usage",
    "internal",
];

/// The reasons a registry request fails (`RegistryError::metric_label`): the first of
/// [`PREPULL_FAILURE_REASONS`], up to `manifest`.
pub const REGISTRY_FAILURE_REASONS: &[&str] = PREPULL_FAILURE_REASONS.split_at(15).0;

/// The results `ragent_rebases_total` carries besides [`PREPULL_FAILURE_REASONS`] (fetching the
/// run image is a pre-pull): `rebased`, `current`, and the reasons of `rebase::Error` and of
/// the policy (`run_image_moved`). All are exported from the start.
pub const REBASE_RESULTS: &[&str] = &[
    "rebased",
    "current",
    "run_image_moved",
    "not_cnb",
    "malformed",
    "structure",
    "not_rebasable",
    "target",
    "stack",
    "mixins",
    "run_image_name",
    "run_image",
    "image_not_found",
    "run_image_not_found",
    "app_layer_missing",
    "unreachable",
    "rpc",
    "namespace",
    "source",
];

/// The automatic rebase's metrics.
#[derive(Clone)]
pub struct RebaseMetrics {
    pub results: IntCounterVec,
    pub polls: IntCounterVec,
    pub images_by_run_image: IntGaugeVec,
    pub oldest_unpatched_age: Gauge,
    run_image_series: Arc<Mutex<BTreeSet<String>>>,
}

impl RebaseMetrics {
    pub fn new(r: &Registry) -> Result<RebaseMetrics, prometheus::Error> {
        let m = RebaseMetrics {
            results: reg(r, IntCounterVec::new(opts(&REBASES), REBASES.labels)?)?,
            polls: reg(
                r,
                IntCounterVec::new(opts(&RUN_IMAGE_POLLS), RUN_IMAGE_POLLS.labels)?,
            )?,
            images_by_run_image: reg(
                r,
                IntGaugeVec::new(opts(&IMAGES_BY_RUN_IMAGE), IMAGES_BY_RUN_IMAGE.labels)?,
            )?,
            oldest_unpatched_age: reg(r, Gauge::with_opts(opts(&RUN_IMAGE_OLDEST_UNPATCHED_AGE))?)?,
            run_image_series: Arc::default(),
        };
        for result in REBASE_RESULTS.iter().chain(PREPULL_FAILURE_REASONS) {
            m.results.with_label_values(&[*result]);
        }
        for result in std::iter::once(&"ok").chain(REGISTRY_FAILURE_REASONS) {
            m.polls.with_label_values(&[*result]);
        }
        Ok(m)
    }

    /// Sets the images per run-image digest to exactly `counts` (digests gone are removed).
    pub fn set_images_by_run_image(&self, counts: &BTreeMap<String, usize>) {
        set_series(
            &self.images_by_run_image,
            &self.run_image_series,
            counts.iter().map(|(d, n)| (d.clone(), *n as u64)),
        );
    }
}

/// Sets a one-label gauge to exactly `values`, removing the series of label values that are
/// not there any more (`live` remembers which were set last time).
fn set_series(
    gauge: &IntGaugeVec,
    live: &Mutex<BTreeSet<String>>,
    values: impl IntoIterator<Item = (String, u64)>,
) {
    let mut live = match live.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let values: Vec<(String, u64)> = values.into_iter().collect();
    let now: BTreeSet<String> = values.iter().map(|(n, _)| n.clone()).collect();
    for gone in live.difference(&now) {
        // The series may already be gone; that is fine.
        let _ = gauge.remove_label_values(&[gone.as_str()]);
    }
    for (label, v) in &values {
        gauge
            .with_label_values(&[label.as_str()])
            .set(i64::try_from(*v).unwrap_or(i64::MAX));
    }
    *live = now;
}

/// The node insight metrics (per pod, container, image, registry; the eBPF programs' health).
#[derive(Clone)]
pub struct InsightMetrics {
    pub pod_net_bytes: IntCounterVec,
    pub pod_net_packets: IntCounterVec,
    pub container_cpu: CounterVec,
    pub container_memory: IntGaugeVec,
    pub container_runq: CounterVec,
    pub container_oom: IntCounterVec,
    pub image_pull_bytes: IntCounterVec,
    pub registry_bytes: IntCounterVec,
    pub registry_connections: IntCounterVec,
    pub owner_net_bytes: IntCounterVec,
    pub ebpf_feature: IntGaugeVec,
    pub kernel_capability: IntGaugeVec,
    pub map_entries: IntGaugeVec,
    pub map_capacity: IntGaugeVec,
    pub map_overflow: IntCounterVec,
}

impl InsightMetrics {
    pub fn new(r: &Registry) -> Result<InsightMetrics, prometheus::Error> {
        let icv = |d: &MetricDef| -> Result<IntCounterVec, prometheus::Error> {
            reg(r, IntCounterVec::new(opts(d), d.labels)?)
        };
        let cv = |d: &MetricDef| -> Result<CounterVec, prometheus::Error> {
            reg(r, CounterVec::new(opts(d), d.labels)?)
        };
        let igv = |d: &MetricDef| -> Result<IntGaugeVec, prometheus::Error> {
            reg(r, IntGaugeVec::new(opts(d), d.labels)?)
        };
        let m = InsightMetrics {
            pod_net_bytes: icv(&POD_NET_BYTES)?,
            pod_net_packets: icv(&POD_NET_PACKETS)?,
            container_cpu: cv(&CONTAINER_CPU)?,
            container_memory: igv(&CONTAINER_MEMORY)?,
            container_runq: cv(&CONTAINER_RUNQ)?,
            container_oom: icv(&CONTAINER_OOM)?,
            image_pull_bytes: icv(&IMAGE_PULL_BYTES)?,
            registry_bytes: icv(&REGISTRY_BYTES)?,
            registry_connections: icv(&REGISTRY_CONNECTIONS)?,
            owner_net_bytes: icv(&OWNER_NET_BYTES)?,
            ebpf_feature: igv(&EBPF_FEATURE)?,
            kernel_capability: igv(&KERNEL_CAPABILITY)?,
            map_entries: igv(&EBPF_MAP_ENTRIES)?,
            map_capacity: igv(&EBPF_MAP_CAPACITY)?,
            map_overflow: icv(&EBPF_MAP_OVERFLOW)?,
        };
        for owner in crate::core::workloads::Owner::ALL {
            for dir in ["ingress", "egress"] {
                m.owner_net_bytes.with_label_values(&[owner.as_str(), dir]);
            }
        }
        Ok(m)
    }
}

/// The pre-pull metrics: cheap clones of the same series, handed to every puller.
#[derive(Clone)]
pub struct PrepullMetrics {
    pub bytes: IntCounterVec,
    pub layers: IntCounterVec,
    pub duration: Histogram,
    pub failures: IntCounterVec,
    pub inflight: IntGauge,
    pub images: IntGaugeVec,
}

impl PrepullMetrics {
    pub fn new(r: &Registry) -> Result<PrepullMetrics, prometheus::Error> {
        let m = PrepullMetrics {
            bytes: reg(
                r,
                IntCounterVec::new(opts(&PREPULL_BYTES), PREPULL_BYTES.labels)?,
            )?,
            layers: reg(
                r,
                IntCounterVec::new(opts(&PREPULL_LAYERS), PREPULL_LAYERS.labels)?,
            )?,
            duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(PREPULL_DURATION.name, PREPULL_DURATION.help)
                        .buckets(PREPULL_DURATION_BUCKETS.to_vec()),
                )?,
            )?,
            failures: reg(
                r,
                IntCounterVec::new(opts(&PREPULL_FAILURES), PREPULL_FAILURES.labels)?,
            )?,
            inflight: reg(r, IntGauge::with_opts(opts(&PREPULL_INFLIGHT))?)?,
            images: reg(
                r,
                IntGaugeVec::new(opts(&PREPULL_IMAGES), PREPULL_IMAGES.labels)?,
            )?,
        };
        for result in ["fetched", "reused"] {
            m.bytes.with_label_values(&[result]);
        }
        for result in ["fetched", "reused", "failed"] {
            m.layers.with_label_values(&[result]);
        }
        for state in ["ready", "failed", "pending"] {
            m.images.with_label_values(&[state]);
        }
        for reason in PREPULL_FAILURE_REASONS {
            m.failures.with_label_values(&[*reason]);
        }
        Ok(m)
    }
}

/// The kube adapter's metrics (registered only when it runs, so a node without Kubernetes
/// exports none of them).
#[derive(Clone)]
pub struct KubeMetrics {
    pub up: IntGauge,
    pub pods: IntGauge,
    pub watch_errors: IntCounterVec,
    pub resources: IntGaugeVec,
    pub events: IntCounterVec,
}

/// Metrics registered only when the kube adapter runs (`[kubernetes]` on).
pub const KUBE_ONLY: &[&MetricDef] = &[
    &KUBE_UP,
    &KUBE_PODS,
    &KUBE_WATCH_ERRORS,
    &PREPULL_RESOURCES,
    &KUBE_EVENTS,
];

/// The watches whose errors `ragent_kube_watch_errors_total` counts.
pub const KUBE_WATCHES: &[&str] = &["pods", "nodes", "prepulls", "endpointslices"];

impl KubeMetrics {
    pub fn new(r: &Registry) -> Result<KubeMetrics, prometheus::Error> {
        let m = KubeMetrics {
            up: reg(r, IntGauge::with_opts(opts(&KUBE_UP))?)?,
            pods: reg(r, IntGauge::with_opts(opts(&KUBE_PODS))?)?,
            watch_errors: reg(
                r,
                IntCounterVec::new(opts(&KUBE_WATCH_ERRORS), KUBE_WATCH_ERRORS.labels)?,
            )?,
            resources: reg(
                r,
                IntGaugeVec::new(opts(&PREPULL_RESOURCES), PREPULL_RESOURCES.labels)?,
            )?,
            events: reg(
                r,
                IntCounterVec::new(opts(&KUBE_EVENTS), KUBE_EVENTS.labels)?,
            )?,
        };
        for w in KUBE_WATCHES {
            m.watch_errors.with_label_values(&[*w]);
        }
        for s in ["applied", "not_selected", "refused"] {
            m.resources.with_label_values(&[s]);
        }
        for r in ["published", "failed"] {
            m.events.with_label_values(&[r]);
        }
        Ok(m)
    }
}

/// The right-sizing metrics.
#[derive(Clone)]
pub struct RightsizingMetrics {
    pub cpu: GaugeVec,
    pub memory: GaugeVec,
    pub containers: IntGauge,
    pub samples: IntCounter,
    pub checkpoint_errors: IntCounterVec,
    pub checkpoint_time: Gauge,
    /// No label: a vec so the series can be absent when the saving is unknown.
    pub node_saving: GaugeVec,
    pub node_shape: IntGaugeVec,
}

/// Why a checkpoint could not be used (every value exists from the start).
pub const CHECKPOINT_ERROR_REASONS: &[&str] = &[
    "not_a_checkpoint",
    "truncated",
    "unsupported_version",
    "checksum_mismatch",
    "corrupt",
    "read",
    "write",
];

impl RightsizingMetrics {
    pub fn new(r: &Registry) -> Result<RightsizingMetrics, prometheus::Error> {
        let m = RightsizingMetrics {
            cpu: reg(
                r,
                GaugeVec::new(opts(&RECOMMENDATION_CPU), RECOMMENDATION_CPU.labels)?,
            )?,
            memory: reg(
                r,
                GaugeVec::new(opts(&RECOMMENDATION_MEMORY), RECOMMENDATION_MEMORY.labels)?,
            )?,
            containers: reg(r, IntGauge::with_opts(opts(&RIGHTSIZING_CONTAINERS))?)?,
            samples: reg(r, IntCounter::with_opts(opts(&RIGHTSIZING_SAMPLES))?)?,
            checkpoint_errors: reg(
                r,
                IntCounterVec::new(
                    opts(&RIGHTSIZING_CHECKPOINT_ERRORS),
                    RIGHTSIZING_CHECKPOINT_ERRORS.labels,
                )?,
            )?,
            checkpoint_time: reg(r, Gauge::with_opts(opts(&RIGHTSIZING_CHECKPOINT_TIME))?)?,
            node_saving: reg(r, GaugeVec::new(opts(&NODE_SAVING), NODE_SAVING.labels)?)?,
            node_shape: reg(r, IntGaugeVec::new(opts(&NODE_SHAPE), NODE_SHAPE.labels)?)?,
        };
        for reason in CHECKPOINT_ERROR_REASONS {
            m.checkpoint_errors.with_label_values(&[*reason]);
        }
        Ok(m)
    }
}

/// The layer-sharing metrics (registered only when `[sharing]` is on).
#[derive(Clone)]
pub struct SharingMetrics {
    pub blob_bytes: IntCounterVec,
    pub avoided: IntCounterVec,
    pub peer_latency: HistogramVec,
    pub fallbacks: IntCounterVec,
    pub requests: IntCounterVec,
    pub served: IntCounterVec,
    pub peers: IntGaugeVec,
    /// `[sharing] registries`: the only `registry` label values besides `other`.
    registries: std::sync::Arc<Vec<String>>,
}

/// Metrics registered only when layer sharing runs (`[sharing] enabled`).
pub const SHARING_ONLY: &[&MetricDef] = &[
    &BLOB_BYTES,
    &UPSTREAM_FETCHES_AVOIDED,
    &PEER_REQUEST_DURATION,
    &PEER_FALLBACKS,
    &PEER_REQUESTS,
    &PEER_SERVED_BYTES,
    &SHARING_PEERS,
];

/// Buckets for peer answers: loopback and LAN answers are milliseconds; a peer that first has
/// to reach the registry takes longer.
const PEER_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The peer server's outcomes (every value exists from the start).
pub const PEER_REQUEST_OUTCOMES: &[&str] = &[
    "store",
    "fetched",
    "declined",
    "challenged",
    "forbidden",
    "not_found",
    "failed",
];

impl SharingMetrics {
    pub fn new(r: &Registry, registries: &[String]) -> Result<SharingMetrics, prometheus::Error> {
        let m = SharingMetrics {
            blob_bytes: reg(r, IntCounterVec::new(opts(&BLOB_BYTES), BLOB_BYTES.labels)?)?,
            avoided: reg(
                r,
                IntCounterVec::new(
                    opts(&UPSTREAM_FETCHES_AVOIDED),
                    UPSTREAM_FETCHES_AVOIDED.labels,
                )?,
            )?,
            peer_latency: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(PEER_REQUEST_DURATION.name, PEER_REQUEST_DURATION.help)
                        .buckets(PEER_LATENCY_BUCKETS.to_vec()),
                    PEER_REQUEST_DURATION.labels,
                )?,
            )?,
            fallbacks: reg(
                r,
                IntCounterVec::new(opts(&PEER_FALLBACKS), PEER_FALLBACKS.labels)?,
            )?,
            requests: reg(
                r,
                IntCounterVec::new(opts(&PEER_REQUESTS), PEER_REQUESTS.labels)?,
            )?,
            served: reg(
                r,
                IntCounterVec::new(opts(&PEER_SERVED_BYTES), PEER_SERVED_BYTES.labels)?,
            )?,
            peers: reg(
                r,
                IntGaugeVec::new(opts(&SHARING_PEERS), SHARING_PEERS.labels)?,
            )?,
            registries: std::sync::Arc::new(registries.to_vec()),
        };
        for registry in registries {
            for source in ["local", "peer", "upstream"] {
                m.blob_bytes.with_label_values(&[registry.as_str(), source]);
            }
            m.avoided.with_label_values(&[registry.as_str()]);
            m.served.with_label_values(&[registry.as_str()]);
        }
        for why in crate::core::sharing::Fallback::ALL {
            m.fallbacks.with_label_values(&[why.metric_label()]);
        }
        for caller in ["local", "peer", "stranger"] {
            for outcome in PEER_REQUEST_OUTCOMES {
                m.requests.with_label_values(&[caller, outcome]);
            }
        }
        for outcome in ["ok", "status", "timeout", "connect"] {
            m.peer_latency.with_label_values(&[outcome]);
        }
        for state in ["ready", "not_ready", "down"] {
            m.peers.with_label_values(&[state]);
        }
        Ok(m)
    }

    /// The `registry` label for `registry`: itself when `[sharing] registries` lists it, else
    /// `other` (the value comes from requests, so it is bounded here).
    pub fn registry_label<'a>(&self, registry: &'a str) -> &'a str {
        if self.registries.iter().any(|r| r == registry) {
            registry
        } else {
            "other"
        }
    }
}

/// Handles to every metric, registered into the registry passed in.
pub struct Metrics {
    registry: Registry,
    pub containerd_up: IntGauge,
    pub containerd_reconnects: IntCounter,
    pub containerd_events: IntCounterVec,
    pub inventory_refreshes: IntCounterVec,
    pub images: IntGauge,
    pub unresolved_images: IntGauge,
    pub containers: IntGauge,
    pub image_size: IntGaugeVec,
    pub node_layer_bytes: IntGaugeVec,
    pub node_layer_role_bytes: IntGaugeVec,
    pub node_layer_dedup_ratio: Gauge,
    pub ebpf_programs: IntGauge,
    pub node_net_bytes: IntCounterVec,
    pub node_net_packets: IntCounterVec,
    pub ebpf_overflow: IntCounterVec,
    pub process_cpu: Counter,
    pub process_rss: IntGauge,
    pub process_fds: IntGauge,
    pub process_threads: IntGauge,
    pub prepull: PrepullMetrics,
    pub rebase: RebaseMetrics,
    pub insight: InsightMetrics,
    pub rightsizing: RightsizingMetrics,
    /// Set when the kube adapter runs ([`Metrics::kube`]).
    kube: std::sync::OnceLock<KubeMetrics>,
    sharing: std::sync::OnceLock<SharingMetrics>,
    image_series: Mutex<BTreeSet<String>>,
}

impl Metrics {
    pub fn new(registry: Registry) -> Result<Metrics, prometheus::Error> {
        let r = &registry;
        let build_info = reg(r, IntGaugeVec::new(opts(&BUILD_INFO), BUILD_INFO.labels)?)?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let m = Metrics {
            containerd_up: reg(r, IntGauge::with_opts(opts(&CONTAINERD_UP))?)?,
            containerd_reconnects: reg(r, IntCounter::with_opts(opts(&CONTAINERD_RECONNECTS))?)?,
            containerd_events: reg(
                r,
                IntCounterVec::new(opts(&CONTAINERD_EVENTS), CONTAINERD_EVENTS.labels)?,
            )?,
            inventory_refreshes: reg(
                r,
                IntCounterVec::new(opts(&INVENTORY_REFRESHES), INVENTORY_REFRESHES.labels)?,
            )?,
            images: reg(r, IntGauge::with_opts(opts(&IMAGES))?)?,
            unresolved_images: reg(r, IntGauge::with_opts(opts(&UNRESOLVED_IMAGES))?)?,
            containers: reg(r, IntGauge::with_opts(opts(&CONTAINERS))?)?,
            image_size: reg(r, IntGaugeVec::new(opts(&IMAGE_SIZE), IMAGE_SIZE.labels)?)?,
            node_layer_bytes: reg(
                r,
                IntGaugeVec::new(opts(&NODE_LAYER_BYTES), NODE_LAYER_BYTES.labels)?,
            )?,
            node_layer_role_bytes: reg(
                r,
                IntGaugeVec::new(opts(&NODE_LAYER_ROLE_BYTES), NODE_LAYER_ROLE_BYTES.labels)?,
            )?,
            node_layer_dedup_ratio: reg(r, Gauge::with_opts(opts(&NODE_LAYER_DEDUP_RATIO))?)?,
            ebpf_programs: reg(r, IntGauge::with_opts(opts(&EBPF_PROGRAMS))?)?,
            node_net_bytes: reg(
                r,
                IntCounterVec::new(opts(&NODE_NET_BYTES), NODE_NET_BYTES.labels)?,
            )?,
            node_net_packets: reg(
                r,
                IntCounterVec::new(opts(&NODE_NET_PACKETS), NODE_NET_PACKETS.labels)?,
            )?,
            ebpf_overflow: reg(
                r,
                IntCounterVec::new(opts(&EBPF_OVERFLOW), EBPF_OVERFLOW.labels)?,
            )?,
            process_cpu: reg(r, Counter::with_opts(opts(&PROCESS_CPU))?)?,
            process_rss: reg(r, IntGauge::with_opts(opts(&PROCESS_RSS))?)?,
            process_fds: reg(r, IntGauge::with_opts(opts(&PROCESS_FDS))?)?,
            process_threads: reg(r, IntGauge::with_opts(opts(&PROCESS_THREADS))?)?,
            prepull: PrepullMetrics::new(r)?,
            rebase: RebaseMetrics::new(r)?,
            insight: InsightMetrics::new(r)?,
            rightsizing: RightsizingMetrics::new(r)?,
            kube: std::sync::OnceLock::new(),
            sharing: std::sync::OnceLock::new(),
            image_series: Mutex::new(BTreeSet::new()),
            registry,
        };
        // Series that exist from the start, so dashboards show 0 rather than "no data".
        for dir in ["ingress", "egress"] {
            m.node_net_bytes.with_label_values(&[dir]);
            m.node_net_packets.with_label_values(&[dir]);
        }
        m.ebpf_overflow
            .with_label_values(&[ragent_ebpf::MAP_CGROUP_NET]);
        for topic in EVENT_TOPICS.iter().chain(&["other"]) {
            m.containerd_events.with_label_values(&[*topic]);
        }
        for result in ["ok", "error"] {
            m.inventory_refreshes.with_label_values(&[result]);
        }
        for scope in ["per_image", "unique"] {
            m.node_layer_bytes.with_label_values(&[scope]);
        }
        for role in crate::core::cnb::Role::ALL {
            m.node_layer_role_bytes.with_label_values(&[role.as_str()]);
        }
        Ok(m)
    }

    /// The kube adapter's metrics, registered on first use.
    pub fn kube(&self) -> Result<KubeMetrics, prometheus::Error> {
        if let Some(k) = self.kube.get() {
            return Ok(k.clone());
        }
        let k = KubeMetrics::new(&self.registry)?;
        Ok(self.kube.get_or_init(|| k).clone())
    }

    /// The sharing metrics, registered on first use (only when `[sharing]` is on).
    pub fn sharing(&self, registries: &[String]) -> Result<SharingMetrics, prometheus::Error> {
        if let Some(m) = self.sharing.get() {
            return Ok(m.clone());
        }
        let m = SharingMetrics::new(&self.registry, registries)?;
        Ok(self.sharing.get_or_init(|| m).clone())
    }

    /// Sets the per-image series to exactly `sizes`, removing series of images that are gone.
    pub fn set_image_sizes(&self, sizes: &[(String, u64)]) {
        set_series(&self.image_size, &self.image_series, sizes.iter().cloned());
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// Advances a counter that mirrors an absolute, monotonic source (a kernel map, /proc) to `value`.
pub fn advance_to(counter: &IntCounter, value: u64) {
    let cur = counter.get();
    if value > cur {
        counter.inc_by(value - cur);
    }
}

/// Same for a float counter.
pub fn advance_to_f64(counter: &Counter, value: f64) {
    let cur = counter.get();
    if value > cur {
        counter.inc_by(value - cur);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_follow_the_convention() {
        let mut seen = BTreeSet::new();
        for d in CATALOGUE {
            assert!(d.name.starts_with("ragent_"), "{}", d.name);
            assert!(seen.insert(d.name), "duplicate {}", d.name);
            assert_eq!(
                d.name.ends_with("_total"),
                d.kind == Kind::Counter,
                "{}: _total iff counter",
                d.name
            );
            assert!(
                !d.labels
                    .iter()
                    .any(|l| ["pod_ip", "ip", "uid", "digest"].contains(l)),
                "{}: unbounded label",
                d.name
            );
        }
    }

    #[test]
    fn every_catalogued_metric_is_exported_with_its_type() {
        let m = Metrics::new(Registry::new()).unwrap();
        m.set_image_sizes(&[("a".into(), 1)]);
        m.rebase
            .set_images_by_run_image(&BTreeMap::from([("sha256:r".to_string(), 2)]));
        // Per-pod, per-image and per-map series exist once something is measured.
        let i = &m.insight;
        let c = ["ns", "pod", "c"];
        i.pod_net_bytes.with_label_values(&["ns", "pod", "ingress"]);
        i.pod_net_packets
            .with_label_values(&["ns", "pod", "ingress"]);
        i.container_cpu.with_label_values(&c);
        i.container_memory.with_label_values(&c);
        i.container_runq.with_label_values(&c);
        i.container_oom.with_label_values(&c);
        i.image_pull_bytes.with_label_values(&["img", "reg"]);
        i.registry_bytes.with_label_values(&["reg", "ingress"]);
        i.registry_connections.with_label_values(&["reg"]);
        i.ebpf_feature.with_label_values(&["net"]);
        i.kernel_capability.with_label_values(&["btf"]);
        i.map_entries.with_label_values(&["M"]);
        i.map_capacity.with_label_values(&["M"]);
        i.map_overflow.with_label_values(&["M"]);
        let rs = &m.rightsizing;
        rs.cpu.with_label_values(&["ns", "pod", "c", "", "target"]);
        rs.memory
            .with_label_values(&["ns", "pod", "c", "", "target"]);
        rs.node_shape.with_label_values(&["a", "b"]);
        rs.node_saving.with_label_values::<&str>(&[]).set(0.5);
        m.kube().unwrap();
        let sh = m.sharing(&["r:5000".to_string()]).unwrap();
        assert_eq!(sh.registry_label("r:5000"), "r:5000");
        assert_eq!(sh.registry_label("attacker.example/anything"), "other");
        // Registered once: a second call returns the same handles.
        m.kube().unwrap().pods.set(3);
        let text = m.encode().unwrap();
        assert!(text.contains("ragent_kube_pods 3"), "{text}");
        for d in CATALOGUE {
            assert!(
                text.contains(&format!("# TYPE {} {}", d.name, d.kind.as_str())),
                "{} missing:\n{text}",
                d.name
            );
        }
    }

    #[test]
    fn image_series_of_gone_images_are_removed() {
        let m = Metrics::new(Registry::new()).unwrap();
        m.set_image_sizes(&[("a".into(), 1), ("b".into(), 2)]);
        m.set_image_sizes(&[("b".into(), 3)]);
        let text = m.encode().unwrap();
        assert!(!text.contains("image=\"a\""), "{text}");
        assert!(
            text.contains("ragent_image_size_bytes{image=\"b\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn counters_mirror_absolute_values_and_never_go_back() {
        let c = IntCounter::new("x_total", "x").unwrap();
        advance_to(&c, 10);
        advance_to(&c, 7);
        advance_to(&c, 12);
        assert_eq!(c.get(), 12);
    }

    #[test]
    fn the_readme_documents_every_metric() {
        let readme = include_str!("../../README.md");
        for d in CATALOGUE {
            let row = format!("| `{}` | {} |", d.name, d.kind.as_str());
            assert!(
                readme.contains(&row),
                "README.md's metric table lacks the row for {}",
                d.name
            );
        }
    }

    #[test]
    fn run_image_series_of_gone_digests_are_removed() {
        let m = Metrics::new(Registry::new()).unwrap();
        let r = &m.rebase;
        r.set_images_by_run_image(&BTreeMap::from([
            ("sha256:1".to_string(), 2),
            ("sha256:2".to_string(), 1),
        ]));
        r.set_images_by_run_image(&BTreeMap::from([("sha256:2".to_string(), 3)]));
        let text = m.encode().unwrap();
        assert!(!text.contains("sha256:1"), "{text}");
        assert!(
            text.contains("ragent_images_by_run_image{run_image_digest=\"sha256:2\"} 3"),
            "{text}"
        );
        // Every result and poll reason is there from the start; the registry's reasons are
        // its own, none of containerd's.
        assert_eq!(REGISTRY_FAILURE_REASONS.last(), Some(&"manifest"));
        assert!(!REGISTRY_FAILURE_REASONS.contains(&"containerd"));
        assert!(text.contains("ragent_rebases_total{result=\"rebased\"} 0"));
        assert!(text.contains("ragent_run_image_polls_total{result=\"rate_limited\"} 0"));
    }

    #[test]
    fn topics_are_bounded() {
        assert_eq!(topic_label("/images/create"), "/images/create");
        assert_eq!(topic_label("/something/new"), "other");
    }
}
