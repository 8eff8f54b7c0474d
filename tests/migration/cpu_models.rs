//! Named CPU models (machine type `ferry-2.1`) across real `ferry` processes: a guest on each
//! model migrates live and keeps its CPU; a host lacking a feature the model needs is refused
//! by name, on the source at start and on the destination at the handshake and on a file
//! restore, with nothing loaded and the source running on. `--x-hide-host-features` stands in
//! for the weaker host, so this runs on any x86-64 KVM host.

use ferry_tests::*;
use serde_json::json;
use std::process::Command;

fn shape(cpu: &str) -> Vec<&str> {
    vec![
        "--machine",
        "ferry-2.1",
        "--cpu",
        cpu,
        "--memory",
        "64M",
        "--guest",
        "dirty:4",
    ]
}

/// The guest's CPUID as the stream carries it.
fn cpuid_of(file: &std::path::Path) -> Vec<machine_types::cpu::CpuidLeaf> {
    let (_, sections) =
        vmm::migrate::read_stream_sections(std::fs::File::open(file).unwrap()).unwrap();
    let cpu = sections
        .iter()
        .find(|s| s.name == "cpu")
        .expect("cpu section");
    let s: vmm::vcpu::persist::VcpuState = cpu.load().unwrap();
    s.cpuid.iter().map(|e| e.to_leaf()).collect()
}

#[test]
fn each_named_model_migrates_live_and_the_guest_keeps_its_cpu() {
    for cpu in ["ferry-v2", "ferry-v3"] {
        let dir = tempdir();
        let mut src = Ferry::spawn(dir.path(), "src", &shape(cpu));
        src.wait_pass(2);
        let mut dst_args = shape(cpu);
        let dump = dir.path().join("received.stream");
        let dump_s = dump.display().to_string();
        dst_args.extend(["--incoming", "tcp:127.0.0.1:0", "--dump-stream", &dump_s]);
        let mut dst = Ferry::spawn(dir.path(), "dst", &dst_args);
        let port = dst.incoming_port();
        src.ok("migrate-set-parameters", completes_under_load());
        src.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
        let info = src.wait_migration(&["completed", "failed"]);
        assert_eq!(info["status"], "completed", "{cpu}: {info}");
        dst.wait_migration(&["completed"]);
        let p = dst.pass();
        dst.wait_pass(p + 2);
        dst.ok("stop", json!({}));
        let v = dst.ok("__org.ferry_verify-guest", json!({}));
        assert_eq!(v["ok"], true, "{cpu}: {v}");
        // The stream carries the model's fixed table, not this host's CPUID.
        let want = machine_types::CpuModel::by_name(cpu)
            .unwrap()
            .fixed_cpuid()
            .unwrap();
        assert_eq!(cpuid_of(&dump), want, "{cpu}");
    }
}

#[test]
fn a_source_host_lacking_a_feature_refuses_to_start_the_model() {
    require_kvm();
    let out = Command::new(ferry_tests::bins::ferry())
        .args(["run", "--machine", "ferry-2.1", "--cpu", "ferry-v3"])
        .args(["--memory", "64M", "--x-hide-host-features", "avx2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ferry: this host lacks avx2, required by CPU model 'ferry-v3'"),
        "{err}"
    );
    // A model of another machine type is refused with the valid ones.
    let out = Command::new(ferry_tests::bins::ferry())
        .args(["run", "--machine", "ferry-2.0", "--cpu", "ferry-v3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CPU model 'ferry-v3' is not offered by machine type ferry-2.0; valid models: ferry-cpu-v2"),
        "{err}"
    );
}

#[test]
fn a_destination_host_lacking_a_feature_refuses_the_migration_by_name() {
    let dir = tempdir();
    let mut src = Ferry::spawn(dir.path(), "src", &shape("ferry-v3"));
    src.wait_pass(2);
    let mut dst_args = shape("ferry-v3");
    dst_args.extend([
        "--incoming",
        "tcp:127.0.0.1:0",
        "--x-hide-host-features",
        "avx2",
    ]);
    let mut dst = Ferry::spawn(dir.path(), "dst", &dst_args);
    let defs = dst.ok("query-cpu-definitions", json!({}));
    let v3 = defs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "ferry-v3")
        .unwrap();
    assert_eq!(v3["unavailable-features"], json!(["avx2"]), "{defs}");
    assert_eq!(v3["migration-safe"], true);
    let port = dst.incoming_port();
    src.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = src.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap();
    assert!(
        why.contains("destination host lacks avx2, required by CPU model 'ferry-v3' (configuration record at offset "),
        "{why}"
    );
    // The source runs on; the destination loaded nothing and keeps waiting.
    assert_eq!(src.status(), "running");
    let p = src.pass();
    src.wait_pass(p + 1);
    let d = dst.wait_migration(&["failed"]);
    assert!(
        d["error-desc"]
            .as_str()
            .unwrap()
            .contains("destination host lacks avx2"),
        "{d}"
    );
    assert_eq!(dst.status(), "inmigrate");
    // A destination that has the feature takes the same guest.
    let mut ok_args = shape("ferry-v3");
    ok_args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    let mut ok = Ferry::spawn(dir.path(), "ok", &ok_args);
    let port = ok.incoming_port();
    src.ok("migrate-set-parameters", completes_under_load());
    src.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = src.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
}

#[test]
fn a_file_restore_on_a_host_lacking_a_feature_is_refused_by_name() {
    let dir = tempdir();
    let mut src = Ferry::spawn(dir.path(), "src", &shape("ferry-v3"));
    src.wait_pass(2);
    src.ok("stop", json!({}));
    let file = dir.path().join("v3.stream");
    src.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert_eq!(
        src.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    let uri = format!("file:{}", file.display());
    let mut args = shape("ferry-v3");
    args.extend(["--incoming", &uri, "--x-hide-host-features", "avx2,bmi2"]);
    let mut dst = Ferry::spawn(dir.path(), "dst", &args);
    let info = dst.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap();
    assert!(
        why.contains("destination host lacks avx2, bmi2, required by CPU model 'ferry-v3'"),
        "{why}"
    );
    assert_eq!(dst.status(), "inmigrate");
    // The same file loads where the features are.
    let mut args = shape("ferry-v3");
    args.extend(["-S", "--incoming", &uri]);
    let mut ok = Ferry::spawn(dir.path(), "ok", &args);
    assert_eq!(
        ok.wait_migration(&["completed", "failed"])["status"],
        "completed"
    );
    let v = ok.ok("__org.ferry_verify-guest", json!({}));
    assert_eq!(v["ok"], true, "{v}");
}
