//! `sm-blkbench`: a block device benchmark that runs inside a guest (packed into the initramfs
//! by `cargo xtask initramfs`, driven by `cargo xtask bench blk`). Direct I/O, so the guest's
//! page cache is not what is measured.
//!
//! ```text
//! sm-blkbench write DEVICE MIB              sequential 1 MiB writes, then fsync (DEVICE may
//!                                           be a file: created if missing, buffered I/O, the
//!                                           page cache dropped before reads)
//! sm-blkbench read DEVICE MIB               sequential 1 MiB reads
//! sm-blkbench randread DEVICE MIB SECONDS   4 KiB reads at random offsets in the first MIB
//! ```
//! Prints one line: `RESULT <mode> <value> <unit>`.

#[cfg(target_os = "linux")]
fn main() {
    std::process::exit(linux::main());
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("sm-blkbench runs only inside a Linux guest");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
mod linux {
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    use std::fs::OpenOptions;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::time::{Duration, Instant};

    /// A page-aligned buffer, as O_DIRECT requires.
    struct Aligned {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Aligned {
        fn new(len: usize) -> Option<Aligned> {
            let layout = Layout::from_size_align(len, 4096).ok()?;
            // SAFETY: callers pass a non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            (!ptr.is_null()).then_some(Aligned { ptr, layout })
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: `ptr` points to `layout.size()` zero-initialized bytes we own exclusively.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout in `new`.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }

    fn usage() -> i32 {
        eprintln!("usage: sm-blkbench write|read DEVICE MIB | randread DEVICE MIB SECONDS");
        2
    }

    fn drop_caches() {
        // SAFETY: sync takes no arguments.
        unsafe { libc::sync() };
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
            eprintln!("sm-blkbench: cannot drop caches: {e}");
        }
    }

    pub fn main() -> i32 {
        let args: Vec<String> = std::env::args().collect();
        if args.len() < 4 {
            return usage();
        }
        let (mode, dev) = (args[1].as_str(), args[2].as_str());
        let Ok(mib) = args[3].parse::<u64>() else {
            return usage();
        };
        // A file (on a shared directory) is made by the write pass and read through the page
        // cache, dropped first: O_DIRECT is refused by shares whose host side is tmpfs.
        let is_file = !dev.starts_with("/dev/");
        if is_file && mode != "write" {
            drop_caches();
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(mode == "write")
            .create(mode == "write" && is_file)
            .custom_flags(if is_file { 0 } else { libc::O_DIRECT })
            .open(dev)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("sm-blkbench: {dev}: {e}");
                return 1;
            }
        };
        let result = match mode {
            "write" | "read" => {
                let Some(mut buf) = Aligned::new(1 << 20) else {
                    return 1;
                };
                for (i, b) in buf.bytes().iter_mut().enumerate() {
                    *b = (i * 31) as u8;
                }
                let start = Instant::now();
                for i in 0..mib {
                    let r = if mode == "write" {
                        file.write_all_at(buf.bytes(), i << 20)
                    } else {
                        file.read_exact_at(buf.bytes(), i << 20)
                    };
                    if let Err(e) = r {
                        eprintln!("sm-blkbench: {mode} at {i} MiB: {e}");
                        return 1;
                    }
                }
                if mode == "write" {
                    if let Err(e) = file.sync_all() {
                        eprintln!("sm-blkbench: fsync: {e}");
                        return 1;
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                format!("{mode} {:.1} MiB/s", mib as f64 / secs)
            }
            "randread" => {
                let Some(Ok(seconds)) = args.get(4).map(|s| s.parse::<u64>()) else {
                    return usage();
                };
                let blocks = ((mib << 20) / 4096).max(1);
                let Some(mut buf) = Aligned::new(4096) else {
                    return 1;
                };
                // xorshift64: reproducible offsets without a dependency.
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                let limit = Duration::from_secs(seconds);
                let start = Instant::now();
                let mut ops = 0u64;
                while start.elapsed() < limit {
                    for _ in 0..64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if let Err(e) = file.read_exact_at(buf.bytes(), (x % blocks) * 4096) {
                            eprintln!("sm-blkbench: randread: {e}");
                            return 1;
                        }
                        ops += 1;
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                format!("randread {:.0} IOPS", ops as f64 / secs)
            }
            _ => return usage(),
        };
        println!("RESULT {result}");
        0
    }
}
