//! The node role: NODE_PROG calls in, replicas run, their ends reported.
//!
//! Owns: the side nodes of this process (`node::Node`, one per node line
//! run here) and their start-up (reclaiming what an earlier run left under
//! the slot uids, one empty network namespace per slot, cgroups, the
//! containment probe, each slot's launcher); NODE_NULL, NODE_RUN (the archive streamed into the
//! node's `<ticket>.tar.gz`, a file of its pool, then `Node::start`), NODE_FETCH and NODE_DROP served
//! over a link (the reactor's `NodeGate` has let them through when there
//! is a secret; without one, NODE_HELLO is answered "no --secret-file"); the same three as direct calls from the in-process main
//! service (`run_local`, `fetch_local`, `drop_local`: the spooled archive
//! and the output are used in place, no link, no copy, no loopback round
//! trip; a Slurm node's are linked or copied), whose answers
//! come back as [`NodeEvent`]s, the events a link's replies would make;
//! draining each replica's output pipe (a launched replica ends at its
//! end of file: `drain` returns it to the reactor); reaped children turned into
//! finished replicas, then into NODE_RUN replies or events; time limits;
//! killing and reaping everything at shutdown (node folders stay); the
//! result of every replica started over a link, until NODE_DROP, for
//! NODE_WAIT (a main server that restarted asks how it ended; deferred
//! while it runs); at start, clearing node folders of all but the live
//! tickets' (the journal's), the rest removed by a child.
//! A replica whose link goes away keeps running (a main server that comes
//! back asks for it with NODE_WAIT; one that does not want it any more
//! sends NODE_DROP); its reply is never sent on a newer connection.
//! Stages ([`Stage`], docs/PROTOCOL.md "Staged transfers"): NODE_STAGE's
//! bytes in a file of the node folder's pool, per link connection, until
//! NODE_RUN_STAGED runs the replica from it (renamed to the ticket's
//! archive) or NODE_UNSTAGE, the link's end, a newer link's NODE_KEEP or
//! `STAGE_ABANDONED` drops it.
//! Slurm nodes (`slurm:PARTITION` lines of the main server, `add_slurm`)
//! sit next to the forking ones as [`LocalNode::Slurm`]: the same direct
//! calls and [`NodeEvent`]s; the pipes of their Slurm commands are handed
//! to the reactor to register (`take_new_pipes`), the reaper's pids go to
//! them too (`Reaped::Command`), their deadlines join `next_deadline`;
//! NODE_STOP and NODE_DROP become scancel.
//! Must not touch: the poll or the slab (the reactor registers each
//! replica's output pipe and each Slurm command's pipe under the key it is
//! given here and routes replies), the job table (`coordinator`), process
//! setup (`spawn`), Slurm's commands and states (`slurm`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::conn::{Sink, Streamed};
use crate::coordinator::Caller;
use crate::node::{Drained, Finished, Node, NodeConfig, ReplyTo};
use crate::proto::{self, Chunk, CloudStat, RunArgs, RunResult};
use crate::record::{self, Piece};
use crate::rpc::{self, AcceptStat};
use crate::scheduler::NodeId;
use crate::server::ServerConfig;
use crate::session::Call;
use crate::slurm::{SlurmConfig, SlurmFinished, SlurmLine, SlurmNode};
use crate::spawn::{Containment, Sandbox};
use crate::xdr::XdrReader;

/// Chunks (64 KiB each) read from one replica's output per turn of the loop.
const DRAIN_BUDGET: usize = 4;

/// A Slurm node waits at least this long for Slurm to confirm a scancel
/// before it gives the replica up (`--kill-grace` if longer).
const SLURM_KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// `Node::start`'s reply-to for a replica started by a direct call: no
/// connection has this key (slab keys are small), the answer is an event.
const LOCAL: usize = usize::MAX;

/// A parked NODE_FOLLOW's reply-to for a FOLLOW of the in-process main
/// service's client on connection `c`: key `LOCAL_CALLERS + c` (no slab key
/// is that large), the answer an event.
const LOCAL_CALLERS: usize = usize::MAX / 4;

/// A stage no NODE_STAGE has added to for this long is dropped: its main
/// server forgot it (it drops its stages itself when an upload ends, and
/// they all go when its link does).
const STAGE_ABANDONED: std::time::Duration = std::time::Duration::from_secs(600);

/// Most stages one link may hold at once (its main server opens one per
/// upload its node has a free slot for).
const MAX_STAGES: usize = 64;

/// Part of an archive its main server sends while the client still
/// uploads it (NODE_STAGE), in a file of the node's archive pool
/// (`stage-<n>` where its archives live: its own tmpfs when it has one,
/// else its folder), until NODE_RUN_STAGED takes it or NODE_UNSTAGE, the end
/// of its link, NODE_KEEP on a newer link or `STAGE_ABANDONED` drops it.
#[derive(Debug)]
pub(crate) struct Stage {
    node: NodeId,
    path: PathBuf,
    file: fs::File,
    /// Bytes stored: the next NODE_STAGE continues here.
    len: u64,
    /// Why the stage cannot be run (a write failed, bytes out of order).
    failed: Option<String>,
    touched: Instant,
}

/// What an in-process node answers the main service: the events a link's
/// NODE_RUN and NODE_FETCH replies would make.
#[derive(Debug)]
pub(crate) enum NodeEvent {
    /// A replica started by `run_local` on the service's node `node` (its
    /// index here, not the coordinator's) ended, or could not start.
    RunFinished { node: usize, ticket: u32, result: RunResult },
    /// What a Slurm node learnt about a running replica (its Slurm job id,
    /// its state there): the replica's status message until it ends.
    Note { node: usize, ticket: u32, message: String },
    /// `fetch_local`'s answer: where the output is, or why not
    /// (`gone`: the node has none for good; else a retry may work).
    Fetched { ticket: u32, replica: u32, result: Result<PathBuf, (bool, String)> },
    /// `follow_local`'s answer: output from the offset and whether the
    /// replica has ended, or why not.
    Followed { caller: Caller, result: Result<Chunk, String> },
}

