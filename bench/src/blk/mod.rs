//! Building blocks of `blk-bench`: argument validation, offset generation, `/proc` CPU
//! accounting, the blkio I/O loop and the report it produces.

pub mod config;
pub mod offsets;
pub mod procstat;
pub mod report;
pub mod runner;
