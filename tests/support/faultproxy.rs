//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of a real
//! registry. Everything passes through untouched until a test arms a
//! [`Fault`]; then the matching requests (blob GETs by default) get that
//! fault, a given number of times or until the test clears it.
//!
//! Raw tokio TCP rather than an HTTP library: the faults are lies a
//! well-behaved server library refuses to tell (wrong `Content-Range`,
//! truncated or stalled bodies, resets). One request per connection: every
//! response says `Connection: close`.
//!
//! The proxy can also answer blob GETs with a redirect to itself
//! ([`FaultProxy::redirect_blobs`]), like a registry handing out signed
//! storage URLs; [`FaultProxy::expire_redirects`] makes every URL handed out
//! so far answer 403, as an expired signature does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What an armed proxy does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an empty body, without asking upstream.
    Status(u16),
    /// Close the connection with a TCP reset once the request is read.
    Reset,
    /// Send the headers and half the body, then go silent (the connection
    /// stays open until the proxy is dropped).
    StallMidBody,
    /// Send the body `bytes` at a time with `every` between pieces.
    Trickle { bytes: usize, every: Duration },
    /// Shift the `Content-Range` the answer declares by one byte (the body
    /// is what was asked for, the header lies about it).
    WrongContentRange,
    /// Ask upstream without the `Range` header and pass on its 200 with the
    /// whole blob, where a 206 was due.
    IgnoreRange,
    /// Declare the full `Content-Length`, send half the body, close.
    Truncate,
    /// Flip one byte in the middle of the body.
    FlipByte,
    /// Answer requests asking for several ranges with this status (400 or
    /// 416); single-range requests pass.
    RejectMultiRange(u16),
}

/// Which requests an armed fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `GET .../blobs/...` carrying a `Range` header: lazy reads.
    RangedBlobGets,
    /// Every `GET .../blobs/...`.
    BlobGets,
    /// Ranged blob GETs whose first range starts below this offset: spares
    /// the reads of a blob's tail (footer and TOC) that mounting does.
    RangedBlobGetsStartingBelow(u64),
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    target: Target,
    /// Injections left; `None`: until cleared.
    left: Option<u64>,
}

/// A request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    /// The fault it got, if any.
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct State {
    armed: Mutex<Option<Armed>>,
    seen: Mutex<Vec<Seen>>,
    injected: AtomicU64,
    redirect: AtomicBool,
    /// Redirect URLs carry the epoch they were issued in; older ones are
    /// expired.
    epoch: AtomicU64,
}

/// Most requests remembered in [`FaultProxy::seen`]; older ones are dropped.
const MAX_SEEN: usize = 10_000;
/// Largest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;

pub struct FaultProxy {
    /// `127.0.0.1:<port>`: use it as the registry host in references.
    pub host: String,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `upstream`
    /// (`host:port`, plain HTTP).
    pub fn start(upstream: &str) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("faultproxy")
            .enable_all()
            .build()
            .expect("fault proxy runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind fault proxy");
        let host = listener.local_addr().expect("proxy addr").to_string();
        let state = Arc::new(State::default());
        let (st, up, me) = (state.clone(), upstream.to_string(), host.clone());
        runtime.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (st, up, me) = (st.clone(), up.clone(), me.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, &st, &up, &me).await;
                });
            }
        });
        FaultProxy {
            host,
            state,
            runtime: Some(runtime),
        }
    }

    /// Arms `fault` for the next `times` matching requests (`None`: until
    /// [`clear`](Self::clear)).
    pub fn arm(&self, fault: Fault, target: Target, times: Option<u64>) {
        *self.state.armed.lock().unwrap() = Some(Armed {
            fault,
            target,
            left: times,
        });
    }

    pub fn clear(&self) {
        *self.state.armed.lock().unwrap() = None;
    }

    /// How many responses were faulted so far.
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::SeqCst)
    }

    /// Every request seen so far (the last [`MAX_SEEN`]).
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// From now on, blob GETs get a 307 to a URL on this proxy that serves
    /// the blob until [`expire_redirects`](Self::expire_redirects).
    pub fn redirect_blobs(&self, on: bool) {
        self.state.redirect.store(on, Ordering::SeqCst);
    }

    /// Every redirect URL handed out so far now answers 403.
    pub fn expire_redirects(&self) {
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

struct Request {
    method: String,
    path: String,
    /// Raw header lines, without the request line.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads one head (up to and including the blank line).
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let mut tmp = [0u8; 8192];
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn parse_head(head: &[u8]) -> Option<(String, Vec<(String, String)>)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let first = lines.next()?.to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((first, headers))
}

async fn read_request(sock: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let Some(end) = read_head(sock, &mut buf).await? else {
        return Ok(None);
    };
    let Some((first, headers)) = parse_head(&buf[..end]) else {
        return Ok(None);
    };
    let mut parts = first.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let len: usize = header(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let mut tmp = vec![0u8; (len - body.len()).min(1 << 16)];
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        body,
    }))
}

