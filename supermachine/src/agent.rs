//! The host side of the guest agent: every operation dials the VM's vsock Unix socket
//! (`CONNECT <port>` as the vsock device expects), sends one [`agent_protocol`] request and
//! follows its conversation.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame, write_frame, AgentError, ExecRequest, ExitStatus, FileInfo, Frame, Operation,
    ProtocolError, Request, AGENT_PORT, DATA_CHUNK,
};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    /// The VM's socket could not be reached (the VM is not running).
    #[error("cannot reach the VM at {path}: {source}")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The VM did not accept a connection to the port (nothing listens there yet).
    #[error("the VM refused a connection to vsock port {0}")]
    Refused(u32),
    /// The connection broke or carried something unexpected.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent answered out of turn.
    #[error("the guest agent sent an unexpected {0}")]
    Unexpected(&'static str),
    /// The connection ended where the agent owed an answer (the frame it was waiting for).
    #[error("the guest agent's connection ended before the {0}")]
    Closed(&'static str),
    /// The agent did not come up in time.
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent refused or failed the request.
    #[error("{}", .0.message)]
    Remote(AgentError),
}

impl From<io::Error> for AgentClientError {
    fn from(e: io::Error) -> Self {
        AgentClientError::Protocol(ProtocolError::Io(e))
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Request(_) => "request",
        Frame::Data(_) => "data frame",
        Frame::Eof => "end-of-file",
        Frame::Signal(_) => "signal",
        Frame::Resize(..) => "resize",
        Frame::Started { .. } => "start notice",
        Frame::Stdout(_) => "stdout frame",
        Frame::Stderr(_) => "stderr frame",
        Frame::Exit(_) => "exit status",
        Frame::Error(_) => "error",
        Frame::FileInfo(_) => "file info",
        Frame::Done => "done",
    }
}

/// The next frame, an error reply as an error; `awaiting` names what a closed connection
/// took away.
fn expect_end(frame: Option<Frame>, awaiting: &'static str) -> Result<Frame, AgentClientError> {
    match frame {
        Some(Frame::Error(e)) => Err(AgentClientError::Remote(e)),
        Some(f) => Ok(f),
        None => Err(AgentClientError::Closed(awaiting)),
    }
}

/// A handle on one VM's agent.
#[derive(Debug, Clone)]
pub struct Agent {
    socket: PathBuf,
}

impl Agent {
    /// The agent behind the VM's vsock Unix socket.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Agent {
            socket: socket.into(),
        }
    }

    /// The VM's vsock Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A stream to vsock `port` in the guest.
    pub fn dial(&self, port: u32) -> Result<UnixStream, AgentClientError> {
        let mut s =
            UnixStream::connect(&self.socket).map_err(|source| AgentClientError::Unreachable {
                path: self.socket.clone(),
                source,
            })?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())?;
        // Byte by byte: nothing after the reply line may be swallowed by a buffer.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 64 {
            match s.read(&mut byte)? {
                0 => return Err(AgentClientError::Refused(port)),
                _ if byte[0] == b'\n' => break,
                _ => line.push(byte[0]),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(AgentClientError::Refused(port));
        }
        Ok(s)
    }

    /// Dials the agent and sends `op`. A refused dial is tried again for a moment: vsock
    /// refuses instead of queueing when the agent's accept backlog is full, and a clone that was
    /// just restored can refuse one while its driver resets the snapshot's sockets. Nothing was
    /// sent yet, so trying again is safe.
    fn request(&self, op: Operation) -> Result<UnixStream, AgentClientError> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut delay = Duration::from_millis(1);
        let mut s = loop {
            match self.dial(AGENT_PORT) {
                Err(AgentClientError::Refused(_)) if Instant::now() < deadline => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                other => break other?,
            }
        };
        write_frame(&mut s, &Frame::Request(Request::new(op)))?;
        Ok(s)
    }

    /// Asks the agent to answer.
    pub fn ping(&self) -> Result<(), AgentClientError> {
        let mut s = self.request(Operation::Ping)?;
        match expect_end(read_frame(&mut s)?, "reply")? {
            Frame::Done => Ok(()),
            f => Err(AgentClientError::Unexpected(frame_name(&f))),
        }
    }

    /// Tells the guest it was just restored: its clock is stepped to the host's, its entropy
    /// pool reseeded with fresh host randomness, `env` added for processes started from now on,
    /// and its host name set.
    pub fn restored(&self, env: &[String], hostname: Option<&str>) -> Result<(), AgentClientError> {
        let mut entropy = vec![0u8; 64];
        getrandom(&mut entropy)?;
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut s = self.request(Operation::Restored(agent_protocol::RestoredInfo {
            unix_time_ns,
            entropy,
            env: env.to_vec(),
            hostname: hostname.map(str::to_string),
        }))?;
        match expect_end(read_frame(&mut s)?, "reply")? {
            Frame::Done => Ok(()),
            f => Err(AgentClientError::Unexpected(frame_name(&f))),
        }
    }

    /// Pings until the agent answers or `limit` passes.
    pub fn wait_ready(&self, limit: Duration) -> Result<(), AgentClientError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.ping() {
                Ok(()) => return Ok(()),
                Err(e @ AgentClientError::Remote(_)) => return Err(e),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return Err(AgentClientError::Timeout(limit)),
            }
        }
    }

    /// Starts a process; the session streams its input and output.
    pub fn spawn(&self, req: ExecRequest) -> Result<ExecSession, AgentClientError> {
        let mut s = self.request(Operation::Exec(req))?;
        match expect_end(read_frame(&mut s)?, "start notice")? {
            Frame::Started { pid } => Ok(ExecSession {
                pid,
                input: Arc::new(Mutex::new(s.try_clone()?)),
                output: s,
            }),
            f => Err(AgentClientError::Unexpected(frame_name(&f))),
        }
    }

    /// Runs a process to completion: `stdin` (if any) is sent then closed, output is copied to
    /// `stdout` and `stderr`.
    pub fn exec(
        &self,
        mut req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, AgentClientError> {
        req.stdin = stdin.is_some();
        let session = self.spawn(req)?;
        if let Some(input) = stdin {
            session.stream_stdin(input);
        }
        session.wait(stdout, stderr)
    }

    /// Creates or replaces `path` in the guest with `content`, atomically.
    pub fn write_file(
        &self,
        path: &str,
        mode: u32,
        content: &mut dyn Read,
    ) -> Result<(), AgentClientError> {
        let mut s = self.request(Operation::WriteFile {
            path: path.into(),
            mode,
        })?;
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if let Err(e) = write_frame(&mut s, &Frame::Data(buf[..n].to_vec())) {
                // The agent may have refused the file and closed: its reason is better.
                if let Ok(Some(Frame::Error(remote))) = read_frame(&mut s) {
                    return Err(AgentClientError::Remote(remote));
                }
                return Err(e.into());
            }
        }
        write_frame(&mut s, &Frame::Eof)?;
        match expect_end(read_frame(&mut s)?, "reply")? {
            Frame::Done => Ok(()),
            f => Err(AgentClientError::Unexpected(frame_name(&f))),
        }
    }

    /// Copies the guest file at `path` into `to`; returns its mode and size.
    pub fn read_file(&self, path: &str, to: &mut dyn Write) -> Result<FileInfo, AgentClientError> {
        let mut s = self.request(Operation::ReadFile { path: path.into() })?;
        let info = match expect_end(read_frame(&mut s)?, "file info")? {
            Frame::FileInfo(i) => i,
            f => return Err(AgentClientError::Unexpected(frame_name(&f))),
        };
        loop {
            match expect_end(read_frame(&mut s)?, "file data")? {
                Frame::Data(d) => to.write_all(&d)?,
                Frame::Eof => return Ok(info),
                f => return Err(AgentClientError::Unexpected(frame_name(&f))),
            }
        }
    }

    /// A byte stream to `127.0.0.1:port` inside the guest.
    pub fn connect(&self, port: u16) -> Result<UnixStream, AgentClientError> {
        let mut s = self.request(Operation::Connect { port })?;
        crate::timings::mark("agent_dialled");
        match expect_end(read_frame(&mut s)?, "reply")? {
            Frame::Done => Ok(s),
            f => Err(AgentClientError::Unexpected(frame_name(&f))),
        }
    }
}

