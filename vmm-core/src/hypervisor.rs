//! The neutral backend traits: a [`Hypervisor`], its [`Vm`]s and their [`Vcpu`]s, as far as
//! every architecture shares them.
//!
//! Nothing here names an architecture. What differs per architecture (creating a VM with its
//! interrupt controllers, creating vCPUs with a CPU model, registers, saving and restoring
//! state) lives in the extension traits of each [`arch`](crate::arch) module
//! (`HypervisorX86_64`/`VmX86_64`/`VcpuX86_64`, `HypervisorAArch64`/…), which a backend
//! implements for the architectures it runs on.
//!
//! The exit type is neutral: a backend completes port and MMIO accesses itself by calling the
//! [`IoHandler`] it is given, so on platforms where the hypervisor emulates the instruction (HVF,
//! WHP) the data never has to pass through a KVM-shaped run page.

use std::sync::Arc;

use crate::descriptor::BorrowedDescriptor;

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

/// An open hypervisor. VMs are created through the architecture's extension trait
/// (e.g. `HypervisorX86_64::create_vm`), because what a VM is made of differs per architecture.
pub trait Hypervisor: Send + Sync {
    /// A short name for messages (`kvm`, `hvf`, `whp`).
    fn name(&self) -> &'static str;
}

/// Where a VM's interrupt controllers are emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqChipKind {
    /// By the hypervisor (KVM's in-kernel PIC, IOAPIC and PIT on x86-64; its vGIC on arm64;
    /// HVF's GIC on macOS 15): devices raise lines, the hypervisor delivers vectors.
    #[default]
    InKernel,
    /// By the VMM, as devices of its own (what WHP needs for the IOAPIC and PIC: it emulates
    /// only the local APIC). A backend that cannot deliver interrupts this way refuses it with
    /// [`HypervisorError::MissingCapability`].
    Userspace,
}

/// The interrupt controllers of one VM, seen from the devices: lines they raise.
pub trait IrqChip: Send + Sync {
    /// Where this chip is emulated.
    fn kind(&self) -> IrqChipKind;
    /// Returns a trigger for global system interrupt `gsi` (an IOAPIC pin on x86-64, an SPI
    /// number on arm64).
    fn line(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, HypervisorError>;
}

/// Something that raises one guest interrupt (edge-triggered).
pub trait IrqTrigger: Send + Sync {
    /// Injects the interrupt.
    fn trigger(&self) -> std::io::Result<()>;
}

/// A VM over the guest memory it was created with: its interrupt controllers and the
/// doorbells devices listen on. vCPUs and state are per architecture (`VmX86_64`, …).
pub trait Vm: Send + Sync {
    /// The VM's interrupt controllers.
    fn irq_chip(&self) -> &dyn IrqChip;
    /// Returns a trigger for global system interrupt `gsi`.
    fn irq_trigger(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, HypervisorError> {
        self.irq_chip().line(gsi)
    }
    /// Makes a guest write of `datamatch` (4 bytes) to MMIO address `addr` signal the eventfd
    /// `fd` in the kernel, without a vCPU exit to the VMM. Returns `Ok(false)` where the backend
    /// has no such mechanism: the write then reaches the device on the MMIO bus.
    fn register_ioevent(
        &self,
        fd: BorrowedDescriptor<'_>,
        addr: u64,
        datamatch: u32,
    ) -> Result<bool, HypervisorError> {
        let _ = (fd, addr, datamatch);
        Ok(false)
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
}
