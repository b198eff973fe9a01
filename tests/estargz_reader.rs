//! Integration tests of the eStargz reader: well-formed blobs of every entry
//! kind, and hostile blobs that must fail with a typed error (never a panic,
//! hang or huge allocation).
//!
//! Blobs are built by a small test-only writer below (the real writer lives
//! elsewhere) so these tests do not depend on it.

mod fixture;

use fixture::*;
use rstargz::estargz::digest::Digest;
use rstargz::estargz::error::Error;
use rstargz::estargz::footer;
use rstargz::estargz::reader::{
    BlobReader, DigestPolicy, Index, NodeKind, ReaderOptions, locate_toc, parse_toc_member,
};
use rstargz::estargz::toc::{EntryType, JsonEntry, JsonToc, Xattr};

fn open(blob: &[u8]) -> Result<BlobReader<&[u8]>, Error> {
    BlobReader::open(blob, &ReaderOptions::default(), None)
}

// ------------------------------------------------------------ well-formed --

#[test]
fn reads_files_dirs_and_metadata() {
    let big = pattern(10_000, 1);
    let blob = build_with(
        &[
            Spec::Dir("etc/"),
            Spec::File("etc/hosts", b"127.0.0.1 localhost\n", 0, false),
            Spec::File("empty", b"", 0, false),
            Spec::File("usr/lib/deep/big.bin", &big, 0, false),
            Spec::Symlink("lnk", "etc/hosts"),
            Spec::Fifo("pipe"),
            Spec::Char("dev/null", 1, 3),
        ],
        |toc| {
            let e = &mut toc.entries[1];
            e.uid = 1000;
            e.gid = 1001;
            e.user_name = "alice".into();
            e.group_name = "staff".into();
            e.modtime = "2019-08-20T10:30:43Z".into();
            e.xattrs.insert("user.k".into(), Xattr(b"v\0bin".to_vec()));
            // A later file with the same uid/gid but no names.
            toc.entries[3].uid = 1000;
            toc.entries[3].gid = 1001;
        },
    );
    let r = open(&blob).unwrap();
    assert_eq!(r.footer_kind(), footer::FooterKind::Estargz);
    assert_eq!(r.read_file("etc/hosts").unwrap(), b"127.0.0.1 localhost\n");
    assert_eq!(r.read_file("/usr/lib/deep/big.bin").unwrap(), big);
    assert_eq!(r.read_file("./empty").unwrap(), b"");
    let ix = r.index();

    let hosts = ix.node(ix.lookup("etc/hosts").unwrap()).unwrap();
    assert_eq!((hosts.uid, hosts.gid), (1000, 1001));
    assert_eq!(&*hosts.user_name, "alice");
    assert_eq!(hosts.mtime, 1_566_297_043);
    assert_eq!(hosts.xattrs["user.k"], b"v\0bin");
    assert_eq!(hosts.mode, 0o644);
    assert_eq!(hosts.st_mode(), 0o100_644);
    assert_eq!(hosts.parent, ix.lookup("etc").unwrap());
    assert_eq!(
        ix.node(ix.lookup("etc").unwrap()).unwrap().parent,
        Index::ROOT
    );

    // Names carried forward per uid/gid.
    let big_node = ix.node(ix.lookup("usr/lib/deep/big.bin").unwrap()).unwrap();
    assert_eq!(&*big_node.user_name, "alice");
    assert_eq!(&*big_node.group_name, "staff");

    // Implicit parents are 0755 directories.
    let usr = ix.node(ix.lookup("usr/lib").unwrap()).unwrap();
    assert!(matches!(usr.kind, NodeKind::Dir { .. }));
    assert_eq!(usr.mode, 0o755);

    let lnk = ix.node(ix.lookup("lnk").unwrap()).unwrap();
    assert_eq!(
        lnk.kind,
        NodeKind::Symlink {
            target: "etc/hosts".into()
        }
    );
    let null = ix.node(ix.lookup("dev/null").unwrap()).unwrap();
    assert_eq!(null.kind, NodeKind::Char { major: 1, minor: 3 });
    assert_eq!(
        ix.node(ix.lookup("pipe").unwrap()).unwrap().kind,
        NodeKind::Fifo
    );

    // Root children sorted, dir nlink = 2 + subdirs.
    let names: Vec<&str> = ix.children(Index::ROOT).iter().map(|(n, _)| &**n).collect();
    assert_eq!(names, ["dev", "empty", "etc", "lnk", "pipe", "usr"]);
    assert_eq!(ix.node(Index::ROOT).unwrap().nlink, 5);

    let rep = r.verify_all().unwrap();
    assert_eq!(rep.files, 3);
    assert_eq!(rep.chunks, 2);
    assert_eq!(rep.bytes, 20 + 10_000);
    assert_eq!(rep.entries, 7);
    assert!(matches!(r.read_file("etc"), Err(Error::NotAFile { .. })));
    assert!(matches!(r.read_file("nope"), Err(Error::NotFound(_))));
}

