//! The operating system's handle to a kernel object, under one name: a file descriptor on
//! Unix, a `HANDLE` on Windows. Neutral traits take these so no trait needs an OS `cfg`.

/// A borrowed descriptor: the object stays open at least as long as the borrow.
#[cfg(unix)]
pub type BorrowedDescriptor<'a> = std::os::fd::BorrowedFd<'a>;

/// A borrowed descriptor: the object stays open at least as long as the borrow.
#[cfg(windows)]
pub type BorrowedDescriptor<'a> = std::os::windows::io::BorrowedHandle<'a>;
