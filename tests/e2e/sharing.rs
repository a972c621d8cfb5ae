//! Layer sharing, the containerd side: ragent's certs.d adapter puts a mirror in front of the
//! test registry, the real containerd 1.6 reads it on the next CRI pull, and restore puts the
//! node's own hosts.toml back byte for byte.
//!
//! The mirror here is a stub that has nothing (tests/src/stub.rs): it shows what containerd
//! asks a mirror (blobs and manifests by digest, with `?ns=<registry>`, never a tag) and that
//! the pull still completes from the registry after a 404 and after a 401 challenge, and that
//! a challenge brings the pull's credentials when the CRI AuthConfig has no server_address.
use std::collections::BTreeSet;

use containerd_client::tonic::Request;
use k8s_cri::v1::{
    AuthConfig, ImageSpec, PullImageRequest, image_service_client::ImageServiceClient,
};
use ragent::{
    adapters::certsd::{BACKUP, CertsDir, Installed, Restored},
    core::sharing::{Original, Route, parse_request},
};
use ragent_testkit::{
    node::Node,
    stub::{Answer, Seen, Stub},
};

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
async fn cri_pull_auth(node: &Node, reference: &str, user: &str, password: &str) {
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
        .unwrap_or_else(|e| panic!("CRI PullImage {reference} with credentials: {e}"));
}

/// Makes the fixture's own blobs missing; returns the digests a pull must fetch.
async fn missing_digests(node: &Node) -> BTreeSet<String> {
    let set = fixtures(node);
    make_missing(node, &set, REPO, TAG).await;
    let img = set.image(REPO, TAG).expect("fixture");
    let mut all: Vec<String> = img.layers.iter().map(|l| l.digest.clone()).collect();
    all.push(img.config_digest.clone());
    all.push(img.manifest_digest.clone());
    let mut missing = BTreeSet::new();
    for d in all {
        if content_size_opt(node, &d).await.is_none() {
            missing.insert(d);
        }
    }
    missing
}

/// Every request containerd sent the mirror parses as the peer server's route for a digest of
/// this registry, and every missing digest was asked for.
fn check_requests(node: &Node, seen: &[Seen], missing: &BTreeSet<String>) {
    assert!(!seen.is_empty(), "containerd never asked the mirror");
    let mut asked = BTreeSet::new();
    for s in seen {
        assert_eq!(s.method, "GET", "{s:?}");
        match parse_request(&s.method, &s.path, s.query.as_deref()) {
            Ok(Route::Content(c)) => {
                assert_eq!(c.name, REPO, "{s:?}");
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
    let missing = missing_digests(&node).await;
    cri_pull(&node, &fixtures(&node).reference(REPO, TAG)).await;
    fetched(&node, &missing).await;
    let seen = stub.seen();
    check_requests(&node, &seen, &missing);
    // A 404 is not a challenge: no credentials were ever sent.
    assert!(seen.iter().all(|s| !s.authorized), "{seen:?}");
    installed.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_without_credentials_falls_back_to_the_registry() {
    let node = node();
    let stub = Stub::start(Answer::Challenge).expect("stub");
    let installed = MirrorInstalled::new(&node, &stub.url());
    let missing = missing_digests(&node).await;
    cri_pull(&node, &fixtures(&node).reference(REPO, TAG)).await;
    fetched(&node, &missing).await;
    let seen = stub.seen();
    check_requests(&node, &seen, &missing);
    assert!(seen.iter().all(|s| !s.authorized), "{seen:?}");
    installed.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_brings_the_pulls_credentials() {
    let node = node();
    let stub = Stub::start(Answer::Challenge).expect("stub");
    let installed = MirrorInstalled::new(&node, &stub.url());
    let missing = missing_digests(&node).await;
    cri_pull_auth(
        &node,
        &fixtures(&node).reference(REPO, TAG),
        "ragent-puller",
        "s3cret",
    )
    .await;
    fetched(&node, &missing).await;
    let seen = stub.seen();
    check_requests(&node, &seen, &missing);
    // After the first challenge containerd sends them with every request to that host (seen:
    // 9 requests, 8 with credentials, for 8 digests); each digest was asked with them.
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
