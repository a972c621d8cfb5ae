//! The agent's automatic rebase as a state machine (the loop that drives it is
//! `crate::autorebase`): which followed run-image tags are due for a poll, which local app
//! images sit on a followed run image whose tag has moved, when a failed poll or rebase is tried
//! again, and the node's view (images per run-image digest, how long the oldest unpatched image
//! has waited). Time is passed in; nothing here talks to a registry or containerd.
//!
//! Why it never loops: an image is rebased only when the followed tag's digest at the last poll
//! is not the run image the image sits on (its `runImage.reference`, or the same run-image
//! layers). A rebase in place makes that digest the image's reference; in tag mode it writes an
//! output that sits on it, which the next decision finds. An attempt that found the image
//! current, or failed, is remembered for that image record and that digest, so the next poll
//! does not repeat it: a failure is tried again only after a backoff, and nothing is tried
//! again once the record or the tag's digest has moved on.
use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use super::{policy::doubling, rebase::registry_of};

/// The label a registry's 429 answer carries (`RegistryError::metric_label`): it pauses every
/// poll and rebase that goes to that registry.
pub const RATE_LIMITED: &str = "rate_limited";
/// The failure reason of an attempt whose rebase met another digest of the tag than the poll
/// had seen (the tag moved in between, or the registry failed and the node's own record of the
/// tag was used): the tag is polled again and the image tried again after a backoff.
pub const MOVED: &str = "run_image_moved";
/// How many digests of a tag are remembered (a tag that moves daily for a year stays far below).
pub const SEEN_MAX: usize = 512;

/// Where a rebase puts its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The image's own name moves to the result (its previous image stays under the rollback
    /// name).
    InPlace,
    /// `repo:tag` is written as `repo:tag<suffix>`; the source stays as it is.
    Tag { suffix: String },
}

/// Where one rebase puts its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    InPlace,
    Tag(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often each followed tag is resolved.
    pub poll: Duration,
    /// A failed poll or rebase is tried again after `retry_min`, doubling up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Timing {
    fn backoff(&self, attempts: u32) -> Duration {
        doubling(self.retry_min, self.retry_max, attempts)
    }
}

/// A followed tag as the registry answered: the manifest for this node and its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunImage {
    pub digest: String,
    /// Compressed layer digests, bottom to top.
    pub layers: Vec<String>,
}

/// One image record of the node that is a CNB app, as the adapter read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct App {
    /// The record's name.
    pub name: String,
    /// The digest the record points at (a manifest or an index).
    pub target: String,
    /// The name is a tag reference (`registry/repository:tag`). CRI's digest aliases
    /// (`repo@sha256:…`, `sha256:<config>`) are other names of the same image: never rebased
    /// on their own.
    pub tagged: bool,
    /// The digest `runImage.reference` names.
    pub run_digest: Option<String>,
    /// The app's layers up to and including `runImage.topLayer` (compressed digests).
    pub run_layers: Vec<String>,
    /// `runImage.image` and its mirrors (and the pre-0.12 `stack.runImage`), normalized.
    pub run_names: Vec<String>,
    /// The record's `io.ragent.rebase.from` label (`name@digest` of what it was rebased from).
    pub rebased_from: Option<String>,
    /// The record's `io.ragent.rebase.run-image` label (`name@digest` of the run image).
    pub rebased_onto: Option<String>,
    /// The record keeps the image an in-place rebase replaced (`io.ragent.rebase.rollback-of`).
    pub rollback: bool,
}

/// A rebase to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub image: String,
    /// What the record pointed at when the task was planned.
    pub target: String,
    /// The followed tag: the run image to rebase onto.
    pub follow: String,
    /// The tag's digest at the last poll.
    pub digest: String,
    pub output: Output,
}

/// What a rebase did, as far as the state machine cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// A new image was written onto the run image `run_digest`.
    Rebased {
        run_digest: String,
    },
    /// The image sat on `run_digest` already: nothing was written.
    Current {
        run_digest: String,
    },
    Failed {
        reason: String,
    },
}

/// The node as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// App images (tagged records, rollback records left out) per run-image digest they sit on.
    pub images_by_run_digest: BTreeMap<String, usize>,
    /// Images that sit on a superseded digest of a followed tag.
    pub unpatched: usize,
    /// How long the oldest of them has waited since ragent first saw the newer digest.
    pub oldest_unpatched: Duration,
}

