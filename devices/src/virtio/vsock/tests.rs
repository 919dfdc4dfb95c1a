//! End-to-end tests of the vsock device: a mock driver on mock guest memory on one side, real Unix
//! sockets in a temporary directory on the other.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::GuestMemory;

use super::packet::{op, shutdown, PacketHeader, HEADER_LEN, TYPE_STREAM};
use super::*;
use crate::virtio::test_utils::{interrupt, memory, readable, CountingIrq, DriverQueue, BUF_BASE};
use crate::virtio::{device_type, features, ActivateError, DeviceState, VirtioDevice};

const CID: u64 = 3;
const QSIZE: u16 = 64;
const RX_PAYLOAD: u32 = 4096;
/// Rx buffer of descriptor `i`: RX_AREA + i * RX_SLOT.
const RX_AREA: u64 = BUF_BASE;
const RX_SLOT: u64 = 0x2000;
/// Tx buffer of descriptor `i`: TX_AREA + i * TX_SLOT.
const TX_AREA: u64 = 0x80_0000;
const TX_SLOT: u64 = 0x1_1000;
const EV_AREA: u64 = 0x70_0000;
const WAIT: Duration = Duration::from_secs(10);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vsock-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A guest driver with the device, its queues and its Unix socket.
struct Guest {
    mem: GuestMemory,
    dev: Vsock,
    rx: DriverQueue,
    tx: DriverQueue,
    ev: DriverQueue,
    irq: Arc<CountingIrq>,
    uds: PathBuf,
    _dir: TempDir,
}

fn guest() -> Guest {
    guest_with(false)
}

/// A guest whose queues use VIRTIO_F_RING_EVENT_IDX (notification suppression by index).
fn guest_with(event_idx: bool) -> Guest {
    let dir = TempDir::new();
    let uds = dir.0.join("v.sock");
    let mut dev = Vsock::new(CID, uds.clone()).unwrap();
    dev.ack_features(dev.features());
    let mem = memory();
    let (rx, rq) = DriverQueue::new(&mem, 0, QSIZE);
    let (tx, tq) = DriverQueue::new(&mem, 0x4000, QSIZE);
    let (ev, mut eq) = DriverQueue::new(&mem, 0x8000, QSIZE);
    eq.set_event_idx(event_idx);
    let (interrupt, irq) = interrupt();
    dev.activate(mem.clone(), vec![rq, tq, eq], interrupt)
        .unwrap();
    Guest {
        mem,
        dev,
        rx,
        tx,
        ev,
        irq,
        uds,
        _dir: dir,
    }
}

/// A header from the guest's port `src` to host port `dst`, with the guest's credit generous.
fn hdr(op: u16, src: u32, dst: u32) -> PacketHeader {
    PacketHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Default::default()
    }
}

