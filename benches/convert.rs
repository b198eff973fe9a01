//! `rstargz convert` against Debian's `ctr-remote image convert --estargz
//! --oci` on the same multi-layer image, in one run on this machine.
//!
//! The image: the debootstrap minbase rootfs (`tests/support/rootfs.rs`)
//! plus layers cut from this Debian system's own `/usr` trees (Python's
//! standard library, Go's toolchain, shared libraries), which, like many
//! builders' layers, omit their parent directories. It is pushed to a
//! private `docker-registry`; then
//! - `rstargz convert` (the release binary under `cargo bench`) converts
//!   registry to registry: download, convert, upload all count;
//! - `ctr-remote` converts inside a private containerd after the image was
//!   fetched into its content store: only the convert step is timed.
//!
//! Both use compression level 9 (both tools' default) and their default
//! chunk size (4 MiB). Output size is the sum of the compressed layers;
//! peak RSS is the converting process's `ru_maxrss` from `wait4` (for
//! ctr-remote its client process, where the converter runs).
//!
//! `cargo bench --bench convert`. Environment:
//! - `RSTARGZ_BENCH_CONVERT_TREES`: colon-separated trees made into layers
//!   (default `/usr/lib/python3.11:/usr/lib/go-1.19:/usr/lib/x86_64-linux-gnu`);
//! - `RSTARGZ_BENCH_CONVERT_MAX_MB`: cap per tree layer, MiB (default 160);
//! - `RSTARGZ_BENCH_CONVERT_JOBS`: `rstargz convert --jobs` (default 2).
//!
//! Under `cargo test` (no `--bench`) a smoke run converts a small image
//! with both tools and prints the same table.

// Its unit tests do not run here (no harness), so their imports look unused.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::containerd::{Containerd, ContainerdOptions};
use support::image::{self, Layer};
use support::registry::Registry;

const LEVEL: &str = "9";

struct Run {
    tool: &'static str,
    secs: f64,
    cpu: f64,
    max_rss_kib: u64,
    out_bytes: u64,
    layers: usize,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    support::require_prerequisites();
    let tmp = support::temp_dir("bench-convert");
    let trees = std::env::var("RSTARGZ_BENCH_CONVERT_TREES").unwrap_or_else(|_| {
        "/usr/lib/python3.11:/usr/lib/go-1.19:/usr/lib/x86_64-linux-gnu".into()
    });
    let cap: u64 = if full {
        std::env::var("RSTARGZ_BENCH_CONVERT_MAX_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(160)
            << 20
    } else {
        4 << 20
    };
    let jobs = std::env::var("RSTARGZ_BENCH_CONVERT_JOBS").unwrap_or_else(|_| "2".into());

    // The image.
    let mut layers = Vec::new();
    let mut uncompressed = 0u64;
    if full {
        let rootfs = support::rootfs::debian_rootfs();
        uncompressed += std::fs::metadata(&rootfs.path).unwrap().len();
        layers.push(Layer::TarFile(rootfs.path));
    }
    for (i, tree) in trees
        .split(':')
        .filter(|t| Path::new(t).is_dir())
        .enumerate()
    {
        let p = tmp.path().join(format!("tree{i}.tar"));
        uncompressed += tree_tar(Path::new(tree), &p, cap);
        layers.push(Layer::TarFile(p));
    }
    let n_layers = layers.len();
    assert!(n_layers >= 2, "no trees found in {trees}");
    let layout = tmp.path().join("layout");
    let t = Instant::now();
    image::build_oci_layout(&layout, "1", &layers, &["/bin/sh"]);
    for l in &layers {
        if let Layer::TarFile(p) = l
            && p.starts_with(tmp.path())
        {
            let _ = std::fs::remove_file(p);
        }
    }
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(&layout, "1", "bench/src");
    let _ = std::fs::remove_dir_all(&layout);
    eprintln!(
        "image: {n_layers} layers, {:.0} MB uncompressed, built and pushed in {:.0?}",
        uncompressed as f64 / 1e6,
        t.elapsed()
    );

    // rstargz convert, registry to registry.
    let dst = registry.reference("bench/esgz", "rstargz");
    let out = tmp.path().join("rstargz.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rstargz"));
    cmd.args([
        "convert",
        "--plain-http",
        "--json",
        "--level",
        LEVEL,
        "--jobs",
        &jobs,
        &src,
        &dst,
    ]);
    let (secs, cpu, rss) = measured(&mut cmd, &out);
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let r_layers = report["layers"].as_array().unwrap().len();
    assert_eq!(r_layers, n_layers);
    let rstargz = Run {
        tool: "rstargz convert",
        secs,
        cpu,
        max_rss_kib: rss,
        out_bytes: report["size_out"].as_u64().unwrap(),
        layers: r_layers,
    };

