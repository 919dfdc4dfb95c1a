//! Architecture-specific guest layout and boot preparation.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
