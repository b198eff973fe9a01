//! End to end on the real stack: a registry on 127.0.0.1, a private
//! containerd, and a real Debian image built by debootstrap. The image is
//! pulled into a snapshotter, containers run from it, then the image is
//! removed and garbage collection must remove every snapshot.
//!
//! `rstargz_snapshotter_pull_run_gc` drives our daemon as containerd's
//! `stargz` proxy snapshotter; `builtin_overlayfs_pull_run_gc` runs the same
//! scenario on containerd's own overlayfs snapshotter, which proves the
//! harness and the image independently of our code.
//!
//! Needs root, containerd, runc and the tools from `scripts/deps.sh`.

mod support;

use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::image::{self, DebianImage};
use support::registry::Registry;

const NAME: &str = "e2e/debian";
const TAG: &str = "1";

struct Stack {
    // Dropped in this order: containerd, then the daemon, then the registry.
    ctrd: Containerd,
    daemon: Option<Daemon>,
    registry: Registry,
    image: DebianImage,
    reference: String,
    _layout_dir: tempfile::TempDir,
}

fn stack(with_daemon: bool) -> Stack {
    support::require_prerequisites();
    let layout_dir = support::temp_dir("layout");
    let t = Instant::now();
    let image = image::debian_image(layout_dir.path(), TAG);
    eprintln!("image layout (debootstrap cache + gzip): {:?}", t.elapsed());
    let mut registry = Registry::start();
    let t = Instant::now();
    let reference = registry.push_oci_layout(layout_dir.path(), TAG, NAME);
    eprintln!("skopeo push: {:?}", t.elapsed());
    let daemon = with_daemon.then(Daemon::start);
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: daemon.as_ref().map(|d| d.address.clone()),
    });
    Stack {
        ctrd,
        daemon,
        registry,
        image,
        reference,
        _layout_dir: layout_dir,
    }
}

/// Pull, list, run three commands, remove, GC, check nothing is left.
fn pull_run_gc(s: &mut Stack, snapshotter: &str) {
    let ctrd = &s.ctrd;
    let r = &s.reference;
    let t = Instant::now();
    ctrd.ctr_timeout(
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            r,
        ],
        Duration::from_secs(300),
    );
    eprintln!("ctr images pull ({snapshotter}): {:?}", t.elapsed());
    assert!(ctrd.image_names().contains(r), "pulled image not listed");

    // One committed snapshot per layer.
    let snaps = ctrd.snapshots(snapshotter);
    let committed = snaps.iter().filter(|(_, k)| k == "Committed").count();
    assert_eq!(
        committed,
        s.image.layout.layers.len(),
        "committed snapshots after pull: {snaps:?}"
    );

    // Layer 1: a file straight from the debootstrap rootfs.
    let want = s
        .image
        .rootfs
        .read_file("/etc/debian_version")
        .expect("/etc/debian_version in the rootfs");
    let out = run_in(ctrd, snapshotter, r, &["cat", "/etc/debian_version"]);
    assert_eq!(
        out.as_bytes(),
        &want[..],
        "/etc/debian_version in the container"
    );

    // Layer 2: a file, an executable script, and a whiteout of a layer-1 file.
    let out = run_in(ctrd, snapshotter, r, &["cat", image::HELLO_PATH]);
    assert_eq!(out, image::HELLO_CONTENT);
    let out = run_in(ctrd, snapshotter, r, &[image::SCRIPT_PATH]);
    assert_eq!(out.trim(), image::SCRIPT_OUTPUT);
    assert!(
        s.image.rootfs.read_file(image::WHITEOUT_PATH).is_some(),
        "{} should exist in layer 1",
        image::WHITEOUT_PATH
    );
    let probe = format!(
        "test -e {} && echo present || echo absent",
        image::WHITEOUT_PATH
    );
    let out = run_in(ctrd, snapshotter, r, &["sh", "-c", &probe]);
    assert_eq!(out.trim(), "absent", "whiteout in layer 2 not applied");

    // `--rm` removed the containers and their active snapshots.
    let snaps = ctrd.snapshots(snapshotter);
    assert!(
        snaps.iter().all(|(_, k)| k == "Committed"),
        "active snapshots left after `ctr run --rm`: {snaps:?}"
    );
    if let Some(d) = &s.daemon {
        // The backend itself holds the committed layers, named by chain ID.
        // (Removed containers' active snapshots may linger in the backend
        // until containerd's GC runs: metadata removal is lazy.)
        let keys = d.snapshot_keys();
        assert_eq!(
            keys.iter().filter(|k| k.contains("/sha256:")).count(),
            s.image.layout.layers.len(),
            "daemon's own snapshot list while the image exists: {keys:?}"
        );
    }

    // Removing the image with --sync waits for garbage collection, which
    // removes the layers' snapshots from the backend.
    let t = Instant::now();
    ctrd.ctr(&["images", "rm", "--sync", r]);
    eprintln!("ctr images rm --sync: {:?}", t.elapsed());
    assert!(!ctrd.image_names().contains(r));
    let left = support::wait_for(Duration::from_secs(10), || {
        let v = ctrd.snapshots(snapshotter);
        v.is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "snapshots left after image removal and GC: {:?}",
        ctrd.snapshots(snapshotter)
    );
}

