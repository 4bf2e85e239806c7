//! `cargo xtask bench`: measures `bundle` against the tools a user would reach for instead
//! (tar + zstd, openssl's sha256, tar -x; skopeo against a local registry; that registry
//! against `bundle serve` and `bundle-agent registry`) on a generated image set, in one run,
//! and prints Markdown tables with the targets. A missed target is reported, never an error:
//! benchmarks report, tests assert.

use std::cell::{Cell, RefCell};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::registry::{self, Registry, Server};
use crate::statics::{self, Statics};
use crate::util::{
    self, Measured, Usage, cargo, disk_bytes, measure_parallel, measure_steps, parse_size, remove,
    root,
};

const DEFAULT_BYTES: u64 = 1_000_000_000;
const DEFAULT_RUNS: u32 = 2;
const RSS_TARGET: u64 = 256 << 20;
/// The peak RSS our servers may reach under [`PARALLEL_PULLS`] pulls at once.
const SERVER_RSS_TARGET: u64 = 128 << 20;
/// How many pulls the serve group runs at once.
const PARALLEL_PULLS: usize = 8;
/// Every `bundle create` here passes it. The peers copy exactly the image set; the agent
/// image that `create` adds by default (a few MiB) would be work only bundle does, and the
/// registry and serve groups would push and serve one image more than skopeo copies, so the
/// ratios would no longer compare like with like.
const NO_AGENT: &str = "--no-agent";
const USAGE: &str = "usage: cargo xtask bench [--bytes N] [--runs N] [--only local|registry|serve]";

/// A group of measurements that `--only` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// create, verify and extract against tar, zstd and openssl.
    Local,
    /// push, re-push and pull against skopeo, through a local registry.
    Registry,
    /// skopeo pulls from `bundle serve` and `bundle-agent registry` against a local registry,
    /// and the servers' peak RSS.
    Serve,
}

struct Opts {
    bytes: u64,
    runs: u32,
    only: Option<Group>,
}

impl Opts {
    fn wants(&self, g: Group) -> bool {
        self.only.is_none_or(|o| o == g)
    }
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut opts = Opts {
        bytes: DEFAULT_BYTES,
        runs: DEFAULT_RUNS,
        only: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| anyhow!("{key} needs a value"))
        };
        match key {
            "--bytes" => {
                let v = value()?;
                opts.bytes = parse_size(&v)
                    .ok_or_else(|| anyhow!("--bytes: cannot read {v:?} as a size"))?;
            }
            "--runs" => {
                let v = value()?;
                opts.runs = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| anyhow!("--runs: {v:?} is not a positive number"))?;
            }
            "--only" => {
                let v = value()?;
                opts.only = Some(match v.as_str() {
                    "local" => Group::Local,
                    "registry" => Group::Registry,
                    "serve" => Group::Serve,
                    _ => bail!("--only: {v:?} is not local, registry or serve"),
                });
            }
            _ => bail!("bench: unexpected argument {a:?} ({USAGE})"),
        }
    }
    Ok(opts)
}

/// Runs each measurement `runs` times and keeps the fastest; the first run also warms the
/// page cache.
struct Bench {
    runs: u32,
    logs: PathBuf,
    /// CPU time of every measured process (and of the registries), to tell our load from
    /// other processes'.
    cpu: std::cell::Cell<Duration>,
}

/// The fastest run and the highest peak RSS seen in any run.
struct Best {
    wall: Duration,
    rss: u64,
    /// User + system CPU time of the measured commands in the fastest run.
    cpu: Duration,
    /// CPU time a side process (the registry) spent during the fastest run.
    side_cpu: Option<Duration>,
}

/// The cumulative CPU time of a process that serves the measured one, read before and after
/// each run.
type Side<'a> = Option<&'a dyn Fn() -> Option<Duration>>;

/// The commands of one run.
enum Plan {
    /// Pipelines, one after another: their wall times add up.
    Steps(Vec<Vec<Command>>),
    /// Commands side by side: the wall time is from the first start to the last exit.
    Parallel(Vec<Command>),
}

impl Bench {
    /// Measures one pipeline.
    fn best(
        &self,
        name: &str,
        prepare: &dyn Fn() -> Result<()>,
        make: &dyn Fn() -> Vec<Command>,
    ) -> Result<Best> {
        self.best_steps(name, prepare, &|| vec![make()], None)
    }

    /// Measures pipelines run one after another, as one: their wall times add up.
    fn best_steps(
        &self,
        name: &str,
        prepare: &dyn Fn() -> Result<()>,
        make: &dyn Fn() -> Vec<Vec<Command>>,
        side: Side<'_>,
    ) -> Result<Best> {
        self.best_plan(name, prepare, &|| Plan::Steps(make()), side)
    }

    /// Measures commands run side by side, as one.
    fn best_parallel(
        &self,
        name: &str,
        prepare: &dyn Fn() -> Result<()>,
        make: &dyn Fn() -> Vec<Command>,
        side: Side<'_>,
    ) -> Result<Best> {
        self.best_plan(name, prepare, &|| Plan::Parallel(make()), side)
    }

    fn best_plan(
        &self,
        name: &str,
        prepare: &dyn Fn() -> Result<()>,
        make: &dyn Fn() -> Plan,
        side: Side<'_>,
    ) -> Result<Best> {
        let job = Job {
            name,
            prepare,
            make,
            side,
        };
        let mut best = None;
        for r in 1..=self.runs {
            best = Some(keep_best(best, self.run_once(&job, r)?));
        }
        best.ok_or_else(|| anyhow!("no runs"))
    }

    /// Measures two jobs (ours and a peer's) in alternation, run 1 of each, then run 2 of
    /// each, and so on: a machine whose speed drifts over minutes then weighs on both alike.
    /// A job whose run fails is not run again; the other goes on.
    fn best_pair(&self, a: &Job<'_>, b: &Job<'_>) -> (Result<Best>, Result<Best>) {
        let (mut best_a, mut best_b): (Result<Option<Best>>, Result<Option<Best>>) =
            (Ok(None), Ok(None));
        for r in 1..=self.runs {
            for (job, best) in [(a, &mut best_a), (b, &mut best_b)] {
                if let Ok(kept) = best {
                    *best = self
                        .run_once(job, r)
                        .map(|this| Some(keep_best(kept.take(), this)));
                }
            }
        }
        let done = |b: Result<Option<Best>>| b.and_then(|b| b.ok_or_else(|| anyhow!("no runs")));
        (done(best_a), done(best_b))
    }

    /// Run `r` of a job: prepares, syncs, measures, prints a line.
    fn run_once(&self, job: &Job<'_>, r: u32) -> Result<Best> {
        let Job {
            name,
            prepare,
            make,
            side,
        } = *job;
        prepare()?;
        // Flush earlier runs' dirty pages so that no run pays for another's writeback.
        Command::new("sync").status().context("running sync")?;
        let plan = make();
        let pipeline = |p: &Vec<Command>| p.iter().map(util::show).collect::<Vec<_>>().join(" | ");
        // A sequence or a group of like commands shows its first.
        let line = match &plan {
            Plan::Steps(steps) => match steps.as_slice() {
                [one] => pipeline(one),
                [first, ..] => {
                    format!("{} ; … ({} commands in all)", pipeline(first), steps.len())
                }
                [] => String::new(),
            },
            Plan::Parallel(cmds) => cmds.first().map_or_else(String::new, |c| {
                format!("{} & … ({} commands at once)", util::show(c), cmds.len())
            }),
        };
        let side_before = side.and_then(|f| f());
        let log = self.logs.join(format!("{name}.{r}"));
        let m: Measured = match plan {
            Plan::Steps(steps) => measure_steps(steps, &log)?,
            Plan::Parallel(cmds) => measure_parallel(cmds, &log)?,
        };
        let side_cpu = match (side_before, side.and_then(|f| f())) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        self.cpu.set(self.cpu.get() + m.cpu());
        let side_text = side_cpu.map_or_else(String::new, |c| {
            format!(", registry CPU {:.2} s", c.as_secs_f64())
        });
        println!(
            "  {name} run {r}/{}: {}, CPU {:.2} s{side_text}, peak RSS {}  ({line})",
            self.runs,
            secs(m.wall),
            m.cpu().as_secs_f64(),
            mib(m.max_rss())
        );
        Ok(Best {
            wall: m.wall,
            rss: m.max_rss(),
            cpu: m.cpu(),
            side_cpu,
        })
    }
}

