//! KVM hypervisor, VM and vCPU objects.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::arch::x86_64::regs::{SpecialRegisters, StandardRegisters, CR0_PG};
use vmm_core::arch::x86_64::{HypervisorX86_64, VcpuX86_64, VmOptions, VmX86_64};
use vmm_core::{
    BorrowedDescriptor, GuestMemory, Hypervisor, HypervisorError, IoHandler, IrqChip, IrqChipKind,
    IrqTrigger, Vcpu, VcpuExit, VcpuKicker, Vm,
};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{err, install_kick_handler, register_memory, KvmKicker};
use crate::x86_64::{cpuid, regs, state};
use vmm_core::arch::x86_64::state::{VcpuState, VmState};

/// KVM's private-memory addresses for Intel's real-mode emulation: just below the IOAPIC, in
/// the MMIO window, where no RAM is.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// An open `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
    supported_cpuid: CpuId,
    /// The MSRs a snapshot saves: every one KVM lists.
    msr_indices: Arc<Vec<u32>>,
}

impl KvmHypervisor {
    /// Whether this machine can run VMs with KVM (`/dev/kvm` opens and has what we need);
    /// [`new`](Self::new) says why not.
    pub fn is_available() -> bool {
        Self::new().is_ok()
    }

    /// Opens `/dev/kvm` and reads the CPU features it supports.
    pub fn new() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::Unavailable(
                "/dev/kvm does not exist (is the kvm module loaded and virtualization enabled?)"
                    .into(),
            ),
            libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied(
                "cannot open /dev/kvm (add yourself to the kvm group or fix its permissions)"
                    .into(),
            ),
            _ => HypervisorError::Unavailable(format!("cannot open /dev/kvm: {e}")),
        })?;
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name.into()));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(KvmHypervisor {
            kvm,
            supported_cpuid,
            msr_indices: Arc::new(msr_indices),
        })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }
}

impl HypervisorX86_64 for KvmHypervisor {
    fn create_vm(
        &self,
        memory: &GuestMemory,
        options: &VmOptions,
    ) -> Result<Box<dyn VmX86_64>, HypervisorError> {
        if options.irq_chip != IrqChipKind::InKernel {
            return Err(HypervisorError::MissingCapability(
                "a userspace interrupt controller (the KVM backend uses KVM's in-kernel PIC, \
                 IOAPIC and PIT)"
                    .into(),
            ));
        }
        let fd = self.kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        // Memory slots before the irqchip and PIT: once those exist, every slot change waits
        // for an SRCU grace period (5 ms here, most of a VM's start-up).
        register_memory(&fd, memory)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(err("KVM_CREATE_PIT2"))?;
        let fd = Arc::new(fd);
        Ok(Box::new(KvmVm {
            irq_chip: KvmIrqChip { fd: fd.clone() },
            fd,
            cpuid: self.supported_cpuid.clone(),
            memory: memory.clone(),
            msr_indices: self.msr_indices.clone(),
        }))
    }
}

struct KvmIrq(EventFd);

impl IrqTrigger for KvmIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// KVM's in-kernel PIC pair, IOAPIC and PIT on x86-64: devices raise lines through irqfds.
/// (arm64's vGIC has its own, see `aarch64.rs`.)
struct KvmIrqChip {
    fd: Arc<VmFd>,
}

impl IrqChip for KvmIrqChip {
    fn kind(&self) -> IrqChipKind {
        IrqChipKind::InKernel
    }

    fn line(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, HypervisorError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| HypervisorError::call("eventfd", e))?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(err("KVM_IRQFD"))?;
        Ok(Arc::new(KvmIrq(evt)))
    }
}

/// A KVM VM.
pub struct KvmVm {
    fd: Arc<VmFd>,
    irq_chip: KvmIrqChip,
    cpuid: CpuId,
    memory: GuestMemory,
    msr_indices: Arc<Vec<u32>>,
}

impl Vm for KvmVm {
    fn irq_chip(&self) -> &dyn IrqChip {
        &self.irq_chip
    }

    fn register_ioevent(
        &self,
        fd: BorrowedDescriptor<'_>,
        addr: u64,
        datamatch: u32,
    ) -> Result<bool, HypervisorError> {
        crate::common::register_ioevent(&self.fd, fd, addr, datamatch)
    }
}

