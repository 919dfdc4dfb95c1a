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
    // SAFETY: tcdrain on our standard descriptors; on a non-terminal it fails harmlessly.
    unsafe {
        libc::tcdrain(1);
        libc::tcdrain(2);
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

#[cfg(not(target_arch = "x86_64"))]
fn report_exit_status(_status: i32) {}
