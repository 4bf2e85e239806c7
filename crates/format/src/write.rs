//! The writer: plans members and frames, compresses frames in parallel (rayon), and writes
//! parts through temp files that are fsynced and renamed only when complete.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use serde::Serialize;
use serde_bytes::ByteArray;

use crate::index::{self, BlobEntry, FileEntry, Frame, Image, Index, Part, Trailer};
use crate::sha_pair::{Sha, update_pair};
use crate::sink::{self, Sink};
use crate::stored;
use crate::{CHUNK, Digest, END_LEN, Error, MAX_FRAME_COMPRESSED, Result, tar};

/// Where a blob's bytes come from.
#[derive(Debug, Clone)]
pub enum Content {
    /// Bytes in memory (manifests and configs made on the fly).
    Bytes(Arc<[u8]>),
    /// A byte range of a file: a blob in an OCI layout, or a member of a tar archive.
    File {
        /// The file.
        path: PathBuf,
        /// Where the blob starts in it.
        offset: u64,
    },
}

/// A blob to store. Its content is hashed while it is written; a mismatch aborts the write.
#[derive(Debug, Clone)]
pub struct BlobInput {
    /// The digest the blob is named by.
    pub digest: Digest,
    /// Its length.
    pub size: u64,
    /// Media type, when a manifest names it.
    pub media_type: Option<String>,
    /// Where to read it.
    pub content: Content,
}

/// An error an [`Arrivals`] source reports.
pub type ArrivalError = Box<dyn std::error::Error + Send + Sync>;

/// Where the writer reads a blob that [`Arrivals::wait`] waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Where its [`BlobInput`] says.
    AsNamed,
    /// From this file, whole, which holds bytes nobody has checked yet: the writer hashes them
    /// as it stores them and tells [`Arrivals::checked`] what it found.
    Staged(PathBuf),
}

/// Blobs that arrive while the archive is being written: a pull downloads while the blobs
/// before are already being compressed ([`write_arriving`]).
pub trait Arrivals: Sync {
    /// Blocks until `blob`'s content can be read, and says from where. Called once per
    /// distinct blob, in the order the blobs are written (by digest).
    fn wait(&self, blob: &BlobInput) -> std::result::Result<Arrival, ArrivalError>;

    /// The sha256 the writer found for the content of a blob that arrived
    /// [`Arrival::Staged`]: the source keeps those bytes if `found` is the blob's digest (a
    /// pull moves them into its cache) and drops them otherwise, saying what was wrong.
    fn checked(&self, blob: &BlobInput, found: &Digest) -> std::result::Result<(), ArrivalError>;
}

/// An image to list in the index and in `index.json`.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// The reference it carries.
    pub name: String,
    /// Digest of its manifest or index (must be among the blobs).
    pub digest: Digest,
    /// Media type of that manifest or index.
    pub media_type: String,
    /// Size of that manifest or index.
    pub size: u64,
    /// Platforms, `os/arch[/variant]`.
    pub platforms: Vec<String>,
}

/// Everything an archive is made of.
#[derive(Debug, Clone, Default)]
pub struct BundleInput {
    /// Bundle name.
    pub name: String,
    /// Bundle version.
    pub version: String,
    /// RFC 3339 creation time, only from `SOURCE_DATE_EPOCH`.
    pub created: Option<String>,
    /// Images in order.
    pub images: Vec<ImageInput>,
    /// Blobs in any order, repeats allowed (stored once).
    pub blobs: Vec<BlobInput>,
}

/// How to write.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// zstd level, 1..=19.
    pub level: i32,
    /// Cut into parts of at most this many bytes.
    pub split_size: Option<u64>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            level: 3,
            split_size: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// Archive id.
    pub id: Digest,
    /// The files written, in part order.
    pub paths: Vec<PathBuf>,
    /// Total bytes on disk.
    pub size: u64,
    /// The index.
    pub index: Index,
}

enum Member {
    File {
        path: &'static str,
        bytes: Arc<[u8]>,
    },
    Blob(BlobInput),
}

