//! One connection of the reactor: its socket, role, protocol reader,
//! outbox, the sink a streamed opaque goes to, and its lingering close.
//!
//! Owns: the per-connection state `reactor` drives ([`Conn`]), what a
//! streamed archive or output is spooled into ([`Sink`], a file taken
//! from a `pool` for the opaque's length, given back to it if the stream
//! fails, cut to the bytes written when it ends if it was the pool's
//! spare written over (`Sink::end`); an archive (a node's NODE_RUN or
//! NODE_STAGE, a client's DEPLOY past its first read) is spliced from the
//! socket into it through the reactor's one [`SplicePipe`], a DEPLOY's
//! then read back for its check), when a client is busy (served one
//! call at a time), what phase it is in for `timers` (idle, reading,
//! writing, owed a reply), when a closing connection owes its peer
//! nothing more, and a node link's `node_auth::NodeGate` (with its
//! handshake deadline), which lives and dies with the connection; when a
//! client is at rest between calls and what it shrinks to then ([`Idle`]:
//! its socket and peer, no heap), and waking it again; a client whose
//! staged upload waits for its node (`stalled`: busy, not read).
//! Must not touch: the poll or the slab (the reactor registers, times and
//! closes connections), what calls mean (`coordinator`, `node`).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use mio::net::TcpStream;
use mio::Token;

use crate::archive_check::ArchiveCheck;
use crate::peer::PeerId;
use crate::pool;
use crate::proto::{self, RunArgs, CLOUD_PROGRAM, NODE_PROGRAM};
use crate::record::Outbox;
use crate::scheduler::NodeId;
use crate::session::{CallReader, ReplyReader};
use crate::timers::Phase;

/// Largest buffered (non-streamed) record: calls and small replies.
pub(crate) const MAX_RECORD: usize = 64 * 1024;

/// Largest fragment sent on a node link (both ends are cloud-servers).
const LINK_FRAGMENT: usize = 8 << 20;

/// A call on a node link, remembered until its reply.
#[derive(Debug)]
pub(crate) enum Pending {
    /// NODE_RUN of this ticket.
    Run(u32),
    Fetch {
        ticket: u32,
        replica: u32,
        into: PathBuf,
    },
    /// NODE_DROP or NODE_STOP: nothing to do with the reply.
    Drop,
    /// Setting the link up (`main_service`): NODE_HELLO and NODE_AUTH of
    /// the handshake, or without a secret a NODE_NULL that asks whether the
    /// node takes calls without one.
    Hello,
    Auth,
    Probe,
    /// A NODE_NULL heartbeat on a Ready link (`main_service::heartbeats`).
    Heartbeat,
    /// NODE_FOLLOW for a client's FOLLOW call.
    Follow {
        caller: crate::coordinator::Caller,
    },
    /// NODE_STAGE of the upload on client connection `client`, `stage`.
    Stage {
        client: usize,
        stage: crate::coordinator::StageId,
    },
}

/// NODE_FETCH's successful results end in the output, streamed.
fn pending_stream_at(p: &Pending) -> Option<usize> {
    matches!(p, Pending::Fetch { .. }).then_some(proto::FETCH_OUTPUT_AT)
}

#[derive(Debug)]
pub(crate) enum Role {
    /// A client of the main server.
    Client,
    /// A node's end of the link from the main server.
    NodeInbound(NodeId),
    /// The main server's end of the link to a node.
    NodeLink { node: NodeId, connected: bool },
}

/// The connection's protocol state machine (`session`).
#[derive(Debug)]
pub(crate) enum Reader {
    /// We serve calls (a client's connection, or a node's inbound link).
    Calls(CallReader),
    /// We make calls (the main server's link to a node).
    Replies(ReplyReader<Pending>),
}

