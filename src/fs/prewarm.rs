//! Pre-warming of neighbour layers.
//!
//! containerd prepares an image's layers one after the other, and each
//! `Prepare` names the layers above it (`cri.image-layers`, or
//! `stargz.layers`). While one layer is being mounted, [`Prewarm`] resolves
//! the next ones in the background: blob size and the tail read that holds
//! footer and TOC. When that layer's own `Prepare` arrives, its open takes
//! both from memory ([`WarmFetcher`]) instead of two round trips.
//!
//! Nothing is trusted early: the warmed tail goes through the same TOC
//! digest check at open as a fetched one. Bounds: at most
//! [`MAX_ENTRIES`] layers held, [`MAX_CONCURRENT`] warmed at once; an
//! entry is dropped when it is used or pushed out by newer ones.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore};

use crate::estargz::reader::{ReaderOptions, tail_len};
use crate::fs::layer::DynFetcher;
use crate::fs::registry::{RangeFetcher, Reference, RegistryClient, RegistryError};

/// Layers held warm at most (each holds one tail, a few MiB at most).
pub const MAX_ENTRIES: usize = 8;
/// Layers warmed at once.
pub const MAX_CONCURRENT: usize = 2;

/// Labels naming this layer and the layers above it, comma-separated.
pub const LAYERS_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.image-layers",
    "containerd.io/snapshot/remote/stargz.layers",
];

/// A layer's blob size and tail, fetched ahead of its `Prepare`.
#[derive(Debug)]
pub struct Warm {
    pub size: u64,
    pub tail_range: Range<u64>,
    pub tail: Bytes,
}

type Cell = Arc<OnceCell<Option<Arc<Warm>>>>;

/// The bounded set of warm (or warming) layers, keyed by digest.
pub struct Prewarm {
    entries: Mutex<VecDeque<(String, Cell)>>,
    permits: Arc<Semaphore>,
}

impl Default for Prewarm {
    fn default() -> Self {
        Prewarm {
            entries: Mutex::new(VecDeque::with_capacity(MAX_ENTRIES)),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        }
    }
}

impl Prewarm {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Cell)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts warming `digests` of `reference` (skipping ones already
    /// held). Best effort: failures leave nothing behind but a debug line.
    pub fn start(
        &self,
        client: &RegistryClient,
        reference: &Reference,
        digests: Vec<String>,
        opts: &ReaderOptions,
    ) {
        for digest in digests.into_iter().take(MAX_ENTRIES) {
            let cell: Cell = {
                let mut entries = self.lock();
                if entries.iter().any(|(d, _)| *d == digest) {
                    continue;
                }
                if entries.len() >= MAX_ENTRIES {
                    entries.pop_front();
                }
                let cell = Cell::default();
                entries.push_back((digest.clone(), cell.clone()));
                cell
            };
            let (client, reference, opts) = (client.clone(), reference.clone(), opts.clone());
            let permits = self.permits.clone();
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                cell.get_or_init(|| async {
                    match fetch_warm(&client, &reference, &digest, &opts).await {
                        Ok(w) => {
                            tracing::debug!(digest = %digest, size = w.size, tail = w.tail.len(), "neighbour layer pre-warmed");
                            Some(Arc::new(w))
                        }
                        Err(e) => {
                            tracing::debug!(digest = %digest, error = %e, "pre-warming a neighbour layer failed");
                            None
                        }
                    }
                })
                .await;
            });
        }
    }

    /// Takes the warm state of `digest`, waiting for a warm-up in flight.
    /// `None` when the layer was not warmed (or warming failed).
    pub async fn take(&self, digest: &str) -> Option<Arc<Warm>> {
        let cell = {
            let mut entries = self.lock();
            let i = entries.iter().position(|(d, _)| d == digest)?;
            entries.remove(i)?.1
        };
        // Not started yet (waiting for a permit): settle it as "none", so
        // the queued task does nothing.
        cell.get_or_init(|| async { None }).await.clone()
    }

    /// Digests held, oldest first (for tests).
    pub fn held(&self) -> Vec<String> {
        self.lock().iter().map(|(d, _)| d.clone()).collect()
    }
}

