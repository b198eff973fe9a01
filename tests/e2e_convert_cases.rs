//! `rstargz convert` beyond the happy path, against a real `docker-registry`
//! on 127.0.0.1 and OCI layout directories checked with `skopeo`:
//! - `oci:DIR[:TAG]` as source and destination;
//! - a two-platform index with `--all-platforms` (index pushed last) and
//!   with `--platform`;
//! - eStargz layers kept: skipped when the destination has them, mounted
//!   across repositories of one registry, never downloaded whole;
//! - a corrupt layer fails at once naming the layer; a read-only registry
//!   refuses the push; SIGINT/SIGTERM clean up and exit 130/143; none of
//!   them leaves a manifest behind;
//! - real-world layer variants (no parent dirs, repeated paths, PAX long
//!   names, large uid, xattrs, hardlinks, whiteouts, opaque markers, and
//!   prioritized files without parents) convert correctly.
//!
//! Needs root and the tools from `scripts/deps.sh`.

mod support;
mod tar_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::image::{self, Entry, Layer};
use support::registry::{Registry, http_status};
use support::temp_dir;
use tar_support::{TarMaker, noise, read_toc, sha};

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn rstargz(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(args)
        .output()
        .expect("run rstargz")
}

/// `rstargz convert --plain-http --json [extra] src dst`, which must succeed.
fn convert(src: &str, dst: &str, extra: &[&str]) -> Value {
    let mut args = vec!["convert", "--plain-http", "--level", "6", "--json"];
    args.extend_from_slice(extra);
    args.extend([src, dst]);
    let o = rstargz(&args);
    assert!(
        o.status.success(),
        "rstargz {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // stderr is no terminal here: no progress output at all.
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("convert --json output")
}

/// `rstargz convert` that must fail; returns stderr.
fn convert_fails(src: &str, dst: &str) -> String {
    let o = rstargz(&["convert", "--plain-http", src, dst]);
    assert!(!o.status.success(), "convert {src} {dst} succeeded");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("convert {src} {dst}: {err}");
    err
}

fn skopeo(args: &[&str]) -> String {
    let o = support::proc::run_ok(
        Command::new("skopeo").arg("--insecure-policy").args(args),
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("skopeo {args:?}: {e}"));
    o.stdout
}

/// A small two-layer image in an OCI layout: files, a directory tree, a
/// whiteout.
fn small_image(dir: &Path, tag: &str) -> image::OciLayout {
    image::build_oci_layout(
        dir,
        tag,
        &[
            Layer::Entries(vec![
                Entry::Dir {
                    path: "/etc".into(),
                    mode: 0o755,
                },
                Entry::File {
                    path: "/etc/motd".into(),
                    mode: 0o644,
                    data: b"motd\n".to_vec(),
                },
                Entry::File {
                    path: "/etc/issue.net".into(),
                    mode: 0o644,
                    data: b"issue\n".to_vec(),
                },
                Entry::File {
                    path: "/data.bin".into(),
                    mode: 0o644,
                    data: noise(300_000, 7),
                },
            ]),
            Layer::Entries(image::extra_layer()),
        ],
        &["/bin/sh"],
    )
}

/// Checks each layer of manifest `m` (blobs read by `blob`) with
/// `rstargz blob verify` against its TOC annotation.
fn verify_layers(m: &Value, blob: impl Fn(&str, &Path)) {
    let tmp = temp_dir("verify");
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(l["mediaType"], image::MEDIA_LAYER_GZIP);
        let toc = l["annotations"][TOC_ANNOTATION]
            .as_str()
            .expect("toc annotation");
        let p = tmp.path().join(format!("l{i}"));
        blob(l["digest"].as_str().unwrap(), &p);
        let o = rstargz(&["blob", "verify", "--toc-digest", toc, p.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "layer {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn layout_blob(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn layout_top(dir: &Path, tag: &str) -> Value {
    let idx: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {idx}"))
        .clone()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn oci_layout_source_and_destination() {
    support::require_prerequisites();
    let src_dir = temp_dir("oci-src");
    small_image(src_dir.path(), "1");
    let mut registry = Registry::start();

    // oci: -> registry.
    let dst = registry.reference("layout/img", "esgz");
    let r = convert(&format!("oci:{}:1", src_dir.path().display()), &dst, &[]);
    let (body, digest) = registry.manifest("layout/img", "esgz");
    assert_eq!(digest, r["manifest_digest"].as_str().unwrap());
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    verify_layers(&m, |d, p| registry.blob_to_file("layout/img", d, p));

    // registry -> oci: (a new directory), valid for skopeo.
    let out = temp_dir("oci-out");
    let out_dir = out.path().join("layout");
    let from_registry = registry.push_oci_layout(src_dir.path(), "1", "layout/src");
    let r2 = convert(
        &from_registry,
        &format!("oci:{}:v1", out_dir.display()),
        &[],
    );
    // Same input, same options: the same image, whatever the source kind.
    assert_eq!(r2["manifest_digest"], r["manifest_digest"]);
    let top = layout_top(&out_dir, "v1");
    assert_eq!(top["digest"], r2["manifest_digest"]);
    assert_eq!(
        read_json(&out_dir.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let m2 = read_json(&layout_blob(&out_dir, top["digest"].as_str().unwrap()));
    verify_layers(&m2, |d, p| {
        std::fs::copy(layout_blob(&out_dir, d), p).unwrap();
    });
    let inspect: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        &format!("oci:{}:v1", out_dir.display()),
    ]))
    .unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2, "{inspect}");
    assert_eq!(inspect["Digest"], r2["manifest_digest"]);
    // skopeo copy reads and checks every blob.
    let copy = out.path().join("copy");
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci:{}:v1", out_dir.display()),
        &format!("oci:{}:c", copy.display()),
    ]);

    // oci: -> oci: of the converted image keeps every layer; a second tag
    // in the same layout sits next to the first.
    let r3 = convert(
        &format!("oci:{}:v1", out_dir.display()),
        &format!("oci:{}:v2", out_dir.display()),
        &[],
    );
    assert_eq!(r3["manifest_digest"], r2["manifest_digest"]);
    for l in r3["layers"].as_array().unwrap() {
        assert_eq!(l["kept"], true, "{l}");
        assert_eq!(l["uploaded"], false, "{l}");
    }
    layout_top(&out_dir, "v1");
    layout_top(&out_dir, "v2");

    // A layout without the tag, and a directory that is no layout.
    let err = convert_fails(&format!("oci:{}:nope", out_dir.display()), &dst);
    assert!(err.contains("tag nope not found"), "{err}");
    let err = convert_fails(&format!("oci:{}", out.path().display()), &dst);
    assert!(err.contains("not an OCI image layout"), "{err}");
}

