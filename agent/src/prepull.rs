//! `ragent prepull`: fetch the union of the requested images' blobs once, shared layers first,
//! straight into containerd; then create the image records and unpack them.
//!
//! Safety: everything is written under a lease that expires by itself; a manifest is written
//! only after its config and layers are committed, and the image record only after the
//! manifest, so no record ever points at missing content. Each blob goes through the ingest
//! `ragent-<digest>`, so a second ragent waits for (or resumes) the first instead of fetching again.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use containerd_client::tonic::Code;
use futures::{StreamExt, TryStreamExt, stream};
use serde::Serialize;
use tracing::{debug, info};

use crate::{
    adapters::{
        containerd::{Containerd, ContainerdError},
        containerd_write::WriteOutcome,
        registry::{Registry, RegistryError, ResolvedRef},
    },
    core::{
        oci::{self, Descriptor},
        prepull::{self, Blob, BlobKind, ImageNeed},
    },
};

/// Default number of blobs fetched at once: enough to fill a node's link, few enough not to
/// thrash a 2-core node.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// How long the run's lease lives if ragent dies before deleting it.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(3600);
/// How long the partial downloads of a failed run are kept for the next run to resume.
pub const RESUME_EXPIRY: Duration = Duration::from_secs(3600);
/// Prefix of the lease that keeps a failed run's partial downloads.
pub const RESUME_LEASE_PREFIX: &str = "ragent-resume-";
/// How long a blob another process is ingesting is waited for, in total.
pub const LOCK_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum PrepullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error("no image given: name at least one image reference")]
    NothingToDo,
    #[error(
        "lost containerd in the middle of the pre-pull ({reason}): once containerd is back, run the same prepull again; it resumes where this run stopped"
    )]
    ContainerdLost { reason: String },
    #[error(
        "containerd's disk is full ({reason}): free space where containerd keeps its content (its root directory), then run the same prepull again"
    )]
    DiskFull { reason: String },
}

