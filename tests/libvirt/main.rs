//! libvirt drives Ferry (issue 17): the capability probe (a replay of the QMP exchanges
//! libvirt 9.0 had with `ferry qemu-compat`, recorded in `probe.json` by `record-probe.sh`
//! and checked in seconds without libvirt; `virsh domcapabilities`; the schema checked
//! against the handlers; `getfd` and `fd:` migrations over a raw socket) and a domain (`domain`: define, start, suspend, resume, dominfo,
//! re-attach, setvcpus --live, save/restore, destroy, a refused device) on a private
//! embedded libvirt; `virsh migrate --live` between two private libvirt daemons. Needs KVM; all but the replay and the schema need libvirt and root (they
//! fail, never skip, without them).

mod domain;
mod domcapabilities;
mod fd_passing;
mod migrate;
mod probe_replay;
mod schema;
mod support;
