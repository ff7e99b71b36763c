//! The `hcblk` command line (docs/cli.md): arguments, their validation into configs and
//! requests, and how answers are printed.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::api::{self, CreateRequest, Request, Response, VolumeInfo};
use super::daemon::{self, DaemonConfig};
use super::store::BackingType;
use super::units::{format_rfc3339, format_size_exact, format_size_human, parse_cpu_list, parse_size};
use super::Error;
use crate::{PollConfig, PollMode};

#[derive(Debug, Parser)]
#[command(name = "hcblk", version, about = "hcblk: vhost-user-blk volumes for QEMU guests")]
pub struct Cli {
    /// The daemon's local control socket.
    #[arg(long, global = true, env = "HCBLK_API_SOCKET", default_value = "/run/hcblk/api.sock")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon in the foreground until SIGINT/SIGTERM.
    Daemon(DaemonArgs),
    /// Manage volumes through the daemon.
    #[command(subcommand)]
    Volume(VolumeCommand),
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Metadata and file backings (DIR/volumes/).
    #[arg(long, default_value = "/var/lib/hcblk")]
    pub data_dir: PathBuf,
    /// One vhost-user socket per volume, DIR/NAME.sock.
    #[arg(long, default_value = "/run/hcblk")]
    pub socket_dir: PathBuf,
    /// always, adaptive or never.
    #[arg(long, default_value = "adaptive")]
    pub poll: String,
    /// Adaptive polling: idle time before a poller sleeps on the kick eventfd.
    #[arg(long, default_value_t = 1000)]
    pub poll_idle_us: u64,
    /// Cores the pollers are pinned to, e.g. "1" or "0-1" [default: all online cores].
    #[arg(long)]
    pub cpus: Option<String>,
    /// Free hugepage memory (MiB) required at start, for the data path's own buffers.
    #[arg(long, default_value_t = 64)]
    pub hugepages_mb: u32,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume and export it; prints its vhost-user socket.
    Create(CreateArgs),
    /// One line per volume: NAME SIZE BACKING SOCKET.
    List,
    /// Everything about one volume, as `key: value` lines.
    Info { name: String },
    /// Grow a volume (live: a connected guest sees the new size).
    Resize {
        name: String,
        /// The new size: bytes with an optional K/M/G/T suffix (binary).
        #[arg(long)]
        size: String,
    },
    /// Stop the export and remove the volume (and its backing file if hcblk created it).
    Delete {
        name: String,
        /// Delete even while a VM is connected to the volume.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    /// Bytes with an optional K/M/G/T suffix (binary), e.g. 10G.
    #[arg(long)]
    pub size: String,
    /// 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Virtqueues (1-16).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// file, device, ram or null.
    #[arg(long, default_value = "file")]
    pub backing: String,
    /// File or block device [file default: DATA_DIR/volumes/NAME.img, created sparse].
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[arg(long)]
    pub read_only: bool,
    /// Serial the guest reads (at most 20 bytes) [default: from the name].
    #[arg(long)]
    pub serial: Option<String>,
}

impl TryFrom<(DaemonArgs, PathBuf)> for DaemonConfig {
    type Error = Error;
    fn try_from((args, api_socket): (DaemonArgs, PathBuf)) -> Result<Self, Error> {
        let mode: PollMode = args.poll.parse().map_err(Error::Invalid)?;
        if args.poll_idle_us == 0 || args.poll_idle_us > 1_000_000 {
            return Err(Error::Invalid(format!(
                "--poll-idle-us {} is out of range 1..=1000000 (for no polling use --poll never)",
                args.poll_idle_us
            )));
        }
        if args.hugepages_mb == 0 || args.hugepages_mb > 1 << 20 {
            return Err(Error::Invalid(format!("--hugepages-mb {} is out of range 1..=1048576", args.hugepages_mb)));
        }
        let online_path = "/sys/devices/system/cpu/online";
        let online = std::fs::read_to_string(online_path).map_err(Error::io(format!("read {online_path}")))?;
        let online = parse_cpu_list(&online)?;
        let cpus = match args.cpus {
            None => online,
            Some(list) => {
                let cpus = parse_cpu_list(&list)?;
                if let Some(offline) = cpus.iter().find(|c| !online.contains(c)) {
                    return Err(Error::Invalid(format!("--cpus {list}: CPU {offline} is not online")));
                }
                cpus
            }
        };
        let absolute = |p: &PathBuf| std::path::absolute(p).map_err(Error::io(format!("resolve {}", p.display())));
        Ok(Self {
            data_dir: absolute(&args.data_dir)?,
            socket_dir: absolute(&args.socket_dir)?,
            api_socket: absolute(&api_socket)?,
            poll: PollConfig { mode, idle: Duration::from_micros(args.poll_idle_us), cpus },
            hugepages_mb: args.hugepages_mb,
        })
    }
}

impl TryFrom<CreateArgs> for CreateRequest {
    type Error = Error;
    fn try_from(args: CreateArgs) -> Result<Self, Error> {
        let backing: BackingType = args.backing.parse()?;
        // The daemon runs elsewhere: a relative path means relative to where the CLI runs.
        let path = match args.path {
            Some(p) => Some(std::path::absolute(&p).map_err(Error::io(format!("resolve {}", p.display())))?),
            None => None,
        };
        Ok(Self {
            name: args.name,
            size_bytes: parse_size(&args.size)?,
            block_size: args.block_size,
            queues: args.queues,
            backing,
            path,
            read_only: args.read_only,
            serial: args.serial,
        })
    }
}

pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Daemon(args) => daemon::run(DaemonConfig::try_from((args, cli.api_socket))?),
        Command::Volume(command) => {
            let request = volume_request(command)?;
            let response = api::call(&cli.api_socket, &request)?;
            let mut out = io::stdout().lock();
            print_response(&mut out, &request, &response)
                .and_then(|()| out.flush())
                .map_err(Error::io("write to stdout"))
        }
    }
}

