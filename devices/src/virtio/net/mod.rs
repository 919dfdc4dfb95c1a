//! virtio-net (virtio 1.2, 5.1): one receive and one transmit queue, Ethernet frames to and
//! from a [`NetBackend`] (a [`tap::Tap`] device, or a user-mode network stack).
//!
//! Owns: the device model (features, config space, both queues), moving whole frames between
//! the guest's buffers and the backend, and the `virtio_net_hdr_v1` that starts every buffer.
//!
//! Does not own: anything above Ethernet (addresses, DHCP, NAT belong to the backend), offloads
//! (no checksum, GSO or mergeable rx buffers are offered, so every frame is complete and
//! checksummed), the control queue, or multiqueue.
//!
//! Features offered: `VERSION_1`, `RING_EVENT_IDX`, [`features::MAC`], [`features::MTU`] and
//! [`features::STATUS`] (the link is always up). The config space is `mac[6]`, `status: u16`,
//! `max_virtqueue_pairs: u16` (1) and `mtu: u16`, little endian; writes to it are ignored.
//!
//! Everything the guest posts is validated: every buffer must lie in guest memory; a transmit
//! chain shorter than the header plus an Ethernet header, or carrying more than [`MAX_FRAME`]
//! bytes, is returned unsent; a frame too big for the receive chain the guest posted is dropped
//! and the chain kept for the next frame. Drops are counted in [`NetStats`].
//!
//! Flow control: the device holds at most one frame the guest has no buffer for, and stops
//! watching the backend until the guest posts receive buffers, so a full receive ring neither
//! loses that frame nor makes the event loop spin on a readable backend.

mod device;
pub mod tap;
#[cfg(test)]
mod tests;

pub use device::{Net, NetStats};

/// A network backend: where the guest's frames go and the guest's incoming frames come from.
pub trait NetBackend: Send {
    /// One Ethernet frame from the guest (no virtio header). A backend may drop frames, like a
    /// wire.
    fn send(&mut self, frame: &[u8]);
    /// Copies the next frame for the guest into `buf` (sized for the largest frame, see
    /// [`MAX_FRAME`]) and returns its length; `None` when nothing waits. A frame longer than
    /// `buf` is the backend's bug: it drops it.
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// Services host-side work (sockets, timers) and frames taken with `send`; afterwards
    /// `recv` may have frames. Called after a batch of `send`s, when `event_fd` is readable,
    /// and after the device drained frames with `recv` (so a backend that stopped reading its
    /// sockets because its queue was full can resume).
    fn poll(&mut self);
    /// A descriptor that is readable when `poll` has work (level-triggered); `None` if the
    /// backend needs none.
    fn event_fd(&self) -> Option<std::os::fd::RawFd>;
}

/// The largest Ethernet frame (MTU 65535 plus its header) the device moves, either way.
pub const MAX_FRAME: usize = 65550;
/// Receive queue: frames to the guest.
pub const RX_QUEUE: usize = 0;
/// Transmit queue: frames from the guest.
pub const TX_QUEUE: usize = 1;
/// Queue size the device offers for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which starts every buffer in both directions.
pub const HEADER_LEN: usize = 12;
/// Length of an Ethernet header: shorter frames are dropped.
pub const ETH_HEADER_LEN: usize = 14;
/// Length of the config space.
pub const CONFIG_LEN: usize = 12;
/// Smallest MTU the device reports (virtio 1.2, 5.1.4.1: at least 68).
pub const MIN_MTU: u16 = 68;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    /// The config space's `mtu` is valid: the driver uses it as its maximum MTU.
    pub const MTU: u64 = 1 << 3;
    /// The config space's `mac` is valid.
    pub const MAC: u64 = 1 << 5;
    /// The config space's `status` is valid.
    pub const STATUS: u64 = 1 << 16;
}

/// `status` in the config space: the link is up.
pub const LINK_UP: u16 = 1;
