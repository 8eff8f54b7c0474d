//! Running the real `ferry-dump` binary and comparing its output with golden files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// What one run of `ferry-dump` produced.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `ferry-dump ARGS` in `dir` (so file names in its output are relative and stable).
pub fn ferry_dump(dir: &Path, args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_ferry-dump"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run ferry-dump");
    Out {
        code: o.status.code().expect("ferry-dump exited by a signal"),
        stdout: String::from_utf8(o.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(o.stderr).expect("stderr is UTF-8"),
    }
}

/// `tools/tests/data/`: small streams captured once from real `ferry` runs.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ferry-dump-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compare `actual` with `tools/tests/golden/NAME` exactly; `FERRY_BLESS=1` rewrites it.
pub fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("FERRY_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} unreadable ({e}); run with FERRY_BLESS=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        let (e, a): (Vec<_>, Vec<_>) = (expected.lines().collect(), actual.lines().collect());
        let first = (0..e.len().max(a.len()))
            .find(|&i| e.get(i) != a.get(i))
            .unwrap_or(0);
        panic!(
            "output differs from golden file {} at line {}:\n  expected: {:?}\n  actual:   {:?}\n(run with FERRY_BLESS=1 to accept the new output)\n--- actual output ---\n{actual}",
            path.display(),
            first + 1,
            e.get(first),
            a.get(first)
        );
    }
}
