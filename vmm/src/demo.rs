//! `ferry demo`: start a destination and a source `ferry` process, let the guest dirty
//! memory, migrate it live over loopback TCP, and show that it continues on the destination
//! with its memory intact. Everything goes through QMP, as an operator would do it.

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm::qmp::client::QmpClient;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Machine type of both sides.
    #[arg(long, default_value = "ferry")]
    machine: String,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Working set the guest keeps dirtying, in MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u64,
    /// Keep sockets, logs and the stream capture in this directory.
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
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
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
            dir.join(format!("{name}.log")).display()
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

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
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
    let common = vec![
        "--machine".to_owned(),
        a.machine.clone(),
        "--memory".to_owned(),
        a.memory.clone(),
        "--guest".to_owned(),
        format!("dirty:{}", a.working_set),
    ];
    println!("Ferry demo: live migration of a running guest over loopback TCP");
    println!(
        "  machine {}, {} RAM, guest dirtying a {} MiB working set",
        a.machine, a.memory, a.working_set
    );
    if keep {
        println!("  work directory {}", dir.display());
    }

    let mut dst_args = common.clone();
    dst_args.extend(["--incoming".into(), "tcp:127.0.0.1:0".into()]);
    dst_args.extend([
        "--dump-stream".into(),
        dir.join("received.stream").display().to_string(),
    ]);
    let mut dst = spawn(dir, "destination", &dst_args)?;
    let addr = dst.qmp.execute("query-migrate", json!({}))?;
    let port = addr["socket-address"][0]["port"]
        .as_str()
        .context("destination reported no listening port")?
        .to_owned();
    println!(
        "[1] destination started (pid {}), state {}, listening on 127.0.0.1:{port}",
        dst.child.id(),
        status(&mut dst)?
    );

    let mut src = spawn(dir, "source", &common)?;
    let p = wait_pass(&mut src, 3)?;
    println!(
        "[2] source started (pid {}), guest running, at pass {p}",
        src.child.id()
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
    println!("[3] migrate tcp:127.0.0.1:{port} (guest at pass {before})");
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
        "[4] completed: total {} ms, source downtime {} ms, {} pre-copy passes",
        info["total-time"], info["downtime"], r["dirty-sync-count"]
    );
    println!(
        "    {} of RAM: {} pages sent with data, {} as zero markers, {} on the wire",
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
    let at = pass(&mut dst)?;
    let later = wait_pass(&mut dst, at + 3)?;
    println!("[5] guest continues on the destination: pass {at} -> {later}");
    dst.qmp.execute("stop", json!({}))?;
    let v = dst.qmp.execute("__org.ferry_verify-guest", json!({}))?;
    println!(
        "[6] destination paused; memory pattern check: {} pages verified, pass {}",
        v["pages"], v["pass"]
    );
    println!(
        "    stream capture: {} (inspect with ferry-dump show)",
        dir.join("received.stream").display()
    );
    for p in [&mut src, &mut dst] {
        let _ = p.qmp.execute("quit", json!({}));
    }
    println!("RESULT: OK - the guest migrated live and its memory is intact");
    Ok(())
}

fn status(p: &mut Proc) -> Result<String> {
    let v: Value = p.qmp.execute("query-status", json!({}))?;
    Ok(v["status"].as_str().unwrap_or("?").to_owned())
}
