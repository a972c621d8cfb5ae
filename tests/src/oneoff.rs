//! An image no other test has: layers of bytes unique to this call, pushed to a registry with
//! skopeo from an OCI layout written here.
//!
//! For tests that must see containerd fetch every blob: containerd 1.6 shares blobs between
//! namespaces, so a fixture's layer that any earlier test left in any namespace is never
//! fetched again, whatever the test removed in its own namespace.
use std::{
    path::Path,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use flate2::{Compression, write::GzEncoder};
use serde_json::json;
use sha2::{Digest, Sha256};

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The pushed image.
#[derive(Debug, Clone)]
pub struct OneOff {
    /// `registry/repo:v1`
    pub reference: String,
    pub repo: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// (digest, size) of each layer.
    pub layers: Vec<(String, u64)>,
}

impl OneOff {
    /// Every digest a pull of it fetches: manifest, config, layers.
    pub fn digests(&self) -> Vec<String> {
        let mut d = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        d.extend(self.layers.iter().map(|(l, _)| l.clone()));
        d
    }
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// `len` bytes of a sha256 chain from `seed`.
fn bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(seed.as_bytes()).to_vec();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

/// A layer holding one file; returns (tar.gz, diff id).
fn layer(name: &str, data: &[u8]) -> Result<(Vec<u8>, String)> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, format!("ragent-oneoff/{name}"), data)?;
    let tar = t.into_inner()?;
    let diff_id = sha256(&tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    std::io::Write::write_all(&mut gz, &tar)?;
    Ok((gz.finish()?, diff_id))
}

/// Builds an image of `layers` layers of `layer_bytes` each, unique to this call, in `dir`
/// (created; replaced if there), and pushes it as `registry/repo:v1` over plain HTTP.
pub fn push(
    registry: &str,
    dir: &Path,
    repo: &str,
    layers: usize,
    layer_bytes: usize,
) -> Result<OneOff> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!("{}-{nanos}", std::process::id());
    let _ = std::fs::remove_dir_all(dir);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let put = |b: &[u8]| -> Result<(String, u64)> {
        let d = sha256(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b)?;
        Ok((d, b.len() as u64))
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..layers {
        let (gz, diff_id) = layer(
            &format!("{seed}-{i}.bin"),
            &bytes(&format!("{seed}/{i}"), layer_bytes),
        )?;
        descs.push(put(&gz)?);
        diff_ids.push(diff_id);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Labels": {"io.ragent.test.oneoff": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let (config_digest, config_size) = put(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descs.iter().map(|(d, s)| json!({"mediaType": MT_LAYER, "digest": d, "size": s})).collect::<Vec<_>>(),
    }))?;
    let (manifest_digest, manifest_size) = put(&manifest)?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }],
        }))?,
    )?;
    let reference = format!("{registry}/{repo}:v1");
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:v1", dir.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .context("running skopeo")?;
    if !out.status.success() {
        bail!(
            "skopeo copy to {reference} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(OneOff {
        reference,
        repo: repo.into(),
        manifest_digest,
        config_digest,
        layers: descs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_valid_tar_gz_with_their_diff_id() {
        let (gz, diff_id) = layer("x.bin", b"hello").unwrap();
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar).unwrap();
        assert_eq!(sha256(&tar), diff_id);
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["ragent-oneoff/x.bin"]);
        assert_ne!(bytes("a", 64), bytes("b", 64));
        assert_eq!(bytes("a", 100).len(), 100);
    }
}
