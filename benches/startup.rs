//! Container start-up benchmark (HelloBench style) behind a simulated WAN,
//! plus the cold read of a 1 MB file (issue 4). Not a test: it prints tables.
//!
//! ```text
//! cargo bench --bench startup -- [--images python,gcc,node,datascience]
//!     [--modes legacy,estargz-noopt,estargz] [--samples 5]
//!     [--profile 20ms-200mbit|50ms-50mbit|loopback|<N>ms-<M>mbit]
//!     [--snapshotter NAME[=SOCKET]] [--out DIR] [--no-coldread]
//!     [--coldread-only] [--background-fetch] [--reference BIN]
//! ```
//! Every flag can also be given as `RSTARGZ_BENCH_<FLAG>` (`-` becomes `_`,
//! upper case), e.g. `RSTARGZ_BENCH_SAMPLES=3`. `RSTARGZ_BENCH_RSTARGZ`
//! names another `rstargz` binary to convert and optimize the images with;
//! `RSTARGZ_BENCH_TRACE=1` prints each sample's requests and daemon log;
//! `RSTARGZ_BENCH_LAYER_CONFIG` adds `[layer]` keys to the daemon's config.
//! `--reference BIN` measures the Go reference snapshotter
//! (`containerd-stargz-grpc` from scripts/reference-snapshotter.sh) instead
//! of `rstargz-grpc`, started and reset by the bench the same way.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs a smoke
//! version instead: a tiny image, one sample, loopback profile, asserting
//! that every mode printed its line.
//!
//! See docs/benchmark.md for the method and benches/support/wan.rs for the
//! network simulation.

#[path = "support/reference.rs"]
mod reference;
// Its unit tests are compiled here but only run in the test targets.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "support/wan.rs"]
mod wan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use support::containerd::Containerd;
use support::daemon::Daemon;
use support::image::{Entry, Layer, build_oci_layout};
use support::registry::Registry;
use wan::{Profile, Wan, check_interrupted};

/// Round trips a cold start needs at the least: connect, manifest, config,
/// and one for the layer data (TOC and prioritized files in one request).
const BOUND_ROUND_TRIPS: u32 = 4;

/// A benchmark image: Debian packages and a command with its expected output.
struct ImageSpec {
    name: &'static str,
    /// Packages for `debootstrap --include`; empty = the tiny smoke image.
    packages: &'static [&'static str],
    cmd: &'static [&'static str],
    /// A line the command's output must contain.
    expect: &'static str,
    /// The image this one extends (its layers come first); `None`: the
    /// bare Debian minbase layer.
    parent: Option<&'static str>,
    /// Path prefixes that get a layer of their own above the layer with
    /// the rest of what this image adds (tests/support/layering.rs).
    split: &'static [&'static [&'static str]],
}

const IMAGES: &[ImageSpec] = &[
    ImageSpec {
        name: "python",
        packages: &["python3"],
        cmd: &["python3", "-c", "print(\"hello\")"],
        expect: "hello",
        // minbase, python3's libraries and tools, its standard library.
        parent: None,
        split: &[&["usr/lib/python3.11"]],
    },
    ImageSpec {
        name: "gcc",
        packages: &["gcc", "libc6-dev"],
        cmd: &[
            "sh",
            "-c",
            "printf '#include <stdio.h>\\nint main(void){puts(\"hello\");return 0;}\\n' \
             >/tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h",
        ],
        expect: "hello",
        // minbase, binutils and libraries, the compiler proper.
        parent: None,
        split: &[&["usr/lib/gcc", "usr/libexec/gcc"]],
    },
    ImageSpec {
        name: "node",
        packages: &["nodejs"],
        cmd: &["node", "-e", "console.log(\"ready\")"],
        expect: "ready",
        parent: None,
        split: &[],
    },
    ImageSpec {
        name: "datascience",
        packages: &["python3-numpy", "python3-pandas", "python3-scipy"],
        cmd: &[
            "python3",
            "-c",
            "import numpy, pandas; print(\"numpy\", numpy.__version__, \"pandas\", pandas.__version__)",
        ],
        expect: "pandas",
        // python's three layers, then pandas and libraries, numpy, scipy.
        parent: Some("python"),
        split: &[
            &["usr/lib/python3/dist-packages/numpy"],
            &["usr/lib/python3/dist-packages/scipy"],
        ],
    },
];

const SMOKE_IMAGE: ImageSpec = ImageSpec {
    name: "tiny",
    packages: &[],
    cmd: &["/bin/sh", "-c", "echo hello"],
    expect: "hello",
    parent: None,
    split: &[],
};

/// Where the 1 MB file of the cold-read image lives.
const COLD_FILE: &str = "/data/1m.bin";
const COLD_SIZE: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Mode {
    #[serde(rename = "legacy")]
    Legacy,
    #[serde(rename = "estargz-noopt")]
    EstargzNoopt,
    #[serde(rename = "estargz")]
    Estargz,
}

impl Mode {
    fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "legacy" => Ok(Mode::Legacy),
            "estargz-noopt" => Ok(Mode::EstargzNoopt),
            "estargz" => Ok(Mode::Estargz),
            _ => Err(format!(
                "unknown mode {s:?} (legacy, estargz-noopt, estargz)"
            )),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Legacy => "legacy",
            Mode::EstargzNoopt => "estargz-noopt",
            Mode::Estargz => "estargz",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Mode::Legacy => "legacy",
            Mode::EstargzNoopt => "esgz-noopt",
            Mode::Estargz => "esgz-opt",
        }
    }
}

