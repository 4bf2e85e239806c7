//! `cargo xtask ci`: install what the tests need, then every check the project has: fmt,
//! clippy, tests, docs, architecture invariants (tidy), the fuzz targets, and the static
//! binaries with their budgets.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages the tests drive as real peers.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("zstd", "zstd"),
    ("docker-registry", "docker-registry"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    // An HTTP proxy for the registry client's proxy support.
    ("tinyproxy", "tinyproxy"),
];

fn run(root: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        // A clean CI build never reuses incremental state, and it is a quarter of the target
        // directory; CI machines have run out of disk.
        .env("CARGO_INCREMENTAL", "0")
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the Debian packages whose commands are missing.
pub fn install_deps(root: &Path) -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for (cmd, pkg) in DEBIAN_PACKAGES {
        // One package can provide several programs (containerd: containerd and ctr).
        if !have(cmd) && !missing.contains(pkg) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        eprintln!(
            "test dependencies present: {:?}",
            DEBIAN_PACKAGES
                .iter()
                .map(|p| p.1)
                .collect::<std::collections::BTreeSet<_>>()
        );
        return Ok(());
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| -> Result<()> {
        let mut full: Vec<&str> = sudo.to_vec();
        full.push("apt-get");
        full.extend_from_slice(args);
        let (prog, rest) = full.split_first().context("empty command")?;
        run(root, prog, rest, &[("DEBIAN_FRONTEND", "noninteractive")])
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The normal (non-dev) dependencies of a workspace package, one `name vX` per line.
fn deps(root: &Path, package: &str) -> Result<String> {
    let out = Command::new("cargo")
        .args(["tree", "-p", package, "-e", "normal", "--prefix", "none"])
        .current_dir(root)
        .output()
        .context("cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree -p {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The dependency rules of ARCHITECTURE.md ("Invariants"): package, crates it must not depend
/// on (directly or not), and why.
const DEPENDENCY_RULES: &[(&str, &[&str], &str)] = &[
    (
        "bundle-format",
        &[
            "tokio",
            "hyper",
            "reqwest",
            "kube",
            "bundle-layout",
            "bundle-cli",
        ],
        "format never touches the network and knows nothing above it",
    ),
    (
        "bundle-layout",
        &["tokio", "hyper", "kube"],
        "layout reads local files only",
    ),
    (
        "bundle-agent",
        &[
            "clap",
            "bundle-cli",
            "serde_yaml",
            "kube",
            "k8s-openapi",
            "bundle-deploy",
        ],
        "the in-cluster agent carries no command-line framework, CLI code or Kubernetes client",
    ),
    (
        "bundle-oci",
        &["kube", "k8s-openapi", "bundle-deploy", "bundle-cli"],
        "the registry protocol knows nothing of Kubernetes: tunnels plug in as a Transport",
    ),
    (
        "bundle-deploy",
        &["clap", "bundle-cli", "anyhow"],
        "deploy is a library: errors are its own thiserror enum, flags belong to the CLI",
    ),
];

/// Checks the architecture invariants a command can check.
pub fn tidy(root: &Path) -> Result<()> {
    for (package, banned, why) in DEPENDENCY_RULES {
        let tree = deps(root, package)?;
        for b in *banned {
            let prefix = format!("{b} ");
            if let Some(line) = tree.lines().find(|l| l.starts_with(&prefix)) {
                bail!("tidy: {package} must not depend on {b} ({why}): found {line}");
            }
        }
    }
    eprintln!(
        "tidy: ok ({})",
        DEPENDENCY_RULES
            .iter()
            .map(|(p, _, why)| format!("{p}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}

/// Builds the fuzz targets with cargo-fuzz on nightly and runs each briefly on a seed corpus.
pub fn fuzz(root: &Path, seconds: u32) -> Result<()> {
    if !Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("fuzz: SKIPPED: no nightly toolchain on this machine (cargo-fuzz needs one)");
        return Ok(());
    }
    if !Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(root, "cargo", &["install", "cargo-fuzz", "--locked"], &[])?;
    }
    let fuzz = root.join("fuzz");
    let max_time = format!("-max_total_time={seconds}");
    for target in FUZZ_TARGETS {
        run(&fuzz, "cargo", &["+nightly", "fuzz", "build", target], &[])?;
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        seed_corpus(root, target, &corpus)?;
        run(
            &fuzz,
            "cargo",
            &[
                "+nightly",
                "fuzz",
                "run",
                target,
                "--",
                &max_time,
                "-rss_limit_mb=2048",
            ],
            &[],
        )?;
    }
    Ok(())
}

/// The cargo-fuzz targets under fuzz/fuzz_targets.
const FUZZ_TARGETS: [&str; 2] = ["archive_reader", "server_request"];

/// Starting inputs: the golden archive for the reader, typical requests for the server.
fn seed_corpus(root: &Path, target: &str, corpus: &Path) -> Result<()> {
    match target {
        "archive_reader" => {
            let golden = root.join("testdata/golden/golden.bundle");
            if golden.exists() {
                let mut seed = vec![0u8];
                seed.extend(std::fs::read(&golden)?);
                std::fs::write(corpus.join("golden"), seed)?;
            }
        }
        "server_request" => {
            let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
            let seeds = [
                format!(
                    "/v2/team/app/manifests/1.0\nbytes=0-9\n0-99\n{{\"schemaVersion\":2,\"config\":{{\"digest\":\"{d}\"}}}}"
                ),
                format!("/v2/a/b/blobs/uploads/?mount={d}&from=c\nbytes=-5\nbytes 1-2/*\n{{}}"),
                "/v2/_catalog?n=10&last=x\n\n\n".to_owned(),
            ];
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(corpus.join(format!("seed-{i}")), s)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// stage0's own workspace (crates/stage0/README.md says why it is one).
const STAGE0_MANIFEST: &str = "crates/stage0/Cargo.toml";
const STAGE0_TARGET_DIR: &str = "target/stage0";

/// The whole check, as CI runs it. The tests run last, so that their summary closes the log.
pub fn ci(root: &Path) -> Result<()> {
    install_deps(root)?;
    run(root, "cargo", &["fmt", "--all", "--check"], &[])?;
    run(
        root,
        "cargo",
        &["fmt", "--check", "--manifest-path", STAGE0_MANIFEST],
        &[],
    )?;
    run(
        root,
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    run(
        root,
        "cargo",
        &[
            "clippy",
            "--release",
            "--manifest-path",
            STAGE0_MANIFEST,
            "--target-dir",
            STAGE0_TARGET_DIR,
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    run(
        root,
        "cargo",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    tidy(root)?;
    fuzz(root, 30)?;
    // stage0's unit tests (sha256, arguments); the binary itself is tested end to end by
    // bundle-agent's tests, which need both static binaries built first.
    run(
        root,
        "cargo",
        &[
            "test",
            "--manifest-path",
            STAGE0_MANIFEST,
            "--target-dir",
            STAGE0_TARGET_DIR,
        ],
        &[],
    )?;
    crate::statics::build(root)?;
    run(root, "cargo", &["test", "--workspace"], &[])?;
    // The cluster test: runs when BUNDLE_E2E_KUBECONFIG names a cluster, says it was skipped
    // otherwise.
    crate::e2e::run(&[])?;
    eprintln!("ci: all checks passed");
    Ok(())
}
