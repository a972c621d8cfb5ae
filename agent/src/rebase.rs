//! `ragent rebase`: moves a CNB app image onto a new run image inside containerd's store.
//!
//! The decisions (checks, the new manifest and config) are in [`crate::core::rebase`]; this
//! module reads the images out of containerd, gets the new run image onto the node with the
//! pre-pull engine (only its missing layers cross the network; the app's never do), and writes
//! the result.
//!
//! Safety: everything is written under a lease that expires by itself. The config and the
//! manifest (with its gc references) are in the store before any image record names them; with
//! `--in-place`, the rollback record is written before the name moves; the layers are unpacked
//! after the records, still under the lease. A crash at any point leaves every record pointing
//! at complete content, and a rerun computes the same digests and finishes the job (including
//! an unpack that was cut short).
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{TryStreamExt, stream};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        containerd::{Containerd, ContainerdError, ImageRecord},
        containerd_write::SNAPSHOTTER,
        registry::{self, Registry, RegistryError},
    },
    core::{
        oci::{self, Descriptor, Platform, Target},
        rebase::{self as plan, ImageBytes, LabelChange, PlanLayer, RebaseError},
    },
    prepull::{self, PrepullError, Puller, nonce},
};

/// How long the lease of a rebase lives if ragent dies before deleting it.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// The tag suffix of the record that keeps an in-place rebase's previous image.
pub const ROLLBACK_SUFFIX: &str = "-ragent-rollback";
/// Labels ragent puts on the image records it writes.
pub const LABEL_REBASED_FROM: &str = "io.ragent.rebase.from";
pub const LABEL_RUN_IMAGE: &str = "io.ragent.rebase.run-image";
pub const LABEL_ROLLBACK_OF: &str = "io.ragent.rebase.rollback-of";
/// On a rebased image: the manifest digest the chain of local rebases started from (what the
/// registry served). A pre-pull policy treats the image as current while the registry still
/// serves that manifest.
pub const LABEL_UPSTREAM: &str = "io.ragent.rebase.upstream";
const LABEL_CRI: &str = "io.cri-containerd.image";
/// Exit code of a refused rebase (the lifecycle uses 70–79 for rebase errors).
pub const EXIT_REFUSED: u8 = 70;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot rebase {image}: {source}")]
    Refused {
        image: String,
        #[source]
        source: RebaseError,
    },
    #[error(
        "no image {image} in containerd namespace {namespace}: `ragent images` lists the images there (or pass --namespace)"
    )]
    ImageNotFound { image: String, namespace: String },
    #[error(
        "run image {reference} not found: {detail}; check the name, or pull it and pass it with --run-image"
    )]
    RunImageNotFound { reference: String, detail: String },
    #[error(
        "the app's layer {digest} is not in containerd's content store (containerd may discard layers after unpacking): pull {image} again, then rebase; ragent never downloads an app's layers"
    )]
    AppLayerMissing { image: String, digest: String },
    #[error(
        "{image} is named by digest; an in-place rebase would make the name lie: pass --tag NEW_NAME"
    )]
    InPlaceDigest { image: String },
    #[error(
        "no rollback record {record} for {image}: only an image that `ragent rebase --in-place` moved can be rolled back, once"
    )]
    NoRollback { image: String, record: String },
    #[error("{0}")]
    Usage(String),
    #[error(
        "containerd stopped answering during the rebase ({detail}); nothing is lost (no image record points at missing content): run the same command again once containerd is back"
    )]
    ContainerdGone {
        detail: String,
        /// For the metric label.
        label: &'static str,
    },
    #[error(transparent)]
    Containerd(ContainerdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Prepull(#[from] PrepullError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
}

impl From<ContainerdError> for Error {
    fn from(e: ContainerdError) -> Error {
        if e.is_disconnect() {
            let detail = match &e {
                ContainerdError::Rpc { op, status } => format!("{op}: {}", status.message()),
                other => other.to_string(),
            };
            Error::ContainerdGone {
                detail,
                label: e.metric_label(),
            }
        } else {
            Error::Containerd(e)
        }
    }
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Refused { source, .. } => source.metric_label(),
            Error::ImageNotFound { .. } => "image_not_found",
            Error::RunImageNotFound { .. } => "run_image_not_found",
            Error::AppLayerMissing { .. } => "app_layer_missing",
            Error::InPlaceDigest { .. } | Error::Usage(_) => "usage",
            Error::NoRollback { .. } => "no_rollback",
            Error::Containerd(e) => e.metric_label(),
            Error::ContainerdGone { label, .. } => label,
            Error::Registry(e) => e.metric_label(),
            Error::Prepull(e) => e.metric_label(),
            Error::Oci(_) => "malformed",
        }
    }

    /// A refusal (a check failed) rather than a failure of the machinery.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::Refused { .. } | Error::RunImageNotFound { .. } | Error::InPlaceDigest { .. }
        )
    }
}

