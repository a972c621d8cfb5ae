//! An OCI distribution registry, through the `oci-client` crate: manifests (with an index
//! resolved to this node's platform) and blobs as streams, resumable from an offset.
//!
//! Each registry host gets its own credentials (from [`Credentials`]); `oci-client` answers the
//! registry's challenge: HTTP basic, or basic to the token service named by a bearer challenge.
use std::{path::PathBuf, sync::Once, time::Duration};

use futures::{Stream, StreamExt, TryStreamExt};
use oci_client::{
    Client, Reference,
    client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    errors::{DigestError, OciDistributionError},
    secrets::RegistryAuth,
};
use sha2::{Digest, Sha256};
use tracing::instrument;

use crate::{
    adapters::containerd::MAX_METADATA_BLOB,
    core::{
        credentials::{Credential, Credentials},
        oci::{self, Descriptor, Manifest, Platform, Target},
    },
};

const ACCEPT: &[&str] = &[
    oci::MEDIA_OCI_MANIFEST,
    oci::MEDIA_DOCKER_MANIFEST,
    oci::MEDIA_OCI_INDEX,
    oci::MEDIA_DOCKER_LIST,
];

/// Default of `--registry-timeout`: how long a registry may stay silent (connecting, or
/// between two reads of an answer) before ragent gives up on it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting never waits longer than this, whatever the timeout.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference:?} is not an image reference: {reason}")]
    Reference { reference: String, reason: String },
    #[error(
        "{what} was not found in the registry ({detail}): check the repository name, the tag or the digest"
    )]
    NotFound { what: String, detail: String },
    #[error(
        "the registry denied {what} (403 Forbidden): check that the repository exists and that this node may pull from it"
    )]
    Denied { what: String },
    #[error(
        "the registry is rate limiting (429) requests for {what}: retry later or lower --concurrency"
    )]
    RateLimited { what: String },
    #[error(
        "the registry failed ({status}) on {what}: it has trouble of its own; retry later, and tell its operators if it persists"
    )]
    Server { what: String, status: u16 },
    #[error(
        "the registry did not answer {what} within {seconds} s: check that it is up and reachable from this node, or raise --registry-timeout"
    )]
    Timeout { what: String, seconds: u64 },
    #[error(
        "registry request for {reference} failed: {reason}{}",
        tls_hint(reason)
    )]
    Request { reference: String, reason: String },
    #[error(
        "the registry sent a manifest for {reference} whose digest is {got}, not {want}: refusing it"
    )]
    DigestMismatch {
        reference: String,
        want: String,
        got: String,
    },
    #[error(
        "the registry sent bytes for {digest} that hash to {got}: refusing them (nothing was committed); the registry or something between it and this node corrupts data"
    )]
    BlobDigest { digest: String, got: String },
    #[error(
        "the connection to the registry broke after {received} of {size} bytes of {digest} ({reason}): run the same prepull again to resume where it stopped"
    )]
    Interrupted {
        digest: String,
        received: u64,
        size: u64,
        reason: String,
    },
    #[error(
        "the manifest of {reference} is {size} bytes, more than the {MAX_METADATA_BLOB} ragent accepts: refusing it (no image manifest is that big; check what the registry serves under this name)"
    )]
    TooLarge { reference: String, size: usize },
    #[error(
        "registry {registry} needs credentials to pull {repository} (401 Unauthorized on {what}): {}",
        needs_credentials_hint(registry, file.as_deref())
    )]
    NeedsCredentials {
        registry: String,
        repository: String,
        /// The reference or blob that was refused.
        what: String,
        /// The auth file given, which has no entry for this registry.
        file: Option<PathBuf>,
    },
    #[error(
        "registry {registry} refused the credentials for {repository} (401 Unauthorized on \
         {what}): check the entry for {registry} in {}", file.display()
    )]
    CredentialsRefused {
        registry: String,
        repository: String,
        what: String,
        file: PathBuf,
    },
    #[error(
        "the entry for {registry} in {} is an identity token (OAuth refresh token), which ragent \
         cannot use yet: give a username and password (or \"auth\") for {registry} instead",
        file.display()
    )]
    UnsupportedCredential { registry: String, file: PathBuf },
    #[error(
        "the registry's manifest for {reference} is unusable: {error}; look at it with `skopeo inspect --raw docker://{reference}`"
    )]
    Manifest {
        reference: String,
        error: oci::OciError,
    },
    #[error(transparent)]
    Oci(#[from] oci::OciError),
}

