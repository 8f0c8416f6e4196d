//! The main server role: client calls in, coordinator actions out.
//!
//! Owns: turning each CLOUD_PROG call into a coordinator call (the
//! caller's identity from `peer`, a retried DEPLOY or CLOSE answered from
//! the coordinator's duplicate request cache); a DEPLOY's archive streamed
//! to a file of the spool's `pool` (`<work-dir>/spool/p-<n>`, reused from
//! job to job), fed to `archive_check` as it arrives (refused with
//! CLOUD_BAD_ARCHIVE, the file given back, no ticket) and answered
//! only once its ticket number is persisted (`tickets`); the coordinator's
//! actions turned into replies (encoded here) and node calls ([`Out`]):
//! a NODE_RUN/FETCH/DROP on a link's connection, or a direct call into the
//! in-process node service for a local node; a link's replies and the
//! node service's [`NodeEvent`]s turned back into coordinator events; each
//! remote node's link state ([`RemoteLink`]: Down -> Connecting ->
//! Authenticating -> Ready -> Down, reconnecting with backoff from 100 ms
//! to 5 s; `Coordinator::node_up` once Ready, `node_down` when it ends,
//! so only linked nodes get replicas); setting a link up: with
//! `--secret-file`, `node_auth`'s handshake (NODE_HELLO, NODE_AUTH) driven
//! over the link, without it a NODE_NULL (a node that wants a secret says
//! so with AUTH_TOOWEAK); a refusal is one line in the log (warned once
//! per reason) and the link closed; a link not up within
//! `LINK_SETUP_WITHIN` is given up (the reactor closes it).
//! The journal (`journal`): the coordinator's records appended each
//! reactor turn, written and synced before the DEPLOY answers that wait
//! for them go out (held until then; a CLOSE answer too if it dropped a
//! ticket on a remote or Slurm node: a close on this process's forking
//! nodes is answered at once, their outputs given back only after the
//! sync), the sync made by the journal's `syncer` (a child process: the
//! reactor serves everything else meanwhile, answers held until its
//! report, DEPLOYs arriving during a sync share the next; a dead syncer's
//! sync made here, another started a second later) or, without one, here
//! once per turn; a lazy sync
//! within a second for the others, compaction, and at start the journal's jobs restored and the
//! spool cleared of all but their archives (kept across a restart and a
//! clean stop alike). The spool pool and the forking nodes' output pools:
//! files given back are reusable only after the journal sync that covers
//! their records (`Pool::seal`, `settle_sealed`, `settle`), so an archive
//! the journal on disk still names is never overwritten, nor the output
//! of a ticket whose CLOSE is not on disk.
//! Staged uploads ([`Upload`], docs/PROTOCOL.md "Staged transfers"): a
//! DEPLOY the coordinator stages to a remote node has each 4 MiB checked
//! and spooled sent on to it in NODE_STAGE calls (by sendfile from the
//! spool file, at most `STAGE_IN_FLIGHT` unanswered, the client's socket
//! not read while more wait: `Conn::stalled`), the rest at the verdict
//! ahead of the coordinator's NODE_RUN_STAGED; an upload that ends
//! without a job has its stage dropped (`Coordinator::stage_abort`).
//! Must not touch: the poll or the slab (the reactor carries out each
//! `Out`), job rules (`coordinator`), a node's replicas (`node_service`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::archive_check::ArchiveCheck;
use crate::conn::{give_back, Conn, Pending, Reader, Role, Sink, Streamed};
use crate::coordinator::{Action, Caller, Coordinator, Failure, NodeCall, OutputRef, Reply, StageId};
use crate::journal::{Journal, Record};
use crate::node_auth::{self, MainHandshake, Secret};
use crate::node_service::{follow_reply, garbage, NodeEvent};
use crate::peer::{self, PeerId};
use crate::proto::{self, CloudStat, RunResult};
use crate::record::{self, Piece};
use crate::rpc::{self, AcceptStat};
use crate::scheduler::NodeId;
use crate::session::{Call, ReplyEvent};
use crate::tickets::TicketStore;
use crate::xdr::XdrReader;

/// First wait before connecting again to a remote node; it doubles after
/// each failure up to `BACKOFF_MAX`, and starts over once a link is up.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A link not up (connected and authenticated) within this of its connect
/// is closed and tried again after the backoff: a silent peer on the
/// node's port cannot hold it forever.
pub(crate) const LINK_SETUP_WITHIN: Duration = Duration::from_secs(10);

/// Bytes past `--max-output` a node's output may hold (its marker line).
const OUTPUT_MARKER_ROOM: u64 = 4096;

/// The buffer DEPLOYs' checks inflate into: large, so that zlib's copy of
/// each call's last 32 KiB into its window is a small part of the work.
const INFLATE_SCRATCH: usize = 256 * 1024;

/// A Ready link whose node runs replicas and has been silent on this long
/// (with nothing of ours in flight) gets a NODE_NULL heartbeat (an idle
/// cluster sends none: it makes no system calls) ...
pub(crate) const HEARTBEAT_IDLE: Duration = Duration::from_secs(5);
/// ... which must be answered within this, or the link is lost: a node
/// that hangs (stopped, wedged) while its kernel still answers TCP is
/// noticed within `HEARTBEAT_IDLE + HEARTBEAT_WAIT`.
pub(crate) const HEARTBEAT_WAIT: Duration = Duration::from_secs(10);

/// A staged upload's bytes go to its node in NODE_STAGE calls of this
/// many bytes (read again from the spool file, by sendfile) ...
const STAGE_CHUNK: u64 = 4 << 20;
/// ... at most this many unanswered at once: past that, the client's
/// socket is not read (TCP pushes back on it) until the node catches up.
const STAGE_IN_FLIGHT: usize = 4;

/// A DEPLOY's upload staged to a node as it arrives (issue 11: the node
/// receives while the client uploads). Its bytes are checked and spooled
/// first, as every upload's; the node gets what is spooled.
#[derive(Debug)]
pub(crate) struct Upload {
    stage: StageId,
    node: NodeId,
    /// The spool file the upload is written to.
    path: PathBuf,
    /// Bytes checked and written to `path`.
    stored: u64,
    /// Bytes handed to NODE_STAGE calls.
    sent: u64,
    /// NODE_STAGE calls not answered yet.
    in_flight: usize,
    /// The stage is void (a NODE_STAGE failed, the link went down, the
    /// spool file could not be read): nothing more is sent, and at the
    /// verdict it is dropped; the job runs as any other.
    dead: bool,
}

/// How the main server reaches node i.
#[derive(Debug)]
pub(crate) enum Link {
    /// In this process: direct calls into the node service's node `.0`.
    Local(usize),
    /// A `cloud-server node` reached over TCP.
    Remote(RemoteLink),
}

/// The main server's link to a remote node: Down -> Connecting ->
/// Authenticating -> Ready, and back to Down when the connection ends.
#[derive(Debug)]
pub(crate) struct RemoteLink {
    pub(crate) addr: SocketAddr,
    pub(crate) state: LinkState,
    backoff: Duration,
    /// When a Down link is connected again.
    retry_at: Instant,
    /// When a Connecting or Authenticating link is given up.
    setup_by: Instant,
    /// The handshake under way while Authenticating with a secret.
    handshake: Option<Box<MainHandshake>>,
    /// Why the last attempt was refused: logged as a warning when it
    /// changes, so a node that keeps refusing is not a warning every 5 s.
    refused: Option<String>,
    /// When the node last said anything on a Ready link.
    heard: Instant,
    /// When a heartbeat went out (or our data stopped moving) with no
    /// answer (or progress) since.
    probe: Option<Instant>,
    /// Bytes of ours written on the link when last looked at.
    sent_mark: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// No connection; the next attempt is at `retry_at`.
    Down,
    /// A non-blocking connect in progress on connection `.0`.
    Connecting(usize),
    /// Connected on `.0`: the handshake runs (`MainService::authenticate`).
    /// Not used for jobs yet.
    Authenticating(usize),
    /// Up on connection `.0`: the node takes work.
    Ready(usize),
}

