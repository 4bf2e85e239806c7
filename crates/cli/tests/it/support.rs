//! Running the binary and the peer tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `bundle` binary under test, creating archives without the agent image
/// (`BUNDLE_NO_AGENT=1`, which is `--no-agent`): the archives, digests and counts the tests
/// pin are those of the images they name, whether or not `cargo xtask static` left an agent
/// in target/agent (where this binary would find it). The agent's tests use
/// [`bundle_with_agent`].
pub fn bundle() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bundle"));
    c.env("BUNDLE_NO_AGENT", "1").env_remove("BUNDLE_AGENT_DIR");
    c
}

/// The `bundle` binary under test with its default agent lookup: no `BUNDLE_NO_AGENT`, no
/// `BUNDLE_AGENT_DIR` from the caller's environment.
pub fn bundle_with_agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bundle"));
    c.env_remove("BUNDLE_NO_AGENT")
        .env_remove("BUNDLE_AGENT_DIR");
    c
}

/// `<workspace>/target/agent`, where `cargo xtask static` (run by `cargo xtask ci` before the
/// tests) leaves `bundle-agent` and `stage0`; a clear failure when it has not run.
pub fn agent_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/agent");
    for file in ["bundle-agent", "stage0"] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: run cargo xtask static first",
            dir.join(file).display()
        );
    }
    dir
}

/// Runs a command, returns its output.
pub fn run(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs and expects success; returns stdout.
pub fn ok(cmd: Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{desc} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects failure; returns stderr.
pub fn fails(cmd: Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{desc} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{desc}: {err}");
    assert!(!err.contains("panicked"), "{desc} panicked: {err}");
    err
}

/// A peer tool the project's test command installs; a clear failure when it is absent.
pub fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is not installed; run the project's test command (cargo xtask ci), which installs it"
    );
    Command::new(name)
}

/// The small deterministic image set, generated into `dir`; returns its bundle.yaml.
pub fn small_set(dir: &Path) -> PathBuf {
    bundle_testimages::small_set(dir).unwrap();
    dir.join("bundle.yaml")
}

/// `bundle create YAML -o OUT` plus extra arguments.
pub fn create(yaml: &Path, out: &Path, extra: &[&str]) -> String {
    let mut c = bundle();
    c.arg("create").arg(yaml).arg("-o").arg(out).args(extra);
    ok(c)
}

/// `bundle inspect --json`.
pub fn inspect_json(archive: &Path) -> serde_json::Value {
    let mut c = bundle();
    c.args(["inspect", "--json"]).arg(archive);
    serde_json::from_str(&ok(c)).unwrap()
}

/// sha256 of a file, `sha256:<hex>`.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
    )
}

/// sha256 of bytes, `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
