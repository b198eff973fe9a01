//! The layer reader (`rstargz::fs::layer`) against an in-memory fake
//! registry that counts requests and can delay, corrupt and fail.

mod fixture;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fixture::*;
use rstargz::estargz::digest::Digest;
use rstargz::estargz::reader::{
    Index, NodeId, Prefetch, ReaderOptions, TailOutcome, index_from_tail,
};
use rstargz::fs::ContentSource;
use rstargz::fs::cache::{Caches, DiskCache, MemoryCache};
use rstargz::fs::layer::{
    Layer, LayerConfig, LayerContext, PrefetchState, TocCheck, Trust, open_layer,
};
use rstargz::fs::registry::{RangeFetcher, RegistryError};
use rstargz::fs::{ReadError, content};

/// What the fake saw and how it misbehaves.
#[derive(Default)]
struct FakeState {
    blob: Vec<u8>,
    /// Every fetch call, with its ranges.
    calls: Mutex<Vec<Vec<Range<u64>>>>,
    bytes: AtomicU64,
    delay_ms: AtomicU64,
    /// Requests being answered now, and the most seen at once.
    active: AtomicU64,
    max_active: AtomicU64,
    /// Flip the byte at this blob offset in answers (u64::MAX = none).
    flip_at: AtomicU64,
    fail: AtomicBool,
    /// `fetch_stream` sends pieces of this size (0: the range whole)...
    stream_piece: AtomicU64,
    /// ... and stops before this blob offset until `gate` is opened.
    gate_at: AtomicU64,
    gate: tokio::sync::Notify,
}

#[derive(Clone)]
struct Fake(Arc<FakeState>);

impl Fake {
    fn new(blob: Vec<u8>) -> Self {
        let s = FakeState {
            blob,
            flip_at: AtomicU64::new(u64::MAX),
            gate_at: AtomicU64::new(u64::MAX),
            ..FakeState::default()
        };
        Fake(Arc::new(s))
    }
    fn calls(&self) -> Vec<Vec<Range<u64>>> {
        self.0.calls.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.0.calls.lock().unwrap().len()
    }
    fn reset(&self) {
        self.0.calls.lock().unwrap().clear();
        self.0.bytes.store(0, Ordering::SeqCst);
    }
}

impl RangeFetcher for Fake {
    async fn fetch(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        self.0.calls.lock().unwrap().push(ranges.to_vec());
        let now = self.0.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.max_active.fetch_max(now, Ordering::SeqCst);
        let d = self.0.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        if self.0.fail.load(Ordering::SeqCst) {
            return Err(RegistryError::ServerError(503));
        }
        let flip = self.0.flip_at.load(Ordering::SeqCst);
        let mut out = Vec::new();
        for r in ranges {
            let mut v = self.0.blob[r.start as usize..r.end as usize].to_vec();
            if r.contains(&flip) {
                v[(flip - r.start) as usize] ^= 0x40;
            }
            self.0.bytes.fetch_add(v.len() as u64, Ordering::SeqCst);
            out.push(Bytes::from(v));
        }
        Ok(out)
    }

    async fn size(&self) -> Result<u64, RegistryError> {
        Ok(self.0.blob.len() as u64)
    }

    async fn fetch_stream(
        &self,
        range: Range<u64>,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        let piece = self.0.stream_piece.load(Ordering::SeqCst);
        if piece == 0 {
            let b = self.fetch(std::slice::from_ref(&range)).await?;
            let _ = tx.send(b[0].clone()).await;
            return Ok(());
        }
        self.0.calls.lock().unwrap().push(vec![range.clone()]);
        let gate_at = self.0.gate_at.load(Ordering::SeqCst);
        let mut at = range.start;
        while at < range.end {
            let mut end = (at + piece).min(range.end);
            if at < gate_at && end > gate_at {
                end = gate_at;
            }
            if at == gate_at {
                self.0.gate.notified().await;
            }
            let b = Bytes::copy_from_slice(&self.0.blob[at as usize..end as usize]);
            self.0.bytes.fetch_add(b.len() as u64, Ordering::SeqCst);
            if tx.send(b).await.is_err() {
                break;
            }
            at = end;
        }
        Ok(())
    }
}

fn index_of(blob: &[u8]) -> Index {
    match index_from_tail(blob, blob.len() as u64, &ReaderOptions::default(), None).unwrap() {
        TailOutcome::Ready(i) => i,
        TailOutcome::NeedMember(_) => unreachable!("whole blob as tail"),
    }
}

fn toc_digest(blob: &[u8]) -> Digest {
    index_of(blob).toc_digest.unwrap()
}

/// A test config: no prefetch or background unless a test asks.
fn cfg() -> LayerConfig {
    LayerConfig {
        prefetch: false,
        background_fetch: false,
        read_ahead_bytes: 0,
        ..LayerConfig::default()
    }
}

/// A context whose tail read holds only the footer, so that chunk requests
/// in these small test blobs are not served from the tail.
fn ctx(cfg: LayerConfig, caches: Caches) -> LayerContext {
    let mut c = LayerContext::new(cfg, caches);
    c.reader.tail_size = 0;
    c
}

async fn open(fake: &Fake, cfg: LayerConfig, caches: Caches) -> Layer<Fake> {
    let d = toc_digest(&fake.0.blob);
    let l = open_layer(fake.clone(), TocCheck::Digest(d), ctx(cfg, caches))
        .await
        .unwrap();
    fake.reset();
    l
}

async fn read_all(layer: &Arc<Layer<Fake>>, id: NodeId, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let b = layer
            .clone()
            .read(id, out.len() as u64, 128 << 10)
            .await
            .unwrap();
        assert!(!b.is_empty());
        out.extend_from_slice(&b);
    }
    out
}

