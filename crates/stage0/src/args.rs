//! The command line: `stage0 [--fallback-dir DIR] SHA256HEX PART... -- ARG...`.

use core::ops::Range;

/// The synopsis printed with every usage error.
pub const SYNOPSIS: &str = "stage0 [--fallback-dir DIR] SHA256 PART... -- ARG...";

/// A parsed command line. Arguments are named by their index in `argv`, so that the caller
/// keeps its own pointers (and can reuse `argv` from the separator on as the agent's).
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    /// Index of the directory for the fallback file, when given.
    pub fallback_dir: Option<usize>,
    /// The expected sha256 of the parts joined in order.
    pub digest: [u8; 32],
    /// Indices of the part files, never empty.
    pub parts: Range<usize>,
    /// Index of `--`; the agent's arguments follow it.
    pub separator: usize,
}

/// Why a command line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsageError {
    /// `--fallback-dir` without a directory after it.
    NoFallbackDir,
    /// Nothing where the digest should be.
    NoDigest,
    /// The digest is not 64 lowercase hex digits (after an optional `sha256:`).
    BadDigest,
    /// No part file between the digest and `--`.
    NoParts,
    /// No `--` ends the part list.
    NoSeparator,
}

impl UsageError {
    /// What is wrong, in a few words.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoFallbackDir => "--fallback-dir needs a directory",
            Self::NoDigest => "no sha256 given",
            Self::BadDigest => "sha256 must be 64 lowercase hex digits, optionally after sha256:",
            Self::NoParts => "no part given",
            Self::NoSeparator => "no -- after the parts",
        }
    }
}

/// Parses `argv[1..argc]`, `arg(i)` giving `argv[i]` without its NUL.
pub fn parse<'a>(argc: usize, arg: impl Fn(usize) -> &'a [u8]) -> Result<Invocation, UsageError> {
    let mut i = 1;
    let mut fallback_dir = None;
    if i < argc && arg(i) == b"--fallback-dir" {
        if i + 1 >= argc || arg(i + 1).is_empty() {
            return Err(UsageError::NoFallbackDir);
        }
        fallback_dir = Some(i + 1);
        i += 2;
    }
    if i >= argc || arg(i) == b"--" {
        return Err(UsageError::NoDigest);
    }
    let digest = parse_digest(arg(i)).ok_or(UsageError::BadDigest)?;
    i += 1;
    let separator = (i..argc)
        .find(|&j| arg(j) == b"--")
        .ok_or(UsageError::NoSeparator)?;
    if separator == i {
        return Err(UsageError::NoParts);
    }
    Ok(Invocation {
        fallback_dir,
        digest,
        parts: i..separator,
        separator,
    })
}

/// `sha256:HEX` or `HEX`, HEX being 64 lowercase hex digits.
pub fn parse_digest(s: &[u8]) -> Option<[u8; 32]> {
    let hex = s.strip_prefix(b"sha256:").unwrap_or(s);
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn run(line: &[&str]) -> Result<Invocation, UsageError> {
        parse(line.len(), |i| line[i].as_bytes())
    }

    #[test]
    fn command_lines() {
        let sha = parse_digest(HEX.as_bytes()).expect("valid");
        let prefixed = format!("sha256:{HEX}");
        let upper = HEX.to_uppercase();
        let ok = |fallback_dir, parts, separator| {
            Ok(Invocation {
                fallback_dir,
                digest: sha,
                parts,
                separator,
            })
        };
        for (line, want) in [
            (&["s0", HEX, "a", "--"][..], ok(None, 2..3, 3)),
            (
                &["s0", HEX, "a", "b", "c", "--", "version"],
                ok(None, 2..5, 5),
            ),
            (&["s0", &prefixed, "a", "--", "x", "--"], ok(None, 2..3, 3)),
            (
                &["s0", "--fallback-dir", "/d", HEX, "a", "--"],
                ok(Some(2), 4..5, 5),
            ),
            (&["s0"], Err(UsageError::NoDigest)),
            (&["s0", "--", "version"], Err(UsageError::NoDigest)),
            (&["s0", "--fallback-dir"], Err(UsageError::NoFallbackDir)),
            (
                &["s0", "--fallback-dir", "", HEX],
                Err(UsageError::NoFallbackDir),
            ),
            (&["s0", "--fallback-dir", "/d"], Err(UsageError::NoDigest)),
            (&["s0", HEX, "--", "version"], Err(UsageError::NoParts)),
            (&["s0", HEX, "a", "b"], Err(UsageError::NoSeparator)),
            (&["s0", &upper, "a", "--"], Err(UsageError::BadDigest)),
            (&["s0", &HEX[1..], "a", "--"], Err(UsageError::BadDigest)),
            (&["s0", "sha512:00", "a", "--"], Err(UsageError::BadDigest)),
            (&["s0", "a", "--"], Err(UsageError::BadDigest)),
        ] {
            assert_eq!(run(line), want, "{line:?}");
        }
    }

    #[test]
    fn digests() {
        let d = parse_digest(HEX.as_bytes()).expect("valid");
        assert_eq!(&crate::text::hex(&d)[..], HEX.as_bytes());
        let mut bad = HEX.as_bytes().to_vec();
        bad[10] = b'g';
        assert_eq!(parse_digest(&bad), None);
    }
}
