//! The reactor: one thread, one `mio::Poll`, every socket and pipe.
//!
//! Owns: the poll, the slab of connections (each a `conn::Conn`) and child
//! pipes (token = slab key + `first_key`), listeners, the signalfd (SIGCHLD; SIGINT, SIGTERM, SIGHUP unless ignored),
//! reading until `WouldBlock` into the session readers, writing outboxes
//! until `WouldBlock`, serving each client one call at a time
//! (backpressure), spooling streamed archives and outputs to disk (a
//! DEPLOY's archive is fed to `archive_check` as it arrives and refused
//! with CLOUD_BAD_ARCHIVE, spool file removed, no ticket), reaping
//! children, the poll timeout from the nodes' deadlines, and startup
//! (reclaiming what an earlier run left, one empty network namespace per
//! node, the containment probe, cgroups) and shutdown. At accept it asks
//! `peer` who owns a loopback client's socket;
//! each client call's identity (`peer::caller_uid`) goes to the coordinator
//! (which answers a retried DEPLOY or CLOSE from its duplicate request
//! cache, also asked before a retried DEPLOY's archive is taken), and a
//! DEPLOY waits for its ticket number to be persisted (`tickets`).
//! Connection limits: client timeouts (decided in `timers`, applied
//! here), `--max-connections` (the longest-idle client makes room), and a
//! reserve descriptor so that at EMFILE a new client is accepted and closed
//! rather than left hanging in the backlog.
//! Must not touch: job rules (the `coordinator` decides), process setup
//! (`spawn`), a node's replica bookkeeping (`node`). Each event is turned
//! into a call on one of those and their answers into bytes.

use std::fs::{self, File};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use slab::Slab;

use crate::archive_check::ArchiveCheck;
use crate::config::NodesFile;
use crate::conn::{Conn, Linger, Pending, Reader, Role, Sink, Streamed};
use crate::coordinator::{Action, Caller, Coordinator, Failure, NodeCall, OutputRef, Reply};
use crate::node::{Drained, Finished, Node, NodeConfig};
use crate::peer::{self, PeerId};
use crate::proto::{self, CloudStat, RunArgs, RunResult};
use crate::record::{self, Outbox, Piece};
use crate::rpc::{self, AcceptStat};
use crate::scheduler::NodeId;
use crate::session::{Call, CallEvent, ReplyEvent};
use crate::spawn::{Containment, JobLimits, Sandbox};
use crate::tickets::TicketStore;
use crate::timers::ConnTimers;
use crate::xdr::XdrReader;

const SIGNALS: Token = Token(0);
const CLIENTS: Token = Token(1);
/// Node listener i has token 2 + i; slab keys start after them.
const NODE_LISTENER_BASE: usize = 2;
/// Chunks (64 KiB each) read from one replica's output per turn of the loop.
const DRAIN_BUDGET: usize = 4;
/// Reads (up to 64 KiB each) from one connection per turn of the loop.
const READ_BUDGET: usize = 4;
/// Bytes a DEPLOY's archive check may inflate per read before that read
/// uses up the connection's budget for the turn (a highly compressed upload).
const INFLATE_PER_READ: u64 = 4 << 20;

/// What the operator chose on the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub nodes: NodesFile,
    pub nodes_path: PathBuf,
    pub listen: SocketAddr,
    pub work_dir: PathBuf,
    pub max_queue: usize,
    /// Tickets one uid may hold at once (`--max-tickets-per-user`).
    pub max_tickets_per_user: usize,
    pub max_archive: u64,
    pub limits: JobLimits,
    pub time_limit: Duration,
    pub kill_grace: Duration,
    pub max_output: u64,
    /// Finished jobs not retrieved within this are closed (`None`: never).
    pub ticket_ttl: Option<Duration>,
    /// Per-node identity: `None` runs as the server's own user.
    pub identities: Vec<Option<(nix::unistd::Uid, nix::unistd::Gid)>>,
    /// Whether each node's uid is its own (what an earlier run left under
    /// those uids is killed at start).
    pub slot_uids: bool,
    pub isolate_network: bool,
    pub containment: Containment,
    /// How replicas run, for the ready line.
    pub sandbox_summary: String,
    /// Only this uid (and root) may deploy; `None`: anyone.
    pub only_deployer: Option<u32>,
    /// Client connections held at most (lowered to what RLIMIT_NOFILE allows).
    pub max_connections: usize,
    /// A client with no call in progress and no reply owed is closed after this.
    pub idle_timeout: Duration,
    /// A call being received, or a reply being sent, must progress within this.
    pub call_timeout: Duration,
}

/// Descriptors kept back from `--max-connections`: listeners, signalfd,
/// epoll, the reserve, logs (`BASE`), and per node its listener, link ends,
/// replica pipe, archive, output and fetch files (`PER_NODE`); plus one in
/// `SPOOL_SHARE` of the rest for spool files of uploads and replies.
const FD_HEADROOM_BASE: u64 = 64;
const FD_HEADROOM_PER_NODE: u64 = 8;
const FD_SPOOL_SHARE: u64 = 8;

/// The `--max-connections` that RLIMIT_NOFILE `nofile` leaves room for.
pub fn effective_max_connections(requested: usize, nofile: u64, nodes: usize) -> usize {
    let headroom = FD_HEADROOM_BASE + FD_HEADROOM_PER_NODE * nodes as u64 + nofile / FD_SPOOL_SHARE;
    let room = nofile.saturating_sub(headroom);
    (requested as u64).min(room) as usize
}

#[derive(Debug)]
enum Source {
    Conn(Box<Conn>),
    /// The output pipe of node i's running replica.
    ChildOutput(NodeId),
    /// Placeholder while a connection is being handled.
    Taken,
}