#[test]
fn chunked_file_lookup_and_decode() {
    let data = pattern(10_000, 7);
    let blob = build(&[
        Spec::File("f", &data, 3000, false),
        Spec::File("g", b"tail", 0, false),
    ]);
    let r = open(&blob).unwrap();
    let ix = r.index();
    let f = ix.lookup("f").unwrap();
    let chunks: Vec<_> = ix.chunks_of(f).collect();
    assert_eq!(chunks.len(), 4);
    assert_eq!(
        chunks
            .iter()
            .map(|c| (c.chunk_offset, c.chunk_size))
            .collect::<Vec<_>>(),
        [(0, 3000), (3000, 3000), (6000, 3000), (9000, 1000)]
    );
    // NextOffset: each chunk ends where the next member starts.
    for w in chunks.windows(2) {
        assert_eq!(w[0].compressed_end, w[1].compressed_offset);
    }
    let g = ix.lookup("g").unwrap();
    let gc = ix.chunk_for(g, 0).unwrap();
    assert_eq!(chunks[3].compressed_end, gc.compressed_offset);
    assert_eq!(gc.compressed_end, ix.toc_offset());

    for off in [0u64, 2999, 3000, 5000, 9999] {
        let c = ix.chunk_for(f, off).unwrap();
        assert!(c.chunk_offset <= off && off < c.chunk_end());
        let bytes = r.read_chunk(&c).unwrap();
        assert_eq!(
            bytes,
            &data[c.chunk_offset as usize..c.chunk_end() as usize]
        );
    }
    assert!(ix.chunk_for(f, 10_000).is_none());
    assert_eq!(ix.all_chunks().count(), 5);
    assert_eq!(r.read_file("f").unwrap(), data);
    assert_eq!(r.verify_all().unwrap().chunks, 5);
}

#[test]
fn inner_offset_shared_member() {
    let a = pattern(700, 1);
    let b = pattern(300, 2);
    let blob = build(&[
        Spec::File("a", &a, 0, false),
        Spec::File("b", &b, 0, true),
        Spec::File("c", b"cc", 0, false),
    ]);
    let r = open(&blob).unwrap();
    let ix = r.index();
    let ca = ix.chunk_for(ix.lookup("a").unwrap(), 0).unwrap();
    let cb = ix.chunk_for(ix.lookup("b").unwrap(), 0).unwrap();
    let cc = ix.chunk_for(ix.lookup("c").unwrap(), 0).unwrap();
    assert_eq!(ca.compressed_offset, cb.compressed_offset);
    assert_eq!(cb.inner_offset, 700 + 324 + 512);
    // Both end where the next payload member starts.
    assert_eq!(ca.compressed_end, cc.compressed_offset);
    assert_eq!(cb.compressed_end, cc.compressed_offset);
    assert_eq!(r.read_file("b").unwrap(), b);
    assert_eq!(r.read_file("a").unwrap(), a);
    r.verify_all().unwrap();
}

#[test]
fn hardlinks_share_a_node() {
    let blob = build(&[
        Spec::File("bin/busybox", b"BB", 0, false),
        Spec::Hardlink("bin/sh", "bin/busybox"),
        Spec::Hardlink("sbin/init", "./bin/sh"),
    ]);
    let r = open(&blob).unwrap();
    let ix = r.index();
    let id = ix.lookup("bin/busybox").unwrap();
    assert_eq!(ix.lookup("bin/sh"), Some(id));
    assert_eq!(ix.lookup("sbin/init"), Some(id));
    assert_eq!(ix.node(id).unwrap().nlink, 3);
    assert_eq!(r.read_file("sbin/init").unwrap(), b"BB");
    assert_eq!(r.verify_all().unwrap().files, 1);
    let walked: Vec<String> = ix.walk().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        walked,
        ["", "bin", "bin/busybox", "bin/sh", "sbin", "sbin/init"]
    );
}

