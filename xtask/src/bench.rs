//! `cargo xtask bench`: measures `bundle` against the tools a user would reach for instead
//! (tar + zstd, openssl's sha256, tar -x) on a generated image set, in one run, and prints a
//! Markdown table with the targets. A missed target is reported, never an error: benchmarks
//! report, tests assert.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::util::{self, Measured, cargo, disk_bytes, measure, parse_size, remove, root};

const DEFAULT_BYTES: u64 = 1_000_000_000;
const DEFAULT_RUNS: u32 = 2;
const RSS_TARGET: u64 = 256 << 20;

struct Opts {
    bytes: u64,
    runs: u32,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut opts = Opts {
        bytes: DEFAULT_BYTES,
        runs: DEFAULT_RUNS,
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
            _ => bail!(
                "bench: unexpected argument {a:?} (usage: cargo xtask bench [--bytes N] [--runs N])"
            ),
        }
    }
    Ok(opts)
}

/// Runs each measurement `runs` times and keeps the fastest; the first run also warms the
/// page cache.
struct Bench {
    runs: u32,
    logs: PathBuf,
    /// CPU time of every measured process, to tell our load from other processes'.
    cpu: std::cell::Cell<Duration>,
}

/// The fastest run and the highest peak RSS seen in any run.
struct Best {
    wall: Duration,
    rss: u64,
}

impl Bench {
    fn best(
        &self,
        name: &str,
        prepare: &dyn Fn() -> Result<()>,
        make: &dyn Fn() -> Vec<Command>,
    ) -> Result<Best> {
        let mut best: Option<Best> = None;
        for r in 1..=self.runs {
            prepare()?;
            // Flush earlier runs' dirty pages so that no run pays for another's writeback.
            Command::new("sync").status().context("running sync")?;
            let m: Measured = measure(make(), &self.logs.join(format!("{name}.{r}")))?;
            self.cpu.set(self.cpu.get() + m.cpu());
            let line = m
                .procs
                .iter()
                .map(|p| p.line.as_str())
                .collect::<Vec<_>>()
                .join(" | ");
            println!(
                "  {name} run {r}/{}: {}, CPU {:.2} s, peak RSS {}  ({line})",
                self.runs,
                secs(m.wall),
                m.cpu().as_secs_f64(),
                mib(m.max_rss())
            );
            best = Some(match best {
                None => Best {
                    wall: m.wall,
                    rss: m.max_rss(),
                },
                Some(b) => Best {
                    wall: b.wall.min(m.wall),
                    rss: b.rss.max(m.max_rss()),
                },
            });
        }
        best.ok_or_else(|| anyhow!("no runs"))
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
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let after: Vec<&str> = me.rsplit_once(')')?.1.split_whitespace().collect();
    let own: f64 = after.get(11)?.parse::<f64>().ok()? + after.get(12)?.parse::<f64>().ok()?;
    Some(CpuSnap {
        busy: busy / USER_HZ,
        steal: f.get(7).copied().unwrap_or(0.0) / USER_HZ,
        own: own / USER_HZ,
        at: std::time::Instant::now(),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn machine_info(cores: usize, load_start: &str) -> String {
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
    format!(
        "- nproc: {cores}\n- CPU: {cpu}\n- memory: {mem}\n- kernel: {}\n- load average at start: {}\n- peers: {}; {}",
        read("/proc/sys/kernel/osrelease").trim(),
        load_start,
        version("zstd", "-V"),
        version("tar", "--version"),
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

pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let root = root();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "bundle-cli",
        "-p",
        "bundle-testimages",
    ]))?;
    let bundle_bin = root.join("target/release/bundle");

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
    let plain_blobs: Vec<String> = marker["set"]["plain_blobs"]
        .as_array()
        .ok_or_else(|| anyhow!("{} has no set.plain_blobs", marker_path.display()))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let layout = data.join("layout");
    let layout_bytes = disk_bytes(&layout);
    let plain_bytes: u64 = plain_blobs
        .iter()
        .map(|b| disk_bytes(&layout.join(b)))
        .sum();

    let out = root.join("bench-out");
    remove(&out)?;
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let bench = Bench {
        runs: opts.runs,
        logs,
        cpu: std::cell::Cell::new(Duration::ZERO),
    };
    let load_start = loadavg();
    let info = machine_info(cores, &load_start);
    println!("\n{info}");
    let sha = openssl_sha256(cores)?;
    println!(
        "  openssl sha256 on {cores} processes: {:.0} MB/s\n",
        sha / 1e6
    );

    let p = |name: &str| out.join(name);
    let bundle = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = Command::new(&bundle_bin);
        c.current_dir(&data);
        for a in args {
            c.arg(a);
        }
        vec![c]
    };
    let cmd = |prog: &str, args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = Command::new(prog);
        for a in args {
            c.arg(a);
        }
        c
    };
    let (all_bundle, all_zst, plain_bundle, plain_zst) = (
        p("all.bundle"),
        p("all.tar.zst"),
        p("plain.bundle"),
        p("plain.tar.zst"),
    );
    let (x_ours, x_peer) = (p("extract-bundle"), p("extract-peer"));

