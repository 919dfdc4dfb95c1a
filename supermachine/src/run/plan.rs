//! Phase 1: what a `run` starts from, a restore of a usable bake or a boot of the image.

use crate::images::{self, ImageRecord};
use crate::paths;

use super::bakes::*;
use super::*;

/// What `run` starts: a snapshot, or a boot of the image.
pub(super) enum Start {
    Restore {
        dir: std::path::PathBuf,
        loaded: Box<crate::snapshot::LoadedSnapshot>,
        workload: BakedWorkload,
    },
    Boot {
        store: images::Store,
        record: Box<ImageRecord>,
        argv: Vec<String>,
        workdir: Option<String>,
        key: String,
    },
}

/// Restore or boot: `--snapshot`, else (not baking, no `--no-restore`) a bake of this image and
/// configuration in the cache, else a boot.
pub(super) fn plan(opts: &RunOptions) -> Result<Start, RunError> {
    let load = |dir: &std::path::Path| {
        crate::snapshot::load(
            dir,
            Some(&paths::default_kernel()),
            Some(&paths::default_initramfs()),
        )
        .map_err(|e| RunError::Boot(e.into()))
    };
    if let Some(dir) = &opts.snapshot {
        let loaded = load(dir)?;
        let workload = check_restorable(dir, &loaded, opts)?;
        return Ok(Start::Restore {
            dir: dir.clone(),
            loaded: Box::new(loaded),
            workload,
        });
    }
    let (store, record) = resolve_image(opts, true)?;
    crate::timings::mark("image_resolved");
    let argv = command_line(&record.run_config, opts);
    if argv.is_empty() {
        return Err(RunError::NoCommand);
    }
    let workdir = opts
        .config
        .workdir
        .clone()
        .or_else(|| Some(record.run_config.working_dir.clone()).filter(|w| !w.is_empty()));
    let key = bake_key(&record, opts, &argv, &workdir);
    crate::timings::mark("bake_key");
    let baked = bake_cache_dir(&store).join(&key);
    if opts.bake.is_none()
        && !opts.config.boot_always
        && opts.config.volumes.is_empty()
        && baked.join(snapshot::STATE_FILE).exists()
    {
        match load(&baked) {
            // An idle VM from a bake whose workload already runs would not be idle: boot.
            Ok(loaded)
                if opts.idle()
                    && !BakedWorkload::of(&loaded.state).is_some_and(|w| w.before_start) => {}
            Ok(loaded) => {
                let workload = check_restorable(&baked, &loaded, opts)?;
                return Ok(Start::Restore {
                    dir: baked,
                    loaded: Box::new(loaded),
                    workload,
                });
            }
            // A bake made with another kernel or build: boot, and say why.
            Err(e) => eprintln!(
                "supermachine: not restoring the bake of {}: {e}",
                opts.image
            ),
        }
    }
    Ok(Start::Boot {
        store,
        record: Box::new(record),
        argv,
        workdir,
        key,
    })
}

/// What a restore cannot change: refused with the reason.
pub(super) fn check_restorable(
    dir: &std::path::Path,
    loaded: &crate::snapshot::LoadedSnapshot,
    opts: &RunOptions,
) -> Result<BakedWorkload, RunError> {
    let bad = |why: &str| {
        Err(RunError::Restore {
            dir: dir.to_path_buf(),
            why: why.into(),
        })
    };
    let Some(w) = BakedWorkload::of(&loaded.state) else {
        return bad("it is not a bake of an image (make one with `supermachine bake`)");
    };
    if opts.idle() && !w.before_start {
        return bad("its workload is running: an idle VM needs a bake made before the workload starts (bake --before-start)");
    }
    if w.tty != opts.tty {
        return bad(if w.tty {
            "it was baked with a terminal: run it with -t"
        } else {
            "it was baked without a terminal: run it without -t"
        });
    }
    if w.interactive != opts.interactive {
        return bad(if w.interactive {
            "it was baked with stdin open: run it with -i"
        } else {
            "it was baked with stdin closed: run it without -i (or bake with -i)"
        });
    }
    if !opts.config.volumes.is_empty() {
        return bad("volumes cannot be attached to a restored VM (bake and run without -v)");
    }
    if w.network != opts.config.network.has_device() {
        return bad(if w.network {
            "it was baked with a network device: run it with --network user or tap:IFACE"
        } else {
            "it was baked without a network: run it with --network none"
        });
    }
    Ok(w)
}
