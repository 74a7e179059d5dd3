//! Unpredictable bytes from the kernel (session tokens, per-session addresses).

/// `N` random bytes from getrandom(2).
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        if let Ok(n) = crate::sys::getrandom(&mut out[filled..]) {
            filled += n;
        }
    }
    out
}

/// A hex session token.
pub fn token() -> String {
    bytes::<32>().iter().map(|b| format!("{b:02x}")).collect()
}
