//! # usernet
//!
//! Rootless networking for guests. The guest sees an Ethernet link to a gateway; every TCP
//! and UDP flow it starts is terminated here and re-made as an ordinary host socket, so no
//! TAP device, bridge or privilege is needed. The host decides where a guest may connect.
//!
//! Owns: the [`EgressPolicy`](policy::EgressPolicy) (parsed from the CLI's `--egress`), the
//! DNS responder the guest's resolver talks to ([`dns`]), and the NAT itself ([`UserNet`],
//! Linux), which is a [`devices::virtio::net::NetBackend`].
//!
//! Does not own: the virtio-net device (`devices`), how the guest configures its interface
//! (`guest-init`), or TAP devices (`devices::virtio::net::tap`).
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
