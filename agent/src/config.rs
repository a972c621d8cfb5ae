//! Command line, environment and config file: parsed, merged (flag > env > file > default),
//! validated once at start.
//!
//! Every flag can be given as `RAGENT_<FLAG_NAME>` (e.g. `--metrics-addr` ↔ `RAGENT_METRICS_ADDR`).
//! The config file (TOML, `--config FILE`) is documented in docs/config.md.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::core::credentials::{Credentials, CredentialsError};

/// Default containerd socket.
pub const DEFAULT_CONTAINERD: &str = "/run/containerd/containerd.sock";
/// Default containerd namespace (the one kubelet's CRI uses).
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
/// Default address of /metrics, /healthz and /readyz.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";
/// Default delay between an image event and the inventory rebuild it triggers (events come in bursts).
pub const DEFAULT_REFRESH_DEBOUNCE_MS: u64 = 250;
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";
pub const DEFAULT_SERIES_GRACE_S: u64 = 300;

#[derive(Debug, Parser)]
#[command(
    name = "ragent",
    version,
    about = "Node agent for buildpack-built workloads: layer-aware pre-pull, eBPF insight, node-local rebase"
)]
pub struct Cli {
    /// containerd's gRPC socket [default: /run/containerd/containerd.sock]
    #[arg(long, global = true, env = "RAGENT_CONTAINERD", value_name = "SOCKET")]
    pub containerd: Option<PathBuf>,
    /// containerd namespace [default: k8s.io]
    #[arg(long, global = true, env = "RAGENT_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, global = true, env = "RAGENT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch containerd, serve /metrics, /healthz and /readyz.
    Agent(AgentArgs),
    /// List the node's images with their layers, CNB roles and how much they share.
    Images(ImagesArgs),
    /// Fetch images into containerd, each unique layer once, shared layers first.
    Prepull(PrepullArgs),
    /// Move a CNB app image onto a patched run image inside containerd (no rebuild, no
    /// app-layer download); `--rollback` undoes an in-place rebase.
    Rebase(RebaseArgs),
    /// Print the PrePull CustomResourceDefinition (YAML) for `kubectl apply -f -`; the Helm
    /// chart ships the same file.
    Crd,
    /// Print a running agent's request recommendations per container (`--node`: the node
    /// instance-shape advice)
    Recommend(RecommendArgs),
}

#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// The app image (its name in containerd, e.g. registry/repository:tag)
    #[arg(required = true, value_name = "IMAGE")]
    pub image: String,
    /// The new run image [default: chosen from the app's runImage.image and mirrors, preferring
    /// the app's registry]
    #[arg(long, value_name = "REF", conflicts_with = "rollback")]
    pub run_image: Option<String>,
    /// Write the result under a new name (the app's record stays as it is)
    #[arg(long, value_name = "NEW_NAME", conflicts_with_all = ["in_place", "rollback"])]
    pub tag: Option<String>,
    /// Move the app's own name to the result; the previous image stays as IMAGE-ragent-rollback
    /// (the default when --tag is not given)
    #[arg(long)]
    pub in_place: bool,
    /// Print the plan (layers removed and added, labels changed, bytes to fetch); write nothing
    #[arg(long, conflicts_with = "rollback")]
    pub dry_run: bool,
    /// Override what the lifecycle's -force overrides: rebasable=false, an os/architecture/
    /// variant/distro mismatch, a run image not named in the app's metadata
    #[arg(long, conflicts_with = "rollback")]
    pub force: bool,
    /// Restore the image an in-place rebase of IMAGE replaced
    #[arg(long)]
    pub rollback: bool,
    /// A registry (HOST[:PORT]) to reach over plain HTTP; repeat for several
    #[arg(
        long = "insecure-registry",
        env = "RAGENT_INSECURE_REGISTRY",
        value_delimiter = ',',
        value_name = "HOST[:PORT]"
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials for fetching the run image: a docker config.json, or a
    /// kubernetes.io/dockerconfigjson secret
    #[arg(long, env = "RAGENT_AUTH", value_name = "FILE")]
    pub auth: Option<PathBuf>,
    /// Write a report like the lifecycle's report.toml (tags, image-id, digest, manifest-size)
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Print one JSON document (old/new digest, old/new run image, layers replaced, bytes
    /// fetched, seconds) instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PrepullArgs {
    /// Image references (registry/repository:tag or @digest)
    #[arg(required = true, value_name = "REF")]
    pub refs: Vec<String>,
    /// A registry (HOST[:PORT]) to reach over plain HTTP; repeat for several
    #[arg(
        long = "insecure-registry",
        env = "RAGENT_INSECURE_REGISTRY",
        value_delimiter = ',',
        value_name = "HOST[:PORT]"
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a docker config.json, or a kubernetes.io/dockerconfigjson secret
    /// (`kubectl get secret NAME -o json`, or the mounted `.dockerconfigjson` file)
    #[arg(long, env = "RAGENT_AUTH", value_name = "FILE")]
    pub auth: Option<PathBuf>,
    /// Blobs fetched at once [default: 4]
    #[arg(long, env = "RAGENT_CONCURRENCY", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: Option<u16>,
    /// Cap on the pull's bandwidth, bytes per second (suffixes k, M, G = 1000^n; Ki, Mi, Gi = 1024^n)
    #[arg(long, env = "RAGENT_MAX_RATE", value_name = "BYTES_PER_S", value_parser = parse_rate)]
    pub max_rate: Option<u64>,
    /// Seconds a registry may stay silent (connecting, or between two reads of an answer)
    /// before the pull fails [default: 30]
    #[arg(long, env = "RAGENT_REGISTRY_TIMEOUT", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub registry_timeout: Option<u64>,
    /// Print one JSON report instead of text
    #[arg(long)]
    pub json: bool,
}

/// Parses a rate in bytes per second: `1000000`, `50M`, `20Mi`, `1.5G`.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{text:?} is not a rate: use bytes per second, e.g. 25000000, 25M or 24Mi"
            ));
        }
    };
    let n: f64 = num.parse().map_err(|_| {
        format!("{text:?} is not a rate: use bytes per second, e.g. 25000000, 25M or 24Mi")
    })?;
    let rate = n * mult;
    if !(1024.0..=1e12).contains(&rate) {
        return Err(format!(
            "{text:?} is out of range: a rate is between 1Ki and 1000G bytes per second"
        ));
    }
    Ok(rate as u64)
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (TOML; see docs/config.md)
    #[arg(long, env = "RAGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for /metrics, /healthz, /readyz [default: 0.0.0.0:9464]
    #[arg(long, env = "RAGENT_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// The cgroup2 mount to attach eBPF to [default: detected]
    #[arg(long, env = "RAGENT_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// Do not load eBPF programs (cgroupfs and containerd metrics only)
    #[arg(
        long,
        env = "RAGENT_NO_EBPF",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_ebpf: bool,
    /// Where bpffs is (mounted there when missing) [default: /sys/fs/bpf]
    #[arg(long, env = "RAGENT_BPFFS", value_name = "PATH")]
    pub bpffs: Option<PathBuf>,
    /// Where tracefs is (mounted there when missing) [default: /sys/kernel/tracing]
    #[arg(long, env = "RAGENT_TRACEFS", value_name = "PATH")]
    pub tracefs: Option<PathBuf>,
    /// Seconds the series of a gone pod, container or image stay before they are removed [default: 300]
    #[arg(long, env = "RAGENT_SERIES_GRACE", value_name = "SECONDS")]
    pub series_grace: Option<u64>,
    /// Seconds between two right-sizing samples of every container [default: 15]
    #[arg(long, env = "RAGENT_SAMPLE_INTERVAL", value_name = "SECONDS")]
    pub sample_interval: Option<u64>,
    /// Where the right-sizing history is checkpointed [default: /var/lib/ragent/rightsizing]
    #[arg(long, env = "RAGENT_CHECKPOINT_DIR", value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Where the peer server listens when [sharing] is enabled [default: 0.0.0.0:9465]
    #[arg(long, env = "RAGENT_PEER_ADDR", value_name = "HOST:PORT")]
    pub peer_addr: Option<String>,
}

