//! Booting a kernel + initramfs with `guest-init` as PID 1, and carrying its exit status out.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::legacy::{ExitStatusPort, I8042ResetLine, SerialConsole};
use guest_init::InitConfig;
use vmm_core::arch::host::ArchHypervisor;
use vmm_core::arch::x86_64::layout::{COM1_IRQ, COM1_PORT, EXIT_STATUS_PORT, I8042_COMMAND_PORT};
use vmm_core::builder::InitramfsPart;
use vmm_core::{GuestMemory, VmBuilder, VmControl, VmExit, VmResources};

/// The kernel parameters every guest gets: console on COM1, reset through the i8042 on reboot
/// or panic, no port-0x80 delays.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 io_delay=none";

/// A disk given to the guest as a virtio-blk device (`/dev/vda`, `/dev/vdb`, … in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The backing file (its size must be a whole number of 512-byte sectors).
    pub path: PathBuf,
    /// Attach read-only (the guest sees a read-only disk; writes fail with an I/O error).
    pub read_only: bool,
}

impl std::str::FromStr for ShareSpec {
    type Err = String;

    /// `DIR:TAG`, `DIR:TAG:ro` or `DIR:TAG:rw`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, read_only) = match s.rsplit_once(':') {
            Some((r, "ro")) => (r, true),
            Some((r, "rw")) => (r, false),
            _ => (s, false),
        };
        let (dir, tag) = rest
            .rsplit_once(':')
            .filter(|(d, t)| !d.is_empty() && !t.is_empty())
            .ok_or_else(|| format!("expected DIR:TAG[:ro], got {s:?}"))?;
        Ok(ShareSpec {
            tag: tag.to_string(),
            dir: PathBuf::from(dir),
            read_only,
        })
    }
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// `PATH`, `PATH:ro` or `PATH:rw`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(':') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A host directory shared with the guest through virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The tag the guest mounts (`mount -t virtiofs TAG PATH`).
    pub tag: String,
    /// The host directory.
    pub dir: PathBuf,
    /// Refuse every change from the guest (on the host side).
    pub read_only: bool,
}

/// What to boot.
pub struct BootOptions {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Base initramfs (with `guest-init` as `/init`), if any.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel parameters, appended to [`DEFAULT_CMDLINE`].
    pub extra_cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// What init runs (empty: a shell).
    pub command: Vec<String>,
    /// Environment for the command, `NAME=value`.
    pub env: Vec<String>,
    /// Quiet kernel and init (only the command's output reaches the console).
    pub quiet: bool,
    /// Where the guest console goes.
    pub console: Box<dyn Write + Send>,
    /// Forward this reader (usually stdin) to the guest console's input.
    pub console_input: Option<Box<dyn Read + Send>>,
    /// Working directory for the command.
    pub workdir: Option<String>,
    /// Disks, in guest order.
    pub disks: Vec<DiskSpec>,
    /// Run COMMAND as a container in an image's root filesystem.
    pub container: Option<guest_init::ContainerConfig>,
    /// Extra single-port virtio consoles (`/dev/hvc0`, `/dev/hvc1`, … in order).
    pub consoles: Vec<ConsoleSpec>,
    /// A control handle the caller keeps to stop the VM from outside (default: a fresh one).
    pub control: Option<VmControl>,
    /// Attach a virtio-vsock device (guest CID [`GUEST_CID`]) whose host side is this Unix
    /// socket (`CONNECT <port>` to reach a guest port; guest connections to host port P land
    /// on `<socket>_P`).
    pub vsock: Option<PathBuf>,
    /// Attach a virtio-net device (`eth0`, MAC [`GUEST_MAC`](crate::network::GUEST_MAC))
    /// with this host side.
    pub net: Option<Box<dyn devices::virtio::net::NetBackend>>,
    /// Host directories shared through virtio-fs, after the other devices.
    pub shares: Vec<ShareSpec>,
    /// Take a snapshot when the guest prints a marker on its serial console, then stop the VM.
    pub snapshot: Option<crate::snapshot::SnapshotRequest>,
    /// Called with the VM's [`Snapshotter`](crate::snapshot::Snapshotter) once it is built,
    /// before it runs.
    pub on_started: Option<Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send>>,
}

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;

