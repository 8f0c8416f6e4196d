//! Slot launchers: one long-lived process per node slot that starts the
//! slot's contained replicas, so that the reactor thread neither clones
//! them (the page-table copy of a fork of the server) nor moves each into
//! a cgroup (on cgroup v1 an attach can wait an RCU grace period).
//!
//! Owns: starting a launcher (a fork of the server when its node starts,
//! which at once executes the server's binary again as `cloud-launcher
//! --slot-launcher-v1 ...` with its setup in its arguments and its
//! descriptors inherited (`reexec`, `main_if_launcher`): a fresh, small
//! address space, so that each replica's init, a clone of the launcher,
//! and the job init forks copy less; where that exec fails it carries on
//! as the fork. It joins the slot's cgroup once, the only attach, sets oom_score_adj
//! -1000 so a job's OOM never picks it, as root empties its capability
//! bounding set and loads the job's seccomp filter once, for every replica
//! to inherit (`spawn::restrict_launcher`), is not dumpable, dies with the
//! server by `PR_SET_PDEATHSIG` and on its socket's end of file (where it
//! first SIGKILLs and reaps the inits left: none is orphaned to the host's
//! init), and reaps its children, so their CPU time is counted; once, before its first
//! clone, it warms what every init would redo: CPU feature detection for
//! inflate and CRC, a consolidated heap without fast bins), the request the server sends it on a
//! SOCK_SEQPACKET socketpair (the replica's workspace path and environment
//! as bytes; the archive and the child ends of the replica's output,
//! status and control pipes as SCM_RIGHTS), and the launcher's loop: one
//! `spawn::clone_init` per request, the containment of today's `spawn`
//! unchanged. The server keeps the other ends of the pipes, so nothing is
//! answered: the output pipe's end of file is the replica's end (init
//! holds it until it exits, and the kernel then ends its namespace), the
//! status pipe says how it ended; a request the launcher cannot serve is
//! answered on that status pipe.
//! Must not touch: containment itself (`spawn`), the reactor, a node's
//! bookkeeping (`node`), cgroup files (`cgroup`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::unistd::{ForkResult, Pid};

use crate::spawn::{self, JobLimits, Sandbox, SpawnSpec};

/// What every replica of a slot shares: given once, when the launcher starts.
#[derive(Debug)]
pub struct Setup<'a> {
    /// The server's work dir, absolute.
    pub work_dir: &'a Path,
    pub limits: &'a JobLimits,
    /// With the slot's identity.
    pub sandbox: Sandbox,
    /// The slot's empty network namespace (root mode).
    pub netns: Option<BorrowedFd<'a>>,
    /// The slot's cgroup (`Cgroup::open_join`), joined by the launcher.
    pub cgroup: &'a [OwnedFd],
}

/// A running launcher, from the server's side.
#[derive(Debug)]
pub struct Launcher {
    pid: Pid,
    sock: OwnedFd,
}

/// The server's ends of a launched replica's pipes, non-blocking.
#[derive(Debug)]
pub struct Launched {
    /// stdout+stderr; its end of file: init, and so the replica, is gone.
    pub output: OwnedFd,
    /// Setup errors, then init's report.
    pub status: OwnedFd,
    /// "T": forward SIGTERM; closed: init exits and the kernel kills the
    /// replica's namespace.
    pub control: OwnedFd,
}

/// The largest request (a workspace path and a few environment strings).
const MAX_REQUEST: usize = 64 * 1024;

