//! The agent's automatic rebase (`[rebase]` in its config file) against the real registry and
//! containerd: a followed run-image tag moved forward, back and forward again leads to exactly
//! one rebase per app per actual change, and none while nothing changes.
//!
//! The followed tag is a test-only copy of `ragent/run:v1` (`ragent/run:follow-it`), so the
//! fixture tags stay as they are. The apps' metadata names `ragent/run:v1` and the mirror, not
//! that tag: the policy finds them by the run-image digest the tag had when the agent started.
use std::time::Duration;

use ragent::{
    adapters::containerd::Containerd,
    core::{oci, rebase::inspect_app},
    rebase::read_image,
};
use ragent_testkit::{fixtures::FixtureSet, node::Node};

use crate::support::*;

const FOLLOW_TAG: &str = "follow-it";
/// How long a rebase of both apps may take (the first fetches the run image).
const REBASE_DEADLINE: Duration = Duration::from_secs(60);
/// Polls (1 s apart) the test waits through to see that nothing more happens.
const QUIET_POLLS: f64 = 3.0;
const IN_PLACE: &str = "mode = \"in-place\"";

/// An app image as its record says: the manifest it points at, the run image its metadata
/// says it sits on (`runImage.reference`) and its layers.
#[derive(Debug, Clone, PartialEq)]
struct AppState {
    target: String,
    run_image: String,
    layers: Vec<String>,
}

async fn app_state(node: &Node, name: &str) -> AppState {
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connecting to containerd");
    let record = c
        .get_image(name)
        .await
        .expect("Images.Get")
        .unwrap_or_else(|| panic!("no record {name}"));
    let (bytes, _) = read_image(&c, name, &record.target)
        .await
        .expect("reading the image");
    let view = inspect_app(&bytes, None).expect("a CNB app");
    let manifest = oci::parse_manifest(&bytes.manifest_digest, &bytes.manifest).expect("manifest");
    AppState {
        target: record.target.digest,
        run_image: view.reference,
        layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
    }
}

/// `mode` is the `mode = ...` line (and what goes with it).
fn write_config(node: &Node, follow: &str, mode: &str) -> std::path::PathBuf {
    let path = node.dir().join("autorebase.toml");
    std::fs::write(
        &path,
        format!(
            "[rebase]\nfollow = [{follow:?}]\n{mode}\npoll_interval_s = 1\nretry_max_s = 2\ninsecure_registries = [{:?}]\n",
            node.registry()
        ),
    )
    .expect("writing the agent config");
    path
}

/// Starts the agent following `follow`, and waits until it has polled the tag a few times (so
/// it knows the digest the apps sit on).
fn start_agent(node: &Node, follow: &str, mode: &str) -> Agent {
    let cfg = write_config(node, follow, mode);
    let agent = Agent::start(
        node,
        free_port(),
        &["--no-ebpf", "--config", cfg.to_str().expect("utf-8 path")],
    );
    wait_polls(&agent, QUIET_POLLS);
    agent
}

fn polls(agent: &Agent) -> f64 {
    agent
        .value("ragent_run_image_polls_total{result=\"ok\"}")
        .unwrap_or(0.0)
}

/// Waits until the agent has polled the tag `n` more times (so it had every chance to act).
fn wait_polls(agent: &Agent, n: f64) {
    let from = polls(agent);
    wait_for(
        "the agent to poll the followed tag",
        Duration::from_secs(30),
        || (polls(agent) >= from + n).then_some(()),
    );
}

fn rebased(agent: &Agent) -> f64 {
    agent
        .value("ragent_rebases_total{result=\"rebased\"}")
        .unwrap_or(-1.0)
}

/// Every result but `rebased`: failures and "already current" answers.
fn other_results(agent: &Agent) -> f64 {
    let m = agent.metrics();
    sum_of(&m, "ragent_rebases_total{")
        - metric_value(&m, "ragent_rebases_total{result=\"rebased\"}").unwrap_or(0.0)
}

fn run_digest(set: &FixtureSet, tag: &str) -> String {
    set.image("ragent/run", tag)
        .expect("fixture")
        .manifest_digest
        .clone()
}

