//! What mounted layers cost the daemon (not a test): threads, memory and
//! open files of the real `rstargz-grpc` with N remote layers mounted.
//!
//! Builds N distinct small eStargz layers (the crate's writer), pushes them
//! to a private `docker-registry` on 127.0.0.1, prepares each through the
//! gRPC API with the labels containerd's CRI plugin passes (so the daemon
//! mounts them remotely), reads every file once through the mounts, then
//! removes them. `/proc/<pid>` is sampled at idle, with the layers mounted
//! and after removing them; per-layer memory is the RSS growth minus the
//! chunk cache's bytes, divided by N.
//!
//! `cargo bench --bench layers` (root, FUSE): 100 layers.
//! `cargo test --all-targets` runs it with 5 layers as a smoke test.
//! `RSTARGZ_BENCH_LAYERS=N` changes N; `RSTARGZ_BENCH_DAEMON=/path` runs
//! another build of the daemon (e.g. an older one, to compare).

#[path = "../tests/common/mod.rs"]
mod common;
// Its unit tests are compiled (not run) in this harness-less target.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

mod remote;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::registry::Registry;

const REPO: &str = "bench/layers";
const FILES_PER_LAYER: usize = 16;
const FILE_SIZE: usize = 8 << 10;

/// `/proc/<pid>` numbers of the daemon.
#[derive(Clone, Copy)]
struct Sample {
    threads: u64,
    rss_kb: u64,
    fds: usize,
    cache_bytes: u64,
}

fn sample(pid: i32, metrics: &Path) -> Sample {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    Sample {
        threads: field("Threads:"),
        rss_kb: field("VmRSS:"),
        fds,
        cache_bytes: cache_bytes(metrics),
    }
}

/// Bytes held by the daemon's memory chunk cache (`rstargz status`).
fn cache_bytes(metrics: &Path) -> u64 {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .arg("status")
        .arg("--address")
        .arg(metrics)
        .arg("--json")
        .output();
    let Ok(o) = o else { return 0 };
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| v["cache"]["memory_bytes"].as_u64())
        .unwrap_or(0)
}

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

/// The tar of a small layer whose bytes differ from every other layer's.
fn layer_tar(i: usize) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, format!("l{i}/"), std::io::empty())
        .unwrap();
    for j in 0..FILES_PER_LAYER {
        let body: Vec<u8> = (0..FILE_SIZE)
            .map(|k| (k.wrapping_mul(31) ^ i.wrapping_mul(7919) ^ j.wrapping_mul(131)) as u8)
            .collect();
        let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
        tar.append_data(&mut h, format!("l{i}/f{j}"), &body[..])
            .unwrap();
    }
    tar.into_inner().unwrap()
}

fn read_tree(dir: &Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            let (f, b) = read_tree(&p);
            files += f;
            bytes += b;
        } else if t.is_file() {
            files += 1;
            bytes += std::fs::read(&p).map_or(0, |v| v.len() as u64);
        }
    }
    (files, bytes)
}

fn snapshot_mounts(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .map(|d| d.flatten().map(|e| e.path().join("fs")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("RSTARGZ_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100 } else { 5 });
    support::require_prerequisites();
    let registry = Registry::start();
    let t = Instant::now();
    let layers: Vec<remote::Pushed> = (0..n)
        .map(|i| remote::push_estargz(&registry, REPO, Cursor::new(layer_tar(i))))
        .collect();
    eprintln!("built and pushed {n} layers in {:?}", t.elapsed());

    let work = common::workdir();
    // Declared after `work`, dropped before it: a panic leaves no mounts.
    let _unmount = remote::Unmounter(work.path().to_path_buf());
    let bin = std::env::var_os("RSTARGZ_BENCH_DAEMON").map(PathBuf::from);
    let bin = bin.unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rstargz-grpc")));
    let mut daemon = common::Daemon::start_binary(work.path(), &[], &bin);
    let pid = daemon.pid();
    let metrics = daemon.socket.with_file_name("rstargz-metrics.sock");
    std::thread::sleep(Duration::from_millis(500));
    let idle = sample(pid, &metrics);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let image = registry.reference(REPO, "1");
    let t = Instant::now();
    let remote = rt.block_on(async {
        let mut c = daemon.client().await;
        remote::prepare_remote(&mut c, &image, &layers).await
    });
    let prepared_in = t.elapsed();
    assert_eq!(remote, n, "layers prepared remotely\n{}", daemon.log_text());
    let mounts = snapshot_mounts(&daemon.root);
    let t = Instant::now();
    let (files, bytes) = mounts
        .iter()
        .map(|m| read_tree(m))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let read_in = t.elapsed();
    // Each layer also holds the writer's (empty) prefetch landmark.
    assert_eq!(
        files,
        n * (FILES_PER_LAYER + 1),
        "files read through the mounts"
    );
    assert!(
        bytes >= (n * FILES_PER_LAYER * FILE_SIZE) as u64,
        "{bytes} bytes read"
    );
    // Let prefetch and background fetch finish.
    std::thread::sleep(Duration::from_secs(if full { 3 } else { 1 }));
    let loaded = sample(pid, &metrics);

    rt.block_on(async {
        let mut c = daemon.client().await;
        remote::remove_all(&mut c, n).await
    });
    // Idle blocking-pool threads expire after 10 s.
    std::thread::sleep(Duration::from_secs(if full { 12 } else { 1 }));
    let removed = sample(pid, &metrics);
    assert!(
        snapshot_mounts(&daemon.root).is_empty(),
        "snapshot dirs left after Remove"
    );
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    assert!(daemon.terminate(), "daemon exit after SIGTERM");

    println!(
        "daemon: {}; {n} layers prepared in {prepared_in:?}; {files} files ({bytes} B) read in {read_in:?}",
        bin.display()
    );
    println!();
    println!("| state | threads | VmRSS | open fds | memory cache |");
    println!("|---|---|---|---|---|");
    for (name, s) in [
        ("idle", idle),
        (&*format!("{n} layers mounted"), loaded),
        ("all removed", removed),
    ] {
        println!(
            "| {name} | {} | {} kB | {} | {} kB |",
            s.threads,
            s.rss_kb,
            s.fds,
            s.cache_bytes / 1024
        );
    }
    let growth = loaded.rss_kb.saturating_sub(idle.rss_kb);
    let cache = loaded.cache_bytes.saturating_sub(idle.cache_bytes) / 1024;
    println!();
    println!(
        "per layer: {:.1} kB RSS ((RSS@{n} - RSS@idle) / {n}), {:.1} kB of it outside the memory cache ({cache} kB cached in all)",
        growth as f64 / n as f64,
        growth.saturating_sub(cache) as f64 / n as f64,
    );
}
