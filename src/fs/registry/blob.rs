//! [`Blob`]: lazy range reads of one layer blob, the [`RangeFetcher`]
//! implementation the FUSE layer uses.
//!
//! - **Size**: `HEAD` (redirects followed), falling back to
//!   `GET Range: bytes=0-0` and the `Content-Range` total. The first endpoint
//!   (mirror or server) that answers is pinned for the blob's lifetime.
//! - **Location**: the registry's redirect (object storage, presigned URL)
//!   is learnt from the blob's first range GET (sent with redirects not
//!   followed, so it needs no probe of its own) and cached. A 401/403/404
//!   from the cached URL means it
//!   expired: the reader re-resolves once per fetch; concurrent readers share
//!   one re-resolution (the first takes the resolver lock, the others wait
//!   and then see the new generation).
//! - **Ranges**: requested ranges are merged into spans; several spans go in
//!   one multi-range request unless the serving host is known not to support
//!   them. A 400 or 416, a 200 with the whole body, or a 206 that covers only
//!   some spans marks the host, and the missing spans are fetched one range
//!   per request, concurrently (bounded by the client's semaphore). Every
//!   part's `Content-Range` and length are checked against the request; a
//!   whole body is used only when its length equals the blob size.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{HeaderMap, RANGE};
use url::Url;

use super::RangeFetcher;
use super::client::{
    Failure, RegistryClient, Sent, Target, content_length, content_range, header_str, host_port,
    one_header, read_body, redirect_location, status_failure,
};
use super::config::{Capability, Endpoint};
use super::error::RegistryError;
use super::range::{Part, merge_ranges, multipart_boundary, parse_multipart, range_header};
use super::reference::{Reference, validate_digest};

/// Where blob bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// The registry serves the blob itself.
    Direct,
    /// The registry redirected here (no `Authorization` is sent).
    Redirect(Url),
}

#[derive(Debug, Default)]
struct LocState {
    loc: Option<Location>,
    generation: u64,
}

/// A layer blob read lazily by ranges. Cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct Blob {
    inner: Arc<BlobInner>,
}

#[derive(Debug)]
struct BlobInner {
    client: RegistryClient,
    reference: Reference,
    digest: String,
    scope: String,
    endpoints: Vec<Endpoint>,
    /// (size, index of the pinned endpoint).
    sized: tokio::sync::OnceCell<(u64, usize)>,
    known_size: Option<u64>,
    loc: Mutex<LocState>,
    resolver: tokio::sync::Mutex<()>,
    re_resolutions: AtomicU64,
}

impl RegistryClient {
    /// A reader for blob `digest` of `reference`'s repository.
    pub fn blob(&self, reference: &Reference, digest: &str) -> Result<Blob, RegistryError> {
        self.make_blob(reference, digest, None)
    }

    /// A reader for a blob whose size is known from its (digest-verified)
    /// descriptor. With a single endpoint no size request is made; with
    /// mirrors, each endpoint's reported size must match `size`.
    pub fn blob_with_size(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<Blob, RegistryError> {
        self.make_blob(reference, digest, Some(size))
    }

    fn make_blob(
        &self,
        reference: &Reference,
        digest: &str,
        known_size: Option<u64>,
    ) -> Result<Blob, RegistryError> {
        validate_digest(digest)
            .map_err(|m| RegistryError::InvalidReference(digest.to_owned(), m))?;
        let endpoints = self.config().endpoints(&reference.host, Capability::Pull)?;
        Ok(Blob {
            inner: Arc::new(BlobInner {
                client: self.clone(),
                reference: reference.clone(),
                digest: digest.to_owned(),
                scope: reference.pull_scope(),
                sized: match known_size {
                    Some(n) if endpoints.len() == 1 => {
                        tokio::sync::OnceCell::new_with(Some((n, 0)))
                    }
                    _ => tokio::sync::OnceCell::new(),
                },
                known_size,
                endpoints,
                loc: Mutex::new(LocState::default()),
                resolver: tokio::sync::Mutex::new(()),
                re_resolutions: AtomicU64::new(0),
            }),
        })
    }
}

/// What one multi-range attempt produced.
struct MultiResult {
    /// (span index, bytes) for the spans it covered, verified.
    filled: Vec<(usize, Bytes)>,
    /// The host mishandled the multi-range request.
    unsupported: bool,
}

impl Blob {
    /// The blob digest.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// How many times an expired redirect URL was re-resolved.
    pub fn re_resolutions(&self) -> u64 {
        self.inner.re_resolutions.load(Ordering::Relaxed)
    }

