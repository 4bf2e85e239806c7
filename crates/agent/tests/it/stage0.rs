//! The stage0 loader, end to end: the real static agent split into parts, joined, verified
//! and run by the real stage0 binary (crates/stage0/README.md has the contract). Both come
//! from `cargo xtask static`, which `cargo xtask ci` runs before the tests.

use std::ffi::OsStr;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A binary built by `cargo xtask static`, or the one `env` names.
fn built(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(default)
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} not found ({env} overrides it): run `cargo xtask static` first",
        path.display()
    );
    path
}

fn stage0() -> PathBuf {
    built("BUNDLE_STAGE0", "target/stage0/release/stage0")
}

fn static_agent() -> PathBuf {
    built(
        "BUNDLE_AGENT_STATIC",
        "target/x86_64-unknown-linux-gnu/min-size/bundle-agent",
    )
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils)");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// A program cut into part files of uneven sizes in a temp directory.
struct Split {
    dir: tempfile::TempDir,
    bytes: Vec<u8>,
    sha: String,
    parts: Vec<PathBuf>,
}

/// Cuts `program` at `cuts` (byte offsets, ascending) into `agent.000`, `agent.001`, ...
fn split(program: &Path, cuts: &[usize]) -> Split {
    let bytes = std::fs::read(program).expect("read the program");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < bytes.len()));
    bounds.push(bytes.len());
    let parts = bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let path = dir.path().join(format!("agent.{i:03}"));
            std::fs::write(&path, &bytes[w[0]..w[1]]).expect("write a part");
            path
        })
        .collect();
    Split {
        sha: sha256_hex(program),
        dir,
        bytes,
        parts,
    }
}

/// The static agent in four parts of uneven sizes.
fn agent_parts() -> Split {
    let agent = static_agent();
    let len = std::fs::metadata(&agent).expect("agent size").len() as usize;
    let s = split(&agent, &[123_457, len / 2, len - 4096]);
    assert_eq!(s.parts.len(), 4, "the agent is smaller than expected");
    s
}

fn run<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    Command::new(stage0())
        .args(args)
        .env_remove("BUNDLE_STAGE0_NO_MEMFD")
        .envs(env.iter().copied())
        .output()
        .expect("run stage0")
}

/// `stage0 OPTIONS... SHA PARTS... -- ARGS...`
fn invoke(
    options: &[&OsStr],
    sha: &str,
    parts: &[PathBuf],
    agent_args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut args: Vec<&OsStr> = options.to_vec();
    args.push(sha.as_ref());
    args.extend(parts.iter().map(|p| p.as_os_str()));
    args.push("--".as_ref());
    args.extend(agent_args.iter().map(OsStr::new));
    run(&args, env)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one line stage0 prints on failure, after checking that it is one line.
fn one_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.starts_with("stage0: ") && err.ends_with('\n') && err.lines().count() == 1,
        "want exactly one `stage0: ` line on stderr, got {err:?}"
    );
    err.trim_end().to_owned()
}

fn version_line() -> String {
    format!("bundle-agent {}\n", env!("CARGO_PKG_VERSION"))
}

#[test]
fn joins_verifies_and_runs_the_static_agent() {
    let s = agent_parts();
    let out = invoke(&[], &s.sha, &s.parts, &["version"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), version_line());
    assert!(out.stderr.is_empty(), "{out:?}");
    let prefixed = format!("sha256:{}", s.sha);
    let out = invoke(&[], &prefixed, &s.parts, &["version"], &[]);
    assert_eq!(stdout(&out), version_line(), "{out:?}");
}

