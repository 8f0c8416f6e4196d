//! Starting and stopping a replica's processes, close to the metal.
//!
//! Owns: `pipe2` + `fork`; in the child: a new session (so a process group
//! of its own), stdin from /dev/null, stdout and stderr onto one pipe, a
//! clean environment, resource limits, an empty network namespace, the
//! slot user's identity, safe extraction of the archive, and
//! `exec make run`. Setup failures travel back on a close-on-exec status
//! pipe, so the parent can tell "make failed" from "never got to make".
//! Also: killing a replica's process group and sweeping every process of a
//! slot uid, and decoding wait statuses into replica results.
//! Must not touch: the reactor, sockets, job bookkeeping.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{killpg, SigSet, SigmaskHow, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::extract::{extract, ExtractLimits};
use crate::proto::{JobState, RunResult};

/// Limits applied to every replica; each is a server option (defaults live
/// in `cloud-server --help` and docs/LIMITS.md).
#[derive(Debug, Clone)]
pub struct JobLimits {
    pub extract: ExtractLimits,
    /// RLIMIT_CPU, seconds.
    pub cpu_seconds: u64,
    /// RLIMIT_AS, bytes.
    pub address_space: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_FSIZE, bytes.
    pub file_size: u64,
    /// RLIMIT_NPROC. It counts every process of the uid, so it is only set
    /// for replicas that run under a uid of their own (`None`: untouched).
    pub processes: Option<u64>,
}

/// Who a replica runs as, and whether it gets a network of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sandbox {
    /// Drop to this uid/gid before extraction (only when the server is root).
    pub identity: Option<(Uid, Gid)>,
    /// unshare(CLONE_NEWNET): loopback only.
    pub isolate_network: bool,
}

/// Everything the child needs to start one replica.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    pub archive: &'a Path,
    /// Created by the child, owned by the sandbox identity, mode 0700.
    pub workspace: &'a Path,
    pub env: Vec<(String, String)>,
    pub limits: &'a JobLimits,
    pub sandbox: Sandbox,
}

/// A started replica.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// Read end of the stdout+stderr pipe, non-blocking.
    pub output: OwnedFd,
    /// Read end of the setup-status pipe: empty at EOF if exec succeeded.
    pub status: OwnedFd,
}

/// The only PATH a replica gets, and where `make` is looked up.
pub const REPLICA_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Exit code the child uses when setup (extraction, limits) failed.
pub const SETUP_FAILED: i32 = 125;

/// Fork a child that sets itself up and execs `make run`.
pub fn spawn(spec: &SpawnSpec) -> nix::Result<Spawned> {
    // Prepare everything that allocates from strings before forking.
    // execvpe would search the *server's* PATH; search the replica's own.
    let make: Vec<CString> =
        REPLICA_PATH.split(':').filter_map(|dir| CString::new(format!("{dir}/make")).ok()).collect();
    let argv = [CString::new("make").expect("no NUL"), CString::new("run").expect("no NUL")];
    let envp: Vec<CString> = spec.env.iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()).collect();
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (st_r, st_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the server is single-threaded, so the child may allocate and
    // run ordinary Rust code between fork and exec; it never returns into
    // the reactor (every path ends in exec or _exit).
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            drop(out_r);
            drop(st_r);
            let err = child_setup(spec, out_w, st_w.as_raw_fd(), &make, &argv, &envp);
            let mut st = File::from(st_w);
            let _ = writeln!(st, "{}", err.message);
            // SAFETY: _exit is async-signal-safe and skips the parent's atexit
            // handlers and stdio buffers, which belong to the server.
            unsafe { libc::_exit(err.code) }
        }
        ForkResult::Parent { child } => {
            drop(out_w);
            drop(st_w);
            fcntl(out_r.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
            fcntl(st_r.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
            Ok(Spawned { pid: child, output: out_r, status: st_r })
        }
    }
}

struct ChildError {
    code: i32,
    message: String,
}

fn fail(code: i32, message: String) -> ChildError {
    ChildError { code, message }
}