#[test]
fn duplicates_last_wins_and_root_entry() {
    let blob = build_with(
        &[
            Spec::Dir("./"),
            Spec::File("x", b"old", 0, false),
            Spec::File("x", b"new!", 0, false),
        ],
        |toc| toc.entries[0].mode = 0o700,
    );
    let r = open(&blob).unwrap();
    assert_eq!(r.read_file("x").unwrap(), b"new!");
    assert_eq!(r.index().node(Index::ROOT).unwrap().mode, 0o700);
    assert_eq!(r.index().len(), 2);
    r.verify_all().unwrap();
}

#[test]
fn empty_toc_has_a_root() {
    let blob = build(&[]);
    let r = open(&blob).unwrap();
    assert_eq!(r.index().len(), 1);
    assert!(r.index().children(Index::ROOT).is_empty());
    assert_eq!(r.verify_all().unwrap().files, 0);
}

#[test]
fn toc_digest_is_over_raw_bytes_and_checked() {
    let mut w = TestWriter::new();
    w.add(&Spec::File("a", b"A", 0, false));
    let toc = JsonToc {
        version: 1,
        entries: std::mem::take(&mut w.entries),
    };
    // Odd but valid formatting: the digest must cover exactly these bytes.
    let json = format!("  {}\n\n", serde_json::to_string(&toc).unwrap()).into_bytes();
    let blob = w.finish_with_json(&json, false);
    let want = Digest::of(&json);
    let r = BlobReader::open(&blob[..], &ReaderOptions::default(), Some(&want)).unwrap();
    assert_eq!(*r.toc_digest(), want);
    assert!(r.index().toc_verified);
    assert!(!open(&blob).unwrap().index().toc_verified);
    let other = Digest::of(b"other");
    assert!(matches!(
        BlobReader::open(&blob[..], &ReaderOptions::default(), Some(&other)),
        Err(Error::TocDigestMismatch { .. })
    ));
}

#[test]
fn small_tail_needs_second_read() {
    let blob = build(&[Spec::File("a", &pattern(5000, 3), 0, false)]);
    let opts = ReaderOptions {
        tail_size: 64,
        ..Default::default()
    };
    let tail = &blob[blob.len() - 64..];
    let loc = locate_toc(tail, blob.len() as u64, &opts).unwrap();
    assert!(loc.member_in_tail(tail).is_none());
    let member = &blob[loc.member.start as usize..loc.member.end as usize];
    let raw = parse_toc_member(member, &opts, None).unwrap();
    assert_eq!(raw.toc.entries.len(), 1);
    let r = BlobReader::open(&blob[..], &opts, None).unwrap();
    r.verify_all().unwrap();
}

#[test]
fn legacy_footer_and_no_chunk_digests() {
    let mut w = TestWriter::new();
    w.add(&Spec::File("a", b"legacy content", 0, false));
    let mut toc = JsonToc {
        version: 1,
        entries: std::mem::take(&mut w.entries),
    };
    toc.entries[0].chunk_digest.clear();
    let json = serde_json::to_vec(&toc).unwrap();
    let blob = w.finish_with_json(&json, true);
    // Refused unless the caller opts in.
    assert!(matches!(open(&blob), Err(Error::Unverifiable { .. })));
    let opts = ReaderOptions {
        digest_policy: DigestPolicy::AllowMissing,
        ..Default::default()
    };
    let r = BlobReader::open(&blob[..], &opts, None).unwrap();
    assert_eq!(r.footer_kind(), footer::FooterKind::Legacy);
    assert_eq!(r.read_file("a").unwrap(), b"legacy content");
    let rep = r.verify_all().unwrap();
    assert_eq!(rep.unverified_chunks, 1);

    // The whole-file digest is still checked.
    let mut w = TestWriter::new();
    w.add(&Spec::File("a", b"legacy content", 0, false));
    let mut toc = JsonToc {
        version: 1,
        entries: std::mem::take(&mut w.entries),
    };
    toc.entries[0].chunk_digest.clear();
    toc.entries[0].digest = Digest::of(b"something else").to_string();
    let blob = w.finish_with_json(&serde_json::to_vec(&toc).unwrap(), true);
    let r = BlobReader::open(&blob[..], &opts, None).unwrap();
    assert!(
        matches!(r.verify_all(), Err(Error::FileDigestMismatch { ref name, .. }) if name == "a")
    );
}

