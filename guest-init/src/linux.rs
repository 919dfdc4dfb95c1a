//! The Linux implementation of PID 1.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::Command;

use guest_init::{InitConfig, CONFIG_PATH, EXIT_INIT_FAILED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn main() {
    let status = match run() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("supermachine-init: {e}");
            EXIT_INIT_FAILED
        }
    };
    power_off(status)
}

fn run() -> Result<i32, String> {
    if std::process::id() != 1 {
        return Err("must run as PID 1 inside a guest".into());
    }
    report_fatal_signals();
    mount_kernel_filesystems()?;
    let config = load_config()?;
    if let Some(secs) = config.clock_seconds {
        set_clock(secs);
    }
    if config.verbose {
        println!("supermachine-init: running {:?}", config.argv);
        let _ = io::stdout().flush();
    }
    if let Some(container) = &config.container {
        return Ok(crate::container::run(&config, container));
    }
    Ok(run_command(&config))
}

fn cstr(s: &str) -> CString {
    // Only called with literals that contain no NUL.
    CString::new(s).unwrap_or_default()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data arg.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // The kernel may have mounted devtmpfs already.
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!("mount {fstype} on {target}: {err}"));
        }
    }
    Ok(())
}

fn mount_kernel_filesystems() -> Result<(), String> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nodev)?;
    mount("sysfs", "/sys", "sysfs", nodev)?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID)?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
    )?;
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    Ok(())
}

fn load_config() -> Result<InitConfig, String> {
    match std::fs::read(CONFIG_PATH) {
        Ok(bytes) => InitConfig::from_json(&bytes).map_err(|e| format!("{CONFIG_PATH}: {e}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(InitConfig {
            // The kernel passes the words after `--` on its command line to init.
            argv: std::env::args().skip(1).collect(),
            ..Default::default()
        }),
        Err(e) => Err(format!("{CONFIG_PATH}: {e}")),
    }
}

fn set_clock(secs: i64) {
    let ts = libc::timespec {
        tv_sec: secs as _,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; failure only leaves the clock as it was.
    unsafe {
        libc::clock_settime(libc::CLOCK_REALTIME, &ts);
    }
}

fn run_command(config: &InitConfig) -> i32 {
    let argv: Vec<String> = if config.argv.is_empty() {
        vec!["/bin/sh".into()]
    } else {
        config.argv.clone()
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "linux");
    for kv in &config.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => {
                cmd.env(kv, "");
            }
        }
    }
    cmd.current_dir(config.workdir.as_deref().unwrap_or("/"));
    // SAFETY: the closure only calls async-signal-safe functions (setsid, ioctl).
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own with the console as controlling terminal, so shells get
            // job control and ^C reaches the workload, not init.
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("supermachine-init: cannot run {}: {e}", argv[0]);
            return match e.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_NOT_EXECUTABLE,
            };
        }
    };
    wait_for(child.id() as libc::pid_t)
}

/// Reaps every child until `main` exits; returns its status the way a shell reports it.
pub(crate) fn wait_for(main: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return EXIT_INIT_FAILED;
        }
        if pid == main {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                EXIT_INIT_FAILED
            };
        }
    }
}

