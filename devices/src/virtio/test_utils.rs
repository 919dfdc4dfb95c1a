//! Mock guest memory and split queues for testing and fuzzing virtio devices without a VM.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::{GuestMemory, IrqTrigger};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::Interrupt;

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Size of the mock guest memory.
pub const MEM_SIZE: usize = 16 << 20;
/// Where test buffers start (the rings live below).
pub const BUF_BASE: u64 = 0x10_0000;

/// Counts interrupts.
#[derive(Default)]
pub struct CountingIrq(pub AtomicUsize);

impl IrqTrigger for CountingIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// 16 MiB of guest memory at 0.
pub fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mock guest memory")
}

/// A descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Writes `descs` as one chain per head (a descriptor without F_NEXT ends a chain) into a mock
/// queue of `size` entries at address 0, and returns a driver-ready queue.
pub fn queue_with(mem: &GuestMemory, size: u16, descs: &[RawDescriptor]) -> Queue {
    let vq = MockSplitQueue::new(mem, size);
    vq.add_desc_chains(descs, 0)
        .expect("descriptors fit the table");
    vq.create_queue::<Queue>().expect("valid mock queue")
}

/// An interrupt that counts how often it fired.
pub fn interrupt() -> (Arc<Interrupt>, Arc<CountingIrq>) {
    let irq = Arc::new(CountingIrq::default());
    (Arc::new(Interrupt::new(irq.clone())), irq)
}

/// The used ring entry `index` of the used ring at `used_ring`: (descriptor head, length).
pub fn used_entry(mem: &GuestMemory, used_ring: u64, index: u16) -> (u32, u32) {
    let entry = used_ring + 4 + 8 * u64::from(index);
    let id: u32 = mem
        .read_obj(GuestAddress(entry))
        .expect("used ring in memory");
    let len: u32 = mem
        .read_obj(GuestAddress(entry + 4))
        .expect("used ring in memory");
    (id, len)
}

/// The used ring's index (how many entries the device returned).
pub fn used_idx(mem: &GuestMemory, used_ring: u64) -> u16 {
    mem.read_obj(GuestAddress(used_ring + 2))
        .expect("used ring in memory")
}

/// Whether `fd` is readable right now (it would wake an epoll-based event loop).
pub fn readable(fd: RawFd) -> bool {
    let ep = Epoll::new().expect("epoll");
    ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .expect("fd can be watched");
    let mut ev = [EpollEvent::default(); 1];
    ep.wait(0, &mut ev).expect("epoll_wait") > 0
}

/// The driver's side of one split queue: adds chains (ring indices wrap properly) and reads
/// back used entries.
pub struct DriverQueue {
    /// Address of the descriptor table.
    pub desc: u64,
    /// Address of the available ring.
    pub avail: u64,
    /// Address of the used ring.
    pub used: u64,
    /// The queue's size.
    pub size: u16,
    /// The descriptor the next chain starts at.
    pub next_desc: u16,
    /// The available ring's index (chains added so far, wrapping).
    pub avail_idx: u16,
    /// Used entries taken so far (wrapping).
    pub used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its rings from `base`, and the device's view of it.
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> (Self, Queue) {
        let mq = MockSplitQueue::create(mem, GuestAddress(base), size);
        let q = mq.create_queue::<Queue>().expect("valid mock queue");
        let d = DriverQueue {
            desc: mq.desc_table_addr().0,
            avail: mq.avail_addr().0,
            used: mq.used_addr().0,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (d, q)
    }

    /// Adds one chain of `(address, length, device-writable)` buffers; returns its head.
    pub fn add(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            let d = Descriptor::new(addr, len, flags, (idx + 1) % self.size);
            mem.write_obj(d, GuestAddress(self.desc + 16 * u64::from(idx)))
                .expect("descriptor table in memory");
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.add_head(mem, head);
        head
    }

    /// Makes the chain starting at descriptor `head` available (its descriptors written by the
    /// caller).
    pub fn add_head(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot))
            .expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail ring in memory");
    }

    /// Writes descriptor `index` of the table as is (for chains no well-behaved driver makes).
    pub fn write_desc(&self, mem: &GuestMemory, index: u16, d: Descriptor) {
        mem.write_obj(d, GuestAddress(self.desc + 16 * u64::from(index)))
            .expect("descriptor table in memory");
    }

    /// Used entries since the last call: (head, length).
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let idx: u16 = mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("used ring in memory");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("used ring in memory");
            let len: u32 = mem
                .read_obj(GuestAddress(e + 4))
                .expect("used ring in memory");
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Chains the device has not returned yet.
    pub fn in_flight(&self, mem: &GuestMemory) -> u16 {
        let used: u16 = mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("used ring in memory");
        self.avail_idx.wrapping_sub(used)
    }

    /// Sets `used_event` (with EVENT_IDX: the driver wants an interrupt once the used index
    /// passes it).
    pub fn set_used_event(&self, mem: &GuestMemory, value: u16) {
        let addr = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(value, GuestAddress(addr))
            .expect("avail ring in memory");
    }
}
