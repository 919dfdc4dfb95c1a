//! The NAT end to end: a second smoltcp stack plays the guest on one side of a [`UserNet`],
//! real host sockets on loopback are on the other.
#![cfg(all(target_os = "linux", feature = "nat"))]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use usernet::policy::EgressPolicy;
use usernet::{UserNet, UserNetConfig, GATEWAY, GUEST};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0; len];
        let r = f(&mut v);
        self.0.push_back(v);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let f = self.to_guest.pop_front()?;
        Some((Rx(f), Tx(&mut self.from_guest)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.from_guest))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// The guest's stack wired to a NAT.
struct Guest {
    iface: Interface,
    wire: Wire,
    sockets: SocketSet<'static>,
    nat: UserNet,
    started: Instant,
}

impl Guest {
    fn new(policy: EgressPolicy) -> Guest {
        let nat = UserNet::new(UserNetConfig {
            policy,
            ..Default::default()
        })
        .unwrap();
        let mut wire = Wire::default();
        let mac = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(mac)),
            &mut wire,
            smoltcp::time::Instant::from_millis(0),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(GUEST), 24)).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        Guest {
            iface,
            wire,
            sockets: SocketSet::new(Vec::new()),
            nat,
            started: Instant::now(),
        }
    }

    /// One round: the guest's frames to the NAT, the NAT's host work, its frames back.
    fn step(&mut self) {
        let now = smoltcp::time::Instant::from_micros(self.started.elapsed().as_micros() as i64);
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
        while let Some(f) = self.wire.from_guest.pop_front() {
            self.nat.send(&f);
        }
        self.nat.poll();
        let mut buf = vec![0u8; 65550]; // the largest frame a virtio-net device moves
        while let Some(n) = self.nat.recv(&mut buf) {
            self.wire.to_guest.push_back(buf[..n].to_vec());
        }
        std::thread::sleep(Duration::from_micros(200));
    }

    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Guest) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            self.step();
        }
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    fn connect(&mut self, ip: std::net::Ipv4Addr, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        s.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(ip), port),
            49152 + (self.sockets.iter().count() as u16),
        )
        .unwrap();
        self.sockets.add(s)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn tcp_through_the_gateway_reaches_host_loopback_both_ways_byte_exact() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let down = pattern(1 << 20, 7);
    let up = pattern(700_000, 3);
    let (d, u) = (down.clone(), up.clone());
    let host = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let writer = {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                c.write_all(&d).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert!(
            got == u,
            "the host got {} bytes, not the guest's",
            got.len()
        );
    });
    let mut g = Guest::new(EgressPolicy::AllowAll);
    let h = g.connect(GATEWAY, port);
    g.until("the connection", |g| g.tcp(h).may_send());
    let mut sent = 0;
    let mut received = Vec::new();
    g.until("both transfers", |g| {
        let s = g.tcp(h);
        while sent < up.len() && s.can_send() {
            sent += s.send_slice(&up[sent..]).unwrap();
        }
        if sent == up.len() && s.may_send() {
            s.close();
        }
        while s.can_recv() {
            s.recv(|b| {
                received.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        !s.may_recv() && sent == up.len() && received.len() >= down.len()
    });
    assert!(received == down, "the guest got {} bytes", received.len());
    host.join().unwrap();
    g.until("the NAT to forget the flow", |g| {
        g.nat.stats().tcp_open == 0
    });
    assert_eq!(g.nat.stats().tcp_opened, 1);
}

#[test]
fn denied_and_refused_flows_are_reset_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // The default (public internet only): the host's loopback (the gateway) is out of reach.
    let mut g = Guest::new(UserNetConfig::default().policy);
    let h = g.connect(GATEWAY, port);
    g.until("the reset", |g| g.tcp(h).state() == tcp::State::Closed);
    assert!(listener.accept().is_err(), "the host saw a denied flow");
    assert_eq!(g.nat.stats().denied, 1);
    // allow-host opens the named loopback port, and only that one.
    let mut g = Guest::new(format!("allow-host:{port}").parse().unwrap());
    let h = g.connect(GATEWAY, port.wrapping_add(1).max(1));
    g.until("the reset", |g| g.tcp(h).state() == tcp::State::Closed);
    let h = g.connect(GATEWAY, port);
    g.until("the connection", |g| {
        g.tcp(h).state() == tcp::State::Established
    });
    g.tcp(h).abort();
    listener.set_nonblocking(false).unwrap();
    drop(listener.accept().unwrap());
    listener.set_nonblocking(true).unwrap();
    // An allow-list with another port: denied too; the listed port goes through.
    let mut g = Guest::new(format!("allow:127.0.0.1:{port}").parse().unwrap());
    let h = g.connect(GATEWAY, port.wrapping_add(1).max(1));
    g.until("the reset", |g| g.tcp(h).state() == tcp::State::Closed);
    let h = g.connect(GATEWAY, port);
    g.until("the connection", |g| {
        g.tcp(h).state() == tcp::State::Established
    });
    // A port nobody listens on: the host's refusal becomes a reset.
    drop(listener);
    let mut g = Guest::new(EgressPolicy::AllowAll);
    let h = g.connect(GATEWAY, port);
    g.until("the reset", |g| g.tcp(h).state() == tcp::State::Closed);
}

/// A DNS query for `name` (type A) as bytes.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn udp_socket(g: &mut Guest, port: u16) -> SocketHandle {
    let meta = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]);
    let mut s = udp::Socket::new(meta(), meta());
    s.bind(port).unwrap();
    g.sockets.add(s)
}

