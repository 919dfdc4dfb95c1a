//! # usernet
//!
//! Rootless networking for guests. The guest sees an Ethernet link to a gateway; every TCP
//! and UDP flow it starts is terminated here and re-made as an ordinary host socket, so no
//! TAP device, bridge or privilege is needed. The host decides where a guest may connect.
//!
//! Owns: the [`EgressPolicy`](policy::EgressPolicy) (parsed from the CLI's `--egress`), the
//! DNS responder the guest's resolver talks to ([`dns`]), and the NAT itself ([`UserNet`],
//! Linux): Ethernet frames in ([`UserNet::send`]) and out ([`UserNet::recv`]), host work done in
//! [`UserNet::poll`] when [`UserNet::event_fd`] is readable.
//!
//! Does not own: the virtio-net device (`devices`; the facade adapts a `UserNet` to its
//! `NetBackend`, so this crate builds without any device model), how the guest configures its
//! interface (`guest-init`), or TAP devices (`devices::virtio::net::tap`).
//!
//! ```no_run
//! # #[cfg(target_os = "linux")] {
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

pub mod dns;
#[cfg(target_os = "linux")]
mod nat;
pub mod policy;
#[cfg(target_os = "linux")]
mod rate;

#[cfg(target_os = "linux")]
pub use nat::{
    UserNet, UserNetConfig, UserNetError, UserNetStats, DNS, GATEWAY, GATEWAY_MAC, GUEST, MTU,
    PREFIX_LEN,
};
