//! This machine's `uname` answer, as the raw `struct utsname` bytes `uname(2)` writes.

use crate::policy::host::UTSNAME_SIZE;

const _: () = assert!(std::mem::size_of::<libc::utsname>() == UTSNAME_SIZE);

/// The local `struct utsname`; `None` if `uname` fails (it cannot, short of a bad pointer).
pub fn local() -> Option<[u8; UTSNAME_SIZE]> {
    use std::os::unix::ffi::OsStrExt;
    let uts = nix::sys::utsname::uname().ok()?;
    // Six NUL-padded fields of equal length, in this order; the kernel zeroes each field past
    // its string's end, so these are the bytes uname(2) writes.
    let field = UTSNAME_SIZE / 6;
    let mut out = [0u8; UTSNAME_SIZE];
    let fields =
        [uts.sysname(), uts.nodename(), uts.release(), uts.version(), uts.machine(), uts.domainname()];
    for (i, value) in fields.iter().enumerate() {
        let value = &value.as_bytes()[..value.len().min(field - 1)];
        out[i * field..][..value.len()].copy_from_slice(value);
    }
    Some(out)
}
