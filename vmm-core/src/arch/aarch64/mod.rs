//! arm64: the guest physical layout, the neutral register and interrupt-controller state, and
//! the extension traits a backend implements ([`HypervisorAArch64`], [`VmAArch64`],
//! [`VcpuAArch64`]): one-reg access by ID, vCPU init with PSCI, the GICv3.
//!
//! The layout, the device tree, `Image` loading, the boot vCPU's registers and the GICv3
//! register catalogue are pure logic, unit-tested on every host; `vmm-kvm` implements the
//! traits on arm64 Linux.

pub mod boot;
pub mod fdt;
pub mod gic;
pub mod hypervisor;
pub mod layout;
pub mod regs;
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

pub use boot::BootError;

/// Loads the `Image` and initramfs of `resources`, writes the device tree (memory, CPUs, GIC,
/// timer, UART, the declared virtio-mmio `devices`) and sets the boot vCPU's registers
/// (`vcpus[0]`: PC at the kernel, `x0` = the device tree, EL1h with interrupts masked); the
/// others wait powered off for PSCI `CPU_ON`.
#[cfg(target_arch = "aarch64")]
pub fn load_guest(
    memory: &crate::GuestMemory,
    resources: &crate::VmResources,
    vcpus: &mut [Box<dyn VcpuAArch64>],
    devices: &[crate::builder::DeclaredDevice],
) -> Result<(), crate::BuildError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let ram = memory
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .next()
        .ok_or(BootError::TooLarge { what: "the kernel" })?;
    let kernel = boot::load_image(memory, &resources.kernel)?;
    let fdt = boot::configure_boot(
        memory,
        &kernel,
        ram,
        &resources.cmdline,
        &resources.initramfs,
        resources.vcpus,
        devices,
    )?;
    if let Some(boot_cpu) = vcpus.first_mut() {
        boot_cpu.set_one_reg(regs::PSTATE, regs::PSTATE_BOOT)?;
        boot_cpu.set_one_reg(regs::PC, u128::from(kernel.entry))?;
        boot_cpu.set_one_reg(regs::X0, u128::from(fdt))?;
    }
    Ok(())
}
