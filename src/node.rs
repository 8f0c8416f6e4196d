//! A side node: runs up to `slots` replicas at once (of different tickets:
//! one job's replicas never share a node) and keeps finished outputs until
//! the main server drops the ticket.
//!
//! Owns: the node's directory `<work-dir>/output_<port>/` (one subfolder
//! per ticket: `job.tar.gz`, `output.txt`, and the workspace `work/`, which
//! for a contained replica is only a mount point inside its own mount
//! namespace, a tmpfs gone with it), an empty network namespace per slot,
//! the running replicas by ticket (each with its slot and the slot's uid,
//! init's pid, output pipe, control pipe, time limit, why it was stopped),
//! capping captured output, and what to answer when a replica ends (its
//! outcome kind, and the recipe's code from make's `Error N` line, kept
//! from the output's last KiB in memory), NODE_FOLLOW calls parked until
//! the replica writes more, and NODE_STOP (kill, keep output: fail-fast
//! and cancel). Nothing to sweep: the kernel ends a contained
//! replica's every process when its init exits or is killed. Where the
//! host has cgroups, each replica also gets a group of its own (memory and
//! process totals, a second kill path, OOM detection), removed once the
//! replica is reaped (retried on later turns while busy, never waited for).
//! Must not touch: sockets or the reactor (the server hands it bytes and
//! events), the main server's job table (it only ever learns through RPC).
//! Also here: `sweep_dir`, what a restart keeps of a node's folder (the
//! tickets it is told are live, their outputs; the rest goes to a trash
//! folder the caller removes in the background), and `rewait`, a running
//! replica's end sent to a new link (NODE_WAIT).

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

/// At start, a node's folder `dir` as an earlier run left it: each ticket
/// folder that `keep` keeps stays, with its `output.txt` (its replica's
/// archive and workspace go), every other entry is moved into `trash`
/// (created on demand, same file system), named `<tag>-<entry>`, for the
/// caller to remove in the background. Returns how many entries were
/// moved. No folder yet: it is made later, nothing to do.
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
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let live = name.parse::<u32>().ok().filter(|t| keep(*t) && t.to_string() == name);
        if live.is_none() || !e.file_type().is_ok_and(|t| t.is_dir()) {
            to_trash(&e.path(), &name);
            continue;
        }
        // A replica that was running: its archive and workspace are stale.
        let _ = fs::remove_file(e.path().join("job.tar.gz"));
        let work = spawn::workspace_path(&e.path());
        if work.symlink_metadata().is_ok() {
            to_trash(&work, &format!("{name}-work"));
        }
    }
    Ok(moved)
}

/// How long a busy cgroup waits before its removal is tried again.
const GROUP_RETRY: Duration = Duration::from_millis(200);

/// A ticket folder whose archive is at least this large is removed by a
/// child (`spawn::remove_tree_in_background`), as the main server's spool.
const LARGE_ARCHIVE: u64 = 64 << 20;

/// Where to send the deferred NODE_RUN reply: connection key and xid.
pub type ReplyTo = (usize, u32);

