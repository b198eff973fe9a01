//! Fetch jobs and flights.
//!
//! A *flight* is one chunk being fetched. The reader (or prefetch,
//! background, read-ahead) that finds no flight for a chunk *leads* it: it
//! registers a [`Lead`] and runs a job; everyone else waits on the
//! flight's `watch` channel. A job answers each flight exactly once, after
//! verification and after the memory cache has the chunk, so a reader
//! arriving later finds it there. If a job is dropped (layer closed), its
//! leads are removed and waiters see the channel close.
//!
//! A job: memory cache → disk cache (blocking pool) → network. Chunks left
//! for the network are sorted and merged into runs of adjacent compressed
//! ranges; a plan decides whether the runs go in one (multi-range) request
//! or as separate concurrent requests. Each received range is decoded and
//! verified on the blocking pool, then cached (memory, then disk off the
//! answer path).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{ChunkKey, Inner, cached_in_memory, key_of};
use crate::estargz::digest::Digest;
use crate::estargz::reader::{ChunkRef, decode_chunk};
use crate::fs::content::ReadError;
use crate::fs::registry::RangeFetcher;

/// A flight's answer: `None` until the job publishes it.
pub(crate) type Slot = Option<Result<Bytes, ReadError>>;

pub(crate) struct Flight {
    id: u64,
    rx: watch::Receiver<Slot>,
}

/// The chunks of one layer currently being fetched.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<ChunkKey, Flight>>,
    next_id: AtomicU64,
}

/// Why a chunk is fetched; decides counters and caching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    OnDemand,
    ReadAhead,
    Prefetch,
    Background,
    /// Decoded from the tail read at open, no fetch of its own.
    Tail,
}

/// The obligation to answer one flight.
pub(crate) struct Lead {
    pub(crate) chunk: ChunkRef,
    kind: Kind,
    id: u64,
    tx: Option<watch::Sender<Slot>>,
    flights: Arc<Flights>,
}

pub(crate) enum Joined {
    Wait(watch::Receiver<Slot>),
    Lead(Lead, watch::Receiver<Slot>),
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkKey, Flight>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_lead(
        self: &Arc<Self>,
        c: &ChunkRef,
        kind: Kind,
        map: &mut HashMap<ChunkKey, Flight>,
    ) -> (Lead, watch::Receiver<Slot>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key_of(c), Flight { id, rx: rx.clone() });
        let lead = Lead {
            chunk: c.clone(),
            kind,
            id,
            tx: Some(tx),
            flights: self.clone(),
        };
        (lead, rx)
    }

    /// Waits on the chunk's flight, or leads a new one.
    pub(crate) fn join(self: &Arc<Self>, c: &ChunkRef, kind: Kind) -> Joined {
        let mut map = self.lock();
        if let Some(f) = map.get(&key_of(c)) {
            return Joined::Wait(f.rx.clone());
        }
        let (lead, rx) = self.new_lead(c, kind, &mut map);
        Joined::Lead(lead, rx)
    }

    /// Leads a new flight unless one exists.
    pub(crate) fn try_lead(self: &Arc<Self>, c: &ChunkRef, kind: Kind) -> Option<Lead> {
        let mut map = self.lock();
        if map.contains_key(&key_of(c)) {
            return None;
        }
        Some(self.new_lead(c, kind, &mut map).0)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn remove(&self, key: ChunkKey, id: u64) {
        let mut map = self.lock();
        if map.get(&key).is_some_and(|f| f.id == id) {
            map.remove(&key);
        }
    }
}

impl Lead {
    fn publish(mut self, r: Result<Bytes, ReadError>) {
        self.flights.remove(key_of(&self.chunk), self.id);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(r));
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Never answered: let the next reader lead a new flight.
            self.flights.remove(key_of(&self.chunk), self.id);
        }
    }
}

/// How a job turns runs into requests.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Plan {
    /// All runs in one fetcher call (multi-range when several); read-ahead
    /// chunks in a second, concurrent one. (Prefetch streams instead:
    /// [`stream_job`].)
    OneRequest,
}

/// Contiguous chunks fetched as one range.
pub(crate) struct Group {
    pub(crate) range: Range<u64>,
    pub(crate) leads: Vec<Lead>,
}

