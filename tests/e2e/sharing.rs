//! Layer sharing, the containerd side: ragent's certs.d adapter puts a mirror in front of the
//! test registry, the real containerd 1.6 reads it on the next CRI pull, and restore puts the
//! node's own hosts.toml back byte for byte.
//!
//! The mirror here is a stub that has nothing (tests/src/stub.rs): it shows what containerd
//! asks a mirror (blobs and manifests by digest, with `?ns=<registry>`, never a tag) and that
//! the pull still completes from the registry after a 404 and after a 401 challenge, and that
//! a challenge brings the pull's credentials when the CRI AuthConfig has no server_address.
use std::{collections::BTreeSet, io::Write, net::SocketAddr, process::Stdio, time::Duration};

use containerd_client::tonic::Request;
use http_body_util::BodyExt;
use k8s_cri::v1::{
    AuthConfig, ImageSpec, PullImageRequest, image_service_client::ImageServiceClient,
};
use ragent::{
    adapters::{
        certsd::{BACKUP, CertsDir, Installed, Restored},
        containerd::Containerd,
    },
    core::sharing::{Original, PublicPolicy, Route, parse_request},
};
use ragent_testkit::{
    node::{Node, TmpfsContainerd},
    oneoff::{self, OneOff},
    stub::{Answer, Seen, Stub},
};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

use crate::support::*;

const REPO: &str = "ragent/app-py-worker";
const TAG: &str = "v1";

/// Restores the node's hosts.toml when dropped, so a failing test leaves the node as it was.
struct MirrorInstalled {
    certs: CertsDir,
    registry: String,
    original: Vec<u8>,
}

impl MirrorInstalled {
    fn new(node: &Node, mirror: &str) -> MirrorInstalled {
        let registry = node.registry();
        let file = node.hosts_dir().join(&registry).join("hosts.toml");
        let original = std::fs::read(&file).expect("the test node's hosts.toml");
        let certs = CertsDir::new(node.hosts_dir(), mirror);
        assert_eq!(
            certs.install(&registry).expect("install"),
            Installed::Written {
                original: Original::Backup
            }
        );
        // An agent restart installs again: nothing changes.
        assert_eq!(
            certs.install(&registry).expect("install"),
            Installed::Unchanged
        );
        MirrorInstalled {
            certs,
            registry,
            original,
        }
    }

    /// Restores and checks the file is the node's own again, byte for byte, with no backup.
    fn restore(self) {
        let dir = self.certs.root().join(&self.registry);
        assert_eq!(
            self.certs.restore(&self.registry).expect("restore"),
            Restored::Original
        );
        assert_eq!(
            std::fs::read(dir.join("hosts.toml")).expect("hosts.toml"),
            self.original
        );
        assert!(!dir.join(BACKUP).exists());
        std::mem::forget(self);
    }
}

impl Drop for MirrorInstalled {
    fn drop(&mut self) {
        let _ = self.certs.restore(&self.registry);
    }
}

/// CRI PullImage with an AuthConfig of user and password and no server_address.
async fn try_cri_pull_auth(
    node: &Node,
    reference: &str,
    user: &str,
    password: &str,
) -> Result<(), containerd_client::tonic::Status> {
    let channel = containerd_client::connect(node.socket())
        .await
        .expect("connecting to CRI");
    ImageServiceClient::new(channel)
        .pull_image(Request::new(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.to_string(),
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: user.into(),
                password: password.into(),
                ..Default::default()
            }),
            sandbox_config: None,
        }))
        .await
        .map(|_| ())
}

async fn cri_pull_auth(node: &Node, reference: &str, user: &str, password: &str) {
    try_cri_pull_auth(node, reference, user, password)
        .await
        .unwrap_or_else(|e| panic!("CRI PullImage {reference} with credentials: {e}"));
}

/// An image with blobs no test has pulled (containerd shares blobs between namespaces, so a
/// fixture's blobs left in any namespace would never be fetched), pushed to the node's
/// registry; all its digests are absent from the store.
async fn fresh_image(node: &Node, name: &str) -> OneOff {
    let img = oneoff::push(
        &node.registry(),
        &node.dir().join(format!("oneoff-{name}")),
        &format!("ragent-e2e/sharing-{name}"),
        3,
        256 << 10,
    )
    .expect("pushing a one-off image");
    for d in img.digests() {
        assert!(
            content_size_opt(node, &d).await.is_none(),
            "{d} is already in the store"
        );
    }
    img
}