/// Runs in the child. Returns only on failure.
fn child_setup(
    spec: &SpawnSpec,
    out_w: OwnedFd,
    status_fd: RawFd,
    make: &[CString],
    argv: &[CString],
    envp: &[CString],
) -> ChildError {
    let setup = |what: &str, e: nix::Error| fail(SETUP_FAILED, format!("replica setup failed: {what}: {e}"));
    // Signals: the server blocks some for its signalfd and Rust ignores
    // SIGPIPE; the job must start with the defaults.
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in [Signal::SIGPIPE, Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGCHLD] {
        // SAFETY: restoring the default disposition installs no handler.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    if let Err(e) = nix::unistd::setsid() {
        return setup("setsid", e);
    }
    // stdout and stderr share one pipe, so their lines stay in order.
    if let Err(e) = nix::unistd::dup2_stdout(&out_w).and_then(|_| nix::unistd::dup2_stderr(&out_w)) {
        return setup("dup2", e);
    }
    drop(out_w);
    match File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = nix::unistd::dup2_stdin(&null) {
                return setup("stdin", e);
            }
        }
        Err(e) => return fail(SETUP_FAILED, format!("replica setup failed: /dev/null: {e}")),
    }
    // Nothing of the server's stays open in the child, not even during
    // extraction (a client socket held here would not close for its peer):
    // close every descriptor but 0, 1, 2 and the status pipe.
    // SAFETY: close_range closes descriptors this process owns and never
    // uses again; the server's copies are unaffected.
    unsafe {
        let status = status_fd as u32;
        if status > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, status - 1, 0);
        }
        libc::syscall(libc::SYS_close_range, status + 1, u32::MAX, 0);
    }

    // Open what we need while still privileged.
    let archive = match File::open(spec.archive) {
        Ok(f) => f,
        Err(e) => return fail(SETUP_FAILED, format!("replica setup failed: archive: {e}")),
    };
    if let Err(e) = make_workspace(spec.workspace, spec.sandbox.identity) {
        return fail(SETUP_FAILED, format!("replica setup failed: workspace: {e}"));
    }
    let workspace = match File::open(spec.workspace) {
        Ok(d) => d,
        Err(e) => return fail(SETUP_FAILED, format!("replica setup failed: workspace: {e}")),
    };
    if spec.sandbox.isolate_network {
        if let Err(e) = enter_empty_network() {
            return setup("network namespace", e);
        }
    }
    let l = spec.limits;
    let limits = [
        (Resource::RLIMIT_CPU, l.cpu_seconds, "CPU time"),
        (Resource::RLIMIT_AS, l.address_space, "address space"),
        (Resource::RLIMIT_NOFILE, l.open_files, "open files"),
        (Resource::RLIMIT_FSIZE, l.file_size, "file size"),
        (Resource::RLIMIT_CORE, 0, "core size"),
    ];
    let nproc = l.processes.map(|v| (Resource::RLIMIT_NPROC, v, "processes"));
    for (res, v, what) in limits.into_iter().chain(nproc) {
        // Never above the hard limit we inherited (a non-root server cannot raise it).
        let inherited = nix::sys::resource::getrlimit(res).map_or(u64::MAX, |(_, hard)| hard);
        let soft = v.min(inherited);
        // CPU: SIGXCPU at the soft limit, so the job learns why; SIGKILL a
        // second later if it ignores that.
        let hard = if res == Resource::RLIMIT_CPU { soft.saturating_add(1).min(inherited) } else { soft };
        if let Err(e) = setrlimit(res, soft, hard) {
            return setup(what, e);
        }
    }
    if let Some((uid, gid)) = spec.sandbox.identity {
        if let Err(e) = take_identity(uid, gid) {
            return setup("dropping privileges", e);
        }
    }
    // fchdir: the workspace was opened while privileged, so the job's user
    // does not need to be able to traverse the work dir's ancestors.
    if let Err(e) = nix::unistd::fchdir(&workspace) {
        return setup("chdir", e);
    }
    drop(workspace);
    if let Err(msg) = extract(archive, Path::new("."), &l.extract) {
        return fail(SETUP_FAILED, msg);
    }
    let mut err = nix::Error::ENOENT;
    for path in make {
        match nix::unistd::execve(path, argv, envp) {
            Err(nix::Error::ENOENT) => {}
            Err(e) => err = e,
            Ok(never) => match never {},
        }
    }
    let code = if err == nix::Error::ENOENT { 127 } else { 126 };
    fail(code, format!("cannot run make (searched {REPLICA_PATH}): {err}"))
}

