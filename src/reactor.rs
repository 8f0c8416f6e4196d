//! The reactor: one thread, one `mio::Poll`, every socket and pipe.
//!
//! Owns: the poll, the slab of connections (each a `conn::Conn`, or a
//! `conn::Idle` while a client is at rest between calls: put back with
//! `put_conn`, woken by `take_conn`) and child
//! pipes (token = slab key + `first_key`), listeners, the signalfd
//! (SIGCHLD; SIGINT, SIGTERM, SIGHUP unless ignored), reading until
//! `WouldBlock` into the session readers (at most a fair share per turn; a
//! read short of the buffer counts as `WouldBlock` for a client waiting on
//! its reply: what arrives later raises a new edge, so no extra turn),
//! writing outboxes until `WouldBlock`, serving each client one call at a
//! time (backpressure), reaping children (uncontained jobs, slots'
//! launchers, helpers; a contained replica ends at its output pipe's end
//! of file, which `NodeService::drain` reports), the poll timeout from every
//! deadline (the nodes', the coordinator's, the journal's lazy sync, the
//! client connections'), the end of each turn (`MainService::end_of_turn`:
//! the journal synced before DEPLOY answers go out, closed tickets' outputs
//! given back to their pools once it is; the journal syncer's socket,
//! token `SYNCER`, registered when one starts, its reports and end handed
//! to the main service), opening the
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
//! Links to remote nodes: non-blocking connects when the main service says
//! one is due, short TCP keepalive and TCP_USER_TIMEOUT on both ends
//! (`LINK_DEAD_WITHIN`). As `cloud-server node` (`start_node`) there is no
//! main service: the listener takes the main server's link and the node
//! service serves it. Without `--secret-file`, only a peer of its own user
//! (and nodes and clients listen on loopback only: `node_auth::check_bind`);
//! with one, any address, each link behind a `node_auth::NodeGate` that
//! answers the handshake and refuses every other call (a NODE_RUN's archive
//! swallowed, never stored) until the main server has proved the secret;
//! a gated link without a handshake within `LINK_SETUP_WITHIN` is closed.
//! Slurm nodes (`slurm:PARTITION` lines) live in the node service; here
//! only their commands' pipes (`Source::SlurmCommand`), registered after
//! each settle, and at shutdown a bounded wait for their scancels.
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

use crate::config::{NodeKind, NodeSpec, NodesFile};
use crate::congestion::{self, Choice};
use crate::conn::{Conn, Idle, Linger, Reader, Role, Sink, Streamed};
use crate::coordinator::{Coordinator, NodeCall};
use crate::journal::{Journal, Opened};
use crate::main_service::{Link, MainService, Out, RemoteLink};
use crate::node::Finished;
use crate::node_auth::{self, NodeGate, Secret};
use crate::node_service::{NodeService, Reaped};
use crate::peer::{self, PeerId};
use crate::record::Piece;
use crate::scheduler::NodeId;
use crate::session::{Call, CallEvent};
use crate::spawn::{Containment, JobLimits};
use crate::tickets::TicketStore;
use crate::timers::ConnTimers;

const SIGNALS: Token = Token(0);
const CLIENTS: Token = Token(1);
/// The journal syncer's socket (`syncer`), below the live page's tokens.
const SYNCER: Token = Token(crate::live::TOKEN_BASE - 1);
/// Node listener i has token 2 + i; slab keys start after them.
const NODE_LISTENER_BASE: usize = 2;
/// Reads (up to 64 KiB each) from one connection per turn of the loop.
const READ_BUDGET: usize = 4;
/// What `check_spliced` did with a DEPLOY's spliced bytes.
enum Checked {
    /// All checked.
    Done,
    /// Some wait for the connection's next turn.
    More,
    /// The archive was refused (answered, the connection closing).
    Refused,
}

/// Bytes a DEPLOY's archive check may inflate per read before that read
/// uses up the connection's budget for the turn (a highly compressed upload).
const INFLATE_PER_READ: u64 = 4 << 20;
/// A node reads the start of a call on its inbound link in pieces of at
/// most this many bytes: more than any call's head, and the archive behind a
/// NODE_STAGE's or NODE_RUN's head is left to be spliced.
const LINK_HEAD_READ: usize = 4096;

/// An archive (NODE_RUN or NODE_STAGE on a node's link, a client's DEPLOY) is spliced from the socket
/// into its file through a pipe of this size (`Sink::splice_from`): up to
/// this much per read of the budget.
const SPLICE_PIPE: usize = 1 << 20;

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
    /// `--slurm-as-root`: a root server accepts Slurm lines (their
    /// replicas run as root under Slurm).
    pub slurm_as_root: bool,
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
    /// The live page's loopback address (`--http`), if any.
    pub http: Option<SocketAddr>,
    /// The node links' shared secret (`--secret-file`): the main server
    /// proves it to each remote node, a node demands it of every link.
    pub secret: Option<Secret>,
    /// The TCP congestion control of our connections (`--tcp-congestion`).
    pub congestion: Choice,
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
    /// A client connection at rest (`conn::Idle`): its socket and peer,
    /// inline, no heap; woken into a `Conn` when needed.
    Idle(Idle),
    /// The output pipe of node i's running replica.
    ChildOutput(NodeId, u32),
    /// The output pipe (fd) of one of Slurm node i's commands.
    SlurmCommand(NodeId, std::os::fd::RawFd),
    /// Placeholder while a connection is being handled.
    Taken,
}

pub struct Server {
    poll: Poll,
    /// The live page (`--http`): its own tokens from `live::TOKEN_BASE`.
    live: Option<crate::live::Live>,
    slab: Slab<Source>,
    clients: TcpListener,
    /// Local nodes' ports: bound so that nothing else takes them; every
    /// connection is closed at once (the main service calls them directly).
    node_listeners: Vec<TcpListener>,
    /// The slab key + this is a token (listeners come first).
    first_key: usize,
    signals: SignalFd,
    /// The main server role; `None` in a `cloud-server node`.
    main: Option<MainService>,
    nodes: NodeService,
    local_addr: SocketAddr,
    /// Who owns a client's socket: one netlink socket for the server's life.
    diag: peer::Diag,
    max_archive: u64,
    rbuf: Vec<u8>,
    /// Made at the first spliced stream (`SPLICE_PIPE`).
    splice_pipe: Option<crate::conn::SplicePipe>,
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
    /// `cloud-server node` with `--secret-file`: each link from a main
    /// server passes a `NodeGate` (any address); without, only loopback
    /// peers of our own user are served.
    secret: Option<Secret>,
    /// Set on the listener, or connection by connection (`congestion`).
    congestion: Choice,
    /// The earliest time a gated link must have passed its handshake by.
    gates_due: Option<Instant>,
    /// Lines for the log once serving starts (what the journal held and
    /// restored, what remote nodes need told), after the ready line.
    start_lines: Vec<(log::Level, String)>,
}