#[test]
fn file_with_a_terabyte_claimed_size_is_metadata_only() {
    // An entry claiming 4 TiB with one chunk: fine to index, and reading it
    // fails once the real data ends, without allocating the claimed size.
    let blob = build_with(&[Spec::File("huge", b"small", 0, false)], |toc| {
        toc.entries[0].size = 4 << 40;
    });
    let r = open(&blob).unwrap();
    let id = r.index().lookup("huge").unwrap();
    assert_eq!(r.index().node(id).unwrap().size(), 4 << 40);
    let c = r.index().chunk_for(id, (4 << 40) - 1).unwrap();
    assert_eq!(c.chunk_size, 4 << 40);
    assert!(matches!(r.read_chunk(&c), Err(Error::BadChunk { .. })));
    assert!(matches!(r.verify_all(), Err(Error::BadChunk { .. })));
}

// ---------------------------------------------------------------- hostile --

fn sample() -> Vec<u8> {
    build(&[
        Spec::Dir("d/"),
        Spec::File("d/f", &pattern(3000, 9), 1000, false),
        Spec::Symlink("s", "d/f"),
    ])
}

#[test]
fn truncated_blobs_at_every_cut_fail_cleanly() {
    let blob = sample();
    for cut in 0..blob.len() {
        let r = open(&blob[..cut]);
        assert!(r.is_err(), "cut at {cut} parsed");
    }
    // Cutting bytes from the front keeps the footer but shifts offsets.
    for cut in (1..blob.len()).step_by(7) {
        if let Ok(r) = open(&blob[cut..]) {
            let _ = r.verify_all();
        }
    }
}

#[test]
fn every_single_byte_flip_is_an_error_or_harmless() {
    let blob = sample();
    for i in 0..blob.len() {
        let mut b = blob.clone();
        b[i] ^= 0x55;
        if let Ok(r) = open(&b) {
            // Data bytes: a corrupted chunk is a typed error, never a panic.
            match r.verify_all() {
                Ok(_)
                | Err(Error::BadChunk { .. })
                | Err(Error::ChunkDigestMismatch { .. })
                | Err(Error::FileDigestMismatch { .. }) => {}
                Err(e) => panic!("flip at {i}: unexpected {e:?}"),
            }
        }
    }
}

#[test]
fn corrupted_chunk_data_is_detected() {
    let blob = sample();
    let r = open(&blob).unwrap();
    let c = r
        .index()
        .chunk_for(r.index().lookup("d/f").unwrap(), 1500)
        .unwrap();
    let mid = (c.compressed_offset + c.compressed_len() / 2) as usize;
    let mut b = blob.clone();
    b[mid] ^= 0x01;
    let r = open(&b).unwrap();
    let err = r.verify_all().unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadChunk { .. } | Error::ChunkDigestMismatch { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("d/f"));
}

#[test]
fn chunk_digest_mismatch_names_the_chunk() {
    let blob = build_with(&[Spec::File("f", &pattern(3000, 1), 1000, false)], |toc| {
        toc.entries[1].chunk_digest = Digest::of(b"nope").to_string();
    });
    let r = open(&blob).unwrap();
    match r.verify_all() {
        Err(Error::ChunkDigestMismatch { name, offset, .. }) => {
            assert_eq!((name.as_str(), offset), ("f", 1000));
        }
        other => panic!("{other:?}"),
    }
    // Chunk 0 still reads fine.
    let c = r
        .index()
        .chunk_for(r.index().lookup("f").unwrap(), 0)
        .unwrap();
    r.read_chunk(&c).unwrap();
}

#[test]
fn wrong_footers() {
    let blob = sample();
    let n = blob.len();
    for (at, val) in [
        (n - 51, 0u8),
        (n - 51 + 12, b'X'),
        (n - 51 + 20, b'z'),
        (n - 51 + 35, b'x'),
        (n - 1, 1),
    ] {
        let mut b = blob.clone();
        b[at] = val;
        assert!(
            matches!(open(&b), Err(Error::InvalidFooter(_))),
            "byte {at} = {val}"
        );
    }
    assert!(matches!(open(&[]), Err(Error::TooSmall { .. })));
    assert!(matches!(open(&[0u8; 40]), Err(Error::TooSmall { .. })));
}

