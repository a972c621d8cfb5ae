//! Pre-pull planning: the union of the requested images' blobs, minus what the node already
//! has, each blob once, ordered so that the blobs most images need come first.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// What a blob is to the image that needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    Config,
    Layer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub kind: BlobKind,
}

/// One requested image, resolved to this node's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNeed {
    pub reference: String,
    pub manifest_digest: String,
    /// Config first, then layers bottom to top.
    pub blobs: Vec<Blob>,
}

/// A blob to fetch, with how many requested images need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedBlob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub kind: BlobKind,
    pub needed_by: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImagePlan {
    pub reference: String,
    pub manifest_digest: String,
    pub layers_to_fetch: usize,
    pub layers_present: usize,
    /// Bytes of this image's blobs that are not on the node yet (a blob shared with another
    /// requested image counts for each image; the fetch happens once).
    pub bytes_missing: u64,
    pub bytes_present: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Every missing blob exactly once, in fetch order.
    pub fetch: Vec<PlannedBlob>,
    pub images: Vec<ImagePlan>,
    /// Sum of the distinct blobs the requested images need (present or not).
    pub unique_bytes_needed: u64,
    /// Sum of `fetch`: what must cross the wire.
    pub bytes_to_fetch: u64,
    /// Distinct blobs already on the node.
    pub bytes_present: u64,
}

/// Plans a pre-pull. `present` holds the digests the node's content store already has.
///
/// Order: configs first (tiny, and needed to create image records early), then layers by how
/// many requested images need them (shared run-image, launcher and buildpack layers before
/// app layers), larger first among equals, then by digest so the plan is deterministic.
pub fn plan(images: &[ImageNeed], present: &BTreeSet<String>) -> Plan {
    let mut needed: BTreeMap<&str, (PlannedBlob, BTreeSet<usize>)> = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        for b in &img.blobs {
            let e = needed.entry(b.digest.as_str()).or_insert_with(|| {
                (
                    PlannedBlob {
                        digest: b.digest.clone(),
                        size: b.size,
                        media_type: b.media_type.clone(),
                        kind: b.kind,
                        needed_by: 0,
                    },
                    BTreeSet::new(),
                )
            });
            // A digest used as config by one image and layer by another stays one blob.
            e.0.kind = e.0.kind.min(b.kind);
            e.1.insert(i);
        }
    }
    let mut plan = Plan::default();
    for (digest, (mut pb, users)) in needed {
        pb.needed_by = users.len();
        plan.unique_bytes_needed += pb.size;
        if present.contains(digest) {
            plan.bytes_present += pb.size;
        } else {
            plan.bytes_to_fetch += pb.size;
            plan.fetch.push(pb);
        }
    }
    plan.fetch.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then(b.needed_by.cmp(&a.needed_by))
            .then(b.size.cmp(&a.size))
            .then(a.digest.cmp(&b.digest))
    });
    plan.images = images
        .iter()
        .map(|img| {
            let mut p = ImagePlan {
                reference: img.reference.clone(),
                manifest_digest: img.manifest_digest.clone(),
                ..Default::default()
            };
            let mut seen = BTreeSet::new();
            for b in img.blobs.iter().filter(|b| seen.insert(b.digest.as_str())) {
                let here = present.contains(&b.digest);
                if here {
                    p.bytes_present += b.size;
                } else {
                    p.bytes_missing += b.size;
                }
                if b.kind == BlobKind::Layer {
                    if here {
                        p.layers_present += 1;
                    } else {
                        p.layers_to_fetch += 1;
                    }
                }
            }
            p
        })
        .collect();
    plan
}

