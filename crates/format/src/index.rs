//! The CBOR index, its validation, and the trailer that locates it at the end of every part.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteArray;

use crate::{CHUNK, Digest, END_LEN, Error, MAX_FRAME_COMPRESSED, Result, tar};

/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Magic of the zstd skippable frame that carries the index (`0x184D2A5B`).
pub const INDEX_FRAME_MAGIC: u32 = 0x184D_2A5B;

/// The first eight bytes of the trailer.
pub const TRAILER_MAGIC: &[u8; 8] = b"BNDLIDX1";

/// Length of the trailer that ends every part.
pub const TRAILER_LEN: usize = 64;

/// Fixed names of the non-blob members, in stream order.
pub const FILE_PATHS: [&str; 3] = ["oci-layout", "index.json", "bundle.json"];

/// The index of an archive (spec/format-v1.md, "Index").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Always [`FORMAT_VERSION`].
    pub format: u32,
    /// The bundle's name from bundle.yaml.
    pub name: String,
    /// The bundle's version from bundle.yaml.
    pub version: String,
    /// RFC 3339 time from `SOURCE_DATE_EPOCH`, if it was set.
    pub created: Option<String>,
    /// zstd level the frames were written with (informative).
    pub level: i32,
    /// Largest decompressed frame; always [`CHUNK`] in v1.
    pub chunk: u32,
    /// The images, in bundle.yaml order.
    pub images: Vec<Image>,
    /// The non-blob members `oci-layout`, `index.json`, `bundle.json`, in that order.
    pub files: Vec<FileEntry>,
    /// Every blob once, sorted by digest.
    pub blobs: Vec<BlobEntry>,
    /// Every frame, in stream order.
    pub frames: Vec<Frame>,
    /// The parts; one for an archive that is not split.
    pub parts: Vec<Part>,
}

/// One image of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// The reference the image carries, e.g. `registry.example/team/app:1.0`.
    pub name: String,
    /// Digest of its manifest or image index.
    pub digest: Digest,
    /// Media type of that manifest or index.
    pub media_type: String,
    /// Size of that manifest or index.
    pub size: u64,
    /// Platforms it holds, `os/arch[/variant]`, sorted.
    pub platforms: Vec<String>,
}

/// A non-blob tar member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Its path in the tar, one of [`FILE_PATHS`].
    pub path: String,
    /// Content length.
    pub size: u64,
    /// sha256 of the content.
    pub digest: Digest,
    /// First frame of the member.
    pub first_frame: u32,
    /// Number of frames of the member.
    pub frames: u32,
}

/// A blob, stored as the tar member `blobs/sha256/<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobEntry {
    /// Its digest (also its name).
    pub digest: Digest,
    /// Content length.
    pub size: u64,
    /// Media type, when a manifest names it.
    pub media_type: Option<String>,
    /// First frame of the member.
    pub first_frame: u32,
    /// Number of frames of the member.
    pub frames: u32,
}

/// A zstd frame: `[offset, csize, dsize, sha256]` in CBOR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame(
    /// Offset of the frame in its part.
    pub u64,
    /// Compressed length.
    pub u32,
    /// Decompressed length.
    pub u32,
    /// sha256 of the compressed bytes.
    pub ByteArray<32>,
);

impl Frame {
    /// Offset of the frame in its part.
    pub fn offset(&self) -> u64 {
        self.0
    }
    /// Compressed length.
    pub fn csize(&self) -> u32 {
        self.1
    }
    /// Decompressed length.
    pub fn dsize(&self) -> u32 {
        self.2
    }
    /// sha256 of the compressed bytes.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.3
    }
}

/// One part file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// First frame in this part.
    pub first_frame: u32,
    /// Number of frames in it.
    pub frames: u32,
    /// Bytes of frames (the part file is this plus the index frame).
    pub size: u64,
}

/// What a member of the stream is, for messages and lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRef {
    /// `index.files[i]`
    File(usize),
    /// `index.blobs[i]`
    Blob(usize),
    /// The tar end-of-archive blocks.
    End,
}

