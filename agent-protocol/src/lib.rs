//! The wire protocol between the supermachine host and the agent inside the guest.
//!
//! Owns the framing and the messages, and nothing else: no sockets, no processes. The host
//! side (`supermachine`) and the guest side (`guest-init`'s agent) both use it, so they agree
//! by construction; [`VERSION`] guards against an old initramfs meeting a new host.
//!
//! # Transport
//! One byte stream per operation: a vsock connection to [`AGENT_PORT`] in the guest (the host
//! reaches it through the VM's vsock Unix socket). Each connection carries exactly one
//! [`Request`], sent first by the host; the agent answers and closes.
//!
//! # Framing
//! ```text
//! frame   := length:u32le kind:u8 payload      length = 1 + payload length, ≤ MAX_FRAME
//! ```
//! Control frames carry JSON (small, debuggable); data frames carry raw bytes.
//!
//! # Conversations
//! - **Exec**: host `Request(Exec)` → agent `Started{pid}` or `Error`; then, interleaved, host
//!   `Data` (stdin), `Eof` (stdin closed), `Signal`, `Resize`; agent `Stdout`, `Stderr`, and
//!   finally `Exit` once the process has exited *and* its output is drained.
//! - **WriteFile**: host `Request(WriteFile)`, `Data`…, `Eof` → agent `Done` or `Error`. The
//!   file appears atomically (written beside, then renamed).
//! - **ReadFile**: host `Request(ReadFile)` → agent `FileInfo{mode,size}`, `Data`…, `Eof`, or
//!   `Error`.
//! - **Connect**: host `Request(Connect{port})` → agent `Done` or `Error`; after `Done` the
//!   connection is a raw byte stream to `127.0.0.1:port` inside the guest (no more frames),
//!   half-close included.
//! - **Ping**: → `Done`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. A request with another version is refused with
/// [`ErrorKind::UnsupportedVersion`].
pub const VERSION: u32 = 1;

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// The largest frame (kind byte + payload).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest data payload senders should use (leaves room under [`MAX_FRAME`]).
pub const DATA_CHUNK: usize = 256 << 10;

/// What went wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("agent connection closed in the middle of a frame")]
    Truncated,
    /// A frame's length is zero or over [`MAX_FRAME`].
    #[error("bad frame length {0}")]
    BadLength(u32),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control frame's JSON or a fixed-size payload did not parse.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// The frame kind's name.
        kind: &'static str,
        /// Why.
        why: String,
    },
}

/// The first frame of a connection: what the host wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The sender's [`VERSION`].
    pub version: u32,
    /// The operation.
    pub op: Operation,
}

impl Request {
    /// A request for `op` at this crate's version.
    pub fn new(op: Operation) -> Self {
        Request {
            version: VERSION,
            op,
        }
    }
}

/// Operations the agent performs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Operation {
    /// Run a process.
    Exec(ExecRequest),
    /// Create or replace a file with the `Data` frames that follow.
    WriteFile {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Send a file's contents.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
    },
    /// Turn this connection into a byte stream to `127.0.0.1:port` in the guest.
    Connect {
        /// The guest TCP port.
        port: u16,
    },
    /// Answer `Done` (liveness and latency checks).
    Ping,
    /// The VM was just restored from a snapshot: catch up with the host (answer `Done`).
    Restored(RestoredInfo),
}

/// What the guest learns after a restore, so that clones of one snapshot do not share a stale
/// clock, the same random numbers, or the baking run's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestoredInfo {
    /// The host's wall clock, nanoseconds since the Unix epoch: the guest's is stepped to it.
    pub unix_time_ns: u64,
    /// Fresh random bytes from the host, mixed into the guest's pool, which is then reseeded.
    pub entropy: Vec<u8>,
    /// `KEY=value` entries added to the environment of every process started from now on
    /// (exec); the workload, already running, keeps its own.
    pub env: Vec<String>,
    /// The new host name, if it changes.
    pub hostname: Option<String>,
}

/// A process to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` from `env`.
    pub argv: Vec<String>,
    /// `KEY=value` entries added to (and overriding) the workload's environment.
    pub env: Vec<String>,
    /// Working directory (default: the workload's).
    pub cwd: Option<String>,
    /// User as Docker spells it (`name`, `uid`, `uid:gid`); default: the workload's.
    pub user: Option<String>,
    /// Give the process a terminal of (rows, columns); stdout and stderr are then one stream.
    pub tty: Option<(u16, u16)>,
    /// Keep stdin open for `Data`/`Eof` frames (otherwise it is /dev/null).
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// The exit code, or 128 + signal when killed (as a shell reports it).
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

/// A failure the agent reports instead of doing what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// For people.
    pub message: String,
}

