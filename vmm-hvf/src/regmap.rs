//! The neutral arm64 register IDs (`vmm_core::arch::aarch64::state`: KVM's one-reg encoding)
//! mapped to Hypervisor.framework's registers, so a vCPU's state saves and restores in the same
//! form on both backends. Pure logic, unit-tested on every host.
//!
//! - Core registers (`KVM_REG_ARM_CORE`, indexed by 32-bit words into `struct kvm_regs`): X0-X30,
//!   PC, PSTATE (HVF's CPSR), FPSR and FPCR are `hv_reg_t`; SP (= SP_EL0), SP_EL1, ELR_EL1 and
//!   SPSR_EL1 are system registers to HVF; V0-V31 are `hv_simd_fp_reg_t`.
//! - System registers (`KVM_REG_ARM64_SYSREG`) carry `op0:op1:CRn:CRm:op2` in their low 16 bits,
//!   which is exactly `hv_sys_reg_t`'s value, with one exception: KVM's timer IDs `TIMER_CNT` and
//!   `TIMER_CVAL` carry each other's architectural encodings (a slip kept for its ABI), so they
//!   map to the virtual counter (HVF: the vtimer offset) and `CNTV_CVAL_EL0`.
//! - KVM's firmware pseudo-registers (PSCI version and friends) have no HVF counterpart: this
//!   backend answers PSCI itself.

const REG_ARM64: u64 = 0x6000_0000_0000_0000;
const SIZE_U32: u64 = 0x0020_0000_0000_0000;
const SIZE_U64: u64 = 0x0030_0000_0000_0000;
const SIZE_U128: u64 = 0x0040_0000_0000_0000;
const SIZE_MASK: u64 = 0x00f0_0000_0000_0000;
const CLASS_MASK: u64 = 0xffff << 16;
const CLASS_CORE: u64 = 0x0010 << 16;
const CLASS_SYSREG: u64 = 0x0013 << 16;

/// Word indices into `struct kvm_regs`.
mod core {
    /// `regs.sp`: SP_EL0.
    pub const SP: u64 = 62;
    pub const PC: u64 = 64;
    pub const PSTATE: u64 = 66;
    pub const SP_EL1: u64 = 68;
    pub const ELR_EL1: u64 = 70;
    /// `spsr[KVM_SPSR_EL1]`; the AArch32 banked ones follow.
    pub const SPSR_EL1: u64 = 72;
    /// `fp_regs.vregs[0]` (16 bytes each).
    pub const V0: u64 = 84;
    pub const FPSR: u64 = 212;
    pub const FPCR: u64 = 213;
}

/// `hv_reg_t` values.
mod hv_reg {
    pub const PC: u32 = 31;
    pub const FPCR: u32 = 32;
    pub const FPSR: u32 = 33;
    pub const CPSR: u32 = 34;
}

/// `hv_sys_reg_t` values of the registers KVM files as core ones, and the timer.
pub mod hv_sys {
    /// SP_EL0.
    pub const SP_EL0: u16 = 0xc208;
    /// SP_EL1.
    pub const SP_EL1: u16 = 0xe208;
    /// ELR_EL1.
    pub const ELR_EL1: u16 = 0xc201;
    /// SPSR_EL1.
    pub const SPSR_EL1: u16 = 0xc200;
    /// CNTV_CTL_EL0.
    pub const CNTV_CTL_EL0: u16 = 0xdf19;
    /// CNTV_CVAL_EL0.
    pub const CNTV_CVAL_EL0: u16 = 0xdf1a;
    /// MPIDR_EL1.
    pub const MPIDR_EL1: u16 = 0xc005;
}

/// KVM's `TIMER_CNT` (encoded as (3, 3, 14, 3, 2), architecturally CNTV_CVAL_EL0).
pub const KVM_TIMER_CNT: u64 = REG_ARM64 | SIZE_U64 | CLASS_SYSREG | 0xdf1a;
/// KVM's `TIMER_CVAL` (encoded as (3, 3, 14, 0, 2), architecturally CNTVCT_EL0).
pub const KVM_TIMER_CVAL: u64 = REG_ARM64 | SIZE_U64 | CLASS_SYSREG | 0xdf02;

