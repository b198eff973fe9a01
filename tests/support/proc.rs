//! Processes and mounts: commands with a timeout and readable failures,
//! background servers that die with the test, and the cleanup helpers the
//! guards' `Drop`s share.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    /// stdout, lossily decoded.
    pub stdout: String,
    /// stdout as bytes, for binary output.
    pub stdout_bytes: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` to completion, killing it after `timeout`. Output goes through
/// temporary files, so a chatty command can never block on a full pipe.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput, String> {
    let desc = describe(cmd);
    let out = tempfile::tempfile().map_err(|e| format!("{desc}: tempfile: {e}"))?;
    let err = tempfile::tempfile().map_err(|e| format!("{desc}: tempfile: {e}"))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(err.try_clone().map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("{desc}: cannot start: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{desc}: timed out after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    read_all(out),
                    read_all(err)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{desc}: wait: {e}")),
        }
    };
    let stdout_bytes = read_bytes(out);
    Ok(CmdOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stdout_bytes,
        stderr: read_all(err),
        elapsed: start.elapsed(),
    })
}

/// Like [`run`], but a non-zero exit is an error that quotes both streams.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput, String> {
    let desc = describe(cmd);
    let o = run(cmd, timeout)?;
    if o.status.success() {
        Ok(o)
    } else {
        Err(format!(
            "{desc}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            o.status, o.stdout, o.stderr
        ))
    }
}

fn read_all(f: File) -> String {
    String::from_utf8_lossy(&read_bytes(f)).into_owned()
}

fn read_bytes(mut f: File) -> Vec<u8> {
    use std::io::{Read, Seek};
    let mut s = Vec::new();
    let _ = f.rewind();
    let _ = f.read_to_end(&mut s);
    s
}

/// `prog arg1 arg2 ...` for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A long-running child (a server) whose output goes to `log`. It gets
/// SIGKILL if the thread that started it dies without stopping it, so a
/// crashed test leaves no server behind.
pub struct Server {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Server {
        // Append: a restarted server keeps its predecessor's log.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let desc = describe(cmd);
        // SAFETY: prctl is async-signal-safe and touches no Rust state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log fd"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({desc}): {e}"));
        Server {
            name,
            child,
            log: log.to_path_buf(),
        }
    }

    /// [`Server::spawn`], then waits (30 s at most) until it accepts
    /// connections on the unix socket `socket`; panics with its log if it
    /// exits or never listens.
    pub fn spawn_listening(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
        socket: &Path,
    ) -> Server {
        let mut server = Server::spawn(name, cmd, log);
        let up = super::wait_for(Duration::from_secs(30), || {
            if server.exited().is_some() {
                return Some(false);
            }
            std::os::unix::net::UnixStream::connect(socket)
                .ok()
                .map(|_| true)
        });
        if up != Some(true) {
            panic!(
                "{name} did not listen on {}; log:\n{}",
                socket.display(),
                server.log_tail(8000)
            );
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the server already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `max` bytes of the server's log, for failure messages.
    pub fn log_tail(&self, max: usize) -> String {
        let s = std::fs::read(&self.log).unwrap_or_default();
        let start = s.len().saturating_sub(max);
        String::from_utf8_lossy(&s[start..]).into_owned()
    }

    /// Panics with the log if the server died.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.exited() {
            panic!(
                "{} exited early ({st}); log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(8000)
            );
        }
    }

    /// SIGTERM, then SIGKILL after `grace`. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- {} log (tail of {}) ---\n{}\n--- end of {} log ---",
                self.name,
                self.log.display(),
                self.log_tail(6000),
                self.name
            );
        }
        // RSTARGZ_TEST_KEEP_LOGS=<dir> keeps every server log for later reading.
        if let Some(dir) = std::env::var_os("RSTARGZ_TEST_KEEP_LOGS") {
            let dir = PathBuf::from(dir);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(
                &self.log,
                dir.join(format!("{}-{}.log", self.name, self.pid())),
            );
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a pid; worst case ESRCH.
        unsafe { libc::kill(pid, sig) };
    }
}

/// All processes as `pid -> (ppid, argv)`.
pub fn process_table() -> HashMap<u32, (u32, Vec<String>)> {
    let mut t = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return t;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the last ')' (the command name may contain spaces).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let argv = std::fs::read(e.path().join("cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        t.insert(pid, (ppid, argv));
    }
    t
}

/// SIGKILLs every process whose argv satisfies `matches`, and all their
/// descendants. Returns the pids killed.
pub fn kill_trees(matches: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let table = process_table();
    let me = std::process::id();
    let mut roots: Vec<u32> = table
        .iter()
        .filter(|(pid, (_, argv))| **pid != me && matches(argv))
        .map(|(pid, _)| *pid)
        .collect();
    let mut all: HashSet<u32> = roots.iter().copied().collect();
    while let Some(p) = roots.pop() {
        for (child, (ppid, _)) in &table {
            if *ppid == p && all.insert(*child) {
                roots.push(*child);
            }
        }
    }
    for p in &all {
        signal(*p, libc::SIGKILL);
    }
    all.into_iter().collect()
}

/// Mount points at or below `dir`, deepest first (from mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir`. Returns what it unmounted.
pub fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    let mut done = Vec::new();
    // A few rounds: stacked mounts on one point need one umount each.
    for _ in 0..8 {
        let ms = mounts_under(dir);
        if ms.is_empty() {
            break;
        }
        for m in ms {
            if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                done.push(m);
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(
            super::unescape_mountinfo(r"/tmp/a\040b\134c"),
            r"/tmp/a b\c"
        );
        assert_eq!(super::unescape_mountinfo(r"/x\04"), r"/x\04");
    }
}
