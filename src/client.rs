//! A blocking CLOUD_PROG client for the command-line programs and tests.
//!
//! Owns: one TCP connection, xids, sending calls (archives streamed from a
//! file in fragments) and reading one reply record per call.
//! Must not touch: the server's internals; it only speaks the wire protocol
//! of `docs/cloud.x`, exactly as an rpcgen client would.

use std::fs::File;
use std::io::{self, Read};
use std::net::TcpStream;

use crate::proto::{self, CloudStat, JobStatus, ReplicaOutput, ReplicaStatus, CLOUD_PROG, CLOUD_VERS};
use crate::record::{self, Event, Outbox, Piece, RecordDecoder, Shape};
use crate::rpc::{self, ReplyOutcome};
use crate::xdr::{XdrReader, XdrWriter};

/// Largest reply the client accepts (RETRIEVE carries every output).
const MAX_REPLY: usize = 1 << 30;

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

    /// Send one call and return the result bytes of its reply.
    fn call(&mut self, proc_num: u32, pieces: impl FnOnce(XdrWriter) -> Vec<Piece>) -> Result<Vec<u8>, ClientError> {
        self.xid = self.xid.wrapping_add(1);
        let xid = self.xid;
        let mut out = Outbox::new();
        out.push(pieces(rpc::call(xid, CLOUD_PROG, CLOUD_VERS, proc_num)));
        let sent = out.write_to(&mut self.stream);
        // A server that refuses a call mid-stream (CLOUD_TOO_LARGE) answers
        // and closes: its reply explains the broken pipe better than we can.
        let record = match (sent, self.read_record()) {
            (_, Ok(record)) => record,
            (Err(e), Err(_)) => return Err(self.transport(e)),
            (Ok(_), Err(e)) => return Err(e),
        };
        let (rxid, outcome) = rpc::decode_reply(&record).map_err(|e| self.transport(e))?;
        if rxid != xid {
            return Err(self.transport(format!("reply xid {rxid:#x} does not match call xid {xid:#x}")));
        }
        match outcome {
            ReplyOutcome::Success { results_at } => Ok(record[results_at..].to_vec()),
            ReplyOutcome::Failed(why) | ReplyOutcome::Denied(why) => Err(ClientError::Transport(why)),
        }
    }

    fn read_record(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut decoder = RecordDecoder::new(MAX_REPLY, 0);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.stream.read(&mut buf).map_err(|e| self.transport(e))?;
            if n == 0 {
                return Err(self.transport("the server closed the connection"));
            }
            // One reply per call: the first event ends the read.
            match decoder.decode(&buf[..n], &mut |_| Shape::Whole).1 {
                Some(Event::Record(r)) => return Ok(r),
                Some(_) => return Err(self.transport("reply too large")),
                None => {}
            }
        }
    }

    pub fn null(&mut self) -> Result<(), ClientError> {
        self.call(proto::CLOUD_NULL, |w| vec![Piece::Bytes(w.into_bytes())]).map(|_| ())
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

    pub fn retrieve(&mut self, ticket: u32, wait: bool) -> Result<Vec<ReplicaOutput>, ClientError> {
        let res =
            self.call(proto::RETRIEVE, |mut w| vec![Piece::Bytes(w.u32(ticket).bool(wait).clone().into_bytes())])?;
        decode(&res, |r| {
            let n = r.u32()? as usize;
            if n > r.remaining() / 24 {
                return Err(crate::xdr::XdrError::Invalid(format!("{n} outputs cannot fit in the reply")));
            }
            (0..n)
                .map(|_| {
                    let status = ReplicaStatus::decode(r)?;
                    let output = r.opaque(MAX_REPLY)?.to_vec();
                    Ok(ReplicaOutput { status, output })
                })
                .collect()
        })
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