/// One measured job: how to prepare a run, what to run, and the serving process to charge.
#[derive(Clone, Copy)]
struct Job<'a> {
    name: &'a str,
    prepare: &'a dyn Fn() -> Result<()>,
    make: &'a dyn Fn() -> Plan,
    side: Side<'a>,
}

/// The faster of two runs, with the higher peak RSS of both.
fn keep_best(best: Option<Best>, this: Best) -> Best {
    match best {
        None => this,
        Some(b) if b.wall <= this.wall => Best {
            rss: b.rss.max(this.rss),
            ..b
        },
        Some(b) => Best {
            rss: b.rss.max(this.rss),
            ..this
        },
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn rate(bytes: u64, d: Duration) -> String {
    format!("{:.0} MB/s", bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// `openssl speed -multi N ... -evp sha256` prints, last, `sha256  1353311.00k`: thousands
/// of bytes per second over all N processes.
fn parse_openssl_speed(out: &str) -> Option<f64> {
    out.lines().rev().find_map(|l| {
        let mut words = l.split_whitespace();
        if words.next()? != "sha256" {
            return None;
        }
        let k: f64 = words.next_back()?.strip_suffix('k')?.parse().ok()?;
        Some(k * 1000.0)
    })
}

fn openssl_sha256(cores: usize) -> Result<f64> {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "speed",
        "-multi",
        &cores.to_string(),
        "-bytes",
        "1048576",
        "-seconds",
        "3",
        "-evp",
        "sha256",
    ]);
    println!("$ {}", util::show(&cmd));
    let out = cmd.output().context("cannot run openssl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_openssl_speed(&text)
        .ok_or_else(|| anyhow!("no sha256 summary line in openssl's output:\n{text}"))
}

/// Busy, steal and our own CPU time so far, from /proc (in seconds).
#[derive(Clone, Copy)]
struct CpuSnap {
    busy: f64,
    steal: f64,
    own: f64,
    at: std::time::Instant,
}

/// /proc counts in USER_HZ, which the Linux ABI fixes at 100 per second.
const USER_HZ: f64 = 100.0;

fn cpu_snap() -> Option<CpuSnap> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    Some(CpuSnap {
        busy: busy / USER_HZ,
        steal: f.get(7).copied().unwrap_or(0.0) / USER_HZ,
        own: util::cpu_time(std::process::id())?.as_secs_f64(),
        at: std::time::Instant::now(),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn machine_info(cores: usize, load_start: &str, opts: &Opts) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let version = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "not found".into())
    };
    let mut peers = Vec::new();
    if opts.wants(Group::Local) {
        peers.push(version("zstd", "-V"));
        peers.push(version("tar", "--version"));
    }
    if opts.wants(Group::Registry) || opts.wants(Group::Serve) {
        peers.push(version("skopeo", "--version"));
        peers.push(version(registry::PROGRAM, "--version"));
    }
    format!(
        "- nproc: {cores}\n- CPU: {cpu}\n- memory: {mem}\n- kernel: {}\n- load average at start: {}\n- peers: {}",
        read("/proc/sys/kernel/osrelease").trim(),
        load_start,
        peers.join("; "),
    )
}

/// One line of the speed table.
struct Row {
    what: String,
    ours: String,
    peer: String,
    ratio: String,
    target: String,
    result: String,
}

fn failed_row(what: &str, e: &anyhow::Error) -> Row {
    Row {
        what: what.into(),
        ours: format!("FAILED: {}", e.to_string().lines().next().unwrap_or("")),
        peer: String::new(),
        ratio: String::new(),
        target: String::new(),
        result: "ERROR".into(),
    }
}

/// A Markdown table; `|` inside a cell is escaped so that the table stays one.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let esc = |c: &str| c.replace('|', r"\|");
    let head: Vec<String> = head.iter().map(|h| esc(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| esc(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut s = line(&head);
    s.push_str(&line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    ));
    for r in &rows {
        s.push_str(&line(r));
    }
    s
}

/// What the groups share: the binaries, the data set, the output directory, the bench.
struct Cx {
    bench: Bench,
    bundle_bin: PathBuf,
    /// The release build of `bundle-agent` (the serve group's).
    agent_bin: PathBuf,
    /// The data set: bundle.yaml, bundle-plain.yaml, layout/, testimages.json.
    data: PathBuf,
    layout: PathBuf,
    layout_bytes: u64,
    marker: serde_json::Value,
    marker_path: PathBuf,
    out: PathBuf,
    cores: usize,
    /// Whether [`Cx::all_bundle`] holds a complete archive.
    have_archive: Cell<bool>,
}

impl Cx {
    /// `bundle ARGS`, run in `dir`.
    fn bundle(&self, dir: &Path, args: &[&dyn AsRef<OsStr>]) -> Command {
        let mut c = Command::new(&self.bundle_bin);
        c.current_dir(dir);
        for a in args {
            c.arg(a);
        }
        c
    }

    /// The archive of bundle.yaml that the local group creates and the registry group pushes.
    fn all_bundle(&self) -> PathBuf {
        self.out.join("all.bundle")
    }

    /// [`Cx::all_bundle`], created here, unmeasured, when the local group did not (`--only`,
    /// or a create that failed).
    fn archive(&self) -> Result<PathBuf> {
        let archive = self.all_bundle();
        if !self.have_archive.get() {
            let mut c = self.bundle(
                &self.data,
                &[&"create", &NO_AGENT, &"bundle.yaml", &"-o", &archive],
            );
            remove(&archive).and_then(|()| util::run(&mut c))?;
            self.have_archive.set(true);
        }
        Ok(archive)
    }
}

fn cmd(prog: impl AsRef<OsStr>, args: &[&dyn AsRef<OsStr>]) -> Command {
    let mut c = Command::new(prog);
    for a in args {
        c.arg(a);
    }
    c
}

/// What a group of measurements adds to the report.
#[derive(Default)]
struct Section {
    rows: Vec<Row>,
    rss: Vec<Vec<String>>,
    /// Lines for the method notes.
    notes: Vec<String>,
    /// Commands that failed (a failure, not a missed target).
    errors: Vec<String>,
}

impl Section {
    fn errors_of<T>(&mut self, results: &[(&str, &Result<T>)]) {
        for (n, r) in results {
            if let Err(e) = r {
                self.errors.push(format!("{n}: {e:#}"));
            }
        }
    }
}

fn speedup(
    what: String,
    ours: &Result<Best>,
    peer: &Result<Best>,
    in_bytes: u64,
    peer_name: &str,
    target: Option<f64>,
) -> Row {
    match (ours, peer) {
        (Ok(o), Ok(p)) => {
            let r = p.wall.as_secs_f64() / o.wall.as_secs_f64().max(1e-9);
            // Where a registry serves the run, both CPU times: with the registry on the
            // same cores, their sum bounds the wall time (see `cpu_floor_row`).
            let side = |b: &Best| {
                b.side_cpu.map_or_else(String::new, |c| {
                    format!(
                        ", CPU {:.2} s + registry CPU {:.2} s",
                        b.cpu.as_secs_f64(),
                        c.as_secs_f64()
                    )
                })
            };
            Row {
                what,
                ours: format!("{}, {}{}", secs(o.wall), rate(in_bytes, o.wall), side(o)),
                peer: format!(
                    "{}, {}{} ({peer_name})",
                    secs(p.wall),
                    rate(in_bytes, p.wall),
                    side(p)
                ),
                ratio: format!("{r:.2} (peer time / ours)"),
                target: target.map_or_else(|| "—".into(), |t| format!("≥ {t:.1}")),
                result: target.map_or_else(|| "info".into(), |t| verdict(r >= t).into()),
            }
        }
        (Err(e), _) | (_, Err(e)) => failed_row(&what, e),
    }
}

/// What the CPU allows a push or a pull (`what`): the registry runs on the same cores as the
/// client, so no run can take less wall time than (client CPU + registry CPU) / cores. Shows
/// that bound for our fastest run and for the peer's, how close each came to it (the cores'
/// busy share), the ratio to the peer that a run at our bound would reach, and the ratio of the
/// two bounds: what the target asks of the machine when both tools keep every core busy.
fn cpu_floor_row(
    what: &str,
    ours: &Result<Best>,
    peer: &Result<Best>,
    cores: usize,
) -> Option<Row> {
    let (o, p) = (ours.as_ref().ok()?, peer.as_ref().ok()?);
    let floor = |b: &Best| -> Option<(f64, String)> {
        let registry = b.side_cpu?;
        let f = (b.cpu + registry).as_secs_f64() / cores.max(1) as f64;
        let busy = 100.0 * f / b.wall.as_secs_f64().max(1e-9);
        Some((
            f,
            format!(
                "{f:.2} s = ({:.2} s + registry {:.2} s) / {cores}; the run kept the cores {busy:.0}% busy",
                b.cpu.as_secs_f64(),
                registry.as_secs_f64(),
            ),
        ))
    };
    let ((of, ours_text), (pf, peer_text)) = (floor(o)?, floor(p)?);
    Some(Row {
        what: format!("{what}: CPU-bound least wall time on {cores} cores (info)"),
        ours: ours_text,
        peer: format!("{}; its bound {peer_text}", secs(p.wall)),
        ratio: format!(
            "{:.2} (peer time / our bound); {:.2} bound to bound",
            p.wall.as_secs_f64() / of.max(1e-9),
            pf / of.max(1e-9)
        ),
        target: "—".into(),
        result: "info".into(),
    })
}

fn rss_row(what: &str, ours: &Result<Best>, peer: Option<&Result<Best>>) -> Vec<String> {
    let rss = |r: &Result<Best>| r.as_ref().ok().map(|b| b.rss);
    rss_cells(what, rss(ours), peer.map(rss), Some(RSS_TARGET))
}

/// A line of the RSS table for a server, from its usage over a round.
fn server_rss_row(
    what: &str,
    ours: &Result<Usage>,
    peer: Option<&Result<Usage>>,
    target: Option<u64>,
) -> Vec<String> {
    let rss = |r: &Result<Usage>| r.as_ref().ok().map(|u| u.max_rss);
    rss_cells(what, rss(ours), peer.map(rss), target)
}

/// The cells of an RSS line: `None` is a failure, a `peer` of `None` means no peer.
fn rss_cells(
    what: &str,
    ours: Option<u64>,
    peer: Option<Option<u64>>,
    target: Option<u64>,
) -> Vec<String> {
    let peer = match peer {
        Some(Some(p)) => mib(p),
        Some(None) => "failed".into(),
        None => "—".into(),
    };
    let (rss, result) = match ours {
        Some(o) => (mib(o), target.map_or("info", |t| verdict(o <= t))),
        None => ("failed".into(), "ERROR"),
    };
    vec![
        what.into(),
        rss,
        peer,
        target.map_or_else(|| "—".into(), |t| format!("≤ {}", mib(t))),
        result.into(),
    ]
}

pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let root = root();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "bundle-cli",
        "-p",
        "bundle-testimages",
    ]);
    if opts.wants(Group::Serve) {
        build.args(["-p", "bundle-agent"]);
    }
    util::run(&mut build)?;
    // Only their sizes are reported; built before the clock for contention starts.
    let statics = opts.wants(Group::Serve).then(|| statics::build(&root));

    // The data set: generated once per size, then reused (the generator checks its marker).
    let data = root.join("target/bench-data").join(opts.bytes.to_string());
    util::run(
        Command::new(root.join("target/release/bundle-testimages"))
            .arg("bench")
            .arg(&data)
            .arg("--bytes")
            .arg(opts.bytes.to_string()),
    )?;
    let marker_path = data.join("testimages.json");
    let marker: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&marker_path)
            .with_context(|| format!("reading {}", marker_path.display()))?,
    )
    .with_context(|| format!("parsing {}", marker_path.display()))?;
    let layout = data.join("layout");

    let out = root.join("bench-out");
    remove(&out)?;
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let cx = Cx {
        bench: Bench {
            runs: opts.runs,
            logs,
            cpu: std::cell::Cell::new(Duration::ZERO),
        },
        bundle_bin: root.join("target/release/bundle"),
        agent_bin: root.join("target/release/bundle-agent"),
        layout_bytes: disk_bytes(&layout),
        layout,
        data,
        marker,
        marker_path,
        out,
        cores,
        have_archive: Cell::new(false),
    };
    let load_start = loadavg();
    let info = machine_info(cores, &load_start, &opts);
    println!("\n{info}");
    // Measured before the clock for contention starts: it keeps both cores busy on purpose.
    let sha = if opts.wants(Group::Local) {
        let sha = openssl_sha256(cores)?;
        println!(
            "  openssl sha256 on {cores} processes: {:.0} MB/s\n",
            sha / 1e6
        );
        Some(sha)
    } else {
        None
    };

    let snap_start = cpu_snap();
    println!(
        "measuring (best of {} runs; the first run of each also warms the page cache):",
        opts.runs
    );
    let mut sections = Vec::new();
    if let Some(sha) = sha {
        sections.push(local(&cx, sha)?);
    }
    if opts.wants(Group::Registry) {
        sections.push(registry_group(&cx)?);
    }
    if let Some(statics) = statics {
        sections.push(serve_group(&cx, statics)?);
    }
    let bench = &cx.bench;
    let load_end = loadavg();
    let contention = match (snap_start, cpu_snap()) {
        (Some(a), Some(b)) => {
            let wall = b.at.duration_since(a.at).as_secs_f64();
            let ours = bench.cpu.get().as_secs_f64() + (b.own - a.own);
            let others = (b.busy - a.busy - ours).max(0.0);
            let share = others / (wall * cores as f64).max(1e-9);
            let mut text = format!(
                "- CPU while measuring ({wall:.0} s × {cores} cores): {:.1} s busy, {ours:.1} s of it the measured \
                 commands, the registries and xtask, so other processes used about {others:.1} s ({:.0}%); \
                 hypervisor steal {:.1} s",
                b.busy - a.busy,
                share * 100.0,
                b.steal - a.steal
            );
            if share > 0.05 {
                text.push_str("\n- warning: the cores were shared with other work, so the times are pessimistic");
            }
            text
        }
        _ => "- CPU contention unknown (/proc/stat unreadable)".into(),
    };
    println!("{contention}");
    println!("  load average at end: {load_end}");

    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n## bundle bench ({} of layers requested, {} layout)\n",
        mb(opts.bytes),
        mb(cx.layout_bytes)
    );
    let _ = writeln!(report, "{info}\n- load average at end: {load_end}");
    let _ = writeln!(report, "{contention}");
    let _ = writeln!(
        report,
        "- method: wall time is the best of {} runs, peak RSS the highest of them (ru_maxrss from wait4, \
         the largest process of a pipeline or sequence; it counts the file pages a process maps, too); \
         the first run also warms the page cache; `sync` runs before every run; create, push and pull \
         alternate with their peers (ours, peer, ours, ...: push peer first), so that a drift of the \
         machine's speed weighs on both; bundle fsyncs what it writes (create, extract), the peers do \
         not unless said",
        opts.runs
    );
    for s in &sections {
        for n in &s.notes {
            let _ = writeln!(report, "- {n}");
        }
    }
    report.push('\n');
    let speed_rows: Vec<Vec<String>> = sections
        .iter_mut()
        .flat_map(|s| std::mem::take(&mut s.rows))
        .map(|r| vec![r.what, r.ours, r.peer, r.ratio, r.target, r.result])
        .collect();
    report.push_str(&table(
        &["measurement", "bundle", "peer", "ratio", "target", "result"],
        &speed_rows,
    ));
    report.push('\n');
    let rss_rows: Vec<Vec<String>> = sections
        .iter_mut()
        .flat_map(|s| std::mem::take(&mut s.rss))
        .collect();
    report.push_str(&table(
        &["command", "peak RSS", "peer peak RSS", "target", "result"],
        &rss_rows,
    ));
    println!("{report}");
    let report_path = cx.out.join("report.md");
    std::fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!(
        "report saved in {}; logs in {}",
        util::show(&Command::new(&report_path)),
        util::show(&Command::new(&bench.logs))
    );

    let errors: Vec<String> = sections.into_iter().flat_map(|s| s.errors).collect();
    if !errors.is_empty() {
        bail!(
            "{} command(s) failed (a failure, not a missed target):\n{}",
            errors.len(),
            errors.join("\n")
        );
    }
    Ok(())
}

