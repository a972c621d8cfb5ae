//! Resolving containerd's image records into the core's inventory: read each record's target,
//! pick this node's manifest from an index, read the config. Blobs are content-addressed, so
//! what was read once is cached for the life of the scanner.
use std::collections::HashMap;

use crate::{
    adapters::containerd::{Containerd, ContainerdError, ImageRecord},
    core::{
        inventory::{self, Inventory, ResolvedImage, Unresolved},
        oci::{self, ImageConfig, Manifest, OciError, Platform, Target},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Oci(#[from] OciError),
}

#[derive(Clone)]
struct Resolved {
    manifest_digest: String,
    index_digest: Option<String>,
    manifest: Manifest,
    config: ImageConfig,
}

/// Turns image records into an [`Inventory`]; keeps parsed blobs by digest.
pub struct Scanner {
    platform: Platform,
    by_target: HashMap<String, Resolved>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new(Platform::this_node())
    }
}

impl Scanner {
    pub fn new(platform: Platform) -> Scanner {
        Scanner {
            platform,
            by_target: HashMap::new(),
        }
    }

    /// Lists the namespace's images and resolves every one. A record whose content is missing
    /// or malformed is reported in `unresolved`; only a lost connection fails the scan.
    pub async fn scan(&mut self, containerd: &Containerd) -> Result<Inventory, ContainerdError> {
        let records = containerd.list_images().await?;
        let mut resolved = Vec::with_capacity(records.len());
        let mut unresolved = Vec::new();
        for record in records {
            match self.resolve(containerd, &record).await {
                Ok(r) => resolved.push(ResolvedImage {
                    name: record.name,
                    manifest_digest: r.manifest_digest,
                    index_digest: r.index_digest,
                    layers: r.manifest.layers,
                    config: r.config,
                }),
                Err(ScanError::Containerd(c)) if c.is_disconnect() => return Err(c),
                Err(e) => unresolved.push(Unresolved {
                    name: record.name,
                    reason: e.to_string(),
                }),
            }
        }
        // Forget cached targets no record points at any more (bounded memory).
        let live: std::collections::HashSet<&str> = resolved
            .iter()
            .map(|r| r.manifest_digest.as_str())
            .collect();
        self.by_target
            .retain(|_, r| live.contains(r.manifest_digest.as_str()));
        Ok(inventory::build(resolved, unresolved))
    }

    async fn resolve(
        &mut self,
        containerd: &Containerd,
        record: &ImageRecord,
    ) -> Result<Resolved, ScanError> {
        let t = &record.target;
        if let Some(r) = self.by_target.get(&t.digest) {
            return Ok(r.clone());
        }
        let bytes = containerd.read_blob(&t.digest).await?;
        let (manifest_digest, index_digest, manifest) =
            match oci::parse_target(&t.media_type, &t.digest, &bytes)? {
                Target::Manifest(m) => (t.digest.clone(), None, m),
                Target::Index(index) => {
                    let d = oci::choose_platform(&t.digest, &index, &self.platform)?;
                    let mbytes = containerd.read_blob(&d.digest).await?;
                    let m = oci::parse_manifest(&d.digest, &mbytes)?;
                    (d.digest.clone(), Some(t.digest.clone()), m)
                }
            };
        let cbytes = containerd.read_blob(&manifest.config.digest).await?;
        let config = oci::parse_config(&manifest.config.digest, &cbytes)?;
        let r = Resolved {
            manifest_digest,
            index_digest,
            manifest,
            config,
        };
        self.by_target.insert(t.digest.clone(), r.clone());
        Ok(r)
    }
}