#[derive(Debug, Clone)]
struct Follow {
    tag: String,
    registry: String,
    current: Option<RunImage>,
    /// When `current` was first seen (since the tag last moved).
    since: Option<Instant>,
    /// Every digest the tag has had while ragent watched (bounded by [`SEEN_MAX`]).
    seen: VecDeque<String>,
    next_poll: Instant,
    failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tried {
    /// The rebase found the image on the run image already.
    Current,
    Failed {
        failures: u32,
        next: Instant,
    },
}

/// The last attempt on one image record, valid while the record and the tag's digest stay.
#[derive(Debug, Clone)]
struct Attempt {
    target: String,
    follow: String,
    digest: String,
    tried: Tried,
}

impl Attempt {
    fn of(task: &Task, tried: Tried) -> Attempt {
        Attempt {
            target: task.target.clone(),
            follow: task.follow.clone(),
            digest: task.digest.clone(),
            tried,
        }
    }
}

/// A registry that answered 429: nothing goes to it until `until`.
#[derive(Debug, Clone, Copy)]
struct Pause {
    until: Instant,
    count: u32,
}

#[derive(Debug, Clone)]
enum Status<'a> {
    /// Not an image the policy rebases, or not on a followed run image.
    Ignored,
    /// On a followed run image whose tag has not been resolved yet.
    Waiting,
    /// On the tag's current digest (or patched: its output is, or a rebase said so).
    Current,
    Unpatched {
        follow: &'a Follow,
        current: &'a RunImage,
    },
}

#[derive(Debug, Clone)]
pub struct AutoRebase {
    follows: Vec<Follow>,
    mode: Mode,
    timing: Timing,
    attempts: BTreeMap<String, Attempt>,
    paused: BTreeMap<String, Pause>,
}

/// The name part of `name@digest`.
fn name_part(reference: &str) -> &str {
    reference.split_once('@').map_or(reference, |(n, _)| n)
}

/// The digest a `runImage.reference` names: a bare digest or `name@digest`.
pub fn reference_digest(reference: &str) -> Option<&str> {
    let d = reference.rsplit_once('@').map_or(reference, |(_, d)| d);
    d.starts_with("sha256:").then_some(d)
}

impl AutoRebase {
    /// Every tag is due for a poll at once. `tags` are normalized tag references; duplicates
    /// are dropped.
    pub fn new(tags: &[String], mode: Mode, timing: Timing, now: Instant) -> AutoRebase {
        let mut follows: Vec<Follow> = Vec::new();
        for t in tags {
            if !follows.iter().any(|f| &f.tag == t) {
                follows.push(Follow {
                    tag: t.clone(),
                    registry: registry_of(t).to_string(),
                    current: None,
                    since: None,
                    seen: VecDeque::new(),
                    next_poll: now,
                    failures: 0,
                });
            }
        }
        AutoRebase {
            follows,
            mode,
            timing,
            attempts: BTreeMap::new(),
            paused: BTreeMap::new(),
        }
    }

    fn follow_mut(&mut self, tag: &str) -> Option<&mut Follow> {
        self.follows.iter_mut().find(|f| f.tag == tag)
    }

    fn pause_until(&self, registry: &str) -> Option<Instant> {
        self.paused.get(registry).map(|p| p.until)
    }

    fn is_paused(&self, registry: &str, now: Instant) -> bool {
        self.pause_until(registry).is_some_and(|u| u > now)
    }

    /// The tags due for a poll at `now` (a rate-limited registry's wait until its pause ends).
    pub fn due_polls(&self, now: Instant) -> Vec<String> {
        self.follows
            .iter()
            .filter(|f| f.next_poll <= now && !self.is_paused(&f.registry, now))
            .map(|f| f.tag.clone())
            .collect()
    }

    /// The registry answered `tag` with `run`. Returns whether the tag moved since the last
    /// poll (false on the first).
    pub fn polled(&mut self, tag: &str, run: RunImage, now: Instant) -> bool {
        let poll = self.timing.poll;
        let Some(f) = self.follow_mut(tag) else {
            return false;
        };
        let registry = f.registry.clone();
        f.failures = 0;
        f.next_poll = now + poll;
        let before = f.current.as_ref().map(|c| c.digest.clone());
        if before.as_deref() != Some(run.digest.as_str()) {
            f.since = Some(now);
        }
        if !f.seen.contains(&run.digest) {
            if f.seen.len() >= SEEN_MAX {
                f.seen.pop_front();
            }
            f.seen.push_back(run.digest.clone());
        }
        let moved = before.is_some_and(|b| b != run.digest);
        f.current = Some(run);
        // The registry answers again: a rate-limit pause starts over from the shortest.
        self.paused.remove(&registry);
        moved
    }

