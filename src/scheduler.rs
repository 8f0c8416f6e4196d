//! The main server's bookkeeping: free-node FIFO, job wait queue, job table.
//!
//! Owns: which node runs which replica, which jobs wait and in what order,
//! each replica's state, and ticket numbers (from a starting point the
//! caller persists, see `tickets`). Plain data, no I/O, no clock.
//! Must not touch: sockets, files, processes. Callers turn its answers
//! (`Start`s, freed nodes) into messages.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - every node is in exactly one place: the free FIFO, or assigned to one
//!   (ticket, replica) that is running (possibly of a job already closed);
//! - a job is WAITING iff it is in the wait queue, and then has no nodes;
//! - the wait queue is FIFO and a job starts only from its head, so a big
//!   job is never overtaken by a smaller one (no starvation).

use std::collections::{BTreeMap, HashMap, VecDeque};

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
}

#[derive(Debug, Clone)]
pub struct Job {
    pub ticket: Ticket,
    pub replicas: Vec<Replica>,
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
}

/// A job the caller must now send to its nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub ticket: Ticket,
    /// Node of each replica, by replica index.
    pub nodes: Vec<NodeId>,
}

/// What closing a ticket leaves for the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub was_waiting: bool,
    /// Nodes that ran a replica of this job (running or finished); each
    /// must be told to drop the ticket's workspace.
    pub nodes: Vec<NodeId>,
}

#[derive(Debug)]
pub struct Scheduler {
    node_count: usize,
    max_queue: usize,
    free: VecDeque<NodeId>,
    /// Node -> the replica it is running (the job may be closed already).
    busy: HashMap<NodeId, (Ticket, u32)>,
    /// Nodes that were lost and are never handed out again.
    lost: Vec<NodeId>,
    waiting: VecDeque<Ticket>,
    jobs: BTreeMap<Ticket, Job>,
    next_ticket: Ticket,
}

impl Scheduler {
    pub fn new(node_count: usize, max_queue: usize) -> Self {
        Scheduler {
            node_count,
            max_queue,
            free: (0..node_count).collect(),
            busy: HashMap::new(),
            lost: Vec::new(),
            waiting: VecDeque::new(),
            jobs: BTreeMap::new(),
            next_ticket: 1,
        }
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

    pub fn free_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.free.iter().copied()
    }

    /// 1-based position in the wait queue, 0 if not waiting.
    pub fn queue_position(&self, ticket: Ticket) -> u32 {
        self.waiting.iter().position(|&t| t == ticket).map_or(0, |p| p as u32 + 1)
    }

    /// Whether a job of `replicas` replicas would be accepted now.
    pub fn admissible(&self, replicas: u32) -> Result<(), SubmitError> {
        let usable = self.node_count - self.lost.len();
        if replicas == 0 || replicas as usize > usable {
            return Err(SubmitError::BadReplicas { asked: replicas, nodes: usable });
        }
        if self.waiting.len() >= self.max_queue {
            return Err(SubmitError::QueueFull { max: self.max_queue });
        }
        Ok(())
    }

