//! The layer reader behind FUSE: one opened eStargz blob, read through the
//! chunk caches with verified, single-flight range fetches.
//!
//! Parts:
//! - [`open_layer`]: blob size + one tail read (+ one TOC read if the tail
//!   was short), TOC digest checked against the label before the layer
//!   exists ([`TocCheck`], [`Trust`]).
//! - [`Layer`]: implements [`ContentSource`]. A read maps `(node, offset,
//!   size)` to chunks; each comes from the memory cache, the disk cache or a
//!   fetch.
//! - `fetch`: fetch jobs. Every chunk being fetched has one *flight*; later
//!   readers of it wait on the flight instead of fetching again. A job
//!   merges adjacent chunks into one range, decodes and verifies on the
//!   blocking pool, caches, then answers the flights.
//! - `background`: chunks inside the open-time tail read decoded from it,
//!   prefetch of the prioritized files, then a background fetch of the rest
//!   that yields to on-demand reads.
//! - [`config`]: [`LayerConfig`]; [`stats`]: [`LayerStats`].
//! - [`TocCheck::from_labels`], [`LayerContext::with_labels`]: the
//!   `Prepare` labels that choose verification and prefetch size.
//!
//! Behaviour, measurements and the config sample: `docs/layer.md`. The
//! in-process tests are `tests/layer.rs` (fake fetcher), the real-registry
//! one `tests/layer_registry.rs`.
//!
//! # Tasks and ownership
//! All work runs on the caller's tokio runtime. Decompression and disk I/O
//! run on `spawn_blocking`; decoding is bounded by a semaphore of the CPU
//! count shared by all layers opened from clones of one [`LayerContext`]. On-demand range requests are bounded by `fetch_concurrency`,
//! background ones by `background_concurrency`. The prefetch and background
//! tasks hold the layer's shared state, not the [`Layer`] itself; dropping
//! the [`Layer`] (or [`Layer::close`]) cancels them. Fetch jobs started by
//! readers run to completion, so a reader that gives up (FUSE interrupt)
//! does not waste a download others are waiting for.

mod background;
pub mod config;
mod fetch;
pub mod stats;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::estargz::digest::Digest;
use crate::estargz::error::Error as FormatError;
use crate::estargz::reader::{
    ChunkRef, Index, NodeId, NodeKind, ReaderOptions, TailOutcome, index_from_member,
    index_from_tail, tail_len,
};
use crate::fs::cache::Caches;
use crate::fs::content::{ContentSource, ReadError, ReadFuture};
use crate::fs::registry::{DynRangeFetcher, RangeFetcher, RegistryError};

pub use config::LayerConfig;
pub use stats::{LayerStats, PrefetchState, StatsSnapshot};

use fetch::Flights;
use stats::RateLimit;

/// How the TOC of a layer is checked at open.
#[derive(Debug, Clone)]
pub enum TocCheck {
    /// The `containerd.io/snapshot/stargz/toc.digest` label's value: the TOC
    /// must hash to it.
    Digest(Digest),
    /// No check (legacy stargz with `skipverify` and
    /// `allow_no_verification`). Build it with [`TocCheck::skip_verify`],
    /// which logs.
    Skip { reason: String },
}

/// Label with the TOC digest (containerd copies the layer annotation of the
/// same name).
pub const TOC_DIGEST_LABEL: &str = crate::fs::registry::TOC_DIGEST_ANNOTATION;
/// Label asking to mount a layer without TOC verification (legacy stargz).
pub const SKIP_VERIFY_LABEL: &str = "containerd.io/snapshot/remote/stargz.skipverify";
/// Label with a prefetch size in bytes for blobs without landmarks.
pub const PREFETCH_LABEL: &str = "containerd.io/snapshot/remote/stargz.prefetch";

