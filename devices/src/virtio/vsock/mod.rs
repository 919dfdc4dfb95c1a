//! virtio-vsock (virtio 1.2, 5.10) with the host side on Unix sockets, as Firecracker does it.
//!
//! Owns: the device model (rx/tx/event queues, config space = the guest's CID), the stream-socket
//! protocol with per-connection credit flow control, and the host side:
//! - **host → guest**: a host process connects to the device's Unix socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <local_port>\n` and the stream is
//!   relayed both ways;
//! - **guest → host**: a guest connection to CID 2 port `P` becomes a connection to the Unix
//!   socket `<uds_path>_P`.
//!
//! Does not own: anything in the guest (no agent, no protocol above the byte stream), TCP
//! proxying, SEQPACKET sockets, or where the socket files live (the caller picks `uds_path`).
//!
//! Everything the guest sends is validated and bounded: packets are parsed from any split of the
//! descriptor chain, payloads are at most [`MAX_PAYLOAD`] bytes, each connection buffers at most
//! [`BUF_ALLOC`] bytes for the host (a guest that overruns its credit is reset), and the number of
//! connections and of queued control packets are capped ([`MAX_CONNECTIONS`],
//! [`MAX_PENDING_CONTROL`]).
//!
//! The guest gets RST for: a packet whose header is readable but whose `len` exceeds the chain or
//! [`MAX_PAYLOAD`], a wrong source or destination CID, a type other than stream, an unknown
//! operation, a packet for no connection, a REQUEST that cannot be connected (or duplicates a live
//! connection), data beyond its credit or after its SHUTDOWN(send), a host stream error or a
//! hang-up with guest data still undelivered, a host connection it did not answer within
//! [`CONNECT_TIMEOUT`], and, as the clean end of a connection, once both directions are shut.
//! An RST from the guest is never answered; a chain too short for a header is returned unanswered.
//!
//! The host side's file descriptors change over time, but the event loop registers a device's
//! [`event_fds`](crate::virtio::VirtioDevice::event_fds) once; so the device keeps an inner epoll
//! holding its listener, its timer and every connection's stream, and hands out only that one fd.

mod connection;
mod device;
mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;
mod unix;

use std::time::Duration;

pub use device::{Vsock, VsockError, VsockState};
pub use packet::{PacketError, PacketHeader};

/// The host's CID (virtio 1.2, 5.10.4).
pub const HOST_CID: u64 = 2;
/// Queue size the device offers for each of its three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue: packets to the guest.
pub const RX_QUEUE: usize = 0;
/// Transmit queue: packets from the guest.
pub const TX_QUEUE: usize = 1;
/// Event queue: transport events to the guest.
pub const EVENT_QUEUE: usize = 2;
/// Largest payload of one packet, in either direction.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Receive buffer space each connection advertises to the guest (`buf_alloc`): what it may send
/// before we have forwarded it to the host.
pub const BUF_ALLOC: u32 = 256 << 10;
/// We send a CREDIT_UPDATE once the free space the guest knows of falls below this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 << 10;
/// Open connections (both directions, including ones still being set up).
pub const MAX_CONNECTIONS: usize = 256;
/// Host connections accepted but whose `CONNECT` line has not arrived yet. Host connections
/// beyond this (or beyond [`MAX_CONNECTIONS`]) are not refused: they wait in the listener's
/// backlog until there is room.
pub const MAX_HANDSHAKES: usize = 64;
/// Control packets (RSTs) for connections that no longer exist, waiting for rx buffers; more are
/// dropped (the guest is not giving us buffers).
pub const MAX_PENDING_CONTROL: usize = 1024;
/// Host-side local ports of host-initiated connections are allocated from here up.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host connection has to send its `CONNECT` line, and the guest to answer a REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `CONNECT <port>` line, newline excluded.
pub const MAX_CONNECT_LINE: usize = 32;
