//! Ferry against QEMU, like for like (design rule 11): the same 512-byte boot sector (Ferry's
//! own a-b-bootblock, [`vmm::guest::bootsector`]) runs on `ferry run --guest bootsector:IMG`
//! and on `qemu-system-x86_64 -accel kvm -machine pc -drive file=IMG,format=raw`, and each
//! is migrated live between two processes of its kind over loopback TCP, driven over QMP.
//! QEMU runs twice: as it comes, and with `multifd` on both sides (`multifd-channels` 2).
//!
//! `cargo bench -p vmm --bench qemu_compare`. Environment:
//! - `QC_RUNS` (default 10): runs per case and hypervisor;
//! - `QC_CASES`: comma-separated case names to run. Default, the dense cases (the guest
//!   rewrites every byte of each working-set page with xorshift32 data each pass in ring 3,
//!   and checks each page on the next pass: nothing for zero pages, SPARSE, XBZRLE or a
//!   compressor to shrink): `1g-dense64`, `1g-dense256` (1 GiB, rewriting 64 / 256 MiB),
//!   `2g-dense-once` (2 GiB written once, then ticking without writing; the destination
//!   starts 10 s before `migrate`, as an operator would start it), `4g-idle` (4 GiB, one
//!   page written, then ticking). SPARSE-friendly cases, QEMU's a-b-bootblock pattern of
//!   one byte per page (nearly all-zero pages, which Ferry's SPARSE records carry in 72
//!   bytes; reported apart as the compression they are): `1g-idle`, `1g-dirty64`,
//!   `1g-dirty99`, `2g-once`, `1g-dirty512`, `4g-dirty64`, `4g-dirty512`. Convergence
//!   (issue 16), only when named: `2g-dense1024-ac`, a 2 GiB dense guest rewriting 1 GiB,
//!   `downtime-limit` 100 ms, capability `auto-converge` on both hypervisors with QEMU's
//!   throttle defaults (20/10/99, threshold 50) and Ferry's `__org.ferry_max-iterations` at
//!   10000 (QEMU's passes are unbounded); each round also runs `ferry-noac` and `qemu-noac`
//!   (auto-converge off, cancelled after 60 s: "did not converge"). Per run: converged or
//!   not, peak `cpu-throttle-percentage` (polled; Ferry also reports its peak), the guest's
//!   page rate from the migrate to the source's last tick against the same length of time
//!   before it (passes after the first), the guest run time lost (that window times one
//!   less the ratio), the longest gap between source ticks meanwhile (a throttle's
//!   sleep), and the share of one CPU the source's vCPU thread ran and waited for a CPU
//!   from `migrate` to completion (`/proc/PID/task/*/schedstat`; QEMU runs with
//!   `debug-threads=on`); blackout there runs from the source's last tick;
//! - `QC_POSTCOPY=1`: in the convergence cases, also Ferry (`ferry-postcopy`, its fault
//!   latency from `query-migrate`) and QEMU with `postcopy-ram` on both sides
//!   (`qemu-postcopy`, no auto-converge), `migrate-start-postcopy` once its first pass is
//!   done; its progress counts both guests' ticks up to completion, and a note gives the
//!   destination's `postcopy-blocktime` (QEMU 7.2 has no per-fault latency);
//! - `QC_NOAC=0`: no `-noac` runs; `QC_AC_MIBS=N`: `max-bandwidth` N MiB/s on both sides in
//!   the convergence cases (a link slower than the guest, so that the throttle engages);
//! - `QC_QEMU` (default `qemu-system-x86_64`); QEMU is skipped with a note if it is absent;
//! - `QC_MULTIFD=0`: no QEMU multifd runs;
//! - `QC_KEEP=DIR`: keep images, logs and serial captures there;
//! - `QC_WARM_GIB` (default: 3x the largest case, within available memory): host memory to
//!   touch once before the first run. This machine is itself virtualised; memory it never
//!   touched costs its hypervisor a fault per page, which would land in whichever run comes
//!   first. `0` skips it;
//! - `QC_FERRY_SPARSE=0`: Ferry sends every page whole (`__org.ferry_sparse-pages` off);
//! - `QC_QEMU_XBZRLE=1`: QEMU with its `xbzrle` capability (delta-encodes re-sent pages
//!   against a cache of sent ones; off by default in QEMU);
//! - `QC_TLS=1`: also run Ferry and QEMU with mutual TLS on the migration channel
//!   (`ferry-tls`, `qemu-tls`): the same `tls-creds-x509` objects (ECDSA P-256 certificates
//!   made for the run, `verify-peer` on) on both; the summary adds each one's TLS cost as the
//!   median of paired ratios to its own plain runs;
//! - `QC_FERRY_LOG` (default `warn`): `RUST_LOG` for the Ferry processes (their logs are kept
//!   with `QC_KEEP`).
//! - `QC_LEVERS=1`: ablation. One more Ferry run per speed lever of `migration::levers`, with
//!   that lever off (`FERRY_LEVERS_OFF=LEVER` in the environment of both Ferry processes):
//!   `-prefault`, `-known-zero`, `-direct-send`, `-direct-receive`, `-shrink-passes`,
//!   `-prefault-pause`, `-vcpu-slice`
//!   (`QC_LEVERS=name,...`: only those levers). The summary gives each
//!   one's `lever cost` as the median of paired ratios to plain `ferry` of the same rounds
//!   (total, blackout, downtime; above 1 means the lever saves that much);
//! - `QC_FERRY_NICE=0,10`: one more Ferry run per listed `__org.ferry_page-thread-nice` value
//!   (`ferry-nice0`, `ferry-nice10`, set on both sides; 0 is Ferry's priority without
//!   auto-converge; `d19`: 19 on the destination only, `ferry-dnice19`, as
//!   if it ran on another host), reported like the levers and, in the convergence cases,
//!   against QEMU;
//! - `QC_FERRY_CHANNELS=0,1,4`: one more Ferry run per listed page-channel count
//!   (`ferry-ch0`, `ferry-ch1`, ...: `multifd-channels` N, 0 to 8, on both sides; plain
//!   `ferry` has Ferry's default of 2), reported like the levers against plain `ferry`;
//! - `QC_SCALING=1`: the scaling cases, per size S of `QC_SIZES` (default `1,2,4,8`, in GiB;
//!   a size is skipped with a note when two guests of it and 1 GiB more exceed
//!   `MemAvailable`): `scale-idle-Sg` (like `4g-idle`: one page written, then ticking) and
//!   `scale-dense-Sg` (like `1g-dense256`: 256 MiB rewritten each pass) in an S GiB guest. Without `QC_CASES` only these run. The
//!   summary adds a table of medians per size, kind and hypervisor and an SVG plot of total
//!   time against size, written to `QC_PLOT` (default `DIR/scaling.svg` with `QC_KEEP=DIR`,
//!   else `qemu_compare_scaling.svg` in the cargo target directory; the path is printed).
//!
//! Runs are interleaved: run r of every case runs Ferry, QEMU and QEMU multifd (and the
//! variants asked for) in turn, who goes first rotating with r. Each run of Ferry is paired
//! with the run of each baseline in the same round; the summary gives the median of those
//! paired ratios (not a ratio of medians) next to the medians of the absolute figures. Every
//! side gets `downtime-limit` 300 ms and `max-bandwidth` 100 GiB/s. Per run: total time,
//! source-side downtime and bytes sent from the source's `query-migrate` (Ferry's downtime runs
//! until the destination acknowledged COMMIT, QEMU's until its last byte is sent, so they do
//! not compare); RAM throughput = guest pages moved (`normal` + `duplicate`, 4 KiB each) over
//! total time. What the guest sees: this process timestamps the serial output of both guests as
//! it reads their pipes (the readers run under `SCHED_FIFO` where allowed, so a loaded host
//! does not batch the reads). The guests print a tick at a fixed interval (a dense guest every 64
//! pages, ~0.4 ms here; `interval` is the median before the migration). `blackout` is the
//! largest gap between consecutive ticks of source and destination together, from `migrate` to
//! the destination's fourth tick (each run's line says where it was, `src`, `switch` or `dst`,
//! and when it began, ms after `migrate`); `switch` is the gap from the source's last tick to
//! the destination's first. A dense guest prints `!` for each page that fails its check; the
//! destination runs two more passes after the migration, so every page it received is checked;
//! failures are counted and printed (there must be none).

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::levers::Lever;
use serde_json::{Value, json};
use vmm::guest::bootsector::{AbBootblock, FAIL, PASS, TICK, Workload};
use vmm::qmp::client::QmpClient;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Longest a guest may take to boot and warm up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest a migration may take before it is cancelled and counted as failed.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a convergence case runs without auto-converge before it is cancelled and counted
/// as not converging (QEMU's passes are unbounded).
const NOAC_TIMEOUT: Duration = Duration::from_secs(60);
/// `downtime-limit` of the convergence cases (the others have 300 ms).
const CONVERGE_DOWNTIME_MS: u64 = 100;
/// Longest the destination guest may take to print what is waited for after completion.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Ticks the source must print (after its warm-up passes) before the migration starts.
const WARMUP_TICKS: usize = 4;
/// Destination ticks that end the window the blackout is measured in.
const AFTER_TICKS: usize = 4;
/// Delay-loop iterations between two `B`s of a ring-0 idling guest (about 7 ms here: this
/// platform emulates ring-0 guest code at roughly 1 us per loop iteration).
const SPIN_LOOPS: u32 = 1 << 13;
/// Pages between two ticks of a dense guest: ~0.38 ms of checking and rewriting here.
const DENSE_PAGES_PER_TICK: u32 = 64;
/// Delay-loop iterations between two ticks of a dense guest done writing (ring 3 runs
/// natively, ~1 ns per iteration here: ~0.5 ms).
const DENSE_SPIN_LOOPS: u32 = 1 << 19;