    /// Accept a job of `replicas` replicas. It waits until `start_ready`
    /// hands it nodes.
    pub fn submit(&mut self, replicas: u32) -> Result<Ticket, SubmitError> {
        self.admissible(replicas)?;
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1).max(1);
        let replica = Replica { node: None, state: JobState::Waiting, exit_code: 0, message: String::new() };
        self.jobs.insert(ticket, Job { ticket, replicas: vec![replica; replicas as usize] });
        self.waiting.push_back(ticket);
        Ok(ticket)
    }

    /// Start every job at the head of the queue that fits in the free nodes.
    pub fn start_ready(&mut self) -> Vec<Start> {
        let mut started = Vec::new();
        while let Some(&ticket) = self.waiting.front() {
            let Some(job) = self.jobs.get_mut(&ticket) else {
                self.waiting.pop_front();
                continue;
            };
            if job.replicas.len() > self.free.len() {
                break;
            }
            self.waiting.pop_front();
            let mut nodes = Vec::with_capacity(job.replicas.len());
            for (i, r) in job.replicas.iter_mut().enumerate() {
                let node = self.free.pop_front().expect("checked free count above");
                self.busy.insert(node, (ticket, i as u32));
                r.node = Some(node);
                r.state = JobState::Running;
                nodes.push(node);
            }
            started.push(Start { ticket, nodes });
        }
        started
    }

    /// A node's replica process ended: record how, and free the node (to the
    /// back of the FIFO). Unknown or stale reports are ignored.
    /// Returns the replica, if the node was running one.
    pub fn replica_finished(&mut self, node: NodeId, result: &RunResult) -> Option<(Ticket, u32)> {
        let (ticket, idx) = self.busy.remove(&node)?;
        self.free.push_back(node);
        if let Some(r) = self.jobs.get_mut(&ticket).and_then(|j| j.replicas.get_mut(idx as usize)) {
            r.state = if result.state.is_final() { result.state } else { JobState::Invalid };
            r.exit_code = result.exit_code;
            r.message = result.message.clone();
        }
        Some((ticket, idx))
    }

    /// A node can no longer be reached: fail its replica and never use it again.
    /// Returns the replica it was running, if any.
    pub fn node_lost(&mut self, node: NodeId, why: &str) -> Option<(Ticket, u32)> {
        if self.lost.contains(&node) {
            return None;
        }
        let failed = self.replica_finished(node, &RunResult::lost(why));
        self.free.retain(|&n| n != node);
        self.lost.push(node);
        failed
    }

    /// Forget a ticket. Its running replicas keep their nodes until their
    /// processes are reported gone (`replica_finished`).
    pub fn close(&mut self, ticket: Ticket) -> Option<Closed> {
        let job = self.jobs.remove(&ticket)?;
        let was_waiting = self.waiting.contains(&ticket);
        self.waiting.retain(|&t| t != ticket);
        let nodes = job.replicas.iter().filter_map(|r| r.node).collect();
        Some(Closed { was_waiting, nodes })
    }

    // --- the cluster view and cancel (branch cli) ---

    /// The replica node `node` runs, if busy.
    pub fn running_on(&self, node: NodeId) -> Option<(Ticket, u32)> {
        self.busy.get(&node).copied()
    }

    pub fn is_lost(&self, node: NodeId) -> bool {
        self.lost.contains(&node)
    }

    /// Waiting tickets, head of the queue first.
    pub fn waiting(&self) -> impl Iterator<Item = Ticket> + '_ {
        self.waiting.iter().copied()
    }

    /// Every job in the table, by ticket.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.jobs.values()
    }

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

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut seen = std::collections::HashSet::new();
        for &n in self.free.iter().chain(self.busy.keys()).chain(self.lost.iter()) {
            if self.lost.contains(&n) && !self.busy.contains_key(&n) && self.free.contains(&n) {
                panic!("lost node {n} is free");
            }
            if !self.lost.contains(&n) {
                assert!(seen.insert(n), "node {n} is in two places");
            }
        }
        for n in 0..self.node_count {
            assert!(seen.contains(&n) || self.lost.contains(&n), "node {n} is nowhere");
        }
        for job in self.jobs.values() {
            let queued = self.waiting.contains(&job.ticket);
            assert_eq!(queued, job.state() == JobState::Waiting, "ticket {}", job.ticket);
            if queued {
                assert!(job.replicas.iter().all(|r| r.node.is_none()));
            }
            for (i, r) in job.replicas.iter().enumerate() {
                if r.state == JobState::Running {
                    let node = r.node.expect("running replica has a node");
                    assert_eq!(self.busy.get(&node), Some(&(job.ticket, i as u32)));
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

    #[test]
    fn replicas_must_fit_the_cluster() {
        let mut s = Scheduler::new(4, 10);
        assert_eq!(s.submit(5), Err(SubmitError::BadReplicas { asked: 5, nodes: 4 }));
        assert_eq!(s.submit(0), Err(SubmitError::BadReplicas { asked: 0, nodes: 4 }));
        assert!(s.submit(4).is_ok());
    }

    #[test]
    fn fifo_without_overtaking_and_freed_nodes_go_to_the_back() {
        let mut s = Scheduler::new(4, 10);
        let a = s.submit(3).unwrap();
        let b = s.submit(2).unwrap();
        let c = s.submit(1).unwrap();
        assert_eq!(s.start_ready(), vec![Start { ticket: a, nodes: vec![0, 1, 2] }]);
        // c would fit in the one free node, but b is ahead of it.
        assert_eq!(s.queue_position(b), 1);
        assert_eq!(s.queue_position(c), 2);
        assert_eq!(s.job(b).unwrap().state(), JobState::Waiting);
        s.replica_finished(1, &ok());
        assert_eq!(s.start_ready(), vec![Start { ticket: b, nodes: vec![3, 1] }]);
        assert_eq!(s.queue_position(c), 1);
        s.replica_finished(0, &ok());
        assert_eq!(s.start_ready(), vec![Start { ticket: c, nodes: vec![0] }]);
        s.check_invariants();
    }

    #[test]
    fn queue_is_bounded() {
        let mut s = Scheduler::new(1, 1);
        s.submit(1).unwrap();
        s.start_ready();
        s.submit(1).unwrap();
        assert_eq!(s.submit(1), Err(SubmitError::QueueFull { max: 1 }));
    }

    #[test]
    fn job_state_follows_replicas() {
        let mut s = Scheduler::new(2, 10);
        let t = s.submit(2).unwrap();
        s.start_ready();
        assert_eq!(s.job(t).unwrap().state(), JobState::Running);
        s.replica_finished(0, &ok());
        assert_eq!(s.job(t).unwrap().state(), JobState::Running);
        s.replica_finished(1, &RunResult::invalid("make run exited with status 2"));
        assert_eq!(s.job(t).unwrap().state(), JobState::Invalid);
        assert!(s.job(t).unwrap().finished());
    }

    #[test]
    fn closing_a_running_job_keeps_nodes_until_processes_end() {
        let mut s = Scheduler::new(2, 10);
        let t = s.submit(2).unwrap();
        s.start_ready();
        let closed = s.close(t).unwrap();
        assert_eq!(closed, Closed { was_waiting: false, nodes: vec![0, 1] });
        assert_eq!(s.free_nodes().count(), 0);
        let u = s.submit(1).unwrap();
        assert!(s.start_ready().is_empty());
        s.replica_finished(1, &RunResult::invalid("killed"));
        assert_eq!(s.start_ready(), vec![Start { ticket: u, nodes: vec![1] }]);
        s.check_invariants();
    }

    #[test]
    fn lost_node_fails_its_replica_and_shrinks_the_cluster() {
        let mut s = Scheduler::new(2, 10);
        let t = s.submit(1).unwrap();
        s.start_ready();
        assert_eq!(s.node_lost(0, "lost contact with node"), Some((t, 0)));
        assert_eq!(s.job(t).unwrap().state(), JobState::Invalid);
        assert!(matches!(s.submit(2), Err(SubmitError::BadReplicas { .. })));
        s.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u32),
        Finish(usize),
        Close(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![(1u32..5).prop_map(Op::Submit), (0usize..4).prop_map(Op::Finish), (1u32..20).prop_map(Op::Close),]
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_sequence(ops in prop::collection::vec(op(), 0..60)) {
            let mut s = Scheduler::new(4, 5);
            let mut start_order = Vec::new();
            for op in ops {
                match op {
                    Op::Submit(n) => { let _ = s.submit(n); }
                    Op::Finish(n) => { s.replica_finished(n, &ok()); }
                    Op::Close(t) => { s.close(t); }
                }
                start_order.extend(s.start_ready().into_iter().map(|st| st.ticket));
                s.check_invariants();
            }
            // Tickets start in the order they were issued.
            prop_assert!(start_order.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
