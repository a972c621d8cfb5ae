//! The agent's pre-pull policy (`[prepull]` in its config file) against the real registry and
//! containerd: listed images arrive unpacked, a moved tag is pulled again within one refresh
//! interval, an unreachable registry is retried until it comes back.
use std::{path::PathBuf, time::Duration};

use ragent_testkit::node::Node;

use crate::support::*;

fn write_config(node: &Node, name: &str, images: &[String], extra: &str) -> PathBuf {
    let path = node.dir().join(name);
    let list: Vec<String> = images.iter().map(|i| format!("{i:?}")).collect();
    std::fs::write(
        &path,
        format!(
            "[prepull]\nimages = [{}]\ninsecure_registries = [{:?}]\n{extra}",
            list.join(", "),
            node.registry()
        ),
    )
    .expect("writing the agent config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_listed_images_warm_and_follows_a_moved_tag() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let web = set.reference("ragent/app-py-web", "v1");
    let moving = set.reference("ragent/warm-moving", "v1");
    retag(&set.reference("ragent/app-py-worker", "v1"), &moving);
    let missing = missing_bytes(
        &node,
        &set,
        &[("ragent/app-py-web", "v1"), ("ragent/app-py-worker", "v1")],
    )
    .await;
    let cfg = write_config(
        &node,
        "warm.toml",
        &[web.clone(), moving.clone()],
        "refresh_interval_s = 2\n",
    );
    let agent = Agent::start(
        &node,
        free_port(),
        &["--no-ebpf", "--config", cfg.to_str().expect("utf-8 path")],
    );
    wait_for("both images ready", Duration::from_secs(60), || {
        (agent.value("ragent_prepull_images{state=\"ready\"}") == Some(2.0)).then_some(())
    });
    let web_digest = &set
        .image("ragent/app-py-web", "v1")
        .expect("fixture")
        .manifest_digest;
    let worker_digest = &set
        .image("ragent/app-py-worker", "v1")
        .expect("fixture")
        .manifest_digest;
    assert_eq!(record_target(&node, &web).await.as_ref(), Some(web_digest));
    assert_eq!(
        record_target(&node, &moving).await.as_ref(),
        Some(worker_digest)
    );
    assert!(unpacked(&node, &set, "ragent/app-py-web", "v1"));
    assert!(unpacked(&node, &set, "ragent/app-py-worker", "v1"));
    assert_eq!(
        agent.value("ragent_prepull_bytes_total{result=\"fetched\"}"),
        Some(missing as f64),
        "the agent fetched exactly the missing bytes"
    );
    assert_eq!(agent.value("ragent_prepull_inflight_bytes"), Some(0.0));

    // The tag moves; within one refresh interval (2 s) and the pull, the record follows.
    retag(&set.reference("ragent/app-jvm-batch", "v1"), &moving);
    let batch_digest = set
        .image("ragent/app-jvm-batch", "v1")
        .expect("fixture")
        .manifest_digest
        .clone();
    let rt = tokio::runtime::Handle::current();
    let (n, m) = (node.clone(), moving.clone());
    tokio::task::spawn_blocking(move || {
        wait_for(
            "the moved tag to be pulled",
            Duration::from_secs(30),
            || (rt.block_on(record_target(&n, &m)) == Some(batch_digest.clone())).then_some(()),
        )
    })
    .await
    .expect("waiting");
    assert!(unpacked(&node, &set, "ragent/app-jvm-batch", "v1"));
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    assert!(log.contains("moved=true"), "{log}");
    assert_eq!(
        agent.value("ragent_prepull_images{state=\"ready\"}"),
        Some(2.0)
    );
}

/// Starts the registry again if the test stops before it does.
struct RegistryBack(Node);

impl Drop for RegistryBack {
    fn drop(&mut self) {
        if !self.0.pids.contains_key("registry") {
            let _ = self.0.start_registry();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_retries_an_unreachable_registry_until_it_returns() {
    let mut node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let web = set.reference("ragent/app-py-web", "v1");
    node.stop_registry().expect("stopping the registry");
    let mut back = RegistryBack(node.clone());
    let cfg = write_config(
        &node,
        "warm-retry.toml",
        std::slice::from_ref(&web),
        "retry_max_s = 2\n",
    );
    let agent = Agent::start(
        &node,
        free_port(),
        &["--no-ebpf", "--config", cfg.to_str().expect("utf-8 path")],
    );
    wait_for("two failed attempts", Duration::from_secs(30), || {
        let m = agent.metrics();
        (sum_of(&m, "ragent_prepull_failures_total{") >= 2.0
            && metric_value(&m, "ragent_prepull_images{state=\"failed\"}") == Some(1.0))
        .then_some(())
    });
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    assert!(
        log.contains("pre-pull failed") && log.contains(&web),
        "the failure is logged with the image: {log}"
    );
    back.0
        .start_registry()
        .expect("starting the registry again");
    node = back.0.clone();
    wait_for(
        "the image after the registry returned",
        Duration::from_secs(30),
        || (agent.value("ragent_prepull_images{state=\"ready\"}") == Some(1.0)).then_some(()),
    );
    let digest = &set
        .image("ragent/app-py-web", "v1")
        .expect("fixture")
        .manifest_digest;
    assert_eq!(record_target(&node, &web).await.as_ref(), Some(digest));
    assert!(unpacked(&node, &set, "ragent/app-py-web", "v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pulls_through_a_token_auth_registry_with_a_pull_secret() {
    use ragent_testkit::auth::{self, AuthKind, AuthRegistry};
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let reg = AuthRegistry::start(&node, AuthKind::Token, "warm-user", "warm:pass")
        .expect("token-auth registry");
    let secret = auth::write_file(
        &reg.dir,
        "pull-secret.json",
        &auth::pull_secret(
            "warm",
            &auth::docker_config(&reg.host(), "warm-user", "warm:pass"),
        ),
    )
    .expect("secret file");
    let image = reg.reference("ragent/app-py-web", "v1");
    let cfg = node.dir().join("warm-auth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[prepull]\nimages = [{image:?}]\ninsecure_registries = [{:?}]\nauth = {:?}\n",
            reg.host(),
            secret.display().to_string()
        ),
    )
    .expect("config");
    let agent = Agent::start(
        &node,
        free_port(),
        &["--no-ebpf", "--config", cfg.to_str().expect("utf-8 path")],
    );
    wait_for(
        "the image through token auth",
        Duration::from_secs(60),
        || (agent.value("ragent_prepull_images{state=\"ready\"}") == Some(1.0)).then_some(()),
    );
    let digest = &set
        .image("ragent/app-py-web", "v1")
        .expect("fixture")
        .manifest_digest;
    assert_eq!(record_target(&node, &image).await.as_ref(), Some(digest));
    assert!(unpacked(&node, &set, "ragent/app-py-web", "v1"));
    assert_eq!(
        sum_of(&agent.metrics(), "ragent_prepull_failures_total{"),
        0.0,
        "no attempt failed"
    );
}
