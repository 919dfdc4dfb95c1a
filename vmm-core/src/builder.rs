//! Turns [`VmResources`] into a VM that is ready to run: memory, backend VM, devices on the
//! buses, kernel and initramfs loaded, vCPUs created with the boot CPU's registers set.
//!
//! Building is two-phase because devices need interrupt lines from the backend VM before they
//! exist: [`VmBuilder::new`] creates memory and the VM, the caller attaches devices, and
//! [`VmBuilder::build`] loads the guest and creates the vCPUs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::arch::host::{self, ArchHypervisor, ArchVcpu, ArchVm, VcpuState, VmOptions, VmState};
use crate::bus::{BusDevice, BusError, IoBuses};
use crate::hypervisor::{HypervisorError, IrqTrigger};
use crate::memory::{create_guest_memory, GuestMemory, MemoryError};

/// A piece of the initramfs: newc archives may be concatenated, each starting 4-byte aligned.
#[derive(Debug, Clone)]
pub enum InitramfsPart {
    /// An archive file on the host.
    File(PathBuf),
    /// An archive built in memory (e.g. the per-VM configuration).
    Bytes(Vec<u8>),
}

/// A memory-mapped device the guest must be told about (on arm64 it goes into the device
/// tree; x86 guests learn theirs from the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredDevice {
    /// Its base address.
    pub addr: u64,
    /// The size of its window.
    pub len: u64,
    /// Its interrupt line (an SPI number on arm64).
    pub irq: u32,
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmResources {
    /// The guest kernel (ELF vmlinux, PVH ELF or bzImage on x86-64).
    pub kernel: PathBuf,
    /// The initramfs, as newc archives that are concatenated in guest memory.
    pub initramfs: Vec<InitramfsPart>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The backend failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The vCPU count is out of range.
    #[error("cannot run {0} vCPUs (1..={max})", max = MAX_VCPUS)]
    VcpuCount(u8),
    /// This platform cannot boot guests yet.
    #[error("booting guests is not supported on this platform yet")]
    Unsupported,
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] host::BootError),
}

/// The most vCPUs a VM can have.
pub const MAX_VCPUS: u8 = host::MAX_VCPUS;

/// A VM ready to run.
pub struct BuiltVm {
    /// The backend VM (keeps the VM alive while vCPUs run).
    pub vm: Box<dyn ArchVm>,
    /// One per vCPU, boot CPU first.
    pub vcpus: Vec<Box<dyn ArchVcpu>>,
    /// The buses vCPU exits are dispatched to.
    pub buses: Arc<IoBuses>,
    /// Guest RAM.
    pub memory: GuestMemory,
}

/// Builds a VM in two phases; see the module documentation.
pub struct VmBuilder {
    resources: VmResources,
    vm: Box<dyn ArchVm>,
    memory: GuestMemory,
    buses: IoBuses,
    declared: Vec<DeclaredDevice>,
}

impl VmBuilder {
    /// Creates guest memory and the backend VM.
    pub fn new(
        hypervisor: &dyn ArchHypervisor,
        resources: VmResources,
    ) -> Result<Self, BuildError> {
        if resources.vcpus == 0 || resources.vcpus > MAX_VCPUS {
            return Err(BuildError::VcpuCount(resources.vcpus));
        }
        let memory = create_guest_memory(resources.memory_mib)?;
        let vm = hypervisor.create_vm(&memory, &VmOptions::default())?;
        Ok(VmBuilder {
            resources,
            vm,
            memory,
            buses: IoBuses::default(),
            declared: Vec::new(),
        })
    }

    /// Creates the backend VM over guest memory that already holds a guest (a snapshot's),
    /// for [`restore`](Self::restore) instead of [`build`](Self::build).
    pub fn from_memory(
        hypervisor: &dyn ArchHypervisor,
        memory: GuestMemory,
        vcpus: u8,
    ) -> Result<Self, BuildError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(BuildError::VcpuCount(vcpus));
        }
        let vm = hypervisor.create_vm(&memory, &VmOptions::default())?;
        Ok(VmBuilder {
            resources: VmResources {
                kernel: PathBuf::new(),
                initramfs: Vec::new(),
                cmdline: String::new(),
                memory_mib: 0,
                vcpus,
            },
            vm,
            memory,
            buses: IoBuses::default(),
            declared: Vec::new(),
        })
    }

    /// Creates the vCPUs with saved state and restores the VM's interrupt controllers, timer
    /// and clock: a VM that continues where the snapshot stopped.
    pub fn restore(
        self,
        vm_state: &VmState,
        vcpu_states: &[VcpuState],
    ) -> Result<BuiltVm, BuildError> {
        let count = self.resources.vcpus;
        if vcpu_states.len() != usize::from(count) {
            return Err(BuildError::VcpuCount(vcpu_states.len() as u8));
        }
        let mut vcpus = Vec::with_capacity(vcpu_states.len());
        for (id, state) in vcpu_states.iter().enumerate() {
            let mut vcpu = self.vm.create_vcpu(id as u8, count)?;
            vcpu.restore_state(state)?;
            vcpus.push(vcpu);
        }
        self.vm.restore_state(vm_state)?;
        Ok(BuiltVm {
            vm: self.vm,
            vcpus,
            buses: Arc::new(self.buses),
            memory: self.memory,
        })
    }

    /// Guest RAM, for devices that access it.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// An interrupt line for a device.
    pub fn irq_trigger(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, BuildError> {
        Ok(self.vm.irq_trigger(gsi)?)
    }

    /// Appends kernel parameters (e.g. a device declaration) to the command line.
    pub fn append_cmdline(&mut self, params: &str) {
        let cmdline = &mut self.resources.cmdline;
        if !cmdline.is_empty() && !params.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(params);
    }

    /// Tells the guest about an MMIO device at boot (the arm64 device tree lists it).
    pub fn declare_mmio_device(&mut self, device: DeclaredDevice) {
        self.declared.push(device);
    }

    /// The backend VM, for device wiring such as [`Vm::register_ioevent`](crate::Vm::register_ioevent).
    pub fn vm(&self) -> &dyn ArchVm {
        self.vm.as_ref()
    }

    /// Places a device on the port-I/O bus at `[base, base + len)`.
    pub fn add_pio_device(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), BuildError> {
        Ok(self
            .buses
            .pio
            .insert(device, u64::from(base), u64::from(len))?)
    }

    /// Places a device on the MMIO bus at `[base, base + len)`.
    pub fn add_mmio_device(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BuildError> {
        Ok(self.buses.mmio.insert(device, base, len)?)
    }

    /// Loads the guest and creates the vCPUs.
    pub fn build(self) -> Result<BuiltVm, BuildError> {
        let count = self.resources.vcpus;
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            vcpus.push(self.vm.create_vcpu(id, count)?);
        }
        host::load_guest(&self.memory, &self.resources, &mut vcpus, &self.declared)?;
        Ok(BuiltVm {
            vm: self.vm,
            vcpus,
            buses: Arc::new(self.buses),
            memory: self.memory,
        })
    }
}
