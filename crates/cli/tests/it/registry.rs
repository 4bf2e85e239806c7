//! `bundle push` and `bundle create` from registry references, with `bundle.lock` and
//! `--locked`, against the real registry (CNCF distribution).

use crate::support::{self, fails, ok};

#[path = "../../../oci/tests/it/harness.rs"]
pub(crate) mod harness;

use harness::{Mode, Registry};

fn push(archive: &std::path::Path, reg: &Registry, extra: &[&str]) -> String {
    let mut c = support::bundle();
    c.arg("push")
        .arg(archive)
        .args([
            "--registry",
            &reg.host(),
            "--insecure-registry",
            &reg.host(),
        ])
        .args(extra);
    ok(c)
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
}
