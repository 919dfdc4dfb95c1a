//! Saving and restoring vCPU and VM state for snapshots, between KVM's structures and
//! `vmm-core`'s neutral [`VcpuState`]/[`VmState`]. KVM structures without an architectural
//! form travel as their raw bytes, tagged `kvm`.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_core::arch::x86_64::state::{BackendBlob, CpuidEntry, DebugRegisters, VcpuState, VmState};
use vmm_core::HypervisorError;

use super::regs;

const BACKEND: &str = "kvm";

fn err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::call(op, e)
}

fn bad(what: &str) -> HypervisorError {
    HypervisorError::call(
        "restore",
        format!("the snapshot's {what} is not valid for KVM"),
    )
}

/// KVM structures made only of integers (and arrays and unions of integers): any byte
/// pattern of their size is a valid value, so they may be copied to and from bytes.
///
/// # Safety
/// Implement only for `repr(C)` types with no padding-sensitive invariants, pointers,
/// references, `bool`s or enums.
unsafe trait Pod: Copy + Default {}
// SAFETY: each of these is a bindgen `repr(C)` struct of integer fields, integer arrays and
// unions of such; KVM itself treats them as plain bytes.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}

fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `v` is a valid `T` of `size_of::<T>()` bytes, and `Pod` types have no
    // uninitialised-byte hazards we care about (KVM zero-fills what it returns).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

fn from_blob<T: Pod>(blob: &BackendBlob, what: &str) -> Result<T, HypervisorError> {
    if blob.backend != BACKEND {
        return Err(HypervisorError::call(
            "restore",
            format!(
                "the snapshot's {what} was written by the {:?} backend, not kvm",
                blob.backend
            ),
        ));
    }
    if blob.bytes.len() != std::mem::size_of::<T>() {
        return Err(bad(what));
    }
    let mut v = T::default();
    // SAFETY: exactly size_of::<T>() bytes are copied into a valid `T`; any byte pattern is a
    // valid `Pod` value.
    unsafe {
        std::ptr::copy_nonoverlapping(
            blob.bytes.as_ptr(),
            &mut v as *mut T as *mut u8,
            blob.bytes.len(),
        )
    };
    Ok(v)
}

fn blob<T: Pod>(v: &T) -> BackendBlob {
    BackendBlob {
        backend: BACKEND.into(),
        bytes: to_bytes(v),
    }
}

/// Reads every MSR of `indices` that this vCPU can read (KVM stops at the first it cannot:
/// skip that one and go on).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, HypervisorError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_bindings::kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| HypervisorError::call("KVM_GET_MSRS", format!("{e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Entry n (if any) is unreadable on this vCPU: skip it.
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), HypervisorError> {
    for chunk in msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let kmsrs = Msrs::from_entries(&entries)
            .map_err(|e| HypervisorError::call("KVM_SET_MSRS", format!("{e:?}")))?;
        let n = fd.set_msrs(&kmsrs).map_err(err("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(HypervisorError::call(
                "KVM_SET_MSRS",
                format!(
                    "this host refuses MSR {:#x} from the snapshot (another CPU model?)",
                    chunk[n].0
                ),
            ));
        }
    }
    Ok(())
}

/// Saves a stopped vCPU. First lets KVM finish an I/O instruction it is in the middle of
/// (`immediate_exit`), so the state is between instructions.
pub fn save_vcpu(
    fd: &mut VcpuFd,
    id: u8,
    msr_indices: &[u32],
) -> Result<VcpuState, HypervisorError> {
    fd.set_kvm_immediate_exit(1);
    let completed = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match completed {
        Err(e) if e.errno() != libc::EINTR => {
            return Err(HypervisorError::call("KVM_RUN (completing I/O)", e))
        }
        _ => {}
    }
    let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
    let kregs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
    let ksregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
    let dregs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        id,
        regs: regs::from_kvm_regs(&kregs),
        sregs: regs::from_kvm_sregs(&ksregs),
        xsave: xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect(),
        xcrs: xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
            .iter()
            .map(|x| (x.xcr, x.value))
            .collect(),
        msrs,
        lapic: lapic.regs.iter().map(|&b| b as u8).collect(),
        mp_state: mp_state.mp_state,
        debug: DebugRegisters {
            db: dregs.db,
            dr6: dregs.dr6,
            dr7: dregs.dr7,
        },
        cpuid: cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect(),
        events: blob(&events),
    })
}

