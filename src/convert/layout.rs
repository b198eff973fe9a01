//! OCI image layout directories (`oci:DIR[:TAG]`): `oci-layout`,
//! `index.json` and `blobs/<alg>/<hex>`, as the image-spec defines them.
//! A tag is the `org.opencontainers.image.ref.name` annotation of an
//! `index.json` entry.
//!
//! Reading checks every blob's size and digest as it streams. Writing puts
//! each blob in place through a temp file and a rename, and rewrites
//! `index.json` (also through a rename) only for the final manifest, so an
//! interrupted conversion leaves at most unreferenced blobs.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::fs::registry::RegistryError;

/// The tag annotation of `index.json` entries.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_LAYOUT_FILE: &str = "oci-layout";
const OCI_LAYOUT_BODY: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// Largest manifest or `index.json` read into memory.
const MAX_JSON_BYTES: u64 = 8 << 20;

/// An `oci:` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    pub dir: PathBuf,
    pub tag: Option<String>,
}

impl LayoutRef {
    /// Parses what follows `oci:`: `DIR` or `DIR:TAG`. A final `:x` is a
    /// tag when `x` has no `/` (tags never do).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (dir, tag) = match s.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t)),
            _ => (s, None),
        };
        if dir.is_empty() {
            bail!("oci:{s}: empty directory");
        }
        if let Some(t) = tag
            && (t.is_empty() || t.len() > 128 || t.chars().any(char::is_control))
        {
            bail!("oci:{s}: invalid tag {t:?}");
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_owned),
        })
    }

    fn blob_path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        let (alg, hex) = digest
            .split_once(':')
            .filter(|(a, h)| {
                *a == "sha256" && h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .with_context(|| format!("unsupported digest {digest:?}"))?;
        Ok(self.dir.join("blobs").join(alg).join(hex))
    }
}

impl std::fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci:{}", self.dir.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn read_index(dir: &Path) -> anyhow::Result<Value> {
    let p = dir.join("index.json");
    let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
    let mut b = Vec::new();
    f.take(MAX_JSON_BYTES + 1).read_to_end(&mut b)?;
    if b.len() as u64 > MAX_JSON_BYTES {
        bail!("{} is larger than {MAX_JSON_BYTES} bytes", p.display());
    }
    let v: Value =
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?;
    if !v["manifests"].is_array() {
        bail!("{}: no manifests array", p.display());
    }
    Ok(v)
}

impl LayoutRef {
    /// The `index.json` entry this reference names: the one tagged `tag`,
    /// or the only entry when no tag is given.
    pub fn top_descriptor(&self) -> anyhow::Result<Value> {
        if !self.dir.join(OCI_LAYOUT_FILE).is_file() {
            bail!(
                "{}: not an OCI image layout (no {OCI_LAYOUT_FILE} file)",
                self.dir.display()
            );
        }
        let index = read_index(&self.dir)?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let name = |e: &Value| {
            e["annotations"][REF_NAME_ANNOTATION]
                .as_str()
                .map(str::to_owned)
        };
        match &self.tag {
            Some(t) => entries
                .into_iter()
                .find(|e| name(e).as_deref() == Some(t))
                .with_context(|| format!("{self}: tag {t} not found in index.json")),
            None if entries.len() == 1 => Ok(entries.into_iter().next().unwrap_or_default()),
            None => {
                let tags: Vec<String> = entries.iter().filter_map(name).collect();
                bail!(
                    "{self}: index.json has {} entries; name one with oci:DIR:TAG (tags: {})",
                    entries.len(),
                    tags.join(", ")
                )
            }
        }
    }

    /// A small JSON blob (manifest, index), digest and size checked.
    pub fn read_json_blob(&self, digest: &str, size: Option<u64>) -> anyhow::Result<Bytes> {
        let p = self.blob_path(digest)?;
        let f = File::open(&p).with_context(|| format!("{self}: blob {digest} missing"))?;
        let mut b = Vec::new();
        f.take(MAX_JSON_BYTES + 1).read_to_end(&mut b)?;
        if b.len() as u64 > MAX_JSON_BYTES || size.is_some_and(|s| s != b.len() as u64) {
            bail!(
                "{self}: blob {digest} is {} bytes, expected {size:?}",
                b.len()
            );
        }
        let got = sha256(&b);
        if got != digest {
            return Err(RegistryError::DigestMismatch {
                expected: digest.to_owned(),
                got,
            }
            .into());
        }
        Ok(Bytes::from(b))
    }

