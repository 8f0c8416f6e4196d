//! The reactor: one thread, one `mio::Poll`, every socket and pipe.
//!
//! Owns: the poll, the slab of connections (each a `conn::Conn`) and child
//! pipes (token = slab key + `first_key`), listeners, the signalfd
//! (SIGCHLD; SIGINT, SIGTERM, SIGHUP unless ignored), reading until
//! `WouldBlock` into the session readers (at most a fair share per turn),
//! writing outboxes until `WouldBlock`, serving each client one call at a
//! time (backpressure), reaping children, the poll timeout from every
//! deadline (the nodes', the coordinator's, the journal's lazy sync, the
//! client connections'), the end of each turn (`MainService::end_of_turn`:
//! the journal synced before DEPLOY and CLOSE answers go out), opening the
//! journal at start before the nodes (their folders keep its live tickets),
//! accepting (`--max-connections`: the longest-idle client makes room; a
//! reserve descriptor so that at EMFILE a new client is accepted and closed
//! rather than left hanging in the backlog; at accept it asks `peer` who
//! owns a loopback client's socket), client timeouts (decided in `timers`,
//! applied here), startup and shutdown. Each event is dispatched to a
//! service: `main_service` (the main server role: client calls,
//! coordinator actions, DEPLOY streaming, links to nodes) or
//! `node_service` (the node role: NODE_PROG calls, replicas, their output
//! pipes and ends); the in-process node service's events go to the main
//! service, no loopback round trip.
//! A local node's port (a port line of the nodes file) is bound, so that
//! nothing else takes it, but takes no connections: each is closed at once.
//! Must not touch: job rules (the `coordinator` decides), process setup
//! (`spawn`), a node's replica bookkeeping (`node`), what calls mean.

use std::collections::HashSet;
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

use crate::config::NodesFile;
use crate::conn::{Conn, Linger, Reader, Role, Sink, Streamed};
use crate::coordinator::{Coordinator, NodeCall};
use crate::journal::{Journal, Opened};
use crate::main_service::{Link, MainService, Out};
use crate::node::Finished;
use crate::node_service::NodeService;
use crate::peer::{self, PeerId};
use crate::record::{Outbox, Piece};
use crate::scheduler::NodeId;
use crate::session::{Call, CallEvent};
use crate::spawn::{Containment, JobLimits};
use crate::tickets::TicketStore;
use crate::timers::ConnTimers;

const SIGNALS: Token = Token(0);
const CLIENTS: Token = Token(1);
/// Node listener i has token 2 + i; slab keys start after them.
const NODE_LISTENER_BASE: usize = 2;
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
    /// Per-slot identity, node by node (`NodesFile::slot_offset`): `None`
    /// runs as the server's own user.
    pub identities: Vec<Option<(nix::unistd::Uid, nix::unistd::Gid)>>,
    /// Whether each node's uid is its own (what an earlier run left under
    /// those uids is killed at start).
    pub slot_uids: bool,
    pub isolate_network: bool,
    pub containment: Containment,
    /// `--requeue-lost`: a replica lost with its node runs again elsewhere.
    pub requeue_lost: bool,
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
    ChildOutput(NodeId, u32),
    /// Placeholder while a connection is being handled.
    Taken,
}

pub struct Server {
    poll: Poll,
    slab: Slab<Source>,
    clients: TcpListener,
    /// Local nodes' ports: bound so that nothing else takes them; every
    /// connection is closed at once (the main service calls them directly).
    node_listeners: Vec<TcpListener>,
    /// The slab key + this is a token (listeners come first).
    first_key: usize,
    signals: SignalFd,
    main: MainService,
    nodes: NodeService,
    local_addr: SocketAddr,
    max_archive: u64,
    rbuf: Vec<u8>,
    dead: Vec<usize>,
    /// Connections that used their read budget with data possibly left.
    more_input: Vec<usize>,
    shutdown: bool,
    summary: String,
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
    /// What the journal held and what was restored, logged then too.
    journal_lines: Vec<(log::Level, String)>,
}

