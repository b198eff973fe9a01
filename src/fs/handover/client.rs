//! The daemon's side of the holder: take a parked connection over at
//! start, park a fresh one (spawning the holder), release it on a stop that
//! unmounts.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::wire::{self, Reply, Request};
use super::{HandoverError, KernelInit};

/// How long a freshly spawned holder may take to listen.
const SPAWN_WAIT: Duration = Duration::from_secs(5);

/// Tells the holder listening on `socket`, if any, to close its connection
/// and exit (what [`Handover::release`] does, for tools and test harnesses
/// that clean up after a daemon). Blocking.
pub fn release(socket: &Path) -> Result<(), HandoverError> {
    let Some(conn) = wire::connect_to(socket)? else {
        return Ok(());
    };
    wire::send(conn.as_fd(), &Request::Release, None)?;
    match wire::recv::<Reply>(conn.as_fd())? {
        Some((Reply::Ok, _)) | None => Ok(()),
        Some((other, _)) => Err(HandoverError::Protocol(format!(
            "unexpected answer to release: {other:?}"
        ))),
    }
}

/// How to start a holder process.
#[derive(Debug, Clone)]
pub struct HolderCommand {
    /// The executable (`rstargz-grpc` itself).
    pub program: PathBuf,
    /// Arguments before the socket path, e.g. `["--fuse-holder"]`.
    pub args: Vec<String>,
    /// How long the holder keeps a connection nobody took over.
    pub grace: Duration,
    /// Where the holder writes its log.
    pub log: PathBuf,
}

/// The daemon's link to its holder. The connection stays open for the
/// daemon's life: its closing is how the holder learns the daemon is gone.
#[derive(Debug)]
pub struct Handover {
    socket: PathBuf,
    command: HolderCommand,
    conn: Mutex<Option<OwnedFd>>,
    /// What this daemon serves (a duplicate of the device fd), to park
    /// again with a new holder if the current one dies.
    serving: Mutex<Option<(OwnedFd, KernelInit)>>,
    watching: AtomicBool,
    /// Set by [`Handover::release`]: the holder's exit is expected.
    releasing: AtomicBool,
}

impl Handover {
    pub fn new(socket: PathBuf, command: HolderCommand) -> Self {
        Handover {
            socket,
            command,
            conn: Mutex::new(None),
            serving: Mutex::new(None),
            watching: AtomicBool::new(false),
            releasing: AtomicBool::new(false),
        }
    }

