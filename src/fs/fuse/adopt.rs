//! Serving a FUSE connection that another process set up.
//!
//! The kernel sends `FUSE_INIT` once per connection, but fuser only builds a
//! session by answering one. So the session is built on one end of a
//! socket pair on which we replay the `FUSE_INIT` the kernel sent to the
//! first daemon (recorded as [`KernelInit`]); fuser's answer goes back into
//! the pair and is dropped (the kernel keeps what it agreed with the first
//! daemon). Then the session's descriptor is replaced, with dup2(2), by the
//! real `/dev/fuse` fd: from then on every read, reply, notification and
//! passthrough ioctl of the session goes to the kernel's connection.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use fuser::{Filesystem, Session};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use super::mount::{MountOptions, Prepared, adopted_config, prepared_adopted};
use crate::fs::handover::KernelInit;

const FUSE_INIT: u32 = 26;
/// `fuse_init_in.flags` bit saying `flags2` carries the high 32 bits.
const FUSE_INIT_EXT: u64 = 1 << 30;
/// `fuse_notify_code`: move every request read but not answered back to
/// the pending queue, so that it is read again (Linux 6.9+).
const FUSE_NOTIFY_RESEND: i32 = 7;
const IN_HEADER: usize = 40;
const INIT_IN: usize = 64;

/// The `FUSE_INIT` request the kernel would send: `fuse_in_header` then
/// `fuse_init_in`, native endian.
fn init_request(init: &KernelInit) -> Vec<u8> {
    let mut b = Vec::with_capacity(IN_HEADER + INIT_IN);
    let len = u32::try_from(IN_HEADER + INIT_IN).expect("small");
    let flags = init.flags | FUSE_INIT_EXT;
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    b.extend_from_slice(&1u64.to_ne_bytes()); // unique
    b.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    b.extend_from_slice(&0u32.to_ne_bytes()); // uid
    b.extend_from_slice(&0u32.to_ne_bytes()); // gid
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid
    b.extend_from_slice(&0u32.to_ne_bytes()); // total_extlen, padding
    b.extend_from_slice(&init.major.to_ne_bytes());
    b.extend_from_slice(&init.minor.to_ne_bytes());
    b.extend_from_slice(&init.max_readahead.to_ne_bytes());
    b.extend_from_slice(&(flags as u32).to_ne_bytes());
    b.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
    b.resize(IN_HEADER + INIT_IN, 0); // unused[11]
    b
}

/// A session for `fs` on `device`, the `/dev/fuse` fd of the live mount at
/// `mountpoint`. It does not serve until spawned. Blocking (briefly).
pub(super) fn adopt<F: Filesystem + Send + Sync + 'static>(
    mountpoint: &Path,
    fs: F,
    device: OwnedFd,
    init: &KernelInit,
    opts: &MountOptions,
) -> io::Result<Prepared<F>> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let req = init_request(init);
    if nix::unistd::write(&theirs, &req)? != req.len() {
        return Err(io::Error::other("short write of the replayed FUSE_INIT"));
    }
    let (acl, config) = adopted_config(opts);
    // fuser reads our INIT and answers it into the pair.
    let session = Session::from_fd(fs, ours, acl, config)?;
    drop(theirs);
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: `slot` stays owned by the session; dup2 atomically makes it
    // refer to the device instead of the socket.
    if unsafe { libc::dup2(device.as_raw_fd(), slot) } < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(device);
    Ok(prepared_adopted(session, mountpoint))
}

/// Asks the kernel to resend the requests the previous daemon had read but
/// not answered. Before Linux 6.9 this fails (`EINVAL`); those requests then
/// wait until the connection ends.
pub(super) fn request_resend(device: BorrowedFd<'_>) -> io::Result<()> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&16u32.to_ne_bytes());
    b.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    b.extend_from_slice(&0u64.to_ne_bytes()); // unique 0: a notification
    match nix::unistd::write(device, &b) {
        Ok(16) => Ok(()),
        Ok(n) => Err(io::Error::other(format!("short notification write: {n}"))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replayed_init_has_the_kernel_layout() {
        let b = init_request(&KernelInit {
            major: 7,
            minor: 45,
            flags: 0x0000_0003_0000_0001,
            max_readahead: 131072,
            inode_layout: 1,
        });
        assert_eq!(b.len(), 104);
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 104);
        assert_eq!(u32_at(4), FUSE_INIT);
        assert_eq!(u32_at(40), 7);
        assert_eq!(u32_at(44), 45);
        assert_eq!(u32_at(48), 131072);
        assert_eq!(u32_at(52), 1 | (1 << 30), "low flags with FUSE_INIT_EXT");
        assert_eq!(u32_at(56), 3, "high flags");
    }
}
