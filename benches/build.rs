//! Throughput of `rstargz blob build` against `gzip`, on tars of real trees.
//!
//! `cargo bench --bench build`. Environment:
//! - `RSTARGZ_BENCH_TREES`: colon-separated directories
//!   (default `/usr/lib/python3.11:/usr/lib/x86_64-linux-gnu`);
//! - `RSTARGZ_BENCH_MAX_MB`: cap per tree tar, in MiB (default 192), so a
//!   run stays within minutes on a small machine.
//!
//! Prints a markdown table: input MB/s, CPU seconds, output size, size vs
//! `gzip` at the same level, wall-clock speedup vs `gzip`, and the CPU-time
//! ratio (which a shared, loaded machine distorts less than wall time).
//! Verify = decompress and sha256 every chunk via the TOC, on one thread.

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rstargz::estargz::footer;
use rstargz::estargz::toc::{EntryType, JsonToc};
use rstargz::estargz::writer::{self, Backend, BuildOptions};
use sha2::{Digest, Sha256};

struct Row {
    corpus: String,
    tool: String,
    level: u32,
    secs: f64,
    /// CPU seconds (user + system) the step used, all threads.
    cpu: f64,
    size: u64,
    gzip: Option<(f64, u64)>,
}

fn main() {
    // `cargo test --all-targets` also runs harness-less benches, without
    // `--bench`; measuring only makes sense under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("build bench: skipped (run `cargo bench --bench build`)");
        return;
    }
    let trees = std::env::var("RSTARGZ_BENCH_TREES")
        .unwrap_or_else(|_| "/usr/lib/python3.11:/usr/lib/x86_64-linux-gnu".into());
    let max_mb: u64 = std::env::var("RSTARGZ_BENCH_MAX_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(192);
    let tmp = tempfile::tempdir().expect("tempdir");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    let go_helper = build_go_helper(tmp.path());
    for tree in trees.split(':').filter(|t| Path::new(t).is_dir()) {
        let tar = tmp.path().join("in.tar");
        let in_size = make_tar(Path::new(tree), &tar, max_mb << 20);
        let corpus = format!("{tree} ({:.0} MB)", in_size as f64 / 1e6);
        eprintln!("corpus {corpus}");
        let mut gz = [(0.0, 0u64); 2];
        for (i, level) in [6u32, 9].into_iter().enumerate() {
            let cpu0 = cpu_children();
            gz[i] = run_gzip(&tar, level, &tmp.path().join("out.gz"));
            rows.push(Row {
                corpus: corpus.clone(),
                tool: "gzip".into(),
                level,
                secs: gz[i].0,
                cpu: cpu_children() - cpu0,
                size: gz[i].1,
                gzip: Some(gz[i]),
            });
        }
        if let Some(helper) = &go_helper {
            let out = tmp.path().join("go.esgz");
            let cpu0 = cpu_children();
            let start = Instant::now();
            let st = Command::new(helper)
                .arg("-build")
                .arg(&tar)
                .arg(&out)
                .stdout(Stdio::null())
                .status()
                .expect("run Go helper");
            assert!(st.success(), "Go estargz.Build failed");
            rows.push(Row {
                corpus: corpus.clone(),
                tool: format!("Go estargz.Build (v0.12, GOMAXPROCS={threads})"),
                level: 9,
                secs: start.elapsed().as_secs_f64(),
                cpu: cpu_children() - cpu0,
                size: std::fs::metadata(&out).unwrap().len(),
                gzip: Some(gz[1]),
            });
            let _ = std::fs::remove_file(&out);
        }
        let out = tmp.path().join("out.esgz");
        let mut configs: Vec<(String, Backend, u32, u64)> = vec![
            ("rstargz libdeflate".into(), Backend::Libdeflate, 6, 0),
            ("rstargz libdeflate".into(), Backend::Libdeflate, 9, 0),
            (
                "rstargz libdeflate min-chunk 256K".into(),
                Backend::Libdeflate,
                9,
                256 << 10,
            ),
        ];
        if in_size < (128 << 20) {
            configs.push(("rstargz libdeflate".into(), Backend::Libdeflate, 12, 0));
            configs.push(("rstargz flate2".into(), Backend::Flate2, 6, 0));
            configs.push(("rstargz flate2".into(), Backend::Flate2, 9, 0));
        }
        for (tool, backend, level, min_chunk) in configs {
            let opts = BuildOptions {
                level,
                backend,
                min_chunk_size: min_chunk,
                threads,
                ..BuildOptions::default()
            };
            let cpu0 = cpu_self();
            let start = Instant::now();
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&out).unwrap());
            let res = writer::build_file(File::open(&tar).unwrap(), &mut w, &opts).unwrap();
            drop(w);
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu_self() - cpu0;
            let g = gz[if level <= 6 { 0 } else { 1 }];
            rows.push(Row {
                corpus: corpus.clone(),
                tool: format!("{tool} x{threads}"),
                level,
                secs,
                cpu,
                size: res.compressed_size,
                gzip: Some(g),
            });
            if backend == Backend::Libdeflate && level == 9 {
                let cpu0 = cpu_self();
                let start = Instant::now();
                let n = verify(&out);
                let vsecs = start.elapsed().as_secs_f64();
                let vcpu = cpu_self() - cpu0;
                rows.push(Row {
                    corpus: corpus.clone(),
                    tool: format!("verify ({tool}) x1"),
                    level,
                    secs: vsecs,
                    cpu: vcpu,
                    size: n,
                    gzip: None,
                });
            }
        }
        rows.iter()
            .filter(|r| r.corpus == corpus)
            .for_each(|r| eprintln!("  {} -{}: {:.2}s", r.tool, r.level, r.secs));
        let _ = std::fs::remove_file(&tar);
        let _ = std::fs::remove_file(&out);
        rows.iter_mut()
            .filter(|r| r.corpus == corpus)
            .for_each(|r| r.secs = r.secs.max(1e-9));
        print_table(&rows, &corpus, in_size);
    }
}

