//! The compatibility contract (issues 8 and 13), one test binary with a custom harness
//! (`libtest-mimic`): the migration matrix, one test per cell (`matrix::MACHINE::SCENARIO`),
//! the golden streams (`golden::...`) and the frozen schemas (`schemas::...`). Needs KVM;
//! nothing skips.

mod golden;
mod matrix;
mod schemas;
mod streams;

use libtest_mimic::{Arguments, Failed, Trial};
use std::time::Instant;

/// A plain test function as a trial; a panic fails it with the panic's text.
fn trial(name: &str, f: fn()) -> Trial {
    Trial::test(name, move || {
        f();
        Ok::<(), Failed>(())
    })
}

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    // Real KVM guests on a 2-core machine: one test at a time unless told otherwise (nextest
    // runs each in its own process, one at a time in the kvm-serial group).
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let mut trials = matrix::trials();
    trials.extend([
        trial(
            "golden::every_golden_stream_loads_and_reaches_the_same_state",
            golden::every_golden_stream_loads_and_reaches_the_same_state,
        ),
        trial(
            "golden::goldens_saved_on_the_other_cpu_vendor_load_to_the_same_state",
            golden::goldens_saved_on_the_other_cpu_vendor_load_to_the_same_state,
        ),
        trial(
            "schemas::every_machine_type_emits_exactly_its_committed_schema",
            schemas::every_machine_type_emits_exactly_its_committed_schema,
        ),
        trial(
            "schemas::committed_schemas_are_exactly_the_machine_types",
            schemas::committed_schemas_are_exactly_the_machine_types,
        ),
    ]);
    let started = Instant::now();
    let conclusion = libtest_mimic::run(&args, trials);
    matrix::write_table(started);
    conclusion.exit_code()
}
