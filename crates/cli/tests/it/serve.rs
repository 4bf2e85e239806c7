//! `bundle serve` against real clients: skopeo copies every image of an archive (whole or split)
//! with the digests `bundle inspect` reports, containerd pulls one, and a bad request is
//! answered without stopping the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support;

#[path = "../../../oci/tests/it/containerd.rs"]
mod containerd;

/// How long a server may take to print its address (a loaded 2-core machine builds and runs
/// many tests at once).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `bundle serve` process on 127.0.0.1:0. Dropping it kills the process (SIGKILL) and reaps
/// it; when a test fails, its stderr is printed first.
struct Server {
    child: Child,
    host: String,
    stderr: PathBuf,
    _logs: tempfile::TempDir,
}

impl Server {
    /// Starts `bundle serve ARCHIVES... --listen 127.0.0.1:0` and waits for its `serving` line.
    fn start(archives: &[PathBuf]) -> Server {
        Server::start_with(archives, &[])
    }

    /// The same with more `serve` arguments.
    fn start_with(archives: &[PathBuf], extra: &[&str]) -> Server {
        let logs = tempfile::tempdir().unwrap();
        let stderr = logs.path().join("stderr");
        let mut cmd = support::bundle();
        cmd.arg("serve")
            .args(archives)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = cmd.spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        // Reads to the end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            host: String::new(),
            stderr,
            _logs: logs,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    // `serving demo 1.0.0 (5 images) on http://127.0.0.1:PORT/v2/`
                    if let Some(url) = line.strip_prefix("serving ").and_then(|l| {
                        l.split_once(" on http://")
                            .and_then(|(_, u)| u.strip_suffix("/v2/"))
                    }) {
                        server.host = url.to_owned();
                        return server;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => panic!(
                    "bundle serve printed no `serving ... on http://ADDR/v2/` line within \
                     {START_TIMEOUT:?} (exit: {:?}); stderr:\n{}",
                    server.child.try_wait(),
                    server.stderr()
                ),
            }
        }
    }

    /// `127.0.0.1:PORT`.
    fn host(&self) -> &str {
        &self.host
    }

    /// `docker://127.0.0.1:PORT/REPO_REF`.
    fn docker_ref(&self, repo_ref: &str) -> String {
        format!("docker://{}/{repo_ref}", self.host)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Panics unless the process still runs.
    fn assert_running(&mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "bundle serve exited ({status:?}); stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- bundle serve on {} stderr ----\n{}\n---- end ----",
                self.host,
                self.stderr()
            );
        }
    }
}

/// The small set as an archive (extra `create` arguments, e.g. `--split-size`); returns the
/// temp dir, the archive's path and the images `(name, digest)` of `bundle inspect --json`.
fn small_archive(extra: &[&str]) -> (tempfile::TempDir, PathBuf, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::small_set(&dir.path().join("images"));
    let archive = dir.path().join("demo.bundle");
    support::create(&yaml, &archive, extra);
    let images = images_of(&support::inspect_json(&archive));
    (dir, archive, images)
}

fn images_of(inspect: &serde_json::Value) -> Vec<(String, String)> {
    let images: Vec<(String, String)> = inspect["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(images.len(), 5, "{inspect}");
    images
}

/// Where `bundle serve` puts an image: its name without the registry host.
fn repo_ref(name: &str) -> &str {
    name.strip_prefix("registry.example/").unwrap()
}

/// `skopeo --insecure-policy --command-timeout=60s ARGS`: `Ok(stdout)`, or `Err` with the
/// status and stderr. (registry.rs includes the shared harness, which has the same; a second
/// copy of that module is refused by clippy.)
fn skopeo(args: &[&str]) -> Result<Vec<u8>, String> {
    let mut c = support::tool("skopeo");
    c.args(["--insecure-policy", "--command-timeout=60s"])
        .args(args)
        .stdin(Stdio::null());
    let out = support::run(c);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "skopeo {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `skopeo copy --quiet EXTRA SRC DST`.
fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) -> Result<(), String> {
    let mut args = vec!["copy", "--quiet"];
    args.extend_from_slice(extra);
    args.extend([src, dst]);
    skopeo(&args).map(drop)
}

/// `skopeo inspect --raw`: the manifest bytes as served.
fn inspect_raw(server: &Server, repo_ref: &str) -> Result<Vec<u8>, String> {
    skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &server.docker_ref(repo_ref),
    ])
}

