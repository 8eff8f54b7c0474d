//! userfaultfd in MISSING mode, for post-copy: a registered page that is not present blocks
//! whoever touches it (a vCPU inside `KVM_RUN` included) until [`Uffd::copy`] or
//! [`Uffd::zero`] places it. The `userfaultfd` crate needs bindgen and libclang at build
//! time, so the few kernel structures (`linux/userfaultfd.h`) are declared here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` for a page fault: event, reserved, flags, address, thread id.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const fn iowr(nr: u64, size: usize) -> u64 {
    // _IOC(_IOC_READ | _IOC_WRITE, 0xAA, nr, size)
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, size_of::<UffdioZeropage>());

/// What placing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page is in place now and its waiters are woken.
    Done,
    /// The page was present already: nothing was written.
    AlreadyPresent,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: File,
}

impl Uffd {
    /// Opens a non-blocking userfaultfd and negotiates the API.
    pub fn new() -> io::Result<Uffd> {
        // SAFETY: the userfaultfd syscall takes one flags argument and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd as i32) };
        let uffd = Uffd { fd: file };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    /// One ioctl on the fd with `arg` as its in/out structure.
    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the structure the kernel defines for `req` (sizes are
        // encoded in `req` from the same types), which lives across the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `[host, host + len)` (an anonymous private mapping) in MISSING mode.
    pub fn register(&self, host: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: host, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
    }

    /// Unregisters `[host, host + len)`; faults there are ordinary faults again.
    pub fn unregister(&self, host: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start: host, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
    }

    /// Copies `src` into the missing pages at `host` atomically and wakes their waiters.
    pub fn copy(&self, host: u64, src: &[u8]) -> io::Result<Placed> {
        let mut c = UffdioCopy {
            dst: host,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        match self.ioctl(UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(Placed::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Placed::AlreadyPresent),
            Err(e) => Err(e),
        }
    }

    /// Maps zero pages at `host` and wakes their waiters.
    pub fn zero(&self, host: u64, len: u64) -> io::Result<Placed> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: host, len },
            mode: 0,
            zeropage: 0,
        };
        match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
            Ok(()) => Ok(Placed::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Placed::AlreadyPresent),
            Err(e) => Err(e),
        }
    }

    /// The host address of the next page fault, waiting at most `timeout` (None: none came).
    pub fn next_fault(&self, timeout: Duration) -> io::Result<Option<u64>> {
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, a plain struct of
            // integers laid out as the kernel's `struct uffd_msg`.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    size_of::<UffdMsg>(),
                )
            };
            if n == size_of::<UffdMsg>() as isize {
                if msg.event == UFFD_EVENT_PAGEFAULT {
                    return Ok(Some(msg.address));
                }
                continue;
            }
            let e = io::Error::last_os_error();
            if n >= 0 || e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(if n >= 0 {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "short userfaultfd message")
                } else {
                    e
                });
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_match_the_kernel_abi() {
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
    }

    #[test]
    fn a_missing_page_blocks_its_reader_until_it_is_placed() {
        let uffd = Uffd::new().expect("userfaultfd (root or vm.unprivileged_userfaultfd)");
        let len = 4 * 4096;
        // SAFETY: a fresh anonymous private mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        uffd.register(base, len as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping stays until the reader is joined.
            unsafe { std::ptr::read_volatile((base + 4096 + 8) as *const u64) }
        });
        let at = uffd
            .next_fault(Duration::from_secs(10))
            .unwrap()
            .expect("the reader's fault");
        assert_eq!(at & !4095, base + 4096);
        let mut page = vec![0u8; 4096];
        page[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(uffd.copy(base + 4096, &page).unwrap(), Placed::Done);
        assert_eq!(reader.join().unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(
            uffd.copy(base + 4096, &page).unwrap(),
            Placed::AlreadyPresent
        );
        assert_eq!(uffd.zero(base, 4096).unwrap(), Placed::Done);
        assert_eq!(uffd.next_fault(Duration::from_millis(1)).unwrap(), None);
        uffd.unregister(base, len as u64).unwrap();
        // SAFETY: the mapping made above; no thread uses it any more.
        unsafe { libc::munmap(p, len) };
    }
}
