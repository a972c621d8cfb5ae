//! The `ragent` binary: parse, set up logging, run one subcommand.
use std::process::ExitCode;

use clap::Parser;
use ragent::{
    config::{self, Cli, Command, FileConfig, LogFormat},
    images,
};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RAGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Draws the progress frame on stderr every 200 ms, over the previous one.
async fn draw_progress(p: std::sync::Arc<ragent::progress::Progress>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut first = true;
    loop {
        tick.tick().await;
        redraw(&p.frame(), !first);
        first = false;
    }
}

static DRAWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn redraw(lines: &[String], over: bool) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let before = DRAWN.swap(lines.len(), std::sync::atomic::Ordering::SeqCst);
    if over && before > 0 {
        let _ = write!(err, "\x1b[{before}A");
    }
    for l in lines {
        let _ = writeln!(err, "\x1b[2K{l}");
    }
    let _ = err.flush();
}

/// Writes to stdout; a closed pipe (`ragent images | head`) is not an error.
fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// The start of a subcommand that talks to containerd and registries: logging, the
/// credentials (a bad auth file is reported before anything else happens), the connection.
async fn start(
    cli: &Cli,
    auth: Option<&std::path::Path>,
) -> anyhow::Result<(
    ragent::adapters::containerd::Containerd,
    ragent::core::credentials::Credentials,
)> {
    let common = config::common(cli, &FileConfig::default())?;
    init_logging(common.log_format);
    let credentials = match auth {
        Some(path) => config::load_credentials(path)?,
        None => ragent::core::credentials::Credentials::anonymous(),
    };
    let c =
        ragent::adapters::containerd::Containerd::connect(&common.containerd, &common.namespace)
            .await?;
    Ok((c, credentials))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Prepull(args) => {
            let (c, credentials) = start(&cli, args.auth.as_deref()).await?;
            let registry = std::sync::Arc::new(ragent::adapters::registry::Registry::with_timeout(
                &args.insecure_registries,
                credentials,
                args.registry_timeout.map_or(
                    ragent::adapters::registry::DEFAULT_TIMEOUT,
                    std::time::Duration::from_secs,
                ),
            ));
            let opts = ragent::prepull::Options {
                concurrency: args
                    .concurrency
                    .map_or(ragent::prepull::DEFAULT_CONCURRENCY, usize::from),
                max_rate: args.max_rate,
                mesh: None,
            };
            // On a terminal (and not --json), draw the progress on stderr while pulling.
            let progress = (!args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .then(|| std::sync::Arc::new(ragent::progress::Progress::default()));
            let ticker = progress.clone().map(|p| tokio::spawn(draw_progress(p)));
            let report =
                ragent::prepull::run(&c, registry, &args.refs, &opts, progress.as_ref()).await;
            if let (Some(t), Some(p)) = (ticker, &progress) {
                t.abort();
                let _ = t.await;
                if report.is_ok() {
                    redraw(&p.frame(), true);
                }
            }
            let report = report?;
            let text = if args.json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                ragent::prepull::render(&report)
            };
            write_stdout(&text)?;
        }
        Command::Crd => write_stdout(&ragent::crd::crd_yaml())?,
        Command::Recommend(args) => {
            let (report, raw) = ragent::recommend::fetch(&args.agent).await?;
            let text = match (args.json, args.node) {
                (true, false) => serde_json::to_string_pretty(&raw)? + "\n",
                (true, true) => serde_json::to_string_pretty(&raw["node_shape"])? + "\n",
                (false, false) => ragent::core::usage::render_table(&report),
                (false, true) => ragent::core::usage::render_node(&report),
            };
            write_stdout(&text)?;
        }
        Command::Agent(args) => {
            let file = match &args.config {
                Some(p) => config::load_file(p)?,
                None => FileConfig::default(),
            };
            let cfg = config::agent(&cli, args, &file)?;
            init_logging(cfg.common.log_format);
            ragent::agent::run(cfg, shutdown_signal()).await?;
        }
        Command::Rebase(args) => {
            let (c, credentials) = start(&cli, args.auth.as_deref()).await?;
            let outcome = if args.rollback {
                ragent::rebase::rollback(&c, &args.image).await
            } else {
                let registry = std::sync::Arc::new(ragent::adapters::registry::Registry::new(
                    &args.insecure_registries,
                    credentials,
                ));
                let opts = ragent::rebase::Options {
                    run_image: args.run_image.clone(),
                    output: match &args.tag {
                        Some(t) => ragent::rebase::Output::Tag(t.clone()),
                        None => ragent::rebase::Output::InPlace,
                    },
                    dry_run: args.dry_run,
                    force: args.force,
                };
                ragent::rebase::rebase(&c, &registry, &args.image, &opts).await
            };
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) if e.is_refusal() => {
                    eprintln!("ragent: {e}");
                    return Ok(ExitCode::from(ragent::rebase::EXIT_REFUSED));
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(path) = args.report.as_ref().filter(|_| !outcome.dry_run) {
                write_atomically(path, ragent::rebase::report_toml(&outcome).as_bytes()).map_err(
                    |e| {
                        anyhow::anyhow!(
                            "rebased, but the report {} could not be written: {e}",
                            path.display()
                        )
                    },
                )?;
            }
            let text = if args.json {
                serde_json::to_string_pretty(&outcome)? + "\n"
            } else {
                ragent::rebase::render(&outcome)
            };
            write_stdout(&text)?;
        }
        Command::Images(args) => {
            let common = config::common(&cli, &FileConfig::default())?;
            init_logging(common.log_format);
            let inv = images::inventory(&common.containerd, &common.namespace).await?;
            let text = if args.json {
                serde_json::to_string_pretty(&inv)? + "\n"
            } else {
                images::render_table(&inv)
            };
            write_stdout(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a file through a temporary file and a rename: a reader never sees half of it.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("ragent-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ragent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line, no backtrace: every error reads as a sentence that says what to do.
            eprintln!("ragent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
