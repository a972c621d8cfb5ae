//! `ragent images`: the node's images, their layers and roles, and what they share.
use std::fmt::Write as _;

use crate::{
    adapters::containerd::{Containerd, ContainerdError},
    core::inventory::Inventory,
    scan::Scanner,
};

/// Connects, scans and returns the inventory.
pub async fn inventory(
    socket: &std::path::Path,
    namespace: &str,
) -> Result<Inventory, ContainerdError> {
    let c = Containerd::connect(socket, namespace).await?;
    Scanner::default().scan(&c).await
}

/// Human-readable size in binary units.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(digest: &str) -> String {
    // Labels can hold anything: cut on characters, not bytes.
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

/// The table `ragent images` prints.
pub fn render_table(inv: &Inventory) -> String {
    let mut out = String::new();
    for img in &inv.images {
        let _ = writeln!(
            out,
            "{}  {}  {}  {} layers  {}",
            img.name,
            short(&img.digest),
            img.platform,
            img.layers.len(),
            human_bytes(img.size_bytes)
        );
        let aliases: Vec<&str> = img
            .names
            .iter()
            .filter(|n| **n != img.name)
            .map(String::as_str)
            .collect();
        if !aliases.is_empty() {
            let _ = writeln!(out, "  also named: {}", aliases.join(", "));
        }
        if let Some(cnb) = &img.cnb {
            let mut parts = vec![format!("CNB {:?}", cnb.kind).to_lowercase()];
            if let Some(api) = &cnb.platform_api {
                parts.push(format!("platform API {api}"));
            }
            if let Some(ri) = &cnb.run_image {
                parts.push(format!(
                    "run image {} ({})",
                    ri.image.as_deref().unwrap_or("?"),
                    short(&ri.reference)
                ));
            }
            if !cnb.buildpacks.is_empty() {
                let bps: Vec<String> = cnb
                    .buildpacks
                    .iter()
                    .map(|b| format!("{}@{}", b.id, b.version))
                    .collect();
                parts.push(format!("buildpacks {}", bps.join(", ")));
            }
            let _ = writeln!(out, "  {}", parts.join("; "));
        }
        let _ = writeln!(
            out,
            "  {:<14} {:<10} {:>10}  SHARED BY",
            "LAYER", "ROLE", "SIZE"
        );
        for l in &img.layers {
            let _ = writeln!(
                out,
                "  {:<14} {:<10} {:>10}  {}",
                short(&l.digest),
                l.role.as_str(),
                human_bytes(l.size_bytes),
                l.shared_by
            );
        }
        for w in &img.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
        out.push('\n');
    }
    for u in &inv.unresolved {
        let _ = writeln!(out, "{}  (not readable: {})\n", u.name, u.reason);
    }
    let s = &inv.summary;
    let ratio = s
        .dedup_ratio
        .map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}"));
    let _ = writeln!(
        out,
        "node: {} images, {} distinct layers; {} if every image stored its own layers, {} unique; dedup ratio {}",
        s.images,
        s.layers,
        human_bytes(s.total_layer_bytes),
        human_bytes(s.unique_layer_bytes),
        ratio
    );
    if !s.most_shared.is_empty() {
        let _ = writeln!(out, "most shared layers:");
        for l in &s.most_shared {
            let _ = writeln!(
                out,
                "  {:<14} {:<10} {:>10}  shared by {}",
                short(&l.digest),
                l.role.as_str(),
                human_bytes(l.size_bytes),
                l.shared_by
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{
        inventory::{ResolvedImage, build},
        oci::{Descriptor, ImageConfig},
    };

    #[test]
    fn short_digests_cut_on_characters() {
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short("ééééééééééééééé"), "éééééééééééé");
        assert_eq!(short(""), "");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn table_shows_images_layers_and_the_summary() {
        let d = |x: &str, s| Descriptor {
            media_type: String::new(),
            digest: x.into(),
            size: s,
            platform: None,
            annotations: Default::default(),
        };
        let img = |n: &str, m: &str| ResolvedImage {
            name: n.into(),
            manifest_digest: m.into(),
            index_digest: None,
            layers: vec![
                d("sha256:aaaaaaaaaaaaaaaa", 2048),
                d(&format!("sha256:{m}"), 10),
            ],
            config: ImageConfig {
                os: "linux".into(),
                architecture: "amd64".into(),
                diff_ids: vec!["sha256:1".into(), "sha256:2".into()],
                ..Default::default()
            },
        };
        let t = render_table(&build(
            vec![img("reg/a:v1", "sha256:ma"), img("reg/b:v1", "sha256:mb")],
            vec![],
        ));
        assert!(t.contains("reg/a:v1"), "{t}");
        assert!(t.contains("aaaaaaaaaaaa   unknown"), "{t}");
        assert!(t.contains("node: 2 images, 3 distinct layers"), "{t}");
        assert!(t.contains("most shared layers:"), "{t}");
    }
}
