//! Virtio devices over the MMIO transport (virtio 1.x "modern" layout).
//!
//! A [`VirtioDevice`] is the device proper (its features, config space and queue processing);
//! [`MmioTransport`] puts it on the MMIO bus, owns its queues' configuration and the eventfds a
//! guest kick signals, and activates it when the driver says `DRIVER_OK`. Queue work runs on the
//! [`EventLoop`](crate::event_loop::EventLoop) thread, off the vCPU threads.

pub mod block;
pub mod chain;
pub mod console;
mod mmio;
pub mod net;
pub mod queue;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub use mmio::{MmioTransport, QueueSnapshot, TransportState, MMIO_SLOT_SIZE, NOTIFY_REG_OFFSET};
use virtio_queue::{Queue, QueueT};
use vmm_core::{GuestMemory, IrqTrigger};

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Feature bits common to all devices.
pub mod features {
    /// The device speaks virtio 1.x.
    pub const VERSION_1: u64 = 1 << 32;
    /// The driver and device suppress notifications with event indexes.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Device type IDs.
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
}

/// Interrupt status bit: a queue's used ring changed.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line and the status register the driver reads to learn why it fired.
pub struct Interrupt {
    status: AtomicU32,
    trigger: Arc<dyn IrqTrigger>,
}

impl Interrupt {
    /// An interrupt raising `trigger`.
    pub fn new(trigger: Arc<dyn IrqTrigger>) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            trigger,
        }
    }

    /// Tells the driver a used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// Tells the driver the configuration (or device status) changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // An eventfd write fails only when its counter would overflow: the guest has that many
        // interrupts pending already.
        let _ = self.trigger.trigger();
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The InterruptACK register.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured the wrong number of queues.
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What it got.
        got: usize,
    },
    /// A queue's rings lie outside guest memory or its size is invalid.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
}

/// Starts `device` with the driver's `queues` after the checks every device needs: exactly as
/// many queues as it has ([`VirtioDevice::queue_max_sizes`]), each with its rings inside guest
/// memory. Transports activate devices through this, so a device's own
/// [`activate`](VirtioDevice::activate) may rely on both.
pub fn activate_checked(
    device: &mut dyn VirtioDevice,
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
) -> Result<(), ActivateError> {
    let expected = device.queue_max_sizes().len();
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    if let Some(i) = queues.iter().position(|q| !q.is_valid(&mem)) {
        return Err(ActivateError::InvalidQueue(i));
    }
    device.activate(mem, queues, interrupt)
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ID.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`features`](Self::features)).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space at `offset`; bytes past its end read as zero.
    /// Mutable because a read can be the driver's answer to an event (vsock's CID re-read).
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues: one per
    /// [`queue_max_sizes`](Self::queue_max_sizes) entry, each valid in `mem` ([`activate_checked`] checks both;
    /// call it rather than this).
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Processes what the driver made available on queue `index` (called after a kick).
    fn process_queue(&mut self, index: usize);
    /// Stops the device and forgets its queues (the driver wrote 0 to the status register).
    fn reset(&mut self);
    /// Host-side event sources beyond the queues (e.g. "input arrived"), for the event loop.
    fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// `event_fds()[index]` became readable; the device must drain it, active or not.
    fn process_event(&mut self, _index: usize) {}
    /// The live queues (their ring positions) while active, for a snapshot; empty when the
    /// device is not active.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
    /// The device's own state beyond its queues, for a snapshot.
    fn save_device_state(&self) -> DeviceState {
        DeviceState::Stateless
    }
    /// Takes back [`save_device_state`](Self::save_device_state)'s state, before the device is
    /// re-activated from a snapshot.
    fn load_device_state(&mut self, state: &DeviceState) -> Result<(), String> {
        match state {
            DeviceState::Stateless => Ok(()),
            other => Err(format!("unexpected device state {other:?}")),
        }
    }
    /// Called once after the device was re-activated from a snapshot (e.g. vsock tells the
    /// guest its connections are gone).
    fn restored(&mut self) {}
}

/// A device's own state in a snapshot (what its queues and registers do not say).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum DeviceState {
    /// Nothing beyond queues and registers.
    Stateless,
    /// virtio-vsock.
    Vsock(vsock::VsockState),
}

/// Copies `src` (a config-space image) into `data` from `offset`, zero-filling past its end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < src.len() {
        let n = data.len().min(src.len() - offset);
        data[..n].copy_from_slice(&src[offset..offset + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
