//! A side node: runs one replica at a time and keeps finished outputs
//! until the main server drops the ticket.
//!
//! Owns: the node's directory `<work-dir>/output_<port>/` (one subfolder
//! per ticket: `job.tar.gz`, `output.txt`, and the workspace `work/`), the
//! running replica (pid, output pipe, time limit, why it was stopped),
//! capping captured output, and what to answer when the replica ends.
//! Must not touch: sockets or the reactor (the server hands it bytes and
//! events), the main server's job table (it only ever learns through RPC).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::proto::{RunArgs, RunResult};
use crate::spawn::{self, JobLimits, Sandbox, SpawnSpec, StopReason, Sweep};

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
    /// The sandbox uid belongs to this node alone, so every process of it
    /// may be killed when the replica ends.
    pub sweep_uid: bool,
}

/// Where to send the deferred NODE_RUN reply: connection key and xid.
pub type ReplyTo = (usize, u32);

#[derive(Debug)]
struct Running {
    ticket: u32,
    pid: Pid,
    reply_to: ReplyTo,
    output: OwnedFd,
    status: OwnedFd,
    file: File,
    written: u64,
    truncated: bool,
    deadline: Instant,
    stop: Option<StopReason>,
}

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
    pub reply_to: ReplyTo,
    pub result: RunResult,
    /// The output pipe, still open so the reactor can deregister it.
    pub pipe: OwnedFd,
}

