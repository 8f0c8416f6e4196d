//! ONC RPC record marking over a byte stream (RFC 5531 section 11), in both
//! directions, without sockets.
//!
//! Owns: splitting the incoming byte stream into records (fragments joined,
//! fragment boundaries invisible), streaming one large opaque per record
//! straight through instead of buffering it (or, `direct_len`, leaving
//! its bytes to a caller that moves them itself, e.g. with `splice(2)`),
//! and turning outgoing records (byte pieces and file pieces) into
//! fragments written until `WouldBlock`.
//! Every byte of a record's framing counts toward its limit: each fragment
//! header after the first costs its 4 bytes (unless its fragment carries
//! streamed data, which the stream's own limit bounds), so an endless run of
//! empty fragments is refused like any oversized record.
//! Must not touch: what the bytes mean. The caller's `classify` closure
//! looks at the head of a record and says how much of it to buffer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};

use byteorder::{BigEndian, ByteOrder};

use crate::xdr::XdrWriter;

/// A fragment mark inside a streamed opaque is read alone
/// (`mark_left_in_stream`) only after a fragment at least this long. Behind
/// small fragments (libtirpc sends 64 KiB ones) one read of the mark with
/// the fragment's bytes costs fewer calls than a 4-byte read and splices.
pub const MARK_ALONE_AFTER: usize = 256 * 1024;

/// The last-fragment bit of a record mark.
pub const LAST_FRAGMENT: u32 = 0x8000_0000;
/// Largest fragment we send: what libtirpc uses by default.
pub const MAX_OUT_FRAGMENT: usize = 65532;

/// What the classifier wants done with the record whose head it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Buffer the head until it holds at least this many bytes, then ask again.
    NeedMore(usize),
    /// Buffer the whole record (up to the decoder's `max_whole`).
    Whole,
    /// The record's tail is one opaque whose 4-byte length sits at this
    /// offset of the head: emit `StreamStart`, then the data as it arrives.
    Stream { len_at: usize },
    /// The record is refused from its head alone (e.g. an RPC version we
    /// do not speak): emit `Discarded` now and drop the rest of the record,
    /// up to the decoder's `max_whole + max_stream` bytes.
    Discard,
}

