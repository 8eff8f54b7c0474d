//! Ferry against QEMU, like for like (design rule 11): the same 512-byte boot sector (Ferry's
//! own a-b-bootblock, [`vmm::guest::bootsector`]) runs on `ferry run --guest bootsector:IMG`
//! and on `qemu-system-x86_64 -accel kvm -machine pc -drive file=IMG,format=raw`, and each
//! is migrated live between two processes of its kind over loopback TCP, driven over QMP.
//!
//! `cargo bench -p vmm --bench qemu_compare`. Environment:
//! - `QC_RUNS` (default 10): runs per case and hypervisor;
//! - `QC_CASES`: comma-separated case names to run (default the 1 and 2 GiB ones but
//!   `1g-dirty512`); cases: `1g-idle`, `1g-dirty64`, `1g-dirty99`, `2g-once`, `4g-idle`,
//!   `1g-dirty512`, `4g-dirty64`, `4g-dirty512`;
//! - `QC_QEMU` (default `qemu-system-x86_64`); QEMU is skipped with a note if it is absent;
//! - `QC_KEEP=DIR`: keep images, logs and serial captures there;
//! - `QC_WARM_GIB` (default: 3x the largest case, within available memory): host memory to
//!   touch once before the first run. This machine is itself virtualised; memory it never
//!   touched costs its hypervisor a fault per page, which would land in whichever run comes
//!   first, Ferry's or QEMU's. `0` skips it;
//! - `QC_FERRY_SPARSE=0`: Ferry sends every page whole (`__org.ferry_sparse-pages` off), to
//!   see what the engine does without the SPARSE encoding this guest's pages favour;
//! - `QC_QEMU_XBZRLE=1`: QEMU with its `xbzrle` capability (delta-encodes re-sent pages
//!   against a cache of sent ones; off by default in QEMU);
//! - `QC_FERRY_LOG` (default `warn`): `RUST_LOG` for the Ferry processes (their logs are kept
//!   with `QC_KEEP`).
//!
//! Runs are interleaved (run r of every case, Ferry and QEMU alternating which goes first)
//! and medians reported. Both sides get `downtime-limit` 300 ms and `max-bandwidth`
//! 100 GiB/s. Per run: total time, source-side downtime and bytes sent from the source's
//! `query-migrate`; RAM throughput = bits of guest pages moved (`normal` + `duplicate`, 4 KiB
//! each) over total time; wire throughput = bits sent over total time; guest-visible
//! downtime = the time from the last progress character (`A`/`B` on COM1) the source guest printed to the
//! first one the destination guest printed, as timestamped by this process reading both
//! serial outputs through pipes. That gap includes one progress interval, so the median
//! interval just before the migration is reported next to it.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm::guest::bootsector::{AbBootblock, Workload};
use vmm::qmp::client::QmpClient;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Longest a guest may take to boot and warm up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest a migration may take before it is cancelled and counted as failed.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest the destination guest may take to print after completion.
const RESUME_TIMEOUT: Duration = Duration::from_secs(20);
/// Progress characters the source must print before the migration starts.
const WARMUP_CHARS: usize = 4;
/// Delay-loop iterations between two `B`s of an idling guest (about 7 ms here: this
/// platform runs the non-paged 32-bit guest code at roughly 1 us per loop iteration).
const SPIN_LOOPS: u32 = 1 << 13;

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    memory: u64,
    image: AbBootblock,
    what: &'static str,
}

