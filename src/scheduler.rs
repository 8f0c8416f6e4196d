//! The main server's bookkeeping: node slots, job wait queue, job table.
//!
//! Owns: which node runs which replicas (each node has `slots`, at most that
//! many replicas at once, never two of one job), which nodes are up, the
//! election (a replica goes to the up node with the most free slots, ties
//! broken round robin by a rotating cursor), which jobs wait and in what
//! order, each replica's state, fail-fast stops and requeues of replicas
//! lost with their node, and ticket numbers (from a starting point the
//! caller persists, see `tickets`). Plain data, no I/O, no clock.
//! Also where a job would start if submitted now (`would_place`, for
//! staged transfers), and a preferred node for one job's first replica
//! (`start_ready_preferring`: the node that holds its archive already).
//! Must not touch: sockets, files, processes. Callers turn its answers
//! (`Start`s, replicas to stop) into messages.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - a node runs at most `slots` replicas, each of a different job, and is
//!   given none while down; a running replica (possibly of a job already
//!   closed) is on exactly one node;
//! - the replicas of one job are on distinct nodes (finished ones too: a
//!   node keeps one output per ticket);
//! - a job is in the wait queue iff one of its replicas is WAITING (never
//!   started, or requeued after its node was lost), and a WAITING replica
//!   has no node; so a requeued job may be in the queue while its other
//!   replicas run, and is then RUNNING, not WAITING;
//! - the wait queue is FIFO and replicas start only from its head, so a big
//!   job is never overtaken by a smaller one (no starvation); a requeued
//!   job goes back to the head, keeping its turn.

use std::collections::{BTreeMap, VecDeque};

use crate::proto::{JobState, RunResult};

pub type Ticket = u32;
/// Index of a node in `cloud_nodes.txt` order.
pub type NodeId = usize;

/// Why a job was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    BadReplicas { asked: u32, nodes: usize },
    QueueFull { max: usize },
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::BadReplicas { asked, nodes } => {
                let plural = if *nodes == 1 { "" } else { "s" };
                write!(f, "cannot run {asked} replicas: this cluster has {nodes} node{plural}; ask for 1 to {nodes}")
            }
            SubmitError::QueueFull { max } => {
                write!(f, "queue full: {max} jobs are already waiting; try again later")
            }
        }
    }
}

/// One replica as the main server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub node: Option<NodeId>,
    pub state: JobState,
    pub exit_code: i32,
    pub message: String,
    /// Being stopped (fail-fast): the message it ends with, whatever its
    /// node reports.
    pub stopping: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub ticket: Ticket,
    pub replicas: Vec<Replica>,
    /// When one replica fails, stop the others.
    pub fail_fast: bool,
    /// Nodes a replica of this job was lost on and requeued from (their
    /// workspace of the ticket, if the node comes back, must be dropped).
    pub lost_on: Vec<NodeId>,
}

impl Job {
    /// The job state from its replicas, as the original design defines it.
    pub fn state(&self) -> JobState {
        let states = || self.replicas.iter().map(|r| r.state);
        if states().any(|s| s == JobState::Invalid) {
            JobState::Invalid
        } else if states().all(|s| s == JobState::Waiting) {
            JobState::Waiting
        } else if states().all(|s| s == JobState::Completed) {
            JobState::Completed
        } else {
            JobState::Running
        }
    }

    /// True when no replica can change any more.
    pub fn finished(&self) -> bool {
        self.replicas.iter().all(|r| r.state.is_final())
    }

    fn has_waiting(&self) -> bool {
        self.replicas.iter().any(|r| r.state == JobState::Waiting)
    }
}

/// Replicas the caller must now send to their nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub ticket: Ticket,
    /// (replica index, node), in replica order: every replica of a new job,
    /// or only the requeued ones of a job already running.
    pub placed: Vec<(u32, NodeId)>,
}

/// What closing a ticket leaves for the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub was_waiting: bool,
    /// Nodes that ran a replica of this job (running or finished); each
    /// must be told to drop the ticket's workspace.
    pub nodes: Vec<NodeId>,
}

/// How one replica's end changed things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub ticket: Ticket,
    pub replica: u32,
    /// Fail-fast: nodes whose replica of `ticket` must now be stopped.
    pub stop: Vec<NodeId>,
}

/// What a node going down did to the replicas it ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Down {
    /// Replicas that ended INVALID with it.
    pub failed: Vec<(Ticket, u32)>,
    /// Replicas put back at the head of the queue.
    pub requeued: Vec<(Ticket, u32)>,
    /// Fail-fast: (node, ticket) replicas to stop because one was lost.
    pub stop: Vec<(NodeId, Ticket)>,
}

#[derive(Debug)]
pub struct Scheduler {
    slots: Vec<u32>,
    up: Vec<bool>,
    /// Per node: ticket -> the replica of it the node runs (the job may be
    /// closed already).
    running: Vec<BTreeMap<Ticket, u32>>,
    /// Where the next tie of the election starts looking.
    cursor: usize,
    max_queue: usize,
    waiting: VecDeque<Ticket>,
    jobs: BTreeMap<Ticket, Job>,
    next_ticket: Ticket,
}

