//! A private image store and VM registry per test, shared by the load and restore tests
//! (included with `#[path]`; each uses a part of it).

use std::process::{Command, Stdio};

/// A private image store and VM registry for one test; its VMs are removed at the end.
pub struct Env {
    /// Where its store, registry and scratch files live.
    pub dir: std::path::PathBuf,
}

impl Env {
    pub fn new(name: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("sm-load-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Env { dir }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_supermachine"));
        c.args(args)
            .env("SUPERMACHINE_HOME", self.dir.join("home"))
            .env("SUPERMACHINE_RUNTIME_DIR", self.dir.join("run"));
        c
    }

    /// Runs a supermachine command to its end: (status, stdout, stderr).
    pub fn sm(&self, args: &[&str]) -> (i32, String, String) {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run supermachine");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !err.contains("could not emulate"),
            "this machine's KVM cannot boot Linux; run `cargo xtask test`:\n{err}"
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            err,
        )
    }

    /// `run -d` of `image` with `args`; the VM's id.
    #[allow(dead_code)]
    pub fn detached(&self, args: &[&str]) -> String {
        let mut all = vec!["run", "-d"];
        all.extend_from_slice(args);
        let (code, out, err) = self.sm(&all);
        assert_eq!(code, 0, "run -d failed: {err}");
        out.trim().to_string()
    }

    /// After the load: the VM is running, answers `exec`, and its logs say nothing failed.
    #[allow(dead_code)]
    pub fn assert_alive(&self, id: &str) {
        let (code, out, err) = self.sm(&["exec", id, "echo", "still-here"]);
        let (_, logs, log_err) = self.sm(&["logs", id]);
        assert!(
            code == 0 && out.trim() == "still-here",
            "exec after the load failed ({code}): {out}{err}\nlogs:\n{logs}{log_err}"
        );
        let (_, ps, _) = self.sm(&["ps", "-a"]);
        let line = ps.lines().find(|l| l.starts_with(id)).unwrap_or("");
        assert!(line.contains("running"), "ps after the load:\n{ps}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let (_, ids, _) = self.sm(&["ps", "-a", "-q"]);
        for id in ids.split_whitespace() {
            self.sm(&["rm", "-f", id]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
