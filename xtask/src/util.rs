//! Shared by the commands: the workspace root, running a command with an echo, and measuring
//! a pipeline's (or side-by-side commands') wall time and each process's peak RSS (`wait4`
//! rusage).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The workspace root: the parent of this crate's directory.
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// The cargo that runs us (`$CARGO`), or `cargo`.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// A command as a shell line, paths under the workspace root shown relative to it.
pub fn show(cmd: &Command) -> String {
    let root = root();
    let word = |s: &OsStr| {
        let p = Path::new(s);
        let s = p
            .strip_prefix(&root)
            .map_or_else(|_| s.to_string_lossy(), |r| r.as_os_str().to_string_lossy());
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(word(cmd.get_program()))
        .chain(cmd.get_args().map(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Echoes `cmd`, runs it with inherited stdout and stderr, and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = show(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {line}"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Whether `e` comes from writing to a closed pipe (stdout piped into `head`, say).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// One process of a measured pipeline.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Peak resident set size in bytes.
    pub max_rss: u64,
    /// User plus system CPU time.
    pub cpu: Duration,
}

/// What [`measure`] saw.
#[derive(Debug, Clone)]
pub struct Measured {
    /// From the first spawn to the last exit.
    pub wall: Duration,
    /// Each process, in pipeline order.
    pub procs: Vec<Proc>,
}

impl Measured {
    /// CPU time of all its processes.
    pub fn cpu(&self) -> Duration {
        self.procs.iter().map(|p| p.cpu).sum()
    }

    /// The largest peak RSS of any process in the pipeline.
    pub fn max_rss(&self) -> u64 {
        self.procs.iter().map(|p| p.max_rss).max().unwrap_or(0)
    }
}

/// What `wait4` reports about a reaped child.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Peak resident set size in bytes (`ru_maxrss`; file pages it mapped count too).
    pub max_rss: u64,
    /// User plus system CPU time.
    pub cpu: Duration,
}

/// Waits for child `pid` (spawned by us and not yet reaped; std's `Child` is never waited on
/// for it) and returns its exit status and resource usage.
pub fn wait4(pid: u32) -> io::Result<(ExitStatus, Usage)> {
    wait4_with(pid, 0)?.ok_or_else(|| io::Error::other("wait4 returned no child"))
}

/// [`wait4`] without blocking: `None` while the child runs.
pub fn try_wait4(pid: u32) -> io::Result<Option<(ExitStatus, Usage)>> {
    wait4_with(pid, libc::WNOHANG)
}

#[allow(unsafe_code)]
fn wait4_with(pid: u32, options: libc::c_int) -> io::Result<Option<(ExitStatus, Usage)>> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: rusage is plain integers and timevals, for which all zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: both pointers are to live locals of the right types; `pid` is our child,
        // spawned and not yet reaped (the caller's contract).
        let r = unsafe { libc::wait4(pid, &mut status, options, &mut usage) };
        if r == 0 && options & libc::WNOHANG != 0 {
            return Ok(None);
        }
        if r == pid {
            let tv = |t: libc::timeval| {
                Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
            };
            return Ok(Some((
                ExitStatus::from_raw(status),
                Usage {
                    // Linux reports ru_maxrss in KiB.
                    max_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
                    cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
                },
            )));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends `signal` (`libc::SIGTERM`, say) to process `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPU time (user plus system) process `pid` has used so far, from /proc.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces): utime is field 14, stime 15.
    let after: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = after.get(11)?.parse::<u64>().ok()? + after.get(12)?.parse::<u64>().ok()?;
    // /proc counts in USER_HZ, which the Linux ABI fixes at 100 per second.
    Some(Duration::from_millis(ticks * 10))
}

/// Runs `cmds` as a pipeline, each one's stdout into the next one's stdin, the first reading
/// nothing. The last one's stdout goes to `LOG.out`, each one's stderr to `LOG.N.err`.
/// Returns the wall time from the first spawn to the last exit and each process's peak RSS
/// (`ru_maxrss` from `wait4`). Fails, quoting the end of its stderr, when any exits non-zero.
pub fn measure(cmds: Vec<Command>, log: &Path) -> Result<Measured> {
    measure_as(cmds, log, true)
}

/// Runs `cmds` side by side, each reading nothing, its stdout going to `LOG.N.out` and its
/// stderr to `LOG.N.err`; otherwise as [`measure`].
pub fn measure_parallel(cmds: Vec<Command>, log: &Path) -> Result<Measured> {
    measure_as(cmds, log, false)
}

fn measure_as(cmds: Vec<Command>, log: &Path, piped: bool) -> Result<Measured> {
    let n = cmds.len();
    let log_file = |suffix: String| -> Result<(PathBuf, File)> {
        let mut p = log.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        let f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok((p, f))
    };
    let mut started: Vec<(u32, String, PathBuf)> = Vec::new();
    let mut spawn_err = None;
    let mut prev = None;
    let start = Instant::now();
    for (i, mut cmd) in cmds.into_iter().enumerate() {
        let line = show(&cmd);
        let mut step = || -> Result<std::process::Child> {
            let (err_path, err) = log_file(format!(".{i}.err"))?;
            cmd.stdin(prev.take().map_or_else(Stdio::null, Stdio::from));
            if piped && i + 1 < n {
                cmd.stdout(Stdio::piped());
            } else if piped {
                cmd.stdout(log_file(".out".into())?.1);
            } else {
                cmd.stdout(log_file(format!(".{i}.out"))?.1);
            }
            cmd.stderr(err);
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start {line}"))?;
            started.push((child.id(), line.clone(), err_path));
            Ok(child)
        };
        match step() {
            Ok(mut child) => prev = child.stdout.take(),
            Err(e) => {
                spawn_err = Some(e);
                break;
            }
        }
        // `cmd` drops here, closing our copy of the pipe so that the reader sees its end.
    }
    drop(prev);
    let mut procs = Vec::new();
    let mut failed = Vec::new();
    for (pid, line, err_path) in &started {
        let (status, usage) = wait4(*pid).with_context(|| format!("waiting for {line}"))?;
        procs.push(Proc {
            max_rss: usage.max_rss,
            cpu: usage.cpu,
        });
        if !status.success() {
            let text = std::fs::read_to_string(err_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            failed.push(format!(
                "`{line}` failed ({status}); end of {}:\n{}",
                err_path.display(),
                tail.join("\n")
            ));
        }
    }
    let wall = start.elapsed();
    if let Some(e) = spawn_err {
        return Err(e);
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(Measured { wall, procs })
}

/// Runs `steps` one after the other, each a pipeline as in [`measure`] (logs `LOG.K...` for
/// step K), and adds up their wall times; stops at the first that fails.
pub fn measure_steps(steps: Vec<Vec<Command>>, log: &Path) -> Result<Measured> {
    if steps.len() == 1 {
        return measure(steps.into_iter().flatten().collect(), log);
    }
    let mut all = Measured {
        wall: Duration::ZERO,
        procs: Vec::new(),
    };
    for (k, cmds) in steps.into_iter().enumerate() {
        let mut p = log.as_os_str().to_owned();
        p.push(format!(".{k}"));
        let m = measure(cmds, Path::new(&p))?;
        all.wall += m.wall;
        all.procs.extend(m.procs);
    }
    Ok(all)
}

/// Total size of the regular files under `path` (or of `path` itself).
pub fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return if meta.is_file() { meta.len() } else { 0 };
    }
    std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| disk_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Removes a file or a directory tree, if there.
pub fn remove(path: &Path) -> Result<()> {
    let res = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    res.with_context(|| format!("removing {}", path.display()))
}

/// `1G`, `500M`, `20MiB`, `1000`: K, M, G are powers of 1000; KiB, MiB, GiB of 1024.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_pipeline_and_its_peak_rss() {
        let dir = std::env::temp_dir().join(format!("xtask-measure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut head = Command::new("head");
        head.args(["-c", "50000000", "/dev/zero"]);
        let mut wc = Command::new("wc");
        wc.arg("-c");
        let m = measure(vec![head, wc], &dir.join("log")).expect("measure");
        assert_eq!(m.procs.len(), 2);
        assert!(m.procs.iter().all(|p| p.max_rss > 0));
        let out = std::fs::read_to_string(dir.join("log.out")).expect("out");
        assert_eq!(out.trim(), "50000000");
        let steps = measure_steps(
            vec![vec![Command::new("true")], vec![Command::new("true")]],
            &dir.join("steps"),
        )
        .expect("steps");
        assert_eq!(steps.procs.len(), 2);
        assert!(dir.join("steps.1.out").exists());
        let echo = |w: &str| {
            let mut c = Command::new("echo");
            c.arg(w);
            c
        };
        let side = measure_parallel(vec![echo("a"), echo("b")], &dir.join("side")).expect("side");
        assert_eq!(side.procs.len(), 2);
        let out = |n: u32| std::fs::read_to_string(dir.join(format!("side.{n}.out"))).expect("out");
        assert_eq!((out(0), out(1)), ("a\n".to_owned(), "b\n".to_owned()));
        let err = measure(vec![Command::new("false")], &dir.join("fail")).expect_err("false fails");
        assert!(format!("{err:#}").contains("`false` failed"), "{err:#}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn sizes() {
        for (input, want) in [
            ("1G", Some(1_000_000_000)),
            ("20MiB", Some(20 << 20)),
            ("7", Some(7)),
            ("x", None),
        ] {
            assert_eq!(parse_size(input), want, "{input:?}");
        }
    }

    #[test]
    fn shows_commands_like_a_shell() {
        let mut c = Command::new(root().join("target/release/bundle"));
        c.args(["create", "a b", "-o", "x.bundle"]);
        assert_eq!(show(&c), "target/release/bundle create 'a b' -o x.bundle");
    }
}
