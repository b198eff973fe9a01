//! Image conversion: a registry image in, an eStargz image out.
//!
//! [`convert`] resolves the source (Docker schema 2 or OCI; an index gives
//! the configured platform), streams every layer into a private temp
//! directory (digest checked while it streams, never whole in memory),
//! rebuilds each layer with [`crate::estargz::writer`] (already-eStargz
//! layers are kept), and pushes: layer blobs as they are ready, then the
//! config, then the manifest **last**, so that a failure leaves no manifest
//! that points at a missing blob. Nothing is pushed before the source
//! resolved and its config downloaded.
//!
//! Output is an OCI manifest with `tar+gzip` layers annotated with the TOC
//! digest and the uncompressed size; the config's `rootfs.diff_ids` are the
//! new layers' DiffIDs (the TOC entry changes the uncompressed stream). The
//! JSON is written from ordered types, so the same input and options give
//! the same manifest digest.
//!
//! Threads: at most [`ConvertOptions::layer_jobs`] layers are in flight;
//! each build gets `cpus / layer_jobs` (at least 1) compression threads.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::estargz::footer::{self, FOOTER_SIZE, FooterKind};
use crate::estargz::writer::{self, BuildOptions};
use crate::estargz::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
use crate::fs::registry::{Descriptor, Reference, RegistryClient};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type (what eStargz layers are).
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Largest image config accepted, bytes.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Writer options (chunk sizes, level). `threads` is set per layer.
    pub build: BuildOptions,
    /// Layers downloaded, converted and pushed at once.
    pub layer_jobs: usize,
    /// Where the temp directory goes (`None`: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Prioritized files per layer index (base first), from
    /// `rstargz optimize`. When set, every layer is rebuilt (eStargz ones
    /// too, to reorder them) and layers without an entry get the
    /// no-prefetch landmark.
    pub prioritized: Option<BTreeMap<usize, Vec<String>>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            build: BuildOptions::default(),
            layer_jobs: 2,
            work_dir: None,
            progress: false,
            prioritized: None,
        }
    }
}

