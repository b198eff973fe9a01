//! A minimal eStargz writer for tests, independent of the real writer:
//! tar headers go into the open gzip member, each payload piece starts a new
//! member (unless asked to share), then the TOC member and the footer.
#![allow(dead_code)]

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use rstargz::estargz::digest::Digest;
use rstargz::estargz::footer;
use rstargz::estargz::toc::{EntryType, JsonEntry, JsonToc};

/// One input entry for the test writer.
pub enum Spec<'a> {
    Dir(&'a str),
    /// name, content, chunk size (0 = one chunk), share the open member.
    File(&'a str, &'a [u8], usize, bool),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Fifo(&'a str),
    Char(&'a str, i64, i64),
}

/// A minimal eStargz writer: tar headers in the open member, each payload
/// piece in a new member (unless shared), TOC member, footer.
pub struct TestWriter {
    pub out: Vec<u8>,
    gz: GzEncoder<Vec<u8>>,
    pub member_start: u64,
    /// Uncompressed bytes written to the open member.
    pub member_len: u64,
    pub entries: Vec<JsonEntry>,
}

impl TestWriter {
    pub fn new() -> Self {
        TestWriter {
            out: Vec::new(),
            gz: GzEncoder::new(Vec::new(), Compression::default()),
            member_start: 0,
            member_len: 0,
            entries: Vec::new(),
        }
    }

    pub fn write(&mut self, b: &[u8]) {
        self.gz.write_all(b).unwrap();
        self.member_len += b.len() as u64;
    }

    pub fn new_member(&mut self) {
        let gz = std::mem::replace(
            &mut self.gz,
            GzEncoder::new(Vec::new(), Compression::default()),
        );
        let bytes = gz.finish().unwrap();
        self.out.extend_from_slice(&bytes);
        self.member_start = self.out.len() as u64;
        self.member_len = 0;
    }

    pub fn header(&mut self, name: &str, kind: tar::EntryType, size: u64, link: &str) {
        let mut h = tar::Header::new_ustar();
        // Names too long for ustar only matter to the TOC in these tests.
        if h.set_path(name).is_err() {
            h.set_path("long-name").unwrap();
        }
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        self.write(h.as_bytes());
    }

    pub fn add(&mut self, spec: &Spec) {
        match *spec {
            Spec::Dir(name) => {
                self.header(name, tar::EntryType::Directory, 0, "");
                let mut e = JsonEntry::new(name, EntryType::Dir);
                e.mode = 0o755;
                self.entries.push(e);
            }
            Spec::File(name, data, chunk, share) => {
                self.header(name, tar::EntryType::Regular, data.len() as u64, "");
                let mut e = JsonEntry::new(name, EntryType::Reg);
                e.size = data.len() as i64;
                e.mode = 0o644;
                e.digest = Digest::of(data).to_string();
                if data.is_empty() {
                    self.entries.push(e);
                    return;
                }
                let chunk = if chunk == 0 { data.len() } else { chunk };
                for (i, piece) in data.chunks(chunk).enumerate() {
                    let mut c = if i == 0 {
                        std::mem::replace(&mut e, JsonEntry::new("", EntryType::Chunk))
                    } else {
                        JsonEntry::new("", EntryType::Chunk)
                    };
                    if !(share && self.member_len > 0) {
                        self.new_member();
                    }
                    c.offset = self.member_start as i64;
                    c.inner_offset = self.member_len as i64;
                    c.chunk_offset = (i * chunk) as i64;
                    if piece.len() == chunk && data.len() > chunk {
                        c.chunk_size = chunk as i64;
                    }
                    // Last chunk: chunkSize left 0, as the format writes it.
                    if (i + 1) * chunk >= data.len() {
                        c.chunk_size = 0;
                    }
                    c.chunk_digest = Digest::of(piece).to_string();
                    self.write(piece);
                    self.entries.push(c);
                }
                let pad = (512 - data.len() % 512) % 512;
                self.write(&vec![0; pad]);
            }
            Spec::Symlink(name, target) => {
                self.header(name, tar::EntryType::Symlink, 0, target);
                let mut e = JsonEntry::new(name, EntryType::Symlink);
                e.link_name = target.into();
                e.mode = 0o777;
                self.entries.push(e);
            }
            Spec::Hardlink(name, target) => {
                self.header(name, tar::EntryType::Link, 0, target);
                let mut e = JsonEntry::new(name, EntryType::Hardlink);
                e.link_name = target.into();
                self.entries.push(e);
            }
            Spec::Fifo(name) => {
                self.header(name, tar::EntryType::Fifo, 0, "");
                self.entries.push(JsonEntry::new(name, EntryType::Fifo));
            }
            Spec::Char(name, major, minor) => {
                self.header(name, tar::EntryType::Char, 0, "");
                let mut e = JsonEntry::new(name, EntryType::Char);
                e.dev_major = major;
                e.dev_minor = minor;
                self.entries.push(e);
            }
        }
    }

    /// Closes the data, appends the TOC member (from `json`) and a footer.
    pub fn finish_with_json(mut self, json: &[u8], legacy: bool) -> Vec<u8> {
        self.new_member();
        let toc_offset = self.out.len() as u64;
        self.out.extend_from_slice(&toc_member(TOC_NAME, json));
        if legacy {
            self.out.extend_from_slice(&legacy_footer(toc_offset));
        } else {
            self.out.extend_from_slice(&footer::build(toc_offset));
        }
        self.out
    }
}

pub const TOC_NAME: &str = "stargz.index.json";

pub fn toc_tar(name: &str, json: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, json).unwrap();
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

pub fn toc_member(name: &str, json: &[u8]) -> Vec<u8> {
    gzip(&toc_tar(name, json))
}

pub fn legacy_footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.len(), footer::LEGACY_FOOTER_SIZE);
    f
}

/// Builds a blob from specs, letting `edit` change the TOC first.
pub fn build_with(specs: &[Spec], edit: impl FnOnce(&mut JsonToc)) -> Vec<u8> {
    let mut w = TestWriter::new();
    for s in specs {
        w.add(s);
    }
    let mut toc = JsonToc {
        version: 1,
        entries: std::mem::take(&mut w.entries),
    };
    edit(&mut toc);
    let json = serde_json::to_vec_pretty(&toc).unwrap();
    w.finish_with_json(&json, false)
}

pub fn build(specs: &[Spec]) -> Vec<u8> {
    build_with(specs, |_| {})
}

pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
