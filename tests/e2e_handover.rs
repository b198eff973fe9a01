//! Running containers keep reading across daemon restarts: the FUSE
//! connection is parked with the holder process and taken over by the next
//! daemon (docs/restart.md, `src/fs/handover`).
//!
//! Real stack: `docker-registry` behind the fault proxy, containerd with
//! rstargz-grpc as the `stargz` proxy snapshotter, runc containers on
//! lazily mounted layers. Prefetch, background fetch and read-ahead are off,
//! so every file below is fetched from the registry when first read, through
//! the FUSE connection.

mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::daemon::Daemon;
use support::faultproxy::{Fault, FaultProxy, Target};
use support::image::{self, Entry};
use support::registry::Registry;

const FILES: usize = 8;
/// No read may wait longer than this for a daemon to come back.
const HANG: Duration = Duration::from_secs(60);

fn config(grace_secs: u64) -> String {
    format!(
        "[layer]\n\
         background_fetch = false\n\
         prefetch = false\n\
         read_ahead_bytes = 0\n\
         read_timeout_ms = 20000\n\
         [registry]\n\
         request_timeout_ms = 15000\n\
         [fs]\n\
         handover_grace_secs = {grace_secs}\n"
    )
}

/// Distinct printable content for file `i`.
fn content(i: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::new();
    while out.len() < 48 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("{x:016x}\n").as_bytes());
    }
    out
}

fn path(i: usize) -> String {
    format!("/h/f{i}")
}

fn layer() -> Vec<Entry> {
    let mut es = vec![Entry::Dir {
        path: "/h".into(),
        mode: 0o755,
    }];
    for i in 0..FILES {
        es.push(Entry::File {
            path: path(i),
            mode: 0o644,
            data: content(i),
        });
    }
    // Last in the blob: the tail read at mount holds only this, so the
    // files above are fetched when read.
    es.push(Entry::File {
        path: "/h/zz-filler".into(),
        mode: 0o644,
        data: image::noise(3, 1 << 20),
    });
    es
}

struct Stack {
    proxy: FaultProxy,
    daemon: Daemon,
    ctrd: Containerd,
    reference: String,
    _registry: Registry,
}

fn stack(grace_secs: u64) -> Stack {
    support::require_prerequisites();
    let mut registry = Registry::start();
    image::push_estargz(
        &mut registry,
        "handover",
        layer(),
        &["--chunk-size", "16384"],
    );
    let proxy = FaultProxy::start(&registry.host);
    let daemon = Daemon::start_with_config(Some(&config(grace_secs)));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let reference = format!("{}/handover/esgz:1", proxy.host);
    ctrd.rpull_stargz(&reference);
    Stack {
        proxy,
        daemon,
        ctrd,
        reference,
        _registry: registry,
    }
}

/// Starts `sleep 600` from the image, detached, and waits until it runs.
fn start_long_running(s: &Stack) -> String {
    let id = support::unique_name("long");
    s.ctrd.run(
        &["--detach"],
        "stargz",
        &s.reference,
        &id,
        &["sleep", "600"],
    );
    let up = support::wait_for(Duration::from_secs(30), || {
        s.ctrd
            .ctr(&["tasks", "ls"])
            .stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING"))
            .then_some(())
    });
    assert!(up.is_some(), "{id} never ran");
    id
}

/// `ctr tasks exec <id> cat <file>` on another thread; its result arrives
/// on the returned channel.
fn exec_cat(s: &Stack, id: &str, file: &str) -> mpsc::Receiver<Result<String, String>> {
    let (tx, rx) = mpsc::channel();
    let args: Vec<String> = [
        "tasks",
        "exec",
        "--exec-id",
        &support::unique_name("cat"),
        id,
        "cat",
        file,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let ctr = CtrHandle::of(&s.ctrd);
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = ctr.try_ctr(&args, HANG).map(|o| o.stdout);
        let _ = tx.send(r);
    });
    rx
}

/// What a thread needs to run `ctr` against the stack's containerd.
struct CtrHandle {
    address: std::path::PathBuf,
    namespace: String,
}

impl CtrHandle {
    fn of(c: &Containerd) -> Self {
        CtrHandle {
            address: c.address.clone(),
            namespace: c.namespace.clone(),
        }
    }

