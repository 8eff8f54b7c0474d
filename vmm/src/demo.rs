//! `ferry demo`: start a destination and a source `ferry` process, hot-plug a CPU core, a
//! memory block and a multifunction PCI slot into the running guest, leave one unplug
//! pending, migrate live over loopback TCP, and show that the guest continues on the
//! destination with its memory intact and finishes the unplug there. Everything goes through
//! QMP, as an operator would do it.

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm::qmp::client::QmpClient;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Machine type of both sides (memory hotplug needs ferry-2.0).
    #[arg(long, default_value = "ferry")]
    machine: String,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Working set the guest keeps dirtying, in MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u64,
    /// Keep sockets, logs and a capture of the stream in this directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Proc {
    child: Child,
    qmp: QmpClient,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> Result<Proc> {
    let sock = dir.join(format!("{name}.qmp"));
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run")
        .args(args)
        .arg("--qmp")
        .arg(format!("unix:{}", sock.display()));
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("Cannot start ferry")?;
    let qmp = QmpClient::connect(&sock, Duration::from_secs(20)).with_context(|| {
        format!(
            "{name} did not open its QMP socket; see {}",
            log_path.display()
        )
    })?;
    Ok(Proc { child, qmp })
}

fn pass(p: &mut Proc) -> Result<u64> {
    Ok(p.qmp.execute("__org.ferry_query-guest", json!({}))?["pass"]
        .as_u64()
        .unwrap_or(0))
}

fn wait_pass(p: &mut Proc, target: u64) -> Result<u64> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let n = pass(p)?;
        if n >= target {
            return Ok(n);
        }
        ensure!(
            Instant::now() < deadline,
            "the guest did not reach pass {target} within {TIMEOUT:?} (at {n})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connectors(p: &mut Proc) -> Result<Vec<Value>> {
    let v = p.qmp.execute("__org.ferry_query-connectors", json!({}))?;
    Ok(v.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !c["device"].is_null())
        .collect())
}

