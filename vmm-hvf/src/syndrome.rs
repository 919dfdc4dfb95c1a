//! Decoding the exception syndrome (`ESR_EL2`) Hypervisor.framework reports when a guest traps:
//! what the guest did and what the VMM must do for it. Pure logic, unit-tested on every host.
//!
//! Field layouts from the Arm Architecture Reference Manual (ESR_ELx: EC in bits 26-31, IL in
//! bit 25, ISS below; the data-abort and system-register ISS encodings).

/// Exception classes the VMM handles.
mod ec {
    /// WFI or WFE.
    pub const WFX: u32 = 0x01;
    /// HVC from AArch64.
    pub const HVC64: u32 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u32 = 0x17;
    /// MSR, MRS or a system instruction from AArch64.
    pub const SYS64: u32 = 0x18;
    /// Data abort from a lower exception level (a stage-2 fault: MMIO).
    pub const DATA_ABORT_LOWER: u32 = 0x24;
}

/// A guest access to an address with no RAM behind it, as the syndrome describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// Bytes accessed: 1, 2, 4 or 8.
    pub size: usize,
    /// The general-purpose register read or written (31 is the zero register).
    pub register: u8,
    /// A store (else a load).
    pub write: bool,
    /// A load sign-extends its value to the register's width.
    pub sign_extend: bool,
    /// A load's register is 64 bits wide (else 32).
    pub sixty_four: bool,
}

/// A system register access (`MRS`/`MSR`) the hypervisor trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
    /// `op0:op1:CRn:CRm:op2`, the encoding `hv_sys_reg_t` and KVM's one-reg IDs use.
    pub encoding: u16,
    /// The general-purpose register read or written.
    pub register: u8,
    /// A read (`MRS`) into the register; else a write (`MSR`) from it.
    pub read: bool,
}

/// What a trapped exception asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// An MMIO access to emulate, then the instruction is skipped.
    Mmio(MmioAccess),
    /// A data abort without a valid instruction syndrome (e.g. a load pair to MMIO): the
    /// access cannot be emulated from the syndrome.
    UndecodableAbort,
    /// A hypervisor call (`HVC #imm`): PSCI when `imm` is 0.
    Hvc(u16),
    /// A secure monitor call (`SMC #imm`); the PC is not advanced by the hardware.
    Smc(u16),
    /// WFI (`false`) or WFE (`true`): the vCPU waits for an interrupt or event.
    Wait {
        /// WFE rather than WFI.
        event: bool,
    },
    /// A trapped system register access.
    SysReg(SysRegAccess),
    /// Another exception class, for the error message.
    Other {
        /// The exception class.
        class: u32,
    },
}

