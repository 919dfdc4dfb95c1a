//! The epoll relay thread.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes read from one socket per read call.
const CHUNK: usize = 64 << 10;
/// Reads per direction and wake-up before other pairs get their turn.
const READS_PER_TURN: usize = 4;
/// The epoll token of the wake-up eventfd (pair tokens are `id << 1 | side`, ids from 1).
const WAKE: u64 = 0;

/// One direction of a pair: bytes read from one side that the other has not taken yet.
#[derive(Default)]
struct Direction {
    pending: Vec<u8>,
    /// The source reached its end of stream.
    ended: bool,
    /// The end was passed on as a half-close of the destination.
    shut: bool,
}

/// Two connected sockets; `dir[i]` carries bytes from `fds[i]` to `fds[1 - i]`.
struct Pair {
    fds: [OwnedFd; 2],
    dir: [Direction; 2],
    /// The epoll interest currently registered per side.
    interest: [u32; 2],
    /// Dropped with the pair (the caller's hold on a resource the connection uses).
    _guard: Option<Box<dyn Send>>,
    /// When either side last had an event.
    last_active: Instant,
}

enum Step {
    Open,
    Finished,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns, with valid flags.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reads into a buffer we own, at most its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: send from a buffer we own, at most its length; MSG_NOSIGNAL turns a closed
        // peer into EPIPE instead of a SIGPIPE for the whole process.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Pair {
    /// Moves what it can from side `from` to the other side without blocking.
    fn pump(&mut self, from: usize, scratch: &mut [u8]) -> io::Result<()> {
        let to = 1 - from;
        let (src, dst) = (self.fds[from].as_raw_fd(), self.fds[to].as_raw_fd());
        let d = &mut self.dir[from];
        // First what an earlier turn could not write.
        while !d.pending.is_empty() {
            match write(dst, &d.pending) {
                Ok(n) => {
                    d.pending.drain(..n);
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let mut reads = 0;
        while !d.ended && reads < READS_PER_TURN {
            reads += 1;
            let n = match read(src, scratch) {
                Ok(0) => {
                    d.ended = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            };
            let mut written = 0;
            while written < n {
                match write(dst, &scratch[written..n]) {
                    Ok(w) => written += w,
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Err(e),
                }
            }
            if written < n {
                d.pending.extend_from_slice(&scratch[written..n]);
                return Ok(());
            }
        }
        if d.ended && d.pending.is_empty() && !d.shut {
            // SAFETY: shutdown of a socket we own; an error (peer gone) shows up on its I/O.
            unsafe { libc::shutdown(dst, libc::SHUT_WR) };
            d.shut = true;
        }
        Ok(())
    }

    /// What side `i` must be watched for: readable while its direction wants bytes,
    /// writable while the other direction holds bytes for it. (Errors and hang-ups are
    /// reported whatever the interest.)
    fn wanted(&self, i: usize) -> u32 {
        let mut events = 0;
        let out = &self.dir[i];
        if !out.ended && out.pending.is_empty() {
            events |= libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
        }
        if !self.dir[1 - i].pending.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }

    /// Moves what it can both ways.
    fn step(&mut self, scratch: &mut [u8]) -> io::Result<Step> {
        self.pump(0, scratch)?;
        self.pump(1, scratch)?;
        if self.dir[0].shut && self.dir[1].shut {
            Ok(Step::Finished)
        } else {
            Ok(Step::Open)
        }
    }
}

/// A pair handed over to the thread.
type Incoming = ([OwnedFd; 2], Option<Box<dyn Send>>);

/// What the handle and the thread share.
struct Shared {
    epoll: OwnedFd,
    wake: OwnedFd,
    /// Pairs handed over but not yet registered by the thread.
    incoming: Mutex<Vec<Incoming>>,
    /// The handle was dropped: end once no pair is left.
    closing: AtomicBool,
    /// Asked by [`Relay::evict_idle`]: close pairs with no event for this long.
    evict: Mutex<Option<Duration>>,
}

/// A relay thread and the pairs of sockets it moves bytes between.
pub struct Relay {
    shared: Arc<Shared>,
}

impl Relay {
    /// Starts a relay thread named `name`.
    pub fn new(name: &str) -> io::Result<Relay> {
        // SAFETY: plain syscalls creating new descriptors that we take ownership of at once.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let wake = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?)
        };
        let shared = Arc::new(Shared {
            epoll,
            wake,
            incoming: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
            evict: Mutex::new(None),
        });
        shared.ctl(
            libc::EPOLL_CTL_ADD,
            shared.wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE,
        )?;
        let thread = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || thread.run())?;
        Ok(Relay { shared })
    }

    /// Relays `a` ↔ `b` until both directions have ended or either socket fails; returns at
    /// once. Both must be connected stream sockets; they are made nonblocking.
    pub fn add(&self, a: OwnedFd, b: OwnedFd) -> io::Result<()> {
        self.hand_over(a, b, None)
    }

    /// As [`Relay::add`], and drops `guard` when the pair ends (e.g. a permit that limits the
    /// connections in flight).
    pub fn add_guarded(
        &self,
        a: OwnedFd,
        b: OwnedFd,
        guard: impl Send + 'static,
    ) -> io::Result<()> {
        self.hand_over(a, b, Some(Box::new(guard)))
    }

    /// Closes (soon, on the relay's thread) every pair that has had no traffic either way for
    /// `idle_for`, dropping their guards: what a caller at its connection limit does so that
    /// clients holding idle connections cannot keep new ones out.
    pub fn evict_idle(&self, idle_for: Duration) {
        *self.shared.evict.lock().unwrap_or_else(|e| e.into_inner()) = Some(idle_for);
        self.shared.wake();
    }

    fn hand_over(&self, a: OwnedFd, b: OwnedFd, guard: Option<Box<dyn Send>>) -> io::Result<()> {
        for fd in [&a, &b] {
            set_nonblocking(fd.as_raw_fd())?;
        }
        self.shared
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(([a, b], guard));
        self.shared.wake();
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake();
    }
}

impl Shared {
    fn wake(&self) {
        let one = 1u64;
        // SAFETY: an 8-byte write from a u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl on our epoll instance with a valid event struct.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Brings the registered interest of `pair`'s sides in line with what they need.
    fn sync_interest(&self, id: u64, pair: &mut Pair) -> io::Result<()> {
        for side in 0..2 {
            let want = pair.wanted(side);
            if want != pair.interest[side] {
                self.ctl(
                    libc::EPOLL_CTL_MOD,
                    pair.fds[side].as_raw_fd(),
                    want,
                    id << 1 | side as u64,
                )?;
                pair.interest[side] = want;
            }
        }
        Ok(())
    }

    /// Registers the pairs handed over since the last wake-up.
    fn adopt(&self, pairs: &mut HashMap<u64, Pair>, next_id: &mut u64, scratch: &mut [u8]) {
        let mut count = 0u64;
        // SAFETY: an 8-byte read into a u64 from our nonblocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        let new = std::mem::take(&mut *self.incoming.lock().unwrap_or_else(|e| e.into_inner()));
        for (fds, guard) in new {
            let id = *next_id;
            *next_id += 1;
            let mut pair = Pair {
                fds,
                dir: Default::default(),
                interest: [0; 2],
                _guard: guard,
                last_active: Instant::now(),
            };
            let registered = (0..2).all(|side| {
                self.ctl(
                    libc::EPOLL_CTL_ADD,
                    pair.fds[side].as_raw_fd(),
                    0,
                    id << 1 | side as u64,
                )
                .is_ok()
            });
            // Bytes may already wait on either side: move them now.
            if registered
                && matches!(pair.step(scratch), Ok(Step::Open))
                && self.sync_interest(id, &mut pair).is_ok()
            {
                pairs.insert(id, pair);
            }
        }
    }

    fn run(&self) {
        let mut pairs: HashMap<u64, Pair> = HashMap::new();
        let mut next_id = 1u64;
        let mut scratch = vec![0u8; CHUNK];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            if self.closing.load(Ordering::SeqCst)
                && pairs.is_empty()
                && self
                    .incoming
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
            {
                return;
            }
            // SAFETY: epoll_wait fills at most `events.len()` entries of our buffer.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    -1,
                )
            };
            if n < 0 {
                continue; // EINTR
            }
            for ev in &events[..n as usize] {
                let token = ev.u64;
                if token == WAKE {
                    self.adopt(&mut pairs, &mut next_id, &mut scratch);
                    let evict = self.evict.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(idle_for) = evict {
                        // Dropping a pair closes its sockets and gives back its guard.
                        pairs.retain(|_, p| p.last_active.elapsed() < idle_for);
                    }
                    continue;
                }
                let id = token >> 1;
                let Some(pair) = pairs.get_mut(&id) else {
                    continue; // Finished earlier in this batch.
                };
                pair.last_active = Instant::now();
                let keep = match pair.step(&mut scratch) {
                    Ok(Step::Open) => self.sync_interest(id, pair).is_ok(),
                    Ok(Step::Finished) | Err(_) => false,
                };
                if !keep {
                    // Dropping the pair closes both sockets, which also unregisters them.
                    pairs.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    /// A Unix stream (standing in for the vsock side) relayed to a TCP connection; returns
    /// the outer ends: (host side, guest server side).
    fn relayed(relay: &Relay) -> (UnixStream, TcpStream) {
        let (host, vsock) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        relay.add(vsock.into(), client.into()).unwrap();
        (host, server)
    }

    #[test]
    fn bytes_flow_both_ways_and_each_end_is_passed_on() {
        let relay = Relay::new("test-relay").unwrap();
        let (mut host, mut server) = relayed(&relay);
        host.write_all(b"PING\r\n").unwrap();
        let mut buf = [0u8; 6];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"PING\r\n");
        server.write_all(b"+PONG\r\n").unwrap();
        let mut buf = [0u8; 7];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"+PONG\r\n");
        // The host's half-close reaches the server, which can still answer.
        host.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        server.write_all(b"bye").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"bye");
    }

    #[test]
    fn large_transfers_both_ways_at_once_arrive_intact() {
        let relay = Relay::new("test-relay").unwrap();
        let (host, server) = relayed(&relay);
        let size = 8 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let send = |mut w: Box<dyn Write + Send>, data: Vec<u8>| {
            std::thread::spawn(move || {
                w.write_all(&data).unwrap();
            })
        };
        let (host_r, server_r) = (host.try_clone().unwrap(), server.try_clone().unwrap());
        let up = send(Box::new(host), data.clone());
        let down = send(Box::new(server), data.clone());
        let recv = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut got = vec![0u8; size];
                r.read_exact(&mut got).unwrap();
                got
            })
        };
        let (at_server, at_host) = (recv(Box::new(server_r)), recv(Box::new(host_r)));
        up.join().unwrap();
        down.join().unwrap();
        assert!(at_server.join().unwrap() == data);
        assert!(at_host.join().unwrap() == data);
    }

    #[test]
    fn many_pairs_are_served_by_one_thread() {
        let relay = Relay::new("test-relay").unwrap();
        let ends: Vec<_> = (0..50).map(|_| relayed(&relay)).collect();
        for (i, (host, _)) in ends.iter().enumerate() {
            (&*host).write_all(format!("{i:04}").as_bytes()).unwrap();
        }
        for (i, (host, server)) in ends.iter().enumerate() {
            let mut buf = [0u8; 4];
            (&*server).read_exact(&mut buf).unwrap();
            assert_eq!(buf, *format!("{i:04}").as_bytes());
            (&*server).write_all(&buf).unwrap();
            (&*host).read_exact(&mut buf).unwrap();
            assert_eq!(buf, *format!("{i:04}").as_bytes());
        }
    }

    #[test]
    fn a_reset_side_ends_the_pair() {
        let relay = Relay::new("test-relay").unwrap();
        let (mut host, server) = relayed(&relay);
        // SO_LINGER 0 makes the close a reset.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt with a valid linger struct on a socket we own.
        unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
        drop(server);
        let mut rest = Vec::new();
        // The relay closes the host side: a read sees the end rather than hanging.
        let _ = host.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }

    #[test]
    fn the_guard_is_dropped_when_the_pair_ends() {
        let relay = Relay::new("test-relay").unwrap();
        let (host, vsock) = UnixStream::pair().unwrap();
        let (guest, server) = UnixStream::pair().unwrap();
        let guard = Arc::new(());
        relay
            .add_guarded(vsock.into(), guest.into(), guard.clone())
            .unwrap();
        assert_eq!(Arc::strong_count(&guard), 2);
        host.shutdown(Shutdown::Write).unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&guard) > 1 {
            assert!(std::time::Instant::now() < deadline, "guard still held");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn pairs_outlive_the_handle_and_the_thread_then_ends() {
        let relay = Relay::new("test-relay").unwrap();
        let (mut host, mut server) = relayed(&relay);
        let shared = Arc::downgrade(&relay.shared);
        drop(relay);
        host.write_all(b"still here").unwrap();
        let mut buf = [0u8; 10];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still here");
        host.shutdown(Shutdown::Write).unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        // Both ends passed on: the pair finishes and the thread lets go of its state.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "relay thread still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn idle_pairs_are_evicted_on_request_and_busy_ones_kept() {
        let relay = Relay::new("relay-evict").unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (mut idle_outer, idle_inner) = UnixStream::pair().unwrap();
        let (idle_far, mut idle_far_outer) = UnixStream::pair().unwrap();
        relay
            .add_guarded(idle_inner.into(), idle_far.into(), Flag(dropped.clone()))
            .unwrap();
        let (mut busy, mut busy_server) = relayed(&relay);
        std::thread::sleep(Duration::from_millis(400));
        // The busy pair moves bytes just before the eviction; the idle one has not for 400 ms.
        busy.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        busy_server.read_exact(&mut got).unwrap();
        relay.evict_idle(Duration::from_millis(300));
        // The idle pair is closed: both outer ends see the end, and its guard is dropped.
        idle_outer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(idle_outer.read(&mut byte).unwrap(), 0);
        idle_far_outer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(idle_far_outer.read(&mut byte).unwrap(), 0);
        // The guard drops right after the sockets close, on the relay's thread.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the evicted pair's guard was kept"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The busy one still relays.
        busy_server.write_all(b"pong").unwrap();
        busy.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }
}