/// Where a streamed opaque goes.
#[derive(Debug)]
pub(crate) enum Sink {
    None,
    /// An archive or output spooled to a file.
    File {
        xid: u32,
        what: Streamed,
        file: Option<File>,
        path: PathBuf,
        error: Option<String>,
        /// The pool the file came from (and goes back to if the stream
        /// fails); `None`: a file of its own, removed if it fails.
        pool: Option<pool::Shared>,
        /// The file is its pool's spare, written over from offset 0 and
        /// not emptied: cut to the bytes written when the stream ends
        /// (`end`), before anything reads it.
        cut: bool,
    },
}

impl Sink {
    /// A file taken from `pool` for the stream of call `xid`, whose
    /// opaque is `len` bytes long (a large one may get the pool's spare).
    pub(crate) fn take(xid: u32, what: Streamed, pool: &pool::Shared, len: u64) -> Sink {
        let taken = pool.borrow_mut().take_for(Some(len));
        match taken {
            Ok(pool::Taken { file, path, spare }) => {
                Sink::File { xid, what, file: Some(file), path, error: None, pool: Some(pool.clone()), cut: spare }
            }
            Err(e) => {
                log::error!("cannot take a file for a stream: {e}");
                Sink::failed(xid, what, store_error(&e))
            }
        }
    }

    /// A stream that will be swallowed and then reported as failed.
    pub(crate) fn failed(xid: u32, what: Streamed, error: String) -> Sink {
        Sink::File { xid, what, file: None, path: PathBuf::new(), error: Some(error), pool: None, cut: false }
    }

    /// The stream is whole: the sink, taken out (`Sink::None` left). A
    /// spare written over is cut to the bytes written first, so that no
    /// byte of its previous user is past them; if it cannot be, the
    /// stream fails and the file goes back to its pool.
    pub(crate) fn end(&mut self) -> Sink {
        let mut old = std::mem::replace(self, Sink::None);
        if let Sink::File { file: file @ Some(_), path, error, pool, cut: true, .. } = &mut old {
            if let Some(Err(e)) = file.as_mut().map(pool::cut) {
                log::error!("cannot cut {} to its length: {e}", path.display());
                error.get_or_insert_with(|| store_error(&e));
                *file = None;
                give_back(path, pool.as_ref());
                // Given back once: nothing more for the caller to give.
                *path = PathBuf::new();
            }
        }
        old
    }

    /// Append to the spool file; a failure turns the sink into a failed one.
    pub(crate) fn write(&mut self, data: &[u8]) {
        let Sink::File { file: Some(f), what, .. } = self else { return };
        match f.write_all(data) {
            Ok(()) => what.spooled(data.len()),
            Err(e) => self.fail("write", &e),
        }
    }

    /// The spool file could not be written or read back: the sink is a
    /// failed one from now on, its file given back.
    fn fail(&mut self, doing: &str, e: &io::Error) {
        let Sink::File { file, path, error, pool, .. } = self else { return };
        log::error!("cannot {doing} {}: {e}", path.display());
        *error = Some(store_error(e));
        *file = None;
        give_back(path, pool.as_ref());
        // Given back once: nothing more for the stream's end to give.
        *path = PathBuf::new();
    }

    /// A DEPLOY's bytes spliced into its spool file and not yet checked:
    /// where they begin in the file (every byte before was checked) and
    /// how many there are. None: not a DEPLOY being taken.
    pub(crate) fn unchecked(&self) -> Option<(u64, u64)> {
        match self {
            Sink::File { file: Some(_), what: Streamed::Deploy { check, spooled, .. }, error: None, .. } => {
                Some((check.fed(), spooled.saturating_sub(check.fed())))
            }
            _ => None,
        }
    }