impl RemoteLink {
    pub(crate) fn new(addr: SocketAddr, now: Instant) -> RemoteLink {
        RemoteLink {
            addr,
            state: LinkState::Down,
            backoff: BACKOFF_FIRST,
            retry_at: now,
            setup_by: now,
            handshake: None,
            refused: None,
            heard: now,
            probe: None,
            sent_mark: 0,
        }
    }
}

/// What the reactor must do to carry out one coordinator action.
#[derive(Debug)]
pub(crate) enum Out {
    /// Answer a client's call on connection `key`.
    Answer { key: usize, pieces: Vec<Piece> },
    /// A call into the in-process node service's node `local`.
    Local { local: usize, call: NodeCall },
    /// A call on a remote node's link, connection `key`: its reply is
    /// matched by `xid` to `pending`.
    Send { key: usize, xid: u32, pending: Pending, pieces: Vec<Piece> },
}

pub(crate) struct MainService {
    pub(crate) coord: Coordinator,
    pub(crate) spool: PathBuf,
    pub(crate) node_names: Vec<String>,
    pub(crate) links: Vec<Link>,
    /// The global node id of each of the node service's nodes.
    pub(crate) locals: Vec<NodeId>,
    pub(crate) next_xid: u32,
    /// The uids replicas run as (slot uids, or `--run-as`): a job (with
    /// `--allow-network`) calling its own server is refused, or it could
    /// deploy jobs that outlive its ticket, owned by a uid its deployer
    /// cannot close, and reach tickets of the uid's earlier tenants.
    pub(crate) job_uids: Vec<u32>,
    pub(crate) tickets: TicketStore,
    /// The rules a DEPLOY's archive is checked against as it arrives.
    pub(crate) extract_limits: crate::extract::ExtractLimits,
    /// The spool's files, reused from job to job (`pool`): uploads and
    /// remote nodes' outputs.
    pub(crate) spool_pool: crate::pool::Shared,
    /// One buffer every DEPLOY's check inflates into (`ArchiveCheck::feed_using`),
    /// made at the first upload.
    pub(crate) inflate_scratch: Vec<u8>,
    /// `--max-output`: the most output a node may send for a replica.
    pub(crate) max_output: u64,
    /// The node links' shared secret: proved to each remote node, whose
    /// proof is checked, before it takes work.
    pub(crate) secret: Option<Secret>,
    /// The job state on disk (`<work-dir>/journal`).
    pub(crate) journal: Journal,
    /// Per node: a node of this process that forks its replicas, whose
    /// outputs go back to its pool only after the journal's sync (so a
    /// CLOSE on it need not wait for the sync).
    pub(crate) forking: Vec<bool>,
    /// The CLOSE being carried out dropped a ticket on another kind of
    /// node (remote, Slurm): its answer waits for the sync.
    pub(crate) close_waits: bool,
    /// DEPLOY answers (and CLOSE answers that must) of this turn, sent
    /// once their journal records are durable (`end_of_turn`).
    pub(crate) held: Vec<(Caller, Reply)>,
    /// When buffered records that no answer waits for are synced.
    pub(crate) sync_at: Option<Instant>,
    /// The journal's syncer (`syncer`): it fdatasyncs, the reactor does
    /// not wait. `None`: it could not be started, or died; the sync is then
    /// made here, on the reactor thread, until `syncer_retry`.
    pub(crate) syncer: Option<crate::syncer::Syncer>,
    /// When to start a syncer again after one died or could not start.
    pub(crate) syncer_retry: Instant,
    /// False where a sync costs next to nothing (a tmpfs work dir): no
    /// syncer, the sync is made here.
    pub(crate) syncer_wanted: bool,
    /// A syncer started since the reactor last looked: its socket to watch.
    pub(crate) syncer_new: Option<std::os::fd::RawFd>,
    /// A sync is asked of the syncer and not reported yet.
    pub(crate) sync_in_flight: bool,
    /// The answers that wait for the sync in flight (`held` then wait for
    /// the one after).
    pub(crate) held_in_flight: Vec<(Caller, Reply)>,
    /// How the sync in flight ended, once reported (`syncer_readable`).
    pub(crate) sync_report: Option<std::io::Result<()>>,
    /// The output pools of this process's forking nodes: their closed
    /// tickets' outputs are reused only once the CLOSE records are synced.
    pub(crate) output_pools: Vec<crate::pool::Shared>,
    /// Uploads staged to a node, by client connection.
    pub(crate) uploads: HashMap<usize, Upload>,
    /// Client connections whose staged upload may go on (the reactor reads
    /// them again if they were stalled).
    pub(crate) unstall: Vec<usize>,
    /// Node calls to carry out now (NODE_STAGE).
    pub(crate) outs: Vec<Out>,
}

/// After a syncer dies (or cannot be started), syncs are made on the
/// reactor thread for this long before another is started.
const SYNCER_RETRY: Duration = Duration::from_secs(1);

/// Records no answer waits for (a replica started or ended, an expiry)
/// are synced within this.
const LAZY_SYNC: Duration = Duration::from_secs(1);

