//! Warm reads through rstargz vs overlayfs over a local directory (not a
//! test).
//!
//! Two layers, mounted remotely by the real `rstargz-grpc` from a private
//! `docker-registry`: a large file, and a small-file tree (the cached
//! Debian rootfs, ~6 700 entries). Every file is read once so the layers
//! are fully cached, then the kernel's page cache is dropped
//! (`/proc/sys/vm/drop_caches`) before each measurement of
//! - a sequential read of the large file (1 MiB reads), and
//! - a tree walk: `lstat` every entry and read every regular file,
//!
//! through an overlayfs (as a container sees it) over our FUSE layer, and
//! over the same files extracted to a local directory. Prints the
//! throughputs and our share of the local one.
//!
//! `cargo bench --bench warm_read` (root, FUSE, overlayfs): 256 MiB file
//! and the rootfs. Under `cargo test --all-targets` it runs a smoke version
//! (16 MiB, a generated tree of 200 files). `RSTARGZ_BENCH_BIG_MIB=N`
//! changes the large file's size.

#[path = "../tests/common/mod.rs"]
mod common;
mod remote;
// Its unit tests are compiled (not run) in this harness-less target.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use support::registry::Registry;

const REPO: &str = "bench/warm";
const BIG: &str = "big.bin";
const RUNS: usize = 3;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Pseudo-random bytes (xorshift), so compression cannot shrink them.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn big_tar(bytes: &[u8]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
    t.append_data(&mut h, BIG, bytes).unwrap();
    t.into_inner().unwrap()
}

/// The smoke test's small-file tree: 20 dirs of 10 files.
fn small_tree_tar() -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    for d in 0..20 {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        t.append_data(&mut h, format!("d{d}/"), std::io::empty())
            .unwrap();
        for f in 0..10 {
            let body = noise(1000 + 300 * f, (d * 100 + f) as u64);
            let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
            t.append_data(&mut h, format!("d{d}/f{f}"), &body[..])
                .unwrap();
        }
    }
    t.into_inner().unwrap()
}

fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root needed)");
}

fn read_file(p: &Path, buf: &mut [u8]) -> u64 {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut n = 0;
    loop {
        match f.read(buf) {
            Ok(0) => return n,
            Ok(k) => n += k as u64,
            Err(e) => panic!("{}: {e}", p.display()),
        }
    }
}

/// `lstat`s every entry below `dir`, reads every regular file; returns
/// (entries, bytes).
fn walk(dir: &Path, buf: &mut [u8]) -> (u64, u64) {
    let (mut entries, mut bytes) = (0, 0);
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        // The writer's prefetch landmark exists only in the eStargz layer.
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with("prefetch.landmark"))
        {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        entries += 1;
        if m.is_dir() {
            let (e, b) = walk(&p, buf);
            entries += e;
            bytes += b;
        } else if m.is_file() {
            bytes += read_file(&p, buf);
        }
    }
    (entries, bytes)
}

/// A container-like overlay: `lower` read-only, an empty upper dir.
struct Overlay {
    path: PathBuf,
}

