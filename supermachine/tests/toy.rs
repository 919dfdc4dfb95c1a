//! The toy guest on this machine's KVM: the VMM really enters the guest, handles its port
//! I/O and ends the VM when it reports its status. Needs /dev/kvm; fails loudly without it.

#[path = "support/toy_guest.rs"]
mod toy_guest;

use std::io::Write;
use std::sync::{Arc, Mutex};

use supermachine::{boot, BootOptions, VmExit};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn boot_toy(vcpus: u8) -> (VmExit, String) {
    let dir = std::env::temp_dir().join(format!("sm-toy-{}-{vcpus}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("toy.elf");
    toy_guest::write_to(&kernel).unwrap();
    let out = Capture::default();
    let outcome = boot(BootOptions {
        kernel,
        initramfs: None,
        extra_cmdline: String::new(),
        memory_mib: 32,
        vcpus,
        command: vec![],
        env: vec![],
        quiet: true,
        console: Box::new(out.clone()),
        console_input: None,
        workdir: None,
        disks: vec![],
        container: None,
        consoles: vec![],
        control: None,
        vsock: None,
    })
    .expect("booting the toy guest needs a usable /dev/kvm");
    std::fs::remove_dir_all(&dir).ok();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    (outcome.exit, text)
}

#[test]
fn toy_guest_prints_marker_and_reports_status() {
    let (exit, out) = boot_toy(1);
    assert_eq!(out, toy_guest::MARKER);
    assert_eq!(exit, VmExit::PowerOff(Some(0)));
}

#[test]
fn idle_application_processors_are_stopped_when_the_guest_ends() {
    // vCPUs 1..3 wait for a SIPI that never comes; the runner must kick them out.
    let (exit, out) = boot_toy(4);
    assert_eq!(out, toy_guest::MARKER);
    assert_eq!(exit, VmExit::PowerOff(Some(0)));
}
