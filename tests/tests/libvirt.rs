//! hcblk under a real libvirtd (Debian's, started by the test when none runs), QEMU run by
//! libvirt as its default `libvirt-qemu` user, the way an operator deploys it: the daemon gives
//! its sockets to that group (`--socket-group libvirt-qemu`), the domain is
//! `qemu/hcblk-guest.xml` and hot-plugged disks are `qemu/libvirt-hotplug-disk.xml`, both used
//! as shipped with only their paths and the guest's mode changed.
//!
//! Needs root, `libvirtd`, `virtlogd` and `virsh` (`scripts/install-deps.sh` installs them);
//! without them it fails naming what is missing.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hcblk_tests::guest::{
    build_guest, parse_verdict, repo_root, require_tool, HcblkServer, Server, Verdict, VolumeSpec,
};

const MIB: u64 = 1 << 20;
const URI: &str = "qemu:///system";
/// How long the guest may take to boot, see a disk come or go, or end (TCG, a busy host).
const GUEST_WAIT: Duration = Duration::from_secs(240);

fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running virsh {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "virsh {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// libvirtd and virtlogd, started here unless they already run (a host with systemd has them).
struct Libvirt {
    started: Vec<Child>,
}

impl Libvirt {
    fn up(dir: &Path) -> Result<Self> {
        for (tool, hint) in [
            ("libvirtd", "apt-get install --no-install-recommends libvirt-daemon-system"),
            ("virtlogd", "apt-get install --no-install-recommends libvirt-daemon-system"),
            ("virsh", "apt-get install --no-install-recommends libvirt-clients"),
        ] {
            require_tool(tool, hint)?;
        }
        let mut started = Vec::new();
        if virsh(&["version"]).is_ok() {
            return Ok(Self { started });
        }
        for daemon in ["virtlogd", "libvirtd"] {
            let log = fs::File::create(dir.join(format!("{daemon}.log")))?;
            let child = Command::new(daemon)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {daemon}"))?;
            started.push(child);
        }
        let me = Self { started };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match virsh(&["version"]) {
                Ok(_) => return Ok(me),
                Err(e) if Instant::now() > deadline => {
                    let log = fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default();
                    bail!("libvirtd did not answer within 30 s: {e:#}\nlibvirtd.log:\n{log}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for child in self.started.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A domain defined by the test, destroyed and undefined however the test ends.
struct Domain {
    name: String,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// `text` with `from` replaced by `to`, which must be there: the shipped XML changing under
/// the test fails it instead of testing something else.
fn replace_once(text: &str, from: &str, to: &str, what: &str) -> Result<String> {
    ensure!(text.matches(from).count() == 1, "{what}: expected `{from}` once in the shipped XML");
    Ok(text.replacen(from, to, 1))
}

/// The shipped domain with this test's name, kernel, socket, console log and guest mode, plus
/// a free PCIe root port for the hot-plugged disk.
fn domain_xml(name: &str, boot: &Path, socket: &Path, console: &Path) -> Result<String> {
    let shipped = fs::read_to_string(repo_root().join("qemu/hcblk-guest.xml"))?;
    let xml = replace_once(&shipped, "<name>hcblk-guest</name>", &format!("<name>{name}</name>"), "name")?;
    let xml = replace_once(
        &xml,
        "/var/lib/libvirt/boot/hcblk-vmlinuz",
        &boot.join("vmlinuz").display().to_string(),
        "kernel",
    )?;
    let xml = replace_once(
        &xml,
        "/var/lib/libvirt/boot/hcblk-initramfs.cpio",
        &boot.join("initramfs.cpio").display().to_string(),
        "initrd",
    )?;
    let xml = replace_once(
        &xml,
        "hcblk.mode=fio-verify",
        "hcblk.mode=hotplug hcblk.cycles=2 hcblk.size=32M hcblk.round=3",
        "guest mode",
    )?;
    let xml = replace_once(&xml, "/run/hcblk/vol0.sock", &socket.display().to_string(), "socket")?;
    let xml = replace_once(
        &xml,
        "/var/log/libvirt/qemu/hcblk-guest-console.log",
        &console.display().to_string(),
        "console log",
    )?;
    replace_once(
        &xml,
        "<memballoon model='none'/>",
        // A domain that lists no PCI controller of its own must name the root first, or
        // libvirt takes a port for controller 0; and libvirt puts the devices it defines
        // without an address (vda) on the ports it finds: one for vda, one left free.
        "<memballoon model='none'/>\n    <controller type='pci' index='0' model='pcie-root'/>\n    \
         <controller type='pci' model='pcie-root-port'/>\n    <controller type='pci' model='pcie-root-port'/>",
        "devices",
    )
}

fn read_console(log: &Path) -> String {
    String::from_utf8_lossy(&fs::read(log).unwrap_or_default()).into_owned()
}

/// Waits for the `nth` (1-based) console line holding `marker`; fails early on a verdict.
fn wait_marker(log: &Path, marker: &str, nth: usize) -> Result<()> {
    let deadline = Instant::now() + GUEST_WAIT;
    loop {
        let console = read_console(log);
        if console.lines().filter(|l| l.contains(marker)).count() >= nth {
            return Ok(());
        }
        if let Some(verdict) = parse_verdict(&console) {
            bail!("the guest ended ({verdict:?}) before `{marker}` #{nth}:\n{}", tail(&console));
        }
        ensure!(Instant::now() < deadline, "no `{marker}` #{nth} within {GUEST_WAIT:?}:\n{}", tail(&console));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn wait_domain_off(name: &str) -> Result<()> {
    let deadline = Instant::now() + GUEST_WAIT;
    while virsh(&["domstate", name])?.trim() != "shut off" {
        ensure!(Instant::now() < deadline, "domain {name} still running {GUEST_WAIT:?} after its last step");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The domain runs verified random writes on its volume (2 queues) all along while a second
/// volume is hot-plugged with `virsh attach-device --live` and unplugged with
/// `detach-device --live`, twice, with the hcblk daemon killed with SIGKILL and started again
/// between the two cycles (QEMU reconnects by the domain's `<reconnect>`; the socket group
/// must hold on the re-created sockets, or QEMU, as `libvirt-qemu`, cannot reconnect). The
/// second attach must find what the first wrote; the guest must end with PASS (no fio or
/// verify error, no disk error in its kernel log).
#[test]
fn a_libvirt_domain_runs_hot_plugs_and_survives_a_daemon_kill() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(euid == 0, "this test needs root (libvirtd, QEMU as libvirt-qemu); running as uid {euid}");
    let guest_dir = build_guest()?;
    // Under /tmp: vhost-user socket paths must stay below the 108-byte sun_path limit.
    let dir = std::env::temp_dir().join(format!("hcblk-libvirt-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let libvirt = Libvirt::up(&dir)?;

    // libvirt-qemu reads the kernel and initramfs; the repo may sit where it cannot traverse.
    let boot = dir.join("boot");
    fs::create_dir_all(&boot)?;
    for file in ["vmlinuz", "initramfs.cpio"] {
        fs::copy(guest_dir.join(file), boot.join(file)).with_context(|| format!("copying {file}"))?;
    }

    for attempt in 1..=2 {
        let name = format!("hcblk-test-{}-{attempt}", std::process::id());
        match run_domain(&dir.join(format!("attempt-{attempt}")), &boot, &name) {
            Ok(()) => break,
            // QEMU 10.0's TCG can abort on its own while a PCI device is unplugged (its TLB
            // meets a memory map the unplug just changed): not hcblk's doing, and not seen
            // with KVM. Once is retried with a new domain and new volumes; twice fails.
            Err(e) if attempt == 1 && qemu_tcg_unplug_abort(&name) => {
                eprintln!(
                    "QEMU (TCG) aborted in iotlb_to_section during the unplug ({e:#}); once more with a new domain"
                );
            }
            Err(e) => return Err(e),
        }
    }
    drop(libvirt);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// Whether the QEMU of domain `name` died of TCG's assertion on a stale memory section.
fn qemu_tcg_unplug_abort(name: &str) -> bool {
    fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log"))
        .is_ok_and(|log| log.contains("iotlb_to_section: Assertion") && log.contains("reason=crashed"))
}

/// One whole run: an hcblk daemon and its two volumes in `dir`, the domain `name` defined,
/// started, driven through its hot-plug cycles and the daemon kill, and ended with its verdict.
fn run_domain(dir: &Path, boot: &Path, name: &str) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut server = HcblkServer::start_with(
        &dir.join("hcblk"),
        &VolumeSpec { size: 128 * MIB, queues: 2, read_only: false },
        &["--socket-group", "libvirt-qemu"],
    )?;
    let socket_a = server.socket().to_path_buf();
    let socket_b = server.create_volume("volb", &VolumeSpec { size: 64 * MIB, queues: 1, read_only: false })?;

    let console = dir.join("console.log");
    let xml_path = dir.join("domain.xml");
    fs::write(&xml_path, domain_xml(name, boot, &socket_a, &console)?)?;
    let disk_path = dir.join("disk-b.xml");
    let shipped_disk = fs::read_to_string(repo_root().join("qemu/libvirt-hotplug-disk.xml"))?;
    fs::write(
        &disk_path,
        replace_once(&shipped_disk, "/run/hcblk/volb.sock", &socket_b.display().to_string(), "disk socket")?,
    )?;
    let (xml, disk) = (xml_path.display().to_string(), disk_path.display().to_string());

    virsh(&["define", &xml])?;
    let domain = Domain { name: name.to_owned() };
    let started = Instant::now();
    virsh(&["start", name])?;
    wait_marker(&console, "HCBLK-FIO-START", 1)?;
    let booted = started.elapsed();

    for cycle in 1..=2 {
        if cycle == 2 {
            // The daemon dies under the guest's I/O and comes back; QEMU reconnects to the
            // sockets it binds again, with the group libvirt-qemu needs.
            server.kill_and_restart().context("kill -9 and restart of the hcblk daemon")?;
        }
        virsh(&["attach-device", name, &disk, "--live"]).with_context(|| format!("attach, cycle {cycle}"))?;
        wait_marker(&console, "HCBLK-DISK-READY ", cycle)?;
        virsh(&["detach-device", name, &disk, "--live"]).with_context(|| format!("detach, cycle {cycle}"))?;
        wait_marker(&console, "HCBLK-DISK-REMOVED ", cycle)?;
    }
    let console_text = read_console(&console);
    let gens: Vec<&str> = console_text
        .lines()
        .filter_map(|l| l.find("HCBLK-DISK-ADDED ").map(|i| &l[i..]))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("gen=")))
        .collect();
    ensure!(gens == ["gen=0", "gen=1"], "generations found by the two attaches: {gens:?} (expected gen=0, gen=1)");

    // One more attach is the guest's signal to stop; it powers off with its verdict.
    virsh(&["attach-device", name, &disk, "--live"]).context("the stop signal")?;
    wait_domain_off(name)?;
    let console_text = read_console(&console);
    ensure!(
        parse_verdict(&console_text) == Some(Verdict::Pass),
        "the libvirt guest did not pass:\n{}",
        tail(&console_text)
    );
    eprintln!(
        "libvirt domain as libvirt-qemu: booted to fio in {:.1} s, 2 hot-plug cycles and a daemon kill -9, PASS after {:.1} s",
        booted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    ensure!(server.exited()?.is_none(), "the hcblk daemon exited");
    drop(domain);
    drop(server);
    Ok(())
}
