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
        net: None,
        shares: Vec::new(),
        snapshot: None,
        on_started: None,
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

fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Restores `snap` with the CLI, sends `input` on the serial console, and returns what the
/// guest echoed (the restored guest runs until killed).
fn restore_and_echo(snap: &std::path::Path, input: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(["boot", "--restore"])
        .arg(snap)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(input).unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = vec![0u8; input.len()];
    let read = out.read_exact(&mut got);
    child.kill().ok();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    read.unwrap_or_else(|e| panic!("no echo ({e}); {status}: {err}"));
    got
}

#[test]
fn a_running_guest_is_snapshotted_and_every_restore_continues_it() {
    let dir = std::env::temp_dir().join(format!("sm-toy-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("echo.elf");
    std::fs::write(&kernel, toy_guest::echo_elf()).unwrap();
    let snap = dir.join("snap");
    let kernel_arg = kernel.to_str().unwrap();
    let out = run_cli(&[
        "boot",
        "--no-initramfs",
        "--memory",
        "64",
        "--kernel",
        kernel_arg,
        "--snapshot-to",
        snap.to_str().unwrap(),
        "--snapshot-when",
        toy_guest::ECHO_READY,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), toy_guest::ECHO_READY);
    // Sparse: 64 MiB of guest memory, a few pages used.
    use std::os::unix::fs::MetadataExt;
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), 64 << 20);
    assert!(
        memory.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        memory.blocks() * 512
    );

    // Restored twice in a row and twice at once: each continues the same guest.
    for _ in 0..2 {
        assert_eq!(restore_and_echo(&snap, b"hello\n"), b"hello\n");
    }
    let a = std::thread::spawn({
        let snap = snap.clone();
        move || restore_and_echo(&snap, b"first")
    });
    let b = restore_and_echo(&snap, b"second");
    assert_eq!(a.join().unwrap(), b"first");
    assert_eq!(b, b"second");

    // A damaged or foreign snapshot is refused with the reason, never run.
    let restore_err = |snap: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["boot", "--restore", snap.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run_cli(&args);
        assert_eq!(out.status.code(), Some(125));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(snap.join(f), d.join(f)).unwrap();
        }
        d
    };
    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let at = state.len() / 2;
    state[at] ^= 1;
    std::fs::write(flipped.join("state"), state).unwrap();
    let e = restore_err(&flipped, &[]);
    assert!(e.contains("damaged") && e.contains("checksum"), "{e}");

    let truncated = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = restore_err(&truncated, &[]);
    assert!(e.contains("truncated"), "{e}");

    // Another kernel build (same path, new contents).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut other = toy_guest::echo_elf();
    other.push(0);
    std::fs::write(&kernel, other).unwrap();
    let e = restore_err(&snap, &["--kernel", kernel_arg]);
    assert!(e.contains("another build of the guest kernel"), "{e}");

    std::fs::remove_dir_all(&dir).ok();
}

/// A user's pause stops the guest (input waits, nothing is echoed), refuses snapshots, and
/// unpause lets it go on with the input that came meanwhile; a paused VM can still be stopped.
#[test]
fn a_paused_guest_does_not_run_until_unpaused() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("sm-toy-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("echo.elf");
    std::fs::write(&kernel, toy_guest::echo_elf()).unwrap();
    let (mut to_guest, guest_in) = UnixStream::pair().unwrap();
    let (console_out, mut from_guest) = UnixStream::pair().unwrap();
    let control = supermachine::VmControl::new();
    let vm = {
        let control = control.clone();
        std::thread::spawn(move || {
            boot(BootOptions {
                kernel,
                initramfs: None,
                extra_cmdline: String::new(),
                memory_mib: 32,
                vcpus: 1,
                command: vec![],
                env: vec![],
                quiet: true,
                console: Box::new(console_out),
                console_input: Some(Box::new(guest_in)),
                workdir: None,
                disks: vec![],
                container: None,
                consoles: vec![],
                control: Some(control),
                vsock: None,
                net: None,
                shares: Vec::new(),
                snapshot: None,
                on_started: None,
            })
            .expect("booting the toy guest needs a usable /dev/kvm")
        })
    };
    let read_n = |from: &mut UnixStream, n: usize| {
        let mut got = vec![0u8; n];
        from.read_exact(&mut got).map(|_| got)
    };
    assert_eq!(
        read_n(&mut from_guest, toy_guest::ECHO_READY.len()).unwrap(),
        toy_guest::ECHO_READY.as_bytes()
    );
    to_guest.write_all(b"a").unwrap();
    assert_eq!(read_n(&mut from_guest, 1).unwrap(), b"a");

    control.pause().unwrap();
    assert!(control.is_paused());
    control.pause().unwrap(); // already paused: nothing to do
    assert!(matches!(
        control.pause_and_capture(),
        Err(supermachine::CaptureError::Paused)
    ));
    // A paused VM is captured as it stands (what a snapshot does once its devices are quiet).
    let held = control.capture_paused().unwrap();
    assert_eq!(held.vcpus.len(), 1);
    drop(held);
    assert!(control.is_paused());
    // `resume` ends a snapshot's pause, not a user's.
    control.resume();
    assert!(control.is_paused());
    to_guest.write_all(b"b").unwrap();
    from_guest
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut one = [0u8; 1];
    match from_guest.read(&mut one) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a paused guest answered: {other:?} {one:?}"),
    }
    from_guest.set_read_timeout(None).unwrap();

    assert!(control.unpause());
    assert!(!control.unpause());
    assert!(matches!(
        control.capture_paused(),
        Err(supermachine::CaptureError::NotPaused)
    ));
    assert_eq!(read_n(&mut from_guest, 1).unwrap(), b"b");
    // Snapshots work again once unpaused, and the guest goes on after one.
    let captured = control.pause_and_capture().map(drop);
    control.resume();
    assert!(captured.is_ok());
    to_guest.write_all(b"c").unwrap();
    assert_eq!(read_n(&mut from_guest, 1).unwrap(), b"c");

    // Stopping a paused VM ends it.
    control.pause().unwrap();
    control.request_exit(VmExit::Stopped);
    let outcome = vm.join().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    std::fs::remove_dir_all(&dir).ok();
}