/// Upstream's answer, body read whole (test blobs are small).
struct Response {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn ask_upstream(
    upstream: &str,
    req: &Request,
    drop_range: bool,
) -> std::io::Result<Response> {
    let mut up = TcpStream::connect(upstream).await?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (k, v) in &req.headers {
        let skip =
            k.eq_ignore_ascii_case("connection") || (drop_range && k.eq_ignore_ascii_case("range"));
        if !skip {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).await?;
    up.write_all(&req.body).await?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw).await?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .ok_or_else(|| std::io::Error::other("upstream sent no head"))?;
    let (status_line, headers) =
        parse_head(&raw[..end]).ok_or_else(|| std::io::Error::other("bad upstream head"))?;
    let body = raw[end..].to_vec();
    if header(&headers, "transfer-encoding").is_some() {
        return Err(std::io::Error::other(
            "chunked upstream answers unsupported",
        ));
    }
    Ok(Response {
        status_line,
        headers,
        body,
    })
}

fn is_blob_get(req: &Request) -> bool {
    req.method == "GET" && req.path.contains("/blobs/")
}

/// Takes one injection of the armed fault if `req` matches it.
fn take_fault(state: &State, req: &Request) -> Option<Fault> {
    let mut armed = state.armed.lock().unwrap();
    let a = armed.as_mut()?;
    let matches = is_blob_get(req)
        && match a.target {
            Target::BlobGets => true,
            Target::RangedBlobGets => req.header("range").is_some(),
            Target::RangedBlobGetsStartingBelow(limit) => req
                .header("range")
                .and_then(|r| r.trim().strip_prefix("bytes="))
                .and_then(|r| r.split('-').next())
                .and_then(|start| start.trim().parse::<u64>().ok())
                .is_some_and(|start| start < limit),
        };
    let multi = req.header("range").is_some_and(|r| r.contains(','));
    if !matches || (matches!(a.fault, Fault::RejectMultiRange(_)) && !multi) {
        return None;
    }
    if let Some(left) = &mut a.left {
        if *left == 0 {
            return None;
        }
        *left -= 1;
    }
    state.injected.fetch_add(1, Ordering::SeqCst);
    Some(a.fault.clone())
}

const REDIRECT_PREFIX: &str = "/__redirected/";

async fn serve(
    mut sock: TcpStream,
    state: &State,
    upstream: &str,
    me: &str,
) -> std::io::Result<()> {
    let Some(mut req) = read_request(&mut sock).await? else {
        return Ok(());
    };
    // A redirect target: `/__redirected/<epoch>/<original path>`.
    if let Some(rest) = req.path.strip_prefix(REDIRECT_PREFIX) {
        let (epoch, orig) = rest.split_once('/').unwrap_or((rest, ""));
        if epoch.parse::<u64>().ok() != Some(state.epoch.load(Ordering::SeqCst)) {
            record(state, &req, None);
            return write_simple(&mut sock, 403).await;
        }
        req.path = format!("/{orig}");
    } else if is_blob_get(&req) && state.redirect.load(Ordering::SeqCst) {
        record(state, &req, None);
        let location = format!(
            "http://{me}{REDIRECT_PREFIX}{}{}",
            state.epoch.load(Ordering::SeqCst),
            req.path
        );
        let head = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return sock.write_all(head.as_bytes()).await;
    }
    let fault = take_fault(state, &req);
    record(state, &req, fault.clone());
    match fault {
        Some(Fault::Status(code)) | Some(Fault::RejectMultiRange(code)) => {
            return write_simple(&mut sock, code).await;
        }
        Some(Fault::Reset) => {
            // A zero linger makes the close a reset and never blocks.
            #[allow(deprecated)]
            sock.set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        _ => {}
    }
    let resp = ask_upstream(upstream, &req, fault == Some(Fault::IgnoreRange)).await?;
    let mut headers = resp.headers;
    let mut body = resp.body;
    // HEAD answers keep upstream's length (of a body they do not carry).
    let is_head = req.method == "HEAD";
    headers.retain(|(k, _)| {
        !k.eq_ignore_ascii_case("connection")
            && (is_head || !k.eq_ignore_ascii_case("content-length"))
    });
    match &fault {
        Some(Fault::FlipByte) if !body.is_empty() => {
            let mid = body.len() / 2;
            body[mid] ^= 0x5a;
        }
        Some(Fault::WrongContentRange) => shift_content_range(&mut headers, &mut body),
        _ => {}
    }
    // The length of what is meant to arrive (a truncated body declares it
    // all).
    if !is_head {
        headers.push(("Content-Length".to_string(), body.len().to_string()));
    }
    let mut head = format!("{}\r\n", resp.status_line);
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    sock.write_all(head.as_bytes()).await?;
    match fault {
        Some(Fault::StallMidBody) => {
            sock.write_all(&body[..body.len() / 2]).await?;
            sock.flush().await?;
            // Silent until the proxy goes away (its runtime is shut down).
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some(Fault::Truncate) => {
            sock.write_all(&body[..body.len() / 2]).await?;
        }
        Some(Fault::Trickle { bytes, every }) => {
            for piece in body.chunks(bytes.max(1)) {
                sock.write_all(piece).await?;
                sock.flush().await?;
                tokio::time::sleep(every).await;
            }
        }
        _ => sock.write_all(&body).await?,
    }
    sock.shutdown().await
}

fn record(state: &State, req: &Request, fault: Option<Fault>) {
    let mut seen = state.seen.lock().unwrap();
    if seen.len() >= MAX_SEEN {
        seen.remove(0);
    }
    seen.push(Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        range: req.header("range").map(str::to_string),
        fault,
    });
}

async fn write_simple(sock: &mut TcpStream, code: u16) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nRetry-After: 0\r\n\
         Connection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await?;
    sock.shutdown().await
}

/// `bytes a-b/n` becomes `bytes (a+1)-(b+1)/n`, in the header of a single
/// range answer or in the first part of a multipart one.
fn shift_content_range(headers: &mut [(String, String)], body: &mut Vec<u8>) {
    fn shifted(v: &str) -> Option<String> {
        let spec = v.trim().strip_prefix("bytes ")?;
        let (range, total) = spec.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
        Some(format!("bytes {}-{}/{total}", a + 1, b + 1))
    }
    if let Some((_, v)) = headers
        .iter_mut()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-range"))
    {
        if let Some(s) = shifted(v) {
            *v = s;
        }
        return;
    }
    // Multipart: rewrite the first part's header line in place (part
    // headers come before any binary data).
    let key = b"content-range:";
    let Some(at) = body
        .windows(key.len())
        .position(|w| w.eq_ignore_ascii_case(key))
    else {
        return;
    };
    let Some(line_end) = body[at..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| at + i)
    else {
        return;
    };
    let value = String::from_utf8_lossy(&body[at + key.len()..line_end]).into_owned();
    if let Some(s) = shifted(&value) {
        let mut out = body[..at].to_vec();
        out.extend_from_slice(format!("Content-Range: {s}").as_bytes());
        out.extend_from_slice(&body[line_end..]);
        *body = out;
    }
}
