//! The registry of VMs on this host, for `ps`, `exec`, `logs`, `stop`, `rm`: one directory
//! per VM under the per-user runtime directory, holding its record (`vm.json`), its vsock
//! Unix socket and its logs. Names are reserved atomically by a symlink `names/NAME → ID`.
//!
//! A VM counts as running while the process that runs it is alive (checked by pid *and* the
//! process's start time, so a reused pid does not look like the VM).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmRegistryError {
    /// The name is taken.
    #[error(
        "the name {name:?} is already used by VM {id} (remove it with `supermachine rm {name}`)"
    )]
    NameInUse {
        /// The name.
        name: String,
        /// The VM that has it.
        id: String,
    },
    /// A name with characters Docker would not accept.
    #[error("invalid VM name {0:?}: use letters, digits, '_', '.', '-' (starting with a letter or digit)")]
    BadName(String),
    /// No VM by that name or id.
    #[error("no such VM: {0}")]
    NotFound(String),
    /// An id prefix that matches several VMs.
    #[error("{0:?} matches more than one VM; give more of the id")]
    Ambiguous(String),
    /// A directory of the registry that another user could have made or could change: it is
    /// not used, since whoever controls it can read the VMs' logs and stand in for their
    /// sockets.
    #[error(
        "{path}: {why}; refusing to use it as the VM registry (remove it, or set \
         XDG_RUNTIME_DIR to a private directory)"
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The runtime directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmRegistryError + '_ {
    move |source| VmRegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the registry keeps about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// 12 hex digits.
    pub id: String,
    /// The user's name for it (or a generated one).
    pub name: String,
    /// The image reference as given.
    pub image: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The process running the VM.
    pub pid: u32,
    /// That process's start time (clock ticks since boot), to tell a reused pid apart.
    pub pid_start: u64,
    /// Published ports, as `HOST_IP:HOST_PORT->GUEST_PORT/tcp`.
    pub ports: Vec<String>,
    /// Started with `-d`.
    pub detached: bool,
    /// Remove the record when the VM exits.
    pub auto_remove: bool,
    /// The workload's exit status, once the VM has ended and could say.
    pub exit_code: Option<i32>,
    /// Run by a program through the library: the process is that program's, so the VM is
    /// stopped through its control socket, never by signalling the process.
    #[serde(default)]
    pub embedded: bool,
    /// How often a restart policy has started it again.
    #[serde(default)]
    pub restarts: u32,
}

/// A VM's state as `ps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStatus {
    /// Its process is alive.
    Running,
    /// Its process is alive and its vCPUs are paused (`supermachine pause`).
    Paused,
    /// It ended with this workload status.
    Exited(i32),
    /// Its process is gone without a status (killed).
    Dead,
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmStatus::Running => write!(f, "running"),
            VmStatus::Paused => write!(f, "paused"),
            VmStatus::Exited(c) => write!(f, "exited ({c})"),
            VmStatus::Dead => write!(f, "dead"),
        }
    }
}

/// Start time of `pid` (field 22 of `/proc/PID/stat`), if it exists.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

impl VmStatus {
    /// Its process is alive (running or paused).
    pub fn is_alive(self) -> bool {
        matches!(self, VmStatus::Running | VmStatus::Paused)
    }
}

impl VmRecord {
    /// Running, exited or dead, as the record and the process say (paused is
    /// [`VmDir::status`]'s to tell).
    pub fn status(&self) -> VmStatus {
        if let Some(code) = self.exit_code {
            return VmStatus::Exited(code);
        }
        if process_start(self.pid) == Some(self.pid_start) {
            VmStatus::Running
        } else {
            VmStatus::Dead
        }
    }
}

/// The per-user runtime directory: `$SUPERMACHINE_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/supermachine`, else `/tmp/supermachine-UID` (created 0700; an existing
/// one is used only if it is a real directory of this user's that nobody else can enter).
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SUPERMACHINE_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("supermachine"),
        // SAFETY: getuid has no preconditions.
        None => PathBuf::from(format!("/tmp/supermachine-{}", unsafe { libc::getuid() })),
    }
}

