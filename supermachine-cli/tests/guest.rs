//! Integration tests that boot our Linux guest kernel and initramfs under KVM with the
//! `supermachine` binary. They need a KVM that boots Linux: `cargo xtask test` runs them in the
//! emulated KVM host when this machine's cannot. Without one they fail, with the reason.
//!
//! The kernel and initramfs come from `SUPERMACHINE_KERNEL`/`SUPERMACHINE_INITRAMFS` or the
//! cache that `cargo xtask kernel`/`initramfs` fill.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A guard against hung guests, not a performance assertion.
const HANG_LIMIT: Duration = Duration::from_secs(300);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn supermachine(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start supermachine");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        out.read_to_end(&mut s).ok();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        err.read_to_end(&mut s).ok();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > HANG_LIMIT {
            child.kill().ok();
            child.wait().ok();
            panic!("supermachine {args:?} hung for {HANG_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap()).replace('\r', "");
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    Run {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    }
}

fn guest(args: &[&str]) -> Run {
    let run = supermachine(args);
    assert!(
        !run.stderr.contains("could not emulate") && !run.stderr.contains("/dev/kvm"),
        "this machine's KVM cannot boot a Linux guest; run `cargo xtask test`, which uses the \
         emulated KVM host:\n{}",
        run.stderr
    );
    run
}

fn last_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .last()
        .unwrap_or("")
}

