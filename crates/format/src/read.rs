//! The reader: opens an archive (or a set of parts) by reading only the trailer and index at
//! the end of each file, maps the files (memmap2), and verifies, streams and extracts.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::index::{INDEX_FRAME_MAGIC, TRAILER_LEN, Trailer};
use crate::{Digest, END_LEN, Error, Hasher, Index, Result, tar};

/// Bytes of one part: a read-only file mapping, or bytes in memory (fuzzing, tests).
enum Data {
    /// A part file's mapping, and the file (for positional reads around the mapping, and for
    /// [`StoredFrame`]s handed out).
    Map(Mmap, Arc<File>),
    Bytes(Vec<u8>),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Map(m, _) => m,
            Data::Bytes(b) => b,
        }
    }

    /// Tells the kernel we are done with a range, so that sequential passes over a large
    /// archive do not keep it all resident.
    fn release(&self, start: usize, len: usize) {
        if let Data::Map(m, _) = self {
            #[allow(unsafe_code)]
            // SAFETY: the mapping is a read-only MAP_SHARED file mapping; MADV_DONTNEED only
            // drops our page-table entries and later reads fault the file's pages back in,
            // so no slice handed out can change. Errors only mean the advice was not taken.
            unsafe {
                let _ = m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
            }
        }
    }
}

struct PartSlot {
    path: PathBuf,
    data: Data,
}

/// An open archive.
pub struct Archive {
    index: Index,
    id: Digest,
    index_len: u64,
    parts: Vec<Option<PartSlot>>,
    /// One bit per frame: its sha256 was checked in this process (see [`Archive::frame`]).
    checked: Checked,
}

/// A stored frame's content as it lies in its part file ([`Archive::stored_frame`]): what a
/// sender can hand the kernel to copy straight from the file (sendfile).
#[derive(Debug, Clone)]
pub struct StoredFrame {
    /// The part file.
    pub file: Arc<File>,
    /// Its path, for messages.
    pub path: PathBuf,
    /// `(offset in the file, length)` of each block's content, in order.
    pub segments: Vec<(u64, u64)>,
}

impl StoredFrame {
    /// Content bytes of the frame.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Whether the frame holds no content (never, for a stored frame of an archive).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file ranges that hold content bytes `range` of the frame.
    pub fn slice(&self, range: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0u64;
        for &(off, n) in &self.segments {
            let (from, to) = (range.start.max(at), range.end.min(at + n));
            if from < to {
                out.push((off + (from - at), to - from));
            }
            at += n;
        }
        out
    }
}

/// Where a frame that may be stored lies ([`Archive::stored_candidate`]): its part file and
/// path, offset and length in it, and content size.
struct Candidate<'a> {
    path: &'a Path,
    file: &'a Arc<File>,
    off: usize,
    len: usize,
    dsize: usize,
}

/// Frames already checked against the index, so that a server reading the same frame again
/// does not hash it again. Set only after a successful check; never cleared.
#[derive(Default)]
struct Checked(Vec<AtomicU64>);

impl Checked {
    fn new(frames: usize) -> Checked {
        Checked(
            (0..frames.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }
    fn get(&self, f: u32) -> bool {
        self.0
            .get(f as usize / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (f % 64)) != 0)
    }
    fn set(&self, f: u32) {
        if let Some(w) = self.0.get(f as usize / 64) {
            w.fetch_or(1 << (f % 64), Ordering::Relaxed);
        }
    }
}

/// What a verification covered.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Frames whose sha256 was checked.
    pub frames: u64,
    /// Compressed bytes hashed.
    pub compressed_bytes: u64,
    /// Decompressed bytes checked (deep only).
    pub content_bytes: u64,
    /// Blobs whose digest was checked (deep only).
    pub blobs: u64,
    /// Parts covered.
    pub parts: Vec<u32>,
}