/// Dense pages (the headline), QEMU's one-byte-per-page pattern (which SPARSE compresses), or
/// a dense guest that outruns the link, migrated with auto-converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Dense,
    Sparse,
    Converge,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    group: Group,
    memory: u64,
    image: AbBootblock,
    what: &'static str,
    /// Pass markers the source prints before the migration (dense guests).
    warm_passes: usize,
    /// Pass markers the destination prints after it: two make every received page checked.
    check_passes: usize,
    /// How long before `migrate` the destination starts.
    dst_lead: Duration,
    /// For the `QC_SCALING` cases: guest size in GiB and kind (`idle` or `dense`).
    scale: Option<(u64, &'static str)>,
}

/// A dense guest writing [1 MiB, `end`): each pass, or once and then ticking.
fn dense(end: u64, once: bool) -> AbBootblock {
    AbBootblock {
        start: MIB,
        end,
        workload: Workload::Dense {
            pages_per_tick: DENSE_PAGES_PER_TICK,
            once,
        },
        spin_loops: DENSE_SPIN_LOOPS,
    }
}

/// The `QC_SCALING` cases: per size, an idle guest like `4g-idle` and a dense one rewriting
/// 256 MiB like `1g-dense256`.
fn scaling_cases(sizes: &[u64]) -> Vec<Case> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut v = Vec::new();
    for &g in sizes {
        v.push(Case {
            name: leak(format!("scale-idle-{g}g")),
            group: Group::Dense,
            memory: g * GIB,
            image: dense(MIB + 4096, true),
            what: leak(format!("{g} GiB, writes one page, then ticks in ring 3")),
            warm_passes: 1,
            check_passes: 0,
            dst_lead: Duration::ZERO,
            scale: Some((g, "idle")),
        });
        v.push(Case {
            name: leak(format!("scale-dense-{g}g")),
            group: Group::Dense,
            memory: g * GIB,
            image: dense(257 * MIB, false),
            what: leak(format!(
                "{g} GiB, checks and rewrites every byte of [1,257) MiB each pass (ring 3)"
            )),
            warm_passes: 2,
            check_passes: 2,
            dst_lead: Duration::ZERO,
            scale: Some((g, "dense")),
        });
    }
    v
}

