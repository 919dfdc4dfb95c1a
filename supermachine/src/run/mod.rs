//! `run`: an OCI image as a microVM with container semantics. The image's root filesystem is a
//! read-only disk, `guest-init` mounts it under an overlay and starts the workload; stdout and
//! stderr come back on separate virtio consoles, stdin goes in on the first, and the workload's
//! exit status is the VM's.

//!
//! The phases, each in its module: `plan` (a restore of a usable bake, or a boot), then in
//! `session` publishing ports and registering the VM, wiring its consoles (`consoles`) and
//! control, booting or restoring it (`start`), supervising it (signals: `signals`; bake readiness:
//! `ready`), and turning how it ended into a status. Bakes and their cache: `bakes`.

mod bakes;
mod consoles;
mod plan;
mod ready;
mod restart;
mod session;
mod signals;
mod start;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use guest_init::ControlMessage;

use crate::boot::BootError;
use crate::images::{self, ImageRecord, PullError, PullOptions};
use crate::VmExit;

pub use bakes::{bake_cache_dir, bake_key, list_bakes, BakeEntry, BakedWorkload};
#[cfg(test)]
use consoles::{CatchUp, ControlOutput, ReadySignal};
pub use restart::{InvalidRestartPolicy, RestartPolicy};
use session::run_registered;
#[cfg(test)]
use session::tls_ports;
pub use signals::RawTerminal;

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

/// One run (or bake) of an image: the VM's configuration ([`VmConfig`](crate::VmConfig), the
/// library's one options model) plus what only a run has (the image, how it is attached, a bake
/// or a snapshot to restore, signals).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The image reference.
    pub image: String,
    /// How the VM is made: memory, vCPUs, workload, env, user, ports, volumes, network…
    pub config: crate::VmConfig,
    /// Keep stdin open and connected.
    pub interactive: bool,
    /// Give the workload a terminal.
    pub tty: bool,
    /// Bake instead of run: boot, wait until the workload is ready, snapshot, stop.
    pub bake: Option<BakeOptions>,
    /// Restore this snapshot instead of booting (it must be a bake of the same image).
    pub snapshot: Option<std::path::PathBuf>,
    /// Forward SIGINT/SIGTERM (and SIGWINCH with a terminal) sent to this process to the
    /// workload, as the CLI does. A library embedding VMs leaves this off and stops them with
    /// [`StopHandle`].
    pub forward_signals: bool,
    /// Filled in once the VM runs: stops it from this process.
    pub stop_handle: Option<StopHandle>,
}

impl RunOptions {
    /// A run of `image` configured by `config`.
    pub fn new(image: &str, config: crate::VmConfig) -> RunOptions {
        RunOptions {
            image: image.into(),
            config,
            ..Default::default()
        }
    }

    /// What replaces the image's Cmd (empty: the image's own).
    pub fn command(&self) -> &[String] {
        match &self.config.workload {
            crate::Workload::Command(argv) => argv,
            _ => &[],
        }
    }

    /// Start the VM without its workload: init sets the container up and waits (exec through
    /// the agent works) until the VM is stopped. Restoring a `--before-start` bake idle leaves
    /// its workload unstarted; a bake of a running workload restores running.
    pub fn idle(&self) -> bool {
        self.config.workload == crate::Workload::Idle
    }

    /// The guest's host name: the one configured, else the VM's name (else its id, later).
    pub fn hostname(&self) -> Option<String> {
        self.config
            .hostname
            .clone()
            .or_else(|| self.config.name.clone())
    }
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
    /// Someone asked for a stop: a restart policy does not undo it.
    requested: bool,
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
        st.requested = true;
        let Some((control, vm, signal)) = st.running.clone() else {
            st.early = Some(Some(grace));
            return;
        };
        drop(st);
        // A paused workload could not hear its stop signal.
        vm.unpause();
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

    /// Whether a stop was asked for (a restart policy does not undo it).
    pub fn was_requested(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).requested
    }

    /// Records that the user asked for a stop carried out some other way (the host's signals).
    pub(crate) fn note_requested(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).requested = true;
    }

    /// Powers the VM off now.
    pub fn kill(&self) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.requested = true;
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

