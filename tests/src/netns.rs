//! Two test hosts on one machine: network namespaces joined by a veth pair.
//!
//! `NetnsPair::create` needs root and `ip` (iproute2); without them it
//! returns an error naming the missing facility, so a test using it fails
//! instead of passing silently. Namespaces are deleted on drop.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Host A is 198.18.0.1/24 on `veth-a`, host B 198.18.0.2/24 on `veth-b`.
#[derive(Debug)]
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl NetnsPair {
    /// Creates `hcblk-t-<pid>-<n>-{a,b}` and the veth link between them.
    pub fn create() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("network namespace tests need root (CAP_SYS_ADMIN + CAP_NET_ADMIN); running as uid {}", {
                // SAFETY: as above.
                unsafe { libc::geteuid() }
            });
        }
        if Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            bail!("network namespace tests need the `ip` command (Debian package iproute2)");
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("hcblk-t-{}-{n}", std::process::id());
        let pair = NetnsPair {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
            addr_a: Ipv4Addr::new(198, 18, 0, 1),
            addr_b: Ipv4Addr::new(198, 18, 0, 2),
        };
        // From here on `pair`'s Drop cleans up whatever was created.
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        ip(&["link", "add", "veth-a", "netns", &pair.a, "type", "veth", "peer", "name", "veth-b", "netns", &pair.b])?;
        for (ns, dev, addr) in [(&pair.a, "veth-a", pair.addr_a), (&pair.b, "veth-b", pair.addr_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Moves the calling thread into namespace `ns`; sockets it creates from
    /// now on live there (other threads are unaffected).
    pub fn enter(&self, ns: &str) -> Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("open /run/netns/{ns}"))?;
        // SAFETY: `f` is an open namespace file; setns only changes this thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
        }
        Ok(())
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace also deletes its end of the veth pair.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Child(pub std::process::Child);

impl Child {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}
