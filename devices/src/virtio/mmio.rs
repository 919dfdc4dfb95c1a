//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): a register window per device.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_core::{BusDevice, GuestMemory, IrqTrigger};
use vmm_sys_util::eventfd::EventFd;

use super::{features, status, Interrupt, VirtioDevice};

/// Bytes of MMIO space one device takes.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// The QueueNotify register, where a guest kick lands (and where ioeventfds are registered).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // "QEMU", what Linux expects of unbranded devices
const CONFIG_SPACE_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
    /// Interrupt bits to raise again in [`MmioTransport::finish_restore`].
    pending_after_restore: u32,
}

/// One queue's configuration and ring positions in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// The driver finished setting it up.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: QueueSnapshot) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport and its device's queues in a snapshot (the device's own data — its disk, its
/// host sockets — is not here: the VMM re-creates the device from its configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device type, to refuse restoring a state into another kind of device.
    pub device_type: u32,
    /// Every queue, with the device's ring positions when it was active.
    pub queues: Vec<QueueSnapshot>,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The device status register.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device was running.
    pub active: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device's own state.
    pub device: super::DeviceState,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue eventfd could not be created.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device declared an invalid queue size.
    #[error("invalid queue size {0}")]
    QueueSize(u16),
    /// A snapshot's transport state does not fit this device.
    #[error("snapshot of a virtio device does not fit: {0}")]
    Snapshot(String),
}