/// Groups leads (any order) into runs of adjacent or overlapping compressed
/// ranges, cut at `max` bytes (never inside a shared member).
pub(crate) fn runs(mut leads: Vec<Lead>, max: Option<u64>) -> Vec<Group> {
    leads.sort_by_key(|l| key_of(&l.chunk));
    let mut groups: Vec<Group> = Vec::new();
    for l in leads {
        let (start, end) = (l.chunk.compressed_offset, l.chunk.compressed_end);
        match groups.last_mut() {
            Some(g)
                if start < g.range.end
                    || (start == g.range.end
                        && max.is_none_or(|m| g.range.end - g.range.start < m)) =>
            {
                g.range.end = g.range.end.max(end);
                g.leads.push(l);
            }
            _ => groups.push(Group {
                range: start..end,
                leads: vec![l],
            }),
        }
    }
    groups
}

/// The chunks' contents, in order: from memory, from flights in progress, or
/// from a new job (with read-ahead) that this call starts.
pub(crate) async fn get_chunks<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    chunks: Vec<ChunkRef>,
) -> Result<Vec<Bytes>, ReadError> {
    let mut out: Vec<Option<Bytes>> = vec![None; chunks.len()];
    let mut waits = Vec::new();
    let mut leads = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if let Some(b) = cached_in_memory(&inner.caches, c) {
            inner
                .stats
                .chunks_from_memory
                .fetch_add(1, Ordering::Relaxed);
            out[i] = Some(b);
            continue;
        }
        match inner.flights.join(c, Kind::OnDemand) {
            Joined::Wait(rx) => waits.push((i, rx)),
            Joined::Lead(l, rx) => {
                leads.push(l);
                waits.push((i, rx));
            }
        }
    }
    if !leads.is_empty() {
        read_ahead(inner, &mut leads);
        inner.on_demand_inflight.fetch_add(1, Ordering::AcqRel);
        inner
            .last_on_demand_ms
            .store(inner.now_ms(), Ordering::Release);
        let job = inner.clone();
        tokio::spawn(async move {
            let _busy = OnDemandGuard(&job);
            match job.fetch_permits.acquire().await {
                Ok(_permit) => {
                    run_job(&job, leads, Plan::OneRequest).await;
                }
                Err(_) => drop(leads),
            }
        });
    }
    let wait_all = async {
        for (i, mut rx) in waits {
            let r = match rx.wait_for(|s| s.is_some()).await {
                Ok(s) => s.clone().unwrap_or(Err(ReadError::Closed)),
                Err(_) if inner.cancel.is_cancelled() => Err(ReadError::Closed),
                Err(_) => Err(ReadError::Fetch("fetch abandoned".into())),
            };
            out[i] = Some(r?);
        }
        Ok::<_, ReadError>(())
    };
    let limit = inner.cfg.read_timeout_ms;
    if limit == 0 {
        wait_all.await?;
    } else {
        let limit = Duration::from_millis(limit);
        tokio::time::timeout(limit, wait_all)
            .await
            .map_err(|_| ReadError::Timeout(limit))??;
    }
    Ok(out.into_iter().flatten().collect())
}

struct OnDemandGuard<'a, F>(&'a Inner<F>);

impl<F> Drop for OnDemandGuard<'_, F> {
    fn drop(&mut self) {
        self.0
            .last_on_demand_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.on_demand_inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The read-ahead window of a layer: where the last read-ahead ended and
/// how large the next one may be.
#[derive(Debug, Default)]
pub(crate) struct ReadAheadWindow {
    end: u64,
    size: u64,
}

impl ReadAheadWindow {
    /// The budget for a job whose first missing chunk starts at `start`:
    /// doubled (up to `max`) when the miss lands within one window past the
    /// previous read-ahead's end, as in a walk through the layer in blob
    /// order; `base` otherwise.
    pub(crate) fn next(&mut self, start: u64, base: u64, max: u64) -> u64 {
        let sequential =
            self.size > 0 && start >= self.end && start - self.end <= self.size.max(base);
        self.size = if sequential {
            self.size.saturating_mul(2).min(max.max(base))
        } else {
            base
        };
        self.size
    }

    pub(crate) fn ended_at(&mut self, end: u64) {
        self.end = end;
    }
}

/// Extends an on-demand job with the chunks that follow its last one in
/// blob order, while they are adjacent, uncached and not in flight, up to
/// the read-ahead window (`read_ahead_bytes`, growing to
/// `read_ahead_max_bytes` while misses follow each other through the blob).
/// A walk through many small files then costs a few requests, not one per
/// file, without fetching much past what a random reader needs.
fn read_ahead<F>(inner: &Inner<F>, leads: &mut Vec<Lead>) {
    let base = inner.cfg.read_ahead_bytes;
    if base == 0 {
        return;
    }
    let Some(last) = leads.iter().map(|l| key_of(&l.chunk)).max() else {
        return;
    };
    let Some(first) = leads.iter().map(|l| l.chunk.compressed_offset).min() else {
        return;
    };
    let Ok(pos) = inner.order.binary_search_by_key(&last, key_of) else {
        return;
    };
    let mut window = inner.read_ahead.lock().unwrap_or_else(|p| p.into_inner());
    let mut budget = window.next(first, base, inner.cfg.read_ahead_max_bytes);
    let mut end = inner.order[pos].compressed_end;
    for c in &inner.order[pos + 1..] {
        if c.compressed_offset > end || budget == 0 {
            break;
        }
        let cached = match c.chunk_digest {
            Some(d) => is_cached(inner, &d),
            None => false,
        };
        if cached {
            break;
        }
        let Some(l) = inner.flights.try_lead(c, Kind::ReadAhead) else {
            break;
        };
        budget = budget.saturating_sub(c.compressed_len());
        end = end.max(c.compressed_end);
        leads.push(l);
    }
    window.ended_at(end);
    drop(window);
    read_behind(inner, leads, base);
}

/// The directory part of a TOC path (`""` at the top).
fn dir_of(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(d, _)| d)
}

