//! Guest RAM during an incoming post-copy ([`migration::postcopy::PostcopyRam`]): stale pages
//! dropped with `MADV_DONTNEED`, then every region registered with userfaultfd so a missing
//! page blocks whoever touches it (a vCPU in `KVM_RUN` included) until it is placed.

use super::memory::GuestMem;
use super::ram_view::RamView;
use super::uffd::{Placed, Uffd};
use crate::guest::PAGE_SIZE;
use migration::postcopy::PostcopyRam;
use std::time::Duration;

/// Guest RAM registered with a userfaultfd.
#[derive(Debug)]
pub struct UffdRam {
    uffd: Uffd,
    /// `(gpa, host address, length)` of every region.
    regions: Vec<(u64, u64, u64)>,
    /// Keeps the regions mapped while the registration lives.
    _mems: Vec<GuestMem>,
}

impl UffdRam {
    /// Guest RAM of `view`, not registered yet.
    pub fn new(view: &RamView) -> std::io::Result<UffdRam> {
        let (regions, mems) = view.regions();
        Ok(UffdRam {
            uffd: Uffd::new()?,
            regions,
            _mems: mems,
        })
    }

    fn host(&self, gpa: u64) -> Result<u64, String> {
        self.regions
            .iter()
            .find(|(g, _, len)| gpa >= *g && gpa + PAGE_SIZE <= g + len)
            .map(|(g, h, _)| h + (gpa - g))
            .ok_or_else(|| format!("page {gpa:#x} is not guest RAM"))
    }
}

impl PostcopyRam for UffdRam {
    fn discard(&self, gpa: u64, pages: u64) -> Result<(), String> {
        let (mut at, end) = (gpa, gpa + pages * PAGE_SIZE);
        while at < end {
            // The part of the run inside the region holding `at`.
            let (g, h, len) = self
                .regions
                .iter()
                .find(|(g, _, len)| at >= *g && at < g + len)
                .ok_or_else(|| format!("page {at:#x} is not guest RAM"))?;
            let stop = end.min(g + len);
            // SAFETY: `[at, stop)` lies inside one private anonymous guest mapping this object
            // keeps mapped; dropping its pages only makes them read as missing (then as
            // placed).
            let r = unsafe {
                libc::madvise(
                    (h + (at - g)) as *mut libc::c_void,
                    (stop - at) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(format!(
                    "Cannot drop stale pages at {at:#x}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            at = stop;
        }
        Ok(())
    }

    fn start(&self) -> Result<(), String> {
        for (gpa, host, len) in &self.regions {
            self.uffd
                .register(*host, *len)
                .map_err(|e| format!("Cannot register RAM at {gpa:#x} with userfaultfd: {e}"))?;
        }
        Ok(())
    }

    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, String> {
        let Some(addr) = self
            .uffd
            .next_fault(timeout)
            .map_err(|e| format!("Cannot read userfaultfd: {e}"))?
        else {
            return Ok(None);
        };
        let page = addr & !(PAGE_SIZE - 1);
        Ok(self
            .regions
            .iter()
            .find(|(_, h, len)| page >= *h && page < h + len)
            .map(|(g, h, _)| g + (page - h)))
    }

    fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<bool, String> {
        let host = self.host(gpa)?;
        let placed = match data {
            Some(d) => self.uffd.copy(host, d),
            None => self.uffd.zero(host, PAGE_SIZE),
        }
        .map_err(|e| format!("Cannot place page {gpa:#x}: {e}"))?;
        Ok(placed == Placed::Done)
    }

    fn finish(&self) -> Result<(), String> {
        for (gpa, host, len) in &self.regions {
            self.uffd
                .unregister(*host, *len)
                .map_err(|e| format!("Cannot unregister RAM at {gpa:#x}: {e}"))?;
        }
        Ok(())
    }
}
