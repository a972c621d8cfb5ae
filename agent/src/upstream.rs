//! Upstream fetches for layer sharing (issue 8): the one place a blob crosses the registry
//! link. However many requesters ask for a digest at once (this node's containerd, its
//! pre-pull, other agents), one fetch runs; its bytes go to a spool file as they arrive and
//! every requester streams from that file, from its own offset, while the fetch goes on.
//!
//! - The digest is checked as the bytes arrive; the last byte is held back until it matches,
//!   so a requester never receives a whole body with a wrong digest (a wrong one is cut short,
//!   and the requester's own check fails).
//! - When the fetch is complete, the blob is written into containerd under a lease that
//!   expires after `[sharing] keep_s` ([`Keeper`]), so later requests are served from the
//!   store; the spool file goes when its last reader is done.
//! - A failed fetch ends every waiter's stream with the error and is forgotten: the next
//!   request starts a new one.
use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::{StreamExt, stream::BoxStream};
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        containerd::ContainerdError,
        registry::{Registry, RegistryError},
    },
    core::{
        credentials::{Credential, Credentials},
        oci::Descriptor,
        sharing::{UpstreamCheck, basic_credentials, check_key, digest_hasher},
    },
};

/// Everything an upstream fetch can fail with (cloned to every waiter).
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the registry refused or failed {what}: {reason}")]
    Registry { what: String, reason: String },
    #[error("{what}: the registry did not say how long the blob is")]
    NoLength { what: String },
    #[error("{what}: the registry sent {got} bytes where it announced {announced}")]
    Length {
        what: String,
        got: u64,
        announced: u64,
    },
    #[error("{what}: the bytes hash to {actual}; the registry sent the wrong blob")]
    Digest { what: String, actual: String },
    #[error("the spool file {path}: {reason}; check [sharing] spool_dir (free space, writable)")]
    Spool { path: PathBuf, reason: String },
    #[error("digest {digest} uses an algorithm ragent cannot check")]
    Algorithm { digest: String },
}

impl UpstreamError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            UpstreamError::Registry { .. } => "registry",
            UpstreamError::NoLength { .. } | UpstreamError::Length { .. } => "length",
            UpstreamError::Digest { .. } => "digest",
            UpstreamError::Spool { .. } => "spool",
            UpstreamError::Algorithm { .. } => "algorithm",
        }
    }
}

/// A blob's bytes from offset 0, with its length.
pub type Opened = (u64, BoxStream<'static, io::Result<Vec<u8>>>);

/// Where blobs come from upstream: the registry, or a fake in tests.
pub trait Origin: Send + Sync + 'static {
    /// `auth`: the `Authorization: Basic` of a pull whose credentials were checked for this
    /// repository (private content), else None (the origin's own credentials).
    fn open(
        &self,
        registry: &str,
        repository: &str,
        digest: &str,
        auth: Option<&str>,
    ) -> impl Future<Output = Result<Opened, UpstreamError>> + Send;
}

impl Origin for Registry {
    async fn open(
        &self,
        registry: &str,
        repository: &str,
        digest: &str,
        auth: Option<&str>,
    ) -> Result<Opened, UpstreamError> {
        let reference = format!("{registry}/{repository}@{digest}");
        let fail = |e: RegistryError| UpstreamError::Registry {
            what: reference.clone(),
            reason: e.to_string(),
        };
        let (len, stream) = match auth.and_then(basic_credentials) {
            Some((username, password)) => {
                as_user(self, registry, username, password)
                    .sized_blob(&reference, digest, 0, 0)
                    .await
            }
            None => self.sized_blob(&reference, digest, 0, 0).await,
        }
        .map_err(fail)?;
        let Some(len) = len else {
            return Err(UpstreamError::NoLength {
                what: reference.clone(),
            });
        };
        Ok((len, stream.boxed()))
    }
}

