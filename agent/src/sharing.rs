//! Layer sharing in the agent (`[sharing]`, docs/sharing.md): what exists of issue 8 so far.
//!
//! - `enabled = true`: the peer server listens on `peer_addr` (public content by digest from
//!   containerd's store, see [`crate::peer`]) and `certs_dir/<registry>/hosts.toml` names the
//!   local agent as a pull-only mirror for each of `registries` (entries for registries no
//!   longer listed are restored). The entries stay when the agent stops: containerd finds the
//!   port closed and goes on to the registry at once, and a restart does not rewrite them.
//! - `enabled = false` (the default): nothing listens, and every entry ragent wrote in
//!   `certs_dir` is restored to what was there before.
//!
//! - A blob this node misses goes to its home peer, or is fetched upstream once
//!   ([`crate::mesh`], [`crate::upstream`]); the same path serves the agent's pre-pulls.
//! - Membership: the static `peers` list (the EndpointSlice watch feeds the same channel).
//!
//! Not here yet: pods' pull secrets as a reason to serve private content.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        certsd::{CertsDir, Change, Installed, Restored},
        containerd::{Containerd, ContainerdError},
        registry::Registry,
    },
    config::SharingSettings,
    core::{oci::Descriptor, sharing::Peer},
    mesh::Mesh,
    metrics::SharingMetrics,
    peer::{ContentSource, PeerOptions},
    upstream::{AccessChecker, Flights, Keeper, UpstreamError, file_stream},
};

/// The mesh the agent runs: upstream is the registry, fetched blobs are kept in containerd.
pub type NodeMesh = Mesh<Registry, ContainerdKeeper>;

