//! The library API's one error type: variants a caller can act on, with the underlying cause
//! kept for the rest.

use std::time::Duration;

use crate::agent::AgentClientError;
use crate::run::RunError;

/// What went wrong in a library call ([`crate::Image`], [`crate::Vm`], [`crate::Pool`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image is not in the registry, layout or archive (or not local with
    /// [`crate::PullPolicy::Never`]).
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// The registry refused our credentials (or asked for some).
    #[error("registry authentication failed: {0}")]
    RegistryAuth(String),
    /// Pulling or unpacking the image failed otherwise.
    #[error(transparent)]
    Image(crate::images::PullError),
    /// No usable hardware virtualization (`/dev/kvm` missing or not ours to use, or no backend
    /// for this platform in this build).
    #[error("{backend} is not available: {reason}")]
    HypervisorUnavailable {
        /// The backend this platform uses (`KVM`, `HVF`, `WHP`).
        backend: &'static str,
        /// Why not, as the backend says it.
        reason: String,
    },
    /// The guest kernel panicked.
    #[error("the guest kernel panicked: {line}")]
    GuestPanicked {
        /// The panic line from the guest's console.
        line: String,
    },
    /// The VM ended without the workload's status (a guest that never came up, a reset).
    #[error("the VM failed: {why}{tail}")]
    GuestFailed {
        /// How it ended.
        why: String,
        /// Its last console lines.
        tail: String,
    },
    /// The workload exited before the VM was ready for use.
    #[error("the workload exited with status {status} before the VM was ready{}", stderr_tail(.stderr))]
    ExitedEarly {
        /// Its exit status.
        status: i32,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
    /// Something took longer than its limit (it was stopped).
    #[error("{what} did not finish within {after:?} (stopped)")]
    Timeout {
        /// What timed out.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// Every VM of the pool stayed in use for the whole wait.
    #[error("pool exhausted: all {max} VMs stayed in use for {waited:?}")]
    PoolExhausted {
        /// The pool's size.
        max: usize,
        /// How long `acquire` waited.
        waited: Duration,
    },
    /// The pool cannot make VMs (each restore fails): the last failure.
    #[error("the pool cannot start VMs: {0}")]
    PoolBroken(String),
    /// The VM has stopped: no more operations on it.
    #[error("the VM has stopped")]
    VmStopped,
    /// The VM is paused: unpause it first.
    #[error("VM {0} is paused: unpause it first")]
    VmPaused(String),
    /// No VM of this user has that name or id ([`crate::VmHandle::find`]).
    #[error("no such VM: {0}")]
    VmNotFound(String),
    /// The operation needs the VM stopped first (removing it without force).
    #[error("VM {0} is running")]
    VmRunning(String),
    /// The command to run in the guest does not exist (a shell's status 127).
    #[error("{0}")]
    CommandNotFound(String),
    /// The command to run in the guest is not executable (a shell's status 126).
    #[error("{0}")]
    CommandNotExecutable(String),
    /// A guest path to write is a directory.
    #[error("in the guest: {0}")]
    IsADirectory(String),
    /// The guest agent refused or failed the operation (a missing file, a bad path…).
    #[error("in the guest: {0}")]
    Guest(String),
    /// A snapshot could not be taken or restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A setting is invalid (a port mapping, a volume, TLS material…).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A host I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Anything else `run` reports.
    #[error(transparent)]
    Run(RunError),
}

fn stderr_tail(s: &str) -> String {
    if s.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", s.trim_end())
    }
}

/// The library's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::images::PullError> for Error {
    fn from(e: crate::images::PullError) -> Self {
        use oci_bake::registry::RegistryError;
        use oci_bake::PullError;
        match e {
            PullError::Registry(
                r @ (RegistryError::ManifestNotFound { .. }
                | RegistryError::RepositoryNotFound { .. }),
            ) => Error::ImageNotFound(r.to_string()),
            PullError::Registry(r @ RegistryError::Unauthorized { .. }) => {
                Error::RegistryAuth(r.to_string())
            }
            e @ PullError::TagNotFound { .. } => Error::ImageNotFound(e.to_string()),
            e => Error::Image(e),
        }
    }
}

impl From<RunError> for Error {
    fn from(e: RunError) -> Self {
        use crate::boot::BootError;
        use vmm_core::HypervisorError;
        match e {
            RunError::Pull(p) => p.into(),
            RunError::NotLocal(r) => {
                Error::ImageNotFound(format!("{r} (not pulled, and pull never)"))
            }
            RunError::Boot(BootError::Hypervisor(
                h @ (HypervisorError::Unavailable(_) | HypervisorError::PermissionDenied(_)),
            )) => Error::HypervisorUnavailable {
                backend: crate::boot::backend_name(),
                reason: h.to_string(),
            },
            RunError::NoStatus { why, tail } => {
                match tail.lines().find(|l| l.contains("Kernel panic")) {
                    Some(line) => Error::GuestPanicked {
                        line: line.trim().to_string(),
                    },
                    None => Error::GuestFailed { why, tail },
                }
            }
            RunError::Restore { dir, why } => {
                Error::Snapshot(format!("cannot restore {}: {why}", dir.display()))
            }
            RunError::Bake(why) => Error::Snapshot(format!("bake failed: {why}")),
            RunError::Volume(v) => Error::Config(v.to_string()),
            RunError::Publish(e) => Error::Config(e.to_string()),
            RunError::Tls(e) => Error::Config(e),
            e => Error::Run(e),
        }
    }
}

impl From<AgentClientError> for Error {
    fn from(e: AgentClientError) -> Self {
        match e {
            AgentClientError::Remote(r) if r.kind == agent_protocol::ErrorKind::IsDirectory => {
                Error::IsADirectory(r.message)
            }
            AgentClientError::Remote(r) => Error::Guest(r.message),
            AgentClientError::Unreachable { .. } => Error::VmStopped,
            AgentClientError::Protocol(agent_protocol::ProtocolError::Io(io)) => Error::Io(io),
            e => Error::Guest(e.to_string()),
        }
    }
}

impl From<crate::tls::TlsError> for Error {
    fn from(e: crate::tls::TlsError) -> Self {
        Error::Config(e.to_string())
    }
}

impl From<crate::vms::VmRegistryError> for Error {
    fn from(e: crate::vms::VmRegistryError) -> Self {
        Error::Run(RunError::Registry(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_panic_in_the_console_tail_is_its_own_variant() {
        let e: Error = RunError::NoStatus {
            why: "the guest reset".into(),
            tail: "\n  [ 1.2] Kernel panic - not syncing: Attempted to kill init!\n".into(),
        }
        .into();
        match e {
            Error::GuestPanicked { line } => {
                assert!(line.starts_with("[ 1.2] Kernel panic"), "{line}")
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn missing_images_and_unusable_kvm_are_their_own_variants() {
        let e: Error = RunError::NotLocal("busybox".into()).into();
        assert!(matches!(e, Error::ImageNotFound(_)), "{e:?}");
        let e: Error = RunError::Boot(crate::boot::BootError::Hypervisor(
            vmm_core::HypervisorError::Unavailable("/dev/kvm: No such file".into()),
        ))
        .into();
        assert!(matches!(e, Error::HypervisorUnavailable { .. }), "{e:?}");
        assert!(e.to_string().starts_with("KVM is not available: "), "{e}");
    }
}
