//! Machine-readable views: `inspect`, and `--format json` of `ps` and `images`. Keys follow
//! Docker's where the meaning is the same, so scripts written for it read ours.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use supermachine::{Error, Image, ImageInfo, VmHandle, VmInfo, VmStatus};

/// How a listing is printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people
    #[default]
    Table,
    /// One JSON object per line (as `docker ps --format json`)
    Json,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// VMs (names or ids) or images (references); a VM's name wins over an image's
    #[arg(required = true, value_name = "VM|IMAGE")]
    names: Vec<String>,
}

/// `time` as RFC 3339 in UTC, to the second (`2026-12-08T02:15:00Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn state(status: VmStatus) -> &'static str {
    match status {
        VmStatus::Running => "running",
        VmStatus::Paused => "paused",
        VmStatus::Exited(_) => "exited",
        VmStatus::Dead => "dead",
    }
}

/// A VM as `ps --format json` prints it.
pub fn vm_summary(vm: &VmInfo) -> Value {
    json!({
        "ID": vm.id,
        "Name": vm.name,
        "Image": vm.image,
        "State": state(vm.status),
        "Status": vm.status.to_string(),
        "Health": vm.health.map(|h| h.to_string()),
        "RestartCount": vm.restarts,
        "Ports": vm.ports,
        "CreatedAt": rfc3339(vm.created),
    })
}

/// A VM as `inspect` prints it, with its health check's state if it has one.
fn vm_details(vm: &VmInfo, health: Option<supermachine::Health>) -> Value {
    let exit_code = match vm.status {
        VmStatus::Exited(code) => Some(code),
        _ => None,
    };
    json!({
        "ID": vm.id,
        "Name": vm.name,
        "Image": vm.image,
        "Created": rfc3339(vm.created),
        "State": {
            "Status": state(vm.status),
            "Running": vm.status.is_alive(),
            "Paused": vm.status == VmStatus::Paused,
            "Pid": vm.pid,
            "ExitCode": exit_code,
            "Health": health.map(|h| json!({
                "Status": h.status.to_string(),
                "FailingStreak": h.failing_streak,
                "LastExitCode": h.last_exit_code,
                "LastOutput": h.last_output,
            })),
        },
        "Ports": vm.ports,
        "Detached": vm.detached,
        "RestartCount": vm.restarts,
        "AutoRemove": vm.auto_remove,
    })
}

/// An image as `images --format json` prints it.
pub fn image_summary(image: &ImageInfo) -> Value {
    json!({
        "Repository": image.name,
        "Digest": image.digest,
        "Size": image.size,
        "CreatedAt": rfc3339(image.pulled),
    })
}

/// An image as `inspect` prints it.
fn image_details(image: &ImageInfo) -> Value {
    let c = &image.run_config;
    json!({
        "Name": image.name,
        "Digest": image.digest,
        "ConfigDigest": image.config_digest,
        "Size": image.size,
        "Pulled": rfc3339(image.pulled),
        "RootFS": { "Layers": image.layers, "Image": image.rootfs },
        "Config": {
            "Entrypoint": c.entrypoint,
            "Cmd": c.cmd,
            "Env": c.env,
            "WorkingDir": c.working_dir,
            "User": c.user,
            "ExposedPorts": c.exposed_ports,
            "StopSignal": c.stop_signal,
        },
    })
}

/// `inspect VM|IMAGE…`: a JSON array of what each name is; a name that is neither is an error
/// (status 1) after the others are printed, as Docker does.
pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let mut found = Vec::new();
    let mut failed = false;
    for name in &args.names {
        // A registry that cannot be read (e.g. an unsafe runtime directory) does not hide
        // images; it is said if the name is not an image either.
        let vm_error = match VmHandle::find(name) {
            Ok(vm) => {
                found.push(vm_details(&vm.info(), vm.health()));
                continue;
            }
            Err(Error::VmNotFound(_)) => None,
            Err(e) => Some(e),
        };
        match (Image::inspect(name), vm_error) {
            (Ok(image), _) => found.push(image_details(&image)),
            (Err(Error::ImageNotFound(_)), None) => {
                eprintln!("supermachine: no such VM or image: {name}");
                failed = true;
            }
            (Err(Error::ImageNotFound(_)), Some(e)) | (Err(e), _) => {
                eprintln!("supermachine: {name}: {e}");
                failed = true;
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&Value::Array(found))?);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_696_100), "2026-12-08T02:15:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