    /// Keeps a holder for as long as this daemon lives: if the holder dies
    /// (killed, OOM), a new one is started and the connection parked with
    /// it again, so a later crash of the daemon still loses nothing. Runs on
    /// a thread of its own; returns at once.
    pub fn watch(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("rstargz-holder-watch".into())
            .spawn(move || {
                loop {
                    let Some(h) = me.upgrade() else { return };
                    let conn = h.lock().as_ref().and_then(|c| c.try_clone().ok());
                    drop(h);
                    if let Some(conn) = conn {
                        // The holder never speaks unprompted: readable
                        // means it closed the connection.
                        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
                        if matches!(poll(&mut fds, PollTimeout::NONE), Err(nix::Error::EINTR)) {
                            continue;
                        }
                    } else {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    let Some(h) = me.upgrade() else { return };
                    if h.releasing.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Err(e) = h.repark() {
                        tracing::warn!(error = %e, "FUSE holder lost and not replaced; retrying");
                        std::thread::sleep(Duration::from_secs(5));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch the FUSE holder");
        }
    }

    fn repark(&self) -> Result<(), HandoverError> {
        let parts = {
            let s = self.serving.lock().unwrap_or_else(|p| p.into_inner());
            match &*s {
                Some((fd, init)) => Some((
                    fd.try_clone().map_err(|source| HandoverError::Socket {
                        what: "dup",
                        source,
                    })?,
                    init.clone(),
                )),
                None => None,
            }
        };
        let Some((device, init)) = parts else {
            return Ok(());
        };
        tracing::warn!("the FUSE holder went away; parking the connection with a new one");
        self.park(device.as_fd(), &init)
    }

    fn remember(&self, device: BorrowedFd<'_>, init: &KernelInit) {
        if let Ok(dup) = device.try_clone_to_owned() {
            *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some((dup, init.clone()));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn request(
        &self,
        conn: BorrowedFd<'_>,
        req: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Reply, Option<OwnedFd>), HandoverError> {
        wire::send(conn, req, fd)?;
        match wire::recv::<Reply>(conn)? {
            Some((Reply::Error { message }, _)) => Err(HandoverError::Refused(message)),
            Some(r) => Ok(r),
            None => Err(HandoverError::Protocol(
                "holder closed the connection".into(),
            )),
        }
    }

    /// The connection a previous daemon left, if a holder keeps one. This
    /// daemon becomes the holder's owner. Blocking.
    pub fn take(&self) -> Result<Option<(OwnedFd, KernelInit)>, HandoverError> {
        let Some(conn) = wire::connect_to(&self.socket)? else {
            return Ok(None);
        };
        let taken = match self.request(conn.as_fd(), &Request::Take, None)? {
            (Reply::Device { init }, Some(fd)) => Some((fd, init)),
            (Reply::Device { .. }, None) => {
                return Err(HandoverError::Protocol(
                    "holder answered without a descriptor".into(),
                ));
            }
            (Reply::Empty, _) => None,
            (other, _) => {
                return Err(HandoverError::Protocol(format!(
                    "unexpected answer to take: {other:?}"
                )));
            }
        };
        if let Some((fd, init)) = &taken {
            self.remember(fd.as_fd(), init);
            *self.lock() = Some(conn);
        }
        Ok(taken)
    }

    /// Parks `device` with the holder (spawned if none listens) so that it
    /// survives this process. Blocking.
    pub fn park(&self, device: BorrowedFd<'_>, init: &KernelInit) -> Result<(), HandoverError> {
        let conn = match wire::connect_to(&self.socket)? {
            Some(c) => c,
            None => self.spawn()?,
        };
        let req = Request::Park { init: init.clone() };
        match self.request(conn.as_fd(), &req, Some(device))? {
            (Reply::Ok, _) => {
                self.remember(device, init);
                *self.lock() = Some(conn);
                Ok(())
            }
            (other, _) => Err(HandoverError::Protocol(format!(
                "unexpected answer to park: {other:?}"
            ))),
        }
    }

    /// Tells the holder to close the connection and exit: this daemon has
    /// unmounted everything. Nothing to do if no holder runs. Blocking.
    pub fn release(&self) -> Result<(), HandoverError> {
        self.releasing.store(true, Ordering::SeqCst);
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let conn = match self.lock().take() {
            Some(c) => c,
            None => match wire::connect_to(&self.socket)? {
                Some(c) => c,
                None => return Ok(()),
            },
        };
        self.request(conn.as_fd(), &Request::Release, None)
            .map(|_| ())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a holder in its own process group (a Ctrl-C meant for the
    /// daemon does not reach it) and waits until it listens.
    fn spawn(&self) -> Result<OwnedFd, HandoverError> {
        use std::os::unix::process::CommandExt;
        let c = &self.command;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .map_err(|source| HandoverError::Spawn {
                program: c.program.clone(),
                source,
            })?;
        let mut child = Command::new(&c.program)
            .args(&c.args)
            .arg(&self.socket)
            .arg("--fuse-holder-grace-secs")
            .arg(c.grace.as_secs().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| HandoverError::Spawn {
                program: c.program.clone(),
                source,
            })?;
        let pid = child.id();
        // Reap it whenever it exits while we live; after we die init does.
        let _ = std::thread::Builder::new()
            .name("rstargz-holder-reaper".into())
            .spawn(move || {
                let status = child.wait();
                tracing::info!(pid, ?status, "FUSE holder exited");
            });
        let until = Instant::now() + SPAWN_WAIT;
        loop {
            if let Some(conn) = wire::connect_to(&self.socket)? {
                tracing::info!(pid, socket = %self.socket.display(), "FUSE holder started");
                return Ok(conn);
            }
            if Instant::now() >= until {
                return Err(HandoverError::HolderNotListening(self.socket.clone()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
