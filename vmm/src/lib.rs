//! Ferry VMM.