impl PrepullError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PrepullError::Registry(e) => e.metric_label(),
            PrepullError::Containerd(e) => e.metric_label(),
            PrepullError::Oci(_) => "manifest",
            PrepullError::NothingToDo => "usage",
            PrepullError::ContainerdLost { .. } => "containerd_lost",
            PrepullError::DiskFull { .. } => "disk_full",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub concurrency: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// What `--json` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub images: Vec<ImageReport>,
    pub total: Total,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageReport {
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
    pub layers_fetched: usize,
    pub layers_reused: usize,
    /// Bytes of this image's blobs fetched in this run (a blob shared by several requested
    /// images counts for each of them; `total.bytes_fetched` counts it once).
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Total {
    /// Bytes that crossed the wire in this run (each blob once).
    pub bytes_fetched: u64,
    /// Bytes of needed blobs the node already had.
    pub bytes_reused: u64,
    pub unique_bytes_needed: u64,
    pub seconds: f64,
}

fn needs(resolved: &[ResolvedRef]) -> Vec<ImageNeed> {
    resolved
        .iter()
        .map(|r| {
            let mut blobs = vec![Blob {
                digest: r.manifest.config.digest.clone(),
                size: r.manifest.config.size,
                media_type: r.manifest.config.media_type.clone(),
                kind: BlobKind::Config,
            }];
            blobs.extend(r.manifest.layers.iter().map(|l| Blob {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                kind: BlobKind::Layer,
            }));
            ImageNeed {
                reference: r.name.clone(),
                manifest_digest: r.manifest_desc.digest.clone(),
                blobs,
            }
        })
        .collect()
}

/// Pre-pulls `references` into containerd.
pub async fn run(
    containerd: &Containerd,
    registry: Arc<Registry>,
    references: &[String],
    opts: &Options,
) -> Result<Report, PrepullError> {
    run_once(containerd, registry, references, opts)
        .await
        .map_err(|e| match e {
            // containerd went away (restarted, crashed): say so, and that a rerun resumes.
            PrepullError::Containerd(ContainerdError::Rpc { op, status })
                if matches!(status.code(), Code::Unavailable | Code::Cancelled) =>
            {
                PrepullError::ContainerdLost {
                    reason: ContainerdError::Rpc { op, status }.to_string(),
                }
            }
            PrepullError::Containerd(c) if c.to_string().contains("no space left on device") => {
                PrepullError::DiskFull {
                    reason: c.to_string(),
                }
            }
            e => e,
        })
}

async fn run_once(
    containerd: &Containerd,
    registry: Arc<Registry>,
    references: &[String],
    opts: &Options,
) -> Result<Report, PrepullError> {
    if references.is_empty() {
        return Err(PrepullError::NothingToDo);
    }
    let t0 = Instant::now();
    let mut resolved = Vec::with_capacity(references.len());
    for r in references {
        resolved.push(registry.resolve(r).await?);
    }
    let needs = needs(&resolved);
    // The lease comes first: a blob counts as present only once it is under the lease, so
    // containerd's GC cannot take it between this check and the image record.
    let lease = containerd
        .create_lease(
            &format!(
                "ragent-prepull-{}-{}",
                std::process::id(),
                t0.elapsed().as_nanos()
            ),
            LEASE_EXPIRY,
        )
        .await?;
    let present = match leased_present(containerd, &lease, &needs).await {
        Ok(p) => p,
        Err(e) => {
            let _ = containerd.delete_lease(&lease, false).await;
            return Err(e.into());
        }
    };
    let plan = prepull::plan(&needs, &present);
    info!(
        images = needs.len(),
        blobs_to_fetch = plan.fetch.len(),
        bytes_to_fetch = plan.bytes_to_fetch,
        bytes_present = plan.bytes_present,
        "pre-pull plan"
    );
    // Which reference to fetch each blob from: the first requested image that needs it.
    let mut source: BTreeMap<&str, &str> = BTreeMap::new();
    for (n, r) in needs.iter().zip(references) {
        for b in &n.blobs {
            source.entry(b.digest.as_str()).or_insert(r.as_str());
        }
    }
    let result = fetch_and_commit(
        containerd,
        &registry,
        &resolved,
        &plan.fetch,
        &source,
        &lease,
        opts,
    )
    .await;
    if result.is_err() {
        keep_partial_downloads(containerd, &plan.fetch).await;
    }
    // The run's lease goes whatever happened: committed content is referenced by image
    // records; partial downloads are held by a resume lease; the rest is garbage.
    let dropped = containerd.delete_lease(&lease, false).await;
    let fetched = result?;
    dropped?;
    // Every blob is committed now: earlier runs' partial downloads are not needed any more.
    // (Best effort: they expire by themselves.)
    if let Ok(ids) = containerd.lease_ids(RESUME_LEASE_PREFIX).await {
        for id in ids {
            let _ = containerd.delete_lease(&id, false).await;
        }
    }

    let seconds = t0.elapsed().as_secs_f64();
    let images = plan
        .images
        .iter()
        .map(|ip| {
            let need = needs
                .iter()
                .find(|n| n.manifest_digest == ip.manifest_digest);
            let (mut bf, mut lf) = (0, 0);
            if let Some(n) = need {
                let mut seen = BTreeSet::new();
                for b in n.blobs.iter().filter(|b| seen.insert(b.digest.as_str())) {
                    if fetched.contains(&b.digest) {
                        bf += b.size;
                        lf += usize::from(b.kind == BlobKind::Layer);
                    }
                }
            }
            let layers = need.map_or(0, |n| {
                n.blobs.iter().filter(|b| b.kind == BlobKind::Layer).count()
            });
            let total_bytes = ip.bytes_missing + ip.bytes_present;
            ImageReport {
                reference: ip.reference.clone(),
                digest: ip.manifest_digest.clone(),
                layers_fetched: lf,
                layers_reused: layers.saturating_sub(lf),
                bytes_fetched: bf,
                bytes_reused: total_bytes.saturating_sub(bf),
                seconds,
            }
        })
        .collect();
    let fetched_bytes: u64 = plan
        .fetch
        .iter()
        .filter(|b| fetched.contains(&b.digest))
        .map(|b| b.size)
        .sum();
    Ok(Report {
        images,
        total: Total {
            bytes_fetched: fetched_bytes,
            bytes_reused: plan.unique_bytes_needed - fetched_bytes,
            unique_bytes_needed: plan.unique_bytes_needed,
            seconds,
        },
    })
}

/// After a failed run: puts the partial ingests of the planned blobs under a resume lease that
/// expires by itself, so deleting the run's lease does not let GC take the bytes that already
/// crossed the wire. Best effort: without it the next run fetches those bytes again.
async fn keep_partial_downloads(containerd: &Containerd, fetch: &[prepull::PlannedBlob]) {
    let mut partial = Vec::new();
    for b in fetch {
        let ingest = format!("ragent-{}", b.digest);
        if containerd.ingest_offset(&ingest).await.is_ok_and(|o| o > 0) {
            partial.push(ingest);
        }
    }
    if partial.is_empty() {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let id = format!("{RESUME_LEASE_PREFIX}{}-{nanos}", std::process::id());
    let Ok(lease) = containerd.create_lease(&id, RESUME_EXPIRY).await else {
        return;
    };
    for ingest in &partial {
        if let Err(e) = containerd.lease_ingest(&lease, ingest).await {
            debug!(%ingest, error = %e, "cannot keep a partial download");
        }
    }
    info!(
        partial = partial.len(),
        lease = %lease,
        "kept the partial downloads for the next run"
    );
}

/// The needed blobs the store has, each put under `lease` before it counts as present.
async fn leased_present(
    containerd: &Containerd,
    lease: &str,
    needs: &[ImageNeed],
) -> Result<BTreeSet<String>, ContainerdError> {
    let all: BTreeSet<&str> = needs
        .iter()
        .flat_map(|n| n.blobs.iter().map(|b| b.digest.as_str()))
        .collect();
    let mut present = BTreeSet::new();
    for d in all {
        if containerd.content_size(d).await?.is_some() {
            containerd.lease_content(lease, d).await?;
            // Still there now that the lease holds it?
            if containerd.content_size(d).await?.is_some() {
                present.insert(d.to_string());
            }
        }
    }
    Ok(present)
}

/// Fetches the planned blobs (bounded concurrency, in plan order), then writes each image's
/// manifest, unpacks it and creates its record. Returns the digests this run wrote.
async fn fetch_and_commit(
    containerd: &Containerd,
    registry: &Registry,
    resolved: &[ResolvedRef],
    fetch: &[prepull::PlannedBlob],
    source: &BTreeMap<&str, &str>,
    lease: &str,
    opts: &Options,
) -> Result<BTreeSet<String>, PrepullError> {
    let written: Vec<Option<String>> = stream::iter(fetch.iter().map(|b| {
        let reference = source
            .get(b.digest.as_str())
            .copied()
            .unwrap_or_default()
            .to_string();
        let desc = Descriptor {
            media_type: b.media_type.clone(),
            digest: b.digest.clone(),
            size: b.size,
            platform: None,
            annotations: Default::default(),
        };
        async move { fetch_blob(containerd, registry, &reference, &desc, lease).await }
    }))
    .buffered(opts.concurrency.max(1))
    .try_collect()
    .await?;
    let written: BTreeSet<String> = written.into_iter().flatten().collect();

    for r in resolved {
        let config = containerd.read_blob(&r.manifest.config.digest).await?;
        let config = oci::parse_config(&r.manifest.config.digest, &config)?;
        let top = containerd
            .unpack(lease, &r.manifest.layers, &config.diff_ids)
            .await?;
        if let Some(top) = top {
            containerd
                .label_content(
                    &r.manifest.config.digest,
                    HashMap::from([(
                        format!(
                            "containerd.io/gc.ref.snapshot.{}",
                            crate::adapters::containerd_write::SNAPSHOTTER
                        ),
                        top,
                    )]),
                )
                .await?;
        }
        let mut labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            r.manifest.config.digest.clone(),
        )]);
        for (i, l) in r.manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        let bytes = r.manifest_bytes.clone();
        containerd
            .write_blob(
                lease,
                &format!("ragent-{}", r.manifest_desc.digest),
                &r.manifest_desc,
                labels.clone(),
                |off| {
                    stream::iter([Ok::<_, std::io::Error>(
                        bytes[usize::try_from(off).unwrap_or(0).min(bytes.len())..].to_vec(),
                    )])
                },
            )
            .await?;
        // If the manifest was already there (without our labels), label it now: the gc
        // references must hold before the image record exists.
        containerd
            .label_content(&r.manifest_desc.digest, labels)
            .await?;
        containerd
            .put_image(
                lease,
                &r.name,
                &r.manifest_desc,
                HashMap::from([("io.cri-containerd.image".to_string(), "managed".to_string())]),
            )
            .await?;
        debug!(image = %r.name, digest = %r.manifest_desc.digest, "image record written");
    }
    Ok(written)
}

