//! The harness itself: every registry mode takes a push from skopeo and serves it back, auth is
//! really enforced, restart keeps the data, and the fault proxy injects what it is told.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::containerd::{Containerd, PLATFORM};
use crate::harness::{
    Fault, FaultProxy, Mode, PASSWORD, Registry, Rule, USER, oci_ref, require_tool, skopeo,
    skopeo_copy, small_images,
};

/// Pushes `app-1.0` of the small set to `selftest/app:1.0` and checks that the registry serves
/// the very manifest bytes of the layout.
fn push_and_inspect(reg: &Registry) {
    let (_tmp, set) = small_images();
    reg.push(&oci_ref(&set, "app-1.0"), "selftest/app:1.0")
        .unwrap();
    let raw = reg.inspect_raw("selftest/app:1.0").unwrap();
    let expected = set
        .images
        .iter()
        .find(|i| i.tag.as_deref() == Some("app-1.0") && i.source.starts_with("oci-layout:"))
        .and_then(|i| i.descriptor.clone())
        .unwrap();
    assert_eq!(
        format!("sha256:{}", hex(&Sha256::digest(&raw))),
        expected.digest
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET PATH` over a fresh connection, read to the end. Returns what arrived and the error that
/// ended the read, if any.
fn raw_get(host: &str, path: &str) -> (Vec<u8>, Option<io::Error>) {
    raw_request(host, "GET", path)
}

fn raw_request(host: &str, method: &str, path: &str) -> (Vec<u8>, Option<io::Error>) {
    let mut stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn harness_plain_registry_round_trips_a_skopeo_push() {
    let reg = Registry::start(Mode::Plain);
    assert!(reg.ca_file().is_none() && reg.credentials().is_none());
    push_and_inspect(&reg);
    let (response, _) = raw_get(&reg.host(), "/v2/");
    assert_eq!(status_line(&response), "HTTP/1.1 200 OK");
    assert!(
        reg.storage_dir()
            .join("docker/registry/v2/repositories/selftest/app")
            .is_dir(),
        "the push landed in the storage dir"
    );
    // Deletes are on (distribution answers 405 when they are off).
    let digest = format!(
        "sha256:{}",
        hex(&Sha256::digest(
            reg.inspect_raw("selftest/app:1.0").unwrap()
        ))
    );
    let path = format!("/v2/selftest/app/manifests/{digest}");
    let (response, _) = raw_request(&reg.host(), "DELETE", &path);
    assert_eq!(status_line(&response), "HTTP/1.1 202 Accepted");
    reg.inspect_raw("selftest/app:1.0").unwrap_err();
}

#[test]
fn harness_tls_registry_is_trusted_only_with_its_ca() {
    let reg = Registry::start(Mode::Tls);
    assert!(reg.ca_file().unwrap().is_file());
    push_and_inspect(&reg);
    let err = skopeo(&["inspect", "--raw", &reg.docker_ref("selftest/app:1.0")]).unwrap_err();
    assert!(
        err.contains("certificate"),
        "without the CA skopeo must refuse the certificate: {err}"
    );
}

#[test]
fn harness_basic_auth_registry_refuses_a_wrong_password() {
    let reg = Registry::start(Mode::TlsBasicAuth);
    assert_eq!(reg.credentials(), Some((USER, PASSWORD)));
    push_and_inspect(&reg);

    let (_tmp, set) = small_images();
    for creds in [Some((USER, "wrong-pass")), None] {
        let flags = reg.skopeo_args("dest-", creds);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let err = skopeo_copy(
            &oci_ref(&set, "plain-1.0"),
            &reg.docker_ref("selftest/plain:1.0"),
            &flags,
        )
        .unwrap_err();
        assert!(
            err.to_lowercase().contains("unauthorized") || err.contains("401"),
            "{creds:?}: {err}"
        );
    }
}

#[test]
fn harness_token_registry_serves_skopeo_through_the_bearer_flow() {
    let reg = Registry::start(Mode::Token);
    let tokens = reg.token_server().unwrap();
    push_and_inspect(&reg);
    assert!(
        tokens.tokens_issued() >= 2,
        "a push and an inspect need tokens"
    );
    let scopes = tokens.scopes();
    assert!(
        scopes
            .iter()
            .any(|s| s.contains("repository:selftest/app:pull,push")),
        "{scopes:?}"
    );

    // The token server refuses a wrong password, so skopeo gets no token.
    let before = tokens.tokens_issued();
    let flags = reg.skopeo_args("", Some((USER, "wrong-pass")));
    let mut args = vec!["inspect", "--raw"];
    args.extend(flags.iter().map(String::as_str));
    let target = reg.docker_ref("selftest/app:1.0");
    args.push(&target);
    let err = skopeo(&args).unwrap_err();
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    assert_eq!(tokens.tokens_issued(), before);

    // The registry reads the access claims: a pull-only token cannot push.
    tokens.restrict_actions(&["pull"]);
    reg.inspect_raw("selftest/app:1.0").unwrap();
    let (_tmp, set) = small_images();
    let err = reg
        .push(&oci_ref(&set, "plain-1.0"), "selftest/plain:1.0")
        .unwrap_err();
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("denied"),
        "{err}"
    );
}

#[test]
fn harness_restart_keeps_the_data_and_the_port() {
    let mut reg = Registry::start(Mode::Plain);
    push_and_inspect(&reg);
    let host = reg.host();

    reg.stop();
    assert!(
        TcpStream::connect(&host).is_err(),
        "a stopped registry listens no more"
    );
    assert!(reg.inspect_raw("selftest/app:1.0").is_err());

    reg.restart();
    assert_eq!(reg.host(), host);
    reg.inspect_raw("selftest/app:1.0").unwrap();
    reg.restart();
    reg.inspect_raw("selftest/app:1.0").unwrap();
}

#[test]
fn harness_fault_proxy_answers_every_kth_request_with_a_status() {
    let reg = Registry::start(Mode::Plain);
    let proxy = FaultProxy::start(
        &reg.host(),
        vec![
            Rule::new(Fault::Status(429)).when("/_catalog"),
            Rule::new(Fault::Status(503)).every(2),
        ],
    );

    let statuses: Vec<String> = (0..4)
        .map(|_| status_line(&raw_get(&proxy.host(), "/v2/").0))
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 503 Service Unavailable",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 503 Service Unavailable"
        ]
    );
    let (response, _) = raw_get(&proxy.host(), "/v2/_catalog");
    assert_eq!(status_line(&response), "HTTP/1.1 429 Too Many Requests");
    assert!(String::from_utf8_lossy(&response).contains("Retry-After: 1\r\n"));
    assert_eq!((proxy.requests(), proxy.faults()), (5, 3));

    proxy.set_enabled(false);
    let (response, _) = raw_get(&proxy.host(), "/v2/_catalog");
    assert_eq!(status_line(&response), "HTTP/1.1 200 OK");
    assert_eq!((proxy.requests(), proxy.faults()), (6, 3));

    // skopeo through the proxy sees the 503 (it does not retry one).
    proxy.set_rules(vec![Rule::new(Fault::Status(503)).when("/manifests/")]);
    proxy.set_enabled(true);
    let (_tmp, set) = small_images();
    let dst = format!("docker://{}/selftest/app:1.0", proxy.host());
    let err = skopeo_copy(
        &oci_ref(&set, "app-1.0"),
        &dst,
        &["--dest-tls-verify=false"],
    )
    .unwrap_err();
    assert!(err.contains("503"), "{err}");
}

#[test]
fn harness_fault_proxy_resets_a_response_midway() {
    let reg = Registry::start(Mode::Plain);
    let (_tmp, set) = small_images();
    reg.push(&oci_ref(&set, "app-1.0"), "selftest/app:1.0")
        .unwrap();
    let app = set
        .images
        .iter()
        .find(|i| i.tag.as_deref() == Some("app-1.0"))
        .unwrap();
    let layer = &app.manifests[0].layers[0];
    let blob_path = format!("/v2/selftest/app/blobs/{}", layer.digest);

    let proxy = FaultProxy::start(
        &reg.host(),
        vec![Rule::new(Fault::ResetAfter(300)).when("/blobs/").limit(1)],
    );
    let (got, err) = raw_get(&proxy.host(), &blob_path);
    assert_eq!(got.len(), 300, "exactly the budget arrives");
    assert_eq!(
        err.map(|e| e.kind()),
        Some(io::ErrorKind::ConnectionReset),
        "then a reset, not a clean close"
    );

    // limit(1): the next blob GET goes through whole.
    let (got, err) = raw_get(&proxy.host(), &blob_path);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(status_line(&got), "HTTP/1.1 200 OK");
    let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.len() - body_at, usize::try_from(layer.size).unwrap());
    assert_eq!((proxy.requests(), proxy.faults()), (2, 1));

    // skopeo pulling through the proxy fails on a reset blob, and succeeds with faults off.
    proxy.set_rules(vec![Rule::new(Fault::ResetAfter(200)).when("/blobs/")]);
    let out = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/selftest/app:1.0", proxy.host());
    let dst = format!("oci:{}:app", out.path().join("pulled").display());
    skopeo_copy(&src, &dst, &["--src-tls-verify=false"]).unwrap_err();
    proxy.set_enabled(false);
    skopeo_copy(&src, &dst, &["--src-tls-verify=false"]).unwrap();
}

#[test]
fn harness_missing_tool_fails_with_the_fix() {
    let panic = std::panic::catch_unwind(|| require_tool("bundle-no-such-tool")).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert_eq!(
        message,
        "bundle-no-such-tool is not installed; run `cargo xtask ci`, which installs it"
    );
}

#[test]
fn harness_containerd_pulls_from_the_plain_registry_and_unpacks() {
    let reg = Registry::start(Mode::Plain);
    let (_tmp, set) = small_images();
    reg.push(&oci_ref(&set, "app-1.0"), "selftest/app:1.0")
        .unwrap();
    // The whole index (both platforms); ctr picks linux/amd64 from it.
    let mut flags = reg.skopeo_dest_args();
    flags.push("--all".to_owned());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    skopeo_copy(
        &oci_ref(&set, "multi-1.0"),
        &reg.docker_ref("selftest/multi:1.0"),
        &flags,
    )
    .unwrap();

    let started = std::time::Instant::now();
    let containerd = Containerd::start();
    eprintln!("containerd answered after {:?}", started.elapsed());

    for (repo_ref, dir) in [("selftest/app:1.0", "app"), ("selftest/multi:1.0", "multi")] {
        let reference = format!("{}/{repo_ref}", reg.host());
        let served = format!(
            "sha256:{}",
            hex(&Sha256::digest(reg.inspect_raw(repo_ref).unwrap()))
        );

        let started = std::time::Instant::now();
        let pulled = containerd
            .pull(&reference, &["--plain-http", "--platform", PLATFORM])
            .unwrap();
        eprintln!("ctr pulled {reference} in {:?}", started.elapsed());
        assert_eq!(pulled.digest, served, "{reference}");
        assert_eq!(containerd.image_digest(&reference).unwrap(), Some(served));
        assert!(containerd.is_unpacked(&reference).unwrap(), "{reference}");

        // Unpacked for real: the rootfs holds the base layer and the amd64 app layer.
        let rootfs = containerd.snapshot_dir(&pulled.chain_id).unwrap();
        assert!(rootfs.join("bin/hello").is_file(), "{}", rootfs.display());
        assert_eq!(
            std::fs::read_to_string(rootfs.join(dir).join("arch")).unwrap(),
            "amd64\n"
        );
    }

    // The plain helper agrees, also on a second pull of the same image.
    let app = format!("{}/selftest/app:1.0", reg.host());
    let digest = containerd.pull_plain_http(&app).unwrap();
    assert_eq!(containerd.image_digest(&app).unwrap(), Some(digest));
    containerd.images_rm(&app).unwrap();
    assert_eq!(containerd.image_digest(&app).unwrap(), None);

    // A missing tag fails with ctr's stderr.
    let err = containerd
        .pull_plain_http(&format!("{}/selftest/app:nope", reg.host()))
        .unwrap_err();
    assert!(err.contains("not found"), "{err}");
}
