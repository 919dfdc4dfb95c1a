//! Drives a [`BuiltVm`]'s vCPUs, one thread each, until the guest powers off, resets, or a vCPU
//! fails; then stops the others and returns why the VM ended.
//!
//! Each vCPU thread is a small state machine: it runs until an exit needs the VMM, and after
//! every exit checks whether the VM is stopping. The first vCPU (or device) to end the VM
//! records the reason in [`VmControl`]; the runner then kicks every vCPU until its thread exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::arch::host::{ArchVcpu, ArchVm, VcpuState, VmState};
use crate::builder::BuiltVm;
use crate::hypervisor::{HypervisorError, IoHandler, VcpuExit, VcpuKicker};
use crate::memory::GuestMemory;

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off; `Some(status)` if it reported an exit status first.
    PowerOff(Option<i32>),
    /// The guest reset the machine (e.g. `reboot`, or a kernel panic with `panic=-1`).
    Reset,
    /// A vCPU triple-faulted.
    Shutdown,
    /// The host asked the VM to stop.
    Stopped,
}

/// Why running a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A vCPU thread's set-up (see [`VmControl::set_vcpu_thread_setup`]) failed.
    #[error("vCPU {id}: setting up its thread: {detail}")]
    ThreadSetup {
        /// The vCPU.
        id: u8,
        /// What failed.
        detail: String,
    },
    /// The backend failed while running a vCPU.
    #[error("vCPU {id}: {source}")]
    Vcpu {
        /// The vCPU.
        id: u8,
        /// The backend error.
        #[source]
        source: HypervisorError,
    },
    /// The hypervisor could not emulate a guest instruction.
    #[error("vCPU {id}: the hypervisor could not emulate the guest ({reason}) at RIP {rip} (instruction bytes: {bytes})",
        rip = rip.map(|r| format!("{r:#x}")).unwrap_or_else(|| "unknown".into()),
        bytes = if instruction.is_empty() { "unreadable".to_string() } else {
            instruction.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ") })]
    Emulation {
        /// The vCPU.
        id: u8,
        /// What the hypervisor reported.
        reason: String,
        /// The guest instruction pointer.
        rip: Option<u64>,
        /// The bytes at it.
        instruction: Vec<u8>,
    },
    /// VM entry failed.
    #[error("vCPU {id}: VM entry failed: {detail}")]
    FailEntry {
        /// The vCPU.
        id: u8,
        /// What the hypervisor reported.
        detail: String,
    },
    /// An exit the VMM does not handle.
    #[error("vCPU {id}: unexpected exit {detail}")]
    UnexpectedExit {
        /// The vCPU.
        id: u8,
        /// The exit.
        detail: String,
    },
}

/// What [`VmControl::pause_and_capture`] returns: the vCPUs and the VM, stopped, and the guest
/// memory (unchanging until [`VmControl::resume`] or the end of the VM).
pub struct CapturedVm {
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, timers, clock.
    pub vm: VmState,
    /// Guest RAM.
    pub memory: GuestMemory,
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The VM ended (or was not running) before it could be paused.
    #[error("the VM is not running")]
    NotRunning,
    /// The VM is paused ([`VmControl::pause`]): unpause it first.
    #[error("the VM is paused")]
    Paused,
    /// [`VmControl::capture_paused`] needs the VM paused first.
    #[error("the VM is not paused")]
    NotPaused,
    /// The backend could not save a vCPU or the VM.
    #[error("saving the VM's state: {0}")]
    Backend(#[from] HypervisorError),
}

type CaptureReply = std::sync::mpsc::Sender<Result<CapturedVm, CaptureError>>;

/// A capture asked of the runner thread.
struct CaptureRequest {
    reply: CaptureReply,
    mode: CaptureMode,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CaptureMode {
    /// Park the vCPUs and save them; they run again on `resume`.
    Capture,
    /// Park them until `unpause` (a user's pause).
    Hold,
    /// They are held: save them and the VM again, now.
    WhileHeld,
}

/// vCPU threads park here while the VM is paused.
#[derive(Default)]
struct PauseState {
    requested: bool,
    /// Saved states of parked vCPUs, by index.
    saved: Vec<Option<Result<VcpuState, HypervisorError>>>,
    parked: usize,
    /// Paused by [`VmControl::pause`]: only [`VmControl::unpause`] lets the vCPUs go.
    held: bool,
    /// Bumped to have parked vCPUs save their state again ([`VmControl::capture_paused`]).
    generation: u64,
    /// Parked vCPUs that have saved their state for the current `generation`.
    resaved: usize,
}

impl PauseState {
    fn store(&mut self, index: usize, saved: Result<VcpuState, HypervisorError>) {
        if self.saved.len() <= index {
            self.saved.resize_with(index + 1, || None);
        }
        self.saved[index] = Some(saved);
    }

