//! The sandbox boundary on a shared host, tried as another local user would: the VM registry
//! that every command trusts must be this user's alone. Runs on any host (no KVM); the
//! second-user cases need root to act as `nobody` (`setpriv`) and fail with that reason
//! without it.

use std::path::{Path, PathBuf};
use std::process::Command;

const NOBODY: u32 = 65534;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sm-boundary-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `supermachine ARGS` with `runtime` as its registry: (status, stderr).
fn sm(runtime: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(args)
        .env("SUPERMACHINE_RUNTIME_DIR", runtime)
        .env("SUPERMACHINE_HOME", runtime.with_extension("home"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test acts as a second user (nobody) with setpriv, which needs root"
    );
}

/// Runs `argv` as `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody(argv: &[&str]) -> std::process::Output {
    need_root();
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .args(argv)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn a_registry_directory_others_can_enter_is_refused_by_every_command() {
    let base = scratch("open");
    let runtime = base.join("run");
    std::fs::create_dir(&runtime).unwrap();
    set_mode(&runtime, 0o777);
    for args in [
        &["ps", "-a"][..],
        &["stop", "web"],
        &["logs", "web"],
        &["rm", "web"],
    ] {
        let (code, err) = sm(&runtime, args);
        assert_ne!(code, 0, "{args:?} used an open registry");
        assert!(
            err.contains(&runtime.display().to_string()) && err.contains("mode 0777"),
            "{args:?}: {err}"
        );
    }
    // A symbolic link in its place, as someone could leave in /tmp.
    let private = base.join("private");
    let (code, err) = sm(&private, &["ps"]);
    assert_eq!(code, 0, "{err}");
    let link = base.join("link");
    std::os::unix::fs::symlink(&private, &link).unwrap();
    let (code, err) = sm(&link, &["ps"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn a_registry_another_user_made_first_is_not_taken_over() {
    // /tmp as it is: world-writable and sticky.
    let base = scratch("takeover");
    set_mode(&base, 0o1777);
    let runtime = base.join("supermachine-0");
    // The other user gets there first, making it open to all, as the attacker did.
    let made = as_nobody(&["mkdir", "-m", "0777", runtime.to_str().unwrap()]);
    assert!(made.status.success(), "{made:?}");
    let (code, err) = sm(&runtime, &["ps"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains(&format!("belongs to uid {NOBODY}")), "{err}");
    // Even closed to everyone but its owner, it is still not ours.
    let closed = as_nobody(&["chmod", "0700", runtime.to_str().unwrap()]);
    assert!(closed.status.success(), "{closed:?}");
    let (code, err) = sm(&runtime, &["ps"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains(&format!("belongs to uid {NOBODY}")), "{err}");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn another_user_cannot_read_into_a_users_registry() {
    let base = scratch("peek");
    set_mode(&base, 0o755);
    let runtime = base.join("run");
    let (code, err) = sm(&runtime, &["ps"]);
    assert_eq!(code, 0, "{err}");
    for entry in ["", "vms", "names"] {
        let out = as_nobody(&["ls", runtime.join(entry).to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "nobody listed {}: {out:?}",
            runtime.join(entry).display()
        );
    }
    std::fs::remove_dir_all(base).unwrap();
}
