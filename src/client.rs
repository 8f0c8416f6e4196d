//! A blocking CLOUD_PROG client for the command-line programs and tests.
//!
//! Owns: one TCP connection, xids, sending calls (archives streamed from a
//! file in fragments) and reading one reply record per call (RETRIEVE's
//! outputs streamed into files as they arrive, never held whole).
//! Must not touch: the server's internals; it only speaks the wire protocol
//! of `docs/cloud.x`, exactly as an rpcgen client would.

use std::fs::File;
use std::io::{self, Read};
use std::net::TcpStream;

use std::io::Write;
use std::path::PathBuf;

use crate::proto::{self, CloudStat, JobState, JobStatus, ReplicaStatus, CLOUD_PROG, CLOUD_VERS, MAX_STRING};
use crate::record::{self, Outbox, Piece, LAST_FRAGMENT};
use crate::rpc::{self, ReplyOutcome};
use crate::xdr::{padding, XdrReader, XdrWriter};

/// Largest buffered reply (everything but RETRIEVE's outputs).
const MAX_REPLY: u64 = 16 << 20;

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
}

impl Client {
    pub fn connect(server: &str) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(server).map_err(|e| {
            ClientError::Transport(format!(
                "cannot reach the cloud server at {server}: {e} (is `make runserver` running? set --server or CLOUD_SERVER)"
            ))
        })?;
        let _ = stream.set_nodelay(true);
        let xid = std::process::id().wrapping_mul(2_654_435_761);
        Ok(Client { stream, server: server.to_string(), xid })
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport(format!("lost the connection to {}: {e}", self.server))
    }

    /// Send one call; return its xid. While sending, watch for an early
    /// reply: a server that refuses an upload (too large, too many
    /// replicas) answers at once, and there is no point sending the rest.
    fn send(&mut self, proc_num: u32, pieces: impl FnOnce(XdrWriter) -> Vec<Piece>) -> io::Result<u32> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        self.xid = self.xid.wrapping_add(1);
        let mut out = Outbox::new();
        out.push(pieces(rpc::call(self.xid, CLOUD_PROG, CLOUD_VERS, proc_num)));
        self.stream.set_nonblocking(true)?;
        let sent = loop {
            match out.write_to(&mut self.stream) {
                Ok(true) => break Ok(self.xid),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN | PollFlags::POLLOUT)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) if fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) => {
                    break Ok(self.xid); // answered before we finished: read it
                }
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.stream.set_nonblocking(false)?;
        sent
    }

    /// Send one call and return the result bytes of its reply.
    fn call(&mut self, proc_num: u32, pieces: impl FnOnce(XdrWriter) -> Vec<Piece>) -> Result<Vec<u8>, ClientError> {
        let sent = self.send(proc_num, pieces);
        let xid = self.xid;
        let mut record = Vec::new();
        let read = Payload::new(&mut self.stream).take(MAX_REPLY).read_to_end(&mut record);
        // A server that refuses a call mid-stream (CLOUD_TOO_LARGE) answers
        // and closes: its reply explains the broken pipe better than we can.
        match (sent, read) {
            (_, Ok(_)) => {}
            (Err(e), Err(_)) | (Ok(_), Err(e)) => return Err(self.transport(e)),
        }
        let (rxid, outcome) = rpc::decode_reply(&record).map_err(|e| self.transport(e))?;
        if rxid != xid {
            return Err(self.transport(format!("reply xid {rxid:#x} does not match call xid {xid:#x}")));
        }
        match outcome {
            ReplyOutcome::Success { results_at } => Ok(record[results_at..].to_vec()),
            ReplyOutcome::Failed(why) | ReplyOutcome::Denied(why) => Err(ClientError::Transport(why)),
        }
    }

    /// DEPLOY, streaming the archive from `archive` (`len` bytes).
    pub fn deploy(&mut self, replicas: u32, archive: File, len: u64) -> Result<u32, ClientError> {
        let res = self.call(proto::DEPLOY, |mut w| {
            w.u32(replicas);
            record::with_opaque(w, Piece::File { file: archive, len })
        })?;
        decode(&res, |r| r.u32())
    }

    pub fn status(&mut self, ticket: u32) -> Result<JobStatus, ClientError> {
        let res = self.call(proto::STATUS, |mut w| vec![Piece::Bytes(w.u32(ticket).clone().into_bytes())])?;
        decode(&res, JobStatus::decode)
    }

    /// RETRIEVE, streaming each replica's output into a file that
    /// `output_file(&status)` names, as it arrives. Returns every replica's
    /// status with the file written (created whole or not at all).
    pub fn retrieve_into(
        &mut self,
        ticket: u32,
        wait: bool,
        output_file: impl Fn(&ReplicaStatus) -> PathBuf,
    ) -> Result<Vec<(ReplicaStatus, PathBuf)>, ClientError> {
        let sent =
            self.send(proto::RETRIEVE, |mut w| vec![Piece::Bytes(w.u32(ticket).bool(wait).clone().into_bytes())]);
        let xid = self.xid;
        let server = self.server.clone();
        let lost = |e: io::Error| ClientError::Transport(format!("lost the connection to {server}: {e}"));
        let mut p = Payload::new(&mut self.stream);
        let head = (|| -> io::Result<_> { Ok((word(&mut p)?, word(&mut p)?, word(&mut p)?)) })();
        let (rxid, _msg_type, reply_stat) = match (sent, head) {
            (_, Ok(h)) => h,
            (Err(e), Err(_)) | (Ok(_), Err(e)) => return Err(lost(e)),
        };
        if rxid != xid {
            return Err(lost(io::Error::other(format!("reply xid {rxid:#x} does not match call xid {xid:#x}"))));
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
        .map_err(lost)?;
        if accept != 0 {
            return Err(ClientError::Transport(format!(
                "the server refused the call (reply_stat {reply_stat}, accept_stat {accept})"
            )));
        }
        let stat = CloudStat::from_u32(word(&mut p).map_err(lost)?).map_err(|e| lost(io::Error::other(e)))?;
        if stat != CloudStat::Ok {
            return Err(ClientError::Server(stat, string(&mut p).map_err(lost)?));
        }
        let count = word(&mut p).map_err(lost)?;
        let mut done = Vec::new();
        let outcome = read_outputs(&mut p, count, &output_file, &mut done, &lost);
        if outcome.is_err() {
            for (_, path) in &done {
                let _ = std::fs::remove_file(path);
            }
        }
        outcome.map(|()| done)
    }

    pub fn close(&mut self, ticket: u32) -> Result<(), ClientError> {
        let res = self.call(proto::CLOSE, |mut w| vec![Piece::Bytes(w.u32(ticket).clone().into_bytes())])?;
        decode(&res, |_| Ok(()))
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
        let written = File::create(&path).and_then(|mut f| {
            let copied = io::copy(&mut p.take(len), &mut f)?;
            if copied < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            f.flush()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(ClientError::Transport(format!("cannot write {}: {e}", path.display())));
        }
        skip(p, padding(len as usize) as u64).map_err(lost)?;
        done.push((status, path));
    }
    // Whatever else the record holds is not ours to read as the next reply.
    io::copy(p, &mut io::sink()).map_err(lost)?;
    Ok(())
}

/// The payload of one incoming record, read through its fragment marks:
/// `Read` ends (returns 0) at the end of the record.
struct Payload<'a> {
    stream: &'a mut TcpStream,
    left: u32,
    last: bool,
}

impl<'a> Payload<'a> {
    fn new(stream: &'a mut TcpStream) -> Self {
        Payload { stream, left: 0, last: false }
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
                io::ErrorKind::UnexpectedEof => io::Error::other("the server closed the connection"),
                _ => e,
            })?;
            let mark = u32::from_be_bytes(mark);
            self.left = mark & !LAST_FRAGMENT;
            self.last = mark & LAST_FRAGMENT != 0;
        }
        let want = buf.len().min(self.left as usize);
        let n = self.stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::other("the server closed the connection in the middle of a reply"));
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