fn big_blob() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let a = noise(100_000, 1);
    let b = noise(50_000, 7);
    let blob = build(&[
        Spec::Dir("d/"),
        Spec::File("d/a", &a, 16 << 10, false),
        Spec::File("d/b", &b, 10_000, true),
        Spec::File("d/empty", b"", 0, false),
    ]);
    (blob, a, b)
}

#[tokio::test]
async fn content_across_chunk_boundaries() {
    let (blob, a, b) = big_blob();
    let fake = Fake::new(blob);
    let layer = Arc::new(open(&fake, cfg(), Caches::memory_only(64 << 20)).await);
    assert!(layer.is_verified());
    let ia = layer.index().lookup("d/a").unwrap();
    let ib = layer.index().lookup("d/b").unwrap();
    for (off, len) in [
        (0u64, 10u32),
        (16_380, 10),
        (16_384, 1),
        (0, 100_000),
        (99_990, 100),
        (30_000, 40_000),
    ] {
        let got = layer.clone().read(ia, off, len).await.unwrap();
        let end = (off + u64::from(len)).min(a.len() as u64);
        assert_eq!(&got[..], &a[off as usize..end as usize], "a at {off}+{len}");
    }
    assert_eq!(layer.clone().read(ia, 200_000, 10).await.unwrap().len(), 0);
    assert_eq!(read_all(&layer, ib, b.len() as u64).await, b);
    let empty = layer.index().lookup("d/empty").unwrap();
    assert!(layer.clone().read(empty, 0, 10).await.unwrap().is_empty());
    let dir = layer.index().lookup("d").unwrap();
    assert!(matches!(
        layer.clone().read(dir, 0, 10).await,
        Err(ReadError::NotAFile)
    ));
    let s = layer.stats();
    assert!(s.chunks_from_network > 0 && s.chunks_from_memory > 0);
    assert_eq!(s.verification_failures, 0);
}

#[tokio::test]
async fn toc_digest_checked_or_explicitly_skipped() {
    let (blob, _, _) = big_blob();
    let fake = Fake::new(blob);
    let wrong = Digest::of(b"not the toc");
    let err = open_layer(
        fake.clone(),
        TocCheck::Digest(wrong),
        ctx(cfg(), Caches::memory_only(1 << 20)),
    )
    .await;
    assert!(err.is_err());
    let l = open_layer(
        fake.clone(),
        TocCheck::skip_verify("test"),
        ctx(cfg(), Caches::memory_only(1 << 20)),
    )
    .await
    .unwrap();
    assert!(matches!(l.trust(), Trust::Unverified { .. }));
    let l = open(&fake, cfg(), Caches::memory_only(1 << 20)).await;
    assert_eq!(
        l.trust(),
        &Trust::Verified {
            toc_digest: toc_digest(&fake.0.blob)
        }
    );
}

#[tokio::test]
async fn open_reads_tail_once_or_twice() {
    let (blob, _, _) = big_blob();
    let fake = Fake::new(blob);
    let d = toc_digest(&fake.0.blob);
    let _l = open_layer(
        fake.clone(),
        TocCheck::Digest(d),
        LayerContext::new(cfg(), Caches::memory_only(1 << 20)),
    )
    .await
    .unwrap();
    assert_eq!(fake.count(), 1, "one tail read holds footer and TOC");
    fake.reset();
    let mut c = ctx(cfg(), Caches::memory_only(1 << 20));
    c.reader.tail_size = 64;
    let _l = open_layer(fake.clone(), TocCheck::Digest(d), c)
        .await
        .unwrap();
    assert_eq!(fake.count(), 2, "short tail: one more read for the TOC");
}

