//! The egress policy: where a guest may open connections.
//!
//! The NAT checks [`EgressPolicy::allows`] before it makes a host socket for a new TCP or UDP
//! flow, and the DNS responder checks [`EgressPolicy::allows_address`] on every address it
//! would hand the guest, so names of forbidden hosts do not even resolve.
//!
//! # Syntax (`--egress POLICY`)
//! ```text
//! public                    the public internet only: everything except the ranges
//!                           listed at is_private() (the default; `deny-private` is the
//!                           same policy under its older name)
//! allow-host:PORT,...       public, plus these ports of the host's loopback (the gateway)
//! allow-all                 everything, the host's loopback included
//! none                      no network at all
//! allow:RULE,RULE,...       only flows matching some rule
//! deny:RULE,RULE,...        every flow except those matching some rule
//!
//! RULE := CIDR [ ":" PORT ]          PORT is 1..=65535; none means every port
//! CIDR := IPV4 [ "/" LEN ]           no LEN means /32
//!       | "[" IPV6 "]" [ "/" LEN ]   no LEN means /128
//!       | "[" IPV6 "/" LEN "]"
//!       | IPV6 [ "/" LEN ]           bare IPv6: only without a port
//! ```
//! A bare IPv6 address cannot carry a port: `2001:db8::1:443` is the address
//! `2001:db8::1:443`, not port 443. Write `[2001:db8::1]:443`.
//!
//! Whitespace around rules is ignored. A CIDR with host bits set (`10.0.0.1/8`) is an error,
//! because it usually means a typo.
//!
//! # Never reachable
//! Whatever the policy, `0.0.0.0/8` and the limited broadcast `255.255.255.255` are refused
//! as destinations (and `::` for IPv6): a host socket connected to `0.0.0.0` reaches the
//! host's own loopback, so allowing it would let `deny:127.0.0.0/8` be walked around.
//!
//! # Matching
//! Addresses are passed through [`normalise`] both when rules are built and when flows are
//! checked, so `::ffff:10.0.0.1` is 10.0.0.1 everywhere. A rule written as an IPv4-mapped IPv6
//! network with a prefix of at least 96 becomes the IPv4 network (prefix − 96):
//! `[::ffff:10.0.0.0]/104` is `10.0.0.0/8`. After that, an IPv4 network never matches an IPv6
//! address nor the reverse: `[::]/0` does not cover IPv4, so "everything" is
//! `0.0.0.0/0,[::]/0`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Where a guest's network may reach.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EgressPolicy {
    /// The public internet only: every destination except private, loopback, link-local
    /// (cloud metadata), CGNAT, multicast and reserved ones (see [`is_private`]). The
    /// default, since a guest runs code nobody trusts.
    #[default]
    Public,
    /// [`EgressPolicy::Public`], plus these TCP/UDP ports of the host's loopback (what the
    /// guest reaches at the gateway).
    PublicAndHost(Vec<u16>),
    /// Every destination, the host's loopback and private networks included.
    AllowAll,
    /// Only destinations matching one of the rules. An empty list allows nothing.
    Allow(Vec<Rule>),
    /// Every destination except those matching one of the rules.
    Deny(Vec<Rule>),
    /// No network at all.
    None,
}

/// One entry of an `allow:` or `deny:` list: a network and optionally a single port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The destination network.
    pub net: IpNet,
    /// The destination port; `None` matches every port.
    pub port: Option<u16>,
}

/// An IP network: an address with every bit beyond the prefix clear, and the prefix length.
///
/// Always normalised: an IPv4-mapped IPv6 network with a prefix of at least 96 is stored as
/// the IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why an egress policy, rule or network did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The policy is none of the known words.
    #[error(
        "unknown egress policy `{0}`: expected public, allow-host:PORT,..., allow-all, none, \
         allow:RULE,... or deny:RULE,..."
    )]
    UnknownPolicy(String),
    /// `allow:` or `deny:` with nothing after it.
    #[error("`{0}:` needs at least one rule, e.g. `{0}:10.0.0.0/8`")]
    EmptyList(&'static str),
    /// A list with an empty entry (a stray comma).
    #[error("empty rule in `{0}` (stray comma?)")]
    EmptyRule(String),
    /// The address part is not an IP address.
    #[error(
        "bad address `{addr}` in `{rule}`: expected an IPv4 address or an IPv6 address \
         in brackets"
    )]
    BadAddress {
        /// The whole rule.
        rule: String,
        /// The part that should have been an address.
        addr: String,
    },
    /// The prefix length is not a number.
    #[error("bad prefix length `/{prefix}` in `{rule}`: expected a number")]
    BadPrefix {
        /// The whole rule.
        rule: String,
        /// The text after the `/`.
        prefix: String,
    },
    /// The prefix length is longer than the address.
    #[error("prefix length /{prefix} is too long for {addr} (at most /{max})")]
    PrefixTooLong {
        /// The network's address.
        addr: IpAddr,
        /// The prefix length given.
        prefix: u8,
        /// 32 or 128.
        max: u8,
    },
    /// The address has bits set beyond the prefix.
    #[error("{addr}/{prefix} has host bits set; did you mean {network}/{prefix}?")]
    HostBits {
        /// The address given.
        addr: IpAddr,
        /// The prefix length given.
        prefix: u8,
        /// The address with the host bits cleared.
        network: IpAddr,
    },
    /// The port is not a number in 1..=65535.
    #[error("bad port `{port}` in `{rule}`: expected 1-65535")]
    BadPort {
        /// The whole rule.
        rule: String,
        /// The text after the `:`.
        port: String,
    },
    /// The rule's shape is wrong (brackets, a bare IPv6 address with a port, ...).
    #[error("bad rule `{rule}`: {why}")]
    BadRule {
        /// The whole rule.
        rule: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// Strips the IPv4-mapped IPv6 form: `::ffff:a.b.c.d` becomes `a.b.c.d`; any other address is
/// returned unchanged.
pub fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        IpAddr::V4(_) => ip,
    }
}