    /// Read back into `buf` spool file bytes from `at` (a DEPLOY's bytes
    /// that came by `splice_from`, so from the page cache while it is
    /// warm: cheaper than the socket's copy the splice replaced). None: the
    /// file could not be read, and the sink is a failed one now.
    pub(crate) fn read_back(&mut self, buf: &mut [u8], at: u64) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        let Sink::File { file: Some(f), .. } = self else { return None };
        let e = loop {
            match f.read_at(buf, at) {
                Ok(0) => break io::Error::from(io::ErrorKind::UnexpectedEof),
                Ok(k) => return Some(k),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break e,
            }
        };
        self.fail("read back", &e);
        None
    }

    /// Move up to `want` bytes of the stream from `sock` straight into the
    /// spool file through `pipe` (`splice(2)`: the socket's pages into the
    /// pipe, then into the file, no copy through our memory): a NODE_RUN or
    /// NODE_STAGE archive, which nothing here needs to look at, and a
    /// DEPLOY's, whose check then reads the bytes back from the file
    /// (`check_spliced`: from the page cache, cheaper than the socket's
    /// copy it replaces). `Ok(0)`: the peer's end of the stream;
    /// `WouldBlock`: nothing to read now. A file that cannot take the data
    /// turns the sink into a failed one, like `write`.
    pub(crate) fn splice_from(
        &mut self,
        sock: std::os::fd::BorrowedFd,
        pipe: &SplicePipe,
        want: u64,
    ) -> io::Result<usize> {
        use nix::fcntl::{splice, SpliceFFlags};
        let Sink::File {
            file: Some(f),
            what: what @ (Streamed::Run { .. } | Streamed::Stage { .. } | Streamed::Deploy { .. }),
            ..
        } = self
        else {
            return Err(io::Error::other("a spliced stream without its file"));
        };
        let want = want.min(pipe.size as u64) as usize;
        let got = loop {
            match splice(sock, None, &pipe.w, None, want, SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK)
            {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        let mut left = got;
        let mut failed = None;
        while left > 0 {
            match splice(&pipe.r, None, &*f, None, left, SpliceFFlags::SPLICE_F_MOVE) {
                Ok(0) => break,
                Ok(n) => {
                    left -= n;
                    what.spooled(n);
                }
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    failed = Some(io::Error::from(e));
                    break;
                }
            }
        }
        if left > 0 {
            // What the file did not take is dropped: the pipe is empty for
            // the next stream, and this one is failed.
            pipe.drain(left);
            self.fail("write", &failed.unwrap_or_else(|| io::ErrorKind::WriteZero.into()));
        }
        Ok(got)
    }

    /// A stream whose data may go by `splice_from`.
    pub(crate) fn spliceable(&self) -> bool {
        matches!(
            self,
            Sink::File {
                file: Some(_),
                error: None,
                what: Streamed::Run { .. } | Streamed::Stage { .. } | Streamed::Deploy { .. },
                ..
            }
        )
    }

    /// Bytes a DEPLOY's archive check inflated since the last call.
    pub(crate) fn inflated_since(&mut self) -> u64 {
        match self {
            Sink::File { what: Streamed::Deploy { check, .. }, .. } => check.take_inflated(),
            _ => 0,
        }
    }

    /// Drop the stream in progress and its file; returns what it was.
    pub(crate) fn discard(&mut self) -> Sink {
        let mut old = std::mem::replace(self, Sink::None);
        if let Sink::File { path, file: file @ Some(_), pool, .. } = &mut old {
            // Closed first: a pool empties a file only when nobody has it open.
            *file = None;
            give_back(path, pool.as_ref());
        }
        old
    }
}

/// The pipe `Sink::splice_from` moves a stream's data through: one for
/// the whole reactor, empty between calls.
#[derive(Debug)]
pub(crate) struct SplicePipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
    size: usize,
}

impl SplicePipe {
    /// A pipe of about `size` bytes (the kernel may give less).
    pub(crate) fn new(size: usize) -> io::Result<SplicePipe> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let size = fcntl(&w, FcntlArg::F_SETPIPE_SZ(size as libc::c_int))
            .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |n| n.max(4096) as usize);
        Ok(SplicePipe { r, w, size })
    }

    /// Read and drop `n` bytes left in the pipe.
    fn drain(&self, mut n: usize) {
        let mut buf = [0u8; 8192];
        while n > 0 {
            match nix::unistd::read(&self.r, &mut buf[..n.min(8192)]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n -= k,
            }
        }
    }
}