/// What to do about a 401 without credentials for the registry.
fn needs_credentials_hint(registry: &str, file: Option<&std::path::Path>) -> String {
    match file {
        Some(f) => format!(
            "{} has no entry for {registry}; add one (\"auths\": {{\"{registry}\": ...}})",
            f.display()
        ),
        None => format!(
            "pass --auth FILE, a docker config.json or kubernetes.io/dockerconfigjson secret with \
             an entry for {registry}"
        ),
    }
}

/// A plain-HTTP registry reached over HTTPS fails with a transport error: say what to do.
fn tls_hint(reason: &str) -> &'static str {
    if reason.contains("https://") && reason.contains("error sending request") {
        "; if this registry speaks plain HTTP, pass --insecure-registry HOST:PORT"
    } else {
        ""
    }
}

impl RegistryError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            RegistryError::Reference { .. } => "reference",
            RegistryError::NotFound { .. } => "not_found",
            RegistryError::Denied { .. } => "denied",
            RegistryError::RateLimited { .. } => "rate_limited",
            RegistryError::Server { .. } => "server",
            RegistryError::Timeout { .. } => "timeout",
            RegistryError::Request { .. } => "request",
            RegistryError::DigestMismatch { .. } | RegistryError::BlobDigest { .. } => "digest",
            RegistryError::Interrupted { .. } => "interrupted",
            RegistryError::TooLarge { .. } => "too_large",
            RegistryError::NeedsCredentials { .. } => "auth_required",
            RegistryError::CredentialsRefused { .. } => "auth_refused",
            RegistryError::UnsupportedCredential { .. } => "auth_unsupported",
            RegistryError::Manifest {
                error: oci::OciError::UnsupportedMediaType { .. },
                ..
            } => "media_type",
            RegistryError::Manifest { .. } | RegistryError::Oci(_) => "manifest",
        }
    }

    /// What a failed request means for the user, from the client's error: the status the
    /// registry answered (or the OCI error code in its body), a timeout, or a transport error.
    /// `unauthorized` says what a 401 means (credentials missing or refused: the caller knows).
    fn from_client(
        what: String,
        e: OciDistributionError,
        timeout: Duration,
        unauthorized: &dyn Fn() -> RegistryError,
    ) -> RegistryError {
        use oci_client::errors::OciErrorCode as C;
        let by_status = |what: String, status: u16, detail: String| match status {
            401 => Some(unauthorized()),
            403 => Some(RegistryError::Denied { what }),
            404 => Some(RegistryError::NotFound { what, detail }),
            429 => Some(RegistryError::RateLimited { what }),
            500..=599 => Some(RegistryError::Server { what, status }),
            _ => None,
        };
        let classified = match &e {
            OciDistributionError::UnauthorizedError { .. } => Some(unauthorized()),
            OciDistributionError::ImageManifestNotFoundError(m) => Some(RegistryError::NotFound {
                what: what.clone(),
                detail: m.clone(),
            }),
            OciDistributionError::ServerError { code, message, .. } => {
                by_status(what.clone(), *code, message.trim().to_string())
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.first().and_then(|first| {
                    let detail = first.message.clone();
                    let status = match &first.code {
                        C::Unauthorized => 401,
                        C::Denied => 403,
                        C::Toomanyrequests => 429,
                        C::BlobUnknown
                        | C::ManifestUnknown
                        | C::ManifestBlobUnknown
                        | C::NameUnknown
                        | C::NotFound => 404,
                        _ => return None,
                    };
                    by_status(what.clone(), status, detail)
                })
            }
            OciDistributionError::RequestError(r) if r.status().is_some() => r
                .status()
                .and_then(|st| by_status(what.clone(), st.as_u16(), r.to_string())),
            _ if is_timeout(&e) => Some(RegistryError::Timeout {
                what: what.clone(),
                seconds: timeout.as_secs(),
            }),
            _ => None,
        };
        classified.unwrap_or_else(|| RegistryError::Request {
            reference: what,
            reason: e.to_string(),
        })
    }
}

