//! `cargo xtask quickstart`: the README's first five minutes, run for real. Builds `bundle`
//! and the static agent (as `cargo xtask static` does; the demo archive carries it as its
//! agent image), makes the small test images, creates, verifies, inspects and extracts a demo
//! archive, then serves it as a registry on 127.0.0.1 and pulls an image back from it with
//! `bundle create`, echoing every command. Needs no network beyond loopback and no cluster.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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
    // Into target/agent, where target/release/bundle looks (`<exe dir>/../agent`): the demo
    // archive carries the agent image, as every archive meant for `bundle deploy` does.
    crate::statics::build(&root)?;

    let out = root.join("quickstart-out");
    for old in ["demo.bundle", "extracted", "pull", "pulled.bundle"] {
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
    let pulled = serve_and_pull_back(&root, bundle)?;
    println!(
        "\nquickstart done: archive quickstart-out/demo.bundle ({} bytes), OCI layout in quickstart-out/extracted,\n\
         served on 127.0.0.1 and pulled back into quickstart-out/pulled.bundle: {pulled}",
        util::disk_bytes(&out.join("demo.bundle"))
    );
    Ok(())
}

/// The last step: `bundle serve` the demo archive, pull one image back from it through the
/// registry API (our own client, via `bundle create` from a registry reference) and check
/// that its digest is the one in the archive.
fn serve_and_pull_back(root: &std::path::Path, bundle: impl Fn() -> Command) -> Result<String> {
    let mut serve = bundle();
    serve
        .args([
            "serve",
            "quickstart-out/demo.bundle",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped());
    eprintln!("+ {} &", util::show(&serve));
    let mut child = serve.spawn()?;
    let result = (|| -> Result<String> {
        let Some(stdout) = child.stdout.take() else {
            bail!("bundle serve: no stdout");
        };
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        println!("{first}");
        let Some(addr) = first
            .split("http://")
            .nth(1)
            .and_then(|r| r.strip_suffix("/v2/"))
            .map(str::to_owned)
        else {
            bail!("bundle serve printed {first:?}, expected its address");
        };
        // Keep draining what serve prints so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(|l| println!("{}", l.unwrap_or_default())));
        let dir = root.join("quickstart-out/pull");
        std::fs::create_dir_all(&dir)?;
        let image = format!("{addr}/team/app:1.0");
        std::fs::write(
            dir.join("bundle.yaml"),
            format!("name: pulled\nversion: 1.0.0\nimages:\n  - name: {image}\n"),
        )?;
        util::run(bundle().args([
            "create",
            "quickstart-out/pull/bundle.yaml",
            "-o",
            "quickstart-out/pulled.bundle",
            "--insecure-registry",
            &addr,
            "--cache",
            "quickstart-out/pull/cache",
        ]))?;
        let digest = |archive: &str, name: &str| -> Result<String> {
            let out = bundle().args(["inspect", "--json", archive]).output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            v["images"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["name"] == name))
                .and_then(|i| i["digest"].as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("{archive} has no image {name}"))
        };
        let want = digest(
            "quickstart-out/demo.bundle",
            "registry.example/team/app:1.0",
        )?;
        let got = digest("quickstart-out/pulled.bundle", &image)?;
        if want != got {
            bail!("pulled {image} as {got}, the archive holds {want}");
        }
        Ok(format!("{image} is {got}, as in the archive"))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
