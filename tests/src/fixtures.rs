//! Deterministic sample images that look like Cloud Native Buildpacks output.
//!
//! Built with no network, byte-identical on every run: file contents come from a seeded
//! SplitMix64 stream, tar entries have fixed mtimes (1980-01-01T00:00:01Z) and owner 0, gzip
//! is flate2's Rust backend at level 6 with mtime 0 and OS byte "unknown", JSON keys are sorted.
//! The runnable base carries Debian's static busybox, pinned by package version and hash.
//!
//! The builder records the role of every layer on its own (not from the labels), so tests can
//! check ragent's label parsing against it. The set is described in docs/fixtures.md.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Debian's busybox-static that the runnable base carries.
pub const BUSYBOX_PATH: &str = "/bin/busybox";
pub const BUSYBOX_DEB_VERSION: &str = "1:1.35.0-4+deb12u1+b1";
pub const BUSYBOX_SHA256: &str = "3d9f2889d6782537624a4e1a10e68a2ddd53e0ee8bac02676f27308f42ec6bf6";

/// The normalized time CNB uses for reproducible images (seconds since the epoch).
pub const CNB_EPOCH: u64 = 315_532_801;
pub const CNB_CREATED: &str = "1980-01-01T00:00:01Z";

/// What /etc/ragent-release says in run:v2 (a container can read it to see the patch).
pub const RELEASE_V2: &str = "ragent-linux 1.0 run image v2 (patch level 1: CVE fixes)";
pub const STACK_ID: &str = "io.ragent.stacks.sample";
pub const DISTRO_NAME: &str = "ragent-linux";
pub const MIXINS: &[&str] = &["ragent-tzdata", "ragent-ca-certs", "run:ragent-shell"];
/// The mixins the legacy (platform API 0.10) app requires. Stage prefixes differ from the run
/// image's on purpose: the lifecycle compares mixins without them (`build:ragent-ca-certs` is
/// satisfied by `ragent-ca-certs`, `ragent-shell` by `run:ragent-shell`).
pub const APP_MIXINS: &[&str] = &["ragent-tzdata", "build:ragent-ca-certs", "ragent-shell"];

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Layers of `ragent/app-many-layers:v1`: run ×2, launcher, 15 buildpack layers, config, app.
pub const MANY_LAYERS: usize = 20;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Builder options.
#[derive(Debug, Clone)]
pub struct Options {
    /// The registry the images will be pushed to (`host:port`); it appears in the run-image
    /// references inside the CNB labels, so it is part of the images' identity.
    pub registry: String,
    /// Multiplies every payload size (1 = a few MB per layer; 40 ≈ several hundred MB in all).
    pub scale: u32,
    /// The static busybox to embed.
    pub busybox: PathBuf,
    /// Also build `ragent/app-many-layers:v1`, an app of [`MANY_LAYERS`] layers on `run:v1`
    /// (`cargo xtask bench rebase`). Off by default: the other images are the same either way.
    pub many_layers: bool,
}

impl Options {
    pub fn new(registry: &str) -> Options {
        Options {
            registry: registry.into(),
            scale: 1,
            busybox: PathBuf::from(BUSYBOX_PATH),
            many_layers: false,
        }
    }
}

/// One layer as the builder made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The builder's name for it (e.g. `run-base`, `bp-cpython`, `app:app-py-web`).
    pub name: String,
    /// `run-image`, `launcher`, `buildpack`, `app`, `config` or `unknown`, by construction.
    pub role: String,
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
}

/// One single-platform image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `ragent/app-py-web`
    pub repo: String,
    pub tag: String,
    /// The ref name inside the OCI layout (skopeo `oci:DIR:REF`); empty for index children.
    pub layout_ref: String,
    /// What the image is for (docs/fixtures.md): `run`, `app`, `pause`, `refuse-stack`, ...
    pub purpose: String,
    pub platform: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub config_digest: String,
    pub layers: Vec<Layer>,
}

/// A multi-platform image index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexImage {
    pub repo: String,
    pub tag: String,
    pub layout_ref: String,
    pub digest: String,
    /// The platform images it lists.
    pub manifests: Vec<Image>,
}

/// Everything the builder wrote, saved as `fixtures.json` next to the OCI layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixtureSet {
    pub registry: String,
    pub scale: u32,
    /// The OCI layout directory holding every image.
    pub layout: PathBuf,
    pub images: Vec<Image>,
    pub indexes: Vec<IndexImage>,
}

impl FixtureSet {
    /// `registry/repo:tag`
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.registry)
    }

    pub fn image(&self, repo: &str, tag: &str) -> Option<&Image> {
        self.images.iter().find(|i| i.repo == repo && i.tag == tag)
    }

    /// Reads a set saved by [`build`].
    pub fn load(dir: &Path) -> Result<FixtureSet> {
        let p = dir.join("fixtures.json");
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    /// Sum of the distinct blobs (configs and layers) of the images `repo:tag`: what a pull
    /// of all of them into an empty containerd fetches as blobs (manifests not counted).
    pub fn unique_blob_bytes(&self, images: &[(&str, &str)]) -> Result<u64> {
        let mut blobs = BTreeMap::new();
        for (repo, tag) in images {
            let img = self
                .image(repo, tag)
                .with_context(|| format!("{repo}:{tag} is not in the fixture set"))?;
            let cfg = self
                .layout
                .join("blobs/sha256")
                .join(img.config_digest.trim_start_matches("sha256:"));
            let size = fs::metadata(&cfg)
                .with_context(|| format!("reading the size of {}", cfg.display()))?
                .len();
            blobs.insert(img.config_digest.clone(), size);
            for l in &img.layers {
                blobs.insert(l.digest.clone(), l.size);
            }
        }
        Ok(blobs.values().sum())
    }

    /// Sum of the distinct layer blobs of the given images.
    pub fn unique_layer_bytes<'a>(images: impl IntoIterator<Item = &'a Image>) -> u64 {
        let mut seen = BTreeMap::new();
        for i in images {
            for l in &i.layers {
                seen.insert(l.digest.clone(), l.size);
            }
        }
        seen.values().sum()
    }
}

