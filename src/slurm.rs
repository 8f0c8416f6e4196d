//! A node backed by Slurm: a node line `slurm:PARTITION [slots=K]` hands
//! its replicas to an existing Slurm cluster instead of fork/exec.
//!
//! Owns: the node line's format; the batch script (extract the archive in
//! the ticket's folder, `make run` with the CLOUD_* environment our own
//! replicas get) and the `sbatch`, `squeue`, `scontrol` and `scancel`
//! argvs; parsing their answers; mapping Slurm's job states to our
//! `RunResult` (every message names the Slurm job id); and, in
//! [`SlurmNode`], the node's folder `<dir>/<ticket>/` (`job.tar.gz`,
//! `job.sh`, `output.txt` written by Slurm, the workspace `work/`), the
//! replicas it has submitted, and the Slurm commands it runs as children
//! (pid and a non-blocking pipe carrying their stdout and stderr).
//! Everything but [`SlurmNode`] is sans-I/O and unit-tested here.
//!
//! The I/O layer never blocks and never sleeps: each command is a child
//! whose pipe the reactor may register (`take_new_pipes`, `on_readable`)
//! and whose exit the reactor's reaper reports (`on_exit`). While replicas
//! are in Slurm, one `squeue` for all of them runs per poll interval (1 s
//! by default, never faster), as a deadline the reactor's poll timeout
//! honours; an idle Slurm node runs nothing. A replica seen in a final
//! state gets one `scontrol show job` for its exit code. CLOSE, the time
//! limit (counted from when Slurm starts running the replica) and server
//! shutdown become `scancel`. Commands that hang are killed after
//! `command_timeout`.
//!
//! Must not touch: sockets or the reactor (it is handed readiness and
//! exits), the main server's job table, Slurm's configuration (the
//! commands find the cluster the usual way, or through `SLURM_CONF` in
//! `SlurmConfig::env`). The replica runs under Slurm's containment, as the
//! user the server runs as, not in our sandbox.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::node::ReplyTo;
use crate::proto::{Outcome, RunArgs, RunResult};
use crate::spawn::{StopReason, REPLICA_PATH};

/// A parsed node line `slurm:PARTITION [slots=K]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmLine {
    pub partition: String,
    /// Replicas this node hands to Slurm at once (default 1).
    pub slots: u32,
}

/// Parse a node line. `Ok(None)`: not a Slurm line (no `slurm:` prefix).
pub fn parse_node_line(line: &str) -> Result<Option<SlurmLine>, String> {
    let mut words = line.split_whitespace();
    let Some(first) = words.next() else { return Ok(None) };
    let Some(partition) = first.strip_prefix("slurm:") else { return Ok(None) };
    if partition.is_empty() || !partition.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err(format!(
            "'{first}': a Slurm partition name is letters, digits, '_', '.' or '-' (e.g. slurm:batch slots=4)"
        ));
    }
    let mut slots = 1;
    for word in words {
        let Some(k) = word.strip_prefix("slots=") else {
            return Err(format!("'{word}': a Slurm node line takes only slots=K after the partition"));
        };
        slots = match k.parse::<u32>() {
            Ok(k) if (1..=1024).contains(&k) => k,
            _ => return Err(format!("'{word}': slots must be a number from 1 to 1024")),
        };
    }
    Ok(Some(SlurmLine { partition: partition.to_string(), slots }))
}

/// `s` quoted for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What the batch script and its argv need to know about one replica.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    /// The ticket's folder; holds `job.tar.gz`, gets `job.sh`, `output.txt`, `work/`.
    pub dir: &'a Path,
    pub args: RunArgs,
    pub partition: &'a str,
    /// Our time limit; Slurm's `--time` is this rounded up to minutes plus
    /// one minute, a backstop behind our own `scancel`.
    pub time_limit: Duration,
}

impl Submission<'_> {
    fn dir_str(&self) -> Result<&str, String> {
        let dir = self.dir.to_str().ok_or_else(|| format!("{}: not UTF-8", self.dir.display()))?;
        // Slurm expands %j and friends in --output; a backslash turns that off
        // but we would rather not depend on it.
        if dir.contains('%') || dir.contains('\\') || dir.contains('\n') {
            return Err(format!("{dir}: a Slurm node's work dir cannot contain '%', '\\' or a newline"));
        }
        Ok(dir)
    }

    pub fn script_path(&self) -> PathBuf {
        self.dir.join("job.sh")
    }

    pub fn output_path(&self) -> PathBuf {
        self.dir.join("output.txt")
    }

    /// The batch script: the environment our replicas get (spawn::replica_env,
    /// with `CLOUD_NODE=slurm:PARTITION` instead of a port; Slurm adds its
    /// SLURM_* variables), extract the archive into `work/`, `make run`.
    pub fn batch_script(&self) -> Result<String, String> {
        let dir = self.dir_str()?;
        let work = format!("{dir}/work");
        let RunArgs { ticket, replica, replicas } = self.args;
        Ok(format!(
            "#!/bin/sh\n\
             # cloud ticket {ticket}, replica {replica} of {replicas}: written by cloud-server's Slurm node\n\
             export PATH={path} HOME={qwork} LANG=C.UTF-8 SLURM_EXPORT_ENV=ALL\n\
             export CLOUD_TICKET={ticket} CLOUD_REPLICA={replica} CLOUD_REPLICAS={replicas} CLOUD_NODE={node}\n\
             rm -rf {qwork} && mkdir -m 700 {qwork} && cd {qwork} || exit 1\n\
             tar -xzf {archive} --no-same-owner --no-same-permissions || \
             {{ echo \"cloud: cannot extract the job's archive\" >&2; exit 1; }}\n\
             exec make run\n",
            path = sh_quote(REPLICA_PATH),
            qwork = sh_quote(&work),
            node = sh_quote(&format!("slurm:{}", self.partition)),
            archive = sh_quote(&format!("{dir}/job.tar.gz")),
        ))
    }

    /// `sbatch --parsable ...`: the job id on stdout, nothing of the
    /// server's environment passed on, stdout and stderr to `output.txt`.
    pub fn sbatch_argv(&self) -> Result<Vec<String>, String> {
        let dir = self.dir_str()?;
        let minutes = self.time_limit.as_secs().div_ceil(60) + 1;
        Ok(vec![
            "sbatch".into(),
            "--parsable".into(),
            "--export=NONE".into(),
            "--no-requeue".into(),
            format!("--partition={}", self.partition),
            format!("--job-name=cloud-{}-{}", self.args.ticket, self.args.replica),
            format!("--chdir={dir}"),
            format!("--output={dir}/output.txt"),
            "--open-mode=truncate".into(),
            format!("--time={minutes}"),
            format!("{dir}/job.sh"),
        ])
    }
}

