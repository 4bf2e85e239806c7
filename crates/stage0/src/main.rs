//! `stage0`: the loader that fits in one ConfigMap. It joins the agent's parts, checks their
//! sha256 and execs the result, with no heap, no C library and no dependency.
//!
//! ```text
//! stage0 [--fallback-dir DIR] SHA256HEX PART... -- ARG...
//! ```
//!
//! - `SHA256HEX`: 64 lowercase hex digits, optionally after `sha256:`, the sha256 of the
//!   PART files joined in order. At least one PART; every PART must be non-empty.
//! - The parts are copied, and hashed on the way, into `memfd_create("bundle-agent",
//!   MFD_CLOEXEC | MFD_EXEC)` (plain `MFD_CLOEXEC` on kernels before 6.3). Only when the
//!   digest matches does stage0 run it: `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`, argv
//!   being `bundle-agent` followed by the ARGs after `--`, envp stage0's own environment.
//! - Fallback, when `memfd_create` or that `execveat` fails (for any reason: `vm.memfd_noexec`,
//!   seccomp, an old kernel), or when `BUNDLE_STAGE0_NO_MEMFD=1` is in the environment: the
//!   verified bytes go to a new file `DIR/bundle-agent.PID.RANDOM` (DIR defaults to `/tmp`;
//!   `O_CREAT|O_EXCL`, mode 0700), hashed again as they are written, checked, fsynced, closed
//!   and `execve`d. The file stays behind once the agent runs (stage0 is gone by then); on any
//!   failure before that stage0 removes it.
//! - Failure: exactly one line on stderr, starting `stage0: ` and naming what failed (on the
//!   fallback path, also why the fallback was taken); exit code 2 for usage, 3 for input and
//!   output (including an empty part), 4 for a digest mismatch, 5 when exec fails. A panic (a
//!   bug) exits 101.
//!
//! The entry point is `_start` below: the kernel's stack pointer goes to [`entry`], which
//! reads argc, argv and envp from it. Link arguments are in `build.rs`.
#![no_std]
#![no_main]

mod mem;
mod sys;

use core::arch::global_asm;
use core::convert::Infallible;
use core::ffi::CStr;

use bundle_stage0::args::{self, Invocation, SYNOPSIS, UsageError};
use bundle_stage0::sha256::Sha256;
use bundle_stage0::text::{Buf, hex};

use sys::Fd;

/// The copy buffer, on the stack.
const COPY_BUF: usize = 64 * 1024;
/// Room for the fallback file's path (`PATH_MAX`, NUL included).
const PATH_MAX: usize = 4096;
/// Room for the one error line: a path and some words.
const LINE_MAX: usize = PATH_MAX + 256;
/// How many names the fallback tries when one exists already.
const CREATE_ATTEMPTS: u32 = 16;

/// What the agent sees as its `argv[0]`, and the memfd's name.
const AGENT_NAME: &CStr = c"bundle-agent";
const NO_MEMFD: &[u8] = b"BUNDLE_STAGE0_NO_MEMFD=1";
const DEFAULT_FALLBACK_DIR: &CStr = c"/tmp";

global_asm!(
    ".globl _start",
    ".type _start, @function",
    "_start:",
    // Outermost frame: no return address, no frame pointer.
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym entry,
);

/// Runs stage0 on the kernel's initial stack `sp`: argc, the argv pointers, NULL, the envp
/// pointers, NULL, then the auxiliary vector.
///
/// # Safety
/// `sp` must be the stack pointer the kernel handed to `_start`.
unsafe extern "C" fn entry(sp: *mut usize) -> ! {
    // SAFETY: the kernel's stack layout, as above; its strings live as long as the process.
    let (argv, env) = unsafe {
        let argc = sp.read();
        let argv = sp.add(1).cast::<*const u8>();
        (Argv { ptr: argv, argc }, Env(argv.add(argc + 1)))
    };
    let mut buf = [0u8; COPY_BUF];
    let mut path = Buf::new();
    let mut memfd_failed = None;
    let failure = match run(argv, env, &mut buf, &mut path, &mut memfd_failed) {
        Ok(never) => match never {},
        Err(failure) => failure,
    };
    let mut line = Buf::<LINE_MAX>::new();
    line.str("stage0: ");
    failure.describe(&mut line);
    if let Some((what, errno)) = memfd_failed {
        // The failure happened on the fallback path; say why that was taken.
        line.str("; fallback after ")
            .str(what)
            .str(" failed: ")
            .errno(errno);
    }
    let _ = sys::write_all(sys::STDERR, line.line());
    sys::exit(failure.code())
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    let _ = sys::write_all(sys::STDERR, b"stage0: internal error (panic)\n");
    sys::exit(101)
}