/// The registry rooted at a runtime directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The VM's vsock Unix socket.
    pub fn vsock(&self) -> PathBuf {
        self.path.join("vsock.sock")
    }
    /// The VM process's control socket ([`crate::control`]).
    pub fn control(&self) -> PathBuf {
        self.path.join("control.sock")
    }
    /// The workload's stdout, for detached VMs.
    pub fn stdout_log(&self) -> PathBuf {
        self.path.join("stdout.log")
    }
    /// The workload's stderr (and supermachine's own messages), for detached VMs.
    pub fn stderr_log(&self) -> PathBuf {
        self.path.join("stderr.log")
    }
    /// Present while the VM is paused: made and removed by the VM's own process.
    pub fn paused_marker(&self) -> PathBuf {
        self.path.join("paused")
    }
    /// Running, paused, exited or dead.
    pub fn status(&self, record: &VmRecord) -> VmStatus {
        match record.status() {
            VmStatus::Running if self.paused_marker().exists() => VmStatus::Paused,
            other => other,
        }
    }
    fn record_path(&self) -> PathBuf {
        self.path.join("vm.json")
    }

    /// Reads the record.
    pub fn record(&self) -> Result<VmRecord, VmRegistryError> {
        let p = self.record_path();
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&bytes).map_err(|e| VmRegistryError::Io {
            path: p,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Replaces the record (write, fsync, rename).
    pub fn save(&self, record: &VmRecord) -> Result<(), VmRegistryError> {
        let p = self.record_path();
        let tmp = self.path.join("vm.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
        (|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)
        })()
        .map_err(io(&p))
    }
}

/// Creates `path` (one level, mode 0700) unless it exists, then checks that it is a private
/// directory of `uid`'s: not a symbolic link, owned by `uid`, no permission bits for group or
/// others.
fn private_dir(path: &Path, uid: u32) -> Result<(), VmRegistryError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(path)(e)),
    }
    let unsafe_dir = |why: String| VmRegistryError::UnsafeDirectory {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("it is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(unsafe_dir(format!(
            "it belongs to uid {}, not to you (uid {uid})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {mode:04o} lets other users in (it must be 0700)"
        )));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name.len() <= 128
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n.div_ceil(2)];
    // getrandom cannot fail for small buffers on Linux ≥ 3.17; a failure leaves zeros, and
    // the id is then only as unique as the create_dir below checks.
    // SAFETY: `bytes` is a valid buffer of its length.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()[..n].to_string()
}

impl Registry {
    /// The registry in [`runtime_dir`].
    pub fn open() -> Result<Registry, VmRegistryError> {
        Registry::at(runtime_dir())
    }

