//! The incoming side of a migration under arbitrary input: after a valid header and
//! configuration record, the fuzz bytes drive a generator of records (RAM with interesting or
//! random addresses and counts, sections with valid or arbitrary framing, end markers, CRCs
//! correct unless the input breaks them) that `migration::receive` reads into a strict
//! in-memory destination (`migration/tests/strict_vm`). The first byte picks the channel: a
//! stream file, or a real loopback TCP connection with hello and COMMIT; with its top bit
//! set, the remaining bytes follow the prefix raw instead. Any panic, including a broken
//! invariant of the strict VM (a write outside its layout reaching memory, a commit after
//! a failure, ...), is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/strict_vm/mod.rs"]
mod strict_vm;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 0x80 != 0 {
        let mut v = strict_vm::valid_prefix();
        v.extend_from_slice(rest);
        v
    } else {
        strict_vm::hostile_stream(rest)
    };
    // TCP costs a thread and a connection per case: one case in eight.
    if mode & 0x07 == 0 {
        let _ = strict_vm::receive_tcp(&bytes);
    } else {
        let _ = strict_vm::receive_file(&bytes);
    }
});
