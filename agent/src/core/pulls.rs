//! Which image the bytes on the wire from a registry were for.
//!
//! The kernel counts the bytes each registry endpoint sends to the processes that pull
//! (containerd, ragent). It cannot see which blob a byte belongs to, so the agent groups the
//! traffic of a registry into *windows* (from the first byte until the registry has been quiet
//! for a while) and, when a window closes, looks at what the content store gained meanwhile:
//! blobs committed during the window, from that registry (containerd labels each fetched blob
//! with `containerd.io/distribution.source.<registry>`). Each blob belongs to the images whose
//! manifests reference it (containerd's `containerd.io/gc.ref.content.*` labels); the window's
//! wire bytes are split in proportion to each image's share of the fetched blob bytes, a blob
//! shared by several images in equal parts. Bytes that no fetched blob explains (a pull that
//! failed, only manifests checked) stay *unattributed* and are reported as such.
//!
//! Pure: the agent feeds it readings and content listings.
use std::collections::{BTreeMap, BTreeSet};

/// containerd labels a blob with the registry it was fetched from: `<prefix><host>=<repo>`.
pub const DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source.";
/// containerd's gc reference labels: a manifest's config and layers, an index's manifests.
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content.";
/// The image name that stands for bytes no image explains.
pub const UNATTRIBUTED: &str = "unattributed";

/// One blob of the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
    /// When containerd committed it (ms since the epoch).
    pub created_ms: u64,
    pub labels: BTreeMap<String, String>,
}

/// One image record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub target: String,
    /// When the record was created or last moved (ms since the epoch).
    pub updated_ms: u64,
}

/// The registry host of an image reference, as containerd names it in labels and hosts.toml:
/// the first path component when it looks like a host (has '.' or ':' or is `localhost`),
/// else Docker Hub.
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// The label containerd puts on a blob it fetched for `reference`
/// (`containerd.io/distribution.source.<host>` = `<repository>`), which ragent sets too, so
/// blobs it pre-pulls say where they came from like containerd's own.
pub fn distribution_source_label(reference: &str) -> (String, String) {
    let registry = registry_of(reference);
    let path = match reference.split_once('/') {
        Some((first, rest)) if first == registry => rest,
        _ => reference,
    };
    let path = path.split_once('@').map_or(path, |(p, _)| p);
    let repo = match path.rsplit_once(':') {
        Some((p, tag)) if !tag.contains('/') => p,
        _ => path,
    };
    let repo = if registry == "docker.io" && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_string()
    };
    (format!("{DISTRIBUTION_SOURCE}{}", host_of(registry)), repo)
}

/// Traffic of one registry from its first byte until it has been quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub registry: String,
    pub start_ms: u64,
    pub last_ms: u64,
    /// Bytes the registry sent to the pullers in the window (IP level).
    pub bytes: u64,
}

/// Open windows, one per registry.
#[derive(Debug, Clone)]
pub struct Windows {
    open: BTreeMap<String, Window>,
    quiet_ms: u64,
    max_ms: u64,
}

impl Windows {
    /// A window closes `quiet_ms` after its last byte, or `max_ms` after its first (so a
    /// registry that never rests is still attributed, window by window).
    pub fn new(quiet_ms: u64, max_ms: u64) -> Windows {
        Windows {
            open: BTreeMap::new(),
            quiet_ms,
            max_ms,
        }
    }

    /// `bytes` arrived from `registry` in the reading taken at `now_ms`.
    pub fn traffic(&mut self, registry: &str, bytes: u64, now_ms: u64) {
        if bytes == 0 {
            return;
        }
        let w = self
            .open
            .entry(registry.to_string())
            .or_insert_with(|| Window {
                registry: registry.to_string(),
                start_ms: now_ms,
                last_ms: now_ms,
                bytes: 0,
            });
        w.bytes = w.bytes.saturating_add(bytes);
        w.last_ms = now_ms;
    }

    /// Whether any window is open (the agent reads more often while one is).
    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
    }

    /// Takes the windows that are due at `now_ms`.
    pub fn close_due(&mut self, now_ms: u64) -> Vec<Window> {
        let due: Vec<String> = self
            .open
            .values()
            .filter(|w| {
                now_ms.saturating_sub(w.last_ms) >= self.quiet_ms
                    || now_ms.saturating_sub(w.start_ms) >= self.max_ms
            })
            .map(|w| w.registry.clone())
            .collect();
        due.into_iter()
            .filter_map(|r| self.open.remove(&r))
            .collect()
    }
}