#[test]
fn arguments_after_the_separator_reach_the_agent() {
    let s = agent_parts();
    let out = invoke(&[], &s.sha, &s.parts, &["help"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("usage: bundle-agent <mode>"),
        "{out:?}"
    );
}

#[test]
fn argv0_arguments_and_environment_are_passed_on() {
    // Any ELF will do to observe what the program receives: a shell prints its own argv (NUL
    // separated in /proc) and a variable.
    let s = split(Path::new("/bin/sh"), &[1000, 20_000]);
    let script = r#"tr '\0' '|' </proc/$$/cmdline; echo "$STAGE0_TEST""#;
    let out = invoke(
        &[],
        &s.sha,
        &s.parts,
        &["-c", script, "zero", "one two"],
        &[("STAGE0_TEST", "passed through")],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("bundle-agent|-c|{script}|zero|one two|passed through\n")
    );
    // The program's exit code is the process's: stage0 is replaced, not a parent.
    let out = invoke(&[], &s.sha, &s.parts, &["-c", "exit 7"], &[]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}

#[test]
fn falls_back_to_a_file_when_memfd_exec_is_not_wanted() {
    let s = agent_parts();
    let fallback = s.dir.path().join("fallback");
    std::fs::create_dir(&fallback).expect("mkdir");
    let no_memfd = [("BUNDLE_STAGE0_NO_MEMFD", "1")];
    let options = ["--fallback-dir".as_ref(), fallback.as_os_str()];
    let out = invoke(&options, &s.sha, &s.parts, &["version"], &no_memfd);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), version_line());
    // The file the agent runs from stays behind (stage0 is gone once it runs): one file,
    // `bundle-agent.PID.RANDOM`, 0700, holding exactly the agent.
    let files: Vec<PathBuf> = std::fs::read_dir(&fallback)
        .expect("read fallback dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().expect("name").to_string_lossy();
    assert!(name.starts_with("bundle-agent."), "{name}");
    let meta = std::fs::metadata(&files[0]).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert!(std::fs::read(&files[0]).expect("read") == s.bytes);

    // A mismatch is found before the exec, and the file is removed.
    let wrong = "0".repeat(64);
    let out = invoke(&options, &wrong, &s.parts, &["version"], &no_memfd);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(one_line(&out).contains("sha256 mismatch"));
    assert_eq!(std::fs::read_dir(&fallback).expect("ls").count(), 1);

    // A fallback directory that cannot take the file is named.
    let missing = s.dir.path().join("no-such-dir");
    let options = ["--fallback-dir".as_ref(), missing.as_os_str()];
    let out = invoke(&options, &s.sha, &s.parts, &[], &no_memfd);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let line = one_line(&out);
    let want = format!("stage0: create {}/bundle-agent.", missing.display());
    assert!(line.starts_with(&want), "{line}");
    assert!(line.ends_with("failed: errno 2 (no such file)"), "{line}");
}

#[test]
fn a_program_the_kernel_refuses_fails_on_both_paths_and_leaves_nothing() {
    // Not an ELF and no `#!`: exec from the memfd fails (ENOEXEC), stage0 falls back to a file
    // copied from the memfd, whose exec fails the same way; the file is removed.
    let dir = tempfile::tempdir().expect("tempdir");
    let program = dir.path().join("not-a-program");
    std::fs::write(&program, b"just text\n").expect("write");
    let s = split(&program, &[4]);
    let fallback = dir.path().join("fallback");
    std::fs::create_dir(&fallback).expect("mkdir");
    let options = ["--fallback-dir".as_ref(), fallback.as_os_str()];
    let out = invoke(&options, &s.sha, &s.parts, &["version"], &[]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let line = one_line(&out);
    let want = format!("stage0: exec {}/bundle-agent.", fallback.display());
    assert!(line.starts_with(&want), "{line}");
    assert!(
        line.ends_with(
            "failed: errno 8 (exec format error); \
             fallback after exec from memfd failed: errno 8 (exec format error)"
        ),
        "{line}"
    );
    assert_eq!(std::fs::read_dir(&fallback).expect("ls").count(), 0);
}

#[test]
fn a_wrong_digest_runs_nothing() {
    let s = agent_parts();
    let mut wrong = s.sha.clone().into_bytes();
    wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).expect("hex");
    let out = invoke(&[], &wrong, &s.parts, &["version"], &[]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        one_line(&out),
        format!("stage0: sha256 mismatch: expected {wrong}, got {}", s.sha)
    );
    // Parts in the wrong order are a mismatch too.
    let mut swapped = s.parts.clone();
    swapped.swap(1, 2);
    let out = invoke(&[], &s.sha, &swapped, &["version"], &[]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(one_line(&out).contains("sha256 mismatch"));
}

#[test]
fn a_missing_or_empty_part_is_named() {
    let s = agent_parts();
    let mut parts = s.parts.clone();
    parts[2] = s.dir.path().join("agent.002.missing");
    let out = invoke(&[], &s.sha, &parts, &["version"], &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        one_line(&out),
        format!(
            "stage0: part {}: open failed: errno 2 (no such file)",
            parts[2].display()
        )
    );

    let empty = s.dir.path().join("empty");
    std::fs::write(&empty, b"").expect("write");
    let mut parts = s.parts.clone();
    parts.insert(1, empty.clone());
    let out = invoke(&[], &s.sha, &parts, &["version"], &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        one_line(&out),
        format!("stage0: part {} is empty", empty.display())
    );

    let out = invoke(&[], &s.sha, &[s.dir.path().to_owned()], &[], &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        one_line(&out).ends_with(": read failed: errno 21 (is a directory)"),
        "{out:?}"
    );
}

#[test]
fn bad_command_lines_are_usage_errors() {
    let hex = "ab".repeat(32);
    let upper = hex.to_uppercase();
    let short = &hex[1..];
    for (args, reason) in [
        (&[][..], "no sha256 given"),
        (&["--", "version"], "no sha256 given"),
        (&[hex.as_str(), "p0", "p1"], "no -- after the parts"),
        (&[hex.as_str(), "--", "version"], "no part given"),
        (
            &[upper.as_str(), "p0", "--"],
            "sha256 must be 64 lowercase hex",
        ),
        (&[short, "p0", "--"], "sha256 must be 64 lowercase hex"),
        (&["md5:00", "p0", "--"], "sha256 must be 64 lowercase hex"),
        (&["--fallback-dir"], "--fallback-dir needs a directory"),
    ] {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let line = one_line(&out);
        assert!(
            line.starts_with(
                "stage0: usage: stage0 [--fallback-dir DIR] SHA256 PART... -- ARG... ("
            ) && line.contains(reason),
            "{line}"
        );
    }
}

#[test]
fn parts_behind_configmap_symlinks_work() {
    // A ConfigMap volume: keys are symlinks to `..data/KEY`, `..data` a symlink to the
    // timestamped directory that holds the files.
    let s = agent_parts();
    let volume = s.dir.path().join("volume");
    let data = volume.join("..2024_01_02_03_04_05.000000001");
    std::fs::create_dir_all(&data).expect("mkdir");
    symlink(data.file_name().expect("name"), volume.join("..data")).expect("..data");
    let mut keys = Vec::new();
    for part in &s.parts {
        let name = part.file_name().expect("name");
        std::fs::rename(part, data.join(name)).expect("move part");
        let key = volume.join(name);
        symlink(Path::new("..data").join(name), &key).expect("key symlink");
        keys.push(key);
    }
    let out = invoke(&[], &s.sha, &keys, &["version"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), version_line());
}

/// The chain `deploy` builds: stage0 joins the static agent from its parts and runs it in
/// `registry` mode as uid 65534 with no capabilities; skopeo pushes an image into it and
/// pulls it back with the same digest.
#[test]
fn the_static_agent_serves_as_a_registry_through_stage0() {
    let s = agent_parts();
    let dir = tempfile::tempdir().unwrap();
    let set = bundle_testimages::small_set(&dir.path().join("images")).unwrap();
    let root = crate::registry::nobody_root(dir.path());
    let mut cmd = crate::registry::as_nobody(stage0());
    cmd.arg(&s.sha)
        .args(&s.parts)
        .args(["--", "registry", "--listen", "127.0.0.1:0", "--root"])
        .arg(&root)
        .env_remove("BUNDLE_STAGE0_NO_MEMFD")
        .current_dir(dir.path());
    let agent = crate::registry::Agent::start(cmd);
    let host = agent.host();
    let from = format!("oci:{}:multi-1.0", set.layout.display());
    crate::registry::skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &from,
        &format!("docker://{host}/team/multi:1.0"),
    ])
    .unwrap();
    let want = crate::registry::layout_digest(&set, "multi-1.0");
    assert_eq!(
        crate::registry::copy_out(host, "team/multi:1.0", &dir.path().join("back")),
        want
    );
}
