//! The main server's brain, sans-I/O: client calls and node replies in,
//! replies, node calls and file removals out (the style of quinn-proto).
//!
//! Owns: the scheduler, spooled archives of jobs not finished (kept until
//! every replica has ended: local replicas read them in place), fetched outputs,
//! deferred RETRIEVE callers, ticket expiry (time comes in as `now`; there
//! is no clock inside), who owns each ticket (the uid that deployed it; only
//! that uid or root may RETRIEVE or CLOSE it), how many tickets each
//! owner holds (at most `--max-tickets-per-user`), the duplicate request
//! cache (`drc`) that answers a retried DEPLOY or CLOSE with its first
//! reply, the job rules (fail-fast stops, what a node going down or coming
//! back does to its replicas, `--requeue-lost`), and what each event means
//! for them; the journal records (`journal::Record`) of what happened
//! (deployed, started, finished, closed), queued for the caller to append
//! (`poll_record`), and the restore of a journal's live jobs after a
//! restart (`restore`: what each replica becomes, `link_up`: NODE_WAIT for
//! those a surviving node still runs). Also: the
//! cluster view (CLUSTER, MINE), deferred JOB_INFO callers (wait), FOLLOW
//! calls of replicas not started yet, CANCEL, and each replica's outcome
//! kind and times (submitted, started, ended). Staged transfers: whether
//! an upload that starts now goes on to a node as it arrives (`stage_for`:
//! its job would start at once with a replica on a remote node), the
//! stages under way and the slots promised to them, and at the verdict
//! NODE_RUN_STAGED for the replica placed there or NODE_UNSTAGE.
//! Must not touch: sockets, the reactor, processes. File *paths* are
//! decided here; opening, writing and deleting them is the caller's job,
//! done in the order the actions come out.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::drc::{self, Drc};
use crate::journal::{AtRestart, Live, Record};
use crate::proto::{
    self, CloudStat, ClusterView, JobInfo, JobState, JobStatus, NodeInfo, NodeState, Outcome, QueueEntry, ReplicaInfo,
    ReplicaStatus, RunArgs, RunResult, TicketInfo,
};
use crate::scheduler::{self, NodeId, Scheduler, SubmitError, Ticket};

/// A connection, by its reactor token.
pub type ConnId = usize;

/// Who to answer: a connection and the call's xid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub conn: ConnId,
    pub xid: u32,
}

pub type Failure = (CloudStat, String);

/// One replica's output ready to send: its status and the spooled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRef {
    pub status: ReplicaStatus,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Deploy(Result<Ticket, Failure>),
    Status(Result<JobStatus, Failure>),
    Retrieve(Result<Vec<OutputRef>, Failure>),
    Close(Result<(), Failure>),
    Cluster(ClusterView),
    Mine(Vec<TicketInfo>),
    Cancel(Result<(), Failure>),
    JobInfo(Result<JobInfo, Failure>),
    /// FOLLOW: output bytes and whether the replica has ended.
    Follow(Result<(Vec<u8>, bool), Failure>),
}

/// What the duplicate request cache keeps of a call answered with success
/// (the only replies it keeps): 8 bytes, not a whole `Reply`, since up to
/// `drc::MAX_ENTRIES` of them live for `drc::MAX_AGE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remembered {
    /// DEPLOY: the ticket it was given.
    Deployed(Ticket),
    /// CLOSE: it succeeded (its reply has nothing else).
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCall {
    /// Run one replica from this archive.
    Run { args: RunArgs, archive: PathBuf },
    /// Send the replica's output; spool it into `into`.
    Fetch { ticket: Ticket, replica: u32, into: PathBuf },
    /// Kill the ticket's processes if any and remove its workspace.
    Drop { ticket: Ticket },
    /// Fail-fast: end the ticket's replica now, keeping its output (its
    /// status is decided here, "stopped: replica i failed").
    Stop { ticket: Ticket },
    /// The replica's output from `offset`, for `caller` (FOLLOW).
    Follow { ticket: Ticket, offset: u64, caller: Caller },
    /// After a restart: report how the ticket's replica ends (NODE_WAIT),
    /// answered as a `Run` is.
    Wait { ticket: Ticket },
    /// When a link comes up: the node drops every ticket not in `tickets`
    /// (NODE_KEEP): replicas of a main server that is gone, or that this
    /// one gave up as lost while the node was away.
    Keep { tickets: Vec<Ticket> },
    /// `Run`, from the archive the node holds already as `stage` (a staged
    /// transfer of `length` bytes, NODE_RUN_STAGED); `archive` is the
    /// spooled copy, kept as for `Run`.
    RunStaged { args: RunArgs, stage: StageId, length: u64, archive: PathBuf },
    /// Drop a stage (NODE_UNSTAGE): its archive was refused, its upload
    /// failed, or its job did not start on that node.
    Unstage { stage: StageId },
}

/// A staged transfer: an archive sent to a node while it is uploaded
/// (`Coordinator::stage_for`). Its bytes are the main service's to send.
pub type StageId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Reply { to: Caller, reply: Reply },
    Node { node: NodeId, call: NodeCall },
    RemoveFile(PathBuf),
}

#[derive(Debug)]
enum Fetch {
    Pending,
    Done(Result<PathBuf, String>),
}

pub struct Coordinator {
    sched: Scheduler,
    node_names: Vec<String>,
    spool: PathBuf,
    archives: HashMap<Ticket, PathBuf>,
    fetches: HashMap<(Ticket, u32), Fetch>,
    retrievers: HashMap<Ticket, Vec<Caller>>,
    actions: VecDeque<Action>,
    /// How long a finished job waits to be retrieved before it is closed.
    ttl: Option<Duration>,
    /// Finished jobs by the moment they expire.
    expiry: BTreeSet<(Instant, Ticket)>,
    /// Tickets that expired (the most recent ones), to tell late callers why.
    expired: BTreeSet<Ticket>,
    /// The uid that deployed each ticket; absent: deployed anonymously.
    owners: HashMap<Ticket, u32>,
    /// The first ticket of this run: lower ones are an earlier run's.
    first_ticket: Ticket,
    /// Only this uid may deploy (a server without root runs jobs as its own
    /// user, so by default it takes jobs from that user alone); `None`: anyone.
    only_deployer: Option<u32>,
    /// First replies to DEPLOY and CLOSE calls that changed something, for
    /// their retries (a refused call changed nothing and may run again).
    drc: Drc<Remembered>,
    /// Tickets each owner holds (deployed, not yet closed or expired);
    /// `None`: the anonymous callers together.
    held: HashMap<Option<u32>, usize>,
    /// At most this many per owner (`--max-tickets-per-user`); `None`: no cap.
    max_held: Option<usize>,
    /// A replica lost with its node runs again elsewhere (`--requeue-lost`);
    /// its job's spooled archive is then kept until the job is finished.
    requeue_lost: bool,
    /// Deferred JOB_INFO (wait) callers, answered once the job ends.
    waiters: HashMap<Ticket, Vec<Caller>>,
    /// When each ticket was deployed, and when its replicas started.
    submitted: HashMap<Ticket, Instant>,
    started: HashMap<Ticket, Instant>,
    /// When each lost node was lost.
    lost_at: HashMap<NodeId, Instant>,
    /// How and when each ended replica ended: kind, make's recipe code (-1: none).
    outcomes: HashMap<(Ticket, u32), (Outcome, i32, Instant)>,
    /// FOLLOW calls forwarded to each node and not answered yet (a lost
    /// node's are answered here).
    following: HashMap<NodeId, Vec<Caller>>,
    /// FOLLOW calls for replicas still waiting: (caller, replica, offset).
    follow_waiting: HashMap<Ticket, Vec<(Caller, u32, u64)>>,
    /// The latest `now` an event brought (jobs start at the event that frees nodes).
    clock: Option<Instant>,
    /// Journal records of what happened, for the caller to append
    /// (`enable_journal`); their times are 0, the caller stamps them.
    journaling: bool,
    records: VecDeque<Record>,
    /// Nodes an upload may be staged to (remote ones: a node of this
    /// process reads the spooled archive in place, nothing to overlap).
    stageable: Vec<bool>,
    /// Stages under way: the node each one goes to (its slot promised to
    /// that upload when `stage_for` chose it).
    stages: HashMap<StageId, NodeId>,
    next_stage: StageId,
}

/// What `restore` put back, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub jobs: usize,
    /// Replicas waiting to start (queued, or requeued at the restart).
    pub queued: usize,
    pub finished: usize,
    /// Replicas that were running on a node of this process: INVALID.
    pub lost: usize,
    pub requeued: usize,
    /// Replicas believed still running on a node that survives a restart.
    pub running: usize,
    /// Records that could not be restored (logged).
    pub skipped: usize,
}

/// How many expired tickets are remembered for CLOUD_EXPIRED answers.
const REMEMBER_EXPIRED: usize = 65_536;

impl Coordinator {
    /// `node_names[i]` is how node i is shown ("127.0.0.1:9001"); finished
    /// jobs not retrieved within `ttl` are closed (`None`: never).
    pub fn new(node_names: Vec<String>, max_queue: usize, spool: PathBuf, ttl: Option<Duration>) -> Self {
        let slots = vec![1; node_names.len()];
        Self::with_slots(node_names, &slots, max_queue, spool, ttl)
    }

    /// `new`, where node i runs up to `slots[i]` replicas at once.
    pub fn with_slots(
        node_names: Vec<String>,
        slots: &[u32],
        max_queue: usize,
        spool: PathBuf,
        ttl: Option<Duration>,
    ) -> Self {
        Coordinator {
            sched: Scheduler::new(slots, max_queue),
            node_names,
            spool,
            archives: HashMap::new(),
            fetches: HashMap::new(),
            retrievers: HashMap::new(),
            actions: VecDeque::new(),
            ttl,
            expiry: BTreeSet::new(),
            expired: BTreeSet::new(),
            owners: HashMap::new(),
            first_ticket: 1,
            only_deployer: None,
            drc: Drc::new(drc::MAX_ENTRIES, drc::MAX_AGE),
            held: HashMap::new(),
            max_held: None,
            requeue_lost: false,
            waiters: HashMap::new(),
            submitted: HashMap::new(),
            started: HashMap::new(),
            lost_at: HashMap::new(),
            outcomes: HashMap::new(),
            follow_waiting: HashMap::new(),
            following: HashMap::new(),
            clock: None,
            journaling: false,
            records: VecDeque::new(),
            stageable: Vec::new(),
            stages: HashMap::new(),
            next_stage: 1,
        }
    }

    /// Uploads to node i may be staged there (`stage_for`): a remote node.
    pub fn set_stageable(&mut self, node: NodeId, on: bool) {
        if self.stageable.len() <= node {
            self.stageable.resize(node + 1, false);
        }
        self.stageable[node] = on;
    }

    /// A DEPLOY of `replicas` replicas starts uploading: if the job would
    /// start at once (nobody waits, its replicas fit, counting the slots
    /// of other stages under way as taken) with a replica on a stageable
    /// node, a new stage to that node, where its archive goes as it
    /// arrives. The job is placed at its verdict (`deploy_staged`), which
    /// prefers that node.
    pub fn stage_for(&mut self, replicas: u32) -> Option<(StageId, NodeId)> {
        let stages = &self.stages;
        let reserved = |i: NodeId| stages.values().filter(|&&n| n == i).count() as u32;
        let nodes = self.sched.would_place(replicas, &reserved)?;
        let node = nodes.into_iter().find(|&n| self.stageable.get(n).copied().unwrap_or(false))?;
        let stage = self.next_stage;
        self.next_stage = self.next_stage.wrapping_add(1).max(1);
        self.stages.insert(stage, node);
        log::debug!("stage {stage}: the upload goes on to node {} as it arrives", self.node_names[node]);
        Some((stage, node))
    }

    /// A stage is not needed (its archive was refused, the upload broke):
    /// the node drops it. Unknown stages (gone with their node) are ignored.
    pub fn stage_abort(&mut self, stage: StageId) {
        if let Some(node) = self.stages.remove(&stage) {
            self.actions.push_back(Action::Node { node, call: NodeCall::Unstage { stage } });
        }
    }

    /// A stage its node never heard of (nothing was sent before the
    /// upload ended: a small archive goes whole with NODE_RUN): forgotten.
    pub fn stage_unused(&mut self, stage: StageId) {
        self.stages.remove(&stage);
    }

    /// Whether a stage is still under way (not dropped with its node).
    pub fn stage_live(&self, stage: StageId) -> bool {
        self.stages.contains_key(&stage)
    }

    /// Make a journal record of every deploy, start, end and close
    /// (`poll_record`).
    pub fn enable_journal(&mut self) {
        self.journaling = true;
    }

    /// The next journal record, in the order things happened.
    pub fn poll_record(&mut self) -> Option<Record> {
        self.records.pop_front()
    }

    fn journal(&mut self, rec: Record) {
        if self.journaling {
            self.records.push_back(rec);
        }
    }

