//! The peer server and local mirror (issue 8): the read-only OCI distribution API for blobs and
//! manifests by digest, streamed from containerd's content store.
//!
//! - `GET/HEAD /v2/<name>/blobs/<digest>` and `/v2/<name>/manifests/<digest>`; `GET /v2/`.
//!   Paths, methods and tags are judged by [`parse_request`] (a tag is 404: containerd resolves
//!   tags at the registry).
//! - Only committed content: the size comes from Content.Info and the bytes from Content.Read,
//!   which know nothing of ingests still being written (Spegel #502/#752 served those).
//! - `Content-Length`, `Docker-Content-Digest`; manifests with the `Content-Type` of their own
//!   `mediaType`; blobs honour a single `Range` (containerd resumes with `bytes=N-`); HEAD sends
//!   the headers only.
//! - Who asks: [`classify_caller`]. Another agent with the token is served from the store or
//!   the one upstream fetch (never forwarded again); this host's containerd or pre-pull gets
//!   [`decide_access`]'s answer (public policy; private blobs when the registry accepts the
//!   pull's credentials, checked by [`AccessChecker`]); anyone else 403.
//! - A blob the store lacks goes to the [`Mesh`] (home peer, else one upstream fetch).
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, FromRequestParts, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::{StreamExt, stream::BoxStream};
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        containerd::{Containerd, ContainerdError, MAX_METADATA_BLOB},
        registry::Registry,
    },
    core::sharing::{
        Access, AccessFacts, ByteRange, Caller, ContentRequest, Kind, PEER_TOKEN_HEADER, Presented,
        PublicPolicy, Route, ServeReason, SharingError, Token, UPSTREAM_AUTH_HEADER, UpstreamCheck,
        classify_caller, decide_access, manifest_media_type, needs_upstream_check, parse_range,
        parse_request, range_start,
    },
    mesh::Mesh,
    metrics::SharingMetrics,
    upstream::{AccessChecker, Discard, Keeper, Origin},
};

/// Where the peer server reads content: containerd's content store, or a fake in tests.
pub trait ContentSource: Clone + Send + Sync + 'static {
    /// The size of a committed blob, None when it is not in the store.
    fn size(
        &self,
        digest: &str,
    ) -> impl Future<Output = Result<Option<u64>, ContainerdError>> + Send;

    /// `len` bytes from `offset` (`len` 0: to the end).
    fn read(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<
        Output = Result<BoxStream<'static, Result<Vec<u8>, ContainerdError>>, ContainerdError>,
    > + Send;
}

impl ContentSource for Containerd {
    async fn size(&self, digest: &str) -> Result<Option<u64>, ContainerdError> {
        self.content_size(digest).await
    }

    async fn read(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<BoxStream<'static, Result<Vec<u8>, ContainerdError>>, ContainerdError> {
        Ok(self.read_content(digest, offset, len).await?.boxed())
    }
}

/// What the peer server knows besides the store: who may ask, and where misses go.
pub struct PeerOptions<O: Origin, K: Keeper> {
    /// Content served to this node's containerd without credentials.
    pub policy: PublicPolicy,
    /// The secret other agents present; None: every remote request is 403.
    pub token: Option<Token>,
    /// The address the server listens on when it is not unspecified: a connection from it
    /// comes from this host.
    pub listen_ip: Option<IpAddr>,
    /// Where misses go (home peer or upstream); None: a miss is 404.
    pub mesh: Option<Arc<Mesh<O, K>>>,
    pub metrics: Option<SharingMetrics>,
    /// Checks the credentials a private pull brings at the registry; None: such pulls are
    /// declined (containerd goes to the registry itself).
    pub checker: Option<Arc<AccessChecker>>,
}

impl PeerOptions<Registry, Discard> {
    /// Serves the store's public content to this host only, with no forwarding.
    pub fn public_only(policy: PublicPolicy) -> Self {
        PeerOptions {
            policy,
            token: None,
            listen_ip: None,
            mesh: None,
            metrics: None,
            checker: None,
        }
    }
}

struct PeerState<S, O: Origin, K: Keeper> {
    source: S,
    opts: PeerOptions<O, K>,
}

