//! A private containerd: its own root, state, sockets and plugin dirs, the
//! CRI plugin off, and optionally our daemon as the `stargz` proxy
//! snapshotter. Nothing it uses overlaps a system containerd or another
//! test's instance.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::proc::{self, CmdOutput, Server};
use super::{run, run_ok, temp_dir, wait_for};

/// Default timeout of a `ctr` call; pulls and runs pass their own.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Containerd {
    /// The gRPC socket (`ctr --address`).
    pub address: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    /// Namespace every `ctr` call uses.
    pub namespace: String,
    server: Option<Server>,
    /// Put first on containerd's `PATH` (see [`Containerd::start_with_proxies`]).
    path_first: Option<PathBuf>,
    dir: tempfile::TempDir,
}

/// How to start a [`Containerd`].
#[derive(Default)]
pub struct ContainerdOptions {
    /// Socket of a snapshotter to register as `[proxy_plugins.stargz]`.
    pub stargz_proxy: Option<PathBuf>,
}

impl Containerd {
    pub fn start(opts: ContainerdOptions) -> Containerd {
        let proxies: Vec<(String, PathBuf)> = opts
            .stargz_proxy
            .map(|s| ("stargz".to_string(), s))
            .into_iter()
            .collect();
        Self::start_with_proxies(&proxies, None)
    }

    /// A containerd with each `(name, socket)` registered as a proxy
    /// snapshotter (the start-up benchmark measures a snapshotter given by
    /// name and socket). `path_first`: a directory put first on
    /// containerd's `PATH` (and so its shims'), e.g. for a `runc` wrapper.
    pub fn start_with_proxies(
        proxies: &[(String, PathBuf)],
        path_first: Option<&Path>,
    ) -> Containerd {
        let dir = temp_dir("containerd");
        let d = dir.path();
        let address = d.join("containerd.sock");
        let root = d.join("root");
        let state = d.join("state");
        for p in [&root, &state, &d.join("opt")] {
            std::fs::create_dir_all(p).expect("create containerd dirs");
        }
        let mut toml = format!(
            "version = 2\n\
             root = {root:?}\n\
             state = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {addr:?}\n\
             [ttrpc]\n  address = {ttrpc:?}\n\
             [debug]\n  address = \"\"\n  level = \"debug\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
            root = root.display().to_string(),
            state = state.display().to_string(),
            addr = address.display().to_string(),
            ttrpc = d.join("containerd.ttrpc.sock").display().to_string(),
            opt = d.join("opt").display().to_string(),
        );
        if !proxies.is_empty() {
            toml.push_str("[proxy_plugins]\n");
        }
        for (name, sock) in proxies {
            toml.push_str(&format!(
                "  [proxy_plugins.{name:?}]\n    type = \"snapshot\"\n    address = {:?}\n",
                sock.display().to_string()
            ));
        }
        let config = d.join("config.toml");
        std::fs::write(&config, toml).expect("write containerd config");
        let mut c = Containerd {
            address,
            root,
            state,
            namespace: "rstargz-test".to_string(),
            server: None,
            path_first: path_first.map(Path::to_path_buf),
            dir,
        };
        c.spawn();
        c
    }