/// Fork a helper process of the server (a slot's launcher, the journal's
/// syncer) joined to it by a SOCK_SEQPACKET socketpair: the child runs
/// `child` with its end and the server's pid, which never returns (its
/// main ends in _exit; `Infallible` says so on stable Rust); the
/// server gets the child's pid and its own end, non-blocking. `what`
/// names the helper in errors ("a launcher").
pub(crate) fn fork_helper(
    what: &str,
    child: impl FnOnce(OwnedFd, Pid) -> std::convert::Infallible,
) -> Result<(Pid, OwnedFd), String> {
    let (ours, theirs) = socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("cannot make {what}'s socket: {e}"))?;
    let server = nix::unistd::getpid();
    // SAFETY: the server is single-threaded; the child never returns into
    // it (`child` diverges: each helper's main ends in _exit).
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("cannot fork {what}: {e}")),
        Ok(ForkResult::Child) => {
            drop(ours);
            // `child` never returns: nothing after its call is reachable.
            #[allow(unreachable_code)]
            match child(theirs, server) {}
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            fcntl(ours.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| format!("cannot set up {what}'s socket: {e}"))?;
            Ok((child, ours))
        }
    }
}

/// The launcher's name in `ps` (and `/proc/PID/comm`).
pub const NAME: &str = "cloud-launcher";

