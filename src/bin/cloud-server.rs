//! `cloud-server`: the main server and its local side nodes in one
//! reactor; `cloud-server node --listen HOST:PORT`: one node alone, for a
//! main server elsewhere (a `HOST:PORT` line of its nodes file).
//!
//! Also owns the locks that keep servers apart: one server per work dir
//! (`<work-dir>/server.lock`), and no slot uid shared by two servers on one
//! host (`/run/cloudinfra/slot-UID.lock`). They are flock()s, held for the
//! life of the process and released by the kernel however it ends.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cloudinfra::config::{NodeKind, NodeSpec, NodesFile};
use cloudinfra::extract::ExtractLimits;
use cloudinfra::portmap;
use cloudinfra::server::{Server, ServerConfig};
use cloudinfra::spawn::{Containment, JobLimits};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{Gid, Uid, User};

/// Main server of the cloudinfra job cluster: owns the side nodes listed in
/// the nodes file, runs each replica's `make run` on its own node, and
/// answers deploy/status/retrieve over ONC RPC (docs/cloud.x).
///
/// Sizes accept K, M and G suffixes (powers of 1024). See docs/LIMITS.md,
/// "What a job may and may not do", for what every limit means.
#[derive(Parser, Debug)]
#[command(name = "cloud-server", version)]
struct Args {
    /// Nodes file: first line N, then N lines each PORT (a node in this
    /// process), HOST:PORT (a `cloud-server node`) or slurm:PARTITION,
    /// optionally followed by slots=K.
    #[arg(long, value_name = "FILE", default_value = "cloud_nodes.txt")]
    nodes: PathBuf,
    /// Address clients connect to, IP:PORT (port 0 picks a free port; the ready line shows it).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Where node workspaces (output_PORT/), the main server's spool and the
    /// ticket counter (tickets) live; one server per work dir (server.lock).
    #[arg(long, value_name = "DIR", default_value = "work")]
    work_dir: PathBuf,
    /// A replica lost with its node (link broken) runs again on another node,
    /// keeping its place at the head of the queue, instead of ending INVALID.
    #[arg(long)]
    requeue_lost: bool,
    /// Jobs that may wait for nodes before deploys get "queue full".
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_queue: usize,
    /// Tickets one user may hold at once (waiting, running, or finished and
    /// not yet retrieved): each keeps its outputs on disk until it expires.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_tickets_per_user: usize,
    /// Seconds a finished job waits to be retrieved before it is closed and
    /// its outputs discarded (later calls get CLOUD_EXPIRED); 0 keeps it forever.
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    ticket_ttl: u64,
    /// Client connections held at once; at the limit the one idle the longest
    /// is closed to make room. Lowered to what RLIMIT_NOFILE leaves room for.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Seconds a client connection may sit with no call in progress and no
    /// reply owed before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Seconds a call being received (or a reply being sent) may go without
    /// 64 KiB of progress before the connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    call_timeout: u64,
    /// Without root, replicas run as this server's own user, so by default
    /// only that user (and root) may deploy; this lets every local user
    /// deploy, with that user's file permissions (see docs/SECURITY.md).
    #[arg(long)]
    allow_other_users: bool,
    /// Register CLOUD_PROG/CLOUD_VERS (TCP, our port) with the local rpcbind
    /// at start and unset it at a clean stop, so `rpcinfo -p` lists the server
    /// and clnt_create(host, PROG, VERS, "tcp") finds it.
    #[arg(long)]
    register: bool,
    /// Serve the live page (nodes, queue, recent transitions) at this
    /// loopback address, IP:PORT (port 0 picks a free one; the log shows it).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// As root, accept slurm:PARTITION lines: their replicas run under
    /// Slurm as root, for whoever deploys (see docs/SLURM.md). Without it a
    /// root server refuses them; run the server as an unprivileged user.
    #[arg(long)]
    slurm_as_root: bool,
    /// Shared secret of the node links (chmod 600; at least 16 bytes): the
    /// main server proves it to each remote node and checks theirs. Needed
    /// for nodes and a `--listen` off loopback.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// TCP congestion control of this server's ends of its connections
    /// (clients, node links; also for `cloud-server node`): auto (toward a
    /// peer on a loopback address, CUBIC or else Reno where the system's
    /// default is BBR, which without the fq qdisc paces every socket with a
    /// timer; the system's default otherwise, this host's other addresses
    /// included), system, or a name, for all of them. The `cloud` program's
    /// end always follows auto.
    #[arg(long, value_name = "auto|system|NAME", default_value = "auto", global = true)]
    tcp_congestion: cloudinfra::congestion::Policy,
    #[command(flatten)]
    job: JobFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run one node alone, serving NODE_PROG to the main server that
    /// connects to it (a `HOST:PORT` line of its nodes file).
    Node(NodeArgs),
}

