//! [`VmStats`]: what a running VM uses, as `supermachine stats` shows it. The host side (CPU
//! time, resident and proportional memory) comes from the VM process's `/proc` files; the guest
//! side (memory in use, network and disk bytes) from the guest kernel's own counters, read
//! through the agent. Guest text is untrusted: it is read with a size cap and parsed without
//! trusting its shape (a line that does not parse counts as nothing).

use std::io::Write;
use std::time::{Duration, Instant};

/// One sample of a VM's use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStats {
    /// When it was taken (CPU use is the difference between two samples).
    pub sampled: Instant,
    /// CPU time of the process running the VM (vCPUs and devices), user and system.
    pub cpu_time: Duration,
    /// The VM process's resident memory, bytes (for a VM run through the library: the whole
    /// program's).
    pub host_rss: u64,
    /// Its proportional set size: pages shared with other VMs (a snapshot's memory file)
    /// count a share each, bytes.
    pub host_pss: u64,
    /// The guest kernel's counters; `None` while the VM is paused (its agent cannot answer).
    pub guest: Option<GuestUse>,
}

/// What the guest kernel counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestUse {
    /// The guest's memory, bytes.
    pub memory_total: u64,
    /// What the guest uses of it (total less what it could make available), bytes.
    pub memory_used: u64,
    /// Bytes received on its network interfaces (loopback aside).
    pub net_rx: u64,
    /// Bytes sent on them.
    pub net_tx: u64,
    /// Bytes read from its virtio disks.
    pub block_read: u64,
    /// Bytes written to them.
    pub block_written: u64,
}

impl VmStats {
    /// CPU use between `earlier` and this sample, in percent of one CPU (200 % is two busy
    /// vCPUs, as `docker stats` counts).
    pub fn cpu_percent_since(&self, earlier: &VmStats) -> f64 {
        let wall = self.sampled.saturating_duration_since(earlier.sampled);
        if wall.is_zero() {
            return 0.0;
        }
        let cpu = self.cpu_time.saturating_sub(earlier.cpu_time);
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    }
}

/// The most guest text one counter file may be (a hostile guest could send without end).
pub(crate) const GUEST_TEXT_CAP: usize = 1 << 20;

/// A writer that refuses to grow past [`GUEST_TEXT_CAP`].
#[derive(Default)]
pub(crate) struct Capped(pub(crate) Vec<u8>);

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > GUEST_TEXT_CAP {
            return Err(std::io::Error::other("the guest's counters are too long"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `n`th whitespace-separated field of `line` as a number (0 when it is not one).
fn field(line: &str, n: usize) -> u64 {
    line.split_whitespace()
        .nth(n)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// `/proc/meminfo`: (total, used) in bytes; used is total less `MemAvailable`.
pub(crate) fn parse_meminfo(text: &str) -> (u64, u64) {
    let kib = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .map_or(0, |l| field(l, 1).saturating_mul(1024))
    };
    let total = kib("MemTotal:");
    (total, total.saturating_sub(kib("MemAvailable:")))
}

/// `/proc/net/dev`: received and sent bytes over every interface but loopback.
pub(crate) fn parse_net_dev(text: &str) -> (u64, u64) {
    let (mut rx, mut tx) = (0u64, 0u64);
    for line in text.lines() {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        rx = rx.saturating_add(field(counters, 0));
        tx = tx.saturating_add(field(counters, 8));
    }
    (rx, tx)
}

/// `/proc/diskstats`: bytes read and written on whole virtio disks (`vda`, not `vda1`).
pub(crate) fn parse_diskstats(text: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for line in text.lines() {
        let Some(name) = line.split_whitespace().nth(2) else {
            continue;
        };
        let whole_virtio_disk = name
            .strip_prefix("vd")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase()));
        if !whole_virtio_disk {
            continue;
        }
        // Sectors of 512 bytes, whatever the disk's block size.
        read = read.saturating_add(field(line, 5).saturating_mul(512));
        written = written.saturating_add(field(line, 9).saturating_mul(512));
    }
    (read, written)
}

/// `/proc/PID/stat`: user plus system time, in clock ticks.
pub(crate) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields after its last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `/proc/PID/smaps_rollup`: (RSS, PSS) in bytes.
pub(crate) fn parse_smaps_rollup(text: &str) -> (u64, u64) {
    let kib = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .map_or(0, |l| field(l, 1).saturating_mul(1024))
    };
    (kib("Rss:"), kib("Pss:"))
}

