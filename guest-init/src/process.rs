//! Starting processes in the container, for the workload and for every exec: who they run as
//! (Docker's `--user` forms resolved against the image's passwd and group files), their
//! environment, session and terminal, and the small I/O helpers both paths share.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What an exec inherits from the container when the request does not say.
#[derive(Clone)]
pub struct ExecDefaults {
    /// The container's environment (image env and `-e`), before the request's.
    pub env: Vec<String>,
    /// The workload's working directory.
    pub workdir: String,
    /// The workload's user, as Docker spells it.
    pub user: String,
    /// The container's host name.
    pub hostname: String,
}

/// A resolved identity.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Resolves Docker's `--user` forms against passwd and group file contents.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let users: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 7)
        .collect();
    let groups: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 4)
        .collect();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = users
        .iter()
        .find(|f| f[0] == user_part || (user_part.parse::<u32>().is_ok() && f[2] == user_part));
    let uid = match (user_part.parse::<u32>(), entry) {
        (Ok(n), _) => n,
        (Err(_), Some(f)) => f[2]
            .parse()
            .map_err(|_| format!("bad uid for user {user_part} in /etc/passwd"))?,
        (Err(_), None) => {
            return Err(format!(
                "unable to find user {user_part}: no matching entries in passwd file"
            ))
        }
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
        None => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let name = entry.map(|f| f[0]).unwrap_or("");
    let mut supplementary: Vec<u32> = if group_part.is_none() && !name.is_empty() {
        groups
            .iter()
            .filter(|f| f[3].split(',').any(|m| m == name))
            .filter_map(|f| f[2].parse().ok())
            .collect()
    } else {
        Vec::new()
    };
    supplementary.retain(|g| *g != gid);
    supplementary.insert(0, gid);
    let home = entry
        .map(|f| f[5].to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

/// The environment of a process in the container: defaults, then `entries` (`KEY=value`; a
/// later entry overrides an earlier one).
pub fn workload_env<'a>(
    hostname: &str,
    home: &str,
    tty: bool,
    entries: impl Iterator<Item = &'a String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    };
    set("PATH", DEFAULT_PATH);
    set("HOSTNAME", hostname);
    set("HOME", home);
    if tty {
        set("TERM", "xterm");
    }
    for kv in entries {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        if !k.is_empty() {
            set(k, v);
        }
    }
    env
}

/// Makes `cmd` start as `id`: in a session of its own with stdin as its controlling terminal
/// (`tty`), or else in a process group of its own, so signals can go to the whole group.
pub fn start_as(cmd: &mut Command, id: &Identity, tty: bool) {
    let (uid, gid, groups) = (id.uid, id.gid, id.groups.clone());
    // SAFETY: only async-signal-safe calls (setsid, setpgid, ioctl, setgroups, setgid, setuid).
    unsafe {
        cmd.pre_exec(move || {
            if tty {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 1);
            } else {
                libc::setpgid(0, 0);
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets the terminal's size; the kernel sends SIGWINCH to its foreground process group.
pub fn set_window_size(terminal: &File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on a terminal we own.
    unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Copies until end-of-file or an error, then calls `done` (e.g. to pass the half-close on).
pub fn copy_then_shutdown(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    done();
}

/// A pipe whose ends close on exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pipe as two files (read end, write end).
pub fn file_pipe() -> io::Result<(File, File)> {
    let (r, w) = pipe()?;
    Ok((File::from(r), File::from(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:alice\nalice:x:1000:\nwheel:x:10:bob,alice\n";

    #[test]
    fn resolves_docker_user_forms() {
        let r = |s| resolve_user(s, PASSWD, GROUP);
        assert_eq!(
            r("").unwrap(),
            Identity {
                uid: 0,
                gid: 0,
                groups: vec![0],
                home: "/root".into()
            }
        );
        let alice = r("alice").unwrap();
        assert_eq!(
            (alice.uid, alice.gid, alice.home.as_str()),
            (1000, 1000, "/home/alice")
        );
        assert_eq!(alice.groups, vec![1000, 100, 10]);
        assert_eq!(r("1000").unwrap().gid, 1000);
        let n = r("1234:5678").unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (1234, 5678, "/"));
        assert_eq!(r("alice:wheel").unwrap().gid, 10);
        assert!(r("mallory")
            .unwrap_err()
            .contains("unable to find user mallory"));
        assert!(r("alice:nogroup")
            .unwrap_err()
            .contains("unable to find group"));
    }
}
