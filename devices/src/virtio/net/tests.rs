//! Tests of the virtio-net device: a mock driver on mock guest memory on one side, a fake
//! backend (two queues of frames) on the other.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::test_utils::{
    interrupt, memory, readable, CountingIrq, DriverQueue, BUF_BASE, F_NEXT, F_WRITE, MEM_SIZE,
};
use crate::virtio::{device_type, features as common, ActivateError, VirtioDevice};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const MTU: u16 = 1500;
const QSIZE: u16 = 64;
/// Buffer of rx descriptor `i`: RX_AREA + i * SLOT.
const RX_AREA: u64 = BUF_BASE;
/// Buffer of tx descriptor `i`: TX_AREA + i * TX_SLOT.
const TX_AREA: u64 = 0x80_0000;
const SLOT: u64 = 0x1000;
const TX_SLOT: u64 = 0x1_2000;
/// Room for a header and an MTU-sized frame.
const RX_LEN: u32 = (HEADER_LEN + ETH_HEADER_LEN) as u32 + MTU as u32;

/// What the fake backend holds: frames both ways, and how often it was polled.
#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    /// Frames that reach `to_guest` at the next poll.
    later: VecDeque<Vec<u8>>,
    /// At each poll, every frame from the guest comes back.
    echo: bool,
    polls: usize,
}

#[derive(Clone, Default)]
struct Fake {
    wire: Arc<Mutex<Wire>>,
    fd: Option<Arc<EventFd>>,
}

impl NetBackend for Fake {
    fn send(&mut self, frame: &[u8]) {
        self.wire.lock().unwrap().from_guest.push(frame.to_vec());
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        let f = self.wire.lock().unwrap().to_guest.pop_front()?;
        buf[..f.len()].copy_from_slice(&f);
        Some(f.len())
    }

    fn poll(&mut self) {
        let mut w = self.wire.lock().unwrap();
        w.polls += 1;
        let later: Vec<_> = w.later.drain(..).collect();
        w.to_guest.extend(later);
        if w.echo {
            let echoed = std::mem::take(&mut w.from_guest);
            w.to_guest.extend(echoed);
        }
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.fd.as_ref().map(|e| e.as_raw_fd())
    }
}

/// A guest driver with the device, its queues and the backend's wire.
struct Guest {
    mem: GuestMemory,
    dev: Net,
    rx: DriverQueue,
    tx: DriverQueue,
    irq: Arc<CountingIrq>,
    wire: Arc<Mutex<Wire>>,
}

fn guest() -> Guest {
    guest_with(Fake::default(), false)
}

fn guest_with(fake: Fake, event_idx: bool) -> Guest {
    let wire = fake.wire.clone();
    let mut dev = Net::new(MAC, MTU, Box::new(fake));
    dev.ack_features(dev.features());
    let mem = memory();
    let (rx, tx, irq) = activate(&mut dev, &mem, 0, event_idx);
    Guest {
        mem,
        dev,
        rx,
        tx,
        irq,
        wire,
    }
}

/// Activates `dev` with fresh queues at `base`.
fn activate(
    dev: &mut Net,
    mem: &GuestMemory,
    base: u64,
    event_idx: bool,
) -> (DriverQueue, DriverQueue, Arc<CountingIrq>) {
    let (rx, mut rq) = DriverQueue::new(mem, base, QSIZE);
    let (tx, mut tq) = DriverQueue::new(mem, base + 0x4000, QSIZE);
    rq.set_event_idx(event_idx);
    tq.set_event_idx(event_idx);
    let (interrupt, irq) = interrupt();
    dev.activate(mem.clone(), vec![rq, tq], interrupt).unwrap();
    (rx, tx, irq)
}

