//! The virtio-net device model: queues, features, config space; the frames are the backend's.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_core::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::{
    features as net_features, NetBackend, CONFIG_LEN, ETH_HEADER_LEN, HEADER_LEN, LINK_UP,
    MAX_FRAME, MIN_MTU, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::virtio::chain::{chain_buffers, read_at, total_len, write_at};
use crate::virtio::{device_type, features, ActivateError, Interrupt, VirtioDevice};

/// Rounds of "deliver what the backend has, then let it work" per receive pass.
const RX_ROUNDS: usize = 4;
/// Steps (a frame taken from the backend or a chain from the guest) per receive round. A pass
/// that runs out of rounds or steps with work left asks the event loop to call it again.
const RX_STEPS_PER_ROUND: usize = 2 * QUEUE_SIZE as usize;
/// Frames sent between polls of the backend while the guest keeps transmitting.
const TX_POLL_BATCH: usize = 64;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Epoll tokens of the watcher's two sources.
const TOKEN_BACKEND: u64 = 0;
const TOKEN_WAKE: u64 = 1;

/// Counters of what the device moved and dropped since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the guest transmitted that went to the backend.
    pub tx_frames: u64,
    /// Frames for the guest that were dropped: bigger than the guest's receive chain, shorter
    /// than an Ethernet header, taken from the backend while the driver was not running, or
    /// held when the device was reset.
    pub rx_dropped: u64,
    /// Transmit chains that carried no frame to send: a buffer outside guest memory, shorter
    /// than the header plus an Ethernet header, or more than [`MAX_FRAME`] bytes of frame.
    pub tx_dropped: u64,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The one descriptor the event loop watches: an epoll holding the backend's descriptor while
/// the device can take frames, and an eventfd the device signals when it stopped at a bound
/// with work left. A level-triggered backend descriptor (a tap with frames waiting) cannot be
/// masked in the event loop; here it leaves the epoll while the guest has no receive buffers,
/// so the loop does not spin on it.
struct Watcher {
    epoll: Epoll,
    wake: EventFd,
    backend: Option<RawFd>,
    /// Whether `backend` is in the epoll.
    armed: bool,
}

impl Watcher {
    fn new(backend: Option<RawFd>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        let mut w = Watcher {
            epoll,
            wake,
            backend,
            armed: false,
        };
        w.arm(true);
        Ok(w)
    }

    /// Puts the backend's descriptor in (`on`) or out of the epoll.
    fn arm(&mut self, on: bool) {
        let Some(fd) = self.backend else {
            return;
        };
        if self.armed == on {
            return;
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        if self
            .epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, TOKEN_BACKEND))
            .is_ok()
        {
            self.armed = on;
        }
    }

    /// Takes a wake-up, and drops a backend descriptor in error for good (a tap whose
    /// interface was deleted reports an error forever: watching it would spin).
    fn service(&mut self) {
        let _ = self.wake.read();
        let mut events = [EpollEvent::default(); 2];
        let Ok(n) = self.epoll.wait(0, &mut events) else {
            return;
        };
        let failed = events[..n].iter().any(|e| {
            e.data() == TOKEN_BACKEND
                && e.event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
        });
        if failed {
            self.arm(false);
            self.backend = None;
        }
    }

    /// Makes the epoll readable until the next [`service`](Self::service).
    fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// How a receive round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// The backend had no more frames.
    Dry,
    /// A frame waits and the guest has no buffer for it (or its ring is broken).
    Stalled,
    /// The round used all its steps.
    Budget,
}

/// A virtio-net device moving Ethernet frames between the guest and a [`NetBackend`] (see
/// the [module docs](super)).
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    backend: Box<dyn NetBackend>,
    /// What the event loop watches; `None` only if its epoll could not be made, and then the
    /// backend's descriptor is watched directly.
    watcher: Option<Watcher>,
    acked_features: u64,
    active: Option<Active>,
    stats: NetStats,
    /// Scratch: a chain's buffers.
    bufs: Vec<(GuestAddress, u32)>,
    /// The frame for the guest, valid while `pending` holds its length.
    rx_frame: Box<[u8]>,
    pending: Option<usize>,
    /// Scratch: a frame from the guest.
    tx_frame: Box<[u8]>,
}

