//! Integration tests of the eStargz writer, checked with independent readers
//! (flate2 multi-member gunzip, the tar crate, the `tar` CLI).

mod tar_support;

use rstargz::estargz::Error;
use rstargz::estargz::toc::{EntryType, JsonEntry};
use rstargz::estargz::writer::{self, BuildOptions};
use tar_support::*;

fn opts() -> BuildOptions {
    BuildOptions {
        threads: 2,
        ..BuildOptions::default()
    }
}

fn names(toc: &[JsonEntry]) -> Vec<&str> {
    toc.iter()
        .filter(|e| e.kind != EntryType::Chunk)
        .map(|e| e.name.as_str())
        .collect()
}

fn find<'a>(toc: &'a [JsonEntry], name: &str) -> &'a JsonEntry {
    toc.iter()
        .find(|e| e.name == name && e.kind != EntryType::Chunk)
        .unwrap_or_else(|| panic!("{name} not in TOC"))
}

fn sample_tar() -> Vec<u8> {
    let long = format!("dir/{}/file.txt", "x".repeat(120));
    TarMaker::new()
        .dir("dir/")
        .file("dir/hello.txt", b"hello world\n")
        .file_with_xattrs("dir/attr", b"xattr file", &[("user.k", b"v\x00\xff")])
        .file("dir/empty", b"")
        .symlink("dir/sym", "hello.txt")
        .hardlink("dir/hard", "dir/hello.txt")
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .device("dev/sda", tar::EntryType::Block, 8, 0)
        .device("dev/fifo", tar::EntryType::Fifo, 0, 0)
        .file(&long, &noise(3000, 1))
        .finish()
}

#[test]
fn roundtrip_and_toc_fields() {
    let input = sample_tar();
    let (blob, res) = build(&input, &opts());
    let toc = check_blob(&blob, &res).entries;
    assert_eq!(toc[0].name, ".no.prefetch.landmark");
    assert_eq!(toc[0].size, 1);

    let hello = find(&toc, "dir/hello.txt");
    assert_eq!(hello.size, 12);
    assert_eq!(hello.mode, 0o644);
    assert_eq!((hello.uid, hello.gid), (1000, 1000));
    assert_eq!(hello.modtime, "2020-09-13T12:26:40Z");
    assert_eq!(hello.digest, sha(b"hello world\n"));
    assert_eq!(hello.chunk_digest, hello.digest);
    assert_eq!(hello.chunk_size, 0);
    // Owner names appear once per id, on the first entry carrying them.
    let dir = find(&toc, "dir/");
    assert_eq!(dir.kind, EntryType::Dir);
    assert_eq!(
        (dir.user_name.as_str(), dir.group_name.as_str()),
        ("alice", "staff")
    );
    assert_eq!(hello.user_name, "");

    assert_eq!(find(&toc, "dir/attr").xattrs["user.k"].0, b"v\x00\xff");
    let empty = find(&toc, "dir/empty");
    assert_eq!((empty.size, empty.offset), (0, 0));
    assert_eq!(empty.digest, sha(b""));
    let sym = find(&toc, "dir/sym");
    assert_eq!(
        (sym.kind, sym.link_name.as_str()),
        (EntryType::Symlink, "hello.txt")
    );
    let hard = find(&toc, "dir/hard");
    assert_eq!(
        (hard.kind, hard.link_name.as_str()),
        (EntryType::Hardlink, "dir/hello.txt")
    );
    let null = find(&toc, "dev/null");
    assert_eq!(
        (null.kind, null.dev_major, null.dev_minor),
        (EntryType::Char, 1, 3)
    );
    let sda = find(&toc, "dev/sda");
    assert_eq!(
        (sda.kind, sda.dev_major, sda.dev_minor),
        (EntryType::Block, 8, 0)
    );
    assert_eq!(find(&toc, "dev/fifo").kind, EntryType::Fifo);
    let long = format!("dir/{}/file.txt", "x".repeat(120));
    assert_eq!(find(&toc, &long).digest, sha(&noise(3000, 1)));

    // The blob's tar stream is the input's entries (same bytes), plus the
    // landmark first and the TOC last.
    let got = tar_entries(&blob);
    let mut want = vec![(".no.prefetch.landmark".to_string(), b'0', vec![0x0f])];
    let mut ar = tar::Archive::new(&input[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let t = e.header().entry_type().as_byte();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut v).unwrap();
        want.push((name, t, v));
    }
    assert_eq!(&got[..got.len() - 1], &want[..]);
    assert_eq!(got.last().unwrap().0, "stargz.index.json");
}