#[test]
fn toc_offset_past_end() {
    let mut blob = sample();
    let n = blob.len();
    blob.truncate(n - 51);
    blob.extend_from_slice(&footer::build(n as u64 * 10));
    assert!(matches!(
        open(&blob),
        Err(Error::TocOffsetOutOfRange { .. })
    ));
    blob.truncate(n - 51);
    blob.extend_from_slice(&footer::build(u64::MAX));
    assert!(matches!(
        open(&blob),
        Err(Error::TocOffsetOutOfRange { .. })
    ));
}

/// A blob whose TOC member is `member` (whatever it is) after one file.
fn with_member(member: &[u8]) -> Vec<u8> {
    let mut w = TestWriter::new();
    w.add(&Spec::File("a", b"A", 0, false));
    w.new_member();
    let off = w.out.len() as u64;
    let mut out = w.out;
    out.extend_from_slice(member);
    out.extend_from_slice(&footer::build(off));
    out
}

fn valid_json() -> Vec<u8> {
    br#"{"version":1,"entries":[]}"#.to_vec()
}

#[test]
fn toc_member_not_gzip_not_tar_wrong_name_truncated() {
    let json = valid_json();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not gzip", b"plain text, not gzip at all".to_vec()),
        ("not tar", gzip(b"this is not a tar stream")),
        ("raw json", gzip(&json)),
        ("wrong name", toc_member("other.json", &json)),
        ("truncated", {
            let m = toc_member(TOC_NAME, &json);
            m[..m.len() / 2].to_vec()
        }),
        ("truncated tar", gzip(&toc_tar(TOC_NAME, &json)[..600])),
        ("two entries", {
            let mut t = toc_tar(TOC_NAME, &json);
            t.truncate(t.len() - 1024);
            t.extend_from_slice(&toc_tar("extra", b"x"));
            gzip(&t)
        }),
        ("directory", {
            let mut h = tar::Header::new_ustar();
            h.set_path(TOC_NAME).unwrap();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_cksum();
            let mut t = h.as_bytes().to_vec();
            t.extend_from_slice(&[0; 1024]);
            gzip(&t)
        }),
        ("empty", Vec::new()),
    ];
    for (what, member) in cases {
        let blob = with_member(&member);
        match open(&blob) {
            Err(Error::InvalidToc(_))
            | Err(Error::Io(_))
            | Err(Error::TocOffsetOutOfRange { .. }) => {}
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
    assert!(open(&with_member(&toc_member(TOC_NAME, &json))).is_ok());
}

#[test]
fn toc_gzip_bomb_is_bounded() {
    // 64 MiB of spaces inside a valid JSON document compresses to ~64 KiB.
    let mut json = b"{\"version\":1,\"entries\":[]".to_vec();
    json.resize(json.len() + (64 << 20), b' ');
    json.push(b'}');
    let blob = with_member(&toc_member(TOC_NAME, &json));
    let opts = ReaderOptions {
        max_toc_size: 1 << 20,
        ..Default::default()
    };
    assert!(matches!(
        BlobReader::open(&blob[..], &opts, None),
        Err(Error::TocTooLarge { .. })
    ));
    // A tar header claiming a huge size, with a small real stream.
    let mut t = toc_tar(TOC_NAME, b"{}");
    let mut h = tar::Header::new_ustar();
    h.set_path(TOC_NAME).unwrap();
    h.set_size(1 << 40);
    h.set_cksum();
    t[..512].copy_from_slice(h.as_bytes());
    let blob = with_member(&gzip(&t));
    assert!(matches!(open(&blob), Err(Error::TocTooLarge { .. })));
    // Stream bigger than the limit with no valid tar at all (zeros).
    let blob = with_member(&gzip(&vec![1u8; 2 << 20]));
    assert!(matches!(
        BlobReader::open(&blob[..], &opts, None),
        Err(Error::TocTooLarge { .. }) | Err(Error::InvalidToc(_))
    ));
}

#[test]
fn chunk_bomb_stops_at_declared_size() {
    // Members that inflate to 1 GiB; the TOC declares 10 bytes.
    let mut w = TestWriter::new();
    w.header("bomb", tar::EntryType::Regular, 10, "");
    w.new_member();
    let off = w.member_start;
    let one = gzip(&vec![0u8; 4 << 20]);
    for _ in 0..256 {
        w.out.extend_from_slice(&one);
    }
    w.member_start = w.out.len() as u64;
    let mut e = JsonEntry::new("bomb", EntryType::Reg);
    e.size = 10;
    e.offset = off as i64;
    e.chunk_digest = Digest::of(&[0u8; 10]).to_string();
    e.digest = e.chunk_digest.clone();
    let mut e2 = e.clone();
    e2.name = "bomb2".into();
    e2.inner_offset = 10;
    let toc = JsonToc {
        version: 1,
        entries: vec![e, e2],
    };
    let json = serde_json::to_vec(&toc).unwrap();
    let blob = w.finish_with_json(&json, false);
    let r = open(&blob).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(r.read_file("bomb").unwrap(), [0u8; 10]);
    assert_eq!(r.read_file("bomb2").unwrap(), [0u8; 10]);
    // Inflating the whole 256 MiB would take far longer in a debug build.
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

/// Builds a two-file blob, applies `edit` to the TOC and opens it.
fn open_edited(edit: impl FnOnce(&mut JsonToc)) -> Result<(), Error> {
    let blob = build_with(
        &[
            Spec::File("a", &pattern(2000, 1), 1000, false),
            Spec::File("b", b"bbb", 0, false),
        ],
        edit,
    );
    open(&blob).map(|_| ())
}

fn is_invalid_entry(r: Result<(), Error>) -> bool {
    matches!(r, Err(Error::InvalidEntry { .. }))
}

#[test]
fn bad_chunk_offsets_and_sizes() {
    // Overlapping: the second chunk points into the first's member.
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries[1].offset = t.entries[0].offset;
    })));
    // Out of range: at or past the TOC.
    assert!(is_invalid_entry(open_edited(
        |t| t.entries[2].offset = 1 << 40
    )));
    assert!(is_invalid_entry(open_edited(|t| t.entries[2].offset = 0)));
    // Out of order.
    assert!(is_invalid_entry(open_edited(|t| {
        let o = t.entries[0].offset;
        t.entries[2].offset = o;
    })));
    // Gap and overlap in chunkOffset; chunks not covering the size.
    assert!(is_invalid_entry(open_edited(
        |t| t.entries[1].chunk_offset = 1001
    )));
    assert!(is_invalid_entry(open_edited(
        |t| t.entries[1].chunk_offset = 999
    )));
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries[0].size = 2500;
        t.entries[1].chunk_size = 1000;
    })));
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries[0].size = 1500;
        t.entries[1].chunk_size = 1000;
    })));
    assert!(is_invalid_entry(open_edited(
        |t| t.entries[1].chunk_offset = 3000
    )));
    // Overflowing sums.
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries[0].chunk_size = i64::MAX;
        t.entries[0].size = i64::MAX;
    })));
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries[2].inner_offset = i64::MAX;
    })));
    // Chunk entries in the wrong place.
    assert!(is_invalid_entry(open_edited(|t| {
        let c = t.entries.remove(1);
        t.entries.insert(0, c);
    })));
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries.insert(0, JsonEntry::new("d/", EntryType::Dir));
        let c = t.entries.remove(2);
        t.entries.insert(1, c);
    })));
}

