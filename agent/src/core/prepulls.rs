//! What an agent does with the cluster's `PrePull` resources: which apply to its node, which
//! it must refuse (a pull secret it may not read, a selector Kubernetes would reject), and which
//! outcomes are worth an Event. Pure: the kube adapter feeds it resources and node labels.
use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

/// A label selector (Kubernetes' `LabelSelector`): every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    /// In, NotIn, Exists, DoesNotExist.
    pub operator: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One `PrePull` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// metadata.generation: changes with the spec.
    pub generation: i64,
    pub images: Vec<String>,
    /// None: every node.
    pub selector: Option<Selector>,
    pub secrets: Vec<SecretRef>,
    /// None: the agent's default refresh interval.
    pub refresh: Option<Duration>,
}

/// What this node does with one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep its images pulled, with credentials from exactly these secrets.
    Apply,
    /// The selector does not pick this node.
    NotSelected,
    /// The resource cannot be applied as written; nothing of it is pulled.
    Refused { reason: String },
}

impl Decision {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Decision::Apply => "applied",
            Decision::NotSelected => "not_selected",
            Decision::Refused { .. } => "refused",
        }
    }
}

/// Why a selector is invalid (as the API server's validation would say), or None.
pub fn invalid_selector(s: &Selector) -> Option<String> {
    for r in &s.match_expressions {
        match r.operator.as_str() {
            "In" | "NotIn" if r.values.is_empty() => {
                return Some(format!(
                    "matchExpressions key {:?}: operator {} needs values",
                    r.key, r.operator
                ));
            }
            "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                return Some(format!(
                    "matchExpressions key {:?}: operator {} takes no values",
                    r.key, r.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Some(format!(
                    "matchExpressions key {:?}: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)",
                    r.key
                ));
            }
        }
    }
    None
}

