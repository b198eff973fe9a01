//! [`MemoryBlob`]: a [`RangeFetcher`] over bytes in memory, for tests of the
//! layers above (FUSE, chunk cache) and for blobs already on hand.

use std::ops::Range;

use bytes::Bytes;

use super::RangeFetcher;
use super::error::RegistryError;

/// A blob held in memory. Applies the same range checks as [`super::Blob`].
#[derive(Debug, Clone)]
pub struct MemoryBlob {
    data: Bytes,
}

impl MemoryBlob {
    /// Wraps `data`.
    pub fn new(data: impl Into<Bytes>) -> Self {
        Self { data: data.into() }
    }
}

impl RangeFetcher for MemoryBlob {
    async fn fetch(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        let len = self.data.len() as u64;
        ranges
            .iter()
            .map(|r| {
                if r.start > r.end || r.end > len {
                    return Err(RegistryError::BadRange(format!(
                        "{}..{} outside blob of {len} bytes",
                        r.start, r.end
                    )));
                }
                // Both ends are within `data`, whose length is a usize.
                let (a, z) = (r.start as usize, r.end as usize);
                Ok(self.data.slice(a..z))
            })
            .collect()
    }

    async fn size(&self) -> Result<u64, RegistryError> {
        Ok(self.data.len() as u64)
    }
}