/// Where a neutral register lives in Hypervisor.framework.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HvfReg {
    /// An `hv_reg_t` (64 bits; FPSR and FPCR hold 32).
    Gpr(u32),
    /// An `hv_simd_fp_reg_t` (128 bits).
    Simd(u32),
    /// An `hv_sys_reg_t`.
    Sys(u16),
    /// The guest's virtual counter (HVF keeps it as an offset from the host's).
    VirtualCounter,
    /// No counterpart (firmware pseudo-registers, AArch32 banked SPSRs, SVE).
    Unmapped,
}

/// The Hypervisor.framework register of neutral register `id`.
pub fn hvf_reg(id: u64) -> HvfReg {
    if id & !(SIZE_MASK | CLASS_MASK | 0xffff) != REG_ARM64 {
        return HvfReg::Unmapped;
    }
    let index = id & 0xffff;
    match (id & CLASS_MASK, id & SIZE_MASK) {
        (CLASS_CORE, SIZE_U64) => match index {
            i if i <= 60 && i % 2 == 0 => HvfReg::Gpr((i / 2) as u32),
            core::SP => HvfReg::Sys(hv_sys::SP_EL0),
            core::PC => HvfReg::Gpr(hv_reg::PC),
            core::PSTATE => HvfReg::Gpr(hv_reg::CPSR),
            core::SP_EL1 => HvfReg::Sys(hv_sys::SP_EL1),
            core::ELR_EL1 => HvfReg::Sys(hv_sys::ELR_EL1),
            core::SPSR_EL1 => HvfReg::Sys(hv_sys::SPSR_EL1),
            _ => HvfReg::Unmapped,
        },
        (CLASS_CORE, SIZE_U128) => match index.checked_sub(core::V0) {
            Some(offset) if offset % 4 == 0 && offset / 4 < 32 => HvfReg::Simd((offset / 4) as u32),
            _ => HvfReg::Unmapped,
        },
        (CLASS_CORE, SIZE_U32) => match index {
            core::FPSR => HvfReg::Gpr(hv_reg::FPSR),
            core::FPCR => HvfReg::Gpr(hv_reg::FPCR),
            _ => HvfReg::Unmapped,
        },
        (CLASS_SYSREG, SIZE_U64) => match id {
            KVM_TIMER_CNT => HvfReg::VirtualCounter,
            KVM_TIMER_CVAL => HvfReg::Sys(hv_sys::CNTV_CVAL_EL0),
            _ => HvfReg::Sys(index as u16),
        },
        _ => HvfReg::Unmapped,
    }
}

/// The neutral ID of core register word `index` of `size`.
const fn core_id(size: u64, index: u64) -> u64 {
    REG_ARM64 | size | CLASS_CORE | index
}

/// The neutral ID of system register `encoding` (`hv_sys_reg_t`).
pub const fn sysreg_id(encoding: u16) -> u64 {
    REG_ARM64 | SIZE_U64 | CLASS_SYSREG | encoding as u64
}

/// The system registers Hypervisor.framework exposes for a vCPU (besides SP_EL0/SP_EL1,
/// ELR_EL1, SPSR_EL1 and the timer, listed with the core ones): the `hv_sys_reg_t` list of
/// macOS 12, without the debug registers (no guest debugging) and the ID registers (the
/// host's, not state).
pub const SAVED_SYSREGS: &[u16] = &[
    0xc005, // MPIDR_EL1
    0xc080, // SCTLR_EL1
    0xc082, // CPACR_EL1
    0xc100, // TTBR0_EL1
    0xc101, // TTBR1_EL1
    0xc102, // TCR_EL1
    0xc108, 0xc109, 0xc10a, 0xc10b, // APIA/APIB keys
    0xc110, 0xc111, 0xc112, 0xc113, // APDA/APDB keys
    0xc118, 0xc119, // APGA key
    0xc288, // AFSR0_EL1
    0xc289, // AFSR1_EL1
    0xc290, // ESR_EL1
    0xc300, // FAR_EL1
    0xc3a0, // PAR_EL1
    0xc510, // MAIR_EL1
    0xc518, // AMAIR_EL1
    0xc600, // VBAR_EL1
    0xc681, // CONTEXTIDR_EL1
    0xc684, // TPIDR_EL1
    0xc708, // CNTKCTL_EL1
    0xd000, // CSSELR_EL1
    0xde82, // TPIDR_EL0
    0xde83, // TPIDRRO_EL0
    0x8010, // MDCCINT_EL1
    0x8012, // MDSCR_EL1
];

