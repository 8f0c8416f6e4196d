//! Starting and stopping a replica's processes, close to the metal.
//!
//! Owns: replica containment. For each replica its slot's launcher
//! (`launcher`; the startup probe: the server) `clone`s our
//! **init** (`clone_init`; named cloud-init): PID 1 of new PID, mount and IPC namespaces (and, without root,
//! of a new user namespace), joined to its slot's empty network namespace.
//! Init installs no signal handlers and is not dumpable, so by the
//! kernel's rule for namespace inits nothing inside the namespace can
//! signal, trace or read it; it dies with its parent (`PR_SET_PDEATHSIG`; a launcher
//! dies with the server, and kills and reaps its inits when the server
//! stops it), stays in its launcher's session (which has no
//! terminal; cloned by the server, for the probe, it makes its own), holds the output pipe until it exits (so the
//! pipe's end of file is the replica's end). While privileged it makes every
//! mount inherited from the host read-only, mounts a fresh /proc, private
//! tmpfs on /tmp, /var/tmp and /dev/shm (and /run, where the host's unix
//! sockets live, unless the network is allowed), a devpts of its own, hides the work dir under an empty
//! read-only tmpfs (unless one of those private tmpfs hides it already) and gives the replica a tmpfs workspace
//! of `--max-disk` bytes (huge pages for its large files where the kernel
//! has them). Then it gives up everything the job would not have
//! (`job_restrict`: resource limits, no capabilities,
//! `PR_SET_NO_NEW_PRIVS`, a seccomp filter against the (not namespaced)
//! kernel keyrings and nested user namespaces (as root, the empty
//! bounding set and the filter are the slot launcher's own, set once and
//! inherited: `restrict_launcher`), the slot user's identity), unpacks the
//! archive into the workspace itself (`job_unpack`: safe extraction from
//! an open descriptor, read with pread: its shared offset never moves;
//! its length sizes the read buffer) and starts the **job** with
//! `CLONE_VM | CLONE_VFORK` (`start_job`, as posix_spawn does): a new
//! session, stdin from /dev/null, stdout and stderr onto one pipe, a
//! clean environment, RLIMIT_CPU, and `exec make run` (`job_exec`). Init
//! reaps everything, reports the job's wait status on
//! the close-on-exec status pipe (after any setup error written
//! there) and exits; the kernel then kills whatever is left in the
//! namespace, and the tmpfs mounts go with it. A control pipe from the
//! server carries "forward SIGTERM" (a byte) and "the server is gone" (EOF).
//! With `--uncontained` the job is forked directly, as a plain session.
//! Also: the per-node empty network namespace, the startup probe, reclaiming
//! processes an earlier run left, and decoding how a replica ended.
//! Must not touch: the reactor, sockets, job bookkeeping.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, killpg, SigSet, SigmaskHow, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::archive_check::printable;
use crate::extract::{extract_sized, ExtractLimits};
use crate::proto::{Outcome, RunResult};

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
    /// `--max-procs`: the replica's cgroup pids limit and, where
    /// `nproc_rlimit` says so, its RLIMIT_NPROC (`None`: neither).
    pub processes: Option<u64>,
    /// Whether to set RLIMIT_NPROC. It counts every process of the uid (in
    /// its user namespace), so only where the uid is the replica's alone:
    /// slot uids, or a user namespace of its own on Linux 5.14+. With one
    /// uid shared by all nodes (`--no-slot-uids`) one tenant would use up
    /// the others' forks; there it is set only where no cgroup bounds a job.
    pub nproc_rlimit: bool,
    /// Size of each private tmpfs: /tmp, /var/tmp, /dev/shm (`--max-tmp`).
    pub tmp_bytes: u64,
    /// Size of the tmpfs workspace (`--max-disk`).
    pub disk_bytes: u64,
}

/// How replicas are kept apart from the host and each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Containment {
    /// As root: our init in new PID, mount and IPC namespaces.
    Namespaces,
    /// Not root: the same inside a new user namespace where the server's
    /// uid is 0 (and the job drops every capability).
    UserNamespace,
    /// `--uncontained`: a plain forked session with rlimits, nothing more.
    Uncontained,
}

/// Who a replica runs as, and how it is contained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sandbox {
    /// Drop to this uid/gid before extraction (only when the server is root).
    pub identity: Option<(Uid, Gid)>,
    /// An empty network namespace: loopback only.
    pub isolate_network: bool,
    pub containment: Containment,
}

/// Everything needed to start one replica.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The job's archive, open for reading: `None` for the startup probe
    /// (write a file in the workspace, exit 0). Read with pread from
    /// offset 0, so one open file may serve several replicas: its shared
    /// offset never moves.
    pub archive: Option<BorrowedFd<'a>>,
    /// The server's work dir, absolute: hidden from a contained job.
    pub work_dir: &'a Path,
    /// Under `work_dir`: a tmpfs owned by the sandbox identity, mode 0700
    /// (uncontained: a directory created by the child).
    pub workspace: &'a Path,
    pub env: Vec<(String, String)>,
    pub limits: &'a JobLimits,
    pub sandbox: Sandbox,
    /// The slot's empty network namespace, joined with setns (root mode).
    pub netns: Option<BorrowedFd<'a>>,
    /// The replica's cgroup (`cgroup::Cgroup::open_join`): init (or the
    /// uncontained job) joins it before anything else runs.
    pub cgroup: &'a [OwnedFd],
}

/// A started replica.
#[derive(Debug)]
pub struct Spawned {
    /// Our init (contained) or the job itself (uncontained).
    pub pid: Pid,
    /// Read end of the stdout+stderr pipe, non-blocking.
    pub output: OwnedFd,
    /// Read end of the status pipe: setup errors, then init's report.
    pub status: OwnedFd,
    /// Write end of init's control pipe (`None` when uncontained).
    pub control: Option<OwnedFd>,
}

/// The only PATH a replica gets, and where `make` is looked up.
pub const REPLICA_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Exit code the child uses when setup (extraction, limits) failed.
pub const SETUP_FAILED: i32 = 125;

/// How init's report of the job's end starts on the status pipe.
const REPORT: &str = "\u{1}cloud-init wait status ";

/// The private tmpfs directories of a contained replica.
const PRIVATE_TMP: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// The `oom_score_adj` a launcher that lowered its own (to -1000) gives
/// back to each init it clones: the server's (`i32::MIN`: leave it).
static INIT_OOM_SCORE_ADJ: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(i32::MIN);

/// In a launcher: inits it clones set their `oom_score_adj` to `value`.
pub(crate) fn set_init_oom_score_adj(value: i32) {
    INIT_OOM_SCORE_ADJ.store(value, std::sync::atomic::Ordering::Relaxed);
}

