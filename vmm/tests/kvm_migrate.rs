//! Real-KVM migrations through the migration engine: snapshot to a file and restore into a
//! fresh VM, live migration over loopback TCP between two VMs of this process, and the
//! refusals (shape, corruption, machine type, CPU model).

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use machine_types::MachineType;
use migration::{Incoming, MigrationError, Params, Progress, Status, SwitchoverPolicy};
use vmm::config::{GuestSpec, VmConfig};
use vmm::devices::persist::ProgressState;
use vmm::migrate::{self, VmMigration};
use vmm::{RunState, Vm};

fn machine(name: &str) -> &'static MachineType {
    MachineType::lookup(name).unwrap()
}

fn shape(machine_name: &str, memory_mib: u64, vcpus: u8) -> VmConfig {
    VmConfig {
        memory_size: memory_mib << 20,
        vcpus,
        machine: machine(machine_name),
        ..Default::default()
    }
}

/// Live pre-copy for tests whose subject is not convergence: on a loaded host the measured
/// bandwidth of a debug build can keep the default 300 ms out of reach for all 30 passes
/// (then the migration fails, not converged). Switch over once 3 s fits, and after 10
/// passes at the latest.
fn completes_under_load() -> Params {
    Params {
        downtime_limit_ms: 3000,
        max_iterations: 10,
        switchover_policy: SwitchoverPolicy::Force,
        ..Params::default()
    }
}