    // ctr-remote, on the image in a private containerd's content store.
    let ctrd = Containerd::start(ContainerdOptions { stargz_proxy: None });
    ctrd.ctr_timeout(
        &["content", "fetch", "--plain-http", &src],
        Duration::from_secs(600),
    );
    let dst2 = registry.reference("bench/esgz", "ctr-remote");
    let mut cmd = Command::new("ctr-remote");
    cmd.arg("--address")
        .arg(&ctrd.address)
        .arg("--namespace")
        .arg(&ctrd.namespace)
        .args([
            "images",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-compression-level",
            LEVEL,
            &src,
            &dst2,
        ]);
    let (secs, cpu, rss) = measured(&mut cmd, &tmp.path().join("ctr-remote.out"));
    ctrd.ctr_timeout(
        &["images", "push", "--plain-http", &dst2],
        Duration::from_secs(600),
    );
    let (out_bytes, layers) = pushed_layer_bytes(&registry, "bench/esgz", "ctr-remote");
    assert_eq!(layers, n_layers);
    let ctr_remote = Run {
        tool: "ctr-remote convert",
        secs,
        cpu,
        max_rss_kib: rss,
        out_bytes,
        layers,
    };

    println!(
        "\n{} image: {n_layers} layers, {:.0} MB uncompressed, level {LEVEL}, rstargz --jobs {jobs}, {} CPUs",
        if full { "bench" } else { "smoke" },
        uncompressed as f64 / 1e6,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| tool | wall s | CPU s | output MB | size vs ctr-remote | peak RSS MB | speed-up |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in [&rstargz, &ctr_remote] {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:+.2}% | {:.1} | {:.2}x |",
            r.tool,
            r.secs,
            r.cpu,
            r.out_bytes as f64 / 1e6,
            (r.out_bytes as f64 / ctr_remote.out_bytes as f64 - 1.0) * 100.0,
            r.max_rss_kib as f64 / 1024.0,
            ctr_remote.secs / r.secs,
        );
        assert_eq!(r.layers, n_layers);
    }
}

/// Runs `cmd` (stdout to `out`), returning wall seconds, CPU seconds
/// (user + system) and peak RSS in KiB, from `wait4`.
// The child is reaped by `wait4` (for its rusage), not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn measured(cmd: &mut Command, out: &Path) -> (f64, f64, u64) {
    let t = Instant::now();
    let child = cmd
        .stdout(File::create(out).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `ru` outlive the call.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(pid, child.id() as i32, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed with status {status}"
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs, tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64)
}

/// Sum of the layer sizes of `<name>:<tag>` (the linux/amd64 manifest of
/// an index), and the layer count.
fn pushed_layer_bytes(registry: &Registry, name: &str, tag: &str) -> (u64, usize) {
    let (body, _) = registry.manifest(name, tag);
    let mut m: Value = serde_json::from_slice(&body).unwrap();
    if let Some(list) = m["manifests"].as_array() {
        let d = list
            .iter()
            .find(|e| e["platform"]["architecture"] == "amd64")
            .and_then(|e| e["digest"].as_str())
            .expect("amd64 manifest")
            .to_owned();
        m = serde_json::from_slice(&registry.manifest(name, &d).0).unwrap();
    }
    let layers = m["layers"].as_array().unwrap();
    (
        layers.iter().map(|l| l["size"].as_u64().unwrap()).sum(),
        layers.len(),
    )
}

/// A layer tar of `tree` with its absolute path as the entry names (no
/// parent directories above it), files until `cap` bytes. Returns the
/// tar's size.
fn tree_tar(tree: &Path, out: &Path, cap: u64) -> u64 {
    let mut b = tar::Builder::new(BufWriter::new(File::create(out).unwrap()));
    b.follow_symlinks(false);
    let mut total = 0u64;
    let mut stack: Vec<PathBuf> = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut kids: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => continue,
        };
        kids.sort();
        let rel = dir.strip_prefix("/").unwrap_or(&dir);
        let _ = b.append_path_with_name(&dir, rel);
        for k in kids.into_iter().rev() {
            let Ok(md) = std::fs::symlink_metadata(&k) else {
                continue;
            };
            if md.is_dir() {
                stack.push(k);
            } else if total < cap && (md.is_file() || md.file_type().is_symlink()) {
                let rel = k.strip_prefix("/").unwrap_or(&k);
                if b.append_path_with_name(&k, rel).is_ok() && md.is_file() {
                    total += md.len();
                }
            }
        }
    }
    b.into_inner().unwrap();
    std::fs::metadata(out).unwrap().len()
}
