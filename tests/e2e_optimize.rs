//! `rstargz optimize` end to end: a three-layer Debian Python image
//! (debootstrap minbase, python3-minimal, libpython3.11-stdlib) in a real
//! `docker-registry` on 127.0.0.1 is optimized for
//! `python3 -c 'import json; print("hi")'` run with runc. The result's
//! layers start with exactly the files the workload opened (the
//! interpreter, the loader's libraries, the json package) before the
//! `.prefetch.landmark`, in recorded order, and not the modules it never
//! imported; every layer verifies against its TOC digest; a saved
//! recording gives the same manifest again; the image runs lazily through
//! `rstargz-grpc`. A missing executable, a recording of another image and
//! an interrupt fail clearly, push nothing and leave no mount behind; a
//! workload that outlives `--period` is killed and what it opened so far
//! is prioritized (layers it read nothing from get the no-prefetch
//! landmark).
//!
//! Needs root, runc, containerd, FUSE, apt (for the Python .debs).

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::registry::{Registry, http_status};
use support::{image, python};

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
const PREFETCH: &str = ".prefetch.landmark";
const NO_PREFETCH: &str = ".no.prefetch.landmark";
const SCRIPT: &str = "import json; print(\"hi\")";

fn rstargz(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(args)
        .output()
        .expect("run rstargz")
}

/// Regular-file and symlink names before the landmark, in stream order,
/// and which landmark the layer has.
fn prioritized_of(blob: &Path) -> (Vec<String>, &'static str) {
    let f = std::fs::File::open(blob).unwrap();
    let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(f));
    let mut before = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let name = name
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_owned();
        if name == PREFETCH {
            return (before, PREFETCH);
        }
        if name == NO_PREFETCH {
            assert!(
                before.is_empty(),
                "entries before {NO_PREFETCH}: {before:?}"
            );
            return (before, NO_PREFETCH);
        }
        if !e.header().entry_type().is_dir() {
            before.push(name);
        }
        let mut sink = Vec::new();
        e.read_to_end(&mut sink).unwrap();
    }
    panic!("{} has no landmark", blob.display());
}

fn optimize(args: &[&str]) -> (serde_json::Value, String, Duration) {
    let t = Instant::now();
    let o = rstargz(args);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "rstargz optimize failed: {err}");
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("optimize --json output ({e}): {err}"));
    (v, err, took)
}