impl Guest {
    /// Transmits a chain of one buffer per part and kicks the tx queue.
    fn send_parts(&mut self, parts: &[&[u8]]) {
        let first = self.tx.next_desc;
        let bufs: Vec<(u64, u32, bool)> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let addr = TX_AREA + u64::from((first + i as u16) % QSIZE) * TX_SLOT;
                self.mem.write_slice(p, GuestAddress(addr)).unwrap();
                (addr, p.len() as u32, false)
            })
            .collect();
        self.tx.add(&self.mem, &bufs);
        self.dev.process_queue(TX_QUEUE);
        self.tx.take_used(&self.mem);
        assert_eq!(
            self.tx.in_flight(&self.mem),
            0,
            "tx chains are always returned"
        );
    }

    /// Transmits a packet (its `len` set from the payload).
    fn send(&mut self, mut h: PacketHeader, payload: &[u8]) {
        h.len = payload.len() as u32;
        let mut packet = h.to_bytes().to_vec();
        packet.extend_from_slice(payload);
        self.send_parts(&[&packet]);
    }

    /// Adds `n` rx buffers without kicking.
    fn add_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_AREA + u64::from(self.rx.next_desc) * RX_SLOT;
            self.rx
                .add(&self.mem, &[(addr, HEADER_LEN as u32 + RX_PAYLOAD, true)]);
        }
    }

    /// Adds `n` rx buffers and kicks the rx queue.
    fn post_rx(&mut self, n: usize) {
        self.add_rx(n);
        self.dev.process_queue(RX_QUEUE);
    }

    /// Packets the device put in rx buffers since the last call.
    fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        self.rx
            .take_used(&self.mem)
            .into_iter()
            .map(|(head, len)| {
                assert!(len as usize >= HEADER_LEN, "rx entry of {len} bytes");
                let mut b = vec![0u8; len as usize];
                let addr = RX_AREA + u64::from(head) * RX_SLOT;
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let h = PacketHeader::from_bytes(b[..HEADER_LEN].try_into().unwrap());
                assert_eq!(h.len as usize, b.len() - HEADER_LEN);
                assert_eq!(
                    (h.src_cid, h.dst_cid, h.type_),
                    (HOST_CID, CID, TYPE_STREAM)
                );
                (h, b[HEADER_LEN..].to_vec())
            })
            .collect()
    }

    /// Services host-side events until there are none left.
    fn pump(&mut self) {
        let fd = self.dev.event_fds()[0];
        for _ in 0..16 {
            if !readable(fd) {
                break;
            }
            self.dev.process_event(0);
        }
    }

    /// Pumps until at least `n` packets arrived (keeping a few rx buffers posted).
    fn wait_packets(&mut self, n: usize) -> Vec<(PacketHeader, Vec<u8>)> {
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            got.extend(self.recv());
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < WAIT,
                "waited for {n} packets, got {got:?}"
            );
            if self.rx.in_flight(&self.mem) < 4 {
                self.post_rx(4);
            }
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn connections(&mut self) -> usize {
        self.dev.muxer().connections()
    }

    /// A host process connects to the guest's `port` through `CONNECT`; the guest accepts.
    /// Returns the host's stream and the local port the device picked.
    fn connect_from_host(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let p = self.wait_packets(1);
        assert_eq!(p.len(), 1);
        let req = p[0].0;
        assert_eq!(req.op, op::REQUEST);
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= FIRST_LOCAL_PORT);
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        self.send(hdr(op::RESPONSE, port, req.src_port), &[]);
        let mut line = [0u8; 64];
        let want = format!("OK {}\n", req.src_port);
        host.read_exact(&mut line[..want.len()]).unwrap();
        assert_eq!(&line[..want.len()], want.as_bytes());
        (host, req.src_port)
    }

    /// The guest connects from its `port` to the host's `host_port`, served by `listener`.
    fn connect_to_host(
        &mut self,
        listener: &UnixListener,
        port: u32,
        host_port: u32,
    ) -> UnixStream {
        self.post_rx(1);
        self.send(hdr(op::REQUEST, port, host_port), &[]);
        let p = self.recv();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0.op, op::RESPONSE);
        assert_eq!((p[0].0.src_port, p[0].0.dst_port), (host_port, port));
        assert_eq!(p[0].0.buf_alloc, BUF_ALLOC);
        let (s, _) = listener.accept().unwrap();
        s
    }

    fn host_listener(&self, port: u32) -> UnixListener {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        UnixListener::bind(path).unwrap()
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

#[test]
fn identifies_as_vsock_with_the_guest_cid() {
    let mut g = guest();
    assert_eq!(g.dev.device_type(), device_type::VSOCK);
    assert_eq!(g.dev.queue_max_sizes().len(), 3);
    assert_ne!(g.dev.features() & features::VERSION_1, 0);
    let mut cfg = [0u8; 8];
    g.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut hi = [0u8; 4];
    g.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    g.dev.reset();
    let (i, _) = interrupt();
    assert!(matches!(
        crate::virtio::activate_checked(&mut g.dev, g.mem.clone(), vec![], i),
        Err(ActivateError::QueueCount { expected: 3, .. })
    ));
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(
            Vsock::new(cid, g.uds.clone()),
            Err(VsockError::InvalidCid(_))
        ));
    }
    assert!(matches!(
        Vsock::new(CID, PathBuf::from("/nonexistent/dir/v.sock")),
        Err(VsockError::Bind { .. })
    ));
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let g = guest();
    let path = g.uds.clone();
    drop(g.dev);
    assert!(path.exists());
    let _again = Vsock::new(CID, path.clone()).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
}

