//! `virsh migrate --live` between two libvirt daemons on this machine (issue 17, stage 3):
//! each has its own configuration, state and run directories (a mount namespace each) and
//! its own host UUID. The domain has a hot-plugged core; on the destination the core is
//! configured, the guest runs on from where it was and its memory verifies page by page.

use std::time::Duration;

use ferry_tests::{TIMEOUT, require_kvm, tempdir};
use serde_json::json;

use crate::support::{Daemon, Libvirt, LibvirtDaemon, pass, require_libvirtd, vcpu1, wait_for};

/// The migration stream over loopback: by default libvirt sends it to the destination's
/// host name, which need not resolve here (and libvirt refuses loopback in its
/// `migration_host` setting, not in `--migrateuri`).
const LOOPBACK: &str = "--migrateuri tcp://127.0.0.1";

#[test]
fn virsh_migrate_live_with_a_hot_plugged_core() {
    require_kvm();
    require_libvirtd();
    let dir = tempdir();
    // The shim and Ferry's CPU map, as for the embedded driver.
    let lv = Libvirt::new(&dir.path().join("embedded"));
    let map = lv.dir.join("cpu_map");
    let src = LibvirtDaemon::start(
        &dir.path().join("src"),
        "11111111-2222-3333-4444-555555555555",
        &lv.shim,
        &map,
    );
    let dst = LibvirtDaemon::start(
        &dir.path().join("dst"),
        "99999999-2222-3333-4444-555555555555",
        &lv.shim,
        &map,
    );
    src.define("ferry1");
    src.virsh("start ferry1");
    let mut qmp = src.qmp("ferry1");
    src.virsh("setvcpus ferry1 2 --live");
    wait_for(
        "the guest never configured the hot-plugged core vcpu1",
        || vcpu1(&mut qmp).filter(|c| c["state"] == "logical-configured"),
    );
    let before = wait_for("the guest does not run on the source", || {
        Some(pass(&mut qmp)).filter(|p| *p >= 2)
    });
    let source =
        Daemon::attach(src.pid("ferry1").expect("the source's pid file")).expect("the source runs");
    // A debug build of Ferry under load: allow the switchover whatever the guest dirties.
    src.virsh("migrate-setmaxdowntime ferry1 10000");
    src.virsh(&format!("migrate --live ferry1 '{}' {LOOPBACK}", dst.uri));
    dst.adopt("ferry1");

    assert!(
        source.wait_exit(TIMEOUT),
        "the source's ferry (pid {}) still runs after the migration",
        source.pid
    );
    assert_eq!(
        src.virsh("list --name").trim(),
        "",
        "the source still lists ferry1"
    );
    assert_eq!(dst.virsh("domstate ferry1").trim(), "running");
    let mut qmp = dst.qmp("ferry1");
    let c = vcpu1(&mut qmp).expect("vcpu1 on the destination");
    assert_eq!(c["state"], "logical-configured", "{c}");
    let count = dst.virsh("vcpucount ferry1 --live --active");
    assert_eq!(count.trim(), "2", "{count}");
    let p = pass(&mut qmp);
    assert!(
        p >= before,
        "the guest is at pass {p} on the destination, {before} before"
    );
    wait_for(
        &format!("the guest is stuck at pass {p} on the destination"),
        || Some(pass(&mut qmp)).filter(|q| *q > p),
    );
    dst.virsh("suspend ferry1");
    let v = qmp
        .execute("__org.ferry_verify-guest", json!({}))
        .expect("__org.ferry_verify-guest");
    assert_eq!(v["ok"], true, "{v}");
    dst.virsh("resume ferry1; destroy ferry1");
}