/// What a window's bytes were for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Image name -> wire bytes.
    pub images: BTreeMap<String, u64>,
    pub unattributed: u64,
    /// Blob bytes committed in the window from this registry (for the log).
    pub blob_bytes: u64,
}

/// How far a window reaches past its readings to find the blobs its bytes brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slack {
    /// Before the first reading: the bytes it saw arrived up to one reading interval earlier
    /// (a blob commits after its bytes, so never earlier than that).
    pub lead_ms: u64,
    /// After the last reading: the commit (and the image record) follow the last bytes.
    pub lag_ms: u64,
}

/// Splits a closed window's bytes over the images whose blobs arrived in it. `exclude` are
/// blobs another attribution already claimed (ragent's own pulls).
pub fn attribute(
    w: &Window,
    blobs: &[BlobInfo],
    images: &[ImageInfo],
    slack: Slack,
    exclude: &BTreeSet<String>,
) -> Attribution {
    let from = w.start_ms.saturating_sub(slack.lead_ms);
    let to = w.last_ms.saturating_add(slack.lag_ms);
    let in_window = |t: u64| t >= from && t <= to;
    let fetched: Vec<&BlobInfo> = blobs
        .iter()
        .filter(|b| in_window(b.created_ms) && !exclude.contains(&b.digest))
        .filter(|b| from_registry(b, &w.registry))
        .collect();
    let blob_bytes: u64 = fetched.iter().map(|b| b.size).sum();
    if blob_bytes == 0 {
        return Attribution {
            images: BTreeMap::new(),
            unattributed: w.bytes,
            blob_bytes: 0,
        };
    }

    // Every blob an image reaches through gc reference labels.
    let children: BTreeMap<&str, Vec<&str>> = blobs
        .iter()
        .map(|b| {
            let refs = b
                .labels
                .iter()
                .filter(|(k, _)| k.starts_with(GC_REF_CONTENT))
                .map(|(_, v)| v.as_str())
                .collect();
            (b.digest.as_str(), refs)
        })
        .collect();
    // One name per target: the tag-like one (CRI also records `repo@digest` and `sha256:` ids).
    let mut by_target: BTreeMap<&str, (&ImageInfo, BTreeSet<&str>)> = BTreeMap::new();
    for i in images
        .iter()
        .filter(|i| registry_of(&i.name) == w.registry || is_id(&i.name))
    {
        let entry = by_target
            .entry(i.target.as_str())
            .or_insert_with(|| (i, BTreeSet::new()));
        entry.1.insert(i.name.as_str());
        if i.updated_ms > entry.0.updated_ms {
            entry.0 = i;
        }
    }
    let mut owners_of: BTreeMap<&str, Vec<(String, bool)>> = BTreeMap::new();
    for (target, (info, names)) in &by_target {
        let Some(name) = tag_like(names) else {
            continue;
        };
        let recent = in_window(info.updated_ms);
        let mut seen = BTreeSet::new();
        let mut stack = vec![*target];
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            owners_of
                .entry(d)
                .or_default()
                .push((name.to_string(), recent));
            if let Some(c) = children.get(d) {
                stack.extend(c.iter().copied());
            }
        }
    }

    // Each image's share of the fetched bytes (fractions as u128 to stay exact).
    let mut share: BTreeMap<String, f64> = BTreeMap::new();
    for b in &fetched {
        let Some(owners) = owners_of.get(b.digest.as_str()) else {
            continue;
        };
        // Images pulled in this window take the blob; an image that already had it does not.
        let recent: Vec<&String> = owners.iter().filter(|(_, r)| *r).map(|(n, _)| n).collect();
        let chosen: Vec<&String> = if recent.is_empty() {
            owners.iter().map(|(n, _)| n).collect()
        } else {
            recent
        };
        let part = b.size as f64 / chosen.len() as f64;
        for n in chosen {
            *share.entry(n.clone()).or_default() += part;
        }
    }
    let mut out = Attribution {
        blob_bytes,
        ..Default::default()
    };
    let mut given = 0u64;
    for (name, s) in share {
        let bytes = ((w.bytes as f64) * s / blob_bytes as f64).floor() as u64;
        given += bytes;
        out.images.insert(name, bytes);
    }
    out.unattributed = w.bytes.saturating_sub(given);
    out
}

