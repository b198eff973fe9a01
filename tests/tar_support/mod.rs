//! Helpers shared by the writer's integration tests: making input tars and
//! checking blobs independently of the writer's code.
#![allow(dead_code)]

use std::io::{Read, Write};

use rstargz::estargz::footer;
use rstargz::estargz::toc::{EntryType, JsonEntry, JsonToc};
use rstargz::estargz::writer::{self, BuildOptions, BuildResult};
use sha2::{Digest, Sha256};

/// Builds a tar in memory.
pub struct TarMaker {
    b: tar::Builder<Vec<u8>>,
}

impl Default for TarMaker {
    fn default() -> Self {
        Self::new()
    }
}

impl TarMaker {
    pub fn new() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Complete);
        TarMaker { b }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_username("alice").unwrap();
        h.set_groupname("staff").unwrap();
        h
    }

    pub fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.b.append_data(&mut h, name, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.b.append_data(&mut h, name, data).unwrap();
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, name, target).unwrap();
        self
    }

    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, name, target).unwrap();
        self
    }

    pub fn device(mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, name, std::io::empty()).unwrap();
        self
    }

    /// A file preceded by a PAX header with `SCHILY.xattr.*` records.
    pub fn file_with_xattrs(mut self, name: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let recs: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.b
            .append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(name, data)
    }

    /// PAX records applying to the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    /// An entry whose name is written raw, bypassing the crate's checks.
    pub fn raw_file(self, name: &[u8], data: &[u8]) -> Self {
        self.raw_entry(tar::EntryType::Regular, name, data)
    }

    /// Any entry type, raw name, with `data` after the header.
    pub fn raw_entry(mut self, kind: tar::EntryType, name: &[u8], data: &[u8]) -> Self {
        let mut h = Self::header(kind, 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// Deterministic pseudo-random bytes (compressible only a little).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mix in text-like runs so compression has some work to do.
            if i % 7 < 3 { b"abc"[i % 3] } else { x as u8 }
        })
        .collect()
}

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

pub fn build(tar: &[u8], opts: &BuildOptions) -> (Vec<u8>, BuildResult) {
    let mut out = Vec::new();
    let res = writer::build(tar, &mut out, opts).expect("build");
    (out, res)
}

pub fn gunzip_all(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    flate2::read::MultiGzDecoder::new(b)
        .read_to_end(&mut v)
        .unwrap();
    v
}

/// Parses the footer and the TOC member, returning the TOC and its raw JSON.
pub fn read_toc(blob: &[u8]) -> (JsonToc, Vec<u8>) {
    let f = footer::parse(&blob[blob.len() - footer::FOOTER_SIZE..], blob.len() as u64).unwrap();
    let member = &blob[f.toc_offset as usize..blob.len() - footer::FOOTER_SIZE];
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(member)
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let mut entries = ar.entries().unwrap();
    let mut e = entries.next().unwrap().unwrap();
    assert_eq!(e.path().unwrap().to_str().unwrap(), "stargz.index.json");
    let mut json = Vec::new();
    e.read_to_end(&mut json).unwrap();
    drop(e);
    assert!(entries.next().is_none(), "TOC tar has one entry");
    (serde_json::from_slice(&json).unwrap(), json)
}

/// Checks everything a reader relies on; returns the TOC.
pub fn check_blob(blob: &[u8], res: &BuildResult) -> JsonToc {
    let (toc, json) = read_toc(blob);
    assert_eq!(toc.version, 1);
    assert_eq!(sha(&json), res.toc_digest);
    assert_eq!(sha(blob), res.blob_digest);
    assert_eq!(blob.len() as u64, res.compressed_size);
    let plain = gunzip_all(blob);
    assert_eq!(sha(&plain), res.diff_id);
    assert_eq!(plain.len() as u64, res.uncompressed_size);
    assert_eq!(toc.entries.len(), res.entries);
    // The tar stream ends with exactly the end-of-archive after the TOC.
    assert!(plain[plain.len() - 1024..].iter().all(|&b| b == 0));
    check_chunks(blob, &toc);
    toc
}

/// For every payload piece: a gzip member starts at `offset`, and skipping
/// `innerOffset` decompressed bytes yields bytes matching `chunkDigest`;
/// a reg's chunks together match its `digest`.
pub fn check_chunks(blob: &[u8], toc: &JsonToc) {
    let mut reg: Option<(JsonEntry, Sha256, i64)> = None;
    let finish = |r: Option<(JsonEntry, Sha256, i64)>| {
        if let Some((e, h, n)) = r {
            assert_eq!(n, e.size, "chunks of {} cover it", e.name);
            assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), e.digest);
        }
    };
    for e in &toc.entries {
        if e.kind != EntryType::Chunk {
            finish(reg.take());
        }
        let has_payload = e.kind == EntryType::Chunk || (e.kind == EntryType::Reg && e.size > 0);
        if !has_payload {
            assert_eq!(e.offset, 0, "{} has no offset", e.name);
            continue;
        }
        if e.kind == EntryType::Reg {
            assert_eq!(e.chunk_offset, 0);
            reg = Some((e.clone(), Sha256::new(), 0));
        }
        let (r, h, done) = reg.as_mut().expect("chunk follows a reg");
        assert_eq!(e.chunk_offset, *done, "chunks of {} are contiguous", r.name);
        let len = if e.chunk_size == 0 {
            r.size - e.chunk_offset
        } else {
            e.chunk_size
        };
        let off = e.offset as usize;
        assert!(off > 0);
        assert_eq!(&blob[off..off + 2], &[0x1f, 0x8b], "member at offset");
        let mut d = flate2::read::MultiGzDecoder::new(&blob[off..]);
        std::io::copy(
            &mut (&mut d).take(e.inner_offset as u64),
            &mut std::io::sink(),
        )
        .unwrap();
        let mut buf = vec![0u8; len as usize];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(
            sha(&buf),
            e.chunk_digest,
            "chunk of {} at {}",
            r.name,
            e.chunk_offset
        );
        h.update(&buf);
        *done += len;
    }
    finish(reg.take());
}

/// (name, type byte, content) of every entry of the blob's tar stream.
pub fn tar_entries(blob: &[u8]) -> Vec<(String, u8, Vec<u8>)> {
    let plain = gunzip_all(blob);
    let mut ar = tar::Archive::new(&plain[..]);
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let t = e.header().entry_type().as_byte();
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            (name, t, v)
        })
        .collect()
}

pub fn write_file(path: &std::path::Path, data: &[u8]) {
    std::fs::File::create(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}

/// Uncompressed length of every gzip member of `blob`, in order.
pub fn member_sizes(blob: &[u8]) -> Vec<usize> {
    let mut rest = blob;
    let mut sizes = Vec::new();
    while !rest.is_empty() {
        let mut d = flate2::bufread::GzDecoder::new(rest);
        let mut v = Vec::new();
        d.read_to_end(&mut v).unwrap();
        rest = d.into_inner();
        sizes.push(v.len());
    }
    sizes
}
