//! Positional reads, the one capability the sync reader needs from a blob.

use std::io;

/// A blob that can be read at any offset without shared cursor state.
pub trait ReadAt {
    /// Total size of the blob in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Reads up to `buf.len()` bytes at `off`; returns 0 only at the end.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// Fills `buf` from `off` or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut off: u64, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(off, buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    off = off
                        .checked_add(n as u64)
                        .ok_or_else(|| io::Error::other("offset overflow"))?;
                    buf = &mut buf[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, off)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let Ok(start) = usize::try_from(off) else {
            return Ok(0);
        };
        let src = self.get(start..).unwrap_or(&[]);
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        self.as_slice().size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.as_slice().read_at(off, buf)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_at(off, buf)
    }
}

/// A `Read` over the range `[pos, end)` of a [`ReadAt`].
pub struct RangeReader<'a, R: ReadAt + ?Sized> {
    src: &'a R,
    pos: u64,
    end: u64,
}

impl<'a, R: ReadAt + ?Sized> RangeReader<'a, R> {
    pub fn new(src: &'a R, start: u64, end: u64) -> Self {
        RangeReader {
            src,
            pos: start,
            end: end.max(start),
        }
    }
}

impl<R: ReadAt + ?Sized> io::Read for RangeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.src.read_at(self.pos, &mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn slices_and_ranges() {
        let data: &[u8] = b"hello world";
        let mut b = [0u8; 5];
        data.read_exact_at(6, &mut b).unwrap();
        assert_eq!(&b, b"world");
        assert_eq!(data.read_at(u64::MAX, &mut b).unwrap(), 0);
        assert!(data.read_exact_at(8, &mut b).is_err());
        let mut s = String::new();
        RangeReader::new(data, 2, 7).read_to_string(&mut s).unwrap();
        assert_eq!(s, "llo w");
    }
}
