//! The daemon's status endpoint: a small HTTP/1 server on its own unix
//! socket (and, when configured, a loopback TCP address).
//!
//! - `GET /status`: [`StatusReport`] as JSON — every lazily mounted layer
//!   with its statistics, the shared caches, and the most recent layers
//!   that fell back to a normal pull, with their reasons.
//! - `GET /metrics`: the same numbers in the Prometheus text format. Layer
//!   series carry a `layer="<digest>"` label and are built from the mounts
//!   present at scrape time, so an unmounted layer's series disappear.
//!
//! The snapshotter never sees this module: the daemon's `main` hands an
//! `Arc<LazyFs>` to [`serve`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::fs::cache::CacheStatus;
use crate::fs::layer::stats::LATENCY_BUCKETS_MS;
use crate::fs::lazy::{Fallback, LayerStatus, LazyFs};

/// File name of the status socket, next to the gRPC socket by default.
pub const DEFAULT_SOCKET_NAME: &str = "rstargz-metrics.sock";
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// A connection (request read, response written) gets this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// `[metrics]` in the daemon config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/status` and `/metrics` (only when lazy pulling is enabled).
    pub enabled: bool,
    /// Unix socket to serve on. Unset: `rstargz-metrics.sock` in the
    /// directory of the gRPC socket.
    pub address: Option<PathBuf>,
    /// Also listen on this TCP address (for example `127.0.0.1:9101`).
    /// Unset by default: no TCP port is opened unless asked for.
    pub tcp_address: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            address: None,
            tcp_address: None,
        }
    }
}

impl MetricsConfig {
    /// The unix socket path, given the gRPC socket's.
    pub fn socket_path(&self, grpc_address: &Path) -> PathBuf {
        match &self.address {
            Some(a) => a.clone(),
            None => grpc_address
                .parent()
                .unwrap_or(Path::new("/"))
                .join(DEFAULT_SOCKET_NAME),
        }
    }
}

/// The body of `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub layers: Vec<LayerStatus>,
    pub cache: CacheStatus,
    /// Fallbacks since the daemon started (the list below is bounded).
    pub fallbacks_total: u64,
    /// The most recent fallbacks, oldest first.
    pub fallbacks: Vec<Fallback>,
}

impl StatusReport {
    pub fn collect(fs: &LazyFs) -> StatusReport {
        let (fallbacks_total, fallbacks) = fs.fallbacks();
        StatusReport {
            layers: fs.status(),
            cache: fs.caches().status(),
            fallbacks_total,
            fallbacks,
        }
    }
}

/// Serves until `shutdown` resolves. Accept errors (fd exhaustion) are
/// logged and retried after a pause; connections are bounded.
pub async fn serve<L, S>(fs: Arc<LazyFs>, listener: L, shutdown: impl Future<Output = ()>)
where
    L: Listener<Stream = S>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => return,
            r = listener.accept_stream() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "status endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let fs = fs.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| handle(fs.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "status endpoint: connection error"),
                Err(_) => tracing::debug!("status endpoint: connection timed out"),
            }
        });
    }
}

/// A listener [`serve`] accepts from (unix or TCP).
pub trait Listener {
    type Stream;
    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

async fn handle(
    fs: Arc<LazyFs>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ctype: &str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"only GET\n".to_vec(),
        ));
    }
    Ok(match req.uri().path() {
        "/status" => {
            let report = StatusReport::collect(&fs);
            match serde_json::to_vec_pretty(&report) {
                Ok(mut body) => {
                    body.push(b'\n');
                    reply(StatusCode::OK, "application/json", body)
                }
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n").into_bytes(),
                ),
            }
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(&StatusReport::collect(&fs)).into_bytes(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"try /status or /metrics\n".to_vec(),
        ),
    })
}