/// The job id in sbatch's answer (`42` or `42;cluster`), or sbatch's
/// error in one line.
pub fn parse_sbatch(output: &str) -> Result<u64, String> {
    for line in output.lines() {
        let id = line.trim().split(';').next().unwrap_or("");
        if let Ok(id) = id.parse::<u64>() {
            return Ok(id);
        }
    }
    Err(one_line(output, "sbatch printed no job id"))
}

/// The first non-empty line of a command's output, or `empty`.
fn one_line(output: &str, empty: &str) -> String {
    output.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(empty).chars().take(300).collect()
}

/// `squeue` for these jobs, in every state (finished ones too).
pub fn squeue_argv(ids: &[u64]) -> Vec<String> {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    vec![
        "squeue".into(),
        "-h".into(),
        "-t".into(),
        "all".into(),
        "-j".into(),
        ids.join(","),
        "-o".into(),
        "%i %T %r".into(),
    ]
}

/// `squeue -h -o '%i %T %r'` lines as (job id, state, reason); other lines
/// (errors, warnings) are left out.
pub fn parse_squeue(output: &str) -> Vec<(u64, String, String)> {
    output
        .lines()
        .filter_map(|line| {
            let mut w = line.split_whitespace();
            let id = w.next()?.parse().ok()?;
            let state = w.next()?;
            if !state.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                return None;
            }
            Some((id, state.to_string(), w.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// True if squeue's failure means none of the jobs asked about is known.
pub fn squeue_says_unknown(output: &str) -> bool {
    output.contains("Invalid job id")
}

pub fn scontrol_argv(id: u64) -> Vec<String> {
    vec!["scontrol".into(), "-o".into(), "show".into(), "job".into(), id.to_string()]
}

pub fn scancel_argv(ids: &[u64]) -> Vec<String> {
    let mut argv = vec!["scancel".to_string()];
    argv.extend(ids.iter().map(u64::to_string));
    argv
}

/// What `scontrol -o show job ID` says about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub state: String,
    pub reason: String,
    /// `ExitCode=code:signal`.
    pub exit: Option<(i32, i32)>,
}

pub fn parse_scontrol(output: &str) -> Option<JobInfo> {
    let line = output.lines().find(|l| l.contains("JobState="))?;
    let field = |name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('='))).map(str::to_string)
    };
    let state = field("JobState")?;
    let exit = field("ExitCode").and_then(|e| {
        let (code, sig) = e.split_once(':')?;
        Some((code.parse().ok()?, sig.parse().ok()?))
    });
    Some(JobInfo { state, reason: field("Reason").unwrap_or_default(), exit })
}

/// Where a Slurm job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for resources (PENDING, CONFIGURING, REQUEUED, SUSPENDED, ...).
    Queued,
    /// RUNNING, COMPLETING, ...: our time limit runs.
    Running,
    /// Ended for good: COMPLETED, FAILED, TIMEOUT, CANCELLED, NODE_FAIL, ...
    Final,
}

pub fn phase(state: &str) -> Phase {
    match state {
        "COMPLETED" | "FAILED" | "TIMEOUT" | "CANCELLED" | "NODE_FAIL" | "OUT_OF_MEMORY" | "PREEMPTED"
        | "BOOT_FAIL" | "DEADLINE" | "REVOKED" | "SPECIAL_EXIT" => Phase::Final,
        "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" | "STOPPED" => Phase::Running,
        _ => Phase::Queued,
    }
}