/// A frame of `n` bytes, distinct per `seed`.
fn frame(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// A transmit header (the device ignores its contents).
fn tx_header() -> [u8; HEADER_LEN] {
    [0xa5; HEADER_LEN]
}

impl Guest {
    fn irqs(&self) -> usize {
        self.irq.0.load(Ordering::SeqCst)
    }

    /// Queues a transmit chain of one buffer per part, without kicking.
    fn add_tx(&mut self, parts: &[&[u8]]) {
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
    }

    /// Transmits a chain of one buffer per part; returns the used entries.
    fn send_parts(&mut self, parts: &[&[u8]]) -> Vec<(u16, u32)> {
        self.add_tx(parts);
        self.dev.process_queue(TX_QUEUE);
        let used = self.tx.take_used(&self.mem);
        assert_eq!(self.tx.in_flight(&self.mem), 0, "tx chains are returned");
        used
    }

    /// Transmits one frame in one buffer after its header.
    fn send(&mut self, f: &[u8]) {
        let mut b = tx_header().to_vec();
        b.extend_from_slice(f);
        self.send_parts(&[&b]);
    }

    /// Adds a receive chain of device-writable buffers of `lens`, without kicking; returns
    /// its head.
    fn add_rx(&mut self, lens: &[u32]) -> u16 {
        let first = self.rx.next_desc;
        let bufs: Vec<(u64, u32, bool)> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let idx = (first + i as u16) % QSIZE;
                (RX_AREA + u64::from(idx) * SLOT, len, true)
            })
            .collect();
        self.rx.add(&self.mem, &bufs)
    }

    /// Adds `n` single-buffer receive chains and kicks the rx queue.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.add_rx(&[RX_LEN]);
        }
        self.dev.process_queue(RX_QUEUE);
    }

    /// Reads `len` bytes of the chain at `head` whose buffers have `lens`: (header, frame).
    fn read_chain(&self, head: u16, lens: &[u32], len: u32) -> ([u8; HEADER_LEN], Vec<u8>) {
        let mut out = Vec::new();
        for (i, &l) in lens.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let mut b = vec![0u8; l as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_AREA + u64::from(idx) * SLOT))
                .unwrap();
            out.extend_from_slice(&b);
        }
        out.truncate(len as usize);
        let header = out[..HEADER_LEN].try_into().unwrap();
        (header, out[HEADER_LEN..].to_vec())
    }

    /// Frames delivered into single-buffer chains since the last call.
    fn recv(&mut self) -> Vec<Vec<u8>> {
        self.rx
            .take_used(&self.mem)
            .into_iter()
            .map(|(head, len)| {
                let (h, f) = self.read_chain(head, &[RX_LEN], len);
                assert_eq!(h, expected_header());
                f
            })
            .collect()
    }

    fn push(&self, f: Vec<u8>) {
        self.wire.lock().unwrap().to_guest.push_back(f);
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.wire.lock().unwrap().from_guest)
    }

    fn waiting(&self) -> usize {
        self.wire.lock().unwrap().to_guest.len()
    }
}

/// The receive header: no offloads, one buffer.
fn expected_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[10] = 1;
    h
}

#[test]
fn identifies_as_net_with_mac_mtu_and_link_up() {
    let mut g = guest();
    assert_eq!(g.dev.device_type(), device_type::NET);
    assert_eq!(g.dev.queue_max_sizes(), &[256, 256]);
    assert_eq!(
        g.dev.features(),
        common::VERSION_1 | common::RING_EVENT_IDX | (1 << 5) | (1 << 3) | (1 << 16)
    );
    assert_eq!(g.dev.mac(), MAC);
    let mut cfg = [0xffu8; 16];
    g.dev.read_config(0, &mut cfg);
    let mut want = [0u8; 16];
    want[..6].copy_from_slice(&MAC);
    want[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
    want[8..10].copy_from_slice(&1u16.to_le_bytes());
    want[10..12].copy_from_slice(&MTU.to_le_bytes());
    assert_eq!(cfg, want);
    // Field-sized reads, and reads past the end.
    let mut two = [0u8; 2];
    g.dev.read_config(10, &mut two);
    assert_eq!(u16::from_le_bytes(two), MTU);
    g.dev.read_config(6, &mut two);
    assert_eq!(u16::from_le_bytes(two), 1);
    g.dev.read_config(12, &mut two);
    assert_eq!(two, [0, 0]);
    // Writes are ignored.
    g.dev.write_config(0, &[0; 12]);
    g.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, want);
    // An MTU below the spec's floor is raised to it.
    assert_eq!(Net::new(MAC, 10, Box::new(Fake::default())).mtu(), MIN_MTU);
    // Two queues or nothing.
    g.dev.reset();
    let (i, _) = interrupt();
    assert!(matches!(
        crate::virtio::activate_checked(&mut g.dev, g.mem.clone(), vec![], i),
        Err(ActivateError::QueueCount { expected: 2, .. })
    ));
    assert!(g.dev.queue_states().is_empty());
}