/// Removes every record of the one-off image (CRI adds digest and config aliases), so it does
/// not show up in other tests' image lists.
async fn forget(node: &Node, img: &OneOff) {
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    for r in c.list_images().await.expect("list") {
        if r.target.digest == img.manifest_digest {
            let _ = node
                .ctr("k8s.io")
                .args(["images", "rm", "--sync", &r.name])
                .output();
        }
    }
}

/// Every request containerd sent the mirror parses as the peer server's route for a digest of
/// this registry, and every missing digest was asked for.
fn check_requests(node: &Node, seen: &[Seen], repo: &str, missing: &BTreeSet<String>) {
    assert!(!seen.is_empty(), "containerd never asked the mirror");
    let mut asked = BTreeSet::new();
    for s in seen {
        assert_eq!(s.method, "GET", "{s:?}");
        match parse_request(&s.method, &s.path, s.query.as_deref()) {
            Ok(Route::Content(c)) => {
                assert_eq!(c.name, repo, "{s:?}");
                assert_eq!(
                    c.registry.as_deref(),
                    Some(node.registry().as_str()),
                    "{s:?}"
                );
                asked.insert(c.digest.to_string());
            }
            other => panic!("containerd asked the mirror {s:?}, which parses as {other:?}"),
        }
    }
    eprintln!(
        "the mirror saw {} requests ({} with credentials) for {} digests",
        seen.len(),
        seen.iter().filter(|s| s.authorized).count(),
        asked.len()
    );
    let not_asked: Vec<&String> = missing.difference(&asked).collect();
    assert!(
        not_asked.is_empty(),
        "never asked the mirror for {not_asked:?}; asked {asked:?}"
    );
}