impl Member {
    fn size(&self) -> u64 {
        match self {
            Member::File { bytes, .. } => bytes.len() as u64,
            Member::Blob(b) => b.size,
        }
    }
    fn tar_path(&self) -> String {
        match self {
            Member::File { path, .. } => (*path).to_owned(),
            Member::Blob(b) => tar::blob_path(&b.digest),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor<'a> {
    media_type: &'a str,
    digest: Digest,
    size: u64,
    annotations: BTreeMap<&'static str, &'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OciIndex<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleJsonImage<'a> {
    name: &'a str,
    digest: Digest,
    media_type: &'a str,
    size: u64,
    platforms: &'a [String],
}

#[derive(Serialize)]
struct BundleJson<'a> {
    format: u32,
    name: &'a str,
    version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<&'a str>,
    images: Vec<BundleJsonImage<'a>>,
}

/// The annotation `skopeo copy oci:DIR:NAME` and `umoci` look images up by.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd's importer uses for the full image name.
pub const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

fn layout_files(input: &BundleInput) -> Result<[Arc<[u8]>; 3]> {
    let layout: Arc<[u8]> = Arc::from(&br#"{"imageLayoutVersion":"1.0.0"}"#[..]);
    let idx = OciIndex {
        schema_version: 2,
        media_type: "application/vnd.oci.image.index.v1+json",
        manifests: input
            .images
            .iter()
            .map(|i| Descriptor {
                media_type: &i.media_type,
                digest: i.digest,
                size: i.size,
                annotations: BTreeMap::from([
                    (CONTAINERD_NAME_ANNOTATION, i.name.as_str()),
                    (REF_NAME_ANNOTATION, i.name.as_str()),
                ]),
            })
            .collect(),
    };
    let meta = BundleJson {
        format: index::FORMAT_VERSION,
        name: &input.name,
        version: &input.version,
        created: input.created.as_deref(),
        images: input
            .images
            .iter()
            .map(|i| BundleJsonImage {
                name: &i.name,
                digest: i.digest,
                media_type: &i.media_type,
                size: i.size,
                platforms: &i.platforms,
            })
            .collect(),
    };
    fn json(v: &impl Serialize) -> Result<Arc<[u8]>> {
        let mut out = serde_json::to_vec(v).map_err(|e| Error::Input(e.to_string()))?;
        out.push(b'\n');
        Ok(Arc::from(out))
    }
    Ok([layout, json(&idx)?, json(&meta)?])
}

fn plan(input: &BundleInput) -> Result<Vec<Member>> {
    if input.name.is_empty() {
        return Err(Error::Input("bundle name is empty".into()));
    }
    let mut blobs: BTreeMap<Digest, BlobInput> = BTreeMap::new();
    for b in &input.blobs {
        match blobs.get_mut(&b.digest) {
            Some(have) if have.size != b.size => {
                return Err(Error::BlobSizeConflict {
                    digest: b.digest,
                    first: have.size,
                    second: b.size,
                });
            }
            Some(have) => {
                if have.media_type.is_none() {
                    have.media_type.clone_from(&b.media_type);
                }
            }
            None => {
                blobs.insert(b.digest, b.clone());
            }
        }
    }
    for (i, img) in input.images.iter().enumerate() {
        if img.name.is_empty() {
            return Err(Error::Input(format!("images[{i}]: name is empty")));
        }
        if input.images[..i].iter().any(|o| o.name == img.name) {
            return Err(Error::Input(format!(
                "image name {:?} appears twice",
                img.name
            )));
        }
        match blobs.get(&img.digest) {
            Some(b) if b.size == img.size => {}
            _ => {
                return Err(Error::MissingManifest {
                    image: img.name.clone(),
                    digest: img.digest,
                });
            }
        }
    }
    let files = layout_files(input)?;
    let mut members: Vec<Member> = index::FILE_PATHS
        .iter()
        .zip(files)
        .map(|(path, bytes)| Member::File { path, bytes })
        .collect();
    members.extend(blobs.into_values().map(Member::Blob));
    Ok(members)
}

/// One frame's worth of the tar stream, before compression.
struct Job {
    frame: u32,
    data: FrameData,
    /// Stored, not compressed: a frame of already compressed content after its blob's first
    /// (spec section 4).
    stored: bool,
    /// The blob content in this frame, hashed by the writer thread.
    content: Option<ContentPart>,
}

/// The stretch of a frame that is blob content. The writer thread hashes content in stream
/// order into its blob's digest, interleaved with the frame's own digest ([`update_pair`]):
/// two sha256 streams side by side cost little more than one.
struct ContentPart {
    range: std::ops::Range<usize>,
    /// The blob's content starts here: a fresh hash.
    first: bool,
    /// The blob's content ends here: its digest is checked (member index, and where the
    /// bytes were staged if they came so).
    last: Option<(usize, Option<PathBuf>)>,
}

/// Whether content starting with `start` is already compressed (gzip or zstd), so that its
/// frames after the first are stored, not compressed (spec section 4).
fn precompressed(start: &[u8]) -> bool {
    start.starts_with(&[0x1f, 0x8b]) || start.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
}

/// Where a frame's uncompressed bytes are.
enum FrameData {
    /// `buf[..len]` of a pool buffer: frames with a tar header or padding, and content held in
    /// memory.
    Buffer(Vec<u8>, usize),
    /// A frame of nothing but file content, read straight from the page cache through a
    /// mapping of just that range (no copy; unmapped when the frame is compressed and its
    /// content hashed, or a stored one written, so the pages never pile up in this process).
    Mapped(memmap2::Mmap),
}

impl FrameData {
    fn bytes(&self) -> &[u8] {
        match self {
            FrameData::Buffer(b, len) => &b[..*len],
            FrameData::Mapped(m) => m,
        }
    }
}

/// Buffers handed back for reuse, so that frames are neither allocated nor zeroed again:
/// a buffer is zeroed once, when made, and then only overwritten. At most as many are made
/// as can be in flight at once.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A reused buffer at least `len` bytes long, or a new one of `len` zero bytes.
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.0.lock().ok().and_then(|mut p| p.pop());
        match reused {
            Some(b) if b.len() >= len => b,
            _ => vec![0; len],
        }
    }
    fn give(&self, buf: Vec<u8>) {
        if let Ok(mut p) = self.0.lock() {
            p.push(buf);
        }
    }
}

/// Reads members in order, cuts the tar stream into frames and sends them numbered in stream
/// order, each with the blob content it holds (for the writer thread to hash). Stops quietly
/// when the receivers hang up. Frame buffers come from `pool` (all `CHUNK` bytes long; a job
/// says how many of them are the frame).
fn produce(
    members: &[Member],
    arrivals: Option<&dyn Arrivals>,
    tx: mpsc::SyncSender<Job>,
    pool: &Pool,
) -> Result<()> {
    let mut open: Option<(PathBuf, File)> = None;
    let mut frame: u32 = 0;
    let mut send = |data: FrameData, stored: bool, content: Option<ContentPart>| -> bool {
        let job = Job {
            frame,
            data,
            stored,
            content,
        };
        frame += 1;
        tx.send(job).is_ok()
    };
    let chunk = CHUNK as usize;
    for (index, named) in members.iter().enumerate() {
        let size = named.size();
        let arrival = match (named, arrivals) {
            (Member::Blob(b), Some(a)) => a.wait(b).map_err(|cause| Error::Arrival {
                digest: b.digest,
                cause,
            })?,
            _ => Arrival::AsNamed,
        };
        // A staged blob is read from where it was staged.
        let staged_member;
        let (m, staged) = match (named, arrival) {
            (Member::Blob(b), Arrival::Staged(path)) => {
                staged_member = Member::Blob(BlobInput {
                    content: Content::File {
                        path: path.clone(),
                        offset: 0,
                    },
                    ..b.clone()
                });
                (&staged_member, Some(path))
            }
            _ => (named, None),
        };
        let is_blob = matches!(m, Member::Blob(_));
        // Whether the content has begun and ended.
        let (mut began, mut ended) = (false, false);
        let mut staged = Some(staged);
        let mut part = |cstart: usize, clen: usize, done: u64| -> Option<ContentPart> {
            if !is_blob || ended {
                return None;
            }
            let first = !began;
            began = true;
            let last = (done == size).then(|| {
                ended = true;
                (index, staged.take().flatten())
            });
            Some(ContentPart {
                range: cstart..cstart + clen,
                first,
                last,
            })
        };
        let mut buf = pool.take(chunk);
        let header = tar::header(&m.tar_path(), size);
        buf[..header.len()].copy_from_slice(&header);
        let mut len = header.len();
        // The content's place in the current frame.
        let (mut cstart, mut clen) = (len, 0usize);
        let mut done: u64 = 0;
        let mut pad_left = (tar::padded(size) - size) as usize;
        // The first frame (tar header and the content's start) is compressed; the frames after
        // it are stored when the content is already compressed.
        let mut precompressed_content = false;
        let mut first = true;
        loop {
            // A whole frame of file content is mapped, not copied.
            if len == 0
                && size - done >= chunk as u64
                && let Some(map) = map_content(m, done, chunk, &mut open)
            {
                done += chunk as u64;
                let content = part(0, chunk, done);
                if !send(FrameData::Mapped(map), precompressed_content, content) {
                    return Ok(());
                }
                continue;
            }
            // Fill the frame with content, then padding.
            if done < size && len < chunk {
                let n = ((chunk - len) as u64).min(size - done) as usize;
                let part = &mut buf[len..len + n];
                fill(m, part, done, &mut open)?;
                // The first fill is the content's start, in the first frame.
                if done == 0 && is_blob {
                    precompressed_content = precompressed(part);
                }
                len += n;
                clen += n;
                done += n as u64;
            }
            if done == size && pad_left > 0 && len < chunk {
                let n = pad_left.min(chunk - len);
                buf[len..len + n].fill(0);
                len += n;
                pad_left -= n;
            }
            let last = done == size && pad_left == 0;
            if last {
                let content = part(cstart, clen, done);
                if !send(
                    FrameData::Buffer(buf, len),
                    precompressed_content && !first,
                    content,
                ) {
                    return Ok(());
                }
                break;
            }
            if len == chunk {
                let full = std::mem::replace(&mut buf, pool.take(chunk));
                let content = part(cstart, clen, done);
                if !send(
                    FrameData::Buffer(full, len),
                    precompressed_content && !first,
                    content,
                ) {
                    return Ok(());
                }
                first = false;
                (len, cstart, clen) = (0, 0, 0);
            }
        }
    }
    send(FrameData::Buffer(vec![0u8; END_LEN], END_LEN), false, None);
    Ok(())
}

