//! Write-then-read round trips, splitting and reproducibility.

use std::io::Read;

use bundle_format::{Archive, Content, Digest, WriteOptions};
use proptest::prelude::*;

use crate::support::{self, mixed};

fn sha_file(path: &std::path::Path) -> Digest {
    Digest::of(&std::fs::read(path).unwrap())
}

#[test]
fn every_blob_reads_back_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let input = mixed();
    let out = support::write(dir.path(), "a.bundle", &input, None);
    let a = Archive::open(&out).unwrap();
    for b in &input.blobs {
        let mut r = a.blob(&b.digest).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let bundle_format::Content::Bytes(want) = &b.content else {
            unreachable!()
        };
        assert_eq!(&got[..], &want[..], "{}", b.digest);
    }
    let fast = a.verify(false).unwrap();
    let deep = a.verify(true).unwrap();
    assert_eq!(fast.frames, a.index().frames.len() as u64);
    assert_eq!(deep.frames, fast.frames);
    assert_eq!(deep.blobs, a.index().blobs.len() as u64);
    // Every frame is within the ConfigMap budget and starts at a member boundary.
    for f in &a.index().frames {
        assert!(f.dsize() <= bundle_format::CHUNK);
        assert!(f.csize() <= bundle_format::MAX_FRAME_COMPRESSED);
    }
}

#[test]
fn stock_zstd_and_tar_read_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::write(dir.path(), "a.bundle", &mixed(), None);
    // The Rust zstd decoder, like `zstd -d`, skips the index frame and yields the tar.
    let mut tar_bytes = Vec::new();
    zstd::stream::read::Decoder::new(std::fs::File::open(&out).unwrap())
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let a = Archive::open(&out).unwrap();
    assert_eq!(tar_bytes.len() as u64, a.index().tar_size());
    assert_eq!(tar_bytes.len() % 512, 0);
}

#[test]
fn same_input_same_bytes_with_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let input = mixed();
    let mut digests = Vec::new();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let name = format!("t{threads}.bundle");
        let out = pool.install(|| support::write(dir.path(), &name, &input, None));
        digests.push(sha_file(&out));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
}

#[test]
fn identical_blobs_give_identical_frames_in_different_archives() {
    let dir = tempfile::tempdir().unwrap();
    let shared = support::noise(9, 2_500_000);
    let a = support::write(
        dir.path(),
        "a.bundle",
        &support::input(vec![shared.clone(), b"x".to_vec()]),
        None,
    );
    let b = support::write(
        dir.path(),
        "b.bundle",
        &support::input(vec![b"yy".to_vec(), shared.clone()]),
        None,
    );
    let (a, b) = (Archive::open(&a).unwrap(), Archive::open(&b).unwrap());
    let d = Digest::of(&shared);
    let (ea, eb) = (a.index().blob(&d).unwrap(), b.index().blob(&d).unwrap());
    assert_eq!(ea.frames, eb.frames);
    for k in 0..ea.frames {
        assert_eq!(
            a.frame(ea.first_frame + k).unwrap(),
            b.frame(eb.first_frame + k).unwrap()
        );
    }
}

#[test]
fn split_parts_read_as_one_and_verify_alone() {
    let dir = tempfile::tempdir().unwrap();
    let input = mixed();
    let whole = support::write(dir.path(), "w.bundle", &input, None);
    let split = 1_500_000;
    let out = dir.path().join("s.bundle");
    let summary = bundle_format::write(
        &input,
        &out,
        &WriteOptions {
            level: 3,
            split_size: Some(split),
        },
    )
    .unwrap();
    assert!(summary.paths.len() >= 3, "{:?}", summary.paths);
    for p in &summary.paths {
        assert!(
            std::fs::metadata(p).unwrap().len() <= split,
            "{}",
            p.display()
        );
        assert!(p.to_str().unwrap().ends_with(&format!(
            ".{:03}",
            summary.paths.iter().position(|q| q == p).unwrap()
        )));
    }
    // Open by base name, by any part, and by the explicit list.
    let by_base = Archive::open(&out).unwrap();
    let by_part = Archive::open(&summary.paths[1]).unwrap();
    let by_list = Archive::open_parts(&summary.paths).unwrap();
    by_base.verify(true).unwrap();
    assert_eq!(by_base.id(), by_part.id());
    assert_eq!(by_base.id(), by_list.id());
    // The split archive holds the same blobs as the whole one.
    let w = Archive::open(&whole).unwrap();
    for b in &w.index().blobs {
        assert_eq!(
            by_base.read_blob(&b.digest).unwrap(),
            w.read_blob(&b.digest).unwrap()
        );
    }
    for (i, p) in summary.paths.iter().enumerate() {
        let r = Archive::open_part(p).unwrap().verify(false).unwrap();
        assert_eq!(r.parts, vec![i as u32]);
        assert_eq!(r.frames, u64::from(by_base.index().parts[i].frames));
    }
    // cat of the parts is still one zstd stream of the same tar.
    let mut cat = Vec::new();
    for p in &summary.paths {
        cat.extend(std::fs::read(p).unwrap());
    }
    let mut tar_bytes = Vec::new();
    zstd::stream::read::Decoder::new(&cat[..])
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(tar_bytes.len() as u64, by_base.index().tar_size());
}

