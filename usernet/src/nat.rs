//! The NAT: Ethernet frames from the guest in, host sockets out.
//!
//! The guest's link has a gateway ([`GATEWAY`], which also stands for the host's loopback) and a
//! DNS server ([`DNS`]). A TCP flow starts when the guest's SYN arrives: the policy is checked,
//! a non-blocking host connect starts, and the SYN is held until it completes; then a smoltcp
//! socket listening on the flow's destination takes the SYN, and bytes are pumped between that
//! socket and the host stream. A refused or denied SYN goes to smoltcp with no socket there,
//! which answers with a reset. UDP never enters smoltcp: each (guest port, destination) gets a
//! connected host UDP socket, and replies are framed here. DNS queries to [`DNS`] are answered
//! from the host's resolver (so `/etc/hosts` counts), with the policy applied to the answers.
//! IPv6 and ICMP beyond the gateway's own echo are not forwarded.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress,
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpListenEndpoint,
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::budget::{FlowBudget, FlowPermit};
use crate::dns;
use crate::policy::EgressPolicy;

use crate::{DNS, GATEWAY, GATEWAY_MAC, GUEST, MTU, PREFIX_LEN};

/// Frames waiting for the guest before the NAT stops producing more.
const MAX_OUTBOUND: usize = 1024;
/// Per-flow socket buffers (each direction).
/// Allocated untouched: memory is only used as data waits in them.
const TCP_BUFFER: usize = 128 * 1024;
/// A UDP flow idle this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// A host connect that has not completed by then is given up (the guest sees a reset).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Host lookups running at once; more queries get SERVFAIL.
const MAX_LOOKUPS: usize = 16;
/// Host lookups under a policy that limits them (see [`EgressPolicy::limits_lookups`]): this
/// many at once, then this many per second; more queries are refused.
const LOOKUP_BURST: u32 = 50;
const LOOKUPS_PER_SECOND: u32 = 10;
/// TTL of DNS answers, in seconds.
const DNS_TTL: u32 = 10;
/// A finished flow's socket is dropped after this even if it has not closed.
const LINGER_MAX: Duration = Duration::from_secs(120);
/// An open flow whose sent data goes unacknowledged this long is aborted.
const TCP_TIMEOUT: Duration = Duration::from_secs(120);
/// Flow-limit log lines are repeated at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Limits and policy of one guest's network.
#[derive(Debug, Clone)]
pub struct UserNetConfig {
    /// Where the guest may connect.
    pub policy: EgressPolicy,
    /// TCP flows (connecting or open) at once; more are refused with a reset.
    pub max_tcp_flows: usize,
    /// UDP flows at once; more are refused with ICMP unreachable.
    pub max_udp_flows: usize,
    /// Flows all NATs sharing it may hold together (default: the process's, see
    /// [`FlowBudget::process`]); a flow over it is refused as over `max_*_flows`.
    pub budget: FlowBudget,
}

impl Default for UserNetConfig {
    fn default() -> Self {
        UserNetConfig {
            policy: EgressPolicy::default(),
            // Each flow is a host descriptor: both together stay under the usual soft limit
            // of 1024 descriptors.
            max_tcp_flows: 512,
            max_udp_flows: 128,
            budget: FlowBudget::process(),
        }
    }
}

/// Errors creating the NAT.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    /// Its epoll, timer or eventfd could not be created.
    #[error("cannot create the user-mode network's event sources: {0}")]
    EventSource(#[source] io::Error),
}

/// Counters, for tests and `--debug`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserNetStats {
    /// TCP flows opened to the host.
    pub tcp_opened: u64,
    /// UDP flows opened to the host.
    pub udp_opened: u64,
    /// Flows the policy refused.
    pub denied: u64,
    /// Flows refused because a limit was reached.
    pub limited: u64,
    /// DNS queries answered.
    pub dns_answered: u64,
    /// DNS queries refused because the policy's lookup rate was exceeded.
    pub dns_limited: u64,
    /// TCP flows open now.
    pub tcp_open: usize,
    /// UDP flows open now.
    pub udp_open: usize,
}

/// A guest flow: its source port and its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    guest: SocketAddrV4,
    dst: SocketAddrV4,
}

