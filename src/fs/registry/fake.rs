//! A scriptable HTTP/1.1 server on 127.0.0.1 for the registry client's
//! tests: raw tokio TCP so that tests can send lies (wrong lengths,
//! truncated or stalled bodies) that a well-behaved server library refuses
//! to produce. One request per connection (`Connection: close`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A received request.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the body goes out.
#[derive(Debug, Clone)]
pub enum Body {
    /// All of it, `Content-Length` set to its length.
    Full(Vec<u8>),
    /// `Content-Length: declared`, but only `data` is sent before closing.
    Truncated { declared: usize, data: Vec<u8> },
    /// `data` sent in `chunk`-byte pieces with `delay` between them.
    Trickle {
        data: Vec<u8>,
        chunk: usize,
        delay: Duration,
    },
}

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Resp {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Body::Full(Vec::new()),
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_owned(), v.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Full(b.into());
        self
    }
    pub fn with_body(mut self, b: Body) -> Self {
        self.body = b;
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

/// A running fake server; stops when dropped.
pub struct FakeServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Req>>>,
    max_inflight: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    /// Binds 127.0.0.1:0; `make` gets the address and returns the handler.
    pub async fn start<F, H>(make: F) -> Self
    where
        F: FnOnce(SocketAddr) -> H,
        H: Fn(&Req) -> Resp + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Arc<Handler> = Arc::new(make(addr));
        let log = Arc::new(Mutex::new(Vec::new()));
        let inflight = Arc::new(AtomicUsize::new(0));
        let max_inflight = Arc::new(AtomicUsize::new(0));
        let (l2, i2, m2) = (log.clone(), inflight, max_inflight.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (h, l, i, m) = (handler.clone(), l2.clone(), i2.clone(), m2.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, h, l, i, m).await;
                });
            }
        });
        Self {
            addr,
            log,
            max_inflight,
            task,
        }
    }

    /// `http://127.0.0.1:port`
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:port`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self, pred: impl Fn(&Req) -> bool) -> usize {
        self.log.lock().unwrap().iter().filter(|r| pred(r)).count()
    }

    pub fn max_inflight(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut sock: TcpStream,
    handler: Arc<Handler>,
    log: Arc<Mutex<Vec<Req>>>,
    inflight: Arc<AtomicUsize>,
    max_inflight: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let clen: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < clen {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let req = Req {
        method,
        path,
        headers,
        body,
    };
    let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
    max_inflight.fetch_max(now, Ordering::SeqCst);
    log.lock().unwrap().push(req.clone());
    let resp = handler(&req);
    let r = write_resp(&mut sock, &req, resp).await;
    inflight.fetch_sub(1, Ordering::SeqCst);
    r
}

async fn write_resp(sock: &mut TcpStream, req: &Req, resp: Resp) -> std::io::Result<()> {
    if !resp.delay.is_zero() {
        tokio::time::sleep(resp.delay).await;
    }
    let reason = match resp.status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let declared = match &resp.body {
        Body::Full(d) | Body::Trickle { data: d, .. } => d.len(),
        Body::Truncated { declared, .. } => *declared,
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\nConnection: close\r\n", resp.status);
    if !resp
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {declared}\r\n"));
    }
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    if req.method == "HEAD" {
        return sock.flush().await;
    }
    match resp.body {
        Body::Full(d) => sock.write_all(&d).await?,
        Body::Truncated { data, .. } => sock.write_all(&data).await?,
        Body::Trickle { data, chunk, delay } => {
            for c in data.chunks(chunk.max(1)) {
                sock.write_all(c).await?;
                sock.flush().await?;
                tokio::time::sleep(delay).await;
            }
        }
    }
    sock.flush().await?;
    sock.shutdown().await
}

/// Parses `bytes=a-b,c-d` (inclusive ends) into half-open ranges.
pub fn parse_range_header(v: &str) -> Vec<std::ops::Range<usize>> {
    v.trim_start_matches("bytes=")
        .split(',')
        .filter_map(|p| {
            let (a, b) = p.trim().split_once('-')?;
            Some(a.parse().ok()?..b.parse::<usize>().ok()? + 1)
        })
        .collect()
}

/// How the fake registry answers requests with several ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multi {
    /// `206 multipart/byteranges`.
    Multipart,
    /// 400 Bad Request (GCR).
    Reject400,
    /// 416 (zot).
    Reject416,
    /// 200 with the whole blob (ECR).
    Whole,
}

/// A correct range answer for `blob` (multi-range answered per `multi`).
pub fn range_response(blob: &[u8], req: &Req, multi: Multi) -> Resp {
    let total = blob.len();
    let Some(rh) = req.header("range") else {
        return Resp::new(200).body(blob.to_vec());
    };
    // A suffix range, `bytes=-n`: the last n bytes.
    let ranges = match rh.strip_prefix("bytes=-").map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => std::iter::once(total - n.min(total)..total).collect(),
        _ => parse_range_header(rh),
    };
    if ranges.is_empty() || ranges.iter().any(|r| r.start >= r.end || r.end > total) {
        return Resp::new(416).header("Content-Range", format!("bytes */{total}"));
    }
    if ranges.len() == 1 {
        let r = ranges[0].clone();
        return Resp::new(206)
            .header(
                "Content-Range",
                format!("bytes {}-{}/{total}", r.start, r.end - 1),
            )
            .body(blob[r].to_vec());
    }
    match multi {
        Multi::Reject400 => Resp::new(400),
        Multi::Reject416 => Resp::new(416),
        Multi::Whole => Resp::new(200).body(blob.to_vec()),
        Multi::Multipart => {
            let b = "FAKEBOUNDARY";
            let mut body = Vec::new();
            for r in ranges {
                body.extend_from_slice(
                    format!(
                        "\r\n--{b}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {}-{}/{total}\r\n\r\n",
                        r.start,
                        r.end - 1
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(&blob[r]);
            }
            body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
            Resp::new(206)
                .header(
                    "Content-Type",
                    format!("multipart/byteranges; boundary={b}"),
                )
                .body(body)
        }
    }
}
