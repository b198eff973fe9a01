//! Crashes and restarts around lazy pulling, with real containerd, a real
//! registry (behind `support::faultproxy`, which holds requests open so a
//! crash lands mid-flight) and real FUSE mounts:
//! - `kill -9` of rstargz-grpc during a lazy pull: a second pull completes,
//!   the snapshots are consistent and the image runs;
//! - `kill -9` during the background fetch: after the restart the layers
//!   are remounted, the chunks already on disk are reused and every file
//!   reads right;
//! - a containerd restart: the lazily pulled image still runs;
//! - the registry down while the daemon restarts: the layers are remounted
//!   from the cached footer and TOC, cached files read, uncached ones fail
//!   with EIO, and read again once the registry is back.
//!
//! (`kill -9` while containers read is in `e2e_rpull.rs`.)

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::faultproxy::{Fault, FaultProxy, Target};
use support::image;
use support::registry::Registry;

const FILES: usize = 24;
const FILE_SIZE: usize = 512 * 1024;

struct Stack {
    ctrd: Containerd,
    daemon: Daemon,
    proxy: FaultProxy,
    registry: Registry,
    /// The eStargz image, through the proxy.
    reference: String,
}

fn stack(config: &str) -> Stack {
    support::require_prerequisites();
    let mut registry = Registry::start();
    image::push_estargz(
        &mut registry,
        "crash",
        image::noise_files_layer("big", FILES, FILE_SIZE),
        &[],
    );
    let proxy = FaultProxy::start(&registry.host);
    let daemon = Daemon::start_with_config(Some(config));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let reference = format!("{}/crash/esgz:1", proxy.host);
    Stack {
        ctrd,
        daemon,
        proxy,
        registry,
        reference,
    }
}

/// `ctr run --rm REF ID cat /big/fNN`, checked against the file.
fn cat_big(ctrd: &Containerd, reference: &str, id: &str, i: usize) {
    let path = image::noise_file("big", i);
    let out = ctrd.run(&["--rm"], "stargz", reference, id, &["cat", &path]);
    let want = image::noise(i as u64, FILE_SIZE);
    let got = &out.stdout_bytes;
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        *got == want,
        "{path} read wrong in a container: {} bytes of {}, first difference at {first_diff:?}; \
         stderr: {}",
        got.len(),
        want.len(),
        out.stderr
    );
}

