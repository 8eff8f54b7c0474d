//! The engine over real loopback TCP sockets and real files, against a small in-memory VM
//! whose "guest" thread keeps dirtying pages while it runs. Migrations of real KVM guests are in
//! `vmm/tests/` (in-process) and `tests/` (between `ferry` processes); these pin the
//! protocol's rules without KVM.

use devstate::{Catalog, RawSection, Section, record};
use machine_types::MachineType;
use migration::{
    ConfigRecord, DestinationVm, DirtyRegion, Incoming, MigrationError, Params, Progress,
    RegionDesc, SourceVm, Status,
};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const PAGE: usize = 4096;

record! {
    /// The fake device's whole state.
    pub struct Counter {
        pub value: u64,
    }
}

impl Section for Counter {
    const NAME: &'static str = "counter";
    const VERSION: u32 = 1;
    const MIN_VERSION: u32 = 1;
    const REQUIRED: bool = true;
}

struct Shared {
    mem: Mutex<Vec<u8>>,
    dirty: Mutex<Vec<u64>>,
    running: AtomicBool,
    stop: AtomicBool,
    passes: AtomicU64,
}

/// A VM whose guest thread increments byte 0 of every page of a working set, pass after pass.
struct MemVm {
    s: Arc<Shared>,
    guest: Option<thread::JoinHandle<()>>,
    machine: &'static MachineType,
    vcpus: u32,
    counter: u64,
    loaded: Option<u64>,
    committed: Option<bool>,
    aborted: Option<String>,
    /// Report the whole working set dirty at every sync (a dirty rate no bandwidth beats),
    /// independent of how the guest thread happens to be scheduled.
    always_dirty: Option<usize>,
    /// Time each `read_ram` takes (a slow source: memory the host must fault in).
    read_delay: Duration,
}

impl MemVm {
    fn new(pages: usize, working_set: usize, machine: &str) -> MemVm {
        let s = Arc::new(Shared {
            mem: Mutex::new(vec![0; pages * PAGE]),
            dirty: Mutex::new(vec![0; pages.div_ceil(64)]),
            running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            passes: AtomicU64::new(0),
        });
        let g = s.clone();
        let guest = thread::spawn(move || {
            while !g.stop.load(Ordering::SeqCst) {
                if !g.running.load(Ordering::SeqCst) {
                    thread::park_timeout(Duration::from_millis(5));
                    continue;
                }
                for p in 0..working_set {
                    let mut m = g.mem.lock().unwrap();
                    if !g.running.load(Ordering::SeqCst) {
                        break;
                    }
                    m[p * PAGE] = m[p * PAGE].wrapping_add(1);
                    g.dirty.lock().unwrap()[p / 64] |= 1 << (p % 64);
                }
                g.passes.fetch_add(1, Ordering::SeqCst);
            }
        });
        MemVm {
            s,
            guest: Some(guest),
            machine: MachineType::lookup(machine).unwrap(),
            vcpus: 1,
            counter: 7,
            loaded: None,
            committed: None,
            aborted: None,
            always_dirty: None,
            read_delay: Duration::ZERO,
        }
    }

    fn running(self) -> Self {
        self.s.running.store(true, Ordering::SeqCst);
        self
    }

    fn wait_passes(&self, n: u64) {
        let start = self.s.passes.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.s.passes.load(Ordering::SeqCst) < start + n {
            assert!(
                std::time::Instant::now() < deadline,
                "guest did not make {n} passes in 10 s"
            );
            thread::yield_now();
        }
    }

    fn mem(&self) -> Vec<u8> {
        self.s.mem.lock().unwrap().clone()
    }
}

impl Drop for MemVm {
    fn drop(&mut self) {
        self.s.stop.store(true, Ordering::SeqCst);
        if let Some(g) = self.guest.take() {
            g.thread().unpark();
            g.join().unwrap();
        }
    }
}

fn config(vm: &MemVm) -> ConfigRecord {
    ConfigRecord {
        machine: vm.machine.name().into(),
        cpu_model: vm.machine.compat().cpu_model.name().into(),
        vcpus: vm.vcpus,
        memory: vec![RegionDesc {
            gpa: 0,
            size: vm.s.mem.lock().unwrap().len() as u64,
        }],
        devices: vec![],
    }
}