/// Prometheus text exposition of `report`. Layers sharing a digest (one
/// blob mounted for two chain IDs) are summed into one series.
pub fn render_metrics(report: &StatusReport) -> String {
    let mut by_digest: BTreeMap<&str, Vec<&LayerStatus>> = BTreeMap::new();
    for l in &report.layers {
        by_digest.entry(l.digest.as_str()).or_default().push(l);
    }
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, f: &dyn Fn(&LayerStatus) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (digest, ls) in &by_digest {
            let v: u64 = ls.iter().map(|l| f(l)).sum();
            let _ = writeln!(out, "{name}{{layer=\"{}\"}} {v}", escape(digest));
        }
    };
    family(
        "rstargz_layer_blob_bytes",
        "gauge",
        "Compressed size of the layer blob.",
        &|l| l.stats.blob_size,
    );
    family(
        "rstargz_layer_fetched_bytes_total",
        "counter",
        "Compressed bytes received from the registry.",
        &|l| l.stats.bytes_fetched,
    );
    family(
        "rstargz_layer_served_bytes_total",
        "counter",
        "Uncompressed bytes returned to readers.",
        &|l| l.stats.bytes_served,
    );
    family(
        "rstargz_layer_fetches_total",
        "counter",
        "Registry requests (each possibly multi-range).",
        &|l| l.stats.fetches,
    );
    family(
        "rstargz_layer_fetch_errors_total",
        "counter",
        "Failed registry requests.",
        &|l| l.stats.fetch_errors,
    );
    family(
        "rstargz_layer_verification_failures_total",
        "counter",
        "Chunks whose digest did not match the TOC.",
        &|l| l.stats.verification_failures,
    );
    family(
        "rstargz_layer_verified",
        "gauge",
        "1 when the layer's TOC digest was checked.",
        &|l| u64::from(l.verified),
    );
    // Chunk sources: one family, a `source` label.
    out.push_str("# HELP rstargz_layer_chunks_total Chunks read, by where they came from.\n");
    out.push_str("# TYPE rstargz_layer_chunks_total counter\n");
    for (digest, ls) in &by_digest {
        let sum = |f: fn(&LayerStatus) -> u64| ls.iter().map(|l| f(l)).sum::<u64>();
        for (source, v) in [
            ("memory", sum(|l| l.stats.chunks_from_memory)),
            ("disk", sum(|l| l.stats.chunks_from_disk)),
            ("network", sum(|l| l.stats.chunks_from_network)),
            ("tail", sum(|l| l.stats.chunks_from_tail)),
        ] {
            let _ = writeln!(
                out,
                "rstargz_layer_chunks_total{{layer=\"{}\",source=\"{source}\"}} {v}",
                escape(digest)
            );
        }
    }
    out.push_str("# HELP rstargz_layer_fetch_duration_seconds Registry request latency.\n");
    out.push_str("# TYPE rstargz_layer_fetch_duration_seconds histogram\n");
    for (digest, ls) in &by_digest {
        let d = escape(digest);
        let mut cumulative = 0u64;
        for (i, le_ms) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += ls
                .iter()
                .map(|l| l.stats.fetch_latency_buckets.get(i).copied().unwrap_or(0))
                .sum::<u64>();
            let _ = writeln!(
                out,
                "rstargz_layer_fetch_duration_seconds_bucket{{layer=\"{d}\",le=\"{}\"}} {cumulative}",
                *le_ms as f64 / 1000.0
            );
        }
        let count: u64 = ls.iter().map(|l| l.stats.fetches).sum();
        let sum_us: u64 = ls.iter().map(|l| l.stats.fetch_latency_us_sum).sum();
        let _ = writeln!(
            out,
            "rstargz_layer_fetch_duration_seconds_bucket{{layer=\"{d}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "rstargz_layer_fetch_duration_seconds_sum{{layer=\"{d}\"}} {}",
            sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "rstargz_layer_fetch_duration_seconds_count{{layer=\"{d}\"}} {count}"
        );
    }
    let c = &report.cache;
    for (name, kind, help, v) in [
        (
            "rstargz_layers_mounted",
            "gauge",
            "Layers mounted lazily.",
            report.layers.len() as u64,
        ),
        (
            "rstargz_fallbacks_total",
            "counter",
            "Layers that fell back to a normal pull.",
            report.fallbacks_total,
        ),
        (
            "rstargz_cache_memory_bytes",
            "gauge",
            "Bytes in the memory chunk cache.",
            c.memory_bytes,
        ),
        (
            "rstargz_cache_disk_bytes",
            "gauge",
            "Bytes in the disk chunk cache.",
            c.disk_bytes,
        ),
        (
            "rstargz_cache_disk_hits_total",
            "counter",
            "Disk cache hits.",
            c.disk_hits,
        ),
        (
            "rstargz_cache_disk_misses_total",
            "counter",
            "Disk cache misses.",
            c.disk_misses,
        ),
        (
            "rstargz_cache_disk_evictions_total",
            "counter",
            "Disk cache evictions.",
            c.disk_evictions,
        ),
        (
            "rstargz_cache_disk_write_errors_total",
            "counter",
            "Failed disk cache writes.",
            c.disk_write_errors,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    out
}

/// Label value escaping of the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_defaults_next_to_grpc_socket() {
        let c = MetricsConfig::default();
        assert_eq!(
            c.socket_path(Path::new("/run/x/grpc.sock")),
            PathBuf::from("/run/x/rstargz-metrics.sock")
        );
        assert!(c.tcp_address.is_none(), "no TCP port by default");
    }

    use crate::snapshotter::RemoteFs;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn lazy_fs(dir: &Path) -> Arc<LazyFs> {
        let fs = LazyFs::new(
            Default::default(),
            Default::default(),
            Default::default(),
            dir,
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        Arc::new(fs)
    }

    async fn get(sock: &Path, path: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_status_metrics_and_bounded_fallbacks() {
        let d = tempfile::tempdir().unwrap();
        let fs = lazy_fs(d.path()).await;
        // Declined mounts are fallbacks; the ring keeps the newest ones.
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot/cri.layer-digest".to_string(),
            "sha256:aa".to_string(),
        );
        for i in 0..crate::fs::lazy::FALLBACK_HISTORY + 3 {
            let mp = d.path().join(format!("m{i}"));
            assert!(fs.mount(&mp, &labels).await.is_err());
        }
        let (total, ring) = fs.fallbacks();
        assert_eq!(total, crate::fs::lazy::FALLBACK_HISTORY as u64 + 3);
        assert_eq!(ring.len(), crate::fs::lazy::FALLBACK_HISTORY);
        assert_eq!(ring[0].mountpoint, d.path().join("m3"), "oldest dropped");
        assert_eq!(ring[0].digest.as_deref(), Some("sha256:aa"));
        assert!(ring[0].reason.contains("image reference"), "{:?}", ring[0]);

        let sock = d.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(fs, listener, async {
            let _ = rx.await;
        }));
        let status = get(&sock, "/status").await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(status.contains("application/json"), "{status}");
        let body = status.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["fallbacks_total"], total);
        assert_eq!(v["layers"].as_array().unwrap().len(), 0);
        let metrics = get(&sock, "/metrics").await;
        let line = format!("rstargz_fallbacks_total {total}\n");
        assert!(metrics.contains(&line), "{metrics}");
        assert!(get(&sock, "/nope").await.starts_with("HTTP/1.1 404"));
        let _ = tx.send(());
        server.await.unwrap();
    }

    #[test]
    fn empty_report_renders_globals_only() {
        let r = StatusReport {
            layers: Vec::new(),
            cache: CacheStatus::default(),
            fallbacks_total: 3,
            fallbacks: Vec::new(),
        };
        let m = render_metrics(&r);
        assert!(m.contains("rstargz_fallbacks_total 3\n"), "{m}");
        assert!(m.contains("rstargz_layers_mounted 0\n"), "{m}");
        assert!(!m.contains("layer=\""), "{m}");
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
