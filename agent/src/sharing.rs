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
//! Not here yet: forwarding a miss to the digest's home peer, single flight, membership,
//! the upstream credential check, peer authentication, metrics.
use std::{net::SocketAddr, path::Path, sync::Arc};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    adapters::{
        certsd::{CertsDir, Change, Installed, Restored},
        containerd::{Containerd, ContainerdError},
    },
    config::SharingSettings,
    peer::ContentSource,
};

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
}

/// Applies `[sharing]`: restores or installs the certs.d entries and, when enabled, starts the
/// peer server (stopped when `stop` turns true). A bind failure is an error; certs.d problems
/// are logged per registry and do not stop the agent.
pub async fn start(
    settings: &SharingSettings,
    socket: &Path,
    namespace: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<()>>, SharingRunError> {
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
    info!(addr = %settings.peer_addr, mirror = %settings.mirror, "serving peers (blobs and manifests by digest)");
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
    let source = LazyContainerd::new(socket, namespace);
    let policy = settings.public.clone();
    Ok(Some(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = crate::peer::serve(listener, source, policy, shutdown).await {
            warn!(error = %e, "the peer server failed");
        }
    })))
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
