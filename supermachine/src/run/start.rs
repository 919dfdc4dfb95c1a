//! Phase 4 of a `run`: the guest starts, restored from a bake (and caught up with the host) or
//! booted from the image with its volumes and, for a bake, the thread that snapshots it once
//! it is ready.

use std::io::Write;
use std::sync::Arc;

use guest_init::{ContainerConfig, ControlMessage};

use crate::boot::{boot, BootOptions, ConsoleSpec, DiskSpec};
use crate::images;
use crate::paths;
use crate::VmExit;

use super::bakes::*;
use super::consoles::*;
use super::ready::*;
use super::session::*;
use super::signals::*;
use super::*;

/// The thread making a restore's VM while the rest is set up.
pub(super) type RestoreVmThread =
    std::thread::JoinHandle<Result<crate::boot::RestoreVm, crate::boot::BootError>>;

/// What the phases of one run share: its options and identity, the VM's control, the agent
/// and its gate, init's signals on the control console, and what a snapshot or bake needs.
pub(super) struct Shared<'a> {
    pub(super) opts: &'a RunOptions,
    pub(super) id: &'a str,
    pub(super) dir: &'a crate::vms::VmDir,
    pub(super) started: std::time::Instant,
    pub(super) booting: std::time::Instant,
    pub(super) vm_control: crate::VmControl,
    pub(super) agent: crate::agent::Agent,
    pub(super) agent_gate: crate::ports::AgentGate,
    pub(super) ready: ReadySignal,
    pub(super) catch_up: CatchUp,
    pub(super) control_input: ControlInput,
    pub(super) live: LiveVm,
    pub(super) baked: BakeResult,
    pub(super) log_seen: Arc<std::sync::atomic::AtomicBool>,
    pub(super) come_up_limit: std::time::Duration,
    pub(super) exposed: Vec<String>,
}