impl SourceVm for MemVm {
    fn machine(&self) -> &'static MachineType {
        self.machine
    }
    fn config(&self) -> ConfigRecord {
        config(self)
    }
    fn is_running(&self) -> bool {
        self.s.running.load(Ordering::SeqCst)
    }
    fn pause(&mut self) -> Result<(), String> {
        self.s.running.store(false, Ordering::SeqCst);
        // Wait out a pass in flight: take the memory lock once.
        drop(self.s.mem.lock().unwrap());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.s.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<(), String> {
        self.s.dirty.lock().unwrap().fill(0);
        Ok(())
    }
    fn stop_dirty_log(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn take_dirty(&mut self) -> Result<Vec<DirtyRegion>, String> {
        let pages = self.s.mem.lock().unwrap().len() as u64 / PAGE as u64;
        let mut d = self.s.dirty.lock().unwrap();
        let n = d.len();
        let mut bitmap = std::mem::replace(&mut *d, vec![0; n]);
        if let Some(ws) = self.always_dirty {
            for p in 0..ws {
                bitmap[p / 64] |= 1 << (p % 64);
            }
        }
        Ok(vec![DirtyRegion {
            gpa: 0,
            pages,
            bitmap,
        }])
    }
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        thread::sleep(self.read_delay);
        let m = self.s.mem.lock().unwrap();
        buf.copy_from_slice(&m[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
    fn save_devices(&mut self, m: &MachineType) -> Result<Vec<Vec<u8>>, String> {
        let mut c = Counter {
            value: self.counter,
        };
        Ok(vec![
            devstate::encode_section(&mut c, 0, m, devstate::Tag::Section).unwrap(),
        ])
    }
}

impl DestinationVm for MemVm {
    fn machine(&self) -> &'static MachineType {
        self.machine
    }
    fn config(&self) -> ConfigRecord {
        config(self)
    }
    fn catalog(&self) -> Catalog {
        let mut c = Catalog::new();
        c.register::<Counter>();
        c
    }
    fn expected_sections(&self) -> Vec<(String, u32)> {
        vec![]
    }
    fn begin_incoming(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn write_ram(&mut self, gpa: u64, pages: u32, data: Option<&[u8]>) -> Result<(), String> {
        let mut m = self.s.mem.lock().unwrap();
        let (start, len) = (gpa as usize, pages as usize * PAGE);
        if start.checked_add(len).is_none_or(|e| e > m.len()) {
            return Err(format!("page range {gpa:#x}+{len:#x} is outside guest RAM"));
        }
        match data {
            Some(d) => m[start..start + len].copy_from_slice(d),
            None => m[start..start + len].fill(0),
        }
        Ok(())
    }
    fn load_devices(&mut self, sections: &[RawSection]) -> Result<(), String> {
        let c: Counter = sections[0].load().map_err(|e| e.to_string())?;
        self.loaded = Some(c.value);
        Ok(())
    }
    fn commit(&mut self, run: bool) -> Result<(), String> {
        // Recorded, not acted on, so the test can compare memory exactly as it was switched.
        self.committed = Some(run);
        Ok(())
    }
    fn abort_incoming(&mut self, why: &str) {
        self.aborted = Some(why.to_owned());
    }
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    (l, uri)
}

/// Run a destination thread; returns its join handle yielding (result, vm).
fn destination(
    l: TcpListener,
    mut dst: MemVm,
    params: Params,
) -> thread::JoinHandle<(Result<(), MigrationError>, MemVm)> {
    thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let r = migration::receive(
            &mut dst,
            Incoming::Tcp(s.into()),
            &params,
            &Progress::default(),
        );
        (r, dst)
    })
}

#[test]
fn live_migration_converges_and_memory_matches() {
    let (l, uri) = listener();
    let mut src = MemVm::new(2048, 64, "ferry-2.0").running();
    src.wait_passes(3);
    let dst = destination(l, MemVm::new(2048, 64, "ferry-2.0"), Params::default());
    let progress = Progress::default();
    migration::send(&mut src, &uri, &Params::default(), &progress).unwrap();
    let (res, dst) = dst.join().unwrap();
    res.unwrap();
    assert!(!src.is_running(), "source must stay stopped after COMMIT");
    assert_eq!(dst.committed, Some(true));
    assert_eq!(dst.loaded, Some(7));
    let snap = progress.snapshot();
    assert_eq!(snap.status, Status::Completed);
    assert!(
        snap.iterations >= 1 && snap.zero_pages > 0 && snap.normal_pages >= 64,
        "{snap:?}"
    );
    assert!(
        snap.transferred < 2048 * PAGE as u64,
        "zero pages must not travel as data: {snap:?}"
    );
    assert_same_memory(&src.mem(), &dst.mem());
}

/// A pass of zero pages that outlasts the destination's I/O timeout: the source flushes
/// what it sent now and then, so the destination hears it and the migration completes.
#[test]
fn a_slow_pass_of_zero_pages_keeps_the_destination_hearing_from_the_source() {
    let (l, uri) = listener();
    // 16384 pages in 64 reads of 40 ms: pass 0 takes about 2.6 s and its ZERO records are
    // a few KiB, far less than the stream buffer.
    let mut src = MemVm::new(16384, 0, "ferry-2.0");
    src.read_delay = Duration::from_millis(40);
    let dst_params = Params {
        io_timeout: Duration::from_millis(1000),
        ..Params::default()
    };
    let dst = destination(l, MemVm::new(16384, 0, "ferry-2.0"), dst_params);
    let progress = Progress::default();
    let r = migration::send(&mut src, &uri, &Params::default(), &progress);
    let (res, dst) = dst.join().unwrap();
    res.expect("the destination timed out waiting for a pass that was being sent");
    r.unwrap();
    assert_eq!(dst.committed, Some(false));
    assert_same_memory(&src.mem(), &dst.mem());
}

fn assert_same_memory(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len());
    if let Some(p) = a.chunks(PAGE).zip(b.chunks(PAGE)).position(|(x, y)| x != y) {
        panic!(
            "memory differs first at page {p} (source byte {}, destination byte {})",
            a[p * PAGE],
            b[p * PAGE]
        );
    }
}