#[test]
fn a_frame_split_across_three_descriptors_reaches_the_backend_byte_exact() {
    let mut g = guest();
    let f = frame(1514, 7);
    let h = tx_header();
    let mut second = h[5..].to_vec();
    second.extend_from_slice(&f[..100]);
    let used = g.send_parts(&[&h[..5], &second, &f[100..]]);
    assert_eq!(used, [(0, 0)]);
    assert_eq!(g.sent(), [f]);
    assert_eq!(g.dev.stats().tx_frames, 1);
    assert!(g.wire.lock().unwrap().polls >= 1, "polled after sending");
    // The largest frame goes too, in pieces.
    let big = frame(MAX_FRAME, 9);
    let parts: Vec<&[u8]> = std::iter::once(&h[..])
        .chain(big.chunks(TX_SLOT as usize))
        .collect();
    g.send_parts(&parts);
    assert_eq!(g.sent(), [big]);
}

#[test]
fn a_frame_for_the_guest_gets_a_header_with_one_buffer() {
    let mut g = guest();
    let head = g.add_rx(&[RX_LEN]);
    let f = frame(1514, 1);
    g.push(f.clone());
    let irqs = g.irqs();
    g.dev.process_event(0);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, [(head, (HEADER_LEN + f.len()) as u32)]);
    let (h, got) = g.read_chain(head, &[RX_LEN], used[0].1);
    assert_eq!(h, expected_header());
    assert_eq!(got, f);
    assert!(g.irqs() > irqs);

    // Spread over a chain of pages, as Linux posts them for a big MTU, the header split too.
    let lens = [5, 700, 4096, 4096];
    let head = g.add_rx(&lens);
    let f = frame(5000, 2);
    g.push(f.clone());
    g.dev.process_queue(RX_QUEUE);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, [(head, (HEADER_LEN + f.len()) as u32)]);
    let (h, got) = g.read_chain(head, &lens, used[0].1);
    assert_eq!(h, expected_header());
    assert_eq!(got, f);
    assert_eq!(g.dev.stats().rx_frames, 2);
}

#[test]
fn without_buffers_a_frame_waits_and_goes_out_on_the_rx_kick() {
    // A backend whose descriptor is always readable: a tap with frames waiting.
    let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    evt.write(1).unwrap();
    let mut g = guest_with(
        Fake {
            fd: Some(evt),
            ..Fake::default()
        },
        false,
    );
    let fd = g.dev.event_fds()[0];
    let (a, b, c) = (frame(60, 1), frame(70, 2), frame(80, 3));
    g.push(a.clone());
    g.push(b.clone());
    g.push(c.clone());
    assert!(readable(fd));
    g.dev.process_event(0);
    assert!(g.rx.take_used(&g.mem).is_empty());
    // One frame held, the rest still with the backend, none lost; and the device no longer
    // watches the backend, so the event loop does not spin.
    assert_eq!(g.waiting(), 2);
    assert_eq!(g.dev.stats().rx_dropped, 0);
    assert!(
        !readable(fd),
        "a stalled device must not wake the event loop"
    );
    // The rx kick resumes delivery, in order.
    g.post_rx(1);
    assert_eq!(g.recv(), [a]);
    assert!(!readable(fd));
    g.post_rx(1);
    assert_eq!(g.recv(), [b]);
    // Buffers added without a kick are found once more after notifications are re-enabled.
    g.add_rx(&[RX_LEN]);
    g.add_rx(&[RX_LEN]);
    g.dev.process_event(0);
    assert_eq!(g.recv(), [c]);
    // Nothing held: the backend is watched again.
    assert!(readable(fd));
    assert_eq!(g.dev.stats().rx_frames, 3);
    assert_eq!(g.dev.stats().rx_dropped, 0);
}

