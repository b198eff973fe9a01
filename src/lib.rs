//! rstargz: a lazy-pulling eStargz snapshotter for containerd.
//!
//! - [`estargz`]: the pure format library (footer, TOC, chunk lookup and
//!   verification, the streaming writer). No async runtime, no FUSE, no HTTP.
//! - [`convert`]: `rstargz convert`: a registry image to an eStargz image.
//! - [`optimize`]: `rstargz optimize`: record a workload, prioritize its files.
//! - [`fs`]: the remote filesystem side: FUSE mounts, range reads, caches.
//! - [`snapshotter`]: containerd's snapshots gRPC service, metadata store and
//!   overlayfs mounts.
//! - [`proto`]: code generated from `proto/`.

pub mod convert;
pub mod estargz;
pub mod fs;
pub mod optimize;
pub mod snapshotter;

/// Generated containerd API code (`proto/`), nested as the proto packages
/// are so that cross-package references resolve.
pub mod proto {
    pub mod containerd {
        /// `containerd.types`
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}
