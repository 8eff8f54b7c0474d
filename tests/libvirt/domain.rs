//! A libvirt domain on Ferry (issue 17, stage 2): README's domain XML defined, started,
//! suspended, resumed, inspected, re-attached by a new libvirt, hot-plugged with
//! `setvcpus --live`, saved and restored through a descriptor, and destroyed, all with virsh
//! against a private embedded libvirt; a domain asking for a device Ferry lacks fails to
//! start, naming it, and leaves a running domain alone. The guest is checked over its own
//! monitor socket (Ferry serves every client).

use std::time::Duration;

use ferry_tests::{QmpClient, TIMEOUT, require_kvm, tempdir};
use serde_json::json;

use crate::support::{Daemon, Libvirt, pass, require_libvirt, vcpu1, wait_for};

/// `query-status` of a domain, through its monitor.
fn status(qmp: &mut QmpClient) -> String {
    let s = qmp
        .execute("query-status", json!({}))
        .expect("query-status");
    s["status"].as_str().unwrap_or_default().to_owned()
}

/// Waits until the guest has completed at least one more pass than `after`.
fn wait_progress(qmp: &mut QmpClient, after: u64) -> u64 {
    wait_for(&format!("the guest is stuck at pass {after}"), || {
        Some(pass(qmp)).filter(|p| *p > after)
    })
}

/// The domain's process, which must be running.
fn process(lv: &Libvirt, name: &str) -> Daemon {
    let pid = lv
        .pid(name)
        .unwrap_or_else(|| panic!("no pid file of {name}\n{}", lv.logs()));
    Daemon::attach(pid).unwrap_or_else(|| panic!("{name}'s process {pid} is not running"))
}