/// Maps content bytes `done..done + len` of a file-backed blob, or `None` when the member is
/// not read from a file or the file cannot be mapped (the caller then reads it).
fn map_content(
    m: &Member,
    done: u64,
    len: usize,
    open: &mut Option<(PathBuf, File)>,
) -> Option<memmap2::Mmap> {
    let Member::Blob(BlobInput {
        content: Content::File { path, offset },
        ..
    }) = m
    else {
        return None;
    };
    let file = match open {
        Some((p, f)) if p == path => f,
        _ => &open.insert((path.clone(), File::open(path).ok()?)).1,
    };
    // A short file would map fine and fault past its end: it is read instead, and named.
    let start = offset.checked_add(done)?;
    if file.metadata().ok()?.len() < start.checked_add(len as u64)? {
        return None;
    }
    // SAFETY: a read-only mapping of an input file, read while the frame is hashed and
    // compressed and unmapped after. Input files are not ours to lock: one truncated under a
    // running create faults, the hazard of every mmap reader (ARCHITECTURE.md, invariants).
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::MmapOptions::new().offset(start).len(len).map(file) }.ok()?;
    let _ = map.advise(memmap2::Advice::WillNeed);
    Some(map)
}

/// Checks the digest `found` for the content of blob member `m` (staged at `staged`, which
/// its source then keeps or drops).
fn check_blob(
    m: &Member,
    found: Digest,
    staged: Option<&Path>,
    arrivals: Option<&dyn Arrivals>,
) -> Result<()> {
    let Member::Blob(b) = m else {
        return Ok(());
    };
    if let (Some(_), Some(a)) = (staged, arrivals) {
        a.checked(b, &found).map_err(|cause| Error::Arrival {
            digest: b.digest,
            cause,
        })?;
    }
    if found == b.digest {
        return Ok(());
    }
    if let Some(path) = staged {
        return Err(Error::BlobDigest {
            expected: b.digest,
            found,
            place: format!("{} (staged)", path.display()),
        });
    }
    let place = match &b.content {
        Content::Bytes(_) => "generated".to_owned(),
        Content::File { path, offset } => format!("{} at offset {offset}", path.display()),
    };
    Err(Error::BlobDigest {
        expected: b.digest,
        found,
        place,
    })
}

/// Reads content bytes `done..done + out.len()` of a member into `out`.
fn fill(m: &Member, out: &mut [u8], done: u64, open: &mut Option<(PathBuf, File)>) -> Result<()> {
    let at = done as usize;
    match m {
        Member::File { bytes, .. } => out.copy_from_slice(&bytes[at..at + out.len()]),
        Member::Blob(b) => match &b.content {
            Content::Bytes(bytes) => {
                let src = bytes.get(at..at + out.len()).ok_or_else(|| {
                    Error::Input(format!(
                        "blob {}: {} bytes given, {} declared",
                        b.digest,
                        bytes.len(),
                        b.size
                    ))
                })?;
                out.copy_from_slice(src);
            }
            Content::File { path, offset } => {
                let file = match open {
                    Some((p, f)) if p == path => f,
                    _ => {
                        let f = File::open(path).map_err(|e| Error::io(path, e))?;
                        &open.insert((path.clone(), f)).1
                    }
                };
                file.read_exact_at(out, offset + done).map_err(|e| {
                    Error::io(
                        path,
                        std::io::Error::new(
                            e.kind(),
                            format!(
                                "reading blob {} ({} bytes at offset {offset}): {e}",
                                b.digest, b.size
                            ),
                        ),
                    )
                })?;
            }
        },
    }
    Ok(())
}

/// A zstd compression context with the frame parameters of spec section 4. The `zstd`
/// crate cannot set `ZSTD_c_blockSplitterLevel`, so the context is driven through
/// `zstd-sys` directly.
mod cctx {
    #![allow(unsafe_code)]

    use std::ffi::CStr;
    use std::ptr::NonNull;

    use zstd::zstd_safe::zstd_sys as sys;

    /// `ZSTD_c_blockSplitterLevel` (`ZSTD_c_experimentalParam20` in zstd 1.5.7).
    const BLOCK_SPLITTER_LEVEL: sys::ZSTD_cParameter =
        sys::ZSTD_cParameter::ZSTD_c_experimentalParam20;

    pub(super) struct Cctx(NonNull<sys::ZSTD_CCtx>);

    fn check(code: usize) -> Result<usize, String> {
        // SAFETY: ZSTD_isError and ZSTD_getErrorName accept any value and the name is a
        // static NUL-terminated string.
        unsafe {
            if sys::ZSTD_isError(code) == 0 {
                Ok(code)
            } else {
                Err(CStr::from_ptr(sys::ZSTD_getErrorName(code))
                    .to_string_lossy()
                    .into_owned())
            }
        }
    }

