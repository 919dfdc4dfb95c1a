//! Health checks (`--health-cmd`, as Docker's `HEALTHCHECK`): a command run in the guest every
//! interval through the agent; its state is kept in the VM's directory for `ps` and `inspect`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a VM's health is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What runs in the guest (`/bin/sh -c CMD` for a shell command); healthy when it exits 0.
    pub argv: Vec<String>,
    /// Between two checks (Docker's default: 30 s).
    pub interval: Duration,
    /// A check that takes longer fails (default 30 s).
    pub timeout: Duration,
    /// Failures in a row that make the VM unhealthy (default 3).
    pub retries: u32,
    /// Failures in this time after the start do not count (default 0).
    pub start_period: Duration,
}

impl HealthCheck {
    /// The shell command `command` (`/bin/sh -c`), with Docker's defaults.
    pub fn shell(command: &str) -> HealthCheck {
        HealthCheck {
            argv: vec!["/bin/sh".into(), "-c".into(), command.into()],
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            retries: 3,
            start_period: Duration::ZERO,
        }
    }

    /// An image's `HEALTHCHECK` (`CMD`, `CMD-SHELL`; `NONE` and anything else: no check), with
    /// Docker's defaults where it gives 0.
    pub fn from_image(image: &oci_bake::config::ImageHealthcheck) -> Option<HealthCheck> {
        let (kind, rest) = image.test.split_first()?;
        let mut check = match (kind.as_str(), rest) {
            ("CMD", argv) if !argv.is_empty() => HealthCheck {
                argv: argv.to_vec(),
                ..HealthCheck::shell("")
            },
            ("CMD-SHELL", [command]) => HealthCheck::shell(command),
            _ => return None,
        };
        let ns = |n: u64, default: Duration| {
            if n == 0 {
                default
            } else {
                Duration::from_nanos(n)
            }
        };
        check.interval = ns(image.interval_ns, check.interval);
        check.timeout = ns(image.timeout_ns, check.timeout);
        check.start_period = ns(image.start_period_ns, check.start_period);
        if image.retries > 0 {
            check.retries = image.retries;
        }
        Some(check)
    }
}

/// Starting (no verdict yet), healthy or unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// No check has passed, and not enough have failed.
    Starting,
    /// The last check passed.
    Healthy,
    /// `retries` checks in a row failed.
    Unhealthy,
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthStatus::Starting => "starting",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        })
    }
}

/// What the checks have found so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Failed checks in a row.
    pub failing_streak: u32,
    /// The last check's exit status (`None`: it timed out or could not run).
    pub last_exit_code: Option<i32>,
    /// The start of its output (stdout then stderr, at most 4 KiB), or why it could not run.
    pub last_output: String,
}

/// The most of a check's output kept.
const OUTPUT_KEPT: usize = 4096;

fn file(vm_dir: &Path) -> PathBuf {
    vm_dir.join("health.json")
}

/// The VM's health as last recorded (`None`: it has no health check).
pub(crate) fn read(vm_dir: &Path) -> Option<Health> {
    serde_json::from_slice(&std::fs::read(file(vm_dir)).ok()?).ok()
}

fn write(vm_dir: &Path, health: &Health) {
    let tmp = vm_dir.join("health.json.tmp");
    let Ok(bytes) = serde_json::to_vec(health) else {
        return;
    };
    // Readers see the old state or the new one, never half of one.
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, file(vm_dir));
    }
}

/// The state after a check that passed or not, given the state before.
pub(crate) fn next(before: &Health, passed: bool, counts: bool, retries: u32) -> Health {
    let mut h = before.clone();
    if passed {
        h.status = HealthStatus::Healthy;
        h.failing_streak = 0;
    } else if counts {
        h.failing_streak += 1;
        if h.failing_streak >= retries.max(1) {
            h.status = HealthStatus::Unhealthy;
        }
    }
    h
}

