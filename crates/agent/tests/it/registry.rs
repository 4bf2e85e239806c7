//! `bundle-agent registry` with real clients: skopeo pushes and pulls, `bundle push` fills it
//! and finds everything there on a second run, containerd pulls from it, a `kill -9` mid-push
//! loses nothing, and it writes only below `--root` (run with `/` read-only where the test
//! may remount it). The process and peer helpers here serve inject.rs too.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bundle_format::{Archive, BlobInput, BundleInput, Content, Digest, ImageInput, WriteOptions};
use bundle_testimages::SmallSet;
use tempfile::TempDir;

#[path = "../../../oci/tests/it/containerd.rs"]
pub(crate) mod containerd;

/// How long an agent may take to print `listening on` or to exit (a loaded 2-core machine
/// builds and runs many tests at once).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// `bundle-agent ARGS`.
pub(crate) fn agent_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bundle-agent"));
    c.args(args);
    c
}

/// The `bundle` binary, the push client, found next to the agent: cargo builds every
/// workspace binary into the same directory, but only `cargo test --workspace` (or a build of
/// bundle-cli) puts it there.
pub(crate) fn bundle_cmd() -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_bundle-agent")).with_file_name("bundle");
    assert!(
        bin.is_file(),
        "the `bundle` binary is not at {}; these tests drive it as the push client. Build it \
         first: `cargo build -p bundle-cli` (`cargo test --workspace` does)",
        bin.display()
    );
    Command::new(bin)
}

/// Runs a command to its end and returns what it printed; panics when it fails.
pub(crate) fn ok(mut cmd: Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An agent that stopped before it listened.
#[derive(Debug)]
pub(crate) struct Exited {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// A running `bundle-agent` (or a wrapper that execs it, so that the pid is the agent's).
/// Dropping it kills the process (SIGKILL) and reaps it; when a test fails, its stderr is
/// printed first.
pub(crate) struct Agent {
    child: Child,
    addr: String,
    stderr: PathBuf,
    _logs: TempDir,
}

impl Agent {
    /// `bundle-agent registry --root ROOT --listen LISTEN`, listening.
    pub(crate) fn registry(root: &Path, listen: &str) -> Agent {
        let mut c = agent_cmd(&["registry", "--listen", listen]);
        c.arg("--root").arg(root);
        Agent::start(c)
    }

    /// Spawns `cmd` and waits for `listening on ADDR`; panics when it exits or stays silent.
    pub(crate) fn start(cmd: Command) -> Agent {
        Agent::try_start(cmd).unwrap_or_else(|e| {
            panic!(
                "bundle-agent exited before it listened ({}):\nstdout: {}\nstderr: {}",
                e.status, e.stdout, e.stderr
            )
        })
    }

    /// Spawns `cmd` and waits up to [`START_TIMEOUT`] for `listening on ADDR`, or for the
    /// process to exit (`Err`). Panics when neither happens in time.
    pub(crate) fn try_start(mut cmd: Command) -> Result<Agent, Exited> {
        let logs = tempfile::tempdir().unwrap();
        let stderr = logs.path().join("stderr");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        // Reads to the end, so the agent never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut agent = Agent {
            child,
            addr: String::new(),
            stderr,
            _logs: logs,
        };
        let mut stdout = String::new();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        agent.addr = addr.trim().to_owned();
                        return Ok(agent);
                    }
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = agent.child.wait().unwrap();
                    return Err(Exited {
                        status,
                        stdout,
                        stderr: agent.stderr(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{cmd:?}: neither `listening on` nor an exit within {START_TIMEOUT:?}; \
                     stderr:\n{}",
                    agent.stderr()
                ),
            }
        }
    }

    /// The process id (the agent's own when a wrapper execs it).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:PORT`, as it goes into an image reference.
    pub(crate) fn host(&self) -> &str {
        &self.addr
    }

    /// What it printed on stderr so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Panics unless the process still runs.
    pub(crate) fn assert_running(&mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "bundle-agent exited ({status:?}); stderr:\n{}",
            self.stderr()
        );
    }

    /// `kill -9`, as a node failure would, and reaps it.
    pub(crate) fn crash(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status}"
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- bundle-agent on {} stderr ----\n{}\n---- end ----",
                self.addr,
                self.stderr()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

