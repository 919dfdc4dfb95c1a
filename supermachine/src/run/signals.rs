//! The host side of a foreground run: the host's signals forwarded to the workload, the host
//! terminal's size and raw mode.

use std::sync::{Arc, Mutex};

use guest_init::ControlMessage;

use crate::VmExit;

use super::*;

/// SIGINT/SIGTERM to this process: the image's stop signal (SIGINT stays SIGINT, as Docker
/// forwards it) to the workload; if it has not exited after `grace`, power the VM off. A
/// second SIGINT/SIGTERM powers it off at once.
/// With a terminal, SIGWINCH resizes the workload's terminal to the host's.
pub(super) fn forward_host_signals(
    stop_signal: &str,
    control: Arc<Mutex<Option<devices::virtio::console::ConsoleInput>>>,
    vm: crate::VmControl,
    stopper: StopHandle,
    tty: bool,
    grace: std::time::Duration,
) -> Option<SignalsGuard> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGWINCH};
    let stop = signal_number(stop_signal);
    let watched: &[i32] = if tty {
        &[SIGINT, SIGTERM, SIGWINCH]
    } else {
        &[SIGINT, SIGTERM]
    };
    let Ok(mut signals) = signal_hook::iterator::Signals::new(watched) else {
        return None;
    };
    let guard = SignalsGuard(signals.handle());
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stop_sent = false;
            for sig in signals.forever() {
                if sig == SIGWINCH {
                    // The host terminal was resized: so is the workload's (it gets SIGWINCH).
                    let size = host_terminal_size();
                    if let (Some((rows, cols)), Some(c)) = (
                        size,
                        control.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
                    ) {
                        c.push(ControlMessage::Resize(rows, cols).encode().as_bytes());
                    }
                    continue;
                }
                if stop_sent {
                    vm.request_exit(VmExit::Stopped);
                    continue;
                }
                stop_sent = true;
                // A restart policy must not undo this stop.
                stopper.note_requested();
                // A paused workload could not hear its stop signal.
                vm.unpause();
                let deliver = if sig == SIGINT { SIGINT } else { stop };
                if let Some(c) = control.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    c.push(ControlMessage::Signal(deliver).encode().as_bytes());
                }
                let vm = vm.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(grace);
                    vm.request_exit(VmExit::Stopped);
                });
            }
        });
    Some(guard)
}

/// Ends the signal-forwarding thread of one run when dropped (a restarting VM has one per run).
pub(super) struct SignalsGuard(signal_hook::iterator::Handle);

impl Drop for SignalsGuard {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The size of the terminal on stdout (or stdin), if there is one.
pub(super) fn host_terminal_size() -> Option<(u16, u16)> {
    for fd in [1, 0] {
        let mut ws: libc::winsize = empty_winsize();
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

pub(super) fn empty_winsize() -> libc::winsize {
    libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Puts the host terminal on stdin in raw mode (keys, ^C included, go to the guest's terminal)
/// until dropped.
pub struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    /// Raw mode on stdin when it is a terminal; a no-op otherwise.
    pub fn enable() -> RawTerminal {
        // SAFETY: tcgetattr/cfmakeraw/tcsetattr on fd 0 with a termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::isatty(0) != 1 || libc::tcgetattr(0, &mut t) != 0 {
                return RawTerminal(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawTerminal(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            // SAFETY: restoring the attributes read in `enable`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}