#[test]
fn configuration_mismatch_is_refused_before_ram_and_source_runs_on() {
    let (l, uri) = listener();
    let mut src = MemVm::new(256, 8, "ferry-1.1").running();
    let mut other = MemVm::new(512, 8, "ferry-1.1");
    other.vcpus = 2;
    let dst = destination(l, other, Params::default());
    let progress = Progress::default();
    let err = migration::send(&mut src, &uri, &Params::default(), &progress).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Destination refused the migration: vCPUs: source 1, destination 2; memory region 0: source 0x0+1 MiB, destination 0x0+2 MiB"
    );
    let (res, dst) = dst.join().unwrap();
    assert!(matches!(res, Err(MigrationError::Refused(_))));
    assert!(dst.loaded.is_none() && dst.committed.is_none());
    assert!(src.is_running());
    assert_eq!(progress.snapshot().transferred, 0, "no RAM moved");
    assert_eq!(progress.status(), Status::Failed);
    src.wait_passes(2);
}

#[test]
fn machine_type_mismatch_is_refused() {
    let (l, uri) = listener();
    let mut src = MemVm::new(64, 4, "ferry-1.0").running();
    let dst = destination(l, MemVm::new(64, 4, "ferry-2.0"), Params::default());
    let err =
        migration::send(&mut src, &uri, &Params::default(), &Progress::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Destination refused the migration: machine type: source ferry-1.0, destination ferry-2.0"
    );
    dst.join().unwrap().0.unwrap_err();
    assert!(src.is_running());
}

