//! The guest agent: listens on vsock port [`AGENT_PORT`] and serves one
//! [`agent_protocol`] request per connection (exec, write/read a file, connect to a guest TCP
//! port, ping), each on its own thread. Runs inside PID 1 after the switch to the container's
//! root, so paths and users are the container's.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

pub use crate::process::ExecDefaults;
use crate::process::{file_pipe, resolve_user, set_window_size, start_as, workload_env};

use agent_protocol::{
    read_frame, write_frame, AgentError, ErrorKind, ExecRequest, ExitStatus, FileInfo, Frame,
    Operation, RestoredInfo, AGENT_PORT, DATA_CHUNK, VERSION,
};

/// A connected vsock stream.
struct Conn(File);

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        self.0.try_clone().map(Conn)
    }

    fn shutdown(&self, how: Shutdown) {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on a socket we own; failure (already closed) is harmless.
        unsafe { libc::shutdown(self.0.as_raw_fd(), how) };
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn vsock_listener(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm of the size we pass.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen on the socket we own.
    if rc != 0 || unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Starts listening; connections are served on their own threads from then on.
pub fn start(defaults: Arc<RwLock<ExecDefaults>>) -> io::Result<()> {
    let listener = vsock_listener(AGENT_PORT)?;
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || loop {
            // SAFETY: accept4 on our listening socket; null address pointers are allowed.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EMFILE) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            // SAFETY: a fresh descriptor from accept4, owned from here on.
            let conn = Conn(unsafe { File::from_raw_fd(fd) });
            let defaults = defaults.clone();
            // A connection dropped without a word would look like a broken transport to the host.
            let spare = conn.try_clone();
            if let Err(e) = std::thread::Builder::new()
                .name("agent-conn".into())
                .spawn(move || serve(conn, &defaults))
            {
                if let Ok(mut c) = spare {
                    let _ = write_frame(&mut c, &io_error("agent thread", &e));
                }
            }
        })?;
    Ok(())
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Frame {
    Frame::Error(AgentError {
        kind,
        message: message.into(),
    })
}

fn io_error(what: &str, e: &io::Error) -> Frame {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
        _ => ErrorKind::Other,
    };
    error(kind, format!("{what}: {e}"))
}

fn serve(mut conn: Conn, defaults: &RwLock<ExecDefaults>) {
    let request = match read_frame(&mut conn) {
        Ok(Some(Frame::Request(r))) => r,
        Ok(_) | Err(_) => {
            let _ = write_frame(&mut conn, &error(ErrorKind::Invalid, "expected a request"));
            return;
        }
    };
    if request.version != VERSION {
        let msg = format!(
            "agent speaks protocol version {VERSION}, the host {}",
            request.version
        );
        let _ = write_frame(&mut conn, &error(ErrorKind::UnsupportedVersion, msg));
        return;
    }
    let reply = match request.op {
        Operation::Ping => Frame::Done,
        Operation::Exec(req) => {
            let defaults = defaults.read().unwrap_or_else(|e| e.into_inner()).clone();
            return exec(conn, req, &defaults);
        }
        Operation::Restored(info) => restored(info, defaults),
        Operation::WriteFile { path, mode } => write_file(&mut conn, &path, mode),
        Operation::ReadFile { path } => match read_file(&mut conn, &path) {
            Ok(()) => return,
            Err(reply) => reply,
        },
        Operation::Connect { port } => return connect(conn, port),
    };
    let _ = write_frame(&mut conn, &reply);
}

fn absolute(path: &str) -> Result<&std::path::Path, Frame> {
    let p = std::path::Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(error(
            ErrorKind::Invalid,
            format!("{path:?} is not an absolute path"),
        ));
    }
    Ok(p)
}

