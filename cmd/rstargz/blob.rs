//! `rstargz blob …`: verify, list and extract files from an eStargz blob.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rstargz::estargz::Digest;
use rstargz::estargz::footer::FooterKind;
use rstargz::estargz::reader::{BlobReader, DigestPolicy, NodeKind, ReaderOptions};
use serde_json::json;

#[derive(Subcommand)]
pub enum BlobCommand {
    /// Check the TOC and every chunk and file digest of a blob.
    Verify {
        blob: PathBuf,
        /// Expected TOC digest (`sha256:<hex>`), as in the layer annotation.
        #[arg(long)]
        toc_digest: Option<String>,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// List every entry: type, mode, uid:gid, size, name [-> link].
    Ls {
        blob: PathBuf,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Write a regular file's verified content to stdout.
    Cat {
        blob: PathBuf,
        path: String,
        #[command(flatten)]
        open: OpenArgs,
    },
    // BUILD-HOOK: the `Build` variant (tar → eStargz) goes here, e.g.
    // `Build(crate::blob_build::BuildArgs)`, implemented in `blob_build.rs`
    // (add `mod blob_build;` in main.rs). See the matching arm in `run`.
}

/// Options shared by the commands that open a blob.
#[derive(Args)]
pub struct OpenArgs {
    /// Accept legacy stargz content without chunk digests (unverified).
    #[arg(long)]
    allow_unverified: bool,
}

impl OpenArgs {
    fn options(&self) -> ReaderOptions {
        ReaderOptions {
            digest_policy: if self.allow_unverified {
                DigestPolicy::AllowMissing
            } else {
                DigestPolicy::RequireChunkDigests
            },
            ..Default::default()
        }
    }
}

pub fn run(cmd: BlobCommand) -> Result<ExitCode> {
    match cmd {
        BlobCommand::Verify {
            blob,
            toc_digest,
            json,
            open,
        } => verify(&blob, toc_digest.as_deref(), json, &open),
        BlobCommand::Ls { blob, json, open } => ls(&blob, json, &open),
        BlobCommand::Cat { blob, path, open } => cat(&blob, &path, &open),
        // BUILD-HOOK: BlobCommand::Build(args) => crate::blob_build::run(args),
    }
}

fn open_blob(path: &Path, open: &OpenArgs, toc: Option<&Digest>) -> Result<BlobReader<File>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    BlobReader::open(f, &open.options(), toc).with_context(|| format!("reading {}", path.display()))
}

fn verify(
    path: &Path,
    toc_digest: Option<&str>,
    as_json: bool,
    open: &OpenArgs,
) -> Result<ExitCode> {
    let expected = toc_digest
        .map(Digest::parse)
        .transpose()
        .context("--toc-digest")?;
    let res = open_blob(path, open, expected.as_ref()).and_then(|r| Ok((r.verify_all()?, r)));
    let (report, reader) = match res {
        Ok(v) => v,
        Err(e) if as_json => {
            println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.context("verification failed")),
    };
    let footer = match reader.footer_kind() {
        FooterKind::Estargz => "estargz",
        FooterKind::Legacy => "legacy",
    };
    if as_json {
        let v = json!({
            "ok": true,
            "entries": report.entries,
            "files": report.files,
            "chunks": report.chunks,
            "bytes_verified": report.bytes,
            "unverified_chunks": report.unverified_chunks,
            "toc_digest": reader.toc_digest().to_string(),
            "footer": footer,
        });
        println!("{v}");
    } else {
        println!(
            "OK: {} entries, {} files, {} chunks, {} bytes verified",
            report.entries, report.files, report.chunks, report.bytes
        );
        if report.unverified_chunks > 0 {
            println!(
                "warning: {} chunks have no digest (legacy stargz)",
                report.unverified_chunks
            );
        }
        println!("TOC digest: {}", reader.toc_digest());
        println!("footer: {footer}");
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(path: &Path, as_json: bool, open: &OpenArgs) -> Result<ExitCode> {
    let r = open_blob(path, open, None)?;
    let ix = r.index();
    let mut out = BufWriter::new(io::stdout().lock());
    let mut rows = Vec::new();
    for (name, id) in ix.walk() {
        let Some(node) = ix.node(id) else { continue };
        // Extra names of a multiply-linked node are its hardlinks.
        let is_link = !matches!(node.kind, NodeKind::Dir { .. }) && *node.path != *name;
        let (kind, link) = match &node.kind {
            _ if is_link => ("hardlink", Some(node.path.to_string())),
            NodeKind::Symlink { target } => ("symlink", Some(target.to_string())),
            NodeKind::Dir { .. } => ("dir", None),
            NodeKind::Reg { .. } => ("reg", None),
            NodeKind::Char { .. } => ("char", None),
            NodeKind::Block { .. } => ("block", None),
            NodeKind::Fifo => ("fifo", None),
        };
        let shown = if name.is_empty() { "." } else { name.as_str() };
        if as_json {
            rows.push(json!({
                "name": shown,
                "type": kind,
                "mode": node.mode,
                "uid": node.uid,
                "gid": node.gid,
                "size": node.size(),
                "link": link,
                "mtime": node.mtime,
            }));
            continue;
        }
        let link = link.map(|l| format!(" -> {l}")).unwrap_or_default();
        writeln!(
            out,
            "{kind:<8} {:04o} {}:{} {:>12} {shown}{link}",
            node.mode,
            node.uid,
            node.gid,
            node.size()
        )?;
    }
    if as_json {
        serde_json::to_writer(&mut out, &rows)?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn cat(path: &Path, file: &str, open: &OpenArgs) -> Result<ExitCode> {
    let r = open_blob(path, open, None)?;
    let mut out = BufWriter::new(io::stdout().lock());
    r.copy_file(file, &mut out)
        .with_context(|| format!("reading {file:?} from {}", path.display()))?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
