//! The node inventory: images grouped by manifest digest, each layer's role and how many local
//! images share it, and the node summary (bytes a layer-unaware store would hold vs unique bytes).
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    cnb::{self, CnbInfo, Role},
    oci::{Descriptor, ImageConfig},
};

/// How many layers the summary lists as most shared.
pub const MOST_SHARED: usize = 5;

/// One image record resolved to its manifest and config (by the containerd adapter).
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    /// Digest of the platform manifest (for an index: the entry chosen for this node).
    pub manifest_digest: String,
    /// The image record's own target when it differs (an index).
    pub index_digest: Option<String>,
    pub layers: Vec<Descriptor>,
    pub config: ImageConfig,
}

/// An image record that could not be resolved (content missing, malformed manifest...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unresolved {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    pub images: Vec<ImageEntry>,
    pub unresolved: Vec<Unresolved>,
    pub summary: Summary,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageEntry {
    /// The name shown first: a tag-like name when there is one, not a `sha256:` CRI alias.
    pub name: String,
    pub names: Vec<String>,
    /// The platform manifest digest.
    pub digest: String,
    pub index_digest: Option<String>,
    pub platform: String,
    pub size_bytes: u64,
    pub layers: Vec<LayerEntry>,
    pub cnb: Option<CnbInfo>,
    pub warnings: Vec<String>,
    /// For an image whose buildpacks provide a JVM: its JVM option variables (`NAME=value`
    /// entries of `Env`, see `core::rightsizing::JVM_OPTION_VARIABLES`); None otherwise.
    #[serde(skip)]
    pub jvm_env: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerEntry {
    pub digest: String,
    pub diff_id: Option<String>,
    pub size_bytes: u64,
    pub role: Role,
    /// How many local images (distinct manifests) have this layer blob.
    pub shared_by: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub images: usize,
    pub layers: usize,
    /// Sum over images of their layers' compressed sizes: what a layer-unaware store would hold.
    pub total_layer_bytes: u64,
    /// Sum of the distinct layer blobs' sizes.
    pub unique_layer_bytes: u64,
    /// total / unique; `None` when there are no layers.
    pub dedup_ratio: Option<f64>,
    /// Unique bytes by the role a layer plays (a layer seen in several roles counts once, in the
    /// first role of `Role::ALL` order).
    pub unique_bytes_by_role: BTreeMap<Role, u64>,
    pub most_shared: Vec<SharedLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SharedLayer {
    pub digest: String,
    pub size_bytes: u64,
    pub role: Role,
    pub shared_by: usize,
}

/// Whether a name is one of the `sha256:<config>` aliases the CRI plugin adds, or a pure
/// digest reference, rather than a name someone chose.
pub fn is_alias_name(name: &str) -> bool {
    name.starts_with("sha256:") || name.contains("@sha256:")
}

pub(crate) fn primary_name(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .find(|n| !is_alias_name(n))
        .or_else(|| names.iter().find(|n| !n.starts_with("sha256:")))
        .or_else(|| names.iter().next())
        .cloned()
        .unwrap_or_default()
}

/// Builds the inventory from resolved image records. Records that point at the same manifest
/// are one image with several names.
pub fn build(resolved: Vec<ResolvedImage>, unresolved: Vec<Unresolved>) -> Inventory {
    // Group by manifest digest; the first record of a group supplies layers and config.
    let mut groups: BTreeMap<String, (BTreeSet<String>, ResolvedImage)> = BTreeMap::new();
    for r in resolved {
        groups
            .entry(r.manifest_digest.clone())
            .and_modify(|(names, _)| {
                names.insert(r.name.clone());
            })
            .or_insert_with(|| (BTreeSet::from([r.name.clone()]), r));
    }

    // shared_by: distinct manifests per layer blob.
    let mut sharers: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, img) in groups.values() {
        let distinct: BTreeSet<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
        for d in distinct {
            *sharers.entry(d).or_default() += 1;
        }
    }

    let mut images = Vec::with_capacity(groups.len());
    for (digest, (names, img)) in &groups {
        let mut warnings = Vec::new();
        let cnb = match cnb::parse(&img.config) {
            Ok(c) => c,
            Err(e) => {
                warnings.push(format!("CNB metadata ignored: {e}"));
                None
            }
        };
        if img.config.diff_ids.len() != img.layers.len() {
            warnings.push(format!(
                "the config lists {} diffIDs for {} layers: diffIDs and roles are not reliable",
                img.config.diff_ids.len(),
                img.layers.len()
            ));
        }
        let (roles, role_warnings) =
            classify_layers_for(&img.config, img.layers.len(), cnb.as_ref());
        warnings.extend(role_warnings);
        let layers: Vec<LayerEntry> = img
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerEntry {
                digest: l.digest.clone(),
                diff_id: img.config.diff_ids.get(i).cloned(),
                size_bytes: l.size,
                role: roles.get(i).copied().unwrap_or(Role::Unknown),
                shared_by: sharers.get(l.digest.as_str()).copied().unwrap_or(1),
            })
            .collect();
        let platform = match &img.config.variant {
            Some(v) => format!("{}/{}/{v}", img.config.os, img.config.architecture),
            None => format!("{}/{}", img.config.os, img.config.architecture),
        };
        images.push(ImageEntry {
            name: primary_name(names),
            names: names.iter().cloned().collect(),
            digest: digest.clone(),
            index_digest: img.index_digest.clone(),
            platform,
            size_bytes: layers.iter().map(|l| l.size_bytes).sum(),
            layers,
            jvm_env: cnb
                .as_ref()
                .filter(|c| super::usage::runs_jvm(&c.info.buildpacks))
                .map(|_| {
                    img.config
                        .env
                        .iter()
                        .filter(|kv| {
                            kv.split_once('=').is_some_and(|(k, _)| {
                                super::rightsizing::JVM_OPTION_VARIABLES.contains(&k)
                            })
                        })
                        .cloned()
                        .collect()
                }),
            cnb: cnb.map(|c| c.info),
            warnings,
        });
    }
    images.sort_by(|a, b| a.name.cmp(&b.name).then(a.digest.cmp(&b.digest)));
    let summary = summarize(&images);
    Inventory {
        images,
        unresolved,
        summary,
    }
}