/// A process started by [`Agent::spawn`].
pub struct ExecSession {
    pid: u32,
    input: Arc<Mutex<UnixStream>>,
    output: UnixStream,
}

/// Sends input to an [`ExecSession`] from any thread.
#[derive(Clone)]
pub struct ExecInput(Arc<Mutex<UnixStream>>);

impl ExecInput {
    fn send(&self, f: &Frame) -> Result<(), AgentClientError> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Ok(write_frame(&mut *s, f)?)
    }

    /// Bytes for the process's stdin.
    pub fn write(&self, data: &[u8]) -> Result<(), AgentClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.send(&Frame::Data(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Closes the process's stdin (a terminal gets ^D).
    pub fn close(&self) -> Result<(), AgentClientError> {
        self.send(&Frame::Eof)
    }

    /// Delivers signal `n` to the process's group.
    pub fn signal(&self, n: i32) -> Result<(), AgentClientError> {
        self.send(&Frame::Signal(n))
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentClientError> {
        self.send(&Frame::Resize(rows, cols))
    }
}

impl ExecSession {
    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A sender for stdin, signals and resizes.
    pub fn input(&self) -> ExecInput {
        ExecInput(self.input.clone())
    }

    /// Copies `from` to the process's stdin on a thread, then closes it.
    pub fn stream_stdin(&self, mut from: Box<dyn Read + Send>) {
        let input = self.input();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if input.write(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = input.close();
        });
    }

    /// Copies output until the process exits; returns how it ended.
    pub fn wait(
        mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, AgentClientError> {
        loop {
            match expect_end(read_frame(&mut self.output)?, "exit status")? {
                Frame::Stdout(d) => {
                    stdout.write_all(&d)?;
                    stdout.flush()?;
                }
                Frame::Stderr(d) => {
                    stderr.write_all(&d)?;
                    stderr.flush()?;
                }
                Frame::Exit(status) => {
                    let _ = self.output.shutdown(Shutdown::Both);
                    return Ok(status);
                }
                f => return Err(AgentClientError::Unexpected(frame_name(&f))),
            }
        }
    }
}

/// Copies both ways between two streams; each direction's end is passed on as a half-close.
pub fn splice(a: UnixStream, b: std::net::TcpStream) {
    let (Ok(mut a_read), Ok(mut b_read)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let (mut a_write, mut b_write) = (a, b);
    // Out of threads: the connection is dropped (both ends see it closed), nothing panics.
    let Ok(up) = std::thread::Builder::new().spawn(move || {
        let _ = io::copy(&mut b_read, &mut a_write);
        let _ = a_write.shutdown(Shutdown::Write);
    }) else {
        return;
    };
    let _ = io::copy(&mut a_read, &mut b_write);
    let _ = b_write.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// Fills `buf` from the host kernel's CSPRNG.
pub(crate) fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the slice we own.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}
