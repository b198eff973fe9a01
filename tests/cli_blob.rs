//! End-to-end tests of `rstargz blob verify|ls|cat` on blobs from the test
//! writer.

mod fixture;

use std::path::Path;
use std::process::{Command, Output};

use fixture::*;
use rstargz::estargz::digest::Digest;

fn rstargz(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rstargz"))
        .args(args)
        .output()
        .unwrap()
}

fn write_blob(dir: &Path, name: &str, blob: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, blob).unwrap();
    p.to_str().unwrap().to_string()
}

fn sample() -> Vec<u8> {
    build(&[
        Spec::Dir("etc/"),
        Spec::File("etc/os-release", b"ID=test\n", 0, false),
        Spec::File("bin/tool", &pattern(9000, 4), 4000, false),
        Spec::Symlink("bin/t", "tool"),
        Spec::Hardlink("bin/tool2", "bin/tool"),
    ])
}

#[test]
fn verify_ls_cat() {
    let dir = tempfile::tempdir().unwrap();
    let blob = write_blob(dir.path(), "ok.esgz", &sample());

    let o = rstargz(&["blob", "verify", &blob]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{stdout}");
    assert!(
        stdout.contains("7 entries, 2 files, 4 chunks, 9008 bytes verified"),
        "{stdout}"
    );

    let o = rstargz(&["blob", "verify", "--json", &blob]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["chunks"], 4);
    let toc = v["toc_digest"].as_str().unwrap().to_string();
    assert!(
        rstargz(&["blob", "verify", "--toc-digest", &toc, &blob])
            .status
            .success()
    );
    let wrong = Digest::of(b"x").to_string();
    let o = rstargz(&["blob", "verify", "--toc-digest", &wrong, &blob]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("TOC digest mismatch"));

    let o = rstargz(&["blob", "ls", &blob]);
    assert!(o.status.success());
    let ls = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 7, "{ls}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("symlink") && l.ends_with("bin/t -> tool"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("hardlink") && l.ends_with("bin/tool2 -> bin/tool"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("reg      0644 0:0         9000 bin/tool"))
    );

    let o = rstargz(&["blob", "ls", "--json", &blob]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 7);

    let o = rstargz(&["blob", "cat", &blob, "bin/tool2"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, pattern(9000, 4));
    let o = rstargz(&["blob", "cat", &blob, "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such file"));
}

#[test]
fn verify_names_the_bad_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let blob = build_with(
        &[Spec::File("bin/tool", &pattern(9000, 4), 4000, false)],
        |t| {
            t.entries[2].chunk_digest = Digest::of(b"bad").to_string();
        },
    );
    let blob = write_blob(dir.path(), "bad.esgz", &blob);
    let o = rstargz(&["blob", "verify", &blob]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"bin/tool\" at offset 8000"), "{err}");
    let o = rstargz(&["blob", "verify", "--json", &blob]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("bin/tool"));

    let garbage = write_blob(
        dir.path(),
        "garbage",
        b"definitely not a blob, far too short? no: long enough to hold a footer.",
    );
    let o = rstargz(&["blob", "verify", &garbage]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid footer"));
}