    /// Journal replica `i` of `ticket` if it has ended.
    fn journal_end(&mut self, ticket: Ticket, i: u32) {
        let Some(r) = self.sched.job(ticket).and_then(|j| j.replicas.get(i as usize)) else { return };
        if r.state.is_final() {
            let rec = Record::Finished {
                ticket,
                replica: i,
                state: r.state,
                exit_code: r.exit_code,
                message: r.message.clone(),
                ended: 0,
            };
            self.journal(rec);
        }
    }

    /// Journal the replicas of `ticket` that ended without ever starting
    /// (a fail-fast job's waiting ones).
    fn journal_unstarted_ends(&mut self, ticket: Ticket) {
        let Some(job) = self.sched.job(ticket) else { return };
        let ended: Vec<u32> = (0..job.replicas.len() as u32)
            .filter(|&i| job.replicas[i as usize].node.is_none() && job.replicas[i as usize].state.is_final())
            .collect();
        for i in ended {
            self.journal_end(ticket, i);
        }
    }

    /// After a restart, put back every job of the journal's live state, in
    /// ticket order, with its owner, replicas and place in the wait queue;
    /// ticket numbers continue above them. A replica that was running:
    /// if `survives(node)` (a remote node, which keeps running it) it stays
    /// RUNNING there until the node reports it (`link_up`); otherwise it
    /// died with the server and ends INVALID "server restarted" (with
    /// `--requeue-lost`: waits again, "requeued after the server
    /// restarted"). Then `kept_archives` names the spooled archives they
    /// still need, and `start_restored` starts what fits.
    pub fn restore(&mut self, live: &Live, survives: impl Fn(NodeId) -> bool, now: Instant) -> Restored {
        let mut out = Restored::default();
        for job in live.jobs.values() {
            let ticket = job.ticket;
            let mut replicas = Vec::with_capacity(job.replicas.len());
            let mut lost_on = Vec::new();
            let mut newly_ended = Vec::new();
            for (i, log) in job.replicas.iter().enumerate() {
                let node = log.started.as_ref().and_then(|s| self.node_names.iter().position(|n| *n == s.node));
                let where_ = log.started.as_ref().map_or("", |s| s.node.as_str());
                let mut r = scheduler::Replica {
                    node: None,
                    state: JobState::Waiting,
                    exit_code: 0,
                    message: String::new(),
                    stopping: None,
                };
                match log.at_restart() {
                    AtRestart::Queued => out.queued += 1,
                    AtRestart::Finished => {
                        let end = log.end.as_ref().expect("finished has an end");
                        r.node = node;
                        r.state = end.state;
                        r.exit_code = end.exit_code;
                        r.message = end.message.clone();
                        out.finished += 1;
                    }
                    AtRestart::RunningAtCrash => match node {
                        Some(n) if survives(n) => {
                            r.node = Some(n);
                            r.state = JobState::Running;
                            out.running += 1;
                        }
                        _ if self.requeue_lost => {
                            r.message = "requeued after the server restarted".into();
                            lost_on.extend(node);
                            out.requeued += 1;
                        }
                        _ => {
                            r.node = node;
                            r.state = JobState::Invalid;
                            r.exit_code = -1;
                            r.message = format!("server restarted: the replica was running on node {where_}");
                            newly_ended.push(i as u32);
                            out.lost += 1;
                        }
                    },
                }
                replicas.push(r);
            }
            // Replicas that cannot start again: the nodes file now has too
            // few nodes (the job would block the queue's head forever), or
            // the journal names an archive outside the spool (never opened,
            // never removed).
            let too_few = job.replicas.len() > self.node_names.len();
            let archive_ok = job.archive.parent() == Some(self.spool.as_path())
                && job.archive.file_name().is_some_and(|f| f != "." && f != "..");
            if too_few || !archive_ok {
                let why = if too_few {
                    format!(
                        "cannot run again after the restart: {} replicas, and the cluster has {} nodes now",
                        job.replicas.len(),
                        self.node_names.len()
                    )
                } else {
                    log::error!("journal: ticket {ticket}'s archive {} is not in the spool", job.archive.display());
                    "cannot run again after the restart: its archive is not in the spool; deploy it again".into()
                };
                for (i, r) in replicas.iter_mut().enumerate() {
                    if r.state == JobState::Waiting {
                        out.queued -= usize::from(job.replicas[i].at_restart() == AtRestart::Queued);
                        out.requeued -= usize::from(job.replicas[i].at_restart() == AtRestart::RunningAtCrash);
                        r.state = JobState::Invalid;
                        r.exit_code = -1;
                        r.message = why.clone();
                        newly_ended.push(i as u32);
                        out.lost += 1;
                    }
                }
            }
            let fail_fast = job.flags & proto::DEPLOY_FAIL_FAST != 0;
            let was_final: Vec<bool> = job.replicas.iter().map(|l| l.end.is_some()).collect();
            let stop = match self.sched.restore_job(ticket, replicas, fail_fast, lost_on) {
                Ok(stop) => stop,
                Err(why) => {
                    log::error!("journal: {why}; left out");
                    out.skipped += 1;
                    continue;
                }
            };
            out.jobs += 1;
            // Outcome kinds are not journaled: a replica lost with the
            // restart is LOST; an earlier end is told by its state and code.
            if let Some(restored) = self.sched.job(ticket) {
                for (i, r) in restored.replicas.iter().enumerate() {
                    let kind = match r.state {
                        _ if newly_ended.contains(&(i as u32)) => Outcome::Lost,
                        JobState::Completed => Outcome::Completed,
                        JobState::Invalid if (1..128).contains(&r.exit_code) => Outcome::Failed,
                        JobState::Invalid => Outcome::Killed,
                        _ => continue,
                    };
                    self.outcomes.insert((ticket, i as u32), (kind, -1, now));
                }
            }
            if let Some(uid) = job.owner {
                self.owners.insert(ticket, uid);
            }
            *self.held.entry(job.owner).or_default() += 1;
            for node in stop {
                self.actions.push_back(Action::Node { node, call: NodeCall::Stop { ticket } });
            }
            // Ends decided now (lost at the restart, or fail-fast) are journaled.
            let n = job.replicas.len() as u32;
            for i in 0..n {
                let ended_now = self.sched.job(ticket).is_some_and(|j| j.replicas[i as usize].state.is_final());
                if ended_now && (!was_final[i as usize] || newly_ended.contains(&i)) {
                    self.journal_end(ticket, i);
                }
            }
            let Some(restored) = self.sched.job(ticket) else { continue };
            let finished = restored.finished();
            let needs_archive = archive_ok
                && (restored.replicas.iter().any(|r| r.state == JobState::Waiting) || (self.requeue_lost && !finished));
            if needs_archive {
                self.archives.insert(ticket, job.archive.clone());
            }
            if finished {
                // Its retrieval period starts again from the restart.
                if let Some(ttl) = self.ttl {
                    self.expiry.insert((now + ttl, ticket));
                }
            }
        }
        self.first_ticket = self.sched.next_ticket();
        out
    }

    /// After `restore`: the jobs' times from the journal (Unix seconds; the
    /// caller says what `now` is in them), so ages go on across a restart.
    /// Ends decided at the restart keep `now`.
    pub fn restore_times(&mut self, live: &Live, now: Instant, unix_now: u64) {
        let at = |secs: u64| now.checked_sub(Duration::from_secs(unix_now.saturating_sub(secs))).unwrap_or(now);
        for job in live.jobs.values() {
            let ticket = job.ticket;
            if self.sched.job(ticket).is_none() {
                continue;
            }
            if job.submitted > 0 {
                self.submitted.insert(ticket, at(job.submitted));
            }
            if let Some(first) = job.replicas.iter().filter_map(|r| r.started.as_ref().map(|s| s.at)).min() {
                self.started.insert(ticket, at(first));
            }
            for (i, log) in job.replicas.iter().enumerate() {
                let (Some(end), Some(o)) = (&log.end, self.outcomes.get_mut(&(ticket, i as u32))) else { continue };
                if end.ended > 0 {
                    o.2 = at(end.ended);
                }
            }
        }
    }

    /// After `restore` (and keeping the `kept_archives`): start the queued
    /// jobs that fit.
    pub fn start_restored(&mut self) {
        self.start_ready();
    }

    /// The spooled archives that restored jobs still need (every other
    /// file of the spool is an orphan).
    pub fn kept_archives(&self) -> impl Iterator<Item = &PathBuf> {
        self.archives.values()
    }

    /// A link to `node` is up: after a restart, the replicas it is believed
    /// to run are asked for with NODE_WAIT (each answered as a NODE_RUN
    /// is, `run_finished`); then it takes work.
    pub fn link_up(&mut self, node: NodeId, now: Instant) {
        let tickets = self.tickets_on(node);
        self.actions.push_back(Action::Node { node, call: NodeCall::Keep { tickets } });
        for ticket in self.sched.running_on(node) {
            log::info!("ticket {ticket}: asking node {} how its replica ends", self.node_names[node]);
            self.actions.push_back(Action::Node { node, call: NodeCall::Wait { ticket } });
        }
        self.node_up(node, now);
    }

    /// Whether `node` runs a replica now (its link then gets heartbeats).
    pub fn runs_on(&self, node: NodeId) -> bool {
        self.sched.busy(node) > 0
    }

    /// The tickets whose replica on `node` this server still wants: one
    /// running there, or ended there with an output to fetch (not lost
    /// with the node).
    fn tickets_on(&self, node: NodeId) -> Vec<Ticket> {
        self.sched
            .jobs()
            .filter(|j| {
                j.replicas.iter().enumerate().any(|(i, r)| {
                    let lost = matches!(self.outcomes.get(&(j.ticket, i as u32)), Some((Outcome::Lost, _, _)));
                    r.node == Some(node) && r.state != JobState::Waiting && !lost
                })
            })
            .map(|j| j.ticket)
            .collect()
    }

    /// A DEPLOY's ticket could not be journaled (the reply to `to` is then
    /// an error): the job is forgotten as if closed, and a retry of the
    /// call is not answered with its ticket.
    pub fn abandon(&mut self, to: Caller, ticket: Ticket) {
        let owner = self.owners.get(&ticket).copied();
        self.drc.remove(&drc::Key { xid: to.xid, uid: owner, proc_num: proto::DEPLOY });
        if self.forget(ticket) {
            log::warn!("ticket {ticket}: dropped, its deploy could not be recorded");
            self.start_ready();
        }
    }

    /// `--requeue-lost`: a replica lost with its node is put back at the
    /// head of the queue to run on another node, instead of ending INVALID.
    pub fn requeue_lost(&mut self, on: bool) {
        self.requeue_lost = on;
    }

    /// Accept DEPLOY only from `uid` (and root).
    pub fn only_deployer(&mut self, uid: u32) {
        self.only_deployer = Some(uid);
    }

    /// Each owner may hold at most `n` tickets at once: every finished,
    /// unretrieved ticket keeps its outputs on disk until it expires.
    pub fn max_tickets_per_user(&mut self, n: usize) {
        self.max_held = Some(n);
    }

    /// Why `who` may not deploy one more ticket now, if so.
    fn holds_too_many(&self, who: Option<u32>) -> Option<Failure> {
        let max = self.max_held?;
        let held = self.held.get(&who).copied().unwrap_or(0);
        if held < max {
            return None;
        }
        let you = who.map_or("anonymous callers together".to_string(), |u| format!("uid {u}"));
        Some((
            CloudStat::QueueFull,
            format!(
                "{you}: {held} tickets held, the most one user may (--max-tickets-per-user {max}); retrieve or close some, then deploy again"
            ),
        ))
    }

    /// The ticket the next accepted DEPLOY gets.
    pub fn next_ticket(&self) -> Ticket {
        self.sched.next_ticket()
    }

    /// Continue ticket numbers from a persisted mark (see `tickets`).
    pub fn resume_tickets_from(&mut self, next: Ticket) {
        self.sched.resume_tickets_from(next);
        self.first_ticket = self.sched.next_ticket();
    }

    /// Why `who` may not RETRIEVE or CLOSE `ticket`, if they may not: only
    /// its owner and root may. Anonymous tickets are open to everyone.
    fn not_owner(&self, ticket: Ticket, who: Option<u32>) -> Option<Failure> {
        let &owner = self.owners.get(&ticket)?;
        if who == Some(owner) || who == Some(0) {
            return None;
        }
        let you = who.map_or("an anonymous caller".to_string(), |u| format!("uid {u}"));
        Some((
            CloudStat::NotOwner,
            format!("ticket {ticket} belongs to uid {owner}; only its owner or root may retrieve or close it (you are {you})"),
        ))
    }