impl MainService {
    /// Carry out one coordinator action, or say what the reactor must do.
    pub(crate) fn perform(&mut self, action: Action) -> Option<Out> {
        match action {
            Action::Reply { to, reply } => {
                // A CLOSE whose tickets were only on this process's forking
                // nodes is answered now: its record rides with the next sync
                // (within a second), and until then the outputs stay where
                // they are, so a crash that loses the record brings the
                // ticket back whole (retrievable, closable again).
                // (Other answers the close gives, to parked retrievers,
                // leave the mark for the CLOSE's own.)
                let close_waits = matches!(&reply, Reply::Close(_)) && std::mem::take(&mut self.close_waits);
                if matches!(&reply, Reply::Deploy(Ok(_))) || (matches!(&reply, Reply::Close(Ok(_))) && close_waits) {
                    log::debug!("connection {}: xid {:#x}: {reply:?}", to.conn, to.xid);
                    // Not before its record is on disk (end of this turn).
                    self.held.push((to, reply));
                    return None;
                }
                Some(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) })
            }
            Action::RemoveFile(path) => {
                // A spool file goes back to the pool once the journal no
                // longer needs it (the turn's sync); a large one is removed
                // by a child, never on the reactor thread. A local node's
                // output (fetched in place) is its node's: NODE_DROP.
                if path.parent() == Some(self.spool.as_path()) {
                    let mut pool = self.spool_pool.borrow_mut();
                    match path.file_name().and_then(|f| f.to_str()).is_some_and(|f| pool.is_pool_name(f)) {
                        true => pool.give_after_sync(&path),
                        // Not the pool's (a Slurm node's output linked in,
                        // an earlier version's name): never reused.
                        false => pool.discard(&path),
                    }
                }
                None
            }
            Action::Node { node, call } => {
                if matches!(call, NodeCall::Drop { .. }) && !self.forking.get(node).copied().unwrap_or(false) {
                    self.close_waits = true;
                }
                self.node_action(node, call)
            }
        }
    }

    /// A node call: into the node service for a node of this process, on
    /// its link for a remote one.
    fn node_action(&mut self, node: NodeId, call: NodeCall) -> Option<Out> {
        match &self.links[node] {
            Link::Local(local) => Some(Out::Local { local: *local, call }),
            Link::Remote(RemoteLink { state: LinkState::Ready(key), .. }) => self.call_remote(node, *key, call),
            Link::Remote(_) => {
                self.unreachable(node, call);
                None
            }
        }
    }

    /// A NODE_PROG call on a remote node's link.
    fn call_remote(&mut self, node: NodeId, key: usize, call: NodeCall) -> Option<Out> {
        let xid = self.next_xid;
        self.next_xid = self.next_xid.wrapping_add(1);
        let (proc_num, pending, pieces) = match call {
            NodeCall::Run { args, archive } => {
                let opened = File::open(&archive).and_then(|f| f.metadata().map(|m| (f, m.len())));
                let (file, len) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        let msg = format!("the spooled archive is gone: {e}");
                        // Report it as the node would, so the node is freed.
                        self.coord.run_finished(node, args.ticket, RunResult::invalid(msg), Instant::now());
                        return None;
                    }
                };
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_RUN);
                args.encode(&mut w);
                // Opened now: the spooled archive is unlinked right after.
                (proto::NODE_RUN, Pending::Run(args.ticket), record::with_opaque(w, Piece::File { file, len }))
            }
            NodeCall::Fetch { ticket, replica, into } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_FETCH);
                w.u32(ticket);
                (proto::NODE_FETCH, Pending::Fetch { ticket, replica, into }, vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Drop { ticket } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_DROP);
                w.u32(ticket);
                (proto::NODE_DROP, Pending::Drop, vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Stop { ticket } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_STOP);
                w.u32(ticket);
                (proto::NODE_STOP, Pending::Drop, vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Keep { tickets } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_KEEP);
                proto::encode_tickets_list(&mut w, &tickets);
                (proto::NODE_KEEP, Pending::Drop, vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::RunStaged { args, stage, length, archive: _ } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_RUN_STAGED);
                proto::RunStagedArgs { run: args, stage, length }.encode(&mut w);
                (proto::NODE_RUN_STAGED, Pending::Run(args.ticket), vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Unstage { stage } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_UNSTAGE);
                w.u32(stage);
                (proto::NODE_UNSTAGE, Pending::Drop, vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Wait { ticket } => {
                // Answered as a NODE_RUN is: how the replica ended.
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_WAIT);
                w.u32(ticket);
                (proto::NODE_WAIT, Pending::Run(ticket), vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Follow { ticket, offset, caller } => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_FOLLOW);
                proto::encode_follow_args(&mut w, ticket, 0, offset);
                (proto::NODE_FOLLOW, Pending::Follow { caller }, vec![Piece::Bytes(w.into_bytes())])
            }
        };
        log::debug!("node {}: call xid {xid:#x} proc {proc_num}", self.node_names[node]);
        Some(Out::Send { key, xid, pending, pieces })
    }

    /// A node call for a node whose link is not up: answered as the node
    /// would fail it (the scheduler does not start replicas on such nodes;
    /// a link that just went down may still be asked).
    fn unreachable(&mut self, node: NodeId, call: NodeCall) {
        let why = format!("node lost: node {} is unreachable", self.node_names[node]);
        match call {
            NodeCall::Run { args, .. } | NodeCall::RunStaged { args, .. } => {
                self.coord.run_finished(node, args.ticket, RunResult::lost(why), Instant::now())
            }
            // The node drops a link's stages when the link ends.
            NodeCall::Unstage { .. } => {}
            NodeCall::Follow { caller, .. } => self.coord.followed(caller, Err(why)),
            NodeCall::Wait { ticket } => self.coord.run_finished(node, ticket, RunResult::lost(why), Instant::now()),
            NodeCall::Keep { .. } => {}
            NodeCall::Fetch { ticket, replica, .. } => self.coord.fetch_failed(ticket, replica, &why),
            // Its outputs stay on that node's disk until it is restarted.
            NodeCall::Drop { ticket } => log::warn!("{why}: ticket {ticket} not dropped there"),
            NodeCall::Stop { ticket } => log::warn!("{why}: ticket {ticket} not stopped there"),
        }
    }

    /// Remote links that are down and due for another connection attempt.
    pub(crate) fn links_due(&self, now: Instant) -> Vec<NodeId> {
        let due = |l: &Link| matches!(l, Link::Remote(r) if r.state == LinkState::Down && r.retry_at <= now);
        self.links.iter().enumerate().filter(|(_, l)| due(l)).map(|(i, _)| i).collect()
    }

    /// When the next remote link is due to be connected again.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let retries = self.links.iter().enumerate().filter_map(|(i, l)| match l {
            Link::Remote(r) if r.state == LinkState::Down => Some(r.retry_at),
            Link::Remote(r) if !matches!(r.state, LinkState::Ready(_)) => Some(r.setup_by),
            Link::Remote(r) if self.coord.runs_on(i) || self.staging_to(i) || r.probe.is_some() => {
                Some(r.probe.map_or(r.heard + HEARTBEAT_IDLE, |p| p + HEARTBEAT_WAIT))
            }
            _ => None,
        });
        let pool = self.spool_pool.borrow().retry_at();
        retries.chain(self.coord.next_deadline()).chain(self.sync_at).chain(pool).min()
    }

    fn remote(&mut self, node: NodeId) -> Option<&mut RemoteLink> {
        match self.links.get_mut(node) {
            Some(Link::Remote(r)) => Some(r),
            _ => None,
        }
    }

    /// A connection attempt to node i is under way on connection `key`.
    pub(crate) fn link_connecting(&mut self, node: NodeId, key: usize, now: Instant) {
        if let Some(r) = self.remote(node) {
            r.state = LinkState::Connecting(key);
            r.setup_by = now + LINK_SETUP_WITHIN;
        }
    }

    /// Connections of links not up within `LINK_SETUP_WITHIN`: the reactor
    /// closes them (`link_lost` follows).
    /// Heartbeats of Ready links whose node runs replicas. `in_flight(key)`
    /// is `None` when nothing of ours waits to be sent on the connection,
    /// else the bytes written on it so far: our data moving counts as the
    /// node alive, as anything it sends does. A node silent for
    /// `HEARTBEAT_IDLE` gets a NODE_NULL (or, while our data is in flight,
    /// is watched for progress); the connections of nodes that neither
    /// answer nor take data for `HEARTBEAT_WAIT` more are returned, to
    /// close (the node is then lost).
    pub(crate) fn heartbeats(
        &mut self,
        now: Instant,
        in_flight: impl Fn(usize) -> Option<u64>,
    ) -> (Vec<Out>, Vec<usize>) {
        let (mut outs, mut dead) = (Vec::new(), Vec::new());
        for (i, (link, name)) in self.links.iter_mut().zip(&self.node_names).enumerate() {
            let Link::Remote(r) = link else { continue };
            let LinkState::Ready(key) = r.state else { continue };
            // A stage waiting on its node counts: a node that hangs is lost
            // within the heartbeat's bound, and its uploads go on without.
            let staging = self.uploads.values().any(|u| u.node == i && u.in_flight > 0);
            if r.probe.is_none() && !self.coord.runs_on(i) && !staging {
                continue; // nothing to lose there: no heartbeat
            }
            let sending = in_flight(key);
            if let Some(written) = sending.filter(|&w| w != r.sent_mark) {
                (r.sent_mark, r.heard, r.probe) = (written, now, None);
            }
            match r.probe {
                Some(since) if now >= since + HEARTBEAT_WAIT => {
                    log::warn!(
                        "node {name} did not answer a heartbeat (or take our data) within {} s (hung, or its network is gone); link lost",
                        HEARTBEAT_WAIT.as_secs()
                    );
                    dead.push(key);
                }
                None if now >= r.heard + HEARTBEAT_IDLE => {
                    if sending.is_none() {
                        let xid = self.next_xid;
                        self.next_xid = self.next_xid.wrapping_add(1);
                        let w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_NULL);
                        let pieces = vec![Piece::Bytes(w.into_bytes())];
                        outs.push(Out::Send { key, xid, pending: Pending::Heartbeat, pieces });
                    }
                    r.probe = Some(now);
                }
                _ => {}
            }
        }
        (outs, dead)
    }

    pub(crate) fn links_stalled(&mut self, now: Instant) -> Vec<usize> {
        let mut keys = Vec::new();
        for (link, name) in self.links.iter_mut().zip(&self.node_names) {
            let Link::Remote(r) = link else { continue };
            let (LinkState::Connecting(key) | LinkState::Authenticating(key)) = r.state else { continue };
            if r.setup_by <= now {
                let why = format!(
                    "node {name}: no link within {} s of connecting (no answer to the connect or the handshake); closing",
                    LINK_SETUP_WITHIN.as_secs()
                );
                refused(r, why);
                keys.push(key);
            }
        }
        keys
    }

    /// Node i's connection `conn` is established: authenticate, then take
    /// work (`link_ready` once the node has answered).
    pub(crate) fn link_connected(&mut self, node: NodeId, conn: &mut Conn) {
        let Some(r) = self.remote(node) else { return };
        let LinkState::Connecting(key) = r.state else { return };
        r.state = LinkState::Authenticating(key);
        self.authenticate(node, conn);
    }

    /// Start setting node i's link up on `conn`. With a secret: NODE_HELLO,
    /// the first step of `node_auth`'s handshake. Without: a NODE_NULL,
    /// whose AUTH_TOOWEAK says the node wants a secret we do not have.
    fn authenticate(&mut self, node: NodeId, conn: &mut Conn) {
        let xid = self.take_xid();
        let name = self.node_names[node].clone();
        let secret = self.secret.clone();
        let Some(r) = self.remote(node) else { return };
        let Some(secret) = secret else {
            let w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_NULL);
            return send_setup(conn, xid, Pending::Probe, w);
        };
        let link =
            conn.stream.local_addr().and_then(|main| Ok(node_auth::Link { main, node: conn.stream.peer_addr()? }));
        let started = link.and_then(|link| Ok(MainHandshake::new(secret, link, node_auth::random_nonce()?)));
        match started {
            Ok(handshake) => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_HELLO);
                w.fixed(&handshake.hello_args());
                r.handshake = Some(Box::new(handshake));
                send_setup(conn, xid, Pending::Hello, w);
            }
            Err(e) => {
                refused(r, format!("node {name}: cannot start the handshake: {e}; closing"));
                conn.closing = true;
            }
        }
    }

    /// A reply to a call that sets node i's link up: the next step, the
    /// link up, or a refusal (logged, the link closed; connected again
    /// after the backoff, never used meanwhile).
    fn setup_reply(&mut self, node: NodeId, conn: &mut Conn, call: Pending, results: Result<Vec<u8>, String>) {
        let name = self.node_names[node].clone();
        let xid = self.take_xid();
        let Some(r) = self.remote(node) else { return };
        if !matches!(r.state, LinkState::Authenticating(_)) {
            return;
        }
        let step = match (call, results, r.handshake.as_mut()) {
            // Without a secret the node is on loopback: it must be ours; the
            // kernel says whose its socket is (it has accepted ours by the
            // time it answers), as the node checks its main server's.
            // Another local user who took the port of a node that is down
            // would otherwise get our users' archives and answer for them.
            (Pending::Probe, Ok(_), _) => node_owner_is_ours(conn).map(|()| None).map_err(|whose| {
                let me = nix::unistd::Uid::effective().as_raw();
                format!(
                    "node {name}: its port is {whose}, not this server's user's (uid {me}): not using it; \
                     run the node as uid {me}, or give both the same --secret-file"
                )
            }),
            (Pending::Probe, Err(why), _) if why == rpc::AUTH_TOOWEAK_TEXT => Err(format!(
                "node {name} takes orders only from a main server that proves a shared secret (it has a --secret-file), and this one has none: start the main server with the node's --secret-file"
            )),
            (Pending::Hello, Ok(res), Some(h)) => h.on_hello_results(&res).map(Some),
            (Pending::Auth, Ok(res), Some(h)) => h.on_auth_results(&res).map(|()| None),
            (Pending::Hello, Err(why), _) => {
                Err(format!("node {name} did not take part in the handshake ({why}): is it an older cloud-server?"))
            }
            (_, Err(why), _) => Err(format!("node {name} refused to set the link up: {why}")),
            (_, Ok(_), _) => Err(format!("node {name}: a handshake reply out of turn; closing the link")),
        };
        match step {
            Ok(Some(auth_args)) => {
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_AUTH);
                w.fixed(&auth_args);
                send_setup(conn, xid, Pending::Auth, w);
            }
            Ok(None) => {
                r.handshake = None;
                r.refused = None;
                self.link_ready(node, Instant::now());
            }
            Err(why) => {
                r.handshake = None;
                refused(r, why);
                conn.closing = true;
            }
        }
    }

    fn take_xid(&mut self) -> u32 {
        let xid = self.next_xid;
        self.next_xid = self.next_xid.wrapping_add(1);
        xid
    }

    /// Node i's link is authenticated: it takes work.
    fn link_ready(&mut self, node: NodeId, now: Instant) {
        let Some(r) = self.remote(node) else { return };
        let LinkState::Authenticating(key) = r.state else { return };
        r.state = LinkState::Ready(key);
        (r.heard, r.probe) = (now, None);
        r.backoff = BACKOFF_FIRST;
        log::info!("link to node {} is up", self.node_names[node]);
        // After a restart, its restored replicas are asked for (NODE_WAIT).
        self.coord.link_up(node, now);
    }

    /// A link to node i is gone (or could not be made): its running
    /// replica is lost, and it is connected again after a backoff.
    pub(crate) fn link_lost(&mut self, node: NodeId, now: Instant) {
        let name = self.node_names[node].clone();
        let Some(r) = self.remote(node) else { return };
        let was = r.state;
        r.state = LinkState::Down;
        r.handshake = None;
        r.retry_at = now + r.backoff;
        let wait = r.backoff;
        r.backoff = (r.backoff * 2).min(BACKOFF_MAX);
        // Its stages went with the link: those uploads go on without.
        for (&client, u) in self.uploads.iter_mut().filter(|(_, u)| u.node == node) {
            u.dead = true;
            self.unstall.push(client);
        }
        match was {
            LinkState::Ready(_) => {
                log::warn!("link to node {name} is down; connecting again in {} ms", wait.as_millis());
                self.coord.node_down(node, now);
            }
            _ => log::debug!("node {name}: not reachable; trying again in {} ms", wait.as_millis()),
        }
    }

    /// What an in-process node answered.
    pub(crate) fn on_node_event(&mut self, ev: NodeEvent) {
        match ev {
            NodeEvent::RunFinished { node, ticket, result } => {
                self.coord.run_finished(self.locals[node], ticket, result, Instant::now())
            }
            NodeEvent::Note { node, ticket, message } => self.coord.replica_note(self.locals[node], ticket, &message),
            NodeEvent::Followed { caller, result } => self.coord.followed(caller, result),
            NodeEvent::Fetched { ticket, replica, result } => match result {
                Ok(path) => self.coord.fetched(ticket, replica, Ok(path)),
                // Missing for good: final, the message says so.
                Err((true, why)) => self.coord.fetched(ticket, replica, Err(why)),
                Err((false, why)) => self.coord.fetch_failed(ticket, replica, &why),
            },
        }
    }

    /// Journaling, at the end of a reactor turn: append what the
    /// coordinator recorded; take the syncer's report of the sync in
    /// flight, if any, and release the answers that waited for it; then, if
    /// an answer waits (or the lazy sync is due) and no sync is in flight,
    /// write the buffered records and ask the syncer to sync them (one sync
    /// covers every answer held until then: DEPLOYs arriving during a sync
    /// share the next). Without a syncer the sync is made here, at once.
    /// If a sync fails, a held DEPLOY's job is dropped and answered
    /// CLOUD_INTERNAL (its `Closed` record follows the `Deployed` one, so
    /// a later sync cannot bring it back), a held CLOSE is answered
    /// CLOUD_INTERNAL too. Compacts the journal when due.
    pub(crate) fn end_of_turn(&mut self, now: Instant) -> Vec<Out> {
        self.spool_pool.borrow_mut().on_timer(now);
        self.append_records();
        let mut outs = Vec::new();
        if let Some(result) = self.sync_report.take() {
            self.sync_in_flight = false;
            let held = std::mem::take(&mut self.held_in_flight);
            match self.journal.synced(result) {
                Ok(()) => {
                    self.each_pool(crate::pool::Pool::settle_sealed);
                    self.synced(held, &mut outs);
                }
                Err(e) => self.sync_failed(&e, held, now, &mut outs),
            }
        }
        if self.sync_in_flight {
            return outs; // what is held waits for the next sync
        }
        if !self.journal.has_pending() {
            self.sync_at = None;
            // Every record is on disk: what was given back is reusable.
            self.each_pool(crate::pool::Pool::settle);
        } else if self.sync_at.is_none() {
            self.sync_at = Some(now + LAZY_SYNC);
        }
        let due = !self.held.is_empty() || self.sync_at.is_some_and(|t| t <= now);
        if !due {
            return outs;
        }
        let held = std::mem::take(&mut self.held);
        if !self.journal.has_pending() {
            // Nothing to write (a compaction made it durable): answer now.
            self.synced(held, &mut outs);
            return outs;
        }
        if self.ask_syncer(now) {
            self.sync_in_flight = true;
            self.held_in_flight = held;
            self.sync_at = None;
            self.each_pool(crate::pool::Pool::seal);
            return outs;
        }
        match self.journal.sync() {
            Ok(()) => {
                self.each_pool(crate::pool::Pool::settle);
                self.synced(held, &mut outs);
            }
            Err(e) => self.sync_failed(&e, held, now, &mut outs),
        }
        outs
    }

    /// Write the buffered records and ask the syncer to sync them (one is
    /// started if none runs and it is time). False: sync here instead.
    fn ask_syncer(&mut self, now: Instant) -> bool {
        if self.syncer.is_none() && self.syncer_wanted && now >= self.syncer_retry {
            match crate::syncer::Syncer::start() {
                Ok(s) => {
                    self.syncer_new = Some(s.fd());
                    self.syncer = Some(s);
                }
                Err(e) => {
                    log::warn!("{e}; the journal is synced on the server's thread for now");
                    self.syncer_retry = now + SYNCER_RETRY;
                }
            }
        }
        let Some(syncer) = &self.syncer else { return false };
        if let Err(e) = self.journal.write_pending() {
            // The synchronous sync writes again, and reports the error.
            log::debug!("journal write: {e}");
            return false;
        }
        match syncer.request(self.journal.fd()) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot ask the journal syncer to sync ({e}); syncing on the server's thread");
                self.syncer_gone(now);
                false
            }
        }
    }

    /// The syncer's socket is readable: its report, or its end. One report
    /// per request, so one read: its end, should it die after, raises a
    /// new event.
    pub(crate) fn syncer_readable(&mut self, now: Instant) {
        let Some(syncer) = &self.syncer else { return };
        match syncer.read_report() {
            crate::syncer::Report::Nothing => {}
            crate::syncer::Report::Synced(r) => {
                if self.sync_in_flight && self.sync_report.is_none() {
                    self.sync_report = Some(r.map_err(std::io::Error::from_raw_os_error));
                }
            }
            crate::syncer::Report::Gone => {
                log::warn!(
                    "the journal syncer (pid {}) ended; syncing on the server's thread, another starts in {} s",
                    syncer.pid(),
                    SYNCER_RETRY.as_secs()
                );
                self.syncer_gone(now);
            }
        }
    }

    /// The syncer is gone: what it was asked to sync is synced here (it may
    /// or may not have been), and another is started after `SYNCER_RETRY`.
    pub(crate) fn syncer_gone(&mut self, now: Instant) {
        if let Some(s) = self.syncer.take() {
            s.stop();
        }
        self.syncer_retry = now + SYNCER_RETRY;
        if self.sync_in_flight && self.sync_report.is_none() {
            // SAFETY: fdatasync on the journal's open descriptor.
            let r = match unsafe { libc::fdatasync(self.journal.fd()) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            };
            self.sync_report = Some(r);
        }
    }

    /// Every pool whose given-back files wait for the journal's sync.
    fn each_pool(&self, f: impl Fn(&mut crate::pool::Pool)) {
        f(&mut self.spool_pool.borrow_mut());
        for p in &self.output_pools {
            f(&mut p.borrow_mut());
        }
    }

    /// The journal holds the records `held` waited for: send them; compact
    /// if due.
    fn synced(&mut self, held: Vec<(Caller, Reply)>, outs: &mut Vec<Out>) {
        for (to, reply) in held {
            outs.push(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) });
        }
        match self.journal.compact_if_due() {
            Ok(true) => log::info!("journal compacted to {} bytes", self.journal.len()),
            Ok(false) => {}
            Err(e) => log::warn!("cannot compact the journal: {e}"),
        }
    }

    /// A sync failed: `held` are answered CLOUD_INTERNAL, their deploys
    /// dropped (a `Closed` record each).
    fn sync_failed(&mut self, e: &std::io::Error, held: Vec<(Caller, Reply)>, now: Instant, outs: &mut Vec<Out>) {
        log::error!("cannot write the journal: {e}; deploys and closes of this moment are refused");
        self.sync_at = Some(now + LAZY_SYNC);
        let failure =
            |what: &str| (CloudStat::Internal, format!("the server cannot record {what} on disk ({e}); retry later"));
        for (to, reply) in held {
            let reply = match reply {
                Reply::Deploy(Ok(ticket)) => {
                    self.coord.abandon(to, ticket);
                    Reply::Deploy(Err(failure("the job")))
                }
                _ => Reply::Close(Err(failure("the close"))),
            };
            outs.push(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) });
        }
        self.append_records();
    }

    /// Move the coordinator's records into the journal's buffer, stamped.
    fn append_records(&mut self) {
        let mut secs = None;
        while let Some(mut rec) = self.coord.poll_record() {
            let secs = *secs.get_or_insert_with(|| {
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            });
            match &mut rec {
                Record::Deployed { submitted: t, .. }
                | Record::Started { at: t, .. }
                | Record::Finished { ended: t, .. } => *t = secs,
                Record::Closed { .. } => {}
            }
            if let Err(why) = self.journal.append(&rec) {
                log::warn!("journal: record not written ({why}): {rec:?}");
            }
        }
    }

    /// At start: put back the journal's jobs into the coordinator, journal
    /// what the restart decided, and clear the spool of everything the
    /// restored jobs do not need (uploads cut short, fetched outputs).
    /// Returns the line for the log, if there was anything to restore.
    pub(crate) fn restore(&mut self, now: Instant) -> Result<Option<String>, String> {
        let links = &self.links;
        let r = self.coord.restore(self.journal.live(), |n| matches!(links.get(n), Some(Link::Remote(_))), now);
        let unix_now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.coord.restore_times(self.journal.live(), now, unix_now);
        let mut line = None;
        if r.jobs + r.skipped > 0 {
            line = Some(format!(
                "restored {} jobs from the journal: {} replicas queued, {} finished, {} running elsewhere, \
                 {} lost with the restart, {} requeued{}",
                r.jobs,
                r.queued,
                r.finished,
                r.running,
                r.lost,
                r.requeued,
                if r.skipped > 0 { format!(", {} left out", r.skipped) } else { String::new() }
            ));
        }
        self.append_records();
        self.journal.sync().map_err(|e| format!("cannot write the journal: {e}"))?;
        let kept: HashSet<PathBuf> = self.coord.kept_archives().cloned().collect();
        for path in &kept {
            if !path.exists() {
                log::warn!("{}: the archive of a queued job is missing; its replicas will fail", path.display());
            }
        }
        self.sweep_spool(&kept);
        self.coord.start_restored();
        Ok(line)
    }

    /// At start (and a clean stop): every pool file of the spool not in
    /// `kept` is emptied for reuse (a large one is kept whole as the
    /// spool's spare, `pool::SPARES`, or removed by a child);
    /// anything else not kept is removed.
    fn sweep_spool(&self, kept: &HashSet<PathBuf>) {
        let Ok(entries) = fs::read_dir(&self.spool) else { return };
        let (mut pooled, mut removed) = (0, 0);
        let mut pool = self.spool_pool.borrow_mut();
        for e in entries.flatten() {
            let path = e.path();
            if kept.contains(&path) {
                continue;
            }
            let ours = path.file_name().and_then(|f| f.to_str()).is_some_and(|f| pool.is_pool_name(f));
            let gone = match e.file_type() {
                Ok(t) if t.is_file() && ours => {
                    pool.adopt(&path);
                    pooled += 1;
                    continue;
                }
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match gone {
                Ok(()) => removed += 1,
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        if pooled + removed > 0 {
            log::debug!("spool {}: {pooled} files reused, {removed} entries removed", self.spool.display());
        }
    }

    /// A whole call from a client of the main server.
    pub(crate) fn client_call(&mut self, key: usize, conn: &mut Conn, call: Call) {
        let caller = Caller { conn: key, xid: call.xid };
        let mut r = XdrReader::new(&call.args);
        log::debug!("connection {key}: call xid {:#x} {}", call.xid, proto::cloud_proc_name(call.proc_num));
        let who = match self.identify_call(key, conn, &call) {
            Ok(who) => who,
            Err(refusal) => return conn.outbox.push_bytes(refusal),
        };
        // STATUS, RETRIEVE and CLOSE are answered by the coordinator.
        conn.awaiting += 1;
        let ok = match call.proc_num {
            proto::CLOUD_NULL => {
                conn.awaiting -= 1;
                conn.outbox.push_bytes(rpc::accepted(call.xid, AcceptStat::Success).into_bytes());
                true
            }
            proto::STATUS => r.u32().map(|t| self.coord.status(caller, t)).is_ok(),
            proto::RETRIEVE => {
                proto::decode_retrieve_args(&mut r).map(|(t, w)| self.coord.retrieve(caller, who, t, w)).is_ok()
            }
            proto::CLOSE => r.u32().map(|t| self.coord.close(caller, who, t, Instant::now())).is_ok(),
            proto::CLUSTER => r.finish().map(|()| self.coord.cluster(caller, Instant::now())).is_ok(),
            proto::MINE => r.finish().map(|()| self.coord.mine(caller, who, Instant::now())).is_ok(),
            proto::CANCEL => r.u32().map(|t| self.coord.cancel(caller, who, t, Instant::now())).is_ok(),
            proto::FOLLOW => {
                proto::decode_follow_args(&mut r).map(|(t, i, off)| self.coord.follow(caller, who, t, i, off)).is_ok()
            }
            proto::JOB_INFO => {
                proto::decode_retrieve_args(&mut r).map(|(t, w)| self.coord.info(caller, t, w, Instant::now())).is_ok()
            }
            proto::DEPLOY | proto::DEPLOY_OPTS => false, // too short to stream
            _ => {
                // Numbers below DEPLOY_OPTS that do not exist (yet).
                conn.awaiting -= 1;
                return conn.outbox.push_bytes(rpc::accepted(call.xid, AcceptStat::ProcUnavail).into_bytes());
            }
        };
        if !ok {
            conn.awaiting -= 1;
            conn.outbox.push_bytes(garbage(call.xid));
        }
    }

    /// The uid a client call is made as (`None`: anonymous), or the
    /// AUTH_ERROR reply to a credential that lies about it.
    fn identify_call(&self, key: usize, conn: &Conn, call: &Call) -> Result<Option<u32>, Vec<u8>> {
        if let PeerId::Verified(uid) = conn.peer {
            if self.job_uids.contains(&uid) {
                log::warn!("connection {key}: xid {:#x}: a call from uid {uid}, a replica's: refused", call.xid);
                return Err(rpc::auth_error(call.xid, rpc::AUTH_TOOWEAK));
            }
        }
        peer::caller_uid(conn.peer, call.sys_uid).map_err(|auth_stat| {
            let owner = match conn.peer {
                PeerId::Verified(uid) => format!("uid {uid}"),
                _ => "an unknown user".into(),
            };
            log::warn!(
                "connection {key}: xid {:#x}: AUTH_SYS claims uid {} but the socket belongs to {owner}; refused",
                call.xid,
                call.sys_uid.unwrap_or(0)
            );
            rpc::auth_error(call.xid, auth_stat)
        })
    }

    /// A client's DEPLOY starts streaming its archive: refuse it now, or
    /// spool it (checked as it arrives).
    pub(crate) fn deploy_start(&mut self, key: usize, conn: &mut Conn, call: Call, len: u32) {
        let mut r = XdrReader::new(&call.args);
        let Ok(replicas) = r.u32() else { return conn.outbox.push_bytes(garbage(call.xid)) };
        // DEPLOY_OPTS carries flags after the replicas; unknown bits are refused.
        let flags = if call.proc_num == proto::DEPLOY_OPTS { r.u32().ok() } else { Some(0) };
        let Some(flags @ (0 | proto::DEPLOY_FAIL_FAST)) = flags else {
            return conn.answer_before_upload(len, garbage(call.xid));
        };
        let who = match self.identify_call(key, conn, &call) {
            Ok(who) => who,
            Err(refusal) => return conn.answer_before_upload(len, refusal),
        };
        if let Some(ticket) = self.coord.retried_deploy(call.xid, who, Instant::now()) {
            log::info!(
                "connection {key}: xid {:#x} is a retried DEPLOY; answering ticket {ticket} again, archive dropped",
                call.xid
            );
            let mut w = rpc::accepted(call.xid, AcceptStat::Success);
            w.u32(CloudStat::Ok as u32).u32(ticket);
            return conn.answer_before_upload(len, w.into_bytes());
        }
        // A network peer's AUTH_SYS uid is only a claim: it cannot
        // make it the server's own user (or root) where only that
        // user may deploy (a server without root).
        let verified = conn.peer != PeerId::Remote;
        if let Some(failure) = self.coord.deploy_refusal(who, verified, replicas) {
            return conn.answer_before_upload(len, failure_reply(call.xid, &failure));
        }
        let check = Box::new(ArchiveCheck::new(self.extract_limits));
        let what = Streamed::Deploy { replicas, flags, who, check, spooled: 0 };
        log::debug!(
            "connection {key}: call xid {:#x} {}: receiving a {len} byte archive",
            call.xid,
            proto::cloud_proc_name(call.proc_num)
        );
        conn.sink = Sink::take(call.xid, what, &self.spool_pool, u64::from(len));
        // Where the job would start now, if on a remote node: the archive
        // goes on there as it arrives (a staged transfer).
        if let Sink::File { path, error: None, .. } = &conn.sink {
            if let Some((stage, node)) = self.coord.stage_for(replicas) {
                let path = path.clone();
                let up = Upload { stage, node, path, stored: 0, sent: 0, in_flight: 0, dead: false };
                self.uploads.insert(key, up);
            }
        }
    }

    /// `n` more bytes of client `key`'s DEPLOY were checked and spooled:
    /// a staged upload sends what makes a whole NODE_STAGE (into `outs`),
    /// and stalls the client while its node is too far behind.
    pub(crate) fn deploy_stored(&mut self, key: usize, conn: &mut Conn, n: usize) {
        let Some(u) = self.uploads.get_mut(&key) else { return };
        if matches!(&conn.sink, Sink::File { error: Some(_), .. } | Sink::None) {
            u.dead = true; // the upload failed: refused at its end
            return;
        }
        u.stored += n as u64;
        let node = u.node;
        let Some(link) = self.ready_link(node) else {
            if let Some(u) = self.uploads.get_mut(&key) {
                u.dead = true;
            }
            return;
        };
        for (xid, pending, pieces) in self.stage_calls(key, false) {
            self.outs.push(Out::Send { key: link, xid, pending, pieces });
        }
        conn.stalled = self.uploads.get(&key).is_some_and(|u| !u.dead && u.stored - u.sent >= STAGE_CHUNK);
    }

    /// Whether an upload waits for node i to take its NODE_STAGE calls.
    fn staging_to(&self, node: NodeId) -> bool {
        self.uploads.values().any(|u| u.node == node && u.in_flight > 0)
    }

    /// The connection of node i's link if it is up.
    fn ready_link(&self, node: NodeId) -> Option<usize> {
        match self.links.get(node) {
            Some(Link::Remote(RemoteLink { state: LinkState::Ready(key), .. })) => Some(*key),
            _ => None,
        }
    }

    /// The NODE_STAGE calls client `key`'s upload may send now: whole
    /// chunks while fewer than `STAGE_IN_FLIGHT` are unanswered, or with
    /// `last` (the upload is whole) everything not sent yet.
    fn stage_calls(&mut self, key: usize, last: bool) -> Vec<(u32, Pending, Vec<Piece>)> {
        let mut calls = Vec::new();
        while let Some(u) = self.uploads.get_mut(&key) {
            let left = u.stored - u.sent;
            let room = last || u.in_flight < STAGE_IN_FLIGHT;
            if u.dead || left == 0 || !room || (!last && left < STAGE_CHUNK) {
                break;
            }
            let len = left.min(STAGE_CHUNK);
            // A descriptor of its own, at the chunk's offset: the bytes go
            // from the page cache to the link by sendfile.
            let opened = File::open(&u.path).and_then(|mut f| f.seek(SeekFrom::Start(u.sent)).map(|_| f));
            let file = match opened {
                Ok(f) => f,
                Err(e) => {
                    log::warn!(
                        "stage {}: cannot read {} again ({e}); the job is sent whole",
                        u.stage,
                        u.path.display()
                    );
                    u.dead = true;
                    break;
                }
            };
            let args = proto::StageArgs { stage: u.stage, offset: u.sent };
            u.sent += len;
            u.in_flight += 1;
            let pending = Pending::Stage { client: key, stage: u.stage };
            let xid = self.next_xid;
            self.next_xid = self.next_xid.wrapping_add(1);
            let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_STAGE);
            args.encode(&mut w);
            calls.push((xid, pending, record::with_opaque(w, Piece::File { file, len })));
        }
        calls
    }

    /// Client `key`'s upload ended without a job (refused, broken, the
    /// client gone): its stage, if any, is dropped on its node.
    pub(crate) fn upload_gone(&mut self, key: usize) {
        if let Some(u) = self.uploads.remove(&key) {
            log::debug!("stage {}: the upload ended without a job; dropped", u.stage);
            self.coord.stage_abort(u.stage);
        }
    }

    /// A NODE_STAGE reply on node `node`'s link `conn`: the upload's next
    /// chunks go out on it, and its client may be read again.
    fn stage_reply(&mut self, node: NodeId, conn: &mut Conn, client: usize, stage: StageId, ok: Result<(), String>) {
        let Some(u) = self.uploads.get_mut(&client).filter(|u| u.stage == stage && u.node == node) else {
            return; // its upload is over (or the key is another client's now)
        };
        u.in_flight = u.in_flight.saturating_sub(1);
        if let Err(why) = ok {
            log::warn!("node {}: stage {stage}: {why}; the job is sent whole", self.node_names[node]);
            u.dead = true;
        }
        for (xid, pending, pieces) in self.stage_calls(client, false) {
            if let Reader::Replies(r) = &mut conn.reader {
                r.expect(xid, pending);
            }
            conn.outbox.push(pieces);
        }
        self.unstall.push(client);
    }

    /// A chunk of a DEPLOY's archive, checked before it is spooled. Returns
    /// true if it was refused (answered, the connection closing).
    pub(crate) fn deploy_data(&mut self, key: usize, conn: &mut Conn, data: &[u8]) -> bool {
        if let Sink::File { xid, what: Streamed::Deploy { check, .. }, error: None, .. } = &mut conn.sink {
            if self.inflate_scratch.is_empty() {
                self.inflate_scratch = vec![0; INFLATE_SCRATCH];
            }
            if let Err(why) = check.feed_using(data, &mut self.inflate_scratch) {
                // Refused mid-stream (a bomb, a traversal, not gzip):
                // answer now and hang up rather than take the rest.
                log::info!("connection {key}: deploy refused: {why}");
                let reply = encode_reply(*xid, Reply::Deploy(Err((CloudStat::BadArchive, why.0))));
                conn.sink.discard();
                self.upload_gone(key);
                conn.outbox.push(reply);
                conn.close_after_answer();
                return true;
            }
        }
        false
    }

    /// The end of a streamed DEPLOY archive (a client) or NODE_FETCH output
    /// (a link).
    pub(crate) fn stream_end(&mut self, key: usize, conn: &mut Conn) {
        let Sink::File { xid, what, file, path, error, pool, .. } = conn.sink.end() else {
            return;
        };
        drop(file);
        match what {
            Streamed::Fetch { ticket, replica, gone } => match error {
                Some(why) if !gone => {
                    give_back(&path, pool.as_ref());
                    self.coord.fetch_failed(ticket, replica, &why);
                }
                error => self.coord.fetched(ticket, replica, error.map_or(Ok(path), Err)),
            },
            Streamed::Deploy { replicas, flags, who, mut check, .. } => {
                if check.inflated() >= INFLATE_SCRATCH as u64 {
                    // A large upload touched every page of the scratch:
                    // give them back (a small one touches a few, kept).
                    self.inflate_scratch = Vec::new();
                }
                // The same call may have been uploaded on two connections at
                // once (a retry while the first upload was still arriving):
                // the one that ends second gets the first one's reply.
                if let Some(ticket) = self.coord.retried_deploy(xid, who, Instant::now()) {
                    log::info!("connection {key}: xid {xid:#x} was uploaded twice; answering as the first time");
                    self.upload_gone(key);
                    give_back(&path, pool.as_ref());
                    return conn.outbox.push(encode_reply(xid, Reply::Deploy(Ok(ticket))));
                }
                let refusal = match (error, check.finish()) {
                    (Some(msg), _) => Some((CloudStat::Internal, msg)),
                    (None, Err(why)) => {
                        log::info!("connection {key}: deploy refused: {why}");
                        Some((CloudStat::BadArchive, why.0))
                    }
                    // The ticket this DEPLOY may get is on disk before it is answered.
                    (None, Ok(_)) => self.tickets.ensure(self.coord.next_ticket()).err().map(|e| {
                        log::error!("cannot persist the ticket counter: {e}");
                        (CloudStat::Internal, format!("the server cannot record ticket numbers ({e}); retry later"))
                    }),
                };
                conn.stalled = false;
                match refusal {
                    Some(failure) => {
                        self.upload_gone(key);
                        give_back(&path, pool.as_ref());
                        conn.outbox.push(encode_reply(xid, Reply::Deploy(Err(failure))));
                    }
                    None => {
                        conn.awaiting += 1;
                        let stage = self.finish_stage(key);
                        let caller = Caller { conn: key, xid };
                        self.coord.deploy_staged(caller, who, replicas, flags, path, stage, Instant::now())
                    }
                }
            }
            Streamed::Run { .. } | Streamed::Stage { .. } => {} // a node's, never a main server's
        }
    }

    /// Client `key`'s staged upload is whole and checked: the rest of it
    /// goes to the node (into `outs`, ahead of the coordinator's
    /// NODE_RUN_STAGED on the same link), and the stage and its length
    /// are returned for the deploy; a void one is dropped (`None`).
    fn finish_stage(&mut self, key: usize) -> Option<(StageId, u64)> {
        let u = self.uploads.get(&key)?;
        if u.sent == 0 {
            // Nothing went yet (under a chunk): NODE_RUN takes it whole, as
            // it would have, in one call rather than two.
            let stage = u.stage;
            self.uploads.remove(&key);
            self.coord.stage_unused(stage);
            return None;
        }
        let link = self.ready_link(u.node).filter(|_| !u.dead && self.coord.stage_live(u.stage));
        let Some(link) = link else {
            self.upload_gone(key);
            return None;
        };
        for (xid, pending, pieces) in self.stage_calls(key, true) {
            self.outs.push(Out::Send { key: link, xid, pending, pieces });
        }
        let u = self.uploads.remove(&key)?;
        if u.dead {
            self.coord.stage_abort(u.stage);
            return None;
        }
        Some((u.stage, u.stored))
    }

    /// Handle what the main server's link to a node read.
    pub(crate) fn on_reply_event(&mut self, conn: &mut Conn, ev: ReplyEvent<Pending>) {
        let Role::NodeLink { node, .. } = conn.role else { return };
        // Anything from the node shows it alive (`heartbeats`).
        if let Some(r) = self.remote(node) {
            (r.heard, r.probe) = (Instant::now(), None);
        }
        let ev = match ev {
            ReplyEvent::Reply { call: call @ (Pending::Hello | Pending::Auth | Pending::Probe), results } => {
                return self.setup_reply(node, conn, call, results)
            }
            ev => ev,
        };
        let name = &self.node_names[node];
        match ev {
            ReplyEvent::Reply { call: Pending::Run(ticket), results } => {
                let result = results
                    .and_then(|b| RunResult::decode(&mut XdrReader::new(&b)).map_err(|e| e.to_string()))
                    .unwrap_or_else(|why| RunResult::lost(format!("node {name}: {why}")));
                self.coord.run_finished(node, ticket, result, Instant::now());
            }
            ReplyEvent::Reply { call: Pending::Fetch { ticket, replica, .. }, results } => {
                let why = results.err().unwrap_or_else(|| "the node sent no output".into());
                self.coord.fetched(ticket, replica, Err(why));
            }
            ReplyEvent::Reply {
                call: Pending::Drop | Pending::Hello | Pending::Auth | Pending::Probe | Pending::Heartbeat,
                ..
            } => {}
            ReplyEvent::Reply { call: Pending::Stage { client, stage }, results } => {
                let ok = results.and_then(|b| match XdrReader::new(&b).u32() {
                    Ok(0) => Ok(()),
                    Ok(stat) => Err(format!("the node could not take it (cloud_stat {stat})")),
                    Err(e) => Err(e.to_string()),
                });
                self.stage_reply(node, conn, client, stage, ok);
            }
            ReplyEvent::Reply { call: Pending::Follow { caller }, results } => {
                let result = results
                    .and_then(|b| proto::decode_follow(&mut XdrReader::new(&b)).map_err(|e| e.to_string()))
                    .and_then(|r| r.map_err(|(_, msg)| msg));
                self.coord.followed(caller, result);
            }
            ReplyEvent::StreamStart { call: Pending::Fetch { ticket, replica, into }, head, len } => {
                let stat = XdrReader::new(&head).u32().unwrap_or(u32::MAX);
                // A node caps outputs at --max-output (and a marker line):
                // one sending more is not believed, nor spooled (for good).
                let most = self.max_output.saturating_add(OUTPUT_MARKER_ROOM);
                let oversize = stat == CloudStat::Ok as u32 && u64::from(len) > most;
                let gone = stat == CloudStat::NoSuchTicket as u32;
                let what = Streamed::Fetch { ticket, replica, gone: gone || oversize };
                conn.sink = if oversize {
                    let why = format!("node {name} sent {len} bytes of output, more than --max-output allows");
                    log::warn!("{why}; not kept");
                    Sink::failed(0, what, why)
                } else if gone {
                    // The opaque holds the node's error message.
                    Sink::failed(0, what, format!("node {name} has no output for ticket {ticket}"))
                } else if stat != CloudStat::Ok as u32 {
                    Sink::failed(0, what, format!("node {name} cannot open the output now"))
                } else {
                    // `into` (the coordinator's name) is for in-process
                    // Slurm nodes' links; a link's output takes a spool file.
                    let _ = into;
                    Sink::take(0, what, &self.spool_pool, u64::from(len))
                };
            }
            ReplyEvent::StreamStart { .. } => conn.sink = Sink::None,
            ReplyEvent::StreamData(data) => conn.sink.write(data),
            ReplyEvent::StreamEnd => self.stream_end(0, conn),
            ReplyEvent::StreamBroken => {
                if let Sink::File { what: Streamed::Fetch { ticket, replica, .. }, .. } = conn.sink.discard() {
                    self.coord.fetch_failed(ticket, replica, &format!("node {name}'s reply was cut short"));
                }
            }
            ReplyEvent::Garbled(why) => {
                log::error!("node {name}: {why}; dropping the link");
                conn.closing = true;
            }
        }
    }

    /// Shutdown: journal what is buffered, keep the archives of queued
    /// jobs (they run after a restart) and empty the rest of the spool (its
    /// files stay for the next start), give back unused ticket numbers.
    /// Returns the answers that waited for the journal (now synced here,
    /// or refused if it cannot be), to send before the connections close.
    pub(crate) fn stop(&mut self) -> Vec<Out> {
        self.append_records();
        // Everything buffered, what was in flight included, synced here.
        let _ = self.journal.synced(Err(std::io::Error::other("stopping")));
        let mut held = std::mem::take(&mut self.held_in_flight);
        held.append(&mut self.held);
        let mut outs = Vec::new();
        match self.journal.sync() {
            Ok(()) => {
                for (to, reply) in held {
                    outs.push(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) });
                }
            }
            Err(e) => {
                self.sync_failed(&e, held, Instant::now(), &mut outs);
                let _ = self.journal.sync();
            }
        }
        if let Some(s) = self.syncer.take() {
            s.stop();
        }
        let kept: HashSet<PathBuf> = self.coord.kept_archives().cloned().collect();
        self.sweep_spool(&kept);
        if let Err(e) = self.tickets.release(self.coord.next_ticket()) {
            log::warn!("cannot give back unused ticket numbers: {e}");
        }
        outs
    }
}