/// Whether a valid selector picks a node with these labels (an empty selector picks all).
pub fn matches(s: &Selector, labels: &BTreeMap<String, String>) -> bool {
    s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && s.match_expressions.iter().all(|r| {
            let have = labels.get(&r.key);
            match r.operator.as_str() {
                "In" => have.is_some_and(|v| r.values.contains(v)),
                "NotIn" => have.is_none_or(|v| !r.values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
}

/// The decision for one resource on a node with `labels`, where the agent may read secrets
/// only in `allowed_namespaces`.
pub fn decide(
    r: &Resource,
    labels: &BTreeMap<String, String>,
    allowed_namespaces: &[String],
) -> Decision {
    if let Some(s) = &r.selector {
        if let Some(reason) = invalid_selector(s) {
            return Decision::Refused {
                reason: format!("nodeSelector is invalid: {reason}"),
            };
        }
        if !matches(s, labels) {
            return Decision::NotSelected;
        }
    }
    if r.images.is_empty() {
        return Decision::Refused {
            reason: "spec.images is empty".into(),
        };
    }
    if let Some(s) = r
        .secrets
        .iter()
        .find(|s| !allowed_namespaces.contains(&s.namespace))
    {
        return Decision::Refused {
            reason: format!(
                "pull secret {s} is in namespace {:?}, where this agent may not read secrets \
                 (add it to [kubernetes] pull_secret_namespaces / the chart's \
                 prepull.pullSecretNamespaces); none of its images are pulled",
                s.namespace
            ),
        };
    }
    Decision::Apply
}

/// The per-node outcome of one image of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pulled { digest: String },
    Failed { reason: String },
}

/// An Event to publish about a resource (regarding the `PrePull`, reported by this node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub resource: String,
    pub warning: bool,
    /// Pulled, PullFailed, Refused.
    pub reason: &'static str,
    pub note: String,
}

/// Remembers what was reported, so that a node reports each change once: an image pulled (or
/// moved to a new digest), a failure with a new reason, a refusal with a new reason. A steady
/// state — the same digest re-resolved every refresh, the same failure retried — writes
/// nothing to the API server.
#[derive(Debug, Default)]
pub struct Reporter {
    outcomes: HashMap<(String, String), Outcome>,
    refusals: HashMap<String, String>,
}

impl Reporter {
    pub fn outcome(&mut self, resource: &str, image: &str, o: Outcome) -> Option<Notice> {
        let key = (resource.to_string(), image.to_string());
        if self.outcomes.get(&key) == Some(&o) {
            return None;
        }
        let notice = match &o {
            Outcome::Pulled { digest } => Notice {
                resource: resource.into(),
                warning: false,
                reason: "Pulled",
                note: format!("{image} is on the node as {digest}"),
            },
            Outcome::Failed { reason } => Notice {
                resource: resource.into(),
                warning: true,
                reason: "PullFailed",
                note: format!("{image}: {reason} (retried with backoff)"),
            },
        };
        self.outcomes.insert(key, o);
        Some(notice)
    }

    pub fn refused(&mut self, resource: &str, reason: &str) -> Option<Notice> {
        if self.refusals.get(resource).is_some_and(|r| r == reason) {
            return None;
        }
        self.refusals.insert(resource.into(), reason.into());
        Some(Notice {
            resource: resource.into(),
            warning: true,
            reason: "Refused",
            note: reason.into(),
        })
    }

    /// The resource is gone, or applies again, or no longer applies: forget what was said,
    /// so a later state is reported afresh.
    pub fn forget(&mut self, resource: &str) {
        self.outcomes.retain(|(r, _), _| r != resource);
        self.refusals.remove(resource);
    }
}

/// Clips a note to the Events API's limit (1 kB), on a character boundary.
pub fn clip_note(note: &str) -> String {
    const MAX: usize = 1024;
    if note.len() <= MAX {
        return note.into();
    }
    let mut end = MAX - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn resource(selector: Option<Selector>, secrets: &[(&str, &str)]) -> Resource {
        Resource {
            name: "stack".into(),
            generation: 1,
            images: vec!["r.example/app:v1".into()],
            selector,
            secrets: secrets
                .iter()
                .map(|(n, s)| SecretRef {
                    namespace: n.to_string(),
                    name: s.to_string(),
                })
                .collect(),
            refresh: None,
        }
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let node = labels(&[("pool", "web"), ("zone", "a")]);
        let sel = |ml: &[(&str, &str)], me: Vec<Requirement>| Selector {
            match_labels: labels(ml),
            match_expressions: me,
        };
        assert!(matches(&Selector::default(), &node));
        assert!(matches(&sel(&[("pool", "web")], vec![]), &node));
        assert!(!matches(&sel(&[("pool", "batch")], vec![]), &node));
        assert!(matches(
            &sel(&[], vec![req("zone", "In", &["a", "b"])]),
            &node
        ));
        assert!(!matches(&sel(&[], vec![req("zone", "In", &["c"])]), &node));
        assert!(matches(
            &sel(&[], vec![req("zone", "NotIn", &["c"])]),
            &node
        ));
        // NotIn holds for a node without the label at all.
        assert!(matches(&sel(&[], vec![req("gpu", "NotIn", &["x"])]), &node));
        assert!(matches(&sel(&[], vec![req("pool", "Exists", &[])]), &node));
        assert!(!matches(&sel(&[], vec![req("gpu", "Exists", &[])]), &node));
        assert!(matches(
            &sel(&[], vec![req("gpu", "DoesNotExist", &[])]),
            &node
        ));
        // All terms must hold.
        assert!(!matches(
            &sel(&[("pool", "web")], vec![req("zone", "In", &["b"])]),
            &node
        ));
    }

    #[test]
    fn invalid_selectors_are_refused_not_treated_as_match_all() {
        let node = labels(&[("pool", "web")]);
        for bad in [
            req("pool", "In", &[]),
            req("pool", "Exists", &["web"]),
            req("pool", "Equals", &["web"]),
        ] {
            let r = resource(
                Some(Selector {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![bad.clone()],
                }),
                &[],
            );
            match decide(&r, &node, &[]) {
                Decision::Refused { reason } => {
                    assert!(reason.contains("nodeSelector is invalid"), "{reason}")
                }
                d => panic!("{bad:?}: {d:?}"),
            }
        }
    }

    #[test]
    fn secrets_outside_the_allowed_namespaces_refuse_the_whole_resource() {
        let node = labels(&[]);
        let allowed = vec!["team-a".to_string()];
        assert_eq!(
            decide(&resource(None, &[("team-a", "regcred")]), &node, &allowed),
            Decision::Apply
        );
        let d = decide(
            &resource(None, &[("team-a", "regcred"), ("kube-system", "x")]),
            &node,
            &allowed,
        );
        let Decision::Refused { reason } = d else {
            panic!("{d:?}")
        };
        assert!(reason.contains("kube-system/x"), "{reason}");
        assert!(reason.contains("pull_secret_namespaces"), "{reason}");
        // Not selected comes first: a node the resource is not for says nothing about it.
        let other = resource(
            Some(Selector {
                match_labels: labels(&[("pool", "gpu")]),
                ..Default::default()
            }),
            &[("kube-system", "x")],
        );
        assert_eq!(decide(&other, &node, &allowed), Decision::NotSelected);
    }

    #[test]
    fn the_reporter_says_each_change_once() {
        let mut r = Reporter::default();
        let pulled = |d: &str| Outcome::Pulled { digest: d.into() };
        let n = r
            .outcome("stack", "app:v1", pulled("sha256:1"))
            .expect("first");
        assert_eq!((n.reason, n.warning), ("Pulled", false));
        assert!(r.outcome("stack", "app:v1", pulled("sha256:1")).is_none());
        // The tag moved.
        assert!(r.outcome("stack", "app:v1", pulled("sha256:2")).is_some());
        let fail = |s: &str| Outcome::Failed { reason: s.into() };
        let n = r
            .outcome("stack", "app:v1", fail("registry_5xx"))
            .expect("failed");
        assert_eq!((n.reason, n.warning), ("PullFailed", true));
        assert!(r.outcome("stack", "app:v1", fail("registry_5xx")).is_none());
        assert!(r.outcome("stack", "app:v1", fail("timeout")).is_some());
        // Another image of the same resource is its own story.
        assert!(r.outcome("stack", "run:v2", pulled("sha256:3")).is_some());
        assert!(r.refused("other", "bad selector").is_some());
        assert!(r.refused("other", "bad selector").is_none());
        r.forget("stack");
        r.forget("other");
        assert!(r.outcome("stack", "app:v1", fail("timeout")).is_some());
        assert!(r.refused("other", "bad selector").is_some());
    }

    #[test]
    fn notes_are_clipped_to_the_events_limit() {
        assert_eq!(clip_note("short"), "short");
        let long = "é".repeat(1000);
        let c = clip_note(&long);
        assert!(c.len() <= 1024 && c.ends_with("..."), "{}", c.len());
    }

    proptest! {
        /// matchLabels behaves exactly like the equivalent `In` expressions.
        #[test]
        fn match_labels_equal_single_value_in(
            node in proptest::collection::btree_map("[a-c]", "[x-z]", 0..3),
            want in proptest::collection::btree_map("[a-c]", "[x-z]", 0..3),
        ) {
            let a = Selector { match_labels: want.clone(), match_expressions: vec![] };
            let b = Selector {
                match_labels: BTreeMap::new(),
                match_expressions: want
                    .iter()
                    .map(|(k, v)| req(k, "In", &[v]))
                    .collect(),
            };
            prop_assert_eq!(matches(&a, &node), matches(&b, &node));
            // NotIn is the negation of In for one key.
            for (k, v) in &want {
                let inn = Selector { match_labels: BTreeMap::new(), match_expressions: vec![req(k, "In", &[v])] };
                let not = Selector { match_labels: BTreeMap::new(), match_expressions: vec![req(k, "NotIn", &[v])] };
                prop_assert_ne!(matches(&inn, &node), matches(&not, &node));
            }
        }
    }
}