/// Receives the file into a temporary beside it, then renames: readers never see half a file.
fn write_file(conn: &mut Conn, path: &str, mode: u32) -> Frame {
    let path = match absolute(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return error(
            ErrorKind::Invalid,
            format!("{} names no file", path.display()),
        );
    };
    if path.is_dir() {
        return error(
            ErrorKind::IsDirectory,
            format!("{} is a directory", path.display()),
        );
    }
    let tmp = dir.join(format!(
        ".{}.sm-{}",
        name.to_string_lossy(),
        std::process::id() as u64 ^ conn.0.as_raw_fd() as u64
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(&tmp);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => return io_error(&dir.display().to_string(), &e),
    };
    let result = (|| -> Result<(), Frame> {
        loop {
            match read_frame(conn) {
                Ok(Some(Frame::Data(d))) => file
                    .write_all(&d)
                    .map_err(|e| io_error(&path.display().to_string(), &e))?,
                Ok(Some(Frame::Eof)) => break,
                _ => return Err(error(ErrorKind::Invalid, "file transfer interrupted")),
            }
        }
        // The mode is applied explicitly: open's mode is filtered by the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .and_then(|_| file.sync_all())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| io_error(&path.display().to_string(), &e))
    })();
    match result {
        Ok(()) => Frame::Done,
        Err(reply) => {
            let _ = std::fs::remove_file(&tmp);
            reply
        }
    }
}

fn read_file(conn: &mut Conn, path: &str) -> Result<(), Frame> {
    let path = absolute(path)?;
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|e| io_error(&shown, &e))?;
    let meta = file.metadata().map_err(|e| io_error(&shown, &e))?;
    if !meta.is_file() {
        return Err(error(
            ErrorKind::Invalid,
            format!("{shown} is not a regular file"),
        ));
    }
    let info = FileInfo {
        mode: meta.permissions().mode() & 0o7777,
        size: meta.len(),
    };
    let send = |conn: &mut Conn, f: &Frame| write_frame(conn, f).map_err(|_| Frame::Done);
    send(conn, &Frame::FileInfo(info))?;
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The host learns from the missing Eof; the connection closes.
            Err(_) => return Ok(()),
        };
        send(conn, &Frame::Data(buf[..n].to_vec()))?;
    }
    send(conn, &Frame::Eof)
}

/// A byte stream between the host and a guest TCP port, each direction half-closed on its own.
fn connect(mut conn: Conn, port: u16) {
    let tcp = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(t) => t,
        Err(e) => {
            let _ = write_frame(&mut conn, &io_error(&format!("127.0.0.1:{port}"), &e));
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_frame(&mut conn, &Frame::Done).is_err() {
        return;
    }
    // From here on the bytes are the relay thread's (one epoll loop for every connection).
    static RELAY: OnceLock<io::Result<stream_relay::Relay>> = OnceLock::new();
    let added = match RELAY.get_or_init(|| stream_relay::Relay::new("relay")) {
        Ok(relay) => relay.add(conn.0.into(), tcp.into()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    };
    if let Err(e) = added {
        eprintln!("supermachine agent: guest port {port}: {e}");
    }
}

/// Sends frames from several threads, one whole frame at a time.
#[derive(Clone)]
struct FrameWriter(Arc<Mutex<Conn>>);

impl FrameWriter {
    fn send(&self, f: &Frame) -> bool {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *c, f).is_ok()
    }
}

fn pump(mut from: File, out: FrameWriter, stderr: bool) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pump".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A pty master reads EIO once the last process holding the terminal is gone.
                    Err(_) => break,
                };
                let data = buf[..n].to_vec();
                let f = if stderr {
                    Frame::Stderr(data)
                } else {
                    Frame::Stdout(data)
                };
                if !out.send(&f) {
                    break;
                }
            }
        })
}

fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors; `ws` is a valid winsize; name and termios may be
    // null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from openpty, owned from here on.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    for f in [&master, &slave] {
        // SAFETY: setting FD_CLOEXEC on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

/// Catches up after a restore: the wall clock, the entropy pool, exec's environment and the
/// host name. Each step is independent; the first failure is reported after all were tried.
fn restored(info: RestoredInfo, defaults: &RwLock<ExecDefaults>) -> Frame {
    match crate::catch_up::apply_restored(info, defaults) {
        Ok(()) => Frame::Done,
        Err(why) => error(ErrorKind::Other, why),
    }
}

