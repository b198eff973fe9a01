//! Unpacks one layer (plain or gzip tar, eStargz included) into a
//! directory in overlayfs's lower-layer format: `.wh.NAME` becomes a 0/0
//! character device `NAME`, `.wh..wh..opq` becomes the
//! `trusted.overlay.opaque=y` xattr on its directory. overlayfs then
//! applies the layers exactly as a container runtime's snapshotter would.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::error::{OptimizeError, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to hide a lower directory's content.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Unpacks layer `index` from `blob` into `dest` (created if missing).
/// Returns the number of entries. `cancel` is checked between entries.
pub fn unpack_layer(index: usize, blob: &Path, dest: &Path, cancel: &AtomicBool) -> Result<u64> {
    let err = |reason: String| OptimizeError::Unpack {
        layer: index,
        reason,
    };
    std::fs::create_dir_all(dest).map_err(|e| OptimizeError::io(dest, e))?;
    let mut f = File::open(blob).map_err(|e| OptimizeError::io(blob, e))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| OptimizeError::io(blob, e))?;
    let f = File::open(blob).map_err(|e| OptimizeError::io(blob, e))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        // eStargz blobs are many gzip members: read them all.
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            f,
        )))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    let mut count = 0u64;
    for entry in ar.entries().map_err(|e| err(format!("reading tar: {e}")))? {
        if cancel.load(Ordering::Relaxed) {
            return Err(OptimizeError::Interrupted);
        }
        let mut entry = entry.map_err(|e| err(format!("reading tar: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| err(format!("entry name: {e}")))?
            .into_owned();
        let rel = clean_relative(&raw)
            .ok_or_else(|| err(format!("entry {} escapes the layer root", raw.display())))?;
        count += 1;
        let name = rel.file_name().map(|n| n.as_bytes().to_vec());
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        match name.as_deref() {
            Some(n) if n == OPAQUE_MARKER.as_bytes() => {
                let dir = safe_parent(dest, &rel).map_err(&err)?;
                set_opaque(&dir).map_err(&err)?;
                continue;
            }
            Some(n) if n.starts_with(WHITEOUT_PREFIX.as_bytes()) => {
                let target = &n[WHITEOUT_PREFIX.len()..];
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(err(format!("bad whiteout {}", raw.display())));
                }
                let dir = safe_parent(dest, &rel).map_err(&err)?;
                let p = dir.join(std::ffi::OsStr::from_bytes(target));
                remove_any(&p).map_err(&err)?;
                mknod(&p, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
                    .map_err(|e| err(format!("whiteout {}: {e}", p.display())))?;
                continue;
            }
            _ => {}
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let dir = safe_parent(dest, &rel).map_err(&err)?;
            let p = dir.join(rel.file_name().unwrap_or_default());
            let h = entry.header();
            let mode = Mode::from_bits_truncate(h.mode().unwrap_or(0o644));
            let (sflag, dev) = if kind.is_fifo() {
                (SFlag::S_IFIFO, 0)
            } else {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let f = if kind.is_block_special() {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                (f, makedev(major.into(), minor.into()))
            };
            remove_any(&p).map_err(&err)?;
            mknod(&p, sflag, mode, dev).map_err(|e| err(format!("device {}: {e}", p.display())))?;
            continue;
        }
        entry
            .unpack_in(dest)
            .map_err(|e| err(format!("unpacking {}: {}", raw.display(), chain(&e))))?;
    }
    Ok(count)
}

/// An error with its sources (the tar crate wraps the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `./a/b/`, `/a/b` -> `a/b`; `None` when a `..` would leave the root.
fn clean_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The parent directory of `rel` under `root`, created as needed, never
/// through a symlink (a layer must not write outside its directory).
fn safe_parent(root: &Path, rel: &Path) -> std::result::Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            p.push(c);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("{} is not a directory", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                }
                Err(e) => return Err(format!("{}: {e}", p.display())),
            }
        }
    }
    Ok(p)
}

fn remove_any(p: &Path) -> std::result::Result<(), String> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => return Ok(()),
    }
    .map_err(|e| format!("{}: {e}", p.display()))
}

/// Marks `dir` opaque for overlayfs.
pub fn set_opaque(dir: &Path) -> std::result::Result<(), String> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let name = CString::new(OPAQUE_XATTR).expect("static name");
    // SAFETY: valid NUL-terminated strings and a 1-byte value buffer.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r != 0 {
        return Err(format!(
            "setting {OPAQUE_XATTR} on {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether `dir` carries the opaque xattr.
pub fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let name = CString::new(OPAQUE_XATTR).expect("static name");
    let mut v = [0u8; 4];
    // SAFETY: valid strings and a buffer of the size passed.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    n == 1 && v[0] == b'y'
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_dirs_become_overlay_format() {
        let d = tempfile::tempdir().unwrap();
        let blob = d.path().join("l.tar");
        std::fs::write(
            &blob,
            tar_with(&[
                ("etc/", tar::EntryType::Directory, b""),
                ("etc/.wh.gone", tar::EntryType::Regular, b""),
                ("opq/.wh..wh..opq", tar::EntryType::Regular, b""),
                ("opq/keep", tar::EntryType::Regular, b"k"),
                ("missing/parent/file", tar::EntryType::Regular, b"x"),
            ]),
        )
        .unwrap();
        let out = d.path().join("out");
        let n = unpack_layer(0, &blob, &out, &AtomicBool::new(false)).unwrap();
        assert_eq!(n, 5);
        let wh = std::fs::symlink_metadata(out.join("etc/gone")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert!(!out.join("etc/.wh.gone").exists());
        assert!(is_opaque(&out.join("opq")));
        assert!(!is_opaque(&out.join("etc")));
        assert_eq!(std::fs::read(out.join("opq/keep")).unwrap(), b"k");
        assert_eq!(
            std::fs::read(out.join("missing/parent/file")).unwrap(),
            b"x"
        );
    }

    #[test]
    fn gzip_layers_and_escapes() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let blob = d.path().join("l.tgz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_with(&[("a/b", tar::EntryType::Regular, b"hi")]))
            .unwrap();
        std::fs::write(&blob, gz.finish().unwrap()).unwrap();
        unpack_layer(0, &blob, &d.path().join("o"), &AtomicBool::new(false)).unwrap();
        assert_eq!(std::fs::read(d.path().join("o/a/b")).unwrap(), b"hi");

        assert_eq!(clean_relative(Path::new("./a/../b/")), Some("b".into()));
        assert_eq!(clean_relative(Path::new("../x")), None);
        // A symlinked parent never carries a whiteout outside the layer.
        let root = d.path().join("r");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("l")).unwrap();
        assert!(safe_parent(&root, Path::new("l/.wh.x")).is_err());
    }
}