/// create, verify and extract against tar + zstd, openssl's sha256 and tar -x. Leaves
/// `all.bundle` behind for the registry groups.
fn local(cx: &Cx, sha: f64) -> Result<Section> {
    let (bench, out, data, layout, cores) = (&cx.bench, &cx.out, &cx.data, &cx.layout, cx.cores);
    let plain_blobs: Vec<String> = cx.marker["set"]["plain_blobs"]
        .as_array()
        .ok_or_else(|| anyhow!("{} has no set.plain_blobs", cx.marker_path.display()))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let layout_bytes = cx.layout_bytes;
    let plain_bytes: u64 = plain_blobs
        .iter()
        .map(|b| disk_bytes(&layout.join(b)))
        .sum();
    let p = |name: &str| out.join(name);
    let bundle = |args: &[&dyn AsRef<OsStr>]| vec![cx.bundle(data, args)];
    let (all_bundle, all_zst, plain_bundle, plain_zst) = (
        cx.all_bundle(),
        p("all.tar.zst"),
        p("plain.bundle"),
        p("plain.tar.zst"),
    );
    let (x_ours, x_peer) = (p("extract-bundle"), p("extract-peer"));

    let (create, create_peer) = bench.best_pair(
        &Job {
            name: "create",
            prepare: &|| remove(&all_bundle),
            make: &|| {
                Plan::Steps(vec![bundle(&[
                    &"create",
                    &NO_AGENT,
                    &"bundle.yaml",
                    &"-o",
                    &all_bundle,
                ])])
            },
            side: None,
        },
        &Job {
            name: "create-peer",
            prepare: &|| remove(&all_zst),
            make: &|| {
                Plan::Steps(vec![vec![
                    cmd("tar", &[&"-cf", &"-", &"-C", layout, &"."]),
                    cmd(
                        "zstd",
                        &[&"-T0", &"-3", &"-q", &"-f", &"-", &"-o", &all_zst],
                    ),
                ]])
            },
            side: None,
        },
    );
    // bundle fsyncs what it writes and the peer above does not; this variant tells how much
    // of the difference that is.
    let all_zst_fsync = p("all-fsync.tar.zst");
    let create_peer_fsync = bench.best("create-peer-fsync", &|| remove(&all_zst_fsync), &|| {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            r#"tar -cf - -C "$1" . | zstd -T0 -3 -q -f - -o "$2" && sync "$2""#,
            "sh",
        ])
        .arg(layout)
        .arg(&all_zst_fsync);
        vec![sh]
    });
    let (plain, plain_peer) = bench.best_pair(
        &Job {
            name: "create-plain",
            prepare: &|| remove(&plain_bundle),
            make: &|| {
                Plan::Steps(vec![bundle(&[
                    &"create",
                    &NO_AGENT,
                    &"bundle-plain.yaml",
                    &"-o",
                    &plain_bundle,
                ])])
            },
            side: None,
        },
        &Job {
            name: "create-plain-peer",
            prepare: &|| remove(&plain_zst),
            make: &|| {
                let mut tar = cmd("tar", &[&"-cf", &"-", &"-C", layout]);
                tar.args(&plain_blobs);
                Plan::Steps(vec![vec![
                    tar,
                    cmd(
                        "zstd",
                        &[&"-T1", &"-3", &"-q", &"-f", &"-", &"-o", &plain_zst],
                    ),
                ]])
            },
            side: None,
        },
    );
    let have_archive = create.is_ok();
    cx.have_archive.set(have_archive);
    let skipped = || Err(anyhow!("skipped: bundle create failed"));
    let verify = if have_archive {
        bench.best("verify", &|| Ok(()), &|| bundle(&[&"verify", &all_bundle]))
    } else {
        skipped()
    };
    let deep = if have_archive {
        bench.best("verify-deep", &|| Ok(()), &|| {
            bundle(&[&"verify", &"--deep", &all_bundle])
        })
    } else {
        skipped()
    };
    let extract = if have_archive {
        bench.best("extract", &|| remove(&x_ours), &|| {
            bundle(&[&"extract", &all_bundle, &x_ours])
        })
    } else {
        skipped()
    };
    let extract_peer = if create_peer.is_ok() {
        bench.best(
            "extract-peer",
            &|| {
                remove(&x_peer)?;
                std::fs::create_dir_all(&x_peer)
                    .with_context(|| format!("creating {}", x_peer.display()))
            },
            &|| {
                vec![
                    cmd("zstd", &[&"-dc", &"-q", &all_zst]),
                    cmd("tar", &[&"-x", &"-C", &x_peer]),
                ]
            },
        )
    } else {
        Err(anyhow!("skipped: tar | zstd failed"))
    };
    // The extracted copies are large and of no further use.
    remove(&x_ours)?;
    remove(&x_peer)?;

    let mut s = Section::default();
    s.rows.push(speedup(
        format!("create bundle.yaml ({} of layout in)", mb(layout_bytes)),
        &create,
        &create_peer,
        layout_bytes,
        "tar -C layout . | zstd -T0 -3",
        Some(1.0),
    ));
    s.rows.push(speedup(
        "create bundle.yaml, peer also fsyncs".into(),
        &create,
        &create_peer_fsync,
        layout_bytes,
        "same, then sync FILE",
        None,
    ));
    if create.is_ok() && create_peer.is_ok() {
        let (a, b) = (disk_bytes(&all_bundle), disk_bytes(&all_zst));
        s.rows.push(Row {
            what: "archive size (bundle.yaml)".into(),
            ours: mb(a),
            peer: format!("{} (.tar.zst)", mb(b)),
            ratio: format!("{:.3} (ours / peer)", a as f64 / b.max(1) as f64),
            target: "—".into(),
            result: "info".into(),
        });
    }
    s.rows.push(speedup(
        format!("create bundle-plain.yaml ({} of blobs in)", mb(plain_bytes)),
        &plain,
        &plain_peer,
        plain_bytes,
        "tar <plain blobs> | zstd -T1 -3",
        Some(1.8),
    ));
    if plain.is_ok() && plain_peer.is_ok() {
        let (a, b) = (disk_bytes(&plain_bundle), disk_bytes(&plain_zst));
        s.rows.push(Row {
            what: "archive size (bundle-plain.yaml)".into(),
            ours: mb(a),
            peer: format!("{} (.tar.zst)", mb(b)),
            ratio: format!("{:.3} (ours / peer)", a as f64 / b.max(1) as f64),
            target: "—".into(),
            result: "info".into(),
        });
    }
    let archive_bytes = disk_bytes(&all_bundle);
    for (what, res, target) in [
        ("verify", &verify, Some(0.7)),
        ("verify --deep", &deep, None),
    ] {
        s.rows.push(match res {
            Ok(o) => {
                let ours = archive_bytes as f64 / o.wall.as_secs_f64().max(1e-9);
                let r = ours / sha;
                Row {
                    what: format!("{what} ({} archive)", mb(archive_bytes)),
                    ours: format!("{}, {}", secs(o.wall), rate(archive_bytes, o.wall)),
                    peer: format!("{:.0} MB/s (openssl sha256, {cores} processes)", sha / 1e6),
                    ratio: format!("{r:.2} (ours / sha256)"),
                    target: target.map_or_else(|| "—".into(), |t: f64| format!("≥ {t:.1}")),
                    result: target.map_or_else(|| "info".into(), |t| verdict(r >= t).into()),
                }
            }
            Err(e) => failed_row(what, e),
        });
    }
    s.rows.push(speedup(
        format!("extract ({} archive)", mb(archive_bytes)),
        &extract,
        &extract_peer,
        archive_bytes,
        "zstd -dc | tar -x",
        None,
    ));

    for (what, ours, peer) in [
        ("bundle create bundle.yaml", &create, Some(&create_peer)),
        ("bundle create bundle-plain.yaml", &plain, Some(&plain_peer)),
        ("bundle verify", &verify, None),
        ("bundle verify --deep", &deep, None),
        ("bundle extract", &extract, Some(&extract_peer)),
    ] {
        s.rss.push(rss_row(what, ours, peer));
    }
    s.errors_of(&[
        ("create", &create),
        ("create-peer", &create_peer),
        ("create-peer-fsync", &create_peer_fsync),
        ("create-plain", &plain),
        ("create-plain-peer", &plain_peer),
        ("verify", &verify),
        ("verify-deep", &deep),
        ("extract", &extract),
        ("extract-peer", &extract_peer),
    ]);
    Ok(s)
}