/// Lines of `virsh dominfo` as key -> value.
fn dominfo(lv: &Libvirt, name: &str) -> std::collections::BTreeMap<String, String> {
    lv.virsh(&format!("dominfo {name}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn define_start_suspend_resume_dominfo_destroy() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    lv.define("ferry1", "");
    assert_eq!(lv.state("ferry1"), "shut off");
    lv.virsh("start ferry1");
    let ferry = process(&lv, "ferry1");
    let mut qmp = lv.qmp("ferry1");
    assert_eq!(status(&mut qmp), "running");
    let p = wait_progress(&mut qmp, 0);

    // The serial port is a pty Ferry made (query-chardev).
    let tty = lv.virsh("ttyconsole ferry1");
    assert!(tty.trim().starts_with("/dev/pts/"), "ttyconsole: {tty}");
    let info = dominfo(&lv, "ferry1");
    assert_eq!(info["State"], "running", "{info:?}");
    assert_eq!(info["CPU(s)"], "1", "{info:?}");
    assert_eq!(info["Max memory"], "65536 KiB", "{info:?}");
    assert_eq!(info["OS Type"], "hvm", "{info:?}");

    lv.virsh("suspend ferry1");
    assert_eq!(lv.state("ferry1"), "paused");
    assert_eq!(status(&mut qmp), "paused");
    qmp.wait_event("STOP", TIMEOUT, |_| true)
        .expect("STOP after virsh suspend");
    // Paused: the guest does not move.
    let frozen = pass(&mut qmp);
    assert!(frozen >= p);
    assert_eq!(lv.state("ferry1"), "paused");
    assert_eq!(pass(&mut qmp), frozen, "the guest ran while suspended");

    lv.virsh("resume ferry1");
    assert_eq!(lv.state("ferry1"), "running");
    qmp.wait_event("RESUME", TIMEOUT, |_| true)
        .expect("RESUME after virsh resume");
    wait_progress(&mut qmp, frozen);

    lv.virsh("destroy ferry1");
    assert!(
        ferry.wait_exit(TIMEOUT),
        "ferry (pid {}) still runs {TIMEOUT:?} after virsh destroy",
        ferry.pid
    );
    assert_eq!(lv.state("ferry1"), "shut off");
    // Defined still, and startable again.
    lv.virsh("start ferry1");
    assert_eq!(lv.state("ferry1"), "running");
    let again = process(&lv, "ferry1");
    lv.virsh("destroy ferry1");
    assert!(again.wait_exit(TIMEOUT), "ferry still runs after destroy");
}

#[test]
fn a_new_libvirt_reattaches_without_stopping_the_guest() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    lv.define("ferry1", "");
    lv.virsh("start ferry1");
    let ferry = process(&lv, "ferry1");
    let mut qmp = lv.qmp("ferry1");
    let before = wait_progress(&mut qmp, 0);
    // Each virsh is a new embedded driver: it reads its state directory, connects to the
    // running Ferry's monitor and asks what it needs (status, vCPUs, chardevs, devices).
    for _ in 0..3 {
        let info = dominfo(&lv, "ferry1");
        assert_eq!(info["State"], "running", "{info:?}");
        let reply = lv.virsh(r#"qemu-monitor-command ferry1 '{"execute":"query-status"}'"#);
        assert!(reply.contains(r#""status":"running""#), "{reply}");
    }
    assert_eq!(lv.pid("ferry1"), Some(ferry.pid), "a new process");
    assert!(!ferry.wait_exit(Duration::ZERO), "ferry exited");
    wait_progress(&mut qmp, before);
    lv.virsh("destroy ferry1");
    assert!(ferry.wait_exit(TIMEOUT), "ferry still runs after destroy");
}

#[test]
fn setvcpus_live_hotplugs_and_unplugs_a_ferry_cpu_core() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    lv.define("ferry1", "");
    lv.virsh("start ferry1");
    let ferry = process(&lv, "ferry1");
    let mut qmp = lv.qmp("ferry1");
    let hotpluggable = qmp
        .execute("query-hotpluggable-cpus", json!({}))
        .expect("query-hotpluggable-cpus");
    assert_eq!(
        hotpluggable.as_array().map(Vec::len),
        Some(2),
        "maxcpus=2: one boot vCPU and one core: {hotpluggable}"
    );

    lv.virsh("setvcpus ferry1 2 --live");
    // libvirt plugged a ferry-cpu-core through device_add; the guest configures it.
    let c = wait_for(
        "the guest never configured the hot-plugged core vcpu1",
        || vcpu1(&mut qmp).filter(|c| c["state"] == "logical-configured"),
    );
    assert_eq!(c["unplug-pending"], false, "{c}");
    let count = lv.virsh("vcpucount ferry1 --live --active");
    assert_eq!(count.trim(), "2", "{count}");
    assert_eq!(dominfo(&lv, "ferry1")["CPU(s)"], "2");
    let cpus = qmp
        .execute("query-cpus-fast", json!({}))
        .expect("query-cpus-fast");
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");

    // Back to one: libvirt sends device_del and completes only on the guest's
    // DEVICE_DELETED (the guest's event reaching libvirt).
    lv.virsh("setvcpus ferry1 1 --live");
    qmp.wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == "vcpu1")
        .expect("DEVICE_DELETED of vcpu1");
    let count = lv.virsh("vcpucount ferry1 --live --active");
    assert_eq!(count.trim(), "1", "{count}");
    assert!(vcpu1(&mut qmp).is_none(), "vcpu1 is still plugged");
    let p = pass(&mut qmp);
    wait_progress(&mut qmp, p);
    lv.virsh("destroy ferry1");
    assert!(ferry.wait_exit(TIMEOUT), "ferry still runs after destroy");
}

#[test]
fn save_and_restore_through_a_passed_descriptor() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    lv.define("ferry1", "");
    lv.virsh("start ferry1");
    let first = process(&lv, "ferry1");
    let mut qmp = lv.qmp("ferry1");
    // With a hot-plugged core, which the restored domain must have too.
    lv.virsh("setvcpus ferry1 2 --live");
    wait_for(
        "the guest never configured the hot-plugged core vcpu1",
        || vcpu1(&mut qmp).filter(|c| c["state"] == "logical-configured"),
    );
    let at_save = wait_progress(&mut qmp, 1);
    let image = dir.path().join("ferry1.save");
    // libvirt writes its header, passes the file with getfd and has Ferry migrate to
    // fd:migrate behind it, then ends the process.
    lv.virsh(&format!("save ferry1 '{}'", image.display()));
    assert!(
        first.wait_exit(TIMEOUT),
        "the saved domain's ferry still runs"
    );
    assert!(
        qmp.execute("query-status", json!({})).is_err(),
        "the saved domain's monitor still answers"
    );
    assert_eq!(lv.state("ferry1"), "shut off");
    let size = std::fs::metadata(&image).expect("the save image").len();
    assert!(
        size > 16 << 20,
        "a 16 MiB working set saved in {size} bytes"
    );

    // A new ferry gets `-incoming defer`, then `migrate-incoming fd:N` on the image.
    lv.virsh(&format!("restore '{}'", image.display()));
    assert_eq!(lv.state("ferry1"), "running");
    let second = process(&lv, "ferry1");
    assert_ne!(second.pid, first.pid);
    let mut qmp = lv.qmp("ferry1");
    let m = qmp
        .execute("query-migrate", json!({}))
        .expect("query-migrate");
    assert_eq!(m["status"], "completed", "{m}");
    // libvirt added vcpu1 again (device_add before migrate-incoming); the stream carried
    // its configured connector.
    let c = vcpu1(&mut qmp).expect("vcpu1 on the restored domain");
    assert_eq!(c["state"], "logical-configured", "{c}");
    let count = lv.virsh("vcpucount ferry1 --live --active");
    assert_eq!(count.trim(), "2", "{count}");
    let p = pass(&mut qmp);
    assert!(
        p >= at_save,
        "the restored guest is at pass {p}, it was at {at_save} before the save"
    );
    wait_progress(&mut qmp, p);
    // Its memory is the guest's own pattern, page for page.
    lv.virsh("suspend ferry1");
    let v = qmp
        .execute("__org.ferry_verify-guest", json!({}))
        .expect("__org.ferry_verify-guest");
    assert_eq!(v["ok"], true, "{v}");
    lv.virsh("resume ferry1; destroy ferry1");
    assert!(second.wait_exit(TIMEOUT), "ferry still runs after destroy");
}

#[test]
fn a_device_ferry_lacks_fails_to_start_naming_it() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    lv.define("ferry1", "");
    lv.virsh("start ferry1");
    let good = process(&lv, "ferry1");
    let mut qmp = lv.qmp("ferry1");
    let before = wait_progress(&mut qmp, 0);

    // An ISA watchdog: no PCI address needed, so libvirt hands it to Ferry as -device.
    lv.define("bad1", "    <watchdog model='ib700' action='reset'/>\n");
    let out = lv.try_virsh("start bad1");
    assert!(!out.ok, "bad1 started: {}", out.stdout);
    assert!(
        out.stderr.contains("Ferry has no device 'ib700'"),
        "libvirt does not show Ferry's error: {}",
        out.stderr
    );
    assert_eq!(lv.state("bad1"), "shut off");
    assert_eq!(lv.pid("bad1"), None, "bad1 left a pid file");

    // The running domain is untouched: same process, running, guest moving.
    assert_eq!(lv.state("ferry1"), "running");
    assert_eq!(lv.pid("ferry1"), Some(good.pid));
    assert_eq!(status(&mut qmp), "running");
    wait_progress(&mut qmp, before);
    lv.virsh("destroy ferry1");
    assert!(good.wait_exit(TIMEOUT), "ferry still runs after destroy");
}

