//! The I/O loop: one libblkio poll queue driven from one (optionally pinned) thread.
//!
//! Each of the `qd` slots owns a fixed `bs`-sized buffer in a libblkio memory region (a
//! shared memfd the server maps, so no copies) and always has exactly one request in flight
//! until the drain phase. The loop busy-polls `do_io`, timestamps each batch of completions
//! once and resubmits every completed slot immediately, so the queue depth stays constant.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;

use super::config::{Config, Workload};
use super::offsets::Offsets;
use super::procstat;
use super::report::{Measured, Report, RunInfo};

/// A request not completed within this time means the server hung or died; fail instead of
/// spinning forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies above a minute are recorded as a minute.
const LATENCY_NS_MAX: u64 = 60_000_000_000;
const PAGE_BYTES: u64 = 4096;
/// Written by randwrite: non-zero so a backend cannot take a zero-detection shortcut.
const WRITE_PATTERN: u8 = 0xA5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Warmup,
    Measure,
    Drain,
}

struct Device {
    // Field order matters: the queue must be dropped before the driver.
    queue: Blkioq,
    blkio: Blkio,
    capacity_bytes: u64,
    region: blkio::MemoryRegion,
}

fn open(config: &Config) -> anyhow::Result<Device> {
    let socket = config.socket.to_str().context("socket path is not valid UTF-8")?;
    let mut blkio = Blkio::new("virtio-blk-vhost-user").context("creating libblkio driver")?;
    blkio.set_str("path", socket).context("setting path")?;
    // libblkio refuses to start a writable client on a read-only export, so readers say
    // they only read; a writer on a read-only export then fails at start().
    blkio.set_bool("read-only", !config.workload.is_write()).context("setting read-only")?;
    blkio.connect().with_context(|| format!("connecting to {socket}"))?;
    // Only a poll queue: the client busy-polls the used ring, never sleeps on an eventfd.
    blkio.set_i32("num-queues", 0).context("num-queues")?;
    blkio.set_i32("num-poll-queues", 1).context("num-poll-queues")?;

    let capacity_bytes = blkio.get_u64("capacity").context("reading capacity")?;
    let request_alignment = blkio.get_i32("request-alignment")?;
    let max_transfer = blkio.get_i32("max-transfer")?;
    let queue_size = blkio.get_i32("queue-size")?;
    let bs = config.bs_bytes;
    ensure!(
        bs.checked_rem(u64::try_from(request_alignment)?) == Some(0),
        "bs {bs} is not a multiple of the device's request alignment {request_alignment}"
    );
    ensure!(
        max_transfer <= 0 || bs <= u64::try_from(max_transfer)?,
        "bs {bs} exceeds the device's max transfer {max_transfer}"
    );
    ensure!(i64::from(config.qd) <= i64::from(queue_size), "qd {} exceeds the virtqueue size {queue_size}", config.qd);

    let start = blkio.start().context("starting the device")?;
    let queue = start.poll_queues.into_iter().next().context("libblkio returned no poll queue")?;

    let align = blkio.get_u64("mem-region-alignment")?.max(PAGE_BYTES).max(1);
    let want = bs * u64::from(config.qd);
    let len = want.div_ceil(align) * align;
    let region = blkio.alloc_mem_region(usize::try_from(len)?).context("allocating the I/O buffer region")?;
    blkio.map_mem_region(&region).context("mapping the I/O buffer region into the device")?;
    Ok(Device { queue, blkio, capacity_bytes, region })
}

fn submit(queue: &mut Blkioq, workload: Workload, buf: *mut u8, offset: u64, bs: usize, slot: usize) {
    if workload.is_write() {
        queue.write(offset, buf, bs, slot, ReqFlags::empty());
    } else {
        queue.read(offset, buf, bs, slot, ReqFlags::empty());
    }
}

fn sample_server_cpu(pid: Option<u32>) -> anyhow::Result<Option<Duration>> {
    pid.map(|p| procstat::process_cpu_time(p).with_context(|| format!("server pid {p}"))).transpose()
}

fn sample_server_runq_wait(pid: Option<u32>) -> anyhow::Result<Option<Duration>> {
    pid.map(|p| procstat::process_runqueue_wait(p).with_context(|| format!("server pid {p}"))).transpose()
}