#[test]
fn a_frame_too_big_for_the_chain_is_dropped_and_the_next_one_fits() {
    let mut g = guest();
    let head = g.add_rx(&[(HEADER_LEN + 200) as u32]);
    let small = frame(100, 4);
    g.push(frame(500, 3));
    g.push(small.clone());
    g.dev.process_event(0);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, [(head, (HEADER_LEN + 100) as u32)]);
    let (h, got) = g.read_chain(head, &[(HEADER_LEN + 200) as u32], used[0].1);
    assert_eq!((h, got), (expected_header(), small));
    assert_eq!(g.dev.stats().rx_dropped, 1);
    assert_eq!(g.dev.stats().rx_frames, 1);

    // Every frame too big: each is dropped, the buffer kept, and the device moves on.
    let head = g.add_rx(&[(HEADER_LEN + 50) as u32]);
    for i in 0..10 {
        g.push(frame(100, i));
    }
    g.dev.process_event(0);
    assert!(g.rx.take_used(&g.mem).is_empty());
    assert_eq!(g.rx.in_flight(&g.mem), 1);
    assert_eq!(g.waiting(), 0);
    assert_eq!(g.dev.stats().rx_dropped, 11);
    let fits = frame(40, 9);
    g.push(fits.clone());
    g.dev.process_event(0);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, [(head, (HEADER_LEN + 40) as u32)]);
    assert_eq!(
        g.read_chain(head, &[(HEADER_LEN + 50) as u32], used[0].1).1,
        fits
    );
}

#[test]
fn a_flood_of_drops_is_bounded_per_pass_and_resumed_by_a_wake_up() {
    let mut g = guest();
    g.add_rx(&[(HEADER_LEN + 50) as u32]);
    for i in 0..5000 {
        g.push(frame(100, i as u8));
    }
    let fd = g.dev.event_fds()[0];
    assert!(!readable(fd));
    g.dev.process_queue(RX_QUEUE);
    let left = g.waiting();
    assert!(left > 0 && left < 5000, "{left} left");
    // Cut short: the device asks to be called again.
    assert!(readable(fd));
    while readable(fd) {
        g.dev.process_event(0);
    }
    assert_eq!(g.waiting(), 0);
    assert_eq!(g.dev.stats().rx_dropped, 5000);
    assert_eq!(g.rx.in_flight(&g.mem), 1);
}

#[test]
fn what_the_backend_makes_at_poll_reaches_the_guest_in_the_same_pass() {
    let mut g = guest();
    g.wire.lock().unwrap().echo = true;
    g.add_rx(&[RX_LEN]);
    g.add_rx(&[RX_LEN]);
    let f = frame(300, 5);
    g.send(&f);
    assert_eq!(g.recv(), [f]);
    // And frames that appear at a later poll, after the device drained what was there.
    g.wire.lock().unwrap().echo = false;
    let (a, b) = (frame(64, 1), frame(65, 2));
    g.push(a.clone());
    g.wire.lock().unwrap().later.push_back(b.clone());
    g.add_rx(&[RX_LEN]);
    g.add_rx(&[RX_LEN]);
    g.dev.process_queue(RX_QUEUE);
    assert_eq!(g.recv(), [a, b]);
}

