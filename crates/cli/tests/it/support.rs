//! Running the binary and the peer tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `bundle` binary under test.
pub fn bundle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bundle"))
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
