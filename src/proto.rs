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
/// The cluster view: nodes, wait queue, totals.
pub const CLUSTER: u32 = 5;
/// The caller's own tickets (uid from the connection).
pub const MINE: u32 = 6;
/// A running replica's output from an offset, answered when there is some.
pub const FOLLOW: u32 = 7;
/// Stop running replicas, never start waiting ones, keep outputs.
pub const CANCEL: u32 = 8;
/// STATUS in the rich form: outcome kinds and times per replica; with
/// wait, deferred until the job has ended.
pub const JOB_INFO: u32 = 9;

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
/// Kill the ticket's replica, keep its output (until NODE_DROP): fail-fast
/// and CANCEL.
pub const NODE_STOP: u32 = 6;
/// After a main server restart: how the ticket's replica ended (run_res),
/// deferred while it runs; a ticket the node does not know is INVALID
/// "node lost".
pub const NODE_WAIT: u32 = 7;
/// A replica's output from an offset, deferred until there is some (FOLLOW).
pub const NODE_FOLLOW: u32 = 8;
/// When a main server's link comes up: the tickets it still wants on this
/// node; the node drops every other one it holds (running or ended).
pub const NODE_KEEP: u32 = 9;
/// Most tickets one NODE_KEEP may list.
pub const MAX_KEEP: usize = 1 << 16;
/// A staged transfer (issue 11): part of a DEPLOY's archive, checked so
/// far, sent to the node the job would go to while the client is still
/// uploading it: `stage_args` (stage, offset, bytes streamed), `cloud_stat`.
pub const NODE_STAGE: u32 = 10;
/// NODE_RUN whose archive is a whole stage of this link (`run_staged_args`),
/// answered as NODE_RUN.
pub const NODE_RUN_STAGED: u32 = 11;
/// Drop a stage of this link (the archive was refused, or the job went
/// elsewhere): `unsigned int` stage, `cloud_stat`.
pub const NODE_UNSTAGE: u32 = 12;

/// Procedures 5 to 9 (other branches' CLUSTER, CANCEL, ...) are answered
/// PROC_UNAVAIL by the server until they exist.
pub const CLOUD_PROGRAM: Program = Program { prog: CLOUD_PROG, vers: CLOUD_VERS, max_proc: DEPLOY_OPTS };
pub const NODE_PROGRAM: Program = Program { prog: NODE_PROG, vers: NODE_VERS, max_proc: NODE_UNSTAGE };

/// Longest string we accept in a message or node name.
pub const MAX_STRING: usize = 4096;

/// Where a procedure's streamed opaque length sits within its arguments.
pub fn call_stream_at(prog: u32, vers: u32, proc_num: u32) -> Option<usize> {
    match (prog, vers, proc_num) {
        (CLOUD_PROG, CLOUD_VERS, DEPLOY) => Some(4),      // replicas, archive
        (CLOUD_PROG, CLOUD_VERS, DEPLOY_OPTS) => Some(8), // replicas, flags, archive
        (NODE_PROG, NODE_VERS, NODE_RUN) => Some(12),     // ticket, replica, replicas, archive
        (NODE_PROG, NODE_VERS, NODE_STAGE) => Some(12),   // stage, offset (hyper), data
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

/// The name of a CLOUD_PROG procedure, for logs.
pub fn cloud_proc_name(proc_num: u32) -> &'static str {
    match proc_num {
        CLOUD_NULL => "NULL",
        DEPLOY => "DEPLOY",
        STATUS => "STATUS",
        RETRIEVE => "RETRIEVE",
        CLOSE => "CLOSE",
        CLUSTER => "CLUSTER",
        MINE => "MINE",
        FOLLOW => "FOLLOW",
        CANCEL => "CANCEL",
        JOB_INFO => "JOB_INFO",
        DEPLOY_OPTS => "DEPLOY_OPTS",
        _ => "unknown",
    }
}

/// `enum node_state` of CLUSTER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Free = 0,
    Busy = 1,
    Down = 2,
}

