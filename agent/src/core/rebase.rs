//! Rebase planning: the checks the CNB lifecycle makes before it moves an app image onto a new
//! run image, and the manifest and config the move produces (see ../shared/docs/cnb.md).
//!
//! Everything here works on bytes: the adapter reads the app image and the new run image out of
//! containerd, this module decides whether the rebase is allowed and builds the new manifest and
//! config, byte for byte, so the same inputs always give the same digests.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{
    cnb::{
        self, CnbKind, LABEL_DISTRO_NAME, LABEL_DISTRO_VERSION, LABEL_LIFECYCLE, LABEL_REBASABLE,
        LABEL_STACK_ID, LABEL_STACK_MIXINS,
    },
    oci::{self, ImageConfig, Manifest},
};

/// The `created` time of a rebased config and of its history entries: the lifecycle's
/// normalized timestamp, so rebasing is reproducible.
pub const NORMALIZED_CREATED: &str = "1980-01-01T00:00:01Z";
/// Annotations a manifest may carry about its base image (updated when present).
pub const ANNOTATION_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
pub const ANNOTATION_BASE_NAME: &str = "org.opencontainers.image.base.name";

/// Why a rebase is refused. Each message names the check and both values; the ones the
/// lifecycle lets `-force` override say `--force`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebaseError {
    #[error(
        "{image} is not a CNB app image: it has no {LABEL_LIFECYCLE} label, so ragent cannot tell its run-image layers from its app layers (only images exported by a CNB lifecycle can be rebased)"
    )]
    NotCnb { image: String },
    #[error(
        "{image} is a run image, not an app image: rebase the app images built on it, and name this one with --run-image"
    )]
    IsRunImage { image: String },
    #[error(
        "{image}: label {label} is malformed ({detail}); the image cannot be rebased safely — rebuild it with a CNB lifecycle"
    )]
    MalformedLabel {
        image: String,
        label: &'static str,
        detail: String,
    },
    #[error(
        "{image}: {what} {digest} is not valid JSON of the expected shape ({detail}); the image is corrupt — pull it again"
    )]
    Malformed {
        image: String,
        what: &'static str,
        digest: String,
        detail: String,
    },
    #[error(
        "{image} is not rebasable: its label {LABEL_LIFECYCLE} has no runImage.topLayer, so the run-image layers are unknown"
    )]
    NoTopLayer { image: String },
    #[error(
        "{image} is not rebasable: runImage.topLayer {top_layer} is not among its {layers} layers' diffIDs"
    )]
    TopLayerAbsent {
        image: String,
        top_layer: String,
        layers: usize,
    },
    #[error(
        "{image} is not rebasable: its manifest has {manifest_layers} layers but its config lists {diff_ids} diffIDs"
    )]
    LayerCountMismatch {
        image: String,
        manifest_layers: usize,
        diff_ids: usize,
    },
    #[error(
        "{image} is not rebasable: its layer {index} below runImage.topLayer is {app_layer}, but the old run image {old_run_image} has {run_layer} there"
    )]
    NotOnOldRunImage {
        image: String,
        old_run_image: String,
        index: usize,
        app_layer: String,
        run_layer: String,
    },
    #[error(
        "check io.buildpacks.rebasable: {image} is labelled {LABEL_REBASABLE}=false (the new run image is {run_image}); pass --force to rebase it anyway"
    )]
    NotRebasableLabel { image: String, run_image: String },
    #[error(
        "check os/architecture: the app is {app}, the new run image {run_image} is {run}; pass --force to rebase it anyway"
    )]
    PlatformMismatch {
        run_image: String,
        app: String,
        run: String,
    },
    #[error(
        "check distro: the app's distro is {app}, the new run image {run_image} is {run}; pass --force to rebase it anyway"
    )]
    DistroMismatch {
        run_image: String,
        app: String,
        run: String,
    },
    #[error(
        "check stack id: {which} has no {LABEL_STACK_ID} label (app: {app:?}, new run image {run_image}: {run:?}); platform API {platform_api} images need one on both (--force does not override this)"
    )]
    StackIdMissing {
        which: &'static str,
        run_image: String,
        platform_api: String,
        app: String,
        run: String,
    },
    #[error(
        "check stack id: the app's stack is {app}, the new run image {run_image} is {run}; they must be equal (--force does not override this)"
    )]
    StackIdMismatch {
        run_image: String,
        app: String,
        run: String,
    },
    #[error(
        "check mixins: the new run image {run_image} lacks the app's mixin(s) {}; it has {} (--force does not override this)",
        missing.join(", "), if run.is_empty() { "none".to_string() } else { run.join(", ") }
    )]
    MissingMixins {
        run_image: String,
        missing: Vec<String>,
        run: Vec<String>,
    },
    #[error(
        "check run-image name: {run_image} is in neither the repository of runImage.image ({}) nor one of its mirrors' ({}); pass --force to rebase onto it anyway (it then becomes runImage.image and the mirrors are cleared)",
        image.as_deref().unwrap_or("none"), if mirrors.is_empty() { "none".to_string() } else { mirrors.join(", ") }
    )]
    RunImageNotInMetadata {
        run_image: String,
        image: Option<String>,
        mirrors: Vec<String>,
    },
    #[error(
        "{run_image} is not a run image: it carries {LABEL_LIFECYCLE} (an app image); name a run image with --run-image"
    )]
    NewRunImageIsApp { run_image: String },
    #[error(
        "{run_image} has no layers (or its manifest and config disagree): it cannot be a run image"
    )]
    NewRunImageEmpty { run_image: String },
    #[error(
        "{image} names no run image (no runImage.image, stack.runImage.image or mirrors): say which one with --run-image"
    )]
    NoRunImageName { image: String },
}