#[test]
fn exit_status_of_the_command_is_the_exit_status_of_supermachine() {
    for code in [0, 1, 3] {
        let script = format!("exit {code}");
        let run = guest(&["boot", "--quiet", "--", "/bin/sh", "-c", &script]);
        assert_eq!(
            run.code, code,
            "stdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
    }
}

#[test]
fn guest_sees_every_vcpu_it_was_given() {
    for cpus in [1, 2, 4] {
        let run = guest(&[
            "boot",
            "--quiet",
            "--cpus",
            &cpus.to_string(),
            "--",
            "nproc",
        ]);
        assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
        assert_eq!(
            last_line(&run.stdout),
            cpus.to_string(),
            "stdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn boot_log_init_output_and_status_reach_the_host() {
    let run = guest(&[
        "boot",
        "--cpus",
        "2",
        "--",
        "/bin/sh",
        "-c",
        "nproc; exit 3",
    ]);
    assert_eq!(run.code, 3, "stderr:\n{}", run.stderr);
    assert!(
        run.stdout.contains("Linux version 6.1"),
        "no kernel log:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("supermachine-init: running"),
        "no init output:\n{}",
        run.stdout
    );
    assert_eq!(last_line(&run.stdout), "2", "stdout:\n{}", run.stdout);
}

#[test]
fn environment_and_arguments_reach_the_command_intact() {
    let run = guest(&[
        "boot",
        "--quiet",
        "-e",
        "GREETING=hello world",
        "--",
        "/bin/sh",
        "-c",
        "printf '%s|%s\\n' \"$GREETING\" \"$1\"",
        "sh",
        "it's \"quoted\"; $HOME",
    ]);
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    assert_eq!(last_line(&run.stdout), "hello world|it's \"quoted\"; $HOME");
}

#[test]
fn missing_command_is_127_and_a_killed_one_is_128_plus_signal() {
    let run = guest(&["boot", "--quiet", "--", "/no/such/command"]);
    assert_eq!(run.code, 127, "stdout:\n{}", run.stdout);
    let run = guest(&["boot", "--quiet", "--", "/bin/sh", "-c", "kill -9 $$"]);
    assert_eq!(run.code, 137, "stdout:\n{}", run.stdout);
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let run = supermachine(&["boot", "--kernel", "/nonexistent/vmlinux", "--", "true"]);
    assert_eq!(run.code, 125);
    assert!(
        run.stderr.contains("/nonexistent/vmlinux"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("not found"), "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
}

#[test]
fn non_kernel_file_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("not-a-kernel-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let run = supermachine(&["boot", "--kernel", path.to_str().unwrap(), "--", "true"]);
    std::fs::remove_file(&path).ok();
    assert_eq!(run.code, 125);
    assert!(
        run.stderr.contains("is not a kernel image"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

/// A scratch directory the emulated test host also sees (it shares this machine's files).
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn disks_read_only_ext4_and_a_writable_disk_that_keeps_every_byte() {
    const WRITE_BYTES: usize = 64 << 20;
    let dir = scratch("disks");
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(
        content.join("hello.txt"),
        "hello from a read-only ext4 disk\n",
    )
    .unwrap();
    let ro = dir.join("ro.img");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&content)
        .arg(&ro)
        .arg("16M")
        .stdout(Stdio::null())
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
    assert!(mkfs.success());
    let ro_before = sha256_hex(&std::fs::read(&ro).unwrap());
    let rw = dir.join("rw.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();

    let script = format!(
        "mount -o ro /dev/vda /mnt && cat /mnt/hello.txt
         head -c {WRITE_BYTES} /dev/urandom > /tmp/data && sha256sum /tmp/data
         dd if=/tmp/data of=/dev/vdb bs=1M conv=fsync 2>/dev/null && echo written
         if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/tmp/err; then
           echo read-only-write-succeeded
         else
           echo read-only-write-failed: $(cat /tmp/err | head -1)
         fi
         cat /sys/block/vda/ro /sys/block/vdb/ro
         echo still-running"
    );
    let run = guest(&[
        "boot",
        "--quiet",
        "--disk",
        &format!("{}:ro", ro.display()),
        "--disk",
        rw.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert_eq!(
        run.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    let out = &run.stdout;
    assert!(out.contains("hello from a read-only ext4 disk"), "{out}");
    assert!(out.contains("written"), "{out}");
    assert!(out.contains("read-only-write-failed"), "{out}");
    assert!(!out.contains("read-only-write-succeeded"), "{out}");
    assert!(out.contains("1\n0\nstill-running"), "{out}");

    let guest_hash = out
        .lines()
        .find(|l| l.ends_with("/tmp/data"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no checksum in:\n{out}"))
        .to_string();
    let disk = std::fs::read(&rw).unwrap();
    assert_eq!(sha256_hex(&disk[..WRITE_BYTES]), guest_hash);
    assert!(
        disk[WRITE_BYTES..].iter().all(|&b| b == 0),
        "bytes past the write changed"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&ro).unwrap()),
        ro_before,
        "read-only disk changed"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_restore_reopens_only_the_disks_it_is_given() {
    // A snapshot's state names its disks: a restore must not open them on the state's word.
    let dir = scratch("restore-disks");
    let disk = dir.join("disk.img");
    let mut bytes = b"disk-content\n".to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&disk, &bytes).unwrap();
    let snapshot = dir.join("snap");
    let disk_arg = disk.to_str().unwrap();
    let taken = guest(&[
        "boot",
        "--quiet",
        "--disk",
        disk_arg,
        "--snapshot-to",
        snapshot.to_str().unwrap(),
        "--snapshot-when",
        "SNAP-NOW",
        "--",
        "/bin/sh",
        "-c",
        "echo SNAP-NOW; sleep 1; head -n 1 /dev/vda; exit 7",
    ]);
    assert_eq!(taken.code, 0, "{}", taken.stderr);
    let restore = |extra: &[&str]| {
        let mut args = vec!["boot", "--quiet", "--restore", snapshot.to_str().unwrap()];
        args.extend_from_slice(extra);
        guest(&args)
    };
    // Not given: refused before the disk is opened.
    let run = restore(&[]);
    assert_eq!(run.code, 125, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("names the disk"), "{}", run.stderr);
    // Given read-only, while the snapshot has it writable: refused too.
    let ro = format!("{disk_arg}:ro");
    let run = restore(&["--disk", &ro]);
    assert_eq!(run.code, 125, "{}", run.stderr);
    assert!(run.stderr.contains("names the disk"), "{}", run.stderr);
    // Given as it was: the guest carries on and reads it.
    let run = restore(&["--disk", disk_arg]);
    assert_eq!(run.code, 7, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("disk-content"), "{}", run.stdout);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_disk_arguments_are_clear_errors() {
    let run = supermachine(&["boot", "--disk", "/nonexistent/disk.img", "--", "true"]);
    assert_eq!(run.code, 125);
    assert!(
        run.stderr
            .contains("cannot open disk /nonexistent/disk.img"),
        "{}",
        run.stderr
    );
    let dir = scratch("baddisk");
    let odd = dir.join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let run = supermachine(&["boot", "--disk", odd.to_str().unwrap(), "--", "true"]);
    assert_eq!(run.code, 125);
    assert!(run.stderr.contains("512-byte sectors"), "{}", run.stderr);
    std::fs::remove_dir_all(&dir).ok();
}

#[path = "support/test_image.rs"]
mod test_image;

#[test]
fn the_guest_kernel_mounts_a_pulled_image_root_filesystem() {
    let dir = scratch("rootfs");
    let layout = dir.join("layout");
    test_image::build_layout(&layout, "v1");
    let home = dir.join("home");
    let pull = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(["pull", "-q", &format!("oci:{}:v1", layout.display())])
        .env("SUPERMACHINE_HOME", &home)
        .output()
        .unwrap();
    assert!(
        pull.status.success(),
        "{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let stdout = String::from_utf8_lossy(&pull.stdout);
    let rootfs = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rootfs: "))
        .unwrap_or_else(|| panic!("no rootfs path in:\n{stdout}"))
        .to_string();
    let script = "mount -t squashfs -o ro /dev/vda /mnt || exit 9
        cat /mnt/opt/app/new; echo
        test -e /mnt/etc/gone && echo whiteout-ignored
        test -e /mnt/opt/app/old && echo opaque-ignored
        readlink /mnt/bin/sh
        stat -c '%a %u:%g %n' /mnt/bin/busybox /mnt/home/user/notes
        stat -c '%t:%T %n' /mnt/dev/null
        grep -c user /mnt/etc/passwd";
    let run = guest(&[
        "boot",
        "--quiet",
        "--disk",
        &format!("{rootfs}:ro"),
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    assert_eq!(
        run.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    let out = &run.stdout;
    for want in [
        "new\n",
        "busybox\n",
        "4755 0:0 /mnt/bin/busybox",
        "600 1000:1000 /mnt/home/user/notes",
        "1:3 /mnt/dev/null",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("ignored"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------- supermachine run ----------

/// The busybox image (from the host's busybox-static) in a scratch layout, and a store for it.
struct RunEnv {
    dir: std::path::PathBuf,
    image: String,
}

impl RunEnv {
    fn new(name: &str) -> RunEnv {
        let dir = scratch(name);
        let layout = dir.join("busybox");
        let layer = oci_bake::layout::busybox_layer(std::path::Path::new("/bin/busybox"))
            .expect("busybox-static is needed (cargo xtask deps installs it)");
        oci_bake::layout::write_layout(
            &layout,
            "latest",
            &[layer],
            &oci_bake::layout::busybox_config(),
        )
        .unwrap();
        RunEnv {
            image: format!("oci:{}:latest", layout.display()),
            dir,
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> (i32, Vec<u8>, String) {
        self.run_with(&[], args, stdin)
    }

    /// `run` with extra environment variables for supermachine itself.
    fn run_with(
        &self,
        vars: &[(&str, &str)],
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> (i32, Vec<u8>, String) {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        self.command(vars, &all, stdin)
    }

    /// The VM registry: on a local filesystem, as Unix sockets need (not the 9p share of
    /// the emulated test host).
    fn runtime_dir(&self) -> std::path::PathBuf {
        let name = self.dir.file_name().unwrap().to_string_lossy().into_owned();
        std::env::temp_dir().join(format!("sm-runtime-{name}"))
    }

    /// Any supermachine command, with this test's image store and VM registry.
    fn sm(&self, args: &[&str], stdin: Option<&[u8]>) -> (i32, Vec<u8>, String) {
        self.command(&[], args, stdin)
    }

    fn command(
        &self,
        vars: &[(&str, &str)],
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> (i32, Vec<u8>, String) {
        self.command_wrapped(&[], vars, args, stdin)
    }

    /// [`command`](Self::command) with supermachine started by `wrapper` (its arguments
    /// follow the wrapper's).
    fn command_wrapped(
        &self,
        wrapper: &[&str],
        vars: &[(&str, &str)],
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> (i32, Vec<u8>, String) {
        let bin = env!("CARGO_BIN_EXE_supermachine");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args)
            .envs(vars.iter().copied())
            .env("SUPERMACHINE_HOME", self.dir.join("home"))
            .env("SUPERMACHINE_RUNTIME_DIR", self.runtime_dir())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            let mut w = child.stdin.take().unwrap();
            let data = data.to_vec();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = w.write_all(&data);
            });
        }
        let started = Instant::now();
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let o = std::thread::spawn(move || {
            let mut v = Vec::new();
            out.read_to_end(&mut v).ok();
            v
        });
        let e = std::thread::spawn(move || {
            let mut v = Vec::new();
            err.read_to_end(&mut v).ok();
            v
        });
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > HANG_LIMIT {
                child.kill().ok();
                panic!("run {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = String::from_utf8_lossy(&e.join().unwrap()).into_owned();
        assert!(
            !stderr.contains("could not emulate"),
            "this machine's KVM cannot boot Linux; use cargo xtask test:\n{stderr}"
        );
        (status.code().unwrap_or(-1), o.join().unwrap(), stderr)
    }
}

impl Drop for RunEnv {
    fn drop(&mut self) {
        // No VM of a failed test outlives it.
        if self.runtime_dir().exists() {
            let (_, ids, _) = self.sm(&["ps", "-a", "-q"], None);
            for id in String::from_utf8_lossy(&ids).split_whitespace() {
                self.sm(&["rm", "-f", id], None);
            }
        }
        std::fs::remove_dir_all(self.runtime_dir()).ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

#[test]
fn run_streams_stdout_and_stderr_separately_and_byte_exact() {
    let env = RunEnv::new("run-streams");
    let (code, out, err) = env.run(
        &[&env.image, "sh", "-c", "head -c 1048576 /dev/urandom > /tmp/x; sha256sum /tmp/x >&2; cat /tmp/x; echo done >&2"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 1 << 20, "stdout length; stderr:\n{err}");
    let guest_hash = err.split_whitespace().next().unwrap_or("");
    assert_eq!(
        sha256_hex(&out),
        guest_hash,
        "stdout differs from what the guest wrote"
    );
    assert!(err.trim_end().ends_with("done"), "{err}");
}

#[test]
fn run_returns_the_workload_exit_status() {
    let env = RunEnv::new("run-status");
    for (script, want) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        ("kill -INT $$", 130),
    ] {
        let (code, _, err) = env.run(&[&env.image, "sh", "-c", script], None);
        assert_eq!(code, want, "{script}: {err}");
    }
    let (code, _, err) = env.run(&[&env.image, "/no/such/entrypoint"], None);
    assert_eq!(code, 127);
    assert!(err.contains("/no/such/entrypoint"), "{err}");
}

#[test]
fn run_options_env_workdir_user_entrypoint_and_command() {
    let env = RunEnv::new("run-options");
    let (code, out, err) = env.run(
        &[
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp/work",
            "-u",
            "1000:1000",
            &env.image,
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u; id -g",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        "hi there\n/tmp/work\n1000\n1000\n"
    );
    let (code, out, err) = env.run(
        &[
            "--entrypoint",
            "/bin/echo",
            &env.image,
            "from",
            "entrypoint",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "from entrypoint\n");
}

#[test]
fn run_root_is_writable_but_nothing_persists_and_daemons_do_not_keep_it_alive() {
    let env = RunEnv::new("run-ephemeral");
    let (code, out, err) = env.run(
        &[
            &env.image,
            "sh",
            "-c",
            "echo data > /written && cat /written && (sleep 1000 &) && echo started",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "data\nstarted\n");
    let (code, _, _) = env.run(&[&env.image, "test", "-e", "/written"], None);
    assert_eq!(code, 1, "a write from the last run persisted");
}

#[test]
fn run_interactive_pipes_stdin_through() {
    let env = RunEnv::new("run-stdin");
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (code, out, err) = env.run(&["-i", &env.image, "cat"], Some(&input));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), input.len());
    assert!(out == input, "stdin came back changed");
}

#[test]
fn run_forwards_sigterm_as_the_stop_signal() {
    let env = RunEnv::new("run-signal");
    let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args([
            "run",
            &env.image,
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 1; done",
        ])
        .env("SUPERMACHINE_HOME", env.dir.join("home"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let started = Instant::now();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        assert!(started.elapsed() < HANG_LIMIT, "never ready");
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "output ended before ready");
        seen.extend_from_slice(&buf[..n]);
    }
    // As `docker stop` would: SIGTERM to supermachine reaches the workload as its stop signal.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    out.read_to_end(&mut seen).unwrap();
    let status = child.wait().unwrap();
    assert!(
        String::from_utf8_lossy(&seen).contains("got-term"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(status.code(), Some(7));
}

#[test]
fn named_volumes_keep_data_across_runs() {
    let env = RunEnv::new("run-volume");
    let (code, _, err) = env.run(
        &[
            "-v",
            "notes:/data",
            &env.image,
            "sh",
            "-c",
            "echo kept > /data/note && sync",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = env.run(
        &[
            "-v",
            "notes:/data:ro",
            &env.image,
            "sh",
            "-c",
            "cat /data/note; touch /data/x",
        ],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out), "kept\n", "{err}");
    assert_ne!(code, 0, "a read-only volume took a write");
    assert!(err.contains("Read-only file system"), "{err}");
}

#[test]
fn synced_writes_survive_a_killed_vmm() {
    let env = RunEnv::new("run-durable");
    let volume = env.dir.join("db.ext4");
    let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args([
            "run",
            "--volume-size",
            "64m",
            "-v",
            &format!("{}:/db", volume.display()),
            &env.image,
            "sh",
            "-c",
            // Append a record, fsync it (busybox sync FILE is fsync), acknowledge it.
            "i=0; while [ $i -lt 10000 ]; do i=$((i+1)); echo record-$i >> /db/log; sync /db/log; echo $i; done",
        ])
        .env("SUPERMACHINE_HOME", env.dir.join("home"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut acknowledged = 0u32;
    let mut line = String::new();
    let started = Instant::now();
    use std::io::BufRead;
    while acknowledged < 300 {
        assert!(started.elapsed() < HANG_LIMIT, "too slow");
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Ok(n) = line.trim().parse() {
            acknowledged = n;
        }
    }
    child.kill().unwrap(); // SIGKILL: no flush, no unmount
    child.wait().unwrap();
    assert!(
        acknowledged >= 300,
        "the guest stopped early at {acknowledged}"
    );
    // Replay the journal on a copy, then read the log back.
    let copy = env.dir.join("copy.ext4");
    std::fs::copy(&volume, &copy).unwrap();
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        fsck.code().unwrap_or(8) < 4,
        "e2fsck could not repair the volume: {fsck}"
    );
    let dump = Command::new("debugfs")
        .args(["-R", "cat /log"])
        .arg(&copy)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    let records: Vec<&str> = text.lines().collect();
    assert!(
        records.len() as u32 >= acknowledged,
        "{} records on disk, {acknowledged} acknowledged",
        records.len()
    );
    for (i, r) in records.iter().take(acknowledged as usize).enumerate() {
        assert_eq!(*r, format!("record-{}", i + 1));
    }
}

#[test]
fn run_with_a_terminal_passes_keys_and_window_size() {
    let env = RunEnv::new("run-tty");
    drive_terminal(&env, &["run", "-i", "-t", &env.image]);
    // The same for a command run in a VM started in the background.
    let (code, _, err) = env.sm(
        &["run", "-d", "--name", "tty", &env.image, "sleep", "600"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    drive_terminal(&env, &["exec", "-i", "-t", "tty"]);
    let (code, _, err) = env.sm(&["rm", "-f", "tty"], None);
    assert_eq!(code, 0, "{err}");
}

/// Runs `supermachine ARGS sh -c SCRIPT` on a pseudo-terminal: the script sees the terminal's
/// size, a resize (with SIGWINCH), typed input, and its exit status becomes supermachine's.
fn drive_terminal(env: &RunEnv, args: &[&str]) {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors we then own; `ws` is a valid winsize.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors from openpty, owned from here on.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(args)
        .args([
            "sh",
            "-c",
            // The trap is set before the size is printed: the host resizes on seeing it.
            "trap 'echo winch' WINCH; stty size; \
             while [ \"$(stty size)\" = '33 101' ]; do sleep 0.1; done; \
             stty size; read line; echo got-$line; exit 5",
        ])
        .env("SUPERMACHINE_HOME", env.dir.join("home"))
        .env("SUPERMACHINE_RUNTIME_DIR", env.runtime_dir())
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut reader = master.try_clone().unwrap();
    let mut writer = master;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let started = Instant::now();
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    while !text().contains("33 101") {
        assert!(
            started.elapsed() < HANG_LIMIT,
            "no window size in: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The host terminal is resized: the workload sees the new size and gets SIGWINCH. (The
    // test's pty is not supermachine's controlling terminal, so the signal is sent by hand.)
    let bigger = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on the pty master we own.
    assert_eq!(
        unsafe { libc::ioctl(writer.as_raw_fd(), libc::TIOCSWINSZ, &bigger) },
        0
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) };
    while !text().contains("40 120") {
        assert!(started.elapsed() < HANG_LIMIT, "no resize in: {}", text());
        std::thread::sleep(Duration::from_millis(50));
    }
    writer.write_all(b"hello\r").unwrap();
    let status = child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(text().contains("got-hello"), "{}", text());
    assert!(text().contains("winch"), "no SIGWINCH: {}", text());
    assert_eq!(status.code(), Some(5), "{}", text());
}

#[test]
fn run_gives_the_workload_cgroup2_and_reports_out_of_memory() {
    let env = RunEnv::new("run-oom");
    let (code, out, err) = env.run(
        &[
            &env.image,
            "sh",
            "-c",
            "cat /sys/fs/cgroup/cgroup.controllers",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let controllers = String::from_utf8_lossy(&out);
    for c in ["memory", "pids", "cpu"] {
        assert!(controllers.contains(c), "no {c} controller: {controllers}");
    }
    // `tail` keeps the current line in memory, and /dev/zero has no newline.
    let (code, _, err) = env.run(
        &[
            "--memory",
            "96",
            &env.image,
            "sh",
            "-c",
            "x=a; while :; do x=$x$x; done",
        ],
        None,
    );
    assert_eq!(code, 137, "{err}");
    assert!(err.contains("out of memory"), "{err}");
}

#[test]
fn a_kernel_panic_is_reported_with_its_panic_line() {
    let env = RunEnv::new("run-panic");
    let (code, _, err) = env.run(
        &[
            &env.image,
            "sh",
            "-c",
            "echo c > /proc/sysrq-trigger; sleep 100",
        ],
        None,
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("Kernel panic - not syncing"), "{err}");
    assert!(err.contains("sysrq"), "{err}");
}

#[test]
fn a_guest_that_never_comes_up_is_stopped_with_its_last_console_lines() {
    let env = RunEnv::new("run-never-up");
    // An initramfs whose init prints a line and hangs: init never says it is ready.
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is needed");
    let mut cpio = guest_init::newc::Writer::new(Vec::new());
    cpio.directory("dev", 0o755).unwrap();
    cpio.char_device("dev/console", 0o600, 5, 1).unwrap();
    cpio.directory("bin", 0o755).unwrap();
    cpio.file("bin/busybox", 0o755, &busybox).unwrap();
    cpio.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\necho stuck-in-early-boot\nexec /bin/busybox sleep 100000\n",
    )
    .unwrap();
    let initramfs = env.dir.join("hang.cpio");
    std::fs::write(&initramfs, cpio.finish().unwrap()).unwrap();
    let (code, _, err) = env.run_with(
        &[
            ("SUPERMACHINE_INITRAMFS", initramfs.to_str().unwrap()),
            ("SUPERMACHINE_COME_UP_SECS", "10"),
        ],
        &[&env.image, "true"],
        None,
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("did not come up within 10 s"), "{err}");
    assert!(err.contains("stuck-in-early-boot"), "{err}");
}

/// GET `path` from 127.0.0.1:`port` over HTTP/1.0; (status line, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(HANG_LIMIT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, all[split + 4..].to_vec()))
}

#[test]
fn detached_vm_serves_published_port_and_takes_exec_cp_stop_rm() {
    use std::os::unix::fs::PermissionsExt;
    let env = RunEnv::new("detached");
    let port = 18080;
    let (code, out, err) = env.sm(
        &[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            &format!("127.0.0.1:{port}:80"),
            &env.image,
            "sh",
            "-c",
            "mkdir -p /www && echo hello > /www/index.html && echo serving && exec httpd -f -p 80 -h /www",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let id = String::from_utf8_lossy(&out).trim().to_string();
    assert_eq!(id.len(), 12, "{id:?}");

    // Its output is in its log (`run -d` returns once the agent answers, which can be just
    // before the workload's first line).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, out, err) = loop {
        let (code, out, err) = env.sm(&["logs", "web"], None);
        if !out.is_empty() || Instant::now() > deadline {
            break (code, out, err);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (code, String::from_utf8_lossy(&out).into_owned()),
        (0, "serving\n".into()),
        "{err}"
    );
    let (code, out, err) = env.sm(&["logs", "--tail", "0", "web"], None);
    assert_eq!((code, out.len()), (0, 0), "{err}");
    let (code, out, err) = env.sm(&["logs", "-n", "1", "web"], None);
    assert_eq!((code, &out[..]), (0, &b"serving\n"[..]), "{err}");

    // The VM's process runs under its system-call filter, with no_new_privs; its registry
    // entry is private.
    let vm_dir = env.runtime_dir().join("vms").join(&id);
    assert_eq!(
        std::fs::metadata(&vm_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir.join("vm.json")).unwrap()).unwrap();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", record["pid"].as_u64().unwrap()))
            .unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    assert!(status.contains("\nNoNewPrivs:\t1\n"), "{status}");

    // ps shows it running with its port; a second VM with the same name is refused.
    let (_, ps, _) = env.sm(&["ps"], None);
    let ps = String::from_utf8_lossy(&ps);
    let row = ps
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{ps}"));
    assert!(row.contains("web") && row.contains("running"), "{row}");
    assert!(row.contains(&format!("127.0.0.1:{port}->80/tcp")), "{row}");
    let (code, _, err) = env.sm(&["run", "-d", "--name", "web", &env.image, "true"], None);
    assert_ne!(code, 0);
    assert!(err.contains("already used"), "{err}");

    // cp into the VM: content and mode; then served through the published port.
    let big: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let host_file = env.dir.join("big.bin");
    std::fs::write(&host_file, &big).unwrap();
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, err) = env.sm(&["cp", host_file.to_str().unwrap(), "web:/www/"], None);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = env.sm(
        &["exec", "web", "stat", "-c", "%a %s", "/www/big.bin"],
        None,
    );
    assert_eq!(
        (code, String::from_utf8_lossy(&out).trim()),
        (0, "640 10485760"),
        "{err}"
    );

    // 200 concurrent requests, the 10 MiB file among them, all byte-exact.
    let big = std::sync::Arc::new(big);
    let workers: Vec<_> = (0..200)
        .map(|i| {
            let big = big.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let path = if i % 20 == 0 {
                    "/big.bin"
                } else {
                    "/index.html"
                };
                let (status, body) =
                    http_get(port, path).map_err(|e| format!("request {i}: {e}"))?;
                if !status.contains(" 200") {
                    return Err(format!("request {i}: {status}"));
                }
                let want: &[u8] = if i % 20 == 0 { &big } else { b"hello\n" };
                if body != want {
                    return Err(format!(
                        "request {i}: {} bytes, not the {} expected",
                        body.len(),
                        want.len()
                    ));
                }
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .filter_map(|w| w.join().unwrap().err())
        .collect();
    let vm_log = || {
        std::fs::read_to_string(env.runtime_dir().join("vms").join(&id).join("stderr.log"))
            .unwrap_or_default()
    };
    assert!(
        failures.is_empty(),
        "{} of 200 requests failed: {:?}\nVM log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        vm_log()
    );

    // exec: env, output and exit status.
    let (code, out, err) = env.sm(
        &["exec", "-e", "X=1", "web", "sh", "-c", "echo $X; exit 7"],
        None,
    );
    assert_eq!(
        (code, String::from_utf8_lossy(&out).into_owned()),
        (7, "1\n".into()),
        "{err}"
    );
    let (code, _, err) = env.sm(&["exec", "web", "/no/such/program"], None);
    assert_eq!(code, 127, "{err}");

    // exec -i: 100 MiB through cat and back.
    let data: Vec<u8> = (0..100u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    let (code, out, err) = env.sm(&["exec", "-i", "web", "cat"], Some(&data));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.len() == data.len() && out == data,
        "{} bytes back of {}",
        out.len(),
        data.len()
    );

    // cp out of the VM: content and mode.
    let back = env.dir.join("back.bin");
    let (code, _, err) = env.sm(&["cp", "web:/www/big.bin", back.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&back).unwrap() == *big);
    assert_eq!(
        std::fs::metadata(&back).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // A setuid, setgid file comes out with its permission bits only.
    let (code, _, err) = env.sm(
        &[
            "exec",
            "web",
            "sh",
            "-c",
            "echo x > /www/s && chmod 6755 /www/s",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let suid = env.dir.join("suid");
    let (code, _, err) = env.sm(&["cp", "web:/www/s", suid.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::metadata(&suid).unwrap().permissions().mode() & 0o7777,
        0o755
    );

    // pause: ps says so, exec is refused, a request waits; unpause answers it and the VM goes
    // on. Paused again, it still stops (below).
    let ps_row = || {
        let (_, ps, _) = env.sm(&["ps"], None);
        let ps = String::from_utf8_lossy(&ps).into_owned();
        ps.lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{ps}"))
            .to_string()
    };
    // stats: one sample, the guest's memory in use of its total, the host's RSS and PSS.
    let stats_row = || {
        let (code, out, err) = env.sm(&["stats", "--no-stream", "web"], None);
        assert_eq!(code, 0, "{err}");
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(out.starts_with("ID "), "{out}");
        out.lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{out}"))
            .to_string()
    };
    let row = stats_row();
    assert!(row.contains('%') && row.contains("MB / "), "{row}");
    let (code, out, err) = env.sm(&["pause", "web"], None);
    assert_eq!(
        (code, String::from_utf8_lossy(&out).trim()),
        (0, "web"),
        "{err}"
    );
    assert!(stats_row().contains("paused"), "{}", stats_row());
    assert!(ps_row().contains("paused"), "{}", ps_row());
    let (code, out, err) = env.sm(&["ps", "--format", "json"], None);
    assert_eq!(code, 0, "{err}");
    let row: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        (&row["ID"], &row["Name"], &row["State"]),
        (
            &serde_json::json!(id),
            &serde_json::json!("web"),
            &serde_json::json!("paused")
        )
    );
    assert_eq!(
        row["Ports"],
        serde_json::json!([format!("127.0.0.1:{port}->80/tcp")])
    );
    let (code, out, err) = env.sm(&["inspect", "web"], None);
    assert_eq!(code, 0, "{err}");
    let inspected: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let state = &inspected[0]["State"];
    assert_eq!(state["Paused"], true, "{state}");
    assert_eq!(state["Running"], true, "{state}");
    assert_eq!(state["Pid"], record["pid"], "{state}");
    assert_eq!(inspected[0]["Detached"], true);
    let (code, _, err) = env.sm(&["exec", "web", "true"], None);
    assert_ne!(code, 0);
    assert!(err.contains("paused"), "{err}");
    let waiting = std::thread::spawn(move || http_get(port, "/index.html"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!waiting.is_finished(), "a paused VM answered a request");
    let (code, _, err) = env.sm(&["unpause", "web"], None);
    assert_eq!(code, 0, "{err}");
    let (status, body) = waiting.join().unwrap().expect("the waiting request");
    assert!(status.contains(" 200") && body == b"hello\n", "{status}");
    assert!(ps_row().contains("running"), "{}", ps_row());
    let (code, _, err) = env.sm(&["exec", "web", "true"], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = env.sm(&["pause", "web"], None);
    assert_eq!(code, 0, "{err}");

    // stop: httpd exits on SIGTERM, so well within the grace period; rm forgets it.
    let started = Instant::now();
    let (code, _, err) = env.sm(&["stop", "-t", "30", "web"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stop took {:?}",
        started.elapsed()
    );
    let (_, ps, _) = env.sm(&["ps"], None);
    assert!(!String::from_utf8_lossy(&ps).contains(&id), "still running");
    let (_, ps, _) = env.sm(&["ps", "-a"], None);
    let ps = String::from_utf8_lossy(&ps);
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&id) && l.contains("exited")),
        "{ps}"
    );
    assert!(
        http_get(port, "/index.html").is_err(),
        "port still served after stop"
    );
    let (code, _, err) = env.sm(&["rm", "web"], None);
    assert_eq!(code, 0, "{err}");
    let (_, ps, _) = env.sm(&["ps", "-a"], None);
    assert!(!String::from_utf8_lossy(&ps).contains(&id));
}

#[test]
fn restart_policies_and_health_checks_watch_the_workload() {
    let env = RunEnv::new("restart");
    let ps_row = |id: &str| {
        let (_, ps, _) = env.sm(&["ps", "-a"], None);
        let ps = String::from_utf8_lossy(&ps).into_owned();
        ps.lines()
            .find(|l| l.starts_with(id))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let logs = |name: &str| String::from_utf8_lossy(&env.sm(&["logs", name], None).1).into_owned();

    // on-failure:2 → three runs, then it stays exited with the last status.
    let (code, out, err) = env.sm(
        &[
            "run",
            "-d",
            "--name",
            "flaky",
            "--restart",
            "on-failure:2",
            &env.image,
            "sh",
            "-c",
            "echo run; exit 3",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let id = String::from_utf8_lossy(&out).trim().to_string();
    wait_for("flaky to end", &|| ps_row(&id).contains("exited"));
    let row = ps_row(&id);
    assert!(
        row.contains("exited (3)") && row.contains("restarted 2 times"),
        "{row}"
    );
    assert_eq!(
        logs("flaky").matches("run\n").count(),
        3,
        "{}",
        logs("flaky")
    );
    let (_, out, _) = env.sm(&["inspect", "flaky"], None);
    let inspected: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(inspected[0]["RestartCount"], 2);

    // always → restarted after a clean exit too; a stop ends it for good.
    let (code, out, err) = env.sm(
        &[
            "run",
            "-d",
            "--name",
            "forever",
            "--restart",
            "always",
            &env.image,
            "sh",
            "-c",
            "echo up; sleep 1",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let id = String::from_utf8_lossy(&out).trim().to_string();
    wait_for("a second run", &|| {
        logs("forever").matches("up\n").count() >= 2
    });
    wait_for("forever to run", &|| ps_row(&id).contains("running"));
    let (code, _, err) = env.sm(&["stop", "forever"], None);
    assert_eq!(code, 0, "{err}");
    let runs = logs("forever").matches("up\n").count();
    std::thread::sleep(Duration::from_secs(3));
    let row = ps_row(&id);
    assert!(!row.contains("running"), "restarted after a stop: {row}");
    assert_eq!(logs("forever").matches("up\n").count(), runs);
    // A health check: unhealthy after two failures in a row, healthy once it passes.
    let (code, out, err) = env.sm(
        &[
            "run",
            "-d",
            "--name",
            "checked",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "500ms",
            "--health-retries",
            "2",
            &env.image,
            "sleep",
            "1000",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let id = String::from_utf8_lossy(&out).trim().to_string();
    wait_for("unhealthy", &|| ps_row(&id).contains("(unhealthy"));
    let (code, _, err) = env.sm(&["exec", "checked", "touch", "/tmp/ok"], None);
    assert_eq!(code, 0, "{err}");
    wait_for("healthy", &|| ps_row(&id).contains("(healthy"));
    let (_, out, _) = env.sm(&["inspect", "checked"], None);
    let inspected: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let health = &inspected[0]["State"]["Health"];
    assert_eq!(health["Status"], "healthy", "{health}");
    assert_eq!(health["LastExitCode"], 0, "{health}");
    let (code, _, err) = env.sm(&["rm", "-f", "checked"], None);
    assert_eq!(code, 0, "{err}");

    // bake refuses the flags.
    let (code, _, err) = env.sm(&["bake", "--health-cmd", "true", &env.image], None);
    assert_ne!(code, 0);
    assert!(err.contains("--health-cmd applies to the `run`"), "{err}");
    let (code, _, err) = env.sm(&["bake", "--restart", "always", &env.image], None);
    assert_ne!(code, 0);
    assert!(err.contains("--restart applies to the `run`"), "{err}");
}

// ---------- TLS on published ports ----------

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed for this test (cargo xtask deps installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate for localhost and its key, made by OpenSSL (another TLS stack
/// than ours); (certificate, key).
fn localhost_certificate(dir: &std::path::Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.crt")).display().to_string();
    let key = dir.join(format!("{name}.key")).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-days",
        "2",
        "-keyout",
        &key,
        "-out",
        &cert,
    ]);
    (cert, key)
}

#[test]
fn published_ports_terminate_tls_on_the_host() {
    let env = RunEnv::new("tls");
    let (cert, key) = localhost_certificate(&env.dir, "good");
    let (_, other_key) = localhost_certificate(&env.dir, "other");
    let port = 18443;
    let publish = format!("127.0.0.1:{port}:80/tls");

    // Bad key material fails the start with 125 before any VM boots.
    let refused = |key: &str, why: &str| {
        let args = [
            "run",
            "-p",
            &publish,
            "--tls-cert",
            &cert,
            "--tls-key",
            key,
            &env.image,
            "true",
        ];
        let (code, _, err) = env.sm(&args, None);
        assert_eq!(code, 125, "{err}");
        assert!(err.contains(why), "{err}");
    };
    refused(&other_key, "does not match the certificate");
    let encrypted = env.dir.join("encrypted.key").display().to_string();
    openssl(&[
        "pkey",
        "-in",
        &key,
        "-aes256",
        "-passout",
        "pass:secret",
        "-out",
        &encrypted,
    ]);
    refused(&encrypted, "encrypted");
    let (code, _, err) = env.sm(&["run", "-p", &publish, &env.image, "true"], None);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("needs --tls-cert"), "{err}");

    // A server with a 10 MiB file, reached over HTTPS.
    let (code, out, err) = env.sm(
        &[
            "run", "-d", "-p", &publish, "--tls-cert", &cert, "--tls-key", &key, &env.image,
            "sh", "-c",
            "mkdir -p /www && head -c 10485760 /dev/urandom > /www/big && exec httpd -f -p 80 -h /www",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let id = String::from_utf8_lossy(&out).trim().to_string();
    let (_, ps, _) = env.sm(&["ps"], None);
    let ps = String::from_utf8_lossy(&ps);
    assert!(ps.contains(&format!("127.0.0.1:{port}->80/tls")), "{ps}");

    let got = env.dir.join("big.got");
    let started = Instant::now();
    loop {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--http1.1", "--cacert", &cert, "-o"])
            .arg(&got)
            .arg(format!("https://localhost:{port}/big"))
            .output()
            .expect("curl is needed for this test (cargo xtask deps installs it)");
        if out.status.success() {
            break;
        }
        assert!(
            started.elapsed() < HANG_LIMIT,
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let in_guest = exec_out(&env, &id, &["sha256sum", "/www/big"]);
    let got = std::fs::read(&got).unwrap();
    assert_eq!(got.len(), 10 << 20);
    assert_eq!(
        in_guest.split_whitespace().next(),
        Some(sha256_hex(&got).as_str())
    );

    // A plaintext client on the TLS port gets an alert record and the end, not a hang.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::io::Write::write_all(&mut plain, b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    plain
        .read_to_end(&mut answer)
        .expect("the end of the stream, not a hang");
    assert_eq!(answer.first(), Some(&0x15), "a TLS alert: {answer:?}");

    let (code, _, err) = env.sm(&["rm", "-f", &id], None);
    assert_eq!(code, 0, "{err}");

    // --tls-autogen: a fresh certificate whose fingerprint is printed.
    let (code, _, err) = env.sm(
        &[
            "run",
            "-p",
            "127.0.0.1::80",
            "--tls-autogen",
            &env.image,
            "sh",
            "-c",
            "exit 3",
        ],
        None,
    );
    assert_eq!(code, 3, "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("self-signed certificate for localhost"))
        .unwrap_or_else(|| panic!("no fingerprint line: {err}"));
    let fingerprint = line
        .split("SHA-256 ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(fingerprint.len(), 95, "{line}");
}

// ---------- bake and restore ----------

/// The web server the bake tests bake: its page is written at start, and the ready command
/// (run only while baking) leaves a mark in the guest's tmpfs.
const BAKED_SERVER: &str =
    "mkdir -p /www && echo baked-body > /www/index.html && exec httpd -f -p 80 -h /www";
const BAKE_READY: &str =
    "wget -q -O /dev/null http://127.0.0.1/ && echo from-bake > /dev/shm/baked";

/// Bakes [`BAKED_SERVER`] with 128 MiB; returns the snapshot directory.
fn bake_server(env: &RunEnv) -> String {
    let (code, out, err) = env.sm(
        &[
            "bake",
            "-m",
            "128m",
            "--ready-cmd",
            BAKE_READY,
            &env.image,
            "sh",
            "-c",
            BAKED_SERVER,
        ],
        None,
    );
    assert_eq!(code, 0, "bake failed: {err}");
    assert!(err.contains("baked"), "{err}");
    let dir = String::from_utf8_lossy(&out).trim().to_string();
    assert!(std::path::Path::new(&dir).join("state").is_file(), "{dir}");
    dir
}

/// `run -d` of the baked server (restored from the bake), publishing `port`; returns its id.
fn start_baked(env: &RunEnv, port: u16, extra: &[&str]) -> String {
    let publish = format!("127.0.0.1:{port}:80");
    let mut args = vec!["run", "-d", "-m", "128m", "-p", &publish];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&env.image, "sh", "-c", BAKED_SERVER]);
    let (code, out, err) = env.sm(&args, None);
    assert_eq!(code, 0, "restore failed: {err}");
    String::from_utf8_lossy(&out).trim().to_string()
}

/// The body of `GET /` on `port`, asked until a `200` comes back (within [`HANG_LIMIT`]).
fn http_body_when_up(port: u16) -> Vec<u8> {
    let started = Instant::now();
    loop {
        match http_get(port, "/") {
            Ok((status, body)) if status.contains("200") => return body,
            _ => {
                assert!(started.elapsed() < HANG_LIMIT, "port {port}: no answer");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn exec_out(env: &RunEnv, id: &str, argv: &[&str]) -> String {
    let mut args = vec!["exec", id];
    args.extend_from_slice(argv);
    let (code, out, err) = env.sm(&args, None);
    assert_eq!(code, 0, "exec {argv:?}: {err}");
    String::from_utf8_lossy(&out).trim().to_string()
}

#[test]
fn a_baked_server_restores_twenty_times_and_answers_each_time() {
    let env = RunEnv::new("bake-twenty");
    bake_server(&env);
    let (code, images, _) = env.sm(&["images"], None);
    assert_eq!(code, 0);
    let images = String::from_utf8_lossy(&images);
    assert!(
        images.contains("BAKED") && images.contains(&env.image) && images.contains("128m"),
        "{images}"
    );
    for i in 0..20u16 {
        let port = 18200 + i;
        let id = start_baked(&env, port, &[]);
        let (status, body) = http_get(port, "/").unwrap();
        assert!(status.contains("200"), "restore {i}: {status}");
        assert_eq!(body, b"baked-body\n", "restore {i}");
        // The mark the ready command left while baking: this VM was restored, not booted.
        assert_eq!(
            exec_out(&env, &id, &["cat", "/dev/shm/baked"]),
            "from-bake",
            "restore {i}"
        );
        let (code, _, err) = env.sm(&["rm", "-f", &id], None);
        assert_eq!(code, 0, "{err}");
    }
    // A restored VM in the foreground stops like a booted one: SIGTERM reaches httpd and its
    // status (128 + 15) is supermachine's, with init shutting down cleanly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(["run", "-m", "128m", "-p", "127.0.0.1:18230:80", &env.image])
        .args(["sh", "-c", BAKED_SERVER])
        .env("SUPERMACHINE_HOME", env.dir.join("home"))
        .env("SUPERMACHINE_RUNTIME_DIR", env.runtime_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    http_body_when_up(18230);
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    // `--no-restore` boots instead: no mark.
    let (code, out, err) = env.sm(
        &[
            "run",
            "--no-restore",
            "-m",
            "128m",
            &env.image,
            "sh",
            "-c",
            "cat /dev/shm/baked || echo booted",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "booted");
    // Removing the image removes its bakes.
    let (code, out, err) = env.sm(&["rmi", &env.image], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        String::from_utf8_lossy(&out).contains("Deleted bake:"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let (_, images, _) = env.sm(&["images"], None);
    assert!(
        !String::from_utf8_lossy(&images).contains("BAKED"),
        "{}",
        String::from_utf8_lossy(&images)
    );
}

#[test]
fn a_bake_before_start_gives_each_restore_its_own_env() {
    let env = RunEnv::new("bake-before-start");
    const TENANT_SERVER: &str = "mkdir -p /www && echo \"tenant=$TENANT\" > /www/index.html \
         && echo marked > /dev/shm/started-after && exec httpd -f -p 80 -h /www";
    let (code, out, err) = env.sm(
        &[
            "bake",
            "-m",
            "128m",
            "--before-start",
            "-e",
            "TENANT=baked",
            &env.image,
            "sh",
            "-c",
            TENANT_SERVER,
        ],
        None,
    );
    assert_eq!(code, 0, "bake failed: {err}");
    let dir = String::from_utf8_lossy(&out).trim().to_string();
    let (_, images, _) = env.sm(&["images"], None);
    assert!(
        String::from_utf8_lossy(&images).contains("before the workload starts"),
        "{}",
        String::from_utf8_lossy(&images)
    );
    // Each restore starts the workload with its own `-e`, over the bake's.
    let mut ids = Vec::new();
    for (tenant, port) in [("alpha", 18311u16), ("beta", 18312)] {
        let publish = format!("127.0.0.1:{port}:80");
        let tenant_env = format!("TENANT={tenant}");
        let (code, out, err) = env.sm(
            &[
                "run",
                "-d",
                "-m",
                "128m",
                "-p",
                &publish,
                "-e",
                &tenant_env,
                &env.image,
                "sh",
                "-c",
                TENANT_SERVER,
            ],
            None,
        );
        assert_eq!(code, 0, "restore failed: {err}");
        let id = String::from_utf8_lossy(&out).trim().to_string();
        let body = http_body_when_up(port);
        assert_eq!(body, format!("tenant={tenant}\n").as_bytes());
        ids.push(id);
    }
    // Without -e, the bake's own env.
    let (code, out, err) = env.sm(
        &[
            "run",
            "--snapshot",
            &dir,
            "-m",
            "128m",
            "-p",
            "127.0.0.1:18313:80",
            "-d",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    ids.push(String::from_utf8_lossy(&out).trim().to_string());
    assert_eq!(http_body_when_up(18313), b"tenant=baked\n");
    for id in &ids {
        env.sm(&["rm", "-f", id], None);
    }
}

#[test]
fn restored_clones_get_fresh_entropy_the_host_clock_and_their_own_env() {
    let env = RunEnv::new("bake-clones");
    let dir = bake_server(&env);
    // Let the snapshot's clock fall behind the host's.
    std::thread::sleep(Duration::from_secs(3));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start_baked(&env, 18301, &["-e", "TENANT=alpha"]));
        let b = s.spawn(|| start_baked(&env, 18302, &["-e", "TENANT=beta"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (id, port) in [(&a, 18301), (&b, 18302)] {
        let (_, body) = http_get(port, "/").unwrap();
        assert_eq!(body, b"baked-body\n");
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let guest_now: f64 = exec_out(&env, id, &["date", "+%s"]).parse().unwrap();
        // `date +%s` truncates: the guest is within 1 s when it is in (host - 2, host + 1).
        assert!(
            guest_now > host_now - 2.0 && guest_now < host_now + 1.0,
            "guest clock {guest_now}, host {host_now}"
        );
        assert_eq!(exec_out(&env, id, &["hostname"]), id.as_str());
    }
    assert_eq!(exec_out(&env, &a, &["sh", "-c", "echo $TENANT"]), "alpha");
    assert_eq!(exec_out(&env, &b, &["sh", "-c", "echo $TENANT"]), "beta");
    let random = |id: &str| exec_out(&env, id, &["od", "-An", "-tx1", "-N32", "/dev/urandom"]);
    let (ra, rb) = (random(&a), random(&b));
    assert_eq!(ra.split_whitespace().count(), 32, "{ra}");
    assert_ne!(
        ra, rb,
        "two clones of one snapshot produced the same random bytes"
    );
    for id in [&a, &b] {
        env.sm(&["rm", "-f", id], None);
    }

    // Damaged or foreign snapshots are refused with the reason, and nothing runs.
    let copy = |name: &str| {
        let to = env.dir.join(name);
        let status = Command::new("cp")
            .args(["-r", "--sparse=always", &dir, to.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        to
    };
    let restore = |snapshot: &std::path::Path, vars: &[(&str, &str)]| {
        let (code, out, err) = env.command(
            vars,
            &[
                "run",
                "-m",
                "128m",
                "--snapshot",
                snapshot.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code, 125, "stdout {:?}", String::from_utf8_lossy(&out));
        err
    };
    let truncated = copy("truncated");
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap();
    let len = memory.metadata().unwrap().len();
    memory.set_len(len / 2).unwrap();
    let err = restore(&truncated, &[]);
    assert!(err.contains("truncated"), "{err}");

    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let at = state.len() / 2;
    state[at] ^= 0x40;
    std::fs::write(flipped.join("state"), state).unwrap();
    let err = restore(&flipped, &[]);
    assert!(err.contains("damaged"), "{err}");

    let kernel = env.dir.join("other-vmlinux");
    let ours = std::env::var("SUPERMACHINE_KERNEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/supermachine/guest/vmlinux")
        });
    std::fs::copy(&ours, &kernel).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&kernel)
        .unwrap()
        .set_len(std::fs::metadata(&ours).unwrap().len() + 4096)
        .unwrap();
    let err = restore(
        std::path::Path::new(&dir),
        &[("SUPERMACHINE_KERNEL", kernel.to_str().unwrap())],
    );
    assert!(err.contains("another build of the guest kernel"), "{err}");
}

#[test]
fn a_running_vm_is_snapshotted_and_goes_on_or_stops_on_request() {
    let env = RunEnv::new("snapshot-live");
    let (code, out, err) = env.sm(
        &[
            "run",
            "-d",
            "--name",
            "live",
            "-m",
            "128m",
            "-p",
            "127.0.0.1:18401:80",
            &env.image,
            "sh",
            "-c",
            BAKED_SERVER,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let first = String::from_utf8_lossy(&out).trim().to_string();
    exec_out(
        &env,
        "live",
        &["sh", "-c", "echo before-snapshot > /dev/shm/state"],
    );
    let snap = env.dir.join("live-snapshot");
    let (code, out, err) = env.sm(&["snapshot", "live", snap.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), snap.to_str().unwrap());
    // The original goes on serving.
    let (_, body) = http_get(18401, "/").unwrap();
    assert_eq!(body, b"baked-body\n");
    exec_out(&env, "live", &["sh", "-c", "echo after > /dev/shm/state"]);

    // A VM restored from it has the state of the moment of the snapshot.
    let (code, out, err) = env.sm(
        &[
            "run",
            "-d",
            "-p",
            "127.0.0.1:18402:80",
            "--snapshot",
            snap.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let clone = String::from_utf8_lossy(&out).trim().to_string();
    let (_, body) = http_get(18402, "/").unwrap();
    assert_eq!(body, b"baked-body\n");
    assert_eq!(
        exec_out(&env, &clone, &["cat", "/dev/shm/state"]),
        "before-snapshot"
    );
    assert_eq!(exec_out(&env, &first, &["cat", "/dev/shm/state"]), "after");

    // fork: two clones of the running VM, each with the state of the moment, its own name,
    // host name, port and memory; the source goes on untouched.
    let (code, out, err) = env.sm(
        &["fork", "-n", "2", "--name", "twin", "-p", "80", "live"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let twins: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(twins.len(), 2, "{twins:?}");
    let (_, ps, _) = env.sm(&["ps", "--format", "json"], None);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&ps)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, twin) in twins.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r["ID"] == twin.as_str())
            .unwrap_or_else(|| panic!("{twin} not in {rows:?}"));
        assert_eq!(row["Name"], format!("twin-{}", i + 1));
        let port: u16 = row["Ports"][0]
            .as_str()
            .and_then(|p| p.split_once("->"))
            .and_then(|(host, _)| host.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("{row}"));
        let (_, body) = http_get(port, "/").unwrap();
        assert_eq!(body, b"baked-body\n");
        assert_eq!(exec_out(&env, twin, &["cat", "/dev/shm/state"]), "after");
        assert_eq!(
            exec_out(&env, twin, &["hostname"]),
            format!("twin-{}", i + 1)
        );
    }
    exec_out(
        &env,
        &twins[0],
        &["sh", "-c", "echo twin-1 > /dev/shm/state"],
    );
    assert_eq!(
        exec_out(&env, &twins[1], &["cat", "/dev/shm/state"]),
        "after"
    );
    assert_eq!(exec_out(&env, &first, &["cat", "/dev/shm/state"]), "after");
    // The clones share the pages of the fork's memory that neither wrote.
    let (_, out, _) = env.sm(&["inspect", &twins[0]], None);
    let inspected: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let pid = inspected[0]["State"]["Pid"].as_u64().unwrap();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kib = |key: &str| -> u64 {
        rollup
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    assert!(kib("Pss:") < kib("Rss:"), "nothing shared: {rollup}");
    for twin in &twins {
        let (code, _, err) = env.sm(&["rm", "-f", twin], None);
        assert_eq!(code, 0, "{err}");
    }
    // A clone of a fixed host port for several clones is refused before anything starts.
    let (code, _, err) = env.sm(&["fork", "-n", "2", "-p", "18403:80", "live"], None);
    assert_ne!(code, 0);
    assert!(err.contains("free port each"), "{err}");

    // --stop: snapshot, then the VM is gone.
    let again = env.dir.join("live-snapshot-2");
    let (code, _, err) = env.sm(
        &["snapshot", "--stop", &clone, again.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(again.join("state").is_file());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, ps, _) = env.sm(&["ps", "-q"], None);
        if !String::from_utf8_lossy(&ps).contains(&clone) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM did not stop after snapshot --stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A stopped or unknown VM cannot be snapshotted.
    let (code, _, err) = env.sm(&["snapshot", "no-such-vm", "/tmp/x"], None);
    assert_ne!(code, 0);
    assert!(!err.is_empty());
    env.sm(&["rm", "-f", "live"], None);
}

// ---------- the library API, in this process ----------

/// Tests that drive VMs from this process point the process's store and registry at their
/// own, so they run one at a time.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl RunEnv {
    fn in_process(&self) -> std::sync::MutexGuard<'static, ()> {
        let guard = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("SUPERMACHINE_HOME", self.dir.join("home"));
        std::env::set_var("SUPERMACHINE_RUNTIME_DIR", self.runtime_dir());
        guard
    }

    /// VMs in this test's registry.
    fn registered_vms(&self) -> usize {
        supermachine::vms::Registry::open().unwrap().list().len()
    }

    /// Waits until the registry holds no VM (threads of dropped VMs may take a moment).
    fn wait_until_no_vms(&self, what: &str) {
        let deadline = Instant::now() + HANG_LIMIT;
        while self.registered_vms() > 0 {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// This process's open descriptors, as `fd -> target`.
fn open_fds() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect()
}

/// `GET /` over `stream`; the body.
fn get_body(mut stream: impl Read + std::io::Write) -> String {
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    stream.read_to_string(&mut all).unwrap();
    all.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

#[test]
fn library_vm_runs_commands_moves_files_and_streams() {
    use std::io::{BufRead, Write};
    use supermachine::{Error, Image, VmConfig};
    let env = RunEnv::new("library-vm");
    let _in_process = env.in_process();
    let image = Image::open(&env.image).unwrap();
    let fds_before = open_fds();
    let vm = image
        .start(&VmConfig::new().memory_mib(128).env("FROM_CONFIG", "yes"))
        .unwrap();
    assert!(vm.is_running());
    assert_eq!(env.registered_vms(), 1);

    // output(): status, separate streams, env from the config and the exec, cwd, user.
    let out = vm
        .exec_builder()
        .argv([
            "sh",
            "-c",
            "echo $FROM_CONFIG $FROM_EXEC; pwd; id -u; echo oops >&2; exit 3",
        ])
        .env("FROM_EXEC", "also")
        .cwd("/tmp")
        .user("1234:1234")
        .output()
        .unwrap();
    assert_eq!(out.status.code, 3);
    assert!(!out.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "yes also\n/tmp\n1234\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // Staged files and stdin.
    let out = vm
        .exec_builder()
        .argv(["sh", "-c", "cat /tmp/staged; tr a-z A-Z"])
        .stage_file("/tmp/staged", "staged\n")
        .stdin("shout\n")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "staged\nSHOUT\n");

    // fork: a clone starts with this VM's files and goes its own way.
    vm.write_file("/tmp/forked", b"from-source").unwrap();
    let clones = vm.fork(1, &VmConfig::new().name("libclone")).unwrap();
    assert_eq!(clones[0].name(), "libclone-1");
    assert_eq!(clones[0].read_file("/tmp/forked").unwrap(), b"from-source");
    clones[0].write_file("/tmp/forked", b"changed").unwrap();
    assert_eq!(vm.read_file("/tmp/forked").unwrap(), b"from-source");
    for clone in clones {
        clone.kill();
    }

    // A timeout kills the command and says so; the VM goes on.
    let started = Instant::now();
    let e = vm
        .exec_builder()
        .argv(["sleep", "600"])
        .timeout(Duration::from_secs(2))
        .output()
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(300), "not killed");
    assert!(vm.exec_builder().argv(["true"]).output().unwrap().success());

    // spawn(): streaming stdin and stdout, then a signal.
    let mut child = vm.exec_builder().argv(["cat"]).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
    for word in ["one", "two"] {
        writeln!(stdin, "{word}").unwrap();
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{word}\n"));
    }
    stdin.close();
    drop(lines);
    assert_eq!(child.wait().unwrap().code, 0);
    let child = vm.exec_builder().argv(["sleep", "600"]).spawn().unwrap();
    child.signal(15).unwrap();
    let status = child.wait().unwrap();
    assert_eq!((status.code, status.signal), (143, Some(15)));

    // Files both ways, byte-exact; a missing one is the guest's error.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 + i / 977) as u8).collect();
    vm.write_file("/tmp/data.bin", &data).unwrap();
    assert!(vm.read_file("/tmp/data.bin").unwrap() == data);
    let e = vm.read_file("/nonexistent").unwrap_err();
    assert!(matches!(e, Error::Guest(_)), "{e:?}");

    // A server started with exec, reached by a stream and through an exposed host port.
    let out = vm
        .exec_builder()
        .argv(["mkdir", "/tmp/www"])
        .output()
        .unwrap();
    assert!(out.success(), "{out:?}");
    vm.write_file("/tmp/www/index.html", b"from the guest\n")
        .unwrap();
    let server = vm
        .exec_builder()
        .argv(["httpd", "-f", "-p", "8080", "-h", "/tmp/www"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    let stream = loop {
        match vm.connect(8080) {
            Ok(s) => break s,
            Err(e) => {
                assert!(started.elapsed() < HANG_LIMIT, "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(get_body(stream), "from the guest\n");
    let addr = vm.expose_tcp("127.0.0.1:0".parse().unwrap(), 8080).unwrap();
    assert_eq!(
        get_body(std::net::TcpStream::connect(addr).unwrap()),
        "from the guest\n"
    );

    // A snapshot of the running VM starts a copy with the files it had.
    let snap = env.dir.join("live-snapshot");
    vm.snapshot(&snap).unwrap();
    let copy = Image::from_snapshot(&snap)
        .unwrap()
        .start(&VmConfig::new())
        .unwrap();
    assert!(copy.read_file("/tmp/data.bin").unwrap() == data);
    assert_eq!(env.registered_vms(), 2);
    drop(copy);

    drop(server);

    // stop(): the idle VM's init gets SIGTERM; the port closes; the registry forgets it.
    assert_eq!(vm.stop().unwrap(), 143);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "port still open"
    );
    assert_eq!(env.registered_vms(), 0);
    // Everything the two VMs held is released (threads may take a moment to end).
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds().len() > fds_before.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = open_fds().difference(&fds_before).cloned().collect();
    let sockets: String = [
        "/proc/net/unix",
        "/proc/net/tcp",
        "/proc/net/tcp6",
        "/proc/net/udp",
        "/proc/net/netlink",
        "/proc/net/packet",
        "/proc/net/raw",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(f).unwrap_or_default())
    .collect::<Vec<_>>()
    .join("");
    let detail: Vec<&str> = left
        .iter()
        .filter_map(|l| l.split("socket:[").nth(1))
        .map(|i| i.trim_end_matches(']'))
        .flat_map(|inode| {
            sockets
                .lines()
                .filter(move |l| l.split_whitespace().any(|w| w == inode))
        })
        .collect();
    assert!(
        left.is_empty(),
        "descriptors left open: {left:?}\n{detail:#?}"
    );

    // The CLI sees a library VM and stops it through its control socket (not by signalling
    // this process, which would end the test).
    let embedded = image
        .start(&VmConfig::new().memory_mib(128).name("embedded"))
        .unwrap();
    let (_, ps, _) = env.sm(&["ps"], None);
    assert!(
        String::from_utf8_lossy(&ps).contains("embedded"),
        "{}",
        String::from_utf8_lossy(&ps)
    );
    let (code, _, err) = env.sm(&["stop", "-t", "5", "embedded"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(embedded.wait().unwrap(), 143);
    // ...and so does a program, through a handle found by name: commands (on a terminal that
    // can be resized; a missing or non-executable command is its own error), files, stop.
    let embedded = image
        .start(&VmConfig::new().memory_mib(128).name("handled"))
        .unwrap();
    let handle = supermachine::VmHandle::find("handled").unwrap();
    assert_eq!(handle.id(), embedded.id());
    assert!(supermachine::VmHandle::list(false)
        .unwrap()
        .iter()
        .any(|i| i.name == "handled" && i.status == supermachine::VmStatus::Running));
    let mut child = handle
        .exec_builder()
        .argv(["sh", "-c", "stty size; read _; stty size"])
        .tty(30, 100)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut tty = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tty.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "30 100");
    child.resize(40, 120).unwrap();
    stdin.write_all(b"\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut tty, &mut rest).unwrap();
    assert!(rest.contains("40 120"), "{rest:?}");
    assert_eq!(child.wait().unwrap().code, 0);
    let e = handle
        .exec_builder()
        .argv(["/no/such"])
        .output()
        .unwrap_err();
    assert!(matches!(e, Error::CommandNotFound(_)), "{e:?}");
    let e = handle
        .exec_builder()
        .argv(["/etc/passwd"])
        .output()
        .unwrap_err();
    assert!(matches!(e, Error::CommandNotExecutable(_)), "{e:?}");
    handle.write_file("/tmp/via-handle", b"handled").unwrap();
    assert_eq!(embedded.read_file("/tmp/via-handle").unwrap(), b"handled");
    let e = handle.write_file("/tmp", b"x").unwrap_err();
    assert!(matches!(e, Error::IsADirectory(_)), "{e:?}");
    let e = handle.clone().remove(false).unwrap_err();
    assert!(matches!(e, Error::VmRunning(_)), "{e:?}");
    // Stats: the guest's memory as its kernel counts it, the host process's.
    let stats = handle.stats().unwrap();
    let guest = stats.guest.expect("a running VM's guest counters");
    assert!(
        guest.memory_total > 64 << 20 && guest.memory_total <= 128 << 20,
        "{guest:?}"
    );
    assert!(guest.memory_used > 0 && guest.memory_used < guest.memory_total);
    assert!(stats.host_rss > 0 && stats.host_pss > 0, "{stats:?}");
    // Paused: the handle sees it, files are refused; unpaused, they work again.
    embedded.pause().unwrap();
    assert!(handle.is_paused() && handle.is_running());
    assert_eq!(handle.stats().unwrap().guest, None);
    let e = handle.write_file("/tmp/while-paused", b"x").unwrap_err();
    assert!(matches!(e, Error::VmPaused(_)), "{e:?}");
    // A snapshot of a paused VM works and leaves it paused.
    embedded.snapshot(env.dir.join("paused-snap")).unwrap();
    assert!(handle.is_paused());
    handle.unpause().unwrap();
    assert!(!handle.is_paused());
    handle.write_file("/tmp/after-pause", b"y").unwrap();
    // A paused VM is unpaused to hear its stop signal (143: SIGTERM, not a power-off).
    handle.pause().unwrap();
    handle.stop(Duration::from_secs(5)).unwrap();
    assert!(!handle.is_running());
    assert_eq!(embedded.wait().unwrap(), 143);
    let e = supermachine::VmHandle::find("no-such-vm").unwrap_err();
    assert!(matches!(e, Error::VmNotFound(_)), "{e:?}");

    // A missing image is its own error.
    let e = Image::open("oci:/nonexistent/layout:latest").unwrap_err();
    assert!(
        matches!(e, Error::ImageNotFound(_) | Error::Image(_)),
        "{e:?}"
    );
}

#[test]
fn library_pool_gives_fresh_vms_and_leaks_none() {
    use supermachine::{Error, Image, VmConfig};
    let env = RunEnv::new("library-pool");
    let _in_process = env.in_process();
    let image = Image::open(&env.image).unwrap();
    let pool = image
        .pool()
        .config(VmConfig::new().memory_mib(128))
        .min(2)
        .max(4)
        .build()
        .unwrap();

    // 20 users one after another: none sees the one before's file.
    for round in 0..20 {
        let vm = pool.acquire().unwrap();
        assert!(
            vm.read_file("/tmp/owner").is_err(),
            "round {round}: another user's file is there"
        );
        vm.write_file("/tmp/owner", round.to_string().as_bytes())
            .unwrap();
        let out = vm
            .exec_builder()
            .argv(["cat", "/tmp/owner"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), round.to_string());
    }

    // 8 threads share the 4 VMs.
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || {
                    for round in 0..3 {
                        let vm = pool.acquire().unwrap();
                        assert!(vm.read_file("/tmp/owner").is_err(), "{t}.{round}: leaked");
                        vm.write_file("/tmp/owner", b"x").unwrap();
                        let out = vm.exec_builder().argv(["true"]).output().unwrap();
                        assert!(out.success());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });

    // Afterwards: nothing in use, and the registry holds exactly the idle VMs.
    let stats = pool.settle(HANG_LIMIT);
    assert_eq!(
        (stats.in_use, stats.restoring, stats.stopping),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!((2..=4).contains(&stats.idle), "{stats:?}");
    assert_eq!(stats.acquired, 20 + 8 * 3);
    assert_eq!(env.registered_vms(), stats.idle, "{stats:?}");

    // Exhausted: all four held, the fifth waits and gives up with a clear error.
    let held: Vec<_> = (0..4).map(|_| pool.acquire().unwrap()).collect();
    let e = pool.acquire_timeout(Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, Error::PoolExhausted { max: 4, .. }), "{e:?}");
    drop(held);
    let stats = pool.settle(HANG_LIMIT);
    assert_eq!(env.registered_vms(), stats.live(), "{stats:?}");

    drop(pool);
    env.wait_until_no_vms("VMs left after the pool was dropped");
}

#[test]
fn tokio_wrappers_drive_vms_and_a_pool_without_stalling_the_executor() {
    use std::sync::{Arc, Mutex};
    use supermachine::tokio::{Exec, Pool, Vm};
    use supermachine::VmConfig;
    let env = RunEnv::new("library-tokio");
    let _in_process = env.in_process();
    // One executor thread: a call that blocked it would hold every other task up.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let image = supermachine::tokio::open(&env.image).await.unwrap();
        let vm = Arc::new(
            Vm::start(&image, &VmConfig::new().memory_mib(128))
                .await
                .unwrap(),
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let slow = {
            let (vm, order) = (vm.clone(), order.clone());
            tokio::spawn(async move {
                let out = vm.exec(Exec::new(["sleep", "5"])).await.unwrap();
                assert!(out.success(), "{out:?}");
                order.lock().unwrap().push("slow");
            })
        };
        let quick = {
            let (vm, order) = (vm.clone(), order.clone());
            tokio::spawn(async move {
                vm.write_file("/tmp/a", "async").await.unwrap();
                let out = vm
                    .exec(Exec::new(["sh", "-c", "cat /tmp/a; echo -n $X"]).env("X", "!"))
                    .await
                    .unwrap();
                assert_eq!(out.stdout, b"async!");
                assert_eq!(vm.read_file("/tmp/a").await.unwrap(), b"async");
                order.lock().unwrap().push("quick");
            })
        };
        quick.await.unwrap();
        slow.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["quick", "slow"]);
        let e = vm
            .exec(Exec::new(["sleep", "600"]).timeout(Duration::from_secs(2)))
            .await
            .unwrap_err();
        assert!(matches!(e, supermachine::Error::Timeout { .. }), "{e:?}");
        let vm = Arc::try_unwrap(vm).unwrap();
        assert_eq!(vm.stop().await.unwrap(), 143);

        // A pool of 2 serving 4 concurrent tasks, each on a fresh VM.
        let pool = Pool::build(
            image
                .pool()
                .config(VmConfig::new().memory_mib(128))
                .min(1)
                .max(2),
        )
        .await
        .unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let vm = pool.acquire().await.unwrap();
                    assert!(vm.read_file("/tmp/owner").await.is_err(), "{t}: leaked");
                    vm.write_file("/tmp/owner", "x").await.unwrap();
                    let out = vm.exec(Exec::new(["true"])).await.unwrap();
                    assert!(out.success());
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let stats = pool.blocking().settle(HANG_LIMIT);
        assert_eq!((stats.acquired, stats.in_use), (4, 0), "{stats:?}");
    });
    drop(rt);
    env.wait_until_no_vms("VMs left after the pool was dropped");
}

/// Runs `cargo run --example NAME -- IMAGE` (built by `cargo xtask test`); its stdout.
fn run_example(env: &RunEnv, name: &str) -> String {
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        exe.is_file(),
        "{} is missing: build it with `cargo build -p supermachine --examples` (cargo xtask test does)",
        exe.display()
    );
    let out = Command::new(&exe)
        .arg(&env.image)
        .env("SUPERMACHINE_HOME", env.dir.join("home"))
        .env("SUPERMACHINE_RUNTIME_DIR", env.runtime_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn examples_run_against_real_vms() {
    let env = RunEnv::new("examples");
    assert_eq!(
        run_example(&env, "sandbox"),
        "hello, sandbox\nstaged file\nFROM STDIN\ntimed out after 1s\nexit status 143\n"
    );
    let pool = run_example(&env, "pool");
    for worker in 0..4 {
        for job in 0..5 {
            assert!(
                pool.contains(&format!("job {worker}.{job} -> {}\n", worker * 10 + job)),
                "{pool}"
            );
        }
    }
    assert!(
        pool.contains("jobs seen another job's file: 0; acquired 20"),
        "{pool}"
    );
    let server = run_example(&env, "server");
    assert!(server.contains(": served from a snapshot\n"), "{server}");
    assert!(
        server.contains("through a stream: served from a snapshot\n"),
        "{server}"
    );
}

// ---- Networking ---------------------------------------------------------------------------

/// The bytes `/big` serves: a pattern that is not periodic in any small window.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An HTTP/1.0 server on the host's loopback (what the guest reaches at 10.0.2.2): `/big`
/// is `body`, anything else `hello from the host\n`. Counts accepted connections; connections
/// to `/hold` are kept open until the server is dropped.
struct HostHttp {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HostHttp {
    fn start(body: Vec<u8>) -> HostHttp {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let body = Arc::new(body);
        let (a, st) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !st.load(Ordering::SeqCst) {
                let (mut conn, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                a.fetch_add(1, Ordering::SeqCst);
                conn.set_nonblocking(false).ok();
                let body = body.clone();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    use std::io::{BufRead, Write};
                    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    if path == "/hold" {
                        let _ = tx.send(conn);
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        match reader.read_line(&mut h) {
                            Ok(0) | Err(_) => break,
                            Ok(_) if h == "\r\n" || h == "\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let small = b"hello from the host\n".to_vec();
                    let data: &[u8] = if path == "/big" { &body } else { &small };
                    let _ = write!(
                        conn,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                        data.len()
                    );
                    let _ = conn.write_all(data);
                });
                if let Ok(c) = rx.recv_timeout(Duration::from_secs(5)) {
                    held.push(c);
                }
            }
        });
        HostHttp {
            port,
            accepted,
            stop,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HostHttp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A read-only TFTP server (RFC 1350, 512-byte blocks) on the host's loopback serving
/// `data` under any name: UDP both ways, with the guest acknowledging every block.
fn host_tftp(data: Vec<u8>) -> u16 {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            return;
        };
        if n < 2 || buf[1] != 1 {
            return;
        }
        // Each transfer gets its own port (the TID), as the protocol says.
        let t = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let blocks = data.len() / 512 + 1;
        for block in 1..=blocks {
            let chunk = &data[(block - 1) * 512..(block * 512).min(data.len())];
            let mut packet = vec![0, 3, (block >> 8) as u8, block as u8];
            packet.extend_from_slice(chunk);
            let mut acked = false;
            for _ in 0..10 {
                t.send_to(&packet, peer).unwrap();
                if let Ok((n, _)) = t.recv_from(&mut buf) {
                    if n >= 4
                        && buf[1] == 4
                        && usize::from(buf[2]) << 8 | usize::from(buf[3]) == block & 0xffff
                    {
                        acked = true;
                        break;
                    }
                }
            }
            if !acked {
                return;
            }
        }
    });
    port
}

/// Runs `supermachine ARGS` in its own mount namespace where `/etc/hosts` is `hosts`: the
/// host resolver (which the guest's DNS server asks) then knows names no other process sees.
fn run_with_hosts(env: &RunEnv, hosts: &str, args: &[&str]) -> (i32, Vec<u8>, String) {
    let file = env.dir.join("hosts");
    std::fs::write(&file, hosts).unwrap();
    let file = file.to_string_lossy().into_owned();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    env.command_wrapped(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"mount --bind "$0" /etc/hosts && exec "$@""#,
            &file,
        ],
        &[],
        &all,
        None,
    )
}

#[test]
fn user_network_reaches_the_host_loopback_over_tcp_udp_and_dns() {
    let env = RunEnv::new("net-user");
    let big = pattern(100 << 20);
    let big_sha = sha256_hex(&big);
    let http = HostHttp::start(big);
    let tftp_data = pattern(300_000);
    let tftp_sha = sha256_hex(&tftp_data);
    let tftp = host_tftp(tftp_data);
    let script = format!(
        "ip addr show eth0 | grep -o 'inet [0-9./]*'; \
         wget -q -O - http://10.0.2.2:{p}/big | sha256sum | cut -d' ' -f1; \
         tftp -g -r file -l /tmp/t 10.0.2.2 {tftp} && sha256sum /tmp/t | cut -d' ' -f1; \
         nslookup sm-host.test 2>&1 | grep -A9 '^Name' | grep '^Address' | head -1 | awk '{{print $NF}}'; \
         wget -q -O - http://sm-host.test:{p}/small",
        p = http.port
    );
    // The host's loopback is closed by default: this test opens all of it (TFTP answers
    // from a fresh port).
    let (code, out, err) = run_with_hosts(
        &env,
        "127.0.0.1 localhost\n127.0.0.1 sm-host.test\n",
        &["--egress", "allow-all", &env.image, "sh", "-c", &script],
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "inet 10.0.2.15/24",
            big_sha.as_str(),
            tftp_sha.as_str(),
            "10.0.2.2",
            "hello from the host",
        ],
        "{err}"
    );
}

#[test]
fn egress_policy_decides_each_flow_and_none_leaves_only_lo() {
    let env = RunEnv::new("net-policy");
    let open = HostHttp::start(Vec::new());
    let other = HostHttp::start(Vec::new());
    let get = |port: u16| {
        // (No -T: busybox 1.35's wget crashes on a refused connection with it.)
        format!("wget -q -O - http://10.0.2.2:{port}/small 2>/dev/null || echo refused {port}")
    };
    let script = format!(
        "{}; {}; nslookup sm-private.test 2>&1 | grep -A9 '^Name' | grep -c '^Address'",
        get(open.port),
        get(other.port)
    );
    let hosts = "127.0.0.1 localhost\n192.168.77.1 sm-private.test\n";
    // The default (public internet only): the host's loopback and private answers are out
    // of reach.
    let (_, out, err) = run_with_hosts(&env, hosts, &[&env.image, "sh", "-c", &script]);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains(&format!("refused {}", open.port)),
        "{out}\n{err}"
    );
    assert!(
        out.contains(&format!("refused {}", other.port)),
        "{out}\n{err}"
    );
    assert!(!out.contains("hello from the host"), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("0"),
        "a private address was answered: {out}"
    );
    assert_eq!((open.accepted(), other.accepted()), (0, 0));
    // allow-host opens exactly the listed port of the host's loopback; private names stay
    // unanswered.
    let allow_host = format!("allow-host:{}", open.port);
    let (_, out, err) = run_with_hosts(
        &env,
        hosts,
        &["--egress", &allow_host, &env.image, "sh", "-c", &script],
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(
        out,
        format!("hello from the host\nrefused {}\n0\n", other.port),
        "{err}"
    );
    assert_eq!((open.accepted(), other.accepted()), (1, 0));
    // An allow-list admits exactly the listed port.
    let allow = format!("allow:127.0.0.1/32:{}", open.port);
    let (_, out, err) = run_with_hosts(
        &env,
        hosts,
        &["--egress", &allow, &env.image, "sh", "-c", &script],
    );
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("hello from the host\n"), "{out}\n{err}");
    assert!(
        out.contains(&format!("refused {}", other.port)),
        "{out}\n{err}"
    );
    assert_eq!((open.accepted(), other.accepted()), (2, 0));
    // With allow-all both answer, and the private name resolves.
    let (_, out, err) = run_with_hosts(
        &env,
        hosts,
        &["--egress", "allow-all", &env.image, "sh", "-c", &script],
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(
        out, "hello from the host\nhello from the host\n1\n",
        "{err}"
    );
    // No network: only lo, and --egress none means the same.
    for flags in [["--network", "none"], ["--egress", "none"]] {
        let (code, out, err) = env.run(
            &[flags[0], flags[1], &env.image, "ls", "/sys/class/net"],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(String::from_utf8_lossy(&out), "lo\n", "{flags:?}");
    }
    // Bad policies are refused before anything starts.
    for bad in ["allow:10.0.0.1/8", "deny-everything", "allow:"] {
        let (code, _, err) = env.run(&["--egress", bad, &env.image, "true"], None);
        assert_eq!(code, 125, "{bad}: {err}");
        assert!(
            err.contains("--egress") || err.contains(bad.trim_start_matches("allow:")),
            "{bad}: {err}"
        );
    }
}

/// A server on the host's loopback that accepts every connection and keeps it open until the
/// client closes it; counts them.
fn host_holder() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut held: Vec<std::net::TcpStream> = Vec::new();
        while started.elapsed() < HANG_LIMIT {
            while let Ok((c, _)) = listener.accept() {
                c.set_nonblocking(true).ok();
                count.fetch_add(1, Ordering::SeqCst);
                held.push(c);
            }
            let mut buf = [0u8; 256];
            held.retain_mut(|c| match c.read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (port, accepted)
}

#[test]
fn a_guest_flooding_the_nat_hits_the_flow_limit_and_the_host_keeps_serving() {
    let env = RunEnv::new("net-flood");
    let http = HostHttp::start(Vec::new());
    let (hold_port, held) = host_holder();
    // 600 connections the host keeps open: more than the NAT's 512 TCP flows. Once they are
    // closed, the NAT serves new flows again.
    let script = format!(
        "mkfifo /tmp/idle; exec 3<>/tmp/idle; \
         for i in $(seq 1 600); do nc 10.0.2.2 {hold_port} </tmp/idle >/dev/null 2>&1 & done; \
         sleep 10; \
         wget -q -O - http://10.0.2.2:{p}/small >/dev/null 2>&1 || echo refused while full; \
         killall nc; sleep 5; \
         wget -q -O - http://10.0.2.2:{p}/small || echo no-answer",
        p = http.port
    );
    let (code, out, err) = env.run(
        &[
            "--memory",
            "1g",
            "--egress",
            "allow-all",
            &env.image,
            "sh",
            "-c",
            &script,
        ],
        None,
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("512 TCP flows open, the limit"),
        "no flow-limit line:\n{err}"
    );
    let held = held.load(std::sync::atomic::Ordering::SeqCst);
    assert!((400..=512).contains(&held), "{held} host connections");
    assert_eq!(out, "refused while full\nhello from the host\n", "{err}");
}

#[test]
fn tap_network_attaches_an_existing_tap_device() {
    let env = RunEnv::new("net-tap");
    let www = env.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello over tap\n").unwrap();
    // A network namespace of its own: the TAP device, its host address and a web server
    // there, nothing that touches the test host's own network.
    let setup = format!(
        "ip link set lo up && ip tuntap add dev smtap0 mode tap && \
         ip addr add 10.0.2.2/24 dev smtap0 && ip link set smtap0 up && \
         busybox httpd -p 10.0.2.2:8080 -h {} && exec \"$0\" \"$@\"",
        www.display()
    );
    let (code, out, err) = env.command_wrapped(
        &["unshare", "--net", "sh", "-c", &setup],
        &[],
        &[
            "run",
            "--network",
            "tap:smtap0",
            &env.image,
            "wget",
            "-q",
            "-O",
            "-",
            "http://10.0.2.2:8080/index.html",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "hello over tap\n");
    // Egress policies are the NAT's: with a TAP device they are refused up front.
    let (code, _, err) = env.run(
        &[
            "--network",
            "tap:smtap0",
            "--egress",
            "deny-private",
            &env.image,
            "true",
        ],
        None,
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("--network user"), "{err}");
}

// ---- Shared host directories (virtio-fs) ----------------------------------------------------

#[test]
fn a_shared_host_directory_is_live_both_ways_confined_and_read_only_on_request() {
    use std::os::unix::fs::PermissionsExt;
    let env = RunEnv::new("share");
    // On the test host's own filesystem (not its 9p share of the build tree).
    let base = std::env::temp_dir().join(format!("sm-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(base.join("outside.txt"), "SECRET\n").unwrap();
    std::fs::write(dir.join("from-host.txt"), "v1\n").unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("hostetc")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", dir.join("up")).unwrap();
    // The host answers the guest's file with an edit of its own, while the guest waits.
    let watcher = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            // The file appears at the guest's open, its line at the guest's write.
            let mut seen = String::new();
            while !seen.ends_with('\n') {
                assert!(
                    started.elapsed() < HANG_LIMIT,
                    "the guest's line never appeared"
                );
                std::thread::sleep(Duration::from_millis(50));
                seen = std::fs::read_to_string(dir.join("from-guest.txt")).unwrap_or_default();
            }
            std::fs::write(dir.join("from-host.txt"), "v2 edited on the host\n").unwrap();
            std::fs::write(dir.join("host-edit.txt"), "new on the host\n").unwrap();
            seen
        })
    };
    let script = "cat /data/from-host.txt; \
         echo 'written in the guest' > /data/from-guest.txt; sync; \
         for i in $(seq 1 120); do [ -f /data/host-edit.txt ] && break; sleep 1; done; sleep 2; \
         cat /data/host-edit.txt /data/from-host.txt; \
         readlink /data/hostetc; cat /data/hostetc/hostname; \
         cat /data/up 2>/dev/null || echo 'up: not reachable'";
    let share = format!("{}:/data", dir.display());
    let (code, out, err) = env.run(
        &[
            "-v",
            &share,
            "--hostname",
            "sm-guest-x",
            &env.image,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        out, "v1\nnew on the host\nv2 edited on the host\n/etc\nsm-guest-x\nup: not reachable\n",
        "{err}"
    );
    assert_eq!(watcher.join().unwrap(), "written in the guest\n");
    // Guest root cannot make device nodes or setuid files on the host by default; the
    // `special` option allows both.
    let special_script = "mknod /data/null-$1 c 1 3 && echo made || echo refused; \
         echo x > /data/suid-$1 && chmod 6755 /data/suid-$1";
    for (options, suffix) in [("", "default"), (":special", "special")] {
        let share = format!("{}:/data{options}", dir.display());
        let (code, out, err) = env.run(
            &[
                "-v",
                &share,
                &env.image,
                "sh",
                "-c",
                special_script,
                "sh",
                suffix,
            ],
            None,
        );
        let out = String::from_utf8_lossy(&out);
        assert_eq!(code, 0, "{out}\n{err}");
        let mode = std::fs::metadata(dir.join(format!("suid-{suffix}")))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        let node = dir.join(format!("null-{suffix}"));
        if options.is_empty() {
            assert_eq!(out, "refused\n", "{err}");
            assert!(!node.exists());
            assert_eq!(mode, 0o755);
        } else {
            assert_eq!(out, "made\n", "{err}");
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::metadata(&node)
                .unwrap()
                .file_type()
                .is_char_device());
            assert_eq!(mode, 0o6755);
            std::fs::remove_file(&node).unwrap();
        }
    }
    // Read-only: writes fail in the guest and nothing changes on the host.
    let ro = format!("{}:/data:ro", dir.display());
    let (code, out, err) = env.run(
        &[
            "-v",
            &ro,
            &env.image,
            "sh",
            "-c",
            "cat /data/host-edit.txt; echo x > /data/new.txt || echo refused; \
             rm /data/from-host.txt || echo refused; mkdir /data/d || echo refused",
        ],
        None,
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "new on the host\nrefused\nrefused\nrefused\n", "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!dir.join("new.txt").exists() && !dir.join("d").exists());
    assert!(dir.join("from-host.txt").exists());
    std::fs::remove_dir_all(&base).unwrap();
}
