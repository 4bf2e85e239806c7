//! A real containerd (Debian's 1.6) for the integration tests: a private daemon per test, driven
//! with `ctr`, so that "containerd can pull what we serve" is checked against containerd itself.
//!
//! Setup, and why:
//! - Each [`Containerd`] runs `containerd --config DIR/config.toml` with everything below a fresh
//!   temp dir: `root`, `state`, `temp`, the gRPC socket `DIR/c.sock` and the ttrpc socket
//!   `DIR/t.sock`. It never touches the system's `/var/lib/containerd` or `/run/containerd`, so
//!   tests run in parallel and beside a system containerd. Unix socket paths are limited to 108
//!   bytes, so the dir moves to `/tmp` when `TMPDIR` is too long for one.
//! - Disabled plugins:
//!   - `io.containerd.grpc.v1.cri`: the Kubernetes CRI server wants CNI and a pause image and
//!     logs errors without them; we drive containerd with `ctr`, not a kubelet.
//!   - snapshotters `aufs`, `btrfs`, `zfs`, `devmapper`: they need a kernel module, a filesystem
//!     of their kind or a configured thin pool; in a sandbox they only skip or fail noisily.
//!   - snapshotter `overlayfs`: it works on this machine (ext4 root, real root), but its mounts
//!     can fail where `/tmp` is itself overlayfs (nested containers) or without real root; the
//!     tests use [`SNAPSHOTTER`] (`native`, plain directory copies, no mounts) everywhere.
//!   - `io.containerd.internal.v1.opt`: it creates `/opt/containerd` on the host at startup
//!     (seen here), for `ctr install`, which the tests never use.
//! - Kept although no test runs a container yet: the runtimes (`io.containerd.runtime.v1.linux`
//!   and `.v2.task`, runc behind them) and the cgroups monitor. They load fine here, and in 1.6
//!   disabling the deprecated v1 runtime makes `tasks-service`, `tasks` and `restart` fail.
//! - `required_plugins` names the native snapshotter, so containerd refuses to start, with the
//!   reason in its log, instead of failing every pull later.
//! - No debug socket (`[debug] address = ""`, level `info`, so the log shows which plugins
//!   loaded) and no metrics listener (`[metrics] address = ""`): nothing listens on TCP.
//! - Pulls run in `ctr` (containerd 1.6 resolves and fetches on the client side), with
//!   `--snapshotter native` so that they really unpack, and `--platform linux/amd64`, which
//!   every image of `bundle_testimages::small_set` has, so the result does not depend on the
//!   host's architecture.
//!
//! The daemon runs under a shell that stops it as soon as its stdin closes (SIGTERM, then
//! SIGKILL after 5 s): dropping the harness closes it, and so does the death of the test
//! process, so no containerd outlives the tests. Self-contained (std and `tempfile` only) so that
//! other crates' tests can include it with `#[path = "../../../oci/tests/it/containerd.rs"]`.

#![allow(
    dead_code,
    reason = "the harness serves every test module; each uses only part of it"
)]

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The containerd namespace every `ctr` command of the harness uses.
pub const NAMESPACE: &str = "bundle-test";
/// The snapshotter pulls unpack into: plain directories, works on any filesystem.
pub const SNAPSHOTTER: &str = "native";
/// The platform [`Containerd::pull_plain_http`] pulls: every test image has it.
pub const PLATFORM: &str = "linux/amd64";

/// How long containerd may take to answer on its socket (it takes well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds every `ctr` command (`--timeout`): a pull from a registry that hangs fails the test.
const CTR_TIMEOUT: &str = "120s";
/// How long a stopping containerd gets before the harness stops waiting for it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of containerd's log a failing test prints.
const LOG_TAIL: usize = 16 * 1024;
/// The longest socket path we create: `sun_path` holds 108 bytes, NUL included.
const MAX_SOCKET_PATH: usize = 100;

const MISSING: &str =
    "containerd is not installed; run `cargo xtask ci` (installs Debian containerd and runc)";

/// Runs `"$1" --config "$2"` and stops it once stdin closes: SIGTERM, then SIGKILL after 5 s.
/// The watcher is killed once containerd has exited so that it never signals a reused pid.
const SUPERVISOR: &str = r#"exec 3<&0
"$1" --config "$2" </dev/null &
pid=$!
(read -r _ <&3; kill -TERM "$pid" 2>/dev/null; sleep 5; kill -KILL "$pid" 2>/dev/null) &
watcher=$!
wait "$pid"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// What [`Containerd::pull`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// The digest of the image's target: the manifest, or the index for a multi-platform image.
    pub digest: String,
    /// The chain ID of the unpacked rootfs (`--print-chainid`), the key of its top snapshot.
    pub chain_id: String,
}

