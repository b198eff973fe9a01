//! Backends the suites run against: each starts a private daemon in a
//! temporary directory and hands back a connected client.
//!
//! - [`Daemon`]: a child process plus its directory; dropping it stops the
//!   process, unmounts whatever is left under the directory and removes it.
//! - [`containerd`]: containerd's own overlayfs snapshotter (the reference).
//! - [`rstargz`]: our `rstargz-grpc`.

pub mod containerd;
pub mod rstargz;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, umount2};
pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use tonic::transport::Channel;

/// How to start a daemon; called again for a restart.
pub type CommandFn = Box<dyn Fn() -> Command + Send + Sync>;

/// A daemon, its socket and the directory it owns; it can be restarted
/// on the same directory.
pub struct Daemon {
    command: CommandFn,
    socket: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Daemon {
    /// A daemon that will run `command()` with stdout and stderr appended
    /// to `<dir>/<name>.log` and serve on `socket`.
    pub fn new(dir: tempfile::TempDir, name: &str, socket: PathBuf, command: CommandFn) -> Self {
        let log = dir.path().join(format!("{name}.log"));
        Self {
            command,
            socket,
            child: None,
            dir,
            log,
        }
    }

    /// The last lines the daemon printed, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Spawns the daemon and waits until it accepts connections.
    pub async fn start(&mut self) -> Result<Channel> {
        let out = File::options().create(true).append(true).open(&self.log)?;
        let mut command = (self.command)();
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = command
            .spawn()
            .with_context(|| format!("spawn {command:?}"))?;
        self.child = Some(child);
        self.wait_for_socket().await
    }

    async fn wait_for_socket(&mut self) -> Result<Channel> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                bail!(
                    "daemon exited with {status} before serving:\n{}",
                    self.log_tail()
                );
            }
            if self.socket.exists() {
                match crate::snapshotter::connect_unix(&self.socket).await {
                    Ok(channel) => return Ok(channel),
                    Err(err) if Instant::now() > deadline => return Err(err),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no socket at {} after {STARTUP:?}:\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` and waits for the exit, without blocking the runtime
    /// (clients on it stay responsive). Returns how long the exit took;
    /// after [`STOP`] the daemon is killed and that is an error.
    pub async fn stop(&mut self, signal: Signal) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        kill(Pid::from_raw(child.id() as i32), signal)?;
        while child.try_wait()?.is_none() {
            if started.elapsed() > STOP {
                child.kill()?;
                child.wait()?;
                bail!(
                    "still running {STOP:?} after {signal}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(started.elapsed())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP;
            while matches!(child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        unmount_under(self.dir.path());
    }
}

/// How long a daemon may take to exit after SIGTERM.
pub const STOP: Duration = Duration::from_secs(5);

/// How long a daemon may take to serve.
pub const STARTUP: Duration = Duration::from_secs(20);

/// Retries `call` while the server answers Unavailable: it may listen
/// before its services are registered.
pub async fn retry_unavailable<T>(
    mut call: impl AsyncFnMut() -> Result<T, tonic::Status>,
) -> Result<T> {
    let deadline = Instant::now() + STARTUP;
    loop {
        match call().await {
            Err(status)
                if status.code() == tonic::Code::Unavailable && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            result => return Ok(result?),
        }
    }
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for point in points {
        let _ = umount2(&point, MntFlags::MNT_DETACH);
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A name no other run on this machine uses at the same time.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
