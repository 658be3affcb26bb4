//! Stream framing (RFC 3261 §18.3): a message on TCP ends where its Content-Length says. Also
//! recognizes RFC 5626 keep-alives (a double CRLF "ping", answered by a single CRLF "pong").

use crate::sip::message::head_end;
use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// What the framer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One whole message.
    Message(Bytes),
    /// A CRLFCRLF keep-alive ping.
    Ping,
}

/// Why the stream cannot be framed any further; the connection should be closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message exceeds {0} bytes")]
    TooLarge(usize),
    #[error("no Content-Length on a stream transport")]
    MissingContentLength,
    #[error("unreadable Content-Length")]
    BadContentLength,
    #[error("not SIP")]
    Garbage,
}

/// Accumulates bytes from one connection and cuts messages out of them.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    max: usize,
}

impl Framer {
    pub fn new(max_message: usize) -> Framer {
        Framer {
            buf: BytesMut::with_capacity(4096),
            max: max_message,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether part of a message is waiting for more bytes (the header timeout runs then).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The header section waiting in the buffer, for a best-effort `400` before closing.
    pub fn pending_head(&self) -> Option<&[u8]> {
        head_end(&self.buf).map(|e| &self.buf[..e + 4])
    }

    /// The next frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.buf.starts_with(b"\r\n\r\n") {
                self.buf.advance(4);
                return Ok(Some(Frame::Ping));
            }
            if self.buf.starts_with(b"\r\n") && self.buf.len() >= 4 {
                // A lone CRLF (a pong, or stray line ending) between messages.
                self.buf.advance(2);
                continue;
            }
            break;
        }
        if self.buf.len() <= 2 {
            return Ok(None);
        }
        let Some(end) = head_end(&self.buf) else {
            if self.buf.len() > self.max {
                return Err(FrameError::TooLarge(self.max));
            }
            if !looks_like_sip_start(&self.buf) {
                return Err(FrameError::Garbage);
            }
            return Ok(None);
        };
        if !looks_like_sip_start(&self.buf) {
            return Err(FrameError::Garbage);
        }
        let head = &self.buf[..end + 2];
        let cl = content_length(head)?;
        let total = end + 4 + cl;
        if total > self.max {
            return Err(FrameError::TooLarge(self.max));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        Ok(Some(Frame::Message(self.buf.split_to(total).freeze())))
    }
}

/// Whether the bytes so far could begin a SIP message: a request line ending in `SIP/2.0`, or a
/// status line; judged only once the first line is complete (or long enough to tell).
fn looks_like_sip_start(buf: &[u8]) -> bool {
    let line_end = memchr::memmem::find(buf, b"\r\n");
    let first = match line_end {
        Some(e) => &buf[..e],
        // A read can end between the CR and the LF of the first line.
        None => buf.strip_suffix(b"\r").unwrap_or(buf),
    };
    if first.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return false;
    }
    match line_end {
        None => first.len() < 1024,
        Some(_) => first.starts_with(b"SIP/2.0 ") || first.ends_with(b" SIP/2.0"),
    }
}

/// The Content-Length (or compact `l`) of a header section ending in CRLF.
fn content_length(head: &[u8]) -> Result<usize, FrameError> {
    let mut at = 0;
    for nl in memchr::memchr_iter(b'\n', head) {
        let line = &head[at..nl];
        let first = at == 0;
        at = nl + 1;
        if first {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let v = std::str::from_utf8(line[colon + 1..].trim_ascii())
                .map_err(|_| FrameError::BadContentLength)?;
            return v.parse().map_err(|_| FrameError::BadContentLength);
        }
    }
    Err(FrameError::MissingContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP x\r\nl: 5\r\n\r\nhello";

    #[test]
    fn a_read_ending_between_cr_and_lf_is_not_garbage() {
        let msg: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP x\r\nl: 0\r\n\r\n";
        // Every split point, the one right after the start line's CR included (found when a
        // loaded stream was closed as "not SIP").
        for cut in 1..msg.len() {
            let mut f = Framer::new(4096);
            f.push(&msg[..cut]);
            assert_eq!(f.next_frame(), Ok(None), "cut at {cut}");
            f.push(&msg[cut..]);
            assert_eq!(
                f.next_frame(),
                Ok(Some(Frame::Message(Bytes::copy_from_slice(msg)))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn frames_across_partial_reads() {
        let mut f = Framer::new(4096);
        let mut got = Vec::new();
        let stream = [MSG, MSG].concat();
        for chunk in stream.chunks(7) {
            f.push(chunk);
            while let Some(fr) = f.next_frame().unwrap() {
                got.push(fr);
            }
        }
        assert_eq!(
            got,
            vec![
                Frame::Message(Bytes::from_static(MSG)),
                Frame::Message(Bytes::from_static(MSG))
            ]
        );
        assert!(!f.has_partial());
    }

    #[test]
    fn keepalive_ping_and_stray_crlf() {
        let mut f = Framer::new(4096);
        f.push(b"\r\n\r\n");
        assert_eq!(f.next_frame().unwrap(), Some(Frame::Ping));
        f.push(b"\r\n");
        f.push(MSG);
        assert!(matches!(f.next_frame().unwrap(), Some(Frame::Message(_))));
    }

    #[test]
    fn oversize_is_refused_before_buffering_it_all() {
        let mut f = Framer::new(1024);
        f.push(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 5000\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::TooLarge(1024)));

        let mut f = Framer::new(1024);
        f.push(b"INVITE sip:a@b SIP/2.0\r\n");
        f.push(&vec![b'X'; 2000]);
        assert_eq!(f.next_frame(), Err(FrameError::TooLarge(1024)));
    }

    #[test]
    fn garbage_and_missing_length_are_errors() {
        let mut f = Framer::new(4096);
        f.push(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01]);
        assert_eq!(
            f.next_frame(),
            Err(FrameError::Garbage),
            "a TLS ClientHello is not SIP"
        );

        let mut f = Framer::new(4096);
        f.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::Garbage));

        let mut f = Framer::new(4096);
        f.push(b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::MissingContentLength));
        assert!(f.pending_head().is_some());

        let mut f = Framer::new(4096);
        f.push(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::BadContentLength));
    }

    #[test]
    fn waits_for_the_body() {
        let mut f = Framer::new(4096);
        f.push(&MSG[..MSG.len() - 2]);
        assert_eq!(f.next_frame().unwrap(), None);
        assert!(f.has_partial());
        f.push(&MSG[MSG.len() - 2..]);
        assert!(matches!(f.next_frame().unwrap(), Some(Frame::Message(_))));
    }
}