impl TocCheck {
    /// The check a `Prepare`'s labels ask for (upstream `fs/fs.go` Mount):
    /// the TOC digest label if present; else, with the skipverify label and
    /// `allow_no_verification`, no check; else an error saying why, which
    /// the snapshotter logs before falling back to a normal pull.
    pub fn from_labels(
        labels: &std::collections::HashMap<String, String>,
        allow_no_verification: bool,
    ) -> Result<TocCheck, String> {
        if let Some(v) = labels.get(TOC_DIGEST_LABEL) {
            return Digest::parse(v)
                .map(TocCheck::Digest)
                .map_err(|e| format!("label {TOC_DIGEST_LABEL}: {e}"));
        }
        if labels.contains_key(SKIP_VERIFY_LABEL) {
            if allow_no_verification {
                return Ok(TocCheck::skip_verify(format!("label {SKIP_VERIFY_LABEL}")));
            }
            return Err(format!(
                "label {SKIP_VERIFY_LABEL} set but allow_no_verification is off"
            ));
        }
        Err(format!(
            "digest of TOC JSON must be passed ({TOC_DIGEST_LABEL})"
        ))
    }

    /// Opens without checking the TOC digest; logged with `reason`.
    pub fn skip_verify(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        tracing::warn!(reason = %reason, "opening a layer without TOC verification");
        TocCheck::Skip { reason }
    }
}

/// Whether a layer's TOC was checked. Chunks are verified against the TOC's
/// `chunkDigest`s either way; only a verified TOC ties them to the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The TOC hashed to the expected digest.
    Verified { toc_digest: Digest },
    /// Explicitly opened unverified.
    Unverified { reason: String },
}

