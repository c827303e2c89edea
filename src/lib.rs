//! smartmsg: an actor-based, resilient runtime for a smart message
//! advertising service. See README.md (Architecture) for the map.

pub mod actors;
pub mod bench;
pub mod clock;
pub mod config;
pub mod demo;
pub mod domain;
pub mod io;
pub mod logging;
pub mod node;
pub mod simulate;
pub mod supervision;
