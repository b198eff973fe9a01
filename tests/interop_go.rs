//! Interop with the reference Go library (containerd/stargz-snapshotter
//! `estargz`, Debian's golang-github-containerd-stargz-snapshotter-dev):
//! blobs written by rstargz must open, pass `VerifyTOC`, and read back
//! chunk by chunk through the library's verifiers with the same entries and
//! digests. Needs `go` and the library (scripts/deps.sh installs both); a
//! missing toolchain fails the test rather than skipping it.

mod tar_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rstargz::estargz::toc::{EntryType, JsonEntry};
use rstargz::estargz::writer::BuildOptions;
use tar_support::*;

const GOCODE: &str = "/usr/share/gocode";

/// Builds the helper once per test binary; both tests share it.
fn helper() -> PathBuf {
    static HELPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HELPER
        .get_or_init(|| {
            // Cargo's scratch dir for integration tests: reused, never leaked.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gohelper");
            std::fs::create_dir_all(&dir).unwrap();
            build_helper(&dir)
        })
        .clone()
}

fn build_helper(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gohelper/verify.go");
    let lib = Path::new(GOCODE).join("src/github.com/containerd/stargz-snapshotter/estargz");
    assert!(
        lib.is_dir(),
        "the Go estargz library is missing at {}: run scripts/deps.sh \
         (package golang-github-containerd-stargz-snapshotter-dev)",
        lib.display()
    );
    let bin = dir.join("verify");
    let gopath = format!("{}:{GOCODE}", dir.join("gopath").display());
    let out = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOFLAGS", "")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `go` ({e}): install golang-go with scripts/deps.sh")
        });
    assert!(
        out.status.success(),
        "go build of the helper failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

#[derive(serde::Deserialize, Debug)]
struct GoReport {
    #[serde(rename = "tocDigest")]
    toc_digest: String,
    entries: Vec<GoEntry>,
}

#[derive(serde::Deserialize, Debug)]
struct GoEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: i64,
    mode: i64,
    #[serde(rename = "linkName", default)]
    link_name: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    content: String,
    chunks: usize,
}

fn run_helper(bin: &Path, blob: &Path, toc_digest: &str, entries_only: bool) -> GoReport {
    let mut cmd = Command::new(bin);
    if entries_only {
        cmd.arg("-entries-only");
    }
    let out = cmd.arg(blob).arg(toc_digest).output().unwrap();
    assert!(
        out.status.success(),
        "Go library rejected the blob: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kind_str(k: EntryType) -> &'static str {
    match k {
        EntryType::Dir => "dir",
        EntryType::Reg => "reg",
        EntryType::Symlink => "symlink",
        EntryType::Hardlink => "hardlink",
        EntryType::Char => "char",
        EntryType::Block => "block",
        EntryType::Fifo => "fifo",
        EntryType::Chunk => "chunk",
    }
}

/// Compares what Go saw with our TOC: every TOC entry is there with the
/// same fields, and every regular file read back to its digest.
fn compare(toc: &[JsonEntry], go: &GoReport, verified: bool) {
    let mut ours: BTreeMap<String, (&JsonEntry, usize)> = BTreeMap::new();
    let mut last = String::new();
    for e in toc {
        if e.kind == EntryType::Chunk {
            ours.get_mut(&last).unwrap().1 += 1;
            continue;
        }
        last = e.name.trim_end_matches('/').to_string();
        ours.insert(last.clone(), (e, 1));
    }
    let go_map: BTreeMap<&str, &GoEntry> =
        go.entries.iter().map(|e| (e.name.as_str(), e)).collect();
    for (name, (e, pieces)) in &ours {
        let g = go_map
            .get(name.as_str())
            .unwrap_or_else(|| panic!("Go library does not list {name}"));
        // The library resolves a hardlink to its target's entry.
        let (want, pieces) = if e.kind == EntryType::Hardlink {
            let t = &ours[&e.link_name];
            (t.0, t.1)
        } else {
            (*e, *pieces)
        };
        assert_eq!(g.kind, kind_str(want.kind), "{name}");
        assert_eq!(g.size, want.size, "{name}");
        assert_eq!(g.mode, want.mode, "{name}");
        assert_eq!(g.digest, want.digest, "{name}");
        if want.kind == EntryType::Symlink {
            assert_eq!(g.link_name, want.link_name, "{name}");
        }
        if verified && want.kind == EntryType::Reg {
            assert_eq!(g.content, want.digest, "{name} read through the verifier");
            let expect_chunks = if want.size == 0 { 0 } else { pieces };
            assert_eq!(g.chunks, expect_chunks, "{name}");
        }
    }
    // Anything else Go lists is an implicit parent directory.
    for g in &go.entries {
        if !ours.contains_key(&g.name) {
            assert_eq!(g.kind, "dir", "unexpected {}", g.name);
        }
    }
}

fn input_tar() -> Vec<u8> {
    let mut t = TarMaker::new()
        .dir("etc/")
        .file("etc/hostname", b"box\n")
        .file_with_xattrs("etc/secret", b"s", &[("user.x", b"1")])
        .file("etc/empty", b"")
        .symlink("etc/link", "hostname")
        .hardlink("etc/hard", "etc/hostname")
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .dir("usr/")
        .dir("usr/lib/");
    for i in 0..25 {
        t = t.file(
            &format!("usr/lib/f{i}.so"),
            &noise(700 * i * i + 3, i as u64),
        );
    }
    t.file("usr/lib/big.bin", &noise(300_000, 77)).finish()
}

#[test]
fn go_reference_library_reads_rstargz_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let helper = helper();
    let input = input_tar();
    let cases: Vec<(&str, BuildOptions, bool)> = vec![
        ("default", BuildOptions::default(), false),
        (
            "small-chunks-level6",
            BuildOptions {
                chunk_size: 16 << 10,
                level: 6,
                threads: 3,
                ..BuildOptions::default()
            },
            false,
        ),
        (
            "prioritized",
            BuildOptions {
                chunk_size: 64 << 10,
                prioritized_files: vec![
                    "usr/lib/big.bin".into(),
                    "/etc/hard".into(),
                    "./usr/lib/f3.so".into(),
                ],
                ..BuildOptions::default()
            },
            false,
        ),
        // Debian's library is v0.12, older than innerOffset: it can list
        // these blobs but not read shared members, so only entries are
        // compared; our own tests check the innerOffset layout.
        (
            "min-chunk-size",
            BuildOptions {
                chunk_size: 32 << 10,
                min_chunk_size: 16 << 10,
                ..BuildOptions::default()
            },
            true,
        ),
    ];
    for (name, opts, entries_only) in cases {
        let (blob, res) = build(&input, &opts);
        let toc = check_blob(&blob, &res);
        let path = dir.path().join(format!("{name}.esgz"));
        write_file(&path, &blob);
        let go = run_helper(&helper, &path, &res.toc_digest, entries_only);
        assert_eq!(go.toc_digest, res.toc_digest, "{name}");
        compare(&toc.entries, &go, !entries_only);
        eprintln!("{name}: Go library verified {} entries", go.entries.len());
    }
}

