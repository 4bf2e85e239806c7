//! The bench set: its promised structure, at a size small enough for a test.

use bundle_testimages::{Error, MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR, MIN_BENCH_BYTES, bench_set};

use crate::{files, gunzip, peer, sha256};

#[test]
fn tiny_bench_set_has_the_promised_structure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = 20_000_000;
    let set = bench_set(&tmp.path().join("bench"), target).expect("bench set");

    let share = |bytes: u64| bytes as f64 / set.layer_bytes as f64;
    assert!(
        (0.85..1.15).contains(&(set.layer_bytes as f64 / target as f64)),
        "{} bytes of layers for a target of {target}",
        set.layer_bytes
    );

    // Every blob on disk matches its descriptor.
    let blobs = files(&set.layout.join("blobs/sha256"));
    for img in &set.images {
        for d in [&img.manifest, &img.config].into_iter().chain(&img.layers) {
            let bytes = &blobs[std::path::Path::new(d.hex())];
            assert_eq!(
                (sha256(bytes), bytes.len() as u64),
                (d.digest.clone(), d.size)
            );
        }
    }

    // The base layer is shared by at least three images.
    let users = set
        .images
        .iter()
        .filter(|i| i.layers.contains(&set.base_layer))
        .count();
    assert!(users >= 3, "base layer used by {users} images");

    // One image has only uncompressed layers, about 15% of the total; the rest are gzip.
    let plain = set
        .images
        .iter()
        .find(|i| i.name == set.plain_image)
        .expect("plain image");
    assert!(plain.layers.iter().all(|l| l.media_type == MEDIA_LAYER_TAR));
    let plain_bytes: u64 = plain.layers.iter().map(|l| l.size).sum();
    assert!(
        (0.10..0.20).contains(&share(plain_bytes)),
        "plain share {}",
        share(plain_bytes)
    );
    for img in set.images.iter().filter(|i| i.name != set.plain_image) {
        assert!(
            img.layers.iter().all(|l| l.media_type == MEDIA_LAYER_GZIP),
            "{}",
            img.name
        );
    }
    let mut expected_blobs = vec![plain.manifest.layout_path(), plain.config.layout_path()];
    expected_blobs.extend(plain.layers.iter().map(|l| l.layout_path()));
    assert_eq!(set.plain_blobs, expected_blobs);

    // The incompressible layer is about 10% and gzip cannot shrink it.
    let inc = &set.incompressible_layer;
    assert!(
        (0.07..0.13).contains(&share(inc.size)),
        "incompressible share {}",
        share(inc.size)
    );
    let tar = gunzip(&blobs[std::path::Path::new(inc.hex())]);
    assert!(
        inc.size as f64 > tar.len() as f64 * 0.99,
        "{} of {} bytes",
        inc.size,
        tar.len()
    );

    // Both bundle files name what they promise.
    let yaml = std::fs::read_to_string(&set.bundle_yaml).expect("bundle.yaml");
    for img in &set.images {
        assert!(yaml.contains(&format!(
            "  - name: {}\n    source: oci-layout:layout:{}\n",
            img.name, img.tag
        )));
    }
    let plain_yaml = std::fs::read_to_string(&set.bundle_plain_yaml).expect("bundle-plain.yaml");
    assert_eq!(
        plain_yaml,
        format!(
            "name: bench-plain\nversion: 1.0.0\nimages:\n  - name: {}\n    source: oci-layout:layout:{}\n",
            set.plain_image, plain.tag
        )
    );

    // A real peer reads it.
    let reference = format!("oci:{}:{}", set.layout.display(), plain.tag);
    let raw = peer("skopeo", &["inspect", "--raw", &reference]).stdout;
    assert_eq!(sha256(&raw), plain.manifest.digest);

    let again = bench_set(&set.dir, target).expect("again");
    assert!(again.reused);
}

#[test]
fn bench_set_is_deterministic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let one = bench_set(&tmp.path().join("one"), MIN_BENCH_BYTES * 2).expect("one");
    let two = bench_set(&tmp.path().join("two"), MIN_BENCH_BYTES * 2).expect("two");
    assert_eq!(files(&one.layout), files(&two.layout));
}

#[test]
fn a_target_below_the_minimum_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    match bench_set(tmp.path(), MIN_BENCH_BYTES - 1) {
        Err(Error::TooSmall { requested, min }) => {
            assert_eq!((requested, min), (MIN_BENCH_BYTES - 1, MIN_BENCH_BYTES))
        }
        other => panic!("expected TooSmall, got {other:?}"),
    }
}
