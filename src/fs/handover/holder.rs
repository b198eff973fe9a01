//! The holder process: keeps the daemon's `/dev/fuse` fd open while no
//! daemon is running, so the kernel's FUSE connection (and every mount and
//! overlay stacked on it) outlives a crash, a restart or an upgrade.
//!
//! It never reads from the device: requests made meanwhile wait in the
//! kernel for the next daemon. Single-threaded and small on purpose: it
//! must not die with the daemon's bugs.
//!
//! Its life:
//! - the daemon that mounted the filesystem spawns it and parks the fd;
//!   that daemon's connection is the *owner*;
//! - while an owner is connected it only waits;
//! - when the owner's connection closes (clean stop, crash) it keeps the
//!   fd for `grace`; a new daemon that takes the fd becomes the owner;
//! - it exits, closing the fd (the kernel then aborts the connection:
//!   pending reads fail with `ENOTCONN` instead of hanging), when the grace
//!   runs out, when the connection is gone anyway (all mounts removed), or
//!   on `Release` from a daemon that unmounted everything itself.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::HandoverError;
use super::KernelInit;
use super::wire::{self, Reply, Request};

/// How often the holder looks at the kept device while no owner is there.
const TICK: Duration = Duration::from_millis(500);
/// A holder that was spawned but never given an fd gives up after this.
const UNUSED_LIMIT: Duration = Duration::from_secs(30);

struct Kept {
    device: OwnedFd,
    init: KernelInit,
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderExit {
    /// A daemon asked for it.
    Released,
    /// No daemon took the fd within the grace period.
    GraceExpired,
    /// The FUSE connection ended (every mount of it removed).
    ConnectionGone,
    /// Nothing was ever parked.
    Unused,
}

/// Whether the kernel has ended the FUSE connection behind `device`.
/// `poll` reports `POLLERR` then; `POLLIN` (requests waiting) is expected
/// while no daemon runs and says nothing.
fn connection_gone(device: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(device.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// Serves the holder socket at `socket` until one of [`HolderExit`]'s
/// conditions. Blocking; meant to be the whole life of a small process.
pub fn run(socket: &Path, grace: Duration) -> Result<HolderExit, HandoverError> {
    use std::os::unix::fs::MetadataExt;
    let listener = wire::listen_at(socket)?;
    let ours = std::fs::metadata(socket).map(|m| m.ino()).ok();
    let result = serve(&listener, grace);
    // Only remove the socket file if it is still ours (a newer holder may
    // have replaced it).
    if ours.is_some() && std::fs::metadata(socket).map(|m| m.ino()).ok() == ours {
        let _ = std::fs::remove_file(socket);
    }
    result
}

fn serve(listener: &OwnedFd, grace: Duration) -> Result<HolderExit, HandoverError> {
    let started = Instant::now();
    let mut kept: Option<Kept> = None;
    let mut owner: Option<OwnedFd> = None;
    // Set while there is no owner: when the kept fd goes.
    let mut deadline: Option<Instant> = None;
    loop {
        if owner.is_none() {
            match &kept {
                Some(k) if connection_gone(&k.device) => return Ok(HolderExit::ConnectionGone),
                Some(_) => {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + grace);
                    if Instant::now() >= d {
                        tracing::warn!(
                            grace_secs = grace.as_secs(),
                            "no daemon took the FUSE connection over; closing it"
                        );
                        return Ok(HolderExit::GraceExpired);
                    }
                }
                None if started.elapsed() >= UNUSED_LIMIT => return Ok(HolderExit::Unused),
                None => {}
            }
        }
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Some(o) = &owner {
            fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
        }
        let timeout = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                return Err(HandoverError::Socket {
                    what: "poll",
                    source: e.into(),
                });
            }
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let listener_ready = ready(&fds[0]);
        let owner_ready = fds.get(1).is_some_and(ready);
        drop(fds);
        if owner_ready {
            let conn = owner.take().expect("polled owner");
            match handle(&conn, &mut kept) {
                Step::Keep => owner = Some(conn),
                Step::Drop => {
                    tracing::info!("daemon disconnected; keeping the FUSE connection");
                    deadline = None;
                }
                Step::Exit(why) => return Ok(why),
            }
        }
        if listener_ready {
            let conn = match wire::accept(listener.as_fd()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            match handle(&conn, &mut kept) {
                Step::Keep => {
                    // A daemon that parked or took the fd owns it now; a
                    // previous owner still connected is superseded.
                    owner = Some(conn);
                    deadline = None;
                }
                Step::Drop => {}
                Step::Exit(why) => return Ok(why),
            }
        }
    }
}

enum Step {
    /// The connection is the owner from now on.
    Keep,
    Drop,
    Exit(HolderExit),
}

fn handle(conn: &OwnedFd, kept: &mut Option<Kept>) -> Step {
    let (req, fd) = match wire::recv::<Request>(conn.as_fd()) {
        Ok(Some(m)) => m,
        Ok(None) => return Step::Drop,
        Err(e) => {
            tracing::warn!(error = %e, "bad request on the holder socket");
            let _ = wire::send(
                conn.as_fd(),
                &Reply::Error {
                    message: e.to_string(),
                },
                None,
            );
            return Step::Drop;
        }
    };
    let answer = |r: &Reply, fd| {
        if let Err(e) = wire::send(conn.as_fd(), r, fd) {
            tracing::warn!(error = %e, "replying on the holder socket failed");
        }
    };
    match (req, fd) {
        (Request::Park { init }, Some(device)) => {
            tracing::info!(fd = device.as_raw_fd(), "FUSE connection parked");
            *kept = Some(Kept { device, init });
            answer(&Reply::Ok, None);
            Step::Keep
        }
        (Request::Park { .. }, None) => {
            answer(
                &Reply::Error {
                    message: "park without a descriptor".into(),
                },
                None,
            );
            Step::Drop
        }
        (Request::Take, _) => match kept {
            Some(k) => {
                answer(
                    &Reply::Device {
                        init: k.init.clone(),
                    },
                    Some(k.device.as_fd()),
                );
                tracing::info!("FUSE connection handed to a new daemon");
                Step::Keep
            }
            None => {
                answer(&Reply::Empty, None);
                Step::Drop
            }
        },
        (Request::Release, _) => {
            answer(&Reply::Ok, None);
            Step::Exit(HolderExit::Released)
        }
    }
}