/// `cloud-server node --listen HOST:PORT`: its port names the node
/// (`output_PORT/` under the work dir).
#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// Address the main server connects to, IP:PORT. Without
    /// --secret-file it must be a loopback address (127.x.x.x, ::1).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Where the node's workspaces (output_PORT/) live; one server or node per work dir.
    #[arg(long, value_name = "DIR", default_value = "work")]
    work_dir: PathBuf,
    /// Shared secret of the node link, the main server's --secret-file
    /// (chmod 600): orders are taken only from a main server that proves it.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Replicas the node may run at once (as `slots=K` on its nodes file
    /// line; 1 to 256).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(cloudinfra::config::MAX_SLOTS)))]
    slots: u32,
    #[command(flatten)]
    job: JobFlags,
}

/// How replicas run: limits, identities, containment (the main server's
/// local nodes and a `cloud-server node` alike).
#[derive(clap::Args, Debug, Clone)]
struct JobFlags {
    /// Largest archive a deploy may send.
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    max_archive: u64,
    /// Total bytes an archive may unpack to (stops gzip bombs early).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    max_extract: u64,
    /// Entries (files + directories) an archive may hold.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_entries: usize,
    /// Longest path inside an archive, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    max_path: usize,
    /// Wall-clock seconds a replica may run before SIGTERM to all its processes.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    time_limit: u64,
    /// Seconds between that SIGTERM and SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    kill_grace: u64,
    /// CPU seconds per process (RLIMIT_CPU; SIGXCPU when exceeded).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    max_cpu: u64,
    /// Address space per process (RLIMIT_AS); with cgroups (see the ready
    /// line) also the memory of all a replica's processes together.
    #[arg(long, value_name = "BYTES", default_value = "2G", value_parser = parse_size)]
    max_memory: u64,
    /// Open files per process (RLIMIT_NOFILE).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_open_files: u64,
    /// Largest file a replica may write (RLIMIT_FSIZE; SIGXFSZ when exceeded).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    max_file_size: u64,
    /// Processes of one job: its cgroup's pids limit where there are cgroups, and RLIMIT_NPROC where its uid is its own (slot uids; without root on Linux 5.14+).
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_procs: u64,
    /// Captured output kept per replica; the rest is dropped after a marker line.
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_size)]
    max_output: u64,
    /// When root and slot uids are off: the user replicas run as.
    #[arg(long, value_name = "USER", default_value = "nobody")]
    run_as: String,
    /// When root: each node slot runs replicas as a uid and gid of its own,
    /// BASE, BASE+1, ... in node order (node i slot s: BASE + the slots of
    /// nodes before i + s; no passwd entry needed). Without this option the
    /// first free block from 61000 up is taken (another server's block, or
    /// host accounts, are skipped); with it, exactly BASE or a refusal.
    #[arg(long, value_name = "BASE")]
    slot_uids: Option<u32>,
    /// Run every node's replicas as --run-as instead of per-node slot uids.
    #[arg(long)]
    no_slot_uids: bool,
    /// Let replicas use the host network (default: an empty network namespace).
    #[arg(long)]
    allow_network: bool,
    /// Size of each replica's private /tmp, /var/tmp and /dev/shm (tmpfs).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    max_tmp: u64,
    /// Size of each replica's workspace (a tmpfs: its disk quota).
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_size)]
    max_disk: u64,
    /// Run jobs NOT contained (no namespaces: a job can see and signal what
    /// its uid may, and its processes may outlive it). Needed where neither
    /// root nor unprivileged user namespaces are available.
    #[arg(long)]
    uncontained: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size (use e.g. 4096, 64K, 16M, 2G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// Make sure descriptors 0, 1 and 2 are open (on /dev/null if they were
/// closed), so no socket or pipe of ours ever lands on them.
fn hold_standard_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries a descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // The lowest free descriptor is the one just found closed; it
            // stays open for the life of the process.
            if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                std::mem::forget(null);
            }
        }
    }
}