fn volume_request(command: VolumeCommand) -> Result<Request, Error> {
    Ok(match command {
        VolumeCommand::Create(args) => Request::Create(args.try_into()?),
        VolumeCommand::List => Request::List {},
        VolumeCommand::Info { name } => Request::Info { name },
        VolumeCommand::Resize { name, size } => Request::Resize { name, size_bytes: parse_size(&size)? },
        VolumeCommand::Delete { name, force } => Request::Delete { name, force },
    })
}

fn print_response(out: &mut impl Write, request: &Request, response: &Response) -> io::Result<()> {
    match (request, response) {
        (Request::Create(_), Response::Volume { volume }) => {
            writeln!(out, "volume {} created", volume.name)?;
            writeln!(out, "socket: {}", volume.socket.display())
        }
        (Request::Resize { .. }, Response::Volume { volume }) => writeln!(
            out,
            "volume {} resized to {} bytes ({})",
            volume.name,
            volume.size_bytes,
            format_size_human(volume.size_bytes)
        ),
        (_, Response::Volume { volume }) => print_info(out, volume),
        (_, Response::Volumes { volumes }) => print_list(out, volumes),
        (_, Response::Deleted { name }) => writeln!(out, "volume {name} deleted"),
        // `api::call` turns these into errors.
        (_, Response::Error { message }) => writeln!(out, "error: {message}"),
    }
}

fn print_info(out: &mut impl Write, v: &VolumeInfo) -> io::Result<()> {
    let path = v.path.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string());
    writeln!(out, "name: {}", v.name)?;
    writeln!(out, "size: {}", v.size_bytes)?;
    writeln!(out, "size_human: {} ({})", format_size_human(v.size_bytes), format_size_exact(v.size_bytes))?;
    writeln!(out, "block_size: {}", v.block_size)?;
    writeln!(out, "queues: {}", v.queues)?;
    writeln!(out, "backing: {}", v.backing.name())?;
    writeln!(out, "path: {path}")?;
    writeln!(out, "created_backing: {}", v.created_backing)?;
    writeln!(out, "read_only: {}", v.read_only)?;
    writeln!(out, "serial: {}", v.serial)?;
    writeln!(out, "socket: {}", v.socket.display())?;
    writeln!(out, "connected: {}", v.connected)?;
    writeln!(out, "created: {}", format_rfc3339(v.created_unix_s))
}

