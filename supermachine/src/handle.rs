//! [`VmHandle`]: a VM found by name or id among this user's VMs, whichever process runs it (a
//! `supermachine run`, a `run -d` in the background, or a program using [`crate::Vm`]). What
//! `supermachine ps/exec/cp/logs/stop/rm/snapshot` do, as library calls.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::agent::Agent;
use crate::control::{call, ControlReply, ControlRequest};
use crate::error::{Error, Result};
use crate::exec::ExecBuilder;
use crate::vms::{Registry, VmDir, VmRecord, VmRegistryError};

pub use crate::vms::VmStatus;

/// What `supermachine ps` shows about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    /// 12 hex digits.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The image reference it was started from, as given.
    pub image: String,
    /// Running, paused, exited (with the workload's status) or dead.
    pub status: VmStatus,
    /// Published ports, as `HOST_IP:HOST_PORT->GUEST_PORT/tcp`.
    pub ports: Vec<String>,
    /// When it was started.
    pub created: SystemTime,
    /// The process running it, while it runs.
    pub pid: Option<u32>,
    /// Started in the background (`run -d`).
    pub detached: bool,
    /// Removed when it ends (`--rm`).
    pub auto_remove: bool,
    /// How often its restart policy has started it again.
    pub restarts: u32,
    /// Its health check's verdict, while it runs (`None`: it has none).
    pub health: Option<crate::HealthStatus>,
}

impl VmInfo {
    fn of(dir: &VmDir, record: &VmRecord) -> VmInfo {
        let status = dir.status(record);
        VmInfo {
            id: record.id.clone(),
            name: record.name.clone(),
            image: record.image.clone(),
            status,
            pid: status.is_alive().then_some(record.pid),
            detached: record.detached,
            auto_remove: record.auto_remove,
            restarts: record.restarts,
            health: status
                .is_alive()
                .then(|| crate::health::read(dir.path()).map(|h| h.status))
                .flatten(),
            ports: record.ports.clone(),
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(record.created),
        }
    }
}

/// A guest file's permission bits and size (from [`VmHandle::copy_out`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
}

/// A VM of this user, found with [`VmHandle::find`]. Unlike [`crate::Vm`] it does not own the
/// VM: dropping it leaves the VM running.
#[derive(Debug, Clone)]
pub struct VmHandle {
    registry: Registry,
    dir: VmDir,
    record: VmRecord,
    agent: Agent,
}

fn registry_error(e: VmRegistryError) -> Error {
    match e {
        VmRegistryError::NotFound(name) => Error::VmNotFound(name),
        e => e.into(),
    }
}

impl VmHandle {
    /// This user's VMs, oldest first; `all` includes those that have ended.
    pub fn list(all: bool) -> Result<Vec<VmInfo>> {
        let registry = Registry::open().map_err(registry_error)?;
        let mut infos: Vec<VmInfo> = registry
            .list()
            .iter()
            .map(|(d, r)| VmInfo::of(d, r))
            .filter(|i| all || i.status.is_alive())
            .collect();
        infos.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(infos)
    }

    /// The VM with this name, id or unambiguous id prefix ([`Error::VmNotFound`] if none).
    pub fn find(name_or_id: &str) -> Result<VmHandle> {
        let registry = Registry::open().map_err(registry_error)?;
        let (dir, record) = registry.find(name_or_id).map_err(registry_error)?;
        Ok(VmHandle {
            agent: Agent::new(dir.vsock()),
            registry,
            dir,
            record,
        })
    }

    /// Reserves a VM entry (a fresh id, and `name` if given) for a VM another process of this
    /// program will run with [`crate::VmConfig::reserved`]: found by name or id at once, and
    /// the name is taken before that process starts. [`VmHandle::remove`] gives it back if
    /// the VM never starts.
    pub fn reserve(name: Option<&str>) -> Result<VmHandle> {
        let registry = Registry::open().map_err(registry_error)?;
        let (id, name, dir) = registry.create(name).map_err(registry_error)?;
        Ok(VmHandle::of_reservation(registry, id, name, dir))
    }

