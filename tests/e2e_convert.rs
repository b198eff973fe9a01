//! `rstargz convert` end to end against a real `docker-registry` on
//! 127.0.0.1: the Debian test image is converted; every converted layer
//! passes `rstargz blob verify` against its TOC-digest annotation; the
//! image runs with containerd's own overlayfs snapshotter (it is still a
//! valid gzip image) and lazily through our daemon with
//! `ctr-remote images rpull` (every layer a FUSE mount). Converting twice
//! gives the same manifest digest; a missing tag or an unreachable source
//! fails clearly and pushes nothing.
//!
//! Needs root, containerd, runc, FUSE and the tools from `scripts/deps.sh`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::image;
use support::registry::{Registry, http_status};

const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";
const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
const SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
const DAEMON_CONFIG: &str = "[layer]\nbackground_fetch = false\n";

fn rstargz(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(args)
        .output()
        .expect("run rstargz")
}

/// Runs `rstargz convert --json` and returns the summary.
fn convert(src: &str, dst: &str) -> serde_json::Value {
    let t = Instant::now();
    let o = rstargz(&[
        "convert",
        "--plain-http",
        "--level",
        "6",
        "--json",
        src,
        dst,
    ]);
    assert!(
        o.status.success(),
        "rstargz convert failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("rstargz convert {src} {dst}: {:?}", t.elapsed());
    serde_json::from_slice(&o.stdout).expect("convert --json output")
}

#[test]
fn convert_debian_verify_run_overlayfs_and_lazily() {
    support::require_prerequisites();
    let layout = support::temp_dir("layout");
    let img = image::debian_image(layout.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(layout.path(), "1", "conv/debian");
    let dst = registry.reference("conv/debian-esgz", "1");

    let report = convert(&src, &dst);
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), img.layout.layers.len());

    // The manifest in the registry is what the report says, OCI, annotated.
    let (body, digest) = registry.manifest("conv/debian-esgz", "1");
    assert_eq!(digest, report["manifest_digest"].as_str().unwrap());
    assert_eq!(support::sha256_digest(&body), digest);
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let cfg: serde_json::Value = serde_json::from_slice(
        &registry.blob("conv/debian-esgz", m["config"]["digest"].as_str().unwrap()),
    )
    .unwrap();
    let blobs = support::temp_dir("conv-blobs");
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let d = l["digest"].as_str().unwrap();
        let toc = l["annotations"][TOC_ANNOTATION].as_str().unwrap();
        assert_eq!(toc, layers[i]["toc_digest"]);
        let usize_: u64 = l["annotations"][SIZE_ANNOTATION]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let p = blobs.path().join(format!("layer{i}"));
        registry.blob_to_file("conv/debian-esgz", d, &p);
        let o = rstargz(&["blob", "verify", "--toc-digest", toc, p.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "blob verify of layer {i} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        // The config's DiffID is the uncompressed stream's digest.
        let diff_id = support::interop::gzip_diff_id(&p);
        assert_eq!(cfg["rootfs"]["diff_ids"][i], diff_id.as_str());
        let plain = Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc {} | wc -c", p.display()))
            .output()
            .unwrap();
        let n: u64 = String::from_utf8_lossy(&plain.stdout)
            .trim()
            .parse()
            .unwrap();
        assert_eq!(n, usize_, "uncompressed-size annotation of layer {i}");
    }

    // Deterministic: a second conversion gives the same manifest digest.
    let dst2 = registry.reference("conv/debian-esgz", "2");
    let again = convert(&src, &dst2);
    assert_eq!(again["manifest_digest"], report["manifest_digest"]);
    // ...and the blobs were already there.
    for l in again["layers"].as_array().unwrap() {
        assert_eq!(l["uploaded"], false, "{l}");
    }
    // Converting the converted image keeps every layer.
    let dst3 = registry.reference("conv/debian-esgz", "3");
    let kept = convert(&dst, &dst3);
    assert_eq!(kept["manifest_digest"], report["manifest_digest"]);
    for l in kept["layers"].as_array().unwrap() {
        assert_eq!(l["kept"], true, "{l}");
    }

    let want = img.rootfs.read_file("/etc/debian_version").unwrap();
    let mut daemon = Daemon::start_with_config(Some(DAEMON_CONFIG));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });

    // A plain gzip image for containerd's own snapshotter.
    ctrd.ctr_timeout(
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            &dst,
        ],
        Duration::from_secs(300),
    );
    let id = support::unique_name("conv-ovl");
    let o = ctrd.run(
        &["--rm"],
        "overlayfs",
        &dst,
        &id,
        &["cat", "/etc/debian_version"],
    );
    assert_eq!(o.stdout.as_bytes(), &want[..]);
    ctrd.ctr(&["images", "rm", "--sync", &dst]);

    // Lazily, through our daemon.
    let rpull_took = ctrd.rpull_stargz(&dst);
    eprintln!("ctr-remote images rpull: {rpull_took:?}");
    daemon.assert_alive();
    let snaps = ctrd.snapshots("stargz");
    let committed = ctrd.committed_snapshots("stargz");
    assert_eq!(committed.len(), layers.len(), "{snaps:?}");
    for key in &committed {
        let info = ctrd.snapshot_info("stargz", key);
        assert!(
            info["Labels"].get(REMOTE_LABEL).is_some(),
            "snapshot {key} not prepared remotely: {info}\n{}",
            daemon.log_tail()
        );
    }
    let fuse = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - fuse.rstargz "))
        // Layers are bind mounts of `<root>/fuse/<slot>`; skip that mount itself.
        .filter(|l| l.split(' ').nth(3) != Some("/"))
        .filter(|l| l.contains(&*daemon.address.parent().unwrap().to_string_lossy()))
        .count();
    assert_eq!(fuse, layers.len(), "FUSE mounts of the layers");
    let id = support::unique_name("conv-lazy");
    let o = ctrd.run(
        &["--rm"],
        "stargz",
        &dst,
        &id,
        &["cat", "/etc/debian_version"],
    );
    assert_eq!(o.stdout.as_bytes(), &want[..]);
    let o = ctrd.run(
        &["--rm"],
        "stargz",
        &dst,
        &support::unique_name("conv-lazy"),
        &["cat", image::HELLO_PATH],
    );
    assert_eq!(o.stdout, image::HELLO_CONTENT);
    ctrd.ctr(&["images", "rm", "--sync", &dst]);
    daemon.assert_alive();
}

#[test]
fn missing_tag_or_unreachable_source_fails_and_pushes_nothing() {
    support::require_prerequisites();
    let registry = Registry::start();
    let host = registry.reference("x", "y");
    let host = host.split('/').next().unwrap().to_owned();

    let src = registry.reference("conv/absent", "nope");
    let dst = registry.reference("conv/out", "1");
    let o = rstargz(&["convert", "--plain-http", &src, &dst]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("resolving source") && err.contains("not found"),
        "{err}"
    );

    // Nothing listens on a fresh free port.
    let port = support::free_port();
    let src = format!("127.0.0.1:{port}/conv/debian:1");
    let o = rstargz(&["convert", "--plain-http", &src, &dst]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unreachable"), "{err}");

    // No manifest and no upload reached the registry.
    assert_eq!(
        http_status(&format!("http://{host}/v2/conv/out/manifests/1")),
        Some(404)
    );
    assert!(
        !registry
            .access_log()
            .iter()
            .any(|e| matches!(e.method.as_str(), "PUT" | "POST" | "PATCH")),
        "{:?}",
        registry.access_log()
    );
}
