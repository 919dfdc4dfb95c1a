//! Commands in a running VM: [`ExecBuilder`] → [`Output`] (run to completion) or [`Child`]
//! (streaming stdin, stdout and stderr).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_protocol::ExecRequest;

use crate::agent::{Agent, AgentClientError, ExecInput};
use crate::error::{Error, Result};

pub use agent_protocol::ExitStatus;

/// SIGKILL, for commands past their timeout.
const SIGKILL: i32 = 9;

enum Stdin {
    Bytes(Vec<u8>),
    Reader(Box<dyn Read + Send>),
    Null,
}

/// A command to run in a VM ([`crate::Vm::exec_builder`], [`crate::VmHandle::exec_builder`]),
/// built up then run with [`ExecBuilder::output`] or [`ExecBuilder::spawn`]. It runs in the container (its root, user, working directory and
/// environment unless overridden).
pub struct ExecBuilder<'vm> {
    agent: &'vm Agent,
    request: ExecRequest,
    stdin: Option<Stdin>,
    staged: Vec<(String, Vec<u8>)>,
    timeout: Option<Duration>,
}

/// How a command ran to completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// From the request to its exit.
    pub duration: Duration,
}

impl Output {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status.code == 0 && self.status.signal.is_none()
    }
}

impl<'vm> ExecBuilder<'vm> {
    pub(crate) fn new(agent: &'vm Agent) -> Self {
        ExecBuilder {
            agent,
            request: ExecRequest {
                argv: Vec::new(),
                env: Vec::new(),
                cwd: None,
                user: None,
                tty: None,
                stdin: false,
            },
            stdin: None,
            staged: Vec::new(),
            timeout: None,
        }
    }

    /// The program (looked up in `PATH`) and its arguments.
    pub fn argv<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.request.argv = argv.into_iter().map(Into::into).collect();
        self
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.request.argv.push(arg.into());
        self
    }

    /// Sets `NAME=value` for this command (over the VM's environment).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.request.env.push(format!("{name}={value}"));
        self
    }

    /// The working directory.
    pub fn cwd(mut self, dir: &str) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// The user (name, uid, `name:group`, `uid:gid`).
    pub fn user(mut self, user: &str) -> Self {
        self.request.user = Some(user.into());
        self
    }

    /// These bytes on stdin, then end of file (default: stdin is `/dev/null`).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(Stdin::Bytes(bytes.into()));
        self
    }

    /// No stdin at all (`/dev/null`), also for [`ExecBuilder::spawn`] (whose stdin is
    /// otherwise [`Child::stdin`]). On a terminal: no input, rather than an end of file.
    pub fn stdin_null(mut self) -> Self {
        self.stdin = Some(Stdin::Null);
        self
    }

    /// Stdin read from `reader` until its end.
    pub fn stdin_reader(mut self, reader: impl Read + Send + 'static) -> Self {
        self.stdin = Some(Stdin::Reader(Box::new(reader)));
        self
    }

    /// Writes a file into the guest (mode 0644, atomically) before the command runs.
    pub fn stage_file(mut self, path: &str, content: impl Into<Vec<u8>>) -> Self {
        self.staged.push((path.into(), content.into()));
        self
    }

    /// Runs the command on a terminal of `rows` × `cols` (its stdout and stderr are then the
    /// terminal's one output stream, read from stdout; [`Child::resize`] changes its size).
    pub fn tty(mut self, rows: u16, cols: u16) -> Self {
        self.request.tty = Some((rows, cols));
        self
    }

    /// Kills the command (SIGKILL to its process group) if it runs longer; `output`/`wait`
    /// then return [`Error::Timeout`].
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    fn start(mut self, open_stdin: bool) -> Result<Started> {
        if self.request.argv.is_empty() {
            return Err(Error::Config("exec: no command (argv is empty)".into()));
        }
        for (path, content) in &self.staged {
            self.agent.write_file(path, 0o644, &mut &content[..])?;
        }
        self.request.stdin = match self.stdin {
            Some(Stdin::Null) => false,
            Some(_) => true,
            None => open_stdin,
        };
        let what = format!("exec {:?}", self.request.argv[0]);
        let session = self
            .agent
            .spawn(self.request)
            .map_err(|e| spawn_error(e, &what))?;
        let input = session.input();
        match self.stdin {
            Some(Stdin::Bytes(b)) => session.stream_stdin(Box::new(io::Cursor::new(b))),
            Some(Stdin::Reader(r)) => session.stream_stdin(r),
            Some(Stdin::Null) | None => {}
        }
        let watchdog = self
            .timeout
            .map(|limit| Watchdog::start(limit, input.clone()));
        Ok(Started {
            session,
            input,
            watchdog,
            what,
            started: Instant::now(),
        })
    }

    /// Runs the command to completion and collects its output.
    pub fn output(self) -> Result<Output> {
        let Started {
            session,
            watchdog,
            what,
            started,
            ..
        } = self.start(false)?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = session.wait(&mut stdout, &mut stderr);
        finish(watchdog, &what)?;
        Ok(Output {
            status: status?,
            stdout,
            stderr,
            duration: started.elapsed(),
        })
    }

    /// Starts the command and returns at once: write its stdin, read its stdout and stderr,
    /// signal it, wait for it. Without [`ExecBuilder::stdin`] its stdin is [`Child::stdin`].
    pub fn spawn(self) -> Result<Child> {
        let open_stdin = self.stdin.is_none();
        let Started {
            session,
            input,
            watchdog,
            what,
            ..
        } = self.start(open_stdin)?;
        let pid = session.pid();
        let (out_read, out_write) = UnixStream::pair()?;
        let (err_read, err_write) = UnixStream::pair()?;
        let waiter = std::thread::Builder::new()
            .name(format!("exec-{pid}"))
            .spawn(move || {
                let mut out = Discarding(Some(out_write));
                let mut err = Discarding(Some(err_write));
                session.wait(&mut out, &mut err)
            })?;
        Ok(Child {
            pid,
            input: input.clone(),
            stdin: open_stdin.then_some(ChildStdin(input)),
            stdout: Some(ChildOutput(out_read)),
            stderr: Some(ChildOutput(err_read)),
            waiter: Some(waiter),
            watchdog,
            what,
        })
    }
}