/// Whether an error (or one of its causes) is a timeout of the HTTP client. Transparent
/// wrappers (oci-client's `RequestError`, `io::Error::other`) hide the reqwest error from
/// `source()`, so those are opened explicitly.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if let Some(r) = x.downcast_ref::<reqwest::Error>()
            && r.is_timeout()
        {
            return true;
        }
        if let Some(OciDistributionError::RequestError(r)) =
            x.downcast_ref::<OciDistributionError>()
            && r.is_timeout()
        {
            return true;
        }
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
            if let Some(inner) = io.get_ref()
                && is_timeout(inner)
            {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

/// An image reference resolved to the manifest for this node.
#[derive(Debug, Clone)]
pub struct ResolvedRef {
    /// The name the image record gets (normalized: registry/repository:tag).
    pub name: String,
    pub manifest: Manifest,
    pub manifest_desc: Descriptor,
    pub manifest_bytes: Vec<u8>,
}

/// A registry client for the given insecure (plain HTTP) hosts and credentials.
pub struct Registry {
    /// For registries reached over TLS (built when first needed).
    tls: tokio::sync::OnceCell<Client>,
    /// For the registries named insecure (plain HTTP).
    plain: tokio::sync::OnceCell<Client>,
    insecure: Vec<String>,
    /// Nanoseconds spent building HTTP clients (once each per process; reported by
    /// `ragent rebase --json` so a one-off cost is told apart from the rebase's own).
    client_init_ns: std::sync::atomic::AtomicU64,
    credentials: Credentials,
    platform: Platform,
    timeout: Duration,
}

static TLS_PROVIDER: Once = Once::new();

/// Installs ring as rustls' crypto provider for the process (once; later calls do nothing).
/// Every TLS client of the agent — registries and the Kubernetes API — uses it.
pub fn install_tls_provider() {
    TLS_PROVIDER.call_once(|| {
        // Fails only if another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The only root the plain-HTTP client trusts: a self-signed certificate whose private key was
/// thrown away when it was made, so no server can present a chain to it. It exists because the
/// HTTP library loads the system's roots unless it is given roots of its own.
const NO_TLS_ROOTS: &str = include_str!("no-tls-roots.pem");

fn parse(reference: &str) -> Result<Reference, RegistryError> {
    if let Some(r) = parse_plain(reference) {
        return Ok(r);
    }
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::Reference {
            reference: reference.into(),
            reason: e.to_string(),
        })
}

/// A reference with an explicit registry host, a tag and/or a sha256 digest, and nothing
/// unusual in its path, parsed by hand. Everything else goes to oci-spec's reference regex,
/// whose first use compiles it: ~100 ms, most of a short `ragent rebase`. None: not sure,
/// let the regex decide.
fn parse_plain(reference: &str) -> Option<Reference> {
    if reference.len() > 255 {
        return None;
    }
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => {
            let hex = d.strip_prefix("sha256:")?;
            let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !ok {
                return None;
            }
            (n, Some(d.to_string()))
        }
        None => (reference, None::<String>),
    };
    let (host, rest) = name.split_once('/')?;
    let (hostname, port) = match host.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    };
    let host_ok = !hostname.is_empty()
        && (hostname.contains('.') || port.is_some() || hostname == "localhost")
        && hostname
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    if !host_ok {
        return None;
    }
    let (repository, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| {
                x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-')
            })
            && !b.windows(2).any(|w| {
                let sep = |x: u8| matches!(x, b'.' | b'_' | b'-');
                sep(w[0]) && sep(w[1]) && w != b"__" && w != b"--"
            })
            && !c.contains("___")
    };
    if !repository.split('/').all(component_ok) {
        return None;
    }
    let tag_ok = |t: &str| {
        let b = t.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
    };
    let (registry, repository) = (host.to_string(), repository.to_string());
    match (tag, digest) {
        (Some(t), Some(d)) if tag_ok(t) => Some(Reference::with_tag_and_digest(
            registry,
            repository,
            t.to_string(),
            d,
        )),
        (Some(t), None) if tag_ok(t) => {
            Some(Reference::with_tag(registry, repository, t.to_string()))
        }
        (None, Some(d)) => Some(Reference::with_digest(registry, repository, d)),
        _ => None,
    }
}

