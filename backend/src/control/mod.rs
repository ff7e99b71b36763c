//! The node daemon around the data path: volume metadata ([`store`]), the standalone volume
//! manager ([`volumes`]), the cluster volume manager ([`cluster`]) and its seam to replicated
//! volumes ([`attach`]), the cluster daemon's background work ([`housekeeping`]), the local
//! API ([`api`]), the daemon ([`daemon`]) with its service-manager notifications ([`notify`])
//! and the CLI ([`cli`]). docs/cli.md is the contract they implement.

pub mod api;
pub mod attach;
pub mod cli;
pub mod cluster;
pub mod daemon;
mod error;
pub mod exporter;
pub mod housekeeping;
pub mod notify;
pub mod store;
pub mod units;
pub mod volumes;

pub use error::{chain, Error};