/// What `ragent prepull --json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub images: Vec<ImageReport>,
    pub total: Total,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImageReport {
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
    pub layers_fetched: usize,
    pub layers_reused: usize,
    /// Bytes of this image's blobs this run fetched (a blob shared by several requested
    /// images counts for each of them; `total.bytes_fetched` counts it once).
    pub bytes_fetched: u64,
    pub bytes_reused: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Total {
    /// Bytes of the blobs this run fetched, each blob once.
    pub bytes_fetched: u64,
    /// Bytes of needed blobs the node already had, or that a concurrent pull fetched.
    pub bytes_reused: u64,
    pub unique_bytes_needed: u64,
    pub seconds: f64,
}

/// The report of a run: `fetched` holds the digests this run wrote into the store; every other
/// needed blob counts as reused. `seconds[i]` is how long image `i` took to be ready.
pub fn report(
    images: &[ImageNeed],
    plan: &Plan,
    fetched: &BTreeSet<String>,
    seconds: &[f64],
    total_seconds: f64,
) -> Report {
    let per_image = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let mut r = ImageReport {
                reference: img.reference.clone(),
                digest: img.manifest_digest.clone(),
                seconds: seconds.get(i).copied().unwrap_or(total_seconds),
                ..Default::default()
            };
            let mut seen = BTreeSet::new();
            for b in img.blobs.iter().filter(|b| seen.insert(b.digest.as_str())) {
                let here = fetched.contains(&b.digest);
                if here {
                    r.bytes_fetched += b.size;
                } else {
                    r.bytes_reused += b.size;
                }
                if b.kind == BlobKind::Layer {
                    if here {
                        r.layers_fetched += 1;
                    } else {
                        r.layers_reused += 1;
                    }
                }
            }
            r
        })
        .collect();
    let bytes_fetched: u64 = plan
        .fetch
        .iter()
        .filter(|b| fetched.contains(&b.digest))
        .map(|b| b.size)
        .sum();
    Report {
        images: per_image,
        total: Total {
            bytes_fetched,
            bytes_reused: plan.unique_bytes_needed.saturating_sub(bytes_fetched),
            unique_bytes_needed: plan.unique_bytes_needed,
            seconds: total_seconds,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob(d: &str, size: u64, kind: BlobKind) -> Blob {
        Blob {
            digest: d.into(),
            size,
            media_type: String::new(),
            kind,
        }
    }

    fn app(name: &str, layers: &[(&str, u64)]) -> ImageNeed {
        let mut blobs = vec![blob(&format!("sha256:cfg-{name}"), 1, BlobKind::Config)];
        blobs.extend(layers.iter().map(|(d, s)| blob(d, *s, BlobKind::Layer)));
        ImageNeed {
            reference: format!("reg/{name}:v1"),
            manifest_digest: format!("sha256:m-{name}"),
            blobs,
        }
    }

    #[test]
    fn shared_layers_first_each_once_present_skipped() {
        let images = [
            app(
                "a",
                &[
                    ("sha256:run", 100),
                    ("sha256:launcher", 10),
                    ("sha256:app-a", 50),
                ],
            ),
            app(
                "b",
                &[
                    ("sha256:run", 100),
                    ("sha256:launcher", 10),
                    ("sha256:app-b", 60),
                ],
            ),
            app("c", &[("sha256:run", 100), ("sha256:app-c", 5)]),
        ];
        let present = BTreeSet::from(["sha256:launcher".to_string()]);
        let p = plan(&images, &present);
        let order: Vec<&str> = p.fetch.iter().map(|b| b.digest.as_str()).collect();
        assert_eq!(
            order,
            [
                "sha256:cfg-a",
                "sha256:cfg-b",
                "sha256:cfg-c",
                "sha256:run",
                "sha256:app-b",
                "sha256:app-a",
                "sha256:app-c"
            ]
        );
        assert_eq!(p.fetch[3].needed_by, 3);
        assert_eq!(p.bytes_to_fetch, 3 + 100 + 50 + 60 + 5);
        assert_eq!(p.bytes_present, 10);
        assert_eq!(p.unique_bytes_needed, p.bytes_to_fetch + p.bytes_present);
        assert_eq!(p.images[0].layers_present, 1);
        assert_eq!(p.images[0].layers_to_fetch, 2);
    }

    #[test]
    fn everything_present_means_nothing_to_fetch() {
        let images = [app("a", &[("sha256:run", 100)])];
        let present: BTreeSet<String> = images[0].blobs.iter().map(|b| b.digest.clone()).collect();
        let p = plan(&images, &present);
        assert!(p.fetch.is_empty());
        assert_eq!(p.bytes_to_fetch, 0);
        assert_eq!(p.images[0].bytes_missing, 0);
    }

    #[test]
    fn the_report_counts_shared_blobs_per_image_and_once_in_total() {
        let images = [
            app("a", &[("sha256:run", 100), ("sha256:app-a", 50)]),
            app("b", &[("sha256:run", 100), ("sha256:app-b", 60)]),
        ];
        let present = BTreeSet::from(["sha256:app-b".to_string()]);
        let p = plan(&images, &present);
        // A concurrent pull fetched cfg-b; this run fetched the rest of what was missing.
        let fetched: BTreeSet<String> = ["sha256:cfg-a", "sha256:run", "sha256:app-a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = report(&images, &p, &fetched, &[1.0, 2.0], 3.0);
        assert_eq!(r.images[0].layers_fetched, 2);
        assert_eq!(r.images[0].bytes_fetched, 1 + 100 + 50);
        assert_eq!(r.images[0].bytes_reused, 0);
        assert_eq!(r.images[1].layers_fetched, 1);
        assert_eq!(r.images[1].layers_reused, 1);
        assert_eq!(r.images[1].bytes_fetched, 100);
        assert_eq!(r.images[1].bytes_reused, 1 + 60);
        assert_eq!(r.images[1].seconds, 2.0);
        assert_eq!(r.total.bytes_fetched, 151);
        assert_eq!(r.total.unique_bytes_needed, 1 + 1 + 100 + 50 + 60);
        assert_eq!(r.total.bytes_reused, 61);
        assert_eq!(r.total.seconds, 3.0);
    }

    proptest! {
        #[test]
        fn each_missing_blob_once_and_bytes_add_up(
            sets in prop::collection::vec(prop::collection::vec(0usize..10, 0..6), 1..6),
            have in prop::collection::btree_set(0usize..10, 0..10),
        ) {
            let images: Vec<ImageNeed> = sets.iter().enumerate().map(|(i, ls)| {
                let layers: Vec<(String, u64)> = ls.iter().map(|l| (format!("sha256:{l}"), (*l as u64 + 1) * 7)).collect();
                let refs: Vec<(&str, u64)> = layers.iter().map(|(d, s)| (d.as_str(), *s)).collect();
                app(&format!("i{i}"), &refs)
            }).collect();
            let present: BTreeSet<String> = have.iter().map(|l| format!("sha256:{l}")).collect();
            let p = plan(&images, &present);
            let fetched: BTreeSet<&str> = p.fetch.iter().map(|b| b.digest.as_str()).collect();
            prop_assert_eq!(fetched.len(), p.fetch.len());
            for b in &p.fetch {
                prop_assert!(!present.contains(&b.digest));
            }
            let all: BTreeSet<&str> = images.iter().flat_map(|i| i.blobs.iter().map(|b| b.digest.as_str())).collect();
            for d in &all {
                prop_assert!(present.contains(*d) || fetched.contains(d));
            }
            prop_assert_eq!(p.unique_bytes_needed, p.bytes_to_fetch + p.bytes_present);
            // Shared before rare: among layers, needed_by never increases along the order.
            let layers: Vec<usize> = p.fetch.iter().filter(|b| b.kind == BlobKind::Layer).map(|b| b.needed_by).collect();
            prop_assert!(layers.windows(2).all(|w| w[0] >= w[1]));
        }
    }
}