/// `ctr run --rm` with a unique container id; returns stdout.
fn run_in(ctrd: &Containerd, snapshotter: &str, r: &str, cmd: &[&str]) -> String {
    let id = support::unique_name("e2e");
    let t = Instant::now();
    let o = ctrd.run(&["--rm"], snapshotter, r, &id, cmd);
    eprintln!("ctr run {cmd:?}: {:?}", t.elapsed());
    o.stdout
}

#[test]
fn builtin_overlayfs_pull_run_gc() {
    let mut s = stack(false);
    pull_run_gc(&mut s, "overlayfs");
}

#[test]
fn rstargz_snapshotter_pull_run_gc() {
    let mut s = stack(true);
    pull_run_gc(&mut s, "stargz");
    let daemon = s.daemon.as_mut().expect("daemon");
    daemon.assert_alive();
    // Ask the daemon itself (not containerd's metadata view): nothing of its
    // snapshots is left in its API, on disk or mounted.
    daemon.assert_empty();
    let _ = &s.registry;
}

/// Restarting the daemon, gracefully and with SIGKILL, must not disturb a
/// running container nor lose a snapshot, and new containers must start.
#[test]
fn rstargz_daemon_restart_keeps_containers_and_snapshots() {
    let mut s = stack(true);
    let r = s.reference.clone();
    s.ctrd.ctr_timeout(
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &r,
        ],
        Duration::from_secs(300),
    );
    let id = support::unique_name("long");
    s.ctrd
        .run(&["--detach"], "stargz", &r, &id, &["sleep", "600"]);
    for kill in [false, true] {
        let daemon = s.daemon.as_mut().expect("daemon");
        // Only what must survive: the layers and the running container's
        // snapshot. Snapshots of removed `--rm` containers may be garbage
        // collected at any moment.
        let keep = |keys: Vec<String>| {
            let mut k: Vec<String> = keys
                .into_iter()
                .filter(|k| k.contains("/sha256:") || k.ends_with(&format!("/{id}")))
                .collect();
            k.sort();
            k
        };
        let before = keep(daemon.snapshot_keys());
        assert_eq!(before.len(), 3, "layers + container snapshot: {before:?}");
        let t = Instant::now();
        daemon.restart(kill);
        eprintln!("daemon restart (kill={kill}): {:?}", t.elapsed());
        let reconnect = s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
        eprintln!("containerd reached the restarted daemon after {reconnect:?}");
        let after = keep(daemon.snapshot_keys());
        assert_eq!(
            before, after,
            "snapshots changed across a restart (kill={kill})"
        );

        let status = task_status(&s.ctrd, &id);
        assert_eq!(
            status, "RUNNING",
            "container after daemon restart (kill={kill})"
        );
        let exec_id = support::unique_name("exec");
        let out = s.ctrd.ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            &exec_id,
            &id,
            "cat",
            image::HELLO_PATH,
        ]);
        assert_eq!(
            out.stdout,
            image::HELLO_CONTENT,
            "exec after restart (kill={kill})"
        );

        let want = s
            .image
            .rootfs
            .read_file("/etc/debian_version")
            .expect("debian_version");
        let out = run_in(&s.ctrd, "stargz", &r, &["cat", "/etc/debian_version"]);
        assert_eq!(
            out.as_bytes(),
            &want[..],
            "new container after restart (kill={kill})"
        );
    }
    s.ctrd.ctr(&["tasks", "kill", "--signal", "SIGKILL", &id]);
    let stopped = support::wait_for(Duration::from_secs(20), || {
        (task_status(&s.ctrd, &id) == "STOPPED").then_some(())
    });
    assert!(stopped.is_some(), "task did not stop");
    s.ctrd.ctr(&["tasks", "delete", &id]);
    s.ctrd.ctr(&["containers", "delete", &id]);
    s.ctrd.ctr(&["images", "rm", "--sync", &r]);
    let gone = support::wait_for(Duration::from_secs(10), || {
        s.ctrd.snapshots("stargz").is_empty().then_some(())
    });
    assert!(gone.is_some(), "left: {:?}", s.ctrd.snapshots("stargz"));
    let daemon = s.daemon.as_mut().expect("daemon");
    daemon.assert_alive();
    assert_eq!(daemon.snapshot_keys(), Vec::<String>::new());
}

/// STATUS column of `ctr tasks ls` for task `id` (empty if absent).
fn task_status(ctrd: &Containerd, id: &str) -> String {
    ctrd.ctr(&["tasks", "ls"])
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&id))
        .and_then(|f| f.get(2).map(|s| s.to_string()))
        .unwrap_or_default()
}
