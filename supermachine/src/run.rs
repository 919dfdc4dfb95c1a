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
    /// How long the workload has to exit after its stop signal before the VM is powered off
    /// (default [`STOP_GRACE`]).
    pub stop_timeout: Option<std::time::Duration>,
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
    let registry = crate::vms::Registry::open()?;
    let (id, name, dir) = match &opts.reserved_id {
        Some(id) => registry.reserved(id)?,
        None => registry.create(opts.name.as_deref())?,
    };
    let result = run_registered(opts, &id, &name, &dir, stdout, stderr, stdin);
    let recorded = dir.record().ok().map(|mut r| {
        r.exit_code = Some(*result.as_ref().unwrap_or(&125));
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

fn run_registered(
    opts: &RunOptions,
    id: &str,
    name: &str,
    dir: &crate::vms::VmDir,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<i32, RunError> {
    let started = std::time::Instant::now();
    let (store, record) = resolve_image(opts, true)?;
    let mut mappings = opts.publish.clone();
    if opts.publish_all {
        mappings.extend(crate::ports::PortMapping::for_exposed(
            &record.run_config.exposed_ports,
        ));
    }
    let published = mappings
        .into_iter()
        .map(crate::ports::bind)
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::Publish)?;
    let ports: Vec<String> = published
        .iter()
        .map(|p| format!("{}->{}/tcp", p.local, p.mapping.guest_port))
        .collect();
    if opts.publish_all {
        for p in &ports {
            eprintln!("supermachine: published {p}");
        }
    }
    dir.save(&crate::vms::VmRecord {
        id: id.into(),
        name: name.into(),
        image: opts.image.clone(),
        created: now_seconds(),
        pid: std::process::id(),
        pid_start: crate::vms::process_start(std::process::id()).unwrap_or(0),
        ports,
        detached: opts.reserved_id.is_some(),
        auto_remove: !opts.keep_record,
        exit_code: None,
    })?;
    let agent = crate::agent::Agent::new(dir.vsock());
    for p in published {
        p.forward(agent.clone());
    }
    let argv = command_line(&record.run_config, opts);
    if argv.is_empty() {
        return Err(RunError::NoCommand);
    }
    let mut env = record.run_config.env.clone();
    for e in &opts.env {
        match e.split_once('=') {
            Some(_) => env.push(e.clone()),
            None => {
                if let Ok(v) = std::env::var(e) {
                    env.push(format!("{e}={v}"));
                }
            }
        }
    }
    let workdir = opts
        .workdir
        .clone()
        .or_else(|| Some(record.run_config.working_dir.clone()).filter(|w| !w.is_empty()));
    let mut disks = vec![DiskSpec {
        path: store.rootfs_path(&record.rootfs),
        read_only: true,
    }];
    let mut volume_mounts = Vec::new();
    for v in &opts.volumes {
        let path = crate::volumes::prepare(v, opts.volume_size).map_err(RunError::Volume)?;
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
    let ready = ReadySignal::default();
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
            output: Box::new(ready),
            on_ready: Some(Box::new(move |c| {
                *control_input.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
            })),
        },
    ];
    let vm_control = crate::VmControl::new();
    forward_host_signals(
        &record.run_config.stop_signal,
        signal_control,
        vm_control.clone(),
        opts.tty,
        opts.stop_timeout.unwrap_or(STOP_GRACE),
    );
    let booting = std::time::Instant::now();
    // A guest that never comes up (a hung kernel, a broken init) is stopped, not waited on.
    let never_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let come_up_limit = opts.come_up_limit.unwrap_or(COME_UP_LIMIT);
    {
        let (ready, vm, never_up) = (ready_watch, vm_control.clone(), never_up.clone());
        std::thread::spawn(move || {
            if !ready.wait_timeout(come_up_limit) && !vm.is_stopping() {
                never_up.store(true, std::sync::atomic::Ordering::SeqCst);
                vm.request_exit(VmExit::Stopped);
            }
        });
    }
    let outcome = boot(BootOptions {
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
        snapshot: None,
    })?;
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
    match outcome.exit {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
