//! # vmm-kvm
//!
//! The Linux KVM backend: implements `vmm-core`'s [`Hypervisor`](vmm_core::Hypervisor),
//! [`Vm`](vmm_core::Vm) and [`Vcpu`](vmm_core::Vcpu) on `kvm-ioctls`.
//!
//! Owns: opening `/dev/kvm`, memory slots, irqfds and ioeventfds, kicks (`common`); on x86-64
//! the in-kernel irqchip and PIT, vCPU creation with a CPU model (`KVM_GET_SUPPORTED_CPUID` with
//! the topology filled in, boot MSRs, FPU and LAPIC defaults), conversion between `vmm-core`'s
//! neutral registers and KVM's, snapshots; on arm64 the vGICv3, vCPU init with PSCI 0.2,
//! one-reg access, vCPU and vGIC snapshots (checked in an emulated arm64 host); and turning
//! `KVM_RUN` exits into neutral [`VcpuExit`](vmm_core::VcpuExit)s.
//!
//! Does not own: guest layout, boot structures or devices (`vmm-core`, `devices`).
//! Compiles to an empty crate on other operating systems and architectures.
//!
//! ```no_run
//! # #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = vmm_kvm::KvmHypervisor::new()?; // says why when /dev/kvm is unusable
//! let builder = vmm_core::VmBuilder::new(
//!     &kvm,
//!     vmm_core::VmResources {
//!         kernel: "vmlinux".into(),
//!         initramfs: Vec::new(),
//!         cmdline: "console=ttyS0".into(),
//!         memory_mib: 128,
//!         vcpus: 1,
//!     },
//! )?;
//! let exit = vmm_core::runner::run(builder.build()?, &vmm_core::VmControl::new())?;
//! # let _ = exit;
//! # Ok(()) }
//! # #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))] fn main() {}
//! ```
#![deny(missing_docs)]

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
mod aarch64;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod common;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod kvm;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod x86_64;

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub use aarch64::{KvmHypervisor, KvmVcpu, KvmVm};
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use kvm::{KvmHypervisor, KvmVcpu, KvmVm};