/// Extends an on-demand job backwards, in blob order, over the chunks of
/// the missed file's directory (and its subdirectories) that lie just
/// before it, up to `budget` compressed bytes. Module loaders (Python's
/// imports) read a package's files in an order unrelated to the blob's
/// (tar order is readdir order), so the files before a miss are as likely
/// to come next as the files after it, which forward read-ahead covers.
fn read_behind<F>(inner: &Inner<F>, leads: &mut Vec<Lead>, budget: u64) {
    let Some(first) = leads
        .iter()
        .filter(|l| l.kind == Kind::OnDemand)
        .min_by_key(|l| key_of(&l.chunk))
    else {
        return;
    };
    let dir = dir_of(&first.chunk.name).to_string();
    let Ok(pos) = inner
        .order
        .binary_search_by_key(&key_of(&first.chunk), key_of)
    else {
        return;
    };
    let mut budget = budget;
    let mut start = first.chunk.compressed_offset;
    for c in inner.order[..pos].iter().rev() {
        let d = dir_of(&c.name);
        let inside =
            d == dir || (d.starts_with(&dir) && d.as_bytes().get(dir.len()) == Some(&b'/'));
        if !inside || c.compressed_end < start || budget < c.compressed_len() {
            break;
        }
        if c.chunk_digest.is_some_and(|d| is_cached(inner, &d)) {
            break;
        }
        let Some(l) = inner.flights.try_lead(c, Kind::ReadAhead) else {
            break;
        };
        budget -= c.compressed_len();
        start = start.min(c.compressed_offset);
        leads.push(l);
    }
}

fn is_cached<F>(inner: &Inner<F>, d: &Digest) -> bool {
    inner.caches.memory.contains(d) || inner.caches.disk.as_ref().is_some_and(|k| k.contains(d))
}