#[test]
fn the_socket_is_private_and_serves_only_the_vmms_user() {
    use std::os::unix::fs::PermissionsExt;
    let mut g = guest();
    let mode = std::fs::metadata(&g.uds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Another user's process (stood in for by serving a uid that is not ours): closed, and
    // its CONNECT never reaches the guest.
    g.dev
        .muxer()
        .serve_only(crate::unix_peer::own_uid().wrapping_add(1));
    let mut stranger = UnixStream::connect(&g.uds).unwrap();
    stranger.write_all(b"CONNECT 1234\n").unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    g.post_rx(2);
    g.pump();
    let mut buf = [0u8; 16];
    // Closed with its line unread: EOF or a reset, never "OK".
    match stranger.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a stranger got {other:?}: {:?}", &buf),
    }
    g.pump();
    assert!(g.recv().is_empty(), "the guest heard of a stranger");
    // The VMM's own user goes through.
    g.dev.muxer().serve_only(crate::unix_peer::own_uid());
    let (_host, _) = g.connect_from_host(1234);
}

#[test]
fn host_to_guest_handshake_then_data_both_ways_with_credit() {
    let mut g = guest();
    let (host, local) = g.connect_from_host(1234);
    assert_eq!(g.connections(), 1);

    // Host → guest, 300 KiB, the guest advertising only 64 KiB of buffer.
    const GUEST_BUF: u32 = 64 << 10;
    let data = pattern(300 << 10, 0x5a);
    let credit = |fwd: usize| PacketHeader {
        buf_alloc: GUEST_BUF,
        fwd_cnt: fwd as u32,
        ..hdr(op::CREDIT_UPDATE, 1234, local)
    };
    g.send(credit(0), &[]);
    let mut writer = host.try_clone().unwrap();
    let to_send = data.clone();
    let t = std::thread::spawn(move || writer.write_all(&to_send).unwrap());

    let mut got: Vec<u8> = Vec::new();
    let mut fwd = 0usize;
    let take = |g: &mut Guest, got: &mut Vec<u8>| {
        for (h, p) in g.recv() {
            assert_eq!(h.op, op::RW, "{h:?}");
            assert_eq!((h.src_port, h.dst_port), (local, 1234));
            assert!(p.len() <= RX_PAYLOAD as usize);
            got.extend_from_slice(&p);
        }
    };

    // Four more buffers, all filled; then the device is stalled on rx buffers with data waiting.
    g.post_rx(4);
    let start = Instant::now();
    while g.rx.in_flight(&g.mem) > 0 {
        assert!(start.elapsed() < WAIT);
        g.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    take(&mut g, &mut got);
    // These four and those left over from the handshake, all full.
    let filled = got.len();
    assert!(filled >= 4 * RX_PAYLOAD as usize && filled % RX_PAYLOAD as usize == 0);
    std::thread::sleep(Duration::from_millis(20));
    g.pump();
    assert!(g.recv().is_empty());
    // Stalled without spinning: the device's event fd is quiet.
    assert!(!readable(g.dev.event_fds()[0]));
    // The rx kick resumes delivery at once.
    g.post_rx(2);
    take(&mut g, &mut got);
    assert_eq!(got.len(), filled + 2 * RX_PAYLOAD as usize);

    let start = Instant::now();
    while got.len() < data.len() {
        assert!(start.elapsed() < WAIT, "host→guest stuck at {}", got.len());
        g.pump();
        take(&mut g, &mut got);
        // Never more than the guest's credit in flight.
        assert!(got.len() - fwd <= GUEST_BUF as usize, "credit exceeded");
        if got.len() - fwd >= 16 << 10 {
            fwd = got.len();
            g.send(credit(fwd), &[]);
        }
        if g.rx.in_flight(&g.mem) < 8 {
            g.post_rx(8);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    t.join().unwrap();
    assert!(got == data, "host→guest bytes differ");

    // Guest → host, 300 KiB, within the device's credit; the host starts reading late so the
    // device has to buffer and wait for the stream to be writable.
    let data = pattern(300 << 10, 0xa5);
    let mut reader = host.try_clone().unwrap();
    let n = data.len();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = vec![0u8; n];
        reader.read_exact(&mut buf).unwrap();
        buf
    });
    let mut sent = 0usize;
    let mut host_fwd = 0u32;
    let mut credit_updates = 0;
    let mut max_buffered = 0;
    let start = Instant::now();
    while sent < data.len() {
        assert!(start.elapsed() < WAIT, "guest→host stuck at {sent}");
        let in_flight = (sent as u32).wrapping_sub(host_fwd);
        let credit = (BUF_ALLOC - in_flight) as usize;
        let chunk = credit.min(16 << 10).min(data.len() - sent);
        if chunk > 0 {
            let h = PacketHeader {
                fwd_cnt: got.len() as u32,
                ..hdr(op::RW, 1234, local)
            };
            g.send(h, &data[sent..sent + chunk]);
            sent += chunk;
            max_buffered = max_buffered.max(g.dev.muxer().buffered());
        } else {
            if g.rx.in_flight(&g.mem) < 4 {
                g.post_rx(4);
            }
            g.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        for (h, _) in g.recv() {
            assert_eq!(h.op, op::CREDIT_UPDATE);
            host_fwd = h.fwd_cnt;
            credit_updates += 1;
        }
    }
    assert!(credit_updates > 0, "the device never updated its credit");
    assert!(max_buffered > 0, "the host's socket never filled up");
    // What the device still buffers goes out as the host's stream becomes writable.
    while !t.is_finished() {
        assert!(
            start.elapsed() < WAIT,
            "guest→host data stuck in the device"
        );
        g.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    let echoed = t.join().unwrap();
    assert!(echoed == data, "guest→host bytes differ");
    assert_eq!(g.connections(), 1);
}

#[test]
fn guest_to_host_connect_gets_response_or_rst() {
    let mut g = guest();
    let listener = g.host_listener(5000);
    let mut s = g.connect_to_host(&listener, 777, 5000);
    g.send(hdr(op::RW, 777, 5000), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let p = g.wait_packets(1);
    assert_eq!(p[0].0.op, op::RW);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (5000, 777));
    assert_eq!(p[0].1, b"pong");

    // Nobody listening on 5001.
    g.post_rx(1);
    g.send(hdr(op::REQUEST, 778, 5001), &[]);
    let p = g.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0.op, op::RST);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (5001, 778));
    assert_eq!(g.connections(), 1);

    // A second REQUEST on a live connection resets it.
    g.post_rx(1);
    g.send(hdr(op::REQUEST, 777, 5000), &[]);
    assert_eq!(g.recv()[0].0.op, op::RST);
    assert_eq!(g.connections(), 0);
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn guest_shutdown_half_closes_and_the_host_can_still_reply() {
    let mut g = guest();
    let listener = g.host_listener(5000);
    let mut s = g.connect_to_host(&listener, 777, 5000);
    g.send(hdr(op::RW, 777, 5000), b"request");
    g.send(
        PacketHeader {
            flags: shutdown::SEND,
            ..hdr(op::SHUTDOWN, 777, 5000)
        },
        &[],
    );
    // The host reads the request, then EOF...
    let mut req = Vec::new();
    s.read_to_end(&mut req).unwrap();
    assert_eq!(req, b"request");
    // ...and still answers, then closes.
    s.write_all(b"reply").unwrap();
    drop(s);
    let p = g.wait_packets(3);
    let ops: Vec<u16> = p.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [op::RW, op::SHUTDOWN, op::RST]);
    assert_eq!(p[0].1, b"reply");
    assert_eq!(p[1].0.flags & shutdown::SEND, shutdown::SEND);
    assert_eq!(g.connections(), 0);
}

#[test]
fn a_guest_reset_after_its_close_still_delivers_what_the_host_had_not_taken() {
    let mut g = guest();
    let listener = g.host_listener(5001);
    let mut s = g.connect_to_host(&listener, 778, 5001);
    // More than a Unix socket buffer holds, within the device's credit: some stays buffered.
    let data = pattern(BUF_ALLOC as usize, 0x3c);
    for chunk in data.chunks(16 << 10) {
        g.send(hdr(op::RW, 778, 5001), chunk);
    }
    assert!(
        g.dev.muxer().buffered() > 0,
        "the host's socket never filled up"
    );
    // A closing Linux guest: SHUTDOWN both ways, then (no RST from us in time) its own RST.
    g.send(
        PacketHeader {
            flags: shutdown::SEND | shutdown::RCV,
            ..hdr(op::SHUTDOWN, 778, 5001)
        },
        &[],
    );
    g.send(hdr(op::RST, 778, 5001), &[]);
    assert_eq!(g.connections(), 0);
    assert_eq!(g.dev.muxer().draining(), 1);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let start = Instant::now();
    while !reader.is_finished() {
        assert!(start.elapsed() < WAIT, "the rest never reached the host");
        g.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(reader.join().unwrap() == data, "guest→host bytes differ");
    assert_eq!(g.dev.muxer().draining(), 0);
    // Nothing more goes to the guest for a connection it reset.
    g.post_rx(4);
    g.pump();
    assert!(g.recv().is_empty());

    // A reset without the guest's close first is a reset: the buffered bytes are dropped.
    let listener = g.host_listener(5002);
    let mut s = g.connect_to_host(&listener, 779, 5002);
    for chunk in data.chunks(16 << 10) {
        g.send(hdr(op::RW, 779, 5002), chunk);
    }
    g.send(hdr(op::RST, 779, 5002), &[]);
    assert_eq!((g.connections(), g.dev.muxer().draining()), (0, 0));
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() < data.len());
}

#[test]
fn a_restored_device_never_reuses_the_snapshots_local_ports() {
    let mut g = guest();
    let (_a, first) = g.connect_from_host(1024);
    let (_b, second) = g.connect_from_host(1024);
    assert_eq!(second, first + 1);
    let state = g.dev.save_device_state();
    assert_eq!(
        state,
        DeviceState::Vsock(VsockState {
            next_local_port: second + 1
        })
    );
    // A clone of that snapshot: its guest may still hold sockets for `first` and `second`.
    let mut clone = guest();
    clone.dev.load_device_state(&state).unwrap();
    let (_c, port) = clone.connect_from_host(1024);
    assert_eq!(port, second + 1);
    assert!(clone
        .dev
        .load_device_state(&DeviceState::Stateless)
        .is_err());
}

#[test]
fn host_eof_is_a_shutdown_and_the_guest_can_still_send() {
    let mut g = guest();
    let (mut host, local) = g.connect_from_host(80);
    host.write_all(b"question").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let p = g.wait_packets(2);
    assert_eq!(p[0].0.op, op::RW);
    assert_eq!(p[0].1, b"question");
    assert_eq!(p[1].0.op, op::SHUTDOWN);
    assert_eq!(p[1].0.flags, shutdown::SEND);
    // The stream's EOF stays readable, but the device no longer waits on it: no spinning.
    g.pump();
    assert!(!readable(g.dev.event_fds()[0]));
    // Half-closed: the host still reads.
    g.send(hdr(op::RW, 80, local), b"answer");
    let mut b = [0u8; 6];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"answer");
    // The guest closes: both directions are over, the device finishes with RST.
    g.post_rx(1);
    g.send(
        PacketHeader {
            flags: shutdown::SEND | shutdown::RCV,
            ..hdr(op::SHUTDOWN, 80, local)
        },
        &[],
    );
    let p = g.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0.op, op::RST);
    assert_eq!(g.connections(), 0);
    assert_eq!(host.read(&mut b).unwrap(), 0);
}