/// The peer server's routes over `source`.
pub fn router<S: ContentSource, O: Origin, K: Keeper>(
    source: S,
    opts: PeerOptions<O, K>,
) -> Router {
    Router::new()
        .fallback(handle::<S, O, K>)
        .with_state(Arc::new(PeerState { source, opts }))
}

/// Serves the peer API on `listener` until `shutdown` resolves.
pub async fn serve<S: ContentSource, O: Origin, K: Keeper>(
    listener: tokio::net::TcpListener,
    source: S,
    opts: PeerOptions<O, K>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(
        listener,
        router(source, opts).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

const API_VERSION: &str = "registry/2.0";

impl<S, O: Origin, K: Keeper> PeerState<S, O, K> {
    fn count(&self, caller: Caller, outcome: &str) {
        if let Some(m) = &self.opts.metrics {
            let c = match caller {
                Caller::Local => "local",
                Caller::Peer => "peer",
                Caller::Stranger => "stranger",
            };
            m.requests.with_label_values(&[c, outcome]).inc();
        }
    }
}

async fn handle<S: ContentSource, O: Origin, K: Keeper>(
    State(st): State<Arc<PeerState<S, O, K>>>,
    request: axum::extract::Request,
) -> Response {
    let (mut parts, _) = request.into_parts();
    // Where the connection comes from (also under axum's MockConnectInfo in tests).
    let remote = ConnectInfo::<SocketAddr>::from_request_parts(&mut parts, &())
        .await
        .ok()
        .map(|c| c.0.ip());
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let head = method == Method::HEAD;
    let from_this_host = remote.is_some_and(|ip| ip.is_loopback() || Some(ip) == st.opts.listen_ip);
    let caller = classify_caller(
        st.opts.token.as_ref(),
        headers.get(PEER_TOKEN_HEADER).map(|v| v.as_bytes()),
        from_this_host,
    );
    if caller == Caller::Stranger {
        st.count(caller, "forbidden");
        debug!(
            ?remote,
            path = uri.path(),
            "peer request without a valid token refused"
        );
        return oci_error(
            StatusCode::FORBIDDEN,
            "DENIED",
            "only this node and agents with the cluster's peer token may ask this server",
            head,
        );
    }
    let route = match parse_request(method.as_str(), uri.path(), uri.query()) {
        Ok(r) => r,
        Err(e) => {
            debug!(%method, path = uri.path(), reason = e.metric_label(), "peer request rejected");
            st.count(caller, "not_found");
            return error(&e, head);
        }
    };
    let req = match route {
        Route::ApiVersion => {
            return (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (
                        header::HeaderName::from_static("docker-distribution-api-version"),
                        API_VERSION,
                    ),
                ],
                if head { "" } else { "{}" },
            )
                .into_response();
        }
        Route::Content(c) => c,
    };
    // The checked credentials of a private pull, carried to the home peer's upstream fetch.
    let mut upstream_auth: Option<String> = None;
    if caller == Caller::Local {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let mut facts = AccessFacts {
            registry: req.registry.as_deref(),
            repository: &req.name,
            presented: match authorization {
                Some(_) => Presented::Credentials(UpstreamCheck::Unknown),
                None => Presented::None,
            },
            // Pods' pull secrets are not looked at yet.
            node_pod_may_pull: false,
        };
        // Private content with credentials: the registry says whether they may pull it.
        // (Blobs only: a manifest by digest is served from the store or not at all, so a
        // private one is declined and containerd asks the registry for it.)
        if req.kind == Kind::Blob
            && needs_upstream_check(&facts, &st.opts.policy)
            && let (Some(checker), Some(registry), Some(a)) =
                (&st.opts.checker, req.registry.as_deref(), authorization)
        {
            let check = checker
                .check(registry, &req.name, req.digest.as_str(), a)
                .await;
            facts.presented = Presented::Credentials(check);
        }
        match decide_access(&facts, &st.opts.policy) {
            Access::Serve(ServeReason::Credentials) => {
                upstream_auth = authorization.map(str::to_string);
            }
            Access::Serve(_) => {}
            Access::Challenge { realm } => {
                st.count(caller, "challenged");
                let mut r = oci_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "this peer serves private content only to pulls with credentials",
                    head,
                );
                if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\"")) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return r;
            }
            Access::Decline(reason) => {
                st.count(caller, "declined");
                debug!(digest = %req.digest, reason = reason.metric_label(), "peer request declined");
                return not_found(&req, "not served by this peer", head);
            }
        }
    }
    // A peer's request needs the registry to fetch a miss from.
    if caller == Caller::Peer && req.registry.is_none() {
        st.count(caller, "not_found");
        return not_found(&req, "no ns= parameter: the registry is unknown", head);
    }
    let answer = match serve_content(&st.source, &req, &headers).await {
        Ok(Served::Answer(r)) => {
            let outcome = if r.status().is_success() {
                "store"
            } else {
                "not_found"
            };
            st.count(caller, outcome);
            if r.status().is_success()
                && req.kind == Kind::Blob
                && let Some(m) = &st.opts.metrics
            {
                let label = m.registry_label(req.registry.as_deref().unwrap_or("other"));
                let n = r
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(0);
                if !head {
                    match caller {
                        Caller::Peer => m.served.with_label_values(&[label]).inc_by(n),
                        _ => m.blob_bytes.with_label_values(&[label, "local"]).inc_by(n),
                    }
                }
            }
            return r;
        }
        Ok(Served::Missing) => None,
        Err(e) => Some(e),
    };
    if let Some(e) = answer {
        warn!(digest = %req.digest, error = %e, "reading from containerd failed");
    }
    // Not in the store (or the store failed): blobs go to the mesh.
    let (Some(mesh), Kind::Blob, Some(registry)) =
        (&st.opts.mesh, req.kind, req.registry.as_deref())
    else {
        st.count(caller, "not_found");
        return not_found(&req, "not in this node's content store", head);
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let Some(start) = range_start(range) else {
        st.count(caller, "not_found");
        return not_found(&req, "a suffix range is served from the store only", head);
    };
    let fetched = match caller {
        // Another agent asked: fetch upstream (once), never forward again.
        Caller::Peer => match mesh.flights().join(
            registry,
            &req.name,
            req.digest.as_str(),
            headers
                .get(UPSTREAM_AUTH_HEADER)
                .and_then(|v| v.to_str().ok()),
        ) {
            Ok((flight, _)) => match flight.size().await {
                Ok(size) => Ok(crate::mesh::Fetched {
                    size,
                    source: "upstream",
                    stream: flight.read(start.min(size), 0),
                }),
                Err(e) => Err(crate::mesh::MeshError::Upstream(e)),
            },
            Err(e) => Err(crate::mesh::MeshError::Upstream(e)),
        },
        _ => {
            mesh.fetch(
                registry,
                &req.name,
                req.digest.as_str(),
                start,
                upstream_auth.as_deref(),
            )
            .await
        }
    };
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            st.count(caller, "failed");
            info!(digest = %req.digest, error = %e, "no source for a missed blob; containerd goes to the registry");
            return not_found(&req, "no peer has it and the fetch failed", head);
        }
    };
    st.count(caller, "fetched");
    let size = fetched.size;
    let (status, start, len) = match parse_range(range, size) {
        ByteRange::Full => (StatusCode::OK, 0, size),
        ByteRange::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        ByteRange::Unsatisfiable => {
            return oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "the range starts after the end of the blob",
                head,
            );
        }
    };
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", req.digest.as_str());
    if status == StatusCode::PARTIAL_CONTENT {
        r = r.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    if head {
        return r.body(Body::empty()).unwrap_or_else(|_| internal());
    }
    let served = (caller == Caller::Peer)
        .then(|| st.opts.metrics.clone())
        .flatten()
        .map(|m| m.served.with_label_values(&[m.registry_label(registry)]));
    let mut left = len;
    let body = fetched.stream.map(move |chunk| {
        let mut b = chunk?;
        // A `bytes=N-M` range ends before the blob does.
        b.truncate(usize::try_from(left).unwrap_or(usize::MAX));
        left -= b.len() as u64;
        if let Some(c) = &served {
            c.inc_by(b.len() as u64);
        }
        Ok::<_, io::Error>(axum::body::Bytes::from(b))
    });
    r.body(Body::from_stream(body.take_while({
        let mut sent = 0u64;
        move |c| {
            let go = sent < len;
            if let Ok(b) = c {
                sent += b.len() as u64;
            }
            futures::future::ready(go)
        }
    })))
    .unwrap_or_else(|_| internal())
}