#[test]
fn a_hostile_guest_gets_its_chains_back_and_nothing_panics() {
    let mut g = guest();
    let hdr = tx_header();
    let good = frame(60, 1);
    let mut packet = hdr.to_vec();
    packet.extend_from_slice(&good);

    // Transmit: a buffer outside memory, one straddling its end, a huge length.
    g.tx.add(&g.mem, &[(MEM_SIZE as u64 + 0x1000, 100, false)]);
    g.tx.add(&g.mem, &[(MEM_SIZE as u64 - 20, 100, false)]);
    g.tx.add(&g.mem, &[(TX_AREA, u32::MAX, false)]);
    g.tx.add(&g.mem, &[(u64::MAX - 10, 100, false)]);
    // In memory but more than the largest frame.
    g.tx.add(
        &g.mem,
        &[(TX_AREA, (HEADER_LEN + MAX_FRAME + 1) as u32, false)],
    );
    // Five bytes: no full header.
    g.tx.add(&g.mem, &[(TX_AREA, 5, false)]);
    // A header and less than an Ethernet header.
    g.tx.add(&g.mem, &[(TX_AREA, (HEADER_LEN + 13) as u32, false)]);
    // A device-writable buffer ends a transmit chain: 20 bytes of frame are too few.
    g.tx.add(
        &g.mem,
        &[
            (TX_AREA, (HEADER_LEN + 10) as u32, false),
            (TX_AREA, 100, true),
        ],
    );
    let dropped = 8;
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.tx.take_used(&g.mem).len(), dropped);
    assert!(g.sent().is_empty());
    assert_eq!(g.dev.stats().tx_dropped, dropped as u64);

    // Zero-length descriptors are skipped: the frame around them is sent.
    let at = TX_AREA + 0x10_0000;
    g.mem.write_slice(&packet, GuestAddress(at)).unwrap();
    g.tx.add(
        &g.mem,
        &[
            (at, 0, false),
            (at, 7, false),
            (at + 7, 0, false),
            (at + 7, (packet.len() - 7) as u32, false),
        ],
    );
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
    assert_eq!(g.sent(), std::slice::from_ref(&good));

    // A chain that loops (two descriptors naming each other) ends at the queue size.
    let d = g.tx.next_desc;
    g.tx.write_desc(&g.mem, d, Descriptor::new(at, 30, F_NEXT, d + 1));
    g.tx.write_desc(&g.mem, d + 1, Descriptor::new(at, 30, F_NEXT, d));
    g.tx.add_head(&g.mem, d);
    // A chain whose next index is out of the table.
    g.tx.write_desc(&g.mem, d + 2, Descriptor::new(at, 30, F_NEXT, 1000));
    g.tx.add_head(&g.mem, d + 2);
    g.tx.next_desc = d + 3;
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.tx.take_used(&g.mem).len(), 2);
    assert_eq!(g.tx.in_flight(&g.mem), 0);
    let s = g.dev.stats();
    assert_eq!(s.tx_frames + s.tx_dropped, dropped as u64 + 3);

    // An available index far ahead of the ring: the device stops instead of spinning.
    let avail_idx = g.tx.avail_idx.wrapping_add(1000);
    g.mem
        .write_obj(avail_idx, GuestAddress(g.tx.avail + 2))
        .unwrap();
    g.dev.process_queue(TX_QUEUE);

    // Receive: a buffer outside memory, a device-readable buffer, a chain too small for any
    // frame: each handed back empty, the frame kept for the good chain after them.
    let f = frame(100, 6);
    g.push(f.clone());
    g.rx.add(&g.mem, &[(MEM_SIZE as u64 - 8, 100, true)]);
    g.rx.add(&g.mem, &[(RX_AREA, RX_LEN, false)]);
    g.rx.add(&g.mem, &[(RX_AREA, 20, true)]);
    g.rx.add(&g.mem, &[(RX_AREA, 0, true), (RX_AREA, 0, true)]);
    let head = g.add_rx(&[RX_LEN]);
    g.dev.process_queue(RX_QUEUE);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used.len(), 5);
    assert!(used[..4].iter().all(|&(_, len)| len == 0), "{used:?}");
    assert_eq!(used[4], (head, (HEADER_LEN + f.len()) as u32));
    // Device-readable buffers in a receive chain are skipped, not written.
    g.mem
        .write_slice(&[0xee; 16], GuestAddress(TX_AREA))
        .unwrap();
    let d = g.rx.next_desc;
    g.rx.write_desc(&g.mem, d, Descriptor::new(TX_AREA, 16, F_NEXT, d + 1));
    g.rx.write_desc(
        &g.mem,
        d + 1,
        Descriptor::new(RX_AREA + u64::from(d + 1) * SLOT, RX_LEN, F_WRITE, 0),
    );
    g.rx.add_head(&g.mem, d);
    g.rx.next_desc = d + 2;
    g.push(f.clone());
    g.dev.process_queue(RX_QUEUE);
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, [(d, (HEADER_LEN + f.len()) as u32)]);
    let mut untouched = [0u8; 16];
    g.mem
        .read_slice(&mut untouched, GuestAddress(TX_AREA))
        .unwrap();
    assert_eq!(untouched, [0xee; 16]);
    assert_eq!(g.read_chain(d + 1, &[RX_LEN], used[0].1).1, f);
    // An rx available index far ahead: the frame waits, nothing spins.
    let avail_idx = g.rx.avail_idx.wrapping_add(1000);
    g.mem
        .write_obj(avail_idx, GuestAddress(g.rx.avail + 2))
        .unwrap();
    g.push(f);
    g.dev.process_queue(RX_QUEUE);
    g.dev.process_event(0);
}

