//! The Helm chart (deploy/helm/ragent): the tools its checks need, installed by `cargo xtask
//! setup`, and the `== Helm chart` step of `cargo xtask test`.
//!
//! The tools are pinned in deploy/helm/tests/ (requirements.txt, package-lock.json) and live
//! in ~/.cache/ragent/chart-tools (shared by checkouts, outside the repository): a Python venv
//! with helm-python-sdk (Helm's own template engine and linter) and kubernetes-validate, and
//! the npm packages that check the ServiceMonitor. A pin that changes reinstalls that part.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::run;

const TESTS: &str = "deploy/helm/tests";

/// The Python that builds the venv: Debian's, so a shell's pyenv or PATH does not change it.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub struct Tools {
    python: PathBuf,
    node_modules: PathBuf,
}

fn tools_dir(root: &Path) -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".cache/ragent/chart-tools"),
        _ => root.join("target/chart-tools"),
    }
}

fn tools(root: &Path) -> Tools {
    let dir = tools_dir(root);
    Tools {
        python: dir.join("venv/bin/python"),
        node_modules: dir.join("npm/node_modules"),
    }
}

/// Whether `stamp` holds `want` (what the last install was made from).
fn stamped(stamp: &Path, want: &str) -> bool {
    fs::read_to_string(stamp).is_ok_and(|s| s == want)
}

