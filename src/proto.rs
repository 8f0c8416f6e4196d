//! The two programs of `docs/cloud.x` as Rust types, with their XDR
//! encodings: CLOUD_PROG (clients to the main server) and NODE_PROG (the
//! main server to its side nodes).
//!
//! Owns: program, version and procedure numbers, enums, argument and result
//! encodings, and where each large opaque sits (for streaming).
//! Must not touch: RPC headers (`rpc`), record marking (`record`), I/O.
//! Large opaques (archives, outputs) are never built here: the caller
//! streams them, and this module encodes the bytes around them.

use crate::rpc::Program;
use crate::xdr::{XdrError, XdrReader, XdrWriter};

pub const CLOUD_PROG: u32 = 0x2000_C10D;
pub const CLOUD_VERS: u32 = 1;
pub const CLOUD_NULL: u32 = 0;
pub const DEPLOY: u32 = 1;
pub const STATUS: u32 = 2;
pub const RETRIEVE: u32 = 3;
pub const CLOSE: u32 = 4;
/// DEPLOY with flags (branch sched): `deploy_opts_args`.
pub const DEPLOY_OPTS: u32 = 10;
/// `deploy_opts_args.flags`: when one replica fails, stop the others.
pub const DEPLOY_FAIL_FAST: u32 = 1;

pub const NODE_PROG: u32 = 0x2000_C10F;
pub const NODE_VERS: u32 = 1;
pub const NODE_NULL: u32 = 0;
pub const NODE_RUN: u32 = 1;
pub const NODE_FETCH: u32 = 2;
pub const NODE_DROP: u32 = 3;
/// The node link's handshake (see `node_auth`): the main server's
/// challenge, then its proof.
pub const NODE_HELLO: u32 = 4;
pub const NODE_AUTH: u32 = 5;
/// Kill the ticket's replica, keep its output (until NODE_DROP).
pub const NODE_STOP: u32 = 6;
/// After a main server restart: how the ticket's replica ended (run_res),
/// deferred while it runs; a ticket the node does not know is INVALID
/// "node lost".
pub const NODE_WAIT: u32 = 7;

/// Procedures 5 to 9 (other branches' CLUSTER, CANCEL, ...) are answered
/// PROC_UNAVAIL by the server until they exist.
pub const CLOUD_PROGRAM: Program = Program { prog: CLOUD_PROG, vers: CLOUD_VERS, max_proc: DEPLOY_OPTS };
pub const NODE_PROGRAM: Program = Program { prog: NODE_PROG, vers: NODE_VERS, max_proc: NODE_WAIT };

/// Longest string we accept in a message or node name.
pub const MAX_STRING: usize = 4096;

/// Where a procedure's streamed opaque length sits within its arguments.
pub fn call_stream_at(prog: u32, vers: u32, proc_num: u32) -> Option<usize> {
    match (prog, vers, proc_num) {
        (CLOUD_PROG, CLOUD_VERS, DEPLOY) => Some(4),      // replicas, archive
        (CLOUD_PROG, CLOUD_VERS, DEPLOY_OPTS) => Some(8), // replicas, flags, archive
        (NODE_PROG, NODE_VERS, NODE_RUN) => Some(12),     // ticket, replica, replicas, archive
        _ => None,
    }
}

/// `enum cloud_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudStat {
    Ok = 0,
    NoSuchTicket = 1,
    BadReplicas = 2,
    QueueFull = 3,
    TooLarge = 4,
    NotReady = 5,
    Expired = 6,
    Denied = 7,
    Internal = 8,
    NotOwner = 9,
    BadArchive = 10,
}

impl CloudStat {
    pub fn from_u32(v: u32) -> Result<Self, XdrError> {
        const ALL: [CloudStat; 11] = [
            CloudStat::Ok,
            CloudStat::NoSuchTicket,
            CloudStat::BadReplicas,
            CloudStat::QueueFull,
            CloudStat::TooLarge,
            CloudStat::NotReady,
            CloudStat::Expired,
            CloudStat::Denied,
            CloudStat::Internal,
            CloudStat::NotOwner,
            CloudStat::BadArchive,
        ];
        ALL.get(v as usize).copied().ok_or_else(|| XdrError::Invalid(format!("unknown cloud_stat {v}")))
    }
}