/// `base` presenting a user and password to `host` (and nothing to any other registry).
fn as_user(base: &Registry, host: &str, username: String, password: String) -> Registry {
    let mut creds = Credentials::anonymous();
    creds.insert(host, Credential::Basic { username, password });
    base.with_credentials(creds)
}

/// Keeps a fetched blob where later requests find it (containerd's content store).
pub trait Keeper: Send + Sync + 'static {
    fn keep(
        &self,
        registry: &str,
        repository: &str,
        desc: &Descriptor,
        file: &Path,
    ) -> impl Future<Output = Result<(), ContainerdError>> + Send;
}

#[derive(Debug, Clone)]
enum Progress {
    Opening,
    Streaming { size: u64, written: u64 },
    Done { size: u64 },
    Failed(UpstreamError),
}

/// One fetch in progress (or just finished).
pub struct Flight {
    path: PathBuf,
    state: watch::Sender<Progress>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Readers hold the flight while they read, so this runs after the last one.
        let _ = std::fs::remove_file(&self.path);
    }
}

const READ_CHUNK: u64 = 256 * 1024;

/// One requester's position in a flight's spool file.
struct Reader {
    flight: Arc<Flight>,
    rx: watch::Receiver<Progress>,
    file: Option<tokio::fs::File>,
    pos: u64,
    end: Option<u64>,
}

impl Flight {
    /// The blob's length, once the registry announced it.
    pub async fn size(&self) -> Result<u64, UpstreamError> {
        let mut rx = self.state.subscribe();
        let p = rx
            .wait_for(|p| !matches!(p, Progress::Opening))
            .await
            .map(|p| p.clone())
            .unwrap_or(Progress::Failed(UpstreamError::Spool {
                path: self.path.clone(),
                reason: "the fetch went away".into(),
            }));
        match p {
            Progress::Streaming { size, .. } | Progress::Done { size } => Ok(size),
            Progress::Failed(e) => Err(e),
            Progress::Opening => Err(UpstreamError::Spool {
                path: self.path.clone(),
                reason: "the fetch never started".into(),
            }),
        }
    }

    /// `len` bytes from `offset` (`len` 0: to the end), as they arrive. Holding the returned
    /// stream keeps the spool file.
    pub fn read(
        self: &Arc<Flight>,
        offset: u64,
        len: u64,
    ) -> BoxStream<'static, io::Result<Vec<u8>>> {
        let rx = self.state.subscribe();
        let start = Reader {
            flight: self.clone(),
            rx,
            file: None,
            pos: offset,
            end: (len > 0).then(|| offset.saturating_add(len)),
        };
        futures::stream::unfold(start, |mut r| async move {
            loop {
                let p = r.rx.borrow_and_update().clone();
                let (size, readable) = match p {
                    Progress::Opening => (None, 0),
                    // The last byte waits for the digest check.
                    Progress::Streaming { size, written } => {
                        (Some(size), written.min(size.saturating_sub(1)))
                    }
                    Progress::Done { size } => (Some(size), size),
                    Progress::Failed(e) => return Some((Err(io::Error::other(e)), r)),
                };
                if let Some(size) = size {
                    let end = r.end.unwrap_or(size).min(size);
                    if r.pos >= end {
                        return None;
                    }
                    if readable > r.pos {
                        let want = (readable.min(end) - r.pos).min(READ_CHUNK);
                        return match read_at(&mut r, want).await {
                            Ok(buf) => {
                                r.pos += buf.len() as u64;
                                Some((Ok(buf), r))
                            }
                            Err(e) => Some((Err(e), r)),
                        };
                    }
                }
                if r.rx.changed().await.is_err() {
                    return Some((Err(io::Error::other("the upstream fetch went away")), r));
                }
            }
        })
        .take_while({
            // An error ends the stream after it is yielded.
            let mut failed = false;
            move |item| {
                let go = !failed;
                failed |= item.is_err();
                futures::future::ready(go)
            }
        })
        .boxed()
    }
}

