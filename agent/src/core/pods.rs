//! The pods of this node as the Kubernetes API sees them: pod uid → containers (ids from
//! containerStatuses) → who they are (namespace, pod, container, owning workload).
//!
//! Pure: the kube adapter turns each Pod into a [`PodInfo`] as it arrives (a few strings per
//! container; the Pod object itself is not kept), and feeds watch events here. The insight
//! metrics ask it for containers containerd cannot name.
use std::collections::HashMap;

use super::workloads::Workload;

/// What the agent keeps of a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `Kind/name` of the workload that owns it (a Deployment for a ReplicaSet's pods), if any.
    pub workload: Option<String>,
    /// (container name, runtime container id without the `containerd://` prefix). Init and
    /// ephemeral containers included; containers not started yet have no id.
    pub containers: Vec<(String, Option<String>)>,
    /// Requests and limits per container name, from the pod spec (containers without any are
    /// absent).
    pub resources: Vec<(String, Resources)>,
}

/// A container's requests and limits from its pod spec, in base units (None: not set).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Resources {
    pub cpu_request_cores: Option<f64>,
    pub cpu_limit_cores: Option<f64>,
    pub memory_request_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// A Kubernetes quantity (`500m`, `1.5`, `128Mi`, `1G`, `1e3`) as a number in base units, or