/// The guest side, through `agent`.
pub(crate) fn guest_side(agent: &crate::agent::Agent) -> Result<GuestUse, crate::Error> {
    let read = |path: &str| -> Result<String, crate::Error> {
        let mut text = Capped::default();
        agent.read_file(path, &mut text)?;
        Ok(String::from_utf8_lossy(&text.0).into_owned())
    };
    let (memory_total, memory_used) = parse_meminfo(&read("/proc/meminfo")?);
    let (net_rx, net_tx) = parse_net_dev(&read("/proc/net/dev")?);
    let (block_read, block_written) = parse_diskstats(&read("/proc/diskstats")?);
    Ok(GuestUse {
        memory_total,
        memory_used,
        net_rx,
        net_tx,
        block_read,
        block_written,
    })
}

/// The host side of `pid`: (CPU time, RSS, PSS).
pub(crate) fn host_side(pid: u32) -> std::io::Result<(Duration, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat)
        .ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/stat: unexpected form")))?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second);
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let (rss, pss) = parse_smaps_rollup(&rollup);
    Ok((cpu, rss, pss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_counters_are_read_and_garbage_counts_as_nothing() {
        let meminfo = "MemTotal:         499856 kB\nMemFree:          400000 kB\nMemAvailable:     450000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (499_856 * 1024, 49_856 * 1024));
        let net = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  eth0: 123456     100    0    0    0     0          0         0    65432      90    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(net), (123_456, 65_432));
        let disks = " 254       0 vda 100 0 2048 50 10 0 4096 20 0 60 70 0 0 0 0 0 0\n 254       1 vda1 90 0 2000 40 10 0 4096 20 0 50 60 0 0 0 0 0 0\n   7       0 loop0 5 0 80 1 0 0 0 0 0 1 1 0 0 0 0 0 0\n 254      16 vdb 1 0 8 0 2 0 16 0 0 0 0\n";
        assert_eq!(
            parse_diskstats(disks),
            ((2048 + 8) * 512, (4096 + 16) * 512)
        );
        // A hostile guest's text: nothing panics, nothing overflows.
        for junk in [
            "",
            "\u{0}\u{0}:",
            "eth0: 99999999999999999999999999",
            "MemTotal: -5 kB",
            "vda",
            ": : :",
        ] {
            let _ = (
                parse_meminfo(junk),
                parse_net_dev(junk),
                parse_diskstats(junk),
            );
        }
        let huge = format!("MemTotal: {} kB\n", u64::MAX);
        assert_eq!(parse_meminfo(&huge).0, u64::MAX);
        let mut capped = Capped::default();
        assert!(capped.write_all(&vec![b'x'; GUEST_TEXT_CAP]).is_ok());
        assert!(capped.write_all(b"x").is_err());
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let stat = "1234 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 99";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let (_, rss, pss) = host_side(std::process::id()).unwrap();
        assert!(rss > 0 && pss > 0 && pss <= rss, "{rss} {pss}");
    }

    #[test]
    fn cpu_percent_is_cpu_time_over_wall_time() {
        let t0 = Instant::now();
        let sample = |at: Duration, cpu: Duration| VmStats {
            sampled: t0 + at,
            cpu_time: cpu,
            host_rss: 0,
            host_pss: 0,
            guest: None,
        };
        let a = sample(Duration::ZERO, Duration::from_millis(100));
        let b = sample(Duration::from_secs(1), Duration::from_millis(600));
        assert!((b.cpu_percent_since(&a) - 50.0).abs() < 1e-9);
        assert_eq!(a.cpu_percent_since(&a), 0.0);
    }
}