/// What the store had.
enum Served {
    Answer(Response),
    Missing,
}

async fn serve_content<S: ContentSource>(
    source: &S,
    req: &ContentRequest,
    headers: &HeaderMap,
) -> Result<Served, ContainerdError> {
    let digest = req.digest.as_str();
    let Some(size) = source.size(digest).await? else {
        return Ok(Served::Missing);
    };
    let digest_header = HeaderValue::from_str(digest).map_err(|_| ContainerdError::NotFound {
        digest: digest.into(),
    })?;
    match req.kind {
        Kind::Manifest => {
            if size > MAX_METADATA_BLOB {
                return Ok(Served::Answer(not_found(
                    req,
                    "too large to be a manifest",
                    req.head,
                )));
            }
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            let mut s = match source.read(digest, 0, 0).await {
                Ok(s) => s,
                Err(ContainerdError::NotFound { .. }) => return Ok(Served::Missing),
                Err(e) => return Err(e),
            };
            while let Some(chunk) = s.next().await {
                bytes.extend_from_slice(&chunk?);
                if bytes.len() as u64 > size {
                    break;
                }
            }
            if bytes.len() as u64 != size {
                // Changed under us (removed mid-read): better nothing than a wrong body.
                return Ok(Served::Answer(not_found(
                    req,
                    "changed while being read",
                    req.head,
                )));
            }
            let Some(media_type) = manifest_media_type(&bytes) else {
                return Ok(Served::Answer(not_found(
                    req,
                    "not a manifest or an index",
                    req.head,
                )));
            };
            let mut r = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, media_type)
                .header(header::CONTENT_LENGTH, size)
                .header("docker-content-digest", digest_header);
            r = r.header(header::ACCEPT_RANGES, "none");
            let body = if req.head {
                Body::empty()
            } else {
                Body::from(bytes)
            };
            Ok(Served::Answer(r.body(body).unwrap_or_else(|_| internal())))
        }
        Kind::Blob => {
            let range = parse_range(
                headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
                size,
            );
            let (status, start, len) = match range {
                ByteRange::Full => (StatusCode::OK, 0, size),
                ByteRange::Partial { start, end } => {
                    (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
                }
                ByteRange::Unsatisfiable => {
                    let mut r = oci_error(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "RANGE_INVALID",
                        "the range starts after the end of the blob",
                        req.head,
                    );
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                        r.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(Served::Answer(r));
                }
            };
            let mut r = Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .header(header::ACCEPT_RANGES, "bytes")
                .header("docker-content-digest", digest_header);
            if status == StatusCode::PARTIAL_CONTENT {
                r = r.header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{size}", start + len - 1),
                );
            }
            if req.head || len == 0 {
                return Ok(Served::Answer(
                    r.body(Body::empty()).unwrap_or_else(|_| internal()),
                ));
            }
            let stream = match source.read(digest, start, len).await {
                Ok(s) => s,
                Err(ContainerdError::NotFound { .. }) => return Ok(Served::Missing),
                Err(e) => return Err(e),
            };
            // An error mid-stream aborts the response: the client sees fewer bytes than
            // Content-Length promised and retries elsewhere.
            let body = Body::from_stream(
                stream.map(|r| r.map(axum::body::Bytes::from).map_err(io::Error::other)),
            );
            Ok(Served::Answer(r.body(body).unwrap_or_else(|_| internal())))
        }
    }
}

