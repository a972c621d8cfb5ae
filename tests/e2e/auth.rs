//! `ragent prepull --auth` against real registries that demand credentials: distribution 2.8
//! with htpasswd (basic) auth, and with token auth backed by the test kit's token issuer
//! (bearer). Both serve the test node's registry storage on another loopback port, over plain
//! HTTP, so every run names them with `--insecure-registry`.
//!
//! With the right credentials the image lands in containerd and exactly the missing blobs cross
//! the wire (the auth registry's access log); without credentials, or with a wrong password,
//! ragent says what to do and leaves nothing behind: no image record, no lease, no blob.
use std::process::Output;

use ragent::adapters::containerd::Containerd;
use ragent_testkit::{
    auth::{self, AuthKind, AuthRegistry},
    node::Node,
};
use serde_json::Value;

use crate::support::*;

const USER: &str = "ragent-puller";
const PASSWORD: &str = "s3cret:with-colon";

/// Names of image records that start with `prefix`.
async fn records(node: &Node, prefix: &str) -> Vec<String> {
    Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect")
        .list_images()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn leases(node: &Node) -> String {
    let out = node
        .ctr("k8s.io")
        .args(["leases", "ls"])
        .output()
        .expect("ctr leases ls");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn log_lines(reg: &AuthRegistry) -> usize {
    reg.log_text().lines().count()
}

/// `ragent prepull --json --insecure-registry REG [--auth FILE] REF`
fn prepull(node: &Node, reg: &AuthRegistry, auth_file: Option<&str>, reference: &str) -> Output {
    let host = reg.host();
    let mut args = vec!["prepull", "--json", "--insecure-registry", &host];
    if let Some(f) = auth_file {
        args.extend(["--auth", f]);
    }
    args.push(reference);
    ragent(node, &args)
}

/// Prepull with the right credentials: the image is in containerd under the auth registry's
/// name, exactly the missing bytes crossed the wire, the lease is gone.
async fn succeeds(node: &Node, reg: &AuthRegistry, auth_file: &str, repo: &str, tag: &str) {
    let set = fixtures(node);
    let missing = make_missing(node, &set, repo, tag).await;
    let reference = reg.reference(repo, tag);
    let mark = log_lines(reg);
    let out = prepull(node, reg, Some(auth_file), &reference);
    assert!(
        out.status.success(),
        "prepull with {auth_file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert_eq!(report["total"]["bytes_fetched"], missing, "{report}");
    let (served, gets) = served_blob_bytes(&reg.log_text(), mark);
    assert_eq!(
        served, missing,
        "the auth registry served each missing blob once ({gets} blob GETs)"
    );
    let img = set.image(repo, tag).expect("fixture");
    assert_eq!(report["images"][0]["digest"], img.manifest_digest);
    assert_eq!(records(node, &reference).await, vec![reference.clone()]);
    assert!(!leases(node).contains("ragent-prepull"), "{}", leases(node));
    // Leave the store as the node's own tests expect it: no records under this port's name.
    let _ = node
        .ctr("k8s.io")
        .args(["images", "rm", "--sync", &reference])
        .output();
}

/// Prepull without or with wrong credentials: the message, exit code 1, nothing stored.
async fn fails(
    node: &Node,
    reg: &AuthRegistry,
    auth_file: Option<&str>,
    repo: &str,
    want: &[&str],
) {
    let set = fixtures(node);
    make_missing(node, &set, repo, "v1").await;
    let reference = reg.reference(repo, "v1");
    let mark = log_lines(reg);
    let out = prepull(node, reg, auth_file, &reference);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for w in want {
        assert!(text.contains(w), "{w:?} not in: {text}");
    }
    assert_eq!(
        text.trim().lines().count(),
        1,
        "one line, no backtrace: {text}"
    );
    assert!(records(node, &reference).await.is_empty());
    assert!(!leases(node).contains("ragent-prepull"), "{}", leases(node));
    assert_eq!(served_blob_bytes(&reg.log_text(), mark), (0, 0));
    let img = set.image(repo, "v1").expect("fixture");
    assert!(
        content_size_opt(node, &img.config_digest).await.is_none(),
        "the config blob must not have been fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_basic_htpasswd_registry() {
    let node = node();
    let reg = AuthRegistry::start(&node, AuthKind::Htpasswd, USER, PASSWORD).expect("registry");
    let dir = reg.dir.clone();
    let good = auth::write_file(
        &dir,
        "config.json",
        &auth::docker_config(&reg.host(), USER, PASSWORD),
    )
    .expect("write");
    let wrong = auth::write_file(
        &dir,
        "wrong.json",
        &auth::docker_config(&reg.host(), USER, "not-the-password"),
    )
    .expect("write");
    let (good, wrong) = (good.display().to_string(), wrong.display().to_string());
    let repo = "ragent/app-py-worker";
    let host = reg.host();

    let needs = format!("registry {host} needs credentials to pull {repo} (401 Unauthorized on ");
    fails(&node, &reg, None, repo, &[&needs, "--auth FILE"]).await;
    let refused =
        format!("registry {host} refused the credentials for {repo} (401 Unauthorized on ");
    fails(&node, &reg, Some(&wrong), repo, &[&refused, &wrong]).await;
    succeeds(&node, &reg, &good, repo, "v1").await;

    // Credentials never cross plain HTTP to a registry that is not named insecure: ragent
    // speaks TLS to it, fails before any HTTP request reaches it, and says what to do.
    let mark = log_lines(&reg);
    let out = ragent(
        &node,
        &["prepull", "--auth", &good, &reg.reference(repo, "v1")],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("pass --insecure-registry HOST:PORT"),
        "{text}"
    );
    let requests: Vec<String> = reg
        .log_text()
        .lines()
        .skip(mark)
        .filter(|l| l.contains(" /v2/"))
        .map(str::to_string)
        .collect();
    assert!(
        requests.is_empty(),
        "plain HTTP requests reached the registry: {requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_bearer_token_registry_with_config_json_and_k8s_secret_json_and_yaml() {
    let node = node();
    let reg = AuthRegistry::start(&node, AuthKind::Token, USER, PASSWORD).expect("registry");
    let issuer = reg.issuer.as_ref().expect("token issuer");
    let dir = reg.dir.clone();
    let config = auth::docker_config(&reg.host(), USER, PASSWORD);
    let good = auth::write_file(&dir, "config.json", &config).expect("write");
    let secret = auth::write_file(
        &dir,
        "pull-secret.json",
        &auth::pull_secret("pull", &config),
    )
    .expect("write");
    let wrong = auth::write_file(
        &dir,
        "wrong-secret.json",
        &auth::pull_secret(
            "wrong",
            &auth::docker_config(&reg.host(), USER, "not-the-password"),
        ),
    )
    .expect("write");
    let secret_yaml = auth::write_file(
        &dir,
        "pull-secret.yaml",
        &auth::pull_secret_yaml("pull", &config),
    )
    .expect("write");
    let [good, secret, wrong, secret_yaml] =
        [good, secret, wrong, secret_yaml].map(|p| p.display().to_string());
    let repo = "ragent/app-jvm-batch";
    let host = reg.host();

    let needs = format!("registry {host} needs credentials to pull {repo} (401 Unauthorized on ");
    fails(&node, &reg, None, repo, &[&needs, "--auth FILE"]).await;
    let refused_before = issuer.refused.load(std::sync::atomic::Ordering::Relaxed);
    let refused =
        format!("registry {host} refused the credentials for {repo} (401 Unauthorized on ");
    fails(&node, &reg, Some(&wrong), repo, &[&refused, &wrong]).await;
    assert!(
        issuer.refused.load(std::sync::atomic::Ordering::Relaxed) > refused_before,
        "the token issuer saw the wrong password"
    );

    succeeds(&node, &reg, &secret, repo, "v1").await;
    let issued = issuer.issued.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        issued > 0,
        "ragent pulled with a bearer token from the issuer"
    );
    succeeds(&node, &reg, &good, repo, "v1").await;
    let issued_json = issuer.issued.load(std::sync::atomic::Ordering::Relaxed);
    assert!(issued_json > issued);
    succeeds(&node, &reg, &secret_yaml, repo, "v1").await;
    assert!(issuer.issued.load(std::sync::atomic::Ordering::Relaxed) > issued_json);
}

#[test]
fn auth_file_errors_say_what_to_do() {
    let node = node();
    let set = fixtures(&node);
    let reference = set.reference("ragent/run", "v1");
    let reg = node.registry();
    let dir = node.dir().to_path_buf();
    let run = |file: &str| {
        let out = ragent(
            &node,
            &[
                "prepull",
                "--insecure-registry",
                &reg,
                "--auth",
                file,
                &reference,
            ],
        );
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let text = run("/nonexistent/ragent-auth.json");
    assert!(
        text.contains("cannot read the auth file /nonexistent/ragent-auth.json"),
        "{text}"
    );
    let opaque = auth::write_file(
        &dir,
        "opaque-secret.json",
        r#"{"apiVersion":"v1","kind":"Secret","type":"Opaque","data":{"x":"eA=="}}"#,
    )
    .expect("write");
    let text = run(&opaque.display().to_string());
    assert!(
        text.contains("type \"Opaque\"") && text.contains("kubectl create secret docker-registry"),
        "{text}"
    );
    let yaml = auth::write_file(&dir, "auth.yaml", "auths: [unclosed\n").expect("write");
    let text = run(&yaml.display().to_string());
    assert!(text.contains("is neither JSON nor YAML"), "{text}");
}

/// Blob requests carry the credentials even when no manifest of that registry was fetched
/// first (the registry adapter stores them before the first blob request), for both kinds of
/// auth, from the start and from an offset; without or with wrong credentials a blob request
/// fails with the same clear errors as a manifest request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_blob_requests_carry_the_credentials() {
    use futures::TryStreamExt;
    use ragent::{adapters::registry::Registry, config::load_credentials};
    use sha2::{Digest, Sha256};

    let node = node();
    let set = fixtures(&node);
    let img = set.image("ragent/run", "v1").expect("fixture");
    let layer = &img.layers[0];
    for kind in [AuthKind::Htpasswd, AuthKind::Token] {
        let reg = AuthRegistry::start(&node, kind, USER, PASSWORD).expect("registry");
        let good = auth::write_file(
            &reg.dir,
            "config.json",
            &auth::docker_config(&reg.host(), USER, PASSWORD),
        )
        .expect("write");
        let wrong = auth::write_file(
            &reg.dir,
            "wrong.json",
            &auth::docker_config(&reg.host(), USER, "nope"),
        )
        .expect("write");
        let reference = reg.reference("ragent/run", "v1");
        let insecure = [reg.host()];

        let registry = Registry::new(&insecure, load_credentials(&good).expect("credentials"));
        let bytes: Vec<u8> = registry
            .blob(&reference, &layer.digest, layer.size, 0)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"))
            .try_concat()
            .await
            .expect("blob bytes");
        assert_eq!(bytes.len() as u64, layer.size, "{kind:?}");
        assert_eq!(format!("sha256:{:x}", Sha256::digest(&bytes)), layer.digest);
        let tail: Vec<u8> = registry
            .blob(&reference, &layer.digest, layer.size, 1000)
            .await
            .expect("ranged blob")
            .try_concat()
            .await
            .expect("ranged bytes");
        assert_eq!(tail, bytes[1000..], "{kind:?}: resumed from an offset");

        for (registry, label) in [
            (
                Registry::new(
                    &insecure,
                    ragent::core::credentials::Credentials::anonymous(),
                ),
                "auth_required",
            ),
            (
                Registry::new(&insecure, load_credentials(&wrong).expect("credentials")),
                "auth_refused",
            ),
        ] {
            let e = match registry
                .blob(&reference, &layer.digest, layer.size, 0)
                .await
            {
                Ok(s) => match s.try_concat().await {
                    Ok(_) => panic!("{kind:?}: a blob without valid credentials was served"),
                    Err(e) => panic!("{kind:?}: expected a 401 before the body, got {e}"),
                },
                Err(e) => e,
            };
            assert_eq!(e.metric_label(), label, "{kind:?}: {e}");
            assert!(e.to_string().contains("ragent/run"), "{e}");
        }
    }
}