#[test]
fn chunking_at_boundaries() {
    let cs = 1024usize;
    let sizes = [0, 1, cs - 1, cs, cs + 1, 3 * cs, 3 * cs + 5];
    let mut t = TarMaker::new();
    for (i, s) in sizes.iter().enumerate() {
        t = t.file(&format!("f{i}"), &noise(*s, i as u64));
    }
    let o = BuildOptions {
        chunk_size: cs as u64,
        ..opts()
    };
    let (blob, res) = build(&t.finish(), &o);
    let toc = check_blob(&blob, &res).entries;
    for (i, s) in sizes.iter().enumerate() {
        let name = format!("f{i}");
        let pos = toc.iter().position(|e| e.name == name).unwrap();
        let pieces: Vec<&JsonEntry> = std::iter::once(&toc[pos])
            .chain(
                toc[pos + 1..]
                    .iter()
                    .take_while(|e| e.kind == EntryType::Chunk),
            )
            .collect();
        let want_pieces = s.div_ceil(cs).max(1);
        assert_eq!(pieces.len(), want_pieces, "{name} of {s} bytes");
        for (k, p) in pieces.iter().enumerate() {
            assert_eq!(p.chunk_offset, (k * cs) as i64);
            let last = k + 1 == pieces.len();
            assert_eq!(
                p.chunk_size,
                if last { 0 } else { cs as i64 },
                "{name} piece {k}"
            );
            if *s > 0 {
                assert!(p.offset > 0);
                assert_eq!(p.inner_offset, 0);
            }
        }
        // Every piece starts its own member: offsets strictly increase.
        assert!(pieces.windows(2).all(|w| w[0].offset < w[1].offset));
    }
}

#[test]
fn min_chunk_size_shares_members() {
    let mut t = TarMaker::new().dir("d/");
    for i in 0..40 {
        t = t.file(&format!("d/small{i}"), &noise(100 + i * 10, i as u64));
    }
    t = t.file("d/big", &noise(10_000, 99));
    let o = BuildOptions {
        chunk_size: 4096,
        min_chunk_size: 2048,
        ..opts()
    };
    let (blob, res) = build(&t.finish(), &o);
    let toc = check_blob(&blob, &res).entries;
    // The landmark always gets its own member.
    assert_eq!((toc[0].inner_offset, toc[0].offset > 0), (0, true));
    let shared: Vec<&JsonEntry> = toc.iter().filter(|e| e.inner_offset > 0).collect();
    assert!(shared.len() > 10, "small files share members");
    for e in &shared {
        // A sharing piece points at a member some earlier piece started.
        assert!(
            toc.iter()
                .any(|s| s.offset == e.offset && s.inner_offset == 0),
            "{} points at a member start",
            e.name
        );
    }
    // Sharing stops once a member holds min_chunk_size bytes.
    let first_member = toc[1..].iter().find(|e| e.offset > 0).unwrap().offset;
    let in_first = toc.iter().filter(|e| e.offset == first_member).count();
    assert!(in_first < 40);
}

