//! eStargz interop with the reference implementation: Debian's `ctr-remote
//! image convert --estargz --oci` converts the real Debian image, and the
//! blobs it writes must mean the same files as the source layers, carry a
//! TOC digest annotation, and pass `rstargz blob verify` / `ls` / `cat`.
//!
//! Needs root, containerd and the tools from `scripts/deps.sh`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::containerd::{Containerd, ContainerdOptions};
use support::image::{self, DebianImage};
use support::interop::{self, Converted, TOC_DIGEST_ANNOTATION};
use support::registry::Registry;
use support::rootfs;

/// The converted images plus what each layer should contain.
struct Fixture {
    /// (what, converted image): default settings, and 64 KiB chunks so that
    /// large files are split into many `chunk` entries.
    converted: Vec<(&'static str, Converted)>,
    /// Per layer: regular-file path -> `sha256:` of its content, from the
    /// source tars.
    expected: Vec<BTreeMap<String, String>>,
    image: DebianImage,
    _blobs: tempfile::TempDir,
    _layout: tempfile::TempDir,
}

fn convert() -> Fixture {
    support::require_prerequisites();
    let layout = support::temp_dir("layout");
    let image = image::debian_image(layout.path(), "1");
    let mut registry = Registry::start();
    let src = registry.push_oci_layout(layout.path(), "1", "e2e/debian");
    let ctrd = Containerd::start(ContainerdOptions::default());
    let blobs = support::temp_dir("esgz-blobs");
    let variants: [(&str, &[&str]); 2] = [
        ("default", &[]),
        (
            "chunk64k",
            &[
                "--estargz-chunk-size",
                "65536",
                "--estargz-compression-level",
                "1",
            ],
        ),
    ];
    let converted = variants
        .iter()
        .map(|(what, extra)| {
            let c = interop::convert_to_estargz_with(
                &ctrd,
                &registry,
                &src,
                "e2e/debian-esgz",
                what,
                &blobs.path().join(what),
                extra,
            );
            eprintln!(
                "ctr-remote image convert --estargz ({what}): {:?}",
                c.convert_time
            );
            (*what, c)
        })
        .collect();
    let expected = vec![
        image.rootfs.regular_files(),
        rootfs::regular_files_of(&image::tar_of(&image::extra_layer())[..]),
    ];
    Fixture {
        converted,
        expected,
        image,
        _blobs: blobs,
        _layout: layout,
    }
}

/// What the converter produced, checked without our reader: annotations,
/// DiffIDs, and the files inside each blob.
fn check_converted(f: &Fixture, what: &str, c: &Converted) {
    assert_eq!(
        c.layers.len(),
        f.image.layout.layers.len(),
        "{what}: layer count"
    );
    for (i, l) in c.layers.iter().enumerate() {
        assert_eq!(
            l.media_type,
            image::MEDIA_LAYER_GZIP,
            "{what} layer {i}: media type"
        );
        let toc = l.toc_digest.as_deref().unwrap_or_else(|| {
            panic!(
                "{what} layer {i}: no {TOC_DIGEST_ANNOTATION}: {:?}",
                l.annotations
            )
        });
        // The annotation is the digest of the TOC JSON exactly as stored.
        assert_eq!(
            support::sha256_digest(&interop::toc_bytes(&l.blob)),
            toc,
            "{what} layer {i}: TOC digest annotation"
        );
        assert_eq!(
            interop::gzip_diff_id(&l.blob),
            l.diff_id,
            "{what} layer {i}: DiffID of the blob != config diff_id"
        );
        assert_eq!(
            interop::gzip_regular_files(&l.blob),
            f.expected[i],
            "{what} layer {i}: regular files (path -> digest) differ from the source layer"
        );
    }
}

#[test]
fn ctr_remote_estargz_matches_source_and_passes_rstargz_reader() {
    let f = convert();
    for (what, c) in &f.converted {
        check_converted(&f, what, c);
    }
    // 64 KiB chunks split the big files of layer 1 into many chunk entries.
    let (_, chunked) = &f.converted[1];
    let toc: serde_json::Value =
        serde_json::from_slice(&interop::toc_bytes(&chunked.layers[0].blob)).expect("TOC json");
    let chunks = toc["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["type"] == "chunk")
        .count();
    assert!(chunks > 1000, "chunk64k: only {chunks} chunk entries");
    for (what, c) in &f.converted {
        for (i, l) in c.layers.iter().enumerate() {
            let toc = l.toc_digest.as_deref().expect("toc digest");
            eprintln!("reader checks: {what} layer {i}");
            reader_checks(i, &l.blob, toc, &f.expected[i], &f.image);
        }
    }
}

/// Our reader on a reference blob: `verify` against the annotation,
/// `ls` lists exactly the source's regular files, `cat` returns their bytes.
fn reader_checks(
    i: usize,
    blob: &Path,
    toc: &str,
    expected: &BTreeMap<String, String>,
    image: &DebianImage,
) {
    let t = Instant::now();
    let v = rstargz(&["blob", "verify", path(blob), "--toc-digest", toc, "--json"]);
    eprintln!("rstargz blob verify layer {i}: {:?}", t.elapsed());
    let report: serde_json::Value = serde_json::from_str(&v)
        .unwrap_or_else(|e| panic!("verify --json output is not JSON ({e}):\n{v}"));
    eprintln!("verify report layer {i}: {report}");
    assert_eq!(report["ok"], true, "layer {i}: {report}");
    assert_eq!(report["toc_digest"], toc, "layer {i}: TOC digest");
    assert_eq!(report["footer"], "estargz", "layer {i}: footer kind");
    assert_eq!(
        report["unverified_chunks"], 0,
        "layer {i}: chunks without digest"
    );
    let files = report["files"].as_u64().expect("files count");
    assert!(
        files >= expected.len() as u64,
        "layer {i}: verify checked {files} files, the layer has {}",
        expected.len()
    );

    // A wrong TOC digest must be refused.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let o = support::run(
        Command::new(env!("CARGO_BIN_EXE_rstargz")).args([
            "blob",
            "verify",
            path(blob),
            "--toc-digest",
            &wrong,
        ]),
        Duration::from_secs(120),
    )
    .expect("run rstargz");
    assert!(
        !o.status.success(),
        "verify accepted a wrong TOC digest:\n{}",
        o.stdout
    );

    // `ls` rows: `type mode uid:gid size name[ -> link]`.
    let ls = rstargz(&["blob", "ls", path(blob)]);
    let listed: std::collections::BTreeSet<String> = ls
        .lines()
        .filter_map(ls_row)
        .filter(|(kind, _)| kind == "reg")
        .map(|(_, name)| rootfs::normalize(&name))
        .filter(|p| !LANDMARKS.contains(&p.as_str()))
        .collect();
    let want: std::collections::BTreeSet<String> = expected.keys().cloned().collect();
    assert_eq!(
        listed.difference(&want).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "layer {i}: regular files listed by `rstargz blob ls` but not in the source"
    );
    assert_eq!(
        want.difference(&listed).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "layer {i}: regular files of the source missing from `rstargz blob ls`"
    );

    // Cat a few files, including large and small ones, and compare bytes.
    let mut picks: Vec<&String> = expected.keys().take(3).collect();
    for want in [
        "etc/debian_version",
        "usr/bin/bash",
        "hello.txt",
        "usr/local/bin/rstargz-hello",
    ] {
        if let Some((p, _)) = expected.get_key_value(want) {
            picks.push(p);
        }
    }
    for p in picks {
        let o = support::run_ok(
            Command::new(env!("CARGO_BIN_EXE_rstargz")).args([
                "blob",
                "cat",
                path(blob),
                &format!("/{p}"),
            ]),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("rstargz blob cat {p}: {e}"));
        let got = support::sha256_digest(&o.stdout_bytes);
        assert_eq!(
            got, expected[p],
            "layer {i}: `rstargz blob cat /{p}` content"
        );
        if let Some(data) = image.rootfs.read_file(p) {
            assert_eq!(support::sha256_digest(&data), expected[p]);
        }
    }
}

/// `(type, name)` of one `rstargz blob ls` row (`type mode uid:gid size
/// name[ -> link]`; the size column is padded).
fn ls_row(line: &str) -> Option<(String, String)> {
    let mut rest = line;
    let mut kind = "";
    for n in 0..4 {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace)?;
        if n == 0 {
            kind = &rest[..end];
        }
        rest = &rest[end..];
    }
    let name = rest.trim_start();
    let name = name.split_once(" -> ").map_or(name, |(n, _)| n);
    Some((kind.to_string(), name.to_string()))
}

/// Regular files the converter adds to mark the prefetch boundary.
const LANDMARKS: &[&str] = &[".prefetch.landmark", ".no.prefetch.landmark"];

fn rstargz(args: &[&str]) -> String {
    support::run_ok(
        Command::new(env!("CARGO_BIN_EXE_rstargz")).args(args),
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("rstargz failed: {e}"))
    .stdout
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
