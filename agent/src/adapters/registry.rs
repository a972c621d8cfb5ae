//! An OCI distribution registry, through the `oci-client` crate: manifests (with an index
//! resolved to this node's platform) and blobs as streams, resumable from an offset.
//!
//! Each registry host gets its own credentials (from [`Credentials`]); `oci-client` answers the
//! registry's challenge: HTTP basic, or basic to the token service named by a bearer challenge.
use std::{path::PathBuf, sync::Once, time::Duration};

use futures::{Stream, StreamExt, TryStreamExt};
use oci_client::{
    Client, Reference,
    client::{BlobResponse, ClientConfig, ClientProtocol},
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

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference:?} is not an image reference: {reason}")]
    Reference { reference: String, reason: String },
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
        "the manifest of {reference} is {size} bytes, more than the {MAX_METADATA_BLOB} ragent accepts"
    )]
    TooLarge { reference: String, size: usize },
    #[error(
        "registry {registry} needs credentials to pull {repository} (401 Unauthorized): {}",
        needs_credentials_hint(registry, file.as_deref())
    )]
    NeedsCredentials {
        registry: String,
        repository: String,
        /// The auth file given, which has no entry for this registry.
        file: Option<PathBuf>,
    },
    #[error(
        "registry {registry} refused the credentials for {repository} (401 Unauthorized): check \
         the entry for {registry} in {}", file.display()
    )]
    CredentialsRefused {
        registry: String,
        repository: String,
        file: PathBuf,
    },
    #[error(
        "the entry for {registry} in {} is an identity token (OAuth refresh token), which ragent \
         cannot use yet: give a username and password (or \"auth\") for {registry} instead",
        file.display()
    )]
    UnsupportedCredential { registry: String, file: PathBuf },
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
            RegistryError::Request { .. } => "request",
            RegistryError::DigestMismatch { .. } => "digest",
            RegistryError::TooLarge { .. } => "too_large",
            RegistryError::NeedsCredentials { .. } => "auth_required",
            RegistryError::CredentialsRefused { .. } => "auth_refused",
            RegistryError::UnsupportedCredential { .. } => "auth_unsupported",
            RegistryError::Oci(_) => "manifest",
        }
    }
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
    client: Client,
    credentials: Credentials,
    platform: Platform,
}

/// Whether the registry answered 401 (on a manifest, or on a blob).
fn is_unauthorized(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::UnauthorizedError { .. } => true,
        E::ServerError { code, .. } => *code == 401,
        E::RequestError(r) => r.status().is_some_and(|s| s.as_u16() == 401),
        _ => false,
    }
}

static TLS_PROVIDER: Once = Once::new();

fn parse(reference: &str) -> Result<Reference, RegistryError> {
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::Reference {
            reference: reference.into(),
            reason: e.to_string(),
        })
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
        TLS_PROVIDER.call_once(|| {
            // Fails only if another provider was installed first, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure.to_vec()),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        Registry {
            client: Client::new(config),
            credentials,
            platform: Platform::this_node(),
        }
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
    fn request_error(
        &self,
        r: &Reference,
        what: String,
        e: oci_client::errors::OciDistributionError,
    ) -> RegistryError {
        if !is_unauthorized(&e) {
            return RegistryError::Request {
                reference: what,
                reason: e.to_string(),
            };
        }
        let (registry, repository) = (r.registry().to_string(), r.repository().to_string());
        match (
            self.credentials.for_host(&registry),
            &self.credentials.source,
        ) {
            (Some(_), Some(file)) => RegistryError::CredentialsRefused {
                registry,
                repository,
                file: file.clone(),
            },
            (None, file) => RegistryError::NeedsCredentials {
                registry,
                repository,
                file: file.clone(),
            },
            (Some(_), None) => RegistryError::NeedsCredentials {
                registry,
                repository,
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
            .client
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
        let (manifest_bytes, manifest_digest, media_type) =
            match oci::parse_target(&media_type, &digest, &bytes)? {
                Target::Manifest(_) => (bytes, digest, media_type),
                Target::Index(index) => {
                    let d = oci::choose_platform(&digest, &index, &self.platform)?.clone();
                    let by_digest =
                        parse(&format!("{}/{}@{}", r.registry(), r.repository(), d.digest))?;
                    let (mb, md) = self.manifest_raw(&by_digest, Some(&d.digest)).await?;
                    let mt = media_type_of(&mb);
                    (mb, md, mt)
                }
            };
        let manifest = oci::parse_manifest(&manifest_digest, &manifest_bytes)?;
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

    /// The bytes of a blob from `offset` on (a Range request when resuming).
    pub async fn blob(
        &self,
        reference: &str,
        digest: &str,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, std::io::Error>> + use<>, RegistryError> {
        let r = parse(reference)?;
        let err = |e: oci_client::errors::OciDistributionError| {
            self.request_error(&r, format!("{}@{digest}", r.whole()), e)
        };
        // The registry's credentials (anonymous without an entry) before the first blob
        // request: a blob may be fetched before any manifest of its registry.
        let auth = self.auth_for(&r)?;
        self.client
            .store_auth_if_needed(r.resolve_registry(), &auth)
            .await;
        let sized = if offset == 0 {
            self.client
                .pull_blob_stream(&r, digest)
                .await
                .map_err(err)?
        } else {
            match self
                .client
                .pull_blob_stream_partial(&r, digest, offset, None)
                .await
                .map_err(err)?
            {
                BlobResponse::Partial(s) => s,
                // The registry ignored the range: skip what containerd already has.
                BlobResponse::Full(s) => {
                    let mut skip = offset;
                    return Ok(s
                        .stream
                        .map_ok(move |chunk| {
                            let n = (skip.min(chunk.len() as u64)) as usize;
                            skip -= n as u64;
                            chunk[n..].to_vec()
                        })
                        .boxed());
                }
            }
        };
        Ok(sized.stream.map_ok(|b| b.to_vec()).boxed())
    }
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
