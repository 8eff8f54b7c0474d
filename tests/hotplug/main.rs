//! Hot-plug over QMP on real `ferry` processes: every connector kind plugged and unplugged
//! by the guest, refusals and timeouts, and hot-plugged guests that are snapshotted or
//! migrated mid-operation. Needs KVM; nothing skips.

mod migrate;
mod plug;
mod snapshot;
