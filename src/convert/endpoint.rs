//! Where images come from and go to: a registry repository or an OCI
//! layout directory. [`ImageLocation::parse`] reads `oci:DIR[:TAG]` or an
//! image reference; [`Source`] and [`Dest`] give the converter the same
//! operations on both.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::Value;

use super::layout::LayoutRef;
use crate::fs::registry::{RangeFetcher, Reference, RegistryClient};

/// An image location: a registry reference or an OCI layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    Registry(Reference),
    Layout(LayoutRef),
}

impl ImageLocation {
    /// `oci:DIR[:TAG]`, or a registry reference (`host/repo:tag`).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s.strip_prefix("oci:") {
            Some(rest) => Ok(Self::Layout(LayoutRef::parse(rest)?)),
            None => Ok(Self::Registry(
                Reference::parse(s).with_context(|| format!("image reference {s:?}"))?,
            )),
        }
    }
}

impl std::fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Registry(r) => write!(f, "{r}"),
            Self::Layout(l) => write!(f, "{l}"),
        }
    }
}

/// The image being read.
#[derive(Clone)]
pub(crate) struct Source {
    pub client: RegistryClient,
    pub loc: ImageLocation,
}

impl Source {
    /// The manifest or index SRC names, as bytes, with its digest.
    pub async fn top_manifest(&self) -> anyhow::Result<(String, Bytes)> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.fetch_manifest(r, None).await?),
            ImageLocation::Layout(l) => {
                let l = l.clone();
                blocking(move || {
                    let d = l.top_descriptor()?;
                    let digest = d["digest"]
                        .as_str()
                        .context("index.json entry without digest")?
                        .to_owned();
                    let body = l.read_json_blob(&digest, d["size"].as_u64())?;
                    Ok((digest, body))
                })
                .await
            }
        }
    }

    /// A manifest of the same repository or layout, by digest.
    pub async fn manifest(&self, digest: &str, size: u64) -> anyhow::Result<Bytes> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.fetch_manifest(r, Some(digest)).await?.1),
            ImageLocation::Layout(l) => {
                let (l, d) = (l.clone(), digest.to_owned());
                blocking(move || l.read_json_blob(&d, Some(size))).await
            }
        }
    }

    /// Streams blob `digest` into `out`, digest checked.
    pub async fn blob_to_file(
        &self,
        digest: &str,
        size: u64,
        out: &mut File,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> anyhow::Result<u64> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self
                .client
                .blob_to_file_progress(r, digest, size, out, on_bytes)
                .await?),
            ImageLocation::Layout(l) => {
                // Local reads are fast; a blocking section keeps them off
                // the async workers.
                let mut read = || l.blob_to_file(digest, size, out, &|n| on_bytes(n));
                match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(read),
                    _ => read(),
                }
            }
        }
    }

    /// The last `n` bytes of blob `digest` (`size` bytes), read with one
    /// range request rather than the whole blob.
    pub async fn blob_tail(&self, digest: &str, size: u64, n: u64) -> anyhow::Result<Vec<u8>> {
        if n > size {
            bail!("blob {digest} is smaller than {n} bytes");
        }
        match &self.loc {
            ImageLocation::Registry(r) => {
                let blob = self.client.blob_with_size(r, digest, size)?;
                let tail = size - n..size;
                let mut parts = blob.fetch(std::slice::from_ref(&tail)).await?;
                Ok(parts.pop().map(|b| b.to_vec()).unwrap_or_default())
            }
            ImageLocation::Layout(l) => {
                let (l, d) = (l.clone(), digest.to_owned());
                blocking(move || l.blob_tail(&d, size, n)).await
            }
        }
    }
}

/// The image being written.
#[derive(Clone)]
pub(crate) struct Dest {
    pub client: RegistryClient,
    pub loc: ImageLocation,
}

impl Dest {
    /// Checks the destination can be a target and prepares a layout.
    pub async fn open(client: RegistryClient, loc: ImageLocation) -> anyhow::Result<Self> {
        match &loc {
            ImageLocation::Registry(r) if r.digest.is_some() => {
                bail!("destination {r} must be a tag, not a digest")
            }
            ImageLocation::Registry(_) => {}
            ImageLocation::Layout(l) => {
                let l = l.clone();
                blocking(move || l.init_dest()).await?;
            }
        }
        Ok(Self { client, loc })
    }

    /// Whether the destination has blob `digest` already.
    pub async fn has_blob(&self, digest: &str, size: u64) -> anyhow::Result<bool> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.blob_exists(r, digest).await?),
            ImageLocation::Layout(l) => l.has_blob(digest, size),
        }
    }

    /// Mounts blob `digest` from the source's repository when both are
    /// repositories of one registry. Returns whether it did.
    pub async fn mount_from(&self, src: &Source, digest: &str) -> anyhow::Result<bool> {
        match (&self.loc, &src.loc) {
            (ImageLocation::Registry(d), ImageLocation::Registry(s))
                if d.host == s.host && d.repository != s.repository =>
            {
                Ok(self.client.mount_blob(d, digest, s).await?)
            }
            _ => Ok(false),
        }
    }

    /// Uploads (or copies in) the file at `path` as blob `digest` unless
    /// the destination has it. Returns whether bytes were written.
    pub async fn push_blob_file(
        &self,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> anyhow::Result<bool> {
        match &self.loc {
            ImageLocation::Registry(r) => {
                Ok(self.client.push_blob_file(r, digest, size, path).await?)
            }
            ImageLocation::Layout(l) => {
                let (l, d, p) = (l.clone(), digest.to_owned(), path.to_owned());
                blocking(move || l.put_blob_file(&d, size, &p)).await
            }
        }
    }

    /// Pushes a manifest or index. `tagged`: this is the image's top
    /// manifest, pushed under the destination tag (the last push of a
    /// conversion); otherwise it is pushed by digest only (an index's
    /// children). Returns its digest.
    pub async fn push_manifest(
        &self,
        media_type: &str,
        body: Bytes,
        tagged: bool,
        platform: Option<&Value>,
    ) -> anyhow::Result<String> {
        match &self.loc {
            ImageLocation::Registry(r) => {
                let digest = super::sha256(&body);
                let reference = if tagged {
                    r.tag.clone().unwrap_or_else(|| "latest".to_owned())
                } else {
                    digest.clone()
                };
                Ok(self
                    .client
                    .push_manifest(r, &reference, media_type, body)
                    .await?)
            }
            ImageLocation::Layout(l) => {
                let (l, mt, pl) = (l.clone(), media_type.to_owned(), platform.cloned());
                blocking(move || {
                    let digest = l.put_blob_bytes(&body)?;
                    if tagged {
                        l.set_index_entry(&mt, &digest, body.len() as u64, pl.as_ref())?;
                    }
                    Ok(digest)
                })
                .await
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("blocking task panicked")?
}
