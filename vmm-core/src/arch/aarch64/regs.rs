//! arm64 registers by their one-reg ID (the encoding KVM's `KVM_{GET,SET}_ONE_REG` uses, which
//! the neutral state keeps: `ID = arch | size | class | index`).

const REG_ARM64: u64 = 0x6000_0000_0000_0000;
const REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
const REG_ARM_CORE: u64 = 0x0010 << 16;

/// The ID of the core register at byte `offset` of `struct kvm_regs` (`regs[31]`, `sp`, `pc`,
/// `pstate`, …), which the encoding counts in 32-bit words.
pub const fn core_reg(offset: u64) -> u64 {
    REG_ARM64 | REG_SIZE_U64 | REG_ARM_CORE | (offset / 4)
}

/// General-purpose register X0 (X1 … X30 follow, 8 bytes apart).
pub const X0: u64 = core_reg(0);
/// The program counter.
pub const PC: u64 = core_reg(32 * 8);
/// PSTATE.
pub const PSTATE: u64 = core_reg(33 * 8);

/// PSTATE at kernel entry: EL1 with SP_EL1 (EL1h), debug, SError, IRQ and FIQ masked, as the
/// arm64 boot protocol asks.
pub const PSTATE_BOOT: u128 = 0x3c5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kernel_abi() {
        // KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | index (documented values).
        assert_eq!(X0, 0x6030_0000_0010_0000);
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
    }
}
