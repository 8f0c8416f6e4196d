//! A side node: runs up to `slots` replicas at once (of different tickets:
//! one job's replicas never share a node) and keeps finished outputs until
//! the main server drops the ticket.
//!
//! Owns: the node's directory `<work-dir>/output_<port>/`, flat: each
//! ticket's output `<ticket>.out` and, on a node in its own process, the
//! archive its main server sent, `<ticket>.tar.gz` (an in-process node's
//! replica reads the main server's spooled archive in place); both are
//! files of the folder's `pool`, renamed from and back to `free-<n>`, so a
//! job creates and deletes no file here (issue 11). A node process as root
//! keeps the archives instead in `<work-dir>/archives_<port>/`, a tmpfs in
//! a mount namespace of its own (`archive_tmpfs`), with a pool of its own. A contained replica's
//! workspace `<ticket>/work` is a path inside its own mount namespace only
//! (a tmpfs over the hidden work dir), never made on the host; an
//! uncontained one is a real `<ticket>/work` folder, removed by a child.
//! Also an empty network namespace per slot,
//! each slot's launcher and cgroup (contained: `start_launchers` at node
//! start; a launcher found dead is replaced at the slot's next replica),
//! the running replicas by ticket (each with its slot and the slot's uid,
//! output pipe, status pipe, control pipe, time limit, why it was stopped;
//! uncontained: the job's pid and its own cgroup),
//! capping captured output, and what to answer when a replica ends (its
//! outcome kind, and the recipe's code from make's `Error N` line, kept
//! from the output's last KiB in memory), NODE_FOLLOW calls parked until
//! the replica writes more, and NODE_STOP (kill, keep output: fail-fast
//! and cancel). A contained replica is started by its slot's launcher
//! (no clone, no cgroup move here) and ends when its output pipe reaches
//! its end (`output_closed`: init holds the pipe until it exits); it is
//! stopped by closing its control pipe. Nothing to sweep: the kernel ends
//! a contained replica's every process when its init exits. Where the host
//! has cgroups, the slot's group gives memory and process totals, a second
//! kill path (all but the launcher) and OOM detection (its OOM kill count
//! at the replica's end against the last); an uncontained replica gets a
//! group of its own, removed once it is reaped (retried on later turns
//! while busy, never waited for).
//! Must not touch: sockets or the reactor (the server hands it bytes and
//! events), the main server's job table (it only ever learns through RPC).
//! Also here: `sweep_dir`, what a restart keeps of a node's folder (the
//! tickets it is told are live, their outputs, and the pool's free files;
//! the rest goes to a trash folder the caller removes in the background),
//! and `rewait`, a running replica's end sent to a new link (NODE_WAIT).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::cgroup::{Cgroup, Cgroups};
use crate::launcher::{self, Launcher};
use crate::proto::{Chunk, Outcome, RunArgs, RunResult, FOLLOW_CHUNK};
use crate::spawn::{self, Containment, JobLimits, Sandbox, SpawnSpec, StopReason};

/// Everything a node needs to know; a later separate node process would
/// get these as flags.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub port: u16,
    /// `<work-dir>/output_<port>`.
    pub dir: PathBuf,
    pub limits: JobLimits,
    pub sandbox: Sandbox,
    pub time_limit: Duration,
    pub kill_grace: Duration,
    /// Bytes of output kept; the rest is discarded after a marker line.
    pub max_output: u64,
    /// The server's work dir, absolute (hidden from contained replicas).
    pub work_dir: PathBuf,
    /// An empty network namespace per slot, made once at start (root mode):
    /// replicas of different jobs running at once never share loopback.
    pub netns: Vec<Option<Rc<OwnedFd>>>,
    /// Where replicas get a cgroup each (`None`: the host has none for us).
    pub cgroups: Option<Rc<Cgroups>>,
    /// One identity per slot: how many replicas run at once, and who each
    /// runs as (`sandbox.identity` is ignored; `None`: the server's user).
    pub slot_identities: Vec<Option<(nix::unistd::Uid, nix::unistd::Gid)>>,
}

/// At start, a node's folder `dir` as an earlier run left it: the output
/// `<ticket>.out` of each ticket that `keep` keeps stays, and so do the
/// pool's free files (`free-<n>`, taken up by `Node::new`); every other
/// entry (archives, workspaces, outputs of tickets not kept) is moved into
/// `trash` (created on demand, same file system), named `<tag>-<entry>`,
/// for the caller to remove in the background. A folder of the earlier
/// layout (`<ticket>/output.txt`) gives its output to `<ticket>.out`.
/// Returns how many entries were moved. No folder yet: nothing to do.
pub fn sweep_dir(dir: &Path, trash: &Path, tag: &str, keep: impl Fn(u32) -> bool) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut moved = 0;
    // One entry that cannot be moved is left (and logged), not fatal.
    let mut to_trash = |from: &Path, name: &str| {
        let moved_one = fs::DirBuilder::new().recursive(true).mode(0o700).create(trash).and_then(|()| {
            let mut to = trash.join(format!("{tag}-{name}"));
            let mut n = 0;
            while to.symlink_metadata().is_ok() {
                n += 1;
                to = trash.join(format!("{tag}-{name}.{n}"));
            }
            fs::rename(from, &to)
        });
        match moved_one {
            Ok(()) => moved += 1,
            Err(e) => log::warn!("cannot move {} out of the way: {e}", from.display()),
        }
    };
    let live = |name: &str| name.parse::<u32>().ok().filter(|t| keep(*t) && t.to_string() == name);
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_file() && (is_free_name(&name) || name.strip_suffix(".out").is_some_and(|t| live(t).is_some())) {
            continue;
        }
        if kind.is_dir() {
            if let Some(t) = live(&name) {
                // The earlier layout: the output moves out, the rest goes.
                let out = dir.join(format!("{t}.out"));
                if out.symlink_metadata().is_err() {
                    let _ = fs::rename(e.path().join("output.txt"), &out);
                }
            }
        }
        to_trash(&e.path(), &name);
    }
    Ok(moved)
}

