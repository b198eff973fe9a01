//! Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`)
//! from tar layers, with no Docker: each layer is gzipped while its DiffID
//! (digest of the tar) and digest (digest of the gzip) are computed in the
//! same pass.
//!
//! [`debian_image`] is the image the end-to-end tests use: the debootstrap
//! rootfs as layer 1 and a small layer 2 with [`HELLO_PATH`],
//! [`SCRIPT_PATH`] and a whiteout of [`WHITEOUT_PATH`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::Digest;

use super::rootfs::{self, RootfsTar};

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Added by layer 2 of [`debian_image`].
pub const HELLO_PATH: &str = "/hello.txt";
pub const HELLO_CONTENT: &str = "hello from the second layer of the rstargz e2e image\n";
/// An executable script added by layer 2; prints [`SCRIPT_OUTPUT`].
pub const SCRIPT_PATH: &str = "/usr/local/bin/rstargz-hello";
pub const SCRIPT_OUTPUT: &str = "rstargz-hello: ok";
/// Present in layer 1, deleted by a whiteout in layer 2.
pub const WHITEOUT_PATH: &str = "/etc/issue.net";

pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One entry of an in-memory layer.
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// Deletes `path` from the layers below (`.wh.<name>`).
    Whiteout {
        path: String,
    },
}

/// Where a layer's tar comes from.
pub enum Layer {
    TarFile(PathBuf),
    Entries(Vec<Entry>),
}

#[derive(Clone, Debug)]
pub struct BuiltLayer {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
}

/// An image layout on disk, and what was written into it.
#[derive(Clone, Debug)]
pub struct OciLayout {
    pub dir: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub config: Value,
    pub layers: Vec<BuiltLayer>,
}

/// Writes an OCI layout in `dir` (created if missing) holding one image
/// tagged `tag`, for linux/amd64, with `cmd` as its `Cmd`.
pub fn build_oci_layout(dir: &Path, tag: &str, layers: &[Layer], cmd: &[&str]) -> OciLayout {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("create blobs dir");
    let mut built = Vec::new();
    for l in layers {
        let b = match l {
            Layer::TarFile(p) => {
                write_gzip_layer(&blobs, std::fs::File::open(p).expect("open layer tar"))
            }
            Layer::Entries(es) => write_gzip_layer(&blobs, &tar_of(es)[..]),
        };
        built.push(b);
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": built.iter().map(|b| b.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": built.iter().enumerate().map(|(i, _)| json!({
            "created_by": format!("rstargz test harness, layer {}", i + 1),
        })).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let (config_digest, config_size) = write_blob(&blobs, &config_bytes);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": built.iter().map(|b| json!({
            "mediaType": MEDIA_LAYER_GZIP, "digest": b.digest, "size": b.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
    let (manifest_digest, manifest_size) = write_blob(&blobs, &manifest_bytes);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index json"),
    )
    .expect("write index.json");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    OciLayout {
        dir: dir.to_path_buf(),
        tag: tag.to_string(),
        manifest_digest,
        config_digest,
        config,
        layers: built,
    }
}

/// The test image: Debian rootfs + the extra layer, and the rootfs it came
/// from (for comparing what containers see).
pub struct DebianImage {
    pub layout: OciLayout,
    pub rootfs: RootfsTar,
}

pub fn debian_image(dir: &Path, tag: &str) -> DebianImage {
    let rootfs = rootfs::debian_rootfs();
    let layout = build_oci_layout(
        dir,
        tag,
        &[
            Layer::TarFile(rootfs.path.clone()),
            Layer::Entries(extra_layer()),
        ],
        &["/bin/bash"],
    );
    DebianImage { layout, rootfs }
}

/// Layer 2 of [`debian_image`].
pub fn extra_layer() -> Vec<Entry> {
    let script = format!("#!/bin/sh\necho {SCRIPT_OUTPUT}\n");
    let (wh_dir, wh_name) = WHITEOUT_PATH.rsplit_once('/').expect("whiteout path");
    vec![
        Entry::File {
            path: HELLO_PATH.into(),
            mode: 0o644,
            data: HELLO_CONTENT.into(),
        },
        Entry::Dir {
            path: "/usr".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "/usr/local".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "/usr/local/bin".into(),
            mode: 0o755,
        },
        Entry::File {
            path: SCRIPT_PATH.into(),
            mode: 0o755,
            data: script.into_bytes(),
        },
        Entry::Dir {
            path: "/etc".into(),
            mode: 0o755,
        },
        Entry::Whiteout {
            path: format!("{wh_dir}/.wh.{wh_name}"),
        },
    ]
}

