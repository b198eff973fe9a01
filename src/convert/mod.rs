//! Image conversion: an image in, an eStargz image out.
//!
//! [`convert_image`] reads the source (a registry repository or an OCI
//! layout, see [`endpoint`]; Docker schema 2 or OCI; an index gives the
//! configured platform, or every platform with
//! [`ConvertOptions::all_platforms`]), streams every layer into a private
//! temp directory (digest checked while it streams, never whole in memory),
//! rebuilds each layer with [`crate::estargz::writer`], and pushes: layer
//! blobs as they are ready, then the config, then the manifest, and for a
//! whole index the index **last**, so that a failure leaves no manifest
//! that points at a missing blob. Nothing is pushed before the source
//! resolved and its config downloaded.
//!
//! Layers that are eStargz already (TOC-digest annotation and a valid
//! footer, read with one range request) are kept as they are: skipped when
//! the destination has them, mounted from the source repository when both
//! are on one registry, copied otherwise.
//!
//! Output is an OCI manifest with `tar+gzip` layers annotated with the TOC
//! digest and the uncompressed size; the config's `rootfs.diff_ids` are the
//! new layers' DiffIDs (the TOC entry changes the uncompressed stream). The
//! JSON is written from ordered types, so the same input and options give
//! the same manifest digest.
//!
//! Threads: at most [`ConvertOptions::layer_jobs`] layers are in flight;
//! each build gets `cpus / layer_jobs` (at least 1) compression threads.

pub mod endpoint;
pub mod layout;
mod progress;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::estargz::footer::{self, FOOTER_SIZE, FooterKind};
use crate::estargz::writer::{self, BuildOptions};
use crate::estargz::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
use crate::fs::registry::manifest::{DOCKER_MANIFEST, is_index, parse_manifest, platform_matches};
use crate::fs::registry::{Descriptor, Manifest, Reference, RegistryClient};

pub use endpoint::ImageLocation;
use endpoint::{Dest, Source};
use progress::{LayerBar, Progress};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = layout::OCI_INDEX;
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type (what eStargz layers are).
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Largest image config accepted, bytes.
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Index entries that are not images (BuildKit attestations) are dropped.
const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Writer options (chunk sizes, level). `threads` is set per layer;
    /// `prioritized_files` is taken from [`ConvertOptions::prioritized`].
    pub build: BuildOptions,
    /// Layers downloaded, converted and pushed at once.
    pub layer_jobs: usize,
    /// Where the temp directory goes (`None`: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// Progress bars on stderr.
    pub progress: bool,
    /// Convert every platform of an index and push an index (otherwise the
    /// client's configured platform is picked and one manifest pushed).
    pub all_platforms: bool,
    /// Prioritized files per source layer digest (`rstargz optimize`): those
    /// layers are rebuilt with these paths first, in this order, even when
    /// they are eStargz already.
    pub prioritized: BTreeMap<String, Vec<String>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            build: BuildOptions::default(),
            layer_jobs: 2,
            work_dir: None,
            progress: false,
            all_platforms: false,
            prioritized: BTreeMap::new(),
        }
    }
}

/// One layer, before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The blob was uploaded (false: the destination had it, or it was
    /// mounted).
    pub uploaded: bool,
    /// The blob was mounted from the source repository.
    pub mounted: bool,
    /// Seconds from the start of this layer's download to its push.
    pub seconds: f64,
}

/// One image (platform) of a conversion.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    /// `os/arch[/variant]`, when the source was an index.
    pub platform: Option<String>,
    pub source_manifest: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub config_digest: String,
    pub layers: Vec<LayerReport>,
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    pub source: String,
    /// Digest of what SRC names (a manifest or an index).
    pub source_manifest: String,
    pub destination: String,
    /// Digest of what was pushed under DST (a manifest or an index).
    pub manifest_digest: String,
    pub media_type: String,
    /// Config of the first image.
    pub config_digest: String,
    /// Every layer of every image, in order.
    pub layers: Vec<LayerReport>,
    /// Per image (one unless `all_platforms` met an index).
    pub images: Vec<ImageSummary>,
    pub size_in: u64,
    pub size_out: u64,
    pub seconds: f64,
}