    /// The blob size, looked up once (HEAD, then `GET bytes=0-0`).
    pub async fn blob_size(&self) -> Result<u64, RegistryError> {
        self.inner
            .sized
            .get_or_try_init(|| self.lookup_size())
            .await
            .map(|(s, _)| *s)
    }

    /// The blob's size and its last `n` bytes (all of it if smaller), as
    /// `(size, tail range, bytes)`. One suffix-range request (`Range:
    /// bytes=-n`) answers both and settles the blob's location, where a
    /// `HEAD` and a range read would take two round trips. An answer that
    /// does not give both (no suffix support, a whole body, an error) falls
    /// back to the size lookup and a range read.
    pub async fn fetch_tail(&self, n: u64) -> Result<(u64, Range<u64>, Bytes), RegistryError> {
        if n > 0 && self.inner.sized.get().is_none() {
            let refreshed = AtomicBool::new(false);
            let c = self.inner.client.clone();
            match c
                .retry("blob tail GET", || self.tail_attempt(n, &refreshed))
                .await
            {
                Ok(Some((size, range, bytes))) => {
                    // Sized at the first endpoint, the one that answered.
                    let _ = self.inner.sized.set((size, 0));
                    return Ok((size, range, bytes));
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "suffix range read failed; HEAD and range"),
            }
        }
        let size = self.blob_size().await?;
        let range = size - n.min(size)..size;
        let bytes = self
            .fetch_ranges(std::slice::from_ref(&range))
            .await?
            .pop()
            .unwrap_or_default();
        Ok((size, range, bytes))
    }

    /// The request of [`Blob::fetch_tail`]: `Some` for a single-part 206
    /// whose `Content-Range` ends at the blob's end, gives its size and
    /// holds `min(n, size)` bytes.
    async fn tail_attempt(
        &self,
        n: u64,
        refreshed: &AtomicBool,
    ) -> Result<Option<(u64, Range<u64>, Bytes)>, Failure> {
        let sent = self.get_range(&format!("bytes=-{n}"), refreshed).await?;
        match sent.resp.status().as_u16() {
            206 => {
                let ct = header_str(&sent.resp, "content-type").unwrap_or("");
                if multipart_boundary(ct).is_some() {
                    return Ok(None);
                }
                let cr = content_range(&sent.resp)?;
                let (Some(range), Some(size)) = (cr.range, cr.complete) else {
                    return Ok(None);
                };
                if range.end != size || range.end - range.start != n.min(size) {
                    return Ok(None);
                }
                if let Some(k) = self.inner.known_size
                    && k != size
                {
                    return Err(RegistryError::ProtocolViolation(format!(
                        "endpoint reports {size} bytes, descriptor says {k}"
                    ))
                    .into());
                }
                let len = range.end - range.start;
                let data = read_body(sent, Some(len), len).await?;
                Ok(Some((size, range, data)))
            }
            200 | 400 | 416 => Ok(None),
            _ => Err(status_failure(&sent.resp, "blob")),
        }
    }