/// `skopeo --insecure-policy --command-timeout=60s ARGS`: `Ok(stdout)`, or `Err` with the
/// status and stderr. Panics when skopeo is not installed.
pub(crate) fn skopeo(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "--command-timeout=60s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running skopeo: {e}; run `cargo xtask ci`, which installs it"));
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

/// sha256 of the manifest bytes the registry at `host` serves for `repo_ref` (`skopeo
/// inspect --raw`), or skopeo's error.
pub(crate) fn served_digest(host: &str, repo_ref: &str) -> Result<String, String> {
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{host}/{repo_ref}"),
    ])?;
    Ok(Digest::of(&raw).to_string())
}

/// `skopeo copy --all --preserve-digests` of `repo_ref` from `host` into a fresh OCI layout
/// below `dir`; returns the digest its `index.json` records. skopeo checks every blob's digest
/// as it copies.
pub(crate) fn copy_out(host: &str, repo_ref: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let layout = dir.join(repo_ref.replace(['/', ':', '@'], "_"));
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{host}/{repo_ref}"),
        &format!("oci:{}:x", layout.display()),
    ])
    .unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    manifests[0]["digest"].as_str().unwrap().to_owned()
}

/// A plain HTTP/1.1 GET (`Connection: close`) of `path`: the status and the body as JSON.
pub(crate) fn get_json(host: &str, path: &str) -> (u16, serde_json::Value) {
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
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
    (status, body)
}

/// Panics when an error message says the same thing twice in a row (`X: cause: cause`), as
/// it does when an error both prints its source and returns it as `source()`, so that the
/// `{:#}` chain repeats it.
pub(crate) fn assert_cause_once(stderr: &str) {
    let parts: Vec<&str> = stderr.trim().split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "the cause is printed twice: {stderr}");
    }
}

/// Where a pushed or served image is: its name without the registry host.
pub(crate) fn repo_ref(name: &str) -> &str {
    name.strip_prefix("registry.example/").unwrap()
}

// ---------------------------------------------------------------------------------------------
// Archives
// ---------------------------------------------------------------------------------------------

/// The small image set below `dir/images`, written as the archive `dir/demo.bundle` (what
/// `bundle create` makes of its bundle.yaml).
pub(crate) fn small_archive(dir: &Path) -> (SmallSet, PathBuf) {
    let set = bundle_testimages::small_set(&dir.join("images")).unwrap();
    let mut input = BundleInput {
        name: "demo".into(),
        version: "1.0.0".into(),
        ..BundleInput::default()
    };
    for img in &set.images {
        let spec = bundle_layout::SourceSpec::parse(&img.source)
            .unwrap()
            .relative_to(&set.dir);
        let r = bundle_layout::resolve(&img.name, &spec, &[]).unwrap();
        input.images.push(r.image);
        input.blobs.extend(r.blobs);
    }
    let out = dir.join("demo.bundle");
    bundle_format::write(&input, &out, &WriteOptions::default()).unwrap();
    (set, out)
}

/// `(name, digest)` of every image of an archive.
pub(crate) fn images_of(archive: &Path) -> Vec<(String, String)> {
    Archive::open(archive)
        .unwrap()
        .index()
        .images
        .iter()
        .map(|i| (i.name.clone(), i.digest.to_string()))
        .collect()
}

fn mem_blob(bytes: Vec<u8>, media_type: &str) -> BlobInput {
    BlobInput {
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        media_type: Some(media_type.into()),
        content: Content::Bytes(bytes.into()),
    }
}

/// `registry.example/big/app:1`: one image whose layers are incompressible noise of `sizes`
/// bytes, as the archive `dir/big.bundle`.
fn big_archive(dir: &Path, sizes: &[usize]) -> PathBuf {
    const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    let mut blobs: Vec<BlobInput> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| mem_blob(bundle_testimages::noise(i as u64 + 7, n), LAYER))
        .collect();
    let config = mem_blob(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec(),
        "application/vnd.oci.image.config.v1+json",
    );
    let layers: Vec<String> = blobs
        .iter()
        .map(|b| {
            format!(
                r#"{{"mediaType":"{LAYER}","digest":"{}","size":{}}}"#,
                b.digest, b.size
            )
        })
        .collect();
    let manifest = mem_blob(
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
            config.digest,
            config.size,
            layers.join(",")
        )
        .into_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let image = ImageInput {
        name: "registry.example/big/app:1".into(),
        digest: manifest.digest,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: manifest.size,
        platforms: vec!["linux/amd64".into()],
    };
    blobs.push(config);
    blobs.push(manifest);
    let out = dir.join("big.bundle");
    let input = BundleInput {
        name: "big".into(),
        version: "1".into(),
        created: None,
        images: vec![image],
        blobs,
    };
    let opts = WriteOptions {
        level: 1,
        split_size: None,
    };
    bundle_format::write(&input, &out, &opts).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// bundle push