impl Launcher {
    /// Fork the launcher of one slot. The error says why not.
    pub fn start(setup: &Setup) -> Result<Launcher, String> {
        let (pid, sock) = fork_helper("a launcher", |theirs, server| {
            // Start again small; where that fails, carry on in the fork.
            reexec(setup, &theirs, server);
            launcher_main(setup, theirs, server)
        })?;
        Ok(Launcher { pid, sock })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Have the launcher start a replica: makes its pipes, sends the child
    /// ends and the request, returns the server's ends at once.
    pub fn launch(
        &self,
        archive: Option<BorrowedFd>,
        workspace: &Path,
        env: &[(String, String)],
    ) -> nix::Result<Launched> {
        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (st_r, st_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (ctl_r, ctl_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // Only the server's ends are non-blocking (each end is an open file
        // of its own).
        for fd in [&out_r, &st_r, &ctl_w] {
            fcntl(fd.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        let bytes = encode(archive.is_some(), workspace, env);
        if bytes.len() > MAX_REQUEST {
            return Err(nix::Error::E2BIG);
        }
        let mut fds = vec![out_w.as_raw_fd(), st_w.as_raw_fd(), ctl_r.as_raw_fd()];
        fds.extend(archive.map(|a| a.as_raw_fd()));
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(&bytes)];
        loop {
            match socket::sendmsg::<()>(self.sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        Ok(Launched { output: out_r, status: st_r, control: ctl_w })
    }

    /// Stop the launcher and wait for it (server shutdown). Replicas it
    /// started die with it (their init's `PR_SET_PDEATHSIG`).
    pub fn stop(self) {
        // At its socket's end of file the launcher kills and reaps its
        // inits, then ends: none is left to the host's init (where that one
        // does not reap, as in some containers, an init left would stay a
        // zombie of the slot's user). SIGKILL if that takes too long.
        drop(self.sock);
        if !ended_within(self.pid, STOP_WAIT) {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        while let Err(nix::Error::EINTR) = nix::sys::wait::waitpid(self.pid, None) {}
    }
}

/// How long `stop` waits for a launcher to reap its inits and end.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the child `pid` ends within `limit` (it is not reaped here).
/// Waits on a pidfd (Linux 5.3); without one, says no at once.
fn ended_within(pid: Pid, limit: std::time::Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags, returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: the descriptor pidfd_open just returned, ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = [libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: polls one descriptor we own, bounded.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 1, left.as_millis().min(1000) as libc::c_int) };
        if n > 0 {
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// A request: a flag byte (1: an archive descriptor comes last), then
/// length-prefixed strings: the workspace, then each variable's name and value.
fn encode(archive: bool, workspace: &Path, env: &[(String, String)]) -> Vec<u8> {
    let mut out = vec![u8::from(archive)];
    let mut put = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    put(workspace.as_os_str().as_bytes());
    for (k, v) in env {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    out
}

/// A request's (archive?, workspace, env); `None` if malformed.
#[allow(clippy::type_complexity)]
fn decode(bytes: &[u8]) -> Option<(bool, PathBuf, Vec<(String, String)>)> {
    let (&flag, mut rest) = bytes.split_first()?;
    let mut take = || -> Option<Option<&[u8]>> {
        if rest.is_empty() {
            return Some(None);
        }
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(Some(s))
    };
    let workspace = PathBuf::from(std::ffi::OsStr::from_bytes(take()??));
    let mut env = Vec::new();
    while let Some(k) = take()? {
        let v = take()??;
        env.push((String::from_utf8(k.to_vec()).ok()?, String::from_utf8(v.to_vec()).ok()?));
    }
    Some((flag == 1, workspace, env))
}

/// `argv[0]` and `argv[1]` of a launcher re-executed from the server's
/// binary (`reexec`; `main_if_launcher` takes it from there).
const ARGV0: &str = NAME;
const ARGV1: &str = "--slot-launcher-v1";

/// In the forked launcher: execute the server's binary again
/// (`/proc/self/exe`) as a launcher, given its setup in its arguments and
/// its descriptors (the socket, the slot's network namespace and cgroup)
/// inherited. Each replica's init is a clone of the launcher, and init
/// forks the job: a fresh address space (no copy of the server's heap, no
/// libraries the server loaded for itself, e.g. for user lookups) makes
/// each of those copies, the copy-on-write faults after them and the
/// job's `exec` cheaper. The same binary, as root, before anything is
/// dropped (an exec with an empty bounding set would lose every
/// capability), with no environment. Returns only if the exec failed.
fn reexec(setup: &Setup, sock: &OwnedFd, server: Pid) {
    let mut fds = vec![sock.as_raw_fd()];
    fds.extend(setup.netns.map(|fd| fd.as_raw_fd()));
    fds.extend(setup.cgroup.iter().map(|fd| fd.as_raw_fd()));
    let set_cloexec = |on: bool| {
        let flags = if on { libc::FD_CLOEXEC } else { 0 };
        // SAFETY: F_SETFD on descriptors this process holds open (its
        // socket, its `Setup`'s); only their close-on-exec flag changes.
        fds.iter().all(|&fd| unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } == 0)
    };
    if !set_cloexec(false) {
        set_cloexec(true);
        return;
    }
    if let Ok(argv) = encode_setup(setup, sock.as_raw_fd(), server) {
        let env: [&std::ffi::CStr; 0] = [];
        let _ = nix::unistd::execve(c"/proc/self/exe", &argv, &env);
    }
    set_cloexec(true);
}

/// A launcher's arguments: everything of its `Setup` as text, and the
/// numbers of the descriptors it inherits.
fn encode_setup(setup: &Setup, sock: RawFd, server: Pid) -> Result<Vec<std::ffi::CString>, std::ffi::NulError> {
    let l = setup.limits;
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let cgroups: Vec<String> = setup.cgroup.iter().map(|fd| fd.as_raw_fd().to_string()).collect();
    let mut args = vec![
        ARGV0.to_string(),
        ARGV1.to_string(),
        server.to_string(),
        sock.to_string(),
        setup.netns.map_or("-".to_string(), |fd| fd.as_raw_fd().to_string()),
        if cgroups.is_empty() { "-".to_string() } else { cgroups.join(",") },
        l.extract.max_bytes.to_string(),
        l.extract.max_entries.to_string(),
        l.extract.max_path.to_string(),
        l.cpu_seconds.to_string(),
        l.address_space.to_string(),
        l.open_files.to_string(),
        l.file_size.to_string(),
        opt(l.processes),
        u8::from(l.nproc_rlimit).to_string(),
        l.tmp_bytes.to_string(),
        l.disk_bytes.to_string(),
        setup.sandbox.identity.map_or("-".to_string(), |(u, g)| format!("{u}:{g}")),
        u8::from(setup.sandbox.isolate_network).to_string(),
        match setup.sandbox.containment {
            spawn::Containment::Namespaces => "namespaces",
            spawn::Containment::UserNamespace => "user-namespace",
            spawn::Containment::Uncontained => "uncontained",
        }
        .to_string(),
    ]
    .into_iter()
    .map(std::ffi::CString::new)
    .collect::<Result<Vec<_>, _>>()?;
    // Last: the work dir, as bytes.
    args.push(std::ffi::CString::new(setup.work_dir.as_os_str().as_bytes())?);
    Ok(args)
}

/// What `encode_setup` wrote, read back: (server, socket, netns, cgroup
/// descriptors, work dir, limits, sandbox); `None` if it is not that.
#[allow(clippy::type_complexity)]
fn decode_setup(
    args: &[std::ffi::OsString],
) -> Option<(Pid, RawFd, Option<RawFd>, Vec<RawFd>, PathBuf, JobLimits, Sandbox)> {
    let [a0, a1, server, sock, netns, cgroups, max_bytes, max_entries, max_path, cpu, space, files, fsize, procs, nproc, tmp, disk, identity, isolate, containment, work_dir] =
        args
    else {
        return None;
    };
    if a0 != ARGV0 || a1 != ARGV1 {
        return None;
    }
    fn s(a: &std::ffi::OsString) -> Option<&str> {
        a.to_str()
    }
    let num = |a: &std::ffi::OsString| s(a)?.parse::<u64>().ok();
    let fd = |a: &str| a.parse::<RawFd>().ok().filter(|&fd| fd >= 0);
    let opt_fd = |a: &std::ffi::OsString| match s(a)? {
        "-" => Some(None),
        v => fd(v).map(Some),
    };
    let cgroups = match s(cgroups)? {
        "-" => Vec::new(),
        v => v.split(',').map(fd).collect::<Option<Vec<_>>>()?,
    };
    let identity = match s(identity)? {
        "-" => None,
        v => {
            let (u, g) = v.split_once(':')?;
            Some((nix::unistd::Uid::from_raw(u.parse().ok()?), nix::unistd::Gid::from_raw(g.parse().ok()?)))
        }
    };
    let containment = match s(containment)? {
        "namespaces" => spawn::Containment::Namespaces,
        "user-namespace" => spawn::Containment::UserNamespace,
        "uncontained" => spawn::Containment::Uncontained,
        _ => return None,
    };
    let flag = |a: &std::ffi::OsString| match s(a)? {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    };
    let limits = JobLimits {
        extract: crate::extract::ExtractLimits {
            max_bytes: num(max_bytes)?,
            max_entries: usize::try_from(num(max_entries)?).ok()?,
            max_path: usize::try_from(num(max_path)?).ok()?,
        },
        cpu_seconds: num(cpu)?,
        address_space: num(space)?,
        open_files: num(files)?,
        file_size: num(fsize)?,
        processes: if s(procs)? == "-" { None } else { Some(num(procs)?) },
        nproc_rlimit: flag(nproc)?,
        tmp_bytes: num(tmp)?,
        disk_bytes: num(disk)?,
    };
    let sandbox = Sandbox { identity, isolate_network: flag(isolate)?, containment };
    let server = Pid::from_raw(s(server)?.parse().ok()?);
    Some((server, fd(s(sock)?)?, opt_fd(netns)?, cgroups, PathBuf::from(work_dir), limits, sandbox))
}

/// First thing in `cloud-server`'s `main`: if this process is a launcher
/// re-executed by `reexec`, be it (never returns); `None` otherwise. A
/// process started so by anyone else ends: its descriptors are not a
/// launcher's.
pub fn main_if_launcher() -> Option<std::process::ExitCode> {
    let mut args = std::env::args_os();
    if args.next().as_deref() != Some(std::ffi::OsStr::new(ARGV0)) {
        return None;
    }
    let all: Vec<std::ffi::OsString> = std::iter::once(ARGV0.into()).chain(args).collect();
    if all.get(1).map(|a| a.as_os_str()) != Some(std::ffi::OsStr::new(ARGV1)) {
        return None;
    }
    let Some((server, sock, netns, cgroups, work_dir, limits, sandbox)) = decode_setup(&all) else {
        eprintln!("cloud-launcher: not started by cloud-server (malformed arguments)");
        return Some(std::process::ExitCode::FAILURE);
    };
    // Ours only if they are open and the socket is one (not, say, a
    // terminal of whoever ran this by hand).
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int we own into `kind` (a descriptor
    // number that is not a socket, or not open, only makes it fail).
    let got = unsafe {
        libc::getsockopt(sock, libc::SOL_SOCKET, libc::SO_TYPE, (&mut kind as *mut libc::c_int).cast(), &mut len)
    };
    let is_seqpacket = got == 0 && kind == libc::SOCK_SEQPACKET;
    if !is_seqpacket || nix::unistd::getppid() != server {
        eprintln!("cloud-launcher: not started by cloud-server (no launcher socket)");
        return Some(std::process::ExitCode::FAILURE);
    }
    // SAFETY: descriptors our parent (the server's fork) left open for us
    // by number, each owned once from here.
    let (sock, cgroup) = unsafe {
        (OwnedFd::from_raw_fd(sock), cgroups.into_iter().map(|fd| OwnedFd::from_raw_fd(fd)).collect::<Vec<_>>())
    };
    // SAFETY: as above; held open (never closed) for the launcher's life.
    let netns = netns.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
    let setup = Setup { work_dir: &work_dir, limits: &limits, sandbox, netns, cgroup: &cgroup };
    launcher_main(&setup, sock, server)
}

fn exit(code: i32) -> ! {
    // SAFETY: ends the launcher without the server's atexit handlers.
    unsafe { libc::_exit(code) }
}

/// The launcher process. Never returns.
fn launcher_main(setup: &Setup, sock: OwnedFd, server: Pid) -> ! {
    let netns = setup.netns.map_or(-1, |fd| fd.as_raw_fd());
    let mut keep = vec![sock.as_raw_fd(), netns];
    keep.extend(setup.cgroup.iter().map(|fd| fd.as_raw_fd()));
    spawn::close_all_but(&keep);
    let _ = nix::sys::prctl::set_name(c"cloud-launcher");
    // Die with the server; and if it died before this line, now.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || nix::unistd::getppid() != server {
        exit(0);
    }
    // A terminal's Ctrl-C to the server's process group is the server's.
    // Our inits stay in this session (it has no terminal).
    if nix::unistd::setsid().is_ok() {
        spawn::set_caller_has_own_session();
    }
    // The slot's cgroup, once: every replica started from here inherits it.
    // Without it, no replica may run: each request is answered with why.
    let broken = crate::cgroup::join(setup.cgroup)
        .err()
        .map(|e| format!("replica setup failed: the slot's launcher cannot join the slot's cgroup: {e}"));
    for fd in setup.cgroup {
        // SAFETY: our copies of the server's descriptors, not used again.
        unsafe { libc::close(fd.as_raw_fd()) };
    }
    // A job's OOM never picks the launcher (best effort: needs
    // CAP_SYS_RESOURCE). The replicas' inits take the server's value back.
    let own = std::fs::read_to_string("/proc/self/oom_score_adj").ok().and_then(|v| v.trim().parse().ok());
    if let Some(own) = own {
        if std::fs::write("/proc/self/oom_score_adj", "-1000").is_ok() {
            spawn::set_init_oom_score_adj(own);
        }
    }
    // What every job gets and the launcher does not need, once here rather
    // than once a job: an empty capability bounding set, the job's seccomp
    // filter (root mode; `spawn::restrict_launcher` says why it is safe).
    spawn::restrict_launcher(setup.sandbox.containment);
    // Not dumpable: no process of the server's user may ptrace it. Not in
    // a user namespace of the server's user: init inherits the flag and
    // could not write its uid map (init makes itself non-dumpable there).
    if setup.sandbox.containment != spawn::Containment::UserNamespace {
        let _ = nix::sys::prctl::set_dumpable(false);
    }
    // We reap our children (the replicas' inits) ourselves, rather than
    // let the kernel do it (SA_NOCLDWAIT): so their CPU time counts in
    // ours (RUSAGE_CHILDREN, /proc/PID/stat), and the server's when we end.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&chld), None);
    let sfd = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC);
    let sfd_raw = sfd.as_ref().map_or(-1, |s| s.as_raw_fd());
    let mut buf = vec![0u8; MAX_REQUEST];
    // What each init would redo after the clone, once here (inherited):
    // CPU feature detection for inflate and CRC (`extract::warm_up`), and
    // the heap the server left, consolidated (no init then walks and
    // copies its fast bins' pages when it first asks for a large block).
    crate::extract::warm_up();
    // No fast bins from here on either: a large request in an init would
    // first consolidate them, writing (and so copying) inherited heap pages.
    // (glibc's heap: the server, launcher included, is built for glibc.)
    // SAFETY: malloc_trim and mallopt only rearrange this process's own heap.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
        libc::mallopt(libc::M_MXFAST, 0);
    }
    let mut inits: Vec<Pid> = Vec::new();
    loop {
        reap(&mut inits);
        let mut fds = [
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sfd_raw, events: libc::POLLIN, revents: 0 },
        ];
        // Without a signalfd, reap at least once a second.
        let timeout = if sfd_raw < 0 { 1000 } else { -1 };
        // SAFETY: polls two descriptors of ours (a negative one is skipped).
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) } <= 0 {
            continue;
        }
        if fds[1].revents != 0 {
            if let Ok(s) = &sfd {
                while let Ok(Some(_)) = s.read_signal() {}
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::Error::EINTR) => continue,
                Err(_) => end(&inits),
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(r) = c {
                                // SAFETY: descriptors the kernel just gave us.
                                fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                            }
                        }
                    }
                    (msg.bytes, fds)
                }
            }
        };
        if n == 0 {
            end(&inits); // the server is gone, or stops us
        }
        inits.extend(serve(setup, &buf[..n], fds, broken.as_deref()));
    }
}