    /// When `on_timer` next has work: the earliest expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.expiry.first().map(|&(at, _)| at)
    }

    /// Close finished jobs nobody retrieved in time.
    pub fn on_timer(&mut self, now: Instant) {
        self.clock = Some(now);
        while let Some(&(at, ticket)) = self.expiry.first() {
            if at > now {
                return;
            }
            self.expiry.pop_first();
            if self.retrievers.contains_key(&ticket) {
                // Being retrieved right now: give it another period.
                if let Some(ttl) = self.ttl {
                    self.expiry.insert((now + ttl, ticket));
                }
                continue;
            }
            if self.forget(ticket) {
                log::info!("ticket {ticket}: expired, not retrieved in time; outputs discarded");
                self.expired.insert(ticket);
                while self.expired.len() > REMEMBER_EXPIRED {
                    self.expired.pop_first();
                }
                self.start_ready();
            }
        }
    }

    /// Start the expiry clock of a job that has just finished.
    fn finished_now(&mut self, ticket: Ticket, now: Instant) {
        if let Some(archive) = self.archives.remove(&ticket) {
            self.actions.push_back(Action::RemoveFile(archive));
        }
        if let Some(ttl) = self.ttl {
            self.expiry.insert((now + ttl, ticket));
        }
    }

    /// Next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn reply(&mut self, to: Caller, reply: Reply) {
        self.actions.push_back(Action::Reply { to, reply });
    }

    /// The ticket a DEPLOY call `xid` by `who` was already given, if this
    /// call is a retry (same xid, same caller) of one still remembered.
    pub fn retried_deploy(&mut self, xid: u32, who: Option<u32>, now: Instant) -> Option<Ticket> {
        let key = drc::Key { xid, uid: who, proc_num: proto::DEPLOY };
        match self.drc.lookup(&key, now) {
            Some(Remembered::Deployed(ticket)) => Some(ticket),
            _ => None,
        }
    }

    /// A DEPLOY by `owner` (`None`: anonymous) whose archive has been spooled.
    pub fn deploy(&mut self, to: Caller, owner: Option<u32>, replicas: u32, archive: PathBuf, now: Instant) {
        self.deploy_opts(to, owner, replicas, 0, archive, now)
    }

    /// DEPLOY_OPTS: `deploy` with `flags` (`proto::DEPLOY_FAIL_FAST`).
    pub fn deploy_opts(
        &mut self,
        to: Caller,
        owner: Option<u32>,
        replicas: u32,
        flags: u32,
        archive: PathBuf,
        now: Instant,
    ) {
        self.deploy_staged(to, owner, replicas, flags, archive, None, now)
    }

    /// `deploy_opts` of an archive also sent, whole, to a node as `stage`
    /// (`stage_for`) of `length` bytes: if the job starts now with a
    /// replica there, that replica runs from the stage (NODE_RUN_STAGED);
    /// otherwise (refused, waiting, placed elsewhere) the stage is dropped
    /// and every replica runs as usual.
    #[allow(clippy::too_many_arguments)]
    pub fn deploy_staged(
        &mut self,
        to: Caller,
        owner: Option<u32>,
        replicas: u32,
        flags: u32,
        archive: PathBuf,
        stage: Option<(StageId, u64)>,
        now: Instant,
    ) {
        let staged = stage.and_then(|(s, length)| self.stages.get(&s).map(|&node| (s, node, length)));
        if let Some(failure) = self.not_a_deployer(owner).or_else(|| self.holds_too_many(owner)) {
            self.actions.push_back(Action::RemoveFile(archive));
            if let Some((s, _, _)) = staged {
                self.stage_abort(s);
            }
            return self.reply(to, Reply::Deploy(Err(failure)));
        }
        let fail_fast = flags & proto::DEPLOY_FAIL_FAST != 0;
        match self.sched.submit_opts(replicas, fail_fast) {
            Ok(ticket) => {
                let by = owner.map_or("anonymous".to_string(), |u| format!("uid {u}"));
                log::info!("ticket {ticket}: accepted from {by}, {replicas} replica(s), WAITING");
                if let Some(uid) = owner {
                    self.owners.insert(ticket, uid);
                }
                *self.held.entry(owner).or_default() += 1;
                self.journal(Record::Deployed {
                    ticket,
                    owner,
                    replicas,
                    flags,
                    submitted: 0,
                    archive: archive.clone(),
                });
                self.archives.insert(ticket, archive);
                self.clock = Some(now);
                self.submitted.insert(ticket, now);
                let key = drc::Key { xid: to.xid, uid: owner, proc_num: proto::DEPLOY };
                self.drc.insert(key, Remembered::Deployed(ticket), now);
                self.reply(to, Reply::Deploy(Ok(ticket)));
                self.start_ready_staged(staged.map(|(stage, node, length)| (ticket, node, stage, length)));
            }
            Err(e) => {
                self.actions.push_back(Action::RemoveFile(archive));
                self.reply(to, Reply::Deploy(Err(refusal(e))));
            }
        }
        // Not used (refused, waiting, or placed elsewhere): dropped.
        if let Some((s, _, _)) = staged {
            self.stage_abort(s);
        }
    }

    /// Would a DEPLOY of `replicas` be refused? Asked when its header
    /// arrives, so a refused archive is not uploaded for nothing.
    /// `verified`: `who` comes from the kernel (a local caller), not from
    /// a network peer's claim, which never makes it the only deployer.
    pub fn deploy_refusal(&self, who: Option<u32>, verified: bool, replicas: u32) -> Option<Failure> {
        self.not_a_deployer(if verified { who } else { None })
            .or_else(|| self.holds_too_many(who))
            .or_else(|| self.sched.admissible(replicas).err().map(refusal))
    }

    /// Why `who` may not deploy here at all, if so.
    fn not_a_deployer(&self, who: Option<u32>) -> Option<Failure> {
        let only = self.only_deployer?;
        if who == Some(only) || who == Some(0) {
            return None;
        }
        let you = who.map_or("an unverified caller".to_string(), |u| format!("uid {u}"));
        Some((
            CloudStat::Denied,
            format!(
                "this server runs jobs as its own user (uid {only}) and takes them only from that user, not from {you}: \
                 ask its owner to start it with --allow-other-users, or run your own server"
            ),
        ))
    }

    fn start_ready(&mut self) {
        self.start_ready_staged(None)
    }

    /// `start_ready`, where `staged` = (ticket, node, stage, length): that
    /// job's archive is on that node already, whose replica there runs
    /// from it (the stage is then used up).
    fn start_ready_staged(&mut self, staged: Option<(Ticket, NodeId, StageId, u64)>) {
        let mut staged = staged;
        for start in self.sched.start_ready_preferring(staged.map(|(t, node, _, _)| (t, node))) {
            let Some(archive) = self.archives.remove(&start.ticket) else {
                continue;
            };
            let replicas = self.sched.job(start.ticket).map_or(0, |j| j.replicas.len() as u32);
            if let Some(now) = self.clock {
                self.started.entry(start.ticket).or_insert(now);
            }
            for &(i, node) in &start.placed {
                log::info!("ticket {}: replica {i} -> node {}, RUNNING", start.ticket, self.node_names[node]);
                let args = RunArgs { ticket: start.ticket, replica: i, replicas };
                let node_name = self.node_names[node].clone();
                self.journal(Record::Started { ticket: start.ticket, replica: i, node: node_name, at: 0 });
                let call = match staged {
                    Some((t, n, stage, length)) if t == start.ticket && n == node => {
                        staged = None;
                        self.stages.remove(&stage);
                        NodeCall::RunStaged { args, stage, length, archive: archive.clone() }
                    }
                    _ => NodeCall::Run { args, archive: archive.clone() },
                };
                self.actions.push_back(Action::Node { node, call });
            }
            if !self.sched.job(start.ticket).is_some_and(|j| j.finished()) {
                // Kept until the job has finished: a local node's replica
                // reads it in place (no copy, no link), a remote node's is
                // streamed from it, and a replica lost with its node may
                // run again (`--requeue-lost`). Spool files are reused, so
                // nothing may still read it when it goes.
                self.archives.insert(start.ticket, archive);
            } else {
                self.actions.push_back(Action::RemoveFile(archive));
            }
            // Parked FOLLOWs go to the node right behind its NODE_RUN.
            for (caller, replica, offset) in self.follow_waiting.remove(&start.ticket).unwrap_or_default() {
                if let Some(&(_, node)) = start.placed.iter().find(|(i, _)| *i == replica) {
                    self.following.entry(node).or_default().push(caller);
                    let call = NodeCall::Follow { ticket: start.ticket, offset, caller };
                    self.actions.push_back(Action::Node { node, call });
                }
            }
        }
    }

    /// Why a ticket is not in the table: expired, or never there.
    fn unknown(&self, ticket: Ticket) -> Failure {
        match self.ttl {
            Some(ttl) if self.expired.contains(&ticket) => (
                CloudStat::Expired,
                format!(
                    "ticket {ticket} expired: it finished more than {}s ago and was not retrieved, so its outputs were discarded (cloud-server --ticket-ttl)",
                    ttl.as_secs()
                ),
            ),
            _ => {
                let why = if ticket == 0 || ticket >= self.next_ticket() {
                    "never issued"
                } else if ticket < self.first_ticket {
                    "closed or expired before the server last started"
                } else {
                    "already closed"
                };
                (CloudStat::NoSuchTicket, format!("no such ticket: {ticket} ({why})"))
            }
        }
    }

    fn replica_status(&self, ticket: Ticket) -> Option<Vec<ReplicaStatus>> {
        let job = self.sched.job(ticket)?;
        Some(
            job.replicas
                .iter()
                .enumerate()
                .map(|(i, r)| ReplicaStatus {
                    replica: i as u32,
                    node: r.node.map(|n| self.node_names[n].clone()).unwrap_or_default(),
                    state: r.state,
                    exit_code: r.exit_code,
                    message: r.message.clone(),
                })
                .collect(),
        )
    }

    pub fn job_status(&self, ticket: Ticket) -> Result<JobStatus, Failure> {
        let job = self.sched.job(ticket).ok_or_else(|| self.unknown(ticket))?;
        Ok(JobStatus {
            ticket,
            state: job.state(),
            queue_position: self.sched.queue_position(ticket),
            replicas: self.replica_status(ticket).unwrap_or_default(),
        })
    }

    pub fn status(&mut self, to: Caller, ticket: Ticket) {
        let st = self.job_status(ticket);
        self.reply(to, Reply::Status(st));
    }

    /// RETRIEVE by `who`: refused unless `who` owns the ticket or is root.
    pub fn retrieve(&mut self, to: Caller, who: Option<u32>, ticket: Ticket, wait: bool) {
        let Some(job) = self.sched.job(ticket) else {
            return self.reply(to, Reply::Retrieve(Err(self.unknown(ticket))));
        };
        if let Some(refusal) = self.not_owner(ticket, who) {
            return self.reply(to, Reply::Retrieve(Err(refusal)));
        }
        if !job.finished() && !wait {
            let state = job.state().name();
            let msg = format!("job {ticket} is {state}: outputs are not ready; retry later, or retrieve with wait");
            return self.reply(to, Reply::Retrieve(Err((CloudStat::NotReady, msg))));
        }
        self.retrievers.entry(ticket).or_default().push(to);
        if job.finished() {
            self.fetch_outputs(ticket);
        }
    }

    /// Ask nodes for outputs not fetched yet; answer retrievers once all are in.
    fn fetch_outputs(&mut self, ticket: Ticket) {
        let Some(job) = self.sched.job(ticket) else {
            return;
        };
        let mut all_done = true;
        let mut calls = Vec::new();
        for (i, r) in job.replicas.iter().enumerate() {
            let key = (ticket, i as u32);
            match self.fetches.get(&key) {
                Some(Fetch::Done(_)) => {}
                Some(Fetch::Pending) => all_done = false,
                None => {
                    if let Some(node) = r.node {
                        all_done = false;
                        let into = self.spool.join(format!("out-{ticket}-{i}"));
                        calls.push((key, node, NodeCall::Fetch { ticket, replica: i as u32, into }));
                    } else {
                        // Never ran, or its node is not in the nodes file
                        // any more (after a restart): nothing to fetch.
                        self.fetches.insert(key, Fetch::Done(Err("never ran on a node of this cluster".into())));
                    }
                }
            }
        }
        for (key, node, call) in calls {
            self.fetches.insert(key, Fetch::Pending);
            self.actions.push_back(Action::Node { node, call });
        }
        if !all_done {
            return;
        }
        let Some(callers) = self.retrievers.remove(&ticket) else {
            return;
        };
        let statuses = self.replica_status(ticket).unwrap_or_default();
        let mut outs = Vec::with_capacity(statuses.len());
        for mut status in statuses {
            match self.fetches.get(&(ticket, status.replica)) {
                Some(Fetch::Done(Ok(path))) => outs.push(OutputRef { status, path: path.clone() }),
                Some(Fetch::Done(Err(why))) => {
                    // A replica lost with its node already says why.
                    if !status.message.contains(why.as_str()) {
                        status.message = format!("{} (output lost: {why})", status.message);
                    }
                    outs.push(OutputRef { status, path: PathBuf::new() });
                }
                _ => unreachable!("all fetches are done"),
            }
        }
        for to in callers {
            self.reply(to, Reply::Retrieve(Ok(outs.clone())));
        }
    }

    /// A node's NODE_RUN for `ticket` came back: its replica's process has ended.
    pub fn run_finished(&mut self, node: NodeId, ticket: Ticket, result: RunResult, now: Instant) {
        self.clock = Some(now);
        if let Some(ended) = self.sched.replica_finished(node, ticket, &result) {
            if self.sched.job(ticket).is_some() {
                let kind = if result.kind == Outcome::None { Outcome::SetupError } else { result.kind };
                self.outcomes.insert((ticket, ended.replica), (kind, result.recipe_code, now));
            }
            // The outcome kind, as the client shows it (KILLED, FAILED, ...);
            // the state (COMPLETED or INVALID) only where there is none.
            log::info!(
                "ticket {ticket}: replica {} on {} {}: {}",
                ended.replica,
                self.node_names[node],
                result.kind.name().unwrap_or(result.state.name()),
                result.message
            );
            self.journal_end(ticket, ended.replica);
            self.journal_unstarted_ends(ticket);
            self.stop_replicas(ticket, ended.replica, &ended.stop);
            self.after_replica_ended(ticket, now);
        }
        self.start_ready();
    }

    /// What a node says about a replica it runs (a Slurm node: its Slurm
    /// job and state), shown as the replica's status message until it ends.
    pub fn replica_note(&mut self, node: NodeId, ticket: Ticket, message: &str) {
        self.sched.replica_note(node, ticket, message);
    }

    /// Fail-fast: replica `failed` of `ticket` failed; its other replicas
    /// on `nodes` are stopped.
    fn stop_replicas(&mut self, ticket: Ticket, failed: u32, nodes: &[NodeId]) {
        for &node in nodes {
            log::info!(
                "ticket {ticket}: replica {failed} failed, stopping the one on {} (fail-fast)",
                self.node_names[node]
            );
            self.actions.push_back(Action::Node { node, call: NodeCall::Stop { ticket } });
        }
    }

    /// A replica of `ticket` ended: if that finished the job, start its
    /// expiry clock and answer its retrievers.
    fn after_replica_ended(&mut self, ticket: Ticket, now: Instant) {
        if self.sched.job(ticket).is_some_and(|j| j.finished()) {
            self.job_ended(ticket, now);
        }
    }

    /// A job's last replica has ended: start its expiry clock, answer its
    /// WAIT callers, and its RETRIEVE callers once outputs are fetched.
    fn job_ended(&mut self, ticket: Ticket, now: Instant) {
        self.finished_now(ticket, now);
        if let Some(waiters) = self.waiters.remove(&ticket) {
            let info = self.job_info(ticket, now);
            for to in waiters {
                self.reply(to, Reply::JobInfo(info.clone()));
            }
        }
        if self.retrievers.contains_key(&ticket) {
            self.fetch_outputs(ticket);
        }
    }

    /// A NODE_FETCH could not be completed for a reason that may pass (out
    /// of descriptors or disk, a reply cut short): the ticket's retrievers
    /// get an error, never OK with a lost output, and the fetch is forgotten
    /// so that the next RETRIEVE asks the node again. Outputs fetched
    /// already stay.
    pub fn fetch_failed(&mut self, ticket: Ticket, replica: u32, why: &str) {
        if matches!(self.fetches.get(&(ticket, replica)), Some(Fetch::Pending)) {
            self.fetches.remove(&(ticket, replica));
        }
        log::warn!("ticket {ticket}: cannot fetch replica {replica}'s output: {why}");
        for to in self.retrievers.remove(&ticket).unwrap_or_default() {
            let msg = format!("could not read the outputs of ticket {ticket}: {why}; retry");
            self.reply(to, Reply::Retrieve(Err((CloudStat::Internal, msg))));
        }
    }

    /// A NODE_FETCH came back, spooled (or failed for good: the node has no
    /// output for it, or was lost).
    pub fn fetched(&mut self, ticket: Ticket, replica: u32, result: Result<PathBuf, String>) {
        if self.sched.job(ticket).is_none() {
            if let Ok(path) = result {
                self.actions.push_back(Action::RemoveFile(path));
            }
            return;
        }
        self.fetches.insert((ticket, replica), Fetch::Done(result));
        self.fetch_outputs(ticket);
    }

    /// CLOSE by `who`: refused unless `who` owns the ticket or is root. A
    /// retried CLOSE gets its first reply.
    pub fn close(&mut self, to: Caller, who: Option<u32>, ticket: Ticket, now: Instant) {
        self.clock = Some(now);
        let key = drc::Key { xid: to.xid, uid: who, proc_num: proto::CLOSE };
        if self.drc.lookup(&key, now).is_some() {
            log::info!("connection {}: xid {:#x} is a retried CLOSE; answering as the first time", to.conn, to.xid);
            return self.reply(to, Reply::Close(Ok(())));
        }
        if let Some(refusal) = self.not_owner(ticket, who) {
            return self.reply(to, Reply::Close(Err(refusal)));
        }
        if !self.forget(ticket) {
            let failure = self.unknown(ticket);
            return self.reply(to, Reply::Close(Err(failure)));
        }
        log::info!("ticket {ticket}: closed");
        self.drc.insert(key, Remembered::Closed, now);
        self.reply(to, Reply::Close(Ok(())));
        self.start_ready();
    }

    /// Remove a ticket: its archive, its nodes' workspaces, its fetched
    /// outputs; parked retrievers are told. False if there was no such job.
    fn forget(&mut self, ticket: Ticket) -> bool {
        let Some(closed) = self.sched.close(ticket) else { return false };
        self.journal(Record::Closed { ticket });
        let owner = self.owners.remove(&ticket);
        if let Some(n) = self.held.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(&owner);
            }
        }
        self.expiry.retain(|&(_, t)| t != ticket);
        if let Some(archive) = self.archives.remove(&ticket) {
            self.actions.push_back(Action::RemoveFile(archive));
        }
        for node in closed.nodes {
            self.actions.push_back(Action::Node { node, call: NodeCall::Drop { ticket } });
        }
        let keys: Vec<_> = self.fetches.keys().filter(|k| k.0 == ticket).copied().collect();
        for key in keys {
            if let Some(Fetch::Done(Ok(path))) = self.fetches.remove(&key) {
                self.actions.push_back(Action::RemoveFile(path));
            }
        }
        for waiter in self.retrievers.remove(&ticket).unwrap_or_default() {
            let msg = format!("ticket {ticket} was closed while waiting for its outputs");
            self.reply(waiter, Reply::Retrieve(Err((CloudStat::NoSuchTicket, msg))));
        }
        for waiter in self.waiters.remove(&ticket).unwrap_or_default() {
            let msg = format!("ticket {ticket} was closed while waiting for it to end");
            self.reply(waiter, Reply::JobInfo(Err((CloudStat::NoSuchTicket, msg))));
        }
        self.submitted.remove(&ticket);
        self.started.remove(&ticket);
        self.outcomes.retain(|&(t, _), _| t != ticket);
        for (to, _, _) in self.follow_waiting.remove(&ticket).unwrap_or_default() {
            let msg = format!("ticket {ticket} was closed before it started");
            self.reply(to, Reply::Follow(Err((CloudStat::NoSuchTicket, msg))));
        }
        true
    }

    /// A client connection went away: forget its deferred calls.
    pub fn conn_closed(&mut self, conn: ConnId) {
        for callers in self.retrievers.values_mut().chain(self.waiters.values_mut()) {
            callers.retain(|c| c.conn != conn);
        }
        self.retrievers.retain(|_, c| !c.is_empty());
        self.waiters.retain(|_, c| !c.is_empty());
        for f in self.follow_waiting.values_mut() {
            f.retain(|(c, _, _)| c.conn != conn);
        }
        self.follow_waiting.retain(|_, f| !f.is_empty());
    }

    /// A node cannot be reached (its link broke, or it is not connected
    /// yet): its running replicas end INVALID "node lost: ..." (with
    /// `--requeue-lost`: go back to the head of the queue, "requeued after
    /// node X was lost"), and it takes no new work until `node_up`.
    pub fn node_down(&mut self, node: NodeId, now: Instant) {
        let name = self.node_names[node].clone();
        let was_up = self.sched.is_up(node);
        let lost = format!("node lost: lost contact with node {name}");
        let requeued = format!("requeued after node {name} was lost");
        let down = self.sched.node_down(node, self.requeue_lost, &lost, &requeued);
        self.clock = Some(now);
        // Its stages went with its link (the node drops a link's stages).
        self.stages.retain(|_, n| *n != node);
        if was_up {
            self.lost_at.insert(node, now);
        }
        for to in self.following.remove(&node).unwrap_or_default() {
            let why = format!("{lost}; its output cannot be followed");
            self.reply(to, Reply::Follow(Err((CloudStat::Internal, why))));
        }
        if was_up {
            log::error!("lost contact with node {name}: no new work goes to it until it is back");
        }
        for &(ticket, replica) in &down.requeued {
            log::warn!("ticket {ticket}: replica {replica} {requeued}");
        }
        for (stop_on, ticket) in down.stop {
            self.actions.push_back(Action::Node { node: stop_on, call: NodeCall::Stop { ticket } });
        }
        // A lost replica's output went with the node: nothing to fetch, ever.
        for &(ticket, replica) in &down.failed {
            self.fetches.insert((ticket, replica), Fetch::Done(Err(lost.clone())));
            if self.sched.job(ticket).is_some() {
                self.outcomes.insert((ticket, replica), (Outcome::Lost, -1, now));
            }
        }
        // Fetches in flight on its link get no reply: they may pass once the
        // node is back (outputs of finished replicas are on its disk).
        let cut: Vec<(Ticket, u32)> = self
            .fetches
            .iter()
            .filter(|(_, f)| matches!(f, Fetch::Pending))
            .map(|(&k, _)| k)
            .filter(|&(ticket, replica)| {
                let replica = self.sched.job(ticket).and_then(|j| j.replicas.get(replica as usize));
                replica.is_some_and(|r| r.node == Some(node))
            })
            .collect();
        for (ticket, replica) in cut {
            self.fetch_failed(ticket, replica, &lost);
        }
        for &(ticket, replica) in &down.failed {
            self.journal_end(ticket, replica);
            self.journal_unstarted_ends(ticket);
            if self.sched.job(ticket).is_some_and(|j| j.finished()) {
                self.finished_now(ticket, now);
                for to in self.waiters.remove(&ticket).unwrap_or_default() {
                    let info = self.job_info(ticket, now);
                    self.reply(to, Reply::JobInfo(info));
                }
            }
        }
        let tickets: Vec<Ticket> = self.retrievers.keys().copied().collect();
        for t in tickets {
            if self.sched.job(t).is_some_and(|j| j.finished()) {
                self.fetch_outputs(t);
            }
        }
        self.start_ready();
    }

    /// Node i is not reachable yet at start (a remote node before its link
    /// is up): it takes no work until `node_up`; nothing was lost.
    pub fn node_not_up_yet(&mut self, node: NodeId) {
        let none = self.sched.node_down(node, false, "", "");
        debug_assert!(none.failed.is_empty() && none.requeued.is_empty());
    }

    /// A node is reachable again: it takes work.
    pub fn node_up(&mut self, node: NodeId, now: Instant) {
        // Jobs that start now start now (their `started` time).
        self.clock = Some(now);
        if !self.sched.is_up(node) {
            log::info!("node {} is up: it takes work", self.node_names[node]);
        }
        self.sched.node_up(node);
        self.start_ready();
    }

    /// The cluster as the live page shows it (`http`): asked only while a
    /// browser is subscribed.
    pub fn live_view(&self) -> crate::http::ClusterView {
        use crate::http::{ClusterView, NodeView, QueuedView};
        let nodes = (0..self.node_names.len())
            .map(|i| NodeView {
                name: self.node_names[i].clone(),
                down: !self.sched.is_up(i),
                slots: self.sched.slots_of(i),
                running: self.sched.node_runs(i),
            })
            .collect();
        let queue = self
            .sched
            .waiting()
            .map(|j| QueuedView {
                ticket: j.ticket,
                replicas: j.replicas.len() as u32,
                owner: self.owners.get(&j.ticket).copied(),
            })
            .collect();
        let jobs = self.sched.jobs().map(|j| (j.ticket, j.replicas.iter().map(|r| r.state).collect())).collect();
        ClusterView { nodes, queue, jobs }
    }

    pub fn job_state(&self, ticket: Ticket) -> Option<JobState> {
        self.sched.job(ticket).map(|j| j.state())
    }

    // --- CLUSTER, MINE, FOLLOW, CANCEL, JOB_INFO (branch cli) ---

    /// Whole seconds from `then` to `now`.
    fn age(then: Option<&Instant>, now: Instant) -> u32 {
        then.map_or(0, |&t| now.saturating_duration_since(t).as_secs().min(u64::from(u32::MAX)) as u32)
    }

    /// CLUSTER: every node, the wait queue in order, totals. Open to all.
    pub fn cluster_view(&self, now: Instant) -> ClusterView {
        // One row per slot: a node with `slots=K` is listed K times.
        let mut nodes = Vec::new();
        for n in 0..self.node_names.len() {
            let name = &self.node_names[n];
            if !self.sched.is_up(n) {
                let age = Self::age(self.lost_at.get(&n), now);
                let down = NodeInfo { name: name.clone(), state: NodeState::Down, ticket: 0, replica: 0, age };
                nodes.extend(std::iter::repeat_n(down, self.sched.slots_of(n) as usize));
                continue;
            }
            let runs = self.sched.node_runs(n);
            for &(ticket, replica) in &runs {
                let age = Self::age(self.started.get(&ticket), now);
                nodes.push(NodeInfo { name: name.clone(), state: NodeState::Busy, ticket, replica, age });
            }
            let free = (self.sched.slots_of(n) as usize).saturating_sub(runs.len());
            let idle = NodeInfo { name: name.clone(), state: NodeState::Free, ticket: 0, replica: 0, age: 0 };
            nodes.extend(std::iter::repeat_n(idle, free));
        }
        let queue = self
            .sched
            .waiting()
            .enumerate()
            .map(|(i, job)| (i, job.ticket))
            .map(|(i, ticket)| QueueEntry {
                ticket,
                replicas: self.sched.job(ticket).map_or(0, |j| j.replicas.len() as u32),
                position: i as u32 + 1,
                owner: self.owners.get(&ticket).map_or(-1, |&u| u as i32),
                age: Self::age(self.submitted.get(&ticket), now),
            })
            .collect();
        let (mut jobs, mut running_jobs, mut finished_jobs) = (0, 0, 0);
        for job in self.sched.jobs() {
            jobs += 1;
            if job.finished() {
                finished_jobs += 1;
            } else if job.state() != JobState::Waiting {
                running_jobs += 1;
            }
        }
        ClusterView { nodes, queue, jobs, running_jobs, finished_jobs }
    }

    pub fn cluster(&mut self, to: Caller, now: Instant) {
        let view = self.cluster_view(now);
        self.reply(to, Reply::Cluster(view));
    }

    /// MINE: the tickets `who` deployed (anonymous callers: the anonymous tickets).
    pub fn mine(&mut self, to: Caller, who: Option<u32>, now: Instant) {
        let tickets = self
            .sched
            .jobs()
            .filter(|j| self.owners.get(&j.ticket).copied() == who)
            .map(|j| TicketInfo {
                ticket: j.ticket,
                state: j.state(),
                replicas: j.replicas.len() as u32,
                age: Self::age(self.submitted.get(&j.ticket), now),
            })
            .collect();
        self.reply(to, Reply::Mine(tickets));
    }

    /// FOLLOW by `who` (owner or root, as RETRIEVE): the replica's output
    /// from `offset`, asked of its node, which answers once there is some
    /// or the replica has ended. A waiting replica's call waits for its start.
    pub fn follow(&mut self, to: Caller, who: Option<u32>, ticket: Ticket, replica: u32, offset: u64) {
        let Some(job) = self.sched.job(ticket) else {
            return self.reply(to, Reply::Follow(Err(self.unknown(ticket))));
        };
        if let Some(refusal) = self.not_owner(ticket, who) {
            return self.reply(to, Reply::Follow(Err(refusal)));
        }
        let Some(r) = job.replicas.get(replica as usize) else {
            let n = job.replicas.len();
            let msg = format!("ticket {ticket} has {n} replica(s), numbered 0 to {}; no replica {replica}", n - 1);
            return self.reply(to, Reply::Follow(Err((CloudStat::BadReplicas, msg))));
        };
        match r.node {
            Some(node) if !self.sched.is_up(node) => {
                let msg = format!("node {} was lost; its output cannot be followed", self.node_names[node]);
                self.reply(to, Reply::Follow(Err((CloudStat::Internal, msg))))
            }
            Some(node) => {
                self.following.entry(node).or_default().push(to);
                self.actions.push_back(Action::Node { node, call: NodeCall::Follow { ticket, offset, caller: to } })
            }
            None if r.state == JobState::Waiting => {
                self.follow_waiting.entry(ticket).or_default().push((to, replica, offset))
            }
            None => self.reply(to, Reply::Follow(Ok((Vec::new(), true)))),
        }
    }

    /// A node answered a FOLLOW.
    pub fn followed(&mut self, to: Caller, result: Result<(Vec<u8>, bool), String>) {
        for callers in self.following.values_mut() {
            if let Some(i) = callers.iter().position(|&c| c == to) {
                callers.swap_remove(i);
                break;
            }
        }
        self.reply(to, Reply::Follow(result.map_err(|e| (CloudStat::NoSuchTicket, e))));
    }

    /// JOB_INFO: STATUS with each replica's outcome kind and times.
    pub fn job_info(&self, ticket: Ticket, now: Instant) -> Result<JobInfo, Failure> {
        let job = self.job_status(ticket)?;
        let age = |t: Option<&Instant>| t.map_or(-1, |&t| Self::age(Some(&t), now).min(i32::MAX as u32) as i32);
        let started = self.started.get(&ticket);
        let replicas = (0..job.replicas.len() as u32)
            .map(|i| {
                let (kind, recipe_code, ended) = match self.outcomes.get(&(ticket, i)) {
                    Some(&(kind, code, at)) => (kind, code, age(Some(&at))),
                    None => (Outcome::None, -1, -1),
                };
                let ran = !job.replicas[i as usize].node.is_empty();
                ReplicaInfo { kind, recipe_code, started_age: if ran { age(started) } else { -1 }, ended_age: ended }
            })
            .collect();
        Ok(JobInfo { job, submitted_age: age(self.submitted.get(&ticket)), replicas })
    }

    /// JOB_INFO; with `wait`, answered once the job has ended (at once if it has).
    pub fn info(&mut self, to: Caller, ticket: Ticket, wait: bool, now: Instant) {
        if wait && self.sched.job(ticket).is_some_and(|j| !j.finished()) {
            return self.waiters.entry(ticket).or_default().push(to);
        }
        let info = self.job_info(ticket, now);
        self.reply(to, Reply::JobInfo(info));
    }

    /// CANCEL by `who` (owner or root): waiting replicas never start,
    /// running ones are killed (the node reports them KILLED, cancelled);
    /// outputs stay for RETRIEVE. Cancelling an ended job changes nothing.
    pub fn cancel(&mut self, to: Caller, who: Option<u32>, ticket: Ticket, now: Instant) {
        let Some(job) = self.sched.job(ticket) else {
            return self.reply(to, Reply::Cancel(Err(self.unknown(ticket))));
        };
        if let Some(refusal) = self.not_owner(ticket, who) {
            return self.reply(to, Reply::Cancel(Err(refusal)));
        }
        let was_finished = job.finished();
        self.clock = Some(now);
        let replicas = job.replicas.len() as u32;
        if self.sched.cancel_waiting(ticket, "cancelled before it started (cloud cancel)") {
            for i in 0..replicas {
                self.outcomes.insert((ticket, i), (Outcome::Killed, -1, now));
            }
            if let Some(archive) = self.archives.remove(&ticket) {
                self.actions.push_back(Action::RemoveFile(archive));
            }
            log::info!("ticket {ticket}: cancelled while waiting");
            for (to, _, _) in self.follow_waiting.remove(&ticket).unwrap_or_default() {
                self.reply(to, Reply::Follow(Ok((Vec::new(), true))));
            }
        }
        let running = self.sched.stop_running(ticket, "killed: cancelled (cloud cancel); output kept");
        for &node in &running {
            log::info!("ticket {ticket}: cancelled, killing its replica on {}", self.node_names[node]);
            self.actions.push_back(Action::Node { node, call: NodeCall::Stop { ticket } });
        }
        self.reply(to, Reply::Cancel(Ok(())));
        if !was_finished && running.is_empty() && self.sched.job(ticket).is_some_and(|j| j.finished()) {
            self.job_ended(ticket, now);
        }
        self.start_ready();
    }
}

