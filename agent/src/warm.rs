//! The agent's pre-pull policy at work: keeps the images of `[prepull]` on the node. New images
//! are fetched (each unique blob once, through one [`Puller`], so passes share fetches), ready
//! images are re-resolved every refresh interval (a moved tag is pulled again), and failures are
//! retried with backoff, logged and counted. The decisions are in [`crate::core::policy`].
use std::{sync::Arc, time::Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    adapters::{
        containerd::Containerd,
        registry::{Registry, ResolvedRef},
    },
    config::PrepullPolicy,
    core::policy::Policy,
    metrics::PrepullMetrics,
    prepull::{Options, PrepullError, Puller},
};

/// Runs the policy until `stop` turns true.
pub async fn keep_warm(
    socket: std::path::PathBuf,
    namespace: String,
    policy: PrepullPolicy,
    registry: Arc<Registry>,
    metrics: PrepullMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let opts = Options {
        concurrency: policy.concurrency,
        max_rate: policy.max_rate,
    };
    let mut state = Policy::new(&policy.images, policy.timing, Instant::now());
    publish(&state, &metrics);
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
                            fail(&mut state, r, &e);
                        }
                    }
                }
            }
            if let Some(p) = &puller {
                let lost = pass(p, &mut state, &metrics, &due).await;
                if lost {
                    // containerd went away: connect afresh next time.
                    puller = None;
                }
            }
            publish(&state, &metrics);
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

fn publish(state: &Policy, metrics: &PrepullMetrics) {
    let c = state.counts();
    for (label, n) in [
        ("ready", c.ready),
        ("failed", c.failed),
        ("pending", c.pending),
    ] {
        metrics
            .images
            .with_label_values(&[label])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
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
fn fail(state: &mut Policy, reference: &str, e: &PrepullError) {
    let delay = state.failed(reference, e.metric_label(), Instant::now());
    warn!(image = reference, error = %e, retry_in_s = delay.as_secs_f64(), "pre-pull failed");
}

/// One pass over the due references; true when containerd was lost.
async fn pass(p: &Puller, state: &mut Policy, metrics: &PrepullMetrics, due: &[String]) -> bool {
    let mut to_pull: Vec<ResolvedRef> = Vec::new();
    let mut lost = false;
    for r in due {
        let resolved = match p.registry().resolve(r).await {
            Ok(x) => x,
            Err(e) => {
                let e = PrepullError::from(e);
                count(metrics, &e);
                fail(state, r, &e);
                continue;
            }
        };
        // Already there (pulled before, by us or by kubelet)? Nothing to fetch.
        match p.containerd().get_image(&resolved.name).await {
            Ok(Some(rec)) if rec.target.digest == resolved.manifest_desc.digest => {
                state.ready(r, &resolved.manifest_desc.digest, Instant::now());
            }
            Ok(_) => to_pull.push(resolved),
            Err(e) => {
                lost |= e.is_disconnect();
                let e = PrepullError::from(e);
                count(metrics, &e);
                fail(state, r, &e);
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
                fail(state, &r.name, &e);
            }
        }
    }
    lost
}
