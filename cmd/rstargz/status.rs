//! `rstargz status`: asks a running daemon for `GET /status` (or
//! `/metrics`) on its status socket and prints a table, JSON or the
//! Prometheus text.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

/// Default status socket: next to the default gRPC socket.
const DEFAULT_SOCKET: &str = "/run/containerd-stargz-grpc/rstargz-metrics.sock";

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Status socket of the daemon, or a TCP `host:port` when the daemon
    /// has `[metrics] tcp_address`.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    address: String,
    /// Print the daemon's JSON as it is.
    #[arg(long, conflicts_with = "metrics")]
    json: bool,
    /// Print the Prometheus metrics instead.
    #[arg(long)]
    metrics: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let path = if args.metrics { "/metrics" } else { "/status" };
    let body = get(&args.address, path)?;
    if args.json || args.metrics {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_str(&body).context("daemon sent invalid JSON")?;
    print!("{}", table(&v));
    Ok(ExitCode::SUCCESS)
}

/// One HTTP/1.1 GET with `Connection: close`; returns the body of a 200.
fn get(address: &str, path: &str) -> anyhow::Result<String> {
    let timeout = Some(Duration::from_secs(30));
    let request = format!("GET {path} HTTP/1.1\r\nHost: rstargz\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    if address.starts_with('/') || address.starts_with('.') {
        let mut s = std::os::unix::net::UnixStream::connect(address)
            .with_context(|| format!("connecting to {address} (is rstargz-grpc running?)"))?;
        s.set_read_timeout(timeout)?;
        s.set_write_timeout(timeout)?;
        s.write_all(request.as_bytes())?;
        s.read_to_end(&mut raw)?;
    } else {
        let mut s = std::net::TcpStream::connect(address)
            .with_context(|| format!("connecting to {address}"))?;
        s.set_read_timeout(timeout)?;
        s.set_write_timeout(timeout)?;
        s.write_all(request.as_bytes())?;
        s.read_to_end(&mut raw)?;
    }
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {address}");
    };
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{address}{path}: {status}: {}", body.trim());
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("unexpected chunked response from {address}");
    }
    Ok(body.to_string())
}

fn table(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(
        out,
        "{:<19}  {:>5}  {:<8}  {:<8}  {:<8}  {:>21}  {:>17}  {:>8}  {:>9}  MOUNTPOINT",
        "LAYER",
        "SLOT",
        "TOC FROM",
        "VERIFIED",
        "PREFETCH",
        "FETCHED/TOTAL",
        "CHUNKS MEM/DSK/NET",
        "FETCHES",
        "AVG ms"
    );
    let layers = v.get("layers").and_then(Value::as_array);
    for l in layers.into_iter().flatten() {
        let s = &l["stats"];
        let digest = l["digest"].as_str().unwrap_or("?");
        let short: String = digest.chars().take(19).collect();
        let fetches = u(s, "fetches");
        let avg = if fetches == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}",
                u(s, "fetch_latency_us_sum") as f64 / fetches as f64 / 1000.0
            )
        };
        let _ = writeln!(
            out,
            "{short:<19}  {:>5}  {:<8}  {:<8}  {:<8}  {:>21}  {:>17}  {fetches:>8}  {avg:>9}  {}",
            u(l, "slot"),
            l["tail_source"].as_str().unwrap_or("?"),
            l["verified"].as_bool().unwrap_or(false),
            l["prefetch"].as_str().unwrap_or("?"),
            format!("{}/{}", u(s, "bytes_fetched"), u(s, "blob_size")),
            format!(
                "{}/{}/{}",
                u(s, "chunks_from_memory"),
                u(s, "chunks_from_disk"),
                u(s, "chunks_from_network")
            ),
            l["mountpoint"].as_str().unwrap_or("?"),
        );
    }
    let c = &v["cache"];
    let _ = writeln!(
        out,
        "\ncache: memory {}/{} bytes ({} chunks), disk {}/{} bytes ({} chunks, {} hits, {} misses)",
        u(c, "memory_bytes"),
        u(c, "memory_capacity"),
        u(c, "memory_entries"),
        u(c, "disk_bytes"),
        u(c, "disk_capacity"),
        u(c, "disk_entries"),
        u(c, "disk_hits"),
        u(c, "disk_misses"),
    );
    let fallbacks = v.get("fallbacks").and_then(Value::as_array);
    let _ = writeln!(out, "fallbacks: {} since start", u(v, "fallbacks_total"));
    for f in fallbacks.into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} {}: {}",
            f["digest"].as_str().unwrap_or("(no digest label)"),
            f["reference"].as_str().unwrap_or("(no reference label)"),
            f["reason"].as_str().unwrap_or("?"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_lists_layers_and_fallbacks() {
        let v = serde_json::json!({
            "layers": [{"digest": "sha256:0123456789abcdef0123", "verified": true,
                "prefetch": "Done", "mountpoint": "/m",
                "stats": {"bytes_fetched": 10, "blob_size": 100, "fetches": 2,
                          "fetch_latency_us_sum": 3000}}],
            "cache": {}, "fallbacks_total": 1,
            "fallbacks": [{"digest": "sha256:ff", "reason": "no TOC digest"}]
        });
        let t = super::table(&v);
        assert!(t.contains("sha256:0123456789ab"), "{t}");
        assert!(t.contains("10/100") && t.contains("1.5"), "{t}");
        assert!(
            t.contains("sha256:ff (no reference label): no TOC digest"),
            "{t}"
        );
    }
}