/// Where the result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A new image record.
    Tag(String),
    /// The image's own name moves to the result; the previous image stays under the rollback
    /// name.
    InPlace,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The new run image; None: chosen from the app's metadata.
    pub run_image: Option<String>,
    pub output: Output,
    pub dry_run: bool,
    pub force: bool,
}

/// What a rebase did (or, with `--dry-run`, would do). `--json` prints this.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub image: String,
    /// The record the result is under.
    pub name: String,
    pub dry_run: bool,
    /// The app sat on the new run image already: nothing was written.
    pub already_current: bool,
    pub old_digest: String,
    pub new_digest: String,
    pub new_config_digest: String,
    pub manifest_size: u64,
    pub old_run_image: String,
    pub new_run_image: String,
    pub new_run_image_digest: String,
    pub layers_replaced: usize,
    pub layers_removed: Vec<PlanLayer>,
    pub layers_added: Vec<PlanLayer>,
    pub layers_kept: Vec<PlanLayer>,
    pub labels_changed: Vec<LabelChange>,
    /// Checks that failed and `--force` overrode.
    pub forced: Vec<String>,
    /// Bytes of the new run image fetched from the registry (to fetch, with `--dry-run`).
    pub bytes_fetched: u64,
    /// The name of the record that keeps the previous image (in-place only).
    pub rollback: Option<String>,
    pub warnings: Vec<String>,
    /// The whole command: reading, checks, fetching the run image, writing, unpacking.
    pub seconds: f64,
    /// Writing the config, the manifest and the records (the image is usable from here on).
    pub write_seconds: f64,
    /// Unpacking the result's layers into snapshots (after the records exist).
    pub unpack_seconds: f64,
    /// Part of `seconds` spent building the registry's HTTP client: a one-off cost of the
    /// process (the agent pays it once, not per rebase).
    pub registry_client_seconds: f64,
}

/// The name of the record that keeps the image an in-place rebase of `name` replaced.
pub fn rollback_name(name: &str) -> String {
    format!("{name}{ROLLBACK_SUFFIX}")
}

fn normalized(reference: &str) -> String {
    registry::normalize(reference).unwrap_or_else(|_| reference.to_string())
}

/// Whether two references name the same image once normalized (`docker.io/library/` etc.).
pub fn same_image(a: &str, b: &str) -> bool {
    normalized(a) == normalized(b)
}

/// Whether two references name the same repository (registry and path; tag and digest
/// ignored). The run-image name check uses this: the lifecycle compares whole tag references,
/// but a patched run image is published under a new tag of the same repository as often as
/// under the same tag (`run:v1` -> `run:v2`), and refusing that without `--force` would make
/// every such rebase a forced one that rewrites `runImage.image` and drops the mirrors.
pub fn same_repository(a: &str, b: &str) -> bool {
    repository_of(&normalized(a)) == repository_of(&normalized(b))
}

/// The digest a `runImage.reference` names (a bare digest or `name@digest`).
fn reference_digest(reference: &str) -> Option<&str> {
    let d = reference.rsplit_once('@').map_or(reference, |(_, d)| d);
    d.starts_with("sha256:").then_some(d)
}

/// An image record's manifest and config for this node's platform.
pub async fn read_image(
    c: &Containerd,
    name: &str,
    target: &Descriptor,
) -> Result<(ImageBytes, Descriptor), Error> {
    let bytes = c.read_blob(&target.digest).await?;
    let (desc, manifest) = match oci::parse_target(&target.media_type, &target.digest, &bytes)? {
        Target::Manifest(_) => (target.clone(), bytes),
        Target::Index(index) => {
            let d = oci::choose_platform(&target.digest, &index, &Platform::this_node())?.clone();
            let b = c.read_blob(&d.digest).await?;
            (d, b)
        }
    };
    let m = oci::parse_manifest(&desc.digest, &manifest)?;
    let config = c.read_blob(&m.config.digest).await?;
    Ok((
        ImageBytes {
            name: name.to_string(),
            manifest_digest: desc.digest.clone(),
            manifest,
            config,
        },
        desc,
    ))
}