/// Snapshot keys and snapshot directories agree (nothing half-made is
/// left on either side), and every committed remote snapshot is mounted.
fn assert_consistent(s: &Stack) {
    // containerd may be removing snapshots meanwhile (`ctr run --rm`, its
    // garbage collector): agreement must be reached, not be instant.
    let mut last = (Vec::new(), Vec::new());
    let agreed = support::wait_for(Duration::from_secs(15), || {
        let keys = s.daemon.snapshot_keys();
        let dirs = s.daemon.snapshot_dirs();
        let same = keys.len() == dirs.len();
        last = (keys, dirs);
        same.then_some(())
    });
    assert!(
        agreed.is_some(),
        "snapshots {:?} vs directories {:?}",
        last.0,
        last.1
    );
    let remote = s
        .ctrd
        .committed_snapshots("stargz")
        .into_iter()
        .filter(|k| {
            s.ctrd.snapshot_info("stargz", k)["Labels"]
                .get("containerd.io/snapshot/remote")
                .is_some()
        })
        .count();
    let mounted = s.daemon.status_json()["layers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(remote, mounted, "remote snapshots vs mounted layers");
}

#[test]
fn kill9_during_a_lazy_pull_then_pull_again_and_run() {
    let config = "[layer]\nbackground_fetch = false\n\
                  [registry]\nrequest_timeout_ms = 60000\n";
    let mut s = stack(config);
    // Every range read stalls: the daemon is stuck inside Prepare, opening
    // the first layer, when it is killed.
    s.proxy
        .arm(Fault::StallMidBody, Target::RangedBlobGets, None);
    let (addr, ns, reference) = (
        s.ctrd.address.clone(),
        s.ctrd.namespace.clone(),
        s.reference.clone(),
    );
    let pull = std::thread::spawn(move || {
        support::run(
            Command::new("ctr-remote")
                .arg("--address")
                .arg(&addr)
                .arg("--namespace")
                .arg(&ns)
                .args(["images", "rpull", "--plain-http", "--snapshotter", "stargz"])
                .arg(&reference),
            Duration::from_secs(120),
        )
    });
    let stuck = support::wait_for(Duration::from_secs(60), || {
        (s.proxy.injected() > 0).then_some(())
    });
    assert!(stuck.is_some(), "the pull never reached the registry");
    std::thread::sleep(Duration::from_millis(300));
    s.proxy.clear();
    s.daemon.restart(true);
    let first = pull.join().expect("pull thread");
    eprintln!(
        "rpull across the kill: {}",
        match &first {
            Ok(o) => format!("{} {}", o.status, o.stderr.trim()),
            Err(e) => e.clone(),
        }
    );
    let took = s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
    eprintln!("containerd reconnected after {took:?}");
    eprintln!("snapshots now: {:?}", s.ctrd.snapshots("stargz"));
    let again = support::run(
        Command::new("ctr-remote")
            .arg("--address")
            .arg(&s.ctrd.address)
            .arg("--namespace")
            .arg(&s.ctrd.namespace)
            .args(["images", "rpull", "--plain-http", "--snapshotter", "stargz"])
            .arg(&s.reference),
        Duration::from_secs(120),
    )
    .expect("second rpull");
    assert!(
        again.status.success(),
        "second rpull: {}\ndaemon log:\n{}",
        again.stderr,
        s.daemon.log_tail()
    );
    cat_big(&s.ctrd, &s.reference, "after-kill", 3);
    assert_consistent(&s);
    s.daemon.assert_alive();
}

#[test]
fn kill9_during_background_fetch_reuses_the_disk_cache() {
    let config = "[layer]\nbackground_fetch = true\nbackground_concurrency = 1\n\
                  background_pause_ms = 0\nprefetch = false\nread_ahead_bytes = 0\n";
    let mut s = stack(config);
    // Slow the background fetch down so that the kill lands in the middle,
    // but not the tail reads of mounting.
    let (manifest, _) = s.registry.manifest("crash/esgz", "1");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest");
    let smallest = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .min()
        .expect("a layer");
    s.proxy.arm(
        Fault::Trickle {
            bytes: 64 * 1024,
            every: Duration::from_millis(100),
        },
        Target::RangedBlobGetsStartingBelow(smallest - (1 << 20)),
        None,
    );
    s.ctrd.rpull_stargz(&s.reference);
    let big_layer = |s: &Stack| -> Option<serde_json::Value> {
        let status = s.daemon.status_json();
        status["layers"]
            .as_array()?
            .iter()
            .find(|l| {
                Path::new(l["mountpoint"].as_str().unwrap_or(""))
                    .join("big/f00")
                    .exists()
            })
            .cloned()
    };
    // Wait until some of the big layer came in the background, not all.
    let midway = support::wait_for(Duration::from_secs(60), || {
        let l = big_layer(&s)?;
        let (got, total) = (
            l["stats"]["bytes_fetched"].as_u64()?,
            l["stats"]["blob_size"].as_u64()?,
        );
        (l["stats"]["chunks_background"].as_u64()? >= 2 && got < total / 2).then_some((got, total))
    });
    let (got, total) = midway.unwrap_or_else(|| {
        panic!(
            "background fetch never got midway: {:#}",
            s.daemon.status_json()
        )
    });
    eprintln!("killing with {got} of {total} bytes of the big layer fetched");
    s.proxy.clear();
    let served_before = s.registry.blob_bytes_served();
    s.daemon.restart(true);
    s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
    // Every file reads right, through the remounted layer.
    let mount = big_layer(&s).expect("big layer remounted");
    let mount = Path::new(mount["mountpoint"].as_str().unwrap()).to_path_buf();
    for i in 0..FILES {
        let p = mount.join(image::noise_file("big", i).trim_start_matches('/'));
        let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(b == image::noise(i as u64, FILE_SIZE), "{}", p.display());
    }
    let cache = &s.daemon.status_json()["cache"];
    eprintln!("cache after the restart: {cache:#}");
    assert!(
        cache["disk_hits"].as_u64().unwrap_or(0) > 0,
        "chunks fetched before the kill were not reused: {cache:#}"
    );
    assert_eq!(cache["disk_corrupt"].as_u64(), Some(0));
    let served_after = s.registry.blob_bytes_served() - served_before;
    eprintln!("registry served {served_after} bytes after the restart");
    cat_big(&s.ctrd, &s.reference, "after-bg-kill", FILES - 1);
    assert_consistent(&s);
}

#[test]
fn containerd_restart_keeps_lazily_pulled_images_running() {
    let config = "[layer]\nbackground_fetch = false\n";
    let mut s = stack(config);
    s.ctrd.rpull_stargz(&s.reference);
    cat_big(&s.ctrd, &s.reference, "before-restart", 0);
    s.ctrd.restart();
    s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
    // The image and its remote snapshots survived; a new container starts
    // and reads a file nothing read before.
    assert!(s.ctrd.image_names().contains(&s.reference));
    cat_big(&s.ctrd, &s.reference, "after-restart", 5);
    assert_consistent(&s);
    s.daemon.assert_alive();
}

#[test]
fn registry_down_while_the_daemon_restarts() {
    let config = "[layer]\nbackground_fetch = false\nread_ahead_bytes = 0\n\
                  [registry]\nmax_attempts = 2\nbackoff_base_ms = 10\n";
    let mut s = stack(config);
    s.ctrd.rpull_stargz(&s.reference);
    // A container reads file 0; file 1 is never read before the restart.
    cat_big(&s.ctrd, &s.reference, "before-outage", 0);
    let layers = s.daemon.status_json()["layers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);

    // Every request to the registry fails from now on.
    s.proxy.arm(Fault::Status(503), Target::BlobGets, None);
    s.daemon.restart(true);
    s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
    let status = s.daemon.status_json();
    let remounted = status["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        remounted.len(),
        layers,
        "not every layer was remounted with the registry down: {status:#}"
    );
    assert!(
        remounted.iter().all(|l| l["tail_source"] == "disk"),
        "footer and TOC must come from the disk cache: {status:#}"
    );
    let mount = remounted
        .iter()
        .map(|l| Path::new(l["mountpoint"].as_str().unwrap_or("")).to_path_buf())
        .find(|m| m.join("big/f00").exists())
        .expect("the big layer's mount");
    // What was read before comes from the disk cache...
    let f0 = std::fs::read(mount.join("big/f00")).expect("cached file");
    assert!(f0 == image::noise(0, FILE_SIZE));
    // ...what was not fails cleanly, without hanging...
    let e = std::fs::read(mount.join("big/f01")).expect_err("uncached read with no registry");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(s.proxy.injected() > 0);
    // ...and works as soon as the registry is back, no restart needed.
    s.proxy.clear();
    let f1 = std::fs::read(mount.join("big/f01")).expect("read after the outage");
    assert!(f1 == image::noise(1, FILE_SIZE));
    cat_big(&s.ctrd, &s.reference, "after-outage", 2);
    s.daemon.assert_alive();
}