/// Why a layer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("fetching layer: {0}")]
    Fetch(#[from] RegistryError),
    #[error("reading layer: {0}")]
    Format(#[from] FormatError),
    #[error("invalid layer configuration: {0}")]
    Config(String),
}

/// What a layer needs besides its fetcher. Cheap to clone: the daemon keeps
/// one and clones it per layer, so that caches and the decode bound are
/// shared.
#[derive(Clone)]
pub struct LayerContext {
    pub config: LayerConfig,
    pub caches: Caches,
    pub reader: ReaderOptions,
    /// Prefetch size from the `containerd.io/snapshot/remote/stargz.prefetch`
    /// label; used instead of `prefetch_unspecified_bytes` for blobs
    /// without landmarks.
    pub prefetch_label: Option<u64>,
    /// Bounds concurrent decoding (blocking threads) over every layer
    /// opened with this context or its clones: one permit per CPU.
    pub decode_permits: Arc<Semaphore>,
}

impl LayerContext {
    pub fn new(config: LayerConfig, caches: Caches) -> Self {
        LayerContext {
            config,
            caches,
            reader: ReaderOptions::default(),
            prefetch_label: None,
            decode_permits: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
    }

    /// Takes the prefetch size from a `Prepare`'s labels, if set and valid.
    pub fn with_labels(mut self, labels: &std::collections::HashMap<String, String>) -> Self {
        self.prefetch_label = labels
            .get(PREFETCH_LABEL)
            .and_then(|v| v.trim().parse().ok());
        self
    }
}

/// A fetcher chosen at run time (registry [`crate::fs::registry::Blob`],
/// in-memory blob, ...), so that every layer has the type
/// `Layer<DynFetcher>`.
#[derive(Clone)]
pub struct DynFetcher(pub Arc<dyn DynRangeFetcher>);

impl RangeFetcher for DynFetcher {
    async fn fetch(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        self.0.fetch_dyn(ranges).await
    }

    async fn size(&self) -> Result<u64, RegistryError> {
        self.0.size_dyn().await
    }

    async fn fetch_stream(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        self.0.fetch_stream_dyn(range, tx).await
    }
}

/// Identifies a chunk within a layer: its member and offset inside it.
pub(crate) type ChunkKey = (u64, u64);

pub(crate) fn key_of(c: &ChunkRef) -> ChunkKey {
    (c.compressed_offset, c.inner_offset)
}

/// State shared by the [`Layer`] handle and its tasks.
pub(crate) struct Inner<F> {
    fetcher: F,
    index: Arc<Index>,
    /// Every chunk, sorted by [`key_of`] (blob order).
    order: Vec<ChunkRef>,
    blob_size: u64,
    cfg: LayerConfig,
    caches: Caches,
    prefetch_label: Option<u64>,
    stats: LayerStats,
    flights: Arc<Flights>,
    fetch_permits: Semaphore,
    background_permits: Arc<Semaphore>,
    decode_permits: Arc<Semaphore>,
    on_demand_inflight: AtomicUsize,
    last_on_demand_ms: AtomicU64,
    /// The adaptive read-ahead window (see `fetch::read_ahead`).
    read_ahead: std::sync::Mutex<fetch::ReadAheadWindow>,
    started: Instant,
    cancel: CancellationToken,
    prefetch: watch::Sender<PrefetchState>,
    background_done: AtomicBool,
    verify_log: RateLimit,
    fetch_log: RateLimit,
    disk_log: RateLimit,
}

impl<F> Inner<F> {
    /// Milliseconds since open, never 0.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// An opened layer. Reads go through [`ContentSource`]; dropping it stops
/// its prefetch and background fetch.
pub struct Layer<F: RangeFetcher + 'static> {
    inner: Arc<Inner<F>>,
    trust: Trust,
    _stop: DropGuard,
}

/// Opens a layer: blob size, one read of the tail (footer and usually the
/// TOC), one more read only if the TOC member did not fit in it, then the
/// TOC check. Starts prefetch and background fetch as configured.
pub async fn open_layer<F: RangeFetcher + 'static>(
    fetcher: F,
    check: TocCheck,
    ctx: LayerContext,
) -> Result<Layer<F>, OpenError> {
    ctx.config.validate().map_err(OpenError::Config)?;
    let stats = LayerStats::default();
    let size = fetcher.size().await?;
    stats.blob_size.store(size, Ordering::Relaxed);
    let tl = tail_len(size, &ctx.reader);
    let t0 = Instant::now();
    let tail = fetch_one(&fetcher, size - tl..size).await?;
    stats.record_fetch(1, tail.len() as u64, t0.elapsed());
    let expected = match &check {
        TocCheck::Digest(d) => Some(*d),
        TocCheck::Skip { .. } => None,
    };
    let opts = ctx.reader.clone();
    let o2 = opts.clone();
    let tail_bytes = tail.clone();
    let outcome = blocking(move || index_from_tail(&tail, size, &o2, expected.as_ref())).await?;
    let index = match outcome {
        TailOutcome::Ready(index) => index,
        TailOutcome::NeedMember(loc) => {
            let t0 = Instant::now();
            let member = fetch_one(&fetcher, loc.member.clone()).await?;
            stats.record_fetch(1, member.len() as u64, t0.elapsed());
            blocking(move || index_from_member(&member, &loc, &opts, expected.as_ref())).await?
        }
    };
    let trust = match (check, index.toc_digest) {
        (TocCheck::Digest(d), Some(got)) if index.toc_verified && got == d => {
            Trust::Verified { toc_digest: d }
        }
        (TocCheck::Digest(d), got) => {
            // index_from_* fail on a mismatch; this is a reader bug guard.
            return Err(OpenError::Format(FormatError::TocDigestMismatch {
                expected: d.to_string(),
                actual: got.map(|g| g.to_string()).unwrap_or_default(),
            }));
        }
        (TocCheck::Skip { reason }, _) => Trust::Unverified { reason },
    };
    let mut order: Vec<ChunkRef> = index.all_chunks().map(clamp_span).collect();
    order.sort_by_key(key_of);
    let cancel = CancellationToken::new();
    let (prefetch, _) = watch::channel(PrefetchState::None);
    let cfg = ctx.config;
    let inner = Arc::new(Inner {
        fetcher,
        index: Arc::new(index),
        order,
        blob_size: size,
        fetch_permits: Semaphore::new(cfg.fetch_concurrency),
        background_permits: Arc::new(Semaphore::new(cfg.background_concurrency.max(1))),
        decode_permits: ctx.decode_permits,
        cfg,
        caches: ctx.caches,
        prefetch_label: ctx.prefetch_label,
        stats,
        flights: Arc::new(Flights::default()),
        on_demand_inflight: AtomicUsize::new(0),
        last_on_demand_ms: AtomicU64::new(0),
        read_ahead: std::sync::Mutex::new(fetch::ReadAheadWindow::default()),
        started: Instant::now(),
        cancel: cancel.clone(),
        prefetch,
        background_done: AtomicBool::new(false),
        verify_log: RateLimit::default(),
        fetch_log: RateLimit::default(),
        disk_log: RateLimit::default(),
    });
    tracing::info!(
        blob_size = size,
        chunks = inner.order.len(),
        verified = matches!(trust, Trust::Verified { .. }),
        "layer opened"
    );
    background::start(&inner, (size - tl, tail_bytes));
    Ok(Layer {
        inner,
        trust,
        _stop: cancel.drop_guard(),
    })
}

async fn fetch_one<F: RangeFetcher>(fetcher: &F, r: Range<u64>) -> Result<Bytes, RegistryError> {
    let want = r.end - r.start;
    let mut v = fetcher.fetch(std::slice::from_ref(&r)).await?;
    match v.pop() {
        Some(b) if v.is_empty() && b.len() as u64 == want => Ok(b),
        _ => Err(RegistryError::ProtocolViolation(format!(
            "fetcher returned the wrong bytes for range {r:?}"
        ))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FormatError> + Send + 'static,
) -> Result<T, OpenError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpenError::Config(format!("parser task failed: {e}")))?
        .map_err(OpenError::Format)
}

impl<F: RangeFetcher + 'static> Layer<F> {
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// The index, shared (the FUSE filesystem keeps one).
    pub fn index_arc(&self) -> Arc<Index> {
        self.inner.index.clone()
    }

    /// Whether the TOC was checked against the expected digest.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    pub fn is_verified(&self) -> bool {
        matches!(self.trust, Trust::Verified { .. })
    }

    pub fn blob_size(&self) -> u64 {
        self.inner.blob_size
    }

    /// Waits until prefetch has finished, failed or `timeout` passed, and
    /// returns its state then (`Running` on timeout). Layers without
    /// prefetch answer `None` at once.
    pub async fn wait_prefetch(&self, timeout: Duration) -> PrefetchState {
        let mut rx = self.inner.prefetch.subscribe();
        let wait = rx.wait_for(|s| !matches!(s, PrefetchState::Running));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(s)) => s.clone(),
            _ => self.inner.prefetch.borrow().clone(),
        }
    }

    /// Where prefetch stands now, without waiting.
    pub fn prefetch_state(&self) -> PrefetchState {
        self.inner.prefetch.borrow().clone()
    }

    /// [`Layer::wait_prefetch`] with the configured `prefetch_timeout_ms`.
    pub async fn wait_prefetch_default(&self) -> PrefetchState {
        self.wait_prefetch(self.inner.cfg.prefetch_timeout()).await
    }

    /// Whether background fetch went through the whole layer.
    pub fn background_done(&self) -> bool {
        self.inner.background_done.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner
            .stats
            .snapshot(self.inner.prefetch.borrow().clone())
    }

    /// Chunks being fetched right now (flights).
    pub fn in_flight(&self) -> usize {
        self.inner.flights.len()
    }

    /// Stops prefetch and background fetch now (dropping does the same).
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }

    /// Drops this layer's chunks from the shared memory cache (the layer
    /// is gone; the disk cache keeps them for a later pull). A chunk another
    /// mounted layer shares is dropped too and comes back from the disk
    /// cache on its next read. Returns how many were there. Blocking-ish:
    /// one pass over the TOC's chunks.
    pub fn forget_memory(&self) -> usize {
        let memory = &self.inner.caches.memory;
        let mut n = 0;
        for c in self.inner.index.all_chunks() {
            if let Some(d) = c.chunk_digest
                && memory.contains(&d)
            {
                memory.remove(&d);
                n += 1;
            }
        }
        n
    }

    /// Reads up to `size` bytes of regular file `node` from `offset`.
    pub async fn read_at(&self, node: NodeId, offset: u64, size: u32) -> Result<Bytes, ReadError> {
        read(&self.inner, node, offset, size).await
    }
}

