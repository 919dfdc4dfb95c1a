//! The CPU model a vCPU sees: what KVM supports, with the topology and identity filled in so
//! the guest finds exactly `count` CPUs, one core each, in one package.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
/// Intel VMX (leaf 1) and AMD SVM (leaf 0x8000_0001), both in ECX.
const ECX_VMX: u32 = 1 << 5;
const ECX_SVM: u32 = 1 << 2;
const EDX_HTT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` APIC IDs.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

fn fix_entry(e: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    let id32 = u32::from(id);
    match e.function {
        LEAF_FEATURES => {
            // EBX: initial APIC ID, logical processors per package, CLFLUSH line size (8 * 8 B).
            e.ebx = (id32 << 24) | (u32::from(count) << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            // No nested virtualization: a guest's own VMs would be state a snapshot cannot
            // hold (KVM_GET_NESTED_STATE is not there on every host, or fails where claimed).
            e.ecx &= !ECX_VMX;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let cores = u32::from(count.max(1)) - 1;
            e.eax = (e.eax & 0x3fff) | (cores << 26);
            if e.eax & 0x1f != 0 {
                let sharing = if (e.eax >> 5) & 0x7 >= 3 { cores } else { 0 };
                e.eax |= sharing << 14;
            }
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            e.edx = id32;
            match e.index {
                0 => {
                    // One thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = id_bits(count);
                    e.ebx = u32::from(count);
                    e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_FEATURES => e.ecx &= !ECX_SVM,
        LEAF_AMD_ADDR_SIZES => {
            // ECX[15:12]: APIC ID size; ECX[7:0]: cores - 1.
            e.ecx = (id_bits(count) << 12) | (u32::from(count.max(1)) - 1);
        }
        LEAF_AMD_EXT_APIC_ID => {
            e.eax = id32;
            e.ebx = id32; // core ID, one thread per core
            e.ecx = 0;
        }
        _ => {}
    }
}

/// The CPUID table for vCPU `id` of `count`.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        fix_entry(e, id, count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(LEAF_FEATURES, 0);
        fix_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn guests_get_no_hardware_virtualization() {
        let mut intel = entry(LEAF_FEATURES, 0);
        intel.ecx = u32::MAX;
        fix_entry(&mut intel, 0, 1);
        assert_eq!(intel.ecx & ECX_VMX, 0);
        let mut amd = entry(LEAF_AMD_FEATURES, 0);
        amd.ecx = u32::MAX;
        fix_entry(&mut amd, 0, 1);
        assert_eq!(amd.ecx, !ECX_SVM);
    }

    #[test]
    fn extended_topology_counts_cores() {
        let mut smt = entry(LEAF_EXT_TOPOLOGY, 0);
        let mut core = entry(LEAF_EXT_TOPOLOGY, 1);
        fix_entry(&mut smt, 2, 4);
        fix_entry(&mut core, 2, 4);
        assert_eq!((smt.ebx, smt.edx), (1, 2));
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 2));
        assert_eq!((core.ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(64), 6);
    }
}