pub struct Server {
    poll: Poll,
    slab: Slab<Source>,
    clients: TcpListener,
    node_listeners: Vec<TcpListener>,
    signals: SignalFd,
    nodes: Vec<Node>,
    child_keys: Vec<Option<usize>>,
    links: Vec<Option<usize>>,
    /// The main server's end of each link: the only peer a node accepts.
    link_addrs: Vec<Option<SocketAddr>>,
    coord: Coordinator,
    spool: PathBuf,
    node_names: Vec<String>,
    local_addr: SocketAddr,
    max_archive: u64,
    /// The rules a DEPLOY's archive is checked against as it arrives.
    extract_limits: crate::extract::ExtractLimits,
    next_xid: u32,
    next_spool: u64,
    rbuf: Vec<u8>,
    dead: Vec<usize>,
    /// Nodes whose output pipe still had data when their read budget ran out.
    more_output: Vec<NodeId>,
    /// Connections that used their read budget with data possibly left.
    more_input: Vec<usize>,
    shutdown: bool,
    summary: String,
    /// The uids replicas run as (slot uids, or `--run-as`): a job (with
    /// `--allow-network`) calling its own server is refused, or it could
    /// deploy jobs that outlive its ticket, owned by a uid its deployer
    /// cannot close, and reach tickets of the uid's earlier tenants.
    job_uids: Vec<u32>,
    tickets: TicketStore,
    /// Client connection deadlines.
    timers: ConnTimers,
    max_connections: usize,
    /// One descriptor held back (/dev/null), given up at EMFILE to accept
    /// and close a client instead of leaving it in the backlog.
    reserve: Option<File>,
    /// Warned about running out of descriptors / connections in this burst.
    warned_fds: bool,
    warned_full: bool,
    /// Logged once serving starts, after the ready line.
    limits_line: String,
}

fn first_key(nodes: usize) -> usize {
    NODE_LISTENER_BASE + nodes
}

impl Server {
    /// Bind every port, start the nodes and link them to the main server.
    /// Errors are one line for the operator.
    pub fn start(cfg: ServerConfig) -> Result<Server, String> {
        let n = cfg.nodes.ports.len();
        fs::create_dir_all(&cfg.work_dir)
            .map_err(|e| format!("cannot create work dir {}: {e}", cfg.work_dir.display()))?;
        // Absolute: replicas' init mounts over it by path.
        let work_dir = fs::canonicalize(&cfg.work_dir)
            .map_err(|e| format!("cannot resolve work dir {}: {e}", cfg.work_dir.display()))?;
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
        let (cgroups, cgroup_summary) = match crate::cgroup::Cgroups::detect(&crate::cgroup::tag_for(&work_dir)) {
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
        let mut cfg = cfg;
        if cgroups.is_none() && cfg.containment != Containment::UserNamespace {
            cfg.limits.nproc_rlimit = cfg.limits.processes.is_some();
        }
        // Before listening: can replicas be contained as configured here?
        let (isolate_network, containment) = (cfg.isolate_network, cfg.containment);
        let sandbox_for = |identity| Sandbox { identity, isolate_network, containment };
        let sandbox = sandbox_for(cfg.identities.first().copied().flatten());
        let probe_ns = netns.first().and_then(|ns| ns.as_deref()).map(|fd| std::os::fd::AsFd::as_fd(fd));
        crate::spawn::probe(sandbox, &cfg.limits, &work_dir, probe_ns, cgroups.as_deref())?;
        let spool = work_dir.join("spool");
        let _ = fs::remove_dir_all(&spool);
        fs::create_dir_all(&spool).map_err(|e| format!("cannot create {}: {e}", spool.display()))?;

        let poll = Poll::new().map_err(|e| format!("cannot create epoll instance: {e}"))?;
        let mut clients = TcpListener::bind(cfg.listen).map_err(|e| bind_error(e, cfg.listen, "--listen"))?;
        let local_addr = clients.local_addr().map_err(|e| e.to_string())?;
        let mut node_listeners = Vec::with_capacity(n);
        let mut nodes = Vec::with_capacity(n);
        let mut node_names = Vec::with_capacity(n);
        for (i, &port) in cfg.nodes.ports.iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let where_ = format!("{} line {}", cfg.nodes_path.display(), cfg.nodes.line_of(i));
            let l = TcpListener::bind(addr).map_err(|e| bind_error(e, addr, &where_))?;
            node_listeners.push(l);
            node_names.push(addr.to_string());
            let dir = work_dir.join(format!("output_{port}"));
            let _ = fs::remove_dir_all(&dir); // stale workspaces of an earlier run
            let node = Node::new(NodeConfig {
                port,
                dir: dir.clone(),
                limits: cfg.limits.clone(),
                sandbox: sandbox_for(cfg.identities[i]),
                time_limit: cfg.time_limit,
                kill_grace: cfg.kill_grace,
                max_output: cfg.max_output,
                work_dir: work_dir.clone(),
                netns: netns[i].clone(),
                cgroups: cgroups.clone(),
            })
            .map_err(|e| format!("cannot create node directory {}: {e}", dir.display()))?;
            nodes.push(node);
        }

        // Signals arrive as readable events, never as handlers.
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        // Started under nohup, SIGHUP is ignored: leave it so (blocked, it
        // would be queued for the signalfd and stop us when the terminal goes).
        if !ignored(Signal::SIGHUP) {
            mask.add(Signal::SIGHUP);
        }
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
            .map_err(|e| format!("cannot block signals: {e}"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| format!("cannot create signalfd: {e}"))?;
        // Orphaned descendants of replicas are re-parented to us, so we reap them.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            log::warn!("cannot become a child subreaper: {e}");
        }

        let reg = poll.registry();
        reg.register(&mut SourceFd(&signals.as_raw_fd()), SIGNALS, Interest::READABLE)
            .and_then(|_| reg.register(&mut clients, CLIENTS, Interest::READABLE))
            .map_err(|e| format!("cannot register with epoll: {e}"))?;
        for (i, l) in node_listeners.iter_mut().enumerate() {
            reg.register(l, Token(NODE_LISTENER_BASE + i), Interest::READABLE)
                .map_err(|e| format!("cannot register with epoll: {e}"))?;
        }

        let (tickets, next_ticket) = TicketStore::open(&cfg.work_dir)?;
        log::info!("tickets continue from {next_ticket}");
        let mut coord = Coordinator::new(node_names.clone(), cfg.max_queue, spool.clone(), cfg.ticket_ttl);
        coord.resume_tickets_from(next_ticket);
        coord.max_tickets_per_user(cfg.max_tickets_per_user);
        if let Some(uid) = cfg.only_deployer {
            coord.only_deployer(uid);
        }
        let nofile =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        let max_connections = effective_max_connections(cfg.max_connections, nofile, n);
        if max_connections == 0 {
            return Err(format!(
                "RLIMIT_NOFILE is {nofile}: too low to serve clients with {n} nodes; raise it (ulimit -n)"
            ));
        }
        let limits_line = format!(
            "up to {max_connections} client connections (--max-connections {}, RLIMIT_NOFILE {nofile}); \
             idle timeout {}s, call timeout {}s",
            cfg.max_connections,
            cfg.idle_timeout.as_secs(),
            cfg.call_timeout.as_secs()
        );
        let reserve = File::open("/dev/null").map_err(|e| format!("cannot open /dev/null: {e}"))?;
        let mut server = Server {
            poll,
            slab: Slab::new(),
            clients,
            node_listeners,
            signals,
            nodes,
            child_keys: vec![None; n],
            links: vec![None; n],
            link_addrs: vec![None; n],
            coord,
            spool,
            node_names,
            local_addr,
            max_archive: cfg.max_archive,
            extract_limits: cfg.limits.extract,
            next_xid: 1,
            next_spool: 0,
            rbuf: vec![0; 64 * 1024],
            dead: Vec::new(),
            more_output: Vec::new(),
            more_input: Vec::new(),
            shutdown: false,
            summary: format!("{}; {cgroup_summary}", cfg.sandbox_summary),
            job_uids: cfg.identities.iter().flatten().map(|(u, _)| u.as_raw()).collect(),
            tickets,
            timers: ConnTimers::new(cfg.idle_timeout, cfg.call_timeout),
            max_connections,
            reserve: Some(reserve),
            warned_fds: false,
            warned_full: false,
            limits_line,
        };
        server.link_nodes()?;
        Ok(server)
    }

