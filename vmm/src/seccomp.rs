//! The VMM process's system-call filter: once a VM is set up and before its vCPUs run, every
//! thread of the process is limited to the system calls a running VMM makes (KVM ioctls, I/O on
//! descriptors it holds, files of snapshots and shares, sockets of its network and ports,
//! threads, memory, time). Whatever a guest might make a buggy VMM do, it cannot then start
//! programs, trace processes, mount, load kernel modules or BPF, or enter namespaces.
//!
//! A program opts in with [`enable`] (the `supermachine` CLI does, for the processes that run
//! VMs); a library user's own process is not filtered unless it asks. The filter covers the
//! whole process (`SECCOMP_FILTER_FLAG_TSYNC`) with `no_new_privs`. A call outside it stops the
//! process with one line on stderr: `supermachine: SECCOMP: system call N is not allowed`.
//!
//! `SUPERMACHINE_SECCOMP=off` leaves the process unfiltered; `=log` allows every call but has
//! the kernel's audit log record those outside the list (only where the kernel prints audit
//! records; running the tests enforcing is the dependable way to find what a new path needs).

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter did not compile or the kernel refused it.
    #[error("cannot install the system-call filter: {0}")]
    Install(String),
}

/// Filters this process from its next VM's start on (see the [module docs](self)).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// What `SUPERMACHINE_SECCOMP` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Enforce,
    Log,
    Off,
}

fn mode() -> Mode {
    match std::env::var("SUPERMACHINE_SECCOMP").as_deref() {
        Ok("off") | Ok("0") => Mode::Off,
        Ok("log") => Mode::Log,
        _ => Mode::Enforce,
    }
}