/// Decodes `ESR_EL2`.
pub fn decode(syndrome: u64) -> Trap {
    let class = ((syndrome >> 26) & 0x3f) as u32;
    let iss = (syndrome & 0x1ff_ffff) as u32;
    match class {
        ec::DATA_ABORT_LOWER => {
            // ISV: the rest of the ISS describes the access.
            if iss & (1 << 24) == 0 {
                return Trap::UndecodableAbort;
            }
            Trap::Mmio(MmioAccess {
                size: 1 << ((iss >> 22) & 0x3),
                sign_extend: iss & (1 << 21) != 0,
                register: ((iss >> 16) & 0x1f) as u8,
                sixty_four: iss & (1 << 15) != 0,
                write: iss & (1 << 6) != 0,
            })
        }
        ec::HVC64 => Trap::Hvc((iss & 0xffff) as u16),
        ec::SMC64 => Trap::Smc((iss & 0xffff) as u16),
        ec::WFX => Trap::Wait {
            event: iss & 1 != 0,
        },
        ec::SYS64 => {
            let op0 = (iss >> 20) & 0x3;
            let op2 = (iss >> 17) & 0x7;
            let op1 = (iss >> 14) & 0x7;
            let crn = (iss >> 10) & 0xf;
            let crm = (iss >> 1) & 0xf;
            Trap::SysReg(SysRegAccess {
                encoding: ((op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2) as u16,
                register: ((iss >> 5) & 0x1f) as u8,
                read: iss & 1 != 0,
            })
        }
        class => Trap::Other { class },
    }
}

impl MmioAccess {
    /// The value a load puts in its register, from the `data` the device returned
    /// (little-endian, `size` bytes): sign-extended if the instruction asks, cut to 32 bits for a
    /// W register.
    pub fn load_value(&self, data: &[u8]) -> u64 {
        let mut bytes = [0u8; 8];
        let n = self.size.min(8).min(data.len());
        bytes[..n].copy_from_slice(&data[..n]);
        let mut value = u64::from_le_bytes(bytes);
        if self.sign_extend && self.size < 8 {
            let shift = 64 - 8 * self.size as u32;
            value = (((value << shift) as i64) >> shift) as u64;
        }
        if !self.sixty_four {
            value &= 0xffff_ffff;
        }
        value
    }

    /// The bytes a store writes, from its register's `value`.
    pub fn store_bytes(&self, value: u64) -> Vec<u8> {
        value.to_le_bytes()[..self.size.min(8)].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ESR with class `ec`, IL set (32-bit instruction) and `iss`.
    fn esr(ec: u32, iss: u32) -> u64 {
        (u64::from(ec) << 26) | (1 << 25) | u64::from(iss)
    }

    #[test]
    fn data_aborts_describe_the_mmio_access() {
        // `str w1, [x0]`: ISV, SAS=2 (4 bytes), SRT=1, WnR.
        let store = esr(0x24, (1 << 24) | (2 << 22) | (1 << 16) | (1 << 6));
        assert_eq!(
            decode(store),
            Trap::Mmio(MmioAccess {
                size: 4,
                register: 1,
                write: true,
                sign_extend: false,
                sixty_four: false,
            })
        );
        // `ldrsb x3, [x2]`: ISV, SAS=0, SSE, SRT=3, SF.
        let load = esr(0x24, (1 << 24) | (1 << 21) | (3 << 16) | (1 << 15));
        let Trap::Mmio(access) = decode(load) else {
            panic!("{:?}", decode(load));
        };
        assert!(!access.write && access.size == 1 && access.register == 3);
        assert_eq!(access.load_value(&[0x80]), 0xffff_ffff_ffff_ff80);
        // Without ISV the access cannot be emulated from the syndrome.
        assert_eq!(decode(esr(0x24, 2 << 22)), Trap::UndecodableAbort);
    }

    #[test]
    fn loads_into_w_registers_are_32_bits_and_stores_take_their_size() {
        let access = MmioAccess {
            size: 2,
            register: 0,
            write: false,
            sign_extend: true,
            sixty_four: false,
        };
        assert_eq!(access.load_value(&[0xff, 0xff]), 0xffff_ffff);
        let store = MmioAccess {
            write: true,
            size: 2,
            ..access
        };
        assert_eq!(store.store_bytes(0x1234_5678), vec![0x78, 0x56]);
        // A short answer from a device never reads out of bounds.
        assert_eq!(
            MmioAccess {
                size: 8,
                sixty_four: true,
                sign_extend: false,
                ..access
            }
            .load_value(&[1]),
            1
        );
    }

    #[test]
    fn calls_waits_and_system_registers_are_told_apart() {
        assert_eq!(decode(esr(0x16, 0)), Trap::Hvc(0));
        assert_eq!(decode(esr(0x17, 7)), Trap::Smc(7));
        assert_eq!(decode(esr(0x01, 0)), Trap::Wait { event: false });
        assert_eq!(decode(esr(0x01, 1)), Trap::Wait { event: true });
        // `mrs x5, cntvct_el0`: op0 3, op1 3, CRn 14, CRm 0, op2 2; Rt 5; read.
        let iss = (3 << 20) | (2 << 17) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        assert_eq!(
            decode(esr(0x18, iss)),
            Trap::SysReg(SysRegAccess {
                encoding: 0xdf02,
                register: 5,
                read: true
            })
        );
        assert_eq!(decode(esr(0x07, 0)), Trap::Other { class: 7 });
    }
}
