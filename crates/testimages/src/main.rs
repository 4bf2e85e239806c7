//! `bundle-testimages`: writes the small or the bench set of test images into a directory,
//! or reuses the one already there when its marker records the same parameters.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use bundle_testimages::{MARKER, bench_set, small_set};

const USAGE: &str = "\
usage: bundle-testimages small DIR
       bundle-testimages bench DIR [--bytes N]

  small   a few tiny images: an OCI layout, an oci-archive, a docker-archive, bundle.yaml
  bench   realistic images of about N bytes of layers (default 1G): an OCI layout,
          bundle.yaml and bundle-plain.yaml

N takes the suffixes K, M, G (powers of 1000) and KiB, MiB, GiB (powers of 1024).
A directory holding a complete set with the same parameters (see DIR/testimages.json) is
reused.";

const DEFAULT_BENCH_BYTES: u64 = 1_000_000_000;

/// `1G`, `500M`, `20MiB`, `1000`.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

enum Cli {
    Small(String),
    Bench(String, u64),
    Help,
}

fn parse(args: &[String]) -> Result<Cli, String> {
    let mut it = args.iter().map(String::as_str);
    match (it.next(), it.next()) {
        (Some("-h" | "--help" | "help"), _) => Ok(Cli::Help),
        (Some("small"), Some(dir)) => match it.next() {
            None => Ok(Cli::Small(dir.to_owned())),
            Some(extra) => Err(format!("unexpected argument {extra:?}")),
        },
        (Some("bench"), Some(dir)) => {
            let mut bytes = DEFAULT_BENCH_BYTES;
            while let Some(a) = it.next() {
                let v = match a.strip_prefix("--bytes=") {
                    Some(v) => v,
                    None if a == "--bytes" => it.next().ok_or("--bytes needs a value")?,
                    None => return Err(format!("unexpected argument {a:?}")),
                };
                bytes =
                    parse_size(v).ok_or_else(|| format!("--bytes: cannot read {v:?} as a size"))?;
            }
            Ok(Cli::Bench(dir.to_owned(), bytes))
        }
        (Some(cmd @ ("small" | "bench")), None) => Err(format!("{cmd} needs a directory")),
        (Some(other), _) => Err(format!("unknown command {other:?}")),
        (None, _) => Err("no command given".into()),
    }
}

fn print_chain(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    eprintln!("bundle-testimages: error: {msg}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match parse(&args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("bundle-testimages: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let result = match cli {
        Cli::Help => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Cli::Small(dir) => small_set(Path::new(&dir)).map(|set| {
            let verb = if set.reused { "reused" } else { "wrote" };
            println!(
                "{verb} small set in {} ({} images)",
                set.dir.display(),
                set.images.len()
            );
            for i in &set.images {
                let digest = i
                    .descriptor
                    .as_ref()
                    .map_or("(docker-archive, no manifest)", |d| d.digest.as_str());
                println!("  {:<45} {:<32} {digest}", i.name, i.source);
            }
        }),
        Cli::Bench(dir, bytes) => bench_set(Path::new(&dir), bytes).map(|set| {
            let verb = if set.reused { "reused" } else { "wrote" };
            println!(
                "{verb} bench set in {}: {} bytes of layers (target {}), {} images",
                set.dir.display(),
                set.layer_bytes,
                set.target_bytes,
                set.images.len()
            );
            for i in &set.images {
                let size: u64 = i.layers.iter().map(|l| l.size).sum();
                println!(
                    "  {:<40} {:>3} layers {:>13} bytes  {}",
                    i.name,
                    i.layers.len(),
                    size,
                    i.manifest.digest
                );
            }
        }),
    };
    match result {
        Ok(()) => {
            println!(
                "done in {:.1?}; parameters and digests in {MARKER}",
                start.elapsed()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_chain(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let table = [
            ("1000", Some(1000)),
            ("1G", Some(1_000_000_000)),
            ("20MB", Some(20_000_000)),
            ("20MiB", Some(20 << 20)),
            ("3kib", Some(3072)),
            ("", None),
            ("G", None),
            ("1T", None),
            ("99999999999999999999", None),
        ];
        for (input, want) in table {
            assert_eq!(parse_size(input), want, "{input:?}");
        }
    }
}