/// The record for a name as the user typed it, or normalized.
async fn find_record(c: &Containerd, image: &str) -> Result<Option<ImageRecord>, Error> {
    if let Some(r) = c.get_image(image).await? {
        return Ok(Some(r));
    }
    let n = normalized(image);
    if n != image {
        return Ok(c.get_image(&n).await?);
    }
    Ok(None)
}

/// The record of `image`, or the error that says where to look.
async fn require_record(c: &Containerd, image: &str) -> Result<ImageRecord, Error> {
    find_record(c, image)
        .await?
        .ok_or_else(|| Error::ImageNotFound {
            image: image.into(),
            namespace: c.namespace().into(),
        })
}

/// The new run image: its manifest and config (read, not yet written), and how to get the
/// rest onto the node.
struct RunImage {
    name: String,
    bytes: ImageBytes,
    /// Resolved at the registry (None: the node's own record is used).
    resolved: Option<registry::ResolvedRef>,
    /// Bytes of its blobs the node lacks.
    missing: u64,
    warnings: Vec<String>,
}

/// Looks at the run image `reference` without writing anything: its manifest from the registry
/// (so a moved tag is seen) and its config from the node, or else from the registry, in memory.
/// When the registry does not know the name or cannot be reached, a local record of that name
/// is used, with a warning.
async fn peek_run_image(
    c: &Containerd,
    registry: &Arc<Registry>,
    reference: &str,
) -> Result<RunImage, Error> {
    let name = normalized(reference);
    let resolved = registry.resolve(reference).await;
    debug!(
        reference,
        ok = resolved.is_ok(),
        "run image resolved at the registry"
    );
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            let local = find_record(c, reference).await?;
            return match (e, local) {
                (e, Some(rec)) => {
                    let (bytes, _) = read_image(c, &name, &rec.target).await?;
                    Ok(RunImage {
                        name,
                        bytes,
                        resolved: None,
                        missing: 0,
                        warnings: vec![format!(
                            "the registry could not resolve {reference} ({e}); used the node's own record of it"
                        )],
                    })
                }
                (RegistryError::NotFound { detail, .. }, None) => Err(Error::RunImageNotFound {
                    reference: reference.into(),
                    detail: format!(
                        "the registry does not have it ({detail}) and the node has no image of that name"
                    ),
                }),
                (e, None) => Err(e.into()),
            };
        }
    };
    let mut missing = 0;
    for b in std::iter::once(&resolved.manifest.config).chain(&resolved.manifest.layers) {
        if c.content_size(&b.digest).await?.is_none() {
            missing += b.size;
        }
    }
    let cfg = &resolved.manifest.config;
    let config = match c.read_blob(&cfg.digest).await {
        Ok(b) => b,
        Err(ContainerdError::NotFound { .. }) => registry
            .blob(&resolved.name, &cfg.digest, cfg.size, 0)
            .await?
            .try_fold(Vec::new(), |mut acc, chunk| async move {
                acc.extend_from_slice(&chunk);
                Ok(acc)
            })
            .await
            .map_err(|e| Error::RunImageNotFound {
                reference: reference.into(),
                detail: format!("its config could not be read: {e}"),
            })?,
        Err(e) => return Err(e.into()),
    };
    Ok(RunImage {
        name,
        bytes: ImageBytes {
            name: resolved.name.clone(),
            manifest_digest: resolved.manifest_desc.digest.clone(),
            manifest: resolved.manifest_bytes.clone(),
            config,
        },
        resolved: Some(resolved),
        missing,
        warnings: Vec::new(),
    })
}