#[derive(Debug)]
struct Running {
    ticket: u32,
    /// Which of the node's slots (and so which slot uid) it holds.
    slot: usize,
    pid: Pid,
    reply_to: ReplyTo,
    output: OwnedFd,
    status: OwnedFd,
    control: Option<OwnedFd>,
    group: Option<Cgroup>,
    file: File,
    written: u64,
    truncated: bool,
    deadline: Instant,
    stop: Option<StopReason>,
    /// The output's last bytes, for make's `Error N` line (the recipe's code).
    tail: Vec<u8>,
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

#[derive(Debug)]
pub struct Node {
    pub cfg: NodeConfig,
    /// Running replicas by ticket.
    running: BTreeMap<u32, Running>,
    /// Groups of reaped replicas still busy (their processes leaving).
    stale_groups: Vec<Cgroup>,
    retry_groups: Option<Instant>,
    buf: Vec<u8>,
    /// NODE_FOLLOW calls parked until the running replica writes past their offset.
    followers: Vec<(ReplyTo, u32, u64)>,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&cfg.dir)?;
        Ok(Node {
            cfg,
            running: BTreeMap::new(),
            stale_groups: Vec::new(),
            retry_groups: None,
            buf: vec![0; 64 * 1024],
            followers: Vec::new(),
        })
    }

    pub fn name(&self) -> String {
        format!("node {}", self.cfg.port)
    }

    fn ticket_dir(&self, ticket: u32) -> PathBuf {
        self.cfg.dir.join(ticket.to_string())
    }

    fn archive_path(&self, ticket: u32) -> PathBuf {
        self.ticket_dir(ticket).join("job.tar.gz")
    }

    fn output_path(&self, ticket: u32) -> PathBuf {
        self.ticket_dir(ticket).join("output.txt")
    }

    /// Create the ticket's folder and the file its archive streams into.
    pub fn prepare_archive(&self, ticket: u32) -> io::Result<(File, PathBuf)> {
        self.fresh_ticket_dir(ticket)?;
        let path = self.archive_path(ticket);
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        Ok((file, path))
    }

    fn fresh_ticket_dir(&self, ticket: u32) -> io::Result<()> {
        let dir = self.ticket_dir(ticket);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)
    }

    /// How many replicas it runs at once.
    pub fn slots(&self) -> usize {
        self.cfg.slot_identities.len().max(1)
    }

    /// Every ticket this node holds: running, or with a folder (an ended
    /// replica's output, kept until NODE_DROP).
    pub fn tickets(&self) -> std::collections::BTreeSet<u32> {
        let mut tickets: std::collections::BTreeSet<u32> = self.running.keys().copied().collect();
        if let Ok(entries) = fs::read_dir(&self.cfg.dir) {
            tickets.extend(entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()));
        }
        tickets
    }

    /// The running replicas' tickets and where their NODE_RUN replies go.
    pub fn running(&self) -> Vec<(u32, ReplyTo)> {
        self.running.values().map(|r| (r.ticket, r.reply_to)).collect()
    }

    /// Start the replica whose archive is in place. On success returns the
    /// output pipe's fd to register; on failure, the result to reply at once.
    pub fn start(&mut self, args: RunArgs, reply_to: ReplyTo, now: Instant) -> Result<RawFd, RunResult> {
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
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&out_path)
            .map_err(|e| RunResult::invalid(format!("{}: cannot create output file: {e}", self.name())))?;
        let workspace = spawn::workspace_path(&self.ticket_dir(args.ticket));
        let archive = self.archive_path(args.ticket);
        let env = spawn::replica_env(&workspace, args.ticket, args.replica, args.replicas, self.cfg.port);
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
            Some(g) => g
                .open_join()
                .map_err(|e| RunResult::invalid(format!("{}: cannot open the replica's cgroup: {e}", self.name())))?,
            None => Vec::new(),
        };
        let spec = SpawnSpec {
            archive: Some(&archive),
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
        let fd = spawned.output.as_raw_fd();
        let running = Running {
            ticket: args.ticket,
            slot,
            pid: spawned.pid,
            reply_to,
            output: spawned.output,
            status: spawned.status,
            control: spawned.control,
            group,
            file,
            written: 0,
            truncated: false,
            deadline: now + self.cfg.time_limit,
            stop: None,
            tail: Vec::new(),
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
        self.running.values().map(|r| r.deadline).chain(self.retry_groups).min()
    }

    /// Enforce the time limit: SIGTERM, then SIGKILL after the grace period.
    pub fn on_timer(&mut self, now: Instant) {
        let seconds = self.cfg.time_limit.as_secs();
        let grace = self.cfg.kill_grace;
        if self.retry_groups.is_some_and(|t| t <= now) {
            self.remove_stale_groups(now);
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
        let Some(r) = self.running.get(&ticket) else { return };
        spawn::kill_replica(r.pid, self.cfg.sandbox.containment != Containment::Uncontained);
        // The second path: every process in the replica's cgroup.
        if let Some(g) = &r.group {
            g.kill_all();
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

    /// A child was reaped. If it was one of our replicas' inits, finish it.
    pub fn on_exit(&mut self, pid: Pid, status: WaitStatus) -> Option<Finished> {
        let ticket = self.running.values().find(|r| r.pid == pid)?.ticket;
        // Uncontained, a daemon may still hold the pipe: read what is there
        // (bounded), not until EOF.
        self.drain_output(ticket, 1024);
        let r = self.running.remove(&ticket)?;
        let (setup_error, report) = spawn::read_report(r.status);
        // Init reports how the job's main process ended; without a report
        // (init was killed, or uncontained) init's own status is the job's.
        let job = report.and_then(|raw| WaitStatus::from_raw(pid, raw).ok()).unwrap_or(status);
        let mut result = spawn::classify_exit(job, &setup_error, r.stop.as_ref());
        if result.kind == Outcome::Failed {
            result.recipe_code = spawn::recipe_code(&r.tail).unwrap_or(-1);
        }
        if let Some(g) = r.group {
            if r.stop.is_none() && g.oom_killed() {
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
            g.kill_all();
            if let Err(g) = g.remove() {
                self.stale_groups.push(g);
                self.retry_groups = Some(Instant::now() + GROUP_RETRY);
            }
        }
        log::debug!("node {}: ticket {}: pid {pid} ended: {:?}, job {:?}", self.cfg.port, r.ticket, status, job);
        self.remove_archive(r.ticket);
        if r.stop == Some(StopReason::Closed) {
            self.remove_ticket(r.ticket);
        }
        Some(Finished { ticket: r.ticket, reply_to: r.reply_to, result, pipe: r.output })
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

    /// An in-process node's NODE_RUN archive: the main server's spool file
    /// hard-linked into the ticket's folder (same file system: no copy;
    /// copied where a link cannot be made).
    pub fn adopt_archive(&self, ticket: u32, from: &Path) -> io::Result<()> {
        self.fresh_ticket_dir(ticket)?;
        let path = self.archive_path(ticket);
        if let Err(e) = fs::hard_link(from, &path) {
            log::debug!("node {}: cannot link {} ({e}); copying", self.cfg.port, from.display());
            fs::copy(from, &path)?;
        }
        Ok(())
    }

    /// An in-process node's NODE_FETCH: the ticket's output hard-linked
    /// (or copied) to `into`. Errors as `fetch`'s.
    pub fn link_output(&self, ticket: u32, into: &Path) -> Result<(), (bool, String)> {
        let path = self.output_path(ticket);
        let failed = |e: io::Error| {
            let gone = e.kind() == io::ErrorKind::NotFound;
            (gone, format!("{}: cannot open the output of ticket {ticket}: {e}", self.name()))
        };
        match fs::hard_link(&path, into) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(failed(e)),
            Err(_) => fs::copy(&path, into).map(drop).map_err(failed),
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

    /// The replica has its files: its archive goes. Usually the last link
    /// to the upload; a large one is removed by a child (freeing 1 GiB of
    /// blocks holds ext4 for about 0.1 s).
    fn remove_archive(&self, ticket: u32) {
        let path = self.archive_path(ticket);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.len() >= LARGE_ARCHIVE) {
            match spawn::remove_tree_in_background(&path) {
                Ok(_) => return,
                Err(e) => log::warn!("node {}: cannot fork to remove {}: {e}", self.cfg.port, path.display()),
            }
        }
        let _ = fs::remove_file(&path);
    }

    fn remove_ticket(&self, ticket: u32) {
        let dir = self.ticket_dir(ticket);
        // An uncontained job's files are on disk, maybe 200,000 of them:
        // removed by a child, never on the reactor thread. (Contained, the
        // folder holds the output and an empty mount point.) So is a large
        // archive: freeing 1 GiB of blocks takes ext4 about 0.1 s.
        let large = fs::symlink_metadata(self.archive_path(ticket)).is_ok_and(|m| m.len() >= LARGE_ARCHIVE);
        if (self.cfg.sandbox.containment == Containment::Uncontained || large) && dir.exists() {
            match spawn::remove_tree_in_background(&dir) {
                Ok(pid) => return log::debug!("node {}: removing {} in pid {pid}", self.cfg.port, dir.display()),
                Err(e) => log::warn!("node {}: cannot fork to remove {}: {e}", self.cfg.port, dir.display()),
            }
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("node {}: cannot remove {}: {e}", self.cfg.port, dir.display());
            }
        }
    }

    /// Server shutdown, after the replica was reaped: remove what groups
    /// can be removed now (an earlier run's are reclaimed at start).
    pub fn release_groups(&mut self) {
        self.remove_stale_groups(Instant::now());
        self.retry_groups = None;
    }

    /// Server shutdown: kill the running replicas; returns the children to reap.
    pub fn shutdown(&mut self) -> Vec<Pid> {
        let tickets: Vec<u32> = self.running.keys().copied().collect();
        for ticket in tickets {
            if let Some(r) = self.running.get_mut(&ticket) {
                r.stop = Some(StopReason::Shutdown);
            }
            self.kill_everything(ticket);
        }
        self.running.values().map(|r| r.pid).collect()
    }
}
