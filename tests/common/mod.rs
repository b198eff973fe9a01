//! Starts the real `rstargz-grpc` binary on a temporary socket and root.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rstargz::proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `dir/root` and `dir/run/s.sock`, and waits
    /// until it accepts connections.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with_env(dir, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(dir: &Path, env: &[(&str, &Path)]) -> Daemon {
        Daemon::start_binary(dir, env, Path::new(env!("CARGO_BIN_EXE_rstargz-grpc")))
    }

    /// Like [`Daemon::start_with_env`] with another build of the daemon
    /// (benchmarks comparing against an older binary).
    pub fn start_binary(dir: &Path, env: &[(&str, &Path)], bin: &Path) -> Daemon {
        let root = dir.join("root");
        let socket = dir.join("run/s.sock");
        let log = dir.join("daemon.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin)
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .arg("--log-level")
            .arg("debug")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        if !dir.join("config.toml").exists() {
            panic!("write {}/config.toml before starting", dir.display());
        }
        let mut d = Daemon {
            child,
            socket,
            root,
            log,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("daemon exited with {st}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not listen: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> SnapshotsClient<Channel> {
        rstargz::snapshotter::client::connect(&self.socket)
            .await
            .unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap().success()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A temporary directory with an empty config file.
pub fn workdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.toml"), "").unwrap();
    d
}