fn main() -> ExitCode {
    // A slot launcher re-executed small (launcher.rs) never gets past this.
    if let Some(code) = cloudinfra::launcher::main_if_launcher() {
        return code;
    }
    hold_standard_fds();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's several lines as one, like every other error of ours.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .map(|l| l.strip_prefix("error: ").unwrap_or(l))
                .collect();
            eprintln!("cloud-server: {} (see --help)", parts.join("; "));
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("cloud-server: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Who each node's replicas run as.
struct Identities {
    /// One per slot, node by node (`NodesFile::slot_offset`).
    per_node: Vec<Option<(Uid, Gid)>>,
    /// Each node has a uid of its own.
    slot_uids: bool,
    /// For the ready line.
    summary: String,
    /// The slot uids' locks, held until the process ends.
    _locks: Vec<Flock<File>>,
}

/// Where slot uid blocks are looked for without `--slot-uids`.
const DEFAULT_SLOT_BASE: u32 = 61000;
/// Blocks tried from there before giving up.
const SLOT_BLOCKS_TRIED: u32 = 64;

fn identities(job: &JobFlags, n: usize) -> Result<Identities, String> {
    if n == 0 {
        // Only remote and Slurm nodes: no replica is forked here.
        let summary = "no node of this process forks replicas".into();
        return Ok(Identities { per_node: Vec::new(), slot_uids: false, summary, _locks: Vec::new() });
    }
    if !Uid::effective().is_root() {
        let me = in_child(|| User::from_uid(Uid::effective()).ok().flatten().map_or("this user".into(), |u| u.name))
            .unwrap_or_else(|_| "this user".into());
        let summary = if job.uncontained {
            format!("not root: replicas run as {me}, without slot uids, RLIMIT_NPROC or network isolation")
        } else {
            format!("not root: replicas run as {me} (uid 0 of a user namespace, no capabilities), without slot uids")
        };
        return Ok(Identities { per_node: vec![None; n], slot_uids: false, summary, _locks: Vec::new() });
    }
    if job.no_slot_uids {
        let found = in_child(|| match User::from_name(&job.run_as) {
            Ok(Some(u)) => format!("{} {} {}", u.uid, u.gid, u.name),
            Ok(None) => format!("---run-as user '{}' does not exist: create it or pick another", job.run_as),
            Err(e) => format!("-cannot look up --run-as user '{}': {e}", job.run_as),
        })?;
        if let Some(why) = found.strip_prefix('-') {
            return Err(why.to_string());
        }
        let mut words = found.splitn(3, ' ');
        let mut id = || words.next().and_then(|w| w.parse::<u32>().ok());
        let (Some(uid), Some(gid)) = (id(), id()) else {
            return Err(format!("cannot look up --run-as user '{}': a garbled answer", job.run_as));
        };
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        if uid.is_root() {
            return Err("--run-as must not be root: replicas run code the server did not write".into());
        }
        let summary = format!("replicas run as {} (uid {uid})", job.run_as);
        let per_node = vec![Some((uid, gid)); n];
        return Ok(Identities { per_node, slot_uids: false, summary, _locks: Vec::new() });
    }
    // The operator's base, or the first usable block from the default up
    // (two servers on one host then never share a slot uid by accident).
    let (bases, explicit): (Vec<u32>, bool) = match job.slot_uids {
        Some(base) => (vec![base], true),
        None => ((0..SLOT_BLOCKS_TRIED).map(|k| DEFAULT_SLOT_BASE + k * n.max(1) as u32).collect(), false),
    };
    let mut why = String::new();
    for base in bases {
        match slot_block(base, n) {
            Ok(locks) => {
                let ids = (0..n as u32).map(|i| Some((Uid::from_raw(base + i), Gid::from_raw(base + i)))).collect();
                let summary = format!("replicas run as slot uids {}..{}", base, base + n as u32 - 1);
                return Ok(Identities { per_node: ids, slot_uids: true, summary, _locks: locks });
            }
            Err(e) if explicit => return Err(format!("{e}: pick another --slot-uids base")),
            Err(e) => {
                log::info!("{e}; taking the next block of slot uids");
                why = e;
            }
        }
    }
    Err(format!(
        "no free block of {n} slot uids from {DEFAULT_SLOT_BASE} up (last: {why}); pick one with --slot-uids BASE"
    ))
}

/// Run a user or group lookup in a short-lived child and return what it
/// printed. The name service (nsswitch.conf's modules: libnss_systemd and
/// what it pulls in, LDAP, ...) is loaded into that child only, never into
/// the server, which would carry those libraries for its whole life (about
/// 0.4 MiB of its resident memory) for a few lookups at start.
fn in_child(lookup: impl FnOnce() -> String) -> Result<String, String> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, pipe, ForkResult};
    let (read_end, write_end) = pipe().map_err(|e| format!("cannot look up users: pipe: {e}"))?;
    // SAFETY: the server is one thread at start, so the child may call
    // anything (malloc, the name service) before it exits.
    match unsafe { fork() }.map_err(|e| format!("cannot look up users: fork: {e}"))? {
        ForkResult::Child => {
            drop(read_end);
            let answer = lookup();
            let ok = File::from(write_end).write_all(answer.as_bytes()).is_ok();
            // SAFETY: _exit ends the child without running the parent's
            // exit handlers or flushing its buffers a second time.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut answer = String::new();
            let read = File::from(read_end).read_to_string(&mut answer);
            match (read, waitpid(child, None)) {
                (Ok(_), Ok(WaitStatus::Exited(_, 0))) => Ok(answer),
                (read, status) => Err(format!("cannot look up users: the lookup ended with {status:?} ({read:?})")),
            }
        }
    }
}

