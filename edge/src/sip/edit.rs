//! Forwarding by splicing: a list of non-overlapping byte edits over the original message, applied
//! in one pass into one new buffer. The body and every untouched header are copied as they were.

use smallvec::SmallVec;
use std::borrow::Cow;
use std::ops::Range;

/// The bytes an edit puts in: borrowed when they outlive the edit (the stamped Via), owned
/// otherwise.
#[derive(Debug)]
pub struct Piece<'a>(Cow<'a, [u8]>);

impl<'a> From<&'a [u8]> for Piece<'a> {
    fn from(b: &'a [u8]) -> Self {
        Piece(Cow::Borrowed(b))
    }
}

impl<'a> From<&'a str> for Piece<'a> {
    fn from(s: &'a str) -> Self {
        Piece(Cow::Borrowed(s.as_bytes()))
    }
}

impl From<Vec<u8>> for Piece<'_> {
    fn from(b: Vec<u8>) -> Self {
        Piece(Cow::Owned(b))
    }
}

impl From<String> for Piece<'_> {
    fn from(s: String) -> Self {
        Piece(Cow::Owned(s.into_bytes()))
    }
}

/// Edits to make to `buf`; insertions at the same offset keep the order they were added in.
/// A forwarded message takes at most a handful, kept on the stack.
#[derive(Debug)]
pub struct Edit<'a> {
    buf: &'a [u8],
    ops: SmallVec<[(Range<usize>, Piece<'a>); 6]>,
}

impl<'a> Edit<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Edit {
            buf,
            ops: SmallVec::new(),
        }
    }

    /// Inserts `bytes` before offset `at`.
    pub fn insert(&mut self, at: usize, bytes: impl Into<Piece<'a>>) {
        self.ops.push((at..at, bytes.into()));
    }

    /// Replaces `range` with `bytes`.
    pub fn replace(&mut self, range: Range<usize>, bytes: impl Into<Piece<'a>>) {
        self.ops.push((range, bytes.into()));
    }

    /// Removes `range`.
    pub fn remove(&mut self, range: Range<usize>) {
        self.ops.push((range, Piece(Cow::Borrowed(&[]))));
    }

    /// Applies the edits. Overlapping edits are a bug in the caller; the later one is skipped
    /// rather than producing a corrupt message.
    pub fn finish(mut self) -> Vec<u8> {
        self.ops.sort_by_key(|(r, _)| (r.start, r.end));
        let extra: usize = self.ops.iter().map(|(_, b)| b.0.len()).sum();
        let mut out = Vec::with_capacity(self.buf.len() + extra);
        let mut pos = 0;
        for (r, bytes) in &self.ops {
            if r.start < pos || r.end > self.buf.len() {
                debug_assert!(false, "overlapping edit {r:?} at {pos}");
                continue;
            }
            out.extend_from_slice(&self.buf[pos..r.start]);
            out.extend_from_slice(&bytes.0);
            pos = r.end;
        }
        out.extend_from_slice(&self.buf[pos..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_edits_in_offset_order() {
        let src = b"0123456789";
        let mut e = Edit::new(src);
        e.replace(7..9, "xy");
        e.insert(2, "A");
        e.insert(2, "B");
        e.remove(4..6);
        assert_eq!(e.finish(), b"01AB236xy9");
    }

    #[test]
    fn no_edits_copies() {
        assert_eq!(Edit::new(b"abc").finish(), b"abc");
    }
}
