//! `bundle push` and `bundle create` from registry references, with `bundle.lock` and
//! `--locked`, against the real registry (CNCF distribution).

use crate::support::{self, fails, ok};

#[path = "../../../oci/tests/it/harness.rs"]
pub(crate) mod harness;

use harness::{Mode, Registry};

/// `bundle push` of `archive` to `reg`, run with an empty working directory, HOME and TMPDIR
/// (below the archive's directory), which must stay empty, as must the archive's directory
/// apart from them: a push streams from the archive and writes no file anywhere.
fn push(archive: &std::path::Path, reg: &Registry, extra: &[&str]) -> String {
    let parent = archive.parent().unwrap();
    let listing = |d: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let scratch = tempfile::tempdir_in(parent).unwrap();
    let dirs = ["cwd", "home", "tmp"].map(|n| scratch.path().join(n));
    for d in &dirs {
        std::fs::create_dir(d).unwrap();
    }
    let before = listing(parent);
    let mut c = support::bundle();
    c.current_dir(&dirs[0])
        .env("HOME", &dirs[1])
        .env("TMPDIR", &dirs[2]);
    c.arg("push")
        .arg(archive)
        .args([
            "--registry",
            &reg.host(),
            "--insecure-registry",
            &reg.host(),
        ])
        .args(extra);
    let out = ok(c);
    for d in &dirs {
        assert!(listing(d).is_empty(), "push wrote into {}", d.display());
    }
    assert_eq!(listing(parent), before, "push wrote beside the archive");
    out
}