#[tokio::test]
async fn flipped_byte_is_a_verification_error_and_never_cached() {
    let (blob, a, _) = big_blob();
    let fake = Fake::new(blob);
    let dir = tempfile::tempdir().unwrap();
    let caches = Caches {
        memory: Arc::new(MemoryCache::new(64 << 20)),
        disk: Some(Arc::new(DiskCache::open(dir.path(), 64 << 20).unwrap())),
    };
    let layer = Arc::new(open(&fake, cfg(), caches.clone()).await);
    let ia = layer.index().lookup("d/a").unwrap();
    let c = layer.index().chunk_for(ia, 20_000).unwrap();
    // Inside the chunk's deflate data (past the 10-byte gzip header).
    fake.0
        .flip_at
        .store(c.compressed_offset + 40, Ordering::SeqCst);
    let r = layer.clone().read(ia, 20_000, 100).await;
    assert!(matches!(r, Err(ReadError::Verification(_))), "{r:?}");
    assert_eq!(layer.stats().verification_failures, 1);
    assert_eq!(caches.memory.len(), 0);
    assert_eq!(caches.disk.as_ref().unwrap().len(), 0);
    // Not cached: the next read fetches again, and once the network is
    // healthy it succeeds.
    fake.0.flip_at.store(u64::MAX, Ordering::SeqCst);
    let got = layer.clone().read(ia, 20_000, 100).await.unwrap();
    assert_eq!(&got[..], &a[20_000..20_100]);
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn fetch_errors_fail_the_read_and_recover() {
    let (blob, a, _) = big_blob();
    let fake = Fake::new(blob);
    let layer = Arc::new(open(&fake, cfg(), Caches::memory_only(64 << 20)).await);
    let ia = layer.index().lookup("d/a").unwrap();
    fake.0.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        layer.clone().read(ia, 0, 10).await,
        Err(ReadError::Fetch(_))
    ));
    fake.0.fail.store(false, Ordering::SeqCst);
    assert_eq!(&layer.clone().read(ia, 0, 10).await.unwrap()[..], &a[..10]);
    assert_eq!(layer.stats().fetch_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_share_one_fetch() {
    let (blob, a, _) = big_blob();
    let fake = Fake::new(blob);
    let layer = Arc::new(open(&fake, cfg(), Caches::memory_only(64 << 20)).await);
    fake.0.delay_ms.store(200, Ordering::SeqCst);
    let ia = layer.index().lookup("d/a").unwrap();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let l = layer.clone();
        tasks.push(tokio::spawn(async move {
            l.read(ia, 16_384 + i * 100, 100).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap().unwrap();
        let off = 16_384 + i * 100;
        assert_eq!(&got[..], &a[off..off + 100]);
    }
    assert_eq!(fake.count(), 1, "{:?}", fake.calls());
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test]
async fn memory_cache_stays_within_its_byte_bound() {
    let a = noise(1 << 20, 3);
    let blob = build(&[Spec::File("a", &a, 32 << 10, false)]);
    let fake = Fake::new(blob);
    let caches = Caches::memory_only(200 << 10);
    let layer = Arc::new(open(&fake, cfg(), caches.clone()).await);
    let ia = layer.index().lookup("a").unwrap();
    assert_eq!(read_all(&layer, ia, a.len() as u64).await, a);
    assert!(caches.memory.weight() <= 200 << 10);
    assert!(caches.memory.len() >= 4, "the cache is used");
}

#[tokio::test]
async fn a_removed_layer_leaves_the_memory_cache() {
    let a = noise(256 << 10, 5);
    let b = noise(256 << 10, 6);
    let caches = Caches::memory_only(64 << 20);
    let fa = Fake::new(build(&[Spec::File("a", &a, 32 << 10, false)]));
    let fb = Fake::new(build(&[Spec::File("b", &b, 32 << 10, false)]));
    let la = Arc::new(open(&fa, cfg(), caches.clone()).await);
    let lb = Arc::new(open(&fb, cfg(), caches.clone()).await);
    let ia = la.index().lookup("a").unwrap();
    let ib = lb.index().lookup("b").unwrap();
    assert_eq!(read_all(&la, ia, a.len() as u64).await, a);
    assert_eq!(read_all(&lb, ib, b.len() as u64).await, b);
    let before = caches.memory.len();
    let dropped = la.forget_memory();
    assert!(dropped >= 8, "a's chunks were cached: {dropped}");
    assert_eq!(caches.memory.len(), before - dropped, "only a's chunks go");
    assert_eq!(lb.forget_memory(), before - dropped, "b's are still there");
    assert_eq!(caches.memory.len(), 0);
}

fn disk_caches(dir: &std::path::Path, disk: u64) -> Caches {
    Caches {
        memory: Arc::new(MemoryCache::new(64 << 20)),
        disk: Some(Arc::new(DiskCache::open(dir, disk).unwrap())),
    }
}

#[tokio::test]
async fn disk_cache_bound_and_lru_through_a_layer() {
    let a = noise(1 << 20, 5);
    let blob = build(&[Spec::File("a", &a, 64 << 10, false)]);
    let fake = Fake::new(blob);
    let dir = tempfile::tempdir().unwrap();
    let caches = disk_caches(dir.path(), 300 << 10);
    let layer = Arc::new(open(&fake, cfg(), caches.clone()).await);
    let ia = layer.index().lookup("a").unwrap();
    let disk = caches.disk.as_ref().unwrap();
    // One chunk per read, each written to disk before the next is read, so
    // that recency order is the file order (chunks fetched together are
    // written concurrently, in no fixed order).
    let mut got = Vec::new();
    for i in 0..16u64 {
        let b = layer
            .clone()
            .read(ia, i * (64 << 10), 64 << 10)
            .await
            .unwrap();
        got.extend_from_slice(&b);
        for _ in 0..500 {
            if disk.stats.writes.load(Ordering::Relaxed) > i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(got, a);
    assert_eq!(disk.stats.writes.load(Ordering::Relaxed), 16);
    assert!(disk.used() <= 300 << 10, "used {}", disk.used());
    assert_eq!(disk.len(), 4);
    let st = caches.status();
    assert_eq!(st.disk_entries, 4);
    assert_eq!(st.disk_evictions, 12);
    assert_eq!(st.disk_bytes, 4 * (64 << 10));
    // The newest four chunks survive, oldest first.
    let want: Vec<Digest> = layer
        .index()
        .chunks_of(ia)
        .skip(12)
        .map(|c| c.chunk_digest.unwrap())
        .collect();
    assert_eq!(disk.lru_order(), want);
}

async fn wait_for_disk(dir: &std::path::Path, n: usize) {
    for _ in 0..200 {
        let count = std::fs::read_dir(dir.join("chunks"))
            .unwrap()
            .flatten()
            .map(|d| std::fs::read_dir(d.path()).unwrap().count())
            .sum::<usize>();
        if count >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("disk cache never got {n} entries");
}

#[tokio::test]
async fn disk_cache_reused_by_a_new_layer_and_corruption_refetched() {
    let (blob, a, b) = big_blob();
    let fake = Fake::new(blob);
    let dir = tempfile::tempdir().unwrap();
    {
        let layer = Arc::new(open(&fake, cfg(), disk_caches(dir.path(), 64 << 20)).await);
        let ia = layer.index().lookup("d/a").unwrap();
        let ib = layer.index().lookup("d/b").unwrap();
        read_all(&layer, ia, a.len() as u64).await;
        read_all(&layer, ib, b.len() as u64).await;
        assert!(fake.count() > 0);
        // Disk writes finish after the readers are answered.
        let chunks = layer.index().all_chunks().count();
        wait_for_disk(dir.path(), chunks).await;
    }
    // "Restart": new caches over the same directory.
    let caches = disk_caches(dir.path(), 64 << 20);
    let layer = Arc::new(open(&fake, cfg(), caches.clone()).await);
    let ia = layer.index().lookup("d/a").unwrap();
    let ib = layer.index().lookup("d/b").unwrap();
    assert_eq!(read_all(&layer, ia, a.len() as u64).await, a);
    assert_eq!(read_all(&layer, ib, b.len() as u64).await, b);
    assert_eq!(fake.count(), 0, "served from disk: {:?}", fake.calls());
    assert!(layer.stats().chunks_from_disk > 0);

    // Corrupt one entry: detected, deleted, refetched.
    let c = layer.index().chunk_for(ib, 0).unwrap();
    let hex = hex::encode(c.chunk_digest.unwrap().0);
    let path = dir.path().join("chunks").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let caches = disk_caches(dir.path(), 64 << 20);
    let layer = Arc::new(open(&fake, cfg(), caches.clone()).await);
    assert_eq!(read_all(&layer, ib, b.len() as u64).await, b);
    assert_eq!(fake.count(), 1);
    let disk = caches.disk.as_ref().unwrap();
    assert_eq!(disk.stats.corrupt.load(Ordering::Relaxed), 1);
    // Rewritten with good content once the refetch lands.
    for _ in 0..200 {
        if std::fs::read(&path).is_ok_and(|v| v == b[..10_000]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("corrupt entry was not rewritten");
}

#[tokio::test]
async fn disk_write_failure_still_serves_reads() {
    let a = noise(300 << 10, 9);
    let blob = build(&[Spec::File("a", &a, 64 << 10, false)]);
    let fake = Fake::new(blob);
    let dir = tempfile::tempdir().unwrap();
    // A 64 KiB tmpfs fills after the first chunk (ENOSPC).
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount a tmpfs (this test needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let caches = disk_caches(&mnt, 64 << 20);
    let layer = Arc::new(open(&fake, cfg(), caches.clone()).await);
    let ia = layer.index().lookup("a").unwrap();
    assert_eq!(read_all(&layer, ia, a.len() as u64).await, a);
    let s = layer.stats();
    assert!(s.disk_write_errors > 0, "{s:?}");
    let disk = caches.disk.as_ref().unwrap();
    // After ENOSPC, writes pause instead of failing once per chunk.
    assert!(disk.stats.writes_skipped.load(Ordering::Relaxed) > 0);
    assert_eq!(s.verification_failures, 0);
    // No partial entries are visible.
    assert_eq!(
        disk.stats.write_errors.load(Ordering::Relaxed),
        s.disk_write_errors
    );
    drop(layer);
    let reopened = DiskCache::open(&mnt, 64 << 20).unwrap();
    assert!(reopened.len() <= 1);
}

/// Prioritized files first, then the landmark, then the rest.
fn prioritized_blob() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), pattern(20_000 + i * 1000, i as u8)))
        .collect();
    let mut specs = vec![
        Spec::File("hot1", &files[0].1, 8 << 10, false),
        Spec::File("hot2", &files[1].1, 0, false),
        Spec::File(".prefetch.landmark", &[0x0f], 0, false),
    ];
    for (name, data) in &files[2..] {
        specs.push(Spec::File(name, data, 8 << 10, false));
    }
    (build(&specs), files)
}

#[tokio::test]
async fn prefetch_fetches_the_landmark_range_once() {
    let (blob, files) = prioritized_blob();
    let fake = Fake::new(blob);
    let index = index_of(&fake.0.blob);
    let Prefetch::UpTo(landmark) = index.prefetch() else {
        panic!("no landmark")
    };
    let d = toc_digest(&fake.0.blob);
    fake.0.delay_ms.store(50, Ordering::SeqCst);
    let c = LayerConfig {
        prefetch: true,
        ..cfg()
    };
    let layer = Arc::new(
        open_layer(
            fake.clone(),
            TocCheck::Digest(d),
            ctx(c, Caches::memory_only(64 << 20)),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        layer.wait_prefetch(Duration::from_secs(10)).await,
        PrefetchState::Done
    );
    let calls = fake.calls();
    // calls[0..2] are the footer and TOC reads at open.
    assert_eq!(calls.len(), 3, "{calls:?}");
    let first = index.chunk_for(index.lookup("hot1").unwrap(), 0).unwrap();
    assert_eq!(calls[2], vec![first.compressed_offset..landmark]);
    fake.reset();
    for (name, data) in [("hot1", &files[0].1), ("hot2", &files[1].1)] {
        let id = layer.index().lookup(name).unwrap();
        assert_eq!(&read_all(&layer, id, data.len() as u64).await, data);
    }
    assert_eq!(fake.count(), 0, "prioritized files were prefetched");
    assert!(layer.stats().chunks_prefetched >= 4);
    // A file after the landmark is not prefetched.
    let cold = layer.index().lookup("f2").unwrap();
    read_all(&layer, cold, files[2].1.len() as u64).await;
    assert!(fake.count() > 0);
}

#[tokio::test]
async fn prefetch_wait_times_out_and_readers_join_it() {
    let (blob, files) = prioritized_blob();
    let fake = Fake::new(blob);
    let d = toc_digest(&fake.0.blob);
    let c = LayerConfig {
        prefetch: true,
        ..cfg()
    };
    let layer = Arc::new(
        open_layer(
            fake.clone(),
            TocCheck::Digest(d),
            ctx(c, Caches::memory_only(64 << 20)),
        )
        .await
        .unwrap(),
    );
    fake.0.delay_ms.store(300, Ordering::SeqCst);
    // The prefetch request is already in flight (sent before the delay was
    // set? no: it sleeps); either way readers of hot files wait for it.
    let id = layer.index().lookup("hot1").unwrap();
    let got = read_all(&layer, id, files[0].1.len() as u64).await;
    assert_eq!(got, files[0].1);
    assert_eq!(
        fake.count(),
        3,
        "footer + TOC + prefetch only: {:?}",
        fake.calls()
    );
    let s = layer.wait_prefetch(Duration::from_millis(1)).await;
    assert_eq!(s, PrefetchState::Done);
}

#[tokio::test]
async fn prefetch_timeout_reports_running() {
    let (blob, _) = prioritized_blob();
    let fake = Fake::new(blob);
    fake.0.delay_ms.store(2000, Ordering::SeqCst);
    let d = toc_digest(&fake.0.blob);
    let c = LayerConfig {
        prefetch: true,
        ..cfg()
    };
    let layer = open_layer(
        fake.clone(),
        TocCheck::Digest(d),
        ctx(c, Caches::memory_only(64 << 20)),
    )
    .await
    .unwrap();
    assert_eq!(
        layer.wait_prefetch(Duration::from_millis(100)).await,
        PrefetchState::Running
    );
    drop(layer);
}

/// Poorly compressible content, different for every seed and offset.
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut x = (seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn many_files(n: usize, size: usize) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("dir/file{i:04}"), noise(size, i as u64)))
        .collect();
    let mut specs = vec![Spec::Dir("dir/")];
    for (name, data) in &files {
        specs.push(Spec::File(name, data, 0, false));
    }
    (build(&specs), files)
}

#[tokio::test]
async fn background_fetch_caches_everything() {
    let (blob, files) = many_files(64, 8 << 10);
    let fake = Fake::new(blob);
    let dir = tempfile::tempdir().unwrap();
    let caches = disk_caches(dir.path(), 64 << 20);
    let c = LayerConfig {
        background_fetch: true,
        background_pause_ms: 0,
        background_range_bytes: 64 << 10,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, caches.clone()).await);
    for _ in 0..500 {
        if layer.background_done() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(layer.background_done());
    assert_eq!(caches.disk.as_ref().unwrap().len(), files.len());
    assert!(
        fake.count() < files.len() / 2,
        "merged ranges: {}",
        fake.count()
    );
    fake.reset();
    for (name, data) in &files {
        let id = layer.index().lookup(name).unwrap();
        assert_eq!(&read_all(&layer, id, data.len() as u64).await, data);
    }
    assert_eq!(fake.count(), 0);
    assert_eq!(layer.stats().chunks_background, files.len() as u64);
}

#[tokio::test]
async fn background_fetch_stops_when_the_layer_is_dropped() {
    let (blob, _) = many_files(200, 16 << 10);
    let fake = Fake::new(blob);
    fake.0.delay_ms.store(30, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let c = LayerConfig {
        background_fetch: true,
        background_pause_ms: 0,
        background_concurrency: 1,
        background_range_bytes: 64 << 10,
        ..cfg()
    };
    let layer = open(&fake, c, disk_caches(dir.path(), 64 << 20)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(fake.count() > 0, "background fetch started");
    drop(layer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let n = fake.count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.count(), n, "no requests after drop");
    assert!(n < 40, "stopped well before the end: {n}");
    // The fake is no longer held by any task.
    assert_eq!(Arc::strong_count(&fake.0), 1);
}

#[tokio::test]
async fn background_yields_to_on_demand_reads() {
    let (blob, files) = many_files(100, 16 << 10);
    let fake = Fake::new(blob);
    fake.0.delay_ms.store(20, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let c = LayerConfig {
        background_fetch: true,
        background_pause_ms: 2000,
        background_range_bytes: 64 << 10,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, disk_caches(dir.path(), 64 << 20)).await);
    // An on-demand read right away pauses background for 2 s.
    let (name, data) = &files[50];
    let id = layer.index().lookup(name).unwrap();
    assert_eq!(&read_all(&layer, id, data.len() as u64).await, data);
    let after_read = fake.count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // At most the batches already started before the read.
    assert!(
        fake.count() <= after_read + 2,
        "{} vs {after_read}",
        fake.count()
    );
}

/// Reads every file in TOC order, one small read each (like `tar c` or a
/// tree walk) over a registry with a 5 ms round trip; returns (requests,
/// bytes fetched, elapsed).
async fn walk(read_ahead: u64, read_ahead_max: u64, n: usize) -> (usize, u64, Duration) {
    let (blob, files) = many_files(n, 4 << 10);
    let fake = Fake::new(blob);
    let c = LayerConfig {
        read_ahead_bytes: read_ahead,
        read_ahead_max_bytes: read_ahead_max,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, Caches::memory_only(64 << 20)).await);
    fake.0.delay_ms.store(5, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    for (name, data) in &files {
        let id = layer.index().lookup(name).unwrap();
        assert_eq!(&read_all(&layer, id, data.len() as u64).await, data);
    }
    (
        fake.count(),
        fake.0.bytes.load(Ordering::SeqCst),
        t0.elapsed(),
    )
}

#[tokio::test]
async fn read_ahead_cuts_requests_for_a_small_file_walk() {
    let (without, bytes_without, t_without) = walk(0, 0, 200).await;
    let (with, bytes_with, t_with) = walk(1 << 20, 1 << 20, 200).await;
    eprintln!(
        "small-file walk, 200 x 4 KiB, 5 ms per request: without read-ahead {without} requests, \
         {bytes_without} B, {t_without:?}; with 1 MiB read-ahead {with} requests, {bytes_with} B, \
         {t_with:?}"
    );
    assert_eq!(without, 200);
    assert!(with * 20 <= without, "{with} vs {without}");
    // Nothing fetched twice.
    assert_eq!(bytes_with, bytes_without);
}

/// A walk through the layer in blob order grows the read-ahead window:
/// far fewer requests than a fixed window of the same starting size, and
/// still nothing fetched twice.
#[tokio::test]
async fn read_ahead_window_grows_along_a_walk() {
    let (fixed, bytes_fixed, _) = walk(32 << 10, 32 << 10, 800).await;
    let (adaptive, bytes_adaptive, _) = walk(32 << 10, 4 << 20, 800).await;
    eprintln!(
        "walk of 800 x 4 KiB: fixed 32 KiB read-ahead {fixed} requests, growing to 4 MiB \
         {adaptive} requests"
    );
    assert!(adaptive * 4 <= fixed, "{adaptive} vs {fixed}");
    assert_eq!(bytes_adaptive, bytes_fixed);
}

#[tokio::test]
async fn content_source_is_object_safe_for_fuse() {
    let (blob, a, _) = big_blob();
    let fake = Fake::new(blob);
    let layer = open(&fake, cfg(), Caches::memory_only(1 << 20)).await;
    let ia = layer.index().lookup("d/a").unwrap();
    let src: Arc<dyn content::ContentSource> = Arc::new(layer);
    assert_eq!(&src.read(ia, 5, 5).await.unwrap()[..], &a[5..10]);
}

#[tokio::test]
async fn identical_chunks_are_shared_across_layers() {
    let (blob, a, _) = big_blob();
    // Same files, different blob (another layer with a different order).
    let blob2 = build(&[
        Spec::File("x", b"other", 0, false),
        Spec::File("d/a", &a, 16 << 10, false),
    ]);
    let caches = Caches::memory_only(64 << 20);
    let fake1 = Fake::new(blob);
    let l1 = Arc::new(open(&fake1, cfg(), caches.clone()).await);
    let id = l1.index().lookup("d/a").unwrap();
    read_all(&l1, id, a.len() as u64).await;
    let fake2 = Fake::new(blob2);
    let l2 = Arc::new(open(&fake2, cfg(), caches).await);
    let id = l2.index().lookup("d/a").unwrap();
    assert_eq!(read_all(&l2, id, a.len() as u64).await, a);
    assert_eq!(fake2.count(), 0, "served from the shared cache");
}

#[tokio::test]
async fn big_prefetch_is_split_into_concurrent_ranges() {
    let files: Vec<Vec<u8>> = (0..6).map(|i| noise(200 << 10, 100 + i)).collect();
    let mut specs: Vec<Spec> = files
        .iter()
        .enumerate()
        .map(|(i, d)| Spec::File(["h0", "h1", "h2", "h3", "h4", "h5"][i], d, 64 << 10, false))
        .collect();
    specs.push(Spec::File(".prefetch.landmark", &[0x0f], 0, false));
    specs.push(Spec::File("cold", b"cold", 0, false));
    let blob = build(&specs);
    let index = index_of(&blob);
    let Prefetch::UpTo(landmark) = index.prefetch() else {
        panic!("no landmark")
    };
    let fake = Fake::new(blob);
    fake.0.delay_ms.store(300, Ordering::SeqCst);
    let d = toc_digest(&fake.0.blob);
    let c = LayerConfig {
        prefetch: true,
        prefetch_range_bytes: 256 << 10,
        ..cfg()
    };
    let t0 = std::time::Instant::now();
    let layer = open_layer(
        fake.clone(),
        TocCheck::Digest(d),
        ctx(c, Caches::memory_only(64 << 20)),
    )
    .await
    .unwrap();
    assert_eq!(
        layer.wait_prefetch(Duration::from_secs(10)).await,
        PrefetchState::Done
    );
    let mut ranges: Vec<Range<u64>> = fake.calls()[2..].iter().flatten().cloned().collect();
    ranges.sort_by_key(|r| r.start);
    assert!(ranges.len() >= 4, "{ranges:?}");
    assert_eq!(ranges.last().unwrap().end, landmark);
    for w in ranges.windows(2) {
        assert_eq!(w[0].end, w[1].start, "contiguous, no overlap");
    }
    // Concurrent: sequential requests (two at open plus one per range) would
    // take (2 + n) x 300 ms.
    let sequential = Duration::from_millis(300 * (2 + ranges.len() as u64));
    assert!(t0.elapsed() < sequential * 3 / 4, "{:?}", t0.elapsed());
    assert_eq!(layer.stats().chunks_prefetched, 6 * 4);
}

#[tokio::test]
async fn layers_with_a_runtime_chosen_fetcher() {
    use rstargz::fs::layer::DynFetcher;
    let (blob, a, _) = big_blob();
    let d = toc_digest(&blob);
    let fetcher = DynFetcher(Arc::new(Fake::new(blob)));
    let layer = open_layer(
        fetcher,
        TocCheck::Digest(d),
        ctx(cfg(), Caches::memory_only(1 << 20)),
    )
    .await
    .unwrap();
    let id = layer.index().lookup("d/a").unwrap();
    assert_eq!(&layer.read_at(id, 0, 10).await.unwrap()[..], &a[..10]);
}

#[tokio::test]
async fn unspecified_prefetch_uses_the_label_size() {
    let (blob, a, _) = big_blob();
    let fake = Fake::new(blob);
    let d = toc_digest(&fake.0.blob);
    let index = index_of(&fake.0.blob);
    assert_eq!(index.prefetch(), Prefetch::Unspecified);
    let ia = index.lookup("d/a").unwrap();
    let end = index.chunks_of(ia).last().unwrap().compressed_end;
    let mut c = ctx(
        LayerConfig {
            prefetch: true,
            ..cfg()
        },
        Caches::memory_only(64 << 20),
    );
    c.prefetch_label = Some(end);
    let layer = Arc::new(
        open_layer(fake.clone(), TocCheck::Digest(d), c)
            .await
            .unwrap(),
    );
    assert_eq!(
        layer.wait_prefetch(Duration::from_secs(10)).await,
        PrefetchState::Done
    );
    fake.reset();
    assert_eq!(read_all(&layer, ia, a.len() as u64).await, a);
    assert_eq!(fake.count(), 0);
    // Without a label or configured size: no prefetch.
    let l2 = open(
        &fake,
        LayerConfig {
            prefetch: true,
            ..cfg()
        },
        Caches::memory_only(1 << 20),
    )
    .await;
    assert_eq!(l2.wait_prefetch(Duration::ZERO).await, PrefetchState::None);
}

#[tokio::test]
async fn small_layers_are_served_from_the_tail_read() {
    let (blob, a, b) = big_blob();
    assert!(blob.len() < 512 << 10);
    let fake = Fake::new(blob);
    let d = toc_digest(&fake.0.blob);
    let c = LayerContext::new(
        LayerConfig {
            prefetch: true,
            ..cfg()
        },
        Caches::memory_only(64 << 20),
    );
    let layer = Arc::new(
        open_layer(fake.clone(), TocCheck::Digest(d), c)
            .await
            .unwrap(),
    );
    assert_eq!(fake.count(), 1, "the tail read");
    let ia = layer.index().lookup("d/a").unwrap();
    let ib = layer.index().lookup("d/b").unwrap();
    assert_eq!(read_all(&layer, ia, a.len() as u64).await, a);
    assert_eq!(read_all(&layer, ib, b.len() as u64).await, b);
    assert_eq!(fake.count(), 1, "no chunk requests: {:?}", fake.calls());
    let chunks = layer.index().all_chunks().count() as u64;
    assert_eq!(layer.stats().chunks_from_tail, chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_requests_are_bounded_per_layer() {
    let (blob, files) = many_files(40, 4 << 10);
    let fake = Fake::new(blob);
    let c = LayerConfig {
        fetch_concurrency: 3,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, Caches::memory_only(64 << 20)).await);
    fake.0.delay_ms.store(30, Ordering::SeqCst);
    fake.0.max_active.store(0, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for (name, data) in files {
        let l = layer.clone();
        tasks.push(tokio::spawn(async move {
            let id = l.index().lookup(&name).unwrap();
            assert_eq!(read_all(&l, id, data.len() as u64).await, data);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(fake.count(), 40);
    assert_eq!(fake.0.max_active.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn slow_reads_time_out_but_the_fetch_still_fills_the_cache() {
    let (blob, a, _) = big_blob();
    let fake = Fake::new(blob);
    let c = LayerConfig {
        read_timeout_ms: 50,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, Caches::memory_only(64 << 20)).await);
    fake.0.delay_ms.store(300, Ordering::SeqCst);
    let ia = layer.index().lookup("d/a").unwrap();
    assert!(matches!(
        layer.clone().read(ia, 0, 10).await,
        Err(ReadError::Timeout(_))
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(&layer.clone().read(ia, 0, 10).await.unwrap()[..], &a[..10]);
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn a_chunk_never_fetches_more_than_it_can_need() {
    // One small file, then 2 MiB of incompressible bytes in its member
    // before the TOC: the file's compressed range runs to the TOC.
    let data = noise(1000, 42);
    let mut w = TestWriter::new();
    w.add(&Spec::File("small", &data, 0, false));
    w.write(&noise(2 << 20, 43));
    let mut toc = rstargz::estargz::toc::JsonToc {
        version: 1,
        entries: std::mem::take(&mut w.entries),
    };
    toc.entries.truncate(1);
    let json = serde_json::to_vec(&toc).unwrap();
    let blob = w.finish_with_json(&json, false);
    let fake = Fake::new(blob);
    let layer = Arc::new(open(&fake, cfg(), Caches::memory_only(1 << 20)).await);
    let id = layer.index().lookup("small").unwrap();
    let c = layer.index().chunk_for(id, 0).unwrap();
    assert!(c.compressed_len() > 2 << 20);
    assert_eq!(read_all(&layer, id, 1000).await, data);
    let fetched = fake.0.bytes.load(Ordering::SeqCst);
    assert!(fetched < 80 << 10, "fetched {fetched}");
}

#[test]
fn toc_check_from_labels() {
    use rstargz::fs::layer::{PREFETCH_LABEL, SKIP_VERIFY_LABEL, TOC_DIGEST_LABEL};
    use std::collections::HashMap;
    let d = Digest::of(b"toc");
    let mut labels = HashMap::new();
    assert!(TocCheck::from_labels(&labels, true).is_err());
    labels.insert(SKIP_VERIFY_LABEL.to_string(), "true".to_string());
    assert!(TocCheck::from_labels(&labels, false).is_err());
    assert!(matches!(
        TocCheck::from_labels(&labels, true),
        Ok(TocCheck::Skip { .. })
    ));
    labels.insert(TOC_DIGEST_LABEL.to_string(), d.to_string());
    assert!(matches!(
        TocCheck::from_labels(&labels, true),
        Ok(TocCheck::Digest(x)) if x == d
    ));
    labels.insert(TOC_DIGEST_LABEL.to_string(), "sha256:nope".to_string());
    assert!(TocCheck::from_labels(&labels, true).is_err());
    labels.insert(PREFETCH_LABEL.to_string(), "12345".to_string());
    let c = LayerContext::new(cfg(), Caches::memory_only(1)).with_labels(&labels);
    assert_eq!(c.prefetch_label, Some(12345));
}

#[tokio::test]
async fn prefetch_after_a_restart_comes_from_the_disk_cache() {
    let (blob, _) = prioritized_blob();
    let fake = Fake::new(blob);
    let d = toc_digest(&fake.0.blob);
    let dir = tempfile::tempdir().unwrap();
    let c = LayerConfig {
        prefetch: true,
        ..cfg()
    };
    {
        let layer = open_layer(
            fake.clone(),
            TocCheck::Digest(d),
            ctx(c.clone(), disk_caches(dir.path(), 64 << 20)),
        )
        .await
        .unwrap();
        assert_eq!(
            layer.wait_prefetch(Duration::from_secs(10)).await,
            PrefetchState::Done
        );
        let distinct: std::collections::HashSet<_> = ["hot1", "hot2"]
            .iter()
            .flat_map(|n| layer.index().chunks_of(layer.index().lookup(n).unwrap()))
            .map(|c| c.chunk_digest.unwrap())
            .collect();
        wait_for_disk(dir.path(), distinct.len()).await;
    }
    fake.reset();
    let layer = open_layer(
        fake.clone(),
        TocCheck::Digest(d),
        ctx(c, disk_caches(dir.path(), 64 << 20)),
    )
    .await
    .unwrap();
    assert_eq!(
        layer.wait_prefetch(Duration::from_secs(10)).await,
        PrefetchState::Done
    );
    assert_eq!(fake.count(), 2, "footer and TOC only: {:?}", fake.calls());
    assert!(layer.stats().chunks_from_disk > 0);
}

/// Prefetch streams: the first prioritized file is readable, with no
/// request of its own, while the rest of the prefetch range has not
/// arrived yet (the fake holds it back until the gate opens).
#[tokio::test]
async fn streamed_prefetch_serves_the_first_files_before_the_range_ends() {
    let hot1 = noise(300 << 10, 7);
    let hot2 = noise(300 << 10, 8);
    let blob = build(&[
        Spec::File("hot1", &hot1, 64 << 10, false),
        Spec::File("hot2", &hot2, 64 << 10, false),
        Spec::File(".prefetch.landmark", &[0x0f], 0, false),
        Spec::File("cold", b"cold", 0, false),
    ]);
    let index = index_of(&blob);
    let hot2_at = index
        .chunk_for(index.lookup("hot2").unwrap(), 0)
        .unwrap()
        .compressed_offset;
    let fake = Fake::new(blob);
    fake.0.stream_piece.store(16 << 10, Ordering::SeqCst);
    fake.0.gate_at.store(hot2_at, Ordering::SeqCst);
    let c = LayerConfig {
        prefetch: true,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, Caches::memory_only(64 << 20)).await);
    let id = layer.index().lookup("hot1").unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        read_all(&layer, id, hot1.len() as u64),
    )
    .await
    .expect("hot1 readable before the rest of the prefetch range arrived");
    assert_eq!(got, hot1);
    assert_eq!(layer.prefetch_state(), PrefetchState::Running);
    fake.0.gate.notify_one();
    assert_eq!(
        layer.wait_prefetch(Duration::from_secs(20)).await,
        PrefetchState::Done
    );
    let id = layer.index().lookup("hot2").unwrap();
    assert_eq!(read_all(&layer, id, hot2.len() as u64).await, hot2);
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "one streamed prefetch request: {calls:?}");
    assert!(layer.stats().chunks_prefetched >= 10);
}

/// A miss also fetches the chunks of the same directory just before it
/// (read-behind): a package whose files are read in another order than
/// the blob's costs one request, and files of other directories before it
/// are left alone.
#[tokio::test]
async fn read_ahead_also_covers_the_directory_before_a_miss() {
    let other = noise(8 << 10, 1);
    let pkg: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("pkg/sub/f{i}"), noise(4 << 10, 10 + i as u64)))
        .collect();
    let mut specs = vec![
        Spec::Dir("other"),
        Spec::File("other/x", &other, 0, false),
        Spec::Dir("pkg"),
        Spec::Dir("pkg/sub"),
    ];
    for (n, d) in &pkg {
        specs.push(Spec::File(n, d, 0, false));
    }
    let fake = Fake::new(build(&specs));
    let c = LayerConfig {
        read_ahead_bytes: 512 << 10,
        ..cfg()
    };
    let layer = Arc::new(open(&fake, c, Caches::memory_only(64 << 20)).await);
    // The last file first, then the others in reverse blob order. The
    // first miss's chunk and its read-behind go in two concurrent
    // requests (read-ahead never delays the chunk a reader waits for).
    for (i, (n, d)) in pkg.iter().rev().enumerate() {
        let id = layer.index().lookup(n).unwrap();
        assert_eq!(&read_all(&layer, id, d.len() as u64).await, d);
        assert_eq!(fake.count(), 2, "after read {i}: {:?}", fake.calls());
    }
    let id = layer.index().lookup("other/x").unwrap();
    assert_eq!(read_all(&layer, id, other.len() as u64).await, other);
    assert_eq!(fake.count(), 3, "other/x was not read behind");
}