/// `skopeo copy --all --preserve-digests` of `repo_ref` into a fresh OCI layout under `dir`;
/// returns the digest the layout's `index.json` records for it. skopeo checks every blob's
/// digest as it copies.
fn copy_out(server: &Server, repo_ref: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let layout = dir.join(repo_ref.replace(['/', ':', '@'], "_"));
    skopeo_copy(
        &server.docker_ref(repo_ref),
        &format!("oci:{}:x", layout.display()),
        &["--all", "--preserve-digests", "--src-tls-verify=false"],
    )
    .unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    manifests[0]["digest"].as_str().unwrap().to_owned()
}

/// Every image: served manifest bytes hash to the archive's digest, a full copy keeps it, and
/// a by-digest reference finds the same manifest.
fn check_every_image(server: &Server, images: &[(String, String)], scratch: &Path) {
    for (name, digest) in images {
        let r = repo_ref(name);
        let raw = inspect_raw(server, r).unwrap();
        assert_eq!(&support::sha256(&raw), digest, "{name}: served manifest");
        assert_eq!(&copy_out(server, r, scratch), digest, "{name}: copied");
        let repo = r.split_once(':').unwrap().0;
        let by_digest = skopeo(&[
            "inspect",
            "--tls-verify=false",
            &server.docker_ref(&format!("{repo}@{digest}")),
        ])
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&by_digest).unwrap();
        assert_eq!(v["Digest"], digest.as_str(), "{name}: by digest: {v}");
    }
}

