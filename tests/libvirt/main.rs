//! libvirt drives Ferry, stage 1 (issue 17): the capability probe. A replay of the QMP
//! exchanges libvirt 9.0 had with `ferry qemu-compat` (recorded in `probe.json` by
//! `record-probe.sh`, checked in seconds without libvirt), `virsh domcapabilities`
//! against a private embedded libvirt, and the schema checked against the handlers. Needs KVM; the second needs libvirt and root (it
//! fails, never skips, without them).

mod domcapabilities;
mod probe_replay;
mod schema;
mod support;