/// A virtio console: where guest output goes; host input arrives through the handle the
/// `on_ready` callback receives.
pub struct ConsoleSpec {
    /// Where the guest's writes go.
    pub output: Box<dyn Write + Send>,
    /// Called with the console's input handle once the device exists.
    pub on_ready: Option<Box<dyn FnOnce(devices::virtio::console::ConsoleInput) + Send>>,
}

/// How a boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootOutcome {
    /// Why the VM stopped.
    pub exit: VmExit,
}

impl BootOutcome {
    /// The guest command's exit status, if init reported one.
    pub fn status(&self) -> Option<i32> {
        match self.exit {
            VmExit::PowerOff(status) => status,
            _ => None,
        }
    }
}

/// Errors booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// No hypervisor backend could be opened.
    #[error(transparent)]
    Hypervisor(#[from] vmm_core::HypervisorError),
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] vmm_core::BuildError),
    /// The VM failed while running.
    #[error(transparent)]
    Run(#[from] vmm_core::RunError),
    /// The kernel file does not exist.
    #[error("guest kernel {0} not found (build it with `cargo xtask kernel`, or pass --kernel)")]
    KernelMissing(PathBuf),
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::BlockError),
    /// A virtio device could not be set up.
    #[error("cannot set up a virtio device: {0}")]
    Device(String),
    /// More devices than interrupt lines.
    #[error("too many devices: at most {0} virtio devices")]
    TooManyDevices(usize),
    /// The initramfs file does not exist.
    #[error(
        "initramfs {0} not found (build it with `cargo xtask initramfs`, or pass --initramfs)"
    )]
    InitramfsMissing(PathBuf),
    /// Taking or restoring a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The system-call filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The VM ended before the snapshot's marker appeared.
    #[error("the VM ended ({0:?}) before it printed the snapshot marker")]
    NoSnapshot(VmExit),
}

/// The backend this build uses on this platform, for messages (`KVM`, `HVF`, `WHP`).
pub fn backend_name() -> &'static str {
    if cfg!(target_os = "linux") {
        "KVM"
    } else if cfg!(target_os = "macos") {
        "HVF"
    } else if cfg!(windows) {
        "WHP"
    } else {
        "a hypervisor"
    }
}

/// Opens this platform's hypervisor: the backend its cargo feature selects (`kvm` on Linux
/// x86-64). The first call also raises this process's open-files limit (see
/// [`raise_open_files_limit`]).
pub fn open_hypervisor() -> Result<Box<dyn ArchHypervisor>, BootError> {
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(|| {
        raise_open_files_limit();
    });
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    {
        Ok(Box::new(vmm_kvm::KvmHypervisor::new()?))
    }
    #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
    {
        Err(BootError::Hypervisor(
            vmm_core::HypervisorError::Unavailable(
                "this build has no hypervisor backend for this platform (KVM on Linux x86-64 \
                 needs the `kvm` feature; arm64 and macOS are not supported yet)"
                    .into(),
            ),
        ))
    }
}

/// Raises the soft limit on open descriptors to the hard limit and returns the new soft
/// limit. A VM's NAT may hold hundreds of host sockets (512 TCP + 128 UDP flows), so with the
/// usual soft limit of 1024 two busy guests in one process would starve each other's (and the
/// process's own) accepts and restores.
pub fn raise_open_files_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the rlimit we pass; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

fn now_seconds() -> Option<i64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i64)
}

