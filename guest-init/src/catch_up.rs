//! Catching a restored guest up with the host (the wall clock, the entropy pool, the host name,
//! env for later execs), asked for on the control console before the workload starts or by the
//! host through the agent.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::RwLock;

use agent_protocol::RestoredInfo;

use crate::process::ExecDefaults;

/// Catches a restored guest up with the host: steps the clock, reseeds the entropy pool, sets
/// the host name, adds env for later execs. Everything is tried; the failures are joined.
pub fn apply_restored(info: RestoredInfo, defaults: &RwLock<ExecDefaults>) -> Result<(), String> {
    let mut failures = Vec::new();
    if info.unix_time_ns > 0 {
        let ts = libc::timespec {
            tv_sec: (info.unix_time_ns / 1_000_000_000) as _,
            tv_nsec: (info.unix_time_ns % 1_000_000_000) as _,
        };
        // SAFETY: clock_settime reads the timespec we own.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            failures.push(format!("clock: {}", io::Error::last_os_error()));
        }
    }
    if !info.entropy.is_empty() {
        if let Err(e) = reseed_entropy(&info.entropy) {
            failures.push(format!("entropy: {e}"));
        }
    }
    if let Some(h) = info.hostname.as_deref().filter(|h| !h.is_empty()) {
        // SAFETY: sethostname reads `len` bytes from the string we own.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            failures.push(format!("hostname: {}", io::Error::last_os_error()));
        }
    }
    {
        let mut d = defaults.write().unwrap_or_else(|e| e.into_inner());
        d.env.extend(info.env);
        if let Some(h) = info.hostname.filter(|h| !h.is_empty()) {
            d.hostname = h;
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// `RNDADDENTROPY` with the host's bytes (credited), then `RNDRESEEDCRNG` so that the very next
/// read from /dev/urandom or getrandom() no longer derives from the snapshot's pool.
fn reseed_entropy(bytes: &[u8]) -> io::Result<()> {
    // linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let bytes = &bytes[..bytes.len().min(512)];
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the u32 array whole.
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    // SAFETY: the ioctl reads a rand_pool_info header and `buf_size` bytes after it, all
    // inside `info`, which lives across the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an argument-less ioctl on our descriptor.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
