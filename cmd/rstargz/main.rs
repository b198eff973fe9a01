//! `rstargz`: the command-line tool.

mod blob;
mod blob_build;
mod convert;
mod optimize;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rstargz",
    version,
    about = "eStargz tools for the rstargz snapshotter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and verify eStargz blobs.
    Blob {
        #[command(subcommand)]
        command: blob::BlobCommand,
    },
    /// Show the daemon's lazily mounted layers, caches and fallbacks.
    Status(status::StatusArgs),
    /// Convert an image (registry or `oci:DIR`) to eStargz and push it.
    Convert(convert::ConvertArgs),
    /// Run the image's workload, record the files it opens and convert
    /// with them prioritized.
    Optimize(optimize::OptimizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Blob { command } => blob::run(command),
        Command::Status(args) => status::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Optimize(args) => optimize::run(args),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rstargz: {e:#}");
            ExitCode::FAILURE
        }
    }
}
