//! `cargo xtask static`: builds the two binaries that run inside the cluster, the static
//! `bundle-agent` and the `stage0` loader, and checks that they are static and within their
//! size budgets, then copies both into `target/agent/`, where `bundle create` finds them
//! (`<dir of bundle>/../agent`) to build the agent image every archive carries. `ci` runs it
//! before the tests, which use both binaries.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util;

/// The target both binaries are built for. Naming it explicitly keeps build scripts and
/// proc-macros (built for the host) dynamic while `+crt-static` applies to the agent.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// stage0 travels in one ConfigMap beside the agent's parts; 64 KiB keeps it far below the
/// 1 MiB object limit and makes growth visible.
pub const STAGE0_BUDGET: u64 = 64 * 1024;

/// The agent travels as ConfigMap parts; its size is what every seeding pays first.
pub const AGENT_BUDGET: u64 = 8 * 1024 * 1024;

/// Where the built binaries are.
#[derive(Debug, Clone)]
pub struct Statics {
    /// The static `bundle-agent` (`min-size` profile).
    pub agent: PathBuf,
    /// The `stage0` loader (its own workspace's release profile).
    pub stage0: PathBuf,
    /// `target/agent`: copies of both, as `bundle-agent` and `stage0`.
    pub dir: PathBuf,
}

/// `target/agent`: the agent directory `bundle create` looks for beside `target/*/bundle`
/// (the names in it are `bundle_layout::agent::{AGENT_FILE, STAGE0_FILE}`; xtask depends on
/// no workspace crate, so they are repeated here).
pub fn agent_dir(root: &Path) -> PathBuf {
    root.join("target/agent")
}

/// `target/x86_64-unknown-linux-gnu/min-size/bundle-agent`
pub fn agent_path(root: &Path) -> PathBuf {
    root.join("target")
        .join(TARGET)
        .join("min-size")
        .join("bundle-agent")
}

/// `target/stage0/release/stage0`
pub fn stage0_path(root: &Path) -> PathBuf {
    root.join("target/stage0/release/stage0")
}

/// `cargo xtask static`.
pub fn run(root: &Path) -> Result<()> {
    let built = build(root)?;
    println!("agent:  {}", built.agent.display());
    println!("stage0: {}", built.stage0.display());
    println!("agent directory for bundle create: {}", built.dir.display());
    Ok(())
}

/// Builds both binaries, then checks that each is static and within its budget.
pub fn build(root: &Path) -> Result<Statics> {
    let target_dir = root.join("target");
    let mut agent = util::cargo();
    agent
        .args(["build", "-p", "bundle-agent", "--profile", "min-size"])
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        // A whole-string RUSTFLAGS: the outer environment's flags would change the binary
        // (and the encoded form would take precedence over it).
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    util::run(&mut agent)?;

    // Its own workspace: see crates/stage0/README.md. Its link arguments come from its
    // build.rs, so no flag is needed here and a plain `cargo build --release` there agrees.
    let mut stage0 = util::cargo();
    stage0
        .args(["build", "--release", "--manifest-path"])
        .arg(root.join("crates/stage0/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir.join("stage0"));
    util::run(&mut stage0)?;
    check_stage0_has_no_dependencies(root)?;

    let built = Statics {
        agent: agent_path(root),
        stage0: stage0_path(root),
        dir: agent_dir(root),
    };
    check(&built.stage0, "stage0", STAGE0_BUDGET, true)?;
    check(&built.agent, "bundle-agent", AGENT_BUDGET, false)?;
    std::fs::create_dir_all(&built.dir)
        .with_context(|| format!("creating {}", built.dir.display()))?;
    install(&built.agent, &built.dir.join("bundle-agent"))?;
    install(&built.stage0, &built.dir.join("stage0"))?;
    Ok(built)
}

/// Copies `from` to `to` with mode 0755 through a temp file renamed into place, so that a
/// `bundle create` running meanwhile reads the old binary or the new one, never half of one.
fn install(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let copied = std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&tmp, to));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("copying {} to {}", from.display(), to.display()));
    }
    Ok(())
}

/// Checks that `path` is a static ELF (no `PT_INTERP`, no `DT_NEEDED`) within `budget`
/// bytes; with `fixed_address`, also that it needs no relocation at all (`ET_EXEC` without
/// `PT_DYNAMIC`), because stage0 has no code to relocate itself.
fn check(path: &Path, name: &str, budget: u64, fixed_address: bool) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let size = bytes.len() as u64;
    println!(
        "{name}: {} bytes (budget {})",
        thousands(size),
        thousands(budget)
    );
    let elf =
        Elf::parse(&bytes).with_context(|| format!("{}: not a usable ELF", path.display()))?;
    if elf.interp {
        bail!(
            "{name} ({}) is dynamically linked: it has a PT_INTERP segment",
            path.display()
        );
    }
    if elf.needed > 0 {
        bail!(
            "{name} ({}) needs {} shared libraries (DT_NEEDED)",
            path.display(),
            elf.needed
        );
    }
    if fixed_address && (!elf.exec || elf.dynamic) {
        bail!(
            "{name} ({}) is position-independent (ET_DYN or PT_DYNAMIC) but has no code to \
             relocate itself; see crates/stage0/build.rs",
            path.display()
        );
    }
    if size > budget {
        bail!(
            "{name} ({}) is {} bytes, over its budget of {} bytes",
            path.display(),
            thousands(size),
            thousands(budget)
        );
    }
    Ok(())
}