    impl Cctx {
        /// A context for `level`.
        pub(super) fn new(level: i32) -> Result<Cctx, String> {
            // SAFETY: no preconditions; null means out of memory.
            let ptr = unsafe { sys::ZSTD_createCCtx() };
            let cctx = Cctx(NonNull::new(ptr).ok_or("cannot allocate a zstd context")?);
            for (param, value) in [
                (sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level),
                (sys::ZSTD_cParameter::ZSTD_c_checksumFlag, 1),
                (sys::ZSTD_cParameter::ZSTD_c_contentSizeFlag, 1),
                // 1: blocks are never split before compression (zstd 1.5.7 would at every
                // level); see spec section 4.
                (BLOCK_SPLITTER_LEVEL, 1),
            ] {
                // SAFETY: the context is valid until dropped.
                check(unsafe { sys::ZSTD_CCtx_setParameter(cctx.0.as_ptr(), param, value) })?;
            }
            Ok(cctx)
        }

        /// Compresses `src` as one frame into `out`, replacing its contents.
        pub(super) fn compress(&mut self, src: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(src.len()));
            // SAFETY: the context is valid; dst is `out`'s spare capacity and src is `src`,
            // both with their true lengths; zstd writes at most dstCapacity bytes.
            let n = check(unsafe {
                sys::ZSTD_compress2(
                    self.0.as_ptr(),
                    out.as_mut_ptr().cast(),
                    out.capacity(),
                    src.as_ptr().cast(),
                    src.len(),
                )
            })?;
            // SAFETY: zstd initialised the first `n` bytes, and n <= capacity.
            unsafe { out.set_len(n) };
            Ok(())
        }
    }

    impl Drop for Cctx {
        fn drop(&mut self) {
            // SAFETY: the context came from ZSTD_createCCtx and is freed once.
            unsafe {
                sys::ZSTD_freeCCtx(self.0.as_ptr());
            }
        }
    }
}

thread_local! {
    /// This thread's contexts, by level.
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, cctx::Cctx)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Compresses `data` into `out` (cleared first; its capacity is reused).
fn compress(data: &[u8], level: i32, frame: u32, out: &mut Vec<u8>) -> Result<()> {
    let err = |message: String| Error::Compress { frame, message };
    COMPRESSORS.with(|c| {
        let mut c = c.borrow_mut();
        let at = match c.iter().position(|(l, _)| *l == level) {
            Some(at) => at,
            None => {
                c.push((level, cctx::Cctx::new(level).map_err(err)?));
                c.len() - 1
            }
        };
        c[at].1.compress(data, out).map_err(err)
    })
}

struct PartFile {
    tmp: PathBuf,
    file: Sink,
    first_frame: u32,
    frames: u32,
    size: u64,
}

/// Removes temp files unless disarmed.
struct TempGuard(Vec<PathBuf>);
impl Drop for TempGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn tmp_name(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(s)
}

/// The part file names for `out` split into `count` parts: `OUT.000`, `OUT.001`, ...
pub fn part_paths(out: &Path, count: usize) -> Vec<PathBuf> {
    let width = 3.max((count.saturating_sub(1)).to_string().len());
    (0..count)
        .map(|i| {
            let mut s = out.as_os_str().to_owned();
            s.push(format!(".{i:0width$}"));
            PathBuf::from(s)
        })
        .collect()
}

fn worst_case_index(members: &[Member], input: &BundleInput) -> Index {
    let mut frames = Vec::new();
    for m in members {
        for k in 0..index::member_frames(m.size()) {
            frames.push(Frame(
                u64::MAX,
                u32::MAX,
                index::member_frame_dsize(m.size(), k) as u32,
                ByteArray::new([0xff; 32]),
            ));
        }
    }
    frames.push(Frame(
        u64::MAX,
        u32::MAX,
        END_LEN as u32,
        ByteArray::new([0xff; 32]),
    ));
    let parts = (0..frames.len())
        .map(|_| Part {
            first_frame: u32::MAX,
            frames: u32::MAX,
            size: u64::MAX,
        })
        .collect();
    build_index(members, input, frames, parts, 0)
}

fn build_index(
    members: &[Member],
    input: &BundleInput,
    frames: Vec<Frame>,
    parts: Vec<Part>,
    level: i32,
) -> Index {
    let mut files = Vec::new();
    let mut blobs = Vec::new();
    let mut next: u32 = 0;
    for m in members {
        let n = index::member_frames(m.size()) as u32;
        match m {
            Member::File { path, bytes } => files.push(FileEntry {
                path: (*path).to_owned(),
                size: bytes.len() as u64,
                digest: Digest::of(bytes),
                first_frame: next,
                frames: n,
            }),
            Member::Blob(b) => blobs.push(BlobEntry {
                digest: b.digest,
                size: b.size,
                media_type: b.media_type.clone(),
                first_frame: next,
                frames: n,
            }),
        }
        next += n;
    }
    let mut images: Vec<Image> = input
        .images
        .iter()
        .map(|i| Image {
            name: i.name.clone(),
            digest: i.digest,
            media_type: i.media_type.clone(),
            size: i.size,
            platforms: i.platforms.clone(),
        })
        .collect();
    for img in &mut images {
        img.platforms.sort();
        img.platforms.dedup();
    }
    Index {
        format: index::FORMAT_VERSION,
        name: input.name.clone(),
        version: input.version.clone(),
        created: input.created.clone(),
        level,
        chunk: CHUNK,
        images,
        files,
        blobs,
        frames,
        parts,
    }
}

/// A compressed frame on its way to disk.
struct Compressed {
    frame: u32,
    body: Body,
    /// The frame's digest; for a frame with blob content, computed by the writer thread.
    sha: Digest,
    dsize: u32,
    /// The blob content in the frame, for the writer thread to hash.
    content: Option<ContentPart>,
}

/// A frame's bytes.
enum Body {
    /// Compressed, with the uncompressed input while its blob content is to be hashed.
    Compressed(Vec<u8>, Option<FrameData>),
    /// Stored: the content's checksum and the input. Its bytes are never gathered: they are
    /// hashed and written piece by piece straight from the input ([`stored::pieces`]).
    Stored(u32, FrameData),
}

impl Compressed {
    /// The frame's size in the archive.
    fn csize(&self) -> usize {
        match &self.body {
            Body::Compressed(bytes, _) => bytes.len(),
            Body::Stored(..) => stored::stored_len(self.dsize as usize),
        }
    }

    /// The uncompressed input, if still held.
    fn input(&self) -> Option<&FrameData> {
        match &self.body {
            Body::Compressed(_, input) => input.as_ref(),
            Body::Stored(_, input) => Some(input),
        }
    }