// ---------------------------------------------------------------------------------------------

/// `bundle push ARCHIVE --registry HOST --insecure-registry HOST EXTRA...`.
fn push_cmd(archive: &Path, host: &str, extra: &[&str]) -> Command {
    let mut c = bundle_cmd();
    c.arg("push")
        .arg(archive)
        .args(["--registry", host, "--insecure-registry", host])
        .args(extra);
    c
}

/// The counts of push's summary line, `pushed N images in T s: U blobs uploaded, S already
/// present, M mounted, K manifests, B bytes sent`.
#[derive(Debug, PartialEq, Eq)]
struct PushSummary {
    images: u64,
    uploaded: u64,
    present: u64,
    mounted: u64,
    manifests: u64,
    bytes: u64,
}

impl PushSummary {
    fn parse(stdout: &str) -> PushSummary {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("pushed "))
            .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
        // The number just before `what`.
        let count = |what: &str| -> u64 {
            let (head, _) = line
                .split_once(what)
                .unwrap_or_else(|| panic!("{what:?} in {line:?}"));
            let n = head.rsplit(' ').next().unwrap();
            n.parse()
                .unwrap_or_else(|e| panic!("{what:?} in {line:?}: {e}"))
        };
        PushSummary {
            images: count(" images in "),
            uploaded: count(" blobs uploaded"),
            present: count(" already present"),
            mounted: count(" mounted"),
            manifests: count(" manifests"),
            bytes: count(" bytes sent"),
        }
    }
}

fn push(archive: &Path, host: &str, extra: &[&str]) -> PushSummary {
    PushSummary::parse(&ok(push_cmd(archive, host, extra)))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn skopeo_pushes_and_pulls_back_the_same_digests() {
    let dir = tempfile::tempdir().unwrap();
    let set = bundle_testimages::small_set(&dir.path().join("images")).unwrap();
    let agent = Agent::registry(&dir.path().join("root"), "127.0.0.1:0");
    let host = agent.host();
    let layout = |tag: &str| format!("oci:{}:{tag}", set.layout.display());
    // A single-platform image, an image index, uncompressed layers, and a docker archive
    // (which skopeo sends with docker media types).
    let cases = [
        (layout("app-1.0"), "team/app:1.0"),
        (layout("multi-1.0"), "team/multi:1.0"),
        (layout("plain-1.0"), "team/plain:1.0"),
        (
            format!("docker-archive:{}", set.docker_archive.display()),
            "other/docker:1.0",
        ),
    ];
    let digest_file = dir.path().join("digest");
    for (from, to) in &cases {
        skopeo(&[
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--digestfile",
            digest_file.to_str().unwrap(),
            from,
            &format!("docker://{host}/{to}"),
        ])
        .unwrap();
        let want = std::fs::read_to_string(&digest_file).unwrap();
        if let Some(tag) = from.strip_prefix("oci:").and_then(|f| f.rsplit_once(':')) {
            assert_eq!(layout_digest(&set, tag.1), want, "{from}");
        }
        assert_eq!(served_digest(host, to).unwrap(), want, "{to}");
        let back = dir.path().join("back");
        assert_eq!(copy_out(host, to, &back), want, "{to}");
        let repo = to.split_once(':').unwrap().0;
        let by_digest = format!("{repo}@{want}");
        assert_eq!(copy_out(host, &by_digest, &back), want, "{by_digest}");
    }
    let (status, catalog) = get_json(host, "/v2/_catalog");
    assert_eq!(status, 200, "{catalog}");
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["other/docker", "team/app", "team/multi", "team/plain"])
    );
}

