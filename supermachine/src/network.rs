//! The guest's network: whether a VM gets a virtio-net device, and what is on its host side.
//!
//! `user` (the default) is [`usernet`]'s NAT: no privileges, every flow re-made as a host
//! socket under the [`EgressPolicy`]; the guest is `10.0.2.15/24`, its gateway `10.0.2.2`
//! stands for the host's loopback, its DNS server is `10.0.2.3`. `tap:IFACE` attaches an
//! existing TAP device (root or a TAP owned by the user) with the same guest addressing, for
//! a host side the user configures (bridge, routing, firewall); egress policies do not apply
//! there. `none` gives the guest only `lo`.

use std::fmt;
use std::str::FromStr;

pub use usernet::policy::EgressPolicy;

pub use vmm::GUEST_MAC;

/// Which host side a VM's network has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// No network device: the guest has only `lo`.
    None,
    /// The user-mode NAT (default).
    #[default]
    User,
    /// An existing TAP device.
    Tap(String),
}

impl FromStr for NetworkMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetworkMode::None),
            "user" => Ok(NetworkMode::User),
            _ => match s.strip_prefix("tap:") {
                Some(name) if !name.is_empty() => Ok(NetworkMode::Tap(name.to_string())),
                _ => Err(format!(
                    "unknown network {s:?}: expected none, user or tap:IFACE"
                )),
            },
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkMode::None => f.write_str("none"),
            NetworkMode::User => f.write_str("user"),
            NetworkMode::Tap(name) => write!(f, "tap:{name}"),
        }
    }
}

/// A VM's network settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkOptions {
    /// The host side.
    pub mode: NetworkMode,
    /// Where the guest may connect (user mode only). The default is the public internet
    /// only: the host's loopback, private networks and cloud metadata stay out of reach.
    pub egress: EgressPolicy,
}

/// Errors setting up a VM's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The options contradict each other.
    #[error("{0}")]
    Invalid(String),
    /// The user-mode NAT could not start.
    #[cfg(feature = "usernet")]
    #[error(transparent)]
    User(#[from] usernet::UserNetError),
    /// The TAP device could not be attached.
    #[error(transparent)]
    Tap(#[from] devices::virtio::net::tap::TapError),
}

impl NetworkOptions {
    /// No network at all.
    pub fn none() -> Self {
        NetworkOptions {
            mode: NetworkMode::None,
            egress: EgressPolicy::default(),
        }
    }

    /// Whether the guest gets a network device (`--egress none` means it does not).
    pub fn has_device(&self) -> bool {
        self.mode != NetworkMode::None && self.egress.has_network()
    }

    /// Refuses combinations that cannot work, before anything starts. A TAP device takes
    /// the default policy (its traffic is the host firewall's to filter), `allow-all` and
    /// `none`; any other policy would be silently ignored, so it is refused.
    pub fn validate(&self) -> Result<(), NetworkError> {
        if matches!(self.mode, NetworkMode::Tap(_))
            && !matches!(
                self.egress,
                EgressPolicy::Public | EgressPolicy::AllowAll | EgressPolicy::None
            )
        {
            return Err(NetworkError::Invalid(
                "--egress applies to --network user; a TAP device's traffic is for the host's firewall to filter".into(),
            ));
        }
        Ok(())
    }

    /// The host side of the guest's virtio-net device (`None` without one).
    pub fn backend(
        &self,
    ) -> Result<Option<Box<dyn devices::virtio::net::NetBackend>>, NetworkError> {
        self.validate()?;
        if !self.has_device() {
            return Ok(None);
        }
        Ok(Some(match &self.mode {
            NetworkMode::None => return Ok(None),
            NetworkMode::User => user_net(&self.egress)?,
            NetworkMode::Tap(name) => Box::new(devices::virtio::net::tap::Tap::open(name)?),
        }))
    }

    /// What guest-init configures (the same for both host sides).
    pub(crate) fn guest_config(&self) -> Option<guest_init::NetworkConfig> {
        self.has_device().then(|| guest_init::NetworkConfig {
            interface: "eth0".into(),
            address: usernet::GUEST,
            prefix_len: usernet::PREFIX_LEN,
            gateway: usernet::GATEWAY,
            dns: usernet::DNS,
            mtu: usernet::MTU,
        })
    }
}

/// A network device's host side with the MTU the guest is configured with (the same for both
/// host sides).
pub(crate) fn net_spec(backend: Box<dyn devices::virtio::net::NetBackend>) -> vmm::NetSpec {
    vmm::NetSpec {
        backend,
        mtu: usernet::MTU,
    }
}

/// The user-mode NAT with `policy`, as the virtio-net device's host side.
#[cfg(feature = "usernet")]
fn user_net(
    policy: &EgressPolicy,
) -> Result<Box<dyn devices::virtio::net::NetBackend>, NetworkError> {
    Ok(Box::new(UserNetBackend(usernet::UserNet::new(
        usernet::UserNetConfig {
            policy: policy.clone(),
            ..Default::default()
        },
    )?)))
}

/// The user-mode NAT is not in this build.
#[cfg(not(feature = "usernet"))]
fn user_net(
    policy: &EgressPolicy,
) -> Result<Box<dyn devices::virtio::net::NetBackend>, NetworkError> {
    let _ = policy;
    Err(NetworkError::Invalid(
        "this build has no user-mode network (the `usernet` feature): use --network none or \
         --network tap:IFACE"
            .into(),
    ))
}

/// The user-mode NAT as the virtio-net device's host side.
#[cfg(feature = "usernet")]
struct UserNetBackend(usernet::UserNet);

#[cfg(feature = "usernet")]
impl devices::virtio::net::NetBackend for UserNetBackend {
    fn send(&mut self, frame: &[u8]) {
        self.0.send(frame);
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.0.recv(buf)
    }

    fn poll(&mut self) {
        self.0.poll();
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.0.event_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for s in ["none", "user", "tap:tap0"] {
            assert_eq!(s.parse::<NetworkMode>().unwrap().to_string(), s);
        }
        for bad in ["", "tap:", "bridge", "tap"] {
            let e = bad.parse::<NetworkMode>().unwrap_err();
            assert!(e.contains("none, user or tap:IFACE"), "{e}");
        }
    }

    #[test]
    fn egress_none_means_no_device_and_tap_refuses_policies() {
        let o = NetworkOptions {
            mode: NetworkMode::User,
            egress: "none".parse().unwrap(),
        };
        assert!(!o.has_device());
        assert!(o.guest_config().is_none());
        assert!(NetworkOptions::default().has_device());
        let tap = NetworkOptions {
            mode: NetworkMode::Tap("tap0".into()),
            egress: "allow:10.0.0.0/8".parse().unwrap(),
        };
        assert!(tap
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--network user"));
        let tap_default = NetworkOptions {
            mode: NetworkMode::Tap("tap0".into()),
            ..Default::default()
        };
        assert!(tap_default.validate().is_ok());
    }
}
