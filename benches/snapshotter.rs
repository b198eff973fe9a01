//! Benchmark of the `rstargz-grpc` daemon over its unix socket (not a test).
//!
//! Starts the real binary on a temporary root, grows it to 1 000 and then
//! 10 000 committed snapshots (chains of 10 layers), and at each size
//! measures ops/s and p50/p99 latency of Prepare, Commit, Mounts and Stat
//! issued one at a time by one client; then idle RSS and thread count.
//!
//! `cargo bench --bench snapshotter` (root needed only for the directories
//! the daemon creates). `RSTARGZ_BENCH_SIZES=200,2000` changes the sizes.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rstargz::proto::snapshots::snapshots_client::SnapshotsClient;
use rstargz::proto::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, StatSnapshotRequest,
};
use tonic::transport::Channel;

struct Samples {
    name: &'static str,
    lat: Vec<Duration>,
    wall: Duration,
}

impl Samples {
    fn new(name: &'static str) -> Self {
        Samples {
            name,
            lat: Vec::new(),
            wall: Duration::ZERO,
        }
    }
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.lat.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i]
    }
    fn row(&self, size: usize) -> String {
        format!(
            "| {:>6} | {:<7} | {:>6} | {:>9.0} | {:>8.3} | {:>8.3} |",
            size,
            self.name,
            self.lat.len(),
            self.lat.len() as f64 / self.wall.as_secs_f64(),
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
        )
    }
}

async fn timed<T>(s: &mut Samples, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let out = f.await;
    let d = t.elapsed();
    s.lat.push(d);
    s.wall += d;
    out
}

fn proc_status(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

fn start(dir: &Path) -> Child {
    let socket = dir.join("s.sock");
    std::fs::write(dir.join("none.toml"), "").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rstargz-grpc"))
        .arg("--address")
        .arg(&socket)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--config")
        .arg(dir.join("none.toml"))
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start rstargz-grpc");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("daemon exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Grows the store to `target` committed snapshots; records Prepare and
/// Commit latencies of the snapshots it adds.
async fn grow(
    c: &mut SnapshotsClient<Channel>,
    from: usize,
    target: usize,
    prep: &mut Samples,
    commit: &mut Samples,
) {
    for i in from..target {
        let parent = if i % 10 == 0 {
            String::new()
        } else {
            format!("layer-{}", i - 1)
        };
        let key = format!("extract-{i}");
        let req = PrepareSnapshotRequest {
            snapshotter: String::new(),
            key: key.clone(),
            parent,
            labels: HashMap::new(),
        };
        timed(prep, c.prepare(req)).await.expect("prepare");
        let req = CommitSnapshotRequest {
            snapshotter: String::new(),
            name: format!("layer-{i}"),
            key,
            labels: HashMap::new(),
        };
        timed(commit, c.commit(req)).await.expect("commit");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, and then a small smoke run is enough.
    let full = std::env::args().any(|a| a == "--bench");
    let default_sizes = if full { vec![1_000, 10_000] } else { vec![30] };
    let sizes: Vec<usize> = std::env::var("RSTARGZ_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or(default_sizes);
    let lookups = if full { 5_000 } else { 200 };
    let dir = tempfile::Builder::new()
        .prefix("rstargz-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut child = start(dir.path());
    let pid = child.id();
    let (rss0, thr0) = proc_status(pid);
    let mut c = rstargz::snapshotter::client::connect(dir.path().join("s.sock"))
        .await
        .unwrap();

    // 100 active containers on top of layer chains, for Mounts.
    let mut rows = Vec::new();
    let mut have = 0;
    let mut after_load = (0, 0);
    for &size in &sizes {
        let mut prep = Samples::new("Prepare");
        let mut commit = Samples::new("Commit");
        grow(&mut c, have, size, &mut prep, &mut commit).await;
        have = size;
        let actives: Vec<String> = (0..size.min(100))
            .map(|j| format!("ctr-{size}-{j}"))
            .collect();
        for (j, key) in actives.iter().enumerate() {
            let req = PrepareSnapshotRequest {
                snapshotter: String::new(),
                key: key.clone(),
                parent: format!("layer-{}", (j * 97) % size),
                labels: HashMap::new(),
            };
            c.prepare(req).await.expect("prepare container");
        }
        let mut mounts = Samples::new("Mounts");
        let mut stat = Samples::new("Stat");
        let mut x: usize = 12345;
        for i in 0..lookups {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = actives[i % actives.len()].clone();
            timed(
                &mut mounts,
                c.mounts(MountsRequest {
                    snapshotter: String::new(),
                    key,
                }),
            )
            .await
            .expect("mounts");
            let key = format!("layer-{}", (x >> 33) % size);
            timed(
                &mut stat,
                c.stat(StatSnapshotRequest {
                    snapshotter: String::new(),
                    key,
                }),
            )
            .await
            .expect("stat");
        }
        for s in [&prep, &commit, &mounts, &stat] {
            rows.push(s.row(size));
        }
        after_load = proc_status(pid);
    }
    // Let the blocking pool's idle threads expire (keep-alive 10 s).
    let idle_wait = if full { 12 } else { 0 };
    tokio::time::sleep(Duration::from_secs(idle_wait)).await;
    let (rss1, thr1) = proc_status(pid);

    println!("| snapshots | op | n | ops/s | p50 ms | p99 ms |");
    println!("|--------|---------|--------|-----------|----------|----------|");
    for r in rows {
        println!("{r}");
    }
    println!();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average during the run: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| daemon | VmRSS | Threads |");
    println!("|---|---|---|");
    println!("| idle at start | {} kB | {} |", rss0, thr0);
    println!(
        "| right after load | {} kB | {} |",
        after_load.0, after_load.1
    );
    println!("| idle after load ({idle_wait} s) | {rss1} kB | {thr1} |");
    // Let the runtime close the connection, or shutdown waits for it.
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    // Bounded: a daemon that does not exit must not hang the run.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("daemon did not exit 20 s after SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}
