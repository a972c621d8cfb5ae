//! containerd over its gRPC socket: version, images, content reads, containers, events.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use containerd_client::{
    services::v1::{
        GetContainerRequest, GetImageRequest, InfoRequest, ListContainersRequest,
        ListContentRequest, ListImagesRequest, ReadContentRequest, SubscribeRequest,
        containers_client::ContainersClient, content_client::ContentClient,
        events_client::EventsClient, images_client::ImagesClient, version_client::VersionClient,
    },
    tonic::{Code, Request, Status, transport::Channel},
};
use futures::{Stream, StreamExt};
use tracing::instrument;

use crate::core::{
    oci::Descriptor,
    pulls::{BlobInfo, ImageInfo},
};

/// The largest manifest, index or config ragent reads into memory.
pub const MAX_METADATA_BLOB: u64 = 16 << 20;
/// How long connecting to the socket may take before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error(
        "cannot reach containerd at {socket}: {reason}. Point ragent at containerd's socket with --containerd PATH or RAGENT_CONTAINERD=PATH"
    )]
    Unreachable { socket: PathBuf, reason: String },
    #[error("containerd {op} failed: {} ({:?})", status.message(), status.code())]
    Rpc {
        op: &'static str,
        #[source]
        status: Status,
    },
    #[error("content {digest} is not in containerd's content store")]
    NotFound { digest: String },
    #[error(
        "content {digest} is {size} bytes, more than the {MAX_METADATA_BLOB} bytes ragent reads as metadata"
    )]
    TooLarge { digest: String, size: u64 },
    /// The source of a blob's bytes failed; what arrived stays in the ingest (to resume from),
    /// unless the error says the bytes are wrong (kind `InvalidData`).
    #[error("reading the bytes of {digest} failed: {error}")]
    Source {
        digest: String,
        error: std::io::Error,
    },
    #[error("containerd rejected {digest}: {reason} (nothing was committed)")]
    Rejected { digest: String, reason: String },
    #[error(
        "invalid namespace {namespace:?}: {reason}; set --namespace or RAGENT_NAMESPACE (kubelet's is k8s.io)"
    )]
    Namespace { namespace: String, reason: String },
}

impl ContainerdError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ContainerdError::Unreachable { .. } => "unreachable",
            ContainerdError::Rpc { .. } => "rpc",
            ContainerdError::NotFound { .. } => "not_found",
            ContainerdError::TooLarge { .. } => "too_large",
            ContainerdError::Namespace { .. } => "namespace",
            ContainerdError::Source { .. } => "source",
            ContainerdError::Rejected { .. } => "rejected",
        }
    }

    /// Whether the connection itself is gone (as opposed to one request failing).
    pub fn is_disconnect(&self) -> bool {
        match self {
            ContainerdError::Unreachable { .. } => true,
            ContainerdError::Rpc { status, .. } => {
                matches!(
                    status.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                )
            }
            _ => false,
        }
    }
}

pub(crate) fn rpc(op: &'static str) -> impl FnOnce(Status) -> ContainerdError {
    move |status| ContainerdError::Rpc { op, status }
}

/// An image record as containerd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub target: Descriptor,
}

/// A container record (not its task).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    pub id: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
}

/// One event from containerd's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub namespace: String,
    pub topic: String,
}