const fn v4net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNet {
    IpNet {
        addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        prefix,
    }
}

const fn v6net(first: u16, prefix: u8) -> IpNet {
    IpNet {
        addr: IpAddr::V6(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0)),
        prefix,
    }
}

/// What the `public` policy denies.
///
/// IPv4-compatible (`::a.b.c.d`), 6to4 (`2002::/16`) and NAT64 (`64:ff9b::/96`) forms are not
/// special-cased: only IPv4-mapped addresses are, through [`normalise`]. A host with a 6to4
/// or NAT64 gateway could still reach private IPv4 through those.
const PRIVATE: &[IpNet] = &[
    v4net(0, 0, 0, 0, 8),
    v4net(10, 0, 0, 0, 8),
    v4net(100, 64, 0, 0, 10), // CGNAT
    v4net(127, 0, 0, 0, 8),
    v4net(169, 254, 0, 0, 16), // link-local, incl. cloud metadata 169.254.169.254
    v4net(172, 16, 0, 0, 12),
    v4net(192, 0, 0, 0, 24),
    v4net(192, 168, 0, 0, 16),
    v4net(198, 18, 0, 0, 15),
    v4net(224, 0, 0, 0, 4), // multicast
    v4net(240, 0, 0, 0, 4), // reserved, incl. broadcast
    v6net(0, 128),          // unspecified
    IpNet {
        addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
        prefix: 128,
    },
    v6net(0xfc00, 7), // ULA, incl. metadata fd00:ec2::254
    v6net(0xfe80, 10),
    v6net(0xff00, 8), // multicast
];

/// Whether `ip` (after [`normalise`]) is in a range the `public` policy denies:
///
/// - IPv4: 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16,
///   172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/4, 240.0.0.0/4.
/// - IPv6: ::/128, ::1/128, fc00::/7, fe80::/10, ff00::/8.
pub fn is_private(ip: IpAddr) -> bool {
    PRIVATE.iter().any(|net| net.contains(ip))
}

/// Destinations no policy allows (after [`normalise`]): `0.0.0.0/8` (a host socket sent
/// there reaches the host itself), the limited broadcast, and `::`.
pub fn never_reachable(ip: IpAddr) -> bool {
    match normalise(ip) {
        IpAddr::V4(v4) => v4.octets()[0] == 0 || v4 == Ipv4Addr::BROADCAST,
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

fn mask_v4(prefix: u8) -> u32 {
    // A shift by 32 overflows; a /0 mask is all zeros.
    u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

/// `ip` with every bit beyond `prefix` cleared.
fn network_of(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(prefix))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(prefix))),
    }
}

impl IpNet {
    /// The network `addr/prefix`.
    ///
    /// Fails if `prefix` is longer than the address (32 or 128) or if `addr` has bits set
    /// beyond the prefix. An IPv4-mapped IPv6 network with `prefix >= 96` becomes the IPv4
    /// network with `prefix - 96`.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, PolicyError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(PolicyError::PrefixTooLong { addr, prefix, max });
        }
        let network = network_of(addr, prefix);
        if network != addr {
            return Err(PolicyError::HostBits {
                addr,
                prefix,
                network,
            });
        }
        // Below /96 the network also covers non-mapped addresses, so it stays IPv6.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), Some(v4_prefix)) = (v6.to_ipv4_mapped(), prefix.checked_sub(96)) {
                return Ok(IpNet {
                    addr: IpAddr::V4(v4),
                    prefix: v4_prefix,
                });
            }
        }
        Ok(IpNet { addr, prefix })
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (after [`normalise`]) is in this network. IPv4 networks never contain
    /// IPv6 addresses, nor the reverse.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, normalise(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    /// `addr/prefix`, IPv6 without brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = PolicyError;

    /// The CIDR part of a rule (see the [module docs](self)), without a port.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rule: Rule = s.parse()?;
        match rule.port {
            None => Ok(rule.net),
            Some(_) => Err(PolicyError::BadRule {
                rule: s.trim().to_owned(),
                why: "a network cannot have a port",
            }),
        }
    }
}

