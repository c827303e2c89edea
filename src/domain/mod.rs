//! Pure logic: campaign state machine, windows, model math, content filters,
//! partitioning.
//! No IO and no actors here; unit tests live beside the code.

pub mod campaign;
pub mod changelog;
pub mod filter;
pub mod linear;
pub mod model;
pub mod partition;
pub mod reaction;
pub mod window;