impl Overlay {
    fn mount(lower: &Path, scratch: &Path, name: &str) -> Overlay {
        let (upper, work, path) = (
            scratch.join(format!("{name}-upper")),
            scratch.join(format!("{name}-work")),
            scratch.join(format!("{name}-merged")),
        );
        for d in [&upper, &work, &path] {
            std::fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &path,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .unwrap_or_else(|e| panic!("overlay {opts}: {e}"));
        Overlay { path }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
    }
}

struct Measured {
    what: &'static str,
    side: &'static str,
    best: Duration,
    bytes: u64,
    entries: u64,
}

fn measure(what: &'static str, side: &'static str, f: &mut dyn FnMut() -> (u64, u64)) -> Measured {
    let mut best = Duration::MAX;
    let (mut entries, mut bytes) = (0, 0);
    for _ in 0..RUNS {
        drop_caches();
        let t = Instant::now();
        (entries, bytes) = f();
        best = best.min(t.elapsed());
    }
    Measured {
        what,
        side,
        best,
        bytes,
        entries,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let big_mib: usize = std::env::var("RSTARGZ_BENCH_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 256 } else { 16 });
    support::require_prerequisites();
    let scratch = support::temp_dir("warm-read");
    let registry = Registry::start();

    // The same content twice: as eStargz layers, and extracted locally.
    let t = Instant::now();
    let big = noise(big_mib << 20, 42);
    let local = scratch.path().join("local");
    let (local_big, local_tree) = (local.join("big"), local.join("tree"));
    std::fs::create_dir_all(&local_big).unwrap();
    std::fs::create_dir_all(&local_tree).unwrap();
    std::fs::write(local_big.join(BIG), &big).unwrap();
    let big_layer = remote::push_estargz(&registry, REPO, Cursor::new(big_tar(&big)));
    drop(big);
    let tree_layer = if full {
        let rootfs = support::rootfs::debian_rootfs();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&rootfs.path)
            .arg("-C")
            .arg(&local_tree)
            .status()
            .unwrap();
        assert!(st.success(), "extracting the rootfs");
        let f = std::fs::File::open(&rootfs.path).unwrap();
        remote::push_estargz(&registry, REPO, std::io::BufReader::new(f))
    } else {
        let tar = small_tree_tar();
        tar::Archive::new(Cursor::new(&tar))
            .unpack(&local_tree)
            .unwrap();
        remote::push_estargz(&registry, REPO, Cursor::new(tar))
    };
    eprintln!("layers built and pushed in {:?}", t.elapsed());

    let work = common::workdir();
    // Declared after `work`, dropped before it: a panic leaves no mounts.
    let _unmount = remote::Unmounter(work.path().to_path_buf());
    let mut daemon = common::Daemon::start(work.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let image = registry.reference(REPO, "1");
    let layers = [big_layer, tree_layer];
    let remote_n = rt.block_on(async {
        let mut c = daemon.client().await;
        remote::prepare_remote(&mut c, &image, &layers).await
    });
    assert_eq!(
        remote_n,
        2,
        "layers mounted remotely\n{}",
        daemon.log_text()
    );
    let mut mounts: Vec<PathBuf> = std::fs::read_dir(daemon.root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs"))
        .collect();
    mounts.sort();
    let (fuse_big, fuse_tree) = match mounts.iter().position(|m| m.join(BIG).exists()) {
        Some(0) => (mounts[0].clone(), mounts[1].clone()),
        Some(_) => (mounts[1].clone(), mounts[0].clone()),
        None => panic!("no layer holds {BIG}: {mounts:?}"),
    };

    let ov = scratch.path().join("ov");
    let sides = [
        (
            "local",
            Overlay::mount(&local_big, &ov, "local-big"),
            Overlay::mount(&local_tree, &ov, "local-tree"),
        ),
        (
            "rstargz",
            Overlay::mount(&fuse_big, &ov, "fuse-big"),
            Overlay::mount(&fuse_tree, &ov, "fuse-tree"),
        ),
    ];
    let mut buf = vec![0u8; 1 << 20];
    // Fill our caches (and check the content matches on both sides).
    let t = Instant::now();
    let ours = walk(&sides[1].2.path, &mut buf);
    let theirs = walk(&sides[0].2.path, &mut buf);
    assert_eq!(ours, theirs, "tree: (entries, bytes) differ");
    let n = read_file(&sides[1].1.path.join(BIG), &mut buf);
    assert_eq!(n, (big_mib << 20) as u64);
    eprintln!("first (cold) read of both layers: {:?}", t.elapsed());

    let mut results = Vec::new();
    for (side, big, tree) in &sides {
        let p = big.path.join(BIG);
        results.push(measure("large file, sequential", side, &mut || {
            (1, read_file(&p, &mut buf))
        }));
        results.push(measure("tree walk (lstat + read)", side, &mut || {
            walk(&tree.path, &mut buf)
        }));
    }
    drop(sides);

    println!(
        "warm reads after drop_caches, best of {RUNS}; large file {big_mib} MiB, tree {} entries ({} bytes)",
        results[1].entries, results[1].bytes
    );
    println!();
    println!("| workload | overlayfs over | time | MB/s | entries/s | rstargz / local |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        let local = results
            .iter()
            .find(|l| l.what == r.what && l.side == "local")
            .unwrap();
        let ratio = local.best.as_secs_f64() / r.best.as_secs_f64();
        println!(
            "| {} | {} | {:.3} s | {:.0} | {:.0} | {:.0}% |",
            r.what,
            r.side,
            r.best.as_secs_f64(),
            r.bytes as f64 / 1e6 / r.best.as_secs_f64(),
            r.entries as f64 / r.best.as_secs_f64(),
            ratio * 100.0
        );
    }

    let log = daemon.log_text();
    println!();
    println!(
        "files served by FUSE passthrough: {}; written out for it: {}",
        log.matches("passthrough backing file registered").count(),
        log.matches("complete file written").count(),
    );
    rt.block_on(async {
        let mut c = daemon.client().await;
        remote::remove_all(&mut c, layers.len()).await
    });
    assert!(daemon.terminate(), "daemon exit after SIGTERM");
}