impl Rule {
    /// Whether a flow to `ip` (after [`normalise`]) and `port` matches this rule.
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.net.contains(ip) && self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for Rule {
    /// `a.b.c.d/len[:port]` or `[ipv6]/len[:port]`: the syntax [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net.addr {
            IpAddr::V4(_) => write!(f, "{}", self.net)?,
            IpAddr::V6(v6) => write!(f, "[{v6}]/{}", self.net.prefix)?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Rule {
    type Err = PolicyError;

    /// One `RULE` (see the [module docs](self)); surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_rule(s.trim())
    }
}

fn bad_rule(rule: &str, why: &'static str) -> PolicyError {
    PolicyError::BadRule {
        rule: rule.to_owned(),
        why,
    }
}

const IPV6_PORT_HINT: &str =
    "not an IPv6 network; an IPv6 address needs brackets when a port is given, \
     e.g. `[2001:db8::]/32:443`";

fn parse_rule(rule: &str) -> Result<Rule, PolicyError> {
    if rule.is_empty() {
        return Err(bad_rule(rule, "empty"));
    }
    let (addr, prefix, port) = if let Some(after) = rule.strip_prefix('[') {
        let (inside, rest) = after
            .split_once(']')
            .ok_or_else(|| bad_rule(rule, "missing `]`"))?;
        let (addr_text, inner_len) = match inside.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (inside, None),
        };
        let addr: Ipv6Addr = addr_text.parse().map_err(|_| PolicyError::BadAddress {
            rule: rule.to_owned(),
            addr: addr_text.to_owned(),
        })?;
        let (len_part, port) = match rest.split_once(':') {
            Some((l, p)) => (l, Some(p)),
            None => (rest, None),
        };
        let outer_len = if len_part.is_empty() {
            None
        } else {
            Some(
                len_part
                    .strip_prefix('/')
                    .ok_or_else(|| bad_rule(rule, "unexpected text after `]`"))?,
            )
        };
        let len = match (inner_len, outer_len) {
            (Some(_), Some(_)) => return Err(bad_rule(rule, "prefix length given twice")),
            (a, b) => a.or(b),
        };
        let prefix = match len {
            Some(l) => parse_prefix(rule, l)?,
            None => 128,
        };
        (IpAddr::V6(addr), prefix, port)
    } else if rule.bytes().filter(|&b| b == b':').count() > 1 {
        // Bare IPv6: every colon belongs to the address, so there is no port.
        let (addr_text, len) = match rule.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (rule, None),
        };
        let addr: Ipv6Addr = addr_text
            .parse()
            .map_err(|_| bad_rule(rule, IPV6_PORT_HINT))?;
        let prefix = match len {
            Some(l) if l.contains(':') => return Err(bad_rule(rule, IPV6_PORT_HINT)),
            Some(l) => parse_prefix(rule, l)?,
            None => 128,
        };
        (IpAddr::V6(addr), prefix, None)
    } else {
        let (cidr, port) = match rule.split_once(':') {
            Some((c, p)) => (c, Some(p)),
            None => (rule, None),
        };
        let (addr_text, len) = match cidr.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (cidr, None),
        };
        let addr: Ipv4Addr = addr_text.parse().map_err(|_| PolicyError::BadAddress {
            rule: rule.to_owned(),
            addr: addr_text.to_owned(),
        })?;
        let prefix = match len {
            Some(l) => parse_prefix(rule, l)?,
            None => 32,
        };
        (IpAddr::V4(addr), prefix, port)
    };
    let net = IpNet::new(addr, prefix)?;
    let port = port.map(|p| parse_port(rule, p)).transpose()?;
    Ok(Rule { net, port })
}