#[derive(Debug)]
pub struct Node {
    pub cfg: NodeConfig,
    running: Option<Running>,
    /// Uid-sweep helpers not yet reaped.
    sweeps: Vec<Pid>,
    /// A replica that has ended, waiting for `sweeps` to drain:
    /// (result, ticket, remove its folder).
    finishing: Option<(Finished, u32, bool)>,
    buf: Vec<u8>,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&cfg.dir)?;
        Ok(Node { cfg, running: None, sweeps: Vec::new(), finishing: None, buf: vec![0; 64 * 1024] })
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
        let dir = self.ticket_dir(ticket);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = self.archive_path(ticket);
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        Ok((file, path))
    }

    pub fn running_pid(&self) -> Option<Pid> {
        self.running.as_ref().map(|r| r.pid)
    }

    /// Start the replica whose archive is in place. On success returns the
    /// output pipe's fd to register; on failure, the result to reply at once.
    pub fn start(&mut self, args: RunArgs, reply_to: ReplyTo, now: Instant) -> Result<RawFd, RunResult> {
        if let Some(r) = &self.running {
            return Err(RunResult::invalid(format!("{} is busy with ticket {}", self.name(), r.ticket)));
        }
        let out_path = self.output_path(args.ticket);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&out_path)
            .map_err(|e| RunResult::invalid(format!("{}: cannot create output file: {e}", self.name())))?;
        let workspace = self.ticket_dir(args.ticket).join("work");
        let archive = self.archive_path(args.ticket);
        let env = spawn::replica_env(&workspace, args.ticket, args.replica, args.replicas, self.cfg.port);
        let spec = SpawnSpec {
            archive: &archive,
            workspace: &workspace,
            env,
            limits: &self.cfg.limits,
            sandbox: self.cfg.sandbox,
        };
        let spawned = spawn::spawn(&spec)
            .map_err(|e| RunResult::invalid(format!("{}: cannot start replica: {e}", self.name())))?;
        log::debug!(
            "{}: ticket {} replica {}: spawned pid {} (pgid {})",
            self.name(),
            args.ticket,
            args.replica,
            spawned.pid,
            spawned.pid
        );
        let fd = spawned.output.as_raw_fd();
        self.running = Some(Running {
            ticket: args.ticket,
            pid: spawned.pid,
            reply_to,
            output: spawned.output,
            status: spawned.status,
            file,
            written: 0,
            truncated: false,
            deadline: now + self.cfg.time_limit,
            stop: None,
        });
        Ok(fd)
    }

    /// Move what the pipe holds into the output file, up to the cap,
    /// reading at most `budget` chunks so a flooding job cannot keep the
    /// reactor from its other work.
    pub fn drain_output(&mut self, budget: usize) -> Drained {
        let max = self.cfg.max_output;
        let Some(r) = self.running.as_mut() else {
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
        self.running.as_ref().map(|r| r.deadline)
    }

    /// Enforce the time limit: SIGTERM, then SIGKILL after the grace period.
    pub fn on_timer(&mut self, now: Instant) {
        let seconds = self.cfg.time_limit.as_secs();
        let grace = self.cfg.kill_grace;
        let Some(r) = self.running.as_mut() else {
            return;
        };
        if now < r.deadline {
            return;
        }
        match r.stop {
            None => {
                log::debug!("node {}: ticket {}: time limit, SIGTERM", self.cfg.port, r.ticket);
                r.stop = Some(StopReason::TimeLimit { seconds, killed: false });
                r.deadline = now + grace;
                spawn::signal_group(r.pid, Signal::SIGTERM);
            }
            Some(_) => {
                log::debug!("node {}: ticket {}: grace over, SIGKILL", self.cfg.port, r.ticket);
                if matches!(r.stop, Some(StopReason::TimeLimit { .. })) {
                    r.stop = Some(StopReason::TimeLimit { seconds, killed: true });
                }
                r.deadline = now + Duration::from_secs(3600);
                self.kill_everything();
            }
        }
    }

    /// SIGKILL the replica's group and, with a node-own uid, every process of it.
    /// The node is not reused (its RUN reply is held back) until every
    /// sweep helper has been reaped: a late `kill(-1)` would hit the next
    /// replica of the same uid.
    fn kill_everything(&mut self) {
        let Some(r) = &self.running else { return };
        spawn::signal_group(r.pid, Signal::SIGKILL);
        let how = match self.cfg.sandbox.identity {
            Some((uid, _)) if self.cfg.sweep_uid => Sweep::Uid(uid),
            _ => Sweep::Tagged { ticket: r.ticket, port: self.cfg.port },
        };
        match spawn::sweep(how) {
            Ok(helper) => self.sweeps.push(helper),
            Err(e) => log::warn!("node {}: cannot sweep ({how:?}): {e}", self.cfg.port),
        }
    }

    /// A child was reaped. If it was our replica, finish it.
    pub fn on_exit(&mut self, pid: Pid, status: WaitStatus) -> Option<Finished> {
        if let Some(i) = self.sweeps.iter().position(|&h| h == pid) {
            self.sweeps.swap_remove(i);
            return self.complete();
        }
        if self.running_pid() != Some(pid) {
            return None;
        }
        // Nothing of the replica may outlive it: daemons, stray children.
        self.kill_everything();
        self.drain_output(usize::MAX);
        let r = self.running.take()?;
        let setup_error = spawn::read_setup_error(r.status);
        let result = spawn::classify_exit(status, &setup_error, r.stop.as_ref());
        log::debug!("node {}: ticket {}: pid {pid} ended: {:?}", self.cfg.port, r.ticket, status);
        let finished = Finished { reply_to: r.reply_to, result, pipe: r.output };
        self.finishing = Some((finished, r.ticket, r.stop == Some(StopReason::Closed)));
        self.complete()
    }

    /// Hand out the finished replica once no sweep is outstanding, after
    /// removing its archive (and its whole folder if the ticket was closed).
    fn complete(&mut self) -> Option<Finished> {
        if !self.sweeps.is_empty() {
            return None;
        }
        let (finished, ticket, closed) = self.finishing.take()?;
        let _ = fs::remove_file(self.archive_path(ticket));
        if closed {
            self.remove_ticket(ticket);
        }
        Some(finished)
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

    /// Forget a ticket: kill its replica if running (the folder goes when
    /// it has exited), else remove its folder now.
    pub fn drop_ticket(&mut self, ticket: u32) {
        match self.running.as_mut() {
            Some(r) if r.ticket == ticket => {
                log::debug!("node {}: ticket {ticket}: closed while running, SIGKILL", self.cfg.port);
                r.stop = Some(StopReason::Closed);
                self.kill_everything();
            }
            _ => match self.finishing.as_mut() {
                Some((_, t, closed)) if *t == ticket => *closed = true,
                _ => self.remove_ticket(ticket),
            },
        }
    }

    fn remove_ticket(&self, ticket: u32) {
        let dir = self.ticket_dir(ticket);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("node {}: cannot remove {}: {e}", self.cfg.port, dir.display());
            }
        }
    }

    /// Server shutdown: kill the running replica; returns the children to
    /// reap (the replica and any sweep helpers).
    pub fn shutdown(&mut self) -> Vec<Pid> {
        if let Some(r) = self.running.as_mut() {
            r.stop = Some(StopReason::Shutdown);
            self.kill_everything();
        }
        self.running_pid().into_iter().chain(self.sweeps.iter().copied()).collect()
    }
}
