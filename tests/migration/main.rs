//! Live migrations and snapshots between real `ferry` processes, and what goes wrong with
//! them: cut, stalled, reset and delayed links, killed peers, full disks, truncated and
//! hostile streams, CPU models a host lacks, a bandwidth-capped link between two network
//! namespaces, `ferry-dump` on the streams of a real migration, and mutual TLS with each of
//! its refusals.
//!
//! Needs KVM; `netns` also needs root and iproute2. Nothing skips.

mod channels;
mod converge;
mod cpu_models;
mod dump;
mod faults;
mod faults_more;
mod hostile_streams;
mod netns;
mod postcopy;
mod snapshot;
mod tls;