    /// Hands `f` the frame's bytes in order, in one piece or (stored) several.
    fn pieces<E>(
        &self,
        mut f: impl FnMut(&[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        match &self.body {
            Body::Compressed(bytes, _) => f(bytes),
            Body::Stored(sum, input) => stored::pieces(input.bytes(), *sum, f),
        }
    }

    /// [`Compressed::pieces`] for a consumer that cannot fail.
    fn each_piece(&self, mut f: impl FnMut(&[u8])) {
        let done: std::result::Result<(), std::convert::Infallible> = self.pieces(|p| {
            f(p);
            Ok(())
        });
        let Ok(()) = done;
    }

    /// The frame's sha256, for a frame without blob content.
    fn digest(&self) -> Digest {
        if let Body::Compressed(bytes, _) = &self.body {
            return Digest::of(bytes);
        }
        let mut h = crate::Hasher::new();
        self.each_piece(|p| h.update(p));
        h.finish()
    }

    /// Hands a compressed frame's input back to `inputs` once its content is hashed (a
    /// stored frame keeps its input: it is written from it).
    fn drop_input(&mut self, inputs: &Pool) {
        if let Body::Compressed(_, input) = &mut self.body
            && let Some(FrameData::Buffer(buf, _)) = input.take()
        {
            inputs.give(buf);
        }
    }

    /// Hands the buffers back: the compressed bytes to `outputs`, the input to `inputs`.
    fn recycle(self, inputs: &Pool, outputs: &Pool) {
        let input = match self.body {
            Body::Compressed(bytes, input) => {
                outputs.give(bytes);
                input
            }
            Body::Stored(_, input) => Some(input),
        };
        if let Some(FrameData::Buffer(buf, _)) = input {
            inputs.give(buf);
        }
    }
}

/// Appends frames to part files, opening a new part when the split size says so.
struct PartWriter<'a> {
    out: &'a Path,
    split: Option<u64>,
    index_bound: u64,
    parts: Vec<PartFile>,
    frames: Vec<Frame>,
    guard: TempGuard,
    /// Hands a file to the syncer thread, which starts writeback of what was written so far.
    syncer: Option<mpsc::SyncSender<File>>,
    unsynced: u64,
}

/// Bytes written between background syncs.
const SYNC_EVERY: u64 = 16 << 20;

impl PartWriter<'_> {
    fn new_part(&mut self, first_frame: u32) -> Result<()> {
        if let Some(prev) = self.parts.last_mut() {
            prev.file.park().map_err(|e| Error::io(&prev.tmp, e))?;
        }
        let n = self.parts.len();
        let tmp = tmp_name(&if self.split.is_some() {
            let mut s = self.out.as_os_str().to_owned();
            s.push(format!(".part{n}"));
            PathBuf::from(s)
        } else {
            self.out.to_owned()
        });
        let file = Sink::create(&tmp, true, sink::STAGE).map_err(|e| Error::io(&tmp, e))?;
        self.guard.0.push(tmp.clone());
        self.parts.push(PartFile {
            tmp,
            file,
            first_frame,
            frames: 0,
            size: 0,
        });
        Ok(())
    }

    fn push(&mut self, c: &Compressed) -> Result<()> {
        if c.csize() > MAX_FRAME_COMPRESSED as usize {
            return Err(Error::Compress {
                frame: c.frame,
                message: format!(
                    "compressed to {} bytes, over the {MAX_FRAME_COMPRESSED} limit",
                    c.csize()
                ),
            });
        }
        let csize = c.csize() as u64;
        let cur = self.parts.last().map(|p| p.size);
        match (self.split, cur) {
            (Some(split), _) if csize + self.index_bound > split => {
                return Err(Error::SplitTooSmall {
                    split,
                    frame: c.frame,
                    needed: csize + self.index_bound,
                });
            }
            (Some(split), Some(cur)) if cur + csize + self.index_bound > split => {
                self.new_part(c.frame)?;
            }
            (_, None) => self.new_part(c.frame)?,
            _ => {}
        }
        let Some(part) = self.parts.last_mut() else {
            unreachable!("a part was just opened")
        };
        c.pieces(|p| part.file.write_all(p))
            .map_err(|e| Error::io(&part.tmp, e))?;
        self.frames.push(Frame(
            part.size,
            csize as u32,
            c.dsize,
            ByteArray::new(*c.sha.as_bytes()),
        ));
        part.size += csize;
        part.frames += 1;
        self.unsynced += csize;
        // Direct writes are on their way to disk already; buffered ones are pushed there in
        // the background.
        if self.unsynced >= SYNC_EVERY
            && !part.file.is_direct()
            && let Some(syncer) = &self.syncer
        {
            self.unsynced = 0;
            part.file
                .flush_buffered()
                .map_err(|e| Error::io(&part.tmp, e))?;
            if let Ok(f) = part.file.try_clone() {
                // A busy syncer just means this round is skipped.
                let _ = syncer.try_send(f);
            }
        }
        Ok(())
    }
}

/// Compresses one or two jobs and hashes the frames that hold no blob content (together when
/// two: see [`Digest::of_pair`]); the others go to the writer thread with their input. Input
/// buffers no longer needed go back to `inputs`.
fn compress_jobs(
    first: Job,
    second: Option<Job>,
    level: i32,
    inputs: &Pool,
    outputs: &Pool,
) -> Vec<Result<Compressed>> {
    let mut done: Vec<Result<Compressed>> = [Some(first), second]
        .into_iter()
        .flatten()
        .map(|job| {
            let data = job.data.bytes();
            let dsize = data.len() as u32;
            // A stored frame is only its checksum here; the writer threads take its bytes
            // straight from the input.
            let body = if job.stored {
                Ok(Body::Stored(stored::checksum(data), job.data))
            } else {
                let mut bytes = outputs.take(0);
                compress(data, level, job.frame, &mut bytes).map(|()| {
                    let input = match job.data {
                        d if job.content.is_some() => Some(d),
                        FrameData::Buffer(buf, _) => {
                            inputs.give(buf);
                            None
                        }
                        FrameData::Mapped(_) => None,
                    };
                    Body::Compressed(bytes, input)
                })
            };
            body.map(|body| Compressed {
                frame: job.frame,
                body,
                sha: Digest::from_bytes([0; 32]),
                dsize,
                content: job.content,
            })
        })
        .collect();
    let mut alone: Vec<&mut Compressed> = done
        .iter_mut()
        .flatten()
        .filter(|c| c.content.is_none())
        .collect();
    match alone.as_mut_slice() {
        [a, b] if let (Body::Compressed(x, _), Body::Compressed(y, _)) = (&a.body, &b.body) => {
            (a.sha, b.sha) = Digest::of_pair(x, y)
        }
        slice => {
            for c in slice {
                c.sha = c.digest();
            }
        }
    }
    done
}