impl RebaseError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RebaseError::NotCnb { .. } | RebaseError::IsRunImage { .. } => "not_cnb",
            RebaseError::MalformedLabel { .. } | RebaseError::Malformed { .. } => "malformed",
            RebaseError::NoTopLayer { .. }
            | RebaseError::TopLayerAbsent { .. }
            | RebaseError::LayerCountMismatch { .. }
            | RebaseError::NotOnOldRunImage { .. } => "structure",
            RebaseError::NotRebasableLabel { .. } => "not_rebasable",
            RebaseError::PlatformMismatch { .. } | RebaseError::DistroMismatch { .. } => "target",
            RebaseError::StackIdMissing { .. } | RebaseError::StackIdMismatch { .. } => "stack",
            RebaseError::MissingMixins { .. } => "mixins",
            RebaseError::RunImageNotInMetadata { .. } | RebaseError::NoRunImageName { .. } => {
                "run_image_name"
            }
            RebaseError::NewRunImageIsApp { .. } | RebaseError::NewRunImageEmpty { .. } => {
                "run_image"
            }
        }
    }
}

/// One image as containerd stores it: its manifest and config, byte for byte.
#[derive(Debug, Clone)]
pub struct ImageBytes {
    /// The name the user gave (for messages) or the run image's reference.
    pub name: String,
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
}

/// The parts of an image the planner uses, parsed once.
struct Parsed {
    manifest: Manifest,
    manifest_raw: Value,
    config: ImageConfig,
    config_raw: Value,
}

fn parse(img: &ImageBytes) -> Result<Parsed, RebaseError> {
    let malformed =
        |what: &'static str, digest: &str, e: &dyn std::fmt::Display| RebaseError::Malformed {
            image: img.name.clone(),
            what,
            digest: digest.to_string(),
            detail: e.to_string(),
        };
    let manifest = oci::parse_manifest(&img.manifest_digest, &img.manifest)
        .map_err(|e| malformed("manifest", &img.manifest_digest, &e))?;
    let manifest_raw: Value = serde_json::from_slice(&img.manifest)
        .map_err(|e| malformed("manifest", &img.manifest_digest, &e))?;
    let config = oci::parse_config(&manifest.config.digest, &img.config)
        .map_err(|e| malformed("config", &manifest.config.digest, &e))?;
    let config_raw: Value = serde_json::from_slice(&img.config)
        .map_err(|e| malformed("config", &manifest.config.digest, &e))?;
    if !config_raw.is_object() || !manifest_raw.is_object() {
        return Err(malformed(
            "config",
            &manifest.config.digest,
            &"not a JSON object",
        ));
    }
    Ok(Parsed {
        manifest,
        manifest_raw,
        config,
        config_raw,
    })
}

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Override the checks the lifecycle's `-force` overrides.
    pub force: bool,
    /// The new run image's name as the user (or the metadata) gave it, normalized.
    pub run_image_name: String,
}

/// One layer in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanLayer {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
}

/// A label the rebase changes (`None`: absent on that side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabelChange {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// The outcome of planning: either the app already sits on the new run image, or a new
/// manifest and config.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The app's bottom layers are the new run image's already: nothing to write.
    pub already_current: bool,
    /// The old run image's layers (bottom to top) that the rebase drops.
    pub removed: Vec<PlanLayer>,
    /// The new run image's layers that take their place.
    pub added: Vec<PlanLayer>,
    /// The app's own layers, kept as they are (same blobs).
    pub kept: Vec<PlanLayer>,
    pub labels_changed: Vec<LabelChange>,
    /// Checks that failed but were overridden by `force`.
    pub forced: Vec<String>,
    pub old_run_reference: String,
    pub new_run_reference: String,
    pub new_top_layer: String,
    /// The result: manifest and config bytes and digests.
    pub manifest_media_type: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub config_media_type: String,
    /// The result's layers (bottom to top) and their diffIDs.
    pub layers: Vec<oci::Descriptor>,
    pub diff_ids: Vec<String>,
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    let out = h.finalize();
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in out {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Compares dotted versions numerically ("0.9" < "0.12"); missing parts count as 0.
pub fn version_lt(a: &str, b: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.split('.')
            .map(|p| p.trim().parse::<u64>().unwrap_or(0))
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x < y;
        }
    }
    false
}

/// The registry host of a reference (`docker.io` when it names none).
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// The run image the lifecycle would choose for an app: among `runImage.image` and its mirrors,
/// the first on the app image's own registry, else `runImage.image`, else the first mirror.
pub fn choose_run_image(
    image: Option<&str>,
    mirrors: &[String],
    app_registry: &str,
) -> Option<String> {
    let candidates: Vec<&str> = image
        .into_iter()
        .chain(mirrors.iter().map(String::as_str))
        .filter(|s| !s.is_empty())
        .collect();
    candidates
        .iter()
        .find(|c| registry_of(c) == app_registry)
        .or(candidates.first())
        .map(|s| (*s).to_string())
}

/// A mixin without its `build:`/`run:` stage prefix (the lifecycle strips any `stage:`).
fn strip_stage(m: &str) -> &str {
    m.split_once(':').map_or(m, |(_, rest)| rest)
}

fn lifecycle_label(image: &str, config: &ImageConfig) -> Result<Map<String, Value>, RebaseError> {
    let raw = config
        .labels
        .get(LABEL_LIFECYCLE)
        .ok_or_else(|| RebaseError::NotCnb {
            image: image.into(),
        })?;
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(RebaseError::MalformedLabel {
            image: image.into(),
            label: LABEL_LIFECYCLE,
            detail: "not a JSON object".into(),
        }),
        Err(e) => Err(RebaseError::MalformedLabel {
            image: image.into(),
            label: LABEL_LIFECYCLE,
            detail: e.to_string(),
        }),
    }
}

fn platform_string(c: &ImageConfig) -> String {
    let mut s = format!("{}/{}", c.os, c.architecture);
    if let Some(v) = c.variant.as_deref().filter(|v| !v.is_empty()) {
        s.push('/');
        s.push_str(v);
    }
    s
}

fn distro_string(c: &ImageConfig) -> String {
    match (
        c.labels.get(LABEL_DISTRO_NAME),
        c.labels.get(LABEL_DISTRO_VERSION),
    ) {
        (None, None) => "not set".into(),
        (n, v) => format!(
            "{} {}",
            n.map_or("?", String::as_str),
            v.map_or("?", String::as_str)
        ),
    }
}

