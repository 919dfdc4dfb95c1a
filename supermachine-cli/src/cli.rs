//! Command-line parsing (clap derive over typed options) and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use supermachine::boot::{boot, BootOptions};
use supermachine::images::human_size;
use supermachine::VmExit;
use supermachine::{paths, Attach, Image, VmConfig, VmHandle};

/// Exit status when supermachine itself failed (as Docker's 125).
const EXIT_SUPERMACHINE_FAILED: u8 = 125;

/// Run OCI images as hardware-isolated microVMs.
#[derive(Debug, Parser)]
#[command(name = "supermachine", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a kernel and initramfs and run COMMAND with our init as PID 1; exits with
    /// COMMAND's exit status.
    Boot(BootArgs),
    /// Run an image in a new microVM, as `docker run` does (restored from its bake, when one
    /// exists for the same configuration)
    Run(RunArgs),
    /// Bake an image: boot it, wait until its workload is ready, and save a snapshot that
    /// later `run`s restore in milliseconds
    Bake(BakeArgs),
    /// Pull an image (docker://REF or bare REF, oci:PATH[:TAG], oci-archive:PATH[:TAG],
    /// docker-archive:PATH[:REF]) and build its root filesystem image
    Pull(PullArgs),
    /// List pulled images
    Images {
        /// table, or json (one object per line)
        #[arg(long, value_enum, default_value_t)]
        format: crate::inspect::Format,
    },
    /// Remove images (their blobs go with the next `prune`)
    Rmi {
        /// Images to remove
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Delete blobs and root filesystems no image uses
    Prune,
    /// Named block volumes
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// List VMs (running ones; -a for all)
    Ps(crate::vm_commands::PsArgs),
    /// Show a VM's output (stdout and stderr, for VMs started with -d)
    Logs(crate::vm_commands::LogsArgs),
    /// Run a command in a running VM
    Exec(crate::vm_commands::ExecArgs),
    /// Copy a file between the host and a VM: cp SRC NAME:DST, or cp NAME:SRC DST
    Cp(crate::vm_commands::CpArgs),
    /// Stop running VMs: the image's stop signal, then power off after the timeout
    Stop(crate::vm_commands::StopArgs),
    /// Clone a running VM: a snapshot (it goes on untouched) and N clones started from it in
    /// the background, each with its own id, name, memory and root filesystem changes
    Fork(crate::vm_commands::ForkArgs),
    /// Show VMs' CPU, memory, network and disk use (refreshing; --no-stream for one sample)
    Stats(crate::vm_commands::StatsArgs),
    /// Show VMs or images in detail, as JSON
    Inspect(crate::inspect::InspectArgs),
    /// Pause VMs: their vCPUs stop until `unpause` (published ports keep accepting;
    /// connections wait)
    Pause(crate::vm_commands::PauseArgs),
    /// Let paused VMs run again
    Unpause(crate::vm_commands::PauseArgs),
    /// Remove VMs (-f stops running ones first)
    Rm(crate::vm_commands::RmArgs),
    /// Snapshot a running VM into DIR (it goes on running unless --stop)
    Snapshot(crate::vm_commands::SnapshotArgs),
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a named volume (sparse, ext4)
    Create {
        /// Size
        #[arg(long, default_value = "1g", value_parser = parse_memory)]
        size: u32,
        /// Name
        name: String,
    },
    /// List named volumes
    Ls,
    /// Remove named volumes
    Rm {
        /// Names
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
struct RunArgs {
    /// Keep STDIN open and connect it to the workload
    #[arg(short, long)]
    interactive: bool,
    /// Give the workload a terminal
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (NAME=VALUE, or NAME to pass the host's value)
    #[arg(short, long, value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    /// Read environment variables from a file (NAME=VALUE lines; # comments)
    #[arg(long, value_name = "FILE")]
    env_file: Vec<std::path::PathBuf>,
    /// Override the image's entrypoint ("" clears it)
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// Working directory inside the container
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// Host name of the guest
    #[arg(long)]
    hostname: Option<String>,
    /// Guest memory (bytes, or with a b/k/m/g suffix: 512m, 2g)
    #[arg(short, long, value_name = "SIZE", default_value = "512m", value_parser = parse_memory)]
    memory: u32,
    /// Number of vCPUs (fractions round up)
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    cpus: u8,
    /// A name for the VM (shown in the guest as its host name when --hostname is not given)
    #[arg(long)]
    name: Option<String>,
    /// Remove the VM when it exits (foreground VMs always are; this is for -d)
    #[arg(long)]
    rm: bool,
    /// Run in the background: print the VM's id once it is up
    #[arg(short, long)]
    detach: bool,
    /// Publish a guest TCP port on the host (repeatable)
    #[arg(short, long, value_name = "[HOST_IP:][HOST_PORT:]GUEST_PORT")]
    publish: Vec<supermachine::ports::PortMapping>,
    /// Publish every port the image exposes on a free host port
    #[arg(short = 'P', long)]
    publish_all: bool,
    /// Terminate TLS on the host with this PEM certificate chain (on the ports marked /tls, or
    /// on every published port); the plaintext goes to the guest port
    #[arg(
        long,
        value_name = "CERT.pem",
        requires = "tls_key",
        conflicts_with = "tls_autogen"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (unencrypted)
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Terminate TLS with a fresh self-signed certificate for localhost (its fingerprint is
    /// printed; the certificate is saved in the VM's directory)
    #[arg(long)]
    tls_autogen: bool,
    /// Protocols offered with ALPN on TLS ports, most preferred first (h2 only for a guest
    /// that speaks HTTP/2 in plaintext)
    #[arg(
        long,
        value_name = "PROTO,...",
        value_delimiter = ',',
        default_value = "http/1.1"
    )]
    tls_alpn: Vec<String>,
    /// Seconds the workload has to exit after its stop signal before the VM is powered off
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
    /// The guest's network: user (rootless NAT; 10.0.2.2 stands for the host's loopback, closed
    /// unless --egress opens it), none (only lo), or tap:IFACE (an existing TAP device)
    #[arg(long, alias = "net", value_name = "MODE", default_value = "user")]
    network: supermachine::network::NetworkMode,
    /// Where the guest may connect (--network user). public (the default): the internet only,
    /// never the host's loopback, private networks or cloud metadata; allow-host:PORT,...:
    /// public plus those ports of the host's loopback (10.0.2.2); allow-all: everything,
    /// the host included; none: no network; allow:CIDR[:PORT],... or deny:CIDR[:PORT],...
    /// (IPv6 in brackets)
    #[arg(long, value_name = "POLICY")]
    egress: Option<supermachine::network::EgressPolicy>,
    /// Volume: DIR:PATH shares an existing host directory (virtio-fs); FILE:PATH or NAME:PATH
    /// is a block volume (created ext4 when missing); ":ro" for read-only. On a shared
    /// directory the guest cannot create device nodes and setuid/setgid bits are stripped;
    /// ":special" (or ":ro,special"…) allows both — only for a guest you would let do so as
    /// root on the host
    #[arg(short, long, value_name = "SRC:DST[:ro][,special]")]
    volume: Vec<supermachine::volumes::VolumeSpec>,
    /// Size of volumes created on first use
    #[arg(long, value_name = "SIZE", default_value = "1g", value_parser = parse_memory)]
    volume_size: u32,
    /// When to pull the image
    #[arg(long, value_enum, default_value = "missing")]
    pull: PullPolicyArg,
    /// Start the VM again when its workload ends: no, on-failure[:N], always, unless-stopped
    /// (a stop is never undone)
    #[arg(long, value_name = "POLICY", default_value = "no")]
    restart: supermachine::RestartPolicy,
    /// Check health by running CMD (with /bin/sh -c) in the guest; healthy when it exits 0
    #[arg(long, value_name = "CMD")]
    health_cmd: Option<String>,
    /// Time between health checks
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    health_interval: std::time::Duration,
    /// A health check that takes longer fails
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    health_timeout: std::time::Duration,
    /// Failed checks in a row that make the VM unhealthy
    #[arg(long, value_name = "N", default_value_t = 3)]
    health_retries: u32,
    /// Failed checks this soon after the start do not count
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    health_start_period: std::time::Duration,
    /// Pull over plain HTTP from this registry (HOST[:PORT]; loopback always is)
    #[arg(long, value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// Show the guest kernel's log on stderr
    #[arg(long)]
    debug: bool,
    /// Restore this snapshot (a directory, or the name of a bake) instead of booting the image
    #[arg(long, value_name = "DIR|NAME")]
    snapshot: Option<String>,
    /// Boot even if a bake of this image and configuration exists
    #[arg(long)]
    no_restore: bool,
    /// The image
    #[arg(value_name = "IMAGE", required_unless_present = "snapshot")]
    image: Option<String>,
    /// Command and arguments (replace the image's Cmd)
    #[arg(value_name = "COMMAND", allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
struct BakeArgs {
    /// Write the snapshot to this directory [default: the bake cache, where `run` finds it]
    #[arg(short, long, value_name = "DIR", conflicts_with = "bake_name")]
    output: Option<PathBuf>,
    /// Keep the bake under this name in the cache (`run --snapshot NAME`)
    #[arg(long = "as", value_name = "NAME")]
    bake_name: Option<String>,
    /// Ready when this TCP port accepts connections inside the guest
    /// [default: the image's first exposed port, else as soon as the workload started]
    #[arg(long, value_name = "PORT", group = "ready")]
    ready_port: Option<u16>,
    /// Ready when this shell command exits 0 inside the guest
    #[arg(long, value_name = "CMD", group = "ready")]
    ready_cmd: Option<String>,
    /// Ready when a line of the workload's output matches this regular expression
    #[arg(long, value_name = "REGEX", group = "ready")]
    ready_log: Option<String>,
    /// Ready this many milliseconds after the workload started
    #[arg(long, value_name = "MS", group = "ready")]
    ready_delay: Option<u64>,
    /// Snapshot before the workload starts (every restore starts it, with the `-e` given then)
    #[arg(long, group = "ready")]
    before_start: bool,
    /// Give up when not ready within this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    ready_timeout: u64,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PullPolicyArg {
    Missing,
    Always,
    Never,
}

fn parse_memory(s: &str) -> Result<u32, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('b') => (&s[..s.len() - 1], 1u64),
        Some('k') => (&s[..s.len() - 1], 1 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (e.g. 512m, 2g)"))?;
    let mib = n.saturating_mul(mult) >> 20;
    if !(64..=1 << 20).contains(&mib) {
        return Err(format!("{s} is out of range (64m..1024g)"));
    }
    Ok(mib as u32)
}

/// `500ms`, `30s`, `5m`, `1h` (Docker's duration flags), or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m, 1h)");
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let n: f64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    let n: f64 = s.parse().map_err(|_| format!("invalid CPU count {s:?}"))?;
    if !(n > 0.0 && n <= 64.0) {
        return Err(format!("{s} is out of range (0..64]"));
    }
    Ok(n.ceil() as u8)
}

#[derive(Debug, Args)]
struct PullArgs {
    /// Platform to pull from a multi-platform image, OS/ARCH
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Talk plain HTTP to this registry (host[:port]); loopback registries always are
    #[arg(long, value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// No progress bars
    #[arg(long, short = 'q')]
    quiet: bool,
    /// The image
    #[arg(value_name = "IMAGE")]
    image: String,
}

#[derive(Debug, Args)]
struct BootArgs {
    /// Guest kernel: an x86-64 ELF vmlinux (PVH or 64-bit entry) or a bzImage
    /// [default: the kernel built by `cargo xtask kernel`]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio) with guest-init as /init
    /// [default: the one built by `cargo xtask initramfs`]
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Boot without any initramfs (the kernel needs another root then)
    #[arg(long, conflicts_with = "initramfs")]
    no_initramfs: bool,
    /// Extra kernel parameters, appended to the defaults
    /// ("console=ttyS0 reboot=k panic=-1 io_delay=none")
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory in MiB
    #[arg(long, short = 'm', value_name = "MIB", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(16..=1048576))]
    memory: u32,
    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    cpus: u8,
    /// Set an environment variable for COMMAND (NAME=value; repeatable)
    #[arg(long, short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Attach a disk image as virtio-blk (/dev/vda, /dev/vdb, … in order); add :ro for
    /// read-only (repeatable)
    #[arg(long, value_name = "PATH[:ro]")]
    disk: Vec<supermachine::DiskSpec>,
    /// Share a host directory through virtio-fs (the command mounts it: mount -t virtiofs TAG
    /// PATH); add :ro for read-only, :special to allow device nodes and setuid/setgid files
    /// (refused by default), comma-separated (repeatable)
    #[arg(long, value_name = "DIR:TAG[:ro][,special]")]
    share: Vec<supermachine::boot::ShareSpec>,
    /// Show only COMMAND's output: no kernel log, no init progress
    #[arg(long, short = 'q')]
    quiet: bool,
    /// A network device (eth0, unconfigured: the command sets it up): none, user (rootless
    /// NAT; 10.0.2.2 is the host's loopback, 10.0.2.3 answers DNS) or tap:IFACE
    #[arg(long, value_name = "MODE", default_value = "none")]
    network: supermachine::network::NetworkMode,
    /// Where the guest may connect with --network user (as for `run`; the default is public:
    /// the internet only, not the host's loopback)
    #[arg(long, value_name = "POLICY")]
    egress: Option<supermachine::network::EgressPolicy>,
    /// Snapshot the VM into this directory once it prints --snapshot-when (then stop it)
    #[arg(long, value_name = "DIR", requires = "snapshot_when")]
    snapshot_to: Option<PathBuf>,
    /// The serial-console text that triggers --snapshot-to
    #[arg(long, value_name = "TEXT", requires = "snapshot_to")]
    snapshot_when: Option<String>,
    /// Restore this snapshot instead of booting (its console on stdin/stdout); a snapshot with
    /// disks opens only those given again with --disk
    #[arg(long, value_name = "DIR", conflicts_with_all = ["snapshot_to", "initramfs", "no_initramfs", "command"])]
    restore: Option<PathBuf>,
    /// A virtio-vsock device (guest CID 3) whose host side is this Unix socket, as
    /// Firecracker's: connect and send "CONNECT PORT\n" to reach guest port PORT; guest
    /// connections to host port P go to SOCKET_P
    #[arg(long, value_name = "SOCKET")]
    vsock: Option<PathBuf>,
    /// The command to run in the guest [default: /bin/sh]
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `supermachine run …` without clap's whole command tree: the common restore command lines
/// by hand ([`parse_common_run`]), else the `run` subcommand's parser alone. Under emulation
/// clap costs more than the rest of a restore's host-side start. `None` for anything else, and
/// for anything the full parser should answer (errors, `--help`), so messages stay the same.
fn parse_run_fast(args: &[std::ffi::OsString]) -> Option<Cli> {
    use clap::{Args as _, FromArgMatches};
    if args.get(1).map(|a| a.as_os_str()) != Some(std::ffi::OsStr::new("run")) {
        return None;
    }
    if let Some(run) = parse_common_run(&args[2..]) {
        return Some(Cli {
            command: Command::Run(run),
        });
    }
    let parser = RunArgs::augment_args(clap::Command::new("run").no_binary_name(true));
    let matches = parser.try_get_matches_from(&args[2..]).ok()?;
    let run = RunArgs::from_arg_matches(&matches).ok()?;
    Some(Cli {
        command: Command::Run(run),
    })
}

/// The policy `--egress` asks for (the default when not given). With a TAP device only
/// `allow-all` and `none` mean something: the TAP's traffic is the host firewall's to filter,
/// so any other policy given there is refused rather than silently ignored.
fn egress_for(
    network: &supermachine::network::NetworkMode,
    egress: Option<supermachine::network::EgressPolicy>,
) -> anyhow::Result<supermachine::network::EgressPolicy> {
    use supermachine::network::{EgressPolicy, NetworkMode};
    match egress {
        Some(policy)
            if matches!(network, NetworkMode::Tap(_))
                && !matches!(policy, EgressPolicy::AllowAll | EgressPolicy::None) =>
        {
            anyhow::bail!(
                "--egress {policy} applies to --network user; a TAP device's traffic is for \
                 the host's firewall to filter"
            )
        }
        Some(policy) => Ok(policy),
        None => Ok(EgressPolicy::default()),
    }
}

/// `run`'s arguments when they are only `-d`, `--rm`, `-i`, `-t`, `-p`, `-e`, `-m`, `--cpus`,
/// `--name` (values as separate words or `--long=VALUE`) before the image, then the command:
/// what restores of a baked server look like. Anything else, or a value clap would refuse,
/// is `None` (clap parses it). Defaults are clap's: a test compares both parsers.
fn parse_common_run(args: &[std::ffi::OsString]) -> Option<RunArgs> {
    let words: Vec<&str> = args.iter().map(|a| a.to_str()).collect::<Option<_>>()?;
    let mut run = RunArgs {
        interactive: false,
        tty: false,
        env: Vec::new(),
        env_file: Vec::new(),
        entrypoint: None,
        workdir: None,
        user: None,
        hostname: None,
        memory: parse_memory("512m").ok()?,
        cpus: parse_cpus("1").ok()?,
        name: None,
        rm: false,
        detach: false,
        publish: Vec::new(),
        publish_all: false,
        tls_cert: None,
        tls_key: None,
        tls_autogen: false,
        tls_alpn: vec!["http/1.1".into()],
        stop_timeout: 10,
        network: "user".parse().ok()?,
        egress: None,
        volume: Vec::new(),
        volume_size: parse_memory("1g").ok()?,
        pull: PullPolicyArg::Missing,
        insecure_registry: Vec::new(),
        restart: supermachine::RestartPolicy::No,
        health_cmd: None,
        health_interval: std::time::Duration::from_secs(30),
        health_timeout: std::time::Duration::from_secs(30),
        health_retries: 3,
        health_start_period: std::time::Duration::ZERO,
        debug: false,
        snapshot: None,
        no_restore: false,
        image: None,
        command: Vec::new(),
    };
    let mut rest = words.iter();
    while let Some(&word) = rest.next() {
        if !word.starts_with('-') {
            run.image = Some(word.to_string());
            run.command = rest.map(|w| w.to_string()).collect();
            // A flag right after the image (clap may take it as its own) or a `--` (clap
            // drops it): clap's rules, not ours.
            if run.command.first().is_some_and(|w| w.starts_with('-'))
                || run.command.iter().any(|w| w == "--")
            {
                return None;
            }
            return Some(run);
        }
        let (flag, inline) = match word.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (word, None),
        };
        match flag {
            "-d" | "--detach" if inline.is_none() => run.detach = true,
            "--rm" if inline.is_none() => run.rm = true,
            "-i" | "--interactive" if inline.is_none() => run.interactive = true,
            "-t" | "--tty" if inline.is_none() => run.tty = true,
            "-p" | "--publish" | "-e" | "--env" | "-m" | "--memory" | "--cpus" | "--name" => {
                let value = match inline {
                    Some(v) => v,
                    None => rest.next()?,
                };
                match flag {
                    "-p" | "--publish" => run.publish.push(value.parse().ok()?),
                    "-e" | "--env" => run.env.push(value.to_string()),
                    "-m" | "--memory" => run.memory = parse_memory(value).ok()?,
                    "--cpus" => run.cpus = parse_cpus(value).ok()?,
                    _ => run.name = Some(value.to_string()),
                }
            }
            _ => return None,
        }
    }
    // No image: clap says what is missing.
    None
}

pub fn main() -> ExitCode {
    supermachine::timings::mark("main");
    // A process of this CLI that runs a VM filters its system calls from the VM's start on.
    supermachine::seccomp::enable();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let parsed = match parse_run_fast(&args) {
        Some(cli) => Ok(cli),
        None => Cli::try_parse_from(&args),
    };
    let cli = match parsed {
        Ok(cli) => {
            supermachine::timings::mark("parsed");
            cli
        }
        Err(e) => {
            let _ = e.print();
            // A bad flag is supermachine failing to start anything: 125, as Docker does.
            return if e.use_stderr() {
                ExitCode::from(EXIT_SUPERMACHINE_FAILED)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supermachine: {e}");
            ExitCode::from(EXIT_SUPERMACHINE_FAILED)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Boot(args) => run_boot(args),
        Command::Run(args) => run_run(args),
        Command::Bake(args) => run_bake(args),
        Command::Pull(args) => image_command(|| run_pull(args)),
        Command::Images { format } => image_command(|| run_images(format)),
        Command::Rmi { images } => image_command(|| run_rmi(&images)),
        Command::Prune => image_command(run_prune),
        Command::Volume(v) => image_command(|| run_volume(v)),
        Command::Ps(a) => crate::vm_commands::ps(a),
        Command::Logs(a) => crate::vm_commands::logs(a),
        Command::Exec(a) => crate::vm_commands::exec(a),
        Command::Cp(a) => crate::vm_commands::cp(a),
        Command::Stop(a) => crate::vm_commands::stop(a),
        Command::Rm(a) => crate::vm_commands::rm(a),
        Command::Pause(a) => crate::vm_commands::pause(a),
        Command::Inspect(a) => crate::inspect::inspect(a),
        Command::Stats(a) => crate::vm_commands::stats(a),
        Command::Fork(a) => crate::vm_commands::fork(a),
        Command::Unpause(a) => crate::vm_commands::unpause(a),
        Command::Snapshot(a) => crate::vm_commands::snapshot(a),
    }
}

/// Image commands fail with status 1, as Docker's do.
fn image_command(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    match f() {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("supermachine: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Library warnings (e.g. a guest hitting its network's flow limit) go to stderr; with
/// `--debug`, the details too (e.g. each flow the egress policy refused).
fn init_logging(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::WARN
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_level(false)
        .with_ansi(false)
        .try_init();
}

/// `-e` entries as (name, value): `NAME=VALUE`, or `NAME` alone for the host's value (left out
/// when the host has none, as Docker does).
pub fn env_pairs(entries: &[String]) -> Vec<(String, String)> {
    entries
        .iter()
        .filter_map(|e| match e.split_once('=') {
            Some((name, value)) => Some((name.to_string(), value.to_string())),
            None => std::env::var(e).ok().map(|value| (e.clone(), value)),
        })
        .collect()
}

/// The image and the library's VM configuration for `run` (and `bake`) from the command line.
fn vm_config(args: RunArgs) -> anyhow::Result<(Image, VmConfig)> {
    use supermachine::{PullPolicy, TlsTermination, Workload};
    let mut env = Vec::new();
    for file in &args.env_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", file.display()))?;
        env.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    env.extend(args.env);
    init_logging(args.debug);
    // Checked now, so a bad certificate or key fails the start, never the first connection.
    let tls = match (&args.tls_cert, &args.tls_key, args.tls_autogen) {
        (Some(cert), Some(key), _) => Some(TlsTermination::from_pem_files(cert, key)?),
        (_, _, true) => Some(TlsTermination::self_signed_localhost()?),
        _ => None,
    }
    .map(|t| t.with_alpn(&args.tls_alpn))
    .transpose()?;
    let mut command = args.command;
    let image = match args.snapshot {
        Some(s) => {
            // With --snapshot the image is optional: a first word is then part of the command.
            if let Some(first) = args.image {
                command.insert(0, first);
            }
            Image::from_bake(&s).map_err(|_| {
                anyhow::anyhow!("--snapshot {s}: no such snapshot directory or bake")
            })?
        }
        None => Image::new(&args.image.unwrap_or_default()),
    };
    let mut config = VmConfig::new()
        .pull(match args.pull {
            PullPolicyArg::Missing => PullPolicy::Missing,
            PullPolicyArg::Always => PullPolicy::Always,
            PullPolicyArg::Never => PullPolicy::Never,
        })
        .workload(if command.is_empty() {
            Workload::ImageCommand
        } else {
            Workload::Command(command)
        })
        .memory_mib(args.memory)
        .vcpus(args.cpus)
        .volume_size(u64::from(args.volume_size) << 20)
        .stop_timeout(std::time::Duration::from_secs(args.stop_timeout))
        .publish_all(args.publish_all)
        .debug(args.debug)
        .boot_always(args.no_restore)
        .egress(egress_for(&args.network, args.egress)?)
        .network(args.network);
    for host in &args.insecure_registry {
        config = config.insecure_registry(host);
    }
    config = config.restart(args.restart);
    if let Some(cmd) = &args.health_cmd {
        config = config.health_check(supermachine::HealthCheck {
            interval: args.health_interval,
            timeout: args.health_timeout,
            retries: args.health_retries,
            start_period: args.health_start_period,
            ..supermachine::HealthCheck::shell(cmd)
        });
    }
    for (name, value) in env_pairs(&env) {
        config = config.env(&name, &value);
    }
    if let Some(e) = &args.entrypoint {
        config = config.entrypoint(e);
    }
    if let Some(w) = &args.workdir {
        config = config.workdir(w);
    }
    if let Some(u) = &args.user {
        config = config.user(u);
    }
    if let Some(h) = &args.hostname {
        config = config.hostname(h);
    }
    if let Some(n) = &args.name {
        config = config.name(n);
    }
    for p in args.publish {
        config = config.publish(p);
    }
    for v in args.volume {
        config = config.volume(v);
    }
    if let Some(tls) = tls {
        config = config.tls(tls);
    }
    // Undocumented on the command line: for tests of a guest that never comes up.
    if let Some(secs) = std::env::var("SUPERMACHINE_COME_UP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config = config.start_timeout(std::time::Duration::from_secs(secs));
    }
    Ok((image, config))
}

fn run_bake(args: BakeArgs) -> anyhow::Result<ExitCode> {
    use supermachine::{BakeOptions, ReadyCheck};
    let detached = args.run.detach || args.run.interactive || args.run.tty;
    if detached {
        anyhow::bail!("bake runs in the foreground without a terminal: drop -d, -i and -t");
    }
    if args.run.snapshot.is_some() {
        anyhow::bail!("bake boots the image: --snapshot does not apply");
    }
    if args.run.health_cmd.is_some() {
        anyhow::bail!(
            "a bake ends with its snapshot: --health-cmd applies to the `run` that restores it"
        );
    }
    if args.run.restart != supermachine::RestartPolicy::No {
        anyhow::bail!(
            "a bake ends with its snapshot: --restart applies to the `run` that restores it"
        );
    }
    let (image, config) = vm_config(args.run)?;
    let ready = if let Some(p) = args.ready_port {
        ReadyCheck::Port(p)
    } else if let Some(c) = args.ready_cmd {
        ReadyCheck::Command(c)
    } else if let Some(r) = args.ready_log {
        ReadyCheck::Log(r)
    } else if let Some(ms) = args.ready_delay {
        ReadyCheck::Delay(std::time::Duration::from_millis(ms))
    } else if args.before_start {
        ReadyCheck::BeforeStart
    } else {
        ReadyCheck::Default
    };
    let mut opts = BakeOptions::new()
        .config(config)
        .ready(ready)
        .ready_limit(std::time::Duration::from_secs(args.ready_timeout));
    match (args.output, args.bake_name) {
        (Some(dir), _) => opts = opts.dir(dir),
        (None, Some(name)) => {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                anyhow::bail!("--as {name:?}: a bake name is one path component");
            }
            opts = opts.name(&name);
        }
        (None, None) => {}
    }
    let started = std::time::Instant::now();
    // The workload's output goes to stderr with --debug, and nowhere otherwise.
    let baked = image.bake(&opts)?;
    eprintln!(
        "supermachine: baked {} in {:.2} s",
        image.reference(),
        started.elapsed().as_secs_f64()
    );
    if let Some(dir) = baked.snapshot_dir() {
        println!("{}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (rm, detach) = (args.rm, args.detach);
    let (interactive, tty) = (args.interactive, args.tty);
    let name = args.name.clone();
    let (image, mut config) = vm_config(args)?;
    let mut attach = Attach::inherit().forward_signals(true);
    if let Ok(id) = std::env::var(crate::vm_commands::DETACHED_CHILD_ENV) {
        // We are the background process of `run -d`: the parent reserved our entry.
        let reserved = VmHandle::find_reserved(&id)?;
        config = config.reserved(&reserved).keep_after_exit(!rm);
    } else if detach {
        return crate::vm_commands::detach(name.as_deref());
    } else {
        if interactive {
            attach = attach.interactive();
        }
        attach = attach.tty(tty);
    }
    let status = image.run(&config, attach)?;
    Ok(ExitCode::from((status & 0xff) as u8))
}

fn run_pull(args: PullArgs) -> anyhow::Result<()> {
    let mut opts = supermachine::PullOptions::new().progress(!args.quiet);
    if let Some(p) = &args.platform {
        let (os, arch) = p
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("--platform wants OS/ARCH, e.g. linux/amd64"))?;
        opts = opts.platform(os, arch);
    }
    for host in &args.insecure_registry {
        opts = opts.insecure_registry(host);
    }
    let info = Image::pull_with(&args.image, &opts)?.info()?;
    println!("{}", info.name);
    println!("digest: {}", info.digest);
    println!("rootfs: {}", info.rootfs.display());
    Ok(())
}

/// `sha256:0123456789ab…` → `0123456789ab`, as `docker images` shows a digest.
fn short_digest(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

fn run_images(format: crate::inspect::Format) -> anyhow::Result<()> {
    if format == crate::inspect::Format::Json {
        for i in Image::list()? {
            println!("{}", crate::inspect::image_summary(&i));
        }
        return Ok(());
    }
    println!("{:<60} {:<14} {:>10}", "IMAGE", "DIGEST", "SIZE");
    for i in Image::list()? {
        println!(
            "{:<60} {:<14} {:>10}",
            i.name,
            short_digest(&i.digest),
            human_size(i.size)
        );
    }
    let bakes = Image::list_baked()?;
    if !bakes.is_empty() {
        println!();
        println!(
            "{:<34} {:<40} {:>7} {:>9} {:>10}  SNAPSHOT TAKEN",
            "BAKED", "IMAGE", "MEMORY", "BAKE", "ON DISK"
        );
        for b in bakes {
            println!(
                "{:<34} {:<40} {:>7} {:>8.1}s {:>10}  {}",
                b.name,
                b.image,
                format!("{}m", b.memory_mib),
                b.bake_time.as_secs_f64(),
                human_size(b.disk_bytes),
                if b.before_start {
                    b.ready.clone()
                } else {
                    format!("ready: {}", b.ready)
                }
            );
        }
    }
    Ok(())
}

fn run_rmi(names: &[String]) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for name in names {
        match Image::remove(name) {
            Ok(removed) => {
                println!("Untagged: {}", removed.name);
                for bake in removed.bakes {
                    println!("Deleted bake: {bake}");
                }
            }
            Err(supermachine::Error::ImageNotFound(_)) => missing.push(name.as_str()),
            Err(e) => return Err(e.into()),
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("no such image: {}", missing.join(", "));
    }
    Ok(())
}

fn run_volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    use supermachine::Volume;
    match cmd {
        VolumeCommand::Create { size, name } => {
            Volume::create(&name, u64::from(size) << 20).map_err(config_message)?;
            println!("{name}");
        }
        VolumeCommand::Ls => {
            println!("{:<30} {:>10}", "VOLUME", "USED");
            for v in Volume::list() {
                println!("{:<30} {:>10}", v.name, human_size(v.used));
            }
        }
        VolumeCommand::Rm { names } => {
            for n in names {
                Volume::remove(&n).map_err(config_message)?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

/// A configuration error's own message, without the library's "invalid configuration: ".
fn config_message(e: supermachine::Error) -> anyhow::Error {
    match e {
        supermachine::Error::Config(m) => anyhow::anyhow!(m),
        e => e.into(),
    }
}

fn run_prune() -> anyhow::Result<()> {
    let pruned = Image::prune()?;
    println!(
        "Deleted {} files, reclaimed {}",
        pruned.files,
        human_size(pruned.bytes)
    );
    Ok(())
}

fn run_boot(args: BootArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = args.restore {
        let outcome = supermachine::boot::restore(supermachine::boot::RestoreOptions {
            dir,
            kernel: args.kernel,
            initramfs: None,
            console: Box::new(std::io::stdout()),
            console_input: Some(Box::new(std::io::stdin())),
            control: None,
            consoles: Vec::new(),
            vsock: args.vsock,
            net: None,
            on_started: None,
            disks: supermachine::boot::RestoreDisks {
                given: args.disk,
                read_only_dirs: Vec::new(),
            },
        })?;
        return Ok(boot_exit_code(outcome.exit));
    }
    let initramfs = if args.no_initramfs {
        None
    } else {
        Some(args.initramfs.unwrap_or_else(paths::default_initramfs))
    };
    let outcome = boot(BootOptions {
        kernel: args.kernel.unwrap_or_else(paths::default_kernel),
        initramfs,
        extra_cmdline: args.cmdline,
        memory_mib: args.memory,
        vcpus: args.cpus,
        command: args.command,
        env: args.env,
        quiet: args.quiet,
        console: Box::new(std::io::stdout()),
        console_input: Some(Box::new(std::io::stdin())),
        workdir: None,
        disks: args.disk,
        container: None,
        consoles: Vec::new(),
        control: None,
        vsock: args.vsock,
        net: supermachine::network::NetworkOptions {
            egress: egress_for(&args.network, args.egress)?,
            mode: args.network,
        }
        .backend()?,
        shares: args.share,
        snapshot: args.snapshot_to.zip(args.snapshot_when).map(|(dir, when)| {
            supermachine::snapshot::SnapshotRequest {
                when_output: when,
                dir,
            }
        }),
        on_started: None,
    })?;
    Ok(boot_exit_code(outcome.exit))
}

fn boot_exit_code(exit: VmExit) -> ExitCode {
    match exit {
        VmExit::PowerOff(Some(status)) => ExitCode::from((status & 0xff) as u8),
        VmExit::PowerOff(None) | VmExit::Stopped => ExitCode::SUCCESS,
        VmExit::Reset => {
            eprintln!("supermachine: the guest reset without reporting an exit status");
            ExitCode::from(EXIT_SUPERMACHINE_FAILED)
        }
        VmExit::Shutdown => {
            eprintln!("supermachine: the guest shut down (triple fault) without an exit status");
            ExitCode::from(EXIT_SUPERMACHINE_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `run ARGS` through clap's full parser.
    fn clap_run(words: &[&str]) -> Option<RunArgs> {
        let argv = std::iter::once("supermachine")
            .chain(std::iter::once("run"))
            .chain(words.iter().copied());
        match Cli::try_parse_from(argv).ok()?.command {
            Command::Run(run) => Some(run),
            _ => None,
        }
    }

    fn common_run(words: &[&str]) -> Option<RunArgs> {
        let args: Vec<std::ffi::OsString> = words.iter().map(Into::into).collect();
        parse_common_run(&args)
    }

    #[test]
    fn the_common_run_parser_agrees_with_clap() {
        for words in [
            &["busybox"][..],
            &[
                "-p",
                "127.0.0.1:8080:80",
                "busybox",
                "sh",
                "-c",
                "httpd -f -p 80",
            ],
            &[
                "-d", "--rm", "--name", "web", "-p", "80", "-p", "8443:443", "img",
            ],
            &[
                "-m", "128m", "--cpus", "1.5", "-e", "A=1", "--env=B", "img", "x", "--rm",
            ],
            &[
                "--memory=1g",
                "--publish=9000:90",
                "--name=a.b",
                "-i",
                "-t",
                "img",
                "cat",
            ],
            &[
                "--detach",
                "--interactive",
                "--tty",
                "img",
                "sh",
                "-c",
                "-p",
            ],
        ] {
            let ours = common_run(words).unwrap_or_else(|| panic!("{words:?}: not taken"));
            let clap = clap_run(words).unwrap_or_else(|| panic!("{words:?}: clap refused"));
            assert_eq!(format!("{ours:?}"), format!("{clap:?}"), "{words:?}");
        }
    }

    #[test]
    fn the_common_run_parser_leaves_everything_else_to_clap() {
        for words in [
            &[][..],
            &["-p"],
            &["-p", "notaport", "img"],
            &["-m", "lots", "img"],
            &["--cpus", "0", "img"],
            &["-it", "img"],
            &["-p80", "img"],
            &["--network", "none", "img"],
            &["--snapshot", "dir"],
            &["--help"],
            &["-d=1", "img"],
            &["--", "img"],
            &["img", "--", "-p"],
            &["img", "-p", "80"],
            &["img", "sh", "--", "x"],
        ] {
            assert!(common_run(words).is_none(), "{words:?} was taken");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_sandbox_commands_parse() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert_eq!(parse_duration("7"), Ok(std::time::Duration::from_secs(7)));
        assert!(parse_duration("-1s").is_err() && parse_duration("1d").is_err());
        let args: Vec<std::ffi::OsString> = [
            "supermachine",
            "run",
            "--insecure-registry",
            "h:5000",
            "img",
        ]
        .iter()
        .map(Into::into)
        .collect();
        match parse_run_fast(&args).or_else(|| Cli::try_parse_from(&args).ok()) {
            Some(Cli {
                command: Command::Run(r),
                ..
            }) => {
                assert_eq!(r.insecure_registry, vec!["h:5000".to_string()])
            }
            other => panic!("{other:?}"),
        }
        for argv in [
            &["supermachine", "logs", "-n", "5", "web"][..],
            &["supermachine", "logs", "--tail", "all", "-f", "web"],
            &["supermachine", "logs", "web"],
            &["supermachine", "ps", "--format", "json"],
            &["supermachine", "images", "--format", "json"],
            &["supermachine", "stats", "--no-stream", "a", "b"],
            &["supermachine", "stats"],
            &["supermachine", "pause", "a", "b"],
            &["supermachine", "unpause", "a"],
            &[
                "supermachine",
                "fork",
                "-n",
                "3",
                "--name",
                "c",
                "-p",
                "80",
                "a",
            ],
            &["supermachine", "inspect", "a", "docker://busybox"],
            &[
                "supermachine",
                "run",
                "--health-cmd",
                "true",
                "--health-interval",
                "500ms",
                "a",
            ],
            &[
                "supermachine",
                "run",
                "--insecure-registry",
                "h:5000",
                "h:5000/a",
                "true",
            ],
            &[
                "supermachine",
                "bake",
                "--insecure-registry",
                "h:5000",
                "h:5000/a",
            ],
        ] {
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("{argv:?}: {e}");
            }
        }
        for bad in [
            &["supermachine", "logs", "-n", "five", "web"][..],
            &["supermachine", "ps", "--format", "yaml"],
            &["supermachine", "pause"],
            &["supermachine", "inspect"],
            &["supermachine", "fork", "-n", "0", "a"],
            &["supermachine", "run", "--health-interval", "soon", "a"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_fast_run_parser_agrees_with_the_full_one_and_leaves_it_errors_and_help() {
        let argv = |s: &str| -> Vec<std::ffi::OsString> {
            std::iter::once("supermachine")
                .chain(s.split_whitespace())
                .map(Into::into)
                .collect()
        };
        for line in [
            "run busybox",
            "run -it --rm -e A=1 -e B -p 8080:80 -p 127.0.0.1::443/tls --tls-autogen -m 1g busybox sh -c true",
            "run -d --name web -v data:/data:ro busybox httpd -f -p 80",
            "run --snapshot /tmp/x -- echo -n hi",
            "run busybox ls -la /",
        ] {
            let fast = parse_run_fast(&argv(line)).unwrap_or_else(|| panic!("{line}"));
            let full = Cli::try_parse_from(argv(line)).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{line}");
        }
        for line in [
            "run --help",
            "run --no-such-flag busybox",
            "run -m lots busybox",
            "ps -a",
            "run",
        ] {
            assert!(parse_run_fast(&argv(line)).is_none(), "{line}");
        }
    }

    #[test]
    fn boot_parses_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "supermachine",
            "boot",
            "--cpus",
            "2",
            "--",
            "/bin/sh",
            "-c",
            "nproc; exit 3",
        ])
        .unwrap();
        let Command::Boot(b) = cli.command else {
            panic!()
        };
        assert_eq!(b.cpus, 2);
        assert_eq!(b.memory, 512);
        assert_eq!(b.command, ["/bin/sh", "-c", "nproc; exit 3"]);
    }

    #[test]
    fn disks_keep_their_order_and_mode() {
        let cli = Cli::try_parse_from([
            "supermachine",
            "boot",
            "--disk",
            "/a.img:ro",
            "--disk",
            "/b:c.img",
            "--disk",
            "/d.img:rw",
        ])
        .unwrap();
        let Command::Boot(b) = cli.command else {
            panic!()
        };
        let got: Vec<(String, bool)> = b
            .disk
            .iter()
            .map(|d| (d.path.display().to_string(), d.read_only))
            .collect();
        assert_eq!(
            got,
            [
                ("/a.img".to_string(), true),
                ("/b:c.img".to_string(), false),
                ("/d.img".to_string(), false)
            ]
        );
        assert!(Cli::try_parse_from(["supermachine", "boot", "--disk", ":ro"]).is_err());
    }

    #[test]
    fn run_takes_docker_style_flags() {
        let cli = Cli::try_parse_from([
            "supermachine",
            "run",
            "-i",
            "-e",
            "A=1",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--memory",
            "1g",
            "--cpus",
            "1.5",
            "--entrypoint",
            "",
            "img",
            "sh",
            "-c",
            "echo -n hi",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert!(r.interactive && !r.tty);
        assert_eq!((r.memory, r.cpus), (1024, 2));
        assert_eq!(r.entrypoint.as_deref(), Some(""));
        assert_eq!(r.image.as_deref(), Some("img"));
        assert_eq!(r.command, ["sh", "-c", "echo -n hi"]);
        assert!(Cli::try_parse_from(["supermachine", "run", "--memory", "1k", "img"]).is_err());
        assert!(Cli::try_parse_from(["supermachine", "run", "--cpus", "0", "img"]).is_err());
    }

    #[test]
    fn absurd_values_are_rejected() {
        for args in [
            &["supermachine", "boot", "--memory", "1"][..],
            &["supermachine", "boot", "--memory", "99999999999"],
            &["supermachine", "boot", "--cpus", "0"],
            &["supermachine", "boot", "--cpus", "65"],
            &["supermachine", "boot", "--bogus"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
