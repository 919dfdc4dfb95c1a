//! # supermachine
//!
//! Run OCI images as hardware-isolated microVMs. This facade crate is the only one that picks a
//! hypervisor backend (cargo feature `kvm`, on by default) and concrete devices; it offers the
//! library API below. The `supermachine` command-line tool is the `supermachine-cli` crate, built
//! on exactly this API; this crate pulls no command-line dependencies.
//!
//! ## The common flow
//!
//! An [`Image`] comes from the local store (pulled when missing); [`Image::start`] gives a
//! running [`Vm`], by default an idle sandbox that waits for commands:
//!
//! ```no_run
//! # fn main() -> supermachine::Result<()> {
//! use supermachine::{Image, VmConfig};
//!
//! let vm = Image::open("busybox")?.start(&VmConfig::new())?;
//! let out = vm.exec_builder().argv(["echo", "hello"]).output()?;
//! assert_eq!(out.stdout, b"hello\n");
//! # Ok(()) }
//! ```
//!
//! Commands take env, a working directory, a user, stdin (bytes or a reader), files staged
//! before they run and a timeout ([`ExecBuilder`]); [`ExecBuilder::spawn`] streams instead
//! ([`Child`]). A [`Vm`] also reads and writes guest files, opens streams to guest ports
//! ([`Vm::connect`]), publishes them on the host ([`Vm::expose_tcp`], [`Vm::expose_tls`]),
//! snapshots itself ([`Vm::snapshot`]) and stops ([`Vm::stop`]; dropping it powers it off).
//! [`VmConfig`] runs the image's own command instead with [`Workload::ImageCommand`] or
//! [`VmConfig::command`].
//!
//! ## Baked images and pools
//!
//! [`Image::bake`] boots the image once, waits until it is ready and snapshots it; every start
//! of the baked image is then a restore (milliseconds on real hardware), and clones share the
//! snapshot's unmodified memory. A [`Pool`] keeps such clones restored ahead of demand; each
//! [`Pool::acquire`] gets a fresh one, and releasing it throws it away, so nothing passes from
//! one user to the next:
//!
//! ```no_run
//! # fn main() -> supermachine::Result<()> {
//! use supermachine::Image;
//!
//! let pool = Image::open("busybox")?.pool().min(2).max(8).build()?;
//! let vm = pool.acquire()?;
//! vm.write_file("/tmp/input", b"untrusted")?;
//! let out = vm.exec_builder().argv(["wc", "-c", "/tmp/input"]).output()?;
//! drop(vm); // powered off; a fresh clone takes its place
//! # Ok(()) }
//! ```
//!
//! Every call returns [`Result`] with one [`Error`] whose variants say what to do next (image
//! not found, registry authentication, hypervisor unavailable, guest panicked, timeout, pool
//! exhausted…). VMs run on threads of the calling process; they show in `supermachine ps`.
//! Runnable examples: `examples/sandbox.rs`, `examples/pool.rs`, `examples/server.rs`.
//!
//! ## Foreground runs, other processes' VMs, the store
//!
//! [`Image::run`] runs a workload in the foreground as `docker run` does ([`Attach`] says where
//! its stdin, stdout and stderr go). [`VmHandle`] finds any VM of this user by name or id,
//! whichever process runs it, and execs in it, copies files, snapshots, stops or removes it.
//! [`Image::list`], [`Image::remove`], [`Image::prune`] and [`Volume`] manage what is stored.
//! The `supermachine` CLI is built on exactly these calls (its `boot` command on [`boot()`]).
//! With the `tokio` feature, `supermachine::tokio` wraps the blocking calls for async code.
//!
//! The modules below the API ([`run`], [`boot`](mod@boot), [`snapshot`], [`images`], [`ports`],
//! [`tls`]…) are the machinery under it; they are public for tools that need more control.
#![deny(missing_docs)]

pub mod agent;
pub mod boot;
pub mod control;
mod error;
mod exec;
mod handle;
mod health;
mod image;
pub mod images;
mod local;
mod machine;
pub mod network;
pub mod paths;
mod pool;
pub mod ports;
pub mod run;
mod stats;
#[cfg(feature = "tls")]
pub mod tls;
/// TLS termination (not in this build: the `tls` feature is off).
#[cfg(not(feature = "tls"))]
#[path = "tls_off.rs"]
pub mod tls;
/// Async wrappers for tokio programs.
#[cfg(feature = "tokio")]
#[path = "asynchronous.rs"]
pub mod tokio;
pub mod vms;
pub mod volumes;

pub use vmm::{seccomp, snapshot, timings};

pub use boot::{boot, BootError, BootOptions, BootOutcome, DiskSpec};
pub use error::{Error, Result};
pub use exec::{Child, ChildController, ChildOutput, ChildStdin, ExecBuilder, ExitStatus, Output};
pub use handle::{FileInfo, ForkSnapshot, VmHandle, VmInfo, VmStatus};
pub use health::{Health, HealthCheck, HealthStatus};
pub use image::{Attach, BakeOptions, Image};
pub use local::{BakedInfo, ImageInfo, Pruned, PullOptions, Removed, Volume};
pub use machine::{Vm, VmConfig, Workload};
pub use pool::{Pool, PoolBuilder, PoolStats, Pooled};
pub use ports::PortMapping;
pub use run::{InvalidRestartPolicy, PullPolicy, RawTerminal, ReadyCheck, RestartPolicy};
pub use stats::{GuestUse, VmStats};
pub use tls::TlsTermination;
pub use vmm_core::{CaptureError, VmControl, VmExit};