impl Scheduler {
    /// Node i has `slots[i]` slots (0 is taken as 1); every node starts up.
    pub fn new(slots: &[u32], max_queue: usize) -> Self {
        Scheduler {
            slots: slots.iter().map(|&s| s.max(1)).collect(),
            up: vec![true; slots.len()],
            running: vec![BTreeMap::new(); slots.len()],
            cursor: 0,
            max_queue,
            waiting: VecDeque::new(),
            jobs: BTreeMap::new(),
            next_ticket: 1,
        }
    }

    pub fn node_count(&self) -> usize {
        self.slots.len()
    }

    /// The ticket the next accepted job gets.
    pub fn next_ticket(&self) -> Ticket {
        self.next_ticket
    }

    /// Continue numbering from `next` (a persisted high-water mark), so no
    /// ticket of an earlier run is issued again.
    pub fn resume_tickets_from(&mut self, next: Ticket) {
        self.next_ticket = next.max(1);
    }

    pub fn job(&self, ticket: Ticket) -> Option<&Job> {
        self.jobs.get(&ticket)
    }

    /// Free slots of a node: none while it is down.
    pub fn free_slots(&self, node: NodeId) -> u32 {
        if !self.up.get(node).copied().unwrap_or(false) {
            return 0;
        }
        self.slots[node].saturating_sub(self.running[node].len() as u32)
    }

    /// Replicas a node runs now.
    pub fn busy(&self, node: NodeId) -> usize {
        self.running.get(node).map_or(0, |r| r.len())
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.up.get(node).copied().unwrap_or(false)
    }

    /// The (ticket, replica) pairs node i runs now, by ticket.
    pub fn node_runs(&self, node: NodeId) -> Vec<(Ticket, u32)> {
        self.running.get(node).map_or_else(Vec::new, |r| r.iter().map(|(&t, &i)| (t, i)).collect())
    }

    /// Slots of node i (replicas it may run at once).
    pub fn slots_of(&self, node: NodeId) -> u32 {
        self.slots.get(node).copied().unwrap_or(1)
    }

