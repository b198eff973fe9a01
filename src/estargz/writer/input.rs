//! Input side: spooling the (possibly gzipped) tar to a seekable file and
//! scanning its headers into [`InputEntry`] records. Payloads stay in the
//! spool; only metadata is kept in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

use crate::estargz::error::{Error, Result};
use crate::estargz::toc::EntryType;

/// Longest header chain (PAX / GNU long-name records + header) we accept.
const MAX_HEADER_CHAIN: u64 = 1 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One entry of the input tar, metadata only.
#[derive(Debug, Clone)]
pub(crate) struct InputEntry {
    /// Normalised path: no leading `/` or `./`, no trailing `/`; `""` is root.
    pub name: String,
    pub kind: EntryType,
    /// Byte range in the spool of this entry's raw header records.
    pub header_pos: u64,
    pub header_len: u64,
    /// Payload position in the spool and its size (regular files only).
    pub data_pos: u64,
    pub size: u64,
    /// Data bytes after the header of a non-regular entry (a hardlink or
    /// directory may carry some); copied through so the tar stays valid.
    pub extra_len: u64,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub uname: String,
    pub gname: String,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Normalised target for hardlinks, raw target for symlinks.
    pub link_name: String,
    pub dev_major: i64,
    pub dev_minor: i64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Copies `input` (plain or gzip tar, detected by magic) into an unnamed
/// temporary file, decompressing as needed.
pub(crate) fn spool<R: Read>(input: R) -> Result<File> {
    let mut br = BufReader::with_capacity(1 << 16, input);
    let is_gzip = br.fill_buf()?.starts_with(&GZIP_MAGIC);
    let mut file = tempfile::tempfile()?;
    if is_gzip {
        let mut dec = flate2::read::MultiGzDecoder::new(br);
        io::copy(&mut dec, &mut file).map_err(|e| Error::InvalidTar(format!("gzip input: {e}")))?;
    } else {
        io::copy(&mut br, &mut file)?;
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Uses a seekable file directly when it is a plain tar, or spools its
/// decompressed content when it is gzip.
pub(crate) fn open_seekable(mut file: File) -> Result<File> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        let n = file.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    file.seek(SeekFrom::Start(0))?;
    if got == 2 && magic == GZIP_MAGIC {
        spool(file)
    } else {
        Ok(file)
    }
}

/// Normalises a tar path: strips `/` and `.` components, resolves `..`
/// inside the tree, and rejects `..` that escapes, NUL, and non-UTF-8.
pub fn normalize_name(raw: &[u8]) -> Result<String> {
    let bad = |reason: &str| Error::InvalidEntry {
        name: String::from_utf8_lossy(raw).into_owned(),
        reason: reason.to_string(),
    };
    if raw.contains(&0) {
        return Err(bad("name contains NUL"));
    }
    let s = std::str::from_utf8(raw).map_err(|_| bad("name is not UTF-8"))?;
    let mut parts: Vec<&str> = Vec::new();
    for comp in s.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(bad("name escapes the root with .."));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

fn tar_err(e: io::Error) -> Error {
    Error::InvalidTar(e.to_string())
}

fn round_up_512(n: u64) -> Option<u64> {
    n.checked_add(511).map(|v| v & !511)
}

/// Reads every header of the tar in `spool`. Entries keep input order and
/// duplicates; the caller resolves them.
pub(crate) fn scan(spool: &mut File) -> Result<Vec<InputEntry>> {
    let total = spool.seek(SeekFrom::End(0))?;
    spool.seek(SeekFrom::Start(0))?;
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(&mut *spool);
    let mut prev_end = 0u64;
    for entry in archive.entries_with_seek().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let header_pos = prev_end;
        let data_pos = entry.raw_file_position();
        let size = entry.size();
        let data_end = data_pos
            .checked_add(size)
            .ok_or_else(|| Error::InvalidTar("entry size overflows".into()))?;
        if data_end > total {
            return Err(Error::InvalidTar(format!(
                "truncated: entry data ends at {data_end}, input has {total} bytes"
            )));
        }
        let header_len = data_pos
            .checked_sub(header_pos)
            .filter(|l| (512..=MAX_HEADER_CHAIN).contains(l))
            .ok_or_else(|| Error::InvalidTar(format!("bad header chain at {header_pos}")))?;
        prev_end =
            round_up_512(data_end).ok_or_else(|| Error::InvalidTar("size overflows".into()))?;
        if let Some(e) = convert(&mut entry, header_pos, header_len, data_pos, size)? {
            out.push(e);
        }
    }
    Ok(out)
}

fn convert<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    header_pos: u64,
    header_len: u64,
    data_pos: u64,
    size: u64,
) -> Result<Option<InputEntry>> {
    use tar::EntryType as T;
    let raw_path = entry.path_bytes().into_owned();
    let hdr = entry.header().clone();
    let kind = match hdr.entry_type() {
        T::Regular | T::Continuous => EntryType::Reg,
        T::Directory => EntryType::Dir,
        T::Symlink => EntryType::Symlink,
        T::Link => EntryType::Hardlink,
        T::Char => EntryType::Char,
        T::Block => EntryType::Block,
        T::Fifo => EntryType::Fifo,
        // Global PAX headers carry no file; they are dropped.
        T::XGlobalHeader => return Ok(None),
        other => {
            return Err(Error::InvalidEntry {
                name: String::from_utf8_lossy(&raw_path).into_owned(),
                reason: format!("unsupported tar entry type {:?}", other.as_byte() as char),
            });
        }
    };
    let name = normalize_name(&raw_path)?;
    if name.is_empty() && kind != EntryType::Dir {
        return Err(Error::InvalidEntry {
            name: String::from_utf8_lossy(&raw_path).into_owned(),
            reason: "only a directory can be the root".into(),
        });
    }
    let mut e = InputEntry {
        name,
        kind,
        header_pos,
        header_len,
        data_pos,
        size: if kind == EntryType::Reg { size } else { 0 },
        extra_len: if kind == EntryType::Reg { 0 } else { size },
        mode: i64::from(hdr.mode().map_err(tar_err)?),
        uid: i64::try_from(hdr.uid().map_err(tar_err)?).unwrap_or(0),
        gid: i64::try_from(hdr.gid().map_err(tar_err)?).unwrap_or(0),
        uname: lossy(hdr.username_bytes()),
        gname: lossy(hdr.groupname_bytes()),
        mtime: i64::try_from(hdr.mtime().map_err(tar_err)?).unwrap_or(0),
        link_name: String::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: BTreeMap::new(),
    };
    if matches!(kind, EntryType::Char | EntryType::Block) {
        e.dev_major = i64::from(hdr.device_major().map_err(tar_err)?.unwrap_or(0));
        e.dev_minor = i64::from(hdr.device_minor().map_err(tar_err)?.unwrap_or(0));
    }
    if matches!(kind, EntryType::Symlink | EntryType::Hardlink) {
        let link = entry
            .link_name_bytes()
            .map(|c| c.into_owned())
            .unwrap_or_default();
        e.link_name = if kind == EntryType::Hardlink {
            normalize_name(&link)?
        } else {
            String::from_utf8(link).map_err(|_| Error::InvalidEntry {
                name: e.name.clone(),
                reason: "symlink target is not UTF-8".into(),
            })?
        };
    }
    if let Some(pax) = entry.pax_extensions().map_err(tar_err)? {
        for ext in pax {
            let ext = ext.map_err(tar_err)?;
            let (Ok(key), value) = (ext.key(), ext.value_bytes()) else {
                continue;
            };
            apply_pax(&mut e, key, value);
        }
    }
    Ok(Some(e))
}

fn lossy(b: Option<&[u8]>) -> String {
    b.map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// PAX records override the fixed header fields the tar crate leaves alone.
fn apply_pax(e: &mut InputEntry, key: &str, value: &[u8]) {
    let text = std::str::from_utf8(value).ok();
    let int = || text.and_then(|t| t.trim().parse::<i64>().ok());
    match key {
        "uid" => e.uid = int().unwrap_or(e.uid),
        "gid" => e.gid = int().unwrap_or(e.gid),
        "uname" => e.uname = String::from_utf8_lossy(value).into_owned(),
        "gname" => e.gname = String::from_utf8_lossy(value).into_owned(),
        "mtime" => {
            // "%d" or "%d.%d"; rounded to whole seconds like the reference.
            if let Some(t) = text {
                let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
                if let Ok(secs) = whole.parse::<i64>() {
                    let round_away = frac.as_bytes().first().is_some_and(|&d| d >= b'5');
                    e.mtime = match (round_away, whole.starts_with('-')) {
                        (false, _) => secs,
                        (true, false) => secs.saturating_add(1),
                        (true, true) => secs.saturating_sub(1),
                    };
                }
            }
        }
        _ => {
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                e.xattrs.insert(name.to_string(), value.to_vec());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize_name(b"./a/b/").unwrap(), "a/b");
        assert_eq!(normalize_name(b"/a//./b").unwrap(), "a/b");
        assert_eq!(normalize_name(b"a/../b").unwrap(), "b");
        assert_eq!(normalize_name(b"./").unwrap(), "");
        assert!(matches!(
            normalize_name(b"../x"),
            Err(Error::InvalidEntry { .. })
        ));
        assert!(normalize_name(b"a/../../x").is_err());
        assert!(normalize_name(b"a\0b").is_err());
    }
}
