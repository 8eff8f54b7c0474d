//! The library behind `ferry-dump`: decode a stream by schema alone into a tree, verify it,
//! diff two of them, and check two schemas for migration-breaking changes.

pub mod compat;
pub mod dump;

use devstate::MachineSchema;

/// The committed schema of every released machine type (`compat/schemas/`), as frozen JSON.
const COMMITTED: &[(&str, &str)] = &[
    (
        "ferry-1.0",
        include_str!("../../compat/schemas/ferry-1.0.json"),
    ),
    (
        "ferry-1.1",
        include_str!("../../compat/schemas/ferry-1.1.json"),
    ),
    (
        "ferry-2.0",
        include_str!("../../compat/schemas/ferry-2.0.json"),
    ),
    (
        "ferry-2.1",
        include_str!("../../compat/schemas/ferry-2.1.json"),
    ),
];

/// The committed schema for `machine`, if it is a known machine type.
pub fn committed_schema(machine: &str) -> Option<MachineSchema> {
    COMMITTED
        .iter()
        .find(|(m, _)| *m == machine)
        .map(|(_, j)| serde_json::from_str(j).expect("committed schemas are valid JSON"))
}

/// Machine types with a committed schema.
pub fn known_machines() -> Vec<&'static str> {
    COMMITTED.iter().map(|(m, _)| *m).collect()
}

/// The schema this build emits for `machine`.
pub fn current_schema(machine: &machine_types::MachineType) -> MachineSchema {
    ferry_state::full_catalog().schema(machine)
}

#[cfg(test)]
mod tests {
    /// `ferry-dump` decodes every machine type this build runs (ferry-2.1 was missing).
    #[test]
    fn every_machine_type_has_a_committed_schema() {
        for m in machine_types::all() {
            assert!(
                super::committed_schema(m.name()).is_some(),
                "{} has no committed schema in tools/src/lib.rs",
                m.name()
            );
        }
    }
}
