//! Records the files opened on one overlayfs instance with fanotify.
//!
//! The mark is `FAN_MARK_FILESYSTEM`: it covers every mount of that
//! filesystem, including runc's bind mount of the rootfs inside the
//! container's mount namespace (a `FAN_MARK_MOUNT` on our mount point would
//! miss it). Events carry an open fd of the file; its path is read from
//! `/proc/self/fd`. Through a mount in another namespace the kernel gives
//! the path from that mount's root, which is the container's `/`; through
//! our own mount point it is prefixed with the merged directory, which is
//! stripped.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use super::error::{OptimizeError, Result};

/// Most distinct paths kept; a workload opening more is cut off there (the
/// first ones are the ones that matter for start-up).
pub const MAX_RECORDED: usize = 200_000;

pub struct Recorder {
    fan: Fanotify,
    merged: PathBuf,
    seen: std::collections::HashSet<String>,
    /// Paths in first-open order, relative to the image root.
    pub paths: Vec<String>,
    /// The kernel dropped events (queue overflow).
    pub overflowed: bool,
}

impl Recorder {
    /// Starts recording opens on the filesystem mounted at `merged`.
    pub fn start(merged: &Path) -> Result<Recorder> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| OptimizeError::Fanotify(format!("fanotify_init: {e} (needs root)")))?;
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            MaskFlags::FAN_OPEN | MaskFlags::FAN_OPEN_EXEC,
            nix::fcntl::AT_FDCWD,
            Some(merged),
        )
        .map_err(|e| OptimizeError::Fanotify(format!("marking {}: {e}", merged.display())))?;
        Ok(Recorder {
            fan,
            merged: merged.to_owned(),
            seen: Default::default(),
            paths: Vec::new(),
            overflowed: false,
        })
    }

    /// Reads every queued event without blocking.
    pub fn drain(&mut self) -> Result<()> {
        loop {
            let events = match self.fan.read_events() {
                Ok(ev) => ev,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(OptimizeError::Fanotify(format!("read: {e}"))),
            };
            if events.is_empty() {
                return Ok(());
            }
            for ev in events {
                if ev.mask().contains(MaskFlags::FAN_Q_OVERFLOW) {
                    self.overflowed = true;
                }
                let Some(fd) = ev.fd() else { continue };
                let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
                let Ok(target) = std::fs::read_link(&link) else {
                    continue;
                };
                if let Some(rel) = self.relative(&target) {
                    self.push(rel);
                }
            }
        }
    }

    fn relative(&self, target: &Path) -> Option<String> {
        let s = target.to_str()?;
        if !s.starts_with('/') || s.ends_with(" (deleted)") {
            return None;
        }
        let p = target.strip_prefix(&self.merged).unwrap_or(target);
        let rel = super::layers::normalize(p.to_str()?);
        (!rel.is_empty()).then_some(rel)
    }

    fn push(&mut self, rel: String) {
        if self.paths.len() < MAX_RECORDED && self.seen.insert(rel.clone()) {
            self.paths.push(rel);
        }
    }

    /// The raw fanotify fd, for polling.
    pub fn fd(&self) -> i32 {
        self.fan.as_raw_fd()
    }
}
