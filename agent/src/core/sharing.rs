//! Cluster-wide layer sharing, the pure part (issue 8; design in docs/sharing.md).
//!
//! - [`home_peers`]: which agents a digest belongs to (rendezvous hashing over ready peers,
//!   optionally restricted to the requester's zone).
//! - [`decide_access`]: whether the local mirror serves a blob or manifest, challenges for the
//!   pull's credentials, or declines so containerd goes to the registry (default deny).
//! - [`parse_request`]: the OCI distribution paths the peer server accepts (by digest only)
//!   and the status for everything else.
//! - [`render_hosts_toml`] / [`recognise_hosts_toml`]: containerd's
//!   `certs.d/<registry>/hosts.toml` with the local agent as a pull-only mirror in front of the
//!   registry, and how ragent tells the files it wrote from everybody else's.
//!
//! Nothing here does I/O; the adapters (`adapters/certsd.rs`, `peer.rs`) gather the facts and
//! carry out the decisions.
use std::fmt;

use sha2::{Digest as _, Sha256};

/// Everything in this module that can be wrong with its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharingError {
    #[error("{method} is not allowed: the peer server is read-only and answers only GET and HEAD")]
    MethodNotAllowed { method: String },
    #[error(
        "{path} is not served here: the peer server answers GET/HEAD /v2/<name>/blobs/<digest> \
         and /v2/<name>/manifests/<digest> only"
    )]
    UnknownPath { path: String },
    #[error("repository name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("digest {digest:?} is invalid: {reason}")]
    InvalidDigest {
        digest: String,
        reason: &'static str,
    },
    #[error(
        "{reference:?} is a tag: peers serve manifests by digest only, so containerd resolves \
         tags at the registry"
    )]
    TagNotServed { reference: String },
    #[error("digest algorithm {algorithm:?} is not stored here (only sha256 and sha512)")]
    UnsupportedAlgorithm { algorithm: String },
    #[error(
        "registry {registry:?} in [sharing] registries is invalid: {reason}; write a host name \
         with an optional port, e.g. docker.io or registry.example.com:5000"
    )]
    InvalidRegistry {
        registry: String,
        reason: &'static str,
    },
    #[error(
        "entry {entry:?} in [sharing] public is invalid: {reason}; write a registry host with an \
         optional repository prefix, e.g. docker.io/library or registry.example.com:5000"
    )]
    InvalidPublic { entry: String, reason: String },
    #[error(
        "the hosts.toml ragent found for {registry} is not valid TOML ({reason}); containerd \
         cannot use it either: fix or remove it, then restart the agent"
    )]
    HostsTomlInvalid { registry: String, reason: String },
    #[error(
        "cannot add the mirror to the hosts.toml of {registry} without changing what it says \
         ({reason}); move the file away (ragent then writes its own) or leave {registry} out of \
         [sharing] registries"
    )]
    HostsTomlMerge { registry: String, reason: String },
    #[error(
        "peer {id:?} in [sharing] peers is invalid: {reason}; write id = \"<node name>\" and \
         addr = \"<ip>:<port>\" of its peer server"
    )]
    InvalidPeer { id: String, reason: String },
    #[error("the peer token is unusable: {reason}")]
    InvalidToken { reason: &'static str },
    #[error("{name:?} is not a Service name: {reason}")]
    InvalidServiceName { name: String, reason: &'static str },
}

impl SharingError {
    /// The HTTP status the peer server answers with.
    pub fn status(&self) -> u16 {
        match self {
            SharingError::MethodNotAllowed { .. } => 405,
            SharingError::InvalidName { .. } | SharingError::InvalidDigest { .. } => 400,
            // Not here: containerd tries the next host (the registry).
            SharingError::UnknownPath { .. }
            | SharingError::TagNotServed { .. }
            | SharingError::UnsupportedAlgorithm { .. } => 404,
            SharingError::InvalidRegistry { .. }
            | SharingError::InvalidPublic { .. }
            | SharingError::HostsTomlInvalid { .. }
            | SharingError::HostsTomlMerge { .. }
            | SharingError::InvalidPeer { .. }
            | SharingError::InvalidToken { .. }
            | SharingError::InvalidServiceName { .. } => 500,
        }
    }

    /// The OCI distribution error code for the body of an error answer.
    pub fn oci_code(&self) -> &'static str {
        match self {
            SharingError::MethodNotAllowed { .. } => "UNSUPPORTED",
            SharingError::InvalidName { .. } => "NAME_INVALID",
            SharingError::InvalidDigest { .. } => "DIGEST_INVALID",
            SharingError::TagNotServed { .. } => "MANIFEST_UNKNOWN",
            SharingError::UnsupportedAlgorithm { .. } => "BLOB_UNKNOWN",
            _ => "NAME_UNKNOWN",
        }
    }

    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SharingError::MethodNotAllowed { .. } => "method",
            SharingError::UnknownPath { .. } => "unknown_path",
            SharingError::InvalidName { .. } => "invalid_name",
            SharingError::InvalidDigest { .. } => "invalid_digest",
            SharingError::TagNotServed { .. } => "tag",
            SharingError::UnsupportedAlgorithm { .. } => "algorithm",
            SharingError::InvalidRegistry { .. } => "invalid_registry",
            SharingError::InvalidPublic { .. } => "invalid_public",
            SharingError::HostsTomlInvalid { .. } => "hosts_toml_invalid",
            SharingError::HostsTomlMerge { .. } => "hosts_toml_merge",
            SharingError::InvalidPeer { .. } => "invalid_peer",
            SharingError::InvalidToken { .. } => "invalid_token",
            SharingError::InvalidServiceName { .. } => "invalid_service",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Home peers: rendezvous (highest-random-weight) hashing.

/// One agent that may serve and fetch layers for others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Stable and unique in the cluster (the node name).
    pub id: String,
    /// Where its peer server listens (`ip:port`).
    pub addr: String,
    /// Its topology zone, if known.
    pub zone: Option<String>,
    /// Only ready peers are given digests (an EndpointSlice endpoint's `ready`).
    pub ready: bool,
}

/// A peer's weight for a digest: the first 8 bytes of sha256(digest, 0, peer id).
fn score(digest: &str, peer_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(digest.as_bytes());
    // A separator, so ("ab", "c") and ("a", "bc") weigh differently.
    h.update([0u8]);
    h.update(peer_id.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// The peers responsible for `digest`, best first: ready peers ordered by their rendezvous
/// score for the digest (ties, which need a sha256 collision in 64 bits, by id). With `zone`,
/// only the ready peers of that zone, or every ready peer when that zone has none.
///
/// The first is the digest's home peer (the one that fetches it upstream); the rest are the
/// order to fall back in. Removing a peer only moves the digests it was home for; every other
/// digest keeps its whole order.
pub fn home_peers<'a>(digest: &str, peers: &'a [Peer], zone: Option<&str>) -> Vec<&'a Peer> {
    let ready = || peers.iter().filter(|p| p.ready);
    let in_zone: Vec<&Peer> = match zone {
        Some(z) => ready().filter(|p| p.zone.as_deref() == Some(z)).collect(),
        None => Vec::new(),
    };
    let mut chosen = if in_zone.is_empty() {
        ready().collect()
    } else {
        in_zone
    };
    chosen.sort_by_cached_key(|p| (std::cmp::Reverse(score(digest, &p.id)), p.id.clone()));
    // The same peer listed twice (a duplicate endpoint) counts once.
    chosen.dedup_by(|a, b| a.id == b.id);
    chosen
}

// ---------------------------------------------------------------------------------------------
// Requests the peer server accepts.

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
}