    /// Connect the main server to every node and wait until all links are up.
    fn link_nodes(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let addr = self.node_listeners[i].local_addr().map_err(|e| e.to_string())?;
            let stream = TcpStream::connect(addr).map_err(|e| format!("cannot connect to node {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            self.link_addrs[i] = Some(stream.local_addr().map_err(|e| format!("link to node {addr}: {e}"))?);
            let role = Role::NodeLink { node: i, connected: false };
            let key = self
                .add_conn(stream, role, PeerId::Unverified, true)
                .map_err(|e| format!("cannot register link: {e}"))?;
            self.links[i] = Some(key);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = Events::with_capacity(64);
        while !self.all_linked() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the main server could not connect to its nodes within 10s".into());
            }
            match self.poll.poll(&mut events, Some(left)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("epoll failed: {e}")),
            }
            for ev in events.iter() {
                self.dispatch(ev.token());
            }
            self.settle();
            if self.shutdown {
                return Err("interrupted while starting".into());
            }
        }
        Ok(())
    }

    fn all_linked(&self) -> bool {
        let linked = self.links.iter().all(|k| {
            matches!(k.and_then(|k| self.slab.get(k)), Some(Source::Conn(c)) if matches!(c.role, Role::NodeLink { connected: true, .. }))
        });
        let inbound = self
            .slab
            .iter()
            .filter(|(_, s)| matches!(s, Source::Conn(c) if matches!(c.role, Role::NodeInbound(_))))
            .count();
        linked && inbound == self.nodes.len()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The one line printed when the server is ready.
    pub fn ready_line(&self) -> String {
        format!(
            "cloud-server: listening on {} with {} nodes: {}; {}",
            self.local_addr,
            self.nodes.len(),
            self.node_names.join(" "),
            self.summary
        )
    }

    /// Serve until SIGINT, SIGTERM or SIGHUP, then stop every replica.
    pub fn run(&mut self) -> io::Result<()> {
        log::info!("{}", self.limits_line);
        let mut events = Events::with_capacity(256);
        while !self.shutdown {
            let timeout = self.next_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                self.dispatch(ev.token());
            }
            // Pipes and sockets left with data (edge-triggered: no new event
            // will say so).
            for node in std::mem::take(&mut self.more_output) {
                self.drain_child(node);
            }
            for key in std::mem::take(&mut self.more_input) {
                if matches!(self.slab.get(key), Some(Source::Conn(_))) {
                    self.conn_event(key);
                }
            }
            let now = Instant::now();
            for node in &mut self.nodes {
                if node.deadline().is_some_and(|d| d <= now) {
                    node.on_timer(now);
                }
            }
            self.coord.on_timer(now);
            for (key, phase) in self.timers.expired(now) {
                log::debug!("connection {key}: timed out ({phase:?}); closing");
                self.close_conn(key);
            }
            self.settle();
        }
        self.stop();
        Ok(())
    }

    /// Poll timeout: until the earliest deadline (a node's time limit, a
    /// ticket's expiry), or forever.
    fn next_timeout(&self) -> Option<Duration> {
        if !self.more_output.is_empty() || !self.more_input.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let nodes = self.nodes.iter().filter_map(|n| n.deadline());
        let conns = self.timers.next_deadline();
        nodes.chain(self.coord.next_deadline()).chain(conns).min().map(|d| d.saturating_duration_since(now))
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            SIGNALS => self.on_signals(),
            CLIENTS => self.accept(None),
            Token(t) if t < first_key(self.nodes.len()) => self.accept(Some(t - NODE_LISTENER_BASE)),
            Token(t) => {
                let key = t - first_key(self.nodes.len());
                match self.slab.get(key) {
                    Some(Source::Conn(_)) => self.conn_event(key),
                    Some(Source::ChildOutput(i)) => {
                        let i = *i;
                        self.drain_child(i);
                    }
                    _ => {} // stale event for a closed source
                }
            }
        }
    }

    /// Run coordinator actions and close dead connections until quiet.
    fn settle(&mut self) {
        loop {
            let mut busy = false;
            while let Some(action) = self.coord.poll_action() {
                busy = true;
                self.perform(action);
            }
            while let Some(key) = self.dead.pop() {
                busy = true;
                // A reply queued since it was marked keeps it open a while longer.
                if matches!(self.slab.get(key), Some(Source::Conn(c)) if c.finished()) {
                    self.close_conn(key);
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn accept(&mut self, node: Option<NodeId>) {
        loop {
            let res = match node {
                None => self.clients.accept(),
                Some(i) => self.node_listeners[i].accept(),
            };
            match res {
                Ok((stream, peer)) => {
                    self.warned_fds = false;
                    if node.is_none() && !self.make_room() {
                        continue; // dropped: closed at once, never left waiting
                    }
                    if let Some(i) = node {
                        // A node serves its main server and nobody else.
                        if self.link_addrs[i] != Some(peer) {
                            log::warn!("node {}: refused a connection from {peer}", self.node_names[i]);
                            continue;
                        }
                    }
                    let role = match node {
                        None => Role::Client,
                        Some(i) => Role::NodeInbound(i),
                    };
                    log::debug!("accepted {peer} as {role:?}");
                    let _ = stream.set_nodelay(true);
                    // Who owns the client's socket: asked once, before its first call.
                    let id = match (node, stream.local_addr()) {
                        (None, Ok(local)) => peer::identify(peer, local),
                        _ => PeerId::Unverified,
                    };
                    if let Err(e) = self.add_conn(stream, role, id, false) {
                        log::warn!("cannot register connection from {peer}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Give up the reserve for a moment: accept and close, so
                    // the client learns at once instead of hanging.
                    if self.reserve.take().is_none() {
                        return;
                    }
                    let turned_away = match node {
                        None => self.clients.accept(),
                        Some(i) => self.node_listeners[i].accept(),
                    }
                    .map(drop); // closed before the reserve is taken back
                    self.reserve = File::open("/dev/null").ok();
                    if self.reserve.is_none() {
                        log::error!("cannot reopen the reserve descriptor: {e}");
                    }
                    if !self.warned_fds {
                        self.warned_fds = true;
                        log::warn!(
                            "out of file descriptors ({e}): closing new connections at once; \
                             raise RLIMIT_NOFILE or lower --max-connections"
                        );
                    }
                    if turned_away.is_err() {
                        return; // the backlog is empty (or this did not help)
                    }
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Room for one more client under `--max-connections`: the connection
    /// idle the longest is closed; false if none is idle (the new one is
    /// then closed instead).
    fn make_room(&mut self) -> bool {
        if self.timers.len() < self.max_connections {
            self.warned_full = false;
            return true;
        }
        if !self.warned_full {
            self.warned_full = true;
            log::warn!(
                "{} client connections (--max-connections): closing the longest idle to make room",
                self.max_connections
            );
        }
        match self.timers.oldest_idle() {
            Some(victim) => {
                log::debug!("connection {victim}: closed to make room");
                self.close_conn(victim);
                true
            }
            None => false,
        }
    }

    /// Tell the timers what a client connection is doing now.
    fn retime(&mut self, key: usize, conn: &mut Conn) {
        if let Some((phase, moved)) = conn.timer_phase() {
            self.timers.update(key, phase, moved, Instant::now());
        }
    }

    fn add_conn(&mut self, mut stream: TcpStream, role: Role, peer: PeerId, writable: bool) -> io::Result<usize> {
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        let token = Token(key + first_key(self.nodes.len()));
        let interest = if writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        self.poll.registry().register(&mut stream, token, interest)?;
        entry.insert(Source::Conn(Box::new(Conn::new(stream, token, role, peer, writable, self.max_archive))));
        if matches!(self.slab.get(key), Some(Source::Conn(c)) if matches!(c.role, Role::Client)) {
            self.timers.add(key, Instant::now());
        }
        Ok(key)
    }

    fn take_conn(&mut self, key: usize) -> Option<Box<Conn>> {
        match self.slab.get_mut(key) {
            Some(s @ Source::Conn(_)) => match std::mem::replace(s, Source::Taken) {
                Source::Conn(c) => Some(c),
                _ => None,
            },
            _ => None,
        }
    }

    fn conn_event(&mut self, key: usize) {
        let Some(mut conn) = self.take_conn(key) else {
            return;
        };
        if let Role::NodeLink { connected, node, .. } = &mut conn.role {
            if !*connected {
                match conn.stream.take_error() {
                    Ok(None) if conn.stream.peer_addr().is_ok() => {
                        *connected = true;
                        log::debug!("link to node {} is up", self.node_names[*node]);
                    }
                    Ok(None) => {} // still connecting
                    Ok(Some(e)) | Err(e) => {
                        log::error!("cannot connect to node {}: {e}", self.node_names[*node]);
                        conn.closing = true;
                    }
                }
            }
        }
        self.drive(key, &mut conn);
        self.retime(key, &mut conn);
        self.slab[key] = Source::Conn(conn);
        self.check_done(key);
    }

    /// Read, decode, handle and write until the connection would block or
    /// must wait for a reply.
    fn drive(&mut self, key: usize, conn: &mut Conn) {
        // One budget for the whole turn, however many calls it holds.
        let mut budget = READ_BUDGET;
        loop {
            let paused = self.conn_read(key, conn, &mut budget);
            self.flush(conn);
            // A client paused for its reply, now sent, may have more calls
            // held or waiting in the socket: go on with them.
            if !(paused && !conn.busy() && !conn.closing) {
                break;
            }
        }
    }

    /// Read until WouldBlock, EOF or backpressure. Returns true if paused
    /// for backpressure.
    fn conn_read(&mut self, key: usize, conn: &mut Conn, budget: &mut usize) -> bool {
        let mut buf = std::mem::take(&mut self.rbuf);
        let mut paused = false;
        loop {
            if conn.closing {
                if conn.linger == Linger::Draining && !conn.drain_refused(&mut buf, budget) {
                    self.again(key);
                }
                break;
            }
            if conn.busy() {
                paused = true;
                break;
            }
            if *budget == 0 {
                // Fair share used: others go first, then this one again.
                self.again(key);
                break;
            }
            *budget -= 1;
            if !conn.held.is_empty() {
                let held = std::mem::take(&mut conn.held);
                self.feed(key, conn, &held);
                continue;
            }
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    if matches!(&conn.reader, Reader::Calls(r) if !r.at_boundary()) {
                        log::debug!("connection {key}: peer closed in the middle of a record");
                    }
                    conn.closing = true;
                    self.peer_closed(conn);
                    break;
                }
                Ok(n) => {
                    conn.moved += n as u64;
                    self.feed(key, conn, &buf[..n]);
                    if conn.sink.inflated_since() > INFLATE_PER_READ {
                        *budget = 0; // a highly compressed upload: its share of this turn is used
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("connection {key}: read error: {e}");
                    conn.closing = true;
                    self.peer_closed(conn);
                    break;
                }
            }
        }
        self.rbuf = buf;
        paused
    }

    fn peer_closed(&mut self, conn: &mut Conn) {
        conn.sink.discard();
    }

    fn feed(&mut self, key: usize, conn: &mut Conn, mut data: &[u8]) {
        loop {
            let (n, call_done) = match &mut conn.reader {
                Reader::Calls(r) => match r.read(data) {
                    (n, Some(ev)) => (n, Some(self.on_call_event(key, conn, ev))),
                    (n, None) => (n, None),
                },
                Reader::Replies(r) => match r.read(data) {
                    (n, Some(ev)) => {
                        self.on_reply_event(conn, ev);
                        (n, Some(false))
                    }
                    (n, None) => (n, None),
                },
            };
            data = &data[n..];
            let Some(call_done) = call_done else { return };
            if call_done && conn.busy() {
                // Keep the rest for when this call has been answered.
                conn.held.extend_from_slice(data);
                return;
            }
        }
    }

    /// Handle what a serving connection read. Returns true when a call has
    /// been dealt with (answered, or handed on).
    fn on_call_event(&mut self, key: usize, conn: &mut Conn, ev: CallEvent) -> bool {
        match ev {
            CallEvent::Call(call) => {
                match conn.role {
                    Role::NodeInbound(i) if call.proc_num == proto::NODE_FOLLOW => self.node_follow(i, key, conn, call),
                    Role::NodeInbound(i) => self.node_call(i, conn, call),
                    _ => self.client_call(key, conn, call),
                }
                true
            }
            CallEvent::StreamStart { call, len } => {
                self.stream_start(key, conn, call, len);
                false
            }
            CallEvent::StreamData(data) => {
                if let Sink::File { xid, what: Streamed::Deploy { check, .. }, error: None, .. } = &mut conn.sink {
                    if let Err(why) = check.feed(data) {
                        // Refused mid-stream (a bomb, a traversal, not gzip):
                        // answer now and hang up rather than take the rest.
                        log::info!("connection {key}: deploy refused: {why}");
                        let reply = encode_reply(*xid, Reply::Deploy(Err((CloudStat::BadArchive, why.0))));
                        conn.sink.discard();
                        conn.outbox.push(reply);
                        conn.close_after_answer();
                        return true;
                    }
                }
                conn.sink.write(data);
                false
            }
            CallEvent::StreamEnd => {
                self.stream_end(key, conn);
                true
            }
            CallEvent::StreamBroken(reply) => {
                conn.sink.discard();
                conn.outbox.push_bytes(reply);
                true
            }
            CallEvent::Reply(reply) => {
                conn.outbox.push_bytes(reply);
                true
            }
            CallEvent::ReplyAndClose(reply) => {
                log::debug!("connection {key}: over a limit; answering and closing");
                conn.outbox.push_bytes(reply);
                conn.close_after_answer();
                true
            }
            CallEvent::Close => {
                log::debug!("connection {key}: closing after a refusal");
                conn.closing = true;
                true
            }
        }
    }

    /// Handle what the main server's link to a node read.
    fn on_reply_event(&mut self, conn: &mut Conn, ev: ReplyEvent<Pending>) {
        let Role::NodeLink { node, .. } = conn.role else { return };
        let name = &self.node_names[node];
        match ev {
            ReplyEvent::Reply { call: Pending::Run, results } => {
                let result = results
                    .and_then(|b| RunResult::decode(&mut XdrReader::new(&b)).map_err(|e| e.to_string()))
                    .unwrap_or_else(|why| RunResult::lost(format!("node {name}: {why}")));
                self.coord.run_finished(node, result, Instant::now());
            }
            ReplyEvent::Reply { call: Pending::Fetch { ticket, replica, .. }, results } => {
                let why = results.err().unwrap_or_else(|| "the node sent no output".into());
                self.coord.fetched(ticket, replica, Err(why));
            }
            ReplyEvent::Reply { call: Pending::Drop, .. } => {}
            ReplyEvent::Reply { call: Pending::Follow { caller }, results } => {
                // branch cli: FOLLOW
                let result = results
                    .and_then(|b| proto::decode_follow(&mut XdrReader::new(&b)).map_err(|e| e.to_string()))
                    .and_then(|r| r.map_err(|(_, msg)| msg));
                self.coord.followed(caller, result);
            }
            ReplyEvent::StreamStart { call: Pending::Fetch { ticket, replica, into }, head, .. } => {
                let stat = XdrReader::new(&head).u32().unwrap_or(u32::MAX);
                let gone = stat == CloudStat::NoSuchTicket as u32;
                let what = Streamed::Fetch { ticket, replica, gone };
                conn.sink = if gone {
                    // The opaque holds the node's error message.
                    Sink::failed(0, what, format!("node {name} has no output for ticket {ticket}"))
                } else if stat != CloudStat::Ok as u32 {
                    Sink::failed(0, what, format!("node {name} cannot open the output now"))
                } else {
                    Sink::open(0, what, into)
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

    fn stream_start(&mut self, key: usize, conn: &mut Conn, call: Call, len: u32) {
        let mut r = XdrReader::new(&call.args);
        let what = match conn.role {
            Role::Client => {
                let Ok(replicas) = r.u32() else { return conn.outbox.push_bytes(garbage(call.xid)) };
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
                Streamed::Deploy { replicas, who, check: Box::new(ArchiveCheck::new(self.extract_limits)) }
            }
            _ => match RunArgs::decode(&mut r) {
                Ok(args) => Streamed::Run { args },
                Err(_) => return conn.outbox.push_bytes(garbage(call.xid)),
            },
        };
        log::debug!("connection {key}: xid {:#x}: receiving a {len} byte archive", call.xid);
        conn.sink = match (&what, &conn.role) {
            (Streamed::Run { args }, Role::NodeInbound(i)) => match self.nodes[*i].prepare_archive(args.ticket) {
                Ok((file, path)) => Sink::File { xid: call.xid, what, file: Some(file), path, error: None },
                Err(e) => Sink::failed(call.xid, what, format!("the node cannot store the archive: {e}")),
            },
            _ => {
                self.next_spool += 1;
                Sink::open(call.xid, what, self.spool.join(format!("incoming-{key}-{}", self.next_spool)))
            }
        };
    }

    fn stream_end(&mut self, key: usize, conn: &mut Conn) {
        let Sink::File { xid, what, file, path, error } = std::mem::replace(&mut conn.sink, Sink::None) else {
            return;
        };
        drop(file);
        match what {
            Streamed::Fetch { ticket, replica, gone } => match error {
                Some(why) if !gone => {
                    let _ = fs::remove_file(&path);
                    self.coord.fetch_failed(ticket, replica, &why);
                }
                error => self.coord.fetched(ticket, replica, error.map_or(Ok(path), Err)),
            },
            Streamed::Deploy { replicas, who, mut check } => {
                // The same call may have been uploaded on two connections at
                // once (a retry while the first upload was still arriving):
                // the one that ends second gets the first one's reply.
                if let Some(ticket) = self.coord.retried_deploy(xid, who, Instant::now()) {
                    log::info!("connection {key}: xid {xid:#x} was uploaded twice; answering as the first time");
                    let _ = fs::remove_file(&path);
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
                match refusal {
                    Some(failure) => {
                        let _ = fs::remove_file(&path);
                        conn.outbox.push(encode_reply(xid, Reply::Deploy(Err(failure))));
                    }
                    None => {
                        conn.awaiting += 1;
                        self.coord.deploy(Caller { conn: key, xid }, who, replicas, path, Instant::now())
                    }
                }
            }
            Streamed::Run { args } => {
                let Role::NodeInbound(i) = conn.role else { return };
                let started = match error {
                    Some(msg) => Err(RunResult::invalid(msg)),
                    None => self.nodes[i].start(args, (key, xid), Instant::now()),
                };
                match started {
                    Ok(fd) => self.watch_child(i, fd),
                    Err(result) => conn.outbox.push_bytes(run_reply(xid, &result)),
                }
            }
        }
    }

    /// Read a replica's output, a bounded amount per turn of the loop.
    fn drain_child(&mut self, node: NodeId) {
        if self.nodes[node].drain_output(DRAIN_BUDGET) == Drained::More && !self.more_output.contains(&node) {
            self.more_output.push(node);
        }
        self.answer_followers(node); // branch cli: FOLLOW
    }

    fn watch_child(&mut self, node: NodeId, fd: std::os::fd::RawFd) {
        let entry = self.slab.vacant_entry();
        let token = Token(entry.key() + first_key(self.nodes.len()));
        match self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
            Ok(()) => {
                self.child_keys[node] = Some(entry.key());
                entry.insert(Source::ChildOutput(node));
            }
            Err(e) => log::error!("cannot watch a replica's output: {e}"),
        }
        // Output written before registration is read now.
        self.drain_child(node);
    }

    /// A whole call from a client of the main server.
    fn client_call(&mut self, key: usize, conn: &mut Conn, call: Call) {
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
            // branch cli: CLUSTER, MINE, FOLLOW, CANCEL, JOB_INFO
            proto::CLUSTER => r.finish().map(|()| self.coord.cluster(caller, Instant::now())).is_ok(),
            proto::MINE => r.finish().map(|()| self.coord.mine(caller, who, Instant::now())).is_ok(),
            proto::CANCEL => r.u32().map(|t| self.coord.cancel(caller, who, t, Instant::now())).is_ok(),
            proto::FOLLOW => {
                proto::decode_follow_args(&mut r).map(|(t, i, off)| self.coord.follow(caller, who, t, i, off)).is_ok()
            }
            proto::JOB_INFO => {
                proto::decode_retrieve_args(&mut r).map(|(t, w)| self.coord.info(caller, t, w, Instant::now())).is_ok()
            }
            _ => false, // a DEPLOY too short to stream
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

    /// branch cli: NODE_FOLLOW at node i: answered now if there is output
    /// past the offset (or the replica has ended), else parked in the node
    /// until `answer_followers`.
    fn node_follow(&mut self, i: NodeId, key: usize, conn: &mut Conn, call: Call) {
        let mut r = XdrReader::new(&call.args);
        let Ok((ticket, _, offset)) = proto::decode_follow_args(&mut r) else {
            return conn.outbox.push_bytes(garbage(call.xid));
        };
        if let Some(result) = self.nodes[i].follow(ticket, offset, (key, call.xid)) {
            conn.outbox.push_bytes(follow_reply(call.xid, &result.map_err(|e| (CloudStat::NoSuchTicket, e))));
        }
    }

    /// branch cli: answer node i's parked NODE_FOLLOW calls that have output now.
    fn answer_followers(&mut self, i: NodeId) {
        for ((key, xid), result) in self.nodes[i].ready_followers() {
            let bytes = follow_reply(xid, &result.map_err(|e| (CloudStat::NoSuchTicket, e)));
            self.send(key, vec![Piece::Bytes(bytes)]);
        }
    }

    /// A whole call from the main server to node i.
    fn node_call(&mut self, i: NodeId, conn: &mut Conn, call: Call) {
        let xid = call.xid;
        let mut w = rpc::accepted(xid, AcceptStat::Success);
        let reply = match (call.proc_num, XdrReader::new(&call.args).u32()) {
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
            (proto::NODE_DROP, Ok(ticket)) => {
                self.nodes[i].drop_ticket(ticket);
                w.u32(CloudStat::Ok as u32);
                vec![Piece::Bytes(w.into_bytes())]
            }
            (proto::NODE_KILL, Ok(ticket)) => {
                self.nodes[i].cancel_ticket(ticket); // branch cli: CANCEL
                w.u32(CloudStat::Ok as u32);
                vec![Piece::Bytes(w.into_bytes())]
            }
            _ => vec![Piece::Bytes(garbage(xid))],
        };
        conn.outbox.push(reply);
    }

    /// Carry out one coordinator action.
    fn perform(&mut self, action: Action) {
        match action {
            Action::Reply { to, reply } => {
                if matches!(&reply, Reply::Deploy(Ok(_)) | Reply::Close(Ok(_))) {
                    log::debug!("connection {}: xid {:#x}: {reply:?}", to.conn, to.xid);
                }
                let pieces = encode_reply(to.xid, reply);
                self.answer(to.conn, pieces);
            }
            Action::RemoveFile(path) => {
                if let Err(e) = fs::remove_file(&path) {
                    log::warn!("cannot remove {}: {e}", path.display());
                }
            }
            Action::Node { node, call } => self.call_node(node, call),
        }
    }

    fn call_node(&mut self, node: NodeId, call: NodeCall) {
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
                        self.coord.run_finished(node, RunResult::invalid(msg), Instant::now());
                        return;
                    }
                };
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_RUN);
                args.encode(&mut w);
                // Opened now: the spooled archive is unlinked right after.
                (proto::NODE_RUN, Pending::Run, record::with_opaque(w, Piece::File { file, len }))
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
            NodeCall::Follow { ticket, offset, caller } => {
                // branch cli: FOLLOW
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_FOLLOW);
                proto::encode_follow_args(&mut w, ticket, 0, offset);
                (proto::NODE_FOLLOW, Pending::Follow { caller }, vec![Piece::Bytes(w.into_bytes())])
            }
            NodeCall::Kill { ticket } => {
                // branch cli: CANCEL; the reply is a cloud_stat, as DROP's.
                let mut w = rpc::call(xid, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_KILL);
                w.u32(ticket);
                (proto::NODE_KILL, Pending::Drop, vec![Piece::Bytes(w.into_bytes())])
            }
        };
        log::debug!("node {}: call xid {xid:#x} proc {proc_num}", self.node_names[node]);
        let Some(key) = self.links[node] else {
            if let Pending::Run = pending {
                self.coord.run_finished(node, RunResult::lost("the node is unreachable"), Instant::now());
            }
            return;
        };
        if let Some(Source::Conn(c)) = self.slab.get_mut(key) {
            if let Reader::Replies(r) = &mut c.reader {
                r.expect(xid, pending);
            }
        }
        self.send(key, pieces);
    }

    /// Send the coordinator's answer to a client's call; that client's
    /// next call, if any, is taken up on the next turn of the loop.
    fn answer(&mut self, key: usize, pieces: Vec<Piece>) {
        let Some(mut conn) = self.take_conn(key) else {
            log::debug!("connection {key} is gone; dropping a reply");
            return;
        };
        conn.awaiting = conn.awaiting.saturating_sub(1);
        conn.outbox.push(pieces);
        self.flush(&mut conn);
        // Its next call (held, or in the socket) waits for the next turn of
        // the loop, so a client that pipelines cannot keep the others waiting.
        if !conn.busy() && !conn.closing {
            self.again(key);
        }
        self.retime(key, &mut conn);
        self.slab[key] = Source::Conn(conn);
        self.check_done(key);
    }

    /// Read this connection again on the next turn of the loop.
    fn again(&mut self, key: usize) {
        if !self.more_input.contains(&key) {
            self.more_input.push(key);
        }
    }

    /// Queue a record on a connection and write what can be written.
    fn send(&mut self, key: usize, pieces: Vec<Piece>) {
        let Some(mut conn) = self.take_conn(key) else {
            log::debug!("connection {key} is gone; dropping a message");
            return;
        };
        conn.outbox.push(pieces);
        self.flush(&mut conn);
        self.retime(key, &mut conn);
        self.slab[key] = Source::Conn(conn);
        self.check_done(key);
    }

    /// Write until WouldBlock and keep WRITABLE interest only while needed.
    fn flush(&mut self, conn: &mut Conn) {
        match conn.outbox.write_to(&mut conn.stream) {
            Ok(_) => {}
            Err(e) => {
                log::debug!("write error: {e}");
                conn.outbox = Outbox::new();
                conn.closing = true;
                conn.linger = Linger::No;
            }
        }
        if conn.linger == Linger::Answering && conn.outbox.is_empty() {
            // The answer is out: half-close, then drop input until EOF.
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.linger = Linger::Draining;
            // Input may already be waiting, with no new edge to report it.
            self.again(conn.token.0 - first_key(self.nodes.len()));
        }
        let connecting = matches!(conn.role, Role::NodeLink { connected: false, .. });
        let want = !conn.outbox.is_empty() || connecting;
        if want != conn.writable {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = self.poll.registry().reregister(&mut conn.stream, conn.token, interest) {
                log::warn!("reregister failed: {e}");
            }
            conn.writable = want;
        }
    }

    fn check_done(&mut self, key: usize) {
        if let Some(Source::Conn(c)) = self.slab.get(key) {
            if c.finished() {
                self.dead.push(key);
            }
        }
    }

    fn close_conn(&mut self, key: usize) {
        let Some(Source::Conn(mut conn)) = self.slab.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.timers.remove(key);
        self.peer_closed(&mut conn);
        log::debug!("connection {key} closed ({:?})", conn.role);
        match conn.role {
            Role::Client => self.coord.conn_closed(key),
            Role::NodeLink { node, .. } => {
                self.links[node] = None;
                self.coord.node_lost(node, Instant::now());
            }
            Role::NodeInbound(_) => {}
        }
    }

    fn on_signals(&mut self) {
        let mut reap = false;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => reap = true,
                    Ok(sig) => {
                        eprintln!("cloud-server: {sig}: stopping");
                        self.shutdown = true;
                    }
                    Err(_) => {}
                },
                Ok(None) => break,
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    log::error!("signalfd read failed: {e}");
                    break;
                }
            }
        }
        if reap {
            self.reap();
        }
    }

    /// waitpid(-1, WNOHANG) until nothing is left to reap: replicas' inits
    /// and (uncontained) adopted orphans alike.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return };
                    for i in 0..self.nodes.len() {
                        if let Some(fin) = self.nodes[i].on_exit(pid, status) {
                            self.finish_replica(i, fin);
                        }
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(_) => return, // ECHILD
            }
        }
    }

    fn finish_replica(&mut self, node: NodeId, fin: Finished) {
        if let Some(key) = self.child_keys[node].take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fin.pipe.as_raw_fd()));
            self.slab.try_remove(key);
        }
        drop(fin.pipe);
        let (key, xid) = fin.reply_to;
        self.send(key, vec![Piece::Bytes(run_reply(xid, &fin.result))]);
        self.answer_followers(node); // branch cli: FOLLOW
    }

    /// Kill every replica (SIGKILL to each init ends its namespace), reap
    /// them, remove the nodes' folders and the spool.
    fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Some(pid) = node.shutdown() {
                // Blocking is fine now: SIGKILL to init ends its namespace.
                if let Ok(status) = waitpid(pid, None) {
                    let _ = node.on_exit(pid, status);
                }
            }
        }
        self.reap();
        for node in &mut self.nodes {
            node.release_groups();
        }
        for node in &self.nodes {
            let _ = fs::remove_dir_all(&node.cfg.dir);
        }
        let _ = fs::remove_dir_all(&self.spool);
        if let Err(e) = self.tickets.release(self.coord.next_ticket()) {
            log::warn!("cannot give back unused ticket numbers: {e}");
        }
    }
}