impl<F: RangeFetcher + 'static> ContentSource for Layer<F> {
    fn read(self: Arc<Self>, node: NodeId, offset: u64, size: u32) -> ReadFuture {
        // The future keeps the layer open until the read ends.
        Box::pin(async move { read(&self.inner, node, offset, size).await })
    }

    fn complete(&self) -> bool {
        self.background_done()
    }

    fn read_now(&self, node: NodeId, offset: u64, size: u32) -> Option<Bytes> {
        read_from_memory(&self.inner, node, offset, size)
    }
}

/// [`read`] when every chunk it needs is in the memory cache: no await,
/// no fetch, no flight. `None` as soon as one chunk is missing.
fn read_from_memory<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    node: NodeId,
    offset: u64,
    size: u32,
) -> Option<Bytes> {
    if inner.cancel.is_cancelled() {
        return None;
    }
    let file_size = match inner.index.node(node).map(|n| (&n.kind, n.size())) {
        Some((NodeKind::Reg { .. }, s)) => s,
        _ => return None,
    };
    let end = offset.saturating_add(u64::from(size)).min(file_size);
    if offset >= end {
        return Some(Bytes::new());
    }
    let mut chunks = Vec::new();
    let mut datas = Vec::new();
    for c in inner
        .index
        .chunks_of(node)
        .skip_while(|c| c.chunk_end() <= offset)
        .take_while(|c| c.chunk_offset < end)
        .map(clamp_span)
    {
        datas.push(cached_in_memory(&inner.caches, &c)?);
        chunks.push(c);
    }
    let out = assemble(&chunks, &datas, offset, end);
    let s = &inner.stats;
    s.chunks_from_memory
        .fetch_add(chunks.len() as u64, Ordering::Relaxed);
    s.bytes_served
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    Some(out)
}

