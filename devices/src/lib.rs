//! # devices
//!
//! Device models for supermachine guests, on `vmm-core`'s [`BusDevice`](vmm_core::BusDevice)
//! seam. No hypervisor bindings: a device sees bus offsets, guest memory and interrupt triggers.
//!
//! Owns: the legacy platform devices a microVM needs ([`legacy`]: COM1 serial, the i8042 reset
//! line, the exit-status port) and, as they arrive, the virtio devices.
//!
//! Does not own: where devices are placed or which ones a VM gets (the `supermachine` facade),
//! nor how interrupts reach the guest (backends).
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod event_loop;
pub mod legacy;
#[cfg(test)]
mod test_support;
#[cfg(target_os = "linux")]
pub mod unix_peer;
#[cfg(target_os = "linux")]
pub mod virtio;
