//! The commands on VMs that outlive one invocation: `run -d`, `ps`, `logs`, `exec`, `cp`,
//! `stop`, `rm`. They find VMs in the registry (`supermachine::vms`) and talk to them through
//! the guest agent over the VM's vsock socket.

use std::io::{Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use supermachine::agent::{Agent, AgentClientError};
use supermachine::vms::{Registry, VmDir, VmRecord, VmStatus};

/// Set on the background process of `run -d` to the VM id its parent reserved.
pub const DETACHED_CHILD_ENV: &str = "SUPERMACHINE_DETACHED_CHILD";

/// How long `run -d` waits for the VM to come up.
const DETACH_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show exited VMs too
    #[arg(short, long)]
    all: bool,
    /// Only the ids
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the VM stops
    #[arg(short, long)]
    follow: bool,
    /// The VM (name or id)
    vm: String,
}

#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Keep STDIN open and connect it to the command
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a terminal
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (NAME=VALUE, or NAME to pass the host's value)
    #[arg(short, long, value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    /// Working directory inside the VM
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid
    #[arg(short, long)]
    user: Option<String>,
    /// The VM (name or id)
    vm: String,
    /// Command and arguments
    #[arg(required = true, value_name = "COMMAND", allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a host path, or VM:PATH
    src: String,
    /// Destination: a host path, or VM:PATH
    dst: String,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait for the workload to exit before powering the VM off
    #[arg(short = 't', long = "time", value_name = "SECS", default_value_t = 10)]
    time: u64,
    /// The VMs (names or ids)
    #[arg(required = true)]
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Stop the VM after the snapshot (default: it goes on running)
    #[arg(long)]
    stop: bool,
    /// The VM (name or id)
    vm: String,
    /// The snapshot directory (replaced atomically; `run --snapshot DIR` restores it)
    dir: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop running VMs first
    #[arg(short, long)]
    force: bool,
    /// The VMs (names or ids)
    #[arg(required = true)]
    vms: Vec<String>,
}