/// None when it does not parse (the API server only stores valid ones, so None means a
/// quantity this parser does not know, and the value is treated as unknown).
pub fn quantity(text: &str) -> Option<f64> {
    let t = text.trim();
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| t.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((t, 1.0));
    // Only digits, one point, a sign and (without a suffix) a decimal exponent.
    let ok = !number.is_empty()
        && number
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'));
    let v: f64 = number.parse().ok().filter(|_| ok)?;
    let v = v * scale;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// A CPU quantity in cores.
pub fn cpu_cores(text: &str) -> Option<f64> {
    quantity(text)
}

/// A memory quantity in bytes (rounded up: `1.5` bytes is 2, as the API server does).
pub fn memory_bytes(text: &str) -> Option<u64> {
    quantity(text).map(|v| (v - 1e-9).ceil().max(0.0) as u64)
}

/// The container id in a containerStatuses `containerID` (`containerd://<id>`, `cri-o://<id>`).
pub fn container_id(status_id: &str) -> Option<&str> {
    let id = status_id.split_once("://").map_or(status_id, |(_, id)| id);
    (!id.is_empty()).then_some(id)
}

/// The workload owning a pod, from its controller owner reference: a ReplicaSet created by a
/// Deployment (named `<deployment>-<pod-template-hash>`) counts as the Deployment, a Job
/// created by a CronJob (`<cronjob>-<minutes>`) stays the Job (its name is all we have).
pub fn workload_of(owner_kind: &str, owner_name: &str, pod_template_hash: Option<&str>) -> String {
    if owner_kind == "ReplicaSet"
        && let Some(h) = pod_template_hash.filter(|h| !h.is_empty())
        && let Some(d) = owner_name.strip_suffix(h).and_then(|p| p.strip_suffix('-'))
        && !d.is_empty()
    {
        return format!("Deployment/{d}");
    }
    format!("{owner_kind}/{owner_name}")
}

/// The pods of this node, kept current from a watch (list, then changes; a relist replaces
/// everything at once, so pods deleted while the watch was down do not linger).
#[derive(Debug, Default)]
pub struct Index {
    pods: HashMap<String, PodInfo>,
    by_container: HashMap<String, String>,
    /// A relist in progress: pods collected so far.
    relist: Option<Vec<PodInfo>>,
}

impl Index {
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// A pod was added or changed.
    pub fn apply(&mut self, pod: PodInfo) {
        self.delete(&pod.uid.clone());
        for (_, id) in &pod.containers {
            if let Some(id) = id {
                self.by_container.insert(id.clone(), pod.uid.clone());
            }
        }
        self.pods.insert(pod.uid.clone(), pod);
    }

    /// A pod was deleted.
    pub fn delete(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for (_, id) in old.containers.iter() {
                if let Some(id) = id
                    && self.by_container.get(id).is_some_and(|u| u == uid)
                {
                    self.by_container.remove(id);
                }
            }
        }
    }

    /// The watch (re)started: a full list follows.
    pub fn relist_begin(&mut self) {
        self.relist = Some(Vec::new());
    }

    pub fn relist_item(&mut self, pod: PodInfo) {
        match &mut self.relist {
            Some(v) => v.push(pod),
            // An item outside a relist is a change.
            None => self.apply(pod),
        }
    }

    /// The list is complete: it replaces what was known.
    pub fn relist_done(&mut self) {
        if let Some(pods) = self.relist.take() {
            self.pods.clear();
            self.by_container.clear();
            for p in pods {
                self.apply(p);
            }
        }
    }

    pub fn pod(&self, uid: &str) -> Option<&PodInfo> {
        self.pods.get(uid)
    }

    /// Who a container is, by its runtime id.
    pub fn workload(&self, container_id: &str) -> Option<Workload> {
        let pod = self.pods.get(self.by_container.get(container_id)?)?;
        let (name, _) = pod
            .containers
            .iter()
            .find(|(_, id)| id.as_deref() == Some(container_id))?;
        Some(Workload {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: name.clone(),
            sandbox: false,
        })
    }

    /// A pod by namespace and name (a node has at most a few hundred: a scan).
    pub fn by_name(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The owning workload of the pod a container belongs to.
    pub fn owner(&self, container_id: &str) -> Option<&str> {
        self.pods
            .get(self.by_container.get(container_id)?)?
            .workload
            .as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str, containers: &[(&str, Option<&str>)]) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "shop".into(),
            name: name.into(),
            workload: Some("Deployment/web".into()),
            containers: containers
                .iter()
                .map(|(n, id)| (n.to_string(), id.map(str::to_string)))
                .collect(),
            resources: Vec::new(),
        }
    }

    #[test]
    fn container_ids_lose_their_runtime_prefix() {
        assert_eq!(container_id("containerd://abc"), Some("abc"));
        assert_eq!(container_id("cri-o://abc"), Some("abc"));
        assert_eq!(container_id("abc"), Some("abc"));
        assert_eq!(container_id("containerd://"), None);
    }

    #[test]
    fn quantities_are_read_in_base_units() {
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9 * b.max(1.0));
        assert!(close(cpu_cores("500m"), 0.5));
        assert!(close(cpu_cores("2"), 2.0));
        assert!(close(cpu_cores("0.25"), 0.25));
        assert!(close(cpu_cores("1e3"), 1000.0));
        assert!(close(cpu_cores("100000u"), 0.1));
        assert_eq!(memory_bytes("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("1.5Gi"), Some(1_610_612_736));
        assert_eq!(memory_bytes("64k"), Some(64_000));
        assert_eq!(memory_bytes("1000"), Some(1000));
        // Not quantities: unknown, never a wrong number.
        for bad in ["", "Mi", "12q", "-1", "1.2.3Gi", "ten", "1 Gi"] {
            assert_eq!(quantity(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deployments_are_named_through_their_replica_sets() {
        assert_eq!(
            workload_of("ReplicaSet", "web-7d9f8c6b5", Some("7d9f8c6b5")),
            "Deployment/web"
        );
        // A ReplicaSet of its own (no template hash, or a name that does not end in it).
        assert_eq!(workload_of("ReplicaSet", "web", None), "ReplicaSet/web");
        assert_eq!(
            workload_of("ReplicaSet", "web-abc", Some("xyz")),
            "ReplicaSet/web-abc"
        );
        assert_eq!(workload_of("StatefulSet", "db", None), "StatefulSet/db");
        assert_eq!(workload_of("DaemonSet", "ragent", None), "DaemonSet/ragent");
    }

    #[test]
    fn containers_map_to_their_pod_until_it_goes() {
        let mut ix = Index::default();
        ix.apply(pod(
            "u1",
            "web-1",
            &[("web", Some("c1")), ("sidecar", None)],
        ));
        let w = ix.workload("c1").expect("known");
        assert_eq!(
            (w.namespace.as_str(), w.pod.as_str(), w.container.as_str()),
            ("shop", "web-1", "web")
        );
        assert_eq!(ix.owner("c1"), Some("Deployment/web"));
        // The sidecar starts: an update gives it an id.
        ix.apply(pod(
            "u1",
            "web-1",
            &[("web", Some("c1")), ("sidecar", Some("c2"))],
        ));
        assert_eq!(ix.workload("c2").expect("sidecar").container, "sidecar");
        // A restart replaces the container id; the old one is forgotten.
        ix.apply(pod(
            "u1",
            "web-1",
            &[("web", Some("c3")), ("sidecar", Some("c2"))],
        ));
        assert!(ix.workload("c1").is_none());
        assert_eq!(ix.workload("c3").expect("restarted").container, "web");
        ix.delete("u1");
        assert!(ix.workload("c3").is_none() && ix.workload("c2").is_none());
        assert!(ix.is_empty());
    }

    #[test]
    fn a_relist_drops_pods_deleted_while_the_watch_was_down() {
        let mut ix = Index::default();
        ix.apply(pod("u1", "a", &[("c", Some("c1"))]));
        ix.apply(pod("u2", "b", &[("c", Some("c2"))]));
        ix.relist_begin();
        ix.relist_item(pod("u2", "b", &[("c", Some("c2"))]));
        // Until the list is complete, what was known still answers.
        assert!(ix.workload("c1").is_some());
        ix.relist_done();
        assert_eq!(ix.len(), 1);
        assert!(ix.workload("c1").is_none());
        assert!(ix.workload("c2").is_some());
        // After the relist, items are changes again.
        ix.relist_item(pod("u3", "c", &[("c", Some("c3"))]));
        assert_eq!(ix.len(), 2);
    }
}
