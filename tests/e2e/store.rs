//! Writing into containerd's store with ragent's writer (the pre-pull engine's last step):
//! leases, digest-checked ingests that resume, image records CRI lists, unpacked snapshots.
use std::{collections::HashMap, path::Path, time::Duration};

use containerd_client::tonic::Request;
use futures::stream;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest, image_service_client::ImageServiceClient};
use ragent::{
    adapters::{
        containerd::{Containerd, ContainerdError},
        containerd_write::WriteOutcome,
    },
    core::oci::Descriptor,
};
use sha2::{Digest, Sha256};

use crate::support::*;

fn desc(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: digest.into(),
        size,
        platform: None,
        annotations: Default::default(),
    }
}

/// The bytes of `data` from `offset` on, in 64 KiB pieces.
fn bytes_from(
    data: Vec<u8>,
    offset: u64,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let rest = data[usize::try_from(offset).expect("offset").min(data.len())..].to_vec();
    stream::iter(
        rest.chunks(64 << 10)
            .map(|c| Ok(c.to_vec()))
            .collect::<Vec<_>>(),
    )
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .expect("fixture blob")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_writes_an_image_that_cri_lists_and_that_is_unpacked() {
    let node = node();
    let set = fixtures(&node);
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    let img = set.image("ragent/app-jvm-batch", "v1").expect("fixture");
    let name = "ragent.test/written/app-jvm-batch:v1";
    let lease = c
        .create_lease("ragent-e2e-store", Duration::from_secs(600))
        .await
        .expect("lease");

    let config_bytes = blob(&set.layout, &img.config_digest);
    let config_desc = desc(
        "application/vnd.oci.image.config.v1+json",
        &img.config_digest,
        config_bytes.len() as u64,
    );
    let layers: Vec<Descriptor> = img
        .layers
        .iter()
        .map(|l| {
            desc(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &l.digest,
                l.size,
            )
        })
        .collect();
    for d in layers.iter().chain([&config_desc]) {
        let data = blob(&set.layout, &d.digest);
        c.write_blob(
            &lease,
            &format!("ragent-e2e-{}", d.digest),
            d,
            HashMap::new(),
            |off| bytes_from(data, off),
        )
        .await
        .unwrap_or_else(|e| panic!("writing {}: {e}", d.digest));
    }
    let diff_ids: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    let top = c
        .unpack(&lease, &layers, &diff_ids)
        .await
        .expect("unpack")
        .expect("a top layer");
    c.label_content(
        &img.config_digest,
        HashMap::from([("containerd.io/gc.ref.snapshot.overlayfs".to_string(), top)]),
    )
    .await
    .expect("label config");
    let mut labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        img.config_digest.clone(),
    )]);
    for (i, l) in img.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    let manifest_bytes = blob(&set.layout, &img.manifest_digest);
    let manifest_desc = desc(
        "application/vnd.oci.image.manifest.v1+json",
        &img.manifest_digest,
        img.manifest_size,
    );
    c.write_blob(
        &lease,
        &format!("ragent-e2e-{}", img.manifest_digest),
        &manifest_desc,
        labels,
        |off| bytes_from(manifest_bytes, off),
    )
    .await
    .expect("manifest");
    c.put_image(
        &lease,
        name,
        &manifest_desc,
        HashMap::from([("io.cri-containerd.image".to_string(), "managed".to_string())]),
    )
    .await
    .expect("image record");
    c.delete_lease(&lease, true).await.expect("drop lease");

    // The record points at complete content, even with the lease gone.
    for d in layers.iter().chain([&config_desc, &manifest_desc]) {
        assert_eq!(
            c.content_size(&d.digest).await.expect("info"),
            Some(d.size),
            "{}",
            d.digest
        );
    }
    // CRI sees it, by the name we gave it.
    let channel = containerd_client::connect(node.socket())
        .await
        .expect("CRI");
    let status = ImageServiceClient::new(channel)
        .image_status(Request::new(ImageStatusRequest {
            image: Some(ImageSpec {
                image: name.into(),
                ..Default::default()
            }),
            verbose: false,
        }))
        .await
        .expect("ImageStatus")
        .into_inner();
    let image = status.image.expect("CRI knows the image");
    assert!(
        image.repo_tags.iter().any(|t| t == name),
        "{:?}",
        image.repo_tags
    );
    // Every layer is unpacked: the snapshot of the top chain exists.
    let out = node
        .ctr("k8s.io")
        .args(["snapshots", "--snapshotter", "overlayfs", "ls"])
        .output()
        .expect("ctr");
    let listing = String::from_utf8_lossy(&out.stdout);
    let chains = ragent::core::chain::chain_ids(&diff_ids);
    assert!(listing.contains(chains.last().expect("top")), "{listing}");
    // ragent images agrees.
    let out = ragent(&node, &["images", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let entry = v["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| {
            i["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == name))
        })
        .expect("listed");
    assert_eq!(entry["digest"], img.manifest_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_rejects_bytes_that_do_not_match_and_commits_nothing() {
    let node = node();
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    let good = b"ragent: the bytes the registry promised".to_vec();
    let digest = format!("sha256:{:x}", Sha256::digest(&good));
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    let d = desc("application/octet-stream", &digest, good.len() as u64);
    let lease = c
        .create_lease("ragent-e2e-reject", Duration::from_secs(600))
        .await
        .expect("lease");
    let err = c
        .write_blob(&lease, "ragent-e2e-reject", &d, HashMap::new(), |off| {
            bytes_from(bad, off)
        })
        .await
        .expect_err("a blob with the wrong bytes must be refused");
    assert!(matches!(err, ContainerdError::Rejected { .. }), "{err}");
    assert!(err.to_string().contains(&digest), "{err}");
    assert_eq!(
        c.content_size(&digest).await.expect("info"),
        None,
        "nothing committed"
    );
    c.delete_lease(&lease, true).await.expect("drop lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_resumes_a_partial_ingest_where_it_stopped() {
    let node = node();
    let c = Containerd::connect(&node.socket(), "k8s.io")
        .await
        .expect("connect");
    let data: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = format!("sha256:{:x}", Sha256::digest(&data));
    let d = desc("application/octet-stream", &digest, data.len() as u64);
    let ingest = format!("ragent-e2e-resume-{digest}");
    let lease = c
        .create_lease("ragent-e2e-resume", Duration::from_secs(600))
        .await
        .expect("lease");

    // The first writer dies after 2 MiB (its source fails, as a dropped connection would).
    let first: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(data[..1 << 20].to_vec()),
        Ok(data[1 << 20..2 << 20].to_vec()),
        Err(std::io::Error::other("connection reset by the registry")),
    ];
    let err = c
        .write_blob(&lease, &ingest, &d, HashMap::new(), |_| stream::iter(first))
        .await
        .expect_err("the source failed");
    assert!(err.to_string().contains("connection reset"), "{err}");
    assert_eq!(c.content_size(&digest).await.expect("info"), None);
    let offset = c.ingest_offset(&ingest).await.expect("status");
    assert_eq!(offset, 2 << 20, "the partial ingest keeps what was written");

    // The second writer starts where the first stopped.
    let mut asked_from = None;
    let outcome = c
        .write_blob(&lease, &ingest, &d, HashMap::new(), |off| {
            asked_from = Some(off);
            bytes_from(data.clone(), off)
        })
        .await
        .expect("resume");
    assert_eq!(asked_from, Some(2 << 20));
    assert_eq!(
        outcome,
        WriteOutcome::Written {
            bytes: 1 << 20,
            resumed_from: 2 << 20
        }
    );
    assert_eq!(c.content_size(&digest).await.expect("info"), Some(3 << 20));
    // A third write finds it there and fetches nothing.
    let outcome = c
        .write_blob(
            &lease,
            &ingest,
            &d,
            HashMap::new(),
            |_| -> stream::Iter<std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>> {
                panic!("must not read the source again")
            },
        )
        .await
        .expect("exists");
    assert_eq!(outcome, WriteOutcome::Existed);
    c.delete_lease(&lease, true).await.expect("drop lease");
}