fn refusal(e: SubmitError) -> Failure {
    let stat = match e {
        SubmitError::BadReplicas { .. } => CloudStat::BadReplicas,
        SubmitError::QueueFull { .. } => CloudStat::QueueFull,
    };
    (stat, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: the cache's up to 4,096 remembered replies cost a few
    /// hundred KiB of a server's RSS with whole `Reply`s in them.
    #[test]
    fn the_duplicate_request_cache_keeps_8_bytes_a_reply() {
        assert!(std::mem::size_of::<Remembered>() <= 8);
        assert!(std::mem::size_of::<Reply>() > 32, "a whole reply is what the cache no longer keeps");
    }

    fn coord(nodes: usize) -> Coordinator {
        let names = (0..nodes).map(|i| format!("127.0.0.1:{}", 9001 + i)).collect();
        Coordinator::new(names, 10, PathBuf::from("/spool"), Some(Duration::from_secs(60)))
    }

    fn drain(c: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    /// The virtual clock's origin; tests add to it.
    fn t0() -> Instant {
        use std::sync::OnceLock;
        static T0: OnceLock<Instant> = OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// The ticket node `n` runs (tests of one replica per node).
    fn on_node(c: &Coordinator, n: NodeId) -> Ticket {
        c.sched.node_runs(n).first().map_or(0, |&(t, _)| t)
    }

    fn ok() -> RunResult {
        RunResult::exited(0, "make run exited with status 0")
    }

    #[test]
    fn no_such_ticket_says_never_issued_or_closed_now_or_before_a_restart() {
        let mut c = coord(1);
        c.resume_tickets_from(1025);
        c.deploy(A, None, 1, "/spool/in".into(), t0());
        drain(&mut c);
        c.run_finished(0, 1025, ok(), t0());
        drain(&mut c);
        c.close(A, None, 1025, t0());
        drain(&mut c);
        for (ticket, why) in [
            (0, "(never issued)"),
            (1026, "(never issued)"),
            (1025, "(already closed)"),
            (7, "(closed or expired before the server last started)"),
        ] {
            c.status(B, ticket);
            let acts = drain(&mut c);
            let [Action::Reply { reply: Reply::Status(Err((CloudStat::NoSuchTicket, m))), .. }] = &acts[..] else {
                panic!("{acts:?}")
            };
            assert_eq!(m, &format!("no such ticket: {ticket} {why}"));
        }
    }

    #[test]
    fn only_the_owner_or_root_may_retrieve_or_close() {
        let mut c = coord(1);
        c.deploy(A, Some(1000), 1, "/spool/in".into(), t0());
        drain(&mut c);
        c.run_finished(0, 1, ok(), t0());
        drain(&mut c);
        let refused = |acts: Vec<Action>| {
            matches!(&acts[..], [Action::Reply { reply: Reply::Retrieve(Err((CloudStat::NotOwner, m))) | Reply::Close(Err((CloudStat::NotOwner, m))), .. }]
                if m.starts_with("ticket 1 belongs to uid 1000; only its owner or root may retrieve or close it"))
        };
        c.retrieve(B, Some(1001), 1, true);
        assert!(refused(drain(&mut c)));
        c.retrieve(B, None, 1, false);
        assert!(refused(drain(&mut c)));
        c.close(B, Some(1001), 1, t0());
        assert!(refused(drain(&mut c)));
        // Nothing happened to it; STATUS is open to all.
        c.status(B, 1);
        assert!(matches!(&drain(&mut c)[0], Action::Reply { reply: Reply::Status(Ok(_)), .. }));
        // The owner, and root, may.
        c.retrieve(A, Some(1000), 1, true);
        assert!(matches!(&drain(&mut c)[0], Action::Node { call: NodeCall::Fetch { .. }, .. }));
        c.close(B, Some(0), 1, t0());
        assert!(drain(&mut c).iter().any(|a| matches!(a, Action::Reply { to: B, reply: Reply::Close(Ok(())) })));
        // Anonymous tickets are anyone's.
        c.deploy(A, None, 1, "/spool/in2".into(), t0());
        drain(&mut c);
        c.close(B, Some(1234), 2, t0());
        assert!(drain(&mut c).iter().any(|a| matches!(a, Action::Reply { to: B, reply: Reply::Close(Ok(())) })));
    }

    #[test]
    fn a_retried_deploy_or_close_gets_its_first_reply_and_a_refusal_is_not_kept() {
        let mut c = coord(1);
        assert_eq!(c.retried_deploy(A.xid, Some(1000), t0()), None);
        c.deploy(A, Some(1000), 1, "/spool/in".into(), t0());
        drain(&mut c);
        assert_eq!(c.retried_deploy(A.xid, Some(1000), t0()), Some(1));
        assert_eq!(c.retried_deploy(A.xid, Some(1001), t0()), None, "another caller's xid is another call");
        assert_eq!(c.retried_deploy(B.xid, Some(1000), t0()), None);
        // A refused CLOSE changed nothing: its retry is decided again.
        c.close(B, Some(1001), 1, t0());
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Reply { reply: Reply::Close(Err((CloudStat::NotOwner, _))), .. }]
        ));
        c.close(B, Some(1000), 1, t0());
        assert!(drain(&mut c).contains(&Action::Reply { to: B, reply: Reply::Close(Ok(())) }));
        // The same CLOSE again: OK as the first time, though the ticket is gone.
        c.close(B, Some(1000), 1, t0());
        assert_eq!(drain(&mut c), vec![Action::Reply { to: B, reply: Reply::Close(Ok(())) }]);
        let other = Caller { conn: 3, xid: 30 };
        c.close(other, Some(1000), 1, t0());
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Reply { reply: Reply::Close(Err((CloudStat::NoSuchTicket, _))), .. }]
        ));
    }

    #[test]
    fn unretrieved_jobs_expire_and_late_callers_are_told() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/in".into(), t0());
        drain(&mut c);
        assert_eq!(c.next_deadline(), None, "no clock runs for a running job");
        c.run_finished(0, 1, ok(), t0());
        drain(&mut c);
        assert_eq!(c.next_deadline(), Some(t0() + Duration::from_secs(60)));
        c.on_timer(t0() + Duration::from_secs(59));
        assert!(drain(&mut c).is_empty());
        c.on_timer(t0() + Duration::from_secs(60));
        assert_eq!(drain(&mut c), vec![Action::Node { node: 0, call: NodeCall::Drop { ticket: 1 } }]);
        assert_eq!(c.next_deadline(), None);
        let (stat, msg) = c.job_status(1).unwrap_err();
        assert_eq!(stat, CloudStat::Expired);
        assert!(msg.contains("--ticket-ttl"), "{msg}");
        c.close(B, None, 1, t0());
        assert!(matches!(&drain(&mut c)[0], Action::Reply { reply: Reply::Close(Err((CloudStat::Expired, _))), .. }));
        assert_eq!(c.job_status(99).unwrap_err().0, CloudStat::NoSuchTicket);
    }

    #[test]
    fn a_job_being_retrieved_does_not_expire_under_its_caller() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/in".into(), t0());
        c.run_finished(0, 1, ok(), t0());
        c.retrieve(B, None, 1, true); // parked while its output is fetched
        drain(&mut c);
        c.on_timer(t0() + Duration::from_secs(61));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.job_state(1), Some(JobState::Completed));
        assert_eq!(c.next_deadline(), Some(t0() + Duration::from_secs(121)));
        // A ticket closed by its owner leaves no timer behind.
        c.close(A, None, 1, t0());
        assert_eq!(c.next_deadline(), None);
    }

    const A: Caller = Caller { conn: 1, xid: 10 };
    const B: Caller = Caller { conn: 2, xid: 20 };

    #[test]
    fn deploy_runs_replicas_then_removes_the_spooled_archive_once_finished() {
        let mut c = coord(2);
        c.deploy(A, None, 2, "/spool/in".into(), t0());
        let acts = drain(&mut c);
        assert_eq!(acts[0], Action::Reply { to: A, reply: Reply::Deploy(Ok(1)) });
        assert!(
            matches!(&acts[1], Action::Node { node: 0, call: NodeCall::Run { args, .. } } if args.replica == 0 && args.replicas == 2)
        );
        assert!(matches!(&acts[2], Action::Node { node: 1, call: NodeCall::Run { .. } }));
        assert_eq!(acts.len(), 3, "the replicas read the archive while they run: {acts:?}");
        c.run_finished(0, 1, ok(), t0());
        assert!(!drain(&mut c).contains(&Action::RemoveFile("/spool/in".into())), "one replica still runs");
        c.run_finished(1, 1, ok(), t0());
        assert_eq!(drain(&mut c), vec![Action::RemoveFile("/spool/in".into())]);
    }

    #[test]
    fn waiting_retrieve_is_answered_after_the_last_replica_and_its_fetch() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/in".into(), t0());
        drain(&mut c);
        c.retrieve(B, None, 1, true);
        assert!(drain(&mut c).is_empty(), "deferred while running");
        c.run_finished(0, 1, RunResult::exited(0, "exit 0"), t0());
        let acts = drain(&mut c);
        assert_eq!(acts[0], Action::RemoveFile("/spool/in".into()), "finished: the archive goes");
        let Action::Node { node: 0, call: NodeCall::Fetch { ticket: 1, replica: 0, into } } = &acts[1] else {
            panic!("{acts:?}")
        };
        c.fetched(1, 0, Ok(into.clone()));
        let acts = drain(&mut c);
        let Action::Reply { to, reply: Reply::Retrieve(Ok(outs)) } = &acts[0] else { panic!("{acts:?}") };
        assert_eq!(*to, B);
        assert_eq!(outs[0].status.state, JobState::Completed);
    }

    #[test]
    fn a_failed_fetch_is_an_error_then_a_retry_fetches_again() {
        let mut c = coord(2);
        c.deploy(A, None, 2, "/spool/in".into(), t0());
        c.run_finished(0, 1, ok(), t0());
        c.run_finished(1, 1, ok(), t0());
        drain(&mut c);
        c.retrieve(B, None, 1, true);
        let acts = drain(&mut c);
        assert_eq!(acts.len(), 2, "{acts:?}");
        c.fetched(1, 0, Ok("/spool/out-1-0".into()));
        c.fetch_failed(1, 1, "the server is out of file descriptors");
        let acts = drain(&mut c);
        let [Action::Reply { to: B, reply: Reply::Retrieve(Err((CloudStat::Internal, msg))) }] = &acts[..] else {
            panic!("{acts:?}")
        };
        assert!(msg.contains("out of file descriptors") && msg.contains("retry"), "{msg}");
        // The retry asks only for the output that failed, then answers OK.
        c.retrieve(B, None, 1, true);
        let acts = drain(&mut c);
        let [Action::Node { node: 1, call: NodeCall::Fetch { ticket: 1, replica: 1, into } }] = &acts[..] else {
            panic!("{acts:?}")
        };
        c.fetched(1, 1, Ok(into.clone()));
        let acts = drain(&mut c);
        let [Action::Reply { to: B, reply: Reply::Retrieve(Ok(outs)) }] = &acts[..] else { panic!("{acts:?}") };
        assert_eq!(outs.len(), 2);
        assert!(outs.iter().all(|o| !o.status.message.contains("lost")), "{outs:?}");
    }

    #[test]
    fn retrieve_without_wait_on_running_job_is_not_ready() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/in".into(), t0());
        drain(&mut c);
        c.retrieve(B, None, 1, false);
        let acts = drain(&mut c);
        assert!(matches!(&acts[0], Action::Reply { reply: Reply::Retrieve(Err((CloudStat::NotReady, _))), .. }));
    }

    #[test]
    fn close_drops_on_nodes_and_answers_parked_retrievers() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/in".into(), t0());
        drain(&mut c);
        c.retrieve(B, None, 1, true);
        c.close(A, None, 1, t0());
        let acts = drain(&mut c);
        assert_eq!(acts[0], Action::RemoveFile("/spool/in".into()), "closed while running: the archive goes");
        assert_eq!(acts[1], Action::Node { node: 0, call: NodeCall::Drop { ticket: 1 } });
        assert!(matches!(&acts[2], Action::Reply { to: B, reply: Reply::Retrieve(Err((CloudStat::NoSuchTicket, _))) }));
        assert_eq!(acts[3], Action::Reply { to: A, reply: Reply::Close(Ok(())) });
        c.status(A, 1);
        assert!(matches!(
            &drain(&mut c)[0],
            Action::Reply { reply: Reply::Status(Err((CloudStat::NoSuchTicket, _))), .. }
        ));
    }

    #[test]
    fn queued_job_reports_position_and_starts_when_nodes_free() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/a".into(), t0());
        c.deploy(B, None, 1, "/spool/b".into(), t0());
        drain(&mut c);
        assert_eq!(c.job_status(2).unwrap().queue_position, 1);
        assert_eq!(c.job_status(2).unwrap().state, JobState::Waiting);
        c.run_finished(0, 1, RunResult::invalid("make run exited with status 2"), t0());
        let acts = drain(&mut c);
        assert_eq!(acts[0], Action::RemoveFile("/spool/a".into()));
        assert!(matches!(&acts[1], Action::Node { node: 0, call: NodeCall::Run { args, .. } } if args.ticket == 2));
        assert_eq!(c.job_state(1), Some(JobState::Invalid));
    }

    #[test]
    fn one_owner_holds_at_most_max_tickets_until_it_closes_some() {
        let mut c = coord(2);
        c.max_tickets_per_user(2);
        for (i, who) in [Some(7), Some(7), None, None, Some(8)].into_iter().enumerate() {
            assert!(c.deploy_refusal(who, true, 1).is_none());
            c.deploy(Caller { conn: i, xid: 1 }, who, 1, PathBuf::from(format!("/spool/{i}")), t0());
        }
        drain(&mut c);
        for who in [Some(7), None] {
            let (stat, msg) = c.deploy_refusal(who, true, 1).expect("refused");
            assert_eq!(stat, CloudStat::QueueFull);
            assert!(msg.contains("--max-tickets-per-user 2") && msg.contains("retrieve or close"), "{msg}");
        }
        assert!(c.deploy_refusal(Some(8), true, 1).is_none(), "others are not held back");
        // Refused after the upload too (several uploads at once).
        c.deploy(Caller { conn: 9, xid: 1 }, Some(7), 1, PathBuf::from("/spool/9"), t0());
        assert!(drain(&mut c).contains(&Action::RemoveFile(PathBuf::from("/spool/9"))));
        c.close(Caller { conn: 9, xid: 2 }, Some(7), 1, t0());
        drain(&mut c);
        assert!(c.deploy_refusal(Some(7), true, 1).is_none(), "a closed ticket frees a place");
    }

    #[test]
    fn a_server_for_one_user_refuses_other_deployers_before_and_after_upload() {
        let mut c = coord(2);
        c.only_deployer(1000);
        assert!(c.deploy_refusal(Some(1000), true, 1).is_none());
        assert!(c.deploy_refusal(Some(0), true, 1).is_none(), "root may");
        assert!(c.deploy_refusal(Some(1000), false, 1).is_some(), "a network peer's claim is not enough");
        assert!(c.deploy_refusal(Some(0), false, 1).is_some(), "nor for root");
        for who in [Some(1001), None] {
            let (stat, msg) = c.deploy_refusal(who, true, 1).expect("refused");
            assert_eq!(stat, CloudStat::Denied);
            assert!(msg.contains("--allow-other-users"), "{msg}");
        }
        c.deploy(A, Some(1001), 1, PathBuf::from("/spool/a"), t0());
        let acts = drain(&mut c);
        assert!(acts.contains(&Action::RemoveFile(PathBuf::from("/spool/a"))));
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Reply { reply: Reply::Deploy(Err((CloudStat::Denied, _))), .. })));
        assert_eq!(c.job_state(1), None, "no job");
    }

    #[test]
    fn wait_is_deferred_until_the_job_ends_and_closing_answers_it() {
        let mut c = coord(1);
        c.deploy(A, None, 1, "/spool/a".into(), t0());
        c.deploy(A, None, 1, "/spool/b".into(), t0());
        drain(&mut c);
        c.info(B, 1, true, t0());
        c.info(Caller { conn: 3, xid: 1 }, 2, true, t0());
        assert!(drain(&mut c).is_empty(), "deferred while running or waiting");
        c.run_finished(0, on_node(&c, 0), RunResult::invalid("make run exited with status 2"), t0());
        let acts = drain(&mut c);
        assert!(
            acts.iter().any(
                |a| matches!(a, Action::Reply { to: B, reply: Reply::JobInfo(Ok(i)) } if i.job.state == JobState::Invalid && i.replicas[0].kind == Outcome::SetupError)
            ),
            "{acts:?}"
        );
        // Already ended: answered at once.
        c.info(B, 1, true, t0());
        assert!(matches!(&drain(&mut c)[..], [Action::Reply { to: B, reply: Reply::JobInfo(Ok(_)) }]));
        // Closed while waited for: told so.
        c.close(A, None, 2, t0());
        let acts = drain(&mut c);
        assert!(
            acts.iter().any(|a| matches!(
                a,
                Action::Reply { to: Caller { conn: 3, .. }, reply: Reply::JobInfo(Err((CloudStat::NoSuchTicket, _))) }
            )),
            "{acts:?}"
        );
        // A caller that went away is forgotten.
        c.deploy(A, None, 1, "/spool/c".into(), t0());
        c.info(B, 3, true, t0());
        c.conn_closed(B.conn);
        drain(&mut c);
        c.run_finished(0, on_node(&c, 0), ok(), t0());
        assert!(!drain(&mut c).iter().any(|a| matches!(a, Action::Reply { to: B, .. })));
    }

    #[test]
    fn cancel_kills_running_drops_waiting_keeps_the_ticket_and_owner_rules_hold() {
        let mut c = coord(1);
        c.deploy(A, Some(1000), 1, "/spool/a".into(), t0());
        c.deploy(A, Some(1000), 1, "/spool/b".into(), t0());
        drain(&mut c);
        c.cancel(B, Some(1001), 1, t0());
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Reply { reply: Reply::Cancel(Err((CloudStat::NotOwner, _))), .. }]
        ));
        c.info(Caller { conn: 3, xid: 1 }, 2, true, t0());
        c.cancel(B, Some(1000), 2, t0());
        let acts = drain(&mut c);
        assert!(acts.contains(&Action::RemoveFile("/spool/b".into())), "{acts:?}");
        assert!(
            acts.iter().any(|a| matches!(a, Action::Reply { to: Caller { conn: 3, .. }, reply: Reply::JobInfo(Ok(i)) } if i.replicas[0].kind == Outcome::Killed)),
            "its waiter is answered: {acts:?}"
        );
        let st = c.job_status(2).unwrap();
        assert_eq!(st.state, JobState::Invalid);
        assert!(st.replicas[0].message.contains("cancelled before it started"));
        c.cancel(B, Some(0), 1, t0());
        let acts = drain(&mut c);
        assert_eq!(acts[0], Action::Node { node: 0, call: NodeCall::Stop { ticket: 1 } });
        assert_eq!(acts[1], Action::Reply { to: B, reply: Reply::Cancel(Ok(())) });
        assert_eq!(c.job_state(1), Some(JobState::Running), "until the node reports the kill");
        c.run_finished(0, on_node(&c, 0), RunResult::invalid("killed: cancelled (cloud cancel); output kept"), t0());
        drain(&mut c);
        assert_eq!(c.job_state(1), Some(JobState::Invalid));
        // The outputs stay for RETRIEVE.
        c.retrieve(A, Some(1000), 1, true);
        assert!(matches!(&drain(&mut c)[0], Action::Node { call: NodeCall::Fetch { ticket: 1, .. }, .. }));
    }

    #[test]
    fn cluster_view_lists_nodes_queue_and_totals_and_mine_the_callers_tickets() {
        let mut c = coord(2);
        c.deploy(A, Some(1000), 2, "/spool/a".into(), t0());
        c.deploy(A, None, 1, "/spool/b".into(), t0() + Duration::from_secs(1));
        drain(&mut c);
        let v = c.cluster_view(t0() + Duration::from_secs(5));
        assert_eq!(v.nodes.len(), 2);
        assert!(v.nodes.iter().all(|n| n.state == NodeState::Busy && n.ticket == 1 && n.age == 5), "{v:?}");
        assert_eq!(v.nodes[1].replica, 1);
        assert_eq!(v.queue, vec![QueueEntry { ticket: 2, replicas: 1, position: 1, owner: -1, age: 4 }]);
        assert_eq!((v.jobs, v.running_jobs, v.finished_jobs), (2, 1, 0));
        c.node_down(1, t0() + Duration::from_secs(5));
        drain(&mut c);
        let v = c.cluster_view(t0() + Duration::from_secs(7));
        assert_eq!(v.nodes[1].state, NodeState::Down);
        assert_eq!(v.nodes[1].age, 2);
        c.mine(B, Some(1000), t0() + Duration::from_secs(7));
        let acts = drain(&mut c);
        let [Action::Reply { reply: Reply::Mine(t), .. }] = &acts[..] else { panic!("{acts:?}") };
        assert_eq!(t.iter().map(|t| t.ticket).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t[0].age, 7);
    }

    #[test]
    fn follow_goes_to_the_replicas_node_and_waits_for_a_waiting_replica_to_start() {
        let mut c = coord(1);
        c.deploy(A, Some(1000), 1, "/spool/a".into(), t0());
        c.deploy(A, Some(1000), 1, "/spool/b".into(), t0());
        drain(&mut c);
        c.follow(B, Some(1000), 1, 0, 5);
        assert_eq!(
            drain(&mut c),
            vec![Action::Node { node: 0, call: NodeCall::Follow { ticket: 1, offset: 5, caller: B } }]
        );
        c.follow(B, Some(1001), 1, 0, 0);
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Reply { reply: Reply::Follow(Err((CloudStat::NotOwner, _))), .. }]
        ));
        c.follow(B, Some(1000), 1, 4, 0);
        assert!(
            matches!(&drain(&mut c)[..], [Action::Reply { reply: Reply::Follow(Err((CloudStat::BadReplicas, m))), .. }] if m.contains("no replica 4"))
        );
        // Ticket 2 waits: its FOLLOW goes out right behind its NODE_RUN.
        let f = Caller { conn: 5, xid: 1 };
        c.follow(f, Some(1000), 2, 0, 0);
        assert!(drain(&mut c).is_empty());
        c.run_finished(0, on_node(&c, 0), ok(), t0());
        let acts = drain(&mut c);
        let run = acts
            .iter()
            .position(|a| matches!(a, Action::Node { call: NodeCall::Run { args, .. }, .. } if args.ticket == 2));
        let follow = acts
            .iter()
            .position(|a| *a == Action::Node { node: 0, call: NodeCall::Follow { ticket: 2, offset: 0, caller: f } });
        assert!(run.is_some() && follow.is_some() && run < follow, "{acts:?}");
        c.followed(f, Ok((b"hi".to_vec(), false)));
        assert_eq!(drain(&mut c), vec![Action::Reply { to: f, reply: Reply::Follow(Ok((b"hi".to_vec(), false))) }]);
        // A FOLLOW on a node that is then lost is answered, not left hanging;
        // the replica's outcome is LOST.
        c.follow(f, Some(1000), 2, 0, 2);
        drain(&mut c);
        c.node_down(0, t0() + Duration::from_secs(3));
        let acts = drain(&mut c);
        assert!(
            acts.iter().any(|a| matches!(a, Action::Reply { to, reply: Reply::Follow(Err((CloudStat::Internal, m))) } if *to == f && m.contains("lost contact"))),
            "{acts:?}"
        );
        let info = c.job_info(2, t0() + Duration::from_secs(5)).unwrap();
        assert_eq!(info.replicas[0].kind, Outcome::Lost);
        assert_eq!((info.replicas[0].started_age, info.replicas[0].ended_age), (5, 2));
    }
}

