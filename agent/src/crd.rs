//! The `PrePull` custom resource (`prepulls.ragent.dev`): which images the nodes a selector
//! picks keep pulled, with which pull secrets.
//!
//! The schema is generated from these types; `deploy/helm/ragent/crds/prepulls.ragent.dev.yaml`
//! is its checked-in copy (`ragent crd` prints it; a unit test fails when they differ).
//!
//! Cluster-scoped and read-only for agents: every agent reads every `PrePull`, applies those
//! whose selector matches its node and reports per node through Events. No agent writes to
//! the resource, so 5,000 nodes do not contend on one object.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::prepulls::{Requirement, Resource, SecretRef, Selector};

/// Where the checked-in CRD lives, relative to the repository root.
pub const CRD_PATH: &str = "deploy/helm/ragent/crds/prepulls.ragent.dev.yaml";

/// Images that the selected nodes keep pulled before pods need them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ragent.dev",
    version = "v1alpha1",
    kind = "PrePull",
    plural = "prepulls",
    shortname = "pp",
    category = "ragent",
    doc = "Images that ragent keeps pulled on the nodes the selector picks. Agents only read it; per-node outcomes are Events (reason Pulled, PullFailed, Refused) and the ragent_prepull_* metrics.",
    printcolumn(
        name = "First image",
        type_ = "string",
        json_path = ".spec.images[0]",
        description = "the first of the images"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PrePullSpec {
    /// Image references (registry/repository:tag or @sha256:digest). Shared layers are fetched
    /// first and once, whichever images name them.
    #[schemars(length(min = 1, max = 256))]
    pub images: Vec<String>,
    /// Which nodes pull them (their labels); absent or empty: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Secrets of type kubernetes.io/dockerconfigjson holding the registries' credentials. An
    /// agent reads only these, and only in the namespaces its configuration allows; an image
    /// is never pulled with credentials another resource names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<PullSecretRef>,
    /// Re-resolve tags this often (seconds), so a moved tag is pulled again; absent: the
    /// agent's `[prepull] refresh_interval_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30))]
    pub refresh_interval_seconds: Option<u64>,
}

/// A namespaced secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PullSecretRef {
    #[schemars(length(min = 1))]
    pub namespace: String,
    #[schemars(length(min = 1))]
    pub name: String,
}

/// The CRD as YAML, exactly as checked in.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = PrePull::crd();
    let body = serde_yaml_ng::to_string(&crd).unwrap_or_else(|e| {
        // Serializing a value built from static types cannot fail; say so if it ever does.
        format!("# the CRD could not be serialized: {e}\n")
    });
    format!(
        "# Generated from agent/src/crd.rs by `ragent crd`; do not edit (a unit test compares).\n{body}"
    )
}

/// The resource as the pure core sees it.
pub fn to_core(pp: &PrePull) -> Resource {
    let spec = &pp.spec;
    Resource {
        name: pp.metadata.name.clone().unwrap_or_default(),
        generation: pp.metadata.generation.unwrap_or(0),
        images: spec.images.clone(),
        selector: spec.node_selector.as_ref().map(selector),
        secrets: spec
            .pull_secrets
            .iter()
            .map(|s| SecretRef {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            })
            .collect(),
        refresh: spec
            .refresh_interval_seconds
            .map(std::time::Duration::from_secs),
    }
}

fn selector(s: &LabelSelector) -> Selector {
    Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|e| Requirement {
                key: e.key.clone(),
                operator: e.operator.clone(),
                values: e.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_crd_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_PATH);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == crd_yaml(),
            "{} differs from the CRD generated from agent/src/crd.rs: run `cargo run -p ragent -- crd > {CRD_PATH}`",
            path.display()
        );
    }

    #[test]
    fn the_crd_is_cluster_scoped_and_has_no_status_to_write() {
        use kube::CustomResourceExt;
        let crd = PrePull::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.plural, "prepulls");
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources.is_none(),
            "agents must have nothing to write"
        );
        let schema = serde_json::to_value(&v.schema).expect("schema");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["images"]));
        assert_eq!(spec["properties"]["images"]["minItems"], 1);
        assert_eq!(
            spec["properties"]["refreshIntervalSeconds"]["minimum"],
            30.0
        );
    }

    #[test]
    fn a_realistic_object_converts_to_the_core_model() {
        let pp: PrePull = serde_json::from_value(serde_json::json!({
            "apiVersion": "ragent.dev/v1alpha1",
            "kind": "PrePull",
            "metadata": {"name": "python-stack", "generation": 3, "uid": "1d6c2b"},
            "spec": {
                "images": ["registry.example/app:v1", "registry.example/run:v2"],
                "nodeSelector": {
                    "matchLabels": {"pool": "web"},
                    "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]
                },
                "pullSecrets": [{"namespace": "team-a", "name": "regcred"}],
                "refreshIntervalSeconds": 600
            }
        }))
        .expect("a valid PrePull");
        let r = to_core(&pp);
        assert_eq!(r.name, "python-stack");
        assert_eq!(r.generation, 3);
        assert_eq!(r.images.len(), 2);
        let s = r.selector.expect("selector");
        assert_eq!(s.match_labels["pool"], "web");
        assert_eq!(s.match_expressions[0].operator, "In");
        assert_eq!(s.match_expressions[0].values, ["a", "b"]);
        assert_eq!(r.secrets[0].namespace, "team-a");
        assert_eq!(r.refresh, Some(std::time::Duration::from_secs(600)));
    }
}
