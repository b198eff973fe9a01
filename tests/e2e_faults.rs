//! Registry faults between rstargz and a real `docker-registry`, injected
//! by `support::faultproxy`, seen where a container sees them: reads of a
//! lazily pulled layer through its FUSE mount (and one through `ctr run`).
//!
//! For every fault the read either returns the right bytes (the fault was
//! retried, refreshed or worked around) or fails with EIO within the
//! configured timeouts; it never returns other bytes, the daemon stays up,
//! and once the fault clears the same read succeeds without a restart.
//! Each case reads a file no earlier case touched, so its chunks are not
//! cached yet (read-ahead, prefetch and background fetch are off).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::faultproxy::{Fault, FaultProxy, Target};
use support::image::{self, Entry};
use support::registry::Registry;

/// Chunk size of the converted image: files of three chunks each.
const CHUNK: usize = 16 * 1024;
const FILES: usize = 24;
const REQUEST_TIMEOUT_MS: u64 = 1500;
const READ_TIMEOUT_MS: u64 = 8000;
/// A failed read must have ended well within this (no hang).
const HANG: Duration = Duration::from_secs(30);

fn daemon_config() -> String {
    format!(
        "[layer]\n\
         background_fetch = false\n\
         prefetch = false\n\
         read_ahead_bytes = 0\n\
         read_timeout_ms = {READ_TIMEOUT_MS}\n\
         [registry]\n\
         request_timeout_ms = {REQUEST_TIMEOUT_MS}\n\
         connect_timeout_ms = 1000\n\
         max_attempts = 3\n\
         backoff_base_ms = 10\n\
         backoff_max_ms = 100\n\
         retry_after_cap_ms = 100\n"
    )
}

/// Printable, distinct, incompressible-ish content (hex of a xorshift
/// stream), so that `ctr run cat` output compares as text.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("{x:016x}").as_bytes());
    }
    out.truncate(len);
    out
}

fn file(i: usize) -> String {
    format!("/faults/f{i:02}")
}

/// `/faults/mr`: chunks A, S, B where S equals `/faults/shared`; with S
/// cached, reading `mr` needs two separate ranges, one multi-range request.
fn shared() -> Vec<u8> {
    content(1000, CHUNK)
}
fn multi_range_file() -> Vec<u8> {
    [content(1001, CHUNK), shared(), content(1002, CHUNK)].concat()
}

fn fault_layer() -> Vec<Entry> {
    let mut es = vec![Entry::Dir {
        path: "/faults".into(),
        mode: 0o755,
    }];
    for i in 0..FILES {
        es.push(Entry::File {
            path: file(i),
            mode: 0o644,
            data: content(i as u64, 3 * CHUNK),
        });
    }
    es.push(Entry::File {
        path: "/faults/shared".into(),
        mode: 0o644,
        data: shared(),
    });
    es.push(Entry::File {
        path: "/faults/mr".into(),
        mode: 0o644,
        data: multi_range_file(),
    });
    // Last in blob order and incompressible: the tail fetched at mount
    // (footer and TOC, 512 KiB) holds only this, so the files above are not
    // in it and every first read of them goes to the registry.
    es.push(Entry::File {
        path: "/faults/zz-filler".into(),
        mode: 0o644,
        data: image::noise(7, 2 << 20),
    });
    es
}

/// The directory where the fault layer is mounted: the FUSE mount of ours
/// below the daemon's directory that holds `/faults`.
fn fault_layer_mount(daemon: &Daemon) -> PathBuf {
    daemon
        .mounts()
        .into_iter()
        .find(|m| m.join("faults/f00").exists())
        .unwrap_or_else(|| panic!("no mount holds /faults: {:?}", daemon.mounts()))
}

/// Reads `path` on another thread; panics if that takes longer than
/// [`HANG`].
fn read_bounded(path: &Path) -> (std::io::Result<Vec<u8>>, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(p));
    });
    match rx.recv_timeout(HANG) {
        Ok(r) => (r, t.elapsed()),
        Err(_) => panic!("read of {} hung for {HANG:?}", path.display()),
    }
}