fn wait_configured(p: &mut Proc, ids: &[&str]) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let cs = connectors(p)?;
        let done = ids.iter().all(|id| {
            cs.iter().any(|c| {
                c["device"] == *id && c["state"].as_str().unwrap_or("").ends_with("configured")
            })
        });
        if done {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the guest did not configure {ids:?}: {cs:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn show_connectors(p: &mut Proc, indent: &str) -> Result<()> {
    for c in connectors(p)? {
        let mut extra = String::new();
        if c["unplug-pending"] == true {
            extra.push_str(", unplug pending");
        }
        println!(
            "{indent}{:#010x} {:<9} {:<8} {}{extra}",
            c["index"].as_u64().unwrap_or(0),
            c["kind"].as_str().unwrap_or(""),
            c["device"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn devices(mem_hotplug: bool) -> Vec<Value> {
    let mut d = vec![json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1})];
    if mem_hotplug {
        d.push(json!({"driver": "ferry-mem-block", "id": "mem0", "slot": 0}));
    }
    d.push(json!({"driver": "ferry-pci-fn", "id": "nic1", "addr": "01.1"}));
    d.push(json!({"driver": "ferry-pci-fn", "id": "nic0", "addr": "01.0", "multifunction": true}));
    d
}

pub fn run(a: DemoArgs) -> Result<()> {
    let keep = a.dir.is_some();
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let res = demo(&a, &dir, keep);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    res
}

fn demo(a: &DemoArgs, dir: &Path, keep: bool) -> Result<()> {
    let machine = machine_types::MachineType::lookup(&a.machine)?;
    let mem_hotplug = machine.compat().mem_hotplug;
    let common = vec![
        "--machine".to_owned(),
        machine.name().to_owned(),
        "--memory".to_owned(),
        a.memory.clone(),
        "--guest".to_owned(),
        format!("dirty:{}", a.working_set),
    ];
    println!(
        "Ferry demo: live migration of a running guest with hot-plugged devices over loopback TCP"
    );
    println!(
        "  machine {}, {} RAM, guest dirtying a {} MiB working set",
        machine.name(),
        a.memory,
        a.working_set
    );
    if keep {
        println!("  work directory {}", dir.display());
    }

    let mut src = spawn(dir, "source", &common)?;
    let p = wait_pass(&mut src, 2)?;
    println!(
        "[1] source started (pid {}), guest running, at pass {p}",
        src.child.id()
    );
    let devs = devices(mem_hotplug);
    for d in &devs {
        src.qmp.execute("device_add", d.clone())?;
    }
    let ids: Vec<&str> = devs.iter().filter_map(|d| d["id"].as_str()).collect();
    wait_configured(&mut src, &ids)?;
    println!(
        "[2] hot-plugged {} devices; the guest configured every connector:",
        ids.len()
    );
    show_connectors(&mut src, "      ")?;
    // The guest holds unplug requests back until told: one unplug is pending while migrating.
    src.qmp
        .execute("__org.ferry_guest-hotplug", json!({"mode": "slow"}))?;
    src.qmp.execute("device_del", json!({"id": "core1"}))?;
    println!("    device_del core1: the guest has not answered yet (unplug pending)");

    let mut dst_args = common.clone();
    dst_args.extend(["--incoming".into(), "tcp:127.0.0.1:0".into()]);
    if keep {
        dst_args.extend([
            "--dump-stream".into(),
            dir.join("received.stream").display().to_string(),
        ]);
    }
    let mut dst = spawn(dir, "destination", &dst_args)?;
    for d in &devs {
        dst.qmp.execute("device_add", d.clone())?;
    }
    let addr = dst.qmp.execute("query-migrate", json!({}))?;
    let port = addr["socket-address"][0]["port"]
        .as_str()
        .context("destination reported no listening port")?
        .to_owned();
    println!(
        "[3] destination started (pid {}), same devices added before start, state {}, listening on 127.0.0.1:{port}",
        dst.child.id(),
        status(&mut dst)?
    );

    for q in [&mut src.qmp, &mut dst.qmp] {
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        )?;
    }
    let before = pass(&mut src)?;
    src.qmp
        .execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    println!("[4] migrate tcp:127.0.0.1:{port} (guest at pass {before})");
    let refused = src.qmp.execute(
        "device_add",
        json!({"driver": "ferry-cpu-core", "id": "core2", "core-id": 2}),
    );
    if let Err(e) = refused {
        println!("    device_add during the migration: {e}");
    }
    let deadline = Instant::now() + TIMEOUT;
    let info = loop {
        let info = src.qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => bail!("migration {}: {}", info["status"], info["error-desc"]),
            s => {
                let r = &info["ram"];
                println!(
                    "    {s:<8} pass {:>2}  sent {:>10}  remaining {:>10}  {:>7.2} Gbit/s",
                    r["dirty-sync-count"],
                    mib(r["transferred"].as_u64().unwrap_or(0)),
                    mib(r["remaining"].as_u64().unwrap_or(0)),
                    r["mbps"].as_f64().unwrap_or(0.0) / 1000.0
                );
            }
        }
        ensure!(
            Instant::now() < deadline,
            "migration did not finish within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    dst.qmp
        .wait_event("MIGRATION", TIMEOUT, |d| d["status"] == "completed")?;
    let r = &info["ram"];
    println!(
        "[5] completed: total {} ms, source downtime {} ms, {} pre-copy passes",
        info["total-time"], info["downtime"], r["dirty-sync-count"]
    );
    println!(
        "    {} of RAM and blocks: {} pages sent with data, {} as zero markers, {} on the wire",
        mib(r["total"].as_u64().unwrap_or(0)),
        r["normal"],
        r["duplicate"],
        mib(r["transferred"].as_u64().unwrap_or(0))
    );
    println!(
        "    source state: {}, destination state: {}",
        status(&mut src)?,
        status(&mut dst)?
    );
    println!("    connectors on the destination:");
    show_connectors(&mut dst, "      ")?;
    let at = pass(&mut dst)?;
    let later = wait_pass(&mut dst, at + 3)?;
    println!("[6] guest continues on the destination: pass {at} -> {later}");
    dst.qmp
        .execute("__org.ferry_guest-hotplug", json!({"answer": true}))?;
    let ev = dst
        .qmp
        .wait_event("DEVICE_DELETED", TIMEOUT, |d| d["device"] == "core1")?;
    println!(
        "    the guest answered the pending unplug on the destination: {}",
        ev["event"].as_str().unwrap_or("")
    );
    dst.qmp.execute("stop", json!({}))?;
    let v = dst.qmp.execute("__org.ferry_verify-guest", json!({}))?;
    println!(
        "[7] destination paused; memory pattern check: {} pages and {} hot-plugged block(s) verified, pass {}",
        v["pages"], v["blocks"], v["pass"]
    );
    if keep {
        println!(
            "    stream capture: {} (inspect with ferry-dump show)",
            dir.join("received.stream").display()
        );
    }
    for p in [&mut src, &mut dst] {
        let _ = p.qmp.execute("quit", json!({}));
    }
    println!(
        "RESULT: OK - the guest migrated live with its devices, finished the unplug on the destination, and its memory is intact"
    );
    Ok(())
}

fn status(p: &mut Proc) -> Result<String> {
    let v: Value = p.qmp.execute("query-status", json!({}))?;
    Ok(v["status"].as_str().unwrap_or("?").to_owned())
}
