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
//! Each vCPU thread narrows that list further before its vCPU first runs (a second filter on
//! that thread alone, see [`vcpu_thread_setup`]): the code a guest drives most directly (exits,
//! device registers) cannot open files by path, make sockets or change identity.
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

/// The set-up each vCPU thread runs when the filter is on (see the [module docs](self)): it
/// installs the vCPU threads' narrower filter. `None` when this process is not filtered.
pub(crate) fn vcpu_thread_setup() -> Option<vmm_core::runner::VcpuThreadSetup> {
    if !ENABLED.load(Ordering::SeqCst) {
        return None;
    }
    match mode() {
        Mode::Off => None,
        mode => {
            let log = mode == Mode::Log;
            Some(std::sync::Arc::new(move || imp::install_vcpu_thread(log)))
        }
    }
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod calls;

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod imp {
    use std::collections::BTreeMap;

    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

    use super::calls::{ARCH, COMMON, TARGET, VCPU_DENIED, VCPU_DENIED_ARCH};

    /// Every call the filter lets through.
    fn allowed() -> impl Iterator<Item = libc::c_long> {
        COMMON.iter().chain(ARCH).copied()
    }

    /// What a call outside the list (or, for a deny-list, on it) gets.
    fn refusal(log: bool) -> SeccompAction {
        if log {
            SeccompAction::Log
        } else {
            SeccompAction::Trap
        }
    }

    /// A filter that gives `listed` calls `on_listed` and the others `otherwise`.
    fn compile(
        listed: impl Iterator<Item = libc::c_long>,
        otherwise: SeccompAction,
        on_listed: SeccompAction,
    ) -> Result<BpfProgram, String> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            listed.map(|nr| (nr, Vec::new())).collect();
        let filter =
            SeccompFilter::new(rules, otherwise, on_listed, TARGET).map_err(|e| e.to_string())?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())
    }

    fn program(log: bool) -> Result<BpfProgram, String> {
        compile(allowed(), refusal(log), SeccompAction::Allow)
    }

    pub(super) fn install(log: bool) -> Result<(), String> {
        apply(&program(log)?, log)
    }

    /// The calls a vCPU thread may not make, on top of the process's filter.
    fn vcpu_denied() -> impl Iterator<Item = libc::c_long> {
        VCPU_DENIED.iter().chain(VCPU_DENIED_ARCH).copied()
    }

    fn vcpu_program(log: bool) -> Result<BpfProgram, String> {
        compile(vcpu_denied(), SeccompAction::Allow, refusal(log))
    }

    /// Installs the vCPU threads' filter on the calling thread (built once per process).
    pub(super) fn install_vcpu_thread(log: bool) -> Result<(), String> {
        static PROGRAM: std::sync::OnceLock<Result<BpfProgram, String>> =
            std::sync::OnceLock::new();
        let program = PROGRAM.get_or_init(|| vcpu_program(log)).clone()?;
        seccompiler::apply_filter(&program).map_err(|e| e.to_string())
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
            for nr in allowed() {
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
                assert!(!seen.contains(&refused), "{refused} is allowed");
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

        static VCPU: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();

        /// Adds the vCPU filter in a forked child (built before the fork: no allocation).
        fn vcpu_filter_in_child() -> bool {
            VCPU.get()
                .is_some_and(|p| seccompiler::apply_filter(p).is_ok())
        }

        #[test]
        fn vcpu_threads_lose_files_by_path_and_sockets_but_keep_descriptor_io() {
            let allowed: std::collections::HashSet<_> = allowed().collect();
            for nr in vcpu_denied() {
                assert!(
                    allowed.contains(&nr),
                    "{nr} is denied to vCPUs but not allowed at all"
                );
            }
            fn open() -> libc::c_int {
                if !vcpu_filter_in_child() {
                    return 3;
                }
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
                4
            }
            fn socket() -> libc::c_int {
                if !vcpu_filter_in_child() {
                    return 3;
                }
                // SAFETY: plain socket call.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                4
            }
            fn io() -> libc::c_int {
                if !vcpu_filter_in_child() {
                    return 3;
                }
                let mut fds = [0; 2];
                // SAFETY: pipe2 fills `fds`; write and read use valid buffers.
                unsafe {
                    if libc::pipe2(fds.as_mut_ptr(), 0) != 0 {
                        return 5;
                    }
                    let mut b = [0u8; 1];
                    if libc::write(fds[1], b"x".as_ptr().cast(), 1) != 1
                        || libc::read(fds[0], b.as_mut_ptr().cast(), 1) != 1
                    {
                        return 6;
                    }
                }
                0
            }
            // Built before the fork, like the process's filter.
            VCPU.get_or_init(|| vcpu_program(false).unwrap());
            assert_eq!(filtered_child(open), 125);
            assert_eq!(filtered_child(socket), 125);
            assert_eq!(filtered_child(io), 0);
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

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod imp {
    pub(super) fn install(_log: bool) -> Result<(), String> {
        tracing::warn!("no system-call filter on this platform yet: the VMM runs unfiltered");
        Ok(())
    }

    pub(super) fn install_vcpu_thread(_log: bool) -> Result<(), String> {
        Ok(())
    }
}
