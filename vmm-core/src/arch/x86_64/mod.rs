//! x86-64: guest physical layout, boot protocols (PVH and the Linux 64-bit boot protocol),
//! the MP table that tells the guest its CPUs, the neutral register state, and the extension
//! traits a backend implements ([`HypervisorX86_64`], [`VmX86_64`], [`VcpuX86_64`]).

#[cfg(unix)]
pub mod boot;
pub mod hypervisor;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod state;

pub use hypervisor::{HypervisorX86_64, VcpuX86_64, VmOptions, VmX86_64};
pub use state::{VcpuState, VmState};

/// This architecture's hypervisor extension (the [`arch`](crate::arch) contract).
pub use hypervisor::HypervisorX86_64 as ArchHypervisor;
/// This architecture's vCPU extension (the [`arch`](crate::arch) contract).
pub use hypervisor::VcpuX86_64 as ArchVcpu;
/// This architecture's VM extension (the [`arch`](crate::arch) contract).
pub use hypervisor::VmX86_64 as ArchVm;

/// The most vCPUs a VM can have (what the MP table describes).
pub const MAX_VCPUS: u8 = mptable::MAX_VCPUS;

/// Guest RAM of `size` bytes as (start, length) ranges: below the MMIO gap first, the rest
/// above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(vm_memory::GuestAddress, usize)> {
    crate::memory::ram_ranges(size, layout::MMIO_GAP_START, layout::MMIO_GAP_END)
}

#[cfg(unix)]
pub use boot::BootError;

/// Errors preparing a guest to boot (none can happen where booting is not supported).
#[cfg(not(unix))]
#[derive(Debug, thiserror::Error)]
pub enum BootError {}

/// Loads the kernel and initramfs of `resources` into `memory`, writes the boot structures and
/// sets the boot vCPU's registers (`vcpus[0]`).
/// (The virtio-mmio `devices` are declared on the command line already: x86 guests have no
/// device tree.)
#[cfg(unix)]
pub fn load_guest(
    memory: &crate::GuestMemory,
    resources: &crate::VmResources,
    vcpus: &mut [Box<dyn VcpuX86_64>],
    devices: &[crate::builder::DeclaredDevice],
) -> Result<(), crate::BuildError> {
    let _ = devices;
    let kernel = boot::load_kernel(memory, &resources.kernel)?;
    let state = boot::configure_boot(
        memory,
        &kernel,
        &resources.cmdline,
        &resources.initramfs,
        resources.vcpus,
    )?;
    if let Some(boot_cpu) = vcpus.first_mut() {
        // Keep the backend's APIC base (enabled, BSP); the boot state does not set it.
        let mut sregs = state.sregs;
        sregs.apic_base = boot_cpu.sregs()?.apic_base;
        boot_cpu.set_sregs(&sregs)?;
        boot_cpu.set_regs(&state.regs)?;
    }
    Ok(())
}

/// Loads the guest: not supported on this operating system yet (the kernel loader needs Unix).
#[cfg(not(unix))]
pub fn load_guest(
    memory: &crate::GuestMemory,
    resources: &crate::VmResources,
    vcpus: &mut [Box<dyn VcpuX86_64>],
    devices: &[crate::builder::DeclaredDevice],
) -> Result<(), crate::BuildError> {
    let _ = (memory, resources, vcpus, devices);
    Err(crate::BuildError::Unsupported)
}
