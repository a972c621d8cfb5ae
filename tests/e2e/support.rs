//! Shared helpers: the node, the fixtures, running ragent, CRI pulls, the agent process.
use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use containerd_client::tonic::Request;
use k8s_cri::v1::{ImageSpec, PullImageRequest, image_service_client::ImageServiceClient};
use ragent_testkit::{fixtures::FixtureSet, http, node::Node};

pub fn node() -> Node {
    let dir = std::env::var("RAGENT_TEST_NODE")
        .expect("RAGENT_TEST_NODE is not set: run the end-to-end tests with `cargo xtask test`");
    Node::load(&PathBuf::from(dir)).expect("loading the test node")
}

pub fn fixtures(node: &Node) -> FixtureSet {
    FixtureSet::load(&node.fixtures_dir()).expect("loading fixtures.json")
}

pub fn ragent_bin() -> PathBuf {
    let p = std::env::var("RAGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ragent")
        });
    assert!(
        p.exists(),
        "{} does not exist: build it (cargo build -p ragent) or set RAGENT_BIN",
        p.display()
    );
    p
}

/// Runs `ragent ARGS` against the node; the environment carries no RAGENT_* of the caller.
pub fn ragent(node: &Node, args: &[&str]) -> Output {
    let mut c = Command::new(ragent_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("RAGENT_") {
            c.env_remove(k);
        }
    }
    c.env("RAGENT_CONTAINERD", node.socket())
        .args(args)
        .output()
        .expect("running ragent")
}

/// Pulls through containerd's CRI ImageService, as kubelet does.
pub async fn cri_pull(node: &Node, reference: &str) {
    let channel = containerd_client::connect(node.socket())
        .await
        .expect("connecting to CRI");
    let mut client = ImageServiceClient::new(channel);
    client
        .pull_image(Request::new(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.to_string(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        }))
        .await
        .unwrap_or_else(|e| panic!("CRI PullImage {reference}: {e}"));
}

/// Whether CRI's ImageService knows `reference` (its image store follows containerd's image
/// events, so a record written by ragent shows up a moment later).
pub async fn cri_has_image(node: &Node, reference: &str) -> bool {
    let channel = containerd_client::connect(node.socket())
        .await
        .expect("connecting to CRI");
    ImageServiceClient::new(channel)
        .image_status(Request::new(k8s_cri::v1::ImageStatusRequest {
            image: Some(ImageSpec {
                image: reference.to_string(),
                ..Default::default()
            }),
            verbose: false,
        }))
        .await
        .map(|r| r.into_inner().image.is_some())
        .unwrap_or(false)
}

/// The size containerd's content store reports for a blob.
pub async fn content_size(node: &Node, digest: &str) -> u64 {
    let c = ragent::adapters::containerd::Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connecting to containerd");
    c.content_size(digest)
        .await
        .expect("Content.Info")
        .unwrap_or_else(|| panic!("{digest} is not in the content store"))
}

/// Like [`content_size`], but None when the blob is not there.
pub async fn content_size_opt(node: &Node, digest: &str) -> Option<u64> {
    let c = ragent::adapters::containerd::Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connecting to containerd");
    c.content_size(digest).await.expect("Content.Info")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(100));
    }
}

/// Like [`wait_for`], for checks that are async (CRI calls).
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a test's precondition holds; if not, says why it skips, or fails under
/// `cargo xtask test` (RAGENT_STRICT_TESTS=1), where nothing may skip silently.
pub fn require(ok: bool, why: &str) -> bool {
    if !ok {
        assert!(
            std::env::var_os("RAGENT_STRICT_TESTS").is_none(),
            "cannot run: {why}"
        );
        eprintln!("skipping: {why}");
    }
    ok
}

