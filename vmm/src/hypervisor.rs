//! Opening the hypervisor this build and platform use.

use vmm_core::arch::host::ArchHypervisor;

use crate::BootError;

/// The backend this build uses on this platform, for messages (`KVM`, `HVF`, `WHP`).
pub fn backend_name() -> &'static str {
    if cfg!(target_os = "linux") {
        "KVM"
    } else if cfg!(target_os = "macos") {
        "HVF"
    } else if cfg!(windows) {
        "WHP"
    } else {
        "a hypervisor"
    }
}

/// Opens this platform's hypervisor: the backend its cargo feature selects (`kvm` on Linux
/// x86-64 and arm64). The first call also raises this process's open-files limit (see
/// [`raise_open_files_limit`]).
pub fn open_hypervisor() -> Result<Box<dyn ArchHypervisor>, BootError> {
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(|| {
        raise_open_files_limit();
    });
    #[cfg(all(
        feature = "kvm",
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        Ok(Box::new(vmm_kvm::KvmHypervisor::new()?))
    }
    #[cfg(not(all(
        feature = "kvm",
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    {
        Err(BootError::Hypervisor(
            vmm_core::HypervisorError::Unavailable(
                "this build has no hypervisor backend for this platform (KVM on Linux x86-64 and \
                 arm64 needs the `kvm` feature; macOS and Windows are not supported yet)"
                    .into(),
            ),
        ))
    }
}

/// Raises the soft limit on open descriptors to the hard limit and returns the new soft
/// limit. A VM's NAT may hold hundreds of host sockets (512 TCP + 128 UDP flows), so with the
/// usual soft limit of 1024 two busy guests in one process would starve each other's (and the
/// process's own) accepts and restores.
pub fn raise_open_files_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the rlimit we pass; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0);
        limit
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let before = nofile();
        // Just below what it is (other tests run meanwhile): the raise must undo it.
        let lowered = libc::rlimit {
            rlim_cur: before.rlim_cur.min(before.rlim_max) - 1,
            rlim_max: before.rlim_max,
        };
        // SAFETY: setrlimit reads the rlimit we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(raise_open_files_limit(), before.rlim_max);
        assert_eq!(nofile().rlim_cur, before.rlim_max);
    }
}