fn print_list(out: &mut impl Write, volumes: &[VolumeInfo]) -> io::Result<()> {
    let width = volumes.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in volumes {
        writeln!(
            out,
            "{:width$}  {:>7}  {:<6}  {}",
            v.name,
            format_size_exact(v.size_bytes),
            v.backing.name(),
            v.socket.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("hcblk").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn create_arguments_become_a_request() {
        let cli = parse(&["volume", "create", "vm1", "--size", "10G", "--queues", "2", "--backing", "null"]);
        let Command::Volume(command) = cli.command else { panic!() };
        let Request::Create(create) = volume_request(command).unwrap() else { panic!() };
        assert_eq!((create.size_bytes, create.queues, create.block_size), (10 << 30, 2, 512));
        assert_eq!(create.backing, BackingType::Null);

        let cli = parse(&["volume", "create", "vm1", "--size", "10X"]);
        let Command::Volume(command) = cli.command else { panic!() };
        assert!(matches!(volume_request(command), Err(Error::InvalidSize { .. })));
        let cli = parse(&["volume", "create", "vm1", "--size", "1G", "--backing", "tape"]);
        let Command::Volume(command) = cli.command else { panic!() };
        assert!(volume_request(command).is_err());
    }

    #[test]
    fn relative_paths_are_made_absolute_by_the_cli() {
        let cli = parse(&["volume", "create", "vm1", "--size", "1G", "--path", "disk.img"]);
        let Command::Volume(command) = cli.command else { panic!() };
        let Request::Create(create) = volume_request(command).unwrap() else { panic!() };
        let path = create.path.unwrap();
        assert!(path.is_absolute() && path.ends_with("disk.img"), "{}", path.display());
    }

    #[test]
    fn daemon_config_validation() {
        let config = |extra: &[&str]| {
            let mut args = vec!["--api-socket", "/tmp/x/api.sock", "daemon", "--data-dir", "rel/data"];
            args.extend_from_slice(extra);
            let Command::Daemon(d) = parse(&args).command else { panic!() };
            DaemonConfig::try_from((d, PathBuf::from("/tmp/x/api.sock")))
        };
        let ok = config(&[]).unwrap();
        assert!(ok.data_dir.is_absolute());
        assert_eq!(ok.poll.mode, PollMode::Adaptive);
        assert_eq!(ok.poll.idle, Duration::from_millis(1));
        assert!(!ok.poll.cpus.is_empty());
        assert_eq!(config(&["--cpus", "0"]).unwrap().poll.cpus, vec![0]);
        for bad in [
            &["--poll", "sometimes"][..],
            &["--poll-idle-us", "0"],
            &["--hugepages-mb", "0"],
            &["--cpus", "4095"],
            &["--cpus", "x"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn output_formats() {
        let volume = VolumeInfo {
            name: "vm1".into(),
            size_bytes: 10 << 30,
            block_size: 512,
            queues: 1,
            backing: BackingType::File,
            path: Some("/d/volumes/vm1.img".into()),
            created_backing: true,
            read_only: false,
            serial: "vm1".into(),
            created_unix_s: 0,
            socket: "/run/hcblk/vm1.sock".into(),
            connected: false,
        };
        let render = |request: Request, response: Response| {
            let mut out = Vec::new();
            print_response(&mut out, &request, &response).unwrap();
            String::from_utf8(out).unwrap()
        };
        let create = Request::Create(CreateRequest {
            name: "vm1".into(),
            size_bytes: 10 << 30,
            block_size: 512,
            queues: 1,
            backing: BackingType::File,
            path: None,
            read_only: false,
            serial: None,
        });
        assert_eq!(
            render(create, Response::Volume { volume: volume.clone() }),
            "volume vm1 created\nsocket: /run/hcblk/vm1.sock\n"
        );
        let info = render(Request::Info { name: "vm1".into() }, Response::Volume { volume: volume.clone() });
        assert!(info.contains("\nsize: 10737418240\n") && info.contains("\nsocket: /run/hcblk/vm1.sock\n"), "{info}");
        assert!(info.contains("\nbacking: file\n") && info.contains("\npath: /d/volumes/vm1.img\n"), "{info}");
        let list = render(Request::List {}, Response::Volumes { volumes: vec![volume] });
        assert_eq!(list, "vm1      10G  file    /run/hcblk/vm1.sock\n");
    }
}
