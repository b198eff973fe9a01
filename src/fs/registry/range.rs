//! Byte-range helpers: merging requested ranges into spans, the `Range`
//! header, `Content-Range` parsing and a `multipart/byteranges` parser.
//!
//! The multipart parser takes each part's length from its `Content-Range`
//! rather than searching for the boundary, so payload bytes that happen to
//! contain the boundary string cannot split a part.

use std::ops::Range;

use bytes::Bytes;

use super::error::RegistryError;

/// Sorts and merges overlapping or adjacent ranges; drops empty ones.
pub fn merge_ranges(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// `bytes=a-b,c-d` (inclusive ends) for non-empty ranges.
pub fn range_header(spans: &[Range<u64>]) -> String {
    let parts: Vec<String> = spans
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end - 1))
        .collect();
    format!("bytes={}", parts.join(","))
}

/// A parsed `Content-Range: bytes first-last/complete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRange {
    /// The satisfied range (`None` for `bytes */N`).
    pub range: Option<Range<u64>>,
    /// The complete length, when known.
    pub complete: Option<u64>,
}

/// Parses a `Content-Range` value strictly.
pub fn parse_content_range(v: &str) -> Result<ContentRange, RegistryError> {
    let bad = || RegistryError::ProtocolViolation(format!("malformed Content-Range {v:?}"));
    let rest = v
        .trim()
        .strip_prefix("bytes ")
        .ok_or_else(bad)?
        .trim_start();
    let (r, total) = rest.split_once('/').ok_or_else(bad)?;
    let num = |s: &str| -> Result<u64, RegistryError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let complete = if total == "*" {
        None
    } else {
        Some(num(total)?)
    };
    let range = if r == "*" {
        None
    } else {
        let (a, b) = r.split_once('-').ok_or_else(bad)?;
        let (a, b) = (num(a)?, num(b)?);
        if b < a || complete.is_some_and(|c| b >= c) {
            return Err(bad());
        }
        Some(a..b.checked_add(1).ok_or_else(bad)?)
    };
    if range.is_none() && complete.is_none() {
        return Err(bad());
    }
    Ok(ContentRange { range, complete })
}

/// The `boundary` parameter of a `multipart/byteranges` Content-Type.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut it = content_type.split(';');
    let mime = it.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    for p in it {
        let (k, v) = p.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            if !v.is_empty() && v.len() <= 200 {
                return Some(v.to_owned());
            }
        }
    }
    None
}

/// One verified part of a multipart body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Blob offsets this part holds.
    pub range: Range<u64>,
    /// Exactly `range.end - range.start` bytes.
    pub data: Bytes,
    /// Complete length the part claimed, if any.
    pub complete: Option<u64>,
}

/// Parses a `multipart/byteranges` body into parts.
pub fn parse_multipart(body: &Bytes, boundary: &str) -> Result<Vec<Part>, RegistryError> {
    let bad = |m: &str| RegistryError::ProtocolViolation(format!("multipart: {m}"));
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let mut pos = find(body, d, 0).ok_or_else(|| bad("no boundary"))? + d.len();
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return if parts.is_empty() {
                Err(bad("no parts"))
            } else {
                Ok(parts)
            };
        }
        // Transport padding, then the line break after the delimiter.
        while pos < body.len() && matches!(body[pos], b' ' | b'\t') {
            pos += 1;
        }
        pos = skip_eol(body, pos).ok_or_else(|| bad("no line break after boundary"))?;
        // Part headers up to an empty line.
        let mut cr = None;
        loop {
            let eol = find(body, b"\n", pos).ok_or_else(|| bad("truncated headers"))?;
            let line = &body[pos..eol];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            pos = eol + 1;
            if line.is_empty() {
                break;
            }
            let line = std::str::from_utf8(line).map_err(|_| bad("non-UTF-8 header"))?;
            if let Some((k, v)) = line.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-range")
            {
                cr = Some(parse_content_range(v)?);
            }
        }
        let cr = cr.ok_or_else(|| bad("part without Content-Range"))?;
        let range = cr.range.ok_or_else(|| bad("unsatisfied part"))?;
        let len = usize::try_from(range.end - range.start).map_err(|_| bad("part too large"))?;
        let end = pos.checked_add(len).filter(|&e| e <= body.len());
        let end = end.ok_or_else(|| bad("truncated part"))?;
        parts.push(Part {
            range,
            data: body.slice(pos..end),
            complete: cr.complete,
        });
        pos = skip_eol(body, end).ok_or_else(|| bad("no line break after part"))?;
        if !body[pos..].starts_with(d) {
            return Err(bad("part length disagrees with Content-Range"));
        }
        pos += d.len();
    }
}

fn skip_eol(b: &[u8], pos: usize) -> Option<usize> {
    if b[pos..].starts_with(b"\r\n") {
        Some(pos + 2)
    } else if b[pos..].starts_with(b"\n") {
        Some(pos + 1)
    } else {
        None
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_and_overlapping() {
        let m = merge_ranges(&[10..20, 0..5, 5..8, 15..30, 40..40, 50..60]);
        assert_eq!(m, vec![0..8, 10..30, 50..60]);
        assert_eq!(range_header(&m), "bytes=0-7,10-29,50-59");
    }

    #[test]
    fn content_range_strict() {
        let c = parse_content_range("bytes 0-9/100").unwrap();
        assert_eq!((c.range, c.complete), (Some(0..10), Some(100)));
        assert_eq!(
            parse_content_range("bytes 5-5/*").unwrap().range,
            Some(5..6)
        );
        assert_eq!(
            parse_content_range("bytes */42").unwrap().complete,
            Some(42)
        );
        for bad in [
            "0-9/100",
            "bytes 9-0/100",
            "bytes 0-100/100",
            "bytes -1-2/3",
            "bytes */*",
            "bytes 0-9",
        ] {
            assert!(parse_content_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn multipart_with_boundary_inside_payload() {
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        assert_eq!(multipart_boundary("application/octet-stream"), None);
        // The second part's payload contains the delimiter text itself.
        let body = Bytes::from_static(
            b"preamble\r\n--abc\r\nContent-Type: application/octet-stream\r\ncontent-range: bytes 0-3/20\r\n\r\nABCD\r\n--abc\r\nContent-Range: bytes 10-16/20\r\n\r\n--abc\r\n\r\n--abc--\r\n",
        );
        let p = parse_multipart(&body, "abc").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].range.clone(), &p[0].data[..]), (0..4, &b"ABCD"[..]));
        assert_eq!(
            (p[1].range.clone(), &p[1].data[..]),
            (10..17, &b"--abc\r\n"[..])
        );
    }

    #[test]
    fn multipart_rejects_lies_and_truncation() {
        let short =
            Bytes::from_static(b"--b\r\nContent-Range: bytes 0-9/20\r\n\r\nABC\r\n--b--\r\n");
        assert!(parse_multipart(&short, "b").is_err());
        let long =
            Bytes::from_static(b"--b\r\nContent-Range: bytes 0-1/20\r\n\r\nABCD\r\n--b--\r\n");
        assert!(parse_multipart(&long, "b").is_err());
        let nocr = Bytes::from_static(b"--b\r\n\r\nAB\r\n--b--\r\n");
        assert!(parse_multipart(&nocr, "b").is_err());
        let unterminated = Bytes::from_static(b"--b\r\nContent-Range: bytes 0-1/20\r\n\r\nAB");
        assert!(parse_multipart(&unterminated, "b").is_err());
    }
}