/// Fetches one blob into containerd; Some(digest) when this run wrote it.
async fn fetch_blob(
    containerd: &Containerd,
    registry: &Registry,
    reference: &str,
    desc: &Descriptor,
    lease: &str,
) -> Result<Option<String>, PrepullError> {
    let ingest = format!("ragent-{}", desc.digest);
    let start = Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut retried = false;
    loop {
        let reference = reference.to_string();
        let digest = desc.digest.clone();
        let size = desc.size;
        let mut resumed_from = 0;
        let opened = containerd
            .write_blob(lease, &ingest, desc, HashMap::new(), |offset| {
                resumed_from = offset;
                stream::once(async move {
                    registry
                        .blob(&reference, &digest, size, offset)
                        .await
                        .map_err(std::io::Error::other)
                })
                .try_flatten()
            })
            .await;
        match opened {
            // The registry's side failed: its error says what happened and what to do.
            Err(ContainerdError::Source { digest, error }) => {
                let kind = error.kind();
                return Err(
                    match error.into_inner().map(|e| e.downcast::<RegistryError>()) {
                        Some(Ok(e)) => PrepullError::Registry(*e),
                        Some(Err(other)) => PrepullError::Containerd(ContainerdError::Source {
                            digest,
                            error: std::io::Error::new(kind, other),
                        }),
                        None => PrepullError::Containerd(ContainerdError::Source {
                            digest,
                            error: std::io::Error::from(kind),
                        }),
                    },
                );
            }
            // A partial ingest an earlier run left (cut off while the bytes were still
            // unverified) did not add up: containerd dropped it; fetch the blob once from zero.
            Err(ContainerdError::Rejected { .. }) if resumed_from > 0 && !retried => {
                retried = true;
                debug!(digest = %desc.digest, resumed_from, "resumed ingest rejected; fetching it whole");
            }
            Ok(WriteOutcome::Existed) => return Ok(None),
            Ok(WriteOutcome::Written { .. }) => return Ok(Some(desc.digest.clone())),
            // Another writer holds the ingest: wait for it to finish (then the blob exists).
            Err(ContainerdError::Rpc { status, .. })
                if status.message().contains("locked") && start.elapsed() < LOCK_WAIT =>
            {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The text report of `ragent prepull`.
pub fn render(r: &Report) -> String {
    use crate::images::human_bytes;
    let mut out = String::new();
    for i in &r.images {
        out.push_str(&format!(
            "{}  {}  {} layers fetched, {} reused; {} fetched, {} reused\n",
            i.reference,
            i.digest,
            i.layers_fetched,
            i.layers_reused,
            human_bytes(i.bytes_fetched),
            human_bytes(i.bytes_reused)
        ));
    }
    out.push_str(&format!(
        "total: {} fetched (each blob once), {} already on the node, {} needed; {:.2} s\n",
        human_bytes(r.total.bytes_fetched),
        human_bytes(r.total.bytes_reused),
        human_bytes(r.total.unique_bytes_needed),
        r.total.seconds
    ));
    out
}