    /// Every vCPU's saved state, in index order.
    fn take_saved(&mut self) -> Result<Vec<VcpuState>, CaptureError> {
        self.saved
            .iter_mut()
            .map(|slot| match slot.take() {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(e.into()),
                None => Err(CaptureError::NotRunning),
            })
            .collect()
    }
}

struct ControlState {
    outcome: Mutex<Option<Result<VmExit, RunError>>>,
    changed: Condvar,
    stopping: AtomicBool,
    /// A pending [`VmControl::pause_and_capture`] (checked under `outcome`'s lock).
    capture: Mutex<Option<CaptureRequest>>,
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
    vcpu_thread_setup: Mutex<Option<VcpuThreadSetup>>,
}

/// Run on each vCPU thread before its vCPU first runs (e.g. to narrow the thread's system
/// calls); an error ends the VM before the guest runs.
pub type VcpuThreadSetup = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Shared by the runner, vCPU threads and devices: records how the VM ends.
#[derive(Clone)]
pub struct VmControl {
    state: Arc<ControlState>,
}

impl Default for VmControl {
    fn default() -> Self {
        VmControl {
            state: Arc::new(ControlState {
                outcome: Mutex::new(None),
                changed: Condvar::new(),
                stopping: AtomicBool::new(false),
                capture: Mutex::new(None),
                pause: Mutex::new(PauseState::default()),
                pause_changed: Condvar::new(),
                vcpu_thread_setup: Mutex::new(None),
            }),
        }
    }
}

impl VmControl {
    /// A fresh control for one VM run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Has [`run`] call `setup` on each vCPU thread before its vCPU first runs.
    pub fn set_vcpu_thread_setup(&self, setup: VcpuThreadSetup) {
        *self
            .state
            .vcpu_thread_setup
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(setup);
    }

    /// Ends the VM with `exit`, unless it is already ending.
    pub fn request_exit(&self, exit: VmExit) {
        self.finish(Ok(exit));
    }

    /// Records the guest's exit status and powers it off.
    pub fn power_off_with_status(&self, status: i32) {
        self.finish(Ok(VmExit::PowerOff(Some(status))));
    }

    fn finish(&self, outcome: Result<VmExit, RunError>) {
        let mut slot = self.state.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.state.stopping.store(true, Ordering::Release);
        self.state.changed.notify_all();
        // Parked vCPUs leave when the VM stops.
        let _p = self.state.pause.lock().unwrap_or_else(|e| e.into_inner());
        self.state.pause_changed.notify_all();
    }

    /// Pauses every vCPU between instructions and saves their state and the VM's. They stay
    /// paused (devices keep running: quiesce them before reading memory) until
    /// [`resume`](Self::resume) or the end of the VM. Blocks until done; call it from a thread
    /// other than the runner's and the vCPUs'.
    /// Refused with [`CaptureError::Paused`] while the VM is [paused](Self::pause).
    pub fn pause_and_capture(&self) -> Result<CapturedVm, CaptureError> {
        self.request_capture(CaptureMode::Capture)
    }

    /// With the VM [paused](Self::pause), has every vCPU save its state now and saves the
    /// VM's (interrupt controllers, clock). A snapshot pauses, quiesces its devices, then
    /// captures this way, so that an interrupt a device raised after the vCPUs stopped is in
    /// the saved state rather than lost between the two. The VM stays paused.
    pub fn capture_paused(&self) -> Result<CapturedVm, CaptureError> {
        self.request_capture(CaptureMode::WhileHeld)
    }

    fn request_capture(&self, mode: CaptureMode) -> Result<CapturedVm, CaptureError> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let _outcome = self.state.outcome.lock().unwrap_or_else(|e| e.into_inner());
            if self.is_stopping() {
                return Err(CaptureError::NotRunning);
            }
            *self.state.capture.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(CaptureRequest { reply: tx, mode });
            self.state.changed.notify_all();
        }
        rx.recv().unwrap_or(Err(CaptureError::NotRunning))
    }

    /// Lets vCPUs paused by [`pause_and_capture`](Self::pause_and_capture) run again (not
    /// those of a user's [`pause`](Self::pause)).
    pub fn resume(&self) {
        let mut p = self.state.pause.lock().unwrap_or_else(|e| e.into_inner());
        if !p.held {
            Self::release(&mut p);
            self.state.pause_changed.notify_all();
        }
    }

    fn release(p: &mut PauseState) {
        p.requested = false;
        p.parked = 0;
        p.saved.clear();
    }