/// Set in a launcher that made itself a session leader (no controlling
/// terminal, no process group a terminal signals): the inits it clones
/// stay in that session rather than make one each.
static CALLER_HAS_OWN_SESSION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// In a launcher, once its `setsid` succeeded: see `CALLER_HAS_OWN_SESSION`.
pub(crate) fn set_caller_has_own_session() {
    CALLER_HAS_OWN_SESSION.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Set in a root launcher whose own capability bounding set (and ambient
/// set) is already empty: every init and job it clones inherits that, so
/// the job need not drop 41 capabilities one `prctl` at a time.
static BOUNDING_SET_EMPTY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set in a root launcher that carries the job's seccomp filter itself:
/// every init and job it clones inherits it (filters are inherited across
/// fork and exec and cannot be removed), so the job does not compile and
/// load one of its own.
static SECCOMP_INHERITED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// In a root launcher (`Containment::Namespaces` only), once at start:
/// what every job gets and neither the launcher nor init needs. An empty
/// capability bounding set (a process keeps its effective capabilities;
/// the bounding set only limits what an exec may gain, and neither the
/// launcher nor init ever execs) and the job's seccomp filter (it refuses
/// keyrings, CLONE_NEWUSER and clone3: nothing a launcher or init does).
/// Each that fails is left to the job, as before. Not in a user namespace
/// mode: a new user namespace starts with a full bounding set, and init
/// is cloned with CLONE_NEWUSER, which the filter refuses.
pub(crate) fn restrict_launcher(containment: Containment) {
    if containment != Containment::Namespaces {
        return;
    }
    if drop_bounding_set().is_ok() {
        BOUNDING_SET_EMPTY.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if job_seccomp().is_ok() {
        SECCOMP_INHERITED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The hard resource limits a job's limits are capped by: what the caller
/// (server or launcher) inherited, read once per process (they do not
/// change), before the first clone, so a job does not read them again.
fn inherited_hard_limits() -> &'static [u64; 6] {
    static HARD: std::sync::OnceLock<[u64; 6]> = std::sync::OnceLock::new();
    HARD.get_or_init(|| RLIMITS.map(|res| nix::sys::resource::getrlimit(res).map_or(u64::MAX, |(_, hard)| hard)))
}

/// The resource limits a job gets, in the order of `inherited_hard_limits`.
const RLIMITS: [Resource; 6] = [
    Resource::RLIMIT_CPU,
    Resource::RLIMIT_AS,
    Resource::RLIMIT_NOFILE,
    Resource::RLIMIT_FSIZE,
    Resource::RLIMIT_CORE,
    Resource::RLIMIT_NPROC,
];

/// Start a replica: contained, our init, which forks the job; else the job.
/// (The server's contained replicas go through their slot's launcher,
/// `launcher`, which calls [`clone_init`]; this direct path serves the
/// startup probe and `--uncontained`.)
pub fn spawn(spec: &SpawnSpec) -> nix::Result<Spawned> {
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (st_r, st_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let contained = spec.sandbox.containment != Containment::Uncontained;
    let (ctl_r, ctl_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let pid = if contained {
        let pid = clone_init(spec, &out_w, &st_w, &ctl_r, &[out_r.as_raw_fd(), st_r.as_raw_fd(), ctl_w.as_raw_fd()]);
        drop(out_w);
        drop(st_w);
        drop(ctl_r);
        pid?
    } else {
        // Prepare everything that allocates from strings before forking.
        let exec = Exec::new(spec);
        // SAFETY: the server is single-threaded; every path in the child
        // ends in exec or _exit.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                drop(out_r);
                drop(st_r);
                drop(ctl_w);
                drop(ctl_r);
                let err = uncontained_job(spec, &exec, out_w, st_w.as_raw_fd());
                die(st_w.as_raw_fd(), err)
            }
            ForkResult::Parent { child } => {
                drop(out_w);
                drop(st_w);
                drop(ctl_r);
                child
            }
        }
    };
    fcntl(out_r.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    fcntl(st_r.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    fcntl(ctl_w.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok(Spawned { pid, output: out_r, status: st_r, control: contained.then_some(ctl_w) })
}

/// Clone a contained replica's init, which takes the child ends of its
/// three pipes (`out_w`, `st_w`, `ctl_r`: the caller closes its copies
/// once this returns); `drop_in_child` are descriptors init must close at once
/// (the caller's ends). Init is the caller's child; it holds `out_w`
/// until it exits, so the output pipe's end of file means init (and so,
/// by the kernel's rule, its whole PID namespace) is gone, and the status
/// pipe holds everything init and the job wrote. Init sets its own
/// `PR_SET_PDEATHSIG`: it dies with the caller.
pub fn clone_init(
    spec: &SpawnSpec,
    out_w: &OwnedFd,
    st_w: &OwnedFd,
    ctl_r: &OwnedFd,
    drop_in_child: &[RawFd],
) -> nix::Result<Pid> {
    // Prepare everything that allocates from strings before cloning.
    // execvpe would search the *server's* PATH; search the replica's own.
    let exec = Exec::new(spec);
    // Read before clone: in a new user namespace they read as 65534
    // until the maps are written.
    let ids = (nix::unistd::getuid(), nix::unistd::getgid());
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
    if spec.sandbox.containment == Containment::UserNamespace {
        flags |= libc::CLONE_NEWUSER;
        if spec.sandbox.isolate_network {
            // setns into a namespace of another user namespace is not allowed.
            flags |= libc::CLONE_NEWNET;
        }
    }
    // SAFETY: raw clone with a null stack behaves like fork (the child
    // continues on a copy of this stack). The caller (the server or a
    // launcher) is single-threaded, so the child may run ordinary Rust
    // code; it never returns into the caller (init_main ends in _exit).
    let ret = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    match ret {
        -1 => Err(nix::Error::last()),
        0 => {
            for &fd in drop_in_child {
                // SAFETY: the caller's ends of the pipes, which init must not hold.
                unsafe { libc::close(fd) };
            }
            // SAFETY: init's own copies of the three descriptors (its
            // table is a copy of the caller's); the caller's OwnedFds in
            // this copy of its memory are never dropped: init never returns.
            let own = |fd: &OwnedFd| unsafe { OwnedFd::from_raw_fd(fd.as_raw_fd()) };
            init_main(spec, &exec, ids, own(out_w), own(st_w), own(ctl_r))
        }
        child => Ok(Pid::from_raw(child as i32)),
    }
}

/// The archive, read with pread from offset 0: the open file's shared
/// offset never moves (one open archive may serve several replicas).
struct Pread {
    file: File,
    at: u64,
    /// Init's control pipe, while init unpacks: anything on it (the
    /// server's "stop" or "SIGTERM", or its end) ends the unpacking, at
    /// least every `STOP_CHECK` bytes read, so a replica stopped then dies
    /// as soon as it would have had a job to kill.
    stop: Option<RawFd>,
    checked: u64,
}

/// How many archive bytes init reads between looks at its control pipe.
const STOP_CHECK: u64 = 4 << 20;

impl Read for Pread {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if let Some(fd) = self.stop.filter(|_| self.at >= self.checked) {
            self.checked = self.at + STOP_CHECK;
            if readable(fd) {
                return Err(std::io::Error::other("the replica was stopped while its archive was unpacked"));
            }
        }
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// This process's own descriptor for the spec's archive.
fn own_archive(spec: &SpawnSpec) -> Result<Option<Pread>, ChildError> {
    match spec.archive {
        Some(fd) => {
            let file = fd.try_clone_to_owned().map_err(|e| setup("archive", e))?;
            Ok(Some(Pread { file: File::from(file), at: 0, stop: None, checked: 0 }))
        }
        None => Ok(None),
    }
}

/// `make run` and its environment, as C strings made before forking.
struct Exec {
    make: Vec<CString>,
    argv: [CString; 2],
    envp: Vec<CString>,
    /// The caller's hard resource limits (`inherited_hard_limits`).
    hard: [u64; 6],
}

impl Exec {
    fn new(spec: &SpawnSpec) -> Exec {
        let make = REPLICA_PATH.split(':').filter_map(|dir| CString::new(format!("{dir}/make")).ok()).collect();
        let argv = [c"make".to_owned(), c"run".to_owned()];
        let envp = spec.env.iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()).collect();
        Exec { make, argv, envp, hard: *inherited_hard_limits() }
    }
}

struct ChildError {
    code: i32,
    message: String,
}

fn fail(code: i32, message: String) -> ChildError {
    ChildError { code, message }
}

fn setup(what: &str, e: impl std::fmt::Display) -> ChildError {
    fail(SETUP_FAILED, format!("replica setup failed: {what}: {e}"))
}

/// Write the error on the status pipe and end this child process.
fn die(status_fd: RawFd, err: ChildError) -> ! {
    // SAFETY: the status pipe's write end is open in this child; the
    // ManuallyDrop keeps it from being closed twice.
    let mut st = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(status_fd) });
    let _ = writeln!(st, "{}", err.message);
    // SAFETY: _exit is async-signal-safe and skips the parent's atexit
    // handlers and stdio buffers, which belong to the server.
    unsafe { libc::_exit(err.code) }
}

/// Close every descriptor from 3 up except those in `keep`.
pub(crate) fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep.iter().filter(|&&fd| fd >= 3).map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut lo = 3u32;
    for k in keep {
        if k > lo {
            // SAFETY: closes descriptors this child owns and never uses;
            // the server's copies are unaffected.
            unsafe { libc::syscall(libc::SYS_close_range, lo, k - 1, 0) };
        }
        lo = k + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0) };
}

/// PID 1 of the replica's namespaces. Never returns.
fn init_main(spec: &SpawnSpec, exec: &Exec, ids: (Uid, Gid), out_w: OwnedFd, st_w: OwnedFd, ctl_r: OwnedFd) -> ! {
    let status_fd = st_w.as_raw_fd();
    match init_setup(spec, exec, ids, out_w, &st_w, &ctl_r) {
        Ok((job, out_w)) => init_loop(job, st_w, ctl_r, out_w),
        Err(err) => die(status_fd, err),
    }
}

/// Set up the namespaces and fork the job; returns the job's pid and
/// init's copy of the output pipe (held until init exits).
fn init_setup(
    spec: &SpawnSpec,
    exec: &Exec,
    (uid, gid): (Uid, Gid),
    out_w: OwnedFd,
    st_w: &OwnedFd,
    ctl_r: &OwnedFd,
) -> Result<(libc::pid_t, OwnedFd), ChildError> {
    let userns = spec.sandbox.containment == Containment::UserNamespace;
    // Its name in ps, on the host and as PID 1 of the replica.
    let _ = nix::sys::prctl::set_name(c"cloud-init");
    // Not the launcher's -1000: the replica's processes are the OOM
    // killer's to pick (raising it needs no privilege).
    let adj = INIT_OOM_SCORE_ADJ.load(std::sync::atomic::Ordering::Relaxed);
    if adj != i32::MIN {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string()).map_err(|e| setup("oom_score_adj", e))?;
    }
    // Init must see its own children's ends, whatever the process that
    // cloned it did with SIGCHLD. SIG_DFL installs no handler. Nor do the
    // handlers the Rust runtime installs at start (stack overflow: SIGSEGV,
    // SIGBUS) stay: with a handler, a signal a job sends init would be
    // delivered to it; without one, the kernel drops it.
    for sig in [Signal::SIGCHLD, Signal::SIGSEGV, Signal::SIGBUS] {
        // SAFETY: restores the default disposition of one signal.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    // SIGCHLD is read from a signalfd; block it before any child exists.
    // No handler is installed, ever: that is what keeps the job's signals
    // away from init.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&chld), None).map_err(|e| setup("sigprocmask", e))?;
    let netns = spec.netns.map(|fd| fd.as_raw_fd());
    let archive_fd = spec.archive.map_or(-1, |fd| fd.as_raw_fd());
    let mut keep = vec![out_w.as_raw_fd(), st_w.as_raw_fd(), ctl_r.as_raw_fd(), netns.unwrap_or(-1), archive_fd];
    keep.extend(spec.cgroup.iter().map(|fd| fd.as_raw_fd()));
    close_all_but(&keep);
    // Everything of the replica counts in its cgroup, init included (from
    // a launcher: already there, inherited from the launcher's slot group).
    crate::cgroup::join(spec.cgroup).map_err(|e| setup("joining the replica's cgroup", e))?;
    if userns {
        let maps = [
            ("/proc/self/setgroups", "deny".to_string()),
            ("/proc/self/uid_map", format!("0 {uid} 1")),
            ("/proc/self/gid_map", format!("0 {gid} 1")),
        ];
        for (path, text) in maps {
            std::fs::write(path, text).map_err(|e| setup(&format!("user namespace: {path}"), e))?;
        }
    }
    // Die with the server; and if it died before this line, notice now
    // (the control pipe has no writer left).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| setup("PR_SET_PDEATHSIG", e))?;
    if server_gone(ctl_r) {
        // SAFETY: ends init; nothing else of ours runs in this process.
        unsafe { libc::_exit(0) }
    }
    // A session of its own: a terminal's Ctrl-C to the server's process
    // group is the server's to handle, not init's. A launcher's init is
    // in the launcher's session already, which has no terminal (and each
    // setsid costs a scheduler autogroup, made and freed, where enabled).
    if !CALLER_HAS_OWN_SESSION.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = nix::unistd::setsid();
    }
    // Nobody of the namespace may ptrace init or read its memory.
    nix::sys::prctl::set_dumpable(false).map_err(|e| setup("PR_SET_DUMPABLE", e))?;
    if let Some(fd) = spec.netns {
        nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| setup("network namespace", e))?;
        // SAFETY: our copy of the server's descriptor, not used again.
        unsafe { libc::close(fd.as_raw_fd()) };
    } else if userns && spec.sandbox.isolate_network {
        loopback_up();
    }
    let archive = own_archive(spec)?;
    if archive_fd >= 0 {
        // SAFETY: our copy of the caller's descriptor; `archive` has its own.
        unsafe { libc::close(archive_fd) };
    }
    contain_mounts(spec, if userns { None } else { spec.sandbox.identity })?;
    let workspace = File::open(spec.workspace).map_err(|e| setup("workspace", e))?;
    // Init's privileges end here: from now on it is what the job will be
    // (the slot's user, no capabilities, the job's limits and filter), so
    // it unpacks the archive itself and then starts the job sharing its
    // memory (`start_job`), instead of forking a copy of itself to do both.
    // As root it counts as one of the slot user's processes: one more for
    // RLIMIT_NPROC (in a user namespace of its own it always counted).
    let init_counts = !userns && spec.sandbox.identity.is_some();
    job_restrict(spec, exec, userns, init_counts)?;
    // Changing identity cleared both: init dies with its parent, and no
    // process of the replica (the same user now) may trace it or read its
    // memory. And if the parent died in between, notice it now.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| setup("PR_SET_PDEATHSIG", e))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| setup("PR_SET_DUMPABLE", e))?;
    if server_gone(ctl_r) {
        unsafe_exit(0)
    }
    let probe = archive.is_none();
    let archive = archive.map(|a| Pread { stop: Some(ctl_r.as_raw_fd()), ..a });
    let envp = job_unpack(spec, exec, archive, workspace)?;
    // Stopped while it unpacked (a small archive is never looked at mid-way):
    // no job to start. Its end (init's) is the replica's.
    if readable(ctl_r.as_raw_fd()) {
        unsafe_exit(0)
    }
    let job =
        start_job(&JobStart { spec, exec, envp: &envp, out_w: out_w.as_raw_fd(), status_fd: st_w.as_raw_fd(), probe })?;
    Ok((job, out_w))
}

/// What the job's process needs from its start to its `exec`, made before
/// it exists.
#[derive(Clone, Copy)]
struct JobStart<'a> {
    spec: &'a SpawnSpec<'a>,
    exec: &'a Exec,
    /// Its environment (HOME as `job_unpack` found it).
    envp: &'a [CString],
    /// The output pipe's write end: its stdout and stderr.
    out_w: RawFd,
    /// The close-on-exec status pipe, for a setup error.
    status_fd: RawFd,
    /// The startup probe: write a file instead of running make.
    probe: bool,
}