fn cases() -> Vec<Case> {
    let bb = |end: u64, workload| AbBootblock {
        start: MIB,
        end,
        workload,
        spin_loops: SPIN_LOOPS,
    };
    let sparse = |name, memory, image, what| Case {
        name,
        group: Group::Sparse,
        memory,
        image,
        what,
        warm_passes: 0,
        check_passes: 0,
        dst_lead: Duration::ZERO,
        scale: None,
    };
    let dirty = Workload::Dirty { passes_per_b: 1 };
    vec![
        Case {
            name: "1g-dense64",
            group: Group::Dense,
            memory: GIB,
            image: dense(65 * MIB, false),
            what: "1 GiB, checks and rewrites every byte of [1,65) MiB each pass (ring 3)",
            warm_passes: 2,
            check_passes: 2,
            dst_lead: Duration::ZERO,
            scale: None,
        },
        Case {
            name: "1g-dense256",
            group: Group::Dense,
            memory: GIB,
            image: dense(257 * MIB, false),
            what: "1 GiB, checks and rewrites every byte of [1,257) MiB each pass (ring 3)",
            warm_passes: 2,
            check_passes: 2,
            dst_lead: Duration::ZERO,
            scale: None,
        },
        Case {
            name: "2g-dense-once",
            group: Group::Dense,
            memory: 2 * GIB,
            image: dense(2 * GIB, true),
            what: "2 GiB, writes every byte of [1 MiB,2 GiB) once, then ticks (destination up 10 s before)",
            warm_passes: 1,
            check_passes: 0,
            dst_lead: Duration::from_secs(10),
            scale: None,
        },
        Case {
            name: "4g-idle",
            group: Group::Dense,
            memory: 4 * GIB,
            image: dense(MIB + 4096, true),
            what: "4 GiB, writes one page, then ticks in ring 3",
            warm_passes: 1,
            check_passes: 0,
            dst_lead: Duration::ZERO,
            scale: None,
        },
        Case {
            name: "2g-dense1024-ac",
            group: Group::Converge,
            memory: 2 * GIB,
            image: dense(GIB + MIB, false),
            what: "2 GiB, checks and rewrites every byte of [1,1025) MiB each pass (ring 3); downtime-limit 100 ms, auto-converge",
            // Passes 2 and 3 (the first touches every page) give the rate before `migrate`.
            warm_passes: 3,
            check_passes: 2,
            dst_lead: Duration::ZERO,
            scale: None,
        },
        sparse(
            "1g-idle",
            GIB,
            bb(2 * MIB, Workload::Idle),
            "1 GiB, spins printing B, writes no memory",
        ),
        sparse(
            "1g-dirty64",
            GIB,
            bb(65 * MIB, dirty),
            "1 GiB, incb first byte of each page of [1,65) MiB, B every pass",
        ),
        sparse(
            "1g-dirty99",
            GIB,
            bb(100 * MIB, dirty),
            "1 GiB, incb first byte of each page of [1,100) MiB (QEMU's test), B every pass",
        ),
        sparse(
            "2g-once",
            2 * GIB,
            bb(2 * GIB, Workload::WriteOnce),
            "2 GiB, writes 1 to the first byte of every page of [1 MiB,2 GiB) once, then spins printing B",
        ),
        sparse(
            "1g-dirty512",
            GIB,
            bb(513 * MIB, dirty),
            "1 GiB, incb first byte of each page of [1,513) MiB, B every pass",
        ),
        sparse(
            "4g-dirty64",
            4 * GIB,
            bb(65 * MIB, dirty),
            "4 GiB, incb first byte of each page of [1,65) MiB, B every pass",
        ),
        sparse(
            "4g-dirty512",
            4 * GIB,
            bb(513 * MIB, dirty),
            "4 GiB, incb first byte of each page of [1,513) MiB, B every pass",
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hv {
    Ferry,
    Qemu,
    /// QEMU with `multifd` on both sides, 2 channels.
    QemuMultifd,
    /// Ferry with mutual TLS.
    FerryTls,
    /// QEMU with mutual TLS (single channel).
    QemuTls,
    /// Ferry with one speed lever off (`FERRY_LEVERS_OFF` in both processes' environment).
    FerryLeverOff(Lever),
    /// Ferry with `multifd-channels` N on both sides (0 to 8).
    FerryChannels(u8),
    /// Ferry with `__org.ferry_page-thread-nice` N on both sides (0 to 19; 0 as set, so the
    /// auto-converge default of 10 does not apply).
    FerryNice(u8),
    /// Ferry with `__org.ferry_page-thread-nice` 19 on the destination only: on one host the
    /// destination's page threads compete with the source's vCPU, as they would not across
    /// two hosts.
    FerryDstNice,
    /// Ferry without auto-converge (convergence cases only).
    FerryNoAc,
    /// QEMU without auto-converge (convergence cases only).
    QemuNoAc,
    /// QEMU with `postcopy-ram`, switched to post-copy after its first pass (convergence
    /// cases only).
    QemuPostcopy,
    /// Ferry with `postcopy-ram`, switched to post-copy at the end of its first pass
    /// (convergence cases only).
    FerryPostcopy,
}

impl Hv {
    fn name(self) -> &'static str {
        const CHANNELS: [&str; 9] = [
            "ferry-ch0",
            "ferry-ch1",
            "ferry-ch2",
            "ferry-ch3",
            "ferry-ch4",
            "ferry-ch5",
            "ferry-ch6",
            "ferry-ch7",
            "ferry-ch8",
        ];
        const NICE: [&str; 20] = [
            "ferry-nice0",
            "ferry-nice1",
            "ferry-nice2",
            "ferry-nice3",
            "ferry-nice4",
            "ferry-nice5",
            "ferry-nice6",
            "ferry-nice7",
            "ferry-nice8",
            "ferry-nice9",
            "ferry-nice10",
            "ferry-nice11",
            "ferry-nice12",
            "ferry-nice13",
            "ferry-nice14",
            "ferry-nice15",
            "ferry-nice16",
            "ferry-nice17",
            "ferry-nice18",
            "ferry-nice19",
        ];
        match self {
            Hv::Ferry => "ferry",
            Hv::Qemu => "qemu",
            Hv::QemuMultifd => "multifd",
            Hv::FerryTls => "ferry-tls",
            Hv::QemuTls => "qemu-tls",
            Hv::FerryLeverOff(Lever::Prefault) => "-prefault",
            Hv::FerryLeverOff(Lever::KnownZero) => "-known-zero",
            Hv::FerryLeverOff(Lever::DirectSend) => "-direct-send",
            Hv::FerryLeverOff(Lever::DirectReceive) => "-direct-receive",
            Hv::FerryLeverOff(Lever::ShrinkPasses) => "-shrink-passes",
            Hv::FerryLeverOff(Lever::PrefaultPause) => "-prefault-pause",
            Hv::FerryLeverOff(Lever::VcpuSlice) => "-vcpu-slice",
            Hv::FerryChannels(n) => CHANNELS[usize::from(n.min(8))],
            Hv::FerryNice(n) => NICE[usize::from(n.min(19))],
            Hv::FerryDstNice => "ferry-dnice19",
            Hv::FerryNoAc => "ferry-noac",
            Hv::QemuNoAc => "qemu-noac",
            Hv::QemuPostcopy => "qemu-postcopy",
            Hv::FerryPostcopy => "ferry-postcopy",
        }
    }

    fn is_ferry(self) -> bool {
        matches!(
            self,
            Hv::Ferry
                | Hv::FerryTls
                | Hv::FerryLeverOff(_)
                | Hv::FerryChannels(_)
                | Hv::FerryNice(_)
                | Hv::FerryDstNice
                | Hv::FerryNoAc
                | Hv::FerryPostcopy
        )
    }

    /// Runs with auto-converge off, bounded by [`NOAC_TIMEOUT`].
    fn no_ac(self) -> bool {
        matches!(self, Hv::FerryNoAc | Hv::QemuNoAc)
    }

    /// Runs only in the convergence cases.
    fn converge_only(self) -> bool {
        self.no_ac() || self.postcopy()
    }

    /// Switched to post-copy after the first pass.
    fn postcopy(self) -> bool {
        matches!(self, Hv::QemuPostcopy | Hv::FerryPostcopy)
    }

    /// A variant of plain Ferry whose cost the summary gives against `ferry`.
    fn is_ferry_variant(self) -> bool {
        matches!(
            self,
            Hv::FerryLeverOff(_) | Hv::FerryChannels(_) | Hv::FerryNice(_) | Hv::FerryDstNice
        )
    }

    fn tls(self) -> bool {
        matches!(self, Hv::FerryTls | Hv::QemuTls)
    }
}

/// Timestamped progress characters read from a guest's serial output.
type Serial = Arc<Mutex<Vec<(Instant, u8)>>>;

/// A child process (killed and reaped on drop) with its QMP connection and serial capture.
struct Proc {
    child: Child,
    qmp: Option<QmpClient>,
    serial: Serial,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.execute("quit", json!({}));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn qmp(&mut self) -> Result<&mut QmpClient, String> {
        self.qmp.as_mut().ok_or_else(|| "no QMP".to_owned())
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        self.qmp()?
            .execute(cmd, args)
            .map_err(|e| format!("{cmd}: {e}"))
    }

    fn chars(&self) -> Vec<(Instant, u8)> {
        self.serial.lock().unwrap().clone()
    }

    /// Waits for `n` serial characters `c` timestamped at or after `after`.
    fn wait_chars(
        &mut self,
        c: u8,
        n: usize,
        after: Instant,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self
                .chars()
                .iter()
                .filter(|(t, b)| *t >= after && *b == c)
                .count();
            if have >= n {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "process exited ({st}) after {have} '{}'",
                    c as char
                ));
            }
            if Instant::now() >= deadline {
                let all = self.chars();
                let count = |k: u8| all.iter().filter(|x| x.1 == k).count();
                return Err(format!(
                    "only {have} of {n} '{}' within {timeout:?} (serial so far: {} A, {} B, {} P, {} !)",
                    c as char,
                    count(b'A'),
                    count(TICK),
                    count(PASS),
                    count(FAIL)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Puts the calling serial reader under `SCHED_FIFO` (priority 1) so that, on a loaded host, a
/// guest's ticks are read (and timestamped) as they are written rather than in batches when a
/// CPU-bound neighbour yields; the same for every hypervisor. Without the privilege it says so
/// once and reads at normal priority.
fn reader_runs_first() {
    static NOTED: std::sync::Once = std::sync::Once::new();
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads `param`, a live value, and changes only the calling
    // thread (pid 0).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) } != 0 {
        let e = std::io::Error::last_os_error();
        NOTED.call_once(|| println!("NOTE: serial readers at normal priority ({e})"));
    }
}

fn spawn(mut cmd: Command, sock: &Path, log: &Path) -> Result<Proc, String> {
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let serial: Serial = Arc::default();
    let sink = serial.clone();
    std::thread::spawn(move || {
        reader_runs_first();
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let t = Instant::now();
            let mut s = sink.lock().unwrap();
            s.extend(
                buf[..n]
                    .iter()
                    .filter(|b| matches!(b, b'A' | b'B' | b'P' | b'!'))
                    .map(|&b| (t, b)),
            );
        }
    });
    let mut p = Proc {
        child,
        qmp: None,
        serial,
    };
    match QmpClient::connect(sock, Duration::from_secs(20)) {
        Ok(q) => p.qmp = Some(q),
        Err(e) => return Err(format!("QMP connect {}: {e}", sock.display())),
    }
    Ok(p)
}

struct Env {
    ferry: PathBuf,
    qemu: String,
    dir: PathBuf,
}

fn command(env: &Env, hv: Hv, case: &Case, img: &Path, sock: &Path, incoming: bool) -> Command {
    match hv {
        Hv::Ferry
        | Hv::FerryTls
        | Hv::FerryLeverOff(_)
        | Hv::FerryChannels(_)
        | Hv::FerryNice(_)
        | Hv::FerryDstNice
        | Hv::FerryNoAc
        | Hv::FerryPostcopy => {
            let mut c = Command::new(&env.ferry);
            c.arg("run")
                .args(["--machine", "ferry", "--memory"])
                .arg(format!("{}M", case.memory / MIB))
                .arg("--guest")
                .arg(format!("bootsector:{}", img.display()))
                .arg("--qmp")
                .arg(format!("unix:{}", sock.display()))
                .args(["--serial", "/dev/stdout"]);
            if incoming {
                c.args(["--incoming", "tcp:127.0.0.1:0"]);
            }
            c.env(
                "RUST_LOG",
                std::env::var("QC_FERRY_LOG").unwrap_or_else(|_| "warn".to_owned()),
            );
            if let Hv::FerryLeverOff(lever) = hv {
                c.env("FERRY_LEVERS_OFF", lever.name());
            }
            c
        }
        Hv::Qemu | Hv::QemuMultifd | Hv::QemuTls | Hv::QemuNoAc | Hv::QemuPostcopy => {
            let mut c = Command::new(&env.qemu);
            c.args([
                "-accel", "kvm", "-cpu", "qemu64", "-machine", "pc", "-smp", "1",
            ])
            .arg("-m")
            .arg(format!("{}M", case.memory / MIB))
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            // Thread names, so the vCPU (`CPU 0/KVM`) can be found.
            .args(["-name", "qemu-compare,debug-threads=on"])
            .args(["-serial", "stdio"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", img.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
            if incoming {
                c.args(["-incoming", "defer"]);
            }
            c
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    setup_ms: f64,
    bytes: f64,
    /// Wire rate: bytes sent over total time.
    gbit: f64,
    /// RAM rate: guest pages moved (data and zero pages) over total time.
    ram_gbit: f64,
    /// Largest gap between two ticks of source and destination together.
    blackout_ms: f64,
    /// Where that gap was: `src` (pre-copy), `switch` (source to destination) or `dst`.
    blackout_at: &'static str,
    /// When that gap began, ms after `migrate` (negative: the tick before it).
    blackout_from_ms: f64,
    /// Last source tick to first destination tick.
    switch_ms: f64,
    /// Median tick interval on the source before the migration.
    interval_ms: f64,
    passes: f64,
    /// `!` printed by either guest: pages that failed their check.
    fails: usize,
    /// The migration completed (a convergence case may end cancelled or failed instead; its
    /// times are then NaN).
    converged: bool,
    /// How long a migration that did not converge ran before it was cancelled or failed.
    gave_up_ms: f64,
    /// Highest `cpu-throttle-percentage` seen while polling (Ferry also reports its peak).
    throttle_peak: f64,
    /// Guest pages checked and rewritten per second before `migrate` (source ticks).
    rate_before: f64,
    /// The same from `migrate` to the source's last tick (or to the cancel; post-copy: to
    /// completion, both guests' ticks).
    rate_during: f64,
    /// Largest gap between two source ticks during the migration (a throttle's sleep).
    stall_ms: f64,
    /// Length of the window `rate_during` is measured over.
    window_ms: f64,
    /// Share of one CPU the source's vCPU thread ran, from `migrate` to completion.
    vcpu_ran: f64,
    /// Share of that time it was runnable but waited for a CPU.
    vcpu_waited: f64,
}

impl Sample {
    /// The guest's page rate during the migration over its rate before it.
    fn progress(&self) -> f64 {
        self.rate_during / self.rate_before
    }

    /// Guest run time lost to the migration: its window times the share of speed lost.
    fn lost_s(&self) -> f64 {
        self.window_ms / 1000.0 * (1.0 - self.progress())
    }
}

/// Run and run-queue wait time, ns, of process `pid`'s first vCPU thread (`vcpu0` in Ferry,
/// `CPU 0/KVM` in QEMU with `debug-threads=on`), from `/proc/PID/task/*/schedstat`.
fn vcpu_times(pid: u32) -> Option<(u64, u64)> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "vcpu0" | "CPU 0/KVM") {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut f = stat.split_whitespace().map(|v| v.parse::<u64>().ok());
            return Some((f.next()??, f.next()??));
        }
    }
    None
}

/// Shares of `window` the vCPU ran and waited between two [`vcpu_times`] readings.
fn vcpu_shares(a: Option<(u64, u64)>, b: Option<(u64, u64)>, window: Duration) -> (f64, f64) {
    match (a, b) {
        (Some(a), Some(b)) => {
            let w = window.as_nanos() as f64;
            ((b.0 - a.0) as f64 / w, (b.1 - a.1) as f64 / w)
        }
        _ => (f64::NAN, f64::NAN),
    }
}

/// Write the CA and both sides' credentials under `dir/pki` (QEMU's layout, read by both).
fn make_pki(dir: &Path) {
    use ferry_tls::testing::{Leaf, TestCa};
    let ca = TestCa::new("qemu_compare CA");
    ca.write(&dir.join("pki/server"), &Leaf::new("localhost"), true);
    ca.write(
        &dir.join("pki/client"),
        &Leaf::new("qemu-compare-src"),
        false,
    );
}

/// Create `tls0` for `endpoint` and make it the migration's `tls-creds`.
fn tls_on(p: &mut Proc, dir: &Path, endpoint: &str) -> Result<(), String> {
    let creds = dir.join("pki").join(endpoint).display().to_string();
    p.exec(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds, "endpoint": endpoint, "verify-peer": true}),
    )?;
    p.exec(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-hostname": "localhost"}),
    )?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Guest pages per second from the ticks in (`from`, `to`] (a dense guest's tick is
/// [`DENSE_PAGES_PER_TICK`] pages).
fn page_rate(ticks: &[Instant], from: Instant, to: Instant) -> f64 {
    let n = ticks.iter().filter(|t| **t > from && **t <= to).count();
    n as f64 * f64::from(DENSE_PAGES_PER_TICK) / (to - from).as_secs_f64()
}

/// The tick times of a serial capture.
fn ticks(chars: &[(Instant, u8)]) -> Vec<Instant> {
    chars.iter().filter(|c| c.1 == TICK).map(|c| c.0).collect()
}

fn qemu_port(q: &Value) -> Option<String> {
    let p = &q["socket-address"][0]["port"];
    p.as_str()
        .map(str::to_owned)
        .or_else(|| p.as_u64().map(|p| p.to_string()))
}

fn run_once(env: &Env, hv: Hv, case: &Case, img: &Path, tag: &str) -> Result<Sample, String> {
    let dir = env.dir.join(tag);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (ss, ds) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let dst_started = Instant::now();
    let mut dst = spawn(
        command(env, hv, case, img, &ds, true),
        &ds,
        &dir.join("dst.log"),
    )?;
    let conv = case.group == Group::Converge;
    let downtime_limit = if conv { CONVERGE_DOWNTIME_MS } else { 300 };
    let bandwidth = match std::env::var("QC_AC_MIBS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(m) if conv => m * MIB,
        _ => 100 * GIB,
    };
    let params = json!({"downtime-limit": downtime_limit, "max-bandwidth": bandwidth});
    let mut caps = Vec::new();
    if hv == Hv::QemuMultifd {
        caps.push(json!({"capability": "multifd", "state": true}));
    }
    if hv == Hv::FerryPostcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    if hv == Hv::QemuPostcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
        dst.exec(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-blocktime", "state": true}]}),
        )?;
    }
    if !hv.is_ferry() && std::env::var("QC_QEMU_XBZRLE").is_ok_and(|v| v == "1") {
        caps.push(json!({"capability": "xbzrle", "state": true}));
    }
    if !caps.is_empty() {
        dst.exec("migrate-set-capabilities", json!({"capabilities": caps}))?;
    }
    if hv == Hv::QemuMultifd {
        dst.exec("migrate-set-parameters", json!({"multifd-channels": 2}))?;
    }
    if let Hv::FerryChannels(n) = hv {
        dst.exec("migrate-set-parameters", json!({"multifd-channels": n}))?;
    }
    if let Hv::FerryNice(n) = hv {
        dst.exec(
            "migrate-set-parameters",
            json!({"__org.ferry_page-thread-nice": n}),
        )?;
    }
    if hv == Hv::FerryDstNice {
        dst.exec(
            "migrate-set-parameters",
            json!({"__org.ferry_page-thread-nice": 19}),
        )?;
    }
    dst.exec("migrate-set-parameters", params.clone())?;
    if hv.tls() {
        tls_on(&mut dst, &env.dir, "server")?;
    }
    if !hv.is_ferry() {
        dst.exec("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
    }
    let q = dst.exec("query-migrate", json!({}))?;
    let port = qemu_port(&q).ok_or_else(|| format!("destination reported no port: {q}"))?;
    // Before the spawn: a guest that writes one page prints its pass marker at once.
    let boot = Instant::now();
    let mut src = spawn(
        command(env, hv, case, img, &ss, false),
        &ss,
        &dir.join("src.log"),
    )?;
    src.wait_chars(PASS, case.warm_passes, boot, BOOT_TIMEOUT)?;
    src.wait_chars(TICK, WARMUP_TICKS, Instant::now(), BOOT_TIMEOUT)?;
    src.exec("migrate-set-parameters", params)?;
    if hv.tls() {
        tls_on(&mut src, &env.dir, "client")?;
    }
    if !caps.is_empty() {
        src.exec("migrate-set-capabilities", json!({"capabilities": caps}))?;
    }
    if hv == Hv::QemuMultifd {
        src.exec("migrate-set-parameters", json!({"multifd-channels": 2}))?;
    }
    if let Hv::FerryChannels(n) = hv {
        src.exec("migrate-set-parameters", json!({"multifd-channels": n}))?;
    }
    if let Hv::FerryNice(n) = hv {
        src.exec(
            "migrate-set-parameters",
            json!({"__org.ferry_page-thread-nice": n}),
        )?;
    }
    if conv {
        let on = !hv.converge_only();
        src.exec(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "auto-converge", "state": on}]}),
        )?;
        // QEMU's defaults, spelled out for both.
        src.exec(
            "migrate-set-parameters",
            json!({"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                   "max-cpu-throttle": 99, "throttle-trigger-threshold": 50,
                   "cpu-throttle-tailslow": false}),
        )?;
        if hv.is_ferry() {
            // Unbounded in effect, as QEMU's passes are (Ferry's default is 30).
            src.exec(
                "migrate-set-parameters",
                json!({"__org.ferry_max-iterations": 10000}),
            )?;
        }
    }
    if hv.is_ferry() && std::env::var("QC_FERRY_SPARSE").is_ok_and(|v| v == "0") {
        src.exec(
            "migrate-set-parameters",
            json!({"__org.ferry_sparse-pages": false}),
        )?;
    }
    // The operator's destination has been up for a while (the 2 GiB case).
    if let Some(left) = case.dst_lead.checked_sub(dst_started.elapsed()) {
        std::thread::sleep(left);
    }
    let before = ticks(&src.chars());
    let mut gaps: Vec<f64> = before
        .windows(2)
        .rev()
        .take(20)
        .map(|w| ms(w[1] - w[0]))
        .collect();
    let vcpu_at_start = vcpu_times(src.child.id());
    let start = Instant::now();
    src.exec(
        "migrate",
        json!({"uri": format!("tcp:{}:{port}", Ipv4Addr::LOCALHOST)}),
    )?;
    let timeout = if hv.no_ac() {
        NOAC_TIMEOUT
    } else {
        MIGRATE_TIMEOUT
    };
    let deadline = start + timeout;
    let mut throttle_peak = 0.0f64;
    let mut postcopy_at = None;
    let outcome = loop {
        let info = src.exec("query-migrate", json!({}))?;
        // QEMU counts the sync before its first pass; Ferry switches at the end of the
        // pass it is in.
        let first_pass = if hv.is_ferry() { Some(0) } else { Some(2) };
        if hv.postcopy()
            && postcopy_at.is_none()
            && info["status"] == "active"
            && info["ram"]["dirty-sync-count"].as_u64() >= first_pass
        {
            src.exec("migrate-start-postcopy", json!({}))?;
            postcopy_at = Some(Instant::now());
        }
        for k in ["cpu-throttle-percentage", "__org.ferry_cpu-throttle-peak"] {
            throttle_peak = throttle_peak.max(info[k].as_f64().unwrap_or(0.0));
        }
        match info["status"].as_str().unwrap_or("") {
            "completed" => break Ok(info),
            "failed" | "cancelled" => {
                break Err(format!(
                    "migration {}: {}",
                    info["status"], info["error-desc"]
                ));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = src.exec("migrate_cancel", json!({}));
            break Err(format!(
                "no convergence within {timeout:?} (cancelled): {}",
                info["ram"]
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ended = Instant::now();
    let (vcpu_ran, vcpu_waited) =
        vcpu_shares(vcpu_at_start, vcpu_times(src.child.id()), ended - start);
    // The guest's own progress: its rate before `migrate`, over as long a window as the
    // migration took where the warm passes allow (the first pass, which touches every page
    // first, left out), and its rate during it.
    let src_chars = src.chars();
    let src_ticks = ticks(&src_chars);
    let first_pass = src_chars
        .iter()
        .find(|c| c.1 == PASS)
        .map_or(start, |c| c.0);
    let rates = |until: Instant| {
        let len = (until - start).min(start - first_pass);
        let during: Vec<Instant> = src_ticks
            .iter()
            .copied()
            .filter(|t| *t > start && *t <= until)
            .collect();
        let stall = during
            .windows(2)
            .map(|w| ms(w[1] - w[0]))
            .fold(0.0, f64::max);
        (
            page_rate(&src_ticks, start - len, start),
            page_rate(&src_ticks, start, until),
            stall,
        )
    };
    let info = match outcome {
        Ok(info) => info,
        Err(e) if conv => {
            // Up to the cancel: the throttle ends with it.
            let (rate_before, rate_during, stall_ms) = rates(ended);
            println!("NOTE: {} {}: did not converge: {e}", case.name, hv.name());
            return Ok(Sample {
                total_ms: f64::NAN,
                downtime_ms: f64::NAN,
                setup_ms: f64::NAN,
                bytes: f64::NAN,
                gbit: f64::NAN,
                ram_gbit: f64::NAN,
                blackout_ms: f64::NAN,
                blackout_at: "-",
                blackout_from_ms: f64::NAN,
                switch_ms: f64::NAN,
                interval_ms: median(&mut gaps),
                passes: f64::NAN,
                fails: src_chars.iter().filter(|c| c.1 == FAIL).count(),
                converged: false,
                gave_up_ms: ms(ended - start),
                throttle_peak,
                rate_before,
                rate_during,
                stall_ms,
                window_ms: ms(ended - start),
                vcpu_ran,
                vcpu_waited,
            });
        }
        Err(e) => return Err(e),
    };
    dst.wait_chars(TICK, AFTER_TICKS, start, RESUME_TIMEOUT)?;
    dst.wait_chars(PASS, case.check_passes, start, RESUME_TIMEOUT)?;
    let dst_chars = dst.chars();
    let dst_ticks: Vec<Instant> = ticks(&dst_chars)
        .into_iter()
        .filter(|t| *t >= start)
        .collect();
    let last_src = *src_ticks.last().ok_or("no source tick")?;
    let end = dst_ticks[AFTER_TICKS - 1];
    let (rate_before, mut rate_during, stall_ms) = rates(last_src);
    let mut window_end = last_src;
    if let Some(at) = postcopy_at {
        // The guest runs on the destination until the source completes: both guests' ticks.
        let both: Vec<Instant> = src_ticks.iter().chain(&dst_ticks).copied().collect();
        rate_during = page_rate(&both, start, ended);
        window_end = ended;
        let q = dst.exec("query-migrate", json!({}))?;
        if hv.is_ferry() {
            println!(
                "NOTE: {} {}: post-copy from {:.0} ms after migrate; destination: {} pages after the switchover, {} requested, fault latency {} us on average, {} us at most",
                case.name,
                hv.name(),
                ms(at - start),
                q["ram"]["__org.ferry_postcopy-pages"],
                q["ram"]["postcopy-requests"],
                q["__org.ferry_postcopy-latency-avg-us"],
                q["__org.ferry_postcopy-latency-max-us"]
            );
        } else {
            println!(
                "NOTE: {} {}: post-copy from {:.0} ms after migrate; destination postcopy-blocktime {} ms, per vCPU {}",
                case.name,
                hv.name(),
                ms(at - start),
                q["postcopy-blocktime"],
                q["postcopy-vcpu-blocktime"]
            );
        }
    }
    // From the last tick before `migrate` to the destination's AFTER_TICKS-th; under
    // auto-converge from the source's last tick (the throttle's sleeps are `stall_ms`).
    let from = if conv {
        last_src
    } else {
        src_ticks
            .iter()
            .rev()
            .find(|t| **t <= start)
            .copied()
            .unwrap_or(start)
    };
    // Ticks tagged with their side (true: destination).
    let mut window: Vec<(Instant, bool)> = src_ticks
        .iter()
        .map(|t| (*t, false))
        .chain(dst_ticks.iter().map(|t| (*t, true)))
        .filter(|(t, _)| *t >= from && *t <= end)
        .collect();
    window.sort();
    let (blackout_ms, blackout_at, gap_from) = window
        .windows(2)
        .map(|w| {
            let at = match (w[0].1, w[1].1) {
                (false, false) => "src",
                (true, true) => "dst",
                _ => "switch",
            };
            (ms(w[1].0 - w[0].0), at, w[0].0)
        })
        .fold((0.0, "-", start), |m, g| if g.0 > m.0 { g } else { m });
    let blackout_from_ms = match gap_from.checked_duration_since(start) {
        Some(d) => ms(d),
        None => -ms(start - gap_from),
    };
    let fails = src_chars
        .iter()
        .chain(&dst_chars)
        .filter(|c| c.1 == FAIL)
        .count();
    // QEMU multifd now and then reports a completed migration with total-time and downtime 0:
    // unknown, so left out of medians and ratios rather than counted as instant.
    let reported = info["total-time"].as_f64().filter(|t| *t > 0.0);
    if reported.is_none() {
        println!(
            "NOTE: no total-time in the source's query-migrate; this run's times are left out"
        );
    }
    let total_ms = reported.unwrap_or(f64::NAN);
    let bytes = info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN);
    let pages = info["ram"]["normal"].as_f64().unwrap_or(f64::NAN)
        + info["ram"]["duplicate"].as_f64().unwrap_or(f64::NAN);
    let s = Sample {
        total_ms,
        downtime_ms: match reported {
            Some(_) => info["downtime"].as_f64().unwrap_or(f64::NAN),
            None => f64::NAN,
        },
        setup_ms: info["setup-time"].as_f64().unwrap_or(f64::NAN),
        bytes,
        gbit: bytes * 8.0 / (total_ms / 1000.0) / 1e9,
        ram_gbit: pages * 4096.0 * 8.0 / (total_ms / 1000.0) / 1e9,
        blackout_ms,
        blackout_at,
        blackout_from_ms,
        switch_ms: dst_ticks[0]
            .checked_duration_since(last_src)
            .map_or(f64::NAN, ms),
        interval_ms: median(&mut gaps),
        passes: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        fails,
        converged: true,
        gave_up_ms: f64::NAN,
        throttle_peak,
        rate_before,
        rate_during,
        stall_ms,
        window_ms: ms(window_end - start),
        vcpu_ran,
        vcpu_waited,
    };
    if env.dir.starts_with(std::env::temp_dir()) && std::env::var_os("QC_KEEP").is_none() {
        drop(src);
        drop(dst);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(s)
}

/// `MemAvailable` in bytes (0 if unknown).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10)
}

/// Touch (and free) enough host memory that the runs get pages the machine has backed before.
fn warm_host_memory(cases: &[Case]) {
    let avail = mem_available();
    let largest = cases.iter().map(|c| c.memory).max().unwrap_or(0);
    let want = match std::env::var("QC_WARM_GIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(g) => g * GIB,
        None => 3 * largest,
    };
    let bytes = want.min(avail.saturating_sub(4 * GIB));
    if bytes == 0 {
        return;
    }
    let t = Instant::now();
    let v = vec![1u8; bytes as usize];
    std::hint::black_box(&v);
    drop(v);
    println!(
        "warmed {} MiB of host memory in {:.1} s",
        bytes / MIB,
        t.elapsed().as_secs_f64()
    );
}

/// The scaling table (medians per size, kind and hypervisor) and its plot, written to
/// `QC_PLOT` (default `DIR/scaling.svg` with `QC_KEEP=DIR`, else next to the bench binary's
/// `target` directory as `qemu_compare_scaling.svg`).
fn scaling_summary(cases: &[Case], hvs: &[Hv], samples: &[Vec<Vec<Option<Sample>>>], dir: &Path) {
    println!();
    println!("SCALING (medians; idle: one page written, dense: 256 MiB rewritten each pass)");
    println!(
        "{:>4} {:<5} {:<15} {:>3} {:>9} {:>8} {:>9}",
        "GiB", "kind", "hv", "n", "total ms", "down ms", "blackout"
    );
    let mut series: Vec<Series> = Vec::new();
    for kind in ["idle", "dense"] {
        for (hi, hv) in hvs.iter().enumerate() {
            let mut pts = Vec::new();
            for (ci, c) in cases.iter().enumerate() {
                let Some((g, k)) = c.scale else { continue };
                if k != kind {
                    continue;
                }
                let s: Vec<Sample> = samples[ci][hi].iter().flatten().cloned().collect();
                let total = col(&s, |x| x.total_ms);
                println!(
                    "{g:>4} {kind:<5} {:<15} {:>3} {total:>9.0} {:>8.0} {:>9.1}",
                    hv.name(),
                    s.len(),
                    col(&s, |x| x.downtime_ms),
                    col(&s, |x| x.blackout_ms),
                );
                pts.push((g as f64, total));
            }
            if !pts.is_empty() {
                series.push((kind, hv.name(), pts));
            }
        }
    }
    let path = match std::env::var_os("QC_PLOT") {
        Some(p) => PathBuf::from(p),
        None if std::env::var_os("QC_KEEP").is_some() => dir.join("scaling.svg"),
        // The binary is TARGET/release/deps/qemu_compare-HASH.
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.ancestors().nth(3)?.join("qemu_compare_scaling.svg")))
            .unwrap_or_else(|| PathBuf::from("target/qemu_compare_scaling.svg")),
    };
    match std::fs::write(&path, scaling_svg(&series)) {
        Ok(()) => println!(
            "scaling plot: {}",
            std::path::absolute(&path).unwrap_or(path).display()
        ),
        Err(e) => println!("scaling plot {}: {e}", path.display()),
    }
}

/// One line of the scaling plot: kind (`idle` or `dense`), hypervisor, and its points
/// (guest GiB, median total ms).
type Series = (&'static str, &'static str, Vec<(f64, f64)>);

/// Total migration time against guest size as SVG text: a panel per kind, a line per
/// hypervisor, log2 x axis, linear y axis from 0.
fn scaling_svg(series: &[Series]) -> String {
    const COLOURS: [&str; 10] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    let (pw, ph) = (440.0, 320.0);
    let mut hvs: Vec<&str> = Vec::new();
    let mut sizes: Vec<f64> = Vec::new();
    for (_, hv, pts) in series {
        if !hvs.contains(hv) {
            hvs.push(*hv);
        }
        sizes.extend(pts.iter().map(|p| p.0));
    }
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let (mut x0, mut x1) = (
        sizes.first().map_or(0.0, |g| g.log2()),
        sizes.last().map_or(1.0, |g| g.log2()),
    );
    if x1 - x0 < 1e-9 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    let height = ph + 20.0 + 18.0 * hvs.len().div_ceil(4) as f64;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * pw
    );
    for (k, kind) in ["idle", "dense"].into_iter().enumerate() {
        let (l, r, t, b) = (
            k as f64 * pw + 70.0,
            (k + 1) as f64 * pw - 20.0,
            40.0,
            ph - 50.0,
        );
        let top = series
            .iter()
            .filter(|s| s.0 == kind)
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        // Round the y range up to 1, 2 or 5 times a power of ten.
        let mag = 10f64.powf(top.max(1.0).log10().floor());
        let ymax = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|v| *v >= top)
            .unwrap_or(10.0 * mag);
        let px = |g: f64| l + (g.log2() - x0) / (x1 - x0) * (r - l);
        let py = |v: f64| b - v / ymax * (b - t);
        o += &format!(
            "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{kind} guest: migration total time</text>\n",
            (l + r) / 2.0
        );
        for i in 0..=4 {
            let v = ymax * f64::from(i) / 4.0;
            o += &format!(
                "<line x1=\"{l}\" x2=\"{r}\" y1=\"{0}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{1}\" y=\"{2}\" text-anchor=\"end\">{v:.0}</text>\n",
                py(v),
                l - 6.0,
                py(v) + 4.0
            );
        }
        for &g in &sizes {
            o += &format!(
                "<line x1=\"{0}\" x2=\"{0}\" y1=\"{b}\" y2=\"{1}\" stroke=\"#000\"/><text x=\"{0}\" y=\"{2}\" text-anchor=\"middle\">{g}</text>\n",
                px(g),
                b + 5.0,
                b + 18.0
            );
        }
        o += &format!("<path d=\"M{l} {t}V{b}H{r}\" fill=\"none\" stroke=\"#000\"/>\n");
        o += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">guest memory (GiB, log scale)</text>\n",
            (l + r) / 2.0,
            b + 38.0
        );
        o += &format!(
            "<text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\">median total time (ms)</text>\n",
            l - 50.0,
            (t + b) / 2.0
        );
        for (_, hv, pts) in series.iter().filter(|s| s.0 == kind) {
            let c = COLOURS[hvs.iter().position(|h| h == hv).unwrap_or(0) % COLOURS.len()];
            let pts: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|p| (px(p.0), py(p.1)))
                .collect();
            let line: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", p.0, p.1))
                .collect();
            o += &format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>\n",
                line.join(" ")
            );
            for (x, y) in pts {
                o += &format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{c}\"/>\n");
            }
        }
    }
    for (i, hv) in hvs.iter().enumerate() {
        let (x, y) = (
            70.0 + (i % 4) as f64 * 200.0,
            ph + 10.0 + (i / 4) as f64 * 18.0,
        );
        let c = COLOURS[i % COLOURS.len()];
        o += &format!(
            "<line x1=\"{x}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{hv}</text>\n",
            x + 24.0,
            x + 30.0,
            y + 4.0
        );
    }
    o + "</svg>\n"
}

