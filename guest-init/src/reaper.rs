//! The one place PID 1 waits for children. Orphans reparented to init are reaped and dropped;
//! processes started through [`spawn`] get their status on a channel. A single reaper is
//! needed because `waitpid(-1)` in one thread would steal another thread's child.

use std::collections::BTreeMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, Once};

/// Children someone waits for, by pid.
static WAITERS: Mutex<BTreeMap<libc::pid_t, Sender<i32>>> = Mutex::new(BTreeMap::new());
/// Signalled on every spawn, so an idle reaper (no children: ECHILD) wakes up.
static SPAWNED: Condvar = Condvar::new();
static START: Once = Once::new();
/// Counts spawns (changed under the `WAITERS` lock), so the reaper never sleeps past one.
static SPAWNS: AtomicU64 = AtomicU64::new(0);

/// The status as a shell reports it: the exit code, or 128 + the signal that killed it.
pub fn shell_status(raw: i32) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        guest_init::EXIT_INIT_FAILED
    }
}

/// Starts `cmd`; its raw wait status arrives on the receiver when it exits. (Never call
/// `Child::wait` on the result: the reaper owns waiting.)
pub fn spawn(cmd: &mut Command) -> io::Result<(Child, Receiver<i32>)> {
    START.call_once(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .expect("init cannot start its reaper thread");
    });
    // Holding the lock across the spawn: the reaper cannot look the pid up before it is
    // registered, however fast the child exits.
    let mut waiters = WAITERS.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    let (tx, rx) = channel();
    waiters.insert(child.id() as libc::pid_t, tx);
    SPAWNS.fetch_add(1, Ordering::SeqCst);
    drop(waiters);
    SPAWNED.notify_all();
    Ok((child, rx))
}

fn reap_forever() {
    loop {
        let spawns = SPAWNS.load(Ordering::SeqCst);
        // Look before reaping (WNOWAIT): std's `Command::spawn` reaps a child whose exec
        // failed itself, and asserts that it can. Reaping such a child here first made that
        // assertion panic the spawning thread (an exec of a missing program then ended its
        // agent connection without a reply). The child is reaped below only after the
        // `WAITERS` lock, which a spawn in progress holds, says it is not being spawned.
        // SAFETY: a zeroed siginfo_t is a valid out-buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid out-pointer.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc < 0 {
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // No children at all: nothing can be reparented to us either, so sleep until
                // the next spawn.
                let mut w = WAITERS.lock().unwrap_or_else(|e| e.into_inner());
                while SPAWNS.load(Ordering::SeqCst) == spawns {
                    w = SPAWNED.wait(w).unwrap_or_else(|e| e.into_inner());
                }
            }
            continue;
        }
        // SAFETY: waitid filled `info` for an exited child.
        let pid = unsafe { info.si_pid() };
        let mut waiters = WAITERS.lock().unwrap_or_else(|e| e.into_inner());
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer. Under the lock no spawn is in progress;
        // ECHILD means that spawn's own wait took the child (its exec failed).
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        let tx = waiters.remove(&pid);
        drop(waiters);
        if reaped == pid {
            if let Some(tx) = tx {
                let _ = tx.send(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_exec_is_an_error_while_other_children_come_and_go() {
        // Children exiting all the time keep the reaper in waitid when an exec fails.
        let churn = std::thread::spawn(|| {
            for _ in 0..300 {
                let (_, exited) = spawn(&mut Command::new("/bin/true")).unwrap();
                assert_eq!(shell_status(exited.recv().unwrap()), 0);
            }
        });
        for _ in 0..300 {
            // As the agent's commands do (start_as): with a pre_exec hook std forks and execs
            // itself, then waits for a child whose exec failed.
            let mut missing = Command::new("/no/such/program");
            // SAFETY: the hook does nothing, so it is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut missing, || Ok(()));
            }
            let e = spawn(&mut missing).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
        }
        churn.join().unwrap();
        // A slow child's status still arrives.
        let (_, exited) = spawn(Command::new("/bin/sh").args(["-c", "sleep 0.2; exit 3"])).unwrap();
        assert_eq!(shell_status(exited.recv().unwrap()), 3);
    }
}