/// Start the job from init with `CLONE_VM | CLONE_VFORK`, as posix_spawn
/// does: no copy of init's page tables, no copy-on-write faults, nothing
/// for the job's `exec` to tear down; init waits until the job has called
/// `exec` (or ended). Safe to share memory here: everything untrusted
/// (the archive) was handled already, by init as the job's user, and the
/// job runs only `job_exec` on a stack of its own before its `exec`.
fn start_job(job: &JobStart) -> Result<libc::pid_t, ChildError> {
    use nix::sys::mman::{mmap_anonymous, mprotect, munmap, MapFlags, ProtFlags};
    const STACK: usize = 128 * 1024;
    const GUARD: usize = 4096;
    let len = std::num::NonZeroUsize::new(STACK + GUARD).unwrap_or(std::num::NonZeroUsize::MIN);
    // SAFETY: a fresh private mapping of our own, not aliased by anything.
    let base = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_STACK,
        )
    }
    .map_err(|e| setup("the job's stack", e))?;
    // SAFETY: the lowest page of that mapping; an overflow of the job's
    // stack faults there instead of writing over init's memory.
    unsafe { mprotect(base, GUARD, ProtFlags::PROT_NONE) }.map_err(|e| setup("the job's stack", e))?;
    // SAFETY: the rest of the mapping, used by the clone below only, and
    // only until it returns (CLONE_VFORK: the job has exec'd or ended).
    let stack = unsafe { std::slice::from_raw_parts_mut(base.as_ptr().cast::<u8>().add(GUARD), STACK) };
    let run = Box::new(|| -> isize { die(job.status_fd, job_exec(job)) });
    let flags = CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK;
    // SAFETY: the child runs `job_exec` on its own stack and ends in exec
    // or _exit; init, single-threaded, is suspended meanwhile, so nothing
    // else touches the memory they share. The job changes only its own
    // descriptor table, signal dispositions and mask (no CLONE_FILES,
    // CLONE_SIGHAND), and allocates only for an error message.
    let started = unsafe { nix::sched::clone(run, stack, flags, Some(libc::SIGCHLD)) };
    // SAFETY: the job no longer runs on this stack (CLONE_VFORK).
    let _ = unsafe { munmap(base, len.get()) };
    started.map(Pid::as_raw).map_err(|e| setup("starting the job", e))
}

