//! Published ports (`-p`, `-P`): a host TCP listener per mapping; each accepted connection
//! becomes a guest agent `Connect` to `127.0.0.1:GUEST_PORT` inside the VM, spliced both ways
//! with half-close passed through.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::str::FromStr;
use std::time::Duration;

use crate::agent::Agent;

/// `[HOST_IP:][HOST_PORT:]GUEST_PORT[/tcp|/tls]`, as Docker's `-p`; `/tls` marks a port whose
/// TLS the host terminates (see [`crate::tls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// The host address to listen on (default 0.0.0.0).
    pub host_ip: IpAddr,
    /// The host port; 0 picks a free one.
    pub host_port: u16,
    /// The port inside the guest.
    pub guest_port: u16,
    /// Marked `/tls`: the host terminates TLS on it.
    pub tls: bool,
}

/// Why a `-p` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid port mapping {spec:?}: {why} (expected [HOST_IP:][HOST_PORT:]GUEST_PORT[/tcp|/tls])"
)]
pub struct PortMappingError {
    spec: String,
    why: String,
}

fn port(s: &str, what: &str, spec: &str, allow_zero: bool) -> Result<u16, PortMappingError> {
    match s.parse::<u16>() {
        Ok(0) if !allow_zero => Err(PortMappingError {
            spec: spec.into(),
            why: format!("{what} port 0"),
        }),
        Ok(p) => Ok(p),
        Err(_) => Err(PortMappingError {
            spec: spec.into(),
            why: format!("{what} port {s:?} is not a number from 1 to 65535"),
        }),
    }
}

impl FromStr for PortMapping {
    type Err = PortMappingError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| PortMappingError {
            spec: spec.into(),
            why: why.into(),
        };
        let (body, tls) = match spec.rsplit_once('/') {
            Some((b, "tcp")) => (b, false),
            Some((b, "tls")) => (b, true),
            Some((_, proto)) => return Err(bad(&format!("protocol {proto:?} (only tcp, or tls)"))),
            None => (spec, false),
        };
        // An IPv6 host address comes in brackets: [::1]:8080:80.
        let (ip, rest) = if let Some(v6) = body.strip_prefix('[') {
            let (addr, rest) = v6.split_once("]:").ok_or_else(|| bad("unclosed ["))?;
            (Some(addr), rest)
        } else {
            match body.matches(':').count() {
                2 => {
                    let (ip, rest) = body.split_once(':').unwrap_or_default();
                    (Some(ip), rest)
                }
                0 | 1 => (None, body),
                _ => return Err(bad("too many ':'")),
            }
        };
        let host_ip = match ip {
            Some(ip) => ip
                .parse()
                .map_err(|_| bad(&format!("{ip:?} is not an IP address")))?,
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let (host_port, guest_port) = match rest.split_once(':') {
            Some(("", g)) => (0, port(g, "guest", spec, false)?),
            Some((h, g)) => (
                port(h, "host", spec, false)?,
                port(g, "guest", spec, false)?,
            ),
            None => (0, port(rest, "guest", spec, false)?),
        };
        Ok(PortMapping {
            host_ip,
            host_port,
            guest_port,
            tls,
        })
    }
}

impl PortMapping {
    /// Every port the image declares (`80/tcp`), each on a free host port of all addresses.
    /// UDP ports are skipped: only TCP is forwarded.
    pub fn for_exposed(exposed: &[String]) -> Vec<PortMapping> {
        exposed
            .iter()
            .filter_map(|p| {
                let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                (proto == "tcp").then(|| num.parse().ok()).flatten()
            })
            .filter(|p| *p != 0)
            .map(|guest_port| PortMapping {
                host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                host_port: 0,
                guest_port,
                tls: false,
            })
            .collect()
    }
}

