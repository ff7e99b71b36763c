//! `blk-bench`: drives a vhost-user-blk socket with an independent frontend (libblkio's
//! `virtio-blk-vhost-user` driver on a busy-polled queue) and reports IOPS, latency
//! percentiles and the server's CPU time per I/O. See `bench/README.md`.

#[path = "../blk/mod.rs"]
mod blk;

use anyhow::Context as _;
use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let args = blk::config::Args::parse();
    let config = blk::config::Config::try_from(args).context("invalid arguments")?;
    let report = blk::runner::run(&config)?;
    println!("{}", report.summary_line());
    if let Some(path) = &config.json {
        report.write_json(path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
