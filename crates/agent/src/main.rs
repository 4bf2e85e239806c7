//! `bundle-agent`: the one binary that runs inside the cluster. Each mode is its own module;
//! arguments are parsed by hand to keep the static binary small.

use std::process::ExitCode;

const USAGE: &str = "\
usage: bundle-agent <mode> [options]

modes:
  registry --root DIR [--listen ADDR]
      a read-write OCI registry storing under DIR (spec/registry-storage-v1.md)
  inject --chunks DIR --index sha256:HEX [--listen ADDR]
      a read-only registry serving the images of the index file DIR/index.cbor from the
      frame files beside it, each checked against the index
  version
      print the version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("version" | "--version") => {
            println!("bundle-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