fn cases() -> Vec<Case> {
    let bb = |end: u64, workload| AbBootblock {
        start: MIB,
        end,
        workload,
        spin_loops: SPIN_LOOPS,
    };
    let dirty = Workload::Dirty { passes_per_b: 1 };
    vec![
        Case {
            name: "1g-idle",
            memory: GIB,
            image: bb(2 * MIB, Workload::Idle),
            what: "1 GiB, spins printing B, writes no memory",
        },
        Case {
            name: "1g-dirty64",
            memory: GIB,
            image: bb(65 * MIB, dirty),
            what: "1 GiB, incb first byte of each page of [1,65) MiB, B every pass",
        },
        Case {
            name: "1g-dirty99",
            memory: GIB,
            image: bb(100 * MIB, dirty),
            what: "1 GiB, incb first byte of each page of [1,100) MiB (QEMU's test), B every pass",
        },
        Case {
            name: "2g-once",
            memory: 2 * GIB,
            image: bb(2 * GIB, Workload::WriteOnce),
            what: "2 GiB, writes 1 to the first byte of every page of [1 MiB,2 GiB) once, then spins printing B",
        },
        Case {
            name: "4g-idle",
            memory: 4 * GIB,
            image: bb(2 * MIB, Workload::Idle),
            what: "4 GiB, spins printing B, writes no memory",
        },
        Case {
            name: "1g-dirty512",
            memory: GIB,
            image: bb(513 * MIB, dirty),
            what: "1 GiB, incb first byte of each page of [1,513) MiB, B every pass",
        },
        Case {
            name: "4g-dirty64",
            memory: 4 * GIB,
            image: bb(65 * MIB, dirty),
            what: "4 GiB, incb first byte of each page of [1,65) MiB, B every pass",
        },
        Case {
            name: "4g-dirty512",
            memory: 4 * GIB,
            image: bb(513 * MIB, dirty),
            what: "4 GiB, incb first byte of each page of [1,513) MiB, B every pass",
        },
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hv {
    Ferry,
    Qemu,
}

impl Hv {
    fn name(self) -> &'static str {
        match self {
            Hv::Ferry => "ferry",
            Hv::Qemu => "qemu",
        }
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

    fn wait_chars(&mut self, n: usize, after: Instant, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.chars().iter().filter(|(t, _)| *t >= after).count();
            if have >= n {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("process exited ({st}) after {have} serial chars"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "only {have} of {n} serial chars within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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
                    .filter(|b| matches!(b, b'A' | b'B'))
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
        Hv::Ferry => {
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
            c
        }
        Hv::Qemu => {
            let mut c = Command::new(&env.qemu);
            c.args([
                "-accel", "kvm", "-cpu", "qemu64", "-machine", "pc", "-smp", "1",
            ])
            .arg("-m")
            .arg(format!("{}M", case.memory / MIB))
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
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
    /// Last source progress char to first destination progress char.
    visible_ms: f64,
    /// Median progress interval on the source before the migration.
    interval_ms: f64,
    passes: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_once(env: &Env, hv: Hv, case: &Case, img: &Path, tag: &str) -> Result<Sample, String> {
    let dir = env.dir.join(tag);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (ss, ds) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let mut dst = spawn(
        command(env, hv, case, img, &ds, true),
        &ds,
        &dir.join("dst.log"),
    )?;
    if hv == Hv::Qemu {
        dst.exec("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
    }
    let q = dst.exec("query-migrate", json!({}))?;
    let port = q["socket-address"][0]["port"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            q["socket-address"][0]["port"]
                .as_u64()
                .map(|p| p.to_string())
        })
        .ok_or_else(|| format!("destination reported no port: {q}"))?;
    let mut src = spawn(
        command(env, hv, case, img, &ss, false),
        &ss,
        &dir.join("src.log"),
    )?;
    let boot = Instant::now();
    src.wait_chars(WARMUP_CHARS, boot, BOOT_TIMEOUT)?;
    let params = json!({"downtime-limit": 300, "max-bandwidth": 100u64 * GIB});
    src.exec("migrate-set-parameters", params.clone())?;
    if hv == Hv::Qemu && std::env::var("QC_QEMU_XBZRLE").is_ok_and(|v| v == "1") {
        let caps = json!({"capabilities": [{"capability": "xbzrle", "state": true}]});
        src.exec("migrate-set-capabilities", caps.clone())?;
        dst.exec("migrate-set-capabilities", caps)?;
    }
    if hv == Hv::Ferry && std::env::var("QC_FERRY_SPARSE").is_ok_and(|v| v == "0") {
        src.exec(
            "migrate-set-parameters",
            json!({"__org.ferry_sparse-pages": false}),
        )?;
    }
    dst.exec("migrate-set-parameters", params)?;
    let before = src.chars();
    let mut gaps: Vec<f64> = before
        .windows(2)
        .rev()
        .take(10)
        .map(|w| ms(w[1].0 - w[0].0))
        .collect();
    let start = Instant::now();
    src.exec(
        "migrate",
        json!({"uri": format!("tcp:{}:{port}", Ipv4Addr::LOCALHOST)}),
    )?;
    let deadline = start + MIGRATE_TIMEOUT;
    let info = loop {
        let info = src.exec("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => {
                return Err(format!(
                    "migration {}: {}",
                    info["status"], info["error-desc"]
                ));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = src.exec("migrate_cancel", json!({}));
            return Err(format!(
                "no convergence within {MIGRATE_TIMEOUT:?}: {}",
                info["ram"]
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    dst.wait_chars(2, start, RESUME_TIMEOUT)?;
    let last_src = src
        .chars()
        .iter()
        .rev()
        .map(|c| c.0)
        .next()
        .ok_or("no source output")?;
    let first_dst = dst
        .chars()
        .iter()
        .map(|c| c.0)
        .find(|t| *t >= start)
        .ok_or("no destination output")?;
    let total_ms = info["total-time"].as_f64().unwrap_or(f64::NAN);
    let bytes = info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN);
    let pages = info["ram"]["normal"].as_f64().unwrap_or(f64::NAN)
        + info["ram"]["duplicate"].as_f64().unwrap_or(f64::NAN);
    let s = Sample {
        total_ms,
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        setup_ms: info["setup-time"].as_f64().unwrap_or(f64::NAN),
        bytes,
        gbit: bytes * 8.0 / (total_ms / 1000.0) / 1e9,
        ram_gbit: pages * 4096.0 * 8.0 / (total_ms / 1000.0) / 1e9,
        visible_ms: first_dst
            .checked_duration_since(last_src)
            .map_or(f64::NAN, ms),
        interval_ms: median(&mut gaps),
        passes: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
    };
    if env.dir.starts_with(std::env::temp_dir()) && std::env::var_os("QC_KEEP").is_none() {
        drop(src);
        drop(dst);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(s)
}

/// Touch (and free) enough host memory that the runs get pages the machine has backed before.
fn warm_host_memory(cases: &[Case]) {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10);
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

fn main() {
    let runs: usize = std::env::var("QC_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    let wanted: Option<Vec<String>> = std::env::var("QC_CASES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| match &wanted {
            Some(w) => w.iter().any(|n| n == c.name),
            None => !c.name.starts_with("4g") && c.name != "1g-dirty512",
        })
        .collect();
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
    }
    let mut imgs = Vec::new();
    for c in &cases {
        let p = dir.join(format!("{}.img", c.name));
        std::fs::write(&p, c.image.build().expect("boot sector")).expect("write image");
        println!("case {:<11} {}", c.name, c.what);
        imgs.push(p);
    }
    warm_host_memory(&cases);
    let started = Instant::now();
    let mut samples = vec![vec![Vec::<Sample>::new(); hvs.len()]; cases.len()];
    let mut failures = vec![vec![0usize; hvs.len()]; cases.len()];
    for r in 0..runs {
        for (ci, c) in cases.iter().enumerate() {
            let mut order: Vec<usize> = (0..hvs.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for hi in order {
                let hv = hvs[hi];
                let tag = format!("{}-{}-{r}", c.name, hv.name());
                match run_once(&env, hv, c, &imgs[ci], &tag) {
                    Ok(s) => {
                        println!(
                            "run {r:>2} {:<11} {:<5} total {:>6.0} ms  downtime {:>5.0} ms  visible {:>6.1} ms (interval {:>5.1})  RAM {:>6.2} Gbit/s  wire {:>6.2} Gbit/s  {:>6.0} MiB sent  passes {}",
                            c.name,
                            hv.name(),
                            s.total_ms,
                            s.downtime_ms,
                            s.visible_ms,
                            s.interval_ms,
                            s.ram_gbit,
                            s.gbit,
                            s.bytes / MIB as f64,
                            s.passes
                        );
                        samples[ci][hi].push(s);
                    }
                    Err(e) => {
                        println!("run {r:>2} {:<11} {:<5} FAILED: {e}", c.name, hv.name());
                        failures[ci][hi] += 1;
                    }
                }
            }
        }
    }
    println!();
    println!(
        "{:<11} {:<5} {:>3} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>8} {:>10} {:>7} {:>6}",
        "case",
        "hv",
        "n",
        "total ms",
        "down ms",
        "setup ms",
        "visible ms",
        "intvl ms",
        "RAM Gb/s",
        "wire Gb/s",
        "MiB sent",
        "passes",
        "fail"
    );
    for (ci, c) in cases.iter().enumerate() {
        for (hi, hv) in hvs.iter().enumerate() {
            let s = &samples[ci][hi];
            println!(
                "{:<11} {:<5} {:>3} {:>9.0} {:>9.0} {:>9.0} {:>10.1} {:>9.1} {:>8.2} {:>8.2} {:>10.0} {:>7.1} {:>6}",
                c.name,
                hv.name(),
                s.len(),
                col(s, |x| x.total_ms),
                col(s, |x| x.downtime_ms),
                col(s, |x| x.setup_ms),
                col(s, |x| x.visible_ms),
                col(s, |x| x.interval_ms),
                col(s, |x| x.ram_gbit),
                col(s, |x| x.gbit),
                col(s, |x| x.bytes) / MIB as f64,
                col(s, |x| x.passes),
                failures[ci][hi]
            );
        }
        if hvs.len() == 2 {
            let (f, q) = (&samples[ci][0], &samples[ci][1]);
            let ratio = |g: fn(&Sample) -> f64| col(f, g) / col(q, g);
            println!(
                "{:<11} ferry/qemu: total {:.2}x  downtime {:.2}x  visible {:.2}x  RAM throughput {:.2}x  wire {:.2}x  bytes {:.2}x",
                c.name,
                ratio(|x| x.total_ms),
                ratio(|x| x.downtime_ms),
                ratio(|x| x.visible_ms),
                ratio(|x| x.ram_gbit),
                ratio(|x| x.gbit),
                ratio(|x| x.bytes)
            );
        }
    }
    println!(
        "(medians of up to {runs} interleaved runs per case and hypervisor; {:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    if std::env::var_os("QC_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
