//! A misbehaving registry for fault tests: a small HTTP/1.1 proxy on a free loopback port that
//! forwards to the real test registry and injects one [`Fault`] at a time.
//!
//! It runs on its own thread with its own tokio runtime (so a test that blocks on a child
//! process does not starve it), counts the body bytes it hands to its client per path (what
//! crossed the wire), records every request, and stops on drop. Everything is bounded in time:
//! a held connection is answered 504 after [`HANG_MAX`], and the proxy's tasks are dropped
//! when it stops.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::oneshot};

/// The longest a [`Fault::Hang`] holds a request before answering 504.
pub const HANG_MAX: Duration = Duration::from_secs(120);
/// The content type of the manifests the proxy makes up.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Which requests a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `GET /v2/<name>/manifests/<ref>`
    Manifests,
    /// `GET /v2/<name>/blobs/<digest>`
    Blobs,
}

/// What the proxy does wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything unchanged.
    None,
    /// Blob bodies arrive with every byte inverted: same length, only the digest tells.
    CorruptBlobs,
    /// Blob bodies stop after `after` bytes and the connection drops (the headers promised more).
    TruncateBlobs { after: u64 },
    /// Answer `status` (with an OCI error body) to every request of `on`.
    Status { on: Target, status: u16 },
    /// Serve manifests of `size` bytes (a real manifest padded with whitespace).
    HugeManifest { size: usize },
    /// Serve manifests that are not JSON.
    MalformedManifest,
    /// Serve manifests whose media type (header and body) no client knows.
    UnknownMediaType,
    /// Accept requests of `on` and never answer (until the proxy stops, at most [`HANG_MAX`]).
    Hang { on: Target },
    /// Forward blob bodies at `bytes_per_sec`.
    Throttle { bytes_per_sec: u64 },
}

/// One request the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The Range header, if any (a resumed blob download).
    pub range: Option<String>,
    pub status: u16,
}

struct State {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    /// Body bytes handed to the client, per request path.
    bytes: Mutex<BTreeMap<String, u64>>,
    seen: Mutex<Vec<Seen>>,
}

impl State {
    fn fault(&self) -> Fault {
        self.fault.lock().map(|f| f.clone()).unwrap_or(Fault::None)
    }

    fn count(&self, path: &str, n: u64) {
        if let Ok(mut b) = self.bytes.lock() {
            *b.entry(path.to_string()).or_default() += n;
        }
    }

