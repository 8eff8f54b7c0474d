//! A daemonized `ferry qemu-compat` process: started with libvirt's argv, found through its
//! pid file, waited for through a pidfd (bounded), killed if a test fails; and a private
//! embedded libvirt driving Ferry with virsh.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::TIMEOUT;
use ferry_tests::python::wait_output;

/// libvirt's probe argv (from the fixture) with its `-qmp` and `-pidfile` paths moved
/// into `dir`.
pub fn probe_argv(recorded: &[String], dir: &Path) -> (Vec<String>, PathBuf, PathBuf) {
    let socket = dir.join("qmp.monitor");
    let pidfile = dir.join("qmp.pid");
    let mut argv = recorded.to_vec();
    for i in 1..argv.len() {
        match argv[i - 1].as_str() {
            "-qmp" => argv[i] = format!("unix:{},server=on,wait=off", socket.display()),
            "-pidfile" => argv[i] = pidfile.display().to_string(),
            _ => {}
        }
    }
    (argv, socket, pidfile)
}

/// A daemonized probe process.
#[derive(Debug)]
pub struct Daemon {
    pub pid: i32,
    pidfd: OwnedFd,
}

impl Daemon {
    /// Runs `ferry qemu-compat ARGV` (which must daemonize) and waits, bounded, for the
    /// parent to exit 0: by then the QMP socket listens and the pid file is written.
    pub fn start(argv: &[String], pidfile: &Path) -> Daemon {
        let child = Command::new(ferry_tests::bins::ferry())
            .arg("qemu-compat")
            .args(argv)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ferry qemu-compat");
        let out = wait_output(
            child,
            TIMEOUT,
            "ferry qemu-compat (the parent of -daemonize)",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "ferry qemu-compat {argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(pidfile)
            .unwrap_or_else(|e| panic!("no pid file {} after -daemonize: {e}", pidfile.display()));
        let pid: i32 = text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("pid file holds '{text}'"));
        Daemon::attach(pid).unwrap_or_else(|| {
            panic!(
                "the daemon (pid {pid}) is not running: {}",
                std::io::Error::last_os_error()
            )
        })
    }

    /// The running process `pid` (`None` if there is none).
    pub fn attach(pid: i32) -> Option<Daemon> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Some(Daemon { pid, pidfd })
    }

    /// Sends SIGTERM (what libvirt sends) and waits, at most `TIMEOUT`, for the exit.
    pub fn terminate(&self) {
        assert_eq!(self.signal(libc::SIGTERM), 0, "SIGTERM to the daemon");
        assert!(
            self.wait_exit(TIMEOUT),
            "the daemon (pid {}) did not exit within {TIMEOUT:?} of SIGTERM",
            self.pid
        );
    }

    /// Sends `sig` through the pidfd (never to a recycled pid).
    fn signal(&self, sig: i32) -> i64 {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        }
    }

    /// Whether the process exited within `timeout` (its pidfd becomes readable).
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, ms) == 1 }
    }
}

impl Drop for Daemon {
    /// A failing test leaves no process behind.
    fn drop(&mut self) {
        if !self.wait_exit(Duration::ZERO) {
            self.signal(libc::SIGKILL);
        }
    }
}

/// libvirt's CPU map, where libvirt reads it.
const CPU_MAP: &str = "/usr/share/libvirt/cpu_map";

const INSTALL: &str = "install libvirt 9 (Debian: apt-get install libvirt-clients libvirt-daemon \
                       libvirt-daemon-driver-qemu; .ci/run does when they are missing)";

/// Fails, saying what to install, unless virsh and libvirt's QEMU driver are here.
pub fn require_libvirt() {
    let version = Command::new("virsh").arg("--version").output();
    let ok = version.as_ref().is_ok_and(|o| o.status.success());
    assert!(ok, "libvirt is missing (virsh: {version:?}): {INSTALL}");
    assert!(
        Path::new(CPU_MAP).join("index.xml").exists(),
        "libvirt's CPU map {CPU_MAP} is missing: {INSTALL}"
    );
}

/// [`require_libvirt`], and libvirtd.
pub fn require_libvirtd() {
    require_libvirt();
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .any(|d| d.join("libvirtd").exists());
    assert!(found, "libvirtd is missing: {INSTALL}");
}