#[test]
fn optimize_python_prioritizes_what_it_read_and_runs_lazily() {
    support::require_prerequisites();
    let layout = support::temp_dir("opt-layout");
    let img = python::python_image(layout.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(layout.path(), "1", "opt/python");
    let dst = registry.reference("opt/python-esgz", "1");
    let work = support::temp_dir("opt-work");
    let rec = work.path().join("recording.json");
    let rec_s = rec.to_str().unwrap();

    let (report, stderr, took) = optimize(&[
        "optimize",
        "--plain-http",
        "--level",
        "6",
        "--json",
        "--record-out",
        rec_s,
        "--args",
        "python3",
        "--args",
        "-c",
        "--args",
        SCRIPT,
        &src,
        &dst,
    ]);
    eprintln!(
        "rstargz optimize took {took:?} (report: {}s, convert {}s); record: {}",
        report["seconds"],
        report["convert"]["seconds"],
        serde_json::to_string(&report["record"]).unwrap()
    );
    // The workload really ran (its stdout is forwarded to our stderr).
    assert!(stderr.lines().any(|l| l == "hi"), "{stderr}");
    assert_eq!(report["record"]["exit_code"], 0, "{report}");
    assert_eq!(report["record"]["timed_out"], false);
    assert_eq!(
        report["record"]["workload"]["args"],
        serde_json::json!(["python3", "-c", SCRIPT])
    );

    let recording: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let files: Vec<String> = recording["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    eprintln!("{} prioritized files: {files:?}", files.len());
    let rec_layers = recording["layers"].as_array().unwrap();
    assert_eq!(rec_layers.len(), 3);
    for (i, l) in rec_layers.iter().enumerate() {
        assert_eq!(l["digest"], img.layout.layers[i].digest.as_str());
    }
    let layer_files = |i: usize| -> Vec<String> {
        rec_layers[i]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect()
    };
    let pos = |f: &str| files.iter().position(|x| x == f);

    // What the workload really read, each in the layer that provides it.
    let (l1, l2, l3) = (layer_files(0), layer_files(1), layer_files(2));
    let has = |l: &[String], f: &str| l.iter().any(|x| x == f);
    assert!(has(&l1, "usr/lib/x86_64-linux-gnu/libc.so.6"), "{l1:?}");
    assert!(has(&l1, "etc/ld.so.cache"), "{l1:?}");
    assert!(has(&l2, "usr/bin/python3.11"), "{l2:?}");
    // `json` imports `re` (Python 3.11 freezes os, site and codecs into
    // the binary, so those are never opened).
    assert!(has(&l2, "usr/lib/python3.11/re/__init__.py"), "{l2:?}");
    assert!(l2.iter().any(|f| f.contains("libexpat.so")), "{l2:?}");
    for f in [
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/json/decoder.py",
        "usr/lib/python3.11/json/scanner.py",
        "usr/lib/python3.11/json/encoder.py",
    ] {
        assert!(has(&l3, f), "{f} not in layer 3's {l3:?}");
    }
    // The upper layer's copy of a file shadows the lower one.
    assert!(has(&l3, python::OVERRIDDEN), "{l3:?}");
    assert!(!has(&l2, python::OVERRIDDEN), "{l2:?}");
    // Never read: not prioritized.
    for f in [
        "usr/lib/python3.11/csv.py",
        "usr/lib/python3.11/json/tool.py",
        "usr/lib/python3.11/xml/dom/minidom.py",
        "usr/bin/bash",
        "etc/debian_version",
    ] {
        assert!(pos(f).is_none(), "{f} was prioritized but never read");
    }
    // First access order: the interpreter before the modules it imports.
    assert!(pos("usr/bin/python3.11") < pos(python::OVERRIDDEN));
    assert!(pos(python::OVERRIDDEN) < pos("usr/lib/python3.11/json/__init__.py"));
    assert!(pos("usr/lib/python3.11/json/__init__.py") < pos("usr/lib/python3.11/json/decoder.py"));

    // The pushed image: each layer starts with its recorded files, in
    // order, then the landmark; each verifies against its TOC digest.
    let (body, digest) = registry.manifest("opt/python-esgz", "1");
    assert_eq!(
        digest,
        report["convert"]["manifest_digest"].as_str().unwrap()
    );
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let blobs = support::temp_dir("opt-blobs");
    let mut counts = BTreeMap::new();
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        let d = l["digest"].as_str().unwrap();
        let toc = l["annotations"][TOC_ANNOTATION].as_str().unwrap();
        let p = blobs.path().join(format!("layer{i}"));
        registry.blob_to_file("opt/python-esgz", d, &p);
        let o = rstargz(&["blob", "verify", "--toc-digest", toc, p.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "blob verify of layer {i}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let (before, landmark) = prioritized_of(&p);
        assert_eq!(landmark, PREFETCH, "layer {i}");
        assert_eq!(
            before,
            layer_files(i),
            "layer {i}: entries before the landmark"
        );
        counts.insert(i, before.len());
        let _ = std::fs::remove_file(&p);
    }
    eprintln!("prioritized per layer: {counts:?}");

    // The recording alone reproduces the image, running nothing.
    let dst2 = registry.reference("opt/python-esgz", "2");
    let (again, stderr2, _) = optimize(&[
        "optimize",
        "--plain-http",
        "--level",
        "6",
        "--json",
        "--record-in",
        rec_s,
        &src,
        &dst2,
    ]);
    assert!(!stderr2.lines().any(|l| l == "hi"), "{stderr2}");
    assert!(again["record"]["workload"].is_null());
    assert_eq!(
        again["convert"]["manifest_digest"],
        report["convert"]["manifest_digest"]
    );

    // Optimizing the optimized (eStargz) image again records the same
    // files and rebuilds the same blobs: its TOC and landmarks are dropped
    // from the recording and from the layers, its headers are the same.
    let dst3 = registry.reference("opt/python-esgz", "3");
    let (re, _, _) = optimize(&[
        "optimize",
        "--plain-http",
        "--level",
        "6",
        "--json",
        "--args",
        "python3",
        "--args",
        "-c",
        "--args",
        SCRIPT,
        &dst,
        &dst3,
    ]);
    assert_eq!(re["record"]["per_layer"], report["record"]["per_layer"]);
    for l in re["convert"]["layers"].as_array().unwrap() {
        assert_eq!(l["kept"], false, "{l}");
    }
    assert_eq!(
        re["convert"]["manifest_digest"],
        report["convert"]["manifest_digest"]
    );

    // Lazily through our daemon.
    let mut daemon = Daemon::start_with_config(Some("[layer]\nbackground_fetch = false\n"));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    ctrd.rpull_stargz(&dst);
    assert_eq!(ctrd.committed_snapshots("stargz").len(), 3);
    let o = ctrd.run(
        &["--rm"],
        "stargz",
        &dst,
        &support::unique_name("opt-lazy"),
        &["python3", "-c", SCRIPT],
    );
    assert_eq!(o.stdout, "hi\n");
    ctrd.ctr(&["images", "rm", "--sync", &dst]);
    daemon.assert_alive();
    assert!(support::proc::mounts_under(work.path()).is_empty());
}

/// SIGINTs a child optimize if the test fails before it does.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        support::proc::signal(self.0, libc::SIGINT);
    }
}

fn assert_nothing_pushed(registry: &Registry, repo: &str) {
    let host = &registry.host;
    assert_eq!(
        http_status(&format!("http://{host}/v2/{repo}/manifests/1")),
        Some(404)
    );
    let writes: Vec<_> = registry
        .access_log()
        .into_iter()
        .filter(|e| matches!(e.method.as_str(), "PUT" | "POST" | "PATCH"))
        .filter(|e| e.path.contains(repo))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

/// Work dir holds nothing and nothing is mounted under it.
fn assert_clean(work: &Path) {
    assert!(
        support::proc::mounts_under(work).is_empty(),
        "{:?}",
        support::proc::mounts_under(work)
    );
    let left: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".owner")
        .collect();
    assert!(left.is_empty(), "left in the work dir: {left:?}");
}

#[test]
fn bad_workload_or_recording_fails_clearly_and_period_and_interrupt_stop_the_workload() {
    support::require_prerequisites();
    let layout = support::temp_dir("optf-layout");
    let img = image::debian_image(layout.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(layout.path(), "1", "optf/debian");
    let dst = registry.reference("optf/out", "1");
    let work = support::temp_dir("optf-work");
    let wd = work.path().to_str().unwrap();

    let o = rstargz(&[
        "optimize",
        "--plain-http",
        "--work-dir",
        wd,
        "--entrypoint",
        "/no/such/program",
        &src,
        &dst,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"/no/such/program\" not found in the image"),
        "{err}"
    );
    let o = rstargz(&[
        "optimize",
        "--plain-http",
        "--work-dir",
        wd,
        "--entrypoint",
        r#"["no-such-tool", "x"]"#,
        &src,
        &dst,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not found in the image (searched PATH="),
        "{err}"
    );
    assert_clean(work.path());

    // A recording made for other layers is refused before anything runs.
    let rec = support::temp_dir("optf-rec");
    let p = rec.path().join("r.json");
    std::fs::write(
        &p,
        serde_json::to_vec(&serde_json::json!({
            "version": 1, "source": "x", "source_manifest": "sha256:00",
            "args": [], "files": ["etc/passwd"],
            "layers": [{"index": 0, "digest": "sha256:1111", "files": ["etc/passwd"]}]
        }))
        .unwrap(),
    )
    .unwrap();
    let o = rstargz(&[
        "optimize",
        "--plain-http",
        "--record-in",
        p.to_str().unwrap(),
        &src,
        &dst,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not match the source image"), "{err}");
    assert_nothing_pushed(&registry, "optf/out");

    // Interrupted while the workload runs: container, mount and temp dirs
    // are gone, nothing is pushed. The sleep's length identifies it.
    let secs = (7000 + std::process::id() % 1000).to_string();
    let is_workload =
        |argv: &[String]| argv.first().is_some_and(|a| a == "sleep") && argv.get(1) == Some(&secs);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args([
            "optimize",
            "--plain-http",
            "--work-dir",
            wd,
            "--period",
            "120",
            "--entrypoint",
            "sleep",
            "--args",
            &secs,
            &src,
            &dst,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let running = support::wait_for(Duration::from_secs(120), || {
        let pt = support::proc::process_table();
        pt.values().any(|(_, argv)| is_workload(argv)).then_some(())
    });
    assert!(running.is_some(), "the workload never started");
    assert!(!support::proc::mounts_under(work.path()).is_empty());
    support::proc::signal(child.id(), libc::SIGINT);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "optimize ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    std::mem::forget(guard);
    assert!(!status.success());
    assert!(err.contains("interrupted"), "{err}");
    let pt = support::proc::process_table();
    assert!(
        !pt.values().any(|(_, argv)| is_workload(argv)),
        "the workload outlived optimize"
    );
    // runc's cgroups for the container are gone too.
    let prefix = format!("rstargz-optimize-{}-", child.id());
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
        .chain(std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    assert_clean(work.path());
    assert_nothing_pushed(&registry, "optf/out");

    // A workload still running after the period is killed; what it opened
    // until then is kept and the image is pushed.
    let dst = registry.reference("optf/timeout", "1");
    let (report, _, _) = optimize(&[
        "optimize",
        "--plain-http",
        "--level",
        "1",
        "--json",
        "--work-dir",
        wd,
        "--period",
        "2",
        "--entrypoint",
        "sleep",
        "--args",
        &secs,
        &src,
        &dst,
    ]);
    let r = &report["record"];
    assert_eq!(r["timed_out"], true, "{r}");
    assert!(r["exit_code"].is_null(), "{r}");
    assert_eq!(r["per_layer"][1], 0, "{r}");
    assert!(r["per_layer"][0].as_u64().unwrap() > 0, "{r}");
    let (body, _) = registry.manifest("optf/timeout", "1");
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let blobs = support::temp_dir("optf-blobs");
    for (i, want) in [(0, PREFETCH), (1, NO_PREFETCH)] {
        let p = blobs.path().join(format!("l{i}"));
        registry.blob_to_file(
            "optf/timeout",
            m["layers"][i]["digest"].as_str().unwrap(),
            &p,
        );
        let (before, landmark) = prioritized_of(&p);
        assert_eq!(landmark, want, "layer {i}");
        if i == 0 {
            assert!(before.iter().any(|f| f == "usr/bin/sleep"), "{before:?}");
        }
    }
    assert!(
        !support::proc::process_table()
            .values()
            .any(|(_, argv)| is_workload(argv)),
        "the workload outlived the period"
    );
    assert_clean(work.path());
    drop(img);
}