/// `run -d`: starts this same command line again as a background process (its own session,
/// output to the VM's log files) and returns once the VM's agent answers.
pub fn detach(name: Option<&str>) -> anyhow::Result<ExitCode> {
    let registry = Registry::open()?;
    let (id, name, dir) = registry.create(name)?;
    let spawned = (|| -> std::io::Result<std::process::Child> {
        let stdout = std::fs::File::create(dir.stdout_log())?;
        let stderr = std::fs::File::create(dir.stderr_log())?;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(std::env::args_os().skip(1))
            .env(DETACHED_CHILD_ENV, &id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: setsid is async-signal-safe; the VM's process leaves our terminal's session
        // so a closed terminal does not hang it up.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn()
    })();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = registry.remove(&dir, &id, &name);
            bail!("cannot start the VM process: {e}");
        }
    };
    let agent = Agent::new(dir.vsock());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            // It ended before we saw it up: a failure to start, or a workload that was quick.
            if let Ok(record) = dir.record() {
                if record.exit_code.is_some_and(|c| c != 125) {
                    println!("{id}");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let log = std::fs::read_to_string(dir.stderr_log()).unwrap_or_default();
            eprint!("{log}");
            if dir.path().exists() {
                let _ = registry.remove(&dir, &id, &name);
            }
            return Ok(ExitCode::from(
                status.code().unwrap_or(125).clamp(1, 255) as u8
            ));
        }
        if agent.ping().is_ok() {
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > DETACH_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let _ = registry.remove(&dir, &id, &name);
            bail!("the VM did not come up within {} s", DETACH_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn age(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(created);
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn ps(args: PsArgs) -> anyhow::Result<ExitCode> {
    let registry = Registry::open()?;
    let rows: Vec<(VmRecord, VmStatus)> = registry
        .list()
        .into_iter()
        .map(|(_, r)| {
            let st = r.status();
            (r, st)
        })
        .filter(|(_, st)| args.all || *st == VmStatus::Running)
        .collect();
    if args.quiet {
        for (r, _) in rows {
            println!("{}", r.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|(r, st)| {
            [
                r.id.clone(),
                r.name.clone(),
                r.image.clone(),
                st.to_string(),
                r.ports.join(", "),
                if *st == VmStatus::Running {
                    age(r.created)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let header = ["ID", "NAME", "IMAGE", "STATUS", "PORTS", "UPTIME"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&table) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

fn find(name: &str) -> anyhow::Result<(Registry, VmDir, VmRecord)> {
    let registry = Registry::open()?;
    let (dir, record) = registry.find(name)?;
    Ok((registry, dir, record))
}

fn running(name: &str) -> anyhow::Result<(VmDir, VmRecord)> {
    let (_, dir, record) = find(name)?;
    match record.status() {
        VmStatus::Running => Ok((dir, record)),
        st => bail!("VM {} is not running ({st})", record.name),
    }
}

pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let (_, dir, record) = find(&args.vm)?;
    let open = |p: std::path::PathBuf| {
        std::fs::File::open(&p).map_err(|_| {
            anyhow!(
                "VM {} runs in the foreground: its output goes to the terminal that started it",
                record.name
            )
        })
    };
    let (mut out, mut err) = (open(dir.stdout_log())?, open(dir.stderr_log())?);
    let mut buf = vec![0u8; 64 << 10];
    let mut drain = |f: &mut std::fs::File, to: &mut dyn Write| -> std::io::Result<bool> {
        let mut any = false;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                to.flush()?;
                return Ok(any);
            }
            any = true;
            to.write_all(&buf[..n])?;
        }
    };
    loop {
        let running = record.status() == VmStatus::Running
            && dir.record().map(|r| r.exit_code.is_none()).unwrap_or(false);
        let a = drain(&mut out, &mut std::io::stdout())?;
        let b = drain(&mut err, &mut std::io::stderr())?;
        if !args.follow || !running {
            return Ok(ExitCode::SUCCESS);
        }
        if !a && !b {
            std::thread::sleep(Duration::from_millis(50));
        }
        // A log truncated under us (never today) would otherwise be read from a stale offset.
        for f in [&mut out, &mut err] {
            if let (Ok(pos), Ok(meta)) = (f.stream_position(), f.metadata()) {
                if meta.len() < pos {
                    f.rewind()?;
                }
            }
        }
    }
}

fn host_env(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| match e.split_once('=') {
            Some(_) => Some(e.clone()),
            None => std::env::var(e).ok().map(|v| format!("{e}={v}")),
        })
        .collect()
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    for fd in [1, 0] {
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    use agent_protocol::{ErrorKind, ExecRequest};
    let (dir, _) = running(&args.vm)?;
    let agent = Agent::new(dir.vsock());
    let req = ExecRequest {
        argv: args.command,
        env: host_env(&args.env),
        cwd: args.workdir,
        user: args.user,
        tty: args.tty.then(|| terminal_size().unwrap_or((24, 80))),
        stdin: args.interactive,
    };
    let session = match agent.spawn(req) {
        Ok(s) => s,
        Err(AgentClientError::Remote(e)) => {
            eprintln!("supermachine: {}", e.message);
            return Ok(ExitCode::from(match e.kind {
                ErrorKind::NotFound => 127,
                ErrorKind::NotExecutable | ErrorKind::PermissionDenied => 126,
                _ => 125,
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let input = session.input();
    let _raw = (args.tty && args.interactive).then(supermachine::run::RawTerminal::enable);
    if args.interactive {
        session.stream_stdin(Box::new(std::io::stdin()));
    }
    forward_signals(input, args.tty);
    let status = session.wait(&mut std::io::stdout(), &mut std::io::stderr())?;
    Ok(ExitCode::from((status.code & 0xff) as u8))
}

/// SIGINT/SIGTERM/SIGHUP to us go to the exec'd process; with a terminal, SIGWINCH resizes it.
fn forward_signals(input: supermachine::agent::ExecInput, tty: bool) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGWINCH])
    else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let sent = if sig == SIGWINCH {
                match (tty, terminal_size()) {
                    (true, Some((r, c))) => input.resize(r, c),
                    _ => Ok(()),
                }
            } else {
                input.signal(sig)
            };
            if sent.is_err() {
                break;
            }
        }
    });
}

/// `VM:PATH` → (VM, PATH); a host path otherwise. A part before ':' with a '/' in it is a
/// host path (`./a:b`), as Docker decides.
fn vm_path(s: &str) -> Option<(&str, &str)> {
    let (vm, path) = s.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/')).then_some((vm, path))
}

fn base_name(path: &str) -> anyhow::Result<&str> {
    std::path::Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{path:?} names no file"))
}

pub fn cp(args: CpArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::PermissionsExt;
    match (vm_path(&args.src), vm_path(&args.dst)) {
        (Some(_), Some(_)) => bail!("copying between two VMs is not supported"),
        (None, None) => bail!("one of SRC and DST must be VM:PATH"),
        (None, Some((vm, dst))) => {
            let (dir, _) = running(vm)?;
            let meta = std::fs::metadata(&args.src).with_context(|| args.src.clone())?;
            if !meta.is_file() {
                bail!("{}: only regular files can be copied today", args.src);
            }
            let mode = meta.permissions().mode() & 0o7777;
            let agent = Agent::new(dir.vsock());
            let send = |to: &str| -> Result<(), AgentClientError> {
                let mut f = std::fs::File::open(&args.src).map_err(AgentClientError::from)?;
                agent.write_file(to, mode, &mut f)
            };
            let target = if dst.ends_with('/') {
                format!("{dst}{}", base_name(&args.src)?)
            } else {
                dst.to_string()
            };
            match send(&target) {
                Err(AgentClientError::Remote(e))
                    if e.kind == agent_protocol::ErrorKind::IsDirectory =>
                {
                    let inside =
                        format!("{}/{}", target.trim_end_matches('/'), base_name(&args.src)?);
                    send(&inside)?;
                }
                other => other?,
            }
        }
        (Some((vm, src)), None) => {
            let (dir, _) = running(vm)?;
            let agent = Agent::new(dir.vsock());
            let mut dst = std::path::PathBuf::from(&args.dst);
            if dst.is_dir() {
                dst.push(base_name(src)?);
            }
            let parent = match dst.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            // Into a temporary beside the destination, renamed over it once complete.
            let tmp = parent.join(format!(
                ".{}.sm-cp-{}",
                dst.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
                std::process::id()
            ));
            let result = (|| -> anyhow::Result<()> {
                let mut f =
                    std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
                let info = agent.read_file(src, &mut f)?;
                f.set_permissions(std::fs::Permissions::from_mode(info.mode))?;
                f.sync_all()?;
                std::fs::rename(&tmp, &dst).with_context(|| dst.display().to_string())?;
                Ok(())
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid was checked to be the VM's.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Waits until the VM's process is gone; false after `limit`.
fn wait_gone(record: &VmRecord, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while supermachine::vms::process_start(record.pid) == Some(record.pid_start) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Stops a VM run by a program through the library: through its control socket (its process
/// is the program's, never signalled); waits until its record is gone or has a status.
fn stop_embedded(dir: &VmDir, grace: Duration) -> anyhow::Result<()> {
    use supermachine::control::{call, ControlReply, ControlRequest};
    let request = ControlRequest::Stop {
        grace_ms: grace.as_millis() as u64,
    };
    match call(&dir.control(), &request, Duration::from_secs(10))? {
        ControlReply::Stopping => {}
        ControlReply::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
    let deadline = Instant::now() + grace + Duration::from_secs(10);
    while dir.record().is_ok_and(|r| r.exit_code.is_none()) {
        if Instant::now() >= deadline {
            bail!("the VM did not stop within {} s", (grace.as_secs() + 10));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The stop signal with `grace` to exit; then a forced power-off; then SIGKILL of the VMM.
/// A library VM is asked through its control socket instead.
fn stop_vm(dir: &VmDir, record: &VmRecord, grace: Duration) -> anyhow::Result<()> {
    if record.status() != VmStatus::Running {
        return Ok(());
    }
    if record.embedded {
        return stop_embedded(dir, grace);
    }
    signal(record.pid, libc::SIGTERM);
    if wait_gone(record, grace) {
        return Ok(());
    }
    // A second SIGTERM makes the VMM power the VM off at once.
    signal(record.pid, libc::SIGTERM);
    if !wait_gone(record, Duration::from_secs(5)) {
        signal(record.pid, libc::SIGKILL);
        wait_gone(record, Duration::from_secs(5));
    }
    Ok(())
}

/// Runs `f` on each named VM, printing the name on success (as Docker does) and the error
/// otherwise; exit status 1 if any failed.
fn each_vm(names: &[String], mut f: impl FnMut(&str) -> anyhow::Result<()>) -> ExitCode {
    let mut failed = false;
    for name in names {
        match f(name) {
            Ok(()) => println!("{name}"),
            Err(e) => {
                eprintln!("supermachine: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    Ok(each_vm(&args.vms, |name| {
        let (_, dir, record) = find(name)?;
        stop_vm(&dir, &record, Duration::from_secs(args.time))
    }))
}

/// `snapshot VM DIR`: asks the VM's process to pause it, save it and resume (or stop) it.
pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    use supermachine::control::{call, ControlReply, ControlRequest};
    let (dir, _) = running(&args.vm)?;
    let target = if args.dir.is_absolute() {
        args.dir
    } else {
        std::env::current_dir()?.join(args.dir)
    };
    let request = ControlRequest::Snapshot {
        dir: target,
        stop: args.stop,
    };
    match call(&dir.control(), &request, Duration::from_secs(600))? {
        ControlReply::Snapshot { dir } => println!("{}", dir.display()),
        ControlReply::Error { message } => bail!("{message}"),
        ControlReply::Stopping => bail!("unexpected answer from the VM"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(args: RmArgs) -> anyhow::Result<ExitCode> {
    Ok(each_vm(&args.vms, |name| {
        let (registry, dir, record) = find(name)?;
        if record.status() == VmStatus::Running {
            if !args.force {
                bail!("VM {} is running: stop it first or use rm -f", record.name);
            }
            stop_vm(&dir, &record, Duration::ZERO)?;
        }
        registry.remove(&dir, &record.id, &record.name)?;
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_paths_follow_dockers_rule() {
        assert_eq!(vm_path("web:/etc/x"), Some(("web", "/etc/x")));
        assert_eq!(vm_path("./a:b"), None);
        assert_eq!(vm_path("/tmp/x"), None);
        assert_eq!(vm_path(":x"), None);
    }
}