    /// The poll of `tag` failed with `reason` (a metric label). Returns the delay before the
    /// next poll: the backoff, and for a 429 at least the registry's pause.
    pub fn poll_failed(&mut self, tag: &str, reason: &str, now: Instant) -> Duration {
        let timing = self.timing;
        let Some(f) = self.follow_mut(tag) else {
            return Duration::ZERO;
        };
        f.failures = f.failures.saturating_add(1);
        let mut delay = timing.backoff(f.failures);
        let registry = f.registry.clone();
        if reason == RATE_LIMITED {
            delay = delay.max(self.pause(&registry, now));
        }
        if let Some(f) = self.follow_mut(tag) {
            f.next_poll = now + delay;
        }
        delay
    }

    /// A 429 from `registry`: pause it, 1 s doubling per 429 in a row up to the retry cap.
    fn pause(&mut self, registry: &str, now: Instant) -> Duration {
        let count = self
            .paused
            .get(registry)
            .map_or(1, |p| p.count.saturating_add(1));
        let delay = self.timing.backoff(count);
        self.paused.insert(
            registry.to_string(),
            Pause {
                until: now + delay,
                count,
            },
        );
        delay
    }

    fn is_subject(&self, app: &App) -> bool {
        app.tagged
            && !app.rollback
            // Tag mode never takes its own outputs (or any rebase's) as sources: they would
            // be rebased into outputs of outputs.
            && !(matches!(self.mode, Mode::Tag { .. }) && app.rebased_from.is_some())
    }

