//! A simulated WAN between the host and a registry, for the benchmarks.
//!
//! - A network namespace of this run's own (`rstargz-bench-<pid>`) and a
//!   veth pair whose addresses (a private /30) exist only on the host end
//!   and inside the namespace. The registry listens inside it.
//! - `tc qdisc tbf` on both ends of the veth for the rate. This kernel has
//!   no `netem`, so the delay comes from [`Relay`]: a TCP relay on
//!   `127.0.0.1:<free port>` that forwards to the registry over the veth and
//!   holds every chunk for RTT/2 per direction (a timestamped queue per
//!   direction: order kept, throughput not limited), plus one RTT before the
//!   first byte of a connection goes upstream, standing in for the TCP
//!   handshake the loopback connect to the relay does not pay.
//! - [`Wan::measure`] checks what was built: first request on a new
//!   connection (handshake + one round trip), ping-pong round trip of small
//!   requests on an open connection, and bulk throughput of a blob.
//!
//! The namespace (and with it the veth pair and both qdiscs) is deleted on
//! drop, on panic unwinding, and after Ctrl-C (the handler only sets a flag
//! the benchmark polls, so guards still run). A namespace left by a run
//! that was killed outright is removed by the next run.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A network profile: round-trip time and rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub name: String,
    pub rtt: Duration,
    /// Rate in Mbit/s each way; `None` = unshaped.
    pub rate_mbit: Option<u32>,
}

impl Profile {
    /// `20ms-200mbit`, `50ms-50mbit`, `loopback`, or any `<N>ms-<M>mbit`.
    pub fn parse(name: &str) -> Result<Profile, String> {
        if name == "loopback" {
            return Ok(Profile {
                name: name.into(),
                rtt: Duration::ZERO,
                rate_mbit: None,
            });
        }
        let bad = || format!("profile {name:?}: expected loopback or <N>ms-<M>mbit");
        let (ms, mbit) = name.split_once('-').ok_or_else(bad)?;
        let ms: u64 = ms
            .strip_suffix("ms")
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        let mbit: u32 = mbit
            .strip_suffix("mbit")
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if mbit == 0 || ms > 10_000 {
            return Err(bad());
        }
        Ok(Profile {
            name: name.into(),
            rtt: Duration::from_millis(ms),
            rate_mbit: Some(mbit),
        })
    }

    /// Bytes per second, if shaped.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        self.rate_mbit.map(|m| m as f64 * 1e6 / 8.0)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once SIGINT or SIGTERM arrived; the benchmark stops at the next step.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Panics (so every guard unwinds and cleans up) if interrupted.
pub fn check_interrupted() {
    if interrupted() {
        panic!("interrupted: cleaning up");
    }
}

/// The namespace, the veth pair, the qdiscs and the relay.
pub struct Wan {
    pub netns: String,
    pub host_ip: String,
    /// Address of the namespace end: the registry listens here.
    pub ns_ip: String,
    pub profile: Profile,
    host_if: String,
    ns_if: String,
    shaped: bool,
    relay: Option<Relay>,
    rt: tokio::runtime::Runtime,
}

/// What [`Wan::measure`] found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measured {
    pub profile: String,
    /// Connect plus one small request on a fresh connection through the
    /// relay (handshake + round trip: about 2 x RTT).
    pub connect_first_request_ms: f64,
    /// Median round trip of a small request on an open connection.
    pub ping_rtt_ms: f64,
    pub ping_rtt_min_ms: f64,
    pub ping_rtt_max_ms: f64,
    /// Throughput of one GET of `bulk_bytes`, first byte to last.
    pub bulk_mbit_s: f64,
    pub bulk_bytes: u64,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Deletes `rstargz-bench-<pid>` namespaces whose process is gone.
fn reap_stale_netns() {
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("rstargz-bench-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
            let _ = sh(&["ip", "link", "del", &format!("rsb{pid}h")]);
            eprintln!("wan: removed stale namespace {name}");
        }
    }
}

/// A /30 in 10.250.0.0/16 no interface uses yet: (host ip, namespace ip).
fn pick_subnet(pid: u32) -> Result<(String, String), String> {
    let used = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for k in 0..16384u32 {
        let idx = (pid + k) % 16384;
        let (a, b) = (idx / 64, (idx % 64) * 4);
        let net = format!("10.250.{a}.{b}/30");
        let host = format!("10.250.{a}.{}", b + 1);
        let ns = format!("10.250.{a}.{}", b + 2);
        if !used.contains(&format!(" {host}/")) && !used.contains(&format!(" {ns}/")) {
            let _ = net;
            return Ok((host, ns));
        }
    }
    Err("no free /30 in 10.250.0.0/16".into())
}

