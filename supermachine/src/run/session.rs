//! The phases of a `run` once it is registered: publish its ports, wire its consoles and
//! control, supervise it, have the guest started ([`start`](super::start): booted or
//! restored), and turn how it ended into a status.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use guest_init::ControlMessage;

use crate::boot::ConsoleSpec;
use crate::VmExit;

use super::bakes::*;
use super::consoles::*;
use super::plan::*;
use super::ready::*;
use super::signals::*;
use super::start::*;
use super::*;

/// The running VM's snapshotter and workload, once it runs (for `supermachine snapshot`).
pub(super) type LiveVm = Arc<Mutex<Option<(crate::snapshot::Snapshotter, BakedWorkload)>>>;

/// Carries out a control-socket request on the running VM.
pub(super) fn control_request(
    live: &LiveVm,
    stopper: &StopHandle,
    pauser: &Pauser,
    has_volumes: bool,
    request: crate::control::ControlRequest,
) -> crate::control::ControlReply {
    use crate::control::{ControlReply, ControlRequest};
    let error = |message: String| ControlReply::Error { message };
    match request {
        ControlRequest::Stop { grace_ms } => {
            // The workload must run to hear its stop signal.
            pauser.unpause();
            stopper.stop(std::time::Duration::from_millis(grace_ms));
            ControlReply::Stopping
        }
        ControlRequest::Pause => match pauser.pause() {
            Ok(()) => ControlReply::Done,
            Err(e) => error(e.to_string()),
        },
        ControlRequest::Unpause => {
            pauser.unpause();
            ControlReply::Done
        }
        ControlRequest::Snapshot { dir, stop } => {
            if has_volumes {
                return error("volumes are not part of a snapshot: this VM has -v".into());
            }
            let Some((snapshotter, mut workload)) =
                live.lock().unwrap_or_else(|e| e.into_inner()).clone()
            else {
                return error("the VM is not running yet".into());
            };
            workload.baked_at = now_seconds();
            let after = if stop {
                crate::snapshot::AfterSnapshot::Stop
            } else {
                crate::snapshot::AfterSnapshot::Resume
            };
            match snapshotter.take(&dir, Some(workload.to_payload()), after) {
                Ok(dir) => ControlReply::Snapshot { dir },
                Err(e) => error(e.to_string()),
            }
        }
    }
}

/// A user's pause of the running VM, and the marker in its directory that `ps` reads.
pub(super) struct Pauser {
    pub(super) vm: crate::VmControl,
    pub(super) marker: std::path::PathBuf,
}

