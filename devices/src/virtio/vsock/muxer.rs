//! The host side: the Unix listener, the connection table, and everything the device owes the
//! guest's rx queue. One inner epoll holds the listener, a timer and every connection's stream;
//! the event loop only ever sees that epoll's fd.
//!
//! What waits for rx buffers is bounded: each connection flags at most one of each control packet
//! (REQUEST, RESPONSE, CREDIT_UPDATE) plus "data to read" (at most [`MAX_CONNECTIONS`]
//! connections), and RSTs for connections that are gone sit in a queue of at most
//! [`MAX_PENDING_CONTROL`] entries, past which they are dropped. Host data is read from the
//! stream only when there is an rx buffer to put it in, so nothing host→guest is buffered here.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vmm_core::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection, State};
use super::device::VsockError;
use super::packet::{op, shutdown, write_packet, PacketHeader, HEADER_LEN, TYPE_STREAM};
use super::{
    unix, BUF_ALLOC, CONNECT_TIMEOUT, FIRST_LOCAL_PORT, HOST_CID, MAX_CONNECTIONS,
    MAX_CONNECT_LINE, MAX_HANDSHAKES, MAX_PAYLOAD, MAX_PENDING_CONTROL,
};

/// How long the listener rests after an accept error other than "nothing to accept" (e.g. out
/// of file descriptors), so a level-triggered listener cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Events taken per `epoll_wait`; the event loop calls again while more are ready.
const EVENTS_PER_PASS: usize = 32;

/// A host connection that has not sent its `CONNECT <port>` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What one connection put in an rx buffer.
enum ConnRx {
    Sent(u32),
    Nothing,
    Reset,
}

pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    /// The deadline the timer is armed for.
    timer_at: Option<Instant>,
    /// A wake-up the device asked for (its epoll turns readable then).
    wake_at: Option<Instant>,
    listener_paused_until: Option<Instant>,
    /// Whether the listener is in the epoll's interest set.
    listener_on: bool,
    /// The only user whose processes may connect (the VMM's own).
    owner_uid: u32,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections the guest reset after closing its side while the host had not yet taken
    /// all it sent: their streams get the rest, then EOF (the guest knows nothing of them).
    draining: HashMap<RawFd, Connection>,
    /// Connections with something for the guest, in turn.
    rx_ready: VecDeque<ConnKey>,
    /// RSTs not tied to a live connection.
    control: VecDeque<PacketHeader>,
    next_port: u32,
    /// [`CONNECT_TIMEOUT`]; tests shorten it.
    pub(super) timeout: Duration,
    read_buf: Box<[u8]>,
}

fn ctl(epoll: &Epoll, op: ControlOperation, fd: RawFd, set: EventSet) -> io::Result<()> {
    epoll.ctl(op, fd, EpollEvent::new(set, fd as u64))
}