/// Check and lock slot uids `base..base + n`: they must belong to no host
/// account and to no other server here.
fn slot_block(base: u32, n: usize) -> Result<Vec<Flock<File>>, String> {
    if base == 0 || base.checked_add(n as u32).is_none() {
        return Err(format!("--slot-uids {base} is not a usable uid base"));
    }
    // Slot uids and gids must belong to nobody on this host: replicas run
    // as them (a user's files, a group such as shadow's, would be the
    // job's), and every start kills whatever runs as them.
    let taken = in_child(|| {
        (base..base + n as u32)
            .find_map(|id| match (User::from_uid(Uid::from_raw(id)), nix::unistd::Group::from_gid(Gid::from_raw(id))) {
                (Ok(Some(u)), _) => Some(format!("uid {id} is user {}'s", u.name)),
                (_, Ok(Some(g))) => Some(format!("gid {id} is group {}'s", g.name)),
                _ => None,
            })
            .unwrap_or_default()
    })?;
    if !taken.is_empty() {
        return Err(format!(
            "--slot-uids {base}: {taken}; slot uids must be unused (replicas run as them, and each start kills their processes)"
        ));
    }
    lock_slot_uids(base, n)
}

/// Lock `path` exclusively without waiting, and write our pid into it.
/// `Err` holds the pid written by the process that holds it (0: unknown).
fn lock_file(path: &Path) -> Result<Flock<File>, io::Result<u32>> {
    // Never through a symbolic link someone else planted.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let file = file.map_err(Err)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            let _ = held.set_len(0).and_then(|_| writeln!(&mut *held, "{}", std::process::id()));
            Ok(held)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(Ok(text.trim().parse().unwrap_or(0)))
        }
        Err((_, e)) => Err(Err(e.into())),
    }
}