/// Boots the guest and runs it to the end.
pub fn boot(opts: BootOptions) -> Result<BootOutcome, BootError> {
    if !opts.kernel.exists() {
        return Err(BootError::KernelMissing(opts.kernel));
    }
    let mut initramfs = Vec::new();
    if let Some(path) = &opts.initramfs {
        if !path.exists() {
            return Err(BootError::InitramfsMissing(path.clone()));
        }
        initramfs.push(InitramfsPart::File(path.clone()));
        let config = InitConfig {
            argv: opts.command.clone(),
            env: opts.env.clone(),
            workdir: opts.workdir.clone(),
            clock_seconds: now_seconds(),
            verbose: !opts.quiet,
            container: opts.container.clone(),
        };
        initramfs.push(InitramfsPart::Bytes(config.to_initramfs()));
    }
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    if opts.quiet {
        cmdline.push_str(" quiet");
    }
    if !opts.extra_cmdline.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(opts.extra_cmdline.trim());
    }
    if opts.initramfs.is_none() && !opts.command.is_empty() {
        // Without our initramfs the command can only reach init through the command line.
        cmdline.push_str(" -- ");
        cmdline.push_str(&opts.command.join(" "));
    }

    let hypervisor = open_hypervisor()?;
    let resources = VmResources {
        kernel: opts.kernel,
        initramfs,
        cmdline,
        memory_mib: opts.memory_mib,
        vcpus: opts.vcpus,
    };
    let control = opts.control.clone().unwrap_or_default();
    let memory_mib = resources.memory_mib;
    let identity =
        crate::snapshot::Identity::here(Some(&resources.kernel), opts.initramfs.as_deref());
    let mut builder = VmBuilder::new(hypervisor.as_ref(), resources)?;
    let marker_seen = crate::snapshot::MarkerSeen::default();
    let console: Box<dyn Write + Send> = match &opts.snapshot {
        Some(req) => Box::new(crate::snapshot::MarkerWatch {
            inner: opts.console,
            marker: req.when_output.as_bytes().to_vec(),
            tail: Vec::new(),
            seen: marker_seen.clone(),
            done: false,
        }),
        None => opts.console,
    };
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        builder.irq_trigger(COM1_IRQ)?,
        console,
    )));
    add_legacy_devices(&mut builder, serial.clone(), &control)?;
    let mut event_loop =
        devices::event_loop::EventLoop::new().map_err(|e| BootError::Device(e.to_string()))?;
    let mut live = attach_disks(&mut builder, &mut event_loop, &opts.disks)?;
    let consoles = opts.consoles.len();
    live.extend(attach_consoles(
        &mut builder,
        &mut event_loop,
        opts.disks.len(),
        opts.consoles,
        None,
    )?);
    let mut next_slot = opts.disks.len() + consoles;
    if let Some(socket) = opts.vsock {
        live.push(attach_vsock(
            &mut builder,
            &mut event_loop,
            next_slot,
            socket,
            None,
        )?);
        next_slot += 1;
    }
    if let Some(backend) = opts.net {
        live.push(attach_net(
            &mut builder,
            &mut event_loop,
            next_slot,
            crate::network::GUEST_MAC,
            backend,
            None,
        )?);
        next_slot += 1;
    }
    for share in &opts.shares {
        let fs = virtiofs::Fs::new(&share.tag, &share.dir, share.read_only)
            .map_err(|e| BootError::Device(e.to_string()))?;
        live.push(attach_virtio(
            &mut builder,
            &mut event_loop,
            next_slot,
            crate::snapshot::DeviceKind::Fs {
                tag: share.tag.clone(),
                dir: share.dir.clone(),
            },
            Box::new(fs),
            None,
        )?);
        next_slot += 1;
    }
    let vm = builder.build()?;
    let snapshotter = crate::snapshot::Snapshotter {
        control: control.clone(),
        serial: serial.clone(),
        devices: live,
        identity,
        memory_mib,
    };
    if let Some(input) = opts.console_input {
        forward_input(input, serial.clone(), control.clone());
    }
    let devices = event_loop
        .start()
        .map_err(|e| BootError::Device(e.to_string()))?;
    if let Some(on_started) = opts.on_started {
        on_started(snapshotter.clone());
    }
    let marker_snapshot = opts.snapshot.map(|req| {
        let control = control.clone();
        std::thread::spawn(move || {
            if !marker_seen.wait(|| control.is_stopping()) {
                return None;
            }
            Some(snapshotter.take(&req.dir, None, crate::snapshot::AfterSnapshot::Stop))
        })
    });
    crate::seccomp::install_if_enabled()?;
    let exit = vmm_core::runner::run(vm, &control);
    devices.stop();
    let exit = exit?;
    if let Some(thread) = marker_snapshot {
        match thread.join() {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => return Err(BootError::NoSnapshot(exit)),
        }
    }
    Ok(BootOutcome { exit })
}