/// Send a call that sets a link up, expecting its reply as `pending`.
fn send_setup(conn: &mut Conn, xid: u32, pending: Pending, call: crate::xdr::XdrWriter) {
    if let Reader::Replies(r) = &mut conn.reader {
        r.expect(xid, pending);
    }
    conn.outbox.push_bytes(call.into_bytes());
}

/// Log why node `name`'s link was refused: a warning the first time (or
/// when the reason changes), then quietly while it stays the same.
/// Whether the socket at the other end of a link belongs to this
/// process's user (the kernel's answer); `Err`: whose it is, for the log.
fn node_owner_is_ours(conn: &Conn) -> Result<(), String> {
    let me = nix::unistd::Uid::effective().as_raw();
    let owner = match (conn.stream.peer_addr(), conn.stream.local_addr()) {
        (Ok(peer), Ok(local)) => crate::peer::identify(peer, local),
        _ => crate::peer::PeerId::Unverified,
    };
    match owner {
        crate::peer::PeerId::Verified(uid) if uid == me => Ok(()),
        crate::peer::PeerId::Verified(uid) => Err(format!("uid {uid}'s")),
        _ => Err("a socket whose owner the kernel does not say".into()),
    }
}

fn refused(r: &mut RemoteLink, why: String) {
    if r.refused.as_ref() == Some(&why) {
        log::debug!("{why} (again)");
    } else {
        log::warn!("{why}");
        r.refused = Some(why);
    }
}

