//! The remote filesystem: FUSE mounts of eStargz layers, registry range
//! reads, and the chunk caches. See ARCHITECTURE.md for the thread model.

pub mod content;
pub mod fuse;

pub use content::{ContentSource, ReadError, ReadFuture};