fn read_trailer(path: &Path, bytes: &[u8]) -> Result<(Trailer, std::ops::Range<usize>)> {
    let not = |reason: String| Error::NotABundle {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < 8 + TRAILER_LEN {
        return Err(not(format!(
            "{} bytes is shorter than a trailer (truncated?)",
            bytes.len()
        )));
    }
    let t = Trailer::decode(&bytes[bytes.len() - TRAILER_LEN..]).map_err(not)?;
    let total = t.index_len.checked_add(8 + TRAILER_LEN as u64);
    let Some(start) = total.and_then(|n| (bytes.len() as u64).checked_sub(n)) else {
        return Err(not(format!(
            "trailer says the index is {} bytes, the file is {}",
            t.index_len,
            bytes.len()
        )));
    };
    let start = start as usize;
    let magic = u32::from_le_bytes([
        bytes[start],
        bytes[start + 1],
        bytes[start + 2],
        bytes[start + 3],
    ]);
    let size = u32::from_le_bytes([
        bytes[start + 4],
        bytes[start + 5],
        bytes[start + 6],
        bytes[start + 7],
    ]);
    if magic != INDEX_FRAME_MAGIC || u64::from(size) != t.index_len + TRAILER_LEN as u64 {
        return Err(not(
            "the index frame header does not match the trailer".into()
        ));
    }
    let range = start + 8..start + 8 + t.index_len as usize;
    let found = Digest::of(&bytes[range.clone()]);
    if found != t.id {
        return Err(Error::IndexDigest {
            path: path.to_owned(),
            expected: t.id,
            found,
        });
    }
    Ok((t, range))
}

fn map(path: &Path) -> Result<Data> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotABundle {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() == 0 {
        return Ok(Data::Bytes(Vec::new()));
    }
    #[allow(unsafe_code)]
    // SAFETY: the map is read-only; the archive files are ours to read and are not expected to
    // change while open. A concurrent writer can only make us read wrong bytes, which the
    // frame and blob digests then reject, or, by truncating the file in place, fault the
    // process (SIGBUS); replacing an archive by rename is safe (ARCHITECTURE.md, invariants).
    let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    Ok(Data::Map(m, Arc::new(f)))
}

fn check_part_count(index: &Index, t: &Trailer) -> Result<()> {
    if index.parts.len() != t.count as usize {
        return Err(Error::index(
            "parts",
            format!(
                "lists {} parts, the trailer says {}",
                index.parts.len(),
                t.count
            ),
        ));
    }
    Ok(())
}

/// Splits `NAME.NNN` into `NAME` when the suffix is all digits.
fn part_base(path: &Path) -> Option<PathBuf> {
    let s = path.to_str()?;
    let (base, suffix) = s.rsplit_once('.')?;
    (suffix.len() >= 3 && suffix.bytes().all(|b| b.is_ascii_digit())).then(|| PathBuf::from(base))
}

impl Archive {
    /// Opens an archive from one file, from any one part of a split archive (its siblings
    /// `NAME.NNN` are found beside it), from `NAME` when only `NAME.000...` exist, or from an
    /// explicit list of every part in order. Reads only the end of each file.
    pub fn open(path: impl AsRef<Path>) -> Result<Archive> {
        Archive::open_parts(&[path.as_ref().to_owned()])
    }

    /// Like [`Archive::open`], from every part of a split archive named in order (or one file).
    pub fn open_parts(paths: &[PathBuf]) -> Result<Archive> {
        let Some(first) = paths.first() else {
            return Err(Error::Input("no archive given".into()));
        };
        let mut given: Vec<PathBuf> = paths.to_vec();
        if paths.len() == 1 && !first.exists() {
            let p0 = crate::write::part_paths(first, 1).remove(0);
            if p0.exists() {
                given = vec![p0];
            }
        }
        let data = map(&given[0])?;
        let (mut archive, t) = Archive::from_end(&given[0], data.bytes())?;
        let expected_paths: Vec<PathBuf> = if given.len() > 1 {
            given.clone()
        } else if t.count == 1 {
            vec![given[0].clone()]
        } else {
            let base = part_base(&given[0]).ok_or_else(|| Error::NotABundle {
                path: given[0].clone(),
                reason: format!(
                    "is part {} of {} but its name does not end in .NNN, so its siblings cannot be found; name every part",
                    t.part, t.count
                ),
            })?;
            crate::write::part_paths(&base, t.count as usize)
        };
        if expected_paths.len() != t.count as usize {
            if expected_paths.len() > t.count as usize {
                return Err(Error::Input(format!(
                    "{} files given, the archive has {} parts",
                    expected_paths.len(),
                    t.count
                )));
            }
            return Err(Error::PartMissing {
                part: expected_paths.len() as u32,
                count: t.count,
                expected: PathBuf::from("(not given)"),
            });
        }
        let mut first_data = Some((given[0].clone(), data, t));
        for (i, p) in expected_paths.iter().enumerate() {
            let (path, data, tr) =
                match first_data.take_if(|(fp, _, tr)| fp == p && tr.part as usize == i) {
                    Some(x) => x,
                    None => {
                        if !p.exists() {
                            return Err(Error::PartMissing {
                                part: i as u32,
                                count: t.count,
                                expected: p.clone(),
                            });
                        }
                        let d = map(p)?;
                        let (tr, _) = read_trailer(p, d.bytes())?;
                        (p.clone(), d, tr)
                    }
                };
            archive.attach(i, path, data, tr)?;
        }
        Ok(archive)
    }

    /// Opens one part on its own, to verify it against the index it carries. Frames in other
    /// parts are reported missing when asked for.
    pub fn open_part(path: &Path) -> Result<Archive> {
        let data = map(path)?;
        let (mut archive, t) = Archive::from_end(path, data.bytes())?;
        archive.attach(t.part as usize, path.to_owned(), data, t)?;
        Ok(archive)
    }

    /// Opens an archive held in memory, one buffer per part (for fuzzing and tests).
    pub fn from_bytes(parts: Vec<Vec<u8>>) -> Result<Archive> {
        let mut parts = parts.into_iter().enumerate();
        let Some((_, first)) = parts.next() else {
            return Err(Error::Input("no archive given".into()));
        };
        let path = PathBuf::from("<memory>.000");
        let (mut archive, t) = Archive::from_end(&path, &first)?;
        archive.attach(0, path, Data::Bytes(first), t)?;
        for (i, bytes) in parts {
            let path = PathBuf::from(format!("<memory>.{i:03}"));
            let (tr, _) = read_trailer(&path, &bytes)?;
            if i >= archive.parts.len() {
                return Err(Error::Input(format!("part {i} is beyond the part count")));
            }
            archive.attach(i, path, Data::Bytes(bytes), tr)?;
        }
        Ok(archive)
    }

    /// Opens the frames of a sub-archive (see [`Index::subset`]) stored one per file, as the
    /// agent's `inject` mode finds them mounted from ConfigMaps: `index` is the CBOR index,
    /// whose sha256 must be `expected`, and frame `i` is the file `dir/<hex sha256 of the
    /// frame>`. Every frame is checked against the index whenever it is read.
    pub fn from_frame_files(index: &Path, expected: Digest, dir: &Path) -> Result<Archive> {
        let bytes = fs::read(index).map_err(|e| Error::io(index, e))?;
        let found = Digest::of(&bytes);
        if found != expected {
            return Err(Error::NotABundle {
                path: index.to_owned(),
                reason: format!("index is {found}, expected {expected}"),
            });
        }
        let idx = Index::from_cbor(&bytes, index)?;
        if idx.parts.len() != idx.frames.len() {
            return Err(Error::index(
                "parts",
                format!(
                    "a frame-file index has one part per frame; {} parts, {} frames",
                    idx.parts.len(),
                    idx.frames.len()
                ),
            ));
        }
        let mut parts = Vec::with_capacity(idx.frames.len());
        for (i, f) in idx.frames.iter().enumerate() {
            let path = dir.join(Digest::from_bytes(*f.sha256()).hex());
            let data = map(&path)?;
            if data.bytes().len() as u64 != u64::from(f.csize()) {
                return Err(Error::PartSize {
                    path,
                    part: i as u32,
                    expected: u64::from(f.csize()),
                    found: data.bytes().len() as u64,
                });
            }
            parts.push(Some(PartSlot { path, data }));
        }
        Ok(Archive {
            checked: Checked::new(idx.frames.len()),
            index: idx,
            id: expected,
            index_len: bytes.len() as u64,
            parts,
        })
    }

    /// An archive with no part attached yet, from the trailer and index at the end of the
    /// part `bytes` (read from `path`).
    fn from_end(path: &Path, bytes: &[u8]) -> Result<(Archive, Trailer)> {
        let (t, range) = read_trailer(path, bytes)?;
        let index = Index::from_cbor(&bytes[range], path)?;
        check_part_count(&index, &t)?;
        let archive = Archive {
            checked: Checked::new(index.frames.len()),
            index,
            id: t.id,
            index_len: t.index_len,
            parts: (0..t.count).map(|_| None).collect(),
        };
        Ok((archive, t))
    }

    fn attach(&mut self, slot: usize, path: PathBuf, data: Data, t: Trailer) -> Result<()> {
        if t.id != self.id {
            return Err(Error::PartForeign {
                path,
                expected: self.id,
                found: t.id,
            });
        }
        if t.part as usize != slot {
            return Err(Error::PartOutOfOrder {
                path,
                expected: slot as u32,
                found: t.part,
            });
        }
        let part = &self.index.parts[slot];
        let expected = part.size + 8 + self.index_len + TRAILER_LEN as u64;
        let found = data.bytes().len() as u64;
        if found != expected {
            return Err(Error::PartSize {
                path,
                part: t.part,
                expected,
                found,
            });
        }
        self.parts[slot] = Some(PartSlot { path, data });
        Ok(())
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The archive id: sha256 of the CBOR index.
    pub fn id(&self) -> Digest {
        self.id
    }

    /// The part files, where present.
    pub fn part_paths(&self) -> Vec<Option<&Path>> {
        self.parts
            .iter()
            .map(|p| p.as_ref().map(|p| p.path.as_path()))
            .collect()
    }

    /// Total bytes of all parts.
    pub fn size(&self) -> u64 {
        self.index
            .parts
            .iter()
            .map(|p| p.size + 8 + self.index_len + TRAILER_LEN as u64)
            .sum()
    }

    fn member_name(&self, frame: u32) -> String {
        self.index.member_name(self.index.member_of(frame))
    }

    fn locate(&self, frame: u32) -> Result<(&PartSlot, usize, usize)> {
        let f = self
            .index
            .frames
            .get(frame as usize)
            .ok_or_else(|| Error::index(format!("frames[{frame}]"), "does not exist"))?;
        let p = self.index.part_of(frame);
        let Some(slot) = self.parts[p].as_ref() else {
            let count = self.parts.len() as u32;
            return Err(Error::PartMissing {
                part: p as u32,
                count,
                expected: PathBuf::from(format!("part {p}")),
            });
        };
        Ok((slot, f.offset() as usize, f.csize() as usize))
    }

    /// The compressed bytes of a frame, checked against the index's sha256. A frame already
    /// checked by this `Archive` is not hashed again (a server reads popular frames many
    /// times); [`Archive::verify`] always hashes.
    pub fn frame(&self, frame: u32) -> Result<&[u8]> {
        self.frame_checked(frame, false)
    }

    /// A frame's compressed bytes, unchecked, and the part file they are in.
    fn raw_frame(&self, frame: u32) -> Result<(&Path, &[u8])> {
        let (slot, off, len) = self.locate(frame)?;
        Ok((&slot.path, &slot.data.bytes()[off..off + len]))
    }

    fn frame_checked(&self, frame: u32, force: bool) -> Result<&[u8]> {
        let (path, bytes) = self.raw_frame(frame)?;
        if force || !self.checked.get(frame) {
            self.check_sha256(frame, path, bytes)?;
        }
        Ok(bytes)
    }

    /// Checks a frame's compressed bytes against the index's sha256 and remembers that it
    /// passed.
    fn check_sha256(&self, frame: u32, path: &Path, bytes: &[u8]) -> Result<()> {
        self.expect_sha256(frame, path, Digest::of(bytes))
    }

    /// Compares a frame's computed digest with the index's and remembers that it passed.
    fn expect_sha256(&self, frame: u32, path: &Path, found: Digest) -> Result<()> {
        let expected = self.index.frames[frame as usize].sha256();
        if found.as_bytes() != expected {
            return Err(Error::FrameDigest {
                frame,
                member: self.member_name(frame),
                path: path.to_owned(),
                expected: *expected,
                found: *found.as_bytes(),
            });
        }
        self.checked.set(frame);
        Ok(())
    }

    /// Decompresses a checked frame into `out` (cleared first); checks its size.
    pub fn decompress_frame(&self, frame: u32, out: &mut Vec<u8>) -> Result<()> {
        let c = self.frame(frame)?;
        self.decompress_bytes(frame, c, out)
    }

    /// Hashes a frame's compressed bytes and checks them against the index, even when this
    /// `Archive` checked the frame before; the error names the frame, its member and file.
    pub fn check_frame(&self, frame: u32) -> Result<()> {
        self.frame_checked(frame, true).map(|_| ())
    }

    /// Decompresses a frame into `out` (cleared first) for a reader that passes over the
    /// archive once or serves it for long (push, a server): checks the compressed bytes
    /// against the index's sha256 when `hash` is set (once per `Archive`, as
    /// [`Archive::frame`]), then drops the frame's pages from this process, so that no file
    /// pages stay mapped. Without `hash`, a reader whose receiver checks the content's digest
    /// calls [`Archive::check_frame`] when the receiver refused it. Decompression always checks
    /// the frame's own XXH64 content checksum, which every v1 frame carries.
    pub fn read_frame(&self, frame: u32, hash: bool, out: &mut Vec<u8>) -> Result<()> {
        let (path, c) = self.raw_frame(frame)?;
        let read = if hash && !self.checked.get(frame) {
            self.check_sha256(frame, path, c)
        } else {
            Ok(())
        };
        let read = read.and_then(|()| self.decompress_bytes(frame, c, out));
        self.release_frame(frame);
        read
    }

    fn decompress_bytes(&self, frame: u32, c: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let dsize = self.index.frames[frame as usize].dsize() as usize;
        out.clear();
        out.reserve(dsize);
        let fail = |reason: String| Error::FrameDecode {
            frame,
            member: self.member_name(frame),
            reason,
        };
        thread_local! {
            static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let n = DCTX
            .with_borrow_mut(|d| {
                let d = match d {
                    Some(d) => d,
                    None => d.insert(zstd::bulk::Decompressor::new()?),
                };
                d.decompress_to_buffer(c, out)
            })
            .map_err(|e| fail(format!("zstd: {e}")))?;
        if n != dsize {
            return Err(fail(format!(
                "decompressed to {n} bytes, the index says {dsize}"
            )));
        }
        Ok(())
    }

    /// A frame whose index sizes are those of a stored frame (spec section 4), in a part
    /// file. `None` for any other (a compressed frame, an archive held in memory); its bytes
    /// are not looked at.
    fn stored_candidate(&self, frame: u32) -> Result<Option<Candidate<'_>>> {
        let (slot, off, len) = self.locate(frame)?;
        let dsize = self.index.frames[frame as usize].dsize() as usize;
        let Data::Map(_, file) = &slot.data else {
            return Ok(None);
        };
        if len != crate::stored::stored_len(dsize) || dsize == 0 {
            return Ok(None);
        }
        Ok(Some(Candidate {
            path: &slot.path,
            file,
            off,
            len,
            dsize,
        }))
    }

    /// Where a stored frame's content lies in its part file (spec section 4): the file and,
    /// for each block, the offset and length of its content, after checking that the frame
    /// header and every block header are exactly the layout of a stored frame of the index's
    /// size and that the file holds the whole frame (a few small positional reads; the
    /// content is not read). `None` for any other frame (a compressed one, a damaged header,
    /// an archive held in memory): the caller then reads it with [`Archive::read_frame`],
    /// which checks everything. Checks neither the frame's sha256 nor its XXH64: for a reader
    /// whose receiver checks the blob's digest (push), as `read_frame` without `hash`.
    pub fn stored_frame(&self, frame: u32) -> Result<Option<StoredFrame>> {
        use crate::stored::{BLOCK, block_header, blocks, header};
        use std::os::unix::fs::FileExt as _;
        let Some(c) = self.stored_candidate(frame)? else {
            return Ok(None);
        };
        let (file, dsize) = (c.file, c.dsize);
        let off = c.off as u64;
        // A read that fails or comes short means the layout is not there; a real I/O error
        // shows again when the frame is read the other way.
        let has = |at: u64, want: &[u8]| {
            let mut got = [0u8; 9];
            let got = &mut got[..want.len()];
            file.read_exact_at(got, at).is_ok() && got == want
        };
        if !has(off, &header(dsize)) {
            return Ok(None);
        }
        let mut segments = Vec::with_capacity(dsize.div_ceil(BLOCK));
        for (k, (n, last)) in blocks(dsize).enumerate() {
            let at = off + 9 + (k * (BLOCK + 3)) as u64;
            if !has(at, &block_header(n, last)) {
                return Ok(None);
            }
            segments.push((at + 3, n as u64));
        }
        // The checksum's 4 bytes end the frame: the file holds all of it.
        let mut sum = [0u8; 4];
        if file
            .read_exact_at(&mut sum, off + c.len as u64 - 4)
            .is_err()
        {
            return Ok(None);
        }
        Ok(Some(StoredFrame {
            file: Arc::clone(file),
            path: c.path.to_owned(),
            segments,
        }))
    }

    /// The content of a stored frame (the layout [`Archive::stored_frame`] checks) read into
    /// `out` (cleared first) with one positional read of the whole frame that leaves the block
    /// headers out of `out`: no mapping, no decompression. The header and every block header
    /// read must be the layout for the index's size, and the read must be whole. Returns
    /// `false`, with `out` empty, for any other frame; checks neither sha256 nor XXH64 (see
    /// `stored_frame`).
    pub fn read_stored(&self, frame: u32, out: &mut Vec<u8>) -> Result<bool> {
        use crate::stored::{block_header, blocks, header};
        out.clear();
        let Some(c) = self.stored_candidate(frame)? else {
            return Ok(false);
        };
        let dsize = c.dsize;
        let layout: Vec<(usize, bool)> = blocks(dsize).collect();
        // The frame header, each block's header, then the checksum: what is not content.
        let mut head = [0u8; 9];
        let mut block_heads = vec![[0u8; 3]; layout.len()];
        let mut sum = [0u8; 4];
        out.reserve(dsize);
        let spare = out.spare_capacity_mut();
        let io = |ptr: *mut u8, len: usize| libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        let mut iov = Vec::with_capacity(2 * layout.len() + 2);
        iov.push(io(head.as_mut_ptr(), head.len()));
        let mut at = 0;
        for (bh, &(n, _)) in block_heads.iter_mut().zip(&layout) {
            iov.push(io(bh.as_mut_ptr(), 3));
            iov.push(io(spare[at..at + n].as_mut_ptr().cast(), n));
            at += n;
        }
        iov.push(io(sum.as_mut_ptr(), sum.len()));
        #[allow(unsafe_code)]
        // SAFETY: every iovec points into a live buffer of at least its length (`head`,
        // `block_heads`, `sum`, and `out`'s spare capacity of at least `dsize` bytes), none
        // overlapping, all outliving the call.
        let n = unsafe {
            libc::preadv(
                std::os::unix::io::AsRawFd::as_raw_fd(&**c.file),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                c.off as libc::off_t,
            )
        };
        if n < 0 {
            return Err(Error::io(c.path, std::io::Error::last_os_error()));
        }
        let layout_ok = n as usize == c.len
            && head == header(dsize)
            && block_heads
                .iter()
                .zip(&layout)
                .all(|(h, &(n, last))| *h == block_header(n, last));
        if !layout_ok {
            return Ok(false);
        }
        #[allow(unsafe_code)]
        // SAFETY: the read filled all `len` bytes, so every content iovec, which together
        // cover `out`'s first `dsize` spare bytes, was filled.
        unsafe {
            out.set_len(dsize)
        };
        Ok(true)
    }

    /// Drops a frame's pages from this process, together with the 64 KiB around it that the
    /// kernel's fault-around maps with it (neighbouring frames fault back in when read).
    pub fn release_frame(&self, frame: u32) {
        const AROUND: usize = 64 << 10;
        if let Ok((slot, off, len)) = self.locate(frame) {
            let start = off.saturating_sub(AROUND) & !(AROUND - 1);
            let end = (off + len + AROUND).min(slot.data.bytes().len());
            slot.data.release(start, end - start);
        }
    }

    /// A reader over a blob's content; it checks the tar header, and at the end the digest.
    pub fn blob(&self, digest: &Digest) -> Result<BlobReader<'_>> {
        let b = self
            .index
            .blob(digest)
            .ok_or(Error::NoSuchBlob { digest: *digest })?;
        Ok(BlobReader::new(
            self,
            tar::blob_path(digest),
            b.first_frame,
            b.frames,
            b.size,
            *digest,
        ))
    }

    /// A reader over a blob's content from byte `offset` on, starting at the frame that
    /// holds it (resumed uploads). Every frame is still checked against the index; the
    /// content digest is checked only when `offset` is 0.
    pub fn blob_from(&self, digest: &Digest, offset: u64) -> Result<BlobReader<'_>> {
        let mut r = self.blob(digest)?;
        if offset == 0 {
            return Ok(r);
        }
        if offset > r.size {
            return Err(Error::Input(format!(
                "blob {digest}: offset {offset} is past its {} bytes",
                r.size
            )));
        }
        let at = tar::BLOCK as u64 + offset;
        r.next_frame = r.first_frame + (at / u64::from(crate::CHUNK)) as u32;
        r.skip = (at % u64::from(crate::CHUNK)) as usize;
        r.done = offset;
        r.check_digest = false;
        Ok(r)
    }

    /// The frames that hold bytes `offset..offset + len` of a blob's content, each with the
    /// range of its decompressed bytes that is content: what a server reads for a (ranged)
    /// blob request, one [`Archive::read_frame`] at a time. Reading checks each
    /// frame against the index (once per `Archive`, see [`Archive::frame`]) and its size; the
    /// tar header, padding and content digest are not checked on this path (the client
    /// checks the digest).
    pub fn blob_frames(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u32, std::ops::Range<usize>)>> {
        let b = self
            .index
            .blob(digest)
            .ok_or(Error::NoSuchBlob { digest: *digest })?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= b.size)
            .ok_or_else(|| {
                Error::Input(format!(
                    "blob {digest}: bytes {offset}+{len} are past its {} bytes",
                    b.size
                ))
            })?;
        let chunk = u64::from(crate::CHUNK);
        // Positions in the member's stream: header, then content.
        let (mut at, stop) = (tar::BLOCK as u64 + offset, tar::BLOCK as u64 + end);
        let mut out = Vec::new();
        while at < stop {
            let k = at / chunk;
            let frame = b.first_frame + k as u32;
            let dsize = self
                .index
                .frames
                .get(frame as usize)
                .map_or(0, |f| u64::from(f.dsize()));
            let from = at - k * chunk;
            let to = (stop - k * chunk).min(dsize);
            if from >= to || k >= u64::from(b.frames) {
                return Err(Error::FrameDecode {
                    frame,
                    member: tar::blob_path(digest),
                    reason: "frames end before the content does".into(),
                });
            }
            out.push((frame, from as usize..to as usize));
            at += to - from;
        }
        Ok(out)
    }

    /// Reads one of the non-blob members (`oci-layout`, `index.json`, `bundle.json`) whole.
    pub fn file(&self, path: &str) -> Result<Vec<u8>> {
        let f = self
            .index
            .files
            .iter()
            .find(|f| f.path == path)
            .ok_or_else(|| Error::index("files", format!("has no {path:?}")))?;
        let mut r = BlobReader::new(
            self,
            f.path.clone(),
            f.first_frame,
            f.frames,
            f.size,
            f.digest,
        );
        let mut out = Vec::with_capacity(f.size.min(64 << 20) as usize);
        r.read_to_end(&mut out).map_err(|e| unwrap_io(e, path))?;
        Ok(out)
    }

    /// Reads a whole blob into memory (manifests, configs).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut r = self.blob(digest)?;
        let mut out = Vec::with_capacity(r.size.min(64 << 20) as usize);
        r.read_to_end(&mut out)
            .map_err(|e| unwrap_io(e, &tar::blob_path(digest)))?;
        Ok(out)
    }

    fn present_frames(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (p, part) in self.index.parts.iter().enumerate() {
            if self.parts[p].is_some() {
                out.extend(part.first_frame..part.first_frame + part.frames);
            }
        }
        out
    }

    /// Checks one frame, or two hashed together ([`Digest::of_pair`]), against the index
    /// and drops their pages; returns their compressed bytes. The first frame's failure is
    /// the one reported.
    fn check_frames(&self, frames: &[u32]) -> Result<u64> {
        let [a, b] = *frames else {
            let mut n = 0;
            for &f in frames {
                n += self.frame_checked(f, true)?.len() as u64;
                self.release_frame(f);
            }
            return Ok(n);
        };
        let ((pa, ba), (pb, bb)) = (self.raw_frame(a)?, self.raw_frame(b)?);
        let (da, db) = Digest::of_pair(ba, bb);
        let checked = self
            .expect_sha256(a, pa, da)
            .and_then(|()| self.expect_sha256(b, pb, db));
        self.release_frame(a);
        self.release_frame(b);
        checked.map(|()| (ba.len() + bb.len()) as u64)
    }

    /// Verifies every frame present against the index's sha256. With `deep`, also
    /// decompresses every member whose frames are all present, checks its tar header,
    /// padding and size, and hashes its content against its digest.
    pub fn verify(&self, deep: bool) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            parts: (0..self.parts.len() as u32)
                .filter(|&p| self.parts[p as usize].is_some())
                .collect(),
            ..VerifyReport::default()
        };
        if !deep {
            let frames = self.present_frames();
            for window in frames.chunks(64) {
                let results: Vec<Result<u64>> =
                    window.par_chunks(2).map(|f| self.check_frames(f)).collect();
                for (r, f) in results.into_iter().zip(window.chunks(2)) {
                    report.compressed_bytes += r?;
                    report.frames += f.len() as u64;
                }
            }
            return Ok(report);
        }
        let mut members: Vec<(String, u32, u32, u64, Digest, bool)> = Vec::new();
        for f in &self.index.files {
            members.push((
                f.path.clone(),
                f.first_frame,
                f.frames,
                f.size,
                f.digest,
                false,
            ));
        }
        for b in &self.index.blobs {
            members.push((
                tar::blob_path(&b.digest),
                b.first_frame,
                b.frames,
                b.size,
                b.digest,
                true,
            ));
        }
        let present = |first: u32, n: u32| {
            (first..first + n).all(|f| self.parts[self.index.part_of(f)].is_some())
        };
        let results: Vec<Result<(u64, u64, u64, bool)>> = members
            .par_iter()
            .filter(|m| present(m.1, m.2))
            .map(|(path, first, n, size, digest, is_blob)| {
                let mut r = BlobReader::new(self, path.clone(), *first, *n, *size, *digest);
                r.release = true;
                io::copy(&mut r, &mut io::sink()).map_err(|e| unwrap_io(e, path))?;
                let csize: u64 = (*first..first + n)
                    .map(|f| u64::from(self.index.frames[f as usize].csize()))
                    .sum();
                Ok((u64::from(*n), csize, *size, *is_blob))
            })
            .collect();
        for r in results {
            let (n, c, s, is_blob) = r?;
            report.frames += n;
            report.compressed_bytes += c;
            report.content_bytes += s;
            report.blobs += u64::from(is_blob);
        }
        let end = self.index.frames.len() as u32 - 1;
        if self.parts[self.index.part_of(end)].is_some() {
            let mut buf = Vec::new();
            self.decompress_frame(end, &mut buf)?;
            if buf.len() != END_LEN || buf.iter().any(|&b| b != 0) {
                return Err(Error::FrameDecode {
                    frame: end,
                    member: "end-of-archive".into(),
                    reason: "is not two zero blocks".into(),
                });
            }
            report.frames += 1;
            report.compressed_bytes += u64::from(self.index.frames[end as usize].csize());
        }
        Ok(report)
    }

    /// Extracts the OCI layout (and `bundle.json`) into `dir`, which must not exist or be
    /// empty. Every frame and digest is checked on the way; the result appears at `dir` only
    /// when complete.
    pub fn extract(&self, dir: &Path) -> Result<()> {
        if let Some(missing) = self.parts.iter().position(Option::is_none) {
            return Err(Error::PartMissing {
                part: missing as u32,
                count: self.parts.len() as u32,
                expected: PathBuf::from(format!("part {missing}")),
            });
        }
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::Target {
                        path: dir.to_owned(),
                        reason: "exists and is not empty".into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(dir, e)),
        }
        let mut tmp = dir.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = fs::remove_dir_all(&tmp);
        let guard = DirGuard(Some(tmp.clone()));
        let blobs_dir = tmp.join("blobs").join("sha256");
        fs::create_dir_all(&blobs_dir).map_err(|e| Error::io(&blobs_dir, e))?;
        let write_member =
            |path: &str, first: u32, n: u32, size: u64, digest: Digest| -> Result<()> {
                let target = tmp.join(path);
                let mut r = BlobReader::new(self, path.to_owned(), first, n, size, digest);
                r.release = true;
                let f = File::create(&target).map_err(|e| Error::io(&target, e))?;
                let mut w = io::BufWriter::with_capacity(1 << 20, f);
                io::copy(&mut r, &mut w).map_err(|e| match e.get_ref() {
                    Some(inner) if inner.is::<Error>() => unwrap_io(e, path),
                    _ => Error::io(&target, e),
                })?;
                let f = w
                    .into_inner()
                    .map_err(|e| Error::io(&target, e.into_error()))?;
                f.sync_all().map_err(|e| Error::io(&target, e))
            };
        let files = &self.index.files;
        let blobs = &self.index.blobs;
        let results: Vec<Result<()>> = (0..files.len() + blobs.len())
            .into_par_iter()
            .map(|i| match files.get(i) {
                Some(f) => write_member(&f.path, f.first_frame, f.frames, f.size, f.digest),
                None => {
                    let b = &blobs[i - files.len()];
                    write_member(
                        &tar::blob_path(&b.digest),
                        b.first_frame,
                        b.frames,
                        b.size,
                        b.digest,
                    )
                }
            })
            .collect();
        for r in results {
            r?;
        }
        for d in [blobs_dir.as_path(), &tmp.join("blobs"), &tmp] {
            File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(d, e))?;
        }
        fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::mem::forget(guard);
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|f| f.sync_all());
        }
        Ok(())
    }
}