/// A running `ragent agent`, killed on drop if the test did not stop it.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(node: &Node, port: u16, extra: &[&str]) -> Agent {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = node.dir().join(format!("agent-{port}.log"));
        let f = std::fs::File::create(&log).expect("agent log");
        // Each agent its own right-sizing checkpoint (not the node-wide default directory).
        let checkpoints = node.dir().join(format!("rightsizing-{port}"));
        let mut cmd = Command::new(ragent_bin());
        cmd.args(["agent", "--metrics-addr", &addr.to_string()])
            .arg("--containerd")
            .arg(node.socket());
        if !extra.contains(&"--checkpoint-dir") {
            cmd.arg("--checkpoint-dir").arg(&checkpoints);
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("starting ragent agent");
        let a = Agent { child, addr, log };
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http::get(self.addr, path).unwrap_or((0, String::new()))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        while self.get("/readyz").0 != 200 {
            if start.elapsed() > timeout {
                panic!(
                    "the agent was not ready within {timeout:?}; /readyz says {:?}; its log:\n{}",
                    self.get("/readyz").1,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics answered {status}");
        body
    }

    /// The value of one series, e.g. `ragent_images` or `ragent_node_layer_bytes{scope="unique"}`.
    pub fn value(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    /// SIGTERM, then waits for exit; returns the exit status.
    pub fn terminate(mut self, timeout: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the child we spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("waiting for the agent") {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "the agent did not stop within {timeout:?} of SIGTERM"
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub use ragent_testkit::accesslog::served_blob_bytes;

/// The registry's access log so far, as a mark for [`served_since`].
pub fn registry_log_mark(node: &Node) -> usize {
    std::fs::read_to_string(node.dir().join("registry.log"))
        .expect("registry log")
        .lines()
        .count()
}

/// Blob bytes (and GETs) the registry served since `mark`.
pub fn served_since(node: &Node, mark: usize) -> (u64, usize) {
    served_blob_bytes(
        &std::fs::read_to_string(node.dir().join("registry.log")).expect("registry log"),
        mark,
    )
}

/// Removes every image record of `k8s.io` and waits for containerd's GC (`--sync`), so the
/// next pull starts from a store that holds no image content.
pub fn remove_all_images(node: &Node) {
    let out = node
        .ctr("k8s.io")
        .args(["images", "ls", "-q"])
        .output()
        .expect("ctr images ls");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    if !names.is_empty() {
        let out = node
            .ctr("k8s.io")
            .args(["images", "rm", "--sync"])
            .args(&names)
            .output()
            .expect("ctr images rm");
        assert!(
            out.status.success(),
            "ctr images rm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The distinct blobs (config and layers) of fixture images: (digest, size).
pub fn blobs_of(
    set: &FixtureSet,
    images: &[(&str, &str)],
) -> std::collections::BTreeSet<(String, u64)> {
    let mut needed = std::collections::BTreeSet::new();
    for (repo, tag) in images {
        let img = set.image(repo, tag).expect("fixture");
        let config = std::fs::metadata(
            set.layout
                .join("blobs/sha256")
                .join(img.config_digest.trim_start_matches("sha256:")),
        )
        .expect("config blob")
        .len();
        needed.insert((img.config_digest.clone(), config));
        for l in &img.layers {
            needed.insert((l.digest.clone(), l.size));
        }
    }
    needed
}

/// Bytes of those blobs that the content store does not hold now.
pub async fn missing_bytes(node: &Node, set: &FixtureSet, images: &[(&str, &str)]) -> u64 {
    let mut missing = 0;
    for (d, size) in blobs_of(set, images) {
        if content_size_opt(node, &d).await.is_none() {
            missing += size;
        }
    }
    missing
}

/// Whether the image's top layer is unpacked into containerd's overlayfs snapshotter.
pub fn unpacked(node: &Node, set: &FixtureSet, repo: &str, tag: &str) -> bool {
    image_unpacked(node, set.image(repo, tag).expect("fixture"))
}

/// Same for a fixture image.
pub fn image_unpacked(node: &Node, img: &ragent_testkit::fixtures::Image) -> bool {
    let chains = ragent::core::chain::chain_ids(
        &img.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
    );
    node.ctr("k8s.io")
        .args(["snapshots", "--snapshotter", "overlayfs", "info"])
        .arg(chains.last().expect("a top layer"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The manifest digest an image record points at, if the record exists.
pub async fn record_target(node: &Node, name: &str) -> Option<String> {
    let c = ragent::adapters::containerd::Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connecting to containerd");
    c.get_image(name)
        .await
        .expect("Images.Get")
        .map(|r| r.target.digest)
}

/// Removes every record of `repo:tag`'s manifest and its own blobs (config, app and config
/// layers), waits for GC; returns the bytes of the image's blobs now missing from the store.
pub async fn make_missing(node: &Node, set: &FixtureSet, repo: &str, tag: &str) -> u64 {
    let img = set.image(repo, tag).expect("fixture");
    let c = ragent::adapters::containerd::Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    for r in c
        .list_images()
        .await
        .expect("list")
        .iter()
        .filter(|r| r.target.digest == img.manifest_digest)
    {
        let _ = node
            .ctr("k8s.io")
            .args(["images", "rm", "--sync", &r.name])
            .output();
    }
    let own: Vec<&str> = img
        .layers
        .iter()
        .filter(|l| l.role == "app" || l.role == "config")
        .map(|l| l.digest.as_str())
        .collect();
    let _ = node
        .ctr("k8s.io")
        .args(["content", "rm", &img.config_digest])
        .args(&own)
        .output();
    let config_size = std::fs::metadata(
        set.layout
            .join("blobs/sha256")
            .join(img.config_digest.trim_start_matches("sha256:")),
    )
    .expect("config blob")
    .len();
    let mut blobs: std::collections::BTreeSet<(String, u64)> = img
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    blobs.insert((img.config_digest.clone(), config_size));
    let mut missing = 0;
    for (d, size) in &blobs {
        if content_size_opt(node, d).await.is_none() {
            missing += size;
        }
    }
    assert!(missing > 0, "the test must start with something to fetch");
    missing
}

/// Points `to` at the manifest of `from` inside the test registry (a tag that moves).
pub fn retag(from: &str, to: &str) {
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{from}"))
        .arg(format!("docker://{to}"))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sum of every series whose line starts with `prefix` (e.g. `ragent_x_total{`).
pub fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