/// The frames a member occupies, given its content size: header, content, padding.
pub fn member_frames(size: u64) -> u64 {
    let len = tar::BLOCK as u64 + tar::padded(size);
    len.div_ceil(u64::from(CHUNK))
}

/// Decompressed size of frame `k` of a member of content size `size`.
pub fn member_frame_dsize(size: u64, k: u64) -> u64 {
    let len = tar::BLOCK as u64 + tar::padded(size);
    let start = k * u64::from(CHUNK);
    (len - start).min(u64::from(CHUNK))
}

impl Index {
    /// Encodes to CBOR.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing CBOR into a Vec cannot fail: the only errors are from the writer.
        ciborium::into_writer(self, &mut out).unwrap_or_else(|_| unreachable!());
        out
    }

    /// Decodes CBOR and checks every rule of the spec.
    pub fn from_cbor(bytes: &[u8], path: &std::path::Path) -> Result<Index> {
        let index: Index = ciborium::from_reader(bytes).map_err(|e| Error::IndexDecode {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        index.validate()?;
        Ok(index)
    }

    /// Archive id: sha256 of the CBOR encoding.
    pub fn id(&self) -> Digest {
        Digest::of(&self.to_cbor())
    }

    /// Checks every rule of spec/format-v1.md, "Index rules".
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT_VERSION {
            return Err(Error::index(
                "format",
                format!(
                    "version {} is not supported (this build reads {FORMAT_VERSION})",
                    self.format
                ),
            ));
        }
        if self.chunk != CHUNK {
            return Err(Error::index(
                "chunk",
                format!("must be {CHUNK}, is {}", self.chunk),
            ));
        }
        if self.files.len() != FILE_PATHS.len() {
            return Err(Error::index(
                "files",
                format!("must list {FILE_PATHS:?}, lists {}", self.files.len()),
            ));
        }
        let nframes = self.frames.len() as u64;
        let mut next: u64 = 0;
        let mut check_member = |field: String, first: u32, frames: u32, size: u64| -> Result<()> {
            if u64::from(first) != next {
                return Err(Error::index(
                    format!("{field}.first_frame"),
                    format!("is {first}, the previous member ends at frame {next}"),
                ));
            }
            let want = member_frames(size);
            if u64::from(frames) != want {
                return Err(Error::index(
                    format!("{field}.frames"),
                    format!("is {frames}, a member of {size} bytes takes {want}"),
                ));
            }
            for k in 0..want {
                let f = next + k;
                let Some(frame) = self.frames.get(f as usize) else {
                    return Err(Error::index(
                        field.clone(),
                        format!("needs frame {f}, the index lists {nframes}"),
                    ));
                };
                let d = member_frame_dsize(size, k);
                if u64::from(frame.dsize()) != d {
                    return Err(Error::index(
                        format!("frames[{f}].dsize"),
                        format!("is {}, {field} needs {d}", frame.dsize()),
                    ));
                }
            }
            next += want;
            Ok(())
        };
        for (i, (f, want)) in self.files.iter().zip(FILE_PATHS).enumerate() {
            if f.path != want {
                return Err(Error::index(
                    format!("files[{i}].path"),
                    format!("is {:?}, must be {want:?}", f.path),
                ));
            }
            check_member(format!("files[{i}]"), f.first_frame, f.frames, f.size)?;
        }
        for (i, b) in self.blobs.iter().enumerate() {
            if i > 0 && self.blobs[i - 1].digest >= b.digest {
                return Err(Error::index(
                    format!("blobs[{i}].digest"),
                    "blobs must be sorted by digest with no repeats",
                ));
            }
            check_member(format!("blobs[{i}]"), b.first_frame, b.frames, b.size)?;
        }
        match self.frames.get(next as usize) {
            Some(end) if end.dsize() as usize == END_LEN && next + 1 == nframes => {}
            _ => {
                return Err(Error::index(
                    "frames",
                    format!(
                        "must end with one end-of-archive frame of {END_LEN} bytes at frame {next}, the index lists {nframes} frames"
                    ),
                ));
            }
        }
        for (i, f) in self.frames.iter().enumerate() {
            if f.csize() == 0 || f.csize() > MAX_FRAME_COMPRESSED {
                return Err(Error::index(
                    format!("frames[{i}].csize"),
                    format!("is {}, must be 1..={MAX_FRAME_COMPRESSED}", f.csize()),
                ));
            }
        }
        if self.parts.is_empty() {
            return Err(Error::index("parts", "is empty"));
        }
        let mut expect_first: u64 = 0;
        for (p, part) in self.parts.iter().enumerate() {
            if u64::from(part.first_frame) != expect_first || part.frames == 0 {
                return Err(Error::index(
                    format!("parts[{p}]"),
                    format!(
                        "starts at frame {} with {} frames, must start at {expect_first} with at least one",
                        part.first_frame, part.frames
                    ),
                ));
            }
            let mut off: u64 = 0;
            for f in part.first_frame as u64..u64::from(part.first_frame) + u64::from(part.frames) {
                let Some(frame) = self.frames.get(f as usize) else {
                    return Err(Error::index(
                        format!("parts[{p}].frames"),
                        format!("runs past the last frame {nframes}"),
                    ));
                };
                if frame.offset() != off {
                    return Err(Error::index(
                        format!("frames[{f}].offset"),
                        format!("is {}, must be {off} in part {p}", frame.offset()),
                    ));
                }
                off += u64::from(frame.csize());
            }
            if off != part.size {
                return Err(Error::index(
                    format!("parts[{p}].size"),
                    format!("is {}, its frames add up to {off}", part.size),
                ));
            }
            expect_first += u64::from(part.frames);
        }
        if expect_first != nframes {
            return Err(Error::index(
                "parts",
                format!("cover {expect_first} frames, the index lists {nframes}"),
            ));
        }
        for (i, img) in self.images.iter().enumerate() {
            if img.name.is_empty() {
                return Err(Error::index(format!("images[{i}].name"), "is empty"));
            }
            if self.images[..i].iter().any(|o| o.name == img.name) {
                return Err(Error::index(
                    format!("images[{i}].name"),
                    format!("{:?} appears twice", img.name),
                ));
            }
            match self.blob(&img.digest) {
                Some(b) if b.size == img.size => {}
                _ => {
                    return Err(Error::index(
                        format!("images[{i}].digest"),
                        format!(
                            "{} of {} bytes is not among the blobs",
                            img.digest, img.size
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The index of a sub-archive holding only `images` (names) and `blobs` (which must
    /// include everything those images need: the caller reads their manifests). Frames keep
    /// their bytes and sha256, so the sub-archive's frames are the archive's own frames; each
    /// frame is a part of its own at offset 0 (see [`crate::Archive::from_frame_files`]).
    /// Also returns, for each frame of the sub-archive, its number in this archive.
    pub fn subset(
        &self,
        images: &[&str],
        blobs: &std::collections::BTreeSet<Digest>,
    ) -> Result<(Index, Vec<u32>)> {
        let mut out = Index {
            images: Vec::new(),
            files: Vec::new(),
            blobs: Vec::new(),
            frames: Vec::new(),
            parts: Vec::new(),
            ..self.clone()
        };
        for name in images {
            let img = self
                .images
                .iter()
                .find(|i| i.name == *name)
                .ok_or_else(|| Error::index("images", format!("has no image {name:?}")))?;
            out.images.push(img.clone());
        }
        let mut source = Vec::new();
        let mut copy = |first: u32, n: u32, out_frames: &mut Vec<Frame>| -> u32 {
            let start = out_frames.len() as u32;
            for (k, f) in self.frames[first as usize..(first + n) as usize]
                .iter()
                .enumerate()
            {
                out_frames.push(Frame(0, f.1, f.2, f.3));
                source.push(first + k as u32);
            }
            start
        };
        for f in &self.files {
            let first = copy(f.first_frame, f.frames, &mut out.frames);
            out.files.push(FileEntry {
                first_frame: first,
                ..f.clone()
            });
        }
        for d in blobs {
            let b = self
                .blob(d)
                .ok_or_else(|| Error::index("blobs", format!("has no blob {d}")))?;
            let first = copy(b.first_frame, b.frames, &mut out.frames);
            out.blobs.push(BlobEntry {
                first_frame: first,
                ..b.clone()
            });
        }
        let end = self.frames.len() as u32 - 1;
        copy(end, 1, &mut out.frames);
        out.parts = out
            .frames
            .iter()
            .enumerate()
            .map(|(i, f)| Part {
                first_frame: i as u32,
                frames: 1,
                size: u64::from(f.csize()),
            })
            .collect();
        out.validate()?;
        Ok((out, source))
    }

    /// The blob with this digest.
    pub fn blob(&self, digest: &Digest) -> Option<&BlobEntry> {
        self.blobs
            .binary_search_by(|b| b.digest.cmp(digest))
            .ok()
            .map(|i| &self.blobs[i])
    }

    /// The member that frame `frame` belongs to.
    pub fn member_of(&self, frame: u32) -> MemberRef {
        if let Some(i) = self
            .files
            .iter()
            .position(|f| frame >= f.first_frame && frame - f.first_frame < f.frames)
        {
            return MemberRef::File(i);
        }
        let i = self.blobs.partition_point(|b| b.first_frame <= frame);
        if i > 0 {
            let b = &self.blobs[i - 1];
            if frame - b.first_frame < b.frames {
                return MemberRef::Blob(i - 1);
            }
        }
        MemberRef::End
    }

    /// A human name of a member: its tar path.
    pub fn member_name(&self, m: MemberRef) -> String {
        match m {
            MemberRef::File(i) => self.files[i].path.clone(),
            MemberRef::Blob(i) => tar::blob_path(&self.blobs[i].digest),
            MemberRef::End => "end-of-archive".to_owned(),
        }
    }

    /// The part that holds frame `frame`.
    pub fn part_of(&self, frame: u32) -> usize {
        self.parts.partition_point(|p| p.first_frame <= frame) - 1
    }

    /// Total bytes of decompressed content (the tar stream length).
    pub fn tar_size(&self) -> u64 {
        self.frames.iter().map(|f| u64::from(f.dsize())).sum()
    }
}

/// The 64 bytes that end every part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Zero-based number of this part.
    pub part: u32,
    /// Number of parts.
    pub count: u32,
    /// Length of the CBOR index before the trailer.
    pub index_len: u64,
    /// sha256 of the CBOR index: the archive id.
    pub id: Digest,
}

impl Trailer {
    /// Encodes the trailer.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[..8].copy_from_slice(TRAILER_MAGIC);
        t[8..12].copy_from_slice(&self.part.to_le_bytes());
        t[12..16].copy_from_slice(&self.count.to_le_bytes());
        t[16..24].copy_from_slice(&self.index_len.to_le_bytes());
        t[24..56].copy_from_slice(self.id.as_bytes());
        t
    }

    /// Decodes a trailer; the reason says what is wrong.
    pub fn decode(t: &[u8]) -> Result<Trailer, String> {
        if t.len() != TRAILER_LEN {
            return Err(format!("trailer must be {TRAILER_LEN} bytes"));
        }
        if &t[..8] != TRAILER_MAGIC {
            return Err(
                "no bundle trailer at the end of the file (truncated, or not a bundle)".into(),
            );
        }
        if t[56..].iter().any(|&b| b != 0) {
            return Err("trailer reserved bytes are not zero".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&t[16..24]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&t[24..56]);
        let tr = Trailer {
            part: u32_at(8),
            count: u32_at(12),
            index_len: u64::from_le_bytes(len),
            id: Digest::from_bytes(id),
        };
        if tr.count == 0 || tr.part >= tr.count {
            return Err(format!("trailer says part {} of {}", tr.part, tr.count));
        }
        Ok(tr)
    }
}

/// The whole skippable frame that ends a part: header, index, trailer.
pub fn index_frame(cbor: &[u8], trailer: &Trailer) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + cbor.len() + TRAILER_LEN);
    out.extend_from_slice(&INDEX_FRAME_MAGIC.to_le_bytes());
    let payload = (cbor.len() + TRAILER_LEN) as u32;
    out.extend_from_slice(&payload.to_le_bytes());
    out.extend_from_slice(cbor);
    out.extend_from_slice(&trailer.encode());
    out
}