/// The name containerd and CRI use for a reference: `docker.io/library/x:latest` style.
pub fn normalize(reference: &str) -> Result<String, RegistryError> {
    let r = parse(reference)?;
    Ok(match (r.tag(), r.digest()) {
        (Some(t), _) => format!("{}/{}:{t}", r.registry(), r.repository()),
        (None, Some(d)) => format!("{}/{}@{d}", r.registry(), r.repository()),
        (None, None) => format!("{}/{}:latest", r.registry(), r.repository()),
    })
}

impl Registry {
    /// `insecure`: registries (host[:port]) reached over plain HTTP; every other one uses TLS
    /// (so credentials cross plain HTTP only to a registry named here).
    /// `credentials`: per registry host; a host without an entry is asked anonymously.
    pub fn new(insecure: &[String], credentials: Credentials) -> Registry {
        Registry::with_timeout(insecure, credentials, DEFAULT_TIMEOUT)
    }

    /// Like [`Registry::new`]; a registry silent for `timeout` (connecting, or between two
    /// reads of an answer) fails the request with [`RegistryError::Timeout`].
    pub fn with_timeout(
        insecure: &[String],
        credentials: Credentials,
        timeout: Duration,
    ) -> Registry {
        install_tls_provider();
        Registry {
            tls: tokio::sync::OnceCell::new(),
            plain: tokio::sync::OnceCell::new(),
            insecure: insecure.to_vec(),
            client_init_ns: std::sync::atomic::AtomicU64::new(0),
            credentials,
            platform: Platform::this_node(),
            timeout,
        }
    }

    fn config(&self, protocol: ClientProtocol) -> ClientConfig {
        ClientConfig {
            protocol,
            connect_timeout: Some(self.timeout.min(CONNECT_TIMEOUT_MAX)),
            read_timeout: Some(self.timeout),
            ..Default::default()
        }
    }

    /// The HTTP client for the registry of `r`. Registries named insecure get a plain-HTTP
    /// client that trusts no TLS root (building one with the system's roots loads and parses
    /// every certificate in /etc/ssl/certs, ~125 ms on this machine: most of a local rebase);
    /// the others share a TLS client, built once on a blocking thread when first needed.
    async fn client(&self, r: &Reference) -> &Client {
        if self.insecure.iter().any(|h| h == r.resolve_registry()) {
            return self
                .plain
                .get_or_init(|| async {
                    let t0 = std::time::Instant::now();
                    let mut config = self.config(ClientProtocol::Http);
                    config.tls_certs_only = vec![Certificate {
                        encoding: CertificateEncoding::Pem,
                        data: NO_TLS_ROOTS.as_bytes().to_vec(),
                    }];
                    let c = Client::new(config);
                    self.count_init(t0);
                    c
                })
                .await;
        }
        self.tls
            .get_or_init(|| async {
                let t0 = std::time::Instant::now();
                let protocol = || ClientProtocol::HttpsExcept(self.insecure.clone());
                let config = self.config(protocol());
                let c = match tokio::task::spawn_blocking(move || Client::new(config)).await {
                    Ok(c) => c,
                    // The blocking pool is gone (runtime shutting down): build it here.
                    Err(_) => Client::new(self.config(protocol())),
                };
                self.count_init(t0);
                c
            })
            .await
    }

