//! `virsh domcapabilities --emulatorbin <shim starting ferry qemu-compat> --virttype kvm`
//! against libvirt's embedded QEMU driver in a private root (its own config, cache, state
//! and run directories), with Ferry's CPU models added to libvirt's CPU map by
//! `ferry libvirt-cpu-map` and bind-mounted in a private mount namespace.

use ferry_tests::{require_kvm, tempdir};

use crate::support::{Libvirt, require_libvirt};

#[test]
fn domcapabilities_lists_machine_types_and_cpu_models() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    let models: Vec<&str> = machine_types::cpu::ALL_MODELS
        .iter()
        .map(|m| m.name())
        .collect();
    for m in machine_types::all() {
        let xml = lv.virsh(&format!(
            "domcapabilities --emulatorbin '{}' --virttype kvm --machine {}",
            lv.shim.display(),
            m.name()
        ));
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
