//! Registries that demand credentials, for the authentication tests: an extra
//! `docker-registry serve` on a free loopback port that serves the test node's registry storage
//! read-only (the sample images are already there, nothing is pushed), with either
//!
//! - htpasswd auth (bcrypt hashes made here), or
//! - token auth: the registry sends a bearer challenge naming [`TokenIssuer`], a small HTTP
//!   server in this process that checks basic credentials and issues an ES256 JWT whose `x5c`
//!   header carries a self-signed certificate; that certificate is the registry's
//!   `rootcertbundle`. Distribution 2.8 checks `iss`, `aud` (= its `service`), `exp`/`nbf` and
//!   the `access` claim (`[{type: "repository", name, actions: ["pull"]}]`).
//!
//! Every process and thread started here is stopped when its guard drops (by PID, bounded).
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle, sleep},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair},
};
use serde_json::json;

use crate::{http, node::Node};

/// The registry's `service` (the token's audience) and the issuer's name.
pub const SERVICE: &str = "ragent-test-registry";
pub const ISSUER: &str = "ragent-test-issuer";

/// How the extra registry asks for credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// `auth: htpasswd` (HTTP basic against bcrypt hashes).
    Htpasswd,
    /// `auth: token` with [`TokenIssuer`] as the realm.
    Token,
}

/// A running auth-protected registry; stopped on drop.
pub struct AuthRegistry {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// The registry's log (access log included).
    pub log: PathBuf,
    pub issuer: Option<TokenIssuer>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl AuthRegistry {
    /// Starts a registry over `node`'s storage that accepts only `user`/`password`.
    pub fn start(node: &Node, kind: AuthKind, user: &str, password: &str) -> Result<AuthRegistry> {
        let port = free_port()?;
        let dir = node.dir().join(format!("auth-registry-{port}"));
        fs::create_dir_all(&dir)?;
        let (auth, issuer) = match kind {
            AuthKind::Htpasswd => {
                let hash = bcrypt::hash(password, 4).context("bcrypt")?;
                let htpasswd = dir.join("htpasswd");
                fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
                (
                    format!(
                        "  htpasswd:\n    realm: ragent-test\n    path: {}\n",
                        htpasswd.display()
                    ),
                    None,
                )
            }
            AuthKind::Token => {
                let issuer = TokenIssuer::start(user, password)?;
                let bundle = dir.join("issuer.pem");
                fs::write(&bundle, &issuer.cert_pem)?;
                (
                    format!(
                        "  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    \
                         issuer: {ISSUER}\n    rootcertbundle: {}\n",
                        issuer.addr,
                        bundle.display()
                    ),
                    Some(issuer),
                )
            }
        };
        // Read-only, no upload purging: the node's own registry owns this storage.
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    \
             uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\nauth:\n{auth}",
            node.dir().join("registry").display()
        );
        let cfg = dir.join("registry.yml");
        fs::write(&cfg, config)?;
        let log = dir.join("registry.log");
        let out = fs::File::create(&log)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("starting docker-registry (cargo xtask setup installs it)")?;
        let mut reg = AuthRegistry {
            child,
            port,
            dir,
            log,
            issuer,
        };
        // Up once /v2/ asks for credentials.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            if matches!(http::get(addr, "/v2/"), Ok((401, _))) {
                return Ok(reg);
            }
            if let Some(status) = reg.child.try_wait()? {
                bail!(
                    "the auth registry exited ({status}): {}",
                    fs::read_to_string(&reg.log).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the auth registry on {addr} did not answer 401 on /v2/ within 20 s: {}",
                    fs::read_to_string(&reg.log).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host())
    }

