//! Backend-neutral x86-64 register state. `Default` is the architectural reset state as far as
//! the VMM cares; backends convert to and from their own structures.

use serde::{Deserialize, Serialize};

/// General-purpose registers, instruction pointer and flags.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl Default for StandardRegisters {
    fn default() -> Self {
        StandardRegisters {
            rax: 0,
            rbx: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            rsp: 0,
            rbp: 0,
            r8: 0,
            r9: 0,
            r10: 0,
            r11: 0,
            r12: 0,
            r13: 0,
            r14: 0,
            r15: 0,
            rip: 0xfff0,
            // Bit 1 is reserved and always set.
            rflags: 0x2,
        }
    }
}

/// A segment register with its hidden descriptor cache.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// Decodes a GDT entry into the cached form a vCPU loads, for selector `selector`.
    pub fn from_gdt_entry(entry: u64, selector: u16) -> Segment {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
        let g = (entry >> 55) & 1 == 1;
        let present = (entry >> 47) & 1 == 1;
        Segment {
            base,
            // A granular limit counts 4 KiB pages; the cache holds bytes.
            limit: if g {
                ((limit as u32) << 12) | 0xfff
            } else {
                limit as u32
            },
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            present,
            dpl: ((entry >> 45) & 0x3) as u8,
            db: (entry >> 54) & 1 == 1,
            s: (entry >> 44) & 1 == 1,
            l: (entry >> 53) & 1 == 1,
            g,
            avl: (entry >> 52) & 1 == 1,
            unusable: !present,
        }
    }
}

/// GDTR or IDTR.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_flat_64bit_code_segment() {
        // Base 0, limit 0xfffff pages, present, code exec/read, long mode.
        let seg = Segment::from_gdt_entry(0x00af_9b00_0000_ffff, 0x10);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert!(seg.present && seg.l && seg.g && seg.s && !seg.db);
        assert_eq!(seg.selector, 0x10);
    }

    #[test]
    fn decodes_flat_32bit_data_segment() {
        let seg = Segment::from_gdt_entry(0x00cf_9300_0000_ffff, 0x18);
        assert_eq!(seg.type_, 0x3);
        assert!(seg.db && !seg.l);
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn null_entry_is_unusable() {
        let seg = Segment::from_gdt_entry(0, 0);
        assert!(seg.unusable && !seg.present);
    }
}
