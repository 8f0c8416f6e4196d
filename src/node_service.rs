//! The node role: NODE_PROG calls in, replicas run, their ends reported.
//!
//! Owns: the side nodes of this process (`node::Node`, one per node line
//! run here) and their start-up (reclaiming what an earlier run left under
//! the slot uids, one empty network namespace per node, cgroups, the
//! containment probe); NODE_NULL, NODE_RUN (the archive streamed into the
//! ticket's folder, then `Node::start`), NODE_FETCH and NODE_DROP served
//! over a link; the same three as direct calls from the in-process main
//! service (`run_local`, `fetch_local`, `drop_local`: the spooled archive
//! and the output are hard-linked, no loopback round trip), whose answers
//! come back as [`NodeEvent`]s, the events a link's replies would make;
//! draining each replica's output pipe; reaped children turned into
//! finished replicas, then into NODE_RUN replies or events; time limits;
//! killing and reaping everything at shutdown (node folders stay); the
//! result of every replica started over a link, until NODE_DROP, for
//! NODE_WAIT (a main server that restarted asks how it ended; deferred
//! while it runs); at start, clearing node folders of all but the live
//! tickets' (the journal's), the rest removed by a child.
//! Must not touch: the poll or the slab (the reactor registers each
//! replica's output pipe under the key it is given here and routes
//! replies), the job table (`coordinator`), process setup (`spawn`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::conn::{Sink, Streamed};
use crate::node::{Drained, Finished, Node, NodeConfig, ReplyTo};
use crate::proto::{self, CloudStat, RunArgs, RunResult};
use crate::record::{self, Piece};
use crate::rpc::{self, AcceptStat};
use crate::scheduler::NodeId;
use crate::server::ServerConfig;
use crate::session::Call;
use crate::spawn::{Containment, Sandbox};
use crate::xdr::XdrReader;

/// Chunks (64 KiB each) read from one replica's output per turn of the loop.
const DRAIN_BUDGET: usize = 4;

/// `Node::start`'s reply-to for a replica started by a direct call: no
/// connection has this key (slab keys are small), the answer is an event.
const LOCAL: usize = usize::MAX;

/// What an in-process node answers the main service: the events a link's
/// NODE_RUN and NODE_FETCH replies would make.
#[derive(Debug)]
pub(crate) enum NodeEvent {
    /// A replica started by `run_local` ended, or could not start.
    RunFinished { node: NodeId, ticket: u32, result: RunResult },
    /// `fetch_local`'s answer: the output is at `into`, or why not
    /// (`gone`: the node has none for good; else a retry may work).
    Fetched { ticket: u32, replica: u32, result: Result<PathBuf, (bool, String)> },
}

pub(crate) struct NodeService {
    pub(crate) nodes: Vec<Node>,
    /// Slab key of each running replica's output pipe, by (node, ticket).
    pub(crate) child_keys: HashMap<(NodeId, u32), usize>,
    /// Replicas whose output pipe still had data when their read budget ran out.
    pub(crate) more_output: Vec<(NodeId, u32)>,
    /// Answers to direct calls, for the in-process main service.
    pub(crate) events: VecDeque<NodeEvent>,
    /// What containment the host gives replicas here, for the ready line.
    pub(crate) cgroup_summary: String,
    /// How each replica started over a link ended, kept until NODE_DROP:
    /// its NODE_RUN reply may not have reached a main server that died or
    /// restarted, which asks again with NODE_WAIT.
    pub(crate) ended: HashMap<(NodeId, u32), RunResult>,
}