impl NodeState {
    pub fn from_u32(v: u32) -> Result<Self, XdrError> {
        Ok(match v {
            0 => NodeState::Free,
            1 => NodeState::Busy,
            2 => NodeState::Down,
            _ => return Err(XdrError::Invalid(format!("unknown node_state {v}"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            NodeState::Free => "free",
            NodeState::Busy => "busy",
            NodeState::Down => "down",
        }
    }
}

/// `struct node_info`: one node in the cluster view. `ticket` 0: none;
/// `age`: seconds since the replica started (or the node went down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub state: NodeState,
    pub ticket: u32,
    pub replica: u32,
    pub age: u32,
}

/// `struct queue_entry`: a waiting job. `owner` -1: anonymous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub ticket: u32,
    pub replicas: u32,
    pub position: u32,
    pub owner: i32,
    pub age: u32,
}

/// `struct cluster_view`: the reply of CLUSTER.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    pub nodes: Vec<NodeInfo>,
    pub queue: Vec<QueueEntry>,
    /// Jobs in the table (not closed): waiting, running, finished.
    pub jobs: u32,
    pub running_jobs: u32,
    pub finished_jobs: u32,
}

/// Refuse a count of items of at least `min` bytes each that cannot fit.
fn count(r: &mut XdrReader, min: usize, what: &str) -> Result<usize, XdrError> {
    let n = r.u32()? as usize;
    if n > r.remaining() / min {
        return Err(XdrError::Invalid(format!("{n} {what} cannot fit in the message")));
    }
    Ok(n)
}

impl ClusterView {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.nodes.len() as u32);
        for n in &self.nodes {
            w.string(&n.name).u32(n.state as u32).u32(n.ticket).u32(n.replica).u32(n.age);
        }
        w.u32(self.queue.len() as u32);
        for q in &self.queue {
            w.u32(q.ticket).u32(q.replicas).u32(q.position).i32(q.owner).u32(q.age);
        }
        w.u32(self.jobs).u32(self.running_jobs).u32(self.finished_jobs);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let n = count(r, 20, "nodes")?;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(NodeInfo {
                name: r.string(MAX_STRING)?,
                state: NodeState::from_u32(r.u32()?)?,
                ticket: r.u32()?,
                replica: r.u32()?,
                age: r.u32()?,
            });
        }
        let n = count(r, 20, "queue entries")?;
        let mut queue = Vec::with_capacity(n);
        for _ in 0..n {
            queue.push(QueueEntry {
                ticket: r.u32()?,
                replicas: r.u32()?,
                position: r.u32()?,
                owner: r.i32()?,
                age: r.u32()?,
            });
        }
        Ok(ClusterView { nodes, queue, jobs: r.u32()?, running_jobs: r.u32()?, finished_jobs: r.u32()? })
    }
}

/// `struct ticket_info`: one of the caller's tickets (MINE). `age`:
/// seconds since it was deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketInfo {
    pub ticket: u32,
    pub state: JobState,
    pub replicas: u32,
    pub age: u32,
}

pub fn encode_tickets(w: &mut XdrWriter, tickets: &[TicketInfo]) {
    w.u32(tickets.len() as u32);
    for t in tickets {
        w.u32(t.ticket).u32(t.state as u32).u32(t.replicas).u32(t.age);
    }
}

pub fn decode_tickets(r: &mut XdrReader) -> Result<Vec<TicketInfo>, XdrError> {
    let n = count(r, 16, "tickets")?;
    (0..n)
        .map(|_| {
            Ok(TicketInfo { ticket: r.u32()?, state: JobState::from_u32(r.u32()?)?, replicas: r.u32()?, age: r.u32()? })
        })
        .collect()
}

/// FOLLOW's answer: output bytes, and whether the replica has ended with them.
pub type Chunk = (Vec<u8>, bool);

/// Most output bytes one FOLLOW reply carries.
pub const FOLLOW_CHUNK: usize = 64 * 1024;