struct Connecting {
    key: FlowKey,
    socket: socket2::Socket,
    /// The guest's SYN, held until the connect completes.
    syn: Vec<u8>,
    started: Instant,
    permit: FlowPermit,
}

struct TcpFlow {
    handle: SocketHandle,
    _permit: FlowPermit,
    stream: TcpStream,
    /// What the epoll watches on the stream (`None`: not registered any more).
    interest: Option<EventSet>,
    /// The host sent its FIN (or hung up).
    host_eof: bool,
    /// We shut down the host stream's write side after the guest's FIN.
    host_write_shut: bool,
    /// Guest data the host could not take yet: wait for OUT.
    host_write_blocked: bool,
}

/// One guest UDP port's host socket. Mapping and filtering are endpoint-independent (RFC
/// 4787): every destination the guest sends to from that port shares the socket, and replies
/// from any source the policy allows come back (TFTP, STUN and friends need that).
struct UdpFlow {
    guest: SocketAddrV4,
    socket: UdpSocket,
    last_used: Instant,
    _permit: FlowPermit,
}

enum Token {
    Timer,
    Lookups,
    Connecting(FlowKey),
    Tcp(FlowKey),
    Udp(SocketAddrV4),
}

/// The frames between smoltcp and the guest.
struct Frames {
    inbound: VecDeque<Vec<u8>>,
    outbound: VecDeque<Vec<u8>>,
}

struct FrameRx(Vec<u8>);
struct FrameTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for FrameRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for FrameTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for Frames {
    type RxToken<'a> = FrameRx;
    type TxToken<'a> = FrameTx<'a>;

