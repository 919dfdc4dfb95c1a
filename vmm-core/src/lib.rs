//! # vmm-core
//!
//! The seams of the supermachine VMM, with no hypervisor and no concrete device in them.
//!
//! Owns:
//! - the neutral backend traits ([`Hypervisor`] → [`Vm`] → [`Vcpu`], the [`IrqChip`] seam) and
//!   the neutral [`VcpuExit`]; per-architecture extension traits in [`arch`] (x86-64:
//!   `HypervisorX86_64`, `VmX86_64`, `VcpuX86_64`; arm64: `HypervisorAArch64`, …);
//! - guest memory creation and the guest physical layout ([`memory`], [`arch`]);
//! - the port-I/O and MMIO [`bus`] that devices register on ([`BusDevice`]);
//! - boot preparation: loading a kernel and initramfs, boot parameters, MP table ([`arch`]);
//! - the [`builder`] that turns [`VmResources`] into a ready VM and the [`runner`] that drives
//!   its vCPU threads until the guest powers off or resets.
//!
//! Does not own: any `kvm_*`/HVF/WHP type (backend crates), device models (`devices`),
//! snapshot file formats (`snapshot`) or the choice of backend (the `supermachine` facade).
//!
//! A VM from a kernel, on whatever backend the caller opened (`vmm-kvm`'s `KvmHypervisor` on
//! Linux x86-64):
//!
//! ```no_run
//! use vmm_core::arch::host::ArchHypervisor;
//! use vmm_core::{runner, VmBuilder, VmControl, VmExit, VmResources};
//!
//! fn boot(hypervisor: &dyn ArchHypervisor) -> Result<VmExit, Box<dyn std::error::Error>> {
//!     let builder = VmBuilder::new(
//!         hypervisor,
//!         VmResources {
//!             kernel: "vmlinux".into(),
//!             initramfs: Vec::new(),
//!             cmdline: "console=ttyS0".into(),
//!             memory_mib: 128,
//!             vcpus: 1,
//!         },
//!     )?;
//!     // Devices go on builder.add_pio_device / add_mmio_device here (see `devices`).
//!     let vm = builder.build()?;
//!     Ok(runner::run(vm, &VmControl::new())?)
//! }
//! ```
#![deny(missing_docs)]

pub mod arch;
pub mod builder;
pub mod bus;
pub mod descriptor;
pub mod hypervisor;
pub mod memory;
pub mod runner;

pub use builder::{BuildError, BuiltVm, VmBuilder, VmResources};
pub use bus::{Bus, BusDevice, BusError, IoBuses};
pub use descriptor::BorrowedDescriptor;
pub use hypervisor::{
    Hypervisor, HypervisorError, IoHandler, IrqChip, IrqChipKind, IrqTrigger, Vcpu, VcpuExit,
    VcpuKicker, Vm,
};
pub use memory::GuestMemory;
pub use runner::{CaptureError, CapturedVm, RunError, VmControl, VmExit};
