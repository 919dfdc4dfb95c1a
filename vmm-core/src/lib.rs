//! # vmm-core
//!
//! The seams of the supermachine VMM, with no hypervisor and no concrete device in them.
//!
//! Owns:
//! - the backend traits ([`Hypervisor`] → [`Vm`] → [`Vcpu`]) and the neutral [`VcpuExit`];
//! - guest memory creation and the guest physical layout ([`memory`], [`arch`]);
//! - the port-I/O and MMIO [`bus`] that devices register on ([`BusDevice`]);
//! - boot preparation: loading a kernel and initramfs, boot parameters, MP table ([`arch`]);
//! - the [`builder`] that turns [`VmResources`] into a ready VM and the [`runner`] that drives
//!   its vCPU threads until the guest powers off or resets.
//!
//! Does not own: any `kvm_*`/HVF/WHP type (backend crates), device models (`devices`),
//! snapshot file formats (`snapshot`) or the choice of backend (the `supermachine` facade).
#![deny(missing_docs)]

pub mod arch;
pub mod builder;
pub mod bus;
pub mod hypervisor;
pub mod memory;
pub mod runner;

pub use builder::{BuildError, BuiltVm, VmBuilder, VmResources};
pub use bus::{Bus, BusDevice, BusError, IoBuses};
pub use hypervisor::{
    Hypervisor, HypervisorError, IoHandler, IrqTrigger, Vcpu, VcpuExit, VcpuKicker, Vm,
};
pub use memory::GuestMemory;
#[cfg(target_arch = "x86_64")]
pub use runner::CapturedVm;
pub use runner::{CaptureError, RunError, VmControl, VmExit};