#[test]
fn bundle_push_fills_it_for_skopeo_and_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let (_set, archive) = small_archive(dir.path());
    let images = images_of(&archive);
    let agent = Agent::registry(&dir.path().join("root"), "127.0.0.1:0");
    let host = agent.host();

    let first = push(&archive, host, &[]);
    assert_eq!(first.images, 5, "{first:?}");
    assert!(first.uploaded > 0 && first.bytes > 0, "{first:?}");
    for (name, digest) in &images {
        let r = repo_ref(name);
        assert_eq!(&served_digest(host, r).unwrap(), digest, "{name}");
        assert_eq!(
            &copy_out(host, r, &dir.path().join("back")),
            digest,
            "{name}"
        );
    }
    // Everything is there already: nothing is uploaded again.
    let again = push(&archive, host, &[]);
    assert_eq!(
        (again.images, again.uploaded, again.mounted, again.bytes),
        (5, 0, 0, 0),
        "{again:?}"
    );
    assert_eq!(
        again.present,
        first.uploaded + first.present + first.mounted,
        "{again:?} after {first:?}"
    );

    let containerd = containerd::Containerd::start();
    for name in [
        "registry.example/team/app:1.0",
        "registry.example/team/multi:1.0",
    ] {
        let digest = &images.iter().find(|(n, _)| n == name).unwrap().1;
        let reference = format!("{host}/{}", repo_ref(name));
        assert_eq!(
            &containerd.pull_plain_http(&reference).unwrap(),
            digest,
            "{reference}"
        );
        assert!(containerd.is_unpacked(&reference).unwrap(), "{reference}");
    }
}

/// Every blob file below `root` holds the bytes its name says: a crash may leave uploads and
/// temp files, never a wrong blob.
fn assert_blobs_intact(root: &Path) -> usize {
    let dir = root.join("blobs/sha256");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        let found = Digest::of(&std::fs::read(&p).unwrap()).hex();
        assert_eq!(found, name, "{} holds other bytes", p.display());
        n += 1;
    }
    n
}

