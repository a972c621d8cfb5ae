//! Parsing OCI / Docker image manifests, indexes and configs into ragent's own small model,
//! and choosing the manifest of an index that fits this node's platform.
use std::collections::BTreeMap;

use serde::Deserialize;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{what} {digest} is not valid JSON of the expected shape: {source}")]
    Malformed {
        what: &'static str,
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("media type {media_type:?} of {digest} is neither an image manifest nor an index")]
    UnsupportedMediaType { media_type: String, digest: String },
    #[error(
        "index {digest} has no manifest for {wanted} (it has: {available}); pull it for this platform or use a single-platform image"
    )]
    NoPlatform {
        digest: String,
        wanted: String,
        available: String,
    },
}

/// A content descriptor: what an image record, index entry or manifest points at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// The platform of the machine ragent runs on, in OCI spelling.
    pub fn this_node() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config ragent uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub diff_ids: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub env: Vec<String>,
}

impl ImageConfig {
    /// The value of an environment variable in the image's `Env`.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
        })
    }
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawRuntimeConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
struct RawRuntimeConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What an image record's target turned out to be.
#[derive(Debug, Clone)]
pub enum Target {
    Index(Index),
    Manifest(Manifest),
}

pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

/// Parses the blob an image record points at, by its media type.
pub fn parse_target(media_type: &str, digest: &str, bytes: &[u8]) -> Result<Target, OciError> {
    if is_index(media_type) {
        serde_json::from_slice(bytes)
            .map(Target::Index)
            .map_err(|source| OciError::Malformed {
                what: "index",
                digest: digest.into(),
                source,
            })
    } else if is_manifest(media_type) {
        parse_manifest(digest, bytes).map(Target::Manifest)
    } else {
        Err(OciError::UnsupportedMediaType {
            media_type: media_type.into(),
            digest: digest.into(),
        })
    }
}

pub fn parse_manifest(digest: &str, bytes: &[u8]) -> Result<Manifest, OciError> {
    serde_json::from_slice(bytes).map_err(|source| OciError::Malformed {
        what: "manifest",
        digest: digest.into(),
        source,
    })
}

pub fn parse_config(digest: &str, bytes: &[u8]) -> Result<ImageConfig, OciError> {
    let raw: RawConfig = serde_json::from_slice(bytes).map_err(|source| OciError::Malformed {
        what: "config",
        digest: digest.into(),
        source,
    })?;
    let rc = raw.config.unwrap_or_default();
    Ok(ImageConfig {
        os: raw.os,
        architecture: raw.architecture,
        variant: raw.variant,
        diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
        labels: rc.labels.unwrap_or_default(),
        env: rc.env.unwrap_or_default(),
    })
}

/// Chooses the manifest of `index` for `want`: same os and architecture; an exact variant match
/// wins over an entry without variant. Attestation manifests (platform unknown/unknown) never match.
pub fn choose_platform<'a>(
    index_digest: &str,
    index: &'a Index,
    want: &Platform,
) -> Result<&'a Descriptor, OciError> {
    let candidates = index.manifests.iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
    });
    let mut best: Option<&Descriptor> = None;
    for d in candidates {
        let variant = d.platform.as_ref().and_then(|p| p.variant.as_deref());
        match (variant, want.variant.as_deref()) {
            (Some(v), Some(w)) if v == w => return Ok(d),
            (None, _) if best.is_none() => best = Some(d),
            (Some(_), None) if best.is_none() => best = Some(d),
            _ => {}
        }
    }
    best.ok_or_else(|| OciError::NoPlatform {
        digest: index_digest.into(),
        wanted: want.to_string(),
        available: index
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(platforms: &[(&str, &str, Option<&str>)]) -> Index {
        Index {
            manifests: platforms
                .iter()
                .enumerate()
                .map(|(i, (os, arch, var))| Descriptor {
                    media_type: MEDIA_OCI_MANIFEST.into(),
                    digest: format!("sha256:{i}"),
                    size: 1,
                    platform: Some(Platform {
                        os: (*os).into(),
                        architecture: (*arch).into(),
                        variant: var.map(str::to_string),
                    }),
                    annotations: BTreeMap::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn chooses_matching_os_and_arch() {
        let i = idx(&[("linux", "arm64", Some("v8")), ("linux", "amd64", None)]);
        let want = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        assert_eq!(
            choose_platform("sha256:i", &i, &want).unwrap().digest,
            "sha256:1"
        );
    }

    #[test]
    fn exact_variant_beats_first_match() {
        let i = idx(&[("linux", "arm", Some("v6")), ("linux", "arm", Some("v7"))]);
        let want = Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: Some("v7".into()),
        };
        assert_eq!(
            choose_platform("sha256:i", &i, &want).unwrap().digest,
            "sha256:1"
        );
    }

    #[test]
    fn missing_platform_names_what_is_there() {
        let i = idx(&[("linux", "arm64", None), ("unknown", "unknown", None)]);
        let err = choose_platform("sha256:i", &i, &Platform::this_node()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("linux/arm64") && msg.contains("unknown/unknown"),
            "{msg}"
        );
    }

    #[test]
    fn parses_config_labels_env_and_diff_ids() {
        let cfg = br#"{"os":"linux","architecture":"amd64","config":{"Env":["A=1","CNB_PLATFORM_API=0.12"],"Labels":{"k":"v"}},"rootfs":{"type":"layers","diff_ids":["sha256:a","sha256:b"]}}"#;
        let c = parse_config("sha256:c", cfg).unwrap();
        assert_eq!(c.diff_ids, vec!["sha256:a", "sha256:b"]);
        assert_eq!(c.env_var("CNB_PLATFORM_API"), Some("0.12"));
        assert_eq!(c.env_var("B"), None);
        assert_eq!(c.labels.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn config_without_labels_or_env_is_fine() {
        let c = parse_config(
            "sha256:c",
            br#"{"os":"linux","architecture":"amd64","config":{"Labels":null}}"#,
        )
        .unwrap();
        assert!(c.labels.is_empty() && c.env.is_empty() && c.diff_ids.is_empty());
    }

    #[test]
    fn unknown_media_type_is_an_error() {
        let e = parse_target("application/x-foo", "sha256:x", b"{}").unwrap_err();
        assert!(e.to_string().contains("application/x-foo"));
    }
}
