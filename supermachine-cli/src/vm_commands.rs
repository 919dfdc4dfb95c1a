//! The commands on VMs that outlive one invocation: `run -d`, `ps`, `logs`, `exec`, `cp`,
//! `stop`, `rm`. They find VMs in the registry (`supermachine::vms`) and talk to them through
//! the guest agent over the VM's vsock socket.

use std::io::{Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use supermachine::{ChildController, Error, VmHandle, VmStatus};

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
    /// table, or json (one object per line)
    #[arg(long, value_enum, default_value_t)]
    format: crate::inspect::Format,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the VM stops
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines of each stream ("all": everything)
    #[arg(short = 'n', long, value_name = "N", default_value = "all", value_parser = parse_tail)]
    tail: TailLines,
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
pub struct StatsArgs {
    /// Print one sample and exit (default: refresh every second until interrupted)
    #[arg(long)]
    no_stream: bool,
    /// The VMs (names or ids; default: every running one)
    vms: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// How many clones
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    count: u32,
    /// Name the clones PREFIX-1, PREFIX-2… [default: the VM's name and "-fork"]
    #[arg(long, value_name = "PREFIX")]
    name: Option<String>,
    /// Publish a clone's port ([HOST_IP:][HOST_PORT:]GUEST_PORT[/tcp|/tls]); with several
    /// clones leave HOST_PORT out so each gets a free one
    #[arg(short, long, value_name = "PORT")]
    publish: Vec<String>,
    /// The running VM
    vm: String,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
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
    let reserved = VmHandle::reserve(name)?;
    let id = reserved.id().to_string();
    let spawned = (|| -> std::io::Result<std::process::Child> {
        let (stdout_log, stderr_log) = reserved.log_paths();
        // The logs hold what the workload prints: the user's alone.
        let private = |path| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
        };
        let stdout = private(stdout_log)?;
        let stderr = private(stderr_log)?;
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
            let _ = reserved.remove(true);
            bail!("cannot start the VM process: {e}");
        }
    };
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            // It ended before we saw it up: a failure to start, or a workload that was quick.
            if let VmStatus::Exited(code) = reserved.info().status {
                if code != 125 {
                    println!("{id}");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            if let Some((_, mut log)) = reserved.logs() {
                let _ = std::io::copy(&mut log, &mut std::io::stderr());
            }
            let _ = reserved.remove(true);
            return Ok(ExitCode::from(
                status.code().unwrap_or(125).clamp(1, 255) as u8
            ));
        }
        if reserved.is_ready() {
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > DETACH_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reserved.remove(true);
            bail!("the VM did not come up within {} s", DETACH_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `running`, `running (healthy, restarted 2 times)`, `exited (3)`…
fn status_text(vm: &supermachine::VmInfo) -> String {
    let mut notes = Vec::new();
    if let Some(h) = vm.health {
        notes.push(h.to_string());
    }
    match vm.restarts {
        0 => {}
        1 => notes.push("restarted once".into()),
        n => notes.push(format!("restarted {n} times")),
    }
    if notes.is_empty() {
        vm.status.to_string()
    } else {
        format!("{} ({})", vm.status, notes.join(", "))
    }
}

fn age(created: std::time::SystemTime) -> String {
    let s = created.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn ps(args: PsArgs) -> anyhow::Result<ExitCode> {
    let vms = VmHandle::list(args.all)?;
    if args.quiet {
        for vm in vms {
            println!("{}", vm.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.format == crate::inspect::Format::Json {
        for vm in &vms {
            println!("{}", crate::inspect::vm_summary(vm));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let table: Vec<[String; 6]> = vms
        .iter()
        .map(|vm| {
            [
                vm.id.clone(),
                vm.name.clone(),
                vm.image.clone(),
                status_text(vm),
                vm.ports.join(", "),
                if vm.status.is_alive() {
                    age(vm.created)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let header = ["ID", "NAME", "IMAGE", "STATUS", "PORTS", "UPTIME"].map(String::from);
    print_table(header, &table);
    Ok(ExitCode::SUCCESS)
}

/// Columns as wide as their widest cell, two spaces apart.
fn print_table<const N: usize>(header: [String; N], rows: &[[String; N]]) {
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn running(name: &str) -> anyhow::Result<VmHandle> {
    let vm = VmHandle::find(name)?;
    match vm.info().status {
        VmStatus::Running => Ok(vm),
        VmStatus::Paused => bail!("VM {} is paused: unpause it first", vm.name()),
        st => bail!("VM {} is not running ({st})", vm.name()),
    }
}

pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let vm = VmHandle::find(&args.vm)?;
    let Some((mut out, mut err)) = vm.logs() else {
        bail!(
            "VM {} runs in the foreground: its output goes to the terminal that started it",
            vm.name()
        );
    };
    if let TailLines(Some(lines)) = args.tail {
        for f in [&mut out, &mut err] {
            let at = tail_offset(f, lines)?;
            f.seek(std::io::SeekFrom::Start(at))?;
        }
    }
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
        let running = vm.is_running();
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

/// `--tail`: a number of lines, or everything (`all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailLines(Option<u64>);

fn parse_tail(s: &str) -> Result<TailLines, String> {
    if s == "all" {
        return Ok(TailLines(None));
    }
    s.parse()
        .map(|n| TailLines(Some(n)))
        .map_err(|_| format!("{s:?} is not a number of lines or \"all\""))
}

/// Where the last `lines` lines of `f` start (a last line without its newline counts).
fn tail_offset(f: &mut (impl Read + Seek), lines: u64) -> std::io::Result<u64> {
    let len = f.seek(std::io::SeekFrom::End(0))?;
    if lines == 0 {
        return Ok(len);
    }
    let mut pos = len;
    let mut newlines = 0u64;
    let mut chunk = vec![0u8; 64 << 10];
    let mut last_byte = true;
    while pos > 0 {
        let n = chunk.len().min(pos as usize);
        pos -= n as u64;
        f.seek(std::io::SeekFrom::Start(pos))?;
        f.read_exact(&mut chunk[..n])?;
        for (i, &b) in chunk[..n].iter().enumerate().rev() {
            // The file's final newline ends the last line rather than starting another.
            if b == b'\n' && !std::mem::take(&mut last_byte) {
                newlines += 1;
                if newlines == lines {
                    return Ok(pos + i as u64 + 1);
                }
            }
            last_byte = false;
        }
    }
    Ok(0)
}

pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let vm = running(&args.vm)?;
    let mut cmd = vm.exec_builder().argv(args.command);
    for (name, value) in crate::cli::env_pairs(&args.env) {
        cmd = cmd.env(&name, &value);
    }
    if let Some(dir) = &args.workdir {
        cmd = cmd.cwd(dir);
    }
    if let Some(user) = &args.user {
        cmd = cmd.user(user);
    }
    if args.tty {
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        cmd = cmd.tty(rows, cols);
    }
    if !args.interactive {
        cmd = cmd.stdin_null();
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e @ Error::CommandNotFound(_)) => {
            eprintln!("supermachine: {e}");
            return Ok(ExitCode::from(127));
        }
        Err(e @ Error::CommandNotExecutable(_)) => {
            eprintln!("supermachine: {e}");
            return Ok(ExitCode::from(126));
        }
        Err(e) => return Err(e.into()),
    };
    let _raw = (args.tty && args.interactive).then(supermachine::RawTerminal::enable);
    if let Some(mut stdin) = child.stdin.take() {
        // Detached: it ends with our stdin (dropping `stdin` sends end of file).
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut stdin);
        });
    }
    forward_signals(child.controller(), args.tty);
    let copy = |from: Option<supermachine::ChildOutput>, err: bool| {
        std::thread::spawn(move || {
            if let Some(mut from) = from {
                let _ = if err {
                    std::io::copy(&mut from, &mut std::io::stderr())
                } else {
                    std::io::copy(&mut from, &mut std::io::stdout())
                };
            }
        })
    };
    let out = copy(child.stdout.take(), false);
    let err = copy(child.stderr.take(), true);
    let status = child.wait()?;
    let _ = (out.join(), err.join());
    Ok(ExitCode::from((status.code & 0xff) as u8))
}

/// SIGINT/SIGTERM/SIGHUP to us go to the exec'd process; with a terminal, SIGWINCH resizes it.
fn forward_signals(child: ChildController, tty: bool) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGWINCH])
    else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let sent = if sig == SIGWINCH {
                match (tty, terminal_size()) {
                    (true, Some((r, c))) => child.resize(r, c),
                    _ => Ok(()),
                }
            } else {
                child.signal(sig)
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
            let vm = running(vm)?;
            let meta = std::fs::metadata(&args.src).with_context(|| args.src.clone())?;
            if !meta.is_file() {
                bail!("{}: only regular files can be copied today", args.src);
            }
            let mode = meta.permissions().mode() & 0o7777;
            let send = |to: &str| -> supermachine::Result<()> {
                let mut f = std::fs::File::open(&args.src)?;
                vm.copy_in(to, mode, &mut f)
            };
            let target = if dst.ends_with('/') {
                format!("{dst}{}", base_name(&args.src)?)
            } else {
                dst.to_string()
            };
            match send(&target) {
                // A directory there: into it, as cp does.
                Err(Error::IsADirectory(_)) => {
                    let inside =
                        format!("{}/{}", target.trim_end_matches('/'), base_name(&args.src)?);
                    send(&inside)?;
                }
                other => other?,
            }
        }
        (Some((vm, src)), None) => {
            let vm = running(vm)?;
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
                // Private while it fills; then the guest's permission bits, never its setuid,
                // setgid or sticky bits (the guest's root is not the host's).
                use std::os::unix::fs::OpenOptionsExt;
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| tmp.display().to_string())?;
                let info = vm.copy_out(src, &mut f)?;
                f.set_permissions(std::fs::Permissions::from_mode(info.mode & 0o777))?;
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
        Ok(VmHandle::find(name)?.stop(Duration::from_secs(args.time))?)
    }))
}

/// `stats [VM…]`: CPU, memory, network and disk use, one line per VM, as `docker stats`.
pub fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let handles: Vec<VmHandle> = if args.vms.is_empty() {
        VmHandle::list(false)?
            .iter()
            .filter_map(|i| VmHandle::find(&i.id).ok())
            .collect()
    } else {
        args.vms
            .iter()
            .map(|n| VmHandle::find(n))
            .collect::<Result<_, _>>()?
    };
    let sample = |vm: &VmHandle| vm.stats().ok();
    let mut previous: Vec<Option<supermachine::VmStats>> = handles.iter().map(sample).collect();
    loop {
        // CPU use is over the interval between two samples.
        std::thread::sleep(Duration::from_secs(1));
        let now: Vec<Option<supermachine::VmStats>> = handles.iter().map(sample).collect();
        let rows: Vec<[String; 7]> = handles
            .iter()
            .zip(now.iter().zip(&previous))
            .map(|(vm, (now, before))| stats_row(vm, now.as_ref(), before.as_ref()))
            .collect();
        if !args.no_stream {
            // Clear the screen and go home, as `docker stats` redraws.
            print!("\x1b[2J\x1b[H");
        }
        print_table(
            [
                "ID",
                "NAME",
                "CPU %",
                "MEM USAGE / LIMIT",
                "HOST RSS / PSS",
                "NET I/O",
                "BLOCK I/O",
            ]
            .map(String::from),
            &rows,
        );
        std::io::stdout().flush()?;
        if args.no_stream {
            return Ok(ExitCode::SUCCESS);
        }
        previous = now;
    }
}

fn stats_row(
    vm: &VmHandle,
    now: Option<&supermachine::VmStats>,
    before: Option<&supermachine::VmStats>,
) -> [String; 7] {
    use supermachine::images::human_size;
    let id = vm.id().to_string();
    let name = vm.name().to_string();
    let Some(now) = now else {
        return [
            id,
            name,
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ];
    };
    let cpu = before.map_or("-".into(), |b| format!("{:.1}%", now.cpu_percent_since(b)));
    let host = format!(
        "{} / {}",
        human_size(now.host_rss),
        human_size(now.host_pss)
    );
    let pair = |a: u64, b: u64| format!("{} / {}", human_size(a), human_size(b));
    match now.guest {
        Some(g) => [
            id,
            name,
            cpu,
            pair(g.memory_used, g.memory_total),
            host,
            pair(g.net_rx, g.net_tx),
            pair(g.block_read, g.block_written),
        ],
        None => [id, name, cpu, "paused".into(), host, "-".into(), "-".into()],
    }
}

/// `fork VM`: snapshots the running VM (it goes on) and starts clones of it in the background,
/// each as `run -d --snapshot` would; prints their ids.
pub fn fork(args: ForkArgs) -> anyhow::Result<ExitCode> {
    for p in &args.publish {
        let mapping: supermachine::PortMapping = p.parse()?;
        if args.count > 1 && mapping.host_port != 0 {
            bail!(
                "-p {p}: {} clones cannot all listen on host port {}; give -p {} for a free port each",
                args.count,
                mapping.host_port,
                mapping.guest_port
            );
        }
    }
    let vm = running(&args.vm)?;
    let prefix = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-fork", vm.name()));
    let snapshot = vm.fork_snapshot()?;
    let mut failed = false;
    for i in 1..=args.count {
        let name = format!("{prefix}-{i}");
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["run", "-d", "--name", &name, "--snapshot"])
            .arg(snapshot.dir())
            .stdin(Stdio::null());
        for p in &args.publish {
            cmd.args(["-p", p]);
        }
        let out = cmd.output()?;
        if out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stdout));
        } else {
            eprint!(
                "supermachine: clone {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `pause VM…`: stops the VMs' vCPUs (their ports keep accepting; connections wait).
pub fn pause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    Ok(each_vm(
        &args.vms,
        |name| Ok(VmHandle::find(name)?.pause()?),
    ))
}

/// `unpause VM…`: lets paused VMs run again.
pub fn unpause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    Ok(each_vm(&args.vms, |name| {
        Ok(VmHandle::find(name)?.unpause()?)
    }))
}

/// `snapshot VM DIR`: asks the VM's process to pause it, save it and resume (or stop) it.
pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    // A paused VM is snapshotted as it stands and stays paused.
    let vm = VmHandle::find(&args.vm)?;
    if !vm.is_running() {
        bail!("VM {} is not running ({})", vm.name(), vm.info().status);
    }
    let dir = vm.snapshot(&args.dir, args.stop)?;
    println!("{}", dir.display());
    Ok(ExitCode::SUCCESS)
}