/// A validated content digest (`sha256:<64 hex>` or `sha512:<128 hex>`, lowercase).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, SharingError> {
        let bad = |reason| SharingError::InvalidDigest {
            digest: s.into(),
            reason,
        };
        let (algorithm, encoded) = s
            .split_once(':')
            .ok_or_else(|| bad("expected <algorithm>:<hex>"))?;
        // The distribution spec's grammar first, so a malformed digest is 400, not 404.
        let alg_ok = !algorithm.is_empty()
            && algorithm.split(['+', '.', '_', '-']).all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !alg_ok {
            return Err(bad("the algorithm must be lowercase letters and digits"));
        }
        if encoded.is_empty()
            || !encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'=' || b == b'_' || b == b'-')
        {
            return Err(bad(
                "the encoded part must be letters, digits, '=', '_' or '-'",
            ));
        }
        let want = match algorithm {
            "sha256" => 64,
            "sha512" => 128,
            _ => {
                return Err(SharingError::UnsupportedAlgorithm {
                    algorithm: algorithm.into(),
                });
            }
        };
        if encoded.len() != want {
            return Err(bad("wrong length for its algorithm"));
        }
        if !encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("the hex part must be lowercase hexadecimal"));
        }
        Ok(Digest(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest repository name accepted (what registries commonly enforce).
pub const MAX_NAME: usize = 255;

/// Checks a repository name against the distribution spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_name(name: &str) -> Result<(), SharingError> {
    let bad = |reason| SharingError::InvalidName {
        name: name.into(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(bad("it is longer than 255 characters"));
    }
    for component in name.split('/') {
        if !component_ok(component) {
            return Err(bad(
                "each /-separated part must be lowercase letters and digits joined by '.', '_', \
                 '__' or runs of '-'",
            ));
        }
    }
    Ok(())
}

fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+"; always followed by an alphanumeric (the last
        // byte is one).
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A request the peer server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check.
    ApiVersion,
    /// A blob or manifest by digest.
    Content(ContentRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRequest {
    pub kind: Kind,
    /// The repository, e.g. `library/busybox`.
    pub name: String,
    pub digest: Digest,
    /// The registry the pull is for: containerd adds `?ns=<registry>` when it asks a mirror.
    pub registry: Option<String>,
    /// HEAD: headers only.
    pub head: bool,
}

/// Parses a request to the peer server: `method`, the path and the query (without `?`).
///
/// Manifests only by digest: a tag answers 404, so containerd resolves it at the registry
/// (the mirror entry has only the `pull` capability, so containerd does not ask it for tags
/// anyway).
pub fn parse_request(method: &str, path: &str, query: Option<&str>) -> Result<Route, SharingError> {
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Err(SharingError::MethodNotAllowed {
                method: method.into(),
            });
        }
    };
    let unknown = || SharingError::UnknownPath { path: path.into() };
    if path == "/v2/" || path == "/v2" {
        return Ok(Route::ApiVersion);
    }
    let rest = path.strip_prefix("/v2/").ok_or_else(unknown)?;
    // <name>/<kind>/<reference>: the reference has no '/', the name may.
    let (before, reference) = rest.rsplit_once('/').ok_or_else(unknown)?;
    let (name, kind) = before.rsplit_once('/').ok_or_else(unknown)?;
    let kind = match kind {
        "blobs" => Kind::Blob,
        "manifests" => Kind::Manifest,
        _ => return Err(unknown()),
    };
    if reference.is_empty() {
        return Err(unknown());
    }
    validate_name(name)?;
    let digest = if reference.contains(':') {
        Digest::parse(reference)?
    } else if kind == Kind::Manifest && is_tag(reference) {
        return Err(SharingError::TagNotServed {
            reference: reference.into(),
        });
    } else {
        return Err(SharingError::InvalidDigest {
            digest: reference.into(),
            reason: "expected <algorithm>:<hex>",
        });
    };
    Ok(Route::Content(ContentRequest {
        kind,
        name: name.into(),
        digest,
        registry: query.and_then(|q| query_param(q, "ns")),
        head,
    }))
}

/// A tag per the distribution spec: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

/// The percent-decoded value of `key` in a query string; None when absent or not valid UTF-8.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == key)
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            x => {
                out.push(x);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one the server may ignore (several ranges, another unit, malformed):
    /// 200 with everything.
    Full,
    /// 206: bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416: starts at or after the end.
    Unsatisfiable,
}

/// Parses `bytes=START-[END]` or `bytes=-SUFFIX` (containerd resumes a fetch with
/// `bytes=N-`). Anything else is served whole, as RFC 9110 allows.
pub fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let num = |x: &str| x.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match num(b) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(n) if size > 0 => ByteRange::Partial {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            Some(_) => ByteRange::Unsatisfiable,
            None => ByteRange::Full,
        },
        (false, open) => {
            let Some(start) = num(a) else {
                return ByteRange::Full;
            };
            let end = if open {
                size.saturating_sub(1)
            } else {
                match num(b) {
                    Some(e) if e >= start => e.min(size.saturating_sub(1)),
                    _ => return ByteRange::Full,
                }
            };
            if start >= size {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Partial { start, end }
            }
        }
        (true, true) => ByteRange::Full,
    }
}

/// The media type to serve a stored manifest with: its `mediaType` when it names a manifest
/// or an index, else what its shape says (an OCI manifest or index may omit the field). None
/// when the bytes are not a manifest or an index (e.g. a layer asked for as a manifest).
pub fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    use super::oci::{is_index, is_manifest};
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object()?;
    match obj.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) if is_manifest(m) || is_index(m) => Some(m.into()),
        Some(_) => None,
        None if obj.get("manifests").is_some_and(|m| m.is_array()) => {
            Some("application/vnd.oci.image.index.v1+json".into())
        }
        None if obj.get("config").is_some_and(|c| c.is_object())
            && obj.get("layers").is_some_and(|l| l.is_array()) =>
        {
            Some("application/vnd.oci.image.manifest.v1+json".into())
        }
        None => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Registries and the public policy.

/// Checks a registry host as it names a `certs.d` directory: `host[:port]` (an IPv6 address in
/// brackets), or containerd's `_default`. Never a path: no `/`, no `..`.
pub fn validate_registry(registry: &str) -> Result<(), SharingError> {
    let bad = |reason| SharingError::InvalidRegistry {
        registry: registry.into(),
        reason,
    };
    if registry == "_default" {
        return Ok(());
    }
    if registry.is_empty() || registry.len() > 255 {
        return Err(bad("it must be 1 to 255 characters"));
    }
    if registry.contains("://") {
        return Err(bad("give the host without a scheme"));
    }
    if registry.contains('/') {
        return Err(bad("give the host without a path"));
    }
    if registry.starts_with('.') || registry.contains("..") {
        return Err(bad("it must not start with '.' or contain '..'"));
    }
    if !registry
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return Err(bad("use letters, digits, '.', '-', ':' and brackets only"));
    }
    Ok(())
}

/// Registries and repository prefixes an operator marks public: served to any local pull
/// without credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicPolicy {
    /// (registry, repository prefix; empty = the whole registry)
    entries: Vec<(String, String)>,
}

impl PublicPolicy {
    /// Parses entries like `docker.io/library` (that namespace) or `quay.io` (the registry).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<PublicPolicy, SharingError> {
        let mut out = Vec::new();
        for e in entries {
            let e = e.as_ref();
            let (registry, prefix) = e.split_once('/').unwrap_or((e, ""));
            validate_registry(registry).map_err(|err| SharingError::InvalidPublic {
                entry: e.into(),
                reason: err.to_string(),
            })?;
            let prefix = prefix.trim_end_matches('/');
            if !prefix.is_empty() {
                validate_name(prefix).map_err(|err| SharingError::InvalidPublic {
                    entry: e.into(),
                    reason: err.to_string(),
                })?;
            }
            out.push((registry.to_string(), prefix.to_string()));
        }
        Ok(PublicPolicy { entries: out })
    }

    /// Whether `registry/repository` is public: an entry names the registry and either no
    /// prefix, or a prefix that matches whole path components (`docker.io/library` covers
    /// `library/busybox`, not `library-x/busybox`).
    pub fn is_public(&self, registry: &str, repository: &str) -> bool {
        self.entries.iter().any(|(r, prefix)| {
            r == registry
                && (prefix.is_empty()
                    || repository == prefix
                    || repository
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.starts_with('/')))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The access decision.

/// What checking the pull's credentials against the registry said (cached by the adapter for a
/// short time; the credentials themselves are never stored or logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamCheck {
    /// The registry accepted them for this repository (HEAD of the content: 200).
    Allowed,
    /// The registry refused them (401/403/404 for this repository).
    Denied,
    /// No answer: not checked yet, registry unreachable, timed out, an unexpected status.
    Unknown,
}

/// Whether the request carried credentials, and what the registry said of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    None,
    Credentials(UpstreamCheck),
}

