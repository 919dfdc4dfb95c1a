//! What a request may do, decided on the device's private copy of it (see `bounce`): opcodes
//! FUSE does not define are refused (the server converts opcodes assuming defined values), a
//! read-only share refuses every modifying request, and a writable share refuses device nodes
//! and strips setuid/setgid bits unless special files are allowed: with the VMM running as
//! root, guest root could otherwise leave a setuid-root program or a disk's device node in a
//! host directory.

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, InHeader, MknodIn, Opcode, OpenIn, SetattrIn, SetattrValid,
};
use vm_memory_fuse::ByteValued;

/// The rules of one share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Refuse every change.
    pub(crate) read_only: bool,
    /// Allow device nodes and setuid/setgid bits.
    pub(crate) special_files: bool,
}

/// Requests that change the share.
const MODIFYING: [Opcode; 15] = [
    Opcode::Setattr,
    Opcode::Symlink,
    Opcode::Mknod,
    Opcode::Mkdir,
    Opcode::Unlink,
    Opcode::Rmdir,
    Opcode::Rename,
    Opcode::Link,
    Opcode::Write,
    Opcode::Setxattr,
    Opcode::Removexattr,
    Opcode::Create,
    Opcode::Fallocate,
    Opcode::Rename2,
    Opcode::CopyFileRange,
];

const SET_ID: u32 = libc::S_ISUID | libc::S_ISGID;

/// `T` at `at` in `req`, if it is all there.
pub(crate) fn get<T: ByteValued + Default>(req: &[u8], at: usize) -> Option<T> {
    let mut value = T::default();
    let bytes = req.get(at..at.checked_add(std::mem::size_of::<T>())?)?;
    value.as_mut_slice().copy_from_slice(bytes);
    Some(value)
}

/// Writes `value` back at `at` (where [`get`] read it).
fn put<T: ByteValued>(req: &mut [u8], at: usize, value: &T) {
    let end = at + std::mem::size_of::<T>();
    if let Some(bytes) = req.get_mut(at..end) {
        bytes.copy_from_slice(value.as_slice());
    }
}