/// Never called (panics abort), but the prebuilt `core` refers to it, and without LTO (the
/// dev profile) the link needs it.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// The argument vector on the initial stack.
#[derive(Clone, Copy)]
struct Argv {
    ptr: *mut *const u8,
    argc: usize,
}

impl Argv {
    /// `argv[i]`, or the empty string past the end.
    fn get(self, i: usize) -> &'static CStr {
        if i >= self.argc {
            return c"";
        }
        // SAFETY: `i < argc`, and the kernel's argument strings are NUL-terminated and live as
        // long as the process. The array is read through the raw pointer, never borrowed, so
        // `agent_argv` may change it.
        unsafe { CStr::from_ptr(self.ptr.add(i).read().cast()) }
    }

    /// The agent's argv: the tail of ours from `--` on, with `--` replaced by its name. No
    /// copy: the kernel's array is ours to change and already ends in NULL.
    fn agent_argv(self, separator: usize) -> *const *const u8 {
        assert!(separator < self.argc);
        // SAFETY: `separator < argc`, so the slot is in the array; nothing borrows it.
        unsafe {
            let slot = self.ptr.add(separator);
            slot.write(AGENT_NAME.as_ptr().cast());
            slot
        }
    }
}

/// The environment on the initial stack, a NULL-terminated array.
#[derive(Clone, Copy)]
struct Env(*const *const u8);

impl Env {
    /// Whether `entry` (`NAME=VALUE`) is one of its strings.
    fn contains(self, entry: &[u8]) -> bool {
        let mut p = self.0;
        loop {
            // SAFETY: `p` stays within the array, which ends in NULL; its strings are
            // NUL-terminated.
            let s = unsafe { p.read() };
            if s.is_null() {
                return false;
            }
            // SAFETY: as above.
            if unsafe { CStr::from_ptr(s.cast()) }.to_bytes() == entry {
                return true;
            }
            // SAFETY: `s` was not the NULL terminator, so the next slot exists.
            p = unsafe { p.add(1) };
        }
    }
}

/// Why stage0 stops; each prints as one line.
enum Failure<'a> {
    Usage(UsageError),
    /// Opening or reading a part.
    Part {
        path: &'a CStr,
        op: &'static str,
        errno: i32,
    },
    EmptyPart(&'a CStr),
    /// `op` on `name` (the memfd or the fallback file) failed.
    Io {
        op: &'static str,
        name: &'a CStr,
        errno: i32,
    },
    FallbackPathTooLong(&'a CStr),
    Mismatch {
        expected: [u8; 32],
        found: [u8; 32],
    },
    /// `execve` of the fallback file failed.
    Exec {
        path: &'a CStr,
        errno: i32,
    },
}

impl Failure<'_> {
    fn code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            Self::Part { .. }
            | Self::EmptyPart(_)
            | Self::Io { .. }
            | Self::FallbackPathTooLong(_) => 3,
            Self::Mismatch { .. } => 4,
            Self::Exec { .. } => 5,
        }
    }

    fn describe<const N: usize>(&self, line: &mut Buf<N>) {
        match *self {
            Self::Usage(e) => {
                line.str("usage: ")
                    .str(SYNOPSIS)
                    .str(" (")
                    .str(e.reason())
                    .str(")");
            }
            Self::Part { path, op, errno } => {
                line.str("part ")
                    .bytes(path.to_bytes())
                    .str(": ")
                    .str(op)
                    .str(" failed: ")
                    .errno(errno);
            }
            Self::EmptyPart(path) => {
                line.str("part ").bytes(path.to_bytes()).str(" is empty");
            }
            Self::Io { op, name, errno } => {
                line.str(op)
                    .str(" ")
                    .bytes(name.to_bytes())
                    .str(" failed: ")
                    .errno(errno);
            }
            Self::FallbackPathTooLong(dir) => {
                line.str("fallback dir ")
                    .bytes(dir.to_bytes())
                    .str(": path too long");
            }
            Self::Mismatch { expected, found } => {
                line.str("sha256 mismatch: expected ")
                    .bytes(&hex(&expected))
                    .str(", got ")
                    .bytes(&hex(&found));
            }
            Self::Exec { path, errno } => {
                line.str("exec ")
                    .bytes(path.to_bytes())
                    .str(" failed: ")
                    .errno(errno);
            }
        }
    }
}