/// The image record for `opts.image`, pulled as the policy says.
pub fn resolve_image(
    opts: &RunOptions,
    progress: bool,
) -> Result<(images::Store, ImageRecord), RunError> {
    let store = images::store()?;
    let local = images::find(&store, &opts.image)?;
    let record = match (opts.config.pull, local) {
        (PullPolicy::Never, None) => return Err(RunError::NotLocal(opts.image.clone())),
        (PullPolicy::Missing | PullPolicy::Never, Some(r)) => r,
        (PullPolicy::Always, _) | (PullPolicy::Missing, None) => {
            let mut pull = PullOptions {
                progress,
                ..Default::default()
            };
            pull.client.insecure_registries = opts.config.insecure_registries.clone();
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

/// Entrypoint + Cmd with Docker's override rules.
pub fn command_line(image: &oci_bake::config::RunConfig, opts: &RunOptions) -> Vec<String> {
    let entrypoint: Vec<String> = match &opts.config.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint.clone(),
    };
    let cmd = if !opts.command().is_empty() {
        opts.command().to_vec()
    } else if opts.config.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    entrypoint.into_iter().chain(cmd).collect()
}

/// Runs the image; returns the workload's exit status. The VM is in the registry
/// ([`crate::vms`]) while it runs, and afterwards with [`VmConfig::keep_after_exit`](crate::VmConfig::keep_after_exit).
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
    let (id, name, dir) = match &opts.config.reserved_id {
        Some(id) => registry.reserved(id)?,
        None => registry.create(opts.config.name.as_deref())?,
    };
    let result = if opts.config.restart == RestartPolicy::No || opts.bake.is_some() {
        run_registered(opts, &id, &name, &dir, stdout, stderr, stdin)
    } else {
        run_restarting(opts, &id, &name, &dir, stdout, stderr, stdin)
    };
    let recorded = dir.record().ok().map(|mut r| {
        r.exit_code = Some(result.as_ref().map(|r| r.0).unwrap_or(125));
        r
    });
    match recorded {
        Some(r) if opts.config.keep_after_exit => {
            let _ = dir.save(&r);
        }
        _ => {
            let _ = registry.remove(&dir, &id, &name);
        }
    }
    result
}

/// Runs until the workload ends for good under `opts`' restart policy; each restart starts the
/// VM anew (restored from its bake, or booted) under the same name, ports and logs, and counts
/// in its record.
fn run_restarting(
    opts: &RunOptions,
    id: &str,
    name: &str,
    dir: &crate::vms::VmDir,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    mut stdin: Option<Box<dyn Read + Send>>,
) -> Result<(i32, Option<std::path::PathBuf>), RunError> {
    // One stop handle across the runs, so that a stop between two is seen.
    let stopper = opts.stop_handle.clone().unwrap_or_default();
    let mut each = opts.clone();
    each.stop_handle = Some(stopper.clone());
    let (stdout, stderr) = (SharedWriter::new(stdout), SharedWriter::new(stderr));
    // The host's stop signals between two runs too (each run forwards them while it runs).
    let signalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if opts.forward_signals {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let _ = signal_hook::flag::register(sig, signalled.clone());
        }
    }
    let stopped = || stopper.was_requested() || signalled.load(std::sync::atomic::Ordering::SeqCst);
    let mut restarts = 0u32;
    loop {
        let result = run_registered(
            &each,
            id,
            name,
            dir,
            Box::new(stdout.clone()),
            Box::new(stderr.clone()),
            stdin.take(),
        );
        let status = result.as_ref().ok().map(|r| r.0);
        if !opts
            .config
            .restart
            .restarts_after(status, restarts, stopped())
        {
            return result;
        }
        let why = match &result {
            Ok((status, _)) => format!("exited with {status}"),
            Err(e) => e.to_string(),
        };
        let until = std::time::Instant::now() + RestartPolicy::delay(restarts);
        while std::time::Instant::now() < until && !stopped() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if stopped() {
            return result;
        }
        restarts += 1;
        let _ = writeln!(
            stderr.clone(),
            "supermachine: the workload {why}; restart {restarts} ({})",
            opts.config.restart
        );
        if let Ok(mut record) = dir.record() {
            record.restarts = restarts;
            let _ = dir.save(&record);
        }
    }
}

/// One writer shared by the successive runs of a restarting VM.
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    fn new(inner: Box<dyn Write + Send>) -> Self {
        SharedWriter(Arc::new(Mutex::new(inner)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
        let opts = |command: &[&str], entrypoint: Option<&str>| {
            let mut config = crate::VmConfig::new().command(command.iter().copied());
            if let Some(e) = entrypoint {
                config = config.entrypoint(e);
            }
            RunOptions::new("image", config)
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