fn mixins(image: &str, c: &ImageConfig) -> Result<Vec<String>, RebaseError> {
    match c.labels.get(LABEL_STACK_MIXINS) {
        None => Ok(Vec::new()),
        Some(raw) => {
            serde_json::from_str::<Vec<String>>(raw).map_err(|e| RebaseError::MalformedLabel {
                image: image.into(),
                label: LABEL_STACK_MIXINS,
                detail: e.to_string(),
            })
        }
    }
}

/// The checks that depend on the app's platform API era. Returns the overridden ones.
fn check_compatibility(
    app_name: &str,
    app: &ImageConfig,
    run_name: &str,
    run: &ImageConfig,
    force: bool,
) -> Result<Vec<String>, RebaseError> {
    let api = app
        .env_var(cnb::ENV_PLATFORM_API)
        .unwrap_or_default()
        .to_string();
    let mut forced = Vec::new();
    if api.is_empty() || version_lt(&api, "0.12") {
        let app_stack = app.labels.get(LABEL_STACK_ID).cloned().unwrap_or_default();
        let run_stack = run.labels.get(LABEL_STACK_ID).cloned().unwrap_or_default();
        if app_stack.is_empty() || run_stack.is_empty() {
            return Err(RebaseError::StackIdMissing {
                which: if app_stack.is_empty() {
                    "the app"
                } else {
                    "the new run image"
                },
                run_image: run_name.into(),
                platform_api: if api.is_empty() {
                    "(unset)".into()
                } else {
                    api
                },
                app: app_stack,
                run: run_stack,
            });
        }
        if app_stack != run_stack {
            return Err(RebaseError::StackIdMismatch {
                run_image: run_name.into(),
                app: app_stack,
                run: run_stack,
            });
        }
        let have: Vec<String> = mixins(run_name, run)?;
        let have_stripped: std::collections::BTreeSet<&str> =
            have.iter().map(|m| strip_stage(m)).collect();
        let mut missing: Vec<String> = mixins(app_name, app)?
            .iter()
            .map(|m| strip_stage(m).to_string())
            .filter(|m| !have_stripped.contains(m.as_str()))
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            return Err(RebaseError::MissingMixins {
                run_image: run_name.into(),
                missing,
                run: have,
            });
        }
        return Ok(forced);
    }
    if app.labels.get(LABEL_REBASABLE).map(String::as_str) == Some("false") {
        let e = RebaseError::NotRebasableLabel {
            image: app_name.into(),
            run_image: run_name.into(),
        };
        if !force {
            return Err(e);
        }
        forced.push(e.to_string());
    }
    let variant_ok = match (app.variant.as_deref(), run.variant.as_deref()) {
        (Some(a), Some(r)) if !a.is_empty() && !r.is_empty() => a == r,
        _ => true,
    };
    if app.os != run.os || app.architecture != run.architecture || !variant_ok {
        let e = RebaseError::PlatformMismatch {
            run_image: run_name.into(),
            app: platform_string(app),
            run: platform_string(run),
        };
        if !force {
            return Err(e);
        }
        forced.push(e.to_string());
    }
    let run_name_l = run.labels.get(LABEL_DISTRO_NAME);
    let run_ver_l = run.labels.get(LABEL_DISTRO_VERSION);
    if run_name_l.is_some() || run_ver_l.is_some() {
        let app_name_l = app.labels.get(LABEL_DISTRO_NAME);
        let app_ver_l = app.labels.get(LABEL_DISTRO_VERSION);
        let app_has = app_name_l.is_some() || app_ver_l.is_some();
        let name_ok = run_name_l.is_none_or(|n| n.is_empty() || Some(n) == app_name_l);
        let ver_ok = run_ver_l.is_none_or(|v| v.is_empty() || Some(v) == app_ver_l);
        if !app_has || !name_ok || !ver_ok {
            let e = RebaseError::DistroMismatch {
                run_image: run_name.into(),
                app: distro_string(app),
                run: distro_string(run),
            };
            if !force {
                return Err(e);
            }
            forced.push(e.to_string());
        }
    }
    Ok(forced)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return Vec::new(),
        }
    }
    cur.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The run-image names the metadata allows: `runImage.image` + mirrors, and the older
/// `stack.runImage.image` + mirrors (the lifecycle accepts either).
pub fn allowed_run_images(lifecycle: &Map<String, Value>) -> (Option<String>, Vec<String>) {
    let v = Value::Object(lifecycle.clone());
    let image = str_at(&v, &["runImage", "image"])
        .filter(|s| !s.is_empty())
        .or_else(|| str_at(&v, &["stack", "runImage", "image"]).filter(|s| !s.is_empty()))
        .map(str::to_string);
    let mut mirrors = strings_at(&v, &["runImage", "mirrors"]);
    for m in strings_at(&v, &["stack", "runImage", "mirrors"]) {
        if !mirrors.contains(&m) {
            mirrors.push(m);
        }
    }
    (image, mirrors)
}

