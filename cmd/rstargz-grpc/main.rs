//! `rstargz-grpc`: the snapshotter daemon.
fn main() {
    eprintln!("rstargz-grpc: not implemented yet");
    std::process::exit(2);
}