/// The restore phase: the VM of a bake continues, init catches up with the host (clock,
/// entropy, env, host name) before the agent's socket gets its public name, and a
/// before-start bake's workload is started.
pub(super) fn restore_guest(
    shared: &Shared,
    serial: Box<dyn Write + Send>,
    consoles: Vec<ConsoleSpec>,
    snapshot_dir: std::path::PathBuf,
    loaded: Box<crate::snapshot::LoadedSnapshot>,
    workload: BakedWorkload,
    restore_vm: Option<RestoreVmThread>,
) -> Result<crate::boot::BootOutcome, RunError> {
    let Shared {
        opts,
        id,
        dir,
        started,
        vm_control,
        agent_gate,
        ready,
        catch_up,
        control_input: restore_control,
        live,
        ..
    } = shared;
    let (started, restore_control) = (*started, restore_control.clone());

    // Init came up before the snapshot.
    let _ = ready.clone().write_all(guest_init::GUEST_READY.as_bytes());
    // The agent's socket gets its public name only after the guest caught up (clock,
    // entropy, env), so nothing reaches a clone that still has the snapshot's.
    let public = dir.vsock();
    let restoring = public.with_extension("restoring");
    let _ = std::fs::remove_file(&restoring);
    let env = env_entries(&opts.config.env);
    let hostname = opts.hostname().unwrap_or_else(|| id.to_string());
    let private = restoring.clone();
    let vm = vm_control.clone();
    let live = live.clone();
    let gate = agent_gate.clone();
    let (control, catch_up) = (restore_control, catch_up.clone());
    let before_start = workload.before_start;
    let idle = opts.idle();
    let start_env = env.clone();
    let on_started: Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send> =
        Box::new(move |snapshotter| {
            *live.lock().unwrap_or_else(|e| e.into_inner()) = Some((snapshotter, workload));
            let started_live = live.clone();
            // Init reads it as soon as the vCPUs run: no connection to set up first.
            let mut entropy = vec![0u8; 64];
            let message = crate::agent::getrandom(&mut entropy).map(|()| {
                ControlMessage::Restored(agent_protocol::RestoredInfo {
                    unix_time_ns: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                    entropy,
                    env,
                    hostname: Some(hostname),
                })
                .encode()
            });
            let sent = match (
                &message,
                control.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
            ) {
                (Ok(line), Some(c)) => c.push(line.as_bytes()) == line.len(),
                _ => false,
            };
            crate::timings::mark("vcpus_running");
            if std::env::var_os("SUPERMACHINE_TIMINGS").is_some() {
                // For `cargo xtask bench restore`: `run` called → vCPUs about to run.
                eprintln!(
                    "timings: restore_call={:.2}",
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            std::thread::spawn(move || {
                let caught_up = if sent {
                    catch_up.wait(std::time::Duration::from_secs(30))
                } else {
                    Err("cannot send it the host's clock and entropy".into())
                };
                if let Err(e) = caught_up {
                    // A clone with the snapshot's clock and entropy must not serve.
                    eprintln!("supermachine: the restored guest did not catch up: {e}");
                    vm.request_exit(VmExit::Stopped);
                    return;
                }
                if let Err(e) = std::fs::rename(&private, &public) {
                    eprintln!("supermachine: {}: {e}", public.display());
                    vm.request_exit(VmExit::Stopped);
                    return;
                }
                if before_start && !idle {
                    let start = ControlMessage::Start(start_env).encode();
                    let sent = control
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|c| c.push(start.as_bytes()) == start.len());
                    if sent != Some(true) {
                        eprintln!("supermachine: cannot start the held workload");
                        vm.request_exit(VmExit::Stopped);
                        return;
                    }
                    // A snapshot of this VM from now on has its workload running.
                    if let Some((_, w)) = started_live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                    {
                        w.before_start = false;
                        w.ready = "snapshot of a running VM".into();
                    }
                }
                gate.open();
                crate::timings::mark("caught_up");
            });
        });
    let vm = match restore_vm.map(|t| t.join()) {
        Some(Ok(made)) => made?,
        // The thread could not start or panicked: make it here.
        _ => crate::boot::create_restore_vm(&loaded.memory, loaded.state.vcpus.len() as u8)?,
    };
    Ok(crate::boot::restore_prepared(
        crate::boot::RestoreOptions {
            dir: snapshot_dir,
            kernel: None,
            initramfs: None,
            console: serial,
            console_input: None,
            control: Some(vm_control.clone()),
            consoles,
            vsock: Some(restoring),
            net: opts.config.network.backend()?.map(crate::network::net_spec),
            on_started: Some(on_started),
            // A bake's only disk is its image's root filesystem, from the store.
            disks: crate::boot::RestoreDisks {
                given: Vec::new(),
                read_only_dirs: vec![images::store()?.root().join("rootfs")],
            },
        },
        *loaded,
        vm,
    )?)
}

/// The boot phase: the image's root filesystem and volumes as disks and shares, guest-init's
/// container configuration, and for a bake the thread that waits until the workload is ready
/// and snapshots it.
#[allow(clippy::too_many_arguments)]
pub(super) fn boot_guest(
    shared: &Shared,
    serial: Box<dyn Write + Send>,
    consoles: Vec<ConsoleSpec>,
    store: images::Store,
    record: Box<crate::images::ImageRecord>,
    argv: Vec<String>,
    workdir: Option<String>,
    key: String,
) -> Result<crate::boot::BootOutcome, RunError> {
    let Shared {
        opts,
        id,
        dir,
        booting,
        vm_control,
        agent,
        ready: ready_watch,
        catch_up,
        live,
        baked,
        log_seen,
        come_up_limit,
        exposed,
        ..
    } = shared;
    let (booting, come_up_limit, vm_control) = (*booting, *come_up_limit, vm_control.clone());

    let mut env = record.run_config.env.clone();
    env.extend(env_entries(&opts.config.env));
    let mut disks = vec![DiskSpec {
        path: store.rootfs_path(&record.rootfs),
        read_only: true,
    }];
    let mut volume_mounts = Vec::new();
    let mut shares = Vec::new();
    for v in &opts.config.volumes {
        match crate::volumes::prepare(v, opts.config.volume_size).map_err(RunError::Volume)? {
            crate::volumes::Prepared::Disk(path) => {
                if v.special_files {
                    return Err(RunError::Volume(crate::volumes::VolumeError::Invalid(
                        v.target.clone(),
                        "the `special` option is for shared directories, not block volumes",
                    )));
                }
                // /dev/vda is the image; volumes follow in order.
                volume_mounts.push(guest_init::MountSpec {
                    device: format!("/dev/vd{}", (b'a' + disks.len() as u8) as char),
                    target: v.target.clone(),
                    fstype: "ext4".into(),
                    read_only: v.read_only,
                });
                disks.push(DiskSpec {
                    path,
                    read_only: v.read_only,
                });
            }
            crate::volumes::Prepared::Directory(dir) => {
                let share = crate::boot::ShareSpec {
                    tag: format!("share{}", shares.len()),
                    dir,
                    read_only: v.read_only,
                    special_files: v.special_files,
                };
                volume_mounts.push(guest_init::MountSpec {
                    device: share.tag.clone(),
                    target: v.target.clone(),
                    fstype: "virtiofs".into(),
                    read_only: v.read_only,
                });
                shares.push(share);
            }
        }
    }
    let hold = opts.idle()
        || matches!(
            opts.bake.as_ref().map(|b| &b.ready),
            Some(ReadyCheck::BeforeStart)
        );
    let container = ContainerConfig {
        rootfs_device: "/dev/vda".into(),
        rootfs_type: "squashfs".into(),
        user: opts
            .config
            .user
            .clone()
            .unwrap_or_else(|| record.run_config.user.clone()),
        hostname: opts.hostname().unwrap_or_else(|| id.to_string()),
        tty: opts.tty,
        interactive: opts.interactive,
        tty_size: if opts.tty { host_terminal_size() } else { None },
        stdout_device: "/dev/hvc0".into(),
        stderr_device: "/dev/hvc1".into(),
        control_device: "/dev/hvc2".into(),
        mounts: volume_mounts,
        hold_before_start: hold,
        network: opts.config.network.guest_config(),
    };
    let workload = BakedWorkload {
        image: opts.image.clone(),
        manifest: record.manifest.to_string(),
        key: key.clone(),
        argv: argv.clone(),
        stop_signal: record.run_config.stop_signal.clone(),
        exposed_ports: record.run_config.exposed_ports.clone(),
        tty: opts.tty,
        interactive: opts.interactive,
        memory_mib: opts.config.memory_mib,
        vcpus: opts.config.vcpus,
        ready: opts
            .bake
            .as_ref()
            .map(|b| b.ready.to_string())
            .unwrap_or_else(|| "snapshot of a running VM".into()),
        before_start: hold,
        baked_at: now_seconds(),
        bake_ms: 0,
        network: opts.config.network.has_device(),
        healthcheck: record.run_config.healthcheck.clone(),
    };
    let bake = opts.bake.as_ref().map(|bake| {
        let target = bake
            .dir
            .clone()
            .unwrap_or_else(|| bake_cache_dir(&store).join(&key));
        let (check, limit) = (
            bake.ready.clone(),
            bake.ready_limit.unwrap_or(BAKE_READY_LIMIT),
        );
        let (agent, vm, log_seen, baked) = (
            agent.clone(),
            vm_control.clone(),
            log_seen.clone(),
            baked.clone(),
        );
        let (ready, exposed, workload, held) = (
            ready_watch.clone(),
            exposed.clone(),
            workload.clone(),
            catch_up.clone(),
        );
        move |snapshotter: crate::snapshot::Snapshotter| {
            std::thread::spawn(move || {
                if !ready.wait_timeout(come_up_limit) {
                    return;
                }
                let result =
                    wait_until_ready(&check, &exposed, &agent, &log_seen, &held, &vm, limit)
                        .and_then(|()| {
                            let mut workload = workload;
                            workload.bake_ms = booting.elapsed().as_millis() as u64;
                            workload.baked_at = now_seconds();
                            snapshotter
                                .take(
                                    &target,
                                    Some(workload.to_payload()),
                                    crate::snapshot::AfterSnapshot::Stop,
                                )
                                .map_err(|e| e.to_string())
                        });
                if result.is_err() {
                    vm.request_exit(VmExit::Stopped);
                }
                *baked.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            });
        }
    });
    let live = live.clone();
    let on_started: Option<Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send>> = Some(Box::new(
        move |snapshotter: crate::snapshot::Snapshotter| {
            *live.lock().unwrap_or_else(|e| e.into_inner()) = Some((snapshotter.clone(), workload));
            if let Some(bake) = bake {
                bake(snapshotter);
            }
        },
    ));
    Ok(boot(BootOptions {
        kernel: paths::default_kernel(),
        initramfs: Some(paths::default_initramfs()),
        extra_cmdline: if opts.config.debug {
            String::new()
        } else {
            "quiet".into()
        },
        memory_mib: opts.config.memory_mib,
        vcpus: opts.config.vcpus,
        command: argv,
        env,
        quiet: !opts.config.debug,
        console: serial,
        console_input: None,
        workdir,
        disks,
        container: Some(container),
        consoles,
        control: Some(vm_control),
        vsock: Some(dir.vsock()),
        net: opts.config.network.backend()?,
        shares,
        snapshot: None,
        on_started,
    })?)
}