#[test]
fn a_boot_sector_guest_writes_to_a_serial_file() {
    require_kvm();
    require_libvirt();
    let dir = tempdir();
    let lv = Libvirt::new(dir.path());
    // mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al; mov al, 10;
    // out dx, al; jmp $
    let mut image = vec![
        0xBA, 0xF8, 0x03, 0xB0, b'O', 0xEE, 0xB0, b'K', 0xEE, 0xB0, b'\n', 0xEE, 0xEB, 0xFE,
    ];
    image.resize(510, 0);
    image.extend([0x55, 0xAA]);
    let boot = dir.path().join("boot.img");
    std::fs::write(&boot, image).expect("write the boot sector");
    let out = dir.path().join("serial.txt");
    // libvirt opens the file itself and passes it: -add-fd, path=/dev/fdset/N.
    lv.define_with("boot1", |xml| {
        xml.replace(
            "hvm</type>",
            &format!("hvm</type>\n    <kernel>{}</kernel>", boot.display()),
        )
        .replace(
            "<serial type='pty'/>",
            &format!(
                "<serial type='file'><source path='{}'/></serial>",
                out.display()
            ),
        )
        .replace("    <console type='pty'/>\n", "")
    });
    lv.virsh("start boot1");
    let ferry = process(&lv, "boot1");
    wait_for("the boot sector's OK never reached the serial file", || {
        std::fs::read_to_string(&out).ok().filter(|s| s == "OK\n")
    });
    lv.virsh("destroy boot1");
    assert!(ferry.wait_exit(TIMEOUT), "ferry still runs after destroy");
}