impl MmioTransport {
    /// Wraps `device`, raising `irq` for its interrupts.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<dyn IrqTrigger>,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|_| TransportError::QueueSize(max))?);
            queue_events.push(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(TransportError::EventFd)?,
            );
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            pending_after_restore: 0,
        })
    }

    /// The registers and queues, for a snapshot (the device must be quiet: no event loop
    /// running it).
    pub fn save_state(&self) -> TransportState {
        let live = if self.active {
            self.device.queue_states()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| live.get(i).copied().unwrap_or_else(|| q.state()).into())
            .collect();
        TransportState {
            device_type: self.device.device_type(),
            queues,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            device: self.device.save_device_state(),
        }
    }

    /// A transport continuing from `state`, with a freshly made `device` of the same kind: the
    /// device is re-activated on the saved queues, so it carries on where the snapshot stopped.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<dyn IrqTrigger>,
        state: &TransportState,
    ) -> Result<Self, TransportError> {
        let bad = |why: String| TransportError::Snapshot(why);
        if state.device_type != device.device_type() {
            return Err(bad(format!(
                "device type {} in the snapshot, {} here",
                state.device_type,
                device.device_type()
            )));
        }
        let mut t = MmioTransport::new(device, mem, irq)?;
        t.device.load_device_state(&state.device).map_err(bad)?;
        if state.queues.len() != t.queues.len() {
            return Err(bad(format!(
                "{} queues in the snapshot, {} here",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (slot, q) in t.queues.iter_mut().zip(&state.queues) {
            *slot = Queue::try_from(virtio_queue::QueueState::from(*q))
                .map_err(|e| bad(format!("queue: {e:?}")))?;
        }
        t.queue_select = state.queue_select;
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.driver_features = state.driver_features;
        t.status = state.status;
        t.config_generation = state.config_generation;
        if state.active {
            if t.driver_features & !t.device.features() != 0 {
                return Err(bad("the driver's features are not offered here".into()));
            }
            t.device.ack_features(t.driver_features);
            t.activate();
            if !t.active {
                return Err(bad("the device refused its saved queues".into()));
            }
        }
        t.pending_after_restore = state.interrupt_status;
        Ok(t)
    }

    /// The last step of a restore, once the VM's interrupt controllers hold their saved state
    /// (an interrupt raised before that would be overwritten and lost): the device does what
    /// it must after a restore (vsock: tell the guest its connections are gone), and interrupts
    /// the driver had not acknowledged are raised again.
    pub fn finish_restore(&mut self) {
        if self.active {
            // Kicks the snapshot caught before the device saw them are gone with its old
            // eventfds, and the driver will not repeat them: look at every queue once. Before
            // `restored`, which may wait for a kick of its own (vsock's reset).
            for index in 0..self.queues.len() {
                self.device.process_queue(index);
            }
            self.device.restored();
        }
        let pending = std::mem::take(&mut self.pending_after_restore);
        if pending != 0 {
            self.interrupt.signal(pending);
        }
    }

    /// The eventfd each queue's kicks signal, in queue order.
    pub fn queue_events(&self) -> Vec<BorrowedFd<'_>> {
        self.queue_events
            .iter()
            // SAFETY: each eventfd is owned by `self` and stays open for the borrow's lifetime.
            .map(|e| unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) })
            .collect()
    }

    /// The device's own host-side event sources.
    pub fn device_events(&self) -> Vec<std::os::fd::RawFd> {
        self.device.event_fds()
    }

    /// Handles device event source `index`.
    pub fn process_device_event(&mut self, index: usize) {
        self.device.process_event(index);
    }

    /// Handles a kick of queue `index` that arrived on its eventfd.
    pub fn process_queue_event(&mut self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            // Non-blocking: clears the counter; nothing to read is fine too.
            let _ = evt.read();
        }
        if self.active {
            self.device.process_queue(index);
        }
    }

    /// The device status register.
    pub fn device_status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            reg::QUEUE_READY => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length all ones means "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            reg::QUEUE_READY if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if self.queue_config_allowed() =>
            {
                let high = offset & 0x4 != 0;
                let (lo, hi) = if high {
                    (None, Some(value))
                } else {
                    (Some(value), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !0x4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Only reached where no ioeventfd is registered: forward to the event loop.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            // Writes to read-only registers, or out of sequence: ignored, as the spec allows.
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let accepted = self.driver_features;
            if accepted & !offered != 0 || accepted & features::VERSION_1 == 0 {
                // Refuse: the driver sees FEATURES_OK unset and gives up.
                self.status = value & !status::FEATURES_OK;
                return;
            }
            self.device.ack_features(accepted);
            let event_idx = accepted & features::RING_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        self.status = value;
        if new_bits & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            self.fail();
            return;
        }
        // The device gets its own copies; the transport keeps the configuration it reports.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            self.fail();
            return;
        };
        match super::activate_checked(
            self.device.as_mut(),
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.active = true,
            Err(_) => self.fail(),
        }
    }

    /// The driver configured something we cannot use: ask it to reset the device.
    fn fail(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let (4, 0) = (data.len(), offset % 4) {
            let mut v = [0u8; 4];
            v.copy_from_slice(data);
            self.write_register(offset, u32::from_le_bytes(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::Block;
    use crate::virtio::test_utils::*;
    use virtio_queue::mock::MockSplitQueue;

    fn transport() -> (MmioTransport, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "mmio-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let blk = Block::open(&path, false).unwrap();
        let t = MmioTransport::new(
            Box::new(blk),
            memory(),
            std::sync::Arc::new(CountingIrq::default()),
        )
        .unwrap();
        (t, path)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identifies_as_a_modern_block_device() {
        let (mut t, p) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES) & 1, 1, "VERSION_1");
        // Config space: capacity in sectors.
        let mut cap = [0u8; 8];
        t.read(CONFIG_SPACE_OFFSET, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        // Unaligned or odd-sized register accesses are ignored.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_a_legacy_driver() {
        let (mut t, p) = transport();
        negotiate(&mut t, 1 << 63 | features::VERSION_1);
        assert_eq!(t.device_status() & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 0);
        assert_eq!(t.device_status() & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, features::VERSION_1);
        assert_ne!(t.device_status() & status::FEATURES_OK, 0);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn queue_setup_out_of_sequence_is_ignored() {
        let (mut t, p) = transport();
        // Before FEATURES_OK the queue registers are read-only.
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // A selector past the last queue reads as absent and writes go nowhere.
        negotiate(&mut t, features::VERSION_1);
        w(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_READY, 1);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn activation_with_rings_outside_memory_asks_for_reset_and_reset_recovers() {
        let (mut t, p) = transport();
        negotiate(&mut t, features::VERSION_1);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_DESC_LOW, 0);
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x10); // 64 GiB: no memory there
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, 0xf);
        assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            r(&mut t, reg::INTERRUPT_STATUS) & crate::virtio::INT_CONFIG,
            0
        );
        // A kick on a device that never activated does nothing.
        t.process_queue_event(0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(t.device_status(), 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        std::fs::remove_file(p).ok();
    }

    /// Puts a FLUSH request at descriptors `first`, `first + 1` of `vq`.
    fn add_flush(mem: &GuestMemory, vq: &MockSplitQueue<'_, GuestMemory>, first: u16) -> u64 {
        let buf = BUF_BASE + u64::from(first) * 0x200;
        vq.add_desc_chains(
            &[
                desc(buf, 16, F_NEXT, first + 1),
                desc(buf + 0x100, 1, F_WRITE, 0),
            ],
            first,
        )
        .unwrap();
        let mut hdr = [0u8; 16];
        hdr[0] = 4; // FLUSH
        vm_memory::Bytes::write_slice(mem, &hdr, vm_memory::GuestAddress(buf)).unwrap();
        vm_memory::Bytes::write_obj(mem, 0xffu8, vm_memory::GuestAddress(buf + 0x100)).unwrap();
        buf + 0x100
    }

    /// Negotiates and sets queue 0 up on `vq`'s rings, then DRIVER_OK.
    fn activate_on(t: &mut MmioTransport, vq: &MockSplitQueue<'_, GuestMemory>) {
        negotiate(t, features::VERSION_1);
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 16);
        let set = |t: &mut MmioTransport, lo: u64, a: vm_memory::GuestAddress| {
            w(t, lo, a.0 as u32);
            w(t, lo + 4, (a.0 >> 32) as u32);
        };
        set(t, reg::QUEUE_DESC_LOW, vq.desc_table_addr());
        set(t, reg::QUEUE_DRIVER_LOW, vq.avail_addr());
        set(t, reg::QUEUE_DEVICE_LOW, vq.used_addr());
        w(t, reg::QUEUE_READY, 1);
        w(t, reg::STATUS, 0xf);
        assert_eq!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn a_kick_through_the_register_reaches_the_device() {
        let (mut t, p) = transport();
        let mem = t.mem.clone();
        let vq = MockSplitQueue::new(&mem, 16);
        let status_at = add_flush(&mem, &vq, 0);
        activate_on(&mut t, &vq);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        t.process_queue_event(0);
        let s: u8 = vm_memory::Bytes::read_obj(&mem, vm_memory::GuestAddress(status_at)).unwrap();
        assert_eq!(s, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & 1, 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & 1, 0);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn a_restored_transport_continues_where_the_snapshot_stopped() {
        let (mut t, p) = transport();
        let mem = t.mem.clone();
        let vq = MockSplitQueue::new(&mem, 16);
        add_flush(&mem, &vq, 0);
        activate_on(&mut t, &vq);
        t.process_queue_event(0);
        assert_eq!(used_idx(&mem, vq.used_addr().0), 1);
        let state = t.save_state();
        assert!(state.active);
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (1, 1)
        );
        assert_eq!(
            state.interrupt_status & 1,
            1,
            "not acknowledged before the snapshot"
        );

        // A new device on the same disk, restored: registers as they were, the unacknowledged
        // interrupt raised again, and the next request is the only one processed.
        let irq = std::sync::Arc::new(CountingIrq::default());
        let blk = Block::open(&p, false).unwrap();
        let mut restored =
            MmioTransport::restore(Box::new(blk), mem.clone(), irq.clone(), &state).unwrap();
        assert_eq!(restored.device_status(), t.device_status());
        assert_eq!(r(&mut restored, reg::QUEUE_READY), 1);
        assert_eq!(
            irq.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "nothing is raised before the interrupt controllers are restored"
        );
        // A request the driver made available (and kicked) just before the snapshot: the kick
        // is lost with the old eventfd, so finishing the restore looks at the queue.
        let status_at = add_flush(&mem, &vq, 2);
        restored.finish_restore();
        assert_eq!(r(&mut restored, reg::INTERRUPT_STATUS) & 1, 1);
        assert!(irq.0.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        let s: u8 = vm_memory::Bytes::read_obj(&mem, vm_memory::GuestAddress(status_at)).unwrap();
        assert_eq!(s, 0);
        assert_eq!(
            used_idx(&mem, vq.used_addr().0),
            2,
            "the first request ran again"
        );
        assert_eq!(restored.save_state().queues[0].next_avail, 2);

        // Another kind of device, or a state that does not fit, is refused.
        let console = crate::virtio::console::Console::new(Box::new(std::io::sink())).unwrap();
        let e = MmioTransport::restore(Box::new(console), mem.clone(), irq.clone(), &state)
            .err()
            .unwrap();
        assert!(e.to_string().contains("device type"), "{e}");
        let mut bad = state.clone();
        bad.queues[0].size = 3; // not a power of two
        let blk = Block::open(&p, false).unwrap();
        assert!(MmioTransport::restore(Box::new(blk), mem, irq, &bad).is_err());
        std::fs::remove_file(p).ok();
    }
}