/// The peer's pull target, under the output directory.
const PULL_OCI: &str = "pull-oci";

/// The targets of pulls at once, an OCI layout each (`pull-parallel/K`), under the output
/// directory.
const PULL_PARALLEL: &str = "pull-parallel";

/// How the peer column names [`skopeo_pull`].
const PULL_PEER: &str = "skopeo copy --all --preserve-digests docker://… oci:DIR:NAME";

/// `skopeo copy` of `image` from the registry at `addr` into the OCI layout `dir` (under the
/// output directory), keeping the digests.
fn skopeo_pull(cx: &Cx, addr: &str, image: &BenchImage, dir: &str) -> Command {
    let mut c = cmd(
        "skopeo",
        &[
            &"copy",
            &"--all",
            &"--preserve-digests",
            &"--src-tls-verify=false",
            &format!("docker://{addr}/{}", image.path),
            &format!("oci:{dir}:{}", image.short),
        ],
    );
    c.current_dir(&cx.out);
    c
}

/// [`skopeo_pull`] of each of `images` in turn, into one layout, [`PULL_OCI`].
fn skopeo_pulls(cx: &Cx, addr: &str, images: &[BenchImage]) -> Vec<Vec<Command>> {
    images
        .iter()
        .map(|i| vec![skopeo_pull(cx, addr, i, PULL_OCI)])
        .collect()
}