/// Installs what is missing or pinned differently; quick when everything is there.
pub fn setup(root: &Path, did: &mut Vec<String>) -> Result<()> {
    let dir = tools_dir(root);
    let t = tools(root);
    let tests = root.join(TESTS);

    let requirements = tests.join("requirements.txt");
    let want = fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let venv = dir.join("venv");
    let stamp = venv.join("ragent-requirements.txt");
    if !t.python.exists() || !stamped(&stamp, &want) {
        let t0 = Instant::now();
        println!(
            "setup: installing the chart checks' Python tools into {}",
            venv.display()
        );
        // A fresh venv, so nothing of an older pin stays behind.
        if venv.exists() {
            fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
        }
        run(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&requirements))?;
        fs::write(&stamp, &want)?;
        did.push(format!(
            "installed helm-python-sdk and kubernetes-validate ({:.0} s)",
            t0.elapsed().as_secs_f64()
        ));
    }

    let npm = dir.join("npm");
    let package = fs::read_to_string(tests.join("package.json"))?;
    let lock = fs::read_to_string(tests.join("package-lock.json"))?;
    let want = format!("{package}\n{lock}");
    let stamp = npm.join("ragent-installed.txt");
    if !t.node_modules.exists() || !stamped(&stamp, &want) {
        let t0 = Instant::now();
        println!(
            "setup: installing the chart checks' npm packages into {}",
            npm.display()
        );
        fs::create_dir_all(&npm)?;
        fs::write(npm.join("package.json"), &package)?;
        fs::write(npm.join("package-lock.json"), &lock)?;
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&npm))?;
        fs::write(&stamp, &want)?;
        did.push(format!(
            "installed the npm packages of {TESTS}/package-lock.json ({:.0} s)",
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// `== Helm chart`: the unittest suite in deploy/helm/tests (lint, render, API schemas,
/// ServiceMonitor, assertions on the objects), then every config file it rendered read by
/// ragent's own config parser and validators, and every instance-type catalog it put in a
/// ConfigMap by ragent's catalog parser.
pub fn test(root: &Path) -> Result<()> {
    let t = tools(root);
    if !t.python.exists() || !t.node_modules.exists() {
        bail!(
            "the chart checks' tools are missing ({}, {}): run `cargo xtask setup`",
            t.python.display(),
            t.node_modules.display()
        );
    }
    let out = crate::target_dir().join("helm-check");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    run(Command::new(&t.python)
        .args(["-m", "unittest", "discover", "-s"])
        .arg(root.join(TESTS))
        .current_dir(root)
        .env("RAGENT_CHART_NODE_MODULES", &t.node_modules)
        .env("RAGENT_CHART_OUT", &out)
        .env("PYTHONDONTWRITEBYTECODE", "1"))
    .context("the Helm chart's checks failed (deploy/helm/tests/test_chart.py)")?;

    let mut files: Vec<PathBuf> = fs::read_dir(&out)
        .with_context(|| {
            format!(
                "the chart checks wrote no config files to {}",
                out.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "the chart checks wrote no config files to {}",
            out.display()
        );
    }
    for f in &files {
        check_config(f).with_context(|| {
            format!(
                "the chart renders a config file ragent refuses ({}; values in {TESTS}/values)",
                f.display()
            )
        })?;
    }
    // The instance-type catalogs the chart ships in its ConfigMap (rightsizing.catalog).
    let mut catalogs: Vec<PathBuf> = fs::read_dir(out.join("catalog"))
        .with_context(|| {
            format!(
                "the chart checks wrote no catalog directory in {}",
                out.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    catalogs.sort();
    for f in &catalogs {
        let text = fs::read_to_string(f)?;
        ragent::core::rightsizing::Catalog::parse(&text).with_context(|| {
            format!(
                "the chart ships an instance-type catalog ragent refuses ({}; values in {TESTS}/values)",
                f.display()
            )
        })?;
    }
    println!(
        "chart: {} rendered config files accepted by ragent's config parser, {} catalogs by its catalog parser",
        files.len(),
        catalogs.len()
    );
    Ok(())
}

/// Reads a rendered config.toml as the agent would: the file's keys and types, then each
/// section's validation (auth files are not on this machine, so they are left out; the kube
/// section with the environment the chart gives the pod; the catalog the chart mounts read
/// from where the chart checks wrote it, `catalog/<scenario>.toml` beside the config; likewise
/// the peer token of `[sharing]`, `peer-token/<scenario>.token`).
fn check_config(path: &Path) -> Result<()> {
    use ragent::config;
    let text = fs::read_to_string(path)?;
    let file = config::parse_file(path, &text)?;
    config::prepull_policy(&config::PrepullSection {
        auth: None,
        ..file.prepull
    })?;
    config::rebase_policy(&config::RebaseSection {
        auth: None,
        ..file.rebase
    })?;
    config::kube_settings(&file.kubernetes, |k| match k {
        "KUBERNETES_SERVICE_HOST" => Some("10.0.0.1".into()),
        "NODE_NAME" => Some("node-1".into()),
        _ => None,
    })?;
    let mut rightsizing = file.rightsizing;
    if rightsizing.catalog.is_some() {
        let shipped = beside(path, "catalog", "toml");
        if !shipped.is_file() {
            bail!(
                "the config names a catalog but the chart's ConfigMap has none ({} is missing)",
                shipped.display()
            );
        }
        rightsizing.catalog = Some(shipped);
    }
    config::rightsizing_settings(&rightsizing, None, None)?;
    // [sharing]: the token file is the Secret the chart mounts, written by the chart checks
    // (peer-token/<scenario>.token: the token it generated, or the operator's); the Service's
    // namespace is the pod's (POD_NAMESPACE, from the downward API), which a config file the
    // chart renders never names itself.
    let mut sharing = config::SharingSection {
        auth: None,
        ..file.sharing
    };
    if sharing.token_file.is_some() {
        let shipped = beside(path, "peer-token", "token");
        if !shipped.is_file() {
            bail!(
                "the config names a peer token file but the chart checks wrote none ({} is missing)",
                shipped.display()
            );
        }
        sharing.token_file = Some(shipped);
    }
    if sharing.service.is_some() && sharing.service_namespace.is_none() {
        sharing.service_namespace = Some(CHART_NAMESPACE.into());
    }
    config::sharing_settings(&sharing, None)?;
    Ok(())
}

/// The release namespace the chart checks render into (test_chart.py's NAMESPACE).
const CHART_NAMESPACE: &str = "ragent";

/// `DIR/<scenario>.EXT` beside the rendered config `<scenario>.toml`.
fn beside(config: &Path, dir: &str, ext: &str) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join(dir)
        .join(config.with_extension(ext).file_name().unwrap_or_default())
}