    /// Stops every vCPU between instructions until [`unpause`](Self::unpause) or the end of
    /// the VM (what `docker pause` is to a container). Devices keep running, so host input is
    /// queued for the guest; captures are refused meanwhile. Blocks until every vCPU has
    /// stopped; nothing to do when already paused. Call it from a thread other than the
    /// runner's and the vCPUs'.
    pub fn pause(&self) -> Result<(), CaptureError> {
        match self.request_capture(CaptureMode::Hold) {
            Ok(_) | Err(CaptureError::Paused) => Ok(()),
            Err(e) => {
                // A failed save must not leave the vCPUs parked, held or not.
                self.unpause();
                self.resume();
                Err(e)
            }
        }
    }

    /// Ends a [`pause`](Self::pause); false if the VM was not paused.
    pub fn unpause(&self) -> bool {
        let mut p = self.state.pause.lock().unwrap_or_else(|e| e.into_inner());
        let was = p.held;
        if was {
            p.held = false;
            Self::release(&mut p);
            self.state.pause_changed.notify_all();
        }
        was
    }

    /// Whether the VM is [paused](Self::pause).
    pub fn is_paused(&self) -> bool {
        self.state
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held
    }

    fn pause_requested(&self) -> bool {
        self.state
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requested
    }

    /// On a vCPU thread: saves this vCPU's state and waits until resumed or stopped.
    fn park(&self, index: usize, vcpu: &mut dyn ArchVcpu) {
        let saved = vcpu.save_state();
        let mut p = self.state.pause.lock().unwrap_or_else(|e| e.into_inner());
        p.store(index, saved);
        p.parked += 1;
        self.state.pause_changed.notify_all();
        let mut generation = p.generation;
        while p.requested && !self.is_stopping() {
            if p.generation != generation {
                // Asked to save again (the devices are quiet now).
                generation = p.generation;
                drop(p);
                let saved = vcpu.save_state();
                p = self.state.pause.lock().unwrap_or_else(|e| e.into_inner());
                p.store(index, saved);
                p.resaved += 1;
                self.state.pause_changed.notify_all();
                continue;
            }
            p = self
                .state
                .pause_changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// True once the VM is ending.
    pub fn is_stopping(&self) -> bool {
        self.state.stopping.load(Ordering::Acquire)
    }

    /// Waits until the VM ends or someone asks for a capture.
    fn wait_for_event(&self) -> Event {
        let mut slot = self.state.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(outcome) = slot.take() {
                *slot = Some(Ok(VmExit::Stopped));
                return Event::Ended(outcome);
            }
            if let Some(request) = self
                .state
                .capture
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                return Event::Capture(request);
            }
            slot = self
                .state
                .changed
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    #[cfg(test)]
    fn wait(&self) -> Result<VmExit, RunError> {
        let mut slot = self.state.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(outcome) = slot.take() {
                // Leave a marker so later requests do not overwrite the first outcome.
                *slot = Some(Ok(VmExit::Stopped));
                return outcome;
            }
            slot = self
                .state
                .changed
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn vcpu_loop(index: usize, mut vcpu: Box<dyn ArchVcpu>, io: &dyn IoHandler, control: &VmControl) {
    let id = vcpu.id();
    while !control.is_stopping() {
        if control.pause_requested() {
            control.park(index, vcpu.as_mut());
            continue;
        }
        let outcome = match vcpu.run(io) {
            Ok(VcpuExit::Io | VcpuExit::Mmio | VcpuExit::Interrupted | VcpuExit::Hlt) => continue,
            Ok(VcpuExit::PowerOff) => Ok(VmExit::PowerOff(None)),
            Ok(VcpuExit::Reset) => Ok(VmExit::Reset),
            Ok(VcpuExit::Shutdown) => Ok(VmExit::Shutdown),
            Ok(VcpuExit::InternalError {
                reason,
                rip,
                instruction,
            }) => Err(RunError::Emulation {
                id,
                reason,
                rip,
                instruction,
            }),
            Ok(VcpuExit::FailEntry(detail)) => Err(RunError::FailEntry { id, detail }),
            Ok(VcpuExit::Unknown(detail)) => Err(RunError::UnexpectedExit { id, detail }),
            Err(source) => Err(RunError::Vcpu { id, source }),
        };
        control.finish(outcome);
    }
}

/// Runs `vm` until it ends. Devices end it through `control` (e.g. an exit-status port).
pub fn run(vm: BuiltVm, control: &VmControl) -> Result<VmExit, RunError> {
    let BuiltVm {
        vm,
        vcpus,
        buses,
        memory,
    } = vm;
    let mut threads = Vec::with_capacity(vcpus.len());
    // Each vCPU thread reports its index here as it ends, so the runner waits on a channel
    // rather than polling: a sleep would cost a whole timer tick per vCPU.
    let (ended_tx, ended_rx) = std::sync::mpsc::channel::<usize>();
    let setup = control
        .state
        .vcpu_thread_setup
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let setup = setup.clone();
        let kicker = vcpu.kicker();
        let io = buses.clone();
        let ctl = control.clone();
        let ended = ended_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .spawn(move || {
                match setup.map_or(Ok(()), |f| f()) {
                    Ok(()) => vcpu_loop(index, vcpu, &*io, &ctl),
                    Err(detail) => ctl.finish(Err(RunError::ThreadSetup {
                        id: vcpu.id(),
                        detail,
                    })),
                }
                let _ = ended.send(index);
            });
        match handle {
            Ok(h) => threads.push((Some(h), kicker)),
            Err(e) => {
                control.finish(Err(RunError::Spawn(e)));
                break;
            }
        }
    }
    drop(ended_tx);
    let outcome = loop {
        match control.wait_for_event() {
            Event::Ended(outcome) => break outcome,
            Event::Capture(request) => {
                let kickers: Vec<_> = threads.iter().map(|(_, k)| k.clone()).collect();
                let captured = match request.mode {
                    CaptureMode::WhileHeld => {
                        capture_held(control, kickers.len(), vm.as_ref(), &memory)
                    }
                    mode => capture(
                        control,
                        &kickers,
                        vm.as_ref(),
                        &memory,
                        mode == CaptureMode::Hold,
                    ),
                };
                let _ = request.reply.send(captured);
            }
        }
    };
    // A capture asked for as the VM ended gets its answer (NotRunning) instead of waiting.
    drop(
        control
            .state
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    let mut running = threads.len();
    for (_, kicker) in &threads {
        kicker.kick();
    }
    while running > 0 {
        match ended_rx.recv_timeout(KICK_RETRY) {
            Ok(index) => {
                if let Some(h) = threads[index].0.take() {
                    let _ = h.join();
                }
                running -= 1;
            }
            // A kick that lands while a vCPU is outside guest mode is lost: kick again.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                for (h, kicker) in &threads {
                    if h.is_some() {
                        kicker.kick();
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    outcome
}

/// Pauses the vCPUs (kicking until every one has parked) and collects the saved states; with
/// `hold`, they stay paused until [`VmControl::unpause`].
fn capture(
    control: &VmControl,
    kickers: &[Arc<dyn VcpuKicker>],
    vm: &dyn ArchVm,
    memory: &GuestMemory,
    hold: bool,
) -> Result<CapturedVm, CaptureError> {
    let mut p = control
        .state
        .pause
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // Parked vCPUs would not park again (nor save their state) for a second capture.
    if p.held {
        return Err(CaptureError::Paused);
    }
    p.requested = true;
    p.parked = 0;
    p.saved.clear();
    while p.parked < kickers.len() {
        if control.is_stopping() {
            return Err(CaptureError::NotRunning);
        }
        drop(p);
        for k in kickers {
            k.kick();
        }
        p = control
            .state
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if p.parked < kickers.len() {
            p = control
                .state
                .pause_changed
                .wait_timeout(p, KICK_RETRY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    let vcpus = p.take_saved()?;
    p.held = hold;
    drop(p);
    with_vm_state(vcpus, vm, memory)
}

/// The saved vCPUs with the VM's state and memory.
fn with_vm_state(
    vcpus: Vec<VcpuState>,
    vm: &dyn ArchVm,
    memory: &GuestMemory,
) -> Result<CapturedVm, CaptureError> {
    Ok(CapturedVm {
        vcpus,
        vm: vm.save_state()?,
        memory: memory.clone(),
    })
}

/// Has the held vCPUs save their state again and saves the VM's.
fn capture_held(
    control: &VmControl,
    vcpus: usize,
    vm: &dyn ArchVm,
    memory: &GuestMemory,
) -> Result<CapturedVm, CaptureError> {
    let mut p = control
        .state
        .pause
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !p.held {
        return Err(CaptureError::NotPaused);
    }
    p.generation += 1;
    p.resaved = 0;
    p.saved.iter_mut().for_each(|s| *s = None);
    control.state.pause_changed.notify_all();
    while p.resaved < vcpus {
        if control.is_stopping() {
            return Err(CaptureError::NotRunning);
        }
        p = control
            .state
            .pause_changed
            .wait_timeout(p, KICK_RETRY)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let states = p.take_saved()?;
    drop(p);
    with_vm_state(states, vm, memory)
}

enum Event {
    Ended(Result<VmExit, RunError>),
    Capture(CaptureRequest),
}

/// How long to wait for kicked vCPUs before kicking again.
const KICK_RETRY: Duration = Duration::from_millis(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins() {
        let c = VmControl::new();
        assert!(!c.is_stopping());
        c.power_off_with_status(3);
        c.request_exit(VmExit::Reset);
        assert!(c.is_stopping());
        assert_eq!(c.wait().unwrap(), VmExit::PowerOff(Some(3)));
        c.request_exit(VmExit::Reset);
        assert_eq!(c.wait().unwrap(), VmExit::Stopped);
    }
}
