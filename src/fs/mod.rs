//! The remote filesystem: FUSE mounts of eStargz layers, registry range
//! reads, and the chunk caches. (Lazy pulling lands here; see ARCHITECTURE.md.)

pub mod registry;
