//! Messages between kmirror and its keeper, over their socketpair.
//!
//! A frame is a little-endian `u32` length followed by that many bytes: a tag byte and the
//! fields. Byte strings are a `u32` length and the bytes. Both ends are the same binary, so
//! there is no versioning; the decoder still checks every length, since a short or garbled
//! frame must end the session cleanly rather than panic.

/// Upper bound of a frame: the launch request carries the app's environment and arguments,
/// which execve caps far below this.
const MAX_FRAME: usize = 64 << 20;

/// kmirror → keeper. (Not `Debug` or `PartialEq`: libc's `sock_filter` is neither.)
#[derive(Clone)]
pub enum Command {
    /// Start the app (once, first).
    Launch(LaunchRequest),
    /// Send `sig` to every process of the tree; with `outside_group_only`, only to those
    /// outside the keeper's process group (the terminal already reached the others).
    Signal { sig: i32, outside_group_only: bool },
    /// SIGKILL every process of the tree, now and whatever it forks meanwhile.
    EndTree,
}

#[derive(Clone)]
pub struct LaunchRequest {
    /// Signals ignored in kmirror (bit n-1 for signal n), which the app inherits as before.
    pub ignored: u64,
    pub program: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub filter: Vec<libc::sock_filter>,
    /// Install the filter with a seccomp listener (false: for the ptrace interceptor, which
    /// attaches before exec instead).
    pub listener: bool,
    /// Variables of `env` whose value the app's launcher replaces with the app's pid (see
    /// [`crate::policy::service_manager`]).
    pub own_pid_vars: Vec<Vec<u8>>,
    /// Descriptors the keeper inherited for the app (socket activation): the app inherits
    /// them at the same numbers, and the keeper closes its copies once the app started.
    pub pass_fds: Vec<i32>,
}

/// keeper → kmirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The app's main process runs (it has exec'd) with this pid.
    Started(u32),
    /// The app could not be started: this errno (from fork, the filter or exec).
    SpawnFailed(i32),
    /// The main process ended; the raw wait status.
    MainExited(i32),
    /// The last process of the tree has been reaped; the keeper exits now.
    TreeEnded,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("a frame of {0} bytes is larger than any message")]
    TooLarge(usize),
    #[error("a malformed message")]
    Malformed,
}

/// Appends one frame holding `body` to `out`.
fn frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Takes one whole frame off the front of `buf`, if it holds one.
fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, WireError> {
    let Some(len) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = buf[4..4 + len].to_vec();
    buf.drain(..4 + len);
    Ok(Some(body))
}