#[cfg(test)]
mod job_rules {
    use super::*;

    const A: Caller = Caller { conn: 1, xid: 10 };

    fn coord(nodes: usize) -> Coordinator {
        let names = (0..nodes).map(|i| format!("127.0.0.1:{}", 9001 + i)).collect();
        Coordinator::new(names, 10, PathBuf::from("/spool"), None)
    }

    fn drain(c: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn runs(acts: &[Action]) -> Vec<(NodeId, Ticket, u32)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Node { node, call: NodeCall::Run { args, .. } } => Some((*node, args.ticket, args.replica)),
                _ => None,
            })
            .collect()
    }

    fn replica(c: &Coordinator, ticket: Ticket, i: usize) -> ReplicaStatus {
        c.job_status(ticket).unwrap().replicas[i].clone()
    }

    #[test]
    fn a_lost_node_fails_its_replica_and_is_used_again_once_up() {
        let now = Instant::now();
        let mut c = coord(2);
        c.deploy(A, None, 1, "/spool/a".into(), now);
        drain(&mut c);
        c.node_down(0, now);
        let r = replica(&c, 1, 0);
        assert_eq!(r.state, JobState::Invalid);
        assert!(r.message.contains("node lost"), "{}", r.message);
        // Two replicas are admitted (two nodes are configured) and wait.
        c.deploy(A, None, 2, "/spool/b".into(), now);
        let acts = drain(&mut c);
        assert!(runs(&acts).is_empty(), "{acts:?}");
        assert_eq!(c.job_status(2).unwrap().state, JobState::Waiting);
        c.node_up(0, now);
        assert_eq!(runs(&drain(&mut c)).len(), 2);
    }

    #[test]
    fn requeue_lost_runs_the_replica_elsewhere_from_the_kept_archive() {
        let now = Instant::now();
        let mut c = coord(3);
        c.requeue_lost(true);
        c.deploy(A, None, 2, "/spool/a".into(), now);
        let acts = drain(&mut c);
        assert_eq!(runs(&acts), vec![(0, 1, 0), (1, 1, 1)]);
        assert!(!acts.contains(&Action::RemoveFile("/spool/a".into())), "kept for a requeue");
        c.node_down(1, now);
        let acts = drain(&mut c);
        assert_eq!(runs(&acts), vec![(2, 1, 1)], "on the free node that has no replica of the job");
        let r = replica(&c, 1, 1);
        assert_eq!(r.state, JobState::Running);
        assert!(r.message.contains("requeued after node 127.0.0.1:9002 was lost"), "{}", r.message);
        c.run_finished(0, 1, RunResult::exited(0, "ok"), now);
        assert!(drain(&mut c).is_empty());
        c.run_finished(2, 1, RunResult::exited(0, "ok"), now);
        assert_eq!(drain(&mut c), vec![Action::RemoveFile("/spool/a".into())], "finished: archive goes");
        assert_eq!(c.job_status(1).unwrap().state, JobState::Completed);
    }

    #[test]
    fn fail_fast_stops_the_other_replicas_and_reports_them_stopped() {
        let now = Instant::now();
        let mut c = coord(2);
        c.deploy_opts(A, None, 2, proto::DEPLOY_FAIL_FAST, "/spool/a".into(), now);
        drain(&mut c);
        c.run_finished(0, 1, RunResult::exited(1, "exit 1"), now);
        assert_eq!(drain(&mut c), vec![Action::Node { node: 1, call: NodeCall::Stop { ticket: 1 } }]);
        c.run_finished(1, 1, RunResult::invalid("killed by signal 9"), now);
        let r = replica(&c, 1, 1);
        assert_eq!((r.state, r.message.as_str()), (JobState::Invalid, "stopped: replica 0 failed"));
        // Off by default: the others keep running.
        c.deploy(A, None, 2, "/spool/b".into(), now);
        drain(&mut c);
        c.run_finished(1, 2, RunResult::exited(1, "exit 1"), now);
        assert!(drain(&mut c).iter().all(|a| !matches!(a, Action::Node { call: NodeCall::Stop { .. }, .. })));
        assert_eq!(replica(&c, 2, 0).state, JobState::Running);
    }
}