fn exec(conn: Conn, req: ExecRequest, defaults: &ExecDefaults) {
    let writer = match conn.try_clone() {
        Ok(w) => w,
        Err(e) => {
            let mut conn = conn;
            let _ = write_frame(&mut conn, &io_error("exec", &e));
            return;
        }
    };
    let out = FrameWriter(Arc::new(Mutex::new(writer)));
    let fail = |f: Frame| {
        out.send(&f);
    };
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return fail(error(ErrorKind::Invalid, "no command"));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let user = req.user.as_deref().unwrap_or(&defaults.user);
    let id = match resolve_user(user, &passwd, &group) {
        Ok(id) => id,
        Err(e) => return fail(error(ErrorKind::Invalid, e)),
    };
    let env = workload_env(
        &defaults.hostname,
        &id.home,
        req.tty.is_some(),
        defaults.env.iter().chain(&req.env),
    );
    let cwd = req
        .cwd
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| defaults.workdir.clone());
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd);
    let mut pumps = Vec::new();
    let mut stdin: Option<File> = None;
    let mut terminal: Option<File> = None;
    let setup = (|| -> io::Result<()> {
        if let Some((rows, cols)) = req.tty {
            let (master, slave) = open_pty(rows, cols)?;
            cmd.stdin(slave.try_clone()?)
                .stdout(slave.try_clone()?)
                .stderr(slave);
            stdin = Some(master.try_clone()?);
            pumps.push(pump(master.try_clone()?, out.clone(), false)?);
            terminal = Some(master);
        } else {
            let (or, ow) = file_pipe()?;
            let (er, ew) = file_pipe()?;
            cmd.stdout(ow).stderr(ew);
            if req.stdin {
                let (ir, iw) = file_pipe()?;
                cmd.stdin(ir);
                stdin = Some(iw);
            } else {
                cmd.stdin(Stdio::null());
            }
            pumps.push(pump(or, out.clone(), false)?);
            pumps.push(pump(er, out.clone(), true)?);
        }
        Ok(())
    })();
    if let Err(e) = setup {
        return fail(io_error("exec setup", &e));
    }
    let tty = req.tty.is_some();
    start_as(&mut cmd, &id, tty);
    let spawned = crate::reaper::spawn(&mut cmd);
    // The child has its copies; ours must go, or the output pipes never reach end-of-file.
    drop(cmd);
    let (child, exited) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let kind = match e.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                _ => ErrorKind::NotExecutable,
            };
            return fail(error(kind, format!("exec {:?}: {e}", req.argv[0])));
        }
    };
    let pid = child.id() as libc::pid_t;
    if !out.send(&Frame::Started { pid: pid as u32 }) {
        // SAFETY: killing the process group we just created.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    // Host → process: stdin, signals, resizes. The host closing the connection kills it.
    let mut input = conn;
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended_seen = ended.clone();
    let input_thread = std::thread::Builder::new()
        .name("exec-input".into())
        .spawn(move || {
            let mut stdin = stdin;
            loop {
                match read_frame(&mut input) {
                    Ok(Some(Frame::Data(d))) => {
                        if let Some(s) = stdin.as_mut() {
                            if s.write_all(&d).is_err() {
                                stdin = None;
                            }
                        }
                    }
                    Ok(Some(Frame::Eof)) => {
                        if tty {
                            // A terminal has no end-of-file of its own: send ^D as a user would.
                            if let Some(s) = stdin.as_mut() {
                                let _ = s.write_all(&[4]);
                            }
                        } else {
                            stdin = None;
                        }
                    }
                    Ok(Some(Frame::Signal(n))) if (1..=64).contains(&n) => {
                        if !ended_seen.load(std::sync::atomic::Ordering::SeqCst) {
                            // SAFETY: signalling the process group of the process we started.
                            unsafe { libc::kill(-pid, n) };
                        }
                    }
                    Ok(Some(Frame::Resize(rows, cols))) => {
                        if let Some(t) = &terminal {
                            set_window_size(t, rows, cols);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        if !ended_seen.load(std::sync::atomic::Ordering::SeqCst) {
                            // SAFETY: as above; the host is gone, so is the process.
                            unsafe { libc::kill(-pid, libc::SIGKILL) };
                        }
                        break;
                    }
                }
            }
        });
    if let Err(e) = input_thread {
        // Without it the host could neither feed nor stop the process: do not leave it running.
        // SAFETY: killing the process group we just created.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        out.send(&io_error("exec input thread", &e));
    }
    let raw = exited.recv().unwrap_or(0);
    ended.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in pumps {
        let _ = p.join();
    }
    let code = crate::reaper::shell_status(raw);
    let signal = libc::WIFSIGNALED(raw).then(|| libc::WTERMSIG(raw));
    out.send(&Frame::Exit(ExitStatus { code, signal }));
    let c = out.0.lock().unwrap_or_else(|e| e.into_inner());
    c.shutdown(Shutdown::Both);
}