/// Restores a vCPU that has not run, in the order KVM needs (CPUID first; LAPIC before MSRs
/// such as the TSC deadline; pending events last).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), HypervisorError> {
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = s
        .cpuid
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|_| bad("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&regs::to_kvm_regs(&s.regs))
        .map_err(err("KVM_SET_REGS"))?;
    let mut ksregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    regs::apply_sregs(&mut ksregs, &s.sregs);
    if host_is_amd() && ksregs.tr.type_ == TSS_BUSY {
        // KVM on SVM reports TR as busy whatever the VMCB holds, but AMD CPUs keep the type
        // LTR found (available) in TR's hidden part. Give it back as the CPU had it: an
        // emulated AMD CPU (QEMU) otherwise refuses the guest's `ioperm` I/O with a #GP.
        ksregs.tr.type_ = TSS_AVAILABLE;
    }
    fd.set_sregs(&ksregs).map_err(err("KVM_SET_SREGS"))?;
    let mut xsave = kvm_xsave::default();
    if s.xsave.len() != xsave.region.len() * 4 {
        return Err(bad("XSAVE area"));
    }
    for (w, b) in xsave.region.iter_mut().zip(s.xsave.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    // SAFETY: a legacy 4 KiB XSAVE buffer, the size KVM_SET_XSAVE reads without XSAVE2.
    unsafe { fd.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    let mut xcrs = kvm_xcrs::default();
    if s.xcrs.len() > xcrs.xcrs.len() {
        return Err(bad("XCR list"));
    }
    xcrs.nr_xcrs = s.xcrs.len() as u32;
    for (slot, &(xcr, value)) in xcrs.xcrs.iter_mut().zip(&s.xcrs) {
        slot.xcr = xcr;
        slot.value = value;
    }
    // A host without XSAVE reports no XCRs, and refuses to be given any (even none).
    if xcrs.nr_xcrs == 0 {
        // Nothing to restore.
    } else if let Err(e) = fd.set_xcrs(&xcrs) {
        // Say which value KVM refused and what the guest's CPUID allows.
        let leaf_d = s
            .cpuid
            .iter()
            .find(|c| c.function == 0xd && c.index == 0)
            .map(|c| (u64::from(c.edx) << 32) | u64::from(c.eax));
        return Err(HypervisorError::call(
            "KVM_SET_XCRS",
            format!("{e} (XCRs {:x?}; CPUID 0xD allows {leaf_d:x?})", s.xcrs),
        ));
    }
    let dregs = kvm_debugregs {
        db: s.debug.db,
        dr6: s.debug.dr6,
        dr7: s.debug.dr7,
        ..Default::default()
    };
    fd.set_debug_regs(&dregs)
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    let mut lapic = kvm_lapic_state::default();
    if s.lapic.len() != lapic.regs.len() {
        return Err(bad("local APIC page"));
    }
    for (d, &b) in lapic.regs.iter_mut().zip(&s.lapic) {
        *d = b as _;
    }
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    write_msrs(fd, &s.msrs)?;
    let events: kvm_vcpu_events = from_blob(&s.events, "pending vCPU events")?;
    fd.set_vcpu_events(&events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Saves the in-kernel PICs, IOAPIC, PIT and kvmclock.
pub fn save_vm(fd: &VmFd) -> Result<VmState, HypervisorError> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
        irqchips.push(blob(&chip));
    }
    let pit = fd.get_pit2().map_err(err("KVM_GET_PIT2"))?;
    let clock = fd.get_clock().map_err(err("KVM_GET_CLOCK"))?;
    Ok(VmState {
        irqchips,
        pit: blob(&pit),
        clock_ns: clock.clock,
    })
}

/// Restores what [`save_vm`] saved, before any vCPU runs.
pub fn restore_vm(fd: &VmFd, s: &VmState) -> Result<(), HypervisorError> {
    if s.irqchips.len() != CHIPS.len() {
        return Err(bad("interrupt controller list"));
    }
    for (blob, chip_id) in s.irqchips.iter().zip(CHIPS) {
        let chip: kvm_irqchip = from_blob(blob, "interrupt controller")?;
        if chip.chip_id != chip_id {
            return Err(bad("interrupt controller order"));
        }
        fd.set_irqchip(&chip).map_err(err("KVM_SET_IRQCHIP"))?;
    }
    let pit: kvm_pit_state2 = from_blob(&s.pit, "PIT")?;
    fd.set_pit2(&pit).map_err(err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock_ns,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
    Ok(())
}

/// 64-bit TSS descriptor types.
const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

/// Whether this host's CPU is AMD's (or Hygon's): KVM runs guests with SVM there.
fn host_is_amd() -> bool {
    // CPUID leaf 0 exists on every x86-64 CPU.
    let id = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
}