/// A blob without source labels may have come from anywhere (counted); one with source labels
/// counts only for those registries. containerd's label names the host without the port (label
/// keys cannot hold ':'), so `127.0.0.1:5000` matches `...distribution.source.127.0.0.1`.
fn from_registry(b: &BlobInfo, registry: &str) -> bool {
    let host = host_of(registry);
    let mut sources = b
        .labels
        .keys()
        .filter_map(|k| k.strip_prefix(DISTRIBUTION_SOURCE))
        .peekable();
    sources.peek().is_none() || sources.any(|s| s == registry || s == host)
}

/// A registry's host without its port (`[::1]:5000` -> `::1`, `ghcr.io` -> `ghcr.io`).
pub fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
        _ => registry,
    }
}

fn is_id(name: &str) -> bool {
    name.starts_with("sha256:")
}

fn tag_like<'a>(names: &BTreeSet<&'a str>) -> Option<&'a str> {
    names
        .iter()
        .find(|n| !super::inventory::is_alias_name(n))
        .or_else(|| names.iter().find(|n| !is_id(n)))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: &str = "127.0.0.1:5000";
    const SLACK: Slack = Slack {
        lead_ms: 1_000,
        lag_ms: 1_000,
    };

    fn blob(digest: &str, size: u64, t: u64, refs: &[&str]) -> BlobInfo {
        // As containerd writes it: the host without the port.
        let mut labels =
            BTreeMap::from([(format!("{DISTRIBUTION_SOURCE}127.0.0.1"), "app".into())]);
        for (i, r) in refs.iter().enumerate() {
            labels.insert(format!("{GC_REF_CONTENT}l.{i}"), r.to_string());
        }
        BlobInfo {
            digest: digest.into(),
            size,
            created_ms: t,
            labels,
        }
    }

    fn image(name: &str, target: &str, t: u64) -> ImageInfo {
        ImageInfo {
            name: name.into(),
            target: target.into(),
            updated_ms: t,
        }
    }

    fn window(bytes: u64) -> Window {
        Window {
            registry: REG.into(),
            start_ms: 10_000,
            last_ms: 12_000,
            bytes,
        }
    }

    #[test]
    fn registry_hosts() {
        assert_eq!(
            registry_of("127.0.0.1:5000/ragent/app:v1"),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_of("ghcr.io/x/y@sha256:ab"), "ghcr.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(registry_of("busybox"), "docker.io");
    }

    #[test]
    fn distribution_source_labels_like_containerd() {
        let l = |r| distribution_source_label(r);
        assert_eq!(
            l("127.0.0.1:5000/ragent/app:v1"),
            (
                format!("{DISTRIBUTION_SOURCE}127.0.0.1"),
                "ragent/app".into()
            )
        );
        assert_eq!(
            l("ghcr.io/org/app@sha256:ab"),
            (format!("{DISTRIBUTION_SOURCE}ghcr.io"), "org/app".into())
        );
        assert_eq!(
            l("busybox:1.36"),
            (
                format!("{DISTRIBUTION_SOURCE}docker.io"),
                "library/busybox".into()
            )
        );
        assert_eq!(
            l("localhost:5000/a/b"),
            (format!("{DISTRIBUTION_SOURCE}localhost"), "a/b".into())
        );
    }

    #[test]
    fn hosts_without_ports() {
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(host_of("ghcr.io"), "ghcr.io");
        assert_eq!(host_of("[::1]:5000"), "::1");
        assert_eq!(host_of("registry.local:443"), "registry.local");
    }

    #[test]
    fn windows_close_when_quiet_or_too_long() {
        let mut w = Windows::new(1_000, 60_000);
        w.traffic(REG, 0, 0);
        assert!(w.is_idle());
        w.traffic(REG, 100, 0);
        w.traffic(REG, 50, 900);
        assert!(w.close_due(1_800).is_empty());
        let closed = w.close_due(1_900);
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].bytes, closed[0].start_ms, closed[0].last_ms),
            (150, 0, 900)
        );
        assert!(w.is_idle());
        for t in (0..=61_000).step_by(500) {
            w.traffic("r2", 1, t);
            if !w.close_due(t).is_empty() {
                assert_eq!(t, 60_000, "a busy registry is cut at max_ms");
                return;
            }
        }
        panic!("never closed");
    }

    #[test]
    fn one_pull_gets_all_its_bytes() {
        let blobs = vec![
            blob("m", 1_000, 10_100, &["c", "l1", "l2"]),
            blob("c", 1_000, 10_200, &[]),
            blob("l1", 40_000, 11_000, &[]),
            blob("l2", 58_000, 11_500, &[]),
            // Committed long before: not this window's.
            blob("old", 5_000, 1_000, &[]),
        ];
        let images = vec![
            image(&format!("{REG}/app:v1"), "m", 11_900),
            image(&format!("{REG}/app@sha256:m"), "m", 11_900),
            image("sha256:c", "m", 11_900),
        ];
        let a = attribute(&window(102_000), &blobs, &images, SLACK, &BTreeSet::new());
        assert_eq!(a.blob_bytes, 100_000);
        assert_eq!(a.images.len(), 1, "{a:?}");
        assert_eq!(a.images[&format!("{REG}/app:v1")], 102_000);
        assert_eq!(a.unattributed, 0);
    }

    #[test]
    fn shared_layers_are_split_and_the_sum_is_kept() {
        let blobs = vec![
            blob("ma", 1_000, 10_100, &["shared", "a"]),
            blob("mb", 1_000, 10_100, &["shared", "b"]),
            blob("shared", 60_000, 11_000, &[]),
            blob("a", 10_000, 11_000, &[]),
            blob("b", 28_000, 11_000, &[]),
        ];
        let images = vec![
            image(&format!("{REG}/a:1"), "ma", 11_900),
            image(&format!("{REG}/b:1"), "mb", 11_950),
        ];
        let a = attribute(&window(100_001), &blobs, &images, SLACK, &BTreeSet::new());
        // a: 1000 + 30000 + 10000 = 41000; b: 1000 + 30000 + 28000 = 59000 (of 100000).
        assert_eq!(a.images[&format!("{REG}/a:1")], 41_000);
        assert_eq!(a.images[&format!("{REG}/b:1")], 59_000);
        assert_eq!(a.images.values().sum::<u64>() + a.unattributed, 100_001);
    }

    #[test]
    fn an_image_that_already_had_a_blob_does_not_take_it() {
        // "old" image has the shared layer too, but was not pulled in this window.
        let blobs = vec![
            blob("mo", 1_000, 1_000, &["shared"]),
            blob("mn", 1_000, 10_100, &["shared"]),
            blob("shared", 9_000, 11_000, &[]),
        ];
        let images = vec![
            image(&format!("{REG}/old:1"), "mo", 1_000),
            image(&format!("{REG}/new:1"), "mn", 11_900),
        ];
        let a = attribute(&window(10_000), &blobs, &images, SLACK, &BTreeSet::new());
        assert_eq!(a.images.get(&format!("{REG}/old:1")), None);
        assert_eq!(a.images[&format!("{REG}/new:1")], 10_000);
    }

    #[test]
    fn bytes_nothing_explains_are_unattributed() {
        // A failed pull: traffic, but no blob committed.
        let a = attribute(&window(5_000), &[], &[], SLACK, &BTreeSet::new());
        assert_eq!((a.images.len(), a.unattributed), (0, 5_000));
        // Blobs from another registry, or excluded (ragent's own), do not explain it either.
        let mut other = blob("x", 100, 11_000, &[]);
        other.labels = BTreeMap::from([(format!("{DISTRIBUTION_SOURCE}ghcr.io"), "x".into())]);
        let mine = blob("y", 100, 11_000, &[]);
        let a = attribute(
            &window(5_000),
            &[other, mine],
            &[],
            SLACK,
            &BTreeSet::from(["y".to_string()]),
        );
        assert_eq!(a.unattributed, 5_000);
        // A fetched blob that no image references (the pull did not finish): its part stays
        // unattributed, the rest goes to the image.
        let blobs = vec![
            blob("m", 1_000, 10_100, &["l1"]),
            blob("l1", 49_000, 11_000, &[]),
            blob("orphan", 50_000, 11_000, &[]),
        ];
        let images = vec![image(&format!("{REG}/app:v1"), "m", 11_900)];
        let a = attribute(&window(100_000), &blobs, &images, SLACK, &BTreeSet::new());
        assert_eq!(a.images[&format!("{REG}/app:v1")], 50_000);
        assert_eq!(a.unattributed, 50_000);
    }
}
