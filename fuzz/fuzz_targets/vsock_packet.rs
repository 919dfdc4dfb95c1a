//! Fuzzes virtio-vsock transmit handling: the input becomes a tx descriptor table (addresses,
//! lengths, flags and links all attacker-chosen) plus the contents of the guest buffers, so it
//! chooses packet headers, payloads and how they are split. The device parses and acts on every
//! packet (connecting to a host listener on port 1, resetting, answering into well-formed rx
//! buffers), then services its host side. Any panic, hang or memory error is a bug. Run:
//! `cargo fuzz run vsock_packet` in this folder.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::test_utils::{desc, interrupt, memory, BUF_BASE, F_WRITE, MEM_SIZE};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
const DESC_BYTES: usize = 16;
const GUEST_CID: u64 = 3;
const RX_BUFFERS: u64 = 0xc0_0000;

struct Host {
    uds: PathBuf,
    listener: UnixListener,
}

/// The device's socket path, and a host service on port 1 for guest connections to reach.
fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vsock-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let uds = dir.join("v.sock");
        let service = dir.join("v.sock_1");
        let _ = std::fs::remove_file(&service);
        let listener = UnixListener::bind(&service).expect("fuzz host listener");
        listener.set_nonblocking(true).expect("non-blocking listener");
        Host { uds, listener }
    })
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([d[i], d[i + 1]])
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let n = usize::from(first % QUEUE_SIZE as u8) + 1;
    if rest.len() < n * DESC_BYTES {
        return;
    }
    let (table, contents) = rest.split_at(n * DESC_BYTES);
    let mem = memory();
    let mut descs = Vec::with_capacity(n);
    for d in table.chunks_exact(DESC_BYTES) {
        let raw_addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
        let raw_len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
        // Mostly in-bounds buffers near the data area, sometimes anything at all.
        let (addr, len) = if d[15] & 0x80 == 0 {
            (BUF_BASE + raw_addr % 0x4_0000, raw_len % 0x2_0000)
        } else {
            (raw_addr % (2 * MEM_SIZE as u64), raw_len)
        };
        let flags = u16_at(d, 12) & 0x7; // NEXT, WRITE, INDIRECT
        let next = u16_at(d, 14) % (QUEUE_SIZE + 4);
        descs.push(desc(addr, len, flags, next));
    }
    let tx = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    if tx.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let _ = mem.write_slice(&contents[..contents.len().min(0x4_0000)], GuestAddress(BUF_BASE));
    // Well-formed rx buffers (header + 4 KiB) for the device's answers, and one event buffer.
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x4000), QUEUE_SIZE);
    let rx_descs: Vec<_> =
        (0..8).map(|i| desc(RX_BUFFERS + i * 0x2000, 44 + 4096, F_WRITE, 0)).collect();
    if rx.add_desc_chains(&rx_descs, 0).is_err() {
        return;
    }
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE);
    if ev.add_desc_chains(&[desc(RX_BUFFERS - 0x1000, 8, F_WRITE, 0)], 0).is_err() {
        return;
    }
    let queues: Result<Vec<Queue>, _> =
        [&rx, &tx, &ev].iter().map(|q| q.create_queue::<Queue>()).collect();
    let Ok(queues) = queues else { return };

    let host = host();
    let Ok(mut dev) = Vsock::new(GUEST_CID, host.uds.clone()) else { return };
    dev.ack_features(dev.features());
    let (irq, _) = interrupt();
    if devices::virtio::activate_checked(&mut dev, mem.clone(), queues, irq).is_err() {
        return;
    }
    // Queue order: rx 0, tx 1, event 2.
    dev.process_queue(1);
    dev.process_event(0);
    dev.process_queue(0);
    dev.process_queue(2);
    if first & 0x80 != 0 {
        dev.send_transport_reset();
    }
    dev.reset();
    // Keep the service's backlog empty for the next input.
    while host.listener.accept().is_ok() {}
});