/// Answers the leads the memory or disk cache can; returns the others.
async fn take_local<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    leads: Vec<Lead>,
) -> Vec<Lead> {
    // Memory again: a job may have finished between the reader's check and
    // its lead.
    let mut rest = Vec::with_capacity(leads.len());
    for l in leads {
        match cached_in_memory(&inner.caches, &l.chunk) {
            Some(b) => l.publish(Ok(b)),
            None => rest.push(l),
        }
    }
    if let Some(disk) = inner.caches.disk.clone() {
        let (probe, net): (Vec<Lead>, Vec<Lead>) = rest
            .into_iter()
            .partition(|l| l.chunk.chunk_digest.is_some_and(|d| disk.contains(&d)));
        rest = net;
        if !probe.is_empty() {
            let digests: Vec<Digest> = probe.iter().filter_map(|l| l.chunk.chunk_digest).collect();
            let got = tokio::task::spawn_blocking(move || {
                digests.iter().map(|d| disk.get(d)).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let mut got = got.into_iter();
            for l in probe {
                match got.next().flatten() {
                    Some(v) => {
                        let b = Bytes::from(v);
                        if l.kind != Kind::Background
                            && let Some(d) = l.chunk.chunk_digest
                        {
                            inner.caches.memory.insert(d, b.clone());
                        }
                        inner.stats.chunks_from_disk.fetch_add(1, Ordering::Relaxed);
                        l.publish(Ok(b));
                    }
                    None => rest.push(l),
                }
            }
        }
    }
    rest
}

/// Runs one job to the end; returns how many chunks failed.
pub(crate) async fn run_job<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    leads: Vec<Lead>,
    plan: Plan,
) -> u64 {
    let rest = take_local(inner, leads).await;
    if rest.is_empty() {
        return 0;
    }
    match plan {
        Plan::OneRequest => {
            // Read-ahead goes in a parallel request so that the chunks a
            // reader waits for are answered as soon as their own bytes
            // arrive, not after the read-ahead's.
            let (ahead, now): (Vec<Lead>, Vec<Lead>) =
                rest.into_iter().partition(|l| l.kind == Kind::ReadAhead);
            match (now.is_empty(), ahead.is_empty()) {
                (false, false) => {
                    let (a, b) = tokio::join!(
                        fetch_groups(inner, runs(now, None)),
                        fetch_groups(inner, runs(ahead, None))
                    );
                    a + b
                }
                (true, _) => fetch_groups(inner, runs(ahead, None)).await,
                (false, true) => fetch_groups(inner, runs(now, None)).await,
            }
        }
    }
}

/// Compressed bytes of a streamed range decoded together while more bytes
/// are queued: a decode task is not spawned per (small) chunk. When the
/// network is behind, complete chunks are decoded at once.
pub(crate) const STREAM_BATCH: u64 = 128 << 10;

/// Prefetch: chunks from the caches if there, the rest in runs of adjacent
/// chunks (cut at about `max` bytes, each one streamed request, run
/// concurrently). Each run's chunks are decoded, verified and answered as
/// soon as their bytes are in, so a container reading its prioritized files
/// in blob order need not wait for the end of the range. Returns how many
/// chunks failed.
pub(crate) async fn stream_job<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    leads: Vec<Lead>,
    max: u64,
) -> u64 {
    let rest = take_local(inner, leads).await;
    if rest.is_empty() {
        return 0;
    }
    let mut set = JoinSet::new();
    for g in runs(rest, Some(max)) {
        let inner = inner.clone();
        set.spawn(async move { stream_group(&inner, g).await });
    }
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        failed += r.unwrap_or(1);
    }
    failed
}

/// One run, streamed: the bytes are kept from the first chunk not yet
/// decoded on, and every [`STREAM_BATCH`] of complete chunks goes to a
/// decode task. Chunks the stream did not deliver (an error midway) are
/// fetched again the ordinary way.
async fn stream_group<F: RangeFetcher + 'static>(inner: &Arc<Inner<F>>, g: Group) -> u64 {
    let Group { range, leads } = g;
    // `runs` sorted them in blob order.
    let mut pending: std::collections::VecDeque<Lead> = leads.into();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let t0 = Instant::now();
    let mut buf = bytes::BytesMut::new();
    let mut base = range.start;
    let mut received = 0u64;
    let mut decodes = JoinSet::new();
    let consume = async {
        loop {
            let piece = rx.recv().await;
            let done = piece.is_none();
            if let Some(p) = piece {
                received += p.len() as u64;
                buf.extend_from_slice(&p);
            }
            let have = base + buf.len() as u64;
            let n = pending
                .iter()
                .take_while(|l| l.chunk.compressed_end <= have)
                .count();
            if n > 0 {
                let start = pending[0].chunk.compressed_offset;
                let end = pending
                    .iter()
                    .take(n)
                    .map(|l| l.chunk.compressed_end)
                    .max()
                    .unwrap_or(start);
                // Batch while bytes pour in; when the network is behind
                // (nothing more queued), decode what is complete now.
                if done || rx.is_empty() || end - start >= STREAM_BATCH {
                    let batch: Vec<Lead> = pending.drain(..n).collect();
                    let lo = (start - base) as usize;
                    let hi = (end - base) as usize;
                    let body = Bytes::copy_from_slice(&buf[lo..hi]);
                    let job = inner.clone();
                    decodes.spawn(async move {
                        let g = Group {
                            range: start..end,
                            leads: batch,
                        };
                        decode_group(&job, g, body).await
                    });
                    // Bytes before the next chunk are needed no more.
                    let keep = pending
                        .front()
                        .map_or(have, |l| l.chunk.compressed_offset)
                        .clamp(base, have);
                    bytes::Buf::advance(&mut buf, (keep - base) as usize);
                    base = keep;
                }
            }
            if done {
                break;
            }
        }
    };
    let (res, ()) = tokio::join!(inner.fetcher.fetch_stream(range.clone(), tx), consume);
    inner.stats.record_fetch(1, received, t0.elapsed());
    let mut failed = 0;
    if let Err(e) = &res {
        inner.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = inner.fetch_log.allow(inner.now_ms(), 1000) {
            tracing::warn!(error = %e, suppressed = n, "streamed prefetch failed; fetching the rest by ranges");
        }
    }
    if !pending.is_empty() {
        let rest: Vec<Lead> = pending.into_iter().collect();
        failed += fetch_groups(inner, runs(rest, None)).await;
    }
    while let Some(r) = decodes.join_next().await {
        failed += r.unwrap_or(1);
    }
    failed
}

