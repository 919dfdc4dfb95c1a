//! [`VmConfig`] and [`Vm`]: one running microVM, driven from this process.
//!
//! The VM runs on threads of this process (vCPUs, devices, its published ports); it appears in
//! `supermachine ps` like any other while it runs. Stopping or dropping the [`Vm`] powers it
//! off and frees everything it held.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::exec::ExecBuilder;
use crate::ports::PortMapping;
use crate::run::{PullPolicy, RunError, RunOptions, StopHandle};
use crate::tls::TlsTermination;
use crate::volumes::VolumeSpec;

/// What the VM runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Workload {
    /// Nothing: the container is set up (root filesystem, env, user, volumes) and the VM waits
    /// for [`Vm::exec_builder`] until stopped. The sandbox case.
    #[default]
    Idle,
    /// The image's own Entrypoint and Cmd, as `supermachine run IMAGE` does.
    ImageCommand,
    /// This command instead of the image's Cmd (its Entrypoint still applies), as
    /// `supermachine run IMAGE CMD...` does.
    Command(Vec<String>),
}

/// How to start a VM. Defaults: 512 MiB, 1 vCPU, an idle sandbox, the image pulled when
/// missing, no published ports, no volumes.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub(crate) memory_mib: u32,
    pub(crate) vcpus: u8,
    pub(crate) env: Vec<String>,
    pub(crate) publish: Vec<PortMapping>,
    pub(crate) volumes: Vec<VolumeSpec>,
    pub(crate) volume_size: u64,
    pub(crate) pull: PullPolicy,
    pub(crate) insecure_registries: Vec<String>,
    pub(crate) restart: crate::run::RestartPolicy,
    pub(crate) health: Option<crate::HealthCheck>,
    pub(crate) workload: Workload,
    pub(crate) entrypoint: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) hostname: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) workdir: Option<String>,
    pub(crate) tls: Option<TlsTermination>,
    pub(crate) stop_timeout: Duration,
    pub(crate) start_timeout: Duration,
    pub(crate) boot_always: bool,
    pub(crate) network: crate::network::NetworkOptions,
    pub(crate) publish_all: bool,
    pub(crate) debug: bool,
    pub(crate) reserved_id: Option<String>,
    pub(crate) keep_after_exit: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 512,
            vcpus: 1,
            env: Vec::new(),
            publish: Vec::new(),
            volumes: Vec::new(),
            volume_size: 1 << 30,
            pull: PullPolicy::Missing,
            insecure_registries: Vec::new(),
            restart: crate::run::RestartPolicy::No,
            health: None,
            workload: Workload::Idle,
            entrypoint: None,
            name: None,
            hostname: None,
            user: None,
            workdir: None,
            tls: None,
            stop_timeout: crate::run::STOP_GRACE,
            start_timeout: crate::run::COME_UP_LIMIT,
            boot_always: false,
            network: crate::network::NetworkOptions::default(),
            publish_all: false,
            debug: false,
            reserved_id: None,
            keep_after_exit: false,
        }
    }
}

impl VmConfig {
    /// The defaults.
    pub fn new() -> VmConfig {
        VmConfig::default()
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n.max(1);
        self
    }