#[test]
fn prioritized_order_parents_and_hardlinks() {
    let input = TarMaker::new()
        .file("a/b/c.txt", b"c")
        .dir("x/")
        .file("x/target", b"target")
        .file("other", b"o")
        .dir("z/")
        .hardlink("z/link", "x/target")
        .file("later", b"l")
        .finish();
    let o = BuildOptions {
        prioritized_files: vec!["./a/b/c.txt".into(), "/z/link".into()],
        ..opts()
    };
    let (blob, res) = build(&input, &o);
    let toc = check_blob(&blob, &res).entries;
    assert_eq!(
        names(&toc),
        [
            "a/",
            "a/b/",
            "a/b/c.txt",
            "z/",
            "x/",
            "x/target",
            "z/link",
            ".prefetch.landmark",
            "other",
            "later"
        ]
    );
    // Synthesized parents are real tar entries too.
    let tar_names: Vec<String> = tar_entries(&blob).into_iter().map(|e| e.0).collect();
    assert_eq!(&tar_names[..3], ["a/", "a/b/", "a/b/c.txt"]);
    assert_eq!(find(&toc, "a/").mode, 0o755);
    // Headers we make (parents, landmark, TOC) have numeric owner fields,
    // not blank ones: strict readers (tar-rs, used by `rstargz optimize`
    // to unpack eStargz sources) reject blanks.
    let gz = flate2::read::MultiGzDecoder::new(&blob[..]);
    let mut ar = tar::Archive::new(gz);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        assert!(e.header().uid().is_ok(), "uid of {name}");
        assert!(e.header().gid().is_ok(), "gid of {name}");
        if name.ends_with(".landmark") || name == "a/" || name == "stargz.index.json" {
            assert_eq!(e.header().uid().ok(), Some(0), "uid of {name}");
        }
    }

    let missing = BuildOptions {
        prioritized_files: vec!["nope".into(), "other".into()],
        ..opts()
    };
    let mut out = Vec::new();
    let err = writer::build(&input[..], &mut out, &missing).unwrap_err();
    assert!(
        matches!(err, Error::PrioritizedNotFound(ref p) if p == "nope"),
        "{err}"
    );
    let allowed = BuildOptions {
        allow_prioritized_not_found: true,
        ..missing
    };
    let (blob, res) = build(&input, &allowed);
    let toc = check_blob(&blob, &res).entries;
    assert_eq!(names(&toc)[..2], ["other", ".prefetch.landmark"]);
}

#[test]
fn duplicates_last_wins_and_reserved_names_dropped() {
    let input = TarMaker::new()
        .file("a", b"first")
        .file("b", b"b")
        .file("stargz.index.json", b"{}")
        .file(".prefetch.landmark", b"\x0f")
        .raw_file(b"./a", b"second")
        .finish();
    let (blob, res) = build(&input, &opts());
    let toc = check_blob(&blob, &res).entries;
    assert_eq!(names(&toc), [".no.prefetch.landmark", "b", "a"]);
    assert_eq!(find(&toc, "a").digest, sha(b"second"));
    let tar_names: Vec<String> = tar_entries(&blob).into_iter().map(|e| e.0).collect();
    assert_eq!(
        tar_names,
        [".no.prefetch.landmark", "b", "./a", "stargz.index.json"]
    );
}

#[test]
fn gzip_input_gives_the_same_blob() {
    let input = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &input).unwrap();
    let gz = gz.finish().unwrap();
    let (_, plain) = build(&input, &opts());
    let (blob, res) = build(&gz, &opts());
    check_blob(&blob, &res);
    assert_eq!(plain, res);

    // build_file takes both forms too.
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [("in.tar", &input), ("in.tar.gz", &gz)] {
        let p = dir.path().join(name);
        write_file(&p, bytes);
        let mut out = Vec::new();
        let r = writer::build_file(std::fs::File::open(&p).unwrap(), &mut out, &opts()).unwrap();
        assert_eq!(r, plain);
    }
}

#[test]
fn output_is_independent_of_thread_count() {
    let mut t = TarMaker::new();
    for i in 0..30 {
        t = t.file(&format!("f{i}"), &noise(5000 * i + 1, i as u64));
    }
    let input = t.finish();
    for min in [0, 3000] {
        let digests: Vec<String> = [1, 2, 7]
            .iter()
            .map(|&threads| {
                let o = BuildOptions {
                    chunk_size: 8192,
                    min_chunk_size: min,
                    threads,
                    level: 6,
                    ..BuildOptions::default()
                };
                let (blob, res) = build(&input, &o);
                check_blob(&blob, &res);
                res.blob_digest
            })
            .collect();
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    }
}