/// Something (data or its end) waits on `fd`, without waiting for it.
fn readable(fd: RawFd) -> bool {
    let mut p = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
    // SAFETY: polls one descriptor of ours, without waiting.
    unsafe { libc::poll(p.as_mut_ptr(), 1, 0) == 1 }
}

/// The control pipe's writer (the server) is gone.
fn server_gone(ctl_r: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd { fd: ctl_r.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: polls one valid descriptor, no timeout.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n == 1 && fds[0].revents & libc::POLLHUP != 0
}

/// The replica's view of the file system: its own /proc, private tmpfs
/// for /tmp, /var/tmp and /dev/shm, the work dir hidden, and a tmpfs
/// workspace at the workspace's path.
fn contain_mounts(spec: &SpawnSpec, owner: Option<(Uid, Gid)>) -> Result<(), ChildError> {
    let m = |what: &str, src: Option<&str>, target: &Path, fstype: Option<&str>, flags: MsFlags, data: Option<&str>| {
        mount(src, target, fstype, flags, data).map_err(|e| setup(&format!("{what} ({})", target.display()), e))
    };
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // Nothing we mount may show on the host, nor the host's later mounts here.
    m("making mounts private", None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    // The host's files, read-only for the job (before our own mounts go on,
    // which stay writable): it may not leave files in world-writable host
    // directories, nor (without root) write the server user's files.
    host_read_only().map_err(|e| setup("making the host file system read-only", e))?;
    m("mounting /proc", Some("proc"), Path::new("/proc"), Some("proc"), safe | MsFlags::MS_NOEXEC, None)?;
    // Each of these directories only where the host has it: a mount on a
    // missing directory (ENOENT) or on a file (ENOTDIR) is skipped, so no
    // stat is needed first. `fresh`: the private mounts made, under which
    // nothing of the host's is left.
    let optional = |r: Result<(), ChildError>, e: nix::Result<()>| match e {
        Ok(()) => Ok(true),
        Err(nix::Error::ENOENT | nix::Error::ENOTDIR) => Ok(false),
        Err(_) => r.map(|()| false),
    };
    let try_mount = |what: &str, target: &'static str, fstype: &str, flags: MsFlags, data: &str| {
        let e = mount(Some(fstype), target, Some(fstype), flags, Some(data));
        let r = e.map_err(|e| setup(&format!("{what} ({target})"), e));
        optional(r, e).map(|made| made.then_some(Path::new(target)))
    };
    let mut fresh: Vec<&Path> = Vec::new();
    let tmp = format!("size={},mode=1777", spec.limits.tmp_bytes);
    for dir in PRIVATE_TMP {
        fresh.extend(try_mount("private tmpfs", dir, "tmpfs", safe, &tmp)?);
    }
    // Terminals of its own: a new devpts instance (/dev/ptmx opens the
    // instance at /dev/pts next to it), so a job cannot take the host's
    // ptys, and the kernel keeps `kernel.pty.reserve` for the host.
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    try_mount("private /dev/pts", "/dev/pts", "devpts", flags, "newinstance,ptmxmode=0666,mode=0620")?;
    // The host's services listen on unix sockets under /run (D-Bus, the
    // journal, container runtimes): sockets a network namespace does not
    // stop. An isolated replica gets an empty /run of its own.
    if spec.sandbox.isolate_network {
        fresh.extend(try_mount("private /run", "/run", "tmpfs", safe | MsFlags::MS_NOEXEC, "size=1m,mode=0755")?);
    }
    // The work dir (all tenants' outputs and the spool) is replaced by an
    // empty read-only tmpfs. Under one of the private mounts just made (a
    // work dir in /tmp, /dev/shm) it is gone already: the job sees the
    // empty tmpfs of its own there, so only the workspace's path is made
    // again (no tmpfs and remount more per job).
    let wd = spec.work_dir;
    let hidden = fresh.iter().find(|&&base| wd.starts_with(base)).copied();
    let hide = "size=64k,mode=0755";
    let made = match hidden {
        Some(base) => mkdir_below(base, spec.workspace),
        None => {
            mkdir_all(wd).map_err(|e| setup(&format!("work dir ({})", wd.display()), e))?;
            m("hiding the work dir", Some("tmpfs"), wd, Some("tmpfs"), safe | MsFlags::MS_NOEXEC, Some(hide))?;
            mkdir_below(wd, spec.workspace)
        }
    };
    made.map_err(|e| setup("workspace", e))?;
    let mut ws = format!("size={},mode=0700", spec.limits.disk_bytes);
    if let Some((uid, gid)) = owner {
        ws.push_str(&format!(",uid={uid},gid={gid}"));
    }
    // Huge pages for files of 2 MiB and more (`huge=within_size`): a large
    // archive unpacks at about twice the speed (one 2 MiB page instead of
    // 512 small ones to allocate and charge). Same size limit and memory
    // charge; a kernel without transparent huge pages refuses the option,
    // and then the workspace is mounted without it.
    let huge = format!("{ws},huge=within_size");
    if mount(Some("tmpfs"), spec.workspace, Some("tmpfs"), safe, Some(huge.as_str())).is_err() {
        m("workspace tmpfs", Some("tmpfs"), spec.workspace, Some("tmpfs"), safe, Some(&ws))?;
    }
    if hidden.is_none() {
        let ro = safe | MsFlags::MS_NOEXEC | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        m("hiding the work dir", None, wd, None, ro, Some(hide))?;
    }
    Ok(())
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {RDONLY}): every mount of
/// this mount namespace read-only. `ENOSYS` on kernels before 5.12.
fn mount_setattr_rdonly(path: &std::ffi::CStr, flags: libc::c_int) -> nix::Result<()> {
    let attr = MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: the kernel reads a NUL-terminated path and a mount_attr of
    // the size given, both owned by this frame.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

/// Whether RLIMIT_NPROC counts processes per user namespace (Linux 5.14,
/// "ucounts"): then a replica in a user namespace of its own can have
/// `--max-procs`, counting its own processes only, not all of the server
/// user's.
pub fn nproc_per_user_namespace() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().ok());
    matches!((parts.next(), parts.next()), (Some(Some(a)), Some(Some(b))) if (a, b) >= (5, 14))
}