pub fn run(config: &Config) -> anyhow::Result<Report> {
    if let Some(cpu) = config.cpu {
        ensure!(
            core_affinity::set_for_current(core_affinity::CoreId { id: cpu }),
            "pinning the client thread to core {cpu} failed"
        );
    }
    let mut dev = open(config)?;
    let span_bytes = config.span_bytes.unwrap_or(dev.capacity_bytes);
    ensure!(span_bytes <= dev.capacity_bytes, "--span {span_bytes} exceeds the device capacity {}", dev.capacity_bytes);
    let seed = u64::from(std::process::id()) ^ 0x9E37_79B9_7F4A_7C15;
    let mut offsets = Offsets::new(config.workload.is_random(), config.bs_bytes, span_bytes, seed)
        .with_context(|| format!("a span of {span_bytes} bytes holds no {}-byte block", config.bs_bytes))?;

    let bs = usize::try_from(config.bs_bytes)?;
    let qd = usize::try_from(config.qd)?;
    if config.workload.is_write() {
        // SAFETY: the region was just allocated as `region.len` bytes, mapped readable and
        // writable in this process, and no request that could make the server touch it has
        // been submitted yet, so this is the only access.
        let mem = unsafe { std::slice::from_raw_parts_mut(dev.region.addr as *mut u8, dev.region.len) };
        mem.fill(WRITE_PATTERN);
    }
    // Slot i's buffer is [addr + i*bs, addr + (i+1)*bs), inside the region by construction
    // of its length (qd*bs rounded up). Each slot has at most one request in flight, so no
    // two requests share a buffer.
    let buf = |slot: usize| (dev.region.addr + slot * bs) as *mut u8;

    let mut latency_ns =
        Histogram::<u64>::new_with_bounds(1, LATENCY_NS_MAX, 3).context("creating the latency histogram")?;
    let mut completions: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let started = Instant::now();
    let mut issued_at = vec![started; qd];
    // Requests still to submit: `fill` writes each block of the span once.
    let mut left = if config.workload == Workload::Fill { span_bytes / config.bs_bytes } else { u64::MAX };
    for slot in 0..qd {
        if left == 0 {
            break;
        }
        left -= 1;
        submit(&mut dev.queue, config.workload, buf(slot), offsets.next(), bs, slot);
    }
    let mut in_flight = qd.min(usize::try_from(span_bytes / config.bs_bytes).unwrap_or(usize::MAX));

    let warmup_end = started + config.warmup;
    let mut phase = Phase::Warmup;
    let mut measure_start = started;
    let mut measure_end = started;
    let mut ios: u64 = 0;
    let mut server_cpu0 = None;
    let mut client_cpu0 = Duration::ZERO;
    let mut elapsed = Duration::ZERO;
    let mut server_cpu = None;
    let mut client_cpu = Duration::ZERO;
    let mut preempt0 = 0;
    let mut client_preemptions = 0;
    let mut runq_wait0 = Duration::ZERO;
    let mut client_runq_wait = Duration::ZERO;
    let mut server_wait0 = None;
    let mut server_runq_wait = None;
    let submitting = |phase: Phase| phase != Phase::Drain;

    while in_flight > 0 {
        let mut timeout = IO_TIMEOUT;
        let n = dev
            .queue
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .with_context(|| format!("waiting for completions ({in_flight} in flight; did the server stop?)"))?;
        let now = Instant::now();
        for c in &completions[..n.min(qd)] {
            // SAFETY: do_io reports that it initialised the first `n` elements, and we
            // read no further.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            ensure!(slot < qd, "completion for unknown request {slot}");
            if c.ret != 0 {
                bail!(
                    "{} request in slot {slot} failed: {}",
                    config.workload.name(),
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            in_flight -= 1;
            if phase == Phase::Measure {
                let ns = u64::try_from((now - issued_at[slot]).as_nanos()).unwrap_or(u64::MAX);
                latency_ns.saturating_record(ns.clamp(1, LATENCY_NS_MAX));
                ios += 1;
            }
            if submitting(phase) && left > 0 {
                left -= 1;
                issued_at[slot] = now;
                submit(&mut dev.queue, config.workload, buf(slot), offsets.next(), bs, slot);
                in_flight += 1;
            }
        }
        // The idle workload only warms up (so the server has seen traffic and must notice
        // it stopped), then drains; its measured interval comes after the loop.
        if phase == Phase::Warmup && now >= warmup_end {
            if config.workload == Workload::Idle {
                phase = Phase::Drain;
            } else {
                phase = Phase::Measure;
                measure_start = now;
                measure_end = now + config.measure;
                server_cpu0 = sample_server_cpu(config.server_pid)?;
                client_cpu0 = procstat::thread_cpu_time()?;
                preempt0 = procstat::thread_preemptions()?;
                runq_wait0 = procstat::thread_runqueue_wait()?;
                server_wait0 = sample_server_runq_wait(config.server_pid)?;
            }
        } else if phase == Phase::Measure && now >= measure_end {
            elapsed = now - measure_start;
            server_cpu = sample_server_cpu(config.server_pid)?.zip(server_cpu0).map(|(b, a)| b.saturating_sub(a));
            client_cpu = procstat::thread_cpu_time()?.saturating_sub(client_cpu0);
            client_preemptions = procstat::thread_preemptions()?.saturating_sub(preempt0);
            client_runq_wait = procstat::thread_runqueue_wait()?.saturating_sub(runq_wait0);
            server_runq_wait =
                sample_server_runq_wait(config.server_pid)?.zip(server_wait0).map(|(b, a)| b.saturating_sub(a));
            phase = Phase::Drain;
        }
    }

    if config.workload == Workload::Fill && elapsed.is_zero() {
        // Done before the measured interval ended: it measured until the last completion.
        elapsed = measure_start.elapsed();
    }
    if config.workload == Workload::Idle {
        // Connected, queue started, nothing submitted: what does the server burn?
        let cpu0 = sample_server_cpu(config.server_pid)?;
        let client0 = procstat::thread_cpu_time()?;
        let t0 = Instant::now();
        std::thread::sleep(config.measure);
        elapsed = t0.elapsed();
        server_cpu = sample_server_cpu(config.server_pid)?.zip(cpu0).map(|(b, a)| b.saturating_sub(a));
        client_cpu = procstat::thread_cpu_time()?.saturating_sub(client0);
    }

    let info = RunInfo {
        label: config.label.clone(),
        socket: config.socket.display().to_string(),
        workload: config.workload.name(),
        bs_bytes: config.bs_bytes,
        qd: config.qd,
        client_cpu: config.cpu,
        server_pid: config.server_pid,
        capacity_bytes: dev.capacity_bytes,
        span_bytes,
        warmup: config.warmup,
    };
    let report = Report::new(
        info,
        &Measured {
            elapsed,
            ios,
            latency_ns: &latency_ns,
            server_cpu,
            client_cpu,
            client_preemptions,
            client_runq_wait,
            server_runq_wait,
        },
    );
    dev.blkio.unmap_mem_region(&dev.region);
    Ok(report)
}

#[cfg(test)]
mod tests {
    //! Drive a real vhost-user-blk server: qemu-storage-daemon, which CI installs (qemu
    //! package) because it is also the benchmark's reference.

    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    const QSD: &str = "/usr/bin/qemu-storage-daemon";

    struct Qsd {
        child: Child,
        dir: PathBuf,
        socket: PathBuf,
    }

    impl Drop for Qsd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn qsd(name: &str, blockdev: impl FnOnce(&Path) -> String, writable: bool) -> Qsd {
        assert!(Path::new(QSD).exists(), "{QSD} is needed (Debian package qemu-system-x86 or qemu-utils)");
        let dir = std::env::temp_dir().join(format!("blk-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vhost.sock");
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(blockdev(&dir))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable={},num-queues=1",
                socket.display(),
                if writable { "on" } else { "off" }
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Qsd { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.socket.exists() {
            assert!(server.child.try_wait().unwrap().is_none(), "qemu-storage-daemon exited");
            assert!(Instant::now() < deadline, "no socket from qemu-storage-daemon");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn config(socket: &Path, workload: Workload, bs_bytes: u64, qd: u32) -> Config {
        Config {
            socket: socket.to_path_buf(),
            workload,
            bs_bytes,
            qd,
            measure: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            server_pid: None,
            cpu: None,
            span_bytes: None,
            label: "test".into(),
            json: None,
        }
    }

    #[test]
    fn random_writes_land_inside_the_span_with_the_pattern() {
        const SIZE: u64 = 4 << 20;
        const SPAN: u64 = 64 << 10;
        let server = qsd(
            "write",
            |dir| {
                let img = dir.join("disk.img");
                std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
                format!("driver=file,node-name=d0,filename={}", img.display())
            },
            true,
        );
        let mut c = config(&server.socket, Workload::RandWrite, 4096, 8);
        c.span_bytes = Some(SPAN);
        c.server_pid = Some(server.child.id());
        let r = run(&c).unwrap();
        assert_eq!(r.capacity_bytes, SIZE);
        assert!(r.ios > 100, "{r:?}");
        assert!(r.iops > 0.0 && r.lat_us.is_some());
        assert!(r.server_cpu_s.is_some());
        // Thousands of uniformly random writes over 16 blocks cover all of them; nothing
        // past the span may be touched.
        let data = std::fs::read(server.dir.join("disk.img")).unwrap();
        let span = usize::try_from(SPAN).unwrap();
        assert!(data[..span].iter().all(|&b| b == WRITE_PATTERN));
        assert!(data[span..].iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_run_at_the_requested_depth_and_idle_does_no_io() {
        let server = qsd("null", |_| "driver=null-co,node-name=d0,size=16777216".to_string(), false);
        let r = run(&config(&server.socket, Workload::SeqRead, 128 << 10, 4)).unwrap();
        assert!(r.ios > 100, "{r:?}");
        assert_eq!(r.span_bytes, 16 << 20);
        let r = run(&config(&server.socket, Workload::Idle, 4096, 1)).unwrap();
        assert_eq!(r.ios, 0);
        assert!(r.lat_us.is_none());
    }

    #[test]
    fn device_limits_are_checked_before_any_io() {
        let server = qsd("ro", |_| "driver=null-co,node-name=d0,size=1048576".to_string(), false);
        let err = run(&config(&server.socket, Workload::RandWrite, 4096, 1)).unwrap_err();
        assert!(format!("{err:#}").contains("read-only"), "{err:#}");
        let mut c = config(&server.socket, Workload::RandRead, 4096, 1);
        c.span_bytes = Some(2 << 20);
        let err = run(&c).unwrap_err();
        assert!(format!("{err:#}").contains("exceeds the device capacity"), "{err:#}");
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        let err = run(&config(Path::new("/nonexistent/x.sock"), Workload::RandRead, 4096, 1)).unwrap_err();
        assert!(format!("{err:#}").contains("connecting to"), "{err:#}");
    }
}
