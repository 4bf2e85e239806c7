//! `bundle deploy` and `bundle remove` where no cluster is needed: a kubeconfig that names no
//! reachable server, an unknown context, a missing file (each a one-line error naming what
//! to check), and `--registry`, which pushes straight into a real registry (CNCF
//! distribution). Deploys into clusters are tested by crates/deploy (mock API server) and
//! `cargo xtask e2e` (a real cluster).

use std::path::Path;

use crate::support::{self, fails, ok};

use crate::registry::harness::{Mode, Registry};

/// A kubeconfig whose only context points at `server`.
fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\ncurrent-context: ctx\n"
        ),
    )
    .unwrap();
    p
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn archive(dir: &Path) -> std::path::PathBuf {
    let yaml = support::small_set(&dir.join("images"));
    let archive = dir.join("demo.bundle");
    support::create(&yaml, &archive, &[]);
    archive
}

#[test]
fn deploy_and_remove_without_a_reachable_cluster_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let a = archive(dir.path());
    let server = format!("https://127.0.0.1:{}", closed_port());
    let kc = kubeconfig(dir.path(), &server);
    let mut c = support::bundle();
    c.arg("deploy").arg(&a).arg("--kubeconfig").arg(&kc);
    let err = fails(c);
    assert!(
        err.contains(&format!(
            "cannot reach the Kubernetes API server at {server}"
        )),
        "{err}"
    );
    assert!(
        err.contains("hint: check --kubeconfig and --context"),
        "{err}"
    );
    let mut c = support::bundle();
    c.args(["remove", "--kubeconfig"]).arg(&kc);
    let err = fails(c);
    assert!(
        err.contains("cannot reach the Kubernetes API server"),
        "{err}"
    );
}

#[test]
fn deploy_names_an_unknown_context_and_a_missing_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let a = archive(dir.path());
    let kc = kubeconfig(dir.path(), "https://127.0.0.1:1");
    let mut c = support::bundle();
    c.arg("deploy")
        .arg(&a)
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["--context", "prod"]);
    let err = fails(c);
    assert!(
        err.contains(&format!(
            "kubeconfig {}: no context \"prod\" (it has: ctx)",
            kc.display()
        )),
        "{err}"
    );
    let missing = dir.path().join("nope");
    let mut c = support::bundle();
    c.arg("deploy").arg(&a).arg("--kubeconfig").arg(&missing);
    let err = fails(c);
    assert!(
        err.contains(&format!("kubeconfig {}", missing.display())),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn deploy_refuses_bad_flags_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let a = archive(dir.path());
    let kc = kubeconfig(dir.path(), "https://127.0.0.1:1");
    let mut c = support::bundle();
    c.arg("deploy")
        .arg(&a)
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["--storage", "disk"]);
    let err = fails(c);
    assert!(
        err.contains("--storage \"disk\": expected auto, emptydir or pvc:SIZE"),
        "{err}"
    );
}

#[test]
fn deploy_with_registry_pushes_straight_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = archive(dir.path());
    let inspect = support::inspect_json(&a);
    let reg = Registry::start(Mode::Plain);
    let host = reg.host();
    let deploy = || {
        let mut c = support::bundle();
        c.arg("deploy")
            .arg(&a)
            .args(["--registry", &host, "--insecure-registry", &host]);
        ok(c)
    };
    let out = deploy();
    for img in inspect["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        let repo_ref = name.strip_prefix("registry.example/").unwrap();
        assert!(
            out.contains(&format!("{name} -> {host}/{repo_ref}")),
            "{out}"
        );
        let raw = reg.inspect_raw(repo_ref).unwrap();
        assert_eq!(
            support::sha256(&raw),
            img["digest"].as_str().unwrap(),
            "{name}"
        );
    }
    let again = deploy();
    // The same as a URL: http:// needs no --insecure-registry.
    let mut c = support::bundle();
    c.arg("deploy")
        .arg(&a)
        .args(["--registry", &format!("http://{host}/")]);
    let url = ok(c);
    assert!(url.contains(" 0 blobs uploaded"), "{url}");
    assert!(
        again.contains(" 0 blobs uploaded") && again.contains(" 0 bytes sent"),
        "{again}"
    );
}
