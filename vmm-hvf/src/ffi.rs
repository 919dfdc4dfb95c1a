//! Thin bindings to Hypervisor.framework on Apple silicon (the C API of `Hypervisor/hv.h`,
//! `hv_vcpu.h`, `hv_vm.h` and, from macOS 15, `hv_gic.h`): only what this backend calls, with
//! the C types kept. Every call is `unsafe`; the safe layer is `backend`.

#![allow(non_camel_case_types)]

use std::ffi::c_void;

/// `hv_return_t`.
pub type hv_return_t = i32;
/// `hv_vcpu_t`: a vCPU handle, valid on the thread that created it.
pub type hv_vcpu_t = u64;
/// `hv_ipa_t`: a guest physical address.
pub type hv_ipa_t = u64;
/// `hv_memory_flags_t`.
pub type hv_memory_flags_t = u64;
/// An OS object (configurations): opaque.
pub type hv_object_t = *mut c_void;

/// `HV_SUCCESS`.
pub const HV_SUCCESS: hv_return_t = 0;
/// `HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC`.
pub const HV_MEMORY_RWX: hv_memory_flags_t = 0b111;

/// `hv_exit_reason_t` values.
pub const HV_EXIT_REASON_CANCELED: u32 = 0;
/// A synchronous exception to EL2.
pub const HV_EXIT_REASON_EXCEPTION: u32 = 1;
/// The virtual timer fired (it is masked until unmasked).
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: u32 = 2;

/// `hv_vcpu_exit_exception_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_exception_t {
    /// `ESR_EL2`.
    pub syndrome: u64,
    /// `FAR_EL2`.
    pub virtual_address: u64,
    /// The faulting intermediate physical address.
    pub physical_address: hv_ipa_t,
}

/// `hv_vcpu_exit_t`: filled by `hv_vcpu_run`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_t {
    /// `hv_exit_reason_t`.
    pub reason: u32,
    /// Set for `HV_EXIT_REASON_EXCEPTION`.
    pub exception: hv_vcpu_exit_exception_t,
}

#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    pub fn hv_vm_create(config: hv_object_t) -> hv_return_t;
    pub fn hv_vm_map(
        addr: *mut c_void,
        ipa: hv_ipa_t,
        size: usize,
        flags: hv_memory_flags_t,
    ) -> hv_return_t;

    pub fn hv_vcpu_create(
        vcpu: *mut hv_vcpu_t,
        exit: *mut *const hv_vcpu_exit_t,
        config: hv_object_t,
    ) -> hv_return_t;
    pub fn hv_vcpu_run(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpus_exit(vcpus: *const hv_vcpu_t, count: u32) -> hv_return_t;
    pub fn hv_vcpu_get_reg(vcpu: hv_vcpu_t, reg: u32, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_reg(vcpu: hv_vcpu_t, reg: u32, value: u64) -> hv_return_t;
    /// `value` is an `hv_simd_fp_uchar16_t` (16 bytes, 16-aligned).
    pub fn hv_vcpu_get_simd_fp_reg(vcpu: hv_vcpu_t, reg: u32, value: *mut u128) -> hv_return_t;
    pub fn hv_vcpu_set_simd_fp_reg(vcpu: hv_vcpu_t, reg: u32, value: u128) -> hv_return_t;
    pub fn hv_vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: u16, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: u16, value: u64) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_mask(vcpu: hv_vcpu_t, masked: bool) -> hv_return_t;
    pub fn hv_vcpu_get_vtimer_offset(vcpu: hv_vcpu_t, offset: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_offset(vcpu: hv_vcpu_t, offset: u64) -> hv_return_t;
    pub fn hv_vcpu_destroy(vcpu: hv_vcpu_t) -> hv_return_t;

    // The in-kernel GICv3 (macOS 15 and later).
    pub fn hv_gic_config_create() -> hv_object_t;
    pub fn hv_gic_config_set_distributor_base(config: hv_object_t, base: hv_ipa_t) -> hv_return_t;
    pub fn hv_gic_config_set_redistributor_base(config: hv_object_t, base: hv_ipa_t)
        -> hv_return_t;
    pub fn hv_gic_create(config: hv_object_t) -> hv_return_t;
    pub fn hv_gic_set_spi(intid: u32, level: bool) -> hv_return_t;

    /// `mach_absolute_time()`: the host counter the guest's virtual counter is offset from.
    pub fn mach_absolute_time() -> u64;
    /// Releases an OS object (configurations, GIC state).
    pub fn os_release(object: hv_object_t);
}
