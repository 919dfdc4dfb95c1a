//! Can this machine's KVM boot a Linux guest? Boots the guest kernel with `/bin/true` once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// True if `supermachine` boots our kernel to init and back with status 0 within `limit`.
pub fn local_kvm_boots_linux(supermachine: &Path, limit: Duration) -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("probe: no /dev/kvm here");
        return false;
    }
    let child = Command::new(supermachine)
        .args(["boot", "--quiet", "--memory", "128", "--", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else { return false };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    eprintln!("probe: local KVM cannot boot Linux: {}", err.trim());
                }
                return status.success();
            }
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("probe: local KVM did not boot Linux within {limit:?}");
                return false;
            }
        }
    }
}
