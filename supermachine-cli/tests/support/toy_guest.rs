//! The toy guest: a PVH ELF of a few instructions that measures a VMM's own overhead.
//!
//! Entered in 32-bit protected mode, it prints [`MARKER`] on COM1, reports exit status 0 on
//! supermachine's exit-status port, then resets through the i8042 and, for VMMs that have
//! neither, triple-faults (QEMU with `-no-reboot` exits on that).
//!
//! Shared by the integration tests and `cargo xtask bench` (included with `#[path]`).

/// What the toy prints, one line.
pub const MARKER: &str = "supermachine-toy-ok\n";

const LOAD_ADDR: u64 = 0x10_0000;
const CODE_OFFSET: u64 = 0x100;
const NOTE_OFFSET: u64 = 0xc0;

fn code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in MARKER.bytes() {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x66, 0xba, 0xf4, 0x00]); // mov dx, 0xf4 (the exit-status port)
    c.extend_from_slice(&[0x31, 0xc0]); // xor eax, eax
    c.push(0xef); // out dx, eax
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.push(0xfa); // cli
                  // lidt [zero_idt]: the 6 zero bytes that follow the code.
    let zero_idt = (LOAD_ADDR + CODE_OFFSET) as u32 + c.len() as u32 + 7 + 4;
    c.extend_from_slice(&[0x0f, 0x01, 0x1d]);
    c.extend_from_slice(&zero_idt.to_le_bytes());
    c.extend_from_slice(&[0xcc, 0xf4, 0xeb, 0xfd]); // int3 (triple fault); hlt; jmp $-1
    c.extend_from_slice(&[0; 6]);
    c
}

/// What the echo toy prints once it is echoing.
#[allow(dead_code)]
pub const ECHO_READY: &str = "supermachine-echo-ready\n";

/// Prints [`ECHO_READY`], then forever: poll COM1's line status, read a byte, write it back.
fn echo_code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in ECHO_READY.bytes() {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    // poll: mov dx, 0x3fd; in al, dx; test al, 1; jz poll
    c.extend_from_slice(&[0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7]);
    // mov dx, 0x3f8; in al, dx; out dx, al; jmp poll
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xec, 0xee, 0xeb, 0xef]);
    c
}

/// The echo toy: a guest to snapshot while it runs and to restore (it answers every byte
/// of serial input with the same byte).
#[allow(dead_code)]
pub fn echo_elf() -> Vec<u8> {
    elf_with(echo_code())
}

/// The toy guest as an ELF64 file image.
pub fn elf() -> Vec<u8> {
    elf_with(code())
}

fn elf_with(code: Vec<u8>) -> Vec<u8> {
    let entry = LOAD_ADDR + CODE_OFFSET;
    let file_len = CODE_OFFSET + code.len() as u64;
    let mut f = Vec::with_capacity(file_len as usize);
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // no sections
                                  // PT_LOAD: the whole file at 1 MiB.
    let phdr =
        |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&align.to_le_bytes());
        };
    phdr(&mut f, 1, 5, 0, LOAD_ADDR, file_len, 0x1000);
    // PT_NOTE: Xen's PHYS32_ENTRY note, the PVH entry point.
    phdr(&mut f, 4, 4, NOTE_OFFSET, LOAD_ADDR + NOTE_OFFSET, 20, 4);
    f.resize(NOTE_OFFSET as usize, 0);
    f.extend_from_slice(&4u32.to_le_bytes()); // namesz
    f.extend_from_slice(&4u32.to_le_bytes()); // descsz
    f.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&(entry as u32).to_le_bytes());
    f.resize(CODE_OFFSET as usize, 0);
    f.extend_from_slice(&code);
    f
}

/// Writes the toy guest to `path`.
#[allow(dead_code)]
pub fn write_to(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, elf())
}
