//! Container mode of PID 1: the image's root filesystem under an overlay with a tmpfs upper
//! layer, switched to as `/`; the workload started as the image's user with its stdio on
//! virtio consoles (pipes relayed by init, or the console itself as a terminal with `-t`);
//! signals from the host forwarded to the workload's process group.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};

use crate::process::{
    copy_then_shutdown, pipe, resolve_user, set_window_size, start_as, workload_env, ExecDefaults,
};
use guest_init::{
    ContainerConfig, ControlMessage, InitConfig, EXIT_INIT_FAILED, EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
};

const NEWROOT: &str = "/newroot";

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(src)?, cstr(target)?, cstr(fstype)?);
    let d = data.map(cstr).transpose()?;
    let dp = d
        .as_ref()
        .map(|d| d.as_ptr() as *const libc::c_void)
        .unwrap_or(std::ptr::null());
    // SAFETY: valid NUL-terminated strings outliving the call; `dp` is null or a C string.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, dp) };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} {src} on {target}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn setup_root(c: &ContainerConfig) -> Result<(), String> {
    mount(
        &c.rootfs_device,
        "/run/sm/lower",
        &c.rootfs_type,
        libc::MS_RDONLY,
        None,
    )?;
    mount("tmpfs", "/run/sm/rw", "tmpfs", 0, Some("mode=0755"))?;
    for d in ["/run/sm/rw/upper", "/run/sm/rw/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("{d}: {e}"))?;
    }
    mount(
        "overlay",
        NEWROOT,
        "overlay",
        0,
        Some("lowerdir=/run/sm/lower,upperdir=/run/sm/rw/upper,workdir=/run/sm/rw/work"),
    )?;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    mount(
        "proc",
        &format!("{NEWROOT}/proc"),
        "proc",
        nosuid | libc::MS_NOEXEC,
        None,
    )?;
    mount(
        "sysfs",
        &format!("{NEWROOT}/sys"),
        "sysfs",
        nosuid | libc::MS_NOEXEC,
        None,
    )?;
    mount(
        "devtmpfs",
        &format!("{NEWROOT}/dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        None,
    )?;
    mount(
        "devpts",
        &format!("{NEWROOT}/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("ptmxmode=0666,newinstance"),
    )?;
    mount(
        "tmpfs",
        &format!("{NEWROOT}/dev/shm"),
        "tmpfs",
        nosuid,
        Some("mode=1777"),
    )?;
    // cgroup v2, as container runtimes give it; a kernel without cgroups only loses this.
    if let Err(e) = mount(
        "cgroup2",
        &format!("{NEWROOT}/sys/fs/cgroup"),
        "cgroup2",
        nosuid | libc::MS_NOEXEC,
        None,
    ) {
        eprintln!("supermachine-init: no cgroup2: {e}");
    }
    mount(
        "tmpfs",
        &format!("{NEWROOT}/tmp"),
        "tmpfs",
        nosuid,
        Some("mode=1777"),
    )?;
    mount(
        "tmpfs",
        &format!("{NEWROOT}/run"),
        "tmpfs",
        nosuid,
        Some("mode=0755"),
    )?;
    for m in &c.mounts {
        let target = inside(NEWROOT, &m.target).ok_or_else(|| {
            format!(
                "volume target {:?} must be an absolute path inside the container",
                m.target
            )
        })?;
        let flags = if m.read_only { libc::MS_RDONLY } else { 0 };
        if let Err(e) = mount(&m.device, &target, &m.fstype, flags, None) {
            // A read-only disk whose journal needs recovery (its last user was killed) cannot
            // replay it: mount without the journal rather than not at all.
            if !m.read_only || mount(&m.device, &target, &m.fstype, flags, Some("noload")).is_err()
            {
                return Err(e);
            }
        }
    }
    // switch_root: make the overlay `/` and forget the initramfs.
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, None)?;
    let dot = cstr(".")?;
    // SAFETY: chroot to the current directory with a valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

/// `root` + `path` for an absolute container path without `..` (None otherwise).
pub fn inside(root: &str, path: &str) -> Option<String> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return None;
    }
    let rel = path.trim_end_matches('/');
    Some(format!("{root}{rel}"))
}

/// /etc/hosts, /etc/hostname and /etc/resolv.conf, where the image has none of its own.
fn write_etc(hostname: &str) {
    let _ = std::fs::create_dir_all("/etc");
    let files = [
        ("/etc/hostname", format!("{hostname}\n")),
        (
            "/etc/hosts",
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
        ),
        ("/etc/resolv.conf", "nameserver 10.0.2.3\n".to_string()),
    ];
    for (path, content) in files {
        if std::fs::symlink_metadata(path).is_err() {
            let _ = std::fs::write(path, content);
        }
    }
    if let Ok(h) = cstr(hostname) {
        // SAFETY: valid pointer and length.
        unsafe { libc::sethostname(h.as_ptr(), hostname.len()) };
    }
}

/// Brings up `lo` (socket ioctl; no netlink needed for one flag).
fn loopback_up() {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq we own; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        libc::close(fd);
    }
}

