//! Appending to a new part file around the page cache (`O_DIRECT`) where the filesystem
//! allows it, through the page cache where it does not.
//!
//! Why: buffered writes copy every archive byte into freshly allocated page-cache pages, and
//! create then fsyncs them anyway. On a 1 GB create that copy was about a sixth of the
//! process's CPU (perf: `copy_folio_from_iter_atomic`); a direct write hands the device the
//! staged bytes instead. Frames have any length, so they are staged in an aligned buffer and
//! written in whole aligned blocks; the unaligned tail goes through the page cache at the end.
//! Any refusal of direct IO (`EINVAL` or `EOPNOTSUPP`: a filesystem without it, or one with
//! a larger alignment) switches the file to buffered writes for good; nothing is lost or repeated
//! because every write is positional.
//!
//! A direct write returns only when the device has the bytes (about 3 ms per stage on the
//! bench machine, longer on a USB drive), so full stages are written by a thread of the sink's
//! own while the next one fills: two stages, one filling and one on its way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Alignment of direct writes: memory address, file offset and length. 4 KiB satisfies the
/// logical block size of every common device (512 or 4096).
const ALIGN: usize = 4096;

/// Bytes staged before one direct write.
pub(crate) const STAGE: usize = 4 << 20;

/// A part file being written from its start.
pub(crate) struct Sink {
    path: PathBuf,
    /// Opened with `O_DIRECT` while `direct` holds, without it after.
    file: File,
    direct: bool,
    /// `STAGE + ALIGN` bytes; the staged bytes start at the aligned offset `start`.
    stage: Vec<u8>,
    start: usize,
    size: usize,
    len: usize,
    /// Bytes already written to the file, or handed to `io` to write.
    written: u64,
    /// The thread writing full stages, once there is one.
    io: Option<Background>,
}

/// A stage handed to the background writer: the buffer, the staged range in it, and where in
/// the file it goes.
struct Handed {
    buf: Vec<u8>,
    range: std::ops::Range<usize>,
    at: u64,
}

/// The background writer of full direct stages, and the stage it may be writing.
struct Background {
    tx: mpsc::SyncSender<Handed>,
    rx: mpsc::Receiver<(Handed, io::Result<()>)>,
    /// A stage is being written.
    busy: bool,
}