/// Failure kinds a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The program or file does not exist (exec: as exit status 127).
    NotFound,
    /// It exists but cannot be executed (exec: as 126).
    NotExecutable,
    /// Permission denied.
    PermissionDenied,
    /// The request does not make sense (bad path, unknown user…).
    Invalid,
    /// The path names a directory where a file was expected.
    IsDirectory,
    /// Nothing listens on the guest port.
    ConnectionRefused,
    /// The host speaks a protocol version the agent does not.
    UnsupportedVersion,
    /// Anything else.
    Other,
}

/// Metadata sent before a file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host → agent, first: the request.
    Request(Request),
    /// Bytes: stdin (exec), file contents (write/read).
    Data(Vec<u8>),
    /// The `Data` stream ended.
    Eof,
    /// Host → agent: deliver this signal to the process (exec).
    Signal(i32),
    /// Host → agent: the terminal's new size (rows, columns).
    Resize(u16, u16),
    /// Agent → host: the process started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Agent → host: process output.
    Stdout(Vec<u8>),
    /// Agent → host: process error output.
    Stderr(Vec<u8>),
    /// Agent → host: the process ended (last frame of an exec).
    Exit(ExitStatus),
    /// Agent → host: the request failed.
    Error(AgentError),
    /// Agent → host: a file's metadata (before its `Data`).
    FileInfo(FileInfo),
    /// Agent → host: the request succeeded.
    Done,
}

