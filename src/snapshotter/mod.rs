//! containerd's snapshots service: gRPC server, metadata store, overlayfs
//! mounts, and the seam through which remote layers are mounted.