async fn fetched(node: &Node, missing: &BTreeSet<String>) {
    for d in missing {
        assert!(
            content_size_opt(node, d).await.is_some(),
            "{d} is not in the store after the pull"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_asks_the_mirror_by_digest_and_falls_back_on_404() {
    let node = node();
    let stub = Stub::start(Answer::NotFound).expect("stub");
    let installed = MirrorInstalled::new(&node, &stub.url());
    let img = fresh_image(&node, "404").await;
    let missing: BTreeSet<String> = img.digests().into_iter().collect();
    cri_pull(&node, &img.reference).await;
    fetched(&node, &missing).await;
    forget(&node, &img).await;
    let seen = stub.seen();
    check_requests(&node, &seen, &img.repo, &missing);
    // A 404 is not a challenge: no credentials were ever sent.
    assert!(seen.iter().all(|s| !s.authorized), "{seen:?}");
    installed.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_without_credentials_falls_back_to_the_registry() {
    let node = node();
    let stub = Stub::start(Answer::Challenge).expect("stub");
    let installed = MirrorInstalled::new(&node, &stub.url());
    let img = fresh_image(&node, "challenge").await;
    let missing: BTreeSet<String> = img.digests().into_iter().collect();
    cri_pull(&node, &img.reference).await;
    fetched(&node, &missing).await;
    forget(&node, &img).await;
    let seen = stub.seen();
    check_requests(&node, &seen, &img.repo, &missing);
    assert!(seen.iter().all(|s| !s.authorized), "{seen:?}");
    installed.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_brings_the_pulls_credentials() {
    let node = node();
    let stub = Stub::start(Answer::Challenge).expect("stub");
    let installed = MirrorInstalled::new(&node, &stub.url());
    let img = fresh_image(&node, "credentials").await;
    let missing: BTreeSet<String> = img.digests().into_iter().collect();
    cri_pull_auth(&node, &img.reference, "ragent-puller", "s3cret").await;
    fetched(&node, &missing).await;
    forget(&node, &img).await;
    let seen = stub.seen();
    check_requests(&node, &seen, &img.repo, &missing);
    // After the first challenge containerd sends them with every later request to that host
    // (one request without, then one with credentials per digest); each digest was asked
    // with them.
    let authorized: BTreeSet<&str> = seen
        .iter()
        .filter(|s| s.authorized)
        .map(|s| s.path.as_str())
        .collect();
    for d in &missing {
        assert!(
            authorized.iter().any(|p| p.ends_with(d.as_str())),
            "no request with credentials for {d}: {seen:?}"
        );
    }
    installed.restore();
}

// ---------------------------------------------------------------------------------------------
// The peer server against the node's real content store.

/// The peer server on a free loopback port, serving the node's k8s.io content store with
/// `public` as the policy; stops when the sender is dropped.
async fn start_peer(node: &Node, public: &[String]) -> (SocketAddr, oneshot::Sender<()>) {
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let policy = PublicPolicy::parse(public).expect("policy");
    tokio::spawn(ragent::peer::serve(
        listener,
        c,
        ragent::peer::PeerOptions::public_only(policy),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

struct HttpAnswer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

/// One HTTP/1.1 request to `addr`, bounded in time.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpAnswer {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = send
            .send_request(
                req.body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        HttpAnswer {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 30 s"))
}

fn header<'a>(a: &'a HttpAnswer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_server_serves_committed_content_from_containerd() {
    let node = node();
    let set = fixtures(&node);
    let reference = set.reference(REPO, TAG);
    cri_pull(&node, &reference).await;
    let img = set.image(REPO, TAG).expect("fixture");
    let registry = node.registry();
    let ns = format!("ns={}", registry.replace(':', "%3A"));
    let (addr, _stop) = start_peer(&node, std::slice::from_ref(&registry)).await;

    // The manifest, by digest: its bytes, its own media type.
    let m = request(
        addr,
        "GET",
        &format!("/v2/{REPO}/manifests/{}?{ns}", img.manifest_digest),
        &[],
    )
    .await;
    assert_eq!(m.status, 200);
    assert_eq!(sha256(&m.body), img.manifest_digest);
    assert_eq!(header(&m, "docker-content-digest"), img.manifest_digest);
    assert_eq!(header(&m, "content-length"), m.body.len().to_string());
    let declared: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
    assert_eq!(
        header(&m, "content-type"),
        declared["mediaType"].as_str().expect("mediaType")
    );

    // Every layer: exact bytes; HEAD: the length and no body.
    for l in &img.layers {
        let path = format!("/v2/{REPO}/blobs/{}?{ns}", l.digest);
        let b = request(addr, "GET", &path, &[]).await;
        assert_eq!(b.status, 200, "{}", l.digest);
        assert_eq!(b.body.len() as u64, l.size);
        assert_eq!(sha256(&b.body), l.digest);
        let h = request(addr, "HEAD", &path, &[]).await;
        assert_eq!((h.status, h.body.len()), (200, 0));
        assert_eq!(header(&h, "content-length"), l.size.to_string());
        assert_eq!(header(&h, "docker-content-digest"), l.digest);
    }
    // A resumed download: the tail, 206.
    let big = img.layers.iter().max_by_key(|l| l.size).expect("a layer");
    let whole = request(
        addr,
        "GET",
        &format!("/v2/{REPO}/blobs/{}?{ns}", big.digest),
        &[],
    )
    .await;
    let from = big.size / 2;
    let tail = request(
        addr,
        "GET",
        &format!("/v2/{REPO}/blobs/{}?{ns}", big.digest),
        &[("range", &format!("bytes={from}-"))],
    )
    .await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, whole.body[from as usize..]);
    assert_eq!(
        header(&tail, "content-range"),
        format!("bytes {from}-{}/{}", big.size - 1, big.size)
    );

    // Unknown digests and tags: 404, so containerd goes to the registry.
    let unknown = format!("sha256:{}", "0".repeat(64));
    for path in [
        format!("/v2/{REPO}/blobs/{unknown}?{ns}"),
        format!("/v2/{REPO}/manifests/{unknown}?{ns}"),
        format!("/v2/{REPO}/manifests/{TAG}?{ns}"),
    ] {
        assert_eq!(request(addr, "GET", &path, &[]).await.status, 404, "{path}");
    }
    // Not public: challenged, and with credentials declined (no upstream check yet).
    let (private, _stop2) = start_peer(&node, &[]).await;
    let path = format!("/v2/{REPO}/blobs/{}?{ns}", big.digest);
    let c = request(private, "GET", &path, &[]).await;
    assert_eq!(c.status, 401);
    assert_eq!(header(&c, "www-authenticate"), "Basic realm=\"ragent\"");
    let d = request(private, "GET", &path, &[("authorization", "Basic dTpw")]).await;
    assert_eq!(d.status, 404);
    assert!(
        c.body.len() < 200 && d.body.len() < 200,
        "no content leaked"
    );
}

/// Bytes that compress badly and repeat nowhere: a sha256 chain, new on every call.
fn noise(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    // Unique per run: a blob an earlier run left in any namespace would be "already there".
    let seed = format!(
        "ragent sharing ingest {} {:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let mut block = Sha256::digest(seed.as_bytes()).to_vec();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

/// An ingest still being written is never served: 404 while `ctr content ingest` has half the
/// bytes, 200 with the exact bytes once it committed (Spegel served such blobs, #502/#752).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_server_never_serves_an_ingest_in_progress() {
    let node = node();
    let registry = node.registry();
    let ns = format!("ns={}", registry.replace(':', "%3A"));
    let (addr, _stop) = start_peer(&node, std::slice::from_ref(&registry)).await;
    let bytes = noise(3 << 20);
    let digest = sha256(&bytes);
    let reference = format!("ragent-e2e-ingest-{}", std::process::id());
    let mut child = node
        .ctr("k8s.io")
        .args(["content", "ingest", "--expected-size"])
        .arg(bytes.len().to_string())
        .args(["--expected-digest", &digest, &reference])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr content ingest");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(&bytes[..bytes.len() / 2])
        .expect("first half");
    stdin.flush().expect("flush");
    // containerd has the ingest (with some of its bytes).
    wait_for(
        "the ingest to show in `ctr content active`",
        Duration::from_secs(20),
        || {
            let out = node
                .ctr("k8s.io")
                .args(["content", "active"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains(&reference)
                .then_some(())
        },
    );
    let path = format!("/v2/{REPO}/blobs/{digest}?{ns}");
    assert_eq!(request(addr, "HEAD", &path, &[]).await.status, 404);
    assert_eq!(request(addr, "GET", &path, &[]).await.status, 404);
    stdin
        .write_all(&bytes[bytes.len() / 2..])
        .expect("second half");
    drop(stdin);
    let out = child.wait_with_output().expect("ctr exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = request(addr, "GET", &path, &[]).await;
    let _ = node.ctr("k8s.io").args(["content", "rm", &digest]).output();
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), bytes.len());
    assert!(
        got.body == bytes,
        "the served bytes differ from the ingested ones"
    );
}

/// The whole path between two nodes: a second containerd (no CRI, its root on a tmpfs) pulls
/// an image the test node holds, with hosts.toml written by ragent's certs.d adapter pointing
/// at the test node's peer server. Every blob comes from the peer (the registry serves none:
/// its access log is the ground truth), containerd checks each digest as it commits, and only
/// the tag is resolved at the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_containerd_pulls_every_blob_from_the_peer() {
    let node = node();
    let set = fixtures(&node);
    let reference = set.reference(REPO, TAG);
    cri_pull(&node, &reference).await;
    let img = set.image(REPO, TAG).expect("fixture");
    let registry = node.registry();
    let (addr, _stop) = start_peer(&node, std::slice::from_ref(&registry)).await;

    let other = TmpfsContainerd::start(&node.dir().join("peer-b"), 512).expect("containerd B");
    let certs = node.dir().join("peer-b-certs");
    let _ = std::fs::remove_dir_all(&certs);
    std::fs::create_dir_all(certs.join(&registry)).expect("certs dir");
    std::fs::copy(
        node.hosts_dir().join(&registry).join("hosts.toml"),
        certs.join(&registry).join("hosts.toml"),
    )
    .expect("the node's hosts.toml");
    let installed = CertsDir::new(&certs, format!("http://{addr}"))
        .install(&registry)
        .expect("install");
    assert_eq!(
        installed,
        Installed::Written {
            original: Original::Backup
        }
    );

    let mark = registry_log_mark(&node);
    let out = other
        .ctr("k8s.io")
        .args(["images", "pull", "--hosts-dir"])
        .arg(&certs)
        .arg(&reference)
        .output()
        .expect("ctr pull on containerd B");
    let (served, gets) = served_since(&node, mark);
    let log = std::fs::read_to_string(node.dir().join("registry.log")).expect("registry log");
    let after: Vec<&str> = log.lines().skip(mark).collect();
    let _ = std::fs::remove_dir_all(&certs);
    assert!(
        out.status.success(),
        "ctr pull through the peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        (served, gets),
        (0, 0),
        "the registry served blobs: {after:#?}"
    );
    assert!(
        after.iter().all(|l| !l.contains("/manifests/sha256:")),
        "a manifest by digest came from the registry: {after:#?}"
    );
    // B holds every layer, committed (so verified against its digest) at its size.
    let b = Containerd::connect(&other.socket(), "k8s.io")
        .await
        .expect("connect to B");
    for l in &img.layers {
        assert_eq!(
            b.content_size(&l.digest).await.expect("Content.Info"),
            Some(l.size),
            "{}",
            l.digest
        );
    }
    assert!(b.get_image(&reference).await.expect("Images.Get").is_some());
}

/// `ragent agent` with `[sharing]` on: it writes the mirror entry into the certs.d it is given,
/// serves peers on `peer_addr` (a second containerd pulls through it and the registry serves
/// no blob), leaves the entry when it stops, and restores the original byte for byte when it
/// starts again with sharing off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_peers_and_restores_certs_d_when_sharing_is_off() {
    let node = node();
    let set = fixtures(&node);
    let reference = set.reference(REPO, TAG);
    cri_pull(&node, &reference).await;
    let img = set.image(REPO, TAG).expect("fixture");
    let registry = node.registry();
    let certs = node.dir().join("agent-certs");
    let _ = std::fs::remove_dir_all(&certs);
    std::fs::create_dir_all(certs.join(&registry)).expect("certs dir");
    let file = certs.join(&registry).join("hosts.toml");
    std::fs::copy(node.hosts_dir().join(&registry).join("hosts.toml"), &file)
        .expect("the node's hosts.toml");
    let original = std::fs::read(&file).expect("read");
    let peer_port = free_port();
    let config = |enabled: bool| {
        let path = node.dir().join(format!("sharing-{enabled}.toml"));
        std::fs::write(
            &path,
            format!(
                "[sharing]\nenabled = {enabled}\npeer_addr = \"127.0.0.1:{peer_port}\"\n\
                 registries = [\"{registry}\"]\ncerts_dir = \"{}\"\npublic = [\"{registry}\"]\n",
                certs.display()
            ),
        )
        .expect("config");
        path.display().to_string()
    };

    let on = config(true);
    let agent = Agent::start(&node, free_port(), &["--no-ebpf", "--config", &on]);
    let text = std::fs::read_to_string(&file).expect("hosts.toml");
    assert!(
        text.contains("# ragent-managed: original=backup")
            && text.contains(&format!("[host.\"http://127.0.0.1:{peer_port}\"]")),
        "{text}"
    );
    let peer: SocketAddr = ([127, 0, 0, 1], peer_port).into();
    let ns = format!("ns={}", registry.replace(':', "%3A"));
    let m = request(
        peer,
        "GET",
        &format!("/v2/{REPO}/manifests/{}?{ns}", img.manifest_digest),
        &[],
    )
    .await;
    assert_eq!(m.status, 200);
    assert_eq!(sha256(&m.body), img.manifest_digest);

    // A second containerd pulls through the agent.
    let other = TmpfsContainerd::start(&node.dir().join("agent-b"), 512).expect("containerd B");
    let mark = registry_log_mark(&node);
    let out = other
        .ctr("k8s.io")
        .args(["images", "pull", "--hosts-dir"])
        .arg(&certs)
        .arg(&reference)
        .output()
        .expect("ctr pull on containerd B");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        served_since(&node, mark),
        (0, 0),
        "the registry served blobs"
    );
    drop(other);

    // Stopping keeps the entry (containerd finds the port closed and goes to the registry).
    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert_eq!(std::fs::read_to_string(&file).expect("hosts.toml"), text);

    // Sharing off: the original is back, byte for byte, and no backup is left.
    let off = config(false);
    let agent = Agent::start(&node, free_port(), &["--no-ebpf", "--config", &off]);
    assert_eq!(std::fs::read(&file).expect("hosts.toml"), original);
    assert!(!certs.join(&registry).join(BACKUP).exists());
    assert!(
        std::net::TcpStream::connect(peer).is_err(),
        "nothing listens on the peer port with sharing off"
    );
    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&certs);
}

// ---------------------------------------------------------------------------------------------
// Private content: the pull's credentials, checked at the registry.

/// The whole-blob GETs (200) in a registry log for `digests`: by ragent (oci-client), by
/// containerd; and ragent's one-byte credential checks (206).
fn blob_gets_by_client(log: &str, digests: &BTreeSet<String>) -> (usize, usize, usize) {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
        .filter(|l| digests.iter().any(|d| l.contains(d.as_str())))
        .collect();
    let whole: Vec<&&str> = lines.iter().filter(|l| l.contains("\" 200 ")).collect();
    let ragent = whole.iter().filter(|l| l.contains("oci-client")).count();
    let checks = lines
        .iter()
        .filter(|l| l.contains("\" 206 ") && l.contains("oci-client"))
        .count();
    (ragent, whole.len() - ragent, checks)
}

/// A registry that demands credentials; the agent's mirror in front of it for CRI. A pull
/// with the right credentials is served through the agent (it checked them at the registry
/// and fetched the blobs with them); a pull with wrong ones gets nothing from the agent, and
/// the registry refuses it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_content_is_served_only_to_credentials_the_registry_accepts() {
    use ragent_testkit::auth::{AuthKind, AuthRegistry};
    let node = node();
    let (user, password) = ("ragent-puller", "s3cret-s3cret");
    let reg = AuthRegistry::start(&node, AuthKind::Htpasswd, user, password).expect("registry");
    let host = reg.host();
    // containerd reaches it over plain HTTP (its own hosts.toml, which ragent's entry keeps).
    node.add_plain_http_registry(&host).expect("hosts.toml");
    let peer_port = free_port();
    let config = node.dir().join("sharing-private.toml");
    std::fs::write(
        &config,
        format!(
            "[sharing]\nenabled = true\npeer_addr = \"127.0.0.1:{peer_port}\"\n\
             registries = [\"{host}\"]\ncerts_dir = \"{}\"\ninsecure_registries = [\"{host}\"]\n\
             spool_dir = \"{}\"\n",
            node.hosts_dir().display(),
            node.dir().join("spool-private").display()
        ),
    )
    .expect("config");
    let agent = Agent::start(
        &node,
        free_port(),
        &["--no-ebpf", "--config", &config.display().to_string()],
    );
    let series = |outcome: &str| {
        format!("ragent_peer_requests_total{{caller=\"local\",outcome=\"{outcome}\"}}")
    };

    // The right credentials: every blob comes through the agent.
    let img = fresh_image(&node, "private-ok").await;
    let blobs: BTreeSet<String> = img.digests().into_iter().skip(1).collect();
    let reference = img.reference.replacen(&node.registry(), &host, 1);
    cri_pull_auth(&node, &reference, user, password).await;
    fetched(&node, &blobs).await;
    let (by_ragent, by_containerd, checks) = blob_gets_by_client(&reg.log_text(), &blobs);
    assert_eq!(
        (by_ragent, by_containerd),
        (blobs.len(), 0),
        "the agent fetched every blob, containerd none"
    );
    // The credentials were checked (a one-byte GET), and the answer remembered for the
    // repository.
    assert_eq!(checks, 1);
    assert!(agent.value(&series("fetched")).unwrap_or(0.0) >= blobs.len() as f64);
    let declined_before = agent.value(&series("declined")).unwrap_or(0.0);
    forget(&node, &img).await;

    // Wrong credentials: the registry refuses the pull (at the tag, before any blob).
    let img = fresh_image(&node, "private-wrong").await;
    let blobs: BTreeSet<String> = img.digests().into_iter().skip(1).collect();
    let reference = img.reference.replacen(&node.registry(), &host, 1);
    let r = try_cri_pull_auth(&node, &reference, user, "not-the-password").await;
    assert!(r.is_err(), "the registry refuses wrong credentials");
    // The mirror itself, asked for a blob of that image: without credentials a challenge;
    // with wrong ones 404 and nothing fetched; with the right ones the blob.
    use base64::Engine as _;
    let basic = |p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{p}"))
        )
    };
    let layer = img.layers[0].0.clone();
    let path = format!(
        "/v2/{}/blobs/{layer}?ns={}",
        img.repo,
        host.replace(':', "%3A")
    );
    let mirror: SocketAddr = ([127, 0, 0, 1], peer_port).into();
    let none = request(mirror, "GET", &path, &[]).await;
    assert_eq!(none.status, 401);
    let wrong = request(
        mirror,
        "GET",
        &path,
        &[("authorization", basic("not-the-password").as_str())],
    )
    .await;
    assert_eq!(wrong.status, 404);
    let (by_ragent, _, checks) = blob_gets_by_client(&reg.log_text(), &blobs);
    assert_eq!(
        (by_ragent, checks),
        (0, 0),
        "nothing fetched for wrong credentials"
    );
    assert!(agent.value(&series("declined")).unwrap_or(0.0) > declined_before);
    let right = request(
        mirror,
        "GET",
        &path,
        &[("authorization", basic(password).as_str())],
    )
    .await;
    assert_eq!(right.status, 200);
    assert_eq!(sha256(&right.body), layer);
    forget(&node, &img).await;
    drop(agent);
    let _ = std::fs::remove_dir_all(node.hosts_dir().join(&host));
}