    fn receive(
        &mut self,
        _now: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.inbound.pop_front()?;
        Some((FrameRx(frame), FrameTx(&mut self.outbound)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (self.outbound.len() < MAX_OUTBOUND).then_some(FrameTx(&mut self.outbound))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(MTU) + EthernetFrame::<&[u8]>::header_len();
        caps
    }
}

type LookupResult = (SocketAddrV4, dns::Query, io::Result<Vec<IpAddr>>);

/// A user-mode network for one guest (see the [crate docs](crate)).
pub struct UserNet {
    config: UserNetConfig,
    epoll: Epoll,
    timer: TimerFd,
    started: Instant,
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    guest_mac: Option<EthernetAddress>,
    connecting: HashMap<FlowKey, Connecting>,
    tcp: HashMap<FlowKey, TcpFlow>,
    udp: HashMap<SocketAddrV4, UdpFlow>,
    tokens: HashMap<RawFd, Token>,
    lookups_done: EventFd,
    lookup_tx: mpsc::Sender<LookupResult>,
    lookup_rx: mpsc::Receiver<LookupResult>,
    lookups_running: usize,
    /// The host lookups the policy still allows, if it limits them.
    lookup_budget: Option<crate::rate::TokenBucket>,
    stats: UserNetStats,
    last_limit_log: Option<Instant>,
    next_housekeeping: Instant,
    /// Sockets of finished flows that still owe the guest a reset or a last ACK, and when
    /// they were left.
    lingering: Vec<(SocketHandle, Instant)>,
}

fn to_micros(started: Instant, now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.duration_since(started).as_micros() as i64)
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Where a guest destination really is: the gateway stands for the host's loopback.
fn host_destination(dst: SocketAddrV4) -> SocketAddrV4 {
    if *dst.ip() == GATEWAY {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port())
    } else {
        dst
    }
}

impl UserNet {
    /// A network with `config`'s policy and limits.
    pub fn new(config: UserNetConfig) -> Result<Self, UserNetError> {
        let lookup_budget = config.policy.limits_lookups().then(|| {
            crate::rate::TokenBucket::new(LOOKUP_BURST, LOOKUPS_PER_SECOND, Instant::now())
        });
        let epoll = Epoll::new().map_err(UserNetError::EventSource)?;
        let timer = TimerFd::new().map_err(|e| UserNetError::EventSource(e.into()))?;
        let lookups_done =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(UserNetError::EventSource)?;
        let mut frames = Frames {
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
        };
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        iface_config.random_seed = seed();
        let started = Instant::now();
        let mut iface = Interface::new(iface_config, &mut frames, to_micros(started, started));
        iface.update_ip_addrs(|addrs| {
            for a in [GATEWAY, DNS] {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a), PREFIX_LEN));
            }
        });
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        // Every destination is "ours": the NAT answers for the whole Internet.
        iface.set_any_ip(true);
        let (lookup_tx, lookup_rx) = mpsc::channel();
        let mut net = UserNet {
            config,
            epoll,
            timer,
            started,
            iface,
            sockets: SocketSet::new(Vec::new()),
            frames,
            guest_mac: None,
            connecting: HashMap::new(),
            tcp: HashMap::new(),
            udp: HashMap::new(),
            tokens: HashMap::new(),
            lookups_done,
            lookup_tx,
            lookup_rx,
            lookups_running: 0,
            lookup_budget,
            stats: UserNetStats::default(),
            last_limit_log: None,
            next_housekeeping: started + Duration::from_secs(1),
            lingering: Vec::new(),
        };
        net.watch(net.timer.as_raw_fd(), EventSet::IN, Token::Timer)
            .map_err(UserNetError::EventSource)?;
        net.watch(net.lookups_done.as_raw_fd(), EventSet::IN, Token::Lookups)
            .map_err(UserNetError::EventSource)?;
        Ok(net)
    }

    /// The counters so far.
    pub fn stats(&self) -> UserNetStats {
        UserNetStats {
            tcp_open: self.tcp.len() + self.connecting.len(),
            udp_open: self.udp.len(),
            ..self.stats
        }
    }

    fn watch(&mut self, fd: RawFd, set: EventSet, token: Token) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))?;
        self.tokens.insert(fd, token);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.tokens.remove(&fd);
    }

    fn limit_log(&mut self, what: &str) {
        self.stats.limited += 1;
        let now = Instant::now();
        if self
            .last_limit_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            self.last_limit_log = Some(now);
            tracing::warn!("guest network: {what}; new flows are refused until some close");
        }
    }

    // ---- Frames from the guest -----------------------------------------------------------

    fn take_frame(&mut self, frame: &[u8]) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        self.guest_mac = Some(eth.src_addr());
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                // smoltcp answers ARP for every address (any-IP): not for the guest's own,
                // which would look like an address conflict to it.
                let own = smoltcp::wire::ArpPacket::new_checked(eth.payload()).is_ok_and(|arp| {
                    arp.target_protocol_addr() == arp.source_protocol_addr()
                        || arp.target_protocol_addr() == GUEST.octets()
                });
                if !own {
                    self.frames.inbound.push_back(frame.to_vec());
                }
            }
            EthernetProtocol::Ipv4 => self.take_ipv4(frame, eth.payload()),
            // IPv6 is not forwarded: the guest has no IPv6 address from us.
            _ => {}
        }
    }

    fn take_ipv4(&mut self, frame: &[u8], packet: &[u8]) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        // Fragments are not reassembled (the guest's MTU matches ours, so it has no reason).
        if ip.more_frags() || ip.frag_offset() != 0 {
            return;
        }
        let src = ip.src_addr();
        let dst = ip.dst_addr();
        match ip.next_header() {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    return;
                };
                let key = FlowKey {
                    guest: SocketAddrV4::new(src, tcp.src_port()),
                    dst: SocketAddrV4::new(dst, tcp.dst_port()),
                };
                if tcp.syn() && !tcp.ack() && !self.tcp.contains_key(&key) {
                    // A retransmitted SYN of a connect in progress: it is already held.
                    if !self.connecting.contains_key(&key) {
                        self.open_tcp(key, frame);
                    }
                    return;
                }
                self.frames.inbound.push_back(frame.to_vec());
            }
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                    return;
                };
                let key = FlowKey {
                    guest: SocketAddrV4::new(src, udp.src_port()),
                    dst: SocketAddrV4::new(dst, udp.dst_port()),
                };
                let payload = udp.payload().to_vec();
                if dst == DNS && udp.dst_port() == 53 {
                    self.dns_query(key, &payload);
                } else {
                    self.send_udp(key, &payload, ip.payload(), &ip);
                }
            }
            // Echo to the gateway and the DNS server is smoltcp's to answer; other ICMP
            // would need privileged or ping-group sockets on the host.
            IpProtocol::Icmp if dst == GATEWAY || dst == DNS => {
                self.frames.inbound.push_back(frame.to_vec())
            }
            _ => {}
        }
    }

    fn open_tcp(&mut self, key: FlowKey, syn: &[u8]) {
        let host = host_destination(key.dst);
        let refuse = |net: &mut Self| net.frames.inbound.push_back(syn.to_vec());
        if *key.dst.ip() == DNS || !self.config.policy.allows(SocketAddr::V4(host)) {
            self.stats.denied += 1;
            tracing::debug!(
                "guest network: TCP to {} denied by the egress policy",
                key.dst
            );
            return refuse(self);
        }
        if self.tcp.len() + self.connecting.len() >= self.config.max_tcp_flows {
            let max = self.config.max_tcp_flows;
            self.limit_log(&format!("{max} TCP flows open, the limit"));
            return refuse(self);
        }
        let Some(permit) = self.config.budget.try_acquire() else {
            self.limit_log("the process's descriptor budget for guest flows is spent");
            return refuse(self);
        };
        let socket = match socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM.nonblocking().cloexec(),
            None,
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("guest network: cannot open a host socket: {e}");
                return refuse(self);
            }
        };
        match socket.connect(&SocketAddr::V4(host).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                tracing::debug!("guest network: connect to {host}: {e}");
                return refuse(self);
            }
        }
        let fd = socket.as_raw_fd();
        if self
            .watch(fd, EventSet::OUT, Token::Connecting(key))
            .is_err()
        {
            return refuse(self);
        }
        self.connecting.insert(
            key,
            Connecting {
                key,
                socket,
                syn: syn.to_vec(),
                started: Instant::now(),
                permit,
            },
        );
    }

    fn connect_done(&mut self, key: FlowKey) {
        let Some(c) = self.connecting.remove(&key) else {
            return;
        };
        self.unwatch(c.socket.as_raw_fd());
        match c.socket.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                tracing::debug!("guest network: connect to {}: {e}", key.dst);
                self.frames.inbound.push_front(c.syn);
                return;
            }
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*key.dst.ip())),
            port: key.dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            self.frames.inbound.push_front(c.syn);
            return;
        }
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
            TCP_TIMEOUT.as_secs(),
        )));
        let handle = self.sockets.add(socket);
        // The held SYN goes first, so this socket (the only one listening there) takes it.
        self.frames.inbound.push_front(c.syn);
        let stream: TcpStream = c.socket.into();
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let interest = EventSet::IN;
        if self.watch(fd, interest, Token::Tcp(key)).is_err() {
            self.sockets.remove(handle);
            return;
        }
        self.stats.tcp_opened += 1;
        self.tcp.insert(
            key,
            TcpFlow {
                handle,
                _permit: c.permit,
                stream,
                interest: Some(interest),
                host_eof: false,
                host_write_shut: false,
                host_write_blocked: false,
            },
        );
    }

    fn send_udp(
        &mut self,
        key: FlowKey,
        payload: &[u8],
        ip_payload: &[u8],
        ip: &Ipv4Packet<&[u8]>,
    ) {
        let host = host_destination(key.dst);
        if *key.dst.ip() == DNS || !self.config.policy.allows(SocketAddr::V4(host)) {
            self.stats.denied += 1;
            tracing::debug!(
                "guest network: UDP to {} denied by the egress policy",
                key.dst
            );
            self.unreachable(ip, ip_payload, Icmpv4DstUnreachable::CommProhibited);
            return;
        }
        if !self.udp.contains_key(&key.guest) {
            if self.udp.len() >= self.config.max_udp_flows {
                let max = self.config.max_udp_flows;
                self.limit_log(&format!("{max} UDP flows open, the limit"));
                self.unreachable(ip, ip_payload, Icmpv4DstUnreachable::CommProhibited);
                return;
            }
            let Some(permit) = self.config.budget.try_acquire() else {
                self.limit_log("the process's descriptor budget for guest flows is spent");
                self.unreachable(ip, ip_payload, Icmpv4DstUnreachable::CommProhibited);
                return;
            };
            let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("guest network: UDP to {host}: {e}");
                    self.unreachable(ip, ip_payload, Icmpv4DstUnreachable::HostUnreachable);
                    return;
                }
            };
            if self
                .watch(socket.as_raw_fd(), EventSet::IN, Token::Udp(key.guest))
                .is_err()
            {
                return;
            }
            self.stats.udp_opened += 1;
            self.udp.insert(
                key.guest,
                UdpFlow {
                    guest: key.guest,
                    socket,
                    last_used: Instant::now(),
                    _permit: permit,
                },
            );
        }
        if let Some(flow) = self.udp.get_mut(&key.guest) {
            flow.last_used = Instant::now();
            // A full socket buffer drops the datagram, as a wire would.
            let _ = flow.socket.send_to(payload, host);
        }
    }

    // ---- Frames to the guest -------------------------------------------------------------

    /// Frames an IPv4 packet for the guest; `emit` fills the IP payload.
    fn emit_ipv4(&mut self, repr: Ipv4Repr, emit: impl FnOnce(&mut [u8])) {
        let Some(guest_mac) = self.guest_mac else {
            return;
        };
        if self.frames.outbound.len() >= MAX_OUTBOUND {
            return;
        }
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GATEWAY_MAC),
            dst_addr: guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut frame = vec![0u8; eth.buffer_len() + repr.buffer_len() + repr.payload_len];
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        let mut packet = Ipv4Packet::new_unchecked(f.payload_mut());
        repr.emit(&mut packet, &ChecksumCapabilities::default());
        emit(packet.payload_mut());
        self.frames.outbound.push_back(frame);
    }

    fn emit_udp(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        let max = usize::from(MTU) - 20 - 8;
        if payload.len() > max {
            return;
        }
        let udp = UdpRepr {
            src_port: from.port(),
            dst_port: to.port(),
        };
        let repr = Ipv4Repr {
            src_addr: *from.ip(),
            dst_addr: *to.ip(),
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        self.emit_ipv4(repr, |buf| {
            udp.emit(
                &mut UdpPacket::new_unchecked(buf),
                &IpAddress::Ipv4(*from.ip()),
                &IpAddress::Ipv4(*to.ip()),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        });
    }

    fn unreachable(
        &mut self,
        ip: &Ipv4Packet<&[u8]>,
        ip_payload: &[u8],
        reason: Icmpv4DstUnreachable,
    ) {
        let Ok(header) = Ipv4Repr::parse(ip, &ChecksumCapabilities::ignored()) else {
            return;
        };
        let data = &ip_payload[..ip_payload.len().min(8)];
        let icmp = Icmpv4Repr::DstUnreachable {
            reason,
            header,
            data,
        };
        let repr = Ipv4Repr {
            src_addr: header.dst_addr,
            dst_addr: header.src_addr,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        self.emit_ipv4(repr, |buf| {
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(buf),
                &ChecksumCapabilities::default(),
            )
        });
    }

    // ---- DNS -----------------------------------------------------------------------------

    fn dns_query(&mut self, key: FlowKey, payload: &[u8]) {
        let reply_to = key.guest;
        let from = key.dst;
        let q = match dns::parse_query(payload) {
            Ok(q) => q,
            Err(dns::DnsError::Opcode(_)) => {
                if let Some(r) = dns::error_for_packet(payload, dns::Rcode::NotImp) {
                    self.emit_udp(from, reply_to, &r);
                }
                return;
            }
            Err(_) => {
                if let Some(r) = dns::format_error(payload) {
                    self.emit_udp(from, reply_to, &r);
                }
                return;
            }
        };
        // The guest only has IPv4 from us: "no AAAA" makes resolvers settle for A.
        if q.qtype != dns::TYPE_A || q.qclass != dns::CLASS_IN {
            let r = dns::answer(&q, &[], DNS_TTL);
            self.stats.dns_answered += 1;
            self.emit_udp(from, reply_to, &r);
            return;
        }
        if self.lookups_running >= MAX_LOOKUPS {
            let r = dns::error_response(&q, dns::Rcode::ServFail);
            self.emit_udp(from, reply_to, &r);
            return;
        }
        if let Some(budget) = &mut self.lookup_budget {
            if !budget.take(Instant::now()) {
                self.stats.dns_limited += 1;
                let r = dns::error_response(&q, dns::Rcode::Refused);
                self.emit_udp(from, reply_to, &r);
                return;
            }
        }
        self.lookups_running += 1;
        let tx = self.lookup_tx.clone();
        let done = self.lookups_done.try_clone();
        let spawned = std::thread::Builder::new()
            .name("dns-lookup".into())
            .spawn(move || {
                use std::net::ToSocketAddrs;
                let result = (q.name.as_str(), 0)
                    .to_socket_addrs()
                    .map(|addrs| addrs.map(|a| a.ip()).collect());
                let _ = tx.send((reply_to, q, result));
                if let Ok(done) = done {
                    let _ = done.write(1);
                }
            });
        if spawned.is_err() {
            self.lookups_running -= 1;
        }
    }

    fn lookups_finished(&mut self) {
        let _ = self.lookups_done.read();
        while let Ok((reply_to, q, result)) = self.lookup_rx.try_recv() {
            self.lookups_running = self.lookups_running.saturating_sub(1);
            let response = match result {
                Ok(addrs) => {
                    let mut answer = Vec::new();
                    for ip in addrs {
                        let ip = crate::policy::normalise(ip);
                        if !ip.is_ipv4() || !self.config.policy.allows_address(ip) {
                            continue;
                        }
                        // The host's loopback is the gateway, seen from the guest.
                        let ip = if ip.is_loopback() {
                            IpAddr::V4(GATEWAY)
                        } else {
                            ip
                        };
                        if !answer.contains(&ip) {
                            answer.push(ip);
                        }
                    }
                    dns::answer(&q, &answer, DNS_TTL)
                }
                Err(_) => dns::error_response(&q, dns::Rcode::NxDomain),
            };
            self.stats.dns_answered += 1;
            self.emit_udp(SocketAddrV4::new(DNS, 53), reply_to, &response);
        }
    }

    // ---- Host sockets --------------------------------------------------------------------

    fn udp_readable(&mut self, guest: SocketAddrV4) {
        let mut buf = [0u8; 2048];
        for _ in 0..64 {
            let Some(flow) = self.udp.get_mut(&guest) else {
                return;
            };
            match flow.socket.recv_from(&mut buf) {
                Ok((n, SocketAddr::V4(from))) => {
                    // What the policy would not let the guest reach may not reach it either.
                    if !self.config.policy.allows(SocketAddr::V4(from)) {
                        continue;
                    }
                    flow.last_used = Instant::now();
                    // The host's loopback is the gateway, seen from the guest.
                    let from = if from.ip().is_loopback() {
                        SocketAddrV4::new(GATEWAY, from.port())
                    } else {
                        from
                    };
                    self.emit_udp(from, guest, &buf[..n]);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // An ICMP error for an earlier datagram: the next recv goes on.
                Err(_) => {}
            }
        }
    }

    /// Moves bytes both ways for one flow; whether anything moved. Removes a finished flow.
    fn pump(&mut self, key: FlowKey) -> bool {
        let Some(flow) = self.tcp.get_mut(&key) else {
            return false;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(flow.handle);
        let mut moved = false;
        let mut failed = false;
        // Guest to host.
        flow.host_write_blocked = false;
        while socket.can_recv() && !failed {
            let r = socket.recv(|data| match flow.stream.write(data) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    flow.host_write_blocked = true;
                    break;
                }
                Ok(Err(_)) | Err(_) => failed = true,
            }
        }
        if !failed
            && !flow.host_write_shut
            && !socket.may_recv()
            && socket.recv_queue() == 0
            && socket.state() != tcp::State::SynReceived
            && socket.state() != tcp::State::Listen
        {
            let _ = flow.stream.shutdown(Shutdown::Write);
            flow.host_write_shut = true;
            moved = true;
        }
        // Host to guest.
        while !flow.host_eof && !failed && socket.can_send() {
            let r = socket.send(|buf| match flow.stream.read(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => {
                    flow.host_eof = true;
                    socket.close();
                    moved = true;
                }
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Ok(Err(_)) | Err(_) => failed = true,
            }
        }
        if failed {
            socket.abort();
        }
        let finished = failed
            || matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait)
            || (flow.host_eof && flow.host_write_shut && !socket.is_open());
        let want = {
            let mut s = EventSet::empty();
            if !flow.host_eof && socket.can_send() {
                s |= EventSet::IN;
            }
            if flow.host_write_blocked {
                s |= EventSet::OUT;
            }
            s
        };
        if finished {
            let (handle, fd) = (flow.handle, flow.stream.as_raw_fd());
            // smoltcp still sends an aborted socket's reset, or a closing one's last segments,
            // at later polls: the socket lingers, the host side goes now.
            self.unwatch(fd);
            self.tcp.remove(&key);
            self.lingering.push((handle, Instant::now()));
            return true;
        }
        if flow.interest != Some(want) && flow.interest.is_some() {
            let fd = flow.stream.as_raw_fd();
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, fd as u64),
            );
            flow.interest = Some(want);
        }
        moved
    }

    fn tcp_event(&mut self, key: FlowKey, set: EventSet) {
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Reported whatever the interest: stop watching, or it would be reported forever.
            // Reads then see EOF and writes an error, which the pump handles.
            if let Some(flow) = self.tcp.get_mut(&key) {
                if flow.interest.take().is_some() {
                    let fd = flow.stream.as_raw_fd();
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.tokens.remove(&fd);
                }
            }
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        if now < self.next_housekeeping {
            return;
        }
        self.next_housekeeping = now + Duration::from_secs(1);
        let idle: Vec<SocketAddrV4> = self
            .udp
            .values()
            .filter(|f| now.duration_since(f.last_used) >= UDP_IDLE)
            .map(|f| f.guest)
            .collect();
        for key in idle {
            if let Some(flow) = self.udp.remove(&key) {
                self.unwatch(flow.socket.as_raw_fd());
            }
        }
        let stale: Vec<FlowKey> = self
            .connecting
            .values()
            .filter(|c| now.duration_since(c.started) >= CONNECT_TIMEOUT)
            .map(|c| c.key)
            .collect();
        for key in stale {
            if let Some(c) = self.connecting.remove(&key) {
                self.unwatch(c.socket.as_raw_fd());
                self.frames.inbound.push_back(c.syn);
            }
        }
        let lingering = std::mem::take(&mut self.lingering);
        for (handle, since) in lingering {
            let age = now.duration_since(since);
            let closed = self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Closed;
            if (closed && age >= Duration::from_secs(1)) || age >= LINGER_MAX {
                self.sockets.remove(handle);
            } else {
                self.lingering.push((handle, since));
            }
        }
    }

    fn service(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(_) => return,
            };
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                let set = ev.event_set();
                match self.tokens.get(&fd) {
                    Some(Token::Timer) => {
                        let _ = self.timer.wait();
                    }
                    Some(Token::Lookups) => self.lookups_finished(),
                    Some(&Token::Connecting(key)) => self.connect_done(key),
                    Some(&Token::Tcp(key)) => self.tcp_event(key, set),
                    Some(&Token::Udp(key)) => self.udp_readable(key),
                    None => {}
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn run(&mut self) {
        self.service();
        let now = Instant::now();
        self.housekeeping(now);
        for _ in 0..8 {
            let now = to_micros(self.started, Instant::now());
            self.iface.poll(now, &mut self.frames, &mut self.sockets);
            let keys: Vec<FlowKey> = self.tcp.keys().copied().collect();
            let mut moved = false;
            for key in keys {
                moved |= self.pump(key);
            }
            if !moved {
                break;
            }
        }
        let now = Instant::now();
        let delay = self
            .iface
            .poll_delay(to_micros(self.started, now), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1))
            .min(self.next_housekeeping.saturating_duration_since(now))
            .max(Duration::from_micros(100));
        let _ = self.timer.reset(delay, None);
    }
}

/// The frame interface a virtio-net device drives (the facade adapts it to `devices`'
/// `NetBackend`; this crate does not depend on any device model).
impl UserNet {
    /// Takes one Ethernet frame from the guest (no virtio header). Frames the NAT cannot use
    /// are dropped, as a wire would.
    pub fn send(&mut self, frame: &[u8]) {
        self.take_frame(frame);
    }

    /// Copies the next frame for the guest into `buf` and returns its length; `None` when
    /// nothing waits. A frame longer than `buf` is dropped.
    pub fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let frame = self.frames.outbound.pop_front()?;
            if frame.len() <= buf.len() {
                buf[..frame.len()].copy_from_slice(&frame);
                return Some(frame.len());
            }
        }
    }

    /// Services host sockets, timers and the frames taken with [`send`](Self::send);
    /// afterwards [`recv`](Self::recv) may have frames.
    pub fn poll(&mut self) {
        self.run();
    }

    /// A descriptor that is readable (level-triggered) when [`poll`](Self::poll) has work.
    pub fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
