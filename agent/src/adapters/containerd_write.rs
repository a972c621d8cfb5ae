//! Writing into containerd: leases, content ingests with an expected digest, image records,
//! and unpacking layers into the snapshotter (Prepare -> Diff.Apply -> Commit).
use std::{collections::HashMap, time::Duration};

use containerd_client::{
    services::v1::{
        AbortRequest, AddResourceRequest, ApplyRequest, CreateImageRequest, DeleteImageRequest,
        DeleteRequest as DeleteLeaseRequest, Image, Resource, StatusRequest, UpdateImageRequest,
        UpdateRequest, WriteAction, WriteContentRequest,
        content_client::ContentClient,
        diff_client::DiffClient,
        images_client::ImagesClient,
        leases_client::LeasesClient,
        snapshots::{
            CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
            StatSnapshotRequest, snapshots_client::SnapshotsClient,
        },
    },
    tonic::{Code, Request},
    types::Descriptor as PbDescriptor,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::containerd::{Containerd, ContainerdError, rpc};
use crate::core::{chain::chain_ids, oci::Descriptor};

/// The snapshotter ragent unpacks into (CRI's default).
pub const SNAPSHOTTER: &str = "overlayfs";
/// Chunk size of Content.Write messages.
pub const WRITE_CHUNK: usize = 1 << 20;

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The content store had it already.
    Existed,
    /// Written; `resumed_from` bytes were already in a partial ingest.
    Written { bytes: u64, resumed_from: u64 },
}

