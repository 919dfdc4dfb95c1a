//! KVM on arm64: VMs with the in-kernel vGICv3, vCPUs initialised with PSCI 0.2 (every vCPU but
//! the boot one powered off until the guest's `CPU_ON`), registers by one-reg ID, MMIO exits
//! and PSCI system events turned into neutral exits.
//!
//! Snapshots: every register of the vCPU's list (`KVM_GET_REG_LIST` + one-reg) and its power
//! state; the vGIC's registers through its device attributes ([`vgic`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod vgic;

use std::sync::atomic::AtomicU8;

use kvm_bindings::{
    kvm_mp_state, kvm_vcpu_init, RegList, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_core::arch::aarch64::{
    HypervisorAArch64, OneReg, VcpuAArch64, VcpuState, VmAArch64, VmOptions, VmState,
};
use vmm_core::{
    BorrowedDescriptor, GuestMemory, Hypervisor, HypervisorError, IoHandler, IrqChip, IrqChipKind,
    Vcpu, VcpuExit, VcpuKicker, Vm,
};

use crate::common::{err, install_kick_handler, register_memory, KvmKicker};
use vgic::Vgic;

/// An open `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`.
    pub fn new() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::Unavailable(
                "/dev/kvm does not exist (is KVM enabled in the kernel?)".into(),
            ),
            libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied(
                "cannot open /dev/kvm (add yourself to the kvm group or fix its permissions)"
                    .into(),
            ),
            _ => HypervisorError::Unavailable(format!("cannot open /dev/kvm: {e}")),
        })?;
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::OneReg, "KVM_CAP_ONE_REG"),
            (kvm_ioctls::Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name.into()));
            }
        }
        Ok(KvmHypervisor { kvm })
    }

    /// Whether this machine can run VMs with KVM; [`new`](Self::new) says why not.
    pub fn is_available() -> bool {
        Self::new().is_ok()
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }
}

impl HypervisorAArch64 for KvmHypervisor {
    fn create_vm(
        &self,
        memory: &GuestMemory,
        options: &VmOptions,
    ) -> Result<Box<dyn VmAArch64>, HypervisorError> {
        if options.irq_chip != IrqChipKind::InKernel {
            return Err(HypervisorError::MissingCapability(
                "a userspace interrupt controller (the KVM backend uses the in-kernel vGIC)".into(),
            ));
        }
        let fd = self.kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        register_memory(&fd, memory)?;
        let fd = Arc::new(fd);
        Ok(Box::new(KvmVm {
            gic: Arc::new(Vgic::new(fd.clone())?),
            vcpus: AtomicU8::new(0),
            fd,
        }))
    }
}

/// A KVM VM on arm64.
pub struct KvmVm {
    fd: Arc<VmFd>,
    gic: Arc<Vgic>,
    /// How many vCPUs the VM has (for the vGIC's per-CPU state).
    vcpus: AtomicU8,
}

impl Vm for KvmVm {
    fn irq_chip(&self) -> &dyn IrqChip {
        self.gic.as_ref()
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

impl VmAArch64 for KvmVm {
    fn create_vcpu(&self, id: u8, count: u8) -> Result<Box<dyn VcpuAArch64>, HypervisorError> {
        self.vcpus.store(count, Ordering::Relaxed);
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let mut init = kvm_vcpu_init::default();
        self.fd
            .get_preferred_target(&mut init)
            .map_err(err("KVM_ARM_PREFERRED_TARGET"))?;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if id > 0 {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        fd.vcpu_init(&init).map_err(err("KVM_ARM_VCPU_INIT"))?;
        install_kick_handler()?;
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            gic: self.gic.clone(),
            thread: Arc::new(AtomicU64::new(0)),
        }))
    }

    fn save_state(&self) -> Result<VmState, HypervisorError> {
        Ok(VmState {
            gic: self.gic.save(self.vcpus.load(Ordering::Relaxed))?,
        })
    }

    fn restore_state(&self, state: &VmState) -> Result<(), HypervisorError> {
        self.gic
            .restore(&state.gic, self.vcpus.load(Ordering::Relaxed))
    }
}

/// A KVM vCPU on arm64.
pub struct KvmVcpu {
    id: u8,
    fd: VcpuFd,
    gic: Arc<Vgic>,
    /// The pthread running this vCPU (0 before the first `run`), for kicks.
    thread: Arc<AtomicU64>,
}

/// A one-reg ID's value size in bytes (bits 52-55 hold log2 of it).
fn reg_size(id: u64) -> usize {
    1 << ((id >> 52) & 0xf)
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError> {
        crate::common::note_vcpu_thread(&self.thread);
        self.gic.init_once()?;
        let exit = match crate::common::common_exit(self.fd.run(), io)? {
            Ok(exit) => exit,
            Err(KvmExit::InternalError) => VcpuExit::InternalError {
                reason: "KVM internal error".into(),
                rip: None,
                instruction: Vec::new(),
            },
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

impl VcpuAArch64 for KvmVcpu {
    fn reg_list(&self) -> Result<Vec<u64>, HypervisorError> {
        // The most kvm-bindings' list holds (KVM lists about 450 on today's cores).
        const MOST: usize = 500;
        let mut list = RegList::new(MOST).map_err(|e| HypervisorError::call("reg list", e))?;
        self.fd
            .get_reg_list(&mut list)
            .map_err(err("KVM_GET_REG_LIST"))?;
        Ok(list.as_slice().to_vec())
    }

    fn one_reg(&self, id: u64) -> Result<u128, HypervisorError> {
        let mut bytes = [0u8; 16];
        let size = reg_size(id).min(16);
        self.fd
            .get_one_reg(id, &mut bytes[..size])
            .map_err(err("KVM_GET_ONE_REG"))?;
        Ok(u128::from_le_bytes(bytes))
    }

    fn set_one_reg(&mut self, id: u64, value: u128) -> Result<(), HypervisorError> {
        let bytes = value.to_le_bytes();
        let size = reg_size(id).min(16);
        self.fd
            .set_one_reg(id, &bytes[..size])
            .map_err(err("KVM_SET_ONE_REG"))?;
        Ok(())
    }

    fn save_state(&mut self) -> Result<VcpuState, HypervisorError> {
        let mut regs = Vec::new();
        for id in self.reg_list()? {
            if reg_size(id) > 16 {
                // SVE's vector registers: never enabled at vCPU init, so never listed.
                return Err(HypervisorError::call(
                    "KVM_GET_ONE_REG",
                    format!("register {id:#x} is wider than 128 bits"),
                ));
            }
            regs.push(OneReg {
                id,
                value: self.one_reg(id)?,
            });
        }
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(err("KVM_GET_MP_STATE"))?
            .mp_state;
        Ok(VcpuState {
            id: self.id,
            regs,
            mp_state,
        })
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<(), HypervisorError> {
        // In the order KVM listed them at the save (it lists the core registers first, the
        // timer's counter after the control registers that give it meaning).
        for reg in &state.regs {
            self.set_one_reg(reg.id, reg.value).map_err(|e| match e {
                HypervisorError::Call { op, detail } => HypervisorError::Call {
                    op,
                    detail: format!("register {:#x}: {detail}", reg.id),
                },
                other => other,
            })?;
        }
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: state.mp_state,
            })
            .map_err(err("KVM_SET_MP_STATE"))
    }
}