impl Wan {
    /// Creates the namespace and veth pair, unshaped. Call [`Wan::shape`]
    /// before measuring.
    pub fn create(profile: Profile) -> Result<Wan, String> {
        reap_stale_netns();
        let pid = std::process::id();
        let netns = format!("rstargz-bench-{pid}");
        let host_if = format!("rsb{pid}h");
        let ns_if = format!("rsb{pid}n");
        let (host_ip, ns_ip) = pick_subnet(pid)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wan-relay")
            .enable_all()
            .build()
            .map_err(|e| format!("relay runtime: {e}"))?;
        rt.spawn(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("wan: signal received, stopping after the current step");
            INTERRUPTED.store(true, Ordering::Relaxed);
        });
        let wan = Wan {
            netns: netns.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            profile,
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            shaped: false,
            relay: None,
            rt,
        };
        // From here on, Drop removes whatever was made.
        sh(&["ip", "netns", "add", &netns])?;
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", &netns])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        let nsx = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", netns.as_str()];
            v.extend_from_slice(args);
            sh(&v)
        };
        nsx(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        nsx(&["ip", "link", "set", &ns_if, "up"])?;
        nsx(&["ip", "link", "set", "lo", "up"])?;
        Ok(wan)
    }

    fn ns_cmd<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.netns.as_str()];
        v.extend_from_slice(args);
        v
    }

    /// Applies the profile (`true`: tbf on both veth ends and the relay
    /// delay) or removes it (`false`: setup traffic such as pushing images
    /// runs at full speed).
    pub fn shape(&mut self, on: bool) -> Result<(), String> {
        let one_way = if on {
            self.profile.rtt / 2
        } else {
            Duration::ZERO
        };
        if let Some(r) = &self.relay {
            r.state
                .one_way_us
                .store(one_way.as_micros() as u64, Ordering::Relaxed);
        }
        if self.shaped {
            let _ = sh(&["tc", "qdisc", "del", "dev", &self.host_if, "root"]);
            let _ = sh(&self.ns_cmd(&["tc", "qdisc", "del", "dev", &self.ns_if, "root"]));
            self.shaped = false;
        }
        if let (true, Some(mbit)) = (on, self.profile.rate_mbit) {
            // Bucket: 5 ms of traffic, at least 32 KiB (a few full frames
            // at any rate); queue up to 50 ms before tail drop.
            let burst = ((mbit as u64 * 1_000_000 / 8) / 200).max(32 * 1024);
            let rate = format!("{mbit}mbit");
            let burst = burst.to_string();
            let tbf = |dev: &str| -> Vec<String> {
                [
                    "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "50ms",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            self.shaped = true;
            let h = tbf(&self.host_if);
            sh(&h.iter().map(String::as_str).collect::<Vec<_>>())?;
            let n = tbf(&self.ns_if);
            let n: Vec<&str> = n.iter().map(String::as_str).collect();
            sh(&self.ns_cmd(&n))?;
        }
        Ok(())
    }

    /// Starts the delaying relay to `upstream` (the registry in the
    /// namespace); returns its `127.0.0.1:<port>`.
    pub fn start_relay(&mut self, upstream: SocketAddr) -> Result<SocketAddr, String> {
        let relay = self.rt.block_on(Relay::start(upstream))?;
        let addr = relay.addr;
        self.relay = Some(relay);
        Ok(addr)
    }

    fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay started")
    }

    /// Bytes the relay delivered from the registry to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.relay().state.down.load(Ordering::Relaxed)
    }

    /// Bytes the relay delivered from clients to the registry so far.
    pub fn bytes_up(&self) -> u64 {
        self.relay().state.up.load(Ordering::Relaxed)
    }

    /// Connections accepted by the relay so far.
    pub fn connections(&self) -> u64 {
        self.relay().state.conns.load(Ordering::Relaxed)
    }

    /// Measures the profile through the relay: `bulk_path` is a registry
    /// path (`/v2/<name>/blobs/<digest>`) of a large blob.
    pub fn measure(&self, bulk_path: &str) -> Result<Measured, String> {
        let addr = self.relay().addr;
        let host = addr.to_string();
        self.rt.block_on(async move {
            let t = Instant::now();
            let mut c = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            c.set_nodelay(true).map_err(|e| e.to_string())?;
            http_get(&mut c, &host, "/v2/").await?;
            let first = t.elapsed();
            let mut pings = Vec::new();
            for _ in 0..15 {
                let t = Instant::now();
                http_get(&mut c, &host, "/v2/").await?;
                pings.push(t.elapsed());
            }
            pings.sort();
            let t = Instant::now();
            let mut c = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let (n, first_byte) = http_get_timed(&mut c, &host, bulk_path).await?;
            let total = t.elapsed();
            let xfer = total.saturating_sub(first_byte).as_secs_f64().max(1e-6);
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            Ok(Measured {
                profile: self.profile.name.clone(),
                connect_first_request_ms: ms(first),
                ping_rtt_ms: ms(pings[pings.len() / 2]),
                ping_rtt_min_ms: ms(pings[0]),
                ping_rtt_max_ms: ms(pings[pings.len() - 1]),
                bulk_mbit_s: n as f64 * 8.0 / xfer / 1e6,
                bulk_bytes: n,
            })
        })
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop.notify_waiters();
        }
        // Deleting the namespace deletes its veth end, hence the pair and
        // both qdiscs; the host end is deleted explicitly in case the
        // namespace move never happened.
        let _ = sh(&["ip", "netns", "del", &self.netns]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

/// `GET path` with keep-alive; returns the body length.
async fn http_get(c: &mut TcpStream, host: &str, path: &str) -> Result<u64, String> {
    http_get_timed(c, host, path).await.map(|(n, _)| n)
}

/// `GET path`; returns the body length and the time to the first byte of
/// the response. Follows no redirects (the registry serves blobs itself).
async fn http_get_timed(
    c: &mut TcpStream,
    host: &str,
    path: &str,
) -> Result<(u64, Duration), String> {
    let t = Instant::now();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n");
    c.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let mut first = None;
    // Headers byte by byte: small, and no body bytes are over-read.
    while !head.ends_with(b"\r\n\r\n") {
        let n = c.read(&mut b).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("GET {path}: connection closed in headers"));
        }
        first.get_or_insert_with(|| t.elapsed());
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Err(format!("GET {path}: headers too long"));
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(format!("GET {path}: status {status}"));
    }
    let len: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("GET {path}: no Content-Length"))?;
    let mut left = len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = c.read(&mut buf[..want]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("GET {path}: closed with {left} bytes left"));
        }
        left -= n as u64;
    }
    Ok((len, first.unwrap_or_default()))
}

