//! Who a cgroup belongs to, and how cumulative per-cgroup readings become per-pod and
//! per-container series that never go backwards and disappear after their owner is gone.
//!
//! Pure: the agent feeds it cgroup paths, container labels and readings; the tests feed it
//! inline values.
use std::collections::{BTreeMap, HashMap};

/// CRI labels kubelet puts on sandboxes and containers (and containerd copies onto its records).
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// containerd's CRI plugin marks its records `sandbox` or `container`.
pub const LABEL_CRI_KIND: &str = "io.cri-containerd.kind";

/// The container id in a container's cgroup path, for the layouts runtimes use:
/// `/k8s.io/<id>`, `/kubepods/burstable/pod<uid>/<id>` (cgroupfs driver),
/// `/kubepods.slice/.../cri-containerd-<id>.scope` (systemd driver), `docker-<id>.scope`,
/// `crio-<id>.scope`. Ids are 64 lowercase hex digits; anything else is not a container.
pub fn container_id_in_path(path: &str) -> Option<&str> {
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    let id = last
        .strip_suffix(".scope")
        .map_or(last, |s| s.rsplit_once('-').map_or(s, |(_, id)| id));
    let is_id = id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    is_id.then_some(id)
}

/// Like [`container_id_in_path`], and also accepts any last path element that is a container
/// id containerd knows (`ctr run` and other clients choose ids freely: `/k8s.io/my-job`).
pub fn container_in_path(path: &str, known: impl Fn(&str) -> bool) -> Option<&str> {
    if let Some(id) = container_id_in_path(path) {
        return Some(id);
    }
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    (!last.is_empty() && known(last)).then_some(last)
}

/// The Kubernetes identity of a container, as labelled in metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The pod's sandbox (pause) container: counted in the pod's network, not as a container.
    pub sandbox: bool,
}

impl Workload {
    /// From a container record's labels. Containers started outside Kubernetes (no CRI labels)
    /// are `namespace=""`, `pod=<id>`, `container=<id>`: reported, not dropped.
    pub fn from_labels(id: &str, labels: &BTreeMap<String, String>) -> Workload {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        match (get(LABEL_POD_NAMESPACE), get(LABEL_POD_NAME)) {
            (Some(namespace), Some(pod)) => {
                let sandbox = labels.get(LABEL_CRI_KIND).is_some_and(|k| k == "sandbox")
                    || get(LABEL_CONTAINER_NAME).is_none();
                Workload {
                    namespace,
                    pod,
                    container: if sandbox {
                        String::new()
                    } else {
                        get(LABEL_CONTAINER_NAME).unwrap_or_default()
                    },
                    sandbox,
                }
            }
            _ => Workload::unknown(id),
        }
    }

    /// A container whose record is gone or was never seen.
    pub fn unknown(id: &str) -> Workload {
        Workload {
            namespace: String::new(),
            pod: id.to_string(),
            container: id.to_string(),
            sandbox: false,
        }
    }

    pub fn pod_key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub pod: String,
}

/// Who owns a cgroup, for the node's network split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    Pods,
    Containerd,
    Ragent,
    Other,
}

impl Owner {
    pub const ALL: [Owner; 4] = [Owner::Pods, Owner::Containerd, Owner::Ragent, Owner::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Pods => "pods",
            Owner::Containerd => "containerd",
            Owner::Ragent => "ragent",
            Owner::Other => "other",
        }
    }
}

/// Monotonic series built from cumulative readings of many sources (cgroup ids).
///
/// Each source belongs to one series; a reading adds what the source counted since its last
/// reading, so a series keeps what its gone sources counted (a restarted container does not
/// reset its pod's counter). A source whose reading goes down was reset (a new eBPF map, a
/// recreated cgroup): its new value is counted from zero. A series not observed for the grace
/// period is dropped, which bounds the label sets to what lived recently.
#[derive(Debug, Clone)]
pub struct Ledger<K: Ord + Clone> {
    sources: HashMap<u64, Source<K>>,
    series: BTreeMap<K, Entry>,
}