    /// The entry [`VmHandle::reserve`] made, by its id (in the process that runs the VM).
    pub fn find_reserved(id: &str) -> Result<VmHandle> {
        let registry = Registry::open().map_err(registry_error)?;
        let (id, name, dir) = registry.reserved(id).map_err(registry_error)?;
        Ok(VmHandle::of_reservation(registry, id, name, dir))
    }

    fn of_reservation(registry: Registry, id: String, name: String, dir: VmDir) -> VmHandle {
        let record = dir.record().unwrap_or_else(|_| VmRecord {
            id,
            name,
            image: String::new(),
            created: 0,
            pid: 0,
            pid_start: 0,
            ports: Vec::new(),
            detached: false,
            auto_remove: false,
            exit_code: None,
            embedded: false,
            restarts: 0,
        });
        VmHandle {
            agent: Agent::new(dir.vsock()),
            registry,
            dir,
            record,
        }
    }

    /// Whether the VM's guest agent answers (it is up and takes commands).
    pub fn is_ready(&self) -> bool {
        self.agent.ping().is_ok()
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// What `ps` shows, as of now (a VM whose record was removed since is dead).
    pub fn info(&self) -> VmInfo {
        match self.current() {
            Some(record) => VmInfo::of(&self.dir, &record),
            None => VmInfo {
                status: VmStatus::Dead,
                pid: None,
                health: None,
                ..VmInfo::of(&self.dir, &self.record)
            },
        }
    }

    /// The record as it is now (a VM that ended has written its status since we found it, or
    /// removed its record).
    fn current(&self) -> Option<VmRecord> {
        self.dir.record().ok()
    }

    /// Whether it still runs (paused counts: its process is alive).
    pub fn is_running(&self) -> bool {
        self.info().status.is_alive()
    }

    /// What its health check has found (`None`: it has none, or it is not running).
    pub fn health(&self) -> Option<crate::Health> {
        self.is_running()
            .then(|| crate::health::read(self.dir.path()))
            .flatten()
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.info().status == VmStatus::Paused
    }

    fn require_running(&self) -> Result<()> {
        match self.info().status {
            VmStatus::Running => Ok(()),
            VmStatus::Paused => Err(Error::VmPaused(self.record.name.clone())),
            _ => Err(Error::VmStopped),
        }
    }

    /// Stops the VM's vCPUs until [`unpause`](Self::unpause): the guest does not run, its
    /// published ports keep accepting (connections wait), and file transfers are refused
    /// meanwhile (a snapshot works and leaves it paused). Already paused: nothing to do.
    pub fn pause(&self) -> Result<()> {
        match self.info().status {
            VmStatus::Running | VmStatus::Paused => self.pause_request(ControlRequest::Pause),
            _ => Err(Error::VmStopped),
        }
    }

    /// Lets a paused VM run again. Not paused: nothing to do.
    pub fn unpause(&self) -> Result<()> {
        match self.info().status {
            VmStatus::Running | VmStatus::Paused => self.pause_request(ControlRequest::Unpause),
            _ => Err(Error::VmStopped),
        }
    }

    /// What the VM uses now: its process's CPU time and memory on the host and, unless it
    /// is paused, the guest kernel's memory, network and disk counters. CPU use is the
    /// difference between two samples ([`VmStats::cpu_percent_since`]).
    pub fn stats(&self) -> Result<crate::VmStats> {
        let info = self.info();
        let Some(pid) = info.pid.filter(|_| info.status.is_alive()) else {
            return Err(Error::VmStopped);
        };
        let sampled = Instant::now();
        let (cpu_time, host_rss, host_pss) = crate::stats::host_side(pid)?;
        let guest = match info.status {
            VmStatus::Paused => None,
            _ => Some(crate::stats::guest_side(&self.agent)?),
        };
        Ok(crate::VmStats {
            sampled,
            cpu_time,
            host_rss,
            host_pss,
            guest,
        })
    }

    fn pause_request(&self, request: ControlRequest) -> Result<()> {
        control_done(&self.dir.control(), &request)
    }

    /// A command to run in the VM; see [`ExecBuilder`].
    pub fn exec_builder(&self) -> ExecBuilder<'_> {
        ExecBuilder::new(&self.agent)
    }