/// The facts the mirror gathers for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessFacts<'a> {
    /// The registry of the pull (`ns=`); None when the request did not say.
    pub registry: Option<&'a str>,
    pub repository: &'a str,
    pub presented: Presented,
    /// A pod scheduled on this node references this registry/repository and holds a pull
    /// secret the registry accepts for it.
    pub node_pod_may_pull: bool,
}

/// Why content is served (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeReason {
    Public,
    Credentials,
    NodePod,
}

/// Why the mirror declines (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclineReason {
    /// The request did not name its registry, so no rule can match.
    NoRegistry,
    /// The registry refused the credentials for this repository.
    Denied,
    /// The credentials could not be checked (default deny).
    Unchecked,
}

/// What the mirror answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Serve(ServeReason),
    /// 401 with `WWW-Authenticate: Basic realm="<realm>"`: containerd sends the pull's
    /// credentials (when its AuthConfig has no `server_address`) or, having none for this host,
    /// goes to the next host.
    Challenge {
        realm: String,
    },
    /// 404: containerd goes to the next host (the registry), which applies its own rules.
    Decline(DeclineReason),
}

impl ServeReason {
    pub fn metric_label(self) -> &'static str {
        match self {
            ServeReason::Public => "public",
            ServeReason::Credentials => "credentials",
            ServeReason::NodePod => "node_pod",
        }
    }
}

impl DeclineReason {
    pub fn metric_label(self) -> &'static str {
        match self {
            DeclineReason::NoRegistry => "no_registry",
            DeclineReason::Denied => "denied",
            DeclineReason::Unchecked => "unchecked",
        }
    }
}

/// The realm the mirror's challenge names.
pub const REALM: &str = "ragent";

/// Decides one request. In order: content an explicit policy marks public is served; content
/// a pod on this node may pull with its own secret is served; credentials the registry accepted
/// for this repository are served, refused or unchecked ones are declined; a request without
/// credentials is challenged, so containerd sends the pull's if it has any. Nothing is served
/// without one of those reasons.
pub fn decide_access(facts: &AccessFacts<'_>, policy: &PublicPolicy) -> Access {
    let Some(registry) = facts.registry else {
        return Access::Decline(DeclineReason::NoRegistry);
    };
    if policy.is_public(registry, facts.repository) {
        return Access::Serve(ServeReason::Public);
    }
    if facts.node_pod_may_pull {
        return Access::Serve(ServeReason::NodePod);
    }
    match facts.presented {
        Presented::Credentials(UpstreamCheck::Allowed) => Access::Serve(ServeReason::Credentials),
        Presented::Credentials(UpstreamCheck::Denied) => Access::Decline(DeclineReason::Denied),
        Presented::Credentials(UpstreamCheck::Unknown) => Access::Decline(DeclineReason::Unchecked),
        Presented::None => Access::Challenge {
            realm: REALM.into(),
        },
    }
}

/// Whether the adapter should check presented credentials upstream before deciding (it need
/// not when the answer does not depend on them).
pub fn needs_upstream_check(facts: &AccessFacts<'_>, policy: &PublicPolicy) -> bool {
    matches!(facts.presented, Presented::Credentials(_))
        && facts
            .registry
            .is_some_and(|r| !policy.is_public(r, facts.repository))
        && !facts.node_pod_may_pull
}

// ---------------------------------------------------------------------------------------------
// containerd's hosts.toml.

/// The line that marks a hosts.toml ragent wrote; what follows says what was there before.
pub const MARKER: &str = "# ragent-managed: original=";

/// What was in `certs.d/<registry>/` before ragent wrote its hosts.toml (recorded in the file's
/// marker, so it survives agent restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Original {
    /// A hosts.toml, kept byte for byte in `hosts.toml.ragent-backup`.
    Backup,
    /// The directory, without a hosts.toml.
    NoFile,
    /// Nothing: ragent created the directory.
    NoDir,
}

impl Original {
    fn as_str(self) -> &'static str {
        match self {
            Original::Backup => "backup",
            Original::NoFile => "none",
            Original::NoDir => "none-created-dir",
        }
    }
}

/// Whether `text` is a hosts.toml ragent wrote, and what was there before it: the marker line
/// in the comment block at the top of the file.
pub fn recognise_hosts_toml(text: &str) -> Option<Original> {
    text.lines()
        .take_while(|l| l.trim_start().starts_with('#'))
        .find_map(|l| match l.trim().strip_prefix(MARKER)? {
            "backup" => Some(Original::Backup),
            "none" => Some(Original::NoFile),
            "none-created-dir" => Some(Original::NoDir),
            _ => None,
        })
}

/// The URL containerd reaches the local agent's peer server at.
pub fn mirror_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The registry containerd talks to when a hosts.toml gives no `server`, as containerd 1.6
/// defaults it: docker.io is `registry-1.docker.io`, localhost over HTTP, the rest over HTTPS.
pub fn default_server(registry: &str) -> String {
    if registry == "docker.io" {
        return "https://registry-1.docker.io".into();
    }
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    if matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1") {
        format!("http://{registry}")
    } else {
        format!("https://{registry}")
    }
}

/// The hosts.toml ragent writes for `registry`, with the local agent (`mirror`, e.g.
/// `http://127.0.0.1:9465`) as the first host, capability `pull` only (tags always resolve at
/// the registry).
///
/// - No original file: `server` is the registry (containerd's own default for it; for
///   `_default`, none), so the registry stays the fallback.
/// - An original file: its top-level keys (its `server`, `ca`, ...) and its hosts stay as they
///   are, in their order, after the mirror. The result is checked to say exactly what the
///   original said plus the mirror host; if it would not (e.g. the original already has a host
///   of that URL), nothing is written and the error says what to do.
pub fn render_hosts_toml(
    registry: &str,
    mirror: &str,
    original_text: Option<&str>,
    original: Original,
) -> Result<String, SharingError> {
    let mut out = String::new();
    out.push_str(
        "# Written by ragent (cluster layer sharing): containerd asks the local ragent first for\n\
         # blobs and manifests by digest; tags and everything ragent does not serve go to the\n\
         # hosts below. The agent restores what was here when sharing is turned off\n\
         # (hosts.toml.ragent-backup holds the original, if there was one).\n",
    );
    out.push_str(MARKER);
    out.push_str(original.as_str());
    out.push_str("\n\n");
    let mirror_table = format!(
        "[host.{}]\n  capabilities = [\"pull\"]\n",
        toml_string(mirror)
    );
    let Some(orig) = original_text else {
        if registry != "_default" {
            out.push_str(&format!(
                "server = {}\n\n",
                toml_string(&default_server(registry))
            ));
        }
        out.push_str(&mirror_table);
        return Ok(out);
    };
    let parsed: toml::Table =
        orig.parse()
            .map_err(|e: toml::de::Error| SharingError::HostsTomlInvalid {
                registry: registry.into(),
                reason: e.message().to_string(),
            })?;
    // Split the original where its first table starts; top-level keys must stay above tables.
    let (top, tables) = split_at_first_table(orig);
    out.push_str(top);
    if !top.is_empty() && !top.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("\n# ragent's mirror, asked first:\n");
    out.push_str(&mirror_table);
    if !tables.is_empty() {
        out.push_str("\n# The original's hosts:\n");
        out.push_str(tables);
        if !tables.ends_with('\n') {
            out.push('\n');
        }
    }
    // The result must mean the original plus our host, nothing else.
    let merge_err = |reason: String| SharingError::HostsTomlMerge {
        registry: registry.into(),
        reason,
    };
    let mut want = parsed;
    let hosts = want
        .entry("host")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(hosts) = hosts else {
        return Err(merge_err("its `host` key is not a table".into()));
    };
    if hosts.contains_key(mirror) {
        return Err(merge_err(format!("it already has a host {mirror}")));
    }
    let mut ours = toml::Table::new();
    ours.insert(
        "capabilities".into(),
        toml::Value::Array(vec![toml::Value::String("pull".into())]),
    );
    hosts.insert(mirror.into(), toml::Value::Table(ours));
    let got: toml::Table = out
        .parse()
        .map_err(|e: toml::de::Error| merge_err(e.message().to_string()))?;
    if got != want {
        return Err(merge_err(
            "its layout could not be followed (a table header inside a multi-line string?)".into(),
        ));
    }
    Ok(out)
}