/// Pages per second as MiB/s.
fn mib_s(pages: f64) -> f64 {
    pages * 4096.0 / MIB as f64
}

/// The convergence cases: per hypervisor, how many runs converged, medians of the converged
/// runs, the guest's progress during the migration against before it, and Ferry's paired
/// ratios to each baseline with auto-converge (and `ferry-noac` to `qemu-noac`).
fn converge_summary(
    cases: &[Case],
    hvs: &[Hv],
    samples: &[Vec<Vec<Option<Sample>>>],
    cw: usize,
    hw: usize,
) {
    println!(
        "CONVERGENCE (downtime-limit {CONVERGE_DOWNTIME_MS} ms; auto-converge on unless -noac; times are medians of converged runs; progress = guest page rate during the migration / before it)"
    );
    println!(
        "{:<cw$} {:<hw$} {:>9} {:>9} {:>8} {:>9} {:>8} {:>9} {:>6} {:>10} {:>8} {:>6} {:>8} {:>6} {:>9} {:>5}",
        "case",
        "hv",
        "converged",
        "total ms",
        "down ms",
        "blackout",
        "switch",
        "stall ms",
        "peak %",
        "MiB/s bef",
        "progress",
        "lost s",
        "vCPU ran",
        "passes",
        "MiB sent",
        "!"
    );
    for (ci, c) in cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.group == Group::Converge)
    {
        for (hi, hv) in hvs.iter().enumerate() {
            let all: Vec<Sample> = samples[ci][hi].iter().flatten().cloned().collect();
            let done: Vec<Sample> = all.iter().filter(|x| x.converged).cloned().collect();
            println!(
                "{:<cw$} {:<hw$} {:>9} {:>9.0} {:>8.0} {:>9.1} {:>8.1} {:>9.1} {:>6.0} {:>10.0} {:>8.2} {:>6.1} {:>8.2} {:>6.1} {:>9.0} {:>5}",
                c.name,
                hv.name(),
                format!("{}/{}", done.len(), samples[ci][hi].len()),
                col(&done, |x| x.total_ms),
                col(&done, |x| x.downtime_ms),
                col(&done, |x| x.blackout_ms),
                col(&done, |x| x.switch_ms),
                col(&all, |x| x.stall_ms),
                col(&all, |x| x.throttle_peak),
                col(&all, |x| mib_s(x.rate_before)),
                col(&all, Sample::progress),
                col(&all, Sample::lost_s),
                col(&all, |x| x.vcpu_ran),
                col(&done, |x| x.passes),
                col(&done, |x| x.bytes) / MIB as f64,
                all.iter().map(|x| x.fails).sum::<usize>(),
            );
        }
        let at = |h: Hv| hvs.iter().position(|&x| x == h);
        let ferries = hvs
            .iter()
            .filter(|h| **h == Hv::Ferry || h.is_ferry_variant());
        let pairs = ferries
            .flat_map(|&f| {
                hvs.iter()
                    .filter(|h| !h.is_ferry() && **h != Hv::QemuNoAc && !h.postcopy())
                    .map(move |&h| (f, h))
            })
            .chain([
                (Hv::FerryNoAc, Hv::QemuNoAc),
                (Hv::FerryPostcopy, Hv::QemuPostcopy),
            ]);
        for (a, b) in pairs {
            let (Some(x), Some(y)) = (at(a), at(b)) else {
                continue;
            };
            let (x, y) = (&samples[ci][x], &samples[ci][y]);
            println!(
                "{:<cw$} {}/{} median of paired ratios: {}  {}  {}  {}",
                c.name,
                a.name(),
                b.name(),
                time_ratios(x, y),
                ratio("progress", x, y, Sample::progress),
                ratio("lost", x, y, Sample::lost_s),
                ratio("vCPU ran", x, y, |s| s.vcpu_ran),
            );
        }
    }
}

