//! Mutual TLS between real `ferry` processes, with certificates made here: a live migration
//! of a hot-plugged guest, each refusal named on both sides (plain against TLS either way,
//! unknown CA, expired certificate, wrong host name, a client `tls-authz` does not allow),
//! a relay flipping one ciphertext byte, and 20 unauthenticated connections while a
//! legitimate migration runs. After every refusal the source runs on and the destination
//! keeps listening with nothing loaded.

use ferry_tests::relay;
use ferry_tests::*;
use ferry_tls::testing::{Leaf, TestCa, Validity};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

const SHAPE: [&str; 8] = [
    "--machine",
    "ferry-2.1",
    "--memory",
    "64M",
    "--guest",
    "dirty:4",
    "--unplug-timeout-ms",
    "600000",
];

/// Certificates for one test: the CA both sides trust, a rogue CA, and a directory per
/// credential set.
struct Pki {
    dir: PathBuf,
    ca: TestCa,
    rogue: TestCa,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        Pki {
            dir: dir.join("pki"),
            ca: TestCa::new("Ferry test CA"),
            rogue: TestCa::new("Rogue CA"),
        }
    }

    /// Server credentials for `127.0.0.1`/`localhost` signed by the CA.
    fn server(&self) -> String {
        let d = self.dir.join("server");
        self.ca.write(&d, &Leaf::new("dst.example.com"), true);
        d.display().to_string()
    }

    /// Client credentials named `cn`, signed by `ca`, trusting the real CA.
    fn client(&self, name: &str, leaf: Leaf, ca: &TestCa) -> String {
        let d = self.dir.join(name);
        ca.write(&d, &leaf, false);
        std::fs::write(d.join("ca-cert.pem"), self.ca.cert_pem()).unwrap();
        d.display().to_string()
    }
}

fn creds(id: &str, dir: &str, endpoint: &str) -> Value {
    json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir, "endpoint": endpoint})
}

/// A TLS destination: credentials and the allow-list on the command line.
fn tls_destination(dir: &Path, pki: &Pki, name: &str) -> (Ferry, String) {
    let server = pki.server();
    let mut args: Vec<String> = strings(&SHAPE);
    args.extend(strings(&[
        "--incoming",
        "tcp:127.0.0.1:0",
        "--object",
        &format!("tls-creds-x509,id=tls0,dir={server},endpoint=server"),
        "--object",
        "authz-simple,id=auth0,identity=CN=ferry-src",
        "--global",
        "migration.tls-creds=tls0",
        "--global",
        "migration.tls-authz=auth0",
    ]));
    let mut d = Ferry::spawn(dir, name, &args);
    let port = d.incoming_port();
    (d, port)
}

/// A running source; `client` (when given) becomes its `tls-creds` over QMP.
fn source(dir: &Path, name: &str, client: Option<&str>) -> Ferry {
    let mut s = Ferry::spawn(dir, name, &SHAPE);
    s.ok("migrate-set-parameters", completes_under_load());
    if let Some(c) = client {
        set_client(&mut s, c);
    }
    s.wait_pass(1);
    s
}

/// Replace the source's credentials object with one loaded from `dir`.
fn set_client(s: &mut Ferry, dir: &str) {
    let objs = s.ok("__org.ferry_query-objects", json!({}));
    if objs.as_array().unwrap().iter().any(|o| o["name"] == "tls0") {
        s.ok("object-del", json!({"id": "tls0"}));
    }
    s.ok("object-add", creds("tls0", dir, "client"));
    s.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
}

/// Migrate, expect failure; returns the source's error-desc. The source runs on with its
/// memory intact.
fn refused(s: &mut Ferry, port: &str) -> String {
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["failed", "completed"]);
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(
        s.status(),
        "running",
        "the source must run on: {}",
        read(&s.log)
    );
    s.ok("stop", json!({}));
    assert_eq!(s.ok("__org.ferry_verify-guest", json!({}))["ok"], true);
    s.ok("cont", json!({}));
    info["error-desc"].as_str().unwrap_or("").to_owned()
}

