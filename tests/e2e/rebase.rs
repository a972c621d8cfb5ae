//! `ragent rebase` against images pulled for real into containerd: the result is byte for byte
//! what the CNB rules give (tests/src/expect.rs, pinned digests there), rebasing back gives the
//! original image, refusals name their check, nothing is written on `--dry-run`, and a killed
//! rebase or a restarted containerd leaves a consistent store that a rerun completes.
use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use ragent::adapters::containerd::Containerd;
use ragent_testkit::{
    expect,
    fixtures::{FixtureSet, Image, RELEASE_V2},
    node::Node,
    pod::{Pod, PodSpec},
};
use serde_json::Value;

use crate::support::*;

const APPS: &[&str] = &[
    "ragent/app-py-web",
    "ragent/app-py-worker",
    "ragent/app-jvm-api",
    "ragent/app-jvm-batch",
];

fn img<'a>(set: &'a FixtureSet, repo: &str, tag: &str) -> &'a Image {
    set.image(repo, tag)
        .unwrap_or_else(|| panic!("fixture {repo}:{tag}"))
}

fn prepull(node: &Node, refs: &[String]) {
    let mut args = vec![
        "prepull".to_string(),
        "--insecure-registry".into(),
        node.registry(),
    ];
    args.extend(refs.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ragent(node, &args);
    assert!(
        out.status.success(),
        "ragent prepull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rebase(node: &Node, args: &[&str]) -> Output {
    let mut all = vec!["rebase", "--insecure-registry"];
    let reg = node.registry();
    all.push(&reg);
    all.extend_from_slice(args);
    ragent(node, &all)
}

fn rebase_json(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = rebase(node, &a);
    assert!(
        out.status.success(),
        "ragent rebase {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("rebase --json prints one JSON document")
}

/// `ragent rebase --rollback NAME`, which must succeed.
fn roll_back(node: &Node, name: &str) {
    let out = ragent(node, &["rebase", "--rollback", name]);
    assert!(
        out.status.success(),
        "ragent rebase --rollback {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn connect(node: &Node) -> Containerd {
    Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connecting to containerd")
}

async fn target(c: &Containerd, name: &str) -> Option<String> {
    c.get_image(name)
        .await
        .expect("Images.Get")
        .map(|r| r.target.digest)
}

/// Every image record of the namespace points at content that is all there: manifest, config
/// and every layer.
async fn assert_store_consistent(c: &Containerd) {
    for r in c.list_images().await.expect("Images.List") {
        let Ok(bytes) = c.read_blob(&r.target.digest).await else {
            panic!(
                "record {} points at a missing manifest {}",
                r.name, r.target.digest
            );
        };
        let v: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
        if v.get("manifests").is_some() {
            continue; // an index: its children are checked where they are named
        }
        let mut digests = vec![
            v["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ];
        for l in v["layers"].as_array().into_iter().flatten() {
            digests.push(l["digest"].as_str().unwrap_or_default().to_string());
        }
        for d in digests {
            assert!(
                c.content_size(&d).await.expect("Content.Info").is_some(),
                "record {} points at {} which is not in the store",
                r.name,
                d
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_gives_the_cnb_result_byte_for_byte_fetches_only_the_new_run_layers_and_goes_back() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let run_v1 = img(&set, "ragent/run", "v1");
    let run_v2 = img(&set, "ragent/run", "v2");
    let mut refs: Vec<String> = APPS.iter().map(|a| set.reference(a, "v1")).collect();
    refs.push(set.reference("ragent/run", "v1"));
    prepull(&node, &refs);
    let c = connect(&node).await;
    let v2_ref = set.reference("ragent/run", "v2");

    for (i, repo) in APPS.iter().enumerate() {
        let app = img(&set, repo, "v1");
        let name = set.reference(repo, "v1");
        let tag = set.reference(repo, "v1-on-v2");
        let mark = registry_log_mark(&node);
        let out = rebase_json(&node, &[&name, "--tag", &tag, "--run-image", &v2_ref]);
        let (served, _) = served_since(&node, mark);
        // The first rebase fetches run:v2's release layer and config; the app's layers never
        // cross the network; later rebases find the run image on the node.
        let v2_release = &run_v2.layers[1];
        let v2_config = expect::blob(&set, &run_v2.config_digest).unwrap().len() as u64;
        let want = if i == 0 {
            v2_release.size + v2_config
        } else {
            0
        };
        assert_eq!(out["bytes_fetched"], want, "{repo}: {out}");
        assert_eq!(served, want, "{repo}: blob bytes the registry served");

        // Byte for byte what the CNB rules give.
        let (config, manifest) = expect::rebased(&set, app, run_v2).unwrap();
        let new_digest = expect::sha256(&manifest);
        assert_eq!(out["new_digest"], new_digest.as_str(), "{repo}");
        assert_eq!(target(&c, &tag).await.as_deref(), Some(new_digest.as_str()));
        assert_eq!(
            c.read_blob(&new_digest).await.unwrap(),
            manifest,
            "{repo} manifest"
        );
        assert_eq!(
            c.read_blob(&expect::sha256(&config)).await.unwrap(),
            config,
            "{repo} config"
        );
        assert_eq!(out["old_digest"], app.manifest_digest.as_str());
        assert_eq!(out["new_run_image_digest"], run_v2.manifest_digest.as_str());
        assert_eq!(out["old_run_image"], run_v1.manifest_digest.as_str());
        assert_eq!(out["layers_replaced"], 2);
        // The app's record is untouched (--tag).
        assert_eq!(
            target(&c, &name).await.as_deref(),
            Some(app.manifest_digest.as_str())
        );
        // Unpacked: the result's top snapshot exists (containers can start from it).
        let top = ragent::core::chain::chain_ids(
            &serde_json::from_slice::<Value>(&config).unwrap()["rootfs"]["diff_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        )
        .pop()
        .unwrap();
        let snaps = node
            .ctr("k8s.io")
            .args(["snapshots", "--snapshotter", "overlayfs", "info", &top])
            .output()
            .unwrap();
        assert!(snaps.status.success(), "{repo}: top snapshot {top} missing");

        // Determinism: again, under another name, the same digest.
        let again = set.reference(repo, "v1-on-v2-again");
        let out2 = rebase_json(&node, &[&name, "--tag", &again, "--run-image", &v2_ref]);
        assert_eq!(out2["new_digest"], new_digest.as_str());

        // Back onto run:v1: the original image, digest and all.
        let back = set.reference(repo, "v1-back");
        let v1_ref = set.reference("ragent/run", "v1");
        let out3 = rebase_json(&node, &[&tag, "--tag", &back, "--run-image", &v1_ref]);
        assert_eq!(out3["new_digest"], app.manifest_digest.as_str(), "{repo}");
        assert_eq!(out3["bytes_fetched"], 0);
    }
    assert_store_consistent(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_from_the_rebased_image_sees_the_patched_run_image() {
    let node = node();
    let set = fixtures(&node);
    let name = set.reference("ragent/app-py-worker", "v1");
    prepull(&node, std::slice::from_ref(&name));
    let tag = set.reference("ragent/app-py-worker", "patched");
    rebase_json(
        &node,
        &[
            &name,
            "--tag",
            &tag,
            "--run-image",
            &set.reference("ragent/run", "v2"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cri_has_image(&node, &tag).await {
        assert!(Instant::now() < deadline, "CRI never saw {tag}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pod = Pod::start(
        &node,
        PodSpec::new("ragent-e2e-rebase", "patched", &tag)
            .container("app")
            .command(&[
                "/bin/busybox",
                "sh",
                "-c",
                "cat /etc/ragent-release; ls /workspace/start; exec /bin/busybox sleep 600",
            ]),
    )
    .await
    .expect("a pod from the rebased image");
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let l = pod.log();
        if l.contains("/workspace/start") || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    pod.remove().await.expect("removing the pod");
    assert!(log.contains(RELEASE_V2), "the container saw: {log}");
    assert!(
        log.contains("/workspace/start"),
        "the app layer is there: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rebase_moves_the_name_and_rollback_restores_it() {
    let node = node();
    let set = fixtures(&node);
    let app = img(&set, "ragent/app-jvm-batch", "v1");
    let name = set.reference("ragent/app-jvm-batch", "v1");
    prepull(&node, std::slice::from_ref(&name));
    let c = connect(&node).await;
    let report =
        std::env::temp_dir().join(format!("ragent-rebase-report-{}.toml", std::process::id()));
    let report_s = report.display().to_string();
    let out = rebase_json(&node, &[&name, "--in-place", "--report", &report_s]);
    // The run image chosen from the metadata is runImage.image = run:v1 (same registry): the
    // app is on it already.
    assert_eq!(out["already_current"], true, "{out}");
    let out = rebase_json(
        &node,
        &[
            &name,
            "--in-place",
            "--run-image",
            &set.reference("ragent/run", "v2"),
            "--report",
            &report_s,
        ],
    );
    let (_, manifest) = expect::rebased(&set, app, img(&set, "ragent/run", "v2")).unwrap();
    let new_digest = expect::sha256(&manifest);
    let rollback = format!("{name}-ragent-rollback");
    assert_eq!(out["rollback"], rollback.as_str());
    assert_eq!(
        target(&c, &name).await.as_deref(),
        Some(new_digest.as_str())
    );
    assert_eq!(
        target(&c, &rollback).await.as_deref(),
        Some(app.manifest_digest.as_str())
    );
    // The report, like the lifecycle's report.toml.
    let text = std::fs::read_to_string(&report).expect("the report");
    let r: toml::Value = toml::from_str(&text).expect("TOML");
    assert_eq!(r["image"]["digest"].as_str(), Some(new_digest.as_str()));
    assert_eq!(r["image"]["tags"][0].as_str(), Some(name.as_str()));
    assert_eq!(
        r["image"]["manifest-size"].as_integer(),
        Some(manifest.len() as i64)
    );
    let _ = std::fs::remove_file(&report);

    roll_back(&node, &name);
    assert_eq!(
        target(&c, &name).await.as_deref(),
        Some(app.manifest_digest.as_str())
    );
    assert_eq!(target(&c, &rollback).await, None);
    let out = ragent(&node, &["rebase", "--rollback", &name]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no rollback record") && err.contains(&rollback),
        "{err}"
    );
    assert_store_consistent(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_plan_and_writes_nothing() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let name = set.reference("ragent/app-py-web", "v1");
    prepull(&node, std::slice::from_ref(&name));
    let c = connect(&node).await;
    let before: Vec<String> = c
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    let run_v2 = img(&set, "ragent/run", "v2");
    let v2 = set.reference("ragent/run", "v2");
    let mark = registry_log_mark(&node);
    let out = rebase_json(&node, &[&name, "--dry-run", "--run-image", &v2]);
    let after: Vec<String> = c
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(before, after, "a dry run wrote image records");
    assert_eq!(out["dry_run"], true);
    // Bytes to fetch: run:v2's release layer and config (the base layer is shared with v1).
    let v2_config = expect::blob(&set, &run_v2.config_digest).unwrap().len() as u64;
    assert_eq!(out["bytes_fetched"], run_v2.layers[1].size + v2_config);
    assert!(
        c.content_size(&run_v2.layers[1].digest)
            .await
            .unwrap()
            .is_none()
    );
    // Only the config was read from the registry (to plan), no layer.
    let (served, gets) = served_since(&node, mark);
    assert_eq!((served, gets), (v2_config, 1));
    let removed: Vec<&str> = out["layers_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let app = img(&set, "ragent/app-py-web", "v1");
    assert_eq!(
        removed,
        vec![app.layers[0].digest.as_str(), app.layers[1].digest.as_str()]
    );
    assert_eq!(
        out["layers_added"][1]["digest"],
        run_v2.layers[1].digest.as_str()
    );
    let labels: Vec<&str> = out["labels_changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"].as_str().unwrap())
        .collect();
    assert_eq!(labels, vec!["io.buildpacks.lifecycle.metadata"]);
    let text = rebase(&node, &[&name, "--dry-run", "--run-image", &v2]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("would rebase") && text.contains("to fetch:"),
        "{text}"
    );
}

/// `(app repo, --run-image repo or "", extra flags, what the message must say)`; each must be
/// refused with exit code 70 and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_names_its_check() {
    let node = node();
    let set = fixtures(&node);
    let pulls: Vec<String> = [
        "ragent/pause:3.9",
        "ragent/app-py-web:v1",
        "ragent/app-py-legacy:v1",
        "ragent/app-norebase:v1",
        "ragent/app-broken-label:v1",
    ]
    .iter()
    .map(|r| format!("{}/{r}", set.registry))
    .collect();
    prepull(&node, &pulls);
    let c = connect(&node).await;
    // An app whose runImage.topLayer is not among its layers, and one without a topLayer:
    // written into the store by hand from app-py-web.
    let web = img(&set, "ragent/app-py-web", "v1");
    let bad_top = set.reference("ragent/app-bad-top", "v1");
    let no_top = set.reference("ragent/app-no-top", "v1");
    for (name, top) in [
        (&bad_top, Some(format!("sha256:{}", "0".repeat(64)))),
        (&no_top, None),
    ] {
        write_variant(&c, &set, web, name, top).await;
    }
    let r = |repo_tag: &str| format!("{}/{repo_tag}", set.registry);
    let cases: Vec<(String, String, Vec<&str>, Vec<&str>)> = vec![
        (
            r("ragent/pause:3.9"),
            r("ragent/run:v2"),
            vec![],
            vec!["not a CNB app image"],
        ),
        (
            r("ragent/app-broken-label:v1"),
            r("ragent/run:v2"),
            vec![],
            vec!["io.buildpacks.lifecycle.metadata", "malformed"],
        ),
        (
            bad_top.clone(),
            r("ragent/run:v2"),
            vec!["--force"],
            vec!["runImage.topLayer", "is not among"],
        ),
        (
            no_top.clone(),
            r("ragent/run:v2"),
            vec!["--force"],
            vec!["no runImage.topLayer"],
        ),
        (
            r("ragent/app-norebase:v1"),
            r("ragent/run:v2"),
            vec![],
            vec!["io.buildpacks.rebasable=false", "--force"],
        ),
        (
            r("ragent/app-py-web:v1"),
            r("ragent/run-arm64:v1"),
            vec![],
            vec![
                "check os/architecture",
                "linux/amd64",
                "linux/arm64",
                "--force",
            ],
        ),
        (
            r("ragent/app-py-web:v1"),
            r("ragent/run-other-distro:v1"),
            vec![],
            vec![
                "check distro",
                "ragent-linux 1.0",
                "ragent-linux 2.0",
                "--force",
            ],
        ),
        (
            r("ragent/app-py-legacy:v1"),
            r("ragent/run-other-stack:v1"),
            vec!["--force"],
            vec![
                "check stack id",
                "io.ragent.stacks.other",
                "io.ragent.stacks.sample",
                "does not override",
            ],
        ),
        (
            r("ragent/app-py-legacy:v1"),
            r("ragent/run-no-mixin:v1"),
            vec!["--force"],
            vec!["check mixins", "ragent-tzdata", "does not override"],
        ),
        (
            r("ragent/app-py-web:v1"),
            r("ragent/run-no-mixin:v1"),
            vec![],
            vec![
                "check run-image name",
                "ragent/run-no-mixin:v1",
                "ragent/run-mirror:v1",
                "--force",
            ],
        ),
        (
            r("ragent/app-py-web:v1"),
            r("ragent/run:no-such-tag"),
            vec![],
            vec!["run image", "not found"],
        ),
        (
            r("ragent/no-such-app:v1"),
            r("ragent/run:v2"),
            vec![],
            vec!["no image", "ragent images"],
        ),
    ];
    for (app, run, extra, want) in &cases {
        let records_before = c.list_images().await.unwrap().len();
        let mut args = vec![
            app.as_str(),
            "--tag",
            "refused/should-not-exist:x",
            "--run-image",
            run.as_str(),
        ];
        args.extend(extra.iter().copied());
        let out = rebase(&node, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{app} onto {run} was not refused");
        if !want.contains(&"no image") {
            assert_eq!(out.status.code(), Some(70), "{app} onto {run}: {err}");
        }
        for w in want {
            assert!(
                err.contains(w),
                "{app} onto {run}: the message lacks {w:?}: {err}"
            );
        }
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert_eq!(target(&c, "refused/should-not-exist:x").await, None);
        assert_eq!(
            c.list_images().await.unwrap().len(),
            records_before,
            "{app}: records changed"
        );
    }
    // The overridable ones go through with --force.
    for (app, run) in [
        (r("ragent/app-norebase:v1"), r("ragent/run:v2")),
        (r("ragent/app-py-web:v1"), r("ragent/run-no-mixin:v1")),
    ] {
        let out = rebase_json(
            &node,
            &[
                &app,
                "--tag",
                &format!("{app}-forced"),
                "--run-image",
                &run,
                "--force",
            ],
        );
        assert_eq!(out["forced"].as_array().map(Vec::len), Some(1), "{out}");
    }
    // Forced onto an unnamed run image: it becomes runImage.image, mirrors cleared.
    let forced = format!("{}-forced", r("ragent/app-py-web:v1"));
    let rec = c.get_image(&forced).await.unwrap().unwrap();
    let manifest: Value =
        serde_json::from_slice(&c.read_blob(&rec.target.digest).await.unwrap()).unwrap();
    let config: Value = serde_json::from_slice(
        &c.read_blob(manifest["config"]["digest"].as_str().unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let lc: Value = serde_json::from_str(
        config["config"]["Labels"]["io.buildpacks.lifecycle.metadata"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        lc["runImage"]["image"],
        r("ragent/run-no-mixin:v1").as_str()
    );
    assert_eq!(lc["runImage"]["mirrors"], serde_json::json!([]));
    // The legacy (platform API 0.10) app passes its stack id and mixin checks on run:v2.
    let out = rebase_json(
        &node,
        &[
            &r("ragent/app-py-legacy:v1"),
            "--tag",
            &r("ragent/app-py-legacy:v2"),
            "--run-image",
            &r("ragent/run:v2"),
        ],
    );
    assert_eq!(out["layers_replaced"], 2);
    assert_store_consistent(&c).await;
}

/// Writes a copy of `app` whose lifecycle label has `topLayer` = `top` (None: no topLayer)
/// under `name`.
async fn write_variant(
    c: &Containerd,
    set: &FixtureSet,
    app: &Image,
    name: &str,
    top: Option<String>,
) {
    let mut config: Value =
        serde_json::from_slice(&expect::blob(set, &app.config_digest).unwrap()).unwrap();
    let label = "io.buildpacks.lifecycle.metadata";
    let mut lc: Value =
        serde_json::from_str(config["config"]["Labels"][label].as_str().unwrap()).unwrap();
    match top {
        Some(t) => lc["runImage"]["topLayer"] = Value::String(t),
        None => {
            lc["runImage"].as_object_mut().unwrap().remove("topLayer");
        }
    }
    config["config"]["Labels"][label] = Value::String(lc.to_string());
    let config = serde_json::to_vec(&config).unwrap();
    let mut manifest: Value =
        serde_json::from_slice(&expect::blob(set, &app.manifest_digest).unwrap()).unwrap();
    manifest["config"]["digest"] = Value::String(expect::sha256(&config));
    manifest["config"]["size"] = config.len().into();
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let lease = c
        .create_lease(
            &format!("ragent-e2e-variant-{}", std::process::id()),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let mut gc = std::collections::HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        expect::sha256(&config),
    )]);
    for (i, l) in app.layers.iter().enumerate() {
        gc.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    for (bytes, mt, labels) in [
        (
            &config,
            "application/vnd.oci.image.config.v1+json",
            Default::default(),
        ),
        (&manifest, "application/vnd.oci.image.manifest.v1+json", gc),
    ] {
        let desc = ragent::core::oci::Descriptor {
            media_type: mt.into(),
            digest: expect::sha256(bytes),
            size: bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        };
        c.write_blob(
            &lease,
            &format!("e2e-{}", desc.digest),
            &desc,
            labels,
            |_| futures::stream::iter([Ok::<_, std::io::Error>(bytes.clone())]),
        )
        .await
        .unwrap();
        if mt.contains("manifest") {
            c.put_image(&lease, name, &desc, Default::default())
                .await
                .unwrap();
        }
    }
    c.delete_lease(&lease, false).await.unwrap();
}

/// SIGKILL at growing delays, then a containerd restart mid-rebase: after each, every record
/// points at complete content, and a rerun completes with the expected digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_killed_rebase_or_restarted_containerd_leave_a_consistent_store_and_a_rerun_completes()
 {
    let mut node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let repo = "ragent/app-jvm-api";
    let app = img(&set, repo, "v1");
    let name = set.reference(repo, "v1");
    prepull(&node, std::slice::from_ref(&name));
    let v2 = set.reference("ragent/run", "v2");
    let (_, manifest) = expect::rebased(&set, app, img(&set, "ragent/run", "v2")).unwrap();
    let want = expect::sha256(&manifest);
    let c = connect(&node).await;
    let spawn = |node: &Node| {
        let mut cmd = Command::new(ragent_bin());
        for (k, _) in std::env::vars() {
            if k.starts_with("RAGENT_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RAGENT_CONTAINERD", node.socket())
            .args([
                "rebase",
                &name,
                "--in-place",
                "--run-image",
                &v2,
                "--insecure-registry",
                &node.registry(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning ragent rebase")
    };
    // How long a whole run takes once the run image is on the node (then undone), so the
    // kills land all along it.
    let mut whole = Duration::ZERO;
    for _ in 0..2 {
        let t0 = Instant::now();
        let out = spawn(&node).wait_with_output().expect("ragent rebase");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        whole = t0.elapsed();
        assert_eq!(target(&c, &name).await.as_deref(), Some(want.as_str()));
        roll_back(&node, &name);
    }
    let mut outcomes = Vec::new();
    for percent in [2u32, 10, 25, 40, 55, 70, 85, 95] {
        let mut child = spawn(&node);
        tokio::time::sleep(whole * percent / 100).await;
        let done = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        assert_store_consistent(&c).await;
        // The name points at the original or the rebased image, nothing else.
        let t = target(&c, &name).await.expect("the app's record survives");
        assert!(t == app.manifest_digest || t == want, "{name} -> {t}");
        let rollback = target(&c, &format!("{name}-ragent-rollback")).await;
        outcomes.push(format!(
            "{percent}%: {}{}",
            if t == want { "moved" } else { "not moved" },
            if done { " (had finished)" } else { "" }
        ));
        if t == want {
            // The rollback record was written before the name moved.
            assert_eq!(rollback.as_deref(), Some(app.manifest_digest.as_str()));
            roll_back(&node, &name);
        }
    }
    eprintln!(
        "a whole rebase took {whole:?}; SIGKILL at: {}",
        outcomes.join(", ")
    );
    // containerd restarts while the rebase runs.
    let child = spawn(&node);
    tokio::time::sleep(Duration::from_millis(30)).await;
    node.restart_containerd().expect("restarting containerd");
    let out = child.wait_with_output().expect("ragent rebase");
    eprintln!(
        "rebase during a containerd restart: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    }
    let c = connect(&node).await;
    assert_store_consistent(&c).await;
    // A rerun completes (or finds the work done).
    let out = rebase_json(&node, &[&name, "--in-place", "--run-image", &v2]);
    assert!(
        out["already_current"] == true || out["new_digest"] == want.as_str(),
        "{out}"
    );
    assert_eq!(target(&c, &name).await.as_deref(), Some(want.as_str()));
    assert_store_consistent(&c).await;
    // A killed run leaves its leases until they expire (an hour) by design: at most three
    // (the run image's config, its pull, the rebase). Finished runs leave none.
    let leases = node
        .ctr("k8s.io")
        .args(["leases", "ls", "-q"])
        .output()
        .unwrap();
    let leftover: Vec<String> = String::from_utf8_lossy(&leases.stdout)
        .lines()
        .filter(|l| l.starts_with("ragent-"))
        .map(str::to_string)
        .collect();
    assert!(leftover.len() <= 3 * 9, "{leftover:?}");
    // The killed runs' leases would keep run:v2's blobs for an hour: the next tests want a
    // store that GC can empty.
    if !leftover.is_empty() {
        let out = node
            .ctr("k8s.io")
            .args(["leases", "rm"])
            .args(&leftover)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
