//! A fresh network namespace holding only a loopback interface that is
//! up, pinned by a bind mount on a file in our temp dir and handed to runc
//! as the container's network namespace. A workload can use 127.0.0.1
//! (servers that talk to themselves still start) and reaches nothing else.
//! No external tool and no system-wide path: a helper thread unshares its
//! own network namespace, brings `lo` up, and the namespace outlives it
//! through the mount, which the guard removes.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::error::{OptimizeError, Result};

pub struct NetNs {
    path: PathBuf,
    mounted: bool,
}

impl NetNs {
    /// Creates the namespace and pins it at `path` (a new file).
    pub fn create(path: &Path) -> Result<NetNs> {
        let err = |m: String| OptimizeError::Runtime(format!("network namespace: {m}"));
        std::fs::File::create(path).map_err(|e| OptimizeError::io(path, e))?;
        let target = path.to_owned();
        // The thread's own namespace changes; the process's never does.
        let r = std::thread::spawn(move || -> std::result::Result<(), String> {
            // SAFETY: unshare of the calling thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", std::io::Error::last_os_error()));
            }
            loopback_up()?;
            let me = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
            mount(
                Some(me.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind mount of {me}: {e}"))
        })
        .join()
        .map_err(|_| err("helper thread panicked".into()))?;
        match r {
            Ok(()) => Ok(NetNs {
                path: path.to_owned(),
                mounted: true,
            }),
            Err(m) => {
                let _ = std::fs::remove_file(path);
                Err(err(m))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
            self.mounted = false;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets `IFF_UP` on `lo` in the calling thread's network namespace.
fn loopback_up() -> std::result::Result<(), String> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: zeroed ifreq is valid; the name fits (3 bytes + NUL).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req` only.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if r != 0 {
        return Err(format!("bringing lo up: {e}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_loopback_and_it_is_up() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("net");
        let ns = NetNs::create(&p).unwrap();
        let f = std::fs::File::open(ns.path()).unwrap();
        let fd = f.as_raw_fd();
        let (ifaces, bound) = std::thread::spawn(move || {
            // SAFETY: join the pinned namespace in this thread only.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0);
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            let ifaces: Vec<String> = dev
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next().map(|s| s.trim().to_owned()))
                .collect();
            // Loopback works: a listener and a connection to it.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let ok = std::net::TcpStream::connect(l.local_addr().unwrap()).is_ok();
            (ifaces, ok)
        })
        .join()
        .unwrap();
        assert_eq!(ifaces, ["lo"]);
        assert!(bound);
        drop(f);
        drop(ns);
        assert!(!p.exists());
    }
}