/// A `cloud-server node` keeps the archives its main server sends in
/// memory until their replicas have unpacked them: `at` (the node's
/// `<work-dir>/archives_<port>`) becomes a tmpfs (`huge=within_size`: large
/// writes land in large pages, about a third of the CPU per byte an ext4
/// file costs) of `bytes` bytes at most, mounted in a mount namespace of
/// this process's own: nobody else sees it (the host's `at` stays an empty
/// folder), and it goes with the process, nothing to unmount after a crash.
/// A node's copy of an archive never outlives its process anyway
/// (`sweep_dir` moves an earlier run's out). Call once, after the node's
/// launchers have started, so that replicas are not even in a namespace
/// that has it. Err: why not (the archives stay in the node's folder).
pub fn archive_tmpfs(at: &Path, bytes: u64) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    match fs::DirBuilder::new().mode(0o700).create(at) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(format!("cannot make {}: {e}", at.display())),
        _ => {}
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("no mount namespace of our own: {e}"))?;
    // Mounts of the host still reach us; ours reach nobody.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(|e| format!("cannot make our mounts private: {e}"))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let opts = format!("size={},mode=0700", bytes.max(1 << 20));
    let huge = format!("{opts},huge=within_size");
    // A kernel without transparent huge pages refuses the option.
    mount(Some("cloudinfra-archives"), at, Some("tmpfs"), flags, Some(huge.as_str()))
        .or_else(|_| mount(Some("cloudinfra-archives"), at, Some("tmpfs"), flags, Some(opts.as_str())))
        .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", at.display()))?;
    Ok(())
}

/// The node folder pool's free files: `free-<n>`.
const FREE_PREFIX: &str = "free-";

fn is_free_name(name: &str) -> bool {
    name.strip_prefix(FREE_PREFIX).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// How long a busy cgroup waits before its removal is tried again.
const GROUP_RETRY: Duration = Duration::from_millis(200);

/// Where to send the deferred NODE_RUN reply: connection key and xid.
pub type ReplyTo = (usize, u32);

#[derive(Debug)]
struct Running {
    ticket: u32,
    /// Which of the node's slots (and so which slot uid) it holds.
    slot: usize,
    /// Our child: the job (uncontained) or init (started directly, without
    /// launchers). `None`: started by the slot's launcher; its end is the
    /// output pipe's end of file.
    pid: Option<Pid>,
    reply_to: ReplyTo,
    output: OwnedFd,
    status: OwnedFd,
    control: Option<OwnedFd>,
    /// A group of its own (uncontained); a launched replica is in its slot's.
    group: Option<Cgroup>,
    file: File,
    written: u64,
    truncated: bool,
    deadline: Instant,
    stop: Option<StopReason>,
    /// The output's last bytes, for make's `Error N` line (the recipe's code).
    tail: Vec<u8>,
    /// Its archive is the node's own `<ticket>.tar.gz` (given back to the
    /// pool at the end), not the main server's spool file.
    own_archive: bool,
}

/// How much of the output's end is kept for make's error line.
const TAIL: usize = 1024;

/// What `drain_output` left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The pipe is empty for now.
    Empty,
    /// The budget ran out with data still waiting: drain again soon.
    More,
    /// Every writer is gone (or no replica runs).
    Closed,
}

/// A replica that has ended.
#[derive(Debug)]
pub struct Finished {
    pub ticket: u32,
    pub reply_to: ReplyTo,
    pub result: RunResult,
    /// The output pipe, still open so the reactor can deregister it.
    pub pipe: OwnedFd,
}

/// A slot's launcher and group (contained replicas, `start_launchers`).
#[derive(Debug)]
struct Slot {
    /// `None` once it died (reaped): started again at the slot's next replica.
    launcher: Option<Launcher>,
    /// The slot's cgroup, made once, joined by its launcher alone.
    group: Option<Cgroup>,
    /// The group's OOM kill count when its last replica ended.
    ooms: u64,
}

