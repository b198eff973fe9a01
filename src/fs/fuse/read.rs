//! The read path: a FUSE thread never waits for content. It moves the reply
//! into a task on the layer's runtime and returns to the kernel at once; the
//! task waits for a permit (bounding reads in flight per layer), awaits the
//! [`ContentSource`](crate::fs::ContentSource), and replies from the runtime.
//! A reply dropped unsent (runtime shut down) answers `EIO`.

use fuser::{Errno, ReplyData};

use super::LayerFs;
use super::error::FsError;
use crate::estargz::reader::NodeId;

impl LayerFs {
    pub(super) fn spawn_read(
        &self,
        node: NodeId,
        file_size: u64,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let Some(left) = file_size.checked_sub(offset).filter(|&l| l > 0) else {
            return reply.data(&[]);
        };
        let want = u32::try_from(left.min(u64::from(size))).unwrap_or(size);
        if want == 0 {
            return reply.data(&[]);
        }
        let content = self.content.clone();
        let permits = self.reads.clone();
        self.rt.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return reply.error(Errno::EIO);
            };
            match content.read(node, offset, want).await {
                Ok(bytes) => {
                    let n = bytes.len().min(want as usize);
                    reply.data(&bytes[..n]);
                }
                Err(e) => {
                    tracing::warn!(node = node.0, offset, size = want, error = %e, "layer read failed");
                    reply.error(FsError::from(e).errno());
                }
            }
        });
    }
}
