//! Raw Linux x86_64 system calls, each returning its result or the errno. Only what stage0
//! needs; no C library is linked.

use core::arch::asm;
use core::ffi::CStr;

/// A file descriptor.
pub type Fd = i32;

/// Standard error.
pub const STDERR: Fd = 2;
/// Interrupted by a signal: try again.
pub const EINTR: i32 = 4;
/// The file exists (`O_EXCL`).
pub const EEXIST: i32 = 17;
/// Invalid argument (an unknown memfd flag on an older kernel).
pub const EINVAL: i32 = 22;
/// Resolve the empty path to the descriptor itself (`execveat`).
pub const AT_EMPTY_PATH: usize = 0x1000;
/// Close the memfd on exec.
pub const MFD_CLOEXEC: usize = 0x1;
/// Ask for an executable memfd (Linux 6.3 and later; `vm.memfd_noexec`).
pub const MFD_EXEC: usize = 0x10;

const AT_FDCWD: isize = -100;
const O_WRONLY: usize = 0o1;
const O_CREAT: usize = 0o100;
const O_EXCL: usize = 0o200;
const O_CLOEXEC: usize = 0o2000000;
const GRND_NONBLOCK: usize = 1;

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_CLOSE: usize = 3;
const SYS_LSEEK: usize = 8;
const SYS_GETPID: usize = 39;
const SYS_EXECVE: usize = 59;
const SYS_FSYNC: usize = 74;
const SYS_EXIT_GROUP: usize = 231;
const SYS_OPENAT: usize = 257;
const SYS_UNLINKAT: usize = 263;
const SYS_GETRANDOM: usize = 318;
const SYS_MEMFD_CREATE: usize = 319;
const SYS_EXECVEAT: usize = 322;

/// # Safety
/// The arguments must be what system call `nr` expects: pointers valid for what the kernel
/// reads or writes through them.
#[inline(always)]
unsafe fn syscall(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the arguments; `syscall` clobbers only rcx and r11 and
    // uses no stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            in("r8") e,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Splits a raw return value into a result or an errno (the kernel returns -4095..-1).
fn check(ret: isize) -> Result<usize, i32> {
    if (-4095..0).contains(&ret) {
        Err(-ret as i32)
    } else {
        Ok(ret as usize)
    }
}

/// Reads into `buf`; 0 at end of file.
pub fn read(fd: Fd, buf: &mut [u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let r = unsafe {
            syscall(
                SYS_READ,
                fd as usize,
                buf.as_mut_ptr() as usize,
                buf.len(),
                0,
                0,
            )
        };
        match check(r) {
            Err(EINTR) => {}
            r => return r,
        }
    }
}

/// Writes all of `buf`.
pub fn write_all(fd: Fd, mut buf: &[u8]) -> Result<(), i32> {
    while !buf.is_empty() {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
        let r = unsafe {
            syscall(
                SYS_WRITE,
                fd as usize,
                buf.as_ptr() as usize,
                buf.len(),
                0,
                0,
            )
        };
        match check(r) {
            Ok(0) => return Err(5), // EIO: a regular file that takes nothing is broken
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens `path` for reading, following symlinks.
pub fn open_read(path: &CStr) -> Result<Fd, i32> {
    // SAFETY: `path` is NUL-terminated.
    let r = unsafe {
        syscall(
            SYS_OPENAT,
            AT_FDCWD as usize,
            path.as_ptr() as usize,
            O_CLOEXEC,
            0,
            0,
        )
    };
    check(r).map(|fd| fd as Fd)
}

/// Creates `path`, which must not exist, for writing with permissions `mode`.
pub fn create_new(path: &CStr, mode: usize) -> Result<Fd, i32> {
    let flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
    // SAFETY: `path` is NUL-terminated.
    let r = unsafe {
        syscall(
            SYS_OPENAT,
            AT_FDCWD as usize,
            path.as_ptr() as usize,
            flags,
            mode,
            0,
        )
    };
    check(r).map(|fd| fd as Fd)
}

/// Closes `fd`.
pub fn close(fd: Fd) -> Result<(), i32> {
    // SAFETY: no pointer involved.
    check(unsafe { syscall(SYS_CLOSE, fd as usize, 0, 0, 0, 0) }).map(drop)
}

/// Flushes `fd` to its device.
pub fn fsync(fd: Fd) -> Result<(), i32> {
    // SAFETY: no pointer involved.
    check(unsafe { syscall(SYS_FSYNC, fd as usize, 0, 0, 0, 0) }).map(drop)
}

/// Moves `fd`'s offset back to the start.
pub fn rewind(fd: Fd) -> Result<(), i32> {
    // SAFETY: no pointer involved; SEEK_SET is 0.
    check(unsafe { syscall(SYS_LSEEK, fd as usize, 0, 0, 0, 0) }).map(drop)
}

/// Removes `path`.
pub fn unlink(path: &CStr) -> Result<(), i32> {
    // SAFETY: `path` is NUL-terminated.
    let r = unsafe {
        syscall(
            SYS_UNLINKAT,
            AT_FDCWD as usize,
            path.as_ptr() as usize,
            0,
            0,
            0,
        )
    };
    check(r).map(drop)
}

/// This process's id.
pub fn getpid() -> u32 {
    // SAFETY: no argument; getpid cannot fail.
    unsafe { syscall(SYS_GETPID, 0, 0, 0, 0, 0) as u32 }
}

/// Fills `buf` with random bytes if the kernel has them at hand.
pub fn getrandom(buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let r = unsafe {
        syscall(
            SYS_GETRANDOM,
            buf.as_mut_ptr() as usize,
            buf.len(),
            GRND_NONBLOCK,
            0,
            0,
        )
    };
    check(r)
}

/// Creates an anonymous memory file.
pub fn memfd_create(name: &CStr, flags: usize) -> Result<Fd, i32> {
    // SAFETY: `name` is NUL-terminated.
    let r = unsafe { syscall(SYS_MEMFD_CREATE, name.as_ptr() as usize, flags, 0, 0, 0) };
    check(r).map(|fd| fd as Fd)
}

/// Runs the program `path` names relative to `fd`; returns only on failure, with the errno.
///
/// # Safety
/// `argv` and `envp` must be NULL-terminated arrays of NUL-terminated strings.
pub unsafe fn execveat(
    fd: Fd,
    path: &CStr,
    argv: *const *const u8,
    envp: *const *const u8,
    flags: usize,
) -> i32 {
    // SAFETY: the caller vouches for `argv` and `envp`; `path` is NUL-terminated.
    let r = unsafe {
        syscall(
            SYS_EXECVEAT,
            fd as usize,
            path.as_ptr() as usize,
            argv as usize,
            envp as usize,
            flags,
        )
    };
    check(r).err().unwrap_or(0)
}

/// Runs the program at `path`; returns only on failure, with the errno.
///
/// # Safety
/// As for [`execveat`].
pub unsafe fn execve(path: &CStr, argv: *const *const u8, envp: *const *const u8) -> i32 {
    // SAFETY: as for `execveat`.
    let r = unsafe {
        syscall(
            SYS_EXECVE,
            path.as_ptr() as usize,
            argv as usize,
            envp as usize,
            0,
            0,
        )
    };
    check(r).err().unwrap_or(0)
}

/// Ends the process.
pub fn exit(code: i32) -> ! {
    // SAFETY: exit_group takes no pointer and does not return.
    unsafe {
        asm!(
            "syscall",
            in("rax") SYS_EXIT_GROUP,
            in("rdi") code as isize,
            options(noreturn, nostack),
        );
    }
}
