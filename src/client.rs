//! A blocking CLOUD_PROG client for the command-line programs and tests.
//!
//! Owns: one TCP connection (connect timeout, keepalive, a timeout on every
//! wait), xids that do not repeat across runs, AUTH_SYS credentials of the
//! process, sending calls (archives streamed from a file in fragments, by sendfile),
//! reading one reply record per call in few reads (RETRIEVE's outputs
//! streamed into files as they arrive, never held whole, fsynced when asked), with
//! few system calls per call (a client process per job is a cost users pay),
//! and one retry with the same xid on a
//! new connection when the old one breaks before the reply (the server's
//! duplicate request cache makes a retried DEPLOY or CLOSE happen once).
//! Must not touch: the server's internals; it only speaks the wire protocol
//! of `docs/cloud.x`, exactly as an rpcgen client would.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proto::{
    self, CloudStat, ClusterView, JobInfo, JobState, JobStatus, ReplicaStatus, TicketInfo, CLOUD_PROG, CLOUD_VERS,
    MAX_STRING,
};
use crate::record::{self, Outbox, Piece, LAST_FRAGMENT};
use crate::rpc::{self, AuthSys, ReplyOutcome};
use crate::xdr::{padding, XdrReader, XdrWriter};

/// Largest buffered reply (everything but RETRIEVE's outputs).
const MAX_REPLY: u64 = 16 << 20;
/// Largest fragment a call is sent in. The server's decoder takes
/// fragments of any size (record marking allows 2^31 - 1 bytes); large ones
/// mean few headers (the server reads each header alone and splices the
/// archive's bytes between them) and long `sendfile` runs here.
const SEND_FRAGMENT: usize = 1 << 20;

/// What went wrong, as one line for people.
#[derive(Debug)]
pub enum ClientError {
    /// The server answered with an error status.
    Server(CloudStat, String),
    /// Could not talk to the server at all.
    Transport(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Server(_, msg) => write!(f, "{msg}"),
            ClientError::Transport(msg) => write!(f, "{msg}"),
        }
    }
}

pub struct Client {
    stream: TcpStream,
    server: String,
    xid: u32,
    cred: AuthSys,
    /// Longest wait for the server to make progress (`None`: no limit).
    timeout: Option<Duration>,
    /// Told the bytes of the current call sent so far (a progress bar).
    progress: Option<Box<dyn FnMut(u64)>>,
}

/// A failed attempt: the error, and the I/O error behind it (to tell a
/// broken connection, worth one retry, from the rest).
type Failed = (ClientError, Option<io::Error>);

/// How long `connect` tries before giving up on an address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The send queue (SO_SNDBUF; the kernel doubles it) of a connection to a
/// server on this host. Over loopback the receiver's TCP work runs in the
/// context that transmits, and data queued beyond the peer's window is
/// transmitted later by the peer's own ACK processing, that is, on the
/// server's thread: with the default, autotuned queue (up to 4 MiB) a
/// 1 GiB upload's transmit and receive ran mostly on the main server's
/// one thread, its bound. With this queue the client transmits, and
/// processes the receive, in its own process: the main server's CPU per
/// GiB went from 0.5-0.65 to 0.41-0.51 s, and a 1 GiB deploy through a
/// node process from 1,650 to 2,350 MB/s (docs/PERFORMANCE.md). Enough
/// for loopback, whose round trip is tens of microseconds; other peers
/// keep the kernel's autotuning, which a real network's round trip needs.
const LOOPBACK_SEND_QUEUE: usize = 256 * 1024;
/// The default `--timeout` of deploy, status and close.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP keepalive: first probe after this idle time, then every
/// `KEEPALIVE_INTERVAL`, `KEEPALIVE_PROBES` times: a dead server or host
/// is noticed within about 30 s even when no timeout is set.
const KEEPALIVE_IDLE: u32 = 10;
const KEEPALIVE_INTERVAL: u32 = 5;
const KEEPALIVE_PROBES: u32 = 4;

/// The broken-connection errors after which a call is retried once.
fn is_broken(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected)
}

