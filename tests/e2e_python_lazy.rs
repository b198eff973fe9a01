//! Lazy pulling pays off: a three-layer Debian Python image converted by
//! `rstargz convert` (no prioritized files), pulled with `ctr-remote images
//! rpull` through `rstargz-grpc`, runs `python3 -c 'print(1)'` while the
//! registry serves less than 30% of the image's bytes.

mod support;

use std::process::Command;

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::registry::Registry;

#[test]
fn python_print_fetches_under_30_percent_of_the_image() {
    support::require_prerequisites();
    let layout = support::temp_dir("layout");
    support::python::python_image(layout.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(layout.path(), "1", "lazy/python");
    let dst = registry.reference("lazy/python-esgz", "1");
    let o = Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(["convert", "--plain-http", "--json", &src, &dst])
        .output()
        .expect("rstargz convert");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json");
    let image_bytes: u64 = report["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size_out"].as_u64().expect("layer size"))
        .sum();

    // Background fetch off: only what the pull and the run need.
    let daemon = Daemon::start_with_config(Some("[layer]\nbackground_fetch = false\n"));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let before = registry.blob_bytes_served();
    ctrd.rpull_stargz(&dst);
    let out = ctrd.run(
        &["--rm"],
        "stargz",
        &dst,
        "py",
        &["python3", "-c", "print(1)"],
    );
    assert_eq!(out.stdout.trim(), "1");
    let layers = daemon.status_json()["layers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(layers, 3, "every layer is mounted remotely");
    let served = registry.blob_bytes_served() - before;
    let pct = served as f64 * 100.0 / image_bytes as f64;
    eprintln!("python3 -c 'print(1)': registry served {served} of {image_bytes} bytes ({pct:.1}%)");
    assert!(pct < 30.0, "fetched {pct:.1}% of the image");
}