/// One server per work dir: a second one would remove the first one's
/// workspaces and spool, and issue its ticket numbers again.
fn lock_work_dir(dir: &Path) -> Result<Flock<File>, String> {
    // 0755 whatever the umask (002 would make it group-writable, and refused).
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(|e| {
        format!("cannot create work dir {}: {e} (pick one you can write with --work-dir)", dir.display())
    })?;
    safe_work_dir(dir).map_err(|e| {
        format!("work dir {}: {e}: another user could plant links there (pick another --work-dir)", dir.display())
    })?;
    lock_file(&dir.join("server.lock")).map_err(|e| match e {
        Ok(pid) => format!(
            "work dir {} is in use by another cloud-server (pid {pid}): stop it or pick another --work-dir",
            dir.display()
        ),
        Err(e) => format!("cannot lock work dir {}: {e} (pick one you can write with --work-dir)", dir.display()),
    })
}

/// The work dir and the path to it must be out of other users' reach: the
/// server (often root) writes the ticket counter, the spool and outputs
/// there, and removes workspaces. A directory another user made first (in
/// /tmp, or `work` of a shared cwd), or one in a directory another user
/// may rename it out of, would let them plant links that the server
/// follows. So: no symbolic link on the way that is not root's or ours;
/// the work dir ours and not writable by group or others; every directory
/// above it root's or ours, and writable by others only if sticky (/tmp).
fn safe_work_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = Uid::effective().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let abs = std::path::absolute(dir).map_err(|e| e.to_string())?;
    let mut at = PathBuf::new();
    for part in abs.components() {
        at.push(part);
        let meta = std::fs::symlink_metadata(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        if meta.file_type().is_symlink() && !trusted(meta.uid()) {
            return Err(format!("{} is a symbolic link of uid {}", at.display(), meta.uid()));
        }
    }
    let real = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} belongs to uid {} with mode {:o}; it must be uid {me}'s and not writable by group or others",
            real.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    for up in real.ancestors().skip(1) {
        let meta = std::fs::metadata(up).map_err(|e| format!("{}: {e}", up.display()))?;
        let sticky = meta.mode() & 0o1000 != 0;
        if !trusted(meta.uid()) || (meta.mode() & 0o022 != 0 && !sticky) {
            return Err(format!(
                "{} above it belongs to uid {} with mode {:o}",
                up.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Create `dir` (mode 0700) or check that the one there is a directory of
/// ours that nobody else may write: in a world-writable parent such as
/// /tmp another user could have made it first, to plant links or hold locks.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        Err(_) => {}
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != Uid::effective().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "it is not a directory of uid {} closed to others (remove it and start again)",
            Uid::effective()
        )));
    }
    Ok(())
}

/// Two servers must never share a slot uid: each kills and reclaims
/// whatever runs under its slot uids.
fn lock_slot_uids(base: u32, n: usize) -> Result<Vec<Flock<File>>, String> {
    let mut dir = PathBuf::from("/run/cloudinfra");
    if private_dir(&dir).is_err() {
        dir = std::env::temp_dir().join("cloudinfra-locks");
        private_dir(&dir).map_err(|e| format!("cannot use lock directory {}: {e}", dir.display()))?;
    }
    (0..n as u32)
        .map(|i| {
            let uid = base + i;
            lock_file(&dir.join(format!("slot-{uid}.lock"))).map_err(|e| match e {
                Ok(pid) => {
                    match pid {
                        // Locked, its pid not written yet (starting this instant).
                        0 => format!("slot uid {uid} is in use by another cloud-server"),
                        pid => format!("slot uid {uid} is in use by cloud-server pid {pid}"),
                    }
                }
                Err(e) => format!("cannot lock slot uid {uid} in {}: {e}", dir.display()),
            })
        })
        .collect()
}

