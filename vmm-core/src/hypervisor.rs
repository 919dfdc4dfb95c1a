//! Backend traits: a [`Hypervisor`] creates [`Vm`]s, a `Vm` creates [`Vcpu`]s.
//!
//! The exit type is neutral: a backend completes port and MMIO accesses itself by calling the
//! [`IoHandler`] it is given, so on platforms where the hypervisor emulates the instruction (HVF,
//! WHP) the data never has to pass through a KVM-shaped run page.

use std::sync::Arc;

use crate::memory::GuestMemory;

#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::regs::{SpecialRegisters, StandardRegisters};
#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::state::{VcpuState, VmState};

#[cfg(target_arch = "x86_64")]
fn no_snapshots() -> HypervisorError {
    HypervisorError::MissingCapability("snapshots (not implemented for this backend)".into())
}

/// Errors a backend reports. Backends carry their OS error as text so the trait stays neutral.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor device or API is not present on this machine.
    #[error("hypervisor not available: {0}")]
    Unavailable(String),
    /// The hypervisor exists but this process may not use it.
    #[error("no permission to use the hypervisor: {0}")]
    PermissionDenied(String),
    /// A backend call failed.
    #[error("{op} failed: {detail}")]
    Call {
        /// The operation that failed, e.g. `KVM_CREATE_VM`.
        op: &'static str,
        /// The OS or platform error.
        detail: String,
    },
    /// The backend lacks a capability the VMM needs.
    #[error("missing hypervisor capability: {0}")]
    MissingCapability(String),
}

impl HypervisorError {
    /// Shorthand for a failed backend call.
    pub fn call(op: &'static str, detail: impl std::fmt::Display) -> Self {
        HypervisorError::Call {
            op,
            detail: detail.to_string(),
        }
    }
}

/// An open hypervisor able to create VMs.
pub trait Hypervisor: Send + Sync {
    /// A short name for messages (`kvm`, `hvf`, `whp`).
    fn name(&self) -> &'static str;
    /// Creates a VM whose guest physical memory is `memory`, with its interrupt controller and
    /// timer. Memory comes first because some backends (KVM) pay a grace period for every
    /// memory-map change made after in-kernel devices exist.
    fn create_vm(&self, memory: &GuestMemory) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// Something that raises one guest interrupt (edge-triggered).
pub trait IrqTrigger: Send + Sync {
    /// Injects the interrupt.
    fn trigger(&self) -> std::io::Result<()>;
}

/// A VM: interrupt routing and vCPUs over the guest memory it was created with.
pub trait Vm: Send + Sync {
    /// Returns a trigger for global system interrupt `gsi`.
    fn irq_trigger(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, HypervisorError>;
    /// Makes a guest write of `datamatch` (4 bytes) to MMIO address `addr` signal the eventfd
    /// `fd` in the kernel, without a vCPU exit to the VMM. Returns `Ok(false)` where the backend
    /// has no such mechanism: the write then reaches the device on the MMIO bus.
    #[cfg(unix)]
    fn register_ioevent(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        addr: u64,
        datamatch: u32,
    ) -> Result<bool, HypervisorError> {
        let _ = (fd, addr, datamatch);
        Ok(false)
    }
    /// Creates vCPU `id` of `count`, with the backend's reset state and CPU model.
    fn create_vcpu(&self, id: u8, count: u8) -> Result<Box<dyn Vcpu>, HypervisorError>;
    /// Saves the interrupt controllers, timer and clock (vCPUs stopped).
    #[cfg(target_arch = "x86_64")]
    fn save_state(&self) -> Result<VmState, HypervisorError> {
        Err(no_snapshots())
    }
    /// Restores what [`save_state`](Self::save_state) saved, before the vCPUs run.
    #[cfg(target_arch = "x86_64")]
    fn restore_state(&self, state: &VmState) -> Result<(), HypervisorError> {
        let _ = state;
        Err(no_snapshots())
    }
}

/// Completes the port and MMIO accesses of a running vCPU.
pub trait IoHandler: Send + Sync {
    /// A guest read of `data.len()` bytes from I/O port `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A guest write to I/O port `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A guest read of `data.len()` bytes at guest physical `addr`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A guest write at guest physical `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// A port access was completed through the [`IoHandler`].
    Io,
    /// An MMIO access was completed through the [`IoHandler`].
    Mmio,
    /// The vCPU halted (only seen without an in-kernel interrupt controller).
    Hlt,
    /// The vCPU was kicked out of guest mode (signal or explicit exit request).
    Interrupted,
    /// The guest asked to reset the machine.
    Reset,
    /// The guest asked to power the machine off.
    PowerOff,
    /// The vCPU hit a triple fault or another fatal shutdown condition.
    Shutdown,
    /// The hypervisor could not emulate what the guest did.
    InternalError {
        /// What the hypervisor reported.
        reason: String,
        /// The guest instruction pointer, if it could be read.
        rip: Option<u64>,
        /// The bytes at the instruction pointer, if they could be read.
        instruction: Vec<u8>,
    },
    /// The VM entry failed (invalid guest state).
    FailEntry(String),
    /// An exit the VMM does not know.
    Unknown(String),
}

/// Kicks one vCPU out of guest mode, from any thread.
pub trait VcpuKicker: Send + Sync {
    /// Makes a running [`Vcpu::run`] return soon with [`VcpuExit::Interrupted`]. May be called
    /// repeatedly; a kick that arrives while the vCPU is outside guest mode may be lost, so callers
    /// keep kicking until the vCPU thread acknowledges.
    fn kick(&self);
}

/// One virtual CPU. `run` is called on a dedicated thread.
pub trait Vcpu: Send {
    /// The vCPU index (also its APIC ID on x86).
    fn id(&self) -> u8;
    /// Enters the guest until the next exit that needs the VMM.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError>;
    /// A handle other threads use to kick this vCPU out of guest mode.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// Reads the general-purpose registers.
    #[cfg(target_arch = "x86_64")]
    fn regs(&self) -> Result<StandardRegisters, HypervisorError>;
    /// Writes the general-purpose registers.
    #[cfg(target_arch = "x86_64")]
    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<(), HypervisorError>;
    /// Reads the segment, control and descriptor-table registers.
    #[cfg(target_arch = "x86_64")]
    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError>;
    /// Writes the segment, control and descriptor-table registers.
    #[cfg(target_arch = "x86_64")]
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<(), HypervisorError>;
    /// Saves everything needed to resume this vCPU. Called on the vCPU's thread after
    /// [`run`](Self::run) returned; the backend first completes an I/O access it is in the
    /// middle of, so the state is between two instructions.
    #[cfg(target_arch = "x86_64")]
    fn save_state(&mut self) -> Result<VcpuState, HypervisorError> {
        Err(no_snapshots())
    }
    /// Restores what [`save_state`](Self::save_state) saved, on a vCPU that has not run yet.
    #[cfg(target_arch = "x86_64")]
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), HypervisorError> {
        let _ = state;
        Err(no_snapshots())
    }
}
