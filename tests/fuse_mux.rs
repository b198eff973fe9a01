//! The daemon's single FUSE mount, for real (root and /dev/fuse required):
//! layers served in slots and bind-mounted where the snapshots are, inode
//! numbers carrying the slot, detaching (clean and busy), and FUSE
//! passthrough of complete files.

mod fixture;
mod fuse_support;

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fixture::*;
use fuse_support::*;
use rstargz::estargz::digest::Digest;
use rstargz::fs::cache::CompleteFiles;
use rstargz::fs::fuse::{
    LayerFs, LayerFsOptions, MountOptions, MuxMount, SLOT_BITS, Unmounted, mount, slot_base,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn layer_fs(blob: Vec<u8>, rt: &tokio::runtime::Runtime) -> LayerFs {
    layer_fs_with(blob, rt, LayerFsOptions::default())
}

fn layer_fs_with(blob: Vec<u8>, rt: &tokio::runtime::Runtime, o: LayerFsOptions) -> LayerFs {
    let index = index_of(&blob);
    let source = MemSource::new(blob, index.clone(), Duration::ZERO);
    LayerFs::new(index, source, rt.handle().clone(), o)
}

/// The mountinfo line of the mount at `p`.
fn mountinfo(p: &Path) -> Option<String> {
    let p = p.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*p))
        .map(str::to_string)
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn layers_in_slots_bound_on_their_targets() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mux =
        MuxMount::mount(&dir.path().join("fuse"), &MountOptions::default(), 64).expect("mount mux");
    let a = build(&[
        Spec::Dir("etc/"),
        Spec::File("etc/a", b"layer a\n", 0, false),
    ]);
    let b = build(&[
        Spec::Dir("etc/"),
        Spec::File("etc/b", b"layer b\n", 0, false),
        Spec::File(".wh.gone", b"", 0, false),
    ]);
    let (ta, tb) = (dir.path().join("ta"), dir.path().join("tb"));
    fs::create_dir(&ta).unwrap();
    fs::create_dir(&tb).unwrap();
    mux.attach(3, layer_fs(a, &rt), &ta).expect("attach a");
    mux.attach(7, layer_fs(b, &rt), &tb).expect("attach b");
    assert!(
        mux.attach(7, layer_fs(build(&[]), &rt), &ta).is_err(),
        "a slot in use is refused"
    );

    // Each target shows its own layer, whiteouts included.
    assert_eq!(fs::read(ta.join("etc/a")).unwrap(), b"layer a\n");
    assert_eq!(fs::read(tb.join("etc/b")).unwrap(), b"layer b\n");
    assert!(!ta.join("etc/b").exists());
    assert_eq!(fs::metadata(tb.join("gone")).unwrap().rdev(), 0);
    // The mux root lists the slots.
    let mut slots = readdir_all(&dir.path().join("fuse"));
    slots.retain(|n| n != "." && n != "..");
    assert_eq!(slots, ["3", "7"]);
    // Inode numbers carry the slot; the layer root is base + 1.
    assert_eq!(fs::metadata(&ta).unwrap().ino(), slot_base(3) + 1);
    let ino = fs::metadata(tb.join("etc/b")).unwrap().ino();
    assert_eq!(ino >> SLOT_BITS, 7, "{ino:#x}");
    // Targets are bind mounts of the slot directories: fuse.rstargz, root /<slot>.
    let line = mountinfo(&tb).expect("target is a mount");
    assert_eq!(line.split(' ').nth(3), Some("/7"), "{line}");
    assert!(line.contains(" - fuse.rstargz "), "{line}");

    // Unused: detached at once, and the slot is reaped once the kernel has
    // forgotten its inodes.
    assert_eq!(mux.detach(3), Unmounted::Clean);
    assert!(mountinfo(&ta).is_none());
    let mut slots = readdir_all(&dir.path().join("fuse"));
    slots.retain(|n| n != "." && n != "..");
    assert_eq!(slots, ["7"]);
    eventually("slot 3 reaped", || mux.is_free(3));

    // Busy: detached lazily, and an open file keeps reading.
    let mut f = fs::File::open(tb.join("etc/b")).unwrap();
    assert_eq!(mux.detach(7), Unmounted::Lazy);
    assert!(mountinfo(&tb).is_none());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "layer b\n");
    assert_eq!(mux.slots_in_use(), (0, 1), "slot 7 kept while referenced");
    assert!(!mux.is_free(7));
    drop(f);
    drop(mux);
    assert!(
        mountinfo(&dir.path().join("fuse")).is_none(),
        "mux unmounted"
    );
}

#[test]
fn complete_files_are_read_by_passthrough() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let big = pattern(3_000_000, 9);
    let blob = build(&[Spec::File("big.bin", &big, 65_536, false)]);
    let files = Arc::new(CompleteFiles::open(&dir.path().join("complete"), 64 << 20).unwrap());
    // No page cache kept across opens: every cached open reads through FUSE.
    let opts = LayerFsOptions {
        keep_cache: false,
        ..LayerFsOptions::default()
    };
    let fs_ = layer_fs_with(blob, &rt, opts).with_passthrough(files.clone());
    let stats = fs_.stats();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let h = mount(&mnt, fs_, &MountOptions::default()).expect("mount");

    // First open: through FUSE; the layer is complete, so the file is
    // written out behind it.
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), big);
    let digest = Digest::of(&big);
    eventually("complete file written", || files.ready(&digest).is_some());
    assert_eq!(files.stats.written.load(Ordering::Relaxed), 1);
    let fuse_reads = stats.reads.load(Ordering::Relaxed);
    assert!(fuse_reads > 0);

    // Later opens are passthrough: same bytes, no FUSE read. (The first
    // open's release is asynchronous; until it arrives an open is still
    // served through FUSE, so try a few times.)
    eventually("a read served by passthrough", || {
        let before = stats.reads.load(Ordering::Relaxed);
        assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), big);
        stats.reads.load(Ordering::Relaxed) == before
    });
    h.unmount().expect("unmount");
}
