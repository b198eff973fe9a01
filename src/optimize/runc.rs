//! Runs the workload with runc directly: an OCI bundle whose rootfs is the
//! overlay mount; its own PID, mount, IPC, UTS and cgroup namespaces and a
//! network namespace with only loopback, up (see `netns`), so it reaches
//! nothing else; Docker's default capabilities. runc's state lives in our
//! temp dir, and the container is killed and deleted when its guard drops,
//! on every exit path.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::error::{OptimizeError, Result};
use super::record::Recorder;
use super::workload::Workload;

/// Bytes of runc's stderr kept to explain a failure.
const STDERR_TAIL: usize = 16 << 10;
/// How often events are drained while the workload runs.
const POLL: Duration = Duration::from_millis(20);
/// A stopping container is killed again this often.
const KILL_EVERY: Duration = Duration::from_millis(500);
/// After this long, `runc run` itself is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Docker's default capability set.
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The OCI runtime config for `w` on `rootfs`, joining the network
/// namespace pinned at `netns` (a new empty one when `None`).
pub fn spec(
    w: &Workload,
    rootfs: &Path,
    hostname: &str,
    netns: Option<&Path>,
) -> serde_json::Value {
    let network = match netns {
        Some(p) => json!({"type": "network", "path": p}),
        None => json!({"type": "network"}),
    };
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": w.args,
            "env": w.env,
            "cwd": w.cwd,
            "capabilities": {
                "bounding": CAPS, "effective": CAPS, "permitted": CAPS,
            },
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, network, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// How the run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit code of the workload (runc's), `None` when killed.
    pub exit_code: Option<i32>,
    /// Stopped because `period` passed.
    pub timed_out: bool,
    pub seconds: f64,
}

/// A created container, killed and deleted on drop.
struct Container {
    runc: PathBuf,
    root: PathBuf,
    id: String,
}

impl Container {
    fn runc(&self) -> Command {
        let mut c = Command::new(&self.runc);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    fn kill(&self) {
        let _ = self
            .runc()
            .args(["kill", "--all", &self.id, "KILL"])
            .status();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
        let _ = self.runc().args(["delete", "--force", &self.id]).status();
        remove_cgroups(&self.id);
    }
}

/// Removes cgroups named after the container (cgroupfs driver: `<id>`
/// under each v1 hierarchy, or under the v2 root) that runc left behind
/// when the container was stopped while it was still being created.
/// `rmdir` only removes empty cgroups; the id is ours alone.
fn remove_cgroups(id: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let _ = std::fs::remove_dir(root.join(id));
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir(e.path().join(id));
        }
    }
}

/// Kills the container until `runc run` exits: a kill that races with
/// the container's creation finds nothing to kill, so it is repeated; after
/// [`STOP_GRACE`] runc itself is killed.
fn stop(child: &mut Child, guard: &Container) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        guard.kill();
        let step = Instant::now();
        while step.elapsed() < KILL_EVERY {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(POLL);
        }
        if t.elapsed() >= STOP_GRACE {
            let _ = child.kill();
            return child.wait().ok();
        }
    }
}

/// What [`run`] needs.
pub struct RunSpec<'a> {
    pub runc: &'a Path,
    /// Directory for the bundle and runc's state (private, empty).
    pub dir: &'a Path,
    pub id: &'a str,
    pub rootfs: &'a Path,
    pub workload: &'a Workload,
    pub period: Duration,
    /// A pinned network namespace to join (see `netns`).
    pub netns: Option<&'a Path>,
}