/// A stream's file that is not needed: back to its pool, or removed (an
/// empty path: the file is not the stream's, as a node's stage, whose
/// owner decides).
pub(crate) fn give_back(path: &Path, pool: Option<&pool::Shared>) {
    if path.as_os_str().is_empty() {
        return;
    }
    match pool {
        Some(p) => p.borrow_mut().give(path),
        None => {
            let _ = fs::remove_file(path);
        }
    }
}

#[derive(Debug)]
pub(crate) enum Streamed {
    /// The archive is checked as it arrives (`archive_check`).
    Deploy {
        replicas: u32,
        /// DEPLOY_OPTS flags (`proto::DEPLOY_FAIL_FAST`); 0 for DEPLOY.
        flags: u32,
        who: Option<u32>,
        check: Box<ArchiveCheck>,
        /// Bytes in the spool file so far; those past `check.fed()` came
        /// by `splice_from` and wait to be read back and checked.
        spooled: u64,
    },
    Run {
        args: RunArgs,
    },
    /// NODE_STAGE: bytes of a stage of the link (`node_service`).
    Stage {
        args: proto::StageArgs,
        len: u64,
    },
    /// `gone`: the node said it has no output (final), rather than a
    /// failure that may pass.
    Fetch {
        ticket: u32,
        replica: u32,
        gone: bool,
    },
}

impl Streamed {
    /// `n` more bytes reached the stream's file.
    fn spooled(&mut self, n: usize) {
        if let Streamed::Deploy { spooled, .. } = self {
            *spooled += n as u64;
        }
    }
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) token: Token,
    pub(crate) role: Role,
    pub(crate) reader: Reader,
    pub(crate) outbox: Outbox,
    pub(crate) sink: Sink,
    /// Close once the outbox is sent.
    pub(crate) closing: bool,
    pub(crate) linger: Linger,
    pub(crate) writable: bool,
    /// Calls handed to the coordinator and not yet answered.
    pub(crate) awaiting: usize,
    /// Bytes read but not yet decoded, held while a client waits for a reply.
    pub(crate) held: Vec<u8>,
    /// The socket may hold input not read yet: the last read filled the
    /// buffer, or the poller reported the peer's end. After a reply such a
    /// connection is read again; otherwise new input brings a new edge.
    pub(crate) unread: bool,
    /// The poller reported the peer's end of the stream (EPOLLRDHUP).
    pub(crate) read_closed: bool,
    /// Who a client connection belongs to, found once at accept.
    pub(crate) peer: PeerId,
    /// Bytes read since the timers last heard of this connection.
    pub(crate) moved: u64,
    /// `outbox.written()` when the timers last heard of it.
    pub(crate) written_seen: u64,
    /// A node's inbound link with a secret: every call passes the gate
    /// (`node_auth`) first.
    pub(crate) gate: Option<Box<crate::node_auth::NodeGate>>,
    /// When a gated link must have passed its handshake by (else closed).
    pub(crate) gate_by: Option<std::time::Instant>,
    /// A client's upload is staged to a node that is behind: nothing more
    /// of it is read until the node catches up (`main_service`).
    pub(crate) stalled: bool,
}