/// SplitMix64: a tiny PRNG whose output is fixed forever by this code (no crate version can
/// change the sample bytes).
struct SplitMix64(u64);

impl SplitMix64 {
    fn from_name(name: &str) -> SplitMix64 {
        // FNV-1a of the name as the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        SplitMix64(h)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(name: &str, len: usize) -> Vec<u8> {
        let mut r = SplitMix64::from_name(name);
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&r.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// A file system entry of a layer.
enum Entry {
    Dir(String),
    File(String, Vec<u8>, u32),
    Link(String, String),
}

fn file(path: impl Into<String>, data: impl Into<Vec<u8>>, mode: u32) -> Entry {
    Entry::File(path.into(), data.into(), mode)
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn tar_of(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(CNB_EPOCH);
        h.set_size(size);
        h
    };
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, format!("{p}/"), std::io::empty())?;
            }
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, data.as_slice())?;
            }
            Entry::Link(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::with_capacity(data.len() / 2), Compression::new(6));
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// Writes blobs into the OCI layout, once per digest.
struct Layout {
    dir: PathBuf,
    written: BTreeSet<String>,
    refs: Vec<Value>,
}

impl Layout {
    fn new(dir: &Path) -> Result<Layout> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout {
            dir: dir.into(),
            written: BTreeSet::new(),
            refs: Vec::new(),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(String, u64)> {
        let d = sha256(bytes);
        if self.written.insert(d.clone()) {
            let hex = d.trim_start_matches("sha256:");
            fs::write(self.dir.join("blobs/sha256").join(hex), bytes)?;
        }
        Ok((d, bytes.len() as u64))
    }

    fn finish(self) -> Result<()> {
        let index = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.refs});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// A layer spec: name, role and content.
struct LayerSpec {
    name: String,
    role: &'static str,
    entries: Vec<Entry>,
}

struct Builder {
    opts: Options,
    layout: Layout,
    layers: BTreeMap<String, Layer>,
    busybox: Vec<u8>,
}

/// A platform description: os/arch and whether the base is runnable (busybox only on amd64).
#[derive(Clone, Copy)]
struct Arch {
    oci: &'static str,
    suffix: &'static str,
}

const AMD64: Arch = Arch {
    oci: "amd64",
    suffix: "",
};
const ARM64: Arch = Arch {
    oci: "arm64",
    suffix: "-arm64",
};

/// A run image as built: its layers and labels.
#[derive(Clone)]
struct RunImage {
    image: Image,
    labels: BTreeMap<String, String>,
    /// `created_by` of its history entries (an app built on it starts with the same).
    history: Vec<String>,
}

/// What a run image is made of.
struct RunSpec<'a> {
    repo: &'a str,
    tag: &'a str,
    purpose: &'a str,
    arch: Arch,
    /// (release layer variant, text of /etc/ragent-release)
    release: (&'a str, &'a str),
    stack_id: &'a str,
    mixins: &'a [&'a str],
    distro_version: &'a str,
}

/// What an app is made of.
struct AppSpec<'a> {
    name: &'a str,
    run: &'a RunImage,
    arch: Arch,
    buildpacks: &'a [(&'a str, &'a str, &'a [&'a str])],
    jvm: bool,
    platform_api: &'a str,
    extra_labels: &'a [(&'a str, &'a str)],
    purpose: &'a str,
    app_kib: usize,
}

impl Builder {
    fn scaled(&self, bytes: usize) -> usize {
        bytes * self.opts.scale.max(1) as usize
    }

    fn layer(&mut self, spec: LayerSpec) -> Result<Layer> {
        if let Some(l) = self.layers.get(&spec.name) {
            return Ok(l.clone());
        }
        let tar = tar_of(&spec.entries)?;
        let diff_id = sha256(&tar);
        let gz = gzip(&tar)?;
        let (digest, size) = self.layout.put(&gz)?;
        let l = Layer {
            name: spec.name.clone(),
            role: spec.role.into(),
            digest,
            diff_id,
            size,
        };
        self.layers.insert(spec.name, l.clone());
        Ok(l)
    }