    /// Adds `NAME=value` to the workload's and every exec's environment (over the image's).
    /// On a restore it reaches processes started after it (and a before-start bake's workload).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push(format!("{name}={value}"));
        self
    }

    /// Publishes a guest TCP port on the host (`-p`).
    pub fn publish(mut self, mapping: PortMapping) -> Self {
        self.publish.push(mapping);
        self
    }

    /// Attaches a volume (`-v`; parse one with `"data:/data".parse()`): an existing host
    /// directory is shared (virtio-fs), a file or named volume is a block volume.
    pub fn volume(mut self, volume: VolumeSpec) -> Self {
        self.volumes.push(volume);
        self
    }

    /// Size of volumes created on first use (default 1 GiB).
    pub fn volume_size(mut self, bytes: u64) -> Self {
        self.volume_size = bytes;
        self
    }

    /// When to pull the image (default: when missing).
    pub fn pull(mut self, policy: PullPolicy) -> Self {
        self.pull = policy;
        self
    }

    /// Start the VM again when its workload ends, as the policy says (restored from its bake,
    /// or booted; same name, ports and logs, the count in [`crate::VmInfo::restarts`]). A stop
    /// never restarts.
    pub fn restart(mut self, policy: crate::run::RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Check the workload's health by running `check`'s command in the guest every interval;
    /// the state is in `ps`, `inspect` and [`crate::VmHandle::health`].
    pub fn health_check(mut self, check: crate::HealthCheck) -> Self {
        self.health = Some(check);
        self
    }

    /// Speak plain HTTP to this registry (`host:port`) when the image is pulled, as Docker's
    /// `insecure-registries` (registries.conf's `insecure = true` does the same).
    pub fn insecure_registry(mut self, host: &str) -> Self {
        self.insecure_registries.push(host.into());
        self
    }

    /// What the VM runs (default [`Workload::Idle`]).
    pub fn workload(mut self, workload: Workload) -> Self {
        self.workload = workload;
        self
    }

    /// Runs this command instead of the image's Cmd ([`Workload::Command`]).
    pub fn command<S: Into<String>>(self, argv: impl IntoIterator<Item = S>) -> Self {
        self.workload(Workload::Command(
            argv.into_iter().map(Into::into).collect(),
        ))
    }

    /// Overrides the image's Entrypoint (`""` clears it).
    pub fn entrypoint(mut self, entrypoint: &str) -> Self {
        self.entrypoint = Some(entrypoint.into());
        self
    }

    /// A name for the VM (`supermachine ps`); default generated.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The guest's host name (default: the VM's id).
    pub fn hostname(mut self, hostname: &str) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// The user processes run as (name, uid, `name:group`, `uid:gid`).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The working directory.
    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// The guest's network (default: the user-mode NAT, [`NetworkMode::User`]).
    ///
    /// [`NetworkMode::User`]: crate::network::NetworkMode::User
    pub fn network(mut self, mode: crate::network::NetworkMode) -> Self {
        self.network.mode = mode;
        self
    }

    /// Where the guest may connect (default: the public internet only, not the host's loopback,
    /// private networks or cloud metadata). [`EgressPolicy::None`] removes the
    /// network device.
    ///
    /// [`EgressPolicy::None`]: crate::network::EgressPolicy::None
    pub fn egress(mut self, policy: crate::network::EgressPolicy) -> Self {
        self.network.egress = policy;
        self
    }

    /// Terminates TLS on the published ports marked `/tls`, or on all of them when none is.
    pub fn tls(mut self, tls: TlsTermination) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long the workload has to exit after its stop signal on [`Vm::stop`] (default 10 s).
    pub fn stop_timeout(mut self, grace: Duration) -> Self {
        self.stop_timeout = grace;
        self
    }

    /// How long starting may take before it is given up (default 120 s).
    pub fn start_timeout(mut self, limit: Duration) -> Self {
        self.start_timeout = limit;
        self
    }

    /// Publishes every port the image exposes on a free host port (`-P`).
    pub fn publish_all(mut self, yes: bool) -> Self {
        self.publish_all = yes;
        self
    }

    /// Shows the guest kernel's log with the workload's stderr (`--debug`); a bake then
    /// shows the workload's output on this process's stderr.
    pub fn debug(mut self, yes: bool) -> Self {
        self.debug = yes;
        self
    }

    /// Runs as the VM `reserved` holds ([`crate::VmHandle::reserve`]): how a program starts
    /// a VM in another process of its own and finds it by name or id at once (`run -d`).
    pub fn reserved(mut self, reserved: &crate::VmHandle) -> Self {
        self.reserved_id = Some(reserved.id().into());
        self
    }

    /// Keeps the VM's record (in `ps -a`, with its exit status, and its name taken) after it
    /// ends, until removed ([`crate::VmHandle::remove`]); default: removed when it ends.
    pub fn keep_after_exit(mut self, yes: bool) -> Self {
        self.keep_after_exit = yes;
        self
    }

    /// Boot even when the bake cache holds a bake of this image and configuration (by
    /// default [`crate::Image::start`] restores it; `supermachine run --no-restore`).
    pub fn boot_always(mut self, yes: bool) -> Self {
        self.boot_always = yes;
        self
    }

    /// The `run` options for `image` (a snapshot directory when restoring).
    pub(crate) fn run_options(&self, image: &str, snapshot: Option<&Path>) -> Result<RunOptions> {
        self.network
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut opts = RunOptions::new(image, self.clone());
        opts.snapshot = snapshot.map(Path::to_path_buf);
        Ok(opts)
    }
}

/// The last bytes written to it (a workload's output, kept for errors and
/// [`Vm::workload_output`]).
#[derive(Clone, Default)]
pub(crate) struct Tail(Arc<Mutex<Vec<u8>>>);

