//! Stream framing (RFC 3261 §18.3): a message on TCP ends where its Content-Length says. Also
//! recognizes RFC 5626 keep-alives (a double CRLF "ping", answered by a single CRLF "pong").

use crate::sip::message::head_end;
use bytes::{Buf, BytesMut};
use thiserror::Error;

/// What the framer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One whole message, borrowed from the framer's buffer until its next call.
    Message(&'a [u8]),
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
    /// Length of the message last handed out, dropped from `buf` at the next call (the message
    /// is lent, not copied out).
    lent: usize,
    max: usize,
}

impl Framer {
    pub fn new(max_message: usize) -> Framer {
        Framer {
            buf: BytesMut::with_capacity(4096),
            lent: 0,
            max: max_message,
        }
    }

    fn release(&mut self) {
        if self.lent > 0 {
            self.buf.advance(self.lent);
            self.lent = 0;
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.release();
        self.buf.extend_from_slice(data);
    }

    /// Whether part of a message is waiting for more bytes (the header timeout runs then).
    pub fn has_partial(&self) -> bool {
        self.buf.len() > self.lent
    }

    /// The header section waiting in the buffer, for a best-effort `400` before closing.
    pub fn pending_head(&self) -> Option<&[u8]> {
        let rest = &self.buf[self.lent..];
        head_end(rest).map(|e| &rest[..e + 4])
    }

    /// The next frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        self.release();
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
        if self.buf.len() <= 2 || self.buf.starts_with(b"\r\n") {
            // Too short to tell, or a CRLF whose next bytes have not come yet.
            return Ok(None);
        }
        let head = scan_head(&self.buf);
        if !head.sip_start {
            return Err(FrameError::Garbage);
        }
        let Some(end) = head.end else {
            if self.buf.len() > self.max {
                return Err(FrameError::TooLarge(self.max));
            }
            return Ok(None);
        };
        let cl = head
            .content_length
            .ok_or(FrameError::MissingContentLength)??;
        let total = end + 4 + cl;
        if total > self.max {
            return Err(FrameError::TooLarge(self.max));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        self.lent = total;
        Ok(Some(Frame::Message(&self.buf[..total])))
    }
}

/// What one pass over the line ends of the buffered bytes found.
struct Head {
    /// Whether the bytes so far could begin a SIP message.
    sip_start: bool,
    /// Where the blank line's CRLFCRLF begins (as [`head_end`]), once the header section is in.
    end: Option<usize>,
    /// The first Content-Length (or compact `l`) header's value.
    content_length: Option<Result<usize, FrameError>>,
}

/// One pass over the line ends: the start line judged, the first Content-Length read (only lines
/// starting with `c` or `l` are looked at), the end of the header section found.
fn scan_head(buf: &[u8]) -> Head {
    let mut head = Head {
        sip_start: true,
        end: None,
        content_length: None,
    };
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', buf) {
        let line = &buf[start..nl];
        if start == 0 {
            head.sip_start = is_sip_start_line(line.strip_suffix(b"\r").unwrap_or(line), true);
            if !head.sip_start {
                return head;
            }
        } else if line == b"\r" && buf[start - 2] == b'\r' {
            head.end = Some(start - 2);
            return head;
        } else if head.content_length.is_none()
            && matches!(line.first(), Some(b'c' | b'C' | b'l' | b'L'))
        {
            head.content_length = content_length(line);
        }
        start = nl + 1;
    }
    if start == 0 {
        // No complete first line yet; a read can end between its CR and LF.
        head.sip_start = is_sip_start_line(buf.strip_suffix(b"\r").unwrap_or(buf), false);
    }
    head
}

/// Whether `first` could be a SIP start line: no control characters, and (once complete) a
/// request line ending in `SIP/2.0` or a status line; an incomplete one only while short.
fn is_sip_start_line(first: &[u8], complete: bool) -> bool {
    if first.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return false;
    }
    if complete {
        first.starts_with(b"SIP/2.0 ") || first.ends_with(b" SIP/2.0")
    } else {
        first.len() < 1024
    }
}

/// The value of `line` when it is a Content-Length (or compact `l`) header line.
fn content_length(line: &[u8]) -> Option<Result<usize, FrameError>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let colon = memchr::memchr(b':', line)?;
    let name = line[..colon].trim_ascii();
    if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
        return None;
    }
    let v = line[colon + 1..].trim_ascii();
    if v.is_empty() || v.len() > 9 || !v.iter().all(u8::is_ascii_digit) {
        return Some(Err(FrameError::BadContentLength));
    }
    Some(Ok(v
        .iter()
        .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0'))))
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
                Ok(Some(Frame::Message(msg))),
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
                match fr {
                    Frame::Message(m) => got.push(m.to_vec()),
                    Frame::Ping => panic!("no ping was sent"),
                }
            }
        }
        assert_eq!(got, vec![MSG.to_vec(), MSG.to_vec()]);
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

        // A pong and the first byte of the next message in one read: wait, not garbage.
        let mut f = Framer::new(4096);
        f.push(b"\r\nM");
        assert_eq!(f.next_frame(), Ok(None));
        f.push(&MSG[1..]);
        assert_eq!(f.next_frame(), Ok(Some(Frame::Message(MSG))));
        assert!(!f.has_partial());
    }

    #[test]
    fn the_first_content_length_frames_and_only_digits_are_a_length() {
        let two = b"MESSAGE sip:a@b SIP/2.0\r\ncontent-length: 2\r\nL: 5\r\n\r\nhi";
        let mut f = Framer::new(4096);
        f.push(two);
        assert_eq!(f.next_frame(), Ok(Some(Frame::Message(&two[..]))));
        assert!(!f.has_partial());
        for bad in ["+2", "2x", "", "12345678901"] {
            let mut f = Framer::new(4096);
            f.push(format!("MESSAGE sip:a@b SIP/2.0\r\nl: {bad}\r\n\r\nhi").as_bytes());
            assert_eq!(f.next_frame(), Err(FrameError::BadContentLength), "{bad:?}");
        }
        // A header merely starting with `c` or `l` is not the length.
        let mut f = Framer::new(4096);
        f.push(b"MESSAGE sip:a@b SIP/2.0\r\nContact: <sip:a@b>\r\nLength: 3\r\n\r\n");
        assert_eq!(f.next_frame(), Err(FrameError::MissingContentLength));
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
