//! `virsh domcapabilities --emulatorbin <shim starting ferry qemu-compat> --virttype kvm`
//! against libvirt's embedded QEMU driver in a private root (its own config, cache, state
//! and run directories), with Ferry's CPU models added to libvirt's CPU map by
//! `ferry libvirt-cpu-map` and bind-mounted in a private mount namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use ferry_tests::python::wait_output;
use ferry_tests::{TIMEOUT, require_kvm, tempdir};

/// libvirt's CPU map, where libvirt reads it.
const CPU_MAP: &str = "/usr/share/libvirt/cpu_map";

const INSTALL: &str = "install libvirt 9 (Debian: apt-get install libvirt-clients libvirt-daemon \
                       libvirt-daemon-driver-qemu; .ci/run does when they are missing)";

/// Fails, saying what to install, unless virsh and libvirt's QEMU driver are here.
fn require_libvirt() {
    let version = Command::new("virsh").arg("--version").output();
    let ok = version.as_ref().is_ok_and(|o| o.status.success());
    assert!(ok, "libvirt is missing (virsh: {version:?}): {INSTALL}");
    assert!(
        Path::new(CPU_MAP).join("index.xml").exists(),
        "libvirt's CPU map {CPU_MAP} is missing: {INSTALL}"
    );
}

/// Runs `SCRIPT` with `sh` in a private mount namespace where libvirt's CPU map is
/// `map`, bounded by `TIMEOUT`; returns stdout, failing with stderr.
fn in_namespace(map: &Path, script: &str) -> String {
    let wrapped = format!(
        "set -e; mount --make-rprivate /; mount --bind '{}' {CPU_MAP}; {script}",
        map.display()
    );
    let child = Command::new("unshare")
        .args(["--mount", "sh", "-c", &wrapped])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare (util-linux)");
    let out =
        wait_output(child, TIMEOUT, "virsh domcapabilities").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{script} failed (this test needs root for its mount namespace; libvirt's \
         privileged driver also needs the system user libvirt-qemu, which .ci/run creates): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn domcapabilities_lists_machine_types_and_cpu_models() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir root/etc");
    // The probe runs as root: /dev/kvm is root's on CI machines.
    std::fs::write(
        root.join("etc/qemu.conf"),
        "user = \"root\"\ngroup = \"root\"\n",
    )
    .expect("write qemu.conf");
    let ferry = ferry_tests::bins::ferry();
    let shim = dir.path().join("ferry-qemu");
    std::fs::write(
        &shim,
        format!("#!/bin/sh\nexec '{}' qemu-compat \"$@\"\n", ferry.display()),
    )
    .expect("write the shim");
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let map = dir.path().join("cpu_map");
    let out = Command::new(&ferry)
        .args(["libvirt-cpu-map", "--to"])
        .arg(&map)
        .output()
        .expect("run ferry libvirt-cpu-map");
    assert!(
        out.status.success(),
        "ferry libvirt-cpu-map failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let models: Vec<&str> = machine_types::cpu::ALL_MODELS
        .iter()
        .map(|m| m.name())
        .collect();
    for m in machine_types::all() {
        let xml = in_namespace(
            &map,
            &format!(
                "virsh -c 'qemu:///embed?root={}' domcapabilities --emulatorbin '{}' \
                 --virttype kvm --machine {}",
                root.display(),
                shim.display(),
                m.name()
            ),
        );
        assert!(xml.contains("<domain>kvm</domain>"), "{xml}");
        assert!(
            xml.contains(&format!("<machine>{}</machine>", m.name())),
            "machine type {} missing:\n{xml}",
            m.name()
        );
        let custom = xml
            .split("<mode name='custom' supported='yes'>")
            .nth(1)
            .and_then(|s| s.split("</mode>").next())
            .unwrap_or_else(|| panic!("no custom CPU models for {}:\n{xml}", m.name()));
        for model in &models {
            assert!(
                custom.contains(&format!(">{model}</model>")),
                "CPU model {model} missing for {}:\n{xml}",
                m.name()
            );
        }
    }
}