/// Reads `want` bytes at the reader's position (opening the spool file on first use).
async fn read_at(r: &mut Reader, want: u64) -> io::Result<Vec<u8>> {
    if r.file.is_none() {
        r.file = Some(tokio::fs::File::open(&r.flight.path).await?);
    }
    let f = r.file.as_mut().expect("opened above");
    f.seek(io::SeekFrom::Start(r.pos)).await?;
    let mut buf = vec![0u8; usize::try_from(want).unwrap_or(usize::MAX)];
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    if got == 0 {
        return Err(io::Error::other("the spool file is shorter than reported"));
    }
    Ok(buf)
}

/// The fetches in progress on this node, one per digest.
pub struct Flights<O: Origin, K: Keeper> {
    dir: PathBuf,
    origin: O,
    keeper: K,
    active: Mutex<HashMap<String, Arc<Flight>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<O: Origin, K: Keeper> Flights<O, K> {
    /// Fetches spool under `dir` (created when missing; leftovers of a previous run removed).
    pub fn new(dir: &Path, origin: O, keeper: K) -> Result<Arc<Self>, UpstreamError> {
        let spool = |e: io::Error| UpstreamError::Spool {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(spool)?;
        for entry in std::fs::read_dir(dir).map_err(spool)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Arc::new(Flights {
            dir: dir.to_path_buf(),
            origin,
            keeper,
            active: Mutex::new(HashMap::new()),
        }))
    }

    /// Fetches in progress (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        lock(&self.active).len()
    }

    /// The fetch of `digest`: the one in progress, or a new one (`true`: this call started it,
    /// so its bytes cross the registry link on this call's account).
    pub fn join(
        self: &Arc<Self>,
        registry: &str,
        repository: &str,
        digest: &str,
        auth: Option<&str>,
    ) -> Result<(Arc<Flight>, bool), UpstreamError> {
        if digest_hasher(digest).is_none() {
            return Err(UpstreamError::Algorithm {
                digest: digest.into(),
            });
        }
        let mut active = lock(&self.active);
        if let Some(f) = active.get(digest) {
            return Ok((f.clone(), false));
        }
        let name = format!(
            "{}.{}.part",
            digest.replace(':', "-"),
            crate::prepull::nonce()
        );
        let (state, _) = watch::channel(Progress::Opening);
        let flight = Arc::new(Flight {
            path: self.dir.join(name),
            state,
        });
        active.insert(digest.to_string(), flight.clone());
        drop(active);
        let me = self.clone();
        let (registry, repository, digest) = (
            registry.to_string(),
            repository.to_string(),
            digest.to_string(),
        );
        let auth = auth.map(str::to_string);
        let f = flight.clone();
        tokio::spawn(async move {
            let outcome = me
                .fetch(&f, &registry, &repository, &digest, auth.as_deref())
                .await;
            match outcome {
                Ok(size) => {
                    let desc = Descriptor {
                        media_type: String::new(),
                        digest: digest.clone(),
                        size,
                        platform: None,
                        annotations: Default::default(),
                    };
                    if let Err(e) = me.keeper.keep(&registry, &repository, &desc, &f.path).await {
                        warn!(%digest, error = %e, "cannot keep a blob fetched for peers in containerd");
                    }
                }
                Err(e) => {
                    warn!(%digest, error = %e, reason = e.metric_label(), "upstream fetch failed");
                    f.state.send_replace(Progress::Failed(e));
                }
            }
            lock(&me.active).remove(&digest);
        });
        Ok((flight, true))
    }

