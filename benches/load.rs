//! Load on the daemon (not a test): many containers started at once from
//! lazily pulled images, with the daemon's memory, threads and open file
//! descriptors sampled before, during and after.
//!
//! Real stack: `docker-registry`, containerd with `rstargz-grpc` as its
//! `stargz` proxy snapshotter, images converted by `rstargz convert` and
//! pulled with `ctr-remote images rpull`. Each image is the Debian rootfs
//! (shared) plus a layer of its own with 8 files of 256 KiB; every
//! container reads all of its image's files and exits.
//!
//! `cargo bench --bench load`: 5 images, 50 containers (10 per image) all
//! at once. `RSTARGZ_LOAD=images,containers` changes the sizes. Under
//! `cargo test --all-targets` it runs a smoke round (2 images, 4
//! containers). Either way it runs two rounds (pull, run, remove); after
//! each, once the images are removed and their layers unmounted, the
//! daemon's open fds other than sockets must be back at their level with
//! the FUSE mount up, and no chunk may be left in the memory cache: that is
//! checked, not just printed. RSS after round 2 is compared with round 1.

// The harness's own unit tests are compiled here without a harness.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::image::{self, Layer};
use support::registry::Registry;

const FILES: usize = 8;
const FILE_SIZE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_kb: u64,
    threads: u64,
    fds: u64,
    /// Bytes in the daemon's memory chunk cache (part of RSS, bounded by
    /// its budget); 0 where not sampled.
    cache: u64,
}

fn with_cache(mut u: Usage, daemon: &Daemon) -> Usage {
    u.cache = daemon.status_json()["cache"]["memory_bytes"]
        .as_u64()
        .unwrap_or(0);
    u
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Usage {
        rss_kb: field("VmRSS:"),
        threads: field("Threads:"),
        fds,
        cache: 0,
    }
}

/// What each open fd of `pid` points at.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn max(a: Usage, b: Usage) -> Usage {
    Usage {
        rss_kb: a.rss_kb.max(b.rss_kb),
        threads: a.threads.max(b.threads),
        fds: a.fds.max(b.fds),
        cache: a.cache.max(b.cache),
    }
}

/// Samples `pid` every 100 ms until stopped; returns the maxima.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<Mutex<Usage>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(Mutex::new(Usage::default()));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let u = usage(pid);
                let mut m = p.lock().unwrap();
                *m = max(*m, u);
                drop(m);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler { stop, peak, thread }
    }

    fn finish(self) -> Usage {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler");
        *self.peak.lock().unwrap()
    }
}

fn not_sockets(v: &[String]) -> Vec<String> {
    v.iter()
        .filter(|t| !t.starts_with("socket:"))
        .cloned()
        .collect()
}

struct Round {
    pull_secs: f64,
    run_secs: f64,
    mounted: usize,
    pulled: Usage,
    peak: Usage,
    after_runs: Usage,
    after: Usage,
    mounted_fds: Vec<String>,
    fds_after: Vec<String>,
}

