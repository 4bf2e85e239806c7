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
    }
}
