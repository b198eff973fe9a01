//! `rstargz`: the command-line tool.
//!
//! Minimal dispatcher for `rstargz blob build`; the full CLI (verify, ls,
//! cat) lives on another branch and absorbs this module when merged.

mod blob_build;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rstargz", about = "eStargz tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with eStargz blobs.
    #[command(subcommand)]
    Blob(BlobCommand),
}

#[derive(Subcommand)]
enum BlobCommand {
    /// Convert a tar (plain or gzip) into an eStargz blob.
    Build(blob_build::BuildArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Blob(BlobCommand::Build(args)) => blob_build::run(args),
    }
}
