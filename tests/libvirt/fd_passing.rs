//! libvirt's descriptor path without libvirt: `getfd` with the descriptor sent as
//! SCM_RIGHTS on the QMP socket, `migrate fd:NAME` writing behind a header already in the
//! file (as `virsh save` does), `migrate-incoming fd:NAME` loading from that offset into a
//! second `ferry run`, and every refusal on the way.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use ferry_tests::{Ferry, TIMEOUT, tempdir};
use serde_json::{Value, json};

/// A QMP connection that can pass a descriptor with a command.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(ferry: &Ferry) -> Raw {
        let stream = UnixStream::connect(&ferry.socket).expect("connect to the QMP socket");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone the socket"));
        let mut raw = Raw { stream, reader };
        let greeting = raw.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        assert_eq!(
            raw.send(json!({"execute": "qmp_capabilities"}), None),
            json!({"return": {}})
        );
        raw
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("a QMP line");
        serde_json::from_str(&l).unwrap_or_else(|_| panic!("not JSON: {l:?}"))
    }

    /// Sends `msg` (with `fd` as SCM_RIGHTS) and returns the reply, skipping events.
    fn send(&mut self, msg: Value, fd: Option<BorrowedFd<'_>>) -> Value {
        let bytes = format!("{msg}\r\n").into_bytes();
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if let Some(fd) = fd {
            hdr.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            hdr.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
            // SAFETY: `control` holds CMSG_SPACE(4) bytes, aligned for cmsghdr; the header
            // and one descriptor are written inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd.as_raw_fd());
            }
        }
        // SAFETY: `hdr` points at `iov` (over `bytes`) and `control`, live for the call.
        let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &hdr, 0) };
        assert_eq!(
            n,
            bytes.len() as isize,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Sends `execute` with `arguments` and returns the error's description.
    fn error(&mut self, execute: &str, arguments: Value, fd: Option<BorrowedFd<'_>>) -> String {
        let v = self.send(json!({"execute": execute, "arguments": arguments}), fd);
        v["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{execute} {arguments} did not fail: {v}"))
            .to_owned()
    }

    fn ok(&mut self, execute: &str, arguments: Value, fd: Option<BorrowedFd<'_>>) {
        let v = self.send(json!({"execute": execute, "arguments": arguments}), fd);
        assert_eq!(v, json!({"return": {}}), "{execute} {arguments}");
    }
}

/// What libvirt writes ahead of the stream.
const HEADER: &[u8] = b"LibvirtQemudSave: a header the stream must be written behind\n";

#[test]
fn getfd_and_migrate_fd_save_and_restore_behind_a_header() {
    let dir = tempdir();
    let shape = ["--machine", "ferry-2.1", "--memory", "64M"];
    let mut args = shape.to_vec();
    args.extend(["--guest", "dirty:8"]);
    let mut src = Ferry::spawn(dir.path(), "src", &args);
    let at = src.wait_pass(2);
    let mut raw = Raw::connect(&src);

    let image = dir.path().join("save.img");
    let mut file = std::fs::File::create(&image).expect("create the image");
    file.write_all(HEADER).expect("write the header");
    let fd = Some(file.as_fd());

    assert_eq!(
        raw.error("getfd", json!({"fdname": "migrate"}), None),
        "No file descriptor supplied via SCM_RIGHTS"
    );
    assert_eq!(
        raw.error("getfd", json!({"fdname": "3rd"}), fd),
        "Parameter 'fdname' expects a name not starting with a digit"
    );
    assert_eq!(
        raw.error("closefd", json!({"fdname": "migrate"}), None),
        "File descriptor named 'migrate' not found"
    );
    assert_eq!(
        raw.error("migrate", json!({"uri": "fd:migrate"}), None),
        "File descriptor named 'migrate' has not been found"
    );
    // Kept, closed, kept again: closefd forgets it.
    raw.ok("getfd", json!({"fdname": "migrate"}), fd);
    raw.ok("closefd", json!({"fdname": "migrate"}), None);
    raw.ok("getfd", json!({"fdname": "migrate"}), fd);
    drop(file);

    raw.ok("stop", json!({}), None);
    raw.ok(
        "migrate",
        json!({"uri": "fd:migrate", "detach": true}),
        None,
    );
    let info = src.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    // The migration used the descriptor up.
    assert_eq!(
        raw.error("closefd", json!({"fdname": "migrate"}), None),
        "File descriptor named 'migrate' not found"
    );
    let mut bytes = Vec::new();
    std::fs::File::open(&image)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .expect("read the image");
    assert_eq!(&bytes[..HEADER.len()], HEADER, "the header was overwritten");
    assert!(
        bytes.len() > HEADER.len() + (8 << 20),
        "an 8 MiB working set saved in {} bytes",
        bytes.len()
    );

    // The image from just behind the header, as libvirt's restore passes it.
    let mut dargs = shape.to_vec();
    dargs.extend(["--incoming", "defer", "-S"]);
    let mut dst = Ferry::spawn(dir.path(), "dst", &dargs);
    let mut draw = Raw::connect(&dst);
    let mut input = std::fs::File::open(&image).expect("open the image");
    input
        .seek(SeekFrom::Start(HEADER.len() as u64))
        .expect("seek past the header");
    draw.ok("getfd", json!({"fdname": "incoming"}), Some(input.as_fd()));
    drop(input);
    draw.ok("migrate-incoming", json!({"uri": "fd:incoming"}), None);
    let info = dst.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        dst.pass() >= at,
        "the restored guest is behind the saved one"
    );
    dst.verify();
}

#[test]
fn a_passed_socket_gets_no_stream_it_cannot_carry() {
    let dir = tempdir();
    let mut src = Ferry::spawn(
        dir.path(),
        "src",
        &[
            "--machine",
            "ferry-2.1",
            "--memory",
            "64M",
            "--guest",
            "dirty:4",
        ],
    );
    src.wait_pass(1);
    let mut raw = Raw::connect(&src);
    // TLS asked for: a socket would carry the stream in the clear, so it is refused.
    let ca = ferry_tls::testing::TestCa::new("Ferry test CA");
    let pki = dir.path().join("pki");
    ca.write(
        &pki,
        &ferry_tls::testing::Leaf::new("src.example.com"),
        false,
    );
    raw.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": pki, "endpoint": "client"}),
        None,
    );
    raw.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}), None);
    let (ours, theirs) = UnixStream::pair().expect("a socket pair");
    raw.ok("getfd", json!({"fdname": "sock"}), Some(theirs.as_fd()));
    assert_eq!(
        raw.error("migrate", json!({"uri": "fd:sock"}), None),
        "tls-creds is set, but Ferry runs no TLS over a passed socket (fd:sock)"
    );
    // Without TLS: a socket that is not TCP has no return path for the protocol.
    raw.ok("migrate-set-parameters", json!({"tls-creds": ""}), None);
    raw.ok("getfd", json!({"fdname": "sock"}), Some(theirs.as_fd()));
    raw.ok("migrate", json!({"uri": "fd:sock"}), None);
    let info = src.wait_migration(&["completed", "failed"]);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("not a connected TCP socket"), "{info}");
    drop(ours);
    // The source runs on.
    assert_eq!(src.status(), "running");
    let p = src.pass();
    src.wait_pass(p + 1);
}
