//! The arm64 extension traits a backend implements on top of the neutral
//! [`Hypervisor`], [`Vm`] and [`Vcpu`].

use crate::hypervisor::{Hypervisor, HypervisorError, IrqChipKind, Vcpu, Vm};
use crate::memory::GuestMemory;

use super::state::{VcpuState, VmState};

/// How an arm64 VM is put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmOptions {
    /// Where the GICv3 is emulated.
    pub irq_chip: IrqChipKind,
}

/// A hypervisor that creates arm64 VMs.
pub trait HypervisorAArch64: Hypervisor {
    /// Creates a VM over `memory` with its GICv3.
    fn create_vm(
        &self,
        memory: &GuestMemory,
        options: &VmOptions,
    ) -> Result<Box<dyn VmAArch64>, HypervisorError>;
}

/// An arm64 VM.
pub trait VmAArch64: Vm {
    /// Creates vCPU `id` of `count` and initialises it with PSCI 0.2 or later; every vCPU but
    /// 0 starts powered off, waiting for the guest's PSCI `CPU_ON`.
    fn create_vcpu(&self, id: u8, count: u8) -> Result<Box<dyn VcpuAArch64>, HypervisorError>;
    /// Saves the GIC (vCPUs stopped).
    fn save_state(&self) -> Result<VmState, HypervisorError>;
    /// Restores what [`save_state`](Self::save_state) saved, after the vCPUs are restored.
    fn restore_state(&self, state: &VmState) -> Result<(), HypervisorError>;
}

/// An arm64 vCPU: registers by one-reg ID.
pub trait VcpuAArch64: Vcpu {
    /// The IDs of every register this vCPU has (what a snapshot saves).
    fn reg_list(&self) -> Result<Vec<u64>, HypervisorError>;
    /// Reads one register.
    fn one_reg(&self, id: u64) -> Result<u128, HypervisorError>;
    /// Writes one register.
    fn set_one_reg(&mut self, id: u64, value: u128) -> Result<(), HypervisorError>;
    /// Saves every register and the power state (on the vCPU's thread, after `run` returned).
    fn save_state(&mut self) -> Result<VcpuState, HypervisorError>;
    /// Restores what [`save_state`](Self::save_state) saved, before the vCPU first runs.
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), HypervisorError>;
}
