//! Snapshotter conformance suite: containerd's snapshots gRPC API, driven
//! over a real socket, written once and run against every implementation.
//!
//! - [`Backend`]: one running snapshotter: a connected client, the
//!   `snapshotter` name to put in requests, optional gRPC metadata (e.g.
//!   `containerd-namespace`) and, optionally, where it keeps snapshot dirs.
//! - [`cases`]: the test cases, plain `async fn(&Backend) -> Result<()>`.
//!   The expected status codes are what containerd 1.6's own overlayfs
//!   snapshotter (behind containerd's metadata layer) returns.
//! - [`mounts`]: mounts a `Vec<Mount>` for real, as containerd would.
//! - [`for_each_case!`](crate::for_each_case): the list of cases; `main.rs`
//!   turns it into one `#[test]` per case per backend.
//!
//! # containerd's metadata layer versus a bare snapshotter
//!
//! The reference is what containerd's clients see: containerd's snapshots
//! service answers through its metadata layer, which wraps the overlayfs
//! snapshotter. A proxy snapshotter such as `rstargz-grpc` sits *under*
//! that layer in production, yet is driven here directly, so it must
//! answer as the combination does. Behaviour that comes from the metadata
//! layer rather than from overlayfs:
//!
//! - keys are per namespace (`containerd-namespace` metadata); overlayfs
//!   itself sees `<ns>/<n>/<key>`;
//! - labels are stored by the metadata layer, validated there (4096 bytes
//!   per key+value, not per map) and empty values are not stored;
//! - an empty key or name fails inside its database and reaches the wire
//!   as `Unknown`; a malformed List filter also arrives as `Unknown`;
//! - snapshots nothing refers to are garbage-collected: the containerd
//!   backend holds a lease, as containerd's clients do, and directories of
//!   removed snapshots disappear when the collector runs, not in Remove;
//! - the Cleanup RPC is `Unimplemented` in containerd 1.6 (the collector
//!   does the work); a proxy snapshotter is expected to implement it.
//!
//! From overlayfs (`storage`) itself: "parent is not committed" is
//! `InvalidArgument`, "snapshot is not active" (Commit or Mounts of a
//! committed snapshot, Commit of a view) is `FailedPrecondition`.

pub mod cases;
pub mod mounts;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rstargz::proto::snapshots::snapshots_client::SnapshotsClient;
use rstargz::proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, UsageResponse, ViewSnapshotRequest,
};
use rstargz::proto::types::Mount;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::Channel;

use crate::backends::{Daemon, Signal};

/// Labels as the API carries them.
pub type Labels = HashMap<String, String>;

/// One snapshotter under test, reached over its gRPC socket.
///
/// Field order matters: the client is dropped before the daemon, which
/// stops the process and unmounts and removes its directories.
pub struct Backend {
    client: std::sync::Mutex<SnapshotsClient<Channel>>,
    snapshotter: String,
    metadata: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
    snapshots_dir: Option<PathBuf>,
    cleanup_implemented: bool,
    scratch: tempfile::TempDir,
    daemon: tokio::sync::Mutex<Daemon>,
}

impl Backend {
    /// `channel` is connected to `daemon`, already started.
    pub fn new(channel: Channel, snapshotter: impl Into<String>, daemon: Daemon) -> Result<Self> {
        Ok(Self {
            client: std::sync::Mutex::new(SnapshotsClient::new(channel)),
            snapshotter: snapshotter.into(),
            metadata: Vec::new(),
            snapshots_dir: None,
            cleanup_implemented: true,
            scratch: tempfile::Builder::new()
                .prefix("conformance-mnt")
                .tempdir()?,
            daemon: tokio::sync::Mutex::new(daemon),
        })
    }

    /// Adds a gRPC metadata entry sent with every request.
    pub fn with_metadata(mut self, key: &'static str, value: &str) -> Result<Self> {
        self.metadata
            .push((MetadataKey::from_static(key), value.parse()?));
        Ok(self)
    }

    /// Where the snapshotter keeps one directory per snapshot, when known.
    pub fn with_snapshots_dir(mut self, dir: PathBuf) -> Self {
        self.snapshots_dir = Some(dir);
        self
    }

    /// Marks the Cleanup RPC as answered `Unimplemented` (containerd 1.6's
    /// metadata layer: its garbage collector removes directories instead).
    pub fn without_cleanup(mut self) -> Self {
        self.cleanup_implemented = false;
        self
    }

    pub fn cleanup_implemented(&self) -> bool {
        self.cleanup_implemented
    }

    pub fn snapshots_dir(&self) -> Option<&Path> {
        self.snapshots_dir.as_deref()
    }

