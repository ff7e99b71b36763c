use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("vhost-user socket {path} is in use by another process")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on vhost-user socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the vhost-user device")]
    Daemon(#[source] io::Error),
    #[error(transparent)]
    Shard(#[from] replica::Error),
    #[error("cannot notify the frontend of the new size")]
    ConfigChange(#[source] io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}
