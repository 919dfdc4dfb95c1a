//! Architecture-specific guest layout, boot preparation and backend extension traits.
//!
//! Every architecture module offers the same names, which the neutral [`builder`](crate::builder)
//! and [`runner`](crate::runner) use through [`host`] (the module of the architecture this
//! crate is compiled for):
//!
//! - `ArchHypervisor`, `ArchVm`, `ArchVcpu`: the architecture's extension traits of
//!   [`Hypervisor`](crate::Hypervisor), [`Vm`](crate::Vm) and [`Vcpu`](crate::Vcpu), which a
//!   backend implements (x86-64: [`x86_64::HypervisorX86_64`] …);
//! - `VmOptions`: how a VM is put together (its interrupt controllers);
//! - `VmState`, `VcpuState`: what a snapshot saves, as plain serde data;
//! - `MAX_VCPUS`, `ram_ranges`: the guest physical layout of RAM;
//! - `load_guest` and its `BootError`: loading a kernel and initramfs per the architecture's
//!   boot protocol and setting the boot vCPU's registers.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64 as host;

// Pure data and logic (layout, device tree, Image loading) build on every host: tools use the
// layout and the tests run everywhere; only loading into vCPUs needs an arm64 host.
pub mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use self::aarch64 as host;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("vmm-core supports x86_64 and aarch64 hosts");
