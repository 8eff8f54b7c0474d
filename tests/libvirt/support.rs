//! A daemonized `ferry qemu-compat` process: started with libvirt's argv, found through its
//! pid file, waited for through a pidfd (bounded), killed if a test fails.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
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
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(
            fd >= 0,
            "the daemon (pid {pid}) is not running: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Daemon { pid, pidfd }
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
    fn wait_exit(&self, timeout: Duration) -> bool {
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
