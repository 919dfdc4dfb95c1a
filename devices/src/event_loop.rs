//! The device event loop: one thread, off the vCPUs, that waits on every device's eventfds
//! (queue kicks now; backend sockets and taps later) and dispatches to the device.
//!
//! Built on `event-manager` (epoll). Devices are wired in through [`EventLoop::add_transport`];
//! the loop runs until [`EventLoopHandle::stop`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::MmioTransport;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or an eventfd failed.
    #[error("device event loop: {0}")]
    Os(String),
}

fn os(e: impl std::fmt::Display) -> EventLoopError {
    EventLoopError::Os(e.to_string())
}

struct TransportSubscriber(Arc<Mutex<MmioTransport>>);

/// Event data at and above this tag are the device's own sources, below it its queues.
const DEVICE_EVENT_BASE: u32 = 0x1_0000;

impl MutEventSubscriber for TransportSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match events.data() {
            d if d >= DEVICE_EVENT_BASE => t.process_device_event((d - DEVICE_EVENT_BASE) as usize),
            d => t.process_queue_event(d as usize),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (i, fd) in t.queue_events().iter().enumerate() {
            // Registration only fails for an invalid fd, which our own eventfds are not.
            let _ = ops.add(Events::with_data_raw(
                fd.as_raw_fd(),
                i as u32,
                EventSet::IN,
            ));
        }
        for (i, fd) in t.device_events().into_iter().enumerate() {
            let _ = ops.add(Events::with_data_raw(
                fd,
                DEVICE_EVENT_BASE + i as u32,
                EventSet::IN,
            ));
        }
    }
}

struct StopSubscriber {
    evt: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&*self.evt, EventSet::IN));
    }
}

type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Collects devices, then runs them on a thread.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
}

/// Stops a running [`EventLoop`].
pub struct EventLoopHandle {
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(os)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os)?);
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(StopSubscriber {
            evt: stop.clone(),
            stopped: stopped.clone(),
        }));
        Ok(EventLoop {
            manager,
            stop,
            stopped,
        })
    }

    /// Dispatches the queue kicks of `transport`'s device.
    pub fn add_transport(&mut self, transport: Arc<Mutex<MmioTransport>>) {
        self.manager
            .add_subscriber(Box::new(TransportSubscriber(transport)));
    }

    /// Runs the loop on its own thread.
    pub fn start(mut self) -> Result<EventLoopHandle, EventLoopError> {
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                while !self.stopped.load(Ordering::SeqCst) {
                    if self.manager.run().is_err() {
                        break;
                    }
                }
            })
            .map_err(os)?;
        Ok(EventLoopHandle {
            stop,
            thread: Some(thread),
        })
    }
}

impl EventLoopHandle {
    /// Stops the loop and waits for its thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