/// What a faulted read must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The right bytes: the fault was retried or worked around.
    Data,
    /// EIO.
    Eio,
}

struct Bench {
    proxy: FaultProxy,
    daemon: Daemon,
    mount: PathBuf,
}

impl Bench {
    /// Arms `fault`, reads `rel` (below the layer root) and checks the
    /// outcome against `expect` and `want`; then clears the fault and checks
    /// that the same read now succeeds.
    fn case(
        &mut self,
        name: &str,
        fault: Fault,
        times: Option<u64>,
        rel: &str,
        want: &[u8],
        expect: Expect,
    ) {
        let path = self.mount.join(rel.trim_start_matches('/'));
        let injected = self.proxy.injected();
        let seen_from = self.proxy.seen().len();
        self.proxy.arm(fault.clone(), Target::RangedBlobGets, times);
        let (r, took) = read_bounded(&path);
        self.proxy.clear();
        let hits = self.proxy.injected() - injected;
        eprintln!(
            "{name}: {fault:?} x{times:?} -> {} in {took:?} ({hits} injected)",
            match &r {
                Ok(b) if b == want => "right bytes".to_string(),
                Ok(b) => format!("WRONG BYTES ({} bytes)", b.len()),
                Err(e) => format!("error {e}"),
            }
        );
        for s in &self.proxy.seen()[seen_from..] {
            eprintln!("  {} {:?} {:?}", s.method, s.range, s.fault);
        }
        assert!(hits > 0, "{name}: the fault never hit a request");
        match (&r, expect) {
            (Ok(b), Expect::Data) => {
                assert!(b == want, "{name}: a read returned wrong bytes")
            }
            (Err(e), Expect::Eio) => assert_eq!(
                e.raw_os_error(),
                Some(libc::EIO),
                "{name}: expected EIO, got {e}"
            ),
            (Ok(b), Expect::Eio) => panic!(
                "{name}: expected EIO, read {} bytes (right: {})",
                b.len(),
                b == want
            ),
            (Err(e), Expect::Data) => panic!(
                "{name}: expected the data, got {e}; log:\n{}",
                self.daemon.log_tail()
            ),
        }
        if r.is_err() {
            // Failed reads end by timeout or attempts, not by hanging.
            let bound = Duration::from_millis(READ_TIMEOUT_MS) + Duration::from_secs(5);
            assert!(took < bound, "{name}: failing read took {took:?}");
        }
        // The fault has cleared: the same read now works, no restart.
        let seen_from = self.proxy.seen().len();
        let (again, _) = read_bounded(&path);
        for s in &self.proxy.seen()[seen_from..] {
            eprintln!("  again {} {:?} {:?}", s.method, s.range, s.fault);
        }
        match again {
            Ok(b) => assert!(b == want, "{name}: wrong bytes after the fault cleared"),
            Err(e) => panic!(
                "{name}: read still fails after the fault cleared: {e}; log:\n{}",
                self.daemon.log_tail()
            ),
        }
        self.daemon.assert_alive();
    }
}