#[test]
fn destination_load_failure_resumes_the_source() {
    let (l, uri) = listener();
    let mut src = MemVm::new(64, 4, "ferry-2.0").running();
    src.counter = 9;
    let dst = thread::spawn(move || {
        let mut d = MemVm::new(64, 4, "ferry-2.0");
        let (s, _) = l.accept().unwrap();
        // Reject by expecting a section the source never sends.
        struct Wrap<'a>(&'a mut MemVm);
        impl DestinationVm for Wrap<'_> {
            fn machine(&self) -> &'static MachineType {
                self.0.machine
            }
            fn config(&self) -> ConfigRecord {
                config(self.0)
            }
            fn catalog(&self) -> Catalog {
                DestinationVm::catalog(self.0)
            }
            fn expected_sections(&self) -> Vec<(String, u32)> {
                vec![("counter".into(), 1)]
            }
            fn begin_incoming(&mut self) -> Result<(), String> {
                Ok(())
            }
            fn write_ram(&mut self, g: u64, p: u32, d: Option<&[u8]>) -> Result<(), String> {
                self.0.write_ram(g, p, d)
            }
            fn load_devices(&mut self, s: &[RawSection]) -> Result<(), String> {
                self.0.load_devices(s)
            }
            fn commit(&mut self, run: bool) -> Result<(), String> {
                self.0.commit(run)
            }
            fn abort_incoming(&mut self, why: &str) {
                self.0.abort_incoming(why)
            }
        }
        let r = migration::receive(
            &mut Wrap(&mut d),
            Incoming::Tcp(s.into()),
            &Params::default(),
            &Progress::default(),
        );
        (r, d)
    });
    let progress = Progress::default();
    let err = migration::send(&mut src, &uri, &Params::default(), &progress).unwrap_err();
    assert!(
        err.to_string()
            .contains("Missing section 'counter' instance 1"),
        "source must hear the destination's reason: {err}"
    );
    let (res, d) = dst.join().unwrap();
    assert!(res.is_err());
    assert!(d.aborted.is_some() && d.committed.is_none());
    assert!(
        src.is_running(),
        "the source resumes after a failure before COMMIT"
    );
    src.wait_passes(2);
}

#[test]
fn connection_dropped_before_commit_resumes_the_source() {
    let (l, uri) = listener();
    let mut src = MemVm::new(512, 16, "ferry-2.0").running();
    // Pass 0 then carries 16 DATA pages, more than the peer reads before hanging up, however
    // late the guest thread gets scheduled.
    src.wait_passes(1);
    // A peer that handshakes, accepts, reads some RAM and hangs up.
    let peer = thread::spawn(move || {
        use migration::protocol::{Hello, Kind, Msg};
        use std::io::Read;
        let (mut s, _) = l.accept().unwrap();
        Hello::read(&mut s).unwrap();
        Msg::new(Kind::HelloAck, 1).write(&mut s).unwrap();
        let mut buf = vec![0u8; 1024];
        s.read_exact(&mut buf[..100]).unwrap();
        Msg::new(Kind::Accept, 0).write(&mut s).unwrap();
        // Some RAM, then hang up.
        s.read_exact(&mut buf).unwrap();
    });
    let progress = Progress::default();
    let err = migration::send(&mut src, &uri, &Params::default(), &progress).unwrap_err();
    peer.join().unwrap();
    assert!(matches!(err, MigrationError::Io { .. }), "{err}");
    assert!(src.is_running());
    assert_eq!(progress.status(), Status::Failed);
    src.wait_passes(2);
}

/// 256 always-dirty pages (1 MiB) over an 8 MiB/s link: at least 125 ms to send, however fast
/// the build copies memory.
const CAPPED_MS: u64 = 125;

/// Check the figures of a pass that did not converge over the 8 MiB/s link.
fn assert_capped(snap: &migration::Snapshot) {
    assert_eq!(snap.remaining, 256 * PAGE as u64, "{snap:?}");
    assert!(
        snap.expected_downtime_ms >= CAPPED_MS,
        "the estimate must use the capped bandwidth: {snap:?}"
    );
    assert!(
        snap.mbps <= (8 << 20) as f64 * 8.0 / 1e6,
        "the reported bandwidth must not exceed the cap: {snap:?}"
    );
}

