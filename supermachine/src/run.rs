//! `run`: an OCI image as a microVM with container semantics. The image's root filesystem is a
//! read-only disk, `guest-init` mounts it under an overlay and starts the workload; stdout and
//! stderr come back on separate virtio consoles, stdin goes in on the first, and the workload's
//! exit status is the VM's.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use guest_init::{ContainerConfig, ControlMessage};

use crate::boot::{boot, BootError, BootOptions, ConsoleSpec, DiskSpec};
use crate::images::{self, ImageRecord, PullError, PullOptions};
use crate::paths;
use crate::VmExit;

/// When to pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Only when the image is not in the store.
    #[default]
    Missing,
    /// Every time.
    Always,
    /// Never: fail if missing.
    Never,
}

/// What to run and how (Docker's `run` options).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The image reference.
    pub image: String,
    /// When to pull it.
    pub pull: PullPolicy,
    /// Overrides the image's Cmd (arguments after the image name).
    pub command: Vec<String>,
    /// Overrides the image's Entrypoint (`Some("")` clears it).
    pub entrypoint: Option<String>,
    /// `NAME=value`, or `NAME` to take the host's value.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User.
    pub user: Option<String>,
    /// Host name (default: a random 12-hex-digit id).
    pub hostname: Option<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Keep stdin open and connected.
    pub interactive: bool,
    /// Give the workload a terminal.
    pub tty: bool,
    /// Show the kernel log on stderr.
    pub debug: bool,
    /// Block volumes.
    pub volumes: Vec<crate::volumes::VolumeSpec>,
    /// Size of volumes created on first use, in bytes.
    pub volume_size: u64,
    /// How long the guest may take to start the workload before it is stopped and reported
    /// (default [`COME_UP_LIMIT`]).
    pub come_up_limit: Option<std::time::Duration>,
    /// A name for the VM in the registry (`ps`, `exec NAME`); default: generated.
    pub name: Option<String>,
    /// Use this registry entry, already reserved with [`crate::vms::Registry::create`] (how a
    /// detached VM's process learns its id).
    pub reserved_id: Option<String>,
    /// Keep the VM's registry record (logs, exit status) after it exits, until `rm`.
    pub keep_record: bool,
    /// Published ports.
    pub publish: Vec<crate::ports::PortMapping>,
    /// Publish every port the image exposes on a free host port.
    pub publish_all: bool,
    /// Terminate TLS on the host: on the published ports marked `/tls`, or on every published
    /// port when none is marked.
    pub tls: Option<crate::tls::TlsTermination>,
    /// How long the workload has to exit after its stop signal before the VM is powered off
    /// (default [`STOP_GRACE`]).
    pub stop_timeout: Option<std::time::Duration>,
    /// Bake instead of run: boot, wait until the workload is ready, snapshot, stop.
    pub bake: Option<BakeOptions>,
    /// Restore this snapshot instead of booting (it must be a bake of the same image).
    pub snapshot: Option<std::path::PathBuf>,
    /// Boot even when a bake of this image and configuration exists.
    pub no_restore: bool,
    /// Start the VM without its workload: init sets the container up and waits (exec through
    /// the agent works) until the VM is stopped. Restoring a `--before-start` bake idle leaves
    /// its workload unstarted; a bake of a running workload restores running.
    pub idle: bool,
    /// Forward SIGINT/SIGTERM (and SIGWINCH with a terminal) sent to this process to the
    /// workload, as the CLI does. A library embedding VMs leaves this off and stops them with
    /// [`StopHandle`].
    pub forward_signals: bool,
    /// Filled in once the VM runs: stops it from this process.
    pub stop_handle: Option<StopHandle>,
    /// The guest's network (default: user-mode NAT, every destination allowed).
    pub network: crate::network::NetworkOptions,
}

/// Stops a VM run by this process: the workload gets the image's stop signal, and the VM is
/// powered off if the workload has not exited after the grace period (or at once with
/// [`StopHandle::kill`]). Clones share the VM.
#[derive(Clone, Default)]
pub struct StopHandle(Arc<Mutex<StopState>>);

/// The control console's input, once it is attached.
type ControlInput = Arc<Mutex<Option<devices::virtio::console::ConsoleInput>>>;

#[derive(Default)]
struct StopState {
    /// The control console, the VM, and the workload's stop signal.
    running: Option<(ControlInput, crate::VmControl, i32)>,
    /// Asked to stop before the VM ran: it stops as soon as it does.
    early: Option<Option<std::time::Duration>>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("StopHandle")
            .field("running", &st.running.is_some())
            .finish()
    }
}

impl StopHandle {
    fn attach(&self, control: ControlInput, vm: crate::VmControl, stop_signal: i32) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.running = Some((control, vm, stop_signal));
        if let Some(grace) = st.early.take() {
            drop(st);
            match grace {
                Some(grace) => self.stop(grace),
                None => self.kill(),
            }
        }
    }

    /// Sends the workload its stop signal; powers the VM off after `grace` if it still runs.
    pub fn stop(&self, grace: std::time::Duration) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some((control, vm, signal)) = st.running.clone() else {
            st.early = Some(Some(grace));
            return;
        };
        drop(st);
        let sent = control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.push(ControlMessage::Signal(signal).encode().as_bytes()))
            .is_some();
        if !sent || grace.is_zero() {
            vm.request_exit(VmExit::Stopped);
            return;
        }
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            vm.request_exit(VmExit::Stopped);
        });
    }

    /// Powers the VM off now.
    pub fn kill(&self) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &st.running {
            Some((_, vm, _)) => vm.request_exit(VmExit::Stopped),
            None => st.early = Some(None),
        }
    }
}

/// How `bake` decides that the workload is ready to be snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadyCheck {
    /// The first port the image exposes accepts connections in the guest; with no exposed
    /// port, the workload has started.
    #[default]
    Default,
    /// This TCP port accepts connections inside the guest.
    Port(u16),
    /// This command (`/bin/sh -c`) exits 0 in the guest (tried every 100 ms).
    Command(String),
    /// A line of the workload's stdout or stderr matches this regular expression.
    Log(String),
    /// This long after the workload started.
    Delay(std::time::Duration),
    /// Init has set everything up and holds the workload: each restore starts it, with the
    /// `-e` given to that `run`.
    BeforeStart,
}