impl VmX86_64 for KvmVm {
    fn create_vcpu(&self, id: u8, count: u8) -> Result<Box<dyn VcpuX86_64>, HypervisorError> {
        let memory = self.memory.clone();
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        regs::set_boot_msrs(&fd)?;
        regs::set_default_fpu(&fd)?;
        regs::set_lint(&fd)?;
        install_kick_handler()?;
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            memory,
            thread: Arc::new(AtomicU64::new(0)),
            msr_indices: self.msr_indices.clone(),
        }))
    }

    fn save_state(&self) -> Result<VmState, HypervisorError> {
        state::save_vm(&self.fd)
    }

    fn restore_state(&self, s: &VmState) -> Result<(), HypervisorError> {
        state::restore_vm(&self.fd, s)
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    id: u8,
    fd: VcpuFd,
    memory: GuestMemory,
    /// The pthread running this vCPU (0 before the first `run`), for kicks.
    thread: Arc<AtomicU64>,
    msr_indices: Arc<Vec<u32>>,
}

impl KvmVcpu {
    fn internal_error(&mut self) -> VcpuExit {
        let kvm_run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` member of the
        // union is the one KVM filled in.
        let suberror = unsafe { kvm_run.__bindgen_anon_1.internal.suberror };
        let reason = match suberror {
            1 => "emulation failure".to_string(),
            2 => "exception while delivering an exception".to_string(),
            3 => "failure while delivering an event".to_string(),
            4 => "unexpected exit reason".to_string(),
            n => format!("internal error {n}"),
        };
        let rip = self.fd.get_regs().ok().map(|r| r.rip);
        let instruction = rip
            .and_then(|rip| self.linear_to_physical(rip))
            .map(|gpa| {
                let mut bytes = vec![0u8; 15];
                match self.memory.read_slice(&mut bytes, GuestAddress(gpa)) {
                    Ok(()) => bytes,
                    Err(_) => Vec::new(),
                }
            })
            .unwrap_or_default();
        VcpuExit::InternalError {
            reason,
            rip,
            instruction,
        }
    }

    fn linear_to_physical(&self, rip: u64) -> Option<u64> {
        let sregs = self.fd.get_sregs().ok()?;
        let linear = sregs.cs.base.wrapping_add(rip);
        if sregs.cr0 & CR0_PG == 0 {
            return Some(linear);
        }
        let t = self.fd.translate_gva(linear).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError> {
        crate::common::note_vcpu_thread(&self.thread);
        let exit = match crate::common::common_exit(self.fd.run(), io)? {
            Ok(exit) => exit,
            Err(KvmExit::IoIn(port, data)) => {
                io.pio_read(port, data);
                VcpuExit::Io
            }
            Err(KvmExit::IoOut(port, data)) => {
                io.pio_write(port, data);
                VcpuExit::Io
            }
            Err(KvmExit::InternalError) => self.internal_error(),
            Err(other) => VcpuExit::Unknown(format!("{other:?}")),
        };
        Ok(exit)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(KvmKicker {
            thread: self.thread.clone(),
        })
    }
}

impl VcpuX86_64 for KvmVcpu {
    fn regs(&self) -> Result<StandardRegisters, HypervisorError> {
        Ok(regs::from_kvm_regs(
            &self.fd.get_regs().map_err(err("KVM_GET_REGS"))?,
        ))
    }

    fn set_regs(&mut self, r: &StandardRegisters) -> Result<(), HypervisorError> {
        self.fd
            .set_regs(&regs::to_kvm_regs(r))
            .map_err(err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError> {
        Ok(regs::from_kvm_sregs(
            &self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        ))
    }

    fn set_sregs(&mut self, s: &SpecialRegisters) -> Result<(), HypervisorError> {
        // Start from KVM's own copy so fields we do not model (the pending-interrupt bitmap)
        // stay as they are.
        let mut k = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        regs::apply_sregs(&mut k, s);
        self.fd.set_sregs(&k).map_err(err("KVM_SET_SREGS"))
    }

    fn save_state(&mut self) -> Result<VcpuState, HypervisorError> {
        state::save_vcpu(&mut self.fd, self.id, &self.msr_indices)
    }

    fn restore_state(&mut self, s: &VcpuState) -> Result<(), HypervisorError> {
        state::restore_vcpu(&self.fd, s)
    }
}