fn make_workspace(path: &Path, identity: Option<(Uid, Gid)>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)?;
    if let Some((uid, gid)) = identity {
        nix::unistd::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Leave the host's network for a new, empty namespace with only `lo` up.
fn enter_empty_network() -> nix::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
    loopback_up();
    Ok(())
}

/// Take a replica's identity for good: no supplementary groups but `gid`.
fn take_identity(uid: Uid, gid: Gid) -> nix::Result<()> {
    nix::unistd::setgroups(&[gid])?;
    nix::unistd::setgid(gid)?;
    nix::unistd::setuid(uid)
}

/// Bring up `lo` in a fresh network namespace (best effort).
fn loopback_up() {
    // SAFETY: plain socket + ioctl on a zeroed ifreq whose name is "lo";
    // the kernel reads and writes only that struct.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req);
        }
        libc::close(fd);
    }
}

/// Send `sig` to a replica's process group (its pgid is its pid). ESRCH
/// (already gone) is fine.
pub fn signal_group(pgid: Pid, sig: Signal) {
    match killpg(pgid, sig) {
        Ok(()) | Err(nix::Error::ESRCH) => {}
        Err(e) => log::warn!("killpg({pgid}, {sig}) failed: {e}"),
    }
}

/// Check at startup that replicas can be sandboxed as configured: a forked
/// child enters a network namespace (if asked), takes the replica identity
/// and writes in a workspace made like a real one under `dir`. The error
/// says what to fix.
pub fn probe(sandbox: Sandbox, dir: &Path) -> Result<(), String> {
    let ws = dir.join(format!(".sandbox-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ws);
    make_workspace(&ws, sandbox.identity)
        .map_err(|e| format!("cannot prepare a workspace in {}: {e}", dir.display()))?;
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: called before the reactor starts, single-threaded; the child
    // only makes system calls, writes one message and _exits.
    let child = match unsafe { nix::unistd::fork() } {
        Err(e) => return Err(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(r);
            let msg = probe_child(sandbox, &ws).err().unwrap_or_default();
            let mut w = File::from(w);
            let _ = w.write_all(msg.as_bytes());
            // SAFETY: ends the probe child without running the parent's atexit handlers.
            unsafe { libc::_exit(i32::from(!msg.is_empty())) }
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(w);
    let _ = nix::sys::wait::waitpid(child, None);
    let mut msg = String::new();
    let _ = File::from(r).read_to_string(&mut msg);
    let _ = std::fs::remove_dir_all(&ws);
    if msg.is_empty() {
        Ok(())
    } else {
        Err(msg)
    }
}

fn probe_child(sandbox: Sandbox, ws: &Path) -> Result<(), String> {
    if sandbox.isolate_network {
        enter_empty_network().map_err(|e| {
            format!("cannot give replicas a network namespace ({e}): run as root with CAP_SYS_ADMIN, or pass --allow-network")
        })?;
    }
    let dir = File::open(ws).map_err(|e| format!("cannot open {}: {e}", ws.display()))?;
    if let Some((uid, gid)) = sandbox.identity {
        take_identity(uid, gid)
            .map_err(|e| format!("cannot run replicas as uid {uid} ({e}): check --slot-uids / --run-as"))?;
    }
    nix::unistd::fchdir(&dir).map_err(|e| format!("fchdir: {e}"))?;
    File::create("probe").map(drop).map_err(|e| {
        format!(
            "replicas (uid {}) cannot write their workspace under {} ({e}): use a --work-dir on a local filesystem that honours chown",
            nix::unistd::getuid(),
            ws.parent().map_or_else(String::new, |p| p.display().to_string())
        )
    })
}

/// How to find a finished replica's processes that left its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Every process of this uid (it belongs to one node alone).
    Uid(Uid),
    /// Every process whose environment carries this ticket and node port.
    Tagged { ticket: u32, port: u16 },
}

/// Kill what a replica left behind, in a forked helper so the reactor
/// neither blocks on the search nor takes an identity. The helper is reaped
/// by the server's normal SIGCHLD path; until then the node is not reused.
pub fn sweep(how: Sweep) -> nix::Result<Pid> {
    // SAFETY: single-threaded server; the child only searches /proc or
    // changes uid, sends signals and _exits, never returning to the reactor.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            let code = match how {
                // kill(-1) as the uid: every process it may signal, i.e. that
                // uid's, including ones that left the replica's session.
                Sweep::Uid(uid) => match nix::unistd::setgroups(&[]).and_then(|_| nix::unistd::setuid(uid)) {
                    Ok(()) => i32::from(nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL).is_err()),
                    Err(_) => 1,
                },
                Sweep::Tagged { ticket, port } => {
                    kill_tagged(ticket, port);
                    0
                }
            };
            // SAFETY: ends the helper without running the server's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => Ok(child),
    }
}