async fn read<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    node: NodeId,
    offset: u64,
    size: u32,
) -> Result<Bytes, ReadError> {
    if inner.cancel.is_cancelled() {
        return Err(ReadError::Closed);
    }
    let file_size = match inner.index.node(node).map(|n| (&n.kind, n.size())) {
        Some((NodeKind::Reg { .. }, s)) => s,
        _ => return Err(ReadError::NotAFile),
    };
    let end = offset.saturating_add(u64::from(size)).min(file_size);
    if offset >= end {
        return Ok(Bytes::new());
    }
    let chunks: Vec<ChunkRef> = inner
        .index
        .chunks_of(node)
        .skip_while(|c| c.chunk_end() <= offset)
        .take_while(|c| c.chunk_offset < end)
        .map(clamp_span)
        .collect();
    let datas = fetch::get_chunks(inner, chunks.clone()).await?;
    let out = assemble(&chunks, &datas, offset, end);
    inner
        .stats
        .bytes_served
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(out)
}

/// Gzip header and trailer and deflate block headers allowed beyond twice
/// the inflated size when clamping a chunk's compressed span.
const SPAN_SLACK: u64 = 64 << 10;

/// Shortens a chunk's compressed range to what can possibly be needed to
/// inflate `inner_offset + chunk_size` bytes. No deflate stream an encoder
/// would write spends more than 2 bytes per output byte (stored blocks cost
/// `n + n/13107`; the longest Huffman codes, 15-bit literals, under 1.9x),
/// plus headers. `compressed_end` runs to the next payload member, so
/// without this a chunk followed by a long run of header-only members (or a
/// hostile TOC whose one small file "ends" at the TOC) would fetch all of
/// it.
fn clamp_span(mut c: ChunkRef) -> ChunkRef {
    let need = c.inner_offset.saturating_add(c.chunk_size);
    let max = need
        .saturating_mul(2)
        .saturating_add(SPAN_SLACK)
        .saturating_add(c.compressed_offset);
    c.compressed_end = c.compressed_end.min(max);
    c
}

/// Cuts `[offset, end)` of the file out of the chunks' contents.
fn assemble(chunks: &[ChunkRef], datas: &[Bytes], offset: u64, end: u64) -> Bytes {
    let piece = |c: &ChunkRef, d: &Bytes| {
        let from = offset.saturating_sub(c.chunk_offset).min(d.len() as u64) as usize;
        let to = (end - c.chunk_offset).min(d.len() as u64) as usize;
        d.slice(from.min(to)..to)
    };
    match (chunks, datas) {
        ([c], [d]) => piece(c, d),
        _ => {
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for (c, d) in chunks.iter().zip(datas) {
                out.extend_from_slice(&piece(c, d));
            }
            out.freeze()
        }
    }
}

/// A chunk's contents from the memory cache, if there.
pub(crate) fn cached_in_memory(caches: &Caches, c: &ChunkRef) -> Option<Bytes> {
    c.chunk_digest.and_then(|d| caches.memory.get(&d))
}