/// One thing the decoder found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole buffered record (fragments joined).
    Record(Vec<u8>),
    /// The head of a streamed record, up to and including the opaque's length.
    StreamStart { head: Vec<u8>, len: u32 },
    /// Some bytes of the streamed opaque (never the padding).
    StreamData(&'a [u8]),
    /// The streamed record is complete.
    StreamEnd,
    /// The record ended before its streamed opaque did.
    Truncated,
    /// The record broke a size limit; the decoder accepts nothing more.
    /// `head` is empty when the limit broke after the head was handed on.
    TooLarge { head: Vec<u8>, what: &'static str },
    /// The classifier refused this record from its head (`Shape::Discard`);
    /// the rest of it is dropped without further events.
    Discarded { head: Vec<u8> },
}

#[derive(Debug)]
enum Phase {
    Head {
        shape: Shape,
    },
    Stream {
        left: u64,
        pad: usize,
    },
    /// Bytes after a streamed opaque, up to the end of the record.
    Tail,
    /// The rest of a discarded record.
    Skip,
    Failed,
}

/// Incremental record decoder. Feeding a stream in any chunking yields the
/// same events (apart from how `StreamData` is split).
#[derive(Debug)]
pub struct RecordDecoder {
    max_whole: usize,
    max_stream: u64,
    mark: [u8; 4],
    mark_len: usize,
    frag_left: usize,
    last_fragment: bool,
    /// The length of the fragment whose mark came last.
    frag_len: usize,
    in_record: bool,
    head: Vec<u8>,
    phase: Phase,
    /// This record's bytes other than streamed data: fragment headers after
    /// the first, head, padding, tail.
    spent: u64,
    /// What `spent` may reach: `max_whole`, or more for a discarded record.
    allowed: u64,
}

impl RecordDecoder {
    /// `max_whole` bounds buffered records; `max_stream` bounds streamed opaques.
    pub fn new(max_whole: usize, max_stream: u64) -> Self {
        RecordDecoder {
            max_whole,
            max_stream,
            mark: [0; 4],
            mark_len: 0,
            frag_left: 0,
            last_fragment: false,
            frag_len: 0,
            in_record: false,
            head: Vec::new(),
            phase: Phase::Head { shape: Shape::NeedMore(0) },
            spent: 0,
            allowed: max_whole as u64,
        }
    }

    /// True when no partial record is buffered (a clean place to stop).
    pub fn at_boundary(&self) -> bool {
        !self.in_record && self.mark_len == 0
    }

    pub fn failed(&self) -> bool {
        matches!(self.phase, Phase::Failed)
    }

    fn record_ends_here(&self) -> bool {
        self.in_record && self.frag_left == 0 && self.last_fragment && self.mark_len == 0
    }

    fn reset_record(&mut self) {
        self.in_record = false;
        self.last_fragment = false;
        self.phase = Phase::Head { shape: Shape::NeedMore(0) };
        self.spent = 0;
        self.allowed = self.max_whole as u64;
    }

    /// Count `n` bytes against the record's limit; true if it is broken.
    fn spend(&mut self, n: usize) -> bool {
        self.spent += n as u64;
        self.spent > self.allowed
    }

    /// The record broke its limit: nothing more is accepted.
    fn fail(&mut self) -> Event<'static> {
        self.phase = Phase::Failed;
        Event::TooLarge { head: std::mem::take(&mut self.head), what: "record" }
    }

    /// How many bytes coming next in the input are the streamed opaque's
    /// own, with no fragment header or padding among them: a caller may
    /// move them itself (`splice(2)` from a socket to a file) and report
    /// them with `direct_taken` instead of passing them to `decode`. 0 when
    /// anything else comes next.
    pub fn direct_len(&self) -> u64 {
        match self.phase {
            Phase::Stream { left, .. } if self.mark_len == 0 => left.min(self.frag_left as u64),
            _ => 0,
        }
    }

    /// Inside a streamed opaque, at a fragment mark (or part of one) after
    /// a fragment of at least `MARK_ALONE_AFTER` bytes: how many bytes of
    /// the mark are still to come. A caller that moves the opaque's bytes
    /// itself (`direct_len`) reads just these, so that the bytes behind the
    /// mark are moved too, not read into a buffer and copied. 0 anywhere
    /// else (behind small fragments too: a read takes the next one whole).
    pub fn mark_left_in_stream(&self) -> usize {
        match self.phase {
            Phase::Stream { left: 1.., .. }
                if self.frag_left == 0
                    && !(self.in_record && self.last_fragment)
                    && self.frag_len >= MARK_ALONE_AFTER =>
            {
                4 - self.mark_len
            }
            _ => 0,
        }
    }

    /// `n` bytes (at most `direct_len`) of the streamed opaque were moved
    /// by the caller: as if `decode` had passed them on as `StreamData`.
    pub fn direct_taken(&mut self, n: u64) {
        let n = n.min(self.direct_len());
        if let Phase::Stream { left, .. } = &mut self.phase {
            *left -= n;
            self.frag_left -= n as usize;
        }
    }

    /// Consume bytes from `input` until an event is ready or the input is
    /// used up. Returns how many bytes were consumed; call again with the rest.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
        classify: &mut dyn FnMut(&[u8]) -> Shape,
    ) -> (usize, Option<Event<'a>>) {
        let mut pos = 0;
        loop {
            if self.failed() {
                return (input.len(), None);
            }
            // Events that need no more input.
            if let Some(ev) = self.step_without_input(classify) {
                return (pos, Some(ev));
            }
            if pos == input.len() {
                return (pos, None);
            }
            // Need a fragment header?
            if self.frag_left == 0 && !(self.in_record && self.last_fragment) {
                let n = (4 - self.mark_len).min(input.len() - pos);
                self.mark[self.mark_len..self.mark_len + n].copy_from_slice(&input[pos..pos + n]);
                self.mark_len += n;
                pos += n;
                if self.mark_len == 4 {
                    let word = BigEndian::read_u32(&self.mark);
                    self.mark_len = 0;
                    self.frag_left = (word & !LAST_FRAGMENT) as usize;
                    self.frag_len = self.frag_left;
                    self.last_fragment = word & LAST_FRAGMENT != 0;
                    // The first header is free; later ones cost 4 bytes,
                    // unless the fragment carries streamed data.
                    let carries_data = matches!(self.phase, Phase::Stream { left: 1.., .. }) && self.frag_left > 0;
                    let cost = if !self.in_record || carries_data { 0 } else { 4 };
                    self.in_record = true;
                    if self.spend(cost) {
                        return (input.len(), Some(self.fail()));
                    }
                }
                continue;
            }
            let avail = self.frag_left.min(input.len() - pos);
            match &mut self.phase {
                Phase::Head { shape } => {
                    let want = match *shape {
                        Shape::NeedMore(n) => n.saturating_sub(self.head.len()),
                        Shape::Whole => avail,
                        Shape::Stream { len_at } => (len_at + 4).saturating_sub(self.head.len()),
                        Shape::Discard => 0,
                    };
                    let n = want.min(avail);
                    if self.head.len() + n > self.max_whole || self.spend(n) {
                        return (input.len(), Some(self.fail()));
                    }
                    self.head.extend_from_slice(&input[pos..pos + n]);
                    self.frag_left -= n;
                    pos += n;
                }
                Phase::Stream { left, pad } => {
                    if *left > 0 {
                        let n = (avail as u64).min(*left) as usize;
                        *left -= n as u64;
                        self.frag_left -= n;
                        let data = &input[pos..pos + n];
                        return (pos + n, Some(Event::StreamData(data)));
                    }
                    let n = avail.min(*pad);
                    *pad -= n;
                    self.frag_left -= n;
                    pos += n;
                    if *pad == 0 {
                        self.phase = Phase::Tail;
                    }
                    if self.spend(n) {
                        return (input.len(), Some(self.fail()));
                    }
                }
                Phase::Tail | Phase::Skip => {
                    self.frag_left -= avail;
                    pos += avail;
                    if self.spend(avail) {
                        return (input.len(), Some(self.fail()));
                    }
                }
                Phase::Failed => unreachable!("checked above"),
            }
        }
    }

    /// Decisions that depend only on buffered state.
    fn step_without_input(&mut self, classify: &mut dyn FnMut(&[u8]) -> Shape) -> Option<Event<'static>> {
        match self.phase {
            Phase::Head { shape } => {
                // Ask the classifier whenever its last wish has been met.
                let satisfied = match shape {
                    Shape::NeedMore(n) => self.head.len() >= n,
                    _ => false,
                };
                if satisfied && self.in_record {
                    let next = classify(&self.head);
                    self.phase = Phase::Head { shape: next };
                    if next != shape {
                        return self.step_without_input(classify);
                    }
                }
                if shape == Shape::Discard {
                    self.phase = Phase::Skip;
                    self.allowed = (self.max_whole as u64).saturating_add(self.max_stream);
                    return Some(Event::Discarded { head: std::mem::take(&mut self.head) });
                }
                if let Shape::Stream { len_at } = shape {
                    if self.head.len() >= len_at + 4 {
                        let len = BigEndian::read_u32(&self.head[len_at..len_at + 4]);
                        let head = std::mem::take(&mut self.head);
                        if u64::from(len) > self.max_stream {
                            self.phase = Phase::Failed;
                            return Some(Event::TooLarge { head, what: "archive" });
                        }
                        self.phase = Phase::Stream { left: u64::from(len), pad: crate::xdr::padding(len as usize) };
                        return Some(Event::StreamStart { head, len });
                    }
                }
                if self.record_ends_here() {
                    let head = std::mem::take(&mut self.head);
                    self.reset_record();
                    return Some(Event::Record(head));
                }
                None
            }
            Phase::Stream { left: 0, pad: 0 } => {
                self.phase = Phase::Tail;
                self.step_without_input(classify)
            }
            Phase::Stream { .. } if self.record_ends_here() => {
                self.reset_record();
                Some(Event::Truncated)
            }
            Phase::Tail if self.record_ends_here() => {
                self.reset_record();
                Some(Event::StreamEnd)
            }
            Phase::Skip if self.record_ends_here() => {
                self.reset_record();
                None
            }
            _ => None,
        }
    }
}

