//! The virtio-vsock device model: queues, features, config space; the host side is the muxer's.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_core::GuestMemory;

use super::muxer::Muxer;
use super::packet::{read_packet, HEADER_LEN};
use super::{EVENT_QUEUE, HOST_CID, MAX_PAYLOAD, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::chain::chain_buffers;
use crate::virtio::{device_type, features, ActivateError, DeviceState, Interrupt, VirtioDevice};

/// Event ID of a transport reset (virtio 1.2, 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// How long after the driver re-read the CID held rx traffic waits for the event queue's
/// refill kick before it goes out anyway (for a driver that never refills its event buffer).
const RESET_FALLBACK: Duration = Duration::from_millis(250);

/// How far the driver is in handling a TRANSPORT_RESET. Linux re-reads the CID, resets every
/// connected socket, then refills the event buffer and kicks the event queue. A connection
/// delivered before that kick may be accepted and then reset along with the snapshot's
/// sockets, so the rx queue is held until the kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetProgress {
    /// No reset in flight.
    Done,
    /// The event was delivered; the driver has not re-read the CID yet.
    Delivered,
    /// The driver re-read the CID and is resetting its sockets; rx goes out at the kick, or at
    /// `fallback_at`.
    CidRead { fallback_at: Instant },
}

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0, 1, 2, `u32::MAX`) or does not fit in 32 bits.
    #[error("guest CID {0} is reserved or out of range")]
    InvalidCid(u64),
    /// The host-side Unix socket could not be bound (or a stale one removed).
    #[error("cannot bind vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The device's epoll or timer could not be created.
    #[error("cannot create vsock event sources: {0}")]
    EventSource(#[source] std::io::Error),
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The vsock device's own state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The local port the next host connection tries first: a restored device goes on from
    /// there and never reuses a port the snapshot's guest may still hold a socket for.
    pub next_local_port: u32,
}

/// A virtio-vsock device whose host side is a Unix socket (see the [module docs](super)).
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// Where the driver is with a TRANSPORT_RESET; nothing goes to the rx queue until it is done.
    reset: ResetProgress,
    /// Scratch: a chain's buffers, and a tx payload.
    bufs: Vec<(GuestAddress, u32)>,
    payload: Vec<u8>,
}