#[derive(Debug)]
pub struct Node {
    pub cfg: NodeConfig,
    /// Running replicas by ticket.
    running: BTreeMap<u32, Running>,
    /// One per slot once `start_launchers` ran (contained); empty: replicas
    /// are cloned by the server itself (uncontained, unit tests).
    slot_state: Vec<Slot>,
    /// Groups of reaped replicas still busy (their processes leaving).
    stale_groups: Vec<Cgroup>,
    retry_groups: Option<Instant>,
    buf: Vec<u8>,
    /// NODE_FOLLOW calls parked until the running replica writes past their offset.
    followers: Vec<(ReplyTo, u32, u64)>,
    /// The folder's files, reused from ticket to ticket.
    pub(crate) pool: crate::pool::Shared,
    /// Where the archives of NODE_RUN calls go, when not in the folder
    /// itself: a tmpfs of this process's own (`archives_in_memory`) and
    /// its pool.
    archives: Option<(PathBuf, crate::pool::Shared)>,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&cfg.dir)?;
        let mut pool = crate::pool::Pool::new(&cfg.dir, FREE_PREFIX, true, crate::pool::LARGE);
        // Free files an earlier run left: reused (up to `pool::KEEP`).
        for e in fs::read_dir(&cfg.dir)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) && e.file_name().to_str().is_some_and(is_free_name) {
                pool.adopt(&e.path());
            }
        }
        Ok(Node {
            pool: pool.shared(),
            cfg,
            running: BTreeMap::new(),
            slot_state: Vec::new(),
            stale_groups: Vec::new(),
            retry_groups: None,
            buf: vec![0; 64 * 1024],
            followers: Vec::new(),
            archives: None,
        })
    }

    pub fn name(&self) -> String {
        format!("node {}", self.cfg.port)
    }

    fn ticket_dir(&self, ticket: u32) -> PathBuf {
        self.cfg.dir.join(ticket.to_string())
    }

    fn archive_path(&self, ticket: u32) -> PathBuf {
        self.archive_dir().join(format!("{ticket}.tar.gz"))
    }

    /// Where received archives (and stages) live: the node's own tmpfs if
    /// it has one, else its folder.
    pub(crate) fn archive_dir(&self) -> &Path {
        self.archives.as_ref().map_or(&self.cfg.dir, |(dir, _)| dir)
    }

    /// The pool a NODE_RUN's archive is taken from (and goes back to).
    pub(crate) fn archive_pool(&self) -> crate::pool::Shared {
        self.archives.as_ref().map_or(&self.pool, |(_, pool)| pool).clone()
    }

    /// Keep the archives NODE_RUN brings in `dir` (`archive_tmpfs`), in a
    /// pool of their own, rather than in the node's folder.
    pub fn keep_archives_in(&mut self, dir: &Path) {
        let pool = crate::pool::Pool::new(dir, FREE_PREFIX, true, crate::pool::LARGE);
        self.archives = Some((dir.to_path_buf(), pool.shared()));
    }

    /// Where the ticket's output is kept until NODE_DROP.
    pub fn output_path(&self, ticket: u32) -> PathBuf {
        self.cfg.dir.join(format!("{ticket}.out"))
    }

    /// The file a NODE_RUN's archive (of `len` bytes) streams into, from
    /// the pool: its spare if it fits (`Taken::spare`: cut it at the end).
    pub fn prepare_archive(&self, ticket: u32, len: u64) -> io::Result<crate::pool::Taken> {
        let path = self.archive_path(ticket);
        let pool = self.archive_pool();
        let mut pool = pool.borrow_mut();
        if path.symlink_metadata().is_ok() {
            pool.give(&path); // an earlier, stale one
        }
        pool.take_as_for(&path, Some(len))
    }

    /// A stage (a file of the pool its main server filled with NODE_STAGE)
    /// becomes the ticket's archive, as NODE_RUN's would be: renamed, no
    /// copy. A stale archive of the ticket goes back to the pool first.
    pub fn adopt_stage(&self, ticket: u32, stage: &Path) -> io::Result<()> {
        let path = self.archive_path(ticket);
        if path.symlink_metadata().is_ok() {
            self.archive_pool().borrow_mut().give(&path);
        }
        fs::rename(stage, &path)
    }

    /// An uncontained replica's workspace folder on the host, made afresh.
    fn fresh_ticket_dir(&self, ticket: u32) -> io::Result<()> {
        let dir = self.ticket_dir(ticket);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)
    }

    /// Contained: make each slot's cgroup and start its launcher (at node
    /// start). The error says what failed.
    pub fn start_launchers(&mut self) -> Result<(), String> {
        if self.cfg.sandbox.containment == Containment::Uncontained {
            return Ok(());
        }
        for slot in 0..self.slots() {
            let group = match &self.cfg.cgroups {
                Some(groups) => {
                    let mut limits = spawn::cgroup_limits(&self.cfg.limits);
                    // The launcher and the replica's init are two of the
                    // group's processes: the job's own may number --max-procs.
                    limits.pids = limits.pids.saturating_add(2);
                    let name = format!("{}-slot{slot}", self.cfg.port);
                    Some(
                        groups
                            .create(&name, limits)
                            .map_err(|e| format!("{}: cannot create the cgroup of slot {slot}: {e}", self.name()))?,
                    )
                }
                None => None,
            };
            let ooms = group.as_ref().map_or(0, |g| g.oom_kill_count());
            self.slot_state.push(Slot { launcher: None, group, ooms });
            self.launcher(slot)?;
        }
        Ok(())
    }

    /// Slot `slot`'s launcher, started if it is not running.
    fn launcher(&mut self, slot: usize) -> Result<&Launcher, String> {
        let name = self.name();
        let mut sandbox = self.cfg.sandbox;
        if let Some(&identity) = self.cfg.slot_identities.get(slot) {
            sandbox.identity = identity;
        }
        let netns = self.cfg.netns.get(slot).and_then(|ns| ns.as_deref()).map(|fd| fd.as_fd());
        let state = &mut self.slot_state[slot];
        if state.launcher.is_none() {
            let join = match &state.group {
                Some(g) => g.open_join().map_err(|e| format!("{name}: cannot open the cgroup of slot {slot}: {e}"))?,
                None => Vec::new(),
            };
            let setup = launcher::Setup {
                work_dir: &self.cfg.work_dir,
                limits: &self.cfg.limits,
                sandbox,
                netns,
                cgroup: &join,
            };
            let started = Launcher::start(&setup).map_err(|e| format!("{name}: slot {slot}: {e}"))?;
            log::debug!("{name}: slot {slot}: launcher pid {}", started.pid());
            state.launcher = Some(started);
        }
        state.launcher.as_ref().ok_or_else(|| format!("{name}: slot {slot} has no launcher"))
    }

    /// Hand a replica to its slot's launcher; a launcher found gone is
    /// replaced once.
    fn launch(
        &mut self,
        slot: usize,
        archive: std::os::fd::BorrowedFd,
        workspace: &Path,
        env: &[(String, String)],
    ) -> Result<launcher::Launched, String> {
        for attempt in 0..2 {
            let l = self.launcher(slot)?;
            match l.launch(Some(archive), workspace, env) {
                Ok(launched) => return Ok(launched),
                Err(e)
                    if attempt == 0
                        && matches!(e, nix::Error::EPIPE | nix::Error::ECONNRESET | nix::Error::ENOTCONN) =>
                {
                    log::warn!("{}: slot {slot}'s launcher is gone ({e}); starting another", self.name());
                    if let Some(old) = self.slot_state[slot].launcher.take() {
                        old.stop();
                    }
                }
                Err(e) => {
                    return Err(format!("{}: cannot hand the replica to slot {slot}'s launcher: {e}", self.name()))
                }
            }
        }
        Err(format!("{}: slot {slot}'s launcher is gone", self.name()))
    }

    /// How many replicas it runs at once.
    pub fn slots(&self) -> usize {
        self.cfg.slot_identities.len().max(1)
    }

    /// Every ticket this node holds: running, or with an output or an
    /// archive here (an ended replica's output is kept until NODE_DROP).
    pub fn tickets(&self) -> std::collections::BTreeSet<u32> {
        let mut tickets: std::collections::BTreeSet<u32> = self.running.keys().copied().collect();
        let archives = self.archives.as_ref().map(|(dir, _)| dir.as_path());
        for dir in std::iter::once(self.cfg.dir.as_path()).chain(archives) {
            if let Ok(entries) = fs::read_dir(dir) {
                tickets.extend(entries.flatten().filter_map(|e| {
                    let name = e.file_name();
                    let name = name.to_str()?;
                    name.strip_suffix(".out").or_else(|| name.strip_suffix(".tar.gz"))?.parse::<u32>().ok()
                }));
            }
        }
        tickets
    }

    /// The running replicas' tickets and where their NODE_RUN replies go.
    pub fn running(&self) -> Vec<(u32, ReplyTo)> {
        self.running.values().map(|r| (r.ticket, r.reply_to)).collect()
    }

    /// Start a replica from `archive` (an in-process main server's spool
    /// file, read in place), or from the node's own `<ticket>.tar.gz`
    /// (`prepare_archive`) when `None`. On success returns the output
    /// pipe's fd to register; on failure, the result to reply at once.
    pub fn start(
        &mut self,
        args: RunArgs,
        archive: Option<&Path>,
        reply_to: ReplyTo,
        now: Instant,
    ) -> Result<RawFd, RunResult> {
        let (ticket, own_archive) = (args.ticket, archive.is_none());
        let started = self.start_from(args, archive, reply_to, now);
        if let (Err(_), true) = (&started, own_archive) {
            self.give_archive_back(ticket);
        }
        started
    }

    /// The node's own copy of the ticket's archive, if any, back to the pool.
    fn give_archive_back(&self, ticket: u32) {
        self.archive_pool().borrow_mut().give(&self.archive_path(ticket));
    }

    fn start_from(
        &mut self,
        args: RunArgs,
        archive: Option<&Path>,
        reply_to: ReplyTo,
        now: Instant,
    ) -> Result<RawFd, RunResult> {
        if self.running.contains_key(&args.ticket) {
            return Err(RunResult::invalid(format!(
                "{} already runs a replica of ticket {}",
                self.name(),
                args.ticket
            )));
        }
        let Some(slot) = (0..self.slots()).find(|s| self.running.values().all(|r| r.slot != *s)) else {
            let tickets: Vec<String> = self.running.keys().map(|t| t.to_string()).collect();
            return Err(RunResult::invalid(format!(
                "{} is busy: its {} slot(s) run tickets {}",
                self.name(),
                self.slots(),
                tickets.join(", ")
            )));
        };
        let mut sandbox = self.cfg.sandbox;
        if let Some(&identity) = self.cfg.slot_identities.get(slot) {
            sandbox.identity = identity;
        }
        let out_path = self.output_path(args.ticket);
        let taken = self.pool.borrow_mut().take_as(&out_path);
        let file = match taken {
            // A ticket run here again (requeued) writes its output afresh.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                OpenOptions::new().write(true).truncate(true).custom_flags(libc::O_NOFOLLOW).open(&out_path)
            }
            taken => taken,
        }
        .map_err(|e| RunResult::invalid(format!("{}: cannot create output file: {e}", self.name())))?;
        if self.cfg.sandbox.containment == Containment::Uncontained {
            // Its workspace is a folder on the host (contained: a path in
            // the replica's own mount namespace only).
            self.fresh_ticket_dir(args.ticket)
                .map_err(|e| RunResult::invalid(format!("{}: cannot make the workspace: {e}", self.name())))?;
        }
        let workspace = spawn::workspace_path(&self.ticket_dir(args.ticket));
        let own_archive = archive.is_none();
        let archive = archive.map_or_else(|| self.archive_path(args.ticket), Path::to_path_buf);
        let env = spawn::replica_env(&workspace, args.ticket, args.replica, args.replicas, self.cfg.port);
        let archive = File::open(&archive)
            .map_err(|e| RunResult::invalid(format!("{}: cannot open the archive: {e}", self.name())))?;
        let (pid, output, status, control, group) = if !self.slot_state.is_empty() {
            // Contained: the slot's launcher clones init, in the slot's group.
            let launched = self.launch(slot, archive.as_fd(), &workspace, &env).map_err(RunResult::invalid)?;
            log::debug!(
                "{}: ticket {} replica {}: handed to slot {slot}'s launcher",
                self.name(),
                args.ticket,
                args.replica
            );
            (None, launched.output, launched.status, Some(launched.control), None)
        } else {
            let group = match &self.cfg.cgroups {
                Some(groups) => Some(
                    groups
                        .create(&format!("{}-{}", self.cfg.port, args.ticket), spawn::cgroup_limits(&self.cfg.limits))
                        .map_err(|e| {
                            RunResult::invalid(format!("{}: cannot create the replica's cgroup: {e}", self.name()))
                        })?,
                ),
                None => None,
            };
            let join = match &group {
                Some(g) => g.open_join().map_err(|e| {
                    RunResult::invalid(format!("{}: cannot open the replica's cgroup: {e}", self.name()))
                })?,
                None => Vec::new(),
            };
            let spec = SpawnSpec {
                archive: Some(archive.as_fd()),
                work_dir: &self.cfg.work_dir,
                workspace: &workspace,
                env,
                limits: &self.cfg.limits,
                sandbox,
                netns: self.cfg.netns.get(slot).and_then(|ns| ns.as_deref()).map(|fd| fd.as_fd()),
                cgroup: &join,
            };
            let spawned = spawn::spawn(&spec)
                .map_err(|e| RunResult::invalid(format!("{}: cannot start replica: {e}", self.name())))?;
            log::debug!(
                "{}: ticket {} replica {}: spawned pid {} ({:?})",
                self.name(),
                args.ticket,
                args.replica,
                spawned.pid,
                self.cfg.sandbox.containment
            );
            (Some(spawned.pid), spawned.output, spawned.status, spawned.control, group)
        };
        let fd = output.as_raw_fd();
        let running = Running {
            ticket: args.ticket,
            slot,
            pid,
            reply_to,
            output,
            status,
            control,
            group,
            file,
            written: 0,
            truncated: false,
            deadline: now + self.cfg.time_limit,
            stop: None,
            tail: Vec::new(),
            own_archive,
        };
        self.running.insert(args.ticket, running);
        Ok(fd)
    }

    /// Move what the pipe holds into the output file, up to the cap,
    /// reading at most `budget` chunks so a flooding job cannot keep the
    /// reactor from its other work.
    pub fn drain_output(&mut self, ticket: u32, budget: usize) -> Drained {
        let max = self.cfg.max_output;
        let Some(r) = self.running.get_mut(&ticket) else {
            return Drained::Closed;
        };
        for _ in 0..budget {
            let n = match nix::unistd::read(&r.output, &mut self.buf) {
                Ok(0) => return Drained::Closed,
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Drained::Empty,
                Err(_) => return Drained::Closed,
            };
            let chunk = &self.buf[..n];
            let from = chunk.len().saturating_sub(TAIL);
            r.tail.extend_from_slice(&chunk[from..]);
            let excess = r.tail.len().saturating_sub(TAIL);
            r.tail.drain(..excess);
            let room = max.saturating_sub(r.written) as usize;
            let keep = chunk.len().min(room);
            if keep > 0 {
                if let Err(e) = r.file.write_all(&chunk[..keep]) {
                    log::warn!("node {}: output file: {e}", self.cfg.port);
                }
                r.written += keep as u64;
            }
            if keep < chunk.len() && !r.truncated {
                r.truncated = true;
                let _ =
                    writeln!(r.file, "\n[cloud: output truncated at {max} bytes (--max-output); the job kept running]");
                log::debug!("node {}: ticket {}: output truncated", self.cfg.port, r.ticket);
            }
        }
        Drained::More
    }

    /// The next moment `on_timer` has work to do.
    pub fn deadline(&self) -> Option<Instant> {
        let pool = self.pool.borrow().retry_at();
        let archives = self.archives.as_ref().and_then(|(_, p)| p.borrow().retry_at());
        self.running.values().map(|r| r.deadline).chain(self.retry_groups).chain(pool).chain(archives).min()
    }

    /// Enforce the time limit: SIGTERM, then SIGKILL after the grace period.
    pub fn on_timer(&mut self, now: Instant) {
        let seconds = self.cfg.time_limit.as_secs();
        let grace = self.cfg.kill_grace;
        if self.retry_groups.is_some_and(|t| t <= now) {
            self.remove_stale_groups(now);
        }
        self.pool.borrow_mut().on_timer(now);
        if let Some((_, archives)) = &self.archives {
            archives.borrow_mut().on_timer(now);
        }
        let due: Vec<u32> = self.running.values().filter(|r| r.deadline <= now).map(|r| r.ticket).collect();
        for ticket in due {
            let Some(r) = self.running.get_mut(&ticket) else { continue };
            match r.stop {
                None => {
                    log::debug!("node {}: ticket {}: time limit, SIGTERM", self.cfg.port, r.ticket);
                    r.stop = Some(StopReason::TimeLimit { seconds, killed: false });
                    r.deadline = now + grace;
                    spawn::terminate(r.pid, r.control.as_ref());
                }
                Some(_) => {
                    log::debug!("node {}: ticket {}: grace over, SIGKILL", self.cfg.port, r.ticket);
                    if matches!(r.stop, Some(StopReason::TimeLimit { .. })) {
                        r.stop = Some(StopReason::TimeLimit { seconds, killed: true });
                    }
                    r.deadline = now + Duration::from_secs(3600);
                    self.kill_everything(ticket);
                }
            }
        }
    }

    /// End a running replica now: SIGKILL to its init takes its whole
    /// namespace down (uncontained: SIGKILL to its process group). Its
    /// slot is free once init has been reaped (`on_exit`).
    fn kill_everything(&mut self, ticket: u32) {
        let Some(r) = self.running.get_mut(&ticket) else { return };
        match r.pid {
            Some(pid) => spawn::kill_replica(pid, self.cfg.sandbox.containment != Containment::Uncontained),
            // Launched: closing the control pipe ends init, and the kernel
            // then kills every process of its namespace.
            None => r.control = None,
        }
        // The second path: every process in the replica's cgroup (the
        // slot's: all but its launcher).
        if let Some(g) = &r.group {
            g.kill_all();
        } else if let Some(Slot { group: Some(g), launcher: Some(l), .. }) = self.slot_state.get(r.slot) {
            g.kill_all_but(l.pid());
        }
    }

    /// Try again to remove the groups of reaped replicas.
    fn remove_stale_groups(&mut self, now: Instant) {
        let mut busy = Vec::new();
        for g in std::mem::take(&mut self.stale_groups) {
            if let Err(g) = g.remove() {
                busy.push(g);
            }
        }
        self.stale_groups = busy;
        self.retry_groups = (!self.stale_groups.is_empty()).then_some(now + GROUP_RETRY);
    }

    /// A child was reaped. If it was one of our replicas' inits (or
    /// uncontained jobs), finish it; if it was a slot's launcher, forget it
    /// (the slot's next replica starts another).
    pub fn on_exit(&mut self, pid: Pid, status: WaitStatus) -> Option<Finished> {
        if let Some(slot) = self.slot_state.iter().position(|s| s.launcher.as_ref().is_some_and(|l| l.pid() == pid)) {
            log::warn!(
                "{}: slot {slot}'s launcher (pid {pid}) ended: {status:?}; the next replica starts another",
                self.name()
            );
            self.slot_state[slot].launcher = None;
            return None;
        }
        let ticket = self.running.values().find(|r| r.pid == Some(pid))?.ticket;
        // Uncontained, a daemon may still hold the pipe: read what is there
        // (bounded), not until EOF.
        self.drain_output(ticket, 1024);
        let r = self.running.remove(&ticket)?;
        Some(self.finish(r, status))
    }

    /// A launched replica's output pipe reached its end: init is gone
    /// (it holds the pipe until it exits), and what it and the job wrote on
    /// the status pipe is there. Finish it. `None`: not a launched replica.
    pub fn output_closed(&mut self, ticket: u32) -> Option<Finished> {
        if self.running.get(&ticket)?.pid.is_some() {
            return None; // its end is its reaping
        }
        let r = self.running.remove(&ticket)?;
        // Without init's report: init was killed, or its setup failed.
        let init = Pid::from_raw(1);
        let status = WaitStatus::Signaled(init, nix::sys::signal::Signal::SIGKILL, false);
        Some(self.finish(r, status))
    }

    /// A replica has ended (`status`: its init's or job's, used when init
    /// made no report): its result, its group released.
    fn finish(&mut self, r: Running, status: WaitStatus) -> Finished {
        let pid = r.pid.unwrap_or(Pid::from_raw(1));
        let (setup_error, report) = spawn::read_report(r.status);
        // Init reports how the job's main process ended; without a report
        // (init was killed, or uncontained) init's own status is the job's;
        // a launched init that failed its setup exits like this.
        let status = match status {
            _ if r.pid.is_none() && report.is_none() && !setup_error.is_empty() => {
                WaitStatus::Exited(pid, spawn::SETUP_FAILED)
            }
            s => s,
        };
        let job = report.and_then(|raw| WaitStatus::from_raw(pid, raw).ok()).unwrap_or(status);
        let mut result = spawn::classify_exit(job, &setup_error, r.stop.as_ref());
        if result.kind == Outcome::Failed {
            result.recipe_code = spawn::recipe_code(&r.tail).unwrap_or(-1);
        }
        let oom = match (&r.group, self.slot_state.get_mut(r.slot)) {
            (Some(g), _) => g.oom_killed(),
            (None, Some(Slot { group: Some(g), ooms, .. })) => {
                let now = g.oom_kill_count();
                std::mem::replace(ooms, now) < now
            }
            _ => false,
        };
        if r.stop.is_none() && oom {
            result = RunResult {
                exit_code: result.exit_code,
                ..RunResult::ended(
                    Outcome::Killed,
                    format!(
                        "memory limit (--max-memory) exceeded: the job's processes together used more than {} MiB",
                        self.cfg.limits.address_space >> 20
                    ),
                )
            };
        }
        if let Some(g) = r.group {
            g.kill_all();
            if let Err(g) = g.remove() {
                self.stale_groups.push(g);
                self.retry_groups = Some(Instant::now() + GROUP_RETRY);
            }
        }
        match r.pid {
            Some(pid) => {
                log::debug!("node {}: ticket {}: pid {pid} ended: {status:?}, job {job:?}", self.cfg.port, r.ticket)
            }
            // Launched: init's pid is the launcher's business; its report
            // (or, without one, a kill) says how the job ended.
            None => log::debug!("node {}: ticket {}: replica ended, job {job:?}", self.cfg.port, r.ticket),
        }
        if r.own_archive {
            self.give_archive_back(r.ticket);
        }
        if r.stop == Some(StopReason::Closed) {
            self.remove_ticket(r.ticket);
        }
        Finished { ticket: r.ticket, reply_to: r.reply_to, result, pipe: r.output }
    }

    /// The ticket's output file and its length. The error says whether the
    /// output is missing for good (`true`) or could not be opened now
    /// (`false`: out of descriptors, ...; a retry may work).
    pub fn fetch(&self, ticket: u32) -> Result<(File, u64), (bool, String)> {
        let path = self.output_path(ticket);
        let file = File::open(&path).map_err(|e| {
            let gone = e.kind() == io::ErrorKind::NotFound;
            (gone, format!("{}: cannot open the output of ticket {ticket}: {e}", self.name()))
        })?;
        let len = file.metadata().map_err(|e| (false, e.to_string()))?.len();
        Ok((file, len))
    }

    /// An in-process node's NODE_FETCH: the ticket's output where it is
    /// (the main server streams it from there; NODE_DROP gives it back to
    /// the pool). Errors as `fetch`'s.
    pub fn output_in_place(&self, ticket: u32) -> Result<PathBuf, (bool, String)> {
        let path = self.output_path(ticket);
        match path.symlink_metadata() {
            Ok(_) => Ok(path),
            Err(e) => Err((
                e.kind() == io::ErrorKind::NotFound,
                format!("{}: cannot open the output of ticket {ticket}: {e}", self.name()),
            )),
        }
    }

    /// Forget a ticket: kill its replica if running (the folder goes when
    /// it has exited), else remove its folder now.
    pub fn drop_ticket(&mut self, ticket: u32) {
        match self.running.get_mut(&ticket) {
            Some(r) => {
                log::debug!("node {}: ticket {ticket}: closed while running, SIGKILL", self.cfg.port);
                r.stop = Some(StopReason::Closed);
                self.kill_everything(ticket);
            }
            None => self.remove_ticket(ticket),
        }
    }

    /// NODE_WAIT for a running replica: its end is now answered to
    /// `reply_to` (the link it was started on may be gone). False if the
    /// ticket runs no replica here.
    pub fn rewait(&mut self, ticket: u32, reply_to: ReplyTo) -> bool {
        match self.running.get_mut(&ticket) {
            Some(r) => {
                r.reply_to = reply_to;
                true
            }
            None => false,
        }
    }

    /// Stop a ticket's replica (fail-fast) and keep its output for NODE_FETCH.
    pub fn stop_ticket(&mut self, ticket: u32) {
        let Some(r) = self.running.get_mut(&ticket) else { return };
        if r.stop != Some(StopReason::Closed) {
            log::debug!("node {}: ticket {ticket}: stopped by the main server, SIGKILL", self.cfg.port);
            r.stop = Some(StopReason::Stopped);
        }
        self.kill_everything(ticket);
    }

    /// NODE_FOLLOW: the ticket's output from `offset` (at most
    /// FOLLOW_CHUNK bytes) and whether its replica has ended; `None`: the
    /// replica runs and has written nothing past `offset` yet, so the call
    /// is parked until it does or ends (`ready_followers`).
    pub fn follow(&mut self, ticket: u32, offset: u64, reply_to: ReplyTo) -> Option<Result<Chunk, String>> {
        match self.running.get(&ticket) {
            Some(r) if r.written <= offset => {
                self.followers.push((reply_to, ticket, offset));
                None
            }
            running => Some(self.read_output(ticket, offset, running.is_none())),
        }
    }

    /// Parked followers that can be answered now: new output, or the end.
    pub fn ready_followers(&mut self) -> Vec<(ReplyTo, Result<Chunk, String>)> {
        if self.followers.is_empty() {
            return Vec::new();
        }
        let mut ready = Vec::new();
        for (reply_to, ticket, offset) in std::mem::take(&mut self.followers) {
            match self.running.get(&ticket) {
                Some(r) if r.written <= offset => self.followers.push((reply_to, ticket, offset)),
                running => {
                    let ended = running.is_none();
                    ready.push((reply_to, self.read_output(ticket, offset, ended)));
                }
            }
        }
        ready
    }

    /// Up to FOLLOW_CHUNK bytes of the ticket's output from `offset`; the
    /// flag: the replica has `ended` and nothing is left after them.
    fn read_output(&self, ticket: u32, offset: u64, ended: bool) -> Result<Chunk, String> {
        use std::os::unix::fs::FileExt;
        let file = File::open(self.output_path(ticket))
            .map_err(|e| format!("{}: no output for ticket {ticket}: {e}", self.name()))?;
        let mut buf = vec![0u8; FOLLOW_CHUNK];
        let n = file.read_at(&mut buf, offset).map_err(|e| format!("{}: cannot read the output: {e}", self.name()))?;
        buf.truncate(n);
        let len = file.metadata().map_or(0, |m| m.len());
        Ok((buf, ended && offset + n as u64 >= len))
    }

    /// The ticket's output (and a stale archive) go back to the pool.
    fn remove_ticket(&self, ticket: u32) {
        // Reusable once the main server's journal says the ticket is closed
        // (`NodeService::settle_outputs`): until then a crash brings the
        // ticket back with its output.
        self.pool.borrow_mut().give_after_sync(&self.output_path(ticket));
        self.give_archive_back(ticket);
        // An uncontained job's files are on disk, maybe 200,000 of them:
        // removed by a child, never on the reactor thread.
        let dir = self.ticket_dir(ticket);
        if self.cfg.sandbox.containment == Containment::Uncontained && dir.symlink_metadata().is_ok() {
            match spawn::remove_tree_in_background(&dir) {
                Ok(pid) => log::debug!("node {}: removing {} in pid {pid}", self.cfg.port, dir.display()),
                Err(e) => log::warn!("node {}: cannot fork to remove {}: {e}", self.cfg.port, dir.display()),
            }
        }
    }

    /// Server shutdown, after the replicas were reaped: stop the slots'
    /// launchers, remove what groups can be removed now (an earlier run's
    /// are reclaimed at start).
    pub fn release_groups(&mut self) {
        for slot in std::mem::take(&mut self.slot_state) {
            if let Some(l) = slot.launcher {
                l.stop();
            }
            if let Some(g) = slot.group {
                self.stale_groups.push(g);
            }
        }
        self.remove_stale_groups(Instant::now());
        self.retry_groups = None;
    }

    /// Server shutdown: kill the running replicas, wait (bounded) for the
    /// launched ones to end; returns the children to reap (the others).
    pub fn shutdown(&mut self) -> Vec<Pid> {
        let tickets: Vec<u32> = self.running.keys().copied().collect();
        for &ticket in &tickets {
            if let Some(r) = self.running.get_mut(&ticket) {
                r.stop = Some(StopReason::Shutdown);
            }
            self.kill_everything(ticket);
        }
        // SIGKILL ends a namespace at once; the bound is for a stuck kernel.
        let give_up = Instant::now() + Duration::from_secs(10);
        for ticket in tickets {
            let Some(fd) = self.running.get(&ticket).filter(|r| r.pid.is_none()).map(|r| r.output.as_raw_fd()) else {
                continue;
            };
            loop {
                match self.drain_output(ticket, 1024) {
                    Drained::Closed => break,
                    Drained::More => continue,
                    Drained::Empty => {
                        let left = give_up.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            log::warn!("{}: ticket {ticket}: the replica did not end; left behind", self.name());
                            break;
                        }
                        let mut p = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
                        // SAFETY: polls one descriptor we own, bounded.
                        unsafe { libc::poll(p.as_mut_ptr(), 1, left.as_millis().min(1000) as libc::c_int) };
                    }
                }
            }
            let _ = self.output_closed(ticket);
        }
        self.running.values().filter_map(|r| r.pid).collect()
    }
}
