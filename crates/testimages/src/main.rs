//! `bundle-testimages`: writes the small, the bench or the e2e set of test images into a
//! directory, or reuses the one already there when its marker records the same parameters.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use bundle_testimages::{E2E_DEFAULT_DATA_BYTES, MARKER, bench_set, e2e_set, small_set};

const USAGE: &str = "\
usage: bundle-testimages small DIR
       bundle-testimages bench DIR [--bytes N]
       bundle-testimages e2e DIR --program FILE [--data-bytes N]

  small   a few tiny images: an OCI layout, an oci-archive, a docker-archive, bundle.yaml
  bench   realistic images of about N bytes of layers (default 1G): an OCI layout,
          bundle.yaml and bundle-plain.yaml
  e2e     the images of `cargo xtask e2e`, all running FILE (a static linux/amd64 program,
          e2e-hello) as /hello: example.com/e2e/hello:1.0, example.com/e2e/hello:2.0 and
          example.com/e2e/data:1.0 (with N incompressible bytes, default 64MiB) in an OCI
          layout, bundle-v1.yaml, bundle-v2.yaml, bundle-hello.yaml, and e2e.json (the
          manifest digests)

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
    E2e {
        dir: String,
        program: String,
        data_bytes: u64,
    },
    Help,
}

/// The value of `--name V` or `--name=V` when `a` is that option, read from `it` if needed.
fn option_value<'a>(
    a: &'a str,
    name: &str,
    it: &mut impl Iterator<Item = &'a str>,
) -> Result<Option<&'a str>, String> {
    match a.strip_prefix(name) {
        Some("") => it.next().map(Some).ok_or(format!("{name} needs a value")),
        Some(v) => Ok(v.strip_prefix('=')),
        None => Ok(None),
    }
}

fn size_of(name: &str, v: &str) -> Result<u64, String> {
    parse_size(v).ok_or_else(|| format!("{name}: cannot read {v:?} as a size"))
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
                match option_value(a, "--bytes", &mut it)? {
                    Some(v) => bytes = size_of("--bytes", v)?,
                    None => return Err(format!("unexpected argument {a:?}")),
                }
            }
            Ok(Cli::Bench(dir.to_owned(), bytes))
        }
        (Some("e2e"), Some(dir)) => {
            let mut program = None;
            let mut data_bytes = E2E_DEFAULT_DATA_BYTES;
            while let Some(a) = it.next() {
                if let Some(v) = option_value(a, "--program", &mut it)? {
                    program = Some(v.to_owned());
                } else if let Some(v) = option_value(a, "--data-bytes", &mut it)? {
                    data_bytes = size_of("--data-bytes", v)?;
                } else {
                    return Err(format!("unexpected argument {a:?}"));
                }
            }
            let program = program.ok_or("e2e needs --program FILE")?;
            Ok(Cli::E2e {
                dir: dir.to_owned(),
                program,
                data_bytes,
            })
        }
        (Some(cmd @ ("small" | "bench" | "e2e")), None) => Err(format!("{cmd} needs a directory")),
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
        Cli::E2e {
            dir,
            program,
            data_bytes,
        } => e2e_set(Path::new(&dir), Path::new(&program), data_bytes).map(|set| {
            let verb = if set.reused { "reused" } else { "wrote" };
            println!(
                "{verb} e2e set in {}: program {}, {} bytes of data",
                set.dir.display(),
                set.program_sha256,
                set.data_bytes
            );
            for i in &set.images {
                println!("  {:<28} {}", i.name, i.manifest.digest);
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

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn e2e_arguments() {
        let Ok(Cli::E2e {
            dir,
            program,
            data_bytes,
        }) = parse(&args(&[
            "e2e",
            "out",
            "--program",
            "p",
            "--data-bytes",
            "2MiB",
        ]))
        else {
            panic!("e2e with both options")
        };
        assert_eq!(
            (dir.as_str(), program.as_str(), data_bytes),
            ("out", "p", 2 << 20)
        );
        let Ok(Cli::E2e { data_bytes, .. }) = parse(&args(&["e2e", "out", "--program=p"])) else {
            panic!("e2e with --program=")
        };
        assert_eq!(data_bytes, E2E_DEFAULT_DATA_BYTES);
        for bad in [
            &["e2e", "out"][..],
            &["e2e"],
            &["e2e", "out", "--program"],
            &["e2e", "out", "--program", "p", "--data-bytes", "lots"],
            &["e2e", "out", "--program", "p", "--programme", "q"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse(&args(&["bench", "out", "--bytes=3M"])),
            Ok(Cli::Bench(_, 3_000_000))
        ));
    }
}
