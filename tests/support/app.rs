//! A local app running under `kmirror run` in the background, with its output collected, and
//! a minimal HTTP/1.1 client for driving pod ports from the host.

use crate::run::kmirror_cmd;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct BackgroundApp {
    pub child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect<R: Read + Send + 'static>(from: R) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl BackgroundApp {
    /// Starts `kmirror run` with `flags` and `command` (logging at info level, so the
    /// subscription of incoming ports can be awaited).
    pub fn start(target_pid: u32, flags: &[&str], command: &[&str]) -> BackgroundApp {
        Self::start_with_env(target_pid, flags, command, &[])
    }

    /// Like [`BackgroundApp::start`], with extra environment for kmirror (and its agent).
    pub fn start_with_env(
        target_pid: u32,
        flags: &[&str],
        command: &[&str],
        env: &[(&str, &str)],
    ) -> BackgroundApp {
        let mut cmd = kmirror_cmd(target_pid, flags, command);
        cmd.envs(env.iter().copied());
        cmd.env("KMIRROR_LOG", "info").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = crate::run::spawn_tied(cmd).expect("cannot start kmirror");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        BackgroundApp { child, stdout, stderr }
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until `pred` holds for the collected stdout lines.
    pub fn wait_stdout(&self, what: &str, limit: Duration, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + limit;
        while !pred(&self.stdout.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nstdout: {:?}\nstderr: {}",
                self.stdout_lines().iter().rev().take(10).collect::<Vec<_>>(),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until kmirror reports that the pod port is subscribed.
    pub fn wait_subscribed(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.stderr_text().contains("incoming traffic subscribed") {
            assert!(
                Instant::now() < deadline,
                "the app's port was never subscribed:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent process kmirror started.
    pub fn agent_pid(&self) -> u32 {
        crate::run::agent_of(self.child.id())
    }

    /// Sends SIGTERM and waits for the exit (at most 30 s).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = crate::run::signal(self.child.id(), libc::SIGTERM);
        crate::run::wait_within(&mut self.child, "kmirror after SIGTERM", Duration::from_secs(30))
    }

    /// Waits for kmirror to exit by itself (at most `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        crate::run::wait_within(&mut self.child, "kmirror", limit)
    }
}

impl Drop for BackgroundApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 response: status, headers (lower-cased names) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client connection (responses must carry Content-Length).
pub struct HttpConn {
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> std::io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn { reader: BufReader::new(stream) })
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: pod\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(Response { status, headers, body })
    }
}