impl Conn {
    /// A new connection in `role` from `peer`, registered under `token`;
    /// streamed opaques up to `max_stream` bytes are accepted.
    pub(crate) fn new(
        stream: TcpStream,
        token: Token,
        role: Role,
        peer: PeerId,
        writable: bool,
        max_stream: u64,
    ) -> Conn {
        let reader = match role {
            Role::Client => Reader::Calls(CallReader::new(CLOUD_PROGRAM, MAX_RECORD, max_stream)),
            Role::NodeInbound(_) => Reader::Calls(CallReader::new(NODE_PROGRAM, MAX_RECORD, max_stream)),
            Role::NodeLink { .. } => {
                Reader::Replies(ReplyReader::new(MAX_RECORD, u64::from(u32::MAX), pending_stream_at))
            }
        };
        // Both ends of a node link are ours and take fragments of any size:
        // an archive or output goes in long sendfile runs. Clients get
        // libtirpc's size (rpcgen clients read our replies).
        let outbox = match role {
            Role::Client => Outbox::new(),
            Role::NodeInbound(_) | Role::NodeLink { .. } => Outbox::with_max_fragment(LINK_FRAGMENT),
        };
        Conn {
            stream,
            token,
            role,
            reader,
            outbox,
            sink: Sink::None,
            closing: false,
            linger: Linger::No,
            writable,
            awaiting: 0,
            held: Vec::new(),
            unread: true,
            read_closed: false,
            peer,
            moved: 0,
            written_seen: 0,
            gate: None,
            gate_by: None,
            stalled: false,
        }
    }

    /// A client is served one call at a time: while its reply is pending
    /// (deferred or unsent), nothing more of it is read. This bounds what
    /// any one connection can make the server hold, whatever it pipelines.
    pub(crate) fn busy(&self) -> bool {
        matches!(self.role, Role::Client) && (self.awaiting > 0 || !self.outbox.is_empty() || self.stalled)
    }

    /// Closing, and owing the peer nothing more: a client that half-closed
    /// after its call still gets the answer.
    pub(crate) fn finished(&self) -> bool {
        self.closing && self.outbox.is_empty() && self.awaiting == 0 && self.linger == Linger::No
    }

    /// What a client connection is doing now, for `timers`, and the bytes
    /// it read or wrote since the last time it was asked; `None` for the
    /// node links, which are not timed.
    pub(crate) fn timer_phase(&mut self) -> Option<(Phase, u64)> {
        if !matches!(self.role, Role::Client) {
            return None;
        }
        let calls = match &self.reader {
            Reader::Calls(r) => r.at_boundary(),
            Reader::Replies(_) => true,
        };
        let written = self.outbox.written();
        let moved = self.moved + (written - self.written_seen);
        self.moved = 0;
        self.written_seen = written;
        Some(if self.linger == Linger::Draining {
            (Phase::Reading, 0) // what a refused peer still sends earns no time
        } else if !self.outbox.is_empty() {
            (Phase::Writing, moved)
        } else if self.awaiting > 0 {
            (Phase::Owed, moved)
        } else if !calls || !self.held.is_empty() || !matches!(self.sink, Sink::None) {
            (Phase::Reading, moved)
        } else {
            (Phase::Idle, moved)
        })
    }

    /// Close once the queued answer is out, without losing it: the peer may
    /// still be sending (an upload we refused), and closing a socket with
    /// unread data makes the kernel send a RST that can overtake the answer.
    /// So: send the answer, half-close, and read and drop until the peer's EOF.
    pub(crate) fn close_after_answer(&mut self) {
        self.closing = true;
        self.linger = Linger::Answering;
    }
}

/// A client connection at rest: between calls, nothing read of the next
/// one, nothing owed or unsent, no stream, not closing. It holds only its
/// socket and who its peer is, inline in the reactor's slab entry, and no
/// heap at all: 10,000 idle clients cost the server 10,000 of these, not
/// 10,000 `Conn`s with their readers and outboxes (docs/PERFORMANCE.md).
/// The reactor rests a client (`Conn::rest`) whenever it puts one back
/// in its slab, and wakes it (`Idle::wake`) when it is needed again (an
/// event, an answer, a close).
#[derive(Debug)]
pub(crate) struct Idle {
    pub(crate) stream: TcpStream,
    pub(crate) peer: PeerId,
}

