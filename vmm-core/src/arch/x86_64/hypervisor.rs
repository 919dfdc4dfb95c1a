//! The x86-64 extension traits a backend implements on top of the neutral
//! [`Hypervisor`], [`Vm`] and [`Vcpu`]: VM creation with the x86 interrupt controllers and
//! timer, vCPUs with a CPU model (CPUID, MSRs, local APIC), their registers, and the state a
//! snapshot saves.

use crate::hypervisor::{Hypervisor, HypervisorError, IrqChipKind, Vcpu, Vm};
use crate::memory::GuestMemory;

use super::regs::{SpecialRegisters, StandardRegisters};
use super::state::{VcpuState, VmState};

/// How an x86-64 VM is put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmOptions {
    /// Where the PIC, IOAPIC and PIT are emulated (the local APIC is the hypervisor's).
    pub irq_chip: IrqChipKind,
}

/// A hypervisor that creates x86-64 VMs.
pub trait HypervisorX86_64: Hypervisor {
    /// Creates a VM whose guest physical memory is `memory`. Memory comes first because some
    /// backends (KVM) pay a grace period for every memory-map change made after in-kernel
    /// devices exist.
    fn create_vm(
        &self,
        memory: &GuestMemory,
        options: &VmOptions,
    ) -> Result<Box<dyn VmX86_64>, HypervisorError>;
}

/// An x86-64 VM: creates its vCPUs and saves what is VM-wide (interrupt controllers, PIT,
/// clock).
pub trait VmX86_64: Vm {
    /// Creates vCPU `id` of `count`, with the backend's reset state and CPU model (CPUID with the
    /// topology filled in, boot MSRs, FPU and LAPIC defaults).
    fn create_vcpu(&self, id: u8, count: u8) -> Result<Box<dyn VcpuX86_64>, HypervisorError>;
    /// Saves the interrupt controllers, timer and clock (vCPUs stopped).
    fn save_state(&self) -> Result<VmState, HypervisorError> {
        Err(no_snapshots())
    }
    /// Restores what [`save_state`](Self::save_state) saved, before the vCPUs run.
    fn restore_state(&self, state: &VmState) -> Result<(), HypervisorError> {
        let _ = state;
        Err(no_snapshots())
    }
}

/// An x86-64 vCPU: registers and the state a snapshot saves.
pub trait VcpuX86_64: Vcpu {
    /// Reads the general-purpose registers.
    fn regs(&self) -> Result<StandardRegisters, HypervisorError>;
    /// Writes the general-purpose registers.
    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<(), HypervisorError>;
    /// Reads the segment, control and descriptor-table registers.
    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError>;
    /// Writes the segment, control and descriptor-table registers.
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<(), HypervisorError>;
    /// Saves everything needed to resume this vCPU (registers, XSAVE, LAPIC, MSRs, pending
    /// events). Called on the vCPU's thread after [`run`](Vcpu::run) returned; the backend
    /// first completes an I/O access it is in the middle of, so the state is between two
    /// instructions.
    fn save_state(&mut self) -> Result<VcpuState, HypervisorError> {
        Err(no_snapshots())
    }
    /// Restores what [`save_state`](Self::save_state) saved, on a vCPU that has not run yet.
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), HypervisorError> {
        let _ = state;
        Err(no_snapshots())
    }
}

fn no_snapshots() -> HypervisorError {
    HypervisorError::MissingCapability("snapshots (not implemented for this backend)".into())
}