#[test]
fn interrupts_follow_the_drivers_event_index() {
    let mut g = guest_with(Fake::default(), true);
    // used_event far ahead: no interrupt for the first frame either way.
    g.rx.set_used_event(&g.mem, 100);
    g.tx.set_used_event(&g.mem, 100);
    g.add_rx(&[RX_LEN]);
    g.add_rx(&[RX_LEN]);
    g.push(frame(60, 1));
    g.dev.process_event(0);
    assert_eq!(g.recv().len(), 1);
    g.send(&frame(60, 2));
    assert_eq!(g.irqs(), 0);
    // used_event = 1: the driver wants to hear when the second entry is used.
    g.rx.set_used_event(&g.mem, 1);
    g.push(frame(60, 3));
    g.dev.process_event(0);
    assert_eq!(g.recv().len(), 1);
    assert_eq!(g.irqs(), 1);
    g.tx.set_used_event(&g.mem, 1);
    g.send(&frame(60, 4));
    assert_eq!(g.irqs(), 2);
    // Nothing used: no interrupt.
    g.dev.process_queue(RX_QUEUE);
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.irqs(), 2);

    // Without EVENT_IDX every pass that used a buffer interrupts.
    let mut g = guest();
    g.send(&frame(60, 1));
    assert_eq!(g.irqs(), 1);
    g.dev.process_queue(TX_QUEUE);
    assert_eq!(g.irqs(), 1);
}

#[test]
fn reset_drops_the_held_frame_and_reactivation_works() {
    let mut g = guest();
    g.push(frame(60, 1));
    g.dev.process_event(0);
    assert_eq!(g.waiting(), 0, "held by the device");
    g.dev.reset();
    assert_eq!(g.dev.stats().rx_dropped, 1);
    assert!(g.dev.queue_states().is_empty());
    // While the driver is down, frames are taken and dropped, and kicks do nothing.
    g.push(frame(60, 2));
    g.dev.process_event(0);
    assert_eq!(g.waiting(), 0);
    assert_eq!(g.dev.stats().rx_dropped, 2);
    g.dev.process_queue(TX_QUEUE);

    let (rx, tx, irq) = activate(&mut g.dev, &g.mem, 0x10000, false);
    (g.rx, g.tx, g.irq) = (rx, tx, irq);
    assert_eq!(g.dev.queue_states().len(), 2);
    let f = frame(200, 3);
    g.send(&f);
    assert_eq!(g.sent(), std::slice::from_ref(&f));
    g.push(f.clone());
    g.post_rx(1);
    assert_eq!(g.recv(), [f]);
    assert_eq!(g.irqs(), 2);
}
