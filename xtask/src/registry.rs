//! Throwaway local registries for the bench, on 127.0.0.1 with a free port, stopped (signalled
//! and reaped, with their resource usage) when done: CNCF distribution (`docker-registry
//! serve`) with its own storage directory, and our own servers (`bundle serve`, `bundle-agent
//! registry`), which print the address they bound.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::util::{self, Usage, remove};

/// The program; Debian's package `docker-registry` installs distribution 2.8 under this name.
pub const PROGRAM: &str = "docker-registry";

/// How long a registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a registry may take to exit once signalled.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A port that was free a moment ago. The registry binds it itself, so another process may
/// take it in between; [`Registry::start`] then tries again.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()
        .context("local address of a bound socket")?
        .port())
}

fn config(storage: &Path, port: u16) -> String {
    // The packaged config's storage settings, without auth; errors only, no access log, and
    // no upload purging (a background walk of the storage that would add noise).
    format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\n  \
         delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        serde_json::Value::String(storage.to_string_lossy().into_owned())
    )
}

/// Whether `GET /v2/` on `addr` (`IP:PORT`) answers 200. Gives up after 2 s of silence (a
/// NodePort whose traffic goes to a pod that is gone drops the connection attempt).
pub fn answers(addr: &str) -> bool {
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sock, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// A server process, its stdout and stderr in a log. Dropping it kills it.
struct Process {
    child: Option<Child>,
    line: String,
    log: PathBuf,
}

impl Process {
    fn spawn(mut cmd: Command, log: &Path) -> Result<Process> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating a file handle")?)
            .stderr(log_file);
        let line = util::show(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {line}"))?;
        Ok(Process {
            child: Some(child),
            line,
            log: log.to_owned(),
        })
    }

    /// An error about the process, with the end of its log.
    fn error(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "`{}` {what}; end of {}:\n{}",
            self.line,
            self.log.display(),
            tail(&self.log)
        )
    }

    /// Polls `ready` until it gives a value; fails when the process exits first or does not
    /// get ready within [`READY_TIMEOUT`].
    fn wait_ready<T>(&mut self, mut ready: impl FnMut() -> Option<T>) -> Result<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            if let Some(c) = &self.child
                && let Ok(Some((status, _))) = util::try_wait4(c.id())
            {
                self.child = None;
                return Err(self.error(&format!("exited ({status}) before answering")));
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(self.error(&format!(
                    "did not answer GET /v2/ within {} s",
                    READY_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its CPU time so far (user plus system).
    fn cpu(&self) -> Option<Duration> {
        util::cpu_time(self.child.as_ref()?.id())
    }

    /// Sends it `signal`, reaps it and returns its resource usage. It must exit on the signal
    /// (or successfully) within [`STOP_TIMEOUT`]; one that exited on its own before is an
    /// error.
    fn stop(&mut self, signal: libc::c_int) -> Result<Usage> {
        let Some(child) = self.child.take() else {
            bail!("`{}` already gone", self.line);
        };
        let pid = child.id();
        if let Some((status, _)) = util::try_wait4(pid).context("waiting for a server")? {
            return Err(self.error(&format!("exited on its own ({status})")));
        }
        util::signal(pid, signal).with_context(|| format!("signalling `{}`", self.line))?;
        let start = Instant::now();
        let (status, usage) = loop {
            if let Some(done) = util::try_wait4(pid).context("waiting for a server")? {
                break done;
            }
            if start.elapsed() > STOP_TIMEOUT {
                util::signal(pid, libc::SIGKILL).context("killing a server")?;
                util::wait4(pid).context("waiting for a server")?;
                return Err(self.error(&format!(
                    "did not exit within {} s of signal {signal}",
                    STOP_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() && status.signal() != Some(signal) {
            return Err(self.error(&format!("ended with {status} on signal {signal}")));
        }
        Ok(usage)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `docker-registry`. Dropping it kills it and removes its storage.
pub struct Registry {
    proc: Process,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    /// Starts a registry on an empty storage under `dir` (removed first, and again by
    /// [`Registry::stop`]), logging to `log`, and waits until it answers.
    pub fn start(dir: &Path, log: &Path) -> Result<Registry> {
        remove(dir)?;
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)
            .with_context(|| format!("creating {}", storage.display()))?;
        let (proc, port) = launch(dir, log)?;
        Ok(Registry {
            proc,
            port,
            dir: dir.to_owned(),
        })
    }

    /// Stops it and starts it again on the same storage, logging to `log`: what it stores
    /// stays, and its peak RSS starts afresh. Returns the stopped one's resource usage.
    pub fn restart(&mut self, log: &Path) -> Result<Usage> {
        let usage = self.proc.stop(libc::SIGKILL)?;
        (self.proc, self.port) = launch(&self.dir, log)?;
        Ok(usage)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its CPU time so far (user plus system).
    pub fn cpu(&self) -> Option<Duration> {
        self.proc.cpu()
    }

    /// Kills it, reaps it, removes its storage, and returns its resource usage. A registry
    /// that died on its own is an error, with the end of its log.
    pub fn stop(mut self) -> Result<Usage> {
        let usage = self.proc.stop(libc::SIGKILL);
        remove(&self.dir)?;
        usage
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = remove(&self.dir);
    }
}

/// Starts `docker-registry` on the storage under `dir` with a free port, trying again when
/// another process took the port first.
fn launch(dir: &Path, log: &Path) -> Result<(Process, u16)> {
    let mut last = None;
    for _ in 0..3 {
        match try_launch(dir, log) {
            Ok(r) => return Ok(r),
            // Only a lost race for the port is worth another try.
            Err(e) if tail(log).contains("address already in use") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    last.map_or_else(|| bail!("registry did not start"), Err)
}

fn try_launch(dir: &Path, log: &Path) -> Result<(Process, u16)> {
    let port = free_port()?;
    let config_path = dir.join("config.yml");
    std::fs::write(&config_path, config(&dir.join("storage"), port))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut cmd = Command::new(PROGRAM);
    cmd.arg("serve").arg(&config_path);
    // distribution reads REGISTRY_* variables as overrides of the config file.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(&k);
        }
    }
    let mut proc = Process::spawn(cmd, log).context("Debian package docker-registry")?;
    let addr = format!("127.0.0.1:{port}");
    proc.wait_ready(|| answers(&addr).then_some(()))?;
    Ok((proc, port))
}

/// One of our servers, started with `--listen 127.0.0.1:0`, which prints the address it bound.
/// Dropping it kills it.
pub struct Server {
    proc: Process,
    addr: String,
}

impl Server {
    /// Starts `cmd`, logging to `log`, and waits until a line of its output, read by `bound`,
    /// names an address and that address answers.
    pub fn start(cmd: Command, log: &Path, bound: fn(&str) -> Option<&str>) -> Result<Server> {
        let mut proc = Process::spawn(cmd, log)?;
        let addr = proc.wait_ready(|| {
            let text = std::fs::read_to_string(log).ok()?;
            let addr = text.lines().find_map(bound)?;
            answers(addr).then(|| addr.to_owned())
        })?;
        Ok(Server { proc, addr })
    }

    /// The address it bound, `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its CPU time so far (user plus system).
    pub fn cpu(&self) -> Option<Duration> {
        self.proc.cpu()
    }

    /// Stops it with SIGTERM (on which our servers exit), reaps it, and returns its resource
    /// usage.
    pub fn stop(mut self) -> Result<Usage> {
        self.proc.stop(libc::SIGTERM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_quotes_the_storage_path() {
        let c = config(Path::new("/tmp/a b/storage"), 5000);
        assert!(c.contains("rootdirectory: \"/tmp/a b/storage\"\n"), "{c}");
        assert!(c.contains("addr: 127.0.0.1:5000\n"), "{c}");
        assert!(c.contains("  level: error\n"), "{c}");
    }
}
