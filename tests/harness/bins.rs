//! Finding the binaries the suites run. Cargo gives `CARGO_BIN_EXE_*` only to a package's own
//! tests, so they are taken from the target directory this test binary was built into and
//! built there (`cargo build -p PACKAGE ...`) when missing or older than the sources.
//! `FERRY_BIN`, `FERRY_DUMP_BIN` and `FERRY_QMP_DEMO_BIN` name a binary to use instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// The `ferry` binary (`FERRY_BIN`, else `target/<profile>/ferry`).
pub fn ferry() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        locate(
            "FERRY_BIN",
            Path::new("ferry"),
            &["-p", "vmm", "--bin", "ferry"],
        )
    })
    .clone()
}

/// The `ferry-dump` binary (`FERRY_DUMP_BIN`, else `target/<profile>/ferry-dump`).
pub fn ferry_dump() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        locate(
            "FERRY_DUMP_BIN",
            Path::new("ferry-dump"),
            &["-p", "tools", "--bin", "ferry-dump"],
        )
    })
    .clone()
}

/// The `qmp_demo` example of ferry-qmp, a QMP server without a VM (`FERRY_QMP_DEMO_BIN`, else
/// `target/<profile>/examples/qmp_demo`).
pub fn qmp_demo() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        locate(
            "FERRY_QMP_DEMO_BIN",
            Path::new("examples/qmp_demo"),
            &["-p", "ferry-qmp", "--example", "qmp_demo"],
        )
    })
    .clone()
}

/// The profile directory this test binary was built into
/// (`TARGET/PROFILE/deps/NAME`), whatever `CARGO_TARGET_DIR` says.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// `target/` (the parent of [`profile_dir`]).
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf()
}

/// The override in `var`, or `rel` under the profile directory, built with `cargo build
/// BUILD_ARGS` when it is missing or older than the workspace's sources.
fn locate(var: &str, rel: &Path, build_args: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} is not a file", p.display());
        return p;
    }
    let bin = profile_dir().join(rel);
    if let Some(why) = stale(&bin) {
        build(build_args, &bin, &why);
    }
    assert!(
        bin.is_file(),
        "{} is missing after `cargo build {}`",
        bin.display(),
        build_args.join(" ")
    );
    bin
}

/// Why `bin` must be built: missing, or a source file of the workspace is newer than both
/// the binary and the last `cargo build` that found it fresh (see [`stamp`]).
fn stale(bin: &Path) -> Option<String> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = mtime(bin) else {
        return Some("missing".into());
    };
    let checked = mtime(&stamp(bin)).map_or(built, |t| t.max(built));
    newest_source(&crate::repo_root())
        .filter(|(t, _)| *t > checked)
        .map(|(_, p)| format!("{} is newer", p.display()))
}

/// A file touched after each successful build of `bin`: cargo leaves a binary it found fresh
/// untouched, so without it every test process would run cargo again.
fn stamp(bin: &Path) -> PathBuf {
    let name = bin
        .file_name()
        .expect("a binary has a name")
        .to_string_lossy();
    profile_dir()
        .join(".ferry-tests")
        .join(format!("{name}.fresh"))
}

/// The newest `*.rs`, `Cargo.toml` or `Cargo.lock` of the crates a binary is built from
/// (everything in the workspace but `target/`, hidden folders and this test crate).
fn newest_source(root: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut todo = vec![root.to_path_buf()];
    let skip = [root.join("target"), root.join("tests"), target_dir()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !name.starts_with('.') && !skip.contains(&p) {
                    todo.push(p);
                }
            } else if (name.ends_with(".rs") || name == "Cargo.toml" || name == "Cargo.lock")
                && let Ok(t) = e.metadata().and_then(|m| m.modified())
                && newest.as_ref().is_none_or(|(n, _)| t > *n)
            {
                newest = Some((t, p));
            }
        }
    }
    newest
}

/// `cargo build ARGS` into this test binary's target directory and profile; fails the test
/// with the command when the build fails. One build at a time per process.
fn build(args: &[&str], bin: &Path, why: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .args(args)
        .arg("--manifest-path")
        .arg(crate::repo_root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir());
    let profile = profile_dir();
    match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => panic!("no profile in {}", profile.display()),
    }
    eprintln!("{} ({why}): {cmd:?}", bin.display());
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        status.success(),
        "building {} failed ({status}): {cmd:?}; its errors are above",
        bin.display()
    );
    let stamp = stamp(bin);
    std::fs::create_dir_all(stamp.parent().expect("the stamp has a folder"))
        .and_then(|()| std::fs::write(&stamp, b""))
        .unwrap_or_else(|e| panic!("{}: {e}", stamp.display()));
}
