//! Shared by the benches that mount layers remotely: eStargz layers built
//! with the crate's writer, pushed to a private registry, and prepared
//! through the daemon's gRPC API with the labels containerd's CRI plugin
//! passes, so that the daemon mounts them lazily.

use std::io::Read;

use rstargz::estargz::writer::{BuildOptions, build};
use rstargz::proto::snapshots::snapshots_client::SnapshotsClient;
use rstargz::proto::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use tonic::transport::Channel;

use crate::support::registry::Registry;

/// A layer in the registry.
pub struct Pushed {
    pub digest: String,
    pub toc_digest: String,
}

/// Converts a tar stream to eStargz (fast compression) and pushes it.
pub fn push_estargz(registry: &Registry, repo: &str, tar: impl Read) -> Pushed {
    let mut blob = Vec::new();
    let opts = BuildOptions {
        level: 1,
        ..BuildOptions::default()
    };
    let r = build(tar, &mut blob, &opts).expect("build eStargz");
    let digest = registry.push_blob(repo, &blob);
    assert_eq!(digest, r.blob_digest);
    Pushed {
        digest,
        toc_digest: r.toc_digest,
    }
}

/// Prepares `layers` as independent snapshots `chain-<i>` of `image`;
/// returns how many the daemon mounted remotely.
pub async fn prepare_remote(
    c: &mut SnapshotsClient<Channel>,
    image: &str,
    layers: &[Pushed],
) -> usize {
    let mut remote = 0;
    for (i, l) in layers.iter().enumerate() {
        let labels = [
            ("containerd.io/snapshot.ref", format!("chain-{i}")),
            ("containerd.io/snapshot/cri.image-ref", image.to_string()),
            ("containerd.io/snapshot/cri.layer-digest", l.digest.clone()),
            (
                "containerd.io/snapshot/stargz/toc.digest",
                l.toc_digest.clone(),
            ),
        ];
        let req = PrepareSnapshotRequest {
            snapshotter: String::new(),
            key: format!("extract-{i}"),
            parent: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        // A layer mounted remotely is committed at once: AlreadyExists.
        match c.prepare(req).await {
            Err(s) if s.code() == tonic::Code::AlreadyExists => remote += 1,
            Err(s) => panic!("prepare {i}: {s}"),
            Ok(_) => eprintln!("layer {i} was not prepared remotely"),
        }
    }
    remote
}

/// Removes the snapshots [`prepare_remote`] committed.
pub async fn remove_all(c: &mut SnapshotsClient<Channel>, n: usize) {
    for i in 0..n {
        c.remove(RemoveSnapshotRequest {
            snapshotter: String::new(),
            key: format!("chain-{i}"),
        })
        .await
        .unwrap_or_else(|s| panic!("remove chain-{i}: {s}"));
    }
}

/// Unmounts whatever is left under a directory when dropped (a run that
/// panicked with layers mounted), before the directory is removed.
pub struct Unmounter(pub std::path::PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        crate::support::proc::unmount_all_under(&self.0);
    }
}