/// A private libvirt: the embedded QEMU driver (`qemu:///embed?root=DIR/root`, its own config,
/// cache, state and run directories, no daemon), a shim starting `ferry qemu-compat`, and
/// libvirt's CPU map with Ferry's models (`ferry libvirt-cpu-map`) bind-mounted in a private
/// mount namespace for every `virsh`. Every virsh is a new driver that re-attaches to the
/// domains already running, as a restarted libvirtd does.
#[derive(Debug)]
pub struct Libvirt {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub shim: PathBuf,
    map: PathBuf,
    /// Domains defined here: their processes are killed if a test fails.
    names: std::cell::RefCell<Vec<String>>,
}

/// What `try_virsh` has virsh print once every running domain is re-attached.
const ATTACHED: &str = "@@re-attached@@";

/// What a virsh run printed.
#[derive(Debug)]
pub struct VirshOutput {
    pub ok: bool,
    /// How virsh ended.
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Libvirt {
    pub fn new(dir: &Path) -> Libvirt {
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir root/etc");
        // The domains run as root (/dev/kvm is root's on CI machines); their output goes to
        // files (no virtlogd).
        std::fs::write(
            root.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\nstdio_handler = \"file\"\n",
        )
        .expect("write qemu.conf");
        let ferry = ferry_tests::bins::ferry();
        let shim = dir.join("ferry-qemu");
        std::fs::write(
            &shim,
            format!("#!/bin/sh\nexec '{}' qemu-compat \"$@\"\n", ferry.display()),
        )
        .expect("write the shim");
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let map = dir.join("cpu_map");
        let out = Command::new(&ferry)
            .args(["libvirt-cpu-map", "--to"])
            .arg(&map)
            .output()
            .expect("run ferry libvirt-cpu-map");
        assert!(
            out.status.success(),
            "ferry libvirt-cpu-map failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Libvirt {
            dir: dir.to_path_buf(),
            root,
            shim,
            map,
            names: Default::default(),
        }
    }

    /// Runs `virsh -c URI COMMANDS` (`;`-separated) in the private mount namespace, bounded
    /// by `TIMEOUT`.
    ///
    /// A new embedded driver re-attaches to every running domain on a thread of its own, and
    /// libvirt 9.0 lets virsh exit (and run its libraries' destructors) while that thread
    /// still works: virsh then crashes in libnuma (seen with `define` and `domstate`, about
    /// one run in twenty), and a `destroy` may kill the process under the re-attach and
    /// report "domain is not running". So `COMMANDS` run after one command per running
    /// domain that takes a job, which waits for its re-attach; their output is dropped.
    pub fn try_virsh(&self, commands: &str) -> VirshOutput {
        let mut all = String::new();
        for name in self.names.borrow().iter() {
            if self
                .pid(name)
                .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
            {
                all.push_str(&format!(
                    "qemu-monitor-command {name} '{{\"execute\":\"query-status\"}}'; "
                ));
            }
        }
        all.push_str(&format!("echo {ATTACHED}; {commands}"));
        let script = format!(
            "set -e; mount --make-rprivate /; mount --bind \"$1\" {CPU_MAP}; \
             exec virsh -q -c \"qemu:///embed?root=$2\" \"$3\""
        );
        let child = Command::new("unshare")
            .args(["--mount", "sh", "-c", &script, "sh"])
            .arg(&self.map)
            .arg(&self.root)
            .arg(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run unshare (util-linux)");
        let out = wait_output(child, TIMEOUT, &format!("virsh '{commands}'"))
            .unwrap_or_else(|e| panic!("{e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stdout = match stdout.split_once(ATTACHED) {
            Some((_, after)) => after.trim_start_matches('\n').to_owned(),
            None => stdout.into_owned(),
        };
        VirshOutput {
            ok: out.status.success(),
            status: out.status,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`try_virsh`](Self::try_virsh), which must succeed; returns stdout.
    pub fn virsh(&self, commands: &str) -> String {
        let out = self.try_virsh(commands);
        assert!(
            out.ok,
            "virsh '{commands}' failed ({}; this test needs root for its mount namespace; \
             libvirt's privileged driver also needs the system user libvirt-qemu, which \
             .ci/run creates): {}\nlogs:\n{}",
            out.status,
            out.stderr,
            self.logs()
        );
        out.stdout
    }

    /// Defines domain `name` from README's domain XML (`tests/libvirt/domain.xml`), with
    /// `devices` added to its `<devices>`.
    pub fn define(&self, name: &str, devices: &str) {
        self.define_with(name, |xml| {
            xml.replace("  </devices>", &format!("{devices}  </devices>"))
        });
    }

    /// Defines domain `name` from README's domain XML, changed by `edit`.
    pub fn define_with(&self, name: &str, edit: impl FnOnce(String) -> String) {
        let template = ferry_tests::tests_dir().join("libvirt/domain.xml");
        let xml = std::fs::read_to_string(&template)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", template.display()))
            .replace("ferry1", name)
            .replace(
                "/usr/local/bin/ferry-qemu",
                &self.shim.display().to_string(),
            );
        let xml = edit(xml);
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write the domain XML");
        self.names.borrow_mut().push(name.to_owned());
        self.virsh(&format!("define '{}'", file.display()));
    }

    /// The pid of domain `name`'s process, from libvirt's pid file.
    pub fn pid(&self, name: &str) -> Option<i32> {
        let p = self.root.join(format!("run/qemu/{name}.pid"));
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// `virsh domstate NAME`.
    pub fn state(&self, name: &str) -> String {
        self.virsh(&format!("domstate {name}")).trim().to_owned()
    }

    /// A QMP client on domain `name`'s monitor (libvirt's socket, which Ferry serves to
    /// every client).
    pub fn qmp(&self, name: &str) -> ferry_tests::QmpClient {
        domain_qmp(&self.root.join("lib/qemu"), name)
    }

    /// Every domain's log (libvirt writes the argv, Ferry its stderr).
    pub fn logs(&self) -> String {
        domain_logs(&self.root.join("log/qemu"), &self.names.borrow())
    }
}

impl Drop for Libvirt {
    /// A failing test leaves no domain running.
    fn drop(&mut self) {
        for name in self.names.borrow().iter() {
            if let Some(pid) = self.pid(name)
                && let Some(d) = Daemon::attach(pid)
            {
                drop(d);
            }
        }
    }
}

/// A private libvirtd: its own `/etc/libvirt`, `/var` and `/run` (bind mounts in a mount
/// namespace of its own, all under `DIR`, so a restarted daemon finds its domains), its own
/// host UUID, its socket in `DIR/sock` and the QEMU driver running Ferry through `shim`. Two
/// of them are two hosts to `virsh migrate`.
#[derive(Debug)]
pub struct LibvirtDaemon {
    pub dir: PathBuf,
    pub uri: String,
    daemon: std::process::Child,
    names: std::cell::RefCell<Vec<String>>,
    shim: PathBuf,
    cpu_map: PathBuf,
}

impl LibvirtDaemon {
    /// Starts libvirtd under `dir` (host UUID `uuid`) and waits for its socket.
    pub fn start(dir: &Path, uuid: &str, shim: &Path, cpu_map: &Path) -> LibvirtDaemon {
        for d in [
            "etc",
            "sock",
            "run",
            "var/lib/libvirt",
            "var/cache/libvirt",
            "var/log/libvirt",
        ] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir the daemon's directories");
        }
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\nstdio_handler = \"file\"\n",
        )
        .expect("write qemu.conf");
        let sock = dir.join("sock");
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 host_uuid = \"{uuid}\"\nlog_outputs = \"3:file:{}\"\n",
                sock.display(),
                dir.join("libvirtd.log").display()
            ),
        )
        .expect("write libvirtd.conf");
        LibvirtDaemon {
            dir: dir.to_path_buf(),
            uri: format!(
                "qemu+unix:///system?socket={}",
                sock.join("libvirt-sock").display()
            ),
            daemon: Self::spawn(dir, cpu_map),
            names: Default::default(),
            shim: shim.to_path_buf(),
            cpu_map: cpu_map.to_path_buf(),
        }
    }

    /// Stops the daemon (SIGTERM, as a service restart does) and starts it again on the same
    /// directories; the domains it ran keep running meanwhile.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.daemon = Self::spawn(&self.dir, &self.cpu_map);
    }

