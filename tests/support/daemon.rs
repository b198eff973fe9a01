//! Our snapshotter daemon, `rstargz-grpc`, on its own socket and root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::proc::{self, Server};
use super::temp_dir;

pub struct Daemon {
    /// The gRPC socket (`[proxy_plugins.stargz] address`).
    pub address: PathBuf,
    pub root: PathBuf,
    config: Option<PathBuf>,
    server: Option<Server>,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `rstargz-grpc` with no config file.
    pub fn start() -> Daemon {
        Self::start_with_config(None)
    }

    /// Starts `rstargz-grpc`, with `config` (TOML text) written to a file
    /// and passed as `--config` when given.
    pub fn start_with_config(config: Option<&str>) -> Daemon {
        let dir = temp_dir("daemon");
        let address = dir.path().join("rstargz.sock");
        let root = dir.path().join("root");
        let config = config.map(|c| {
            let p = dir.path().join("config.toml");
            std::fs::write(&p, c).expect("write daemon config");
            p
        });
        let mut d = Daemon {
            address,
            root,
            config,
            server: None,
            dir,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rstargz-grpc"));
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--root")
            .arg(&self.root)
            .args(["--log-level", "debug"]);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let log = self.dir.path().join("rstargz.log");
        self.server = Some(Server::spawn_listening(
            "rstargz-grpc",
            &mut cmd,
            &log,
            &self.address,
        ));
    }

    /// Stops the daemon with SIGTERM (SIGKILL with `kill`), then starts it
    /// again on the same socket, root and config.
    pub fn restart(&mut self, kill: bool) {
        if let Some(mut s) = self.server.take() {
            if kill {
                proc::signal(s.pid(), libc::SIGKILL);
            }
            s.stop(Duration::from_secs(10));
        }
        self.spawn();
    }

    /// Stops the daemon (SIGTERM), runs `between` (e.g. emptying its
    /// cache), then starts it again on the same socket, root and config.
    pub fn restart_with(&mut self, between: impl FnOnce(&Daemon)) {
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(10));
        }
        between(self);
        self.spawn();
    }

    /// The holder's socket (`<root>/fuse-holder.sock`).
    pub fn holder_socket(&self) -> PathBuf {
        self.root.join("fuse-holder.sock")
    }

    /// Pid of the FUSE holder process serving this daemon's root, if one
    /// runs.
    pub fn holder_pid(&self) -> Option<u32> {
        let sock = self.holder_socket();
        let want = sock.to_string_lossy();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_holder =
                args.iter().any(|a| a == "--fuse-holder") && args.iter().any(|a| *a == want);
            is_holder.then_some(pid)
        })
    }

    /// Makes the holder (if any) close the FUSE connection and exit.
    pub fn release_holder(&self) {
        if let Err(e) = rstargz::fs::handover::release(&self.holder_socket()) {
            eprintln!("daemon guard: releasing the FUSE holder: {e}");
        }
    }

    /// Kills the daemon with SIGKILL and leaves it dead (its holder keeps
    /// the FUSE connection); [`Daemon::start_again`] brings it back.
    pub fn kill9(&mut self) {
        if let Some(mut s) = self.server.take() {
            proc::signal(s.pid(), libc::SIGKILL);
            s.stop(Duration::from_secs(10));
        }
    }

    /// Stops the daemon with SIGTERM and leaves it stopped.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(10));
        }
    }

    /// Starts the daemon again after [`Daemon::kill9`] or [`Daemon::stop`].
    pub fn start_again(&mut self) {
        assert!(self.server.is_none(), "daemon still running");
        self.spawn();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.server.as_ref().expect("daemon running").pid()
    }

    pub fn log_tail(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.log_tail(8000))
            .unwrap_or_default()
    }

    /// Entries left under `<root>/snapshots/` (snapshot directories on disk).
    pub fn snapshot_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("snapshots"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `rstargz status --json` through the daemon's metrics socket.
    pub fn status_json(&self) -> serde_json::Value {
        let sock = self
            .address
            .parent()
            .expect("socket dir")
            .join("rstargz-metrics.sock");
        let o = super::run_ok(
            Command::new(env!("CARGO_BIN_EXE_rstargz"))
                .arg("status")
                .arg("--address")
                .arg(&sock)
                .arg("--json"),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("rstargz status: {e}\nlog:\n{}", self.log_tail()));
        serde_json::from_str(&o.stdout).expect("status JSON")
    }

    /// Mount points below the daemon's temp dir (root and sockets), but
    /// the daemon's own FUSE mount `<root>/fuse` that serves every layer.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let own = self.root.join("fuse");
        proc::mounts_under(self.dir.path())
            .into_iter()
            .filter(|p| *p != own)
            .collect()
    }

    /// The daemon's whole log so far.
    pub fn log(&self) -> String {
        self.server
            .as_ref()
            .map(|s| {
                String::from_utf8_lossy(&std::fs::read(&s.log).unwrap_or_default()).into_owned()
            })
            .unwrap_or_default()
    }

    /// Keys of every snapshot the daemon holds, asked over its own socket
    /// (`ctr snapshots ls` speaks the snapshots API directly to it).
    pub fn snapshot_keys(&self) -> Vec<String> {
        let o = super::run_ok(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .args(["snapshots", "--snapshotter", "stargz", "ls"]),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| {
            panic!(
                "listing the daemon's snapshots: {e}\nlog:\n{}",
                self.log_tail()
            )
        });
        o.stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    }

    /// Asserts the daemon holds no snapshot: none in its API, no snapshot
    /// directory on disk, no mount under its directory.
    pub fn assert_empty(&self) {
        let keys = self.snapshot_keys();
        assert!(keys.is_empty(), "daemon still holds snapshots: {keys:?}");
        let dirs = self.snapshot_dirs();
        assert!(
            dirs.is_empty(),
            "snapshot directories left on disk: {dirs:?}"
        );
        let mounts = self.mounts();
        assert!(
            mounts.is_empty(),
            "mounts left under the daemon's root: {mounts:?}"
        );
    }

    /// Panics with the daemon's log if it died.
    pub fn assert_alive(&mut self) {
        if let Some(s) = self.server.as_mut() {
            s.assert_alive();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first. With the FUSE hand-over on (the default) the daemon
        // leaves its mounts to the holder process for a successor; there
        // is none, so the holder is told to let go, and the mounts go.
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(10));
        }
        self.release_holder();
        let d = self.dir.path().to_path_buf();
        let left = proc::unmount_all_under(&d);
        if !left.is_empty() {
            eprintln!("daemon guard: unmounted {left:?} after rstargz-grpc stopped");
        }
        if let Err(e) = std::fs::remove_dir_all(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("daemon guard: cannot remove {}: {e}", d.display());
        }
    }
}
