//! The guest's consoles as `run` wires them: init's ready line and catch-up answers on the
//! control console, and the tail of the kernel console kept for error messages.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Watches the control console's output for init's "ready" line (and notes when it came).
/// (seen, bytes so far) under a lock, with a condition variable to wait on.
pub(super) type ReadyState = Arc<(Mutex<(bool, Vec<u8>)>, std::sync::Condvar)>;

#[derive(Clone, Default)]
pub(super) struct ReadySignal(
    pub(super) ReadyState,
    pub(super) Arc<Mutex<Option<std::time::Instant>>>,
);

impl Write for ReadySignal {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let (lock, cv) = &*self.0;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        if !st.0 {
            st.1.extend_from_slice(b);
            let marker = guest_init::GUEST_READY.as_bytes();
            if st.1.windows(marker.len()).any(|w| w == marker) {
                st.0 = true;
                *self.1.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
                st.1.clear();
                cv.notify_all();
            } else if st.1.len() > 4096 {
                st.1.clear();
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ReadySignal {
    /// Waits until init is ready or `limit` passes; true if ready.
    pub(super) fn wait_timeout(&self, limit: std::time::Duration) -> bool {
        let (lock, cv) = &*self.0;
        let deadline = std::time::Instant::now() + limit;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !st.0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            st = cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub(super) fn wait(&self) {
        let (lock, cv) = &*self.0;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !st.0 {
            st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Init's answer to a [`ControlMessage::Restored`] on the control console: `None` until it
/// came, then `Ok` or the reason it failed; and whether init said it holds the workload.
/// (the partial line so far, the answer) under a lock, with a condition variable to wait on.
pub(super) type CatchUpState = Arc<(
    Mutex<(Vec<u8>, Option<Result<(), String>>, bool)>,
    std::sync::Condvar,
)>;

#[derive(Clone, Default)]
pub(super) struct CatchUp(pub(super) CatchUpState);

impl CatchUp {
    /// Looks for the answer line in what the control console printed.
    pub(super) fn scan(&self, b: &[u8]) {
        let (lock, cv) = &*self.0;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        if st.1.is_some() {
            return;
        }
        for &c in b {
            if st.1.is_some() {
                break;
            }
            if c != b'\n' {
                if st.0.len() < 4096 {
                    st.0.push(c);
                }
                continue;
            }
            let line = String::from_utf8_lossy(&st.0).into_owned();
            st.0.clear();
            if line == guest_init::CAUGHT_UP.trim_end() {
                st.1 = Some(Ok(()));
            } else if let Some(why) = line.strip_prefix(guest_init::CATCH_UP_FAILED) {
                st.1 = Some(Err(why.to_string()));
            } else if line == guest_init::HELD.trim_end() {
                st.2 = true;
            } else {
                continue;
            }
            cv.notify_all();
        }
    }

    /// Whether init said it holds the workload until started.
    pub(super) fn is_held(&self) -> bool {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    /// Waits for the answer, at most `limit`.
    pub(super) fn wait(&self, limit: std::time::Duration) -> Result<(), String> {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (st, _) = cv
            .wait_timeout_while(guard, limit, |st| st.1.is_none())
            .unwrap_or_else(|e| e.into_inner());
        st.1.clone()
            .unwrap_or_else(|| Err(format!("init did not answer within {limit:?}")))
    }
}

/// The control console's output: init's ready line and its catch-up answers.
pub(super) struct ControlOutput {
    pub(super) ready: ReadySignal,
    pub(super) catch_up: CatchUp,
}

impl Write for ControlOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.catch_up.scan(b);
        self.ready.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A bounded buffer of the guest's kernel console, for error messages.
#[derive(Clone, Default)]
pub(super) struct ConsoleTail(pub(super) Arc<Mutex<VecDeque<u8>>>);

impl Write for ConsoleTail {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.extend(b);
        let excess = t.len().saturating_sub(64 << 10);
        t.drain(..excess);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleTail {
    pub(super) fn last_lines(&self, n: usize) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let text =
            String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>()).replace('\r', "");
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let panic = lines.iter().find(|l| l.contains("Kernel panic"));
        let start = lines.len().saturating_sub(n);
        let mut out = String::new();
        if let Some(p) = panic {
            out.push_str(&format!("\n  {p}"));
        }
        for l in &lines[start..] {
            out.push_str(&format!("\n  | {l}"));
        }
        out
    }
}