/// A plain HTTP/1.1 GET (`Connection: close`): the status code and the body.
fn http_get(host: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[test]
fn skopeo_copies_every_image_with_the_archives_digests() {
    let (dir, archive, images) = small_archive(&[]);
    let mut server = Server::start(std::slice::from_ref(&archive));
    check_every_image(&server, &images, dir.path());

    // The catalog lists every repository, and skopeo finds each tag.
    let (status, body) = http_get(server.host(), "/v2/_catalog");
    assert_eq!(status, 200, "{body}");
    let catalog: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut repos: Vec<&str> = images
        .iter()
        .map(|(n, _)| repo_ref(n).split_once(':').unwrap().0)
        .collect();
    repos.sort_unstable();
    assert_eq!(catalog["repositories"], serde_json::json!(repos), "{body}");
    for (name, _) in &images {
        let (repo, tag) = repo_ref(name).split_once(':').unwrap();
        let tags = skopeo(&["list-tags", "--tls-verify=false", &server.docker_ref(repo)]).unwrap();
        let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
        assert_eq!(tags["Tags"], serde_json::json!([tag]), "{name}");
    }

    // What the archive lacks fails cleanly, and the server goes on serving.
    let cases: &[(&str, &str)] = &[
        ("team/app:nope", "manifest unknown"),
        ("team/nope:1.0", "name unknown"),
        (
            "team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "manifest unknown",
        ),
    ];
    for (r, want) in cases {
        let err = inspect_raw(&server, r).unwrap_err();
        assert!(err.contains(want), "{r}: {err}");
        let err = skopeo_copy(
            &server.docker_ref(r),
            &format!("oci:{}:x", dir.path().join("unknown").display()),
            &["--src-tls-verify=false"],
        )
        .unwrap_err();
        assert!(err.contains(want), "{r}: {err}");
        server.assert_running();
    }
    let (name, digest) = &images[0];
    assert_eq!(
        &support::sha256(&inspect_raw(&server, repo_ref(name)).unwrap()),
        digest
    );
    server.assert_running();
}

#[test]
fn a_split_archive_is_served_from_its_parts_with_the_same_digests() {
    let (dir, _archive, whole) = small_archive(&[]);
    // Small enough that the small set needs several parts (see split.rs).
    let split = dir.path().join("split.bundle");
    support::create(
        &dir.path().join("images/bundle.yaml"),
        &split,
        &["--split-size", "8KiB"],
    );
    let parts: Vec<PathBuf> = (0..)
        .map(|i| dir.path().join(format!("split.bundle.{i:03}")))
        .take_while(|p| p.exists())
        .collect();
    assert!(parts.len() >= 3, "{parts:?}");
    assert_eq!(images_of(&support::inspect_json(&parts[0])), whole);

    let server = Server::start(&parts);
    check_every_image(&server, &whole, &dir.path().join("copies"));
    // One part names the others: they are found beside it.
    let server = Server::start(&parts[1..2]);
    check_every_image(&server, &whole, &dir.path().join("copies-from-one-part"));
}

#[test]
fn containerd_pulls_from_bundle_serve() {
    let (_dir, archive, images) = small_archive(&[]);
    let server = Server::start(std::slice::from_ref(&archive));
    let containerd = containerd::Containerd::start();
    // One image manifest, and one image index (ctr picks linux/amd64 from it).
    for name in [
        "registry.example/team/app:1.0",
        "registry.example/team/multi:1.0",
    ] {
        let digest = &images.iter().find(|(n, _)| n == name).unwrap().1;
        let reference = format!("{}/{}", server.host(), repo_ref(name));
        let pulled = containerd.pull_plain_http(&reference).unwrap();
        assert_eq!(&pulled, digest, "{reference}");
        assert!(containerd.is_unpacked(&reference).unwrap(), "{reference}");
    }
}

/// `bundle serve ARGS` fails; returns its stderr.
fn serve_fails(args: &[&Path]) -> String {
    let mut c = support::bundle();
    c.arg("serve").args(args).args(["--listen", "127.0.0.1:0"]);
    support::fails(c)
}

#[test]
fn a_missing_part_is_named() {
    let (dir, _archive, _) = small_archive(&["--split-size", "8KiB"]);
    let missing = dir.path().join("demo.bundle.001");
    std::fs::remove_file(&missing).unwrap();
    let err = serve_fails(&[&dir.path().join("demo.bundle.000")]);
    assert!(
        err.contains("part 1 of") && err.contains(missing.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn a_missing_archive_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.bundle");
    let err = serve_fails(&[&missing]);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    // `X: cause: cause` is an error that both prints its source and returns it as `source()`.
    let parts: Vec<&str> = err.trim().split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "the cause is printed twice: {err}");
    }
}

/// A byte flipped inside a layer's frame: without `--verify` the frame's zstd checksum stops
/// the blob, with it the sha256 against the index does (and the log names the frame); either
/// way the pull fails, the server keeps serving, and images that do not use the frame pull.
#[test]
fn a_damaged_frame_fails_the_pull_with_and_without_verify() {
    let (dir, archive, images) = small_archive(&[]);
    let a = bundle_format::Archive::open(&archive).unwrap();
    let app = a
        .index()
        .images
        .iter()
        .find(|i| i.name == "registry.example/team/app:1.0")
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&a.read_blob(&app.digest).unwrap()).unwrap();
    let layer: bundle_format::Digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let frame = &a.index().frames[a.index().blob(&layer).unwrap().first_frame as usize];
    let at = frame.offset() + u64::from(frame.csize()) / 2;
    drop(a);
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&archive, bytes).unwrap();
    let untouched: Vec<&(String, String)> = images
        .iter()
        .filter(|(n, _)| n.contains("/team/plain:"))
        .collect();
    assert_eq!(untouched.len(), 1);
    for extra in [&[][..], &["--verify"][..]] {
        let mut server = Server::start_with(std::slice::from_ref(&archive), extra);
        let err = skopeo_copy(
            &server.docker_ref("team/app:1.0"),
            &format!("oci:{}:x", dir.path().join("out").display()),
            &["--src-tls-verify=false"],
        )
        .unwrap_err();
        eprintln!("{extra:?}: {err}");
        server.assert_running();
        let scratch = dir.path().join(format!("ok{}", extra.len()));
        check_every_image(
            &server,
            &untouched.iter().map(|&x| x.clone()).collect::<Vec<_>>(),
            &scratch,
        );
        if extra.is_empty() {
            assert!(server.stderr().contains("zstd"), "{}", server.stderr());
        } else {
            assert!(server.stderr().contains("sha256"), "{}", server.stderr());
        }
    }
}
