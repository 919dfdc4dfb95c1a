//! Start-up milestones for benchmarks: with `SUPERMACHINE_TIMINGS` set, each [`mark`] prints
//! `timings: at NAME=MS` on stderr, MS counted from `SUPERMACHINE_TIMINGS_T0` (Unix time in
//! nanoseconds, set by whoever spawned this process) or else from the first mark. Without the
//! variable a mark costs one environment lookup.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

fn origin() -> Option<u128> {
    static ORIGIN: OnceLock<Option<u128>> = OnceLock::new();
    *ORIGIN.get_or_init(|| {
        std::env::var_os("SUPERMACHINE_TIMINGS")?;
        std::env::var("SUPERMACHINE_TIMINGS_T0")
            .ok()
            .and_then(|v| v.parse().ok())
            .or_else(|| Some(now_ns()))
    })
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Records that `what` happened now (printed only when timings are on).
pub fn mark(what: &str) {
    if let Some(t0) = origin() {
        let ms = now_ns().saturating_sub(t0) as f64 / 1e6;
        eprintln!("timings: at {what}={ms:.1}");
    }
}
