//! virtio-console with one port (no multiport): the guest sees `/dev/hvcN`. What the guest
//! writes goes to a host writer; host input queued with [`ConsoleInput`] is delivered into the
//! guest's receive buffers as they become available.
//!
//! supermachine uses one console per stream (workload stdin+stdout, stderr, control), so
//! streams stay separate and byte-exact, independent of the kernel's serial log.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};
use vmm_core::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{device_type, features, ActivateError, Interrupt, VirtioDevice};

const RECEIVE_QUEUE: usize = 0;
const TRANSMIT_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// The most guest output copied at once.
const TRANSMIT_CHUNK: usize = 64 << 10;
/// Host input buffered for the guest before [`ConsoleInput::push`] starts refusing.
pub const MAX_PENDING_INPUT: usize = 4 << 20;

/// The host side of a console's input: queue bytes, and the event loop delivers them.
#[derive(Clone)]
pub struct ConsoleInput {
    pending: Arc<Mutex<VecDeque<u8>>>,
    ready: Arc<EventFd>,
}

impl ConsoleInput {
    /// Queues `bytes`; returns how many were taken (fewer when the buffer is full).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = bytes.len().min(MAX_PENDING_INPUT.saturating_sub(p.len()));
        p.extend(&bytes[..n]);
        drop(p);
        if n > 0 {
            let _ = self.ready.write(1);
        }
        n
    }

    /// Bytes waiting for guest buffers.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// A single-port virtio-console.
pub struct Console {
    out: Box<dyn Write + Send>,
    input: ConsoleInput,
    active: Option<Active>,
    /// Guest output passes through here on its way to `out`.
    scratch: Box<[u8]>,
}

impl Console {
    /// A console writing guest output to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        Ok(Console {
            out,
            input: ConsoleInput {
                pending: Arc::new(Mutex::new(VecDeque::new())),
                ready: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            },
            active: None,
            scratch: vec![0u8; TRANSMIT_CHUNK].into_boxed_slice(),
        })
    }

    /// The handle host input goes through.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }

    /// The eventfd that signals queued input (for the event loop).
    pub fn input_event(&self) -> RawFd {
        self.input.ready.as_raw_fd()
    }

    /// Moves queued host input into the guest's receive buffers.
    pub fn deliver_input(&mut self) {
        let _ = self.input.ready.read();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut pending = self.input.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = false;
        let q = &mut a.queues[RECEIVE_QUEUE];
        while !pending.is_empty() {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                if pending.is_empty() {
                    break;
                }
                let n = (desc.len() as usize).min(pending.len());
                let (front, back) = pending.as_slices();
                let bytes: Vec<u8> = front.iter().chain(back).take(n).copied().collect();
                if a.mem.write_slice(&bytes, desc.addr()).is_err() {
                    break;
                }
                pending.drain(..n);
                written += n as u32;
            }
            if q.add_used(&a.mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if used && q.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }

    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let (scratch, out) = (&mut self.scratch, &mut self.out);
        let notify = crate::virtio::queue::drain(&mut a.queues[TRANSMIT_QUEUE], &a.mem, |chain| {
            let mem = chain.memory();
            for desc in chain.clone().readable() {
                // In pieces through one buffer: the guest's length (up to 4 GiB) never sizes a
                // host allocation. From the first piece outside guest memory on, the buffer is
                // skipped: the guest only hurts its own output.
                let len = u64::from(desc.len());
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(TRANSMIT_CHUNK as u64) as usize;
                    let Some(at) = desc.addr().checked_add(done) else {
                        break;
                    };
                    if mem.read_slice(&mut scratch[..n], at).is_err() {
                        break;
                    }
                    let _ = out.write_all(&scratch[..n]);
                    done += n as u64;
                }
            }
            0
        });
        let _ = self.out.flush();
        if notify {
            a.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: all zero (no size, one port).
        crate::virtio::read_config_bytes(&[0u8; 12], offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Input that arrived before the driver was ready.
        self.deliver_input();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RECEIVE_QUEUE => self.deliver_input(),
            TRANSMIT_QUEUE => self.transmit(),
            _ => {}
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }
    fn reset(&mut self) {
        self.active = None;
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.input_event()]
    }

    fn process_event(&mut self, _index: usize) {
        self.deliver_input();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use crate::test_support::SharedBuffer as Sink;

    /// A console writing to a fresh sink, `input` queued, activated over `rx` and `tx`.
    fn active_console(
        mem: &GuestMemory,
        rx: &MockSplitQueue<'_, GuestMemory>,
        tx: &MockSplitQueue<'_, GuestMemory>,
        input: &[u8],
    ) -> (Console, Sink, Arc<CountingIrq>) {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone())).unwrap();
        assert_eq!(c.input().push(input), input.len());
        let (irq, count) = interrupt();
        c.activate(
            mem.clone(),
            vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            irq,
        )
        .unwrap();
        (c, sink, count)
    }

    #[test]
    fn guest_output_reaches_the_writer_and_host_input_the_guest() {
        let mem = memory();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        // Two receive buffers of 4 bytes; one transmit chain of two buffers.
        rx.add_desc_chains(
            &[
                desc(BUF_BASE, 4, F_WRITE, 0),
                desc(BUF_BASE + 0x100, 4, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        mem.write_slice(b"hello, ", GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        mem.write_slice(b"host\n", GuestAddress(BUF_BASE + 0x2000))
            .unwrap();
        // An unreadable buffer in the middle is skipped, not a crash.
        tx.add_desc_chains(
            &[
                desc(BUF_BASE + 0x1000, 7, F_NEXT, 1),
                desc(u64::MAX - 8, 4, F_NEXT, 2),
                desc(BUF_BASE + 0x2000, 5, 0, 0),
            ],
            0,
        )
        .unwrap();
        let (mut c, sink, count) = active_console(&mem, &rx, &tx, b"abcdefghij");
        let input = c.input();
        c.process_queue(TRANSMIT_QUEUE);
        assert_eq!(&*sink.0.lock().unwrap(), b"hello, host\n");
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(BUF_BASE)).unwrap();
        assert_eq!(&got, b"abcd");
        mem.read_slice(&mut got, GuestAddress(BUF_BASE + 0x100))
            .unwrap();
        assert_eq!(&got, b"efgh");
        // Two bytes wait for more guest buffers.
        assert_eq!(input.pending(), 2);
        assert!(count.0.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }

    #[test]
    fn long_and_oversized_output_buffers_pass_in_pieces() {
        let mem = memory();
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        // 200 KiB spanning several pieces, then a buffer claiming 4 GiB that runs off the
        // end of guest memory after its first bytes.
        let long: Vec<u8> = (0..200 << 10).map(|i: u32| (i % 251) as u8).collect();
        mem.write_slice(&long, GuestAddress(BUF_BASE)).unwrap();
        let tail = MEM_SIZE as u64 - 10;
        mem.write_slice(b"0123456789", GuestAddress(tail)).unwrap();
        tx.add_desc_chains(
            &[
                desc(BUF_BASE, long.len() as u32, F_NEXT, 1),
                desc(tail, u32::MAX, 0, 0),
            ],
            0,
        )
        .unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let (mut c, sink, _) = active_console(&mem, &rx, &tx, b"");
        c.process_queue(TRANSMIT_QUEUE);
        let out = sink.0.lock().unwrap();
        assert_eq!(
            out.len(),
            long.len(),
            "a buffer running off guest memory is skipped from that piece on"
        );
        assert_eq!(&out[..], &long[..]);
    }
}