    /// The registry's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        // SIGTERM to the registry we started (by PID), then SIGKILL after 5 s.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token service on loopback: `GET /token?service=..&scope=repository:NAME:pull` with basic
/// credentials answers `{"token": JWT}`; wrong or missing credentials answer 401.
pub struct TokenIssuer {
    pub addr: SocketAddr,
    /// PEM of the self-signed certificate of the signing key (the registry's rootcertbundle).
    pub cert_pem: String,
    /// Tokens issued / requests refused so far.
    pub issued: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Issuer {
    user: String,
    password: String,
    key: EcdsaKeyPair,
    cert_der_b64: String,
    rng: SystemRandom,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl TokenIssuer {
    pub fn start(user: &str, password: &str) -> Result<TokenIssuer> {
        let key_pair = rcgen::KeyPair::generate().context("generating the issuer key")?;
        let cert = rcgen::CertificateParams::new(vec![ISSUER.to_string()])
            .context("certificate parameters")?
            .self_signed(&key_pair)
            .context("self-signing the issuer certificate")?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("loading the issuer key: {e}"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let issuer = Issuer {
            user: user.into(),
            password: password.into(),
            key,
            cert_der_b64: STANDARD.encode(cert.der()),
            rng,
            issued: issued.clone(),
            refused: refused.clone(),
        };
        let stop2 = stop.clone();
        let thread = thread::Builder::new()
            .name("token-issuer".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = issuer.serve(s);
                        }
                        Err(_) => sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        Ok(TokenIssuer {
            addr,
            cert_pem: cert.pem(),
            issued,
            refused,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Issuer {
    /// One request per connection (answered with `Connection: close`).
    fn serve(&self, stream: TcpStream) -> Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut authorization = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.trim().eq_ignore_ascii_case("authorization")
            {
                authorization = Some(v.trim().to_string());
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let params: Vec<(String, String)> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect();
        let (status, body) = if path != "/token" {
            (404, json!({"error": "not found"}).to_string())
        } else if !self.authorized(authorization.as_deref()) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            (401, json!({"error": "wrong user or password"}).to_string())
        } else {
            let token = self.token(&params)?;
            self.issued.fetch_add(1, Ordering::Relaxed);
            (
                200,
                json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
            )
        };
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            _ => "Not Found",
        };
        let mut w = stream;
        write!(
            w,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n{}\r\n{body}",
            body.len(),
            if status == 401 {
                "WWW-Authenticate: Basic realm=\"ragent-test\"\r\n"
            } else {
                ""
            }
        )?;
        w.flush()?;
        Ok(())
    }

    fn authorized(&self, header: Option<&str>) -> bool {
        let Some(b64) = header.and_then(|h| h.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(bytes) = STANDARD.decode(b64.trim()) else {
            return false;
        };
        String::from_utf8_lossy(&bytes) == format!("{}:{}", self.user, self.password)
    }

    /// A JWT granting `pull` on every repository scope asked for.
    fn token(&self, params: &[(String, String)]) -> Result<String> {
        let access: Vec<_> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                let pull = actions.split(',').any(|a| a == "pull");
                (kind == "repository" && pull)
                    .then(|| json!({"type": "repository", "name": name, "actions": ["pull"]}))
            })
            .collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [self.cert_der_b64]});
        let claims = json!({
            "iss": ISSUER,
            "sub": self.user,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now.saturating_sub(5),
            "iat": now,
            "jti": format!("{now}-{}", self.issued.load(Ordering::Relaxed)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing the token: {e}"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

/// A docker config.json with one `auth` entry for `host`.
pub fn docker_config(host: &str, user: &str, password: &str) -> String {
    json!({"auths": {host: {"auth": STANDARD.encode(format!("{user}:{password}"))}}}).to_string()
}

/// A `kubernetes.io/dockerconfigjson` Secret as `kubectl get secret NAME -o json` prints it.
pub fn pull_secret(name: &str, config_json: &str) -> String {
    serde_json::to_string_pretty(&json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": STANDARD.encode(config_json)}
    }))
    .unwrap_or_default()
}

/// The same secret as `kubectl get secret NAME -o yaml` prints it.
pub fn pull_secret_yaml(name: &str, config_json: &str) -> String {
    format!(
        "apiVersion: v1\ndata:\n  .dockerconfigjson: {}\nkind: Secret\nmetadata:\n  name: {name}\n  \
         namespace: default\ntype: kubernetes.io/dockerconfigjson\n",
        STANDARD.encode(config_json)
    )
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("repository%3Aragent%2Frun%3Apull"),
            "repository:ragent/run:pull"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }

    #[test]
    fn issuer_refuses_wrong_credentials_and_signs_verifiable_tokens() {
        let issuer = TokenIssuer::start("u", "p").unwrap();
        let get = |auth: Option<&str>| {
            let mut s = TcpStream::connect(issuer.addr).unwrap();
            let h = auth
                .map(|a| format!("Authorization: Basic {}\r\n", STANDARD.encode(a)))
                .unwrap_or_default();
            write!(
                s,
                "GET /token?service={SERVICE}&scope=repository%3Aragent%2Frun%3Apull HTTP/1.1\r\n\
                 Host: x\r\n{h}\r\n"
            )
            .unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).unwrap();
            out
        };
        assert!(get(None).starts_with("HTTP/1.1 401"));
        assert!(get(Some("u:wrong")).starts_with("HTTP/1.1 401"));
        let ok = get(Some("u:p"));
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let body: serde_json::Value =
            serde_json::from_str(ok.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let token = body["token"].as_str().unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], SERVICE);
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(
            claims["access"],
            json!([{"type": "repository", "name": "ragent/run", "actions": ["pull"]}])
        );
        // The signature verifies with the certificate's key (what the registry does).
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(sig.len(), 64, "ES256 signatures are r||s");
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            issuer_public_key(&issuer),
        );
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        assert_eq!(issuer.issued.load(Ordering::Relaxed), 1);
        assert_eq!(issuer.refused.load(Ordering::Relaxed), 2);
    }

    /// The uncompressed P-256 point at the end of the certificate's SubjectPublicKeyInfo.
    fn issuer_public_key(issuer: &TokenIssuer) -> Vec<u8> {
        let pem = &issuer.cert_pem;
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(b64).unwrap();
        // id-ecPublicKey + prime256v1 OIDs, then BIT STRING (0x03 0x42 0x00) + 65-byte point.
        let marker = [0x03, 0x42, 0x00, 0x04];
        let i = der
            .windows(4)
            .position(|w| w == marker)
            .expect("an uncompressed P-256 key");
        der[i + 3..i + 3 + 65].to_vec()
    }
}