/// Command-line / environment settings.
struct Opts {
    smoke: bool,
    images: Vec<String>,
    modes: Vec<Mode>,
    samples: usize,
    profile: Profile,
    /// Snapshotter under test and, if external, its socket.
    snapshotter: String,
    snapshotter_socket: Option<PathBuf>,
    /// `containerd-stargz-grpc` to start as the snapshotter under test.
    reference: Option<PathBuf>,
    out: PathBuf,
    coldread: bool,
    coldread_only: bool,
    background_fetch: bool,
}

fn opt_value(args: &[String], flag: &str) -> Option<String> {
    let long = format!("--{flag}");
    let eq = format!("--{flag}=");
    for (i, a) in args.iter().enumerate() {
        if a == &long {
            return args.get(i + 1).cloned();
        }
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v.to_string());
        }
    }
    let env = format!("RSTARGZ_BENCH_{}", flag.replace('-', "_").to_uppercase());
    std::env::var(env).ok()
}

fn opt_flag(args: &[String], flag: &str) -> bool {
    let long = format!("--{flag}");
    let env = format!("RSTARGZ_BENCH_{}", flag.replace('-', "_").to_uppercase());
    args.iter().any(|a| a == &long) || std::env::var(env).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn parse_opts() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    let smoke = !args.iter().any(|a| a == "--bench") || opt_flag(&args, "smoke");
    let known = [
        "--bench",
        "--images",
        "--modes",
        "--samples",
        "--profile",
        "--snapshotter",
        "--out",
        "--no-coldread",
        "--coldread-only",
        "--background-fetch",
        "--reference",
        "--smoke",
    ];
    // libtest's own flags (`scripts/test.sh` passes `--test-threads=2` to
    // every target) are not ours to judge.
    let libtest = [
        "--test-threads",
        "--nocapture",
        "--quiet",
        "--color",
        "--format",
        "--show-output",
    ];
    for a in &args {
        if a.starts_with("--")
            && !libtest
                .iter()
                .any(|k| a == k || a.starts_with(&format!("{k}=")))
            && !known
                .iter()
                .any(|k| a == k || a.starts_with(&format!("{k}=")))
        {
            return Err(format!(
                "unknown flag {a}; see the header of benches/startup.rs"
            ));
        }
    }
    let images: Vec<String> = if smoke {
        vec![SMOKE_IMAGE.name.to_string()]
    } else {
        opt_value(&args, "images")
            .unwrap_or_else(|| "python,gcc,node,datascience".into())
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    for i in &images {
        if i != SMOKE_IMAGE.name && !IMAGES.iter().any(|s| s.name == i) {
            return Err(format!(
                "unknown image {i:?} (python, gcc, node, datascience, tiny)"
            ));
        }
    }
    let modes = opt_value(&args, "modes")
        .unwrap_or_else(|| "legacy,estargz-noopt,estargz".into())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(Mode::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let samples = if smoke {
        1
    } else {
        opt_value(&args, "samples")
            .map(|s| s.parse::<usize>().map_err(|_| format!("--samples {s}")))
            .transpose()?
            .unwrap_or(5)
            .max(1)
    };
    let profile = if smoke {
        Profile::parse("loopback")?
    } else {
        Profile::parse(&opt_value(&args, "profile").unwrap_or_else(|| "20ms-200mbit".into()))?
    };
    let reference = opt_value(&args, "reference").map(PathBuf::from);
    let (snapshotter, snapshotter_socket) = match opt_value(&args, "snapshotter") {
        None if reference.is_some() => ("stargz-go".to_string(), None),
        None => ("stargz".to_string(), None),
        Some(s) => match s.split_once('=') {
            Some((n, p)) => (n.to_string(), Some(PathBuf::from(p))),
            None => (s, None),
        },
    };
    if snapshotter == "overlayfs" || snapshotter.is_empty() {
        return Err("--snapshotter must name a proxy snapshotter, not overlayfs".into());
    }
    if reference.is_some() && snapshotter_socket.is_some() {
        return Err(
            "--reference starts the snapshotter: give --snapshotter NAME, not NAME=SOCKET".into(),
        );
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let out = opt_value(&args, "out")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            target.join(if smoke {
                "bench-startup-smoke"
            } else {
                "bench-startup"
            })
        });
    Ok(Opts {
        smoke,
        images,
        modes,
        samples,
        profile,
        snapshotter,
        snapshotter_socket,
        reference,
        out,
        coldread: !opt_flag(&args, "no-coldread"),
        coldread_only: opt_flag(&args, "coldread-only"),
        background_fetch: opt_flag(&args, "background-fetch"),
    })
}

/// One cold start.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    pull_s: f64,
    create_s: f64,
    run_s: f64,
    total_s: f64,
    /// Bytes the relay delivered from the registry (blobs, manifests,
    /// headers).
    bytes_fetched: u64,
    /// HTTP requests the registry served.
    requests: usize,
    /// New TCP connections to the registry.
    connections: u64,
}

#[derive(Clone, Debug, Serialize)]
struct Stat {
    median: f64,
    p95: f64,
}

fn stat(v: &[f64]) -> Stat {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    // Nearest rank.
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Stat {
        median,
        p95: rank(0.95),
    }
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    image: String,
    mode: Mode,
    snapshotter: String,
    image_bytes: u64,
    samples: Vec<Sample>,
    pull: Stat,
    create: Stat,
    run: Stat,
    total: Stat,
    bytes_fetched: Stat,
    requests: Stat,
    /// Seconds: bytes read / bandwidth + round trips x RTT (see docs).
    bound_s: Option<f64>,
    bound_bytes: Option<u64>,
}

#[derive(Serialize)]
struct Results {
    profile: String,
    measured: wan::Measured,
    samples: usize,
    rows: Vec<Row>,
    coldread: Option<ColdRead>,
    background_fetch: bool,
}