/// One image of the bench set, as the registry group names it.
struct BenchImage {
    /// Repository and tag without the registry host, `bench/svc-a:1.0`.
    path: String,
    /// Its tag in the bench layout, `svc-a-1.0`.
    layout_tag: String,
    /// Its tag in the peer's pulled OCI directory, `svc-a`.
    short: String,
}

/// The images of the marker's `set.images`, `registry.example/bench/svc-a:1.0` with layout
/// tag `svc-a-1.0`.
fn bench_images(marker: &serde_json::Value) -> Option<Vec<BenchImage>> {
    marker["set"]["images"]
        .as_array()?
        .iter()
        .map(|i| {
            let name = i["name"].as_str()?;
            let (_host, path) = name.split_once('/')?;
            let repo = path.rsplit_once(':').map_or(path, |(r, _)| r);
            let short = repo.rsplit('/').next()?.to_owned();
            Some(BenchImage {
                path: path.to_owned(),
                layout_tag: i["tag"].as_str()?.to_owned(),
                short,
            })
        })
        .collect()
}

/// A bundle.yaml that pulls `images` from `addr`.
fn pull_yaml(addr: &str, images: &[BenchImage]) -> String {
    let mut y = String::from("name: bench-pull\nversion: 1.0.0\nimages:\n");
    for i in images {
        let _ = writeln!(y, "  - name: {addr}/{}", i.path);
    }
    y
}