/// One node of this process: replicas forked here, or handed to Slurm.
#[derive(Debug)]
pub(crate) enum LocalNode {
    Fork(Node),
    /// Only in the main server (its `slurm:PARTITION` lines): called
    /// directly, never over a link.
    Slurm(SlurmNode),
}

impl LocalNode {
    fn prepare_archive(&self, ticket: u32, len: u64) -> std::io::Result<crate::pool::Taken> {
        match self {
            LocalNode::Fork(n) => n.prepare_archive(ticket, len),
            LocalNode::Slurm(n) => {
                n.prepare_archive(ticket).map(|(file, path)| crate::pool::Taken { file, path, spare: false })
            }
        }
    }

    fn fetch(&self, ticket: u32) -> Result<(fs::File, u64), (bool, String)> {
        match self {
            LocalNode::Fork(n) => n.fetch(ticket),
            LocalNode::Slurm(n) => n.fetch(ticket),
        }
    }

    /// The output for an in-process main service: a forking node's in
    /// place, a Slurm node's linked (or copied) to `into`.
    fn output_for_main(&self, ticket: u32, into: PathBuf) -> Result<PathBuf, (bool, String)> {
        match self {
            LocalNode::Fork(n) => n.output_in_place(ticket),
            LocalNode::Slurm(n) => n.link_output(ticket, &into).map(|()| into),
        }
    }

    /// Kill (a Slurm node: scancel) the ticket's replica, keep its output.
    fn stop_ticket(&mut self, ticket: u32) {
        match self {
            LocalNode::Fork(n) => n.stop_ticket(ticket),
            LocalNode::Slurm(n) => n.stop_ticket(ticket, Instant::now()),
        }
    }

    /// Forget the ticket (a running replica is killed or scancelled first).
    /// NODE_FOLLOW: output from `offset` now, or `None`: parked until there
    /// is some (`ready_followers`). A Slurm node's output is not followed.
    fn follow(&mut self, ticket: u32, offset: u64, reply_to: ReplyTo) -> Option<Result<Chunk, String>> {
        match self {
            LocalNode::Fork(n) => n.follow(ticket, offset, reply_to),
            LocalNode::Slurm(_) => {
                Some(Err("a replica on a Slurm node cannot be followed: retrieve its output when it ends".into()))
            }
        }
    }

    /// NODE_WAIT on a running replica: its reply goes to `reply_to` now.
    fn rewait(&mut self, ticket: u32, reply_to: ReplyTo) -> bool {
        match self {
            LocalNode::Fork(n) => n.rewait(ticket, reply_to),
            LocalNode::Slurm(_) => false,
        }
    }

    fn ready_followers(&mut self) -> Vec<(ReplyTo, Result<Chunk, String>)> {
        match self {
            LocalNode::Fork(n) => n.ready_followers(),
            LocalNode::Slurm(_) => Vec::new(),
        }
    }

    fn name(&self) -> String {
        match self {
            LocalNode::Fork(n) => n.name(),
            LocalNode::Slurm(n) => n.name(),
        }
    }

    fn drop_ticket(&mut self, ticket: u32) {
        match self {
            LocalNode::Fork(n) => n.drop_ticket(ticket),
            LocalNode::Slurm(n) => n.drop_ticket(ticket, Instant::now()),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            LocalNode::Fork(n) => n.deadline(),
            LocalNode::Slurm(n) => n.deadline(),
        }
    }
}

/// A child the reaper handed to the node service.
#[derive(Debug)]
pub(crate) enum Reaped {
    /// A forking node's replica ended.
    Replica(NodeId, Finished),
    /// One of a Slurm node's commands ended: its pipe, to deregister (its
    /// replicas that ended are already `RunFinished` events).
    Command(OwnedFd),
}

pub(crate) struct NodeService {
    pub(crate) nodes: Vec<LocalNode>,
    /// Slab key of each running replica's output pipe, by (node, ticket).
    pub(crate) child_keys: HashMap<(NodeId, u32), usize>,
    /// Replicas whose output pipe still had data when their read budget ran out.
    pub(crate) more_output: Vec<(NodeId, u32)>,
    /// Answers to direct calls, for the in-process main service.
    pub(crate) events: VecDeque<NodeEvent>,
    /// Replicas (node, ticket, reply-to) whose link is gone: their NODE_RUN reply
    /// is dropped, never sent on a newer connection that reuses the key.
    orphans: Vec<(usize, u32, ReplyTo)>,
    /// What containment the host gives replicas here, for the ready line.
    pub(crate) cgroup_summary: String,
    /// Slab key of each Slurm command's pipe, by its fd.
    pub(crate) command_keys: HashMap<RawFd, usize>,
    /// Slurm commands' pipes not yet registered with the poll (node, fd).
    new_pipes: Vec<(NodeId, RawFd)>,
    /// The Slurm nodes' names, for the ready line.
    slurm_names: Vec<String>,
    /// NODE_FOLLOW replies to send on links: (connection key, record).
    pub(crate) follow_replies: Vec<(usize, Vec<u8>)>,
    /// How each replica started over a link ended, kept until NODE_DROP:
    /// its NODE_RUN reply may not have reached a main server that died or
    /// restarted, which asks again with NODE_WAIT.
    pub(crate) ended: HashMap<(NodeId, u32), RunResult>,
    /// Stages by (link connection, stage id): a stage is its link's alone.
    stages: HashMap<(usize, u32), Stage>,
    /// The number in the next stage file's name.
    next_stage_file: u64,
    /// Most bytes a stage may hold (`--max-archive`).
    pub(crate) max_stage: u64,
}

