//! The Tether device agent.
//!
//! [`config`] reads `config.yaml`; [`link`] keeps the relay link up (authentication, clock
//! sync, telemetry, reconnection); [`sim`] is the simulated boat whose telemetry it publishes
//! in the demo and the tests.

pub mod commands;
pub mod config;
pub mod docker;
pub mod link;
pub mod local;
pub mod net;
pub mod safety;
pub mod sim;
pub mod speedtest;
pub mod supervise;
pub mod sysmetrics;
#[cfg(feature = "video")]
pub mod video;

pub use config::Config;
pub use link::{Agent, AgentError};
