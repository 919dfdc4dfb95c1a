//! The backend on Hypervisor.framework (Apple silicon, macOS 15 for the in-kernel GICv3):
//! `vmm-core`'s arm64 traits over the [`ffi`](crate::ffi) calls.
//!
//! - One VM per process (the framework's rule); guest RAM mapped once with `hv_vm_map`.
//! - vCPUs belong to the thread that creates them, while `vmm-core` creates vCPUs on the
//!   builder's thread and runs each on its own: so a vCPU is made at its first `run`, and
//!   register writes before then (boot registers, a restore) are kept and applied there.
//! - No irqfds and no ioeventfds: a device interrupt is `hv_gic_set_spi` (raised, then lowered:
//!   the device tree says edge-triggered) and a wake of vCPUs waiting in WFI; doorbells reach
//!   devices as MMIO writes.
//! - Traps the framework hands back are decoded here ([`syndrome`](crate::syndrome)): MMIO
//!   through the `IoHandler`, PSCI ([`psci`](crate::psci)) for CPU bring-up and power-off, WFI
//!   as a wait until an interrupt, the timer's deadline or a kick, unknown system registers as
//!   read-as-zero / writes ignored.
//! - Snapshots: vCPU registers in the neutral form ([`regmap`](crate::regmap)); the GIC's
//!   state is not saved yet, so a snapshot of an HVF VM is refused with that reason.
//!
//! **Built, not run here:** it compiles for `aarch64-apple-darwin` in CI; nobody has run it
//! on a Mac yet.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_core::arch::aarch64::layout::{GICD_BASE, GICR_BASE, SPI_BASE};
use vmm_core::arch::aarch64::{
    regs, HypervisorAArch64, OneReg, VcpuAArch64, VcpuState, VmAArch64, VmOptions, VmState,
};
use vmm_core::{
    BorrowedDescriptor, GuestMemory, Hypervisor, HypervisorError, IoHandler, IrqChip, IrqChipKind,
    IrqTrigger, Vcpu, VcpuExit, VcpuKicker, Vm,
};

use crate::ffi;
use crate::psci::{self, Outcome, PowerStates};
use crate::regmap::{self, HvfReg};
use crate::syndrome::{self, Trap};

fn check(op: &'static str, code: ffi::hv_return_t) -> Result<(), HypervisorError> {
    if code == ffi::HV_SUCCESS {
        Ok(())
    } else {
        Err(HypervisorError::call(op, format!("error {code:#x}")))
    }
}

/// Hypervisor.framework.
#[derive(Debug)]
pub struct HvfHypervisor {
    _private: (),
}

impl HvfHypervisor {
    /// Whether this Mac can run VMs (Apple silicon, the hypervisor entitlement).
    pub fn is_available() -> bool {
        Self::new().is_ok()
    }

    /// The framework; VMs are made by [`HypervisorAArch64::create_vm`].
    pub fn new() -> Result<Self, HypervisorError> {
        Ok(HvfHypervisor { _private: () })
    }
}

impl Hypervisor for HvfHypervisor {
    fn name(&self) -> &'static str {
        "hvf"
    }
}

impl HypervisorAArch64 for HvfHypervisor {
    fn create_vm(
        &self,
        memory: &GuestMemory,
        options: &VmOptions,
    ) -> Result<Box<dyn VmAArch64>, HypervisorError> {
        if options.irq_chip != IrqChipKind::InKernel {
            return Err(HypervisorError::MissingCapability(
                "a userspace GIC (this backend uses the framework's, macOS 15 or later)".into(),
            ));
        }
        // SAFETY: a null configuration asks for the defaults; the framework checks the rest
        // (one VM per process, the entitlement) and says so in its return code.
        let created = unsafe { ffi::hv_vm_create(std::ptr::null_mut()) };
        check(
            "hv_vm_create (is the process signed with com.apple.security.hypervisor?)",
            created,
        )?;
        for region in memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| HypervisorError::call("guest memory host address", e))?;
            // SAFETY: the region is a live mapping of `len` bytes that the VM's clone of
            // `memory` keeps alive as long as the VM.
            check("hv_vm_map", unsafe {
                ffi::hv_vm_map(
                    host.cast(),
                    region.start_addr().raw_value(),
                    region.len() as usize,
                    ffi::HV_MEMORY_RWX,
                )
            })?;
        }
        create_gic()?;
        let shared = Arc::new(Shared::default());
        Ok(Box::new(HvfVm {
            gic: Arc::new(HvfGic {
                shared: shared.clone(),
            }),
            shared,
            _memory: memory.clone(),
        }))
    }
}