fn not_found(req: &ContentRequest, why: &str, head: bool) -> Response {
    let code = match req.kind {
        Kind::Blob => "BLOB_UNKNOWN",
        Kind::Manifest => "MANIFEST_UNKNOWN",
    };
    oci_error(
        StatusCode::NOT_FOUND,
        code,
        &format!("{} {}: {why}", req.kind.as_str(), req.digest),
        head,
    )
}

fn error(e: &SharingError, head: bool) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = oci_error(status, e.oci_code(), &e.to_string(), head);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    r
}

/// An OCI distribution error answer (no body for HEAD).
fn oci_error(status: StatusCode, code: &str, message: &str, head: bool) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
    let len = body.len();
    let r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len);
    if head {
        return r.body(Body::empty()).unwrap_or_else(|_| internal());
    }
    r.body(Body::from(body)).unwrap_or_else(|_| internal())
}

fn internal() -> Response {
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::{body::to_bytes, extract::connect_info::MockConnectInfo};
    use sha2::{Digest as _, Sha256};
    use tower::ServiceExt;

    use super::*;

    /// An in-memory content store: committed blobs only (as Content.Info/Read see them).
    #[derive(Clone, Default)]
    struct Fake {
        blobs: Arc<BTreeMap<String, Vec<u8>>>,
    }

    impl ContentSource for Fake {
        async fn size(&self, digest: &str) -> Result<Option<u64>, ContainerdError> {
            Ok(self.blobs.get(digest).map(|b| b.len() as u64))
        }

        async fn read(
            &self,
            digest: &str,
            offset: u64,
            len: u64,
        ) -> Result<BoxStream<'static, Result<Vec<u8>, ContainerdError>>, ContainerdError> {
            let b = self
                .blobs
                .get(digest)
                .ok_or_else(|| ContainerdError::NotFound {
                    digest: digest.into(),
                })?;
            let start = offset as usize;
            let end = if len == 0 {
                b.len()
            } else {
                (start + len as usize).min(b.len())
            };
            // In chunks, as containerd sends them.
            let chunks: Vec<Result<Vec<u8>, ContainerdError>> =
                b[start..end].chunks(3).map(|c| Ok(c.to_vec())).collect();
            Ok(futures::stream::iter(chunks).boxed())
        }
    }

    fn digest(bytes: &[u8]) -> String {
        let h = Sha256::digest(bytes);
        format!(
            "sha256:{}",
            h.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:00","size":1},"layers":[]}"#;
    const LAYER: &[u8] = b"0123456789abcdefghij";

    fn peer_app(public: &[&str]) -> (Router, String, String) {
        let mut blobs = BTreeMap::new();
        let (m, l) = (digest(MANIFEST), digest(LAYER));
        blobs.insert(m.clone(), MANIFEST.to_vec());
        blobs.insert(l.clone(), LAYER.to_vec());
        let fake = Fake {
            blobs: Arc::new(blobs),
        };
        (
            router(
                fake,
                PeerOptions::public_only(PublicPolicy::parse(public).unwrap()),
            )
            .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000)))),
            m,
            l,
        )
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec();
        (status, headers, body)
    }

    fn h<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn public_content_is_served_with_its_headers() {
        let (app, m, l) = peer_app(&["r.example/team"]);
        let (s, hd, body) = call(
            &app,
            "GET",
            &format!("/v2/team/app/blobs/{l}?ns=r.example"),
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, LAYER);
        assert_eq!(h(&hd, "content-length"), "20");
        assert_eq!(h(&hd, "docker-content-digest"), l);
        assert_eq!(h(&hd, "content-type"), "application/octet-stream");

        let (s, hd, body) = call(
            &app,
            "HEAD",
            &format!("/v2/team/app/blobs/{l}?ns=r.example"),
            &[],
        )
        .await;
        assert_eq!((s, body.len()), (StatusCode::OK, 0));
        assert_eq!(h(&hd, "content-length"), "20");

        let (s, hd, body) = call(
            &app,
            "GET",
            &format!("/v2/team/app/manifests/{m}?ns=r.example"),
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, MANIFEST);
        assert_eq!(
            h(&hd, "content-type"),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(h(&hd, "docker-content-digest"), m);
        assert_eq!(h(&hd, "content-length"), MANIFEST.len().to_string());
    }

    #[tokio::test]
    async fn ranges_resume_a_blob() {
        let (app, _, l) = peer_app(&["r.example"]);
        let uri = format!("/v2/team/app/blobs/{l}?ns=r.example");
        let (s, hd, body) = call(&app, "GET", &uri, &[("range", "bytes=15-")]).await;
        assert_eq!(
            (s, body.as_slice()),
            (StatusCode::PARTIAL_CONTENT, &b"fghij"[..])
        );
        assert_eq!(h(&hd, "content-range"), "bytes 15-19/20");
        assert_eq!(h(&hd, "content-length"), "5");
        let (s, _, body) = call(&app, "GET", &uri, &[("range", "bytes=2-4")]).await;
        assert_eq!(
            (s, body.as_slice()),
            (StatusCode::PARTIAL_CONTENT, &b"234"[..])
        );
        let (s, hd, _) = call(&app, "GET", &uri, &[("range", "bytes=20-")]).await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h(&hd, "content-range"), "bytes */20");
    }

    #[tokio::test]
    async fn what_is_not_there_or_not_a_manifest_is_404() {
        let (app, _, l) = peer_app(&["r.example"]);
        let missing = format!("sha256:{}", "0".repeat(64));
        for (method, uri) in [
            ("GET", format!("/v2/a/blobs/{missing}?ns=r.example")),
            ("GET", format!("/v2/a/manifests/{missing}?ns=r.example")),
            // A layer asked for as a manifest.
            ("GET", format!("/v2/a/manifests/{l}?ns=r.example")),
            ("GET", "/v2/a/manifests/latest?ns=r.example".into()),
        ] {
            let (s, hd, body) = call(&app, method, &uri, &[]).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(h(&hd, "content-type"), "application/json");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(
                v["errors"][0]["code"]
                    .as_str()
                    .unwrap()
                    .ends_with("_UNKNOWN"),
                "{v}"
            );
        }
    }

    #[tokio::test]
    async fn private_content_is_challenged_then_declined() {
        let (app, _, l) = peer_app(&["r.example/public"]);
        let uri = format!("/v2/private/app/blobs/{l}?ns=r.example");
        let (s1, hd1, body1) = call(&app, "GET", &uri, &[]).await;
        assert_eq!(s1, StatusCode::UNAUTHORIZED);
        assert_eq!(h(&hd1, "www-authenticate"), "Basic realm=\"ragent\"");
        assert!(!body1.windows(5).any(|w| w == b"01234"));
        // With credentials: not checked upstream yet, so declined (containerd goes upstream).
        let (s, _, body) = call(&app, "GET", &uri, &[("authorization", "Basic dTpw")]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(!body.windows(5).any(|w| w == b"01234"));
        // The decision comes before the store is looked at: a digest that is not there gets
        // the same answers, so nobody learns which private content a node holds.
        let missing = format!(
            "/v2/private/app/blobs/sha256:{}?ns=r.example",
            "0".repeat(64)
        );
        let (s2, hd2, body2) = call(&app, "GET", &missing, &[]).await;
        assert_eq!(
            (s2, h(&hd2, "www-authenticate")),
            (s1, h(&hd1, "www-authenticate"))
        );
        assert_eq!(body2, body1);
        let (s3, _, _) = call(&app, "GET", &missing, &[("authorization", "Basic dTpw")]).await;
        assert_eq!(s3, StatusCode::NOT_FOUND);
        // Without ns= no rule applies: declined even for the public repository.
        let (s, _, _) = call(&app, "GET", &format!("/v2/public/app/blobs/{l}"), &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // Nothing is public by default.
        let (app, _, l) = peer_app(&[]);
        let (s, _, _) = call(&app, "GET", &format!("/v2/a/blobs/{l}?ns=r.example"), &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn other_requests_get_their_status() {
        let (app, _, l) = peer_app(&["r.example"]);
        let (s, hd, _) = call(&app, "GET", "/v2/", &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h(&hd, "docker-distribution-api-version"), "registry/2.0");
        let (s, hd, _) = call(&app, "PUT", &format!("/v2/a/blobs/{l}"), &[]).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(h(&hd, "allow"), "GET, HEAD");
        let (s, _, _) = call(&app, "GET", "/v2/A/blobs/sha256:00", &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _, _) = call(&app, "GET", "/v2/_catalog", &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, body) = call(&app, "HEAD", "/v2/_catalog", &[]).await;
        assert_eq!((s, body.len()), (StatusCode::NOT_FOUND, 0));
    }
}