/// One layer, before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerReport {
    pub digest_in: String,
    pub size_in: u64,
    pub media_type_in: String,
    pub digest_out: String,
    pub size_out: u64,
    pub toc_digest: String,
    pub diff_id: String,
    pub uncompressed_size: Option<u64>,
    /// The layer was eStargz already and was kept as is.
    pub kept: bool,
    /// The blob was uploaded (false: the registry had it).
    pub uploaded: bool,
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    pub source: String,
    pub source_manifest: String,
    pub destination: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<LayerReport>,
    pub size_in: u64,
    pub size_out: u64,
    pub seconds: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutDescriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutManifest {
    schema_version: u32,
    media_type: &'static str,
    config: OutDescriptor,
    layers: Vec<OutDescriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// Converts `src` to eStargz and pushes it as `dst` (a tag). The client's
/// `platform` picks the manifest from an index.
pub async fn convert(
    client: &RegistryClient,
    src: &Reference,
    dst: &Reference,
    opts: &ConvertOptions,
) -> anyhow::Result<ConvertReport> {
    let started = Instant::now();
    if dst.digest.is_some() {
        bail!("destination {dst} must be a tag, not a digest");
    }
    let tag = dst.tag.clone().unwrap_or_else(|| "latest".to_owned());
    let resolved = client
        .resolve(src)
        .await
        .with_context(|| format!("resolving source {src}"))?;
    let manifest = resolved.manifest;
    let tmp = match &opts.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("rstargz-convert-")
            .tempdir_in(d),
        None => tempfile::Builder::new()
            .prefix("rstargz-convert-")
            .tempdir(),
    }
    .context("creating the work directory")?;

    // The config first: nothing is pushed unless the source is readable.
    if manifest.config.size > MAX_CONFIG_BYTES {
        bail!(
            "image config of {} bytes is too large",
            manifest.config.size
        );
    }
    let cfg_path = tmp.path().join("config.json");
    let mut f = File::create(&cfg_path)?;
    client
        .blob_to_file(src, &manifest.config.digest, manifest.config.size, &mut f)
        .await
        .with_context(|| format!("fetching config {}", manifest.config.digest))?;
    drop(f);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path)?).context("parsing the image config")?;
    let old_diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if old_diff_ids.len() != manifest.layers.len() {
        bail!(
            "config lists {} diff_ids for {} layers",
            old_diff_ids.len(),
            manifest.layers.len()
        );
    }
    for l in &manifest.layers {
        if l.media_type.contains("zstd") || !l.urls.is_empty() {
            bail!(
                "layer {} ({}) is not supported: only tar and tar+gzip layers without foreign URLs",
                l.digest,
                l.media_type
            );
        }
    }

    let jobs = opts.layer_jobs.max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut build = opts.build.clone();
    build.threads = cpus.div_ceil(jobs).max(1);
    let sem = Arc::new(Semaphore::new(jobs));
    let n_layers = manifest.layers.len();
    let mut set = tokio::task::JoinSet::new();
    for (i, desc) in manifest.layers.iter().cloned().enumerate() {
        let ctx = LayerJob {
            client: client.clone(),
            src: src.clone(),
            dst: dst.clone(),
            dir: tmp.path().to_owned(),
            build: build.clone(),
            old_diff_id: old_diff_ids[i].clone(),
            progress: opts.progress,
            prioritized: opts
                .prioritized
                .as_ref()
                .map(|p| p.get(&i).cloned().unwrap_or_default()),
            label: format!("layer {}/{n_layers}", i + 1),
        };
        let sem = Arc::clone(&sem);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let r = ctx.run(i, desc).await;
            anyhow::Ok((i, r?))
        });
    }
    let mut layers: Vec<Option<LayerReport>> = vec![None; n_layers];
    while let Some(joined) = set.join_next().await {
        match joined.context("layer task panicked")? {
            Ok((i, r)) => layers[i] = Some(r),
            Err(e) => {
                set.abort_all();
                return Err(e);
            }
        }
    }
    let layers: Vec<LayerReport> = layers.into_iter().flatten().collect();

    // Config with the new DiffIDs.
    if let Some(ids) = config.pointer_mut("/rootfs/diff_ids") {
        *ids = serde_json::Value::Array(
            layers
                .iter()
                .map(|l| serde_json::Value::String(l.diff_id.clone()))
                .collect(),
        );
    }
    let cfg_bytes = Bytes::from(serde_json::to_vec(&config)?);
    let cfg_digest = sha256(&cfg_bytes);
    std::fs::write(&cfg_path, &cfg_bytes)?;
    client
        .push_blob_file(dst, &cfg_digest, cfg_bytes.len() as u64, &cfg_path)
        .await
        .context("pushing the config")?;

    let out = OutManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: OutDescriptor {
            media_type: OCI_CONFIG.to_owned(),
            digest: cfg_digest.clone(),
            size: cfg_bytes.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: manifest
            .layers
            .iter()
            .zip(&layers)
            .map(|(d, l)| {
                let mut annotations: BTreeMap<String, String> = d
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                annotations.insert(TOC_DIGEST_ANNOTATION.to_owned(), l.toc_digest.clone());
                if let Some(u) = l.uncompressed_size {
                    annotations.insert(UNCOMPRESSED_SIZE_ANNOTATION.to_owned(), u.to_string());
                }
                OutDescriptor {
                    media_type: OCI_LAYER_GZIP.to_owned(),
                    digest: l.digest_out.clone(),
                    size: l.size_out,
                    annotations,
                }
            })
            .collect(),
        annotations: manifest
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let body = Bytes::from(serde_json::to_vec(&out)?);
    // Last: every blob it names is in the registry now.
    let manifest_digest = client
        .push_manifest(dst, &tag, OCI_MANIFEST, body)
        .await
        .with_context(|| format!("pushing the manifest {dst}"))?;
    if opts.progress {
        eprintln!("pushed {dst} ({manifest_digest})");
    }
    Ok(ConvertReport {
        source: src.to_string(),
        source_manifest: resolved.digest,
        destination: dst.to_string(),
        manifest_digest,
        config_digest: cfg_digest,
        size_in: layers.iter().map(|l| l.size_in).sum(),
        size_out: layers.iter().map(|l| l.size_out).sum(),
        layers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

struct LayerJob {
    client: RegistryClient,
    src: Reference,
    dst: Reference,
    dir: PathBuf,
    build: BuildOptions,
    old_diff_id: String,
    progress: bool,
    label: String,
    prioritized: Option<Vec<String>>,
}

impl LayerJob {
    async fn run(self, i: usize, desc: Descriptor) -> anyhow::Result<LayerReport> {
        let t = Instant::now();
        let in_path = self.dir.join(format!("layer-{i}.in"));
        let mut f = File::create(&in_path)?;
        self.client
            .blob_to_file(&self.src, &desc.digest, desc.size, &mut f)
            .await
            .with_context(|| format!("fetching {} {}", self.label, desc.digest))?;
        drop(f);
        if self.progress {
            eprintln!(
                "{}: fetched {} ({} bytes) in {:.1?}",
                self.label,
                desc.digest,
                desc.size,
                t.elapsed()
            );
        }
        let t = Instant::now();
        let out_path = self.dir.join(format!("layer-{i}.esgz"));
        let (mut build, old_diff_id) = (self.build.clone(), self.old_diff_id.clone());
        let rebuild = self.prioritized.is_some();
        build.prioritized_files = self.prioritized.clone().unwrap_or_default();
        let (d, ip, op) = (desc.clone(), in_path.clone(), out_path.clone());
        let mut report = tokio::task::spawn_blocking(move || {
            convert_layer(&d, &ip, &op, &build, old_diff_id, rebuild)
        })
        .await
        .context("conversion task panicked")?
        .with_context(|| format!("converting {} {}", self.label, desc.digest))?;
        let upload_path = if report.kept { &in_path } else { &out_path };
        if self.progress {
            eprintln!(
                "{}: {} -> {} ({} bytes{}) in {:.1?}",
                self.label,
                desc.digest,
                report.digest_out,
                report.size_out,
                if report.kept { ", kept" } else { "" },
                t.elapsed()
            );
        }
        report.uploaded = self
            .client
            .push_blob_file(&self.dst, &report.digest_out, report.size_out, upload_path)
            .await
            .with_context(|| format!("pushing {} {}", self.label, report.digest_out))?;
        let _ = std::fs::remove_file(&in_path);
        let _ = std::fs::remove_file(&out_path);
        Ok(report)
    }
}

/// Converts one downloaded layer, or keeps it when it is eStargz already
/// (TOC-digest annotation and a valid eStargz footer).
fn convert_layer(
    desc: &Descriptor,
    input: &Path,
    output: &Path,
    opts: &BuildOptions,
    old_diff_id: String,
    rebuild: bool,
) -> anyhow::Result<LayerReport> {
    if !rebuild
        && let Some(toc) = desc.toc_digest()
        && has_estargz_footer(input, desc.size)?
    {
        return Ok(LayerReport {
            digest_in: desc.digest.clone(),
            size_in: desc.size,
            media_type_in: desc.media_type.clone(),
            digest_out: desc.digest.clone(),
            size_out: desc.size,
            toc_digest: toc.to_owned(),
            diff_id: old_diff_id,
            uncompressed_size: desc
                .annotations
                .get(UNCOMPRESSED_SIZE_ANNOTATION)
                .and_then(|v| v.parse().ok()),
            kept: true,
            uploaded: false,
        });
    }
    let inp = File::open(input)?;
    let out = File::create(output)?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let res = writer::build_file(inp, &mut w, opts)?;
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(LayerReport {
        digest_in: desc.digest.clone(),
        size_in: desc.size,
        media_type_in: desc.media_type.clone(),
        digest_out: res.blob_digest,
        size_out: res.compressed_size,
        toc_digest: res.toc_digest,
        diff_id: res.diff_id,
        uncompressed_size: Some(res.uncompressed_size),
        kept: false,
        uploaded: false,
    })
}

fn has_estargz_footer(path: &Path, size: u64) -> anyhow::Result<bool> {
    if size < FOOTER_SIZE as u64 {
        return Ok(false);
    }
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(size - FOOTER_SIZE as u64))?;
    let mut tail = [0u8; FOOTER_SIZE];
    f.read_exact(&mut tail)?;
    Ok(footer::parse(&tail, size).is_ok_and(|ft| ft.kind == FooterKind::Estargz))
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_json_is_ordered_and_stable() {
        let m = OutManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config: OutDescriptor {
                media_type: OCI_CONFIG.into(),
                digest: "sha256:00".into(),
                size: 1,
                annotations: BTreeMap::new(),
            },
            layers: vec![OutDescriptor {
                media_type: OCI_LAYER_GZIP.into(),
                digest: "sha256:11".into(),
                size: 2,
                annotations: [("b".to_owned(), "2".to_owned()), ("a".into(), "1".into())]
                    .into_iter()
                    .collect(),
            }],
            annotations: BTreeMap::new(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:11","size":2,"annotations":{"a":"1","b":"2"}}]}"#
        );
    }

    #[test]
    fn footer_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        let mut blob = vec![0u8; 100];
        blob.extend_from_slice(&footer::build(10));
        std::fs::write(&p, &blob).unwrap();
        assert!(has_estargz_footer(&p, blob.len() as u64).unwrap());
        std::fs::write(&p, vec![0u8; 100]).unwrap();
        assert!(!has_estargz_footer(&p, 100).unwrap());
    }
}