/// Runs `check` in the VM behind `agent` every interval until `control` says it has ended,
/// recording the state in `vm_dir` (paused VMs are not checked).
pub(crate) fn watch(
    check: HealthCheck,
    agent: crate::agent::Agent,
    control: crate::VmControl,
    vm_dir: PathBuf,
) {
    let started = Instant::now();
    let mut health = Health {
        status: HealthStatus::Starting,
        failing_streak: 0,
        last_exit_code: None,
        last_output: String::new(),
    };
    write(&vm_dir, &health);
    let _ = std::thread::Builder::new()
        .name("health".into())
        .spawn(move || loop {
            let next_check = Instant::now() + check.interval;
            while Instant::now() < next_check {
                if control.is_stopping() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if control.is_paused() {
                continue;
            }
            let result = crate::exec::ExecBuilder::new(&agent)
                .argv(check.argv.iter().map(String::as_str))
                .stdin_null()
                .timeout(check.timeout)
                .output();
            if control.is_stopping() {
                return;
            }
            let (passed, code, mut text) = match result {
                Ok(out) => {
                    let passed = out.success();
                    let mut text = out.stdout;
                    text.extend_from_slice(&out.stderr);
                    (passed, Some(out.status.code), text)
                }
                Err(e) => (false, None, e.to_string().into_bytes()),
            };
            let counts = started.elapsed() >= check.start_period;
            health = next(&health, passed, counts, check.retries);
            health.last_exit_code = code;
            text.truncate(OUTPUT_KEPT);
            health.last_output = String::from_utf8_lossy(&text).into_owned();
            write(&vm_dir, &health);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_make_it_unhealthy_and_one_success_heals() {
        let start = Health {
            status: HealthStatus::Starting,
            failing_streak: 0,
            last_exit_code: None,
            last_output: String::new(),
        };
        let a = next(&start, false, true, 2);
        assert_eq!((a.status, a.failing_streak), (HealthStatus::Starting, 1));
        let b = next(&a, false, true, 2);
        assert_eq!((b.status, b.failing_streak), (HealthStatus::Unhealthy, 2));
        let c = next(&b, true, true, 2);
        assert_eq!((c.status, c.failing_streak), (HealthStatus::Healthy, 0));
        // In the start period failures do not count.
        let d = next(&start, false, false, 1);
        assert_eq!((d.status, d.failing_streak), (HealthStatus::Starting, 0));
    }

    #[test]
    fn an_image_healthcheck_becomes_a_check_with_dockers_defaults() {
        use oci_bake::config::ImageHealthcheck;
        let parse = |v: serde_json::Value| ImageHealthcheck::parse(&v);
        let shell = parse(serde_json::json!({
            "Test": ["CMD-SHELL", "curl -f localhost || exit 1"],
            "Interval": 5_000_000_000u64,
            "Retries": 5
        }))
        .unwrap();
        let c = HealthCheck::from_image(&shell).unwrap();
        assert_eq!(c.argv, ["/bin/sh", "-c", "curl -f localhost || exit 1"]);
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.retries, 5);
        let exec = parse(serde_json::json!({"Test": ["CMD", "/bin/check", "--quick"]})).unwrap();
        assert_eq!(
            HealthCheck::from_image(&exec).unwrap().argv,
            ["/bin/check", "--quick"]
        );
        for none in [
            serde_json::json!({"Test": ["NONE"]}),
            serde_json::json!({"Test": ["CMD"]}),
            serde_json::json!({"Test": []}),
            serde_json::json!({"Test": ["CMD-SHELL", "a", "b"]}),
        ] {
            let h = parse(none.clone()).unwrap();
            assert_eq!(HealthCheck::from_image(&h), None, "{none}");
        }
        // Malformed: ignored, not an error.
        assert_eq!(parse(serde_json::json!({"Test": "CMD-SHELL true"})), None);
        assert_eq!(parse(serde_json::json!({"Test": [1, 2]})), None);
        assert_eq!(parse(serde_json::json!(7)), None);
    }

    #[test]
    fn the_state_file_is_read_back() {
        let dir = std::env::temp_dir().join(format!("sm-health-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir), None);
        let h = Health {
            status: HealthStatus::Unhealthy,
            failing_streak: 3,
            last_exit_code: Some(1),
            last_output: "down".into(),
        };
        write(&dir, &h);
        assert_eq!(read(&dir), Some(h));
        std::fs::write(file(&dir), b"{garbage").unwrap();
        assert_eq!(read(&dir), None);
        std::fs::remove_dir_all(&dir).ok();
    }
}