#[test]
fn no_convergence_cancels_by_default_and_forces_when_asked() {
    // The dirty set never shrinks (`always_dirty`), so no pass can converge in 0 ms, whatever
    // the build's speed: the outcome depends on the policy only.
    let params = Params {
        downtime_limit_ms: 0,
        max_iterations: 2,
        max_bandwidth: 8 << 20,
        ..Params::default()
    };
    let (l, uri) = listener();
    let mut src = MemVm::new(512, 256, "ferry-2.0").running();
    src.always_dirty = Some(256);
    let dst = destination(l, MemVm::new(512, 256, "ferry-2.0"), params.clone());
    let progress = Progress::default();
    let err = migration::send(&mut src, &uri, &params, &progress).unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::NotConverged {
                iterations: 2,
                expected_ms: CAPPED_MS..,
                limit_ms: 0,
            }
        ),
        "{err}"
    );
    assert_eq!(progress.status(), Status::Failed);
    assert_capped(&progress.snapshot());
    assert!(src.is_running());
    let (res, _) = dst.join().unwrap();
    let why = migration::chain(&res.unwrap_err());
    assert!(
        why.contains("The source abandoned the migration") && why.contains("did not converge"),
        "the destination must hear why: {why}"
    );

    let forced = Params {
        switchover_policy: migration::SwitchoverPolicy::Force,
        ..params
    };
    let (l, uri) = listener();
    let dst = destination(l, MemVm::new(512, 256, "ferry-2.0"), forced.clone());
    let progress = Progress::default();
    migration::send(&mut src, &uri, &forced, &progress).unwrap();
    assert!(dst.join().unwrap().0.is_ok());
    assert!(!src.is_running());
    let snap = progress.snapshot();
    assert_eq!(snap.status, Status::Completed);
    assert_eq!(snap.iterations, 2, "forced after max_iterations: {snap:?}");
    assert_capped(&snap);
}

#[test]
fn capped_link_is_not_judged_converged_early() {
    // 1 MiB left fits in 100 ms at memory speed but not at 8 MiB/s: the cap decides.
    let params = Params {
        downtime_limit_ms: 100,
        max_iterations: 3,
        max_bandwidth: 8 << 20,
        ..Params::default()
    };
    let (l, uri) = listener();
    let mut src = MemVm::new(512, 256, "ferry-2.0").running();
    src.always_dirty = Some(256);
    let dst = destination(l, MemVm::new(512, 256, "ferry-2.0"), params.clone());
    let progress = Progress::default();
    let err = migration::send(&mut src, &uri, &params, &progress).unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::NotConverged {
                iterations: 3,
                expected_ms: CAPPED_MS..,
                limit_ms: 100,
            }
        ),
        "{err}"
    );
    assert_capped(&progress.snapshot());
    assert!(src.is_running());
    let (res, d) = dst.join().unwrap();
    assert!(res.is_err() && d.committed.is_none());
}

#[test]
fn cancel_mid_way_resumes_the_source() {
    let params = Params {
        downtime_limit_ms: 0,
        max_iterations: 1000,
        max_bandwidth: 4 << 20,
        ..Params::default()
    };
    let (l, uri) = listener();
    let mut src = MemVm::new(1024, 512, "ferry-2.0").running();
    src.always_dirty = Some(512);
    let dst = destination(l, MemVm::new(1024, 512, "ferry-2.0"), params.clone());
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let canceller = thread::spawn(move || {
        p.wait_for(Duration::from_secs(10), |s| s == Status::Active)
            .expect("migration never became active");
        p.cancel();
    });
    let err = migration::send(&mut src, &uri, &params, &progress).unwrap_err();
    canceller.join().unwrap();
    assert!(
        matches!(err, MigrationError::Cancelled | MigrationError::Io { .. }),
        "{err}"
    );
    assert_eq!(progress.status(), Status::Cancelled);
    assert!(src.is_running());
    let (res, d) = dst.join().unwrap();
    assert!(res.is_err() && d.committed.is_none());
}

#[test]
fn file_migration_round_trips_and_destination_resumes() {
    let path = std::env::temp_dir().join(format!("ferry-engine-{}.state", std::process::id()));
    let mut src = MemVm::new(256, 32, "ferry-1.0").running();
    src.wait_passes(2);
    let uri = format!("file:{}", path.display());
    migration::send(&mut src, &uri, &Params::default(), &Progress::default()).unwrap();
    assert!(!src.is_running());
    let mut dst = MemVm::new(256, 32, "ferry-1.0");
    let f = std::fs::File::open(&path).unwrap();
    migration::receive(
        &mut dst,
        Incoming::File(f),
        &Params::default(),
        &Progress::default(),
    )
    .unwrap();
    assert_eq!(dst.committed, Some(true));
    assert_same_memory(&src.mem(), &dst.mem());
    std::fs::remove_file(&path).ok();
}