/// The node's view in the metrics: `n` images on `digest`, none waiting.
fn assert_view(agent: &Agent, digest: &str, n: f64, gone: &str) {
    let m = agent.metrics();
    assert_eq!(
        metric_value(
            &m,
            &format!("ragent_images_by_run_image{{run_image_digest=\"{digest}\"}}")
        ),
        Some(n),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("ragent_images_by_run_image{{run_image_digest=\"{gone}\"}}")
        ),
        None,
        "no app sits on {gone} any more: {m}"
    );
    assert_eq!(
        metric_value(&m, "ragent_run_image_oldest_unpatched_age_seconds"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autorebase_follows_a_tag_forward_back_and_forward_once_per_change() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let follow = set.reference("ragent/run", FOLLOW_TAG);
    retag(&set.reference("ragent/run", "v1"), &follow);
    let apps = [
        set.reference("ragent/app-py-web", "v1"),
        set.reference("ragent/app-py-worker", "v1"),
    ];
    for a in &apps {
        cri_pull(&node, a).await;
    }
    let (v1, v2) = (run_digest(&set, "v1"), run_digest(&set, "v2"));
    let mut states = Vec::new();
    for a in &apps {
        let s = app_state(&node, a).await;
        assert_eq!(s.run_image, v1, "{a} is built on run:v1");
        states.push(s);
    }
    let originals = states.clone();

    // Nothing changes for a few polls: nothing is rebased, no record moves.
    let agent = start_agent(&node, &follow, IN_PLACE);
    assert_eq!(rebased(&agent), 0.0);
    assert_eq!(other_results(&agent), 0.0);
    for (a, s) in apps.iter().zip(&states) {
        assert_eq!(&app_state(&node, a).await, s, "{a} was left alone");
    }
    assert_view(&agent, &v1, 2.0, &v2);

    let mut want = 0.0;
    for (i, (to, digest)) in [("v2", &v2), ("v1", &v1), ("v2", &v2)]
        .into_iter()
        .enumerate()
    {
        let target = set.image("ragent/run", to).expect("fixture");
        let missing = missing_bytes(&node, &set, &[("ragent/run", to)]).await;
        retag(&set.reference("ragent/run", to), &follow);
        let mark = registry_log_mark(&node);
        want += apps.len() as f64;
        let rt = tokio::runtime::Handle::current();
        let (n, names, d) = (node.clone(), apps.clone(), digest.clone());
        let agent_ref = &agent;
        tokio::task::block_in_place(|| {
            wait_for(
                &format!("both apps rebased onto run:{to}"),
                REBASE_DEADLINE,
                || {
                    let all_on = names
                        .iter()
                        .all(|a| rt.block_on(app_state(&n, a)).run_image == d);
                    (all_on && rebased(agent_ref) >= want).then_some(())
                },
            )
        });
        // Exactly one rebase per app, and no more over the next polls.
        wait_polls(&agent, QUIET_POLLS);
        assert_eq!(
            rebased(&agent),
            want,
            "one rebase per app for the move to {to}"
        );
        assert_eq!(other_results(&agent), 0.0, "{}", agent.metrics());
        for (k, a) in apps.iter().enumerate() {
            let now = app_state(&node, a).await;
            assert_ne!(now.target, states[k].target, "{a}'s record moved");
            assert_eq!(now.run_image, *digest);
            // The run image's layers at the bottom, the app's own above them, unchanged.
            let run_layers: Vec<String> = target.layers.iter().map(|l| l.digest.clone()).collect();
            assert_eq!(now.layers[..run_layers.len()], run_layers[..], "{a}");
            assert_eq!(
                now.layers[run_layers.len()..],
                originals[k].layers[run_layers.len()..],
                "{a}: the app's layers are kept"
            );
            if to == "v1" {
                // Rebasing is deterministic: back on run:v1 is the image CRI pulled, digest and all.
                assert_eq!(now, originals[k], "{a} is back on run:v1");
            }
            states[k] = now;
        }
        assert_view(&agent, digest, 2.0, if to == "v1" { &v2 } else { &v1 });
        // The run image was fetched once for the node: the first move fetched exactly what the
        // node lacked of it; later moves find its layers local (at most its config again, if
        // containerd's GC took it while no record named it).
        let (served, _) = served_since(&node, mark);
        if i == 0 {
            assert!(missing > 0, "run:v2's release layer is not on the node yet");
            assert_eq!(served, missing, "run:{to} fetched once, app layers never");
        } else {
            let config = std::fs::metadata(
                set.layout
                    .join("blobs/sha256")
                    .join(target.config_digest.trim_start_matches("sha256:")),
            )
            .expect("config blob")
            .len();
            assert!(
                served <= config,
                "{served} bytes served for the move to {to}"
            );
        }
    }
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    assert_eq!(
        log.matches("rebased onto the followed run image").count(),
        6,
        "{log}"
    );
    drop(agent);
    // The rebased images, their rollback records and the followed tag's record are this
    // test's: the next tests expect the store as they left it.
    remove_all_images(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autorebase_reports_a_refused_rebase_and_retries_it_with_backoff() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let follow = set.reference("ragent/run", "follow-refused");
    retag(&set.reference("ragent/run", "v1"), &follow);
    let app = set.reference("ragent/app-py-web", "v1");
    cri_pull(&node, &app).await;
    let before = app_state(&node, &app).await;
    let agent = start_agent(&node, &follow, IN_PLACE);
    // The tag moves to a run image of another distro: the lifecycle's checks refuse it.
    retag(&set.reference("ragent/run-other-distro", "v1"), &follow);
    let refused = "ragent_rebases_total{result=\"target\"}";
    wait_for(
        "two refused attempts and a waiting image",
        REBASE_DEADLINE,
        || {
            let m = agent.metrics();
            (metric_value(&m, refused)? >= 2.0
                && metric_value(&m, "ragent_run_image_oldest_unpatched_age_seconds")? > 0.0)
                .then_some(())
        },
    );
    wait_polls(&agent, QUIET_POLLS);
    let m = agent.metrics();
    let (failures, ok_polls) = (
        metric_value(&m, refused).expect("refusals"),
        metric_value(&m, "ragent_run_image_polls_total{result=\"ok\"}").expect("polls"),
    );
    // Retried with backoff (1 s, then every 2 s): never more attempts than polls (1 s apart).
    assert!(
        failures <= ok_polls,
        "{failures} attempts in {ok_polls} polls: {m}"
    );
    assert_eq!(
        metric_value(&m, "ragent_rebases_total{result=\"rebased\"}"),
        Some(0.0)
    );
    assert_eq!(
        app_state(&node, &app).await,
        before,
        "the refused image is left as it was"
    );
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    assert!(
        log.contains("automatic rebase failed") && log.contains("check distro"),
        "the refusal is logged with its reason: {log}"
    );
    // The tag comes back to the run image the app sits on: nothing waits, nothing is tried.
    retag(&set.reference("ragent/run", "v1"), &follow);
    wait_for(
        "the image to count as current again",
        REBASE_DEADLINE,
        || (agent.value("ragent_run_image_oldest_unpatched_age_seconds")? == 0.0).then_some(()),
    );
    let settled = agent.value(refused).expect("refusals");
    wait_polls(&agent, QUIET_POLLS);
    assert_eq!(
        agent.value(refused),
        Some(settled),
        "no attempt once current"
    );
    assert_eq!(rebased(&agent), 0.0);
    drop(agent);
    // The refused run image was fetched under the followed tag's name: not for the next tests.
    remove_all_images(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autorebase_in_tag_mode_writes_one_output_per_change_and_never_rebases_it() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let follow = set.reference("ragent/run", "follow-tag");
    retag(&set.reference("ragent/run", "v1"), &follow);
    let app = set.reference("ragent/app-py-web", "v1");
    let output = format!("{app}-fixed");
    cri_pull(&node, &app).await;
    let source = app_state(&node, &app).await;
    let agent = start_agent(&node, &follow, "mode = \"tag\"\ntag_suffix = \"-fixed\"");
    let v2 = run_digest(&set, "v2");
    // Forward: one output on run:v2; the source stays.
    retag(&set.reference("ragent/run", "v2"), &follow);
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        wait_for("the output on run:v2", REBASE_DEADLINE, || {
            rt.block_on(record_target(&node, &output))?;
            (rt.block_on(app_state(&node, &output)).run_image == v2).then_some(())
        })
    });
    let out = app_state(&node, &output).await;
    // Back (the source is on run:v1 already) and forward again (the output is on run:v2
    // already): nothing more to write, and the output is never a source of another output.
    for to in ["v1", "v2"] {
        retag(&set.reference("ragent/run", to), &follow);
        wait_polls(&agent, QUIET_POLLS);
        assert_eq!(rebased(&agent), 1.0, "after the move to {to}");
        assert_eq!(other_results(&agent), 0.0, "{}", agent.metrics());
        assert_eq!(app_state(&node, &app).await, source, "the source stays");
        assert_eq!(app_state(&node, &output).await, out, "the output stays");
        assert_eq!(
            record_target(&node, &format!("{output}-fixed")).await,
            None,
            "no output of an output"
        );
    }
    drop(agent);
    remove_all_images(&node);
}

/// The same app in a pre-pull policy (refreshing every second) and rebased in place by the
/// rebase policy: the pre-pull treats the local rebase of the registry's manifest as current,
/// so it never pulls the original back, and the app is rebased once, not once per refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepulled_app_rebased_in_place_is_not_pulled_back() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let follow = set.reference("ragent/run", "follow-prepull");
    retag(&set.reference("ragent/run", "v1"), &follow);
    let app = set.reference("ragent/app-py-web", "v1");
    let original = set
        .image("ragent/app-py-web", "v1")
        .expect("fixture")
        .manifest_digest
        .clone();
    let cfg = node.dir().join("prepull-and-rebase.toml");
    std::fs::write(
        &cfg,
        format!(
            "[prepull]\nimages = [{app:?}]\nrefresh_interval_s = 1\nretry_max_s = 2\ninsecure_registries = [{reg:?}]\n\
             [rebase]\nfollow = [{follow:?}]\n{IN_PLACE}\npoll_interval_s = 1\nretry_max_s = 2\ninsecure_registries = [{reg:?}]\n",
            reg = node.registry()
        ),
    )
    .expect("config");
    let agent = Agent::start(
        &node,
        free_port(),
        &["--no-ebpf", "--config", cfg.to_str().expect("utf-8 path")],
    );
    let ready = |a: &Agent| a.value("ragent_prepull_images{state=\"ready\"}") == Some(1.0);
    wait_for("the pre-pull", Duration::from_secs(60), || {
        ready(&agent).then_some(())
    });
    wait_polls(&agent, QUIET_POLLS);
    assert_eq!(
        record_target(&node, &app).await.as_deref(),
        Some(original.as_str())
    );

    let v2 = run_digest(&set, "v2");
    retag(&set.reference("ragent/run", "v2"), &follow);
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        wait_for("the app rebased onto run:v2", REBASE_DEADLINE, || {
            (rt.block_on(app_state(&node, &app)).run_image == v2 && rebased(&agent) >= 1.0)
                .then_some(())
        })
    });
    let rebased_state = app_state(&node, &app).await;
    // Bytes the pre-pull needed (fetched or found in containerd): every pull adds to them.
    let needed = |a: &Agent| sum_of(&a.metrics(), "ragent_prepull_bytes_total{");
    let pulled = needed(&agent);
    assert!(pulled > 0.0, "the pre-pull pulled the app");
    // Many refreshes and polls later: still the one rebase, the record still the rebased
    // image, nothing pulled again.
    wait_polls(&agent, 2.0 * QUIET_POLLS);
    assert_eq!(rebased(&agent), 1.0, "{}", agent.metrics());
    assert_eq!(app_state(&node, &app).await, rebased_state);
    assert!(ready(&agent), "{}", agent.metrics());
    assert_eq!(
        needed(&agent),
        pulled,
        "the pre-pull pulled nothing after the rebase"
    );
    drop(agent);
    remove_all_images(&node);
}