/// The app's history split at the run-image boundary: entries that belong to the bottom
/// `below` layers are dropped, the rest kept. An `empty_layer` entry belongs to the layer
/// before it. A history that does not account for every layer is dropped entirely (it would
/// mislabel layers otherwise).
fn app_history_above(history: &[Value], below: usize, layers: usize) -> Vec<Value> {
    let counted = history
        .iter()
        .filter(|h| {
            !h.get("empty_layer")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .count();
    if counted != layers {
        return Vec::new();
    }
    let mut seen = 0usize;
    let mut out = Vec::new();
    for h in history {
        let empty = h
            .get("empty_layer")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !empty {
            seen += 1;
        }
        if seen > below {
            out.push(h.clone());
        }
    }
    out
}

fn normalized_history(entries: impl IntoIterator<Item = Value>) -> Vec<Value> {
    entries
        .into_iter()
        .map(|mut h| {
            if let Some(o) = h.as_object_mut() {
                o.insert("created".into(), Value::String(NORMALIZED_CREATED.into()));
            }
            h
        })
        .collect()
}

fn plan_layers(m: &Manifest, diff_ids: &[String]) -> Vec<PlanLayer> {
    m.layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| PlanLayer {
            digest: l.digest.clone(),
            diff_id: d.clone(),
            size: l.size,
        })
        .collect()
}

/// The form of the new `runImage.reference`: like the old one, a bare digest or
/// `name@digest`.
fn new_reference(old: &str, run_name: &str, digest: &str) -> String {
    if old.contains('@') {
        let repo = run_name
            .split_once('@')
            .map_or(run_name, |(r, _)| r)
            .to_string();
        // Drop a tag: `host:port/repo:tag` -> `host:port/repo`.
        let repo = match repo.rfind(':') {
            Some(i) if !repo[i..].contains('/') => repo[..i].to_string(),
            _ => repo,
        };
        format!("{repo}@{digest}")
    } else {
        digest.to_string()
    }
}

/// What the app's own labels say about its run image, checked for rebasability: everything
/// that can be refused before the new run image is known.
#[derive(Debug, Clone)]
pub struct AppView {
    /// Index of `runImage.topLayer` among the app's diffIDs.
    pub top_index: usize,
    pub top_layer: String,
    /// `runImage.reference`: the run image the app sits on now.
    pub reference: String,
    /// The run-image names the metadata allows (`runImage.image`/`stack.runImage.image`).
    pub run_image: Option<String>,
    pub mirrors: Vec<String>,
}

/// The checks that need only the app: a CNB app image, well-formed labels, a top layer among
/// its layers. `old_run`, when the node has it, must be exactly the app's bottom layers.
pub fn inspect_app(app: &ImageBytes, old_run: Option<&ImageBytes>) -> Result<AppView, RebaseError> {
    let a = parse(app)?;
    inspect_parsed(app, &a, old_run).map(|(v, _)| v)
}

fn inspect_parsed(
    app: &ImageBytes,
    a: &Parsed,
    old_run: Option<&ImageBytes>,
) -> Result<(AppView, Map<String, Value>), RebaseError> {
    let cnb = cnb::parse(&a.config).map_err(|e| RebaseError::MalformedLabel {
        image: app.name.clone(),
        label: match &e {
            cnb::CnbError::MalformedLabel { label, .. } => label,
            cnb::CnbError::MalformedMixins { .. } => LABEL_STACK_MIXINS,
        },
        detail: std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string()),
    })?;
    match cnb.as_ref().map(|c| c.info.kind) {
        None => {
            return Err(RebaseError::NotCnb {
                image: app.name.clone(),
            });
        }
        Some(CnbKind::RunImage) => {
            return Err(RebaseError::IsRunImage {
                image: app.name.clone(),
            });
        }
        Some(CnbKind::App) => {}
    }
    let lifecycle = lifecycle_label(&app.name, &a.config)?;
    let lv = Value::Object(lifecycle.clone());
    let top = str_at(&lv, &["runImage", "topLayer"])
        .unwrap_or_default()
        .to_string();
    let reference = str_at(&lv, &["runImage", "reference"])
        .unwrap_or_default()
        .to_string();
    if top.is_empty() {
        return Err(RebaseError::NoTopLayer {
            image: app.name.clone(),
        });
    }
    if a.manifest.layers.len() != a.config.diff_ids.len() {
        return Err(RebaseError::LayerCountMismatch {
            image: app.name.clone(),
            manifest_layers: a.manifest.layers.len(),
            diff_ids: a.config.diff_ids.len(),
        });
    }
    let Some(top_index) = a.config.diff_ids.iter().position(|d| *d == top) else {
        return Err(RebaseError::TopLayerAbsent {
            image: app.name.clone(),
            top_layer: top,
            layers: a.config.diff_ids.len(),
        });
    };
    if let Some(old) = old_run {
        let o = parse(old)?;
        let below = &a.config.diff_ids[..=top_index];
        if o.config.diff_ids.as_slice() != below {
            let index = below
                .iter()
                .zip(&o.config.diff_ids)
                .position(|(x, y)| x != y)
                .unwrap_or(below.len().min(o.config.diff_ids.len()));
            return Err(RebaseError::NotOnOldRunImage {
                image: app.name.clone(),
                old_run_image: old.name.clone(),
                index,
                app_layer: below.get(index).cloned().unwrap_or_else(|| "(none)".into()),
                run_layer: o
                    .config
                    .diff_ids
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| "(none)".into()),
            });
        }
    }
    let (run_image, mirrors) = allowed_run_images(&lifecycle);
    Ok((
        AppView {
            top_index,
            top_layer: top,
            reference,
            run_image,
            mirrors,
        },
        lifecycle,
    ))
}