struct DirGuard(Option<PathBuf>);
impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Turns an io::Error that wraps our own error back into it.
fn unwrap_io(e: io::Error, what: &str) -> Error {
    if e.get_ref().is_some_and(|i| i.is::<Error>()) {
        if let Some(Ok(err)) = e.into_inner().map(|i| i.downcast::<Error>()) {
            return *err;
        }
        return Error::Input(format!("{what}: read failed"));
    }
    Error::io(what, e)
}

/// Streams one member's content out of its frames: checks every frame's sha256, the tar
/// header, the size and the zero padding, and at the end the content digest. A mismatch is
/// an `io::Error` of kind `InvalidData` that wraps the format [`Error`].
pub struct BlobReader<'a> {
    archive: &'a Archive,
    path: String,
    first_frame: u32,
    next_frame: u32,
    end_frame: u32,
    size: u64,
    digest: Digest,
    hasher: Hasher,
    /// Content bytes handed out so far.
    done: u64,
    buf: Vec<u8>,
    pos: usize,
    release: bool,
    /// Bytes to skip in the next frame filled (resumed reads).
    skip: usize,
    /// False for resumed reads, which never see the whole content.
    check_digest: bool,
}

impl<'a> BlobReader<'a> {
    fn new(
        archive: &'a Archive,
        path: String,
        first: u32,
        n: u32,
        size: u64,
        digest: Digest,
    ) -> Self {
        BlobReader {
            archive,
            path,
            first_frame: first,
            next_frame: first,
            end_frame: first + n,
            size,
            digest,
            hasher: Hasher::new(),
            done: 0,
            buf: Vec::new(),
            pos: 0,
            release: false,
            skip: 0,
            check_digest: true,
        }
    }