/// An xid that does not repeat across runs: the server's duplicate request
/// cache must never mistake a new call for a retry of an old one.
fn first_xid() -> u32 {
    // getrandom(2): one system call, where opening /dev/urandom takes three.
    if let Ok(b) = crate::node_auth::random_nonce() {
        return u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (now.as_nanos() as u32) ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// The AUTH_SYS credential of this process: who the kernel says we are.
fn own_credential() -> AuthSys {
    // gethostname(2) is one uname(2); reading /proc/sys/kernel/hostname took five calls.
    let name = nix::unistd::gethostname().map(|h| h.to_string_lossy().trim().to_string()).unwrap_or_default();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
    let gid = nix::unistd::getegid().as_raw();
    AuthSys { stamp, machinename: name, uid: nix::unistd::geteuid().as_raw(), gid, gids: own_groups() }
}

/// The first 16 supplementary groups (all AUTH_SYS carries), in one
/// getgroups(2) for up to 16; nix's `getgroups` first reads
/// /proc/sys/kernel/ngroups_max (three more calls) to size its buffer.
fn own_groups() -> Vec<u32> {
    let mut gids = [0 as libc::gid_t; 16];
    // SAFETY: the pointer and count describe `gids`, a live, writable array;
    // getgroups(2) writes at most that many entries, or fails with EINVAL
    // (more groups than that) writing none.
    let n = unsafe { libc::getgroups(gids.len() as libc::c_int, gids.as_mut_ptr()) };
    match usize::try_from(n) {
        Ok(n) => gids[..n.min(gids.len())].to_vec(),
        Err(_) => nix::unistd::getgroups().unwrap_or_default().iter().map(|g| g.as_raw()).take(16).collect(),
    }
}

impl Client {
    /// Connect with the default timeout.
    pub fn connect(server: &str) -> Result<Client, ClientError> {
        Self::connect_with(server, Some(DEFAULT_TIMEOUT))
    }

    /// Connect; `timeout` bounds every wait for the server to make progress.
    pub fn connect_with(server: &str, timeout: Option<Duration>) -> Result<Client, ClientError> {
        // `CLOUD_SERVER="127.0.0.1:9000 "` (a space copied with the address).
        let server = server.trim();
        let stream = open(server, timeout)?;
        Ok(Client {
            stream,
            server: server.to_string(),
            xid: first_xid(),
            cred: own_credential(),
            timeout,
            progress: None,
        })
    }

    /// Change the timeout for the calls that follow.
    /// Call `f` with the bytes of each call sent so far, as they go out.
    pub fn on_progress(&mut self, f: impl FnMut(u64) + 'static) {
        self.progress = Some(Box::new(f));
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.timeout = timeout;
        self.stream
            .set_read_timeout(timeout)
            .and_then(|_| self.stream.set_write_timeout(timeout))
            .map_err(|e| self.transport(e))
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport(format!("lost the connection to {}: {e}", self.server))
    }

    /// The one line for an I/O error of a call.
    fn io_error(&self, e: &io::Error) -> ClientError {
        ClientError::Transport(io_message(&self.server, self.timeout, e))
    }

    /// The connection broke again on the retry: most likely not a cloud
    /// server at all (a node's port, another program), so say what to check.
    fn broken_twice(&self, e: &io::Error) -> ClientError {
        let server = &self.server;
        ClientError::Transport(format!(
            "lost the connection to {server} again on the retry ({e}): the server stopped, or {server} is not a \
             cloud-server's client address (its ready line says \"listening on ...\"; a node's port is not)"
        ))
    }

    /// After a broken connection: a new one, for one retry with the same xid.
    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.stream = open(&self.server, self.timeout)?;
        Ok(())
    }

    /// Said once the retry went through (a retry that fails says so in its
    /// error instead: one line either way).
    fn retried(&self, why: &io::Error) {
        eprintln!(
            "note: the connection to {} broke ({why}); retried once with the same xid, and it went through",
            self.server
        );
    }

    /// Run one attempt of a call; if its connection broke before the reply
    /// was in, run it once more on a new connection (same xid: the server's
    /// duplicate request cache makes a retried DEPLOY or CLOSE happen once).
    fn retry_once<T>(&mut self, mut attempt: impl FnMut(&mut Self) -> Result<T, Failed>) -> Result<T, ClientError> {
        let why = match attempt(self) {
            Err((ClientError::Transport(_), Some(why))) if is_broken(&why) => why,
            first => return first.map_err(|(e, _)| e),
        };
        self.reconnect()?;
        match attempt(self) {
            Err((ClientError::Transport(_), Some(e))) if is_broken(&e) => Err(self.broken_twice(&e)),
            again => {
                if !matches!(again, Err((ClientError::Transport(_), _))) {
                    self.retried(&why);
                }
                again.map_err(|(e, _)| e)
            }
        }
    }

    /// Send one call (an archive in fragments of `SEND_FRAGMENT`). While
    /// sending, watch for an early
    /// reply: a server that refuses an upload (too large, too many
    /// replicas) answers at once, and there is no point sending the rest.
    fn send(&mut self, pieces: Vec<Piece>) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut out = Outbox::with_max_fragment(SEND_FRAGMENT);
        // An archive goes by sendfile (`write_to_socket`: no copy through
        // our memory; in the main server's receive path it measured faster
        // end to end), on the socket made non-blocking for the while.
        let file = pieces.iter().any(|p| matches!(p, Piece::File { .. }));
        out.push(pieces);
        let wait = match self.timeout {
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        if file {
            self.stream.set_nonblocking(true)?;
        }
        let sent = loop {
            let wrote =
                if file { out.write_to_socket(&mut &self.stream) } else { out.write_to(&mut DontWait(&self.stream)) };
            if let Some(progress) = self.progress.as_mut() {
                progress(out.written());
            }
            match wrote {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN | PollFlags::POLLOUT)];
            match poll(&mut fds, wait) {
                Ok(0) => break Err(io::ErrorKind::TimedOut.into()),
                Ok(_) if fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) => {
                    break Ok(()); // answered before we finished: read it
                }
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => break Err(e.into()),
            }
        };
        if file {
            self.stream.set_nonblocking(false)?;
        }
        sent
    }

    /// The call header for `proc_num` with our credentials.
    fn header(&self, xid: u32, proc_num: u32) -> XdrWriter {
        rpc::call_sys(xid, CLOUD_PROG, CLOUD_VERS, proc_num, &self.cred)
    }

    /// Send one call and read its reply record (`retry_once`).
    fn call(
        &mut self,
        proc_num: u32,
        mut pieces: impl FnMut(XdrWriter) -> io::Result<Vec<Piece>>,
    ) -> Result<Vec<u8>, ClientError> {
        self.xid = self.xid.wrapping_add(1);
        let xid = self.xid;
        let record =
            self.retry_once(|c| c.attempt(xid, proc_num, &mut pieces).map_err(|e| (c.io_error(&e), Some(e))))?;
        let (rxid, outcome) = rpc::decode_reply(&record).map_err(|e| self.transport(e))?;
        if rxid != xid {
            return Err(self.transport(format!("reply xid {rxid:#x} does not match call xid {xid:#x}")));
        }
        match outcome {
            ReplyOutcome::Success { results_at } => Ok(record[results_at..].to_vec()),
            ReplyOutcome::Failed(why) | ReplyOutcome::Denied(why) => Err(ClientError::Transport(why)),
        }
    }

    fn attempt(
        &mut self,
        xid: u32,
        proc_num: u32,
        pieces: &mut impl FnMut(XdrWriter) -> io::Result<Vec<Piece>>,
    ) -> io::Result<Vec<u8>> {
        let sent = pieces(self.header(xid, proc_num)).and_then(|p| self.send(p));
        let mut record = Vec::new();
        let read = Payload::new(&mut self.stream).take(MAX_REPLY).read_to_end(&mut record);
        // A server that refuses a call mid-stream (CLOUD_TOO_LARGE) answers
        // and closes: its reply explains the broken pipe better than we can.
        match (sent, read) {
            (_, Ok(_)) => Ok(record),
            (Err(e), Err(_)) | (Ok(_), Err(e)) => Err(e),
        }
    }

    /// DEPLOY, streaming the archive from `archive` (`len` bytes); a retry
    /// sends it again from the start.
    pub fn deploy(&mut self, replicas: u32, archive: File, len: u64) -> Result<u32, ClientError> {
        let res = self.call(proto::DEPLOY, |mut w| {
            let mut file = archive.try_clone()?;
            file.seek(SeekFrom::Start(0))?;
            w.u32(replicas);
            Ok(record::with_opaque(w, Piece::File { file, len }))
        })?;
        decode(&res, |r| r.u32())
    }

    /// DEPLOY_OPTS: `deploy` with `flags` (`proto::DEPLOY_FAIL_FAST`).
    pub fn deploy_opts(&mut self, replicas: u32, flags: u32, archive: File, len: u64) -> Result<u32, ClientError> {
        let res = self.call(proto::DEPLOY_OPTS, |mut w| {
            let mut file = archive.try_clone()?;
            file.seek(SeekFrom::Start(0))?;
            w.u32(replicas).u32(flags);
            Ok(record::with_opaque(w, Piece::File { file, len }))
        })?;
        decode(&res, |r| r.u32())
    }

    pub fn status(&mut self, ticket: u32) -> Result<JobStatus, ClientError> {
        let res = self.call(proto::STATUS, |mut w| Ok(vec![Piece::Bytes(w.u32(ticket).clone().into_bytes())]))?;
        decode(&res, JobStatus::decode)
    }

    /// RETRIEVE, streaming each replica's output into a file that
    /// `output_file(&status)` names, as it arrives. Returns every replica's
    /// status with the file written (created whole or not at all; with
    /// `sync`, also fsynced, so that it survives a power loss once the
    /// caller has fsynced the directory too: what a caller that closes the
    /// ticket needs when the output is precious).
    /// `output_file` is called only once the server has said OK.
    pub fn retrieve_into(
        &mut self,
        ticket: u32,
        wait: bool,
        sync: bool,
        output_file: impl Fn(&ReplicaStatus) -> PathBuf,
    ) -> Result<Vec<(ReplicaStatus, PathBuf)>, ClientError> {
        self.xid = self.xid.wrapping_add(1);
        let xid = self.xid;
        self.retry_once(|c| c.retrieve_attempt(xid, ticket, wait, sync, &output_file))
    }

    /// One RETRIEVE; on failure, the error and the I/O error behind it.
    fn retrieve_attempt(
        &mut self,
        xid: u32,
        ticket: u32,
        wait: bool,
        sync: bool,
        output_file: &impl Fn(&ReplicaStatus) -> PathBuf,
    ) -> Result<Vec<(ReplicaStatus, PathBuf)>, Failed> {
        let mut args = self.header(xid, proto::RETRIEVE);
        args.u32(ticket).bool(wait);
        let sent = self.send(vec![Piece::Bytes(args.into_bytes())]);
        let cause = std::cell::RefCell::new(None);
        let server = self.server.clone();
        let timeout = self.timeout;
        let lost = |e: io::Error| {
            let msg = io_message(&server, timeout, &e);
            *cause.borrow_mut() = Some(e);
            ClientError::Transport(msg)
        };
        let with_cause = |e: ClientError| (e, cause.borrow_mut().take());
        let mut p = Payload::new(&mut self.stream);
        let head = (|| -> io::Result<_> { Ok((word(&mut p)?, word(&mut p)?, word(&mut p)?)) })();
        let (rxid, _msg_type, reply_stat) = match (sent, head) {
            (_, Ok(h)) => h,
            (Err(e), Err(_)) | (Ok(_), Err(e)) => return Err(with_cause(lost(e))),
        };
        if rxid != xid {
            let e = io::Error::other(format!("reply xid {rxid:#x} does not match call xid {xid:#x}"));
            return Err((lost(e), None));
        }
        let accept = (|| -> io::Result<u32> {
            if reply_stat != 0 {
                return Ok(u32::MAX);
            }
            let _flavor = word(&mut p)?;
            let verf = word(&mut p)? as u64;
            skip(&mut p, verf + padding(verf as usize) as u64)?;
            word(&mut p)
        })()
        .map_err(|e| with_cause(lost(e)))?;
        if accept != 0 {
            return Err((
                ClientError::Transport(format!(
                    "the server refused the call (reply_stat {reply_stat}, accept_stat {accept})"
                )),
                None,
            ));
        }
        let stat = word(&mut p).map_err(|e| with_cause(lost(e)))?;
        let stat = CloudStat::from_u32(stat).map_err(|e| (lost(io::Error::other(e)), None))?;
        if stat != CloudStat::Ok {
            let msg = string(&mut p).map_err(|e| with_cause(lost(e)))?;
            return Err((ClientError::Server(stat, msg), None));
        }
        let count = word(&mut p).map_err(|e| with_cause(lost(e)))?;
        let mut done = Vec::new();
        let outcome = read_outputs(&mut p, count, sync, output_file, &mut done, &lost);
        if outcome.is_err() {
            for (_, path) in &done {
                let _ = std::fs::remove_file(path);
            }
        }
        outcome.map(|()| done).map_err(with_cause)
    }

    /// CLUSTER: every node, the wait queue, totals.
    pub fn cluster(&mut self) -> Result<ClusterView, ClientError> {
        let res = self.call(proto::CLUSTER, |w| Ok(vec![Piece::Bytes(w.into_bytes())]))?;
        decode(&res, ClusterView::decode)
    }

    /// MINE: the tickets this user deployed.
    pub fn mine(&mut self) -> Result<Vec<TicketInfo>, ClientError> {
        let res = self.call(proto::MINE, |w| Ok(vec![Piece::Bytes(w.into_bytes())]))?;
        decode(&res, proto::decode_tickets)
    }

    /// JOB_INFO: STATUS with outcome kinds and times; with `wait`, once
    /// the job has ended (the server defers its reply).
    pub fn info(&mut self, ticket: u32, wait: bool) -> Result<JobInfo, ClientError> {
        let res =
            self.call(proto::JOB_INFO, |mut w| Ok(vec![Piece::Bytes(w.u32(ticket).bool(wait).clone().into_bytes())]))?;
        decode(&res, JobInfo::decode)
    }

    /// FOLLOW: replica `replica`'s output from `offset`, once there is
    /// some (the server defers its reply); true once the replica has ended
    /// and nothing follows.
    pub fn follow(&mut self, ticket: u32, replica: u32, offset: u64) -> Result<(Vec<u8>, bool), ClientError> {
        let res = self.call(proto::FOLLOW, |mut w| {
            proto::encode_follow_args(&mut w, ticket, replica, offset);
            Ok(vec![Piece::Bytes(w.into_bytes())])
        })?;
        match proto::decode_follow(&mut XdrReader::new(&res)) {
            Ok(Ok(x)) => Ok(x),
            Ok(Err((stat, msg))) => Err(ClientError::Server(stat, msg)),
            Err(e) => Err(ClientError::Transport(format!("bad reply from {}: {e}", self.server))),
        }
    }

    /// CANCEL: stop the job, keep its outputs.
    pub fn cancel(&mut self, ticket: u32) -> Result<(), ClientError> {
        let res = self.call(proto::CANCEL, |mut w| Ok(vec![Piece::Bytes(w.u32(ticket).clone().into_bytes())]))?;
        decode(&res, |_| Ok(()))
    }

    pub fn close(&mut self, ticket: u32) -> Result<(), ClientError> {
        let res = self.call(proto::CLOSE, |mut w| Ok(vec![Piece::Bytes(w.u32(ticket).clone().into_bytes())]))?;
        decode(&res, |_| Ok(()))
    }
}