/// A `containerd` process with its own config, root, state and sockets in a temp dir. Dropping it
/// stops the process and deletes everything; when a test panics, containerd's log is printed
/// first.
pub struct Containerd {
    dir: TempDir,
    ctr: PathBuf,
    child: Option<Process>,
}

struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` gets an answer from it. Panics when
    /// containerd is not installed or does not come up (with its log).
    pub fn start() -> Containerd {
        let bin = find_tool("containerd").unwrap_or_else(|| panic!("{MISSING}"));
        let ctr = find_tool("ctr").unwrap_or_else(|| panic!("{MISSING}"));
        let mut containerd = Containerd {
            dir: socket_dir(),
            ctr,
            child: None,
        };
        for sub in ["root", "state", "tmp"] {
            fs::create_dir(containerd.dir.path().join(sub)).expect("create containerd's dirs");
        }
        fs::write(containerd.config_path(), containerd.config()).expect("write containerd config");
        if let Err(why) = containerd.spawn(&bin) {
            panic!("containerd did not start: {why}");
        }
        containerd
    }

    /// The gRPC socket, what `ctr --address` and containerd clients take.
    pub fn address(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The config file containerd was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// containerd's `root`: content store, metadata and snapshots live below it.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// containerd's log so far (stdout and stderr).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `ctr --address SOCK --namespace bundle-test --timeout 120s ARGS`: `Ok(stdout)` or `Err`
    /// with the exit status and stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        self.ctr_with(
            &["--timeout", CTR_TIMEOUT, "--connect-timeout", "10s"],
            args,
        )
    }

    /// `ctr images pull --plain-http --snapshotter native --platform linux/amd64 REFERENCE`, then
    /// the digest the image now points at (`ctr images ls`): the manifest digest, or the index
    /// digest for a multi-platform image. `Err` carries ctr's stderr.
    pub fn pull_plain_http(&self, reference: &str) -> Result<String, String> {
        self.pull(reference, &["--plain-http", "--platform", PLATFORM])
            .map(|pulled| pulled.digest)
    }

    /// `ctr images pull --snapshotter native --print-chainid FLAGS REFERENCE` (FLAGS for example
    /// `--plain-http`, `--tlscacert FILE`, `--user U:P`, `--hosts-dir DIR`, `--platform P`), then
    /// the image's digest. The image is unpacked: [`Containerd::snapshot_dir`] of the chain ID
    /// holds its files.
    pub fn pull(&self, reference: &str, flags: &[&str]) -> Result<Pulled, String> {
        let mut args = vec![
            "images",
            "pull",
            "--snapshotter",
            SNAPSHOTTER,
            "--print-chainid",
        ];
        args.extend_from_slice(flags);
        args.push(reference);
        let out = self.ctr(&args)?;
        let chain_id = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("image chain ID: "))
            .map(str::to_owned)
            .ok_or_else(|| format!("ctr images pull printed no chain ID:\n{out}"))?;
        let digest = self
            .image_digest(reference)?
            .ok_or_else(|| format!("{reference} is not in `ctr images ls` after the pull"))?;
        Ok(Pulled { digest, chain_id })
    }

    /// The digest `REFERENCE` points at (the `DIGEST` column of `ctr images ls`), or `None` when
    /// containerd has no such image.
    pub fn image_digest(&self, reference: &str) -> Result<Option<String>, String> {
        let out = self.ctr(&["images", "ls"])?;
        Ok(out.lines().skip(1).find_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next() == Some(reference))
                .then(|| cols.nth(1))
                .flatten()
                .map(str::to_owned)
        }))
    }

    /// Whether `REFERENCE` is complete and unpacked into the native snapshotter (`ctr images
    /// check --quiet` lists only such images).
    pub fn is_unpacked(&self, reference: &str) -> Result<bool, String> {
        let out = self.ctr(&["images", "check", "--quiet", "--snapshotter", SNAPSHOTTER])?;
        Ok(out.lines().any(|l| l.trim() == reference))
    }

    /// The directory holding the unpacked rootfs whose top snapshot is `chain_id` (a native
    /// snapshot is a full copy, so this is the image's whole filesystem). Found through a
    /// read-only view's mount, without mounting anything.
    pub fn snapshot_dir(&self, chain_id: &str) -> Result<PathBuf, String> {
        let key = format!("bundle-test-view-{chain_id}");
        // A view made by ctr holds no lease, so containerd's garbage collector (set off by the
        // pull just before) may take it between these calls; then look again.
        let mut attempt = 0;
        let mounts = loop {
            attempt += 1;
            let made = self.snapshots(&["view", &key, chain_id]);
            let mounts = made.and_then(|_| self.snapshots(&["mounts", "/unused", &key]));
            match self.snapshots(&["rm", &key]) {
                Err(e) if !e.contains("not found") => return Err(e),
                _ => {}
            }
            match mounts {
                Err(e) if attempt < 5 && e.contains("not found") => continue,
                other => break other,
            }
        };
        // `mount -t bind SOURCE /unused -o rbind,ro`
        let mounts = mounts?;
        let words: Vec<&str> = mounts.split_whitespace().collect();
        match words.as_slice() {
            ["mount", "-t", "bind", source, "/unused", ..] => Ok(PathBuf::from(source)),
            _ => Err(format!(
                "unexpected `ctr snapshots mounts` output: {mounts}"
            )),
        }
    }

    /// `ctr snapshots --snapshotter native ARGS`.
    fn snapshots(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["snapshots", "--snapshotter", SNAPSHOTTER];
        full.extend_from_slice(args);
        self.ctr(&full)
    }

    /// `ctr images rm --sync REFERENCE`: forgets the image and waits for containerd to collect
    /// its content and snapshots.
    pub fn images_rm(&self, reference: &str) -> Result<(), String> {
        self.ctr(&["images", "rm", "--sync", reference]).map(drop)
    }

    // -- process ---------------------------------------------------------------------------

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    fn config(&self) -> String {
        let d = self.dir.path().display();
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
temp = "{d}/tmp"
oom_score = 0
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt",
]
required_plugins = ["io.containerd.snapshotter.v1.native"]

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/t.sock"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""
"#
        )
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open containerd's log");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .arg(bin)
            .arg(self.config_path())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        let mut child = command.spawn().expect("run sh to start containerd");
        let stdin = child.stdin.take();
        self.child = Some(Process { child, stdin });

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let process = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = process.child.try_wait() {
                self.child = None;
                return Err(format!("it exited ({status}); its log:\n{}", self.logs()));
            }
            // The socket appears when the gRPC server listens; `version` proves it answers.
            if self.address().exists()
                && self
                    .ctr_with(
                        &["--timeout", "5s", "--connect-timeout", "1s"],
                        &["version"],
                    )
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer on {} after {START_TIMEOUT:?}; its log:\n{}",
                    self.address().display(),
                    self.logs()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctr_with(&self, global: &[&str], args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(&self.ctr);
        command
            .arg("--address")
            .arg(self.address())
            .args(["--namespace", NAMESPACE])
            .args(global)
            .args(args)
            .stdin(Stdio::null());
        // The caller's CONTAINERD_ADDRESS / _NAMESPACE / _SNAPSHOTTER must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CONTAINERD_") {
                command.env_remove(key);
            }
        }
        let out = command.output().expect("run ctr");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ctr {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Stops containerd (SIGTERM; SIGKILL after 5 s) and waits for it.
    fn stop(&mut self) {
        let Some(mut process) = self.child.take() else {
            return;
        };
        // Closing stdin makes the supervisor signal containerd.
        drop(process.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match process.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = process.child.kill();
                    let _ = process.child.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.logs();
            let mut start = log.len().saturating_sub(LOG_TAIL);
            while !log.is_char_boundary(start) {
                start -= 1;
            }
            eprintln!(
                "---- containerd ({}) log tail ----\n{}\n---- end of log ----",
                self.address().display(),
                &log[start..]
            );
        }
    }
}

/// A fresh temp dir whose `c.sock` fits in `sun_path`: below `TMPDIR`, or `/tmp` when that is
/// too long.
fn socket_dir() -> TempDir {
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("bundle-ctrd-");
        b
    };
    let dir = builder().tempdir().expect("create containerd's temp dir");
    if dir.path().join("c.sock").as_os_str().len() <= MAX_SOCKET_PATH {
        return dir;
    }
    builder()
        .tempdir_in("/tmp")
        .expect("create containerd's temp dir in /tmp")
}

/// The path of `tool` on `PATH` or in `/usr/bin`, where Debian puts containerd and ctr.
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}
