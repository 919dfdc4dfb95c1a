//! Fuzzes virtio-blk request handling: the input becomes a descriptor table (addresses, lengths,
//! flags and links all attacker-chosen) plus the contents of the guest buffers, and the device
//! processes the queue on mock guest memory backed by a real file. Any panic, hang or memory
//! error is a bug. Run: `cargo xtask fuzz` (or `cargo fuzz run blk_request` in this folder).
#![no_main]

use std::sync::OnceLock;

use devices::virtio::block::Block;
use devices::virtio::test_utils::{desc, interrupt, memory, BUF_BASE, MEM_SIZE};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
const DESC_BYTES: usize = 16;

fn disk() -> &'static std::path::Path {
    static DISK: OnceLock<std::path::PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("blk-fuzz-{}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 * 512]).expect("fuzz disk");
        p
    })
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([d[i], d[i + 1]])
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let n = usize::from(first % QUEUE_SIZE as u8) + 1;
    let read_only = first & 0x80 != 0;
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
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    if vq.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let Ok(queue) = vq.create_queue::<Queue>() else { return };
    let _ = mem.write_slice(&contents[..contents.len().min(0x4_0000)], GuestAddress(BUF_BASE));
    let Ok(mut blk) = Block::open(disk(), read_only) else { return };
    blk.ack_features(blk.features());
    let (irq, _) = interrupt();
    if devices::virtio::activate_checked(&mut blk, mem.clone(), vec![queue], irq).is_ok() {
        blk.process_queue(0);
    }
});