/// Without a uid of its own, a replica's escaped processes (daemons that
/// left its session) are found by the environment every replica starts
/// with: SIGKILL every process whose environ holds this ticket and node
/// port. A job that scrubs its environment escapes this; slot uids (as
/// root) do not have that gap.
fn kill_tagged(ticket: u32, port: u16) {
    let want_ticket = format!("CLOUD_TICKET={ticket}");
    let want_port = format!("CLOUD_NODE_PORT={port}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Unreadable (another user's process, or gone): not ours to kill.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        let has = |want: &str| environ.split(|&b| b == 0).any(|v| v == want.as_bytes());
        if has(&want_ticket) && has(&want_port) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Read what the child wrote on its status pipe (empty if exec succeeded).
pub fn read_setup_error(status: OwnedFd) -> String {
    let mut f = File::from(status);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while buf.len() < 4096 {
        match f.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// Why a replica was stopped by the server, if it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    TimeLimit { seconds: u64, killed: bool },
    Closed,
    Shutdown,
}

/// Turn how the child ended into the replica's result.
pub fn classify_exit(status: WaitStatus, setup_error: &str, stopped: Option<&StopReason>) -> RunResult {
    if let Some(reason) = stopped {
        let message = match reason {
            StopReason::TimeLimit { seconds, killed: false } => {
                format!("time limit of {seconds}s exceeded (--time-limit): stopped with SIGTERM")
            }
            StopReason::TimeLimit { seconds, killed: true } => {
                format!("time limit of {seconds}s exceeded (--time-limit): ignored SIGTERM, killed with SIGKILL")
            }
            StopReason::Closed => "killed: the ticket was closed".into(),
            StopReason::Shutdown => "killed: the server shut down".into(),
        };
        return RunResult { state: JobState::Invalid, exit_code: exit_code(status), message };
    }
    if !setup_error.is_empty() {
        return RunResult { state: JobState::Invalid, exit_code: exit_code(status), message: setup_error.into() };
    }
    match status {
        WaitStatus::Exited(_, 0) => {
            RunResult { state: JobState::Completed, exit_code: 0, message: "make run exited with status 0".into() }
        }
        WaitStatus::Exited(_, code) => RunResult {
            state: JobState::Invalid,
            exit_code: code,
            message: format!("make run exited with status {code}"),
        },
        WaitStatus::Signaled(_, sig, _) => {
            let hint = match sig {
                Signal::SIGXCPU => " (CPU time limit, --max-cpu)",
                Signal::SIGXFSZ => " (file size limit, --max-file-size)",
                _ => "",
            };
            RunResult {
                state: JobState::Invalid,
                exit_code: 128 + sig as i32,
                message: format!("make run was killed by signal {}{hint}", sig.as_str()),
            }
        }
        other => RunResult::invalid(format!("make run ended unexpectedly: {other:?}")),
    }
}

fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => -1,
    }
}

/// The environment of a replica: nothing of the server's.
pub fn replica_env(workspace: &Path, ticket: u32, replica: u32, replicas: u32, port: u16) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), REPLICA_PATH.into()),
        ("HOME".into(), String::from_utf8_lossy(workspace.as_os_str().as_bytes()).into_owned()),
        ("LANG".into(), "C.UTF-8".into()),
        ("CLOUD_TICKET".into(), ticket.to_string()),
        ("CLOUD_REPLICA".into(), replica.to_string()),
        ("CLOUD_REPLICAS".into(), replicas.to_string()),
        ("CLOUD_NODE_PORT".into(), port.to_string()),
    ]
}