#[test]
fn negative_numbers_rejected() {
    for field in 0..9 {
        let r = open_edited(|t| {
            let e = &mut t.entries[match field {
                0..6 => 0,
                6 | 7 => 1,
                _ => 2,
            }];
            match field {
                0 => e.size = -1,
                1 => e.mode = -1,
                2 => e.uid = -5,
                3 => e.gid = -5,
                4 => e.offset = -100,
                5 => e.inner_offset = -1,
                6 => e.chunk_offset = -1000,
                7 => e.chunk_size = -1,
                _ => e.dev_major = -1,
            }
        });
        assert!(is_invalid_entry(r), "field {field}");
    }
    assert!(is_invalid_entry(
        open_edited(|t| t.entries[0].uid = 1 << 40)
    ));
}

#[test]
fn hostile_names() {
    for name in [
        "../etc/passwd",
        "a/../../b",
        "/etc/passwd",
        "a\0b",
        "a//b",
        "",
        "..",
        &"x/".repeat(3000),
    ] {
        let r = open_edited(|t| t.entries[2].name = name.to_string());
        assert!(
            matches!(r, Err(Error::InvalidName { .. })),
            "{name:?}: {r:?}"
        );
    }
    // A file in the way of a directory.
    assert!(is_invalid_entry(open_edited(|t| {
        let mut e = JsonEntry::new("b/c", EntryType::Fifo);
        e.mode = 0o600;
        t.entries.push(e);
    })));
    // An xattr name with a NUL.
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries[2]
            .xattrs
            .insert("user.a\0b".into(), Xattr(b"v".to_vec()));
    })));
    // A symlink with an empty target.
    assert!(is_invalid_entry(open_edited(|t| {
        t.entries.push(JsonEntry::new("l", EntryType::Symlink));
    })));
    // Deep but legal path: thousands of implicit dirs, no recursion.
    let deep = "d/".repeat(2000) + "f";
    let blob = build(&[Spec::Fifo(&deep)]);
    assert_eq!(open(&blob).unwrap().index().len(), 2002);
}

