//! Test replica for the wire protocol; see `hcblk_tests::wire_peer`.
use anyhow::{Context, Result};
use clap::Parser;
use hcblk_tests::wire_peer::{run, PeerConfig};

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// File holding the cluster secret (at least 16 bytes).
    #[arg(long)]
    secret_file: std::path::PathBuf,
    #[arg(long, default_value_t = 1)]
    cluster: u64,
    #[arg(long, default_value_t = 2)]
    node: u64,
    /// In-memory disk size in MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: usize,
    /// Seed of the initial disk pattern.
    #[arg(long, default_value_t = 0)]
    seed: u8,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let secret = proto::auth::Secret::from_file(&a.secret_file).context("cluster secret")?;
    run(PeerConfig {
        listen: a.listen,
        transport: proto::Config::new(a.cluster, a.node, secret),
        disk_bytes: a.disk_mib << 20,
        seed: a.seed,
    })
}
