//! `cargo xtask`: setup, the local node (up/down), the test command, fixtures.
//!
//! - `setup`: installs what is missing (Debian packages, rust-src, bpf-linker for LLVM 22, the
//!   Helm chart checks' Python and npm tools) and mounts bpffs/tracefs; idempotent.
//! - `up`: the README's main command: a local node with sample buildpack images and
//!   `ragent agent` in the foreground.
//! - `down`: stops everything `up` (or a failed `test`) started, by PID.
//! - `test`: the README's test command (what .ci/run runs): lints, unit tests, the Helm chart's
//!   checks, then end-to-end tests against a real containerd, registry, kernel and Prometheus.
//! - `chart`: only the Helm chart's checks (the `== Helm chart` step of `test`).
//! - `bench prepull`: ragent's pre-pull against containerd's CRI pulls (docs/bench.md).
//! - `bench ebpf`: what the eBPF programs and the agent cost the node (docs/bench.md).
//! - `bench rebase`: `ragent rebase` of a 20-layer app, and the bytes a node needs for a
//!   patched image: rebuild, registry-side rebase, ragent (docs/bench.md).
//! - `bench cluster`: 1, 3 and 5 nodes (network namespaces, own containerd each) pulling the
//!   same images from a rate-limited registry, without and with ragent's layer sharing.
mod bench;
mod bench_cluster;
mod bench_ebpf;
mod bench_rebase;
mod chart;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ragent_testkit::{
    fixtures::{self, FixtureSet},
    node::{Node, NodeConfig},
    pod,
};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing and mount bpffs/tracefs (idempotent)
    Setup,
    /// Start the local node and run `ragent agent` on it in the foreground
    Up {
        /// Payload multiplier for the sample images
        #[arg(long, default_value_t = 1)]
        scale: u32,
        /// Start the node, build and pull images, but do not run the agent
        #[arg(long)]
        no_agent: bool,
    },
    /// Stop the local node started by `up` (or `--test` for the test node)
    Down {
        #[arg(long)]
        test: bool,
    },
    /// Run every test: unit tests, then end-to-end tests on a real local node
    Test {
        /// Keep the test node running afterwards (for debugging)
        #[arg(long)]
        keep: bool,
        /// Only the unit tests (no root, no services)
        #[arg(long)]
        unit: bool,
        /// Extra arguments for the e2e test binary (e.g. a test name filter)
        #[arg(last = true)]
        e2e_args: Vec<String>,
    },
    /// Only the Helm chart's checks: the `== Helm chart` step of `test` (lint, render,
    /// Kubernetes API schemas, ServiceMonitor, objects, rendered configs read by ragent)
    Chart,
    /// Benchmarks (docs/bench.md)
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Build the sample images into DIR (and push them to REGISTRY with --push)
    Fixtures {
        #[arg(long, default_value = "/tmp/ragent-fixtures")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:5000")]
        registry: String,
        #[arg(long, default_value_t = 1)]
        scale: u32,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Bytes on the wire, wall time, --max-rate, peak RSS and pod start of `ragent prepull`
    /// against containerd's own pulls through CRI, on loopback and a rate-limited link
    Prepull(bench::PrepullArgs),
    /// Loopback throughput with and without ragent's eBPF programs, the agent's CPU and RSS
    /// with many live cgroups, and /metrics scrape time with many cgroups in the maps
    Ebpf(bench_ebpf::EbpfArgs),
    /// Time of `ragent rebase` for a 20-layer app with the run image local (cold and warm),
    /// and the bytes a node needs for the patched image: a rebuild, a registry-side rebase,
    /// and `ragent rebase` (measured)
    Rebase(bench_rebase::RebaseArgs),
    /// N nodes (network namespaces, each its own containerd) pulling the same images at once
    /// from a registry behind a rate-limited link: upstream bytes and times, without and with
    /// one `ragent agent` per node sharing layers
    Cluster(bench_cluster::ClusterArgs),
}