/// Hashes a frame holding blob content and that content (into `blob`, the digest of the blob
/// whose frames are in stream order here), side by side; checks the blob at its end.
fn hash_content(
    c: &mut Compressed,
    part: ContentPart,
    blob: &mut Sha,
    members: &[Member],
    arrivals: Option<&dyn Arrivals>,
) -> Result<()> {
    if part.first {
        *blob = Sha::new();
    }
    let mut frame = Sha::new();
    let data = c.input().map(FrameData::bytes).unwrap_or_default();
    let mut content = data.get(part.range).unwrap_or_default();
    // The frame's pieces, each beside as much content as it is long.
    c.each_piece(|p| {
        let (now, later) = content.split_at(p.len().min(content.len()));
        update_pair(&mut frame, p, blob, now);
        content = later;
    });
    update_pair(&mut frame, &[], blob, content);
    c.sha = Digest::from_bytes(frame.finish());
    if let Some((member, staged)) = part.last {
        let found = Digest::from_bytes(std::mem::replace(blob, Sha::new()).finish());
        check_blob(&members[member], found, staged.as_deref(), arrivals)?;
    }
    Ok(())
}

/// Runs the pipeline: a reader thread cuts frames; worker threads (as many as rayon would
/// use) compress them and hash those without blob content, two at a time when two wait; this
/// thread puts the frames back in order and hashes blob content together with the frames that
/// hold it (checking each blob's digest at its end); a writer thread appends the frames to the
/// parts (direct IO where it can), while a syncer thread flushes data written through the page
/// cache to disk in the background so that the final fsync is short.
fn pipeline(
    members: &[Member],
    arrivals: Option<&dyn Arrivals>,
    level: i32,
    writer: &mut PartWriter<'_>,
) -> Result<()> {
    let workers = rayon::current_num_threads().max(1);
    let (jtx, jrx) = mpsc::sync_channel::<Job>(workers * 2);
    let jrx = std::sync::Arc::new(std::sync::Mutex::new(jrx));
    let (rtx, rrx) = mpsc::sync_channel::<Result<Compressed>>(workers * 2);
    let (stx, srx) = mpsc::sync_channel::<File>(1);
    // Uncompressed frames go back to the reader, compressed ones to the workers.
    let (inputs, outputs) = (Pool::default(), Pool::default());
    std::thread::scope(|s| -> Result<()> {
        let producer = s.spawn(|| produce(members, arrivals, jtx, &inputs));
        for _ in 0..workers {
            // Each worker owns a handle on the job queue, so the queue closes (and the
            // producer stops) when the workers are gone.
            let jrx = std::sync::Arc::clone(&jrx);
            let rtx = rtx.clone();
            let (inputs, outputs) = (&inputs, &outputs);
            s.spawn(move || {
                loop {
                    // Two jobs when two are waiting: their frames are hashed together.
                    let (first, second) = match jrx.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(job) => (job, rx.try_recv().ok()),
                            Err(_) => return,
                        },
                        Err(_) => return,
                    };
                    let done = compress_jobs(first, second, level, inputs, outputs);
                    for res in done {
                        if rtx.send(res).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        drop(jrx);
        drop(rtx);
        s.spawn(move || {
            for f in srx.iter() {
                // Errors surface in the final fsync.
                let _ = f.sync_data();
            }
        });
        // Frames go to the parts from their own thread, so that a blocking write never holds
        // up the hashing.
        let (wtx, wrx) = mpsc::sync_channel::<Compressed>(4);
        let (inputs_ref, outputs_ref) = (&inputs, &outputs);
        let io = s.spawn(move || -> Result<()> {
            writer.syncer = Some(stx);
            let mut res = Ok(());
            for c in wrx.iter() {
                if let Err(e) = writer.push(&c) {
                    res = Err(e);
                    break;
                }
                c.recycle(inputs_ref, outputs_ref);
            }
            writer.syncer = None;
            res
        });
        let mut pending: BTreeMap<u32, Compressed> = BTreeMap::new();
        let mut next: u32 = 0;
        let mut result: Result<()> = Ok(());
        let mut blob = Sha::new();
        'recv: for r in rrx.iter() {
            match r {
                Ok(c) => {
                    pending.insert(c.frame, c);
                    while let Some(mut c) = pending.remove(&next) {
                        next += 1;
                        if let Some(part) = c.content.take() {
                            let hashed = hash_content(&mut c, part, &mut blob, members, arrivals);
                            c.drop_input(&inputs);
                            if let Err(e) = hashed {
                                result = Err(e);
                                break 'recv;
                            }
                        }
                        // A closed channel means the writes failed: said below.
                        if wtx.send(c).is_err() {
                            break 'recv;
                        }
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(rrx);
        drop(wtx);
        let written = io.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        let produced = producer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        // The first failure in stream order wins: reading, then writing (frames sent to be
        // written came before any that failed to hash or compress), then hashing and
        // compressing.
        produced.and(written).and(result)
    })
}

/// Writes `input` as an archive at `out` (or `OUT.000`, `OUT.001`, ... when split).
/// Nothing appears under a final name until every byte of it is written and synced.
pub fn write(input: &BundleInput, out: &Path, opts: &WriteOptions) -> Result<WriteSummary> {
    write_arriving(input, out, opts, None)
}

/// [`write()`], with blobs that may still be arriving: before reading each blob, the writer waits
/// for it with `arrivals`, so a pull compresses what it has while it downloads the rest.
pub fn write_arriving(
    input: &BundleInput,
    out: &Path,
    opts: &WriteOptions,
    arrivals: Option<&dyn Arrivals>,
) -> Result<WriteSummary> {
    if !(1..=22).contains(&opts.level) {
        return Err(Error::Input(format!(
            "zstd level {} is out of range 1..=22",
            opts.level
        )));
    }
    let members = plan(input)?;
    let total_frames: u64 = members
        .iter()
        .map(|m| index::member_frames(m.size()))
        .sum::<u64>()
        + 1;
    if total_frames > u64::from(u32::MAX / 2) {
        return Err(Error::Input(format!("{total_frames} frames is too many")));
    }
    let index_bound = match opts.split_size {
        Some(_) => {
            (8 + worst_case_index(&members, input).to_cbor().len() + index::TRAILER_LEN) as u64
        }
        None => 0,
    };
    let mut writer = PartWriter {
        out,
        split: opts.split_size,
        index_bound,
        parts: Vec::new(),
        frames: Vec::with_capacity(total_frames as usize),
        guard: TempGuard(Vec::new()),
        syncer: None,
        unsynced: 0,
    };
    pipeline(&members, arrivals, opts.level, &mut writer)?;
    let PartWriter {
        parts,
        frames,
        mut guard,
        ..
    } = writer;
    if frames.len() as u64 != total_frames {
        return Err(Error::Input(format!(
            "wrote {} frames, planned {total_frames}",
            frames.len()
        )));
    }
    let index = build_index(
        &members,
        input,
        frames,
        parts
            .iter()
            .map(|p| Part {
                first_frame: p.first_frame,
                frames: p.frames,
                size: p.size,
            })
            .collect(),
        opts.level,
    );
    index.validate()?;
    let cbor = index.to_cbor();
    if opts.split_size.is_some() && (8 + cbor.len() + index::TRAILER_LEN) as u64 > index_bound {
        return Err(Error::Input("index outgrew its worst-case bound".into()));
    }
    if cbor.len() + index::TRAILER_LEN > u32::MAX as usize {
        return Err(Error::Input("index over 4 GiB".into()));
    }
    let id = Digest::of(&cbor);
    let count = parts.len();
    let finals = match opts.split_size {
        Some(_) => part_paths(out, count),
        None => vec![out.to_owned()],
    };
    let mut size = 0;
    for (i, mut p) in parts.into_iter().enumerate() {
        let frame = index::index_frame(
            &cbor,
            &Trailer {
                part: i as u32,
                count: count as u32,
                index_len: cbor.len() as u64,
                id,
            },
        );
        p.file.write_all(&frame).map_err(|e| Error::io(&p.tmp, e))?;
        p.file.finish().map_err(|e| Error::io(&p.tmp, e))?;
        size += p.size + frame.len() as u64;
    }
    for (tmp, fin) in guard.0.iter().zip(&finals) {
        fs::rename(tmp, fin).map_err(|e| Error::io(fin, e))?;
    }
    guard.0.clear();
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(WriteSummary {
        id,
        paths: finals,
        size,
        index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `CHUNK` of compressible bytes whose statistics change every 64 KiB (text, then
    /// small binary values), the kind of input zstd's block splitter would cut.
    fn sample() -> Vec<u8> {
        let mut x: u64 = 1;
        let mut next = || {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) as usize
        };
        let words = [
            "layer ", "blob ", "frame ", "zstd ", "tar ", "index ", "sha256 ", "\n",
        ];
        let mut out = Vec::with_capacity(CHUNK as usize);
        while out.len() < CHUNK as usize {
            if (out.len() >> 16) % 2 == 0 {
                out.extend_from_slice(words[next() % words.len()].as_bytes());
            } else {
                out.push((next() % 16) as u8);
            }
        }
        out.truncate(CHUNK as usize);
        out
    }

    /// The golden archive's frames are all under 128 KiB, where zstd never splits blocks;
    /// this pins a full frame, so that a change of the zstd parameters of spec section 4
    /// (or of the zstd release) shows up as a test failure.
    #[test]
    fn full_frame_bytes_are_pinned() {
        let data = sample();
        let mut out = Vec::new();
        compress(&data, 3, 0, &mut out).unwrap();
        assert_eq!(
            (out.len(), Digest::of(&out).to_string().as_str()),
            (
                370_454,
                "sha256:72af42e3e092090e802e4b941e311b168d5f6683f0a878e0344a45beaee72c91"
            ),
            "the bytes of a full frame changed: see spec/format-v1.md sections 4 and 9"
        );
        // The same frame stored (a frame of a gzip or zstd blob after its first).
        stored::store(&data, &mut out);
        assert_eq!(
            (out.len(), Digest::of(&out).to_string().as_str()),
            (
                1_040_421,
                "sha256:d7cfcbca0e7af0b45a5fd7510ac8b88b0c1b228f6481ea0307d010b15bdddefe"
            ),
            "the bytes of a full stored frame changed: see spec/format-v1.md section 4"
        );
    }

    /// Frames of a blob whose content starts with the gzip or zstd magic are stored, all but
    /// the first (tar header and content start); any other blob's frames are compressed.
    #[test]
    fn precompressed_blobs_are_stored_after_their_first_frame() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = CHUNK as usize;
        let blob_of = |magic: &[u8]| {
            let mut b = magic.to_vec();
            while b.len() < 3 * chunk {
                b.extend_from_slice(&sample());
            }
            b.truncate(3 * chunk);
            b
        };
        let blobs: Vec<Vec<u8>> = [&[0x1f, 0x8b][..], &[0x28, 0xb5, 0x2f, 0xfd], b"tar!"]
            .iter()
            .map(|m| blob_of(m))
            .collect();
        let input = one_image_input(&blobs.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let out = dir.path().join("lit.bundle");
        write(&input, &out, &WriteOptions::default()).unwrap();
        let archive = crate::Archive::open(&out).unwrap();
        for (b, coded) in blobs.iter().zip([false, false, true]) {
            let entry = archive
                .index()
                .blobs
                .iter()
                .find(|e| e.digest == Digest::of(b))
                .unwrap();
            // The second frame holds content bytes CHUNK - 512 .. 2 * CHUNK - 512.
            let second = archive.frame(entry.first_frame + 1).unwrap();
            let content = &b[chunk - 512..2 * chunk - 512];
            let (mut with, mut without) = (Vec::new(), Vec::new());
            compress(content, 3, 0, &mut with).unwrap();
            stored::store(content, &mut without);
            let want = if coded { &with } else { &without };
            assert!(second == want.as_slice(), "magic {:02x?}", &b[..4]);
            // The first frame is always compressed.
            let mut first = tar::header(&tar::blob_path(&entry.digest), b.len() as u64).to_vec();
            first.extend_from_slice(&b[..chunk - 512]);
            compress(&first, 3, 0, &mut with).unwrap();
            assert!(archive.frame(entry.first_frame).unwrap() == with.as_slice());
        }
        // `read_stored` reads exactly the stored frames, to the bytes they decompress to.
        let (mut direct, mut decoded) = (Vec::new(), Vec::new());
        let mut stored_frames = 0;
        for f in 0..archive.index().frames.len() as u32 {
            archive.decompress_frame(f, &mut decoded).unwrap();
            let want_stored = stored::stored_len(decoded.len()) == archive.frame(f).unwrap().len()
                && archive.frame(f).unwrap()[..9] == stored::header(decoded.len());
            assert_eq!(
                archive.read_stored(f, &mut direct).unwrap(),
                want_stored,
                "frame {f}"
            );
            if want_stored {
                stored_frames += 1;
                assert!(direct == decoded, "frame {f}");
            } else {
                assert!(direct.is_empty());
            }
        }
        // Frames 2 to 4 of the gzip and of the zstd blob (the fourth holds the last 512
        // content bytes).
        assert_eq!(stored_frames, 6);
        // A damaged block header: not read as stored (decompression then reports it).
        let entry = archive
            .index()
            .blobs
            .iter()
            .find(|e| e.digest == Digest::of(&blobs[0]))
            .unwrap();
        let f = entry.first_frame + 1;
        let at = archive.index().frames[f as usize].offset() + 9 + 131_072 + 3;
        let file = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        file.write_all_at(&[0xff], at).unwrap();
        drop(file);
        let damaged = crate::Archive::open(&out).unwrap();
        assert!(!damaged.read_stored(f, &mut direct).unwrap());
        assert!(damaged.stored_frame(f).unwrap().is_none());
        assert!(damaged.decompress_frame(f, &mut decoded).is_err());
        // A file cut inside a stored frame's checksum after it was opened (the index at the
        // end is gone too, but was read): the frame is not handed out as stored.
        let last = entry.first_frame + entry.frames - 1;
        let fr = &archive.index().frames[last as usize];
        let cut = dir.path().join("cut.bundle");
        std::fs::copy(&out, &cut).unwrap();
        let cut_archive = crate::Archive::open(&cut).unwrap();
        assert!(cut_archive.stored_frame(last).unwrap().is_some());
        let file = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
        file.set_len(fr.offset() + u64::from(fr.csize()) - 1)
            .unwrap();
        drop(file);
        assert!(cut_archive.stored_frame(last).unwrap().is_none());
        assert!(!cut_archive.read_stored(last, &mut direct).unwrap());
        // An archive held in memory has no file to read from.
        let bytes = std::fs::read(&out).unwrap();
        let in_memory = crate::Archive::from_bytes(vec![bytes]).unwrap();
        assert!(!in_memory.read_stored(f, &mut direct).unwrap());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// `read_stored` on a stored frame with bytes changed on disk: it reads the frame as
        /// stored exactly when its header and block headers are intact (the layout), and then
        /// gives the payload bytes as they are in the file; otherwise nothing. Never panics.
        #[test]
        fn read_stored_takes_only_intact_layouts(
            frame_pick in 0usize..2,
            flips in proptest::collection::vec((0usize..1_040_421, 1u8..=255), 1..4),
            near_header in proptest::prelude::any::<bool>(),
            range in (0u64..1_040_384, 0u64..1_040_384),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (path, archive, layer) = stored_fixture(dir.path());
            let blob = archive.index().blob(&layer).unwrap();
            let f = blob.first_frame + 1 + frame_pick as u32;
            let fr = &archive.index().frames[f as usize];
            let (offset, csize) = (fr.offset() as usize, fr.csize() as usize);
            let dsize = fr.dsize() as usize;
            drop(archive);
            let pristine = std::fs::read(&path).unwrap();
            let mut bytes = pristine.clone();
            let layout: Vec<usize> = (0..9)
                .chain((0..dsize.div_ceil(stored::BLOCK)).flat_map(|k| {
                    let at = 9 + k * (stored::BLOCK + 3);
                    at..at + 3
                }))
                .collect();
            for (at, x) in flips {
                // Half the cases aim at the layout bytes, which random offsets rarely hit.
                let at = if near_header { layout[at % layout.len()] } else { at % csize };
                bytes[offset + at] ^= x;
            }
            // (Two flips of one byte may cancel out.)
            let layout_changed = layout
                .iter()
                .any(|&at| bytes[offset + at] != pristine[offset + at]);
            std::fs::write(&path, &bytes).unwrap();
            let archive = crate::Archive::open(&path).unwrap();
            let mut out = vec![7u8; 3];
            let taken = archive.read_stored(f, &mut out).unwrap();
            proptest::prop_assert_eq!(taken, !layout_changed);
            if taken {
                let payload: Vec<u8> = (0..dsize.div_ceil(stored::BLOCK))
                    .flat_map(|k| {
                        let start = offset + 9 + k * (stored::BLOCK + 3) + 3;
                        let n = stored::BLOCK.min(dsize - k * stored::BLOCK);
                        bytes[start..start + n].to_vec()
                    })
                    .collect();
                proptest::prop_assert!(out == payload);
            } else {
                proptest::prop_assert!(out.is_empty());
            }
            // `stored_frame` hands out the same content as file ranges, and any content range
            // of it.
            let stored = archive.stored_frame(f).unwrap();
            proptest::prop_assert_eq!(stored.is_some(), taken);
            if let Some(stored) = stored {
                let at = |segs: &[(u64, u64)]| -> Vec<u8> {
                    segs.iter()
                        .flat_map(|&(o, n)| bytes[o as usize..(o + n) as usize].to_vec())
                        .collect()
                };
                proptest::prop_assert_eq!(stored.len(), dsize as u64);
                proptest::prop_assert!(at(&stored.segments) == out);
                let (a, b) = (range.0.min(dsize as u64), range.1.min(dsize as u64));
                let (a, b) = (a.min(b), a.max(b));
                proptest::prop_assert!(at(&stored.slice(a..b)) == out[a as usize..b as usize]);
            }
        }
    }

    /// An archive whose only layer starts with the gzip magic and spans three frames: the
    /// second (full) and the third (short) are stored.
    fn stored_fixture(dir: &Path) -> (PathBuf, crate::Archive, Digest) {
        let chunk = CHUNK as usize;
        let mut layer = vec![0x1f, 0x8b];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while layer.len() < 2 * chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            layer.push(x as u8);
        }
        let input = one_image_input(&[&layer]);
        let out = dir.join("stored.bundle");
        write(&input, &out, &WriteOptions::default()).unwrap();
        let archive = crate::Archive::open(&out).unwrap();
        (out, archive, Digest::of(&layer))
    }

    /// One image (a stub manifest) over `blobs`, for tests that care about the blobs' frames.
    fn one_image_input(blobs: &[&[u8]]) -> BundleInput {
        let manifest = br#"{"schemaVersion":2}"#.to_vec();
        let mut input = BundleInput {
            name: "frames".into(),
            version: "1".into(),
            ..BundleInput::default()
        };
        input.images.push(ImageInput {
            name: "x/y:1".into(),
            digest: Digest::of(&manifest),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: manifest.len() as u64,
            platforms: Vec::new(),
        });
        for b in blobs.iter().copied().chain([manifest.as_slice()]) {
            input.blobs.push(BlobInput {
                digest: Digest::of(b),
                size: b.len() as u64,
                media_type: None,
                content: Content::Bytes(b.into()),
            });
        }
        input
    }
}