fn classify_layers_for(
    config: &ImageConfig,
    n_layers: usize,
    cnb: Option<&cnb::CnbImage>,
) -> (Vec<Role>, Vec<String>) {
    if config.diff_ids.len() != n_layers {
        return (vec![Role::Unknown; n_layers], Vec::new());
    }
    cnb::classify_layers(&config.diff_ids, cnb)
}

fn summarize(images: &[ImageEntry]) -> Summary {
    let mut total = 0u64;
    // digest -> (size, roles seen, shared_by)
    let mut unique: BTreeMap<&str, (u64, BTreeSet<Role>, usize)> = BTreeMap::new();
    for img in images {
        for l in &img.layers {
            total += l.size_bytes;
            let e = unique.entry(l.digest.as_str()).or_insert((
                l.size_bytes,
                BTreeSet::new(),
                l.shared_by,
            ));
            e.1.insert(l.role);
        }
    }
    let unique_bytes: u64 = unique.values().map(|(s, _, _)| *s).sum();
    let mut by_role: BTreeMap<Role, u64> = BTreeMap::new();
    let mut shared: Vec<SharedLayer> = Vec::new();
    for (digest, (size, roles, shared_by)) in &unique {
        // A layer known by some image in a definite role is reported in that role.
        let role = Role::ALL
            .into_iter()
            .find(|r| roles.contains(r))
            .unwrap_or(Role::Unknown);
        *by_role.entry(role).or_default() += size;
        shared.push(SharedLayer {
            digest: digest.to_string(),
            size_bytes: *size,
            role,
            shared_by: *shared_by,
        });
    }
    shared.sort_by(|a, b| {
        b.shared_by
            .cmp(&a.shared_by)
            .then(b.size_bytes.cmp(&a.size_bytes))
            .then(a.digest.cmp(&b.digest))
    });
    shared.retain(|s| s.shared_by > 1);
    shared.truncate(MOST_SHARED);
    Summary {
        images: images.len(),
        layers: unique.len(),
        total_layer_bytes: total,
        unique_layer_bytes: unique_bytes,
        dedup_ratio: (unique_bytes > 0).then(|| total as f64 / unique_bytes as f64),
        unique_bytes_by_role: by_role,
        most_shared: shared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::oci::MEDIA_OCI_MANIFEST;
    use proptest::prelude::*;

    fn layer(d: &str, size: u64) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d.into(),
            size,
            platform: None,
            annotations: Default::default(),
        }
    }

    fn img(
        name: &str,
        manifest: &str,
        layers: &[(&str, u64)],
        labels: &[(&str, &str)],
    ) -> ResolvedImage {
        ResolvedImage {
            name: name.into(),
            manifest_digest: manifest.into(),
            index_digest: None,
            layers: layers.iter().map(|(d, s)| layer(d, *s)).collect(),
            config: ImageConfig {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
                diff_ids: layers.iter().map(|(d, _)| format!("{d}-diff")).collect(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                env: vec![],
            },
        }
    }

    #[test]
    fn cri_config_aliases_do_not_count_as_images() {
        let a = img("reg/app:v1", "sha256:m1", &[("sha256:l1", 10)], &[]);
        let mut alias = a.clone();
        alias.name = "sha256:configdigest".into();
        let mut by_digest = a.clone();
        by_digest.name = "reg/app@sha256:m1".into();
        let inv = build(vec![alias, a, by_digest], vec![]);
        assert_eq!(inv.summary.images, 1);
        assert_eq!(inv.images[0].name, "reg/app:v1");
        assert_eq!(inv.images[0].names.len(), 3);
        assert_eq!(inv.summary.total_layer_bytes, 10);
    }

    #[test]
    fn shared_layers_are_counted_once_in_unique_bytes() {
        let a = img(
            "a",
            "sha256:ma",
            &[("sha256:run", 100), ("sha256:appa", 5)],
            &[],
        );
        let b = img(
            "b",
            "sha256:mb",
            &[("sha256:run", 100), ("sha256:appb", 7)],
            &[],
        );
        let inv = build(vec![a, b], vec![]);
        assert_eq!(inv.summary.total_layer_bytes, 212);
        assert_eq!(inv.summary.unique_layer_bytes, 112);
        assert_eq!(inv.summary.layers, 3);
        let ratio = inv.summary.dedup_ratio.unwrap();
        assert!((ratio - 212.0 / 112.0).abs() < 1e-12);
        assert_eq!(inv.images[0].layers[0].shared_by, 2);
        assert_eq!(inv.images[0].layers[1].shared_by, 1);
        assert_eq!(inv.summary.most_shared.len(), 1);
        assert_eq!(inv.summary.most_shared[0].digest, "sha256:run");
    }

    #[test]
    fn empty_node_has_no_ratio() {
        let inv = build(vec![], vec![]);
        assert_eq!(inv.summary.dedup_ratio, None);
        assert_eq!(inv.summary.images, 0);
        let json = serde_json::to_value(&inv).unwrap();
        assert!(json["summary"]["dedup_ratio"].is_null());
    }

    #[test]
    fn malformed_cnb_label_is_a_warning_on_that_image() {
        let a = img(
            "a",
            "sha256:ma",
            &[("sha256:l", 1)],
            &[(cnb::LABEL_LIFECYCLE, "{bad")],
        );
        let inv = build(vec![a], vec![]);
        assert!(inv.images[0].cnb.is_none());
        assert_eq!(inv.images[0].layers[0].role, Role::Unknown);
        assert!(inv.images[0].warnings[0].contains(cnb::LABEL_LIFECYCLE));
    }

    #[test]
    fn json_has_the_documented_fields() {
        let a = img("a", "sha256:ma", &[("sha256:l", 1)], &[]);
        let v = serde_json::to_value(build(vec![a], vec![])).unwrap();
        let i = &v["images"][0];
        for k in ["name", "names", "digest", "layers", "cnb"] {
            assert!(i.get(k).is_some(), "missing {k}");
        }
        let l = &i["layers"][0];
        for k in ["digest", "diff_id", "size_bytes", "role", "shared_by"] {
            assert!(l.get(k).is_some(), "missing {k}");
        }
        assert_eq!(l["role"], "unknown");
        for k in [
            "images",
            "total_layer_bytes",
            "unique_layer_bytes",
            "dedup_ratio",
        ] {
            assert!(v["summary"].get(k).is_some(), "missing {k}");
        }
        let _ = MEDIA_OCI_MANIFEST;
    }

    proptest! {
        // For any set of images over a small pool of layers: unique <= total, unique equals the
        // sum over distinct digests, shared_by equals the number of images holding the layer.
        #[test]
        fn summary_invariants(images in prop::collection::vec(prop::collection::vec(0usize..8, 0..6), 0..6)) {
            let sizes = [1u64, 10, 100, 1000, 7, 70, 700, 7000];
            let resolved: Vec<ResolvedImage> = images.iter().enumerate().map(|(i, ls)| {
                let layers: Vec<(String, u64)> = ls.iter().map(|l| (format!("sha256:{l}"), sizes[*l])).collect();
                let refs: Vec<(&str, u64)> = layers.iter().map(|(d, s)| (d.as_str(), *s)).collect();
                img(&format!("img{i}"), &format!("sha256:m{i}"), &refs, &[])
            }).collect();
            let inv = build(resolved, vec![]);
            let distinct: BTreeSet<usize> = images.iter().flatten().copied().collect();
            let unique: u64 = distinct.iter().map(|l| sizes[*l]).sum();
            let total: u64 = images.iter().flatten().map(|l| sizes[*l]).sum();
            prop_assert_eq!(inv.summary.unique_layer_bytes, unique);
            prop_assert_eq!(inv.summary.total_layer_bytes, total);
            prop_assert!(inv.summary.unique_layer_bytes <= inv.summary.total_layer_bytes);
            for e in &inv.images {
                for l in &e.layers {
                    let holders = inv.images.iter().filter(|o| o.layers.iter().any(|x| x.digest == l.digest)).count();
                    prop_assert_eq!(l.shared_by, holders);
                }
            }
        }
    }
}