/// Encode a CLOUD_PROG result; RETRIEVE outputs are streamed from their files.
pub fn encode_reply(xid: u32, reply: Reply) -> Vec<Piece> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    let ok = CloudStat::Ok as u32;
    match reply {
        Reply::Deploy(Ok(ticket)) => {
            w.u32(ok).u32(ticket);
        }
        Reply::Status(Ok(st)) => {
            w.u32(ok);
            st.encode(&mut w);
        }
        Reply::Close(Ok(())) | Reply::Cancel(Ok(())) => {
            w.u32(ok);
        }
        Reply::Cluster(view) => {
            w.u32(ok);
            view.encode(&mut w);
        }
        Reply::Mine(tickets) => {
            w.u32(ok);
            proto::encode_tickets(&mut w, &tickets);
        }
        Reply::Follow(Ok(chunk)) => return vec![Piece::Bytes(follow_reply(xid, &Ok(chunk)))],
        Reply::JobInfo(Ok(info)) => {
            w.u32(ok);
            info.encode(&mut w);
        }
        Reply::Retrieve(Ok(outs)) => return retrieve_pieces(xid, outs),
        Reply::Deploy(Err(e))
        | Reply::Status(Err(e))
        | Reply::Retrieve(Err(e))
        | Reply::Close(Err(e))
        | Reply::Cancel(Err(e))
        | Reply::JobInfo(Err(e))
        | Reply::Follow(Err(e)) => return vec![Piece::Bytes(failure_reply(xid, &e))],
    }
    vec![Piece::Bytes(w.into_bytes())]
}

