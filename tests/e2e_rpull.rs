//! Lazy-pull path end to end: the real Debian image is converted to eStargz
//! by Debian's `ctr-remote`, then pulled back with `ctr-remote image rpull`
//! through our daemon as containerd's `stargz` proxy snapshotter. rpull
//! passes `containerd.io/snapshot.ref` and the TOC-digest label on every
//! layer's `Prepare`, so the daemon may prepare layers remotely; either way
//! containers must see the right files, and after the image is removed GC
//! must leave no snapshot behind.
//!
//! Needs root, containerd, runc, FUSE and the tools from `scripts/deps.sh`.

mod support;

use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::image;
use support::interop;
use support::registry::Registry;

/// Label the snapshotter sets on a layer it prepared remotely (REFERENCE 1.9).
const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// Every layer must be prepared remotely (mounted lazily through FUSE).
const EXPECT_REMOTE: bool = true;

/// Background fetch off, so the bytes counted below are what the pull and
/// the containers needed, not what the daemon streamed in behind them.
const DAEMON_CONFIG: &str = "[layer]\nbackground_fetch = false\n";

#[test]
fn rpull_estargz_through_rstargz_then_run_and_gc() {
    support::require_prerequisites();
    let layout = support::temp_dir("layout");
    let img = image::debian_image(layout.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(layout.path(), "1", "e2e/debian");
    let mut daemon = Daemon::start_with_config(Some(DAEMON_CONFIG));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let blobs = support::temp_dir("esgz-blobs");
    let conv = interop::convert_to_estargz_with(
        &ctrd,
        &registry,
        &src,
        "e2e/debian-esgz",
        "1",
        blobs.path(),
        // Fast compression: this test is about the pull path, not the ratio.
        &["--estargz-compression-level", "1"],
    );
    let r = conv.reference.clone();

    // Forget both images so that rpull starts from an empty store.
    ctrd.ctr(&["images", "rm", "--sync", &src, &r]);
    assert!(ctrd.image_names().is_empty(), "{:?}", ctrd.image_names());

    let served_before = registry.blob_bytes_served();
    let t = Instant::now();
    ctrd.ctr_remote_timeout(
        &[
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &r,
        ],
        Duration::from_secs(300),
    );
    eprintln!("ctr-remote images rpull: {:?}", t.elapsed());
    daemon.assert_alive();

    let snaps = ctrd.snapshots("stargz");
    let committed: Vec<&String> = snaps
        .iter()
        .filter(|(_, k)| k == "Committed")
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        committed.len(),
        conv.layers.len(),
        "committed snapshots: {snaps:?}"
    );
    let mut remote = 0;
    for key in &committed {
        let info = ctrd.snapshot_info("stargz", key);
        let is_remote = info["Labels"].get(REMOTE_LABEL).is_some();
        eprintln!("snapshot {key}: prepared remotely = {is_remote}");
        remote += usize::from(is_remote);
    }
    if EXPECT_REMOTE {
        assert_eq!(remote, committed.len(), "layers not prepared remotely");
        // Each remote layer is a FUSE mount of ours under the daemon's root.
        let fuse: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| l.contains(" - fuse.rstargz "))
            .filter(|l| l.contains(&*daemon.address.parent().unwrap().to_string_lossy()))
            .map(str::to_string)
            .collect();
        assert_eq!(
            fuse.len(),
            committed.len(),
            "FUSE mounts of the layers: {fuse:#?}"
        );
    }
    // rpull's labels reached the daemon: it decided, and logged, for every
    // layer whether it was prepared remotely (`remote_snapshot_prepared`).
    let decisions = daemon.log().matches("remote_snapshot_prepared").count();
    assert!(
        decisions >= conv.layers.len(),
        "daemon logged {decisions} remote-prepare decisions for {} layers; log:\n{}",
        conv.layers.len(),
        daemon.log_tail()
    );

    let want = img
        .rootfs
        .read_file("/etc/debian_version")
        .expect("/etc/debian_version in the rootfs");
    let out = run_in(&ctrd, &r, &["cat", "/etc/debian_version"]);
    assert_eq!(out.as_bytes(), &want[..]);
    let out = run_in(&ctrd, &r, &["cat", image::HELLO_PATH]);
    assert_eq!(out, image::HELLO_CONTENT);
    let out = run_in(&ctrd, &r, &[image::SCRIPT_PATH]);
    assert_eq!(out.trim(), image::SCRIPT_OUTPUT);

    // How much of the image the registry served for rpull and the runs.
    let image_bytes: u64 = conv.layers.iter().map(|l| l.size).sum();
    let served = registry.blob_bytes_served() - served_before;
    eprintln!("blob bytes served for rpull + runs: {served} of {image_bytes} in the layers");
    if EXPECT_REMOTE {
        assert!(
            served < image_bytes / 2,
            "lazy pull fetched {served} of {image_bytes} layer bytes"
        );
    } else {
        assert!(
            served >= image_bytes,
            "a full pull fetches every layer: {served} < {image_bytes}"
        );
    }

    ctrd.ctr(&["images", "rm", "--sync", &r]);
    let gone = support::wait_for(Duration::from_secs(10), || {
        ctrd.snapshots("stargz").is_empty().then_some(())
    });
    assert!(gone.is_some(), "left: {:?}", ctrd.snapshots("stargz"));
    daemon.assert_alive();
    let keys = daemon.snapshot_keys();
    assert!(
        keys.is_empty(),
        "daemon still holds snapshots after GC: {keys:?}"
    );
    // ...and nothing of them is left on disk or mounted.
    let dirs = daemon.snapshot_dirs();
    assert!(
        dirs.is_empty(),
        "snapshot directories left on disk: {dirs:?}"
    );
    let mounts = daemon.mounts();
    assert!(
        mounts.is_empty(),
        "mounts left under the daemon's root: {mounts:?}"
    );
}

fn run_in(ctrd: &Containerd, r: &str, cmd: &[&str]) -> String {
    let id = support::unique_name("rpull");
    let t = Instant::now();
    let o = ctrd.run(&["--rm"], "stargz", r, &id, cmd);
    eprintln!("ctr run {cmd:?}: {:?}", t.elapsed());
    o.stdout
}