/// Wait until the destination's last attempt failed for a reason containing `want`; it is
/// still waiting for a migration, nothing loaded.
fn dst_refused(d: &mut Ferry, want: &str) -> String {
    let e = d.poll(
        TIMEOUT,
        &|f| {
            format!(
                "the destination never reported '{want}': {}",
                f.ok("query-migrate", json!({}))
            )
        },
        |f| {
            let q = f.ok("query-migrate", json!({}));
            let e = q["error-desc"].as_str().unwrap_or("").to_owned();
            (q["status"] == "failed" && e.contains(want)).then_some(e)
        },
    );
    assert_eq!(d.status(), "inmigrate", "nothing may be loaded");
    e
}

/// Keep a migration active until the test lets go: a downtime limit of 0 never fits while
/// the guest dirties pages, and the cap keeps each pass long.
fn hold() -> Value {
    json!({"max-bandwidth": 1 << 20, "downtime-limit": 0, "__org.ferry_max-iterations": 10000})
}

/// Let a held migration finish.
fn release() -> Value {
    let mut p = completes_under_load();
    p["max-bandwidth"] = json!(0);
    p
}

fn migrate_ok(s: &mut Ferry, d: &mut Ferry, port: &str) {
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}\n{}", read(&d.log));
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    let p = d.pass();
    d.wait_pass(p + 1);
    d.verify();
}