    /// A fresh empty directory for a test's mount points and files.
    /// `name` only makes it recognisable: keys may hold any character.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let readable: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(48)
            .collect();
        let dir = self.scratch.path().join(format!("{n}-{readable}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    }

    /// Stops the daemon with `signal` while this client is still connected,
    /// starts it again on the same directories and reconnects. Returns how
    /// long the stop took.
    pub async fn restart(&self, signal: Signal) -> Result<std::time::Duration> {
        let mut daemon = self.daemon.lock().await;
        let stopped = daemon.stop(signal).await?;
        let channel = daemon.start().await?;
        *self.client.lock().expect("client lock") = SnapshotsClient::new(channel);
        drop(daemon);
        self.wait_ready().await?;
        Ok(stopped)
    }

    /// Waits until the snapshots service answers.
    pub async fn ready(self) -> Result<Self> {
        self.wait_ready().await?;
        Ok(self)
    }

    async fn wait_ready(&self) -> Result<()> {
        let probe = crate::backends::retry_unavailable(async || {
            match self.stat("conformance-probe").await {
                Err(status) if status.code() == tonic::Code::Unavailable => Err(status),
                _ => Ok(()),
            }
        });
        probe.await
    }

    fn client(&self) -> SnapshotsClient<Channel> {
        self.client.lock().expect("client lock").clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for (key, value) in &self.metadata {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        request
    }

    fn sn(&self) -> String {
        self.snapshotter.clone()
    }

    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let request = self.request(PrepareSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
            parent: parent.into(),
            labels,
        });
        Ok(self.client().prepare(request).await?.into_inner().mounts)
    }

    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let request = self.request(ViewSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
            parent: parent.into(),
            labels,
        });
        Ok(self.client().view(request).await?.into_inner().mounts)
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, tonic::Status> {
        let request = self.request(MountsRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        Ok(self.client().mounts(request).await?.into_inner().mounts)
    }

    pub async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<(), tonic::Status> {
        let request = self.request(CommitSnapshotRequest {
            snapshotter: self.sn(),
            name: name.into(),
            key: key.into(),
            labels,
        });
        self.client().commit(request).await?;
        Ok(())
    }

    pub async fn remove(&self, key: &str) -> Result<(), tonic::Status> {
        let request = self.request(RemoveSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        self.client().remove(request).await?;
        Ok(())
    }

    pub async fn stat(&self, key: &str) -> Result<Info, tonic::Status> {
        let request = self.request(StatSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        let info = self.client().stat(request).await?.into_inner().info;
        info.ok_or_else(|| tonic::Status::internal("Stat answered without info"))
    }

    pub async fn update(&self, info: Info, paths: &[&str]) -> Result<Info, tonic::Status> {
        let request = self.request(UpdateSnapshotRequest {
            snapshotter: self.sn(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        });
        let info = self.client().update(request).await?.into_inner().info;
        info.ok_or_else(|| tonic::Status::internal("Update answered without info"))
    }

    /// Every `Info` the List stream yields.
    pub async fn list(&self, filters: &[&str]) -> Result<Vec<Info>, tonic::Status> {
        let request = self.request(ListSnapshotsRequest {
            snapshotter: self.sn(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        });
        let mut stream = self.client().list(request).await?.into_inner();
        let mut infos = Vec::new();
        while let Some(batch) = stream.message().await? {
            infos.extend(batch.info);
        }
        Ok(infos)
    }

    /// The names List yields for `filters`, restricted to names starting
    /// with `prefix` so that a backend's other snapshots do not count.
    pub async fn list_names(
        &self,
        prefix: &str,
        filters: &[&str],
    ) -> Result<BTreeSet<String>, tonic::Status> {
        Ok(self
            .list(filters)
            .await?
            .into_iter()
            .map(|info| info.name)
            .filter(|name| name.starts_with(prefix))
            .collect())
    }

    pub async fn usage(&self, key: &str) -> Result<UsageResponse, tonic::Status> {
        let request = self.request(UsageRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        Ok(self.client().usage(request).await?.into_inner())
    }

    pub async fn cleanup(&self) -> Result<(), tonic::Status> {
        let request = self.request(CleanupRequest {
            snapshotter: self.sn(),
        });
        self.client().cleanup(request).await?;
        Ok(())
    }
}

impl Drop for Backend {
    /// Nothing a case mounted may outlive it, even after a panic: removing
    /// the scratch dir must not walk into a snapshot.
    fn drop(&mut self) {
        crate::backends::unmount_under(self.scratch.path());
    }
}

/// Connects to a gRPC server on a unix socket.
pub async fn connect_unix(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    // The URI is a placeholder: the connector ignores it.
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

/// Builds a [`Labels`] map from pairs.
pub fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Asserts that `result` failed with one of `codes`.
///
/// For the few requests where containerd answers `Unknown` only because an
/// internal error escapes unmapped (e.g. bolt's "bucket name required" for
/// an empty key), `InvalidArgument` is accepted as the meaningful code.
#[track_caller]
pub fn expect_code_in<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    codes: &[tonic::Code],
    what: &str,
) {
    match result {
        Ok(value) => panic!("{what}: expected one of {codes:?}, got Ok({value:?})"),
        Err(status) => assert!(
            codes.contains(&status.code()),
            "{what}: expected one of {codes:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

/// Asserts that `result` failed with exactly `code`.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got Ok({value:?})"),
        Err(status) => assert_eq!(
            status.code(),
            code,
            "{what}: expected {code:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}
