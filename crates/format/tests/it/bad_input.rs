//! Damaged and forged archives: each error names the frame, part, member or field at fault.

use std::path::{Path, PathBuf};

use bundle_format::{Archive, Error, WriteOptions, tar};

use crate::support::{self, mixed};

/// A way to damage a value.
type Forge<T> = Box<dyn Fn(&mut T)>;

fn open_err(paths: &[PathBuf]) -> String {
    match Archive::open_parts(paths) {
        Ok(a) => match a.verify(true) {
            Ok(_) => panic!("{paths:?} opened and verified"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

#[test]
fn flipped_byte_in_any_frame_names_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    let ix = Archive::open(&out).unwrap().index().clone();
    let pristine = std::fs::read(&out).unwrap();
    for (k, f) in ix.frames.iter().enumerate() {
        std::fs::write(&out, &pristine).unwrap();
        flip(&out, f.offset() + u64::from(f.csize()) / 2);
        let a = Archive::open(&out).unwrap();
        for deep in [false, true] {
            let e = a.verify(deep).unwrap_err();
            assert!(
                matches!(e, Error::FrameDigest { frame, .. } if frame as usize == k),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("frame {k} ")), "{e}");
        }
    }
}

#[test]
fn flipped_byte_in_the_index_or_trailer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    let len = std::fs::metadata(&out).unwrap().len();
    let pristine = std::fs::read(&out).unwrap();
    // Inside the CBOR index.
    flip(&out, len - 64 - 40);
    assert!(open_err(std::slice::from_ref(&out)).contains("index is corrupt"));
    // The trailer magic.
    std::fs::write(&out, &pristine).unwrap();
    flip(&out, len - 60);
    assert!(open_err(std::slice::from_ref(&out)).contains("not a bundle archive"));
}

#[test]
fn truncated_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    let pristine = std::fs::read(&out).unwrap();
    for cut in [0usize, 10, 1000, pristine.len() / 2, pristine.len() - 1] {
        std::fs::write(&out, &pristine[..cut]).unwrap();
        let e = open_err(std::slice::from_ref(&out));
        assert!(e.contains("a.bundle"), "{cut}: {e}");
    }
    // Truncated at the front (the end and index survive): the size check names the part.
    std::fs::write(&out, &pristine[4096..]).unwrap();
    let e = open_err(std::slice::from_ref(&out));
    assert!(e.contains("part 0 is") && e.contains("truncated"), "{e}");
}

#[test]
fn missing_swapped_and_foreign_parts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = mixed();
    let out = dir.path().join("s.bundle");
    let s = bundle_format::write(
        &input,
        &out,
        &WriteOptions {
            level: 3,
            split_size: Some(1_500_000),
        },
    )
    .unwrap();
    let p = &s.paths;
    assert!(p.len() >= 3);
    // Missing: found by name from part 0.
    let hidden = dir.path().join("hidden");
    std::fs::rename(&p[2], &hidden).unwrap();
    let e = open_err(std::slice::from_ref(&out));
    assert!(e.contains("part 2 of") && e.contains("s.bundle.002"), "{e}");
    std::fs::rename(&hidden, &p[2]).unwrap();
    // Reordered in an explicit list.
    let mut list = p.clone();
    list.swap(1, 2);
    let e = open_err(&list);
    assert!(
        e.contains("s.bundle.002") && e.contains("expected part 1"),
        "{e}"
    );
    // Swapped files on disk.
    std::fs::rename(&p[1], &hidden).unwrap();
    std::fs::rename(&p[2], &p[1]).unwrap();
    std::fs::rename(&hidden, &p[2]).unwrap();
    let e = open_err(std::slice::from_ref(&out));
    assert!(
        e.contains("s.bundle.001") && e.contains("holds part 2"),
        "{e}"
    );
    // A part of another archive.
    let mut other = mixed();
    other.version = "2.0.0".into();
    let o = dir.path().join("o.bundle");
    let so = bundle_format::write(
        &other,
        &o,
        &WriteOptions {
            level: 3,
            split_size: Some(1_500_000),
        },
    )
    .unwrap();
    let mut list = so.paths.clone();
    list[1] = p[0].clone();
    let e = open_err(&list);
    assert!(e.contains("belongs to archive"), "{e}");
}

