//! containerd's own overlayfs snapshotter as the reference backend.
//!
//! A private containerd (its own root, state, sockets; the CRI plugin off)
//! is started per backend; requests go to its snapshots service with
//! snapshotter `overlayfs` in a fresh namespace. What answers is therefore
//! containerd's metadata layer (namespaces, labels, GC) wrapping the
//! overlayfs snapshotter, exactly what containerd's clients see.

use std::process::Command;

use anyhow::Result;

use tonic::transport::Channel;

use super::{Daemon, retry_unavailable, unique};
use crate::snapshotter::Backend;

/// Plugins that would touch the host, need hardware or are irrelevant.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

pub async fn start() -> Result<Backend> {
    let dir = tempfile::Builder::new()
        .prefix("conformance-containerd")
        .tempdir()?;
    let path = dir.path();
    let socket = path.join("containerd.sock");
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
    // GC runs as soon as anything is deleted, so that removed snapshots'
    // directories go away promptly (containerd's default waits for 100
    // mutations).
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0s"
  startup_delay = "0s"
"#,
        root = path.join("root").display(),
        state = path.join("state").display(),
        disabled = disabled.join(", "),
        socket = socket.display(),
    );
    let config_path = path.join("config.toml");
    std::fs::write(&config_path, config)?;
    let snapshots = path.join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let mut daemon = Daemon::new(
        dir,
        "containerd",
        socket,
        Box::new(move || {
            let mut command = Command::new("containerd");
            command.arg("--config").arg(&config_path);
            command
        }),
    );
    let channel = daemon.start().await?;
    let namespace = unique("conformance");
    let lease = retry_unavailable(async || create_lease(channel.clone(), &namespace).await).await?;
    Backend::new(channel, "overlayfs", daemon)?
        .with_metadata("containerd-namespace", &namespace)?
        .with_metadata("containerd-lease", &lease)?
        .with_snapshots_dir(snapshots)
        .without_cleanup()
        .ready()
        .await
}

/// `containerd.services.leases.v1.CreateRequest`, the fields we use.
#[derive(Clone, PartialEq, prost::Message)]
struct CreateLeaseRequest {
    #[prost(string, tag = "1")]
    id: String,
}

/// `containerd.services.leases.v1.CreateResponse` with `Lease.id` only.
#[derive(Clone, PartialEq, prost::Message)]
struct CreateLeaseResponse {
    #[prost(message, optional, tag = "1")]
    lease: Option<Lease>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Lease {
    #[prost(string, tag = "1")]
    id: String,
}

/// Creates a lease without expiry in `namespace`.
///
/// containerd's garbage collector deletes every snapshot nothing refers
/// to; its clients hold a lease while they work with snapshots, and so do
/// we: every request carries `containerd-lease`, so every snapshot made is
/// kept until removed.
async fn create_lease(channel: Channel, namespace: &str) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let mut request = tonic::Request::new(CreateLeaseRequest {
        id: unique("conformance-lease"),
    });
    let namespace = namespace
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("namespace is not ASCII"))?;
    request
        .metadata_mut()
        .insert("containerd-namespace", namespace);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/containerd.services.leases.v1.Leases/Create",
    );
    let codec = tonic_prost::ProstCodec::<CreateLeaseRequest, CreateLeaseResponse>::default();
    let response = grpc.unary(request, path, codec).await?.into_inner();
    response
        .lease
        .map(|lease| lease.id)
        .ok_or_else(|| tonic::Status::internal("Create answered without a lease"))
}