mod kind {
    pub const REQUEST: u8 = 1;
    pub const DATA: u8 = 2;
    pub const EOF: u8 = 3;
    pub const SIGNAL: u8 = 4;
    pub const RESIZE: u8 = 5;
    pub const STARTED: u8 = 16;
    pub const STDOUT: u8 = 17;
    pub const STDERR: u8 = 18;
    pub const EXIT: u8 = 19;
    pub const ERROR: u8 = 20;
    pub const FILE_INFO: u8 = 21;
    pub const DONE: u8 = 22;
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse_json<'a, T: Deserialize<'a>>(kind: &'static str, b: &'a [u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(b).map_err(|e| ProtocolError::Malformed {
        kind,
        why: e.to_string(),
    })
}

fn fixed<const N: usize>(kind: &'static str, b: &[u8]) -> Result<[u8; N], ProtocolError> {
    b.try_into().map_err(|_| ProtocolError::Malformed {
        kind,
        why: format!("{} bytes, expected {N}", b.len()),
    })
}

impl Frame {
    /// The frame's kind byte and payload.
    fn parts(&self) -> (u8, std::borrow::Cow<'_, [u8]>) {
        use std::borrow::Cow::{Borrowed, Owned};
        match self {
            Frame::Request(r) => (kind::REQUEST, Owned(json(r))),
            Frame::Data(d) => (kind::DATA, Borrowed(d)),
            Frame::Eof => (kind::EOF, Borrowed(&[])),
            Frame::Signal(n) => (kind::SIGNAL, Owned(n.to_le_bytes().to_vec())),
            Frame::Resize(r, c) => {
                let mut b = r.to_le_bytes().to_vec();
                b.extend_from_slice(&c.to_le_bytes());
                (kind::RESIZE, Owned(b))
            }
            Frame::Started { pid } => (kind::STARTED, Owned(pid.to_le_bytes().to_vec())),
            Frame::Stdout(d) => (kind::STDOUT, Borrowed(d)),
            Frame::Stderr(d) => (kind::STDERR, Borrowed(d)),
            Frame::Exit(s) => (kind::EXIT, Owned(json(s))),
            Frame::Error(e) => (kind::ERROR, Owned(json(e))),
            Frame::FileInfo(i) => (kind::FILE_INFO, Owned(json(i))),
            Frame::Done => (kind::DONE, Borrowed(&[])),
        }
    }

    /// Parses a frame from its kind byte and payload.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, ProtocolError> {
        Ok(match kind {
            kind::REQUEST => Frame::Request(parse_json("request", payload)?),
            kind::DATA => Frame::Data(payload.to_vec()),
            kind::EOF => Frame::Eof,
            kind::SIGNAL => Frame::Signal(i32::from_le_bytes(fixed("signal", payload)?)),
            kind::RESIZE => {
                let b: [u8; 4] = fixed("resize", payload)?;
                Frame::Resize(
                    u16::from_le_bytes([b[0], b[1]]),
                    u16::from_le_bytes([b[2], b[3]]),
                )
            }
            kind::STARTED => Frame::Started {
                pid: u32::from_le_bytes(fixed("started", payload)?),
            },
            kind::STDOUT => Frame::Stdout(payload.to_vec()),
            kind::STDERR => Frame::Stderr(payload.to_vec()),
            kind::EXIT => Frame::Exit(parse_json("exit", payload)?),
            kind::ERROR => Frame::Error(parse_json("error", payload)?),
            kind::FILE_INFO => Frame::FileInfo(parse_json("file info", payload)?),
            kind::DONE => Frame::Done,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }

    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload) = self.parts();
        let mut out = Vec::with_capacity(5 + payload.len());
        out.extend_from_slice(&(1 + payload.len() as u32).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(&payload);
        out
    }
}

/// Writes one frame (header and payload in one write, so frames from several threads sharing
/// a locked writer never interleave).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    let bytes = frame.encode();
    if bytes.len() - 4 > MAX_FRAME {
        return Err(ProtocolError::BadLength((bytes.len() - 4) as u32));
    }
    w.write_all(&bytes)?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly between frames.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len);
    if len == 0 || len as usize > MAX_FRAME {
        return Err(ProtocolError::BadLength(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Frame::decode(body[0], &body[1..]).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_frame() -> Vec<Frame> {
        vec![
            Frame::Request(Request::new(Operation::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo $X".into()],
                env: vec!["X=1".into()],
                cwd: Some("/tmp".into()),
                user: Some("1000:1000".into()),
                tty: Some((24, 80)),
                stdin: true,
            }))),
            Frame::Request(Request::new(Operation::WriteFile {
                path: "/etc/x".into(),
                mode: 0o644,
            })),
            Frame::Request(Request::new(Operation::ReadFile { path: "/x".into() })),
            Frame::Request(Request::new(Operation::Connect { port: 80 })),
            Frame::Request(Request::new(Operation::Ping)),
            Frame::Data(vec![0, 1, 2, 255]),
            Frame::Data(Vec::new()),
            Frame::Eof,
            Frame::Signal(15),
            Frame::Resize(50, 132),
            Frame::Started { pid: 42 },
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(b"err".to_vec()),
            Frame::Exit(ExitStatus {
                code: 137,
                signal: Some(9),
            }),
            Frame::Error(AgentError {
                kind: ErrorKind::NotFound,
                message: "no such file".into(),
            }),
            Frame::FileInfo(FileInfo {
                mode: 0o755,
                size: 1 << 33,
            }),
            Frame::Done,
        ]
    }

    #[test]
    fn every_frame_round_trips_through_a_stream() {
        let frames = every_frame();
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).unwrap();
        }
        let mut r = &wire[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
        }
        assert!(read_frame(&mut r).unwrap().is_none(), "clean end");
    }

    #[test]
    fn a_stream_cut_anywhere_inside_a_frame_is_truncated_not_a_frame() {
        let wire = Frame::Stdout(b"hello".to_vec()).encode();
        for cut in 1..wire.len() {
            let mut r = &wire[..cut];
            assert!(
                matches!(read_frame(&mut r), Err(ProtocolError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let frame = |len: u32, rest: &[u8]| {
            let mut b = len.to_le_bytes().to_vec();
            b.extend_from_slice(rest);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(0, &[]), "zero length"),
            (frame(MAX_FRAME as u32 + 1, &[2]), "oversized"),
            (frame(u32::MAX, &[2]), "huge"),
            (frame(1, &[99]), "unknown kind"),
            (frame(3, &[kind::SIGNAL, 1, 2]), "short signal"),
            (frame(4, &[kind::RESIZE, 1, 2, 3]), "short resize"),
            (
                frame(3, &[kind::REQUEST, b'{', b'}']),
                "request without fields",
            ),
            (frame(5, &[kind::EXIT, b'n', b'u', b'l', b'l']), "null exit"),
        ];
        for (bytes, what) in cases {
            let mut r = &bytes[..];
            assert!(read_frame(&mut r).is_err(), "{what}");
        }
        // A length within bounds whose bytes never come.
        let mut r = &frame(MAX_FRAME as u32, &[2])[..];
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Truncated)));
    }

    #[test]
    fn requests_from_another_version_still_parse_so_the_agent_can_refuse_them() {
        let wire = br#"{"version":7,"op":"ping"}"#;
        let f = Frame::decode(kind::REQUEST, wire).unwrap();
        assert_eq!(
            f,
            Frame::Request(Request {
                version: 7,
                op: Operation::Ping
            })
        );
        // Unknown fields are refused rather than silently ignored.
        assert!(Frame::decode(kind::REQUEST, br#"{"version":1,"op":"ping","x":1}"#).is_err());
        assert!(Frame::decode(kind::REQUEST, br#"{"version":1,"op":"reboot"}"#).is_err());
    }

    #[test]
    fn oversized_frames_are_refused_on_write() {
        let mut sink = Vec::new();
        assert!(write_frame(&mut sink, &Frame::Data(vec![0; MAX_FRAME])).is_err());
        assert!(sink.is_empty());
        write_frame(&mut sink, &Frame::Data(vec![0; MAX_FRAME - 1])).unwrap();
    }
}
