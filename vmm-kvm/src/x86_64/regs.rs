//! Conversions between `vmm-core`'s neutral registers and KVM's, and the per-vCPU defaults
//! (boot MSRs, FPU, LAPIC local interrupt pins) that KVM leaves to userspace.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vmm_core::arch::x86_64::regs::{DescriptorTable, Segment, SpecialRegisters, StandardRegisters};
use vmm_core::HypervisorError;

pub fn to_kvm_regs(r: &StandardRegisters) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn from_kvm_regs(k: &kvm_regs) -> StandardRegisters {
    StandardRegisters {
        rax: k.rax,
        rbx: k.rbx,
        rcx: k.rcx,
        rdx: k.rdx,
        rsi: k.rsi,
        rdi: k.rdi,
        rsp: k.rsp,
        rbp: k.rbp,
        r8: k.r8,
        r9: k.r9,
        r10: k.r10,
        r11: k.r11,
        r12: k.r12,
        r13: k.r13,
        r14: k.r14,
        r15: k.r15,
        rip: k.rip,
        rflags: k.rflags,
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn from_kvm_segment(k: &kvm_segment) -> Segment {
    Segment {
        base: k.base,
        limit: k.limit,
        selector: k.selector,
        type_: k.type_,
        present: k.present != 0,
        dpl: k.dpl,
        db: k.db != 0,
        s: k.s != 0,
        l: k.l != 0,
        g: k.g != 0,
        avl: k.avl != 0,
        unusable: k.unusable != 0,
    }
}

fn to_kvm_dtable(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub fn from_kvm_sregs(k: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: from_kvm_segment(&k.cs),
        ds: from_kvm_segment(&k.ds),
        es: from_kvm_segment(&k.es),
        fs: from_kvm_segment(&k.fs),
        gs: from_kvm_segment(&k.gs),
        ss: from_kvm_segment(&k.ss),
        tr: from_kvm_segment(&k.tr),
        ldt: from_kvm_segment(&k.ldt),
        gdt: DescriptorTable {
            base: k.gdt.base,
            limit: k.gdt.limit,
        },
        idt: DescriptorTable {
            base: k.idt.base,
            limit: k.idt.limit,
        },
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

/// Overwrites every modelled field of `k` with `s`.
pub fn apply_sregs(k: &mut kvm_sregs, s: &SpecialRegisters) {
    k.cs = to_kvm_segment(&s.cs);
    k.ds = to_kvm_segment(&s.ds);
    k.es = to_kvm_segment(&s.es);
    k.fs = to_kvm_segment(&s.fs);
    k.gs = to_kvm_segment(&s.gs);
    k.ss = to_kvm_segment(&s.ss);
    k.tr = to_kvm_segment(&s.tr);
    k.ldt = to_kvm_segment(&s.ldt);
    k.gdt = to_kvm_dtable(&s.gdt);
    k.idt = to_kvm_dtable(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

fn backend_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::call(op, e)
}

/// The MSR values a freshly booted kernel expects.
pub fn set_boot_msrs(fd: &VcpuFd) -> Result<(), HypervisorError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| HypervisorError::call("build MSR list", format!("{e:?}")))?;
    let written = fd.set_msrs(&msrs).map_err(backend_err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        let failed = entries[written].index;
        return Err(HypervisorError::call(
            "KVM_SET_MSRS",
            format!("MSR {failed:#x} was refused"),
        ));
    }
    Ok(())
}

/// x87 control word and MXCSR at their reset values.
pub fn set_default_fpu(fd: &VcpuFd) -> Result<(), HypervisorError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(backend_err("KVM_SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = byte as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 takes the 8259's ExtINT and LINT1 NMIs, as a PC's firmware would leave them.
pub fn set_lint(fd: &VcpuFd) -> Result<(), HypervisorError> {
    let mut lapic = fd.get_lapic().map_err(backend_err("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    fd.set_lapic(&lapic).map_err(backend_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        let r = StandardRegisters {
            rax: 1,
            r15: 15,
            rip: 0x1000,
            rflags: 0x202,
            ..Default::default()
        };
        assert_eq!(from_kvm_regs(&to_kvm_regs(&r)), r);
        let s = SpecialRegisters {
            cs: Segment::from_gdt_entry(0x00af_9b00_0000_ffff, 0x10),
            cr0: 0x8000_0011,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let mut k = kvm_sregs::default();
        apply_sregs(&mut k, &s);
        assert_eq!(from_kvm_sregs(&k), s);
    }

    #[test]
    fn delivery_mode_replaces_only_its_bits() {
        assert_eq!(with_delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT1, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT1), 0xdead_beef);
    }
}
