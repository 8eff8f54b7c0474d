//! Migration over a real (virtual) network link with a bandwidth cap (Precise rule 9): the
//! source and the destination run in two network namespaces joined by a veth pair, and a
//! `tbf` qdisc caps the source's egress at 40 Mbit/s (`netem` is not in this kernel, so there
//! is no delay or loss qdisc; stalls and resets are covered by the relays of
//! `faults_more.rs`).
//!
//! Under a dirty rate above what the link carries within the downtime limit, the migration
//! reports that it cannot converge (switchover-policy `cancel`, few iterations) and the source
//! runs on — never a hang; with a downtime limit the link can meet, the same migration
//! converges and completes, and its measured throughput shows the cap was in force.
//!
//! Needs root, iproute2 (`ip`, `tc`) and the `veth` and `sch_tbf` kernel modules. It never
//! skips: where the namespaces, the veth pair or the qdisc cannot be created, it fails naming
//! what could not be created and why (CI runs as root, where all of them work).

use ferry_tests::*;
use serde_json::json;
use std::process::Command;

/// The link: 40 Mbit/s = 5 MB/s.
const RATE_BYTES: f64 = 5e6;
const SRC_IP: &str = "10.231.0.1";
const DST_IP: &str = "10.231.0.2";

const SHAPE: [&str; 6] = [
    "--machine",
    "ferry-2.0",
    "--memory",
    "64M",
    "--guest",
    "dirty:4",
];

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair, the source side capped by tbf. Deleted on drop.
struct Link {
    src: String,
    dst: String,
    /// The veth end still in this namespace while the pair is being set up.
    veth: Option<String>,
}

impl Link {
    /// Creates the namespaces, the veth pair and the qdisc, or fails the test naming what
    /// could not be created.
    fn create() -> Link {
        let id = std::process::id();
        let (src, dst) = (format!("ferry{id}s"), format!("ferry{id}d"));
        // veth names are at most 15 bytes.
        let (va, vb) = (format!("fv{id}s"), format!("fv{id}d"));
        // Built up step by step: whatever exists is deleted on drop, also when a step fails.
        let mut link = Link {
            src,
            dst,
            veth: None,
        };
        let need = "this test needs root, iproute2 (ip, tc), network namespaces and the veth and \
                    sch_tbf kernel modules; it does not skip";
        for ns in [link.src.clone(), link.dst.clone()] {
            ip(&["netns", "add", &ns])
                .unwrap_or_else(|e| panic!("cannot create network namespace {ns}: {e}\n({need})"));
        }
        link.veth = Some(va.clone());
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            .unwrap_or_else(|e| panic!("cannot create veth pair {va}/{vb}: {e}\n({need})"));
        for (dev, ns) in [(&va, &link.src), (&vb, &link.dst)] {
            ip(&["link", "set", dev, "netns", ns])
                .unwrap_or_else(|e| panic!("cannot move {dev} into namespace {ns}: {e}"));
        }
        link.veth = None; // deleted with the namespaces from now on
        for (ns, dev, addr) in [(&link.src, &va, SRC_IP), (&link.dst, &vb, DST_IP)] {
            for args in [
                vec!["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
                vec!["-n", ns, "link", "set", dev, "up"],
                vec!["-n", ns, "link", "set", "lo", "up"],
            ] {
                ip(&args).unwrap_or_else(|e| panic!("cannot set up {dev} in {ns}: {e}"));
            }
        }
        let tbf = [
            "-n", &link.src, "qdisc", "add", "dev", &va, "root", "tbf", "rate", "40mbit", "burst",
            "64kb", "latency", "200ms",
        ];
        let out = Command::new("tc")
            .args(tbf)
            .output()
            .unwrap_or_else(|e| panic!("cannot run tc (install iproute2): {e}\n({need})"));
        assert!(
            out.status.success(),
            "cannot create the 40 Mbit/s tbf qdisc on {va} (tc {}): {}\n({need})",
            tbf.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        link
    }

    /// `ferry run ARGS` inside namespace `ns` (`ip netns exec` execs it: same pid).
    fn spawn(&self, ns: &str, dir: &std::path::Path, name: &str, args: &[&str]) -> Ferry {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(ferry_tests::bins::ferry())
            .arg("run")
            .args(args);
        Ferry::spawn_command(cmd, dir, name)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        if let Some(v) = &self.veth {
            let _ = ip(&["link", "del", v]);
        }
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.dst]);
    }
}

#[test]
fn bandwidth_capped_link_cancels_when_it_cannot_converge_and_converges_when_it_can() {
    let link = Link::create();
    let dir = tempdir();
    let mut dargs = SHAPE.to_vec();
    let listen = format!("tcp:{DST_IP}:0");
    dargs.extend(["--incoming", &listen]);
    let mut d = link.spawn(&link.dst.clone(), dir.path(), "dst", &dargs);
    let port = d.incoming_port();
    let mut s = link.spawn(&link.src.clone(), dir.path(), "src", &SHAPE);
    s.wait_pass(2);
    let uri = format!("tcp:{DST_IP}:{port}");

    // A 0 ms limit is never met while the guest dirties anything between two syncs, and a
    // pass over this 5 MB/s link lasts hundreds of ms: however slowly the loaded host runs
    // the guest, it dirties some page in that time (a 50 ms limit raced the guest's speed:
    // under load it dirtied so little that the rest fit). Every page travels whole: this
    // case is about page volume, not SPARSE.
    s.ok(
        "migrate-set-parameters",
        json!({
            "__org.ferry_sparse-pages": false,
            "downtime-limit": 0,
            "__org.ferry_max-iterations": 3,
            "__org.ferry_switchover-policy": "cancel",
        }),
    );
    s.ok("migrate", json!({"uri": uri}));
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(
        info["status"],
        "failed",
        "a 0 ms downtime limit over the capped link must not be met: {info}\nsource log:\n{}",
        read(&s.log)
    );
    let err = info["error-desc"].as_str().unwrap();
    eprintln!("capped link, 0 ms limit: {err}");
    assert!(
        err.starts_with("Migration did not converge after 3 iterations: expected downtime")
            && err.ends_with("exceeds the limit of 0 ms"),
        "{err}"
    );
    assert_eq!(s.status(), "running", "the source runs on");
    s.ok("stop", json!({}));
    assert_eq!(s.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
    s.ok("cont", json!({}));
    let dinfo = d.wait_migration(&["failed"]);
    eprintln!("capped link: destination: {}", dinfo["error-desc"]);
    assert_eq!(d.status(), "inmigrate");

    // A limit the link can meet: converges and completes over the same capped link.
    s.ok("migrate-set-parameters", json!({"downtime-limit": 3000}));
    s.ok("migrate", json!({"uri": uri}));
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "completed", "{info}\n{}", read(&d.log));
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    let p = d.pass();
    d.wait_pass(p + 1);
    d.ok("stop", json!({}));
    assert_eq!(d.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
    // The cap was in force: data pages moved no faster than the link allows (zero pages
    // travel as 18-byte markers and do not count).
    let data_bytes = info["ram"]["normal-bytes"].as_u64().unwrap() as f64;
    let secs = info["total-time"].as_u64().unwrap() as f64 / 1000.0;
    let rate = data_bytes / secs;
    eprintln!(
        "capped link: {data_bytes} data bytes in {secs} s = {:.1} MB/s (cap {:.1} MB/s), {} iterations",
        rate / 1e6,
        RATE_BYTES / 1e6,
        info["ram"]["dirty-sync-count"]
    );
    assert!(
        rate < RATE_BYTES * 1.3,
        "the tbf cap was not in force: {rate} B/s"
    );
}