/// Reads fields off a frame body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() { Ok(()) } else { Err(WireError::Malformed) }
    }
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Command::Launch(req) => {
                body.push(b'L');
                body.extend_from_slice(&req.ignored.to_le_bytes());
                put_bytes(&mut body, &req.program);
                body.extend_from_slice(&(req.args.len() as u32).to_le_bytes());
                for arg in &req.args {
                    put_bytes(&mut body, arg);
                }
                body.extend_from_slice(&(req.env.len() as u32).to_le_bytes());
                for (name, value) in &req.env {
                    put_bytes(&mut body, name);
                    put_bytes(&mut body, value);
                }
                body.extend_from_slice(&(req.filter.len() as u32).to_le_bytes());
                for insn in &req.filter {
                    body.extend_from_slice(&insn.code.to_le_bytes());
                    body.push(insn.jt);
                    body.push(insn.jf);
                    body.extend_from_slice(&insn.k.to_le_bytes());
                }
                body.push(req.listener as u8);
                body.extend_from_slice(&(req.own_pid_vars.len() as u32).to_le_bytes());
                for name in &req.own_pid_vars {
                    put_bytes(&mut body, name);
                }
                body.extend_from_slice(&(req.pass_fds.len() as u32).to_le_bytes());
                for fd in &req.pass_fds {
                    body.extend_from_slice(&fd.to_le_bytes());
                }
            }
            Command::Signal { sig, outside_group_only } => {
                body.extend_from_slice(&[b'S', *sig as u8, *outside_group_only as u8]);
            }
            Command::EndTree => body.push(b'E'),
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        frame(&mut out, &body);
        out
    }

    /// Takes one command off the front of `buf`; `Ok(None)` until a whole one arrived.
    pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Command>, WireError> {
        let Some(body) = take_frame(buf)? else { return Ok(None) };
        let mut f = Fields(&body);
        let command = match f.u8()? {
            b'L' => {
                let ignored = u64::from_le_bytes(f.take(8)?.try_into().expect("8 bytes"));
                let program = f.bytes()?;
                let args = (0..f.u32()?).map(|_| f.bytes()).collect::<Result<_, _>>()?;
                let env = (0..f.u32()?).map(|_| Ok((f.bytes()?, f.bytes()?))).collect::<Result<_, _>>()?;
                let filter = (0..f.u32()?)
                    .map(|_| {
                        let code = u16::from_le_bytes(f.take(2)?.try_into().expect("2 bytes"));
                        let (jt, jf) = (f.u8()?, f.u8()?);
                        Ok(libc::sock_filter { code, jt, jf, k: f.u32()? })
                    })
                    .collect::<Result<_, _>>()?;
                let listener = f.u8()? != 0;
                let own_pid_vars = (0..f.u32()?).map(|_| f.bytes()).collect::<Result<_, _>>()?;
                let pass_fds = (0..f.u32()?).map(|_| Ok(f.u32()? as i32)).collect::<Result<_, _>>()?;
                Command::Launch(LaunchRequest {
                    ignored,
                    program,
                    args,
                    env,
                    filter,
                    listener,
                    own_pid_vars,
                    pass_fds,
                })
            }
            b'S' => Command::Signal { sig: f.u8()? as i32, outside_group_only: f.u8()? != 0 },
            b'E' => Command::EndTree,
            _ => return Err(WireError::Malformed),
        };
        f.end()?;
        Ok(Some(command))
    }
}

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, value) = match *self {
            Report::Started(pid) => (b's', pid),
            Report::SpawnFailed(errno) => (b'f', errno as u32),
            Report::MainExited(status) => (b'm', status as u32),
            Report::TreeEnded => (b't', 0),
        };
        let mut body = vec![tag];
        body.extend_from_slice(&value.to_le_bytes());
        let mut out = Vec::with_capacity(9);
        frame(&mut out, &body);
        out
    }

    /// Takes one report off the front of `buf`; `Ok(None)` until a whole one arrived.
    pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Report>, WireError> {
        let Some(body) = take_frame(buf)? else { return Ok(None) };
        let mut f = Fields(&body);
        let tag = f.u8()?;
        let value = f.u32()?;
        f.end()?;
        Ok(Some(match tag {
            b's' => Report::Started(value),
            b'f' => Report::SpawnFailed(value as i32),
            b'm' => Report::MainExited(value as i32),
            b't' => Report::TreeEnded,
            _ => return Err(WireError::Malformed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Command {
        Command::Launch(LaunchRequest {
            ignored: 1 << 31 | 1 << 12,
            program: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), b"exit 3".to_vec(), Vec::new()],
            env: vec![(b"PATH".to_vec(), b"/bin".to_vec()), (b"EMPTY".to_vec(), Vec::new())],
            filter: vec![
                libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 4 },
                libc::sock_filter { code: 0x15, jt: 1, jf: 2, k: 0xc000_003e },
            ],
            listener: false,
            own_pid_vars: vec![b"LISTEN_PID".to_vec()],
            pass_fds: vec![3, 4],
        })
    }

    #[test]
    fn commands_survive_the_round_trip_even_byte_by_byte() {
        let commands =
            [launch(), Command::Signal { sig: libc::SIGTERM, outside_group_only: true }, Command::EndTree];
        let stream: Vec<u8> = commands.iter().flat_map(Command::encode).collect();
        let mut buf = Vec::new();
        let mut decoded = Vec::new();
        for byte in stream {
            buf.push(byte);
            while let Some(c) = Command::decode(&mut buf).unwrap() {
                decoded.push(c);
            }
        }
        let again: Vec<Vec<u8>> = decoded.iter().map(Command::encode).collect();
        assert_eq!(again, commands.iter().map(Command::encode).collect::<Vec<_>>());
        assert!(buf.is_empty());
    }

    #[test]
    fn reports_survive_the_round_trip() {
        let reports = [
            Report::Started(4242),
            Report::SpawnFailed(libc::ENOENT),
            Report::MainExited(9 << 8),
            Report::TreeEnded,
        ];
        let mut buf: Vec<u8> = reports.iter().flat_map(Report::encode).collect();
        for report in reports {
            assert_eq!(Report::decode(&mut buf).unwrap(), Some(report));
        }
        assert_eq!(Report::decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut huge = (u32::MAX).to_le_bytes().to_vec();
        assert!(matches!(Command::decode(&mut huge), Err(WireError::TooLarge(_))));
        let malformed = |buf: &mut Vec<u8>| matches!(Command::decode(buf), Err(WireError::Malformed));
        // A launch request whose argument count promises more than the frame holds.
        let mut short = Vec::new();
        frame(&mut short, &[b'L', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0]);
        assert!(malformed(&mut short));
        let mut unknown = Vec::new();
        frame(&mut unknown, b"?");
        assert!(malformed(&mut unknown));
        let mut trailing = Vec::new();
        frame(&mut trailing, &[b'E', 0]);
        assert!(malformed(&mut trailing));
        let mut report = Vec::new();
        frame(&mut report, &[b'm', 1, 2]);
        assert_eq!(Report::decode(&mut report), Err(WireError::Malformed));
    }
}