/// Parses the command line, then runs the agent from a memfd or, failing that, from a file.
/// Returns only on failure; `memfd_failed` then says why the fallback was taken, if it was
/// taken for a reason other than `BUNDLE_STAGE0_NO_MEMFD`.
fn run<'a>(
    argv: Argv,
    env: Env,
    buf: &mut [u8],
    path: &'a mut Buf<PATH_MAX>,
    memfd_failed: &mut Option<(&'static str, i32)>,
) -> Result<Infallible, Failure<'a>> {
    let inv = args::parse(argv.argc, |i| argv.get(i).to_bytes()).map_err(Failure::Usage)?;
    let agent_argv = argv.agent_argv(inv.separator);
    if !env.contains(NO_MEMFD) {
        match memfd() {
            Ok(fd) => {
                let found = copy_parts(argv, &inv, fd, c"memfd", buf)?;
                check(inv.digest, found)?;
                // SAFETY: `agent_argv` is the tail of the kernel's argv, NULL-terminated;
                // `env` is the kernel's envp.
                let errno =
                    unsafe { sys::execveat(fd, c"", agent_argv, env.0, sys::AT_EMPTY_PATH) };
                *memfd_failed = Some(("exec from memfd", errno));
                sys::rewind(fd).map_err(|errno| Failure::Io {
                    op: "seek",
                    name: c"memfd",
                    errno,
                })?;
                return fallback(argv, &inv, env, agent_argv, Some(fd), buf, path);
            }
            Err(errno) => *memfd_failed = Some(("memfd_create", errno)),
        }
    }
    fallback(argv, &inv, env, agent_argv, None, buf, path)
}

fn memfd() -> Result<Fd, i32> {
    // MFD_EXEC says what we want where `vm.memfd_noexec` would seal the memfd non-executable
    // (and keeps newer kernels from warning); older kernels refuse the flag.
    match sys::memfd_create(AGENT_NAME, sys::MFD_CLOEXEC | sys::MFD_EXEC) {
        Err(sys::EINVAL) => sys::memfd_create(AGENT_NAME, sys::MFD_CLOEXEC),
        r => r,
    }
}

/// Writes the agent to a new file and execs it. The bytes come from the verified memfd when
/// there is one, or else from the parts; either way they are hashed as they are written and
/// checked before the exec. The file is removed on any failure.
fn fallback<'a>(
    argv: Argv,
    inv: &Invocation,
    env: Env,
    agent_argv: *const *const u8,
    memfd: Option<Fd>,
    buf: &mut [u8],
    path: &'a mut Buf<PATH_MAX>,
) -> Result<Infallible, Failure<'a>> {
    let dir = inv
        .fallback_dir
        .map_or(DEFAULT_FALLBACK_DIR, |i| argv.get(i));
    let (fd, path) = create_fallback(dir, path)?;
    let result = (|| {
        let found = match memfd {
            Some(src) => copy(src, fd, buf, c"memfd", path)?,
            None => copy_parts(argv, inv, fd, path, buf)?,
        };
        check(inv.digest, found)?;
        let io = |op| {
            move |errno| Failure::Io {
                op,
                name: path,
                errno,
            }
        };
        sys::fsync(fd).map_err(io("fsync"))?;
        sys::close(fd).map_err(io("close"))?;
        // SAFETY: as for the `execveat` in `run`.
        let errno = unsafe { sys::execve(path, agent_argv, env.0) };
        Err(Failure::Exec { path, errno })
    })();
    let _ = sys::unlink(path);
    result
}

