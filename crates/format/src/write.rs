//! The writer: plans members and frames, compresses frames in parallel (rayon), and writes
//! parts through temp files that are fsynced and renamed only when complete.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use rayon::prelude::*;
use serde::Serialize;
use serde_bytes::ByteArray;

use crate::index::{self, BlobEntry, FileEntry, Frame, Image, Index, Part, Trailer};
use crate::{CHUNK, Digest, END_LEN, Error, Hasher, MAX_FRAME_COMPRESSED, Result, tar};

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
    let json = |v: &dyn erased::Ser| -> Result<Arc<[u8]>> {
        let mut out = v.to_json().map_err(|e| Error::Input(e.to_string()))?;
        out.push(b'\n');
        Ok(Arc::from(out))
    };
    Ok([layout, json(&idx)?, json(&meta)?])
}

mod erased {
    pub trait Ser {
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
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
    data: Vec<u8>,
}

/// Reads members in order and cuts the tar stream into frames, hashing blob content as it
/// goes. Sends windows of frames; a blob whose content does not match its digest ends the
/// stream with an error.
fn produce(members: &[Member], tx: mpsc::SyncSender<Vec<Job>>) -> Result<()> {
    const WINDOW_BYTES: usize = 8 << 20;
    let mut window: Vec<Job> = Vec::new();
    let mut window_bytes = 0usize;
    let mut open: Option<(PathBuf, File)> = None;
    let mut send = |job: Job, window: &mut Vec<Job>, flush: bool| -> bool {
        window_bytes += job.data.len();
        window.push(job);
        if window_bytes >= WINDOW_BYTES || flush {
            window_bytes = 0;
            return tx.send(std::mem::take(window)).is_ok();
        }
        true
    };
    for m in members {
        let size = m.size();
        let mut buf = Vec::with_capacity(CHUNK as usize);
        buf.extend_from_slice(&tar::header(&m.tar_path(), size));
        let mut hasher = Hasher::new();
        let mut done: u64 = 0;
        while done < size {
            if buf.len() == CHUNK as usize {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK as usize));
                if !send(Job { data: full }, &mut window, false) {
                    return Ok(());
                }
            }
            let n = ((CHUNK as usize - buf.len()) as u64).min(size - done) as usize;
            let start = buf.len();
            buf.resize(start + n, 0);
            match m {
                Member::File { bytes, .. } => {
                    buf[start..].copy_from_slice(&bytes[done as usize..done as usize + n]);
                }
                Member::Blob(b) => match &b.content {
                    Content::Bytes(bytes) => {
                        let Some(src) = bytes.get(done as usize..done as usize + n) else {
                            return Err(Error::Input(format!(
                                "blob {}: {} bytes given, {} declared",
                                b.digest,
                                bytes.len(),
                                size
                            )));
                        };
                        buf[start..].copy_from_slice(src);
                    }
                    Content::File { path, offset } => {
                        let file = match &open {
                            Some((p, f)) if p == path => f,
                            _ => {
                                let f = File::open(path).map_err(|e| Error::io(path, e))?;
                                &open.insert((path.clone(), f)).1
                            }
                        };
                        file.read_exact_at(&mut buf[start..], offset + done)
                            .map_err(|e| {
                                Error::io(
                                    path,
                                    std::io::Error::new(
                                        e.kind(),
                                        format!(
                                            "reading blob {} ({size} bytes at offset {offset}): {e}",
                                            b.digest
                                        ),
                                    ),
                                )
                            })?;
                    }
                },
            }
            if let Member::Blob(_) = m {
                hasher.update(&buf[start..]);
            }
            done += n as u64;
        }
        if let Member::Blob(b) = m {
            let found = hasher.finish();
            if found != b.digest {
                let place = match &b.content {
                    Content::Bytes(_) => "generated".to_owned(),
                    Content::File { path, offset } => {
                        format!("{} at offset {offset}", path.display())
                    }
                };
                return Err(Error::BlobDigest {
                    expected: b.digest,
                    found,
                    place,
                });
            }
        }
        let pad = (tar::padded(size) - size) as usize;
        let mut pad_left = pad;
        while pad_left > 0 {
            if buf.len() == CHUNK as usize {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK as usize));
                if !send(Job { data: full }, &mut window, false) {
                    return Ok(());
                }
            }
            let n = pad_left.min(CHUNK as usize - buf.len());
            buf.resize(buf.len() + n, 0);
            pad_left -= n;
        }
        if !send(Job { data: buf }, &mut window, false) {
            return Ok(());
        }
    }
    let end = Job {
        data: vec![0u8; END_LEN],
    };
    send(end, &mut window, true);
    Ok(())
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(data: &[u8], level: i32, frame: u32) -> Result<Vec<u8>> {
    let err = |e: std::io::Error| Error::Compress {
        frame,
        message: e.to_string(),
    };
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if !matches!(&*c, Some((l, _)) if *l == level) {
            let mut z = zstd::bulk::Compressor::new(level).map_err(err)?;
            z.include_checksum(true).map_err(err)?;
            z.include_contentsize(true).map_err(err)?;
            *c = Some((level, z));
        }
        let Some((_, z)) = c.as_mut() else {
            unreachable!()
        };
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        z.compress_to_buffer(data, &mut out).map_err(err)?;
        Ok(out)
    })
}

