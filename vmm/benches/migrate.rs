//! Live migration over loopback TCP between two VMs of this process, on real KVM.
//!
//! `cargo bench -p vmm --bench migrate` (set `FERRY_BENCH_RUNS` to change n, default 11).
//! Guests of 256 MiB and 1 GiB, idle or dirtying a 64 MiB working set at full speed; the
//! configurations are interleaved run by run (the host is software-virtualised and shared,
//! so only medians mean anything). Each run boots a fresh source and a fresh destination,
//! migrates with default parameters (300 ms downtime limit), checks the destination guest
//! runs on (and, for the dirtying guest, its memory pattern), and records the engine's
//! figures: total time, source-side downtime (pause to COMMIT acknowledged), bytes sent,
//! stream throughput (bytes sent over total time), guest RAM moved per second (RAM size over
//! total time; zero pages travel as markers), pre-copy iterations, the destination's time
//! from accept to COMMIT and how many ZERO pages it had to clear (0 on a fresh VM).

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use migration::{ConfigRecord, DirtyRegion, Incoming, Params, Progress, Snapshot, SourceVm};
use vmm::Vm;
use vmm::config::{GuestSpec, VmConfig};
use vmm::guest::mailbox::STATUS_IDLE;
use vmm::migrate::{RamStats, VmMigration};

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
struct Case {
    memory_mib: u64,
    guest: GuestSpec,
}

impl Case {
    fn name(&self) -> String {
        let g = match self.guest {
            GuestSpec::Idle => "idle".to_owned(),
            GuestSpec::Dirty { working_set, .. } => format!("dirty {} MiB", working_set >> 20),
            GuestSpec::Bootsector { .. } => "bootsector".to_owned(),
        };
        format!("{:>4} MiB {g}", self.memory_mib)
    }
}

/// The source handle, timing the calls made while the guest is stopped.
struct Timed<'a> {
    inner: VmMigration<'a>,
    stopped: bool,
    pause_ms: f64,
    dirty_ms: f64,
    save_ms: f64,
    unlog_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

impl SourceVm for Timed<'_> {
    fn machine(&self) -> &'static machine_types::MachineType {
        self.inner.machine()
    }
    fn config(&self) -> ConfigRecord {
        SourceVm::config(&self.inner)
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn pause(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let r = self.inner.pause();
        self.pause_ms = ms(t);
        self.stopped = true;
        r
    }
    fn resume(&mut self) -> Result<(), String> {
        self.inner.resume()
    }
    fn start_dirty_log(&mut self) -> Result<(), String> {
        self.inner.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let r = self.inner.stop_dirty_log();
        self.unlog_ms = ms(t);
        r
    }
    fn take_dirty(&mut self) -> Result<Vec<DirtyRegion>, String> {
        let t = Instant::now();
        let r = self.inner.take_dirty();
        if self.stopped {
            self.dirty_ms = ms(t);
        }
        r
    }
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.inner.read_ram(gpa, buf)
    }
    fn save_devices(&mut self, m: &machine_types::MachineType) -> Result<Vec<Vec<u8>>, String> {
        let t = Instant::now();
        let r = self.inner.save_devices(m);
        self.save_ms = ms(t);
        r
    }
    fn handed_over(&mut self) {
        self.inner.handed_over();
    }
}

struct Sample {
    /// Inside the downtime: pause, last dirty sync, device save, dirty-log teardown (ms).
    parts: [f64; 4],
    snap: Snapshot,
    dst: RamStats,
    /// From the destination accepting the connection to COMMIT processed.
    dst_ms: u64,
}

fn wait_started(vm: &Vm, guest: &GuestSpec) {
    let deadline = Instant::now() + TIMEOUT;
    match guest {
        GuestSpec::Dirty { .. } => {
            vm.wait_for_pass(2, TIMEOUT).expect("source guest progress");
        }
        GuestSpec::Idle => {
            while vm.mailbox().expect("mailbox").status != STATUS_IDLE {
                assert!(Instant::now() < deadline, "idle guest did not start");
                std::thread::yield_now();
            }
        }
        GuestSpec::Bootsector { .. } => unreachable!("this bench runs the built-in guest only"),
    }
}