fn udp_reply(g: &mut Guest, h: SocketHandle) -> Vec<u8> {
    let mut reply = Vec::new();
    g.until("a UDP reply", |g| {
        let s = g.sockets.get_mut::<udp::Socket>(h);
        if let Ok((data, _)) = s.recv() {
            reply = data.to_vec();
            return true;
        }
        false
    });
    reply
}

/// Sends `n` queries one after another; the rcode of each reply.
fn lookups(g: &mut Guest, n: u16) -> Vec<u8> {
    let h = udp_socket(g, 5353);
    let dns = IpEndpoint::new(IpAddress::Ipv4(usernet::DNS), 53);
    (0..n)
        .map(|id| {
            g.sockets
                .get_mut::<udp::Socket>(h)
                .send_slice(&query(id, "localhost"), dns)
                .unwrap();
            let r = udp_reply(g, h);
            assert_eq!(u16::from_be_bytes([r[0], r[1]]), id);
            r[3] & 0x0f
        })
        .collect()
}

#[test]
fn host_lookups_are_rate_limited_under_an_allow_list() {
    // Under an allow-list DNS is the one way out: lookups of attacker names carry data.
    let mut g = Guest::new("allow:127.0.0.1/32".parse().unwrap());
    let rcodes = lookups(&mut g, 100);
    let refused = rcodes.iter().filter(|&&r| r == 5).count();
    assert!(rcodes[..50].iter().all(|&r| r == 0), "{rcodes:?}");
    assert!(refused > 0, "no lookup was refused: {rcodes:?}");
    assert_eq!(g.nat.stats().dns_limited, refused as u64);
    // Not under the default: the guest reaches public hosts directly anyway.
    let mut g = Guest::new(EgressPolicy::default());
    assert!(lookups(&mut g, 100).iter().all(|&r| r == 0));
}

#[test]
fn dns_answers_from_the_host_resolver_with_loopback_as_the_gateway() {
    let mut g = Guest::new(EgressPolicy::AllowAll);
    let h = udp_socket(&mut g, 5353);
    let dns = IpEndpoint::new(IpAddress::Ipv4(usernet::DNS), 53);
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(&query(0x1234, "localhost"), dns)
        .unwrap();
    let r = udp_reply(&mut g, h);
    assert_eq!(&r[..2], &[0x12, 0x34]);
    assert_eq!(r[3] & 0x0f, 0, "rcode");
    assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer: {r:?}");
    assert_eq!(
        &r[r.len() - 4..],
        &GATEWAY.octets(),
        "localhost is the gateway"
    );
    // deny-private: the loopback answer is withheld.
    let mut g = Guest::new(EgressPolicy::Public);
    let h = udp_socket(&mut g, 5353);
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(&query(7, "localhost"), dns)
        .unwrap();
    let r = udp_reply(&mut g, h);
    assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0, "answers: {r:?}");
    // Garbage gets FORMERR, never silence or a crash.
    let mut g = Guest::new(EgressPolicy::AllowAll);
    let h = udp_socket(&mut g, 5353);
    let mut bad = query(9, "localhost");
    bad.truncate(15);
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(&bad, dns)
        .unwrap();
    let r = udp_reply(&mut g, h);
    assert_eq!(r[3] & 0x0f, 1, "FORMERR");
}

