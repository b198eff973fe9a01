//! The producer: walks the ordered entries, cuts payloads into chunks, and
//! decides gzip member boundaries from uncompressed byte counts only (so the
//! result is independent of compression and of the thread count). Hashes
//! (chunk, file, DiffID) are computed here, in stream order.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use sha2::{Digest, Sha256};

use super::compress::Submitter;
use super::meta::{OwnerNames, entry_from_input, toc_name};
use super::order::Item;
use crate::estargz::LANDMARK_CONTENTS;
use crate::estargz::error::{Error, Result};
use crate::estargz::toc::{EntryType, JsonEntry};

/// Member-cutting parameters.
pub(crate) struct LayoutParams {
    pub chunk_size: u64,
    pub min_chunk_size: u64,
}

/// What the producer hands back: TOC entries whose `offset` still holds a
/// member sequence number (see `member_of`), and the DiffID state.
pub(crate) struct Laid {
    pub entries: Vec<JsonEntry>,
    /// `(entry index, member sequence number)` for every payload entry.
    pub member_of: Vec<(usize, usize)>,
    pub diff_hash: Sha256,
    pub uncompressed: u64,
}

struct Producer<'a> {
    spool: &'a mut File,
    sub: &'a mut Submitter,
    params: &'a LayoutParams,
    cur: Vec<u8>,
    /// Sequence number the current member will get.
    cur_seq: usize,
    laid: Laid,
    owners: OwnerNames,
}

/// Lays out `items` and submits every data member (the TOC is not included).
pub(crate) fn lay_out(
    items: Vec<Item>,
    spool: &mut File,
    params: &LayoutParams,
    sub: &mut Submitter,
) -> Result<Laid> {
    let mut p = Producer {
        spool,
        sub,
        params,
        cur: Vec::new(),
        cur_seq: 0,
        laid: Laid {
            entries: Vec::with_capacity(items.len()),
            member_of: Vec::new(),
            diff_hash: Sha256::new(),
            uncompressed: 0,
        },
        owners: OwnerNames::default(),
    };
    for item in items {
        p.item(item)?;
    }
    if !p.cur.is_empty() {
        p.flush()?;
    }
    Ok(p.laid)
}

impl Producer<'_> {
    fn flush(&mut self) -> Result<()> {
        let data = std::mem::take(&mut self.cur);
        self.laid.diff_hash.update(&data);
        self.laid.uncompressed = self
            .laid
            .uncompressed
            .checked_add(data.len() as u64)
            .ok_or_else(|| Error::InvalidTar("stream too large".into()))?;
        let seq = self.sub.submit(data)?;
        debug_assert_eq!(seq, self.cur_seq);
        self.cur_seq = seq + 1;
        Ok(())
    }

    fn item(&mut self, item: Item) -> Result<()> {
        // Bound a member made of headers only (many dirs or empty files).
        if self.cur.len() as u64 >= self.params.chunk_size {
            self.flush()?;
        }
        match item {
            Item::Input(e) => {
                self.read_into_cur(e.header_pos, e.header_len)?;
                let mut entry = entry_from_input(&e, &mut self.owners);
                if e.kind == EntryType::Reg && e.size > 0 {
                    self.payload(entry, e.data_pos, e.size, false)
                } else {
                    self.copy_extra(e.data_pos, e.extra_len)?;
                    if e.kind == EntryType::Reg {
                        // Empty files still carry a digest, as upstream writes.
                        entry.digest = format!("sha256:{}", hex::encode(Sha256::digest(b"")));
                    }
                    self.laid.entries.push(entry);
                    Ok(())
                }
            }
            Item::SynthDir(name) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(0);
                // Zero, not empty: strict readers (tar-rs) reject blank
                // numeric fields.
                h.set_uid(0);
                h.set_gid(0);
                self.synth_header(&mut h, &format!("{name}/"))?;
                let mut j = JsonEntry::new(toc_name(&name, EntryType::Dir), EntryType::Dir);
                j.mode = 0o755;
                self.laid.entries.push(j);
                Ok(())
            }
            Item::Landmark(name) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(1);
                h.set_mtime(0);
                h.set_uid(0);
                h.set_gid(0);
                self.synth_header(&mut h, name)?;
                let mut j = JsonEntry::new(name, EntryType::Reg);
                j.mode = 0o644;
                j.size = 1;
                self.payload(j, 0, 1, true)
            }
        }
    }

    /// Appends a header we make ourselves (GNU long names when needed).
    fn synth_header(&mut self, h: &mut tar::Header, path: &str) -> Result<()> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(h, path, io::empty())
            .map_err(|e| Error::InvalidEntry {
                name: path.to_string(),
                reason: e.to_string(),
            })?;
        self.cur.extend_from_slice(b.get_ref());
        Ok(())
    }

    /// Copies a non-regular entry's data (and padding) into the stream,
    /// cutting members as headers-only ones are cut.
    fn copy_extra(&mut self, pos: u64, len: u64) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            if self.cur.len() as u64 >= self.params.chunk_size {
                self.flush()?;
            }
            let piece = self.params.chunk_size.min(len - done);
            self.read_into_cur(pos + done, piece)?;
            done += piece;
        }
        let pad = (512 - (len % 512)) % 512;
        self.cur.resize(self.cur.len() + pad as usize, 0);
        Ok(())
    }

    fn read_into_cur(&mut self, pos: u64, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| Error::InvalidTar("entry too large".into()))?;
        let start = self.cur.len();
        self.cur.resize(start + len, 0);
        self.spool.seek(SeekFrom::Start(pos))?;
        self.spool
            .read_exact(&mut self.cur[start..])
            .map_err(|e| Error::InvalidTar(format!("reading input at {pos}: {e}")))
    }

    /// Writes a regular file's payload in chunks. `landmark` payloads come
    /// from [`LANDMARK_CONTENTS`] instead of the spool.
    fn payload(&mut self, mut entry: JsonEntry, pos: u64, size: u64, landmark: bool) -> Result<()> {
        let chunk_size = self.params.chunk_size;
        let mut file_hash = Sha256::new();
        let first = self.laid.entries.len();
        let mut written = 0u64;
        while written < size {
            let piece = chunk_size.min(size - written);
            let shared = !landmark
                && self.params.min_chunk_size > 0
                && self.cur_seq != 0
                && (self.cur.len() as u64) < self.params.min_chunk_size;
            if !shared {
                self.flush()?;
            }
            let inner = self.cur.len();
            if landmark {
                self.cur.push(LANDMARK_CONTENTS);
            } else {
                self.read_into_cur(pos + written, piece)?;
            }
            let bytes = &self.cur[inner..];
            file_hash.update(bytes);
            entry.chunk_digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
            entry.chunk_offset = to_i64(written)?;
            entry.inner_offset = to_i64(inner as u64)?;
            if written + piece < size {
                entry.chunk_size = to_i64(piece)?;
            }
            self.laid
                .member_of
                .push((self.laid.entries.len(), self.cur_seq));
            self.laid.entries.push(entry);
            written += piece;
            entry = JsonEntry::new(self.laid.entries[first].name.clone(), EntryType::Chunk);
        }
        self.laid.entries[first].digest = format!("sha256:{}", hex::encode(file_hash.finalize()));
        let pad = (512 - (size % 512)) % 512;
        self.cur.resize(self.cur.len() + pad as usize, 0);
        Ok(())
    }
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidTar("value over i64".into()))
}