/// Runs the workload until it exits or `period` passes, draining the
/// recorder meanwhile. The workload's stdout and stderr go to our stderr.
pub fn run(s: &RunSpec<'_>, recorder: &mut Recorder, cancel: &AtomicBool) -> Result<Outcome> {
    let bundle = s.dir.join("bundle");
    let state = s.dir.join("state");
    for d in [&bundle, &state] {
        std::fs::create_dir_all(d).map_err(|e| OptimizeError::io(d, e))?;
    }
    let cfg = spec(s.workload, s.rootfs, "rstargz-optimize", s.netns);
    let cfg_path = bundle.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_vec_pretty(&cfg).unwrap_or_default(),
    )
    .map_err(|e| OptimizeError::io(&cfg_path, e))?;

    let started = Instant::now();
    let guard = Container {
        runc: s.runc.to_owned(),
        root: state.clone(),
        id: s.id.to_owned(),
    };
    let mut child = Command::new(s.runc)
        .arg("--root")
        .arg(&state)
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(s.id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches only us, and
        // we stop the container ourselves.
        .process_group(0)
        .spawn()
        .map_err(|e| OptimizeError::Runtime(format!("starting {}: {e}", s.runc.display())))?;
    let tail = Arc::new(Mutex::new(Vec::new()));
    let forwarders = forward_output(&mut child, &tail);

    let mut timed_out = false;
    let status = loop {
        recorder.drain()?;
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(OptimizeError::Runtime(format!("waiting for runc: {e}"))),
        }
        if cancel.load(Ordering::Relaxed) {
            stop(&mut child, &guard);
            return Err(OptimizeError::Interrupted);
        }
        if started.elapsed() >= s.period {
            // Opens until the end still count: drain once more, then stop.
            timed_out = true;
            recorder.drain()?;
            match stop(&mut child, &guard) {
                Some(st) => break st,
                None => return Err(OptimizeError::Runtime("runc did not exit".into())),
            }
        }
        std::thread::sleep(POLL);
    };
    recorder.drain()?;
    drop(guard);
    // The pipes close when the container's processes are gone; a process
    // that escaped with them open must not hang us.
    let deadline = Instant::now() + Duration::from_secs(2);
    while forwarders.iter().any(|f| !f.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    let tail =
        String::from_utf8_lossy(&tail.lock().map(|t| t.clone()).unwrap_or_default()).into_owned();
    let code = status.code();
    if !timed_out
        && code != Some(0)
        && (tail.contains("unable to start container process") || tail.contains("runc run failed"))
    {
        let line = tail
            .lines()
            .rev()
            .find(|l| l.contains("runc run failed") || l.contains("unable to start"))
            .unwrap_or(tail.trim());
        return Err(OptimizeError::Runtime(format!(
            "the workload did not start: {}",
            line.trim()
        )));
    }
    Ok(Outcome {
        exit_code: if timed_out { None } else { code },
        timed_out,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn forward_output(
    child: &mut Child,
    tail: &Arc<Mutex<Vec<u8>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut hs = Vec::new();
    let streams: Vec<(Box<dyn Read + Send>, bool)> = [
        child
            .stdout
            .take()
            .map(|s| (Box::new(s) as Box<dyn Read + Send>, false)),
        child
            .stderr
            .take()
            .map(|s| (Box::new(s) as Box<dyn Read + Send>, true)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (mut r, keep) in streams {
        let tail = Arc::clone(tail);
        hs.push(std::thread::spawn(move || {
            use std::io::Write;
            let mut buf = [0u8; 8192];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let _ = std::io::stderr().write_all(&buf[..n]);
                if keep && let Ok(mut t) = tail.lock() {
                    t.extend_from_slice(&buf[..n]);
                    let excess = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..excess);
                }
            }
        }));
    }
    hs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_the_workload_and_isolates_the_network() {
        let w = Workload {
            args: vec!["python3".into(), "-c".into(), "pass".into()],
            env: vec!["PATH=/usr/bin".into()],
            cwd: "/srv".into(),
        };
        let s = spec(&w, Path::new("/x/merged"), "h", Some(Path::new("/x/net")));
        assert_eq!(s["process"]["args"][2], "pass");
        assert_eq!(s["process"]["cwd"], "/srv");
        assert_eq!(s["process"]["terminal"], false);
        assert_eq!(s["root"]["path"], "/x/merged");
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && ns.contains(&"pid") && ns.contains(&"mount"));
        assert_eq!(s["linux"]["namespaces"][1]["path"], "/x/net");
    }
}