#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// The agent to ask (its metrics address)
    #[arg(
        long,
        env = "RAGENT_AGENT_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:9464"
    )]
    pub agent: String,
    /// Print the agent's JSON instead of the table
    #[arg(long)]
    pub json: bool,
    /// Print the node instance-shape advice instead of the containers
    #[arg(long)]
    pub node: bool,
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Print one JSON document instead of the table
    #[arg(long)]
    pub json: bool,
}

/// The config file. Unknown keys are errors, so a typo never silently does nothing.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub containerd: Option<PathBuf>,
    pub namespace: Option<String>,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub prepull: PrepullSection,
    #[serde(default)]
    pub rebase: RebaseSection,
    #[serde(default)]
    pub kubernetes: KubernetesSection,
    #[serde(default)]
    pub rightsizing: RightsizingSection,
    #[serde(default)]
    pub sharing: SharingSection,
}

/// `[sharing]`: cluster-wide layer sharing (issue 8, docs/sharing.md). Off unless
/// `enabled = true`; what exists so far is the peer server and the certs.d mirror entries.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SharingSection {
    pub enabled: Option<bool>,
    /// Where the peer server listens [default: 0.0.0.0:9465].
    pub peer_addr: Option<String>,
    /// Registries whose `certs.d/<registry>/hosts.toml` gets the local agent as a mirror.
    #[serde(default)]
    pub registries: Vec<String>,
    /// containerd's registry `config_path` [default: /etc/containerd/certs.d].
    pub certs_dir: Option<PathBuf>,
    /// Registries or `registry/namespace` prefixes served to anyone (default: none).
    #[serde(default)]
    pub public: Vec<String>,
    /// This node's peer id [default: the Kubernetes node name, else the host name].
    pub node: Option<String>,
    /// This node's topology zone (home peers are chosen in the zone first) [default: none].
    pub zone: Option<String>,
    /// A static peer list (membership without Kubernetes); this node may be in it.
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// A headless Service whose EndpointSlices list the peers (needs `[kubernetes]`).
    pub service: Option<String>,
    /// The Service's namespace [default: the POD_NAMESPACE environment variable].
    pub service_namespace: Option<String>,
    /// A file holding the secret agents present to each other.
    pub token_file: Option<PathBuf>,
    /// How long a peer has to answer (its response headers) before the next is asked.
    pub peer_timeout_ms: Option<u64>,
    /// Where blobs fetched upstream for peers are spooled while they stream.
    pub spool_dir: Option<PathBuf>,
    /// How long containerd keeps a blob fetched for peers (a lease), seconds.
    pub keep_s: Option<u64>,
    /// Registries (HOST[:PORT]) reached over plain HTTP for upstream fetches.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Registry credentials for upstream fetches (same formats as `ragent prepull --auth`).
    pub auth: Option<PathBuf>,
}

/// One `[[sharing.peers]]` entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub id: String,
    /// `ip:port` of its peer server.
    pub addr: String,
    pub zone: Option<String>,
}

pub const DEFAULT_PEER_ADDR: &str = "0.0.0.0:9465";
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/ragent/spool";
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_KEEP_S: u64 = 3600;

/// Validated `[sharing]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharingSettings {
    /// false: the peer server does not run and ragent's entries in `certs_dir` are restored.
    pub enabled: bool,
    pub peer_addr: SocketAddr,
    /// The URL containerd on this node reaches the peer server at (loopback when the peer
    /// address is unspecified).
    pub mirror: String,
    pub registries: Vec<String>,
    pub certs_dir: PathBuf,
    pub public: crate::core::sharing::PublicPolicy,
    /// This node's peer id; None: the agent's node name.
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The static peer list (validated: unique ids, `ip:port` addresses).
    pub peers: Vec<crate::core::sharing::Peer>,
    /// EndpointSlice membership: (namespace, service).
    pub service: Option<(String, String)>,
    /// The peer secret (read at start); None: no peers are asked and peer requests are 403.
    pub token: Option<crate::core::sharing::Token>,
    pub peer_timeout: std::time::Duration,
    pub spool_dir: PathBuf,
    pub keep: std::time::Duration,
    pub insecure_registries: Vec<String>,
    pub credentials: Credentials,
}