/// `struct follow_args` (FOLLOW): ticket, replica, offset (unsigned hyper).
pub fn encode_follow_args(w: &mut XdrWriter, ticket: u32, replica: u32, offset: u64) {
    w.u32(ticket).u32(replica).u32((offset >> 32) as u32).u32(offset as u32);
}

/// NODE_KEEP's `ticket_list`.
pub fn encode_tickets_list(w: &mut XdrWriter, tickets: &[u32]) {
    w.u32(tickets.len() as u32);
    for &t in tickets {
        w.u32(t);
    }
}

pub fn decode_tickets_list(r: &mut XdrReader) -> Result<Vec<u32>, XdrError> {
    let n = r.u32()? as usize;
    if n > MAX_KEEP {
        return Err(XdrError::Short);
    }
    (0..n).map(|_| r.u32()).collect()
}

pub fn decode_follow_args(r: &mut XdrReader) -> Result<(u32, u32, u64), XdrError> {
    Ok((r.u32()?, r.u32()?, (u64::from(r.u32()?) << 32) | u64::from(r.u32()?)))
}

/// The OK arm of `follow_res` (FOLLOW and NODE_FOLLOW): bytes from the
/// offset, and whether the replica has ended and this is the last of them.
pub fn encode_follow_ok(w: &mut XdrWriter, data: &[u8], ended: bool) {
    w.u32(CloudStat::Ok as u32).opaque(data).bool(ended);
}

/// A `follow_res`.
pub fn decode_follow(r: &mut XdrReader) -> Result<Result<Chunk, (CloudStat, String)>, XdrError> {
    match decode_stat(r)? {
        Ok(()) => Ok(Ok((r.opaque(FOLLOW_CHUNK)?.to_vec(), r.bool()?))),
        Err(e) => Ok(Err(e)),
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

/// `enum outcome`: why a replica ended. `None` until it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    #[default]
    None = 0,
    /// `make run` exited 0.
    Completed = 1,
    /// `make run` exited non-zero (the recipe's own code, if make said it).
    Failed = 2,
    /// A signal, the time limit, a resource limit, cancel: the message says which.
    Killed = 3,
    /// The replica could not be set up: bad archive, no make, no process.
    SetupError = 4,
    /// Its node was lost.
    Lost = 5,
}

impl Outcome {
    pub fn from_u32(v: u32) -> Result<Self, XdrError> {
        const ALL: [Outcome; 6] =
            [Outcome::None, Outcome::Completed, Outcome::Failed, Outcome::Killed, Outcome::SetupError, Outcome::Lost];
        ALL.get(v as usize).copied().ok_or_else(|| XdrError::Invalid(format!("unknown outcome {v}")))
    }

    pub fn name(self) -> Option<&'static str> {
        match self {
            Outcome::None => None,
            Outcome::Completed => Some("COMPLETED"),
            Outcome::Failed => Some("FAILED"),
            Outcome::Killed => Some("KILLED"),
            Outcome::SetupError => Some("SETUP_ERROR"),
            Outcome::Lost => Some("LOST"),
        }
    }
}

/// `struct run_res` of NODE_RUN: how a replica ended. `recipe_code`: the
/// code make reported for the failing recipe (`Error 3`), -1 if none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    pub state: JobState,
    pub exit_code: i32,
    pub message: String,
    pub kind: Outcome,
    pub recipe_code: i32,
}