/// [`ImageReport`] without its layers (they are in [`ConvertReport::layers`]).
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub platform: Option<String>,
    pub source_manifest: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Index of its first layer in [`ConvertReport::layers`].
    pub first_layer: usize,
    pub layer_count: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutDescriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<OutPlatform>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// An index entry's platform, fields in a fixed order.
#[derive(Serialize, Clone)]
struct OutPlatform {
    architecture: String,
    os: String,
    #[serde(rename = "os.version", skip_serializing_if = "Option::is_none")]
    os_version: Option<String>,
    #[serde(rename = "os.features", skip_serializing_if = "Option::is_none")]
    os_features: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
}

impl OutPlatform {
    fn from_json(v: &serde_json::Value) -> Option<Self> {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        Some(Self {
            architecture: s("architecture")?,
            os: s("os")?,
            os_version: s("os.version"),
            os_features: v.get("os.features").and_then(|f| {
                f.as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
            }),
            variant: s("variant"),
        })
    }

    fn name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutIndex {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<OutDescriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// Converts registry image `src` to eStargz and pushes it as `dst` (a
/// tag). The client's `platform` picks the manifest from an index.
pub async fn convert(
    client: &RegistryClient,
    src: &Reference,
    dst: &Reference,
    opts: &ConvertOptions,
) -> anyhow::Result<ConvertReport> {
    convert_image(
        client,
        &ImageLocation::Registry(src.clone()),
        &ImageLocation::Registry(dst.clone()),
        opts,
    )
    .await
}

/// Everything one conversion shares.
struct Ctx {
    src: Source,
    dst: Dest,
    dir: PathBuf,
    opts: ConvertOptions,
    progress: Progress,
    /// Set when the conversion is dropped (error, interrupt): layer builds
    /// on blocking threads see it at their next write and stop.
    cancel: Arc<AtomicBool>,
}

/// Sets the flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A writer that fails once `cancel` is set, so that a blocking layer
/// build ends soon after its conversion was abandoned.
struct CancellableWriter<W> {
    inner: W,
    cancel: Arc<AtomicBool>,
}

impl<W: Write> Write for CancellableWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("conversion cancelled"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Converts `src` (registry or OCI layout) and writes it to `dst`.
pub async fn convert_image(
    client: &RegistryClient,
    src: &ImageLocation,
    dst: &ImageLocation,
    opts: &ConvertOptions,
) -> anyhow::Result<ConvertReport> {
    let started = Instant::now();
    let source = Source {
        client: client.clone(),
        loc: src.clone(),
    };
    let (top_digest, top_body) = source
        .top_manifest()
        .await
        .with_context(|| format!("resolving source {src}"))?;
    let dest = Dest::open(client.clone(), dst.clone())
        .await
        .with_context(|| format!("opening destination {dst}"))?;
    let tmp = match &opts.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("rstargz-convert-")
            .tempdir_in(d),
        None => tempfile::Builder::new()
            .prefix("rstargz-convert-")
            .tempdir(),
    }
    .context("creating the work directory")?;
    let ctx = Ctx {
        src: source,
        dst: dest,
        dir: tmp.path().to_owned(),
        opts: opts.clone(),
        progress: Progress::new(opts.progress),
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let _cancel_guard = CancelOnDrop(Arc::clone(&ctx.cancel));

    let (images, manifest_digest, media_type) =
        if is_index(&top_body).with_context(|| format!("parsing the manifest of {src}"))? {
            convert_index(&ctx, &top_body, src, client).await?
        } else {
            let m = parse_manifest(&top_body)
                .with_context(|| format!("parsing the manifest of {src}"))?;
            let img = convert_one(&ctx, &m, &top_digest, None, true).await?;
            let d = img.manifest_digest.clone();
            (vec![img], d, OCI_MANIFEST.to_owned())
        };
    ctx.progress
        .println(&format!("pushed {dst} ({manifest_digest})"));
    drop(tmp);

    let mut layers = Vec::new();
    let mut summaries = Vec::new();
    for img in images {
        summaries.push(ImageSummary {
            platform: img.platform.clone(),
            source_manifest: img.source_manifest.clone(),
            manifest_digest: img.manifest_digest.clone(),
            config_digest: img.config_digest.clone(),
            first_layer: layers.len(),
            layer_count: img.layers.len(),
        });
        layers.extend(img.layers);
    }
    Ok(ConvertReport {
        source: src.to_string(),
        source_manifest: top_digest,
        destination: dst.to_string(),
        manifest_digest,
        media_type,
        config_digest: summaries
            .first()
            .map(|s| s.config_digest.clone())
            .unwrap_or_default(),
        size_in: layers.iter().map(|l| l.size_in).sum(),
        size_out: layers.iter().map(|l| l.size_out).sum(),
        layers,
        images: summaries,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// An index: one platform (pushed as a plain manifest) or all of them
/// (each manifest by digest, then the index under the tag).
async fn convert_index(
    ctx: &Ctx,
    body: &[u8],
    src: &ImageLocation,
    client: &RegistryClient,
) -> anyhow::Result<(Vec<ImageReport>, String, String)> {
    let raw: serde_json::Value = serde_json::from_slice(body).context("parsing the index")?;
    let entries: Vec<(Descriptor, Option<OutPlatform>)> = raw["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let d: Descriptor = serde_json::from_value(v.clone())?;
            Ok((d, v.get("platform").and_then(OutPlatform::from_json)))
        })
        .collect::<anyhow::Result<_>>()
        .context("parsing the index entries")?;
    let is_image = |d: &Descriptor| {
        (d.media_type == OCI_MANIFEST || d.media_type == DOCKER_MANIFEST)
            && !d.annotations.contains_key(REFERENCE_TYPE_ANNOTATION)
    };
    if !ctx.opts.all_platforms {
        let want = &client.config().platform;
        let (d, p) = entries
            .into_iter()
            .find(|(d, _)| is_image(d) && platform_matches(&d.platform, want))
            .with_context(|| format!("{src}: no manifest for platform {want}"))?;
        let m = child_manifest(ctx, &d).await?;
        let img = convert_one(ctx, &m, &d.digest, p.as_ref(), true).await?;
        let digest = img.manifest_digest.clone();
        return Ok((vec![img], digest, OCI_MANIFEST.to_owned()));
    }
    let mut images = Vec::new();
    let mut out = Vec::new();
    for (d, p) in entries.iter().filter(|(d, _)| is_image(d)) {
        let m = child_manifest(ctx, d).await?;
        let img = convert_one(ctx, &m, &d.digest, p.as_ref(), false).await?;
        out.push(OutDescriptor {
            media_type: OCI_MANIFEST.to_owned(),
            digest: img.manifest_digest.clone(),
            size: img.manifest_size,
            platform: p.clone(),
            annotations: d
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
        images.push(img);
    }
    if images.is_empty() {
        bail!("{src}: the index lists no image manifests");
    }
    let index = OutIndex {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests: out,
        annotations: raw["annotations"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let body = Bytes::from(serde_json::to_vec(&index)?);
    // Last: every manifest it names is in the destination now.
    let digest = ctx
        .dst
        .push_manifest(OCI_INDEX, body, true, None)
        .await
        .with_context(|| format!("pushing the index {}", ctx.dst.loc))?;
    Ok((images, digest, OCI_INDEX.to_owned()))
}

async fn child_manifest(ctx: &Ctx, d: &Descriptor) -> anyhow::Result<Manifest> {
    let body = ctx
        .src
        .manifest(&d.digest, d.size)
        .await
        .with_context(|| format!("fetching manifest {}", d.digest))?;
    parse_manifest(&body).with_context(|| format!("parsing manifest {}", d.digest))
}

/// Converts one image manifest: layers, config, manifest (under the tag
/// when `tagged`, else by digest).
async fn convert_one(
    ctx: &Ctx,
    manifest: &Manifest,
    source_digest: &str,
    platform: Option<&OutPlatform>,
    tagged: bool,
) -> anyhow::Result<ImageReport> {
    let plat_name = platform.map(OutPlatform::name);
    let what = plat_name
        .as_deref()
        .map(|p| format!(" ({p})"))
        .unwrap_or_default();
    if manifest.config.size > MAX_CONFIG_BYTES {
        bail!(
            "image config of {} bytes is too large",
            manifest.config.size
        );
    }
    // The config first: nothing is pushed unless the source is readable.
    let cfg_path = ctx
        .dir
        .join(format!("config-{}.json", hex_of(&manifest.config.digest)));
    let mut f = File::create(&cfg_path)?;
    ctx.src
        .blob_to_file(
            &manifest.config.digest,
            manifest.config.size,
            &mut f,
            &|_| {},
        )
        .await
        .with_context(|| format!("fetching config {}{what}", manifest.config.digest))?;
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

    let jobs = ctx.opts.layer_jobs.max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut build = ctx.opts.build.clone();
    build.threads = cpus.div_ceil(jobs).max(1);
    let sem = Arc::new(Semaphore::new(jobs));
    let n_layers = manifest.layers.len();
    let mut set = tokio::task::JoinSet::new();
    for (i, desc) in manifest.layers.iter().cloned().enumerate() {
        let label = match &plat_name {
            Some(p) => format!("{p} layer {}/{n_layers}", i + 1),
            None => format!("layer {}/{n_layers}", i + 1),
        };
        let mut build = build.clone();
        let prioritized = ctx.opts.prioritized.get(&desc.digest).cloned();
        if let Some(p) = &prioritized {
            build.prioritized_files = p.clone();
        }
        let job = LayerJob {
            src: ctx.src.clone(),
            dst: ctx.dst.clone(),
            dir: ctx.dir.clone(),
            cancel: Arc::clone(&ctx.cancel),
            build,
            may_keep: prioritized.is_none(),
            old_diff_id: old_diff_ids[i].clone(),
            bar: ctx.progress.layer(&label, desc.size),
            label,
        };
        let sem = Arc::clone(&sem);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let r = job.run(i, desc).await;
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
    let cfg_size = cfg_bytes.len() as u64;
    // An unchanged config (every layer kept) can be mounted like them.
    let mounted = cfg_digest == manifest.config.digest
        && !ctx.dst.has_blob(&cfg_digest, cfg_size).await?
        && ctx.dst.mount_from(&ctx.src, &cfg_digest).await?;
    if !mounted {
        ctx.dst
            .push_blob_file(&cfg_digest, cfg_size, &cfg_path)
            .await
            .with_context(|| format!("pushing the config{what}"))?;
    }
    let _ = std::fs::remove_file(&cfg_path);

    let out = OutManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: OutDescriptor {
            media_type: OCI_CONFIG.to_owned(),
            digest: cfg_digest.clone(),
            size: cfg_bytes.len() as u64,
            platform: None,
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
                    platform: None,
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
    let manifest_size = body.len() as u64;
    // After every blob it names.
    let platform_json = platform.and_then(|p| serde_json::to_value(p).ok());
    let manifest_digest = ctx
        .dst
        .push_manifest(OCI_MANIFEST, body, tagged, platform_json.as_ref())
        .await
        .with_context(|| format!("pushing the manifest{what} to {}", ctx.dst.loc))?;
    Ok(ImageReport {
        platform: plat_name,
        source_manifest: source_digest.to_owned(),
        manifest_digest,
        manifest_size,
        config_digest: cfg_digest,
        layers,
    })
}

/// Work file name of layer `i` (unique even when a layer repeats).
fn work_stem(i: usize, digest: &str) -> String {
    let h = hex_of(digest);
    format!("layer-{i}-{}", &h[..h.len().min(12)])
}

fn hex_of(digest: &str) -> &str {
    digest.rsplit(':').next().unwrap_or(digest)
}

struct LayerJob {
    src: Source,
    dst: Dest,
    dir: PathBuf,
    cancel: Arc<AtomicBool>,
    build: BuildOptions,
    /// False when the layer must be rebuilt (prioritized files given).
    may_keep: bool,
    old_diff_id: String,
    bar: LayerBar,
    label: String,
}

impl LayerJob {
    async fn run(self, i: usize, desc: Descriptor) -> anyhow::Result<LayerReport> {
        let t = Instant::now();
        let what = format!("{} {}", self.label, desc.digest);
        // Already eStargz: decided from the footer alone, so a layer the
        // destination has (or can mount) is never downloaded.
        if self.may_keep
            && desc.toc_digest().is_some()
            && self
                .is_estargz(&desc)
                .await
                .with_context(|| format!("reading the footer of {what}"))?
        {
            return self.keep(i, &desc, t).await;
        }
        let stem = work_stem(i, &desc.digest);
        let in_path = self.dir.join(format!("{stem}.in"));
        let out_path = self.dir.join(format!("{stem}.esgz"));
        self.fetch(&desc, &in_path)
            .await
            .with_context(|| format!("fetching {what}"))?;
        self.bar.stage("converting");
        let (build, cancel) = (self.build.clone(), Arc::clone(&self.cancel));
        let (d, ip, op) = (desc.clone(), in_path.clone(), out_path.clone());
        let mut report =
            tokio::task::spawn_blocking(move || convert_layer(&d, &ip, &op, &build, cancel))
                .await
                .context("conversion task panicked")?
                .with_context(|| format!("converting {what}"))?;
        let _ = std::fs::remove_file(&in_path);
        self.bar.stage("pushing");
        report.uploaded = self
            .dst
            .push_blob_file(&report.digest_out, report.size_out, &out_path)
            .await
            .with_context(|| format!("pushing {} {}", self.label, report.digest_out))?;
        let _ = std::fs::remove_file(&out_path);
        report.seconds = t.elapsed().as_secs_f64();
        self.bar.done(&format!(
            "{} B -> {} B in {:.1}s",
            report.size_in, report.size_out, report.seconds
        ));
        Ok(report)
    }

    async fn fetch(&self, desc: &Descriptor, path: &Path) -> anyhow::Result<()> {
        self.bar.stage("fetching");
        let mut f = File::create(path)?;
        let bar = self.bar.clone();
        self.src
            .blob_to_file(&desc.digest, desc.size, &mut f, &move |n| bar.inc(n))
            .await?;
        Ok(())
    }

    async fn is_estargz(&self, desc: &Descriptor) -> anyhow::Result<bool> {
        if desc.size < FOOTER_SIZE as u64 {
            return Ok(false);
        }
        let tail = self
            .src
            .blob_tail(&desc.digest, desc.size, FOOTER_SIZE as u64)
            .await?;
        Ok(footer::parse(&tail, desc.size).is_ok_and(|ft| ft.kind == FooterKind::Estargz))
    }

    /// Keeps an eStargz layer: skip, mount, or copy it as it is.
    async fn keep(&self, i: usize, desc: &Descriptor, t: Instant) -> anyhow::Result<LayerReport> {
        let what = format!("{} {}", self.label, desc.digest);
        let mut report = LayerReport {
            digest_in: desc.digest.clone(),
            size_in: desc.size,
            media_type_in: desc.media_type.clone(),
            digest_out: desc.digest.clone(),
            size_out: desc.size,
            toc_digest: desc.toc_digest().unwrap_or_default().to_owned(),
            diff_id: self.old_diff_id.clone(),
            uncompressed_size: desc
                .annotations
                .get(UNCOMPRESSED_SIZE_ANNOTATION)
                .and_then(|v| v.parse().ok()),
            kept: true,
            uploaded: false,
            mounted: false,
            seconds: 0.0,
        };
        if self
            .dst
            .has_blob(&desc.digest, desc.size)
            .await
            .with_context(|| format!("checking the destination for {what}"))?
        {
            self.bar.done("kept (eStargz), destination has it");
        } else if self
            .dst
            .mount_from(&self.src, &desc.digest)
            .await
            .with_context(|| format!("mounting {what}"))?
        {
            report.mounted = true;
            self.bar.done("kept (eStargz), mounted");
        } else {
            let path = self
                .dir
                .join(format!("{}.keep", work_stem(i, &desc.digest)));
            self.fetch(desc, &path)
                .await
                .with_context(|| format!("fetching {what}"))?;
            self.bar.stage("pushing");
            report.uploaded = self
                .dst
                .push_blob_file(&desc.digest, desc.size, &path)
                .await
                .with_context(|| format!("pushing {what}"))?;
            let _ = std::fs::remove_file(&path);
            self.bar.done("kept (eStargz), copied");
        }
        report.seconds = t.elapsed().as_secs_f64();
        Ok(report)
    }
}

fn is_gzip(path: &Path) -> anyhow::Result<bool> {
    use std::io::Read as _;
    let mut magic = [0u8; 2];
    let n = File::open(path)?.read(&mut magic)?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Converts one downloaded layer.
fn convert_layer(
    desc: &Descriptor,
    input: &Path,
    output: &Path,
    opts: &BuildOptions,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<LayerReport> {
    // A gzip layer is decompressed next to it, in the work directory (the
    // writer would otherwise spool it to the system temp dir, which may be
    // RAM); the writer then reads the plain tar in place.
    let plain = input.with_extension("plain.tar");
    let gzip = is_gzip(input)?;
    let inp = if gzip {
        let mut dec = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(
            1 << 20,
            File::open(input)?,
        ));
        let mut tar = CancellableWriter {
            inner: BufWriter::with_capacity(1 << 20, File::create(&plain)?),
            cancel: Arc::clone(&cancel),
        };
        std::io::copy(&mut dec, &mut tar).context("decompressing the layer")?;
        tar.inner.into_inner().map_err(|e| e.into_error())?;
        std::fs::remove_file(input)?;
        File::open(&plain)?
    } else {
        File::open(input)?
    };
    let out = File::create(output)?;
    let mut w = CancellableWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        cancel,
    };
    let res = writer::build_file(inp, &mut w, opts)?;
    w.inner.into_inner().map_err(|e| e.into_error())?;
    if gzip {
        let _ = std::fs::remove_file(&plain);
    }
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
        mounted: false,
        seconds: 0.0,
    })
}

pub(crate) fn sha256(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

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

    #[test]
    fn manifest_json_is_ordered_and_stable() {
        let m = OutManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config: OutDescriptor {
                media_type: OCI_CONFIG.into(),
                digest: "sha256:00".into(),
                size: 1,
                platform: None,
                annotations: BTreeMap::new(),
            },
            layers: vec![OutDescriptor {
                media_type: OCI_LAYER_GZIP.into(),
                digest: "sha256:11".into(),
                size: 2,
                platform: None,
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

    /// A build whose conversion was abandoned stops with an error instead
    /// of running to the end (or hanging its compression threads).
    #[test]
    fn cancelled_layer_build_stops() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.tar");
        let mut b = tar::Builder::new(File::create(&input).unwrap());
        let mut x = 1u64;
        for i in 0..8 {
            let data: Vec<u8> = (0..2_000_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
        }
        b.into_inner().unwrap();
        let desc = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: "sha256:00".into(),
            size: 1,
            annotations: Default::default(),
            urls: vec![],
            platform: None,
        };
        let opts = BuildOptions {
            threads: 2,
            ..BuildOptions::default()
        };
        let out = dir.path().join("out");
        // Not cancelled: the same input converts.
        convert_layer(&desc, &input, &out, &opts, Arc::new(AtomicBool::new(false))).unwrap();
        let cancel = Arc::new(AtomicBool::new(true));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(convert_layer(&desc, &input, &out, &opts, cancel).map(|_| ()));
        });
        let res = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a cancelled build must end");
        let err = res.expect_err("a cancelled build must fail");
        assert!(format!("{err:#}").contains("cancelled"), "{err:#}");
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