/// One fetcher call for all groups, then decode, verify, cache, answer.
async fn fetch_groups<F: RangeFetcher + 'static>(inner: &Arc<Inner<F>>, groups: Vec<Group>) -> u64 {
    let ranges: Vec<Range<u64>> = groups.iter().map(|g| g.range.clone()).collect();
    let t0 = Instant::now();
    let res = inner.fetcher.fetch(&ranges).await;
    let res = res.and_then(|bodies| {
        let ok = bodies.len() == ranges.len()
            && bodies
                .iter()
                .zip(&ranges)
                .all(|(b, r)| b.len() as u64 == r.end - r.start);
        if ok {
            Ok(bodies)
        } else {
            Err(crate::fs::registry::RegistryError::ProtocolViolation(
                "fetcher returned bodies that do not match the ranges".into(),
            ))
        }
    });
    let bodies = match res {
        Ok(b) => b,
        Err(e) => {
            inner.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = inner.fetch_log.allow(inner.now_ms(), 1000) {
                tracing::warn!(error = %e, ranges = ranges.len(), suppressed = n, "chunk fetch failed");
            }
            let mut failed = 0;
            for g in groups {
                for l in g.leads {
                    failed += 1;
                    l.publish(Err(ReadError::Fetch(e.to_string())));
                }
            }
            return failed;
        }
    };
    let total: u64 = bodies.iter().map(|b| b.len() as u64).sum();
    inner.stats.record_fetch(ranges.len(), total, t0.elapsed());
    let mut failed = 0;
    for (g, body) in groups.into_iter().zip(bodies) {
        failed += decode_group(inner, g, body).await;
    }
    failed
}