#[cfg(test)]
mod journal_and_restore {
    use super::*;
    use crate::journal::{self, Live};
    use std::path::Path;

    const A: Caller = Caller { conn: 1, xid: 10 };
    const B: Caller = Caller { conn: 2, xid: 20 };

    fn coord(nodes: usize) -> Coordinator {
        let names = (0..nodes).map(|i| format!("127.0.0.1:{}", 9001 + i)).collect();
        let mut c = Coordinator::new(names, 10, PathBuf::from("/spool"), None);
        c.enable_journal();
        c
    }

    fn drain(c: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn records(c: &mut Coordinator) -> Vec<Record> {
        std::iter::from_fn(|| c.poll_record()).collect()
    }

    fn ok() -> RunResult {
        RunResult::exited(0, "make run exited with status 0")
    }

    /// The journal's live state after `c`'s records.
    fn live_of(recs: &[Record]) -> Live {
        let mut live = Live::default();
        for r in recs {
            journal::apply(&mut live, r).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        }
        live
    }

    #[test]
    fn every_deploy_start_end_and_close_is_recorded_in_order() {
        let now = Instant::now();
        let mut c = coord(1);
        c.deploy_opts(A, Some(1000), 1, proto::DEPLOY_FAIL_FAST, "/spool/a".into(), now);
        c.deploy(B, None, 1, "/spool/b".into(), now);
        c.run_finished(0, 1, ok(), now);
        c.close(A, Some(1000), 1, now);
        let recs = records(&mut c);
        let node = "127.0.0.1:9001".to_string();
        assert_eq!(
            recs,
            vec![
                Record::Deployed {
                    ticket: 1,
                    owner: Some(1000),
                    replicas: 1,
                    flags: proto::DEPLOY_FAIL_FAST,
                    submitted: 0,
                    archive: "/spool/a".into()
                },
                Record::Started { ticket: 1, replica: 0, node: node.clone(), at: 0 },
                Record::Deployed {
                    ticket: 2,
                    owner: None,
                    replicas: 1,
                    flags: 0,
                    submitted: 0,
                    archive: "/spool/b".into()
                },
                Record::Finished {
                    ticket: 1,
                    replica: 0,
                    state: JobState::Completed,
                    exit_code: 0,
                    message: "make run exited with status 0".into(),
                    ended: 0
                },
                Record::Started { ticket: 2, replica: 0, node, at: 0 },
                Record::Closed { ticket: 1 },
            ]
        );
        // Without a journal, nothing piles up.
        let mut quiet = Coordinator::new(vec!["n".into()], 10, PathBuf::from("/spool"), None);
        quiet.deploy(A, None, 1, "/spool/a".into(), now);
        assert_eq!(quiet.poll_record(), None);
    }

    #[test]
    fn a_lost_node_and_a_fail_fast_stop_record_every_end() {
        let now = Instant::now();
        let mut c = coord(2);
        c.deploy_opts(A, None, 2, proto::DEPLOY_FAIL_FAST, "/spool/a".into(), now);
        c.node_down(0, now);
        c.run_finished(1, 1, RunResult::invalid("killed by signal 9"), now);
        let ends: Vec<(u32, String)> = records(&mut c)
            .into_iter()
            .filter_map(|r| match r {
                Record::Finished { replica, message, .. } => Some((replica, message)),
                _ => None,
            })
            .collect();
        assert_eq!(ends.len(), 2, "{ends:?}");
        assert!(ends[0].1.contains("node lost"), "{ends:?}");
        assert_eq!(ends[1], (1, "stopped: replica 0 failed".to_string()));
    }

    #[test]
    fn restored_jobs_keep_their_times() {
        let (mut live, _) = crashed(2);
        let now = Instant::now();
        if let Some(job) = live.jobs.get_mut(&1) {
            job.submitted = 1_000;
        }
        let mut c = coord(2);
        c.restore(&live, |_| false, now);
        c.restore_times(&live, now, 1_100);
        let info = c.job_info(1, now).unwrap();
        assert_eq!(info.submitted_age, 100, "the age goes on from the journal's time");
    }

    /// Ticket 1 finished on node 0, 2 running on node 1, 3 and 4 queued;
    /// then the server dies and a new one restores from the records.
    fn crashed(nodes: usize) -> (Live, Vec<Record>) {
        let now = Instant::now();
        let mut c = coord(nodes);
        c.deploy(A, Some(1000), 1, "/spool/a".into(), now);
        c.deploy(A, Some(1000), 1, "/spool/b".into(), now);
        c.run_finished(0, 1, ok(), now);
        c.deploy(B, Some(1001), 2, "/spool/c".into(), now);
        c.deploy(B, None, 1, "/spool/d".into(), now);
        let recs = records(&mut c);
        (live_of(&recs), recs)
    }

    #[test]
    fn a_restart_restores_owners_queue_order_finished_outputs_and_ticket_numbers() {
        let (live, _) = crashed(2);
        let now = Instant::now();
        let mut c = coord(2);
        c.resume_tickets_from(3); // a counter behind the journal does no harm
        let r = c.restore(&live, |_| false, now);
        assert_eq!((r.jobs, r.finished, r.lost, r.queued, r.running), (4, 1, 1, 3, 0));
        // The finished one is fetched from the node it ran on.
        assert_eq!(c.job_state(1), Some(JobState::Completed));
        c.retrieve(A, Some(1000), 1, true);
        assert!(matches!(&drain(&mut c)[..], [Action::Node { node: 0, call: NodeCall::Fetch { ticket: 1, .. } }]));
        // Owners are as before.
        c.close(B, Some(1001), 1, now);
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Reply { reply: Reply::Close(Err((CloudStat::NotOwner, _))), .. }]
        ));
        // The running one died with the server, and says so.
        let st = c.job_status(2).unwrap();
        assert_eq!(st.state, JobState::Invalid);
        assert!(st.replicas[0].message.starts_with("server restarted"), "{}", st.replicas[0].message);
        assert_eq!(st.replicas[0].node, "127.0.0.1:9002", "its output so far is on its node");
        // Queued in ticket order; only their archives are kept.
        assert_eq!((c.job_status(3).unwrap().queue_position, c.job_status(4).unwrap().queue_position), (1, 2));
        let mut kept: Vec<_> = c.kept_archives().cloned().collect();
        kept.sort();
        assert_eq!(kept, [PathBuf::from("/spool/c"), PathBuf::from("/spool/d")]);
        assert_eq!(c.next_ticket(), 5);
        // The restart's decision is journaled.
        assert!(matches!(&records(&mut c)[..], [Record::Finished { ticket: 2, state: JobState::Invalid, .. }]));
        // Then they start, in order.
        c.start_restored();
        let acts = drain(&mut c);
        let runs: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Node { node, call: NodeCall::Run { args, archive } } => {
                    Some((*node, args.ticket, archive.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(runs.len(), 2, "{acts:?}");
        assert!(runs.iter().all(|r| r.1 == 3 && r.2 == Path::new("/spool/c")), "{runs:?}");
        c.deploy(A, Some(1000), 1, "/spool/e".into(), now);
        assert!(drain(&mut c).contains(&Action::Reply { to: A, reply: Reply::Deploy(Ok(5)) }));
    }

    #[test]
    fn a_job_that_cannot_run_again_ends_at_the_restart_instead_of_blocking_the_queue() {
        let now = Instant::now();
        let (live, _) = crashed(2);
        // The nodes file lost a node: ticket 3 (two replicas) cannot run.
        let mut c = coord(1);
        c.restore(&live, |_| false, now);
        let st = c.job_status(3).unwrap();
        assert_eq!(st.state, JobState::Invalid);
        assert!(st.replicas[0].message.contains("the cluster has 1 nodes now"), "{}", st.replicas[0].message);
        assert_eq!(c.job_status(4).unwrap().queue_position, 1, "the next one is not blocked");
        // A journal naming an archive outside the spool: never used, never removed.
        let mut live = Live::default();
        let rec = Record::Deployed {
            ticket: 1,
            owner: None,
            replicas: 1,
            flags: 0,
            submitted: 0,
            archive: "/etc/passwd".into(),
        };
        journal::apply(&mut live, &rec).unwrap();
        let mut c = coord(1);
        c.restore(&live, |_| false, now);
        assert_eq!(c.job_state(1), Some(JobState::Invalid));
        assert_eq!(c.kept_archives().count(), 0);
        c.start_restored();
        assert!(drain(&mut c).is_empty(), "nothing runs, nothing is removed");
    }

    #[test]
    fn held_ticket_counts_survive_a_restart() {
        let (live, _) = crashed(2);
        let mut c = coord(2);
        c.max_tickets_per_user(2);
        c.restore(&live, |_| false, Instant::now());
        assert!(c.deploy_refusal(Some(1000), true, 1).is_some(), "uid 1000 holds 2");
        assert!(c.deploy_refusal(Some(1001), true, 1).is_none(), "uid 1001 holds 1");
    }

    #[test]
    fn with_requeue_lost_a_replica_running_at_the_crash_runs_again() {
        let (live, _) = crashed(2);
        let mut c = coord(2);
        c.requeue_lost(true);
        let r = c.restore(&live, |_| false, Instant::now());
        assert_eq!((r.requeued, r.lost), (1, 0));
        let st = c.job_status(2).unwrap();
        assert_eq!(st.state, JobState::Waiting);
        assert_eq!(st.replicas[0].message, "requeued after the server restarted");
        assert!(c.kept_archives().any(|p| p == Path::new("/spool/b")));
        c.start_restored();
        let acts = drain(&mut c);
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Node { call: NodeCall::Run { args, .. }, .. } if args.ticket == 2)));
    }

    #[test]
    fn a_replica_on_a_node_that_survives_is_waited_for_when_its_link_is_up() {
        let (live, _) = crashed(2);
        let now = Instant::now();
        let mut c = coord(2);
        let r = c.restore(&live, |n| n == 1, now);
        assert_eq!((r.running, r.lost), (1, 0));
        assert_eq!(c.job_state(2), Some(JobState::Running));
        assert!(records(&mut c).is_empty(), "nothing decided yet");
        c.start_restored();
        drain(&mut c);
        c.link_up(1, now);
        let acts = drain(&mut c);
        // First what it may keep (the rest it drops), then the wait.
        assert_eq!(acts[0], Action::Node { node: 1, call: NodeCall::Keep { tickets: vec![2] } });
        assert_eq!(acts[1], Action::Node { node: 1, call: NodeCall::Wait { ticket: 2 } });
        c.run_finished(1, 2, ok(), now);
        assert_eq!(c.job_state(2), Some(JobState::Completed));
        assert!(matches!(&records(&mut c)[..], [Record::Finished { ticket: 2, state: JobState::Completed, .. }, ..]));
        // A node that answers "lost" ends it INVALID.
        let (live, _) = crashed(2);
        let mut c = coord(2);
        c.restore(&live, |n| n == 1, now);
        c.link_up(1, now);
        c.run_finished(1, 2, RunResult::invalid("node lost: node 9002 has no replica of ticket 2"), now);
        assert_eq!(c.job_state(2), Some(JobState::Invalid));
    }

    #[test]
    fn a_deploy_that_cannot_be_journaled_is_undone_and_its_retry_is_not_answered_from_the_cache() {
        let now = Instant::now();
        let mut c = coord(1);
        c.deploy(A, Some(1000), 1, "/spool/a".into(), now);
        drain(&mut c);
        assert_eq!(c.retried_deploy(A.xid, Some(1000), now), Some(1));
        c.abandon(A, 1);
        assert_eq!(c.retried_deploy(A.xid, Some(1000), now), None);
        assert_eq!(c.job_state(1), None);
        assert!(drain(&mut c).contains(&Action::Node { node: 0, call: NodeCall::Drop { ticket: 1 } }));
        assert_eq!(records(&mut c).last(), Some(&Record::Closed { ticket: 1 }));
    }
}