/// (the text before the first line that opens a table, the rest)
fn split_at_first_table(text: &str) -> (&str, &str) {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            return (&text[..offset], &text[offset..]);
        }
        offset += line.len();
    }
    (text, "")
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Membership, peer authentication and the order a miss is tried in.

impl Peer {
    /// A peer from the static list (`[[sharing.peers]]`): always ready; `addr` is `ip:port`.
    pub fn configured(id: &str, addr: &str, zone: Option<&str>) -> Result<Peer, SharingError> {
        let bad = |reason: String| SharingError::InvalidPeer {
            id: id.to_string(),
            reason,
        };
        if id.trim().is_empty() || id.len() > 253 || id.chars().any(char::is_whitespace) {
            return Err(bad(
                "the id must be a node name (1..=253 characters, no spaces)".into(),
            ));
        }
        let parsed: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| bad(format!("addr {addr:?} is not ip:port ({e})")))?;
        if parsed.ip().is_unspecified() || parsed.port() == 0 {
            return Err(bad(format!("addr {addr:?} cannot be dialled")));
        }
        Ok(Peer {
            id: id.to_string(),
            addr: parsed.to_string(),
            zone: zone.filter(|z| !z.is_empty()).map(str::to_string),
            ready: true,
        })
    }
}

/// What the kube adapter reads of one EndpointSlice endpoint (discovery.k8s.io/v1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// `addresses` (IPv4 or IPv6, without port).
    pub addresses: Vec<String>,
    /// `conditions.ready`; None (unknown) counts as ready, as the API asks consumers to.
    pub ready: Option<bool>,
    /// `conditions.terminating`: a terminating endpoint is not given new digests.
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// The peers an agent's EndpointSlices describe: one per node (the first address of its
/// endpoint, at `port`), ready when the endpoint is ready and not terminating. Endpoints without
/// a node name or an address are skipped; a node listed twice keeps its ready entry.
pub fn peers_from_slices(endpoints: &[SliceEndpoint], port: u16) -> Vec<Peer> {
    let mut peers: Vec<Peer> = Vec::new();
    for e in endpoints {
        let (Some(node), Some(ip)) = (e.node_name.as_deref(), e.addresses.first()) else {
            continue;
        };
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
            continue;
        };
        let ready = e.ready.unwrap_or(true) && !e.terminating.unwrap_or(false);
        let peer = Peer {
            id: node.to_string(),
            addr: std::net::SocketAddr::new(ip, port).to_string(),
            zone: e.zone.clone().filter(|z| !z.is_empty()),
            ready,
        };
        match peers.iter_mut().find(|p| p.id == peer.id) {
            Some(existing) if !existing.ready && peer.ready => *existing = peer,
            Some(_) => {}
            None => peers.push(peer),
        }
    }
    peers.sort_by(|a, b| a.id.cmp(&b.id));
    peers
}