/// A bound host listener, not yet forwarding.
pub struct PublishedPort {
    listener: TcpListener,
    /// What was asked for.
    pub mapping: PortMapping,
    /// Where it listens (the real port when 0 was asked).
    pub local: SocketAddr,
}

/// Binds the host side now, so a port in use fails the run before the VM boots.
pub fn bind(mapping: PortMapping) -> std::io::Result<PublishedPort> {
    let listener = TcpListener::bind((mapping.host_ip, mapping.host_port)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot publish {}:{}: {e}",
                mapping.host_ip, mapping.host_port
            ),
        )
    })?;
    let local = listener.local_addr()?;
    Ok(PublishedPort {
        listener,
        mapping,
        local,
    })
}

/// A burst of connections can overflow the agent's accept backlog in the guest, and vsock
/// then refuses instead of queueing: retry briefly, as TCP retries a dropped SYN.
fn connect_patiently(
    agent: &Agent,
    guest_port: u16,
) -> Result<std::os::unix::net::UnixStream, crate::agent::AgentClientError> {
    let mut delay = Duration::from_millis(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match agent.connect(guest_port) {
            Err(crate::agent::AgentClientError::Refused(_))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Connections forwarded into the guest at once, per published port; more wait on the host.
const MAX_IN_FLIGHT: usize = 32;

/// A counting semaphore over [`MAX_IN_FLIGHT`].
#[derive(Default)]
struct InFlight {
    count: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// One connection's place among [`MAX_IN_FLIGHT`], given back on drop.
struct Permit(std::sync::Arc<InFlight>);

/// At the limit, connections idle this long are closed to make room: clients holding idle
/// connections cannot keep new ones out, and below the limit nothing idle is ever cut.
const IDLE_WHEN_FULL: Duration = Duration::from_secs(60);
/// How often a connection waiting for a place asks for idle ones to go.
const FULL_RETRY: Duration = Duration::from_secs(1);

impl InFlight {
    /// Takes a place, waiting while all are taken; every [`FULL_RETRY`] of waiting calls
    /// `when_full` (which evicts idle connections).
    fn acquire(self: &std::sync::Arc<Self>, when_full: &dyn Fn()) -> Permit {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_IN_FLIGHT {
            let (guard, waited) = self
                .freed
                .wait_timeout(n, FULL_RETRY)
                .unwrap_or_else(|e| e.into_inner());
            n = guard;
            if waited.timed_out() && *n >= MAX_IN_FLIGHT {
                drop(n);
                when_full();
                n = self.count.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
        *n += 1;
        Permit(self.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        self.0.freed.notify_one();
    }
}

/// How long a connection waits for the guest agent while the VM boots.
const AGENT_WAIT: Duration = Duration::from_secs(120);

/// Opens once the guest's agent takes connections (init is up after a boot; the clone caught
/// up after a restore). Forwarded connections wait on it instead of pinging the agent, which
/// saves a vsock round trip before the first request.
#[derive(Clone, Default)]
pub struct AgentGate(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl AgentGate {
    /// Lets every waiting and later connection through.
    pub fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits until open or `limit` passes; true if open.
    pub fn wait(&self, limit: Duration) -> bool {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (open, _) = cv
            .wait_timeout_while(guard, limit, |open| !*open)
            .unwrap_or_else(|e| e.into_inner());
        *open
    }
}

/// A port being forwarded: dropping it closes the listener (connections already made go on
/// until either side ends them).
pub struct Forwarding {
    listener: Option<TcpListener>,
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(l) = &self.listener {
            // SAFETY: shutdown on a listening socket we hold a descriptor of; on Linux it wakes
            // the thread blocked in accept() with an error, which then sees `closed`.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

impl PublishedPort {
    /// Forwards every connection to the guest port through `agent` until the returned
    /// [`Forwarding`] is dropped; connections wait for `gate` first. Each connection is set up
    /// on its own thread, then its bytes move on one relay thread per port (see
    /// `stream_relay`). With `tls`, the host terminates TLS and forwards the plaintext.
    pub fn forward(
        self,
        agent: Agent,
        gate: AgentGate,
        tls: Option<crate::tls::TlsTermination>,
    ) -> Forwarding {
        let guest_port = self.mapping.guest_port;
        let in_flight = std::sync::Arc::new(InFlight::default());
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Without a relay (no epoll) connections are spliced by two threads each.
        let relay = stream_relay::Relay::new(&format!("relay-{}", self.local.port()))
            .ok()
            .map(std::sync::Arc::new);
        let forwarding = Forwarding {
            listener: self.listener.try_clone().ok(),
            closed: closed.clone(),
        };
        let _ = std::thread::Builder::new()
            .name(format!("publish-{}", self.local.port()))
            .spawn(move || {
                loop {
                    let conn = self.listener.accept();
                    if closed.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let Ok((tcp, _)) = conn else {
                        // Out of descriptors and the like: let them free up.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    // At most MAX_IN_FLIGHT connections are set up or open at once: the next
                    // ones wait in the listener's backlog, so clients holding connections
                    // cannot make this process start threads without bound; while full,
                    // relayed connections idle for IDLE_WHEN_FULL make room.
                    let permit = in_flight.acquire(&|| {
                        if let Some(relay) = &relay {
                            relay.evict_idle(IDLE_WHEN_FULL);
                        }
                    });
                    let (agent, gate) = (agent.clone(), gate.clone());
                    let relay = relay.clone();
                    let tls = tls.clone();
                    let setup =
                        std::thread::Builder::new().name(format!("conn-{}", self.local.port()));
                    // A failed spawn (out of threads or memory) drops this connection only.
                    let _ = setup.spawn(move || {
                        crate::timings::mark("connection_accepted");
                        let _ = tcp.set_nodelay(true);
                        let guest = || {
                            // Early clients wait for the agent instead of being refused.
                            if !gate.wait(AGENT_WAIT) {
                                return Err(format!(
                                    "the guest agent was not up within {AGENT_WAIT:?}"
                                ));
                            }
                            let guest =
                                connect_patiently(&agent, guest_port).map_err(|e| e.to_string())?;
                            crate::timings::mark("guest_port_connected");
                            Ok(guest)
                        };
                        match tls {
                            // The handshake runs before the guest is dialled (and while a
                            // restored guest catches up).
                            Some(config) => {
                                if let Err(crate::tls::TlsSessionError::Guest(e)) =
                                    config.serve(tcp, guest)
                                {
                                    eprintln!("supermachine: guest port {guest_port}: {e}");
                                }
                                drop(permit);
                            }
                            None => match (guest(), relay) {
                                (Ok(guest), Some(relay)) => {
                                    // The permit goes with the pair: freed when it ends.
                                    if let Err(e) =
                                        relay.add_guarded(guest.into(), tcp.into(), permit)
                                    {
                                        eprintln!("supermachine: guest port {guest_port}: {e}");
                                    }
                                }
                                (Ok(guest), None) => {
                                    crate::agent::splice(guest, tcp);
                                    drop(permit);
                                }
                                (Err(e), _) => {
                                    eprintln!("supermachine: guest port {guest_port}: {e}")
                                }
                            },
                        }
                    });
                }
            });
        forwarding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ip: &str, h: u16, g: u16) -> PortMapping {
        PortMapping {
            host_ip: ip.parse().unwrap(),
            host_port: h,
            guest_port: g,
            tls: false,
        }
    }

    #[test]
    fn docker_port_forms_parse() {
        for (spec, want) in [
            ("80", m("0.0.0.0", 0, 80)),
            ("8080:80", m("0.0.0.0", 8080, 80)),
            ("8080:80/tcp", m("0.0.0.0", 8080, 80)),
            ("127.0.0.1:18080:80", m("127.0.0.1", 18080, 80)),
            ("127.0.0.1::80", m("127.0.0.1", 0, 80)),
            ("[::1]:8080:80", m("::1", 8080, 80)),
            (
                "8443:80/tls",
                PortMapping {
                    tls: true,
                    ..m("0.0.0.0", 8443, 80)
                },
            ),
        ] {
            assert_eq!(spec.parse::<PortMapping>(), Ok(want), "{spec}");
        }
    }

    #[test]
    fn bad_port_forms_are_refused_with_the_reason() {
        for (spec, why) in [
            ("", "not a number"),
            ("x:80", "host port"),
            ("8080:0", "guest port 0"),
            ("8080:70000", "not a number"),
            ("53:53/udp", "only tcp"),
            ("1.2.3:80:80", "not an IP"),
            ("a:b:c:d", "too many"),
            ("[::1:80:80", "unclosed"),
        ] {
            let e = spec.parse::<PortMapping>().unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn exposed_ports_become_free_host_ports_tcp_only() {
        let got = PortMapping::for_exposed(&["80/tcp".into(), "53/udp".into(), "8443".into()]);
        assert_eq!(got, vec![m("0.0.0.0", 0, 80), m("0.0.0.0", 0, 8443)]);
    }

    #[test]
    fn dropping_the_forwarding_closes_the_port_and_its_descriptors() {
        use std::os::fd::AsRawFd;
        let published = bind(m("127.0.0.1", 0, 80)).unwrap();
        let addr = published.local;
        // The accepting thread's descriptor, as /proc names it (other tests open and close
        // descriptors meanwhile: follow this one, not the count).
        let fd = format!("/proc/self/fd/{}", published.listener.as_raw_fd());
        let socket = std::fs::read_link(&fd).unwrap();
        let forwarding =
            published.forward(Agent::new("/nonexistent/vsock"), AgentGate::default(), None);
        drop(forwarding);
        assert!(std::net::TcpStream::connect(addr).is_err());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&fd).ok().as_ref() == Some(&socket) {
            assert!(
                std::time::Instant::now() < deadline,
                "the accepting thread kept the listener open"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Threads of this process whose name is `name`.
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .count()
    }

    #[test]
    fn clients_holding_connections_cannot_make_threads_without_bound() {
        let published = bind(m("127.0.0.1", 0, 80)).unwrap();
        let addr = published.local;
        // The guest never comes up: every connection waits for it.
        let _forwarding =
            published.forward(Agent::new("/nonexistent/vsock"), AgentGate::default(), None);
        let held: Vec<_> = (0..MAX_IN_FLIGHT * 3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let name = format!("conn-{}", addr.port());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while threads_named(&name) < MAX_IN_FLIGHT && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            threads_named(&name),
            MAX_IN_FLIGHT,
            "{} clients",
            held.len()
        );
    }

    #[test]
    fn a_full_port_asks_for_idle_connections_to_go_and_takes_the_freed_place() {
        let in_flight = std::sync::Arc::new(InFlight::default());
        let held = std::sync::Arc::new(std::sync::Mutex::new(
            (0..MAX_IN_FLIGHT)
                .map(|_| in_flight.acquire(&|| panic!("not full yet")))
                .collect::<Vec<_>>(),
        ));
        let asked = std::sync::atomic::AtomicUsize::new(0);
        // Standing in for the relay: an eviction closes one idle connection.
        let evict = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.lock().unwrap().pop();
        };
        let _permit = in_flight.acquire(&evict);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(*in_flight.count.lock().unwrap(), MAX_IN_FLIGHT);
    }

    #[test]
    fn binding_a_port_in_use_is_a_clear_error() {
        let first = bind(m("127.0.0.1", 0, 80)).unwrap();
        let taken = m("127.0.0.1", first.local.port(), 80);
        let e = bind(taken).err().unwrap().to_string();
        assert!(e.contains("cannot publish 127.0.0.1:"), "{e}");
    }
}