struct Started {
    session: crate::agent::ExecSession,
    input: ExecInput,
    watchdog: Option<Watchdog>,
    what: String,
    started: Instant,
}

/// A command the guest could not start gets an error saying so (a shell's 127 and 126).
fn spawn_error(e: AgentClientError, what: &str) -> Error {
    use agent_protocol::ErrorKind;
    match e {
        AgentClientError::Remote(r) => match r.kind {
            ErrorKind::NotFound => Error::CommandNotFound(format!("{what}: {}", r.message)),
            ErrorKind::NotExecutable | ErrorKind::PermissionDenied => {
                Error::CommandNotExecutable(format!("{what}: {}", r.message))
            }
            _ => AgentClientError::Remote(r).into(),
        },
        e => e.into(),
    }
}

/// Kills a command that outlives its limit.
struct Watchdog {
    done: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
    limit: Duration,
}

impl Watchdog {
    fn start(limit: Duration, input: ExecInput) -> Watchdog {
        let (done, finished) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                f.store(true, Ordering::SeqCst);
                let _ = input.signal(SIGKILL);
            }
        });
        Watchdog { done, fired, limit }
    }
}

/// Stops the watchdog; the timeout error if it fired.
fn finish(watchdog: Option<Watchdog>, what: &str) -> Result<()> {
    if let Some(w) = watchdog {
        let _ = w.done.send(());
        if w.fired.load(Ordering::SeqCst) {
            return Err(Error::Timeout {
                what: what.into(),
                after: w.limit,
            });
        }
    }
    Ok(())
}

/// Output nobody reads any more is dropped instead of failing the command.
struct Discarding(Option<UnixStream>);

impl Write for Discarding {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if let Some(s) = &mut self.0 {
            if s.write_all(b).is_err() {
                self.0 = None;
            }
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A command started with [`ExecBuilder::spawn`].
pub struct Child {
    pid: u32,
    input: ExecInput,
    /// Its stdin (dropping or [`ChildStdin::close`] sends end of file).
    pub stdin: Option<ChildStdin>,
    /// Its stdout.
    pub stdout: Option<ChildOutput>,
    /// Its stderr.
    pub stderr: Option<ChildOutput>,
    waiter: Option<JoinHandle<std::result::Result<ExitStatus, AgentClientError>>>,
    watchdog: Option<Watchdog>,
    what: String,
}

impl Child {
    /// Its process id in the guest.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Sends signal `n` (e.g. 15 for SIGTERM) to its process group.
    pub fn signal(&self, n: i32) -> Result<()> {
        Ok(self.input.signal(n)?)
    }

    /// Resizes its terminal (started with [`ExecBuilder::tty`]; ignored otherwise).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        Ok(self.input.resize(rows, cols)?)
    }

    /// A handle that signals and resizes it from another thread (e.g. a signal forwarder),
    /// valid while the command runs.
    pub fn controller(&self) -> ChildController {
        ChildController(self.input.clone())
    }

    /// Waits for it to exit. Output not read by then is discarded.
    pub fn wait(mut self) -> Result<ExitStatus> {
        drop(self.stdin.take());
        // Unread output must not hold the command up.
        drop(self.stdout.take());
        drop(self.stderr.take());
        self.join()
    }

    /// Waits for it to exit, collecting the output not read yet.
    pub fn wait_with_output(mut self) -> Result<Output> {
        let started = Instant::now();
        drop(self.stdin.take());
        let collect = |o: Option<ChildOutput>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                if let Some(mut o) = o {
                    let _ = o.read_to_end(&mut v);
                }
                v
            })
        };
        let (out, err) = (collect(self.stdout.take()), collect(self.stderr.take()));
        let status = self.join()?;
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            duration: started.elapsed(),
        })
    }

    fn join(&mut self) -> Result<ExitStatus> {
        let status = match self.waiter.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => return Err(Error::Guest("the exec session ended abnormally".into())),
        };
        finish(self.watchdog.take(), &self.what)?;
        Ok(status?)
    }
}

/// Signals or resizes a [`Child`] from anywhere ([`Child::controller`]).
#[derive(Clone)]
pub struct ChildController(ExecInput);

impl ChildController {
    /// As [`Child::signal`].
    pub fn signal(&self, n: i32) -> Result<()> {
        Ok(self.0.signal(n)?)
    }

    /// As [`Child::resize`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        Ok(self.0.resize(rows, cols)?)
    }
}

/// The stdin of a [`Child`].
pub struct ChildStdin(ExecInput);

impl ChildStdin {
    /// Sends end of file.
    pub fn close(self) {}
}

impl Write for ChildStdin {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b).map_err(io::Error::other)?;
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChildStdin {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// The stdout or stderr of a [`Child`]: read until end of file.
pub struct ChildOutput(UnixStream);

impl Read for ChildOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