/// The most bytes any upload below `root` holds.
fn largest_upload(root: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(root.join("uploads")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| std::fs::metadata(e.path().join("data")).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_kill_9_mid_push_loses_nothing_and_the_push_completes() {
    let dir = tempfile::tempdir().unwrap();
    // 17 MiB is above push's monolithic limit (16 MiB), so it goes in 1 MiB chunks; the
    // 3 MiB layer goes in one PUT.
    let archive = big_archive(dir.path(), &[17 << 20, 3 << 20]);
    let (name, digest) = images_of(&archive).remove(0);
    let root = dir.path().join("root");
    let agent = Agent::registry(&root, "127.0.0.1:0");
    let host = agent.host().to_owned();

    let mut first = push_cmd(&archive, &host, &["--chunk-size", "1MiB", "--jobs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill once a chunked upload is under way (or, on a machine fast enough to finish first,
    // just after the push).
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = largest_upload(&root);
        if seen >= 2 << 20 || first.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    agent.crash();
    eprintln!("killed the agent with {seen} bytes in the largest upload");
    assert_blobs_intact(&root);

    // Same root, same port: the running push may pick its uploads up again.
    let agent = restart(&root, &host);
    // It does: it asks the restarted agent how much arrived and goes on from there.
    let first = wait_output(&mut first);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "the interrupted push failed ({}):\n{stdout}{}",
        first.status,
        String::from_utf8_lossy(&first.stderr)
    );
    let first = PushSummary::parse(&stdout);
    assert_eq!((first.uploaded, first.manifests), (3, 1), "{first:?}");

    // A rerun finds everything in place, the manifest too.
    let rerun = push(&archive, &host, &["--chunk-size", "1MiB"]);
    assert_eq!(
        (rerun.images, rerun.uploaded, rerun.present, rerun.manifests),
        (1, 0, 3, 0),
        "{rerun:?}"
    );
    let r = repo_ref(&name);
    assert_eq!(served_digest(&host, r).unwrap(), digest);
    assert_eq!(copy_out(&host, r, &dir.path().join("back")), digest);
    // config, two layers and the manifest, each intact.
    assert_eq!(assert_blobs_intact(&root), 4);
    drop(agent);
}

/// Starts the registry on `root` at `host` again, retrying while the old socket's port is
/// not free yet.
fn restart(root: &Path, host: &str) -> Agent {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut c = agent_cmd(&["registry", "--listen", host]);
        c.arg("--root").arg(root);
        match Agent::try_start(c) {
            Ok(a) => return a,
            Err(e) if e.stderr.contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the agent did not restart on {host}: {e:?}"),
        }
    }
}

/// Waits (bounded) for a child and collects its output.
fn wait_output(child: &mut Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the interrupted push did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status: child.wait().unwrap(),
        stdout,
        stderr,
    }
}

/// `unshare --mount --propagation private sh -c SCRIPT sh SCRIPT_ARGS... CMD...`: the script
/// changes mounts in a private mount namespace, then `exec "$@"`s the command, so the pid is
/// the command's.
fn in_mount_namespace(script: &str, script_args: &[&OsStr], cmd: &[&OsStr]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .args(script_args)
    .args(cmd);
    c
}

/// Makes `/` read-only for the command, in a private mount namespace, leaving `writable`
/// (bind-mounted on itself first) as the one place it may write; the wrapper execs the command,
/// so the pid stays the agent's. `None` when this machine does not allow it (no
/// `unshare`, or no CAP_SYS_ADMIN).
fn read_only_root(writable: &Path, probe: &Path, cmd: &[&OsStr]) -> Option<Command> {
    const SCRIPT: &str = r#"w="$1"; probe="$2"; shift 2
mount --bind "$w" "$w" && mount -o remount,bind,ro / || exit 97
if touch "$probe/written" 2>/dev/null; then rm -f "$probe/written"; exit 98; fi
exec "$@""#;
    let wrap = |args: &[&OsStr]| {
        in_mount_namespace(SCRIPT, &[writable.as_os_str(), probe.as_os_str()], args)
    };
    // A dry run: can we, and does it bite?
    let status = wrap(&[OsStr::new("true")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Some(wrap(cmd)),
        other => {
            eprintln!(
                "note: cannot make / read-only for the agent here ({other:?}); checking by \
                 listings only"
            );
            None
        }
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn it_writes_only_below_its_root() {
    let dir = tempfile::tempdir().unwrap();
    let (set, archive) = small_archive(dir.path());
    let images = images_of(&archive);
    let root = dir.path().join("root");
    // Where a careless program writes: its working directory, HOME, TMPDIR.
    let (cwd, home, tmp) = (
        dir.path().join("cwd"),
        dir.path().join("home"),
        dir.path().join("tmp"),
    );
    for d in [&root, &cwd, &home, &tmp] {
        std::fs::create_dir(d).unwrap();
    }
    let agent_args = registry_args(&root);
    let mut cmd = read_only_root(&root, &cwd, &agent_args).unwrap_or_else(|| {
        let mut c = Command::new(agent_args[0]);
        c.args(&agent_args[1..]);
        c
    });
    cmd.current_dir(&cwd).env("HOME", &home).env("TMPDIR", &tmp);
    let mut agent = Agent::start(cmd);
    let host = agent.host().to_owned();

    // Every kind of write: skopeo's monolithic and chunked uploads, bundle push's, a tag
    // moved, manifests, then reads.
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:app-1.0", set.layout.display()),
        &format!("docker://{host}/skopeo/app:1.0"),
    ])
    .unwrap();
    push(&archive, &host, &[]);
    for (name, digest) in &images {
        assert_eq!(
            &served_digest(&host, repo_ref(name)).unwrap(),
            digest,
            "{name}"
        );
    }
    let (name, digest) = &images[1];
    assert_eq!(
        &copy_out(&host, repo_ref(name), &dir.path().join("back")),
        digest
    );
    agent.assert_running();
    drop(agent);

    for d in [&cwd, &home, &tmp] {
        assert_eq!(listing(d), Vec::<String>::new(), "{}", d.display());
    }
    assert_eq!(
        listing(&root),
        ["blobs", "repositories", "tmp", "uploads"],
        "{}",
        root.display()
    );
    assert_eq!(listing(&root.join("tmp")), Vec::<String>::new());
}

#[test]
fn a_root_it_cannot_create_is_refused_naming_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let root = file.join("root");
    let mut c = agent_cmd(&["registry", "--listen", "127.0.0.1:0"]);
    c.arg("--root").arg(&root);
    let exited = match Agent::try_start(c) {
        Ok(agent) => panic!("the agent listens on {}", agent.host()),
        Err(e) => e,
    };
    assert_eq!(exited.status.code(), Some(1), "{exited:?}");
    assert!(
        exited.stderr.contains(root.to_str().unwrap()),
        "{}",
        exited.stderr
    );
    assert_cause_once(&exited.stderr);
}

/// The uid and gid the agent runs as in the pod.
pub(crate) const NOBODY: u32 = 65534;

/// `setpriv` running `program` as [`NOBODY`] with every capability dropped and
/// `no_new_privs`, as the pod's securityContext does; its arguments follow.
pub(crate) fn as_nobody(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ])
    .arg(program);
    cmd
}