/// Blob size and tail of one layer, in one suffix-range request where the
/// registry supports it ([`crate::fs::registry::Blob::fetch_tail`]).
pub async fn fetch_warm(
    client: &RegistryClient,
    reference: &Reference,
    digest: &str,
    opts: &ReaderOptions,
) -> Result<Warm, RegistryError> {
    let blob = client.blob(reference, digest)?;
    // The tail length does not depend on the size but through the cap at
    // it, which the suffix request applies itself.
    let (size, tail_range, tail) = blob.fetch_tail(tail_len(u64::MAX, opts)).await?;
    if tail_range.end - tail_range.start != tail_len(size, opts) {
        return Err(RegistryError::ProtocolViolation(
            "tail read of the wrong length".into(),
        ));
    }
    Ok(Warm {
        size,
        tail_range,
        tail,
    })
}

/// The neighbour digests named in `labels` (this one and mounted ones
/// excluded by the caller's `skip`).
pub fn neighbours(
    labels: &std::collections::HashMap<String, String>,
    skip: impl Fn(&str) -> bool,
) -> Vec<String> {
    LAYERS_LABELS
        .iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|d| d.starts_with("sha256:") && !skip(d))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A fetcher that answers `size` and the first read of the tail range
/// from a [`Warm`], and everything else from the registry.
pub struct WarmFetcher {
    inner: DynFetcher,
    size: u64,
    tail: Mutex<Option<(Range<u64>, Bytes)>>,
}

impl WarmFetcher {
    pub fn new(inner: DynFetcher, warm: &Warm) -> Self {
        WarmFetcher {
            inner,
            size: warm.size,
            tail: Mutex::new(Some((warm.tail_range.clone(), warm.tail.clone()))),
        }
    }
}

impl RangeFetcher for WarmFetcher {
    async fn fetch(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        if let [r] = ranges {
            let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail
                .as_ref()
                .is_some_and(|(tr, b)| tr == r && b.len() as u64 == r.end - r.start)
                && let Some((_, b)) = tail.take()
            {
                return Ok(vec![b]);
            }
        }
        self.inner.fetch(ranges).await
    }

    async fn size(&self) -> Result<u64, RegistryError> {
        Ok(self.size)
    }

    async fn fetch_stream(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        self.inner.fetch_stream(range, tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn neighbours_from_labels() {
        let mut l = HashMap::new();
        assert!(neighbours(&l, |_| false).is_empty());
        l.insert(
            LAYERS_LABELS[1].to_string(),
            "sha256:a,sha256:b, sha256:c,junk".to_string(),
        );
        assert_eq!(
            neighbours(&l, |d| d == "sha256:a"),
            vec!["sha256:b", "sha256:c"]
        );
        l.insert(LAYERS_LABELS[0].to_string(), "sha256:z".to_string());
        assert_eq!(neighbours(&l, |_| false), vec!["sha256:z"], "CRI first");
    }

    #[tokio::test]
    async fn bounded_and_taken_once() {
        let p = Prewarm::default();
        let client = RegistryClient::new(Default::default()).unwrap();
        // Nothing listens on port 9 of 127.0.0.1: warming fails fast.
        let r = Reference::parse("127.0.0.1:9/x/y:1").unwrap();
        let digests: Vec<String> = (0..MAX_ENTRIES + 4)
            .map(|i| format!("sha256:{i:064x}"))
            .collect();
        p.start(&client, &r, digests.clone(), &ReaderOptions::default());
        assert_eq!(p.held().len(), MAX_ENTRIES);
        p.start(
            &client,
            &r,
            digests[MAX_ENTRIES..].to_vec(),
            &ReaderOptions::default(),
        );
        let held = p.held();
        assert_eq!(held.len(), MAX_ENTRIES);
        assert_eq!(held.last(), Some(&digests[MAX_ENTRIES + 3]));
        assert!(
            p.take(&digests[MAX_ENTRIES + 3]).await.is_none(),
            "failed warm-up"
        );
        assert_eq!(p.held().len(), MAX_ENTRIES - 1, "taken entries are dropped");
        assert!(p.take("sha256:nope").await.is_none());
    }
}