/// The fields both writers must agree on, with names cleaned and owner
/// names carried forward per id as readers do (Go's parallel build repeats
/// them at each partition start, which is not a semantic difference).
fn projection(toc: &[JsonEntry]) -> Vec<String> {
    let mut users: BTreeMap<i64, String> = BTreeMap::new();
    let mut groups: BTreeMap<i64, String> = BTreeMap::new();
    toc.iter()
        .map(|e| {
            if !e.user_name.is_empty() {
                users.insert(e.uid, e.user_name.clone());
            }
            if !e.group_name.is_empty() {
                groups.insert(e.gid, e.group_name.clone());
            }
            let user = users.get(&e.uid).cloned().unwrap_or_default();
            let group = groups.get(&e.gid).cloned().unwrap_or_default();
            let name = if e.kind == EntryType::Chunk {
                String::new()
            } else {
                e.name
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .to_string()
            };
            let landmark = name.ends_with(".landmark");
            format!(
                "{name} {:?} size={} mode={} uid={} gid={} user={} group={} mtime={} link={} \
                 dev={}:{} xattrs={:?} digest={} chunk@{} chunkDigest={}",
                e.kind,
                e.size,
                if landmark { 0 } else { e.mode },
                e.uid,
                e.gid,
                user,
                group,
                e.modtime,
                e.link_name,
                e.dev_major,
                e.dev_minor,
                e.xattrs,
                e.digest,
                e.chunk_offset,
                e.chunk_digest,
            )
        })
        .collect()
}

#[test]
fn same_toc_as_the_go_writer() {
    let dir = tempfile::tempdir().unwrap();
    let helper = helper();
    let tar_path = dir.path().join("in.tar");
    let input = input_tar();
    write_file(&tar_path, &input);
    let cases: [(u64, &[&str]); 3] = [
        (0, &[]),
        (20_000, &[]),
        (20_000, &["usr/lib/big.bin", "etc/hard", "usr/lib/f3.so"]),
    ];
    for (chunk_size, prio) in cases {
        let go_blob = dir.path().join("go.esgz");
        let mut cmd = Command::new(&helper);
        cmd.arg("-build").arg(format!("-chunk-size={chunk_size}"));
        if !prio.is_empty() {
            cmd.arg(format!("-prioritized={}", prio.join(",")));
        }
        let out = cmd.arg(&tar_path).arg(&go_blob).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let go_res: BTreeMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();
        let go_bytes = std::fs::read(&go_blob).unwrap();
        let (go_toc, go_json) = read_toc(&go_bytes);
        assert_eq!(sha(&go_json), go_res["tocDigest"]);
        // Our independent checker accepts the reference writer's layout too.
        check_chunks(&go_bytes, &go_toc);

        let opts = BuildOptions {
            chunk_size,
            prioritized_files: prio.iter().map(|s| s.to_string()).collect(),
            ..BuildOptions::default()
        };
        let (blob, res) = build(&input, &opts);
        let ours = check_blob(&blob, &res);
        let (a, b) = (projection(&ours.entries), projection(&go_toc.entries));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                x, y,
                "entry {i}, chunk size {chunk_size}, prioritized {prio:?}"
            );
        }
        assert_eq!(a.len(), b.len(), "entry count");
    }
}