fn power_off(status: i32) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // The workload's last output may still sit in the console driver's transmit buffer; the VM
    // ends the moment we report the status, so wait until the UART has sent everything.
    // A signal (an orphan's SIGCHLD) interrupts the wait: wait again, or the output is lost.
    for fd in [1, 2] {
        // SAFETY: tcdrain on our standard descriptors; on a non-terminal it fails harmlessly.
        while unsafe { libc::tcdrain(fd) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    report_exit_status(status);
    // A VMM without the exit-status port: reboot, which the VMM treats as the end of the VM.
    // SAFETY: reboot with a valid command; as PID 1 with CAP_SYS_BOOT this does not return.
    unsafe {
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

#[cfg(target_arch = "x86_64")]
fn report_exit_status(status: i32) {
    let port = guest_init::EXIT_STATUS_PORT;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(port.into(), 4, 1) } != 0 {
        return;
    }
    // SAFETY: we were granted access to this port just above; the VMM's device ends the VM on
    // this write, and writing an unclaimed port on another VMM has no effect.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") status, options(nomem, nostack));
    }
}

#[cfg(target_arch = "aarch64")]
fn report_exit_status(status: i32) {
    let addr = guest_init::EXIT_STATUS_ADDR_AARCH64;
    let page = addr & !0xfff;
    // SAFETY: opening a device node with a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/mem".as_ptr(), libc::O_RDWR | libc::O_SYNC) };
    if fd < 0 {
        return;
    }
    // SAFETY: mapping one page of /dev/mem (the VMM's MMIO register page); checked below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            page as libc::off_t,
        )
    };
    // SAFETY: closing the descriptor we opened; the mapping stays valid without it.
    unsafe { libc::close(fd) };
    if map == libc::MAP_FAILED {
        return;
    }
    // SAFETY: the mapping is one page long and the register lies inside it, 4-byte aligned; the
    // VMM's device ends the VM on this write.
    unsafe {
        let reg = map.cast::<u8>().add((addr - page) as usize).cast::<u32>();
        std::ptr::write_volatile(reg, status as u32);
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn report_exit_status(_status: i32) {}

/// The kernel prints nothing when PID 1 faults (only "Attempted to kill init!"): say which
/// thread faulted, where, and on what address, on the console and in the kernel log.
fn report_fatal_signals() {
    extern "C" {
        // The linker's symbol for our own ELF header: where this (static-pie) binary is loaded.
        static __ehdr_start: u8;
    }
    // Only the symbol's address is taken (no read).
    let base = std::ptr::addr_of!(__ehdr_start) as usize;
    LOAD_BASE.store(base, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
        // SAFETY: a zeroed sigaction with a handler that only makes async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Where init is loaded, so a reported `ip` minus this is an address in the binary.
static LOAD_BASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn on_fatal_signal(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // Formats into a stack buffer: no allocation in a signal handler.
    struct Buf {
        bytes: [u8; 200],
        len: usize,
    }
    impl Buf {
        fn text(&mut self, t: &[u8]) {
            for &b in t {
                if self.len < self.bytes.len() {
                    self.bytes[self.len] = b;
                    self.len += 1;
                }
            }
        }
        fn hex(&mut self, v: u64) {
            self.text(b"0x");
            for i in (0..16).rev() {
                self.text(&[b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize]]);
            }
        }
    }
    let mut b = Buf {
        bytes: [0; 200],
        len: 0,
    };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `name`.
    unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            name.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let name_len = name.iter().position(|&c| c == 0).unwrap_or(16);
    b.text(b"supermachine-init: fatal signal ");
    b.text(&[b'0' + (sig / 10) as u8, b'0' + (sig % 10) as u8]);
    b.text(b" in thread '");
    b.text(&name[..name_len]);
    b.text(b"' addr=");
    // SAFETY: the kernel passes a valid siginfo (SA_SIGINFO).
    b.hex(unsafe { (*info).si_addr() } as u64);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted ucontext.
        let gregs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        b.text(b" ip=");
        b.hex(gregs[libc::REG_RIP as usize] as u64);
        b.text(b" sp=");
        b.hex(gregs[libc::REG_RSP as usize] as u64);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ctx;
    b.text(b" base=");
    b.hex(LOAD_BASE.load(std::sync::atomic::Ordering::Relaxed) as u64);
    b.text(b"\n");
    // SAFETY: write(2) and open(2) are async-signal-safe; the buffer outlives the calls.
    unsafe {
        libc::write(2, b.bytes.as_ptr().cast(), b.len);
        let kmsg = libc::open(c"/dev/kmsg".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if kmsg >= 0 {
            libc::write(kmsg, b.bytes.as_ptr().cast(), b.len);
            libc::close(kmsg);
        }
    }
    // SA_RESETHAND restored the default action: returning re-runs the faulting instruction.
}