/// The GARBAGE_ARGS reply to call `xid`.
fn garbage(xid: u32) -> Vec<u8> {
    rpc::accepted(xid, AcceptStat::GarbageArgs).into_bytes()
}

fn run_reply(xid: u32, result: &RunResult) -> Vec<u8> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    result.encode(&mut w);
    w.into_bytes()
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
        Reply::Follow(Ok((data, ended))) => {
            return vec![Piece::Bytes(follow_reply(xid, &Ok((data, ended))))];
        }
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

/// branch cli: a `follow_res` (FOLLOW and NODE_FOLLOW) for call `xid`.
fn follow_reply(xid: u32, result: &Result<(Vec<u8>, bool), Failure>) -> Vec<u8> {
    match result {
        Ok((data, ended)) => {
            let mut w = rpc::accepted(xid, AcceptStat::Success);
            proto::encode_follow_ok(&mut w, data, *ended);
            w.into_bytes()
        }
        Err(e) => failure_reply(xid, e),
    }
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

fn bind_error(e: io::Error, addr: SocketAddr, where_: &str) -> String {
    if e.kind() == io::ErrorKind::AddrInUse {
        format!("port {} ({where_}) is already in use: stop what uses it or pick another port", addr.port())
    } else {
        format!("cannot listen on {addr} ({where_}): {e}")
    }
}

/// Whether `sig` is ignored (SIG_IGN), as `nohup` leaves SIGHUP.
fn ignored(sig: Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`,
    // which is valid, writable memory of the right type.
    let rc = unsafe { libc::sigaction(sig as libc::c_int, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: zero-initialised, and filled in by sigaction on success.
    rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN
}