/// push, re-push and pull through a local registry, against skopeo.
fn registry_group(cx: &Cx) -> Result<Section> {
    let bench = &cx.bench;
    let mut s = Section::default();
    let images = bench_images(&cx.marker)
        .ok_or_else(|| anyhow!("{} has no usable set.images", cx.marker_path.display()))?;
    let pushed_bytes = cx.layout_bytes;
    let fail_all = |s: &mut Section, e: anyhow::Error| {
        s.rows
            .push(failed_row("push, pull through a local registry", &e));
        let e: Result<Best> = Err(e);
        s.rss.push(rss_row("bundle push", &e, None));
        s.errors_of(&[("registry group", &e)]);
    };
    let archive = match cx.archive() {
        Ok(a) => a,
        Err(e) => {
            fail_all(&mut s, e);
            return Ok(s);
        }
    };

    let reg_root = cx.out.join("registry");
    let starts = std::cell::Cell::new(0u32);
    let current: RefCell<Option<Registry>> = RefCell::new(None);
    // Stops the running registry, if any, counting its CPU as ours.
    let stop = || -> Result<()> {
        if let Some(r) = current.borrow_mut().take() {
            let cpu = r.stop()?.cpu;
            bench.cpu.set(bench.cpu.get() + cpu);
        }
        Ok(())
    };
    // A registry on empty storage, the one before stopped.
    let fresh = || -> Result<()> {
        stop()?;
        let n = starts.get() + 1;
        starts.set(n);
        let r = Registry::start(
            &reg_root.join(n.to_string()),
            &bench.logs.join(format!("registry.{n}.log")),
        )?;
        *current.borrow_mut() = Some(r);
        Ok(())
    };
    let addr = || {
        current
            .borrow()
            .as_ref()
            .map(Registry::addr)
            .unwrap_or_default()
    };
    let reg_cpu = || current.borrow().as_ref().and_then(Registry::cpu);
    let side: Side<'_> = Some(&reg_cpu);
    let push_ours = || {
        let a = addr();
        vec![vec![cx.bundle(
            &cx.out,
            &[
                &"push",
                &archive,
                &"--registry",
                &a,
                &"--insecure-registry",
                &a,
            ],
        )]]
    };

    let push_peer_cmds = || -> Vec<Vec<Command>> {
        let a = addr();
        images
            .iter()
            .map(|i| {
                // The bench's bundle.yaml names the layout relative to the data set.
                let mut c = cmd(
                    "skopeo",
                    &[
                        &"copy",
                        &"--dest-tls-verify=false",
                        &"--preserve-digests",
                        &"--all",
                        &format!("oci:layout:{}", i.layout_tag),
                        &format!("docker://{a}/{}", i.path),
                    ],
                );
                c.current_dir(&cx.data);
                vec![c]
            })
            .collect()
    };
    // In alternation, the peer first: the registry of our last run serves the re-push and
    // the pulls.
    let (push_peer, push) = bench.best_pair(
        &Job {
            name: "push-peer",
            prepare: &fresh,
            make: &|| Plan::Steps(push_peer_cmds()),
            side,
        },
        &Job {
            name: "push",
            prepare: &fresh,
            make: &|| Plan::Steps(push_ours()),
            side,
        },
    );
    let repush = if push.is_ok() {
        bench.best_steps("repush", &|| Ok(()), &push_ours, side)
    } else {
        Err(anyhow!("skipped: bundle push failed"))
    };

    // Pull what our push left in the registry, into a new archive and into an OCI layout.
    let pull_dir = cx.out.join("pull");
    let (pull_cache, pull_bundle, pull_lock) = (
        pull_dir.join("cache"),
        pull_dir.join("pull.bundle"),
        pull_dir.join("bundle.lock"),
    );
    let pull_oci = cx.out.join(PULL_OCI);
    let (pull, pull_peer) = if push.is_ok() {
        let yaml = pull_dir.join("pull.yaml");
        let written = std::fs::create_dir_all(&pull_dir)
            .and_then(|()| std::fs::write(&yaml, pull_yaml(&addr(), &images)))
            .with_context(|| format!("writing {}", yaml.display()));
        let pull = Job {
            name: "pull",
            prepare: &|| {
                for p in [&pull_cache, &pull_bundle, &pull_lock] {
                    remove(p)?;
                }
                std::fs::create_dir_all(&pull_cache)
                    .with_context(|| format!("creating {}", pull_cache.display()))
            },
            make: &|| {
                let a = addr();
                Plan::Steps(vec![vec![cx.bundle(
                    &pull_dir,
                    &[
                        &"create",
                        &NO_AGENT,
                        &"pull.yaml",
                        &"-o",
                        &"pull.bundle",
                        &"--cache",
                        &"cache",
                        &"--insecure-registry",
                        &a,
                    ],
                )]])
            },
            side,
        };
        let pull_peer = Job {
            name: "pull-peer",
            prepare: &|| remove(&pull_oci),
            make: &|| Plan::Steps(skopeo_pulls(cx, &addr(), &images)),
            side,
        };
        match written {
            Ok(()) => bench.best_pair(&pull, &pull_peer),
            Err(e) => {
                let peer = bench.best_plan(pull_peer.name, pull_peer.prepare, pull_peer.make, side);
                (Err(e), peer)
            }
        }
    } else {
        let skip = || Err(anyhow!("skipped: bundle push failed"));
        (skip(), skip())
    };
    let pulled_bytes = disk_bytes(&pull_bundle);
    let stopped = stop();
    for p in [&pull_dir, &pull_oci, &reg_root] {
        remove(p)?;
    }

    let n = images.len();
    s.rows.push(speedup(
        format!(
            "push all.bundle ({n} images, {} of layout) to an empty registry",
            mb(pushed_bytes)
        ),
        &push,
        &push_peer,
        pushed_bytes,
        &format!("skopeo copy --preserve-digests --all oci:layout:TAG docker://…, {n} runs"),
        Some(2.0),
    ));
    if let Some(row) = cpu_floor_row("push", &push, &push_peer, cx.cores) {
        s.rows.push(row);
    }
    s.rows.push(match (&repush, &push) {
        (Ok(r), Ok(p)) => {
            let share = r.wall.as_secs_f64() / p.wall.as_secs_f64().max(1e-9);
            Row {
                what: "re-push of the unchanged archive to the same registry".into(),
                ours: format!(
                    "{}{}",
                    secs(r.wall),
                    r.side_cpu.map_or_else(String::new, |c| format!(
                        ", registry CPU {:.2} s",
                        c.as_secs_f64()
                    ))
                ),
                peer: "—".into(),
                ratio: format!("{:.2}% (of the first push)", share * 100.0),
                target: "≤ 2%".into(),
                result: verdict(share <= 0.02).into(),
            }
        }
        (Err(e), _) | (_, Err(e)) => failed_row("re-push", e),
    });
    s.rows.push(speedup(
        format!(
            "pull the {n} images (ours also compresses and fsyncs a {} archive)",
            mb(pulled_bytes)
        ),
        &pull,
        &pull_peer,
        pushed_bytes,
        &format!("{PULL_PEER}, {n} runs, one DIR"),
        Some(1.5),
    ));
    if let Some(row) = cpu_floor_row("pull", &pull, &pull_peer, cx.cores) {
        s.rows.push(row);
    }
    s.rss.push(rss_row("bundle push", &push, Some(&push_peer)));
    s.rss.push(rss_row("bundle push (re-push)", &repush, None));
    s.rss.push(rss_row(
        "bundle create pull.yaml (pull)",
        &pull,
        Some(&pull_peer),
    ));
    s.notes.push(format!(
        "registry rows: {} `serve` on 127.0.0.1 with a free port, filesystem storage on the same disk, \
         log level error; a fresh registry for each push run, and the one of our last push serves the \
         re-push and both pulls; `bundle push` and `bundle create` run with their default --jobs (8), \
         the pull with an empty --cache; skopeo runs once per image (the peer column is the sum) and \
         keeps the digests (--preserve-digests; without it, it compresses the plain image's layers); \
         registry CPU is its user + system time during the fastest run",
        registry::PROGRAM
    ));
    s.errors_of(&[
        ("push", &push),
        ("repush", &repush),
        ("pull", &pull),
        ("pull-peer", &pull_peer),
        ("push-peer", &push_peer),
    ]);
    if let Err(e) = stopped {
        s.errors.push(format!("registry: {e:#}"));
    }
    Ok(s)
}

/// The address in `bundle serve`'s first line, `serving NAME VERSION (N images) on
/// http://ADDR/v2/`.
fn serving_addr(line: &str) -> Option<&str> {
    line.strip_prefix("serving ")?
        .rsplit_once(" on http://")?
        .1
        .strip_suffix("/v2/")
}

/// The address in `bundle-agent`'s `listening on ADDR`.
fn listening_addr(line: &str) -> Option<&str> {
    line.strip_prefix("listening on ")
}

