//! `ragent images` against images pulled for real into containerd.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::support::*;

/// The images this test pulls through CRI (as kubelet would).
const CRI_PULLS: &[&str] = &[
    "ragent/app-py-web",
    "ragent/app-py-worker",
    "ragent/app-jvm-api",
    "ragent/app-jvm-batch",
    "ragent/app-py-legacy",
    "ragent/app-norebase",
    "ragent/app-broken-label",
];

fn images_json(node: &ragent_testkit::node::Node) -> Value {
    let out = ragent(node, &["images", "--json"]);
    assert!(
        out.status.success(),
        "ragent images --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ragent images --json prints one JSON document")
}

fn entry<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["images"]
        .as_array()
        .expect("images[]")
        .iter()
        .find(|i| {
            i["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == name))
        })
        .unwrap_or_else(|| panic!("{name} is not in ragent images"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_json_matches_containerd_and_the_builder() {
    let node = node();
    let set = fixtures(&node);
    for repo in CRI_PULLS {
        cri_pull(&node, &set.reference(repo, "v1")).await;
    }
    cri_pull(&node, &set.reference("ragent/run", "v1")).await;
    cri_pull(&node, &set.reference("ragent/pause", "3.9")).await;
    let doc = images_json(&node);

    // Every pulled image is one entry with the builder's manifest digest, whatever aliases CRI added.
    let mut expected = Vec::new();
    for (repo, tag) in CRI_PULLS
        .iter()
        .map(|r| (*r, "v1"))
        .chain([("ragent/run", "v1"), ("ragent/pause", "3.9")])
    {
        let want = set.image(repo, tag).expect("fixture");
        let e = entry(&doc, &set.reference(repo, tag));
        assert_eq!(e["digest"], want.manifest_digest, "{repo}:{tag}");
        assert_eq!(
            e["name"],
            set.reference(repo, tag),
            "the primary name is the tag, not a sha256: alias"
        );
        let layers = e["layers"].as_array().expect("layers[]");
        assert_eq!(layers.len(), want.layers.len(), "{repo}");
        for (got, want_l) in layers.iter().zip(&want.layers) {
            assert_eq!(got["digest"], want_l.digest);
            assert_eq!(got["diff_id"], want_l.diff_id);
            assert_eq!(got["size_bytes"], want_l.size);
            if want.purpose == "malformed-label" {
                // ragent cannot know the roles: the label is broken, and it says so.
                assert_eq!(got["role"], "unknown", "{repo}");
            } else {
                assert_eq!(got["role"], want_l.role, "{repo} layer {}", want_l.name);
            }
        }
        expected.push(want.clone());
    }

    // The broken label is a warning on that image, not a failure.
    let broken = entry(&doc, &set.reference("ragent/app-broken-label", "v1"));
    assert!(broken["cnb"].is_null());
    let warnings = broken["warnings"].as_array().expect("warnings");
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap_or("")
            .contains("io.buildpacks.lifecycle.metadata")),
        "{warnings:?}"
    );

    // CNB facts.
    let legacy = entry(&doc, &set.reference("ragent/app-py-legacy", "v1"));
    assert_eq!(legacy["cnb"]["platform_api"], "0.10");
    assert_eq!(legacy["cnb"]["stack_id"], "io.ragent.stacks.sample");
    assert_eq!(
        legacy["cnb"]["run_image"]["image"],
        set.reference("ragent/run", "v1")
    );
    let run = set.image("ragent/run", "v1").expect("run:v1");
    let api = entry(&doc, &set.reference("ragent/app-jvm-api", "v1"));
    assert_eq!(api["cnb"]["run_image"]["reference"], run.manifest_digest);
    assert_eq!(api["cnb"]["run_image"]["top_layer"], run.layers[1].diff_id);
    let bps: Vec<&str> = api["cnb"]["buildpacks"]
        .as_array()
        .expect("buildpacks")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(bps, ["ragent-samples/jre", "ragent-samples/executable-jar"]);
    assert_eq!(
        entry(&doc, &set.reference("ragent/app-norebase", "v1"))["cnb"]["rebasable"],
        false
    );
    assert_eq!(
        entry(&doc, &set.reference("ragent/run", "v1"))["cnb"]["kind"],
        "run-image"
    );
    assert!(entry(&doc, &set.reference("ragent/pause", "3.9"))["cnb"].is_null());

    // CRI's sha256:<config> names are not extra images: the count is distinct manifests.
    let images = doc["images"].as_array().expect("images[]");
    let manifests: BTreeSet<&str> = images.iter().filter_map(|i| i["digest"].as_str()).collect();
    assert_eq!(doc["summary"]["images"], manifests.len());
    assert_eq!(images.len(), manifests.len());
    let aliases = images
        .iter()
        .flat_map(|i| i["names"].as_array().cloned().unwrap_or_default())
        .filter(|n| n.as_str().is_some_and(|s| s.starts_with("sha256:")))
        .count();
    assert!(
        aliases > 0,
        "CRI adds sha256:<config> names; the test would not show they are filtered"
    );

    // unique_layer_bytes = sum of the distinct layer blobs' sizes as containerd reports them.
    let mut distinct = BTreeMap::new();
    for i in images {
        for l in i["layers"].as_array().expect("layers") {
            distinct.insert(l["digest"].as_str().expect("digest").to_string(), ());
        }
    }
    let mut from_containerd = 0;
    for d in distinct.keys() {
        from_containerd += content_size(&node, d).await;
    }
    assert_eq!(doc["summary"]["unique_layer_bytes"], from_containerd);
    let total: u64 = images
        .iter()
        .flat_map(|i| i["layers"].as_array().cloned().unwrap_or_default())
        .map(|l| l["size_bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(doc["summary"]["total_layer_bytes"], total);
    let ratio = doc["summary"]["dedup_ratio"].as_f64().expect("a ratio");
    assert!((ratio - total as f64 / from_containerd as f64).abs() < 1e-9);
    // The pulled CNB apps share their run, launcher and buildpack layers.
    assert!(ratio > 1.5, "dedup ratio {ratio}");
    // shared_by of run:v1's base layer counts every local image that has it.
    let base = &run.layers[0].digest;
    let holders = images
        .iter()
        .filter(|i| {
            i["layers"]
                .as_array()
                .is_some_and(|ls| ls.iter().any(|l| l["digest"] == *base))
        })
        .count();
    assert!(holders >= 7);
    for i in images {
        for l in i["layers"].as_array().expect("layers") {
            if l["digest"] == *base {
                assert_eq!(l["shared_by"], holders);
            }
        }
    }
    let _ = expected;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_resolves_an_index_to_this_platform_and_keeps_other_arches() {
    let node = node();
    let set = fixtures(&node);
    cri_pull(&node, &set.reference("ragent/app-multi", "v1")).await;
    // An arm64-only image, pulled for its platform.
    let out = node
        .ctr("k8s.io")
        .args([
            "images",
            "pull",
            "--plain-http",
            "--platform",
            "linux/arm64",
            "--hosts-dir",
        ])
        .arg(node.hosts_dir())
        .arg(set.reference("ragent/app-arm64", "v1"))
        .output()
        .expect("ctr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = images_json(&node);

    let index = &set.indexes[0];
    let amd = index
        .manifests
        .iter()
        .find(|m| m.platform == "linux/amd64")
        .expect("amd64 entry");
    let e = entry(&doc, &set.reference("ragent/app-multi", "v1"));
    assert_eq!(e["digest"], amd.manifest_digest);
    assert_eq!(e["index_digest"], index.digest);
    assert_eq!(e["platform"], "linux/amd64");
    for (got, want) in e["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .zip(&amd.layers)
    {
        assert_eq!(got["role"], want.role);
    }

    let arm = set.image("ragent/app-arm64", "v1").expect("fixture");
    let e = entry(&doc, &set.reference("ragent/app-arm64", "v1"));
    assert_eq!(e["digest"], arm.manifest_digest);
    assert_eq!(e["platform"], "linux/arm64");
    let roles: Vec<&str> = e["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["role"].as_str())
        .collect();
    let want: Vec<&str> = arm.layers.iter().map(|l| l.role.as_str()).collect();
    assert_eq!(roles, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_table_is_readable() {
    let node = node();
    let set = fixtures(&node);
    cri_pull(&node, &set.reference("ragent/app-py-web", "v1")).await;
    let out = ragent(&node, &["images"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&set.reference("ragent/app-py-web", "v1")),
        "{text}"
    );
    assert!(
        text.contains("run-image") && text.contains("buildpack") && text.contains("launcher"),
        "{text}"
    );
    assert!(text.contains("dedup ratio"), "{text}");
    assert!(text.contains("most shared layers:"), "{text}");
}