/// Reap every child that has ended.
fn reap(inits: &mut Vec<Pid>) {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes one int we own.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        inits.retain(|p| p.as_raw() != pid);
    }
}

/// The server is gone or stops us: SIGKILL each init left (which ends its
/// replica's namespace), reap them all, and end.
fn end(inits: &[Pid]) -> ! {
    for &pid in inits {
        let _ = kill(pid, Signal::SIGKILL);
    }
    loop {
        match nix::sys::wait::waitpid(None::<Pid>, None) {
            Err(nix::Error::EINTR) | Ok(_) => {}
            Err(_) => exit(0), // ECHILD: none left
        }
    }
}

/// One request: clone the replica's init (its pid), or say on its status
/// pipe why not.
fn serve(setup: &Setup, bytes: &[u8], fds: Vec<OwnedFd>, broken: Option<&str>) -> Option<Pid> {
    let request = decode(bytes);
    let want = 3 + usize::from(request.as_ref().is_some_and(|r| r.0));
    if fds.len() != want {
        return None; // dropped: the server sees the end of its pipes
    }
    let mut fds = fds.into_iter();
    let (Some(out_w), Some(st_w), Some(ctl_r)) = (fds.next(), fds.next(), fds.next()) else { return None };
    let archive = fds.next();
    let say = |st_w: &OwnedFd, msg: &str| {
        let _ = nix::unistd::write(st_w, format!("{msg}\n").as_bytes());
        None
    };
    let Some((_, workspace, env)) = request else {
        return say(&st_w, "replica setup failed: the slot's launcher got a malformed request");
    };
    if let Some(why) = broken {
        return say(&st_w, why);
    }
    let spec = SpawnSpec {
        archive: archive.as_ref().map(|a| a.as_fd()),
        work_dir: setup.work_dir,
        workspace: &workspace,
        env,
        limits: setup.limits,
        sandbox: setup.sandbox,
        netns: setup.netns,
        cgroup: &[],
    };
    // Init closes every descriptor it does not keep, this socket included.
    match spawn::clone_init(&spec, &out_w, &st_w, &ctl_r, &[]) {
        Ok(pid) => Some(pid),
        Err(e) => say(&st_w, &format!("replica setup failed: clone: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launchers_setup_round_trips_through_its_arguments() {
        let limits = JobLimits {
            extract: crate::extract::ExtractLimits { max_bytes: 1 << 30, max_entries: 10_000, max_path: 1024 },
            cpu_seconds: 300,
            address_space: 2 << 30,
            open_files: 256,
            file_size: 1 << 28,
            processes: Some(128),
            nproc_rlimit: true,
            tmp_bytes: 64 << 20,
            disk_bytes: 1 << 30,
        };
        let sandbox = Sandbox {
            identity: Some((nix::unistd::Uid::from_raw(3_000_000), nix::unistd::Gid::from_raw(3_000_000))),
            isolate_network: true,
            containment: spawn::Containment::Namespaces,
        };
        let cgroup: Vec<OwnedFd> = (0..2).map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap())).collect();
        let netns = std::fs::File::open("/dev/null").unwrap();
        let work_dir = Path::new("/srv/cloud work/ünïcode");
        let setup = Setup { work_dir, limits: &limits, sandbox, netns: Some(netns.as_fd()), cgroup: &cgroup };
        let args: Vec<std::ffi::OsString> = encode_setup(&setup, 7, Pid::from_raw(42))
            .unwrap()
            .into_iter()
            .map(|c| std::ffi::OsStr::from_bytes(c.as_bytes()).to_owned())
            .collect();
        let (server, sock, ns, cg, wd, l, sb) = decode_setup(&args).unwrap();
        assert_eq!((server, sock, ns), (Pid::from_raw(42), 7, Some(netns.as_raw_fd())));
        assert_eq!(cg, cgroup.iter().map(|fd| fd.as_raw_fd()).collect::<Vec<_>>());
        assert_eq!(wd, work_dir);
        assert_eq!(format!("{l:?}"), format!("{limits:?}"));
        assert_eq!(sb, sandbox);
        // Without the optional parts, too; and not from other arguments.
        let bare = JobLimits { processes: None, nproc_rlimit: false, ..limits.clone() };
        let sandbox =
            Sandbox { identity: None, isolate_network: false, containment: spawn::Containment::UserNamespace };
        let setup = Setup { work_dir, limits: &bare, sandbox, netns: None, cgroup: &[] };
        let args: Vec<std::ffi::OsString> = encode_setup(&setup, 3, Pid::from_raw(1))
            .unwrap()
            .into_iter()
            .map(|c| std::ffi::OsStr::from_bytes(c.as_bytes()).to_owned())
            .collect();
        let (_, _, ns, cg, _, l, sb) = decode_setup(&args).unwrap();
        assert_eq!((ns, cg.len(), l.processes, l.nproc_rlimit, sb), (None, 0, None, false, sandbox));
        assert!(decode_setup(&args[..args.len() - 1]).is_none());
        let mut other = args.clone();
        other[1] = "--listen".into();
        assert!(decode_setup(&other).is_none());
        let mut bad = args;
        bad[3] = "-3".into();
        assert!(decode_setup(&bad).is_none(), "a negative descriptor");
    }

    #[test]
    fn a_request_round_trips_and_garbage_is_refused() {
        let env = vec![("HOME".to_string(), "/w/1/work".to_string()), ("CLOUD_TICKET".to_string(), "7".to_string())];
        let bytes = encode(true, Path::new("/w/1/work"), &env);
        assert_eq!(decode(&bytes), Some((true, PathBuf::from("/w/1/work"), env)));
        assert_eq!(decode(&encode(false, Path::new("/x"), &[])), Some((false, PathBuf::from("/x"), vec![])));
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        let mut odd = encode(false, Path::new("/x"), &[]);
        odd.extend_from_slice(&1u32.to_le_bytes());
        odd.push(b'K');
        assert_eq!(decode(&odd), None, "a name without a value");
    }
}