#[test]
fn udp_round_trips_from_any_host_port_and_denied_udp_is_unreachable() {
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    host.set_read_timeout(Some(WAIT)).unwrap();
    // The reply comes from another port, as TFTP's do: the NAT's mapping must let it in.
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (n, peer) = host.recv_from(&mut buf).unwrap();
        other.send_to(&buf[..n], peer).unwrap();
    });
    let mut g = Guest::new(EgressPolicy::AllowAll);
    let h = udp_socket(&mut g, 40000);
    let to = IpEndpoint::new(IpAddress::Ipv4(GATEWAY), port);
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(b"ping over udp", to)
        .unwrap();
    let mut from = None;
    let mut got = Vec::new();
    g.until("the echo", |g| {
        if let Ok((data, meta)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
            got = data.to_vec();
            from = Some(meta.endpoint);
            return true;
        }
        false
    });
    echo.join().unwrap();
    assert_eq!(got, b"ping over udp");
    assert_eq!(
        from,
        Some(IpEndpoint::new(IpAddress::Ipv4(GATEWAY), other_port)),
        "the reply's source, the host's loopback shown as the gateway"
    );
    assert_eq!(g.nat.stats().udp_opened, 1);
    // Denied: an ICMP unreachable comes back (smoltcp drops it, but the frame is there).
    let mut nat = UserNet::new(UserNetConfig {
        policy: EgressPolicy::Public,
        ..Default::default()
    })
    .unwrap();
    let mut g2 = Guest::new(EgressPolicy::AllowAll);
    let h2 = udp_socket(&mut g2, 40001);
    g2.sockets
        .get_mut::<udp::Socket>(h2)
        .send_slice(b"x", to)
        .unwrap();
    let start = Instant::now();
    let mut icmp = None;
    while icmp.is_none() && start.elapsed() < WAIT {
        let now = smoltcp::time::Instant::from_micros(g2.started.elapsed().as_micros() as i64);
        g2.iface.poll(now, &mut g2.wire, &mut g2.sockets);
        while let Some(f) = g2.wire.from_guest.pop_front() {
            nat.send(&f);
        }
        nat.poll();
        let mut buf = vec![0u8; 2048];
        while let Some(n) = nat.recv(&mut buf) {
            // Ethernet (14) + IPv4 protocol byte at 23: 1 is ICMP.
            if n > 34 && buf[12..14] == [8, 0] && buf[23] == 1 {
                icmp = Some((buf[34], buf[35]));
            } else {
                g2.wire.to_guest.push_back(buf[..n].to_vec());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        icmp,
        Some((3, 13)),
        "destination unreachable, administratively prohibited"
    );
    assert_eq!(nat.stats().denied, 1);
}

#[test]
fn flow_limits_refuse_new_flows_and_free_up_as_flows_close() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let nat = UserNet::new(UserNetConfig {
        policy: EgressPolicy::AllowAll,
        max_tcp_flows: 3,
        ..Default::default()
    })
    .unwrap();
    let mut g = Guest::new(EgressPolicy::AllowAll);
    g.nat = nat;
    let hs: Vec<_> = (0..3).map(|_| g.connect(GATEWAY, port)).collect();
    g.until("three connections", |g| {
        hs.iter()
            .all(|&h| g.tcp(h).state() == tcp::State::Established)
    });
    let extra = g.connect(GATEWAY, port);
    g.until("the fourth to be refused", |g| {
        g.tcp(extra).state() == tcp::State::Closed
    });
    assert_eq!(g.nat.stats().limited, 1);
    // One closes (the guest aborts it): room for a new one.
    g.tcp(hs[0]).abort();
    g.until("the NAT to drop it", |g| g.nat.stats().tcp_open == 2);
    let again = g.connect(GATEWAY, port);
    g.until("a new connection", |g| {
        g.tcp(again).state() == tcp::State::Established
    });
    drop(listener);
}

#[test]
fn nats_sharing_a_budget_cannot_take_more_flows_together_than_it_allows() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let budget = usernet::FlowBudget::new(2);
    let guest_with_budget = || {
        let mut g = Guest::new(EgressPolicy::AllowAll);
        g.nat = UserNet::new(UserNetConfig {
            policy: EgressPolicy::AllowAll,
            budget: budget.clone(),
            ..Default::default()
        })
        .unwrap();
        g
    };
    let mut busy = guest_with_budget();
    let mut other = guest_with_budget();
    let hs: Vec<_> = (0..2).map(|_| busy.connect(GATEWAY, port)).collect();
    busy.until("two connections", |g| {
        hs.iter()
            .all(|&h| g.tcp(h).state() == tcp::State::Established)
    });
    // The other VM's NAT is far below its own limit, but the shared budget is spent.
    let refused = other.connect(GATEWAY, port);
    other.until("its connection to be refused", |g| {
        g.tcp(refused).state() == tcp::State::Closed
    });
    assert_eq!(other.nat.stats().limited, 1);
    busy.tcp(hs[0]).abort();
    busy.until("the NAT to drop it", |g| g.nat.stats().tcp_open == 1);
    assert_eq!(budget.used(), 1);
    let again = other.connect(GATEWAY, port);
    other.until("a connection once a flow closed", |g| {
        g.tcp(again).state() == tcp::State::Established
    });
    drop(listener);
}

/// An ARP request from the guest's MAC and address for `target`.
fn arp_request(target: std::net::Ipv4Addr) -> Vec<u8> {
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GUEST.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

#[test]
fn arp_is_answered_for_the_gateway_and_never_for_the_guests_own_address() {
    let mut nat = UserNet::new(UserNetConfig::default()).unwrap();
    let mut buf = vec![0u8; 2048];
    nat.send(&arp_request(GUEST));
    nat.poll();
    assert_eq!(
        nat.recv(&mut buf),
        None,
        "an answer for the guest's own address"
    );
    nat.send(&arp_request(GATEWAY));
    nat.poll();
    let n = nat.recv(&mut buf).expect("no ARP reply for the gateway");
    assert_eq!(&buf[12..14], &[0x08, 0x06]);
    assert_eq!(&buf[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&buf[22..28], &usernet::GATEWAY_MAC);
    assert_eq!(&buf[28..32], &GATEWAY.octets());
    assert!(n >= 42);
}