/// Whether this kernel can make the host's file system read-only for
/// replicas, recursively (mount_setattr, Linux 5.12). Asked once at start
/// for the ready line: an empty path with no flags fails with ENOSYS only
/// where the call is missing.
pub fn host_read_only_available() -> bool {
    mount_setattr_rdonly(c"", 0) != Err(nix::Error::ENOSYS)
}

/// Make every mount the replica inherited from the host read-only. Where
/// the kernel lacks mount_setattr, fall back to the root mount alone
/// (a read-only bind remount; the ready line says the host stays writable
/// under other mount points).
fn host_read_only() -> nix::Result<()> {
    match mount_setattr_rdonly(c"/", libc::AT_RECURSIVE) {
        Err(nix::Error::ENOSYS) => {
            let keep =
                nix::sys::statvfs::statvfs("/").map(|v| v.flags()).unwrap_or(nix::sys::statvfs::FsFlags::empty());
            let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            for (st, ms) in [
                (nix::sys::statvfs::FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (nix::sys::statvfs::FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (nix::sys::statvfs::FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            ] {
                if keep.contains(st) {
                    flags |= ms;
                }
            }
            mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
        }
        other => other,
    }
}

/// Make `path`'s directories below `base`, top down: `base` is a fresh,
/// empty mount, so none of them exists (one mkdir each; an existing one,
/// of the same name as another component, is fine).
fn mkdir_below(base: &Path, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Ok(rest) = path.strip_prefix(base) else { return mkdir_all(path) };
    let mut dir = base.to_path_buf();
    for part in rest.components() {
        dir.push(part);
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

fn mkdir_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(path)
}

/// Init's life after the fork: reap, forward SIGTERM, report the job's end.
fn init_loop(job: libc::pid_t, st_w: OwnedFd, ctl_r: OwnedFd, out_w: OwnedFd) -> ! {
    // Held, never written: its end of file tells the server that init,
    // and with it the namespace, is gone.
    let _out_w = out_w;
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let sfd = nix::sys::signalfd::SignalFd::with_flags(&chld, nix::sys::signalfd::SfdFlags::SFD_NONBLOCK);
    let sfd_raw = sfd.as_ref().map_or(-1, |s| s.as_raw_fd());
    let report = |raw: i32| -> ! {
        let _ = nix::unistd::write(&st_w, format!("{REPORT}{raw}\n").as_bytes());
        // Everything else in the namespace is killed by the kernel now.
        unsafe_exit(0)
    };
    loop {
        // Reap whatever ended (SIGCHLD may have come before the signalfd).
        loop {
            let mut raw = 0;
            // SAFETY: waitpid writes one int we own.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == job {
                report(raw);
            }
        }
        let mut fds = [
            libc::pollfd { fd: ctl_r.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sfd_raw, events: libc::POLLIN, revents: 0 },
        ];
        // Without a signalfd, fall back to polling once a second.
        let timeout = if sfd_raw < 0 { 1000 } else { -1 };
        // SAFETY: polls two descriptors of ours.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            if let Ok(s) = &sfd {
                while let Ok(Some(_)) = s.read_signal() {}
            }
        }
        if fds[0].revents != 0 {
            let mut b = [0u8; 16];
            match nix::unistd::read(&ctl_r, &mut b) {
                Ok(0) => unsafe_exit(0), // the server is gone
                Ok(_) => {
                    // Time limit: SIGTERM to every process of the namespace
                    // (but init), and wake stopped ones so they get it.
                    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
                    let _ = kill(Pid::from_raw(-1), Signal::SIGCONT);
                }
                Err(nix::Error::EAGAIN | nix::Error::EINTR) => {}
                Err(_) => unsafe_exit(0),
            }
        }
    }
}

fn unsafe_exit(code: i32) -> ! {
    // SAFETY: ends init or a child without running the server's atexit handlers.
    unsafe { libc::_exit(code) }
}

/// The uncontained child: a plain session on the host. Returns only on failure.
fn uncontained_job(spec: &SpawnSpec, exec: &Exec, out_w: OwnedFd, status_fd: RawFd) -> ChildError {
    // Nothing of the server's stays open here, not even during extraction.
    let mut keep = vec![out_w.as_raw_fd(), status_fd, spec.archive.map_or(-1, |fd| fd.as_raw_fd())];
    keep.extend(spec.cgroup.iter().map(|fd| fd.as_raw_fd()));
    close_all_but(&keep);
    if let Err(e) = crate::cgroup::join(spec.cgroup) {
        return setup("joining the replica's cgroup", e);
    }
    let archive = match own_archive(spec) {
        Ok(a) => a,
        Err(e) => return e,
    };
    if let Some(fd) = spec.archive {
        // SAFETY: our copy of the server's descriptor; `archive` has its own.
        unsafe { libc::close(fd.as_raw_fd()) };
    }
    if let Err(e) = make_workspace(spec.workspace, spec.sandbox.identity) {
        return setup("workspace", e);
    }
    let workspace = match File::open(spec.workspace) {
        Ok(d) => d,
        Err(e) => return setup("workspace", e),
    };
    if spec.sandbox.isolate_network {
        if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNET) {
            return setup("network namespace", e);
        }
        loopback_up();
    }
    job_setup(spec, exec, out_w, status_fd, archive, workspace)
}

/// The uncontained job, forked from the server: what init does for a
/// contained one, then `job_exec`. Returns only on failure.
fn job_setup(
    spec: &SpawnSpec,
    exec: &Exec,
    out_w: OwnedFd,
    status_fd: RawFd,
    archive: Option<Pread>,
    workspace: File,
) -> ChildError {
    // Its own session and process group first: the server kills the
    // group, unpacking included.
    if let Err(e) = nix::unistd::setsid() {
        return setup("setsid", e);
    }
    if let Err(e) = job_restrict(spec, exec, false, false) {
        return e;
    }
    let probe = archive.is_none();
    match job_unpack(spec, exec, archive, workspace) {
        Ok(envp) => job_exec(&JobStart { spec, exec, envp: &envp, out_w: out_w.as_raw_fd(), status_fd, probe }),
        Err(e) => e,
    }
}

/// What the job runs under, taken by the process that unpacks its archive
/// (init, or the uncontained job): the resource limits that bound the
/// unpacking too (file size, no core, processes; the job's CPU, address
/// space and open files are its own: `job_exec`), no capability that could
/// come back, `PR_SET_NO_NEW_PRIVS`, the seccomp filter, the slot user's
/// identity. `init_counts`: this process will be one of that user's
/// processes beside the job's, so RLIMIT_NPROC gets one more.
fn job_restrict(spec: &SpawnSpec, exec: &Exec, userns: bool, init_counts: bool) -> Result<(), ChildError> {
    let l = spec.limits;
    let nproc = l.processes.filter(|_| l.nproc_rlimit).map(|n| n.saturating_add(u64::from(init_counts)));
    let limits =
        [None, None, None, Some((l.file_size, "file size")), Some((0, "core size")), nproc.map(|v| (v, "processes"))];
    set_limits(exec, limits)?;
    let contained = spec.sandbox.containment != Containment::Uncontained;
    // (A root launcher emptied its own bounding set: inherited.)
    let inherited = !userns && BOUNDING_SET_EMPTY.load(std::sync::atomic::Ordering::Relaxed);
    if contained && !inherited {
        // No capability can come back: not from the bounding set, not
        // through a setuid binary.
        drop_bounding_set().map_err(|e| setup("dropping capabilities", e))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| setup("PR_SET_NO_NEW_PRIVS", e))?;
    // Kernel keyrings are per uid and not namespaced: a key a job adds to
    // its user keyring would outlive it and be read by the next tenant
    // that runs as the same slot uid. Nested user namespaces: no. (A root
    // launcher loaded this filter itself: inherited.)
    let inherited = !userns && SECCOMP_INHERITED.load(std::sync::atomic::Ordering::Relaxed);
    if !inherited {
        job_seccomp().map_err(|e| setup("seccomp filter", e))?;
    }
    if let Some((uid, gid)) = spec.sandbox.identity {
        take_identity(uid, gid).map_err(|e| setup("dropping privileges", e))?;
    }
    if userns {
        clear_capabilities().map_err(|e| setup("dropping capabilities", e))?;
    }
    Ok(())
}