impl NodeService {
    /// A node service of `nodes`, nothing running yet.
    fn with_nodes(nodes: Vec<LocalNode>, cgroup_summary: String) -> NodeService {
        NodeService {
            nodes,
            child_keys: HashMap::new(),
            more_output: Vec::new(),
            events: VecDeque::new(),
            orphans: Vec::new(),
            cgroup_summary,
            command_keys: HashMap::new(),
            new_pipes: Vec::new(),
            slurm_names: Vec::new(),
            follow_replies: Vec::new(),
            ended: HashMap::new(),
            stages: HashMap::new(),
            next_stage_file: 1,
            max_stage: u64::from(u32::MAX),
        }
    }

    /// Prepare the host and create node `i` for each of `ports` under
    /// `work_dir` (absolute). A node's folder keeps the tickets of `live`
    /// (jobs restored from the journal: their outputs stay retrievable);
    /// everything else in it is removed by a child. Errors are one line for
    /// the operator.
    pub(crate) fn start(
        cfg: &ServerConfig,
        work_dir: &Path,
        ports: &[(u16, u32)],
        live: &dyn Fn(u32) -> bool,
    ) -> Result<NodeService, String> {
        let n = ports.len();
        if n == 0 {
            return Ok(NodeService::with_nodes(Vec::new(), "no local nodes".to_string()));
        }
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
        // One empty network namespace per slot, made once: each replica's
        // init joins its slot's with setns (cheaper than a new one each),
        // and replicas running at once on one node never share loopback.
        let mut netns = Vec::with_capacity(n);
        for &(_, slots) in ports {
            let mut per_slot = Vec::with_capacity(slots as usize);
            for _ in 0..slots {
                let ns = (cfg.isolate_network && cfg.containment == Containment::Namespaces)
                    .then(crate::spawn::empty_network)
                    .transpose()?;
                per_slot.push(ns.map(std::rc::Rc::new));
            }
            netns.push(per_slot);
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
        let probe_ns =
            netns.first().and_then(|n| n.first()).and_then(|ns| ns.as_deref()).map(|fd| std::os::fd::AsFd::as_fd(fd));
        crate::spawn::probe(sandbox, &limits, work_dir, probe_ns, cgroups.as_deref())?;

        let mut nodes = Vec::with_capacity(n);
        // What an earlier run left and no live ticket needs goes here, then
        // is removed by a child: it may be large (uncontained workspaces).
        let trash = work_dir.join("trash");
        let mut trashed = 0;
        // Node i's slots take the next `slots` identities, node by node.
        let mut first_slot = 0;
        for (i, &(port, slots)) in ports.iter().enumerate() {
            let slot_identities: Vec<_> =
                (first_slot..first_slot + slots as usize).map(|s| cfg.identities.get(s).copied().flatten()).collect();
            first_slot += slots as usize;
            let dir = work_dir.join(format!("output_{port}"));
            trashed += crate::node::sweep_dir(&dir, &trash, &format!("{port}"), live)
                .map_err(|e| format!("cannot clear node directory {}: {e}", dir.display()))?;
            let mut node = Node::new(NodeConfig {
                port,
                dir: dir.clone(),
                limits: limits.clone(),
                sandbox: sandbox_for(slot_identities.first().copied().flatten()),
                time_limit: cfg.time_limit,
                kill_grace: cfg.kill_grace,
                max_output: cfg.max_output,
                work_dir: work_dir.to_path_buf(),
                netns: netns[i].clone(),
                cgroups: cgroups.clone(),
                slot_identities,
            })
            .map_err(|e| format!("cannot create node directory {}: {e}", dir.display()))?;
            node.start_launchers()?;
            nodes.push(LocalNode::Fork(node));
        }
        if trashed > 0 || trash.exists() {
            match crate::spawn::remove_tree_in_background(&trash) {
                Ok(pid) => log::debug!("removing {trashed} stale entries of node folders in pid {pid}"),
                Err(e) => log::warn!("cannot fork to remove {}: {e}", trash.display()),
            }
        }
        let mut service = NodeService::with_nodes(nodes, cgroup_summary);
        service.max_stage = cfg.max_archive;
        Ok(service)
    }

    /// A `cloud-server node`: the archives its main server sends are kept
    /// in a tmpfs of the process's own where it may mount one
    /// (`node::archive_tmpfs`: room for two archives of `max_archive` per
    /// slot), else in the node's folder as before.
    pub(crate) fn archives_in_memory(&mut self, max_archive: u64) {
        for node in &mut self.nodes {
            let LocalNode::Fork(n) = node else { continue };
            let bytes = max_archive.saturating_mul(2 * n.slots() as u64);
            let dir = n.cfg.work_dir.join(format!("archives_{}", n.cfg.port));
            match crate::node::archive_tmpfs(&dir, bytes) {
                Ok(()) => {
                    log::debug!("{}: archives kept in a tmpfs of its own at {}", n.name(), dir.display());
                    n.keep_archives_in(&dir);
                }
                Err(why) => log::debug!("{}: archives kept in its folder: {why}", n.name()),
            }
        }
    }

    /// Add a Slurm node (a main server's `slurm:PARTITION [slots=K]` line,
    /// shown as `name`), its folder `<work_dir>/slurm_<name after slurm:>`;
    /// returns its index here. Its replicas run as this server's user
    /// under Slurm: no slot uid, none of our sandbox.
    pub(crate) fn add_slurm(
        &mut self,
        cfg: &ServerConfig,
        work_dir: &Path,
        name: &str,
        line: SlurmLine,
    ) -> Result<usize, String> {
        let dir = work_dir.join(format!("slurm_{}", name.strip_prefix("slurm:").unwrap_or(name)));
        let _ = fs::remove_dir_all(&dir); // stale folders of an earlier run
        let mut scfg = SlurmConfig::new(line, dir.clone(), cfg.time_limit);
        // Slurm confirms a cancel on its own schedule (its KillWait): give it
        // at least SLURM_KILL_GRACE before a replica is given up.
        scfg.kill_grace = cfg.kill_grace.max(SLURM_KILL_GRACE);
        scfg.max_output = cfg.max_output;
        let node = SlurmNode::new(scfg).map_err(|e| format!("cannot create node directory {}: {e}", dir.display()))?;
        self.nodes.push(LocalNode::Slurm(node));
        self.slurm_names.push(name.to_string());
        Ok(self.nodes.len() - 1)
    }

    /// Say in the ready line which nodes are Slurm's and how their replicas
    /// run (after the last `add_slurm`).
    pub(crate) fn note_slurm(&mut self) {
        if self.slurm_names.is_empty() {
            return;
        }
        let me = nix::unistd::Uid::effective();
        let note = format!(
            "Slurm nodes {}: replicas run in Slurm as uid {me} (this server's user), under Slurm's limits, \
             not in our sandbox",
            self.slurm_names.join(" ")
        );
        self.cgroup_summary =
            if self.nodes.len() == self.slurm_names.len() { note } else { format!("{}; {note}", self.cgroup_summary) };
    }

    /// Pipes of Slurm commands started since the last call, to register:
    /// (node, fd). Each stays open until `Reaped::Command` hands it back.
    pub(crate) fn take_new_pipes(&mut self) -> Vec<(NodeId, RawFd)> {
        std::mem::take(&mut self.new_pipes)
    }

    /// Collect the pipes node i's commands opened and what it learnt about
    /// its replicas (after every call into it).
    fn collect_pipes(&mut self, i: NodeId) {
        if let LocalNode::Slurm(n) = &mut self.nodes[i] {
            self.new_pipes.extend(n.take_new_pipes().into_iter().map(|fd| (i, fd)));
            for (ticket, message) in n.take_notes() {
                self.events.push_back(NodeEvent::Note { node: i, ticket, message });
            }
        }
    }

    /// A Slurm command's pipe is readable.
    pub(crate) fn command_readable(&mut self, i: NodeId, fd: RawFd) {
        if let Some(LocalNode::Slurm(n)) = self.nodes.get_mut(i) {
            n.on_readable(fd);
        }
    }

    /// Replicas a Slurm node says have ended: events for the main service.
    fn slurm_finished(&mut self, i: NodeId, finished: Vec<SlurmFinished>) {
        for f in finished {
            if f.reply_to.0 != LOCAL {
                // Slurm nodes take direct calls only (see `run_received`).
                log::error!("node {i}: a Slurm replica of ticket {} had a link's reply-to; dropped", f.ticket);
                continue;
            }
            self.events.push_back(NodeEvent::RunFinished { node: i, ticket: f.ticket, result: f.result });
        }
    }

    /// Whether a Slurm command (a scancel at shutdown, ...) still runs.
    pub(crate) fn commands_running(&self) -> bool {
        self.nodes.iter().any(|n| matches!(n, LocalNode::Slurm(s) if !s.command_pids().is_empty()))
    }

    /// Shutdown, after waiting for them as long as it could: SIGKILL every
    /// Slurm command still running; returns their pids to reap.
    pub(crate) fn kill_commands(&mut self) -> Vec<Pid> {
        let pids: Vec<Pid> = self
            .nodes
            .iter()
            .flat_map(|n| match n {
                LocalNode::Slurm(s) => s.command_pids(),
                LocalNode::Fork(_) => Vec::new(),
            })
            .collect();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        pids
    }

    /// A whole (non-streamed) call from the main server to node i, on
    /// connection `key`: the reply, or `None` when it is deferred (a
    /// NODE_WAIT for a replica still running is answered when it ends).
    pub(crate) fn serve_call(&mut self, i: NodeId, key: usize, call: Call) -> Option<Vec<Piece>> {
        let xid = call.xid;
        if let (proto::NODE_WAIT, Ok(ticket)) = (call.proc_num, XdrReader::new(&call.args).u32()) {
            return self.wait(i, (key, xid), ticket).map(|result| vec![Piece::Bytes(run_reply(xid, &result))]);
        }
        if call.proc_num == proto::NODE_UNSTAGE {
            let mut w = rpc::accepted(xid, AcceptStat::Success);
            let Ok(stage) = XdrReader::new(&call.args).u32() else { return Some(vec![Piece::Bytes(garbage(xid))]) };
            self.drop_stages(|&(k, s), st| k == key && s == stage && st.node == i, "its main server dropped it");
            w.u32(CloudStat::Ok as u32);
            return Some(vec![Piece::Bytes(w.into_bytes())]);
        }
        if call.proc_num == proto::NODE_KEEP {
            // A main server that comes up again wants no stage of an older link.
            self.drop_stages(|&(k, _), st| k != key && st.node == i, "a newer link of its main server is up");
        }
        Some(self.serve_now(i, call))
    }

    /// NODE_WAIT: how the ticket's replica ended, now (`Some`) or, while it
    /// runs, once it ends (sent to `reply_to`; `None`). A ticket the node
    /// does not know ends INVALID "node lost".
    fn wait(&mut self, i: NodeId, reply_to: ReplyTo, ticket: u32) -> Option<RunResult> {
        // Its old reply-to (a link that is gone) is no longer an orphan: a
        // new link may reuse that connection key and xid.
        if let LocalNode::Fork(node) = &self.nodes[i] {
            if let Some(&(_, old)) = node.running().iter().find(|(t, _)| *t == ticket) {
                self.orphans.retain(|&o| o != (i, ticket, old));
            }
        }
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
            // Only a node without a secret gets here with it (`node_auth`).
            (proto::NODE_HELLO, _) => vec![Piece::Bytes(crate::node_auth::hello_refused_without_secret(xid))],
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
            (proto::NODE_KEEP, _) => match proto::decode_tickets_list(&mut XdrReader::new(&call.args)) {
                Ok(keep) => {
                    self.keep_only(i, &keep.into_iter().collect());
                    w.u32(CloudStat::Ok as u32);
                    vec![Piece::Bytes(w.into_bytes())]
                }
                Err(_) => vec![Piece::Bytes(garbage(xid))],
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

    /// Where a NODE_STAGE's bytes stream to (stage `stage` of the link on
    /// connection `key`, made at offset 0), or the GARBAGE_ARGS reply. Bytes
    /// the node cannot take (no such stage, out of order, over
    /// `--max-archive`, a failed stage) are swallowed; the reply says so.
    pub(crate) fn stage_sink(&mut self, i: NodeId, key: usize, call: &Call, len: u32) -> Result<Sink, Vec<u8>> {
        let args = proto::StageArgs::decode(&mut XdrReader::new(&call.args)).map_err(|_| garbage(call.xid))?;
        let what = Streamed::Stage { args, len: u64::from(len) };
        let id = (key, args.stage);
        let LocalNode::Fork(node) = &self.nodes[i] else {
            return Ok(Sink::failed(call.xid, what, "a Slurm node takes no stages".into()));
        };
        let now = Instant::now();
        if args.offset == 0 && !self.stages.contains_key(&id) {
            if self.stages.keys().filter(|(k, _)| *k == key).count() >= MAX_STAGES {
                return Ok(Sink::failed(call.xid, what, format!("more than {MAX_STAGES} stages on one link")));
            }
            // Where the ticket's archive will be (a node's own tmpfs, if
            // it has one), so that NODE_RUN_STAGED renames it there.
            let path = node.archive_dir().join(format!("stage-{}", self.next_stage_file));
            self.next_stage_file += 1;
            let taken = node.archive_pool().borrow_mut().take_as(&path);
            match taken {
                Ok(file) => {
                    log::debug!("{}: stage {} of connection {key} begins", node.name(), args.stage);
                    let stage = Stage { node: i, path, file, len: 0, failed: None, touched: now };
                    self.stages.insert(id, stage);
                }
                Err(e) => {
                    log::warn!("{}: cannot store a stage: {e}", node.name());
                    return Ok(Sink::failed(call.xid, what, format!("the node cannot store the archive: {e}")));
                }
            }
        }
        let Some(st) = self.stages.get_mut(&id).filter(|st| st.node == i) else {
            return Ok(Sink::failed(call.xid, what, format!("no stage {} on this link", args.stage)));
        };
        st.touched = now;
        let end = args.offset.saturating_add(u64::from(len));
        let why = if let Some(why) = &st.failed {
            why.clone()
        } else if args.offset != st.len {
            format!("bytes at {} where the stage holds {}", args.offset, st.len)
        } else if end > self.max_stage {
            format!("the archive is over --max-archive ({} bytes)", self.max_stage)
        } else {
            match st.file.try_clone() {
                // The stage's own file: an empty path, nothing the sink may remove.
                Ok(file) => {
                    return Ok(Sink::File {
                        xid: call.xid,
                        what,
                        file: Some(file),
                        path: PathBuf::new(),
                        error: None,
                        pool: None,
                        cut: false,
                    })
                }
                Err(e) => format!("the node cannot store the archive: {e}"),
            }
        };
        st.failed.get_or_insert_with(|| why.clone());
        Ok(Sink::failed(call.xid, what, why))
    }

    /// A NODE_STAGE's bytes have arrived (or failed to, `error`): its reply.
    pub(crate) fn stage_received(
        &mut self,
        key: usize,
        xid: u32,
        args: proto::StageArgs,
        len: u64,
        error: Option<String>,
    ) -> Vec<u8> {
        let mut w = rpc::accepted(xid, AcceptStat::Success);
        let stat = match (self.stages.get_mut(&(key, args.stage)), error) {
            (Some(st), None) => {
                st.len += len;
                CloudStat::Ok
            }
            (Some(st), Some(why)) => {
                log::warn!("stage {} of connection {key}: {why}", args.stage);
                st.failed.get_or_insert(why);
                CloudStat::Internal
            }
            (None, _) => CloudStat::NoSuchTicket,
        };
        w.u32(stat as u32);
        w.into_bytes()
    }

    /// NODE_RUN_STAGED on the link of connection `key`: node i runs the
    /// replica from the stage, which becomes the ticket's archive. The
    /// ticket and its output pipe to watch, or the reply to send now (a
    /// stage missing, failed or not whole: INVALID, as NODE_RUN would be).
    pub(crate) fn run_staged(&mut self, i: NodeId, key: usize, call: &Call) -> Result<(u32, RawFd), Vec<u8>> {
        let xid = call.xid;
        let a = proto::RunStagedArgs::decode(&mut XdrReader::new(&call.args)).map_err(|_| garbage(xid))?;
        let name = self.nodes[i].name();
        let stage = self.stages.remove(&(key, a.stage));
        let invalid = |msg: String| Err(run_reply(xid, &RunResult::invalid(msg)));
        let LocalNode::Fork(node) = &mut self.nodes[i] else {
            return invalid(format!("{name} takes calls only from its own main server"));
        };
        let Some(st) = stage.filter(|st| st.node == i) else {
            return invalid(format!("{name} has no staged archive {} on this link", a.stage));
        };
        let Stage { path, file, len, failed, .. } = st;
        drop(file);
        let why = match failed {
            Some(why) => Some(why),
            None if len != a.length => Some(format!("the staged archive holds {len} of its {} bytes", a.length)),
            None => {
                node.adopt_stage(a.run.ticket, &path).err().map(|e| format!("the node cannot store the archive: {e}"))
            }
        };
        if let Some(why) = why {
            node.archive_pool().borrow_mut().give(&path);
            return invalid(why);
        }
        node.start(a.run, None, (key, xid), Instant::now()).map(|fd| (a.run.ticket, fd)).map_err(|r| run_reply(xid, &r))
    }

    /// Drop the stages `which` picks: their files go back to their pools
    /// (a large one removed by a child).
    fn drop_stages(&mut self, which: impl Fn(&(usize, u32), &Stage) -> bool, why: &str) {
        let gone: Vec<(usize, u32)> = self.stages.iter().filter(|(id, st)| which(id, st)).map(|(id, _)| *id).collect();
        for id in gone {
            let Some(st) = self.stages.remove(&id) else { continue };
            let Stage { node, path, file, len, .. } = st;
            drop(file);
            log::debug!("stage {} of connection {}: dropped ({why}), {len} bytes", id.1, id.0);
            if let Some(LocalNode::Fork(n)) = self.nodes.get(node) {
                n.archive_pool().borrow_mut().give(&path);
            }
        }
    }

    /// Where a NODE_RUN's archive (of `len` bytes) streams to, or the
    /// GARBAGE_ARGS reply.
    pub(crate) fn run_sink(&mut self, i: NodeId, call: &Call, len: u32) -> Result<Sink, Vec<u8>> {
        let args = RunArgs::decode(&mut XdrReader::new(&call.args)).map_err(|_| garbage(call.xid))?;
        let ticket = args.ticket;
        let what = Streamed::Run { args };
        let pool = match &self.nodes[i] {
            LocalNode::Fork(n) => Some(n.archive_pool()),
            LocalNode::Slurm(_) => None,
        };
        Ok(match self.nodes[i].prepare_archive(ticket, u64::from(len)) {
            Ok(crate::pool::Taken { file, path, spare }) => {
                Sink::File { xid: call.xid, what, file: Some(file), path, error: None, pool, cut: spare }
            }
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
        let started = match (error, &mut self.nodes[i]) {
            (Some(msg), _) => Err(RunResult::invalid(msg)),
            (None, LocalNode::Fork(node)) => node.start(args, None, reply_to, Instant::now()),
            (None, LocalNode::Slurm(node)) => {
                Err(RunResult::invalid(format!("{} takes calls only from its own main server", node.name())))
            }
        };
        started.map_err(|result| run_reply(reply_to.1, &result))
    }

    /// The in-process main service's NODE_RUN: the replica's output pipe to
    /// watch; if it cannot start, a `RunFinished` event says why.
    pub(crate) fn run_local(&mut self, i: NodeId, args: RunArgs, archive: &Path) -> Option<RawFd> {
        let ticket = args.ticket;
        let now = Instant::now();
        // A forking node's replica reads the spooled archive in place (the
        // main service keeps it until the job has finished); Slurm's
        // folder is shared with its cluster: a copy goes there.
        let started = match &mut self.nodes[i] {
            LocalNode::Fork(node) => node.start(args, Some(archive), (LOCAL, 0), now).map(Some),
            LocalNode::Slurm(node) => match node.adopt_archive(args.ticket, archive) {
                Ok(()) => node.start(args, (LOCAL, 0), now).map(|()| None),
                Err(e) => Err(RunResult::invalid(format!("the node cannot store the archive: {e}"))),
            },
        };
        self.collect_pipes(i);
        match started {
            Ok(fd) => fd,
            Err(result) => {
                self.events.push_back(NodeEvent::RunFinished { node: i, ticket, result });
                None
            }
        }
    }

    /// The in-process main service's NODE_FETCH: where the output is.
    pub(crate) fn fetch_local(&mut self, i: NodeId, ticket: u32, replica: u32, into: PathBuf) {
        let result = self.nodes[i].output_for_main(ticket, into);
        self.events.push_back(NodeEvent::Fetched { ticket, replica, result });
    }

    /// The in-process main service's NODE_STOP: kill (scancel), keep the output.
    pub(crate) fn stop_local(&mut self, i: NodeId, ticket: u32) {
        self.nodes[i].stop_ticket(ticket);
        self.collect_pipes(i);
    }

    /// Closed tickets' outputs back to their pools: the main server's
    /// journal has their CLOSE records on disk (or this is a `cloud-server
    /// node`, whose main server answered the CLOSE before it dropped).
    pub(crate) fn settle_outputs(&mut self) {
        for node in &self.nodes {
            if let LocalNode::Fork(n) = node {
                n.pool.borrow_mut().settle();
            }
        }
    }

    /// The output pools of the forking nodes (the main service settles
    /// them after its journal's syncs).
    pub(crate) fn output_pools(&self) -> Vec<crate::pool::Shared> {
        let pools = self.nodes.iter().filter_map(|n| match n {
            LocalNode::Fork(n) => Some(n.pool.clone()),
            _ => None,
        });
        pools.collect()
    }

    /// The in-process main service's NODE_DROP.
    pub(crate) fn drop_local(&mut self, i: NodeId, ticket: u32) {
        self.nodes[i].drop_ticket(ticket);
        self.collect_pipes(i);
    }

    /// The main server's link on connection `key` is gone: the replicas it
    /// started keep running (a main server that comes back asks how they
    /// end with NODE_WAIT, or drops them); their NODE_RUN replies are kept
    /// (`ended`), never sent on a newer connection that reuses the key.
    pub(crate) fn link_closed(&mut self, key: usize) {
        // Its stages are its own: gone with it.
        self.drop_stages(|&(k, _), _| k == key, "its link is gone");
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let LocalNode::Fork(node) = node else { continue }; // direct calls only
            for (ticket, reply_to) in node.running() {
                if reply_to.0 == key {
                    log::warn!(
                        "{}: the main server's link is gone; ticket {ticket}'s replica runs on until it asks again or drops it",
                        node.name()
                    );
                    self.orphans.push((i, ticket, reply_to));
                }
            }
        }
    }

    /// NODE_KEEP: drop every ticket node i holds (running, or ended with
    /// its folder) but those in `keep`.
    fn keep_only(&mut self, i: NodeId, keep: &HashSet<u32>) {
        let LocalNode::Fork(node) = &mut self.nodes[i] else { return };
        for ticket in node.tickets() {
            if !keep.contains(&ticket) {
                log::info!("{}: ticket {ticket}: its main server does not want it (any more): dropped", node.name());
                self.ended.remove(&(i, ticket));
                node.drop_ticket(ticket);
            }
        }
    }

    /// The in-process main service's NODE_WAIT: a replica started by a
    /// direct call reports its end by itself; any other ticket is answered
    /// now with a `RunFinished` event.
    pub(crate) fn wait_local(&mut self, i: NodeId, ticket: u32) {
        if let Some(result) = self.wait(i, (LOCAL, 0), ticket) {
            self.events.push_back(NodeEvent::RunFinished { node: i, ticket, result });
        }
    }

    /// Read a replica's output, a bounded amount per turn of the loop; its
    /// parked followers get what is new.
    /// Read a replica's output pipe; a launched replica whose pipe has
    /// reached its end has ended: returned, for the reactor to finish.
    pub(crate) fn drain(&mut self, i: NodeId, ticket: u32) -> Option<Finished> {
        let LocalNode::Fork(node) = &mut self.nodes[i] else { return None };
        let drained = node.drain_output(ticket, DRAIN_BUDGET);
        if drained == Drained::More && !self.more_output.contains(&(i, ticket)) {
            self.more_output.push((i, ticket));
        }
        let ended = if drained == Drained::Closed { node.output_closed(ticket) } else { None };
        self.answer_followers(i);
        ended
    }

    /// NODE_FOLLOW on a link (connection `key`): the reply now, or `None`
    /// if parked until the replica writes more or ends.
    pub(crate) fn serve_follow(&mut self, i: NodeId, key: usize, call: &Call) -> Option<Vec<u8>> {
        let Ok((ticket, _, offset)) = proto::decode_follow_args(&mut XdrReader::new(&call.args)) else {
            return Some(garbage(call.xid));
        };
        let result = self.nodes[i].follow(ticket, offset, (key, call.xid))?;
        Some(follow_reply(call.xid, &result.map_err(|e| (CloudStat::NoSuchTicket, e))))
    }

    /// The in-process main service's NODE_FOLLOW for `caller`.
    pub(crate) fn follow_local(&mut self, i: NodeId, ticket: u32, offset: u64, caller: Caller) {
        if let Some(result) = self.nodes[i].follow(ticket, offset, (LOCAL_CALLERS + caller.conn, caller.xid)) {
            self.events.push_back(NodeEvent::Followed { caller, result });
        }
    }

    /// Answer node i's parked NODE_FOLLOWs that have output now (or whose
    /// replica has ended).
    fn answer_followers(&mut self, i: NodeId) {
        for ((key, xid), result) in self.nodes[i].ready_followers() {
            if key >= LOCAL_CALLERS && key != LOCAL {
                let caller = Caller { conn: key - LOCAL_CALLERS, xid };
                self.events.push_back(NodeEvent::Followed { caller, result });
            } else {
                let bytes = follow_reply(xid, &result.map_err(|e| (CloudStat::NoSuchTicket, e)));
                self.follow_replies.push((key, bytes));
            }
        }
    }

    /// A reaped child: the replica it ended, or the Slurm command, if it
    /// was one of ours.
    pub(crate) fn on_exit(&mut self, pid: Pid, status: WaitStatus) -> Option<Reaped> {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            match &mut self.nodes[i] {
                LocalNode::Fork(n) => {
                    if let Some(fin) = n.on_exit(pid, status) {
                        return Some(Reaped::Replica(i, fin));
                    }
                }
                LocalNode::Slurm(n) => {
                    // Its pipes so far, so that the one of this command is
                    // never handed out for registration once closed.
                    self.new_pipes.extend(n.take_new_pipes().into_iter().map(|fd| (i, fd)));
                    if let Some(exited) = n.on_exit(pid, status, now) {
                        let fd = exited.pipe.as_raw_fd();
                        self.new_pipes.retain(|&p| p != (i, fd));
                        self.collect_pipes(i);
                        self.slurm_finished(i, exited.finished);
                        return Some(Reaped::Command(exited.pipe));
                    }
                }
            }
        }
        None
    }

    /// A finished replica's answer (its output pipe already deregistered):
    /// the NODE_RUN reply and the connection it goes to, or for a direct
    /// call a `RunFinished` event.
    pub(crate) fn finished(&mut self, i: NodeId, fin: Finished) -> Option<(usize, Vec<u8>)> {
        drop(fin.pipe);
        // Its followers get the rest and the end.
        self.answer_followers(i);
        let (key, xid) = fin.reply_to;
        if key == LOCAL {
            self.events.push_back(NodeEvent::RunFinished { node: i, ticket: fin.ticket, result: fin.result });
            return None;
        }
        // Kept until NODE_DROP: a main server that restarted asks again.
        let reply = run_reply(xid, &fin.result);
        self.ended.insert((i, fin.ticket), fin.result);
        if let Some(at) = self.orphans.iter().position(|&o| o == (i, fin.ticket, fin.reply_to)) {
            self.orphans.swap_remove(at);
            log::debug!("node {i}: ticket {}: ended after its link went away; kept for NODE_WAIT", fin.ticket);
            return None;
        }
        Some((key, reply))
    }

    /// The earliest time limit or cgroup retry (or abandoned stage).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let stages = self.stages.values().map(|st| st.touched + STAGE_ABANDONED);
        self.nodes.iter().filter_map(|n| n.deadline()).chain(stages).min()
    }

    pub(crate) fn on_timer(&mut self, now: Instant) {
        self.drop_stages(|_, st| st.touched + STAGE_ABANDONED <= now, "abandoned");
        for i in 0..self.nodes.len() {
            if self.nodes[i].deadline().is_none_or(|d| d > now) {
                continue;
            }
            match &mut self.nodes[i] {
                LocalNode::Fork(node) => node.on_timer(now),
                LocalNode::Slurm(node) => {
                    let finished = node.on_timer(now);
                    self.collect_pipes(i);
                    self.slurm_finished(i, finished);
                }
            }
        }
    }

    /// Kill every replica (SIGKILL to each init ends its namespace) and
    /// wait for it; scancel every replica in Slurm (the caller waits for
    /// those commands while `commands_running`, reaps what else is left,
    /// then `release`).
    pub(crate) fn kill_all(&mut self) {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            match &mut self.nodes[i] {
                LocalNode::Fork(node) => {
                    for pid in node.shutdown() {
                        // Blocking is fine now: SIGKILL to init ends its namespace.
                        if let Ok(status) = waitpid(pid, None) {
                            let _ = node.on_exit(pid, status);
                        }
                    }
                }
                LocalNode::Slurm(node) => {
                    node.shutdown(now);
                    self.collect_pipes(i);
                }
            }
        }
    }

    /// After `kill_all` and reaping: remove the groups. The node folders
    /// stay: live tickets' outputs are retrievable after a restart (which
    /// clears the rest).
    pub(crate) fn release(&mut self) {
        let mut cgroups = None;
        for node in &mut self.nodes {
            match node {
                LocalNode::Fork(node) => {
                    node.release_groups();
                    cgroups = cgroups.or_else(|| node.cfg.cgroups.clone());
                }
                LocalNode::Slurm(_) => {}
            }
        }
        // Then the server's parent group (every node shares it).
        if let Some(groups) = cgroups {
            if !groups.remove_parents() {
                log::debug!("the server's cgroup is still busy; the next start on this work dir reclaims it");
            }
        }
    }
}

/// The GARBAGE_ARGS reply to call `xid`.
pub(crate) fn garbage(xid: u32) -> Vec<u8> {
    rpc::accepted(xid, AcceptStat::GarbageArgs).into_bytes()
}

/// A `follow_res` (FOLLOW and NODE_FOLLOW) for call `xid`.
pub(crate) fn follow_reply(xid: u32, result: &Result<Chunk, crate::coordinator::Failure>) -> Vec<u8> {
    match result {
        Ok((data, ended)) => {
            let mut w = rpc::accepted(xid, AcceptStat::Success);
            proto::encode_follow_ok(&mut w, data, *ended);
            w.into_bytes()
        }
        Err((stat, msg)) => {
            let mut w = rpc::accepted(xid, AcceptStat::Success);
            proto::encode_error(&mut w, *stat, msg);
            w.into_bytes()
        }
    }
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
            netns: Vec::new(),
            cgroups: None,
            slot_identities: vec![None],
        })
        .unwrap();
        NodeService::with_nodes(vec![LocalNode::Fork(node)], String::new())
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
        let result = RunResult::exited(0, "exit 0");
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
        fs::create_dir_all(node_dir.join("1/work/deep")).unwrap(); // a stale uncontained workspace
        for t in ["1", "2", "3"] {
            fs::write(node_dir.join(format!("{t}.out")), t).unwrap();
            fs::write(node_dir.join(format!("{t}.tar.gz")), "x").unwrap();
        }
        fs::write(node_dir.join("free-7"), "").unwrap();
        fs::write(node_dir.join("stray"), "x").unwrap();
        // The earlier layout: a folder per ticket.
        fs::create_dir_all(node_dir.join("4/work")).unwrap();
        fs::write(node_dir.join("4/output.txt"), "4").unwrap();
        let trash = dir.path().join("trash");
        let moved = crate::node::sweep_dir(&node_dir, &trash, "9001", |t| t == 2 || t == 4).unwrap();
        assert_eq!(moved, 8, "1/, 1.out, 3.out, three archives, the stray file, 4/");
        let mut left: Vec<_> = fs::read_dir(&node_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["2.out", "4.out", "free-7"]);
        assert_eq!(fs::read_to_string(node_dir.join("2.out")).unwrap(), "2");
        assert_eq!(fs::read_to_string(node_dir.join("4.out")).unwrap(), "4", "moved out of the old folder");
        // Again, with the same names in the trash already: no clash.
        fs::write(node_dir.join("1.out"), "1").unwrap();
        assert_eq!(crate::node::sweep_dir(&node_dir, &trash, "9001", |t| t == 2).unwrap(), 2, "1.out and 4.out");
        assert_eq!(fs::read_dir(&trash).unwrap().count(), 10);
        // No folder yet: nothing to do.
        assert_eq!(crate::node::sweep_dir(&dir.path().join("none"), &trash, "x", |_| true).unwrap(), 0);
    }
}