impl Server {
    /// Bind every port, start the local nodes, and begin connecting to
    /// remote ones (start-up never waits for them). Errors are one line
    /// for the operator.
    pub fn start(cfg: ServerConfig) -> Result<Server, String> {
        let n = cfg.nodes.len();
        let line = |spec: &NodeSpec| format!("{} line {}", cfg.nodes_path.display(), spec.line);
        // What each node line is: checked before anything is started.
        let now = Instant::now();
        let (mut links, mut locals, mut local_ports) = (Vec::with_capacity(n), Vec::new(), Vec::new());
        // Slurm nodes (global id, line) follow the forking ones in the node service.
        let mut slurm_lines = Vec::new();
        for (i, spec) in cfg.nodes.nodes.iter().enumerate() {
            match &spec.kind {
                NodeKind::Local { port } => {
                    links.push(Link::Local(locals.len()));
                    locals.push(i);
                    local_ports.push((*port, spec.slots));
                }
                NodeKind::Remote { host, port } => {
                    let addr = resolve(host, *port).map_err(|e| format!("{}: {e}", line(spec)))?;
                    // Without the handshake, jobs would cross the network to
                    // anyone who answers on that address.
                    if !addr.ip().to_canonical().is_loopback() && cfg.secret.is_none() {
                        return Err(format!(
                            "{}: node {} is not on loopback: links to other hosts need a shared secret; \
                             give the main server and the node the same --secret-file F (chmod 600 F), \
                             or use a 127.x.x.x address",
                            line(spec),
                            spec.name()
                        ));
                    }
                    links.push(Link::Remote(RemoteLink::new(addr, now)));
                }
                NodeKind::Slurm { partition } => {
                    // Slurm runs the replica as the server's user.
                    if nix::unistd::Uid::effective().is_root() && !cfg.slurm_as_root {
                        return Err(format!(
                            "{}: {}: as root, replicas on a Slurm node would run as root for whoever deploys; \
                             run the server as an unprivileged user, or accept it with --slurm-as-root",
                            line(spec),
                            spec.name()
                        ));
                    }
                    links.push(Link::Local(usize::MAX)); // set below
                    let slurm = crate::slurm::SlurmLine { partition: partition.clone(), slots: spec.slots };
                    slurm_lines.push((i, slurm));
                }
            }
        }
        // Clients off loopback only with a secret (issue 9's binding rule).
        node_auth::check_bind(cfg.listen, cfg.secret.is_some())?;
        // A node line on the client port would be reported as "in use" by
        // whichever bind came second: name the clash instead.
        if let Some(&i) = locals.iter().find(
            |&&i| matches!(cfg.nodes.nodes[i].kind, NodeKind::Local { port } if port != 0 && port == cfg.listen.port()),
        ) {
            return Err(format!(
                "{}: port {} is also the client port (--listen {}): give the nodes and the clients different ports",
                line(&cfg.nodes.nodes[i]),
                cfg.listen.port(),
                cfg.listen
            ));
        }
        // Local nodes' ports, held: port 0 takes a free one, which then
        // names the node (`make demo`, tests).
        let mut node_listeners = Vec::with_capacity(locals.len());
        let mut node_names = cfg.nodes.names();
        for (&i, (port, _)) in locals.iter().zip(&mut local_ports) {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            let l = TcpListener::bind(addr).map_err(|e| bind_error(e, addr, &line(&cfg.nodes.nodes[i])))?;
            *port = l.local_addr().map_err(|e| format!("{}: {e}", line(&cfg.nodes.nodes[i])))?.port();
            node_names[i] = format!("127.0.0.1:{port}");
            node_listeners.push(l);
        }
        // The client port too, before anything is started (the slots'
        // launchers): a port in use is then refused in its one line.
        let clients = TcpListener::bind(cfg.listen).map_err(|e| bind_error(e, cfg.listen, "--listen"))?;
        congestion::apply(&clients, cfg.congestion.for_listener(cfg.listen.ip()));
        let work_dir = work_dir(&cfg.work_dir)?;
        // The jobs of an earlier run: their node folders and spooled
        // archives are kept (the rest is cleared), they are restored below.
        let (journal, opened) = Journal::open(&work_dir)?;
        let mut start_lines = journal_opened_lines(&opened);
        let live: HashSet<u32> = journal.live().jobs.keys().copied().collect();
        let mut nodes = NodeService::start(&cfg, &work_dir, &local_ports, &|t| live.contains(&t))?;
        for (i, slurm) in slurm_lines {
            let local = nodes.add_slurm(&cfg, &work_dir, &node_names[i], slurm)?;
            links[i] = Link::Local(local);
            locals.push(i);
        }
        nodes.note_slurm();
        let spool = work_dir.join("spool");
        fs::create_dir_all(&spool).map_err(|e| format!("cannot create {}: {e}", spool.display()))?;

        let poll = Poll::new().map_err(|e| format!("cannot create epoll instance: {e}"))?;

        let (tickets, next_ticket) = TicketStore::open(&cfg.work_dir)?;
        log::info!("tickets continue from {next_ticket}");
        let mut coord = Coordinator::with_slots(
            node_names.clone(),
            &cfg.nodes.slots(),
            cfg.max_queue,
            spool.clone(),
            cfg.ticket_ttl,
        );
        coord.requeue_lost(cfg.requeue_lost);
        coord.enable_journal();
        coord.resume_tickets_from(next_ticket);
        coord.max_tickets_per_user(cfg.max_tickets_per_user);
        if let Some(uid) = cfg.only_deployer {
            coord.only_deployer(uid);
        }
        // Remote nodes take work once their link is up.
        for (i, link) in links.iter().enumerate() {
            if matches!(link, Link::Remote(_)) {
                coord.node_not_up_yet(i);
                // Uploads go on to it as they arrive (staged transfers).
                coord.set_stageable(i, true);
            }
        }
        if links.iter().any(|l| matches!(l, Link::Remote(_))) {
            start_lines.push((
                log::Level::Info,
                "remote nodes apply their own job flags (--time-limit, --max-*, --allow-network, slot uids): \
                 give them to each cloud-server node"
                    .into(),
            ));
        }
        let mut main = MainService {
            coord,
            spool: spool.clone(),
            node_names,
            links,
            locals,
            next_xid: 1,
            job_uids: cfg.identities.iter().flatten().map(|(u, _)| u.as_raw()).collect(),
            tickets,
            extract_limits: cfg.limits.extract,
            spool_pool: crate::pool::Pool::new(&spool, "p-", false, crate::pool::LARGE)
                .with_spares(crate::pool::SPARES)
                .shared(),
            inflate_scratch: Vec::new(),
            max_output: cfg.max_output,
            secret: cfg.secret.clone(),
            forking: cfg.nodes.nodes.iter().map(|n| matches!(n.kind, NodeKind::Local { .. })).collect(),
            close_waits: false,
            journal,
            held: Vec::new(),
            sync_at: None,
            syncer: None,
            syncer_retry: now,
            syncer_wanted: true,
            syncer_new: None,
            sync_in_flight: false,
            held_in_flight: Vec::new(),
            sync_report: None,
            output_pools: nodes.output_pools(),
            uploads: std::collections::HashMap::new(),
            unstall: Vec::new(),
            outs: Vec::new(),
        };
        // After the remote nodes are marked not up yet: replicas restored as
        // running on them stay so until their links come up (NODE_WAIT).
        start_lines.extend(main.restore(Instant::now())?.map(|l| (log::Level::Info, l)));
        // The journal's syncs from here on are made by the syncer, if it
        // starts; on a tmpfs a sync does nothing worth a process.
        main.syncer_wanted = !on_tmpfs(&work_dir);
        if main.syncer_wanted {
            match crate::syncer::Syncer::start() {
                Ok(s) => (main.syncer_new, main.syncer) = (Some(s.fd()), Some(s)),
                Err(e) => {
                    start_lines.push((log::Level::Warn, format!("{e}; the journal is synced on the server's thread")))
                }
            }
        }
        let mut server = Server::assemble(&cfg, poll, clients, node_listeners, Some(main), nodes)?;
        server.start_lines.extend(start_lines);
        Ok(server)
    }