/// `enum job_state`: the original design's four states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Waiting = 0,
    Running = 1,
    Completed = 2,
    Invalid = 3,
}

impl JobState {
    pub fn from_u32(v: u32) -> Result<Self, XdrError> {
        Ok(match v {
            0 => JobState::Waiting,
            1 => JobState::Running,
            2 => JobState::Completed,
            3 => JobState::Invalid,
            _ => return Err(XdrError::Invalid(format!("unknown job_state {v}"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Waiting => "WAITING",
            JobState::Running => "RUNNING",
            JobState::Completed => "COMPLETED",
            JobState::Invalid => "INVALID",
        }
    }

    /// True once a replica in this state will not change again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Invalid)
    }
}

/// What is known about one replica: `struct replica_status`, and the
/// leading fields of `struct replica_output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub replica: u32,
    pub node: String,
    pub state: JobState,
    pub exit_code: i32,
    pub message: String,
}

impl ReplicaStatus {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.replica).string(&self.node).u32(self.state as u32).i32(self.exit_code).string(&self.message);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(ReplicaStatus {
            replica: r.u32()?,
            node: r.string(MAX_STRING)?,
            state: JobState::from_u32(r.u32()?)?,
            exit_code: r.i32()?,
            message: r.string(MAX_STRING)?,
        })
    }
}

/// `struct job_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub ticket: u32,
    pub state: JobState,
    pub queue_position: u32,
    pub replicas: Vec<ReplicaStatus>,
}

impl JobStatus {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.ticket).u32(self.state as u32).u32(self.queue_position).u32(self.replicas.len() as u32);
        for r in &self.replicas {
            r.encode(w);
        }
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let ticket = r.u32()?;
        let state = JobState::from_u32(r.u32()?)?;
        let queue_position = r.u32()?;
        let n = r.u32()? as usize;
        if n > r.remaining() / 20 {
            return Err(XdrError::Invalid(format!("{n} replicas cannot fit in the message")));
        }
        let replicas = (0..n).map(|_| ReplicaStatus::decode(r)).collect::<Result<_, _>>()?;
        Ok(JobStatus { ticket, state, queue_position, replicas })
    }
}

/// Encode the default arm of any of the `*_res` unions.
pub fn encode_error(w: &mut XdrWriter, stat: CloudStat, message: &str) {
    w.u32(stat as u32).string(message);
}

/// Decode a `*_res` union's discriminant; on an error arm, its message.
pub fn decode_stat(r: &mut XdrReader) -> Result<Result<(), (CloudStat, String)>, XdrError> {
    let stat = CloudStat::from_u32(r.u32()?)?;
    if stat == CloudStat::Ok {
        Ok(Ok(()))
    } else {
        Ok(Err((stat, r.string(MAX_STRING)?)))
    }
}

/// `struct retrieve_args`.
pub fn decode_retrieve_args(r: &mut XdrReader) -> Result<(u32, bool), XdrError> {
    Ok((r.u32()?, r.bool()?))
}

/// `struct run_res` of NODE_RUN: how a replica ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    pub state: JobState,
    pub exit_code: i32,
    pub message: String,
}

impl RunResult {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.state as u32).i32(self.exit_code).string(&self.message);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(RunResult { state: JobState::from_u32(r.u32()?)?, exit_code: r.i32()?, message: r.string(MAX_STRING)? })
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        RunResult { state: JobState::Invalid, exit_code: -1, message: message.into() }
    }
}

/// The fixed arguments of NODE_RUN that precede the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunArgs {
    pub ticket: u32,
    pub replica: u32,
    pub replicas: u32,
}

impl RunArgs {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.ticket).u32(self.replica).u32(self.replicas);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(RunArgs { ticket: r.u32()?, replica: r.u32()?, replicas: r.u32()? })
    }
}

/// Bytes of a handshake nonce (`opaque nonce[32]`).
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof, an HMAC-SHA256 (`opaque proof[32]`).
pub const PROOF_LEN: usize = 32;

/// `struct hello_args` of NODE_HELLO: the main server's fresh nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloArgs {
    pub main_nonce: [u8; NONCE_LEN],
}