#[test]
fn device_add_during_virsh_migrate_is_refused_as_qemu_refuses_it() {
    require_kvm();
    require_libvirtd();
    let dir = tempdir();
    let lv = Libvirt::new(&dir.path().join("embedded"));
    let map = lv.dir.join("cpu_map");
    let src = LibvirtDaemon::start(
        &dir.path().join("src"),
        "11111111-2222-3333-4444-555555555555",
        &lv.shim,
        &map,
    );
    let dst = LibvirtDaemon::start(
        &dir.path().join("dst"),
        "99999999-2222-3333-4444-555555555555",
        &lv.shim,
        &map,
    );
    src.define("ferry1");
    src.virsh("start ferry1");
    let mut qmp = src.qmp("ferry1");
    // 1 MiB/s: the 16 MiB working set keeps the migration going while the test looks.
    let migrate = std::process::Command::new("virsh")
        .args([
            "-q",
            "-c",
            &src.uri,
            "migrate",
            "--live",
            "--bandwidth",
            "1",
        ])
        .args(["ferry1", &dst.uri])
        .args(LOOPBACK.split(' '))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run virsh migrate");
    wait_for("the migration never became active", || {
        let m = qmp.execute("query-migrate", json!({})).ok()?;
        (m["status"] == "active").then_some(())
    });
    // Through libvirt, Ferry's refusal as QEMU words it.
    let reply = src.virsh(
        r#"qemu-monitor-command ferry1 '{"execute":"device_add","arguments":{"driver":"ferry-cpu-core","id":"vcpu1","core-id":0}}'"#,
    );
    assert!(
        reply.contains(r#""class":"GenericError","desc":"device_add not allowed while migrating""#),
        "{reply}"
    );
    assert!(
        vcpu1(&mut qmp).is_none(),
        "vcpu1 was plugged during the migration"
    );
    // Cancelled: the source runs on, the destination has nothing.
    src.virsh("domjobabort ferry1");
    let out = ferry_tests::python::wait_output(migrate, TIMEOUT, "virsh migrate")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !out.status.success(),
        "the migration completed despite domjobabort"
    );
    assert_eq!(src.virsh("domstate ferry1").trim(), "running");
    assert_eq!(
        dst.virsh("list --all --name").trim(),
        "",
        "the destination kept a domain"
    );
    let p = pass(&mut qmp);
    wait_for(&format!("the source's guest is stuck at pass {p}"), || {
        Some(pass(&mut qmp)).filter(|q| *q > p)
    });
    src.virsh("destroy ferry1");
}

#[test]
fn a_restarted_libvirtd_reattaches_to_the_running_guest() {
    require_kvm();
    require_libvirtd();
    let dir = tempdir();
    let lv = Libvirt::new(&dir.path().join("embedded"));
    let mut host = LibvirtDaemon::start(
        &dir.path().join("host"),
        "11111111-2222-3333-4444-666666666666",
        &lv.shim,
        &lv.dir.join("cpu_map"),
    );
    host.define("ferry1");
    host.virsh("start ferry1");
    let pid = host.pid("ferry1").expect("the domain's pid file");
    let guest = Daemon::attach(pid).expect("the domain's ferry runs");
    let mut qmp = host.qmp("ferry1");
    let before = wait_for("the guest does not run", || {
        Some(pass(&mut qmp)).filter(|p| *p >= 1)
    });
    host.restart();
    // The new daemon found the domain where the old one left it: same process, running.
    assert_eq!(host.virsh("domstate ferry1").trim(), "running");
    assert_eq!(host.pid("ferry1"), Some(pid));
    assert!(
        !guest.wait_exit(Duration::ZERO),
        "the guest's ferry (pid {pid}) exited across the restart"
    );
    wait_for(
        &format!("the guest stopped at pass {before} across the restart"),
        || Some(pass(&mut qmp)).filter(|p| *p > before),
    );
    // And it drives it as before.
    host.virsh("suspend ferry1");
    assert_eq!(host.virsh("domstate ferry1").trim(), "paused");
    host.virsh("resume ferry1");
    assert_eq!(host.virsh("domstate ferry1").trim(), "running");
    host.virsh("destroy ferry1");
    assert!(
        guest.wait_exit(TIMEOUT),
        "the guest's ferry (pid {pid}) still runs after destroy"
    );
}