/// Asks the driver to kick `q` when it next adds a buffer. With EVENT_IDX, virtio-queue's
/// `enable_notification` arms avail_event at the next entry the device has not taken, which
/// for a queue the driver keeps stocked ahead (event buffers) is already behind it: no kick
/// would come. So avail_event is set to the driver's current index here.
fn kick_on_next_add(q: &mut Queue, mem: &GuestMemory) {
    if !q.event_idx_enabled() {
        let _ = q.enable_notification(mem);
        return;
    }
    let Ok(idx) = q.avail_idx(mem, Ordering::Acquire) else {
        return;
    };
    // avail_event: the u16 after the used ring's `size` elements (virtio 1.2, 2.7.8).
    let avail_event = GuestAddress(q.used_ring()).checked_add(4 + 8 * u64::from(q.size()));
    if let Some(addr) = avail_event {
        let _ = mem.store(idx.0.to_le(), addr, Ordering::Release);
    }
    // The driver may have added one just now and seen the old value.
    std::sync::atomic::fence(Ordering::SeqCst);
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host connections at `uds_path`
    /// (a stale socket file there is removed first). Guest connections to host port `P` go to
    /// `<uds_path>_P`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            acked_features: 0,
            muxer: Muxer::new(guest_cid, &uds_path)?,
            active: None,
            reset: ResetProgress::Done,
            bufs: Vec::new(),
            payload: Vec::with_capacity(MAX_PAYLOAD),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Drops every connection and tells the guest with a TRANSPORT_RESET event, after which its
    /// driver re-reads the CID and resets its sockets (for snapshot restore). Returns whether
    /// the event was delivered (the device is active and the driver gave an event buffer).
    pub fn send_transport_reset(&mut self) -> bool {
        self.muxer.reset();
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let q = &mut a.queues[EVENT_QUEUE];
        let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
            return false;
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let ok = chain_buffers(&a.mem, chain, true, &mut self.bufs).is_some()
            && super::packet::write_at(&a.mem, &self.bufs, 0, &event).is_ok();
        let len = if ok { event.len() as u32 } else { 0 };
        // The driver's refill of this buffer is the sign that it is done: ask for that kick.
        kick_on_next_add(q, &a.mem);
        if q.add_used(&a.mem, head, len).is_err() {
            return false;
        }
        if q.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
        self.reset = if ok {
            ResetProgress::Delivered
        } else {
            ResetProgress::Done
        };
        ok
    }

    /// Parses and handles what the guest transmitted; returns whether the used ring changed.
    fn transmit(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let (bufs, payload, muxer) = (&mut self.bufs, &mut self.payload, &mut self.muxer);
        crate::virtio::queue::drain(&mut a.queues[TX_QUEUE], &a.mem, |chain| {
            let mem = chain.memory();
            if chain_buffers(mem, chain.clone(), false, bufs).is_some() {
                match read_packet(mem, bufs, payload) {
                    Ok(h) => muxer.handle_tx(&h, payload),
                    Err(e) => {
                        if let Some(h) = e.header() {
                            muxer.reject(h);
                        }
                    }
                }
            }
            // A chain with a buffer outside guest memory has no header we can trust: it is
            // returned unanswered, like a short one.
            0
        })
    }

    /// Moves what waits for the guest into its rx buffers; returns whether to interrupt.
    fn receive(&mut self) -> bool {
        match self.reset {
            ResetProgress::Done => {}
            ResetProgress::CidRead { fallback_at } if Instant::now() >= fallback_at => {
                self.reset = ResetProgress::Done;
            }
            ResetProgress::Delivered | ResetProgress::CidRead { .. } => return false,
        }
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let q = &mut a.queues[RX_QUEUE];
        let mut used = false;
        while self.muxer.has_rx() {
            let chain = match q.pop_descriptor_chain(&a.mem) {
                Some(c) => Some(c),
                // Out of buffers: ask for a kick when the driver adds some, and look once more
                // in case it just did (only once: a broken ring must not make us spin).
                None => match q.enable_notification(&a.mem) {
                    Ok(true) => q.pop_descriptor_chain(&a.mem),
                    _ => None,
                },
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let len = if chain_buffers(&a.mem, chain, true, &mut self.bufs).is_some()
                && super::packet::total_len(&self.bufs) >= HEADER_LEN as u64
            {
                match self.muxer.fill_rx(&a.mem, &self.bufs) {
                    Some(len) => len,
                    None => {
                        // Nothing after all (e.g. a read would block): keep the buffer.
                        q.go_to_previous_position();
                        break;
                    }
                }
            } else {
                // Unusable buffer: hand it back empty.
                0
            };
            if q.add_used(&a.mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used && q.needs_notification(&a.mem).unwrap_or(true)
    }

    fn notify(&self, needed: bool) {
        if let (true, Some(a)) = (needed, &self.active) {
            a.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
        if self.reset == ResetProgress::Delivered {
            // The driver handles the reset; its sockets are reset next, then it kicks.
            let fallback_at = Instant::now() + RESET_FALLBACK;
            self.reset = ResetProgress::CidRead { fallback_at };
            self.muxer.wake_at(fallback_at);
        }
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
        // Host connections that arrived before the driver was ready.
        let rx = self.receive();
        self.notify(rx);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let needed = match index {
            // New rx buffers: resume what was stalled on them.
            RX_QUEUE => self.receive(),
            // Answers (RESPONSE, RST, credit) go out in the same pass.
            TX_QUEUE => self.transmit() | self.receive(),
            // Event buffers stay with us until there is an event; a kick after a reset means
            // the driver has reset its sockets: deliver what waited for that.
            _ if self.reset != ResetProgress::Done => {
                self.reset = ResetProgress::Done;
                self.receive()
            }
            _ => false,
        };
        // Connections the guest closed make room for host connections waiting to be accepted.
        self.muxer.refresh_listener();
        self.notify(needed);
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn save_device_state(&self) -> DeviceState {
        DeviceState::Vsock(VsockState {
            next_local_port: self.muxer.next_local_port(),
        })
    }

    fn load_device_state(&mut self, state: &DeviceState) -> Result<(), String> {
        match state {
            DeviceState::Vsock(s) => {
                self.muxer.continue_local_ports_from(s.next_local_port);
                Ok(())
            }
            other => Err(format!("a vsock device cannot take {other:?}")),
        }
    }

    fn restored(&mut self) {
        // Connections of the snapshot's VM are gone: the guest must drop its sockets.
        self.send_transport_reset();
    }
    fn reset(&mut self) {
        self.muxer.reset();
        self.reset = ResetProgress::Done;
        self.active = None;
        self.acked_features = 0;
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.epoll_fd()]
    }

    fn process_event(&mut self, _index: usize) {
        self.muxer.process_host_events();
        let rx = self.receive();
        self.notify(rx);
    }
}

#[cfg(test)]
impl Vsock {
    pub(super) fn muxer(&mut self) -> &mut Muxer {
        &mut self.muxer
    }
}