#[derive(Clone, Debug, Serialize)]
struct ColdRead {
    profile: String,
    rtt_ms: f64,
    mbit: Option<u32>,
    samples_ms: Vec<f64>,
    median_ms: f64,
    bound_ms: Option<f64>,
    bytes_fetched: u64,
    requests: usize,
}

/// The private stack: WAN, registry behind it, containerd, our daemon.
struct Stack {
    // Field order is drop order: workloads before the daemon, before the
    // registry and the network.
    ctrd: Containerd,
    daemon: Option<Daemon>,
    reference: Option<reference::Reference>,
    registry: Registry,
    wan: Wan,
    snapshotter: String,
    has_optimize: bool,
    rstargz: PathBuf,
    work: tempfile::TempDir,
}

/// `ctr containers create` has no `--runc-root`, and the runc shim then
/// keeps runc's state under `/run/containerd/runc/<namespace>`. A `runc`
/// first on containerd's `PATH` moves that `--root` under `work`. Returns
/// the directory holding the wrapper.
fn runc_wrapper(work: &Path) -> PathBuf {
    let real = support::which("runc").expect("runc (scripts/deps.sh)");
    let dir = work.join("bin");
    let root = work.join("runc");
    std::fs::create_dir_all(&dir).expect("mkdir bin");
    let (root, real) = (root.display().to_string(), real.display().to_string());
    let script = [
        "#!/bin/bash".to_string(),
        format!("# runc with its state under {root:?}, not /run/containerd/runc."),
        "a=()".into(),
        "while (($#)); do".into(),
        "  if [[ $1 == --root && $2 == /run/containerd/runc/* ]]; then".into(),
        format!("    a+=(--root {root:?}/\"${{2#/run/containerd/runc/}}\"); shift 2"),
        "  else a+=(\"$1\"); shift; fi".into(),
        "done".into(),
        format!("exec {real:?} \"${{a[@]}}\""),
        String::new(),
    ]
    .join("\n");
    let p = dir.join("runc");
    std::fs::write(&p, script).expect("write runc wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A cold-read view may still be mounted under the work dir.
        support::proc::unmount_all_under(self.work.path());
    }
}

/// `RSTARGZ_BENCH_LAYER_CONFIG`: more `[layer]` keys for the daemon under
/// test (e.g. `read_ahead_bytes = 262144`), for tuning experiments.
fn daemon_config(background_fetch: bool) -> String {
    let extra = std::env::var("RSTARGZ_BENCH_LAYER_CONFIG").unwrap_or_default();
    format!("[layer]\nbackground_fetch = {background_fetch}\n{extra}\n")
}

