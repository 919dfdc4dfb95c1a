//! The in-kernel vGICv3: created with the VM, initialised once every vCPU exists, the lines
//! devices raise (irqfds), and its state for snapshots through the device attributes
//! (`KVM_DEV_ARM_VGIC_GRP_{DIST,REDIST}_REGS`, `_CPU_SYSREGS`, `_LEVEL_INFO`).

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
    KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
    KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT, KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST, VGIC_LEVEL_INFO_LINE_LEVEL,
};
use kvm_ioctls::{DeviceFd, VmFd};
use vmm_core::arch::aarch64::gic::{self, CPU_SYSREGS, NR_IRQS};
use vmm_core::arch::aarch64::layout::{GICD_BASE, GICR_BASE};
use vmm_core::arch::aarch64::GicState;
use vmm_core::{HypervisorError, IrqChip, IrqChipKind, IrqTrigger};
use vmm_sys_util::eventfd::EventFd;

use crate::common::err;

/// The vGIC: the interrupt controller devices raise their lines on.
///
/// KVM on arm64 accepts irqfds only once the vGIC is initialised, and initialises it only once
/// every vCPU exists, while devices take their lines before the vCPUs are made: so a line's
/// eventfd is registered when the vGIC is initialised (by the first vCPU to run, or by a
/// restore), and an interrupt raised before then waits in the eventfd and is delivered at
/// registration.
pub(super) struct Vgic {
    fd: DeviceFd,
    vm: Arc<VmFd>,
    state: Mutex<Lines>,
}

#[derive(Default)]
struct Lines {
    ready: bool,
    /// Lines taken before the vGIC was initialised: (eventfd, SPI number from the first SPI).
    pending: Vec<(EventFd, u32)>,
}

impl Vgic {
    /// Creates the vGICv3 and places its distributor and redistributors (as the device tree
    /// says), with [`NR_IRQS`] interrupt IDs.
    pub(super) fn new(vm: Arc<VmFd>) -> Result<Vgic, HypervisorError> {
        let mut device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = vm
            .create_device(&mut device)
            .map_err(err("KVM_CREATE_DEVICE (vGICv3)"))?;
        for (kind, addr) in [
            (KVM_VGIC_V3_ADDR_TYPE_DIST, GICD_BASE),
            (KVM_VGIC_V3_ADDR_TYPE_REDIST, GICR_BASE),
        ] {
            set_attr(&fd, KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(kind), &addr)?;
        }
        set_attr(&fd, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &NR_IRQS)?;
        Ok(Vgic {
            fd,
            vm,
            state: Mutex::new(Lines::default()),
        })
    }