/// A connection to containerd for one namespace.
#[derive(Clone)]
pub struct Containerd {
    pub(crate) channel: Channel,
    socket: PathBuf,
    namespace: String,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Containerd {
    /// Connects and checks that containerd answers (Version).
    #[instrument(level = "debug")]
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Containerd, ContainerdError> {
        validate_namespace(namespace)?;
        let unreachable = |reason: String| ContainerdError::Unreachable {
            socket: socket.to_path_buf(),
            reason,
        };
        match std::fs::metadata(socket) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(unreachable("no such file".into()));
            }
            Err(e) => return Err(unreachable(e.to_string())),
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(unreachable("not a unix socket".into()));
                }
            }
        }
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, containerd_client::connect(socket))
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(super::error_chain(&e)))?;
        let c = Containerd {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
        };
        c.version().await.map_err(|e| match e {
            ContainerdError::Rpc { status, .. } => unreachable(status.message().to_string()),
            other => other,
        })?;
        Ok(c)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        // Validated in connect(): a namespace is ASCII without control characters.
        if let Ok(v) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        req
    }

    /// containerd's version string.
    pub async fn version(&self) -> Result<String, ContainerdError> {
        let r = VersionClient::new(self.channel.clone())
            .version(Request::new(()))
            .await
            .map_err(rpc("Version"))?;
        Ok(r.into_inner().version)
    }

    /// Every image record in the namespace.
    #[instrument(level = "debug", skip(self))]
    pub async fn list_images(&self) -> Result<Vec<ImageRecord>, ContainerdError> {
        Ok(self
            .raw_images()
            .await?
            .into_iter()
            .filter_map(image_record)
            .collect())
    }

    /// containerd's image records as it sends them.
    async fn raw_images(
        &self,
    ) -> Result<Vec<containerd_client::services::v1::Image>, ContainerdError> {
        let r = ImagesClient::new(self.channel.clone())
            .list(self.request(ListImagesRequest { filters: vec![] }))
            .await
            .map_err(rpc("Images.List"))?;
        Ok(r.into_inner().images)
    }

    /// One image record by name, or None.
    pub async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, ContainerdError> {
        match ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest { name: name.into() }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image.and_then(image_record)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc("Images.Get")(s)),
        }
    }

    /// The size of a blob in the content store, or None when it is not there.
    pub async fn content_size(&self, digest: &str) -> Result<Option<u64>, ContainerdError> {
        match ContentClient::new(self.channel.clone())
            .info(self.request(InfoRequest {
                digest: digest.into(),
            }))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .info
                .map(|i| u64::try_from(i.size).unwrap_or(0))),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc("Content.Info")(s)),
        }
    }

    /// Reads a whole metadata blob (manifest, index, config), at most [`MAX_METADATA_BLOB`].
    #[instrument(level = "debug", skip(self))]
    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ContainerdError> {
        let size = self
            .content_size(digest)
            .await?
            .ok_or_else(|| ContainerdError::NotFound {
                digest: digest.into(),
            })?;
        if size > MAX_METADATA_BLOB {
            return Err(ContainerdError::TooLarge {
                digest: digest.into(),
                size,
            });
        }
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(ReadContentRequest {
                digest: digest.into(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => ContainerdError::NotFound {
                    digest: digest.into(),
                },
                _ => rpc("Content.Read")(s),
            })?
            .into_inner();
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(rpc("Content.Read"))?;
            out.extend_from_slice(&chunk.data);
            if out.len() as u64 > MAX_METADATA_BLOB {
                return Err(ContainerdError::TooLarge {
                    digest: digest.into(),
                    size: out.len() as u64,
                });
            }
        }
        Ok(out)
    }

    /// Streams `len` bytes of a committed blob from `offset` (`len` 0: to the end), as
    /// containerd sends them. Content.Read only reads committed content: an ingest still being
    /// written is not found. Callers that promise a length (an HTTP Content-Length) check
    /// [`Containerd::content_size`] first; a blob removed mid-read ends the stream with an error.
    #[instrument(level = "debug", skip(self))]
    pub async fn read_content(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, ContainerdError>> + use<>, ContainerdError> {
        let stream = ContentClient::new(self.channel.clone())
            .read(self.request(ReadContentRequest {
                digest: digest.into(),
                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                size: i64::try_from(len).unwrap_or(i64::MAX),
            }))
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => ContainerdError::NotFound {
                    digest: digest.into(),
                },
                _ => rpc("Content.Read")(s),
            })?
            .into_inner();
        Ok(stream.map(|r| r.map(|c| c.data).map_err(rpc("Content.Read"))))
    }

    /// Every container record in the namespace.
    pub async fn list_containers(&self) -> Result<Vec<ContainerRecord>, ContainerdError> {
        let r = ContainersClient::new(self.channel.clone())
            .list(self.request(ListContainersRequest { filters: vec![] }))
            .await
            .map_err(rpc("Containers.List"))?;
        Ok(r.into_inner()
            .containers
            .into_iter()
            .map(container_record)
            .collect())
    }

    /// One container record by id, or None when it is gone.
    pub async fn get_container(
        &self,
        id: &str,
    ) -> Result<Option<ContainerRecord>, ContainerdError> {
        match ContainersClient::new(self.channel.clone())
            .get(self.request(GetContainerRequest { id: id.into() }))
            .await
        {
            Ok(r) => Ok(r.into_inner().container.map(container_record)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc("Containers.Get")(s)),
        }
    }

    /// Every blob of the content store with its size, commit time and labels.
    pub async fn list_content(&self) -> Result<Vec<BlobInfo>, ContainerdError> {
        let mut stream = ContentClient::new(self.channel.clone())
            .list(self.request(ListContentRequest { filters: vec![] }))
            .await
            .map_err(rpc("Content.List"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(page) = stream.next().await {
            for i in page.map_err(rpc("Content.List"))?.info {
                out.push(BlobInfo {
                    digest: i.digest,
                    size: u64::try_from(i.size).unwrap_or(0),
                    created_ms: i.created_at.map_or(0, timestamp_ms),
                    labels: i.labels.into_iter().collect(),
                });
            }
        }
        Ok(out)
    }

    /// Every image record's name, target and last change.
    pub async fn list_image_infos(&self) -> Result<Vec<ImageInfo>, ContainerdError> {
        Ok(self
            .raw_images()
            .await?
            .into_iter()
            .filter_map(|i| {
                let created = i.created_at.map_or(0, timestamp_ms);
                let updated = i.updated_at.map_or(0, timestamp_ms);
                Some(ImageInfo {
                    target: i.target?.digest,
                    name: i.name,
                    updated_ms: created.max(updated),
                })
            })
            .collect())
    }

    /// The pid of the containerd process behind the socket (SO_PEERCRED), to find its cgroup.
    pub async fn server_pid(&self) -> Option<u32> {
        let s = tokio::net::UnixStream::connect(&self.socket).await.ok()?;
        let pid = s.peer_cred().ok()?.pid()?;
        u32::try_from(pid).ok()
    }

    /// Subscribes to this namespace's events. Call it before listing, so nothing that happens
    /// between the list and the subscription is missed.
    pub async fn subscribe(
        &self,
    ) -> Result<impl Stream<Item = Result<Event, ContainerdError>> + use<>, ContainerdError> {
        let filter = format!("namespace=={}", self.namespace);
        let stream = EventsClient::new(self.channel.clone())
            .subscribe(Request::new(SubscribeRequest {
                filters: vec![filter],
            }))
            .await
            .map_err(rpc("Events.Subscribe"))?
            .into_inner();
        Ok(stream.map(|r| {
            r.map(|env| Event {
                namespace: env.namespace,
                topic: env.topic,
            })
            .map_err(rpc("Events.Subscribe"))
        }))
    }
}

/// containerd's container record -> ours.
fn container_record(c: containerd_client::services::v1::Container) -> ContainerRecord {
    ContainerRecord {
        id: c.id,
        image: c.image,
        labels: c.labels.into_iter().collect(),
    }
}

/// containerd's image record -> ours; records without a target are skipped.
fn image_record(i: containerd_client::services::v1::Image) -> Option<ImageRecord> {
    let t = i.target?;
    Some(ImageRecord {
        name: i.name,
        labels: i.labels.into_iter().collect(),
        target: Descriptor {
            media_type: t.media_type,
            digest: t.digest,
            size: u64::try_from(t.size).unwrap_or(0),
            platform: None,
            annotations: t.annotations.into_iter().collect(),
        },
    })
}

fn timestamp_ms(t: prost_types::Timestamp) -> u64 {
    u64::try_from(t.seconds).unwrap_or(0) * 1000 + u64::try_from(t.nanos).unwrap_or(0) / 1_000_000
}

fn validate_namespace(ns: &str) -> Result<(), ContainerdError> {
    // containerd: [A-Za-z0-9] separated by [._-], at most 76 characters.
    let bad = |reason: &str| ContainerdError::Namespace {
        namespace: ns.into(),
        reason: reason.into(),
    };
    if ns.is_empty() || ns.len() > 76 {
        return Err(bad("must be 1 to 76 characters"));
    }
    // Runs of letters and digits, joined by single '.', '_' or '-'.
    let parts_ok = ns
        .split(['.', '_', '-'])
        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()));
    if !parts_ok {
        return Err(bad(
            "use letters and digits, joined by single '.', '_' or '-' (no leading, trailing or doubled separators)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_names_the_path_and_the_flag() {
        let e = Containerd::connect(Path::new("/nonexistent/containerd.sock"), "k8s.io")
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/containerd.sock"), "{msg}");
        assert!(
            msg.contains("--containerd") && msg.contains("RAGENT_CONTAINERD"),
            "{msg}"
        );
        assert!(e.is_disconnect());
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_unreachable() {
        let e = Containerd::connect(Path::new("/proc/self/status"), "k8s.io")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a unix socket"), "{e}");
    }

    #[test]
    fn namespaces_are_validated() {
        assert!(validate_namespace("k8s.io").is_ok());
        assert!(validate_namespace("").is_err());
        assert!(validate_namespace("a b").is_err());
        assert!(validate_namespace("ns\n").is_err());
        assert!(validate_namespace("a..b").is_err());
        assert!(validate_namespace("x-").is_err());
        assert!(validate_namespace("team-a_1.prod").is_ok());
        let msg = validate_namespace("a b").unwrap_err().to_string();
        assert!(
            msg.contains("--namespace") && msg.contains("RAGENT_NAMESPACE"),
            "{msg}"
        );
    }
}