    /// The output tag mode writes for `app`, when one from this very record exists.
    fn output_of<'a>(&self, app: &App, apps: &'a [App]) -> Option<&'a App> {
        let Mode::Tag { suffix } = &self.mode else {
            return None;
        };
        let name = format!("{}{suffix}", app.name);
        let from = format!("{}@{}", app.name, app.target);
        apps.iter()
            .find(|o| o.name == name && o.rebased_from.as_deref() == Some(from.as_str()))
    }

    /// The followed tag an app sits on: its metadata names the tag (runImage.image or a
    /// mirror), its run-image digest is one the tag has had while ragent watched, or ragent
    /// rebased it (or, in tag mode, its output) onto the tag before. The first in the
    /// config's order wins.
    fn follow_of(&self, app: &App, apps: &[App]) -> Option<&Follow> {
        let output = self.output_of(app, apps);
        self.follows.iter().find(|f| {
            app.run_names.contains(&f.tag)
                || app.run_digest.as_ref().is_some_and(|d| f.seen.contains(d))
                || [Some(app), output]
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.rebased_onto.as_deref())
                    .any(|r| name_part(r) == f.tag)
        })
    }

    fn sits_on(app: &App, run: &RunImage) -> bool {
        app.run_digest.as_deref() == Some(run.digest.as_str())
            || (!app.run_layers.is_empty() && app.run_layers == run.layers)
    }

    fn status<'a>(&'a self, app: &App, apps: &[App]) -> Status<'a> {
        if !self.is_subject(app) {
            return Status::Ignored;
        }
        let Some(follow) = self.follow_of(app, apps) else {
            return Status::Ignored;
        };
        let Some(current) = &follow.current else {
            return Status::Waiting;
        };
        if Self::sits_on(app, current)
            || self
                .output_of(app, apps)
                .is_some_and(|o| Self::sits_on(o, current))
        {
            return Status::Current;
        }
        if let Some(a) = self.attempts.get(&app.name)
            && a.tried == Tried::Current
            && a.target == app.target
            && a.digest == current.digest
        {
            return Status::Current;
        }
        Status::Unpatched { follow, current }
    }

    /// The rebases due at `now`: every image that sits on a superseded digest of a followed
    /// tag, except those whose last attempt on this record and digest failed and waits out
    /// its backoff, and those whose registry is paused. Forgets attempts that no longer apply.
    pub fn due(&mut self, apps: &[App], now: Instant) -> Vec<Task> {
        let mut keep = BTreeMap::new();
        let mut tasks = Vec::new();
        for app in apps {
            let Status::Unpatched { follow, current } = self.status(app, apps) else {
                if let Some(a) = self.attempts.get(&app.name)
                    && a.tried == Tried::Current
                {
                    keep.insert(app.name.clone(), a.clone());
                }
                continue;
            };
            let attempt = self
                .attempts
                .get(&app.name)
                .filter(|a| a.target == app.target && a.digest == current.digest);
            if let Some(a) = attempt {
                keep.insert(app.name.clone(), a.clone());
            }
            let waiting = matches!(attempt, Some(Attempt { tried: Tried::Failed { next, .. }, .. }) if *next > now);
            if waiting || self.is_paused(&follow.registry, now) {
                continue;
            }
            tasks.push(Task {
                image: app.name.clone(),
                target: app.target.clone(),
                follow: follow.tag.clone(),
                digest: current.digest.clone(),
                output: match &self.mode {
                    Mode::InPlace => Output::InPlace,
                    Mode::Tag { suffix } => Output::Tag(format!("{}{suffix}", app.name)),
                },
            });
        }
        self.attempts = keep;
        tasks
    }

    /// Records what a task's rebase did. Returns the delay before it is tried again (failures
    /// only).
    pub fn finished(&mut self, task: &Task, result: &Finished, now: Instant) -> Option<Duration> {
        let seen_other = match result {
            Finished::Rebased { run_digest } | Finished::Current { run_digest } => {
                *run_digest != task.digest
            }
            Finished::Failed { .. } => false,
        };
        if seen_other {
            // The rebase met another digest than the poll: learn the truth from the registry
            // at once rather than trust either.
            if let Some(f) = self.follow_mut(&task.follow) {
                f.next_poll = now;
            }
        }
        match result {
            Finished::Rebased { .. } => {
                self.attempts.remove(&task.image);
                None
            }
            Finished::Current { .. } if !seen_other => {
                self.attempts
                    .insert(task.image.clone(), Attempt::of(task, Tried::Current));
                None
            }
            Finished::Current { .. } => Some(self.failed(task, MOVED, now)),
            Finished::Failed { reason } => Some(self.failed(task, reason, now)),
        }
    }

    fn failed(&mut self, task: &Task, reason: &str, now: Instant) -> Duration {
        let failures = match self.attempts.get(&task.image) {
            Some(Attempt {
                target,
                digest,
                tried: Tried::Failed { failures, .. },
                ..
            }) if *target == task.target && *digest == task.digest => failures.saturating_add(1),
            _ => 1,
        };
        let mut delay = self.timing.backoff(failures);
        if reason == RATE_LIMITED {
            delay = delay.max(self.pause(registry_of(&task.follow), now));
        }
        let next = now + delay;
        self.attempts.insert(
            task.image.clone(),
            Attempt::of(task, Tried::Failed { failures, next }),
        );
        delay
    }

    /// When something next falls due: a poll, or a failed rebase's retry (each no earlier than
    /// its registry's pause).
    pub fn next_wake(&self) -> Option<Instant> {
        let after_pause = |at: Instant, registry: &str| match self.pause_until(registry) {
            Some(u) => at.max(u),
            None => at,
        };
        let polls = self
            .follows
            .iter()
            .map(|f| after_pause(f.next_poll, &f.registry));
        let retries = self.attempts.values().filter_map(|a| match a.tried {
            Tried::Failed { next, .. } => Some(after_pause(next, registry_of(&a.follow))),
            Tried::Current => None,
        });
        polls.chain(retries).min()
    }

    /// The node as the policy sees it at `now`.
    pub fn view(&self, apps: &[App], now: Instant) -> View {
        let mut v = View::default();
        for app in apps.iter().filter(|a| a.tagged && !a.rollback) {
            if let Some(d) = &app.run_digest {
                *v.images_by_run_digest.entry(d.clone()).or_default() += 1;
            }
            if let Status::Unpatched { follow, .. } = self.status(app, apps) {
                v.unpatched += 1;
                let age = follow
                    .since
                    .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                v.oldest_unpatched = v.oldest_unpatched.max(age);
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &str = "reg:5000/ragent/run:follow";
    const REG: &str = "reg:5000";

    fn timing() -> Timing {
        Timing {
            poll: Duration::from_secs(1),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
        }
    }

    fn run(n: u8) -> RunImage {
        RunImage {
            digest: format!("sha256:run{n}"),
            layers: vec!["sha256:base".into(), format!("sha256:release{n}")],
        }
    }

    /// An app on run image `n`, named after a tag the policy does not follow (as the fixtures'
    /// apps: `runImage.image` is run:v1, the policy follows another tag).
    fn app(name: &str, n: u8) -> App {
        App {
            name: format!("{REG}/ragent/{name}:v1"),
            target: format!("sha256:{name}-on-{n}"),
            tagged: true,
            run_digest: Some(run(n).digest),
            run_layers: run(n).layers,
            run_names: vec![format!("{REG}/ragent/run:v1")],
            ..Default::default()
        }
    }

    /// What a rebase in place does to an app: a new target, the new reference and layers.
    fn rebased_in_place(a: &mut App, onto: &RunImage) {
        a.target = format!("{}+{}", a.name, onto.digest);
        a.run_digest = Some(onto.digest.clone());
        a.run_layers = onto.layers.clone();
        a.rebased_from = Some(format!("{}@sha256:before", a.name));
        a.rebased_onto = Some(format!("{TAG}@{}", onto.digest));
    }

    /// An app whose metadata names the followed tag, on a run image the tag never had.
    fn naming_the_tag(name: &str, run_digest: &str) -> App {
        App {
            run_names: vec![TAG.into()],
            run_digest: Some(run_digest.into()),
            run_layers: vec![],
            ..app(name, 9)
        }
    }

    fn policy(now: Instant) -> AutoRebase {
        AutoRebase::new(&[TAG.to_string()], Mode::InPlace, timing(), now)
    }

    /// The policy after the tag moved from run1 to run2 at `now`, and web on run1.
    fn moved_once(now: Instant) -> (AutoRebase, Vec<App>) {
        let mut p = policy(now);
        p.polled(TAG, run(1), now);
        p.polled(TAG, run(2), now);
        (p, vec![app("web", 1)])
    }

    fn fail(p: &mut AutoRebase, task: &Task, now: Instant) -> Option<Duration> {
        let reason = "server".to_string();
        p.finished(task, &Finished::Failed { reason }, now)
    }

    /// One round of the loop: poll what is due at the registry's `digest`, rebase (in place,
    /// always succeeding) what is due. Returns the rebases done.
    fn round(p: &mut AutoRebase, apps: &mut [App], reg: &RunImage, now: Instant) -> usize {
        for t in p.due_polls(now) {
            p.polled(&t, reg.clone(), now);
        }
        let tasks = p.due(apps, now);
        let mut n = 0;
        for t in &tasks {
            let a = apps.iter_mut().find(|a| a.name == t.image).expect("app");
            let result = if a.run_digest.as_deref() == Some(reg.digest.as_str()) {
                Finished::Current {
                    run_digest: reg.digest.clone(),
                }
            } else {
                rebased_in_place(a, reg);
                n += 1;
                Finished::Rebased {
                    run_digest: reg.digest.clone(),
                }
            };
            p.finished(t, &result, now);
        }
        n
    }

    #[test]
    fn a_moved_tag_rebases_each_image_once_and_back_and_forth_once_per_change() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        let mut apps = vec![app("web", 1), app("worker", 1)];
        let s = Duration::from_secs;
        // Nothing changes for a while: nothing happens.
        for i in 0..5 {
            assert_eq!(round(&mut p, &mut apps, &run(1), t0 + s(i)), 0);
        }
        // Forward, back, forward: one rebase per image per change, none in between.
        let mut t = 4;
        for n in [2, 1, 2] {
            t += 1;
            assert_eq!(round(&mut p, &mut apps, &run(n), t0 + s(t)), 2, "to {n}");
            for _ in 0..5 {
                t += 1;
                assert_eq!(round(&mut p, &mut apps, &run(n), t0 + s(t)), 0);
            }
            assert!(apps.iter().all(|a| a.run_digest == Some(run(n).digest)));
        }
    }

    #[test]
    fn images_match_by_name_by_a_digest_the_tag_had_or_by_ragents_label() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        let by_name = naming_the_tag("named", "sha256:older");
        let by_label = App {
            rebased_onto: Some(format!("{TAG}@sha256:older")),
            run_digest: Some("sha256:older".into()),
            run_layers: vec![],
            ..app("labelled", 9)
        };
        let by_digest = app("web", 1);
        let unrelated = app("other", 7);
        let apps = vec![by_name, by_label, by_digest, unrelated];
        // Before the first poll nothing is known: no task, and the tag's digests are unknown.
        assert!(p.due(&apps, t0).is_empty());
        p.polled(TAG, run(1), t0);
        let due: Vec<String> = p.due(&apps, t0).into_iter().map(|t| t.image).collect();
        // web sits on run1, which the tag names: current. The other two are behind.
        assert_eq!(
            due,
            [
                format!("{REG}/ragent/named:v1"),
                format!("{REG}/ragent/labelled:v1")
            ]
        );
        p.polled(TAG, run(2), t0);
        assert_eq!(p.due(&apps, t0).len(), 3, "web is followed through run1");
    }

    #[test]
    fn digest_names_and_rollback_records_are_never_rebased() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        p.polled(TAG, run(1), t0);
        p.polled(TAG, run(2), t0);
        let apps = vec![
            App {
                name: format!("{REG}/ragent/web@sha256:abc"),
                tagged: false,
                ..app("web", 1)
            },
            App {
                name: format!("{REG}/ragent/web:v1-ragent-rollback"),
                rollback: true,
                ..app("web", 1)
            },
        ];
        assert!(p.due(&apps, t0).is_empty());
        let v = p.view(&apps, t0);
        assert_eq!(v.unpatched, 0);
        assert!(v.images_by_run_digest.is_empty());
    }

    #[test]
    fn same_run_image_layers_under_another_reference_count_as_current() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        p.polled(TAG, run(1), t0);
        let a = App {
            run_layers: run(2).layers,
            ..naming_the_tag("web", "sha256:same-layers-other-manifest")
        };
        p.polled(TAG, run(2), t0);
        assert!(p.due(std::slice::from_ref(&a), t0).is_empty());
    }

    #[test]
    fn tag_mode_writes_an_output_once_and_never_takes_outputs_as_sources() {
        let t0 = Instant::now();
        let mut p = AutoRebase::new(
            &[TAG.to_string()],
            Mode::Tag {
                suffix: "-patched".into(),
            },
            timing(),
            t0,
        );
        let src = app("web", 1);
        p.polled(TAG, run(1), t0);
        p.polled(TAG, run(2), t0);
        let tasks = p.due(std::slice::from_ref(&src), t0);
        assert_eq!(tasks.len(), 1);
        assert_eq!(
            tasks[0].output,
            Output::Tag(format!("{REG}/ragent/web:v1-patched"))
        );
        // The output exists now, sitting on run2 and labelled with its source.
        let out = App {
            name: format!("{REG}/ragent/web:v1-patched"),
            target: "sha256:web-on-2".into(),
            run_digest: Some(run(2).digest),
            run_layers: run(2).layers,
            rebased_from: Some(format!("{}@{}", src.name, src.target)),
            rebased_onto: Some(format!("{TAG}@{}", run(2).digest)),
            ..app("web", 2)
        };
        p.finished(
            &tasks[0],
            &Finished::Rebased {
                run_digest: run(2).digest,
            },
            t0,
        );
        let apps = vec![src.clone(), out.clone()];
        assert!(
            p.due(&apps, t0).is_empty(),
            "patched, and the output is no source"
        );
        assert_eq!(p.view(&apps, t0).unpatched, 0);
        // Another patch: the output is rewritten from the same source.
        p.polled(TAG, run(3), t0);
        let again = p.due(&apps, t0);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].image, src.name);
        // A new source image (kubelet pulled a new build): its output is stale.
        let rebuilt = App {
            target: "sha256:web-rebuilt".into(),
            ..src
        };
        p.polled(TAG, run(2), t0);
        assert_eq!(p.due(&[rebuilt, out], t0).len(), 1);
    }

    #[test]
    fn an_image_found_current_is_not_tried_again_until_something_moves() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        let a = naming_the_tag("web", "sha256:unknown");
        p.polled(TAG, run(1), t0);
        let tasks = p.due(std::slice::from_ref(&a), t0);
        assert_eq!(tasks.len(), 1);
        p.finished(
            &tasks[0],
            &Finished::Current {
                run_digest: run(1).digest,
            },
            t0,
        );
        for i in 1..10 {
            let now = t0 + Duration::from_secs(i);
            p.polled(TAG, run(1), now);
            assert!(p.due(std::slice::from_ref(&a), now).is_empty());
        }
        p.polled(TAG, run(2), t0 + Duration::from_secs(10));
        assert_eq!(
            p.due(std::slice::from_ref(&a), t0 + Duration::from_secs(10))
                .len(),
            1
        );
    }

    #[test]
    fn a_failed_rebase_backs_off_doubling_and_is_never_due_before() {
        let t0 = Instant::now();
        let (mut p, apps) = moved_once(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let tasks = p.due(&apps, now);
            assert_eq!(tasks.len(), 1);
            let d = fail(&mut p, &tasks[0], now).expect("a delay");
            delays.push(d.as_secs());
            assert!(p.due(&apps, now + d - Duration::from_millis(1)).is_empty());
            assert_eq!(p.next_wake(), Some(now + d).min(Some(t0 + timing().poll)));
            now += d;
        }
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        // The tag moves on: a new attempt starts from the shortest backoff.
        p.polled(TAG, run(3), now);
        let tasks = p.due(&apps, now);
        assert_eq!(fail(&mut p, &tasks[0], now), Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_rebase_that_met_another_digest_polls_again_and_retries_later() {
        let t0 = Instant::now();
        let (mut p, apps) = moved_once(t0);
        let tasks = p.due(&apps, t0);
        // The registry failed during the rebase and the node's old record of the tag was used.
        let d = p.finished(
            &tasks[0],
            &Finished::Current {
                run_digest: run(1).digest,
            },
            t0,
        );
        assert_eq!(d, Some(Duration::from_secs(1)));
        assert_eq!(p.due_polls(t0), [TAG]);
        assert!(p.due(&apps, t0).is_empty());
        assert_eq!(p.due(&apps, t0 + Duration::from_secs(1)).len(), 1);
    }

    #[test]
    fn a_429_pauses_polls_and_rebases_of_that_registry_only() {
        let t0 = Instant::now();
        let other = "elsewhere.example/ragent/run:v1";
        let mut p = AutoRebase::new(
            &[TAG.to_string(), format!("{REG}/ragent/run:b"), other.into()],
            Mode::InPlace,
            timing(),
            t0,
        );
        assert_eq!(p.due_polls(t0).len(), 3);
        let d = p.poll_failed(TAG, RATE_LIMITED, t0);
        assert_eq!(d, Duration::from_secs(1));
        // The other tag of the same registry waits too; the other registry does not.
        assert_eq!(p.due_polls(t0), [other]);
        let d2 = p.poll_failed(TAG, RATE_LIMITED, t0 + d);
        assert_eq!(d2, Duration::from_secs(2), "429s in a row double the pause");
        assert!(
            p.due_polls(t0 + d + Duration::from_millis(1999))
                .iter()
                .all(|t| t == other)
        );
        // Rebases onto a tag of a paused registry wait as well.
        p.polled(other, run(1), t0);
        p.polled(other, run(2), t0);
        p.polled(TAG, run(5), t0 + Duration::from_secs(10));
        p.polled(TAG, run(6), t0 + Duration::from_secs(10));
        let on5 = App {
            run_layers: run(5).layers,
            ..naming_the_tag("web", &run(5).digest)
        };
        let tasks = p.due(std::slice::from_ref(&on5), t0 + Duration::from_secs(10));
        let now = t0 + Duration::from_secs(10);
        p.finished(
            &tasks[0],
            &Finished::Failed {
                reason: RATE_LIMITED.into(),
            },
            now,
        );
        assert!(p.due_polls(now).iter().all(|t| t == other));
        // A successful poll ends the pause.
        p.polled(
            &format!("{REG}/ragent/run:b"),
            run(1),
            now + Duration::from_secs(1),
        );
        assert!(!p.is_paused(REG, now + Duration::from_secs(1)));
    }

    #[test]
    fn a_failed_poll_backs_off_and_a_good_one_resets_it() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        let d: Vec<u64> = (0..5)
            .map(|_| p.poll_failed(TAG, "timeout", t0).as_secs())
            .collect();
        assert_eq!(d, [1, 2, 4, 8, 8]);
        assert!(p.due_polls(t0 + Duration::from_secs(7)).is_empty());
        p.polled(TAG, run(1), t0 + Duration::from_secs(8));
        assert_eq!(
            p.next_wake(),
            Some(t0 + Duration::from_secs(8) + timing().poll)
        );
        assert_eq!(p.poll_failed(TAG, "timeout", t0).as_secs(), 1);
    }

    #[test]
    fn the_view_counts_images_per_run_digest_and_the_oldest_unpatched_wait() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = policy(t0);
        let apps = vec![app("web", 1), app("worker", 1), app("other", 7)];
        p.polled(TAG, run(1), t0);
        let v = p.view(&apps, t0 + s(1));
        assert_eq!(v.images_by_run_digest[&run(1).digest], 2);
        assert_eq!(v.images_by_run_digest[&run(7).digest], 1);
        assert_eq!((v.unpatched, v.oldest_unpatched), (0, Duration::ZERO));
        // run2 appears at t0+10: from then on the two wait.
        p.polled(TAG, run(2), t0 + s(10));
        p.polled(TAG, run(2), t0 + s(20));
        let v = p.view(&apps, t0 + s(25));
        assert_eq!((v.unpatched, v.oldest_unpatched), (2, s(15)));
    }

    #[test]
    fn references_name_their_digest() {
        assert_eq!(reference_digest("sha256:ab"), Some("sha256:ab"));
        assert_eq!(reference_digest("h:5000/r@sha256:ab"), Some("sha256:ab"));
        assert_eq!(reference_digest("h:5000/r:v1"), None);
        assert_eq!(name_part("h:5000/r:v1@sha256:ab"), "h:5000/r:v1");
    }

    mod never_loops {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            /// The tag moves to run image n (maybe to where it is).
            Move(u8),
            /// One poll interval passes.
            Tick,
        }

        fn steps() -> impl Strategy<Value = Vec<Step>> {
            prop::collection::vec(
                prop_oneof![(1u8..4).prop_map(Step::Move), Just(Step::Tick)],
                0..60,
            )
        }

        /// The number of changes in `first, seq...` (consecutive repeats are no change).
        fn changes(first: &str, seq: &[String]) -> usize {
            let mut prev = first;
            let mut n = 0;
            for d in seq {
                if d != prev {
                    n += 1;
                    prev = d;
                }
            }
            n
        }

        proptest! {
            /// Whatever the tag does, each image is rebased exactly once per change of the
            /// digest the polls saw, never when nothing changed, and the loop always has a
            /// future wake (it never spins).
            #[test]
            fn exactly_one_rebase_per_change(steps in steps(), apps_n in 1usize..4) {
                let t0 = Instant::now();
                let mut p = policy(t0);
                let names = ["a", "b", "c"];
                let mut apps: Vec<App> = names[..apps_n].iter().map(|n| app(n, 1)).collect();
                let mut reg = run(1);
                // The agent watched the tag before it moved (so it knows the apps' digest).
                prop_assert_eq!(round(&mut p, &mut apps, &reg, t0), 0);
                let mut now = t0;
                let mut observed = Vec::new();
                let mut rebases = 0;
                for s in steps.iter().chain(std::iter::once(&Step::Tick)) {
                    match s {
                        Step::Move(n) => reg = run(*n),
                        Step::Tick => {
                            now += timing().poll;
                            rebases += round(&mut p, &mut apps, &reg, now);
                            observed.push(reg.digest.clone());
                            let wake = p.next_wake().expect("a wake");
                            prop_assert!(wake > now, "the loop would spin");
                        }
                    }
                }
                let want = changes(&run(1).digest, &observed) * apps_n;
                prop_assert_eq!(rebases, want);
                for a in &apps {
                    prop_assert_eq!(a.run_digest.as_deref(), Some(reg.digest.as_str()));
                }
                prop_assert_eq!(p.view(&apps, now).unpatched, 0);
            }

            /// With failing rebases, images catch up once the failures stop, never with more
            /// rebases than changes, and a failed image is not tried again before its backoff.
            #[test]
            fn failures_are_retried_with_backoff_and_still_never_loop(
                steps in steps(),
                failures in prop::collection::vec(any::<bool>(), 64),
            ) {
                let t0 = Instant::now();
                let mut p = policy(t0);
                let mut apps = vec![app("a", 1), app("b", 1)];
                let mut reg = run(1);
                prop_assert_eq!(round(&mut p, &mut apps, &reg, t0), 0);
                let mut now = t0;
                let mut observed = Vec::new();
                let mut rebases = 0;
                let mut failing = failures.iter().cycle();
                // (image, digest) -> when it failed and the backoff it was given.
                let mut last_try: BTreeMap<(String, String), (Instant, Duration)> = BTreeMap::new();
                observed.push(reg.digest.clone());
                for s in &steps {
                    match s {
                        Step::Move(n) => reg = run(*n),
                        Step::Tick => {
                            now += timing().poll;
                            for t in p.due_polls(now) {
                                p.polled(&t, reg.clone(), now);
                            }
                            if observed.last() != Some(&reg.digest) {
                                // A change of the tag starts new attempts: no backoff carries over.
                                last_try.clear();
                            }
                            observed.push(reg.digest.clone());
                            for t in p.due(&apps, now) {
                                let key = (t.image.clone(), t.digest.clone());
                                if let Some((at, wait)) = last_try.get(&key) {
                                    prop_assert!(now >= *at + *wait, "retried before its backoff");
                                }
                                let a = apps.iter_mut().find(|a| a.name == t.image).expect("app");
                                if *failing.next().unwrap_or(&false) {
                                    let d = fail(&mut p, &t, now);
                                    last_try.insert(key, (now, d.expect("a delay")));
                                } else {
                                    rebased_in_place(a, &reg);
                                    rebases += 1;
                                    last_try.retain(|(image, _), _| *image != t.image);
                                    p.finished(&t, &Finished::Rebased { run_digest: reg.digest.clone() }, now);
                                }
                            }
                            prop_assert!(p.next_wake().expect("a wake") > now);
                        }
                    }
                }
                prop_assert!(rebases <= changes(&run(1).digest, &observed) * apps.len());
                // Quiet: no failures, the tag stays; within the backoff cap everyone catches up.
                let before = rebases;
                for _ in 0..4 {
                    now += timing().retry_max;
                    rebases += round(&mut p, &mut apps, &reg, now);
                }
                for a in &apps {
                    prop_assert_eq!(a.run_digest.as_deref(), Some(reg.digest.as_str()));
                }
                prop_assert!(rebases - before <= apps.len());
                let settled = rebases;
                for _ in 0..5 {
                    now += timing().poll;
                    rebases += round(&mut p, &mut apps, &reg, now);
                }
                prop_assert_eq!(rebases, settled, "nothing changed, nothing rebased");
            }
        }
    }
}
