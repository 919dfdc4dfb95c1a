//! Fuzzes virtio-net queue handling: the input becomes a tx and an rx descriptor table
//! (addresses, lengths, flags and links all attacker-chosen) plus the contents of the guest
//! buffers, so it chooses headers, frames and how they are split. A loopback backend sends
//! every frame the guest transmits back to it, after frames of awkward sizes (a bare Ethernet
//! header up to the largest frame). Any panic, hang or memory error is a bug. Run:
//! `cargo fuzz run net_queue` in this folder.
#![no_main]

use std::collections::VecDeque;

use devices::virtio::net::{Net, NetBackend, MAX_FRAME, RX_QUEUE, TX_QUEUE};
use devices::virtio::test_utils::{desc, interrupt, memory, BUF_BASE, MEM_SIZE};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
const DESC_BYTES: usize = 16;
/// Frames the loopback holds at most; more are dropped, like a full wire.
const LOOPBACK_DEPTH: usize = 64;

#[derive(Default)]
struct Loopback {
    frames: VecDeque<Vec<u8>>,
}

impl NetBackend for Loopback {
    fn send(&mut self, frame: &[u8]) {
        assert!(
            (14..=MAX_FRAME).contains(&frame.len()),
            "frame of {} bytes",
            frame.len()
        );
        if self.frames.len() < LOOPBACK_DEPTH {
            self.frames.push_back(frame.to_vec());
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        let f = self.frames.pop_front()?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Some(n)
    }

    fn poll(&mut self) {}

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([d[i], d[i + 1]])
}

/// Descriptors from the fuzzer's bytes: mostly in-bounds buffers near the data area,
/// sometimes anything at all.
fn table(raw: &[u8]) -> Vec<virtio_queue::desc::RawDescriptor> {
    raw.chunks_exact(DESC_BYTES)
        .map(|d| {
            let raw_addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            let raw_len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let (addr, len) = if d[15] & 0x80 == 0 {
                (BUF_BASE + raw_addr % 0x4_0000, raw_len % 0x2_0000)
            } else {
                (raw_addr % (2 * MEM_SIZE as u64), raw_len)
            };
            let flags = u16_at(d, 12) & 0x7; // NEXT, WRITE, INDIRECT
            let next = u16_at(d, 14) % (QUEUE_SIZE + 4);
            desc(addr, len, flags, next)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [first, second, rest @ ..] = data else {
        return;
    };
    let n_tx = usize::from(first % QUEUE_SIZE as u8) + 1;
    let n_rx = usize::from(second % QUEUE_SIZE as u8) + 1;
    if rest.len() < (n_tx + n_rx) * DESC_BYTES {
        return;
    }
    let (tx_table, rest) = rest.split_at(n_tx * DESC_BYTES);
    let (rx_table, contents) = rest.split_at(n_rx * DESC_BYTES);
    let mem = memory();
    let rx = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    if rx.add_desc_chains(&table(rx_table), 0).is_err() {
        return;
    }
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), QUEUE_SIZE);
    if tx.add_desc_chains(&table(tx_table), 0).is_err() {
        return;
    }
    let _ = mem.write_slice(
        &contents[..contents.len().min(0x4_0000)],
        GuestAddress(BUF_BASE),
    );
    let queues: Result<Vec<Queue>, _> = [&rx, &tx]
        .iter()
        .map(|q| q.create_queue::<Queue>())
        .collect();
    let Ok(queues) = queues else { return };

    let mut backend = Loopback::default();
    for len in [14, 60, 1514, 9000, MAX_FRAME] {
        if first & 0x80 != 0 || len <= 1514 {
            backend.frames.push_back(vec![0x5a; len]);
        }
    }
    let mut dev = Net::new([0x52, 0x54, 0, 0, 0, 1], 1500, Box::new(backend));
    dev.ack_features(dev.features());
    let (irq, _) = interrupt();
    if devices::virtio::activate_checked(&mut dev, mem.clone(), queues, irq).is_err() {
        return;
    }
    dev.process_queue(TX_QUEUE);
    dev.process_queue(RX_QUEUE);
    dev.process_event(0);
    let s = dev.stats();
    assert!(s.tx_frames + s.tx_dropped <= u64::from(QUEUE_SIZE) * 2);
    dev.reset();
    dev.process_event(0);
});