#[test]
fn host_hang_up_without_data_is_shutdown_then_rst() {
    let mut g = guest();
    let (host, _) = g.connect_from_host(81);
    drop(host);
    let p = g.wait_packets(2);
    assert_eq!(p[0].0.op, op::SHUTDOWN);
    assert_eq!(p[0].0.flags, shutdown::SEND | shutdown::RCV);
    assert_eq!(p[1].0.op, op::RST);
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_refusing_a_host_connection_closes_it() {
    let mut g = guest();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let p = g.wait_packets(1);
    assert_eq!(p[0].0.op, op::REQUEST);
    g.send(hdr(op::RST, 99, p[0].0.src_port), &[]);
    g.post_rx(1);
    assert!(g.recv().is_empty(), "no RST answers an RST");
    let mut b = Vec::new();
    host.read_to_end(&mut b).unwrap();
    assert!(b.is_empty(), "no OK line: {b:?}");
    assert_eq!(g.connections(), 0);
}

#[test]
fn bad_connect_lines_and_silent_hosts_are_closed() {
    let mut g = guest();
    g.dev.muxer().timeout = Duration::from_millis(50);
    let long = format!("CONNECT {}\n", "1".repeat(40));
    let mut streams = Vec::new();
    for line in ["HELLO 12\n", "CONNECT 99999999999\n", long.as_str(), ""] {
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        streams.push(s);
    }
    g.add_rx(4);
    let start = Instant::now();
    for mut s in streams {
        let mut b = [0u8; 8];
        s.set_nonblocking(true).unwrap();
        loop {
            g.pump();
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(n) => panic!("unexpected {:?}", &b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{e}"),
            }
            assert!(start.elapsed() < WAIT, "stream left open");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    g.dev.process_queue(RX_QUEUE);
    assert!(g.recv().is_empty(), "no REQUEST for a bad handshake");
}

#[test]
fn a_guest_that_never_answers_a_request_gets_rst_and_the_host_eof() {
    let mut g = guest();
    g.dev.muxer().timeout = Duration::from_millis(50);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    let p = g.wait_packets(1);
    assert_eq!(p[0].0.op, op::REQUEST);
    let p = g.wait_packets(1);
    assert_eq!(p[0].0.op, op::RST);
    assert_eq!(p[0].0.dst_port, 7);
    let mut b = Vec::new();
    host.read_to_end(&mut b).unwrap();
    assert!(b.is_empty());
}

#[test]
fn a_guest_exceeding_its_credit_is_reset() {
    let mut g = guest();
    let listener = g.host_listener(5000);
    let mut s = g.connect_to_host(&listener, 777, 5000);
    // The host never reads during this, and the guest gets no rx buffers (so no credit
    // update): 256 KiB is all it may send.
    let chunk = vec![1u8; 64 << 10];
    for _ in 0..(BUF_ALLOC as usize / chunk.len()) {
        g.send(hdr(op::RW, 777, 5000), &chunk);
    }
    assert_eq!(g.connections(), 1);
    g.send(hdr(op::RW, 777, 5000), &chunk);
    assert_eq!(g.connections(), 0);
    g.post_rx(1);
    let p = g.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0.op, op::RST);
    // The host gets what made it into its socket, then the connection ends.
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
    assert!(b.len() <= BUF_ALLOC as usize);
    assert!(b.iter().all(|&x| x == 1));
}

#[test]
fn bad_packets_get_rst_and_never_panic() {
    let mut g = guest();
    let good = hdr(op::RW, 40, 50);
    let mut cases: Vec<(&str, PacketHeader, usize)> = vec![
        ("len beyond chain", PacketHeader { len: 100, ..good }, 10),
        (
            "oversized len",
            PacketHeader {
                len: MAX_PAYLOAD as u32 + 1,
                ..good
            },
            MAX_PAYLOAD + 1,
        ),
        ("wrong src_cid", PacketHeader { src_cid: 4, ..good }, 0),
        ("host src_cid", PacketHeader { src_cid: 2, ..good }, 0),
        ("wrong dst_cid", PacketHeader { dst_cid: 3, ..good }, 0),
        ("seqpacket", PacketHeader { type_: 2, ..good }, 0),
        ("op 0", PacketHeader { op: 0, ..good }, 0),
        ("op 8", PacketHeader { op: 8, ..good }, 0),
        ("RW to no connection", good, 0),
        ("SHUTDOWN to no connection", hdr(op::SHUTDOWN, 40, 50), 0),
        ("RESPONSE to no connection", hdr(op::RESPONSE, 40, 50), 0),
    ];
    for (name, h, payload) in cases.drain(..) {
        g.post_rx(1);
        let mut packet = h.to_bytes().to_vec();
        packet.resize(HEADER_LEN + payload, 0);
        g.send_parts(&[&packet]);
        let p = g.recv();
        assert_eq!(p.len(), 1, "{name}");
        assert_eq!(p[0].0.op, op::RST, "{name}");
        assert_eq!((p[0].0.src_port, p[0].0.dst_port), (50, 40), "{name}");
    }
    // No answer: an RST (bad or not), a short header, a header outside guest memory.
    g.post_rx(1);
    let rst = PacketHeader {
        op: op::RST,
        src_cid: 9,
        ..good
    };
    g.send(rst, &[]);
    g.send(hdr(op::RST, 40, 50), &[]);
    g.send_parts(&[&good.to_bytes()[..43]]);
    g.tx.add(
        &g.mem,
        &[(crate::virtio::test_utils::MEM_SIZE as u64 - 20, 44, false)],
    );
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
    // A header split across three buffers is parsed (a REQUEST nobody serves: RST).
    let req = hdr(op::REQUEST, 41, 51).to_bytes();
    g.send_parts(&[&req[..3], &req[3..30], &req[30..]]);
    let p = g.recv();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0.op, p[0].0.dst_port), (op::RST, 41));
    // Writable buffers in a tx chain are not part of the packet: a short header, no answer.
    g.tx.add(&g.mem, &[(TX_AREA, 20, false), (TX_AREA + 20, 24, true)]);
    g.mem.write_slice(&req, GuestAddress(TX_AREA)).unwrap();
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
    // Rx buffers too small for a header are returned empty and do not lose the packet; and
    // only that one packet was waiting.
    g.rx.add(&g.mem, &[(RX_AREA, 43, true)]);
    g.add_rx(2);
    g.send(good, &[]);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, HEADER_LEN as u32);
}