/// The in-kernel GICv3 at the addresses the device tree gives.
fn create_gic() -> Result<(), HypervisorError> {
    // SAFETY: the configuration object is created, used and released here.
    unsafe {
        let config = ffi::hv_gic_config_create();
        if config.is_null() {
            return Err(HypervisorError::MissingCapability(
                "the in-kernel GIC (hv_gic_config_create; macOS 15 or later)".into(),
            ));
        }
        let result = check(
            "hv_gic_config_set_distributor_base",
            ffi::hv_gic_config_set_distributor_base(config, GICD_BASE),
        )
        .and_then(|_| {
            check(
                "hv_gic_config_set_redistributor_base",
                ffi::hv_gic_config_set_redistributor_base(config, GICR_BASE),
            )
        })
        .and_then(|_| check("hv_gic_create", ffi::hv_gic_create(config)));
        ffi::os_release(config);
        result
    }
}

/// What the vCPUs of a VM share: power states (PSCI), where started secondaries begin, the
/// handles kicks need, and the condition vCPUs wait on (WFI, powered off).
#[derive(Default)]
struct Shared {
    state: Mutex<SharedState>,
    wake: Condvar,
}

#[derive(Default)]
struct SharedState {
    power: Option<PowerStates>,
    /// Per vCPU: (entry, context) of a `CPU_ON` not yet taken up.
    start: Vec<Option<(u64, u64)>>,
    /// Per vCPU: its framework handle once made.
    handles: Vec<Option<ffi::hv_vcpu_t>>,
    /// Per vCPU: a kick not yet seen.
    kicked: Vec<bool>,
    /// Interrupts raised since a waiting vCPU last looked.
    interrupts: u64,
}

impl SharedState {
    fn sized(&mut self, count: u8) {
        let n = usize::from(count);
        if self.power.is_none() {
            self.power = Some(PowerStates::new(count));
        }
        self.start.resize(n, None);
        self.handles.resize(n, None);
        self.kicked.resize(n, false);
    }

    fn power(&mut self) -> &mut PowerStates {
        self.power.get_or_insert_with(|| PowerStates::new(1))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The GIC: SPIs raised through the framework.
struct HvfGic {
    shared: Arc<Shared>,
}

struct SpiLine {
    intid: u32,
    shared: Arc<Shared>,
}

impl IrqTrigger for SpiLine {
    fn trigger(&self) -> std::io::Result<()> {
        // SAFETY: plain calls on the process's GIC, which exists once the VM does.
        let raised = unsafe {
            let up = ffi::hv_gic_set_spi(self.intid, true);
            let down = ffi::hv_gic_set_spi(self.intid, false);
            up == ffi::HV_SUCCESS && down == ffi::HV_SUCCESS
        };
        let mut state = self.shared.lock();
        state.interrupts = state.interrupts.wrapping_add(1);
        drop(state);
        self.shared.wake.notify_all();
        if raised {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "hv_gic_set_spi({}) failed",
                self.intid
            )))
        }
    }
}

impl IrqChip for HvfGic {
    fn kind(&self) -> IrqChipKind {
        IrqChipKind::InKernel
    }

    fn line(&self, gsi: u32) -> Result<Arc<dyn IrqTrigger>, HypervisorError> {
        Ok(Arc::new(SpiLine {
            intid: SPI_BASE + gsi,
            shared: self.shared.clone(),
        }))
    }
}