/// What to restore.
pub struct RestoreOptions {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The kernel the snapshot must have been taken with (checked without reading it).
    pub kernel: Option<PathBuf>,
    /// The initramfs the snapshot must have been taken with.
    pub initramfs: Option<PathBuf>,
    /// Where the guest console goes.
    pub console: Box<dyn Write + Send>,
    /// Forward this reader (usually stdin) to the guest console's input.
    pub console_input: Option<Box<dyn Read + Send>>,
    /// A control handle the caller keeps (default: a fresh one).
    pub control: Option<VmControl>,
    /// The snapshot's virtio consoles, in order: where their output goes now.
    pub consoles: Vec<ConsoleSpec>,
    /// The host socket for the snapshot's vsock device (required if it has one).
    pub vsock: Option<PathBuf>,
    /// The host side for the snapshot's network device (required if it has one).
    pub net: Option<Box<dyn devices::virtio::net::NetBackend>>,
    /// Called with the restored VM's snapshotter before it runs.
    pub on_started: Option<Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send>>,
    /// The disk files the snapshot may open.
    pub disks: RestoreDisks,
}

/// The disk files a restore may open. A snapshot's state names its disks by path, and a
/// crafted state must not get the VMM to open any file its user can (read-write, at that):
/// each disk must be one given for this restore, or a file in one of the read-only
/// directories (the image store's root filesystems), attached read-only.
#[derive(Debug, Clone, Default)]
pub struct RestoreDisks {
    /// Disks given for this restore (`boot --disk`); a snapshot's disk may be attached at most
    /// as writable as given here.
    pub given: Vec<DiskSpec>,
    /// Directories whose files may be attached read-only.
    pub read_only_dirs: Vec<PathBuf>,
}

impl RestoreDisks {
    /// Why the disk `path` (attached `read_only` or not) may not be opened, if it may not.
    pub fn refuses(&self, path: &std::path::Path, read_only: bool) -> Option<String> {
        let Ok(real) = path.canonicalize() else {
            return Some(format!("its disk {} does not exist", path.display()));
        };
        let given = self
            .given
            .iter()
            .any(|d| d.path.canonicalize().is_ok_and(|p| p == real) && (read_only || !d.read_only));
        let in_read_only_dir = read_only
            && self
                .read_only_dirs
                .iter()
                .filter_map(|d| d.canonicalize().ok())
                .any(|d| real.parent() == Some(d.as_path()));
        (!given && !in_read_only_dir).then(|| {
            format!(
                "it names the disk {}{}, which this restore was not given (restore it with that \
                 disk given, e.g. `boot --restore DIR --disk {}`)",
                path.display(),
                if read_only { " (read-only)" } else { "" },
                path.display()
            )
        })
    }
}

/// Restores a snapshot and runs the VM to the end. Guest memory is mapped from the snapshot's
/// memory file copy-on-write: nothing is read until the guest touches it.
pub fn restore(opts: RestoreOptions) -> Result<BootOutcome, BootError> {
    let loaded =
        crate::snapshot::load(&opts.dir, opts.kernel.as_deref(), opts.initramfs.as_deref())?;
    restore_loaded(opts, loaded)
}

/// The first step of a restore: the hypervisor's VM over the snapshot's memory. It needs
/// nothing else, so a caller can make it on another thread while it sets up the rest (ports,
/// sockets) and hand it to [`restore_prepared`].
pub struct RestoreVm {
    builder: VmBuilder,
    /// When the restore began (for the restore-call timing).
    started: std::time::Instant,
}

/// Makes the VM of a restore of a snapshot loaded with [`crate::snapshot::load`] (see
/// [`RestoreVm`]): `memory` and the vCPU count are the snapshot's.
pub fn create_restore_vm(memory: &GuestMemory, vcpus: u8) -> Result<RestoreVm, BootError> {
    let started = std::time::Instant::now();
    crate::timings::mark("restore_started");
    let hypervisor = open_hypervisor()?;
    crate::timings::mark("hypervisor_opened");
    let builder = VmBuilder::from_memory(hypervisor.as_ref(), memory.clone(), vcpus)?;
    crate::timings::mark("restore_vm_created");
    Ok(RestoreVm { builder, started })
}