#[test]
fn a_hotplugged_guest_migrates_over_mutual_tls_and_the_capture_reads_as_plain() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let devices = [
        json!({"driver": "ferry-cpu-core", "id": "core1", "core-id": 1}),
        json!({"driver": "ferry-mem-block", "id": "mem0", "slot": 0}),
        json!({"driver": "ferry-pci-fn", "id": "nic1", "addr": "01.1"}),
        json!({"driver": "ferry-pci-fn", "id": "nic0", "addr": "01.0", "multifunction": true}),
    ];
    let client = pki.client("src", Leaf::new("ferry-src"), &pki.ca);
    let mut s = source(dir.path(), "src", Some(&client));
    for d in &devices {
        s.ok("device_add", d.clone());
    }
    for d in ["core1", "mem0", "nic0", "nic1"] {
        s.wait_connector(
            d,
            |c| c["state"].as_str().unwrap().ends_with("configured"),
            "configure",
        );
    }
    s.ok("__org.ferry_guest-hotplug", json!({"mode": "slow"}));
    s.ok("device_del", json!({"id": "mem0"}));
    s.wait_connector("mem0", |c| c["unplug-pending"] == true, "unplug request");

    // The destination takes its TLS setup over QMP this time, and keeps a decrypted copy.
    let capture = dir.path().join("received.stream");
    let mut dargs = strings(&SHAPE);
    dargs.extend(strings(&["--incoming", "tcp:127.0.0.1:0", "--dump-stream"]));
    dargs.push(capture.display().to_string());
    let mut d = Ferry::spawn(dir.path(), "dst", &dargs);
    for dev in &devices {
        d.ok("device_add", dev.clone());
    }
    d.ok("object-add", creds("tls0", &pki.server(), "server"));
    d.ok(
        "object-add",
        json!({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
               "rules": [{"match": "CN=ferry-*", "policy": "allow", "format": "glob"}]}),
    );
    d.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
    );
    let q = d.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (q["tls-creds"].as_str(), q["tls-authz"].as_str()),
        (Some("tls0"), Some("auth0"))
    );
    let port = d.incoming_port();

    // Held mid-stream so hotplug can be tried on both sides while the TLS stream flows.
    s.ok("migrate-set-parameters", hold());
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    s.wait_migration(&["active"]);
    d.wait_migration(&["active"]);
    let core2 = json!({"driver": "ferry-cpu-core", "id": "core2", "core-id": 2});
    assert_eq!(
        s.err("device_add", core2.clone()),
        "GenericError: device_add not allowed while migrating"
    );
    assert_eq!(
        d.err("device_add", core2),
        "GenericError: device_add not allowed while migrating"
    );
    s.ok("migrate-set-parameters", release());
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}\n{}", read(&d.log));
    d.wait_migration(&["completed"]);
    assert!(
        read(&d.log).contains("TLS session established"),
        "{}",
        read(&d.log)
    );

    // The pending unplug completes on the destination once its guest answers.
    assert_eq!(d.connector("mem0")["unplug-pending"], true);
    d.ok("__org.ferry_guest-hotplug", json!({"answer": true}));
    d.wait_event("DEVICE_DELETED", |x| x["device"] == "mem0");
    for dev in ["core1", "nic0", "nic1"] {
        d.wait_connector(
            dev,
            |c| c["state"].as_str().unwrap().ends_with("configured"),
            "stay configured",
        );
    }
    let p = d.pass();
    d.wait_pass(p + 1);
    d.verify();

    // The capture is the decrypted stream: ferry-dump reads it as any other.
    let out = ferry_dump(dir.path(), &["verify", &capture.display().to_string()]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn every_refusal_is_named_on_both_sides_and_the_destination_keeps_listening() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let (mut d, port) = tls_destination(dir.path(), &pki, "dst");
    // A plain source.
    let mut s = source(dir.path(), "src", None);
    let e = refused(&mut s, &port);
    assert!(
        e.contains("this destination requires TLS (tls-creds 'tls0')"),
        "{e}"
    );
    dst_refused(&mut d, "the source connected without it");

    // A client certificate from a CA the destination does not trust.
    set_client(
        &mut s,
        &pki.client("rogue", Leaf::new("ferry-src"), &pki.rogue),
    );
    let e = refused(&mut s, &port);
    assert!(
        e.contains("does not trust the CA that signed our certificate"),
        "{e}"
    );
    dst_refused(&mut d, "not signed by a CA in our ca-cert.pem");

    // An expired client certificate.
    let mut old = Leaf::new("ferry-src");
    old.validity = Validity::Expired;
    set_client(&mut s, &pki.client("expired", old, &pki.ca));
    let e = refused(&mut s, &port);
    assert!(e.contains("has expired or is not valid yet"), "{e}");
    dst_refused(&mut d, "certificate expired");

    // The right client, but the destination's certificate does not carry the name asked for.
    set_client(&mut s, &pki.client("good", Leaf::new("ferry-src"), &pki.ca));
    s.ok(
        "migrate-set-parameters",
        json!({"tls-hostname": "wrong.example.com"}),
    );
    let e = refused(&mut s, &port);
    assert!(
        e.contains("destination's certificate was rejected") && e.contains("wrong.example.com"),
        "{e}"
    );
    dst_refused(&mut d, "rejected our certificate");
    s.ok("migrate-set-parameters", json!({"tls-hostname": null}));

    // A valid certificate for a name the allow-list does not hold.
    set_client(&mut s, &pki.client("other", Leaf::new("intruder"), &pki.ca));
    let e = refused(&mut s, &port);
    assert!(
        e.contains("client certificate 'CN=intruder' is not allowed by tls-authz 'auth0'"),
        "{e}"
    );
    dst_refused(&mut d, "'CN=intruder' is not allowed");

    // Credentials of the wrong endpoint are refused before anything connects.
    s.ok("object-del", json!({"id": "tls0"}));
    s.ok("object-add", creds("tls0", &pki.server(), "server"));
    let e = s.err("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    assert!(
        e.contains("are for endpoint=server; a migration source needs endpoint=client"),
        "{e}"
    );

    // And after all that, the right source gets through.
    set_client(
        &mut s,
        &pki.client("good2", Leaf::new("ferry-src"), &pki.ca),
    );
    migrate_ok(&mut s, &mut d, &port);
}

#[test]
fn a_tls_source_is_told_when_the_destination_has_no_tls() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let mut args = strings(&SHAPE);
    args.extend(strings(&["--incoming", "tcp:127.0.0.1:0"]));
    let mut d = Ferry::spawn(dir.path(), "dst", &args);
    let port = d.incoming_port();
    let mut s = source(
        dir.path(),
        "src",
        Some(&pki.client("src", Leaf::new("ferry-src"), &pki.ca)),
    );
    let e = refused(&mut s, &port);
    assert!(
        e.contains("not set up for TLS") && e.contains("has no tls-creds set"),
        "{e}"
    );
    dst_refused(
        &mut d,
        "the source started a TLS handshake, but this destination has no tls-creds set",
    );
    // Plain on both sides still works.
    s.ok("migrate-set-parameters", json!({"tls-creds": ""}));
    migrate_ok(&mut s, &mut d, &port);
}

