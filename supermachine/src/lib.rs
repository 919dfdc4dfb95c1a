//! # supermachine
//!
//! Run OCI images as hardware-isolated microVMs. This facade crate is the only one that picks a
//! hypervisor backend and concrete devices; it offers the library API and the `supermachine`
//! command-line tool built on it.
//!
//! Today it boots a kernel and initramfs with our `guest-init` as PID 1 and carries the guest
//! command's exit status back ([`boot`]), and pulls OCI images into root filesystem images
//! ([`images`]). Running images, snapshots and the `Vm`/`Pool` API arrive with their issues.
#![deny(missing_docs)]

pub mod agent;
pub mod boot;
pub mod control;
mod error;
mod exec;
mod image;
pub mod images;
mod machine;
pub mod paths;
mod pool;
pub mod ports;
pub mod run;
pub mod snapshot;
pub mod timings;
pub mod tls;
pub mod vms;
pub mod volumes;

pub use boot::{boot, BootError, BootOptions, BootOutcome, DiskSpec};
pub use error::{Error, Result};
pub use exec::{Child, ChildOutput, ChildStdin, ExecBuilder, ExitStatus, Output};
pub use image::{BakeOptions, Image};
pub use machine::{Vm, VmConfig, Workload};
pub use pool::{Pool, PoolBuilder, PoolStats, Pooled};
pub use ports::PortMapping;
pub use run::{PullPolicy, ReadyCheck};
pub use tls::TlsTermination;
pub use vmm_core::{VmControl, VmExit};
