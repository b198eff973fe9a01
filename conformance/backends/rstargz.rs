//! `rstargz-grpc`, our daemon, spawned with a temporary root and socket.

use std::process::Command;

use anyhow::Result;

use super::Daemon;
use crate::snapshotter::Backend;

pub async fn start() -> Result<Backend> {
    let dir = tempfile::Builder::new()
        .prefix("conformance-rstargz")
        .tempdir()?;
    let socket = dir.path().join("rstargz.sock");
    let root = dir.path().join("root");
    let mut command = Command::new(env!("CARGO_BIN_EXE_rstargz-grpc"));
    command
        .arg("--address")
        .arg(&socket)
        .arg("--root")
        .arg(&root)
        .arg("--log-level")
        .arg("debug");
    let mut daemon = Daemon::spawn(command, dir, "rstargz-grpc")?;
    let channel = daemon.wait_for_socket(&socket).await?;
    // containerd's proxy client forwards the namespace header too.
    Backend::new(channel, "rstargz", Box::new(daemon))?
        .with_metadata("containerd-namespace", "conformance")?
        .with_snapshots_dir(root.join("snapshots"))
        .ready()
        .await
}
