//! Decisions, free of system calls: what goes to the pod and what stays local. Each module is
//! pure and unit-tested; the handlers apply these decisions through the mechanism modules.

pub mod dns;
pub mod dotenv;
pub mod env;
pub mod files;
pub mod filter;
pub mod host;
pub mod incoming;
pub mod lookup;
pub mod net;
pub mod proc_fd;
pub mod service_manager;
pub mod walk;
