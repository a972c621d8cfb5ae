//! Cloud Native Buildpacks metadata: parsing the labels a CNB lifecycle writes on an image config
//! and deciding which role each layer plays (see ../shared/docs/cnb.md for the facts).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::oci::ImageConfig;

pub const LABEL_LIFECYCLE: &str = "io.buildpacks.lifecycle.metadata";
pub const LABEL_BUILD: &str = "io.buildpacks.build.metadata";
pub const LABEL_BUILDER: &str = "io.buildpacks.builder.metadata";
pub const LABEL_STACK_ID: &str = "io.buildpacks.stack.id";
pub const LABEL_STACK_MIXINS: &str = "io.buildpacks.stack.mixins";
pub const LABEL_REBASABLE: &str = "io.buildpacks.rebasable";
pub const LABEL_DISTRO_NAME: &str = "io.buildpacks.base.distro.name";
pub const LABEL_DISTRO_VERSION: &str = "io.buildpacks.base.distro.version";
pub const ENV_PLATFORM_API: &str = "CNB_PLATFORM_API";

/// The role a layer plays in a CNB image. Serialized as `run-image`, `launcher`, `buildpack`,
/// `app`, `config`, `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    RunImage,
    Launcher,
    Buildpack,
    App,
    Config,
    Unknown,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::RunImage,
        Role::Launcher,
        Role::Buildpack,
        Role::App,
        Role::Config,
        Role::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::RunImage => "run-image",
            Role::Launcher => "launcher",
            Role::Buildpack => "buildpack",
            Role::App => "app",
            Role::Config => "config",
            Role::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CnbError {
    #[error("label {label} is not valid JSON of the CNB shape: {source}")]
    MalformedLabel {
        label: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("label {LABEL_STACK_MIXINS} is not a JSON array of strings: {source}")]
    MalformedMixins {
        #[source]
        source: serde_json::Error,
    },
}

