//! Prefetch at open, then background fetch of the rest.
//!
//! First, chunks that lie wholly inside the tail read at open (the last
//! `tail_size` bytes, fetched for the footer and TOC) are decoded from it and
//! cached, so small layers cost no chunk request at all.
//!
//! Prefetch takes the chunks inside `[0, landmark)` (or the configured size
//! for blobs without landmarks), leads their flights (so on-demand readers
//! of prioritized files wait for it instead of fetching again) and fetches
//! them in as few large ranges as `prefetch_range_bytes` allows, decoding
//! each range as soon as it arrives while the others still download.
//!
//! Background fetch walks the chunks in blob order, skipping what the disk
//! cache holds, in batches of `background_range_bytes`, with at most
//! `background_concurrency` requests in flight. Before each batch it waits
//! until no on-demand fetch is running and none ended within
//! `background_pause_ms`. It only runs with a disk cache (filling the memory
//! cache with a whole layer would evict the hot set). Both stop when the
//! layer's cancellation token fires.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;

use bytes::Bytes;

use super::fetch::{Group, Kind, Plan, decode_group, run_job, stream_job};
use super::{Inner, PrefetchState};
use crate::estargz::reader::Prefetch;
use crate::fs::registry::RangeFetcher;

/// Compressed bytes to prefetch: the landmark's offset, or for blobs
/// without landmarks the label's size or the configured one, capped at the
/// TOC offset.
fn prefetch_limit<F>(inner: &Inner<F>) -> u64 {
    if !inner.cfg.prefetch {
        return 0;
    }
    match inner.index.prefetch() {
        Prefetch::UpTo(n) => n,
        Prefetch::Disabled => 0,
        Prefetch::Unspecified => inner
            .prefetch_label
            .unwrap_or(inner.cfg.prefetch_unspecified_bytes)
            .min(inner.index.toc_offset()),
    }
}

pub(super) fn start<F: RangeFetcher + 'static>(inner: &Arc<Inner<F>>, tail: (u64, Bytes)) {
    let limit = prefetch_limit(inner);
    // Chunks wholly inside the tail read at open are decoded from it: small
    // layers need no chunk request at all.
    let (tail_start, tail_bytes) = tail;
    let tail_end = tail_start + tail_bytes.len() as u64;
    let tail_leads: Vec<_> = inner
        .order
        .iter()
        .filter(|c| c.compressed_offset >= tail_start && c.compressed_end <= tail_end)
        .filter_map(|c| inner.flights.try_lead(c, Kind::Tail))
        .collect();
    let tail_prefetches = tail_leads.iter().any(|l| l.chunk.compressed_end <= limit);
    let leads: Vec<_> = inner
        .order
        .iter()
        .filter(|c| c.compressed_end <= limit)
        .filter_map(|c| inner.flights.try_lead(c, Kind::Prefetch))
        .collect();
    let background = inner.cfg.background_fetch && inner.caches.disk.is_some();
    if leads.is_empty() && tail_leads.is_empty() && !background {
        return;
    }
    let prefetching = !leads.is_empty() || tail_prefetches;
    if prefetching {
        inner.prefetch.send_replace(PrefetchState::Running);
    }
    let tail_group = Group {
        range: tail_start..tail_end,
        leads: tail_leads,
    };
    let task = inner.clone();
    tokio::spawn(async move {
        let cancel = task.cancel.clone();
        tokio::select! {
            _ = cancel.cancelled() => {
                task.prefetch.send_if_modified(|s| {
                    let running = *s == PrefetchState::Running;
                    if running {
                        *s = PrefetchState::Failed("layer closed".into());
                    }
                    running
                });
            }
            _ = run(&task, tail_group, tail_bytes, leads, limit, background, prefetching) => {}
        }
    });
}

async fn run<F: RangeFetcher + 'static>(
    inner: &Arc<Inner<F>>,
    tail: Group,
    tail_bytes: Bytes,
    leads: Vec<super::fetch::Lead>,
    limit: u64,
    background: bool,
    prefetching: bool,
) {
    let t0 = std::time::Instant::now();
    let mut failed = 0;
    let mut n = tail.leads.len();
    if !tail.leads.is_empty() {
        failed += decode_group(inner, tail, tail_bytes).await;
    }
    if prefetching {
        n += leads.len();
        failed += stream_job(inner, leads, inner.cfg.prefetch_range_bytes).await;
        let state = if failed == 0 {
            PrefetchState::Done
        } else {
            PrefetchState::Failed(format!("{failed} of {n} chunks failed"))
        };
        tracing::info!(
            bytes = limit,
            chunks = n,
            failed,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "prefetch finished"
        );
        inner.prefetch.send_replace(state);
    }
    if background {
        fetch_rest(inner).await;
    }
}

/// Waits until on-demand reads have left the network alone for the pause.
async fn wait_idle<F>(inner: &Inner<F>) {
    let pause = inner.cfg.background_pause_ms;
    loop {
        let busy = inner.on_demand_inflight.load(Ordering::Acquire) > 0
            || inner
                .now_ms()
                .saturating_sub(inner.last_on_demand_ms.load(Ordering::Acquire))
                < pause
                && inner.last_on_demand_ms.load(Ordering::Acquire) > 0;
        if !busy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(pause.clamp(5, 50))).await;
    }
}

async fn fetch_rest<F: RangeFetcher + 'static>(inner: &Arc<Inner<F>>) {
    let Some(disk) = inner.caches.disk.clone() else {
        return;
    };
    let max = inner.cfg.background_range_bytes;
    let order = &inner.order;
    let mut set = JoinSet::new();
    let mut i = 0;
    while i < order.len() {
        wait_idle(inner).await;
        let Ok(permit) = inner.background_permits.clone().acquire_owned().await else {
            return;
        };
        let mut leads = Vec::new();
        let mut bytes = 0u64;
        let mut end: Option<u64> = None;
        while i < order.len() && bytes < max {
            let c = &order[i];
            if end.is_some_and(|e| c.compressed_offset > e) {
                break;
            }
            // Chunks without a digest cannot be cached; skip them.
            let cached = c.chunk_digest.is_none_or(|d| disk.contains(&d));
            let lead = if cached {
                None
            } else {
                inner.flights.try_lead(c, Kind::Background)
            };
            match lead {
                Some(l) => {
                    i += 1;
                    bytes += c.compressed_len();
                    end = Some(end.unwrap_or(0).max(c.compressed_end));
                    leads.push(l);
                }
                None if leads.is_empty() => i += 1,
                None => break,
            }
        }
        if leads.is_empty() {
            continue;
        }
        let job = inner.clone();
        set.spawn(async move {
            let _permit = permit;
            run_job(&job, leads, Plan::OneRequest).await
        });
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
    inner.background_done.store(true, Ordering::Release);
    tracing::debug!("background fetch finished");
}