/// Validates `[sharing]` with `--peer-addr` over it.
pub fn sharing_settings(
    section: &SharingSection,
    peer_addr_flag: Option<&str>,
) -> Result<SharingSettings, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Sharing { key, reason };
    let addr = peer_addr_flag
        .map(str::to_string)
        .or_else(|| section.peer_addr.clone())
        .unwrap_or_else(|| DEFAULT_PEER_ADDR.to_string());
    let peer_addr = addr.parse::<SocketAddr>().map_err(|e| ConfigError::Addr {
        what: "--peer-addr (sharing.peer_addr)",
        value: addr.clone(),
        reason: e.to_string(),
    })?;
    let mut registries = Vec::new();
    for r in &section.registries {
        crate::core::sharing::validate_registry(r)
            .map_err(|e| invalid("registries", e.to_string()))?;
        if !registries.contains(r) {
            registries.push(r.clone());
        }
    }
    let public = crate::core::sharing::PublicPolicy::parse(&section.public)
        .map_err(|e| invalid("public", e.to_string()))?;
    let certs_dir = section
        .certs_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CERTS_DIR));
    if certs_dir.as_os_str().is_empty() {
        return Err(ConfigError::Empty {
            what: "sharing.certs_dir",
        });
    }
    let ip = peer_addr.ip();
    let host = if ip.is_unspecified() {
        if ip.is_ipv4() {
            "127.0.0.1".to_string()
        } else {
            "[::1]".to_string()
        }
    } else if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let mut peers: Vec<crate::core::sharing::Peer> = Vec::new();
    for p in &section.peers {
        let peer = crate::core::sharing::Peer::configured(&p.id, &p.addr, p.zone.as_deref())
            .map_err(|e| invalid("peers", e.to_string()))?;
        if peers.iter().any(|q| q.id == peer.id) {
            return Err(invalid(
                "peers",
                format!("the id {:?} is listed twice", p.id),
            ));
        }
        peers.push(peer);
    }
    for (key, v) in [("node", &section.node), ("zone", &section.zone)] {
        if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(invalid(key, "is empty".into()));
        }
    }
    let service = match &section.service {
        None => None,
        Some(s) => {
            let ns = section
                .service_namespace
                .clone()
                .or_else(|| env("POD_NAMESPACE"))
                .ok_or_else(|| {
                    invalid(
                        "service_namespace",
                        "unknown: set the POD_NAMESPACE environment variable from the downward \
                         API (fieldRef metadata.namespace; the chart does) or \
                         [sharing] service_namespace"
                            .into(),
                    )
                })?;
            crate::core::sharing::validate_dns_label(s)
                .map_err(|e| invalid("service", e.to_string()))?;
            Some((ns, s.clone()))
        }
    };
    let token = match &section.token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("token_file", format!("{}: {e}", path.display())))?;
            Some(
                crate::core::sharing::Token::parse(&text)
                    .map_err(|e| invalid("token_file", format!("{}: {e}", path.display())))?,
            )
        }
    };
    if token.is_none() && (!peers.is_empty() || service.is_some()) {
        return Err(invalid(
            "token_file",
            "is required with peers or service: agents authenticate each other with it \
             (a file holding one shared random secret, at least 16 characters)"
                .into(),
        ));
    }
    let peer_timeout_ms = section.peer_timeout_ms.unwrap_or(DEFAULT_PEER_TIMEOUT_MS);
    if !(10..=60_000).contains(&peer_timeout_ms) {
        return Err(invalid(
            "peer_timeout_ms",
            format!("{peer_timeout_ms} is out of range (10..=60000)"),
        ));
    }
    let keep_s = section.keep_s.unwrap_or(DEFAULT_KEEP_S);
    if !(60..=7 * 86_400).contains(&keep_s) {
        return Err(invalid(
            "keep_s",
            format!("{keep_s} is out of range (60..=604800)"),
        ));
    }
    let spool_dir = section
        .spool_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR));
    if spool_dir.as_os_str().is_empty() {
        return Err(ConfigError::Empty {
            what: "sharing.spool_dir",
        });
    }
    Ok(SharingSettings {
        enabled: section.enabled.unwrap_or(false),
        peer_addr,
        mirror: format!("http://{host}:{}", peer_addr.port()),
        registries,
        certs_dir,
        public,
        node: section.node.clone(),
        zone: section.zone.clone(),
        peers,
        service,
        token,
        peer_timeout: std::time::Duration::from_millis(peer_timeout_ms),
        spool_dir,
        keep: std::time::Duration::from_secs(keep_s),
        insecure_registries: section.insecure_registries.clone(),
        credentials: section_credentials("sharing", section.auth.as_deref())?,
    })
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// `[rightsizing]`: sampling, history checkpoints, the model and the instance catalog.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RightsizingSection {
    pub enabled: Option<bool>,
    pub sample_interval_s: Option<u64>,
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_interval_s: Option<u64>,
    /// An instance-type catalog (TOML); the built-in sample catalog without one.
    pub catalog: Option<PathBuf>,
    pub model: Option<crate::core::rightsizing::RightsizingConfig>,
    pub headroom: Option<crate::core::rightsizing::Headroom>,
}

/// The sample catalog shipped with ragent (`deploy/catalog/instance-types.toml`).
pub const BUILTIN_CATALOG: &str = include_str!("../../deploy/catalog/instance-types.toml");
pub const DEFAULT_SAMPLE_INTERVAL_S: u64 = 15;
pub const DEFAULT_CHECKPOINT_DIR: &str = "/var/lib/ragent/rightsizing";
pub const DEFAULT_CHECKPOINT_INTERVAL_S: u64 = 300;

/// Validated `[rightsizing]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RightsizingSettings {
    pub sample_interval: std::time::Duration,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_interval: std::time::Duration,
    pub catalog: crate::core::rightsizing::Catalog,
    /// The catalog file, or "built-in".
    pub catalog_source: String,
    pub model: crate::core::rightsizing::RightsizingConfig,
    pub headroom: crate::core::rightsizing::Headroom,
}

/// Validates `[rightsizing]` with the flags over it; None when it is turned off.
pub fn rightsizing_settings(
    section: &RightsizingSection,
    sample_interval: Option<u64>,
    checkpoint_dir: Option<&Path>,
) -> Result<Option<RightsizingSettings>, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Rightsizing { key, reason };
    if section.enabled == Some(false) {
        return Ok(None);
    }
    let every = sample_interval
        .or(section.sample_interval_s)
        .unwrap_or(DEFAULT_SAMPLE_INTERVAL_S);
    if !(1..=3600).contains(&every) {
        return Err(invalid(
            "sample_interval_s",
            format!("{every} s is out of range: give --sample-interval between 1 and 3600 seconds"),
        ));
    }
    let checkpoint_every = section
        .checkpoint_interval_s
        .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_S);
    if !(1..=86_400).contains(&checkpoint_every) {
        return Err(invalid(
            "checkpoint_interval_s",
            format!("{checkpoint_every} s is out of range (1..=86400)"),
        ));
    }
    let checkpoint_dir = checkpoint_dir
        .map(Path::to_path_buf)
        .or_else(|| section.checkpoint_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHECKPOINT_DIR));
    if checkpoint_dir.as_os_str().is_empty() {
        return Err(ConfigError::Empty {
            what: "rightsizing.checkpoint_dir (--checkpoint-dir)",
        });
    }
    let (text, catalog_source) = match &section.catalog {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| invalid("catalog", format!("cannot read {}: {e}", path.display())))?,
            path.display().to_string(),
        ),
        None => (BUILTIN_CATALOG.to_string(), "built-in".to_string()),
    };
    let catalog = crate::core::rightsizing::Catalog::parse(&text)
        .map_err(|e| invalid("catalog", format!("{catalog_source}: {e}")))?;
    let model = section.model.clone().unwrap_or_default();
    model
        .validate()
        .map_err(|e| invalid("model", e.to_string()))?;
    let headroom = section.headroom.unwrap_or_default();
    let h = &headroom;
    let fraction_ok = h.fraction.is_finite() && (0.0..=10.0).contains(&h.fraction);
    let reserved_ok = h.system_reserved_cpu_cores.is_finite() && h.system_reserved_cpu_cores >= 0.0;
    if !(fraction_ok && reserved_ok) {
        return Err(invalid(
            "headroom",
            "fraction must be in 0..=10 and system_reserved_cpu_cores at least 0".into(),
        ));
    }
    Ok(Some(RightsizingSettings {
        sample_interval: std::time::Duration::from_secs(every),
        checkpoint_dir,
        checkpoint_interval: std::time::Duration::from_secs(checkpoint_every),
        catalog,
        catalog_source,
        model,
        headroom,
    }))
}

