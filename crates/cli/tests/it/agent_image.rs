//! The agent image `bundle create` adds to every archive (spec/format-v1.md, section 12):
//! found where it should be, reproducible, readable by skopeo and umoci, refused when it is
//! not a static binary, left out with --no-agent. The real binaries come from
//! `cargo xtask static` (target/agent), which `cargo xtask ci` runs before the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{self, agent_dir, bundle_with_agent, fails, ok, run};

fn agent_name() -> String {
    format!("bundle.local/bundle/agent:{}", env!("CARGO_PKG_VERSION"))
}

fn image_names(archive: &Path) -> Vec<String> {
    support::inspect_json(archive)["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs and expects success; returns stderr.
fn ok_stderr(cmd: Command) -> String {
    let desc = format!("{cmd:?}");
    let out: Output = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{desc} failed: {err}");
    err
}

/// `bundle create YAML -o OUT EXTRA...` with the agent lookup of `cmd`.
fn create(mut cmd: Command, yaml: &Path, out: &Path, extra: &[&str]) -> Command {
    cmd.arg("create").arg(yaml).arg("-o").arg(out).args(extra);
    cmd
}

/// A hard link of the `bundle` under test at `dir/bundle`, so that the directories around it
/// are the ones its default lookup searches. In the target directory: a hard link needs the
/// same file system, and is never open for writing (no "text file busy").
fn bundle_linked_into(dir: &Path) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let bin = dir.join("bundle");
    std::fs::hard_link(env!("CARGO_BIN_EXE_bundle"), &bin).unwrap();
    let mut c = Command::new(bin);
    c.env_remove("BUNDLE_NO_AGENT")
        .env_remove("BUNDLE_AGENT_DIR");
    c
}

fn target_tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn copy_agent_to(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["bundle-agent", "stage0"] {
        std::fs::copy(agent_dir().join(f), dir.join(f)).unwrap();
    }
}

/// No file named `name` or `name.tmp-*` in `dir`: nothing partial was left.
fn assert_nothing_written(dir: &Path, name: &str) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(name))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn create_adds_the_agent_image_byte_for_byte_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let agent = agent_dir();
    let mut shas = Vec::new();
    for n in ["a", "b"] {
        let out = dir.path().join(format!("{n}.bundle"));
        let mut c = bundle_with_agent();
        c.env("BUNDLE_AGENT_DIR", &agent)
            .env_remove("SOURCE_DATE_EPOCH");
        let err = ok_stderr(create(c, &yaml, &out, &[]));
        assert!(
            err.contains(&format!("agent: {} (sha256:", agent_name()))
                && err.contains(&format!("from {})", agent.display())),
            "{err}"
        );
        shas.push(support::sha256_file(&out));
    }
    assert_eq!(shas[0], shas[1]);
    let archive = dir.path().join("a.bundle");
    let names = image_names(&archive);
    assert_eq!(names.len(), 6, "{names:?}");
    assert_eq!(
        names.last(),
        Some(&agent_name()),
        "appended after bundle.yaml's"
    );
    let json = support::inspect_json(&archive);
    let img = &json["images"][5];
    assert_eq!(img["platforms"], serde_json::json!(["linux/amd64"]));
    assert_eq!(
        img["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let mut c = support::bundle();
    c.args(["verify", "--deep"]).arg(&archive);
    ok(c);
}

#[test]
fn the_agent_image_is_an_ordinary_image_to_skopeo_and_umoci() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let out = dir.path().join("a.bundle");
    let agent = agent_dir();
    ok(create(
        bundle_with_agent(),
        &yaml,
        &out,
        &["--agent", agent.to_str().unwrap()],
    ));
    let layout = dir.path().join("layout");
    let mut c = support::bundle();
    c.arg("extract").arg(&out).arg(&layout);
    ok(c);
    let reference = format!("oci:{}:{}", layout.display(), agent_name());

    let mut c = support::tool("skopeo");
    c.args(["inspect", "--config", &reference]);
    let config: serde_json::Value = serde_json::from_str(&ok(c)).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["User"], "65534:65534");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bundle-agent"])
    );
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!([
            "registry",
            "--root",
            "/var/lib/bundle-registry",
            "--listen",
            "0.0.0.0:5000"
        ])
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let mut c = support::tool("skopeo");
    c.args(["inspect", &reference]);
    let inspected: serde_json::Value = serde_json::from_str(&ok(c)).unwrap();
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 1);

    let bundle_dir = dir.path().join("unpacked");
    let mut c = support::tool("umoci");
    c.args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:{}", layout.display(), agent_name()))
        .arg(&bundle_dir);
    ok(c);
    let rootfs = bundle_dir.join("rootfs");
    let mut files: Vec<String> = std::fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["bundle-agent", "stage0"]);
    for f in ["bundle-agent", "stage0"] {
        assert!(
            std::fs::read(rootfs.join(f)).unwrap() == std::fs::read(agent.join(f)).unwrap(),
            "{f} differs from {}",
            agent.join(f).display()
        );
    }
    let mut c = Command::new(rootfs.join("bundle-agent"));
    c.arg("version");
    let version = ok(c);
    assert_eq!(
        version.trim(),
        format!("bundle-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_default_lookup_searches_beside_the_executable() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    // EXE_DIR/../agent, as target/release/bundle finds target/agent.
    let tmp = target_tmp();
    copy_agent_to(&tmp.path().join("agent"));
    let out = dir.path().join("up.bundle");
    let bin = bundle_linked_into(&tmp.path().join("bin"));
    let err = ok_stderr(create(bin, &yaml, &out, &[]));
    assert!(
        err.contains(&format!("from {})", tmp.path().join("agent").display())),
        "{err}"
    );
    assert!(image_names(&out).contains(&agent_name()));
    // EXE_DIR/agent.
    let tmp = target_tmp();
    copy_agent_to(&tmp.path().join("bin/agent"));
    let out = dir.path().join("beside.bundle");
    let bin = bundle_linked_into(&tmp.path().join("bin"));
    let err = ok_stderr(create(bin, &yaml, &out, &[]));
    assert!(
        err.contains(&format!("from {})", tmp.path().join("bin/agent").display())),
        "{err}"
    );
}

#[test]
fn a_missing_agent_fails_saying_where_it_looked_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.path().join("x.bundle");
    let hint = "build it with `cargo xtask static`, pass --agent DIR, or --no-agent for an \
                archive that will only be pushed with --registry";

    // $BUNDLE_AGENT_DIR is the only place looked in when set.
    let mut c = bundle_with_agent();
    c.env("BUNDLE_AGENT_DIR", &empty);
    let err = fails(create(c, &yaml, &out, &[]));
    assert!(
        err.contains(&format!(
            "the static agent was not found (looked in {}); {hint}",
            empty.display()
        )),
        "{err}"
    );
    assert_nothing_written(dir.path(), "x.bundle");

    // So is --agent DIR; a directory with one of the two files is not an agent directory.
    std::fs::copy(agent_dir().join("stage0"), empty.join("stage0")).unwrap();
    let err = fails(create(
        bundle_with_agent(),
        &yaml,
        &out,
        &["--agent", empty.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!("(looked in {}); {hint}", empty.display())),
        "{err}"
    );
    assert_nothing_written(dir.path(), "x.bundle");

    // Nothing beside the executable: both default places are named.
    let tmp = target_tmp();
    let bin = bundle_linked_into(&tmp.path().join("bin"));
    let err = fails(create(bin, &yaml, &out, &[]));
    assert!(
        err.contains(&format!(
            "(looked in {}, {}); {hint}",
            tmp.path().join("agent").display(),
            tmp.path().join("bin/agent").display()
        )),
        "{err}"
    );
    assert_nothing_written(dir.path(), "x.bundle");
}

#[test]
fn a_binary_that_is_not_static_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let out = dir.path().join("x.bundle");
    let cases: [(&str, PathBuf, &str); 2] = [
        // Debian's coreutils are dynamically linked.
        ("bundle-agent", PathBuf::from("/bin/ls"), "PT_INTERP"),
        ("stage0", yaml.clone(), "not an ELF file"),
    ];
    for (file, from, why) in cases {
        let agent = dir.path().join(format!("bad-{file}"));
        copy_agent_to(&agent);
        std::fs::copy(&from, agent.join(file)).unwrap();
        let err = fails(create(
            bundle_with_agent(),
            &yaml,
            &out,
            &["--agent", agent.to_str().unwrap()],
        ));
        assert!(
            err.contains(&format!(
                "{}: not a static x86_64 ELF executable",
                agent.join(file).display()
            )) && err.contains(why),
            "{file}: {err}"
        );
        assert_nothing_written(dir.path(), "x.bundle");
    }
}