/// skopeo pulls from `bundle serve` and from `bundle-agent registry` against docker-registry
/// holding the same images, the servers' peak RSS, and the sizes of the static binaries.
fn serve_group(cx: &Cx, statics: Result<Statics>) -> Result<Section> {
    let bench = &cx.bench;
    let mut s = Section::default();
    let images = bench_images(&cx.marker)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| anyhow!("{} has no usable set.images", cx.marker_path.display()))?;
    let n = images.len();
    static_rows(&mut s, statics);
    let archive = match cx.archive() {
        Ok(a) => a,
        Err(e) => {
            s.rows.push(failed_row("pull from bundle serve", &e));
            s.errors_of(&[("serve group", &Err::<(), _>(e))]);
            return Ok(s);
        }
    };
    let log = |name: &str| bench.logs.join(name);
    let (par_oci, reg_root, agent_root) = (
        cx.out.join(PULL_PARALLEL),
        cx.out.join("serve-registry"),
        cx.out.join("agent-registry"),
    );
    let add_cpu = |d: Duration| bench.cpu.set(bench.cpu.get() + d);
    // Counts a stopped server's CPU as ours.
    let stopped = |u: Result<Usage>| {
        if let Ok(u) = &u {
            add_cpu(u.cpu);
        }
        u
    };
    let push_to = |name: &str, addr: &str| -> Result<()> {
        let c = cx.bundle(
            &cx.out,
            &[
                &"push",
                &archive,
                &"--registry",
                &addr,
                &"--insecure-registry",
                &addr,
            ],
        );
        println!("  {name} (not measured): {}", util::show(&c));
        add_cpu(util::measure(vec![c], &log(name))?.cpu());
        Ok(())
    };
    let sequential = |name: &str, addr: &str, cpu: &dyn Fn() -> Option<Duration>| {
        bench.best_steps(
            name,
            &|| remove(&cx.out.join(PULL_OCI)),
            &|| skopeo_pulls(cx, addr, &images),
            Some(cpu),
        )
    };
    // Pull K takes image K mod n into a layout of its own: skopeo does not share one.
    let parallel = |name: &str, addr: &str, cpu: &dyn Fn() -> Option<Duration>| {
        bench.best_parallel(
            name,
            &|| {
                remove(&par_oci)?;
                std::fs::create_dir_all(&par_oci)
                    .with_context(|| format!("creating {}", par_oci.display()))
            },
            &|| {
                let pull = |k| {
                    let dir = format!("{PULL_PARALLEL}/{k}");
                    skopeo_pull(cx, addr, &images[k % n], &dir)
                };
                (0..PARALLEL_PULLS).map(pull).collect()
            },
            Some(cpu),
        )
    };
    // Each round has a server of its own, so that the peak RSS wait4 reports is the round's.
    let round = |server: Result<Server>,
                 measure: &dyn Fn(&Server) -> Result<Best>|
     -> (Result<Best>, Result<Usage>) {
        match server {
            Ok(srv) => {
                let m = measure(&srv);
                (m, stopped(srv.stop()))
            }
            Err(e) => (Err(e), Err(anyhow!("skipped: the server did not start"))),
        }
    };
    let serve_with = |k: u32, verify: bool| {
        let mut args: Vec<&dyn AsRef<OsStr>> =
            vec![&"serve", &archive, &"--listen", &"127.0.0.1:0"];
        if verify {
            args.push(&"--verify");
        }
        Server::start(
            cx.bundle(&cx.out, &args),
            &log(&format!("serve.{k}.log")),
            serving_addr,
        )
    };
    let serve = |k: u32| serve_with(k, false);
    let agent = |k: u32| {
        Server::start(
            cmd(
                &cx.agent_bin,
                &[
                    &"registry",
                    &"--root",
                    &agent_root,
                    &"--listen",
                    &"127.0.0.1:0",
                ],
            ),
            &log(&format!("agent.{k}.log")),
            listening_addr,
        )
    };

    // The peer holds what our push puts there; a restart on the same storage begins each
    // round, so that its peak RSS is the round's too.
    let mut reg = Registry::start(&reg_root, &log("serve-registry.0.log")).and_then(|mut r| {
        push_to("serve-push-registry", &r.addr())?;
        stopped(r.restart(&log("serve-registry.1.log")))?;
        Ok(r)
    });
    let peer_failed = |e: &anyhow::Error| {
        (
            Err(anyhow!("skipped: {} failed: {e:#}", registry::PROGRAM)),
            Err(anyhow!("skipped: {} failed", registry::PROGRAM)),
        )
    };

    // The target row: `bundle serve` and the peer both up, their pulls in alternation.
    let ((serve_seq, serve_seq_use), (peer_seq, peer_seq_use)) = match (serve(1), &mut reg) {
        (Ok(srv), Ok(r)) => {
            let (ours, peer) = {
                let (srv_cpu, reg_cpu) = (|| srv.cpu(), || r.cpu());
                let (srv_addr, reg_addr) = (srv.addr().to_owned(), r.addr());
                let prepare = || remove(&cx.out.join(PULL_OCI));
                bench.best_pair(
                    &Job {
                        name: "serve-pull",
                        prepare: &prepare,
                        make: &|| Plan::Steps(skopeo_pulls(cx, &srv_addr, &images)),
                        side: Some(&srv_cpu),
                    },
                    &Job {
                        name: "serve-pull-peer",
                        prepare: &prepare,
                        make: &|| Plan::Steps(skopeo_pulls(cx, &reg_addr, &images)),
                        side: Some(&reg_cpu),
                    },
                )
            };
            (
                (ours, stopped(srv.stop())),
                (peer, stopped(r.restart(&log("serve-registry.2.log")))),
            )
        }
        (Err(e), Ok(r)) => {
            let m = sequential("serve-pull-peer", &r.addr(), &|| r.cpu());
            (
                (Err(e), Err(anyhow!("skipped: the server did not start"))),
                (m, stopped(r.restart(&log("serve-registry.2.log")))),
            )
        }
        (srv, Err(e)) => (
            round(srv, &|srv| {
                sequential("serve-pull", srv.addr(), &|| srv.cpu())
            }),
            peer_failed(e),
        ),
    };
    let seq_bytes = disk_bytes(&cx.out.join(PULL_OCI));
    let (verify_seq, _) = round(serve_with(3, true), &|srv| {
        sequential("serve-verify-pull", srv.addr(), &|| srv.cpu())
    });

    let (serve_par, serve_par_use) = round(serve(2), &|srv| {
        parallel("serve-pull-parallel", srv.addr(), &|| srv.cpu())
    });
    let par_bytes = disk_bytes(&par_oci);
    let (peer_par, peer_par_use) = match reg {
        Ok(r) => {
            let m = parallel("serve-pull-parallel-peer", &r.addr(), &|| r.cpu());
            (m, stopped(r.stop()))
        }
        Err(e) => {
            let pair = peer_failed(&e);
            s.errors_of(&[(registry::PROGRAM, &Err::<(), _>(e))]);
            pair
        }
    };

    // The agent stores our push, then a second agent on that storage serves the pulls.
    let agent_push = remove(&agent_root).and_then(|()| agent(1)).and_then(|a| {
        let pushed = push_to("serve-push-agent", a.addr());
        let usage = stopped(a.stop());
        pushed.and(usage)
    });
    let (agent_par, agent_par_use) = match &agent_push {
        Ok(_) => round(agent(2), &|a| {
            parallel("agent-pull-parallel", a.addr(), &|| a.cpu())
        }),
        Err(_) => (
            Err(anyhow!("skipped: the push into the agent failed")),
            Err(anyhow!("skipped: the push into the agent failed")),
        ),
    };
    for p in [&cx.out.join(PULL_OCI), &par_oci, &reg_root, &agent_root] {
        remove(p)?;
    }

    let peer_name = |what: &str| format!("{PULL_PEER}, {what}, from {}", registry::PROGRAM);
    s.rows.push(speedup(
        format!(
            "pull the {n} images from `bundle serve`, one after another ({} pulled)",
            mb(seq_bytes)
        ),
        &serve_seq,
        &peer_seq,
        seq_bytes,
        &peer_name(&format!("{n} runs")),
        Some(1.0),
    ));
    s.rows.push(speedup(
        format!(
            "the same from `bundle serve --verify` (each frame's sha256 checked once) ({} pulled)",
            mb(seq_bytes)
        ),
        &verify_seq,
        &peer_seq,
        seq_bytes,
        &peer_name(&format!("{n} runs")),
        None,
    ));
    for (server, ours) in [
        ("`bundle serve`", &serve_par),
        ("`bundle-agent registry`", &agent_par),
    ] {
        s.rows.push(speedup(
            format!(
                "{PARALLEL_PULLS} pulls at once from {server} ({} pulled)",
                mb(par_bytes)
            ),
            ours,
            &peer_par,
            par_bytes,
            &peer_name(&format!("{PARALLEL_PULLS} at once")),
            None,
        ));
    }
    let at_once = format!("{PARALLEL_PULLS} pulls at once");
    s.rss.push(server_rss_row(
        &format!("bundle serve, {at_once}"),
        &serve_par_use,
        Some(&peer_par_use),
        Some(SERVER_RSS_TARGET),
    ));
    s.rss.push(server_rss_row(
        &format!("bundle-agent registry, {at_once}"),
        &agent_par_use,
        Some(&peer_par_use),
        Some(SERVER_RSS_TARGET),
    ));
    s.rss.push(server_rss_row(
        &format!("bundle serve, {n} pulls one after another"),
        &serve_seq_use,
        Some(&peer_seq_use),
        None,
    ));
    s.rss.push(server_rss_row(
        "bundle-agent registry, receiving `bundle push`",
        &agent_push,
        None,
        None,
    ));
    s.notes.push(format!(
        "serve rows: `bundle serve all.bundle --listen 127.0.0.1:0`, and `bundle-agent registry` \
         (the release build, not the static one) on storage filled by `bundle push`, against {peer} \
         (filesystem storage on the same disk, log level error) holding the same images through \
         `bundle push` (not measured); skopeo pulls into fresh OCI layouts each run; the pulls one \
         after another alternate between `bundle serve` and {peer}, both up; \
         {PARALLEL_PULLS} pulls at once: pull K takes image K mod {n} into a layout of its own; each \
         server serves one round and stops on SIGTERM ({peer}: SIGKILL, restarted on the same \
         storage between rounds), and its peak RSS is wait4's for that round; registry CPU is the \
         server's",
        peer = registry::PROGRAM
    ));
    s.errors_of(&[
        ("serve-pull", &serve_seq),
        ("serve-pull-peer", &peer_seq),
        ("serve-verify-pull", &verify_seq),
        ("serve-pull-parallel", &serve_par),
        ("serve-pull-parallel-peer", &peer_par),
        ("agent-pull-parallel", &agent_par),
    ]);
    s.errors_of(&[
        ("bundle serve (one after another)", &serve_seq_use),
        ("bundle serve (at once)", &serve_par_use),
        ("bundle-agent registry (push)", &agent_push),
        ("bundle-agent registry (at once)", &agent_par_use),
        ("docker-registry (one after another)", &peer_seq_use),
        ("docker-registry (at once)", &peer_par_use),
    ]);
    Ok(s)
}

