//! `rstargz`: the command-line tool.
fn main() {
    eprintln!("rstargz: no commands yet");
    std::process::exit(2);
}
