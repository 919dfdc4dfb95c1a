//! Why a machine could not be booted, restored or run.

use std::path::PathBuf;

use vmm_core::VmExit;

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