    /// `cloud-server node`: one node alone, serving NODE_PROG on
    /// `cfg.listen` (its port names the node: `output_<port>/`) to the
    /// main server that connects to it.
    pub fn start_node(cfg: ServerConfig) -> Result<Server, String> {
        node_auth::check_bind(cfg.listen, cfg.secret.is_some())?;
        let work_dir = work_dir(&cfg.work_dir)?;
        let poll = Poll::new().map_err(|e| format!("cannot create epoll instance: {e}"))?;
        let listener = TcpListener::bind(cfg.listen).map_err(|e| bind_error(e, cfg.listen, "--listen"))?;
        congestion::apply(&listener, cfg.congestion.for_listener(cfg.listen.ip()));
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let slots = cfg.nodes.nodes.first().map_or(1, |s| s.slots);
        // A node alone keeps every ticket folder across its own restart
        // (finished outputs stay fetchable); its main server's NODE_KEEP
        // drops what it does not want when the link comes up.
        let mut nodes = NodeService::start(&cfg, &work_dir, &[(port, slots)], &|_| true)?;
        nodes.archives_in_memory(cfg.max_archive);
        Server::assemble(&cfg, poll, listener, Vec::new(), None, nodes)
    }

    /// The signalfd, registrations and limits, for either role.
    fn assemble(
        cfg: &ServerConfig,
        poll: Poll,
        mut clients: TcpListener,
        mut node_listeners: Vec<TcpListener>,
        main: Option<MainService>,
        nodes: NodeService,
    ) -> Result<Server, String> {
        let local_addr = clients.local_addr().map_err(|e| e.to_string())?;
        let signals = block_signals()?;
        let reg = poll.registry();
        reg.register(&mut SourceFd(&signals.as_raw_fd()), SIGNALS, Interest::READABLE)
            .and_then(|_| reg.register(&mut clients, CLIENTS, Interest::READABLE))
            .map_err(|e| format!("cannot register with epoll: {e}"))?;
        for (i, l) in node_listeners.iter_mut().enumerate() {
            reg.register(l, Token(NODE_LISTENER_BASE + i), Interest::READABLE)
                .map_err(|e| format!("cannot register with epoll: {e}"))?;
        }
        let n = cfg.nodes.len();
        let nofile =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        let max_connections = effective_max_connections(cfg.max_connections, nofile, n);
        if max_connections == 0 {
            return Err(format!(
                "RLIMIT_NOFILE is {nofile}: too low to serve clients with {n} nodes; raise it (ulimit -n)"
            ));
        }
        let limits_line = match main {
            Some(_) => format!(
                "up to {max_connections} client connections (--max-connections {}, RLIMIT_NOFILE {nofile}); \
                 idle timeout {}s, call timeout {}s",
                cfg.max_connections,
                cfg.idle_timeout.as_secs(),
                cfg.call_timeout.as_secs()
            ),
            None => format!("RLIMIT_NOFILE {nofile}"),
        };
        let reserve = File::open("/dev/null").map_err(|e| format!("cannot open /dev/null: {e}"))?;
        // The live page: the main server's, with tokens of its own.
        let live = match (cfg.http, &main) {
            (Some(addr), Some(_)) => Some(crate::live::Live::start(addr, poll.registry())?),
            _ => None,
        };
        Ok(Server {
            live,
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
            diag: peer::Diag::open(),
            max_archive: cfg.max_archive,
            rbuf: vec![0; 64 * 1024],
            splice_pipe: None,
            dead: Vec::new(),
            more_input: Vec::new(),
            shutdown: false,
            timers: ConnTimers::new(cfg.idle_timeout, cfg.call_timeout),
            max_connections,
            reserve: Some(reserve),
            warned_fds: false,
            warned_full: false,
            limits_line,
            secret: cfg.secret.clone(),
            congestion: cfg.congestion.clone(),
            gates_due: None,
            start_lines: cfg.congestion.line.iter().map(|l| (log::Level::Info, l.clone())).collect(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The one line printed when the server is ready.
    pub fn ready_line(&self) -> String {
        match &self.main {
            Some(main) => format!(
                "cloud-server: listening on {} with {} node{}: {}; {}",
                self.local_addr,
                main.node_names.len(),
                if main.node_names.len() == 1 { "" } else { "s" },
                main.node_names.join(" "),
                self.summary
            ),
            None => {
                format!("cloud-server node: listening on {} for its main server; {}", self.local_addr, self.summary)
            }
        }
    }

    /// Serve until SIGINT, SIGTERM or SIGHUP, then stop every replica.
    pub fn run(&mut self) -> io::Result<()> {
        log::info!("{}", self.limits_line);
        if let Some(addr) = self.live.as_ref().and_then(|l| l.local_addr().ok()) {
            log::info!("live page at http://{addr}/");
        }
        for (level, line) in std::mem::take(&mut self.start_lines) {
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
                self.dispatch(ev.token(), ev.is_read_closed());
            }
            // Pipes and sockets left with data (edge-triggered: no new event
            // will say so).
            for (node, ticket) in std::mem::take(&mut self.nodes.more_output) {
                self.drain_replica(node, ticket);
            }
            for key in std::mem::take(&mut self.more_input) {
                if matches!(self.slab.get(key), Some(Source::Conn(_) | Source::Idle(_))) {
                    self.conn_event(key, false);
                }
            }
            let now = Instant::now();
            self.nodes.on_timer(now);
            if let Some(main) = &mut self.main {
                main.coord.on_timer(now);
            }
            self.connect_links(now);
            // Node links not up in time (authwire): closed, tried again later.
            for key in self.main.as_mut().map(|m| m.links_stalled(now)).unwrap_or_default() {
                self.close_conn(key);
            }
            // Heartbeats of Ready links; a node that does not answer is lost.
            let slab = &self.slab;
            let in_flight = |key: usize| match slab.get(key) {
                Some(Source::Conn(c)) if !c.outbox.is_empty() => Some(c.outbox.written()),
                _ => None,
            };
            let (beats, dead) = self.main.as_mut().map(|m| m.heartbeats(now, in_flight)).unwrap_or_default();
            for out in beats {
                self.carry_out(out);
            }
            for key in dead {
                self.close_conn(key);
            }
            if self.gates_due.is_some_and(|due| due <= now) {
                self.close_silent_links(now);
            }
            for (key, phase) in self.timers.expired(now) {
                log::debug!("connection {key}: timed out ({phase:?}); closing");
                self.close_conn(key);
            }
            self.settle();
            if let (Some(live), Some(main)) = (&mut self.live, &self.main) {
                live.on_timer(now, self.poll.registry());
                live.after_turn(now, self.poll.registry(), &|| main.coord.live_view());
            }
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
        let main = self.main.as_ref().and_then(MainService::next_deadline);
        let live = self.live.as_ref().and_then(|l| l.deadline());
        let gates = self.gates_due;
        nodes
            .into_iter()
            .chain(main)
            .chain(conns)
            .chain(live)
            .chain(gates)
            .min()
            .map(|d| d.saturating_duration_since(now))
    }

    fn dispatch(&mut self, token: Token, read_closed: bool) {
        match token {
            SIGNALS => self.on_signals(),
            CLIENTS => self.accept(None),
            SYNCER => {
                if let Some(main) = &mut self.main {
                    main.syncer_readable(Instant::now());
                }
            }
            t if crate::live::Live::owns(t) => {
                if let (Some(live), Some(main)) = (&mut self.live, &self.main) {
                    live.on_event(t, self.poll.registry(), &|| main.coord.live_view());
                }
            }
            Token(t) if t < self.first_key => self.accept(Some(t - NODE_LISTENER_BASE)),
            Token(t) => {
                let key = t - self.first_key;
                match self.slab.get(key) {
                    Some(Source::Conn(_) | Source::Idle(_)) => self.conn_event(key, read_closed),
                    Some(&Source::ChildOutput(i, ticket)) => self.drain_replica(i, ticket),
                    Some(&Source::SlurmCommand(i, fd)) => self.nodes.command_readable(i, fd),
                    _ => {} // stale event for a closed source
                }
            }
        }
    }

    /// Run coordinator actions, deliver the in-process nodes' answers and
    /// close dead connections until quiet.
    fn settle(&mut self) {
        loop {
            let mut busy = self.main_outs();
            while let Some(action) = self.main.as_mut().and_then(|m| m.coord.poll_action()) {
                busy = true;
                if let Some(out) = self.main.as_mut().and_then(|m| m.perform(action)) {
                    self.carry_out(out);
                }
            }
            for (key, reply) in std::mem::take(&mut self.nodes.follow_replies) {
                busy = true;
                self.send(key, vec![Piece::Bytes(reply)]);
            }
            while let Some(ev) = self.nodes.events.pop_front() {
                busy = true;
                if let Some(main) = &mut self.main {
                    main.on_node_event(ev);
                }
            }
            self.watch_slurm_commands();
            while let Some(key) = self.dead.pop() {
                busy = true;
                // A reply queued since it was marked keeps it open a while longer.
                if matches!(self.slab.get(key), Some(Source::Conn(c)) if c.finished()) {
                    self.close_conn(key);
                }
            }
            if !busy {
                // The journal is synced before this turn's DEPLOY (and held
                // CLOSE) answers go out (a failed sync may undo a deploy: go on).
                let outs = self.main.as_mut().map_or_else(Vec::new, |m| m.end_of_turn(Instant::now()));
                // Outputs of closed tickets become reusable only once the
                // CLOSE records are on disk (a close a crash undoes finds
                // its outputs still there): the main service settles them.
                let mut again = false;
                match &mut self.main {
                    None => self.nodes.settle_outputs(),
                    Some(main) => {
                        // A syncer started: its reports come as events.
                        if let Some(fd) = main.syncer_new.take() {
                            let r = self.poll.registry().register(&mut SourceFd(&fd), SYNCER, Interest::READABLE);
                            if let Err(e) = r {
                                log::warn!("cannot watch the journal syncer ({e}); syncing on the server's thread");
                                main.syncer_gone(Instant::now());
                                again = true;
                            }
                        }
                    }
                }
                if outs.is_empty() && !again {
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
                    if let Some(i) = node {
                        // Its main server calls it directly: nobody else may.
                        log::debug!("node {i}: closed a connection from {peer}");
                        continue;
                    }
                    if self.main.is_none() {
                        self.accept_link(stream, peer);
                        continue;
                    }
                    if !self.make_room() {
                        continue; // dropped: closed at once, never left waiting
                    }
                    let role = Role::Client;
                    log::debug!("accepted {peer} as {role:?}");
                    let _ = stream.set_nodelay(true);
                    congestion::apply(&stream, self.congestion.after_accept(self.local_addr.ip(), peer.ip()));
                    // Who owns the client's socket: asked once, before its first call.
                    // Our end is the listener's address unless it listens on any.
                    let local = match self.local_addr.ip().is_unspecified() {
                        false => Ok(self.local_addr),
                        true => stream.local_addr(),
                    };
                    let id = match local {
                        Ok(local) => self.diag.identify(peer, local),
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

    /// A `cloud-server node`: a connection from its main server. Without a
    /// secret, only a peer of this process's own user is served (the
    /// kernel's answer, as for clients); with one, a peer from anywhere,
    /// whose calls pass its `NodeGate` first. Each link's replicas are its own: a
    /// second link (a main server restarted before the first link's end
    /// was seen) does not disturb the first.
    fn accept_link(&mut self, stream: TcpStream, peer: SocketAddr) {
        // With a secret: any address, every call through the gate.
        let (id, gate) = match &self.secret {
            Some(secret) => {
                let gate = stream.local_addr().and_then(|node| {
                    let link = node_auth::Link { main: peer, node };
                    Ok(Box::new(NodeGate::new(secret.clone(), link, node_auth::random_nonce()?)))
                });
                match gate {
                    Ok(gate) => (PeerId::Unverified, Some(gate)),
                    Err(e) => return log::warn!("refused a connection from {peer}: {e}"),
                }
            }
            None => {
                let me = nix::unistd::Uid::effective().as_raw();
                let id = stream.local_addr().map_or(PeerId::Unverified, |local| self.diag.identify(peer, local));
                if id != PeerId::Verified(me) {
                    log::warn!(
                        "refused a connection from {peer} ({id:?}): a node without --secret-file serves only its own user's main server"
                    );
                    return;
                }
                (id, None)
            }
        };
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
        congestion::apply(&stream, self.congestion.after_accept(self.local_addr.ip(), peer.ip()));
        let gated = gate.is_some();
        match self.add_conn(stream, Role::NodeInbound(0), id, false) {
            Ok(key) => {
                if let Some(Source::Conn(c)) = self.slab.get_mut(key) {
                    c.gate = gate;
                    if gated {
                        let by = Instant::now() + crate::main_service::LINK_SETUP_WITHIN;
                        c.gate_by = Some(by);
                        self.gates_due = Some(self.gates_due.map_or(by, |d| d.min(by)));
                    }
                }
                match gated {
                    true => log::info!("link from {peer} (connection {key}): awaiting its proof of the shared secret"),
                    false => log::info!("link from the main server at {peer} is up (connection {key})"),
                }
            }
            Err(e) => log::warn!("cannot register connection from {peer}: {e}"),
        }
    }

    /// A node's gated links that have not passed the handshake in time are
    /// closed: a stranger cannot hold connections (descriptors) forever.
    /// Runs only when the earliest such deadline has passed.
    fn close_silent_links(&mut self, now: Instant) {
        let mut late = Vec::new();
        let mut next: Option<Instant> = None;
        for (key, source) in self.slab.iter_mut() {
            let Source::Conn(c) = source else { continue };
            let (Some(gate), Some(by)) = (c.gate.as_deref(), c.gate_by) else { continue };
            if gate.is_open() {
                c.gate_by = None;
            } else if by <= now {
                late.push((key, gate.peer()));
            } else {
                next = Some(next.map_or(by, |n| n.min(by)));
            }
        }
        self.gates_due = next;
        for (key, peer) in late {
            log::info!(
                "node link from {peer}: no handshake within {} s; closing",
                crate::main_service::LINK_SETUP_WITHIN.as_secs()
            );
            self.close_conn(key);
        }
    }

    /// Connect every remote link that is due (non-blocking).
    fn connect_links(&mut self, now: Instant) {
        let Some(main) = &self.main else { return };
        for i in main.links_due(now) {
            let Some(Link::Remote(r)) = self.main.as_ref().and_then(|m| m.links.get(i)) else { continue };
            let addr = r.addr;
            let started = TcpStream::connect(addr).and_then(|stream| {
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                congestion::apply(&stream, self.congestion.for_peer(addr.ip()));
                self.add_conn(stream, Role::NodeLink { node: i, connected: false }, PeerId::Unverified, true)
            });
            let Some(main) = &mut self.main else { return };
            match started {
                Ok(key) => main.link_connecting(i, key, now),
                Err(e) => {
                    log::debug!("cannot connect to node {addr}: {e}");
                    main.link_lost(i, now);
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
        // An idle connection first; else the one owed a deferred reply
        // (a wait, a follow) the longest: parked calls cannot lock clients
        // out (its client sees the connection close and may call again).
        match self.timers.oldest_idle().or_else(|| self.timers.oldest_owed()) {
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
        // Grow the slab by an eighth, not double it: 10,000 clients leave
        // at most 1,250 spare entries, not 6,000 (docs/PERFORMANCE.md).
        if self.slab.len() == self.slab.capacity() {
            self.slab.reserve_exact((self.slab.capacity() / 8).max(16));
        }
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        let token = Token(key + self.first_key);
        let interest = if writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        self.poll.registry().register(&mut stream, token, interest)?;
        // A new client starts at rest: no heap until its first byte.
        let client = matches!(role, Role::Client);
        entry.insert(match role {
            Role::Client if !writable => Source::Idle(Idle { stream, peer }),
            _ => Source::Conn(Box::new(Conn::new(stream, token, role, peer, writable, self.max_archive))),
        });
        if client {
            self.timers.add(key, Instant::now());
        }
        Ok(key)
    }

    /// The connection under `key`, woken if it was at rest; `Source::Taken`
    /// holds its place until `put_conn`.
    fn take_conn(&mut self, key: usize) -> Option<Box<Conn>> {
        let token = Token(key + self.first_key);
        match self.slab.get_mut(key) {
            Some(s @ (Source::Conn(_) | Source::Idle(_))) => match std::mem::replace(s, Source::Taken) {
                Source::Conn(c) => Some(c),
                Source::Idle(idle) => Some(Box::new(idle.wake(token, self.max_archive))),
                _ => None,
            },
            _ => None,
        }
    }

    /// Put a connection back in its slab entry: at rest (no heap) if it
    /// holds nothing that would be lost (`Conn::rest`).
    fn put_conn(&mut self, key: usize, conn: Box<Conn>) {
        self.slab[key] = match conn.rest() {
            Ok(idle) => Source::Idle(idle),
            Err(conn) => Source::Conn(conn),
        };
    }

    fn conn_event(&mut self, key: usize, read_closed: bool) {
        let Some(mut conn) = self.take_conn(key) else {
            return;
        };
        conn.read_closed |= read_closed;
        if let Role::NodeLink { connected, node, .. } = &mut conn.role {
            if !*connected {
                match conn.stream.take_error() {
                    Ok(None) if conn.stream.peer_addr().is_ok() => {
                        *connected = true;
                        let node = *node;
                        if let Some(main) = &mut self.main {
                            main.link_connected(node, &mut conn);
                        }
                    }
                    Ok(None) => {} // still connecting
                    Ok(Some(e)) | Err(e) => {
                        log::debug!("cannot connect to node {node}: {e}");
                        conn.closing = true;
                    }
                }
            }
        }
        self.drive(key, &mut conn);
        self.retime(key, &mut conn);
        self.put_conn(key, conn);
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
            // A DEPLOY's spliced bytes not yet checked (just spliced, or
            // left by the last turn, whose share they used up): first, then
            // the stream's end if they were its last. Part of the read that
            // brought them, so no share of its own.
            if conn.sink.unchecked().is_some_and(|(_, n)| n > 0) {
                match self.check_spliced(key, conn, &mut buf) {
                    Checked::Refused => {}
                    Checked::More => {
                        self.again(key);
                        break;
                    }
                    Checked::Done => self.feed(key, conn, &[]),
                }
                continue;
            }
            *budget -= 1;
            if !conn.held.is_empty() {
                let held = std::mem::take(&mut conn.held);
                self.feed(key, conn, &held);
                continue;
            }
            // An archive (a node's NODE_RUN or NODE_STAGE, a client's
            // DEPLOY): straight from the socket into its file.
            let (direct, mark) = match &conn.reader {
                Reader::Calls(r) if conn.sink.spliceable() => (r.direct_len(), r.mark_left_in_stream()),
                _ => (0, 0),
            };
            // What a read (not a splice) takes: at a fragment mark inside
            // an archive only the mark, and on a node's inbound link a
            // call's start only in a small piece, so that the archive behind
            // the mark or a NODE_STAGE's head is spliced, not read and
            // copied (issue 11: of each GiB, the main server read and
            // copied 64 MiB here, a node 16 MiB).
            let asked = match (&conn.role, &conn.reader) {
                _ if mark > 0 => mark,
                (Role::NodeInbound(_), Reader::Calls(r)) if r.at_boundary() => LINK_HEAD_READ,
                _ => buf.len(),
            };
            if direct > 0 && self.splice_pipe.is_none() {
                self.splice_pipe = crate::conn::SplicePipe::new(SPLICE_PIPE)
                    .map_err(|e| log::warn!("no pipe to splice archives through ({e}): read instead"))
                    .ok();
            }
            let spliced = match &self.splice_pipe {
                Some(pipe) if direct > 0 => {
                    use std::os::fd::AsFd;
                    Some(conn.sink.splice_from(conn.stream.as_fd(), pipe, direct))
                }
                _ => None,
            };
            let read = match spliced {
                Some(Ok(n)) if n > 0 => {
                    conn.unread = true;
                    conn.moved += n as u64;
                    if let Reader::Calls(r) = &mut conn.reader {
                        r.direct_taken(n as u64);
                    }
                    if conn.sink.unchecked().is_none() {
                        self.feed(key, conn, &[]); // the stream's end, if that was its last byte
                    }
                    continue; // a DEPLOY's: checked at the top, then its end
                }
                Some(r) => r,
                None => conn.stream.read(&mut buf[..asked]),
            };
            match read {
                Ok(0) => {
                    if matches!(&conn.reader, Reader::Calls(r) if !r.at_boundary()) {
                        log::debug!("connection {key}: peer closed in the middle of a record");
                    }
                    conn.closing = true;
                    self.peer_closed(conn);
                    break;
                }
                Ok(n) => {
                    // A read short of the buffer took all the socket held:
                    // what arrives later raises a new edge.
                    conn.unread = n == asked || conn.read_closed;
                    conn.moved += n as u64;
                    self.feed(key, conn, &buf[..n]);
                    if conn.sink.inflated_since() > INFLATE_PER_READ {
                        *budget = 0; // a highly compressed upload: its share of this turn is used
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.unread = conn.read_closed;
                    break;
                }
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

    /// Check a DEPLOY's bytes spliced into its spool file (read back from
    /// the file through `buf`, 64 KiB at a time), then hand them on as
    /// `StreamData` would be. Stops after a piece that inflated more than
    /// INFLATE_PER_READ (`More`: the rest waits for the connection's next
    /// turn, as a read's would), or at a refusal (answered, closing).
    fn check_spliced(&mut self, key: usize, conn: &mut Conn, buf: &mut [u8]) -> Checked {
        let Some(main) = &mut self.main else { return Checked::Done };
        let mut checked = 0;
        let verdict = loop {
            let Some((at, left)) = conn.sink.unchecked().filter(|&(_, n)| n > 0) else { break Checked::Done };
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let Some(k) = conn.sink.read_back(&mut buf[..want], at) else { break Checked::Done };
            if main.deploy_data(key, conn, &buf[..k]) {
                self.main_outs();
                return Checked::Refused;
            }
            checked += k;
            if conn.sink.inflated_since() > INFLATE_PER_READ {
                break Checked::More; // a highly compressed upload: its share of this turn is used
            }
        };
        if checked > 0 {
            // A staged upload goes on to its node as it is checked.
            main.deploy_stored(key, conn, checked);
            self.main_outs();
        }
        verdict
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
                        if let Some(main) = &mut self.main {
                            main.on_reply_event(conn, ev);
                        }
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
                        if let Some((reply, close)) = gate(conn, &call) {
                            conn.outbox.push_bytes(reply);
                            if close {
                                conn.close_after_answer();
                            }
                            return true;
                        }
                        if call.proc_num == crate::proto::NODE_RUN_STAGED {
                            // Deferred as NODE_RUN: answered when the replica ends.
                            match self.nodes.run_staged(i, key, &call) {
                                Ok((ticket, fd)) => self.watch_child(i, ticket, fd),
                                Err(reply) => conn.outbox.push_bytes(reply),
                            }
                            return true;
                        }
                        if call.proc_num == crate::proto::NODE_FOLLOW {
                            // Parked at the node until its replica writes more.
                            if let Some(reply) = self.nodes.serve_follow(i, key, &call) {
                                conn.outbox.push_bytes(reply);
                            }
                            return true;
                        }
                        // None: a NODE_WAIT answered when its replica ends.
                        if let Some(reply) = self.nodes.serve_call(i, key, call) {
                            conn.outbox.push(reply);
                        }
                    }
                    _ => {
                        if let Some(main) = &mut self.main {
                            main.client_call(key, conn, call);
                        }
                    }
                }
                true
            }
            CallEvent::StreamStart { call, len } => {
                self.stream_start(key, conn, call, len);
                false
            }
            CallEvent::StreamData(data) => {
                if self.main.as_mut().is_some_and(|m| m.deploy_data(key, conn, data)) {
                    self.main_outs();
                    return true;
                }
                conn.sink.write(data);
                if let Some(main) = &mut self.main {
                    // A staged upload goes on to its node as it is spooled.
                    main.deploy_stored(key, conn, data.len());
                    self.main_outs();
                }
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
        if let Some((reply, close)) = gate(conn, &call) {
            // A NODE_RUN refused before auth (only node links have a gate):
            // its archive is swallowed, never stored.
            match (close, &mut conn.reader) {
                (false, Reader::Calls(r)) => r.refuse_stream(reply),
                _ => {
                    conn.outbox.push_bytes(reply);
                    conn.close_after_answer();
                }
            }
            return;
        }
        match conn.role {
            Role::NodeInbound(i) if call.proc_num == crate::proto::NODE_STAGE => {
                match self.nodes.stage_sink(i, key, &call, len) {
                    Ok(sink) => conn.sink = sink,
                    Err(reply) => conn.outbox.push_bytes(reply),
                }
            }
            Role::NodeInbound(i) => match self.nodes.run_sink(i, &call, len) {
                Ok(sink) => {
                    log::debug!("connection {key}: xid {:#x}: receiving a {len} byte archive", call.xid);
                    conn.sink = sink;
                }
                Err(reply) => conn.outbox.push_bytes(reply),
            },
            _ => {
                if let Some(main) = &mut self.main {
                    main.deploy_start(key, conn, call, len);
                }
            }
        }
    }

    fn stream_end(&mut self, key: usize, conn: &mut Conn) {
        let Role::NodeInbound(i) = conn.role else {
            if let Some(main) = &mut self.main {
                main.stream_end(key, conn);
                // The rest of a staged upload, before its NODE_RUN_STAGED.
                self.main_outs();
            }
            return;
        };
        let (xid, args, error) = match conn.sink.end() {
            Sink::File { xid, what: Streamed::Run { args }, error, .. } => (xid, args, error),
            Sink::File { xid, what: Streamed::Stage { args, len }, error, .. } => {
                let reply = self.nodes.stage_received(key, xid, args, len, error);
                return conn.outbox.push_bytes(reply);
            }
            _ => return,
        };
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
            Out::Send { key, xid, pending, pieces } => {
                if let Some(Source::Conn(c)) = self.slab.get_mut(key) {
                    if let Reader::Replies(r) = &mut c.reader {
                        r.expect(xid, pending);
                    }
                }
                self.send(key, pieces);
            }
            Out::Local { local: node, call } => match call {
                // Nodes of this process are never staged to (they read the
                // spooled archive in place).
                NodeCall::Run { args, archive } | NodeCall::RunStaged { args, archive, .. } => {
                    let ticket = args.ticket;
                    if let Some(fd) = self.nodes.run_local(node, args, &archive) {
                        self.watch_child(node, ticket, fd);
                    }
                }
                NodeCall::Fetch { ticket, replica, into } => self.nodes.fetch_local(node, ticket, replica, into),
                NodeCall::Drop { ticket } => self.nodes.drop_local(node, ticket),
                NodeCall::Stop { ticket } => self.nodes.stop_local(node, ticket),
                NodeCall::Follow { ticket, offset, caller } => self.nodes.follow_local(node, ticket, offset, caller),
                NodeCall::Wait { ticket } => self.nodes.wait_local(node, ticket),
                // Local nodes have no link to come up.
                NodeCall::Keep { .. } | NodeCall::Unstage { .. } => {}
            },
        }
    }

    /// The main service's node calls to make now (NODE_STAGE), and its
    /// stalled uploads that may go on. Returns whether there were any.
    fn main_outs(&mut self) -> bool {
        let Some(main) = &mut self.main else { return false };
        let (outs, unstall) = (std::mem::take(&mut main.outs), std::mem::take(&mut main.unstall));
        let any = !outs.is_empty() || !unstall.is_empty();
        for out in outs {
            self.carry_out(out);
        }
        for key in unstall {
            if let Some(Source::Conn(c)) = self.slab.get_mut(key) {
                if std::mem::take(&mut c.stalled) {
                    self.again(key);
                }
            }
        }
        any
    }

    /// Register the pipes of Slurm commands started since the last call.
    fn watch_slurm_commands(&mut self) {
        for (node, fd) in self.nodes.take_new_pipes() {
            let entry = self.slab.vacant_entry();
            let token = Token(entry.key() + self.first_key);
            match self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
                Ok(()) => {
                    self.nodes.command_keys.insert(fd, entry.key());
                    entry.insert(Source::SlurmCommand(node, fd));
                }
                // Still read once it has exited (bounded), just not as it goes.
                Err(e) => log::error!("cannot watch a Slurm command's output: {e}"),
            }
        }
    }

    /// A Slurm command was reaped: forget its pipe.
    fn forget_slurm_command(&mut self, pipe: std::os::fd::OwnedFd) {
        if let Some(key) = self.nodes.command_keys.remove(&pipe.as_raw_fd()) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&pipe.as_raw_fd()));
            self.slab.try_remove(key);
        }
    }

    fn watch_child(&mut self, node: NodeId, ticket: u32, fd: std::os::fd::RawFd) {
        let entry = self.slab.vacant_entry();
        let token = Token(entry.key() + self.first_key);
        match self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
            Ok(()) => {
                self.nodes.child_keys.insert((node, ticket), entry.key());
                entry.insert(Source::ChildOutput(node, ticket));
                // Output written before registration (a launched replica
                // may even have ended) is an event already: epoll_ctl's ADD
                // reports what is ready, edge-triggered or not.
                return;
            }
            Err(e) => log::error!("cannot watch a replica's output: {e}"),
        }
        // Unwatched: read what is there now.
        self.drain_replica(node, ticket);
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
        // A socket read to its end needs no look: new input brings an edge.
        if !conn.busy() && !conn.closing && (conn.unread || !conn.held.is_empty()) {
            self.again(key);
        }
        self.retime(key, &mut conn);
        self.put_conn(key, conn);
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
        self.put_conn(key, conn);
        self.check_done(key);
    }

    /// Write until WouldBlock and keep WRITABLE interest only while needed.
    fn flush(&mut self, conn: &mut Conn) {
        match conn.outbox.write_to_socket(&mut conn.stream) {
            Ok(_) => {}
            Err(e) => {
                log::debug!("write error: {e}");
                conn.outbox.discard();
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
        let mut conn = match self.slab.try_remove(key) {
            Some(Source::Conn(conn)) => conn,
            Some(Source::Idle(idle)) => Box::new(idle.wake(Token(key + self.first_key), self.max_archive)),
            _ => return,
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.timers.remove(key);
        self.peer_closed(&mut conn);
        log::debug!("connection {key} closed ({:?})", conn.role);
        match conn.role {
            Role::Client => {
                if let Some(main) = &mut self.main {
                    main.coord.conn_closed(key);
                    // An upload cut short: its stage is dropped on its node.
                    main.upload_gone(key);
                }
            }
            Role::NodeLink { node, .. } => {
                if let Some(main) = &mut self.main {
                    main.link_lost(node, Instant::now());
                }
            }
            Role::NodeInbound(_) => {
                match conn.gate.as_deref() {
                    Some(g) if !g.is_open() => match g.ended_note() {
                        Some(note) => log::warn!("{note}"),
                        None => log::info!("node link from {}: closed unauthenticated (connection {key})", g.peer()),
                    },
                    _ => log::warn!("a link from the main server is gone (connection {key})"),
                }
                self.nodes.link_closed(key);
            }
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
                    match self.nodes.on_exit(pid, status) {
                        Some(Reaped::Replica(i, fin)) => self.finish_replica(i, fin),
                        Some(Reaped::Command(pipe)) => self.forget_slurm_command(pipe),
                        None => {}
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(_) => return, // ECHILD
            }
        }
    }

    /// Read a replica's output pipe; a launched replica whose pipe reached
    /// its end has ended: finish it.
    fn drain_replica(&mut self, node: NodeId, ticket: u32) {
        if let Some(fin) = self.nodes.drain(node, ticket) {
            self.finish_replica(node, fin);
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
        self.wait_slurm_commands();
        self.nodes.release();
        // DEPLOY answers that waited for the journal's last sync go out.
        let outs = self.main.as_mut().map(MainService::stop).unwrap_or_default();
        for out in outs {
            self.carry_out(out);
        }
    }
}

/// How long shutdown waits for Slurm nodes' commands (their scancels)
/// before killing them.
const SLURM_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

impl Server {
    /// Shutdown: wait, bounded, for the Slurm nodes' scancels (and commands
    /// in flight: an sbatch that answers now has its job cancelled too),
    /// reading only signals and their pipes; then kill what is left.
    fn wait_slurm_commands(&mut self) {
        let give_up = Instant::now() + SLURM_SHUTDOWN_WAIT;
        let mut events = Events::with_capacity(64);
        while self.nodes.commands_running() {
            self.watch_slurm_commands();
            let now = Instant::now();
            if now >= give_up {
                break;
            }
            match self.poll.poll(&mut events, Some(give_up - now)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    Token(t) if t >= self.first_key => {
                        if let Some(&Source::SlurmCommand(i, fd)) = self.slab.get(t - self.first_key) {
                            self.nodes.command_readable(i, fd);
                        }
                    }
                    _ => {}
                }
            }
        }
        for pid in self.nodes.kill_commands() {
            log::warn!("a Slurm command (pid {pid}) did not end within {SLURM_SHUTDOWN_WAIT:?}; killed");
            if let Ok(status) = waitpid(pid, None) {
                if let Some(Reaped::Command(pipe)) = self.nodes.on_exit(pid, status) {
                    self.forget_slurm_command(pipe);
                }
            }
        }
    }
}

/// A node's inbound link with a secret: `Some((reply, close))` if the call
/// must be answered by the gate (the handshake, or a refusal before auth)
/// instead of carried out; its log line, if any, is logged here.
fn gate(conn: &mut Conn, call: &Call) -> Option<(Vec<u8>, bool)> {
    match conn.gate.as_mut()?.on_call(call) {
        node_auth::Verdict::Pass => None,
        node_auth::Verdict::Answer { reply, close, log } => {
            if let Some(line) = log {
                log::warn!("{line}");
            }
            Some((reply, close))
        }
    }
}

/// The work dir, created, as an absolute path (replicas' init mounts over
/// it by path).
fn work_dir(dir: &std::path::Path) -> Result<PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create work dir {}: {e}", dir.display()))?;
    fs::canonicalize(dir).map_err(|e| format!("cannot resolve work dir {}: {e}", dir.display()))
}

/// A remote node's address (a name is looked up once, at start).
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve node {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("node {host}:{port} has no address"))
}

/// Signals arrive as readable events, never as handlers.
fn block_signals() -> Result<SignalFd, String> {
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
    Ok(signals)
}

/// Keepalive idle, interval and probes on node links, and how long sent
/// data may stay unacknowledged: a silent network drop is noticed within
/// `LINK_DEAD_WITHIN` (EOF or RST at once).
const KEEPALIVE_IDLE_SECS: u32 = 5;
const KEEPALIVE_INTERVAL_SECS: u32 = 2;
const KEEPALIVE_PROBES: u32 = 3;
/// idle + interval * probes = 11 s when quiet; TCP_USER_TIMEOUT bounds a
/// link with data in flight.
pub const LINK_DEAD_WITHIN: Duration = Duration::from_secs(15);

/// Short TCP keepalive (and a user timeout) on a node link, best effort.
fn keepalive(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let user_timeout = LINK_DEAD_WITHIN.as_millis() as u32;
    let set = setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|_| setsockopt(stream, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS))
        .and_then(|_| setsockopt(stream, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS))
        .and_then(|_| setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES))
        .and_then(|_| setsockopt(stream, sockopt::TcpUserTimeout, &user_timeout));
    if let Err(e) = set {
        log::warn!("cannot set keepalive on a node link: {e}");
    }
}

/// What `Journal::open` found, for the log.
/// Whether `dir` is on a tmpfs, where fdatasync has nothing to write.
fn on_tmpfs(dir: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

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
    if e.kind() != io::ErrorKind::AddrInUse {
        return format!("cannot listen on {addr} ({where_}): {e}");
    }
    let port = addr.port();
    let states = tcp_states_on(port);
    if !states.contains(&TCP_LISTEN) && states.contains(&TCP_TIME_WAIT) {
        // Nothing listens there (`ss -ltn` shows nothing): a connection
        // that used the port as its own end waits out TIME-WAIT.
        let below = ephemeral_low().map_or(String::new(), |low| {
            format!(" (below {low}: the kernel gives higher ones to outgoing connections)")
        });
        return format!(
            "port {port} ({where_}) is held by a connection that just closed (TIME-WAIT, about a minute): \
             wait, or pick another port{below}"
        );
    }
    format!("port {port} ({where_}) is already in use: stop what uses it or pick another port")
}

/// TCP sockets of this network namespace on local port `port`, by state
/// (`/proc/net/tcp` and `tcp6`: "st" 0A is LISTEN, 06 TIME_WAIT).
fn tcp_states_on(port: u16) -> Vec<u8> {
    let mut states = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = f.get(3).and_then(|s| u8::from_str_radix(s, 16).ok());
            if let (Some(p), Some(st)) = (local_port, state) {
                if p == port {
                    states.push(st);
                }
            }
        }
    }
    states
}

/// `/proc/net/tcp`'s "st" of a listening socket, and of one in TIME-WAIT.
const TCP_LISTEN: u8 = 0x0A;
const TCP_TIME_WAIT: u8 = 0x06;

/// The first port the kernel gives outgoing connections
/// (`net.ipv4.ip_local_port_range`).
fn ephemeral_low() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// Issue 11: 10,000 idle clients within 7 MiB. An idle client is its
    /// slab entry and nothing else (`conn::Idle`: socket and peer inline),
    /// so the entry's size is what each costs here: keep it at 16 bytes.
    #[test]
    fn an_idle_client_is_a_slab_entry_of_16_bytes() {
        // mio's TcpStream carries a selector id in debug builds only.
        let debug_extra = size_of::<TcpStream>() - size_of::<std::os::fd::RawFd>();
        assert!(size_of::<Idle>() <= 12 + debug_extra, "Idle is {} bytes", size_of::<Idle>());
        assert!(size_of::<Source>() <= 16 + debug_extra, "Source is {} bytes", size_of::<Source>());
        // A spare niche: the slab's vacant entries cost no more.
        assert_eq!(size_of::<Option<Source>>(), size_of::<Source>());
    }
}