    fn run_base(&mut self, arch: Arch) -> Result<Layer> {
        let mut e = vec![
            Entry::Dir("bin".into()),
            Entry::Dir("etc".into()),
            Entry::Dir("home".into()),
            Entry::Dir("tmp".into()),
            Entry::Dir("usr".into()),
            Entry::Dir("usr/lib".into()),
            Entry::Dir("usr/lib/ragent-stack".into()),
        ];
        if arch.oci == "amd64" {
            e.push(file("bin/busybox", self.busybox.clone(), 0o755));
            for tool in ["sh", "cat", "echo", "ls", "sleep", "env", "id", "true"] {
                e.push(Entry::Link(format!("bin/{tool}"), "busybox".into()));
            }
        }
        e.push(file(
            "etc/os-release",
            format!("NAME=\"Ragent Linux\"\nID={DISTRO_NAME}\nVERSION_ID=1.0\n"),
            0o644,
        ));
        e.push(file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\ncnb:x:1000:1000:cnb:/home/cnb:/bin/sh\n",
            0o644,
        ));
        e.push(file("etc/group", "root:x:0:\ncnb:x:1000:\n", 0o644));
        let name = format!("run-base{}", arch.suffix);
        let payload = SplitMix64::bytes(&name, self.scaled(3 * MIB));
        e.push(file("usr/lib/ragent-stack/libstack.so", payload, 0o644));
        self.layer(LayerSpec {
            name,
            role: "run-image",
            entries: e,
        })
    }

    fn run_release(&mut self, arch: Arch, variant: &str, text: &str) -> Result<Layer> {
        let name = format!("run-release-{variant}{}", arch.suffix);
        let payload = SplitMix64::bytes(&name, self.scaled(256 * KIB));
        self.layer(LayerSpec {
            name,
            role: "run-image",
            entries: vec![
                Entry::Dir("etc".into()),
                file("etc/ragent-release", format!("{text}\n"), 0o644),
                Entry::Dir("usr".into()),
                Entry::Dir("usr/lib".into()),
                Entry::Dir("usr/lib/ragent-stack".into()),
                file("usr/lib/ragent-stack/patch.bin", payload, 0o644),
            ],
        })
    }

    fn history(created_by: &[String]) -> Vec<Value> {
        created_by
            .iter()
            .map(|c| json!({"created": CNB_CREATED, "created_by": c}))
            .collect()
    }

    /// Writes config + manifest; returns the image (not yet referenced in the layout index).
    fn image(
        &mut self,
        repo: &str,
        tag: &str,
        purpose: &str,
        arch: Arch,
        layers: Vec<Layer>,
        config: Value,
    ) -> Result<Image> {
        let cbytes = serde_json::to_vec(&config)?;
        let (config_digest, config_size) = self.layout.put(&cbytes)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
            "layers": layers.iter().map(|l| json!({"mediaType": MT_LAYER, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        });
        let mbytes = serde_json::to_vec(&manifest)?;
        let (manifest_digest, manifest_size) = self.layout.put(&mbytes)?;
        Ok(Image {
            repo: repo.into(),
            tag: tag.into(),
            layout_ref: String::new(),
            purpose: purpose.into(),
            platform: format!("linux/{}", arch.oci),
            manifest_digest,
            manifest_size,
            config_digest,
            layers,
        })
    }

    fn add_ref(&mut self, mut image: Image) -> Image {
        let r = format!("{}-{}", image.repo.replace('/', "-"), image.tag);
        self.layout.refs.push(json!({
            "mediaType": MT_MANIFEST,
            "digest": image.manifest_digest,
            "size": image.manifest_size,
            "annotations": {REF_NAME: r},
        }));
        image.layout_ref = r;
        image
    }

    fn run_image(&mut self, spec: RunSpec<'_>) -> Result<RunImage> {
        let RunSpec {
            repo,
            tag,
            purpose,
            arch,
            release,
            stack_id,
            mixins,
            distro_version,
        } = spec;
        let base = self.run_base(arch)?;
        let rel = self.run_release(arch, release.0, release.1)?;
        let mut labels = BTreeMap::new();
        labels.insert("io.buildpacks.stack.id".to_string(), stack_id.to_string());
        labels.insert(
            "io.buildpacks.stack.mixins".to_string(),
            serde_json::to_string(mixins)?,
        );
        labels.insert("io.buildpacks.base.id".to_string(), stack_id.to_string());
        labels.insert(
            "io.buildpacks.base.distro.name".to_string(),
            DISTRO_NAME.to_string(),
        );
        labels.insert(
            "io.buildpacks.base.distro.version".to_string(),
            distro_version.to_string(),
        );
        labels.insert(
            "io.buildpacks.base.maintainer".to_string(),
            "ragent samples".to_string(),
        );
        let history = vec![
            "ragent-samples: run image base".to_string(),
            format!("ragent-samples: {}", release.1),
        ];
        let config = json!({
            "architecture": arch.oci,
            "os": "linux",
            "created": CNB_CREATED,
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "Labels": labels,
                "User": "1000:1000",
                "WorkingDir": "/",
                "Cmd": ["/bin/sh"],
            },
            "rootfs": {"type": "layers", "diff_ids": [base.diff_id, rel.diff_id]},
            "history": Self::history(&history),
        });
        let image = self.image(repo, tag, purpose, arch, vec![base, rel], config)?;
        Ok(RunImage {
            image,
            labels,
            history,
        })
    }

    fn launcher(&mut self, arch: Arch) -> Result<Layer> {
        let name = format!("launcher{}", arch.suffix);
        let data = SplitMix64::bytes(&name, self.scaled(MIB));
        self.layer(LayerSpec {
            name,
            role: "launcher",
            entries: vec![
                Entry::Dir("cnb".into()),
                Entry::Dir("cnb/lifecycle".into()),
                file(
                    "cnb/lifecycle/launcher",
                    "#!/bin/sh\n# ragent sample launcher: runs the app's start command\nexec /workspace/start \"$@\"\n",
                    0o755,
                ),
                file("cnb/lifecycle/launcher.data", data, 0o644),
            ],
        })
    }

    fn buildpack_layer(&mut self, arch: Arch, bp: &str, layer: &str) -> Result<Layer> {
        let name = format!("bp-{}-{layer}{}", bp.replace('/', "_"), arch.suffix);
        let size = match layer {
            "cpython" => 3 * MIB,
            "jre" => 4 * MIB,
            "pip-packages" => MIB,
            _ => 512 * KIB,
        };
        let data = SplitMix64::bytes(&name, self.scaled(size));
        let dir = format!("layers/{}/{layer}", bp.replace('/', "_"));
        self.layer(LayerSpec {
            name,
            role: "buildpack",
            entries: vec![
                Entry::Dir("layers".into()),
                Entry::Dir(format!("layers/{}", bp.replace('/', "_"))),
                Entry::Dir(dir.clone()),
                Entry::Dir(format!("{dir}/env")),
                file(format!("{dir}/payload.bin"), data, 0o644),
                file(
                    format!("{dir}/env/MARKER"),
                    format!("{bp} {layer}\n"),
                    0o644,
                ),
            ],
        })
    }

    fn app(&mut self, spec: &AppSpec<'_>) -> Result<Image> {
        let arch = spec.arch;
        let mut layers = spec.run.image.layers.clone();
        let launcher = self.launcher(arch)?;
        layers.push(launcher.clone());
        let mut lc_buildpacks = Vec::new();
        let mut build_buildpacks = Vec::new();
        let mut path = vec![];
        for (bp, version, bp_layers) in spec.buildpacks {
            let mut lmeta = serde_json::Map::new();
            for l in *bp_layers {
                let layer = self.buildpack_layer(arch, bp, l)?;
                lmeta.insert(
                    (*l).to_string(),
                    json!({"sha": layer.diff_id, "data": {"version": version}, "build": false, "launch": true, "cache": false}),
                );
                path.push(format!("/layers/{}/{l}/bin", bp.replace('/', "_")));
                layers.push(layer);
            }
            lc_buildpacks.push(json!({"key": bp, "version": version, "layers": lmeta}));
            build_buildpacks.push(json!({"id": bp, "version": version, "homepage": "https://example.invalid/ragent-samples"}));
        }
        let config_layer = self.layer(LayerSpec {
            name: format!("config:{}{}", spec.name, arch.suffix),
            role: "config",
            entries: vec![
                Entry::Dir("layers".into()),
                Entry::Dir("layers/config".into()),
                file(
                    "layers/config/metadata.toml",
                    format!("[[processes]]\ntype = \"web\"\ncommand = [\"/workspace/start\"]\ndirect = true\n# {}\n", spec.name),
                    0o644,
                ),
                Entry::Dir("cnb".into()),
                Entry::Dir("cnb/process".into()),
                Entry::Link("cnb/process/web".into(), "/cnb/lifecycle/launcher".into()),
            ],
        })?;
        layers.push(config_layer.clone());
        let app_name = format!("app:{}{}", spec.name, arch.suffix);
        let app_data = SplitMix64::bytes(&app_name, self.scaled(spec.app_kib * KIB));
        let app_layer = self.layer(LayerSpec {
            name: app_name,
            role: "app",
            entries: vec![
                Entry::Dir("workspace".into()),
                file(
                    "workspace/start",
                    format!("#!/bin/sh\necho \"{} on $(cat /etc/ragent-release)\"\nexec sleep 2147483647\n", spec.name),
                    0o755,
                ),
                file("workspace/app.bin", app_data, 0o644),
            ],
        })?;
        layers.push(app_layer.clone());

        let reg = &self.opts.registry;
        let run_ref = format!("{reg}/{}:{}", spec.run.image.repo, spec.run.image.tag);
        let mirror = format!("{reg}/ragent/run-mirror:{}", spec.run.image.tag);
        let top = spec
            .run
            .image
            .layers
            .last()
            .map(|l| l.diff_id.clone())
            .unwrap_or_default();
        let legacy = spec.platform_api.starts_with("0.") && version_lt(spec.platform_api, "0.12");
        let run_image = if legacy {
            json!({"topLayer": top, "reference": spec.run.image.manifest_digest})
        } else {
            json!({"topLayer": top, "reference": spec.run.image.manifest_digest, "image": run_ref, "mirrors": [mirror]})
        };
        let lifecycle = json!({
            "app": [{"sha": app_layer.diff_id}],
            "buildpacks": lc_buildpacks,
            "config": {"sha": config_layer.diff_id},
            "launcher": {"sha": launcher.diff_id},
            "runImage": run_image,
            "stack": {"runImage": {"image": run_ref, "mirrors": [mirror]}},
        });
        let build = json!({
            "buildpacks": build_buildpacks,
            "launcher": {"version": "0.20.0", "source": {"git": {"repository": "https://example.invalid/lifecycle", "commit": "0000000"}}},
            "processes": [{"type": "web", "command": ["/workspace/start"], "args": [], "direct": true, "buildpackID": spec.buildpacks.first().map(|b| b.0).unwrap_or("")}],
            "bom": null,
        });
        let mut labels = spec.run.labels.clone();
        if legacy {
            labels.retain(|k, _| !k.starts_with("io.buildpacks.base."));
            labels.insert(
                "io.buildpacks.stack.mixins".into(),
                serde_json::to_string(APP_MIXINS)?,
            );
        }
        labels.insert(
            "io.buildpacks.lifecycle.metadata".into(),
            serde_json::to_string(&lifecycle)?,
        );
        labels.insert(
            "io.buildpacks.build.metadata".into(),
            serde_json::to_string(&build)?,
        );
        labels.insert("io.buildpacks.project.metadata".into(), "{}".into());
        for (k, v) in spec.extra_labels {
            labels.insert((*k).into(), (*v).into());
        }
        path.extend([
            "/cnb/process".into(),
            "/cnb/lifecycle".into(),
            "/usr/bin".into(),
            "/bin".into(),
        ]);
        let mut env = vec![
            format!("PATH={}", path.join(":")),
            format!("CNB_PLATFORM_API={}", spec.platform_api),
            "CNB_LAYERS_DIR=/layers".to_string(),
            "CNB_APP_DIR=/workspace".to_string(),
            "CNB_DEPRECATION_MODE=quiet".to_string(),
        ];
        if spec.jvm {
            env.push("JAVA_HOME=/layers/ragent-samples_jre/jre".into());
            env.push("JAVA_TOOL_OPTIONS=-Xmx384m -XX:MaxMetaspaceSize=96m -XX:ReservedCodeCacheSize=64m -Xss1m".into());
        }
        // As the lifecycle exports it: the run image's history entries, then one per layer
        // above it.
        let created_by: Vec<String> = spec
            .run
            .history
            .iter()
            .cloned()
            .chain(
                layers[spec.run.image.layers.len()..]
                    .iter()
                    .map(|l| format!("ragent-samples: {} ({})", l.name, l.role)),
            )
            .collect();
        let config = json!({
            "architecture": arch.oci,
            "os": "linux",
            "created": CNB_CREATED,
            "config": {
                "Env": env,
                "Labels": labels,
                "Entrypoint": ["/cnb/process/web"],
                "User": "1000:1000",
                "WorkingDir": "/workspace",
            },
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
            "history": Self::history(&created_by),
        });
        self.image(
            &format!("ragent/{}", spec.name),
            "v1",
            spec.purpose,
            arch,
            layers,
            config,
        )
    }
}