fn all_digits(s: &str) -> bool {
    // `u8::from_str` would also take a leading `+`.
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_prefix(rule: &str, text: &str) -> Result<u8, PolicyError> {
    let bad = || PolicyError::BadPrefix {
        rule: rule.to_owned(),
        prefix: text.to_owned(),
    };
    if !all_digits(text) {
        return Err(bad());
    }
    // Too many digits for a u8 is just as bad as /129.
    text.parse().map_err(|_| bad())
}

fn parse_port(rule: &str, text: &str) -> Result<u16, PolicyError> {
    let bad = || PolicyError::BadPort {
        rule: rule.to_owned(),
        port: text.to_owned(),
    };
    if !all_digits(text) {
        return Err(bad());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

fn parse_list(kind: &'static str, list: &str) -> Result<Vec<Rule>, PolicyError> {
    if list.trim().is_empty() {
        return Err(PolicyError::EmptyList(kind));
    }
    list.split(',')
        .map(|rule| {
            let rule = rule.trim();
            if rule.is_empty() {
                Err(PolicyError::EmptyRule(format!("{kind}:{list}")))
            } else {
                parse_rule(rule)
            }
        })
        .collect()
}

impl FromStr for EgressPolicy {
    type Err = PolicyError;

    /// See the [module docs](self) for the syntax.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "allow-all" => return Ok(EgressPolicy::AllowAll),
            "public" | "deny-private" => return Ok(EgressPolicy::Public),
            "none" => return Ok(EgressPolicy::None),
            _ => {}
        }
        if let Some(list) = s.strip_prefix("allow-host:") {
            parse_ports(list).map(EgressPolicy::PublicAndHost)
        } else if let Some(list) = s.strip_prefix("allow:") {
            parse_list("allow", list).map(EgressPolicy::Allow)
        } else if let Some(list) = s.strip_prefix("deny:") {
            parse_list("deny", list).map(EgressPolicy::Deny)
        } else {
            Err(PolicyError::UnknownPolicy(s.to_owned()))
        }
    }
}

fn parse_ports(list: &str) -> Result<Vec<u16>, PolicyError> {
    if list.trim().is_empty() {
        return Err(PolicyError::EmptyList("allow-host"));
    }
    let whole = format!("allow-host:{list}");
    list.split(',')
        .map(|port| match port.trim() {
            "" => Err(PolicyError::EmptyRule(whole.clone())),
            port => parse_port(&whole, port),
        })
        .collect()
}

fn write_list(f: &mut fmt::Formatter<'_>, kind: &str, rules: &[Rule]) -> fmt::Result {
    write!(f, "{kind}:")?;
    for (i, rule) in rules.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{rule}")?;
    }
    Ok(())
}

impl fmt::Display for EgressPolicy {
    /// The `--egress` syntax; parses back to an equal policy, except that an empty rule list
    /// prints as `allow:`/`deny:`, which [`FromStr`] refuses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressPolicy::AllowAll => f.write_str("allow-all"),
            EgressPolicy::Public => f.write_str("public"),
            EgressPolicy::PublicAndHost(ports) => {
                f.write_str("allow-host:")?;
                for (i, port) in ports.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{port}")?;
                }
                Ok(())
            }
            EgressPolicy::None => f.write_str("none"),
            EgressPolicy::Allow(rules) => write_list(f, "allow", rules),
            EgressPolicy::Deny(rules) => write_list(f, "deny", rules),
        }
    }
}

impl EgressPolicy {
    /// Whether a new TCP or UDP flow to `dst` may be made. `dst` is the host-side
    /// destination: the gateway already turned into the host's loopback.
    pub fn allows(&self, dst: SocketAddr) -> bool {
        let ip = normalise(dst.ip());
        let port = dst.port();
        if never_reachable(ip) {
            return false;
        }
        match self {
            EgressPolicy::AllowAll => true,
            EgressPolicy::Public => !is_private(ip),
            EgressPolicy::PublicAndHost(ports) => {
                !is_private(ip) || (ip.is_loopback() && ports.contains(&port))
            }
            EgressPolicy::Allow(rules) => rules.iter().any(|r| r.matches(ip, port)),
            EgressPolicy::Deny(rules) => !rules.iter().any(|r| r.matches(ip, port)),
            EgressPolicy::None => false,
        }
    }

    /// Whether a flow to some port of `ip` could be allowed: decides if a DNS answer may
    /// carry `ip`. A port-specific `deny:` rule does not hide the address, since other ports
    /// stay reachable.
    pub fn allows_address(&self, ip: IpAddr) -> bool {
        let ip = normalise(ip);
        if never_reachable(ip) {
            return false;
        }
        match self {
            EgressPolicy::AllowAll => true,
            EgressPolicy::Public => !is_private(ip),
            EgressPolicy::PublicAndHost(ports) => {
                !is_private(ip) || (ip.is_loopback() && !ports.is_empty())
            }
            EgressPolicy::Allow(rules) => rules.iter().any(|r| r.net.contains(ip)),
            EgressPolicy::Deny(rules) => {
                !rules.iter().any(|r| r.port.is_none() && r.net.contains(ip))
            }
            EgressPolicy::None => false,
        }
    }

