//! A registry that misbehaves, and crashes in the middle of a pull. The test kit's proxy
//! (`ragent_testkit::proxy`) sits between ragent and the real registry and injects one fault;
//! each test checks the one line the user sees and the store afterwards: no image record for
//! the failed image, no lease of ragent's left, no blob committed with the wrong bytes. The
//! crash tests kill ragent or restart containerd mid-transfer and check that the same pre-pull
//! run again fetches only what is still missing.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ragent::adapters::containerd::Containerd;
use ragent_testkit::{
    fixtures::{FixtureSet, Image},
    node::{Node, TmpfsContainerd},
    proxy::{Fault, Proxy, Target},
};

use crate::support::*;

/// The image most fault tests pull (its app and config layers are its own).
const IMAGE: (&str, &str) = ("ragent/app-py-worker", "v1");
/// Seconds ragent waits for a silent registry in these tests.
const TIMEOUT: &str = "3";

struct Case {
    node: Node,
    set: FixtureSet,
    c: Containerd,
    proxy: Proxy,
    /// ragent's leases before the test (a killed run's lease lives on until it expires).
    leases_before: Vec<String>,
}

impl Case {
    async fn new(fault: Fault) -> Case {
        let node = node();
        let set = fixtures(&node);
        let c = Containerd::connect(&node.socket(), "k8s.io")
            .await
            .expect("connect");
        let proxy = Proxy::start(node.registry().parse().expect("registry addr"), fault)
            .expect("starting the proxy");
        let leases_before = ragent_leases(&node);
        Case {
            node,
            set,
            c,
            proxy,
            leases_before,
        }
    }

    fn image(&self, (repo, tag): (&str, &str)) -> Image {
        self.set.image(repo, tag).expect("fixture").clone()
    }

    /// The image's reference through the proxy.
    fn reference(&self, img: &Image) -> String {
        format!("{}/{}:{}", self.proxy.host(), img.repo, img.tag)
    }

    /// Blobs only this image has: its config and its `app` and `config` layers.
    fn own_blobs(img: &Image) -> Vec<String> {
        let mut v = vec![img.config_digest.clone()];
        v.extend(
            img.layers
                .iter()
                .filter(|l| l.role == "app" || l.role == "config")
                .map(|l| l.digest.clone()),
        );
        v
    }

    /// Removes every record of `imgs` (waiting for GC) and then `blobs` and their ingests, so
    /// a pull has to fetch them.
    async fn make_missing(&self, imgs: &[&Image], blobs: &[String]) {
        let records = self.c.list_images().await.expect("list");
        for img in imgs {
            for r in records
                .iter()
                .filter(|r| r.target.digest == img.manifest_digest)
            {
                let _ = self
                    .node
                    .ctr("k8s.io")
                    .args(["images", "rm", "--sync", &r.name])
                    .output();
            }
        }
        let mut all: Vec<String> = blobs.to_vec();
        all.extend(imgs.iter().map(|i| i.manifest_digest.clone()));
        for d in &all {
            self.c
                .abort_ingest(&format!("ragent-{d}"))
                .await
                .expect("Content.Abort");
        }
        let _ = self
            .node
            .ctr("k8s.io")
            .args(["content", "rm"])
            .args(&all)
            .output();
        for d in &all {
            assert_eq!(
                content_size_opt(&self.node, d).await,
                None,
                "{d} is still in the store"
            );
        }
    }

    fn prepull(&self, extra: &[&str], reference: &str) -> std::process::Output {
        let host = self.proxy.host();
        let mut args = vec![
            "prepull",
            "--insecure-registry",
            &host,
            "--registry-timeout",
            TIMEOUT,
        ];
        args.extend(extra);
        args.push(reference);
        ragent(&self.node, &args)
    }

