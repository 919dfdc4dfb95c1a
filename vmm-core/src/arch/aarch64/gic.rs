//! The GICv3 registers a snapshot carries, named by the architecture (GICv3/v4 specification,
//! "Distributor, Redistributor and CPU interface register descriptions"): the distributor's
//! per-interrupt configuration of the SPIs, each redistributor's of the SGIs and PPIs, and each
//! CPU interface's system registers. Every backend with a GICv3 saves and restores these; the
//! order here is the order to restore them in (configuration before enables, the control
//! registers last).
//!
//! No LPIs (there is no ITS), so the LPI tables' registers are not part of it.

/// How many interrupt IDs the GIC has (SGIs, PPIs and SPIs): 32 private ones and 96 SPIs.
pub const NR_IRQS: u32 = 128;

/// Distributor register offsets.
pub mod gicd {
    /// Control: group enables and affinity routing.
    pub const CTLR: u32 = 0x0000;
    /// Implementer identification (KVM wants it written first, to agree on behaviour).
    pub const IIDR: u32 = 0x0008;
    /// Error reporting status.
    pub const STATUSR: u32 = 0x0010;
    /// Group, 1 bit per interrupt.
    pub const IGROUPR: u32 = 0x0080;
    /// Set-enable, 1 bit per interrupt.
    pub const ISENABLER: u32 = 0x0100;
    /// Set-pending (for KVM's interface: the latched pending state), 1 bit per interrupt.
    pub const ISPENDR: u32 = 0x0200;
    /// Set-active, 1 bit per interrupt.
    pub const ISACTIVER: u32 = 0x0300;
    /// Priority, 8 bits per interrupt.
    pub const IPRIORITYR: u32 = 0x0400;
    /// Configuration (edge or level), 2 bits per interrupt.
    pub const ICFGR: u32 = 0x0C00;
    /// Group modifier, 1 bit per interrupt.
    pub const IGRPMODR: u32 = 0x0D00;
    /// Routing (affinity), 64 bits per SPI.
    pub const IROUTER: u32 = 0x6000;
}

/// Redistributor register offsets (from its first frame; the SGI frame is the second, 64 KiB
/// on).
pub mod gicr {
    /// Control.
    pub const CTLR: u32 = 0x0000;
    /// Error reporting status.
    pub const STATUSR: u32 = 0x0010;
    /// Power management (ProcessorSleep).
    pub const WAKER: u32 = 0x0014;
    /// The SGI frame.
    pub const SGI_BASE: u32 = 0x1_0000;
    /// Group of SGIs and PPIs.
    pub const IGROUPR0: u32 = SGI_BASE + 0x0080;
    /// Set-enable of SGIs and PPIs.
    pub const ISENABLER0: u32 = SGI_BASE + 0x0100;
    /// Set-pending (latched) of SGIs and PPIs.
    pub const ISPENDR0: u32 = SGI_BASE + 0x0200;
    /// Set-active of SGIs and PPIs.
    pub const ISACTIVER0: u32 = SGI_BASE + 0x0300;
    /// Priorities of SGIs and PPIs (8 registers).
    pub const IPRIORITYR: u32 = SGI_BASE + 0x0400;
    /// Configuration of SGIs (`ICFGR0`) and PPIs (`ICFGR1`).
    pub const ICFGR0: u32 = SGI_BASE + 0x0C00;
    /// Group modifier of SGIs and PPIs.
    pub const IGRPMODR0: u32 = SGI_BASE + 0x0D00;
}

/// A CPU interface system register by its instruction encoding (op0, op1, CRn, CRm, op2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysReg {
    /// Its architectural name, for errors.
    pub name: &'static str,
    /// `op0, op1, CRn, CRm, op2`.
    pub encoding: (u8, u8, u8, u8, u8),
}

impl SysReg {
    const fn new(name: &'static str, encoding: (u8, u8, u8, u8, u8)) -> SysReg {
        SysReg { name, encoding }
    }

    /// The 16-bit `op0:op1:CRn:CRm:op2` field (as in `MRS`/`MSR` and KVM's vGIC interface).
    pub const fn instr(self) -> u16 {
        let (op0, op1, crn, crm, op2) = self.encoding;
        ((op0 as u16 & 0x3) << 14)
            | ((op1 as u16 & 0x7) << 11)
            | ((crn as u16 & 0xf) << 7)
            | ((crm as u16 & 0xf) << 3)
            | (op2 as u16 & 0x7)
    }
}

