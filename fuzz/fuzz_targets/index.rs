//! Structured TOCs (small name alphabet, edge-case numbers, hardlinks,
//! duplicates, chunk entries) into `Index::build`, then the index's
//! invariants: every walked path looks up to its node, each file's chunks
//! tile its size exactly, compressed ranges are non-empty and end by the
//! TOC, and `chunk_for` returns the chunk covering the offset.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rstargz::estargz::Digest;
use rstargz::estargz::reader::{DigestPolicy, Index, NodeKind, ReaderOptions};
use rstargz::estargz::toc::{EntryType, JsonEntry, JsonToc};

const KINDS: [EntryType; 8] = [
    EntryType::Dir,
    EntryType::Reg,
    EntryType::Symlink,
    EntryType::Hardlink,
    EntryType::Char,
    EntryType::Block,
    EntryType::Fifo,
    EntryType::Chunk,
];

fn name(u: &mut Unstructured) -> Result<String> {
    let mut s = String::from(*u.choose(&["", "", "./", "/"])?);
    let n = u.int_in_range(0..=4)?;
    for i in 0..n {
        if i > 0 {
            s.push('/');
        }
        s.push_str(u.choose(&["a", "b", "c", "a", "b", ".", "..", "", "x\0"])?);
    }
    if u.ratio(1, 4)? {
        s.push('/');
    }
    Ok(s)
}

fn num(u: &mut Unstructured) -> Result<i64> {
    Ok(match u.int_in_range(0..=9)? {
        0..=5 => u.int_in_range(0..=64)?,
        6 => -1,
        7 => i64::MAX,
        8 => 1 << 40,
        _ => u.arbitrary()?,
    })
}

fn digest(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => String::new(),
        1 => "sha256:nope".into(),
        _ => Digest::of(&[u.arbitrary::<u8>()?]).to_string(),
    })
}

fn toc(u: &mut Unstructured) -> Result<JsonToc> {
    let n = u.int_in_range(0..=40)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = *u.choose(&KINDS)?;
        let mut e = JsonEntry::new(name(u)?, kind);
        e.size = num(u)?;
        e.offset = num(u)?;
        e.inner_offset = if u.ratio(1, 3)? { num(u)? } else { 0 };
        e.chunk_offset = if u.ratio(1, 2)? { num(u)? } else { 0 };
        e.chunk_size = if u.ratio(1, 2)? { num(u)? } else { 0 };
        e.link_name = name(u)?;
        e.chunk_digest = digest(u)?;
        e.digest = digest(u)?;
        e.mode = num(u)?;
        e.uid = num(u)?;
        e.modtime = (*u.choose(&["", "2019-08-20T10:30:43Z", "bad"])?).into();
        entries.push(e);
    }
    Ok(JsonToc {
        version: 1,
        entries,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(toc) = toc(&mut u) else { return };
    let toc_offset = u.int_in_range(1u64..=200).unwrap_or(100);
    let policy = if u.arbitrary().unwrap_or(false) {
        DigestPolicy::AllowMissing
    } else {
        DigestPolicy::RequireChunkDigests
    };
    let opts = ReaderOptions {
        digest_policy: policy,
        ..Default::default()
    };
    let Ok(ix) = Index::build(&toc, toc_offset, &opts) else {
        return;
    };
    for (path, id) in ix.walk() {
        assert_eq!(ix.lookup(&path), Some(id), "{path:?}");
        let node = ix.node(id).unwrap();
        assert!(node.nlink >= 1);
        if let NodeKind::Reg { size, .. } = node.kind {
            let mut pos = 0;
            for c in ix.chunks_of(id) {
                assert_eq!(c.chunk_offset, pos);
                assert!(c.chunk_size > 0);
                assert!(c.compressed_offset < c.compressed_end);
                assert!(c.compressed_end <= toc_offset);
                assert_eq!(ix.chunk_for(id, c.chunk_offset).as_ref(), Some(&c));
                assert_eq!(ix.chunk_for(id, c.chunk_end() - 1).as_ref(), Some(&c));
                pos = c.chunk_end();
            }
            assert_eq!(pos, size);
            assert!(ix.chunk_for(id, size).is_none());
        }
    }
});