/// Compares dotted versions numerically ("0.9" < "0.12").
pub fn version_lt(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a) < parse(b)
}

/// Checks the busybox the runnable base embeds: the pinned Debian package and hash.
pub fn read_busybox(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| {
        format!(
            "reading {} (install Debian's busybox-static {BUSYBOX_DEB_VERSION}: `cargo xtask setup`)",
            path.display()
        )
    })?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != BUSYBOX_SHA256 {
        bail!(
            "{} has sha256 {got}, not the pinned {BUSYBOX_SHA256} of busybox-static {BUSYBOX_DEB_VERSION}; \
             install that version (apt-get install busybox-static={BUSYBOX_DEB_VERSION}) or update the pin in tests/src/fixtures.rs",
            path.display()
        );
    }
    Ok(bytes)
}

/// Builds every sample image into the OCI layout `dir/oci` and saves `dir/fixtures.json`.
pub fn build(dir: &Path, opts: &Options) -> Result<FixtureSet> {
    let busybox = read_busybox(&opts.busybox)?;
    let layout_dir = dir.join("oci");
    let mut b = Builder {
        opts: opts.clone(),
        layout: Layout::new(&layout_dir)?,
        layers: BTreeMap::new(),
        busybox,
    };
    let mut images = Vec::new();
    let mut indexes = Vec::new();

    // The pause image for CRI sandboxes: static busybox sleeping forever, WorkingDir exists.
    let pause_layer = b.layer(LayerSpec {
        name: "pause".into(),
        role: "unknown",
        entries: vec![
            Entry::Dir("bin".into()),
            file("bin/busybox", b.busybox.clone(), 0o755),
            Entry::Link("bin/sleep".into(), "busybox".into()),
        ],
    })?;
    let pause_cfg = json!({
        "architecture": "amd64", "os": "linux", "created": CNB_CREATED,
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [pause_layer.diff_id]},
        "history": Builder::history(&["ragent-samples: pause".into()]),
    });
    let pause = b.image(
        "ragent/pause",
        "3.9",
        "pause",
        AMD64,
        vec![pause_layer],
        pause_cfg,
    )?;
    images.push(b.add_ref(pause));

    // Run images: v1, the patched v2, and three that a rebase must refuse.
    let run_v1 = b.run_image(RunSpec {
        repo: "ragent/run",
        tag: "v1",
        purpose: "run",
        arch: AMD64,
        release: ("v1", "ragent-linux 1.0 run image v1 (patch level 0)"),
        stack_id: STACK_ID,
        mixins: MIXINS,
        distro_version: "1.0",
    })?;
    let run_v2 = b.run_image(RunSpec {
        repo: "ragent/run",
        tag: "v2",
        purpose: "run-patched",
        arch: AMD64,
        release: ("v2", RELEASE_V2),
        stack_id: STACK_ID,
        mixins: MIXINS,
        distro_version: "1.0",
    })?;
    let other_stack = b.run_image(RunSpec {
        repo: "ragent/run-other-stack",
        tag: "v1",
        purpose: "refuse-stack",
        arch: AMD64,
        release: ("other-stack", "ragent-linux 1.0 other stack"),
        stack_id: "io.ragent.stacks.other",
        mixins: MIXINS,
        distro_version: "1.0",
    })?;
    let no_mixin = b.run_image(RunSpec {
        repo: "ragent/run-no-mixin",
        tag: "v1",
        purpose: "refuse-mixin",
        arch: AMD64,
        release: ("v2", RELEASE_V2),
        stack_id: STACK_ID,
        mixins: &["ragent-ca-certs", "run:ragent-shell"],
        distro_version: "1.0",
    })?;
    let other_distro = b.run_image(RunSpec {
        repo: "ragent/run-other-distro",
        tag: "v1",
        purpose: "refuse-distro",
        arch: AMD64,
        release: ("distro2", "ragent-linux 2.0 run image"),
        stack_id: STACK_ID,
        mixins: MIXINS,
        distro_version: "2.0",
    })?;
    let run_arm64 = b.run_image(RunSpec {
        repo: "ragent/run-arm64",
        tag: "v1",
        purpose: "run",
        arch: ARM64,
        release: ("v1", "ragent-linux 1.0 run image v1 arm64"),
        stack_id: STACK_ID,
        mixins: MIXINS,
        distro_version: "1.0",
    })?;
    for r in [
        &run_v1,
        &run_v2,
        &other_stack,
        &no_mixin,
        &other_distro,
        &run_arm64,
    ] {
        images.push(b.add_ref(r.image.clone()));
    }
    // A mirror of run:v1 under another repository (same manifest), named in runImage.mirrors.
    let mut mirror = run_v1.image.clone();
    mirror.repo = "ragent/run-mirror".into();
    images.push(b.add_ref(mirror));

    const PY: &[(&str, &str, &[&str])] = &[
        ("ragent-samples/cpython", "3.12.1", &["cpython"]),
        ("ragent-samples/pip", "24.0", &["pip-packages"]),
    ];
    const PY_ONLY: &[(&str, &str, &[&str])] = &[("ragent-samples/cpython", "3.12.1", &["cpython"])];
    const JVM: &[(&str, &str, &[&str])] = &[
        ("ragent-samples/jre", "17.0.9", &["jre", "helper"]),
        ("ragent-samples/executable-jar", "1.2.0", &["classpath"]),
    ];
    const JVM_ONLY: &[(&str, &str, &[&str])] =
        &[("ragent-samples/jre", "17.0.9", &["jre", "helper"])];

    let apps = [
        AppSpec {
            name: "app-py-web",
            run: &run_v1,
            arch: AMD64,
            buildpacks: PY,
            jvm: false,
            platform_api: "0.12",
            extra_labels: &[],
            purpose: "app",
            app_kib: 512,
        },
        AppSpec {
            name: "app-py-worker",
            run: &run_v1,
            arch: AMD64,
            buildpacks: PY_ONLY,
            jvm: false,
            platform_api: "0.12",
            extra_labels: &[],
            purpose: "app",
            app_kib: 256,
        },
        AppSpec {
            name: "app-jvm-api",
            run: &run_v1,
            arch: AMD64,
            buildpacks: JVM,
            jvm: true,
            platform_api: "0.13",
            extra_labels: &[],
            purpose: "app",
            app_kib: 1024,
        },
        AppSpec {
            name: "app-jvm-batch",
            run: &run_v1,
            arch: AMD64,
            buildpacks: JVM_ONLY,
            jvm: true,
            platform_api: "0.12",
            extra_labels: &[],
            purpose: "app",
            app_kib: 768,
        },
        AppSpec {
            name: "app-py-legacy",
            run: &run_v1,
            arch: AMD64,
            buildpacks: PY_ONLY,
            jvm: false,
            platform_api: "0.10",
            extra_labels: &[],
            purpose: "app-legacy-api",
            app_kib: 256,
        },
        AppSpec {
            name: "app-norebase",
            run: &run_v1,
            arch: AMD64,
            buildpacks: PY_ONLY,
            jvm: false,
            platform_api: "0.12",
            extra_labels: &[("io.buildpacks.rebasable", "false")],
            purpose: "app-not-rebasable",
            app_kib: 256,
        },
        AppSpec {
            name: "app-arm64",
            run: &run_arm64,
            arch: ARM64,
            buildpacks: PY_ONLY,
            jvm: false,
            platform_api: "0.12",
            extra_labels: &[],
            purpose: "app-other-arch",
            app_kib: 256,
        },
        AppSpec {
            name: "app-broken-label",
            run: &run_v1,
            arch: AMD64,
            buildpacks: PY_ONLY,
            jvm: false,
            platform_api: "0.12",
            extra_labels: &[(
                "io.buildpacks.lifecycle.metadata",
                "{\"runImage\": {\"topLayer\": ",
            )],
            purpose: "malformed-label",
            app_kib: 128,
        },
    ];
    for spec in &apps {
        let img = b.app(spec)?;
        images.push(b.add_ref(img));
    }
    if opts.many_layers {
        // cpython and pip as app-py-web has them, then 13 dependency layers of 512 KiB.
        const MANY: &[(&str, &str, &[&str])] = &[
            ("ragent-samples/cpython", "3.12.1", &["cpython"]),
            ("ragent-samples/pip", "24.0", &["pip-packages"]),
            (
                "ragent-samples/deps",
                "1.0.0",
                &[
                    "deps-01", "deps-02", "deps-03", "deps-04", "deps-05", "deps-06", "deps-07",
                    "deps-08", "deps-09", "deps-10", "deps-11", "deps-12", "deps-13",
                ],
            ),
        ];
        let img = b.app(&AppSpec {
            name: "app-many-layers",
            run: &run_v1,
            arch: AMD64,
            buildpacks: MANY,
            jvm: false,
            platform_api: "0.12",
            extra_labels: &[],
            purpose: "app-many-layers",
            app_kib: 512,
        })?;
        if img.layers.len() != MANY_LAYERS {
            bail!(
                "app-many-layers has {} layers, not {MANY_LAYERS}",
                img.layers.len()
            );
        }
        images.push(b.add_ref(img));
    }

    // A multi-platform app: one index over an amd64 and an arm64 manifest.
    let multi_amd = b.app(&AppSpec {
        name: "app-multi",
        run: &run_v1,
        arch: AMD64,
        buildpacks: PY_ONLY,
        jvm: false,
        platform_api: "0.12",
        extra_labels: &[],
        purpose: "app-multiarch",
        app_kib: 256,
    })?;
    let multi_arm = b.app(&AppSpec {
        name: "app-multi",
        run: &run_arm64,
        arch: ARM64,
        buildpacks: PY_ONLY,
        jvm: false,
        platform_api: "0.12",
        extra_labels: &[],
        purpose: "app-multiarch",
        app_kib: 256,
    })?;
    let entries: Vec<Value> = [&multi_amd, &multi_arm]
        .iter()
        .map(|i| {
            json!({
                "mediaType": MT_MANIFEST, "digest": i.manifest_digest, "size": i.manifest_size,
                "platform": {"os": "linux", "architecture": i.platform.trim_start_matches("linux/")},
            })
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries});
    let ibytes = serde_json::to_vec(&index)?;
    let (idigest, isize) = b.layout.put(&ibytes)?;
    let iref = "ragent-app-multi-v1".to_string();
    b.layout.refs.push(json!({"mediaType": MT_INDEX, "digest": idigest, "size": isize, "annotations": {REF_NAME: iref}}));
    indexes.push(IndexImage {
        repo: "ragent/app-multi".into(),
        tag: "v1".into(),
        layout_ref: iref,
        digest: idigest,
        manifests: vec![multi_amd, multi_arm],
    });

    b.layout.finish()?;
    let set = FixtureSet {
        registry: opts.registry.clone(),
        scale: opts.scale,
        layout: layout_dir,
        images,
        indexes,
    };
    fs::write(dir.join("fixtures.json"), serde_json::to_vec_pretty(&set)?)?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ragent-fixtures-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// Whether the pinned busybox is here. Without it the builder cannot run: the test skips
    /// with a message, except under `cargo xtask test` (RAGENT_STRICT_TESTS=1), where it fails.
    fn busybox_available() -> bool {
        if Path::new(BUSYBOX_PATH).exists() {
            return true;
        }
        assert!(
            std::env::var_os("RAGENT_STRICT_TESTS").is_none(),
            "{BUSYBOX_PATH} is missing: run `cargo xtask setup`"
        );
        eprintln!("skipping: {BUSYBOX_PATH} missing (cargo xtask setup installs busybox-static)");
        false
    }

    #[test]
    fn prng_is_stable() {
        // Pinned: if this changes, every fixture digest changes.
        assert_eq!(
            hex::encode(SplitMix64::bytes("ragent", 8)),
            PINNED_PRNG_RAGENT_8
        );
        assert_ne!(SplitMix64::bytes("a", 16), SplitMix64::bytes("b", 16));
        let mut r = SplitMix64(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
    }

    /// SplitMix64::bytes("ragent", 8), as first computed by this code.
    const PINNED_PRNG_RAGENT_8: &str = "a4de753d16044950";

    #[test]
    fn digests_are_pinned_across_runs_and_machines() {
        if !busybox_available() {
            return;
        }
        // Built on 2026-11-28 (apps inherit the run image's history) with busybox-static 1:1.35.0-4+deb12u1+b1 for registry
        // 127.0.0.1:5000 at scale 1. A change here means every sample digest changed (a crate
        // update altered tar/gzip/JSON output, or the builder changed): update the pins on purpose.
        let d = tmp("pin");
        let s = build(&d, &Options::new("127.0.0.1:5000")).unwrap();
        let digest = |repo: &str, tag: &str| s.image(repo, tag).unwrap().manifest_digest.clone();
        assert_eq!(
            digest("ragent/pause", "3.9"),
            "sha256:3266323f366746391748c4a932544e1cd81323c3d3524498b2a24beea6d3394e"
        );
        assert_eq!(
            digest("ragent/run", "v1"),
            "sha256:bbc5ca5be96456e1d1fb649417482762db80fae57c30c4ff8421b42cf94d0d93"
        );
        assert_eq!(
            digest("ragent/run", "v2"),
            "sha256:cbccfa7c01f7790b7a73b6b0f3519f0c85d7ec6125b67fddbf0e9cfb68841a77"
        );
        assert_eq!(
            digest("ragent/app-py-web", "v1"),
            "sha256:c11674c20f82919d9eef92a17abb293ca0298d0d3cb524c42f27c98d773871a4"
        );
        assert_eq!(
            s.indexes[0].digest,
            "sha256:1a076235735db7289d0a54c372261bf24523bfc5564d5ce10b579848d1245021"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn tar_and_gzip_are_deterministic() {
        let e = || {
            vec![
                Entry::Dir("d".into()),
                file("d/f", b"x".to_vec(), 0o644),
                Entry::Link("d/l".into(), "f".into()),
            ]
        };
        let a = gzip(&tar_of(&e()).unwrap()).unwrap();
        let b = gzip(&tar_of(&e()).unwrap()).unwrap();
        assert_eq!(a, b);
        // gzip header: mtime 0, OS 255.
        assert_eq!(&a[4..8], &[0, 0, 0, 0]);
        assert_eq!(a[9], 255);
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(a.as_slice()));
        for entry in ar.entries().unwrap() {
            let h = entry.unwrap().header().clone();
            assert_eq!(h.mtime().unwrap(), CNB_EPOCH);
            assert_eq!(h.uid().unwrap(), 0);
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_lt("0.10", "0.12"));
        assert!(version_lt("0.9", "0.12"));
        assert!(!version_lt("0.12", "0.12"));
        assert!(!version_lt("0.13", "0.12"));
    }

    #[test]
    fn build_is_byte_identical_and_shares_layers() {
        if !busybox_available() {
            eprintln!(
                "skipping: {BUSYBOX_PATH} missing (cargo xtask setup installs busybox-static)"
            );
            return;
        }
        let (d1, d2) = (tmp("a"), tmp("b"));
        let opts = Options::new("127.0.0.1:5000");
        let s1 = build(&d1, &opts).unwrap();
        let s2 = build(&d2, &opts).unwrap();
        assert_eq!(s1.images.len(), s2.images.len());
        for (a, b) in s1.images.iter().zip(&s2.images) {
            assert_eq!(a.manifest_digest, b.manifest_digest, "{}", a.repo);
        }
        assert_eq!(s1.indexes[0].digest, s2.indexes[0].digest);

        // The four main apps share run, launcher and buildpack layers byte for byte.
        let apps: Vec<&Image> = s1.images.iter().filter(|i| i.purpose == "app").collect();
        assert_eq!(apps.len(), 4);
        let run = s1.image("ragent/run", "v1").unwrap();
        for a in &apps {
            assert_eq!(a.layers[..2], run.layers[..], "{} sits on run:v1", a.repo);
            assert_eq!(a.layers[2].role, "launcher");
            assert_eq!(a.layers.last().unwrap().role, "app");
        }
        let total: u64 = apps
            .iter()
            .flat_map(|a| a.layers.iter().map(|l| l.size))
            .sum();
        let unique = FixtureSet::unique_layer_bytes(apps.iter().copied());
        assert!(
            unique * 2 < total,
            "apps share most bytes: unique {unique}, total {total}"
        );

        // run:v2 differs from v1 in exactly one layer.
        let v2 = s1.image("ragent/run", "v2").unwrap();
        assert_eq!(v2.layers[0], run.layers[0]);
        assert_ne!(v2.layers[1].digest, run.layers[1].digest);

        // Every blob referenced is in the layout, with its digest.
        for i in &s1.images {
            for l in &i.layers {
                let p = s1
                    .layout
                    .join("blobs/sha256")
                    .join(l.digest.trim_start_matches("sha256:"));
                let bytes = fs::read(&p).unwrap();
                assert_eq!(sha256(&bytes), l.digest);
            }
        }
        let loaded = FixtureSet::load(&d1).unwrap();
        assert_eq!(loaded, s1);
        let _ = fs::remove_dir_all(&d1);
        let _ = fs::remove_dir_all(&d2);
    }

    #[test]
    fn the_many_layer_app_is_opt_in_and_changes_no_other_image() {
        if !busybox_available() {
            return;
        }
        let (d1, d2) = (tmp("m0"), tmp("m1"));
        let plain = build(&d1, &Options::new("127.0.0.1:5000")).unwrap();
        let mut opts = Options::new("127.0.0.1:5000");
        opts.many_layers = true;
        let many = build(&d2, &opts).unwrap();
        assert!(plain.image("ragent/app-many-layers", "v1").is_none());
        let app = many.image("ragent/app-many-layers", "v1").unwrap();
        assert_eq!(app.layers.len(), MANY_LAYERS);
        assert_eq!(
            app.layers[..2],
            many.image("ragent/run", "v1").unwrap().layers[..]
        );
        let roles: Vec<&str> = app.layers.iter().map(|l| l.role.as_str()).collect();
        assert_eq!(roles.iter().filter(|r| **r == "buildpack").count(), 15);
        assert_eq!(roles[2], "launcher");
        assert_eq!(roles[18..], ["config", "app"]);
        let others: Vec<&Image> = many
            .images
            .iter()
            .filter(|i| i.repo != "ragent/app-many-layers")
            .collect();
        assert_eq!(others.len(), plain.images.len());
        for (a, b) in plain.images.iter().zip(others) {
            assert_eq!(a, b);
        }
        assert_eq!(plain.indexes, many.indexes);
        let _ = fs::remove_dir_all(&d1);
        let _ = fs::remove_dir_all(&d2);
    }

    #[test]
    fn the_registry_is_part_of_the_app_identity_only() {
        if !busybox_available() {
            return;
        }
        let (d1, d2) = (tmp("r1"), tmp("r2"));
        let s1 = build(&d1, &Options::new("127.0.0.1:5000")).unwrap();
        let s2 = build(&d2, &Options::new("127.0.0.1:5055")).unwrap();
        let run = |s: &FixtureSet| s.image("ragent/run", "v1").unwrap().manifest_digest.clone();
        let app = |s: &FixtureSet| {
            s.image("ragent/app-py-web", "v1")
                .unwrap()
                .manifest_digest
                .clone()
        };
        assert_eq!(run(&s1), run(&s2));
        assert_ne!(app(&s1), app(&s2));
        let _ = fs::remove_dir_all(&d1);
        let _ = fs::remove_dir_all(&d2);
    }

    #[test]
    fn a_wrong_busybox_is_refused_with_the_pin() {
        let d = tmp("bb");
        fs::create_dir_all(&d).unwrap();
        let fake = d.join("busybox");
        fs::write(&fake, b"not busybox").unwrap();
        let e = read_busybox(&fake).unwrap_err().to_string();
        assert!(
            e.contains(BUSYBOX_DEB_VERSION) && e.contains(BUSYBOX_SHA256),
            "{e}"
        );
        let _ = fs::remove_dir_all(&d);
    }
}