fn print_table(rows: &[Row], corpus: &str, in_size: u64) {
    println!("\n### {corpus}\n");
    println!(
        "| tool | level | MB/s (input, wall) | CPU s | output bytes | size vs gzip | \
         speedup vs gzip (wall) | gzip CPU / our CPU |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.corpus == corpus) {
        let mbs = in_size as f64 / 1e6 / r.secs;
        let gz_cpu = rows
            .iter()
            .find(|g| g.corpus == corpus && g.tool == "gzip" && g.level == r.level.min(9))
            .map(|g| g.cpu);
        let (ratio, speed, cpu_ratio) = match (r.gzip, gz_cpu) {
            (Some((gs, gsize)), Some(gc)) if !r.tool.starts_with("verify") => (
                format!("{:+.2}%", (r.size as f64 / gsize as f64 - 1.0) * 100.0),
                format!("{:.2}x", gs / r.secs),
                format!("{:.2}x", gc / r.cpu.max(1e-9)),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let size = if r.tool.starts_with("verify") {
            format!("{} verified", r.size)
        } else {
            r.size.to_string()
        };
        println!(
            "| {} | {} | {:.1} | {:.2} | {} | {} | {} | {} |",
            r.tool, r.level, mbs, r.cpu, size, ratio, speed, cpu_ratio
        );
    }
}

/// Tars `tree` (sorted walk, no symlink following) up to `cap` bytes of
/// file content; returns the tar size.
fn make_tar(tree: &Path, out: &Path, cap: u64) -> u64 {
    let mut b = tar::Builder::new(BufWriter::new(File::create(out).unwrap()));
    b.follow_symlinks(false);
    let base = tree.parent().unwrap_or(tree);
    let mut total = 0u64;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut kids: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => continue,
        };
        kids.sort();
        let rel = dir.strip_prefix(base).unwrap();
        let _ = b.append_path_with_name(&dir, rel);
        for k in kids.into_iter().rev() {
            let Ok(md) = std::fs::symlink_metadata(&k) else {
                continue;
            };
            if md.is_dir() {
                stack.push(k);
            } else if total < cap && (md.is_file() || md.file_type().is_symlink()) {
                let rel = k.strip_prefix(base).unwrap();
                if b.append_path_with_name(&k, rel).is_ok() && md.is_file() {
                    total += md.len();
                }
            }
        }
    }
    b.into_inner().unwrap();
    std::fs::metadata(out).unwrap().len()
}

/// Builds `tests/gohelper/verify.go` against Debian's Go estargz library, to
/// time the reference writer on the same input; `None` when Go is missing.
fn build_go_helper(dir: &Path) -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gohelper/verify.go");
    let bin = dir.join("gohelper");
    let ok = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", dir.join("gopath").display()),
        )
        .env("GOCACHE", dir.join("gocache"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("Go helper unavailable; skipping the Go reference row");
    }
    ok.then_some(bin)
}

fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own; no pointers escape.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of this process, all threads.
fn cpu_self() -> f64 {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of waited-for children (gzip, the Go helper).
fn cpu_children() -> f64 {
    rusage(libc::RUSAGE_CHILDREN)
}

fn run_gzip(tar: &Path, level: u32, out: &Path) -> (f64, u64) {
    let start = Instant::now();
    let status = Command::new("gzip")
        .arg(format!("-{level}"))
        .arg("-c")
        .stdin(File::open(tar).unwrap())
        .stdout(File::create(out).unwrap())
        .stderr(Stdio::inherit())
        .status()
        .expect("run gzip");
    assert!(status.success());
    let secs = start.elapsed().as_secs_f64();
    (secs, std::fs::metadata(out).unwrap().len())
}

/// Decompresses every chunk from its member via the TOC and checks its
/// digest; returns the payload bytes verified.
fn verify(path: &Path) -> u64 {
    let blob = std::fs::read(path).unwrap();
    let f = footer::parse(&blob[blob.len() - footer::FOOTER_SIZE..], blob.len() as u64).unwrap();
    let mut toc_tar = Vec::new();
    flate2::read::GzDecoder::new(&blob[f.toc_offset as usize..])
        .read_to_end(&mut toc_tar)
        .unwrap();
    let mut ar = tar::Archive::new(&toc_tar[..]);
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    let mut json = Vec::new();
    e.read_to_end(&mut json).unwrap();
    let toc: JsonToc = serde_json::from_slice(&json).unwrap();
    let mut size = 0i64;
    let mut total = 0u64;
    let mut buf = Vec::new();
    for ent in &toc.entries {
        if ent.kind == EntryType::Reg {
            size = ent.size;
        }
        let payload = ent.kind == EntryType::Chunk || (ent.kind == EntryType::Reg && ent.size > 0);
        if !payload {
            continue;
        }
        let len = if ent.chunk_size > 0 {
            ent.chunk_size
        } else {
            size - ent.chunk_offset
        } as usize;
        let mut d = flate2::read::MultiGzDecoder::new(&blob[ent.offset as usize..]);
        std::io::copy(
            &mut (&mut d).take(ent.inner_offset as u64),
            &mut std::io::sink(),
        )
        .unwrap();
        buf.resize(len, 0);
        d.read_exact(&mut buf).unwrap();
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&buf)));
        assert_eq!(got, ent.chunk_digest, "chunk of {}", ent.name);
        total += len as u64;
    }
    total
}
