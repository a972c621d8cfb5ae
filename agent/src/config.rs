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

/// Default containerd socket.
pub const DEFAULT_CONTAINERD: &str = "/run/containerd/containerd.sock";
/// Default containerd namespace (the one kubelet's CRI uses).
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
/// Default address of /metrics, /healthz and /readyz.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";
/// Default delay between an image event and the inventory rebuild it triggers (events come in bursts).
pub const DEFAULT_REFRESH_DEBOUNCE_MS: u64 = 250;

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
    /// Blobs fetched at once [default: 4]
    #[arg(long, env = "RAGENT_CONCURRENCY", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: Option<u16>,
    /// Seconds a registry may stay silent (connecting, or between two reads of an answer)
    /// before the pull fails [default: 30]
    #[arg(long, env = "RAGENT_REGISTRY_TIMEOUT", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub registry_timeout: Option<u64>,
    /// Print one JSON report instead of text
    #[arg(long)]
    pub json: bool,
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
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub metrics_addr: Option<String>,
    pub cgroup_root: Option<PathBuf>,
    pub ebpf: Option<bool>,
    pub refresh_debounce_ms: Option<u64>,
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
    Ok(AgentConfig {
        common,
        metrics_addr,
        cgroup_root: args
            .cgroup_root
            .clone()
            .or_else(|| file.agent.cgroup_root.clone()),
        ebpf: !args.no_ebpf && file.agent.ebpf.unwrap_or(true),
        refresh_debounce_ms,
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
    fn debounce_is_bounded() {
        let file = parse_file(Path::new("t"), "[agent]\nrefresh_debounce_ms = 999999\n").unwrap();
        let c = cli(&["agent"]);
        assert!(matches!(
            agent(&c, agent_args(&c), &file),
            Err(ConfigError::Debounce(_))
        ));
    }
}