    fn record(&self, s: Seen) {
        if let Ok(mut v) = self.seen.lock() {
            v.push(s);
        }
    }
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

impl Proxy {
    /// Starts a proxy in front of `upstream` (the registry) with `fault`.
    pub fn start(upstream: SocketAddr, fault: Fault) -> Result<Proxy> {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            fault: Mutex::new(fault),
            bytes: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("the proxy's runtime")?;
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("registry-proxy-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, st) => {}
                    }
                });
                // Held and throttled connections are dropped here.
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .context("the proxy's thread")?;
        Ok(Proxy {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`: the registry name ragent is given.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Changes the fault for the requests that come next.
    pub fn set_fault(&self, fault: Fault) {
        if let Ok(mut f) = self.state.fault.lock() {
            *f = fault;
        }
    }

    /// Body bytes handed to clients for paths that contain `part` (e.g. a digest).
    pub fn bytes_for(&self, part: &str) -> u64 {
        self.state
            .bytes
            .lock()
            .map(|b| {
                b.iter()
                    .filter(|(p, _)| p.contains(part))
                    .map(|(_, n)| n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Body bytes of every blob response so far.
    pub fn blob_bytes(&self) -> u64 {
        self.bytes_for("/blobs/")
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Forgets the counters and the request log.
    pub fn reset(&self) {
        if let Ok(mut b) = self.state.bytes.lock() {
            b.clear();
        }
        if let Ok(mut v) = self.state.seen.lock() {
            v.clear();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, st.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// The OCI error code a registry sends with `status`.
fn oci_code(status: u16) -> &'static str {
    match status {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "MANIFEST_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNKNOWN",
    }
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let target = if path.contains("/manifests/") {
        Some(Target::Manifests)
    } else if path.contains("/blobs/") {
        Some(Target::Blobs)
    } else {
        None
    };
    let fault = state.fault();
    let response = match (&fault, target) {
        (Fault::Status { on, status }, Some(t)) if *on == t => {
            let code = oci_code(*status);
            let body = format!(
                r#"{{"errors":[{{"code":"{code}","message":"injected by the test proxy","detail":null}}]}}"#
            );
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = full(status, "application/json", body);
            if status == StatusCode::TOO_MANY_REQUESTS {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            }
            r
        }
        (Fault::Hang { on }, Some(t)) if *on == t => {
            tokio::time::sleep(HANG_MAX).await;
            full(StatusCode::GATEWAY_TIMEOUT, "text/plain", "held too long")
        }
        (Fault::MalformedManifest, Some(Target::Manifests)) => full(
            StatusCode::OK,
            OCI_MANIFEST,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"#,
        ),
        (Fault::HugeManifest { .. } | Fault::UnknownMediaType, Some(Target::Manifests)) => {
            match forward(&state, req, &path).await {
                Ok(upstream) => rewrite_manifest(upstream, &fault).await,
                Err(e) => full(StatusCode::BAD_GATEWAY, "text/plain", e.to_string()),
            }
        }
        _ => match forward(&state, req, &path).await {
            Ok(upstream) => {
                let is_blob = target == Some(Target::Blobs) && upstream.status().is_success();
                let (parts, body) = upstream.into_parts();
                let data: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> =
                    Box::pin(body.into_data_stream().map_err(std::io::Error::other));
                let data = if is_blob {
                    misbehave(data, &fault)
                } else {
                    data
                };
                let st = state.clone();
                let p = path.clone();
                let counted = data.inspect_ok(move |b| st.count(&p, b.len() as u64));
                Response::from_parts(
                    parts,
                    BodyExt::boxed_unsync(StreamBody::new(counted.map_ok(Frame::data))),
                )
            }
            Err(e) => full(StatusCode::BAD_GATEWAY, "text/plain", e.to_string()),
        },
    };
    state.record(Seen {
        method,
        path,
        range,
        status: response.status().as_u16(),
    });
    Ok(response)
}

/// Applies a blob fault to a forwarded body.
fn misbehave(
    data: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
    fault: &Fault,
) -> std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> {
    match *fault {
        Fault::CorruptBlobs => Box::pin(data.map_ok(|b| b.iter().map(|x| !x).collect::<Bytes>())),
        Fault::TruncateBlobs { after } => Box::pin(stream::unfold(
            (data, 0u64, Phase::Stream),
            move |(mut data, sent, phase)| async move {
                match phase {
                    Phase::Done => None,
                    // The error makes hyper drop the connection mid-body.
                    Phase::Fail => Some((
                        Err(std::io::Error::other("truncated by the test proxy")),
                        (data, sent, Phase::Done),
                    )),
                    Phase::Stream => match data.next().await {
                        Some(Ok(b)) => {
                            let room = after.saturating_sub(sent);
                            if (b.len() as u64) < room {
                                let n = b.len() as u64;
                                Some((Ok(b), (data, sent + n, Phase::Stream)))
                            } else {
                                let part = b.slice(..usize::try_from(room).unwrap_or(0));
                                Some((Ok(part), (data, after, Phase::Fail)))
                            }
                        }
                        Some(Err(e)) => Some((Err(e), (data, sent, Phase::Done))),
                        None => None,
                    },
                }
            },
        )),
        Fault::Throttle { bytes_per_sec } => {
            let rate = bytes_per_sec.max(1);
            // Pieces of a tenth of a second each.
            let piece = usize::try_from((rate / 10).max(1)).unwrap_or(1);
            Box::pin(
                data.map_ok(move |b| {
                    let pieces: Vec<std::io::Result<Bytes>> = (0..b.len())
                        .step_by(piece)
                        .map(|i| Ok(b.slice(i..(i + piece).min(b.len()))))
                        .collect();
                    stream::iter(pieces)
                })
                .try_flatten()
                .and_then(move |b| async move {
                    let secs = b.len() as f64 / rate as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    Ok(b)
                }),
            )
        }
        _ => data,
    }
}

#[derive(Clone, Copy)]
enum Phase {
    Stream,
    Fail,
    Done,
}

/// A made-up manifest from the real one: padded past a cap, or with an unknown media type.
async fn rewrite_manifest(upstream: Response<Incoming>, fault: &Fault) -> Response<Body> {
    let status = upstream.status();
    let body = match upstream.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return full(StatusCode::BAD_GATEWAY, "text/plain", e.to_string()),
    };
    if !status.is_success() {
        return full(status, "application/json", body);
    }
    match *fault {
        Fault::HugeManifest { size } => {
            let mut v = body.to_vec();
            // Whitespace before the closing brace keeps it valid JSON.
            if let Some(close) = v.iter().rposition(|b| *b == b'}') {
                let pad = size.saturating_sub(v.len());
                v.splice(close..close, std::iter::repeat_n(b' ', pad));
            }
            full(StatusCode::OK, OCI_MANIFEST, v)
        }
        _ => {
            let unknown = "application/vnd.example.unknown.v9+json";
            let text = String::from_utf8_lossy(&body)
                .replace(OCI_MANIFEST, unknown)
                .replace(
                    "application/vnd.docker.distribution.manifest.v2+json",
                    unknown,
                );
            full(StatusCode::OK, unknown, text)
        }
    }
}

/// Sends the request to the registry on a fresh connection (no pooling: simple and bounded).
async fn forward(
    state: &State,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<Incoming>, anyhow::Error> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(state.upstream),
    )
    .await
    .context("connecting to the registry timed out")??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.to_string());
    parts.uri = pq.parse()?;
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&state.upstream.to_string())?,
    );
    parts.headers.remove(header::CONNECTION);
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(Request::from_parts(parts, body)),
    )
    .await
    .context("the registry did not answer within 30 s")??;
    Ok(resp)
}