/// What [`start`] gives the rest of the agent.
pub struct Running {
    pub server: JoinHandle<()>,
    /// For the pre-pulls: misses go through the same home peers.
    pub mesh: Arc<NodeMesh>,
    /// Membership updates (the EndpointSlice watch sends here).
    pub peers: watch::Sender<Vec<Peer>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SharingRunError {
    #[error(
        "cannot listen for peers on {addr}: {source}; set [sharing] peer_addr to a free address \
         or turn sharing off ([sharing] enabled = false)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] UpstreamError),
}

/// Applies `[sharing]`: restores or installs the certs.d entries and, when enabled, starts the
/// peer server (stopped when `stop` turns true). A bind failure is an error; certs.d problems
/// are logged per registry and do not stop the agent. `node` is this node's peer id unless
/// `[sharing] node` names one.
pub async fn start(
    settings: &SharingSettings,
    socket: &Path,
    namespace: &str,
    node: &str,
    metrics: Option<SharingMetrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<Running>, SharingRunError> {
    let certs = CertsDir::new(&settings.certs_dir, &settings.mirror);
    if !settings.enabled {
        for (registry, r) in certs.restore_all() {
            log_restore(&registry, r);
        }
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(settings.peer_addr)
        .await
        .map_err(|source| SharingRunError::Bind {
            addr: settings.peer_addr,
            source,
        })?;
    let me = settings.node.clone().unwrap_or_else(|| node.to_string());
    info!(addr = %settings.peer_addr, mirror = %settings.mirror, node = %me, peers = settings.peers.len(), "serving peers (blobs and manifests by digest)");
    for (registry, r) in certs.sync(&settings.registries) {
        match r {
            Ok(Change::Installed(Installed::Unchanged)) => {
                debug!(%registry, "certs.d mirror entry already in place");
            }
            Ok(Change::Installed(i)) => {
                info!(%registry, change = ?i, dir = %settings.certs_dir.display(), "containerd now asks this agent first");
            }
            Ok(Change::Restored(r)) => log_restore(&registry, Ok(r)),
            Err(e) => {
                warn!(%registry, error = %e, reason = e.metric_label(), "cannot install the certs.d mirror entry");
            }
        }
    }
    if settings.token.is_none() {
        warn!(
            "[sharing] token_file is not set: no peers are asked, and other agents' requests are refused"
        );
    }
    let source = LazyContainerd::new(socket, namespace);
    let upstream = Registry::new(&settings.insecure_registries, settings.credentials.clone());
    let checker = Arc::new(AccessChecker::new(Arc::new(Registry::new(
        &settings.insecure_registries,
        crate::core::credentials::Credentials::anonymous(),
    ))));
    let keeper = ContainerdKeeper {
        store: source.clone(),
        keep: settings.keep,
    };
    let flights = Flights::new(&settings.spool_dir, upstream, keeper)?;
    let (peers_tx, peers_rx) = watch::channel(settings.peers.clone());
    let mesh = Mesh::new(
        &me,
        settings.zone.as_deref(),
        peers_rx,
        settings.token.clone(),
        settings.peer_timeout,
        flights,
        metrics.clone(),
    );
    let opts = PeerOptions {
        policy: settings.public.clone(),
        token: settings.token.clone(),
        listen_ip: Some(settings.peer_addr.ip()).filter(|ip| !ip.is_unspecified()),
        mesh: Some(mesh.clone()),
        metrics: metrics.clone(),
        checker: Some(checker),
    };
    let gauge_mesh = mesh.clone();
    let mut gauge_stop = stop.clone();
    if let Some(m) = metrics {
        tokio::spawn(async move {
            loop {
                let (ready, not_ready, down) = gauge_mesh.membership();
                m.peers.with_label_values(&["ready"]).set(ready);
                m.peers.with_label_values(&["not_ready"]).set(not_ready);
                m.peers.with_label_values(&["down"]).set(down);
                tokio::select! {
                    _ = gauge_stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        });
    }
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = crate::peer::serve(listener, source, opts, shutdown).await {
            warn!(error = %e, "the peer server failed");
        }
    });
    Ok(Some(Running {
        server,
        mesh,
        peers: peers_tx,
    }))
}

/// Keeps blobs fetched for peers in containerd's content store, under a lease that expires
/// after `keep` (so they are served from the store, and GC takes them later unless an image
/// uses them).
pub struct ContainerdKeeper {
    store: LazyContainerd,
    keep: std::time::Duration,
}

impl Keeper for ContainerdKeeper {
    async fn keep(
        &self,
        registry: &str,
        repository: &str,
        desc: &Descriptor,
        file: &Path,
    ) -> Result<(), ContainerdError> {
        let c = self.store.get().await?;
        let short = desc
            .digest
            .split(':')
            .nth(1)
            .unwrap_or("")
            .get(..16)
            .unwrap_or("");
        let lease = c
            .create_lease(
                &format!("ragent-share-{short}-{}", crate::prepull::nonce()),
                self.keep,
            )
            .await?;
        let labels = HashMap::from([(
            format!("containerd.io/distribution.source.{registry}"),
            repository.to_string(),
        )]);
        let path: PathBuf = file.to_path_buf();
        let r = c
            .write_blob(
                &lease,
                &format!("ragent-share-{}", desc.digest),
                desc,
                labels,
                move |offset| file_stream(&path, offset),
            )
            .await;
        match self.store.check(r).await {
            Ok(_) => Ok(()),
            // This node's own pull committed it first: it is in the store, which is the point.
            Err(e) => match c.content_size(&desc.digest).await {
                Ok(Some(_)) => Ok(()),
                _ => Err(e),
            },
        }
    }
}

fn log_restore(registry: &str, r: Result<Restored, crate::adapters::certsd::CertsdError>) {
    match r {
        Ok(Restored::NotOurs) => {
            warn!(%registry, "its hosts.toml was replaced by someone else since ragent wrote it; left as is");
        }
        Ok(Restored::Absent) => {}
        Ok(r) => info!(%registry, change = ?r, "certs.d mirror entry restored"),
        Err(e) => {
            warn!(%registry, error = %e, reason = e.metric_label(), "cannot restore the certs.d entry");
        }
    }
}

/// containerd's content store for the peer server, connected on first use and again after
/// containerd went away (the agent starts before containerd answers, and outlives restarts).
#[derive(Clone)]
pub struct LazyContainerd {
    socket: Arc<Path>,
    namespace: Arc<str>,
    conn: Arc<tokio::sync::Mutex<Option<Containerd>>>,
}

impl LazyContainerd {
    pub fn new(socket: &Path, namespace: &str) -> LazyContainerd {
        LazyContainerd {
            socket: socket.into(),
            namespace: namespace.into(),
            conn: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    async fn get(&self) -> Result<Containerd, ContainerdError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = Containerd::connect(&self.socket, &self.namespace).await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection when `e` says it is gone.
    async fn check<T>(&self, r: Result<T, ContainerdError>) -> Result<T, ContainerdError> {
        if let Err(e) = &r
            && e.is_disconnect()
        {
            *self.conn.lock().await = None;
        }
        r
    }
}

impl ContentSource for LazyContainerd {
    async fn size(&self, digest: &str) -> Result<Option<u64>, ContainerdError> {
        let c = self.get().await?;
        self.check(c.content_size(digest).await).await
    }

    async fn read(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<
        futures::stream::BoxStream<'static, Result<Vec<u8>, ContainerdError>>,
        ContainerdError,
    > {
        let c = self.get().await?;
        self.check(ContentSource::read(&c, digest, offset, len).await)
            .await
    }
}