/// [`restore`] of a snapshot already read with [`crate::snapshot::load`].
pub fn restore_loaded(
    opts: RestoreOptions,
    loaded: crate::snapshot::LoadedSnapshot,
) -> Result<BootOutcome, BootError> {
    let vm = create_restore_vm(&loaded.memory, loaded.state.vcpus.len() as u8)?;
    restore_prepared(opts, loaded, vm)
}

/// [`restore_loaded`] with its VM made already ([`create_restore_vm`] of the same `loaded`).
pub fn restore_prepared(
    opts: RestoreOptions,
    loaded: crate::snapshot::LoadedSnapshot,
    vm: RestoreVm,
) -> Result<BootOutcome, BootError> {
    use crate::snapshot::DeviceKind;
    let RestoreVm {
        mut builder,
        started,
    } = vm;
    let state = loaded.state;
    let incompatible = |why: String| crate::snapshot::SnapshotError::Incompatible {
        dir: opts.dir.clone(),
        why,
    };
    let control = opts.control.clone().unwrap_or_default();
    let serial =
        SerialConsole::restore(builder.irq_trigger(COM1_IRQ)?, opts.console, &state.serial)
            .map_err(incompatible)?;
    let serial = Arc::new(Mutex::new(serial));
    add_legacy_devices(&mut builder, serial.clone(), &control)?;
    let mut event_loop =
        devices::event_loop::EventLoop::new().map_err(|e| BootError::Device(e.to_string()))?;
    let mut consoles = opts.consoles.into_iter();
    let mut vsock_socket = opts.vsock;
    let mut net_backend = opts.net;
    let mut live = Vec::new();
    for d in &state.devices {
        let slot = d.slot as usize;
        let from = Some(&d.transport);
        let device = match &d.kind {
            DeviceKind::Block {
                path,
                read_only,
                sectors,
            } => {
                if let Some(why) = opts.disks.refuses(path, *read_only) {
                    return Err(incompatible(why).into());
                }
                let block = devices::virtio::block::Block::open(path, *read_only)?;
                if block.sectors() != *sectors {
                    return Err(incompatible(format!(
                        "disk {} has {} sectors, the snapshot was taken with {sectors}",
                        path.display(),
                        block.sectors()
                    ))
                    .into());
                }
                let spec = DiskSpec {
                    path: path.clone(),
                    read_only: *read_only,
                };
                attach_disk(&mut builder, &mut event_loop, slot, &spec, block, from)?
            }
            DeviceKind::Console => {
                let Some(spec) = consoles.next() else {
                    return Err(incompatible("it has more consoles than were given".into()).into());
                };
                attach_consoles(&mut builder, &mut event_loop, slot, vec![spec], from)?
                    .pop()
                    .ok_or_else(|| BootError::Device("console".into()))?
            }
            DeviceKind::Vsock { .. } => {
                let Some(socket) = vsock_socket.take() else {
                    return Err(incompatible(
                        "it has a vsock device and no socket was given".into(),
                    )
                    .into());
                };
                attach_vsock(&mut builder, &mut event_loop, slot, socket, from)?
            }
            DeviceKind::Net { mac } => {
                let Some(backend) = net_backend.take() else {
                    return Err(incompatible(
                        "it has a network device and no network was given (it was baked with a network: run it with one)".into(),
                    )
                    .into());
                };
                attach_net(&mut builder, &mut event_loop, slot, *mac, backend, from)?
            }
            DeviceKind::Fs { dir, .. } => {
                return Err(incompatible(format!(
                    "it shares the host directory {} (virtio-fs): shared directories are not part of a snapshot",
                    dir.display()
                ))
                .into());
            }
        };
        live.push(device);
    }
    let vm = builder.restore(&state.vm, &state.vcpus)?;
    crate::timings::mark("restore_state_set");
    // Now that the interrupt controllers hold their saved state, devices may interrupt.
    for device in &live {
        device
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish_restore();
    }
    if let Some(input) = opts.console_input {
        forward_input(input, serial.clone(), control.clone());
    }
    crate::timings::mark("restore_devices_attached");
    let devices = event_loop
        .start()
        .map_err(|e| BootError::Device(e.to_string()))?;
    if let Some(on_started) = opts.on_started {
        on_started(crate::snapshot::Snapshotter {
            control: control.clone(),
            serial,
            devices: live,
            identity: state.identity.clone(),
            memory_mib: state.memory_mib,
        });
    }
    if std::env::var_os("SUPERMACHINE_TIMINGS").is_some() {
        eprintln!(
            "timings: restore={:.2}",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    crate::seccomp::install_if_enabled()?;
    let exit = vmm_core::runner::run(vm, &control);
    devices.stop();
    Ok(BootOutcome { exit: exit? })
}

/// COM1, the i8042 reset line and the exit-status port, on the port-I/O bus.
fn add_legacy_devices(
    builder: &mut VmBuilder,
    serial: Arc<Mutex<SerialConsole>>,
    control: &VmControl,
) -> Result<(), BootError> {
    builder.add_pio_device(serial, COM1_PORT, 8)?;
    builder.add_pio_device(
        Arc::new(Mutex::new(I8042ResetLine::new(control.clone()))),
        I8042_COMMAND_PORT,
        1,
    )?;
    builder.add_pio_device(
        Arc::new(Mutex::new(ExitStatusPort::new(control.clone()))),
        EXIT_STATUS_PORT,
        4,
    )?;
    Ok(())
}

/// Puts a virtio device in MMIO slot `slot`: bus, interrupt line, ioeventfds for its queues,
/// the event loop, and (for a boot, not a restore) its declaration on the kernel command line.
/// With `from`, the transport continues from a snapshot's state.
fn attach_virtio(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    kind: crate::snapshot::DeviceKind,
    device: Box<dyn devices::virtio::VirtioDevice>,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    use devices::virtio::{MmioTransport, MMIO_SLOT_SIZE, NOTIFY_REG_OFFSET};
    use vmm_core::arch::x86_64::layout::{IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_START};

    let max = (IRQ_MAX - IRQ_BASE + 1) as usize;
    if slot >= max {
        return Err(BootError::TooManyDevices(max));
    }
    let addr = VIRTIO_MMIO_START + slot as u64 * MMIO_SLOT_SIZE;
    let irq = IRQ_BASE + slot as u32;
    let memory = builder.memory().clone();
    let trigger = builder.irq_trigger(irq)?;
    let transport = match from {
        None => MmioTransport::new(device, memory, trigger),
        Some(state) => MmioTransport::restore(device, memory, trigger, state),
    }
    .map_err(|e| BootError::Device(e.to_string()))?;
    for (queue, fd) in transport.queue_events().into_iter().enumerate() {
        builder
            .vm()
            .register_ioevent(fd, addr + NOTIFY_REG_OFFSET, queue as u32)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    builder.add_mmio_device(transport.clone(), addr, MMIO_SLOT_SIZE)?;
    event_loop.add_transport(transport.clone());
    if from.is_none() {
        builder.append_cmdline(&format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
    }
    Ok(crate::snapshot::LiveDevice {
        slot: slot as u32,
        kind,
        transport,
    })
}

/// Each disk as virtio-blk, in order (`/dev/vda`, …).
fn attach_disks(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    disks: &[DiskSpec],
) -> Result<Vec<crate::snapshot::LiveDevice>, BootError> {
    let mut live = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let block = devices::virtio::block::Block::open(&disk.path, disk.read_only)?;
        live.push(attach_disk(builder, event_loop, i, disk, block, None)?);
    }
    Ok(live)
}

fn attach_disk(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    disk: &DiskSpec,
    block: devices::virtio::block::Block,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    let kind = crate::snapshot::DeviceKind::Block {
        path: std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone()),
        read_only: disk.read_only,
        sectors: block.sectors(),
    };
    attach_virtio(builder, event_loop, slot, kind, Box::new(block), from)
}

/// Each console as a single-port virtio-console, in order (`/dev/hvc0`, …), from `first_slot`.
fn attach_consoles(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    first_slot: usize,
    consoles: Vec<ConsoleSpec>,
    from: Option<&devices::virtio::TransportState>,
) -> Result<Vec<crate::snapshot::LiveDevice>, BootError> {
    let mut live = Vec::new();
    for (i, spec) in consoles.into_iter().enumerate() {
        let console = devices::virtio::console::Console::new(spec.output)
            .map_err(|e| BootError::Device(e.to_string()))?;
        if let Some(ready) = spec.on_ready {
            ready(console.input());
        }
        live.push(attach_virtio(
            builder,
            event_loop,
            first_slot + i,
            crate::snapshot::DeviceKind::Console,
            Box::new(console),
            from,
        )?);
    }
    Ok(live)
}

/// The vsock device (guest CID [`GUEST_CID`]) with its host side on `socket`.
fn attach_vsock(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    socket: PathBuf,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    let vsock = devices::virtio::vsock::Vsock::new(GUEST_CID, socket)
        .map_err(|e| BootError::Device(e.to_string()))?;
    attach_virtio(
        builder,
        event_loop,
        slot,
        crate::snapshot::DeviceKind::Vsock { cid: GUEST_CID },
        Box::new(vsock),
        from,
    )
}

/// The virtio-net device with `backend` as its host side.
fn attach_net(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    mac: [u8; 6],
    backend: Box<dyn devices::virtio::net::NetBackend>,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    let net = devices::virtio::net::Net::new(mac, usernet::MTU, backend);
    attach_virtio(
        builder,
        event_loop,
        slot,
        crate::snapshot::DeviceKind::Net { mac },
        Box::new(net),
        from,
    )
}

/// Feeds `input` to the guest console from a background thread, as fast as its FIFO drains.
fn forward_input(
    mut input: Box<dyn Read + Send>,
    serial: Arc<Mutex<SerialConsole>>,
    control: VmControl,
) {
    let _ = std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() && !control.is_stopping() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0);
        limit
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let before = nofile();
        // Just below what it is (other tests run meanwhile): the raise must undo it.
        let lowered = libc::rlimit {
            rlim_cur: before.rlim_cur.min(before.rlim_max) - 1,
            rlim_max: before.rlim_max,
        };
        // SAFETY: setrlimit reads the rlimit we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(raise_open_files_limit(), before.rlim_max);
        assert_eq!(nofile().rlim_cur, before.rlim_max);
    }

    #[test]
    fn a_restore_opens_only_given_disks_and_read_only_store_files() {
        let base = std::env::temp_dir().join(format!("sm-restore-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let store = base.join("rootfs");
        std::fs::create_dir_all(store.join("nested")).unwrap();
        for f in [
            "rootfs/a.squashfs",
            "rootfs/nested/b.squashfs",
            "given.img",
            "other.img",
        ] {
            std::fs::write(base.join(f), b"").unwrap();
        }
        std::os::unix::fs::symlink(base.join("other.img"), store.join("link.squashfs")).unwrap();
        let allowed = RestoreDisks {
            given: vec![DiskSpec {
                path: base.join("given.img"),
                read_only: false,
            }],
            read_only_dirs: vec![store.clone()],
        };
        let ok = |p: &str, ro: bool| allowed.refuses(&base.join(p), ro).is_none();
        assert!(ok("rootfs/a.squashfs", true));
        assert!(!ok("rootfs/a.squashfs", false), "a store file writable");
        assert!(!ok("rootfs/nested/b.squashfs", true), "below the directory");
        assert!(
            !ok("rootfs/link.squashfs", true),
            "a link out of the directory"
        );
        assert!(!ok("rootfs/../other.img", true));
        assert!(ok("given.img", false));
        assert!(ok("given.img", true));
        assert!(!ok("other.img", true));
        assert!(allowed
            .refuses(std::path::Path::new("/etc/passwd"), false)
            .is_some());
        assert!(allowed.refuses(&base.join("missing.img"), true).is_some());
        // Given read-only: never attached writable.
        let read_only = RestoreDisks {
            given: vec![DiskSpec {
                path: base.join("given.img"),
                read_only: true,
            }],
            read_only_dirs: Vec::new(),
        };
        assert!(read_only.refuses(&base.join("given.img"), true).is_none());
        let why = read_only.refuses(&base.join("given.img"), false).unwrap();
        assert!(why.contains("given.img") && why.contains("--disk"), "{why}");
        std::fs::remove_dir_all(base).unwrap();
    }
}
