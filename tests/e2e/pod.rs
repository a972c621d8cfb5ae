//! A pod starts from images `ragent prepull` put into containerd, through CRI as kubelet
//! starts it, with nothing more fetched: the records, content and snapshots are complete.
use std::time::Duration;

use ragent_testkit::pod::{Pod, PodSpec};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_starts_from_prepulled_images_without_another_fetch() {
    let node = node();
    let set = fixtures(&node);
    remove_all_images(&node);
    let pause = set.reference("ragent/pause", "3.9");
    let app = set.reference("ragent/app-py-web", "v1");
    let out = ragent(
        &node,
        &[
            "prepull",
            "--insecure-registry",
            &node.registry(),
            &pause,
            &app,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mark = registry_log_mark(&node);
    // The app's own entrypoint (CNB launcher -> /workspace/start) runs: it reads a file of the
    // run image and prints it, so every layer is unpacked where it belongs.
    let pod = Pod::start(
        &node,
        PodSpec::new("ragent-e2e", "prepulled", &app).container("web"),
    )
    .await
    .expect("a pod from the pre-pulled pause and app images");
    let text = wait_for_async(
        "the app's greeting in its log",
        Duration::from_secs(30),
        || {
            let text = pod.log();
            async move { text.contains("app-py-web on ").then_some(text) }
        },
    )
    .await;
    pod.wait_running(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the app keeps running: {e:#}"));
    assert!(
        text.contains("app-py-web on ragent-linux 1.0 run image v1 (patch level 0)"),
        "the app read the run image's release file: {text}"
    );
    let (served, gets) = served_since(&node, mark);
    assert_eq!(
        (served, gets),
        (0, 0),
        "starting the pod fetched nothing from the registry"
    );
}