fn pb(d: &Descriptor) -> PbDescriptor {
    PbDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

impl Containerd {
    fn leased<T>(&self, lease: &str, msg: T) -> Request<T> {
        let mut r = self.request(msg);
        if let Ok(v) = lease.parse() {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    /// Creates a lease that expires by itself after `expire` (so a crashed ragent leaves nothing
    /// pinned for long); everything written under it is safe from GC until it is deleted.
    pub async fn create_lease(
        &self,
        id: &str,
        expire: Duration,
    ) -> Result<String, ContainerdError> {
        let until = std::time::SystemTime::now() + expire;
        let secs = until
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339(secs))]);
        let r = LeasesClient::new(self.channel.clone())
            .create(
                self.request(containerd_client::services::v1::CreateRequest {
                    id: id.into(),
                    labels,
                }),
            )
            .await
            .map_err(rpc("Leases.Create"))?;
        Ok(r.into_inner()
            .lease
            .map(|l| l.id)
            .unwrap_or_else(|| id.into()))
    }

    /// Deletes a lease; with `sync`, containerd also runs its garbage collection before answering.
    pub async fn delete_lease(&self, id: &str, sync: bool) -> Result<(), ContainerdError> {
        match LeasesClient::new(self.channel.clone())
            .delete(self.request(DeleteLeaseRequest {
                id: id.into(),
                sync,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc("Leases.Delete")(s)),
        }
    }

    /// Puts an existing blob under a lease (so GC cannot take it while an image is assembled).
    pub async fn lease_content(&self, lease: &str, digest: &str) -> Result<(), ContainerdError> {
        self.add_to_lease(lease, digest, "content").await
    }

    /// Puts a committed snapshot under a lease (an image being unpacked on top of it keeps it).
    pub async fn lease_snapshot(&self, lease: &str, key: &str) -> Result<(), ContainerdError> {
        self.add_to_lease(lease, key, &format!("snapshots/{SNAPSHOTTER}"))
            .await
    }

    /// Puts a partial ingest under a lease (so GC keeps its bytes for a later resume).
    pub async fn lease_ingest(&self, lease: &str, ingest_ref: &str) -> Result<(), ContainerdError> {
        self.add_to_lease(lease, ingest_ref, "ingests").await
    }

    async fn add_to_lease(&self, lease: &str, id: &str, kind: &str) -> Result<(), ContainerdError> {
        LeasesClient::new(self.channel.clone())
            .add_resource(self.request(AddResourceRequest {
                id: lease.into(),
                resource: Some(Resource {
                    id: id.into(),
                    r#type: kind.into(),
                }),
            }))
            .await
            .map_err(rpc("Leases.AddResource"))?;
        Ok(())
    }

    /// The IDs of the namespace's leases that start with `prefix`.
    pub async fn lease_ids(&self, prefix: &str) -> Result<Vec<String>, ContainerdError> {
        let r = LeasesClient::new(self.channel.clone())
            .list(self.request(containerd_client::services::v1::ListRequest {
                filters: Vec::new(),
            }))
            .await
            .map_err(rpc("Leases.List"))?;
        Ok(r.into_inner()
            .leases
            .into_iter()
            .map(|l| l.id)
            .filter(|id| id.starts_with(prefix))
            .collect())
    }

    /// Bytes already in the ingest `ingest_ref` (a partial write to resume), or 0.
    pub async fn ingest_offset(&self, ingest_ref: &str) -> Result<u64, ContainerdError> {
        match ContentClient::new(self.channel.clone())
            .status(self.request(StatusRequest {
                r#ref: ingest_ref.into(),
            }))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .status
                .map(|s| u64::try_from(s.offset).unwrap_or(0))
                .unwrap_or(0)),
            Err(s) if s.code() == Code::NotFound => Ok(0),
            Err(s) => Err(rpc("Content.Status")(s)),
        }
    }

    /// Writes one blob under `lease` through the ingest `ingest_ref`, resuming a partial ingest.
    /// `open(offset)` gives the bytes from `offset` on. containerd checks size and digest at
    /// commit: a blob whose bytes do not match is rejected and nothing is committed.
    ///
    /// When the source fails, the bytes that arrived are written first (so the next writer
    /// resumes after them), except when the error's kind is `InvalidData`: the bytes are wrong,
    /// and the ingest is aborted. A source that ends short of `desc.size` fails likewise.
    pub async fn write_blob<S>(
        &self,
        lease: &str,
        ingest_ref: &str,
        desc: &Descriptor,
        labels: HashMap<String, String>,
        open: impl FnOnce(u64) -> S,
    ) -> Result<WriteOutcome, ContainerdError>
    where
        S: Stream<Item = Result<Vec<u8>, std::io::Error>>,
    {
        if self.content_size(&desc.digest).await?.is_some() {
            self.lease_content(lease, &desc.digest).await?;
            return Ok(WriteOutcome::Existed);
        }
        let total = i64::try_from(desc.size).unwrap_or(i64::MAX);
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let msg = |action: WriteAction, offset: u64, data: Vec<u8>| WriteContentRequest {
            action: action as i32,
            r#ref: ingest_ref.into(),
            total,
            expected: desc.digest.clone(),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            data,
            labels: HashMap::new(),
        };
        // Stat first: where a previous (killed) writer stopped.
        let _ = tx.send(msg(WriteAction::Stat, 0, Vec::new())).await;
        let mut responses = match ContentClient::new(self.channel.clone())
            .write(self.leased(lease, ReceiverStream::new(rx)))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.lease_content(lease, &desc.digest).await?;
                return Ok(WriteOutcome::Existed);
            }
            Err(s) => return Err(rpc("Content.Write")(s)),
        };
        let stat = match responses.next().await {
            Some(Ok(r)) => r,
            Some(Err(s)) if s.code() == Code::AlreadyExists => {
                self.lease_content(lease, &desc.digest).await?;
                return Ok(WriteOutcome::Existed);
            }
            Some(Err(s)) => return Err(rpc("Content.Write")(s)),
            None => return Err(stream_closed()),
        };
        let resumed_from = u64::try_from(stat.offset).unwrap_or(0).min(desc.size);
        let mut offset = resumed_from;
        // An ingest that already holds every byte (a writer killed before its commit, or
        // content shared from another namespace) is committed without reading the source.
        let needs_bytes = resumed_from < desc.size;
        let mut source = std::pin::pin!(open(resumed_from));
        // HTTP hands over small pieces: send WRITE_CHUNK-sized messages (one round trip each).
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
        let mut done = !needs_bytes;
        let mut failed: Option<std::io::Error> = None;
        loop {
            if !done {
                match source.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        done = true;
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            // Wrong bytes: none of them may be resumed from. Close the
                            // write first (containerd unlocks the ingest), then drop it.
                            drop(tx);
                            while responses.next().await.is_some() {}
                            self.abort_ingest(ingest_ref).await?;
                            return Err(ContainerdError::Source {
                                digest: desc.digest.clone(),
                                error: e,
                            });
                        }
                        failed = Some(e);
                    }
                    None => done = true,
                }
            }
            while buf.len() >= WRITE_CHUNK || (done && !buf.is_empty()) {
                let part: Vec<u8> = buf.drain(..buf.len().min(WRITE_CHUNK)).collect();
                let n = part.len() as u64;
                tx.send(msg(WriteAction::Write, offset, part))
                    .await
                    .map_err(|_| stream_closed())?;
                offset += n;
                match responses.next().await {
                    Some(Ok(_)) => {}
                    Some(Err(s)) => return Err(rpc("Content.Write")(s)),
                    None => return Err(stream_closed()),
                }
            }
            if done {
                break;
            }
        }
        // What arrived is in the ingest now; the next writer resumes after it.
        if let Some(error) = failed {
            return Err(ContainerdError::Source {
                digest: desc.digest.clone(),
                error,
            });
        }
        if offset < desc.size {
            return Err(ContainerdError::Source {
                digest: desc.digest.clone(),
                error: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the source ended after {offset} of {} bytes", desc.size),
                ),
            });
        }
        let mut commit = msg(WriteAction::Commit, offset, Vec::new());
        commit.labels = labels;
        let _ = tx.send(commit).await;
        drop(tx);
        match responses.next().await {
            Some(Ok(_)) => Ok(WriteOutcome::Written {
                bytes: offset - resumed_from,
                resumed_from,
            }),
            Some(Err(s)) if s.code() == Code::AlreadyExists => {
                self.lease_content(lease, &desc.digest).await?;
                Ok(WriteOutcome::Existed)
            }
            Some(Err(s)) => {
                // Drop the bad bytes, so a retry starts from zero instead of resuming them.
                let _ = self.abort_ingest(ingest_ref).await;
                Err(ContainerdError::Rejected {
                    digest: desc.digest.clone(),
                    reason: s.message().to_string(),
                })
            }
            None => Err(stream_closed()),
        }
    }

    /// Drops a partial ingest and its bytes (none left is fine).
    pub async fn abort_ingest(&self, ingest_ref: &str) -> Result<(), ContainerdError> {
        match ContentClient::new(self.channel.clone())
            .abort(self.request(AbortRequest {
                r#ref: ingest_ref.into(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc("Content.Abort")(s)),
        }
    }

    /// Sets labels on a committed blob (e.g. the gc reference to the unpacked snapshot).
    pub async fn label_content(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel.clone())
            .update(self.request(UpdateRequest {
                info: Some(containerd_client::services::v1::Info {
                    digest: digest.into(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(rpc("Content.Update"))?;
        Ok(())
    }

    /// Creates the image record `name` -> `target`, or moves an existing one to it.
    pub async fn put_image(
        &self,
        lease: &str,
        name: &str,
        target: &Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let image = Image {
            name: name.into(),
            labels,
            target: Some(pb(target)),
            created_at: None,
            updated_at: None,
        };
        let created = ImagesClient::new(self.channel.clone())
            .create(self.leased(
                lease,
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                ImagesClient::new(self.channel.clone())
                    .update(self.leased(
                        lease,
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: None,
                            source_date_epoch: None,
                        },
                    ))
                    .await
                    .map_err(rpc("Images.Update"))?;
                Ok(())
            }
            Err(s) => Err(rpc("Images.Create")(s)),
        }
    }

    /// Deletes an image record (the content stays until GC finds nothing references it).
    pub async fn delete_image(&self, name: &str) -> Result<(), ContainerdError> {
        match ImagesClient::new(self.channel.clone())
            .delete(self.request(DeleteImageRequest {
                name: name.into(),
                sync: false,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc("Images.Delete")(s)),
        }
    }

    /// Unpacks `layers` (bottom to top, with their diffIDs) into the snapshotter, skipping
    /// snapshots that exist. Returns the top chain ID.
    pub async fn unpack(
        &self,
        lease: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
    ) -> Result<Option<String>, ContainerdError> {
        self.unpack_as_ready(lease, layers, diff_ids, |_| async {})
            .await
    }

    /// Like [`Containerd::unpack`], but before applying a layer it awaits `ready(digest)`:
    /// the layer's blob is committed. A pull unpacks while it still downloads, layer by layer
    /// as the blobs arrive (layers whose snapshot exists are not waited for).
    pub async fn unpack_as_ready<F, Fut>(
        &self,
        lease: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
        ready: F,
    ) -> Result<Option<String>, ContainerdError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        if layers.len() != diff_ids.len() {
            return Err(ContainerdError::Rejected {
                digest: layers.first().map(|l| l.digest.clone()).unwrap_or_default(),
                reason: format!(
                    "the manifest has {} layers but the config lists {} diffIDs: the image is malformed",
                    layers.len(),
                    diff_ids.len()
                ),
            });
        }
        let chains = chain_ids(diff_ids);
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        let mut parent = String::new();
        // The highest snapshot that exists, found from the top: a snapshot keeps its parents
        // (for GC too), so only it goes under the lease and the layers below are not looked at.
        // A rebased image finds its whole new run image (or itself) there at once.
        let mut start = 0;
        for i in (0..chains.len()).rev() {
            let stat = || {
                self.request(StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: chains[i].clone(),
                })
            };
            match snaps.stat(stat()).await {
                Ok(_) => {
                    self.lease_snapshot(lease, &chains[i]).await?;
                    // Still there once leased? Then it is safe until the lease goes.
                    match snaps.stat(stat()).await {
                        Ok(_) => {
                            start = i + 1;
                            parent = chains[i].clone();
                            break;
                        }
                        Err(s) if s.code() == Code::NotFound => {}
                        Err(s) => return Err(rpc("Snapshots.Stat")(s)),
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(rpc("Snapshots.Stat")(s)),
            }
        }
        for (layer, chain) in layers.iter().zip(&chains).skip(start) {
            let stat = || {
                self.request(StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: chain.clone(),
                })
            };
            match snaps.stat(stat()).await {
                Ok(_) => {
                    // Under the lease before it counts: GC must not take it while the image
                    // above it is assembled. Still there once leased?
                    self.lease_snapshot(lease, chain).await?;
                    match snaps.stat(stat()).await {
                        Ok(_) => {
                            parent = chain.clone();
                            continue;
                        }
                        Err(s) if s.code() == Code::NotFound => {}
                        Err(s) => return Err(rpc("Snapshots.Stat")(s)),
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(rpc("Snapshots.Stat")(s)),
            }
            ready(layer.digest.clone()).await;
            // Unique per attempt: a killed ragent's leftover key never blocks the next one.
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let key = format!("ragent-extract-{}-{nonce}-{chain}", std::process::id());
            let mounts = snaps
                .prepare(self.leased(
                    lease,
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::new(),
                    },
                ))
                .await
                .map_err(rpc("Snapshots.Prepare"))?
                .into_inner()
                .mounts;
            let applied = DiffClient::new(self.channel.clone())
                .apply(self.leased(
                    lease,
                    ApplyRequest {
                        diff: Some(pb(layer)),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                ))
                .await;
            let applied = match applied {
                Ok(r) => r.into_inner().applied.map(|d| d.digest),
                Err(s) => {
                    let _ = snaps
                        .remove(self.request(RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: key.clone(),
                        }))
                        .await;
                    return Err(rpc("Diff.Apply")(s));
                }
            };
            // The uncompressed bytes must be what the config says, or the chain ID would lie.
            let want = &diff_ids[chains.iter().position(|c| c == chain).unwrap_or(0)];
            if applied.as_deref() != Some(want.as_str()) {
                let _ = snaps
                    .remove(self.request(RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                    }))
                    .await;
                return Err(ContainerdError::Rejected {
                    digest: layer.digest.clone(),
                    reason: format!(
                        "its uncompressed digest is {}, but the image config says {want}",
                        applied.unwrap_or_default()
                    ),
                });
            }
            match snaps
                .commit(self.leased(
                    lease,
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                ))
                .await
            {
                Ok(_) => {}
                // Someone else committed the same chain meanwhile: theirs is as good.
                Err(s) if s.code() == Code::AlreadyExists => {
                    let _ = snaps
                        .remove(self.request(RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key,
                        }))
                        .await;
                }
                Err(s) => return Err(rpc("Snapshots.Commit")(s)),
            }
            parent = chain.clone();
        }
        Ok(chains.last().cloned())
    }
}

fn stream_closed() -> ContainerdError {
    ContainerdError::Rpc {
        op: "Content.Write",
        status: containerd_client::tonic::Status::unavailable("containerd closed the write stream"),
    }
}

/// Seconds since the epoch -> RFC 3339 UTC (civil-from-days, no time crate needed).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(315_532_801), "1980-01-01T00:00:01Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
    }
}