/// One part of an outgoing record.
#[derive(Debug)]
pub enum Piece {
    Bytes(Vec<u8>),
    /// `len` bytes read from the file's current position. If the file turns
    /// out shorter, the rest is sent as zeros so the framing stays right.
    File {
        file: File,
        len: u64,
    },
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File { len, .. } => *len,
        }
    }
}

/// A record whose tail is a variable-length opaque: `head` (everything
/// before the opaque), then the opaque's length, its bytes from `body`, and
/// the XDR padding.
pub fn with_opaque(head: XdrWriter, body: Piece) -> Vec<Piece> {
    let mut pieces = Vec::with_capacity(3);
    let tail = push_opaque(&mut pieces, head, body);
    pieces.push(Piece::Bytes(tail.into_bytes()));
    pieces
}

/// Append `head` (with the opaque's length) and `body` to `pieces`; return
/// a writer holding the opaque's padding, for whatever follows it.
pub fn push_opaque(pieces: &mut Vec<Piece>, mut head: XdrWriter, body: Piece) -> XdrWriter {
    let len = body.len();
    head.u32(len as u32);
    pieces.push(Piece::Bytes(head.into_bytes()));
    pieces.push(body);
    let mut tail = XdrWriter::new();
    tail.pad(len as usize);
    tail
}

#[derive(Debug)]
struct OutRecord {
    pieces: VecDeque<Piece>,
    left: u64,
}