fn open_console(path: &str, write_only: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(!write_only)
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))
}

/// No line discipline: bytes pass unchanged in both directions.
fn make_raw(f: &File) {
    // SAFETY: tcgetattr/cfmakeraw/tcsetattr on a valid fd with a termios we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
}

/// Applies a restored VM's catch-up; returns init's answer line for the control console.
fn catch_up(info: agent_protocol::RestoredInfo, defaults: &RwLock<ExecDefaults>) -> String {
    match crate::catch_up::apply_restored(info, defaults) {
        Ok(()) => guest_init::CAUGHT_UP.to_string(),
        Err(why) => format!(
            "{}{}\n",
            guest_init::CATCH_UP_FAILED,
            why.replace('\n', " ")
        ),
    }
}

/// Says [`guest_init::HELD`] and waits for the host's start message, catching up first if the
/// VM was restored meanwhile. Returns the env to add, or the signal the host sent instead.
/// Reads the control console a byte at a time: what follows the start line is the control
/// thread's.
fn hold_until_start(control: &File, defaults: &RwLock<ExecDefaults>) -> Result<Vec<String>, i32> {
    let mut out = control;
    let _ = out.write_all(guest_init::HELD.as_bytes());
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*control).read(&mut byte) {
            Ok(1) if byte[0] != b'\n' => {
                if line.len() < (1 << 20) {
                    line.push(byte[0]);
                }
                continue;
            }
            Ok(1) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The console is gone: start with what we have.
            _ => return Ok(Vec::new()),
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        match ControlMessage::decode(&text) {
            Some(ControlMessage::Start(env)) => return Ok(env),
            Some(ControlMessage::Restored(info)) => {
                let _ = out.write_all(catch_up(info, defaults).as_bytes());
            }
            Some(ControlMessage::Signal(n)) => return Err(n),
            _ => {}
        }
    }
}

/// How many processes the kernel's OOM killer has killed since boot.
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn relay(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        copy_then_shutdown(&mut from, &mut to, || {});
        let _ = to.flush();
    })
}

