//! # vmm-hvf
//!
//! The Apple Hypervisor.framework (HVF) backend for `vmm-core`, on Apple silicon: `vmm-core`'s
//! arm64 traits (`HypervisorAArch64`, `VmAArch64`, `VcpuAArch64`) over thin bindings of the
//! framework's C API (`ffi`, macOS only), with the in-kernel GICv3 of macOS 15.
//!
//! Owns: the bindings, VM and vCPU creation (vCPUs made on the thread that runs them), guest
//! memory mapping, decoding the traps the framework returns ([`syndrome`]), PSCI for vCPU
//! bring-up and power-off ([`psci`]), and the mapping of the neutral register IDs to the
//! framework's ([`regmap`]). The pure logic is unit-tested on every host.
//!
//! Does not own: guest layout, the device tree, boot structures or devices (`vmm-core`,
//! `devices`).
//!
//! **Status: built, not run.** It compiles (and passes clippy) for `aarch64-apple-darwin` in
//! CI; it has not been run on a Mac. Snapshots of HVF VMs are refused (the GIC's state is not
//! saved yet). Elsewhere [`HvfHypervisor::new`] says the framework is not there.
#![deny(missing_docs)]

pub mod psci;
pub mod regmap;
pub mod syndrome;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod backend;
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod ffi;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub use backend::{HvfHypervisor, HvfVcpu, HvfVm};

#[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
pub use elsewhere::HvfHypervisor;

#[cfg(not(all(target_os = "macos", target_arch = "aarch64")))]
mod elsewhere {
    use vmm_core::{Hypervisor, HypervisorError};

    /// Hypervisor.framework, which exists only on macOS on Apple silicon.
    #[derive(Debug)]
    pub struct HvfHypervisor {
        _private: (),
    }

    impl HvfHypervisor {
        /// Whether this machine can run VMs with this backend (never, here).
        pub fn is_available() -> bool {
            Self::new().is_ok()
        }

        /// Always fails here, saying why.
        pub fn new() -> Result<Self, HypervisorError> {
            Err(HypervisorError::Unavailable(
                "Apple's Hypervisor.framework (HVF) exists only on macOS on Apple silicon".into(),
            ))
        }
    }

    impl Hypervisor for HvfHypervisor {
        fn name(&self) -> &'static str {
            "hvf"
        }
    }
}

#[cfg(all(test, not(all(target_os = "macos", target_arch = "aarch64"))))]
mod tests {
    use super::*;

    #[test]
    fn says_where_the_framework_exists() {
        let err = HvfHypervisor::new().unwrap_err();
        assert!(err.to_string().contains("only on macOS"), "{err}");
    }
}
