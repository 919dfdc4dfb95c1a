//! Draining a queue: the loop every device runs when its driver kicks it, written once.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_core::GuestMemory;

/// Pops every chain the driver made available and hands it to `handle`, which returns how
/// many bytes it wrote into the chain (the used ring's length). Kicks are suppressed while it
/// drains; after re-enabling them it drains again if the driver added chains meanwhile. A
/// broken ring (more "available" while nothing can be popped, or a used ring it cannot write)
/// ends the drain instead of spinning on it. Returns whether the driver wants an interrupt
/// (something was used and the driver did not suppress notifications).
pub fn drain(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: impl FnMut(DescriptorChain<&GuestMemory>) -> u32,
) -> bool {
    let mut used = false;
    'rounds: loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            progressed = true;
            let head = chain.head_index();
            let len = handle(chain);
            if queue.add_used(mem, head, len).is_err() {
                break 'rounds;
            }
            used = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) if progressed => continue,
            _ => break,
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, memory, queue_with, used_idx, BUF_BASE};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn every_available_chain_is_handled_and_used_once() {
        let mem = memory();
        let descs: Vec<_> = (0..5u64)
            .map(|i| desc(BUF_BASE + i * 0x100, 64, 0, 0))
            .collect();
        let mut q = queue_with(&mem, 16, &descs);
        let mut seen = 0;
        let notify = drain(&mut q, &mem, |_| {
            seen += 1;
            7
        });
        assert_eq!(seen, 5);
        assert!(notify);
        assert_eq!(used_idx(&mem, q.used_ring()), 5);
        // Nothing left: a second drain handles nothing and asks for no interrupt.
        assert!(!drain(&mut q, &mem, |_| panic!("drained twice")));
    }

    #[test]
    fn a_ring_claiming_more_than_it_has_ends_the_drain() {
        let mem = memory();
        let mut q = queue_with(&mem, 16, &[desc(BUF_BASE, 64, 0, 0)]);
        // The driver's avail.idx far ahead of the ring's 16 entries.
        mem.write_obj(0x8000u16, GuestAddress(q.avail_ring() + 2))
            .unwrap();
        let mut handled = 0;
        let _ = drain(&mut q, &mem, |_| {
            handled += 1;
            0
        });
        assert!(handled <= 16, "handled {handled} chains from a ring of 16");
    }
}
