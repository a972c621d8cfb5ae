//! The requesting side of layer sharing (issue 8): where this node gets a blob it misses.
//!
//! [`plan_sources`] orders the digest's home peers and this node itself (which stands for "fetch
//! it upstream", through [`Flights`], once however many ask). Each peer has `peer_timeout` to
//! answer; a peer that does not, refuses the connection or cuts a transfer is skipped for
//! [`DOWN_FOR`] and the next source continues from the byte where the last one stopped (a
//! `Range` request), so a transfer survives its home peer dying mid-way. Requests to peers carry
//! the shared token ([`PEER_TOKEN_HEADER`]); a peer never forwards them again.
use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::BoxStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::{
    core::sharing::{
        Fallback, PEER_TOKEN_HEADER, Peer, Source, Token, UPSTREAM_AUTH_HEADER, plan_sources,
    },
    metrics::SharingMetrics,
    upstream::{Flights, Keeper, Origin, UpstreamError},
};

/// How long a peer that failed is left out of the plans.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("no source could serve {digest}")]
    Exhausted { digest: String },
}

/// A blob on its way: its whole length, and the bytes from the requested offset.
pub struct Fetched {
    pub size: u64,
    /// Where the first bytes come from: "peer" or "upstream".
    pub source: &'static str,
    pub stream: BoxStream<'static, io::Result<Vec<u8>>>,
}

pub struct Mesh<O: Origin, K: Keeper> {
    me: String,
    /// `[sharing] zone`, which wins over the Node's label.
    zone: Option<String>,
    node_zone: Mutex<Option<String>>,
    peers: watch::Receiver<Vec<Peer>>,
    down: Mutex<HashMap<String, Instant>>,
    token: Option<Token>,
    timeout: Duration,
    http: reqwest::Client,
    flights: Arc<Flights<O, K>>,
    metrics: Option<SharingMetrics>,
}