/// Writes a two-platform index (linux/amd64, linux/arm64) tagged `tag`
/// into the layout at `dir`. Returns the two manifest digests.
fn two_platform_layout(dir: &Path, tag: &str) -> [String; 2] {
    let a = small_image(dir, "amd64");
    let b = image::build_oci_layout(
        dir,
        "arm64",
        &[Layer::Entries(vec![Entry::File {
            path: "/arm64.txt".into(),
            mode: 0o644,
            data: b"not runnable, only converted\n".to_vec(),
        }])],
        &["/bin/sh"],
    );
    let entry = |d: &str, arch: &str| {
        let size = std::fs::metadata(layout_blob(dir, d)).unwrap().len();
        serde_json::json!({
            "mediaType": image::MEDIA_MANIFEST, "digest": d, "size": size,
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry(&a.manifest_digest, "amd64"), entry(&b.manifest_digest, "arm64")],
    });
    let body = serde_json::to_vec(&index).unwrap();
    let digest = support::sha256_digest(&body);
    std::fs::write(layout_blob(dir, &digest), &body).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_INDEX, "digest": digest, "size": body.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    [a.manifest_digest, b.manifest_digest]
}

#[test]
fn multi_platform_index() {
    support::require_prerequisites();
    let lay = temp_dir("multi");
    let [amd, arm] = two_platform_layout(lay.path(), "multi");
    let registry = Registry::start();
    let host = registry.host.clone();
    let src = registry.reference("multi/src", "1");
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", lay.path().display()),
        &format!("docker://{src}"),
    ]);

    let dst = registry.reference("multi/esgz", "all");
    let r = convert(&src, &dst, &["--all-platforms"]);
    assert_eq!(r["media_type"], OCI_INDEX);
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["platform"], "linux/amd64");
    assert_eq!(images[1]["platform"], "linux/arm64");
    assert_eq!(images[0]["source_manifest"], amd.as_str());
    assert_eq!(images[1]["source_manifest"], arm.as_str());
    let (body, digest) = registry.manifest("multi/esgz", "all");
    assert_eq!(digest, r["manifest_digest"].as_str().unwrap());
    let index: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (e, img) in entries.iter().zip(images) {
        assert_eq!(e["digest"], img["manifest_digest"]);
        assert_eq!(e["platform"]["os"], "linux");
        let (mb, _) = registry.manifest("multi/esgz", e["digest"].as_str().unwrap());
        let m: Value = serde_json::from_slice(&mb).unwrap();
        verify_layers(&m, |d, p| registry.blob_to_file("multi/esgz", d, p));
    }
    assert_eq!(entries[1]["platform"]["architecture"], "arm64");
    // The index is the last thing pushed.
    let puts: Vec<_> = registry
        .access_log()
        .into_iter()
        .filter(|e| matches!(e.method.as_str(), "PUT" | "POST" | "PATCH"))
        .filter(|e| e.path.contains("/multi/esgz/"))
        .collect();
    let last = puts.last().expect("pushes");
    assert_eq!(last.path, "/v2/multi/esgz/manifests/all", "{puts:?}");
    assert_eq!(
        puts.iter()
            .filter(|e| e.path.contains("/manifests/"))
            .count(),
        3,
        "{puts:?}"
    );

    // One platform out of the index: a plain manifest of that platform.
    let dst1 = registry.reference("multi/esgz", "arm");
    let r1 = convert(&src, &dst1, &["--platform", "linux/arm64"]);
    assert_eq!(r1["media_type"], image::MEDIA_MANIFEST);
    assert_eq!(r1["images"][0]["source_manifest"], arm.as_str());
    assert_eq!(r1["manifest_digest"], images[1]["manifest_digest"]);
    let o = rstargz(&[
        "convert",
        "--plain-http",
        "--platform",
        "linux/s390x",
        &src,
        &registry.reference("multi/esgz", "s390x"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no manifest for platform linux/s390x"),
        "{err}"
    );
    assert_eq!(
        http_status(&format!("http://{host}/v2/multi/esgz/manifests/s390x")),
        Some(404)
    );

    // The whole index into an OCI layout, readable by skopeo.
    let out = temp_dir("multi-out");
    let r2 = convert(
        &src,
        &format!("oci:{}:all", out.path().display()),
        &["--all-platforms"],
    );
    assert_eq!(r2["manifest_digest"], r["manifest_digest"]);
    let raw: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--raw",
        &format!("oci:{}:all", out.path().display()),
    ]))
    .unwrap();
    assert_eq!(raw, index);
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        &format!("oci:{}:all", out.path().display()),
        &format!("oci:{}:copy", out.path().join("copy").display()),
    ]);
}