/// Plans the rebase of `app` onto `new_run`. `old_run`, when the node has it, lets the
/// structural check compare the app's bottom layers with the old run image's.
/// `same_image(a, b)` says whether a name from the metadata allows the new run image's name
/// (ragent compares repositories, see `rebase::same_repository`).
pub fn plan(
    app: &ImageBytes,
    new_run: &ImageBytes,
    old_run: Option<&ImageBytes>,
    req: &Request,
    same_image: &dyn Fn(&str, &str) -> bool,
) -> Result<Plan, RebaseError> {
    let a = parse(app)?;
    let (view, mut lifecycle) = inspect_parsed(app, &a, old_run)?;
    let top_index = view.top_index;
    let old_reference = view.reference;
    let r = parse(new_run)?;
    if r.config.labels.contains_key(LABEL_LIFECYCLE) {
        return Err(RebaseError::NewRunImageIsApp {
            run_image: req.run_image_name.clone(),
        });
    }
    if r.manifest.layers.is_empty() || r.manifest.layers.len() != r.config.diff_ids.len() {
        return Err(RebaseError::NewRunImageEmpty {
            run_image: req.run_image_name.clone(),
        });
    }
    let mut forced = check_compatibility(
        &app.name,
        &a.config,
        &req.run_image_name,
        &r.config,
        req.force,
    )?;
    // The run-image name check: the lifecycle makes it whatever the app's era (as a platform
    // at API 0.12 or later, which ragent is), looking at both metadata places.
    let (allowed_image, allowed_mirrors) = (view.run_image, view.mirrors);
    let named = allowed_image
        .iter()
        .chain(allowed_mirrors.iter())
        .any(|n| same_image(n, &req.run_image_name));
    let mut rename = false;
    if !named {
        let e = RebaseError::RunImageNotInMetadata {
            run_image: req.run_image_name.clone(),
            image: allowed_image,
            mirrors: allowed_mirrors,
        };
        if !req.force {
            return Err(e);
        }
        forced.push(e.to_string());
        rename = true;
    }

    let new_top = r.config.diff_ids.last().cloned().unwrap_or_default();
    let removed = plan_layers(&a.manifest, &a.config.diff_ids[..=top_index]);
    let added = plan_layers(&r.manifest, &r.config.diff_ids);
    let kept: Vec<PlanLayer> = a
        .manifest
        .layers
        .iter()
        .zip(&a.config.diff_ids)
        .skip(top_index + 1)
        .map(|(l, d)| PlanLayer {
            digest: l.digest.clone(),
            diff_id: d.clone(),
            size: l.size,
        })
        .collect();
    let already_current = a.config.diff_ids[..=top_index] == r.config.diff_ids[..] && !rename;

    // The lifecycle metadata label.
    let new_ref = new_reference(
        &old_reference,
        &req.run_image_name,
        &new_run.manifest_digest,
    );
    {
        let ri = lifecycle
            .entry("runImage")
            .or_insert_with(|| Value::Object(Map::new()));
        if !ri.is_object() {
            *ri = Value::Object(Map::new());
        }
        if let Some(o) = ri.as_object_mut() {
            o.insert("topLayer".into(), Value::String(new_top.clone()));
            o.insert("reference".into(), Value::String(new_ref.clone()));
            if rename {
                o.insert("image".into(), Value::String(req.run_image_name.clone()));
                o.insert("mirrors".into(), Value::Array(Vec::new()));
            }
        }
    }
    if rename {
        lifecycle.insert(
            "stack".into(),
            json!({"runImage": {"image": req.run_image_name, "mirrors": []}}),
        );
    }
    let lifecycle_text =
        serde_json::to_string(&Value::Object(lifecycle)).unwrap_or_else(|_| String::new());

    // Labels: lifecycle metadata, then every stack/base label synced from the new run image.
    let old_labels = &a.config.labels;
    let mut labels: BTreeMap<String, String> = old_labels.clone();
    labels.insert(LABEL_LIFECYCLE.into(), lifecycle_text);
    let synced =
        |k: &str| k.starts_with("io.buildpacks.stack.") || k.starts_with("io.buildpacks.base.");
    labels.retain(|k, _| !synced(k));
    for (k, v) in &r.config.labels {
        if synced(k) {
            labels.insert(k.clone(), v.clone());
        }
    }
    let mut labels_changed = Vec::new();
    let keys: std::collections::BTreeSet<&String> =
        old_labels.keys().chain(labels.keys()).collect();
    for k in keys {
        let (o, n) = (old_labels.get(k), labels.get(k));
        if o != n {
            labels_changed.push(LabelChange {
                key: k.clone(),
                old: o.cloned(),
                new: n.cloned(),
            });
        }
    }

    // The config.
    let mut config = a.config_raw.clone();
    let run_raw = &r.config_raw;
    let history_app: Vec<Value> = a
        .config_raw
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let history_run: Vec<Value> = run_raw
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let above = app_history_above(&history_app, top_index + 1, a.config.diff_ids.len());
    let history = normalized_history(history_run.into_iter().chain(above));
    let diff_ids: Vec<String> = r
        .config
        .diff_ids
        .iter()
        .chain(a.config.diff_ids.iter().skip(top_index + 1))
        .cloned()
        .collect();
    if let Some(o) = config.as_object_mut() {
        for key in ["os", "architecture", "variant", "os.version", "os.features"] {
            match run_raw.get(key) {
                Some(v) if !v.is_null() => {
                    o.insert(key.into(), v.clone());
                }
                _ => {
                    o.remove(key);
                }
            }
        }
        o.insert("created".into(), Value::String(NORMALIZED_CREATED.into()));
        o.insert(
            "rootfs".into(),
            json!({"type": "layers", "diff_ids": diff_ids}),
        );
        if history.is_empty() {
            o.remove("history");
        } else {
            o.insert("history".into(), Value::Array(history));
        }
        let rc = o
            .entry("config")
            .or_insert_with(|| Value::Object(Map::new()));
        if !rc.is_object() {
            *rc = Value::Object(Map::new());
        }
        if let Some(rc) = rc.as_object_mut() {
            rc.insert(
                "Labels".into(),
                Value::Object(
                    labels
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect(),
                ),
            );
        }
    }
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let config_digest = sha256_digest(&config_bytes);

    // The manifest: the app's, with the new config and layers.
    let mut manifest = a.manifest_raw.clone();
    let app_layers_raw: Vec<Value> = a
        .manifest_raw
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let run_layers_raw: Vec<Value> = r
        .manifest_raw
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let layers_raw: Vec<Value> = run_layers_raw
        .into_iter()
        .chain(app_layers_raw.into_iter().skip(top_index + 1))
        .collect();
    let config_media_type = a.manifest.config.media_type.clone();
    if let Some(o) = manifest.as_object_mut() {
        o.insert(
            "config".into(),
            json!({"mediaType": config_media_type, "digest": config_digest, "size": config_bytes.len()}),
        );
        o.insert("layers".into(), Value::Array(layers_raw));
        if let Some(Value::Object(ann)) = o.get_mut("annotations") {
            if ann.contains_key(ANNOTATION_BASE_DIGEST) {
                ann.insert(
                    ANNOTATION_BASE_DIGEST.into(),
                    Value::String(new_run.manifest_digest.clone()),
                );
            }
            if ann.contains_key(ANNOTATION_BASE_NAME) {
                ann.insert(
                    ANNOTATION_BASE_NAME.into(),
                    Value::String(req.run_image_name.clone()),
                );
            }
        }
    }
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
    let manifest_digest = sha256_digest(&manifest_bytes);
    let manifest_media_type = manifest
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(oci::MEDIA_OCI_MANIFEST)
        .to_string();
    let layers: Vec<oci::Descriptor> = r
        .manifest
        .layers
        .iter()
        .chain(a.manifest.layers.iter().skip(top_index + 1))
        .cloned()
        .collect();

    Ok(Plan {
        already_current,
        removed,
        added,
        kept,
        labels_changed,
        forced,
        old_run_reference: old_reference,
        new_run_reference: new_ref,
        new_top_layer: new_top,
        manifest_media_type,
        manifest: manifest_bytes,
        manifest_digest,
        config: config_bytes,
        config_digest,
        config_media_type,
        layers,
        diff_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN_LABELS: &[(&str, &str)] = &[
        ("io.buildpacks.stack.id", "io.example.stack"),
        (
            "io.buildpacks.stack.mixins",
            r#"["tzdata","ca-certs","run:shell"]"#,
        ),
        ("io.buildpacks.base.distro.name", "exlinux"),
        ("io.buildpacks.base.distro.version", "1.0"),
        ("io.buildpacks.base.maintainer", "examples"),
    ];

    fn d(n: &str) -> String {
        format!("sha256:{n:0>64}")
    }

    fn image(name: &str, layers: &[&str], config: Value) -> ImageBytes {
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(&config), "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d(&format!("b{l}")), "size": 100})).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        ImageBytes {
            name: name.into(),
            manifest_digest: sha256_digest(&manifest),
            manifest,
            config,
        }
    }

    fn labels(extra: &[(&str, &str)], base: &[(&str, &str)]) -> Map<String, Value> {
        base.iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
            .collect()
    }

    fn history(n: &[&str]) -> Vec<Value> {
        n.iter()
            .map(|c| json!({"created": "2024-01-01T00:00:00Z", "created_by": c}))
            .collect()
    }

    fn run(name: &str, layers: &[&str], arch: &str, extra: &[(&str, &str)]) -> ImageBytes {
        let mut l = labels(&[], RUN_LABELS);
        for (k, v) in extra {
            l.insert((*k).into(), Value::String((*v).into()));
        }
        image(
            name,
            layers,
            json!({
                "os": "linux", "architecture": arch, "created": "2024-01-01T00:00:00Z",
                "config": {"Labels": l, "Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|x| d(x)).collect::<Vec<_>>()},
                "history": history(&layers.iter().map(|x| format!("run {x}")).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>()),
            }),
        )
    }

    /// An app on `run_layers` with app layers `own`, platform API `api`.
    fn app(
        run_img: &ImageBytes,
        run_layers: &[&str],
        own: &[&str],
        api: &str,
        extra: &[(&str, &str)],
    ) -> ImageBytes {
        let mut l = labels(&[], RUN_LABELS);
        let lifecycle = json!({
            "runImage": {"topLayer": d(run_layers.last().unwrap()), "reference": run_img.manifest_digest, "image": "reg.example/run:v1", "mirrors": ["mirror.example/run:v1"]},
            "stack": {"runImage": {"image": "reg.example/run:v1", "mirrors": ["mirror.example/run:v1"]}},
            "app": [{"sha": d(own.last().unwrap())}],
        });
        l.insert(LABEL_LIFECYCLE.into(), Value::String(lifecycle.to_string()));
        l.insert(
            "io.buildpacks.build.metadata".into(),
            Value::String("{}".into()),
        );
        for (k, v) in extra {
            l.insert((*k).into(), Value::String((*v).into()));
        }
        let all: Vec<&str> = run_layers.iter().chain(own).copied().collect();
        let mut h: Vec<Value> = history(
            &all.iter()
                .map(|x| format!("layer {x}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        // An empty-layer entry between two app layers stays with the app.
        h.insert(
            run_layers.len() + 1,
            json!({"created_by": "ENV X=1", "empty_layer": true}),
        );
        image(
            "reg.example/app:v1",
            &all,
            json!({
                "os": "linux", "architecture": "amd64", "created": "2024-02-02T00:00:00Z",
                "config": {"Labels": l, "Env": ["PATH=/bin", format!("CNB_PLATFORM_API={api}")], "Entrypoint": ["/cnb/process/web"], "User": "1000:1000"},
                "rootfs": {"type": "layers", "diff_ids": all.iter().map(|x| d(x)).collect::<Vec<_>>()},
                "history": h,
            }),
        )
    }

    fn same(a: &str, b: &str) -> bool {
        a == b
    }

    fn req(name: &str, force: bool) -> Request {
        Request {
            force,
            run_image_name: name.into(),
        }
    }

    fn config_of(p: &Plan) -> Value {
        serde_json::from_slice(&p.config).unwrap()
    }

    fn lifecycle_of(c: &Value) -> Value {
        serde_json::from_str(c["config"]["Labels"][LABEL_LIFECYCLE].as_str().unwrap()).unwrap()
    }

    #[test]
    fn rebase_swaps_the_run_layers_and_keeps_the_app_layers() {
        let r1 = run("reg.example/run:v1", &["r1", "r2"], "amd64", &[]);
        let r2 = run(
            "reg.example/run:v2",
            &["r1", "r3"],
            "amd64",
            &[("io.buildpacks.base.released", "2026-11-01")],
        );
        let a = app(&r1, &["r1", "r2"], &["a1", "a2"], "0.12", &[]);
        let p = plan(&a, &r2, Some(&r1), &req("reg.example/run:v1", false), &same).unwrap();
        assert!(!p.already_current && p.forced.is_empty());
        assert_eq!(p.diff_ids, vec![d("r1"), d("r3"), d("a1"), d("a2")]);
        let digests: Vec<&str> = p.layers.iter().map(|l| l.digest.as_str()).collect();
        assert_eq!(digests, vec![d("br1"), d("br3"), d("ba1"), d("ba2")]);
        assert_eq!(
            p.removed
                .iter()
                .map(|l| l.diff_id.clone())
                .collect::<Vec<_>>(),
            vec![d("r1"), d("r2")]
        );
        assert_eq!(p.kept.len(), 2);
        let c = config_of(&p);
        assert_eq!(c["created"], NORMALIZED_CREATED);
        assert_eq!(
            c["rootfs"]["diff_ids"],
            json!([d("r1"), d("r3"), d("a1"), d("a2")])
        );
        // History: the new run image's two entries, then the app's (with its empty-layer entry).
        let created_by: Vec<&str> = c["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["created_by"].as_str().unwrap())
            .collect();
        assert_eq!(
            created_by,
            vec!["run r1", "run r3", "layer a1", "ENV X=1", "layer a2"]
        );
        assert!(
            c["history"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["created"] == NORMALIZED_CREATED)
        );
        // Runtime config untouched; labels synced from the new run image.
        assert_eq!(c["config"]["Entrypoint"], json!(["/cnb/process/web"]));
        assert_eq!(
            c["config"]["Labels"]["io.buildpacks.base.released"],
            "2026-11-01"
        );
        let lc = lifecycle_of(&c);
        assert_eq!(lc["runImage"]["topLayer"], d("r3"));
        assert_eq!(lc["runImage"]["reference"], r2.manifest_digest.as_str());
        assert_eq!(lc["runImage"]["image"], "reg.example/run:v1");
        // The manifest points at the config by its digest and size.
        let m: Value = serde_json::from_slice(&p.manifest).unwrap();
        assert_eq!(m["config"]["digest"], p.config_digest.as_str());
        assert_eq!(m["config"]["size"], p.config.len());
        assert_eq!(sha256_digest(&p.manifest), p.manifest_digest);
        let changed: Vec<&str> = p.labels_changed.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            changed,
            vec!["io.buildpacks.base.released", LABEL_LIFECYCLE]
        );
    }

    #[test]
    fn rebasing_back_gives_the_original_layers_and_labels_and_twice_the_same_digest() {
        let r1 = run("reg.example/run:v1", &["r1", "r2"], "amd64", &[]);
        let r2 = run("reg.example/run:v2", &["r1", "r3"], "amd64", &[]);
        let a = app(&r1, &["r1", "r2"], &["a1"], "0.13", &[]);
        let p = plan(&a, &r2, None, &req("reg.example/run:v1", false), &same).unwrap();
        let again = plan(&a, &r2, None, &req("reg.example/run:v1", false), &same).unwrap();
        assert_eq!(p.manifest_digest, again.manifest_digest);
        let rebased = ImageBytes {
            name: a.name.clone(),
            manifest_digest: p.manifest_digest.clone(),
            manifest: p.manifest.clone(),
            config: p.config.clone(),
        };
        let back = plan(
            &rebased,
            &r1,
            Some(&r2),
            &req("reg.example/run:v1", false),
            &same,
        )
        .unwrap();
        let (orig, back_c) = (oci::parse_config("o", &a.config).unwrap(), config_of(&back));
        assert_eq!(back.diff_ids, orig.diff_ids);
        let back_labels: BTreeMap<String, String> =
            serde_json::from_value(back_c["config"]["Labels"].clone()).unwrap();
        assert_eq!(back_labels, orig.labels);
        // The current one: nothing to do.
        let p2 = plan(
            &rebased,
            &r2,
            None,
            &req("reg.example/run:v1", false),
            &same,
        )
        .unwrap();
        assert!(p2.already_current);
    }

    #[test]
    fn refusals_name_the_check_both_values_and_force_where_it_applies() {
        let r1 = run("reg.example/run:v1", &["r1", "r2"], "amd64", &[]);
        let r2 = run("reg.example/run:v2", &["r1", "r3"], "amd64", &[]);
        let name = "reg.example/run:v1";
        let err = |a: &ImageBytes, r: &ImageBytes, force: bool| {
            plan(a, r, None, &req(name, force), &same).unwrap_err()
        };

        // rebasable=false: refused, forced with a note.
        let nr = app(
            &r1,
            &["r1", "r2"],
            &["a1"],
            "0.12",
            &[(LABEL_REBASABLE, "false")],
        );
        let e = err(&nr, &r2, false);
        assert!(matches!(e, RebaseError::NotRebasableLabel { .. }));
        assert!(e.to_string().contains("--force"), "{e}");
        let p = plan(&nr, &r2, None, &req(name, true), &same).unwrap();
        assert_eq!(p.forced.len(), 1);

        // Architecture.
        let arm = run(name, &["r1", "r3"], "arm64", &[]);
        let a = app(&r1, &["r1", "r2"], &["a1"], "0.12", &[]);
        let e = err(&a, &arm, false);
        assert!(
            e.to_string().contains("linux/amd64")
                && e.to_string().contains("linux/arm64")
                && e.to_string().contains("--force"),
            "{e}"
        );
        assert!(plan(&a, &arm, None, &req(name, true), &same).is_ok());

        // Distro.
        let other = run(
            name,
            &["r1", "r3"],
            "amd64",
            &[("io.buildpacks.base.distro.version", "2.0")],
        );
        let e = err(&a, &other, false);
        assert!(
            e.to_string().contains("exlinux 1.0") && e.to_string().contains("exlinux 2.0"),
            "{e}"
        );

        // Run-image name: refused; forced, it becomes runImage.image and the mirrors go.
        let e = plan(
            &a,
            &r2,
            None,
            &req("elsewhere.example/run:v2", false),
            &same,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("elsewhere.example/run:v2")
                && e.to_string().contains("mirror.example/run:v1"),
            "{e}"
        );
        let p = plan(&a, &r2, None, &req("elsewhere.example/run:v2", true), &same).unwrap();
        let lc = lifecycle_of(&config_of(&p));
        assert_eq!(lc["runImage"]["image"], "elsewhere.example/run:v2");
        assert_eq!(lc["runImage"]["mirrors"], json!([]));
        assert_eq!(lc["stack"]["runImage"]["image"], "elsewhere.example/run:v2");
        // A mirror is as good as the image.
        assert!(plan(&a, &r2, None, &req("mirror.example/run:v1", false), &same).is_ok());

        // Pre-0.12: stack id and mixins, never forced.
        let legacy = app(
            &r1,
            &["r1", "r2"],
            &["a1"],
            "0.10",
            &[("io.buildpacks.stack.mixins", r#"["build:tzdata","shell"]"#)],
        );
        assert!(plan(&legacy, &r2, None, &req(name, false), &same).is_ok());
        let other_stack = run(
            name,
            &["r1", "r3"],
            "amd64",
            &[("io.buildpacks.stack.id", "io.example.other")],
        );
        for force in [false, true] {
            let e = err(&legacy, &other_stack, force);
            assert!(
                e.to_string().contains("io.example.other")
                    && e.to_string().contains("io.example.stack")
                    && !e.to_string().contains("pass --force"),
                "{e}"
            );
        }
        let no_mixin = run(
            name,
            &["r1", "r3"],
            "amd64",
            &[("io.buildpacks.stack.mixins", r#"["ca-certs"]"#)],
        );
        let e = err(&legacy, &no_mixin, true);
        assert_eq!(
            e,
            RebaseError::MissingMixins {
                run_image: name.into(),
                missing: vec!["shell".into(), "tzdata".into()],
                run: vec!["ca-certs".into()]
            }
        );
        let unstacked = app(
            &r1,
            &["r1", "r2"],
            &["a1"],
            "0.9",
            &[("io.buildpacks.stack.id", "")],
        );
        assert!(matches!(
            err(&unstacked, &r2, true),
            RebaseError::StackIdMissing {
                which: "the app",
                ..
            }
        ));

        // Structure.
        let mut bad_top = app(&r1, &["r1", "r2"], &["a1"], "0.12", &[]);
        let mut c: Value = serde_json::from_slice(&bad_top.config).unwrap();
        let lc = json!({"runImage": {"topLayer": d("zz"), "reference": "x"}});
        c["config"]["Labels"][LABEL_LIFECYCLE] = Value::String(lc.to_string());
        bad_top.config = serde_json::to_vec(&c).unwrap();
        assert!(matches!(
            err(&bad_top, &r2, true),
            RebaseError::TopLayerAbsent { .. }
        ));
        let wrong_base = run("reg.example/run:v0", &["r0", "r2"], "amd64", &[]);
        let e = plan(&a, &r2, Some(&wrong_base), &req(name, true), &same).unwrap_err();
        assert!(
            matches!(e, RebaseError::NotOnOldRunImage { index: 0, .. }),
            "{e}"
        );

        // Not CNB, and a run image given as the app.
        let plain = image(
            "reg.example/plain:1",
            &["p"],
            json!({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": [d("p")]}}),
        );
        assert!(matches!(err(&plain, &r2, true), RebaseError::NotCnb { .. }));
        assert!(matches!(
            err(&r1, &r2, true),
            RebaseError::IsRunImage { .. }
        ));
        assert!(matches!(
            err(&a, &a, true),
            RebaseError::NewRunImageIsApp { .. }
        ));

        // A malformed label.
        let mut broken = a.clone();
        let mut c: Value = serde_json::from_slice(&broken.config).unwrap();
        c["config"]["Labels"][LABEL_LIFECYCLE] = Value::String("{\"runImage\": ".into());
        broken.config = serde_json::to_vec(&c).unwrap();
        let e = err(&broken, &r2, true);
        assert!(
            matches!(
                e,
                RebaseError::MalformedLabel {
                    label: LABEL_LIFECYCLE,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_run_image_is_chosen_like_the_lifecycle_does() {
        let mirrors = vec![
            "mirror.example/run:v1".to_string(),
            "localhost:5000/run:v1".to_string(),
        ];
        assert_eq!(
            choose_run_image(Some("reg.example/run:v1"), &mirrors, "mirror.example").as_deref(),
            Some("mirror.example/run:v1")
        );
        assert_eq!(
            choose_run_image(Some("reg.example/run:v1"), &mirrors, "localhost:5000").as_deref(),
            Some("localhost:5000/run:v1")
        );
        assert_eq!(
            choose_run_image(Some("reg.example/run:v1"), &mirrors, "docker.io").as_deref(),
            Some("reg.example/run:v1")
        );
        assert_eq!(
            choose_run_image(None, &mirrors, "docker.io").as_deref(),
            Some("mirror.example/run:v1")
        );
        assert_eq!(choose_run_image(None, &[], "docker.io"), None);
        assert_eq!(registry_of("paketo/run:base"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/r/x:1"), "127.0.0.1:5000");
    }

    #[test]
    fn references_keep_their_form() {
        assert_eq!(
            new_reference("sha256:old", "h:5000/r/run:v2", "sha256:new"),
            "sha256:new"
        );
        assert_eq!(
            new_reference("h/r@sha256:old", "h:5000/r/run:v2", "sha256:new"),
            "h:5000/r/run@sha256:new"
        );
        assert_eq!(
            new_reference("h/r@sha256:old", "h/r/run@sha256:x", "sha256:new"),
            "h/r/run@sha256:new"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_lt("0.9", "0.12"));
        assert!(!version_lt("0.12", "0.12"));
        assert!(!version_lt("0.13", "0.12"));
        assert!(version_lt("0.12", "1.0"));
    }

    #[test]
    fn history_that_does_not_match_the_layers_is_dropped() {
        let h = history(&["a", "b"]);
        assert!(app_history_above(&h, 1, 3).is_empty());
        assert_eq!(app_history_above(&h, 1, 2).len(), 1);
    }
}