    /// Starts containerd on this instance's config and waits until it
    /// answers.
    fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(d.join("config.toml"));
        if let Some(first) = &self.path_first {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![first.clone()];
            dirs.extend(std::env::split_paths(&path));
            cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
        }
        self.server = Some(Server::spawn(
            "containerd",
            &mut cmd,
            &d.join("containerd.log"),
        ));
        let ready = wait_for(Duration::from_secs(30), || {
            let s = self.server.as_mut().expect("server");
            if s.exited().is_some() {
                return Some(false);
            }
            self.ctr_raw(&["version"], Duration::from_secs(5))
                .ok()
                .filter(|o| o.status.success())
                .map(|_| true)
        });
        if ready != Some(true) {
            panic!(
                "containerd did not become ready; log:\n{}",
                self.server.as_ref().expect("server").log_tail(8000)
            );
        }
    }

    /// Stops containerd (SIGTERM) and starts it again on the same root,
    /// state and sockets; running containers' shims keep running.
    pub fn restart(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(20));
        }
        self.spawn();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last bytes of containerd's log (for assertion messages).
    pub fn log_tail(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.log_tail(8000))
            .unwrap_or_default()
    }

    fn ctr_raw(&self, args: &[&str], timeout: Duration) -> Result<CmdOutput, String> {
        run(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .arg("--namespace")
                .arg(&self.namespace)
                .args(args),
            timeout,
        )
    }

    /// Runs `ctr --address <sock> --namespace <ns> <args>`; panics with both
    /// output streams (and containerd's log tail) if it fails.
    pub fn ctr(&self, args: &[&str]) -> CmdOutput {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        self.try_ctr(args, timeout).unwrap_or_else(|e| {
            panic!(
                "ctr failed: {e}\n--- containerd log (tail) ---\n{}",
                self.log_tail()
            )
        })
    }

    /// Like [`Self::ctr`] but returns the error text instead of panicking.
    pub fn try_ctr(&self, args: &[&str], timeout: Duration) -> Result<CmdOutput, String> {
        run_ok(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .arg("--namespace")
                .arg(&self.namespace)
                .args(args),
            timeout,
        )
    }

    /// `ctr run <flags> --snapshotter S --runc-root <private> REF ID CMD...`.
    /// runc's state goes under this containerd's directory instead of the
    /// default `/run/containerd/runc`.
    pub fn run(
        &self,
        flags: &[&str],
        snapshotter: &str,
        reference: &str,
        id: &str,
        cmd: &[&str],
    ) -> CmdOutput {
        let runc_root = self.dir.path().join("runc").display().to_string();
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--snapshotter", snapshotter, "--runc-root", &runc_root]);
        args.extend_from_slice(&[reference, id]);
        args.extend_from_slice(cmd);
        self.ctr_timeout(&args, Duration::from_secs(120))
    }

    /// Debian's `ctr-remote` (stargz-snapshotter's ctr) against this
    /// containerd.
    pub fn ctr_remote(&self, args: &[&str]) -> CmdOutput {
        self.ctr_remote_timeout(args, CTR_TIMEOUT)
    }

    pub fn ctr_remote_timeout(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        run_ok(
            Command::new("ctr-remote")
                .arg("--address")
                .arg(&self.address)
                .arg("--namespace")
                .arg(&self.namespace)
                .args(args),
            timeout,
        )
        .unwrap_or_else(|e| {
            panic!(
                "ctr-remote failed: {e}\n--- containerd log (tail) ---\n{}",
                self.log_tail()
            )
        })
    }

    /// Names of the images containerd knows.
    pub fn image_names(&self) -> Vec<String> {
        lines(&self.ctr(&["images", "ls", "--quiet"]).stdout)
    }

    /// Target digest of image `reference` (from `ctr images ls`).
    pub fn image_digest(&self, reference: &str) -> String {
        let out = self.ctr(&["images", "ls"]).stdout;
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&reference))
            .and_then(|f| {
                f.iter()
                    .find(|x| x.starts_with("sha256:"))
                    .map(|s| s.to_string())
            })
            .unwrap_or_else(|| panic!("image {reference} not in `ctr images ls`:\n{out}"))
    }

    /// Keys of the snapshots `snapshotter` holds in this namespace, as
    /// containerd sees them (`ctr snapshots ls`), with their kind.
    /// `ctr-remote images rpull --plain-http --snapshotter stargz REF`
    /// (the lazy-pull client), bounded to 5 minutes; returns how long it took.
    pub fn rpull_stargz(&self, reference: &str) -> Duration {
        let t = std::time::Instant::now();
        self.ctr_remote_timeout(
            &[
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "stargz",
                reference,
            ],
            Duration::from_secs(300),
        );
        t.elapsed()
    }

    /// Keys of the committed snapshots of `snapshotter`.
    pub fn committed_snapshots(&self, snapshotter: &str) -> Vec<String> {
        self.snapshots(snapshotter)
            .into_iter()
            .filter(|(_, k)| k == "Committed")
            .map(|(key, _)| key)
            .collect()
    }

    pub fn snapshots(&self, snapshotter: &str) -> Vec<(String, String)> {
        let out = self
            .ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])
            .stdout;
        out.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // KEY PARENT KIND; PARENT may be empty.
                match f.as_slice() {
                    [key, kind] => Some((key.to_string(), kind.to_string())),
                    [key, _, kind, ..] => Some((key.to_string(), kind.to_string())),
                    _ => None,
                }
            })
            .collect()
    }

    /// Waits until containerd can reach snapshotter `name` again (after a
    /// proxy snapshotter restarted, containerd's gRPC client reconnects with
    /// backoff, and calls fail with `Unavailable` meanwhile). Returns how
    /// long that took.
    pub fn wait_snapshotter(&self, name: &str, timeout: Duration) -> Duration {
        let start = std::time::Instant::now();
        let mut last = String::new();
        // Right after a snapshotter restart containerd's connection to it
        // flaps for a second or two (an RPC can fail with the error of an
        // earlier dial), so wait for answers spread over 2 s, not one.
        let mut streak: Option<std::time::Instant> = None;
        let ok = wait_for(timeout, || {
            match self.try_ctr(
                &["snapshots", "--snapshotter", name, "ls"],
                Duration::from_secs(10),
            ) {
                Ok(_) => {
                    let since = *streak.get_or_insert_with(std::time::Instant::now);
                    (since.elapsed() >= Duration::from_secs(2)).then_some(())
                }
                Err(e) => {
                    streak = None;
                    last = e;
                    None
                }
            }
        });
        assert!(
            ok.is_some(),
            "containerd could not reach snapshotter {name} within {timeout:?}: {last}"
        );
        start.elapsed()
    }

    /// `ctr snapshots info <key>` as JSON (kind, parent, labels, ...).
    pub fn snapshot_info(&self, snapshotter: &str, key: &str) -> serde_json::Value {
        let out = self
            .ctr(&["snapshots", "--snapshotter", snapshotter, "info", key])
            .stdout;
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`ctr snapshots info {key}` is not JSON ({e}):\n{out}"))
    }

    /// Best-effort removal of every task and container, so no container
    /// process outlives the test.
    fn remove_workloads(&self) {
        let t = Duration::from_secs(15);
        if let Ok(o) = self.try_ctr(&["tasks", "ls", "--quiet"], t) {
            for id in lines(&o.stdout) {
                let _ = self.try_ctr(&["tasks", "kill", "--signal", "SIGKILL", &id], t);
                let _ = self.try_ctr(&["tasks", "delete", "--force", &id], t);
            }
        }
        if let Ok(o) = self.try_ctr(&["containers", "ls", "--quiet"], t) {
            for id in lines(&o.stdout) {
                let _ = self.try_ctr(&["containers", "delete", &id], t);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(s) = self.server.as_mut()
            && s.exited().is_none()
        {
            self.remove_workloads();
        }
        if let Some(mut s) = self.server.take() {
            s.stop(Duration::from_secs(10));
        }
        // Shims started for this containerd carry its socket path in argv;
        // kill them and whatever runs under them.
        let addr = self.address.display().to_string();
        proc::kill_trees(|argv| {
            argv.first().is_some_and(|a| a.contains("containerd-shim"))
                && argv.iter().any(|a| a == &addr)
        });
        let d = self.dir.path().to_path_buf();
        proc::unmount_all_under(&d);
        if let Err(e) = std::fs::remove_dir_all(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("containerd guard: cannot remove {}: {e}", d.display());
        }
    }
}

pub fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}