struct RelayState {
    /// Delay per direction, microseconds (RTT/2); 0 while unshaped.
    one_way_us: AtomicU64,
    down: AtomicU64,
    up: AtomicU64,
    conns: AtomicU64,
}

/// The delaying TCP relay (see the module comment).
pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<RelayState>,
    stop: Arc<tokio::sync::Notify>,
}

/// Chunks queued per direction before the reader waits: with 64 KiB reads,
/// up to 16 MiB in flight, far above rate x delay of any profile here.
const QUEUE_CHUNKS: usize = 256;
const READ_CHUNK: usize = 64 * 1024;

impl Relay {
    async fn start(upstream: SocketAddr) -> Result<Relay, String> {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("relay bind: {e}"))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let state = Arc::new(RelayState {
            one_way_us: AtomicU64::new(0),
            down: AtomicU64::new(0),
            up: AtomicU64::new(0),
            conns: AtomicU64::new(0),
        });
        let stop = Arc::new(tokio::sync::Notify::new());
        let (st, sp) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    _ = sp.notified() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                st.conns.fetch_add(1, Ordering::Relaxed);
                let st = st.clone();
                let sp = sp.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = relay_conn(client, upstream, st) => {}
                        _ = sp.notified() => {}
                    }
                });
            }
        });
        Ok(Relay { addr, state, stop })
    }
}

async fn relay_conn(client: TcpStream, upstream: SocketAddr, st: Arc<RelayState>) {
    let one_way = Duration::from_micros(st.one_way_us.load(Ordering::Relaxed));
    // The client's connect to 127.0.0.1 cost nothing; a real one costs a
    // round trip before the first byte can leave.
    tokio::time::sleep(one_way * 2).await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, st.clone(), false);
    let down = pipe(sr, cw, st, true);
    let _ = tokio::join!(up, down);
}

/// Copies `r` to `w`, each chunk released RTT/2 after it was read.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<RelayState>,
    down: bool,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE_CHUNKS);
    let st2 = st.clone();
    let reader = async move {
        loop {
            let mut buf = vec![0u8; READ_CHUNK];
            let n = r.read(&mut buf).await.unwrap_or(0);
            let due =
                Instant::now() + Duration::from_micros(st2.one_way_us.load(Ordering::Relaxed));
            let item = (n > 0).then(|| {
                buf.truncate(n);
                buf
            });
            let eof = item.is_none();
            if tx.send((due, item)).await.is_err() || eof {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, item)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            match item {
                Some(b) => {
                    if w.write_all(&b).await.is_err() {
                        return;
                    }
                    let c = if down { &st.down } else { &st.up };
                    c.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                None => {
                    let _ = w.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