#[test]
fn hostile_inputs_are_typed_errors() {
    let run = |input: &[u8]| {
        let mut out = Vec::new();
        writer::build(input, &mut out, &opts()).unwrap_err()
    };
    let good = TarMaker::new().file("a", &noise(5000, 3)).finish();
    // Cut inside the payload.
    assert!(matches!(run(&good[..2000]), Error::InvalidTar(_)));
    // Cut inside the header.
    assert!(matches!(run(&good[..300]), Error::InvalidTar(_)));
    let dotdot = TarMaker::new().raw_file(b"../escape", b"x").finish();
    assert!(matches!(run(&dotdot), Error::InvalidEntry { .. }));
    let deep = TarMaker::new().raw_file(b"a/../../x", b"x").finish();
    assert!(matches!(run(&deep), Error::InvalidEntry { .. }));
    let badlink = TarMaker::new().hardlink("l", "../../etc/passwd").finish();
    assert!(matches!(run(&badlink), Error::InvalidEntry { .. }));
    // Truncated gzip input.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &good).unwrap();
    let gz = gz.finish().unwrap();
    assert!(matches!(run(&gz[..gz.len() / 2]), Error::InvalidTar(_)));
    // Bad options.
    let mut out = Vec::new();
    let bad = BuildOptions {
        level: 13,
        ..opts()
    };
    assert!(matches!(
        writer::build(&good[..], &mut out, &bad),
        Err(Error::InvalidOption(_))
    ));
}

#[test]
fn pax_overrides_global_headers_and_odd_entries() {
    let input = TarMaker::new()
        .raw_entry(
            tar::EntryType::XGlobalHeader,
            b"global",
            b"18 comment=hello\n",
        )
        .pax(&[
            ("mtime", b"1600000000.7"),
            ("uid", b"4242"),
            ("uname", b"bob"),
        ])
        .file("p", b"pax")
        // A hardlink header carrying data: copied through, not a payload.
        .raw_entry(tar::EntryType::Link, b"h", b"odd data")
        .file("after", b"after")
        .finish();
    let (blob, res) = build(&input, &opts());
    let toc = check_blob(&blob, &res).entries;
    assert_eq!(names(&toc), [".no.prefetch.landmark", "p", "h", "after"]);
    let p = find(&toc, "p");
    assert_eq!(p.modtime, "2020-09-13T12:26:41Z");
    assert_eq!((p.uid, p.user_name.as_str()), (4242, "bob"));
    let h = find(&toc, "h");
    assert_eq!((h.kind, h.size, h.offset), (EntryType::Hardlink, 0, 0));
    let got = tar_entries(&blob);
    let after = got.iter().find(|e| e.0 == "after").unwrap();
    assert_eq!(after.2, b"after");
    assert_eq!(got.iter().find(|e| e.0 == "h").unwrap().2, b"odd data");
}

#[test]
fn corrupted_tars_never_panic() {
    let good = sample_tar();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut failures = 0;
    for _ in 0..150 {
        let mut bad = good.clone();
        for _ in 0..(next() % 8 + 1) {
            let i = (next() % bad.len() as u64) as usize;
            bad[i] = next() as u8;
        }
        let cut = bad.len() - (next() % 2048) as usize;
        bad.truncate(cut);
        let mut out = Vec::new();
        match writer::build(&bad[..], &mut out, &opts()) {
            Ok(res) => {
                check_blob(&out, &res);
            }
            Err(
                Error::InvalidTar(_) | Error::InvalidEntry { .. } | Error::PrioritizedNotFound(_),
            ) => failures += 1,
            Err(e) => panic!("unexpected error kind: {e:?}"),
        }
    }
    assert!(failures > 0);
}