/// A Hypervisor.framework VM.
pub struct HvfVm {
    shared: Arc<Shared>,
    gic: Arc<HvfGic>,
    _memory: GuestMemory,
}

impl Vm for HvfVm {
    fn irq_chip(&self) -> &dyn IrqChip {
        self.gic.as_ref()
    }

    fn register_ioevent(
        &self,
        _fd: BorrowedDescriptor<'_>,
        _addr: u64,
        _datamatch: u32,
    ) -> Result<bool, HypervisorError> {
        // No such mechanism: doorbell writes reach the device on the MMIO bus.
        Ok(false)
    }
}

fn no_gic_snapshots() -> HypervisorError {
    HypervisorError::MissingCapability(
        "snapshots of Hypervisor.framework VMs (the GIC's state is not saved yet)".into(),
    )
}

impl VmAArch64 for HvfVm {
    fn create_vcpu(&self, id: u8, count: u8) -> Result<Box<dyn VcpuAArch64>, HypervisorError> {
        self.shared.lock().sized(count);
        Ok(Box::new(HvfVcpu {
            id,
            shared: self.shared.clone(),
            handle: None,
            exit: std::ptr::null(),
            early: Vec::new(),
        }))
    }

    fn save_state(&self) -> Result<VmState, HypervisorError> {
        Err(no_gic_snapshots())
    }

    fn restore_state(&self, _state: &VmState) -> Result<(), HypervisorError> {
        Err(no_gic_snapshots())
    }
}

/// A Hypervisor.framework vCPU.
pub struct HvfVcpu {
    id: u8,
    shared: Arc<Shared>,
    /// Made at the first `run`, on the vCPU's thread.
    handle: Option<ffi::hv_vcpu_t>,
    exit: *const ffi::hv_vcpu_exit_t,
    /// Register writes before the vCPU exists, applied when it is made.
    early: Vec<(u64, u128)>,
}

// SAFETY: the framework handle is used only on the thread that made it: `run` makes it, and
// `vmm-core` runs a vCPU on one thread for its life. Before that the struct holds plain data.
unsafe impl Send for HvfVcpu {}

/// PSTATE for a vCPU started by `CPU_ON`: EL1h, interrupts masked (as at boot).
const PSTATE_CPU_ON: u64 = regs::PSTATE_BOOT as u64;

impl HvfVcpu {
    /// Makes the framework's vCPU on this thread, once; applies the early register writes.
    fn ensure_created(&mut self) -> Result<ffi::hv_vcpu_t, HypervisorError> {
        if let Some(handle) = self.handle {
            return Ok(handle);
        }
        let mut handle: ffi::hv_vcpu_t = 0;
        let mut exit: *const ffi::hv_vcpu_exit_t = std::ptr::null();
        // SAFETY: out-pointers to locals; a null configuration asks for the defaults.
        check("hv_vcpu_create", unsafe {
            ffi::hv_vcpu_create(&mut handle, &mut exit, std::ptr::null_mut())
        })?;
        self.handle = Some(handle);
        self.exit = exit;
        self.write(
            HvfReg::Sys(regmap::hv_sys::MPIDR_EL1),
            u128::from(psci::mpidr_of(self.id)),
        )?;
        for (id, value) in std::mem::take(&mut self.early) {
            self.set_one_reg(id, value)?;
        }
        let mut state = self.shared.lock();
        if let Some(slot) = state.handles.get_mut(usize::from(self.id)) {
            *slot = Some(handle);
        }
        Ok(handle)
    }

