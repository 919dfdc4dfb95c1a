//! When a bake is ready to snapshot: a port that accepts, a command that succeeds, a log
//! line, a delay, or init holding the workload.

use std::io::Write;
use std::sync::Arc;

use super::consoles::*;
use super::*;

/// Passes output through and notes when a line matches a regular expression (`--ready-log`).
pub(super) struct LogWatch {
    pub(super) inner: Box<dyn Write + Send>,
    pub(super) pattern: regex::Regex,
    pub(super) line: Vec<u8>,
    pub(super) seen: Arc<std::sync::atomic::AtomicBool>,
}

impl Write for LogWatch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        if !self.seen.load(std::sync::atomic::Ordering::Relaxed) {
            for &c in &b[..n] {
                if c == b'\n' || self.line.len() >= 4096 {
                    if self.pattern.is_match(&String::from_utf8_lossy(&self.line)) {
                        self.seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    self.line.clear();
                } else {
                    self.line.push(c);
                }
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Waits until the bake's ready check passes; an error if the VM ends first or `limit` passes.
pub(super) fn wait_until_ready(
    check: &ReadyCheck,
    exposed: &[String],
    agent: &crate::agent::Agent,
    log_seen: &std::sync::atomic::AtomicBool,
    held: &CatchUp,
    vm: &crate::VmControl,
    limit: std::time::Duration,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let default_port = exposed
        .iter()
        .filter_map(|p| p.split('/').next()?.parse::<u16>().ok())
        .next();
    let check = match (check, default_port) {
        (ReadyCheck::Default, Some(port)) => ReadyCheck::Port(port),
        (c, _) => c.clone(),
    };
    loop {
        if vm.is_stopping() {
            return Err("the VM ended before the workload was ready".into());
        }
        if started.elapsed() > limit {
            return Err(format!(
                "the workload was not ready ({check}) within {} s",
                limit.as_secs()
            ));
        }
        let ready = match &check {
            ReadyCheck::Default => agent.ping().is_ok(),
            ReadyCheck::Port(p) => agent.connect(*p).is_ok(),
            ReadyCheck::Command(c) => {
                let req = agent_protocol::ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), c.clone()],
                    ..Default::default()
                };
                matches!(
                    agent.exec(req, None, &mut std::io::sink(), &mut std::io::sink()),
                    Ok(status) if status.code == 0
                )
            }
            ReadyCheck::Log(_) => log_seen.load(std::sync::atomic::Ordering::SeqCst),
            ReadyCheck::BeforeStart => held.is_held(),
            ReadyCheck::Delay(d) => {
                while started.elapsed() < *d && !vm.is_stopping() {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                !vm.is_stopping()
            }
        };
        if ready {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