impl Server {
    /// Bind every port and start the nodes. Errors are one line for the operator.
    pub fn start(cfg: ServerConfig) -> Result<Server, String> {
        let n = cfg.nodes.ports.len();
        fs::create_dir_all(&cfg.work_dir)
            .map_err(|e| format!("cannot create work dir {}: {e}", cfg.work_dir.display()))?;
        // Absolute: replicas' init mounts over it by path.
        let work_dir = fs::canonicalize(&cfg.work_dir)
            .map_err(|e| format!("cannot resolve work dir {}: {e}", cfg.work_dir.display()))?;
        // The jobs of an earlier run: their node folders and spooled
        // archives are kept (the rest is cleared), they are restored below.
        let (journal, opened) = Journal::open(&work_dir)?;
        let mut journal_lines = journal_opened_lines(&opened);
        let live: HashSet<u32> = journal.live().jobs.keys().copied().collect();
        let nodes = NodeService::start(&cfg, &work_dir, &cfg.nodes.ports, &live)?;
        let spool = work_dir.join("spool");
        fs::create_dir_all(&spool).map_err(|e| format!("cannot create {}: {e}", spool.display()))?;

        let poll = Poll::new().map_err(|e| format!("cannot create epoll instance: {e}"))?;
        let mut clients = TcpListener::bind(cfg.listen).map_err(|e| bind_error(e, cfg.listen, "--listen"))?;
        let local_addr = clients.local_addr().map_err(|e| e.to_string())?;
        let mut node_listeners = Vec::with_capacity(n);
        let mut node_names = Vec::with_capacity(n);
        for (i, &port) in cfg.nodes.ports.iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let where_ = format!("{} line {}", cfg.nodes_path.display(), cfg.nodes.line_of(i));
            let l = TcpListener::bind(addr).map_err(|e| bind_error(e, addr, &where_))?;
            node_listeners.push(l);
            node_names.push(addr.to_string());
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
        let mut coord =
            Coordinator::with_slots(node_names.clone(), &cfg.nodes.slots, cfg.max_queue, spool.clone(), cfg.ticket_ttl);
        coord.requeue_lost(cfg.requeue_lost);
        coord.enable_journal();
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
        let mut main = MainService {
            coord,
            spool,
            node_names,
            links: (0..n).map(|_| Link::Local).collect(),
            job_uids: cfg.identities.iter().flatten().map(|(u, _)| u.as_raw()).collect(),
            tickets,
            extract_limits: cfg.limits.extract,
            next_spool: 0,
            journal,
            held: Vec::new(),
            sync_at: None,
        };
        journal_lines.extend(main.restore(Instant::now())?.map(|l| (log::Level::Info, l)));
        Ok(Server {
            poll,
            slab: Slab::new(),
            clients,
            first_key: NODE_LISTENER_BASE + node_listeners.len(),
            node_listeners,
            signals,
            summary: format!("{}; {}", cfg.sandbox_summary, nodes.cgroup_summary),
            main,
            nodes,
            local_addr,
            max_archive: cfg.max_archive,
            rbuf: vec![0; 64 * 1024],
            dead: Vec::new(),
            more_input: Vec::new(),
            shutdown: false,
            timers: ConnTimers::new(cfg.idle_timeout, cfg.call_timeout),
            max_connections,
            reserve: Some(reserve),
            warned_fds: false,
            warned_full: false,
            limits_line,
            journal_lines,
        })
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
            self.main.node_names.join(" "),
            self.summary
        )
    }

    /// Serve until SIGINT, SIGTERM or SIGHUP, then stop every replica.
    pub fn run(&mut self) -> io::Result<()> {
        log::info!("{}", self.limits_line);
        for (level, line) in std::mem::take(&mut self.journal_lines) {
            log::log!(level, "{line}");
        }
        // Restored jobs start now; a folder removal forked at start may
        // have ended before SIGCHLD was blocked.
        self.reap();
        self.settle();
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
            for (node, ticket) in std::mem::take(&mut self.nodes.more_output) {
                self.nodes.drain(node, ticket);
            }
            for key in std::mem::take(&mut self.more_input) {
                if matches!(self.slab.get(key), Some(Source::Conn(_))) {
                    self.conn_event(key);
                }
            }
            let now = Instant::now();
            self.nodes.on_timer(now);
            self.main.coord.on_timer(now);
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
        if !self.nodes.more_output.is_empty() || !self.more_input.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let conns = self.timers.next_deadline();
        let nodes = self.nodes.next_deadline();
        nodes
            .into_iter()
            .chain(self.main.coord.next_deadline())
            .chain(self.main.next_deadline())
            .chain(conns)
            .min()
            .map(|d| d.saturating_duration_since(now))
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            SIGNALS => self.on_signals(),
            CLIENTS => self.accept(None),
            Token(t) if t < self.first_key => self.accept(Some(t - NODE_LISTENER_BASE)),
            Token(t) => {
                let key = t - self.first_key;
                match self.slab.get(key) {
                    Some(Source::Conn(_)) => self.conn_event(key),
                    Some(&Source::ChildOutput(i, ticket)) => self.nodes.drain(i, ticket),
                    _ => {} // stale event for a closed source
                }
            }
        }
    }

    /// Run coordinator actions, deliver the in-process nodes' answers and
    /// close dead connections until quiet.
    fn settle(&mut self) {
        loop {
            let mut busy = false;
            while let Some(action) = self.main.coord.poll_action() {
                busy = true;
                if let Some(out) = self.main.perform(action) {
                    self.carry_out(out);
                }
            }
            while let Some(ev) = self.nodes.events.pop_front() {
                busy = true;
                self.main.on_node_event(ev);
            }
            while let Some(key) = self.dead.pop() {
                busy = true;
                // A reply queued since it was marked keeps it open a while longer.
                if matches!(self.slab.get(key), Some(Source::Conn(c)) if c.finished()) {
                    self.close_conn(key);
                }
            }
            if !busy {
                // The journal is synced before this turn's DEPLOY and CLOSE
                // answers go out (a failed sync may undo a deploy: go on).
                let outs = self.main.end_of_turn(Instant::now());
                if outs.is_empty() {
                    return;
                }
                for out in outs {
                    self.carry_out(out);
                }
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
                        // Its main server calls it directly: nobody else may.
                        log::debug!("node {}: closed a connection from {peer}", self.main.node_names[i]);
                        continue;
                    }
                    let role = Role::Client;
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
        let token = Token(key + self.first_key);
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
                        log::debug!("link to node {} is up", self.main.node_names[*node]);
                    }
                    Ok(None) => {} // still connecting
                    Ok(Some(e)) | Err(e) => {
                        log::error!("cannot connect to node {}: {e}", self.main.node_names[*node]);
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
                        self.main.on_reply_event(conn, ev);
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
                    Role::NodeInbound(i) => {
                        // None: a NODE_WAIT answered when its replica ends.
                        if let Some(reply) = self.nodes.serve_call(i, key, call) {
                            conn.outbox.push(reply);
                        }
                    }
                    _ => self.main.client_call(key, conn, call),
                }
                true
            }
            CallEvent::StreamStart { call, len } => {
                self.stream_start(key, conn, call, len);
                false
            }
            CallEvent::StreamData(data) => {
                if self.main.deploy_data(key, conn, data) {
                    return true;
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

    /// A streamed call begins: a client's DEPLOY (the main service) or a
    /// NODE_RUN (the node service).
    fn stream_start(&mut self, key: usize, conn: &mut Conn, call: Call, len: u32) {
        match conn.role {
            Role::NodeInbound(i) => match self.nodes.run_sink(i, &call) {
                Ok(sink) => {
                    log::debug!("connection {key}: xid {:#x}: receiving a {len} byte archive", call.xid);
                    conn.sink = sink;
                }
                Err(reply) => conn.outbox.push_bytes(reply),
            },
            _ => self.main.deploy_start(key, conn, call, len),
        }
    }

    fn stream_end(&mut self, key: usize, conn: &mut Conn) {
        let Role::NodeInbound(i) = conn.role else {
            return self.main.stream_end(key, conn);
        };
        let Sink::File { xid, what: Streamed::Run { args }, file, error, .. } =
            std::mem::replace(&mut conn.sink, Sink::None)
        else {
            return;
        };
        drop(file);
        let ticket = args.ticket;
        match self.nodes.run_received(i, (key, xid), args, error) {
            Ok(fd) => self.watch_child(i, ticket, fd),
            Err(reply) => conn.outbox.push_bytes(reply),
        }
    }

    /// Carry out what the main service asks for.
    fn carry_out(&mut self, out: Out) {
        match out {
            Out::Answer { key, pieces } => self.answer(key, pieces),
            Out::Local { node, call } => match call {
                NodeCall::Run { args, archive } => {
                    let ticket = args.ticket;
                    if let Some(fd) = self.nodes.run_local(node, args, &archive) {
                        self.watch_child(node, ticket, fd);
                    }
                }
                NodeCall::Fetch { ticket, replica, into } => self.nodes.fetch_local(node, ticket, replica, into),
                NodeCall::Drop { ticket } => self.nodes.drop_local(node, ticket),
                NodeCall::Stop { ticket } => self.nodes.stop_local(node, ticket),
                NodeCall::Wait { ticket } => self.nodes.wait_local(node, ticket),
            },
        }
    }

    fn watch_child(&mut self, node: NodeId, ticket: u32, fd: std::os::fd::RawFd) {
        let entry = self.slab.vacant_entry();
        let token = Token(entry.key() + self.first_key);
        match self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
            Ok(()) => {
                self.nodes.child_keys.insert((node, ticket), entry.key());
                entry.insert(Source::ChildOutput(node, ticket));
            }
            Err(e) => log::error!("cannot watch a replica's output: {e}"),
        }
        // Output written before registration is read now.
        self.nodes.drain(node, ticket);
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
            self.again(conn.token.0 - self.first_key);
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
            Role::Client => self.main.coord.conn_closed(key),
            Role::NodeLink { node, .. } => self.main.link_lost(node),
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
                    if let Some((i, fin)) = self.nodes.on_exit(pid, status) {
                        self.finish_replica(i, fin);
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(_) => return, // ECHILD
            }
        }
    }

    fn finish_replica(&mut self, node: NodeId, fin: Finished) {
        if let Some(key) = self.nodes.child_keys.remove(&(node, fin.ticket)) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fin.pipe.as_raw_fd()));
            self.slab.try_remove(key);
        }
        if let Some((key, reply)) = self.nodes.finished(node, fin) {
            self.send(key, vec![Piece::Bytes(reply)]);
        }
    }

    /// Kill every replica (SIGKILL to each init ends its namespace), reap
    /// them; node folders and the spool's archives of queued jobs stay for
    /// the next start (the journal says which tickets are live).
    fn stop(&mut self) {
        self.nodes.kill_all();
        self.reap();
        self.nodes.release();
        self.main.stop();
    }
}

/// What `Journal::open` found, for the log.
fn journal_opened_lines(o: &Opened) -> Vec<(log::Level, String)> {
    let mut lines = Vec::new();
    if o.dropped > 0 {
        let line = format!("journal: dropped a torn or damaged tail of {} bytes (a crash mid-write)", o.dropped);
        lines.push((log::Level::Warn, line));
    }
    if o.ignored > 0 {
        lines.push((log::Level::Warn, format!("journal: skipped {} records that contradict the others", o.ignored)));
    }
    if o.records > 0 {
        lines.push((log::Level::Info, format!("journal: {} records replayed", o.records)));
    }
    lines
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
