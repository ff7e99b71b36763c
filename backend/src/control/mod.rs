//! The node daemon around the data path: volume metadata ([`store`]), the volume manager
//! ([`volumes`]), the local API ([`api`]), the daemon ([`daemon`]) and the CLI ([`cli`]).
//! docs/cli.md is the contract they implement.

pub mod api;
pub mod cli;
pub mod daemon;
mod error;
pub mod exporter;
pub mod store;
pub mod units;
pub mod volumes;

pub use error::{chain, Error};