/// `CONNECT <port>` (an optional trailing `\r` tolerated) → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An RST answering `h` (from the guest).
fn rst_for(guest_cid: u64, h: &PacketHeader) -> PacketHeader {
    PacketHeader {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: h.dst_port,
        dst_port: h.src_port,
        type_: TYPE_STREAM,
        op: op::RST,
        buf_alloc: BUF_ALLOC,
        ..Default::default()
    }
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let bind_err = |source: io::Error| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        };
        // A socket file left by an earlier run; anything else at the path is not ours to remove.
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(uds_path).map_err(bind_err)?;
            }
        }
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        crate::unix_peer::make_private(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::EventSource)?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventSource(e.into()))?;
        ctl(
            &epoll,
            ControlOperation::Add,
            listener.as_raw_fd(),
            EventSet::IN,
        )
        .map_err(VsockError::EventSource)?;
        ctl(
            &epoll,
            ControlOperation::Add,
            timer.as_raw_fd(),
            EventSet::IN,
        )
        .map_err(VsockError::EventSource)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            epoll,
            listener,
            timer,
            timer_at: None,
            wake_at: None,
            listener_paused_until: None,
            listener_on: true,
            owner_uid: crate::unix_peer::own_uid(),
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            draining: HashMap::new(),
            rx_ready: VecDeque::new(),
            control: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            timeout: CONNECT_TIMEOUT,
            read_buf: vec![0u8; MAX_PAYLOAD].into_boxed_slice(),
        })
    }

    /// The inner epoll: readable when a host-side source needs service.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Services what is ready on the host side (without blocking).
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_PASS];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept();
            } else if fd == self.timer.as_raw_fd() {
                self.on_timer();
            } else if self.handshakes.contains_key(&fd) {
                self.on_handshake(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                self.on_stream(key, set);
            } else if self.draining.contains_key(&fd) {
                self.on_draining(fd, set);
            }
        }
        self.refresh_listener();
    }

    /// Drops every connection (the host side sees EOF) and everything queued for the guest.
    /// Host connections still sending their `CONNECT` line are kept: the guest never saw them.
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            if conn.registered.is_some() {
                let _ = ctl(
                    &self.epoll,
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EventSet::empty(),
                );
            }
        }
        self.by_fd.clear();
        for (fd, _) in self.draining.drain() {
            let _ = ctl(&self.epoll, ControlOperation::Delete, fd, EventSet::empty());
        }
        self.rx_ready.clear();
        self.control.clear();
    }

    /// Number of open connections.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes buffered for the host, over all connections.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.conns.values().map(Connection::buffered).sum()
    }

    /// Number of RSTs waiting for rx buffers.
    #[cfg(test)]
    pub fn pending_control(&self) -> usize {
        self.control.len()
    }

    // ---- Guest → device -------------------------------------------------------------------

    /// A packet from the guest that could not be used: answer RST (unless it is one).
    pub fn reject(&mut self, h: &PacketHeader) {
        if h.op == op::RST {
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if self.conns.contains_key(&key) {
            // The guest's side of that connection is reset by our RST: so is ours.
            self.kill(key, true);
        } else {
            self.push_control(rst_for(self.guest_cid, h));
        }
    }

    /// A well-formed packet from the guest (`payload` is the data of an RW packet).
    pub fn handle_tx(&mut self, h: &PacketHeader, payload: &[u8]) {
        let known_op = (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op);
        if h.src_cid != self.guest_cid
            || h.dst_cid != HOST_CID
            || h.type_ != TYPE_STREAM
            || !known_op
        {
            self.reject(h);
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.op == op::REQUEST {
            if self.conns.contains_key(&key) {
                // A second REQUEST for a live connection: the guest lost track; reset both.
                self.kill(key, true);
            } else {
                self.connect_to_host(key, h);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reject(h);
            return;
        };
        if h.op == op::RST {
            self.on_guest_reset(key);
            return;
        }
        conn.update_peer_credit(h);
        let ok = match (conn.state, h.op) {
            (State::LocalInit { request_sent: true }, op::RESPONSE) => {
                conn.state = State::Established;
                conn.deadline = None;
                let line = format!("OK {}\n", key.local_port);
                // A fresh socket's buffer always takes these few bytes whole.
                matches!(unix::send(&conn.stream, line.as_bytes()), Ok(n) if n == line.len())
            }
            (State::LocalInit { .. }, _) => false,
            (State::Established, op::RW) => conn.recv(payload).is_ok(),
            (State::Established, op::CREDIT_UPDATE) => true,
            (State::Established, op::CREDIT_REQUEST) => {
                conn.pending.credit_update = true;
                true
            }
            (State::Established, op::SHUTDOWN) => {
                conn.peer_shutdown(h.flags);
                true
            }
            // RESPONSE on an established connection.
            (State::Established, _) => false,
        };
        if ok {
            self.update(key);
        } else {
            self.kill(key, true);
        }
    }

    /// The guest connects to host port `key.local_port`: connect to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, req: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS || self.control.len() >= MAX_PENDING_CONTROL {
            // Refused; with the control queue full, the RST would be dropped anyway.
            self.push_control(rst_for(self.guest_cid, req));
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = match unix::connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                self.push_control(rst_for(self.guest_cid, req));
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if ctl(&self.epoll, ControlOperation::Add, fd, EventSet::empty()).is_err() {
            self.push_control(rst_for(self.guest_cid, req));
            return;
        }
        let mut conn = Connection::peer(stream, key, req);
        conn.registered = Some(EventSet::empty());
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.update(key);
    }

    // ---- Host side ------------------------------------------------------------------------

    /// Serves only connections from `uid`'s processes (tests stand in another user so).
    #[cfg(test)]
    pub fn serve_only(&mut self, uid: u32) {
        self.owner_uid = uid;
    }

    /// Room for another host connection: beyond it, connections wait in the listener's
    /// backlog (the host's connect blocks) instead of being refused.
    fn can_accept(&self) -> bool {
        self.handshakes.len() < MAX_HANDSHAKES
            && self.conns.len() + self.handshakes.len() < MAX_CONNECTIONS
    }

    /// Puts the listener in or out of the epoll's interest set as room and backoff say.
    pub fn refresh_listener(&mut self) {
        let want = self.listener_paused_until.is_none() && self.can_accept();
        if want != self.listener_on {
            let set = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            if ctl(
                &self.epoll,
                ControlOperation::Modify,
                self.listener.as_raw_fd(),
                set,
            )
            .is_ok()
            {
                self.listener_on = want;
            }
        }
    }

    fn accept(&mut self) {
        while self.can_accept() {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Another user's process (the socket file leaked out of its private
                    // directory): closed before it can reach the guest.
                    if !crate::unix_peer::peer_is(&stream, self.owner_uid)
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: the host sees the connection closed
                    }
                    let fd = stream.as_raw_fd();
                    if ctl(&self.epoll, ControlOperation::Add, fd, EventSet::IN).is_err() {
                        continue;
                    }
                    let deadline = Instant::now() + self.timeout;
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::with_capacity(MAX_CONNECT_LINE),
                            deadline,
                        },
                    );
                    self.schedule(deadline);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(_) => {
                    // Out of descriptors or memory: rest, or the level-triggered listener spins.
                    let until = Instant::now() + ACCEPT_BACKOFF;
                    self.listener_paused_until = Some(until);
                    self.schedule(until);
                    break;
                }
            }
        }
    }

    fn close_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = ctl(&self.epoll, ControlOperation::Delete, fd, EventSet::empty());
        }
    }

    fn on_handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // Byte by byte: what follows the line is the connection's data, not ours to take.
        let port = loop {
            let mut b = [0u8];
            match (&h.stream).read(&mut b) {
                Ok(0) => break None,
                Ok(_) if b[0] == b'\n' => break parse_connect(&h.line),
                Ok(_) if h.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => h.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(port) = port else {
            self.close_handshake(fd);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.close_handshake(fd);
            return;
        }
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let key = ConnKey {
            local_port: self.alloc_port(),
            peer_port: port,
        };
        let deadline = Instant::now() + self.timeout;
        let mut conn = Connection::local(h.stream, key, deadline);
        conn.registered = Some(EventSet::IN);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(deadline);
        self.update(key);
    }

    /// The local port the next host connection will try first.
    pub fn next_local_port(&self) -> u32 {
        self.next_port
    }

    /// Continues numbering host connections where a snapshot's device stopped. The restored
    /// guest can still hold sockets of the snapshot's connections (reset, but open until their
    /// owner closes them, and a closing one resets its port when its close timer fires): a
    /// reused port would have a new connection reset by an old socket.
    pub fn continue_local_ports_from(&mut self, port: u32) {
        self.next_port = port.max(FIRST_LOCAL_PORT);
    }

    /// A local port no connection uses, from [`FIRST_LOCAL_PORT`] up, wrapping.
    fn alloc_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            // Terminates: there are far fewer connections than ports in the range.
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    fn on_stream(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            self.kill(key, true);
            return;
        }
        if set.contains(EventSet::HANG_UP) && !conn.hup {
            // The host closed both directions. What it wrote before is still readable, but what
            // we hold for it can no longer be delivered.
            if conn.state != State::Established || conn.buffered() > 0 {
                self.kill(key, true);
                return;
            }
            // Level-triggered and impossible to mask: off the epoll, or it would spin.
            let _ = ctl(
                &self.epoll,
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EventSet::empty(),
            );
            conn.registered = None;
            conn.hup = true;
            if !conn.host_eof && !conn.peer_shut_recv {
                conn.pending.rw = true;
            }
        }
        if set.contains(EventSet::IN)
            && conn.state == State::Established
            && !conn.host_eof
            && !conn.peer_shut_recv
        {
            conn.pending.rw = true;
        }
        if set.contains(EventSet::OUT) && conn.flush().is_err() {
            self.kill(key, true);
            return;
        }
        self.update(key);
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        self.timer_at = None;
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            self.close_handshake(fd);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| c.key)
            .collect();
        for key in expired {
            self.kill(key, true);
        }
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
        }
        if self.wake_at.is_some_and(|t| t <= now) {
            self.wake_at = None;
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain(self.listener_paused_until)
            .chain(self.wake_at)
            .min();
        // Re-arming or disarming also clears the expiration, so the timer stops being readable.
        match next {
            Some(at) => self.arm(at),
            None => {
                let _ = self.timer.clear();
            }
        }
    }

    /// Makes the epoll readable at `at` (or earlier), so the device gets a `process_event` then.
    pub fn wake_at(&mut self, at: Instant) {
        if self.wake_at.is_none_or(|t| at < t) {
            self.wake_at = Some(at);
        }
        self.schedule(at);
    }

    fn schedule(&mut self, at: Instant) {
        if self.timer_at.is_none_or(|t| at < t) {
            self.arm(at);
        }
    }

    fn arm(&mut self, at: Instant) {
        // A zero duration would disarm the timer.
        let wait = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if self.timer.reset(wait, None).is_ok() {
            self.timer_at = Some(at);
        }
    }

    // ---- Bookkeeping ----------------------------------------------------------------------

    fn push_control(&mut self, h: PacketHeader) {
        if self.control.len() < MAX_PENDING_CONTROL {
            self.control.push_back(h);
        }
    }

    /// Takes a connection out of the tables and the epoll.
    fn detach(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream.as_raw_fd();
        if conn.registered.is_some() {
            let _ = ctl(&self.epoll, ControlOperation::Delete, fd, EventSet::empty());
        }
        self.by_fd.remove(&fd);
        if conn.queued {
            self.rx_ready.retain(|k| *k != key);
        }
        Some(conn)
    }

    /// The guest reset a connection. After its own clean close (everything sent, SHUTDOWN
    /// SEND first) Linux resets when we do not answer in time, e.g. while a slow host reader
    /// still has guest bytes to take: those bytes are the guest's last words, so the host
    /// stream still gets them before EOF. Any other reset ends the connection at once.
    fn on_guest_reset(&mut self, key: ConnKey) {
        let Some(mut conn) = self.detach(key) else {
            return;
        };
        if !conn.peer_shut_send || conn.buffered() == 0 || self.draining.len() >= MAX_CONNECTIONS {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        if ctl(&self.epoll, ControlOperation::Add, fd, EventSet::OUT).is_ok() {
            conn.registered = Some(EventSet::OUT);
            self.draining.insert(fd, conn);
        }
    }

    /// A draining connection's stream is writable (or failed): give it more; close it once
    /// all is out.
    fn on_draining(&mut self, fd: RawFd, set: EventSet) {
        let Some(conn) = self.draining.get_mut(&fd) else {
            return;
        };
        let failed = set.intersects(EventSet::ERROR | EventSet::HANG_UP) || conn.flush().is_err();
        if failed || conn.buffered() == 0 {
            let _ = ctl(&self.epoll, ControlOperation::Delete, fd, EventSet::empty());
            self.draining.remove(&fd);
        }
    }

    /// Host streams still taking a reset connection's last bytes.
    #[cfg(test)]
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Closes a connection (the host side sees EOF, or a reset if it had unread data) and, if
    /// `rst` and the guest knows of it, tells the guest with RST.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.detach(key) else {
            return;
        };
        if rst && conn.guest_knows() {
            self.push_control(PacketHeader {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                type_: TYPE_STREAM,
                op: op::RST,
                buf_alloc: BUF_ALLOC,
                ..Default::default()
            });
        }
    }

    /// After any change to a connection: finish it when both directions are over, fix its
    /// epoll interest, queue it for the guest when it has something to send.
    fn update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.maintain();
        if conn.is_done() {
            // Clean end (virtio 1.2, 5.10.6.6): the last SHUTDOWN is followed by an RST.
            self.kill(key, true);
            return;
        }
        if let Some(registered) = conn.registered {
            let want = conn.interest();
            if want != registered
                && ctl(
                    &self.epoll,
                    ControlOperation::Modify,
                    conn.stream.as_raw_fd(),
                    want,
                )
                .is_ok()
            {
                conn.registered = Some(want);
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
    }

    // ---- Device → guest -------------------------------------------------------------------

    /// Whether anything waits for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// Puts the next packet for the guest into `bufs` (an rx chain's writable buffers, at least
    /// a header long, all in guest memory); returns its length, or `None` if nothing was ready
    /// after all (the caller returns the chain to the queue).
    pub fn fill_rx(&mut self, mem: &GuestMemory, bufs: &[(GuestAddress, u32)]) -> Option<u32> {
        let capacity = usize::try_from(super::packet::total_len(bufs)).unwrap_or(usize::MAX);
        // Each connection gets at most one turn per call.
        let mut turns = self.rx_ready.len();
        loop {
            if let Some(h) = self.control.pop_front() {
                return write_packet(mem, bufs, &h, &[]).ok();
            }
            if turns == 0 {
                return None;
            }
            turns -= 1;
            let key = self.rx_ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match self.conn_rx(key, mem, bufs, capacity) {
                ConnRx::Sent(len) => {
                    self.update(key);
                    return Some(len);
                }
                ConnRx::Nothing => self.update(key),
                ConnRx::Reset => self.kill(key, true),
            }
        }
    }

    fn conn_rx(
        &mut self,
        key: ConnKey,
        mem: &GuestMemory,
        bufs: &[(GuestAddress, u32)],
        capacity: usize,
    ) -> ConnRx {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return ConnRx::Nothing;
        };
        let control = |conn: &mut Connection, op: u16, flags: u32| {
            let h = conn.header(guest_cid, op, flags, 0);
            match write_packet(mem, bufs, &h, &[]) {
                Ok(len) => ConnRx::Sent(len),
                Err(_) => ConnRx::Reset,
            }
        };
        if conn.pending.request {
            conn.pending.request = false;
            conn.state = State::LocalInit { request_sent: true };
            return control(conn, op::REQUEST, 0);
        }
        if conn.pending.response {
            conn.pending.response = false;
            return control(conn, op::RESPONSE, 0);
        }
        if conn.pending.credit_update {
            return control(conn, op::CREDIT_UPDATE, 0);
        }
        if !conn.pending.rw {
            return ConnRx::Nothing;
        }
        let credit = conn.peer_credit() as usize;
        if credit == 0 {
            // Resumes when the guest's next packet brings credit.
            conn.pending.rw = false;
            return ConnRx::Nothing;
        }
        let max = capacity
            .saturating_sub(HEADER_LEN)
            .min(credit)
            .min(MAX_PAYLOAD);
        if max == 0 {
            // A buffer with no room for data: stay pending until the next one.
            return ConnRx::Nothing;
        }
        let buf = &mut self.read_buf[..max];
        loop {
            match (&conn.stream).read(buf) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.pending.rw = false;
                    // After a hang-up the host will not read either.
                    let flags = if conn.hup {
                        shutdown::SEND | shutdown::RCV
                    } else {
                        shutdown::SEND
                    };
                    return control(conn, op::SHUTDOWN, flags);
                }
                Ok(n) => {
                    // Stays pending: there may be more; a read that would block ends it.
                    conn.sent_to_guest(n as u32);
                    let h = conn.header(guest_cid, op::RW, 0, n as u32);
                    return match write_packet(mem, bufs, &h, &buf[..n]) {
                        Ok(len) => ConnRx::Sent(len),
                        Err(_) => ConnRx::Reset,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.pending.rw = false;
                    return ConnRx::Nothing;
                }
                Err(_) => return ConnRx::Reset,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 12 ",
            b"connect 12",
            b"CONNECT  12",
            b"CONNECT +12",
            b"",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