/// The socket's writes without blocking (MSG_DONTWAIT), while its reads
/// still block: no pair of system calls per call to switch the socket to
/// non-blocking and back.
struct DontWait<'a>(&'a TcpStream);

impl Write for DontWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        Ok(send(self.0.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connect to `server` within CONNECT_TIMEOUT, with TCP keepalive and
/// `timeout` on every read and write.
fn open(server: &str, timeout: Option<Duration>) -> Result<TcpStream, ClientError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let fail = |e: &dyn std::fmt::Display| {
        ClientError::Transport(format!(
            "cannot reach the cloud server at {server}: {e} (is `make runserver` running? set --server or CLOUD_SERVER)"
        ))
    };
    let addrs: Vec<SocketAddr> = server
        .to_socket_addrs()
        .map_err(|e| {
            let why = if e.kind() == io::ErrorKind::InvalidInput {
                "it is not a HOST:PORT address".to_string()
            } else {
                e.to_string()
            };
            ClientError::Transport(format!(
                "cannot reach the cloud server at {server}: {why}; set --server or CLOUD_SERVER to the address \
                 on cloud-server's ready line, e.g. 127.0.0.1:9000"
            ))
        })?
        .collect();
    let mut last: Option<io::Error> = None;
    let (mut stream, mut server_ip) = (None, None);
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                (stream, server_ip) = (Some(s), Some(addr.ip()));
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) if e.kind() == io::ErrorKind::TimedOut => {
            return Err(fail(&format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())))
        }
        (None, Some(e)) => return Err(fail(&e)),
        (None, None) => return Err(fail(&"the name has no address")),
    };
    let _ = stream.set_nodelay(true);
    let _ = setsockopt(&stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(&stream, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE);
    let _ = setsockopt(&stream, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL);
    let _ = setsockopt(&stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
    // A server on this host: no pacing timer per socket (`congestion`),
    // and a short send queue (`LOOPBACK_SEND_QUEUE`).
    if let Some(ip) = server_ip {
        crate::congestion::for_client(&stream, ip);
        if ip.to_canonical().is_loopback() {
            let _ = setsockopt(&stream, sockopt::SndBuf, &LOOPBACK_SEND_QUEUE);
        }
    }
    // A new socket has no timeouts: set them only when there are some.
    if timeout.is_some() {
        stream.set_read_timeout(timeout).and_then(|_| stream.set_write_timeout(timeout)).map_err(|e| fail(&e))?;
    }
    Ok(stream)
}

/// The one line for an I/O error talking to `server`; a timeout says so.
fn io_message(server: &str, timeout: Option<Duration>, e: &io::Error) -> String {
    match (e.kind(), timeout) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => format!(
            "no answer from the cloud server at {server} within {}s (--timeout): a job you wait for may still be running, or the server is overloaded or stuck; raise --timeout, or give --timeout 0 to wait as long as it takes",
            t.as_secs()
        ),
        _ => format!("lost the connection to {server}: {e}"),
    }
}