pub(crate) async fn decode_group<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    g: Group,
    body: Bytes,
) -> u64 {
    let chunks: Vec<ChunkRef> = g.leads.iter().map(|l| l.chunk.clone()).collect();
    let start = g.range.start;
    let permit = inner.decode_permits.clone().acquire_owned().await;
    let results = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        chunks
            .iter()
            .map(|c| {
                let a = usize::try_from(c.compressed_offset.saturating_sub(start));
                let b = usize::try_from(c.compressed_end.saturating_sub(start));
                match (a, b) {
                    (Ok(a), Ok(b)) if c.compressed_offset >= start && a <= b => {
                        let bytes = body.get(a..b.min(body.len())).unwrap_or_default();
                        decode_chunk(bytes, c).map_err(|e| e.to_string())
                    }
                    _ => Err(format!("chunk of {:?} outside the fetched range", c.name)),
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let keep_in_memory_all = inner.caches.disk.is_none();
    let mut to_disk: Vec<(Digest, Bytes)> = Vec::new();
    let mut failed = 0;
    let mut results = results.into_iter();
    for l in g.leads {
        match results.next() {
            Some(Ok(v)) => {
                let b = Bytes::from(v);
                if let Some(d) = l.chunk.chunk_digest {
                    if l.kind != Kind::Background || keep_in_memory_all {
                        inner.caches.memory.insert(d, b.clone());
                    }
                    if inner.caches.disk.is_some() {
                        to_disk.push((d, b.clone()));
                    }
                }
                let counter = match l.kind {
                    Kind::OnDemand => &inner.stats.chunks_from_network,
                    Kind::ReadAhead => &inner.stats.chunks_read_ahead,
                    Kind::Prefetch => &inner.stats.chunks_prefetched,
                    Kind::Background => &inner.stats.chunks_background,
                    Kind::Tail => &inner.stats.chunks_from_tail,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                l.publish(Ok(b));
            }
            Some(Err(msg)) => {
                failed += 1;
                inner
                    .stats
                    .verification_failures
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(n) = inner.verify_log.allow(inner.now_ms(), 1000) {
                    tracing::error!(
                        file = %l.chunk.name,
                        chunk_offset = l.chunk.chunk_offset,
                        error = %msg,
                        suppressed = n,
                        "chunk verification failed"
                    );
                }
                l.publish(Err(ReadError::Verification(msg)));
            }
            None => {
                failed += 1;
                l.publish(Err(ReadError::Fetch("decoder task failed".into())));
            }
        }
    }
    if let (Some(disk), false) = (inner.caches.disk.clone(), to_disk.is_empty()) {
        let errors = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            for (d, b) in &to_disk {
                if let Err(e) = disk.put(d, b) {
                    errors.push(e);
                }
            }
            errors
        })
        .await
        .unwrap_or_default();
        if let Some(e) = errors.first() {
            inner
                .stats
                .disk_write_errors
                .fetch_add(errors.len() as u64, Ordering::Relaxed);
            if let Some(n) = inner.disk_log.allow(inner.now_ms(), 10_000) {
                tracing::warn!(error = %e, suppressed = n, "disk cache write failed; serving uncached");
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(off: u64, end: u64, inner: u64) -> ChunkRef {
        ChunkRef {
            node: crate::estargz::reader::NodeId(1),
            name: "f".into(),
            compressed_offset: off,
            compressed_end: end,
            inner_offset: inner,
            chunk_offset: 0,
            chunk_size: 1,
            chunk_digest: None,
        }
    }

    #[test]
    fn read_ahead_window_grows_on_a_walk_and_resets_on_a_jump() {
        let mut w = ReadAheadWindow::default();
        let (base, max) = (100, 800);
        assert_eq!(w.next(0, base, max), 100);
        w.ended_at(150);
        // Just past the previous read-ahead: doubles, up to max.
        assert_eq!(w.next(150, base, max), 200);
        w.ended_at(400);
        assert_eq!(w.next(450, base, max), 400);
        w.ended_at(900);
        assert_eq!(w.next(900, base, max), 800);
        w.ended_at(1800);
        assert_eq!(w.next(1800, base, max), 800);
        w.ended_at(2600);
        // Far ahead or behind: back to the base.
        assert_eq!(w.next(10_000, base, max), 100);
        w.ended_at(10_100);
        assert_eq!(w.next(50, base, max), 100);
        // max below base: never shrinks under base.
        let mut w = ReadAheadWindow::default();
        assert_eq!(w.next(0, 100, 10), 100);
        w.ended_at(100);
        assert_eq!(w.next(100, 100, 10), 100);
    }

    #[test]
    fn runs_merge_adjacent_and_shared_members_and_cut_at_max() {
        let flights = Arc::new(Flights::default());
        let lead = |c: ChunkRef| flights.try_lead(&c, Kind::OnDemand).unwrap();
        let leads = vec![
            lead(chunk(300, 400, 0)),
            lead(chunk(0, 100, 0)),
            lead(chunk(100, 200, 0)),
            // Shares the member at 100.
            lead(chunk(100, 200, 50)),
            lead(chunk(500, 600, 0)),
        ];
        let g = runs(leads, None);
        let ranges: Vec<_> = g.iter().map(|g| g.range.clone()).collect();
        assert_eq!(ranges, vec![0..200, 300..400, 500..600]);
        assert_eq!(g[0].leads.len(), 3);
        drop(g);
        assert_eq!(flights.len(), 0, "dropped leads leave no flights");

        let leads = (0..4)
            .map(|i| lead(chunk(i * 100, i * 100 + 100, 0)))
            .collect();
        let ranges: Vec<_> = runs(leads, Some(200))
            .iter()
            .map(|g| g.range.clone())
            .collect();
        assert_eq!(ranges, vec![0..200, 200..400]);
    }

    #[test]
    fn a_flight_is_led_once_and_answered_once() {
        let flights = Arc::new(Flights::default());
        let c = chunk(0, 10, 0);
        let Joined::Lead(l, mut rx1) = flights.join(&c, Kind::OnDemand) else {
            panic!("first joiner leads")
        };
        let Joined::Wait(mut rx2) = flights.join(&c, Kind::OnDemand) else {
            panic!("second joiner waits")
        };
        assert!(flights.try_lead(&c, Kind::Background).is_none());
        l.publish(Ok(Bytes::from_static(b"x")));
        assert_eq!(flights.len(), 0);
        for rx in [&mut rx1, &mut rx2] {
            let v = rx.borrow_and_update().clone();
            assert_eq!(v.unwrap().unwrap(), Bytes::from_static(b"x"));
        }
    }
}