    /// `KVM_DEV_ARM_VGIC_CTRL_INIT`, once, after every vCPU was created, then the lines' irqfds.
    pub(super) fn init_once(&self) -> Result<(), HypervisorError> {
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

    /// Reads the distributor, every redistributor and CPU interface, and the SPIs' line levels
    /// (every vCPU stopped).
    pub(super) fn save(&self, vcpus: u8) -> Result<GicState, HypervisorError> {
        // Registers are readable only once the vGIC is initialised (a VM saved before any vCPU
        // ran has an initialised vGIC after this).
        self.init_once()?;
        let mut state = GicState::default();
        for offset in gic::distributor_registers(NR_IRQS) {
            let value = self.get_u32(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset))?;
            state.distributor.push((offset, value));
        }
        for cpu in 0..vcpus {
            let mpidr = mpidr_field(cpu);
            let mut regs = Vec::new();
            for offset in gic::redistributor_registers() {
                let value =
                    self.get_u32(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, mpidr | u64::from(offset))?;
                regs.push((offset, value));
            }
            state.redistributors.push(regs);
            let mut sysregs = Vec::new();
            for reg in CPU_SYSREGS {
                let attr = mpidr | u64::from(reg.instr());
                let mut value = 0u64;
                match self.get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, attr, &mut value) {
                    Ok(()) => sysregs.push((reg.instr(), value)),
                    // Active-priority registers this GIC's priority bits do not reach.
                    Err(e) if reg.name.starts_with("ICC_AP") && is_absent(&e) => {}
                    Err(e) => return Err(HypervisorError::call(reg.name, e)),
                }
            }
            state.cpu_interfaces.push(sysregs);
        }
        for intid in gic::line_level_groups(NR_IRQS) {
            let attr = level_info(intid);
            let bits = self.get_u32(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr)?;
            state.line_levels.push((intid, bits));
        }
        Ok(state)
    }

    /// Writes back what [`save`](Self::save) read, into this new VM's vGIC (every vCPU created
    /// and restored, none running yet): line levels before the pending latches they combine
    /// with, the distributor, then each redistributor and CPU interface.
    pub(super) fn restore(&self, state: &GicState, vcpus: u8) -> Result<(), HypervisorError> {
        if state.redistributors.len() != usize::from(vcpus)
            || state.cpu_interfaces.len() != usize::from(vcpus)
        {
            return Err(HypervisorError::call(
                "vGIC restore",
                format!(
                    "the snapshot has {} redistributors for {vcpus} vCPUs",
                    state.redistributors.len()
                ),
            ));
        }
        self.init_once()?;
        for &(intid, bits) in &state.line_levels {
            self.set(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, level_info(intid), &bits)?;
        }
        for &(offset, value) in &state.distributor {
            self.set(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset), &value)?;
        }
        for (cpu, (redist, sysregs)) in state
            .redistributors
            .iter()
            .zip(&state.cpu_interfaces)
            .enumerate()
        {
            let mpidr = mpidr_field(cpu as u8);
            for &(offset, value) in redist {
                self.set(
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    mpidr | u64::from(offset),
                    &value,
                )?;
            }
            for &(instr, value) in sysregs {
                self.set(
                    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                    mpidr | u64::from(instr),
                    &value,
                )?;
            }
        }
        Ok(())
    }

    fn get_u32(&self, group: u32, attr: u64) -> Result<u32, HypervisorError> {
        let mut value = 0u32;
        self.get(group, attr, &mut value)
            .map_err(|e| HypervisorError::call("KVM_GET_DEVICE_ATTR (vGIC)", e))?;
        Ok(value)
    }

    /// Reads attribute `attr` of `group` into `value` (a `u32` or `u64`, as the group says).
    fn get<T: Copy>(&self, group: u32, attr: u64, value: &mut T) -> Result<(), kvm_ioctls::Error> {
        let mut request = kvm_device_attr {
            group,
            attr,
            addr: value as *mut T as u64,
            flags: 0,
        };
        // SAFETY: `addr` points to `value`, a live, writable `T` of the size this group's
        // attributes have (32 bits for registers and levels, 64 for system registers), and the
        // kernel writes no more than that.
        unsafe { self.fd.get_device_attr(&mut request) }
    }

    fn set<T>(&self, group: u32, attr: u64, value: &T) -> Result<(), HypervisorError> {
        set_attr(&self.fd, group, attr, value).map_err(|e| match e {
            HypervisorError::Call { op, detail } => {
                HypervisorError::call(op, format!("group {group}, attribute {attr:#x}: {detail}"))
            }
            other => other,
        })
    }
}

/// Whether a vGIC access failed because the register does not exist on this GIC.
fn is_absent(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::EINVAL | libc::ENXIO)
}

/// The `mpidr` field (bits 32-63) of vCPU `cpu`'s attributes: its affinity as KVM assigns it
/// (Aff0 the low 4 bits of the index, Aff1 the next 8).
fn mpidr_field(cpu: u8) -> u64 {
    let aff0 = u64::from(cpu & 0xf);
    let aff1 = u64::from(cpu >> 4);
    (aff0 | (aff1 << 8)) << 32
}

/// The `LEVEL_INFO` attribute for the line levels of the 32 interrupts from `intid`.
fn level_info(intid: u32) -> u64 {
    u64::from(VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | intid)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_name_the_vcpu_by_affinity() {
        assert_eq!(mpidr_field(0), 0);
        assert_eq!(mpidr_field(3), 3 << 32);
        assert_eq!(mpidr_field(17), (1 | (1 << 8)) << 32);
        assert_eq!(level_info(64), 64);
    }
}
