//! Entry names: the one place that decides which TOC names are safe.
//!
//! A name from a blob becomes a path FUSE serves, so anything that could
//! escape the mount (`..`, absolute names) or that the kernel cannot
//! represent (NUL, over-long names) is refused rather than repaired.

use crate::estargz::error::{Error, Result};

/// Longest name accepted (Linux `PATH_MAX`); longer ones are unusable.
pub const MAX_NAME_LEN: usize = 4096;
/// Longest path component (Linux `NAME_MAX`); FUSE cannot serve longer.
pub const MAX_COMPONENT_LEN: usize = 255;

/// Normalises a TOC name to `a/b/c` (`""` is the root). Accepts a leading
/// `./`, `.` components and one trailing `/`; rejects `..`, absolute names,
/// empty components, NUL bytes and empty names.
pub fn normalize(name: &str) -> Result<String> {
    let bad = |reason| Error::InvalidName {
        name: name.chars().take(200).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("name longer than 4096 bytes"));
    }
    if name.contains('\0') {
        return Err(bad("NUL byte"));
    }
    if name.starts_with('/') {
        return Err(bad("absolute name"));
    }
    let body = name.strip_suffix('/').unwrap_or(name);
    let mut out = String::with_capacity(body.len());
    for comp in body.split('/') {
        match comp {
            "." => {}
            ".." => return Err(bad("`..` component")),
            "" => return Err(bad("empty component")),
            c if c.len() > MAX_COMPONENT_LEN => return Err(bad("component longer than 255 bytes")),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

/// Splits `a/b/c` into (`a/b`, `c`); a top-level name has parent `""`.
pub(crate) fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_names() {
        assert_eq!(normalize("./a/b/").unwrap(), "a/b");
        assert_eq!(normalize("a/./b").unwrap(), "a/b");
        assert_eq!(normalize("./").unwrap(), "");
        assert_eq!(normalize(".").unwrap(), "");
        for bad in ["", "/a", "a/../b", "..", "a//b", "a\0b", "a/b//"] {
            assert!(
                matches!(normalize(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
