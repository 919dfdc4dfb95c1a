//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how the ISA interrupt lines are wired.
//!
//! The floating pointer sits in the last KiB of base memory (where Linux scans for it) and the
//! configuration table just below it, inside a range the e820 map marks reserved.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, IRQ_MAX};
use crate::memory::GuestMemory;

/// First byte of the reserved range that holds the table.
pub const MPTABLE_START: u64 = 0x9f000;
/// The floating pointer structure's address (the last KiB of the 640 KiB base memory).
pub const MP_FLOATING_POINTER_ADDR: u64 = 0x9fc00;
/// End of the reserved range.
pub const MPTABLE_END: u64 = 0xa0000;
/// Most vCPUs the table (and our guest kernel) describe.
pub const MAX_VCPUS: u8 = 64;

const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPUID.1 feature flags: FPU and APIC present (informational for the guest).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Stepping/model/family reported in processor entries.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4);

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// No vCPUs, or more than the table can describe.
    #[error("cannot describe {0} vCPUs (1..={MAX_VCPUS})")]
    VcpuCount(u8),
    /// Guest memory does not cover the table's range.
    #[error("guest memory has no room for the MP table")]
    NotEnoughMemory,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the configuration table (header + entries) for `vcpus` CPUs.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        // ISA IRQ n arrives at IOAPIC pin n (the 8259's ExtINT reaches the CPUs through LINT0).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // LINT0 takes the 8259's ExtINT, LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(vcpus) + 2 + (IRQ_MAX as u16 + 1) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"SPRMCHN "); // OEM id
    table.extend_from_slice(b"microvm     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision 1.4
    fp[10] = checksum(&fp);
    fp
}

/// Writes the MP table for `vcpus` CPUs into guest memory.
pub fn setup_mptable(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let table = config_table(vcpus);
    // 64 CPUs need 1,548 bytes; the range below the floating pointer has 3 KiB.
    let table_addr = MP_FLOATING_POINTER_ADDR - (table.len() as u64).next_multiple_of(16);
    debug_assert!(table_addr >= MPTABLE_START);
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(|_| MptableError::NotEnoughMemory)?;
    mem.write_slice(
        &floating_pointer(table_addr as u32),
        GuestAddress(MP_FLOATING_POINTER_ADDR),
    )
    .map_err(|_| MptableError::NotEnoughMemory)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn read_table(mem: &GuestMemory) -> Vec<u8> {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MP_FLOATING_POINTER_ADDR))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }

    #[test]
    fn describes_every_cpu_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for n in [1u8, 2, 4, MAX_VCPUS] {
            setup_mptable(&mem, n).unwrap();
            let table = read_table(&mem);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(sum(&table), 0, "table checksum for {n} vCPUs");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            let mut off = 44;
            let mut cpus = vec![];
            for _ in 0..count {
                match table[off] {
                    ENTRY_PROCESSOR => {
                        cpus.push((table[off + 1], table[off + 3]));
                        off += 20
                    }
                    1..=4 => off += 8,
                    t => panic!("unknown entry type {t}"),
                }
            }
            assert_eq!(off, table.len());
            assert_eq!(cpus.len(), n as usize);
            assert_eq!(cpus[0], (0, CPU_ENABLED | CPU_BOOTPROCESSOR));
            assert!(cpus[1..].iter().all(|&(_, f)| f == CPU_ENABLED));
        }
    }

    #[test]
    fn refuses_zero_and_too_many_cpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(setup_mptable(&mem, 0).is_err());
        assert!(setup_mptable(&mem, MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn fails_cleanly_without_memory_there() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotEnoughMemory)
        ));
    }
}