fn run_once(case: Case) -> Sample {
    let cfg = VmConfig {
        memory_size: case.memory_mib << 20,
        vcpus: 1,
        machine: machine_types::newest(),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!("tcp:{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    let dst_cfg = cfg.clone();
    let guest = case.guest;
    let dst = std::thread::spawn(move || {
        let mut vm = Vm::new(&dst_cfg).expect("destination VM");
        let (sock, _) = listener.accept().expect("accept");
        let t = Instant::now();
        let mut h = VmMigration::new(&mut vm);
        migration::receive(
            &mut h,
            Incoming::Tcp(sock.into()),
            &Params::default(),
            &Progress::default(),
        )
        .unwrap_or_else(|e| panic!("destination: {}", migration::chain(&e)));
        let dst_ms = t.elapsed().as_millis() as u64;
        let stats = h.ram_stats();
        drop(h);
        if let GuestSpec::Dirty { .. } = guest {
            let pass = vm.progress().last_pass();
            vm.wait_for_pass(pass + 1, TIMEOUT)
                .expect("destination guest progress");
            vm.pause().unwrap();
            vm.verify_guest_pattern()
                .expect("pattern intact on the destination");
        }
        tx.send((stats, dst_ms)).unwrap();
    });
    let mut src = Vm::new(&cfg).expect("source VM");
    src.load_guest(&case.guest).expect("load guest");
    src.resume().expect("start");
    wait_started(&src, &case.guest);
    let progress = Progress::default();
    let mut h = Timed {
        inner: VmMigration::new(&mut src),
        stopped: false,
        pause_ms: 0.0,
        dirty_ms: 0.0,
        save_ms: 0.0,
        unlog_ms: 0.0,
    };
    migration::send(&mut h, &uri, &Params::default(), &progress)
        .unwrap_or_else(|e| panic!("source: {}", migration::chain(&e)));
    let parts = [h.pause_ms, h.dirty_ms, h.save_ms, h.unlog_ms];
    let snap = progress.snapshot();
    let (dst_stats, dst_ms) = rx.recv_timeout(TIMEOUT).expect("destination done");
    dst.join().unwrap();
    Sample {
        parts,
        snap,
        dst: dst_stats,
        dst_ms,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(11)
        .max(1);
    let cases = [
        Case {
            memory_mib: 256,
            guest: GuestSpec::Idle,
        },
        Case {
            memory_mib: 256,
            guest: GuestSpec::dirty_mib(64),
        },
        Case {
            memory_mib: 1024,
            guest: GuestSpec::Idle,
        },
        Case {
            memory_mib: 1024,
            guest: GuestSpec::dirty_mib(64),
        },
    ];
    let started = Instant::now();
    let mut samples: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, c) in cases.iter().enumerate() {
            samples[i].push(run_once(*c));
        }
    }
    println!(
        "{:<20} {:>3} {:>10} {:>11} {:>9} {:>9} {:>12} {:>6} {:>9} {:>10}   downtime parts ms: pause/last sync/save/unlog",
        "case",
        "n",
        "total ms",
        "downtime ms",
        "Gbit/s",
        "RAM GiB/s",
        "bytes sent",
        "iters",
        "dst ms",
        "zero clr",
    );
    for (c, s) in cases.iter().zip(&samples) {
        let col = |f: &dyn Fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let total = col(&|x| x.snap.total_time_ms as f64);
        let down = col(&|x| x.snap.downtime_ms as f64);
        let gbit = col(&|x| {
            x.snap.transferred as f64 * 8.0 / (x.snap.total_time_ms.max(1) as f64 / 1000.0) / 1e9
        });
        let ram = col(&|x| {
            x.snap.total as f64
                / (1u64 << 30) as f64
                / (x.snap.total_time_ms.max(1) as f64 / 1000.0)
        });
        let bytes = col(&|x| x.snap.transferred as f64);
        let iters = col(&|x| x.snap.iterations as f64);
        let dst_ms = col(&|x| x.dst_ms as f64);
        let cleared = col(&|x| x.dst.zero_pages_cleared as f64);
        println!(
            "{:<20} {:>3} {:>10.0} {:>11.0} {:>9.2} {:>9.2} {:>12.0} {:>6.1} {:>9.0} {:>10.0}   {:.1}/{:.1}/{:.1}/{:.1}",
            c.name(),
            s.len(),
            total,
            down,
            gbit,
            ram,
            bytes,
            iters,
            dst_ms,
            cleared,
            col(&|x| x.parts[0]),
            col(&|x| x.parts[1]),
            col(&|x| x.parts[2]),
            col(&|x| x.parts[3]),
        );
    }
    println!(
        "(medians of {runs} interleaved runs; {:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
}
