//! Shared helpers for kmirror's end-to-end test suite (`kmirror_suite`).
//!
//! Each module wraps one piece of test infrastructure so the integration
//! tests under `tests/` stay short and declarative.

pub mod app;
pub mod pod;
pub mod run;
pub mod sys;
pub mod systemd;