    let snap_start = cpu_snap();
    println!(
        "measuring (best of {} runs; the first run of each also warms the page cache):",
        opts.runs
    );
    let create = bench.best("create", &|| remove(&all_bundle), &|| {
        bundle(&[&"create", &"bundle.yaml", &"-o", &all_bundle])
    });
    let create_peer = bench.best("create-peer", &|| remove(&all_zst), &|| {
        vec![
            cmd("tar", &[&"-cf", &"-", &"-C", &layout, &"."]),
            cmd(
                "zstd",
                &[&"-T0", &"-3", &"-q", &"-f", &"-", &"-o", &all_zst],
            ),
        ]
    });
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
        .arg(&layout)
        .arg(&all_zst_fsync);
        vec![sh]
    });
    let plain = bench.best("create-plain", &|| remove(&plain_bundle), &|| {
        bundle(&[&"create", &"bundle-plain.yaml", &"-o", &plain_bundle])
    });
    let plain_peer = bench.best("create-plain-peer", &|| remove(&plain_zst), &|| {
        let mut tar = cmd("tar", &[&"-cf", &"-", &"-C", &layout]);
        tar.args(&plain_blobs);
        vec![
            tar,
            cmd(
                "zstd",
                &[&"-T1", &"-3", &"-q", &"-f", &"-", &"-o", &plain_zst],
            ),
        ]
    });
    let have_archive = create.is_ok();
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
    let load_end = loadavg();
    let contention = match (snap_start, cpu_snap()) {
        (Some(a), Some(b)) => {
            let wall = b.at.duration_since(a.at).as_secs_f64();
            let ours = bench.cpu.get().as_secs_f64() + (b.own - a.own);
            let others = (b.busy - a.busy - ours).max(0.0);
            let share = others / (wall * cores as f64).max(1e-9);
            let mut text = format!(
                "- CPU while measuring ({wall:.0} s × {cores} cores): {:.1} s busy, {ours:.1} s of it the measured \
                 commands and xtask, so other processes used about {others:.1} s ({:.0}%); hypervisor steal {:.1} s",
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

    // The speed table.
    let mut rows: Vec<Row> = Vec::new();
    let speedup = |what: String,
                   ours: &Result<Best>,
                   peer: &Result<Best>,
                   in_bytes: u64,
                   peer_name: &str,
                   target: Option<f64>| match (ours, peer) {
        (Ok(o), Ok(p)) => {
            let r = p.wall.as_secs_f64() / o.wall.as_secs_f64().max(1e-9);
            Row {
                what,
                ours: format!("{}, {}", secs(o.wall), rate(in_bytes, o.wall)),
                peer: format!("{}, {} ({peer_name})", secs(p.wall), rate(in_bytes, p.wall)),
                ratio: format!("{r:.2} (peer time / ours)"),
                target: target.map_or_else(|| "—".into(), |t| format!("≥ {t:.1}")),
                result: target.map_or_else(|| "info".into(), |t| verdict(r >= t).into()),
            }
        }
        (Err(e), _) | (_, Err(e)) => failed_row(&what, e),
    };
    rows.push(speedup(
        format!("create bundle.yaml ({} of layout in)", mb(layout_bytes)),
        &create,
        &create_peer,
        layout_bytes,
        "tar -C layout . | zstd -T0 -3",
        Some(1.0),
    ));
    rows.push(speedup(
        "create bundle.yaml, peer also fsyncs".into(),
        &create,
        &create_peer_fsync,
        layout_bytes,
        "same, then sync FILE",
        None,
    ));
    if create.is_ok() && create_peer.is_ok() {
        let (a, b) = (disk_bytes(&all_bundle), disk_bytes(&all_zst));
        rows.push(Row {
            what: "archive size (bundle.yaml)".into(),
            ours: mb(a),
            peer: format!("{} (.tar.zst)", mb(b)),
            ratio: format!("{:.3} (ours / peer)", a as f64 / b.max(1) as f64),
            target: "—".into(),
            result: "info".into(),
        });
    }
    rows.push(speedup(
        format!("create bundle-plain.yaml ({} of blobs in)", mb(plain_bytes)),
        &plain,
        &plain_peer,
        plain_bytes,
        "tar <plain blobs> | zstd -T1 -3",
        Some(1.8),
    ));
    if plain.is_ok() && plain_peer.is_ok() {
        let (a, b) = (disk_bytes(&plain_bundle), disk_bytes(&plain_zst));
        rows.push(Row {
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
        rows.push(match res {
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
    rows.push(speedup(
        format!("extract ({} archive)", mb(archive_bytes)),
        &extract,
        &extract_peer,
        archive_bytes,
        "zstd -dc | tar -x",
        None,
    ));

    // The memory table.
    let mut rss_rows: Vec<Vec<String>> = Vec::new();
    for (what, ours, peer) in [
        ("bundle create bundle.yaml", &create, Some(&create_peer)),
        ("bundle create bundle-plain.yaml", &plain, Some(&plain_peer)),
        ("bundle verify", &verify, None),
        ("bundle verify --deep", &deep, None),
        ("bundle extract", &extract, Some(&extract_peer)),
    ] {
        let peer = match peer {
            Some(Ok(p)) => mib(p.rss),
            Some(Err(_)) => "failed".into(),
            None => "—".into(),
        };
        rss_rows.push(match ours {
            Ok(o) => vec![
                what.into(),
                mib(o.rss),
                peer,
                format!("≤ {}", mib(RSS_TARGET)),
                verdict(o.rss <= RSS_TARGET).into(),
            ],
            Err(_) => vec![
                what.into(),
                "failed".into(),
                peer,
                format!("≤ {}", mib(RSS_TARGET)),
                "ERROR".into(),
            ],
        });
    }

    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n## bundle bench ({} of layers requested, {} layout)\n",
        mb(opts.bytes),
        mb(layout_bytes)
    );
    let _ = writeln!(report, "{info}\n- load average at end: {load_end}");
    let _ = writeln!(report, "{contention}");
    let _ = writeln!(
        report,
        "- method: wall time is the best of {} runs, peak RSS the highest of them (ru_maxrss from wait4, \
         the largest process of a pipeline); the first run also warms the page cache; `sync` runs \
         before every run; bundle fsyncs what it writes (create, extract), the peers do not unless said\n",
        opts.runs
    );
    let speed_rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| vec![r.what, r.ours, r.peer, r.ratio, r.target, r.result])
        .collect();
    report.push_str(&table(
        &["measurement", "bundle", "peer", "ratio", "target", "result"],
        &speed_rows,
    ));
    report.push('\n');
    report.push_str(&table(
        &["command", "peak RSS", "peer peak RSS", "target", "result"],
        &rss_rows,
    ));
    println!("{report}");
    let report_path = out.join("report.md");
    std::fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!(
        "report saved in {}; logs in {}",
        util::show(&Command::new(&report_path)),
        util::show(&Command::new(&bench.logs))
    );

    // The extracted copies are large and of no further use.
    remove(&x_ours)?;
    remove(&x_peer)?;

    let errors: Vec<String> = [
        ("create", &create),
        ("create-peer", &create_peer),
        ("create-peer-fsync", &create_peer_fsync),
        ("create-plain", &plain),
        ("create-plain-peer", &plain_peer),
        ("verify", &verify),
        ("verify-deep", &deep),
        ("extract", &extract),
        ("extract-peer", &extract_peer),
    ]
    .into_iter()
    .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e:#}")))
    .collect();
    if !errors.is_empty() {
        bail!(
            "{} command(s) failed (a failure, not a missed target):\n{}",
            errors.len(),
            errors.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(parse(&args(&["--runs", "0"])).is_err());
        assert!(parse(&args(&["--what"])).is_err());
    }
}
