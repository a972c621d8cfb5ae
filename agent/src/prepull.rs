//! `ragent prepull` and the agent's pre-pull policy: fetch the union of the requested images'
//! blobs once, shared layers first, straight into containerd; then unpack them and create the
//! image records.
//!
//! Safety: everything is written under a lease that expires by itself; a manifest is written
//! only after its config and layers are committed, and the image record only after the
//! manifest, so no record ever points at missing content. Each blob goes through the ingest
//! `ragent-<digest>`, so a second ragent waits for (or resumes) the first instead of fetching
//! again; inside one process, overlapping pulls share one fetch per digest (single-flight).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt, TryStreamExt, future::BoxFuture, stream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use crate::core::prepull::{ImageReport, Report, Total};
use crate::{
    adapters::{
        containerd::{Containerd, ContainerdError},
        containerd_write::WriteOutcome,
        registry::{Registry, RegistryError, ResolvedRef},
    },
    core::{
        oci::{self, Descriptor},
        prepull::{self, Blob, BlobKind, ImageNeed},
        rate::TokenBucket,
    },
    flight::SingleFlight,
    metrics::PrepullMetrics,
    progress::Progress,
    sharing::NodeMesh,
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
    #[error("cannot set up the pre-pull metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The failure of a fetch that several pulls were waiting for.
    #[error(transparent)]
    Shared(Arc<PrepullError>),
}

impl PrepullError {
    /// The containerd error under this one, if any (also through a shared fetch's failure).
    fn containerd_cause(&self) -> Option<&ContainerdError> {
        match self {
            PrepullError::Containerd(c) => Some(c),
            PrepullError::Shared(e) => e.containerd_cause(),
            _ => None,
        }
    }

    /// Says what a containerd failure means for the run: containerd gone (a rerun resumes),
    /// or its disk full.
    fn classified(self) -> PrepullError {
        let Some(c) = self.containerd_cause() else {
            return self;
        };
        // (Disk full first: containerd reports it with code Unknown, as it does a broken stream.)
        if c.to_string().contains("no space left on device") {
            return PrepullError::DiskFull {
                reason: c.to_string(),
            };
        }
        if c.is_disconnect() {
            return PrepullError::ContainerdLost {
                reason: c.to_string(),
            };
        }
        self
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            PrepullError::Registry(e) => e.metric_label(),
            // containerd's own failures are one reason (the log says which); the ones a user
            // acts on differently have their own.
            PrepullError::Containerd(ContainerdError::Rejected { .. }) => "rejected",
            PrepullError::Containerd(_) => "containerd",
            PrepullError::Oci(_) => "manifest",
            PrepullError::NothingToDo => "usage",
            PrepullError::ContainerdLost { .. } => "containerd_lost",
            PrepullError::DiskFull { .. } => "disk_full",
            PrepullError::Metrics(_) => "internal",
            PrepullError::Shared(e) => e.metric_label(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Blobs fetched at once.
    pub concurrency: usize,
    /// Bytes per second over all of this puller's fetches; None: as fast as the link goes.
    pub max_rate: Option<u64>,
    /// Layer sharing (`[sharing]` on): blobs come from their home peer, or are fetched
    /// upstream once for the cluster; None: straight from the registry.
    pub mesh: Option<Arc<NodeMesh>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: DEFAULT_CONCURRENCY,
            max_rate: None,
            mesh: None,
        }
    }
}

/// How one blob got into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetched {
    /// It was there (or another process committed it while this one waited).
    Existed,
    /// This process wrote it; `wire` bytes crossed the network (less than the size on resume).
    Written { wire: u64 },
}