/// Our result for a Slurm job that ended. `stop` says why we cancelled it,
/// if we did.
pub fn result_for(id: u64, info: &JobInfo, stop: Option<&StopReason>) -> RunResult {
    let exit_code = match info.exit {
        Some((code, 0)) => code,
        Some((_, sig)) => 128 + sig,
        None => -1,
    };
    // How it ended, as our outcome kinds say it.
    let ended = |kind: Outcome, message: String| RunResult { exit_code, ..RunResult::ended(kind, message) };
    let invalid = |message: String| ended(Outcome::Killed, message);
    let state = info.state.as_str();
    if let (Some(stop), "CANCELLED" | "FAILED" | "COMPLETED" | "TIMEOUT") = (stop, state) {
        // What we asked for happened (or the job ended on its own meanwhile,
        // which COMPLETED reports below).
        if state != "COMPLETED" {
            let why = match stop {
                StopReason::TimeLimit { seconds, .. } => format!("time limit of {seconds}s exceeded (--time-limit)"),
                StopReason::Closed => "the ticket was closed".into(),
                StopReason::Shutdown => "the server shut down".into(),
                StopReason::Stopped => "stopped by the main server".into(),
            };
            return ended(Outcome::Killed, format!("slurm job {id}: cancelled: {why}"));
        }
    }
    match state {
        "COMPLETED" => RunResult::exited(0, format!("slurm job {id}: COMPLETED, make run exited with status 0")),
        "FAILED" => match info.exit {
            Some((_, sig)) if sig != 0 => invalid(format!("slurm job {id}: FAILED, killed by signal {sig}")),
            Some((code, _)) => ended(Outcome::Failed, format!("slurm job {id}: FAILED, exit {code}")),
            None => ended(Outcome::Failed, format!("slurm job {id}: FAILED ({})", info.reason)),
        },
        "TIMEOUT" => invalid(format!("slurm job {id}: TIMEOUT, Slurm's time limit for it ran out")),
        "CANCELLED" => invalid(format!("slurm job {id}: CANCELLED, cancelled in Slurm (scancel or an operator)")),
        "NODE_FAIL" => ended(Outcome::Lost, format!("slurm job {id}: NODE_FAIL, the Slurm node running it failed")),
        "OUT_OF_MEMORY" => invalid(format!("slurm job {id}: OUT_OF_MEMORY, it went over its Slurm memory limit")),
        "PREEMPTED" => invalid(format!("slurm job {id}: PREEMPTED by another Slurm job")),
        other if info.reason.is_empty() || info.reason == "None" => invalid(format!("slurm job {id}: {other}")),
        other => invalid(format!("slurm job {id}: {other} ({})", info.reason)),
    }
}

/// How a Slurm node is run.
#[derive(Debug, Clone)]
pub struct SlurmConfig {
    pub partition: String,
    pub slots: u32,
    /// The node's folder, one subfolder per ticket. Slurm's compute nodes
    /// must see it at the same path (one host, or a shared filesystem).
    pub dir: PathBuf,
    pub time_limit: Duration,
    /// How long after `scancel` we wait for Slurm to confirm before giving
    /// the replica up as INVALID anyway.
    pub kill_grace: Duration,
    /// Bytes of output served by NODE_FETCH; the rest is not sent.
    pub max_output: u64,
    /// Interval between `squeue` polls while replicas are in Slurm.
    pub poll: Duration,
    /// A Slurm command running longer than this is killed.
    pub command_timeout: Duration,
    /// Extra environment for the Slurm commands (e.g. `SLURM_CONF`).
    pub env: Vec<(OsString, OsString)>,
}

impl SlurmConfig {
    pub fn new(line: SlurmLine, dir: PathBuf, time_limit: Duration) -> SlurmConfig {
        SlurmConfig {
            partition: line.partition,
            slots: line.slots,
            dir,
            time_limit,
            kill_grace: Duration::from_secs(10),
            max_output: 1 << 20,
            poll: POLL,
            command_timeout: Duration::from_secs(30),
            env: Vec::new(),
        }
    }
}

/// The default (and smallest) interval between polls.
pub const POLL: Duration = Duration::from_secs(1);

/// Bytes of a command's output kept (squeue for 1024 slots fits).
const MAX_COMMAND_OUTPUT: usize = 256 * 1024;

#[derive(Debug)]
struct Replica {
    replica: u32,
    reply_to: ReplyTo,
    /// Slurm's job id, once sbatch has answered.
    job: Option<u64>,
    /// Our time limit, set when Slurm is first seen running the job.
    deadline: Option<Instant>,
    stop: Option<StopReason>,
    /// After a scancel: when to give up waiting for Slurm to confirm.
    give_up: Option<Instant>,
    /// Last state squeue reported.
    state: String,
    /// An scontrol for the final state is under way.
    detailing: bool,
    /// The last note about it (`take_notes`).
    note: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Submit(u32),
    Poll(Vec<u64>),
    Detail(u32, u64),
    Cancel,
}

#[derive(Debug)]
struct Cmd {
    pid: Pid,
    purpose: Purpose,
    pipe: OwnedFd,
    out: Vec<u8>,
    deadline: Instant,
    /// Killed by us for running past `command_timeout`.
    hung: bool,
}

/// A replica that has ended: the deferred NODE_RUN reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmFinished {
    pub ticket: u32,
    pub reply_to: ReplyTo,
    pub result: RunResult,
}

/// A Slurm command that was reaped.
#[derive(Debug)]
pub struct CommandExited {
    /// Its pipe, still open so the reactor can deregister it.
    pub pipe: OwnedFd,
    /// Replicas that ended on what it said.
    pub finished: Vec<SlurmFinished>,
}