impl Stack {
    fn start(opts: &Opts) -> Stack {
        support::require_prerequisites();
        let mut wan = Wan::create(opts.profile.clone()).unwrap_or_else(|e| panic!("wan: {e}"));
        let mut registry = Registry::start_in_netns(&wan.netns, &wan.ns_ip);
        let upstream = registry.host.parse().expect("registry address");
        let relay = wan
            .start_relay(upstream)
            .unwrap_or_else(|e| panic!("relay: {e}"));
        // Every client (skopeo, containerd, rstargz) goes through the relay.
        registry.host = relay.to_string();
        let reference = opts
            .reference
            .as_deref()
            .map(|bin| reference::Reference::start(bin, opts.background_fetch));
        let (daemon, socket) = match (&opts.snapshotter_socket, &reference) {
            (Some(s), _) => (None, s.clone()),
            (None, Some(r)) => (None, r.address.clone()),
            (None, None) => {
                let d = Daemon::start_with_config(Some(&daemon_config(opts.background_fetch)));
                let a = d.address.clone();
                (Some(d), a)
            }
        };
        let work = support::temp_dir("bench");
        let wrapper = runc_wrapper(work.path());
        let mut ctrd =
            Containerd::start_with_proxies(&[(opts.snapshotter.clone(), socket)], Some(&wrapper));
        ctrd.namespace = format!("rstargz-bench-{}", std::process::id());
        // Another build's CLI (e.g. a branch with `rstargz optimize`) may
        // make the images; the daemon under test stays this build's.
        let rstargz = std::env::var_os("RSTARGZ_BENCH_RSTARGZ")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rstargz")));
        let has_optimize = Command::new(&rstargz)
            .args(["optimize", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        Stack {
            ctrd,
            daemon,
            reference,
            registry,
            wan,
            snapshotter: opts.snapshotter.clone(),
            has_optimize,
            rstargz,
            work,
        }
    }

    /// Runs `rstargz ARGS`, panicking with its output on failure.
    fn rstargz(&self, args: &[&str]) {
        support::run_ok(
            Command::new(&self.rstargz).args(args),
            Duration::from_secs(1800),
        )
        .unwrap_or_else(|e| panic!("rstargz failed: {e}"));
    }

    /// Builds the image, pushes it as `bench/<name>:legacy` and converts it
    /// for the eStargz modes. Returns the compressed size per mode.
    fn prepare_image(&mut self, spec: &ImageSpec, modes: &[Mode]) -> BTreeMap<Mode, u64> {
        let t = Instant::now();
        let tars = self.work.path().join(format!("layers-{}", spec.name));
        let layers = if spec.packages.is_empty() {
            vec![Layer::Entries(tiny_entries())]
        } else {
            image_layers(spec, &tars)
                .into_iter()
                .map(Layer::TarFile)
                .collect()
        };
        let dir = self.work.path().join(format!("oci-{}", spec.name));
        let layout = build_oci_layout(&dir, "legacy", &layers, spec.cmd);
        let _ = std::fs::remove_dir_all(&tars);
        let repo = format!("bench/{}", spec.name);
        let src = self.registry.push_oci_layout(&layout.dir, "legacy", &repo);
        let _ = std::fs::remove_dir_all(&dir);
        let mut sizes = BTreeMap::new();
        sizes.insert(Mode::Legacy, self.image_size(&repo, "legacy"));
        for &m in modes {
            let dst = self.registry.reference(&repo, m.tag());
            match m {
                Mode::Legacy => continue,
                Mode::EstargzNoopt => self.rstargz(&["convert", &src, &dst, "--plain-http"]),
                Mode::Estargz => {
                    let mut args: Vec<String> = [
                        "optimize",
                        src.as_str(),
                        dst.as_str(),
                        "--plain-http",
                        "--entrypoint",
                        spec.cmd[0],
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    for a in &spec.cmd[1..] {
                        args.push(format!("--args={a}"));
                    }
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    self.rstargz(&a);
                }
            }
            sizes.insert(m, self.image_size(&repo, m.tag()));
        }
        eprintln!(
            "prepared image {} ({} layers) in {:.1}s: {}",
            spec.name,
            layers.len(),
            t.elapsed().as_secs_f64(),
            sizes
                .iter()
                .map(|(m, s)| format!("{} {:.1} MB", m.name(), *s as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        );
        sizes
    }

    /// Sum of the layer sizes of `repo:tag`.
    fn image_size(&self, repo: &str, tag: &str) -> u64 {
        let (body, _) = self.registry.manifest(repo, tag);
        let mut m: serde_json::Value = serde_json::from_slice(&body).expect("manifest json");
        if let Some(list) = m.get("manifests").and_then(|v| v.as_array()) {
            let d = list[0]["digest"].as_str().expect("digest").to_string();
            m = serde_json::from_slice(&self.registry.manifest(repo, &d).0).expect("manifest");
        }
        m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["size"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Largest layer blob of `repo:tag`, as a registry path (for measuring
    /// bulk throughput).
    fn largest_blob_path(&self, repo: &str, tag: &str) -> String {
        let (body, _) = self.registry.manifest(repo, tag);
        let m: serde_json::Value = serde_json::from_slice(&body).expect("manifest json");
        let l = m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
            .expect("a layer");
        format!("/v2/{repo}/blobs/{}", l["digest"].as_str().expect("digest"))
    }

    /// Nothing cached anywhere: no containers, images, content or
    /// snapshots in containerd, our daemon restarted on an empty cache, the
    /// page cache dropped.
    fn make_cold(&mut self) {
        let c = &self.ctrd;
        for id in support::containerd::lines(&c.ctr(&["tasks", "ls", "--quiet"]).stdout) {
            let _ = c.try_ctr(
                &["tasks", "delete", "--force", &id],
                Duration::from_secs(30),
            );
        }
        for id in support::containerd::lines(&c.ctr(&["containers", "ls", "--quiet"]).stdout) {
            c.ctr(&["containers", "delete", &id]);
        }
        let imgs = c.image_names();
        if !imgs.is_empty() {
            let mut a = vec!["images", "rm", "--sync"];
            a.extend(imgs.iter().map(String::as_str));
            c.ctr(&a);
        }
        let content = support::containerd::lines(&c.ctr(&["content", "ls", "--quiet"]).stdout);
        if !content.is_empty() {
            let mut a = vec!["content", "rm"];
            a.extend(content.iter().map(String::as_str));
            c.ctr(&a);
        }
        for sn in ["overlayfs", self.snapshotter.as_str()] {
            // Children first: `ls` lists parents and children in any order.
            for _ in 0..64 {
                let keys: Vec<String> = c.snapshots(sn).into_iter().map(|(k, _)| k).collect();
                if keys.is_empty() {
                    break;
                }
                for k in keys {
                    let _ = c.try_ctr(
                        &["snapshots", "--snapshotter", sn, "rm", &k],
                        Duration::from_secs(30),
                    );
                }
            }
            let left = c.snapshots(sn);
            assert!(left.is_empty(), "snapshots left in {sn}: {left:?}");
        }
        if let Some(d) = self.daemon.as_mut() {
            d.restart_with(|d| {
                let cache = d.root.join("cache");
                if cache.exists() {
                    std::fs::remove_dir_all(&cache)
                        .unwrap_or_else(|e| panic!("remove {}: {e}", cache.display()));
                }
            });
            self.wait_snapshotter_serving();
        }
        if let Some(r) = self.reference.as_mut() {
            r.restart_cold();
            self.wait_snapshotter_serving();
        }
        // Best effort: an unprivileged run simply keeps the page cache.
        let _ = Command::new("sync").status();
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
    }

    /// Waits until containerd reaches the restarted snapshotter. `ctr
    /// snapshots ls` is answered from containerd's own metadata, so the
    /// probe is a Prepare and Remove of a scratch snapshot, which reach the
    /// snapshotter itself.
    fn wait_snapshotter_serving(&self) {
        let sn = &self.snapshotter;
        let mut last = String::new();
        let ok = support::wait_for(Duration::from_secs(30), || {
            let key = support::unique_name("bench-probe");
            let t = Duration::from_secs(10);
            match self
                .ctrd
                .try_ctr(&["snapshots", "--snapshotter", sn, "prepare", &key], t)
            {
                Ok(_) => {
                    self.ctrd
                        .ctr(&["snapshots", "--snapshotter", sn, "rm", &key]);
                    Some(())
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        assert!(
            ok.is_some(),
            "snapshotter {sn} not reachable after restart: {last}"
        );
    }

    /// `RSTARGZ_BENCH_TRACE`: the registry requests of the sample (from
    /// access-log entry `r0` on) and the daemon's log, for profiling.
    fn trace(&self, r0: usize) {
        for e in self.registry.access_log().iter().skip(r0) {
            eprintln!("    req {} {} {} {}", e.method, e.status, e.bytes, e.path);
        }
        if let Some(d) = &self.daemon {
            for l in d
                .log()
                .lines()
                .rev()
                .take(200)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("    log {l}");
            }
        }
    }

    /// One cold start of `reference` in `mode`; checks the output.
    fn sample(&mut self, spec: &ImageSpec, mode: Mode, reference: &str, id: &str) -> Sample {
        self.make_cold();
        check_interrupted();
        let c = &self.ctrd;
        let snap = match mode {
            Mode::Legacy => "overlayfs",
            _ => self.snapshotter.as_str(),
        };
        let b0 = self.wan.bytes_down();
        let n0 = self.wan.connections();
        let r0 = self.registry.access_log().len();
        let long = Duration::from_secs(1800);
        let t0 = Instant::now();
        match mode {
            Mode::Legacy => {
                c.ctr_timeout(
                    &[
                        "images",
                        "pull",
                        "--plain-http",
                        "--snapshotter",
                        snap,
                        reference,
                    ],
                    long,
                );
            }
            _ => {
                c.ctr_remote_timeout(
                    &[
                        "images",
                        "rpull",
                        "--plain-http",
                        "--snapshotter",
                        snap,
                        reference,
                    ],
                    long,
                );
            }
        }
        let t1 = Instant::now();
        // `--`: the command's own flags (`-c`) are not ctr's.
        let mut args = vec![
            "containers",
            "create",
            "--snapshotter",
            snap,
            "--",
            reference,
            id,
        ];
        args.extend_from_slice(spec.cmd);
        c.ctr_timeout(&args, long);
        let t2 = Instant::now();
        let out = c.ctr_timeout(&["tasks", "start", id], long);
        let t3 = Instant::now();
        assert!(
            out.stdout.contains(spec.expect),
            "{} ({}) printed {:?}, expected {:?}; stderr {:?}",
            spec.name,
            mode.name(),
            out.stdout,
            spec.expect,
            out.stderr
        );
        let s = Sample {
            pull_s: (t1 - t0).as_secs_f64(),
            create_s: (t2 - t1).as_secs_f64(),
            run_s: (t3 - t2).as_secs_f64(),
            total_s: (t3 - t0).as_secs_f64(),
            bytes_fetched: self.wan.bytes_down() - b0,
            requests: self.registry.access_log().len() - r0,
            connections: self.wan.connections() - n0,
        };
        if mode != Mode::Legacy {
            // A lazy mode that silently fell back to a normal pull would
            // measure the wrong thing: its layers must be remote snapshots.
            let remote = c
                .committed_snapshots(snap)
                .iter()
                .filter(|k| {
                    c.snapshot_info(snap, k)["Labels"]
                        .get("containerd.io/snapshot/remote")
                        .is_some()
                })
                .count();
            assert!(
                remote > 0,
                "{} ({}): no snapshot labelled containerd.io/snapshot/remote: \
                 the layers were not pulled lazily",
                spec.name,
                mode.name()
            );
        }
        if std::env::var_os("RSTARGZ_BENCH_TRACE").is_some() {
            self.trace(r0);
        }
        let _ = c.try_ctr(&["tasks", "delete", "--force", id], Duration::from_secs(30));
        let _ = c.try_ctr(&["containers", "delete", id], Duration::from_secs(30));
        eprintln!(
            "  {} {} {id}: pull {:.2}s create {:.2}s run {:.2}s total {:.2}s, {:.1} MB, {} requests",
            spec.name,
            mode.name(),
            s.pull_s,
            s.create_s,
            s.run_s,
            s.total_s,
            s.bytes_fetched as f64 / 1e6,
            s.requests
        );
        s
    }
}

/// debootstrap leaves the downloaded packages in the minbase rootfs (32
/// MB); the package rootfs have them cleaned. Left out of every layer, so
/// the base layer is not padded with files the image deletes again.
fn apt_archive(path: &str) -> bool {
    path.starts_with("var/cache/apt/archives/") && path.ends_with(".deb")
}

/// The layer tars of a Debian image, bottom first, written under `dir`:
/// minbase, then what each image of the `parent` chain adds over the one
/// below, split by its `split` prefixes.
fn image_layers(spec: &ImageSpec, dir: &Path) -> Vec<PathBuf> {
    let (mut layers, lower) = match spec.parent {
        None => {
            let base = support::rootfs::debian_rootfs().path;
            let layer =
                support::layering::diff_layers(None, &base, dir, "minbase", &[], &apt_archive);
            (layer, base)
        }
        Some(p) => {
            let parent = IMAGES.iter().find(|s| s.name == p).expect("parent image");
            let lower = support::rootfs::debian_rootfs_with(parent.name, parent.packages).path;
            (image_layers(parent, dir), lower)
        }
    };
    let upper = support::rootfs::debian_rootfs_with(spec.name, spec.packages).path;
    layers.extend(support::layering::diff_layers(
        Some(&lower),
        &upper,
        dir,
        spec.name,
        spec.split,
        &apt_archive,
    ));
    layers
}

/// The tiny smoke / cold-read image: the host's `dash` and the C library
/// it links against (files from Debian packages), and [`COLD_FILE`]: 1 MB
/// of incompressible bytes.
fn tiny_entries() -> Vec<Entry> {
    let mut v = Vec::new();
    for d in [
        "/bin",
        "/lib",
        "/lib/x86_64-linux-gnu",
        "/lib64",
        "/data",
        "/tmp",
    ] {
        v.push(Entry::Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    for (dst, src) in [
        ("/bin/sh", "/bin/dash"),
        ("/bin/cat", "/bin/cat"),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ),
        ("/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
    ] {
        v.push(Entry::File {
            path: dst.into(),
            mode: 0o755,
            data: std::fs::read(src).unwrap_or_else(|e| panic!("read {src}: {e}")),
        });
    }
    // Deterministic but incompressible (xorshift).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(COLD_SIZE);
    while data.len() < COLD_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    v.push(Entry::File {
        path: COLD_FILE.into(),
        mode: 0o644,
        data,
    });
    v
}

fn mb(b: f64) -> String {
    format!("{:.1}", b / 1e6)
}

fn markdown(res: &Results) -> String {
    let m = &res.measured;
    if res.rows.is_empty() {
        // --coldread-only: the profile and the cold read.
        let mut s = format!(
            "Measured profile `{}`: connect + first request {:.1} ms, ping RTT {:.1} ms \
             (min {:.1}, max {:.1}), bulk {:.0} Mbit/s over {:.1} MB.\n",
            res.profile,
            m.connect_first_request_ms,
            m.ping_rtt_ms,
            m.ping_rtt_min_ms,
            m.ping_rtt_max_ms,
            m.bulk_mbit_s,
            m.bulk_bytes as f64 / 1e6,
        );
        if let Some(c) = &res.coldread {
            s.push_str(&coldread_markdown(c));
        }
        return s;
    }
    let mut s = format!(
        "### Start-up, profile `{}`, lazy snapshotter `{}` ({} cold samples per row, \
         median / p95 seconds)\n\n\
         Measured profile: connect + first request {:.1} ms, ping RTT {:.1} ms \
         (min {:.1}, max {:.1}), bulk {:.0} Mbit/s over {:.1} MB.\n\n\
         | image | mode | pull | create | run | total | MB fetched | requests | image MB | bound s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        res.profile,
        res.rows
            .iter()
            .find(|r| r.mode != Mode::Legacy)
            .map_or("none", |r| r.snapshotter.as_str()),
        res.samples,
        m.connect_first_request_ms,
        m.ping_rtt_ms,
        m.ping_rtt_min_ms,
        m.ping_rtt_max_ms,
        m.bulk_mbit_s,
        m.bulk_bytes as f64 / 1e6,
    );
    for r in &res.rows {
        let f = |x: &Stat| format!("{:.2} / {:.2}", x.median, x.p95);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |\n",
            r.image,
            r.mode.name(),
            f(&r.pull),
            f(&r.create),
            f(&r.run),
            f(&r.total),
            mb(r.bytes_fetched.median),
            r.requests.median,
            mb(r.image_bytes as f64),
            r.bound_s.map_or("n/a".into(), |b| format!("{b:.2}")),
        ));
    }
    // Ratios against the ordinary pull of the same image, same run.
    let mut ratios = Vec::new();
    for r in res.rows.iter().filter(|r| r.mode != Mode::Legacy) {
        if let Some(l) = res
            .rows
            .iter()
            .find(|l| l.image == r.image && l.mode == Mode::Legacy)
        {
            ratios.push(format!(
                "{} {}: {:.1}x faster than legacy (total median)",
                r.image,
                r.mode.name(),
                l.total.median / r.total.median
            ));
        }
    }
    if !ratios.is_empty() {
        s.push_str(&format!("\n{}\n", ratios.join("; ")));
    }
    s.push_str(&format!(
        "\nbound = bytes the workload read / bandwidth + {BOUND_ROUND_TRIPS} round trips x RTT; \
         bytes read = median bytes fetched by the `estargz` mode of the image \
         (`estargz-noopt` if that mode did not run), local run time not included.\n"
    ));
    if let Some(c) = &res.coldread {
        s.push_str(&coldread_markdown(c));
    }
    s
}

fn coldread_markdown(c: &ColdRead) -> String {
    let rtt = c.rtt_ms;
    let in_rtt = |ms: f64| {
        if rtt > 0.0 {
            format!("{:.2} RTT", ms / rtt)
        } else {
            "-".into()
        }
    };
    format!(
        "\n### Cold read of a 1 MiB file (lazy eStargz, no prioritized files), profile `{}`\n\n\
         | samples ms | median ms | median in RTT | bound ms (2 RTT + 1 MiB / rate) | bytes fetched | requests |\n\
         |---|---:|---:|---:|---:|---:|\n\
         | {} | {:.1} | {} | {} | {} | {} |\n",
        c.profile,
        c.samples_ms
            .iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        c.median_ms,
        in_rtt(c.median_ms),
        c.bound_ms
            .map_or("n/a".into(), |b| format!("{b:.1} ({})", in_rtt(b))),
        c.bytes_fetched,
        c.requests,
    )
}

/// PNG stacked bars (pull, create, run medians) with gnuplot.
fn chart(res: &Results, png: &Path) -> Result<(), String> {
    let dir = png.parent().unwrap_or(Path::new("."));
    let data = dir.join("startup.dat");
    let mut d = String::new();
    for r in &res.rows {
        d.push_str(&format!(
            "\"{}\\n{}\" {:.3} {:.3} {:.3}\n",
            r.image,
            r.mode.name(),
            r.pull.median,
            r.create.median,
            r.run.median
        ));
    }
    std::fs::write(&data, d).map_err(|e| e.to_string())?;
    let script = format!(
        "set terminal pngcairo size {w},520 font 'DejaVu Sans,10'\n\
         set output {png:?}\n\
         set title 'rstargz start-up, profile {p}, median of {n} cold samples'\n\
         set ylabel 'seconds'\n\
         set bmargin 4\n\
         set style data histograms\n\
         set style histogram rowstacked\n\
         set style fill solid 0.85 border -1\n\
         set boxwidth 0.7\n\
         set key top right\n\
         set grid ytics\n\
         set yrange [0:*]\n\
         plot {data:?} using 2:xtic(1) title 'pull' lc rgb '#4e79a7', \
         '' using 3 title 'create' lc rgb '#f28e2b', '' using 4 title 'run' lc rgb '#59a14f'\n",
        w = 200 + 110 * res.rows.len().max(1),
        png = png.display().to_string(),
        p = res.profile,
        n = res.samples,
        data = data.display().to_string(),
    );
    let gp = dir.join("startup.gp");
    std::fs::write(&gp, &script).map_err(|e| e.to_string())?;
    let o = Command::new("gnuplot")
        .arg(&gp)
        .output()
        .map_err(|e| format!("gnuplot (apt package gnuplot-nox): {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

fn rows_for(
    stack: &mut Stack,
    opts: &Opts,
    spec: &ImageSpec,
    sizes: &BTreeMap<Mode, u64>,
) -> Vec<Row> {
    let repo = format!("bench/{}", spec.name);
    let mut rows = Vec::new();
    let mut per_mode: BTreeMap<Mode, Vec<Sample>> = BTreeMap::new();
    // Interleave modes per sample, so a drift of the machine hits all alike.
    for i in 0..opts.samples {
        for &m in &opts.modes {
            if !sizes.contains_key(&m) {
                continue;
            }
            check_interrupted();
            let reference = stack.registry.reference(&repo, m.tag());
            let id = format!("b{i}-{}-{}", spec.name, m.tag());
            let s = stack.sample(spec, m, &reference, &id);
            per_mode.entry(m).or_default().push(s);
        }
    }
    for (m, samples) in per_mode {
        let col = |f: fn(&Sample) -> f64| stat(&samples.iter().map(f).collect::<Vec<_>>());
        rows.push(Row {
            image: spec.name.to_string(),
            mode: m,
            snapshotter: if m == Mode::Legacy {
                "overlayfs".into()
            } else {
                stack.snapshotter.clone()
            },
            image_bytes: sizes[&m],
            pull: col(|s| s.pull_s),
            create: col(|s| s.create_s),
            run: col(|s| s.run_s),
            total: col(|s| s.total_s),
            bytes_fetched: col(|s| s.bytes_fetched as f64),
            requests: col(|s| s.requests as f64),
            samples,
            bound_s: None,
            bound_bytes: None,
        });
    }
    // The physical bound of the image, shown on each of its rows.
    let read = rows
        .iter()
        .find(|r| r.mode == Mode::Estargz)
        .or_else(|| rows.iter().find(|r| r.mode == Mode::EstargzNoopt))
        .map(|r| r.bytes_fetched.median as u64);
    if let (Some(bytes), Some(bps)) = (read, opts.profile.bytes_per_sec()) {
        let b = bytes as f64 / bps + BOUND_ROUND_TRIPS as f64 * opts.profile.rtt.as_secs_f64();
        for r in &mut rows {
            r.bound_s = Some(b);
            r.bound_bytes = Some(bytes);
        }
    }
    rows
}

/// Cold read of [`COLD_FILE`] from a lazily pulled eStargz image: pull,
/// mount the container's rootfs overlay ourselves, time open+read.
fn coldread(stack: &mut Stack, opts: &Opts, samples: usize) -> ColdRead {
    let repo = "bench/coldread";
    let dir = stack.work.path().join("oci-coldread");
    let layout = build_oci_layout(
        &dir,
        "legacy",
        &[Layer::Entries(tiny_entries())],
        SMOKE_IMAGE.cmd,
    );
    let src = stack.registry.push_oci_layout(&layout.dir, "legacy", repo);
    let _ = std::fs::remove_dir_all(&dir);
    let dst = stack.registry.reference(repo, "esgz-noopt");
    stack.rstargz(&["convert", &src, &dst, "--plain-http"]);
    let mut times = Vec::new();
    let (mut bytes, mut reqs) = (0, 0);
    for i in 0..samples {
        stack.make_cold();
        check_interrupted();
        stack.wan.shape(true).expect("shape");
        stack.ctrd.ctr_remote_timeout(
            &[
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                &stack.snapshotter,
                &dst,
            ],
            Duration::from_secs(600),
        );
        // A view on the image's top layer, mounted here.
        let chain = top_chain_id(&stack.ctrd, &stack.snapshotter);
        let key = format!("coldread-{i}");
        let target = stack.work.path().join(format!("view-{i}"));
        std::fs::create_dir_all(&target).expect("mkdir view");
        // `--target` prints the mount command at once: ctr's temporary
        // lease lets the GC remove the view soon after.
        let mount_cmd = stack
            .ctrd
            .ctr(&[
                "snapshots",
                "--snapshotter",
                &stack.snapshotter,
                "view",
                "--target",
                &target.display().to_string(),
                &key,
                &chain,
            ])
            .stdout;
        support::run_ok(
            Command::new("sh").arg("-c").arg(mount_cmd.trim()),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("mount the view: {e}"));
        let _ = Command::new("sync").status();
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
        let b0 = stack.wan.bytes_down();
        let r0 = stack.registry.access_log().len();
        let file = target.join(COLD_FILE.trim_start_matches('/'));
        let t = Instant::now();
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let el = t.elapsed();
        assert_eq!(data.len(), COLD_SIZE, "cold file size");
        bytes = stack.wan.bytes_down() - b0;
        reqs = stack.registry.access_log().len() - r0;
        times.push(el.as_secs_f64() * 1e3);
        eprintln!(
            "  coldread {i}: {:.1} ms, {bytes} bytes, {reqs} requests",
            el.as_secs_f64() * 1e3
        );
        support::proc::unmount_all_under(&target);
        // ctr's temporary lease may already have let the GC remove the view.
        let _ = stack.ctrd.try_ctr(
            &["snapshots", "--snapshotter", &stack.snapshotter, "rm", &key],
            Duration::from_secs(30),
        );
        stack.wan.shape(false).expect("unshape");
    }
    let rtt_ms = opts.profile.rtt.as_secs_f64() * 1e3;
    ColdRead {
        profile: opts.profile.name.clone(),
        rtt_ms,
        mbit: opts.profile.rate_mbit,
        median_ms: stat(&times).median,
        samples_ms: times,
        bound_ms: opts
            .profile
            .bytes_per_sec()
            .map(|bps| 2.0 * rtt_ms + COLD_SIZE as f64 / bps * 1e3),
        bytes_fetched: bytes,
        requests: reqs,
    }
}

/// The committed snapshot no other snapshot has as parent: the image's top.
fn top_chain_id(ctrd: &Containerd, snapshotter: &str) -> String {
    let out = ctrd
        .ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])
        .stdout;
    let rows: Vec<Vec<String>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    let parents: Vec<&String> = rows
        .iter()
        .filter(|r| r.len() == 3)
        .map(|r| &r[1])
        .collect();
    rows.iter()
        .filter(|r| r.last().is_some_and(|k| k == "Committed"))
        .map(|r| &r[0])
        .find(|k| !parents.contains(k))
        .unwrap_or_else(|| panic!("no committed top snapshot:\n{out}"))
        .clone()
}

fn main() {
    let opts = parse_opts().unwrap_or_else(|e| {
        eprintln!("startup bench: {e}");
        std::process::exit(2);
    });
    let t_all = Instant::now();
    std::fs::create_dir_all(&opts.out)
        .unwrap_or_else(|e| panic!("create {}: {e}", opts.out.display()));
    let mut stack = Stack::start(&opts);
    let mut modes = opts.modes.clone();
    if modes.contains(&Mode::Estargz) && !stack.has_optimize {
        let msg = "mode estargz needs `rstargz optimize`, which this build does not have";
        if opts.smoke || opts.modes.len() > 1 {
            eprintln!("startup bench: {msg}; skipping that mode");
            modes.retain(|m| *m != Mode::Estargz);
        } else {
            eprintln!("startup bench: {msg}");
            std::process::exit(2);
        }
    }
    let opts = Opts { modes, ..opts };
    let specs: Vec<&ImageSpec> = opts
        .images
        .iter()
        .map(|n| {
            IMAGES
                .iter()
                .chain(std::iter::once(&SMOKE_IMAGE))
                .find(|s| s.name == n)
                .expect("checked")
        })
        .collect();
    let mut prepared = Vec::new();
    if !opts.coldread_only {
        for spec in &specs {
            check_interrupted();
            prepared.push((spec, stack.prepare_image(spec, &opts.modes)));
        }
    }
    // Measure the profile on the largest layer pushed.
    let bulk = match prepared.last() {
        Some((spec, _)) => stack.largest_blob_path(&format!("bench/{}", spec.name), "legacy"),
        None => {
            let dir = stack.work.path().join("oci-bulk");
            let l = build_oci_layout(&dir, "legacy", &[Layer::Entries(tiny_entries())], &["sh"]);
            stack
                .registry
                .push_oci_layout(&l.dir, "legacy", "bench/bulk");
            let _ = std::fs::remove_dir_all(&dir);
            stack.largest_blob_path("bench/bulk", "legacy")
        }
    };
    stack.wan.shape(true).expect("shape");
    let measured = stack
        .wan
        .measure(&bulk)
        .unwrap_or_else(|e| panic!("measure: {e}"));
    eprintln!("measured profile {}: {measured:?}", opts.profile.name);
    let mut rows = Vec::new();
    for (spec, sizes) in &prepared {
        rows.extend(rows_for(&mut stack, &opts, spec, sizes));
    }
    stack.wan.shape(false).expect("unshape");
    let cold = (opts.coldread || opts.coldread_only)
        .then(|| coldread(&mut stack, &opts, opts.samples.clamp(1, 5)));
    let res = Results {
        profile: opts.profile.name.clone(),
        measured,
        samples: opts.samples,
        rows,
        coldread: cold,
        background_fetch: opts.background_fetch,
    };
    let json = opts.out.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&res).expect("json")).expect("write json");
    let md = markdown(&res);
    std::fs::write(opts.out.join("results.md"), &md).expect("write md");
    let png = opts.out.join("startup.png");
    let chart_res = if res.rows.is_empty() {
        Ok(())
    } else {
        chart(&res, &png)
    };
    println!("{md}");
    println!(
        "results: {} , {}{} (wall {:.0}s)",
        json.display(),
        opts.out.join("results.md").display(),
        match &chart_res {
            Ok(()) if !res.rows.is_empty() => format!(", {}", png.display()),
            Ok(()) => String::new(),
            Err(e) => format!(" (no chart: {e})"),
        },
        t_all.elapsed().as_secs_f64()
    );
    if opts.smoke {
        // Every requested mode measured once (each sample already checked
        // the container's output), a chart, and a cold read that went to
        // the registry.
        for m in &opts.modes {
            assert!(
                res.rows.iter().any(|r| r.mode == *m),
                "smoke: mode {} missing",
                m.name()
            );
        }
        chart_res.unwrap_or_else(|e| panic!("smoke: {e}"));
        assert!(png.exists(), "smoke: no chart written");
        let c = res.coldread.as_ref().expect("smoke runs the cold read");
        assert!(
            c.bytes_fetched > 0,
            "cold read fetched nothing from the registry"
        );
    }
}