    /// Runs libvirtd in a mount namespace of its own and waits for its (new) socket.
    fn spawn(dir: &Path, cpu_map: &Path) -> std::process::Child {
        let socket = dir.join("sock/libvirt-sock");
        let _ = std::fs::remove_file(&socket);
        let script = format!(
            "set -e; mount --make-rprivate /; mount --bind \"$1\" {CPU_MAP}; \
             mount --bind \"$2/etc\" /etc/libvirt; mount --bind \"$2/var\" /var; \
             mount --bind \"$2/run\" /run; mkdir -p /run/libvirt; \
             exec libvirtd --config \"$2/etc/libvirtd.conf\""
        );
        let daemon = Command::new("unshare")
            .args(["--mount", "sh", "-c", &script, "sh"])
            .arg(cpu_map)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).expect("create stderr"))
            .spawn()
            .expect("run unshare (util-linux)");
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "libvirtd under {} did not create {} within {TIMEOUT:?}: {}",
                dir.display(),
                socket.display(),
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// `virsh -c URI COMMANDS`, bounded by `TIMEOUT`.
    pub fn try_virsh(&self, commands: &str) -> VirshOutput {
        let child = Command::new("virsh")
            .args(["-q", "-c", &self.uri, commands])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run virsh");
        let out = wait_output(child, TIMEOUT, &format!("virsh '{commands}'"))
            .unwrap_or_else(|e| panic!("{e}"));
        VirshOutput {
            ok: out.status.success(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`try_virsh`](Self::try_virsh), which must succeed; returns stdout.
    pub fn virsh(&self, commands: &str) -> String {
        let out = self.try_virsh(commands);
        assert!(
            out.ok,
            "virsh -c {} '{commands}' failed ({}): {}\nlogs:\n{}",
            self.uri,
            out.status,
            out.stderr,
            self.logs()
        );
        out.stdout
    }

    /// Defines domain `name` from README's domain XML.
    pub fn define(&self, name: &str) {
        let template = ferry_tests::tests_dir().join("libvirt/domain.xml");
        let xml = std::fs::read_to_string(&template)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", template.display()))
            .replace("ferry1", name)
            .replace(
                "/usr/local/bin/ferry-qemu",
                &self.shim.display().to_string(),
            );
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write the domain XML");
        self.names.borrow_mut().push(name.to_owned());
        self.virsh(&format!("define '{}'", file.display()));
    }

    /// Domain `name` runs here now (after a migration in).
    pub fn adopt(&self, name: &str) {
        self.names.borrow_mut().push(name.to_owned());
    }

    /// The pid of domain `name`'s process, from libvirt's pid file (in the daemon's `/run`).
    pub fn pid(&self, name: &str) -> Option<i32> {
        let p = self.dir.join(format!("run/libvirt/qemu/{name}.pid"));
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// A QMP client on domain `name`'s monitor.
    pub fn qmp(&self, name: &str) -> ferry_tests::QmpClient {
        domain_qmp(&self.dir.join("var/lib/libvirt/qemu"), name)
    }

    /// Every domain's log here.
    pub fn logs(&self) -> String {
        domain_logs(&self.dir.join("var/log/libvirt/qemu"), &self.names.borrow())
    }
}

/// A QMP client on the monitor socket of domain `name`, in its directory under `base`
/// (libvirt's `domain-N-NAME`).
fn domain_qmp(base: &Path, name: &str) -> ferry_tests::QmpClient {
    let dir = std::fs::read_dir(base)
        .expect("libvirt's domain directories")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("domain-") && f.ends_with(&format!("-{name}")))
        })
        .unwrap_or_else(|| panic!("no domain directory of {name} under {}", base.display()));
    ferry_tests::QmpClient::connect(&dir.join("monitor.sock"), TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot connect to {name}'s monitor: {e}"))
}

