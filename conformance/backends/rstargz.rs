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
    let mut daemon = Daemon::new(
        dir,
        "rstargz-grpc",
        socket.clone(),
        Box::new({
            let root = root.clone();
            move || {
                let mut command = Command::new(env!("CARGO_BIN_EXE_rstargz-grpc"));
                command
                    .arg("--address")
                    .arg(&socket)
                    .arg("--root")
                    .arg(&root)
                    .arg("--log-level")
                    .arg("debug");
                command
            }
        }),
    );
    let channel = daemon.start().await?;
    // containerd's proxy client forwards the namespace header too.
    Backend::new(channel, "rstargz", daemon)?
        .with_metadata("containerd-namespace", "conformance")?
        .with_snapshots_dir(root.join("snapshots"))
        .ready()
        .await
}
