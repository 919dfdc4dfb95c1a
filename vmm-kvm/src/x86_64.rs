//! x86-64 specifics of the KVM backend.

pub mod cpuid;
pub mod regs;
pub mod state;