/// Xattrs beyond what Linux can store (name over 255 bytes, value over
/// 64 KiB, names over 64 KiB in all) make the entry invalid; up to the
/// limits they are kept.
#[test]
fn huge_xattrs() {
    let with = |xs: Vec<(String, usize)>| {
        open_edited(move |t| {
            let mut e = JsonEntry::new("f", EntryType::Fifo);
            for (k, len) in xs {
                e.xattrs.insert(k, Xattr(vec![b'x'; len]));
            }
            t.entries.push(e);
        })
    };
    assert!(with(vec![("user.big".into(), 64 * 1024)]).is_ok());
    assert!(with(vec![("user.".to_string() + &"n".repeat(250), 1)]).is_ok());
    assert!(is_invalid_entry(with(vec![(
        "user.big".into(),
        64 * 1024 + 1
    )])));
    assert!(is_invalid_entry(with(vec![(
        "user.".to_string() + &"n".repeat(251),
        1
    )])));
    let many = (0..300)
        .map(|i| (format!("user.{i:03}{}", "n".repeat(240)), 0))
        .collect();
    assert!(is_invalid_entry(with(many)));
    // A 16 MiB value: refused, and the TOC it came in was bounded anyway.
    assert!(is_invalid_entry(with(vec![("user.huge".into(), 16 << 20)])));
}

#[test]
fn bad_hardlinks() {
    let cases: [(&str, &str); 4] = [("h", "missing"), ("h", "d"), ("h", "../a"), ("h", "h")];
    for (name, target) in cases {
        let r = open_edited(|t| {
            t.entries.push(JsonEntry::new("d/", EntryType::Dir));
            let mut e = JsonEntry::new(name, EntryType::Hardlink);
            e.link_name = target.into();
            t.entries.push(e);
        });
        assert!(
            matches!(r, Err(Error::BrokenHardlink { .. })),
            "{target}: {r:?}"
        );
    }
    // A cycle of two hardlinks.
    let r = open_edited(|t| {
        for (n, l) in [("x", "y"), ("y", "x")] {
            let mut e = JsonEntry::new(n, EntryType::Hardlink);
            e.link_name = l.into();
            t.entries.push(e);
        }
    });
    assert!(matches!(r, Err(Error::BrokenHardlink { .. })), "{r:?}");
}

#[test]
fn bad_versions_digests_and_json() {
    for v in [0, 2, -1] {
        assert!(matches!(
            open_edited(|t| t.version = v),
            Err(Error::UnsupportedVersion(x)) if x == v
        ));
    }
    assert!(matches!(
        open_edited(|t| t.entries[0].chunk_digest = "sha256:xyz".into()),
        Err(Error::InvalidDigest(_))
    ));
    assert!(matches!(
        open_edited(|t| t.entries[2].digest = "md5:00".into()),
        Err(Error::InvalidDigest(_))
    ));
    assert!(matches!(
        open_edited(|t| t.entries[0].chunk_digest.clear()),
        Err(Error::Unverifiable { .. })
    ));
    assert!(is_invalid_entry(open_edited(
        |t| t.entries[2].modtime = "yesterday".into()
    )));
    for json in [
        &b"not json"[..],
        b"{\"version\":1,\"entries\":[{\"type\":\"socket\",\"name\":\"x\"}]}",
        b"[]",
        b"{\"version\":1,\"entries\":[{\"name\":\"a\",\"type\":\"reg\",\"size\":1e99}]}",
    ] {
        let blob = with_member(&toc_member(TOC_NAME, json));
        assert!(matches!(open(&blob), Err(Error::InvalidToc(_))));
    }
}

#[test]
fn too_many_entries() {
    let blob = build(&[Spec::Fifo("a"), Spec::Fifo("b"), Spec::Fifo("c")]);
    let opts = ReaderOptions {
        max_entries: 2,
        ..Default::default()
    };
    assert!(matches!(
        BlobReader::open(&blob[..], &opts, None),
        Err(Error::TooManyEntries { limit: 2 })
    ));
}