/// Set the given limits (in the order of `RLIMITS`; `None`: leave it).
fn set_limits(exec: &Exec, limits: [Option<(u64, &str)>; 6]) -> Result<(), ChildError> {
    for ((res, inherited), limit) in RLIMITS.into_iter().zip(exec.hard).zip(limits) {
        let Some((v, what)) = limit else { continue };
        // Never above the hard limit we inherited (a non-root server cannot raise it).
        let soft = v.min(inherited);
        // CPU: SIGXCPU at the soft limit, so the job learns why; SIGKILL a
        // second later if it ignores that.
        let hard = if res == Resource::RLIMIT_CPU { soft.saturating_add(1).min(inherited) } else { soft };
        setrlimit(res, soft, hard).map_err(|e| setup(what, e))?;
    }
    Ok(())
}

/// Into the workspace, and the archive unpacked there (safe extraction),
/// by the job's user; returns the job's environment. `archive` None: the
/// startup probe, nothing to unpack.
fn job_unpack(
    spec: &SpawnSpec,
    exec: &Exec,
    archive: Option<Pread>,
    workspace: File,
) -> Result<Vec<CString>, ChildError> {
    // fchdir: the workspace was opened while privileged, so the job's user
    // does not need to be able to traverse the work dir's ancestors.
    nix::unistd::fchdir(&workspace).map_err(|e| setup("chdir", e))?;
    drop(workspace);
    let mut envp = exec.envp.clone();
    // HOME is the workspace only where this user can reach it by path.
    if nix::unistd::access(spec.workspace, nix::unistd::AccessFlags::X_OK).is_err() {
        for v in envp.iter_mut().filter(|v| v.as_bytes().starts_with(b"HOME=")) {
            *v = c"HOME=/tmp".to_owned();
        }
    }
    if let Some(archive) = archive {
        // Its length sizes the read buffer (a small archive, a small buffer).
        let len = archive.file.metadata().ok().map(|m| m.len());
        // A panic here (an allocation the inflater could not get) is a
        // setup error like any other, and says nothing on the stderr this
        // process shares with the server.
        std::panic::set_hook(Box::new(|_| {}));
        let unpacked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            extract_sized(archive, len, Path::new("."), &spec.limits.extract)
        }));
        let _ = std::panic::take_hook();
        match unpacked {
            Ok(done) => done.map_err(|msg| fail(SETUP_FAILED, msg))?,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                return Err(fail(
                    SETUP_FAILED,
                    format!("replica setup failed: unpacking the archive: {}", printable(why)),
                ));
            }
        };
    }
    Ok(envp)
}

/// The job process, from its start to `exec make run` (in the workspace,
/// its archive unpacked, under `job_restrict`): default signals, a new
/// session, stdin from /dev/null, stdout and stderr onto the output pipe,
/// nothing else open but the close-on-exec status pipe, its own limits on
/// CPU time, address space and open files (not the unpacking's). Returns
/// only on failure. `probe`: the startup probe's job, which writes a file
/// instead.
fn job_exec(job: &JobStart) -> ChildError {
    let JobStart { spec, exec, envp, out_w, status_fd, probe } = *job;
    // Signals: the server blocks some for its signalfd, init blocks
    // SIGCHLD, and Rust ignores SIGPIPE; the job must start with the defaults.
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in [Signal::SIGPIPE, Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGCHLD] {
        // SAFETY: restoring the default disposition installs no handler.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    // A session of its own. It fails only where the process leads a
    // group already (EPERM): the uncontained job, which made its session
    // before unpacking.
    let _ = nix::unistd::setsid();
    // SAFETY: the output pipe's write end, open in this process; borrowed
    // for the two dup2 calls only.
    let out = unsafe { BorrowedFd::borrow_raw(out_w) };
    // stdout and stderr share one pipe, so their lines stay in order.
    if let Err(e) = nix::unistd::dup2_stdout(out).and_then(|_| nix::unistd::dup2_stderr(out)) {
        return setup("dup2", e);
    }
    match File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = nix::unistd::dup2_stdin(&null) {
                return setup("stdin", e);
            }
        }
        Err(e) => return setup("/dev/null", e),
    }
    close_all_but(&[status_fd]);
    if probe {
        // The startup probe: can this user write its workspace?
        return match File::create("probe") {
            Ok(_) => unsafe_exit(0),
            Err(e) => fail(
                SETUP_FAILED,
                format!("replicas (uid {}) cannot write their workspace ({e})", nix::unistd::getuid()),
            ),
        };
    }
    // Last: an address-space limit below what init maps already would
    // fail the allocations above.
    let l = spec.limits;
    let own = [
        Some((l.cpu_seconds, "CPU time")),
        Some((l.address_space, "address space")),
        Some((l.open_files, "open files")),
        None,
        None,
        None,
    ];
    if let Err(e) = set_limits(exec, own) {
        return e;
    }
    let mut err = nix::Error::ENOENT;
    for path in &exec.make {
        match nix::unistd::execve(path, &exec.argv, envp) {
            Err(nix::Error::ENOENT) => {}
            Err(e) => err = e,
            Ok(never) => match never {},
        }
    }
    let code = if err == nix::Error::ENOENT { 127 } else { 126 };
    fail(code, format!("cannot run make (searched {REPLICA_PATH}): {err}"))
}

/// Drop every capability from the bounding set and the ambient set.
fn drop_bounding_set() -> nix::Result<()> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let e = nix::Error::last();
                if e == nix::Error::EINVAL {
                    break; // past the last capability this kernel knows
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// A job's seccomp filter, for every ABI the job could use on this machine;
/// everything not named here is allowed. Needs NO_NEW_PRIVS.
/// - add_key, request_key, keyctl: EPERM (as Docker's default profile
///   does): kernel keyrings are per uid and not namespaced.
/// - unshare and clone with CLONE_NEWUSER: EPERM. A nested user namespace
///   is kernel attack surface, and in it a job could mount what it likes.
/// - clone3: ENOSYS, since its flags sit behind a pointer a filter cannot
///   read; the C library then falls back to clone.
fn job_seccomp() -> nix::Result<()> {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    /// One ABI: its AUDIT_ARCH value and its syscall numbers.
    struct Abi {
        arch: u32,
        keyrings: [u32; 3],
        unshare: u32,
        clone: u32,
        clone3: u32,
    }
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const AND: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO
    const ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;
    const NEWUSER: u32 = libc::CLONE_NEWUSER as u32;
    // The x32 ABI shares x86_64's arch value with bit 30 set in the
    // number: masked off below.
    #[cfg(target_arch = "x86_64")]
    let abis = [
        Abi { arch: 0xC000_003E, keyrings: [248, 249, 250], unshare: 272, clone: 56, clone3: 435 },
        Abi { arch: 0x4000_0003, keyrings: [286, 287, 288], unshare: 310, clone: 120, clone3: 435 },
    ];
    #[cfg(target_arch = "aarch64")]
    let abis = [Abi { arch: 0xC000_00B7, keyrings: [217, 218, 219], unshare: 97, clone: 220, clone3: 435 }];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let abis: [Abi; 0] = [];
    let f = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    let mut prog = Vec::new();
    for abi in abis {
        // seccomp_data: nr at offset 0, arch at 4, the first argument's low
        // word at 16 (little-endian). Jump offsets count from the next
        // instruction; the block is 17 instructions long.
        prog.extend([
            f(LD_ABS, 0, 0, 4),
            f(JEQ, 0, 15, abi.arch), // another ABI: skip this block
            f(LD_ABS, 0, 0, 0),
            f(AND, 0, 0, !0x4000_0000),
            f(JEQ, 10, 0, abi.keyrings[0]), // -> EPERM
            f(JEQ, 9, 0, abi.keyrings[1]),
            f(JEQ, 8, 0, abi.keyrings[2]),
            f(JEQ, 8, 0, abi.clone3),  // -> ENOSYS
            f(JEQ, 2, 0, abi.unshare), // -> flags
            f(JEQ, 1, 0, abi.clone),
            f(RET, 0, 0, ALLOW),
            f(LD_ABS, 0, 0, 16), // flags
            f(AND, 0, 0, NEWUSER),
            f(JEQ, 0, 1, 0),
            f(RET, 0, 0, ALLOW),
            f(RET, 0, 0, EPERM),
            f(RET, 0, 0, ENOSYS),
        ]);
    }
    prog.push(f(RET, 0, 0, ALLOW));
    let fprog = SockFprog { len: prog.len() as u16, filter: prog.as_ptr() };
    // SAFETY: the kernel copies the filter program, which lives in `prog`
    // for the duration of the call.
    let r = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog as *const SockFprog, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

/// capset(): no effective, permitted or inheritable capability.
fn clear_capabilities() -> nix::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header { version: VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset reads a header and two data structs laid out as the
    // kernel's _LINUX_CAPABILITY_VERSION_3 expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

fn make_workspace(path: &Path, identity: Option<(Uid, Gid)>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)?;
    if let Some((uid, gid)) = identity {
        nix::unistd::chown(path, Some(uid), Some(gid))?;
    }
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
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req);
        }
        libc::close(fd);
    }
}

