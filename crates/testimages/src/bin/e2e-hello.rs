//! `e2e-hello`: the program inside the images of `cargo xtask e2e` (see
//! `bundle-testimages e2e`), the end-to-end test of `bundle deploy` against a real cluster.
//!
//! It prints one line, `bundle-e2e-hello` followed by its arguments joined by spaces, and
//! exits 0, so a Pod's log tells which image and which arguments ran. With `--sleep SECONDS`
//! as its first arguments it prints the line and then sleeps that long, so a Pod can stay
//! Running. It uses nothing but std, and xtask builds it static (`+crt-static`) so that the
//! images run on any linux/amd64 node.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// The line printed for `args`: the program's name and its arguments, space separated.
fn line(args: &[String]) -> String {
    std::iter::once("bundle-e2e-hello")
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How long to sleep after printing: `Ok(None)` unless the first argument is `--sleep`.
fn sleep_for(args: &[String]) -> Result<Option<Duration>, String> {
    if args.first().map(String::as_str) != Some("--sleep") {
        return Ok(None);
    }
    let v = args.get(1).ok_or("--sleep needs a number of seconds")?;
    v.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .map(Some)
        .ok_or_else(|| format!("--sleep: {v:?} is not a number of seconds"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let sleep = match sleep_for(&args) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("e2e-hello: {msg}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", line(&args))
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(out);
    if let Some(d) = sleep {
        std::thread::sleep(d);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn line_joins_arguments() {
        assert_eq!(line(&[]), "bundle-e2e-hello");
        assert_eq!(line(&args(&["v1"])), "bundle-e2e-hello v1");
        assert_eq!(
            line(&args(&["--sleep", "5", "x"])),
            "bundle-e2e-hello --sleep 5 x"
        );
    }

    #[test]
    fn sleep_only_as_first_argument() {
        assert_eq!(sleep_for(&args(&["v1"])), Ok(None));
        assert_eq!(sleep_for(&args(&["v1", "--sleep", "3"])), Ok(None));
        assert_eq!(
            sleep_for(&args(&["--sleep", "3"])),
            Ok(Some(Duration::from_secs(3)))
        );
        assert_eq!(
            sleep_for(&args(&["--sleep", "0.5"])),
            Ok(Some(Duration::from_millis(500)))
        );
        assert!(sleep_for(&args(&["--sleep"])).is_err());
        assert!(sleep_for(&args(&["--sleep", "soon"])).is_err());
        assert!(sleep_for(&args(&["--sleep", "-1"])).is_err());
    }
}