    fn read(&self, reg: HvfReg) -> Result<u128, HypervisorError> {
        let Some(vcpu) = self.handle else {
            return Err(HypervisorError::call(
                "read register",
                "the vCPU is not made yet",
            ));
        };
        let mut value = 0u64;
        // SAFETY: `vcpu` was made on this thread; out-pointers to locals.
        unsafe {
            match reg {
                HvfReg::Gpr(r) => {
                    check("hv_vcpu_get_reg", ffi::hv_vcpu_get_reg(vcpu, r, &mut value))?
                }
                HvfReg::Sys(r) => check(
                    "hv_vcpu_get_sys_reg",
                    ffi::hv_vcpu_get_sys_reg(vcpu, r, &mut value),
                )?,
                HvfReg::Simd(r) => {
                    let mut wide = 0u128;
                    check(
                        "hv_vcpu_get_simd_fp_reg",
                        ffi::hv_vcpu_get_simd_fp_reg(vcpu, r, &mut wide),
                    )?;
                    return Ok(wide);
                }
                HvfReg::VirtualCounter => {
                    let mut offset = 0u64;
                    check(
                        "hv_vcpu_get_vtimer_offset",
                        ffi::hv_vcpu_get_vtimer_offset(vcpu, &mut offset),
                    )?;
                    value = ffi::mach_absolute_time().wrapping_sub(offset);
                }
                HvfReg::Unmapped => {}
            }
        }
        Ok(u128::from(value))
    }

    fn write(&self, reg: HvfReg, value: u128) -> Result<(), HypervisorError> {
        let Some(vcpu) = self.handle else {
            return Err(HypervisorError::call(
                "write register",
                "the vCPU is not made yet",
            ));
        };
        let narrow = value as u64;
        // SAFETY: `vcpu` was made on this thread.
        unsafe {
            match reg {
                HvfReg::Gpr(r) => check("hv_vcpu_set_reg", ffi::hv_vcpu_set_reg(vcpu, r, narrow)),
                HvfReg::Sys(r) => check(
                    "hv_vcpu_set_sys_reg",
                    ffi::hv_vcpu_set_sys_reg(vcpu, r, narrow),
                ),
                HvfReg::Simd(r) => check(
                    "hv_vcpu_set_simd_fp_reg",
                    ffi::hv_vcpu_set_simd_fp_reg(vcpu, r, value),
                ),
                // The counter the guest reads is the host's minus the offset.
                HvfReg::VirtualCounter => check(
                    "hv_vcpu_set_vtimer_offset",
                    ffi::hv_vcpu_set_vtimer_offset(
                        vcpu,
                        ffi::mach_absolute_time().wrapping_sub(narrow),
                    ),
                ),
                // Firmware pseudo-registers and the like: PSCI is answered here.
                HvfReg::Unmapped => Ok(()),
            }
        }
    }

    fn gpr(&self, n: u8) -> Result<u64, HypervisorError> {
        // Register 31 is the zero register in loads, stores and calls.
        if n >= 31 {
            return Ok(0);
        }
        self.read(HvfReg::Gpr(u32::from(n))).map(|v| v as u64)
    }

    fn set_gpr(&self, n: u8, value: u64) -> Result<(), HypervisorError> {
        if n >= 31 {
            return Ok(());
        }
        self.write(HvfReg::Gpr(u32::from(n)), u128::from(value))
    }

    fn skip_instruction(&self) -> Result<(), HypervisorError> {
        let pc = self.read(HvfReg::Gpr(31))?;
        self.write(HvfReg::Gpr(31), pc + 4)
    }

