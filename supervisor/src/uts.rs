//! This machine's `uname` answer, as the raw `struct utsname` bytes `uname(2)` writes.

use crate::policy::host::UTSNAME_SIZE;

const _: () = assert!(std::mem::size_of::<libc::utsname>() == UTSNAME_SIZE);

/// The local `struct utsname`; `None` if `uname` fails (it cannot, short of a bad pointer).
pub fn local() -> Option<[u8; UTSNAME_SIZE]> {
    // SAFETY: an all-zero utsname (six char arrays) is valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes one utsname into `uts`.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    // SAFETY: utsname is exactly UTSNAME_SIZE bytes of char arrays (asserted above), so every
    // bit pattern is a valid byte array.
    Some(unsafe { std::mem::transmute::<libc::utsname, [u8; UTSNAME_SIZE]>(uts) })
}