    /// The registry at `root` (created, private to the user). An existing `root` (and its
    /// `vms` and `names`) must be a directory, not a symbolic link, owned by this user and
    /// closed to everyone else (no group or other permission bits): anything else is
    /// [`VmRegistryError::UnsafeDirectory`].
    pub fn at(root: PathBuf) -> Result<Registry, VmRegistryError> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        for d in [root.clone(), root.join("vms"), root.join("names")] {
            private_dir(&d, uid)?;
        }
        Ok(Registry { root })
    }

    fn vm_dir(&self, id: &str) -> VmDir {
        VmDir {
            path: self.root.join("vms").join(id),
        }
    }

    /// Reserves a new VM: a fresh id and directory, and `name` (or one made from the id).
    pub fn create(&self, name: Option<&str>) -> Result<(String, String, VmDir), VmRegistryError> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(n) = name {
            if !valid_name(n) {
                return Err(VmRegistryError::BadName(n.into()));
            }
        }
        let (id, dir) = loop {
            let id = random_hex(12);
            let dir = self.vm_dir(&id);
            match std::fs::DirBuilder::new().mode(0o700).create(&dir.path) {
                Ok(()) => break (id, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&dir.path)(e)),
            }
        };
        let name = name
            .map(str::to_string)
            .unwrap_or_else(|| format!("vm-{}", &id[..6]));
        let link = self.root.join("names").join(&name);
        // Reclaiming a dead VM's name is read-check-remove-create: serialised, or two runs
        // taking the name at once could each remove the other's fresh link and both "win".
        let _lock = match self.names_lock() {
            Ok(lock) => lock,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir.path);
                return Err(e);
            }
        };
        loop {
            match std::os::unix::fs::symlink(&id, &link) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_link(&link)
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if self.vm_dir(&holder).path.exists() {
                        let _ = std::fs::remove_dir(&dir.path);
                        return Err(VmRegistryError::NameInUse { name, id: holder });
                    }
                    // The VM that had the name is gone: the name is free again.
                    let _ = std::fs::remove_file(&link);
                }
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir.path);
                    return Err(io(&link)(e));
                }
            }
        }
        Ok((id, name, dir))
    }

    /// Every VM with a readable record, oldest first.
    pub fn list(&self) -> Vec<(VmDir, VmRecord)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("vms")) else {
            return Vec::new();
        };
        let mut all: Vec<(VmDir, VmRecord)> = entries
            .flatten()
            .filter_map(|e| {
                let dir = VmDir { path: e.path() };
                let record = dir.record().ok()?;
                Some((dir, record))
            })
            .collect();
        all.sort_by_key(|(_, r)| (r.created, r.id.clone()));
        all
    }

    /// The VM with this name, id, or unique id prefix.
    pub fn find(&self, name_or_id: &str) -> Result<(VmDir, VmRecord), VmRegistryError> {
        let all = self.list();
        if let Some(found) = all
            .iter()
            .find(|(_, r)| r.name == name_or_id || r.id == name_or_id)
        {
            return Ok(found.clone());
        }
        let mut prefixed = all.iter().filter(|(_, r)| r.id.starts_with(name_or_id));
        match (prefixed.next(), prefixed.next()) {
            (Some(one), None) if !name_or_id.is_empty() => Ok(one.clone()),
            (Some(_), Some(_)) => Err(VmRegistryError::Ambiguous(name_or_id.into())),
            _ => Err(VmRegistryError::NotFound(name_or_id.into())),
        }
    }

    /// The lock that serialises changes to `names/` (held while the returned file is open).
    fn names_lock(&self) -> Result<std::fs::File, VmRegistryError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join("names.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io(&path))?;
        loop {
            // SAFETY: flock on a descriptor owned here; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(file);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io(&path)(e));
            }
        }
    }

    /// Forgets a VM: its directory and its name.
    pub fn remove(&self, dir: &VmDir, id: &str, name: &str) -> Result<(), VmRegistryError> {
        let link = self.root.join("names").join(name);
        {
            let _lock = self.names_lock()?;
            if std::fs::read_link(&link).is_ok_and(|t| t == Path::new(id)) {
                let _ = std::fs::remove_file(&link);
            }
        }
        std::fs::remove_dir_all(&dir.path).map_err(io(&dir.path))
    }

    /// The directory and name reserved for `id` by [`create`](Self::create).
    pub fn reserved(&self, id: &str) -> Result<(String, String, VmDir), VmRegistryError> {
        let dir = self.vm_dir(id);
        if id.is_empty() || id.contains('/') || !dir.path.is_dir() {
            return Err(VmRegistryError::NotFound(id.into()));
        }
        let names = self.root.join("names");
        let name = std::fs::read_dir(&names)
            .map_err(io(&names))?
            .flatten()
            .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(id)))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .ok_or_else(|| VmRegistryError::NotFound(id.into()))?;
        Ok((id.into(), name, dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(name: &str) -> (Registry, PathBuf) {
        let root = std::env::temp_dir().join(format!("sm-vms-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        (Registry::at(root.clone()).unwrap(), root)
    }

    fn record(id: &str, name: &str, pid: u32, pid_start: u64) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            image: "img".into(),
            created: 1,
            pid,
            pid_start,
            ports: vec![],
            detached: true,
            auto_remove: false,
            exit_code: None,
            embedded: false,
            restarts: 0,
        }
    }

    #[test]
    fn names_are_unique_until_the_vm_is_removed() {
        let (reg, root) = registry("names");
        let (id, name, dir) = reg.create(Some("web")).unwrap();
        assert_eq!(name, "web");
        dir.save(&record(&id, "web", 1, 0)).unwrap();
        match reg.create(Some("web")) {
            Err(VmRegistryError::NameInUse { id: holder, .. }) => assert_eq!(holder, id),
            other => panic!("{other:?}"),
        }
        assert_eq!(reg.find("web").unwrap().1.id, id);
        assert_eq!(reg.find(&id[..4]).unwrap().1.name, "web");
        reg.remove(&dir, &id, "web").unwrap();
        assert!(matches!(reg.find("web"), Err(VmRegistryError::NotFound(_))));
        reg.create(Some("web")).unwrap();
        assert!(matches!(
            reg.create(Some("-bad")),
            Err(VmRegistryError::BadName(_))
        ));
        assert!(matches!(
            reg.create(Some("a/b")),
            Err(VmRegistryError::BadName(_))
        ));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_dead_vms_name_goes_to_exactly_one_of_many_racing_runs() {
        let (reg, root) = registry("name-race");
        for round in 0..60 {
            // The name points at a VM that is gone (its directory removed).
            let name = format!("race{round}");
            std::os::unix::fs::symlink("000000000000", root.join("names").join(&name)).unwrap();
            let winners: Vec<bool> = std::thread::scope(|s| {
                let runs: Vec<_> = (0..8)
                    .map(|_| {
                        let reg = Registry::at(root.clone()).unwrap();
                        let name = name.clone();
                        s.spawn(move || match reg.create(Some(&name)) {
                            Ok((id, _, dir)) => {
                                dir.save(&record(&id, &name, 1, 0)).unwrap();
                                true
                            }
                            Err(VmRegistryError::NameInUse { .. }) => false,
                            Err(e) => panic!("{e}"),
                        })
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(
                winners.iter().filter(|&&w| w).count(),
                1,
                "round {round}: {winners:?}"
            );
            // Every VM directory left is the name's holder's: the losers left nothing.
            assert_eq!(reg.list().iter().filter(|(_, r)| r.name == name).count(), 1);
        }
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn status_follows_the_process_and_its_start_time() {
        let (reg, root) = registry("status");
        let me = std::process::id();
        let start = process_start(me).unwrap();
        let (id, _, dir) = reg.create(None).unwrap();
        let mut r = record(&id, "x", me, start);
        dir.save(&r).unwrap();
        assert_eq!(reg.list()[0].1.status(), VmStatus::Running);
        // Same pid, another start time: a reused pid, not our VM.
        r.pid_start = start + 1;
        assert_eq!(r.status(), VmStatus::Dead);
        r.exit_code = Some(3);
        assert_eq!(r.status(), VmStatus::Exited(3));
        std::fs::remove_dir_all(root).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn vm_directories_and_records_are_private() {
        let (reg, root) = registry("private");
        let (id, _, dir) = reg.create(Some("p")).unwrap();
        dir.save(&record(&id, "p", 1, 0)).unwrap();
        for d in [
            root.clone(),
            root.join("vms"),
            root.join("names"),
            dir.path.clone(),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        assert_eq!(mode(&dir.record_path()), 0o600);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_registry_another_user_could_enter_or_swap_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("sm-vms-unsafe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let why = |root: &Path| match Registry::at(root.to_path_buf()) {
            Err(VmRegistryError::UnsafeDirectory { path, why }) => {
                assert_eq!(path, root);
                why
            }
            other => panic!("{}: {other:?}", root.display()),
        };
        // Pre-created world-writable (as another user would leave it in /tmp).
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(why(&open).contains("mode 0777"));
        // Group-readable is as bad: logs are readable.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(why(&open).contains("mode 0750"));
        // A symbolic link to a private directory: whoever made the link can repoint it.
        let real = base.join("real");
        Registry::at(real.clone()).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(why(&link).contains("symbolic link"));
        // A plain file.
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(why(&file).contains("not a directory"));
        // Someone else's (the owner as another uid sees it).
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let other = me.wrapping_add(1);
        let err = private_dir(&real, other).unwrap_err().to_string();
        assert!(
            err.contains(&format!("belongs to uid {me}, not to you (uid {other})")),
            "{err}"
        );
        // A swapped subdirectory is caught too.
        std::fs::set_permissions(real.join("vms"), std::fs::Permissions::from_mode(0o777)).unwrap();
        match Registry::at(real.clone()) {
            Err(VmRegistryError::UnsafeDirectory { path, .. }) => {
                assert_eq!(path, real.join("vms"))
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_skipped_not_fatal() {
        let (reg, root) = registry("corrupt");
        let (_, _, dir) = reg.create(Some("ok")).unwrap();
        std::fs::write(dir.path().join("vm.json"), b"{not json").unwrap();
        assert!(reg.list().is_empty());
        assert!(dir.record().is_err());
        std::fs::remove_dir_all(root).unwrap();
    }
}
