//! Mounting a [`LayerFs`] and taking it down again.
//!
//! `mount` calls mount(2) directly (we run as root; no libfuse, no
//! fusermount) and completes the FUSE handshake before returning, so the
//! mount is usable as soon as it returns. Unmounting tries a plain
//! umount(2) first; if the mount is busy (a container has files open, or
//! overlayfs holds it as a lower dir) it is detached lazily instead and the
//! FUSE threads keep serving until its last user goes away.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};

use fuser::{Config, Filesystem, MountOption, Notifier, Session, SessionACL, SessionUnmounter};
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};

use super::LayerFs;

/// Most FUSE worker threads a mount may have.
const MAX_THREADS: usize = 16;
/// How long a clean unmount waits for the session to end. It does not end
/// while another mount still holds the filesystem: overlayfs keeps private
/// clones of its lower mounts, so umount(2) of ours succeeds but the
/// filesystem lives on until the overlay goes.
const SESSION_END_WAIT: Duration = Duration::from_secs(1);

/// How a layer is mounted.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Mount source shown in `/proc/mounts` (e.g. the layer digest).
    pub fsname: String,
    /// FUSE worker threads, each with its own `/dev/fuse` fd (clamped to
    /// 1..=16). Metadata ops are answered on them; reads only start there.
    pub threads: usize,
    /// Let every user (containers' uids) through; permissions are then
    /// checked by the kernel from the TOC's mode/uid/gid.
    pub allow_other: bool,
    /// Give each worker its own clone of the device fd. Off when the
    /// connection is to be handed over: requests a worker's clone had read
    /// fail with `ECONNABORTED` when that clone closes, whereas requests
    /// read through the shared fd are resent to the next daemon.
    pub clone_fd: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            fsname: "rstargz".into(),
            threads: 4,
            allow_other: true,
            clone_fd: true,
        }
    }
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted and the FUSE session ended.
    Clean,
    /// It was busy: detached (`MNT_DETACH`); the session ends when the last
    /// user lets go.
    Lazy,
    /// Nothing was mounted there.
    NotMounted,
}

/// A mounted layer. Dropping it unmounts (lazily if busy).
#[derive(Debug)]
pub struct MountHandle {
    mountpoint: PathBuf,
    unmounter: Option<Unmounter>,
    session: Option<JoinHandle<io::Result<()>>>,
    /// Set (and notified) when the session thread ends.
    ended: Arc<(Mutex<bool>, Condvar)>,
}

/// Mounts `fs` read-only at `mountpoint`. Blocks for mount(2) and the FUSE
/// handshake; call it from a blocking thread, not a runtime worker.
pub fn mount(
    mountpoint: impl AsRef<Path>,
    fs: LayerFs,
    opts: &MountOptions,
) -> io::Result<MountHandle> {
    start(mountpoint, fs, opts).map(|(h, _)| h)
}

/// How a session's mount is taken down.
#[derive(Debug)]
enum Unmounter {
    /// fuser mounted it.
    Session(SessionUnmounter),
    /// Adopted from a previous daemon: umount(2) by path.
    Path,
}

/// A FUSE session that is mounted (or adopted) and handshaken but not yet
/// serving: nothing answers the kernel until [`Prepared::spawn`].
pub(super) struct Prepared<F: Filesystem> {
    pub(super) session: Session<F>,
    mountpoint: PathBuf,
    unmounter: Unmounter,
}

fn session_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        // Passed to the kernel as is, so the type reads `fuse.rstargz`.
        MountOption::CUSTOM("subtype=rstargz".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.clamp(1, MAX_THREADS));
    config.clone_fd = opts.clone_fd;
    config
}

/// mount(2) and the FUSE handshake. Blocking.
pub(super) fn prepare<F: Filesystem + Send + Sync + 'static>(
    mountpoint: impl AsRef<Path>,
    fs: F,
    opts: &MountOptions,
) -> io::Result<Prepared<F>> {
    let mountpoint = mountpoint.as_ref().to_path_buf();
    let mut session = Session::new(fs, &mountpoint, &session_config(opts))?;
    let unmounter = Unmounter::Session(session.unmount_callable());
    Ok(Prepared {
        session,
        mountpoint,
        unmounter,
    })
}

/// Wraps `session`, already connected to the device of the mount at
/// `mountpoint` (taken over from a previous daemon).
pub(super) fn prepared_adopted<F: Filesystem>(
    session: Session<F>,
    mountpoint: &Path,
) -> Prepared<F> {
    Prepared {
        session,
        mountpoint: mountpoint.to_path_buf(),
        unmounter: Unmounter::Path,
    }
}