/// Reads the frame of a transmit chain (after its header) into `out`; returns its length, or
/// `None` if the chain is unusable or the frame too short or too long.
fn read_frame(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    bufs: &mut Vec<(GuestAddress, u32)>,
    out: &mut [u8],
) -> Option<usize> {
    chain_buffers(mem, chain, false, bufs)?;
    let len = total_len(bufs).checked_sub(HEADER_LEN as u64)?;
    if len < ETH_HEADER_LEN as u64 || len > out.len() as u64 {
        return None;
    }
    let len = len as usize;
    read_at(mem, bufs, HEADER_LEN as u64, &mut out[..len]).ok()?;
    Some(len)
}

/// Writes the header (no offloads, one buffer) and `frame` into a receive chain's buffers.
fn write_frame(mem: &GuestMemory, bufs: &[(GuestAddress, u32)], frame: &[u8]) -> Option<()> {
    let mut header = [0u8; HEADER_LEN];
    header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
    write_at(mem, bufs, 0, &header).ok()?;
    write_at(mem, bufs, HEADER_LEN as u64, frame).ok()
}

impl Net {
    /// A device with MAC address `mac` and MTU `mtu` (raised to [`MIN_MTU`] if lower) whose
    /// frames go to and come from `backend`.
    pub fn new(mac: [u8; 6], mtu: u16, backend: Box<dyn NetBackend>) -> Net {
        // Without the epoll (out of descriptors), the backend's descriptor is watched directly:
        // the device works, but a stalled receive ring can make the event loop spin.
        let watcher = Watcher::new(backend.event_fd()).ok();
        Net {
            mac,
            mtu: mtu.max(MIN_MTU),
            backend,
            watcher,
            acked_features: 0,
            active: None,
            stats: NetStats::default(),
            bufs: Vec::new(),
            rx_frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
            pending: None,
            tx_frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU the guest is told.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// What the device moved and dropped so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        // max_virtqueue_pairs
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Sends what the guest transmitted to the backend; returns whether to interrupt.
    fn transmit(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mut unpolled = 0usize;
        let (backend, stats, bufs, tx_frame) = (
            &mut self.backend,
            &mut self.stats,
            &mut self.bufs,
            &mut self.tx_frame,
        );
        let notify = crate::virtio::queue::drain(&mut a.queues[TX_QUEUE], &a.mem, |chain| {
            match read_frame(chain.memory(), chain.clone(), bufs, tx_frame) {
                Some(len) => {
                    backend.send(&tx_frame[..len]);
                    stats.tx_frames += 1;
                    unpolled += 1;
                    if unpolled == TX_POLL_BATCH {
                        backend.poll();
                        unpolled = 0;
                    }
                }
                None => stats.tx_dropped += 1,
            }
            0
        });
        if unpolled > 0 {
            self.backend.poll();
        }
        notify
    }

    /// Moves frames from the backend into the guest's receive buffers, letting the backend
    /// work between rounds; returns whether to interrupt.
    fn receive(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let q = &mut a.queues[RX_QUEUE];
        let mut used = false;
        // Whether the pass ended at a bound rather than for want of frames or buffers.
        let mut cut_short = true;
        for _ in 0..RX_ROUNDS {
            let mut taken = 0usize;
            let mut steps = 0usize;
            let outcome = loop {
                if steps == RX_STEPS_PER_ROUND {
                    break Round::Budget;
                }
                steps += 1;
                let len = match self.pending {
                    Some(len) => len,
                    None => match self.backend.recv(&mut self.rx_frame) {
                        None => break Round::Dry,
                        Some(n) => {
                            taken += 1;
                            if !(ETH_HEADER_LEN..=MAX_FRAME).contains(&n) {
                                self.stats.rx_dropped += 1;
                                continue;
                            }
                            self.pending = Some(n);
                            n
                        }
                    },
                };
                let chain = match q.pop_descriptor_chain(&a.mem) {
                    Some(c) => Some(c),
                    // Out of buffers: ask for a kick when the driver adds some, and look once
                    // more in case it just did (only once: a broken ring must not make us spin).
                    None => match q.enable_notification(&a.mem) {
                        Ok(true) => q.pop_descriptor_chain(&a.mem),
                        _ => None,
                    },
                };
                let Some(chain) = chain else {
                    break Round::Stalled;
                };
                let head = chain.head_index();
                let room = match chain_buffers(&a.mem, chain, true, &mut self.bufs) {
                    Some(()) => total_len(&self.bufs),
                    None => 0,
                };
                let used_len = if room < (HEADER_LEN + ETH_HEADER_LEN) as u64 {
                    // Unusable (outside memory, or too small for any frame): handed back
                    // empty; the frame waits for the next chain.
                    0
                } else if room < (HEADER_LEN + len) as u64 {
                    // Too small for this frame: the frame is dropped and the chain kept for
                    // the next one. Each time a frame is consumed, so this ends.
                    self.pending = None;
                    self.stats.rx_dropped += 1;
                    q.go_to_previous_position();
                    continue;
                } else if write_frame(&a.mem, &self.bufs, &self.rx_frame[..len]).is_some() {
                    self.pending = None;
                    self.stats.rx_frames += 1;
                    (HEADER_LEN + len) as u32
                } else {
                    0
                };
                if q.add_used(&a.mem, head, used_len).is_err() {
                    break Round::Stalled;
                }
                used = true;
            };
            if taken > 0 {
                self.backend.poll();
            }
            if outcome == Round::Stalled || (outcome == Round::Dry && taken == 0) {
                cut_short = false;
                break;
            }
        }
        if let Some(w) = self.watcher.as_mut() {
            // A held frame waits for the rx kick; until then the backend is not watched.
            w.arm(self.pending.is_none());
            if cut_short {
                w.wake();
            }
        }
        used && q.needs_notification(&a.mem).unwrap_or(true)
    }

    /// Frames for a guest whose driver is not running go nowhere, as on a wire with the link
    /// down (and the backend's descriptor stops being readable).
    fn discard(&mut self) {
        let mut taken = 0usize;
        while taken < RX_STEPS_PER_ROUND && self.backend.recv(&mut self.rx_frame).is_some() {
            taken += 1;
        }
        self.stats.rx_dropped += taken as u64;
        if taken > 0 {
            self.backend.poll();
        }
        if let (true, Some(w)) = (taken == RX_STEPS_PER_ROUND, &self.watcher) {
            w.wake();
        }
    }

    fn notify(&self, needed: bool) {
        if let (true, Some(a)) = (needed, &self.active) {
            a.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | net_features::MAC
            | net_features::MTU
            | net_features::STATUS
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config(), offset, data);
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
        let rx = self.receive();
        self.notify(rx);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let needed = match index {
            // New receive buffers: resume what was stalled on them.
            RX_QUEUE => self.receive(),
            // Answers to what was sent go out in the same pass.
            TX_QUEUE => self.transmit() | self.receive(),
            _ => false,
        };
        self.notify(needed);
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        if self.pending.take().is_some() {
            self.stats.rx_dropped += 1;
        }
        if let Some(w) = self.watcher.as_mut() {
            w.arm(true);
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        match &self.watcher {
            Some(w) => vec![w.epoll.as_raw_fd()],
            None => self.backend.event_fd().into_iter().collect(),
        }
    }

    fn process_event(&mut self, _index: usize) {
        if let Some(w) = self.watcher.as_mut() {
            w.service();
        }
        self.backend.poll();
        if self.active.is_none() {
            self.discard();
            return;
        }
        let rx = self.receive();
        self.notify(rx);
    }
}
