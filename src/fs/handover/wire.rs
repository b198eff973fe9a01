//! The holder protocol: one JSON message per `SOCK_SEQPACKET` packet, the
//! `/dev/fuse` fd travelling beside it as `SCM_RIGHTS`.
//!
//! Seqpacket keeps message boundaries and refuses peers of another socket
//! type, so a message is read whole or not at all and nothing needs framing.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, socket,
};
use serde::{Deserialize, Serialize};

use super::{HandoverError, KernelInit};

/// Largest message; real ones are a few hundred bytes.
pub(super) const MAX_MESSAGE: usize = 4096;
/// How long one send or receive may block: a peer that connects and goes
/// silent must not wedge the single-threaded holder, nor a holder that
/// stopped answering the daemon's start.
const IO_TIMEOUT_SECS: i64 = 5;

fn with_timeouts(fd: OwnedFd) -> Result<OwnedFd, HandoverError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let t = nix::sys::time::TimeVal::new(IO_TIMEOUT_SECS, 0);
    setsockopt(&fd, sockopt::ReceiveTimeout, &t).map_err(sock_err("receive timeout"))?;
    setsockopt(&fd, sockopt::SendTimeout, &t).map_err(sock_err("send timeout"))?;
    Ok(fd)
}

/// Daemon → holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Request {
    /// Keep this fd (attached) for the next daemon; the sender is the owner.
    Park { init: KernelInit },
    /// Give me the fd you keep, if any; I am the owner now.
    Take,
    /// Drop the fd and exit: the daemon unmounted everything itself.
    Release,
}

/// Holder → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(super) enum Reply {
    Ok,
    /// `Take` with nothing kept.
    Empty,
    /// `Take`: the fd is attached.
    Device {
        init: KernelInit,
    },
    Error {
        message: String,
    },
}

fn sock_err(what: &'static str) -> impl FnOnce(nix::Error) -> HandoverError {
    move |e| HandoverError::Socket {
        what,
        source: e.into(),
    }
}

fn seqpacket() -> Result<OwnedFd, HandoverError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sock_err("socket"))
}

/// Binds and listens on `path` (a stale socket file is replaced).
pub(super) fn listen_at(path: &Path) -> Result<OwnedFd, HandoverError> {
    let fd = seqpacket()?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(HandoverError::Socket {
                what: "removing a stale holder socket",
                source,
            });
        }
    }
    let addr = UnixAddr::new(path).map_err(sock_err("socket path"))?;
    bind(fd.as_raw_fd(), &addr).map_err(sock_err("bind"))?;
    let backlog = Backlog::new(8).map_err(sock_err("listen"))?;
    listen(&fd, backlog).map_err(sock_err("listen"))?;
    Ok(fd)
}

/// Connects to the holder at `path`. `Ok(None)`: nobody listens there.
pub(super) fn connect_to(path: &Path) -> Result<Option<OwnedFd>, HandoverError> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(sock_err("socket path"))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => with_timeouts(fd).map(Some),
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => Ok(None),
        Err(e) => Err(sock_err("connect")(e)),
    }
}

pub(super) fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, HandoverError> {
    let raw = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(sock_err("accept"))?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    with_timeouts(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends one message, with `fd` attached when given.
pub(super) fn send<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(msg).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let cmsgs: &[ControlMessage<'_>] = if fd.is_some() {
        &[ControlMessage::ScmRights(&raw)]
    } else {
        &[]
    };
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&body)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(sock_err("send"))?;
    if sent != body.len() {
        return Err(HandoverError::Protocol(format!(
            "short send: {sent} of {} bytes",
            body.len()
        )));
    }
    Ok(())
}

/// Receives one message and the fd sent with it. `Ok(None)`: the peer
/// closed the connection.
pub(super) fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> Result<Option<(T, Option<OwnedFd>)>, HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, truncated, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(sock_err("receive"))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(sock_err("receive"))? {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, truncated, fds)
    };
    // SAFETY: SCM_RIGHTS installed these descriptors in this process for
    // us alone.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|r| unsafe { OwnedFd::from_raw_fd(r) })
        .collect();
    if len == 0 && owned.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(HandoverError::Protocol("message too long".into()));
    }
    if owned.len() > 1 {
        return Err(HandoverError::Protocol(format!(
            "{} descriptors in one message",
            owned.len()
        )));
    }
    let msg = serde_json::from_slice(&buf[..len])
        .map_err(|e| HandoverError::Protocol(format!("bad message: {e}")))?;
    Ok(Some((msg, owned.pop())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn message_and_descriptor_arrive_together() {
        let (a, b) = pair();
        let file = tempfile::tempfile().unwrap();
        let init = KernelInit {
            major: 7,
            minor: 45,
            flags: 0x1234_5678_9abc,
            max_readahead: 131072,
            inode_layout: 1,
        };
        send(
            a.as_fd(),
            &Request::Park { init: init.clone() },
            Some(file.as_fd()),
        )
        .unwrap();
        let (msg, fd) = recv::<Request>(b.as_fd()).unwrap().unwrap();
        assert_eq!(msg, Request::Park { init });
        // The received descriptor is the same open file.
        let fd = fd.expect("descriptor attached");
        let a_stat = nix::sys::stat::fstat(&file).unwrap();
        let b_stat = nix::sys::stat::fstat(&fd).unwrap();
        assert_eq!(
            (a_stat.st_dev, a_stat.st_ino),
            (b_stat.st_dev, b_stat.st_ino)
        );

        send(a.as_fd(), &Request::Take, None).unwrap();
        let (msg, fd) = recv::<Request>(b.as_fd()).unwrap().unwrap();
        assert_eq!(msg, Request::Take);
        assert!(fd.is_none());
        drop(a);
        assert!(recv::<Request>(b.as_fd()).unwrap().is_none(), "EOF");
    }

    #[test]
    fn a_silent_peer_times_out_instead_of_blocking() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        let listener = listen_at(&sock).unwrap();
        let _silent = connect_to(&sock).unwrap().unwrap();
        let conn = accept(listener.as_fd()).unwrap();
        let t = std::time::Instant::now();
        let e = recv::<Request>(conn.as_fd()).unwrap_err();
        assert!(matches!(e, HandoverError::Socket { .. }), "{e}");
        let took = t.elapsed();
        assert!(
            took >= std::time::Duration::from_secs(4) && took < std::time::Duration::from_secs(30),
            "{took:?}"
        );
    }

    #[test]
    fn garbage_and_oversized_messages_are_protocol_errors() {
        let (a, b) = pair();
        nix::unistd::write(&a, b"{not json").unwrap();
        assert!(matches!(
            recv::<Request>(b.as_fd()),
            Err(HandoverError::Protocol(_))
        ));
        nix::unistd::write(&a, &vec![b' '; MAX_MESSAGE + 10]).unwrap();
        assert!(matches!(
            recv::<Request>(b.as_fd()),
            Err(HandoverError::Protocol(m)) if m.contains("too long")
        ));
    }
}