/// A stream file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!(
            "ferry-kvm-migrate-{}-{tag}.stream",
            std::process::id()
        )))
    }
    fn uri(&self) -> String {
        format!("file:{}", self.0.display())
    }
    fn open(&self) -> std::fs::File {
        std::fs::File::open(&self.0).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn err_chain(e: &MigrationError) -> String {
    migration::chain(e)
}

/// Saves a running dirtying guest to `file` with the engine; returns the source (stopped).
fn snapshot(cfg: &VmConfig, file: &TempFile) -> Vm {
    let mut src = boot(cfg, &GuestSpec::dirty_mib(4));
    wait_pass(&src, 3);
    let progress = Progress::default();
    migration::send(
        &mut VmMigration::new(&mut src),
        &file.uri(),
        &completes_under_load(),
        &progress,
    )
    .unwrap_or_else(|e| panic!("save to file: {}", err_chain(&e)));
    assert_eq!(progress.status(), Status::Completed);
    assert_eq!(src.run_state(), RunState::PostMigrate);
    assert!(src.all_parked());
    src.verify_guest_pattern()
        .expect("source pattern at the switchover");
    src
}

#[test]
fn file_snapshot_restores_into_a_fresh_vm_and_the_guest_continues() {
    let _kvm = kvm_test();
    let cfg = shape("ferry-2.0", 32, 1);
    let file = TempFile::new("snapshot");
    let src = snapshot(&cfg, &file);
    let src_mailbox = src.mailbox().unwrap();
    let src_pass = src.progress().last_pass();
    // What the stream says, section by section.
    let (stream_machine, saved) = migrate::read_stream_sections(file.open()).unwrap();
    assert_eq!(stream_machine, "ferry-2.0");
    let names: Vec<(&str, u32)> = saved
        .iter()
        .map(|s| (s.name.as_str(), s.instance))
        .collect();
    assert_eq!(
        names,
        [
            ("cpu", 0),
            ("irqchip", 0),
            ("pit", 0),
            ("kvmclock", 0),
            ("uart", 0),
            ("guest-progress", 0),
            ("migration", 0)
        ]
    );
    drop(src);

    let mut dst = Vm::new(&cfg).expect("fresh VM");
    let mut handle = VmMigration::new(&mut dst).capture_after_load();
    let progress = Progress::default();
    migration::receive(
        &mut handle,
        Incoming::File(file.open()),
        &Params::default(),
        &progress,
    )
    .unwrap_or_else(|e| panic!("restore from file: {}", err_chain(&e)));
    assert_eq!(progress.status(), Status::Completed);
    let stats = handle.ram_stats();
    assert_eq!(
        stats.zero_pages_cleared, 0,
        "a fresh VM has no page to clear: {stats:?}"
    );
    assert!(
        (stats.data_pages + stats.zero_pages) << 12 >= 32 << 20,
        "{stats:?}"
    );

    // The destination's own re-serialisation, taken after load and before its first
    // KVM_RUN, equals the stream except for volatile fields.
    let reloaded = migrate::parse_sections(cfg.machine, handle.reserialised().unwrap()).unwrap();
    let schema = migrate::full_catalog().schema(cfg.machine);
    let saved_devices: Vec<_> = saved
        .iter()
        .filter(|s| s.name != "migration")
        .cloned()
        .collect();
    let diff = migrate::diff_sections(&schema, &saved_devices, &reloaded).unwrap();
    assert!(diff.is_equal(), "state differs after load: {diff:#?}");
    assert!(
        diff.volatile
            .iter()
            .any(|d| d.starts_with("kvmclock instance 0 clock: ")),
        "the clock moved on: {:?}",
        diff.volatile
    );
    // The registers were really compared: a changed RIP would be a difference.
    let mut moved = reloaded.clone();
    let cpu = moved.iter_mut().find(|s| s.name == "cpu").unwrap();
    let rip_at = 4 + 4 + "ferry-cpu-v2".len() + 4 + 28 * cpu_entries(&saved) + 16 * 8;
    cpu.body[rip_at] ^= 1;
    let diff = migrate::diff_sections(&schema, &saved_devices, &moved).unwrap();
    assert_eq!(diff.differences.len(), 1, "{diff:?}");
    assert!(
        diff.differences[0].starts_with("cpu instance 0 regs.rip: "),
        "{diff:?}"
    );

    // The guest carries on where it stopped.
    drop(handle);
    assert_eq!(dst.run_state(), RunState::Running);
    wait_pass(&dst, src_pass + 3);
    dst.pause().unwrap();
    dst.verify_guest_pattern()
        .expect("pattern after running on the destination");
    let mb = dst.mailbox().unwrap();
    assert!(mb.pass_count >= src_mailbox.pass_count + 3, "{mb:?}");
}

/// Number of CPUID entries in the saved `cpu` section (to locate RIP in its body).
fn cpu_entries(sections: &[devstate::RawSection]) -> usize {
    let cpu = sections.iter().find(|s| s.name == "cpu").unwrap();
    let model_len = u32::from_le_bytes(cpu.body[4..8].try_into().unwrap()) as usize;
    let at = 8 + model_len;
    u32::from_le_bytes(cpu.body[at..at + 4].try_into().unwrap()) as usize
}

/// `last_pass` of the guest-progress section among `sections` (as encoded for `cfg`).
fn loaded_pass(cfg: &VmConfig, sections: &[Vec<u8>]) -> u32 {
    let parsed = migrate::parse_sections(cfg.machine, sections).unwrap();
    let progress = parsed.iter().find(|s| s.name == "guest-progress").unwrap();
    progress.load::<ProgressState>().unwrap().last_pass
}

#[test]
fn live_migration_over_tcp_moves_a_dirtying_guest() {
    let _kvm = kvm_test();
    let cfg = shape("ferry-2.0", 48, 1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel::<Result<(u32, RunState), String>>();
    let dst_cfg = cfg.clone();
    let dst_thread = std::thread::spawn(move || {
        let mut dst = Vm::new(&dst_cfg).expect("destination VM");
        let (sock, _) = listener.accept().unwrap();
        let progress = Progress::default();
        let mut handle = VmMigration::new(&mut dst).capture_after_load();
        let res = migration::receive(
            &mut handle,
            Incoming::Tcp(sock.into()),
            &Params::default(),
            &progress,
        );
        // The pass the destination resumed from: its progress state as loaded, before its
        // first KVM_RUN (the running guest may report the next pass at any moment).
        let resumed_from = handle.reserialised().map(|s| loaded_pass(&dst_cfg, s));
        let out = res.map_err(|e| err_chain(&e)).and_then(|()| {
            let pass = resumed_from.ok_or("no state captured after load")?;
            let state = dst.run_state();
            dst.wait_for_pass(pass + 3, PROGRESS_TIMEOUT)
                .map_err(|e| format!("destination guest stalled: {e}"))?;
            dst.pause().map_err(|e| e.to_string())?;
            dst.verify_guest_pattern()
                .map_err(|e| format!("destination pattern: {e:?}"))?;
            Ok((pass, state))
        });
        tx.send(out).unwrap();
    });

    let mut src = boot(&cfg, &GuestSpec::dirty_mib(8));
    wait_pass(&src, 3);
    let progress = Progress::default();
    let res = migration::send(
        &mut VmMigration::new(&mut src),
        &uri,
        &completes_under_load(),
        &progress,
    );
    let snap = progress.snapshot();
    res.unwrap_or_else(|e| panic!("live migration: {}", err_chain(&e)));
    assert_eq!(snap.status, Status::Completed);
    assert!(snap.iterations >= 1, "{snap:?}");
    let (dst_pass, dst_state) = rx
        .recv_timeout(PROGRESS_TIMEOUT)
        .expect("destination finished")
        .unwrap_or_else(|e| panic!("destination: {e}"));
    dst_thread.join().unwrap();
    assert_eq!(dst_state, RunState::Running);

    // The source is stopped for good at the pass the destination resumed from.
    assert_eq!(src.run_state(), RunState::PostMigrate);
    assert!(src.all_parked());
    assert_eq!(src.progress().last_pass(), dst_pass);
    src.verify_guest_pattern().unwrap();
    assert!(
        src.wait_for_pass(dst_pass + 1, Duration::from_millis(200))
            .is_err(),
        "the source must not run after the handover"
    );
    eprintln!(
        "live migration: {} ms total, {} ms downtime, {} iterations, {} bytes, {} data + {} zero pages",
        snap.total_time_ms,
        snap.downtime_ms,
        snap.iterations,
        snap.transferred,
        snap.normal_pages,
        snap.zero_pages
    );
}

#[test]
fn a_destination_of_another_shape_refuses_before_any_ram_moves() {
    let _kvm = kvm_test();
    let cfg = shape("ferry-2.0", 32, 1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    let dst_thread = std::thread::spawn(move || {
        let mut dst = Vm::new(&shape("ferry-2.0", 64, 2)).expect("destination VM");
        let (sock, _) = listener.accept().unwrap();
        let progress = Progress::default();
        let mut handle = VmMigration::new(&mut dst);
        let res = migration::receive(
            &mut handle,
            Incoming::Tcp(sock.into()),
            &Params::default(),
            &progress,
        );
        let stats = handle.ram_stats();
        tx.send((
            res.map_err(|e| err_chain(&e)),
            stats,
            dst.run_state(),
            progress.snapshot(),
        ))
        .unwrap();
    });

    let mut src = boot(&cfg, &GuestSpec::dirty_mib(4));
    wait_pass(&src, 2);
    let progress = Progress::default();
    let err = migration::send(
        &mut VmMigration::new(&mut src),
        &uri,
        &Params::default(),
        &progress,
    )
    .unwrap_err();
    let msg = err_chain(&err);
    assert_eq!(
        msg,
        "Destination refused the migration: vCPUs: source 1, destination 2; \
         memory region 0: source 0x0+32 MiB, destination 0x0+64 MiB"
    );
    let snap = progress.snapshot();
    assert_eq!(snap.status, Status::Failed);
    assert_eq!((snap.normal_pages, snap.zero_pages), (0, 0), "{snap:?}");

    let (dst_res, stats, dst_state, dst_snap) = rx.recv_timeout(PROGRESS_TIMEOUT).unwrap();
    dst_thread.join().unwrap();
    assert!(
        dst_res
            .unwrap_err()
            .contains("vCPUs: source 1, destination 2")
    );
    assert_eq!(stats, migrate::RamStats::default(), "no RAM reached the VM");
    assert_eq!((dst_snap.normal_pages, dst_snap.zero_pages), (0, 0));
    assert_ne!(dst_state, RunState::Running);

    // The source never stopped and keeps going.
    assert_eq!(src.run_state(), RunState::Running);
    let pass = src.progress().last_pass();
    wait_pass(&src, pass + 2);
    src.pause().unwrap();
    src.verify_guest_pattern().unwrap();
}

#[test]
fn a_stream_corrupted_in_a_cpu_section_is_refused_with_section_and_offset() {
    let _kvm = kvm_test();
    let cfg = shape("ferry-2.0", 32, 1);
    let file = TempFile::new("corrupt");
    drop(snapshot(&cfg, &file));
    let (_, sections) = migrate::read_stream_sections(file.open()).unwrap();
    let cpu = sections.iter().find(|s| s.name == "cpu").unwrap();
    let mut bytes = std::fs::read(&file.0).unwrap();
    bytes[(cpu.body_offset + 200) as usize] ^= 0x40;
    std::fs::write(&file.0, &bytes).unwrap();

    let mut dst = Vm::new(&cfg).unwrap();
    let mut handle = VmMigration::new(&mut dst);
    let err = migration::receive(
        &mut handle,
        Incoming::File(file.open()),
        &Params::default(),
        &Progress::default(),
    )
    .unwrap_err();
    let msg = err_chain(&err);
    let want = format!("CRC mismatch in section 'cpu' at offset {}", cpu.offset);
    assert!(
        msg.starts_with(&format!("Invalid incoming stream: {want} (stored 0x")),
        "{msg}"
    );
    assert!(handle.failure().unwrap().contains(&want));
    drop(handle);
    // Nothing ran: the VM stays stopped, waiting for a good stream.
    assert_eq!(dst.run_state(), RunState::InMigrate);
    assert!(dst.all_parked());
}

#[test]
fn machine_type_and_cpu_model_mismatches_are_refused() {
    let _kvm = kvm_test();
    let file = TempFile::new("machine");
    drop(snapshot(&shape("ferry-2.0", 32, 1), &file));

    // The engine refuses by machine type before reading anything else.
    let mut old = Vm::new(&shape("ferry-1.0", 32, 1)).unwrap();
    let err = migration::receive(
        &mut VmMigration::new(&mut old),
        Incoming::File(file.open()),
        &Params::default(),
        &Progress::default(),
    )
    .unwrap_err();
    assert_eq!(
        err_chain(&err),
        "Destination refused the migration: machine type: source ferry-2.0, destination ferry-1.0"
    );

    // Loading the device state directly still checks the CPU model, by feature.
    let (_, sections) = migrate::read_stream_sections(file.open()).unwrap();
    let devices: Vec<_> = sections
        .into_iter()
        .filter(|s| s.name != "migration")
        .collect();
    let err = old.load_sections(&devices).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Saved state does not fit this VM: CPU model differs: stream has ferry-cpu-v2 (avx), \
         this VM has ferry-cpu-v1"
    );
    assert_eq!(old.run_state(), RunState::Prelaunch, "nothing was loaded");

    // And the vCPU count, before anything is loaded.
    let mut two = Vm::new(&shape("ferry-2.0", 32, 2)).unwrap();
    let err = two.load_sections(&devices).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Saved state does not fit this VM: vCPU count differs (stream has 1 cpu sections, \
         this VM has 2 vCPUs)"
    );
    let mut unknown = devices.clone();
    unknown[1].name = "hpet".into();
    let err = Vm::new(&shape("ferry-2.0", 32, 1))
        .unwrap()
        .load_sections(&unknown)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown section 'hpet' instance 0 at offset")
            && err.contains("section 'irqchip' is missing"),
        "{err}"
    );
}