/// Installs the filter on every thread of the process if [`enable`] was called (once; later
/// calls do nothing). Called right before a VM's vCPUs run.
pub(crate) fn install_if_enabled() -> Result<(), SeccompError> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if !ENABLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    INSTALLED
        .get_or_init(|| match mode() {
            Mode::Off => Ok(()),
            mode => imp::install(mode == Mode::Log),
        })
        .clone()
        .map_err(SeccompError::Install)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::collections::BTreeMap;

    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

    /// The system calls of a running VMM (x86-64 numbers through `libc`).
    pub(super) const ALLOWED: &[libc::c_long] = &[
        // Descriptors: I/O, polling, events.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_lseek,
        libc::SYS_pipe2,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_select,
        libc::SYS_pselect6,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_splice,
        libc::SYS_sendfile,
        libc::SYS_copy_file_range,
        // Files: snapshots, disks, shared directories (the virtio-fs passthrough server).
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_stat,
        libc::SYS_fstat,
        libc::SYS_lstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_chdir,
        libc::SYS_fchdir,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rmdir,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_link,
        libc::SYS_linkat,
        libc::SYS_symlink,
        libc::SYS_symlinkat,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_mknodat,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_chown,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_lchown,
        libc::SYS_utimensat,
        libc::SYS_truncate,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_sync_file_range,
        libc::SYS_flock,
        libc::SYS_umask,
        libc::SYS_getxattr,
        libc::SYS_lgetxattr,
        libc::SYS_fgetxattr,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_listxattr,
        libc::SYS_llistxattr,
        libc::SYS_flistxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
        // Sockets: the user-mode network, published ports, vsock and control sockets.
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        // Memory.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_membarrier,
        // Threads, signals (vCPU kicks), time, identity.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_set_tid_address,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getcpu,
        libc::SYS_prctl,
        libc::SYS_arch_prctl,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_tgkill,
        libc::SYS_tkill,
        libc::SYS_kill,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_uname,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        // The passthrough server creates files as the guest's user when the VMM is root.
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        libc::SYS_capget,
        libc::SYS_getrlimit,
        libc::SYS_prlimit64,
        libc::SYS_restart_syscall,
        libc::SYS_wait4,
        libc::SYS_waitid,
    ];

    fn program(log: bool) -> Result<BpfProgram, String> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
        let mismatch = if log {
            SeccompAction::Log
        } else {
            SeccompAction::Trap
        };
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| e.to_string())?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())
    }

    pub(super) fn install(log: bool) -> Result<(), String> {
        apply(&program(log)?, log)
    }

    fn apply(program: &BpfProgram, log: bool) -> Result<(), String> {
        if !log {
            on_sigsys_report_and_exit()?;
        }
        seccompiler::apply_filter_all_threads(program).map_err(|e| e.to_string())
    }

    /// The SIGSYS a refused call raises: one line on stderr naming the call, then exit 125
    /// (supermachine failed).
    fn on_sigsys_report_and_exit() -> Result<(), String> {
        extern "C" fn report(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
            // The kernel's siginfo for SIGSYS holds the call number after the faulting
            // address: 16 bytes of header, then `_call_addr`, then `_syscall`.
            // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for
            // SIGSYS the int at that offset is `si_syscall`.
            let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
            let mut line = *b"supermachine: SECCOMP: system call ???? is not allowed; stopping\n";
            format_number(nr, &mut line[35..39]);
            // SAFETY: write and _exit are async-signal-safe; `line` is a valid buffer.
            unsafe {
                libc::write(2, line.as_ptr().cast(), line.len());
                libc::_exit(125);
            }
        }
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only calls
        // async-signal-safe functions and never returns.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = report as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Writes `n` right-aligned into `out` (space-padded), without allocating.
    fn format_number(n: libc::c_int, out: &mut [u8]) -> usize {
        let mut n = n.unsigned_abs();
        out.fill(b' ');
        let mut at = out.len();
        loop {
            if at == 0 {
                break;
            }
            at -= 1;
            out[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.len() - at
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_filter_compiles_and_names_no_call_twice() {
            assert!(program(false).is_ok());
            let mut seen = std::collections::HashSet::new();
            for nr in ALLOWED {
                assert!(seen.insert(nr), "{nr} listed twice");
            }
            for refused in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_bpf,
                libc::SYS_init_module,
                libc::SYS_finit_module,
                libc::SYS_setns,
                libc::SYS_unshare,
                libc::SYS_process_vm_writev,
                libc::SYS_keyctl,
                libc::SYS_perf_event_open,
                libc::SYS_userfaultfd,
                libc::SYS_io_uring_setup,
            ] {
                assert!(!ALLOWED.contains(&refused), "{refused} is allowed");
            }
        }

        /// Runs `then` in a forked child under the enforcing filter; its exit status.
        fn filtered_child(then: fn() -> libc::c_int) -> libc::c_int {
            // Built before the fork: the child of a threaded process must not allocate.
            let program = program(false).unwrap();
            // SAFETY: the child only installs the filter (no allocation), calls `then` and
            // exits; the parent waits for it.
            unsafe {
                let pid = libc::fork();
                assert!(pid >= 0);
                if pid == 0 {
                    if apply(&program, false).is_err() {
                        libc::_exit(3);
                    }
                    libc::_exit(then());
                }
                let mut status = 0;
                assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
                assert!(libc::WIFEXITED(status), "status {status:#x}");
                libc::WEXITSTATUS(status)
            }
        }

        #[test]
        fn a_refused_call_stops_the_process_and_allowed_ones_work() {
            fn exec() -> libc::c_int {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                // SAFETY: valid NUL-terminated path and argv.
                unsafe { libc::execv(argv[0], argv.as_ptr()) };
                4
            }
            fn allowed() -> libc::c_int {
                // SAFETY: getpid and write of a valid buffer.
                unsafe {
                    if libc::getpid() <= 0 {
                        return 5;
                    }
                    libc::write(1, b"".as_ptr().cast(), 0);
                }
                0
            }
            assert_eq!(filtered_child(exec), 125);
            assert_eq!(filtered_child(allowed), 0);
        }

        #[test]
        fn numbers_are_written_without_allocating() {
            let mut out = [0u8; 4];
            assert_eq!(format_number(59, &mut out), 2);
            assert_eq!(&out, b"  59");
            assert_eq!(format_number(1234, &mut out), 4);
            assert_eq!(&out, b"1234");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    pub(super) fn install(_log: bool) -> Result<(), String> {
        tracing::warn!("no system-call filter on this platform yet: the VMM runs unfiltered");
        Ok(())
    }
}
