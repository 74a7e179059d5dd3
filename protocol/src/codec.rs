//! Framing: `[len: u32 BE][kind: u8][body]`, where `len` counts kind + body.
//!
//! * kind 0: a [`Control`] message, bincode (standard config) with a decode limit equal to the
//!   frame limit, so a hostile length or collection size can never allocate more than that;
//! * kind 1: stream data, `[stream: u32 BE][payload]`; payload bytes are copied once, never
//!   walked by serde.

use crate::message::{Control, StreamId};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame (kind + body) either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest payload of one data frame; bigger writes are split.
pub const MAX_DATA_CHUNK: usize = 128 * 1024;

const KIND_CONTROL: u8 = 0;
const KIND_DATA: u8 = 1;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Control(Control),
    Data { stream: StreamId, bytes: Vec<u8> },
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("truncated data frame")]
    Truncated,
    #[error("malformed control message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("cannot encode control message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("tunnel i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Appends the encoding of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match frame {
        Frame::Control(msg) => {
            out.push(KIND_CONTROL);
            bincode::serde::encode_into_std_write(msg, out, config())?;
        }
        Frame::Data { stream, bytes } => {
            out.truncate(start);
            encode_data_header(*stream, bytes.len(), out)?;
            out.extend_from_slice(bytes);
            return Ok(());
        }
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(CodecError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Appends the header of a data frame whose `len`-byte payload the caller writes right after
/// it (from its own buffer, say, with a vectored write).
pub fn encode_data_header(stream: StreamId, len: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let frame_len = len + 5;
    if frame_len > MAX_FRAME {
        return Err(CodecError::TooLarge(frame_len));
    }
    out.extend_from_slice(&(frame_len as u32).to_be_bytes());
    out.push(KIND_DATA);
    out.extend_from_slice(&stream.to_be_bytes());
    Ok(())
}

/// Decodes one serde message (a control frame's body) with the frame-sized allocation limit,
/// rejecting trailing bytes.
pub fn decode_message<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    if body.len() > MAX_FRAME {
        return Err(CodecError::TooLarge(body.len()));
    }
    let (msg, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::Decode(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes",
            body.len() - used
        ))));
    }
    Ok(msg)
}

/// Encodes one serde message as a control frame body (no length or kind prefix).
pub fn encode_message<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(msg, config())?)
}

/// Decodes one frame body (everything after the length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, CodecError> {
    if body.len() > MAX_FRAME {
        return Err(CodecError::TooLarge(body.len()));
    }
    let (&kind, rest) = body.split_first().ok_or(CodecError::Empty)?;
    match kind {
        KIND_CONTROL => Ok(Frame::Control(decode_message(rest)?)),
        KIND_DATA => {
            if rest.len() < 4 {
                return Err(CodecError::Truncated);
            }
            let (id, payload) = rest.split_at(4);
            let stream = u32::from_be_bytes(id.try_into().expect("4 bytes"));
            Ok(Frame::Data { stream, bytes: payload.to_vec() })
        }
        other => Err(CodecError::UnknownKind(other)),
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames. `buf` is reused across
/// calls and never grows beyond [`MAX_FRAME`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Frame>, CodecError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(CodecError::TooLarge(len));
    }
    if len == 0 {
        return Err(CodecError::Empty);
    }
    // Data frames are read straight into the payload's own buffer: no second copy.
    let mut head = [0u8; 5];
    reader.read_exact(&mut head[..1]).await?;
    if head[0] == KIND_DATA {
        if len < 5 {
            return Err(CodecError::Truncated);
        }
        reader.read_exact(&mut head[1..]).await?;
        let stream = u32::from_be_bytes(head[1..].try_into().expect("4 bytes"));
        let mut bytes = vec![0u8; len - 5];
        reader.read_exact(&mut bytes).await?;
        return Ok(Some(Frame::Data { stream, bytes }));
    }
    buf.resize(len, 0);
    buf[0] = head[0];
    reader.read_exact(&mut buf[1..]).await?;
    decode(buf).map(Some)
}

/// How much a [`FrameReader`] reads ahead: enough for many small frames per read call, small
/// enough that the part of a large payload copied out of it stays a fraction of the payload.
const READ_AHEAD: usize = 16 * 1024;

/// Reads frames from a byte stream with one buffer of read-ahead: a burst of small frames
/// (credits, requests, short payloads) costs one read call instead of three or four per frame,
/// while a large payload is read straight into its own buffer once the buffered part is used.
/// Frames and errors are the same as [`read_frame`]'s; unlike it, this may read past the
/// current frame, so a stream handed over after a handshake must use one or the other only.
pub struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Read no further ahead than the next data header: the caller splices payloads straight
    /// from the stream, and any payload bytes read ahead would have to be copied instead.
    lean: bool,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader { buf: vec![0u8; READ_AHEAD].into_boxed_slice(), start: 0, end: 0, lean: false }
    }
}

/// Bytes in front of a data frame's payload: length, kind, stream.
pub const DATA_HEADER: usize = 9;