    /// Waits while this vCPU is powered off; returns `false` if a kick came first. A `CPU_ON`
    /// naming it sets where it starts.
    fn wait_until_on(&mut self) -> Result<bool, HypervisorError> {
        let index = usize::from(self.id);
        let start = {
            let mut state = self.shared.lock();
            loop {
                if std::mem::take(&mut state.kicked[index]) {
                    return Ok(false);
                }
                if state.power().is_on(self.id) {
                    break state.start[index].take();
                }
                state = self
                    .shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        if let Some((entry, context)) = start {
            self.write(HvfReg::Gpr(31), u128::from(entry))?;
            self.write(HvfReg::Gpr(0), u128::from(context))?;
            self.write(HvfReg::Gpr(34), u128::from(PSTATE_CPU_ON))?;
        }
        Ok(true)
    }

    /// WFI: waits until an interrupt is raised, a kick comes, or a while passes (the virtual
    /// timer fires inside the framework and shows at the next entry).
    fn wait_for_interrupt(&self) {
        let index = usize::from(self.id);
        let state = self.shared.lock();
        let seen = state.interrupts;
        let _ = self
            .shared
            .wake
            .wait_timeout_while(state, Duration::from_millis(1), |s| {
                s.interrupts == seen && !s.kicked[index]
            });
    }

    /// Handles an `HVC`/`SMC` as a PSCI call. `None` goes on running; `Some` ends `run`.
    fn psci(&mut self) -> Result<Option<VcpuExit>, HypervisorError> {
        let args = [self.gpr(0)?, self.gpr(1)?, self.gpr(2)?, self.gpr(3)?];
        let outcome = self
            .shared
            .lock()
            .power()
            .handle(self.id, psci::decode(args));
        match outcome {
            Outcome::Return(value) => self.set_gpr(0, value as u64)?,
            Outcome::Start {
                index,
                entry,
                context,
            } => {
                if let Some(slot) = self.shared.lock().start.get_mut(usize::from(index)) {
                    *slot = Some((entry, context));
                }
                self.shared.wake.notify_all();
                self.set_gpr(0, psci::ret::SUCCESS as u64)?;
            }
            Outcome::PowerOffCaller => return Ok(Some(VcpuExit::Interrupted)),
            Outcome::Suspend => {
                self.wait_for_interrupt();
                self.set_gpr(0, psci::ret::SUCCESS as u64)?;
            }
            Outcome::SystemOff => return Ok(Some(VcpuExit::PowerOff)),
            Outcome::SystemReset => return Ok(Some(VcpuExit::Reset)),
        }
        Ok(None)
    }

    /// Emulates an MMIO access through `io`, then skips the instruction.
    fn mmio(
        &self,
        io: &dyn IoHandler,
        addr: u64,
        access: syndrome::MmioAccess,
    ) -> Result<(), HypervisorError> {
        if access.write {
            let value = self.gpr(access.register)?;
            io.mmio_write(addr, &access.store_bytes(value));
        } else {
            let mut data = [0u8; 8];
            let size = access.size.min(8);
            io.mmio_read(addr, &mut data[..size]);
            self.set_gpr(access.register, access.load_value(&data[..size]))?;
        }
        self.skip_instruction()
    }
}

impl Drop for HvfVcpu {
    fn drop(&mut self) {
        if let Some(vcpu) = self.handle {
            // SAFETY: made on this thread (vCPUs are dropped by the thread that ran them).
            unsafe { ffi::hv_vcpu_destroy(vcpu) };
        }
    }
}

impl Vcpu for HvfVcpu {
    fn id(&self) -> u8 {
        self.id
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, HypervisorError> {
        let vcpu = self.ensure_created()?;
        if !self.wait_until_on()? {
            return Ok(VcpuExit::Interrupted);
        }
        loop {
            // SAFETY: `vcpu` was made on this thread; `exit` is the framework's record for
            // it, valid while the vCPU lives and written by `hv_vcpu_run`.
            let exit = unsafe {
                check("hv_vcpu_run", ffi::hv_vcpu_run(vcpu))?;
                *self.exit
            };
            match exit.reason {
                ffi::HV_EXIT_REASON_CANCELED => {
                    self.shared.lock().kicked[usize::from(self.id)] = false;
                    return Ok(VcpuExit::Interrupted);
                }
                ffi::HV_EXIT_REASON_VTIMER_ACTIVATED => {
                    // The framework's GIC takes the timer's interrupt; unmask it for the next.
                    // SAFETY: `vcpu` was made on this thread.
                    unsafe { ffi::hv_vcpu_set_vtimer_mask(vcpu, false) };
                }
                ffi::HV_EXIT_REASON_EXCEPTION => {
                    match syndrome::decode(exit.exception.syndrome) {
                        Trap::Mmio(access) => {
                            self.mmio(io, exit.exception.physical_address, access)?;
                            return Ok(VcpuExit::Mmio);
                        }
                        Trap::Hvc(_) => {
                            if let Some(done) = self.psci()? {
                                return Ok(done);
                            }
                        }
                        Trap::Smc(_) => {
                            // The hardware does not step over an SMC.
                            self.skip_instruction()?;
                            if let Some(done) = self.psci()? {
                                return Ok(done);
                            }
                        }
                        Trap::Wait { .. } => {
                            self.skip_instruction()?;
                            self.wait_for_interrupt();
                            return Ok(VcpuExit::Hlt);
                        }
                        Trap::SysReg(access) => {
                            // Registers the framework leaves to us: read as zero, writes
                            // ignored (debug and implementation-defined ones Linux probes).
                            if access.read {
                                self.set_gpr(access.register, 0)?;
                            }
                            self.skip_instruction()?;
                        }
                        Trap::UndecodableAbort => {
                            return Ok(VcpuExit::InternalError {
                                reason: format!(
                                    "an MMIO access at {:#x} the syndrome does not describe \
                                     (a load/store pair or with writeback)",
                                    exit.exception.physical_address
                                ),
                                rip: self.read(HvfReg::Gpr(31)).ok().map(|pc| pc as u64),
                                instruction: Vec::new(),
                            })
                        }
                        Trap::Other { class } => {
                            return Ok(VcpuExit::InternalError {
                                reason: format!("an exception of class {class:#x} trapped"),
                                rip: self.read(HvfReg::Gpr(31)).ok().map(|pc| pc as u64),
                                instruction: Vec::new(),
                            })
                        }
                    }
                }
                other => return Ok(VcpuExit::Unknown(format!("exit reason {other}"))),
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(HvfKicker {
            index: self.id,
            shared: self.shared.clone(),
        })
    }
}

struct HvfKicker {
    index: u8,
    shared: Arc<Shared>,
}

impl VcpuKicker for HvfKicker {
    fn kick(&self) {
        let handle = {
            let mut state = self.shared.lock();
            if let Some(k) = state.kicked.get_mut(usize::from(self.index)) {
                *k = true;
            }
            state
                .handles
                .get(usize::from(self.index))
                .copied()
                .flatten()
        };
        self.shared.wake.notify_all();
        if let Some(vcpu) = handle {
            // SAFETY: `hv_vcpus_exit` may be called from any thread with valid handles.
            unsafe { ffi::hv_vcpus_exit(&vcpu, 1) };
        }
    }
}

impl VcpuAArch64 for HvfVcpu {
    fn reg_list(&self) -> Result<Vec<u64>, HypervisorError> {
        Ok(regmap::saved_ids())
    }

    fn one_reg(&self, id: u64) -> Result<u128, HypervisorError> {
        if self.handle.is_none() {
            return Ok(self
                .early
                .iter()
                .rev()
                .find(|(i, _)| *i == id)
                .map_or(0, |(_, v)| *v));
        }
        self.read(regmap::hvf_reg(id))
    }

    fn set_one_reg(&mut self, id: u64, value: u128) -> Result<(), HypervisorError> {
        if self.handle.is_none() {
            self.early.push((id, value));
            return Ok(());
        }
        self.write(regmap::hvf_reg(id), value)
    }

    fn save_state(&mut self) -> Result<VcpuState, HypervisorError> {
        let mut regs = Vec::new();
        for id in self.reg_list()? {
            regs.push(OneReg {
                id,
                value: self.one_reg(id)?,
            });
        }
        let on = self.shared.lock().power().is_on(self.id);
        Ok(VcpuState {
            id: self.id,
            regs,
            // KVM's values: 0 runnable, 1 stopped.
            mp_state: u32::from(!on),
        })
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<(), HypervisorError> {
        for reg in &state.regs {
            self.set_one_reg(reg.id, reg.value)?;
        }
        self.shared.lock().power().set(self.id, state.mp_state == 0);
        Ok(())
    }
}
