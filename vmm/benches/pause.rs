//! Pause latency and full-state capture time for 1, 2 and 4 vCPUs, on real KVM.
//!
//! `cargo bench -p vmm --bench pause`. vCPU 0 runs the dirtying guest (4 MiB working set),
//! the other vCPUs idle in `hlt`. Each sample: let the guest complete a pass, pause (time
//! until every vCPU acknowledged), capture the whole VM state (time), resume. Medians of
//! n samples; the host is software-virtualised and shared, so look at medians only.

use std::time::{Duration, Instant};

use vmm::Vm;
use vmm::config::{GuestSpec, VmConfig};

const SAMPLES: usize = 40;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("/dev/kvm is not available ({e}); this benchmark needs real KVM");
        std::process::exit(1);
    }
    println!(
        "{:>6} {:>4} {:>14} {:>14} {:>14} {:>14}",
        "vcpus", "n", "pause p50", "pause p90", "save p50", "save p90"
    );
    for vcpus in [1u8, 2, 4] {
        let config = VmConfig {
            memory_size: 64 << 20,
            vcpus,
            machine: machine_types::newest(),
            ..Default::default()
        };
        let mut vm = Vm::new(&config).expect("create VM");
        vm.load_guest(&GuestSpec::dirty_mib(4)).expect("load guest");
        vm.resume().expect("start");
        let mut pause = Vec::with_capacity(SAMPLES);
        let mut save = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let next = vm.progress().last_pass() + 1;
            vm.wait_for_pass(next, Duration::from_secs(60))
                .expect("guest progress");
            let t = Instant::now();
            vm.pause().expect("pause");
            pause.push(t.elapsed());
            let t = Instant::now();
            let state = vm.save_state().expect("save");
            save.push(t.elapsed());
            std::hint::black_box(state);
            vm.resume().expect("resume");
        }
        vm.pause().unwrap();
        vm.verify_guest_pattern()
            .expect("pattern intact after the benchmark");
        println!(
            "{vcpus:>6} {SAMPLES:>4} {:>14?} {:>14?} {:>14?} {:>14?}",
            percentile(&mut pause, 0.5),
            percentile(&mut pause, 0.9),
            percentile(&mut save, 0.5),
            percentile(&mut save, 0.9),
        );
    }
}