#[test]
fn a_flipped_ciphertext_byte_fails_the_migration_cleanly() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let (mut d, port) = tls_destination(dir.path(), &pki, "dst");
    let mut s = source(
        dir.path(),
        "src",
        Some(&pki.client("src", Leaf::new("ferry-src"), &pki.ca)),
    );
    // Flip one bit 32 KiB into the first page channel: past its handshake, inside the
    // encrypted RAM records (this guest's pages are about 180 KiB, spread over 2 channels).
    const AT: usize = 32 << 10;
    let flip = |mut a: TcpStream, mut b: TcpStream| {
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = 0usize;
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&AT) {
                buf[AT - seen] ^= 0x01;
            }
            seen += n;
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Write);
    };
    let back = |mut b: TcpStream, mut a: TcpStream| {
        let _ = std::io::copy(&mut b, &mut a);
        let _ = a.shutdown(std::net::Shutdown::Write);
    };
    let (addr, h) = relay::relay_on(format!("127.0.0.1:{port}"), 1, flip, back);
    let relay_port = addr.rsplit_once(':').unwrap().1.to_owned();
    s.ok(
        "migrate-set-parameters",
        json!({"tls-hostname": "127.0.0.1"}),
    );
    let e = refused(&mut s, &relay_port);
    // The channel that broke is named; the whole migration fails as one.
    assert!(e.contains("Page channel 1 failed"), "{e}");
    h.join().unwrap();
    dst_refused(&mut d, "failed authentication");
    migrate_ok(&mut s, &mut d, &port);
}

#[test]
fn twenty_unauthenticated_connections_during_a_migration_are_all_refused() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let (mut d, port) = tls_destination(dir.path(), &pki, "dst");
    let mut s = source(
        dir.path(),
        "src",
        Some(&pki.client("src", Leaf::new("ferry-src"), &pki.ca)),
    );
    s.ok("migrate-set-parameters", hold());
    s.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    s.wait_migration(&["active"]);
    d.wait_migration(&["active"]);

    let rogue_dir = pki.client("rogue", Leaf::new("ferry-src"), &pki.rogue);
    let rogue = ferry_tls::X509Creds::load(
        "rogue",
        Path::new(&rogue_dir),
        ferry_tls::Endpoint::Client,
        true,
    )
    .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let connect = || {
        let c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c
    };
    // What each attempt hears before the destination closes it: never a HelloAck.
    let mut silent = Vec::new();
    for i in 0..20 {
        match i % 4 {
            0 => {
                // Connects and says nothing: it must not hold up the migration.
                silent.push(connect());
            }
            1 => {
                // A plain Ferry source: refused in its own protocol.
                let mut c = connect();
                c.write_all(b"FERRYMIG\x01\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00")
                    .unwrap();
                let m = migration::protocol::Msg::read(&mut c).expect("a refusal");
                assert_eq!(m.kind, migration::protocol::Kind::Refuse, "{m:?}");
                assert!(m.text.contains("requires TLS"), "{}", m.text);
            }
            2 => {
                // Garbage: closed.
                let mut c = connect();
                c.write_all(&[0xde; 64]).unwrap();
                let mut b = [0u8; 1];
                assert!(!matches!(c.read(&mut b), Ok(n) if n > 0 && b[0] == 0x01));
            }
            _ => {
                // A TLS client whose certificate no one here trusts.
                let c = connect();
                match ferry_tls::connect(c, &rogue, "127.0.0.1") {
                    Err(_) => {}
                    Ok(mut t) => {
                        let _ = migration::protocol::Hello {
                            protocol: 1,
                            features: 0,
                            channels: 0,
                        }
                        .write(&mut t);
                        assert!(
                            migration::protocol::Msg::read(&mut t).is_err(),
                            "a rogue client got an answer"
                        );
                    }
                }
            }
        }
    }
    // The legitimate migration was not disturbed; let it finish.
    assert_eq!(s.ok("query-migrate", json!({}))["status"], "active");
    s.ok("migrate-set-parameters", release());
    let info = s.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}\n{}", read(&d.log));
    d.wait_migration(&["completed"]);
    assert_eq!(d.status(), "running");
    d.verify();
    let log = read(&d.log);
    assert!(
        log.matches("refused a migration connection").count() >= 15,
        "{log}"
    );
    drop(silent);
}