/// Copies host input from the console to the workload's stdin until the console ends or `eof`
/// becomes readable; dropping the writer then gives the workload end-of-file.
fn forward_stdin(mut input: File, mut writer: File, eof: OwnedFd) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: eof.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    // Drain input before honouring EOF, so nothing sent before it is lost.
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if fds[1].revents != 0 {
            // The host sent everything before its end-of-file, but it travels on another
            // console: take what is still arriving until the input goes quiet.
            loop {
                let mut pfd = libc::pollfd {
                    fd: input.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    return;
                }
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if writer.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Runs the container; returns the workload's exit status.
pub fn run(config: &InitConfig, c: &ContainerConfig) -> i32 {
    // Until the consoles are open, errors can only go to the kernel console.
    if let Err(e) = setup_root(c) {
        eprintln!("supermachine-init: {e}");
        return EXIT_INIT_FAILED;
    }
    write_etc(&c.hostname);
    loopback_up();
    if let Some(net) = &c.network {
        if let Err(e) = crate::net::configure(net) {
            // The workload may not need the network: say so and go on.
            eprintln!("supermachine-init: network: {e}");
        }
    }
    let consoles = (
        open_console(&c.stdout_device, false),
        open_console(&c.stderr_device, true),
        open_console(&c.control_device, false),
    );
    let (Ok(out_console), Ok(err_console), Ok(control)) = consoles else {
        eprintln!("supermachine-init: cannot open the workload consoles");
        return EXIT_INIT_FAILED;
    };
    for f in [&err_console, &control] {
        make_raw(f);
    }
    if !c.tty {
        make_raw(&out_console);
    } else if let Some((rows, cols)) = c.tty_size {
        set_window_size(&out_console, rows, cols);
    }
    // The agent (exec, files, published ports) serves from now on; a VM without vsock only
    // loses those.
    let exec_defaults = Arc::new(RwLock::new(ExecDefaults {
        env: config.env.clone(),
        workdir: config
            .workdir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: c.user.clone(),
        hostname: c.hostname.clone(),
    }));
    if let Err(e) = crate::agent::start(exec_defaults.clone()) {
        eprintln!("supermachine-init: no agent: {e}");
    }
    // Tell the host it may send input now.
    let _ = (&control).write_all(guest_init::GUEST_READY.as_bytes());
    let mut start_env = Vec::new();
    if c.hold_before_start {
        match hold_until_start(&control, &exec_defaults) {
            Ok(env) => start_env = env,
            // The host stopped the VM before the workload started.
            Err(signal) => return 128 + signal,
        }
    }
    let mut report = err_console.try_clone().ok();
    let mut fail = |msg: String, status: i32| {
        if let Some(r) = report.as_mut() {
            let _ = writeln!(r, "supermachine: {msg}");
        }
        status
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let id = match resolve_user(&c.user, &passwd, &group) {
        Ok(id) => id,
        Err(e) => return fail(e, EXIT_NOT_EXECUTABLE),
    };
    let argv = if config.argv.is_empty() {
        vec!["/bin/sh".to_string()]
    } else {
        config.argv.clone()
    };
    let env = workload_env(
        &c.hostname,
        &id.home,
        c.tty,
        config.env.iter().chain(start_env.iter()),
    );
    let workdir = config
        .workdir
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let _ = std::fs::create_dir_all(&workdir);

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&workdir);
    // PATH lookup happens in the parent with the child's PATH (std does that when env is set).
    let mut relays = Vec::new();
    let (stdin_writer, out_reader, err_reader);
    if c.tty {
        let (Ok(i), Ok(o), Ok(e)) = (
            out_console.try_clone(),
            out_console.try_clone(),
            out_console.try_clone(),
        ) else {
            return fail("cannot share the terminal".into(), EXIT_INIT_FAILED);
        };
        cmd.stdin(i).stdout(o).stderr(e);
        stdin_writer = None;
        out_reader = None;
        err_reader = None;
    } else {
        let (Ok((or, ow)), Ok((er, ew))) = (pipe(), pipe()) else {
            return fail("cannot create pipes".into(), EXIT_INIT_FAILED);
        };
        cmd.stdout(Stdio::from(ow)).stderr(Stdio::from(ew));
        if c.interactive {
            let Ok((ir, iw)) = pipe() else {
                return fail("cannot create pipes".into(), EXIT_INIT_FAILED);
            };
            cmd.stdin(Stdio::from(ir));
            stdin_writer = Some(iw);
        } else {
            cmd.stdin(Stdio::null());
            stdin_writer = None;
        }
        out_reader = Some(or);
        err_reader = Some(er);
    }
    start_as(&mut cmd, &id, c.tty);
    let oom_before = oom_kills();
    let (child, exited) = match crate::reaper::spawn(&mut cmd) {
        Ok(spawned) => spawned,
        Err(e) => {
            let status = match e.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_NOT_EXECUTABLE,
            };
            let what = if e.kind() == io::ErrorKind::NotFound {
                format!("exec: {:?}: executable file not found in $PATH", argv[0])
            } else {
                format!("exec: {:?}: {e}", argv[0])
            };
            return fail(what, status);
        }
    };
    drop(cmd);
    let pid = child.id() as libc::pid_t;
    // Output relays end when every writer (the workload and its children) is gone.
    if let (Some(or), Some(er)) = (out_reader, err_reader) {
        if let Ok(o) = out_console.try_clone() {
            relays.push(relay(File::from(or), o));
        }
        relays.push(relay(File::from(er), err_console));
    }
    // Host input, until the host says its stdin ended (a byte on `eof`).
    let Ok((eof_r, eof_w)) = pipe() else {
        return fail("cannot create pipes".into(), EXIT_INIT_FAILED);
    };
    if let (Some(iw), Ok(input)) = (stdin_writer, out_console.try_clone()) {
        std::thread::spawn(move || forward_stdin(input, File::from(iw), eof_r));
    }
    let mut eof_w = File::from(eof_w);
    let terminal = if c.tty {
        out_console.try_clone().ok()
    } else {
        None
    };
    let mut answers = control.try_clone().ok();
    std::thread::spawn(move || {
        for line in BufReader::new(control).lines() {
            let Ok(line) = line else { break };
            match ControlMessage::decode(&line) {
                Some(ControlMessage::Restored(info)) => {
                    let answer = catch_up(info, &exec_defaults);
                    if let Some(a) = answers.as_mut() {
                        let _ = a.write_all(answer.as_bytes());
                    }
                }
                Some(ControlMessage::Signal(n)) => {
                    // SAFETY: signalling the workload's process group (its pid is the pgid).
                    unsafe { libc::kill(-pid, n) };
                }
                Some(ControlMessage::StdinEof) => {
                    let _ = eof_w.write_all(b"x");
                }
                Some(ControlMessage::Resize(rows, cols)) => {
                    if let Some(t) = &terminal {
                        set_window_size(t, rows, cols);
                    }
                }
                // A second start, or a line this init does not know.
                Some(ControlMessage::Start(_)) | None => {}
            }
        }
    });
    let status = crate::reaper::shell_status(exited.recv().unwrap_or(0));
    let out_of_memory = status == 128 + libc::SIGKILL && oom_kills() > oom_before;
    // The workload is gone: so is everything it left running, as in a container.
    // SAFETY: kill(-1) from PID 1 signals every other process; init itself is exempt.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    for r in relays {
        let _ = r.join();
    }
    if out_of_memory {
        // Docker reports this as OOMKilled with status 137; say it where the user looks.
        fail(
            "the workload was killed: out of memory (raise the guest's memory with --memory)"
                .into(),
            status,
        );
    }
    // Unmount volumes so their filesystems are clean for the next user (a read-only mount of a
    // dirty ext4 cannot replay its journal).
    for m in c.mounts.iter().rev() {
        if let Ok(t) = cstr(&m.target) {
            // SAFETY: umount2 with a valid C string; failure leaves the volume as it is.
            unsafe { libc::umount2(t.as_ptr(), 0) };
        }
    }
    status
}
