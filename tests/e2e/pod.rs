//! A pod starts from images `ragent prepull` put into containerd, through CRI as kubelet
//! starts it, with nothing more fetched: the records, content and snapshots are complete.
use containerd_client::tonic::Request;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};

use crate::support::*;

fn sandbox_config(name: &str, log_dir: &std::path::Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "ragent-e2e".into(),
            attempt: 0,
        }),
        // No CNI here: host network, and an empty hostname (docs/environment.md).
        hostname: String::new(),
        log_directory: log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

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
    let log_dir = node.dir().join("pods/prepulled");
    std::fs::create_dir_all(&log_dir).expect("pod log dir");
    let channel = containerd_client::connect(node.socket())
        .await
        .expect("CRI");
    let mut cri = RuntimeServiceClient::new(channel);
    let config = sandbox_config("prepulled", &log_dir);
    let sandbox = cri
        .run_pod_sandbox(Request::new(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        }))
        .await
        .expect("RunPodSandbox with the pre-pulled pause image")
        .into_inner()
        .pod_sandbox_id;
    // Whatever happens below, the pod goes.
    struct Cleanup(
        RuntimeServiceClient<containerd_client::tonic::transport::Channel>,
        String,
    );
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (mut c, id) = (self.0.clone(), self.1.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let _ = c
                        .stop_pod_sandbox(Request::new(StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        }))
                        .await;
                    let _ = c
                        .remove_pod_sandbox(Request::new(RemovePodSandboxRequest {
                            pod_sandbox_id: id,
                        }))
                        .await;
                });
            })
            .join();
        }
    }
    let _cleanup = Cleanup(cri.clone(), sandbox.clone());
    let container = cri
        .create_container(Request::new(CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "web".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: app.clone(),
                    ..Default::default()
                }),
                log_path: "web.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        }))
        .await
        .expect("CreateContainer from the pre-pulled app image")
        .into_inner()
        .container_id;
    cri.start_container(Request::new(StartContainerRequest {
        container_id: container.clone(),
    }))
    .await
    .expect("StartContainer");
    // The app's own entrypoint (CNB launcher -> /workspace/start) runs: it reads a file of the
    // run image and prints it, so every layer is unpacked where it belongs.
    let log = log_dir.join("web.log");
    let rt = tokio::runtime::Handle::current();
    let mut status_client = cri.clone();
    let id = container.clone();
    let (state, text) = tokio::task::spawn_blocking(move || {
        wait_for(
            "the app's greeting in its log",
            std::time::Duration::from_secs(30),
            || {
                let text = std::fs::read_to_string(&log).ok()?;
                text.contains("app-py-web on ").then_some(())?;
                let st = rt
                    .block_on(status_client.container_status(Request::new(
                        ContainerStatusRequest {
                            container_id: id.clone(),
                            verbose: false,
                        },
                    )))
                    .ok()?
                    .into_inner()
                    .status?;
                Some((st.state, text))
            },
        )
    })
    .await
    .expect("waiting");
    assert_eq!(
        state,
        ContainerState::ContainerRunning as i32,
        "the app keeps running: {text}"
    );
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