impl Idle {
    /// The connection again, as `Conn::new` made it: a client registered
    /// for READABLE only under `token`.
    pub(crate) fn wake(self, token: Token, max_stream: u64) -> Conn {
        Conn::new(self.stream, token, Role::Client, self.peer, false, max_stream)
    }
}

impl Conn {
    /// This connection at rest, if nothing it holds would be lost: a client
    /// whose `Conn::new` state, rebuilt by `Idle::wake`, is the same as
    /// its own (the timers have heard of every byte it moved). Otherwise
    /// the connection itself, unchanged.
    pub(crate) fn rest(self: Box<Conn>) -> Result<Idle, Box<Conn>> {
        let reader_at_rest = matches!(&self.reader, Reader::Calls(r) if r.at_rest());
        let at_rest = matches!(self.role, Role::Client)
            && reader_at_rest
            && self.outbox.is_empty()
            && matches!(self.sink, Sink::None)
            && !self.closing
            && self.linger == Linger::No
            && !self.writable
            && self.awaiting == 0
            && self.held.is_empty()
            && self.moved == 0
            && self.written_seen == self.outbox.written()
            && self.gate.is_none()
            && self.gate_by.is_none()
            && !self.stalled;
        if !at_rest {
            return Err(self);
        }
        let Conn { stream, peer, .. } = *self;
        Ok(Idle { stream, peer })
    }
}

/// A lingering close (see `Conn::close_after_answer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Linger {
    No,
    /// The answer is still being sent.
    Answering,
    /// Answer sent and write side shut: dropping input until EOF.
    Draining,
}