#[test]
fn no_agent_leaves_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let out = dir.path().join("x.bundle");
    let mut c = bundle_with_agent();
    c.env("BUNDLE_AGENT_DIR", dir.path().join("nowhere"));
    ok(create(c, &yaml, &out, &["--no-agent"]));
    let names = image_names(&out);
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("bundle.local/")),
        "{names:?}"
    );

    // BUNDLE_NO_AGENT=1 is the same, unless --agent names a directory.
    let mut c = bundle_with_agent();
    c.env("BUNDLE_NO_AGENT", "1");
    let without = dir.path().join("env.bundle");
    ok(create(c, &yaml, &without, &[]));
    assert_eq!(support::sha256_file(&without), support::sha256_file(&out));
    let mut c = bundle_with_agent();
    c.env("BUNDLE_NO_AGENT", "1");
    let with = dir.path().join("with.bundle");
    ok(create(
        c,
        &yaml,
        &with,
        &["--agent", agent_dir().to_str().unwrap()],
    ));
    assert!(image_names(&with).contains(&agent_name()));

    // Both flags at once is a usage error.
    let out2 = dir.path().join("y.bundle");
    let o = run(create(
        bundle_with_agent(),
        &yaml,
        &out2,
        &["--no-agent", "--agent", "somewhere"],
    ));
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
}

#[test]
fn bundle_yaml_may_not_name_an_agent_image() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    support::small_set(&images);
    let yaml = images.join("reserved.yaml");
    let out = dir.path().join("x.bundle");
    for name in ["bundle.local/bundle/agent:x", "bundle.local/bundle/agent"] {
        std::fs::write(
            &yaml,
            format!(
                "name: demo\nversion: 1.0.0\nimages:\n  - name: registry.example/team/app:1.0\n    \
                 source: oci-layout:layout:app-1.0\n  - name: {name}\n    source: \
                 oci-layout:layout:app-1.0\n"
            ),
        )
        .unwrap();
        // Reserved whether or not this archive gets an agent.
        let extras: [&[&str]; 2] = [&["--no-agent"], &[]];
        for extra in extras {
            let mut c = bundle_with_agent();
            c.env("BUNDLE_AGENT_DIR", agent_dir());
            let err = fails(create(c, &yaml, &out, extra));
            assert!(
                err.contains(&format!(
                    "{}: images[1].name {name:?}: bundle.local/bundle/agent is reserved",
                    yaml.display()
                )),
                "{err}"
            );
            assert_nothing_written(dir.path(), "x.bundle");
        }
    }
}