impl std::fmt::Display for ReadyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyCheck::Default => write!(f, "default"),
            ReadyCheck::Port(p) => write!(f, "port {p}"),
            ReadyCheck::Command(c) => write!(f, "command {c:?}"),
            ReadyCheck::Log(r) => write!(f, "log /{r}/"),
            ReadyCheck::Delay(d) => write!(f, "delay {} ms", d.as_millis()),
            ReadyCheck::BeforeStart => write!(f, "before the workload starts"),
        }
    }
}

/// Where and when to bake.
#[derive(Debug, Clone, Default)]
pub struct BakeOptions {
    /// The snapshot directory (default: the bake cache, keyed by image and configuration).
    pub dir: Option<std::path::PathBuf>,
    /// When the workload counts as ready.
    pub ready: ReadyCheck,
    /// How long to wait for it (default [`BAKE_READY_LIMIT`]).
    pub ready_limit: Option<std::time::Duration>,
}

/// How long `bake` waits for the workload to be ready.
pub const BAKE_READY_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The workload a baked snapshot runs (kept in the snapshot's state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BakedWorkload {
    /// The image reference it was baked from.
    pub image: String,
    /// The image's manifest digest.
    pub manifest: String,
    /// The bake cache key (image and the configuration that a restore cannot change).
    pub key: String,
    /// The command line it runs.
    pub argv: Vec<String>,
    /// The image's stop signal.
    pub stop_signal: String,
    /// The ports the image exposes.
    pub exposed_ports: Vec<String>,
    /// Baked with a terminal.
    pub tty: bool,
    /// Baked with stdin open.
    pub interactive: bool,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The ready check that was met.
    pub ready: String,
    /// Snapshotted before the workload started: a restore starts it ([`ReadyCheck::BeforeStart`]).
    pub before_start: bool,
    /// When it was baked (Unix seconds).
    pub baked_at: u64,
    /// How long the bake took, boot to snapshot written (ms).
    pub bake_ms: u64,
    /// Baked with a network device (its host side and egress policy are chosen at restore).
    #[serde(default)]
    pub network: bool,
}

impl BakedWorkload {
    /// Its form in a snapshot's payload ([`MachineState::payload`](crate::snapshot::MachineState::payload)).
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The workload a snapshot's state carries, if it is a bake of an image (a payload that
    /// is not ours counts as none).
    pub fn of(state: &crate::snapshot::MachineState) -> Option<BakedWorkload> {
        serde_json::from_slice(state.payload.as_deref()?).ok()
    }
}

/// The bake cache key: the image and every setting a restore cannot change (command, user,
/// working directory, memory, vCPUs, terminal, kernel and initramfs builds). Environment is
/// not in it: `-e` at restore reaches processes started after the restore.
pub fn bake_key(
    record: &ImageRecord,
    opts: &RunOptions,
    argv: &[String],
    workdir: &Option<String>,
) -> String {
    use sha2::Digest;
    let identity = crate::snapshot::Identity::here(
        Some(&paths::default_kernel()),
        Some(&paths::default_initramfs()),
    );
    let material = serde_json::json!({
        "manifest": record.manifest.to_string(),
        "argv": argv,
        "workdir": workdir,
        "user": opts.user,
        "memory_mib": opts.memory_mib,
        "vcpus": opts.vcpus,
        "tty": opts.tty,
        "interactive": opts.interactive,
        "network": opts.network.has_device(),
        "identity": [identity.supermachine, identity.kernel, identity.initramfs],
    });
    let digest = sha2::Sha256::digest(material.to_string().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// A bake in the cache.
#[derive(Debug, Clone)]
pub struct BakeEntry {
    /// Its directory name (the cache key, or the name given with `bake --as`).
    pub name: String,
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// What it runs.
    pub workload: BakedWorkload,
    /// Space its files take on disk (the memory file is sparse).
    pub disk_bytes: u64,
}

/// The bakes in the cache, by name; unreadable ones are skipped.
pub fn list_bakes(store: &images::Store) -> Vec<BakeEntry> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(bake_cache_dir(store)) else {
        return Vec::new();
    };
    let mut bakes: Vec<BakeEntry> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let state: crate::snapshot::MachineState = snapshot::read_state(&dir).ok()?;
            let disk_bytes = [snapshot::STATE_FILE, snapshot::MEMORY_FILE]
                .iter()
                .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
                .map(|m| m.blocks() * 512)
                .sum();
            Some(BakeEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                workload: BakedWorkload::of(&state)?,
                dir,
                disk_bytes,
            })
        })
        .collect();
    bakes.sort_by(|a, b| a.name.cmp(&b.name));
    bakes
}

/// Where baked snapshots are kept: `<store>/bakes/<key>`.
pub fn bake_cache_dir(store: &images::Store) -> std::path::PathBuf {
    store.root().join("bakes")
}

