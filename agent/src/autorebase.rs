//! The agent's automatic rebase at work: follows the run-image tags of `[rebase]` and, when one
//! moves, rebases every local app image that sits on it (in place, or under a new tag), once per
//! change. The decisions are in [`crate::core::autorebase`]; this loop resolves the tags at the
//! registry, reads the image records out of containerd, calls [`crate::rebase`] (which fetches
//! the new run image once for the node: later rebases find its blobs local) and publishes the
//! metrics.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        containerd::{Containerd, ContainerdError, ImageRecord},
        registry::{self, Registry},
    },
    config::RebasePolicy,
    core::{
        autorebase::{self as policy, App, AutoRebase, Finished, RunImage, Task},
        oci,
        rebase::inspect_app,
    },
    metrics::RebaseMetrics,
    rebase::{self, LABEL_REBASED_FROM, LABEL_ROLLBACK_OF, LABEL_RUN_IMAGE},
};

/// The age gauge is recomputed this often between polls (from the last list of images, without
/// asking containerd), so it grows smoothly however long the poll interval.
const VIEW_EVERY: Duration = Duration::from_secs(15);
/// The loop never sleeps less than this: a wake the state machine got wrong must not spin.
const MIN_WAKE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum AutoRebaseError {
    #[error("cannot list the node's images: {0}")]
    List(#[source] ContainerdError),
    #[error("cannot read image {image}: {source}")]
    Read {
        image: String,
        #[source]
        source: rebase::Error,
    },
    #[error("lost containerd while rebasing {image}: {source}")]
    Lost {
        image: String,
        #[source]
        source: rebase::Error,
    },
}

/// What an image's manifest and config say about its run image (cached per target digest:
/// records change targets, blobs never change).
#[derive(Debug, Clone)]
struct RunImageOf {
    digest: Option<String>,
    layers: Vec<String>,
    names: Vec<String>,
}

/// Runs the policy until `stop` turns true.
pub async fn follow(
    socket: std::path::PathBuf,
    namespace: String,
    policy: RebasePolicy,
    registry: Arc<Registry>,
    metrics: RebaseMetrics,
    stop: watch::Receiver<bool>,
) {
    info!(follow = ?policy.follow, mode = ?policy.mode, poll_s = policy.timing.poll.as_secs(), "rebase policy started");
    Follower {
        state: AutoRebase::new(
            &policy.follow,
            policy.mode.clone(),
            policy.timing,
            Instant::now(),
        ),
        socket,
        namespace,
        registry,
        metrics,
        containerd: None,
        cache: HashMap::new(),
    }
    .run(stop)
    .await
}

/// The loop's state: the decisions, and what it talks to.
struct Follower {
    state: AutoRebase,
    socket: std::path::PathBuf,
    namespace: String,
    registry: Arc<Registry>,
    metrics: RebaseMetrics,
    /// Connected on first use; dropped when containerd goes away, connected afresh next time.
    containerd: Option<Containerd>,
    /// What each image (by target digest) says about its run image.
    cache: HashMap<String, Option<RunImageOf>>,
}

impl Follower {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut apps: Option<Vec<App>> = None;
        loop {
            let polled = self.poll_due().await;
            let retry_due = self.state.next_wake().is_some_and(|w| w <= Instant::now());
            if polled || retry_due || apps.is_none() {
                match self.pass(&stop).await {
                    Ok(list) => apps = Some(list),
                    Err(e) => {
                        warn!(error = %e, "automatic rebase: containerd is not answering; trying again at the next poll");
                        self.containerd = None;
                    }
                }
            }
            if let Some(list) = &apps {
                let view = self.state.view(list, Instant::now());
                self.metrics
                    .set_images_by_run_image(&view.images_by_run_digest);
                self.metrics
                    .oldest_unpatched_age
                    .set(view.oldest_unpatched.as_secs_f64());
            }
            let now = tokio::time::Instant::now();
            let wake = self
                .state
                .next_wake()
                .map(tokio::time::Instant::from_std)
                .map_or(now + VIEW_EVERY, |w| w.min(now + VIEW_EVERY))
                .max(now + MIN_WAKE);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Resolves the tags that are due; true when at least one answered.
    async fn poll_due(&mut self) -> bool {
        let mut answered = false;
        for tag in self.state.due_polls(Instant::now()) {
            match self.registry.resolve(&tag).await {
                Ok(r) => {
                    answered = true;
                    self.metrics.polls.with_label_values(&["ok"]).inc();
                    let digest = r.manifest_desc.digest.clone();
                    let run = RunImage {
                        digest: digest.clone(),
                        layers: r.manifest.layers.iter().map(|l| l.digest.clone()).collect(),
                    };
                    if self.state.polled(&tag, run, Instant::now()) {
                        info!(run_image = %tag, %digest, "the followed run image moved");
                    } else {
                        debug!(run_image = %tag, %digest, "polled the followed run image");
                    }
                }
                Err(e) => {
                    let reason = e.metric_label();
                    self.metrics.polls.with_label_values(&[reason]).inc();
                    let delay = self.state.poll_failed(&tag, reason, Instant::now());
                    warn!(run_image = %tag, error = %e, retry_in_s = delay.as_secs_f64(), "resolving a followed run image failed");
                }
            }
        }
        answered
    }

    /// One pass: lists the node's app images, rebases those that are due, and returns the list
    /// as it is afterwards.
    async fn pass(&mut self, stop: &watch::Receiver<bool>) -> Result<Vec<App>, AutoRebaseError> {
        let c = match &self.containerd {
            Some(c) => c.clone(),
            None => {
                let c = Containerd::connect(&self.socket, &self.namespace)
                    .await
                    .map_err(AutoRebaseError::List)?;
                self.containerd = Some(c.clone());
                c
            }
        };
        let apps = read_apps(&c, &mut self.cache).await?;
        let tasks = self.state.due(&apps, Instant::now());
        if tasks.is_empty() {
            return Ok(apps);
        }
        for task in &tasks {
            if *stop.borrow() {
                break;
            }
            run_task(&c, &self.registry, &mut self.state, &self.metrics, task).await?;
        }
        // The records moved: the view must show it.
        read_apps(&c, &mut self.cache).await
    }
}

/// Rebases one image onto the followed tag and tells the state machine what happened.
async fn run_task(
    c: &Containerd,
    registry: &Arc<Registry>,
    state: &mut AutoRebase,
    metrics: &RebaseMetrics,
    task: &Task,
) -> Result<(), AutoRebaseError> {
    let opts = rebase::Options {
        run_image: Some(task.follow.clone()),
        output: match &task.output {
            policy::Output::InPlace => rebase::Output::InPlace,
            policy::Output::Tag(name) => rebase::Output::Tag(name.clone()),
        },
        dry_run: false,
        force: false,
    };
    // The policy found this image on a digest of the followed tag (or its metadata names the
    // tag): the tag counts as a name of its run image, whatever the metadata calls it.
    let follow = task.follow.clone();
    let names_match = move |allowed: &str, new: &str| {
        rebase::same_repository(allowed, new) || rebase::same_image(new, &follow)
    };
    let result = rebase::rebase_with_names(c, registry, &task.image, &opts, &names_match).await;
    let finished = match &result {
        Ok(o) if o.already_current => Finished::Current {
            run_digest: o.new_run_image_digest.clone(),
        },
        Ok(o) => Finished::Rebased {
            run_digest: o.new_run_image_digest.clone(),
        },
        Err(e) => Finished::Failed {
            reason: e.metric_label().to_string(),
        },
    };
    let label = match &finished {
        Finished::Rebased { .. } => "rebased",
        Finished::Current { run_digest } if *run_digest == task.digest => "current",
        Finished::Current { .. } => policy::MOVED,
        Finished::Failed { reason } => reason.as_str(),
    };
    metrics.results.with_label_values(&[label]).inc();
    let retry_in = state.finished(task, &finished, Instant::now());
    match result {
        Ok(o) if !o.already_current => info!(
            image = %task.image,
            name = %o.name,
            run_image = %task.follow,
            old_run_image = %o.old_run_image,
            run_image_digest = %o.new_run_image_digest,
            old_digest = %o.old_digest,
            new_digest = %o.new_digest,
            bytes_fetched = o.bytes_fetched,
            seconds = o.seconds,
            "rebased onto the followed run image"
        ),
        Ok(o) => info!(
            image = %task.image,
            run_image = %task.follow,
            run_image_digest = %o.new_run_image_digest,
            polled_digest = %task.digest,
            retry_in_s = retry_in.map(|d| d.as_secs_f64()),
            "the image sits on the run image already"
        ),
        Err(e) => {
            warn!(
                image = %task.image,
                run_image = %task.follow,
                error = %e,
                retry_in_s = retry_in.map(|d| d.as_secs_f64()),
                "automatic rebase failed"
            );
            if matches!(&e, rebase::Error::Containerd(ce) if ce.is_disconnect()) {
                return Err(AutoRebaseError::Lost {
                    image: task.image.clone(),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// The node's CNB app image records, as the policy sees them.
async fn read_apps(
    c: &Containerd,
    cache: &mut HashMap<String, Option<RunImageOf>>,
) -> Result<Vec<App>, AutoRebaseError> {
    let records = c.list_images().await.map_err(AutoRebaseError::List)?;
    let mut live = HashSet::new();
    let mut apps = Vec::new();
    for r in &records {
        live.insert(r.target.digest.clone());
        let of = match cache.get(&r.target.digest) {
            Some(of) => of.clone(),
            None => match run_image_of(c, r).await {
                Ok(of) => {
                    cache.insert(r.target.digest.clone(), of.clone());
                    of
                }
                // Content that is missing or being written: not cached, read again next time.
                Err(AutoRebaseError::Read { source, .. }) if !matches!(&source, rebase::Error::Containerd(e) if e.is_disconnect()) =>
                {
                    debug!(image = %r.name, error = %source, "skipping an image that cannot be read now");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let Some(of) = of else { continue };
        apps.push(App {
            name: r.name.clone(),
            target: r.target.digest.clone(),
            tagged: is_tag_name(&r.name),
            run_digest: of.digest,
            run_layers: of.layers,
            run_names: of.names,
            rebased_from: r.labels.get(LABEL_REBASED_FROM).cloned(),
            rebased_onto: r.labels.get(LABEL_RUN_IMAGE).cloned(),
            rollback: r.labels.contains_key(LABEL_ROLLBACK_OF),
        });
    }
    cache.retain(|digest, _| live.contains(digest));
    Ok(apps)
}

/// Whether a record's name is a tag reference (`registry/repository:tag`), not one of CRI's
/// digest aliases (`repo@sha256:…`, `sha256:<config>`).
fn is_tag_name(name: &str) -> bool {
    !name.contains('@') && registry::normalize(name).is_ok_and(|n| n == name)
}

/// What the record's image says about its run image; None for an image that is not a CNB app
/// (or whose labels cannot be used: `ragent images` shows why).
async fn run_image_of(
    c: &Containerd,
    r: &ImageRecord,
) -> Result<Option<RunImageOf>, AutoRebaseError> {
    let (bytes, _) = rebase::read_image(c, &r.name, &r.target)
        .await
        .map_err(|source| AutoRebaseError::Read {
            image: r.name.clone(),
            source,
        })?;
    let Ok(view) = inspect_app(&bytes, None) else {
        return Ok(None);
    };
    let Ok(manifest) = oci::parse_manifest(&bytes.manifest_digest, &bytes.manifest) else {
        return Ok(None);
    };
    let normalized = |n: String| registry::normalize(&n).unwrap_or(n);
    Ok(Some(RunImageOf {
        digest: policy::reference_digest(&view.reference).map(str::to_string),
        layers: manifest
            .layers
            .iter()
            .take(view.top_index + 1)
            .map(|l| l.digest.clone())
            .collect(),
        names: view
            .run_image
            .into_iter()
            .chain(view.mirrors)
            .map(normalized)
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tag_names_are_rebased_on_their_own() {
        assert!(is_tag_name("127.0.0.1:5000/ragent/app-py-web:v1"));
        assert!(is_tag_name("docker.io/library/busybox:latest"));
        assert!(!is_tag_name(
            "127.0.0.1:5000/ragent/app-py-web@sha256:0000000000000000000000000000000000000000000000000000000000000000"
        ));
        assert!(!is_tag_name(
            "sha256:0000000000000000000000000000000000000000000000000000000000000000"
        ));
        // Not normalized (kubelet's records always are): left alone.
        assert!(!is_tag_name("busybox"));
    }
}