/// ARCHITECTURE.md: "stage0 has no dependencies". Its lock file lists itself only.
fn check_stage0_has_no_dependencies(root: &Path) -> Result<()> {
    let lock = root.join("crates/stage0/Cargo.lock");
    let text =
        std::fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let packages = text.lines().filter(|l| l.trim() == "[[package]]").count();
    if packages != 1 {
        bail!(
            "{} lists {packages} packages: stage0 must have no dependencies",
            lock.display()
        );
    }
    Ok(())
}

/// What the static checks need from an ELF file's headers.
#[derive(Debug, Default, PartialEq, Eq)]
struct Elf {
    /// `ET_EXEC`: linked at a fixed address.
    exec: bool,
    /// Has a `PT_INTERP` segment: the kernel would start a dynamic loader.
    interp: bool,
    /// Has a `PT_DYNAMIC` segment (static-pie binaries do, to relocate themselves).
    dynamic: bool,
    /// `DT_NEEDED` entries in it: shared libraries to load.
    needed: usize,
}

impl Elf {
    /// Reads the ELF header and program headers of a 64-bit little-endian file.
    fn parse(b: &[u8]) -> Result<Elf> {
        const PT_DYNAMIC: u32 = 2;
        const PT_INTERP: u32 = 3;
        const ET_EXEC: u16 = 2;
        const DT_NEEDED: u64 = 1;
        if b.get(..4) != Some(b"\x7fELF") {
            bail!("no ELF magic");
        }
        if b.get(4..6) != Some(&[2, 1]) {
            bail!("not a 64-bit little-endian ELF");
        }
        let mut elf = Elf {
            exec: u16_at(b, 16)? == ET_EXEC,
            ..Elf::default()
        };
        let phoff = usize::try_from(u64_at(b, 32)?)?;
        let phentsize = usize::from(u16_at(b, 54)?);
        let phnum = usize::from(u16_at(b, 56)?);
        if phentsize < 56 {
            bail!("program header entries of {phentsize} bytes");
        }
        phnum
            .checked_mul(phentsize)
            .and_then(|len| phoff.checked_add(len))
            .and_then(|end| b.get(phoff..end))
            .context("program headers past the file end")?;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            match u32_at(b, ph)? {
                PT_INTERP => elf.interp = true,
                PT_DYNAMIC => {
                    elf.dynamic = true;
                    let start = usize::try_from(u64_at(b, ph + 8)?)?;
                    let len = usize::try_from(u64_at(b, ph + 32)?)?;
                    let end = start.checked_add(len).context("PT_DYNAMIC out of range")?;
                    let table = b.get(start..end).context("PT_DYNAMIC past the file end")?;
                    for entry in table.chunks_exact(16) {
                        match u64_at(entry, 0)? {
                            0 => break,
                            DT_NEEDED => elf.needed += 1,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(elf)
    }
}

fn field<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .with_context(|| format!("truncated at byte {at}"))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    field(b, at).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    field(b, at).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    field(b, at).map(u64::from_le_bytes)
}

/// `12345` as `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with the given type and program headers (type, offset, size);
    /// `dynamic` is appended as the PT_DYNAMIC table.
    fn elf(e_type: u16, phdrs: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(p_type, offset, size) in phdrs {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b.extend_from_slice(tail);
        b
    }

    fn dynamic_table(tags: &[u64]) -> Vec<u8> {
        tags.iter()
            .flat_map(|t| [t.to_le_bytes(), 0u64.to_le_bytes()].concat())
            .collect()
    }

    #[test]
    fn elf_headers() {
        let table = dynamic_table(&[1, 1, 7, 0, 1]);
        let off = 64 + 2 * 56;
        let cases = [
            (
                elf(2, &[(1, 0, 0)], &[]),
                Elf {
                    exec: true,
                    ..Elf::default()
                },
            ),
            (
                elf(3, &[(3, 0, 0), (2, off, table.len() as u64)], &table),
                Elf {
                    exec: false,
                    interp: true,
                    dynamic: true,
                    needed: 2,
                },
            ),
            (
                elf(3, &[(1, 0, 0), (2, off, 16)], &dynamic_table(&[0])),
                Elf {
                    exec: false,
                    interp: false,
                    dynamic: true,
                    needed: 0,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Elf::parse(&bytes).expect("parses"), want);
        }
        for (i, bad) in [
            b"\x7fELG".to_vec(),
            elf(2, &[(2, 1 << 40, 16)], &[]),
            elf(2, &[(1, 0, 0)], &[])[..100].to_vec(),
        ]
        .iter()
        .enumerate()
        {
            assert!(Elf::parse(bad).is_err(), "bad case {i}");
        }
    }

    #[test]
    fn a_dynamic_system_binary_is_seen_as_such() {
        // Debian's coreutils are dynamically linked.
        let bytes = std::fs::read("/bin/ls").expect("/bin/ls");
        let elf = Elf::parse(&bytes).expect("parses");
        assert!(elf.interp && elf.needed > 0, "{elf:?}");
    }

    #[test]
    fn thousands_separators() {
        for (n, want) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (65536, "65,536"),
            (8388608, "8,388,608"),
        ] {
            assert_eq!(thousands(n), want);
        }
    }
}
