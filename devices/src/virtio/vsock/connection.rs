//! One stream connection: its state, credit accounting, and the bytes from the guest that the
//! host's Unix stream could not take yet.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` and `fwd_cnt` in every packet.
//! We never send the guest more than `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`; the guest may
//! send us at most `BUF_ALLOC - (recv_cnt - fwd_cnt we last advertised)`, which also bounds what
//! we buffer for the host.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{shutdown, PacketHeader, TYPE_STREAM};
use super::{unix, BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, HOST_CID};

/// A connection's identity: our port (the host side) and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// The host connected: REQUEST to the guest queued (or sent), waiting for RESPONSE.
    LocalInit { request_sent: bool },
    /// Data flows.
    Established,
}

/// Packets the connection waits to send to the guest (each at most once: bounded).
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub request: bool,
    pub response: bool,
    pub credit_update: bool,
    /// The stream is (or may be) readable: data or EOF to relay.
    pub rw: bool,
}

/// Why a connection must be reset.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ConnError {
    /// The guest sent more than its credit, or data after saying it would not.
    Protocol,
    /// Writing to the host's stream failed.
    Io(io::ErrorKind),
}

pub(super) struct Connection {
    pub stream: UnixStream,
    pub key: ConnKey,
    pub state: State,
    /// When a host-initiated connection gives up waiting for the guest's RESPONSE.
    pub deadline: Option<Instant>,
    pub pending: Pending,
    /// In the muxer's rx queue.
    pub queued: bool,
    /// Interest registered in the muxer's epoll; `None` once deregistered after a hang-up.
    pub registered: Option<EventSet>,
    /// Guest bytes the host's stream could not take yet.
    tx_buf: VecDeque<u8>,
    /// Bytes received from the guest.
    recv_cnt: Wrapping<u32>,
    /// Bytes written to the host's stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The guest will not send any more.
    pub peer_shut_send: bool,
    /// The guest will not receive any more.
    pub peer_shut_recv: bool,
    /// We shut down the stream's write side (after relaying all the guest sent).
    pub write_shut: bool,
    /// The host's stream reached EOF and the guest was told (SHUTDOWN).
    pub host_eof: bool,
    /// The host's stream hung up (both directions closed); it is out of the epoll.
    pub hup: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, state: State) -> Self {
        Connection {
            stream,
            key,
            state,
            deadline: None,
            pending: Pending::default(),
            queued: false,
            registered: None,
            tx_buf: VecDeque::new(),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shut_send: false,
            peer_shut_recv: false,
            write_shut: false,
            host_eof: false,
            hup: false,
        }
    }

    /// A connection the host opened: REQUEST to send.
    pub fn local(stream: UnixStream, key: ConnKey, deadline: Instant) -> Self {
        let mut c = Connection::new(
            stream,
            key,
            State::LocalInit {
                request_sent: false,
            },
        );
        c.deadline = Some(deadline);
        c.pending.request = true;
        c
    }

    /// A connection the guest opened (its REQUEST is `req`) and the host accepted: RESPONSE to
    /// send.
    pub fn peer(stream: UnixStream, key: ConnKey, req: &PacketHeader) -> Self {
        let mut c = Connection::new(stream, key, State::Established);
        c.update_peer_credit(req);
        c.pending.response = true;
        c
    }

    /// Whether the guest has heard of this connection (and so must be told when it ends).
    pub fn guest_knows(&self) -> bool {
        self.state
            != State::LocalInit {
                request_sent: false,
            }
    }

    /// A header from us to the guest; it carries our current credit, so no separate
    /// CREDIT_UPDATE is needed after it.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32, len: u32) -> PacketHeader {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Every packet from the guest carries its credit.
    pub fn update_peer_credit(&mut self, h: &PacketHeader) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    /// Records `n` bytes sent to the guest.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.rx_cnt += n;
    }

    /// Records a SHUTDOWN from the guest.
    pub fn peer_shutdown(&mut self, flags: u32) {
        self.peer_shut_recv |= flags & shutdown::RCV != 0;
        self.peer_shut_send |= flags & shutdown::SEND != 0;
    }

    /// Data from the guest: straight to the host's stream when it takes it, else buffered.
    pub fn recv(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.peer_shut_send {
            return Err(ConnError::Protocol);
        }
        let in_flight = (self.recv_cnt - self.fwd_cnt_sent).0 as usize;
        if in_flight + data.len() > BUF_ALLOC as usize {
            return Err(ConnError::Protocol);
        }
        self.recv_cnt += data.len() as u32;
        let mut rest = data;
        if self.tx_buf.is_empty() {
            while !rest.is_empty() {
                match unix::send(&self.stream, rest) {
                    Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        self.fwd_cnt += n as u32;
                        rest = &rest[n..];
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(ConnError::Io(e.kind())),
                }
            }
        }
        self.tx_buf.extend(rest);
        Ok(())
    }

    /// Writes buffered guest data to the host's stream, as much as it takes.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match unix::send(&self.stream, front) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(ConnError::Io(e.kind())),
            }
        }
        Ok(())
    }

    /// Guest bytes waiting for the host's stream.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Housekeeping after any change: half-close the stream once the guest's data is all out,
    /// decide on a CREDIT_UPDATE, stop relaying to a guest that will not receive.
    pub fn maintain(&mut self) {
        if self.peer_shut_send && self.tx_buf.is_empty() && !self.write_shut {
            // Errors (the host already gone) show up as a hang-up.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.write_shut = true;
        }
        if self.peer_shut_recv {
            self.pending.rw = false;
        }
        let unadvertised = (self.fwd_cnt - self.fwd_cnt_sent).0;
        let guest_sees_free = BUF_ALLOC.saturating_sub((self.recv_cnt - self.fwd_cnt_sent).0);
        if self.state == State::Established
            && !self.peer_shut_send
            && unadvertised > 0
            && guest_sees_free < CREDIT_UPDATE_THRESHOLD
        {
            self.pending.credit_update = true;
        }
    }

    /// Both directions are over: the guest will send nothing more (or the host cannot take it)
    /// and will get nothing more. Time for the final RST.
    pub fn is_done(&self) -> bool {
        let to_host_done = self.hup || (self.peer_shut_send && self.write_shut);
        let to_guest_done = self.host_eof || self.peer_shut_recv;
        self.state == State::Established && to_host_done && to_guest_done
    }

    /// What to wait for on the stream: readable only while the guest can take data and we are
    /// not already waiting for an rx buffer to put it in; writable only while we hold bytes.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state == State::Established {
            if !self.pending.rw && !self.host_eof && !self.peer_shut_recv && self.peer_credit() > 0
            {
                set |= EventSet::IN;
            }
            if !self.tx_buf.is_empty() {
                set |= EventSet::OUT;
            }
        }
        set
    }

    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.request || p.response || p.credit_update || p.rw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::op;
    use std::io::Read;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1,
            peer_port: 2,
        };
        let req = PacketHeader {
            buf_alloc: 1000,
            fwd_cnt: u32::MAX - 10,
            ..Default::default()
        };
        (Connection::peer(a, key, &req), b)
    }

    #[test]
    fn credit_toward_the_guest_wraps_and_never_goes_negative() {
        let (mut c, _peer) = conn();
        // rx_cnt 0, peer_fwd_cnt u32::MAX - 10: 11 bytes "in flight" across the wrap.
        assert_eq!(c.peer_credit(), 989);
        c.sent_to_guest(989);
        assert_eq!(c.peer_credit(), 0);
        c.sent_to_guest(5);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(&PacketHeader {
            buf_alloc: 1000,
            fwd_cnt: 994 - 11,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 989);
    }

    #[test]
    fn guest_data_is_forwarded_buffered_and_bounded_by_its_credit() {
        let (mut c, mut peer) = conn();
        c.recv(b"abc").unwrap();
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        // Fill the socket; the rest is buffered, up to BUF_ALLOC in flight.
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 3usize;
        while sent + chunk.len() <= BUF_ALLOC as usize {
            c.recv(&chunk).unwrap();
            sent += chunk.len();
        }
        assert_eq!(c.recv(&chunk), Err(ConnError::Protocol));
        // We advertise what was forwarded: that frees credit.
        c.maintain();
        assert!(c.pending.credit_update);
        let h = c.header(3, op::CREDIT_UPDATE, 0, 0);
        assert!(h.fwd_cnt >= 3);
        assert!(!c.pending.credit_update);
        let buffered_before = c.buffered();
        let mut sink = vec![0u8; 1 << 20];
        let mut drained = 0;
        while drained < sent - 3 - buffered_before {
            drained += peer.read(&mut sink).unwrap();
        }
        c.flush().unwrap();
        assert!(c.buffered() < buffered_before || buffered_before == 0);
        assert_eq!(c.interest().contains(EventSet::OUT), c.buffered() > 0);
        // After SHUTDOWN(SEND) more data is a protocol error.
        c.peer_shutdown(shutdown::SEND);
        assert_eq!(c.recv(b"x"), Err(ConnError::Protocol));
    }

    #[test]
    fn done_only_when_both_directions_are() {
        let (mut c, _peer) = conn();
        c.peer_shutdown(shutdown::SEND);
        c.maintain();
        assert!(c.write_shut);
        assert!(!c.is_done());
        c.host_eof = true;
        assert!(c.is_done());
        let (mut c, _peer) = conn();
        c.peer_shutdown(shutdown::RCV | shutdown::SEND);
        c.maintain();
        assert!(c.is_done());
        assert!(!c.interest().contains(EventSet::IN));
    }
}