#[test]
fn estargz_layers_are_skipped_or_mounted() {
    support::require_prerequisites();
    let lay = temp_dir("mount");
    small_image(lay.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(lay.path(), "1", "mnt/src");
    let a = registry.reference("mnt/a", "1");
    let ra = convert(&src, &a, &[]);
    let layer_digests: Vec<String> = ra["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest_out"].as_str().unwrap().to_owned())
        .collect();
    let log_before = registry.access_log().len();

    // Another repository of the same registry: mounted, not uploaded (the
    // config is unchanged, so it is mounted too).
    let b = registry.reference("mnt/b", "1");
    let rb = convert(&a, &b, &[]);
    assert_eq!(rb["manifest_digest"], ra["manifest_digest"]);
    for l in rb["layers"].as_array().unwrap() {
        assert_eq!(
            (&l["kept"], &l["mounted"], &l["uploaded"]),
            (&Value::Bool(true), &Value::Bool(true), &Value::Bool(false)),
            "{l}"
        );
    }
    let log: Vec<_> = registry.access_log().into_iter().skip(log_before).collect();
    for d in &layer_digests {
        assert!(
            log.iter().any(|e| e.method == "POST"
                && e.path.contains("/v2/mnt/b/blobs/uploads/")
                && e.path.contains("mount=")
                && e.status == 201),
            "no mount of {d}: {log:?}"
        );
        // Only the footer was read, never the whole blob.
        assert!(
            !log.iter()
                .any(|e| e.method == "GET" && e.path.ends_with(d.as_str()) && e.status == 200),
            "{d} downloaded whole: {log:?}"
        );
        assert!(
            !log.iter()
                .any(|e| e.method == "PATCH" || (e.method == "PUT" && e.path.contains("/blobs/"))),
            "a blob was uploaded: {log:?}"
        );
    }
    let (_, got) = registry.manifest("mnt/b", "1");
    assert_eq!(got, rb["manifest_digest"].as_str().unwrap());
    let m: Value = serde_json::from_slice(&registry.manifest("mnt/b", "1").0).unwrap();
    verify_layers(&m, |d, p| registry.blob_to_file("mnt/b", d, p));

    // Again into the same repository: the destination has every blob.
    let log_before = registry.access_log().len();
    let rc = convert(&a, &registry.reference("mnt/b", "2"), &[]);
    for l in rc["layers"].as_array().unwrap() {
        assert_eq!(
            (&l["kept"], &l["mounted"], &l["uploaded"]),
            (&Value::Bool(true), &Value::Bool(false), &Value::Bool(false)),
            "{l}"
        );
    }
    let log: Vec<_> = registry.access_log().into_iter().skip(log_before).collect();
    assert!(
        !log.iter()
            .any(|e| e.method == "POST" || e.method == "PATCH"),
        "{log:?}"
    );

    // Across registries nothing can be mounted: copied as is.
    let other = Registry::start();
    let rd = convert(&a, &other.reference("mnt/d", "1"), &[]);
    assert_eq!(rd["manifest_digest"], ra["manifest_digest"]);
    for l in rd["layers"].as_array().unwrap() {
        assert_eq!(
            (&l["kept"], &l["mounted"], &l["uploaded"]),
            (&Value::Bool(true), &Value::Bool(false), &Value::Bool(true)),
            "{l}"
        );
    }
}

