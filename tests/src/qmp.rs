//! A minimal QMP client (QEMU's JSON monitor) for the tests: one connection, commands one at a
//! time, asynchronous events kept until someone waits for them.
//!
//! Used against `qemu-system-x86_64 -qmp unix:PATH,server=on,wait=off` (hot-plug) and
//! `qemu-storage-daemon --monitor` (`block_resize`). Every read is bounded by a timeout.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Longest wait for a command's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Granularity of the waits: reads time out this often so that deadlines are checked.
const READ_SLICE: Duration = Duration::from_millis(200);

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for something else, oldest first.
    events: VecDeque<Value>,
    /// A line read in part when a read timed out (bytes: a timeout may split a character).
    partial: Vec<u8>,
}

impl Qmp {
    /// Connects to the monitor at `path` (retrying until `limit`: QEMU creates the socket a
    /// moment after it starts) and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, limit: Duration) -> Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if start.elapsed() > limit => {
                    return Err(e).with_context(|| format!("connecting to QMP at {}", path.display()))
                }
                Err(_) => sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(READ_SLICE))?;
        let writer = stream.try_clone().context("duplicating the QMP socket")?;
        let mut qmp = Self { reader: BufReader::new(stream), writer, events: VecDeque::new(), partial: Vec::new() };
        let greeting = qmp.read_message(Instant::now() + REPLY_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (an object); returns its `return` value, or the QMP
    /// error as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").with_context(|| format!("sending QMP {command}"))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let message = self.read_message(deadline).with_context(|| format!("waiting for the reply to {command}"))?;
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = message.get("error") {
                bail!("QMP {command} failed: {err}");
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            }
        }
    }

    /// Waits until `limit` for an event named `name` whose `data` satisfies `matches`; returns
    /// it. Events seen earlier (while a command ran) count; the ones that do not match are
    /// kept for later waits.
    pub fn wait_event(&mut self, name: &str, matches: impl Fn(&Value) -> bool, limit: Duration) -> Result<Value> {
        let is_it = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(is_it) {
            return Ok(self.events.remove(i).unwrap_or_default());
        }
        let deadline = Instant::now() + limit;
        loop {
            let message = self.read_message(deadline).with_context(|| format!("waiting for QMP event {name}"))?;
            if is_it(&message) {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            }
        }
    }

    /// The next message, whatever it is; fails at `deadline` or when QEMU closes the socket.
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => bail!("QMP connection closed (QEMU exited?)"),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    return serde_json::from_slice(&line)
                        .with_context(|| format!("parsing QMP message {:?}", String::from_utf8_lossy(&line)));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e).context("reading from QMP"),
            }
            if Instant::now() > deadline {
                bail!("no QMP message before the deadline");
            }
        }
    }
}
