//! Placeholder of the fixed top level. The end-to-end tests need the `ferry` binary
//! (`CARGO_BIN_EXE_ferry`), which Cargo only provides to the `vmm` crate's own tests, so they
//! live in `vmm/tests/` (design brief, Precise rule 7); golden streams and frozen schemas are in
//! `compat/`.
