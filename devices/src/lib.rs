//! # devices
//!
//! Device models for supermachine guests, on `vmm-core`'s [`BusDevice`](vmm_core::BusDevice)
//! seam. No hypervisor bindings: a device sees bus offsets, guest memory and interrupt triggers.
//!
//! Owns: the legacy platform devices a microVM needs ([`legacy`]: the 16550 serial port, the
//! i8042 reset line, the exit-status register), the virtio-mmio transport with the activation
//! checks and the queue-drain loop every device shares, the virtio devices (blk, console,
//! vsock with its host side on Unix sockets, net behind the `NetBackend` trait with a TAP
//! backend), and the device event loop.
//!
//! Does not own: where devices are placed or which ones a VM gets (the `vmm` machine layer),
//! nor how interrupts reach the guest (backends), nor any network stack (`usernet`).
//!
//! A virtio disk on the MMIO bus of a VM being built with `vmm-core` (any backend):
//!
//! ```no_run
//! # #[cfg(target_os = "linux")]
//! # fn place(builder: &mut vmm_core::VmBuilder) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::{Arc, Mutex};
//! use devices::virtio::{block::Block, MmioTransport, MMIO_SLOT_SIZE};
//!
//! let disk = Block::open(std::path::Path::new("disk.img"), true)?;
//! let irq = builder.irq_trigger(5)?;
//! let transport = MmioTransport::new(Box::new(disk), builder.memory().clone(), irq)?;
//! builder.add_mmio_device(Arc::new(Mutex::new(transport)), 0xd000_0000, MMIO_SLOT_SIZE)?;
//! // …and tell the guest kernel: virtio_mmio.device=4K@0xd0000000:5
//! # Ok(()) }
//! ```
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
