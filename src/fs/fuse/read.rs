//! The read path: a FUSE thread never waits for content. A read whose
//! chunks are all in the memory cache is answered on the spot
//! (`ContentSource::read_now`, no lock held, no I/O). Otherwise the thread
//! moves the reply into a task on the layer's runtime and returns to the
//! kernel at once; the
//! task waits for a permit (bounding reads in flight per layer), awaits the
//! [`ContentSource`](crate::fs::ContentSource), and replies from the runtime.
//! A reply dropped unsent (runtime shut down) answers `EIO`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{Errno, ReplyData};

use super::LayerFs;
use super::error::FsError;
use crate::estargz::reader::NodeId;

/// Counters of one layer's FUSE reads (those the page cache did not serve),
/// shared with whoever mounted it.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// `READ` requests handed to the content source.
    pub reads: AtomicU64,
    /// Bytes replied.
    pub bytes: AtomicU64,
    /// Reads answered with an error.
    pub errors: AtomicU64,
    /// Reads that had to wait for a permit.
    pub waited: AtomicU64,
    /// Unix millis of the last error log line (errors log at most 1/s).
    last_error_log: AtomicU64,
}

impl ReadStats {
    /// Whether an error may be logged now (at most once a second per layer,
    /// so a broken registry cannot flood the log).
    fn may_log(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_error_log.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_error_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl LayerFs {
    pub(super) fn spawn_read(
        &self,
        node: NodeId,
        file_size: u64,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let Some(left) = file_size.checked_sub(offset).filter(|&l| l > 0) else {
            return reply.data(&[]);
        };
        let want = u32::try_from(left.min(u64::from(size))).unwrap_or(size);
        if want == 0 {
            return reply.data(&[]);
        }
        // Chunks already in memory: answered here, no task, no wait.
        if let Some(bytes) = self.content.read_now(node, offset, want) {
            let n = bytes.len().min(want as usize);
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            return reply.data(&bytes[..n]);
        }
        let content = self.content.clone();
        let permits = self.reads.clone();
        let stats = self.stats.clone();
        self.rt.spawn(async move {
            stats.reads.fetch_add(1, Ordering::Relaxed);
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => Ok(p),
                Err(_) => {
                    stats.waited.fetch_add(1, Ordering::Relaxed);
                    permits.acquire_owned().await
                }
            };
            let Ok(_permit) = permit else {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return reply.error(Errno::EIO);
            };
            match content.read(node, offset, want).await {
                Ok(bytes) => {
                    let n = bytes.len().min(want as usize);
                    stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    reply.data(&bytes[..n]);
                }
                Err(e) => {
                    let errors = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if stats.may_log() {
                        tracing::warn!(
                            node = node.0,
                            offset,
                            size = want,
                            errors,
                            error = %e,
                            "layer read failed"
                        );
                    }
                    reply.error(FsError::from(e).errno());
                }
            }
        });
    }
}
