//! Link arguments of the `stage0` binary: a static, non-PIE executable with its own `_start`
//! and no C library.
//!
//! Why here and not `-C relocation-model=static`: stable cargo cannot set a codegen option
//! from a manifest or a build script (only `RUSTFLAGS` or a `.cargo/config.toml`, and the
//! latter is found from the current directory, not from `--manifest-path`). So rustc compiles
//! position-independent code, as it does by default, and the link below turns it into an
//! `ET_EXEC` at a fixed address: `-no-pie` cancels the `-pie` rustc passes, and with
//! `-static` the linker resolves every GOT and PC-relative reference itself, leaving no
//! dynamic relocation (stage0 has no code to apply any). `cargo xtask static` checks the
//! result: `ET_EXEC`, no `PT_INTERP`, no `PT_DYNAMIC`.

fn main() {
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