/// The sizes of the static binaries, against the budgets `cargo xtask static` checks.
fn static_rows(s: &mut Section, statics: Result<Statics>) {
    let built = match statics {
        Ok(b) => b,
        Err(e) => {
            s.rows
                .push(failed_row("static binaries (cargo xtask static)", &e));
            s.errors_of(&[("static", &Err::<(), _>(e))]);
            return;
        }
    };
    for (what, path, budget) in [
        ("static bundle-agent", &built.agent, statics::AGENT_BUDGET),
        ("stage0", &built.stage0, statics::STAGE0_BUDGET),
    ] {
        let size = disk_bytes(path);
        let binary = |b: u64| {
            if b >= 1 << 20 {
                mib(b)
            } else {
                format!("{:.1} KiB", b as f64 / 1024.0)
            }
        };
        s.rows.push(Row {
            what: format!("{what} size ({})", util::show(&Command::new(path))),
            ours: format!("{size} bytes ({})", binary(size)),
            peer: "—".into(),
            ratio: format!(
                "{:.0}% (of the {} budget)",
                size as f64 * 100.0 / budget as f64,
                binary(budget)
            ),
            target: "—".into(),
            result: "info".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound is (client + registry CPU) / cores for each side, the busy share the bound
    /// over the wall time; without a registry's CPU there is no row.
    #[test]
    fn bounds_runs_by_their_cpu() {
        let best = |wall: f64, cpu: f64, registry: Option<f64>| -> Result<Best> {
            Ok(Best {
                wall: Duration::from_secs_f64(wall),
                rss: 0,
                cpu: Duration::from_secs_f64(cpu),
                side_cpu: registry.map(Duration::from_secs_f64),
            })
        };
        let row = cpu_floor_row(
            "push",
            &best(2.5, 0.5, Some(3.5)),
            &best(5.0, 3.0, Some(3.0)),
            2,
        )
        .expect("a row");
        assert_eq!(
            row.what,
            "push: CPU-bound least wall time on 2 cores (info)"
        );
        assert_eq!(
            row.ours,
            "2.00 s = (0.50 s + registry 3.50 s) / 2; the run kept the cores 80% busy"
        );
        assert!(row.peer.ends_with(
            "its bound 3.00 s = (3.00 s + registry 3.00 s) / 2; the run kept the cores 60% busy"
        ));
        assert_eq!(
            row.ratio,
            "2.50 (peer time / our bound); 1.50 bound to bound"
        );
        assert!(
            cpu_floor_row("pull", &best(1.0, 1.0, None), &best(1.0, 1.0, Some(1.0)), 2).is_none()
        );
    }

    #[test]
    fn reads_the_openssl_summary_line() {
        let out = "Got: +F:25:sha256:644473621.26 from 1\nversion: 3.0.19\n\
                   CPUINFO: OPENSSL_ia32cap=0xfffa\nsha256         1353311.00k\n";
        assert_eq!(parse_openssl_speed(out), Some(1_353_311_000.0));
        assert_eq!(parse_openssl_speed("nothing here\n"), None);
    }

    #[test]
    fn parses_options() {
        let args = |s: &[&str]| s.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let o = parse(&args(&["--bytes", "20M", "--runs=3"])).expect("valid");
        assert_eq!((o.bytes, o.runs), (20_000_000, 3));
        assert_eq!(o.only, None);
        let o = parse(&args(&["--only", "registry"])).expect("valid");
        assert_eq!(o.only, Some(Group::Registry));
        assert!(o.wants(Group::Registry) && !o.wants(Group::Local));
        let o = parse(&args(&["--only=serve"])).expect("valid");
        assert!(o.wants(Group::Serve) && !o.wants(Group::Registry));
        assert!(parse(&args(&["--only=nothing"])).is_err());
        assert!(parse(&args(&["--runs", "0"])).is_err());
        assert!(parse(&args(&["--what"])).is_err());
    }

    #[test]
    fn names_the_bench_images_for_the_registry() {
        let marker = serde_json::json!({"set": {"images": [
            {"name": "registry.example/bench/svc-a:1.0", "tag": "svc-a-1.0"},
            {"name": "registry.example/bench/data:1.0", "tag": "data-1.0"},
        ]}});
        let images = bench_images(&marker).expect("images");
        let got: Vec<(&str, &str, &str)> = images
            .iter()
            .map(|i| (i.path.as_str(), i.layout_tag.as_str(), i.short.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("bench/svc-a:1.0", "svc-a-1.0", "svc-a"),
                ("bench/data:1.0", "data-1.0", "data")
            ]
        );
        assert_eq!(
            pull_yaml("127.0.0.1:5000", &images),
            "name: bench-pull\nversion: 1.0.0\nimages:\n  - name: 127.0.0.1:5000/bench/svc-a:1.0\n  \
             - name: 127.0.0.1:5000/bench/data:1.0\n"
        );
        assert!(bench_images(&serde_json::json!({"set": {}})).is_none());
    }

    #[test]
    fn reads_the_servers_startup_lines() {
        for (line, want) in [
            (
                "serving bench 1.0.0 (5 images) on http://127.0.0.1:41234/v2/",
                Some("127.0.0.1:41234"),
            ),
            (
                "serving a on b (1 images) on http://[::1]:80/v2/",
                Some("[::1]:80"),
            ),
            ("  127.0.0.1:41234/bench/svc-a:1.0", None),
        ] {
            assert_eq!(serving_addr(line), want, "{line:?}");
        }
        assert_eq!(
            listening_addr("listening on 127.0.0.1:5000"),
            Some("127.0.0.1:5000")
        );
        assert_eq!(listening_addr("serving x"), None);
    }
}