/// A new, empty network namespace with only `lo` up, made once per node at
/// start; the server itself stays in (and returns to) its own.
pub fn empty_network() -> Result<OwnedFd, String> {
    let ns = |what: &str| {
        File::open("/proc/thread-self/ns/net")
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot open {what} network namespace: {e}"))
    };
    let home = ns("the server's")?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
        format!(
            "cannot give replicas a network namespace ({e}): run as root with CAP_SYS_ADMIN, or pass --allow-network"
        )
    })?;
    loopback_up();
    let empty = ns("a new");
    nix::sched::setns(&home, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot return to the server's network namespace: {e}"))?;
    empty
}

/// Remove a directory tree without holding up the reactor: a forked child
/// execs `rm -rf` (GNU rm walks any depth without recursing on its stack
/// and never follows links) and is reaped like any other child. For trees
/// on disk (`--uncontained` workspaces); a contained workspace is a tmpfs
/// that goes with its namespace.
pub fn remove_tree_in_background(dir: &Path) -> nix::Result<Pid> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| nix::Error::EINVAL)?;
    let argv = [c"rm".to_owned(), c"-rf".to_owned(), c"--one-file-system".to_owned(), c"--".to_owned(), path];
    // SAFETY: single-threaded server; the child only closes descriptors,
    // resets its signal mask and execs or _exits.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            close_all_but(&[]);
            let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            for rm in [c"/bin/rm", c"/usr/bin/rm"] {
                let _ = nix::unistd::execv(rm, &argv);
            }
            unsafe_exit(127)
        }
        ForkResult::Parent { child } => Ok(child),
    }
}

/// Ask a replica to stop: SIGTERM to every process of its namespace (init
/// forwards it), or to its process group when uncontained.
pub fn terminate(pid: Option<Pid>, control: Option<&OwnedFd>) {
    match (control, pid) {
        (Some(ctl), _) => {
            if let Err(e) = nix::unistd::write(ctl, b"T") {
                log::warn!("cannot ask a replica's init to forward SIGTERM: {e}");
            }
        }
        (None, Some(pid)) => signal_group(pid, Signal::SIGTERM),
        (None, None) => {}
    }
}

/// End a replica now. Contained: SIGKILL to init, which takes the whole
/// namespace down (the kernel kills every process in it). Uncontained:
/// SIGKILL to its process group.
pub fn kill_replica(pid: Pid, contained: bool) {
    if contained {
        match kill(pid, Signal::SIGKILL) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(e) => log::warn!("kill({pid}, SIGKILL) failed: {e}"),
        }
    } else {
        signal_group(pid, Signal::SIGKILL);
    }
}

/// Send `sig` to a process group (its pgid is its leader's pid). ESRCH
/// (already gone) is fine.
fn signal_group(pgid: Pid, sig: Signal) {
    match killpg(pgid, sig) {
        Ok(()) | Err(nix::Error::ESRCH) => {}
        Err(e) => log::warn!("killpg({pgid}, {sig}) failed: {e}"),
    }
}