    /// For one pass over a large archive: drop each frame's pages once read, so the
    /// mapping does not stay resident.
    pub fn release_pages(mut self) -> Self {
        self.release = true;
        self
    }

    /// Skips the content digest check, for readers that stop before the end (an upload in
    /// chunks, whose receiver checks the digest). Frames are still checked against the index.
    pub fn without_digest_check(mut self) -> Self {
        self.check_digest = false;
        self
    }

    /// Content length.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn fill(&mut self) -> Result<()> {
        let first = self.next_frame == self.first_frame;
        let frame = self.next_frame;
        self.archive.decompress_frame(frame, &mut self.buf)?;
        if self.release {
            self.archive.release_frame(frame);
        }
        self.next_frame += 1;
        self.pos = 0;
        if first {
            tar::check_header(
                &self.buf[..tar::BLOCK.min(self.buf.len())],
                &self.path,
                self.size,
            )
            .map_err(|reason| Error::TarHeader {
                frame,
                member: self.path.clone(),
                reason,
            })?;
            self.pos = tar::BLOCK;
        }
        if self.skip > 0 {
            self.pos = self.skip.min(self.buf.len());
            self.skip = 0;
        }
        Ok(())
    }

    fn read_inner(&mut self, out: &mut [u8]) -> Result<usize> {
        loop {
            if self.done == self.size {
                // Drain the rest: padding must be zero and the frames must end here.
                while self.next_frame < self.end_frame || self.pos < self.buf.len() {
                    if self.pos >= self.buf.len() {
                        self.fill()?;
                        continue;
                    }
                    if self.buf[self.pos..].iter().any(|&b| b != 0) {
                        return Err(Error::FrameDecode {
                            frame: self.next_frame - 1,
                            member: self.path.clone(),
                            reason: "tar padding is not zero".into(),
                        });
                    }
                    self.pos = self.buf.len();
                }
                let found = std::mem::take(&mut self.hasher).finish();
                if self.check_digest && found != self.digest {
                    return Err(Error::BlobDigest {
                        expected: self.digest,
                        found,
                        place: format!("archive member {}", self.path),
                    });
                }
                self.done = self.size + 1;
                return Ok(0);
            }
            if self.done > self.size {
                return Ok(0);
            }
            if self.pos >= self.buf.len() {
                if self.next_frame >= self.end_frame {
                    return Err(Error::FrameDecode {
                        frame: self.end_frame - 1,
                        member: self.path.clone(),
                        reason: "frames end before the content does".into(),
                    });
                }
                self.fill()?;
                continue;
            }
            let avail = &self.buf[self.pos..];
            let n = avail
                .len()
                .min(out.len())
                .min((self.size - self.done) as usize);
            out[..n].copy_from_slice(&avail[..n]);
            if self.check_digest {
                self.hasher.update(&avail[..n]);
            }
            self.pos += n;
            self.done += n as u64;
            return Ok(n);
        }
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.read_inner(out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Writes `bytes` to `path` through a temp file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let res = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
