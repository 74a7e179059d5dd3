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
    // SAFETY: plain signal-mask calls on a zeroed set.
    let stop_signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let pod = LocalPod::start(index);
    println!("target_pid={}", pod.target_pid);
    println!("netns={}", pod.netns);
    println!("pod_ip={}", pod.pod_ip);
    println!("service_ip={} (echo 7777, udp 7778, http 8080)", pod.service_ip);
    println!("ready: Enter, end of input, SIGINT or SIGTERM removes the pod");
    std::thread::spawn(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        // SAFETY: signalling our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let mut signal = 0;
    // SAFETY: waits for one of the signals blocked above.
    unsafe { libc::sigwait(&stop_signals, &mut signal) };
    drop(pod);
}