/// Writes seed inputs for the fuzz targets when `RSTARGZ_FUZZ_SEEDS` names
/// a directory (see `fuzz/README.md`). A tool, not a test: run it with
/// `--ignored`.
#[test]
#[ignore = "generates fuzz seeds when RSTARGZ_FUZZ_SEEDS is set"]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("RSTARGZ_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    for sub in ["footer", "toc", "tar"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    // Layers for the writer: a small tar with every common entry type, and
    // its gzip.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "d/", &[][..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(5000);
    b.append_data(&mut h, "d/f", &pattern(5000, 3)[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "d/l", "f").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "d/h", "d/f").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    b.append_data(&mut h, "d/.wh.gone", &[][..]).unwrap();
    let layer = b.into_inner().unwrap();
    std::fs::write(dir.join("tar/layer.tar"), &layer).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &layer).unwrap();
    std::fs::write(dir.join("tar/layer.tar.gz"), gz.finish().unwrap()).unwrap();
    let blobs = [
        sample(),
        build(&[
            Spec::File("a", &pattern(700, 1), 0, false),
            Spec::File("b", &pattern(300, 2), 100, true),
            Spec::Hardlink("c", "a"),
            Spec::Char("dev/x", 1, 2),
        ]),
        build(&[]),
    ];
    for (i, blob) in blobs.iter().enumerate() {
        std::fs::write(dir.join(format!("footer/seed{i}")), blob).unwrap();
        let r = open(blob).unwrap();
        let loc = locate_toc(blob, blob.len() as u64, &ReaderOptions::default()).unwrap();
        let member = &blob[loc.member.start as usize..loc.member.end as usize];
        std::fs::write(dir.join(format!("toc/member{i}")), member).unwrap();
        let json = rstargz::estargz::reader::toc_member::extract_json(member, 1 << 20).unwrap();
        std::fs::write(dir.join(format!("toc/json{i}")), json).unwrap();
        drop(r);
    }
}

#[test]
fn toc_member_crc_is_checked() {
    let json = valid_json();
    let mut member = toc_member(TOC_NAME, &json);
    let n = member.len();
    member[n - 8] ^= 1; // CRC32 in the gzip trailer
    assert!(matches!(
        open(&with_member(&member)),
        Err(Error::InvalidToc(_))
    ));
    let mut member = toc_member(TOC_NAME, &json);
    member[n - 1] ^= 1; // ISIZE
    assert!(matches!(
        open(&with_member(&member)),
        Err(Error::InvalidToc(_))
    ));
}

/// Scale check: a TOC with a million entries (5000 directories of 200
/// files each) is within the limits and its index builds; prints the time
/// and the peak memory. Run with
/// `cargo test --release --test estargz_reader -- --ignored million --nocapture`.
#[test]
#[ignore = "scale check, run in release"]
fn million_entry_toc_builds() {
    let hwm = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
            .unwrap()
    };
    let mut entries = Vec::new();
    for d in 0..5000 {
        for f in 0..200 {
            let mut e = JsonEntry::new(format!("dir{d}/sub/file{f}"), EntryType::Reg);
            e.size = 1;
            e.offset = 1 + (d * 200 + f) as i64;
            e.chunk_digest = Digest::of(b"x").to_string();
            entries.push(e);
        }
    }
    let toc = JsonToc {
        version: 1,
        entries,
    };
    let json = serde_json::to_vec(&toc).unwrap();
    eprintln!(
        "TOC JSON {} MB; peak RSS so far {}",
        json.len() >> 20,
        hwm()
    );
    drop(toc);
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
            .unwrap()
    };
    eprintln!("RSS with the JSON: {}", rss());
    let start = std::time::Instant::now();
    let parsed: JsonToc = serde_json::from_slice(&json).unwrap();
    drop(json);
    eprintln!("parsed in {:?}; RSS {}", start.elapsed(), rss());
    let ix = Index::build(&parsed, 1 << 30, &ReaderOptions::default()).unwrap();
    drop(parsed);
    eprintln!(
        "{} nodes parsed and indexed in {:?}; RSS with the index alone {}; peak {}",
        ix.len(),
        start.elapsed(),
        rss(),
        hwm()
    );
    assert_eq!(ix.len(), 1 + 10_000 + 1_000_000);
    assert_eq!(ix.all_chunks().count(), 1_000_000);
}