fn median(v: &mut Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn col(s: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(&mut s.iter().map(f).collect::<Vec<_>>())
}

/// The paired ratios `a / b` of the rounds where both ran, and their median.
fn paired(a: &[Option<Sample>], b: &[Option<Sample>], f: fn(&Sample) -> f64) -> (f64, Vec<f64>) {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some(f(x.as_ref()?) / f(y.as_ref()?)))
        .collect();
    let list = r.clone();
    (median(&mut r), list)
}

/// `NAME Mx [r0 r1 ...]`: the median of the paired ratios and each round's.
fn ratio(name: &str, a: &[Option<Sample>], b: &[Option<Sample>], f: fn(&Sample) -> f64) -> String {
    let (m, list) = paired(a, b, f);
    let list: Vec<String> = list.iter().map(|v| format!("{v:.2}")).collect();
    format!("{name} {m:.2}x [{}]", list.join(" "))
}

/// Total, blackout and downtime of `a` against `b`, each as [`ratio`] gives it.
fn time_ratios(a: &[Option<Sample>], b: &[Option<Sample>]) -> String {
    format!(
        "{}  {}  {}",
        ratio("total", a, b, |x| x.total_ms),
        ratio("blackout", a, b, |x| x.blackout_ms),
        ratio("downtime", a, b, |x| x.downtime_ms),
    )
}