impl<O: Origin, K: Keeper> std::fmt::Debug for Mesh<O, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("me", &self.me)
            .field("zone", &self.zone)
            .field("peers", &self.peers.borrow().len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<O: Origin, K: Keeper> Mesh<O, K> {
    pub fn new(
        me: &str,
        zone: Option<&str>,
        peers: watch::Receiver<Vec<Peer>>,
        token: Option<Token>,
        timeout: Duration,
        flights: Arc<Flights<O, K>>,
        metrics: Option<SharingMetrics>,
    ) -> Arc<Mesh<O, K>> {
        // reqwest panics building a client without a rustls provider, even for plain HTTP.
        crate::adapters::registry::install_tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            // A peer silent this long mid-transfer is treated as gone.
            .read_timeout(timeout.max(Duration::from_secs(5)))
            .no_proxy()
            .build()
            .unwrap_or_default();
        Arc::new(Mesh {
            me: me.to_string(),
            zone: zone.map(str::to_string),
            node_zone: Mutex::new(None),
            peers,
            down: Mutex::new(HashMap::new()),
            token,
            timeout,
            http,
            flights,
            metrics,
        })
    }

    pub fn flights(&self) -> &Arc<Flights<O, K>> {
        &self.flights
    }

    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    /// The current membership (ready or not).
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.borrow().clone()
    }

    /// This node's zone from its Node object (used unless `[sharing] zone` is set).
    pub fn set_node_zone(&self, zone: Option<String>) {
        *lock(&self.node_zone) = zone.filter(|z| !z.is_empty());
    }

    fn zone(&self) -> Option<String> {
        self.zone.clone().or_else(|| lock(&self.node_zone).clone())
    }

    /// Peers by state: (ready, not ready, down after a failure).
    pub fn membership(&self) -> (i64, i64, i64) {
        let down = self.down_ids();
        let peers = self.peers.borrow();
        let count = |f: &dyn Fn(&Peer) -> bool| {
            i64::try_from(peers.iter().filter(|p| f(p)).count()).unwrap_or(i64::MAX)
        };
        (
            count(&|p| p.ready && !down.contains(&p.id)),
            count(&|p| !p.ready),
            count(&|p| p.ready && down.contains(&p.id)),
        )
    }

    fn mark_down(&self, id: &str) {
        lock(&self.down).insert(id.to_string(), Instant::now() + DOWN_FOR);
    }

    fn down_ids(&self) -> Vec<String> {
        let now = Instant::now();
        let mut d = lock(&self.down);
        d.retain(|_, until| *until > now);
        d.keys().cloned().collect()
    }

    /// The sources for `digest`, best first (peers only when there is a token to present).
    pub fn plan(&self, digest: &str) -> Vec<Source> {
        if self.token.is_none() {
            return vec![Source::Upstream];
        }
        let down = self.down_ids();
        let down: Vec<&str> = down.iter().map(String::as_str).collect();
        let zone = self.zone();
        let peers = self.peers.borrow();
        plan_sources(digest, &peers, &self.me, zone.as_deref(), &down)
    }

    /// A blob this node misses, from `offset`: from its home peer, the next one, or upstream.
    pub async fn fetch(
        self: &Arc<Self>,
        registry: &str,
        repository: &str,
        digest: &str,
        offset: u64,
        auth: Option<&str>,
    ) -> Result<Fetched, MeshError> {
        let mut plan = self.plan(digest).into_iter();
        let (size, source, first) = loop {
            let Some(src) = plan.next() else {
                return Err(MeshError::Exhausted {
                    digest: digest.into(),
                });
            };
            match self
                .open(&src, registry, repository, digest, offset, auth)
                .await
            {
                Ok(Some((size, stream))) => break (size, src, stream),
                Ok(None) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let label = source_label(&source);
        if let Some(m) = &self.metrics
            && label == "peer"
        {
            m.avoided
                .with_label_values(&[m.registry_label(registry)])
                .inc();
        }
        debug!(%digest, source = ?source, offset, "blob for this node");
        // The rest of the plan continues a transfer a peer cuts.
        let rest: Vec<Source> = plan.collect();
        let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(8);
        let me = self.clone();
        let (registry, repository, digest) = (
            registry.to_string(),
            repository.to_string(),
            digest.to_string(),
        );
        let auth = auth.map(str::to_string);
        tokio::spawn(async move {
            me.relay(
                tx,
                (source, first),
                rest,
                (&registry, &repository, &digest, auth.as_deref()),
                offset,
                size,
            )
            .await;
        });
        Ok(Fetched {
            size,
            source: label,
            stream: tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        })
    }

    /// Forwards the bytes of the current source; when a peer's transfer breaks, continues from
    /// the next source at the same byte.
    async fn relay(
        &self,
        tx: mpsc::Sender<io::Result<Vec<u8>>>,
        (mut source, mut stream): (Source, BoxStream<'static, io::Result<Vec<u8>>>),
        rest: Vec<Source>,
        (registry, repository, digest, auth): (&str, &str, &str, Option<&str>),
        offset: u64,
        size: u64,
    ) {
        let mut rest = rest.into_iter();
        let mut pos = offset;
        loop {
            let label = source_label(&source);
            let mut failed: Option<io::Error> = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(b) => {
                        pos += b.len() as u64;
                        if let Some(m) = &self.metrics {
                            m.blob_bytes
                                .with_label_values(&[m.registry_label(registry), label])
                                .inc_by(b.len() as u64);
                        }
                        if tx.send(Ok(b)).await.is_err() {
                            return; // the requester went away
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if pos >= size && failed.is_none() {
                return;
            }
            let err = failed.unwrap_or_else(|| io::Error::other("the transfer ended short"));
            let Source::Peer { id, .. } = &source else {
                // Upstream failed: nothing further can serve it; the requester's check fails.
                let _ = tx.send(Err(err)).await;
                return;
            };
            info!(%digest, peer = %id, at = pos, error = %err, "a peer cut the transfer; continuing from the next source");
            self.fell_back(id, Fallback::Cut);
            // Continue at `pos` with the next source that answers.
            let next = loop {
                let Some(src) = rest.next() else {
                    let _ = tx.send(Err(err)).await;
                    return;
                };
                match self
                    .open(&src, registry, repository, digest, pos, auth)
                    .await
                {
                    Ok(Some((s, st))) if s == size => break (src, st),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return;
                    }
                }
            };
            (source, stream) = next;
        }
    }

    fn fell_back(&self, peer: &str, why: Fallback) {
        if why.marks_down() {
            self.mark_down(peer);
        }
        if let Some(m) = &self.metrics {
            m.fallbacks.with_label_values(&[why.metric_label()]).inc();
        }
    }

    /// Opens `src` at `offset`: Some((size, bytes)), or None to try the next source.
    async fn open(
        &self,
        src: &Source,
        registry: &str,
        repository: &str,
        digest: &str,
        offset: u64,
        auth: Option<&str>,
    ) -> Result<Option<(u64, BoxStream<'static, io::Result<Vec<u8>>>)>, UpstreamError> {
        match src {
            Source::Upstream => {
                let (flight, started) = self.flights.join(registry, repository, digest, auth)?;
                if !started && let Some(m) = &self.metrics {
                    m.avoided
                        .with_label_values(&[m.registry_label(registry)])
                        .inc();
                }
                let size = flight.size().await?;
                Ok(Some((size, flight.read(offset, 0))))
            }
            Source::Peer { id, addr } => {
                match self
                    .ask_peer(addr, registry, repository, digest, offset, auth)
                    .await
                {
                    Ok(opened) => Ok(Some(opened)),
                    Err(why) => {
                        debug!(%digest, peer = %id, reason = why.metric_label(), "falling back");
                        self.fell_back(id, why);
                        Ok(None)
                    }
                }
            }
        }
    }

    async fn ask_peer(
        &self,
        addr: &str,
        registry: &str,
        repository: &str,
        digest: &str,
        offset: u64,
        auth: Option<&str>,
    ) -> Result<(u64, BoxStream<'static, io::Result<Vec<u8>>>), Fallback> {
        let token = self.token.as_ref().ok_or(Fallback::Forbidden)?;
        let url = format!(
            "http://{addr}/v2/{repository}/blobs/{digest}?ns={}",
            encode_query(registry)
        );
        let mut req = self
            .http
            .get(&url)
            .header(PEER_TOKEN_HEADER, token.as_str());
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        // Checked credentials of a private pull, for the home's upstream fetch (not kept).
        if let Some(a) = auth {
            req = req.header(UPSTREAM_AUTH_HEADER, a);
        }
        let t0 = Instant::now();
        let answer = tokio::time::timeout(self.timeout, req.send()).await;
        let outcome = match &answer {
            Err(_) => "timeout",
            Ok(Err(_)) => "connect",
            Ok(Ok(r)) if r.status().is_success() => "ok",
            Ok(Ok(_)) => "status",
        };
        if let Some(m) = &self.metrics {
            m.peer_latency
                .with_label_values(&[outcome])
                .observe(t0.elapsed().as_secs_f64());
        }
        let r = match answer {
            Err(_) => return Err(Fallback::Timeout),
            Ok(Err(e)) if e.is_timeout() => return Err(Fallback::Timeout),
            Ok(Err(_)) => return Err(Fallback::Connect),
            Ok(Ok(r)) => r,
        };
        let size = match (r.status().as_u16(), offset) {
            (200, 0) => r.content_length(),
            (206, _) => content_range_total(
                r.headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok()),
                offset,
            ),
            (403, _) => return Err(Fallback::Forbidden),
            _ => return Err(Fallback::Status),
        }
        .ok_or(Fallback::Status)?;
        let stream = r
            .bytes_stream()
            .map(|c| c.map(|b| b.to_vec()).map_err(io::Error::other))
            .boxed();
        Ok((size, stream))
    }
}

fn source_label(s: &Source) -> &'static str {
    match s {
        Source::Peer { .. } => "peer",
        Source::Upstream => "upstream",
    }
}

/// The total of a `Content-Range: bytes <offset>-<end>/<total>` that starts at `offset`.
fn content_range_total(v: Option<&str>, offset: u64) -> Option<u64> {
    let rest = v?.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    if start.parse::<u64>().ok()? != offset {
        return None;
    }
    total.parse().ok()
}

/// A registry host for a query string (`:` and other reserved bytes percent-encoded).
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::{
        adapters::containerd::ContainerdError,
        core::{
            oci::Descriptor,
            sharing::{PublicPolicy, home_peers},
        },
        peer::{ContentSource, PeerOptions},
        upstream::{Opened, UpstreamError},
    };

    #[test]
    fn content_ranges_give_the_total_only_for_the_asked_offset() {
        assert_eq!(content_range_total(Some("bytes 10-99/100"), 10), Some(100));
        assert_eq!(content_range_total(Some("bytes 11-99/100"), 10), None);
        assert_eq!(content_range_total(Some("bytes */100"), 10), None);
        assert_eq!(content_range_total(None, 0), None);
    }

    #[test]
    fn registry_hosts_are_query_encoded() {
        assert_eq!(encode_query("10.0.0.2:5000"), "10.0.0.2%3A5000");
        assert_eq!(encode_query("docker.io"), "docker.io");
    }

    /// An empty content store (every node misses).
    #[derive(Clone)]
    struct Empty;

    impl ContentSource for Empty {
        async fn size(&self, _: &str) -> Result<Option<u64>, ContainerdError> {
            Ok(None)
        }

        async fn read(
            &self,
            digest: &str,
            _: u64,
            _: u64,
        ) -> Result<BoxStream<'static, Result<Vec<u8>, ContainerdError>>, ContainerdError> {
            Err(ContainerdError::NotFound {
                digest: digest.into(),
            })
        }
    }

    /// The registry: blobs by digest in small, slow chunks, counting fetches per node; a
    /// node's origin may break after `break_after` bytes.
    #[derive(Clone)]
    struct Registry {
        blobs: Arc<BTreeMap<String, Vec<u8>>>,
        opens: Arc<Mutex<Vec<String>>>,
        node: String,
        break_after: Option<usize>,
    }

    impl Origin for Registry {
        async fn open(
            &self,
            _: &str,
            _: &str,
            digest: &str,
            _: Option<&str>,
        ) -> Result<Opened, UpstreamError> {
            lock(&self.opens).push(self.node.clone());
            let b = self
                .blobs
                .get(digest)
                .cloned()
                .ok_or(UpstreamError::Registry {
                    what: digest.into(),
                    reason: "404".into(),
                })?;
            let size = b.len() as u64;
            let limit = self.break_after;
            let chunks: Vec<Vec<u8>> = b.chunks(4096).map(<[u8]>::to_vec).collect();
            let stream = futures::stream::iter(chunks.into_iter().enumerate())
                .then(move |(i, c)| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    match limit {
                        Some(n) if i * 4096 >= n => Err(io::Error::other("registry link broke")),
                        _ => Ok(c),
                    }
                })
                .boxed();
            Ok((size, stream))
        }
    }

    struct Keep;

    impl Keeper for Keep {
        async fn keep(
            &self,
            _: &str,
            _: &str,
            _: &Descriptor,
            _: &std::path::Path,
        ) -> Result<(), ContainerdError> {
            Ok(())
        }
    }

    struct Node {
        mesh: Arc<Mesh<Registry, Keep>>,
        _spool: crate::upstream::tests::TempDir,
    }

    const TOKEN: &str = "0123456789abcdef-test-token";

    /// `n` agents on loopback, each with its peer server, an empty store and the same registry.
    async fn cluster(
        n: usize,
        blobs: &BTreeMap<String, Vec<u8>>,
        opens: &Arc<Mutex<Vec<String>>>,
        breaks: &[(&str, usize)],
    ) -> Vec<Node> {
        let mut listeners = Vec::new();
        let mut peers = Vec::new();
        for i in 0..n {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.push(
                Peer::configured(
                    &format!("node-{i}"),
                    &l.local_addr().unwrap().to_string(),
                    None,
                )
                .unwrap(),
            );
            listeners.push(l);
        }
        let mut nodes = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let id = format!("node-{i}");
            let spool = crate::upstream::tests::TempDir::new(&id);
            let origin = Registry {
                blobs: Arc::new(blobs.clone()),
                opens: opens.clone(),
                node: id.clone(),
                break_after: breaks.iter().find(|(n, _)| *n == id).map(|(_, b)| *b),
            };
            let flights = Flights::new(spool.path(), origin, Keep).unwrap();
            let (tx, rx) = watch::channel(peers.clone());
            // The membership never changes in these tests.
            std::mem::forget(tx);
            let token = Token::parse(TOKEN).unwrap();
            let mesh = Mesh::new(
                &id,
                None,
                rx,
                Some(token.clone()),
                Duration::from_secs(2),
                flights,
                None,
            );
            let opts = PeerOptions {
                policy: PublicPolicy::parse(&["r.test"]).unwrap(),
                token: Some(token),
                listen_ip: None,
                mesh: Some(mesh.clone()),
                metrics: None,
                checker: None,
            };
            tokio::spawn(crate::peer::serve(l, Empty, opts, std::future::pending()));
            nodes.push(Node {
                mesh,
                _spool: spool,
            });
        }
        nodes
    }

    fn blob(seed: u8, n: usize) -> (String, Vec<u8>) {
        let b: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        (format!("sha256:{:x}", Sha256::digest(&b)), b)
    }

    async fn fetch_all(node: &Node, digest: &str, offset: u64) -> Result<Vec<u8>, String> {
        let f = node
            .mesh
            .fetch("r.test", "team/app", digest, offset, None)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut s = f.stream;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn every_node_gets_a_blob_and_only_its_home_peer_fetches_it() {
        let (d, b) = blob(1, 300_000);
        let blobs = BTreeMap::from([(d.clone(), b.clone())]);
        let opens = Arc::new(Mutex::new(Vec::new()));
        let nodes = cluster(4, &blobs, &opens, &[]).await;
        let got = futures::future::join_all(nodes.iter().map(|n| fetch_all(n, &d, 0))).await;
        for g in got {
            assert_eq!(g.as_deref(), Ok(&b[..]));
        }
        let home = home_peers(&d, &nodes[0].mesh.peers(), None)[0].id.clone();
        assert_eq!(
            *lock(&opens),
            vec![home],
            "one upstream fetch, by the home peer"
        );
        // A resumed request (Range) gets the rest.
        let rest = fetch_all(&nodes[1], &d, 1000).await.unwrap();
        assert_eq!(rest, b[1000..]);
    }

    #[tokio::test]
    async fn a_home_peer_that_breaks_mid_transfer_is_replaced_at_the_same_byte() {
        let (d, b) = blob(2, 200_000);
        let blobs = BTreeMap::from([(d.clone(), b.clone())]);
        let opens = Arc::new(Mutex::new(Vec::new()));
        // Which node is home depends on the ports: find it first with a throwaway cluster
        // of ids (ids, not ports, decide).
        let ids: Vec<Peer> = (0..3)
            .map(|i| Peer::configured(&format!("node-{i}"), "127.0.0.1:1", None).unwrap())
            .collect();
        let order: Vec<String> = home_peers(&d, &ids, None)
            .iter()
            .map(|p| p.id.clone())
            .collect();
        let nodes = cluster(3, &blobs, &opens, &[(order[0].as_str(), 100_000)]).await;
        // The last node in the order asks: the home breaks after ~100 kB, the second takes
        // over from that byte.
        let asker = order[2]
            .trim_start_matches("node-")
            .parse::<usize>()
            .unwrap();
        let got = fetch_all(&nodes[asker], &d, 0).await;
        assert_eq!(got.as_deref(), Ok(&b[..]), "whole and exact");
        let o = lock(&opens).clone();
        assert_eq!(o, vec![order[0].clone(), order[1].clone()]);
        // The home is left out for a while: the next miss goes to the second peer directly.
        let plan = nodes[asker].mesh.plan(&d);
        assert!(
            matches!(&plan[0], Source::Peer { id, .. } if *id == order[1]),
            "{plan:?}"
        );
    }

    #[tokio::test]
    async fn a_dead_peer_is_skipped_and_the_next_fetches() {
        // A third peer that is listed but never answers (nothing listens on its port).
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        // A digest whose home is the dead peer (ids, not addresses, decide).
        let ids: Vec<Peer> = ["node-0", "node-1", "node-dead"]
            .iter()
            .map(|id| Peer::configured(id, "127.0.0.1:1", None).unwrap())
            .collect();
        let (d, b) = (0u8..=255)
            .map(|s| blob(s, 20_000))
            .find(|(d, _)| home_peers(d, &ids, None)[0].id == "node-dead")
            .unwrap();
        let blobs = BTreeMap::from([(d.clone(), b.clone())]);
        let opens = Arc::new(Mutex::new(Vec::new()));
        let nodes = cluster(2, &blobs, &opens, &[]).await;
        let (tx, rx) = watch::channel({
            let mut p = nodes[0].mesh.peers();
            p.push(Peer::configured("node-dead", &dead_addr, None).unwrap());
            p
        });
        let spool = crate::upstream::tests::TempDir::new("asker");
        let asker = Mesh::new(
            "node-x",
            None,
            rx,
            Some(Token::parse(TOKEN).unwrap()),
            Duration::from_millis(500),
            Flights::new(
                spool.path(),
                Registry {
                    blobs: Arc::new(blobs.clone()),
                    opens: opens.clone(),
                    node: "node-x".into(),
                    break_after: None,
                },
                Keep,
            )
            .unwrap(),
            None,
        );
        let f = asker
            .fetch("r.test", "team/app", &d, 0, None)
            .await
            .unwrap();
        assert_eq!(f.source, "peer");
        let mut got = Vec::new();
        let mut s = f.stream;
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, b);
        // The live peer next in order fetched it; the dead one is down for a while.
        assert_eq!(lock(&opens).len(), 1);
        assert_eq!(asker.membership(), (2, 0, 1));
        drop(tx);
    }

    #[tokio::test]
    async fn strangers_and_wrong_tokens_get_403_and_nothing_is_fetched() {
        let (d, b) = blob(4, 10_000);
        let blobs = BTreeMap::from([(d.clone(), b)]);
        let opens = Arc::new(Mutex::new(Vec::new()));
        let nodes = cluster(1, &blobs, &opens, &[]).await;
        let addr = nodes[0].mesh.peers()[0].addr.clone();
        let url = format!("http://{addr}/v2/team/app/blobs/{d}?ns=r.test");
        let http = reqwest::Client::new();
        let wrong = http
            .get(&url)
            .header(PEER_TOKEN_HEADER, "0123456789abcdef-wrong-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 403);
        assert!(lock(&opens).is_empty());
        let right = http
            .get(&url)
            .header(PEER_TOKEN_HEADER, TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status().as_u16(), 200);
        assert_eq!(lock(&opens).len(), 1);
    }

    #[test]
    fn without_a_token_nothing_is_asked_of_peers() {
        let peers = vec![Peer::configured("b", "10.0.0.2:9465", None).unwrap()];
        let (_tx, rx) = watch::channel(peers);
        let spool = crate::upstream::tests::TempDir::new("notoken");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let m = Mesh::new(
            "a",
            None,
            rx,
            None,
            Duration::from_secs(1),
            Flights::new(
                spool.path(),
                Registry {
                    blobs: Arc::default(),
                    opens: Arc::default(),
                    node: "a".into(),
                    break_after: None,
                },
                Keep,
            )
            .unwrap(),
            None,
        );
        assert_eq!(m.plan("sha256:00"), vec![Source::Upstream]);
    }
}