#[derive(Debug, Clone)]
struct Source<K> {
    key: K,
    last: u64,
    seen: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    value: u64,
    seen: u64,
}

impl<K: Ord + Clone> Default for Ledger<K> {
    fn default() -> Self {
        Ledger {
            sources: HashMap::new(),
            series: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> Ledger<K> {
    /// Records `value` (cumulative) of `source`, which belongs to `key`, at `now` (seconds).
    /// A source that moves to another key (its owner became known) moves without recounting.
    pub fn observe(&mut self, source: u64, key: &K, value: u64, now: u64) {
        let delta = match self.sources.get_mut(&source) {
            Some(s) => {
                let d = if value >= s.last {
                    value - s.last
                } else {
                    value
                };
                s.last = value;
                s.seen = now;
                if s.key != *key {
                    s.key = key.clone();
                }
                d
            }
            None => {
                self.sources.insert(
                    source,
                    Source {
                        key: key.clone(),
                        last: value,
                        seen: now,
                    },
                );
                value
            }
        };
        let e = self.series.entry(key.clone()).or_insert(Entry {
            value: 0,
            seen: now,
        });
        e.value = e.value.saturating_add(delta);
        e.seen = now;
    }

    /// Adds `delta` to `key` directly (for figures that arrive as increments, not readings).
    pub fn add(&mut self, key: &K, delta: u64, now: u64) {
        let e = self.series.entry(key.clone()).or_insert(Entry {
            value: 0,
            seen: now,
        });
        e.value = e.value.saturating_add(delta);
        e.seen = now;
    }

    /// Keeps `key` alive without a new reading (its source exists but counted nothing new).
    pub fn touch(&mut self, key: &K, now: u64) {
        if let Some(e) = self.series.get_mut(key) {
            e.seen = now;
        }
    }

    pub fn get(&self, key: &K) -> Option<u64> {
        self.series.get(key).map(|e| e.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u64)> {
        self.series.iter().map(|(k, e)| (k, e.value))
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Drops sources and series not observed within `grace` seconds before `now`; returns the
    /// dropped series so their exported values can be removed.
    pub fn expire(&mut self, now: u64, grace: u64) -> Vec<K> {
        let old = |seen: u64| now.saturating_sub(seen) > grace;
        self.sources.retain(|_, s| !old(s.seen));
        let gone: Vec<K> = self
            .series
            .iter()
            .filter(|(_, e)| old(e.seen))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.series.remove(k);
        }
        gone
    }
}

/// Latest-value series (gauges) with the same grace rule as [`Ledger`].
#[derive(Debug, Clone)]
pub struct Gauges<K: Ord + Clone> {
    series: BTreeMap<K, Entry>,
}

impl<K: Ord + Clone> Default for Gauges<K> {
    fn default() -> Self {
        Gauges {
            series: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> Gauges<K> {
    pub fn set(&mut self, key: &K, value: u64, now: u64) {
        self.series.insert(key.clone(), Entry { value, seen: now });
    }

    pub fn get(&self, key: &K) -> Option<u64> {
        self.series.get(key).map(|e| e.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u64)> {
        self.series.iter().map(|(k, e)| (k, e.value))
    }

    /// Gauges of things gone for longer than `grace` are dropped (a gone container's memory is
    /// not "still in use"; its last value stays visible for the grace period only).
    pub fn expire(&mut self, now: u64, grace: u64) -> Vec<K> {
        let gone: Vec<K> = self
            .series
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.seen) > grace)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.series.remove(k);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn container_ids_in_every_runtime_layout() {
        for p in [
            format!("/k8s.io/{ID}"),
            format!("/kubepods/burstable/pod1234-5678/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/cri-containerd-{ID}.scope"
            ),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods.slice/crio-{ID}.scope"),
            format!("/k8s.io/{ID}/"),
        ] {
            assert_eq!(container_id_in_path(&p), Some(ID), "{p}");
        }
        for p in [
            "/",
            "/system.slice/containerd.service",
            "/kubepods/burstable/pod1234",
            "/k8s.io/0123",
            &format!("/k8s.io/{}", ID.to_uppercase()),
            &format!("/k8s.io/{ID}0"),
        ] {
            assert_eq!(container_id_in_path(p), None, "{p}");
        }
    }

    #[test]
    fn containers_with_ids_of_their_own_are_found_when_known() {
        let known = |id: &str| id == "nightly-job";
        assert_eq!(
            container_in_path("/k8s.io/nightly-job", known),
            Some("nightly-job")
        );
        assert_eq!(container_in_path("/system.slice/cron.service", known), None);
        assert_eq!(container_in_path(&format!("/k8s.io/{ID}"), known), Some(ID));
        assert_eq!(container_in_path("/", known), None);
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn workloads_from_cri_labels() {
        let c = Workload::from_labels(
            ID,
            &labels(&[
                (LABEL_POD_NAMESPACE, "shop"),
                (LABEL_POD_NAME, "web-1"),
                (LABEL_POD_UID, "u"),
                (LABEL_CONTAINER_NAME, "app"),
                (LABEL_CRI_KIND, "container"),
            ]),
        );
        assert_eq!(
            c,
            Workload {
                namespace: "shop".into(),
                pod: "web-1".into(),
                container: "app".into(),
                sandbox: false
            }
        );
        let s = Workload::from_labels(
            ID,
            &labels(&[
                (LABEL_POD_NAMESPACE, "shop"),
                (LABEL_POD_NAME, "web-1"),
                (LABEL_CRI_KIND, "sandbox"),
            ]),
        );
        assert!(s.sandbox);
        assert_eq!(s.pod_key(), c.pod_key());
        // No CRI labels: reported under the container id, never dropped.
        let plain = Workload::from_labels(ID, &labels(&[("app", "x")]));
        assert_eq!(plain, Workload::unknown(ID));
        assert_eq!((plain.namespace.as_str(), plain.pod.as_str()), ("", ID));
    }

    #[test]
    fn a_series_keeps_what_its_gone_sources_counted() {
        let mut l: Ledger<&str> = Ledger::default();
        l.observe(1, &"pod", 100, 0);
        l.observe(1, &"pod", 150, 1);
        // The container restarts: a new cgroup, counted from its first reading.
        l.observe(2, &"pod", 30, 2);
        assert_eq!(l.get(&"pod"), Some(180));
        l.observe(2, &"pod", 40, 3);
        assert_eq!(l.get(&"pod"), Some(190));
        // A reading that goes down is a reset, not a negative delta.
        l.observe(2, &"pod", 5, 4);
        assert_eq!(l.get(&"pod"), Some(195));
    }

    #[test]
    fn a_source_that_learns_its_owner_moves_without_recounting() {
        let mut l: Ledger<&str> = Ledger::default();
        l.observe(7, &"unknown", 100, 0);
        l.observe(7, &"web", 120, 1);
        assert_eq!(l.get(&"unknown"), Some(100));
        assert_eq!(l.get(&"web"), Some(20));
    }

    #[test]
    fn series_of_gone_owners_expire_after_the_grace_period() {
        let mut l: Ledger<&str> = Ledger::default();
        l.observe(1, &"a", 10, 0);
        l.observe(2, &"b", 10, 0);
        l.observe(2, &"b", 11, 50);
        assert!(l.expire(60, 60).is_empty());
        assert_eq!(l.expire(61, 60), vec!["a"]);
        assert_eq!(l.get(&"a"), None);
        assert_eq!(l.get(&"b"), Some(11));
        // A source seen again after expiry counts from zero again (its old value was dropped).
        l.observe(1, &"a", 12, 62);
        assert_eq!(l.get(&"a"), Some(12));

        let mut g: Gauges<&str> = Gauges::default();
        g.set(&"a", 5, 0);
        g.set(&"b", 6, 30);
        assert_eq!(g.expire(31, 30), vec!["a"]);
        assert_eq!(g.get(&"b"), Some(6));
    }
}
