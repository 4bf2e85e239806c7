//! Project automation, run as `cargo xtask <command>`. It depends on no workspace crate: it
//! builds the binaries with cargo and shells out to them, so it keeps working while a crate
//! is broken and never drags library code into its own build.

mod bench;
mod ci;
mod e2e;
mod quickstart;
mod registry;
mod statics;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  quickstart              build bundle, make the small test images under quickstart-out/ and
                          create, verify, inspect and extract a demo archive (no network, no
                          cluster)
  bench [--bytes N] [--runs N] [--only local|registry|serve]
                          measure bundle against tar + zstd, openssl sha256 and tar -x (local),
                          push, re-push and pull against skopeo through a local
                          docker-registry (registry), and skopeo pulls from bundle serve and
                          bundle-agent registry against docker-registry, with their peak RSS
                          under 8 pulls at once and the static binaries' sizes (serve), on a
                          generated image set of N bytes (default 1G, cached under
                          target/bench-data); best of N runs (default 2); --only runs one group
  static                  build the in-cluster binaries: the static bundle-agent
                          (target/x86_64-unknown-linux-gnu/min-size/) and the stage0 loader
                          (target/stage0/release/); check that both are static and within
                          their size budgets (stage0 64 KiB, agent 8 MiB)
  ci                      install the test peers (Debian: skopeo, umoci, zstd; cargo-fuzz)
                          and run fmt, clippy, docs, tidy, a fuzz run, static and every test
  e2e [--data-bytes N]    bundle deploy against the real cluster BUNDLE_E2E_KUBECONFIG names
                          (skipped without it): seed, run a Pod from a deployed image, redeploy,
                          kill and resume, newer archive, --transport proxy, push throughput
                          against a direct push, remove; prints the timings
  tidy                    check the architecture invariants (ARCHITECTURE.md)
  fuzz [SECONDS]          build the fuzz targets (nightly) and run each for SECONDS (30)
  help                    print this message";

fn fuzz_seconds(rest: &[String]) -> u32 {
    rest.first().and_then(|s| s.parse().ok()).unwrap_or(30)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("quickstart") => quickstart::run(rest),
        Some("bench") => bench::run(rest),
        Some("static") => statics::run(&util::root()),
        Some("ci") => ci::ci(&util::root()),
        Some("e2e") => e2e::run(rest),
        Some("tidy") => ci::tidy(&util::root()),
        Some("fuzz") => ci::fuzz(&util::root(), fuzz_seconds(rest)),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("xtask: unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if util::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
