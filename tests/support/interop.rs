//! eStargz blobs made by the reference implementation: fetch an image into a
//! private containerd, convert it with Debian's `ctr-remote image convert
//! --estargz --oci`, push the result and read back each layer blob with its
//! `containerd.io/snapshot/stargz/toc.digest` annotation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::containerd::Containerd;
use super::registry::Registry;

pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// One layer of the converted image, saved on disk.
#[derive(Clone, Debug)]
pub struct ConvertedLayer {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// The config's `rootfs.diff_ids` entry for this layer.
    pub diff_id: String,
    /// The TOC digest annotation, if the converter set one.
    pub toc_digest: Option<String>,
    pub annotations: BTreeMap<String, String>,
    /// The blob, as served by the registry.
    pub blob: PathBuf,
}

#[derive(Debug)]
pub struct Converted {
    /// `127.0.0.1:<port>/<name>:<tag>` of the converted image.
    pub reference: String,
    pub manifest: Value,
    pub config: Value,
    pub layers: Vec<ConvertedLayer>,
    /// Wall time of the `ctr-remote image convert` call.
    pub convert_time: Duration,
}

/// Converts `src` (already in `registry`) to eStargz as `<name>:<tag>` and
/// saves the layer blobs under `out`.
pub fn convert_to_estargz(
    ctrd: &Containerd,
    registry: &Registry,
    src: &str,
    name: &str,
    tag: &str,
    out: &Path,
) -> Converted {
    convert_to_estargz_with(ctrd, registry, src, name, tag, out, &[])
}

/// [`convert_to_estargz`] with extra `ctr-remote image convert` flags, e.g.
/// `--estargz-compression-level 1` where the compression ratio is moot.
pub fn convert_to_estargz_with(
    ctrd: &Containerd,
    registry: &Registry,
    src: &str,
    name: &str,
    tag: &str,
    out: &Path,
    extra: &[&str],
) -> Converted {
    let dst = registry.reference(name, tag);
    ctrd.ctr_timeout(
        &["content", "fetch", "--plain-http", src],
        Duration::from_secs(300),
    );
    let start = Instant::now();
    let mut args = vec!["images", "convert", "--estargz", "--oci"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, &dst]);
    ctrd.ctr_remote_timeout(&args, Duration::from_secs(600));
    let convert_time = start.elapsed();
    ctrd.ctr_timeout(
        &["images", "push", "--plain-http", &dst],
        Duration::from_secs(300),
    );
    fetch_image(registry, name, tag, out, convert_time, dst)
}

fn fetch_image(
    registry: &Registry,
    name: &str,
    tag: &str,
    out: &Path,
    convert_time: Duration,
    reference: String,
) -> Converted {
    let (body, _) = registry.manifest(name, tag);
    let mut manifest: Value = serde_json::from_slice(&body).expect("manifest json");
    if manifest.get("manifests").is_some() {
        // An index: take the linux/amd64 manifest.
        let d = manifest["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .and_then(|m| m["digest"].as_str())
            .expect("linux/amd64 manifest in index")
            .to_string();
        let (body, _) = registry.manifest(name, &d);
        manifest = serde_json::from_slice(&body).expect("manifest json");
    }
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config: Value =
        serde_json::from_slice(&registry.blob(name, config_digest)).expect("config json");
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff_id").to_string())
        .collect();
    let descs = manifest["layers"].as_array().expect("layers").clone();
    assert_eq!(descs.len(), diff_ids.len(), "layers vs diff_ids");
    std::fs::create_dir_all(out).expect("create out dir");
    let layers = descs
        .iter()
        .zip(diff_ids)
        .map(|(d, diff_id)| {
            let digest = d["digest"].as_str().expect("layer digest").to_string();
            let blob = out.join(digest.replace(':', "-"));
            registry.blob_to_file(name, &digest, &blob);
            let annotations: BTreeMap<String, String> = d["annotations"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            ConvertedLayer {
                toc_digest: annotations.get(TOC_DIGEST_ANNOTATION).cloned(),
                media_type: d["mediaType"].as_str().unwrap_or_default().to_string(),
                size: d["size"].as_u64().expect("layer size"),
                digest,
                diff_id,
                annotations,
                blob,
            }
        })
        .collect();
    Converted {
        reference,
        manifest,
        config,
        layers,
        convert_time,
    }
}

/// `sha256:` of the decompressed stream of a gzip blob (all members): the
/// layer's DiffID.
pub fn gzip_diff_id(blob: &Path) -> String {
    use sha2::Digest;
    let f = std::fs::File::open(blob).expect("open blob");
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut d, &mut buf).expect("gunzip blob");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Regular files of a gzip tar blob, without the eStargz metadata entries
/// (`stargz.index.json`, the prefetch landmarks).
pub fn gzip_regular_files(blob: &Path) -> BTreeMap<String, String> {
    let f = std::fs::File::open(blob).expect("open blob");
    let mut m = super::rootfs::regular_files_of(flate2::read::MultiGzDecoder::new(
        std::io::BufReader::new(f),
    ));
    for meta in [
        "stargz.index.json",
        ".prefetch.landmark",
        ".no.prefetch.landmark",
    ] {
        m.remove(meta);
    }
    m
}

/// The raw bytes of the TOC (`stargz.index.json`) inside an eStargz blob,
/// found by reading the whole decompressed tar stream (independent of the
/// footer and of our reader).
pub fn toc_bytes(blob: &Path) -> Vec<u8> {
    use std::io::Read;
    let f = std::fs::File::open(blob).expect("open blob");
    let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
        f,
    )));
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        if e.path().expect("path").to_string_lossy() == "stargz.index.json" {
            let mut v = Vec::new();
            e.read_to_end(&mut v).expect("read TOC");
            return v;
        }
    }
    panic!("{}: no stargz.index.json entry", blob.display());
}
