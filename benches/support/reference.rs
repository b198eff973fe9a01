//! The Go reference snapshotter (`containerd-stargz-grpc`, built by
//! scripts/reference-snapshotter.sh) as a snapshotter under test: started by
//! the bench on its own socket, root and config, and restarted on an empty
//! root before every sample so each one is cold.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::proc::{self, Server};
use crate::support::temp_dir;

pub struct Reference {
    binary: PathBuf,
    /// The gRPC socket containerd's proxy plugin dials.
    pub address: PathBuf,
    root: PathBuf,
    config: PathBuf,
    server: Option<Server>,
    dir: tempfile::TempDir,
}

/// The reference's config. Plain HTTP to the relay needs no entry: the
/// registry host is a loopback address, which it always reaches over HTTP.
/// Background fetching follows the bench's `--background-fetch`, as for
/// `rstargz-grpc`, so "bytes fetched" means the same for both.
fn config(background_fetch: bool) -> String {
    format!("no_background_fetch = {}\n", !background_fetch)
}

impl Reference {
    pub fn start(binary: &Path, background_fetch: bool) -> Reference {
        let dir = temp_dir("refsnap");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config(background_fetch)).expect("write reference config");
        let mut r = Reference {
            binary: binary.to_path_buf(),
            address: dir.path().join("stargz.sock"),
            root: dir.path().join("root"),
            config: config_path,
            server: None,
            dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-address")
            .arg(&self.address)
            .arg("-root")
            .arg(&self.root)
            .arg("-config")
            .arg(&self.config)
            .args(["-log-level", "info"]);
        let log = self.dir.path().join("containerd-stargz-grpc.log");
        let server =
            Server::spawn_listening("containerd-stargz-grpc", &mut cmd, &log, &self.address);
        self.server = Some(server);
    }

    /// Stops it (its Close unmounts the FUSE layers), unmounts whatever is
    /// left, deletes its whole root (snapshots, fetched chunks, metadata)
    /// and starts it again.
    pub fn restart_cold(&mut self) {
        self.stop();
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root)
                .unwrap_or_else(|e| panic!("remove {}: {e}", self.root.display()));
        }
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(10));
        }
        proc::unmount_all_under(&self.root);
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        self.stop();
    }
}