/// `[kubernetes]`: the kube adapter (pods of this node, `PrePull` resources, Events).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// Default: on when running in a pod (`KUBERNETES_SERVICE_HOST` is set).
    pub enabled: Option<bool>,
    /// Default: the `NODE_NAME` environment variable (the chart sets it from spec.nodeName).
    pub node_name: Option<String>,
    /// Namespaces where the agent may read the pull secrets `PrePull` resources name.
    #[serde(default)]
    pub pull_secret_namespaces: Vec<String>,
}

/// The kube adapter's settings, when it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    pub node_name: String,
    pub pull_secret_namespaces: Vec<String>,
}

/// Validates `[kubernetes]`; `env` reads the process environment (a parameter for tests).
pub fn kube_settings(
    section: &KubernetesSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<KubeSettings>, ConfigError> {
    let in_cluster = env("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty());
    if !section.enabled.unwrap_or(in_cluster) {
        return Ok(None);
    }
    let node_name = section
        .node_name
        .clone()
        .or_else(|| env("NODE_NAME"))
        .filter(|n| !n.is_empty())
        .ok_or(ConfigError::Kubernetes {
            key: "node_name",
            reason: "unknown: set the NODE_NAME environment variable from the downward API \
                     (fieldRef spec.nodeName; the chart does) or [kubernetes] node_name"
                .into(),
        })?;
    if let Some(bad) = section.pull_secret_namespaces.iter().find(|n| {
        n.is_empty()
            || n.len() > 63
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }) {
        return Err(ConfigError::Kubernetes {
            key: "pull_secret_namespaces",
            reason: format!("{bad:?} is not a namespace name (lowercase letters, digits, '-')"),
        });
    }
    Ok(Some(KubeSettings {
        node_name,
        pull_secret_namespaces: section.pull_secret_namespaces.clone(),
    }))
}

/// `[prepull]`: the images the agent keeps on the node (see docs/config.md).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrepullSection {
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    pub concurrency: Option<u16>,
    /// Bytes per second: an integer or a string with a suffix ("50M", "20Mi").
    pub max_rate: Option<RateValue>,
    pub refresh_interval_s: Option<u64>,
    pub retry_max_s: Option<u64>,
    /// Registry credentials: a docker config.json or a kubernetes.io/dockerconfigjson secret.
    pub auth: Option<PathBuf>,
}

/// `[rebase]`: the run images the agent follows, and how it rebases the images on them (see
/// docs/config.md).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RebaseSection {
    /// Tag references of run images (registry/repository:tag).
    #[serde(default)]
    pub follow: Vec<String>,
    pub mode: Option<RebaseMode>,
    /// Tag mode: the result of `repo:tag` is written as `repo:tag<suffix>`.
    pub tag_suffix: Option<String>,
    pub poll_interval_s: Option<u64>,
    pub retry_max_s: Option<u64>,
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a docker config.json or a kubernetes.io/dockerconfigjson secret.
    pub auth: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebaseMode {
    InPlace,
    Tag,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RateValue {
    Number(u64),
    Text(String),
}

/// Default interval at which the agent re-resolves its pre-pull images (tags move).
pub const DEFAULT_REFRESH_INTERVAL_S: u64 = 300;
/// Default longest delay between retries of a failing pre-pull image.
pub const DEFAULT_RETRY_MAX_S: u64 = 300;
/// First retry delay of a failing pre-pull image (doubles per attempt).
pub const RETRY_MIN: std::time::Duration = std::time::Duration::from_secs(1);
/// Default interval at which the agent resolves the run-image tags it follows.
pub const DEFAULT_POLL_INTERVAL_S: u64 = 300;
/// Default tag suffix of tag mode's results (`repo:tag` -> `repo:tag-patched`).
pub const DEFAULT_TAG_SUFFIX: &str = "-patched";

/// The agent's validated rebase policy (no `follow`: the policy is off).
#[derive(Debug, Clone, PartialEq)]
pub struct RebasePolicy {
    /// Normalized tag references (registry/repository:tag).
    pub follow: Vec<String>,
    pub mode: crate::core::autorebase::Mode,
    pub timing: crate::core::autorebase::Timing,
    pub insecure_registries: Vec<String>,
    /// From `auth` (read once at start); anonymous without it.
    pub credentials: Credentials,
}

/// The agent's validated pre-pull policy (no images: the policy is off).
#[derive(Debug, Clone, PartialEq)]
pub struct PrepullPolicy {
    /// Normalized references (registry/repository:tag or @digest).
    pub images: Vec<String>,
    pub insecure_registries: Vec<String>,
    pub concurrency: usize,
    pub max_rate: Option<u64>,
    pub timing: crate::core::policy::Timing,
    /// From `auth` (read once at start); anonymous without it.
    pub credentials: Credentials,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub metrics_addr: Option<String>,
    pub cgroup_root: Option<PathBuf>,
    pub ebpf: Option<bool>,
    pub refresh_debounce_ms: Option<u64>,
    pub bpffs: Option<PathBuf>,
    pub tracefs: Option<PathBuf>,
    pub series_grace_s: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}(see docs/config.md for the format)")]
    Parse { path: PathBuf, message: String },
    #[error("{what} {value:?} is not a HOST:PORT address ({reason}); e.g. 0.0.0.0:9464")]
    Addr {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("agent.refresh_debounce_ms = {0} is out of range (0..=60000)")]
    Debounce(u64),
    #[error(
        "series grace {0} s is out of range: give --series-grace (agent.series_grace_s) between 1 and 86400 seconds"
    )]
    Grace(u64),
    #[error(
        "{key} has {reference:?}, which is not an image reference ({reason}); write registry/repository:tag or registry/repository@sha256:..."
    )]
    Image {
        key: &'static str,
        reference: String,
        reason: String,
    },
    #[error("prepull.{key} is invalid: {reason}")]
    Prepull { key: &'static str, reason: String },
    #[error("rebase.{key} is invalid: {reason}")]
    Rebase { key: &'static str, reason: String },
    #[error("kubernetes.{key}: {reason}")]
    Kubernetes { key: &'static str, reason: String },
    #[error("rightsizing.{key}: {reason}")]
    Rightsizing { key: &'static str, reason: String },
    #[error("sharing.{key}: {reason}")]
    Sharing { key: &'static str, reason: String },
    #[error("{section}.auth: {source}")]
    Credentials {
        section: &'static str,
        #[source]
        source: CredentialsError,
    },
}

/// Settings shared by every subcommand.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    pub containerd: PathBuf,
    pub namespace: String,
    pub log_format: LogFormat,
}

/// The agent's validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub common: Common,
    pub metrics_addr: SocketAddr,
    pub cgroup_root: Option<PathBuf>,
    pub ebpf: bool,
    pub refresh_debounce_ms: u64,
    pub bpffs: PathBuf,
    pub tracefs: PathBuf,
    pub series_grace: std::time::Duration,
    pub prepull: PrepullPolicy,
    pub rebase: RebasePolicy,
    /// None: the kube adapter does not run.
    pub kube: Option<KubeSettings>,
    /// None: right-sizing is turned off.
    pub rightsizing: Option<RightsizingSettings>,
    pub sharing: SharingSettings,
}

/// Normalizes the references of a list setting (`key` names it in errors).
fn normalize_all(key: &'static str, references: &[String]) -> Result<Vec<String>, ConfigError> {
    references
        .iter()
        .map(|r| {
            crate::adapters::registry::normalize(r).map_err(|e| ConfigError::Image {
                key,
                reference: r.clone(),
                reason: match e {
                    crate::adapters::registry::RegistryError::Reference { reason, .. } => reason,
                    other => other.to_string(),
                },
            })
        })
        .collect()
}

/// A section's `auth` file, read once at start (anonymous without one).
fn section_credentials(
    section: &'static str,
    auth: Option<&Path>,
) -> Result<Credentials, ConfigError> {
    match auth {
        Some(path) => {
            load_credentials(path).map_err(|source| ConfigError::Credentials { section, source })
        }
        None => Ok(Credentials::anonymous()),
    }
}

/// A section's `retry_max_s`, checked to be in 1..=86400; `Err` gives the reason.
fn retry_max(value: Option<u64>) -> Result<u64, String> {
    let v = value.unwrap_or(DEFAULT_RETRY_MAX_S);
    if v == 0 || v > 86_400 {
        return Err(format!("{v} is out of range (1..=86400)"));
    }
    Ok(v)
}

/// Validates `[prepull]`.
pub fn prepull_policy(section: &PrepullSection) -> Result<PrepullPolicy, ConfigError> {
    let images = normalize_all("prepull.images", &section.images)?;
    let concurrency = match section.concurrency {
        None => crate::prepull::DEFAULT_CONCURRENCY,
        Some(n @ 1..=64) => usize::from(n),
        Some(n) => {
            return Err(ConfigError::Prepull {
                key: "concurrency",
                reason: format!("{n} is out of range (1..=64)"),
            });
        }
    };
    let max_rate = match &section.max_rate {
        None => None,
        Some(RateValue::Number(n)) => Some(parse_rate(&n.to_string())),
        Some(RateValue::Text(t)) => Some(parse_rate(t)),
    }
    .transpose()
    .map_err(|reason| ConfigError::Prepull {
        key: "max_rate",
        reason,
    })?;
    let refresh = section
        .refresh_interval_s
        .unwrap_or(DEFAULT_REFRESH_INTERVAL_S);
    let retry_max = retry_max(section.retry_max_s).map_err(|reason| ConfigError::Prepull {
        key: "retry_max_s",
        reason,
    })?;
    let credentials = section_credentials("prepull", section.auth.as_deref())?;
    Ok(PrepullPolicy {
        credentials,
        images,
        insecure_registries: section.insecure_registries.clone(),
        concurrency,
        max_rate,
        timing: crate::core::policy::Timing {
            refresh: (refresh > 0).then(|| std::time::Duration::from_secs(refresh)),
            retry_min: RETRY_MIN.min(std::time::Duration::from_secs(retry_max)),
            retry_max: std::time::Duration::from_secs(retry_max),
        },
    })
}

/// Validates `[rebase]`.
pub fn rebase_policy(section: &RebaseSection) -> Result<RebasePolicy, ConfigError> {
    let invalid = |key, reason| ConfigError::Rebase { key, reason };
    let follow = normalize_all("rebase.follow", &section.follow)?;
    if let Some((given, _)) = section
        .follow
        .iter()
        .zip(&follow)
        .find(|(_, n)| n.contains('@'))
    {
        return Err(invalid(
            "follow",
            format!(
                "{given:?} names a digest, which never moves: follow a tag (registry/repository:tag)"
            ),
        ));
    }
    let mode = match (
        section.mode.unwrap_or(RebaseMode::InPlace),
        &section.tag_suffix,
    ) {
        (RebaseMode::InPlace, None) => crate::core::autorebase::Mode::InPlace,
        (RebaseMode::InPlace, Some(_)) => {
            return Err(invalid(
                "tag_suffix",
                "it is used only with mode = \"tag\"; remove it or set the mode".into(),
            ));
        }
        (RebaseMode::Tag, suffix) => {
            let suffix = suffix.as_deref().unwrap_or(DEFAULT_TAG_SUFFIX);
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
            if suffix.is_empty() || suffix.len() > 64 || !suffix.chars().all(allowed) {
                return Err(invalid(
                    "tag_suffix",
                    format!(
                        "{suffix:?} cannot end a tag: use 1 to 64 of A-Z a-z 0-9 _ . -, e.g. \"{DEFAULT_TAG_SUFFIX}\""
                    ),
                ));
            }
            if suffix == crate::rebase::ROLLBACK_SUFFIX {
                return Err(invalid(
                    "tag_suffix",
                    format!("{suffix:?} is the suffix of in-place rollback records: pick another"),
                ));
            }
            crate::core::autorebase::Mode::Tag {
                suffix: suffix.to_string(),
            }
        }
    };
    let poll = section.poll_interval_s.unwrap_or(DEFAULT_POLL_INTERVAL_S);
    if !(1..=86_400).contains(&poll) {
        return Err(invalid(
            "poll_interval_s",
            format!("{poll} is out of range (1..=86400)"),
        ));
    }
    let retry_max = retry_max(section.retry_max_s).map_err(|r| invalid("retry_max_s", r))?;
    Ok(RebasePolicy {
        follow,
        mode,
        timing: crate::core::autorebase::Timing {
            poll: std::time::Duration::from_secs(poll),
            retry_min: RETRY_MIN.min(std::time::Duration::from_secs(retry_max)),
            retry_max: std::time::Duration::from_secs(retry_max),
        },
        insecure_registries: section.insecure_registries.clone(),
        credentials: section_credentials("rebase", section.auth.as_deref())?,
    })
}

/// Reads and parses a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse_file(path, &text)
}

pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Reads an auth file (`--auth`): a docker config.json or a Kubernetes secret of type
/// `kubernetes.io/dockerconfigjson`; see [`Credentials::parse`] for what is accepted.
pub fn load_credentials(path: &Path) -> Result<Credentials, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.into(),
        source,
    })?;
    Credentials::parse(path, &text)
}