/// A frame read up to its payload: control frames whole, data frames as their header only.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    Control(Control),
    Data { stream: StreamId, len: usize },
}

impl FrameReader {
    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Makes at least `want` (at most [`READ_AHEAD`]) bytes available; `false` if the stream
    /// ended first.
    async fn fill<R: AsyncRead + Unpin>(&mut self, reader: &mut R, want: usize) -> std::io::Result<bool> {
        debug_assert!(want <= self.buf.len());
        if self.buffered() >= want {
            return Ok(true);
        }
        if self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.buffered());
        }
        while self.buffered() < want {
            let limit = if self.lean {
                (self.end + (want - self.buffered()).max(DATA_HEADER)).min(self.buf.len())
            } else {
                self.buf.len()
            };
            match reader.read(&mut self.buf[self.end..limit]).await? {
                0 => return Ok(false),
                n => self.end += n,
            }
        }
        Ok(true)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let at = self.start;
        self.start += n;
        &self.buf[at..at + n]
    }

    /// Fills `out` from the buffer first, then straight from the stream.
    async fn read_into<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        out: &mut [u8],
    ) -> std::io::Result<()> {
        let from_buffer = out.len().min(self.buffered());
        out[..from_buffer].copy_from_slice(self.take(from_buffer));
        reader.read_exact(&mut out[from_buffer..]).await?;
        Ok(())
    }

    /// Sets whether reads stop at the next data header (see the `lean` field).
    pub fn set_lean(&mut self, lean: bool) {
        self.lean = lean;
    }

    /// The next frame; `Ok(None)` on an end of stream between frames.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<Frame>, CodecError> {
        Ok(match self.read_head(reader).await? {
            None => None,
            Some(Head::Control(control)) => Some(Frame::Control(control)),
            Some(Head::Data { stream, len }) => {
                Some(Frame::Data { stream, bytes: self.read_payload(reader, len).await? })
            }
        })
    }

    /// The next control frame, or the next data frame's header; its payload, `len` bytes, must
    /// be consumed next with [`FrameReader::read_payload`] or [`FrameReader::take_buffered`]
    /// and a direct read of the rest from the stream.
    pub async fn read_head<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<Head>, CodecError> {
        if !self.fill(reader, 4).await? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.take(4).try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(CodecError::TooLarge(len));
        }
        if len == 0 {
            return Err(CodecError::Empty);
        }
        // The same error read_exact reports.
        let eof = || CodecError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "early eof"));
        if !self.fill(reader, 1).await? {
            return Err(eof());
        }
        if self.buf[self.start] == KIND_DATA {
            if len < 5 {
                return Err(CodecError::Truncated);
            }
            if !self.fill(reader, 5).await? {
                return Err(eof());
            }
            let head = self.take(5);
            let stream = u32::from_be_bytes(head[1..].try_into().expect("4 bytes"));
            return Ok(Some(Head::Data { stream, len: len - 5 }));
        }
        let control = if len <= READ_AHEAD {
            if !self.fill(reader, len).await? {
                return Err(eof());
            }
            let at = self.start;
            self.start += len;
            decode(&self.buf[at..at + len])?
        } else {
            let mut body = vec![0u8; len];
            self.read_into(reader, &mut body).await?;
            decode(&body)?
        };
        match control {
            Frame::Control(control) => Ok(Some(Head::Control(control))),
            Frame::Data { .. } => unreachable!("the kind byte said control"),
        }
    }

    /// A data payload of `len` bytes whose header [`FrameReader::read_head`] returned.
    pub async fn read_payload<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        len: usize,
    ) -> Result<Vec<u8>, CodecError> {
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(self.take_buffered(len));
        // Read into uninitialised capacity: zeroing a large payload first showed up in profiles.
        let mut rest = (&mut *reader).take((len - bytes.len()) as u64);
        while bytes.len() < len {
            if rest.read_buf(&mut bytes).await? == 0 {
                return Err(CodecError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "early eof",
                )));
            }
        }
        Ok(bytes)
    }

    /// Up to `max` payload bytes that were already read ahead.
    pub fn take_buffered(&mut self, max: usize) -> &[u8] {
        let n = max.min(self.buffered());
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn round_trip(frame: Frame) {
        let mut out = Vec::new();
        encode(&frame, &mut out).unwrap();
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        assert_eq!(decode(&out[4..]).unwrap(), frame);
    }

    #[test]
    fn control_and_data_round_trip() {
        round_trip(Frame::Control(Control::Hello(Hello {
            min_version: 1,
            max_version: 3,
            token: b"tok".to_vec(),
            capabilities: vec!["outgoing".into()],
        })));
        round_trip(Frame::Control(Control::Request {
            id: u64::MAX,
            body: Request::ReadFile { path: b"/etc/\xffhosts".to_vec(), offset: 7, len: 9 },
        }));
        round_trip(Frame::Control(Control::Response {
            id: 3,
            body: Response::Stat(FileStat { size: -1, mode: 0o100644, ..Default::default() }),
        }));
        round_trip(Frame::Control(Control::Opened { stream: 5, result: Err(Errno(111)), local: None }));
        round_trip(Frame::Control(Control::Open {
            stream: 7,
            target: OpenTarget::Udp("[::ffff:10.0.0.1]:53".parse().unwrap()),
        }));
        round_trip(Frame::Data { stream: 9, bytes: vec![0, 1, 2, 255] });
        round_trip(Frame::Data { stream: 1, bytes: Vec::new() });
    }

    #[test]
    fn oversize_frames_are_rejected_both_ways() {
        let mut out = Vec::new();
        let err = encode(&Frame::Data { stream: 1, bytes: vec![0; MAX_FRAME] }, &mut out);
        assert!(matches!(err, Err(CodecError::TooLarge(_))));
        assert!(out.is_empty(), "a rejected frame leaves nothing behind");
        assert!(matches!(decode(&vec![1u8; MAX_FRAME + 1]), Err(CodecError::TooLarge(_))));
    }

    #[test]
    fn malformed_frames_are_clean_errors() {
        assert!(matches!(decode(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode(&[7, 0]), Err(CodecError::UnknownKind(7))));
        assert!(matches!(decode(&[1, 0, 0]), Err(CodecError::Truncated)));
        // A control frame whose collection claims a huge length must fail without allocating it.
        let mut bogus = vec![0u8, 2]; // kind control, variant Request
        bogus.extend_from_slice(&[0]); // id 0
        bogus.extend_from_slice(&[1]); // Request::Stat
        bogus.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(decode(&bogus), Err(CodecError::Decode(_))));
        // Trailing garbage after a valid message is refused.
        let mut out = Vec::new();
        encode(&Frame::Control(Control::Shutdown { stream: 1 }), &mut out).unwrap();
        out.push(0);
        assert!(decode(&out[4..]).is_err());
    }

    #[tokio::test]
    async fn reader_handles_eof_truncation_and_limit() {
        let mut out = Vec::new();
        encode(&Frame::Control(Control::Reset { stream: 3 }), &mut out).unwrap();
        let mut buf = Vec::new();
        let mut src = &out[..];
        assert_eq!(
            read_frame(&mut src, &mut buf).await.unwrap(),
            Some(Frame::Control(Control::Reset { stream: 3 }))
        );
        assert_eq!(read_frame(&mut src, &mut buf).await.unwrap(), None);

        let mut cut = &out[..out.len() - 1];
        assert!(matches!(read_frame(&mut cut, &mut buf).await, Err(CodecError::Io(_))));

        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let mut src = &huge[..];
        assert!(matches!(read_frame(&mut src, &mut buf).await, Err(CodecError::TooLarge(_))));
        assert!(buf.capacity() <= MAX_FRAME);
    }

    /// Hands out at most `chunk` bytes per read, like a socket with little data queued.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl tokio::io::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.chunk.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Every frame, then the outcome that ended the stream, as text.
    async fn frames_of(reader: &mut (impl AsyncRead + Unpin), buffered: bool) -> (Vec<Frame>, String) {
        let (mut frames, mut buf, mut ahead) = (Vec::new(), Vec::new(), FrameReader::default());
        loop {
            let next =
                if buffered { ahead.read_frame(reader).await } else { read_frame(reader, &mut buf).await };
            match next {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return (frames, "end".into()),
                Err(e) => return (frames, e.to_string()),
            }
        }
    }

    #[tokio::test]
    async fn read_ahead_gives_the_same_frames_and_errors_as_the_plain_reader() {
        let mut stream = Vec::new();
        let frames = [
            Frame::Control(Control::Credit { stream: 1, bytes: 7 }),
            Frame::Data { stream: 2, bytes: b"hi".to_vec() },
            Frame::Data { stream: 3, bytes: (0..MAX_DATA_CHUNK).map(|i| i as u8).collect() },
            Frame::Control(Control::Reset { stream: 4 }),
            Frame::Data { stream: 5, bytes: Vec::new() },
            Frame::Data { stream: 6, bytes: vec![9; READ_AHEAD - 9] },
            Frame::Data { stream: 7, bytes: vec![8; READ_AHEAD + 1] },
        ];
        for frame in &frames {
            encode(frame, &mut stream).unwrap();
        }
        let endings: [&[u8]; 5] = [&[], &[0, 0], &[0, 0, 0, 0], &[0, 0, 0, 3, 1], &[0, 0, 0, 9, 0, 1]];
        for ending in endings {
            let whole = [&stream[..], ending].concat();
            for cut in [whole.len(), whole.len() - 1, 100, 7] {
                for chunk in [1, 3, 4096, usize::MAX] {
                    let data = &whole[..cut];
                    let plain = frames_of(&mut Trickle { data, chunk }, false).await;
                    let ahead = frames_of(&mut Trickle { data, chunk }, true).await;
                    assert_eq!(plain, ahead, "cut {cut}, chunk {chunk}, ending {ending:?}");
                }
            }
            let plain = frames_of(&mut &whole[..], false).await;
            assert_eq!(plain.0.len(), frames.len());
        }
    }
}