/// Pulls every image, runs `containers` containers at once (each reads all
/// of its image's files), then removes the images.
fn round(
    ctrd: &Containerd,
    daemon: &Daemon,
    refs: &[String],
    containers: usize,
    n: usize,
) -> Round {
    let pid = daemon.pid();
    let images = refs.len();
    let t = Instant::now();
    for r in refs {
        ctrd.rpull_stargz(r);
    }
    let pull_secs = t.elapsed().as_secs_f64();
    let pulled = with_cache(usage(pid), daemon);
    // The daemon's FUSE mount (and its /dev/fuse fds) is set up with the
    // first remote layer and kept while it runs: the level to return to.
    let mounted_fds = fd_targets(pid);
    let sampler = Sampler::start(pid);
    let runc_root = ctrd.dir().join("runc").display().to_string();
    let t = Instant::now();
    let runs: Vec<_> = (0..containers)
        .map(|c| {
            let (address, ns, runc_root) = (
                ctrd.address.clone(),
                ctrd.namespace.clone(),
                runc_root.clone(),
            );
            let img = c % images;
            let reference = refs[img].clone();
            std::thread::spawn(move || {
                let script = format!("cat /img{img}/* | wc -c");
                support::run(
                    Command::new("ctr")
                        .arg("--address")
                        .arg(&address)
                        .arg("--namespace")
                        .arg(&ns)
                        .args(["run", "--rm", "--snapshotter", "stargz", "--runc-root"])
                        .arg(&runc_root)
                        .arg(&reference)
                        .arg(format!("load-{n}-{c}"))
                        .args(["sh", "-c", &script]),
                    Duration::from_secs(600),
                )
            })
        })
        .collect();
    let mut failed = Vec::new();
    for (c, h) in runs.into_iter().enumerate() {
        match h.join().expect("run thread") {
            Ok(o) if o.status.success() && o.stdout.trim() == (FILES * FILE_SIZE).to_string() => {}
            Ok(o) => failed.push(format!(
                "container {c}: {} {:?} {}",
                o.status, o.stdout, o.stderr
            )),
            Err(e) => failed.push(format!("container {c}: {e}")),
        }
    }
    let run_secs = t.elapsed().as_secs_f64();
    let peak = sampler.finish();
    let after_runs = with_cache(usage(pid), daemon);
    assert!(
        failed.is_empty(),
        "containers failed:\n{}",
        failed.join("\n")
    );
    let mounted = daemon.status_json()["layers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    for r in refs {
        ctrd.ctr(&["images", "rm", "--sync", r]);
    }
    let gone = support::wait_for(Duration::from_secs(30), || {
        ctrd.snapshots("stargz").is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "snapshots left: {:?}",
        ctrd.snapshots("stargz")
    );
    // Give blocking threads their keep-alive to exit.
    std::thread::sleep(Duration::from_secs(12));
    let after = with_cache(usage(pid), daemon);
    Round {
        pull_secs,
        run_secs,
        mounted,
        pulled,
        peak,
        after_runs,
        after,
        mounted_fds,
        fds_after: fd_targets(pid),
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (images, containers) = match std::env::var("RSTARGZ_LOAD") {
        Ok(v) => {
            let (a, b) = v.split_once(',').expect("RSTARGZ_LOAD=images,containers");
            (a.parse().expect("images"), b.parse().expect("containers"))
        }
        Err(_) if full => (5usize, 50usize),
        Err(_) => (2, 4),
    };
    support::require_prerequisites();
    let rootfs = support::rootfs::debian_rootfs();
    let mut registry = Registry::start();
    let mut refs = Vec::new();
    let layouts: Vec<_> = (0..images).map(|_| support::temp_dir("layout")).collect();
    for (i, layout) in layouts.iter().enumerate() {
        image::build_oci_layout(
            layout.path(),
            "1",
            &[
                Layer::TarFile(rootfs.path.clone()),
                Layer::Entries(image::noise_files_layer(
                    &format!("img{i}"),
                    FILES,
                    FILE_SIZE,
                )),
            ],
            &["/bin/sh"],
        );
        let src = registry.push_oci_layout(layout.path(), "1", &format!("load/src{i}"));
        let dst = registry.reference(&format!("load/esgz{i}"), "1");
        let o = Command::new(env!("CARGO_BIN_EXE_rstargz"))
            .args(["convert", "--plain-http", "--level", "1", &src, &dst])
            .output()
            .expect("rstargz convert");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        refs.push(dst);
    }

    let daemon = Daemon::start_with_config(Some("[layer]\nbackground_fetch = false\n"));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let pid = daemon.pid();
    std::thread::sleep(Duration::from_millis(500));
    let idle = with_cache(usage(pid), &daemon);
    let idle_fds = fd_targets(pid);

    // Two rounds: the first sets up what the daemon keeps while it runs
    // (its FUSE mount and workers, the holder link, the registry client);
    // the second must end where the first did, or something leaks per layer.
    let mut rounds = Vec::new();
    for n in 1..=2 {
        rounds.push(round(&ctrd, &daemon, &refs, containers, n));
    }
    println!(
        "\n{containers} containers from {images} lazily pulled images per round \
         ({} remote layers mounted)\n",
        rounds[0].mounted
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "round {}: pulls {:.2} s, all containers {:.2} s",
            i + 1,
            r.pull_secs,
            r.run_secs
        );
    }
    println!("\n| daemon | RSS MB | of which memory chunk cache MB | threads | open fds |");
    println!("|---|---|---|---|---|");
    let mut rows = vec![("idle".to_string(), idle)];
    for (i, r) in rounds.iter().enumerate() {
        let k = i + 1;
        rows.push((format!("round {k}: images pulled"), r.pulled));
        rows.push((format!("round {k}: peak while containers ran"), r.peak));
        rows.push((format!("round {k}: containers done"), r.after_runs));
        rows.push((
            format!("round {k}: images removed, layers unmounted"),
            r.after,
        ));
    }
    for (name, u) in rows {
        let cache = if u.cache > 0 {
            format!("{:.1}", u.cache as f64 / 1048576.0)
        } else {
            "-".to_string()
        };
        println!(
            "| {name} | {:.1} | {cache} | {} | {} |",
            u.rss_kb as f64 / 1024.0,
            u.threads,
            u.fds
        );
    }
    let (r1, r2) = (&rounds[0], &rounds[1]);
    println!(
        "\nRSS after round 2 vs after round 1: {:+.1} MB; memory chunk cache after each: {} / {} bytes",
        (r2.after.rss_kb as f64 - r1.after.rss_kb as f64) / 1024.0,
        r1.after.cache,
        r2.after.cache
    );
    // Sockets may stay: containerd's connection to the daemon (made on its
    // first call, after the idle sample) and pooled registry connections
    // (closed after the pool's idle timeout). Everything else (FUSE
    // devices, files, pipes) must be gone.
    println!(
        "open fds, sockets excluded: idle {}, with the FUSE mount {}, after round 1 {}, after round 2 {}",
        not_sockets(&idle_fds).len(),
        not_sockets(&r1.mounted_fds).len(),
        not_sockets(&r1.fds_after).len(),
        not_sockets(&r2.fds_after).len(),
    );
    for r in &rounds {
        assert_eq!(
            not_sockets(&r.fds_after),
            not_sockets(&r.mounted_fds),
            "open fds other than sockets did not return to their level before the containers \
             (idle: {idle_fds:?})"
        );
    }
    assert_eq!(r1.after.cache, 0, "removed layers left chunks in memory");
    assert_eq!(r2.after.cache, 0, "removed layers left chunks in memory");
    daemon.assert_empty();
}
