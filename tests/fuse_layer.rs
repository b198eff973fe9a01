//! The FUSE layer filesystem, mounted for real (root and /dev/fuse
//! required): metadata and content through std::fs, whiteouts as overlayfs
//! reads them, overlayfs stacked on two layers, verification failures,
//! and reads that must not block the FUSE threads.

mod fixture;
mod fuse_support;

use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fixture::*;
use fuse_support::*;
use rstargz::estargz::digest::Digest;
use rstargz::estargz::toc::{EntryType, JsonEntry, JsonToc, Xattr};
use rstargz::fs::fuse::{LayerFsOptions, Unmounted, unmount};

const NO_DELAY: Duration = Duration::ZERO;

fn entry<'a>(toc: &'a mut JsonToc, name: &str) -> &'a mut JsonEntry {
    toc.entries
        .iter_mut()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no TOC entry {name}"))
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn metadata_and_contents() {
    let big = pattern(300_000, 7);
    let blob = build_with(
        &[
            Spec::Dir("etc/"),
            Spec::File("etc/hosts", b"127.0.0.1 localhost\n", 0, false),
            Spec::File("empty", b"", 0, false),
            // 64 KiB chunks, each its own gzip member; and shared members.
            Spec::File("usr/big.bin", &big, 65_536, false),
            Spec::File("usr/shared.bin", &big[..100_000], 30_000, true),
            Spec::Symlink("lnk", "etc/hosts"),
            Spec::Hardlink("etc/hosts2", "etc/hosts"),
            Spec::Fifo("pipe"),
            Spec::Char("dev/null", 1, 3),
            Spec::Char("dev/sda", 8, 0),
        ],
        |toc| {
            let e = entry(toc, "etc/hosts");
            e.uid = 1000;
            e.gid = 1001;
            e.mode = 0o4750;
            e.modtime = "2021-03-04T05:06:07Z".into();
            e.xattrs.insert("user.k".into(), Xattr(b"v\0bin".to_vec()));
            e.xattrs.insert("trusted.t".into(), Xattr(b"tv".to_vec()));
            entry(toc, "dev/sda").kind = EntryType::Block;
            entry(toc, "etc/").modtime = "2021-03-04T05:06:07Z".into();
        },
    );
    let l = Layer::mount(blob, NO_DELAY, LayerFsOptions::default());

    // Contents: whole files, and partial reads across chunk boundaries.
    assert_eq!(
        fs::read(l.p("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(fs::read(l.p("empty")).unwrap(), b"");
    assert_eq!(fs::read(l.p("usr/big.bin")).unwrap(), big);
    assert_eq!(fs::read(l.p("usr/shared.bin")).unwrap(), &big[..100_000]);
    let f = fs::File::open(l.p("usr/big.bin")).unwrap();
    for (off, len) in [
        (65_530, 20),
        (0, 1),
        (131_071, 2),
        (299_990, 10),
        (200_000, 70_000),
    ] {
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, &big[off..off + len], "read at {off}+{len}");
    }
    let mut buf = [0u8; 100];
    assert_eq!(
        f.read_at(&mut buf, 299_950).unwrap(),
        50,
        "short read at EOF"
    );
    assert_eq!(f.read_at(&mut buf, 400_000).unwrap(), 0, "read past EOF");
    drop(f);

    // Attributes from the TOC.
    let m = fs::metadata(l.p("etc/hosts")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1001));
    assert_eq!(m.mode(), 0o100_000 | 0o4750);
    assert_eq!(m.size(), 20);
    assert_eq!(m.blocks(), 1);
    assert_eq!(m.mtime(), 1_614_834_367);
    assert_eq!(m.atime(), m.mtime());
    assert_eq!(m.ctime(), m.mtime());
    assert_eq!(fs::metadata(l.p("etc")).unwrap().mtime(), 1_614_834_367);
    assert_eq!(fs::metadata(l.p("usr/big.bin")).unwrap().size(), 300_000);
    let d = fs::metadata(l.path()).unwrap();
    assert!(d.is_dir());
    assert_eq!(d.ino(), 1);
    assert_eq!(d.nlink(), 2 + 3, "root holds etc, usr, dev");

    // Hardlinks share the inode.
    let h2 = fs::metadata(l.p("etc/hosts2")).unwrap();
    assert_eq!(h2.ino(), m.ino());
    assert_eq!((m.nlink(), h2.nlink()), (2, 2));
    assert_eq!(
        fs::read(l.p("etc/hosts2")).unwrap(),
        b"127.0.0.1 localhost\n"
    );

    // Symlinks, fifos and devices.
    assert_eq!(
        fs::read_link(l.p("lnk")).unwrap().to_str(),
        Some("etc/hosts")
    );
    assert!(
        fs::symlink_metadata(l.p("lnk"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(l.p("lnk")).unwrap(), b"127.0.0.1 localhost\n");
    assert!(
        fs::symlink_metadata(l.p("pipe"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let null = fs::symlink_metadata(l.p("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let sda = fs::symlink_metadata(l.p("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), libc::makedev(8, 0));

    // Xattrs.
    assert_eq!(getxattr(&l.p("etc/hosts"), "user.k").unwrap(), b"v\0bin");
    assert_eq!(getxattr(&l.p("etc/hosts"), "trusted.t").unwrap(), b"tv");
    assert_eq!(getxattr(&l.p("etc/hosts"), "user.none"), Err(libc::ENODATA));
    assert_eq!(listxattr(&l.p("etc/hosts")), ["trusted.t", "user.k"]);
    assert!(listxattr(&l.p("empty")).is_empty());

    // Listings, with `.` and `..`.
    assert_eq!(
        readdir_all(&l.path()),
        [".", "..", "dev", "empty", "etc", "lnk", "pipe", "usr"]
    );
    assert_eq!(readdir_all(&l.p("etc")), [".", "..", "hosts", "hosts2"]);
    let dot_dot = fs::metadata(l.p("etc/..")).unwrap();
    assert_eq!(dot_dot.ino(), 1);

    // statfs: read-only, sized by content, files counted.
    let s = statvfs(&l.path());
    assert_eq!(s.f_bsize, 4096);
    assert_eq!(s.f_blocks, (20 + 300_000u64 + 100_000).div_ceil(4096));
    assert_eq!(s.f_bfree, 0);
    assert!(s.f_files >= 12, "files {}", s.f_files);
    assert_ne!(s.f_flag & libc::ST_RDONLY, 0);
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|m| m.contains(l.path().to_str().unwrap()))
        .unwrap();
    assert!(line.starts_with("rstargz "), "{line}");
    assert!(line.contains(" fuse.rstargz ro,"), "{line}");

    // Nothing can be written.
    let e = fs::write(l.p("new"), b"x").unwrap_err();
    assert_eq!(errno(&e), libc::EROFS);
    let e = fs::OpenOptions::new()
        .write(true)
        .open(l.p("etc/hosts"))
        .unwrap_err();
    assert_eq!(errno(&e), libc::EROFS);
    assert_eq!(
        errno(&fs::remove_file(l.p("empty")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        fs::read(l.p("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );

    assert_eq!(l.handle.as_ref().unwrap().mountpoint(), l.path());
}

/// A lower layer (`base`) and an upper layer (`top`) with whiteouts.
fn base_layer() -> Vec<u8> {
    build(&[
        Spec::Dir("a/"),
        Spec::File("a/keep", b"keep v1", 0, false),
        Spec::File("a/gone", b"gone", 0, false),
        Spec::Dir("opq/"),
        Spec::File("opq/old1", b"old1", 0, false),
        Spec::Dir("opq/sub/"),
        Spec::File("opq/sub/old2", b"old2", 0, false),
        Spec::Dir("redo/"),
        Spec::File("redo/old", b"old", 0, false),
        Spec::File("f", b"base f", 0, false),
    ])
}

fn top_layer() -> Vec<u8> {
    build(&[
        Spec::Dir("a/"),
        Spec::File("a/.wh.gone", b"", 0, false),
        Spec::Dir("opq/"),
        Spec::File("opq/.wh..wh..opq", b"", 0, false),
        Spec::File("opq/new", b"new", 0, false),
        // Both `redo` and `.wh.redo`: the real dir wins, made opaque.
        Spec::File(".wh.redo", b"", 0, false),
        Spec::Dir("redo/"),
        Spec::File("redo/fresh", b"fresh", 0, false),
        Spec::File(".wh..wh.plnk", b"", 0, false),
        Spec::File("top", b"top file", 0, false),
    ])
}

#[test]
fn whiteouts_as_overlayfs_reads_them() {
    let l = Layer::mount(top_layer(), NO_DELAY, LayerFsOptions::default());

    let wh = fs::symlink_metadata(l.p("a/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert_eq!(wh.mode() & 0o7777, 0);
    assert_eq!(
        fs::symlink_metadata(l.p("a/.wh.gone")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(readdir_all(&l.p("a")), [".", "..", "gone"]);
    let e = fs::File::open(l.p("a/gone")).unwrap_err();
    assert!(
        matches!(errno(&e), libc::EACCES | libc::ENXIO | libc::EPERM),
        "{e}"
    );

    assert_eq!(
        getxattr(&l.p("opq"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert_eq!(listxattr(&l.p("opq")), ["trusted.overlay.opaque"]);
    assert_eq!(
        getxattr(&l.p("opq"), "user.overlay.opaque"),
        Err(libc::ENODATA)
    );
    assert_eq!(readdir_all(&l.p("opq")), [".", "..", "new"]);
    assert_eq!(
        getxattr(&l.p("redo"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(fs::metadata(l.p("redo")).unwrap().is_dir());
    assert_eq!(
        getxattr(&l.p("a"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );
    assert_eq!(
        readdir_all(&l.path()),
        [".", "..", "a", "opq", "redo", "top"]
    );
}

#[test]
fn user_opaque_xattr_when_asked() {
    let opts = LayerFsOptions {
        opaque_xattr: rstargz::fs::fuse::OpaqueXattr::Both,
        ..LayerFsOptions::default()
    };
    let l = Layer::mount(top_layer(), NO_DELAY, opts);
    assert_eq!(getxattr(&l.p("opq"), "user.overlay.opaque").unwrap(), b"y");
    assert_eq!(
        listxattr(&l.p("opq")),
        ["trusted.overlay.opaque", "user.overlay.opaque"]
    );
}

#[test]
fn overlayfs_stacks_on_two_layers() {
    let base = Layer::mount(base_layer(), NO_DELAY, LayerFsOptions::default());
    let top = Layer::mount(top_layer(), NO_DELAY, LayerFsOptions::default());
    let ov = Overlay::mount(&[top.path(), base.path()]);

    // Whiteouts hide lower files; the rest of the lower dir shows through.
    assert_eq!(fs::read(ov.merged("a/keep")).unwrap(), b"keep v1");
    assert_eq!(
        fs::metadata(ov.merged("a/gone")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let mut names: Vec<_> = fs::read_dir(ov.merged("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["keep"]);

    // Opaque dirs hide all lower content.
    let mut names: Vec<_> = fs::read_dir(ov.merged("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new"]);
    assert!(!ov.merged("opq/sub/old2").exists());
    let redo: Vec<_> = fs::read_dir(ov.merged("redo"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(redo, ["fresh"]);

    // Both layers readable, names merged, no whiteout names leak.
    assert_eq!(fs::read(ov.merged("f")).unwrap(), b"base f");
    assert_eq!(fs::read(ov.merged("top")).unwrap(), b"top file");
    let mut root: Vec<_> = fs::read_dir(ov.merged(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    root.sort();
    assert_eq!(root, ["a", "f", "opq", "redo", "top"]);

    // Writes go to the upper dir; the FUSE layers are untouched.
    fs::write(ov.merged("a/keep"), b"keep v2").unwrap();
    fs::write(ov.merged("brand-new"), b"hello").unwrap();
    fs::remove_file(ov.merged("f")).unwrap();
    assert_eq!(fs::read(ov.merged("a/keep")).unwrap(), b"keep v2");
    assert_eq!(fs::read(ov.upper("a/keep")).unwrap(), b"keep v2");
    assert_eq!(fs::read(ov.upper("brand-new")).unwrap(), b"hello");
    assert!(
        fs::symlink_metadata(ov.upper("f"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(fs::read(base.p("a/keep")).unwrap(), b"keep v1");
    assert_eq!(fs::read(base.p("f")).unwrap(), b"base f");

    // Unmounting a layer overlayfs still holds detaches it lazily.
    let mut base = base;
    let h = base.handle.take().unwrap();
    assert_eq!(h.unmount().unwrap(), Unmounted::Lazy);
    assert_eq!(fs::read(ov.merged("a/keep")).unwrap(), b"keep v2");
    drop(ov);
}

#[test]
fn verification_failure_is_eio() {
    let blob = build_with(
        &[
            Spec::File("bad", &pattern(10_000, 1), 4096, false),
            Spec::File("good", b"good", 0, false),
        ],
        |toc| {
            // Corrupt the digest of bad's second chunk (its first `chunk`
            // entry) only.
            let c = toc
                .entries
                .iter_mut()
                .find(|e| e.kind == EntryType::Chunk)
                .unwrap();
            c.chunk_digest = Digest::of(b"something else").to_string();
        },
    );
    let l = Layer::mount(blob, NO_DELAY, LayerFsOptions::default());
    let f = fs::File::open(l.p("bad")).unwrap();
    // The first chunk verifies alone.
    let mut head = vec![0; 100];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, &pattern(10_000, 1)[..100]);
    // Any read touching the bad chunk fails with EIO and returns no data.
    let mut buf = vec![0xaa_u8; 100];
    let e = f.read_at(&mut buf, 5000).unwrap_err();
    assert_eq!(errno(&e), libc::EIO);
    assert!(buf.iter().all(|b| *b == 0xaa));
    let e = fs::read(l.p("bad")).unwrap_err();
    assert_eq!(errno(&e), libc::EIO);
    assert_eq!(fs::read(l.p("good")).unwrap(), b"good");
    assert!(l.stats.errors.load(Ordering::Relaxed) >= 2);
}

#[test]
fn slow_reads_do_not_block_fuse_threads() {
    const READERS: usize = 16;
    const DELAY: Duration = Duration::from_millis(1500);
    let files: Vec<(String, Vec<u8>)> = (0..READERS)
        .map(|i| (format!("f{i:02}"), pattern(1000 + i, i as u8)))
        .collect();
    let specs: Vec<Spec> = files
        .iter()
        .map(|(n, d)| Spec::File(n, d, 0, false))
        .chain([Spec::Dir("d/"), Spec::File("d/other", b"o", 0, false)])
        .collect();
    let l = Layer::mount(build(&specs), DELAY, LayerFsOptions::default());
    let start = Instant::now();
    std::thread::scope(|s| {
        let readers: Vec<_> = files
            .iter()
            .map(|(name, data)| {
                let p = l.p(name);
                s.spawn(move || assert_eq!(&fs::read(p).unwrap(), data))
            })
            .collect();
        // Wait until every reader is parked in the content source: far more
        // than the 4 FUSE threads.
        while l.source.max_inflight.load(Ordering::SeqCst) < READERS {
            assert!(
                start.elapsed() < DELAY,
                "readers did not all reach the source"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        assert_eq!(fs::metadata(l.p("d/other")).unwrap().len(), 1);
        assert_eq!(readdir_all(&l.p("d")), [".", "..", "other"]);
        let meta = t.elapsed();
        assert!(meta < DELAY / 4, "metadata waited {meta:?} behind reads");
        for r in readers {
            r.join().unwrap();
        }
    });
    let total = start.elapsed();
    assert!(total < DELAY * 2, "reads were serialized: {total:?}");
}

#[test]
fn reads_in_flight_are_bounded() {
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), pattern(5000, i as u8)))
        .collect();
    let specs: Vec<Spec> = files
        .iter()
        .map(|(n, d)| Spec::File(n, d, 0, false))
        .collect();
    let opts = LayerFsOptions {
        max_inflight_reads: 2,
        ..LayerFsOptions::default()
    };
    let l = Layer::mount(build(&specs), Duration::from_millis(100), opts);
    std::thread::scope(|s| {
        for (name, data) in &files {
            let p = l.p(name);
            s.spawn(move || assert_eq!(&fs::read(p).unwrap(), data));
        }
    });
    assert_eq!(l.source.max_inflight.load(Ordering::SeqCst), 2);
    assert!(l.stats.waited.load(Ordering::Relaxed) > 0);
    assert_eq!(l.stats.errors.load(Ordering::Relaxed), 0);
    assert!(l.source.reads.load(Ordering::SeqCst) >= files.len());
}

#[test]
fn keep_cache_serves_warm_reads_from_page_cache() {
    let data = pattern(50_000, 3);
    let l = Layer::mount(
        build(&[Spec::File("f", &data, 0, false)]),
        NO_DELAY,
        LayerFsOptions::default(),
    );
    assert_eq!(fs::read(l.p("f")).unwrap(), data);
    let cold = l.source.reads.load(Ordering::SeqCst);
    assert!(cold > 0);
    for _ in 0..3 {
        let mut s = String::new();
        let _ = fs::File::open(l.p("f")).unwrap().read_to_string(&mut s);
        assert_eq!(fs::read(l.p("f")).unwrap(), data);
    }
    assert_eq!(
        l.source.reads.load(Ordering::SeqCst),
        cold,
        "warm reads hit the source"
    );
    assert_eq!(l.stats.bytes.load(Ordering::Relaxed), 50_000);
}

#[test]
fn busy_unmount_is_lazy_and_stale_paths_unmount() {
    let mut l = Layer::mount(
        build(&[Spec::File("f", b"still here", 0, false)]),
        NO_DELAY,
        LayerFsOptions::default(),
    );
    let f = fs::File::open(l.p("f")).unwrap();
    let h = l.handle.take().unwrap();
    assert_eq!(h.unmount().unwrap(), Unmounted::Lazy);
    // The open file keeps working; the path no longer shows the layer.
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"still here");
    assert!(!l.p("f").exists());
    drop(f);

    // The standalone unmount, as used for mounts left by a crash.
    assert_eq!(unmount(l.path()).unwrap(), Unmounted::NotMounted);
    let mut l2 = Layer::mount(
        build(&[Spec::File("g", b"g", 0, false)]),
        NO_DELAY,
        LayerFsOptions::default(),
    );
    assert_eq!(unmount(l2.path()).unwrap(), Unmounted::Clean);
    assert!(!l2.p("g").exists());
    // The handle notices the mount is gone and ends its session.
    let h = l2.handle.take().unwrap();
    assert_eq!(h.unmount().unwrap(), Unmounted::Clean);
}

#[test]
fn large_directory_lists_every_entry() {
    let names: Vec<String> = (0..3000)
        .map(|i| format!("big/entry-with-a-longish-name-{i:05}"))
        .collect();
    let mut specs = vec![Spec::Dir("big/")];
    specs.extend(names.iter().map(|n| Spec::File(n, b"", 0, false)));
    let l = Layer::mount(build(&specs), NO_DELAY, LayerFsOptions::default());
    let listed = readdir_all(&l.p("big"));
    assert_eq!(listed.len(), names.len() + 2);
    assert_eq!(&listed[..2], [".", ".."]);
    for (got, want) in listed[2..].iter().zip(&names) {
        assert_eq!(Some(got.as_str()), want.strip_prefix("big/"));
    }
    // Listed names resolve, with distinct inodes.
    let a = fs::metadata(l.p(&names[0])).unwrap().ino();
    let b = fs::metadata(l.p(&names[2999])).unwrap().ino();
    assert_ne!(a, b);
}

#[test]
fn aborted_connection_is_stale_until_unmounted() {
    let l = Layer::mount(
        build(&[Spec::File("f", b"x", 0, false)]),
        NO_DELAY,
        LayerFsOptions::default(),
    );
    // What a crashed daemon leaves: the connection is gone, the mount not.
    let ctl = FuseCtl::mount();
    let dev = fs::metadata(l.path()).unwrap().dev();
    let abort = ctl
        .dir
        .path()
        .join(libc::minor(dev).to_string())
        .join("abort");
    fs::write(abort, b"1").unwrap();
    let e = fs::metadata(l.p("f")).unwrap_err();
    // Our session thread sees the abort too, ends, and unmounts what it
    // mounted (a crashed daemon would not): if that won the race, the path
    // is an empty, unmounted directory already.
    let gone = errno(&e) == libc::ENOENT && fs::metadata(l.path()).unwrap().dev() != dev;
    if !gone {
        assert_eq!(errno(&e), libc::ENOTCONN, "{e}");
        // Clean, or already done by our exiting session.
        let u = unmount(l.path()).unwrap();
        assert!(
            matches!(u, Unmounted::Clean | Unmounted::NotMounted),
            "{u:?}"
        );
    }
    assert!(fs::metadata(l.path()).unwrap().is_dir());
    assert!(!l.p("f").exists());
    // The guard's own unmount then finds nothing to do.
}

#[test]
fn executables_run_from_the_layer_and_through_overlayfs() {
    // exec maps the file: this goes through mmap and the page cache.
    let tool = fs::read("/bin/true").unwrap();
    let blob = build_with(
        &[
            Spec::Dir("bin/"),
            Spec::File("bin/true", &tool, 64 << 10, false),
        ],
        |toc| entry(toc, "bin/true").mode = 0o755,
    );
    let l = Layer::mount(blob, NO_DELAY, LayerFsOptions::default());
    let ok = std::process::Command::new(l.p("bin/true"))
        .status()
        .unwrap();
    assert!(ok.success());
    let ov = Overlay::mount(&[l.path()]);
    let ok = std::process::Command::new(ov.merged("bin/true"))
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(fs::read(ov.merged("bin/true")).unwrap(), tool);
    drop(ov);
}