#[test]
fn corrupt_layer_fails_fast_and_pushes_nothing() {
    support::require_prerequisites();
    let lay = temp_dir("corrupt");
    let img = small_image(lay.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(lay.path(), "1", "bad/src");
    // Same length, different bytes: only the digest can tell.
    let bad = &img.layers[1].digest;
    let data = registry.blob_data_path(bad);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let dst = registry.reference("bad/out", "1");
    let err = convert_fails(&src, &dst);
    assert!(err.contains("layer 2/2"), "{err}");
    assert!(err.contains(bad.as_str()), "{err}");
    assert!(err.contains("digest mismatch"), "{err}");
    let gets = registry
        .access_log()
        .into_iter()
        .filter(|e| e.method == "GET" && e.path.ends_with(bad.as_str()))
        .count();
    assert_eq!(gets, 1, "the corrupt blob was fetched {gets} times");
    assert_eq!(
        http_status(&format!("http://{}/v2/bad/out/manifests/1", registry.host)),
        Some(404)
    );

    // The same from an OCI layout.
    let blob = layout_blob(lay.path(), bad);
    std::fs::write(&blob, &bytes).unwrap();
    let out = temp_dir("corrupt-out");
    let err = convert_fails(
        &format!("oci:{}:1", lay.path().display()),
        &format!("oci:{}:1", out.path().display()),
    );
    assert!(
        err.contains("layer 2/2") && err.contains("digest mismatch"),
        "{err}"
    );
    assert!(
        !out.path().join("index.json").exists(),
        "an index.json was written"
    );
}

#[test]
fn refused_push_leaves_no_manifest() {
    support::require_prerequisites();
    let lay = temp_dir("ro");
    small_image(lay.path(), "1");
    let registry = Registry::start_readonly();
    let dst = registry.reference("ro/out", "1");
    let err = convert_fails(&format!("oci:{}:1", lay.path().display()), &dst);
    assert!(err.contains("pushing"), "{err}");
    assert!(
        err.contains("405") || err.contains("unsupported") || err.contains("UNSUPPORTED"),
        "{err}"
    );
    assert_eq!(
        http_status(&format!("http://{}/v2/ro/out/manifests/1", registry.host)),
        Some(404)
    );
    assert!(
        !registry
            .access_log()
            .iter()
            .any(|e| e.method == "PUT" && e.path.contains("/manifests/")),
        "{:?}",
        registry.access_log()
    );
}

#[test]
fn interrupt_cleans_up_and_pushes_no_manifest() {
    support::require_prerequisites();
    let lay = temp_dir("intr");
    image::debian_image(lay.path(), "1");
    let registry = Registry::start();
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let work = temp_dir("intr-work");
        let dst = registry.reference("intr/out", &format!("s{sig}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_rstargz"))
            .args([
                "convert",
                "--plain-http",
                "--jobs",
                "1",
                "--level",
                "9",
                "--work-dir",
            ])
            .arg(work.path())
            .arg(format!("oci:{}:1", lay.path().display()))
            .arg(&dst)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Mid-conversion: a layer's work file exists and is growing.
        let started = support::wait_for(Duration::from_secs(60), || {
            let d = std::fs::read_dir(work.path())
                .ok()?
                .flatten()
                .find(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("rstargz-convert-")
                })?
                .path();
            let f = std::fs::read_dir(&d).ok()?.flatten().find(|e| {
                e.file_name().to_string_lossy().starts_with("layer-")
                    && e.metadata().is_ok_and(|m| m.len() > 0)
            });
            f.map(|_| ())
        });
        assert!(started.is_some(), "conversion never started");
        support::proc::signal(child.id(), sig);
        let status = support::wait_for(Duration::from_secs(30), || child.try_wait().unwrap());
        let status = status.unwrap_or_else(|| {
            let _ = child.kill();
            panic!("convert did not stop after signal {sig}")
        });
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(code), "{err}");
        assert!(err.contains("interrupted"), "{err}");
        // (`.owner` is the test harness's own marker.)
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with(".owner"))
            .collect();
        assert!(left.is_empty(), "work files left: {left:?}");
        assert_eq!(
            http_status(&format!(
                "http://{}/v2/intr/out/manifests/s{sig}",
                registry.host
            )),
            Some(404)
        );
    }
}