/// How much of each output stream a [`Vm`] keeps.
const TAIL_LIMIT: usize = 1 << 20;

impl Write for Tail {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.extend_from_slice(b);
        if t.len() > TAIL_LIMIT {
            let cut = t.len() - TAIL_LIMIT;
            t.drain(..cut);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Tail {
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A running microVM. Operations go through its guest agent; [`Vm::stop`] (or drop) ends it.
pub struct Vm {
    id: String,
    name: String,
    pub(crate) agent: Agent,
    control_socket: PathBuf,
    stopper: StopHandle,
    run: Mutex<Option<JoinHandle<std::result::Result<i32, RunError>>>>,
    stdout: Tail,
    stderr: Tail,
    stop_timeout: Duration,
    exposed: Mutex<Vec<crate::ports::Forwarding>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish()
    }
}

impl Vm {
    pub(crate) fn start(image: &str, snapshot: Option<&Path>, config: &VmConfig) -> Result<Vm> {
        let registry = crate::vms::Registry::open()?;
        let (id, name, dir) = registry.create(config.name.as_deref())?;
        let mut opts = match config.run_options(image, snapshot) {
            Ok(o) => o,
            Err(e) => {
                let _ = registry.remove(&dir, &id, &name);
                return Err(e);
            }
        };
        let stopper = StopHandle::default();
        opts.config.reserved_id = Some(id.clone());
        opts.stop_handle = Some(stopper.clone());
        let (stdout, stderr) = (Tail::default(), Tail::default());
        let (out, err) = (stdout.clone(), stderr.clone());
        let run = std::thread::Builder::new()
            .name(format!("vm-{id}"))
            .spawn(move || crate::run::run(&opts, Box::new(out), Box::new(err), None))?;
        let vm = Vm {
            agent: Agent::new(dir.vsock()),
            control_socket: dir.control(),
            id,
            name,
            stopper,
            run: Mutex::new(Some(run)),
            stdout,
            stderr,
            stop_timeout: config.stop_timeout,
            exposed: Mutex::default(),
        };
        // Up once the agent answers (after a restore: once the clone has caught up).
        let started = Instant::now();
        let mut delay = Duration::from_micros(500);
        loop {
            if vm.finished() {
                let status = vm.join()?;
                return Err(Error::ExitedEarly {
                    status,
                    stderr: String::from_utf8_lossy(&vm.stderr.bytes()).into_owned(),
                });
            }
            if vm.agent.ping().is_ok() {
                return Ok(vm);
            }
            if started.elapsed() > config.start_timeout {
                vm.stopper.kill();
                let _ = vm.join();
                return Err(Error::Timeout {
                    what: "starting the VM".into(),
                    after: config.start_timeout,
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(10));
        }
    }

    fn finished(&self) -> bool {
        self.run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|h| h.is_finished())
    }

    /// Waits for the VM's thread; the workload's exit status.
    fn join(&self) -> Result<i32> {
        let handle = self.run.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(handle) = handle else {
            return Err(Error::VmStopped);
        };
        self.exposed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        match handle.join() {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::GuestFailed {
                why: "the VM's thread panicked".into(),
                tail: String::new(),
            }),
        }
    }

    /// The VM's id (as `supermachine ps` shows it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the VM still runs.
    pub fn is_running(&self) -> bool {
        !self.finished()
    }

    /// A command to run in the VM; see [`ExecBuilder`].
    pub fn exec_builder(&self) -> ExecBuilder<'_> {
        ExecBuilder::new(&self.agent)
    }

    /// Creates or replaces the guest file `path` with `content` (mode 0644), atomically.
    pub fn write_file(&self, path: &str, content: &[u8]) -> Result<()> {
        Ok(self.agent.write_file(path, 0o644, &mut &content[..])?)
    }

    /// The guest file at `path`.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.agent.read_file(path, &mut out)?;
        Ok(out)
    }

    /// A byte stream to `127.0.0.1:port` inside the guest (the workload needs no network).
    pub fn connect(&self, port: u16) -> Result<UnixStream> {
        Ok(self.agent.connect(port)?)
    }

    /// Listens on `host` (port 0 picks one) and forwards each connection to `guest_port`, for
    /// as long as the VM runs. Returns the address it listens on.
    pub fn expose_tcp(&self, host: SocketAddr, guest_port: u16) -> Result<SocketAddr> {
        self.expose(host, guest_port, None)
    }

