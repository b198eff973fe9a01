//! Real-stack test harness: a private registry, a private containerd, our
//! snapshotter daemon and a real Debian image, each owned by a guard whose
//! `Drop` stops its processes and removes its files.
//!
//! - [`registry::Registry`]: `docker-registry` on a free 127.0.0.1 port,
//!   plus plain-HTTP reads of manifests and blobs.
//! - [`containerd::Containerd`]: a containerd with its own root, state and
//!   sockets; `ctr` and `ctr-remote` helpers bound to it.
//! - [`daemon::Daemon`]: our `rstargz-grpc` binary on its own socket and root.
//! - [`rootfs`]: the debootstrap rootfs tarball, built once and cached.
//! - [`image`]: an OCI image layout written from that tarball (plus an
//!   optional second layer), pushed with `skopeo`.
//! - [`layering`]: what one rootfs tarball adds over another, as layer
//!   tars split by path (the start-up benchmark's multi-layer images).
//! - [`interop`]: `ctr-remote image convert --estargz` and extraction of the
//!   converted blobs and their TOC-digest annotations.
//! - [`faultproxy::FaultProxy`]: an HTTP proxy in front of the registry that
//!   injects registry faults on demand.
//! - [`proc`]: commands with timeouts and readable failures, servers that
//!   die with the test, process-tree kills and lazy unmounts for cleanup.
//!
//! Temp dirs are `/tmp/rstargz-t-*` and record their owner; [`reap_stale`]
//! cleans up after test processes that were killed outright.
//!
//! Every test binary includes this module with `mod support;` and uses only
//! part of it, hence the `dead_code` allowance.
//!
//! These tests need root, containerd, runc, FUSE and the tools installed by
//! `scripts/deps.sh`; [`require_prerequisites`] fails loudly when one is
//! missing instead of skipping.

#![allow(dead_code)]

pub mod containerd;
pub mod daemon;
pub mod faultproxy;
pub mod image;
pub mod interop;
pub mod layering;
pub mod proc;
pub mod python;
pub mod registry;
pub mod rootfs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Tools the real-stack tests run, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("runc", "runc"),
    ("docker-registry", "docker-registry"),
    ("ctr-remote", "stargz-snapshotter"),
    ("skopeo", "skopeo"),
    ("debootstrap", "debootstrap"),
    ("curl", "curl"),
    ("tar", "tar"),
    ("umount", "mount"),
];

/// Panics with a clear message when something the real-stack tests need is
/// missing. They must run in CI, so they never skip silently.
pub fn require_prerequisites() {
    reap_stale();
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root privileges (run the tests as root)".to_string());
    }
    for (tool, pkg) in TOOLS {
        if which(tool).is_none() {
            missing.push(format!(
                "`{tool}` (Debian package {pkg}; see scripts/deps.sh)"
            ));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse (fuse3 / the fuse kernel module)".to_string());
    }
    if !filesystem_supported("overlay") {
        missing.push("overlayfs support in the kernel".to_string());
    }
    assert!(
        missing.is_empty(),
        "real-stack test prerequisites missing:\n  - {}",
        missing.join("\n  - ")
    );
}

fn filesystem_supported(name: &str) -> bool {
    if std::fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.split_whitespace().last() == Some(name)))
        .unwrap_or(false)
    {
        return true;
    }
    // The module may simply not be loaded yet; mount(2) would load it.
    Command::new("modprobe")
        .arg(name)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Finds an executable on `$PATH` (plus the sbin directories, which a
/// non-login root shell may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Prefix of every temp dir the harness makes under `/tmp`.
const TEMP_PREFIX: &str = "rstargz-t-";
/// File in each temp dir naming the test process that owns it.
const OWNER_FILE: &str = ".owner";

/// A fresh temporary directory for one guard, short enough for unix socket
/// paths (108 bytes). It records its owner process, so that a later run can
/// clean up after a test process that was killed before its guards dropped
/// (see [`reap_stale`]).
pub fn temp_dir(what: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{what}-"))
        .tempdir_in("/tmp")
        .expect("create temp dir under /tmp");
    let me = std::process::id();
    let owner = format!("{me} {}", proc_start_time(me).unwrap_or_default());
    std::fs::write(d.path().join(OWNER_FILE), owner).expect("write owner file");
    d
}

/// Start time (clock ticks since boot) of a process: with the pid, it
/// identifies the process even if the pid is reused.
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; fields counted after the `)` that ends the command name.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Removes what killed test processes left behind: for each harness temp
/// dir whose owner is gone, kills processes started from it (shims of its
/// containerd, its servers), unmounts everything below it and deletes it.
/// Runs once per test process.
pub fn reap_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(rd) = std::fs::read_dir("/tmp") else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let dir = e.path();
            let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
                continue; // being created right now, or not ours
            };
            let mut f = owner.split_whitespace();
            let (Some(pid), Some(start)) = (
                f.next().and_then(|p| p.parse::<u32>().ok()),
                f.next().and_then(|s| s.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if proc_start_time(pid) == Some(start) {
                continue; // owner alive: another test run
            }
            let d = dir.display().to_string();
            let killed = proc::kill_trees(|argv| argv.iter().any(|a| a.contains(&d)));
            std::thread::sleep(Duration::from_millis(200));
            let unmounted = proc::unmount_all_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!(
                "reaped stale {d} (owner {pid} gone): killed {killed:?}, unmounted {}",
                unmounted.len()
            );
        }
    });
}

/// A name unique across parallel tests and runs: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

pub use proc::{run, run_ok};
