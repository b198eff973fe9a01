//! Arbitrary bytes as a layer (tar, or gzip of a tar) into the eStargz
//! writer: it must never panic, and whatever it accepts must come out as a
//! blob that our reader opens and fully verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstargz::estargz::digest::Digest;
use rstargz::estargz::reader::{BlobReader, ReaderOptions};
use rstargz::estargz::writer::{BuildOptions, build};

fuzz_target!(|data: &[u8]| {
    let opts = BuildOptions {
        chunk_size: 4096,
        level: 1,
        threads: 1,
        ..Default::default()
    };
    let mut out = Vec::new();
    let Ok(result) = build(data, &mut out, &opts) else {
        return;
    };
    let toc = Digest::parse(&result.toc_digest).expect("the writer's TOC digest parses");
    let reader = BlobReader::open(&out[..], &ReaderOptions::default(), Some(&toc))
        .expect("a blob the writer made opens");
    reader.verify_all().expect("a blob the writer made verifies");
});