const APT_PACKAGES: &[(&str, &str)] = &[
    // (command or file that shows it is there, package)
    ("/usr/bin/containerd", "containerd"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/bin/docker-registry", "docker-registry"),
    ("/usr/bin/skopeo", "skopeo"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/protoc", "protobuf-compiler"),
    ("/usr/bin/prometheus", "prometheus"),
    ("/usr/bin/promtool", "prometheus"),
    ("/usr/lib/llvm-22/bin/llvm-config", "llvm-22-dev"),
    ("/usr/sbin/bpftool", "bpftool"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/sbin/tc", "iproute2"),
    ("/usr/bin/curl", "curl"),
    ("/usr/bin/jq", "jq"),
    ("/usr/bin/iperf3", "iperf3"),
    // The Helm chart's checks: a venv of Debian's python3, and npm.
    ("/usr/lib/python3.11/ensurepip/__init__.py", "python3-venv"),
    ("/usr/bin/node", "nodejs"),
    ("/usr/bin/npm", "npm"),
];

/// The LLVM major the eBPF toolchain (nightly, or stable with RUSTC_BOOTSTRAP) and bpf-linker share.
const LLVM_MAJOR: &str = "22";
const EBPF_TOOLCHAIN: &str = "nightly";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn setup() -> Result<()> {
    let t0 = Instant::now();
    let mut did = Vec::new();
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        did.push(format!("installed {}", missing.join(" ")));
    }
    let bb = output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "busybox-static"]))?;
    if bb.trim() != fixtures::BUSYBOX_DEB_VERSION {
        println!(
            "setup: warning: busybox-static is {:?}, the sample images pin {}; image digests will differ from the pinned ones",
            bb.trim(),
            fixtures::BUSYBOX_DEB_VERSION
        );
    }
    for tc in [EBPF_TOOLCHAIN, "stable"] {
        let comps = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            tc,
        ]))?;
        if !comps.contains("rust-src") {
            run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", tc]))?;
            did.push(format!("added rust-src to {tc}"));
        }
    }
    // The compiler that builds the eBPF crate must share bpf-linker's LLVM major.
    let vv = output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .arg("-vV"),
    )?;
    let rustc_llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .unwrap_or("")
        .to_string();
    if rustc_llvm != LLVM_MAJOR {
        bail!(
            "the {EBPF_TOOLCHAIN} toolchain uses LLVM {rustc_llvm}, bpf-linker here is built for LLVM {LLVM_MAJOR}: \
             use a toolchain with LLVM {LLVM_MAJOR} (set RAGENT_EBPF_TOOLCHAIN, or stable with RUSTC_BOOTSTRAP=1) \
             or install llvm-{rustc_llvm}-dev and rebuild bpf-linker with --features llvm-{rustc_llvm}"
        );
    }
    let linker_ok = which("bpf-linker").is_some_and(|p| {
        output(Command::new("ldd").arg(p))
            .map(|l| {
                l.contains(&format!("libLLVM.so.{LLVM_MAJOR}"))
                    || l.contains(&format!("libLLVM-{LLVM_MAJOR}"))
            })
            .unwrap_or(false)
    });
    if !linker_ok {
        println!("setup: building bpf-linker for LLVM {LLVM_MAJOR} (about a minute)");
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")))?;
        did.push(format!("installed bpf-linker for LLVM {LLVM_MAJOR}"));
    }
    chart::setup(&root(), &mut did)?;
    for (fs, target) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(target));
        if !mounted {
            std::fs::create_dir_all(target).ok();
            run(Command::new("mount").args(["-t", fs, fs, target]))?;
            did.push(format!("mounted {fs} at {target}"));
        }
    }
    if did.is_empty() {
        did.push("nothing: everything was already there".into());
    }
    println!(
        "setup: {} ({:.1} s)",
        did.join("; "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    std::iter::once(format!("{home}/.cargo/bin"))
        .chain(path.split(':').map(str::to_string))
        .map(|d| Path::new(&d).join(cmd))
        .find(|p| p.exists())
}

fn build_ragent() -> Result<PathBuf> {
    println!("building ragent (with its eBPF programs)");
    run(cargo()
        .current_dir(root())
        .args(["build", "-p", "ragent", "--bin", "ragent"]))?;
    Ok(target_dir().join("debug/ragent"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the repository), else
/// `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root().join(d),
        _ => root().join("target"),
    }
}

/// Starts a node, builds and pushes the fixtures.
fn start_node(config: NodeConfig, scale: u32) -> Result<(Node, FixtureSet)> {
    let t0 = Instant::now();
    let node = Node::up(config)?;
    println!(
        "node: registry {}, containerd {} (cgroup {}), Prometheus {} ({:.1} s)",
        node.registry(),
        node.socket().display(),
        node.containerd_cgroup()
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| "of the caller: no cgroup2 mount".into()),
        node.prometheus_addr(),
        t0.elapsed().as_secs_f64()
    );
    let t1 = Instant::now();
    let mut opts = fixtures::Options::new(&node.registry());
    opts.scale = scale;
    let set = fixtures::build(&node.fixtures_dir(), &opts)?;
    let pushed = node.push(&set)?;
    println!(
        "sample images: {} built and {pushed} pushed ({:.1} s)",
        set.images.len() + set.indexes.len(),
        t1.elapsed().as_secs_f64()
    );
    Ok((node, set))
}