/// Gets the run image's missing blobs onto the node with the pre-pull engine (which also
/// unpacks it and writes its record). Returns the bytes fetched.
async fn pull_run_image(
    c: &Containerd,
    registry: &Arc<Registry>,
    run: &RunImage,
) -> Result<u64, Error> {
    let Some(resolved) = &run.resolved else {
        return Ok(0);
    };
    if run.missing == 0 {
        // Every blob is on the node already: nothing to fetch. The rebased manifest refers
        // to the run image's layers itself, so they need no record of their own.
        return Ok(0);
    }
    // The config was read to plan: it goes into the store from memory, so the pull does not
    // fetch it a second time.
    let lease = c
        .create_lease(
            &format!("ragent-rebase-config-{}-{}", std::process::id(), nonce()),
            LEASE_EXPIRY,
        )
        .await?;
    let cfg = &resolved.manifest.config;
    let config_fetched = if c.content_size(&cfg.digest).await?.is_none() {
        cfg.size
    } else {
        0
    };
    let pulled = async {
        put_blob(c, &lease, cfg, &run.bytes.config, HashMap::new()).await?;
        let metrics = crate::metrics::PrepullMetrics::new(&prometheus::Registry::new())
            .map_err(PrepullError::from)?;
        let puller = Puller::new(
            c.clone(),
            registry.clone(),
            &prepull::Options::default(),
            metrics,
        );
        let report = puller
            .pull_resolved(std::slice::from_ref(resolved), None)
            .await?;
        Ok::<u64, Error>(report.total.bytes_fetched)
    }
    .await;
    let dropped = c.delete_lease(&lease, false).await;
    let fetched = pulled?;
    dropped?;
    // The config crossed the network when it was read for the plan.
    Ok(fetched + config_fetched)
}

/// The old run image, when the node has its manifest (for the structural check).
async fn old_run_image(c: &Containerd, reference: &str) -> Option<ImageBytes> {
    let digest = reference_digest(reference)?;
    let target = Descriptor {
        media_type: String::new(),
        digest: digest.to_string(),
        size: 0,
        platform: None,
        annotations: Default::default(),
    };
    let bytes = c.read_blob(digest).await.ok()?;
    let mt = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("mediaType")
        .and_then(|v| v.as_str())
        .unwrap_or(oci::MEDIA_OCI_MANIFEST)
        .to_string();
    let target = Descriptor {
        media_type: mt,
        ..target
    };
    read_image(c, reference, &target).await.ok().map(|(b, _)| b)
}

/// Rebases `image` as `opts` say. With `registry`, a run image the node lacks is fetched;
/// the app's layers never are.
pub async fn rebase(
    c: &Containerd,
    registry: &Arc<Registry>,
    image: &str,
    opts: &Options,
) -> Result<Outcome, Error> {
    rebase_with_names(c, registry, image, opts, &same_repository).await
}