impl NodeService {
    /// Prepare the host and create node `i` for each of `ports` under
    /// `work_dir` (absolute). A node's folder keeps the tickets of `live`
    /// (jobs restored from the journal: their outputs stay retrievable);
    /// everything else in it is removed by a child. Errors are one line for
    /// the operator.
    pub(crate) fn start(
        cfg: &ServerConfig,
        work_dir: &Path,
        ports: &[u16],
        live: &HashSet<u32>,
    ) -> Result<NodeService, String> {
        let n = ports.len();
        // Processes an earlier run left under our slot uids (it was killed
        // before it could stop them) must not meet the next tenants.
        if cfg.slot_uids {
            let uids: Vec<u32> = cfg.identities.iter().flatten().map(|(u, _)| u.as_raw()).collect();
            if let (Some(&lo), Some(&hi)) = (uids.iter().min(), uids.iter().max()) {
                let n = crate::spawn::reclaim(lo..hi + 1);
                if n > 0 {
                    log::info!("reclaimed {n} processes of slot uids {lo}..{hi} left by an earlier run");
                }
            }
        }
        // One empty network namespace per node, made once: each replica's
        // init joins its node's with setns (cheaper than a new one each).
        let mut netns = Vec::with_capacity(n);
        for _ in 0..n {
            let ns = (cfg.isolate_network && cfg.containment == Containment::Namespaces)
                .then(crate::spawn::empty_network)
                .transpose()?;
            netns.push(ns.map(std::rc::Rc::new));
        }
        // Per-replica cgroups where the host has them (and what an earlier
        // run left in ours); else limits stay per process.
        let (cgroups, cgroup_summary) = match crate::cgroup::Cgroups::detect(&crate::cgroup::tag_for(work_dir)) {
            Ok(groups) => {
                let (killed, removed) = groups.reclaim();
                if killed + removed > 0 {
                    log::info!("reclaimed {killed} processes and {removed} cgroups left by an earlier run");
                }
                let summary = format!("per-job memory and process totals: {}", groups.describe());
                (Some(std::rc::Rc::new(groups)), summary)
            }
            Err(why) => (None, format!("no cgroups ({why}): memory and process limits are per process")),
        };
        // Without cgroups, RLIMIT_NPROC is the only bound on a job's forks,
        // even where every node shares one uid (`--no-slot-uids`).
        let mut limits = cfg.limits.clone();
        if cgroups.is_none() && cfg.containment != Containment::UserNamespace {
            limits.nproc_rlimit = limits.processes.is_some();
        }
        // Before listening: can replicas be contained as configured here?
        let (isolate_network, containment) = (cfg.isolate_network, cfg.containment);
        let sandbox_for = |identity| Sandbox { identity, isolate_network, containment };
        let sandbox = sandbox_for(cfg.identities.first().copied().flatten());
        let probe_ns = netns.first().and_then(|ns| ns.as_deref()).map(|fd| std::os::fd::AsFd::as_fd(fd));
        crate::spawn::probe(sandbox, &limits, work_dir, probe_ns, cgroups.as_deref())?;

        let mut nodes = Vec::with_capacity(n);
        // What an earlier run left and no live ticket needs goes here, then
        // is removed by a child: it may be large (uncontained workspaces).
        let trash = work_dir.join("trash");
        let mut trashed = 0;
        for (i, &port) in ports.iter().enumerate() {
            let dir = work_dir.join(format!("output_{port}"));
            trashed += crate::node::sweep_dir(&dir, &trash, &format!("{port}"), |t| live.contains(&t))
                .map_err(|e| format!("cannot clear node directory {}: {e}", dir.display()))?;
            let node = Node::new(NodeConfig {
                port,
                dir: dir.clone(),
                limits: limits.clone(),
                sandbox: sandbox_for(cfg.identities.get(cfg.nodes.slot_offset(i)).copied().flatten()),
                time_limit: cfg.time_limit,
                kill_grace: cfg.kill_grace,
                max_output: cfg.max_output,
                work_dir: work_dir.to_path_buf(),
                netns: netns[i].clone(),
                cgroups: cgroups.clone(),
                // Node i's slots take the next `slots[i]` identities.
                slot_identities: (0..cfg.nodes.slots[i] as usize)
                    .map(|s| cfg.identities.get(cfg.nodes.slot_offset(i) + s).copied().flatten())
                    .collect(),
            })
            .map_err(|e| format!("cannot create node directory {}: {e}", dir.display()))?;
            nodes.push(node);
        }
        if trashed > 0 || trash.exists() {
            match crate::spawn::remove_tree_in_background(&trash) {
                Ok(pid) => log::debug!("removing {trashed} stale entries of node folders in pid {pid}"),
                Err(e) => log::warn!("cannot fork to remove {}: {e}", trash.display()),
            }
        }
        Ok(NodeService {
            nodes,
            child_keys: HashMap::new(),
            more_output: Vec::new(),
            events: VecDeque::new(),
            cgroup_summary,
            ended: HashMap::new(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// A whole (non-streamed) call from the main server to node i, on
    /// connection `key`: the reply, or `None` when it is deferred (a
    /// NODE_WAIT for a replica still running is answered when it ends).
    pub(crate) fn serve_call(&mut self, i: NodeId, key: usize, call: Call) -> Option<Vec<Piece>> {
        let xid = call.xid;
        if let (proto::NODE_WAIT, Ok(ticket)) = (call.proc_num, XdrReader::new(&call.args).u32()) {
            return self.wait(i, (key, xid), ticket).map(|result| vec![Piece::Bytes(run_reply(xid, &result))]);
        }
        Some(self.serve_now(i, call))
    }

    /// NODE_WAIT: how the ticket's replica ended, now (`Some`) or, while it
    /// runs, once it ends (sent to `reply_to`; `None`). A ticket the node
    /// does not know ends INVALID "node lost".
    fn wait(&mut self, i: NodeId, reply_to: ReplyTo, ticket: u32) -> Option<RunResult> {
        if self.nodes[i].rewait(ticket, reply_to) {
            return None;
        }
        Some(self.ended.get(&(i, ticket)).cloned().unwrap_or_else(|| {
            RunResult::invalid(format!(
                "node lost: {} has no replica of ticket {ticket} (it restarted, or dropped the ticket)",
                self.nodes[i].name()
            ))
        }))
    }

    fn serve_now(&mut self, i: NodeId, call: Call) -> Vec<Piece> {
        let xid = call.xid;
        let mut w = rpc::accepted(xid, AcceptStat::Success);
        match (call.proc_num, XdrReader::new(&call.args).u32()) {
            (proto::NODE_NULL, _) => vec![Piece::Bytes(w.into_bytes())],
            (proto::NODE_FETCH, Ok(ticket)) => match self.nodes[i].fetch(ticket) {
                Ok((file, len)) => {
                    // Opened now: a DROP right behind this FETCH may remove it.
                    w.u32(CloudStat::Ok as u32);
                    record::with_opaque(w, Piece::File { file, len })
                }
                Err((gone, msg)) => {
                    // NO_SUCH_TICKET: missing for good; INTERNAL: try again later.
                    let stat = if gone { CloudStat::NoSuchTicket } else { CloudStat::Internal };
                    w.u32(stat as u32).opaque(msg.as_bytes());
                    vec![Piece::Bytes(w.into_bytes())]
                }
            },
            (proto::NODE_DROP | proto::NODE_STOP, Ok(ticket)) => {
                match call.proc_num {
                    proto::NODE_STOP => self.nodes[i].stop_ticket(ticket),
                    _ => {
                        self.ended.remove(&(i, ticket));
                        self.nodes[i].drop_ticket(ticket)
                    }
                }
                w.u32(CloudStat::Ok as u32);
                vec![Piece::Bytes(w.into_bytes())]
            }
            _ => vec![Piece::Bytes(garbage(xid))],
        }
    }

    /// Where a NODE_RUN's archive streams to, or the GARBAGE_ARGS reply.
    pub(crate) fn run_sink(&mut self, i: NodeId, call: &Call) -> Result<Sink, Vec<u8>> {
        let args = RunArgs::decode(&mut XdrReader::new(&call.args)).map_err(|_| garbage(call.xid))?;
        let ticket = args.ticket;
        let what = Streamed::Run { args };
        Ok(match self.nodes[i].prepare_archive(ticket) {
            Ok((file, path)) => Sink::File { xid: call.xid, what, file: Some(file), path, error: None },
            Err(e) => Sink::failed(call.xid, what, format!("the node cannot store the archive: {e}")),
        })
    }

    /// A NODE_RUN whose archive has arrived (or failed to, `error`): the
    /// replica's output pipe to watch, or the reply to send now.
    pub(crate) fn run_received(
        &mut self,
        i: NodeId,
        reply_to: ReplyTo,
        args: RunArgs,
        error: Option<String>,
    ) -> Result<RawFd, Vec<u8>> {
        let started = match error {
            Some(msg) => Err(RunResult::invalid(msg)),
            None => self.nodes[i].start(args, reply_to, Instant::now()),
        };
        started.map_err(|result| run_reply(reply_to.1, &result))
    }

    /// The in-process main service's NODE_RUN: the replica's output pipe to
    /// watch; if it cannot start, a `RunFinished` event says why.
    pub(crate) fn run_local(&mut self, i: NodeId, args: RunArgs, archive: &Path) -> Option<RawFd> {
        let ticket = args.ticket;
        let started = match self.nodes[i].adopt_archive(args.ticket, archive) {
            Ok(()) => self.nodes[i].start(args, (LOCAL, 0), Instant::now()),
            Err(e) => Err(RunResult::invalid(format!("the node cannot store the archive: {e}"))),
        };
        match started {
            Ok(fd) => Some(fd),
            Err(result) => {
                self.events.push_back(NodeEvent::RunFinished { node: i, ticket, result });
                None
            }
        }
    }

    /// The in-process main service's NODE_FETCH: the output linked to `into`.
    pub(crate) fn fetch_local(&mut self, i: NodeId, ticket: u32, replica: u32, into: PathBuf) {
        let result = self.nodes[i].link_output(ticket, &into).map(|()| into);
        self.events.push_back(NodeEvent::Fetched { ticket, replica, result });
    }

    /// The in-process main service's NODE_STOP: kill, keep the output.
    pub(crate) fn stop_local(&mut self, i: NodeId, ticket: u32) {
        self.nodes[i].stop_ticket(ticket);
    }

    /// The in-process main service's NODE_DROP.
    pub(crate) fn drop_local(&mut self, i: NodeId, ticket: u32) {
        self.nodes[i].drop_ticket(ticket);
    }

    /// The in-process main service's NODE_WAIT: a replica started by a
    /// direct call reports its end by itself; any other ticket is answered
    /// now with a `RunFinished` event.
    pub(crate) fn wait_local(&mut self, i: NodeId, ticket: u32) {
        if let Some(result) = self.wait(i, (LOCAL, 0), ticket) {
            self.events.push_back(NodeEvent::RunFinished { node: i, ticket, result });
        }
    }

    /// Read a replica's output, a bounded amount per turn of the loop.
    pub(crate) fn drain(&mut self, i: NodeId, ticket: u32) {
        let more = self.nodes[i].drain_output(ticket, DRAIN_BUDGET) == Drained::More;
        if more && !self.more_output.contains(&(i, ticket)) {
            self.more_output.push((i, ticket));
        }
    }

    /// A reaped child: the replica it ended, if it was one of ours.
    pub(crate) fn on_exit(&mut self, pid: Pid, status: WaitStatus) -> Option<(NodeId, Finished)> {
        self.nodes.iter_mut().enumerate().find_map(|(i, n)| n.on_exit(pid, status).map(|fin| (i, fin)))
    }

    /// A finished replica's answer (its output pipe already deregistered):
    /// the NODE_RUN reply and the connection it goes to, or for a direct
    /// call a `RunFinished` event.
    pub(crate) fn finished(&mut self, i: NodeId, fin: Finished) -> Option<(usize, Vec<u8>)> {
        drop(fin.pipe);
        let (key, xid) = fin.reply_to;
        if key == LOCAL {
            self.events.push_back(NodeEvent::RunFinished { node: i, ticket: fin.ticket, result: fin.result });
            return None;
        }
        let reply = run_reply(xid, &fin.result);
        self.ended.insert((i, fin.ticket), fin.result);
        Some((key, reply))
    }

    /// The earliest time limit or cgroup retry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.nodes.iter().filter_map(|n| n.deadline()).min()
    }

    pub(crate) fn on_timer(&mut self, now: Instant) {
        for node in &mut self.nodes {
            if node.deadline().is_some_and(|d| d <= now) {
                node.on_timer(now);
            }
        }
    }

    /// Kill every replica (SIGKILL to each init ends its namespace) and
    /// wait for it; the caller reaps what else is left, then `release`.
    pub(crate) fn kill_all(&mut self) {
        for node in &mut self.nodes {
            for pid in node.shutdown() {
                // Blocking is fine now: SIGKILL to init ends its namespace.
                if let Ok(status) = waitpid(pid, None) {
                    let _ = node.on_exit(pid, status);
                }
            }
        }
    }

    /// After `kill_all` and reaping: remove the groups. The node folders
    /// stay: live tickets' outputs are retrievable after a restart (which
    /// clears the rest).
    pub(crate) fn release(&mut self) {
        for node in &mut self.nodes {
            node.release_groups();
        }
    }
}

/// The GARBAGE_ARGS reply to call `xid`.
pub(crate) fn garbage(xid: u32) -> Vec<u8> {
    rpc::accepted(xid, AcceptStat::GarbageArgs).into_bytes()
}

fn run_reply(xid: u32, result: &RunResult) -> Vec<u8> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    result.encode(&mut w);
    w.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::ExtractLimits;
    use crate::proto::JobState;
    use crate::spawn::JobLimits;
    use std::fs;
    use std::time::Duration;

    fn service(dir: &Path) -> NodeService {
        let limits = JobLimits {
            extract: ExtractLimits { max_bytes: 1 << 20, max_entries: 100, max_path: 255 },
            cpu_seconds: 10,
            address_space: 1 << 30,
            open_files: 64,
            file_size: 1 << 20,
            processes: None,
            nproc_rlimit: false,
            tmp_bytes: 1 << 20,
            disk_bytes: 1 << 20,
        };
        let node = Node::new(NodeConfig {
            port: 9001,
            dir: dir.join("output_9001"),
            limits,
            sandbox: Sandbox { identity: None, isolate_network: false, containment: Containment::Uncontained },
            time_limit: Duration::from_secs(10),
            kill_grace: Duration::from_secs(1),
            max_output: 1 << 20,
            work_dir: dir.to_path_buf(),
            netns: None,
            cgroups: None,
            slot_identities: vec![None],
        })
        .unwrap();
        NodeService {
            nodes: vec![node],
            child_keys: HashMap::new(),
            more_output: Vec::new(),
            events: VecDeque::new(),
            cgroup_summary: String::new(),
            ended: HashMap::new(),
        }
    }

    fn wait_call(ticket: u32) -> Call {
        let mut w = crate::xdr::XdrWriter::new();
        w.u32(ticket);
        Call { xid: 77, proc_num: proto::NODE_WAIT, args: w.into_bytes(), sys_uid: None }
    }

    fn result_of(pieces: Vec<Piece>) -> RunResult {
        let [Piece::Bytes(bytes)] = &pieces[..] else { panic!("{pieces:?}") };
        let (xid, outcome) = rpc::decode_reply(bytes).unwrap();
        assert_eq!(xid, 77);
        let rpc::ReplyOutcome::Success { results_at } = outcome else { panic!("{outcome:?}") };
        RunResult::decode(&mut XdrReader::new(&bytes[results_at..])).unwrap()
    }

    #[test]
    fn node_wait_answers_a_kept_end_at_once_and_an_unknown_ticket_as_node_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        // A replica started over a link ended; its reply may have been lost.
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        let result = RunResult { state: JobState::Completed, exit_code: 0, message: "exit 0".into() };
        let fin = Finished { ticket: 5, reply_to: (3, 9), result: result.clone(), pipe };
        assert!(s.finished(0, fin).is_some(), "the NODE_RUN reply goes to its link");
        // A new main server asks: answered at once, as the replica ended.
        assert_eq!(result_of(s.serve_call(0, 4, wait_call(5)).expect("not deferred")), result);
        // Asked again (a second restart): still known.
        assert_eq!(result_of(s.serve_call(0, 4, wait_call(5)).unwrap()), result);
        // Unknown ticket: INVALID, node lost.
        let lost = result_of(s.serve_call(0, 4, wait_call(6)).unwrap());
        assert_eq!(lost.state, JobState::Invalid);
        assert!(lost.message.starts_with("node lost:") && lost.message.contains("ticket 6"), "{}", lost.message);
        // NODE_DROP forgets it.
        let mut w = crate::xdr::XdrWriter::new();
        w.u32(5);
        let drop_call = Call { xid: 78, proc_num: proto::NODE_DROP, args: w.into_bytes(), sys_uid: None };
        assert!(s.serve_call(0, 4, drop_call).is_some());
        assert_eq!(result_of(s.serve_call(0, 4, wait_call(5)).unwrap()).state, JobState::Invalid);
        // The in-process form answers with an event.
        s.wait_local(0, 6);
        assert!(
            matches!(s.events.pop_front(), Some(NodeEvent::RunFinished { ticket: 6, result, .. }) if result.message.starts_with("node lost"))
        );
    }

    #[test]
    fn a_node_folder_keeps_live_tickets_outputs_and_trashes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let node_dir = dir.path().join("output_9001");
        for t in ["1", "2", "3"] {
            fs::create_dir_all(node_dir.join(t).join("work/deep")).unwrap();
            fs::write(node_dir.join(t).join("output.txt"), t).unwrap();
            fs::write(node_dir.join(t).join("job.tar.gz"), "x").unwrap();
        }
        fs::write(node_dir.join("stray"), "x").unwrap();
        let trash = dir.path().join("trash");
        let moved = crate::node::sweep_dir(&node_dir, &trash, "9001", |t| t == 2).unwrap();
        assert_eq!(moved, 4, "tickets 1 and 3, the stray file, ticket 2's workspace");
        let mut left: Vec<_> = fs::read_dir(&node_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["2"]);
        assert_eq!(fs::read_to_string(node_dir.join("2/output.txt")).unwrap(), "2");
        assert!(!node_dir.join("2/job.tar.gz").exists() && !node_dir.join("2/work").exists());
        // Again, with the same names in the trash already: no clash.
        fs::create_dir_all(node_dir.join("1")).unwrap();
        assert_eq!(crate::node::sweep_dir(&node_dir, &trash, "9001", |t| t == 2).unwrap(), 1);
        assert_eq!(fs::read_dir(&trash).unwrap().count(), 5);
        // No folder yet: nothing to do.
        assert_eq!(crate::node::sweep_dir(&dir.path().join("none"), &trash, "x", |_| true).unwrap(), 0);
    }
}
