//! seccomp user-notify mechanism: building the filter and talking to the listener.

pub mod filter;
pub mod notify;

pub use notify::Listener;
