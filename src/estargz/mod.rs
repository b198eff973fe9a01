//! The eStargz format, as a pure library over bytes and `std::io`.
//!
//! - [`footer`]: the 51-byte eStargz and 47-byte legacy stargz footers.
//! - [`toc`]: the `stargz.index.json` JSON model exactly as serialized.
//! - [`reader`]: locating, parsing and checking the TOC, chunk lookup and
//!   verified chunk decoding.
//! - [`digest`]: `sha256:<hex>` digests.
//!
//! Everything here treats a blob as untrusted input: offsets and sizes are
//! checked, allocations are bounded, and failures are [`Error`] values.

pub mod digest;
pub mod error;
pub mod footer;
pub mod reader;
mod rfc3339;
pub mod toc;

pub use digest::Digest;
pub use error::Error;

/// Name of the TOC entry inside the TOC's tar stream.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Landmark placed after the prioritized files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark placed first when there are no prioritized files.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The single byte of content in either landmark file.
pub const LANDMARK_CONTENTS: u8 = 0x0f;
/// Default uncompressed chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Layer annotation (and Prepare label) carrying the TOC digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation carrying the uncompressed blob size, in decimal.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
