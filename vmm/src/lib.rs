//! # vmm
//!
//! The machine layer: a VM built from a plain [`MachineConfig`] (memory, vCPUs, kernel and
//! initramfs, devices in slots with their interrupts), booted, snapshotted and restored.
//!
//! Owns: opening the backend this build selects ([`open_hypervisor`], cargo feature `kvm`),
//! placing the fixed devices and the virtio-mmio slots per architecture, wiring each device to
//! its interrupt line, doorbells and the device event loop, running the vCPUs to the end
//! ([`boot`], [`restore`]), what a snapshot of a machine holds ([`snapshot::MachineState`]: the
//! vCPUs, interrupt controllers, devices and memory, plus an opaque payload its owner writes),
//! and the VMM process's system-call filter ([`seccomp`]).
//!
//! Does not own: images, containers or what runs in the guest (the `supermachine` facade
//! describes the workload in the snapshot's payload and in the initramfs), device models
//! (`devices`, `virtiofs`), the snapshot file format (`snapshot`), the backend traits
//! (`vmm-core`).
//!
//! ```no_run
//! use std::path::PathBuf;
//! use vmm_core::builder::InitramfsPart;
//!
//! let outcome = vmm::boot(vmm::MachineConfig {
//!     kernel: PathBuf::from("vmlinux"),
//!     initramfs: vec![InitramfsPart::File(PathBuf::from("initramfs.cpio"))],
//!     cmdline: "quiet".into(),
//!     memory_mib: 256,
//!     vcpus: 1,
//!     console: Box::new(std::io::stdout()),
//!     console_input: None,
//!     disks: Vec::new(),
//!     consoles: Vec::new(),
//!     control: None,
//!     vsock: None,
//!     net: None,
//!     shares: Vec::new(),
//!     snapshot: None,
//!     on_started: None,
//! })?;
//! println!("the guest ended: {:?}", outcome.exit);
//! # Ok::<(), vmm::BootError>(())
//! ```
#![deny(missing_docs)]

mod arch;
mod boot;
mod config;
mod error;
mod hypervisor;
mod restore;
pub mod seccomp;
mod slots;
pub mod snapshot;
pub mod timings;

pub use boot::boot;
pub use config::{
    parse_mount_options, BootOutcome, ConsoleSpec, DiskSpec, MachineConfig, MountOptions, NetSpec,
    RestoreDisks, RestoreOptions, ShareSpec, DEFAULT_CMDLINE, GUEST_CID, GUEST_MAC,
};
pub use error::BootError;
pub use hypervisor::{backend_name, open_hypervisor, raise_open_files_limit};
pub use restore::{create_restore_vm, restore, restore_loaded, restore_prepared, RestoreVm};
pub use vmm_core::{VmControl, VmExit};