/// Decode a `*_res` union: the OK arm with `ok`, else the server's message.
fn decode<T>(res: &[u8], ok: impl FnOnce(&mut XdrReader) -> Result<T, crate::xdr::XdrError>) -> Result<T, ClientError> {
    let garbled = |e: crate::xdr::XdrError| ClientError::Transport(format!("garbled reply from the server: {e}"));
    let mut r = XdrReader::new(res);
    match proto::decode_stat(&mut r).map_err(garbled)? {
        Ok(()) => ok(&mut r).map_err(garbled),
        Err((stat, msg)) => Err(ClientError::Server(stat, msg)),
    }
}

/// The outputs of a RETRIEVE reply: each status, then its output copied
/// into the file `output_file` names. Files written are listed in `done`.
fn read_outputs(
    p: &mut Payload,
    count: u32,
    sync: bool,
    output_file: &impl Fn(&ReplicaStatus) -> PathBuf,
    done: &mut Vec<(ReplicaStatus, PathBuf)>,
    lost: &impl Fn(io::Error) -> ClientError,
) -> Result<(), ClientError> {
    for _ in 0..count {
        let status = (|| -> io::Result<ReplicaStatus> {
            Ok(ReplicaStatus {
                replica: word(p)?,
                node: string(p)?,
                state: JobState::from_u32(word(p)?).map_err(io::Error::other)?,
                exit_code: word(p)? as i32,
                message: string(p)?,
            })
        })()
        .map_err(lost)?;
        let len = u64::from(word(p).map_err(lost)?);
        let path = output_file(&status);
        // A new file, never one already there: in a directory others can
        // write, a planted link or hard link would be written through.
        let _ = std::fs::remove_file(&path);
        let fresh = std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&path);
        let written = fresh.and_then(|mut f| {
            let copied = io::copy(&mut p.take(len), &mut f)?;
            if copied < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // Asked for: on disk before the caller closes the ticket (the
            // server's copy goes then), fsynced here on the descriptor
            // written. Otherwise the kernel writes it back in its own time,
            // as after cp or tar.
            if sync {
                f.sync_all()?;
            }
            Ok(())
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(ClientError::Transport(format!(
                "cannot write {}: {e}; the ticket stays open: pick a directory you can write and retrieve again",
                path.display()
            )));
        }
        skip(p, padding(len as usize) as u64).map_err(lost)?;
        done.push((status, path));
    }
    // Whatever else the record holds is not ours to read as the next reply.
    io::copy(p, &mut io::sink()).map_err(lost)?;
    Ok(())
}