    /// As [`Vm::expose_tcp`], with TLS terminated on the host.
    pub fn expose_tls(
        &self,
        host: SocketAddr,
        guest_port: u16,
        tls: &TlsTermination,
    ) -> Result<SocketAddr> {
        self.expose(host, guest_port, Some(tls.clone()))
    }

    fn expose(
        &self,
        host: SocketAddr,
        guest_port: u16,
        tls: Option<TlsTermination>,
    ) -> Result<SocketAddr> {
        if self.finished() {
            return Err(Error::VmStopped);
        }
        let published = crate::ports::bind(PortMapping {
            host_ip: host.ip(),
            host_port: host.port(),
            guest_port,
            tls: tls.is_some(),
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        let local = published.local;
        let gate = crate::ports::AgentGate::default();
        gate.open();
        let forwarding = published.forward(self.agent.clone(), gate, tls);
        self.exposed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(forwarding);
        Ok(local)
    }

    /// Snapshots the running VM into `dir` (replaced atomically) and lets it go on; start
    /// copies with [`crate::Image::from_snapshot`].
    pub fn snapshot(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        use crate::control::{call, ControlReply, ControlRequest};
        let dir = dir.as_ref();
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()?.join(dir)
        };
        let request = ControlRequest::Snapshot { dir, stop: false };
        match call(&self.control_socket, &request, Duration::from_secs(600))
            .map_err(|e| Error::Snapshot(e.to_string()))?
        {
            ControlReply::Snapshot { dir } => Ok(dir),
            ControlReply::Error { message } => Err(Error::Snapshot(message)),
            ControlReply::Stopping | ControlReply::Done => {
                Err(Error::Snapshot("unexpected answer".into()))
            }
        }
    }

    /// Stops the VM's vCPUs until [`unpause`](Self::unpause): the guest does not run, its
    /// published ports keep accepting (connections wait), an `exec` waits, and a snapshot
    /// works and leaves it paused. Already paused: nothing to do.
    pub fn pause(&self) -> Result<()> {
        use crate::control::ControlRequest;
        crate::handle::control_done(&self.control_socket, &ControlRequest::Pause)
    }

    /// Lets a paused VM run again. Not paused: nothing to do.
    pub fn unpause(&self) -> Result<()> {
        use crate::control::ControlRequest;
        crate::handle::control_done(&self.control_socket, &ControlRequest::Unpause)
    }

    /// Clones the running VM `count` times: a snapshot (a short pause; this VM goes on
    /// untouched) from which each clone is restored, with its own id, name, host name, clock
    /// step and entropy reseed, its own copy of the root filesystem's changes and memory (pages
    /// nobody wrote stay shared with the others), configured by `config` (name, ports, env…;
    /// a name gets `-1`, `-2`… appended). Fails (stopping the clones made so far) if one does.
    pub fn fork(&self, count: usize, config: &VmConfig) -> Result<Vec<Vm>> {
        let vm_dir = self
            .control_socket
            .parent()
            .ok_or_else(|| Error::Snapshot("the VM has no directory".into()))?;
        let snapshot = crate::handle::ForkSnapshot::take(&self.control_socket, vm_dir)?;
        let image = crate::Image::from_snapshot(snapshot.dir())?;
        let mut clones = Vec::with_capacity(count);
        for i in 1..=count {
            let mut c = config.clone();
            if let Some(name) = &config.name {
                c.name = Some(format!("{name}-{i}"));
            }
            clones.push(image.start(&c)?);
        }
        Ok(clones)
    }

    /// What the workload has written so far to stdout and stderr (the last MiB of each).
    pub fn workload_output(&self) -> (Vec<u8>, Vec<u8>) {
        (self.stdout.bytes(), self.stderr.bytes())
    }

    /// Sends the workload its stop signal, powers the VM off if it has not exited after the
    /// stop timeout, and returns its exit status (128 + signal when killed, as a shell says).
    pub fn stop(self) -> Result<i32> {
        self.stopper.stop(self.stop_timeout);
        self.join()
    }

    /// Powers the VM off now.
    pub fn kill(self) {
        self.stopper.kill();
        let _ = self.join();
    }

    /// Waits for the workload to exit (an idle VM waits until stopped); its exit status.
    pub fn wait(self) -> Result<i32> {
        self.join()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.run.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            self.stopper.kill();
            let _ = self.join();
        }
    }
}