    async fn fetch(
        &self,
        f: &Flight,
        registry: &str,
        repository: &str,
        digest: &str,
        auth: Option<&str>,
    ) -> Result<u64, UpstreamError> {
        let what = format!("{registry}/{repository}@{digest}");
        let (size, mut stream) = self.origin.open(registry, repository, digest, auth).await?;
        let spool = |e: io::Error| UpstreamError::Spool {
            path: f.path.clone(),
            reason: e.to_string(),
        };
        let mut file = tokio::fs::File::create(&f.path).await.map_err(spool)?;
        f.state
            .send_replace(Progress::Streaming { size, written: 0 });
        debug!(%what, size, "fetching upstream for sharing");
        let mut hasher = digest_hasher(digest).ok_or_else(|| UpstreamError::Algorithm {
            digest: digest.into(),
        })?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| UpstreamError::Registry {
                what: what.clone(),
                reason: e.to_string(),
            })?;
            written += chunk.len() as u64;
            if written > size {
                return Err(UpstreamError::Length {
                    what,
                    got: written,
                    announced: size,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(spool)?;
            // tokio's File hands writes to a blocking thread: only after the flush are the
            // bytes in the file for the readers `written` lets in.
            file.flush().await.map_err(spool)?;
            f.state.send_replace(Progress::Streaming { size, written });
        }
        if written != size {
            return Err(UpstreamError::Length {
                what,
                got: written,
                announced: size,
            });
        }
        let actual = hasher.finish();
        if actual != digest {
            return Err(UpstreamError::Digest { what, actual });
        }
        file.flush().await.map_err(spool)?;
        f.state.send_replace(Progress::Done { size });
        info!(%what, size, "fetched upstream for sharing");
        Ok(size)
    }
}

/// A spool file's bytes from `offset` on, in chunks (for writing a fetched blob into
/// containerd).
pub fn file_stream(path: &Path, offset: u64) -> BoxStream<'static, io::Result<Vec<u8>>> {
    let path = path.to_path_buf();
    futures::stream::unfold(
        (None::<tokio::fs::File>, path, offset, false),
        |(file, path, offset, done)| async move {
            if done {
                return None;
            }
            let mut f = match file {
                Some(f) => f,
                None => match open_at(&path, offset).await {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e), (None, path, offset, true))),
                },
            };
            let mut buf = vec![0u8; READ_CHUNK as usize];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), (Some(f), path, offset + n as u64, false)))
                }
                Err(e) => Some((Err(e), (None, path, offset, true))),
            }
        },
    )
    .boxed()
}

async fn open_at(path: &Path, offset: u64) -> io::Result<tokio::fs::File> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(io::SeekFrom::Start(offset)).await?;
    Ok(f)
}

/// A [`Keeper`] that keeps nothing (serving from the spool file only while the fetch runs).
pub struct Discard;

impl Keeper for Discard {
    async fn keep(
        &self,
        _registry: &str,
        _repository: &str,
        _desc: &Descriptor,
        _file: &Path,
    ) -> Result<(), ContainerdError> {
        Ok(())
    }
}

/// Checks the credentials a pull presents against the registry itself, before the mirror
/// serves private content with them: allowed only when the registry lets them pull that blob.
/// Results are kept [`CHECK_TTL`] under a hash of credentials, registry and repository; the
/// credentials themselves are neither logged nor kept.
pub struct AccessChecker {
    registry: Arc<Registry>,
    cache: Mutex<HashMap<[u8; 32], (UpstreamCheck, std::time::Instant)>>,
}

