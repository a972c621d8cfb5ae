//! The agent's pre-pull policy at work: keeps the images of `[prepull]` on the node. New images
//! are fetched (each unique blob once, through one [`Puller`], so passes share fetches), ready
//! images are re-resolved every refresh interval (a moved tag is pulled again), and failures are
//! retried with backoff, logged and counted. The decisions are in [`crate::core::policy`].
use std::{sync::Arc, time::Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    adapters::{
        containerd::Containerd,
        registry::{Registry, ResolvedRef},
    },
    config::PrepullPolicy,
    core::{
        policy::{Counts, Policy, is_current},
        prepulls::Outcome,
    },
    metrics::PrepullMetrics,
    prepull::{Options, PrepullError, Puller},
    rebase::LABEL_UPSTREAM,
};

/// Where a policy reports each image's outcome (the kube adapter turns them into Events).
pub type Reports = mpsc::UnboundedSender<(String, Outcome)>;

/// Runs the policy until `stop` turns true. Several policies may run at once (the config
/// file's and one per applied `PrePull` resource): `ragent_prepull_images` is their sum.
#[allow(clippy::too_many_arguments)]
pub async fn keep_warm(
    socket: std::path::PathBuf,
    namespace: String,
    policy: PrepullPolicy,
    registry: Arc<Registry>,
    metrics: PrepullMetrics,
    reports: Option<Reports>,
    mesh: Option<Arc<crate::sharing::NodeMesh>>,
    mut stop: watch::Receiver<bool>,
) {
    let opts = Options {
        concurrency: policy.concurrency,
        max_rate: policy.max_rate,
        mesh,
    };
    let mut state = Policy::new(&policy.images, policy.timing, Instant::now());
    let mut published = Published::new(metrics.images.clone());
    published.set(state.counts());
    info!(images = policy.images.len(), "pre-pull policy started");
    let mut puller: Option<Puller> = None;
    loop {
        let due = state.due(Instant::now());
        if !due.is_empty() {
            if puller.is_none() {
                match Containerd::connect(&socket, &namespace).await {
                    Ok(c) => {
                        puller = Some(Puller::new(c, registry.clone(), &opts, metrics.clone()))
                    }
                    Err(e) => {
                        let e = PrepullError::from(e);
                        count(&metrics, &e);
                        for r in &due {
                            fail(&mut state, r, &e, reports.as_ref());
                        }
                    }
                }
            }
            if let Some(p) = &puller {
                let lost = pass(p, &mut state, &metrics, &due, reports.as_ref()).await;
                if lost {
                    // containerd went away: connect afresh next time.
                    puller = None;
                }
            }
            published.set(state.counts());
        }
        let wake = state
            .next_wake()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One policy's share of `ragent_prepull_images`: changes are added to the gauge, and the
/// share is taken back out when the policy ends (a `PrePull` deleted or no longer selected).
struct Published {
    gauge: prometheus::IntGaugeVec,
    last: Counts,
}

impl Published {
    fn new(gauge: prometheus::IntGaugeVec) -> Published {
        Published {
            gauge,
            last: Counts::default(),
        }
    }

    fn set(&mut self, c: Counts) {
        let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        for (label, new, old) in [
            ("ready", c.ready, self.last.ready),
            ("failed", c.failed, self.last.failed),
            ("pending", c.pending, self.last.pending),
        ] {
            self.gauge.with_label_values(&[label]).add(n(new) - n(old));
        }
        self.last = c;
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        self.set(Counts::default());
    }
}

/// Counts a failure that happened outside a pull pass (the puller counts its own).
fn count(metrics: &PrepullMetrics, e: &PrepullError) {
    metrics
        .failures
        .with_label_values(&[e.metric_label()])
        .inc();
}

/// Marks a failure (counting it is the caller's: one failed pass of several images is one).
fn fail(state: &mut Policy, reference: &str, e: &PrepullError, reports: Option<&Reports>) {
    let delay = state.failed(reference, e.metric_label(), Instant::now());
    warn!(image = reference, error = %e, retry_in_s = delay.as_secs_f64(), "pre-pull failed");
    tell(
        reports,
        reference,
        Outcome::Failed {
            reason: crate::adapters::error_chain(e),
        },
    );
}

fn tell(reports: Option<&Reports>, reference: &str, o: Outcome) {
    if let Some(tx) = reports {
        // The receiver gone means the kube adapter is stopping this policy too.
        let _ = tx.send((reference.to_string(), o));
    }
}

/// One pass over the due references; true when containerd was lost.
async fn pass(
    p: &Puller,
    state: &mut Policy,
    metrics: &PrepullMetrics,
    due: &[String],
    reports: Option<&Reports>,
) -> bool {
    let mut to_pull: Vec<ResolvedRef> = Vec::new();
    let mut lost = false;
    for r in due {
        let resolved = match p.registry().resolve(r).await {
            Ok(x) => x,
            Err(e) => {
                let e = PrepullError::from(e);
                count(metrics, &e);
                fail(state, r, &e, reports);
                continue;
            }
        };
        // Already there (pulled before, by us or by kubelet, or rebased here from that very
        // manifest)? Nothing to fetch.
        match p.containerd().get_image(&resolved.name).await {
            Ok(Some(rec))
                if is_current(
                    &rec.target.digest,
                    rec.labels.get(LABEL_UPSTREAM).map(String::as_str),
                    &resolved.manifest_desc.digest,
                ) =>
            {
                state.ready(r, &resolved.manifest_desc.digest, Instant::now());
                let digest = resolved.manifest_desc.digest.clone();
                tell(reports, r, Outcome::Pulled { digest });
            }
            Ok(_) => to_pull.push(resolved),
            Err(e) => {
                lost |= e.is_disconnect();
                let e = PrepullError::from(e);
                count(metrics, &e);
                fail(state, r, &e, reports);
            }
        }
    }
    if to_pull.is_empty() {
        return lost;
    }
    match p.pull_resolved(&to_pull, None).await {
        Ok(report) => {
            for (r, img) in to_pull.iter().zip(&report.images) {
                let moved = state.ready(&r.name, &r.manifest_desc.digest, Instant::now());
                let digest = r.manifest_desc.digest.clone();
                tell(reports, &r.name, Outcome::Pulled { digest });
                info!(
                    image = %r.name,
                    digest = %r.manifest_desc.digest,
                    moved,
                    bytes_fetched = img.bytes_fetched,
                    bytes_reused = img.bytes_reused,
                    "pre-pulled"
                );
            }
        }
        Err(e) => {
            lost |= matches!(&e, PrepullError::ContainerdLost { .. })
                || matches!(&e, PrepullError::Containerd(c) if c.is_disconnect());
            for r in &to_pull {
                fail(state, &r.name, &e, reports);
            }
        }
    }
    lost
}