/// The main server, or with `cloud-server node` one node alone.
fn run(args: Args) -> Result<(), String> {
    if let Some(addr) = args.http.filter(|a| !a.ip().is_loopback()) {
        return Err(format!("--http {addr}: the live page is served on loopback only; use 127.0.0.1:PORT"));
    }
    let congestion = cloudinfra::congestion::choose(&args.tcp_congestion)?;
    let (nodes, nodes_path, listen, work_dir, job, alone) = match &args.command {
        Some(Command::Node(n)) => {
            let spec = NodeSpec { kind: NodeKind::Local { port: n.listen.port() }, slots: n.slots, line: 1 };
            (
                NodesFile { nodes: vec![spec] },
                PathBuf::from("--listen"),
                n.listen,
                n.work_dir.clone(),
                n.job.clone(),
                true,
            )
        }
        None => {
            let nodes = NodesFile::load(&args.nodes)?;
            (nodes, args.nodes.clone(), args.listen, args.work_dir.clone(), args.job.clone(), false)
        }
    };
    let secret_file = match &args.command {
        Some(Command::Node(n)) => n.secret_file.as_deref(),
        None => args.secret_file.as_deref(),
    };
    let secret = secret_file.map(cloudinfra::node_auth::load_secret).transpose()?;
    // Off loopback only with a secret (issue 9), before anything is locked or started.
    cloudinfra::node_auth::check_bind(listen, secret.is_some())?;
    // One identity per slot of the nodes run here, node by node.
    let local_slots: usize =
        nodes.nodes.iter().filter(|s| matches!(s.kind, NodeKind::Local { .. })).map(|s| s.slots as usize).sum();
    let ids = identities(&job, local_slots)?;
    // Held until the process ends; emptied at a clean stop (below).
    let work_lock = lock_work_dir(&work_dir)?;
    // `ids._locks` (the slot uids') are held until the process ends, too.
    let root = Uid::effective().is_root();
    let containment = match (job.uncontained, root) {
        (true, _) => Containment::Uncontained,
        (false, true) => Containment::Namespaces,
        (false, false) => Containment::UserNamespace,
    };
    let isolate_network = (root || containment != Containment::Uncontained) && !job.allow_network;
    let net = if isolate_network { "network isolated (loopback only)" } else { "host network" };
    let contained = match containment {
        Containment::Namespaces if isolate_network => "replicas contained: pid+mount+ipc+net namespaces",
        Containment::Namespaces => "replicas contained: pid+mount+ipc namespaces",
        Containment::UserNamespace if isolate_network => "replicas contained: user+pid+mount+ipc+net namespaces",
        Containment::UserNamespace => "replicas contained: user+pid+mount+ipc namespaces",
        Containment::Uncontained => "jobs are NOT contained (--uncontained): no namespaces, daemons may outlive jobs",
    };
    // Without root a replica has this server user's file permissions: keep
    // it to that user's own jobs unless told otherwise.
    let me = Uid::effective().as_raw();
    let only_deployer = (!root && !args.allow_other_users).then_some(me);
    if !root && args.allow_other_users && job.allow_network {
        // A job's socket would belong to this server's user: it could
        // retrieve and close every ticket that user deployed.
        return Err("--allow-other-users with --allow-network needs root: a job could act as this server's user toward it; drop one of them or run as root".into());
    }
    let who_deploys = match only_deployer {
        Some(uid) => format!("; jobs taken only from uid {uid}, this server's user (--allow-other-users opens it)"),
        None if !root => "; jobs taken from every user, run with this server user's permissions".into(),
        None => String::new(),
    };
    let nproc_per_userns = containment == Containment::UserNamespace && cloudinfra::spawn::nproc_per_user_namespace();
    let host_fs = match containment {
        Containment::Uncontained => "",
        _ if cloudinfra::spawn::host_read_only_available() => ", host file system read-only",
        _ => ", host file system read-only at / only (this kernel lacks mount_setattr, Linux 5.12)",
    };
    let cfg = ServerConfig {
        nodes_path,
        nodes,
        listen,
        work_dir,
        max_queue: args.max_queue,
        max_tickets_per_user: args.max_tickets_per_user,
        max_archive: job.max_archive,
        limits: JobLimits {
            extract: ExtractLimits { max_bytes: job.max_extract, max_entries: job.max_entries, max_path: job.max_path },
            cpu_seconds: job.max_cpu,
            address_space: job.max_memory,
            open_files: job.max_open_files,
            file_size: job.max_file_size,
            processes: (root || nproc_per_userns).then_some(job.max_procs),
            // Only where the uid is the replica's alone: slot uids, or a user
            // namespace per replica where the kernel counts per namespace
            // (the server turns it on for a shared uid without cgroups).
            nproc_rlimit: ids.slot_uids || nproc_per_userns,
            tmp_bytes: job.max_tmp,
            disk_bytes: job.max_disk,
        },
        time_limit: Duration::from_secs(job.time_limit),
        kill_grace: Duration::from_secs(job.kill_grace),
        max_output: job.max_output,
        ticket_ttl: (args.ticket_ttl > 0).then(|| Duration::from_secs(args.ticket_ttl)),
        identities: ids.per_node,
        slot_uids: ids.slot_uids,
        isolate_network,
        containment,
        requeue_lost: args.requeue_lost,
        slurm_as_root: args.slurm_as_root,
        sandbox_summary: format!("{contained}{host_fs}; {}, {net}{who_deploys}", ids.summary),
        only_deployer,
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        call_timeout: Duration::from_secs(args.call_timeout),
        http: args.http,
        secret,
        congestion,
    };
    // Each client holds a socket; let the server use all it may.
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut server = if alone { Server::start_node(cfg)? } else { Server::start(cfg)? };
    // Blocking calls with a short timeout, before serving and after: see `portmap`.
    let prog = (cloudinfra::proto::CLOUD_PROG, cloudinfra::proto::CLOUD_VERS);
    let registered = args.register
        && !alone
        && match portmap::register_at(portmap::RPCBIND, prog.0, prog.1, server.local_addr().port()) {
            Ok(()) => {
                log::info!("registered program {} version {} with rpcbind", prog.0, prog.1);
                true
            }
            Err(line) => {
                eprintln!("cloud-server: {line}");
                false
            }
        };
    eprintln!("{}", server.ready_line());
    let served = server.run().map_err(|e| format!("the reactor failed: {e}"));
    if registered {
        if let Err(line) = portmap::unregister_at(portmap::RPCBIND, prog.0, prog.1) {
            eprintln!("cloud-server: {line}");
        }
    }
    served?;
    // Its pid no longer names a server of this work dir: `kill $(cat
    // server.lock)` must not reach whatever process gets the pid next.
    // (Still locked: a server starting now waits for the exit, not for this.)
    let _ = work_lock.set_len(0);
    eprintln!("cloud-server: stopped; every replica killed and reaped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn lock_dirs_must_be_ours_and_closed_to_others() {
        let top = tempfile::tempdir().unwrap();
        let fresh = top.path().join("fresh");
        private_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        private_dir(&fresh).expect("ours, again");
        // Planted by someone else in a shared /tmp: a link, or a dir others may write.
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link).is_err(), "a symbolic link is refused");
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&open).is_err(), "a world-writable dir is refused");
        // A lock file that is a symbolic link is not followed.
        std::os::unix::fs::symlink(top.path().join("victim"), fresh.join("slot-1.lock")).unwrap();
        assert!(lock_file(&fresh.join("slot-1.lock")).is_err());
        assert!(!top.path().join("victim").exists());
    }

    #[test]
    fn a_work_dir_within_other_users_reach_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let ours = top.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        safe_work_dir(&ours).expect("a dir of ours in a tempdir");
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = safe_work_dir(&open).unwrap_err();
        assert!(e.contains("not writable by group or others"), "{e}");
        // Inside a directory others may write (no sticky bit): refused.
        let inner = open.join("work");
        std::fs::create_dir(&inner).unwrap();
        let e = safe_work_dir(&inner).unwrap_err();
        assert!(e.contains("above it"), "{e}");
        // Sticky, as /tmp: fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        safe_work_dir(&inner).expect("under a sticky dir");
    }
}
