//! Keeping the FUSE connection alive across daemon restarts.
//!
//! All layers are served through one FUSE connection (`<root>/fuse`,
//! [`crate::fs::fuse::MuxMount`]). The kernel keeps a connection, with its
//! mounts, the overlays of running containers on top, and every request
//! they make, for as long as some process has its `/dev/fuse` fd open. So
//! the daemon parks a duplicate of that fd with a tiny *holder* process
//! ([`holder`]), and a restarted (or upgraded) daemon takes it back
//! ([`client::Handover::take`]), answers the kernel as if nothing had
//! happened — inode numbers are stable (slots and TOC-derived node
//! numbers) and file handles carry no state — and asks the kernel to
//! resend the requests the dead process had read but not answered
//! (`FUSE_NOTIFY_RESEND`, see [`crate::fs::fuse::MuxMount::adopt`]).
//! docs/restart.md has the whole story.

mod client;
pub mod holder;
mod wire;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use client::{Handover, HolderCommand, release};
pub use holder::HolderExit;

/// What the kernel offered in its `FUSE_INIT`, recorded by the daemon that
/// mounted, so that a successor can replay the handshake to its FUSE
/// library (the kernel sends `FUSE_INIT` only once per connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInit {
    pub major: u32,
    pub minor: u32,
    /// Capability flags, both 32-bit halves.
    pub flags: u64,
    pub max_readahead: u32,
    /// How the parking daemon numbered inodes
    /// ([`crate::fs::fuse::INODE_LAYOUT`]); a daemon numbering them
    /// differently must not take the connection over.
    #[serde(default)]
    pub inode_layout: u32,
}

/// Why a hand-over step failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("holder socket ({what}): {source}")]
    Socket {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("holder protocol: {0}")]
    Protocol(String),
    #[error("holder refused: {0}")]
    Refused(String),
    #[error("starting the FUSE holder {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("the FUSE holder did not listen on {} in time", .0.display())]
    HolderNotListening(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn init() -> KernelInit {
        KernelInit {
            major: 7,
            minor: 45,
            flags: 0xfeed,
            max_readahead: 1 << 17,
            inode_layout: 1,
        }
    }

    fn start_holder(
        socket: &std::path::Path,
        grace: Duration,
    ) -> std::thread::JoinHandle<Result<HolderExit, HandoverError>> {
        let s = socket.to_path_buf();
        let h = std::thread::spawn(move || holder::run(&s, grace));
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while wire::connect_to(socket).unwrap().is_none() {
            assert!(std::time::Instant::now() < until, "holder never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }

    fn handover(socket: &std::path::Path) -> Handover {
        Handover::new(
            socket.to_path_buf(),
            HolderCommand {
                program: "/nonexistent-holder".into(),
                args: vec![],
                grace: Duration::from_secs(1),
                log: socket.with_extension("log"),
            },
        )
    }

    fn same_file(a: &impl AsFd, b: &impl AsFd) -> bool {
        let (a, b) = (
            nix::sys::stat::fstat(a.as_fd()).unwrap(),
            nix::sys::stat::fstat(b.as_fd()).unwrap(),
        );
        (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }

    #[test]
    fn a_parked_descriptor_outlives_its_daemon_and_goes_to_the_next() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("h.sock");
        let holder = start_holder(&sock, Duration::from_secs(30));
        let device = tempfile::tempfile().unwrap();

        let first = handover(&sock);
        first.park(device.as_fd(), &init()).unwrap();
        drop(first); // the daemon dies: its connection closes

        let second = handover(&sock);
        let (fd, got) = second.take().unwrap().expect("fd kept");
        assert_eq!(got, init());
        assert!(same_file(&fd, &device));
        // A third daemon while the second still runs gets it too (the
        // second is superseded); the holder keeps its copy throughout.
        let third = handover(&sock);
        assert!(third.take().unwrap().is_some());

        third.release().unwrap();
        assert_eq!(holder.join().unwrap().unwrap(), HolderExit::Released);
        assert!(!sock.exists(), "socket removed on exit");
    }

    #[test]
    fn nothing_to_take_without_a_holder_or_a_parked_fd() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("h.sock");
        assert!(handover(&sock).take().unwrap().is_none(), "no holder");
        let holder = start_holder(&sock, Duration::from_secs(30));
        assert!(handover(&sock).take().unwrap().is_none(), "nothing parked");
        handover(&sock).release().unwrap();
        assert_eq!(holder.join().unwrap().unwrap(), HolderExit::Released);
        // Release with nobody listening is fine too.
        handover(&sock).release().unwrap();
    }

    #[test]
    fn an_orphaned_connection_is_closed_after_the_grace_period() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("h.sock");
        let holder = start_holder(&sock, Duration::from_millis(600));
        let device = tempfile::tempfile().unwrap();
        let daemon = handover(&sock);
        daemon.park(device.as_fd(), &init()).unwrap();
        // While the owner lives there is no deadline.
        std::thread::sleep(Duration::from_millis(1200));
        assert!(!holder.is_finished(), "owner alive: holder keeps waiting");
        let t = std::time::Instant::now();
        drop(daemon);
        assert_eq!(holder.join().unwrap().unwrap(), HolderExit::GraceExpired);
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_park_without_descriptor_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("h.sock");
        let holder = start_holder(&sock, Duration::from_secs(30));
        let conn = wire::connect_to(&sock).unwrap().unwrap();
        wire::send(conn.as_fd(), &wire::Request::Park { init: init() }, None).unwrap();
        let (reply, _) = wire::recv::<wire::Reply>(conn.as_fd()).unwrap().unwrap();
        assert!(matches!(reply, wire::Reply::Error { .. }), "{reply:?}");
        assert!(handover(&sock).take().unwrap().is_none());
        handover(&sock).release().unwrap();
        holder.join().unwrap().unwrap();
    }

    #[test]
    fn spawning_a_missing_holder_program_is_a_typed_error() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("h.sock");
        let device = tempfile::tempfile().unwrap();
        let e = handover(&sock).park(device.as_fd(), &init()).unwrap_err();
        assert!(matches!(e, HandoverError::Spawn { .. }), "{e}");
    }
}