#[test]
fn the_cpu_model_follows_the_machine_type() {
    use machine_types::CpuModel;
    let _kvm = kvm_test();
    for (name, model, avx_allowed) in [
        ("ferry-1.0", None, false),
        ("ferry-1.1", None, false),
        ("ferry-2.0", None, true),
        ("ferry-2.1", None, false),
        ("ferry-2.1", Some(CpuModel::X86V3), true),
    ] {
        let mut cfg = shape(name, 16, 1);
        cfg.cpu_model = model;
        let vm = Vm::new(&cfg).unwrap();
        let state = vm.save_state().unwrap();
        let cpu = &state.vcpus[0];
        let want = cfg.cpu_model();
        assert_eq!(want, model.unwrap_or(vm.machine().compat().cpu_model));
        assert_eq!(cpu.cpu_model, want.name());
        let leaf1 = cpu.cpuid.iter().find(|e| e.function == 1).unwrap();
        let xsave0 = cpu
            .cpuid
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .unwrap();
        assert_eq!(xsave0.eax & !(want.xcr0_mask() as u32), 0, "{name}");
        if !avx_allowed {
            assert_eq!(leaf1.ecx & (1 << 28), 0, "{name} must not offer AVX");
            assert_eq!(xsave0.eax & 0b100, 0);
        }
        // A named model is its fixed table, whatever the host: leaf for leaf.
        if let Some(table) = want.fixed_cpuid() {
            let got: Vec<_> = cpu.cpuid.iter().map(|e| e.to_leaf()).collect();
            assert_eq!(got, table, "{name} {}", want.name());
            assert_eq!(
                cpu.msrs.iter().map(|m| m.index).collect::<Vec<_>>(),
                want.msrs(),
                "{}: every MSR of the model travels",
                want.name()
            );
        }
        // The MSR list is the model's fixed list (minus what the host lacks), TSC apart.
        assert!(!cpu.msrs.is_empty());
        assert!(
            cpu.msrs
                .iter()
                .all(|m| want.msrs().contains(&m.index) && m.index != 0x10)
        );
        assert_ne!(cpu.tsc, 0);
    }
}

