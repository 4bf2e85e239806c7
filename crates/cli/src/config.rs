//! `bundle.yaml`: what a bundle holds.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The parsed `bundle.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// Bundle name.
    pub name: String,
    /// Bundle version.
    pub version: String,
    /// Images, in order.
    #[serde(default)]
    pub images: Vec<ImageConfig>,
}

/// One `images:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The reference the image will carry.
    pub name: String,
    /// Where it comes from: `oci-layout:PATH[:TAG]`, `oci-archive:FILE[:TAG]`,
    /// `docker-archive:FILE[:REF]`. Registry pulls (no `source`) come later.
    pub source: Option<String>,
}

/// `bundle.lock`: the digest each registry image resolved to, so a release can be
/// re-created bit for bit later (`bundle create --locked`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// Always 1.
    pub version: u32,
    /// One entry per image pulled from a registry, in bundle.yaml order.
    #[serde(default)]
    pub images: Vec<LockEntry>,
}

/// One pinned image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    /// The image name from bundle.yaml.
    pub name: String,
    /// The digest its reference resolved to (the whole index, before platform filtering).
    pub digest: String,
}

impl Lock {
    /// The lock file beside `bundle_yaml`.
    pub fn path_for(bundle_yaml: &Path) -> PathBuf {
        bundle_yaml.with_file_name("bundle.lock")
    }

    /// Reads a lock file; a missing one is empty.
    pub fn load(path: &Path) -> Result<Lock> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let lock: Lock =
                    serde_yaml::from_str(&text).with_context(|| format!("{}", path.display()))?;
                if lock.version != 1 {
                    bail!(
                        "{}: version {} is not supported (1 is)",
                        path.display(),
                        lock.version
                    );
                }
                Ok(lock)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lock {
                version: 1,
                images: Vec::new(),
            }),
            Err(e) => Err(e).with_context(|| format!("{}", path.display())),
        }
    }

    /// The pinned digest of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.images
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.digest.as_str())
    }

    /// Writes the lock through a temp file and rename, unless it is unchanged on disk.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::from(
            "# Written by `bundle create`: the digest each registry image resolved to.\n# `bundle create --locked` pulls exactly these.\n",
        );
        text.push_str(&serde_yaml::to_string(self)?);
        if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
            return Ok(());
        }
        bundle_format::read::write_atomic(path, text.as_bytes())?;
        Ok(())
    }
}

/// A config file and the directory its relative paths are relative to.
pub struct Loaded {
    /// The parsed file.
    pub config: BundleConfig,
    /// Its directory.
    pub base: PathBuf,
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let config: BundleConfig =
        serde_yaml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    if config.name.trim().is_empty() {
        bail!("{}: field `name` is empty", path.display());
    }
    if config.version.trim().is_empty() {
        bail!("{}: field `version` is empty", path.display());
    }
    if config.images.is_empty() {
        bail!("{}: field `images` lists no image", path.display());
    }
    for (i, img) in config.images.iter().enumerate() {
        if img.name.trim().is_empty() {
            bail!("{}: images[{i}].name is empty", path.display());
        }
        if let Some(j) = config.images[..i].iter().position(|o| o.name == img.name) {
            bail!(
                "{}: images[{i}].name {:?} is the same as images[{j}].name",
                path.display(),
                img.name
            );
        }
    }
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    Ok(Loaded { config, base })
}

/// Parses sizes like `4GiB`, `700MiB`, `1.5G`, `1000000`: binary suffixes (K, KiB, M, MiB,
/// G, GiB, T, TiB) are powers of 1024; KB, MB, GB, TB are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 4GiB, 700MiB, 1000000)"))?;
    let v = (n * mult).floor();
    if !(1.0..=1.8e19).contains(&v) {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(v as u64)
}

