//! Memory of a layer's index, counted exactly by a counting allocator: the
//! daemon keeps one index per mounted layer, so its size per node is a
//! budget. Allocation counts are deterministic, unlike timings, so this is
//! a plain assertion.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use rstargz::estargz::reader::{BlobReader, ReaderOptions};
use rstargz::estargz::writer::{BuildOptions, build};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn debian_layer_index_is_small() {
    let rootfs = support::rootfs::debian_rootfs();
    let mut blob = Vec::new();
    let opts = BuildOptions {
        level: 1,
        ..Default::default()
    };
    build(
        std::fs::File::open(&rootfs.path).expect("rootfs tar"),
        &mut blob,
        &opts,
    )
    .expect("build eStargz");
    let before = LIVE.load(Ordering::SeqCst);
    let reader = BlobReader::open(&blob[..], &ReaderOptions::default(), None).expect("open");
    let bytes = LIVE.load(Ordering::SeqCst) - before;
    let index = reader.index();
    let entries = index.len();
    eprintln!(
        "index of the Debian rootfs layer: {entries} nodes, {} chunks, {bytes} bytes ({} per node)",
        index.all_chunks().count(),
        bytes / entries as isize
    );
    assert!(entries > 5_000, "a real rootfs has thousands of entries");
    // 314 bytes per node when this was written (2.1 MB for this layer):
    // about 160 for the node, 56 for its path, 32 for its name in the
    // directory, 80 per chunk. A regression guard, with a little slack.
    let per_node = bytes / entries as isize;
    assert!(
        per_node <= 330,
        "the index takes {per_node} bytes per node ({bytes} in all)"
    );
}