/// At start: SIGKILL every process whose real uid is in `uids` (what an
/// earlier run of this server left). Scans /proc as root, no helper takes
/// the uid; repeats until none is left (bounded). Returns how many.
pub fn reclaim(uids: std::ops::Range<u32>) -> usize {
    let mut killed = 0;
    for _round in 0..100 {
        let found: Vec<i32> = processes_of(&uids);
        if found.is_empty() {
            break;
        }
        for pid in found {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        // Bounded, before the reactor starts: let the kernel finish them.
        std::thread::yield_now();
    }
    killed
}

fn processes_of(uids: &std::ops::Range<u32>) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        // Zombies are already dead; their parent reaps them.
        let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
        if uid.is_some_and(|u| uids.contains(&u)) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// Check at startup that replicas can be contained as configured: start a
/// replica exactly as a real one (clone, init, namespaces, mounts, network,
/// identity, capabilities), whose job writes a file in its workspace and
/// exits 0. The error says what to fix.
pub fn probe(
    sandbox: Sandbox,
    limits: &JobLimits,
    work_dir: &Path,
    netns: Option<BorrowedFd>,
    cgroups: Option<&crate::cgroup::Cgroups>,
) -> Result<(), String> {
    let group = match cgroups {
        Some(g) => Some(
            g.create("probe", cgroup_limits(limits))
                .map_err(|e| format!("cannot create a cgroup for replicas: {e}"))?,
        ),
        None => None,
    };
    let join = match &group {
        Some(g) => g.open_join().map_err(|e| format!("cannot open a cgroup for replicas: {e}"))?,
        None => Vec::new(),
    };
    let r = probe_with(sandbox, limits, work_dir, netns, &join);
    drop(join);
    if let Some(g) = group {
        g.kill_all();
        let _ = g.remove();
    }
    r
}

/// A replica's cgroup limits: `--max-memory` and `--max-procs` for all its
/// processes together.
pub fn cgroup_limits(limits: &JobLimits) -> crate::cgroup::CgroupLimits {
    crate::cgroup::CgroupLimits { memory: limits.address_space, pids: limits.processes.unwrap_or(4096) }
}

fn probe_with(
    sandbox: Sandbox,
    limits: &JobLimits,
    work_dir: &Path,
    netns: Option<BorrowedFd>,
    cgroup: &[OwnedFd],
) -> Result<(), String> {
    let dir = work_dir.join(format!(".sandbox-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let workspace = dir.join("work");
    let contained = sandbox.containment != Containment::Uncontained;
    if !contained {
        mkdir_all(&dir).map_err(|e| format!("cannot prepare a workspace in {}: {e}", work_dir.display()))?;
    }
    let spec =
        SpawnSpec { archive: None, work_dir, workspace: &workspace, env: Vec::new(), limits, sandbox, netns, cgroup };
    let spawned = spawn(&spec).map_err(|e| match sandbox.containment {
        Containment::Namespaces => {
            format!("cannot create namespaces for replicas ({e}): run as root with CAP_SYS_ADMIN")
        }
        Containment::UserNamespace => format!(
            "cannot contain replicas without root ({e}): unprivileged user namespaces are off here; run as root, \
             enable them (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces), \
             or pass --uncontained to run jobs NOT contained"
        ),
        Containment::Uncontained => format!("cannot fork: {e}"),
    })?;
    drop(spawned.control);
    let status = loop {
        match nix::sys::wait::waitpid(spawned.pid, None) {
            Err(nix::Error::EINTR) => continue,
            other => break other,
        }
    };
    // Blocking reads from here: the probe has ended.
    let _ = fcntl(spawned.status.as_fd(), FcntlArg::F_SETFL(OFlag::empty()));
    let (setup_error, report) = read_report(spawned.status);
    let _ = std::fs::remove_dir_all(&dir);
    let job = match (report, status) {
        (Some(raw), _) => WaitStatus::from_raw(spawned.pid, raw).ok(),
        (None, Ok(s)) => Some(s),
        (None, Err(_)) => None,
    };
    if setup_error.is_empty() && matches!(job, Some(WaitStatus::Exited(_, 0))) {
        return Ok(());
    }
    let msg = if setup_error.is_empty() { format!("the probe replica ended with {job:?}") } else { setup_error };
    Err(match sandbox.containment {
        _ if msg.contains("dropping privileges") => format!("{msg}: check --slot-uids / --run-as"),
        _ if msg.contains("cannot write their workspace") => {
            format!("{msg}: use a --work-dir on a local filesystem that honours chown")
        }
        Containment::UserNamespace => format!(
            "cannot contain replicas without root ({msg}): run as root, allow unprivileged user namespaces \
             with mounts, or pass --uncontained to run jobs NOT contained"
        ),
        _ => format!("cannot contain replicas ({msg}): run as root with CAP_SYS_ADMIN, or pass --uncontained"),
    })
}

/// Read the status pipe (after init or the job was reaped): the setup
/// error the job or init wrote, if any, and init's report of the job's
/// raw wait status, if it made one.
pub fn read_report(status: OwnedFd) -> (String, Option<i32>) {
    let mut f = File::from(status);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while buf.len() < 8192 {
        match f.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    // Init writes its report last, after the job ended: only the last line
    // can be it. The job's error text (which may quote archive names) can
    // hold anything, a line that looks like a report included.
    let report = match lines.last().and_then(|l| l.strip_prefix(REPORT)) {
        Some(raw) => {
            let raw = raw.trim().parse().ok();
            lines.pop();
            raw
        }
        None => None,
    };
    // One line, no control characters: the message is shown to anyone who
    // asks STATUS, on their terminal, and goes to the server's log.
    let error: Vec<String> = lines.iter().map(|l| printable(l.trim())).filter(|l| !l.is_empty()).collect();
    (error.join("; "), report)
}

/// Why a replica was stopped by the server, if it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    TimeLimit {
        seconds: u64,
        killed: bool,
    },
    Closed,
    Shutdown,
    /// The main server stopped it (fail-fast, or `cloud cancel`: the
    /// scheduler gives the replica its message); its output is kept.
    Stopped,
}

/// Turn how the job ended into the replica's result.
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
            StopReason::Stopped => "killed: stopped by the main server".into(),
        };
        return RunResult { exit_code: exit_code(status), ..RunResult::ended(Outcome::Killed, message) };
    }
    if !setup_error.is_empty() {
        return RunResult { exit_code: exit_code(status), ..RunResult::invalid(setup_error) };
    }
    match status {
        WaitStatus::Exited(_, code) => RunResult::exited(code, format!("make run exited with status {code}")),
        WaitStatus::Signaled(_, sig, _) => {
            let hint = match sig {
                Signal::SIGXCPU => " (CPU time limit, --max-cpu)",
                Signal::SIGXFSZ => " (file size limit, --max-file-size)",
                _ => "",
            };
            RunResult {
                exit_code: 128 + sig as i32,
                ..RunResult::ended(Outcome::Killed, format!("make run was killed by signal {}{hint}", sig.as_str()))
            }
        }
        other => RunResult::ended(Outcome::Killed, format!("make run ended unexpectedly: {other:?}")),
    }
}

/// The code make reported for the failing recipe, from the end of its
/// output: the first `*** [...] Error N` line (the innermost make's, under
/// recursive makes), e.g. `make: *** [Makefile:2: run] Error 3` gives 3.
pub fn recipe_code(tail: &[u8]) -> Option<i32> {
    let text = String::from_utf8_lossy(tail);
    text.lines().filter(|l| l.contains("*** [")).find_map(|l| l.rsplit_once("] Error ")?.1.trim().parse().ok())
}

fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => -1,
    }
}

/// The environment of a replica: nothing of the server's. HOME is the
/// workspace (or /tmp where the job cannot reach the workspace by path).
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

/// Where a replica's workspace is (a tmpfs mounted there inside its own
/// namespace when contained; a plain directory otherwise).
pub fn workspace_path(ticket_dir: &Path) -> PathBuf {
    ticket_dir.join("work")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Init unpacking an archive looks at its control pipe every
    /// `STOP_CHECK` bytes: a stop (a byte, or the server's end) ends the
    /// unpacking there, not at the archive's end.
    #[test]
    fn unpacking_stops_within_a_check_of_the_server_saying_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        std::fs::write(&path, vec![0u8; (3 * STOP_CHECK) as usize]).unwrap();
        for say in [Some(b"T"), None] {
            let (ctl_r, ctl_w) = nix::unistd::pipe().unwrap();
            let file = File::open(&path).unwrap();
            let mut a = Pread { file, at: 0, stop: Some(ctl_r.as_raw_fd()), checked: 0 };
            let mut buf = vec![0u8; 64 * 1024];
            let mut read = 0u64;
            while read < STOP_CHECK {
                read += a.read(&mut buf).unwrap() as u64;
            }
            match say {
                Some(b) => assert_eq!(nix::unistd::write(&ctl_w, b).unwrap(), 1),
                None => drop(ctl_w),
            }
            let err = std::iter::repeat_with(|| a.read(&mut buf)).find_map(Result::err).unwrap();
            assert!(err.to_string().contains("stopped"), "{err}");
            assert!(a.at <= 2 * STOP_CHECK + buf.len() as u64, "read on to {}", a.at);
        }
    }

    #[test]
    fn the_recipe_code_is_taken_from_makes_error_line() {
        assert_eq!(recipe_code(b"hello\nmake: *** [Makefile:2: run] Error 3\n"), Some(3));
        let nested =
            b"make[1]: *** [Makefile:5: inner] Error 7\nmake[1]: Leaving\nmake: *** [Makefile:2: run] Error 2\n";
        assert_eq!(recipe_code(nested), Some(7));
        assert_eq!(recipe_code(b"make: *** No rule to make target 'run'.  Stop.\n"), None);
        assert_eq!(recipe_code(b"exit 3"), None);
    }

    #[test]
    fn paths_below_a_fresh_mount_are_made_top_down() {
        let base = std::env::temp_dir().join(format!("cloud-mkdir-below-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        mkdir_all(&base).unwrap();
        let deep = base.join("output_9001/7/work");
        mkdir_below(&base, &deep).unwrap();
        assert!(deep.is_dir());
        // Again, and with a part already there: fine.
        mkdir_below(&base, &deep).unwrap();
        // Not below the base: made as a whole.
        let other = base.join("x/y");
        mkdir_below(&deep, &other).unwrap();
        assert!(other.is_dir());
        // A file in the way is an error, not skipped.
        std::fs::write(base.join("file"), b"").unwrap();
        assert!(mkdir_below(&base, &base.join("file/sub")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_report_is_told_apart_from_setup_errors() {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, b"bad archive: not a gzip file\n\x01cloud-init wait status 32000\n").unwrap();
        drop(w);
        assert_eq!(read_report(r), ("bad archive: not a gzip file".to_string(), Some(32000)));
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(w);
        assert_eq!(read_report(r), (String::new(), None));
    }

    #[test]
    fn a_report_forged_in_the_error_text_is_not_taken() {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, b"cannot create x\n\x01cloud-init wait status 0\n\x1b[31mred: File exists\n").unwrap();
        drop(w);
        let (error, report) = read_report(r);
        assert_eq!(report, None);
        assert_eq!(error, "cannot create x; \\u{1}cloud-init wait status 0; \\u{1b}[31mred: File exists");
    }
}
