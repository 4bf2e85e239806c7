//! `bundle-agent`: the one binary that runs inside the cluster. Each mode is its own module;
//! arguments are parsed by hand to keep the static binary small.

mod inject;
mod listen;
mod registry;

use std::process::ExitCode;

const USAGE: &str = "\
usage: bundle-agent <mode> [options]

modes:
  registry --root DIR [--listen ADDR]
      a read-write OCI registry storing under DIR (spec/registry-storage-v1.md)
  inject --chunks DIR --index sha256:HEX [--listen ADDR]
      a read-only registry serving the images of the index file DIR/index.cbor (whose
      sha256 is HEX) from the frame files beside it, each named by its sha256 and checked
      against the index
  version
      print the version

ADDR defaults to 0.0.0.0:5000; the address actually bound is printed as
`listening on ADDR` once the server accepts connections. SIGTERM and SIGINT stop it.";

/// `--name value` options after the mode.
pub(crate) struct Opts(Vec<(String, String)>);

impl Opts {
    fn parse(args: &[String], known: &[&str]) -> anyhow::Result<Opts> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--").filter(|n| known.contains(n)) else {
                anyhow::bail!("unexpected argument {a:?}\n\n{USAGE}");
            };
            let Some(v) = it.next() else {
                anyhow::bail!("--{name} needs a value");
            };
            out.push((name.to_owned(), v.clone()));
        }
        Ok(Opts(out))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn required(&self, name: &str) -> anyhow::Result<&str> {
        self.get(name)
            .ok_or_else(|| anyhow::anyhow!("--{name} is required\n\n{USAGE}"))
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("registry") => registry::run(&Opts::parse(rest, &["root", "listen"])?),
        Some("inject") => inject::run(&Opts::parse(rest, &["chunks", "index", "listen"])?),
        Some("version" | "--version") => {
            say(&format!("bundle-agent {}", env!("CARGO_PKG_VERSION")));
            Ok(())
        }
        Some("help" | "-h" | "--help") => {
            say(USAGE);
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown mode {other:?}\n\n{USAGE}"),
        None => anyhow::bail!("{USAGE}"),
    }
}

/// Prints a line to stdout; a closed pipe is not an error (`bundle-agent help | head`).
pub(crate) fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bundle-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}