/// Why `run` failed before the workload could report a status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The image could not be found or pulled.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// `--pull never` and the image is not in the store.
    #[error("image {0} not found locally (and --pull never)")]
    NotLocal(String),
    /// A volume could not be prepared.
    #[error(transparent)]
    Volume(crate::volumes::VolumeError),
    /// Neither the image nor the command line says what to run.
    #[error("no command specified (the image has no Entrypoint or Cmd)")]
    NoCommand,
    /// Booting the VM failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The VM registry refused (a name in use) or failed.
    #[error(transparent)]
    Registry(#[from] crate::vms::VmRegistryError),
    /// A published port could not be bound.
    #[error("{0}")]
    Publish(std::io::Error),
    /// TLS termination was asked for without what it needs.
    #[error("{0}")]
    Tls(String),
    /// The guest's network could not be set up.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// Baking failed.
    #[error("bake failed: {0}")]
    Bake(String),
    /// The snapshot cannot be restored with these options.
    #[error("cannot restore {dir}: {why}")]
    Restore {
        /// The snapshot.
        dir: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// The guest ended without reporting the workload's status.
    #[error("the VM ended without the workload's exit status ({why}){tail}")]
    NoStatus {
        /// How it ended.
        why: String,
        /// The last lines of the guest's kernel console.
        tail: String,
    },
}

/// Watches the control console's output for init's "ready" line (and notes when it came).
/// (seen, bytes so far) under a lock, with a condition variable to wait on.
type ReadyState = Arc<(Mutex<(bool, Vec<u8>)>, std::sync::Condvar)>;

#[derive(Clone, Default)]
struct ReadySignal(ReadyState, Arc<Mutex<Option<std::time::Instant>>>);

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
    fn wait_timeout(&self, limit: std::time::Duration) -> bool {
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

    fn wait(&self) {
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
type CatchUpState = Arc<(
    Mutex<(Vec<u8>, Option<Result<(), String>>, bool)>,
    std::sync::Condvar,
)>;

#[derive(Clone, Default)]
struct CatchUp(CatchUpState);

impl CatchUp {
    /// Looks for the answer line in what the control console printed.
    fn scan(&self, b: &[u8]) {
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
    fn is_held(&self) -> bool {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    /// Waits for the answer, at most `limit`.
    fn wait(&self, limit: std::time::Duration) -> Result<(), String> {
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
struct ControlOutput {
    ready: ReadySignal,
    catch_up: CatchUp,
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
struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

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
    fn last_lines(&self, n: usize) -> String {
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

/// The image record for `opts.image`, pulled as the policy says.
pub fn resolve_image(
    opts: &RunOptions,
    progress: bool,
) -> Result<(images::Store, ImageRecord), RunError> {
    let store = images::store()?;
    let local = images::find(&store, &opts.image)?;
    let record = match (opts.pull, local) {
        (PullPolicy::Never, None) => return Err(RunError::NotLocal(opts.image.clone())),
        (PullPolicy::Missing | PullPolicy::Never, Some(r)) => r,
        (PullPolicy::Always, _) | (PullPolicy::Missing, None) => {
            let pull = PullOptions {
                progress,
                ..Default::default()
            };
            images::pull(&store, &opts.image, &pull)?
        }
    };
    Ok((store, record))
}

/// How long the guest may take to come up (kernel boot and init's setup) before `run` gives up.
pub const COME_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long the workload has to exit after its stop signal before the VM is powered off.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Signal number of a stop signal name (`SIGTERM`, `TERM`, `15`); SIGTERM when unknown.
pub fn signal_number(name: &str) -> i32 {
    let n = name.trim().trim_start_matches("SIG");
    if let Ok(num) = n.parse::<i32>() {
        return num;
    }
    match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" | "" => 15,
        "WINCH" => 28,
        _ => 15,
    }
}

/// SIGINT/SIGTERM to this process: the image's stop signal (SIGINT stays SIGINT, as Docker
/// forwards it) to the workload; if it has not exited after `grace`, power the VM off. A
/// second SIGINT/SIGTERM powers it off at once.
/// With a terminal, SIGWINCH resizes the workload's terminal to the host's.
fn forward_host_signals(
    stop_signal: &str,
    control: Arc<Mutex<Option<devices::virtio::console::ConsoleInput>>>,
    vm: crate::VmControl,
    tty: bool,
    grace: std::time::Duration,
) {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGWINCH};
    let stop = signal_number(stop_signal);
    let watched: &[i32] = if tty {
        &[SIGINT, SIGTERM, SIGWINCH]
    } else {
        &[SIGINT, SIGTERM]
    };
    let Ok(mut signals) = signal_hook::iterator::Signals::new(watched) else {
        return;
    };
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
}

/// The size of the terminal on stdout (or stdin), if there is one.
fn host_terminal_size() -> Option<(u16, u16)> {
    for fd in [1, 0] {
        let mut ws: libc::winsize = empty_winsize();
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

fn empty_winsize() -> libc::winsize {
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

/// Entrypoint + Cmd with Docker's override rules.
pub fn command_line(image: &oci_bake::config::RunConfig, opts: &RunOptions) -> Vec<String> {
    let entrypoint: Vec<String> = match &opts.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint.clone(),
    };
    let cmd = if !opts.command.is_empty() {
        opts.command.clone()
    } else if opts.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    entrypoint.into_iter().chain(cmd).collect()
}

/// Runs the image; returns the workload's exit status. The VM is in the registry
/// ([`crate::vms`]) while it runs, and afterwards with [`RunOptions::keep_record`].
pub fn run(
    opts: &RunOptions,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<i32, RunError> {
    run_or_bake(opts, stdout, stderr, stdin).map(|(status, _)| status)
}

/// Bakes the image (`opts.bake` says where and when; the other options as for [`run`]): boots
/// it, waits until the workload is ready, snapshots it and stops. Returns the snapshot's
/// directory.
pub fn bake(
    opts: &RunOptions,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
) -> Result<std::path::PathBuf, RunError> {
    if opts.bake.is_none() {
        return Err(RunError::Bake("no bake options".into()));
    }
    match run_or_bake(opts, stdout, stderr, None)? {
        (_, Some(dir)) => Ok(dir),
        (status, None) => Err(RunError::Bake(format!("the workload exited with {status}"))),
    }
}

fn run_or_bake(
    opts: &RunOptions,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<(i32, Option<std::path::PathBuf>), RunError> {
    let registry = crate::vms::Registry::open()?;
    let (id, name, dir) = match &opts.reserved_id {
        Some(id) => registry.reserved(id)?,
        None => registry.create(opts.name.as_deref())?,
    };
    let result = run_registered(opts, &id, &name, &dir, stdout, stderr, stdin);
    let recorded = dir.record().ok().map(|mut r| {
        r.exit_code = Some(result.as_ref().map(|r| r.0).unwrap_or(125));
        r
    });
    match recorded {
        Some(r) if opts.keep_record => {
            let _ = dir.save(&r);
        }
        _ => {
            let _ = registry.remove(&dir, &id, &name);
        }
    }
    result
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What `run` starts: a snapshot, or a boot of the image.
enum Start {
    Restore {
        dir: std::path::PathBuf,
        loaded: Box<crate::snapshot::LoadedSnapshot>,
        workload: BakedWorkload,
    },
    Boot {
        store: images::Store,
        record: Box<ImageRecord>,
        argv: Vec<String>,
        workdir: Option<String>,
        key: String,
    },
}

/// Restore or boot: `--snapshot`, else (not baking, no `--no-restore`) a bake of this image and
/// configuration in the cache, else a boot.
fn plan(opts: &RunOptions) -> Result<Start, RunError> {
    let load = |dir: &std::path::Path| {
        crate::snapshot::load(
            dir,
            Some(&paths::default_kernel()),
            Some(&paths::default_initramfs()),
        )
        .map_err(|e| RunError::Boot(e.into()))
    };
    if let Some(dir) = &opts.snapshot {
        let loaded = load(dir)?;
        let workload = check_restorable(dir, &loaded, opts)?;
        return Ok(Start::Restore {
            dir: dir.clone(),
            loaded: Box::new(loaded),
            workload,
        });
    }
    let (store, record) = resolve_image(opts, true)?;
    crate::timings::mark("image_resolved");
    let argv = command_line(&record.run_config, opts);
    if argv.is_empty() {
        return Err(RunError::NoCommand);
    }
    let workdir = opts
        .workdir
        .clone()
        .or_else(|| Some(record.run_config.working_dir.clone()).filter(|w| !w.is_empty()));
    let key = bake_key(&record, opts, &argv, &workdir);
    crate::timings::mark("bake_key");
    let baked = bake_cache_dir(&store).join(&key);
    if opts.bake.is_none()
        && !opts.no_restore
        && opts.volumes.is_empty()
        && baked.join(snapshot::STATE_FILE).exists()
    {
        match load(&baked) {
            // An idle VM from a bake whose workload already runs would not be idle: boot.
            Ok(loaded)
                if opts.idle
                    && !BakedWorkload::of(&loaded.state).is_some_and(|w| w.before_start) => {}
            Ok(loaded) => {
                let workload = check_restorable(&baked, &loaded, opts)?;
                return Ok(Start::Restore {
                    dir: baked,
                    loaded: Box::new(loaded),
                    workload,
                });
            }
            // A bake made with another kernel or build: boot, and say why.
            Err(e) => eprintln!(
                "supermachine: not restoring the bake of {}: {e}",
                opts.image
            ),
        }
    }
    Ok(Start::Boot {
        store,
        record: Box::new(record),
        argv,
        workdir,
        key,
    })
}

/// What a restore cannot change: refused with the reason.
fn check_restorable(
    dir: &std::path::Path,
    loaded: &crate::snapshot::LoadedSnapshot,
    opts: &RunOptions,
) -> Result<BakedWorkload, RunError> {
    let bad = |why: &str| {
        Err(RunError::Restore {
            dir: dir.to_path_buf(),
            why: why.into(),
        })
    };
    let Some(w) = BakedWorkload::of(&loaded.state) else {
        return bad("it is not a bake of an image (make one with `supermachine bake`)");
    };
    if opts.idle && !w.before_start {
        return bad("its workload is running: an idle VM needs a bake made before the workload starts (bake --before-start)");
    }
    if w.tty != opts.tty {
        return bad(if w.tty {
            "it was baked with a terminal: run it with -t"
        } else {
            "it was baked without a terminal: run it without -t"
        });
    }
    if w.interactive != opts.interactive {
        return bad(if w.interactive {
            "it was baked with stdin open: run it with -i"
        } else {
            "it was baked with stdin closed: run it without -i (or bake with -i)"
        });
    }
    if !opts.volumes.is_empty() {
        return bad("volumes cannot be attached to a restored VM (bake and run without -v)");
    }
    if w.network != opts.network.has_device() {
        return bad(if w.network {
            "it was baked with a network device: run it with --network user or tap:IFACE"
        } else {
            "it was baked without a network: run it with --network none"
        });
    }
    Ok(w)
}

/// Passes output through and notes when a line matches a regular expression (`--ready-log`).
struct LogWatch {
    inner: Box<dyn Write + Send>,
    pattern: regex::Regex,
    line: Vec<u8>,
    seen: Arc<std::sync::atomic::AtomicBool>,
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
fn wait_until_ready(
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

/// The environment entries of `-e`: `NAME=value`, or `NAME` for the host's value.
fn env_entries(given: &[String]) -> Vec<String> {
    let mut env = Vec::new();
    for e in given {
        match e.split_once('=') {
            Some(_) => env.push(e.clone()),
            None => {
                if let Ok(v) = std::env::var(e) {
                    env.push(format!("{e}={v}"));
                }
            }
        }
    }
    env
}

/// The running VM's snapshotter and workload, once it runs (for `supermachine snapshot`).
type LiveVm = Arc<Mutex<Option<(crate::snapshot::Snapshotter, BakedWorkload)>>>;

/// Carries out a control-socket request on the running VM.
fn control_request(
    live: &LiveVm,
    stopper: &StopHandle,
    has_volumes: bool,
    request: crate::control::ControlRequest,
) -> crate::control::ControlReply {
    use crate::control::{ControlReply, ControlRequest};
    let error = |message: String| ControlReply::Error { message };
    match request {
        ControlRequest::Stop { grace_ms } => {
            stopper.stop(std::time::Duration::from_millis(grace_ms));
            ControlReply::Stopping
        }
        ControlRequest::Snapshot { dir, stop } => {
            if has_volumes {
                return error("volumes are not part of a snapshot: this VM has -v".into());
            }
            let Some((snapshotter, mut workload)) =
                live.lock().unwrap_or_else(|e| e.into_inner()).clone()
            else {
                return error("the VM is not running yet".into());
            };
            workload.baked_at = now_seconds();
            let after = if stop {
                crate::snapshot::AfterSnapshot::Stop
            } else {
                crate::snapshot::AfterSnapshot::Resume
            };
            match snapshotter.take(&dir, Some(workload.to_payload()), after) {
                Ok(dir) => ControlReply::Snapshot { dir },
                Err(e) => error(e.to_string()),
            }
        }
    }
}

/// Decides which published ports terminate TLS: those marked `/tls`, or all of them when TLS
/// is configured and none is marked. A mark without TLS configured, or TLS with no port to
/// serve, is an error.
fn tls_ports(mappings: &mut [crate::ports::PortMapping], configured: bool) -> Result<(), RunError> {
    let marked = mappings.iter().any(|m| m.tls);
    match (configured, marked) {
        (false, true) => Err(RunError::Tls(
            "a port marked /tls needs --tls-cert and --tls-key, or --tls-autogen".into(),
        )),
        (true, _) if mappings.is_empty() => Err(RunError::Tls(
            "TLS is configured but no port is published (give -p)".into(),
        )),
        (true, false) => {
            mappings.iter_mut().for_each(|m| m.tls = true);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What a bake produced (shared between the bake thread and `run`).
type BakeResult = Arc<Mutex<Option<Result<std::path::PathBuf, String>>>>;

fn run_registered(
    opts: &RunOptions,
    id: &str,
    name: &str,
    dir: &crate::vms::VmDir,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<(i32, Option<std::path::PathBuf>), RunError> {
    let started = std::time::Instant::now();
    crate::timings::mark("registered");
    let start = plan(opts)?;
    crate::timings::mark("planned");
    // A restore's VM is made on another thread meanwhile: nothing below needs it until the
    // restore itself.
    let restore_vm = match &start {
        Start::Restore { loaded, .. } if opts.bake.is_none() => {
            let (memory, vcpus) = (loaded.memory.clone(), loaded.state.vcpus.len() as u8);
            std::thread::Builder::new()
                .name("restore-vm".into())
                .spawn(move || crate::boot::create_restore_vm(&memory, vcpus))
                .ok()
        }
        _ => None,
    };
    if opts.bake.is_some() {
        if !opts.volumes.is_empty() {
            return Err(RunError::Bake(
                "volumes are not part of a snapshot: bake without -v".into(),
            ));
        }
        if !opts.publish.is_empty() || opts.publish_all || opts.tls.is_some() {
            return Err(RunError::Bake(
                "a bake publishes no ports: give -p to the `run` that restores it".into(),
            ));
        }
    }
    let (exposed, stop_signal, image) = match &start {
        Start::Restore { workload, .. } => (
            workload.exposed_ports.clone(),
            workload.stop_signal.clone(),
            workload.image.clone(),
        ),
        Start::Boot { record, .. } => (
            record.run_config.exposed_ports.clone(),
            record.run_config.stop_signal.clone(),
            opts.image.clone(),
        ),
    };
    let mut mappings = opts.publish.clone();
    if opts.publish_all {
        mappings.extend(crate::ports::PortMapping::for_exposed(&exposed));
    }
    tls_ports(&mut mappings, opts.tls.is_some())?;
    let published = mappings
        .into_iter()
        .map(crate::ports::bind)
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::Publish)?;
    let ports: Vec<String> = published
        .iter()
        .map(|p| {
            let proto = if p.mapping.tls { "tls" } else { "tcp" };
            format!("{}->{}/{proto}", p.local, p.mapping.guest_port)
        })
        .collect();
    if opts.publish_all {
        for p in &ports {
            eprintln!("supermachine: published {p}");
        }
    }
    dir.save(&crate::vms::VmRecord {
        id: id.into(),
        name: name.into(),
        image,
        created: now_seconds(),
        pid: std::process::id(),
        pid_start: crate::vms::process_start(std::process::id()).unwrap_or(0),
        ports,
        detached: opts.reserved_id.is_some() && opts.forward_signals,
        // The library's VMs share their program's process: never signal it.
        embedded: !opts.forward_signals,
        auto_remove: !opts.keep_record,
        exit_code: None,
    })?;
    crate::timings::mark("ports_bound");
    let agent = crate::agent::Agent::new(dir.vsock());
    let agent_gate = crate::ports::AgentGate::default();
    if let Some(tls) = &opts.tls {
        if let Some(pem) = tls.generated_certificate_pem() {
            let path = dir.path().join("tls-cert.pem");
            std::fs::write(&path, pem)
                .map_err(|e| RunError::Tls(format!("cannot write {}: {e}", path.display())))?;
            eprintln!(
                "supermachine: TLS with a self-signed certificate for localhost, SHA-256 {} (saved as {})",
                tls.fingerprint(),
                path.display()
            );
        }
    }
    // Listening until this returns.
    let _forwarding: Vec<crate::ports::Forwarding> = published
        .into_iter()
        .map(|p| {
            let tls = opts.tls.clone().filter(|_| p.mapping.tls);
            p.forward(agent.clone(), agent_gate.clone(), tls)
        })
        .collect();
    // `--ready-log`: watch the workload's output.
    let log_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stdout, stderr) = match opts.bake.as_ref().map(|b| &b.ready) {
        Some(ReadyCheck::Log(pattern)) => {
            let pattern = regex::Regex::new(pattern)
                .map_err(|e| RunError::Bake(format!("--ready-log: {e}")))?;
            let watch = |inner| -> Box<dyn Write + Send> {
                Box::new(LogWatch {
                    inner,
                    pattern: pattern.clone(),
                    line: Vec::new(),
                    seen: log_seen.clone(),
                })
            };
            (watch(stdout), watch(stderr))
        }
        _ => (stdout, stderr),
    };
    let tail = ConsoleTail::default();
    let serial: Box<dyn Write + Send> = if opts.debug {
        Box::new(std::io::stderr())
    } else {
        Box::new(tail.clone())
    };
    let control_input: Arc<Mutex<Option<devices::virtio::console::ConsoleInput>>> = Arc::default();
    let ci = control_input.clone();
    let signal_control = control_input.clone();
    let restore_control = control_input.clone();
    let ready = ReadySignal::default();
    let catch_up = CatchUp::default();
    let guest_ready = ready.clone();
    let ready_watch = ready.clone();
    let ready_at = ready.1.clone();
    let stdin_task: Option<Box<dyn FnOnce(devices::virtio::console::ConsoleInput) + Send>> =
        match stdin {
            Some(mut input) if opts.interactive => Some(Box::new(
                move |console: devices::virtio::console::ConsoleInput| {
                    let control = ci;
                    std::thread::spawn(move || {
                        // Input sent before init set its consoles to raw mode would be echoed.
                        guest_ready.wait();
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = input.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            let mut rest = &buf[..n];
                            while !rest.is_empty() {
                                let taken = console.push(rest);
                                rest = &rest[taken..];
                                if taken == 0 {
                                    std::thread::sleep(std::time::Duration::from_millis(1));
                                }
                            }
                        }
                        // Everything queued reaches the guest before the end-of-file does.
                        while console.pending() > 0 {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        loop {
                            if let Some(c) =
                                control.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                            {
                                c.push(ControlMessage::StdinEof.encode().as_bytes());
                                break;
                            }
                            // The control console is attached right after this one.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    });
                },
            )),
            _ => None,
        };
    let consoles = vec![
        ConsoleSpec {
            output: stdout,
            on_ready: stdin_task,
        },
        ConsoleSpec {
            output: stderr,
            on_ready: None,
        },
        ConsoleSpec {
            output: Box::new(ControlOutput {
                ready: ready.clone(),
                catch_up: catch_up.clone(),
            }),
            on_ready: Some(Box::new(move |c| {
                *control_input.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
            })),
        },
    ];
    let vm_control = crate::VmControl::new();
    // The library's handle, or our own for `supermachine stop` through the control socket.
    let stopper = opts.stop_handle.clone().unwrap_or_default();
    stopper.attach(
        signal_control.clone(),
        vm_control.clone(),
        signal_number(&stop_signal),
    );
    if opts.forward_signals {
        forward_host_signals(
            &stop_signal,
            signal_control,
            vm_control.clone(),
            opts.tty,
            opts.stop_timeout.unwrap_or(STOP_GRACE),
        );
    }
    let booting = std::time::Instant::now();
    // A guest that never comes up (a hung kernel, a broken init) is stopped, not waited on.
    let never_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let come_up_limit = opts.come_up_limit.unwrap_or(COME_UP_LIMIT);
    {
        let (ready, vm, never_up) = (ready_watch.clone(), vm_control.clone(), never_up.clone());
        // After a boot, init writes its ready line once the agent listens; a restore opens
        // the gate itself, after the clone caught up.
        let gate = matches!(start, Start::Boot { .. }).then(|| agent_gate.clone());
        std::thread::spawn(move || {
            if ready.wait_timeout(come_up_limit) {
                if let Some(gate) = gate {
                    gate.open();
                }
            } else if !vm.is_stopping() {
                never_up.store(true, std::sync::atomic::Ordering::SeqCst);
                vm.request_exit(VmExit::Stopped);
            }
        });
    }
    let baked: BakeResult = Arc::default();
    // `supermachine snapshot` of this VM, through its control socket.
    let live: LiveVm = Arc::default();
    // Served until this returns.
    let _control_server;
    {
        let live = live.clone();
        let has_volumes = !opts.volumes.is_empty();
        _control_server = crate::control::serve(&dir.control(), move |request| {
            control_request(&live, &stopper, has_volumes, request)
        })
        .map_err(|e| RunError::Publish(std::io::Error::other(format!("control socket: {e}"))))?;
    }
    crate::timings::mark("control_served");
    let outcome = match start {
        Start::Restore {
            dir: snapshot_dir,
            loaded,
            workload,
        } => {
            // Init came up before the snapshot.
            let _ = ready.clone().write_all(guest_init::GUEST_READY.as_bytes());
            // The agent's socket gets its public name only after the guest caught up (clock,
            // entropy, env), so nothing reaches a clone that still has the snapshot's.
            let public = dir.vsock();
            let restoring = public.with_extension("restoring");
            let _ = std::fs::remove_file(&restoring);
            let env = env_entries(&opts.env);
            let hostname = opts.hostname.clone().unwrap_or_else(|| id.to_string());
            let private = restoring.clone();
            let vm = vm_control.clone();
            let live = live.clone();
            let gate = agent_gate.clone();
            let (control, catch_up) = (restore_control, catch_up.clone());
            let before_start = workload.before_start;
            let idle = opts.idle;
            let start_env = env.clone();
            let on_started: Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send> =
                Box::new(move |snapshotter| {
                    *live.lock().unwrap_or_else(|e| e.into_inner()) = Some((snapshotter, workload));
                    let started_live = live.clone();
                    // Init reads it as soon as the vCPUs run: no connection to set up first.
                    let mut entropy = vec![0u8; 64];
                    let message = crate::agent::getrandom(&mut entropy).map(|()| {
                        ControlMessage::Restored(agent_protocol::RestoredInfo {
                            unix_time_ns: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_nanos() as u64)
                                .unwrap_or(0),
                            entropy,
                            env,
                            hostname: Some(hostname),
                        })
                        .encode()
                    });
                    let sent = match (
                        &message,
                        control.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
                    ) {
                        (Ok(line), Some(c)) => c.push(line.as_bytes()) == line.len(),
                        _ => false,
                    };
                    crate::timings::mark("vcpus_running");
                    if std::env::var_os("SUPERMACHINE_TIMINGS").is_some() {
                        // For `cargo xtask bench restore`: `run` called → vCPUs about to run.
                        eprintln!(
                            "timings: restore_call={:.2}",
                            started.elapsed().as_secs_f64() * 1e3
                        );
                    }
                    std::thread::spawn(move || {
                        let caught_up = if sent {
                            catch_up.wait(std::time::Duration::from_secs(30))
                        } else {
                            Err("cannot send it the host's clock and entropy".into())
                        };
                        if let Err(e) = caught_up {
                            // A clone with the snapshot's clock and entropy must not serve.
                            eprintln!("supermachine: the restored guest did not catch up: {e}");
                            vm.request_exit(VmExit::Stopped);
                            return;
                        }
                        if let Err(e) = std::fs::rename(&private, &public) {
                            eprintln!("supermachine: {}: {e}", public.display());
                            vm.request_exit(VmExit::Stopped);
                            return;
                        }
                        if before_start && !idle {
                            let start = ControlMessage::Start(start_env).encode();
                            let sent = control
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .as_ref()
                                .map(|c| c.push(start.as_bytes()) == start.len());
                            if sent != Some(true) {
                                eprintln!("supermachine: cannot start the held workload");
                                vm.request_exit(VmExit::Stopped);
                                return;
                            }
                            // A snapshot of this VM from now on has its workload running.
                            if let Some((_, w)) = started_live
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .as_mut()
                            {
                                w.before_start = false;
                                w.ready = "snapshot of a running VM".into();
                            }
                        }
                        gate.open();
                        crate::timings::mark("caught_up");
                    });
                });
            let vm = match restore_vm.map(|t| t.join()) {
                Some(Ok(made)) => made?,
                // The thread could not start or panicked: make it here.
                _ => {
                    crate::boot::create_restore_vm(&loaded.memory, loaded.state.vcpus.len() as u8)?
                }
            };
            crate::boot::restore_prepared(
                crate::boot::RestoreOptions {
                    dir: snapshot_dir,
                    kernel: None,
                    initramfs: None,
                    console: serial,
                    console_input: None,
                    control: Some(vm_control.clone()),
                    consoles,
                    vsock: Some(restoring),
                    net: opts.network.backend()?.map(crate::network::net_spec),
                    on_started: Some(on_started),
                    // A bake's only disk is its image's root filesystem, from the store.
                    disks: crate::boot::RestoreDisks {
                        given: Vec::new(),
                        read_only_dirs: vec![images::store()?.root().join("rootfs")],
                    },
                },
                *loaded,
                vm,
            )?
        }
        Start::Boot {
            store,
            record,
            argv,
            workdir,
            key,
        } => {
            let mut env = record.run_config.env.clone();
            env.extend(env_entries(&opts.env));
            let mut disks = vec![DiskSpec {
                path: store.rootfs_path(&record.rootfs),
                read_only: true,
            }];
            let mut volume_mounts = Vec::new();
            let mut shares = Vec::new();
            for v in &opts.volumes {
                match crate::volumes::prepare(v, opts.volume_size).map_err(RunError::Volume)? {
                    crate::volumes::Prepared::Disk(path) => {
                        // /dev/vda is the image; volumes follow in order.
                        volume_mounts.push(guest_init::MountSpec {
                            device: format!("/dev/vd{}", (b'a' + disks.len() as u8) as char),
                            target: v.target.clone(),
                            fstype: "ext4".into(),
                            read_only: v.read_only,
                        });
                        disks.push(DiskSpec {
                            path,
                            read_only: v.read_only,
                        });
                    }
                    crate::volumes::Prepared::Directory(dir) => {
                        let share = crate::boot::ShareSpec {
                            tag: format!("share{}", shares.len()),
                            dir,
                            read_only: v.read_only,
                        };
                        volume_mounts.push(guest_init::MountSpec {
                            device: share.tag.clone(),
                            target: v.target.clone(),
                            fstype: "virtiofs".into(),
                            read_only: v.read_only,
                        });
                        shares.push(share);
                    }
                }
            }
            let hold = opts.idle
                || matches!(
                    opts.bake.as_ref().map(|b| &b.ready),
                    Some(ReadyCheck::BeforeStart)
                );
            let container = ContainerConfig {
                rootfs_device: "/dev/vda".into(),
                rootfs_type: "squashfs".into(),
                user: opts
                    .user
                    .clone()
                    .unwrap_or_else(|| record.run_config.user.clone()),
                hostname: opts.hostname.clone().unwrap_or_else(|| id.to_string()),
                tty: opts.tty,
                interactive: opts.interactive,
                tty_size: if opts.tty { host_terminal_size() } else { None },
                stdout_device: "/dev/hvc0".into(),
                stderr_device: "/dev/hvc1".into(),
                control_device: "/dev/hvc2".into(),
                mounts: volume_mounts,
                hold_before_start: hold,
                network: opts.network.guest_config(),
            };
            let workload = BakedWorkload {
                image: opts.image.clone(),
                manifest: record.manifest.to_string(),
                key: key.clone(),
                argv: argv.clone(),
                stop_signal: record.run_config.stop_signal.clone(),
                exposed_ports: record.run_config.exposed_ports.clone(),
                tty: opts.tty,
                interactive: opts.interactive,
                memory_mib: opts.memory_mib,
                vcpus: opts.vcpus,
                ready: opts
                    .bake
                    .as_ref()
                    .map(|b| b.ready.to_string())
                    .unwrap_or_else(|| "snapshot of a running VM".into()),
                before_start: hold,
                baked_at: now_seconds(),
                bake_ms: 0,
                network: opts.network.has_device(),
            };
            let bake = opts.bake.as_ref().map(|bake| {
                let target = bake
                    .dir
                    .clone()
                    .unwrap_or_else(|| bake_cache_dir(&store).join(&key));
                let (check, limit) = (
                    bake.ready.clone(),
                    bake.ready_limit.unwrap_or(BAKE_READY_LIMIT),
                );
                let (agent, vm, log_seen, baked) = (
                    agent.clone(),
                    vm_control.clone(),
                    log_seen.clone(),
                    baked.clone(),
                );
                let (ready, exposed, workload, held) = (
                    ready_watch.clone(),
                    exposed.clone(),
                    workload.clone(),
                    catch_up.clone(),
                );
                move |snapshotter: crate::snapshot::Snapshotter| {
                    std::thread::spawn(move || {
                        if !ready.wait_timeout(come_up_limit) {
                            return;
                        }
                        let result = wait_until_ready(
                            &check, &exposed, &agent, &log_seen, &held, &vm, limit,
                        )
                        .and_then(|()| {
                            let mut workload = workload;
                            workload.bake_ms = booting.elapsed().as_millis() as u64;
                            workload.baked_at = now_seconds();
                            snapshotter
                                .take(
                                    &target,
                                    Some(workload.to_payload()),
                                    crate::snapshot::AfterSnapshot::Stop,
                                )
                                .map_err(|e| e.to_string())
                        });
                        if result.is_err() {
                            vm.request_exit(VmExit::Stopped);
                        }
                        *baked.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    });
                }
            });
            let live = live.clone();
            let on_started: Option<Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send>> = Some(
                Box::new(move |snapshotter: crate::snapshot::Snapshotter| {
                    *live.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((snapshotter.clone(), workload));
                    if let Some(bake) = bake {
                        bake(snapshotter);
                    }
                }),
            );
            boot(BootOptions {
                kernel: paths::default_kernel(),
                initramfs: Some(paths::default_initramfs()),
                extra_cmdline: if opts.debug {
                    String::new()
                } else {
                    "quiet".into()
                },
                memory_mib: opts.memory_mib,
                vcpus: opts.vcpus,
                command: argv,
                env,
                quiet: !opts.debug,
                console: serial,
                console_input: None,
                workdir,
                disks,
                container: Some(container),
                consoles,
                control: Some(vm_control),
                vsock: Some(dir.vsock()),
                net: opts.network.backend()?,
                shares,
                snapshot: None,
                on_started,
            })?
        }
    };
    if std::env::var_os("SUPERMACHINE_TIMINGS").is_some() {
        // For `cargo xtask bench run`: host preparation, VM start + kernel + init setup,
        // workload (init ready → VM end).
        let ended = std::time::Instant::now();
        let ready = ready_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(ended);
        let ms =
            |a: std::time::Instant, b: std::time::Instant| b.duration_since(a).as_secs_f64() * 1e3;
        eprintln!(
            "timings: prepare={:.1} boot={:.1} workload={:.1}",
            ms(started, booting),
            ms(booting, ready),
            ms(ready, ended)
        );
    }
    if opts.bake.is_some() {
        match baked.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(Ok(path)) => return Ok((0, Some(path))),
            Some(Err(why)) => return Err(RunError::Bake(why)),
            None => {}
        }
    }
    let status = match outcome.exit {
        VmExit::PowerOff(Some(status)) => Ok(status),
        VmExit::Stopped if never_up.load(std::sync::atomic::Ordering::SeqCst) => {
            Err(RunError::NoStatus {
                why: format!(
                    "the guest did not come up within {} s",
                    come_up_limit.as_secs()
                ),
                tail: tail.last_lines(8),
            })
        }
        // Stopped from the host after the grace period: as `docker stop` reports a kill.
        VmExit::Stopped => Ok(128 + 9),
        other => Err(RunError::NoStatus {
            why: match other {
                VmExit::Reset => "the guest reset; a kernel panic or init failure".into(),
                VmExit::Shutdown => "triple fault".into(),
                _ => "powered off".into(),
            },
            tail: tail.last_lines(8),
        }),
    }?;
    if opts.bake.is_some() {
        return Err(RunError::Bake(format!(
            "the workload exited with status {status} before it was ready"
        )));
    }
    Ok((status, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_goes_to_marked_ports_or_to_all_and_needs_a_certificate() {
        let parse = |specs: &[&str]| -> Vec<crate::ports::PortMapping> {
            specs.iter().map(|s| s.parse().unwrap()).collect()
        };
        let mut some = parse(&["8080:80", "8443:443/tls"]);
        tls_ports(&mut some, true).unwrap();
        assert_eq!(
            some.iter().map(|m| m.tls).collect::<Vec<_>>(),
            [false, true]
        );
        let mut none_marked = parse(&["8080:80", "8443:443"]);
        tls_ports(&mut none_marked, true).unwrap();
        assert!(none_marked.iter().all(|m| m.tls));
        let mut plain = parse(&["8080:80"]);
        tls_ports(&mut plain, false).unwrap();
        assert!(!plain[0].tls);
        let e = tls_ports(&mut parse(&["8443:443/tls"]), false).unwrap_err();
        assert!(e.to_string().contains("needs --tls-cert"), "{e}");
        let e = tls_ports(&mut [], true).unwrap_err();
        assert!(e.to_string().contains("no port is published"), "{e}");
    }

    #[test]
    fn catch_up_answers_are_found_across_writes_among_other_lines() {
        let c = CatchUp::default();
        let mut out = ControlOutput {
            ready: ReadySignal::default(),
            catch_up: c.clone(),
        };
        out.write_all(b"ready\nnoise\ncaught").unwrap();
        assert!(c.wait(std::time::Duration::from_millis(10)).is_err());
        out.write_all(b"-up\n").unwrap();
        assert_eq!(c.wait(std::time::Duration::from_millis(10)), Ok(()));
        assert!(out.ready.wait_timeout(std::time::Duration::ZERO));

        let failed = CatchUp::default();
        failed.scan(b"catch-up-failed clock: Operation not permitted\n");
        assert_eq!(
            failed.wait(std::time::Duration::ZERO),
            Err("clock: Operation not permitted".into())
        );
        let silent = CatchUp::default();
        let e = silent
            .wait(std::time::Duration::from_millis(5))
            .unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
    }

    #[test]
    fn stop_signal_names_and_numbers() {
        assert_eq!(signal_number("SIGTERM"), 15);
        assert_eq!(signal_number("SIGQUIT"), 3);
        assert_eq!(signal_number("INT"), 2);
        assert_eq!(signal_number("9"), 9);
        assert_eq!(signal_number(""), 15);
        assert_eq!(signal_number("SIGBOGUS"), 15);
    }

    #[test]
    fn docker_override_rules_for_the_command() {
        let image = oci_bake::config::RunConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..Default::default()
        };
        let opts = |command: &[&str], entrypoint: Option<&str>| RunOptions {
            command: command.iter().map(|s| s.to_string()).collect(),
            entrypoint: entrypoint.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(
            command_line(&image, &opts(&[], None)),
            ["/entry", "default"]
        );
        assert_eq!(command_line(&image, &opts(&["x"], None)), ["/entry", "x"]);
        assert_eq!(command_line(&image, &opts(&[], Some("/other"))), ["/other"]);
        assert_eq!(command_line(&image, &opts(&["a"], Some(""))), ["a"]);
        assert!(command_line(&image, &opts(&[], Some(""))).is_empty());
    }
}