    /// Waiting jobs, in queue order.
    pub fn waiting(&self) -> impl Iterator<Item = &Job> + '_ {
        self.waiting.iter().filter_map(|t| self.jobs.get(t))
    }

    /// Every job not yet closed, by ticket.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.jobs.values()
    }

    /// 1-based position in the wait queue, 0 if not waiting.
    pub fn queue_position(&self, ticket: Ticket) -> u32 {
        self.waiting.iter().position(|&t| t == ticket).map_or(0, |p| p as u32 + 1)
    }

    /// Whether a job of `replicas` replicas would be accepted now. Only the
    /// configured nodes count: a job waits while fewer of them are up.
    pub fn admissible(&self, replicas: u32) -> Result<(), SubmitError> {
        let nodes = self.node_count();
        if replicas == 0 || replicas as usize > nodes {
            return Err(SubmitError::BadReplicas { asked: replicas, nodes });
        }
        if self.waiting.len() >= self.max_queue {
            return Err(SubmitError::QueueFull { max: self.max_queue });
        }
        Ok(())
    }

    /// Accept a job of `replicas` replicas. It waits until `start_ready`
    /// hands it nodes.
    pub fn submit(&mut self, replicas: u32) -> Result<Ticket, SubmitError> {
        self.submit_opts(replicas, false)
    }

    /// `submit`, and with `fail_fast` the first replica to fail stops the others.
    pub fn submit_opts(&mut self, replicas: u32, fail_fast: bool) -> Result<Ticket, SubmitError> {
        self.admissible(replicas)?;
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1).max(1);
        let replica =
            Replica { node: None, state: JobState::Waiting, exit_code: 0, message: String::new(), stopping: None };
        let job = Job { ticket, replicas: vec![replica; replicas as usize], fail_fast, lost_on: Vec::new() };
        self.jobs.insert(ticket, job);
        self.waiting.push_back(ticket);
        Ok(ticket)
    }

    /// Place `count` replicas of a job on distinct nodes not in `taken`:
    /// each on the up node with the most free slots, ties to the first at
    /// or after the cursor. `None` if they do not all fit now.
    fn elect(&mut self, count: usize, taken: &[NodeId]) -> Option<Vec<NodeId>> {
        let (chosen, cursor) = self.choose(count, taken, self.cursor, &|i| self.free_slots(i))?;
        self.cursor = cursor;
        Some(chosen)
    }

    /// `elect` from `cursor` with `free` slots per node, changing nothing:
    /// the nodes chosen and where the cursor would be after.
    fn choose(
        &self,
        count: usize,
        taken: &[NodeId],
        mut cursor: usize,
        free: &dyn Fn(NodeId) -> u32,
    ) -> Option<(Vec<NodeId>, usize)> {
        let n = self.node_count();
        let eligible = (0..n).filter(|&i| !taken.contains(&i) && free(i) > 0).count();
        if eligible < count || n == 0 {
            return None;
        }
        let mut chosen: Vec<NodeId> = Vec::with_capacity(count);
        for _ in 0..count {
            let best = (0..n)
                .map(|k| (cursor + k) % n)
                .filter(|i| !taken.contains(i) && !chosen.contains(i) && free(*i) > 0)
                .fold(None, |best: Option<NodeId>, i| match best {
                    Some(b) if free(b) >= free(i) => Some(b),
                    _ => Some(i),
                })?;
            chosen.push(best);
            cursor = (best + 1) % n;
        }
        Some((chosen, cursor))
    }

    /// Where a job of `replicas` replicas submitted now would start at
    /// once, with `reserved(i)` of node i's free slots counted as taken
    /// (promised to other jobs still uploading); `None` if it would wait
    /// (other jobs wait, or the replicas do not all fit). Changes nothing.
    pub fn would_place(&self, replicas: u32, reserved: &dyn Fn(NodeId) -> u32) -> Option<Vec<NodeId>> {
        if !self.waiting.is_empty() || replicas == 0 {
            return None;
        }
        let free = |i: NodeId| self.free_slots(i).saturating_sub(reserved(i));
        self.choose(replicas as usize, &[], self.cursor, &free).map(|(chosen, _)| chosen)
    }

    /// Start the waiting replicas of every job at the head of the queue
    /// that fits in the free slots.
    pub fn start_ready(&mut self) -> Vec<Start> {
        self.start_ready_preferring(None)
    }

    /// `start_ready`, where job `prefer.0`'s first waiting replica goes to
    /// node `prefer.1` if that node may take it (up, a free slot, none of
    /// the job's replicas there): it holds that job's archive already (a
    /// staged transfer). Its other replicas are elected as usual.
    pub fn start_ready_preferring(&mut self, prefer: Option<(Ticket, NodeId)>) -> Vec<Start> {
        let mut started = Vec::new();
        while let Some(&ticket) = self.waiting.front() {
            let Some(job) = self.jobs.get(&ticket) else {
                self.waiting.pop_front();
                continue;
            };
            let want: Vec<u32> = (0..job.replicas.len() as u32)
                .filter(|&i| job.replicas[i as usize].state == JobState::Waiting)
                .collect();
            let mut taken: Vec<NodeId> = job.replicas.iter().filter_map(|r| r.node).collect();
            let first = prefer
                .filter(|&(t, node)| t == ticket && !want.is_empty() && !taken.contains(&node))
                .map(|(_, node)| node)
                .filter(|&node| self.free_slots(node) > 0);
            taken.extend(first);
            let Some(rest) = self.elect(want.len() - usize::from(first.is_some()), &taken) else {
                break;
            };
            let nodes: Vec<NodeId> = first.into_iter().chain(rest).collect();
            self.waiting.pop_front();
            let Some(job) = self.jobs.get_mut(&ticket) else { continue };
            let mut placed = Vec::with_capacity(want.len());
            for (&i, &node) in want.iter().zip(&nodes) {
                let r = &mut job.replicas[i as usize];
                r.node = Some(node);
                r.state = JobState::Running;
                self.running[node].insert(ticket, i);
                placed.push((i, node));
            }
            started.push(Start { ticket, placed });
        }
        started
    }

    /// Record that replica `replica` of `ticket` ended with `state`.
    /// Returns the nodes to stop if that makes a fail-fast job stop.
    fn settle(&mut self, ticket: Ticket, replica: u32, result: &RunResult) -> Vec<NodeId> {
        let Some(job) = self.jobs.get_mut(&ticket) else { return Vec::new() };
        let Some(r) = job.replicas.get_mut(replica as usize) else { return Vec::new() };
        r.exit_code = result.exit_code;
        if let Some(msg) = r.stopping.take() {
            r.state = JobState::Invalid;
            r.message = msg;
            return Vec::new();
        }
        r.state = if result.state.is_final() { result.state } else { JobState::Invalid };
        r.message = result.message.clone();
        if r.state == JobState::Invalid && job.fail_fast {
            return self.fail_fast(ticket, replica);
        }
        Vec::new()
    }

    /// Replica `failed` of a fail-fast job failed: the others that run are
    /// marked to stop (their nodes are returned), those that wait never start.
    fn fail_fast(&mut self, ticket: Ticket, failed: u32) -> Vec<NodeId> {
        let Some(job) = self.jobs.get_mut(&ticket) else { return Vec::new() };
        let msg = format!("stopped: replica {failed} failed");
        let mut stop = Vec::new();
        for (i, r) in job.replicas.iter_mut().enumerate() {
            if i as u32 == failed {
                continue;
            }
            match r.state {
                JobState::Running if r.stopping.is_none() => {
                    r.stopping = Some(msg.clone());
                    stop.extend(r.node);
                }
                JobState::Waiting => {
                    r.state = JobState::Invalid;
                    r.message = msg.clone();
                }
                _ => {}
            }
        }
        if !job.has_waiting() {
            self.waiting.retain(|&t| t != ticket);
        }
        stop
    }

    /// A node's replica of `ticket` ended: record how, and free its slot.
    /// Unknown or stale reports are ignored (`None`).
    pub fn replica_finished(&mut self, node: NodeId, ticket: Ticket, result: &RunResult) -> Option<Ended> {
        let replica = self.running.get_mut(node)?.remove(&ticket)?;
        let stop = self.settle(ticket, replica, result);
        Some(Ended { ticket, replica, stop })
    }

    /// A running replica's message, as its node tells it (a Slurm node:
    /// "slurm job 42: RUNNING"); kept until the replica ends. Ignored for a
    /// replica not running on that node or being stopped.
    pub fn replica_note(&mut self, node: NodeId, ticket: Ticket, message: &str) {
        let Some(&replica) = self.running.get(node).and_then(|r| r.get(&ticket)) else { return };
        let Some(r) = self.jobs.get_mut(&ticket).and_then(|j| j.replicas.get_mut(replica as usize)) else { return };
        if r.state == JobState::Running && r.stopping.is_none() {
            r.message = message.to_string();
        }
    }

    /// A node cannot be reached (its link broke, or it is not connected
    /// yet): it takes no new work, and each replica it ran ends INVALID with
    /// `lost` as its message, or with `requeue` is put back at the head of
    /// the queue (message `requeued`) to run on a node that has no replica
    /// of its job.
    pub fn node_down(&mut self, node: NodeId, requeue: bool, lost: &str, requeued: &str) -> Down {
        let mut down = Down::default();
        let Some(up) = self.up.get_mut(node) else { return down };
        *up = false;
        let mut to_front = Vec::new();
        for (ticket, replica) in std::mem::take(&mut self.running[node]) {
            let Some(job) = self.jobs.get_mut(&ticket) else { continue };
            let Some(r) = job.replicas.get_mut(replica as usize) else { continue };
            if requeue && r.stopping.is_none() {
                *r = Replica {
                    node: None,
                    state: JobState::Waiting,
                    exit_code: 0,
                    message: requeued.to_string(),
                    stopping: None,
                };
                if !job.lost_on.contains(&node) {
                    job.lost_on.push(node);
                }
                if !self.waiting.contains(&ticket) {
                    to_front.push(ticket);
                }
                down.requeued.push((ticket, replica));
            } else {
                let stop = self.settle(ticket, replica, &RunResult::invalid(lost));
                down.stop.extend(stop.into_iter().map(|n| (n, ticket)));
                down.failed.push((ticket, replica));
            }
        }
        // Oldest first at the head: they keep their order among themselves.
        for &t in to_front.iter().rev() {
            self.waiting.push_front(t);
        }
        down
    }

    /// A node is reachable again: it is schedulable.
    pub fn node_up(&mut self, node: NodeId) {
        if let Some(up) = self.up.get_mut(node) {
            *up = true;
        }
    }

    /// Forget a ticket. Its running replicas keep their slots until their
    /// processes are reported gone (`replica_finished`, `node_down`).
    pub fn close(&mut self, ticket: Ticket) -> Option<Closed> {
        let job = self.jobs.remove(&ticket)?;
        let was_waiting = self.waiting.contains(&ticket);
        self.waiting.retain(|&t| t != ticket);
        let mut nodes: Vec<NodeId> = job.replicas.iter().filter_map(|r| r.node).collect();
        for n in job.lost_on {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        Some(Closed { was_waiting, nodes })
    }

    // --- cancel (CANCEL) ---

    /// Never start a waiting job: it leaves the queue and each replica ends
    /// INVALID with `why`. Running replicas are the caller's to stop.
    /// Returns whether the job was waiting.
    pub fn cancel_waiting(&mut self, ticket: Ticket, why: &str) -> bool {
        if !self.waiting.contains(&ticket) {
            return false;
        }
        self.waiting.retain(|&t| t != ticket);
        if let Some(job) = self.jobs.get_mut(&ticket) {
            for r in job.replicas.iter_mut().filter(|r| r.state == JobState::Waiting) {
                r.state = JobState::Invalid;
                r.exit_code = -1;
                r.message = why.to_string();
            }
        }
        true
    }

    /// Stop the ticket's running replicas (CANCEL): each ends INVALID with
    /// `why`, whatever its node reports. Returns their nodes.
    pub fn stop_running(&mut self, ticket: Ticket, why: &str) -> Vec<NodeId> {
        let Some(job) = self.jobs.get_mut(&ticket) else { return Vec::new() };
        let mut nodes = Vec::new();
        for r in job.replicas.iter_mut().filter(|r| r.state == JobState::Running && r.stopping.is_none()) {
            r.stopping = Some(why.to_string());
            nodes.extend(r.node);
        }
        nodes
    }

    /// After a restart: put back a job from the journal, with its replicas
    /// as they were (`Running` ones occupy a slot of their node), behind the
    /// jobs restored before it in the wait queue if a replica waits. Call in
    /// ticket order; ticket numbers continue above it. A fail-fast job with
    /// a failed replica stops the others: their nodes are returned. `Err`:
    /// it contradicts what is restored already (the job is left out).
    pub fn restore_job(
        &mut self,
        ticket: Ticket,
        replicas: Vec<Replica>,
        fail_fast: bool,
        lost_on: Vec<NodeId>,
    ) -> Result<Vec<NodeId>, String> {
        if ticket == 0 || self.jobs.contains_key(&ticket) || replicas.is_empty() {
            return Err(format!("ticket {ticket} cannot be restored twice or empty"));
        }
        let mut nodes = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let Some(n) = r.node else { continue };
            if n >= self.node_count() || nodes.contains(&n) {
                return Err(format!("ticket {ticket} replica {i}: node {n} is unknown or taken twice"));
            }
            if r.state == JobState::Running && self.running[n].contains_key(&ticket) {
                return Err(format!("ticket {ticket} replica {i}: node {n} runs it already"));
            }
            nodes.push(n);
        }
        for (i, r) in replicas.iter().enumerate() {
            if let (JobState::Running, Some(n)) = (r.state, r.node) {
                // Slots may be fewer than before the restart: the replica
                // still holds one (free_slots saturates).
                self.running[n].insert(ticket, i as u32);
            }
        }
        let job = Job { ticket, replicas, fail_fast, lost_on };
        let waits = job.has_waiting();
        let failed = job.replicas.iter().position(|r| r.state == JobState::Invalid);
        self.jobs.insert(ticket, job);
        if waits {
            self.waiting.push_back(ticket);
        }
        self.next_ticket = self.next_ticket.max(ticket.wrapping_add(1).max(1));
        Ok(match failed {
            Some(i) if fail_fast => self.fail_fast(ticket, i as u32),
            _ => Vec::new(),
        })
    }

    /// Tickets whose replica node `node` runs (for NODE_WAIT after a restart).
    pub fn running_on(&self, node: NodeId) -> Vec<Ticket> {
        self.running.get(node).map_or_else(Vec::new, |r| r.keys().copied().collect())
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        for (n, running) in self.running.iter().enumerate() {
            assert!(
                running.len() <= self.slots[n] as usize,
                "node {n} runs {} > {} slots",
                running.len(),
                self.slots[n]
            );
            if !self.up[n] {
                assert!(running.is_empty(), "down node {n} still runs replicas");
            }
            for (&t, &i) in running {
                if let Some(job) = self.jobs.get(&t) {
                    let r = &job.replicas[i as usize];
                    assert_eq!(r.node, Some(n), "ticket {t} replica {i}");
                    assert_eq!(r.state, JobState::Running, "ticket {t} replica {i}");
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for &t in &self.waiting {
            assert!(seen.insert(t), "ticket {t} twice in the queue");
        }
        for job in self.jobs.values() {
            let queued = self.waiting.contains(&job.ticket);
            assert_eq!(queued, job.has_waiting(), "ticket {}", job.ticket);
            let all_waiting = job.replicas.iter().all(|r| r.state == JobState::Waiting);
            assert_eq!(all_waiting, job.state() == JobState::Waiting, "ticket {}", job.ticket);
            let mut nodes = std::collections::HashSet::new();
            for (i, r) in job.replicas.iter().enumerate() {
                if let Some(n) = r.node {
                    assert!(nodes.insert(n), "ticket {}: two replicas on node {n}", job.ticket);
                }
                match r.state {
                    JobState::Waiting => assert!(r.node.is_none() && r.stopping.is_none()),
                    JobState::Running => {
                        let node = r.node.expect("running replica has a node");
                        assert_eq!(self.running[node].get(&job.ticket), Some(&(i as u32)));
                    }
                    _ => assert!(r.stopping.is_none()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok() -> RunResult {
        RunResult::exited(0, "exit 0")
    }

    fn fail() -> RunResult {
        RunResult::exited(1, "make run exited with status 1")
    }

    fn ones(n: usize) -> Vec<u32> {
        vec![1; n]
    }

    fn nodes_of(start: &Start) -> Vec<NodeId> {
        start.placed.iter().map(|&(_, n)| n).collect()
    }

    /// A job's replicas and their nodes as `start_ready` placed them.
    fn full(ticket: Ticket, nodes: &[NodeId]) -> Start {
        Start { ticket, placed: nodes.iter().enumerate().map(|(i, &n)| (i as u32, n)).collect() }
    }

    #[test]
    fn would_place_says_where_a_job_would_start_now_and_a_preferred_node_is_taken_if_it_may() {
        let mut s = Scheduler::new(&[1, 1, 1], 10);
        let none = |_: NodeId| 0;
        // As `start_ready` would elect, and nothing changes.
        assert_eq!(s.would_place(2, &none), Some(vec![0, 1]));
        assert_eq!(s.would_place(2, &none), Some(vec![0, 1]));
        // Slots promised elsewhere count as taken.
        assert_eq!(s.would_place(2, &|i| u32::from(i == 0)), Some(vec![1, 2]));
        assert_eq!(s.would_place(3, &|i| u32::from(i == 0)), None);
        assert_eq!(s.would_place(4, &none), None);
        // Placed preferring node 2 for its first replica; the rest as usual.
        let a = s.submit(2).unwrap();
        assert_eq!(s.start_ready_preferring(Some((a, 2))), vec![full(a, &[2, 0])]);
        s.check_invariants();
        // A preference for a node that cannot take it is ignored.
        let b = s.submit(1).unwrap();
        assert_eq!(s.start_ready_preferring(Some((b, 2))), vec![full(b, &[1])]);
        // A job waits: nothing would start at once.
        let c = s.submit(1).unwrap();
        assert!(s.start_ready().is_empty());
        assert_eq!(s.would_place(1, &none), None);
        s.replica_finished(2, a, &ok());
        assert_eq!(s.start_ready_preferring(Some((a, 2))), vec![full(c, &[2])]);
        s.check_invariants();
    }

    #[test]
    fn replicas_must_fit_the_cluster() {
        let mut s = Scheduler::new(&ones(4), 10);
        assert_eq!(s.submit(5), Err(SubmitError::BadReplicas { asked: 5, nodes: 4 }));
        assert_eq!(s.submit(0), Err(SubmitError::BadReplicas { asked: 0, nodes: 4 }));
        assert!(s.submit(4).is_ok());
    }

    #[test]
    fn fifo_without_overtaking() {
        let mut s = Scheduler::new(&ones(4), 10);
        let a = s.submit(3).unwrap();
        let b = s.submit(2).unwrap();
        let c = s.submit(1).unwrap();
        assert_eq!(s.start_ready(), vec![full(a, &[0, 1, 2])]);
        // c would fit in the one free node, but b is ahead of it.
        assert_eq!(s.queue_position(b), 1);
        assert_eq!(s.queue_position(c), 2);
        assert_eq!(s.job(b).unwrap().state(), JobState::Waiting);
        s.replica_finished(1, a, &ok());
        // Round robin: the cursor is past node 2, so node 3 comes first.
        assert_eq!(s.start_ready(), vec![full(b, &[3, 1])]);
        assert_eq!(s.queue_position(c), 1);
        s.replica_finished(0, a, &ok());
        assert_eq!(s.start_ready(), vec![full(c, &[0])]);
        s.check_invariants();
    }

    #[test]
    fn a_node_runs_up_to_its_slots_of_different_jobs_and_the_emptiest_node_wins() {
        let mut s = Scheduler::new(&[2, 1], 10);
        let a = s.submit(1).unwrap();
        let b = s.submit(1).unwrap();
        let c = s.submit(1).unwrap();
        let d = s.submit(1).unwrap();
        let starts = s.start_ready();
        // Node 0 has 2 free slots, so it takes a; then 1 and 1: round robin.
        assert_eq!(starts.iter().map(nodes_of).collect::<Vec<_>>(), vec![vec![0], vec![1], vec![0]]);
        assert_eq!((s.busy(0), s.busy(1)), (2, 1));
        assert_eq!(s.queue_position(d), 1);
        // Two replicas of one job never share a node, even with free slots.
        s.replica_finished(1, b, &ok());
        assert_eq!(s.start_ready(), vec![full(d, &[1])]);
        let e = s.submit(2).unwrap();
        s.replica_finished(0, a, &ok());
        assert!(s.start_ready().is_empty(), "node 1 is full and node 0 cannot take both");
        s.replica_finished(1, d, &ok());
        assert_eq!(nodes_of(&s.start_ready()[0]).len(), 2);
        let _ = c;
        assert_eq!(s.job(e).unwrap().state(), JobState::Running);
        s.check_invariants();
        // Most free slots first, whatever the cursor says.
        let mut s = Scheduler::new(&[1, 3], 10);
        let t = s.submit(1).unwrap();
        assert_eq!(s.start_ready(), vec![full(t, &[1])]);
    }

    #[test]
    fn queue_is_bounded() {
        let mut s = Scheduler::new(&ones(1), 1);
        s.submit(1).unwrap();
        s.start_ready();
        s.submit(1).unwrap();
        assert_eq!(s.submit(1), Err(SubmitError::QueueFull { max: 1 }));
    }

    #[test]
    fn job_state_follows_replicas() {
        let mut s = Scheduler::new(&ones(2), 10);
        let t = s.submit(2).unwrap();
        s.start_ready();
        assert_eq!(s.job(t).unwrap().state(), JobState::Running);
        s.replica_finished(0, t, &ok());
        assert_eq!(s.job(t).unwrap().state(), JobState::Running);
        s.replica_finished(1, t, &RunResult::invalid("make run exited with status 2"));
        assert_eq!(s.job(t).unwrap().state(), JobState::Invalid);
        assert!(s.job(t).unwrap().finished());
    }

    #[test]
    fn closing_a_running_job_keeps_slots_until_processes_end() {
        let mut s = Scheduler::new(&ones(2), 10);
        let t = s.submit(2).unwrap();
        s.start_ready();
        let closed = s.close(t).unwrap();
        assert_eq!(closed, Closed { was_waiting: false, nodes: vec![0, 1] });
        assert_eq!(s.free_slots(0) + s.free_slots(1), 0);
        let u = s.submit(1).unwrap();
        assert!(s.start_ready().is_empty());
        s.replica_finished(1, t, &RunResult::invalid("killed"));
        assert_eq!(s.start_ready(), vec![full(u, &[1])]);
        s.check_invariants();
    }

    #[test]
    fn a_down_node_fails_its_replicas_takes_no_work_until_up_and_big_jobs_wait() {
        let mut s = Scheduler::new(&ones(2), 10);
        let t = s.submit(1).unwrap();
        s.start_ready();
        let down = s.node_down(0, false, "node lost: x", "requeued");
        assert_eq!(down.failed, vec![(t, 0)]);
        let r = &s.job(t).unwrap().replicas[0];
        assert_eq!((r.state, r.message.as_str()), (JobState::Invalid, "node lost: x"));
        // Admission counts configured nodes: a 2-replica job waits.
        let big = s.submit(2).unwrap();
        let small = s.submit(1).unwrap();
        assert!(s.start_ready().is_empty(), "big waits at the head, small does not overtake it");
        s.node_up(0);
        assert_eq!(s.start_ready().iter().map(|st| st.ticket).collect::<Vec<_>>(), vec![big]);
        assert_eq!(s.queue_position(small), 1);
        // A late report from the lost node is ignored.
        assert_eq!(s.replica_finished(0, t, &ok()), None);
        s.check_invariants();
    }

    #[test]
    fn a_requeued_replica_keeps_its_turn_and_avoids_its_jobs_other_nodes() {
        let mut s = Scheduler::new(&ones(3), 10);
        let t = s.submit(2).unwrap();
        assert_eq!(s.start_ready(), vec![full(t, &[0, 1])]);
        let later = s.submit(1).unwrap();
        // The 1-replica job took node 2.
        assert_eq!(s.start_ready(), vec![full(later, &[2])]);
        let next = s.submit(1).unwrap();
        let down = s.node_down(1, true, "node lost", "requeued after node 1 was lost");
        assert_eq!(down.requeued, vec![(t, 1)]);
        assert_eq!(s.queue_position(t), 1, "back at the head");
        assert_eq!(s.queue_position(next), 2);
        assert_eq!(s.job(t).unwrap().state(), JobState::Running, "partly running");
        s.check_invariants();
        // Node 0 has a replica of t: not there; node 2 is busy; wait.
        s.replica_finished(0, t, &ok());
        assert!(s.start_ready().is_empty(), "never back on node 0, where replica 0 ran");
        s.replica_finished(2, later, &ok());
        assert_eq!(s.start_ready(), vec![Start { ticket: t, placed: vec![(1, 2)] }, full(next, &[0])]);
        assert_eq!(s.job(t).unwrap().replicas[1].message, "requeued after node 1 was lost");
        assert_eq!(s.close(t).unwrap().nodes, vec![0, 2, 1], "the lost node drops its workspace too");
        s.check_invariants();
    }

    #[test]
    fn a_running_replica_shows_what_its_node_notes_until_it_ends() {
        let mut s = Scheduler::new(&ones(2), 10);
        let t = s.submit(1).unwrap();
        let u = s.submit(2).unwrap();
        s.start_ready();
        s.replica_note(0, t, "slurm job 42: RUNNING");
        s.replica_note(1, t, "wrong node: ignored");
        s.replica_note(0, 99, "no such ticket: ignored");
        assert_eq!(s.job(t).unwrap().replicas[0].message, "slurm job 42: RUNNING");
        assert!(s.job(u).unwrap().replicas.iter().all(|r| r.message.is_empty()), "u waits: untouched");
        s.replica_finished(0, t, &ok());
        s.replica_note(0, t, "late: ignored");
        assert_eq!(s.job(t).unwrap().replicas[0].message, "exit 0");
        s.check_invariants();
    }

    #[test]
    fn fail_fast_stops_the_others_and_they_end_stopped_whatever_they_report() {
        let mut s = Scheduler::new(&ones(3), 10);
        let t = s.submit_opts(3, true).unwrap();
        s.start_ready();
        s.replica_finished(2, t, &ok());
        let ended = s.replica_finished(0, t, &fail()).unwrap();
        assert_eq!(ended.stop, vec![1]);
        assert_eq!(s.job(t).unwrap().state(), JobState::Invalid);
        assert!(!s.job(t).unwrap().finished(), "replica 1 still has to report");
        s.check_invariants();
        // Killed, it reports whatever; it ends stopped.
        s.replica_finished(1, t, &RunResult::invalid("killed by signal 9"));
        let r = &s.job(t).unwrap().replicas;
        assert_eq!(r[1].message, "stopped: replica 0 failed");
        assert_eq!(r[2].state, JobState::Completed, "a finished replica keeps its result");
        // Without fail-fast the others go on.
        let u = s.submit(2).unwrap();
        s.start_ready();
        assert_eq!(s.replica_finished(0, u, &fail()).unwrap().stop, Vec::<NodeId>::new());
        s.check_invariants();
    }

    #[test]
    fn fail_fast_waiting_replicas_never_start() {
        let mut s = Scheduler::new(&ones(2), 10);
        let t = s.submit_opts(2, true).unwrap();
        s.start_ready();
        s.node_down(1, true, "node lost", "requeued");
        assert_eq!(s.queue_position(t), 1);
        assert!(s.replica_finished(0, t, &fail()).unwrap().stop.is_empty());
        assert_eq!(s.queue_position(t), 0, "out of the queue");
        assert_eq!(s.job(t).unwrap().replicas[1].message, "stopped: replica 0 failed");
        assert!(s.job(t).unwrap().finished());
        s.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u32, bool),
        Finish(usize, bool),
        Close(u32),
        Down(usize, bool),
        Up(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u32..5, any::<bool>()).prop_map(|(n, f)| Op::Submit(n, f)),
            4 => (0usize..4, any::<bool>()).prop_map(|(n, ok)| Op::Finish(n, ok)),
            1 => (1u32..20).prop_map(Op::Close),
            1 => (0usize..4, any::<bool>()).prop_map(|(n, r)| Op::Down(n, r)),
            2 => (0usize..4).prop_map(Op::Up),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_sequence(
            slots in prop::collection::vec(1u32..4, 4),
            ops in prop::collection::vec(op(), 0..80),
        ) {
            let mut s = Scheduler::new(&slots, 5);
            let mut first_starts = Vec::new();
            for op in ops {
                match op {
                    Op::Submit(n, f) => { let _ = s.submit_opts(n, f); }
                    Op::Finish(n, good) => {
                        // The node's oldest replica ends.
                        if let Some((&t, _)) = s.running[n].iter().next() {
                            s.replica_finished(n, t, &if good { ok() } else { fail() });
                        }
                    }
                    Op::Close(t) => { s.close(t); }
                    Op::Down(n, requeue) => { s.node_down(n, requeue, "node lost", "requeued"); }
                    Op::Up(n) => s.node_up(n),
                }
                let up: Vec<bool> = s.up.clone();
                for st in s.start_ready() {
                    for &(_, n) in &st.placed {
                        prop_assert!(up[n], "started on down node {}", n);
                    }
                    if !first_starts.contains(&st.ticket) {
                        first_starts.push(st.ticket);
                    }
                }
                s.check_invariants();
            }
            // No overtaking: jobs first start in the order they were issued.
            prop_assert!(first_starts.windows(2).all(|w| w[0] < w[1]), "{:?}", first_starts);
        }

        #[test]
        fn a_burst_on_idle_nodes_spreads_evenly(
            slots in prop::collection::vec(1u32..4, 1..6),
            jobs in 0usize..30,
            warmup in 0usize..7,
        ) {
            let nodes = slots.len();
            let mut s = Scheduler::new(&slots, 100);
            // Move the cursor somewhere first; all nodes idle again after.
            for _ in 0..warmup {
                let t = s.submit(1).unwrap();
                let st = s.start_ready();
                s.replica_finished(st[0].placed[0].1, t, &ok());
            }
            for _ in 0..jobs {
                s.submit(1).unwrap();
            }
            s.start_ready();
            let busy: Vec<usize> = (0..nodes).map(|n| s.busy(n)).collect();
            for a in 0..nodes {
                for b in 0..nodes {
                    if slots[a] == slots[b] {
                        prop_assert!(busy[a].abs_diff(busy[b]) <= 1, "slots {:?} busy {:?}", slots, busy);
                    }
                }
            }
            let capacity: usize = slots.iter().map(|&k| k as usize).sum();
            prop_assert_eq!(busy.iter().sum::<usize>(), jobs.min(capacity));
            s.check_invariants();
        }
    }

    fn replica(node: Option<NodeId>, state: JobState) -> Replica {
        Replica { node, state, exit_code: 0, message: String::new(), stopping: None }
    }

    #[test]
    fn restored_jobs_keep_their_slots_and_queue_order_and_numbering_goes_on() {
        let mut s = Scheduler::new(&[1, 1, 1], 10);
        // 4: finished on node 0; 7: running on node 1 (a node that survived);
        // 9 and 8 are queued, restored in ticket order 8 then 9.
        assert_eq!(s.restore_job(4, vec![replica(Some(0), JobState::Completed)], false, vec![]), Ok(vec![]));
        assert_eq!(s.restore_job(7, vec![replica(Some(1), JobState::Running)], false, vec![]), Ok(vec![]));
        s.restore_job(8, vec![replica(None, JobState::Waiting); 2], false, vec![]).unwrap();
        s.restore_job(9, vec![replica(None, JobState::Waiting)], false, vec![]).unwrap();
        s.check_invariants();
        assert!(s.restore_job(8, vec![replica(None, JobState::Waiting)], false, vec![]).is_err());
        assert!(s.restore_job(10, vec![replica(Some(5), JobState::Completed)], false, vec![]).is_err());
        assert_eq!(s.next_ticket(), 10);
        assert_eq!(s.running_on(1), vec![7]);
        assert_eq!((s.queue_position(8), s.queue_position(9)), (1, 2));
        // Node 1 is busy with 7: job 8 (two replicas) takes nodes 0 and 2.
        let started = s.start_ready();
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].ticket, 8);
        assert_eq!(s.queue_position(9), 1, "9 waits behind, never overtakes");
        s.check_invariants();
    }

    #[test]
    fn a_restored_fail_fast_job_with_a_failed_replica_stops_the_others() {
        let mut s = Scheduler::new(&[1, 1, 1], 10);
        let replicas = vec![
            replica(Some(0), JobState::Invalid),
            replica(Some(1), JobState::Running),
            replica(None, JobState::Waiting),
        ];
        assert_eq!(s.restore_job(3, replicas, true, vec![]), Ok(vec![1]));
        let job = s.job(3).unwrap();
        assert_eq!(job.replicas[2].state, JobState::Invalid);
        assert_eq!(job.replicas[1].stopping.as_deref(), Some("stopped: replica 0 failed"));
        assert_eq!(s.queue_position(3), 0);
        s.check_invariants();
    }
}
