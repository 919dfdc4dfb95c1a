//! # vmm-hvf
//!
//! The Apple Hypervisor.framework (HVF) backend for `vmm-core`.
//!
//! **Status: skeleton.** The crate compiles for its platform (CI runs
//! `cargo check --target aarch64-apple-darwin -p vmm-hvf`) and reserves the place of the backend in the
//! workspace, but it cannot run a VM yet: [`HvfHypervisor::new`] always returns
//! [`HypervisorError::Unavailable`]. It will own the platform bindings (written here, thin
//! and `unsafe` only at the FFI edge), VM and vCPU creation, memory mapping, and turning the
//! platform's exits into `vmm-core`'s neutral `VcpuExit` through the `IoHandler` callbacks.
//!
//! Does not own: guest layout, boot structures or devices (`vmm-core`, `devices`).
#![deny(missing_docs)]

pub mod psci;
pub mod regmap;
pub mod syndrome;

use vmm_core::{Hypervisor, HypervisorError};

/// The Apple Hypervisor.framework (HVF) hypervisor.
#[derive(Debug)]
pub struct HvfHypervisor {
    _private: (),
}

impl HvfHypervisor {
    /// Whether this machine can run VMs with this backend (never, until it is written).
    pub fn is_available() -> bool {
        Self::new().is_ok()
    }

    /// Opens the hypervisor. Not implemented yet: always fails with a clear message.
    pub fn new() -> Result<Self, HypervisorError> {
        Err(HypervisorError::Unavailable(
            "the Apple Hypervisor.framework (HVF) backend is not implemented yet".into(),
        ))
    }
}

impl Hypervisor for HvfHypervisor {
    fn name(&self) -> &'static str {
        "hvf"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_it_is_not_implemented() {
        let err = HvfHypervisor::new().unwrap_err();
        assert!(err.to_string().contains("not implemented"));
    }
}