impl Background {
    fn start(file: &File) -> io::Result<Background> {
        let file = file.try_clone()?;
        let (tx, jobs) = mpsc::sync_channel::<Handed>(1);
        let (done, rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("bundle-sink".into())
            .spawn(move || {
                for h in jobs {
                    let res = file.write_all_at(&h.buf[h.range.clone()], h.at);
                    if done.send((h, res)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Background {
            tx,
            rx,
            busy: false,
        })
    }

    /// Waits for the stage being written, if any: the stage back, with the write's outcome
    /// (an error if the thread is gone without answering).
    fn settle(&mut self) -> io::Result<Option<(Handed, io::Result<()>)>> {
        if !self.busy {
            return Ok(None);
        }
        self.busy = false;
        let back = self
            .rx
            .recv()
            .map_err(|_| io::Error::other("the archive's writer thread stopped"))?;
        Ok(Some(back))
    }
}

impl Sink {
    /// Creates (truncates) `path`, asking for direct IO when `direct` is set; `stage` bytes
    /// (a multiple of 4 KiB) are gathered per write.
    pub(crate) fn create(path: &Path, direct: bool, stage: usize) -> io::Result<Sink> {
        let stage = stage.max(ALIGN) / ALIGN * ALIGN;
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match direct {
            // A filesystem may refuse the flag in its own way (EINVAL, EOPNOTSUPP, ...): the
            // file is then opened plainly, and an error that also happens then is the one
            // reported.
            true => match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(_) => (open(0)?, false),
            },
            false => (open(0)?, false),
        };
        let buf = vec![0u8; stage + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Ok(Sink {
            path: path.to_owned(),
            file,
            direct,
            stage: buf,
            start,
            size: stage,
            len: 0,
            written: 0,
            io: None,
        })
    }

    /// Whether writes still bypass the page cache.
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `bytes`.
    pub(crate) fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.size == 0 {
            // Parked: no stage any more, plain positional writes.
            self.file.write_all_at(bytes, self.written)?;
            self.written += bytes.len() as u64;
            return Ok(());
        }
        while !bytes.is_empty() {
            let n = bytes.len().min(self.size - self.len);
            let at = self.start + self.len;
            self.stage[at..at + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len == self.size {
                if self.direct {
                    self.hand_off()?;
                } else {
                    self.flush(self.size)?;
                }
            }
        }
        Ok(())
    }

    /// Hands the full stage to the background writer and goes on with the spare one (waiting
    /// for it if it is still being written).
    fn hand_off(&mut self) -> io::Result<()> {
        let spare = self.settle()?;
        if !self.direct {
            // The write just settled was refused and done again through the page cache:
            // this stage goes the same way.
            return self.flush(self.size);
        }
        let spare = spare.unwrap_or_else(|| vec![0u8; self.size + ALIGN]);
        if self.io.is_none() {
            self.io = Some(Background::start(&self.file)?);
        }
        let full = std::mem::replace(&mut self.stage, spare);
        let handed = Handed {
            buf: full,
            range: self.start..self.start + self.size,
            at: self.written,
        };
        self.start = self.stage.as_ptr().align_offset(ALIGN).min(ALIGN);
        self.len = 0;
        self.written += self.size as u64;
        let Some(bg) = self.io.as_mut() else {
            unreachable!("started above")
        };
        if let Err(mpsc::SendError(h)) = bg.tx.send(handed) {
            // The thread is gone: write here.
            self.file.write_all_at(&h.buf[h.range], h.at)?;
            return Ok(());
        }
        bg.busy = true;
        Ok(())
    }

    /// Waits for the stage being written in the background, if any, and returns its buffer.
    /// A refused direct write is done again through the page cache, and the file is buffered
    /// from then on.
    fn settle(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some((h, res)) = self.io.as_mut().map_or(Ok(None), Background::settle)? else {
            return Ok(None);
        };
        match res {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                self.buffered()?;
                self.file.write_all_at(&h.buf[h.range.clone()], h.at)?;
            }
            Err(e) => return Err(e),
        }
        Ok(Some(h.buf))
    }

    /// Writes everything staged so far (buffered writes only: a direct write waits for a
    /// full stage), so that a background sync of the file covers it.
    pub(crate) fn flush_buffered(&mut self) -> io::Result<()> {
        if self.direct {
            return Ok(());
        }
        self.flush(self.len)
    }

    /// A second handle on the file (for a background `sync_data`).
    pub(crate) fn try_clone(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Writes the first `n` staged bytes (a multiple of `ALIGN` when direct) and keeps the
    /// rest staged.
    fn flush(&mut self, n: usize) -> io::Result<()> {
        let staged = self.start..self.start + n;
        match self
            .file
            .write_all_at(&self.stage[staged.clone()], self.written)
        {
            Ok(()) => {}
            Err(e)
                if self.direct
                    && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                // Short direct writes that went through are kept (positional writes); the
                // whole range is written again through the page cache.
                self.buffered()?;
                self.file.write_all_at(&self.stage[staged], self.written)?;
            }
            Err(e) => return Err(e),
        }
        self.written += n as u64;
        self.stage
            .copy_within(self.start + n..self.start + self.len, self.start);
        self.len -= n;
        Ok(())
    }

    /// Reopens the file without `O_DIRECT`.
    fn buffered(&mut self) -> io::Result<()> {
        self.file = OpenOptions::new().write(true).open(&self.path)?;
        self.direct = false;
        Ok(())
    }

    /// Writes everything staged (whole aligned blocks direct, the rest through the page
    /// cache) and frees the stage: later writes (a part's index frame, once the next part is
    /// open) go straight through the page cache. Keeps memory at one stage however many
    /// parts a split archive has.
    pub(crate) fn park(&mut self) -> io::Result<()> {
        if self.size == 0 {
            return Ok(());
        }
        self.settle()?;
        self.io = None;
        if self.direct {
            let whole = self.len / ALIGN * ALIGN;
            if whole > 0 {
                self.flush(whole)?;
            }
            self.buffered()?;
        }
        if self.len > 0 {
            self.flush(self.len)?;
        }
        self.stage = Vec::new();
        self.size = 0;
        self.start = 0;
        Ok(())
    }

    /// Writes what is staged and syncs the file's data and metadata to disk.
    pub(crate) fn finish(mut self) -> io::Result<File> {
        self.park()?;
        self.file.sync_all()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes the pieces, parking the sink before piece `park` (as a part is parked when
    /// the next one opens).
    fn write(path: &Path, direct: bool, stage: usize, pieces: &[Vec<u8>], park: usize) -> bool {
        let mut sink = Sink::create(path, direct, stage).expect("create");
        for (i, p) in pieces.iter().enumerate() {
            if i == park {
                sink.park().expect("park");
            }
            sink.write_all(p).expect("write");
        }
        let was_direct = sink.is_direct();
        sink.finish().expect("finish");
        was_direct
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Direct and buffered sinks give the file of the concatenated pieces, whatever the
        /// piece and stage sizes, parked or not.
        #[test]
        fn sinks_write_exactly_the_pieces(
            pieces in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..20_000), 0..12),
            stages in 1usize..5,
            park in 0usize..14,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let want: Vec<u8> = pieces.concat();
            for direct in [true, false] {
                let path = dir.path().join(format!("part-{direct}"));
                write(&path, direct, stages * ALIGN, &pieces, park);
                prop_assert_eq!(std::fs::read(&path).expect("read"), want.clone());
            }
        }
    }

    /// A write that fails in the background (here: the file handle is read-only, EBADF) is
    /// the error of a later call, not lost.
    #[test]
    fn a_failed_write_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("part");
        let mut sink = Sink::create(&path, true, ALIGN).expect("create");
        sink.file = File::open(&path).expect("open");
        let e = sink
            .write_all(&[7; 3 * ALIGN])
            .and_then(|()| sink.park())
            .expect_err("a failed write went unreported");
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }

    #[test]
    fn a_refused_direct_write_goes_on_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("part");
        let mut sink = Sink::create(&path, true, 2 * ALIGN).expect("create");
        let started_direct = sink.is_direct();
        // Staged at a misaligned address, as a device with a larger alignment would find
        // every write: the first direct write is refused with EINVAL.
        sink.start += 1;
        sink.write_all(&[1; 5000]).expect("write");
        sink.write_all(&[2; 9000]).expect("write");
        // (The refusal is seen when the stage handed to the background writer settles.)
        sink.park().expect("park");
        if started_direct {
            assert!(!sink.is_direct(), "still direct after a refused write");
        }
        sink.finish().expect("finish");
        let got = std::fs::read(&path).expect("read");
        assert_eq!(got.len(), 14_000);
        assert!(got[..5000].iter().all(|&b| b == 1));
        assert!(got[5000..].iter().all(|&b| b == 2));
    }
}