/// `DIR/root`, created and owned by [`NOBODY`].
pub(crate) fn nobody_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
    root
}

/// The manifest digest of the test layout's image tagged `tag`.
pub(crate) fn layout_digest(set: &SmallSet, tag: &str) -> String {
    set.images
        .iter()
        .find(|i| i.tag.as_deref() == Some(tag))
        .and_then(|i| i.descriptor.as_ref())
        .unwrap()
        .digest
        .clone()
}

/// The agent needs no privilege: as uid/gid 65534 with every capability dropped and
/// `no_new_privs` (what the pod's securityContext gives it), it stores and serves, and what it
/// writes belongs to that user.
#[test]
fn it_runs_as_non_root_without_capabilities() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let set = bundle_testimages::small_set(&dir.path().join("images")).unwrap();
    let root = nobody_root(dir.path());
    let mut cmd = as_nobody(env!("CARGO_BIN_EXE_bundle-agent"));
    cmd.args(["registry", "--listen", "127.0.0.1:0", "--root"])
        .arg(&root)
        .current_dir(dir.path());
    let agent = Agent::start(cmd);
    let host = agent.host();
    let from = format!("oci:{}:app-1.0", set.layout.display());
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &from,
        &format!("docker://{host}/team/app:1.0"),
    ])
    .unwrap();
    let want = layout_digest(&set, "app-1.0");
    assert_eq!(served_digest(host, "team/app:1.0").unwrap(), want);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert!(field("Uid:").starts_with("65534"), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    let blobs: Vec<_> = std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!blobs.is_empty());
    for b in blobs {
        assert_eq!(
            std::fs::metadata(&b).unwrap().uid(),
            NOBODY,
            "{}",
            b.display()
        );
    }
}

/// A full volume (a 2 MiB tmpfs as the root, in a private mount namespace) fails the push with
/// the errno's words, which `bundle deploy` turns into "the registry ran out of space"; the
/// agent keeps serving.
#[test]
fn a_full_volume_fails_the_push_naming_it_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let archive = big_archive(dir.path(), &[3 << 20]);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    const SCRIPT: &str = r#"root="$1"; shift
mount -t tmpfs -o size=2m tmpfs "$root" || exit 97
exec "$@""#;
    let wrap = |args: &[&OsStr]| in_mount_namespace(SCRIPT, &[root.as_os_str()], args);
    let probe = wrap(&[OsStr::new("true")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        matches!(probe, Ok(s) if s.success()),
        "this test needs `unshare --mount` and tmpfs mounts (root, as CI runs): {probe:?}"
    );
    let mut agent = Agent::start(wrap(&registry_args(&root)));
    let host = agent.host().to_owned();
    let out = push_cmd(&archive, &host, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the push into a full volume succeeded"
    );
    assert!(
        stderr.contains("No space left on device"),
        "the error does not say the volume is full: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    agent.assert_running();
    let (status, _) = get_json(&host, "/v2/");
    assert_eq!(status, 200);
}

/// `bundle-agent registry --root ROOT --listen 127.0.0.1:0`, program first.
fn registry_args(root: &Path) -> Vec<&OsStr> {
    vec![
        OsStr::new(env!("CARGO_BIN_EXE_bundle-agent")),
        OsStr::new("registry"),
        OsStr::new("--root"),
        root.as_os_str(),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
    ]
}