/// A Kubernetes object name that is a DNS label (what a Service name must be).
pub fn validate_dns_label(name: &str) -> Result<(), SharingError> {
    let bad = |reason| SharingError::InvalidServiceName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("1..=63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only a-z, 0-9 and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

/// The secret agents present to each other (header [`PEER_TOKEN_HEADER`]). Its Debug never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// The header that carries the peer token.
pub const PEER_TOKEN_HEADER: &str = "x-ragent-peer-token";
/// Between agents only: the `Authorization` of a private pull whose credentials the asking
/// agent checked at the registry, for the home peer's upstream fetch (used, never kept).
pub const UPSTREAM_AUTH_HEADER: &str = "x-ragent-upstream-auth";

impl Token {
    /// The token in a file's text: trimmed, 16..=4096 visible ASCII characters.
    pub fn parse(text: &str) -> Result<Token, SharingError> {
        let t = text.trim();
        if t.len() < 16 {
            return Err(SharingError::InvalidToken {
                reason: "shorter than 16 characters: write a long random secret",
            });
        }
        if t.len() > 4096 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SharingError::InvalidToken {
                reason: "it must be one line of at most 4096 visible ASCII characters",
            });
        }
        Ok(Token(t.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        let mut diff = u8::from(mine.len() != presented.len());
        for (i, b) in mine.iter().enumerate() {
            diff |= b ^ presented.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The user name and password of an `Authorization: Basic` header (what containerd sends a
/// mirror that challenged it); None for anything else.
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, value) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    (!user.is_empty()).then(|| (user.to_string(), pass.to_string()))
}

/// The key a credential check is remembered under: a hash, so the cache holds no secret.
pub fn check_key(authorization: &str, registry: &str, repository: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [authorization, registry, repository] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// Who sent a request to the peer server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// This node's containerd (or a local pre-pull): the mirror role, access rules apply.
    Local,
    /// Another agent with the right token: served from the store or fetched upstream once,
    /// never forwarded again (so requests cannot loop).
    Peer,
    /// Anyone else: 403.
    Stranger,
}

/// Tells callers apart: a valid token makes a peer (wherever it comes from); without one, only
/// a connection from this host (loopback, or the address the server listens on) is local.
pub fn classify_caller(
    token: Option<&Token>,
    presented: Option<&[u8]>,
    from_this_host: bool,
) -> Caller {
    match (token, presented) {
        (Some(t), Some(p)) if t.matches(p) => Caller::Peer,
        (_, Some(_)) => Caller::Stranger,
        (_, None) if from_this_host => Caller::Local,
        (_, None) => Caller::Stranger,
    }
}

/// Where a miss is tried, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Another agent's peer server (`ip:port`).
    Peer { id: String, addr: String },
    /// This agent itself: it fetches from the registry (once, however many ask).
    Upstream,
}

/// The order a node tries for a blob it misses: the digest's home peers best first, without
/// the peers recently failed (`down`), up to this node itself, which stands for "fetch it
/// upstream myself" (once, however many ask). A node not in the list fetches upstream after
/// every peer. So when the home peer is gone, every node turns to the same next peer in the
/// digest's order, and the blob still crosses the registry link once.
pub fn plan_sources(
    digest: &str,
    peers: &[Peer],
    me: &str,
    zone: Option<&str>,
    down: &[&str],
) -> Vec<Source> {
    let mut plan = Vec::new();
    for p in home_peers(digest, peers, zone) {
        if p.id == me {
            break;
        }
        if !down.contains(&p.id.as_str()) {
            plan.push(Source::Peer {
                id: p.id.clone(),
                addr: p.addr.clone(),
            });
        }
    }
    plan.push(Source::Upstream);
    plan
}

/// Why a node went past a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No connection (refused, unreachable).
    Connect,
    /// No answer within the peer timeout.
    Timeout,
    /// The peer answered 403 (tokens differ).
    Forbidden,
    /// Any other status than 200/206.
    Status,
    /// The transfer stopped before the end.
    Cut,
}

impl Fallback {
    pub const ALL: [Fallback; 5] = [
        Fallback::Connect,
        Fallback::Timeout,
        Fallback::Forbidden,
        Fallback::Status,
        Fallback::Cut,
    ];

    pub fn metric_label(self) -> &'static str {
        match self {
            Fallback::Connect => "connect",
            Fallback::Timeout => "timeout",
            Fallback::Forbidden => "forbidden",
            Fallback::Status => "status",
            Fallback::Cut => "cut",
        }
    }

    /// Whether the peer should be skipped for a while (it looks gone, not just missing a blob).
    pub fn marks_down(self) -> bool {
        matches!(self, Fallback::Connect | Fallback::Timeout | Fallback::Cut)
    }
}

/// The first byte a `Range` asks for (`bytes=N-` or `bytes=N-M`; 0 without one); None for a
/// suffix range, which needs the length first.
pub fn range_start(range: Option<&str>) -> Option<u64> {
    let Some(v) = range else { return Some(0) };
    let spec = v.trim().strip_prefix("bytes=")?;
    let (first, _) = spec.split_once('-')?;
    if first.is_empty() {
        return None;
    }
    first.trim().parse().ok()
}

/// A blob whose bytes hash to its digest (`sha256:` or `sha512:`); None for another algorithm.
pub fn digest_hasher(digest: &str) -> Option<DigestHasher> {
    match digest.split_once(':')? {
        ("sha256", _) => Some(DigestHasher::Sha256(Sha256::new())),
        ("sha512", _) => Some(DigestHasher::Sha512(sha2::Sha512::new())),
        _ => None,
    }
}

/// An incremental digest of a blob's bytes.
#[derive(Clone)]
pub enum DigestHasher {
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    /// `algorithm:hex`.
    pub fn finish(self) -> String {
        match self {
            DigestHasher::Sha256(h) => format!("sha256:{:x}", h.finalize()),
            DigestHasher::Sha512(h) => format!("sha512:{:x}", h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D1: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn peer(id: &str, zone: Option<&str>, ready: bool) -> Peer {
        Peer {
            id: id.into(),
            addr: format!("10.0.0.{}:9465", id.len()),
            zone: zone.map(Into::into),
            ready,
        }
    }

    fn ids(v: &[&Peer]) -> Vec<String> {
        v.iter().map(|p| p.id.clone()).collect()
    }

    fn digest_of(i: u64) -> String {
        let h = Sha256::digest(i.to_le_bytes());
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    // --- home peers

    #[test]
    fn home_peers_are_the_ready_peers_ordered_by_score() {
        let peers = vec![
            peer("node-a", None, true),
            peer("node-b", None, false),
            peer("node-c", None, true),
            peer("node-d", None, true),
        ];
        let got = home_peers(D1, &peers, None);
        assert_eq!(got.len(), 3);
        assert!(!ids(&got).contains(&"node-b".to_string()));
        let scores: Vec<u64> = got.iter().map(|p| score(D1, &p.id)).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        // The order of the input does not matter.
        let mut reversed = peers.clone();
        reversed.reverse();
        assert_eq!(ids(&home_peers(D1, &reversed, None)), ids(&got));
    }

    #[test]
    fn no_ready_peer_means_no_home() {
        assert!(home_peers(D1, &[], None).is_empty());
        assert!(home_peers(D1, &[peer("a", None, false)], Some("z")).is_empty());
    }

    #[test]
    fn a_zone_restricts_to_its_peers_and_falls_back_to_all() {
        let peers = vec![
            peer("a1", Some("eu-1a"), true),
            peer("a2", Some("eu-1a"), true),
            peer("a3", Some("eu-1a"), false),
            peer("b1", Some("eu-1b"), true),
            peer("x", None, true),
        ];
        let mut a = ids(&home_peers(D1, &peers, Some("eu-1a")));
        a.sort();
        assert_eq!(a, vec!["a1", "a2"]);
        assert_eq!(ids(&home_peers(D1, &peers, Some("eu-1b"))), vec!["b1"]);
        // A zone without ready peers: every ready peer.
        assert_eq!(home_peers(D1, &peers, Some("us-1")).len(), 4);
        assert_eq!(
            ids(&home_peers(D1, &peers, Some("us-1"))),
            ids(&home_peers(D1, &peers, None))
        );
    }

    #[test]
    fn duplicate_peers_count_once() {
        let peers = vec![
            peer("a", None, true),
            peer("a", None, true),
            peer("b", None, true),
        ];
        assert_eq!(home_peers(D1, &peers, None).len(), 2);
    }

    #[test]
    fn the_score_separates_digest_and_id() {
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    fn peer_ids() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z][a-z0-9-]{2,20}", 2..9)
            .prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn home_peers_are_deterministic(ids in peer_ids(), i in any::<u64>()) {
            let peers: Vec<Peer> = ids.iter().map(|id| peer(id, None, true)).collect();
            let d = digest_of(i);
            let mut shuffled = peers.clone();
            shuffled.rotate_left(1);
            prop_assert_eq!(
                ids_of(&home_peers(&d, &peers, None)),
                ids_of(&home_peers(&d, &shuffled, None))
            );
        }

        /// Over 4,000 digests each of N peers is home for 1/N of them within ±20% (binomial
        /// spread is under 5% at N=8, so this fails only if the hash is biased).
        #[test]
        fn home_peers_are_balanced(ids in peer_ids()) {
            let peers: Vec<Peer> = ids.iter().map(|id| peer(id, None, true)).collect();
            let n = 4000u64;
            let mut count = std::collections::BTreeMap::<String, u64>::new();
            for i in 0..n {
                let d = digest_of(i);
                *count.entry(home_peers(&d, &peers, None)[0].id.clone()).or_default() += 1;
            }
            let fair = n as f64 / peers.len() as f64;
            for id in &ids {
                let c = count.get(id).copied().unwrap_or(0) as f64;
                prop_assert!((c - fair).abs() <= 0.2 * fair, "{id}: {c} of {n}, fair {fair}");
            }
        }

        /// When a peer leaves, only the digests it was home for move, and every digest keeps
        /// the order of the remaining peers.
        #[test]
        fn a_leaving_peer_moves_only_its_digests(ids in peer_ids(), gone in any::<prop::sample::Index>()) {
            let peers: Vec<Peer> = ids.iter().map(|id| peer(id, None, true)).collect();
            let gone = gone.get(&ids).clone();
            let after: Vec<Peer> = peers.iter().filter(|p| p.id != gone).cloned().collect();
            for i in 0..300 {
                let d = digest_of(i);
                let before = ids_of(&home_peers(&d, &peers, None));
                let now = ids_of(&home_peers(&d, &after, None));
                let expected: Vec<String> = before.iter().filter(|p| **p != gone).cloned().collect();
                prop_assert_eq!(&now, &expected);
                if before[0] != gone {
                    prop_assert_eq!(&now[0], &before[0]);
                }
            }
        }
    }

    fn ids_of(v: &[&Peer]) -> Vec<String> {
        ids(v)
    }

    // --- requests

    fn content(method: &str, path: &str, query: Option<&str>) -> ContentRequest {
        match parse_request(method, path, query) {
            Ok(Route::Content(c)) => c,
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    #[test]
    fn blobs_and_manifests_by_digest_parse() {
        let c = content(
            "GET",
            &format!("/v2/library/busybox/blobs/{D1}"),
            Some("ns=docker.io"),
        );
        assert_eq!(c.kind, Kind::Blob);
        assert_eq!(c.name, "library/busybox");
        assert_eq!(c.digest.as_str(), D1);
        assert_eq!(c.registry.as_deref(), Some("docker.io"));
        assert!(!c.head);
        let c = content(
            "HEAD",
            &format!("/v2/ragent/run/manifests/{D1}"),
            Some("ns=127.0.0.1%3A5055"),
        );
        assert_eq!(c.kind, Kind::Manifest);
        assert_eq!(c.registry.as_deref(), Some("127.0.0.1:5055"));
        assert!(c.head);
        // No ns: the registry is unknown.
        assert_eq!(
            content("GET", &format!("/v2/a/blobs/{D1}"), None).registry,
            None
        );
        // A name whose components are "blobs" and "manifests".
        let c = content("GET", &format!("/v2/blobs/manifests/blobs/{D1}"), None);
        assert_eq!((c.name.as_str(), c.kind), ("blobs/manifests", Kind::Blob));
    }

    #[test]
    fn the_api_check_answers() {
        assert_eq!(parse_request("GET", "/v2/", None), Ok(Route::ApiVersion));
        assert_eq!(parse_request("HEAD", "/v2", None), Ok(Route::ApiVersion));
    }

    #[test]
    fn everything_else_is_rejected_with_its_status() {
        let sha512 = format!("sha512:{}", "a".repeat(128));
        let cases: &[(&str, String, u16, &str)] = &[
            ("PUT", format!("/v2/a/blobs/{D1}"), 405, "method"),
            ("POST", "/v2/a/blobs/uploads/".into(), 405, "method"),
            ("DELETE", format!("/v2/a/manifests/{D1}"), 405, "method"),
            ("GET", "/".into(), 404, "unknown_path"),
            ("GET", "/v1/a/blobs/x".into(), 404, "unknown_path"),
            ("GET", "/v2/_catalog".into(), 404, "unknown_path"),
            ("GET", "/v2/a/tags/list".into(), 404, "unknown_path"),
            (
                "GET",
                "/v2/a/blobs/uploads/1234".into(),
                404,
                "unknown_path",
            ),
            ("GET", "/v2/a/blobs/".into(), 404, "unknown_path"),
            ("GET", format!("/v2/blobs/{D1}"), 404, "unknown_path"),
            ("GET", format!("/v2/a/referrers/{D1}"), 404, "unknown_path"),
            ("GET", "/v2/a/manifests/latest".into(), 404, "tag"),
            ("GET", "/v2/a/manifests/v1.2_3-x".into(), 404, "tag"),
            ("GET", "/v2/a/blobs/latest".into(), 400, "invalid_digest"),
            (
                "GET",
                "/v2/a/blobs/sha256:abc".into(),
                400,
                "invalid_digest",
            ),
            (
                "GET",
                format!("/v2/a/blobs/{}", D1.to_uppercase().replace("SHA", "sha")),
                400,
                "invalid_digest",
            ),
            (
                "GET",
                format!("/v2/a/blobs/SHA256:{}", &D1[7..]),
                400,
                "invalid_digest",
            ),
            ("GET", "/v2/a/manifests/-bad".into(), 400, "invalid_digest"),
            (
                "GET",
                "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(),
                404,
                "algorithm",
            ),
            (
                "GET",
                format!("/v2/Library/busybox/blobs/{D1}"),
                400,
                "invalid_name",
            ),
            ("GET", format!("/v2/a//b/blobs/{D1}"), 400, "invalid_name"),
            ("GET", format!("/v2/../etc/blobs/{D1}"), 400, "invalid_name"),
            ("GET", format!("/v2/a--/blobs/{D1}"), 400, "invalid_name"),
            ("GET", format!("/v2/a___b/blobs/{D1}"), 400, "invalid_name"),
            ("GET", format!("/v2/a%2Fb/blobs/{D1}"), 400, "invalid_name"),
            (
                "GET",
                format!("/v2/{}/blobs/{D1}", "a".repeat(256)),
                400,
                "invalid_name",
            ),
        ];
        for (method, path, status, label) in cases {
            let e = parse_request(method, path, None).expect_err(path);
            assert_eq!(
                (e.status(), e.metric_label()),
                (*status, *label),
                "{method} {path}: {e}"
            );
        }
        // sha512 is a digest the store may hold.
        assert!(parse_request("GET", &format!("/v2/a/blobs/{sha512}"), None).is_ok());
    }

    #[test]
    fn names_follow_the_distribution_grammar() {
        for ok in [
            "a",
            "library/busybox",
            "a.b_c__d---e/f0",
            "0/1/2",
            "my-org/sub.team/app",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a_", ".a", "a..b", "a._b", "a___b", "a b", "a:b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("a=1&ns=docker.io", "ns").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            query_param("ns=%5B%3A%3A1%5D%3A5000", "ns").as_deref(),
            Some("[::1]:5000")
        );
        assert_eq!(query_param("ns=%zz", "ns"), None);
        assert_eq!(query_param("nsx=1", "ns"), None);
    }

    proptest! {
        /// Whatever the path, parsing answers (no panic) and a 2xx route only for valid input.
        #[test]
        fn any_path_parses_without_panicking(path in "\\PC{0,80}", q in proptest::option::of("\\PC{0,20}")) {
            if let Ok(Route::Content(c)) = parse_request("GET", &path, q.as_deref()) {
                prop_assert!(validate_name(&c.name).is_ok());
                prop_assert!(Digest::parse(c.digest.as_str()).is_ok());
            }
        }

        #[test]
        fn generated_valid_requests_round_trip(
            name in "[a-z0-9]{1,5}(([._]|__|-{1,2})[a-z0-9]{1,5}){0,2}(/[a-z0-9]{1,6}){0,3}",
            hexd in "[0-9a-f]{64}",
            manifest in any::<bool>(),
        ) {
            let kind = if manifest { "manifests" } else { "blobs" };
            let c = content("GET", &format!("/v2/{name}/{kind}/sha256:{hexd}"), Some("ns=r.example"));
            prop_assert_eq!(c.name, name);
            prop_assert_eq!(c.digest.as_str(), format!("sha256:{hexd}"));
        }
    }

    #[test]
    fn ranges() {
        use ByteRange::*;
        let cases: &[(Option<&str>, u64, ByteRange)] = &[
            (None, 10, Full),
            (Some("bytes=0-"), 10, Partial { start: 0, end: 9 }),
            (Some("bytes=4-"), 10, Partial { start: 4, end: 9 }),
            (Some("bytes=4-6"), 10, Partial { start: 4, end: 6 }),
            (Some("bytes=4-100"), 10, Partial { start: 4, end: 9 }),
            (Some("bytes=-3"), 10, Partial { start: 7, end: 9 }),
            (Some("bytes=-30"), 10, Partial { start: 0, end: 9 }),
            (Some("bytes=10-"), 10, Unsatisfiable),
            (Some("bytes=-0"), 10, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            (Some("bytes=6-4"), 10, Full),
            (Some("bytes=0-1,4-5"), 10, Full),
            (Some("items=0-1"), 10, Full),
            (Some("bytes=x-"), 10, Full),
            (Some("bytes=-"), 10, Full),
        ];
        for (h, size, want) in cases {
            assert_eq!(parse_range(*h, *size), *want, "{h:?} of {size}");
        }
    }

    #[test]
    fn manifest_media_types() {
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}"#;
        assert_eq!(
            manifest_media_type(docker).as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        let oci_no_type = br#"{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}"#;
        assert_eq!(
            manifest_media_type(oci_no_type).as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(
            manifest_media_type(index).as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        // An image config, a layer, something else with a media type: not manifests.
        assert_eq!(
            manifest_media_type(br#"{"architecture":"amd64","rootfs":{}}"#),
            None
        );
        assert_eq!(manifest_media_type(&[0x1f, 0x8b, 0, 1]), None);
        assert_eq!(
            manifest_media_type(br#"{"mediaType":"text/plain","layers":[]}"#),
            None
        );
    }

    // --- registries and policy

    #[test]
    fn registries_are_hosts_never_paths() {
        for ok in [
            "docker.io",
            "127.0.0.1:5055",
            "[::1]:5000",
            "_default",
            "my-reg.example.com",
        ] {
            assert!(validate_registry(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "https://docker.io",
            ".hidden",
            "a b",
            "a..b",
        ] {
            let e = validate_registry(bad).expect_err(bad);
            assert!(e.to_string().contains("[sharing] registries"), "{e}");
        }
    }

    #[test]
    fn public_policy_matches_whole_components() {
        let p =
            PublicPolicy::parse(&["docker.io/library", "quay.io", "ghcr.io/org/team/"]).unwrap();
        assert!(p.is_public("docker.io", "library/busybox"));
        assert!(p.is_public("docker.io", "library"));
        assert!(!p.is_public("docker.io", "library-x/busybox"));
        assert!(!p.is_public("docker.io", "someone/busybox"));
        assert!(p.is_public("quay.io", "anything/at/all"));
        assert!(p.is_public("ghcr.io", "org/team/app"));
        assert!(!p.is_public("ghcr.io", "org/other"));
        assert!(!p.is_public("registry-1.docker.io", "library/busybox"));
        assert!(!PublicPolicy::default().is_public("docker.io", "library/busybox"));
        for bad in ["", "a/B", "docker.io//x", "http://x"] {
            let e = PublicPolicy::parse(&[bad]).expect_err(bad);
            assert!(e.to_string().contains("[sharing] public"), "{e}");
        }
    }

    // --- access

    /// (registry, repository, presented, node pod may pull, expected, needs check)
    type AccessRow = (
        Option<&'static str>,
        &'static str,
        Presented,
        bool,
        Access,
        bool,
    );

    #[test]
    fn access_table() {
        use Access::*;
        use Presented as P;
        use UpstreamCheck as U;
        let policy = PublicPolicy::parse(&["docker.io/library"]).unwrap();
        let challenge = Challenge {
            realm: REALM.into(),
        };
        // (registry, repository, presented, node pod may pull, expected, needs check)
        let table: Vec<AccessRow> = vec![
            // Public by policy: served whatever came with it.
            (
                Some("docker.io"),
                "library/busybox",
                P::None,
                false,
                Serve(ServeReason::Public),
                false,
            ),
            (
                Some("docker.io"),
                "library/busybox",
                P::Credentials(U::Denied),
                false,
                Serve(ServeReason::Public),
                false,
            ),
            // A pod on this node may pull it with its own secret.
            (
                Some("r.example"),
                "team/app",
                P::None,
                true,
                Serve(ServeReason::NodePod),
                false,
            ),
            (
                Some("r.example"),
                "team/app",
                P::Credentials(U::Unknown),
                true,
                Serve(ServeReason::NodePod),
                false,
            ),
            // Credentials the registry accepted for this repository.
            (
                Some("r.example"),
                "team/app",
                P::Credentials(U::Allowed),
                false,
                Serve(ServeReason::Credentials),
                true,
            ),
            // Refused or unchecked: containerd goes upstream.
            (
                Some("r.example"),
                "team/app",
                P::Credentials(U::Denied),
                false,
                Decline(DeclineReason::Denied),
                true,
            ),
            (
                Some("r.example"),
                "team/app",
                P::Credentials(U::Unknown),
                false,
                Decline(DeclineReason::Unchecked),
                true,
            ),
            // Nothing known: ask for the pull's credentials (default deny).
            (
                Some("r.example"),
                "team/app",
                P::None,
                false,
                challenge.clone(),
                false,
            ),
            (
                Some("docker.io"),
                "someone/app",
                P::None,
                false,
                challenge,
                false,
            ),
            // No registry named: no rule applies.
            (
                None,
                "library/busybox",
                P::None,
                false,
                Decline(DeclineReason::NoRegistry),
                false,
            ),
            (
                None,
                "team/app",
                P::Credentials(U::Allowed),
                true,
                Decline(DeclineReason::NoRegistry),
                false,
            ),
        ];
        for (registry, repository, presented, pod, want, check) in table {
            let facts = AccessFacts {
                registry,
                repository,
                presented,
                node_pod_may_pull: pod,
            };
            assert_eq!(decide_access(&facts, &policy), want, "{facts:?}");
            assert_eq!(needs_upstream_check(&facts, &policy), check, "{facts:?}");
        }
    }

    proptest! {
        /// Default deny: without a public policy, a node pod or accepted credentials, nothing is
        /// ever served.
        #[test]
        fn nothing_is_served_without_a_reason(
            registry in proptest::option::of("[a-z]{1,5}\\.io"),
            repository in "[a-z]{1,5}(/[a-z]{1,5}){0,2}",
            presented in prop_oneof![
                Just(Presented::None),
                Just(Presented::Credentials(UpstreamCheck::Denied)),
                Just(Presented::Credentials(UpstreamCheck::Unknown)),
            ],
        ) {
            let facts = AccessFacts {
                registry: registry.as_deref(),
                repository: &repository,
                presented,
                node_pod_may_pull: false,
            };
            prop_assert!(!matches!(decide_access(&facts, &PublicPolicy::default()), Access::Serve(_)));
        }
    }

    // --- hosts.toml

    const MIRROR: &str = "http://127.0.0.1:9465";

    fn parse(text: &str) -> toml::Table {
        text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The hosts in file order, as containerd 1.6 reads them.
    fn host_order(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("[host.\"")?.strip_suffix("\"]"))
            .map(Into::into)
            .collect()
    }

    #[test]
    fn a_new_file_has_the_mirror_then_the_registry() {
        let text = render_hosts_toml("docker.io", MIRROR, None, Original::NoDir).unwrap();
        let t = parse(&text);
        assert_eq!(t["server"].as_str(), Some("https://registry-1.docker.io"));
        assert_eq!(
            t["host"][MIRROR]["capabilities"],
            toml::Value::Array(vec!["pull".into()])
        );
        assert_eq!(host_order(&text), vec![MIRROR]);
        assert_eq!(recognise_hosts_toml(&text), Some(Original::NoDir));
        let t =
            parse(&render_hosts_toml("127.0.0.1:5055", MIRROR, None, Original::NoFile).unwrap());
        assert_eq!(t["server"].as_str(), Some("http://127.0.0.1:5055"));
        let t = parse(&render_hosts_toml("ghcr.io", MIRROR, None, Original::NoFile).unwrap());
        assert_eq!(t["server"].as_str(), Some("https://ghcr.io"));
        // _default applies to every registry: no server of its own.
        let t = parse(&render_hosts_toml("_default", MIRROR, None, Original::NoDir).unwrap());
        assert!(t.get("server").is_none());
    }

    #[test]
    fn an_original_keeps_its_settings_and_hosts_after_the_mirror() {
        let orig = "# the team's mirror\nserver = \"https://registry.example.com\"\nca = \"/etc/ca.pem\"\n\n[host.\"https://cache.example.com\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n\n[host.\"https://registry.example.com\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n";
        let text = render_hosts_toml("registry.example.com", MIRROR, Some(orig), Original::Backup)
            .unwrap();
        assert_eq!(recognise_hosts_toml(&text), Some(Original::Backup));
        let t = parse(&text);
        let o = parse(orig);
        assert_eq!(t["server"], o["server"]);
        assert_eq!(t["ca"], o["ca"]);
        assert_eq!(
            host_order(&text),
            vec![
                MIRROR,
                "https://cache.example.com",
                "https://registry.example.com"
            ]
        );
        assert_eq!(
            t["host"]["https://cache.example.com"],
            o["host"]["https://cache.example.com"]
        );
        // The original's text is there unchanged.
        assert!(text.contains(&orig[orig.find("[host").unwrap()..]));
    }

    #[test]
    fn originals_without_tables_or_without_newlines_merge() {
        for orig in [
            "server = \"http://r:5000\"",
            "",
            "# only a comment",
            "[host.\"http://r:5000\"]\ncapabilities=[\"pull\"]",
        ] {
            let text = render_hosts_toml("r:5000", MIRROR, Some(orig), Original::Backup)
                .unwrap_or_else(|e| panic!("{orig:?}: {e}"));
            assert_eq!(host_order(&text)[0], MIRROR, "{text}");
            parse(&text);
        }
    }

    #[test]
    fn unmergeable_originals_are_refused() {
        let invalid =
            render_hosts_toml("r", MIRROR, Some("server = "), Original::Backup).unwrap_err();
        assert_eq!(invalid.metric_label(), "hosts_toml_invalid");
        assert!(
            invalid.to_string().contains("fix or remove it"),
            "{invalid}"
        );
        let dup = format!("[host.\"{MIRROR}\"]\ncapabilities = [\"pull\"]\n");
        let e = render_hosts_toml("r", MIRROR, Some(&dup), Original::Backup).unwrap_err();
        assert_eq!(e.metric_label(), "hosts_toml_merge");
        // A table header inside a multi-line string would put the mirror inside the string.
        let tricky = "header = \"\"\"\n[not.a.table]\n\"\"\"\n[host.\"http://r\"]\ncapabilities = [\"pull\"]\n";
        let e = render_hosts_toml("r", MIRROR, Some(tricky), Original::Backup).unwrap_err();
        assert_eq!(e.metric_label(), "hosts_toml_merge", "{e}");
        assert!(e.to_string().contains("move the file away"), "{e}");
        // `host` as a plain key.
        let e = render_hosts_toml("r", MIRROR, Some("host = 1\n"), Original::Backup).unwrap_err();
        assert_eq!(e.metric_label(), "hosts_toml_merge");
    }

    #[test]
    fn only_ragents_marker_is_recognised() {
        assert_eq!(recognise_hosts_toml("server = \"https://r\"\n"), None);
        assert_eq!(recognise_hosts_toml(""), None);
        // Not in the leading comment block.
        assert_eq!(
            recognise_hosts_toml("server = \"x\"\n# ragent-managed: original=none\n"),
            None
        );
        assert_eq!(
            recognise_hosts_toml("# ragent-managed: original=maybe\n"),
            None
        );
        assert_eq!(
            recognise_hosts_toml("# hello\n# ragent-managed: original=none\nserver=\"x\""),
            Some(Original::NoFile)
        );
    }

    #[test]
    fn default_servers_follow_containerd() {
        assert_eq!(default_server("docker.io"), "https://registry-1.docker.io");
        assert_eq!(default_server("localhost:5000"), "http://localhost:5000");
        assert_eq!(default_server("127.0.0.1"), "http://127.0.0.1");
        assert_eq!(
            default_server("registry.example.com:443"),
            "https://registry.example.com:443"
        );
        assert_eq!(mirror_url(9465), MIRROR);
    }

    fn peers(ids: &[&str]) -> Vec<Peer> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Peer::configured(id, &format!("10.0.0.{}:9465", i + 1), None).unwrap())
            .collect()
    }

    #[test]
    fn a_miss_goes_to_the_home_peers_up_to_this_node_then_upstream() {
        let ps = peers(&["a", "b", "c", "d"]);
        for i in 0..200 {
            let d = format!("sha256:{i:064x}");
            let order: Vec<&str> = home_peers(&d, &ps, None)
                .iter()
                .map(|p| p.id.as_str())
                .collect();
            for me in ["a", "b", "c", "d"] {
                let plan = plan_sources(&d, &ps, me, None, &[]);
                let pos = order.iter().position(|id| *id == me).unwrap();
                // The peers before this node in the digest's order, then upstream: so when the
                // home is gone every node turns to the same next peer.
                let expect: Vec<Source> = order[..pos]
                    .iter()
                    .map(|id| Source::Peer {
                        id: id.to_string(),
                        addr: ps.iter().find(|p| p.id == *id).unwrap().addr.clone(),
                    })
                    .chain([Source::Upstream])
                    .collect();
                assert_eq!(plan, expect);
            }
            // Down peers are left out; a node outside the list goes upstream after every peer.
            let plan = plan_sources(&d, &ps, "z", None, &[order[0]]);
            assert_eq!(plan.len(), 4);
            assert!(!plan.contains(&Source::Peer {
                id: order[0].to_string(),
                addr: ps.iter().find(|p| p.id == order[0]).unwrap().addr.clone(),
            }));
            assert_eq!(plan.last(), Some(&Source::Upstream));
        }
    }

    #[test]
    fn callers_are_told_apart_by_token_then_by_address() {
        let t = Token::parse("  s3cret-s3cret-s3cret\n").unwrap();
        assert_eq!(t.as_str(), "s3cret-s3cret-s3cret");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let ok = Some(&b"s3cret-s3cret-s3cret"[..]);
        let bad = Some(&b"s3cret-s3cret-s3creT"[..]);
        assert_eq!(classify_caller(Some(&t), ok, false), Caller::Peer);
        assert_eq!(classify_caller(Some(&t), ok, true), Caller::Peer);
        assert_eq!(classify_caller(Some(&t), bad, true), Caller::Stranger);
        assert_eq!(classify_caller(Some(&t), None, true), Caller::Local);
        assert_eq!(classify_caller(Some(&t), None, false), Caller::Stranger);
        assert_eq!(classify_caller(None, ok, true), Caller::Stranger);
        assert_eq!(classify_caller(None, None, true), Caller::Local);
        assert!(!t.matches(b"s3cret-s3cret-s3cret-longer"));
        assert!(!t.matches(b""));
        assert!(Token::parse("short").is_err());
        assert!(Token::parse("a long token with spaces inside").is_err());
    }

    #[test]
    fn configured_peers_are_checked() {
        assert!(Peer::configured("n1", "10.0.0.1:9465", Some("a")).is_ok());
        assert_eq!(
            Peer::configured("n1", "[fd00::1]:9465", Some("")).unwrap(),
            Peer {
                id: "n1".into(),
                addr: "[fd00::1]:9465".into(),
                zone: None,
                ready: true,
            }
        );
        for (id, addr) in [
            ("", "10.0.0.1:9465"),
            ("n 1", "10.0.0.1:9465"),
            ("n1", "node-1:9465"),
            ("n1", "10.0.0.1"),
            ("n1", "0.0.0.0:9465"),
            ("n1", "10.0.0.1:0"),
        ] {
            let e = Peer::configured(id, addr, None).unwrap_err();
            assert_eq!(e.metric_label(), "invalid_peer", "{id} {addr}");
        }
        assert!(validate_dns_label("ragent-peers").is_ok());
        for bad in ["", "-x", "x-", "Ragent", "a.b", &"x".repeat(64)] {
            assert!(validate_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_slices_give_one_peer_per_node() {
        let ep =
            |node: &str, ip: &str, ready: Option<bool>, terminating: Option<bool>| SliceEndpoint {
                addresses: vec![ip.to_string()],
                ready,
                terminating,
                node_name: Some(node.to_string()),
                zone: Some("zone-a".into()),
            };
        let got = peers_from_slices(
            &[
                ep("n2", "10.0.0.2", Some(true), None),
                // Unknown readiness counts as ready.
                ep("n1", "10.0.0.1", None, None),
                ep("n3", "10.0.0.3", Some(true), Some(true)),
                ep("n4", "fd00::4", Some(false), None),
                // The same node again (two slices during a rollout): the ready entry wins.
                ep("n4", "fd00::5", Some(true), None),
                ep("n5", "not-an-ip", Some(true), None),
                SliceEndpoint {
                    addresses: vec!["10.0.0.6".into()],
                    ..Default::default()
                },
            ],
            9465,
        );
        let view: Vec<(&str, &str, bool)> = got
            .iter()
            .map(|p| (p.id.as_str(), p.addr.as_str(), p.ready))
            .collect();
        assert_eq!(
            view,
            vec![
                ("n1", "10.0.0.1:9465", true),
                ("n2", "10.0.0.2:9465", true),
                ("n3", "10.0.0.3:9465", false),
                ("n4", "[fd00::5]:9465", true),
            ]
        );
        assert!(got.iter().all(|p| p.zone.as_deref() == Some("zone-a")));
    }

    #[test]
    fn digests_are_checked_incrementally() {
        let mut h = digest_hasher("sha256:x").unwrap();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(
            h.finish(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = digest_hasher("sha512:x").unwrap();
        h.update(b"abc");
        assert!(h.finish().starts_with("sha512:ddaf35a193617aba"));
        assert!(digest_hasher("md5:x").is_none());
        assert!(Fallback::Cut.marks_down() && !Fallback::Status.marks_down());
    }

    #[test]
    fn basic_credentials_are_read_and_check_keys_hold_no_secret() {
        // "puller:s3:cret" (a colon in the password stays in it).
        assert_eq!(
            basic_credentials("Basic cHVsbGVyOnMzOmNyZXQ="),
            Some(("puller".into(), "s3:cret".into()))
        );
        assert_eq!(
            basic_credentials("basic cHVsbGVyOnMzOmNyZXQ="),
            Some(("puller".into(), "s3:cret".into()))
        );
        for bad in ["Bearer abc", "Basic !!!", "Basic OnB3", "Basic", ""] {
            assert_eq!(basic_credentials(bad), None, "{bad}");
        }
        let k = check_key("Basic cHVsbGVyOnMzOmNyZXQ=", "r:5000", "team/app");
        assert_ne!(
            k,
            check_key("Basic cHVsbGVyOnMzOmNyZXQ=", "r:5000", "team/other")
        );
        assert_ne!(
            k,
            check_key("Basic cHVsbGVyOnMzOmNyZXQ=", "r:500", "0/team/app")
        );
        assert!(!k.windows(6).any(|w| w == b"puller"));
    }

    #[test]
    fn a_range_gives_its_first_byte_before_the_length_is_known() {
        assert_eq!(range_start(None), Some(0));
        assert_eq!(range_start(Some("bytes=100-")), Some(100));
        assert_eq!(range_start(Some(" bytes=5-9")), Some(5));
        // A suffix range needs the length first; anything else is not a range we serve.
        for bad in ["bytes=-10", "items=0-", "bytes=x-", "bytes=10"] {
            assert_eq!(range_start(Some(bad)), None, "{bad}");
        }
    }
}