/// Queue of outgoing records, written as fragments with bounded staging.
///
/// Written to a socket (`write_to_socket`), a file piece's bytes go from
/// the file to the socket with `sendfile(2)`, never through our memory:
/// only fragment headers and byte pieces are staged.
#[derive(Debug)]
pub struct Outbox {
    records: VecDeque<OutRecord>,
    staged: Vec<u8>,
    sent: usize,
    /// Bytes written so far, in all (for progress timeouts).
    written: u64,
    /// Largest fragment this outbox makes.
    max_fragment: usize,
    /// Bytes of the front record's front file piece still to go by
    /// `sendfile` once `staged` is out (its fragment header is staged).
    direct: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::with_max_fragment(MAX_OUT_FRAGMENT)
    }
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// An outbox whose fragments hold up to `max_fragment` bytes (at least
    /// 1): larger than libtirpc's default where the peer is our own
    /// decoder, which takes fragments of any size (fewer headers, and a
    /// file piece goes out in long `sendfile` runs).
    pub fn with_max_fragment(max_fragment: usize) -> Self {
        Outbox {
            records: VecDeque::new(),
            staged: Vec::new(),
            sent: 0,
            written: 0,
            max_fragment: max_fragment.clamp(1, (LAST_FRAGMENT - 1) as usize),
            direct: 0,
        }
    }

    /// Queue one record made of these pieces.
    pub fn push(&mut self, pieces: Vec<Piece>) {
        let left = pieces.iter().map(Piece::len).sum();
        self.records.push_back(OutRecord { pieces: pieces.into(), left });
    }

    /// Queue a record that is just bytes.
    pub fn push_bytes(&mut self, bytes: Vec<u8>) {
        self.push(vec![Piece::Bytes(bytes)]);
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.sent == self.staged.len() && self.direct == 0
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Drop everything not yet sent (the peer is gone); the count of bytes
    /// written stays.
    pub fn discard(&mut self) {
        *self = Outbox { written: self.written, ..Outbox::with_max_fragment(self.max_fragment) };
    }

    /// Stage the next fragment. Returns false when nothing is left.
    /// Stage as many whole fragments as fit in about one fragment's worth of
    /// buffer, so small records and the pieces around a file go out in one
    /// write (no Nagle stalls, fewer system calls).
    /// With `direct`, a file piece's bytes are left for `sendfile`: staging
    /// stops after its fragment header (`self.direct` says how many follow).
    fn refill(&mut self, direct: bool) -> io::Result<bool> {
        self.staged.clear();
        self.sent = 0;
        while self.staged.len() < MAX_OUT_FRAGMENT && self.direct == 0 && self.stage_fragment(direct)? {}
        Ok(!self.staged.is_empty() || self.direct > 0)
    }

    /// Append the next fragment to the staging buffer. False when none is left.
    fn stage_fragment(&mut self, direct: bool) -> io::Result<bool> {
        let Some(rec) = self.records.front_mut() else {
            return Ok(false);
        };
        // Drop empty pieces; a record always ends on a non-empty fragment
        // unless it is empty as a whole.
        while rec.pieces.front().is_some_and(|p| p.len() == 0) {
            rec.pieces.pop_front();
        }
        let Some(piece) = rec.pieces.front_mut() else {
            // An empty record: one empty last fragment.
            self.staged.extend_from_slice(&LAST_FRAGMENT.to_be_bytes());
            self.records.pop_front();
            return Ok(true);
        };
        let n = piece.len().min(self.max_fragment as u64) as usize;
        rec.left -= n as u64;
        let mark = n as u32 | if rec.left == 0 { LAST_FRAGMENT } else { 0 };
        self.staged.extend_from_slice(&mark.to_be_bytes());
        match piece {
            Piece::Bytes(b) => {
                self.staged.extend_from_slice(&b[..n]);
                b.drain(..n);
            }
            Piece::File { .. } if direct => {
                // The record stays queued (it holds the file) until these
                // bytes are sent: `direct_done` takes them off.
                self.direct = n as u64;
                return Ok(true);
            }
            Piece::File { file, len } => {
                fill(file, &mut self.staged, n)?;
                *len -= n as u64;
            }
        }
        if rec.left == 0 {
            self.records.pop_front();
        }
        Ok(true)
    }

    /// `n` bytes of the front file piece went out by `sendfile` (or are
    /// owed as zeros, the file being shorter than promised).
    fn direct_done(&mut self, n: u64) {
        self.direct -= n;
        self.written += n;
        let Some(rec) = self.records.front_mut() else { return };
        if let Some(Piece::File { len, .. }) = rec.pieces.front_mut() {
            *len -= n;
        }
        if self.direct == 0 && rec.left == 0 {
            self.records.pop_front();
        }
    }

    /// Send the front file piece's next bytes straight from the file.
    /// `Ok(None)`: the socket would block.
    fn send_direct(&mut self, sock: std::os::fd::BorrowedFd) -> io::Result<Option<u64>> {
        let Some(Piece::File { file, .. }) = self.records.front_mut().and_then(|r| r.pieces.front_mut()) else {
            return Err(io::Error::other("outbox: a direct send without its file"));
        };
        let want = self.direct.min(1 << 30) as usize;
        loop {
            return match nix::sys::sendfile::sendfile(sock, &*file, None, want) {
                Ok(0) => {
                    // Shorter than promised: the rest goes as zeros, so
                    // the framing stays right.
                    let rest = self.direct;
                    self.staged.resize(self.staged.len() + rest as usize, 0);
                    self.direct_done(rest);
                    self.written -= rest; // counted when the zeros are written
                    Ok(Some(0))
                }
                Ok(k) => Ok(Some(k as u64)),
                Err(nix::Error::EAGAIN) => Ok(None),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EINVAL | nix::Error::ENOSYS) => {
                    // Not a file sendfile reads (a pipe): staged the old way.
                    let rest = self.direct;
                    fill(file, &mut self.staged, rest as usize)?;
                    self.direct_done(rest);
                    self.written -= rest;
                    Ok(Some(0))
                }
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Write until everything is sent (`Ok(true)`) or the writer would block
    /// (`Ok(false)`).
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<bool> {
        loop {
            if self.sent == self.staged.len() && !self.refill(false)? {
                return Ok(true);
            }
            match w.write(&self.staged[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sent += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `write_to` for a socket: file pieces go by `sendfile(2)` (one
    /// kernel copy, no staging), the bytes before them with `MSG_MORE` so
    /// that a fragment header shares a segment with its data.
    pub fn write_to_socket<S: Write + std::os::fd::AsFd>(&mut self, s: &mut S) -> io::Result<bool> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        loop {
            if self.sent < self.staged.len() {
                // MSG_MORE (not in nix): the header waits for the data that follows.
                let more = MsgFlags::from_bits_retain(libc::MSG_MORE);
                let flags = if self.direct > 0 { more } else { MsgFlags::empty() };
                match send(s.as_fd().as_raw_fd(), &self.staged[self.sent..], flags | MsgFlags::MSG_NOSIGNAL) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.sent += n;
                        self.written += n as u64;
                    }
                    Err(nix::Error::EAGAIN) => return Ok(false),
                    Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            if self.direct > 0 {
                match self.send_direct(s.as_fd())? {
                    Some(0) => {} // staged instead (a short file's zeros, or a pipe)
                    Some(k) => self.direct_done(k),
                    None => return Ok(false),
                }
                continue;
            }
            if !self.refill(true)? {
                return Ok(true);
            }
        }
    }
}

/// Append `n` bytes read from `file` to `buf`; zeros where it has none.
fn fill(file: &mut File, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    let start = buf.len();
    buf.resize(start + n, 0);
    let mut filled = 0;
    while filled < n {
        match file.read(&mut buf[start + filled..start + n]) {
            Ok(0) => break, // shorter than promised: zeros remain
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Frame `payload` as one record of a single last fragment.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&(payload.len() as u32 | LAST_FRAGMENT).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Collected events with stream data joined, for comparing chunkings.
    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Seen {
        Record(Vec<u8>),
        Stream { head: Vec<u8>, data: Vec<u8> },
        Truncated,
        TooLarge,
        Discarded(Vec<u8>),
    }

    /// Classifier: a record whose first word is 1 streams an opaque at offset 4.
    fn classify(head: &[u8]) -> Shape {
        if head.len() < 4 {
            return Shape::NeedMore(4);
        }
        if head[..4] == [0, 0, 0, 1] {
            Shape::Stream { len_at: 4 }
        } else if head[..4] == [0, 0, 0, 3] {
            Shape::Discard
        } else {
            Shape::Whole
        }
    }

    fn run(chunks: &[&[u8]], max_whole: usize) -> Vec<Seen> {
        let mut d = RecordDecoder::new(max_whole, 1 << 20);
        let mut seen = Vec::new();
        let mut cls = classify;
        for chunk in chunks {
            let mut rest: &[u8] = chunk;
            loop {
                let (n, ev) = d.decode(rest, &mut cls);
                rest = &rest[n..];
                match ev {
                    Some(Event::Record(r)) => seen.push(Seen::Record(r)),
                    Some(Event::StreamStart { head, .. }) => seen.push(Seen::Stream { head, data: vec![] }),
                    Some(Event::StreamData(d)) => match seen.last_mut() {
                        Some(Seen::Stream { data, .. }) => data.extend_from_slice(d),
                        _ => panic!("data outside a stream"),
                    },
                    Some(Event::StreamEnd) => {}
                    Some(Event::Truncated) => seen.push(Seen::Truncated),
                    Some(Event::TooLarge { .. }) => seen.push(Seen::TooLarge),
                    Some(Event::Discarded { head }) => seen.push(Seen::Discarded(head)),
                    None => break,
                }
            }
        }
        seen
    }

    #[test]
    fn two_fragments_make_one_record() {
        // null-two-fragments.txt: 00 00 00 10 then 80 00 00 18.
        let mut wire = vec![0, 0, 0, 4, 9, 9, 9, 9];
        wire.extend_from_slice(&[0x80, 0, 0, 2, 7, 7]);
        assert_eq!(run(&[&wire], 100), vec![Seen::Record(vec![9, 9, 9, 9, 7, 7])]);
    }

    #[test]
    fn streamed_opaque_skips_padding_and_frame_marks() {
        // word 1, opaque "abcde" + 3 pad, split into fragments inside the data.
        let payload = [0, 0, 0, 1, 0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0];
        let mut wire = vec![0, 0, 0, 10];
        wire.extend_from_slice(&payload[..10]);
        wire.extend_from_slice(&[0x80, 0, 0, 6]);
        wire.extend_from_slice(&payload[10..]);
        assert_eq!(run(&[&wire], 100), vec![Seen::Stream { head: payload[..8].to_vec(), data: b"abcde".to_vec() }]);
    }

    /// Bytes moved around the decoder (`direct_len`, `direct_taken`) are
    /// the opaque's alone: never a fragment header or the padding, and
    /// the events after them are the same as if they had been decoded.
    #[test]
    fn direct_bytes_are_the_opaques_own_and_the_record_ends_the_same() {
        let mut payload = vec![0, 0, 0, 7, 0, 0, 0, 10];
        payload.extend_from_slice(b"0123456789\0\0");
        // Two fragments, the second starting inside the opaque.
        let mut wire = Vec::new();
        for (part, last) in [(&payload[..12], false), (&payload[12..], true)] {
            let mark = part.len() as u32 | if last { LAST_FRAGMENT } else { 0 };
            wire.extend_from_slice(&mark.to_be_bytes());
            wire.extend_from_slice(part);
        }
        let mut d = RecordDecoder::new(1024, 1024);
        let mut classify = |_: &[u8]| Shape::Stream { len_at: 4 };
        let mut at = 0;
        let mut moved = Vec::new();
        let mut events = Vec::new();
        while at < wire.len() || events.last() != Some(&"end".to_string()) {
            let direct = d.direct_len() as usize;
            if direct > 0 {
                let n = direct.min(3);
                moved.extend_from_slice(&wire[at..at + n]);
                d.direct_taken(n as u64);
                at += n;
                continue;
            }
            // One byte at a time otherwise: the decoder gets every chance to
            // hand data on itself, and must not.
            let end = (at + 1).min(wire.len());
            let (n, ev) = d.decode(&wire[at..end], &mut classify);
            at += n;
            match ev {
                Some(Event::StreamStart { len, .. }) => events.push(format!("start {len}")),
                Some(Event::StreamData(b)) => moved.extend_from_slice(b),
                Some(Event::StreamEnd) => events.push("end".to_string()),
                Some(other) => panic!("{other:?}"),
                None => assert!(n > 0 || at == wire.len(), "stuck at {at}"),
            }
        }
        assert_eq!(moved, b"0123456789");
        assert_eq!(events, ["start 10", "end"]);
        assert_eq!(d.direct_len(), 0);
        assert!(d.at_boundary());
    }

    /// A reader that takes just `mark_left_in_stream` bytes at each
    /// fragment mark moves every byte of an opaque split into large
    /// fragments itself: the decoder hands on none of them.
    #[test]
    fn reading_only_the_marks_leaves_every_opaque_byte_to_move() {
        let len = 3 * MARK_ALONE_AFTER + 10;
        let opaque: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut payload = vec![0, 0, 0, 7];
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        payload.extend_from_slice(&opaque);
        // Its padding; then a first fragment with the head and the opaque's
        // start, and fragments of MARK_ALONE_AFTER bytes.
        payload.extend_from_slice(&[0, 0]);
        let mut wire = Vec::new();
        let mut parts = vec![&payload[..MARK_ALONE_AFTER]];
        parts.extend(payload[MARK_ALONE_AFTER..].chunks(MARK_ALONE_AFTER));
        for (i, part) in parts.iter().enumerate() {
            let mark = part.len() as u32 | if i + 1 == parts.len() { LAST_FRAGMENT } else { 0 };
            wire.extend_from_slice(&mark.to_be_bytes());
            wire.extend_from_slice(part);
        }
        let mut d = RecordDecoder::new(1024, 1 << 30);
        let mut classify = |_: &[u8]| Shape::Stream { len_at: 4 };
        assert_eq!(d.mark_left_in_stream(), 0, "before the opaque: any read");
        // The head, and not a byte of the opaque.
        let (mut at, mut moved, mut ended) = (0, Vec::new(), false);
        while !matches!(d.decode(&wire[at..at + 1], &mut classify), (1, Some(Event::StreamStart { .. }))) {
            at += 1;
        }
        at += 1;
        let mut marks = 0;
        while !ended {
            let direct = d.direct_len() as usize;
            if direct > 0 {
                assert_eq!(d.mark_left_in_stream(), 0);
                moved.extend_from_slice(&wire[at..at + direct]);
                d.direct_taken(direct as u64);
                at += direct;
                continue;
            }
            let want = match d.mark_left_in_stream() {
                0 => wire.len() - at,
                n => {
                    marks += 1;
                    n
                }
            };
            let (n, ev) = d.decode(&wire[at..at + want], &mut classify);
            at += n;
            match ev {
                Some(Event::StreamData(b)) => panic!("{} bytes read with a mark", b.len()),
                Some(Event::StreamEnd) => ended = true,
                _ => {}
            }
        }
        assert_eq!(moved, opaque);
        assert_eq!(marks, parts.len() - 1);
        assert_eq!(at, wire.len());
        assert_eq!(d.mark_left_in_stream(), 0);
        assert!(d.at_boundary());
    }

    /// Behind small fragments (libtirpc's) a mark is not read alone: one
    /// read takes it with the fragment's bytes.
    #[test]
    fn marks_behind_small_fragments_are_read_with_their_bytes() {
        let mut payload = vec![0, 0, 0, 7, 0, 0, 0, 10];
        payload.extend_from_slice(b"0123456789\0\0");
        let mut wire = Vec::new();
        let parts: Vec<&[u8]> = payload.chunks(5).collect();
        for (i, part) in parts.iter().enumerate() {
            let mark = part.len() as u32 | if i + 1 == parts.len() { LAST_FRAGMENT } else { 0 };
            wire.extend_from_slice(&mark.to_be_bytes());
            wire.extend_from_slice(part);
        }
        let mut d = RecordDecoder::new(1024, 1024);
        let mut classify = |_: &[u8]| Shape::Stream { len_at: 4 };
        let mut at = 0;
        while at < wire.len() {
            assert_eq!(d.mark_left_in_stream(), 0, "at {at}");
            at += d.decode(&wire[at..at + 1], &mut classify).0;
        }
        assert!(d.at_boundary());
    }

    #[test]
    fn record_ending_inside_stream_is_truncated() {
        let payload = [0, 0, 0, 1, 0, 0, 0, 9, b'a'];
        assert_eq!(run(&[&frame(&payload)], 100)[1], Seen::Truncated);
    }

    #[test]
    fn oversized_record_fails_once() {
        let rec = frame(&[5u8; 64]);
        assert_eq!(run(&[&rec, &rec], 32), vec![Seen::TooLarge]);
    }

    /// `n` empty fragments, then a last one holding `payload`.
    fn empty_fragments_then(n: usize, payload: &[u8]) -> Vec<u8> {
        let mut wire = vec![0u8; 4 * n];
        wire.extend(frame(payload));
        wire
    }

    #[test]
    fn empty_fragments_count_toward_the_record_limit() {
        // A few are harmless; each costs its 4-byte header.
        let ok = empty_fragments_then(10, &[0, 0, 0, 2, 7, 7]);
        assert_eq!(run(&[&ok], 100), vec![Seen::Record(vec![0, 0, 0, 2, 7, 7])]);
        // Without end: refused like any oversized record, whatever the chunking.
        let flood = empty_fragments_then(1000, &[0, 0, 0, 2]);
        assert_eq!(run(&[&flood], 100), vec![Seen::TooLarge]);
        let chunks: Vec<&[u8]> = flood.chunks(3).collect();
        assert_eq!(run(&chunks, 100), vec![Seen::TooLarge]);
        // Inside a streamed opaque, and after it.
        let mut inside = vec![0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4];
        inside.extend(empty_fragments_then(1000, b"abcd"));
        assert_eq!(run(&[&inside], 100).last(), Some(&Seen::TooLarge));
        let mut after = vec![0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 4, b'a', b'b', b'c', b'd'];
        after.extend(empty_fragments_then(1000, b""));
        assert_eq!(run(&[&after], 100).last(), Some(&Seen::TooLarge));
    }

    #[test]
    fn a_stream_sent_in_tiny_fragments_is_not_over_the_limit() {
        // 1-byte fragments of streamed data cost nothing: the stream's own
        // length bounds them.
        let data = [9u8; 500];
        let mut wire = vec![0, 0, 0, 8, 0, 0, 0, 1, 0, 1, 0xf4, 0];
        wire[10..12].copy_from_slice(&(500u16).to_be_bytes());
        wire.truncate(12);
        wire[8..12].copy_from_slice(&500u32.to_be_bytes());
        for b in &data[..499] {
            wire.extend_from_slice(&[0, 0, 0, 1, *b]);
        }
        wire.extend(frame(&[9]));
        assert_eq!(
            run(&[&wire], 100),
            vec![Seen::Stream { head: vec![0, 0, 0, 1, 0, 0, 1, 0xf4], data: data.to_vec() }]
        );
    }

    #[test]
    fn a_discarded_record_is_reported_once_and_skipped() {
        let mut rec = vec![0, 0, 0, 3];
        rec.extend_from_slice(&[5u8; 500]); // over max_whole, but only skipped
        let mut wire = frame(&rec);
        wire.extend(frame(&[0, 0, 0, 2, 1]));
        assert_eq!(run(&[&wire], 100), vec![Seen::Discarded(vec![0, 0, 0, 3]), Seen::Record(vec![0, 0, 0, 2, 1])]);
        // Skipping is bounded too.
        let mut d = RecordDecoder::new(100, 1000);
        let big = frame(&[[0u8, 0, 0, 3].as_slice(), &[0u8; 2000]].concat());
        let (n, ev) = d.decode(&big, &mut classify);
        assert!(matches!(ev, Some(Event::Discarded { .. })));
        let (_, ev) = d.decode(&big[n..], &mut classify);
        assert!(matches!(ev, Some(Event::TooLarge { .. })), "{ev:?}");
    }

    #[test]
    fn outbox_splits_files_into_fragments_and_marks_the_last() {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&vec![7u8; MAX_OUT_FRAGMENT + 10]).unwrap();
        use std::io::Seek;
        tmp.seek(io::SeekFrom::Start(0)).unwrap();
        let mut out = Outbox::new();
        out.push(vec![
            Piece::Bytes(vec![0, 0, 0, 1, 0, 1, 0, 6]),
            Piece::File { file: tmp, len: (MAX_OUT_FRAGMENT + 10) as u64 },
            Piece::Bytes(vec![0, 0]),
        ]);
        let mut wire = Vec::new();
        assert!(out.write_to(&mut wire).unwrap());
        assert!(out.is_empty());
        // Four fragments; only the last has the top bit.
        let marks: Vec<u32> = {
            let mut v = vec![];
            let mut p = 0;
            while p < wire.len() {
                let m = BigEndian::read_u32(&wire[p..]);
                v.push(m);
                p += 4 + (m & !LAST_FRAGMENT) as usize;
            }
            v
        };
        assert_eq!(marks, vec![8, MAX_OUT_FRAGMENT as u32, 10, 2 | LAST_FRAGMENT]);
        assert_eq!(
            run(&[&wire], 100),
            vec![Seen::Stream { head: vec![0, 0, 0, 1, 0, 1, 0, 6], data: vec![7u8; MAX_OUT_FRAGMENT + 10] }]
        );
    }

    /// Counts write calls, to see that small pieces share one write.
    struct CountingWriter(Vec<u8>, usize);

    impl Write for CountingWriter {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.1 += 1;
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_fragments_go_out_in_one_write() {
        let mut out = Outbox::new();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"tiny\n").unwrap();
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(0)).unwrap();
        out.push(vec![Piece::Bytes(vec![1; 40]), Piece::File { file, len: 5 }, Piece::Bytes(vec![0; 3])]);
        out.push_bytes(vec![2; 8]);
        let mut w = CountingWriter(Vec::new(), 0);
        assert!(out.write_to(&mut w).unwrap());
        assert_eq!(w.1, 1, "one write for two records of four fragments");
        assert_eq!(run(&[&w.0], 100).len(), 2);
    }

    /// Everything an outbox sends to a socket, read from the other end.
    fn through_socket(out: &mut Outbox) -> Vec<u8> {
        use std::os::unix::net::UnixStream;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut wire = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        b.set_nonblocking(true).unwrap();
        loop {
            let done = out.write_to_socket(&mut a).unwrap();
            loop {
                match b.read(&mut buf) {
                    Ok(n) => wire.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            if done {
                return wire;
            }
        }
    }

    fn file_with(data: &[u8]) -> File {
        use std::io::Seek;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f.seek(io::SeekFrom::Start(0)).unwrap();
        f
    }

    /// A streamed record's pieces: word 1, then `len` opaque bytes from
    /// `file`, then the padding.
    fn streamed(file: File, len: usize) -> Vec<Piece> {
        let mut head = crate::xdr::XdrWriter::new();
        head.u32(1);
        with_opaque(head, Piece::File { file, len: len as u64 })
    }

    fn head_of(len: usize) -> Vec<u8> {
        [1u32, len as u32].iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    #[test]
    fn a_socket_gets_file_pieces_by_sendfile_and_the_same_records() {
        // Whatever the fragment size, the socket path (sendfile) puts the
        // same records on the wire as the copying path.
        let data: Vec<u8> = (0..(3 * MAX_OUT_FRAGMENT + 77)).map(|i| (i % 251) as u8).collect();
        let expected =
            vec![Seen::Stream { head: head_of(data.len()), data: data.clone() }, Seen::Record(vec![0, 0, 0, 2, 9])];
        for max in [7, MAX_OUT_FRAGMENT, 1 << 20] {
            let mut out = Outbox::with_max_fragment(max);
            out.push(streamed(file_with(&data), data.len()));
            out.push_bytes(vec![0, 0, 0, 2, 9]);
            let wire = through_socket(&mut out);
            assert!(out.is_empty());
            assert_eq!(out.written(), wire.len() as u64);
            let mut copied = Outbox::with_max_fragment(max);
            copied.push(streamed(file_with(&data), data.len()));
            copied.push_bytes(vec![0, 0, 0, 2, 9]);
            let mut copy_wire = Vec::new();
            assert!(copied.write_to(&mut copy_wire).unwrap());
            assert!(wire == copy_wire, "fragment size {max}: the two paths differ");
            assert!(run(&[&wire], 1 << 20) == expected, "fragment size {max}: wrong records");
        }
        // The default outbox makes libtirpc-sized fragments on a socket too.
        let mut out = Outbox::new();
        out.push(streamed(file_with(&data), data.len()));
        let wire = through_socket(&mut out);
        assert_eq!(BigEndian::read_u32(&wire[12..]), MAX_OUT_FRAGMENT as u32);
    }

    #[test]
    fn a_file_shorter_than_promised_is_sent_with_zeros_by_sendfile_too() {
        let mut out = Outbox::with_max_fragment(1 << 20);
        out.push(streamed(file_with(b"abc"), 10));
        out.push_bytes(vec![0, 0, 0, 2]);
        let wire = through_socket(&mut out);
        let mut want = b"abc".to_vec();
        want.resize(10, 0);
        assert_eq!(
            run(&[&wire], 100),
            vec![Seen::Stream { head: head_of(10), data: want }, Seen::Record(vec![0, 0, 0, 2])]
        );
    }

    fn arb_records() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 4..40).prop_map(|mut v| {
                    v[..4].copy_from_slice(&[0, 0, 0, 2]);
                    v
                }),
                prop::collection::vec(any::<u8>(), 0..300).prop_map(|data| {
                    let mut w = crate::xdr::XdrWriter::new();
                    w.u32(1).opaque(&data);
                    w.into_bytes()
                }),
            ],
            1..6,
        )
    }

    /// Frame records with fragment splits at the given fractions.
    fn frame_split(rec: &[u8], cut: usize) -> Vec<u8> {
        let cut = if rec.is_empty() { 0 } else { cut % rec.len() };
        let mut wire = Vec::new();
        wire.extend_from_slice(&(cut as u32).to_be_bytes());
        wire.extend_from_slice(&rec[..cut]);
        wire.extend_from_slice(&frame(&rec[cut..]));
        wire
    }

    proptest! {
        #[test]
        fn chunking_and_fragmenting_change_nothing(
            recs in arb_records(),
            cuts in prop::collection::vec(any::<usize>(), 6),
            chunk in 1usize..50,
        ) {
            let whole: Vec<u8> = recs.iter().flat_map(|r| frame(r)).collect();
            let split: Vec<u8> = recs.iter().zip(cuts.iter().cycle()).flat_map(|(r, c)| frame_split(r, *c)).collect();
            let expected = run(&[&whole], 1000);
            let chunks: Vec<&[u8]> = split.chunks(chunk).collect();
            prop_assert_eq!(run(&chunks, 1000), expected.clone());
            let bytes: Vec<&[u8]> = whole.chunks(1).collect();
            prop_assert_eq!(run(&bytes, 1000), expected.clone());
            prop_assert_eq!(expected.len(), recs.len());
        }
    }
}