#[cfg(test)]
mod staging {
    use super::*;

    const A: Caller = Caller { conn: 1, xid: 10 };
    const B: Caller = Caller { conn: 2, xid: 11 };

    fn coord(nodes: usize) -> Coordinator {
        let names = (0..nodes).map(|i| format!("127.0.0.1:{}", 9001 + i)).collect();
        Coordinator::new(names, 10, PathBuf::from("/spool"), None)
    }

    fn drain(c: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn staged_runs(acts: &[Action]) -> Vec<(NodeId, StageId, u64)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Node { node, call: NodeCall::RunStaged { stage, length, .. } } => {
                    Some((*node, *stage, *length))
                }
                _ => None,
            })
            .collect()
    }

    fn unstaged(acts: &[Action]) -> Vec<(NodeId, StageId)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Node { node, call: NodeCall::Unstage { stage } } => Some((*node, *stage)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_upload_is_staged_only_where_its_job_would_start_at_once_and_runs_from_there() {
        let mut c = coord(2);
        // Nothing is stageable by default (nodes of this process).
        assert_eq!(c.stage_for(2), None);
        c.set_stageable(1, true);
        // One replica would go to node 0 (round robin): nothing to stage there.
        assert_eq!(c.stage_for(1), None);
        // Two: one of them goes to node 1, where the upload goes on.
        let (s, node) = c.stage_for(2).expect("staged");
        assert_eq!(node, 1);
        // Its slot is promised: another job of two would not start at once.
        assert_eq!(c.stage_for(2), None);
        c.deploy_staged(A, None, 2, 0, PathBuf::from("/spool/p-1"), Some((s, 1234)), now());
        let acts = drain(&mut c);
        assert_eq!(staged_runs(&acts), vec![(1, s, 1234)], "{acts:?}");
        let plain: Vec<_> = acts
            .iter()
            .filter(|a| matches!(a, Action::Node { node: 0, call: NodeCall::Run { args, .. } } if args.ticket == 1))
            .collect();
        assert_eq!(plain.len(), 1, "the other replica runs as usual: {acts:?}");
        assert!(unstaged(&acts).is_empty());
        assert!(!c.stage_live(s), "used up");
        // Busy now: a new upload waits for the job, so it is not staged.
        assert_eq!(c.stage_for(1), None);
    }

    #[test]
    fn a_stage_its_job_does_not_start_on_is_dropped_and_the_job_runs_as_usual() {
        let mut c = coord(1);
        c.set_stageable(0, true);
        let (s, node) = c.stage_for(1).expect("staged");
        // Another upload, not staged, ends first and takes the node.
        c.deploy(B, None, 1, PathBuf::from("/spool/p-2"), now());
        drain(&mut c);
        c.deploy_staged(A, None, 1, 0, PathBuf::from("/spool/p-1"), Some((s, 9)), now());
        let acts = drain(&mut c);
        assert!(staged_runs(&acts).is_empty(), "{acts:?}");
        assert_eq!(unstaged(&acts), vec![(node, s)]);
        assert!(acts.iter().any(|a| matches!(a, Action::Reply { reply: Reply::Deploy(Ok(2)), .. })));
        // Its turn: a plain NODE_RUN from the spooled archive.
        c.run_finished(0, 1, RunResult::exited(0, "ok"), now());
        let acts = drain(&mut c);
        assert!(acts.iter().any(|a| matches!(a, Action::Node { call: NodeCall::Run { args, archive }, .. }
            if args.ticket == 2 && archive == &PathBuf::from("/spool/p-1"))));
    }

    #[test]
    fn a_refused_or_abandoned_upload_drops_its_stage_once_and_a_lost_node_forgets_its_stages() {
        let mut c = coord(1);
        c.set_stageable(0, true);
        c.only_deployer(1000);
        let (s, _) = c.stage_for(1).expect("staged");
        c.deploy_staged(A, Some(1001), 1, 0, PathBuf::from("/spool/p-1"), Some((s, 9)), now());
        let acts = drain(&mut c);
        assert_eq!(unstaged(&acts), vec![(0, s)]);
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Reply { reply: Reply::Deploy(Err((CloudStat::Denied, _))), .. })));
        // Refused by the archive check: the main service aborts it; once.
        let (s, _) = c.stage_for(1).expect("staged");
        c.stage_abort(s);
        c.stage_abort(s);
        assert_eq!(unstaged(&drain(&mut c)), vec![(0, s)]);
        // A node lost mid-stage: the stage went with its link; the upload
        // ends in a plain deploy, which waits for the node.
        let (s, _) = c.stage_for(1).expect("staged");
        c.node_down(0, now());
        assert!(!c.stage_live(s));
        c.deploy_staged(A, Some(1000), 1, 0, PathBuf::from("/spool/p-1"), Some((s, 9)), now());
        let acts = drain(&mut c);
        assert!(unstaged(&acts).is_empty() && staged_runs(&acts).is_empty(), "{acts:?}");
        assert_eq!(c.stage_for(1), None, "a job waits: nothing is staged");
        c.node_up(0, now());
        assert!(drain(&mut c).iter().any(|a| matches!(a, Action::Node { call: NodeCall::Run { .. }, .. })));
    }
}
