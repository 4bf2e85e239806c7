//! `cargo xtask quickstart`: the README's first five minutes, run for real. Builds `bundle`,
//! makes the small test images, and creates, verifies, inspects and extracts a demo archive,
//! echoing every command. Needs no network and no cluster.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{self, cargo, root};

pub fn run(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("quickstart takes no arguments, got {a:?}");
    }
    let root = root();
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "bundle-cli",
        "-p",
        "bundle-testimages",
    ]))?;

    let out = root.join("quickstart-out");
    for old in ["demo.bundle", "extracted"] {
        util::remove(&out.join(old))?;
    }
    // Relative paths, so that the echoed commands read as a user would type them.
    let bundle = || {
        let mut c = Command::new("target/release/bundle");
        c.current_dir(&root);
        c
    };
    let mut images = Command::new("target/release/bundle-testimages");
    images
        .current_dir(&root)
        .args(["small", "quickstart-out/images"]);
    util::run(&mut images)?;
    util::run(bundle().args([
        "create",
        "quickstart-out/images/bundle.yaml",
        "-o",
        "quickstart-out/demo.bundle",
    ]))?;
    util::run(bundle().args(["verify", "quickstart-out/demo.bundle"]))?;
    util::run(bundle().args(["inspect", "quickstart-out/demo.bundle"]))?;
    util::run(bundle().args([
        "extract",
        "quickstart-out/demo.bundle",
        "quickstart-out/extracted",
    ]))?;
    println!(
        "\nquickstart done: archive quickstart-out/demo.bundle ({} bytes), OCI layout in quickstart-out/extracted",
        util::disk_bytes(&out.join("demo.bundle"))
    );
    Ok(())
}