fn main() {
    let runs: usize = std::env::var("QC_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    let wanted: Option<Vec<String>> = std::env::var("QC_CASES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let scaling = std::env::var("QC_SCALING").is_ok_and(|v| v == "1");
    // With QC_SCALING and no QC_CASES, only the scaling cases run.
    let mut cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| match &wanted {
            Some(w) => w.iter().any(|n| n == c.name),
            None => c.group == Group::Dense && !scaling,
        })
        .collect();
    if scaling {
        let avail = mem_available();
        let sizes: Vec<u64> = std::env::var("QC_SIZES")
            .unwrap_or_else(|_| "1,2,4,8".to_owned())
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .filter(|&g: &u64| {
                // Source and destination may each map all of it, plus 1 GiB to spare.
                let fits = (2 * g + 1) * GIB <= avail;
                if !fits {
                    println!(
                        "NOTE: scaling size {g} GiB skipped: two guests of it and 1 GiB more exceed MemAvailable ({} MiB)",
                        avail / MIB
                    );
                }
                fits && g > 0
            })
            .collect();
        cases.extend(scaling_cases(&sizes));
    }
    let qemu = std::env::var("QC_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_owned());
    let have_qemu = Command::new(&qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_qemu {
        println!("NOTE: {qemu} not found: QEMU runs skipped (apt-get install qemu-system-x86)");
    }
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("NOTE: /dev/kvm is absent: nothing to measure");
        return;
    }
    let dir = match std::env::var_os("QC_KEEP") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("ferry-qemu-compare-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).expect("work directory");
    let env = Env {
        ferry: PathBuf::from(env!("CARGO_BIN_EXE_ferry")),
        qemu,
        dir: dir.clone(),
    };
    let mut hvs = vec![Hv::Ferry];
    if have_qemu {
        hvs.push(Hv::Qemu);
        if std::env::var("QC_MULTIFD").map_or(true, |v| v != "0") {
            hvs.push(Hv::QemuMultifd);
        }
    }
    let tls = std::env::var("QC_TLS").is_ok_and(|v| v == "1");
    if tls {
        make_pki(&dir);
        hvs.push(Hv::FerryTls);
        if have_qemu {
            hvs.push(Hv::QemuTls);
        }
    }
    if let Ok(v) = std::env::var("QC_LEVERS") {
        let names: Vec<&str> = v.split(',').map(str::trim).collect();
        hvs.extend(
            Lever::ALL
                .into_iter()
                .filter(|l| v == "1" || names.contains(&l.name()))
                .map(Hv::FerryLeverOff),
        );
    }
    if cases.iter().any(|c| c.group == Group::Converge)
        && std::env::var("QC_NOAC").map_or(true, |v| v != "0")
    {
        hvs.push(Hv::FerryNoAc);
        if have_qemu {
            hvs.push(Hv::QemuNoAc);
        }
    }
    if cases.iter().any(|c| c.group == Group::Converge)
        && std::env::var("QC_POSTCOPY").is_ok_and(|v| v == "1")
    {
        hvs.push(Hv::FerryPostcopy);
        if have_qemu {
            hvs.push(Hv::QemuPostcopy);
        }
    }
    if let Ok(list) = std::env::var("QC_FERRY_NICE") {
        for v in list.split(',').map(str::trim).filter(|v| !v.is_empty()) {
            match v.parse::<u8>() {
                Ok(n) if n <= 19 => hvs.push(Hv::FerryNice(n)),
                _ if v == "d19" => hvs.push(Hv::FerryDstNice),
                _ => println!("NOTE: QC_FERRY_NICE entry {v:?} skipped (0 to 19, or d19)"),
            }
        }
    }
    if let Ok(list) = std::env::var("QC_FERRY_CHANNELS") {
        for v in list.split(',').map(str::trim).filter(|v| !v.is_empty()) {
            match v.parse::<u8>() {
                Ok(n) if n <= 8 => hvs.push(Hv::FerryChannels(n)),
                _ => println!("NOTE: QC_FERRY_CHANNELS entry {v:?} skipped (0 to 8)"),
            }
        }
    }
    // Column widths for case and hypervisor names.
    let cw = cases
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(13);
    let hw = hvs.iter().map(|h| h.name().len()).max().unwrap_or(0).max(7);
    let mut imgs = Vec::new();
    for c in &cases {
        let p = dir.join(format!("{}.img", c.name));
        std::fs::write(&p, c.image.build().expect("boot sector")).expect("write image");
        println!("case {:<cw$} {}", c.name, c.what);
        imgs.push(p);
    }
    warm_host_memory(&cases);
    let started = Instant::now();
    // samples[case][hv][round], None for a failed run
    let mut samples = vec![vec![Vec::<Option<Sample>>::new(); hvs.len()]; cases.len()];
    for r in 0..runs {
        for (ci, c) in cases.iter().enumerate() {
            for k in 0..hvs.len() {
                let hi = (k + r) % hvs.len();
                let hv = hvs[hi];
                if hv.converge_only() && c.group != Group::Converge {
                    continue;
                }
                let tag = format!("{}-{}-{r}", c.name, hv.name());
                match run_once(&env, hv, c, &imgs[ci], &tag) {
                    Ok(s) if c.group == Group::Converge => {
                        println!(
                            "run {r:>2} {:<cw$} {:<hw$} {}  total {:>6.0} ms  downtime {:>5.0} ms  blackout {:>6.1} ms  switch {:>6.1} ms  throttle peak {:>3.0} %  longest stall {:>6.1} ms  rate before {:>5.0} MiB/s, during {:>5.0} MiB/s ({:.2}x, {:.1} s lost)  vCPU ran {:.2}, waited {:.2}  {:>6.0} MiB sent  passes {}  fails {}",
                            c.name,
                            hv.name(),
                            if s.converged {
                                "converged".to_owned()
                            } else {
                                format!("NOT converged ({:.0} s)", s.gave_up_ms / 1000.0)
                            },
                            s.total_ms,
                            s.downtime_ms,
                            s.blackout_ms,
                            s.switch_ms,
                            s.throttle_peak,
                            s.stall_ms,
                            mib_s(s.rate_before),
                            mib_s(s.rate_during),
                            s.progress(),
                            s.lost_s(),
                            s.vcpu_ran,
                            s.vcpu_waited,
                            s.bytes / MIB as f64,
                            s.passes,
                            s.fails
                        );
                        if s.fails > 0 {
                            println!(
                                "  FAIL: the guests printed {} '!' (pages that failed their check)",
                                s.fails
                            );
                        }
                        samples[ci][hi].push(Some(s));
                    }
                    Ok(s) => {
                        println!(
                            "run {r:>2} {:<cw$} {:<hw$} total {:>6.0} ms  downtime {:>5.0} ms  blackout {:>6.1} ms ({:<6} at {:>5.0} ms)  switch {:>6.1} ms (tick {:>4.2})  RAM {:>6.2} Gbit/s  {:>6.0} MiB sent  passes {}  fails {}",
                            c.name,
                            hv.name(),
                            s.total_ms,
                            s.downtime_ms,
                            s.blackout_ms,
                            s.blackout_at,
                            s.blackout_from_ms,
                            s.switch_ms,
                            s.interval_ms,
                            s.ram_gbit,
                            s.bytes / MIB as f64,
                            s.passes,
                            s.fails
                        );
                        if s.fails > 0 {
                            println!(
                                "  FAIL: the guests printed {} '!' (pages that failed their check)",
                                s.fails
                            );
                        }
                        samples[ci][hi].push(Some(s));
                    }
                    Err(e) => {
                        println!("run {r:>2} {:<cw$} {:<hw$} FAILED: {e}", c.name, hv.name());
                        samples[ci][hi].push(None);
                    }
                }
            }
        }
    }
    for group in [Group::Dense, Group::Sparse, Group::Converge] {
        if !cases.iter().any(|c| c.group == group) {
            continue;
        }
        println!();
        if group == Group::Converge {
            converge_summary(&cases, &hvs, &samples, cw, hw);
            continue;
        }
        match group {
            Group::Dense => println!(
                "DENSE pages (every byte of the working set rewritten with pseudo-random data)"
            ),
            Group::Sparse => println!(
                "SPARSE-friendly (one byte per page: Ferry's SPARSE records compress these pages)"
            ),
            Group::Converge => unreachable!("summarised above"),
        }
        println!(
            "{:<cw$} {:<hw$} {:>3} {:>9} {:>8} {:>8} {:>10} {:>9} {:>7} {:>8} {:>9} {:>9} {:>6} {:>5} {:>6}",
            "case",
            "hv",
            "n",
            "total ms",
            "down ms",
            "setup ms",
            "blackout",
            "switch",
            "tick",
            "RAM Gb/s",
            "wire Gb/s",
            "MiB sent",
            "passes",
            "!",
            "failed"
        );
        for (ci, c) in cases.iter().enumerate().filter(|(_, c)| c.group == group) {
            for (hi, hv) in hvs.iter().enumerate().filter(|(_, h)| !h.converge_only()) {
                let s: Vec<Sample> = samples[ci][hi].iter().flatten().cloned().collect();
                println!(
                    "{:<cw$} {:<hw$} {:>3} {:>9.0} {:>8.0} {:>8.0} {:>10.1} {:>9.1} {:>7.2} {:>8.2} {:>9.2} {:>9.0} {:>6.1} {:>5} {:>6}",
                    c.name,
                    hv.name(),
                    s.len(),
                    col(&s, |x| x.total_ms),
                    col(&s, |x| x.downtime_ms),
                    col(&s, |x| x.setup_ms),
                    col(&s, |x| x.blackout_ms),
                    col(&s, |x| x.switch_ms),
                    col(&s, |x| x.interval_ms),
                    col(&s, |x| x.ram_gbit),
                    col(&s, |x| x.gbit),
                    col(&s, |x| x.bytes) / MIB as f64,
                    col(&s, |x| x.passes),
                    s.iter().map(|x| x.fails).sum::<usize>(),
                    runs - s.len()
                );
            }
            for (hi, hv) in hvs.iter().enumerate().skip(1) {
                if hv.is_ferry_variant() || hv.converge_only() {
                    continue;
                }
                println!(
                    "{:<cw$} ferry/{:<hw$} median of paired ratios: {}",
                    c.name,
                    hv.name(),
                    time_ratios(&samples[ci][0], &samples[ci][hi]),
                );
            }
            // What TLS costs each hypervisor, against its own plain runs of the same rounds.
            for (with, without) in [(Hv::FerryTls, Hv::Ferry), (Hv::QemuTls, Hv::Qemu)] {
                let (Some(a), Some(b)) = (
                    hvs.iter().position(|&h| h == with),
                    hvs.iter().position(|&h| h == without),
                ) else {
                    continue;
                };
                let (x, y) = (&samples[ci][a], &samples[ci][b]);
                println!(
                    "{:<cw$} TLS cost {}/{}: {}  {}",
                    c.name,
                    with.name(),
                    without.name(),
                    time_ratios(x, y),
                    ratio("RAM rate", x, y, |v| v.ram_gbit),
                );
            }
            // What each lever or channel count is worth, against plain Ferry of the same rounds.
            for (hi, hv) in hvs.iter().enumerate() {
                let what = match hv {
                    Hv::FerryLeverOff(_) => "lever cost",
                    Hv::FerryChannels(_) => "channels",
                    Hv::FerryNice(_) | Hv::FerryDstNice => "nice",
                    _ => continue,
                };
                println!(
                    "{:<cw$} {what} {}/ferry: {}",
                    c.name,
                    hv.name(),
                    time_ratios(&samples[ci][hi], &samples[ci][0]),
                );
            }
        }
    }
    if cases.iter().any(|c| c.scale.is_some()) {
        scaling_summary(&cases, &hvs, &samples, &dir);
    }
    println!(
        "(up to {runs} interleaved rounds per case; {:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    if std::env::var_os("QC_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