    /// Creates or replaces the guest file `path` with `content` (mode 0644), atomically.
    pub fn write_file(&self, path: &str, content: &[u8]) -> Result<()> {
        self.copy_in(path, 0o644, &mut &content[..])
    }

    /// The guest file at `path`.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.copy_out(path, &mut out)?;
        Ok(out)
    }

    /// Creates or replaces the guest file `path` with what `content` reads, with permission
    /// bits `mode`, atomically (the guest sees the old file or the whole new one).
    pub fn copy_in(&self, path: &str, mode: u32, content: &mut dyn Read) -> Result<()> {
        self.require_running()?;
        Ok(self.agent.write_file(path, mode, content)?)
    }

    /// Streams the guest file at `path` into `to`; its mode and size.
    pub fn copy_out(&self, path: &str, to: &mut dyn Write) -> Result<FileInfo> {
        self.require_running()?;
        let info = self.agent.read_file(path, to)?;
        Ok(FileInfo {
            mode: info.mode,
            size: info.size,
        })
    }

    /// Where a VM started in the background keeps the workload's stdout and stderr: the
    /// program that starts it ([`VmHandle::reserve`]) sends the output there.
    pub fn log_paths(&self) -> (PathBuf, PathBuf) {
        (self.dir.stdout_log(), self.dir.stderr_log())
    }

    /// The workload's stdout and stderr log files, for a VM started in the background
    /// (`run -d`); `None` for one whose output goes elsewhere (a foreground `run`'s terminal,
    /// a library [`crate::Vm`]).
    pub fn logs(&self) -> Option<(File, File)> {
        let out = File::open(self.dir.stdout_log()).ok()?;
        let err = File::open(self.dir.stderr_log()).ok()?;
        Some((out, err))
    }

    /// Snapshots the running VM into `dir` (replaced atomically); it goes on running, or is
    /// stopped afterwards with `stop`. Start copies with [`crate::Image::from_snapshot`].
    pub fn snapshot(&self, dir: impl AsRef<Path>, stop: bool) -> Result<PathBuf> {
        // A paused VM is snapshotted as it stands (and stays paused).
        if !self.info().status.is_alive() {
            return Err(Error::VmStopped);
        }
        let dir = dir.as_ref();
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()?.join(dir)
        };
        let request = ControlRequest::Snapshot { dir, stop };
        match call(&self.dir.control(), &request, Duration::from_secs(600))
            .map_err(|e| Error::Snapshot(e.to_string()))?
        {
            ControlReply::Snapshot { dir } => Ok(dir),
            ControlReply::Error { message } => Err(Error::Snapshot(message)),
            ControlReply::Stopping | ControlReply::Done => {
                Err(Error::Snapshot("unexpected answer".into()))
            }
        }
    }

    /// Snapshots the running VM (a short pause) into a private directory of its own, for
    /// clones to be started from ([`crate::Image::from_snapshot`], `run --snapshot`); the
    /// directory goes when the returned [`ForkSnapshot`] is dropped (clones already started
    /// keep their memory: it is mapped). What `supermachine fork` does before it starts clones.
    pub fn fork_snapshot(&self) -> Result<ForkSnapshot> {
        ForkSnapshot::take(&self.dir.control(), self.dir.path())
    }

    /// Stops the VM: the workload gets its stop signal and `grace` to exit, then the VM is
    /// powered off. Returns once it has ended (at once if it already had).
    pub fn stop(&self, grace: Duration) -> Result<()> {
        let Some(record) = self.current() else {
            return Ok(());
        };
        if record.status() != VmStatus::Running {
            return Ok(());
        }
        if record.embedded {
            return self.stop_embedded(grace);
        }
        // The VM's own process (`supermachine run`): SIGTERM is its stop request.
        signal(record.pid, libc::SIGTERM);
        if wait_gone(&record, grace) {
            return Ok(());
        }
        // A second SIGTERM makes it power the VM off at once.
        signal(record.pid, libc::SIGTERM);
        if !wait_gone(&record, Duration::from_secs(5)) {
            signal(record.pid, libc::SIGKILL);
            if !wait_gone(&record, Duration::from_secs(5)) {
                return Err(Error::Timeout {
                    what: format!("stopping VM {}", record.name),
                    after: grace + Duration::from_secs(10),
                });
            }
        }
        Ok(())
    }

    /// A VM run by a program through the library: asked through its control socket (the
    /// process is the program's, never signalled); returns once its record has a status.
    fn stop_embedded(&self, grace: Duration) -> Result<()> {
        let request = ControlRequest::Stop {
            grace_ms: grace.as_millis() as u64,
        };
        match call(&self.dir.control(), &request, Duration::from_secs(10)) {
            Ok(ControlReply::Stopping) => {}
            Ok(ControlReply::Error { message }) => return Err(Error::Guest(message)),
            Ok(other) => return Err(Error::Guest(format!("unexpected answer {other:?}"))),
            // Gone between the check and the call.
            Err(_) if !self.is_running() => return Ok(()),
            Err(e) => return Err(Error::Io(std::io::Error::other(e.to_string()))),
        }
        let limit = grace + Duration::from_secs(10);
        let deadline = Instant::now() + limit;
        while self.is_running() {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("stopping VM {}", self.record.name),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Removes the VM's record (its name becomes free). A running VM is refused unless
    /// `force`, which stops it first without a grace period.
    pub fn remove(self, force: bool) -> Result<()> {
        if self.is_running() {
            if !force {
                return Err(Error::VmRunning(self.record.name.clone()));
            }
            self.stop(Duration::ZERO)?;
        }
        if !self.dir.path().exists() {
            // Removed itself on stopping (`--rm`, library VMs).
            return Ok(());
        }
        self.registry
            .remove(&self.dir, &self.record.id, &self.record.name)
            .map_err(registry_error)
    }
}

/// A snapshot of a running VM taken to start clones from; removed when dropped.
#[derive(Debug)]
pub struct ForkSnapshot {
    dir: PathBuf,
}

impl ForkSnapshot {
    /// Snapshots the VM whose control socket is `control` into a new directory under
    /// `vm_dir/forks` (private, as the VM's directory is).
    pub(crate) fn take(control: &Path, vm_dir: &Path) -> Result<ForkSnapshot> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let forks = vm_dir.join("forks");
        std::fs::create_dir_all(&forks)?;
        let fork = ForkSnapshot {
            dir: forks.join(format!("{nanos}-{}", std::process::id())),
        };
        let request = ControlRequest::Snapshot {
            dir: fork.dir.clone(),
            stop: false,
        };
        match call(control, &request, Duration::from_secs(600))
            .map_err(|e| Error::Snapshot(e.to_string()))?
        {
            ControlReply::Snapshot { .. } => Ok(fork),
            ControlReply::Error { message } => Err(Error::Snapshot(message)),
            ControlReply::Stopping | ControlReply::Done => {
                Err(Error::Snapshot("unexpected answer".into()))
            }
        }
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ForkSnapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a pause or unpause through `socket` and waits for it to be done.
pub(crate) fn control_done(socket: &Path, request: &ControlRequest) -> Result<()> {
    match call(socket, request, Duration::from_secs(30)) {
        Ok(ControlReply::Done) => Ok(()),
        Ok(ControlReply::Error { message })
        | Err(crate::control::ControlError::Refused(message)) => Err(Error::Guest(message)),
        Ok(other) => Err(Error::Guest(format!("unexpected answer {other:?}"))),
        Err(e) => Err(Error::Io(std::io::Error::other(e.to_string()))),
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid was checked to be the VM's
    // process (pid and start time) just before.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Waits until the VM's process is gone; false after `limit`.
fn wait_gone(record: &VmRecord, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while crate::vms::process_start(record.pid) == Some(record.pid_start) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