    fn count_init(&self, t0: std::time::Instant) {
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.client_init_ns
            .fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time spent building this registry's HTTP clients so far. oci-client 0.18 builds a
    /// default HTTP client inside every client it makes, and that one loads and parses every
    /// root certificate of the system (~90 ms on this machine), whatever the config says.
    pub fn client_init_time(&self) -> Duration {
        Duration::from_nanos(
            self.client_init_ns
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// What to present to the registry of `r`.
    fn auth_for(&self, r: &Reference) -> Result<RegistryAuth, RegistryError> {
        let file = || self.credentials.source.clone().unwrap_or_default();
        Ok(match self.credentials.for_host(r.registry()) {
            None => RegistryAuth::Anonymous,
            Some(Credential::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credential::RegistryToken { token }) => RegistryAuth::Bearer(token.clone()),
            Some(Credential::IdentityToken { .. }) => {
                return Err(RegistryError::UnsupportedCredential {
                    registry: r.registry().into(),
                    file: file(),
                });
            }
        })
    }

    /// An `oci-client` error as ours: a 401 says whether credentials were missing or refused.
    fn request_error(&self, r: &Reference, what: String, e: OciDistributionError) -> RegistryError {
        let refused = what.clone();
        RegistryError::from_client(what, e, self.timeout, &|| {
            self.unauthorized(r, refused.clone())
        })
    }

    /// A 401 from the registry of `r`: were credentials missing, or refused?
    fn unauthorized(&self, r: &Reference, what: String) -> RegistryError {
        let (registry, repository) = (r.registry().to_string(), r.repository().to_string());
        match (
            self.credentials.for_host(&registry),
            &self.credentials.source,
        ) {
            (Some(_), Some(file)) => RegistryError::CredentialsRefused {
                registry,
                repository,
                what,
                file: file.clone(),
            },
            (None, file) => RegistryError::NeedsCredentials {
                registry,
                repository,
                what,
                file: file.clone(),
            },
            (Some(_), None) => RegistryError::NeedsCredentials {
                registry,
                repository,
                what,
                file: None,
            },
        }
    }

    async fn manifest_raw(
        &self,
        r: &Reference,
        want: Option<&str>,
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let auth = self.auth_for(r)?;
        let (bytes, digest) = self
            .client(r)
            .await
            .pull_manifest_raw(r, &auth, ACCEPT)
            .await
            .map_err(|e| self.request_error(r, r.whole(), e))?;
        if bytes.len() as u64 > MAX_METADATA_BLOB {
            return Err(RegistryError::TooLarge {
                reference: r.whole(),
                size: bytes.len(),
            });
        }
        // Never trust a header: the digest is what the bytes hash to.
        let got = format!("sha256:{:x}", Sha256::digest(&bytes));
        if let Some(want) = want.or(r.digest())
            && want != got
        {
            return Err(RegistryError::DigestMismatch {
                reference: r.whole(),
                want: want.into(),
                got,
            });
        }
        let _ = digest;
        Ok((bytes.to_vec(), got))
    }

    /// Resolves a reference to this node's platform manifest.
    #[instrument(level = "debug", skip(self))]
    pub async fn resolve(&self, reference: &str) -> Result<ResolvedRef, RegistryError> {
        let r = parse(reference)?;
        let (bytes, digest) = self.manifest_raw(&r, None).await?;
        let media_type = media_type_of(&bytes);
        let unusable = |error| RegistryError::Manifest {
            reference: reference.to_string(),
            error,
        };
        let (manifest_bytes, manifest_digest, media_type) =
            match oci::parse_target(&media_type, &digest, &bytes).map_err(unusable)? {
                Target::Manifest(_) => (bytes, digest, media_type),
                Target::Index(index) => {
                    let d = oci::choose_platform(&digest, &index, &self.platform)?.clone();
                    // (NoPlatform already says what to do.)
                    let by_digest =
                        parse(&format!("{}/{}@{}", r.registry(), r.repository(), d.digest))?;
                    let (mb, md) = self.manifest_raw(&by_digest, Some(&d.digest)).await?;
                    let mt = media_type_of(&mb);
                    (mb, md, mt)
                }
            };
        let manifest = oci::parse_manifest(&manifest_digest, &manifest_bytes).map_err(unusable)?;
        Ok(ResolvedRef {
            name: normalize(reference)?,
            manifest,
            manifest_desc: Descriptor {
                media_type: if media_type.is_empty() {
                    oci::MEDIA_OCI_MANIFEST.into()
                } else {
                    media_type
                },
                digest: manifest_digest,
                size: manifest_bytes.len() as u64,
                platform: None,
                annotations: Default::default(),
            },
            manifest_bytes,
        })
    }

    /// The bytes of a blob of `size` bytes from `offset` on (a Range request when resuming).
    /// A failure of the body is an `io::Error` wrapping the [`RegistryError`] that explains
    /// it; bytes that do not hash to `digest` fail with kind `InvalidData` (discard them).
    pub async fn blob(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, std::io::Error>> + use<>, RegistryError> {
        Ok(self.sized_blob(reference, digest, size, offset).await?.1)
    }

    /// A registry like this one (same plain-HTTP list and timeout) that presents `credentials`.
    pub fn with_credentials(&self, credentials: Credentials) -> Registry {
        Registry::with_timeout(&self.insecure, credentials, self.timeout)
    }

    /// Whether this registry's credentials may pull `digest` of `reference`'s repository: a
    /// GET of its first byte (`Range: bytes=0-0`); the answer counts, not the byte.
    pub async fn can_pull(&self, reference: &str, digest: &str) -> Result<(), RegistryError> {
        let r = parse(reference)?;
        let what = format!("{}@{digest}", r.whole());
        let auth = self.auth_for(&r)?;
        let client = self.client(&r).await;
        client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        client
            .pull_blob_stream_partial(&r, digest, 0, Some(1))
            .await
            .map_err(|e| self.request_error(&r, what, e))?;
        Ok(())
    }

    /// [`Registry::blob`], with the length of the answer the registry announced (the bytes from
    /// `offset` on), when it did.
    pub async fn sized_blob(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        offset: u64,
    ) -> Result<
        (
            Option<u64>,
            impl Stream<Item = Result<Vec<u8>, std::io::Error>> + use<>,
        ),
        RegistryError,
    > {
        let r = parse(reference)?;
        let what = format!("{}@{digest}", r.whole());
        let timeout = self.timeout;
        let err = |e: OciDistributionError| self.request_error(&r, what.clone(), e);
        // The registry's credentials (anonymous without an entry) before the first blob
        // request: a blob may be fetched before any manifest of its registry.
        let auth = self.auth_for(&r)?;
        let client = self.client(&r).await;
        client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        let mut skip = 0;
        let sized = if offset == 0 {
            client.pull_blob_stream(&r, digest).await.map_err(err)?
        } else {
            match client
                .pull_blob_stream_partial(&r, digest, offset, None)
                .await
                .map_err(err)?
            {
                BlobResponse::Partial(s) => s,
                // The registry ignored the range: skip what containerd already has.
                BlobResponse::Full(s) => {
                    skip = offset;
                    s
                }
            }
        };
        let announced = sized.content_length.map(|n| n.saturating_sub(skip));
        let digest = digest.to_string();
        let stream = sized
            .stream
            .map_ok(move |chunk| {
                let n = (skip.min(chunk.len() as u64)) as usize;
                skip -= n as u64;
                chunk[n..].to_vec()
            })
            .scan(offset, move |seen, item| {
                let item = match item {
                    Ok(b) => {
                        *seen += b.len() as u64;
                        Ok(b)
                    }
                    Err(e) => Err(body_error(&digest, *seen, size, timeout, e)),
                };
                futures::future::ready(Some(item))
            })
            .boxed();
        Ok((announced, stream))
    }
}

/// Explains a failure while a blob's body streams in.
fn body_error(
    digest: &str,
    received: u64,
    size: u64,
    timeout: Duration,
    e: std::io::Error,
) -> std::io::Error {
    use std::io::{Error, ErrorKind};
    if let Some(DigestError::VerificationError { actual, .. }) =
        e.get_ref().and_then(|i| i.downcast_ref::<DigestError>())
    {
        return Error::new(
            ErrorKind::InvalidData,
            RegistryError::BlobDigest {
                digest: digest.into(),
                got: actual.clone(),
            },
        );
    }
    if is_timeout(&e) {
        return Error::new(
            ErrorKind::TimedOut,
            RegistryError::Timeout {
                what: format!("the rest of {digest} (after {received} bytes)"),
                seconds: timeout.as_secs(),
            },
        );
    }
    let mut reason = e.to_string();
    let mut cur = e.get_ref().and_then(|i| i.source());
    while let Some(c) = cur {
        reason = format!("{reason}: {c}");
        cur = c.source();
    }
    Error::other(RegistryError::Interrupted {
        digest: digest.into(),
        received,
        size,
        reason,
    })
}

/// The mediaType field of a manifest or index document (empty when absent).
fn media_type_of(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<M>(bytes) {
        Ok(m) if !m.media_type.is_empty() => m.media_type,
        // An OCI document without mediaType: an index has `manifests`.
        Ok(m) if m.manifests.is_some() => oci::MEDIA_OCI_INDEX.into(),
        _ => oci::MEDIA_OCI_MANIFEST.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_references_parse_as_the_regex_parses_them() {
        let hex = "a".repeat(64);
        for r in [
            "127.0.0.1:5000/ragent/run:v2".to_string(),
            "registry.example.com/team/api:v3".to_string(),
            "localhost:5000/a/b/c:1.0-rc_1".to_string(),
            format!("ghcr.io/org/app@sha256:{hex}"),
            format!("ghcr.io/org/app:v1@sha256:{hex}"),
            "quay.io/my_org/my-app__x.y:latest".to_string(),
        ] {
            let fast = parse_plain(&r).unwrap_or_else(|| panic!("{r} is plain"));
            let slow: Reference = r.parse().unwrap();
            assert_eq!(
                (
                    fast.registry(),
                    fast.repository(),
                    fast.tag(),
                    fast.digest()
                ),
                (
                    slow.registry(),
                    slow.repository(),
                    slow.tag(),
                    slow.digest()
                ),
                "{r}"
            );
        }
        // Left to the regex: no registry host, no tag, odd characters, a short digest.
        for r in [
            "ubuntu:22.04",
            "library/ubuntu:22.04",
            "127.0.0.1:5000/ragent/run",
            "127.0.0.1:5000/Ragent/run:v1",
            "127.0.0.1:5000/ragent/run:-v1",
            "127.0.0.1:5000/ragent/run@sha256:abc",
            "127.0.0.1:5000/ragent//run:v1",
            "127.0.0.1:5000/ragent/a..b:v1",
        ] {
            assert!(parse_plain(r).is_none(), "{r}");
        }
    }

    #[test]
    fn references_are_normalized_like_containerd() {
        assert_eq!(
            normalize("127.0.0.1:5000/ragent/app:v1").unwrap(),
            "127.0.0.1:5000/ragent/app:v1"
        );
        assert_eq!(
            normalize("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalize("ghcr.io/x/y").unwrap(), "ghcr.io/x/y:latest");
        assert!(normalize("not a reference").is_err());
        assert!(normalize("reg/repo:bad tag!").is_err());
    }

    fn server(code: u16, message: &str) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "http://r/v2/x/manifests/v1".into(),
            message: message.into(),
        }
    }

    fn envelope(code: &str) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: serde_json::from_str(&format!(
                r#"{{"errors":[{{"code":"{code}","message":"said the registry"}}]}}"#
            ))
            .unwrap(),
            url: "http://r/v2/x/blobs/sha256:00".into(),
        }
    }

    #[test]
    fn statuses_become_errors_that_say_what_to_do() {
        let t = Duration::from_secs(7);
        let creds = || RegistryError::NeedsCredentials {
            registry: "r".into(),
            repository: "x".into(),
            what: "r/x:v1".into(),
            file: None,
        };
        let e = |err| RegistryError::from_client("r/x:v1".into(), err, t, &creds);
        let rate = e(server(429, ""));
        assert_eq!(rate.metric_label(), "rate_limited");
        assert!(
            rate.to_string().contains(
                "rate limiting (429) requests for r/x:v1: retry later or lower --concurrency"
            ),
            "{rate}"
        );
        assert_eq!(
            e(envelope("TOOMANYREQUESTS")).metric_label(),
            "rate_limited"
        );
        let nf = e(envelope("MANIFEST_UNKNOWN"));
        assert_eq!(nf.metric_label(), "not_found");
        assert!(
            nf.to_string()
                .starts_with("r/x:v1 was not found in the registry (said the registry)"),
            "{nf}"
        );
        assert_eq!(e(server(404, "gone")).metric_label(), "not_found");
        assert_eq!(e(envelope("BLOB_UNKNOWN")).metric_label(), "not_found");
        assert_eq!(e(server(401, "")).metric_label(), "auth_required");
        assert_eq!(
            e(OciDistributionError::UnauthorizedError { url: "u".into() }).metric_label(),
            "auth_required"
        );
        assert_eq!(e(envelope("DENIED")).metric_label(), "denied");
        assert_eq!(e(server(403, "")).metric_label(), "denied");
        let s = e(server(503, "down"));
        assert_eq!(s.metric_label(), "server");
        assert!(s.to_string().contains("failed (503) on r/x:v1"), "{s}");
        // Anything else keeps the client's words.
        let other = e(server(418, "teapot"));
        assert_eq!(other.metric_label(), "request");
        assert!(other.to_string().contains("teapot"), "{other}");
    }

    #[test]
    fn a_wrong_digest_in_a_body_is_invalid_data_and_a_break_is_not() {
        let t = Duration::from_secs(7);
        let bad = std::io::Error::other(DigestError::VerificationError {
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
        });
        let e = body_error("sha256:aa", 10, 20, t, bad);
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("hash to sha256:bb"), "{e}");
        let broke = body_error("sha256:aa", 10, 20, t, std::io::Error::other("reset"));
        assert_ne!(broke.kind(), std::io::ErrorKind::InvalidData);
        assert!(
            broke
                .to_string()
                .contains("broke after 10 of 20 bytes of sha256:aa (reset)"),
            "{broke}"
        );
        let slow = body_error(
            "sha256:aa",
            10,
            20,
            t,
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        );
        assert!(slow.to_string().contains("within 7 s"), "{slow}");
    }

    #[test]
    fn a_401_says_whether_credentials_were_missing_or_refused() {
        use oci_client::errors::OciDistributionError as E;
        let r = parse("127.0.0.1:5000/ragent/run:v1").unwrap();
        let unauthorized = || E::UnauthorizedError {
            url: "http://127.0.0.1:5000/v2/ragent/run/manifests/v1".into(),
        };
        let anonymous = Registry::new(&[], Credentials::anonymous());
        let e = anonymous.request_error(&r, r.whole(), unauthorized());
        assert_eq!(e.metric_label(), "auth_required");
        assert!(e.to_string().contains("pass --auth FILE"), "{e}");

        let creds = Credentials::parse(
            "/etc/auth.json",
            r#"{"auths":{"127.0.0.1:5000":{"username":"u","password":"p"},"ghcr.io":{"identitytoken":"t"}}}"#,
        )
        .unwrap();
        let with = Registry::new(&[], creds);
        let e = with.request_error(&r, r.whole(), unauthorized());
        assert_eq!(e.metric_label(), "auth_refused");
        assert!(
            e.to_string()
                .contains("refused the credentials for ragent/run")
                && e.to_string().contains("/etc/auth.json"),
            "{e}"
        );
        // An auth file without an entry for the registry says so.
        let other = Registry::new(
            &[],
            Credentials::parse(
                "/etc/other.json",
                r#"{"auths":{"ghcr.io":{"auth":"dTpw"}}}"#,
            )
            .unwrap(),
        );
        let e = other.request_error(&r, r.whole(), unauthorized());
        assert_eq!(e.metric_label(), "auth_required");
        assert!(
            e.to_string()
                .contains("/etc/other.json has no entry for 127.0.0.1:5000"),
            "{e}"
        );
        // Other errors stay request errors.
        let e = with.request_error(&r, r.whole(), E::GenericError(None));
        assert_eq!(e.metric_label(), "request");
        assert!(matches!(
            with.auth_for(&r),
            Ok(RegistryAuth::Basic(u, p)) if u == "u" && p == "p"
        ));
        let ghcr = parse("ghcr.io/x/y:1").unwrap();
        assert_eq!(
            with.auth_for(&ghcr).unwrap_err().metric_label(),
            "auth_unsupported"
        );
        assert!(matches!(
            with.auth_for(&parse("quay.io/x/y").unwrap()),
            Ok(RegistryAuth::Anonymous)
        ));
    }

    #[test]
    fn media_type_falls_back_on_the_shape() {
        assert_eq!(media_type_of(br#"{"manifests":[]}"#), oci::MEDIA_OCI_INDEX);
        assert_eq!(media_type_of(br#"{"config":{}}"#), oci::MEDIA_OCI_MANIFEST);
        assert_eq!(
            media_type_of(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            oci::MEDIA_DOCKER_MANIFEST
        );
    }
}
