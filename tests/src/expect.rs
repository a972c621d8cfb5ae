//! What a rebase of a sample app onto a sample run image must produce, written out from the CNB
//! rules (../shared/docs/cnb.md) step by step for the fixtures' known shape — not computed by
//! ragent's code. The end-to-end tests compare ragent's result with this byte for byte, and a
//! unit test below pins the digests it gives, so a change on either side shows.
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::fixtures::{FixtureSet, Image};

/// The lifecycle's normalized timestamp.
pub const CREATED: &str = "1980-01-01T00:00:01Z";
/// Every sample run image has two layers: `run-base` and a release layer.
pub const RUN_LAYERS: usize = 2;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A blob of the fixtures' OCI layout.
pub fn blob(set: &FixtureSet, digest: &str) -> Result<Vec<u8>> {
    let p = set
        .layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

fn json_blob(set: &FixtureSet, digest: &str) -> Result<Value> {
    Ok(serde_json::from_slice(&blob(set, digest)?)?)
}

/// The expected (config, manifest) bytes of `app` rebased onto `run` (both from `set`), when
/// the run image is named in the app's metadata (no forced rename).
pub fn rebased(set: &FixtureSet, app: &Image, run: &Image) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut config = json_blob(set, &app.config_digest)?;
    let run_config = json_blob(set, &run.config_digest)?;
    let app_manifest = json_blob(set, &app.manifest_digest)?;
    let run_manifest = json_blob(set, &run.manifest_digest)?;
    if app.layers[..RUN_LAYERS]
        .iter()
        .any(|l| l.role != "run-image")
    {
        bail!(
            "{} does not start with {RUN_LAYERS} run-image layers",
            app.repo
        );
    }

    // 1. Layers: the run image's two, then the app's from the third on (same blobs).
    let diff_ids: Vec<&str> = run
        .layers
        .iter()
        .map(|l| l.diff_id.as_str())
        .chain(app.layers[RUN_LAYERS..].iter().map(|l| l.diff_id.as_str()))
        .collect();
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});

    // 2. History: the run image's entries, then the app's from the third on (one entry per
    //    layer in the fixtures), every `created` normalized.
    let mut history: Vec<Value> = run_config["history"]
        .as_array()
        .context("run history")?
        .clone();
    history.extend(
        config["history"].as_array().context("app history")?[RUN_LAYERS..]
            .iter()
            .cloned(),
    );
    for h in &mut history {
        h["created"] = json!(CREATED);
    }
    config["history"] = Value::Array(history);
    config["created"] = json!(CREATED);
    config["os"] = run_config["os"].clone();
    config["architecture"] = run_config["architecture"].clone();

    // 3. Labels: runImage.topLayer and runImage.reference move to the new run image; every
    //    io.buildpacks.stack.* / io.buildpacks.base.* label is the new run image's.
    let labels = config["config"]["Labels"]
        .as_object_mut()
        .context("app labels")?;
    let mut lifecycle: Value = serde_json::from_str(
        labels["io.buildpacks.lifecycle.metadata"]
            .as_str()
            .context("lifecycle label")?,
    )?;
    lifecycle["runImage"]["topLayer"] = json!(run.layers[RUN_LAYERS - 1].diff_id);
    lifecycle["runImage"]["reference"] = json!(run.manifest_digest);
    labels.insert(
        "io.buildpacks.lifecycle.metadata".into(),
        json!(serde_json::to_string(&lifecycle)?),
    );
    labels.retain(|k, _| {
        !k.starts_with("io.buildpacks.stack.") && !k.starts_with("io.buildpacks.base.")
    });
    for (k, v) in run_config["config"]["Labels"]
        .as_object()
        .context("run labels")?
    {
        if k.starts_with("io.buildpacks.stack.") || k.starts_with("io.buildpacks.base.") {
            labels.insert(k.clone(), v.clone());
        }
    }
    let config_bytes = serde_json::to_vec(&config)?;

    // 4. The manifest: the app's, pointing at the new config, with the new layer list.
    let mut manifest = app_manifest.clone();
    manifest["config"] = json!({
        "mediaType": app_manifest["config"]["mediaType"],
        "digest": sha256(&config_bytes),
        "size": config_bytes.len(),
    });
    let mut layers: Vec<Value> = run_manifest["layers"]
        .as_array()
        .context("run layers")?
        .clone();
    layers.extend(
        app_manifest["layers"].as_array().context("app layers")?[RUN_LAYERS..]
            .iter()
            .cloned(),
    );
    manifest["layers"] = Value::Array(layers);
    Ok((config_bytes, serde_json::to_vec(&manifest)?))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::fixtures;

    /// The digests the rules above give for the four sample apps on `run:v2`, with the
    /// fixtures built for registry 127.0.0.1:5000 (the registry is part of an app's labels).
    /// If the fixtures change on purpose, update these from the failure message.
    const GOLDEN: &[(&str, &str)] = &[
        (
            "ragent/app-py-web",
            "sha256:ad9a9c54cb7f10d86d73f035854ee8bad96d557dd02f5c0fc76df1b761429bdf",
        ),
        (
            "ragent/app-py-worker",
            "sha256:8508cd1bdca3b36a6de49feca35a1503e6d9c3792861c610db60c86583ef8e19",
        ),
        (
            "ragent/app-jvm-api",
            "sha256:8b5488b2ee39c05e5ccda7ee0a18cf4451f084d61519e57960efb70a98386932",
        ),
        (
            "ragent/app-jvm-batch",
            "sha256:8cb6b5af8d6eac9f0939f65f08fa1ad018420301f67e7807edd940edab2347ee",
        ),
    ];

    #[test]
    fn golden_digests_of_the_sample_apps_on_run_v2() {
        if !Path::new(fixtures::BUSYBOX_PATH).exists() {
            if std::env::var_os("RAGENT_STRICT_TESTS").is_some() {
                panic!(
                    "{} is missing: run `cargo xtask setup`",
                    fixtures::BUSYBOX_PATH
                );
            }
            eprintln!("skipped: {} is missing", fixtures::BUSYBOX_PATH);
            return;
        }
        let dir = std::env::temp_dir().join(format!("ragent-expect-{}", std::process::id()));
        let set = fixtures::build(&dir, &fixtures::Options::new("127.0.0.1:5000")).unwrap();
        let run = set.image("ragent/run", "v2").unwrap();
        let mut got = Vec::new();
        for (repo, _) in GOLDEN {
            let app = set.image(repo, "v1").unwrap();
            let (config, manifest) = rebased(&set, app, run).unwrap();
            // The rebased config keeps the app's runtime config and names the new run image.
            let c: Value = serde_json::from_slice(&config).unwrap();
            assert_eq!(c["rootfs"]["diff_ids"][1], run.layers[1].diff_id.as_str());
            got.push((*repo, sha256(&manifest)));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let want: Vec<(&str, String)> = GOLDEN.iter().map(|(r, d)| (*r, d.to_string())).collect();
        assert_eq!(got, want, "golden rebase digests changed");
    }
}
