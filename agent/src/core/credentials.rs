//! Registry credentials from the files a node already has: a docker `config.json` (also what a
//! `kubernetes.io/dockerconfigjson` secret holds when mounted as a volume), a Kubernetes Secret
//! of that type as `kubectl get secret NAME -o json` (or `-o yaml`) prints it, or the legacy
//! `kubernetes.io/dockercfg` form.
//!
//! Pure: callers hand in the file's text; the lookup is by registry host, with `docker.io`,
//! `index.docker.io` and `registry-1.docker.io` the same host and any scheme or path in a key
//! (`https://index.docker.io/v1/`) ignored.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use base64::{
    Engine,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use serde_json::{Map, Value};

/// The secret type whose `data[".dockerconfigjson"]` is a docker config.json.
pub const SECRET_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// The older secret type whose `data[".dockercfg"]` is the bare `auths` map.
pub const SECRET_TYPE_LEGACY: &str = "kubernetes.io/dockercfg";

/// Docker writes padded standard base64; hand-written files sometimes drop the padding.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What to present to one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (HTTP basic, or basic to the registry's token service).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken`) to trade at the registry's token service.
    IdentityToken { token: String },
    /// A bearer token sent to the registry as is (`registrytoken`).
    RegistryToken { token: String },
}

impl fmt::Debug for Credential {
    /// Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credential::IdentityToken { .. } => f.write_str("IdentityToken(<redacted>)"),
            Credential::RegistryToken { .. } => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

/// Credentials by registry host (normalized with [`normalize_host`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The file they came from, for messages (None: no file, anonymous everywhere).
    pub source: Option<PathBuf>,
    by_host: BTreeMap<String, Credential>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "cannot read the auth file {path}: {source}; --auth takes a docker config.json or a \
         kubernetes.io/dockerconfigjson secret file"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the auth file {path} is neither JSON nor YAML ({reason}); --auth takes a docker \
         config.json or a secret as printed by `kubectl get secret NAME -o json` (or -o yaml)"
    )]
    Syntax { path: PathBuf, reason: String },
    #[error(
        "the auth file {path} is a Kubernetes secret of type {found:?}, which holds no registry \
         credentials; use a secret of type {SECRET_TYPE} (`kubectl create secret docker-registry`)"
    )]
    SecretType { path: PathBuf, found: String },
    #[error("the {SECRET_TYPE} secret in {path} has no {key}: it holds no registry credentials")]
    SecretKey { path: PathBuf, key: String },
    #[error("{field} in {path} is not valid base64 ({reason}); re-create the file or the secret")]
    Base64 {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error(
        "the auth of {host:?} in {path} does not decode to USER:PASSWORD (no ':'); write it as \
         base64 of \"user:password\""
    )]
    NoColon { path: PathBuf, host: String },
    #[error("the auth file {path} is not a docker config.json: {reason}")]
    Shape { path: PathBuf, reason: String },
}

impl CredentialsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CredentialsError::Read { .. } => "auth_file_read",
            CredentialsError::Syntax { .. } => "auth_file_syntax",
            CredentialsError::SecretType { .. } | CredentialsError::SecretKey { .. } => {
                "auth_file_secret"
            }
            CredentialsError::Base64 { .. } | CredentialsError::NoColon { .. } => "auth_file_entry",
            CredentialsError::Shape { .. } => "auth_file_shape",
        }
    }
}

/// The host part of an `auths` key or a reference's registry: no scheme, no path, lower case,
/// and Docker Hub's aliases folded into `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let key = key.trim();
    let no_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = no_scheme
        .split('/')
        .next()
        .unwrap_or(no_scheme)
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

impl Credentials {
    /// No credentials: every registry is asked anonymously.
    pub fn anonymous() -> Credentials {
        Credentials::default()
    }