#[test]
fn registry_faults_retry_fall_back_or_fail_cleanly_and_recover() {
    support::require_prerequisites();
    let rootfs = support::rootfs::debian_rootfs();
    let mut registry = Registry::start();
    let chunk = CHUNK.to_string();
    image::push_estargz(
        &mut registry,
        "faults",
        fault_layer(),
        &["--chunk-size", &chunk],
    );

    let proxy = FaultProxy::start(&registry.host);
    let daemon = Daemon::start_with_config(Some(&daemon_config()));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    // Pulled through the proxy: every lazy read goes through it.
    proxy.redirect_blobs(true);
    let reference = format!("{}/faults/esgz:1", proxy.host);
    ctrd.rpull_stargz(&reference);
    let mount = fault_layer_mount(&daemon);
    let mut b = Bench {
        proxy,
        daemon,
        mount,
    };
    // Redirects to blob storage that expire. The Debian layer resolved its
    // location during the pull, while redirects were on, so it reads from
    // the redirect URL it cached; once that URL answers 403 it is
    // re-resolved, and the read succeeds. Redirects are off afterwards:
    // the fault layer, first read below, then talks to the registry.
    let debian = b
        .daemon
        .mounts()
        .into_iter()
        .find(|m| m.join("etc/debian_version").exists())
        .expect("the Debian layer's mount");
    let rel = "usr/share/common-licenses/Apache-2.0";
    let want = rootfs
        .read_file(&format!("/{rel}"))
        .expect("license in rootfs");
    b.proxy.expire_redirects();
    let seen_before = b.proxy.seen().len();
    let (r, _) = read_bounded(&debian.join(rel));
    let expired: Vec<_> = b.proxy.seen()[seen_before..]
        .iter()
        .filter(|s| s.path.starts_with("/__redirected/"))
        .cloned()
        .collect();
    assert!(
        r.as_ref().is_ok_and(|d| d == &want),
        "read after the redirect expired: {:?}; log:\n{}",
        r.as_ref().map(Vec::len),
        b.daemon.log_tail()
    );
    assert!(
        !expired.is_empty(),
        "the expired URL was never tried: {:#?}",
        &b.proxy.seen()[seen_before..]
    );
    assert!(
        b.daemon.log().contains("re-resolved expired blob redirect"),
        "no re-resolution logged"
    );
    b.proxy.redirect_blobs(false);

    let mut next = 0..FILES;
    let mut fresh = || {
        let i = next.next().expect("enough fresh files");
        (file(i), content(i as u64, 3 * CHUNK))
    };

    // Server errors: a burst is retried, a lasting one is EIO.
    let (f, want) = fresh();
    b.case(
        "5xx burst",
        Fault::Status(503),
        Some(2),
        &f,
        &want,
        Expect::Data,
    );
    let (f, want) = fresh();
    b.case(
        "5xx lasting",
        Fault::Status(500),
        None,
        &f,
        &want,
        Expect::Eio,
    );
    // Connection resets.
    let (f, want) = fresh();
    b.case("reset once", Fault::Reset, Some(1), &f, &want, Expect::Data);
    let (f, want) = fresh();
    b.case("reset lasting", Fault::Reset, None, &f, &want, Expect::Eio);
    // A registry that stops answering mid-body: the request times out and
    // the retry succeeds.
    let (f, want) = fresh();
    b.case(
        "stall mid-body",
        Fault::StallMidBody,
        Some(1),
        &f,
        &want,
        Expect::Data,
    );
    // Trickling far slower than the request timeout allows.
    let (f, want) = fresh();
    b.case(
        "trickle",
        Fault::Trickle {
            bytes: 64,
            every: Duration::from_millis(100),
        },
        None,
        &f,
        &want,
        Expect::Eio,
    );
    // Lies about the range.
    let (f, want) = fresh();
    b.case(
        "wrong Content-Range once",
        Fault::WrongContentRange,
        Some(1),
        &f,
        &want,
        Expect::Data,
    );
    let (f, want) = fresh();
    b.case(
        "wrong Content-Range lasting",
        Fault::WrongContentRange,
        None,
        &f,
        &want,
        Expect::Eio,
    );
    // A 200 with the whole blob where a 206 was due: the range is cut out
    // of it (the blob is below `max_whole_body_bytes`).
    let (f, want) = fresh();
    b.case(
        "200 instead of 206",
        Fault::IgnoreRange,
        None,
        &f,
        &want,
        Expect::Data,
    );
    // Truncated bodies.
    let (f, want) = fresh();
    b.case(
        "truncated once",
        Fault::Truncate,
        Some(1),
        &f,
        &want,
        Expect::Data,
    );
    let (f, want) = fresh();
    b.case(
        "truncated lasting",
        Fault::Truncate,
        None,
        &f,
        &want,
        Expect::Eio,
    );
    // Flipped bytes fail verification: never handed out.
    let failures_before = verification_failures(&b.daemon);
    let (f, want) = fresh();
    b.case(
        "flipped byte once",
        Fault::FlipByte,
        Some(1),
        &f,
        &want,
        // The bad chunk is fetched again, once, before EIO.
        Expect::Data,
    );
    let (f, want) = fresh();
    b.case(
        "flipped byte lasting",
        Fault::FlipByte,
        None,
        &f,
        &want,
        Expect::Eio,
    );
    let failures = verification_failures(&b.daemon) - failures_before;
    assert!(failures >= 2, "verification failures counted: {failures}");
    assert!(
        b.daemon.log().contains("digest"),
        "no logged reason for the verification failure"
    );

    // A container sees the same: EIO, never the flipped bytes; then the
    // right file once the fault clears.
    // The first run reads what starting a container needs (its /etc files,
    // `cat` and libc), so that the armed fault meets only the file.
    let (ok, ..) = cat_in_container(&ctrd, &reference, "cat-warm", "/faults/shared");
    assert!(
        ok,
        "warm-up container run failed; log:\n{}",
        b.daemon.log_tail()
    );
    let (f, want) = fresh();
    b.proxy.arm(Fault::FlipByte, Target::RangedBlobGets, None);
    let out = cat_in_container(&ctrd, &reference, "cat-flipped", &f);
    b.proxy.clear();
    let (ok, stdout, stderr) = out;
    assert!(!ok, "cat of a file with flipped bytes succeeded");
    assert!(
        stderr.contains(&format!("cat: {f}")),
        "the failure was not cat's read of {f}: {stderr}"
    );
    assert!(
        want.starts_with(&stdout),
        "the container saw bytes that are not the file's"
    );
    let (ok, stdout, _) = cat_in_container(&ctrd, &reference, "cat-clean", &f);
    assert!(ok && stdout == want, "cat after the fault cleared");

    // Multi-range rejected: fall back to single ranges (and remember).
    let (shared_read, _) = read_bounded(&b.mount.join("faults/shared"));
    assert_eq!(shared_read.expect("read shared"), shared());
    let seen_before = b.proxy.seen().len();
    b.case(
        "multi-range 416",
        Fault::RejectMultiRange(416),
        None,
        "/faults/mr",
        &multi_range_file(),
        Expect::Data,
    );
    let seen = b.proxy.seen();
    let after: Vec<_> = seen[seen_before..]
        .iter()
        .filter(|s| s.range.is_some())
        .collect();
    assert!(
        after
            .iter()
            .any(|s| s.fault == Some(Fault::RejectMultiRange(416))),
        "no multi-range request was made: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|s| s.fault.is_none() && !s.range.as_deref().unwrap_or("").contains(',')),
        "no single-range fallback: {after:?}"
    );

    b.daemon.assert_alive();
}

fn verification_failures(daemon: &Daemon) -> u64 {
    let status = daemon.status_json();
    status["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["stats"]["verification_failures"].as_u64().unwrap_or(0))
        .sum()
}

/// `ctr run --rm REF ID cat PATH`: whether it succeeded, and its stdout
/// (also when it failed).
fn cat_in_container(
    ctrd: &Containerd,
    reference: &str,
    id: &str,
    path: &str,
) -> (bool, Vec<u8>, String) {
    let runc_root = ctrd.dir().join("runc");
    let o = support::proc::run(
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(&ctrd.address)
            .arg("--namespace")
            .arg(&ctrd.namespace)
            .args(["run", "--rm", "--snapshotter", "stargz", "--runc-root"])
            .arg(&runc_root)
            .args([reference, id, "cat", path]),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("ctr run: {e}"));
    eprintln!(
        "ctr run cat {path}: {} ({} bytes out) {}",
        o.status,
        o.stdout_bytes.len(),
        o.stderr.trim()
    );
    (o.status.success(), o.stdout_bytes, o.stderr)
}
