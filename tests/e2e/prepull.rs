//! `ragent prepull` against the real registry and containerd: each missing blob crosses the
//! wire once (checked against the registry's access log), a second run fetches nothing, and
//! the images are listed by CRI and unpacked.
use std::collections::BTreeSet;

use containerd_client::tonic::Request;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest, image_service_client::ImageServiceClient};
use ragent::adapters::containerd::Containerd;
use serde_json::Value;

use crate::support::*;

const IMAGES: &[(&str, &str)] = &[
    ("ragent/app-py-legacy", "v1"),
    ("ragent/app-norebase", "v1"),
    ("ragent/app-jvm-api", "v1"),
    ("ragent/run", "v2"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepull_fetches_each_missing_blob_once_and_cri_sees_the_images() {
    let node = node();
    let set = fixtures(&node);
    // Start from a store without these images and without their own (unshared) blobs.
    for (repo, tag) in IMAGES {
        make_missing(&node, &set, repo, tag).await;
    }
    // What must cross the wire: the distinct blobs (configs and layers) not in the store now.
    let mut needed = BTreeSet::new();
    for (repo, tag) in IMAGES {
        let img = set.image(repo, tag).expect("fixture");
        needed.insert((
            img.config_digest.clone(),
            std::fs::metadata(
                set.layout
                    .join("blobs/sha256")
                    .join(img.config_digest.trim_start_matches("sha256:")),
            )
            .expect("config blob")
            .len(),
        ));
        for l in &img.layers {
            needed.insert((l.digest.clone(), l.size));
        }
    }
    let mut missing = 0;
    for (d, size) in &needed {
        if content_size_opt(&node, d).await.is_none() {
            missing += size;
        }
    }
    assert!(missing > 0, "the test must start with something to fetch");

    let log_path = node.dir().join("registry.log");
    let mark = std::fs::read_to_string(&log_path)
        .expect("registry log")
        .lines()
        .count();
    let refs: Vec<String> = IMAGES.iter().map(|(r, t)| set.reference(r, t)).collect();
    let mut args = vec!["prepull", "--json", "--insecure-registry"];
    let reg = node.registry();
    args.push(&reg);
    args.extend(refs.iter().map(String::as_str));
    let out = ragent(&node, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    let (served, gets) = served_blob_bytes(&std::fs::read_to_string(&log_path).expect("log"), mark);
    assert_eq!(
        report["total"]["bytes_fetched"], missing,
        "ragent fetched exactly what was missing"
    );
    assert_eq!(
        served, missing,
        "the registry served each missing blob once ({gets} blob GETs)"
    );
    let unique: u64 = needed.iter().map(|(_, s)| s).sum();
    assert_eq!(report["total"]["unique_bytes_needed"], unique);

    // Every image: the builder's digest, listed by CRI by its name, unpacked.
    let channel = containerd_client::connect(node.socket())
        .await
        .expect("CRI");
    let mut cri = ImageServiceClient::new(channel);
    for ((repo, tag), r) in IMAGES.iter().zip(&refs) {
        let img = set.image(repo, tag).expect("fixture");
        let entry = report["images"]
            .as_array()
            .expect("images")
            .iter()
            .find(|i| i["ref"] == *r)
            .expect("reported");
        assert_eq!(entry["digest"], img.manifest_digest);
        let status = cri
            .image_status(Request::new(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: r.clone(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .await
            .expect("ImageStatus")
            .into_inner();
        assert!(
            status.image.is_some_and(|i| i.repo_tags.contains(r)),
            "CRI does not list {r}"
        );
        assert!(unpacked(&node, &set, repo, tag), "{r} is not unpacked");
    }

    // Blobs say where they came from, as containerd's own pulls do (the agent's pull-traffic
    // attribution and containerd's cross-repository mounts read it).
    let c = ragent::adapters::containerd::Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("containerd");
    let content = c.list_content().await.expect("Content.List");
    let img = set.image(IMAGES[0].0, IMAGES[0].1).expect("fixture");
    let (key, repo) = ragent::core::pulls::distribution_source_label(&refs[0]);
    for digest in img
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&img.manifest_digest])
    {
        let blob = content
            .iter()
            .find(|b| &b.digest == digest)
            .expect("in the store");
        // A blob fetched before (by another test, for another repository) keeps its labels.
        if let Some(v) = blob.labels.get(&key) {
            assert!(v.split(',').any(|r| r.starts_with("ragent/")), "{key}={v}");
        }
    }
    let manifest = content
        .iter()
        .find(|b| b.digest == img.manifest_digest)
        .expect("manifest");
    assert_eq!(
        manifest.labels.get(&key),
        Some(&repo),
        "{:?}",
        manifest.labels
    );

    // The run's lease is gone (nothing stays pinned by ragent).
    let leases = node
        .ctr("k8s.io")
        .args(["leases", "ls"])
        .output()
        .expect("ctr");
    let leases = String::from_utf8_lossy(&leases.stdout);
    assert!(!leases.contains("ragent-prepull"), "{leases}");

    // A second run fetches nothing.
    let mark = std::fs::read_to_string(&log_path)
        .expect("log")
        .lines()
        .count();
    let out = ragent(&node, &args);
    assert!(out.status.success());
    let again: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(again["total"]["bytes_fetched"], 0);
    let (served, gets) = served_blob_bytes(&std::fs::read_to_string(&log_path).expect("log"), mark);
    assert_eq!((served, gets), (0, 0));
}

#[test]
fn prepull_errors_say_what_to_do() {
    let node = node();
    let set = fixtures(&node);
    let out = ragent(
        &node,
        &[
            "prepull",
            "--insecure-registry",
            &node.registry(),
            &set.reference("ragent/no-such-image", "v1"),
        ],
    );
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ragent/no-such-image") && text.contains("manifest unknown"),
        "{text}"
    );
    // Plain-HTTP registry without --insecure-registry.
    let out = ragent(&node, &["prepull", &set.reference("ragent/run", "v1")]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--insecure-registry"), "{text}");
    // Nothing given.
    let out = ragent(&node, &["prepull"]);
    assert_eq!(out.status.code(), Some(2));
}

const SET_A: &[(&str, &str)] = &[("ragent/app-py-web", "v1"), ("ragent/app-py-worker", "v1")];
const SET_B: &[(&str, &str)] = &[
    ("ragent/app-py-worker", "v1"),
    ("ragent/app-jvm-batch", "v1"),
];

fn refs_of(set: &ragent_testkit::fixtures::FixtureSet, images: &[(&str, &str)]) -> Vec<String> {
    images.iter().map(|(r, t)| set.reference(r, t)).collect()
}

/// Both sets together: what must cross the wire once the store holds no image content.
async fn union_missing(node: &ragent_testkit::node::Node) -> u64 {
    let set = fixtures(node);
    let union: Vec<(&str, &str)> = SET_A.iter().chain(SET_B).copied().collect();
    let missing = missing_bytes(node, &set, &union).await;
    let all: u64 = blobs_of(&set, &union).iter().map(|(_, s)| s).sum();
    assert_eq!(
        missing, all,
        "the test must start with none of the blobs (run-image and buildpack layers included)"
    );
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_overlapping_prepull_processes_fetch_each_blob_once() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let missing = union_missing(&node).await;
    let mark = registry_log_mark(&node);
    let reg = node.registry();
    let spawn = |images: &[(&str, &str)]| {
        let mut c = std::process::Command::new(ragent_bin());
        c.env("RAGENT_CONTAINERD", node.socket())
            .args([
                "prepull",
                "--json",
                "--concurrency",
                "2",
                "--insecure-registry",
                &reg,
            ])
            .args(refs_of(&set, images))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("ragent prepull")
    };
    let (a, b) = (spawn(SET_A), spawn(SET_B));
    let mut fetched = 0;
    for child in [a, b] {
        let out = child.wait_with_output().expect("ragent prepull");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        fetched += r["total"]["bytes_fetched"].as_u64().expect("bytes_fetched");
    }
    let (served, gets) = served_since(&node, mark);
    assert_eq!(
        served, missing,
        "the registry served each blob once although both processes needed the shared ones ({gets} GETs)"
    );
    assert_eq!(fetched, missing, "the two reports add up to the wire bytes");
    for (repo, tag) in SET_A.iter().chain(SET_B) {
        assert!(
            unpacked(&node, &set, repo, tag),
            "{repo}:{tag} not unpacked"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pulls_in_one_process_share_each_fetch() {
    use std::sync::Arc;

    use ragent::{
        adapters::registry::Registry,
        metrics::PrepullMetrics,
        prepull::{Options, Puller},
    };
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let missing = union_missing(&node).await;
    let mark = registry_log_mark(&node);
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    let registry = Arc::new(Registry::new(
        &[node.registry()],
        ragent::core::credentials::Credentials::anonymous(),
    ));
    let prom = prometheus::Registry::new();
    let metrics = PrepullMetrics::new(&prom).expect("metrics");
    let puller = Puller::new(c, registry, &Options::default(), metrics.clone());
    let (a, b) = (refs_of(&set, SET_A), refs_of(&set, SET_B));
    let (ra, rb) = tokio::join!(puller.pull(&a, None), puller.pull(&b, None));
    let (ra, rb) = (ra.expect("pull A"), rb.expect("pull B"));
    let (served, gets) = served_since(&node, mark);
    assert_eq!(served, missing, "one fetch per blob ({gets} GETs)");
    assert_eq!(ra.total.bytes_fetched + rb.total.bytes_fetched, missing);
    assert_eq!(
        metrics.bytes.with_label_values(&["fetched"]).get(),
        missing,
        "ragent_prepull_bytes_total{{result=\"fetched\"}}"
    );
    assert_eq!(metrics.inflight.get(), 0, "nothing stays in flight");
    assert_eq!(metrics.duration.get_sample_count(), 2);
    for (repo, tag) in SET_A.iter().chain(SET_B) {
        assert!(
            unpacked(&node, &set, repo, tag),
            "{repo}:{tag} not unpacked"
        );
    }
}

/// On a terminal (a pty from `script`), ragent draws per-image and total progress with rate and
/// ETA on stderr; with a pipe it does not.
#[test]
fn prepull_shows_progress_on_a_terminal_only() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let reference = set.reference("ragent/app-jvm-api", "v1");
    let cmd = format!(
        "RAGENT_CONTAINERD={} {} prepull --insecure-registry {} {reference}",
        node.socket().display(),
        ragent_bin().display(),
        node.registry()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{reference}  ")) && text.contains(" ready"),
        "a line per image, ready at the end: {text}"
    );
    assert!(
        text.contains("total  ") && text.contains("/s  ETA "),
        "a total line with rate and ETA: {text}"
    );
    // Through a pipe: only the report.
    let piped = ragent(
        &node,
        &[
            "prepull",
            "--insecure-registry",
            &node.registry(),
            &reference,
        ],
    );
    assert!(piped.status.success());
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("ETA"));
}
