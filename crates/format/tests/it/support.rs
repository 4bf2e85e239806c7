//! Builders for test archives.

use std::path::Path;
use std::sync::Arc;

use bundle_format::index::{self, Index, Trailer};
use bundle_format::{Archive, BlobInput, BundleInput, Content, Digest, ImageInput, WriteOptions};

/// A blob in memory.
pub fn blob(bytes: Vec<u8>) -> BlobInput {
    BlobInput {
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        media_type: Some("application/octet-stream".into()),
        content: Content::Bytes(Arc::from(bytes)),
    }
}

/// Deterministic pseudo-random bytes (splitmix64).
pub use bundle_testimages::noise;

/// An input with one "image" whose manifest is the first blob, plus the given blobs.
pub fn input(blobs: Vec<Vec<u8>>) -> BundleInput {
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let m = blob(manifest);
    let image = ImageInput {
        name: "registry.example/test/app:1.0".into(),
        digest: m.digest,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: m.size,
        platforms: vec!["linux/amd64".into()],
    };
    let mut all = vec![m];
    all.extend(blobs.into_iter().map(blob));
    BundleInput {
        name: "test".into(),
        version: "1.0.0".into(),
        created: None,
        images: vec![image],
        blobs: all,
    }
}

/// A typical mix: small, compressible, incompressible, exactly-chunk-sized, multi-frame, and
/// a gzip-like blob (its frames after the first are stored, the last one with tar padding).
pub fn mixed() -> BundleInput {
    let chunk = bundle_format::CHUNK as usize;
    let mut gzip_like = noise(4, 2 * chunk + 300);
    gzip_like[..2].copy_from_slice(&[0x1f, 0x8b]);
    input(vec![
        b"hello".to_vec(),
        Vec::new(),
        "text ".repeat(400_000).into_bytes(),
        noise(1, 3 * chunk + 17),
        noise(2, chunk - 512),
        noise(3, chunk),
        gzip_like,
    ])
}

/// Writes `input` and returns the archive path.
pub fn write(
    dir: &Path,
    name: &str,
    input: &BundleInput,
    split: Option<u64>,
) -> std::path::PathBuf {
    let out = dir.join(name);
    bundle_format::write(
        input,
        &out,
        &WriteOptions {
            level: 3,
            split_size: split,
        },
    )
    .unwrap();
    out
}

/// Rewrites a single-part archive with frame `k` replaced by `content` (recompressed, index
/// updated to match), as a forger would.
pub fn forge_frame(path: &Path, k: u32, content: &[u8]) {
    let a = Archive::open(path).unwrap();
    let mut ix: Index = a.index().clone();
    let mut frames: Vec<Vec<u8>> = (0..ix.frames.len() as u32)
        .map(|f| a.frame(f).unwrap().to_vec())
        .collect();
    frames[k as usize] = zstd::bulk::compress(content, 3).unwrap();
    let mut off = 0u64;
    for (i, f) in frames.iter().enumerate() {
        ix.frames[i] = index::Frame(
            off,
            f.len() as u32,
            ix.frames[i].dsize(),
            serde_bytes::ByteArray::new(*Digest::of(f).as_bytes()),
        );
        off += f.len() as u64;
    }
    ix.frames[k as usize].2 = content.len() as u32;
    ix.parts[0].size = off;
    let cbor = ix.to_cbor();
    let mut out: Vec<u8> = frames.concat();
    out.extend(index::index_frame(
        &cbor,
        &Trailer {
            part: 0,
            count: 1,
            index_len: cbor.len() as u64,
            id: Digest::of(&cbor),
        },
    ));
    std::fs::write(path, out).unwrap();
}