    /// The failed run left nothing behind: no record, no lease of ragent's, none of `blobs`.
    async fn assert_clean(&self, img: &Image, blobs: &[String]) {
        let name = self.reference(img);
        let records = self.c.list_images().await.expect("list");
        assert!(
            !records
                .iter()
                .any(|r| r.name == name || r.target.digest == img.manifest_digest),
            "an image record of {name} exists after the failed pull"
        );
        assert_eq!(
            self.new_leases(),
            Vec::<String>::new(),
            "leases left behind"
        );
        for d in blobs {
            assert_eq!(
                content_size_opt(&self.node, d).await,
                None,
                "{d} was committed by the failed pull"
            );
        }
    }

    /// ragent's leases that appeared during this test.
    fn new_leases(&self) -> Vec<String> {
        ragent_leases(&self.node)
            .into_iter()
            .filter(|l| !self.leases_before.contains(l))
            .collect()
    }

    /// Puts the store back as later tests expect it: `imgs` recorded under their usual names
    /// (a healthy pre-pull straight from the registry), and no record through the proxy.
    fn restore(&self, imgs: &[&Image]) {
        let reg = self.node.registry();
        let refs: Vec<String> = imgs
            .iter()
            .map(|i| self.set.reference(&i.repo, &i.tag))
            .collect();
        let mut args = vec!["prepull", "--insecure-registry", &reg];
        args.extend(refs.iter().map(String::as_str));
        let out = ragent(&self.node, &args);
        assert!(
            out.status.success(),
            "restoring {refs:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for img in imgs {
            let _ = self
                .node
                .ctr("k8s.io")
                .args(["images", "rm", &self.reference(img)])
                .output();
        }
    }
}

/// The config and layer digests of an image.
fn all_blobs(img: &Image) -> Vec<&String> {
    let mut v = vec![&img.config_digest];
    v.extend(img.layers.iter().map(|l| &l.digest));
    v
}

/// Runs containerd's garbage collection now (deleting a lease with --sync does).
fn force_gc(node: &Node) {
    let id = "ragent-e2e-force-gc";
    let _ = node
        .ctr("k8s.io")
        .args(["leases", "create", "--id", id])
        .output();
    let out = node
        .ctr("k8s.io")
        .args(["leases", "rm", "--sync", id])
        .output()
        .expect("ctr leases rm --sync");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The leases that keep failed runs' partial downloads.
fn resume_leases(node: &Node) -> Vec<String> {
    let out = node
        .ctr("k8s.io")
        .args(["leases", "ls", "-q"])
        .output()
        .expect("ctr leases ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ragent-resume-"))
        .map(str::to_string)
        .collect()
}

/// The leases ragent's pre-pulls hold.
fn ragent_leases(node: &Node) -> Vec<String> {
    let out = node
        .ctr("k8s.io")
        .args(["leases", "ls", "-q"])
        .output()
        .expect("ctr leases ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ragent-prepull"))
        .map(str::to_string)
        .collect()
}