/// Every variant builders produce in one layer.
fn variant_layer() -> Vec<u8> {
    let long = format!("deep/{}/name.txt", "n".repeat(150));
    TarMaker::new()
        // No parent directories at all (umoci and others omit them).
        .file("usr/lib/app/lib.so", &noise(70_000, 3))
        // The same path twice: the last one wins.
        .file("etc/config", b"first")
        .file("etc/config", b"second")
        // PAX: long name, a uid that does not fit ustar, xattrs.
        .file(&long, b"long")
        .pax(&[("uid", b"3000000000"), ("gid", b"3000000001")])
        .file("big-uid", b"uid")
        .file_with_xattrs(
            "caps",
            b"x",
            &[("user.bin", b"\x01\x00\xff"), ("user.note", b"hi")],
        )
        // Hardlinks, to a file above and to one without parents.
        .hardlink("usr/lib/app/lib-link.so", "usr/lib/app/lib.so")
        .hardlink("config-link", "etc/config")
        // Whiteout and opaque markers.
        .file("var/.wh.cache", b"")
        .file("opt/.wh..wh..opq", b"")
        .finish()
}

#[test]
fn layer_variants_convert_correctly() {
    support::require_prerequisites();
    let lay = temp_dir("variants");
    let tar = lay.path().join("layer.tar");
    std::fs::write(&tar, variant_layer()).unwrap();
    let img = image::build_oci_layout(
        &lay.path().join("oci"),
        "1",
        &[Layer::TarFile(tar)],
        &["/x"],
    );
    let out = temp_dir("variants-out");

    // Through the library, with prioritized files whose parents are not in
    // the layer.
    let prioritized = vec![
        "usr/lib/app/lib-link.so".to_owned(),
        "deep/".to_owned() + &"n".repeat(150) + "/name.txt",
    ];
    let client = rstargz::fs::registry::RegistryClient::new(Default::default()).unwrap();
    let opts = rstargz::convert::ConvertOptions {
        prioritized: BTreeMap::from([(img.layers[0].digest.clone(), prioritized.clone())]),
        ..Default::default()
    };
    let src = rstargz::convert::ImageLocation::parse(&format!(
        "oci:{}:1",
        lay.path().join("oci").display()
    ))
    .unwrap();
    let dst =
        rstargz::convert::ImageLocation::parse(&format!("oci:{}:1", out.path().display())).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt
        .block_on(rstargz::convert::convert_image(&client, &src, &dst, &opts))
        .unwrap();
    let l = &report.layers[0];
    let blob_path = layout_blob(out.path(), &l.digest_out);
    let o = rstargz(&[
        "blob",
        "verify",
        "--toc-digest",
        &l.toc_digest,
        blob_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let blob = std::fs::read(&blob_path).unwrap();
    let (toc, _) = read_toc(&blob);
    let entries: Vec<_> = toc
        .entries
        .iter()
        .filter(|e| e.kind != rstargz::estargz::toc::EntryType::Chunk)
        .collect();
    let get = |n: &str| {
        entries
            .iter()
            .rev()
            .find(|e| e.name == n)
            .unwrap_or_else(|| {
                panic!(
                    "{n} not in TOC: {:?}",
                    entries.iter().map(|e| &e.name).collect::<Vec<_>>()
                )
            })
    };
    // Prioritized first, parents synthesized before them, then the landmark.
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let landmark = names
        .iter()
        .position(|n| *n == ".prefetch.landmark")
        .expect("landmark");
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(
        pos("usr/") < pos("usr/lib/") && pos("usr/lib/app/") < pos("usr/lib/app/lib.so"),
        "{names:?}"
    );
    assert!(pos(&prioritized[1]) < landmark, "{names:?}");
    assert!(pos("usr/lib/app/lib.so") < landmark, "{names:?}");
    // Last wins.
    assert_eq!(get("etc/config").digest, sha(b"second"));
    assert_eq!(
        names.iter().filter(|n| **n == "etc/config").count(),
        1,
        "{names:?}"
    );
    assert_eq!(get(&prioritized[1]).digest, sha(b"long"));
    assert_eq!(
        (get("big-uid").uid, get("big-uid").gid),
        (3_000_000_000, 3_000_000_001)
    );
    let caps = get("caps");
    assert_eq!(caps.xattrs.len(), 2, "{:?}", caps.xattrs);
    let link = get("usr/lib/app/lib-link.so");
    assert_eq!(link.kind, rstargz::estargz::toc::EntryType::Hardlink);
    assert_eq!(link.link_name, "usr/lib/app/lib.so");
    assert_eq!(get("config-link").link_name, "etc/config");
    get("var/.wh.cache");
    get("opt/.wh..wh..opq");

    // `tar` extracts the converted layer with the same content.
    let x = temp_dir("variants-x");
    support::proc::run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(&blob_path)
            .arg("-C")
            .arg(x.path())
            .arg("--xattrs")
            .arg("--xattrs-include=*")
            .arg("--numeric-owner"),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(x.path().join("etc/config")).unwrap(),
        b"second"
    );
    assert_eq!(
        std::fs::read(x.path().join("usr/lib/app/lib-link.so")).unwrap(),
        noise(70_000, 3)
    );
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(x.path().join("usr/lib/app/lib.so")).unwrap();
    let b = std::fs::metadata(x.path().join("usr/lib/app/lib-link.so")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hardlink");
    assert_eq!(
        std::fs::metadata(x.path().join("big-uid")).unwrap().uid(),
        3_000_000_000
    );
    assert!(x.path().join("opt/.wh..wh..opq").exists());
    assert!(x.path().join("var/.wh.cache").exists());

    // The same layer as plain conversion (no priorities) also verifies and
    // the CLI reads the file whose parents were missing.
    let out2 = temp_dir("variants-out2");
    let r = convert(
        &format!("oci:{}:1", lay.path().join("oci").display()),
        &format!("oci:{}:1", out2.path().display()),
        &[],
    );
    let l = &r["layers"][0];
    let p = layout_blob(out2.path(), l["digest_out"].as_str().unwrap());
    let o = rstargz(&["blob", "cat", p.to_str().unwrap(), "usr/lib/app/lib.so"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, noise(70_000, 3));
    let o = rstargz(&[
        "blob",
        "verify",
        "--toc-digest",
        l["toc_digest"].as_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn progress_bars_on_a_terminal_only() {
    support::require_prerequisites();
    let lay = temp_dir("tty");
    small_image(lay.path(), "1");
    let out = temp_dir("tty-out");
    // `script` runs the command on a pseudo-terminal and copies what it
    // writes there to our stdout.
    let cmd = format!(
        "{} convert oci:{}:1 oci:{}:1",
        env!("CARGO_BIN_EXE_rstargz"),
        lay.path().display(),
        out.path().display()
    );
    let o = support::proc::run_ok(
        Command::new("script").args(["-qec", &cmd, "/dev/null"]),
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(o.stdout.contains("layer 1/2"), "{}", o.stdout);
    assert!(o.stdout.contains("layer 2/2"), "{}", o.stdout);
    assert!(o.stdout.contains("B in "), "{}", o.stdout);
    assert!(o.stdout.contains("pushed oci:"), "{}", o.stdout);
    // The plain summary still follows.
    assert!(o.stdout.contains("manifest: sha256:"), "{}", o.stdout);
}