#[test]
fn extract_writes_a_layout() {
    let dir = tempfile::tempdir().unwrap();
    let input = mixed();
    let out = support::write(dir.path(), "a.bundle", &input, None);
    let a = Archive::open(&out).unwrap();
    let target = dir.path().join("x");
    a.extract(&target).unwrap();
    for b in &input.blobs {
        let got = std::fs::read(target.join("blobs/sha256").join(b.digest.hex())).unwrap();
        assert_eq!(Digest::of(&got), b.digest);
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "registry.example/test/app:1.0"
    );
    // A second extract into the now non-empty directory is refused, and leaves it alone.
    let err = a.extract(&target).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_blobs_round_trip(
        sizes in proptest::collection::vec(0usize..2_200_000, 0..5),
        seed in any::<u64>(),
        split in proptest::option::of(1_200_000u64..4_000_000),
    ) {
        let blobs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| if i % 2 == 0 { support::noise(seed ^ i as u64, n) } else { vec![i as u8; n] })
            .collect();
        let input = support::input(blobs);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.bundle");
        bundle_format::write(&input, &out, &WriteOptions { level: 1, split_size: split }).unwrap();
        let a = Archive::open(&out).unwrap();
        a.verify(true).unwrap();
        for b in &input.blobs {
            let bundle_format::Content::Bytes(want) = &b.content else { unreachable!() };
            prop_assert_eq!(&a.read_blob(&b.digest).unwrap()[..], &want[..]);
        }
        // The index survives its own encoding.
        let again = bundle_format::Index::from_cbor(&a.index().to_cbor(), std::path::Path::new("x")).unwrap();
        prop_assert_eq!(&again, a.index());
    }
}

#[test]
fn blob_reads_resume_at_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let input = mixed();
    let out = support::write(dir.path(), "a.bundle", &input, None);
    let a = Archive::open(&out).unwrap();
    for b in &input.blobs {
        let bundle_format::Content::Bytes(want) = &b.content else {
            unreachable!()
        };
        let chunk = u64::from(bundle_format::CHUNK);
        for off in [
            0,
            1,
            511,
            512,
            chunk - 513,
            chunk - 512,
            chunk - 511,
            chunk,
            2 * chunk + 5,
            b.size,
        ] {
            if off > b.size {
                continue;
            }
            let mut got = Vec::new();
            a.blob_from(&b.digest, off)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(&got[..], &want[off as usize..], "{} at {off}", b.digest);
        }
        assert!(a.blob_from(&b.digest, b.size + 1).is_err());
    }
}

/// Blobs read from files (at odd offsets, as members of a tar archive are) are mapped frame by
/// frame; the archive is byte for byte the one made from the same blobs in memory.
#[test]
fn blobs_in_files_and_in_memory_give_the_same_archive() {
    let dir = tempfile::tempdir().unwrap();
    let in_memory = support::mixed();
    let mut from_files = in_memory.clone();
    let store = dir.path().join("blobs.bin");
    let mut all = vec![7u8; 3];
    for b in &mut from_files.blobs {
        let Content::Bytes(bytes) = &b.content else {
            unreachable!()
        };
        let offset = all.len() as u64;
        all.extend_from_slice(bytes);
        all.extend_from_slice(&[1, 2, 3, 4, 5]);
        b.content = Content::File {
            path: store.clone(),
            offset,
        };
    }
    std::fs::write(&store, &all).unwrap();
    let a = support::write(dir.path(), "mem.bundle", &in_memory, None);
    let b = support::write(dir.path(), "files.bundle", &from_files, None);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    Archive::open(&b).unwrap().verify(true).unwrap();
    // A file shorter than the blob it should hold is named, and nothing is left behind.
    let cut = all.len() - 200_000;
    std::fs::write(&store, &all[..cut]).unwrap();
    let out = dir.path().join("short.bundle");
    let e = bundle_format::write(&from_files, &out, &WriteOptions::default()).unwrap_err();
    assert!(e.to_string().contains("blobs.bin"), "{e}");
    assert!(!out.exists());
    // A changed byte deep inside a multi-frame blob (a mapped frame) is caught and placed.
    all[3
        + in_memory
            .blobs
            .iter()
            .take(4)
            .map(|b| b.size as usize + 5)
            .sum::<usize>()
        + 2 * bundle_format::CHUNK as usize] ^= 1;
    std::fs::write(&store, &all).unwrap();
    let e = bundle_format::write(&from_files, &out, &WriteOptions::default()).unwrap_err();
    assert!(
        matches!(&e, bundle_format::Error::BlobDigest { place, .. } if place.contains("blobs.bin")),
        "{e}"
    );
    assert!(!out.exists());
}