/// Creates `DIR/bundle-agent.PID.RANDOM` (0700, exclusively), trying other random suffixes
/// while the name exists, and returns it open for writing.
fn create_fallback<'a>(
    dir: &'static CStr,
    path: &'a mut Buf<PATH_MAX>,
) -> Result<(Fd, &'a CStr), Failure<'a>> {
    let dir_bytes = dir.to_bytes();
    let dir_bytes = match dir_bytes.strip_suffix(b"/") {
        Some(d) if !d.is_empty() => d,
        _ => dir_bytes,
    };
    let pid = sys::getpid();
    let mut attempt: u32 = 0;
    let outcome = loop {
        let mut random = [0u8; 4];
        if sys::getrandom(&mut random).is_err() {
            random = attempt.to_le_bytes();
        }
        path.clear();
        path.bytes(dir_bytes)
            .str("/bundle-agent.")
            .num(pid.into())
            .str(".")
            .hex(&random)
            .bytes(b"\0");
        let name = match CStr::from_bytes_with_nul(path.as_bytes()) {
            Ok(name) if !path.overflowed() => name,
            _ => return Err(Failure::FallbackPathTooLong(dir)),
        };
        match sys::create_new(name, 0o700) {
            Err(sys::EEXIST) if attempt + 1 < CREATE_ATTEMPTS => attempt += 1,
            r => break r,
        }
    };
    let path: &'a Buf<PATH_MAX> = path;
    let name = CStr::from_bytes_with_nul(path.as_bytes()).unwrap_or(c"");
    match outcome {
        Ok(fd) => Ok((fd, name)),
        Err(errno) => Err(Failure::Io {
            op: "create",
            name,
            errno,
        }),
    }
}

/// Copies the parts in order to `dst` (called `dst_name` in messages) and returns the sha256
/// of what was copied.
fn copy_parts<'a>(
    argv: Argv,
    inv: &Invocation,
    dst: Fd,
    dst_name: &'a CStr,
    buf: &mut [u8],
) -> Result<[u8; 32], Failure<'a>> {
    let mut sha = Sha256::new();
    for i in inv.parts.clone() {
        let part = argv.get(i);
        let src = sys::open_read(part).map_err(|errno| Failure::Part {
            path: part,
            op: "open",
            errno,
        })?;
        let copied = copy_into(src, dst, buf, &mut sha);
        let _ = sys::close(src);
        match copied {
            Ok(0) => return Err(Failure::EmptyPart(part)),
            Ok(_) => {}
            Err(Side::Read(errno)) => {
                return Err(Failure::Part {
                    path: part,
                    op: "read",
                    errno,
                });
            }
            Err(Side::Write(errno)) => {
                return Err(Failure::Io {
                    op: "write",
                    name: dst_name,
                    errno,
                });
            }
        }
    }
    Ok(sha.finish())
}

/// Copies all of `src` to `dst`; returns the sha256 of the bytes.
fn copy<'a>(
    src: Fd,
    dst: Fd,
    buf: &mut [u8],
    src_name: &'a CStr,
    dst_name: &'a CStr,
) -> Result<[u8; 32], Failure<'a>> {
    let mut sha = Sha256::new();
    match copy_into(src, dst, buf, &mut sha) {
        Ok(_) => Ok(sha.finish()),
        Err(Side::Read(errno)) => Err(Failure::Io {
            op: "read",
            name: src_name,
            errno,
        }),
        Err(Side::Write(errno)) => Err(Failure::Io {
            op: "write",
            name: dst_name,
            errno,
        }),
    }
}

/// Which end of a copy failed.
enum Side {
    Read(i32),
    Write(i32),
}

/// Reads `src` to its end through `buf`, hashing each chunk, then writing it to `dst`;
/// returns the byte count.
fn copy_into(src: Fd, dst: Fd, buf: &mut [u8], sha: &mut Sha256) -> Result<u64, Side> {
    let mut total = 0u64;
    loop {
        let n = sys::read(src, buf).map_err(Side::Read)?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            return Ok(total);
        };
        sha.update(chunk);
        sys::write_all(dst, chunk).map_err(Side::Write)?;
        total += n as u64;
    }
}

fn check<'a>(expected: [u8; 32], found: [u8; 32]) -> Result<(), Failure<'a>> {
    if expected == found {
        Ok(())
    } else {
        Err(Failure::Mismatch { expected, found })
    }
}
