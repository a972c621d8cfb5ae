//! The agent's pre-pull policy as a state machine: which images are due for a (re-)resolve,
//! when a failed one is retried, what the node's warm set looks like. Time is passed in.
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not tried yet.
    Pending,
    /// The image record points at `digest` and its content is on the node.
    Ready { digest: String },
    /// The last attempt failed; `digest` is what the node had before, if anything.
    Failed {
        reason: String,
        attempts: u32,
        digest: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub reference: String,
    pub state: State,
    /// When this entry is next due.
    pub next: Instant,
}

/// How often and how patiently the policy acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Re-resolve ready images this often (a tag may have moved); None: never.
    pub refresh: Option<Duration>,
    /// First retry delay after a failure; doubles per failed attempt up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone)]
pub struct Policy {
    entries: Vec<Entry>,
    timing: Timing,
}

/// The delay before retry number `attempts` (1 = after the first failure).
pub fn backoff(timing: &Timing, attempts: u32) -> Duration {
    doubling(timing.retry_min, timing.retry_max, attempts)
}

/// `min`, doubled per attempt after the first, capped at `max` (never overflows).
pub fn doubling(min: Duration, max: Duration, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    min.saturating_mul(1u32 << doublings).min(max)
}

/// Images per state: (ready, failed, pending).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ready: usize,
    pub failed: usize,
    pub pending: usize,
}

impl Policy {
    /// Every reference is due at once. Duplicates are dropped.
    pub fn new(references: &[String], timing: Timing, now: Instant) -> Policy {
        let mut entries: Vec<Entry> = Vec::new();
        for r in references {
            if !entries.iter().any(|e| &e.reference == r) {
                entries.push(Entry {
                    reference: r.clone(),
                    state: State::Pending,
                    next: now,
                });
            }
        }
        Policy { entries, timing }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The references due at `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.next <= now)
            .map(|e| e.reference.clone())
            .collect()
    }

    /// When the next entry falls due (None: nothing will, e.g. all ready and no refresh).
    pub fn next_wake(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.next).min()
    }

    fn entry(&mut self, reference: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.reference == reference)
    }

    /// The image is on the node as `digest`; returns whether the digest changed (a moved tag).
    pub fn ready(&mut self, reference: &str, digest: &str, now: Instant) -> bool {
        let refresh = self.timing.refresh;
        let Some(e) = self.entry(reference) else {
            return false;
        };
        let before = match &e.state {
            State::Ready { digest } => Some(digest.clone()),
            State::Failed { digest, .. } => digest.clone(),
            State::Pending => None,
        };
        e.state = State::Ready {
            digest: digest.to_string(),
        };
        e.next = match refresh {
            Some(r) => now + r,
            // Far enough to never come: a year.
            None => now + Duration::from_secs(365 * 24 * 3600),
        };
        before.is_some_and(|b| b != digest)
    }

    /// The attempt failed: retry with backoff. Returns the delay.
    pub fn failed(&mut self, reference: &str, reason: &str, now: Instant) -> Duration {
        let timing = self.timing;
        let Some(e) = self.entry(reference) else {
            return Duration::ZERO;
        };
        let (attempts, digest) = match &e.state {
            State::Failed {
                attempts, digest, ..
            } => (attempts + 1, digest.clone()),
            State::Ready { digest } => (1, Some(digest.clone())),
            State::Pending => (1, None),
        };
        let delay = backoff(&timing, attempts);
        e.state = State::Failed {
            reason: reason.to_string(),
            attempts,
            digest,
        };
        e.next = now + delay;
        delay
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in &self.entries {
            match e.state {
                State::Ready { .. } => c.ready += 1,
                State::Failed { .. } => c.failed += 1,
                State::Pending => c.pending += 1,
            }
        }
        c
    }
}

/// Whether the node's image record is current for the manifest the registry serves now: it
/// points at that manifest, or it is ragent's local rebase of exactly that manifest (its
/// upstream label names it). A pre-pull must not undo an in-place rebase until the registry's
/// manifest itself changes.
pub fn is_current(
    record_digest: &str,
    record_upstream: Option<&str>,
    registry_digest: &str,
) -> bool {
    record_digest == registry_digest || record_upstream == Some(registry_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            refresh: Some(Duration::from_secs(60)),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
        }
    }

    fn refs(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn everything_is_due_at_start_once() {
        let t0 = Instant::now();
        let p = Policy::new(&refs(&["a", "b", "a"]), timing(), t0);
        assert_eq!(p.due(t0), ["a", "b"]);
        assert_eq!(
            p.counts(),
            Counts {
                pending: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn ready_images_come_back_after_the_refresh_interval() {
        let t0 = Instant::now();
        let mut p = Policy::new(&refs(&["a"]), timing(), t0);
        assert!(!p.ready("a", "sha256:1", t0));
        assert!(p.due(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(p.due(t0 + Duration::from_secs(60)), ["a"]);
        // The tag moved.
        assert!(p.ready("a", "sha256:2", t0 + Duration::from_secs(60)));
        assert!(!p.ready("a", "sha256:2", t0 + Duration::from_secs(120)));
    }

    #[test]
    fn without_refresh_a_ready_image_is_left_alone() {
        let t0 = Instant::now();
        let mut p = Policy::new(
            &refs(&["a"]),
            Timing {
                refresh: None,
                ..timing()
            },
            t0,
        );
        p.ready("a", "sha256:1", t0);
        assert!(p.due(t0 + Duration::from_secs(30 * 24 * 3600)).is_empty());
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap_and_recover() {
        let t0 = Instant::now();
        let mut p = Policy::new(&refs(&["a", "b"]), timing(), t0);
        let delays: Vec<u64> = (0..6)
            .map(|_| p.failed("a", "request", t0).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        assert_eq!(
            p.counts(),
            Counts {
                failed: 1,
                pending: 1,
                ready: 0
            }
        );
        assert_eq!(p.next_wake(), Some(t0));
        p.ready("b", "sha256:b", t0);
        assert_eq!(p.next_wake(), Some(t0 + Duration::from_secs(8)));
        p.ready("a", "sha256:a", t0 + Duration::from_secs(8));
        // The backoff starts over after a success.
        assert_eq!(p.failed("a", "request", t0).as_secs(), 1);
    }

    #[test]
    fn a_failed_refresh_remembers_the_digest_the_node_has() {
        let t0 = Instant::now();
        let mut p = Policy::new(&refs(&["a"]), timing(), t0);
        p.ready("a", "sha256:1", t0);
        p.failed("a", "request", t0);
        assert!(matches!(
            &p.entries()[0].state,
            State::Failed { digest: Some(d), attempts: 1, .. } if d == "sha256:1"
        ));
        // Recovering to the same digest is not a move.
        assert!(!p.ready("a", "sha256:1", t0));
    }

    #[test]
    fn a_local_rebase_of_the_registrys_manifest_is_current() {
        assert!(is_current("sha256:a", None, "sha256:a"));
        assert!(!is_current("sha256:a", None, "sha256:b"));
        // Rebased in place from the registry's manifest: current.
        assert!(is_current("sha256:rebased", Some("sha256:a"), "sha256:a"));
        // The tag moved on the registry since: not current, pull the new app.
        assert!(!is_current("sha256:rebased", Some("sha256:a"), "sha256:b"));
    }

    #[test]
    fn backoff_never_overflows() {
        assert_eq!(backoff(&timing(), u32::MAX), Duration::from_secs(8));
    }
}