impl Policy {
    /// The errno `req` (the copy of a whole request) gets instead of reaching the server, if
    /// any; may amend `req` (setuid/setgid bits stripped).
    pub(crate) fn apply(&self, req: &mut [u8]) -> Option<i32> {
        let Some(h) = get::<InHeader>(req, 0) else {
            return Some(libc::EINVAL);
        };
        if matches!(h.opcode, 0 | 7 | 19) {
            return Some(libc::ENOSYS);
        }
        let args = std::mem::size_of::<InHeader>();
        if self.read_only {
            if MODIFYING.iter().any(|&op| op as u32 == h.opcode) {
                return Some(libc::EROFS);
            }
            if h.opcode == Opcode::Open as u32 {
                let Some(open) = get::<OpenIn>(req, args) else {
                    return Some(libc::EINVAL);
                };
                let flags = open.flags as i32;
                if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    return Some(libc::EROFS);
                }
            }
            return None;
        }
        if self.special_files {
            return None;
        }
        match h.opcode {
            op if op == Opcode::Mknod as u32 => {
                let Some(mknod) = get::<MknodIn>(req, args) else {
                    return Some(libc::EINVAL);
                };
                let kind = mknod.mode & libc::S_IFMT;
                if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
                    return Some(libc::EPERM);
                }
                let mut stripped = mknod;
                stripped.mode &= !SET_ID;
                put(req, args, &stripped);
            }
            op if op == Opcode::Create as u32 => {
                let Some(mut create) = get::<CreateIn>(req, args) else {
                    return Some(libc::EINVAL);
                };
                create.mode &= !SET_ID;
                put(req, args, &create);
            }
            op if op == Opcode::Setattr as u32 => {
                let Some(mut set) = get::<SetattrIn>(req, args) else {
                    return Some(libc::EINVAL);
                };
                if set.valid & SetattrValid::MODE.bits() != 0 {
                    set.mode &= !SET_ID;
                    put(req, args, &set);
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<T: ByteValued>(opcode: Opcode, args: T) -> Vec<u8> {
        let h = InHeader {
            opcode: opcode as u32,
            ..Default::default()
        };
        let mut r = h.as_slice().to_vec();
        r.extend_from_slice(args.as_slice());
        r.extend_from_slice(b"name\0");
        r
    }

    const WRITABLE: Policy = Policy {
        read_only: false,
        special_files: false,
    };

    #[test]
    fn undefined_opcodes_never_reach_the_server() {
        for op in [0u32, 7, 19] {
            let mut r = InHeader {
                opcode: op,
                ..Default::default()
            }
            .as_slice()
            .to_vec();
            assert_eq!(WRITABLE.apply(&mut r), Some(libc::ENOSYS), "{op}");
        }
        assert_eq!(WRITABLE.apply(&mut [0u8; 3]), Some(libc::EINVAL));
    }

    #[test]
    fn device_nodes_are_refused_and_set_id_bits_stripped_on_writable_shares() {
        for kind in [libc::S_IFCHR, libc::S_IFBLK] {
            let mut r = request(
                Opcode::Mknod,
                MknodIn {
                    mode: kind | 0o666,
                    rdev: 0x0801,
                    ..Default::default()
                },
            );
            assert_eq!(WRITABLE.apply(&mut r), Some(libc::EPERM));
        }
        // A FIFO is fine, without its setuid bit.
        let mut r = request(
            Opcode::Mknod,
            MknodIn {
                mode: libc::S_IFIFO | libc::S_ISUID | 0o644,
                ..Default::default()
            },
        );
        assert_eq!(WRITABLE.apply(&mut r), None);
        let args = std::mem::size_of::<InHeader>();
        assert_eq!(
            get::<MknodIn>(&r, args).unwrap().mode,
            libc::S_IFIFO | 0o644
        );
        let mut r = request(
            Opcode::Create,
            CreateIn {
                mode: libc::S_IFREG | libc::S_ISUID | libc::S_ISGID | 0o755,
                ..Default::default()
            },
        );
        assert_eq!(WRITABLE.apply(&mut r), None);
        assert_eq!(
            get::<CreateIn>(&r, args).unwrap().mode,
            libc::S_IFREG | 0o755
        );
        let mut r = request(
            Opcode::Setattr,
            SetattrIn {
                valid: SetattrValid::MODE.bits(),
                mode: libc::S_ISUID | 0o4755,
                ..Default::default()
            },
        );
        assert_eq!(WRITABLE.apply(&mut r), None);
        assert_eq!(get::<SetattrIn>(&r, args).unwrap().mode, 0o755);
        // The name after the arguments is untouched.
        assert!(r.ends_with(b"name\0"));
        // Allowed on request.
        let allowing = Policy {
            special_files: true,
            ..WRITABLE
        };
        let mut r = request(
            Opcode::Mknod,
            MknodIn {
                mode: libc::S_IFBLK | 0o600,
                ..Default::default()
            },
        );
        assert_eq!(allowing.apply(&mut r), None);
    }

    #[test]
    fn read_only_shares_refuse_changes_and_writable_opens() {
        let ro = Policy {
            read_only: true,
            special_files: false,
        };
        let mut r = request(
            Opcode::Write,
            fuse_backend_rs::abi::fuse_abi::WriteIn::default(),
        );
        assert_eq!(ro.apply(&mut r), Some(libc::EROFS));
        let open = |flags: i32| {
            request(
                Opcode::Open,
                OpenIn {
                    flags: flags as u32,
                    ..Default::default()
                },
            )
        };
        assert_eq!(ro.apply(&mut open(libc::O_RDONLY)), None);
        assert_eq!(ro.apply(&mut open(libc::O_RDWR)), Some(libc::EROFS));
        assert_eq!(
            ro.apply(&mut open(libc::O_RDONLY | libc::O_TRUNC)),
            Some(libc::EROFS)
        );
        // A truncated open cannot slip through.
        let mut short = open(libc::O_RDWR);
        short.truncate(std::mem::size_of::<InHeader>() + 2);
        assert_eq!(ro.apply(&mut short), Some(libc::EINVAL));
    }
}