/// Pulls images into one containerd namespace. Cheap to share (`Arc`): overlapping
/// [`Puller::pull`] calls fetch each digest once.
pub struct Puller {
    containerd: Containerd,
    registry: Arc<Registry>,
    concurrency: usize,
    limiter: Option<Arc<Mutex<TokenBucket>>>,
    metrics: PrepullMetrics,
    flights: SingleFlight<Result<Fetched, Arc<PrepullError>>>,
    mesh: Option<Arc<NodeMesh>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
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

/// Takes the not-yet-arrived bytes of a fetch off the in-flight gauge, whatever way it ends.
struct Inflight {
    gauge: prometheus::IntGauge,
    remaining: Arc<Mutex<u64>>,
}

impl Inflight {
    fn start(&self, bytes: u64) {
        *lock(&self.remaining) = bytes;
        self.gauge.add(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        let left = std::mem::take(&mut *lock(&self.remaining));
        self.gauge.sub(i64::try_from(left).unwrap_or(i64::MAX));
    }
}

impl Puller {
    pub fn new(
        containerd: Containerd,
        registry: Arc<Registry>,
        opts: &Options,
        metrics: PrepullMetrics,
    ) -> Puller {
        Puller {
            containerd,
            registry,
            concurrency: opts.concurrency.max(1),
            limiter: opts
                .max_rate
                .map(|r| Arc::new(Mutex::new(TokenBucket::new(r, Instant::now())))),
            metrics,
            flights: SingleFlight::default(),
            mesh: opts.mesh.clone(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// Resolves every reference (all or nothing), then pulls them.
    pub async fn pull(
        &self,
        references: &[String],
        progress: Option<&Arc<Progress>>,
    ) -> Result<Report, PrepullError> {
        if references.is_empty() {
            return Err(PrepullError::NothingToDo);
        }
        let t0 = Instant::now();
        let mut resolved = Vec::with_capacity(references.len());
        for r in references {
            match self.registry.resolve(r).await {
                Ok(x) => resolved.push(x),
                Err(e) => {
                    let e = PrepullError::from(e);
                    self.failed(&e, t0);
                    return Err(e);
                }
            }
        }
        self.pull_since(&resolved, progress, t0).await
    }

    fn failed(&self, e: &PrepullError, t0: Instant) {
        self.metrics
            .failures
            .with_label_values(&[e.metric_label()])
            .inc();
        self.metrics.duration.observe(t0.elapsed().as_secs_f64());
    }

    /// Pulls images already resolved to this node's manifests.
    pub async fn pull_resolved(
        &self,
        resolved: &[ResolvedRef],
        progress: Option<&Arc<Progress>>,
    ) -> Result<Report, PrepullError> {
        self.pull_since(resolved, progress, Instant::now()).await
    }

    /// The pass started at `t0` (its report and duration count from there).
    async fn pull_since(
        &self,
        resolved: &[ResolvedRef],
        progress: Option<&Arc<Progress>>,
        t0: Instant,
    ) -> Result<Report, PrepullError> {
        let r = self
            .pull_inner(resolved, progress, t0)
            .await
            .map_err(PrepullError::classified);
        match &r {
            Ok(_) => self.metrics.duration.observe(t0.elapsed().as_secs_f64()),
            Err(e) => self.failed(e, t0),
        }
        r
    }

    async fn pull_inner(
        &self,
        resolved: &[ResolvedRef],
        progress: Option<&Arc<Progress>>,
        t0: Instant,
    ) -> Result<Report, PrepullError> {
        if resolved.is_empty() {
            return Err(PrepullError::NothingToDo);
        }
        let needs = needs(resolved);
        // The lease comes first: a blob counts as present only once it is under the lease, so
        // containerd's GC cannot take it between this check and the image record.
        let lease = self
            .containerd
            .create_lease(
                &format!("ragent-prepull-{}-{}", std::process::id(), nonce()),
                LEASE_EXPIRY,
            )
            .await?;
        let result = self
            .under_lease(resolved, &needs, &lease, progress, t0)
            .await;
        if let Err(e) = &result {
            if e.containerd_cause()
                .is_some_and(ContainerdError::is_disconnect)
            {
                // containerd restarted under us: give it a moment to come back, so the
                // run's lease can go and the partial downloads can be kept.
                wait_for(&self.containerd, CONTAINERD_RETURN).await;
            }
            keep_partial_downloads(&self.containerd, &needs).await;
        }
        // The run's lease goes whatever happened: committed content is referenced by image
        // records; partial downloads are held by a resume lease; the rest is garbage.
        let dropped = self.containerd.delete_lease(&lease, false).await;
        let report = result?;
        dropped?;
        // Every blob is committed now: earlier runs' partial downloads are not needed any
        // more. (Best effort: they expire by themselves.)
        if let Ok(ids) = self.containerd.lease_ids(RESUME_LEASE_PREFIX).await {
            for id in ids {
                let _ = self.containerd.delete_lease(&id, false).await;
            }
        }
        Ok(report)
    }

    async fn under_lease(
        &self,
        resolved: &[ResolvedRef],
        needs: &[ImageNeed],
        lease: &str,
        progress: Option<&Arc<Progress>>,
        t0: Instant,
    ) -> Result<Report, PrepullError> {
        let present = leased_present(&self.containerd, lease, needs).await?;
        let plan = prepull::plan(needs, &present);
        info!(
            images = needs.len(),
            blobs_to_fetch = plan.fetch.len(),
            bytes_to_fetch = plan.bytes_to_fetch,
            bytes_present = plan.bytes_present,
            "pre-pull plan"
        );
        self.metrics
            .bytes
            .with_label_values(&["reused"])
            .inc_by(plan.bytes_present);
        self.metrics
            .layers
            .with_label_values(&["reused"])
            .inc_by(present.len() as u64);
        if let Some(p) = progress {
            let missing: BTreeSet<&str> = plan.fetch.iter().map(|b| b.digest.as_str()).collect();
            p.plan(
                &needs
                    .iter()
                    .map(|n| {
                        let mut seen = BTreeSet::new();
                        (
                            n.reference.clone(),
                            n.blobs
                                .iter()
                                .filter(|b| {
                                    missing.contains(b.digest.as_str())
                                        && seen.insert(b.digest.as_str())
                                })
                                .map(|b| (b.digest.clone(), b.size))
                                .collect(),
                        )
                    })
                    .collect::<Vec<_>>(),
            );
        }
        // Which reference to fetch each blob from: the first requested image that needs it.
        let mut source: BTreeMap<&str, &str> = BTreeMap::new();
        for (n, r) in needs.iter().zip(resolved) {
            for b in &n.blobs {
                source.entry(b.digest.as_str()).or_insert(r.name.as_str());
            }
        }
        // The blobs in the store, present or fetched so far: the unpacker waits on it.
        let (arrived, _) = watch::channel(present.clone());
        let arrived = &arrived;
        // Boxed up front: the stream then holds no closure borrowing this frame, which keeps
        // the future Send for any lifetime (tokio::spawn needs that).
        let fetches: Vec<BoxFuture<'_, Result<(String, Fetched), PrepullError>>> = plan
            .fetch
            .iter()
            .map(|b| {
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
                let fut: BoxFuture<'_, Result<(String, Fetched), PrepullError>> = async move {
                    let f = self.fetch_shared(&reference, &desc, lease, progress).await;
                    match &f {
                        Ok(_) => arrived.send_modify(|s| {
                            s.insert(desc.digest.clone());
                        }),
                        Err(_) => self.metrics.layers.with_label_values(&["failed"]).inc(),
                    }
                    f.map(|f| (desc.digest, f))
                }
                .boxed();
                fut
            })
            .collect();
        let fetch_all = stream::iter(fetches)
            .buffered(self.concurrency)
            .try_collect::<Vec<(String, Fetched)>>();
        // Unpacking goes on while the fetches do: each layer as soon as its blob (and the
        // layers below it) are in, so the shared layers that come first are unpacked early.
        // First the layers several images share, one image after the other (so each shared
        // snapshot is made once); then every image's own layers, all images at once (no two
        // of them make the same snapshot).
        let mut users: BTreeMap<&str, usize> = BTreeMap::new();
        for r in resolved {
            let mine: BTreeSet<&str> = r
                .manifest
                .layers
                .iter()
                .map(|l| l.digest.as_str())
                .collect();
            for d in mine {
                *users.entry(d).or_default() += 1;
            }
        }
        let unpack_all = async {
            for r in resolved {
                let shared = r
                    .manifest
                    .layers
                    .iter()
                    .rposition(|l| users.get(l.digest.as_str()).is_some_and(|n| *n > 1));
                if let Some(top) = shared {
                    self.unpack_image(r, lease, arrived, top + 1).await?;
                }
            }
            futures::future::try_join_all(
                resolved
                    .iter()
                    .map(|r| self.unpack_image(r, lease, arrived, r.manifest.layers.len())),
            )
            .await
        };
        let (fetched, tops) = futures::try_join!(fetch_all, unpack_all)?;
        let mut written = BTreeSet::new();
        for (digest, f) in fetched {
            match f {
                Fetched::Written { wire } => {
                    self.metrics
                        .bytes
                        .with_label_values(&["fetched"])
                        .inc_by(wire);
                    self.metrics.layers.with_label_values(&["fetched"]).inc();
                    written.insert(digest);
                }
                Fetched::Existed => {
                    let size = plan
                        .fetch
                        .iter()
                        .find(|b| b.digest == digest)
                        .map_or(0, |b| b.size);
                    self.metrics
                        .bytes
                        .with_label_values(&["reused"])
                        .inc_by(size);
                    self.metrics.layers.with_label_values(&["reused"]).inc();
                }
            }
        }
        let mut seconds = Vec::with_capacity(resolved.len());
        for (r, top) in resolved.iter().zip(tops) {
            self.commit_image(r, lease, top).await?;
            if let Some(p) = progress {
                p.image_done(&r.name);
            }
            seconds.push(t0.elapsed().as_secs_f64());
        }
        Ok(prepull::report(
            needs,
            &plan,
            &written,
            &seconds,
            t0.elapsed().as_secs_f64(),
        ))
    }

    /// Unpacks an image's lowest `upto` layers as their blobs arrive in `arrived`; returns the
    /// chain ID of the highest.
    async fn unpack_image(
        &self,
        r: &ResolvedRef,
        lease: &str,
        arrived: &watch::Sender<BTreeSet<String>>,
        upto: usize,
    ) -> Result<Option<String>, PrepullError> {
        let wait = |digest: String| {
            let mut rx = arrived.subscribe();
            async move {
                // The sender outlives every waiter (it lives in the caller's frame).
                let _ = rx.wait_for(|s| s.contains(&digest)).await;
            }
        };
        wait(r.manifest.config.digest.clone()).await;
        let config = self.containerd.read_blob(&r.manifest.config.digest).await?;
        let config = oci::parse_config(&r.manifest.config.digest, &config)?;
        let layers = &r.manifest.layers[..upto.min(r.manifest.layers.len())];
        // A config whose diffIDs do not match the layers is refused by unpack_as_ready (at
        // the latest when the whole image is unpacked).
        let diff_ids = &config.diff_ids[..upto.min(config.diff_ids.len())];
        Ok(self
            .containerd
            .unpack_as_ready(lease, layers, diff_ids, wait)
            .await?)
    }

    /// Writes the manifest and the record of an image whose blobs are in the store and whose
    /// layers are unpacked up to `top`.
    async fn commit_image(
        &self,
        r: &ResolvedRef,
        lease: &str,
        top: Option<String>,
    ) -> Result<(), PrepullError> {
        let containerd = &self.containerd;
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
        let mut labels = HashMap::from([
            (
                "containerd.io/gc.ref.content.config".to_string(),
                r.manifest.config.digest.clone(),
            ),
            crate::core::pulls::distribution_source_label(&r.name),
        ]);
        for (i, l) in r.manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        let bytes = &r.manifest_bytes;
        let ingest = format!("ragent-{}", r.manifest_desc.digest);
        let start = Instant::now();
        let mut wait = Duration::from_millis(50);
        loop {
            let written = containerd
                .write_blob(lease, &ingest, &r.manifest_desc, labels.clone(), |off| {
                    stream::iter([Ok::<_, std::io::Error>(
                        bytes[usize::try_from(off).unwrap_or(0).min(bytes.len())..].to_vec(),
                    )])
                })
                .await;
            match written {
                // Another pull writes the same manifest right now (two requested sets that
                // share an image): once it has, the manifest exists.
                Err(e) if is_locked(&e) && start.elapsed() < LOCK_WAIT => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                other => {
                    other?;
                    break;
                }
            }
        }
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
        Ok(())
    }

    /// Fetches one blob, or waits for the fetch of it another pull of this process started;
    /// either way the blob ends up under `lease`.
    async fn fetch_shared(
        &self,
        reference: &str,
        desc: &Descriptor,
        lease: &str,
        progress: Option<&Arc<Progress>>,
    ) -> Result<Fetched, PrepullError> {
        let (out, leader) = self
            .flights
            .run(&desc.digest, || {
                self.flight(reference, desc, lease, progress.cloned())
            })
            .await;
        let out = out.map_err(PrepullError::Shared)?;
        if leader {
            return Ok(out);
        }
        // The leader wrote it under its own lease: put it under ours before counting on it.
        self.containerd.lease_content(lease, &desc.digest).await?;
        if self.containerd.content_size(&desc.digest).await?.is_some() {
            if let Some(p) = progress {
                p.blob_done(&desc.digest);
            }
            return Ok(Fetched::Existed);
        }
        // Gone in between (the leader's run failed and GC took it): fetch it ourselves.
        fetch_blob(
            &self.containerd,
            &self.registry,
            self.mesh.clone(),
            reference,
            desc,
            lease,
            self.limiter.clone(),
            &self.metrics,
            progress.cloned(),
        )
        .await
    }

    /// The fetch of one blob, owning everything it needs (it may outlive this pull).
    fn flight(
        &self,
        reference: &str,
        desc: &Descriptor,
        lease: &str,
        progress: Option<Arc<Progress>>,
    ) -> impl std::future::Future<Output = Result<Fetched, Arc<PrepullError>>> + Send + 'static
    {
        let containerd = self.containerd.clone();
        let registry = self.registry.clone();
        let mesh = self.mesh.clone();
        let limiter = self.limiter.clone();
        let metrics = self.metrics.clone();
        let (reference, desc, lease) = (reference.to_string(), desc.clone(), lease.to_string());
        async move {
            fetch_blob(
                &containerd,
                &registry,
                mesh,
                &reference,
                &desc,
                &lease,
                limiter,
                &metrics,
                progress,
            )
            .await
            .map_err(Arc::new)
        }
    }
}

/// Pre-pulls `references` into containerd (the one-shot CLI).
pub async fn run(
    containerd: &Containerd,
    registry: Arc<Registry>,
    references: &[String],
    opts: &Options,
    progress: Option<&Arc<Progress>>,
) -> Result<Report, PrepullError> {
    let metrics = PrepullMetrics::new(&prometheus::Registry::new())?;
    Puller::new(containerd.clone(), registry, opts, metrics)
        .pull(references, progress)
        .await
}

/// Whether containerd refused a write because another writer holds the ingest.
fn is_locked(e: &ContainerdError) -> bool {
    matches!(e, ContainerdError::Rpc { status, .. } if status.message().contains("locked"))
}

/// How long a run that lost containerd waits for it to come back before it cleans up.
const CONTAINERD_RETURN: Duration = Duration::from_secs(15);

/// Waits until containerd answers again, at most `limit`.
async fn wait_for(containerd: &Containerd, limit: Duration) {
    let start = Instant::now();
    while containerd.version().await.is_err() && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every blob the images need, once.
fn distinct_digests(needs: &[ImageNeed]) -> BTreeSet<&str> {
    needs
        .iter()
        .flat_map(|n| n.blobs.iter().map(|b| b.digest.as_str()))
        .collect()
}

/// Nanoseconds since the epoch: makes lease IDs unique per run.
pub(crate) fn nonce() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// After a failed run: puts the partial ingests of the needed blobs under a resume lease that
/// expires by itself, so deleting the run's lease does not let GC take the bytes that already
/// crossed the wire. Best effort: without it the next run fetches those bytes again.
async fn keep_partial_downloads(containerd: &Containerd, needs: &[ImageNeed]) {
    let digests = distinct_digests(needs);
    let mut partial = Vec::new();
    for d in digests {
        let ingest = format!("ragent-{d}");
        if containerd.ingest_offset(&ingest).await.is_ok_and(|o| o > 0) {
            partial.push(ingest);
        }
    }
    if partial.is_empty() {
        return;
    }
    let id = format!("{RESUME_LEASE_PREFIX}{}-{}", std::process::id(), nonce());
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
    let all = distinct_digests(needs);
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

/// The bytes of a blob from `offset`: through layer sharing when it runs (home peer or one
/// upstream fetch for the cluster), else, or when sharing cannot serve it, from the registry.
async fn open_blob(
    registry: &Registry,
    mesh: Option<&Arc<NodeMesh>>,
    reference: &str,
    digest: &str,
    size: u64,
    offset: u64,
) -> Result<futures::stream::BoxStream<'static, std::io::Result<Vec<u8>>>, std::io::Error> {
    if let Some(mesh) = mesh {
        let host = crate::core::pulls::registry_of(reference);
        let (_, repository) = crate::core::pulls::distribution_source_label(reference);
        match mesh.fetch(host, &repository, digest, offset, None).await {
            Ok(f) if f.size == size => return Ok(f.stream),
            Ok(f) => {
                warn!(%digest, size, shared = f.size, "layer sharing announced another size; fetching from the registry");
            }
            Err(e) => {
                info!(%digest, error = %e, "layer sharing could not serve the blob; fetching from the registry");
            }
        }
    }
    Ok(registry
        .blob(reference, digest, size, offset)
        .await
        .map_err(std::io::Error::other)?
        .boxed())
}

/// Fetches one blob into containerd through the ingest `ragent-<digest>`, paced by `limiter`.
#[allow(clippy::too_many_arguments)]
async fn fetch_blob(
    containerd: &Containerd,
    registry: &Registry,
    mesh: Option<Arc<NodeMesh>>,
    reference: &str,
    desc: &Descriptor,
    lease: &str,
    limiter: Option<Arc<Mutex<TokenBucket>>>,
    metrics: &PrepullMetrics,
    progress: Option<Arc<Progress>>,
) -> Result<Fetched, PrepullError> {
    let ingest = format!("ragent-{}", desc.digest);
    let source_label = HashMap::from([crate::core::pulls::distribution_source_label(reference)]);
    let start = Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut retried = false;
    loop {
        let inflight = Inflight {
            gauge: metrics.inflight.clone(),
            remaining: Arc::new(Mutex::new(0)),
        };
        // Where containerd's partial ingest let this attempt start.
        let resumed_from = AtomicU64::new(0);
        let opened = {
            let remaining = inflight.remaining.clone();
            let gauge = inflight.gauge.clone();
            let (inflight, resumed) = (&inflight, &resumed_from);
            let (reference, digest) = (reference.to_string(), desc.digest.clone());
            let (limiter, progress) = (limiter.clone(), progress.clone());
            let mesh = mesh.clone();
            let size = desc.size;
            containerd
                .write_blob(lease, &ingest, desc, source_label.clone(), move |offset| {
                    resumed.store(offset, Ordering::SeqCst);
                    inflight.start(size.saturating_sub(offset));
                    if let Some(p) = &progress {
                        p.advance(&digest, offset);
                    }
                    let d = digest.clone();
                    let mesh = mesh.clone();
                    stream::once(async move {
                        open_blob(registry, mesh.as_ref(), &reference, &d, size, offset).await
                    })
                    .try_flatten()
                    .and_then(move |chunk| {
                        let limiter = limiter.clone();
                        let (remaining, gauge) = (remaining.clone(), gauge.clone());
                        let (progress, digest) = (progress.clone(), digest.clone());
                        async move {
                            let n = chunk.len() as u64;
                            if let Some(l) = limiter {
                                let w = lock(&l).take(n, Instant::now());
                                if !w.is_zero() {
                                    tokio::time::sleep(w).await;
                                }
                            }
                            let arrived = {
                                let mut r = lock(&remaining);
                                let a = n.min(*r);
                                *r -= a;
                                a
                            };
                            gauge.sub(i64::try_from(arrived).unwrap_or(i64::MAX));
                            if let Some(p) = &progress {
                                p.advance(&digest, n);
                            }
                            Ok(chunk)
                        }
                    })
                })
                .await
        };
        match opened {
            Ok(WriteOutcome::Existed) => {
                if let Some(p) = &progress {
                    p.blob_done(&desc.digest);
                }
                return Ok(Fetched::Existed);
            }
            Ok(WriteOutcome::Written { bytes, .. }) => {
                return Ok(Fetched::Written { wire: bytes });
            }
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
            Err(ContainerdError::Rejected { .. })
                if resumed_from.load(Ordering::SeqCst) > 0 && !retried =>
            {
                retried = true;
                debug!(digest = %desc.digest, "resumed ingest rejected; fetching it whole");
            }
            // Another writer holds the ingest: wait for it to finish (then the blob exists).
            Err(e) if is_locked(&e) && start.elapsed() < LOCK_WAIT => {
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
            "{}  {}  {} layers fetched, {} reused; {} fetched, {} reused; ready after {:.2} s\n",
            i.reference,
            i.digest,
            i.layers_fetched,
            i.layers_reused,
            human_bytes(i.bytes_fetched),
            human_bytes(i.bytes_reused),
            i.seconds
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::metrics::PREPULL_FAILURE_REASONS;

    #[test]
    fn every_failure_reason_is_exported_from_the_start() {
        use RegistryError as R;
        let s = String::new;
        let errors: Vec<PrepullError> = vec![
            R::Reference {
                reference: s(),
                reason: s(),
            }
            .into(),
            R::NotFound {
                what: s(),
                detail: s(),
            }
            .into(),
            R::Denied { what: s() }.into(),
            R::RateLimited { what: s() }.into(),
            R::Server {
                what: s(),
                status: 503,
            }
            .into(),
            R::Timeout {
                what: s(),
                seconds: 30,
            }
            .into(),
            R::Request {
                reference: s(),
                reason: s(),
            }
            .into(),
            R::DigestMismatch {
                reference: s(),
                want: s(),
                got: s(),
            }
            .into(),
            R::BlobDigest {
                digest: s(),
                got: s(),
            }
            .into(),
            R::Interrupted {
                digest: s(),
                received: 1,
                size: 2,
                reason: s(),
            }
            .into(),
            R::TooLarge {
                reference: s(),
                size: 1,
            }
            .into(),
            R::NeedsCredentials {
                registry: s(),
                repository: s(),
                what: s(),
                file: None,
            }
            .into(),
            R::CredentialsRefused {
                registry: s(),
                repository: s(),
                what: s(),
                file: PathBuf::new(),
            }
            .into(),
            R::UnsupportedCredential {
                registry: s(),
                file: PathBuf::new(),
            }
            .into(),
            ContainerdError::NotFound { digest: s() }.into(),
            ContainerdError::Rejected {
                digest: s(),
                reason: s(),
            }
            .into(),
            PrepullError::NothingToDo,
            PrepullError::ContainerdLost { reason: s() },
            PrepullError::DiskFull { reason: s() },
            PrepullError::Shared(Arc::new(PrepullError::DiskFull { reason: s() })),
        ];
        for e in errors {
            assert!(
                PREPULL_FAILURE_REASONS.contains(&e.metric_label()),
                "{:?} is not in PREPULL_FAILURE_REASONS",
                e.metric_label()
            );
        }
    }

    #[test]
    fn containerd_failures_are_said_as_what_they_mean() {
        let gone = PrepullError::Shared(Arc::new(PrepullError::Containerd(ContainerdError::Rpc {
            op: "Content.Write",
            status: containerd_client::tonic::Status::unavailable("connection refused"),
        })));
        let e = gone.classified();
        assert_eq!(e.metric_label(), "containerd_lost");
        assert!(e.to_string().contains("run the same prepull again"), "{e}");
        let full = PrepullError::Containerd(ContainerdError::Rpc {
            op: "Content.Write",
            status: containerd_client::tonic::Status::unknown(
                "write /var/lib/containerd/ingest/x/data: no space left on device",
            ),
        });
        assert_eq!(full.classified().metric_label(), "disk_full");
        let other = PrepullError::Containerd(ContainerdError::NotFound { digest: "d".into() });
        assert_eq!(other.classified().metric_label(), "containerd");
        // A stream that broke when containerd went away comes back with code Unknown.
        let broken = PrepullError::Containerd(ContainerdError::Rpc {
            op: "Content.Write",
            status: containerd_client::tonic::Status::unknown(
                "h2 protocol error: error reading a body from connection",
            ),
        });
        assert_eq!(broken.classified().metric_label(), "containerd_lost");
    }
}
