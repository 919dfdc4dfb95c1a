//! Booting a kernel + initramfs with `guest-init` as PID 1, and carrying its exit status out:
//! what `guest-init` is told (the command, its environment, the container) rides in the
//! initramfs and on the command line of a [`vmm`] machine.

use std::io::{Read, Write};
use std::path::PathBuf;

use guest_init::InitConfig;
use vmm_core::builder::InitramfsPart;
use vmm_core::VmControl;

pub use vmm::{
    backend_name, create_restore_vm, open_hypervisor, raise_open_files_limit, restore,
    restore_loaded, restore_prepared, BootError, BootOutcome, ConsoleSpec, DiskSpec, RestoreDisks,
    RestoreOptions, RestoreVm, ShareSpec, DEFAULT_CMDLINE, GUEST_CID,
};

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
    /// Attach a virtio-net device (`eth0`, MAC [`GUEST_MAC`](vmm::GUEST_MAC))
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

fn now_seconds() -> Option<i64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i64)
}

/// Boots the guest and runs it to the end.
pub fn boot(opts: BootOptions) -> Result<BootOutcome, BootError> {
    let mut initramfs = Vec::new();
    if let Some(path) = &opts.initramfs {
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
    let mut cmdline = String::new();
    if opts.quiet {
        cmdline.push_str("quiet");
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
    vmm::boot(vmm::MachineConfig {
        kernel: opts.kernel,
        initramfs,
        cmdline,
        memory_mib: opts.memory_mib,
        vcpus: opts.vcpus,
        console: opts.console,
        console_input: opts.console_input,
        disks: opts.disks,
        consoles: opts.consoles,
        control: opts.control,
        vsock: opts.vsock,
        net: opts.net.map(crate::network::net_spec),
        shares: opts.shares,
        snapshot: opts.snapshot,
        on_started: opts.on_started,
    })
}