/// A node whose replicas run in Slurm; the same shape as `node::Node`.
/// After any call, `take_new_pipes` gives the pipes of commands it started,
/// and `take_notes` what it learnt about running replicas.
#[derive(Debug)]
pub struct SlurmNode {
    pub cfg: SlurmConfig,
    replicas: BTreeMap<u32, Replica>,
    cmds: Vec<Cmd>,
    new_pipes: Vec<RawFd>,
    next_poll: Option<Instant>,
    /// (ticket, message) for running replicas whose Slurm job or state is
    /// new: "slurm job 42: PENDING (Resources)".
    notes: Vec<(u32, String)>,
}

impl SlurmNode {
    pub fn new(cfg: SlurmConfig) -> io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&cfg.dir)?;
        Ok(SlurmNode {
            cfg,
            replicas: BTreeMap::new(),
            cmds: Vec::new(),
            new_pipes: Vec::new(),
            next_poll: None,
            notes: Vec::new(),
        })
    }

    pub fn name(&self) -> String {
        format!("slurm:{}", self.cfg.partition)
    }

    fn ticket_dir(&self, ticket: u32) -> PathBuf {
        self.cfg.dir.join(ticket.to_string())
    }

    /// Replicas submitted and not yet ended.
    pub fn busy(&self) -> usize {
        self.replicas.len()
    }

    /// Slurm job ids of the running replicas, by ticket.
    pub fn jobs(&self) -> Vec<(u32, Option<u64>)> {
        self.replicas.iter().map(|(t, r)| (*t, r.job)).collect()
    }

    /// Pids of the Slurm commands still running (to reap at shutdown).
    pub fn command_pids(&self) -> Vec<Pid> {
        self.cmds.iter().map(|c| c.pid).collect()
    }

    /// Pipes of the commands started since the last call, to register.
    pub fn take_new_pipes(&mut self) -> Vec<RawFd> {
        std::mem::take(&mut self.new_pipes)
    }

    /// What became known about running replicas since the last call, as a
    /// status message each: (ticket, "slurm job 42: RUNNING").
    pub fn take_notes(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.notes)
    }

    /// Create the ticket's folder and the file its archive streams into.
    pub fn prepare_archive(&self, ticket: u32) -> io::Result<(File, PathBuf)> {
        let dir = self.ticket_dir(ticket);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("job.tar.gz");
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        Ok((file, path))
    }

    /// An in-process node's archive: the main server's spool file copied
    /// into the ticket's folder (never hard-linked: spool files are reused
    /// for other jobs, and this folder is shared with the Slurm cluster).
    pub fn adopt_archive(&self, ticket: u32, from: &Path) -> io::Result<()> {
        let (mut file, _) = self.prepare_archive(ticket)?;
        io::copy(&mut File::open(from)?, &mut file)?;
        Ok(())
    }

    /// Submit the replica whose archive is in place (sbatch runs as a
    /// child; `on_exit` learns its job id). On failure, the result to
    /// reply at once.
    pub fn start(&mut self, args: RunArgs, reply_to: ReplyTo, now: Instant) -> Result<(), RunResult> {
        let name = self.name();
        if self.replicas.contains_key(&args.ticket) {
            return Err(RunResult::invalid(format!("{name} already runs a replica of ticket {}", args.ticket)));
        }
        if self.replicas.len() >= self.cfg.slots as usize {
            return Err(RunResult::invalid(format!("{name} is busy: all {} slots in use", self.cfg.slots)));
        }
        let dir = self.ticket_dir(args.ticket);
        let sub = Submission { dir: &dir, args, partition: &self.cfg.partition, time_limit: self.cfg.time_limit };
        let script = sub.batch_script().map_err(|e| RunResult::invalid(format!("{name}: {e}")))?;
        let argv = sub.sbatch_argv().map_err(|e| RunResult::invalid(format!("{name}: {e}")))?;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(sub.script_path())
            .and_then(|mut f| f.write_all(script.as_bytes()))
            .map_err(|e| RunResult::invalid(format!("{name}: cannot write the batch script: {e}")))?;
        self.run(&argv, Purpose::Submit(args.ticket), now)
            .map_err(|e| RunResult::invalid(format!("{name}: cannot run sbatch: {e}")))?;
        self.replicas.insert(
            args.ticket,
            Replica {
                replica: args.replica,
                reply_to,
                job: None,
                deadline: None,
                stop: None,
                give_up: None,
                state: "SUBMITTING".into(),
                detailing: false,
                note: String::new(),
            },
        );
        Ok(())
    }

    /// Start a Slurm command and keep it until `on_exit`.
    fn run(&mut self, argv: &[String], purpose: Purpose, now: Instant) -> io::Result<()> {
        let (pid, pipe) = spawn_command(argv, &self.cfg.env)?;
        log::debug!("{}: pid {pid}: {}", self.name(), argv.join(" "));
        self.new_pipes.push(pipe.as_raw_fd());
        let deadline = now + self.cfg.command_timeout;
        self.cmds.push(Cmd { pid, purpose, pipe, out: Vec::new(), deadline, hung: false });
        Ok(())
    }

    /// A command's pipe is readable: keep what it says (bounded).
    pub fn on_readable(&mut self, fd: RawFd) {
        if let Some(c) = self.cmds.iter_mut().find(|c| c.pipe.as_raw_fd() == fd) {
            drain(c);
        }
    }

    /// The next moment `on_timer` has work to do.
    pub fn deadline(&self) -> Option<Instant> {
        let replicas = self.replicas.values().flat_map(|r| if r.stop.is_some() { r.give_up } else { r.deadline });
        let cmds = self.cmds.iter().map(|c| c.deadline);
        replicas.chain(cmds).chain(self.next_poll).min()
    }

    /// Poll Slurm, enforce the time limit, kill hung commands, give up on
    /// cancels Slurm never confirmed.
    pub fn on_timer(&mut self, now: Instant) -> Vec<SlurmFinished> {
        let name = self.name();
        for c in &mut self.cmds {
            if c.deadline <= now {
                log::warn!("{name}: pid {} ({:?}) hung, killing it", c.pid, c.purpose);
                let _ = kill(c.pid, Signal::SIGKILL);
                c.hung = true;
                c.deadline = now + Duration::from_secs(3600);
            }
        }
        let seconds = self.cfg.time_limit.as_secs();
        let mut cancel = Vec::new();
        for r in self.replicas.values_mut() {
            if r.stop.is_none() && r.deadline.is_some_and(|d| d <= now) {
                r.stop = Some(StopReason::TimeLimit { seconds, killed: true });
                r.give_up = Some(now + self.cfg.kill_grace);
                cancel.extend(r.job);
            }
        }
        self.cancel(&cancel, now);
        let mut finished = Vec::new();
        let expired: Vec<u32> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.stop.is_some() && r.give_up.is_some_and(|g| g <= now))
            .map(|(t, _)| *t)
            .collect();
        for ticket in expired {
            let (job, why) = match self.replicas.get(&ticket) {
                Some(r) => (r.job.unwrap_or(0), r.state.clone()),
                None => continue,
            };
            let message = format!("slurm job {job}: scancel sent, but Slurm still says {why}; given up");
            finished.extend(self.finish(ticket, RunResult::invalid(message)));
        }
        if self.next_poll.is_some_and(|t| t <= now) {
            self.next_poll = None;
            self.poll(now);
        }
        finished
    }

    /// One squeue for every replica Slurm has (none if one is under way).
    fn poll(&mut self, now: Instant) {
        if self.cmds.iter().any(|c| matches!(c.purpose, Purpose::Poll(_))) {
            return;
        }
        let ids: Vec<u64> = self.replicas.values().filter(|r| !r.detailing).filter_map(|r| r.job).collect();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.run(&squeue_argv(&ids), Purpose::Poll(ids), now) {
            log::warn!("{}: cannot run squeue: {e}; retrying", self.name());
            self.next_poll = Some(now + self.cfg.poll);
        }
    }

    fn cancel(&mut self, ids: &[u64], now: Instant) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.run(&scancel_argv(ids), Purpose::Cancel, now) {
            log::warn!("{}: cannot run scancel {ids:?}: {e}", self.name());
        }
    }

    /// A child was reaped. If it was one of our commands, act on what it said.
    pub fn on_exit(&mut self, pid: Pid, status: WaitStatus, now: Instant) -> Option<CommandExited> {
        let i = self.cmds.iter().position(|c| c.pid == pid)?;
        let mut c = self.cmds.swap_remove(i);
        drain(&mut c);
        let ok = matches!(status, WaitStatus::Exited(_, 0));
        let text = String::from_utf8_lossy(&c.out).into_owned();
        let mut finished = Vec::new();
        match c.purpose {
            Purpose::Submit(ticket) => match (ok, parse_sbatch(&text)) {
                (true, Ok(id)) => {
                    log::debug!("{}: ticket {ticket}: slurm job {id}", self.name());
                    if let Some(r) = self.replicas.get_mut(&ticket) {
                        r.job = Some(id);
                        r.state = "PENDING".into();
                        r.note = format!("slurm job {id}: PENDING");
                        self.notes.push((ticket, r.note.clone()));
                        if r.stop.is_some() {
                            // Closed (or shut down) while sbatch ran.
                            r.give_up = Some(now + self.cfg.kill_grace);
                            self.cancel(&[id], now);
                        }
                    }
                }
                (_, answer) => {
                    let why = match answer {
                        _ if c.hung => format!(
                            "no answer within {}s (is slurmctld up?); killed",
                            self.cfg.command_timeout.as_secs()
                        ),
                        Err(e) => e,
                        Ok(_) => one_line(&text, &format!("{status:?}")),
                    };
                    let message = format!("{}: sbatch failed: {why}", self.name());
                    finished.extend(self.finish(ticket, RunResult::invalid(message)));
                }
            },
            Purpose::Poll(ids) => {
                let rows = parse_squeue(&text);
                for id in ids {
                    let Some((&ticket, r)) = self.replicas.iter_mut().find(|(_, r)| r.job == Some(id)) else {
                        continue;
                    };
                    match rows.iter().find(|(j, _, _)| *j == id) {
                        Some((_, state, reason)) => {
                            let note = match reason.as_str() {
                                "" | "None" => format!("slurm job {id}: {state}"),
                                reason => format!("slurm job {id}: {state} ({reason})"),
                            };
                            if r.note != note && phase(state) != Phase::Final {
                                r.note = note.clone();
                                self.notes.push((ticket, note));
                            }
                            r.state = state.clone();
                            match phase(state) {
                                Phase::Queued => {}
                                Phase::Running => {
                                    if r.deadline.is_none() {
                                        r.deadline = Some(now + self.cfg.time_limit);
                                    }
                                }
                                Phase::Final => {
                                    r.detailing = true;
                                    self.detail(ticket, id, now);
                                }
                            }
                        }
                        // Not listed: gone from Slurm, or squeue failed.
                        None if ok || squeue_says_unknown(&text) => {
                            r.detailing = true;
                            self.detail(ticket, id, now);
                        }
                        None => log::warn!("{}: squeue failed: {}", self.name(), one_line(&text, "no output")),
                    }
                }
            }
            Purpose::Detail(ticket, id) => {
                let info = parse_scontrol(&text).filter(|i| phase(&i.state) == Phase::Final);
                let last = self.replicas.get(&ticket).map(|r| r.state.clone()).unwrap_or_default();
                let info = match (info, phase(&last)) {
                    (Some(info), _) => Some(info),
                    // scontrol failed but squeue saw it end: its state, no exit code.
                    (None, Phase::Final) => Some(JobInfo { state: last, reason: String::new(), exit: None }),
                    (None, _) => None,
                };
                match info {
                    Some(info) => {
                        let stop = self.replicas.get(&ticket).and_then(|r| r.stop.clone());
                        finished.extend(self.finish(ticket, result_for(id, &info, stop.as_ref())));
                    }
                    None if squeue_says_unknown(&text) => {
                        let message = format!("slurm job {id}: no longer known to Slurm; its outcome is unknown");
                        finished.extend(self.finish(ticket, RunResult::invalid(message)));
                    }
                    None => {
                        // Still running after all, or scontrol failed: back to polling.
                        if let Some(r) = self.replicas.get_mut(&ticket) {
                            r.detailing = false;
                        }
                    }
                }
            }
            Purpose::Cancel => {
                if !ok {
                    log::warn!("{}: scancel: {}", self.name(), one_line(&text, &format!("{status:?}")));
                }
            }
        }
        if self.next_poll.is_none() && self.replicas.values().any(|r| r.job.is_some() && !r.detailing) {
            self.next_poll = Some(now + self.cfg.poll);
        }
        Some(CommandExited { pipe: c.pipe, finished })
    }

    fn detail(&mut self, ticket: u32, id: u64, now: Instant) {
        if let Err(e) = self.run(&scontrol_argv(id), Purpose::Detail(ticket, id), now) {
            log::warn!("{}: cannot run scontrol: {e}; polling again", self.name());
            if let Some(r) = self.replicas.get_mut(&ticket) {
                r.detailing = false;
            }
        }
    }

    fn finish(&mut self, ticket: u32, result: RunResult) -> Option<SlurmFinished> {
        let r = self.replicas.remove(&ticket)?;
        if self.replicas.is_empty() {
            // An idle Slurm node runs nothing and wakes for nothing.
            self.next_poll = None;
        }
        log::debug!("{}: ticket {ticket} replica {}: {}", self.name(), r.replica, result.message);
        let dir = self.ticket_dir(ticket);
        if r.stop == Some(StopReason::Closed) {
            self.remove_ticket(ticket);
        } else {
            let _ = fs::remove_file(dir.join("job.tar.gz"));
            let _ = fs::remove_file(dir.join("job.sh"));
        }
        Some(SlurmFinished { ticket, reply_to: r.reply_to, result })
    }

    /// The output Slurm wrote for the ticket and how much of it to send
    /// (at most `max_output`). Errors as `node::Node::fetch`.
    pub fn fetch(&self, ticket: u32) -> Result<(File, u64), (bool, String)> {
        let path = self.ticket_dir(ticket).join("output.txt");
        let file = File::open(&path).map_err(|e| {
            let gone = e.kind() == io::ErrorKind::NotFound;
            (gone, format!("{}: cannot open the output of ticket {ticket}: {e}", self.name()))
        })?;
        let len = file.metadata().map_err(|e| (false, e.to_string()))?.len();
        Ok((file, len.min(self.cfg.max_output)))
    }

    /// An in-process node's NODE_FETCH: the output Slurm wrote, cut to
    /// `max_output` bytes (with a marker line), hard-linked (or copied) to
    /// `into`. Errors as `fetch`'s.
    pub fn link_output(&self, ticket: u32, into: &Path) -> Result<(), (bool, String)> {
        let path = self.ticket_dir(ticket).join("output.txt");
        let failed = |e: io::Error| {
            let gone = e.kind() == io::ErrorKind::NotFound;
            (gone, format!("{}: cannot open the output of ticket {ticket}: {e}", self.name()))
        };
        let max = self.cfg.max_output;
        let file = OpenOptions::new().append(true).open(&path).map_err(failed)?;
        if file.metadata().map_err(failed)?.len() > max {
            // The replica has ended: nobody writes this file any more.
            file.set_len(max)
                .and_then(|()| writeln!(&file, "\n[cloud: output truncated at {max} bytes (--max-output)]"))
                .map_err(failed)?;
        }
        drop(file);
        match fs::hard_link(&path, into) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(failed(e)),
            Err(_) => fs::copy(&path, into).map(drop).map_err(failed),
        }
    }

    /// Stop a ticket's replica (fail-fast): scancel it and keep its output
    /// for NODE_FETCH. A replica still being submitted is cancelled once
    /// sbatch answers.
    pub fn stop_ticket(&mut self, ticket: u32, now: Instant) {
        let grace = self.cfg.kill_grace;
        let Some(r) = self.replicas.get_mut(&ticket) else { return };
        if r.stop.is_some() {
            return;
        }
        r.stop = Some(StopReason::Stopped);
        if let Some(id) = r.job {
            r.give_up = Some(now + grace);
            self.cancel(&[id], now);
        }
    }

    /// Forget a ticket: scancel its replica if in Slurm (the folder goes
    /// when Slurm confirms), else remove its folder now.
    pub fn drop_ticket(&mut self, ticket: u32, now: Instant) {
        let grace = self.cfg.kill_grace;
        match self.replicas.get_mut(&ticket) {
            Some(r) if r.stop.is_none() => {
                r.stop = Some(StopReason::Closed);
                let job = r.job;
                if let Some(id) = job {
                    r.give_up = Some(now + grace);
                    self.cancel(&[id], now);
                }
            }
            Some(_) => {}
            None => self.remove_ticket(ticket),
        }
    }

    fn remove_ticket(&self, ticket: u32) {
        let dir = self.ticket_dir(ticket);
        // The replica's files are on disk, maybe 200,000 of them: removed by
        // a child (reaped by the reactor like any other), never on the
        // reactor thread.
        if dir.join("work").exists() {
            match crate::spawn::remove_tree_in_background(&dir) {
                Ok(pid) => return log::debug!("{}: removing {} in pid {pid}", self.name(), dir.display()),
                Err(e) => log::warn!("{}: cannot fork to remove {}: {e}", self.name(), dir.display()),
            }
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("{}: cannot remove ticket {ticket}'s folder: {e}", self.name());
            }
        }
    }

    /// Server shutdown: scancel every replica in Slurm. Returns the pids
    /// of the commands still running, to reap.
    pub fn shutdown(&mut self, now: Instant) -> Vec<Pid> {
        let mut ids = Vec::new();
        for r in self.replicas.values_mut() {
            r.stop.get_or_insert(StopReason::Shutdown);
            ids.extend(r.job);
        }
        self.cancel(&ids, now);
        self.command_pids()
    }
}

