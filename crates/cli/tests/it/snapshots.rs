//! The command line's help text, pinned. `UPDATE_SNAPSHOTS=1 cargo test` rewrites the files.

use std::path::PathBuf;

use crate::support::{self, ok};

fn check(name: &str, args: &[&str]) {
    let mut c = support::bundle();
    c.args(args);
    let got = ok(c);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        got,
        want,
        "{} differs; rerun with UPDATE_SNAPSHOTS=1 if intended",
        path.display()
    );
}

#[test]
fn help_texts() {
    check("help.txt", &["--help"]);
    for sub in [
        "create", "verify", "inspect", "extract", "push", "deploy", "remove",
    ] {
        check(&format!("help-{sub}.txt"), &[sub, "--help"]);
    }
}