    fn try_ctr(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<support::proc::CmdOutput, String> {
        support::proc::run_ok(
            std::process::Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .arg("--namespace")
                .arg(&self.namespace)
                .args(args),
            timeout,
        )
    }
}

fn expect_content(r: Result<String, String>, i: usize, when: &str) {
    match r {
        Ok(out) => assert!(
            out.as_bytes() == content(i).as_slice(),
            "{when}: {} read {} wrong bytes",
            path(i),
            out.len()
        ),
        Err(e) => panic!("{when}: reading {} failed: {e}", path(i)),
    }
}

/// A long-running container that has read file 0, and the holder's pid.
fn running_after_a_first_read(s: &Stack) -> (String, u32) {
    let id = start_long_running(s);
    let holder = s.daemon.holder_pid().expect("a FUSE holder runs");
    expect_content(exec_cat(s, &id, &path(0)).recv().unwrap(), 0, "before");
    (id, holder)
}

/// A new container from the image reads file `i`.
fn new_container_reads(s: &Stack, i: usize) {
    let out = s.ctrd.run(
        &["--rm"],
        "stargz",
        &s.reference,
        &support::unique_name("new"),
        &["cat", &path(i)],
    );
    assert!(
        out.stdout.as_bytes() == content(i).as_slice(),
        "new container read {} bytes of {}, want {}: {:?}… stderr {:?}\n{}",
        out.stdout.len(),
        path(i),
        content(i).len(),
        &out.stdout[..out.stdout.len().min(80)],
        out.stderr,
        s.daemon.log_tail()
    );
}

fn stop_container(s: &Stack, id: &str) {
    let _ = s.ctrd.try_ctr(
        &["tasks", "kill", "--signal", "SIGKILL", id],
        Duration::from_secs(30),
    );
    let _ = support::wait_for(Duration::from_secs(20), || {
        s.ctrd
            .try_ctr(&["tasks", "delete", id], Duration::from_secs(20))
            .ok()
    });
    let _ = s
        .ctrd
        .try_ctr(&["containers", "delete", id], Duration::from_secs(20));
}

#[test]
fn a_running_container_reads_before_during_and_after_daemon_restarts() {
    let mut s = stack(120);
    // Before: a first read through the lazily mounted layer.
    let (id, holder) = running_after_a_first_read(&s);

    // During: the daemon is dead. The read waits in the kernel instead of
    // failing, and completes once a new daemon has taken over.
    s.daemon.kill9();
    let waiting = exec_cat(&s, &id, &path(1));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        waiting.try_recv().is_err(),
        "the read did not wait for the daemon (answered while none ran)"
    );
    let t = Instant::now();
    s.daemon.start_again();
    let up = t.elapsed();
    let r = waiting
        .recv_timeout(HANG)
        .expect("read finished after the restart");
    eprintln!(
        "waiting read answered {:?} after the restart began (daemon listening after {up:?})",
        t.elapsed()
    );
    expect_content(r, 1, "during a kill -9 restart");
    assert_eq!(
        s.daemon.holder_pid(),
        Some(holder),
        "same holder throughout"
    );
    assert!(
        s.daemon
            .log()
            .contains("took over the FUSE connection of the previous daemon"),
        "{}",
        s.daemon.log_tail()
    );

    // In flight: the daemon has read the request from the kernel and is
    // fetching (the registry stalls) when it is killed. The kernel resends
    // the request to the next daemon.
    s.proxy
        .arm(Fault::StallMidBody, Target::RangedBlobGets, Some(1));
    let injected = s.proxy.injected();
    let in_flight = exec_cat(&s, &id, &path(2));
    let stalled = support::wait_for(Duration::from_secs(30), || {
        (s.proxy.injected() > injected).then_some(())
    });
    assert!(stalled.is_some(), "the read never reached the registry");
    std::thread::sleep(Duration::from_millis(300));
    s.daemon.kill9();
    s.proxy.clear();
    assert!(in_flight.try_recv().is_err(), "answered by a dead daemon?");
    s.daemon.start_again();
    let r = in_flight
        .recv_timeout(HANG)
        .expect("in-flight read finished after the restart");
    expect_content(r, 2, "in flight at a kill -9");

    // A clean stop and start (an upgrade): same story.
    s.daemon.stop();
    let waiting = exec_cat(&s, &id, &path(3));
    std::thread::sleep(Duration::from_secs(1));
    s.daemon.start_again();
    expect_content(waiting.recv_timeout(HANG).unwrap(), 3, "across SIGTERM");

    // After: the running container and a new one both read.
    s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
    expect_content(exec_cat(&s, &id, &path(4)).recv().unwrap(), 4, "after");
    new_container_reads(&s, 5);
    assert_eq!(s.daemon.holder_pid(), Some(holder));
    stop_container(&s, &id);
}

#[test]
fn an_orphaned_connection_fails_reads_after_the_grace_period_instead_of_hanging() {
    let mut s = stack(3);
    let (id, holder) = running_after_a_first_read(&s);

    s.daemon.kill9();
    let t = Instant::now();
    let orphaned = exec_cat(&s, &id, &path(1));
    let r = orphaned
        .recv_timeout(HANG)
        .expect("the read ended (no hang)");
    let took = t.elapsed();
    assert!(r.is_err(), "read succeeded with no daemon: {r:?}");
    assert!(
        took >= Duration::from_secs(2),
        "failed before the grace period: {took:?}"
    );
    let gone = support::wait_for(Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{holder}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "the holder outlived its grace period");

    // The next daemon mounts afresh and new containers work.
    s.daemon.start_again();
    s.ctrd.wait_snapshotter("stargz", Duration::from_secs(60));
    new_container_reads(&s, 2);
    stop_container(&s, &id);
}