/// A tar (PAX-free ustar/GNU) of `entries`, owned by root, mtime fixed.
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let (path, data): (String, &[u8]) = match e {
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (format!("{}/", rootfs::normalize(path)), &[])
            }
            Entry::File { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (rootfs::normalize(path), data)
            }
            Entry::Whiteout { path } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (rootfs::normalize(path), &[])
            }
        };
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &path, data)
            .expect("append tar entry");
    }
    b.into_inner().expect("finish tar")
}

/// Gzips `tar` into `blobs/<digest>`; returns the digests.
fn write_gzip_layer(blobs: &Path, mut tar: impl Read) -> BuiltLayer {
    let tmp = tempfile::NamedTempFile::new_in(blobs).expect("temp blob");
    let mut gz = flate2::write::GzEncoder::new(
        HashingWriter::new(tmp.reopen().expect("reopen temp blob")),
        flate2::Compression::default(),
    );
    let mut diff = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = tar.read(&mut buf).expect("read layer tar");
        if n == 0 {
            break;
        }
        diff.update(&buf[..n]);
        gz.write_all(&buf[..n]).expect("gzip layer");
    }
    let mut w = gz.finish().expect("finish gzip");
    w.inner.flush().expect("flush blob");
    let digest = format!("sha256:{}", hex::encode(w.hash.finalize_reset()));
    let hex = digest.trim_start_matches("sha256:");
    tmp.persist(blobs.join(hex)).expect("persist blob");
    BuiltLayer {
        digest,
        diff_id: format!("sha256:{}", hex::encode(diff.finalize())),
        size: w.len,
    }
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> (String, u64) {
    let d = super::sha256_digest(bytes);
    std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).expect("write blob");
    (d, bytes.len() as u64)
}

struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: sha2::Sha256::new(),
            len: 0,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `len` incompressible bytes (xorshift), different for each `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x: u64 = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A layer with `/<dir>/fNN` for NN in `0..files`, each `size` bytes of
/// [`noise`] seeded with NN: content nothing else in a test shares.
pub fn noise_files_layer(dir: &str, files: usize, size: usize) -> Vec<Entry> {
    let mut es = vec![Entry::Dir {
        path: format!("/{dir}"),
        mode: 0o755,
    }];
    for i in 0..files {
        es.push(Entry::File {
            path: noise_file(dir, i),
            mode: 0o644,
            data: noise(i as u64, size),
        });
    }
    es
}

/// Path of file `i` of [`noise_files_layer`].
pub fn noise_file(dir: &str, i: usize) -> String {
    format!("/{dir}/f{i:02}")
}

/// The Debian rootfs with `top` as a second layer, pushed to `registry` as
/// `<name>/src:1` and converted by `rstargz convert --level 1` (plus
/// `extra` flags) into `<name>/esgz:1`, whose reference is returned.
pub fn push_estargz(
    registry: &mut super::registry::Registry,
    name: &str,
    top: Vec<Entry>,
    extra: &[&str],
) -> String {
    let rootfs = super::rootfs::debian_rootfs();
    push_estargz_layers(
        registry,
        name,
        vec![Layer::TarFile(rootfs.path.clone()), Layer::Entries(top)],
        extra,
    )
}

/// Builds an image of `layers`, pushes it as `<name>/src:1` and converts
/// it with `rstargz convert` (plus `extra` flags) to `<name>/esgz:1`;
/// returns the converted reference.
pub fn push_estargz_layers(
    registry: &mut super::registry::Registry,
    name: &str,
    layers: Vec<Layer>,
    extra: &[&str],
) -> String {
    let layout = super::temp_dir("layout");
    build_oci_layout(layout.path(), "1", &layers, &["/bin/sh"]);
    let src = registry.push_oci_layout(layout.path(), "1", &format!("{name}/src"));
    let dst = registry.reference(&format!("{name}/esgz"), "1");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(["convert", "--plain-http", "--level", "1"])
        .args(extra)
        .args([&src, &dst])
        .output()
        .expect("run rstargz convert");
    assert!(
        o.status.success(),
        "rstargz convert {src} {dst}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dst
}