    /// Parses the text of an auth file (JSON, or YAML for a secret from `kubectl -o yaml`);
    /// `path` only names it in errors.
    ///
    /// Accepted: a docker config.json (`{"auths": {...}}`), a Secret of type
    /// `kubernetes.io/dockerconfigjson` (`data[".dockerconfigjson"]` base64, or
    /// `stringData[".dockerconfigjson"]` as text) or `kubernetes.io/dockercfg`.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Credentials, CredentialsError> {
        let path = path.as_ref();
        let doc = document(path, text)?;
        let obj = doc.as_object().ok_or_else(|| CredentialsError::Shape {
            path: path.into(),
            reason: "the top level is not an object".into(),
        })?;
        let by_host = if obj.get("kind").and_then(Value::as_str) == Some("Secret") {
            from_secret(path, obj)?
        } else {
            from_config(path, obj)?
        };
        Ok(Credentials {
            source: Some(path.into()),
            by_host,
        })
    }

    /// The credential for a registry host (`127.0.0.1:5000`, `docker.io`, `ghcr.io`).
    pub fn for_host(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(host))
    }

    /// The hosts that have credentials, normalized.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.by_host.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// Adds every host of `other` (its entry wins where both have one: later secrets of a
    /// pod's list override earlier ones, as kubelet does).
    pub fn merge(&mut self, other: &Credentials) {
        for (h, c) in &other.by_host {
            self.by_host.insert(h.clone(), c.clone());
        }
        if self.source.is_none() {
            self.source.clone_from(&other.source);
        }
    }

    /// Adds (or replaces) the credential of one host.
    pub fn insert(&mut self, host: &str, credential: Credential) {
        self.by_host.insert(normalize_host(host), credential);
    }
}

/// The file as a JSON value: JSON first; a file that is not JSON may be YAML (a mapping).
fn document(path: &Path, text: &str) -> Result<Value, CredentialsError> {
    let json_err = match serde_json::from_str::<Value>(text) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let syntax = |reason: String| CredentialsError::Syntax {
        path: path.into(),
        reason,
    };
    // Something that starts like JSON gets the JSON parser's message.
    if text.trim_start().starts_with(['{', '[']) {
        return Err(syntax(json_err.to_string()));
    }
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(syntax("not a JSON object or a YAML mapping".into())),
        Err(e) => Err(syntax(e.to_string())),
    }
}

fn from_secret(
    path: &Path,
    secret: &Map<String, Value>,
) -> Result<BTreeMap<String, Credential>, CredentialsError> {
    let found = secret
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("Opaque");
    let key = match found {
        SECRET_TYPE => ".dockerconfigjson",
        SECRET_TYPE_LEGACY => ".dockercfg",
        _ => {
            return Err(CredentialsError::SecretType {
                path: path.into(),
                found: found.into(),
            });
        }
    };
    let field = |section: &str| {
        secret
            .get(section)
            .and_then(|d| d.get(key))
            .and_then(Value::as_str)
    };
    let text = if let Some(b64) = field("data") {
        let bytes = B64
            .decode(b64.trim())
            .map_err(|e| CredentialsError::Base64 {
                path: path.into(),
                field: format!("data[{key:?}]"),
                reason: e.to_string(),
            })?;
        String::from_utf8(bytes).map_err(|e| CredentialsError::Base64 {
            path: path.into(),
            field: format!("data[{key:?}]"),
            reason: format!("not UTF-8 text: {e}"),
        })?
    } else if let Some(t) = field("stringData") {
        t.to_string()
    } else {
        return Err(CredentialsError::SecretKey {
            path: path.into(),
            key: format!("data[{key:?}]"),
        });
    };
    let inner: Value = serde_json::from_str(&text).map_err(|e| CredentialsError::Syntax {
        path: path.into(),
        reason: format!("data[{key:?}]: {e}"),
    })?;
    let obj = inner.as_object().ok_or_else(|| CredentialsError::Shape {
        path: path.into(),
        reason: format!("data[{key:?}] is not a JSON object"),
    })?;
    if key == ".dockercfg" {
        auths(path, obj)
    } else {
        from_config(path, obj)
    }
}

fn from_config(
    path: &Path,
    config: &Map<String, Value>,
) -> Result<BTreeMap<String, Credential>, CredentialsError> {
    match config.get("auths") {
        Some(Value::Object(a)) => auths(path, a),
        Some(_) => Err(CredentialsError::Shape {
            path: path.into(),
            reason: "\"auths\" is not an object".into(),
        }),
        None if config.contains_key("credsStore") || config.contains_key("credHelpers") => {
            Err(CredentialsError::Shape {
                path: path.into(),
                reason: "it names credential helpers (credsStore/credHelpers), which ragent does \
                         not run, and has no \"auths\"; write the credentials into \"auths\" \
                         (e.g. `kubectl create secret docker-registry` does)"
                    .into(),
            })
        }
        None => Err(CredentialsError::Shape {
            path: path.into(),
            reason: "it has no \"auths\" object".into(),
        }),
    }
}