/// The CPU interface registers, in restore order: the system-register enable and the control
/// register first (they decide how the others read), then the group enables, the priority mask,
/// binary points and active priorities. Implementations have 1 to 4 active-priority registers
/// per group (by their priority bits); a backend skips the ones its GIC does not have.
pub const CPU_SYSREGS: &[SysReg] = &[
    SysReg::new("ICC_SRE_EL1", (3, 0, 12, 12, 5)),
    SysReg::new("ICC_CTLR_EL1", (3, 0, 12, 12, 4)),
    SysReg::new("ICC_IGRPEN0_EL1", (3, 0, 12, 12, 6)),
    SysReg::new("ICC_IGRPEN1_EL1", (3, 0, 12, 12, 7)),
    SysReg::new("ICC_PMR_EL1", (3, 0, 4, 6, 0)),
    SysReg::new("ICC_BPR0_EL1", (3, 0, 12, 8, 3)),
    SysReg::new("ICC_BPR1_EL1", (3, 0, 12, 12, 3)),
    SysReg::new("ICC_AP0R0_EL1", (3, 0, 12, 8, 4)),
    SysReg::new("ICC_AP0R1_EL1", (3, 0, 12, 8, 5)),
    SysReg::new("ICC_AP0R2_EL1", (3, 0, 12, 8, 6)),
    SysReg::new("ICC_AP0R3_EL1", (3, 0, 12, 8, 7)),
    SysReg::new("ICC_AP1R0_EL1", (3, 0, 12, 9, 0)),
    SysReg::new("ICC_AP1R1_EL1", (3, 0, 12, 9, 1)),
    SysReg::new("ICC_AP1R2_EL1", (3, 0, 12, 9, 2)),
    SysReg::new("ICC_AP1R3_EL1", (3, 0, 12, 9, 3)),
];

/// The distributor's 32-bit registers for SPIs `SPI_BASE..nr_irqs`, in restore order:
/// `IIDR`, then per-interrupt configuration (group, modifier, edge/level, priority, routing as
/// two words each), then the state (pending latch, active, enable), `STATUSR`, and `CTLR` last.
pub fn distributor_registers(nr_irqs: u32) -> Vec<u32> {
    use gicd::*;
    let first = super::layout::SPI_BASE;
    let bits = |base: u32, per_reg: u32| {
        (first / per_reg..nr_irqs.div_ceil(per_reg)).map(move |n| base + 4 * n)
    };
    let mut regs = vec![IIDR];
    regs.extend(bits(IGROUPR, 32));
    regs.extend(bits(IGRPMODR, 32));
    regs.extend(bits(ICFGR, 16));
    regs.extend(bits(IPRIORITYR, 4));
    regs.extend((first..nr_irqs).flat_map(|irq| {
        let at = IROUTER + 8 * irq;
        [at, at + 4]
    }));
    regs.extend(bits(ISPENDR, 32));
    regs.extend(bits(ISACTIVER, 32));
    regs.extend(bits(ISENABLER, 32));
    regs.extend([STATUSR, CTLR]);
    regs
}

/// One redistributor's 32-bit registers, in restore order: the SGI/PPI configuration, their
/// state, then `WAKER`, `STATUSR` and `CTLR`.
pub fn redistributor_registers() -> Vec<u32> {
    use gicr::*;
    let mut regs = vec![IGROUPR0, IGRPMODR0, ICFGR0, ICFGR0 + 4];
    regs.extend((0..8).map(|n| IPRIORITYR + 4 * n));
    regs.extend([ISPENDR0, ISACTIVER0, ISENABLER0, WAKER, STATUSR, CTLR]);
    regs
}

/// The first interrupt ID of each 32-line group whose input levels a snapshot keeps (the SPIs:
/// a device holding a level-triggered line high).
pub fn line_level_groups(nr_irqs: u32) -> Vec<u32> {
    (super::layout::SPI_BASE..nr_irqs).step_by(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_register_encodings_match_the_architecture() {
        // ICC_SRE_EL1 is S3_0_C12_C12_5; ICC_PMR_EL1 is S3_0_C4_C6_0.
        assert_eq!(CPU_SYSREGS[0].instr(), 0xc665);
        assert_eq!(
            CPU_SYSREGS
                .iter()
                .find(|r| r.name == "ICC_PMR_EL1")
                .map(|r| r.instr()),
            Some(0xc230)
        );
    }

    #[test]
    fn distributor_registers_cover_every_spi_once() {
        let regs = distributor_registers(NR_IRQS);
        // 3 groups of 32 SPIs: IGROUPR, IGRPMODR, ISPENDR, ISACTIVER, ISENABLER words.
        for base in [
            gicd::IGROUPR,
            gicd::IGRPMODR,
            gicd::ISPENDR,
            gicd::ISACTIVER,
            gicd::ISENABLER,
        ] {
            let words: Vec<_> = regs
                .iter()
                .filter(|&&r| (base..base + 0x80).contains(&r))
                .collect();
            assert_eq!(words, [&(base + 4), &(base + 8), &(base + 12)]);
        }
        // Priorities: 96 SPIs, 4 per word; routing: two words per SPI.
        let count = |lo: u32, hi: u32| regs.iter().filter(|&&r| (lo..hi).contains(&r)).count();
        assert_eq!(count(gicd::IPRIORITYR, gicd::IPRIORITYR + 0x400), 24);
        assert_eq!(count(gicd::ICFGR, gicd::ICFGR + 0x100), 6);
        assert_eq!(count(gicd::IROUTER, gicd::IROUTER + 0x2000), 192);
        assert_eq!(regs.first(), Some(&gicd::IIDR));
        assert_eq!(regs.last(), Some(&gicd::CTLR));
        let mut unique = regs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), regs.len());
    }

    #[test]
    fn line_levels_are_kept_for_the_spis() {
        assert_eq!(line_level_groups(NR_IRQS), [32, 64, 96]);
    }
}