/// The logs `NAME.log` in `dir` of domains `names`, each under its path.
fn domain_logs(dir: &Path, names: &[String]) -> String {
    let mut out = String::new();
    for name in names {
        let p = dir.join(format!("{name}.log"));
        out.push_str(&format!(
            "--- {}\n{}\n",
            p.display(),
            std::fs::read_to_string(&p).unwrap_or_default()
        ));
    }
    out
}

impl Drop for LibvirtDaemon {
    /// Destroys what runs here, then stops the daemon (SIGTERM, bounded, then SIGKILL).
    fn drop(&mut self) {
        for name in self.names.borrow().iter() {
            let _ = self.try_virsh(&format!("destroy {name}"));
        }
        self.stop_daemon();
    }
}

impl LibvirtDaemon {
    /// SIGTERM, bounded, then SIGKILL.
    fn stop_daemon(&mut self) {
        // SAFETY: kill takes a pid and a signal; the child is ours and not yet reaped.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The test guest's pass counter.
pub fn pass(qmp: &mut ferry_tests::QmpClient) -> u64 {
    let g = qmp
        .execute("__org.ferry_query-guest", serde_json::json!({}))
        .expect("__org.ferry_query-guest");
    g["pass"].as_u64().expect("a pass counter")
}

/// Polls `probe` (every 20 ms) until it returns `Some`, at most `TIMEOUT`; fails with `what`.
pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} (waited {TIMEOUT:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The connector of the hot-plugged core `vcpu1`, if any.
pub fn vcpu1(qmp: &mut ferry_tests::QmpClient) -> Option<serde_json::Value> {
    let list = qmp
        .execute("__org.ferry_query-connectors", serde_json::json!({}))
        .expect("__org.ferry_query-connectors");
    list.as_array()?
        .iter()
        .find(|c| c["kind"] == "cpu-core" && c["device"] == "vcpu1")
        .cloned()
}
