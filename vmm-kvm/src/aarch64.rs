//! KVM on arm64: VMs with the in-kernel vGICv3, vCPUs initialised with PSCI 0.2 (every vCPU but
//! the boot one powered off until the guest's `CPU_ON`), registers by one-reg ID, MMIO exits
//! and PSCI system events turned into neutral exits.
//!
//! Status: compiles and is checked in CI for `aarch64-unknown-linux-gnu`; booting a guest with
//! it in the emulated arm64 host, and vCPU/vGIC snapshots, are the next steps (issue 20).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init,
    RegList, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_core::arch::aarch64::layout::{GICD_BASE, GICR_BASE};
use vmm_core::arch::aarch64::{
    HypervisorAArch64, VcpuAArch64, VcpuState, VmAArch64, VmOptions, VmState,
};
use vmm_core::{
    BorrowedDescriptor, GuestMemory, Hypervisor, HypervisorError, IoHandler, IrqChip, IrqChipKind,
    IrqTrigger, Vcpu, VcpuExit, VcpuKicker, Vm,
};

use crate::common::{err, install_kick_handler, register_memory, KvmKicker};
use vmm_sys_util::eventfd::EventFd;

/// Interrupt lines the vGIC gets: the 32 private ones and 96 SPIs.
const GIC_NR_IRQS: u32 = 128;

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
        let gic = create_vgic(&fd)?;
        let fd = Arc::new(fd);
        Ok(Box::new(KvmVm {
            gic: Arc::new(Vgic {
                fd: gic,
                vm: fd.clone(),
                state: Mutex::new(VgicState::default()),
            }),
            fd,
        }))
    }
}

/// Creates the vGICv3 and places its distributor and redistributors (as the device tree says).
/// It is initialised later, once every vCPU exists ([`Vgic::init_once`]).
fn create_vgic(vm: &VmFd) -> Result<DeviceFd, HypervisorError> {
    let mut device = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut device)
        .map_err(err("KVM_CREATE_DEVICE (vGICv3)"))?;
    for (kind, addr) in [
        (KVM_VGIC_V3_ADDR_TYPE_DIST, GICD_BASE),
        (KVM_VGIC_V3_ADDR_TYPE_REDIST, GICR_BASE),
    ] {
        set_attr(&gic, KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(kind), &addr)?;
    }
    set_attr(&gic, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &GIC_NR_IRQS)?;
    Ok(gic)
}

/// Sets a device attribute whose value is the plain-old-data at `value`.
fn set_attr<T>(device: &DeviceFd, group: u32, attr: u64, value: &T) -> Result<(), HypervisorError> {
    let attr = kvm_device_attr {
        group,
        attr,
        addr: value as *const T as u64,
        flags: 0,
    };
    device
        .set_device_attr(&attr)
        .map_err(err("KVM_SET_DEVICE_ATTR (vGIC)"))
}

/// The vGIC: the interrupt controller devices raise their lines on.
///
/// KVM on arm64 accepts irqfds only once the vGIC is initialised, and initialises it only once
/// every vCPU exists, while devices take their lines before the vCPUs are made: so a line's
/// eventfd is registered when the vGIC is initialised (by the first vCPU to run), and an
/// interrupt raised before then waits in the eventfd and is delivered at registration.
struct Vgic {
    fd: DeviceFd,
    vm: Arc<VmFd>,
    state: Mutex<VgicState>,
}

#[derive(Default)]
struct VgicState {
    ready: bool,
    /// Lines taken before the vGIC was initialised: (eventfd, SPI number from the first SPI).
    pending: Vec<(EventFd, u32)>,
}

impl Vgic {
    /// `KVM_DEV_ARM_VGIC_CTRL_INIT`, once, after every vCPU was created, then the lines' irqfds.
    fn init_once(&self) -> Result<(), HypervisorError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.ready {
            let attr = kvm_device_attr {
                group: KVM_DEV_ARM_VGIC_GRP_CTRL,
                attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
                addr: 0,
                flags: 0,
            };
            self.fd
                .set_device_attr(&attr)
                .map_err(err("KVM_DEV_ARM_VGIC_CTRL_INIT"))?;
            for (evt, gsi) in state.pending.drain(..) {
                self.vm
                    .register_irqfd(&evt, gsi)
                    .map_err(err("KVM_IRQFD"))?;
            }
            state.ready = true;
        }
        Ok(())
    }
}

struct SpiLine(EventFd);

impl IrqTrigger for SpiLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl IrqChip for Vgic {
    fn kind(&self) -> IrqChipKind {
        IrqChipKind::InKernel
    }

    fn line(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, HypervisorError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| HypervisorError::call("eventfd", e))?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ready {
            self.vm
                .register_irqfd(&evt, gsi)
                .map_err(err("KVM_IRQFD"))?;
        } else {
            let kept = evt
                .try_clone()
                .map_err(|e| HypervisorError::call("eventfd", e))?;
            state.pending.push((kept, gsi));
        }
        Ok(Arc::new(SpiLine(evt)))
    }
}

/// A KVM VM on arm64.
pub struct KvmVm {
    fd: Arc<VmFd>,
    gic: Arc<Vgic>,
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
        let _ = count;
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
        Err(no_snapshots())
    }

    fn restore_state(&self, state: &VmState) -> Result<(), HypervisorError> {
        let _ = state;
        Err(no_snapshots())
    }
}

fn no_snapshots() -> HypervisorError {
    HypervisorError::MissingCapability("snapshots of arm64 VMs (not written yet)".into())
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
        let mut list = RegList::new(512).map_err(|e| HypervisorError::call("reg list", e))?;
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
        Err(no_snapshots())
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<(), HypervisorError> {
        let _ = state;
        Err(no_snapshots())
    }
}