impl RunResult {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.state as u32).i32(self.exit_code).string(&self.message).u32(self.kind as u32).i32(self.recipe_code);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        Ok(RunResult {
            state: JobState::from_u32(r.u32()?)?,
            exit_code: r.i32()?,
            message: r.string(MAX_STRING)?,
            kind: Outcome::from_u32(r.u32()?)?,
            recipe_code: r.i32()?,
        })
    }

    /// A replica that ended as `kind` with no exit code of its own.
    pub fn ended(kind: Outcome, message: impl Into<String>) -> Self {
        RunResult { state: JobState::Invalid, exit_code: -1, message: message.into(), kind, recipe_code: -1 }
    }

    /// A replica that could not be set up.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::ended(Outcome::SetupError, message)
    }

    /// A replica whose node was lost.
    pub fn lost(message: impl Into<String>) -> Self {
        Self::ended(Outcome::Lost, message)
    }

    /// `make run` exited with `code` (COMPLETED if 0, else FAILED).
    pub fn exited(code: i32, message: impl Into<String>) -> Self {
        let (state, kind) =
            if code == 0 { (JobState::Completed, Outcome::Completed) } else { (JobState::Invalid, Outcome::Failed) };
        RunResult { state, exit_code: code, message: message.into(), kind, recipe_code: -1 }
    }
}

/// `struct replica_info` of JOB_INFO: what STATUS's `replica_status` lacks.
/// Ages are seconds before the reply; -1: not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub kind: Outcome,
    pub recipe_code: i32,
    pub started_age: i32,
    pub ended_age: i32,
}

/// `struct job_info`: the reply of JOB_INFO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub job: JobStatus,
    pub submitted_age: i32,
    pub replicas: Vec<ReplicaInfo>,
}

impl JobInfo {
    pub fn encode(&self, w: &mut XdrWriter) {
        self.job.encode(w);
        w.i32(self.submitted_age).u32(self.replicas.len() as u32);
        for r in &self.replicas {
            w.u32(r.kind as u32).i32(r.recipe_code).i32(r.started_age).i32(r.ended_age);
        }
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let job = JobStatus::decode(r)?;
        let submitted_age = r.i32()?;
        let n = count(r, 16, "replicas")?;
        let replicas = (0..n)
            .map(|_| {
                Ok(ReplicaInfo {
                    kind: Outcome::from_u32(r.u32()?)?,
                    recipe_code: r.i32()?,
                    started_age: r.i32()?,
                    ended_age: r.i32()?,
                })
            })
            .collect::<Result<_, XdrError>>()?;
        Ok(JobInfo { job, submitted_age, replicas })
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

/// The fixed arguments of NODE_STAGE that precede its bytes: which stage
/// of the link, and where in the archive the bytes go (each call continues
/// where the last one ended; offset 0 begins the stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageArgs {
    pub stage: u32,
    pub offset: u64,
}

impl StageArgs {
    pub fn encode(&self, w: &mut XdrWriter) {
        w.u32(self.stage).u32((self.offset >> 32) as u32).u32(self.offset as u32);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let stage = r.u32()?;
        let offset = (u64::from(r.u32()?) << 32) | u64::from(r.u32()?);
        Ok(StageArgs { stage, offset })
    }
}

/// `struct run_staged_args` of NODE_RUN_STAGED: NODE_RUN's arguments, the
/// stage holding the archive and the archive's whole length (a stage of
/// another length is not run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStagedArgs {
    pub run: RunArgs,
    pub stage: u32,
    pub length: u64,
}

impl RunStagedArgs {
    pub fn encode(&self, w: &mut XdrWriter) {
        self.run.encode(w);
        w.u32(self.stage).u32((self.length >> 32) as u32).u32(self.length as u32);
    }

    pub fn decode(r: &mut XdrReader) -> Result<Self, XdrError> {
        let run = RunArgs::decode(r)?;
        let stage = r.u32()?;
        let length = (u64::from(r.u32()?) << 32) | u64::from(r.u32()?);
        r.finish()?;
        Ok(RunStagedArgs { run, stage, length })
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
    fn every_cloud_procedure_has_its_name_for_the_debug_log() {
        for p in CLOUD_NULL..=DEPLOY_OPTS {
            assert_ne!(cloud_proc_name(p), "unknown", "procedure {p}");
        }
        assert_eq!(cloud_proc_name(DEPLOY_OPTS), "DEPLOY_OPTS");
        assert_eq!(cloud_proc_name(DEPLOY_OPTS + 1), "unknown");
    }

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