    /// Whether the guest's host lookups are rate-limited: under an `allow:` list DNS is the
    /// one way out to arbitrary hosts (a lookup of `DATA.attacker.example` carries data to the
    /// attacker's name server), so it is capped. Under the other policies the guest can reach
    /// public hosts directly anyway, and a cap would only slow real workloads.
    pub fn limits_lookups(&self) -> bool {
        matches!(self, EgressPolicy::Allow(_))
    }

    /// Whether the guest gets a network device at all: false only for [`EgressPolicy::None`].
    pub fn has_network(&self) -> bool {
        !matches!(self, EgressPolicy::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn net(s: &str, prefix: u8) -> IpNet {
        IpNet::new(ip(s), prefix).unwrap()
    }

    fn err(s: &str) -> String {
        match s.parse::<EgressPolicy>() {
            Ok(p) => panic!("`{s}` parsed as {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_words() {
        assert_eq!("allow-all".parse(), Ok(EgressPolicy::AllowAll));
        assert_eq!("public".parse(), Ok(EgressPolicy::Public));
        assert_eq!("deny-private".parse(), Ok(EgressPolicy::Public));
        assert_eq!(" none ".parse(), Ok(EgressPolicy::None));
        assert_eq!(
            "allow-host: 6379 ,8080".parse(),
            Ok(EgressPolicy::PublicAndHost(vec![6379, 8080]))
        );
        assert!(err("allow-host:").contains("at least one"));
        assert!(err("allow-host:80,").contains("stray comma"));
        assert!(err("allow-host:0").contains("bad port `0`"));
        assert!(err("allow-host:http").contains("bad port `http`"));
    }

    #[test]
    fn the_default_is_the_public_internet_only() {
        let default = EgressPolicy::default();
        assert_eq!(default, EgressPolicy::Public);
        for closed in [
            "127.0.0.1:6379",     // the host's loopback (the gateway)
            "169.254.169.254:80", // cloud metadata
            "10.1.2.3:22",
            "192.168.1.1:80",
            "172.16.0.1:80",
            "100.64.0.1:80", // CGNAT
            "224.0.0.251:5353",
            "255.255.255.255:67",
            "0.0.0.0:80",
            "[::1]:80",
            "[fd00:ec2::254]:80",
        ] {
            assert!(!default.allows(sock(closed)), "{closed}");
            assert!(!default.allows_address(sock(closed).ip()), "{closed}");
        }
        assert!(default.allows(sock("93.184.216.34:443")));
        assert!(default.allows(sock("[2606:4700::1111]:443")));
    }

    #[test]
    fn allow_host_opens_only_the_named_loopback_ports() {
        let p: EgressPolicy = "allow-host:6379".parse().unwrap();
        assert!(p.allows(sock("127.0.0.1:6379")));
        assert!(!p.allows(sock("127.0.0.1:6380")));
        assert!(!p.allows(sock("169.254.169.254:6379")));
        assert!(!p.allows(sock("10.0.0.1:6379")));
        assert!(!p.allows(sock("0.0.0.0:6379")));
        assert!(p.allows(sock("8.8.8.8:53")));
        assert!(p.allows_address(ip("127.0.0.1")));
        assert!(!p.allows_address(ip("10.0.0.1")));
    }

    #[test]
    fn zero_network_and_broadcast_are_refused_under_every_policy() {
        // Linux connects a socket sent to 0.0.0.0 to the host's loopback: a deny of
        // 127.0.0.0/8 must not be walked around that way.
        let policies = [
            "allow-all",
            "deny:127.0.0.0/8",
            "allow:0.0.0.0/0",
            "allow:0.0.0.0/8",
            "public",
            "allow-host:80",
        ];
        for p in policies {
            let p: EgressPolicy = p.parse().unwrap();
            for dst in [
                "0.0.0.0:80",
                "0.1.2.3:80",
                "[::ffff:0.0.0.0]:80",
                "255.255.255.255:67",
                "[::]:80",
            ] {
                assert!(!p.allows(sock(dst)), "{p} allowed {dst}");
                assert!(!p.allows_address(sock(dst).ip()), "{p} answered {dst}");
            }
        }
    }

    #[test]
    fn parses_lists() {
        let p: EgressPolicy = "allow: 10.0.0.0/8 , 1.2.3.4:443,[2001:db8::]/32:80 "
            .parse()
            .unwrap();
        assert_eq!(
            p,
            EgressPolicy::Allow(vec![
                Rule {
                    net: net("10.0.0.0", 8),
                    port: None
                },
                Rule {
                    net: net("1.2.3.4", 32),
                    port: Some(443)
                },
                Rule {
                    net: net("2001:db8::", 32),
                    port: Some(80)
                },
            ])
        );
        let p: EgressPolicy = "deny:127.0.0.1/32:8080".parse().unwrap();
        assert_eq!(
            p,
            EgressPolicy::Deny(vec![Rule {
                net: net("127.0.0.1", 32),
                port: Some(8080)
            }])
        );
    }

    #[test]
    fn parses_ipv6_forms() {
        let want = Rule {
            net: net("2001:db8::", 32),
            port: None,
        };
        for s in [
            "[2001:db8::]/32",
            "[2001:db8::/32]",
            "2001:db8::/32",
            " [2001:db8::]/32 ",
        ] {
            assert_eq!(s.parse::<Rule>(), Ok(want), "{s}");
        }
        let want = Rule {
            net: net("2001:db8::", 32),
            port: Some(443),
        };
        for s in ["[2001:db8::]/32:443", "[2001:db8::/32]:443"] {
            assert_eq!(s.parse::<Rule>(), Ok(want), "{s}");
        }
        let one = Rule {
            net: net("::1", 128),
            port: None,
        };
        assert_eq!("[::1]".parse::<Rule>(), Ok(one));
        assert_eq!("::1".parse::<Rule>(), Ok(one));
        assert_eq!(
            "[::1]:22".parse::<Rule>(),
            Ok(Rule {
                net: net("::1", 128),
                port: Some(22)
            })
        );
        // Without brackets the trailing group is part of the address, never a port.
        assert_eq!(
            "2001:db8::1:443".parse::<Rule>(),
            Ok(Rule {
                net: net("2001:db8::1:443", 128),
                port: None
            })
        );
        assert_eq!("10.1.2.3".parse::<Rule>().unwrap().net.prefix(), 32);
    }

    #[test]
    fn errors_name_the_bad_part() {
        let e = err("allow-some");
        assert!(e.contains("`allow-some`"), "{e}");
        let e = err("allow:");
        assert!(e.contains("`allow:`"), "{e}");
        let e = err("deny:  ");
        assert!(e.contains("`deny:`"), "{e}");
        let e = err("deny:10.0.0.0/8,,1.2.3.4");
        assert!(
            e.contains("empty rule") && e.contains("10.0.0.0/8,,1.2.3.4"),
            "{e}"
        );
        let e = err("deny:10.0.0.0/8,");
        assert!(e.contains("empty rule"), "{e}");
        assert_eq!(
            err("allow:10.0.0.1/8"),
            "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        );
        let e = err("allow:[2001:db8::1]/32");
        assert!(
            e.contains("2001:db8::1/32") && e.contains("2001:db8::/32"),
            "{e}"
        );
        let e = err("allow:10.0.0.0/33");
        assert!(e.contains("/33") && e.contains("/32"), "{e}");
        let e = err("allow:[::]/129");
        assert!(e.contains("/129") && e.contains("/128"), "{e}");
        let e = err("allow:10.0.0.0/300");
        assert!(e.contains("`/300`"), "{e}");
        let e = err("allow:10.0.0.0/+8");
        assert!(e.contains("`/+8`"), "{e}");
        let e = err("allow:10.0.0.0/");
        assert!(e.contains("prefix"), "{e}");
        let e = err("allow:10.0.0/8");
        assert!(e.contains("`10.0.0`"), "{e}");
        let e = err("allow:example.com");
        assert!(e.contains("`example.com`"), "{e}");
        for port in ["0", "65536", "http", "+80", ""] {
            let e = err(&format!("allow:1.2.3.4:{port}"));
            assert!(
                e.contains(&format!("`{port}`")) && e.contains("port"),
                "{e}"
            );
        }
        let e = err("allow:[::1]:0");
        assert!(e.contains("`0`"), "{e}");
        let e = err("allow:2001:db8::/32:443");
        assert!(
            e.contains("2001:db8::/32:443") && e.contains("brackets"),
            "{e}"
        );
        let e = err("allow:2001:db8::1:99999");
        assert!(
            e.contains("2001:db8::1:99999") && e.contains("brackets"),
            "{e}"
        );
        let e = err("allow:[2001:db8::");
        assert!(e.contains("`]`"), "{e}");
        let e = err("allow:[10.0.0.1]");
        assert!(e.contains("`10.0.0.1`"), "{e}");
        let e = err("allow:[::1/128]/128");
        assert!(e.contains("twice"), "{e}");
        let e = err("allow:[::1]x");
        assert!(e.contains("after `]`"), "{e}");
        let e = err("allow:[::1]/64/64");
        assert!(e.contains("`/64/64`"), "{e}");
        assert!("10.0.0.0/8:80".parse::<IpNet>().is_err());
    }

    #[test]
    fn ipnet_new_checks() {
        assert!(matches!(
            IpNet::new(v4(10, 0, 0, 0), 33),
            Err(PolicyError::PrefixTooLong { max: 32, .. })
        ));
        assert!(matches!(
            IpNet::new(ip("::"), 129),
            Err(PolicyError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            IpNet::new(v4(10, 0, 0, 1), 8),
            Err(PolicyError::HostBits { .. })
        ));
        assert_eq!(net("0.0.0.0", 0).to_string(), "0.0.0.0/0");
        assert_eq!(net("2001:db8::", 32).to_string(), "2001:db8::/32");
        assert_eq!("10.0.0.0/8".parse::<IpNet>(), Ok(net("10.0.0.0", 8)));
    }

    #[test]
    fn contains() {
        let all4 = net("0.0.0.0", 0);
        assert!(all4.contains(v4(255, 255, 255, 255)));
        assert!(all4.contains(v4(0, 0, 0, 0)));
        let host = net("192.0.2.1", 32);
        assert!(host.contains(ip("192.0.2.1")));
        assert!(!host.contains(ip("192.0.2.2")));
        let all6 = net("::", 0);
        assert!(all6.contains(ip("ffff::1")));
        let host6 = net("2001:db8::1", 128);
        assert!(host6.contains(ip("2001:db8::1")));
        assert!(!host6.contains(ip("2001:db8::2")));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "allow-all",
            "public",
            "allow-host:6379,8080",
            "none",
            "allow:10.0.0.0/8",
            "allow:10.0.0.0/8,1.2.3.4/32:443,[2001:db8::]/32,[::1]/128:22",
            "deny:0.0.0.0/0:25,[::]/0",
        ] {
            let p: EgressPolicy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(p.to_string().parse::<EgressPolicy>(), Ok(p));
        }
        // Non-canonical input prints canonically and still parses back equal.
        for s in [
            "allow: 1.2.3.4 ,2001:db8::/32, [::ffff:10.0.0.0]/104:80",
            "deny:[2001:db8::/48]:443",
        ] {
            let p: EgressPolicy = s.parse().unwrap();
            assert_eq!(p.to_string().parse::<EgressPolicy>(), Ok(p.clone()), "{p}");
        }
        assert_eq!(
            "allow: 1.2.3.4 ,2001:db8::/32"
                .parse::<EgressPolicy>()
                .unwrap()
                .to_string(),
            "allow:1.2.3.4/32,[2001:db8::]/32"
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        assert_eq!(normalise(ip("::ffff:10.0.0.1")), v4(10, 0, 0, 1));
        assert_eq!(normalise(v4(10, 0, 0, 1)), v4(10, 0, 0, 1));
        assert_eq!(normalise(ip("::1")), ip("::1"));
        // IPv4-compatible is not mapped.
        assert_eq!(normalise(ip("::10.0.0.1")), ip("::10.0.0.1"));

        let p = EgressPolicy::Public;
        for s in [
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
        ] {
            assert!(!p.allows(SocketAddr::new(ip(s), 80)), "{s}");
            assert!(!p.allows_address(ip(s)), "{s}");
        }
        assert!(p.allows(sock("[::ffff:8.8.8.8]:53")));

        // An IPv4 rule matches the mapped form of its addresses.
        let p: EgressPolicy = "allow:10.0.0.0/8".parse().unwrap();
        assert!(p.allows(sock("[::ffff:10.1.2.3]:80")));
        assert!(p.allows_address(ip("::ffff:10.1.2.3")));

        // A mapped rule is an IPv4 rule.
        let mapped: EgressPolicy = "allow:[::ffff:10.0.0.0]/104".parse().unwrap();
        assert_eq!(mapped, p);
        assert!(mapped.allows(sock("10.1.2.3:80")));
        assert_eq!(net("::ffff:0:0", 96), net("0.0.0.0", 0));
        assert_eq!(net("::ffff:1.2.3.4", 128), net("1.2.3.4", 32));
        // Below /96 it stays IPv6 and so never matches an IPv4 (or mapped) address.
        let wide = net("::", 80);
        assert!(wide.addr().is_ipv6());
        assert!(!wide.contains(ip("::ffff:1.2.3.4")));
        assert!(wide.contains(ip("::1")));
    }

    #[test]
    fn ports() {
        let p: EgressPolicy = "allow:127.0.0.1/32:8080".parse().unwrap();
        assert!(p.allows(sock("127.0.0.1:8080")));
        assert!(!p.allows(sock("127.0.0.1:8081")));
        assert!(!p.allows(sock("127.0.0.2:8080")));
        assert!(p.allows_address(ip("127.0.0.1")));
        assert!(!p.allows_address(ip("127.0.0.2")));

        let p: EgressPolicy = "deny:10.0.0.0/8:22,192.168.0.0/16".parse().unwrap();
        assert!(!p.allows(sock("10.0.0.1:22")));
        assert!(p.allows(sock("10.0.0.1:80")));
        assert!(!p.allows(sock("192.168.1.1:80")));
        assert!(p.allows(sock("8.8.8.8:22")));
        // Port-specific denies leave the address resolvable; whole-host denies do not.
        assert!(p.allows_address(ip("10.0.0.1")));
        assert!(!p.allows_address(ip("192.168.1.1")));
        assert!(p.allows_address(ip("8.8.8.8")));
    }

    #[test]
    fn v4_and_v6_never_match_each_other() {
        let p: EgressPolicy = "allow:0.0.0.0/0".parse().unwrap();
        assert!(p.allows(sock("203.0.113.9:1")));
        assert!(!p.allows(sock("[::1]:80")));
        assert!(!p.allows(sock("[2001:db8::1]:80")));
        assert!(!p.allows_address(ip("2001:db8::1")));
        let p: EgressPolicy = "allow:[::]/0".parse().unwrap();
        assert!(p.allows(sock("[2001:db8::1]:80")));
        assert!(!p.allows(sock("1.2.3.4:80")));
        assert!(!p.allows(sock("[::ffff:1.2.3.4]:80")));
        assert!(!p.allows_address(ip("1.2.3.4")));
    }

    #[test]
    fn simple_policies() {
        let anywhere = [sock("8.8.8.8:53"), sock("127.0.0.1:1"), sock("[::1]:1")];
        for dst in anywhere {
            assert!(EgressPolicy::AllowAll.allows(dst));
            assert!(EgressPolicy::AllowAll.allows_address(dst.ip()));
            assert!(!EgressPolicy::None.allows(dst));
            assert!(!EgressPolicy::None.allows_address(dst.ip()));
            assert!(!EgressPolicy::Allow(vec![]).allows(dst));
            assert!(EgressPolicy::Deny(vec![]).allows(dst));
        }
        assert!(!EgressPolicy::Public.allows(sock("127.0.0.1:1")));
        assert!(EgressPolicy::Public.allows(sock("8.8.8.8:53")));
        assert!(!EgressPolicy::None.has_network());
        assert!(EgressPolicy::AllowAll.has_network());
        assert!(EgressPolicy::Allow(vec![]).has_network());
        assert!(EgressPolicy::Public.has_network());
    }

    #[test]
    fn private_table_is_well_formed() {
        for n in PRIVATE {
            assert_eq!(IpNet::new(n.addr(), n.prefix()), Ok(*n), "{n}");
        }
    }

    #[test]
    fn is_private_boundaries() {
        let table: &[(&str, bool)] = &[
            ("0.0.0.0", true),
            ("0.255.255.255", true),
            ("1.0.0.0", false),
            ("9.255.255.255", false),
            ("10.0.0.0", true),
            ("10.255.255.255", true),
            ("11.0.0.0", false),
            ("100.63.255.255", false),
            ("100.64.0.0", true),
            ("100.127.255.255", true),
            ("100.128.0.0", false),
            ("126.255.255.255", false),
            ("127.0.0.0", true),
            ("127.255.255.255", true),
            ("128.0.0.0", false),
            ("169.253.255.255", false),
            ("169.254.0.0", true),
            ("169.254.169.254", true),
            ("169.254.255.255", true),
            ("169.255.0.0", false),
            ("172.15.255.255", false),
            ("172.16.0.0", true),
            ("172.31.255.255", true),
            ("172.32.0.0", false),
            ("191.255.255.255", false),
            ("192.0.0.0", true),
            ("192.0.0.255", true),
            ("192.0.1.0", false),
            ("192.167.255.255", false),
            ("192.168.0.0", true),
            ("192.168.255.255", true),
            ("192.169.0.0", false),
            ("198.17.255.255", false),
            ("198.18.0.0", true),
            ("198.19.255.255", true),
            ("198.20.0.0", false),
            ("223.255.255.255", false),
            ("224.0.0.0", true),
            ("239.255.255.255", true),
            ("240.0.0.0", true),
            ("255.255.255.255", true),
            ("8.8.8.8", false),
            ("1.1.1.1", false),
            ("::", true),
            ("::1", true),
            ("::2", false),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("fc00::", true),
            ("fd00:ec2::254", true),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("fe00::", false),
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("fe80::", true),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("fec0::", false),
            ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("ff00::", true),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("2001:db8::1", false),
            ("2606:4700::1111", false),
            // Mapped addresses are their IPv4 selves.
            ("::ffff:0.0.0.0", true),
            ("::ffff:10.0.0.1", true),
            ("::ffff:8.8.8.8", false),
            // Deliberately not special-cased.
            ("::127.0.0.1", false),
            ("2002:7f00:1::", false),
            ("64:ff9b::7f00:1", false),
        ];
        for &(addr, private) in table {
            assert_eq!(is_private(ip(addr)), private, "{addr}");
        }
    }
}