struct PartFile {
    tmp: PathBuf,
    file: BufWriter<File>,
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

/// Writes `input` as an archive at `out` (or `OUT.000`, `OUT.001`, ... when split).
/// Nothing appears under a final name until every byte of it is written and synced.
pub fn write(input: &BundleInput, out: &Path, opts: &WriteOptions) -> Result<WriteSummary> {
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
    let mut guard = TempGuard(Vec::new());
    let mut parts: Vec<PartFile> = Vec::new();
    let mut frames: Vec<Frame> = Vec::with_capacity(total_frames as usize);
    let level = opts.level;
    let new_part = |n: usize, first_frame: u32, guard: &mut TempGuard| -> Result<PartFile> {
        let tmp = tmp_name(&if opts.split_size.is_some() {
            let mut s = out.as_os_str().to_owned();
            s.push(format!(".part{n}"));
            PathBuf::from(s)
        } else {
            out.to_owned()
        });
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        guard.0.push(tmp.clone());
        Ok(PartFile {
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
            first_frame,
            frames: 0,
            size: 0,
        })
    };
    parts.push(new_part(0, 0, &mut guard)?);

    let (tx, rx) = mpsc::sync_channel::<Vec<Job>>(2);
    let produced = std::thread::scope(|s| -> Result<()> {
        let producer = s.spawn(|| produce(&members, tx));
        let mut write_err: Option<Error> = None;
        for window in rx.iter() {
            let base = frames.len() as u32;
            let compressed: Vec<Result<(Vec<u8>, [u8; 32])>> = window
                .par_iter()
                .enumerate()
                .map(|(i, job)| {
                    let c = compress(&job.data, level, base + i as u32)?;
                    let sha = *Digest::of(&c).as_bytes();
                    Ok((c, sha))
                })
                .collect();
            for (i, (res, job)) in compressed.into_iter().zip(&window).enumerate() {
                let frame_no = base + i as u32;
                let step = || -> Result<()> {
                    let (c, sha) = res?;
                    if c.len() > MAX_FRAME_COMPRESSED as usize {
                        return Err(Error::Compress {
                            frame: frame_no,
                            message: format!(
                                "compressed to {} bytes, over the {MAX_FRAME_COMPRESSED} limit",
                                c.len()
                            ),
                        });
                    }
                    let csize = c.len() as u64;
                    if let Some(split) = opts.split_size {
                        if csize + index_bound > split {
                            return Err(Error::SplitTooSmall {
                                split,
                                frame: frame_no,
                                needed: csize + index_bound,
                            });
                        }
                        let cur = parts.last().map_or(0, |p| p.size);
                        if cur + csize + index_bound > split {
                            let n = parts.len();
                            parts.push(new_part(n, frame_no, &mut guard)?);
                        }
                    }
                    let Some(part) = parts.last_mut() else {
                        unreachable!()
                    };
                    part.file
                        .write_all(&c)
                        .map_err(|e| Error::io(&part.tmp, e))?;
                    frames.push(Frame(
                        part.size,
                        csize as u32,
                        job.data.len() as u32,
                        ByteArray::new(sha),
                    ));
                    part.size += csize;
                    part.frames += 1;
                    Ok(())
                };
                if let Err(e) = step() {
                    write_err = Some(e);
                    break;
                }
            }
            if write_err.is_some() {
                break;
            }
        }
        drop(rx);
        let produced = producer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        if let Some(e) = write_err {
            return Err(e);
        }
        produced
    });
    produced?;
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
        level,
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
        let file = p
            .file
            .into_inner()
            .map_err(|e| Error::io(&p.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&p.tmp, e))?;
        size += p.size + frame.len() as u64;
    }
    for (i, fin) in finals.iter().enumerate() {
        let tmp = &guard.0[i];
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