/// Exit code 1 and exactly one line on stderr, starting `ragent: ` and containing `want`.
fn assert_error(out: &std::process::Output, want: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ragent: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    for w in want {
        assert!(lines[0].contains(w), "{w:?} not in {:?}", lines[0]);
    }
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_wrong_blob_bytes_are_refused_and_nothing_is_committed() {
    let t = Case::new(Fault::CorruptBlobs).await;
    let img = t.image(IMAGE);
    let own = Case::own_blobs(&img);
    t.make_missing(&[&img], &own).await;
    let out = t.prepull(&[], &t.reference(&img));
    let line = assert_error(
        &out,
        &[
            "the registry sent bytes for sha256:",
            "that hash to sha256:",
            "nothing was committed",
        ],
    );
    t.assert_clean(&img, &own).await;
    // The blob found wrong keeps no ingest to be resumed from. (Blobs cut off while their
    // bytes were still unverified may keep theirs: the rerun below must cope with those.)
    let named: Vec<&String> = all_blobs(&img)
        .into_iter()
        .filter(|d| line.contains(d.as_str()))
        .collect();
    assert_eq!(named.len(), 1, "{line}");
    assert_eq!(
        t.c.ingest_offset(&format!("ragent-{}", named[0]))
            .await
            .expect("status"),
        0,
        "the wrong bytes of {} were kept",
        named[0]
    );
    // A healthy registry then gives the image, fetching each blob in full.
    t.proxy.set_fault(Fault::None);
    let out = t.prepull(&[], &t.reference(&img));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in &own {
        assert!(content_size_opt(&t.node, d).await.is_some(), "{d} missing");
    }
    t.restore(&[&img]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_truncated_blob_fails_clearly_and_the_rerun_fetches_only_the_rest() {
    const CUT: u64 = 100_000;
    let t = Case::new(Fault::TruncateBlobs { after: CUT }).await;
    let img = t.image(IMAGE);
    let own = Case::own_blobs(&img);
    t.make_missing(&[&img], &own).await;
    let resume_before = resume_leases(&t.node);
    let out = t.prepull(&[], &t.reference(&img));
    let line = assert_error(
        &out,
        &[
            "the connection to the registry broke after ",
            "run the same prepull again to resume where it stopped",
        ],
    );
    // Blobs smaller than the cut arrived whole and may be committed (GC takes them with no
    // record); none that was cut is.
    let cut: Vec<String> = img
        .layers
        .iter()
        .filter(|l| l.size > CUT && own.contains(&l.digest))
        .map(|l| l.digest.clone())
        .collect();
    assert!(!cut.is_empty());
    t.assert_clean(&img, &cut).await;
    // Every layer cut short keeps what reached ragent in its ingest, for the rerun; the one
    // the error names says how much.
    let mut kept = Vec::new();
    for l in img.layers.iter().filter(|l| l.size > CUT) {
        let offset =
            t.c.ingest_offset(&format!("ragent-{}", l.digest))
                .await
                .expect("status");
        if offset > 0 {
            assert!(
                offset <= CUT,
                "{}: {offset} bytes kept of {CUT} sent",
                l.name
            );
            if line.contains(l.digest.as_str()) {
                assert!(
                    line.contains(&format!(
                        "after {offset} of {} bytes of {}",
                        l.size, l.digest
                    )),
                    "{line}"
                );
            }
            kept.push((l.clone(), offset));
        }
    }
    assert!(!kept.is_empty(), "no partial ingest kept");
    // They are held by a resume lease (the run's own lease is gone), so GC leaves them.
    let resume: Vec<String> = resume_leases(&t.node)
        .into_iter()
        .filter(|l| !resume_before.contains(l))
        .collect();
    assert_eq!(resume.len(), 1, "{resume:?}");
    force_gc(&t.node);
    for (l, offset) in &kept {
        assert_eq!(
            t.c.ingest_offset(&format!("ragent-{}", l.digest))
                .await
                .expect("status"),
            *offset,
            "{}: GC took the partial download",
            l.name
        );
    }
    t.proxy.set_fault(Fault::None);
    t.proxy.reset();
    let out = t.prepull(&[], &t.reference(&img));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        resume_leases(&t.node),
        Vec::<String>::new(),
        "the successful run drops the resume lease"
    );
    let seen = t.proxy.seen();
    for (l, offset) in &kept {
        assert_eq!(
            t.proxy.bytes_for(&l.digest),
            l.size - offset,
            "{}: only the rest crosses the wire",
            l.name
        );
        assert!(
            seen.iter().any(|s| s.path.contains(&l.digest)
                && s.range.as_deref() == Some(&format!("bytes={offset}-")[..])),
            "no Range request for the rest of {}: {seen:?}",
            l.name
        );
        assert_eq!(content_size_opt(&t.node, &l.digest).await, Some(l.size));
    }
    assert_complete(&t.node, &t.c, &img, &t.reference(&img)).await;
    t.restore(&[&img]);
}

/// Answers each status on `on` (manifests or blobs) and checks the error line has `want` and
/// names what was refused (`named`), and that the store is left clean.
async fn statuses_say_what_to_do(
    on: Target,
    cases: &[(u16, &[&str])],
    named: impl Fn(&str, &str, &[String]) -> bool,
) {
    let t = Case::new(Fault::None).await;
    let img = t.image(IMAGE);
    let own = Case::own_blobs(&img);
    t.make_missing(&[&img], &own).await;
    let r = t.reference(&img);
    for (status, want) in cases {
        t.proxy.set_fault(Fault::Status {
            on,
            status: *status,
        });
        let out = t.prepull(&[], &r);
        let line = assert_error(&out, want);
        assert!(named(&line, &r, &own), "{status}: {line}");
        t.assert_clean(&img, &own).await;
    }
    t.proxy.set_fault(Fault::None);
    t.restore(&[&img]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_manifest_status_codes_say_what_to_do() {
    statuses_say_what_to_do(
        Target::Manifests,
        &[
            (
                401,
                &[
                    "needs credentials to pull",
                    "(401 Unauthorized on",
                    "pass --auth",
                ],
            ),
            (403, &["the registry denied", "(403 Forbidden)"]),
            (404, &["not found in the registry", "check the repository"]),
            (
                429,
                &[
                    "the registry is rate limiting (429)",
                    "retry later or lower --concurrency",
                ],
            ),
            (500, &["the registry failed (500", "retry later"]),
            (503, &["the registry failed (503", "retry later"]),
        ],
        // The reference is named.
        |line, r, _| line.contains(r),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_blob_status_codes_say_what_to_do() {
    statuses_say_what_to_do(
        Target::Blobs,
        &[
            (401, &["needs credentials to pull", "(401 Unauthorized on"]),
            (403, &["the registry denied", "(403 Forbidden)"]),
            (404, &["not found in the registry"]),
            (
                429,
                &["rate limiting (429)", "retry later or lower --concurrency"],
            ),
            (500, &["the registry failed (500"]),
            (503, &["the registry failed (503"]),
        ],
        // The blob is named, so the user knows what was refused.
        |line, _, own| own.iter().any(|d| line.contains(d.as_str())),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_bad_manifests_are_refused() {
    let t = Case::new(Fault::None).await;
    let img = t.image(IMAGE);
    let own = Case::own_blobs(&img);
    t.make_missing(&[&img], &own).await;
    let r = t.reference(&img);
    let cases: Vec<(Fault, Vec<&str>)> = vec![
        (
            Fault::HugeManifest { size: 17 << 20 },
            vec!["manifest", "is 17825792 bytes, more than the 16777216"],
        ),
        (
            Fault::MalformedManifest,
            vec!["is not valid JSON", "skopeo inspect --raw"],
        ),
        (
            Fault::UnknownMediaType,
            vec![
                "application/vnd.example.unknown.v9+json",
                "neither an image manifest nor an index",
            ],
        ),
    ];
    for (fault, want) in cases {
        t.proxy.set_fault(fault.clone());
        let out = t.prepull(&[], &r);
        let line = assert_error(&out, &want);
        assert!(line.contains(&r), "{fault:?}: {line}");
        t.assert_clean(&img, &own).await;
        // Nothing was fetched for an image ragent refused.
        assert_eq!(t.proxy.blob_bytes(), 0, "{fault:?}");
    }
    t.proxy.set_fault(Fault::None);
    t.restore(&[&img]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_silent_registry_times_out() {
    let t = Case::new(Fault::Hang {
        on: Target::Manifests,
    })
    .await;
    let img = t.image(IMAGE);
    let own = Case::own_blobs(&img);
    t.make_missing(&[&img], &own).await;
    let r = t.reference(&img);
    for on in [Target::Manifests, Target::Blobs] {
        t.proxy.set_fault(Fault::Hang { on });
        let start = Instant::now();
        let out = t.prepull(&[], &r);
        let took = start.elapsed();
        assert_error(
            &out,
            &[
                "the registry did not answer ",
                "within 3 s",
                "--registry-timeout",
            ],
        );
        assert!(took < Duration::from_secs(20), "{on:?}: took {took:?}");
        t.assert_clean(&img, &own).await;
    }
    t.proxy.set_fault(Fault::None);
    t.restore(&[&img]);
}

/// Spawns `ragent prepull` in the background.
fn spawn_prepull(node: &Node, host: &str, reference: &str) -> std::process::Child {
    Command::new(ragent_bin())
        .env("RAGENT_CONTAINERD", node.socket())
        .args(["prepull", "--insecure-registry", host, reference])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ragent prepull")
}

/// The JVM batch app and the blob its pull spends most time on (the 4 MiB JRE layer, shared
/// only with the JVM API app, whose records are removed too).
struct Jvm {
    batch: Image,
    api: Image,
    jre: ragent_testkit::fixtures::Layer,
}

fn jvm(t: &Case) -> Jvm {
    let batch = t.image(("ragent/app-jvm-batch", "v1"));
    let api = t.image(("ragent/app-jvm-api", "v1"));
    let jre = batch
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .expect("layers")
        .clone();
    for other in t.set.images.iter().filter(|i| {
        i.manifest_digest != batch.manifest_digest && i.manifest_digest != api.manifest_digest
    }) {
        assert!(
            !other.layers.iter().any(|l| l.digest == jre.digest),
            "{} shares the biggest layer {}",
            other.repo,
            jre.name
        );
    }
    Jvm { batch, api, jre }
}

/// Polls the image records while a pull runs: whenever `name` exists, every blob of `img`
/// must be in the store.
struct Watcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u32, bool, Vec<String>)>,
}

impl Watcher {
    /// (checks made, whether the record was seen, blobs found missing under a record)
    async fn stop(self) -> (u32, bool, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("watcher")
    }
}

async fn watch_record(node: &Node, name: &str, img: &Image) -> Watcher {
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut blobs = vec![img.manifest_digest.clone(), img.config_digest.clone()];
    blobs.extend(img.layers.iter().map(|l| l.digest.clone()));
    let (name, flag) = (name.to_string(), stop.clone());
    let task = tokio::spawn(async move {
        let (mut checks, mut seen, mut broken) = (0, false, Vec::new());
        // One last check after the stop, so a record made at the very end is seen too.
        loop {
            let last = flag.load(std::sync::atomic::Ordering::SeqCst);
            if let Ok(records) = c.list_images().await
                && records.iter().any(|r| r.name == name)
            {
                seen = true;
                for d in &blobs {
                    if c.content_size(d).await.ok().flatten().is_none() {
                        broken.push(d.clone());
                    }
                }
            }
            checks += 1;
            if last {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (checks, seen, broken)
    });
    Watcher { stop, task }
}

/// Waits until containerd's ingest of `digest` holds `n` bytes (or panics after 60 s).
async fn wait_ingest(c: &Containerd, digest: &str, n: u64) {
    let start = Instant::now();
    let ingest = format!("ragent-{digest}");
    while c.ingest_offset(&ingest).await.unwrap_or(0) < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "containerd's ingest of {digest} did not reach {n} bytes within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The image is complete: every blob in the store with its size, the top snapshot unpacked.
async fn assert_complete(node: &Node, c: &Containerd, img: &Image, name: &str) {
    let records = c.list_images().await.expect("list");
    let r = records
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no record {name}"));
    assert_eq!(r.target.digest, img.manifest_digest);
    for l in &img.layers {
        assert_eq!(
            content_size_opt(node, &l.digest).await,
            Some(l.size),
            "{}",
            l.name
        );
    }
    assert!(content_size_opt(node, &img.config_digest).await.is_some());
    assert!(image_unpacked(node, img), "{name} is not unpacked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_sigkill_mid_pull_then_rerun_fetches_only_what_is_missing() {
    let t = Case::new(Fault::Throttle {
        bytes_per_sec: 1 << 20,
    })
    .await;
    let j = jvm(&t);
    let mut blobs = Case::own_blobs(&j.batch);
    blobs.extend(Case::own_blobs(&j.api));
    blobs.push(j.jre.digest.clone());
    t.make_missing(&[&j.batch, &j.api], &blobs).await;
    let r = t.reference(&j.batch);

    let mut child = spawn_prepull(&t.node, &t.proxy.host(), &r);
    // Until containerd holds part of the layer (the first 1 MiB write message).
    wait_ingest(&t.c, &j.jre.digest, 1 << 20).await;
    assert!(
        t.proxy.bytes_for(&j.jre.digest) < j.jre.size,
        "the layer went through already"
    );
    // No record may exist while the layer is incomplete.
    let records = t.c.list_images().await.expect("list");
    assert!(!records.iter().any(|x| x.name == r));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let records = t.c.list_images().await.expect("list");
    assert!(
        !records
            .iter()
            .any(|x| x.name == r || x.target.digest == j.batch.manifest_digest),
        "an image record exists after the kill"
    );
    assert_eq!(content_size_opt(&t.node, &j.jre.digest).await, None);
    let kept =
        t.c.ingest_offset(&format!("ragent-{}", j.jre.digest))
            .await
            .expect("status");
    assert!(
        kept >= 1 << 20 && kept < j.jre.size,
        "containerd keeps the partial ingest: {kept} of {}",
        j.jre.size
    );

    // Run again on a healthy link: only the rest of the layer crosses the wire; meanwhile a
    // watcher checks that whenever the record exists, everything it points at does too.
    t.proxy.set_fault(Fault::None);
    t.proxy.reset();
    let watcher = watch_record(&t.node, &r, &j.batch).await;
    let out = t.prepull(&["--json"], &r);
    let (checks, seen_record, broken) = watcher.stop().await;
    assert!(
        broken.is_empty(),
        "the record pointed at missing content: {broken:?}"
    );
    assert!(
        seen_record && checks > 1,
        "{checks} checks, record seen: {seen_record}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        t.proxy.bytes_for(&j.jre.digest),
        j.jre.size - kept,
        "the rerun fetches only the missing bytes of {}",
        j.jre.name
    );
    assert!(
        t.proxy.seen().iter().any(|s| s.path.contains(&j.jre.digest)
            && s.range.as_deref() == Some(&format!("bytes={kept}-")[..])),
        "{:?}",
        t.proxy.seen()
    );
    assert_complete(&t.node, &t.c, &j.batch, &r).await;
    // The killed run's lease stays until it expires (an hour); the rerun's is gone.
    let left = t.new_leases();
    assert!(left.len() <= 1, "{left:?}");
    for l in left {
        let _ = t.node.ctr("k8s.io").args(["leases", "rm", &l]).output();
    }
    t.restore(&[&j.batch, &j.api]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_containerd_restart_mid_pull_then_rerun_completes() {
    let mut t = Case::new(Fault::Throttle {
        bytes_per_sec: 1 << 20,
    })
    .await;
    let j = jvm(&t);
    let mut blobs = Case::own_blobs(&j.batch);
    blobs.extend(Case::own_blobs(&j.api));
    blobs.push(j.jre.digest.clone());
    t.make_missing(&[&j.batch, &j.api], &blobs).await;
    let r = t.reference(&j.batch);

    let child = spawn_prepull(&t.node, &t.proxy.host(), &r);
    wait_ingest(&t.c, &j.jre.digest, 1 << 20).await;
    t.node.restart_containerd().expect("restarting containerd");
    let out = child.wait_with_output().expect("ragent exits");
    eprintln!(
        "ragent during the restart: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let c = Containerd::connect(&t.node.socket(), "k8s.io")
        .await
        .expect("reconnect");
    if out.status.success() {
        // ragent survived the restart: the image must be complete.
        assert_complete(&t.node, &c, &j.batch, &r).await;
    } else {
        assert_error(&out, &["containerd", "run the same prepull again"]);
        let records = c.list_images().await.expect("list");
        assert!(
            !records
                .iter()
                .any(|x| x.name == r || x.target.digest == j.batch.manifest_digest),
            "an image record exists after the failed pull"
        );
        t.proxy.set_fault(Fault::None);
        t.proxy.reset();
        let out = t.prepull(&[], &r);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            t.proxy.bytes_for(&j.jre.digest) <= j.jre.size,
            "the layer crossed the wire at most once more"
        );
        assert_complete(&t.node, &c, &j.batch, &r).await;
    }
    // A run that lost containerd may leave its lease (it could not delete it): it expires.
    for l in t.new_leases() {
        let _ = t.node.ctr("k8s.io").args(["leases", "rm", &l]).output();
    }
    t.c = c;
    t.restore(&[&j.batch, &j.api]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_disk_full_fails_clearly_and_commits_nothing_partial() {
    if !is_root() {
        eprintln!("skipping: a tmpfs for containerd's root needs root (mount(2))");
        return;
    }
    let node = node();
    let set = fixtures(&node);
    // ~10 MB of blobs into a 6 MiB content store.
    let img = set.image("ragent/app-jvm-batch", "v1").expect("fixture");
    let small = TmpfsContainerd::start(&node.dir().join("df"), 6).expect("tmpfs containerd");
    let reg = node.registry();
    let reference = set.reference(&img.repo, &img.tag);
    let out = Command::new(ragent_bin())
        .env("RAGENT_CONTAINERD", small.socket())
        .args(["prepull", "--insecure-registry", &reg, &reference])
        .output()
        .expect("ragent");
    assert_error(
        &out,
        &[
            "containerd's disk is full",
            "no space left on device",
            "free space where containerd keeps its content",
        ],
    );
    let c = Containerd::connect(&small.socket(), "k8s.io")
        .await
        .expect("connect");
    assert!(
        c.list_images().await.expect("list").is_empty(),
        "an image record exists after the failed pull"
    );
    let leases = small
        .ctr("k8s.io")
        .args(["leases", "ls", "-q"])
        .output()
        .expect("ctr");
    let leases = String::from_utf8_lossy(&leases.stdout).to_string();
    assert!(!leases.contains("ragent-prepull"), "{leases}");
    // Whatever was committed is whole (containerd checked it); nothing partial counts as content.
    for l in &img.layers {
        if let Some(size) = c.content_size(&l.digest).await.expect("info") {
            assert_eq!(size, l.size, "{}", l.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_partial_download_with_wrong_bytes_is_fetched_again_whole() {
    let t = Case::new(Fault::None).await;
    let img = t.image(IMAGE);
    let own = Case::own_blobs(&img);
    t.make_missing(&[&img], &own).await;
    let app = img
        .layers
        .iter()
        .find(|l| l.role == "app")
        .expect("app layer")
        .clone();
    // An earlier download, cut off before its bytes could be checked, got wrong bytes.
    let lease =
        t.c.create_lease("ragent-e2e-bad-partial", Duration::from_secs(600))
            .await
            .expect("lease");
    let desc = ragent::core::oci::Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: app.digest.clone(),
        size: app.size,
        platform: None,
        annotations: Default::default(),
    };
    const WRONG: u64 = 64 << 10;
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(vec![0x5a; WRONG as usize]),
        Err(std::io::Error::other("cut off")),
    ];
    let ingest = format!("ragent-{}", app.digest);
    t.c.write_blob(
        &lease,
        &ingest,
        &desc,
        std::collections::HashMap::new(),
        |_| futures::stream::iter(pieces),
    )
    .await
    .expect_err("the source was cut off");
    assert_eq!(t.c.ingest_offset(&ingest).await.expect("status"), WRONG);

    // The next run resumes, containerd refuses the result, ragent fetches the layer whole.
    let out = t.prepull(&[], &t.reference(&img));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<_> = t
        .proxy
        .seen()
        .into_iter()
        .filter(|s| s.path.contains(&app.digest))
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0].range.as_deref(),
        Some(&format!("bytes={WRONG}-")[..])
    );
    assert_eq!(seen[1].range, None);
    assert_eq!(
        t.proxy.bytes_for(&app.digest),
        (app.size - WRONG) + app.size
    );
    assert_eq!(content_size_opt(&t.node, &app.digest).await, Some(app.size));
    assert_complete(&t.node, &t.c, &img, &t.reference(&img)).await;
    t.c.delete_lease(&lease, false).await.expect("drop lease");
    t.restore(&[&img]);
}