/// How long a credential check is remembered.
pub const CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl AccessChecker {
    /// `registry` gives the plain-HTTP list and timeout (its own credentials are not used).
    pub fn new(registry: Arc<Registry>) -> AccessChecker {
        AccessChecker {
            registry,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn check(
        &self,
        registry: &str,
        repository: &str,
        digest: &str,
        authorization: &str,
    ) -> UpstreamCheck {
        let key = check_key(authorization, registry, repository);
        let now = std::time::Instant::now();
        {
            let mut cache = lock(&self.cache);
            cache.retain(|_, (_, at)| now.duration_since(*at) < CHECK_TTL);
            if let Some((c, _)) = cache.get(&key) {
                return *c;
            }
        }
        let Some((username, password)) = basic_credentials(authorization) else {
            return UpstreamCheck::Unknown;
        };
        // What the registry says of the credentials for the repository is remembered; a
        // digest it does not have (404) says nothing of them, and no answer is not an answer.
        let (result, remember) = match as_user(&self.registry, registry, username, password)
            .can_pull(&format!("{registry}/{repository}@{digest}"), digest)
            .await
        {
            Ok(()) => (UpstreamCheck::Allowed, true),
            Err(
                RegistryError::Denied { .. }
                | RegistryError::CredentialsRefused { .. }
                | RegistryError::NeedsCredentials { .. },
            ) => (UpstreamCheck::Denied, true),
            Err(RegistryError::NotFound { .. }) => (UpstreamCheck::Denied, false),
            Err(e) => {
                debug!(%registry, %repository, reason = e.metric_label(), "credential check gave no answer");
                (UpstreamCheck::Unknown, false)
            }
        };
        if remember {
            lock(&self.cache).insert(key, (result, now));
        }
        result
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sha2::{Digest as _, Sha256};
    use tokio::sync::mpsc;

    use super::*;

    pub fn sha256(bytes: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(bytes))
    }

    type Chunks = mpsc::Receiver<io::Result<Vec<u8>>>;
    type Kept = Vec<(String, Vec<u8>)>;

    /// An origin whose bytes the test releases chunk by chunk (or all at once), counting opens.
    #[derive(Clone)]
    pub struct Gate {
        opens: Arc<AtomicUsize>,
        chunks: Arc<Mutex<Option<Chunks>>>,
        size: u64,
    }

    impl Gate {
        pub fn new(size: u64) -> (Gate, mpsc::Sender<io::Result<Vec<u8>>>) {
            let (tx, rx) = mpsc::channel(64);
            (
                Gate {
                    opens: Arc::new(AtomicUsize::new(0)),
                    chunks: Arc::new(Mutex::new(Some(rx))),
                    size,
                },
                tx,
            )
        }
    }

    impl Origin for Gate {
        async fn open(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: Option<&str>,
        ) -> Result<Opened, UpstreamError> {
            self.opens.fetch_add(1, Ordering::SeqCst);
            let rx = lock(&self.chunks).take().ok_or(UpstreamError::Registry {
                what: "gate".into(),
                reason: "opened twice".into(),
            })?;
            Ok((
                self.size,
                tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
            ))
        }
    }

    /// Records what it was asked to keep.
    #[derive(Clone, Default)]
    pub struct Recorder(pub Arc<Mutex<Kept>>);

    impl Keeper for Recorder {
        async fn keep(
            &self,
            _: &str,
            _: &str,
            desc: &Descriptor,
            file: &Path,
        ) -> Result<(), ContainerdError> {
            let bytes = std::fs::read(file).unwrap_or_default();
            lock(&self.0).push((desc.digest.clone(), bytes));
            Ok(())
        }
    }

    async fn collect(mut s: BoxStream<'static, io::Result<Vec<u8>>>) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            match c {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    /// A directory removed at drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!(
                "ragent-upstream-{name}-{}-{}",
                std::process::id(),
                crate::prepull::nonce()
            ));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn blob(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn many_requesters_share_one_fetch_and_get_every_byte() {
        let dir = TempDir::new("t1");
        let data = blob(700_000);
        let d = sha256(&data);
        let (gate, tx) = Gate::new(data.len() as u64);
        let kept = Recorder::default();
        let flights = Flights::new(dir.path(), gate.clone(), kept.clone()).unwrap();
        let (f1, started1) = flights.join("r", "app", &d, None).unwrap();
        // Three more join while nothing has arrived; one of them from an offset.
        let (f2, started2) = flights.join("r", "app", &d, None).unwrap();
        let (f3, _) = flights.join("r", "app", &d, None).unwrap();
        assert!(started1 && !started2);
        let readers = [
            tokio::spawn(collect(f1.read(0, 0))),
            tokio::spawn(collect(f2.read(0, 0))),
            tokio::spawn(collect(f3.read(123_456, 1000))),
        ];
        for c in data.chunks(65_536) {
            tx.send(Ok(c.to_vec())).await.unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        let mut results = Vec::new();
        for r in readers {
            results.push(r.await.unwrap());
        }
        assert_eq!(results[0], (data.clone(), None));
        assert_eq!(results[1], (data.clone(), None));
        assert_eq!(results[2], (data[123_456..124_456].to_vec(), None));
        assert_eq!(gate.opens.load(Ordering::SeqCst), 1, "one upstream fetch");
        // Kept once, with the right bytes; then forgotten, and the spool is empty once the
        // readers let go.
        for _ in 0..100 {
            if flights.in_flight() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(flights.in_flight(), 0);
        assert_eq!(*lock(&kept.0), vec![(d.clone(), data.clone())]);
        drop((f1, f2, f3));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_wrong_blob_never_reaches_a_requester_whole() {
        let dir = TempDir::new("t2");
        let data = blob(10_000);
        let claimed = sha256(b"something else");
        let (gate, tx) = Gate::new(data.len() as u64);
        let kept = Recorder::default();
        let flights = Flights::new(dir.path(), gate, kept.clone()).unwrap();
        let (f, _) = flights.join("r", "app", &claimed, None).unwrap();
        let reader = tokio::spawn(collect(f.read(0, 0)));
        tx.send(Ok(data.clone())).await.unwrap();
        drop(tx);
        let (got, err) = reader.await.unwrap();
        assert!(got.len() < data.len(), "the last byte was held back");
        assert!(err.unwrap().contains("wrong blob"));
        assert!(lock(&kept.0).is_empty(), "nothing kept");
    }

    #[tokio::test]
    async fn a_failed_fetch_ends_every_waiter_and_is_forgotten() {
        let dir = TempDir::new("t3");
        let data = blob(5000);
        let d = sha256(&data);
        let (gate, tx) = Gate::new(data.len() as u64);
        let flights = Flights::new(dir.path(), gate, Recorder::default()).unwrap();
        let (f, _) = flights.join("r", "app", &d, None).unwrap();
        let reader = tokio::spawn(collect(f.read(0, 0)));
        tx.send(Ok(data[..100].to_vec())).await.unwrap();
        tx.send(Err(io::Error::other("connection reset")))
            .await
            .unwrap();
        let (got, err) = reader.await.unwrap();
        // Whatever arrived before the failure (maybe nothing), then the error.
        assert!(got.len() <= 100 && data.starts_with(&got));
        assert!(err.unwrap().contains("connection reset"));
        for _ in 0..100 {
            if flights.in_flight() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The next request starts a new fetch.
        assert_eq!(flights.in_flight(), 0);
        let (_, started) = flights.join("r", "app", &d, None).unwrap();
        assert!(started);
    }

    #[tokio::test]
    async fn a_registry_sending_more_than_announced_fails() {
        let dir = TempDir::new("t4");
        let data = blob(100);
        let (gate, tx) = Gate::new(50);
        let flights = Flights::new(dir.path(), gate, Recorder::default()).unwrap();
        let (f, _) = flights
            .join("r", "app", &sha256(&data[..50]), None)
            .unwrap();
        tx.send(Ok(data)).await.unwrap();
        drop(tx);
        let (got, err) = collect(f.read(0, 0)).await;
        assert!(got.len() < 50);
        assert!(err.unwrap().contains("announced 50"));
    }

    #[test]
    fn unknown_algorithms_are_refused_before_any_fetch() {
        let dir = TempDir::new("t5");
        let (gate, _tx) = Gate::new(1);
        let flights = Flights::new(dir.path(), gate.clone(), Recorder::default()).unwrap();
        assert!(matches!(
            flights.join("r", "app", "md5:00", None),
            Err(UpstreamError::Algorithm { .. })
        ));
        assert_eq!(gate.opens.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn leftover_spool_files_are_removed_at_start() {
        let dir = TempDir::new("t6");
        std::fs::write(dir.path().join("sha256-ab.1.part"), b"x").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"x").unwrap();
        let (gate, _tx) = Gate::new(1);
        Flights::new(dir.path(), gate, Recorder::default()).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["keep.txt".to_string()]);
    }
}