fn auths(
    path: &Path,
    auths: &Map<String, Value>,
) -> Result<BTreeMap<String, Credential>, CredentialsError> {
    let mut out = BTreeMap::new();
    for (key, entry) in auths {
        let entry = entry.as_object().ok_or_else(|| CredentialsError::Shape {
            path: path.into(),
            reason: format!("the entry of {key:?} in \"auths\" is not an object"),
        })?;
        let text = |f: &str| {
            entry
                .get(f)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let credential = if let Some(token) = text("identitytoken") {
            Some(Credential::IdentityToken {
                token: token.into(),
            })
        } else if let Some(token) = text("registrytoken") {
            Some(Credential::RegistryToken {
                token: token.into(),
            })
        } else if let Some(auth) = text("auth") {
            let field = format!("auths[{key:?}].auth");
            let bytes = B64
                .decode(auth.trim())
                .map_err(|e| CredentialsError::Base64 {
                    path: path.into(),
                    field: field.clone(),
                    reason: e.to_string(),
                })?;
            let pair = String::from_utf8(bytes).map_err(|e| CredentialsError::Base64 {
                path: path.into(),
                field,
                reason: format!("not UTF-8 text: {e}"),
            })?;
            let (username, password) =
                pair.split_once(':')
                    .ok_or_else(|| CredentialsError::NoColon {
                        path: path.into(),
                        host: key.clone(),
                    })?;
            Some(Credential::Basic {
                username: username.into(),
                password: password.into(),
            })
        } else {
            text("username").map(|username| Credential::Basic {
                username: username.into(),
                password: text("password").unwrap_or_default().into(),
            })
        };
        // An empty entry (what docker writes next to a credsStore) is no credential.
        if let Some(c) = credential {
            // Keys are visited in sorted order: the first of two aliases of a host wins.
            out.entry(normalize_host(key)).or_insert(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn docker_config_with_auth_user_password_and_tokens() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"username": "u", "password": "p"}},
                "ghcr.io": {{"identitytoken": "refresh"}},
                "quay.io": {{"registrytoken": "tok"}},
                "empty.example": {{}}
              }},
              "credsStore": "desktop"}}"#,
            b64("alice:pa:ss")
        );
        let c = Credentials::parse("/x/config.json", &text).unwrap();
        assert_eq!(c.for_host("docker.io"), Some(&basic("alice", "pa:ss")));
        assert_eq!(
            c.for_host("index.docker.io"),
            Some(&basic("alice", "pa:ss"))
        );
        assert_eq!(c.for_host("127.0.0.1:5000"), Some(&basic("u", "p")));
        assert_eq!(c.for_host("127.0.0.1:5001"), None);
        assert_eq!(
            c.for_host("ghcr.io"),
            Some(&Credential::IdentityToken {
                token: "refresh".into()
            })
        );
        assert_eq!(
            c.for_host("QUAY.io"),
            Some(&Credential::RegistryToken {
                token: "tok".into()
            })
        );
        assert_eq!(c.for_host("empty.example"), None);
        assert_eq!(
            c.source.as_deref(),
            Some(std::path::Path::new("/x/config.json"))
        );
    }

    #[test]
    fn kubectl_secret_json_and_string_data() {
        let config = format!(
            r#"{{"auths":{{"reg.example:5000":{{"auth":"{}"}}}}}}"#,
            b64("a:b")
        );
        let secret = format!(
            r#"{{"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/dockerconfigjson",
                "metadata":{{"name":"pull"}},"data":{{".dockerconfigjson":"{}"}}}}"#,
            b64(&config)
        );
        let c = Credentials::parse("s.json", &secret).unwrap();
        assert_eq!(c.for_host("reg.example:5000"), Some(&basic("a", "b")));
        let string_data = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE,
            "stringData": {".dockerconfigjson": config}
        });
        let c = Credentials::parse("s.json", &string_data.to_string()).unwrap();
        assert_eq!(c.for_host("reg.example:5000"), Some(&basic("a", "b")));
        // The legacy type: the bare auths map.
        let legacy = serde_json::json!({
            "kind": "Secret", "type": SECRET_TYPE_LEGACY,
            "data": {".dockercfg": b64(&format!(r#"{{"r.example":{{"auth":"{}"}}}}"#, b64("x:y")))}
        });
        let c = Credentials::parse("s.json", &legacy.to_string()).unwrap();
        assert_eq!(c.for_host("r.example"), Some(&basic("x", "y")));
    }

    #[test]
    fn kubectl_secret_yaml() {
        let config = format!(
            r#"{{"auths":{{"reg.example:5000":{{"auth":"{}"}}}}}}"#,
            b64("a:b")
        );
        let yaml = format!(
            "apiVersion: v1\ndata:\n  .dockerconfigjson: {}\nkind: Secret\nmetadata:\n  \
             name: pull\n  namespace: default\ntype: kubernetes.io/dockerconfigjson\n",
            b64(&config)
        );
        let c = Credentials::parse("s.yaml", &yaml).unwrap();
        assert_eq!(c.for_host("reg.example:5000"), Some(&basic("a", "b")));
        // A config.json written as YAML works too.
        let c = Credentials::parse(
            "c.yaml",
            "auths:\n  r.example:\n    username: u\n    password: p\n",
        )
        .unwrap();
        assert_eq!(c.for_host("r.example"), Some(&basic("u", "p")));
    }

    #[test]
    fn errors_name_the_file_and_say_what_to_do() {
        let e = Credentials::parse("/a/f", "{\"auths\": {").unwrap_err();
        assert!(matches!(e, CredentialsError::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("/a/f") && e.to_string().contains("kubectl get secret"));
        let e = Credentials::parse("/a/f", "auths: [unclosed").unwrap_err();
        assert!(matches!(e, CredentialsError::Syntax { .. }), "{e}");
        let e = Credentials::parse("/a/f", "just text").unwrap_err();
        assert!(matches!(e, CredentialsError::Syntax { .. }), "{e}");

        let e = Credentials::parse("/a/f", r#"{"kind":"Secret","type":"Opaque","data":{}}"#)
            .unwrap_err();
        assert!(matches!(e, CredentialsError::SecretType { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("kubectl create secret docker-registry"),
            "{e}"
        );

        let e = Credentials::parse(
            "/a/f",
            r#"{"kind":"Secret","type":"kubernetes.io/dockerconfigjson","data":{}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, CredentialsError::SecretKey { .. }), "{e}");

        let e = Credentials::parse(
            "/a/f",
            r#"{"kind":"Secret","type":"kubernetes.io/dockerconfigjson","data":{".dockerconfigjson":"%%%"}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, CredentialsError::Base64 { .. }), "{e}");

        let e = Credentials::parse("/a/f", r#"{"auths":{"r":{"auth":"!!"}}}"#).unwrap_err();
        assert!(matches!(e, CredentialsError::Base64 { .. }), "{e}");
        assert!(e.to_string().contains(r#"auths["r"].auth"#), "{e}");

        let text = format!(r#"{{"auths":{{"r":{{"auth":"{}"}}}}}}"#, b64("nocolon"));
        let e = Credentials::parse("/a/f", &text).unwrap_err();
        assert!(matches!(e, CredentialsError::NoColon { .. }), "{e}");

        let e = Credentials::parse("/a/f", r#"{"credsStore":"osxkeychain"}"#).unwrap_err();
        assert!(e.to_string().contains("credential helpers"), "{e}");
        let e = Credentials::parse("/a/f", r#"{"auths":[]}"#).unwrap_err();
        assert!(matches!(e, CredentialsError::Shape { .. }), "{e}");
        assert_eq!(e.metric_label(), "auth_file_shape");
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_host("registry-1.docker.io"), "docker.io");
        assert_eq!(normalize_host("http://127.0.0.1:5000/v2"), "127.0.0.1:5000");
        assert_eq!(normalize_host("GHCR.io"), "ghcr.io");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let shown = format!(
            "{:?} {:?}",
            basic("bob", "hunter2"),
            Credential::RegistryToken {
                token: "sekrit".into()
            }
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("sekrit"),
            "{shown}"
        );
        assert!(shown.contains("bob"));
    }

    proptest! {
        /// Any user (no ':') and password survive config.json → secret → lookup, under any
        /// spelling of the host's key.
        #[test]
        fn round_trip_through_config_and_secret(
            user in "[^:\u{0}]{0,16}",
            pass in "\\PC{0,24}",
            host in "[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?",
            scheme in prop::sample::select(vec!["", "https://", "http://"]),
            path in prop::sample::select(vec!["", "/", "/v1/", "/v2/x"]),
        ) {
            let key = format!("{scheme}{host}{path}");
            let config = serde_json::json!({"auths": {key: {"auth": b64(&format!("{user}:{pass}"))}}})
                .to_string();
            let c = Credentials::parse("c", &config).unwrap();
            prop_assert_eq!(c.for_host(&host), Some(&basic(&user, &pass)));
            let secret = serde_json::json!({
                "kind": "Secret", "type": SECRET_TYPE, "data": {".dockerconfigjson": b64(&config)}
            })
            .to_string();
            let s = Credentials::parse("s", &secret).unwrap();
            prop_assert_eq!(s.for_host(&host), Some(&basic(&user, &pass)));
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_is_an_error_or_credentials(text in "\\PC{0,200}") {
            let _ = Credentials::parse("x", &text);
        }
    }
}