/// The creation time: RFC 3339 UTC from `SOURCE_DATE_EPOCH`, or none.
pub fn created_from_env() -> Result<Option<String>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => {
            let secs: i64 = v.trim().parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH={v:?} is not a whole number of seconds")
            })?;
            Ok(Some(rfc3339(secs)))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("SOURCE_DATE_EPOCH: {e}"),
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sizes() {
        for (s, v) in [
            ("4GiB", 4u64 << 30),
            ("4G", 4 << 30),
            ("700MiB", 700 << 20),
            ("1.5KiB", 1536),
            ("1000000", 1_000_000),
            ("2GB", 2_000_000_000),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for s in ["", "G", "4XB", "-1", "0"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        // Past year 9999 and before year 0 the output is no longer RFC 3339, but still exact.
        assert_eq!(rfc3339(253_402_300_800), "10000-01-01T00:00:00Z");
        for secs in [i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1] {
            assert_eq!(seconds_of(&rfc3339(secs)), Some(i128::from(secs)), "{secs}");
        }
    }

    /// Days from 1970-01-01 to a proleptic Gregorian date (Hinnant's days_from_civil), in
    /// i128 so that no year can overflow it.
    fn days_from_civil(y: i128, m: i128, d: i128) -> i128 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Reads back what [`rfc3339`] writes: `[-]Y{4,}-MM-DDTHH:MM:SSZ`, each field in range.
    fn seconds_of(s: &str) -> Option<i128> {
        let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
        let (sign, date) = match date.strip_prefix('-') {
            Some(rest) => (-1, rest),
            None => (1, date),
        };
        let [y, m, d]: [&str; 3] = date.split('-').collect::<Vec<_>>().try_into().ok()?;
        let [hh, mm, ss]: [&str; 3] = time.split(':').collect::<Vec<_>>().try_into().ok()?;
        let two = |f: &str, max: i128| -> Option<i128> {
            let v: i128 = f.parse().ok()?;
            (f.len() == 2 && f.bytes().all(|b| b.is_ascii_digit()) && v <= max).then_some(v)
        };
        if y.len() < 4 || !y.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (m, d) = (two(m, 12)?, two(d, 31)?);
        if m == 0 || d == 0 {
            return None;
        }
        let y = sign * y.parse::<i128>().ok()?;
        let days = days_from_civil(y, m, d);
        // The day must exist: the next date's day count is one more unless the month ends.
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        if days >= days_from_civil(ny, nm, 1) {
            return None;
        }
        Some(days * 86_400 + two(hh, 23)? * 3600 + two(mm, 59)? * 60 + two(ss, 59)?)
    }

    fn size_text() -> impl Strategy<Value = String> {
        let unit = prop::sample::select(vec![
            "", "b", "B", "k", "K", "KiB", "kib", "KB", "m", "MiB", "MB", "g", "G", "GiB", "GB",
            "t", "TiB", "TB", "tb", "PiB", "e", "e5", "i", " ", "\u{e9}", "\u{0}",
        ]);
        let number = prop_oneof![
            "[0-9]{0,25}",
            "[0-9.]{0,25}",
            "[0-9]{1,400}",
            prop::sample::select(vec!["nan", "inf", "-1", "+1", "1e3", "0.0", ".5", "1."])
                .prop_map(str::to_owned),
        ];
        (" {0,2}", number, " {0,2}", unit, " {0,2}")
            .prop_map(|(a, n, b, u, c)| format!("{a}{n}{b}{u}{c}"))
    }

    fn yaml_text() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "name: ",
            "version: ",
            "images:",
            "\n",
            "\n  - ",
            "  ",
            "name: a",
            "source: ",
            "oci-layout:x",
            "&a ",
            "*a",
            "&b ",
            "*b",
            "<<: *a",
            "[",
            "]",
            "{",
            "}",
            ",",
            "!!binary ",
            "!!str ",
            "!custom ",
            "? ",
            ": ",
            "- ",
            "'",
            "\"",
            "---",
            "...",
            "%YAML 1.2",
            "%TAG ! tag:x,2000:",
            "\t",
            "# c",
            "~",
            "null",
            "1e999",
            "0x1F",
            "|",
            ">",
            "\u{feff}",
            "\u{0}",
            "\u{85}",
            "\r",
            "é",
            "extra: 1",
        ]);
        prop_oneof![
            any::<String>(),
            prop::collection::vec(piece, 0..24).prop_map(|p| p.concat()),
            (1usize..3000).prop_map(|n| format!("name: {}", "[".repeat(n))),
            (1usize..1000).prop_map(|n| {
                let mut s = "name: a\nversion: b\nimages:\n".to_owned();
                for i in 0..n {
                    s.push_str(&" ".repeat(i + 1));
                    s.push_str("- \n");
                }
                s
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn parse_size_never_panics(s in prop_oneof![any::<String>(), size_text()]) {
            match parse_size(&s) {
                Ok(v) => prop_assert!(v >= 1, "{s:?} gave {v}"),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }

        #[test]
        fn plain_and_binary_sizes_are_exact(n in 1u64..(1 << 40)) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
            prop_assert_eq!(parse_size(&format!("{n}B")), Ok(n));
            prop_assert_eq!(parse_size(&format!("{n} KiB")), Ok(n << 10));
        }

        /// Every i64 prints without overflow and reads back to itself.
        #[test]
        fn rfc3339_covers_all_of_i64(secs in any::<i64>()) {
            let s = rfc3339(secs);
            prop_assert_eq!(seconds_of(&s), Some(i128::from(secs)), "{}", s);
        }

        /// Years 0 to 9999 give RFC 3339 exactly: 20 characters, fixed positions.
        #[test]
        fn rfc3339_in_range_is_rfc3339(secs in -62_167_219_200i64..=253_402_300_799) {
            let s = rfc3339(secs);
            let b = s.as_bytes();
            prop_assert_eq!(b.len(), 20, "{}", s);
            for (i, c) in b.iter().enumerate() {
                let want_digit = !matches!(i, 4 | 7 | 10 | 13 | 16 | 19);
                prop_assert_eq!(c.is_ascii_digit(), want_digit, "{}", s);
            }
            prop_assert_eq!(&s[4..5], "-");
            prop_assert_eq!(&s[10..11], "T");
            prop_assert_eq!(&s[19..], "Z");
        }

        #[test]
        fn bundle_yaml_never_panics(text in yaml_text()) {
            let _ = serde_yaml::from_str::<BundleConfig>(&text);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bundle.yaml");
            std::fs::write(&path, &text).unwrap();
            if let Err(e) = load(&path) {
                prop_assert!(format!("{e:#}").contains("bundle.yaml"), "{e:#}");
            }
        }
    }
}
