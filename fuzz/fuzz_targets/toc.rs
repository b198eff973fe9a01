//! Arbitrary bytes as TOC JSON, then as a gzip TOC member: parsing and
//! building the index, then every lookup, must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstargz::estargz::reader::toc_member::{extract_json, parse_json};
use rstargz::estargz::reader::{DigestPolicy, Index, ReaderOptions};

fuzz_target!(|data: &[u8]| {
    let _ = extract_json(data, 1 << 20);
    let Ok(toc) = parse_json(data) else { return };
    for policy in [DigestPolicy::RequireChunkDigests, DigestPolicy::AllowMissing] {
        let opts = ReaderOptions {
            max_entries: 10_000,
            digest_policy: policy,
            ..Default::default()
        };
        for toc_offset in [1u64 << 20, u64::MAX] {
            let Ok(index) = Index::build(&toc, toc_offset, &opts) else {
                continue;
            };
            for (path, id) in index.walk() {
                assert_eq!(index.lookup(&path), Some(id));
                let node = index.node(id).unwrap();
                for off in [0, 1, node.size() / 2, node.size().saturating_sub(1), node.size()] {
                    if let Some(c) = index.chunk_for(id, off) {
                        assert!(c.chunk_offset <= off && off < c.chunk_end());
                        assert!(c.compressed_offset < c.compressed_end);
                    }
                }
            }
            let mut covered = 0u64;
            for c in index.all_chunks() {
                covered = covered.saturating_add(c.chunk_size);
            }
            let _ = covered;
        }
    }
});