/// Like [`rebase`] (whose run-image name check is [`same_repository`]), with that check's
/// comparison given: `names_match(allowed, new)` says whether the new run image's name counts
/// as `allowed`, a name the app's metadata gives. The agent's automatic rebase lets the tag its
/// policy follows count for the apps it found on that tag's digests; no other check changes,
/// and the metadata keeps its names.
pub async fn rebase_with_names(
    c: &Containerd,
    registry: &Arc<Registry>,
    image: &str,
    opts: &Options,
    names_match: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Result<Outcome, Error> {
    let t0 = Instant::now();
    let init_before = registry.client_init_time();
    let record = require_record(c, image).await?;
    let name = record.name.clone();
    if opts.output == Output::InPlace && name.contains('@') {
        return Err(Error::InPlaceDigest { image: name });
    }
    let (app, _) = read_image(c, &name, &record.target).await?;
    debug!(image = %name, "app image read");
    let refused = |source| Error::Refused {
        image: name.clone(),
        source,
    };
    // The old run image, when the node has it (for the structural check).
    let reference_now = plan::inspect_app(&app, None).map_err(refused)?.reference;
    let old = old_run_image(c, &reference_now).await;
    // Checks that need only the app come before any network traffic.
    let view = plan::inspect_app(&app, old.as_ref()).map_err(refused)?;
    // Which run image: the flag, or what the metadata names (the lifecycle's choice).
    let reference = match &opts.run_image {
        Some(r) => r.clone(),
        None => plan::choose_run_image(
            view.run_image.as_deref(),
            &view.mirrors,
            plan::registry_of(&name),
        )
        .ok_or_else(|| {
            refused(RebaseError::NoRunImageName {
                image: name.clone(),
            })
        })?,
    };
    debug!(image = %name, run_image = %reference, "app checked");
    let run = peek_run_image(c, registry, &reference).await?;
    debug!(run_image = %run.name, missing = run.missing, "run image resolved");
    let p = plan::plan(
        &app,
        &run.bytes,
        old.as_ref(),
        &plan::Request {
            force: opts.force,
            run_image_name: run.name.clone(),
        },
        names_match,
    )
    .map_err(refused)?;
    let out_name = match &opts.output {
        Output::Tag(t) => normalized(t),
        Output::InPlace => name.clone(),
    };
    let mut warnings = run.warnings.clone();
    if matches!(record.target.media_type.as_str(), t if oci::is_index(t)) {
        warnings.push(format!(
            "{name} is a multi-platform index: the result holds only this node's platform ({})",
            Platform::this_node()
        ));
    }
    for f in &p.forced {
        warn!(image = %name, "forced: {f}");
    }
    let mut outcome = Outcome {
        image: name.clone(),
        name: out_name.clone(),
        dry_run: opts.dry_run,
        already_current: p.already_current,
        old_digest: app.manifest_digest.clone(),
        new_digest: if p.already_current {
            app.manifest_digest.clone()
        } else {
            p.manifest_digest.clone()
        },
        new_config_digest: p.config_digest.clone(),
        manifest_size: p.manifest.len() as u64,
        old_run_image: p.old_run_reference.clone(),
        new_run_image: run.name.clone(),
        new_run_image_digest: run.bytes.manifest_digest.clone(),
        layers_replaced: p.removed.len(),
        layers_removed: p.removed.clone(),
        layers_added: p.added.clone(),
        layers_kept: p.kept.clone(),
        labels_changed: p.labels_changed.clone(),
        forced: p.forced.clone(),
        bytes_fetched: run.missing,
        rollback: None,
        warnings,
        seconds: 0.0,
        write_seconds: 0.0,
        unpack_seconds: 0.0,
        registry_client_seconds: 0.0,
    };
    if p.already_current && !opts.dry_run {
        // Nothing to write; a run killed between the record and the unpack left it to this one.
        let config_digest = oci::parse_manifest(&app.manifest_digest, &app.manifest)?
            .config
            .digest;
        let lease = c
            .create_lease(
                &format!("ragent-rebase-{}-{}", std::process::id(), nonce()),
                LEASE_EXPIRY,
            )
            .await?;
        let unpacked = unpack(c, &lease, &p.layers, &p.diff_ids, &config_digest).await;
        let dropped = c.delete_lease(&lease, false).await;
        unpacked?;
        dropped?;
    }
    if p.already_current || opts.dry_run {
        if p.already_current {
            outcome.manifest_size = app.manifest.len() as u64;
            outcome.layers_replaced = 0;
        }
        outcome.seconds = t0.elapsed().as_secs_f64();
        outcome.registry_client_seconds = (registry.client_init_time() - init_before).as_secs_f64();
        return Ok(outcome);
    }
    // The app's layers must be here: they are never downloaded. Checked before the run image
    // is fetched, so a rebase that cannot finish fetches nothing.
    for l in &p.kept {
        if c.content_size(&l.digest).await?.is_none() {
            return Err(Error::AppLayerMissing {
                image: name.clone(),
                digest: l.digest.clone(),
            });
        }
    }
    outcome.bytes_fetched = pull_run_image(c, registry, &run).await?;
    debug!(run_image = %run.name, bytes = outcome.bytes_fetched, "run image on the node");
    let lease = c
        .create_lease(
            &format!("ragent-rebase-{}-{}", std::process::id(), nonce()),
            LEASE_EXPIRY,
        )
        .await?;
    let t_write = Instant::now();
    let written = async {
        let rollback = write(c, &lease, &record, &out_name, &opts.output, &p, &run).await?;
        let recorded = t_write.elapsed().as_secs_f64();
        unpack(c, &lease, &p.layers, &p.diff_ids, &p.config_digest).await?;
        Ok::<_, Error>((rollback, recorded))
    }
    .await;
    let dropped = c.delete_lease(&lease, false).await;
    let (rollback, recorded) = written?;
    dropped?;
    outcome.rollback = rollback;
    outcome.write_seconds = recorded;
    outcome.unpack_seconds = t_write.elapsed().as_secs_f64() - recorded;
    outcome.seconds = t0.elapsed().as_secs_f64();
    outcome.registry_client_seconds = (registry.client_init_time() - init_before).as_secs_f64();
    info!(
        image = %name,
        name = %out_name,
        old = %outcome.old_digest,
        new = %outcome.new_digest,
        run_image = %run.name,
        seconds = outcome.seconds,
        "rebased"
    );
    Ok(outcome)
}

/// Unpacks an image's layers (snapshots that exist are kept) and records the top snapshot on
/// its config, so GC keeps the snapshots as long as the image. Containers start from an
/// unpacked image without waiting; CRI would unpack a missing one itself, at container start.
async fn unpack(
    c: &Containerd,
    lease: &str,
    layers: &[Descriptor],
    diff_ids: &[String],
    config_digest: &str,
) -> Result<(), Error> {
    if let Some(top) = c.unpack(lease, layers, diff_ids).await? {
        c.label_content(
            config_digest,
            HashMap::from([(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top)]),
        )
        .await?;
    }
    Ok(())
}

/// Writes the planned image: config, manifest with gc references, then the records (the
/// caller unpacks afterwards).
async fn write(
    c: &Containerd,
    lease: &str,
    record: &ImageRecord,
    out_name: &str,
    output: &Output,
    p: &plan::Plan,
    run: &RunImage,
) -> Result<Option<String>, Error> {
    let config_desc = Descriptor {
        media_type: p.config_media_type.clone(),
        digest: p.config_digest.clone(),
        size: p.config.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    put_blob(c, lease, &config_desc, &p.config, HashMap::new()).await?;
    let mut gc = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        p.config_digest.clone(),
    )]);
    for (i, l) in p.layers.iter().enumerate() {
        gc.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    let manifest_desc = Descriptor {
        media_type: p.manifest_media_type.clone(),
        digest: p.manifest_digest.clone(),
        size: p.manifest.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    put_blob(c, lease, &manifest_desc, &p.manifest, gc.clone()).await?;
    // If the manifest existed without our labels, label it now: the gc references must hold
    // before a record names it.
    c.label_content(&p.manifest_digest, gc).await?;
    // The lease holds the manifest and the manifest's gc references hold every layer: a layer
    // still there now stays as long as the lease or a record. (One lease entry instead of one
    // per layer: each is a metadata commit with two fsyncs.)
    for l in &p.layers {
        if c.content_size(&l.digest).await?.is_none() {
            return Err(Error::AppLayerMissing {
                image: record.name.clone(),
                digest: l.digest.clone(),
            });
        }
    }

    // The records. The rollback record first: a crash after it leaves the old image under two
    // names, never under none.
    // The registry's manifest this image came from: kept through rebases of rebases.
    let upstream = record
        .labels
        .get(LABEL_UPSTREAM)
        .cloned()
        .unwrap_or_else(|| record.target.digest.clone());
    let mut labels: HashMap<String, String> = record
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("io.ragent.rebase."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut rollback = None;
    if *output == Output::InPlace {
        let rb = rollback_name(&record.name);
        let mut rb_labels = labels.clone();
        rb_labels.insert(LABEL_ROLLBACK_OF.into(), record.name.clone());
        c.put_image(lease, &rb, &record.target, rb_labels).await?;
        rollback = Some(rb);
    }
    labels.insert(
        LABEL_REBASED_FROM.into(),
        format!("{}@{}", record.name, record.target.digest),
    );
    labels.insert(
        LABEL_RUN_IMAGE.into(),
        format!("{}@{}", run.name, run.bytes.manifest_digest),
    );
    labels.insert(LABEL_UPSTREAM.into(), upstream);
    c.put_image(lease, out_name, &manifest_desc, labels.clone())
        .await?;
    // Images that CRI manages get the records a CRI pull makes: repo@digest and the image ID.
    if record.labels.get(LABEL_CRI).map(String::as_str) == Some("managed") {
        let repo = repository_of(out_name);
        let mut cri = BTreeMap::new();
        cri.insert(format!("{repo}@{}", p.manifest_digest), ());
        cri.insert(p.config_digest.clone(), ());
        for alias in cri.keys() {
            c.put_image(lease, alias, &manifest_desc, labels.clone())
                .await?;
        }
    }
    Ok(rollback)
}

/// `host/repo:tag` -> `host/repo` (a port colon is kept).
fn repository_of(name: &str) -> &str {
    let name = name.split_once('@').map_or(name, |(r, _)| r);
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

/// Writes a metadata blob from memory (a blob that is there already is only leased).
async fn put_blob(
    c: &Containerd,
    lease: &str,
    desc: &Descriptor,
    bytes: &[u8],
    labels: HashMap<String, String>,
) -> Result<(), Error> {
    let ingest = format!("ragent-{}", desc.digest);
    c.write_blob(lease, &ingest, desc, labels, |off| {
        let off = usize::try_from(off).unwrap_or(0).min(bytes.len());
        stream::iter([Ok::<_, std::io::Error>(bytes[off..].to_vec())])
    })
    .await?;
    Ok(())
}

/// Moves `image` back to the image an in-place rebase replaced, and drops the rollback record.
pub async fn rollback(c: &Containerd, image: &str) -> Result<Outcome, Error> {
    let t0 = Instant::now();
    let record = require_record(c, image).await?;
    let rb = rollback_name(&record.name);
    let Some(prev) = c.get_image(&rb).await? else {
        return Err(Error::NoRollback {
            image: record.name.clone(),
            record: rb,
        });
    };
    let lease = c
        .create_lease(
            &format!("ragent-rollback-{}-{}", std::process::id(), nonce()),
            LEASE_EXPIRY,
        )
        .await?;
    let labels: HashMap<String, String> = prev
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("io.ragent.rebase."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let moved = c
        .put_image(&lease, &record.name, &prev.target, labels)
        .await;
    let result = match moved {
        Ok(()) => c.delete_image(&rb).await.map_err(Error::from),
        Err(e) => Err(e.into()),
    };
    let dropped = c.delete_lease(&lease, false).await;
    result?;
    dropped?;
    Ok(Outcome {
        image: record.name.clone(),
        name: record.name.clone(),
        dry_run: false,
        already_current: false,
        old_digest: record.target.digest.clone(),
        new_digest: prev.target.digest.clone(),
        new_config_digest: String::new(),
        manifest_size: prev.target.size,
        old_run_image: record
            .labels
            .get(LABEL_RUN_IMAGE)
            .cloned()
            .unwrap_or_default(),
        new_run_image: String::new(),
        new_run_image_digest: String::new(),
        layers_replaced: 0,
        layers_removed: Vec::new(),
        layers_added: Vec::new(),
        layers_kept: Vec::new(),
        labels_changed: Vec::new(),
        forced: Vec::new(),
        bytes_fetched: 0,
        rollback: None,
        warnings: Vec::new(),
        seconds: t0.elapsed().as_secs_f64(),
        write_seconds: 0.0,
        unpack_seconds: 0.0,
        registry_client_seconds: 0.0,
    })
}

fn short(d: &str) -> &str {
    let h = d.strip_prefix("sha256:").unwrap_or(d);
    &h[..h.len().min(12)]
}

/// The text `ragent rebase` prints.
pub fn render(o: &Outcome) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if o.already_current {
        let _ = writeln!(
            s,
            "{} already sits on {} ({}): nothing to do",
            o.image,
            o.new_run_image,
            short(&o.new_run_image_digest)
        );
        return s;
    }
    let verb = if o.dry_run { "would rebase" } else { "rebased" };
    let _ = writeln!(
        s,
        "{verb} {} onto {} ({})",
        o.image,
        o.new_run_image,
        short(&o.new_run_image_digest)
    );
    let _ = writeln!(
        s,
        "  image:    {} -> {}{}",
        short(&o.old_digest),
        short(&o.new_digest),
        if o.name == o.image {
            " (in place)".to_string()
        } else {
            format!(" as {}", o.name)
        }
    );
    let _ = writeln!(
        s,
        "  run image: {} -> {}",
        o.old_run_image, o.new_run_image_digest
    );
    for l in &o.layers_removed {
        let _ = writeln!(
            s,
            "  - {} {:>10}  (old run image)",
            short(&l.digest),
            crate::images::human_bytes(l.size)
        );
    }
    for l in &o.layers_added {
        let _ = writeln!(
            s,
            "  + {} {:>10}  (new run image)",
            short(&l.digest),
            crate::images::human_bytes(l.size)
        );
    }
    let kept: u64 = o.layers_kept.iter().map(|l| l.size).sum();
    let _ = writeln!(
        s,
        "  = {} app layers kept ({}, never downloaded)",
        o.layers_kept.len(),
        crate::images::human_bytes(kept)
    );
    for c in &o.labels_changed {
        let _ = writeln!(
            s,
            "  label {}: {}",
            c.key,
            match (&c.old, &c.new) {
                (None, _) => "added".to_string(),
                (_, None) => "removed".to_string(),
                _ => "changed".to_string(),
            }
        );
    }
    let _ = writeln!(
        s,
        "  {} {} from the registry",
        if o.dry_run { "to fetch:" } else { "fetched:" },
        crate::images::human_bytes(o.bytes_fetched)
    );
    if let Some(rb) = &o.rollback {
        let _ = writeln!(
            s,
            "  previous image kept as {rb} (`ragent rebase --rollback {}` restores it)",
            o.image
        );
    }
    for f in &o.forced {
        let _ = writeln!(s, "  forced: {f}");
    }
    for w in &o.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    if !o.dry_run {
        let _ = writeln!(
            s,
            "  {:.3} s (writing {:.3} s, unpacking {:.3} s)",
            o.seconds, o.write_seconds, o.unpack_seconds
        );
    }
    s
}

/// The report `--report FILE` writes, shaped like the lifecycle's report.toml.
pub fn report_toml(o: &Outcome) -> String {
    #[derive(Serialize)]
    struct Report<'a> {
        image: ReportImage<'a>,
    }
    #[derive(Serialize)]
    struct ReportImage<'a> {
        tags: Vec<&'a str>,
        #[serde(rename = "image-id")]
        image_id: &'a str,
        digest: &'a str,
        #[serde(rename = "manifest-size")]
        manifest_size: u64,
    }
    toml::to_string(&Report {
        image: ReportImage {
            tags: vec![o.name.as_str()],
            image_id: &o.new_config_digest,
            digest: &o.new_digest,
            manifest_size: o.manifest_size,
        },
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_predictably() {
        assert_eq!(
            rollback_name("127.0.0.1:5000/ragent/app:v1"),
            "127.0.0.1:5000/ragent/app:v1-ragent-rollback"
        );
        assert_eq!(
            repository_of("127.0.0.1:5000/ragent/app:v1"),
            "127.0.0.1:5000/ragent/app"
        );
        assert_eq!(repository_of("h:5000/r@sha256:ab"), "h:5000/r");
        assert_eq!(repository_of("h:5000/r"), "h:5000/r");
        assert_eq!(reference_digest("h/r@sha256:ab"), Some("sha256:ab"));
        assert_eq!(reference_digest("sha256:ab"), Some("sha256:ab"));
        assert_eq!(reference_digest("h/r:v1"), None);
        assert!(same_image("ubuntu", "docker.io/library/ubuntu:latest"));
        assert!(!same_image("h:5000/run:v1", "h:5000/run:v2"));
        assert!(same_repository("h:5000/run:v1", "h:5000/run:v2"));
        assert!(same_repository("h:5000/run:v1", "h:5000/run@sha256:ab"));
        assert!(!same_repository("h:5000/run:v1", "h:5000/run-mirror:v1"));
        assert!(same_repository("ubuntu:22.04", "docker.io/library/ubuntu"));
    }

    fn outcome() -> Outcome {
        Outcome {
            image: "h/app:v1".into(),
            name: "h/app:v1".into(),
            dry_run: false,
            already_current: false,
            old_digest: format!("sha256:{}", "a".repeat(64)),
            new_digest: format!("sha256:{}", "b".repeat(64)),
            new_config_digest: format!("sha256:{}", "c".repeat(64)),
            manifest_size: 1234,
            old_run_image: "sha256:old".into(),
            new_run_image: "h/run:v2".into(),
            new_run_image_digest: format!("sha256:{}", "d".repeat(64)),
            layers_replaced: 1,
            layers_removed: vec![PlanLayer {
                digest: format!("sha256:{}", "e".repeat(64)),
                diff_id: "sha256:x".into(),
                size: 2048,
            }],
            layers_added: vec![],
            layers_kept: vec![],
            labels_changed: vec![],
            forced: vec![],
            bytes_fetched: 4096,
            rollback: Some(rollback_name("h/app:v1")),
            warnings: vec![],
            seconds: 0.5,
            write_seconds: 0.1,
            unpack_seconds: 0.2,
            registry_client_seconds: 0.05,
        }
    }

    #[test]
    fn the_report_has_the_lifecycle_report_shape() {
        let r: toml::Value = toml::from_str(&report_toml(&outcome())).unwrap();
        assert_eq!(r["image"]["tags"][0].as_str(), Some("h/app:v1"));
        assert_eq!(
            r["image"]["digest"].as_str(),
            Some(outcome().new_digest.as_str())
        );
        assert_eq!(r["image"]["manifest-size"].as_integer(), Some(1234));
        assert!(r["image"]["image-id"].as_str().unwrap().ends_with("ccc"));
    }

    #[test]
    fn the_text_says_what_happened_and_how_to_undo_it() {
        let t = render(&outcome());
        assert!(t.starts_with("rebased h/app:v1 onto h/run:v2"), "{t}");
        assert!(
            t.contains("(in place)") && t.contains("--rollback h/app:v1"),
            "{t}"
        );
        let mut dry = outcome();
        dry.dry_run = true;
        dry.rollback = None;
        let t = render(&dry);
        assert!(
            t.starts_with("would rebase") && t.contains("to fetch:"),
            "{t}"
        );
        let mut current = outcome();
        current.already_current = true;
        assert!(render(&current).contains("nothing to do"));
    }
}