/// The payload of one incoming record, read through its fragment marks:
/// `Read` ends (returns 0) at the end of the record. Buffered, so a reply's
/// many small XDR fields cost a few large reads, not one `recvfrom` each
/// (the server sends nothing after the reply: one call at a time).
struct Payload<'a> {
    stream: io::BufReader<&'a mut TcpStream>,
    left: u32,
    last: bool,
}

/// Bytes of a reply read from the socket at once.
const REPLY_BUFFER: usize = 64 * 1024;

impl<'a> Payload<'a> {
    fn new(stream: &'a mut TcpStream) -> Self {
        Payload { stream: io::BufReader::with_capacity(REPLY_BUFFER, stream), left: 0, last: false }
    }
}

impl Read for Payload<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.left == 0 {
            if self.last {
                return Ok(0);
            }
            let mut mark = [0u8; 4];
            self.stream.read_exact(&mut mark).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection")
                }
                _ => e,
            })?;
            let mark = u32::from_be_bytes(mark);
            self.left = mark & !LAST_FRAGMENT;
            self.last = mark & LAST_FRAGMENT != 0;
        }
        let want = buf.len().min(self.left as usize);
        let n = self.stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection in the middle of a reply",
            ));
        }
        self.left -= n as u32;
        Ok(n)
    }
}