    /// Copies blob `digest` into `out`, checking size and digest as it
    /// streams; calls `on_bytes` as bytes are copied.
    pub fn blob_to_file(
        &self,
        digest: &str,
        size: u64,
        out: &mut File,
        on_bytes: &dyn Fn(u64),
    ) -> anyhow::Result<u64> {
        let p = self.blob_path(digest)?;
        let mut f = File::open(&p).with_context(|| format!("{self}: blob {digest} missing"))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > size {
                bail!("{self}: blob {digest} is longer than its {size} bytes");
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])?;
            on_bytes(k as u64);
        }
        if n != size {
            bail!("{self}: blob {digest} is {n} bytes, expected {size}");
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != digest {
            return Err(RegistryError::DigestMismatch {
                expected: digest.to_owned(),
                got,
            }
            .into());
        }
        out.flush()?;
        Ok(n)
    }

    /// The last `n` bytes of a blob of `size` bytes (eStargz footers).
    pub fn blob_tail(&self, digest: &str, size: u64, n: u64) -> anyhow::Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let p = self.blob_path(digest)?;
        let mut f = File::open(&p).with_context(|| format!("{self}: blob {digest} missing"))?;
        let len = f.metadata()?.len();
        if len != size || n > size {
            bail!("{self}: blob {digest} is {len} bytes, expected {size}");
        }
        f.seek(SeekFrom::Start(size - n))?;
        let mut b = vec![0u8; n as usize];
        f.read_exact(&mut b)?;
        Ok(b)
    }

    /// Creates the layout skeleton (`oci-layout`, `blobs/sha256`) if missing.
    pub fn init_dest(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.dir.join("blobs/sha256"))
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let ol = self.dir.join(OCI_LAYOUT_FILE);
        if !ol.exists() {
            write_atomic(&ol, OCI_LAYOUT_BODY)?;
        }
        Ok(())
    }

    /// Whether the layout holds blob `digest` already (with the right size).
    pub fn has_blob(&self, digest: &str, size: u64) -> anyhow::Result<bool> {
        let p = self.blob_path(digest)?;
        Ok(std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size))
    }

    /// Copies the file at `src` in as blob `digest` unless it is there.
    /// Returns whether it was written. The caller verified the digest.
    pub fn put_blob_file(&self, digest: &str, size: u64, src: &Path) -> anyhow::Result<bool> {
        if self.has_blob(digest, size)? {
            return Ok(false);
        }
        let dest = self.blob_path(digest)?;
        let dir = dest.parent().context("blob path without parent")?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".rstargz-tmp-")
            .tempfile_in(dir)?;
        let mut f = File::open(src)?;
        std::io::copy(&mut f, tmp.as_file_mut())?;
        tmp.as_file().sync_data()?;
        tmp.persist(&dest)
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(true)
    }

    /// Writes a small blob (config, manifest, index).
    pub fn put_blob_bytes(&self, body: &[u8]) -> anyhow::Result<String> {
        let digest = sha256(body);
        let dest = self.blob_path(&digest)?;
        if !self.has_blob(&digest, body.len() as u64)? {
            write_atomic(&dest, body)?;
        }
        Ok(digest)
    }

    /// Points `index.json` at manifest (or index) `digest`: the entry with
    /// this reference's tag (or, untagged, with the same digest) is
    /// replaced, other entries are kept.
    pub fn set_index_entry(
        &self,
        media_type: &str,
        digest: &str,
        size: u64,
        platform: Option<&Value>,
    ) -> anyhow::Result<()> {
        let p = self.dir.join("index.json");
        let mut index = if p.exists() {
            read_index(&self.dir)?
        } else {
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        };
        let mut entry = json!({"mediaType": media_type, "digest": digest, "size": size});
        if let Some(pl) = platform {
            entry["platform"] = pl.clone();
        }
        if let Some(t) = &self.tag {
            entry["annotations"] = json!({ REF_NAME_ANNOTATION: t });
        }
        let list = index["manifests"]
            .as_array_mut()
            .context("index.json without manifests")?;
        list.retain(|e| match &self.tag {
            Some(t) => e["annotations"][REF_NAME_ANNOTATION].as_str() != Some(t),
            None => e["digest"].as_str() != Some(digest),
        });
        list.push(entry);
        write_atomic(&p, &serde_json::to_vec(&index)?)
    }
}

fn write_atomic(dest: &Path, body: &[u8]) -> anyhow::Result<()> {
    let dir = dest.parent().context("path without parent")?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".rstargz-tmp-")
        .tempfile_in(dir)?;
    tmp.write_all(body)?;
    tmp.as_file().sync_data()?;
    tmp.persist(dest)
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dir_and_tag() {
        let r = LayoutRef::parse("/tmp/x:v1").unwrap();
        assert_eq!(r.dir, PathBuf::from("/tmp/x"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r = LayoutRef::parse("/tmp/x").unwrap();
        assert_eq!(r.tag, None);
        let r = LayoutRef::parse("rel/dir").unwrap();
        assert_eq!(r.dir, PathBuf::from("rel/dir"));
        // A colon inside the path is not a tag.
        let r = LayoutRef::parse("/a:b/c").unwrap();
        assert_eq!(r.dir, PathBuf::from("/a:b/c"));
        assert!(LayoutRef::parse("").is_err());
        assert!(LayoutRef::parse("/x:").is_err());
        assert_eq!(
            LayoutRef::parse("/tmp/x:v1").unwrap().to_string(),
            "oci:/tmp/x:v1"
        );
    }

    #[test]
    fn writes_and_reads_back_a_tagged_entry() {
        let d = tempfile::tempdir().unwrap();
        let r = LayoutRef::parse(&format!("{}:t1", d.path().display())).unwrap();
        r.init_dest().unwrap();
        let m = br#"{"schemaVersion":2}"#;
        let digest = r.put_blob_bytes(m).unwrap();
        r.set_index_entry(crate::convert::OCI_MANIFEST, &digest, m.len() as u64, None)
            .unwrap();
        // Re-tagging replaces the entry rather than adding one.
        r.set_index_entry(crate::convert::OCI_MANIFEST, &digest, m.len() as u64, None)
            .unwrap();
        let top = r.top_descriptor().unwrap();
        assert_eq!(top["digest"], digest.as_str());
        assert_eq!(
            read_index(d.path()).unwrap()["manifests"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            &r.read_json_blob(&digest, Some(m.len() as u64)).unwrap()[..],
            m
        );
        // A corrupt blob is a digest mismatch.
        std::fs::write(r.blob_path(&digest).unwrap(), br#"{"schemaVersion":3}"#).unwrap();
        let e = r.read_json_blob(&digest, None).unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
        let other = LayoutRef::parse(&format!("{}:nope", d.path().display())).unwrap();
        assert!(other.top_descriptor().is_err());
    }
}
