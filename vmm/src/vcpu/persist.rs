//! Plain vCPU state and the `cpu` section, re-exported from `ferry-state` so
//! `vmm::vcpu::persist` paths keep working.

pub use ferry_state::vcpu::*;
