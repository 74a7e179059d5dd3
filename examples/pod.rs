//! `cargo run --example pod [INDEX]`: builds local pod INDEX (default 230) and keeps it until
//! Enter, end of input, SIGINT or SIGTERM, then removes it, for trying kmirror by hand or
//! profiling it: `kmirror run --target pid/<printed pid> -- ...`.

use kmirror_suite::pod::LocalPod;

fn main() {
    kmirror_suite::pod::require_root();
    let index = match std::env::args().nth(1).map(|a| a.parse::<u8>()) {
        None => 230,
        Some(Ok(i)) => i,
        Some(Err(e)) => {
            eprintln!("pod: INDEX must be a number in 1..=254: {e}");
            std::process::exit(2);
        }
    };
    // Blocked before any thread starts, so every thread inherits the mask and the signals
    // stay pending for sigwait below instead of killing the process with the pod still up.
    use nix::sys::signal::{SigSet, Signal};
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    stop_signals.thread_block().expect("cannot block SIGINT and SIGTERM");
    let pod = LocalPod::start(index);
    println!("target_pid={}", pod.target_pid);
    println!("netns={}", pod.netns);
    println!("pod_ip={}", pod.pod_ip);
    println!("service_ip={} (echo 7777, udp 7778, http 8080)", pod.service_ip);
    println!("ready: Enter, end of input, SIGINT or SIGTERM removes the pod");
    std::thread::spawn(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = kmirror_suite::run::signal(std::process::id(), libc::SIGTERM);
    });
    let _ = stop_signals.wait();
    drop(pod);
}
