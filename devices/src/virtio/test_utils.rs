//! Mock guest memory and split queues for testing and fuzzing virtio devices without a VM.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::{GuestMemory, IrqTrigger};

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