fn up(scale: u32, no_agent: bool) -> Result<()> {
    setup()?;
    let bin = build_ragent()?;
    let demo = NodeConfig::demo();
    let (node, set) = match Node::load(&demo.dir) {
        // A node from an earlier `up` (the agent was stopped with Ctrl-C): use it again.
        Ok(node) if node.is_running() => {
            println!(
                "node: reusing the running node in {} (`cargo xtask down` stops it)",
                demo.dir.display()
            );
            let mut opts = fixtures::Options::new(&node.registry());
            opts.scale = scale;
            let set = fixtures::build(&node.fixtures_dir(), &opts)?;
            node.push(&set)?;
            (node, set)
        }
        _ => match start_node(demo.clone(), scale) {
            Ok(x) => x,
            Err(e) => {
                let _ = Node::down(&demo.dir);
                return Err(e);
            }
        },
    };
    let pulls = [
        "ragent/app-py-web",
        "ragent/app-py-worker",
        "ragent/app-jvm-api",
        "ragent/app-jvm-batch",
        "ragent/app-multi",
    ];
    for repo in pulls {
        node.ctr_pull("k8s.io", &set.reference(repo, "v1"))?;
    }
    println!(
        "pulled into containerd (namespace k8s.io): {}",
        pulls.join(", ")
    );
    let metrics = format!("http://127.0.0.1:{}/metrics", node.config.agent_port);
    println!(
        "\nThe node is up. In another shell:\n\
         \x20 export RAGENT_CONTAINERD={sock} RAGENT_NAMESPACE=k8s.io PATH=\"{bindir}:$PATH\"\n\
         \x20 ragent images                 # the node's images, layer roles, what they share\n\
         \x20 ragent images --json | jq .summary\n\
         \x20 curl -s {metrics} | grep ^ragent_\n\
         \x20 ragent recommend --agent {agent_url}   # request recommendations (samples every 5 s here)\n\
         \x20 ragent recommend --agent {agent_url} --node\n\
         \x20 ragent prepull --insecure-registry {reg} {more} {run2}   # each missing blob once; watch ragent_images change\n\
         \x20 Prometheus: http://{prom}/graph?g0.expr=ragent_node_layer_bytes\n\
         Stop the agent with Ctrl-C; `cargo xtask down` stops the node.\n",
        sock = node.socket().display(),
        bindir = bin
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        reg = node.registry(),
        more = set.reference("ragent/app-py-legacy", "v1"),
        run2 = set.reference("ragent/run", "v2"),
        prom = node.prometheus_addr(),
        agent_url = format!("http://127.0.0.1:{}", node.config.agent_port),
    );
    if no_agent {
        return Ok(());
    }
    let mut agent = Command::new(&bin)
        .arg("agent")
        .arg("--containerd")
        .arg(node.socket())
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", node.config.agent_port))
        // Right-sizing: faster samples for a demo, the history under the node's directory.
        .args(["--sample-interval", "5", "--checkpoint-dir"])
        .arg(node.dir().join("rightsizing"))
        .spawn()?;
    // Ctrl-C reaches the whole foreground group: the agent stops on it, xtask stays to say so.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    // Workloads for the insight metrics, started through CRI as kubelet starts them while the
    // agent watches: a CNB web app, and a pod that fetches from the registry every few seconds.
    // A pull of the patched run image shows per-image pull traffic. They go when the agent stops.
    let rt = tokio::runtime::Runtime::new()?;
    let pods = rt.block_on(demo_workloads(&node, &set));
    let pods = match pods {
        Ok(p) => {
            println!(
                "demo pods running in namespace ragent-demo: {}; pulled {} through CRI\n                   curl -s {metrics} | grep -E '^ragent_(pod|container|image_pull|registry)'",
                p.iter()
                    .map(|p| p.spec().name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                set.reference("ragent/run", "v2"),
            );
            p
        }
        Err(e) => {
            eprintln!("demo pods could not start ({e:#}); the agent runs on without them");
            Vec::new()
        }
    };
    let status = agent.wait()?;
    drop(pods);
    println!("ragent agent exited ({status}); the node keeps running until `cargo xtask down`");
    Ok(())
}

/// The local node's sample workloads (see `up`).
async fn demo_workloads(node: &Node, set: &FixtureSet) -> Result<Vec<pod::Pod>> {
    const NS: &str = "ragent-demo";
    let web = pod::Pod::start(
        node,
        pod::PodSpec::new(NS, "web", &set.reference("ragent/app-py-web", "v1")).container("web"),
    )
    .await?;
    let fetcher = pod::Pod::start(
        node,
        pod::PodSpec::new(NS, "fetcher", &set.reference("ragent/run", "v1"))
            .container("fetch")
            .shell(&format!(
                "while true; do /bin/busybox wget -q -O /dev/null http://{}/v2/_catalog; /bin/busybox sleep 5; done",
                node.registry()
            )),
    )
    .await?;
    let channel = containerd_client::connect(node.socket()).await?;
    let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(channel);
    images
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(k8s_cri::v1::ImageSpec {
                image: set.reference("ragent/run", "v2"),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await?;
    Ok(vec![web, fetcher])
}

fn down(test: bool) -> Result<()> {
    let cfg = if test {
        NodeConfig::test()
    } else {
        NodeConfig::demo()
    };
    let done = Node::down(&cfg.dir)?;
    if done.is_empty() {
        println!("down: nothing was running in {}", cfg.dir.display());
    }
    for d in done {
        println!("down: {d}");
    }
    Ok(())
}

fn test(keep: bool, unit_only: bool, e2e_args: &[String]) -> Result<()> {
    let t0 = Instant::now();
    setup()?;
    println!("== lints (rustfmt, clippy -D warnings)");
    run(cargo()
        .current_dir(root())
        .args(["fmt", "--all", "--", "--check"]))
    .context("formatting differs: run `cargo fmt --all`")?;
    run(cargo().current_dir(root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("== unit tests");
    run(cargo()
        .current_dir(root())
        .args(["test", "--workspace", "--lib", "--bins"])
        .env("RAGENT_STRICT_TESTS", "1"))?;
    println!("== Helm chart (lint, render, Kubernetes API schemas, ServiceMonitor, objects)");
    chart::test(&root())?;
    if unit_only {
        return Ok(());
    }
    let bin = build_ragent()?;
    println!("== end-to-end tests (containerd, registry, kernel, Prometheus)");
    // Build the e2e binary before the node starts, so the node is not idle through a link.
    run(cargo().current_dir(root()).args([
        "test",
        "-p",
        "ragent-testkit",
        "--test",
        "e2e",
        "--no-run",
    ]))?;
    let cfg = NodeConfig::test();
    let _ = Node::down(&cfg.dir);
    let result = start_node(cfg.clone(), 1).and_then(|(node, _)| {
        run(cargo()
            .current_dir(root())
            .args([
                "test",
                "-p",
                "ragent-testkit",
                "--test",
                "e2e",
                "--",
                "--test-threads=1",
            ])
            .args(e2e_args)
            .env("RAGENT_TEST_NODE", node.dir())
            .env("RAGENT_STRICT_TESTS", "1")
            .env("RAGENT_BIN", &bin))
    });
    if keep {
        println!(
            "test node kept at {} (cargo xtask down --test stops it)",
            cfg.dir.display()
        );
    } else {
        for d in Node::down(&cfg.dir)? {
            println!("down: {d}");
        }
    }
    result?;
    println!("all tests passed ({:.0} s)", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The binary a bench measures: `--ragent PATH`, or the debug build (built now).
fn bench_ragent(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) if p.exists() => Ok(p.canonicalize()?),
        Some(p) => bail!("--ragent {}: no such file", p.display()),
        None => build_ragent(),
    }
}

fn bench_prepull(args: &bench::PrepullArgs) -> Result<()> {
    if args.down {
        return bench::prepull(args, Path::new(""));
    }
    setup()?;
    bench::prepull(args, &bench_ragent(args.ragent.as_deref())?)
}

fn bench_ebpf(args: &bench_ebpf::EbpfArgs) -> Result<()> {
    setup()?;
    bench_ebpf::ebpf(args, &bench_ragent(args.ragent.as_deref())?)
}

fn bench_rebase(args: &bench_rebase::RebaseArgs) -> Result<()> {
    if args.down {
        return bench_rebase::rebase(args, Path::new(""));
    }
    setup()?;
    bench_rebase::rebase(args, &bench_ragent(args.ragent.as_deref())?)
}

fn bench_cluster(args: &bench_cluster::ClusterArgs) -> Result<()> {
    setup()?;
    if args.without_ragent_only {
        return bench_cluster::cluster(args, None);
    }
    let bin = bench_ragent(args.ragent.as_deref())?;
    bench_cluster::cluster(args, Some(&bin))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Up { scale, no_agent } => up(scale, no_agent),
        Cmd::Down { test } => down(test),
        Cmd::Test {
            keep,
            unit,
            e2e_args,
        } => test(keep, unit, &e2e_args),
        Cmd::Chart => chart::test(&root()),
        Cmd::Bench {
            what: BenchCmd::Prepull(args),
        } => bench_prepull(&args),
        Cmd::Bench {
            what: BenchCmd::Ebpf(args),
        } => bench_ebpf(&args),
        Cmd::Bench {
            what: BenchCmd::Rebase(args),
        } => bench_rebase(&args),
        Cmd::Bench {
            what: BenchCmd::Cluster(args),
        } => bench_cluster(&args),
        Cmd::Fixtures {
            dir,
            registry,
            scale,
        } => {
            let mut o = fixtures::Options::new(&registry);
            o.scale = scale;
            fixtures::build(&dir, &o).map(|s| {
                println!(
                    "{} images and {} index in {}",
                    s.images.len(),
                    s.indexes.len(),
                    s.layout.display()
                );
            })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
