//! FUSE passthrough of complete files.
//!
//! Once a layer is fully fetched, opening a regular file asks the
//! [`CompleteFiles`] store to write it out (in the background, from
//! verified chunks). Opens after that reply `FOPEN_PASSTHROUGH` with the
//! written file as backing file, so the kernel reads it directly.
//!
//! The kernel does not let one inode be open in cached and passthrough mode
//! at once, and wants the same backing file for all its passthrough opens.
//! So per node we count cached opens (released in `release`), switch to
//! passthrough only when none is open, and keep the node's backing id
//! until the layer goes. Everything here is local: an open never waits on
//! the network (writing out runs on the runtime).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

use crate::estargz::digest::Digest;
use crate::estargz::reader::NodeId;
use crate::fs::cache::CompleteFiles;
use crate::fs::content::ContentSource;

/// Smallest file served by passthrough. A small file costs one FUSE read,
/// served from the daemon's caches; passthrough would add a backing file
/// on disk to read instead (measured in `benches/warm_read.rs`: a tree
/// walk of the Debian rootfs took 2.2 s with passthrough for every file,
/// 1 s without).
pub(super) const MIN_SIZE: u64 = 1 << 20;

/// File handle of an open served through FUSE (counted).
pub(super) const FH_CACHED: FileHandle = FileHandle(1);
/// File handle of an open served by passthrough.
const FH_PASSTHROUGH: FileHandle = FileHandle(2);

#[derive(Default)]
struct NodeState {
    backing: Option<Arc<BackingId>>,
    cached_opens: u32,
}

/// Per-layer passthrough state.
pub(super) struct Passthrough {
    files: Arc<CompleteFiles>,
    nodes: Mutex<HashMap<NodeId, NodeState>>,
    /// Cleared when the kernel refuses a backing file (no passthrough on
    /// this connection): every open then goes through FUSE.
    usable: AtomicBool,
}

impl Passthrough {
    pub(super) fn new(files: Arc<CompleteFiles>) -> Passthrough {
        Passthrough {
            files,
            nodes: Mutex::new(HashMap::new()),
            usable: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, NodeState>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers the open of regular file `node`: passthrough if its complete
    /// file is ready and no cached open is live, else a counted cached open
    /// (and the file is written out if the layer is fully fetched).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        &self,
        node: NodeId,
        digest: Digest,
        size: u64,
        flags: FopenFlags,
        content: &Arc<dyn ContentSource>,
        rt: &tokio::runtime::Handle,
        reply: ReplyOpen,
    ) {
        // The page cache is the backing file's: nothing of ours to keep.
        let direct = flags & !FopenFlags::FOPEN_KEEP_CACHE;
        let mut nodes = self.lock();
        let st = nodes.entry(node).or_default();
        if let Some(b) = &st.backing {
            return reply.opened_passthrough(FH_PASSTHROUGH, direct, b);
        }
        if st.cached_opens == 0
            && self.usable.load(Ordering::Relaxed)
            && let Some(path) = self.files.ready(&digest)
        {
            match std::fs::File::open(&path).and_then(|f| reply.open_backing(&f)) {
                Ok(b) => {
                    tracing::debug!(node = node.0, size, "passthrough backing file registered");
                    let b = Arc::new(b);
                    st.backing = Some(b.clone());
                    return reply.opened_passthrough(FH_PASSTHROUGH, direct, &b);
                }
                Err(e) => {
                    // EPERM: not negotiated or no CAP_SYS_ADMIN; ELOOP: the
                    // backing file sits on a stacked fs. Either way it will
                    // not work for this layer: say so once and stop trying.
                    self.usable.store(false, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), error = %e, "FUSE passthrough refused; this layer is served through FUSE");
                }
            }
        }
        st.cached_opens += 1;
        drop(nodes);
        if self.usable.load(Ordering::Relaxed) && content.complete() {
            self.files
                .write_out(rt, digest, size, content.clone(), node);
        }
        reply.opened(FH_CACHED, flags);
    }

    /// A cached open of `node` ended.
    pub(super) fn released(&self, node: NodeId) {
        let mut nodes = self.lock();
        if let Some(st) = nodes.get_mut(&node) {
            st.cached_opens = st.cached_opens.saturating_sub(1);
            if st.cached_opens == 0 && st.backing.is_none() {
                nodes.remove(&node);
            }
        }
    }
}