#[test]
fn control_packets_waiting_for_rx_buffers_are_bounded() {
    let mut g = guest();
    for i in 0..(MAX_PENDING_CONTROL as u32 + 100) {
        g.send(hdr(op::RW, i, 1), b"x");
    }
    assert_eq!(g.dev.muxer().pending_control(), MAX_PENDING_CONTROL);
    // New connections are refused while it is full, without connecting anywhere.
    let listener = g.host_listener(5000);
    listener.set_nonblocking(true).unwrap();
    g.send(hdr(op::REQUEST, 1, 5000), &[]);
    assert!(listener.accept().is_err());
    assert_eq!(g.connections(), 0);
    g.post_rx(10);
    assert_eq!(g.recv().len(), 10);
    assert_eq!(g.dev.muxer().pending_control(), MAX_PENDING_CONTROL - 10);
}

#[test]
fn reset_drops_every_connection() {
    let mut g = guest();
    let listener = g.host_listener(5000);
    let mut a = g.connect_to_host(&listener, 777, 5000);
    let (mut b, _) = g.connect_from_host(22);
    assert_eq!(g.connections(), 2);
    g.dev.reset();
    assert_eq!(g.connections(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(a.read(&mut buf).unwrap(), 0);
    assert_eq!(b.read(&mut buf).unwrap(), 0);
    // Packets about the old connections are ignored while inactive; host connections still
    // queue for the next activation.
    g.dev.process_queue(TX_QUEUE);
    let _pending = UnixStream::connect(&g.uds).unwrap();
    g.pump();
}

#[test]
fn transport_reset_event_drops_connections() {
    let mut g = guest();
    let listener = g.host_listener(5000);
    let mut a = g.connect_to_host(&listener, 777, 5000);
    // Event buffers stay untouched until there is an event.
    g.ev.add(&g.mem, &[(EV_AREA, 8, true)]);
    g.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EV_AREA))
        .unwrap();
    g.dev.process_queue(EVENT_QUEUE);
    assert!(g.ev.take_used(&g.mem).is_empty());
    let irqs = g.irq.0.load(Ordering::SeqCst);
    assert!(g.dev.send_transport_reset());
    assert_eq!(g.ev.take_used(&g.mem), [(0, 4)]);
    let id: u32 = g.mem.read_obj(GuestAddress(EV_AREA)).unwrap();
    assert_eq!(id, 0);
    assert!(g.irq.0.load(Ordering::SeqCst) > irqs);
    assert_eq!(g.connections(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(a.read(&mut buf).unwrap(), 0);
    // A host connection made before the driver re-read the CID waits: it would be reset
    // along with the snapshot's sockets.
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 22\n").unwrap();
    g.post_rx(1);
    let waited = std::time::Instant::now();
    while waited.elapsed() < Duration::from_millis(100) {
        g.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(g.rx.take_used(&g.mem).is_empty());
    // Re-reading the CID is not enough: the driver resets its sockets after that read.
    let mut cid = [0u8; 8];
    g.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    g.pump();
    g.dev.process_queue(RX_QUEUE);
    assert!(g.rx.take_used(&g.mem).is_empty());
    // Its refill of the event buffer (a kick of the event queue) says it is done.
    g.ev.add(&g.mem, &[(EV_AREA, 8, true)]);
    g.dev.process_queue(EVENT_QUEUE);
    let p = g.wait_packets(1);
    assert_eq!(p[0].0.op, op::REQUEST);
    assert_eq!(p[0].0.dst_port, 22);
    assert!(g.ev.take_used(&g.mem).is_empty(), "the refill stays posted");
    // The refill takes the next event; no buffer, or not active: not delivered (connections
    // still dropped).
    assert!(g.dev.send_transport_reset());
    assert!(!g.dev.send_transport_reset());
    g.dev.reset();
    assert!(!g.dev.send_transport_reset());
}

#[test]
fn transport_reset_asks_for_the_refill_kick_and_falls_back_without_one() {
    let mut g = guest_with(true);
    // Linux keeps 8 event buffers posted.
    for i in 0..8 {
        g.ev.add(&g.mem, &[(EV_AREA + 8 * i, 8, true)]);
    }
    // A restored ring's avail_event is whatever the snapshot held.
    let avail_event = g.ev.used + 4 + 8 * u64::from(QSIZE);
    g.mem
        .write_obj(0x1234u16, GuestAddress(avail_event))
        .unwrap();
    assert!(g.dev.send_transport_reset());
    assert_eq!(g.ev.take_used(&g.mem), [(0, 4)]);
    // The driver's refill moves its index from 8 to 9; it kicks when the event index it reads
    // lies in [8, 9) (vring_need_event): the device must have set it to 8.
    let event: u16 = g.mem.read_obj(GuestAddress(avail_event)).unwrap();
    assert_eq!(event, 8);
    // A driver that re-reads the CID but never refills: held traffic still goes out.
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 22\n").unwrap();
    g.post_rx(1);
    g.pump();
    assert!(g.rx.take_used(&g.mem).is_empty());
    let mut cid = [0u8; 8];
    g.dev.read_config(0, &mut cid);
    let p = g.wait_packets(1);
    assert_eq!(p[0].0.op, op::REQUEST);
    assert_eq!(p[0].0.dst_port, 22);
}