pub(super) fn adopted_config(opts: &MountOptions) -> (SessionACL, Config) {
    let c = session_config(opts);
    (c.acl, c)
}

impl<F: Filesystem + Send + Sync + 'static> Prepared<F> {
    pub(super) fn notifier(&self) -> Notifier {
        self.session.notifier()
    }

    /// A duplicate of the session's `/dev/fuse` fd (for the holder).
    pub(super) fn device(&self) -> io::Result<OwnedFd> {
        self.session.as_fd().try_clone_to_owned()
    }

    /// Starts answering the kernel on the session's worker threads.
    pub(super) fn spawn(self) -> io::Result<MountHandle> {
        let Prepared {
            session,
            mountpoint,
            unmounter,
        } = self;
        let ended = Arc::new((Mutex::new(false), Condvar::new()));
        let end = ended.clone();
        let session = std::thread::Builder::new()
            .name("rstargz-fuse".into())
            .spawn(move || {
                let r = session.run();
                let (done, cv) = &*end;
                *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
                r
            })
            // On error the closure, and with it the session, is dropped:
            // that unmounts.
            ?;
        tracing::info!(mountpoint = %mountpoint.display(), "FUSE serving");
        Ok(MountHandle {
            mountpoint,
            unmounter: Some(unmounter),
            session: Some(session),
            ended,
        })
    }
}

/// Mounts any of our filesystems and starts serving; also returns the
/// session's [`Notifier`] (cache invalidations).
pub(super) fn start<F: Filesystem + Send + Sync + 'static>(
    mountpoint: impl AsRef<Path>,
    fs: F,
    opts: &MountOptions,
) -> io::Result<(MountHandle, Notifier)> {
    let prepared = prepare(mountpoint, fs, opts)?;
    let notifier = prepared.notifier();
    Ok((prepared.spawn()?, notifier))
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts; if busy, detaches lazily. `Clean` means the FUSE threads
    /// have finished; `Lazy` that they serve remaining users (open files, an
    /// overlayfs stacked on top) and end with the last of them.
    pub fn unmount(mut self) -> io::Result<Unmounted> {
        self.do_unmount()
    }

    /// Leaves the mount and its session as they are: the process is about
    /// to exit and the connection is parked for the next daemon.
    pub fn abandon(mut self) {
        self.unmounter = None;
        self.session = None;
    }

    fn do_unmount(&mut self) -> io::Result<Unmounted> {
        let Some(unmounter) = self.unmounter.take() else {
            return Ok(Unmounted::NotMounted);
        };
        let done = match unmounter {
            Unmounter::Session(mut u) => u.unmount(),
            Unmounter::Path => {
                umount2(&self.mountpoint, MntFlags::empty()).map_err(io::Error::from)
            }
        };
        match done {
            Ok(()) => self.await_session_end(),
            // Already unmounted from outside (e.g. by [`unmount`]).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.await_session_end(),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                umount2(&self.mountpoint, MntFlags::MNT_DETACH)?;
                // The session thread ends on its own once the last user is gone.
                self.session = None;
                tracing::info!(mountpoint = %self.mountpoint.display(), "layer busy, detached");
                Ok(Unmounted::Lazy)
            }
            Err(e) => Err(e),
        }
    }

    fn await_session_end(&mut self) -> io::Result<Unmounted> {
        let (done, cv) = &*self.ended;
        let guard = done.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, SESSION_END_WAIT, |ended| !*ended)
            .unwrap_or_else(|p| p.into_inner());
        let ended = *guard;
        drop(guard);
        if !ended {
            self.session = None;
            tracing::info!(
                mountpoint = %self.mountpoint.display(),
                "layer unmounted, still in use by another mount"
            );
            return Ok(Unmounted::Lazy);
        }
        if let Some(s) = self.session.take() {
            match s.join() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("FUSE session thread panicked")),
            }
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), "layer unmounted");
        Ok(Unmounted::Clean)
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
        }
    }
}

/// Unmounts whatever is mounted at `path` (a FUSE mount left behind by a
/// crashed daemon, whose accesses fail with `ENOTCONN`), lazily if busy. The
/// caller is responsible for `path` being one of ours.
pub fn unmount(path: impl AsRef<Path>) -> io::Result<Unmounted> {
    let path = path.as_ref();
    match umount2(path, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(Errno::EBUSY) => {
            umount2(path, MntFlags::MNT_DETACH)?;
            Ok(Unmounted::Lazy)
        }
        Err(Errno::EINVAL) => Ok(Unmounted::NotMounted),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handle_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::MountHandle>();
    }
}