impl HelloArgs {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.fixed(&self.main_nonce);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(HelloArgs { main_nonce: fixed_array(r)? })
    }
}

/// `union hello_res` of NODE_HELLO: the node's fresh nonce and its proof,
/// or why it will not take part (a node without `--secret-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloRes {
    Ok { node_nonce: [u8; NONCE_LEN], node_proof: [u8; PROOF_LEN] },
    Err(CloudStat, String),
}

impl HelloRes {
    pub fn encode(&self, w: &mut XdrWriter) {
        match self {
            HelloRes::Ok { node_nonce, node_proof } => {
                w.u32(CloudStat::Ok as u32).fixed(node_nonce).fixed(node_proof);
            }
            HelloRes::Err(stat, message) => encode_error(w, *stat, message),
        }
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(match decode_stat(r)? {
            Ok(()) => HelloRes::Ok { node_nonce: fixed_array(r)?, node_proof: fixed_array(r)? },
            Err((stat, message)) => HelloRes::Err(stat, message),
        })
    }
}

/// `struct auth_args` of NODE_AUTH: the main server's proof. The result is
/// a bare `cloud_stat` (CLOUD_OK, or CLOUD_DENIED and the link closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthArgs {
    pub main_proof: [u8; PROOF_LEN],
}

impl AuthArgs {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.fixed(&self.main_proof);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(AuthArgs { main_proof: fixed_array(r)? })
    }
}

fn fixed_array<const N: usize>(r: &mut XdrReader) -> Result<[u8; N], XdrError> {
    let mut out = [0u8; N];
    out.copy_from_slice(r.fixed(N)?);
    Ok(out)
}

/// Offset of the output's length word in a NODE_FETCH success result
/// (`struct fetch_res { cloud_stat stat; opaque output<>; }`).
pub const FETCH_OUTPUT_AT: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_status_round_trips() {
        let st = JobStatus {
            ticket: 7,
            state: JobState::Running,
            queue_position: 0,
            replicas: vec![ReplicaStatus {
                replica: 0,
                node: "127.0.0.1:9001".into(),
                state: JobState::Completed,
                exit_code: 0,
                message: String::new(),
            }],
        };
        let mut w = XdrWriter::new();
        st.encode(&mut w);
        let bytes = w.into_bytes();
        let mut r = XdrReader::new(&bytes);
        assert_eq!(JobStatus::decode(&mut r).unwrap(), st);
        r.finish().unwrap();
    }

    #[test]
    fn handshake_messages_round_trip_and_short_ones_fail() {
        let hello = HelloArgs { main_nonce: [7; NONCE_LEN] };
        let mut w = XdrWriter::new();
        hello.encode(&mut w);
        let bytes = w.into_bytes();
        assert_eq!(bytes.len(), NONCE_LEN, "a fixed opaque has no length word");
        assert_eq!(HelloArgs::decode(&mut XdrReader::new(&bytes)).unwrap(), hello);
        assert_eq!(HelloArgs::decode(&mut XdrReader::new(&bytes[..31])), Err(XdrError::Short));

        for res in [
            HelloRes::Ok { node_nonce: [1; NONCE_LEN], node_proof: [2; PROOF_LEN] },
            HelloRes::Err(CloudStat::Denied, "no secret here".into()),
        ] {
            let mut w = XdrWriter::new();
            res.encode(&mut w);
            let bytes = w.into_bytes();
            let mut r = XdrReader::new(&bytes);
            assert_eq!(HelloRes::decode(&mut r).unwrap(), res);
            r.finish().unwrap();
            assert!(HelloRes::decode(&mut XdrReader::new(&bytes[..bytes.len() - 1])).is_err());
        }

        let auth = AuthArgs { main_proof: [9; PROOF_LEN] };
        let mut w = XdrWriter::new();
        auth.encode(&mut w);
        assert_eq!(AuthArgs::decode(&mut XdrReader::new(&w.into_bytes())).unwrap(), auth);
    }

    #[test]
    fn hostile_replica_count_is_refused_without_allocating() {
        let bytes = [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(JobStatus::decode(&mut XdrReader::new(&bytes)).is_err());
    }
}