    /// Reads `ranges` (each within the blob); one `Bytes` per range, in order.
    pub async fn fetch_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        let size = self.blob_size().await?;
        for r in ranges {
            if r.start > r.end || r.end > size {
                return Err(RegistryError::BadRange(format!(
                    "{}..{} outside blob of {size} bytes",
                    r.start, r.end
                )));
            }
        }
        let spans = merge_ranges(ranges);
        let data = self.fetch_spans(&spans, size).await?;
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.start == r.end {
                out.push(Bytes::new());
                continue;
            }
            let i = spans.partition_point(|s| s.end <= r.start);
            let s = &spans[i];
            let lo = usize::try_from(r.start - s.start).map_err(|_| too_big())?;
            let hi = usize::try_from(r.end - s.start).map_err(|_| too_big())?;
            out.push(data[i].slice(lo..hi));
        }
        Ok(out)
    }

    fn endpoint(&self) -> (usize, &Endpoint) {
        let i = self.inner.sized.get().map_or(0, |(_, i)| *i);
        (i, &self.inner.endpoints[i])
    }

    fn target<'a>(&'a self, ep: &'a Endpoint) -> Target<'a> {
        Target {
            endpoint: ep,
            ref_host: &self.inner.reference.host,
            scope: &self.inner.scope,
        }
    }

    fn url(&self, ep: &Endpoint) -> Result<Url, RegistryError> {
        ep.url(
            &self.inner.reference.repository,
            "blobs",
            &self.inner.digest,
        )
    }

    async fn lookup_size(&self) -> Result<(u64, usize), RegistryError> {
        let mut last = None;
        for (i, ep) in self.inner.endpoints.iter().enumerate() {
            let r = self
                .size_at(ep)
                .await
                .and_then(|s| match self.inner.known_size {
                    Some(k) if k != s => Err(RegistryError::ProtocolViolation(format!(
                        "endpoint reports {s} bytes, descriptor says {k}"
                    ))),
                    _ => Ok(s),
                });
            match r {
                Ok(s) => return Ok((s, i)),
                Err(e) => {
                    tracing::warn!(endpoint = %ep.base, digest = %self.inner.digest, error = %e, "blob size lookup failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

    async fn size_at(&self, ep: &Endpoint) -> Result<u64, RegistryError> {
        let url = self.url(ep)?;
        let t = self.target(ep);
        let c = &self.inner.client;
        let t = &t;
        let head = c
            .retry("blob HEAD", || async {
                let (sent, _) = c
                    .send_following(t, Method::HEAD, url.clone(), &HeaderMap::new())
                    .await?;
                if !sent.resp.status().is_success() {
                    return Err(status_failure(&sent.resp, "blob"));
                }
                content_length(&sent.resp).ok_or_else(|| {
                    RegistryError::ProtocolViolation("HEAD without Content-Length".into()).into()
                })
            })
            .await;
        match head {
            Ok(s) => return Ok(s),
            Err(e @ (RegistryError::NotFound(_) | RegistryError::Unauthorized(_))) => {
                return Err(e);
            }
            Err(e) => tracing::debug!(error = %e, "HEAD failed; trying GET bytes=0-0"),
        }
        let headers = one_header(RANGE, "bytes=0-0");
        let headers = &headers;
        c.retry("blob size GET", || async {
            let (sent, _) = c
                .send_following(t, Method::GET, url.clone(), headers)
                .await?;
            match sent.resp.status().as_u16() {
                206 => {
                    let cr = content_range(&sent.resp)?;
                    match (cr.range, cr.complete) {
                        (Some(Range { start: 0, end: 1 }), Some(total)) => Ok(total),
                        _ => Err(RegistryError::ProtocolViolation(
                            "Content-Range does not give the size".into(),
                        )
                        .into()),
                    }
                }
                200 => content_length(&sent.resp).ok_or_else(|| {
                    RegistryError::ProtocolViolation("200 without Content-Length".into()).into()
                }),
                _ => Err(status_failure(&sent.resp, "blob")),
            }
        })
        .await
    }

    /// The current location and its generation. With `stale = Some(g)`,
    /// location generation `g` failed: re-resolve unless another reader
    /// already did.
    async fn location(&self, stale: Option<u64>) -> Result<(Location, u64), Failure> {
        let current = |s: &LocState| match &s.loc {
            Some(l) if stale != Some(s.generation) => Some((l.clone(), s.generation)),
            _ => None,
        };
        if let Some(v) = current(&self.inner.loc.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(v);
        }
        let _resolving = self.inner.resolver.lock().await;
        if let Some(v) = current(&self.inner.loc.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(v);
        }
        let loc = self.resolve_location().await?;
        let mut s = self.inner.loc.lock().unwrap_or_else(|p| p.into_inner());
        if stale.is_some() {
            self.inner.re_resolutions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(digest = %self.inner.digest, "re-resolved expired blob redirect");
        }
        s.generation += 1;
        s.loc = Some(loc.clone());
        Ok((loc, s.generation))
    }

    /// The cached location, if one is known.
    fn known_location(&self) -> Option<(Location, u64)> {
        let s = self.inner.loc.lock().unwrap_or_else(|p| p.into_inner());
        s.loc.clone().map(|l| (l, s.generation))
    }

    fn set_location(&self, loc: Location) {
        let mut s = self.inner.loc.lock().unwrap_or_else(|p| p.into_inner());
        s.generation += 1;
        s.loc = Some(loc);
    }

    /// The first range GET of a blob whose location is not known yet goes
    /// to the registry with redirects not followed, so that it is its own
    /// location probe: a redirect is cached (`None`: ask again, now at the
    /// target), a success settles the location as direct and is the answer.
    /// Saves the round trip of a separate `bytes=0-0` probe, which matters
    /// when the footer and TOC came from the disk and this is the layer's
    /// first request.
    async fn first_get(
        &self,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<Option<Sent>, Failure> {
        let _resolving = self.inner.resolver.lock().await;
        if self.known_location().is_some() {
            return Ok(None);
        }
        let (_, ep) = self.endpoint();
        let url = self.url(ep)?;
        let t = self.target(ep);
        let sent = self
            .inner
            .client
            .send_registry(&t, Method::GET, url.clone(), headers)
            .await?;
        if let Some(next) = redirect_location(&sent.resp, &url)? {
            self.set_location(Location::Redirect(next));
            return Ok(None);
        }
        if sent.resp.status().is_success() {
            self.set_location(Location::Direct);
        }
        Ok(Some(sent))
    }

    /// Asks the registry where the blob lives (`GET bytes=0-0`, redirect not
    /// followed).
    async fn resolve_location(&self) -> Result<Location, Failure> {
        let (_, ep) = self.endpoint();
        let url = self.url(ep)?;
        let t = self.target(ep);
        let headers = one_header(RANGE, "bytes=0-0");
        let sent = self
            .inner
            .client
            .send_registry(&t, Method::GET, url.clone(), &headers)
            .await?;
        if let Some(next) = redirect_location(&sent.resp, &url)? {
            return Ok(Location::Redirect(next));
        }
        if sent.resp.status().is_success() {
            Ok(Location::Direct)
        } else {
            Err(status_failure(&sent.resp, "blob"))
        }
    }

    /// Host whose multi-range support matters (the one serving bytes).
    async fn serving_host(&self) -> Result<String, RegistryError> {
        let (loc, _) = self.location(None).await.map_err(|f| f.err)?;
        Ok(match loc {
            Location::Direct => host_port(&self.endpoint().1.base),
            Location::Redirect(u) => host_port(&u),
        })
    }

    /// One GET with `Range: range`, to the cached location. A 401/403/404
    /// from a redirect target triggers one shared re-resolution per fetch
    /// (`refreshed` tracks that across attempts).
    async fn get_range(&self, range: &str, refreshed: &AtomicBool) -> Result<Sent, Failure> {
        let headers = one_header(RANGE, range);
        loop {
            let (loc, generation) = match self.known_location() {
                Some(v) => v,
                None => match self.first_get(&headers).await? {
                    // The registry answered with the bytes (or an error
                    // for the retry loop): no separate location probe.
                    Some(sent) => return Ok(sent),
                    None => continue,
                },
            };
            match loc {
                Location::Direct => {
                    let (_, ep) = self.endpoint();
                    let t = self.target(ep);
                    let (sent, _) = self
                        .inner
                        .client
                        .send_following(&t, Method::GET, self.url(ep)?, &headers)
                        .await?;
                    return Ok(sent);
                }
                Location::Redirect(u) => {
                    let sent = self
                        .inner
                        .client
                        .send_plain_following(Method::GET, u, &headers)
                        .await?;
                    if matches!(sent.resp.status().as_u16(), 401 | 403 | 404)
                        && !refreshed.swap(true, Ordering::AcqRel)
                    {
                        drop(sent);
                        self.location(Some(generation)).await?;
                        continue;
                    }
                    return Ok(sent);
                }
            }
        }
    }

    async fn fetch_spans(
        &self,
        spans: &[Range<u64>],
        size: u64,
    ) -> Result<Vec<Bytes>, RegistryError> {
        let mut out: Vec<Option<Bytes>> = vec![None; spans.len()];
        let c = &self.inner.client;
        if spans.len() > 1 {
            let host = self.serving_host().await?;
            let idx: Vec<usize> = (0..spans.len()).collect();
            for group in idx.chunks(c.config().max_ranges_per_request) {
                if !c.multi_range_supported(&host) {
                    break;
                }
                if group.len() < 2 {
                    continue;
                }
                let group_spans: Vec<Range<u64>> =
                    group.iter().map(|&i| spans[i].clone()).collect();
                let refreshed = AtomicBool::new(false);
                let res = c
                    .retry("blob multi-range GET", || {
                        self.multi_attempt(&group_spans, size, &refreshed)
                    })
                    .await;
                let res = match res {
                    Ok(r) => r,
                    // Answers that never parse (malformed multipart, parts
                    // that lie) after all attempts: stop asking this host
                    // for several ranges at once; single ranges follow.
                    Err(RegistryError::ProtocolViolation(why)) => {
                        tracing::warn!(%host, %why, "multi-range answers unusable");
                        MultiResult {
                            filled: Vec::new(),
                            unsupported: true,
                        }
                    }
                    Err(e) => return Err(e),
                };
                for (j, b) in res.filled {
                    out[group[j]] = Some(b);
                }
                if res.unsupported {
                    c.mark_no_multi_range(&host);
                }
            }
        }
        // Whatever is left: one range per request, concurrently.
        let mut tasks = tokio::task::JoinSet::new();
        for (i, slot) in out.iter().enumerate() {
            if slot.is_none() {
                let this = self.clone();
                let span = spans[i].clone();
                tasks.spawn(async move {
                    let refreshed = AtomicBool::new(false);
                    let c = this.inner.client.clone();
                    let r = c
                        .retry("blob range GET", || {
                            this.single_attempt(&span, size, &refreshed)
                        })
                        .await;
                    (i, r)
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let (i, r) = joined.map_err(|e| RegistryError::Config(format!("fetch task: {e}")))?;
            out[i] = Some(r?);
        }
        out.into_iter()
            .map(|b| b.ok_or_else(|| RegistryError::ProtocolViolation("span left unfilled".into())))
            .collect()
    }

    async fn multi_attempt(
        &self,
        spans: &[Range<u64>],
        size: u64,
        refreshed: &AtomicBool,
    ) -> Result<MultiResult, Failure> {
        let sent = self.get_range(&range_header(spans), refreshed).await?;
        let status = sent.resp.status().as_u16();
        // A server may coalesce ranges across small gaps (RFC 9110 14.2):
        // bound what is read by the envelope of the spans, not their sum.
        let want = match (spans.first(), spans.last()) {
            (Some(a), Some(z)) => z.end - a.start,
            _ => 0,
        };
        match status {
            206 => {
                let parts = self.read_parts(sent, size, want, spans.len()).await?;
                let mut filled = Vec::new();
                for (j, s) in spans.iter().enumerate() {
                    if let Some(b) = cover(&parts, s) {
                        filled.push((j, b));
                    }
                }
                let unsupported = filled.len() != spans.len();
                Ok(MultiResult {
                    filled,
                    unsupported,
                })
            }
            200 => {
                let whole = self.whole_body(sent, size).await?;
                let filled = match whole {
                    Some(body) => spans
                        .iter()
                        .enumerate()
                        .map(|(j, s)| (j, slice_blob(&body, s)))
                        .collect(),
                    None => Vec::new(),
                };
                Ok(MultiResult {
                    filled,
                    unsupported: true,
                })
            }
            400 | 416 => Ok(MultiResult {
                filled: Vec::new(),
                unsupported: true,
            }),
            _ => Err(status_failure(&sent.resp, "blob")),
        }
    }

    async fn single_attempt(
        &self,
        span: &Range<u64>,
        size: u64,
        refreshed: &AtomicBool,
    ) -> Result<Bytes, Failure> {
        let sent = self
            .get_range(&range_header(std::slice::from_ref(span)), refreshed)
            .await?;
        match sent.resp.status().as_u16() {
            206 => {
                let parts = self
                    .read_parts(sent, size, span.end - span.start, 1)
                    .await?;
                cover(&parts, span).ok_or_else(|| {
                    RegistryError::ProtocolViolation(format!(
                        "206 does not cover requested {}..{}",
                        span.start, span.end
                    ))
                    .into()
                })
            }
            200 => match self.whole_body(sent, size).await? {
                Some(body) => Ok(slice_blob(&body, span)),
                None => Err(RegistryError::ProtocolViolation(
                    "200 to a range request with a body that is not the whole blob".into(),
                )
                .into()),
            },
            416 => Err(RegistryError::BadRange(format!(
                "416 for {}..{} of {size}",
                span.start, span.end
            ))
            .into()),
            _ => Err(status_failure(&sent.resp, "blob")),
        }
    }

    /// One range, its body handed to `tx` piece by piece as it arrives
    /// ([`RangeFetcher::fetch_stream`]). Until the answer's headers check
    /// out, retried like any range read; an answer that is not a plain 206
    /// of exactly this range goes the general way ([`Blob::fetch_ranges`])
    /// and is sent whole. The body is checked against the range's length.
    pub async fn stream_range(
        &self,
        span: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        let size = self.blob_size().await?;
        if span.start > span.end || span.end > size {
            return Err(RegistryError::BadRange(format!(
                "{}..{} outside blob of {size} bytes",
                span.start, span.end
            )));
        }
        if span.is_empty() {
            return Ok(());
        }
        let refreshed = AtomicBool::new(false);
        let c = self.inner.client.clone();
        let opened = c
            .retry("blob streaming GET", || {
                self.stream_attempt(&span, size, &refreshed)
            })
            .await?;
        let Some(Sent {
            mut resp,
            _permit,
            client,
        }) = opened
        else {
            let mut v = self.fetch_ranges(std::slice::from_ref(&span)).await?;
            if let Some(b) = v.pop() {
                let _ = tx.send(b).await;
            }
            return Ok(());
        };
        let want = span.end - span.start;
        let mut got = 0u64;
        while let Some(piece) = resp
            .chunk()
            .await
            .map_err(|e| RegistryError::from_reqwest(&e))?
        {
            got += piece.len() as u64;
            if got > want {
                return Err(RegistryError::ProtocolViolation(format!(
                    "body longer than the {want} bytes asked for"
                )));
            }
            client.count_bytes(piece.len());
            if tx.send(piece).await.is_err() {
                return Ok(());
            }
        }
        if got != want {
            return Err(RegistryError::ProtocolViolation(format!(
                "truncated body: {got} of {want} bytes"
            )));
        }
        Ok(())
    }

    /// The request of [`Blob::stream_range`]: `Some` when the answer is a
    /// single-part 206 for exactly `span`, its body unread.
    async fn stream_attempt(
        &self,
        span: &Range<u64>,
        size: u64,
        refreshed: &AtomicBool,
    ) -> Result<Option<Sent>, Failure> {
        let sent = self
            .get_range(&range_header(std::slice::from_ref(span)), refreshed)
            .await?;
        match sent.resp.status().as_u16() {
            206 => {
                let ct = header_str(&sent.resp, "content-type").unwrap_or("");
                if multipart_boundary(ct).is_some() {
                    return Ok(None);
                }
                let cr = content_range(&sent.resp)?;
                let exact = cr.range.as_ref() == Some(span)
                    && cr.complete.is_none_or(|c| c == size)
                    && content_length(&sent.resp).is_none_or(|l| l == span.end - span.start);
                Ok(exact.then_some(sent))
            }
            200 | 400 | 416 => Ok(None),
            _ => Err(status_failure(&sent.resp, "blob")),
        }
    }

    /// Parts of a 206: multipart, or one part described by `Content-Range`.
    /// Each part is checked against its `Content-Range` and the blob size.
    async fn read_parts(
        &self,
        sent: Sent,
        size: u64,
        want: u64,
        n: usize,
    ) -> Result<Vec<Part>, Failure> {
        let ct = header_str(&sent.resp, "content-type")
            .unwrap_or("")
            .to_owned();
        let parts = if let Some(boundary) = multipart_boundary(&ct) {
            // Payload plus generous per-part header overhead.
            let limit = want.saturating_add(4096u64.saturating_mul(n as u64 + 1));
            let body = read_body(sent, None, limit).await?;
            parse_multipart(&body, &boundary)?
        } else {
            let cr = content_range(&sent.resp)?;
            let range = cr.range.ok_or_else(|| {
                RegistryError::ProtocolViolation("206 with unsatisfied Content-Range".into())
            })?;
            let len = range.end - range.start;
            if len > want.max(1) {
                return Err(RegistryError::ProtocolViolation(format!(
                    "206 carries {len} bytes, asked for {want}"
                ))
                .into());
            }
            let data = read_body(sent, Some(len), len).await?;
            vec![Part {
                range,
                data,
                complete: cr.complete,
            }]
        };
        for p in &parts {
            if p.complete.is_some_and(|c| c != size) || p.range.end > size {
                return Err(RegistryError::ProtocolViolation(format!(
                    "part {}..{} of {:?} disagrees with blob size {size}",
                    p.range.start, p.range.end, p.complete
                ))
                .into());
            }
        }
        Ok(parts)
    }

    /// A 200 body, used only if it is exactly the whole blob and within
    /// `max_whole_body_bytes`; otherwise dropped unread (`None`).
    async fn whole_body(&self, sent: Sent, size: u64) -> Result<Option<Bytes>, Failure> {
        let max = self.inner.client.config().max_whole_body_bytes;
        if content_length(&sent.resp) != Some(size) || size > max {
            return Ok(None);
        }
        Ok(Some(read_body(sent, Some(size), size).await?))
    }
}

/// The bytes of `span` from a part that contains it.
fn cover(parts: &[Part], span: &Range<u64>) -> Option<Bytes> {
    let p = parts
        .iter()
        .find(|p| p.range.start <= span.start && span.end <= p.range.end)?;
    let lo = usize::try_from(span.start - p.range.start).ok()?;
    let hi = usize::try_from(span.end - p.range.start).ok()?;
    Some(p.data.slice(lo..hi))
}

/// `span` out of a whole-blob body (length already checked).
fn slice_blob(body: &Bytes, span: &Range<u64>) -> Bytes {
    let lo = usize::try_from(span.start)
        .unwrap_or(usize::MAX)
        .min(body.len());
    let hi = usize::try_from(span.end)
        .unwrap_or(usize::MAX)
        .min(body.len());
    body.slice(lo..hi)
}

fn too_big() -> RegistryError {
    RegistryError::BadRange("range does not fit in memory".into())
}

impl RangeFetcher for Blob {
    async fn fetch(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        self.fetch_ranges(ranges).await
    }

    async fn fetch_stream(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        self.stream_range(range, tx).await
    }

    async fn size(&self) -> Result<u64, RegistryError> {
        self.blob_size().await
    }
}
