//! arm64: the guest physical layout, the neutral register and interrupt-controller state, and
//! the extension traits a backend implements ([`HypervisorAArch64`], [`VmAArch64`],
//! [`VcpuAArch64`]): one-reg access by ID, vCPU init with PSCI, the GICv3.
//!
//! **Status:** the shape is here so the neutral builder and runner compile for arm64 and the
//! KVM and HVF backends have their traits; loading a kernel (the arm64 boot protocol and the
//! device tree) is not written yet, so [`load_guest`] refuses with
//! [`BuildError::Unsupported`](crate::BuildError::Unsupported).

pub mod hypervisor;
pub mod layout;
pub mod state;

pub use hypervisor::{HypervisorAArch64, VcpuAArch64, VmAArch64, VmOptions};
pub use state::{GicState, OneReg, VcpuState, VmState};

/// This architecture's hypervisor extension (the [`arch`](crate::arch) contract).
pub use hypervisor::HypervisorAArch64 as ArchHypervisor;
/// This architecture's vCPU extension (the [`arch`](crate::arch) contract).
pub use hypervisor::VcpuAArch64 as ArchVcpu;
/// This architecture's VM extension (the [`arch`](crate::arch) contract).
pub use hypervisor::VmAArch64 as ArchVm;

/// The most vCPUs a VM can have (redistributor frames below the distributor).
pub const MAX_VCPUS: u8 = layout::MAX_VCPUS;

/// Guest RAM of `size` bytes: one range from [`layout::RAM_START`].
pub fn ram_ranges(size: u64) -> Vec<(vm_memory::GuestAddress, usize)> {
    vec![(vm_memory::GuestAddress(layout::RAM_START), size as usize)]
}

/// Errors preparing an arm64 guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The boot code for this architecture is not written yet.
    #[error("booting an arm64 guest: {0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Loads the guest: not implemented on arm64 yet.
pub fn load_guest(
    memory: &crate::GuestMemory,
    resources: &crate::VmResources,
    vcpus: &mut [Box<dyn VcpuAArch64>],
) -> Result<(), crate::BuildError> {
    let _ = (memory, resources, vcpus);
    Err(crate::BuildError::Unsupported)
}