fn word(r: &mut impl Read) -> io::Result<u32> {
    let mut w = [0u8; 4];
    r.read_exact(&mut w)?;
    Ok(u32::from_be_bytes(w))
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let skipped = io::copy(&mut r.take(n), &mut io::sink())?;
    if skipped < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn string(r: &mut impl Read) -> io::Result<String> {
    let len = word(r)? as usize;
    if len > MAX_STRING {
        return Err(io::Error::other(format!("a string of {len} bytes in the reply")));
    }
    let mut buf = vec![0u8; len + padding(len)];
    r.read_exact(&mut buf)?;
    buf.truncate(len);
    String::from_utf8(buf).map_err(|_| io::Error::other("a reply string is not UTF-8"))
}

/// Pack a directory into a gzip-compressed tar in an anonymous temp file.
pub fn pack_directory(dir: &std::path::Path) -> io::Result<(File, u64)> {
    use std::io::{Seek, SeekFrom};
    let file = tempfile::tempfile()?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    let mut file = tar.into_inner()?.finish()?;
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok((file, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a server on this host gets the short send queue
    /// (as the kernel grants it: at most `net.core.wmem_max`, doubled).
    #[test]
    fn a_connection_to_a_server_on_this_host_has_a_short_send_queue() {
        use nix::sys::socket::{getsockopt, sockopt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = open(&listener.local_addr().unwrap().to_string(), None).unwrap();
        let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max").unwrap().trim().parse::<usize>().unwrap();
        let got = getsockopt(&stream, sockopt::SndBuf).unwrap();
        assert_eq!(got, 2 * LOOPBACK_SEND_QUEUE.min(max));
    }
}