#[test]
fn with_handover_off_a_stop_unmounts_and_no_holder_runs() {
    support::require_prerequisites();
    let mut registry = Registry::start();
    image::push_estargz(
        &mut registry,
        "handover",
        layer(),
        &["--chunk-size", "16384"],
    );
    let mut daemon = Daemon::start_with_config(Some("[fs]\nhandover = false\n"));
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let reference = registry.reference("handover/esgz", "1");
    ctrd.rpull_stargz(&reference);
    assert!(!daemon.mounts().is_empty());
    assert_eq!(daemon.holder_pid(), None);
    daemon.stop();
    assert!(daemon.mounts().is_empty(), "{:?}", daemon.mounts());
    daemon.start_again();
}

#[test]
fn a_holder_killed_under_a_live_daemon_is_replaced() {
    let mut s = stack(120);
    let id = start_long_running(&s);
    let first = support::wait_for(Duration::from_secs(10), || s.daemon.holder_pid())
        .expect("a FUSE holder runs");
    support::proc::signal(first, libc::SIGKILL);
    // The daemon notices and parks the connection with a new holder.
    let second = support::wait_for(Duration::from_secs(20), || {
        s.daemon.holder_pid().filter(|p| *p != first)
    })
    .unwrap_or_else(|| panic!("no new holder; log:\n{}", s.daemon.log_tail()));
    assert_ne!(first, second);
    // And a crash after that still loses nothing.
    s.daemon.kill9();
    let waiting = exec_cat(&s, &id, &path(6));
    std::thread::sleep(Duration::from_secs(1));
    s.daemon.start_again();
    expect_content(
        waiting.recv_timeout(HANG).unwrap(),
        6,
        "after the holder was replaced",
    );
    assert_eq!(s.daemon.holder_pid(), Some(second));
    stop_container(&s, &id);
}

/// A one-layer image of 4 small files under `/<dir>`, converted.
fn small_image(registry: &mut Registry, dir: &str) -> String {
    let entries: Vec<Entry> = std::iter::once(Entry::Dir {
        path: format!("/{dir}"),
        mode: 0o755,
    })
    .chain((0..4).map(|i| Entry::File {
        path: format!("/{dir}/f{i}"),
        mode: 0o644,
        data: content(i),
    }))
    .collect();
    image::push_estargz_layers(registry, dir, vec![image::Layer::Entries(entries)], &[])
}

#[test]
fn concurrent_first_pulls_share_one_fuse_mount() {
    // The daemon's FUSE mount is made by the first remote layer; pulls that
    // arrive together must not each make (and then tear down) their own.
    support::require_prerequisites();
    let mut registry = Registry::start();
    let refs: Vec<String> = (0..4)
        .map(|i| small_image(&mut registry, &format!("c{i}")))
        .collect();
    let daemon = Daemon::start();
    let ctrd = Containerd::start(ContainerdOptions {
        stargz_proxy: Some(daemon.address.clone()),
    });
    let ctr = CtrHandle::of(&ctrd);
    std::thread::scope(|s| {
        for r in &refs {
            let ctr = &ctr;
            s.spawn(move || {
                let mut cmd = std::process::Command::new("ctr-remote");
                cmd.arg("--address")
                    .arg(&ctr.address)
                    .arg("--namespace")
                    .arg(&ctr.namespace)
                    .args([
                        "images",
                        "rpull",
                        "--plain-http",
                        "--snapshotter",
                        "stargz",
                        r,
                    ]);
                support::proc::run_ok(&mut cmd, Duration::from_secs(120))
                    .unwrap_or_else(|e| panic!("rpull {r}: {e}"));
            });
        }
    });
    let fuse = daemon.root.join("fuse");
    let stacked = support::proc::mounts_under(daemon.dir())
        .into_iter()
        .filter(|m| *m == fuse)
        .count();
    assert_eq!(stacked, 1, "FUSE mounts at {}", fuse.display());
    let mounts = daemon.mounts();
    assert_eq!(mounts.len(), refs.len(), "{mounts:?}");
    for i in 0..refs.len() {
        let m = mounts
            .iter()
            .find(|m| m.join(format!("c{i}/f0")).exists())
            .unwrap_or_else(|| panic!("no mount holds /c{i}: {mounts:?}"));
        for f in 0..4 {
            let got = std::fs::read(m.join(format!("c{i}/f{f}"))).unwrap();
            assert!(got == content(f), "/c{i}/f{f}");
        }
    }
}