#[test]
fn forged_tar_members_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    let pristine = std::fs::read(&out).unwrap();
    let a = Archive::open(&out).unwrap();
    let b = a
        .index()
        .blobs
        .iter()
        .find(|b| b.size == 5)
        .unwrap()
        .clone();
    let mut frame = Vec::new();
    a.decompress_frame(b.first_frame, &mut frame).unwrap();
    drop(a);
    let cases: Vec<(&str, Forge<Vec<u8>>)> = vec![
        (
            "unsafe path \"../../etc/passwd\"",
            Box::new(|f: &mut Vec<u8>| {
                f[..512].copy_from_slice(&tar::header("../../etc/passwd", 5))
            }),
        ),
        (
            "unsafe path \"/etc/passwd\"",
            Box::new(|f: &mut Vec<u8>| f[..512].copy_from_slice(&tar::header("/etc/passwd", 5))),
        ),
        (
            "is a link",
            Box::new(|f: &mut Vec<u8>| {
                let mut h = tar::header(&tar::blob_path(&bundle_format::Digest::of(b"hello")), 5);
                h[156] = b'2';
                f[..512].copy_from_slice(&h);
            }),
        ),
        (
            "size field",
            Box::new(|f: &mut Vec<u8>| {
                f[..512].copy_from_slice(&tar::header(
                    &tar::blob_path(&bundle_format::Digest::of(b"hello")),
                    6,
                ))
            }),
        ),
        ("content hashes to", Box::new(|f: &mut Vec<u8>| f[512] ^= 1)),
        (
            "padding is not zero",
            Box::new(|f: &mut Vec<u8>| f[520] = 7),
        ),
    ];
    for (want, forge) in cases {
        std::fs::write(&out, &pristine).unwrap();
        let mut f = frame.clone();
        forge(&mut f);
        support::forge_frame(&out, b.first_frame, &f);
        let a = Archive::open(&out).unwrap();
        a.verify(false).unwrap(); // frame hashes match the forged index
        let e = a.verify(true).unwrap_err().to_string();
        assert!(e.contains(want), "want {want:?}, got {e}");
        let e = a.extract(&dir.path().join("x")).unwrap_err().to_string();
        assert!(e.contains(want), "extract: want {want:?}, got {e}");
        assert!(
            !dir.path().join("x").exists(),
            "extract left a partial result"
        );
    }
}

#[test]
fn index_rules_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    let a = Archive::open(&out).unwrap();
    let good = a.index().clone();
    let p = Path::new("t");
    let cases: Vec<(&str, Forge<bundle_format::Index>)> = vec![
        ("format", Box::new(|i| i.format = 2)),
        ("chunk", Box::new(|i| i.chunk = 4096)),
        (
            "files[1].path",
            Box::new(|i| i.files[1].path = "../index.json".into()),
        ),
        (
            "blobs[1].digest",
            Box::new(|i| i.blobs[1].digest = i.blobs[0].digest),
        ),
        ("blobs[0].frames", Box::new(|i| i.blobs[0].frames += 1)),
        ("frames[3].dsize", Box::new(|i| i.frames[3].2 += 1)),
        ("frames[4].offset", Box::new(|i| i.frames[4].0 += 1)),
        ("parts[0].size", Box::new(|i| i.parts[0].size += 1)),
        ("images[0].digest", Box::new(|i| i.images[0].size += 1)),
        (
            "frames",
            Box::new(|i| {
                i.frames.pop();
            }),
        ),
        ("csize", Box::new(|i| i.frames[0].1 = 0)),
    ];
    for (field, break_it) in cases {
        let mut ix = good.clone();
        break_it(&mut ix);
        let e = bundle_format::Index::from_cbor(&ix.to_cbor(), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "want {field:?} in {e}");
    }
    // Garbage and unknown fields.
    let e = bundle_format::Index::from_cbor(b"\xff\x00garbage", p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be decoded"), "{e}");
}

#[test]
fn write_refuses_bad_input_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = mixed();
    // A blob whose content does not match its digest.
    input.blobs[3].digest = bundle_format::Digest::of(b"something else");
    let out = dir.path().join("bad.bundle");
    let e = bundle_format::write(&input, &out, &WriteOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::BlobDigest { .. } | Error::MissingManifest { .. }),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temp files left"
    );
    // A split size too small for one frame.
    let e = bundle_format::write(
        &mixed(),
        &out,
        &WriteOptions {
            level: 3,
            split_size: Some(10_000),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temp files left"
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap stand-in for the fuzz target that runs on every `cargo test`.
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    let good = std::fs::read(&out).unwrap();
    let mut state = 7u64;
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..4 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (state >> 33) as usize % b.len();
            b[at] = (state >> 13) as u8;
        }
        if let Ok(a) = Archive::from_bytes(vec![b]) {
            let _ = a.verify(true);
        }
    }
}