/// A CLOUD_PROG error result for call `xid`.
fn failure_reply(xid: u32, (stat, msg): &Failure) -> Vec<u8> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    proto::encode_error(&mut w, *stat, msg);
    w.into_bytes()
}

/// RETRIEVE's OK reply. Every output is opened now, so the reply is OK only
/// if all of them can be sent (a queued reply holds at most one descriptor
/// per replica); if one cannot, the reply is an error, the spooled outputs
/// stay, and a retry may succeed.
fn retrieve_pieces(xid: u32, outs: Vec<OutputRef>) -> Vec<Piece> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    w.u32(CloudStat::Ok as u32).u32(outs.len() as u32);
    let mut pieces = Vec::new();
    for out in outs {
        out.status.encode(&mut w);
        if out.path.as_os_str().is_empty() {
            w.u32(0); // never ran, or lost with its node: the message says so
            continue;
        }
        let opened = File::open(&out.path).and_then(|f| f.metadata().map(|m| (f, m.len())));
        match opened {
            Ok((file, len)) => w = record::push_opaque(&mut pieces, w, Piece::File { file, len }),
            Err(e) => {
                log::warn!("cannot open {}: {e}", out.path.display());
                let why = match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => "the server is out of file descriptors".to_string(),
                    _ => e.to_string(),
                };
                let failure = (CloudStat::Internal, format!("could not read the outputs: {why}; retry"));
                return vec![Piece::Bytes(failure_reply(xid, &failure))];
            }
        }
    }
    pieces.push(Piece::Bytes(w.into_bytes()));
    pieces
}