/// Merges flags/env over the file over the defaults.
pub fn common(cli: &Cli, file: &FileConfig) -> Result<Common, ConfigError> {
    let containerd = cli
        .containerd
        .clone()
        .or_else(|| file.containerd.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTAINERD));
    if containerd.as_os_str().is_empty() {
        return Err(ConfigError::Empty {
            what: "--containerd",
        });
    }
    let namespace = cli
        .namespace
        .clone()
        .or_else(|| file.namespace.clone())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    if namespace.is_empty() {
        return Err(ConfigError::Empty {
            what: "--namespace",
        });
    }
    Ok(Common {
        containerd,
        namespace,
        log_format: cli
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    })
}

pub fn agent(cli: &Cli, args: &AgentArgs, file: &FileConfig) -> Result<AgentConfig, ConfigError> {
    let common = common(cli, file)?;
    let addr = args
        .metrics_addr
        .clone()
        .or_else(|| file.agent.metrics_addr.clone())
        .unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_string());
    let metrics_addr = addr.parse::<SocketAddr>().map_err(|e| ConfigError::Addr {
        what: "--metrics-addr",
        value: addr.clone(),
        reason: e.to_string(),
    })?;
    let refresh_debounce_ms = file
        .agent
        .refresh_debounce_ms
        .unwrap_or(DEFAULT_REFRESH_DEBOUNCE_MS);
    if refresh_debounce_ms > 60_000 {
        return Err(ConfigError::Debounce(refresh_debounce_ms));
    }
    let series_grace = args
        .series_grace
        .or(file.agent.series_grace_s)
        .unwrap_or(DEFAULT_SERIES_GRACE_S);
    if !(1..=86_400).contains(&series_grace) {
        return Err(ConfigError::Grace(series_grace));
    }
    Ok(AgentConfig {
        common,
        metrics_addr,
        cgroup_root: args
            .cgroup_root
            .clone()
            .or_else(|| file.agent.cgroup_root.clone()),
        ebpf: !args.no_ebpf && file.agent.ebpf.unwrap_or(true),
        refresh_debounce_ms,
        bpffs: args
            .bpffs
            .clone()
            .or_else(|| file.agent.bpffs.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS)),
        tracefs: args
            .tracefs
            .clone()
            .or_else(|| file.agent.tracefs.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TRACEFS)),
        series_grace: std::time::Duration::from_secs(series_grace),
        prepull: prepull_policy(&file.prepull)?,
        rebase: rebase_policy(&file.rebase)?,
        kube: kube_settings(&file.kubernetes, |k| std::env::var(k).ok())?,
        rightsizing: rightsizing_settings(
            &file.rightsizing,
            args.sample_interval,
            args.checkpoint_dir.as_deref(),
        )?,
        sharing: sharing_settings(&file.sharing, args.peer_addr.as_deref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ragent").chain(args.iter().copied())).unwrap()
    }

    fn agent_args(c: &Cli) -> &AgentArgs {
        match &c.command {
            Command::Agent(a) => a,
            _ => panic!("not agent"),
        }
    }

    #[test]
    fn defaults() {
        let c = cli(&["agent"]);
        let a = agent(&c, agent_args(&c), &FileConfig::default()).unwrap();
        assert_eq!(a.common.containerd, Path::new(DEFAULT_CONTAINERD));
        assert_eq!(a.common.namespace, "k8s.io");
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:9464");
        assert!(a.ebpf);
        assert_eq!(a.cgroup_root, None);
    }

    #[test]
    fn rightsizing_defaults_flags_and_bad_values() {
        let c = cli(&["agent"]);
        let a = agent(&c, agent_args(&c), &FileConfig::default()).unwrap();
        let r = a.rightsizing.expect("on by default");
        assert_eq!(r.sample_interval, std::time::Duration::from_secs(15));
        assert_eq!(r.checkpoint_dir, Path::new(DEFAULT_CHECKPOINT_DIR));
        assert_eq!(r.catalog_source, "built-in");
        assert_eq!(r.catalog.instance_types.len(), 16);

        let file: FileConfig = toml::from_str(
            "[rightsizing]\nsample_interval_s = 30\ncheckpoint_dir = \"/var/x\"\n\
             [rightsizing.model]\nsafety_margin = 0.3\n[rightsizing.headroom]\nfraction = 0.5\n",
        )
        .unwrap();
        let c = cli(&[
            "agent",
            "--sample-interval",
            "1",
            "--checkpoint-dir",
            "/tmp/ck",
        ]);
        let r = agent(&c, agent_args(&c), &file)
            .unwrap()
            .rightsizing
            .unwrap();
        assert_eq!(r.sample_interval, std::time::Duration::from_secs(1));
        assert_eq!(r.checkpoint_dir, Path::new("/tmp/ck"));
        assert_eq!(r.model.safety_margin, 0.3);
        assert_eq!(r.headroom.fraction, 0.5);
        let c = cli(&["agent"]);
        let r = agent(&c, agent_args(&c), &file)
            .unwrap()
            .rightsizing
            .unwrap();
        assert_eq!(r.sample_interval, std::time::Duration::from_secs(30));
        assert_eq!(r.checkpoint_dir, Path::new("/var/x"));

        let off: FileConfig = toml::from_str("[rightsizing]\nenabled = false\n").unwrap();
        assert!(
            agent(&c, agent_args(&c), &off)
                .unwrap()
                .rightsizing
                .is_none()
        );

        for (text, needle) in [
            (
                "[rightsizing]\nsample_interval_s = 0\n",
                "--sample-interval",
            ),
            (
                "[rightsizing]\ncatalog = \"/nonexistent/catalog.toml\"\n",
                "cannot read /nonexistent",
            ),
            (
                "[rightsizing.model]\nsafety_margin = -1.0\n",
                "rightsizing.model",
            ),
            (
                "[rightsizing.headroom]\nfraction = -1.0\n",
                "rightsizing.headroom",
            ),
        ] {
            let file: FileConfig = toml::from_str(text).unwrap();
            let e = agent(&c, agent_args(&c), &file).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        assert!(toml::from_str::<FileConfig>("[rightsizing]\nsample_intervall = 3\n").is_err());
    }

    #[test]
    fn flags_beat_file_beats_default() {
        let file = parse_file(
            Path::new("t.toml"),
            r#"
            containerd = "/file.sock"
            namespace = "filens"
            [agent]
            metrics_addr = "127.0.0.1:1"
            ebpf = false
            "#,
        )
        .unwrap();
        let c = cli(&[
            "--namespace",
            "flagns",
            "agent",
            "--metrics-addr",
            "127.0.0.1:2",
        ]);
        let a = agent(&c, agent_args(&c), &file).unwrap();
        assert_eq!(a.common.containerd, Path::new("/file.sock"));
        assert_eq!(a.common.namespace, "flagns");
        assert_eq!(a.metrics_addr.port(), 2);
        assert!(!a.ebpf);
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let c = cli(&["images", "--json", "--containerd", "/x.sock"]);
        assert_eq!(
            common(&c, &FileConfig::default()).unwrap().containerd,
            Path::new("/x.sock")
        );
    }

    #[test]
    fn unknown_file_keys_are_errors_naming_the_key() {
        let e = parse_file(
            Path::new("/etc/ragent.toml"),
            "[agent]\nmetrics_adr = \"x\"\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/etc/ragent.toml") && msg.contains("metrics_adr"),
            "{msg}"
        );
    }

    #[test]
    fn bad_address_says_what_is_expected() {
        let c = cli(&["agent", "--metrics-addr", "localhost"]);
        let e = agent(&c, agent_args(&c), &FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn bad_flag_is_a_clap_error() {
        assert!(Cli::try_parse_from(["ragent", "agent", "--no-such-flag"]).is_err());
        assert!(Cli::try_parse_from(["ragent", "images", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn rates_take_si_and_binary_suffixes() {
        assert_eq!(parse_rate("25000000"), Ok(25_000_000));
        assert_eq!(parse_rate("25M"), Ok(25_000_000));
        assert_eq!(parse_rate("25MB/s"), Ok(25_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("24Mi"), Ok(24 * 1024 * 1024));
        for bad in ["", "fast", "25X", "10", "-5M", "1.2.3M"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("rate") || e.contains("range"), "{bad}: {e}");
        }
        assert!(Cli::try_parse_from(["ragent", "prepull", "r", "--max-rate", "lots"]).is_err());
    }

    #[test]
    fn the_prepull_policy_is_validated_once() {
        let file = parse_file(
            Path::new("t.toml"),
            r#"
            [prepull]
            images = ["127.0.0.1:5000/ragent/app:v1", "busybox"]
            insecure_registries = ["127.0.0.1:5000"]
            max_rate = "50M"
            refresh_interval_s = 0
            "#,
        )
        .unwrap();
        let p = prepull_policy(&file.prepull).unwrap();
        assert_eq!(
            p.images,
            [
                "127.0.0.1:5000/ragent/app:v1",
                "docker.io/library/busybox:latest"
            ]
        );
        assert_eq!(p.max_rate, Some(50_000_000));
        assert_eq!(p.timing.refresh, None);
        assert_eq!(p.concurrency, crate::prepull::DEFAULT_CONCURRENCY);
        let defaults = prepull_policy(&PrepullSection::default()).unwrap();
        assert!(defaults.images.is_empty());
        assert_eq!(
            defaults.timing.refresh,
            Some(std::time::Duration::from_secs(DEFAULT_REFRESH_INTERVAL_S))
        );
        let numeric = parse_file(Path::new("t"), "[prepull]\nmax_rate = 1048576\n").unwrap();
        assert_eq!(
            prepull_policy(&numeric.prepull).unwrap().max_rate,
            Some(1 << 20)
        );
    }

    #[test]
    fn prepull_takes_an_auth_file() {
        let c = cli(&["prepull", "--auth", "/etc/ragent/config.json", "r/x:1"]);
        match &c.command {
            Command::Prepull(p) => {
                assert_eq!(
                    p.auth.as_deref(),
                    Some(Path::new("/etc/ragent/config.json"))
                )
            }
            _ => panic!("not prepull"),
        }
        let e = load_credentials(Path::new("/nonexistent/ragent-auth.json")).unwrap_err();
        assert_eq!(e.metric_label(), "auth_file_read");
        assert!(
            e.to_string().contains("/nonexistent/ragent-auth.json"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_prepull_policy_names_the_key_and_the_fix() {
        for (text, want) in [
            (
                "[prepull]\nimages = [\"Not A Ref!\"]\n",
                "registry/repository:tag",
            ),
            ("[prepull]\nconcurrency = 0\n", "prepull.concurrency"),
            ("[prepull]\nmax_rate = \"fast\"\n", "prepull.max_rate"),
            ("[prepull]\nretry_max_s = 0\n", "prepull.retry_max_s"),
        ] {
            let file = parse_file(Path::new("t"), text).unwrap();
            let e = prepull_policy(&file.prepull).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(parse_file(Path::new("t"), "[prepull]\nimage = []\n").is_err());
        let file = parse_file(
            Path::new("t"),
            "[prepull]\nauth = \"/nonexistent/ragent-auth.json\"\n",
        )
        .unwrap();
        let e = prepull_policy(&file.prepull).unwrap_err().to_string();
        assert!(
            e.starts_with("prepull.auth: ") && e.contains("/nonexistent/ragent-auth.json"),
            "{e}"
        );
    }

    #[test]
    fn the_rebase_policy_is_validated_once() {
        let file = parse_file(
            Path::new("t.toml"),
            r#"
            [rebase]
            follow = ["127.0.0.1:5000/ragent/run:v1", "ubuntu"]
            mode = "tag"
            poll_interval_s = 1
            retry_max_s = 4
            insecure_registries = ["127.0.0.1:5000"]
            "#,
        )
        .unwrap();
        let p = rebase_policy(&file.rebase).unwrap();
        assert_eq!(
            p.follow,
            [
                "127.0.0.1:5000/ragent/run:v1",
                "docker.io/library/ubuntu:latest"
            ]
        );
        assert_eq!(
            p.mode,
            crate::core::autorebase::Mode::Tag {
                suffix: DEFAULT_TAG_SUFFIX.into()
            }
        );
        assert_eq!(p.timing.poll, std::time::Duration::from_secs(1));
        assert_eq!(p.timing.retry_max, std::time::Duration::from_secs(4));
        let off = rebase_policy(&RebaseSection::default()).unwrap();
        assert!(off.follow.is_empty());
        assert_eq!(off.mode, crate::core::autorebase::Mode::InPlace);
        assert_eq!(
            off.timing.poll,
            std::time::Duration::from_secs(DEFAULT_POLL_INTERVAL_S)
        );
    }

    #[test]
    fn a_bad_rebase_policy_names_the_key_and_the_fix() {
        for (text, want) in [
            ("[rebase]\nfollow = [\"Not A Ref!\"]\n", "rebase.follow has"),
            (
                "[rebase]\nfollow = [\"r.example/run@sha256:0000000000000000000000000000000000000000000000000000000000000000\"]\n",
                "follow a tag",
            ),
            (
                "[rebase]\nmode = \"tag\"\ntag_suffix = \"\"\n",
                "rebase.tag_suffix",
            ),
            (
                "[rebase]\nmode = \"tag\"\ntag_suffix = \"/x\"\n",
                "cannot end a tag",
            ),
            ("[rebase]\ntag_suffix = \"-p\"\n", "mode = \"tag\""),
            ("[rebase]\npoll_interval_s = 0\n", "rebase.poll_interval_s"),
            ("[rebase]\nretry_max_s = 100000\n", "rebase.retry_max_s"),
        ] {
            let file = parse_file(Path::new("t"), text).unwrap();
            let e = rebase_policy(&file.rebase).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(parse_file(Path::new("t"), "[rebase]\nmode = \"inplace\"\n").is_err());
        assert!(parse_file(Path::new("t"), "[rebase]\nfollows = []\n").is_err());
        let file = parse_file(
            Path::new("t"),
            "[rebase]\nauth = \"/nonexistent/ragent-auth.json\"\n",
        )
        .unwrap();
        let e = rebase_policy(&file.rebase).unwrap_err().to_string();
        assert!(e.starts_with("rebase.auth: "), "{e}");
    }

    #[test]
    fn debounce_is_bounded() {
        let file = parse_file(Path::new("t"), "[agent]\nrefresh_debounce_ms = 999999\n").unwrap();
        let c = cli(&["agent"]);
        assert!(matches!(
            agent(&c, agent_args(&c), &file),
            Err(ConfigError::Debounce(_))
        ));
    }

    #[test]
    fn the_kube_side_is_on_in_a_pod_and_needs_its_node_name() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none = KubernetesSection::default();
        assert_eq!(kube_settings(&none, env(&[])).unwrap(), None);
        let in_pod = env(&[
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("NODE_NAME", "node-7"),
        ]);
        let s = kube_settings(&none, in_pod).unwrap().expect("on in a pod");
        assert_eq!(s.node_name, "node-7");
        assert!(s.pull_secret_namespaces.is_empty());
        // Off when asked, even in a pod.
        let off = parse_file(Path::new("t"), "[kubernetes]\nenabled = false\n").unwrap();
        assert_eq!(kube_settings(&off.kubernetes, in_pod).unwrap(), None);
        // On without a node name: an error that says where the name comes from.
        let on = parse_file(Path::new("t"), "[kubernetes]\nenabled = true\n").unwrap();
        let e = kube_settings(&on.kubernetes, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("kubernetes.node_name: ") && e.contains("NODE_NAME"),
            "{e}"
        );
        let bad = parse_file(
            Path::new("t"),
            "[kubernetes]\nnode_name = \"n\"\nenabled = true\npull_secret_namespaces = [\"Team_A\"]\n",
        )
        .unwrap();
        let e = kube_settings(&bad.kubernetes, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"Team_A\" is not a namespace name"), "{e}");
        assert!(parse_file(Path::new("t"), "[kubernetes]\nnodename = \"x\"\n").is_err());
    }

    #[test]
    fn sharing_is_off_by_default_and_validated() {
        let s = sharing_settings(&SharingSection::default(), None).unwrap();
        assert!(!s.enabled);
        assert_eq!(s.peer_addr, "0.0.0.0:9465".parse().unwrap());
        assert_eq!(s.mirror, "http://127.0.0.1:9465");
        assert_eq!(s.certs_dir, PathBuf::from("/etc/containerd/certs.d"));
        assert!(s.registries.is_empty());
        assert!(!s.public.is_public("docker.io", "library/busybox"));

        let file: FileConfig = toml::from_str(
            "[sharing]\nenabled = true\npeer_addr = \"10.0.0.7:9500\"\nregistries = [\"docker.io\", \"ghcr.io\", \"docker.io\"]\ncerts_dir = \"/tmp/c\"\npublic = [\"docker.io/library\"]\n",
        )
        .unwrap();
        let s = sharing_settings(&file.sharing, None).unwrap();
        assert_eq!(
            sharing_settings(&file.sharing, Some("127.0.0.1:9600"))
                .unwrap()
                .mirror,
            "http://127.0.0.1:9600"
        );
        assert!(s.enabled);
        assert_eq!(s.mirror, "http://10.0.0.7:9500");
        assert_eq!(s.registries, vec!["docker.io", "ghcr.io"]);
        assert!(s.public.is_public("docker.io", "library/busybox"));
        let v6 = SharingSection {
            peer_addr: Some("[::]:9465".into()),
            ..Default::default()
        };
        assert_eq!(
            sharing_settings(&v6, None).unwrap().mirror,
            "http://[::1]:9465"
        );

        for (section, want) in [
            (
                SharingSection {
                    registries: vec!["../etc".into()],
                    ..Default::default()
                },
                "sharing.registries",
            ),
            (
                SharingSection {
                    public: vec!["Docker.io/x y".into()],
                    ..Default::default()
                },
                "sharing.public",
            ),
            (
                SharingSection {
                    peer_addr: Some("9465".into()),
                    ..Default::default()
                },
                "--peer-addr (sharing.peer_addr)",
            ),
        ] {
            let e = sharing_settings(&section, None).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(toml::from_str::<FileConfig>("[sharing]\nenable = true\n").is_err());
    }

    #[test]
    fn sharing_peers_token_and_limits() {
        let dir = std::env::temp_dir().join(format!("ragent-cfg-share-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let text = format!(
            "[sharing]\nenabled = true\nnode = \"n1\"\nzone = \"a\"\ntoken_file = \"{}\"\n\
             peer_timeout_ms = 250\nkeep_s = 600\nspool_dir = \"/tmp/spool\"\n\
             insecure_registries = [\"10.0.0.2:5000\"]\n\
             [[sharing.peers]]\nid = \"n1\"\naddr = \"10.0.0.11:9465\"\nzone = \"a\"\n\
             [[sharing.peers]]\nid = \"n2\"\naddr = \"10.0.0.12:9465\"\n",
            token.display()
        );
        let file: FileConfig = toml::from_str(&text).unwrap();
        let s = sharing_settings(&file.sharing, None).unwrap();
        assert_eq!(s.node.as_deref(), Some("n1"));
        assert_eq!(s.zone.as_deref(), Some("a"));
        assert_eq!(s.peers.len(), 2);
        assert_eq!(s.peers[1].addr, "10.0.0.12:9465");
        assert_eq!(s.token.as_ref().unwrap().as_str(), "0123456789abcdef0123");
        assert_eq!(s.peer_timeout, std::time::Duration::from_millis(250));
        assert_eq!(s.keep, std::time::Duration::from_secs(600));
        assert_eq!(s.spool_dir, PathBuf::from("/tmp/spool"));
        assert_eq!(s.insecure_registries, vec!["10.0.0.2:5000"]);
        // Defaults.
        let d = sharing_settings(&SharingSection::default(), None).unwrap();
        assert_eq!(d.peer_timeout, std::time::Duration::from_millis(1000));
        assert_eq!(d.keep, std::time::Duration::from_secs(3600));
        assert_eq!(d.spool_dir, PathBuf::from("/var/lib/ragent/spool"));
        assert!(d.token.is_none() && d.peers.is_empty() && d.service.is_none());

        let peer = |id: &str, addr: &str| PeerEntry {
            id: id.into(),
            addr: addr.into(),
            zone: None,
        };
        let with_token = |f: SharingSection| SharingSection {
            token_file: Some(token.clone()),
            ..f
        };
        for (section, want) in [
            // Peers without a token: agents could not authenticate each other.
            (
                SharingSection {
                    peers: vec![peer("n1", "10.0.0.1:9465")],
                    ..Default::default()
                },
                "token_file",
            ),
            (
                with_token(SharingSection {
                    peers: vec![peer("n1", "10.0.0.1:9465"), peer("n1", "10.0.0.2:9465")],
                    ..Default::default()
                }),
                "listed twice",
            ),
            (
                with_token(SharingSection {
                    peers: vec![peer("n1", "node-1:9465")],
                    ..Default::default()
                }),
                "sharing.peers",
            ),
            (
                with_token(SharingSection {
                    peer_timeout_ms: Some(0),
                    ..Default::default()
                }),
                "sharing.peer_timeout_ms",
            ),
            (
                with_token(SharingSection {
                    keep_s: Some(10),
                    ..Default::default()
                }),
                "sharing.keep_s",
            ),
            (
                with_token(SharingSection {
                    service: Some("Bad_Name".into()),
                    service_namespace: Some("ragent".into()),
                    ..Default::default()
                }),
                "sharing.service",
            ),
            (
                SharingSection {
                    token_file: Some(dir.join("missing")),
                    ..Default::default()
                },
                "sharing.token_file",
            ),
        ] {
            let e = sharing_settings(&section, None).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        std::fs::write(&token, "short").unwrap();
        let e = sharing_settings(
            &SharingSection {
                token_file: Some(token.clone()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("shorter than 16"), "{e}");
        let svc = sharing_settings(
            &SharingSection {
                service: Some("ragent-peers".into()),
                service_namespace: Some("ragent".into()),
                token_file: None,
                ..Default::default()
            },
            None,
        );
        assert!(svc.unwrap_err().to_string().contains("token_file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
