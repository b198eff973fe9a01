//! `rstargz blob build`: converts a tar (plain or gzip) into an eStargz blob.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::PathBuf;

use anyhow::Context;
use rstargz::estargz::writer::{self, BuildOptions};

/// Arguments of `rstargz blob build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Input tar or tar.gz; `-` reads standard input.
    pub input: PathBuf,
    /// Output eStargz blob.
    pub output: PathBuf,
    /// Uncompressed chunk size in bytes.
    #[arg(long, default_value_t = rstargz::estargz::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Let small pieces share a gzip member while it holds fewer than this
    /// many uncompressed bytes (0 = one member per payload).
    #[arg(long, default_value_t = 0)]
    pub min_chunk_size: u64,
    /// Compression level, 0-12 (libdeflate).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(0..=12))]
    pub level: u32,
    /// File listing paths to prioritize, one per line, in access order.
    #[arg(long)]
    pub prioritized_files: Option<PathBuf>,
    /// Skip prioritized paths that the input lacks.
    #[arg(long)]
    pub allow_prioritized_not_found: bool,
    /// Compression threads (0 = all CPUs). Never changes the output bytes.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the build and prints its digests.
pub fn run(args: BuildArgs) -> anyhow::Result<()> {
    let prioritized_files = match &args.prioritized_files {
        Some(p) => read_list(p)?,
        None => Vec::new(),
    };
    let opts = BuildOptions {
        chunk_size: args.chunk_size,
        min_chunk_size: args.min_chunk_size,
        level: args.level,
        prioritized_files,
        allow_prioritized_not_found: args.allow_prioritized_not_found,
        threads: args.threads,
        ..BuildOptions::default()
    };
    let res = match write_blob(&args, &opts) {
        Ok(res) => res,
        Err(e) => {
            // Never leave a partial blob that looks like a result.
            let _ = std::fs::remove_file(&args.output);
            return Err(e);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        println!("TOC digest:        {}", res.toc_digest);
        println!("DiffID:            {}", res.diff_id);
        println!("Blob digest:       {}", res.blob_digest);
        println!("Uncompressed size: {}", res.uncompressed_size);
        println!("Compressed size:   {}", res.compressed_size);
    }
    Ok(())
}

fn write_blob(args: &BuildArgs, opts: &BuildOptions) -> anyhow::Result<writer::BuildResult> {
    let input = if args.input.as_os_str() == "-" {
        None
    } else {
        let f =
            File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        Some(f)
    };
    let out = File::create(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let res = match input {
        None => writer::build(std::io::stdin().lock(), &mut out, opts),
        Some(f) => writer::build_file(f, &mut out, opts),
    }
    .context("building eStargz blob")?;
    out.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .context("syncing output")?;
    Ok(res)
}

/// Reads one path per line; blank lines are ignored.
fn read_list(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut v = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        let t = line.trim_end_matches(['\r', '\n']);
        if !t.trim().is_empty() {
            v.push(t.to_string());
        }
    }
    Ok(v)
}