impl Conn {
    /// Read and drop what a refused peer still sends, within `budget` reads.
    /// Returns false if the budget ran out first.
    pub(crate) fn drain_refused(&mut self, buf: &mut [u8], budget: &mut usize) -> bool {
        while *budget > 0 {
            *budget -= 1;
            match self.stream.read(buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if *budget == 0 {
            return false;
        }
        self.linger = Linger::No; // EOF or error: nothing left to protect
        true
    }

    /// Answer a streamed call before its opaque is taken: a small one is let
    /// in and dropped (the connection stays), a large one is answered now and
    /// the connection closed after a lingering drain.
    pub(crate) fn answer_before_upload(&mut self, len: u32, reply: Vec<u8>) {
        if u64::from(len) <= MAX_RECORD as u64 {
            if let Reader::Calls(r) = &mut self.reader {
                r.refuse_stream(reply);
            }
        } else {
            self.outbox.push_bytes(reply);
            self.close_after_answer();
        }
    }
}

/// Why data could not be stored, for the caller: a lack of descriptors is
/// temporary and says so.
fn store_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "the server is out of file descriptors; retry later".into(),
        _ => format!("the server cannot store the data: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::CallEvent;

    /// A connected client socket (the server's end) and its peer.
    fn pair() -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let peer = std::net::TcpStream::connect(l.local_addr().expect("address")).expect("connect");
        let (ours, _) = l.accept().expect("accept");
        ours.set_nonblocking(true).expect("non-blocking");
        (TcpStream::from_std(ours), peer)
    }

    fn client() -> (Box<Conn>, std::net::TcpStream) {
        let (stream, peer) = pair();
        (Box::new(Conn::new(stream, Token(7), Role::Client, PeerId::Verified(1000), false, 1 << 20)), peer)
    }

    fn null_call() -> Vec<u8> {
        crate::record::frame(&crate::rpc::call(9, proto::CLOUD_PROG, 1, 0).into_bytes())
    }

    /// Issue 11: between calls a client keeps no reader, outbox or buffer
    /// (`Idle`); in the middle of one, or owing a reply, it keeps it all.
    #[test]
    fn a_client_rests_between_calls_and_not_in_the_middle_of_one() {
        let (conn, _peer) = client();
        let idle = conn.rest().expect("a new client is at rest");
        assert_eq!(idle.peer, PeerId::Verified(1000));
        let mut conn = Box::new(idle.wake(Token(7), 1 << 20));

        // Half a call read: the reader holds it.
        let call = null_call();
        let Reader::Calls(r) = &mut conn.reader else { panic!("a client serves calls") };
        assert_eq!(r.read(&call[..10]), (10, None));
        let mut conn = conn.rest().expect_err("half a call is kept");
        let Reader::Calls(r) = &mut conn.reader else { panic!("a client serves calls") };
        let (_, ev) = r.read(&call[10..]);
        assert!(matches!(ev, Some(CallEvent::Call(_))), "{ev:?}");
        // Its reply owed, then queued: kept.
        conn.awaiting = 1;
        let mut conn = conn.rest().expect_err("a reply owed is kept");
        conn.awaiting = 0;
        conn.outbox.push_bytes(crate::rpc::accepted(9, crate::rpc::AcceptStat::Success).into_bytes());
        let mut conn = conn.rest().expect_err("an unsent reply is kept");
        let Conn { outbox, stream, .. } = &mut *conn;
        assert!(outbox.write_to(stream).expect("written"));
        assert!(conn.outbox.is_empty());
        // Sent, but the timers have not heard of it yet.
        let mut conn = conn.rest().expect_err("bytes the timers have not seen are kept");
        assert_eq!(conn.timer_phase().map(|(p, _)| p), Some(Phase::Idle));
        conn.rest().expect("answered and timed: at rest again");

        // Bytes held while a reply was owed, a lingering close: kept.
        let (mut conn, _peer) = client();
        conn.held = vec![1];
        let mut conn = conn.rest().expect_err("held bytes are kept");
        conn.held.clear();
        conn.close_after_answer();
        conn.rest().expect_err("a closing connection is kept");
    }

    /// A stream of a known large length writes over the pool's spare, and
    /// its end cuts the file to what it wrote: nothing of the previous
    /// stream is left past it; a small one gets an empty file.
    #[test]
    fn a_stream_over_the_spare_is_cut_to_its_length_at_its_end() {
        let dir = tempfile::tempdir().expect("a temporary dir");
        let pool = pool::Pool::new(dir.path(), "p-", false, 4096).with_spares(1).shared();
        let what = || Streamed::Run { args: RunArgs { ticket: 1, replica: 0, replicas: 1 } };
        let path_of = |s: &Sink| match s {
            Sink::File { path, .. } => path.clone(),
            Sink::None => PathBuf::new(),
        };
        let mut first = Sink::take(1, what(), &pool, 9000);
        first.write(&[b'1'; 9000]);
        let first_path = path_of(&first);
        drop(first.end());
        pool.borrow_mut().give(&first_path);
        assert_eq!(pool.borrow().spares(), 1);

        let mut small = Sink::take(2, what(), &pool, 100);
        assert_ne!(path_of(&small), first_path, "a small stream does not take the spare");
        small.discard();

        let mut second = Sink::take(3, what(), &pool, 5000);
        assert_eq!(path_of(&second), first_path, "the spare, written over");
        second.write(&[b'2'; 5000]);
        assert_eq!(fs::metadata(&first_path).expect("the file").len(), 9000, "not cut while streaming");
        let Sink::File { error: None, .. } = second.end() else { panic!("the stream ended well") };
        assert!(matches!(second, Sink::None));
        assert_eq!(fs::read(&first_path).expect("the file"), vec![b'2'; 5000]);
    }

    #[test]
    fn node_links_never_rest() {
        let (stream, _peer) = pair();
        let inbound = Box::new(Conn::new(stream, Token(7), Role::NodeInbound(0), PeerId::Unverified, false, 1 << 20));
        inbound.rest().expect_err("a node's link is not a client");
        let (stream, _peer) = pair();
        let link = Role::NodeLink { node: 0, connected: true };
        let link = Box::new(Conn::new(stream, Token(7), link, PeerId::Unverified, false, 1 << 20));
        link.rest().expect_err("a link to a node is not a client");
    }
}