impl Pauser {
    fn pause(&self) -> Result<(), String> {
        match self.vm.pause() {
            Ok(()) => {
                // A private, empty file; the pause holds even if it cannot be made.
                if let Err(e) = std::fs::write(&self.marker, b"") {
                    tracing::warn!("paused, but {}: {e}", self.marker.display());
                }
                Ok(())
            }
            Err(vmm_core::CaptureError::NotRunning) => Err("the VM is not running".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub(super) fn unpause(&self) {
        self.vm.unpause();
        let _ = std::fs::remove_file(&self.marker);
    }
}

/// Decides which published ports terminate TLS: those marked `/tls`, or all of them when TLS
/// is configured and none is marked. A mark without TLS configured, or TLS with no port to
/// serve, is an error.
pub(super) fn tls_ports(
    mappings: &mut [crate::ports::PortMapping],
    configured: bool,
) -> Result<(), RunError> {
    let marked = mappings.iter().any(|m| m.tls);
    match (configured, marked) {
        (false, true) => Err(RunError::Tls(
            "a port marked /tls needs --tls-cert and --tls-key, or --tls-autogen".into(),
        )),
        (true, _) if mappings.is_empty() => Err(RunError::Tls(
            "TLS is configured but no port is published (give -p)".into(),
        )),
        (true, false) => {
            mappings.iter_mut().for_each(|m| m.tls = true);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What a bake produced (shared between the bake thread and `run`).
pub(super) type BakeResult = Arc<Mutex<Option<Result<std::path::PathBuf, String>>>>;

pub(super) fn run_registered(
    opts: &RunOptions,
    id: &str,
    name: &str,
    dir: &crate::vms::VmDir,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<(i32, Option<std::path::PathBuf>), RunError> {
    let started = std::time::Instant::now();
    crate::timings::mark("registered");
    let start = plan(opts)?;
    crate::timings::mark("planned");
    // A restore's VM is made on another thread meanwhile: nothing below needs it until the
    // restore itself.
    let restore_vm = match &start {
        Start::Restore { loaded, .. } if opts.bake.is_none() => {
            let (memory, vcpus) = (loaded.memory.clone(), loaded.state.vcpus.len() as u8);
            std::thread::Builder::new()
                .name("restore-vm".into())
                .spawn(move || crate::boot::create_restore_vm(&memory, vcpus))
                .ok()
        }
        _ => None,
    };
    if opts.bake.is_some() {
        if !opts.config.volumes.is_empty() {
            return Err(RunError::Bake(
                "volumes are not part of a snapshot: bake without -v".into(),
            ));
        }
        if !opts.config.publish.is_empty() || opts.config.publish_all || opts.config.tls.is_some() {
            return Err(RunError::Bake(
                "a bake publishes no ports: give -p to the `run` that restores it".into(),
            ));
        }
    }
    let (exposed, stop_signal, image, image_health) = match &start {
        Start::Restore { workload, .. } => (
            workload.exposed_ports.clone(),
            workload.stop_signal.clone(),
            workload.image.clone(),
            workload.healthcheck.clone(),
        ),
        Start::Boot { record, .. } => (
            record.run_config.exposed_ports.clone(),
            record.run_config.stop_signal.clone(),
            opts.image.clone(),
            record.run_config.healthcheck.clone(),
        ),
    };
    // `--health-cmd` wins over the image's HEALTHCHECK.
    let health = opts.config.health.clone().or_else(|| {
        image_health
            .as_ref()
            .and_then(crate::HealthCheck::from_image)
    });
    // Listening until this returns.
    let (_forwarding, agent, agent_gate) = publish(opts, id, name, dir, &exposed, image)?;
    let Wired {
        consoles,
        serial,
        tail,
        log_seen,
        control_input,
        ready,
        catch_up,
    } = wire_consoles(opts, stdout, stderr, stdin)?;
    let signal_control = control_input.clone();
    let restore_control = control_input;
    let ready_watch = ready.clone();
    let ready_at = ready.1.clone();
    let vm_control = crate::VmControl::new();
    // The library's handle, or our own for `supermachine stop` through the control socket.
    let stopper = opts.stop_handle.clone().unwrap_or_default();
    stopper.attach(
        signal_control.clone(),
        vm_control.clone(),
        signal_number(&stop_signal),
    );
    let _signals = if opts.forward_signals {
        forward_host_signals(
            &stop_signal,
            signal_control,
            vm_control.clone(),
            stopper.clone(),
            opts.tty,
            opts.config.stop_timeout,
        )
    } else {
        None
    };
    let booting = std::time::Instant::now();
    // A guest that never comes up (a hung kernel, a broken init) is stopped, not waited on.
    let never_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let come_up_limit = opts.config.start_timeout;
    {
        let (ready, vm, never_up) = (ready_watch.clone(), vm_control.clone(), never_up.clone());
        // After a boot, init writes its ready line once the agent listens; a restore opens
        // the gate itself, after the clone caught up.
        let gate = matches!(start, Start::Boot { .. }).then(|| agent_gate.clone());
        std::thread::spawn(move || {
            if ready.wait_timeout(come_up_limit) {
                if let Some(gate) = gate {
                    gate.open();
                }
            } else if !vm.is_stopping() {
                never_up.store(true, std::sync::atomic::Ordering::SeqCst);
                vm.request_exit(VmExit::Stopped);
            }
        });
    }
    let baked: BakeResult = Arc::default();
    // `supermachine snapshot` of this VM, through its control socket.
    let live: LiveVm = Arc::default();
    // Served until this returns.
    let _control_server;
    {
        let live = live.clone();
        let has_volumes = !opts.config.volumes.is_empty();
        let pauser = Pauser {
            vm: vm_control.clone(),
            marker: dir.paused_marker(),
        };
        _control_server = crate::control::serve(&dir.control(), move |request| {
            control_request(&live, &stopper, &pauser, has_volumes, request)
        })
        .map_err(|e| RunError::Publish(std::io::Error::other(format!("control socket: {e}"))))?;
    }
    crate::timings::mark("control_served");
    if let (Some(check), None) = (health, &opts.bake) {
        crate::health::watch(
            check,
            agent.clone(),
            vm_control.clone(),
            dir.path().to_path_buf(),
        );
    }
    let shared = Shared {
        opts,
        id,
        dir,
        started,
        booting,
        vm_control,
        agent,
        agent_gate,
        ready,
        catch_up,
        control_input: restore_control,
        live,
        baked: baked.clone(),
        log_seen,
        come_up_limit,
        exposed,
    };
    let outcome = match start {
        Start::Restore {
            dir: snapshot_dir,
            loaded,
            workload,
        } => restore_guest(
            &shared,
            serial,
            consoles,
            snapshot_dir,
            loaded,
            workload,
            restore_vm,
        )?,
        Start::Boot {
            store,
            record,
            argv,
            workdir,
            key,
        } => boot_guest(&shared, serial, consoles, store, record, argv, workdir, key)?,
    };
    report_timings(started, booting, &ready_at);
    if opts.bake.is_some() {
        match baked.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(Ok(path)) => return Ok((0, Some(path))),
            Some(Err(why)) => return Err(RunError::Bake(why)),
            None => {}
        }
    }
    let status = exit_status(
        outcome.exit,
        never_up.load(std::sync::atomic::Ordering::SeqCst),
        come_up_limit,
        &tail,
    )?;
    if opts.bake.is_some() {
        return Err(RunError::Bake(format!(
            "the workload exited with status {status} before it was ready"
        )));
    }
    Ok((status, None))
}

/// The consoles of a run's VM, wired (see [`wire_consoles`]).
struct Wired {
    /// stdout (`/dev/hvc0`, with stdin), stderr (`/dev/hvc1`), control (`/dev/hvc2`).
    consoles: Vec<ConsoleSpec>,
    /// The kernel's serial console: this process's stderr with `--debug`, else kept for errors.
    serial: Box<dyn Write + Send>,
    tail: ConsoleTail,
    /// `--ready-log` matched.
    log_seen: Arc<std::sync::atomic::AtomicBool>,
    /// The control console's input, once the device exists.
    control_input: ControlInput,
    /// Init's ready line.
    ready: ReadySignal,
    /// Init's catch-up answers.
    catch_up: CatchUp,
}

/// The console phase: the workload's stdout and stderr (watched for `--ready-log`), stdin
/// forwarded once init's consoles are raw (then end-of-file on the control console), the
/// control console whose output carries init's ready line and catch-up answers, and the
/// serial console.
fn wire_consoles(
    opts: &RunOptions,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<Wired, RunError> {
    // `--ready-log`: watch the workload's output.
    let log_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stdout, stderr) = match opts.bake.as_ref().map(|b| &b.ready) {
        Some(ReadyCheck::Log(pattern)) => {
            let pattern = regex::Regex::new(pattern)
                .map_err(|e| RunError::Bake(format!("--ready-log: {e}")))?;
            let watch = |inner| -> Box<dyn Write + Send> {
                Box::new(LogWatch {
                    inner,
                    pattern: pattern.clone(),
                    line: Vec::new(),
                    seen: log_seen.clone(),
                })
            };
            (watch(stdout), watch(stderr))
        }
        _ => (stdout, stderr),
    };
    let tail = ConsoleTail::default();
    let serial: Box<dyn Write + Send> = if opts.config.debug {
        Box::new(std::io::stderr())
    } else {
        Box::new(tail.clone())
    };
    let control_input: ControlInput = Arc::default();
    let ci = control_input.clone();
    let attach_control = control_input.clone();
    let ready = ReadySignal::default();
    let catch_up = CatchUp::default();
    let guest_ready = ready.clone();
    let stdin_task: Option<Box<dyn FnOnce(devices::virtio::console::ConsoleInput) + Send>> =
        match stdin {
            Some(mut input) if opts.interactive => Some(Box::new(
                move |console: devices::virtio::console::ConsoleInput| {
                    let control = ci;
                    std::thread::spawn(move || {
                        // Input sent before init set its consoles to raw mode would be echoed.
                        guest_ready.wait();
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = input.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            let mut rest = &buf[..n];
                            while !rest.is_empty() {
                                let taken = console.push(rest);
                                rest = &rest[taken..];
                                if taken == 0 {
                                    std::thread::sleep(std::time::Duration::from_millis(1));
                                }
                            }
                        }
                        // Everything queued reaches the guest before the end-of-file does.
                        while console.pending() > 0 {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        loop {
                            if let Some(c) =
                                control.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                            {
                                c.push(ControlMessage::StdinEof.encode().as_bytes());
                                break;
                            }
                            // The control console is attached right after this one.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    });
                },
            )),
            _ => None,
        };
    let consoles = vec![
        ConsoleSpec {
            output: stdout,
            on_ready: stdin_task,
        },
        ConsoleSpec {
            output: stderr,
            on_ready: None,
        },
        ConsoleSpec {
            output: Box::new(ControlOutput {
                ready: ready.clone(),
                catch_up: catch_up.clone(),
            }),
            on_ready: Some(Box::new(move |c| {
                *attach_control.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
            })),
        },
    ];
    Ok(Wired {
        consoles,
        serial,
        tail,
        log_seen,
        control_input,
        ready,
        catch_up,
    })
}

/// For `cargo xtask bench run` (with `SUPERMACHINE_TIMINGS`): host preparation, VM start +
/// kernel + init setup, workload (init ready → VM end).
fn report_timings(
    started: std::time::Instant,
    booting: std::time::Instant,
    ready_at: &Mutex<Option<std::time::Instant>>,
) {
    if std::env::var_os("SUPERMACHINE_TIMINGS").is_none() {
        return;
    }
    let ended = std::time::Instant::now();
    let ready = ready_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(ended);
    let ms = |a: std::time::Instant, b: std::time::Instant| b.duration_since(a).as_secs_f64() * 1e3;
    eprintln!(
        "timings: prepare={:.1} boot={:.1} workload={:.1}",
        ms(started, booting),
        ms(booting, ready),
        ms(ready, ended)
    );
}

/// The last phase: how the VM ended as the run's status (the workload's, 137 when it was
/// stopped from the host), or why there is none.
fn exit_status(
    exit: VmExit,
    never_up: bool,
    come_up_limit: std::time::Duration,
    tail: &ConsoleTail,
) -> Result<i32, RunError> {
    match exit {
        VmExit::PowerOff(Some(status)) => Ok(status),
        VmExit::Stopped if never_up => Err(RunError::NoStatus {
            why: format!(
                "the guest did not come up within {} s",
                come_up_limit.as_secs()
            ),
            tail: tail.last_lines(8),
        }),
        // Stopped from the host after the grace period: as `docker stop` reports a kill.
        VmExit::Stopped => Ok(128 + 9),
        other => Err(RunError::NoStatus {
            why: match other {
                VmExit::Reset => "the guest reset; a kernel panic or init failure".into(),
                VmExit::Shutdown => "triple fault".into(),
                _ => "powered off".into(),
            },
            tail: tail.last_lines(8),
        }),
    }
}

/// The publish phase: binds the published ports (before the VM exists, so a port in use fails
/// the run at once), registers the VM with them, and forwards each to the guest through the
/// agent once the gate opens. The VM is reachable on its ports as long as the forwardings live.
fn publish(
    opts: &RunOptions,
    id: &str,
    name: &str,
    dir: &crate::vms::VmDir,
    exposed: &[String],
    image: String,
) -> Result<
    (
        Vec<crate::ports::Forwarding>,
        crate::agent::Agent,
        crate::ports::AgentGate,
    ),
    RunError,
> {
    let mut mappings = opts.config.publish.clone();
    if opts.config.publish_all {
        mappings.extend(crate::ports::PortMapping::for_exposed(exposed));
    }
    tls_ports(&mut mappings, opts.config.tls.is_some())?;
    let published = mappings
        .into_iter()
        .map(crate::ports::bind)
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::Publish)?;
    let ports: Vec<String> = published
        .iter()
        .map(|p| {
            let proto = if p.mapping.tls { "tls" } else { "tcp" };
            format!("{}->{}/{proto}", p.local, p.mapping.guest_port)
        })
        .collect();
    if opts.config.publish_all {
        for p in &ports {
            eprintln!("supermachine: published {p}");
        }
    }
    dir.save(&crate::vms::VmRecord {
        id: id.into(),
        name: name.into(),
        image,
        created: now_seconds(),
        pid: std::process::id(),
        pid_start: crate::vms::process_start(std::process::id()).unwrap_or(0),
        ports,
        detached: opts.config.reserved_id.is_some() && opts.forward_signals,
        // The library's VMs share their program's process: never signal it.
        embedded: !opts.forward_signals,
        auto_remove: !opts.config.keep_after_exit,
        exit_code: None,
        // Kept across the runs of a restarting VM.
        restarts: dir.record().map_or(0, |r| r.restarts),
    })?;
    // A run starts unpaused, whatever an earlier run of a restarting VM left.
    let _ = std::fs::remove_file(dir.paused_marker());
    crate::timings::mark("ports_bound");
    let agent = crate::agent::Agent::new(dir.vsock());
    let agent_gate = crate::ports::AgentGate::default();
    if let Some(tls) = &opts.config.tls {
        if let Some(pem) = tls.generated_certificate_pem() {
            let path = dir.path().join("tls-cert.pem");
            std::fs::write(&path, pem)
                .map_err(|e| RunError::Tls(format!("cannot write {}: {e}", path.display())))?;
            eprintln!(
                "supermachine: TLS with a self-signed certificate for localhost, SHA-256 {} (saved as {})",
                tls.fingerprint(),
                path.display()
            );
        }
    }
    let forwarding = published
        .into_iter()
        .map(|p| {
            let tls = opts.config.tls.clone().filter(|_| p.mapping.tls);
            p.forward(agent.clone(), agent_gate.clone(), tls)
        })
        .collect();
    Ok((forwarding, agent, agent_gate))
}
