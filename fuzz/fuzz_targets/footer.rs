//! Arbitrary bytes as a whole blob: footer, TOC member, index, and (if all
//! of that parses) decoding and verifying every chunk. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstargz::estargz::footer;
use rstargz::estargz::reader::{BlobReader, DigestPolicy, ReaderOptions};

fuzz_target!(|data: &[u8]| {
    let _ = footer::parse(data, data.len() as u64);
    for policy in [DigestPolicy::RequireChunkDigests, DigestPolicy::AllowMissing] {
        let opts = ReaderOptions {
            max_toc_size: 1 << 20,
            max_entries: 10_000,
            tail_size: 4096,
            digest_policy: policy,
        };
        if let Ok(r) = BlobReader::open(data, &opts, None) {
            let _ = r.verify_all();
            for (path, _) in r.index().walk() {
                let _ = r.read_file(&path);
            }
        }
    }
});