/// Every neutral register ID a Hypervisor.framework vCPU saves: X0-X30, SP, PC, PSTATE, SP_EL1,
/// ELR_EL1, SPSR_EL1, V0-V31, FPSR, FPCR, [`SAVED_SYSREGS`], then the timer's control, compare
/// value and counter (the counter last: restored after what gives it meaning).
pub fn saved_ids() -> Vec<u64> {
    let mut ids: Vec<u64> = (0..31).map(|n| core_id(SIZE_U64, 2 * n)).collect();
    ids.extend(
        [
            core::SP,
            core::PC,
            core::PSTATE,
            core::SP_EL1,
            core::ELR_EL1,
            core::SPSR_EL1,
        ]
        .map(|i| core_id(SIZE_U64, i)),
    );
    ids.extend((0..32).map(|n| core_id(SIZE_U128, core::V0 + 4 * n)));
    ids.extend([core_id(SIZE_U32, core::FPSR), core_id(SIZE_U32, core::FPCR)]);
    ids.extend(SAVED_SYSREGS.iter().map(|&r| sysreg_id(r)));
    ids.extend([
        sysreg_id(hv_sys::CNTV_CTL_EL0),
        KVM_TIMER_CVAL,
        KVM_TIMER_CNT,
    ]);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_core::arch::aarch64::regs;

    #[test]
    fn the_boot_registers_map_to_hvf_ones() {
        // The IDs vmm-core sets at boot (KVM's documented values).
        assert_eq!(hvf_reg(regs::X0), HvfReg::Gpr(0));
        assert_eq!(hvf_reg(regs::PC), HvfReg::Gpr(31));
        assert_eq!(hvf_reg(regs::PSTATE), HvfReg::Gpr(34));
        // x30, V31, FPSR/FPCR and SP_EL1 by their documented KVM IDs.
        assert_eq!(hvf_reg(0x6030_0000_0010_003c), HvfReg::Gpr(30));
        assert_eq!(hvf_reg(0x6040_0000_0010_00d0), HvfReg::Simd(31));
        assert_eq!(hvf_reg(0x6020_0000_0010_00d4), HvfReg::Gpr(33));
        assert_eq!(hvf_reg(0x6020_0000_0010_00d5), HvfReg::Gpr(32));
        assert_eq!(hvf_reg(0x6030_0000_0010_0044), HvfReg::Sys(0xe208));
    }

    #[test]
    fn system_registers_keep_their_encoding_but_the_timer_is_unswapped() {
        // SCTLR_EL1 = (3, 0, 1, 0, 0).
        assert_eq!(hvf_reg(0x6030_0000_0013_c080), HvfReg::Sys(0xc080));
        assert_eq!(hvf_reg(KVM_TIMER_CNT), HvfReg::VirtualCounter);
        assert_eq!(hvf_reg(KVM_TIMER_CVAL), HvfReg::Sys(hv_sys::CNTV_CVAL_EL0));
        assert_eq!(
            hvf_reg(sysreg_id(hv_sys::CNTV_CTL_EL0)),
            HvfReg::Sys(0xdf19)
        );
    }

    #[test]
    fn what_hvf_has_no_counterpart_for_is_unmapped() {
        // KVM_REG_ARM_FW_REG(0) (the PSCI version), an AArch32 SPSR, an SVE register, and
        // something that is not an arm64 ID at all.
        for id in [
            0x6030_0000_0014_0000,
            core_id(SIZE_U64, 74),
            0x6080_0000_0015_0000,
            0x4030_0000_0010_0000,
        ] {
            assert_eq!(hvf_reg(id), HvfReg::Unmapped, "{id:#x}");
        }
    }

    #[test]
    fn every_saved_register_maps_and_none_twice() {
        let ids = saved_ids();
        let mut seen = std::collections::HashSet::new();
        for &id in &ids {
            assert_ne!(hvf_reg(id), HvfReg::Unmapped, "{id:#x}");
            assert!(seen.insert(hvf_reg(id)), "{id:#x} maps to a register twice");
        }
        assert_eq!(ids.last(), Some(&KVM_TIMER_CNT));
    }
}