/// Start a command (argv[0] looked up in PATH, `env` added to the
/// server's environment) with stdin from /dev/null and stdout and stderr
/// into one pipe; returns its pid and the pipe's non-blocking read end.
/// The child is not waited for here: the reactor's reaper reaps it.
pub fn spawn_command(argv: &[String], env: &[(OsString, OsString)]) -> io::Result<(Pid, OwnedFd)> {
    let (program, args) = argv.split_first().ok_or_else(|| io::Error::other("empty command"))?;
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write))
        .spawn()?;
    // The Child is dropped without waiting (dropping neither kills nor reaps).
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    Ok((Pid::from_raw(pid), read))
}

/// Read what a command's pipe holds, keeping at most MAX_COMMAND_OUTPUT.
fn drain(c: &mut Cmd) {
    let mut buf = [0u8; 8192];
    loop {
        match nix::unistd::read(&c.pipe, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let room = MAX_COMMAND_OUTPUT.saturating_sub(c.out.len());
                c.out.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::JobState;

    #[test]
    fn a_command_answers_through_its_pipe() {
        let argv: Vec<String> = ["sh", "-c", "echo \"$GREETING\"; echo oops >&2; exit 4"].map(String::from).to_vec();
        let (pid, pipe) = spawn_command(&argv, &[("GREETING".into(), "hello".into())]).unwrap();
        assert_eq!(nix::sys::wait::waitpid(pid, None).unwrap(), WaitStatus::Exited(pid, 4));
        let mut c = Cmd { pid, purpose: Purpose::Cancel, pipe, out: Vec::new(), deadline: Instant::now(), hung: false };
        drain(&mut c);
        assert_eq!(String::from_utf8_lossy(&c.out), "hello\noops\n");
        assert!(spawn_command(&["/nonexistent/sbatch".to_string()], &[]).is_err());
    }

    #[test]
    fn node_lines() {
        assert_eq!(parse_node_line("9001"), Ok(None));
        assert_eq!(parse_node_line("slurm:batch"), Ok(Some(SlurmLine { partition: "batch".into(), slots: 1 })));
        assert_eq!(
            parse_node_line("  slurm:cloud-test.1   slots=4 "),
            Ok(Some(SlurmLine { partition: "cloud-test.1".into(), slots: 4 }))
        );
        for (line, want) in [
            ("slurm:", "partition name"),
            ("slurm:a;b", "partition name"),
            ("slurm:a slots=0", "slots must be"),
            ("slurm:a slots=x", "slots must be"),
            ("slurm:a nodes=2", "only slots=K"),
        ] {
            let err = parse_node_line(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    fn sub(dir: &Path) -> Submission<'_> {
        Submission {
            dir,
            args: RunArgs { ticket: 7, replica: 2, replicas: 3 },
            partition: "cloudtest",
            time_limit: Duration::from_secs(90),
        }
    }

    #[test]
    fn the_script_gives_the_replica_its_environment_and_runs_make() {
        let script = sub(Path::new("/w/slurm/7")).batch_script().unwrap();
        assert!(script.starts_with("#!/bin/sh\n"));
        for want in [
            "CLOUD_TICKET=7 CLOUD_REPLICA=2 CLOUD_REPLICAS=3 CLOUD_NODE='slurm:cloudtest'",
            "HOME='/w/slurm/7/work'",
            "cd '/w/slurm/7/work'",
            "tar -xzf '/w/slurm/7/job.tar.gz' --no-same-owner",
            "\nexec make run\n",
        ] {
            assert!(script.contains(want), "{want:?} not in\n{script}");
        }
        let quoted = sub(Path::new("/w/it's")).batch_script().unwrap();
        assert!(quoted.contains(r"cd '/w/it'\''s/work'"), "{quoted}");
        assert!(sub(Path::new("/w/100%")).batch_script().unwrap_err().contains("cannot contain '%'"));
    }

    #[test]
    fn the_sbatch_argv() {
        let argv = sub(Path::new("/w/slurm/7")).sbatch_argv().unwrap();
        assert_eq!(
            argv,
            [
                "sbatch",
                "--parsable",
                "--export=NONE",
                "--no-requeue",
                "--partition=cloudtest",
                "--job-name=cloud-7-2",
                "--chdir=/w/slurm/7",
                "--output=/w/slurm/7/output.txt",
                "--open-mode=truncate",
                "--time=3",
                "/w/slurm/7/job.sh",
            ]
        );
        assert_eq!(scancel_argv(&[4, 5]), ["scancel", "4", "5"]);
        assert_eq!(squeue_argv(&[4, 5]), ["squeue", "-h", "-t", "all", "-j", "4,5", "-o", "%i %T %r"]);
        assert_eq!(scontrol_argv(4), ["scontrol", "-o", "show", "job", "4"]);
    }

    #[test]
    fn sbatch_answers() {
        assert_eq!(parse_sbatch("42\n"), Ok(42));
        assert_eq!(parse_sbatch("42;cluster\n"), Ok(42));
        assert_eq!(parse_sbatch("sbatch: warning: something\n43\n"), Ok(43));
        assert_eq!(
            parse_sbatch("sbatch: error: invalid partition specified: nope\n"),
            Err("sbatch: error: invalid partition specified: nope".into())
        );
        assert_eq!(parse_sbatch(""), Err("sbatch printed no job id".into()));
    }

    #[test]
    fn squeue_rows() {
        let out = "12 PENDING Resources\n13 RUNNING None\n14 FAILED NonZeroExitCode\nslurm_load_jobs error: x\n";
        assert_eq!(
            parse_squeue(out),
            vec![
                (12, "PENDING".into(), "Resources".into()),
                (13, "RUNNING".into(), "None".into()),
                (14, "FAILED".into(), "NonZeroExitCode".into()),
            ]
        );
        assert!(squeue_says_unknown("slurm_load_jobs error: Invalid job id specified\n"));
        assert_eq!(
            [phase("PENDING"), phase("RUNNING"), phase("TIMEOUT")],
            [Phase::Queued, Phase::Running, Phase::Final]
        );
    }

    #[test]
    fn scontrol_lines() {
        let out = "JobId=1 JobName=j.sh UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) \
                   Requeue=1 ExitCode=3:0 RunTime=00:00:00\n";
        assert_eq!(
            parse_scontrol(out),
            Some(JobInfo { state: "FAILED".into(), reason: "NonZeroExitCode".into(), exit: Some((3, 0)) })
        );
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified\n"), None);
    }

    #[test]
    fn slurm_states_become_our_results() {
        let info = |state: &str, exit| JobInfo { state: state.into(), reason: "None".into(), exit };
        let cases = [
            (info("COMPLETED", Some((0, 0))), None, JobState::Completed, 0, "slurm job 9: COMPLETED"),
            (info("FAILED", Some((3, 0))), None, JobState::Invalid, 3, "slurm job 9: FAILED, exit 3"),
            (info("FAILED", Some((0, 9))), None, JobState::Invalid, 137, "slurm job 9: FAILED, killed by signal 9"),
            (info("TIMEOUT", Some((0, 15))), None, JobState::Invalid, 143, "slurm job 9: TIMEOUT"),
            (info("CANCELLED", Some((0, 15))), None, JobState::Invalid, 143, "slurm job 9: CANCELLED, cancelled in"),
            (info("NODE_FAIL", None), None, JobState::Invalid, -1, "slurm job 9: NODE_FAIL"),
            (info("OUT_OF_MEMORY", Some((0, 9))), None, JobState::Invalid, 137, "slurm job 9: OUT_OF_MEMORY"),
            (info("PREEMPTED", None), None, JobState::Invalid, -1, "slurm job 9: PREEMPTED"),
            (info("BOOT_FAIL", None), None, JobState::Invalid, -1, "slurm job 9: BOOT_FAIL"),
            (
                info("CANCELLED", Some((0, 15))),
                Some(StopReason::Closed),
                JobState::Invalid,
                143,
                "slurm job 9: cancelled: the ticket was closed",
            ),
            (
                info("CANCELLED", None),
                Some(StopReason::TimeLimit { seconds: 5, killed: true }),
                JobState::Invalid,
                -1,
                "slurm job 9: cancelled: time limit of 5s exceeded (--time-limit)",
            ),
            // Ended on its own before the cancel took effect.
            (info("COMPLETED", Some((0, 0))), Some(StopReason::Closed), JobState::Completed, 0, "COMPLETED"),
        ];
        for (info, stop, state, code, want) in cases {
            let r = result_for(9, &info, stop.as_ref());
            assert_eq!((r.state, r.exit_code), (state, code), "{info:?}: {r:?}");
            assert!(r.message.starts_with(want) || r.message.contains(want), "{info:?}: {:?}", r.message);
        }
    }
}