pub fn rm(args: RmArgs) -> anyhow::Result<ExitCode> {
    Ok(each_vm(&args.vms, |name| {
        match VmHandle::find(name)?.remove(args.force) {
            Err(Error::VmRunning(name)) => {
                bail!("VM {name} is running: stop it first or use rm -f")
            }
            other => Ok(other?),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_finds_the_start_of_the_last_lines() {
        let tail = |text: &str, n| {
            let mut c = std::io::Cursor::new(text.as_bytes().to_vec());
            let at = tail_offset(&mut c, n).unwrap() as usize;
            text[at..].to_string()
        };
        assert_eq!(tail("a\nb\nc\n", 1), "c\n");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 1), "c");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\nb\nc\n", 9), "a\nb\nc\n");
        assert_eq!(tail("a\nb\n", 0), "");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("\n\n", 1), "\n");
        // Past one read's worth.
        let long: String = (0..100_000).map(|i| format!("{i}\n")).collect();
        assert_eq!(tail(&long, 2), "99998\n99999\n");
        assert_eq!(parse_tail("all"), Ok(TailLines(None)));
        assert_eq!(parse_tail("5"), Ok(TailLines(Some(5))));
        assert!(parse_tail("five").is_err());
    }

    #[test]
    fn vm_paths_follow_dockers_rule() {
        assert_eq!(vm_path("web:/etc/x"), Some(("web", "/etc/x")));
        assert_eq!(vm_path("./a:b"), None);
        assert_eq!(vm_path("/tmp/x"), None);
        assert_eq!(vm_path(":x"), None);
    }
}