#[test]
fn push_then_create_from_the_registry_with_a_lock() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let archive = dir.path().join("demo.bundle");
    support::create(&yaml, &archive, &[]);
    let inspect = support::inspect_json(&archive);
    let reg = Registry::start(Mode::Plain);
    let host = reg.host();

    let out = push(&archive, &reg, &[]);
    assert!(out.contains("pushed 5 images"), "{out}");
    for img in inspect["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        let repo_ref = name.strip_prefix("registry.example/").unwrap();
        let raw = reg.inspect_raw(repo_ref).unwrap();
        assert_eq!(
            support::sha256(&raw),
            img["digest"].as_str().unwrap(),
            "{name}"
        );
    }
    let again = push(&archive, &reg, &[]);
    assert!(
        again.contains(" 0 blobs uploaded") && again.contains(" 0 bytes sent"),
        "{again}"
    );
    // --map sends one image elsewhere; --image picks it.
    let mapped = push(
        &archive,
        &reg,
        &[
            "--image",
            "registry.example/team/app:1.0",
            "--map",
            &format!("registry.example/team/={host}/mirror/"),
        ],
    );
    assert!(
        mapped.contains(&format!("{host}/mirror/app:1.0")),
        "{mapped}"
    );
    reg.inspect_raw("mirror/app:1.0").unwrap();

    // create from the registry: the lock pins what was pulled.
    let pull_dir = dir.path().join("pull");
    std::fs::create_dir(&pull_dir).unwrap();
    let pull_yaml = pull_dir.join("bundle.yaml");
    std::fs::write(
        &pull_yaml,
        format!("name: pulled\nversion: 1\nimages:\n  - name: {host}/team/multi:1.0\n  - name: {host}/team/app:1.0\n"),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let create = |extra: &[&str], out: &str| {
        let mut c = support::bundle();
        c.arg("create")
            .arg(&pull_yaml)
            .arg("-o")
            .arg(pull_dir.join(out));
        c.args(["--insecure-registry", &host, "--cache"])
            .arg(&cache)
            .args(extra);
        c
    };
    ok(create(&[], "a.bundle"));
    let lock = std::fs::read_to_string(pull_dir.join("bundle.lock")).unwrap();
    let digest_of = |n: &str| {
        inspect["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == n)
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let multi = digest_of("registry.example/team/multi:1.0");
    assert!(
        lock.contains(&multi) && lock.contains(&digest_of("registry.example/team/app:1.0")),
        "{lock}"
    );
    let pulled = support::inspect_json(&pull_dir.join("a.bundle"));
    assert_eq!(pulled["images"][0]["digest"], multi.as_str());

    // The tag moves (another image pushed over it): --locked still gives the same bytes.
    let (_tmp, set) = harness::small_images();
    reg.push(&harness::oci_ref(&set, "plain-1.0"), "team/multi:1.0")
        .unwrap();
    ok(create(&["--locked"], "b.bundle"));
    assert_eq!(
        support::sha256_file(&pull_dir.join("a.bundle")),
        support::sha256_file(&pull_dir.join("b.bundle")),
        "--locked did not re-create the archive bit for bit"
    );
    assert_eq!(
        std::fs::read_to_string(pull_dir.join("bundle.lock")).unwrap(),
        lock
    );
    // Without --locked the lock follows the tag.
    ok(create(&[], "c.bundle"));
    assert!(
        !std::fs::read_to_string(pull_dir.join("bundle.lock"))
            .unwrap()
            .contains(&multi)
    );
    // An image the lock does not pin is refused under --locked.
    std::fs::write(
        &pull_yaml,
        format!("name: pulled\nversion: 1\nimages:\n  - name: {host}/team/plain:1.0\n"),
    )
    .unwrap();
    let e = fails(create(&["--locked"], "d.bundle"));
    assert!(
        e.contains("team/plain:1.0") && e.contains("bundle.lock"),
        "{e}"
    );
    assert!(!pull_dir.join("d.bundle").exists());

    // By digest (alone, and beside a tag): the bytes pushed under that digest, though the tag
    // has moved since; a digest the registry does not hold is named.
    let app = digest_of("registry.example/team/app:1.0");
    std::fs::write(
        &pull_yaml,
        format!(
            "name: pulled\nversion: 1\nimages:\n  - name: {host}/team/multi@{multi}\n  - name: {host}/team/app:1.0@{app}\n"
        ),
    )
    .unwrap();
    ok(create(&[], "e.bundle"));
    let mut digests: Vec<String> = support::inspect_json(&pull_dir.join("e.bundle"))["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["digest"].as_str().unwrap().to_owned())
        .collect();
    digests.sort();
    let mut want = vec![multi.clone(), app];
    want.sort();
    assert_eq!(digests, want);
    let absent = format!("sha256:{}", "0".repeat(64));
    std::fs::write(
        &pull_yaml,
        format!("name: pulled\nversion: 1\nimages:\n  - name: {host}/team/app@{absent}\n"),
    )
    .unwrap();
    let e = fails(create(&[], "f.bundle"));
    assert!(e.contains("team/app") && e.contains(&absent), "{e}");
    assert!(!pull_dir.join("f.bundle").exists());
}

/// Credentials the way people have them, against the real registry behind TLS and htpasswd:
/// none at all is named as such; `DOCKER_CONFIG`'s `credsStore` helper serves `bundle push`; a
/// `credHelpers` entry wins over a wrong `auths` entry for `bundle create`; the wrong `auths`
/// entry alone is refused, named.
#[test]
fn credentials_come_from_docker_config_and_its_helpers() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let yaml = support::small_set(&dir.join("images"));
    let archive = dir.join("demo.bundle");
    support::create(&yaml, &archive, &[]);
    let reg = Registry::start(Mode::TlsBasicAuth);
    let host = reg.host();
    let (user, pass) = reg.credentials().unwrap();
    let ca = reg.ca_file().unwrap();

    // A credential helper on PATH that logs what it is asked and knows this registry only.
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.join("helper.log");
    let helper = bin.join("docker-credential-bundletest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread -r server\necho \"$1 $server\" >> '{}'\n\
             if [ \"$1\" = get ] && [ \"$server\" = '{host}' ]; then\n  \
             echo '{{\"ServerURL\":\"{host}\",\"Username\":\"{user}\",\"Secret\":\"{pass}\"}}'\n\
             else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            log.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();
    let config = |name: &str, json: String| {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), json).unwrap();
        d
    };
    // `bundle SUB...` with an empty HOME, the helper on PATH and `docker_config`, if any.
    let bundle = |docker_config: Option<&std::path::Path>| {
        let mut c = support::bundle();
        c.env("HOME", &home).env("PATH", &path);
        match docker_config {
            Some(d) => c.env("DOCKER_CONFIG", d),
            None => c.env_remove("DOCKER_CONFIG"),
        };
        c
    };
    let push = |docker_config| {
        let mut c = bundle(docker_config);
        c.arg("push")
            .arg(&archive)
            .args(["--registry", &host, "--registry-ca"])
            .arg(&ca);
        c
    };

    let e = fails(push(None));
    assert!(e.contains(&host) && e.contains("no credentials"), "{e}");

    let store = config("store", r#"{"credsStore":"bundletest"}"#.to_owned());
    let out = ok(push(Some(&store)));
    assert!(out.contains("pushed 5 images"), "{out}");
    let asked = std::fs::read_to_string(&log).unwrap();
    assert!(asked.contains(&format!("get {host}")), "{asked}");
    reg.inspect_raw("team/app:1.0").unwrap();

    let pull_yaml = dir.join("pull.yaml");
    std::fs::write(
        &pull_yaml,
        format!("name: pulled\nversion: 1\nimages:\n  - name: {host}/team/app:1.0\n"),
    )
    .unwrap();
    let create = |docker_config, out: &str| {
        let mut c = bundle(Some(docker_config));
        c.arg("create")
            .arg(&pull_yaml)
            .arg("-o")
            .arg(dir.join(out))
            .arg("--cache")
            .arg(dir.join(format!("cache-{out}")))
            .arg("--registry-ca")
            .arg(&ca);
        c
    };
    let wrong_auths = format!(r#""auths":{{"{host}":{{"username":"{user}","password":"wrong"}}}}"#);
    let helpers = config(
        "helpers",
        format!(r#"{{{wrong_auths},"credHelpers":{{"{host}":"bundletest"}}}}"#),
    );
    ok(create(&helpers, "a.bundle"));
    let raw = reg.inspect_raw("team/app:1.0").unwrap();
    let pulled = support::inspect_json(&dir.join("a.bundle"));
    assert_eq!(
        pulled["images"][0]["digest"],
        support::sha256(&raw).as_str()
    );

    let wrong = config("wrong", format!("{{{wrong_auths}}}"));
    let e = fails(create(&wrong, "b.bundle"));
    assert!(
        e.contains(&host) && e.contains("team/app") && e.contains("authentication failed"),
        "{e}"
    );
    assert!(!dir.join("b.bundle").exists());
}
