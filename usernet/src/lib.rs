//! # usernet
//!
//! Rootless networking for guests. The guest sees an Ethernet link to a gateway; every TCP
//! and UDP flow it starts is terminated here and re-made as an ordinary host socket, so no
//! TAP device, bridge or privilege is needed. The host decides where a guest may connect.
//!
//! Owns: the [`EgressPolicy`](policy::EgressPolicy) (parsed from the CLI's `--egress`), the
//! link's addresses ([`GUEST`], [`GATEWAY`], [`DNS`], [`MTU`]), the DNS responder the guest's
//! resolver talks to ([`dns`]), and the NAT itself (`UserNet`, Linux, the `nat` feature, on by
//! default; without it the crate is the policy and addressing alone): Ethernet frames in ([`UserNet::send`]) and out ([`UserNet::recv`]), host work done in
//! [`UserNet::poll`] when [`UserNet::event_fd`] is readable.
//!
//! Does not own: the virtio-net device (`devices`; the facade adapts a `UserNet` to its
//! `NetBackend`, so this crate builds without any device model), how the guest configures its
//! interface (`guest-init`), or TAP devices (`devices::virtio::net::tap`).
//!
//! ```no_run
//! # #[cfg(all(target_os = "linux", feature = "nat"))] {
//! let mut nat = usernet::UserNet::new(usernet::UserNetConfig::default()).unwrap();
//! nat.send(&[0u8; 60]); // a frame from the guest
//! nat.poll();
//! let mut frame = vec![0u8; 65550];
//! while let Some(len) = nat.recv(&mut frame) {
//!     let _for_the_guest = &frame[..len];
//! }
//! # }
//! ```
#![deny(missing_docs)]

#[cfg(all(target_os = "linux", feature = "nat"))]
mod budget;
pub mod dns;
#[cfg(all(target_os = "linux", feature = "nat"))]
mod nat;
pub mod policy;
#[cfg(all(target_os = "linux", feature = "nat"))]
mod rate;

#[cfg(all(target_os = "linux", feature = "nat"))]
pub use budget::{FlowBudget, FlowPermit};
#[cfg(all(target_os = "linux", feature = "nat"))]
pub use nat::{UserNet, UserNetConfig, UserNetError, UserNetStats};

use std::net::Ipv4Addr;

/// The gateway's address; flows to it reach the host's loopback when the policy allows
/// (`allow-host:PORT,...` or `allow-all`; the default policy does not).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server's address (UDP port 53).
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The address the guest is configured with.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The link's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The gateway's MAC address.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x35, 0x02];
/// The link MTU the guest is given.
pub const MTU: u16 = 1500;