#[test]
fn write_ram_refuses_ranges_outside_guest_ram() {
    let _kvm = kvm_test();
    use migration::DestinationVm;
    let cfg = shape("ferry-2.0", 16, 1);
    let mut vm = Vm::new(&cfg).unwrap();
    let mut h = VmMigration::new(&mut vm);
    let page = vec![0x5au8; 4096];
    assert!(
        h.write_ram(0, 1, Some(&page))
            .unwrap_err()
            .contains("outside an incoming migration")
    );
    h.begin_incoming().unwrap();
    let e = h
        .write_ram((16 << 20) - 4096, 2, Some(&[7u8; 8192]))
        .unwrap_err();
    assert_eq!(
        e,
        "Guest RAM error: Range 0xfff000..0x1001000 is not guest RAM (RAM is 0x0+16 MiB); nothing was written"
    );
    assert!(h.write_ram(!4095, 1, None).is_err());
    h.write_ram(0x10_0000, 1, Some(&page)).unwrap();
    h.write_ram(0x10_0000, 4, None).unwrap();
    assert_eq!(h.ram_stats().zero_pages_cleared, 1);
    h.abort_incoming("test over");
    drop(h);
    let mut last = [1u8; 8];
    vm.ram().read_range((16 << 20) - 8, &mut last).unwrap();
    assert_eq!(last, [0; 8], "the refused record wrote nothing");
    assert_eq!(vm.run_state(), RunState::InMigrate);
}