#[test]
fn empty_input_gives_a_valid_blob() {
    let (blob, res) = build(&TarMaker::new().finish(), &opts());
    let toc = check_blob(&blob, &res).entries;
    assert_eq!(names(&toc), [".no.prefetch.landmark"]);
}

#[test]
fn gzip_and_tar_cli_read_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, _) = build(&sample_tar(), &opts());
    let p = dir.path().join("out.esgz");
    write_file(&p, &blob);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc '{}' | tar -tf -", p.display()))
        .output()
        .expect("run gzip | tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(listing.contains("dir/hello.txt\n"));
    assert!(listing.ends_with("stargz.index.json\n"));
}

#[test]
fn cli_blob_build_json() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.tar");
    write_file(&input, &sample_tar());
    let list = dir.path().join("prio");
    write_file(&list, b"dir/hello.txt\n\n/dev/null\n");
    let out = dir.path().join("out.esgz");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(["blob", "build", "--json", "--level", "6", "--threads", "3"])
        .arg("--prioritized-files")
        .arg(&list)
        .arg(&input)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let blob = std::fs::read(&out).unwrap();
    assert_eq!(v["blob_digest"], sha(&blob).as_str());
    let (toc, json) = read_toc(&blob);
    assert_eq!(v["toc_digest"], sha(&json).as_str());
    assert_eq!(
        names(&toc.entries)[..5],
        [
            "dir/",
            "dir/hello.txt",
            "dev/",
            "dev/null",
            ".prefetch.landmark"
        ]
    );
}

#[test]
fn cli_reads_gzip_from_stdin() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.esgz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sample_tar()).unwrap();
    let gz = gz.finish().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(["blob", "build", "-"])
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&gz).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    let (_, want) = build(&sample_tar(), &BuildOptions::default());
    assert!(
        text.contains(&format!("Blob digest:       {}", want.blob_digest)),
        "{text}"
    );
    assert!(text.contains(&format!("DiffID:            {}", want.diff_id)));
}

#[test]
fn cli_fails_cleanly_on_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.tar");
    write_file(&input, &TarMaker::new().raw_file(b"../x", b"x").finish());
    let out = dir.path().join("out.esgz");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(["blob", "build"])
        .arg(&input)
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("escapes the root"));
    assert!(!out.exists(), "no partial output left behind");
}

#[test]
fn default_chunk_size_splits_big_files() {
    let cs = rstargz::estargz::DEFAULT_CHUNK_SIZE as usize;
    let data = noise(2 * cs + 1, 5);
    let input = TarMaker::new().file("big", &data).finish();
    let (blob, res) = build(&input, &BuildOptions::default());
    let toc = check_blob(&blob, &res).entries;
    let pieces: Vec<_> = toc[1..]
        .iter()
        .map(|e| (e.kind, e.chunk_offset, e.chunk_size))
        .collect();
    assert_eq!(
        pieces,
        [
            (EntryType::Reg, 0, cs as i64),
            (EntryType::Chunk, cs as i64, cs as i64),
            (EntryType::Chunk, 2 * cs as i64, 0),
        ]
    );
    assert_eq!(toc[1].digest, sha(&data));
}

#[test]
fn header_runs_are_cut_into_bounded_members() {
    let mut t = TarMaker::new();
    for i in 0..200 {
        t = t.file(&format!("empty{i:03}"), b"");
    }
    let input = t.file("last", b"payload").finish();
    let o = BuildOptions {
        chunk_size: 4096,
        ..opts()
    };
    let (blob, res) = build(&input, &o);
    check_blob(&blob, &res);
    let sizes = member_sizes(&blob);
    // Landmark header, then runs of headers, then "last", TOC, footer.
    assert!(sizes.len() > 20, "{sizes:?}");
    let data = &sizes[..sizes.len() - 2];
    assert!(data.iter().all(|&n| n <= 4096 + 512), "{sizes:?}");
    assert_eq!(sizes.last(), Some(&0), "footer is an empty member");
}
