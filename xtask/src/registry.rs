//! A throwaway local registry for the bench: CNCF distribution (`docker-registry serve`) on
//! 127.0.0.1 with a free port and its own storage directory, stopped (killed and reaped, with
//! its CPU time) when done.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{self, remove};

/// The program; Debian's package `docker-registry` installs distribution 2.8 under this name.
pub const PROGRAM: &str = "docker-registry";

/// How long a registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running registry. Dropping it kills it; [`Registry::stop`] also reports its CPU time.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
}

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

/// Whether `GET /v2/` on `port` answers 200.
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
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

impl Registry {
    /// Starts a registry on an empty storage under `dir` (removed first, and again by
    /// [`Registry::stop`]), logging to `log`, and waits until it answers.
    pub fn start(dir: &Path, log: &Path) -> Result<Registry> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(dir, log) {
                Ok(r) => return Ok(r),
                // Only a lost race for the port is worth another try.
                Err(e) if tail(log).contains("address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        last.map_or_else(|| bail!("registry did not start"), Err)
    }

    fn try_start(dir: &Path, log: &Path) -> Result<Registry> {
        remove(dir)?;
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)
            .with_context(|| format!("creating {}", storage.display()))?;
        let port = free_port()?;
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config(&storage, port))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(PROGRAM);
        cmd.arg("serve").arg(&config_path);
        // distribution reads REGISTRY_* variables as overrides of the config file.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(&k);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating a file handle")?)
            .stderr(log_file);
        let line = util::show(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {line} (Debian package docker-registry)"))?;
        let mut reg = Registry {
            child: Some(child),
            port,
            dir: dir.to_owned(),
            log: log.to_owned(),
        };
        let start = Instant::now();
        loop {
            if answers(port) {
                return Ok(reg);
            }
            if let Some(c) = reg.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                reg.child = None;
                bail!(
                    "`{line}` exited ({status}) before answering; end of {}:\n{}",
                    log.display(),
                    tail(log)
                );
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "`{line}` did not answer GET /v2/ on 127.0.0.1:{port} within {} s; end of {}:\n{}",
                    READY_TIMEOUT.as_secs(),
                    log.display(),
                    tail(log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its CPU time so far (user plus system), from /proc.
    pub fn cpu(&self) -> Option<Duration> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name (which may hold spaces): utime is field 14, stime 15.
        let after: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = after.get(11)?.parse::<u64>().ok()? + after.get(12)?.parse::<u64>().ok()?;
        // /proc counts in USER_HZ, which the Linux ABI fixes at 100 per second.
        Some(Duration::from_millis(ticks * 10))
    }

    /// Kills it, reaps it, removes its storage, and returns its total CPU time. A registry
    /// that died on its own is an error, with the end of its log.
    pub fn stop(mut self) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            bail!("registry already gone");
        };
        let died = child.try_wait().ok().flatten();
        let pid = child.id();
        if died.is_none() {
            child.kill().context("killing the registry")?;
        }
        let usage = if died.is_none() {
            Some(util::wait4(pid).context("waiting for the registry")?)
        } else {
            None
        };
        remove(&self.dir)?;
        if let Some(status) = died {
            bail!(
                "the registry exited on its own ({status}); end of {}:\n{}",
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(usage.map_or(Duration::ZERO, |(_, u)| u.cpu))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = remove(&self.dir);
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