/// `io.buildpacks.lifecycle.metadata`, the fields ragent uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleMetadata {
    #[serde(default)]
    pub run_image: RunImageMeta,
    #[serde(default)]
    pub stack: Option<StackMeta>,
    #[serde(default)]
    pub launcher: Option<ShaRef>,
    #[serde(default)]
    pub config: Option<ShaRef>,
    #[serde(default)]
    pub app: Vec<ShaRef>,
    #[serde(default)]
    pub buildpacks: Vec<BuildpackLayers>,
    /// The lifecycle's own layers besides the config layer (reported with role `config`).
    #[serde(default, rename = "process-types")]
    pub process_types: Option<ShaRef>,
    #[serde(default)]
    pub sbom: Option<ShaRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunImageMeta {
    #[serde(default)]
    pub top_layer: String,
    #[serde(default)]
    pub reference: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StackMeta {
    #[serde(default)]
    pub run_image: StackRunImage,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StackRunImage {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ShaRef {
    #[serde(default)]
    pub sha: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct BuildpackLayers {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub layers: BTreeMap<String, BuildpackLayer>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct BuildpackLayer {
    #[serde(default)]
    pub sha: String,
    #[serde(default)]
    pub launch: bool,
}

/// `io.buildpacks.build.metadata`, the fields ragent uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct BuildMetadata {
    #[serde(default)]
    pub buildpacks: Vec<BuildpackRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct BuildpackRef {
    pub id: String,
    #[serde(default)]
    pub version: String,
}

/// What kind of CNB image a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CnbKind {
    /// An app image exported by the lifecycle (has lifecycle metadata).
    App,
    /// A run image (stack/base labels, no lifecycle metadata).
    RunImage,
}

/// The run image an app sits on, as its labels say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunImageInfo {
    pub reference: String,
    pub top_layer: String,
    /// `runImage.image` (0.12+) or `stack.runImage.image` (older platform APIs).
    pub image: Option<String>,
    pub mirrors: Vec<String>,
}

/// The CNB facts about one image, as `ragent images` reports them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CnbInfo {
    pub kind: CnbKind,
    pub platform_api: Option<String>,
    pub stack_id: Option<String>,
    pub mixins: Vec<String>,
    pub distro: Option<String>,
    pub rebasable: bool,
    pub run_image: Option<RunImageInfo>,
    pub buildpacks: Vec<BuildpackRef>,
}

/// A parsed CNB image: the reportable facts plus what layer classification needs.
#[derive(Debug, Clone, PartialEq)]
pub struct CnbImage {
    pub info: CnbInfo,
    pub lifecycle: Option<LifecycleMetadata>,
}

/// Reads the CNB labels of a config. `Ok(None)` for an image that is not a CNB image at all.
pub fn parse(config: &ImageConfig) -> Result<Option<CnbImage>, CnbError> {
    let labels = &config.labels;
    let lifecycle =
        match labels.get(LABEL_LIFECYCLE) {
            Some(raw) => Some(serde_json::from_str::<LifecycleMetadata>(raw).map_err(
                |source| CnbError::MalformedLabel {
                    label: LABEL_LIFECYCLE,
                    source,
                },
            )?),
            None => None,
        };
    let stack_id = labels
        .get(LABEL_STACK_ID)
        .filter(|s| !s.is_empty())
        .cloned();
    let distro_name = labels.get(LABEL_DISTRO_NAME).filter(|s| !s.is_empty());
    // Builder (and build) images carry stack labels too, but are not run images.
    let is_run_image = lifecycle.is_none()
        && !labels.contains_key(LABEL_BUILDER)
        && (stack_id.is_some() || distro_name.is_some());
    if lifecycle.is_none() && !is_run_image {
        return Ok(None);
    }
    let build = match labels.get(LABEL_BUILD) {
        Some(raw) => serde_json::from_str::<BuildMetadata>(raw).map_err(|source| {
            CnbError::MalformedLabel {
                label: LABEL_BUILD,
                source,
            }
        })?,
        None => BuildMetadata::default(),
    };
    let mixins = match labels.get(LABEL_STACK_MIXINS) {
        Some(raw) => serde_json::from_str::<Vec<String>>(raw)
            .map_err(|source| CnbError::MalformedMixins { source })?,
        None => Vec::new(),
    };
    let distro = distro_name.map(|n| match labels.get(LABEL_DISTRO_VERSION) {
        Some(v) if !v.is_empty() => format!("{n} {v}"),
        _ => n.clone(),
    });
    let run_image = lifecycle.as_ref().map(|l| {
        let stack = l.stack.clone().unwrap_or_default().run_image;
        let (image, mirrors) = match &l.run_image.image {
            Some(img) if !img.is_empty() => (Some(img.clone()), l.run_image.mirrors.clone()),
            _ => (stack.image.filter(|s| !s.is_empty()), stack.mirrors),
        };
        RunImageInfo {
            reference: l.run_image.reference.clone(),
            top_layer: l.run_image.top_layer.clone(),
            image,
            mirrors,
        }
    });
    // Buildpacks: the build metadata names them with versions; fall back to the lifecycle's keys.
    let buildpacks = if !build.buildpacks.is_empty() {
        build.buildpacks
    } else {
        lifecycle
            .as_ref()
            .map(|l| {
                l.buildpacks
                    .iter()
                    .map(|b| BuildpackRef {
                        id: b.key.clone(),
                        version: b.version.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Some(CnbImage {
        info: CnbInfo {
            kind: if is_run_image {
                CnbKind::RunImage
            } else {
                CnbKind::App
            },
            platform_api: config.env_var(ENV_PLATFORM_API).map(str::to_string),
            stack_id,
            mixins,
            distro,
            rebasable: labels.get(LABEL_REBASABLE).map(String::as_str) != Some("false"),
            run_image,
            buildpacks,
        },
        lifecycle,
    }))
}

/// The role of each layer (by position in `diff_ids`) of a CNB image, plus warnings for
/// metadata that does not fit the layers. Non-CNB images get `Unknown` everywhere.
pub fn classify_layers(diff_ids: &[String], cnb: Option<&CnbImage>) -> (Vec<Role>, Vec<String>) {
    let mut warnings = Vec::new();
    let Some(cnb) = cnb else {
        return (vec![Role::Unknown; diff_ids.len()], warnings);
    };
    let Some(lc) = &cnb.lifecycle else {
        // A run image: every layer is the run image's.
        return (vec![Role::RunImage; diff_ids.len()], warnings);
    };
    let mut roles = vec![Role::Unknown; diff_ids.len()];
    let top = diff_ids.iter().position(|d| *d == lc.run_image.top_layer);
    match top {
        Some(t) => roles[..=t].iter_mut().for_each(|r| *r = Role::RunImage),
        None => warnings.push(format!(
            "runImage.topLayer {} is not among the image's layers: the run-image layers cannot be told apart",
            if lc.run_image.top_layer.is_empty() {
                "(empty)"
            } else {
                lc.run_image.top_layer.as_str()
            }
        )),
    }
    let boundary = top.map_or(0, |t| t + 1);
    let mut by_sha: BTreeMap<&str, Role> = BTreeMap::new();
    for bp in &lc.buildpacks {
        for layer in bp.layers.values() {
            by_sha.insert(layer.sha.as_str(), Role::Buildpack);
        }
    }
    if let Some(l) = &lc.launcher {
        by_sha.insert(l.sha.as_str(), Role::Launcher);
    }
    for c in [&lc.config, &lc.process_types, &lc.sbom]
        .into_iter()
        .flatten()
    {
        by_sha.insert(c.sha.as_str(), Role::Config);
    }
    for a in &lc.app {
        by_sha.insert(a.sha.as_str(), Role::App);
    }
    for (i, d) in diff_ids.iter().enumerate().skip(boundary) {
        if let Some(role) = by_sha.get(d.as_str()) {
            roles[i] = *role;
        }
    }
    (roles, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(labels: &[(&str, &str)], env: &[&str], diff_ids: &[&str]) -> ImageConfig {
        ImageConfig {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
            diff_ids: diff_ids.iter().map(|s| s.to_string()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
        }
    }

    const LC: &str = r#"{
      "runImage": {"topLayer": "sha256:r2", "reference": "sha256:runref",
                   "image": "reg/run:v1", "mirrors": ["mirror/run:v1"]},
      "launcher": {"sha": "sha256:l"},
      "buildpacks": [{"key": "py", "version": "1.0",
                      "layers": {"cpython": {"sha": "sha256:b1", "launch": true},
                                 "pip": {"sha": "sha256:b2", "launch": true}}}],
      "config": {"sha": "sha256:c"},
      "app": [{"sha": "sha256:a"}]
    }"#;

    #[test]
    fn classifies_every_layer_of_an_app_image() {
        let cfg = config(
            &[(LABEL_LIFECYCLE, LC), (LABEL_STACK_ID, "s")],
            &["CNB_PLATFORM_API=0.12"],
            &[
                "sha256:r1",
                "sha256:r2",
                "sha256:l",
                "sha256:b1",
                "sha256:b2",
                "sha256:c",
                "sha256:a",
            ],
        );
        let cnb = parse(&cfg).unwrap().unwrap();
        assert_eq!(cnb.info.kind, CnbKind::App);
        assert_eq!(cnb.info.platform_api.as_deref(), Some("0.12"));
        let (roles, warnings) = classify_layers(&cfg.diff_ids, Some(&cnb));
        assert!(warnings.is_empty());
        use Role::*;
        assert_eq!(
            roles,
            vec![
                RunImage, RunImage, Launcher, Buildpack, Buildpack, Config, App
            ]
        );
        // Without build metadata, buildpacks come from the lifecycle keys.
        assert_eq!(
            cnb.info.buildpacks,
            vec![BuildpackRef {
                id: "py".into(),
                version: "1.0".into()
            }]
        );
        let ri = cnb.info.run_image.unwrap();
        assert_eq!(ri.image.as_deref(), Some("reg/run:v1"));
        assert_eq!(ri.mirrors, vec!["mirror/run:v1"]);
    }

    #[test]
    fn an_app_layer_that_equals_a_run_layer_stays_run_image() {
        // The boundary decides below topLayer, even when a digest repeats above it.
        let lc = LC.replace("sha256:a\"", "sha256:r1\"");
        let cfg = config(
            &[(LABEL_LIFECYCLE, &lc)],
            &[],
            &["sha256:r1", "sha256:r2", "sha256:r1"],
        );
        let cnb = parse(&cfg).unwrap().unwrap();
        let (roles, _) = classify_layers(&cfg.diff_ids, Some(&cnb));
        assert_eq!(roles, vec![Role::RunImage, Role::RunImage, Role::App]);
    }

    #[test]
    fn top_layer_missing_gives_a_warning_not_a_failure() {
        let cfg = config(
            &[(LABEL_LIFECYCLE, LC)],
            &[],
            &["sha256:x", "sha256:l", "sha256:a"],
        );
        let cnb = parse(&cfg).unwrap().unwrap();
        let (roles, warnings) = classify_layers(&cfg.diff_ids, Some(&cnb));
        assert_eq!(roles, vec![Role::Unknown, Role::Launcher, Role::App]);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("sha256:r2"));
    }

    #[test]
    fn old_platform_api_reads_stack_run_image_and_mixins() {
        let lc = r#"{"runImage":{"topLayer":"sha256:r","reference":"sha256:ref"},
                     "stack":{"runImage":{"image":"reg/run:v1","mirrors":["m/run:v1"]}}}"#;
        let cfg = config(
            &[
                (LABEL_LIFECYCLE, lc),
                (LABEL_STACK_ID, "io.ragent.stacks.sample"),
                (LABEL_STACK_MIXINS, r#"["tzdata","run:shell"]"#),
                (
                    LABEL_BUILD,
                    r#"{"buildpacks":[{"id":"jre","version":"17"}]}"#,
                ),
            ],
            &["CNB_PLATFORM_API=0.10"],
            &["sha256:r"],
        );
        let cnb = parse(&cfg).unwrap().unwrap();
        assert_eq!(
            cnb.info.stack_id.as_deref(),
            Some("io.ragent.stacks.sample")
        );
        assert_eq!(cnb.info.mixins, vec!["tzdata", "run:shell"]);
        assert_eq!(
            cnb.info.run_image.as_ref().unwrap().image.as_deref(),
            Some("reg/run:v1")
        );
        assert_eq!(cnb.info.buildpacks[0].id, "jre");
    }

    #[test]
    fn run_image_is_recognised_by_its_stack_labels() {
        let cfg = config(
            &[
                (LABEL_DISTRO_NAME, "ragent-linux"),
                (LABEL_DISTRO_VERSION, "1.0"),
            ],
            &[],
            &["sha256:1", "sha256:2"],
        );
        let cnb = parse(&cfg).unwrap().unwrap();
        assert_eq!(cnb.info.kind, CnbKind::RunImage);
        assert_eq!(cnb.info.distro.as_deref(), Some("ragent-linux 1.0"));
        assert_eq!(
            classify_layers(&cfg.diff_ids, Some(&cnb)).0,
            vec![Role::RunImage; 2]
        );
    }

    #[test]
    fn process_types_and_sbom_layers_are_config_and_builders_are_not_run_images() {
        let lc = r#"{"runImage":{"topLayer":"sha256:r"},"config":{"sha":"sha256:c"},
                     "process-types":{"sha":"sha256:p"},"sbom":{"sha":"sha256:s"},"app":[{"sha":"sha256:a"}]}"#;
        let cfg = config(
            &[(LABEL_LIFECYCLE, lc)],
            &[],
            &["sha256:r", "sha256:p", "sha256:s", "sha256:c", "sha256:a"],
        );
        let cnb = parse(&cfg).unwrap().unwrap();
        let (roles, _) = classify_layers(&cfg.diff_ids, Some(&cnb));
        assert_eq!(
            roles,
            vec![
                Role::RunImage,
                Role::Config,
                Role::Config,
                Role::Config,
                Role::App
            ]
        );
        let builder = config(
            &[(LABEL_STACK_ID, "s"), (LABEL_BUILDER, "{}")],
            &[],
            &["sha256:1"],
        );
        assert!(parse(&builder).unwrap().is_none());
    }

    #[test]
    fn non_cnb_image_is_none_and_all_unknown() {
        let cfg = config(&[("maintainer", "x")], &[], &["sha256:1"]);
        assert!(parse(&cfg).unwrap().is_none());
        assert_eq!(classify_layers(&cfg.diff_ids, None).0, vec![Role::Unknown]);
    }

    #[test]
    fn malformed_labels_are_errors_naming_the_label() {
        let cfg = config(&[(LABEL_LIFECYCLE, "{not json")], &[], &[]);
        let e = parse(&cfg).unwrap_err().to_string();
        assert!(e.contains(LABEL_LIFECYCLE), "{e}");
        let cfg = config(
            &[(LABEL_STACK_ID, "s"), (LABEL_STACK_MIXINS, "\"x\"")],
            &[],
            &[],
        );
        assert!(
            parse(&cfg)
                .unwrap_err()
                .to_string()
                .contains(LABEL_STACK_MIXINS)
        );
    }

    #[test]
    fn rebasable_false_is_read() {
        let cfg = config(
            &[(LABEL_LIFECYCLE, LC), (LABEL_REBASABLE, "false")],
            &[],
            &[],
        );
        assert!(!parse(&cfg).unwrap().unwrap().info.rebasable);
    }
}
