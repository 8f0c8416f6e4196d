//! Control groups: memory and process limits that count a whole job
//! (every process it forks), and a kill path that does not depend on
//! finding the processes one by one. A contained replica runs in its
//! slot's group (made once per node slot, joined once by the slot's
//! launcher, inherited by every replica it starts: no attach per replica);
//! an `--uncontained` one in a group of its own.
//!
//! Owns: detecting which cgroup hierarchy the host offers (v2 with the
//! memory and pids controllers, or v1 with both mounted), the server's own
//! parent group `cloudinfra-<tag>` in it, child groups (one per slot, or
//! per uncontained replica) with their limits, joining a group (from a forked child, through descriptors
//! opened before the fork), killing everything in a group, telling whether
//! the kernel's OOM killer acted in it, removing groups, and reclaiming the
//! groups an earlier run left behind.
//! Must not touch: namespaces, process setup or the reactor; the caller
//! decides when a replica gets a group and when it goes.
//!
//! The parsing of `/proc/self/mountinfo` and `/proc/self/cgroup` is plain
//! code over strings (unit-tested); everything else is a few small writes
//! to cgroupfs, which the kernel answers at once.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Which cgroup interface the limits go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The unified hierarchy: one directory per group.
    V2,
    /// Legacy hierarchies: one directory per group in `memory` and in `pids`.
    V1,
}

/// The limits of one replica's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory of every process of the replica together (swap included where
    /// the host accounts for it), bytes.
    pub memory: u64,
    /// Processes (and threads) alive at once.
    pub pids: u64,
}

/// The hierarchy found at start and this server's parent group in it.
#[derive(Debug, Clone)]
pub struct Cgroups {
    flavor: Flavor,
    /// The server's parent group in each hierarchy used (v2: one; v1: memory, pids).
    parents: Vec<PathBuf>,
}

/// One replica's group.
#[derive(Debug)]
pub struct Cgroup {
    flavor: Flavor,
    /// The group's directory in each hierarchy (same order as `Cgroups::parents`).
    dirs: Vec<PathBuf>,
}

/// A mounted cgroup hierarchy, from one line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// Where it is mounted.
    point: PathBuf,
    /// Which part of the hierarchy is visible there ("/" unless a cgroup namespace or bind mount).
    root: String,
    v2: bool,
    /// v1 controllers (from the super options), e.g. ["memory"].
    controllers: Vec<String>,
}

/// Parse `/proc/self/mountinfo` for cgroup and cgroup2 mounts.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (root, point) = (unescape(left[3]), unescape(left[4]));
        match right[0] {
            "cgroup2" => out.push(Mount { point: point.into(), root, v2: true, controllers: Vec::new() }),
            "cgroup" => {
                let controllers =
                    right[2].split(',').filter(|o| !matches!(*o, "rw" | "ro")).map(String::from).collect();
                out.push(Mount { point: point.into(), root, v2: false, controllers });
            }
            _ => {}
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `/proc/self/cgroup`: the process's group path in the v2 hierarchy
/// (`0::/path`) and in each v1 hierarchy, by controller.
fn parse_self_cgroup(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut v2 = None;
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                v1.push((c.to_string(), path.to_string()));
            }
        }
    }
    (v2, v1)
}

/// The directory of group `path` (as /proc/self/cgroup names it) under a mount.
fn dir_of(m: &Mount, path: &str) -> PathBuf {
    let rel = path.strip_prefix(m.root.trim_end_matches('/')).unwrap_or(path);
    m.point.join(rel.trim_start_matches('/'))
}

/// Where this server's parent group goes in each hierarchy, if the host has
/// what we need: v2 with memory and pids available, else v1 with both
/// controllers mounted. `v2_controllers(dir)` reads a v2 group's
/// `cgroup.controllers`.
fn plan(
    mounts: &[Mount],
    self_cgroup: &str,
    v2_controllers: impl Fn(&Path) -> Option<String>,
) -> Result<(Flavor, Vec<PathBuf>), String> {
    let (v2_path, v1_paths) = parse_self_cgroup(self_cgroup);
    if let (Some(m), Some(_)) = (mounts.iter().find(|m| m.v2), v2_path.as_ref()) {
        // The root of the hierarchy is exempt from the rule that a group
        // with processes cannot delegate controllers, so our groups hang
        // directly below it.
        let root = m.point.clone();
        if let Some(ctrls) = v2_controllers(&root) {
            let has = |c: &str| ctrls.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                return Ok((Flavor::V2, vec![root]));
            }
        }
    }
    let mut dirs = Vec::new();
    for ctrl in ["memory", "pids"] {
        let m = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))
            .ok_or_else(|| format!("no cgroup v2 with memory+pids and no cgroup v1 '{ctrl}' hierarchy is mounted"))?;
        let own = v1_paths.iter().find(|(c, _)| c == ctrl).map_or("/", |(_, p)| p.as_str());
        dirs.push(dir_of(m, own));
    }
    Ok((Flavor::V1, dirs))
}

impl Cgroups {
    /// Find the host's cgroups and create (or reuse) this server's parent
    /// group `cloudinfra-<tag>`. The error says why not (the host has no
    /// usable memory+pids cgroups, or we may not create groups there).
    pub fn detect(tag: &str) -> Result<Cgroups, String> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mounts = parse_mountinfo(&mountinfo);
        let (flavor, bases) = plan(&mounts, &own, |d| fs::read_to_string(d.join("cgroup.controllers")).ok())?;
        if flavor == Flavor::V2 {
            // The root may offer the controllers without handing them down
            // yet (a host without systemd): best effort, checked below.
            let _ = write_file(&bases[0].join("cgroup.subtree_control"), "+memory +pids");
        }
        let name = format!("cloudinfra-{tag}");
        let parents: Vec<PathBuf> = bases.iter().map(|b| b.join(&name)).collect();
        for p in &parents {
            match fs::create_dir(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create cgroup {}: {e}", p.display())),
            }
        }
        if flavor == Flavor::V2 {
            write_file(&parents[0].join("cgroup.subtree_control"), "+memory +pids")
                .map_err(|e| format!("cannot enable memory and pids in {}: {e}", parents[0].display()))?;
        }
        Ok(Cgroups { flavor, parents })
    }

    /// For the ready line, e.g. "cgroup v1 (memory, pids)".
    pub fn describe(&self) -> String {
        match self.flavor {
            Flavor::V2 => format!("cgroup v2 (memory, pids) under {}", self.parents[0].display()),
            Flavor::V1 => format!("cgroup v1 (memory, pids) under {}", self.parents[0].display()),
        }
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Create the group `name` (e.g. "9001-17") with these limits. An old
    /// group of that name (an earlier run's) is emptied and reused.
    pub fn create(&self, name: &str, limits: CgroupLimits) -> io::Result<Cgroup> {
        let dirs: Vec<PathBuf> = self.parents.iter().map(|p| p.join(name)).collect();
        for d in &dirs {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let group = Cgroup { flavor: self.flavor, dirs };
        group.kill_all();
        group.set_limits(limits)?;
        Ok(group)
    }

    /// Kill and remove every group an earlier run of this server left.
    /// Returns how many processes were killed and groups removed; groups
    /// still busy (processes dying) stay and are reused by `create`.
    pub fn reclaim(&self) -> (usize, usize) {
        let mut killed = 0;
        let mut removed = 0;
        let Ok(entries) = fs::read_dir(&self.parents[0]) else { return (0, 0) };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name();
            let group = Cgroup { flavor: self.flavor, dirs: self.parents.iter().map(|p| p.join(&name)).collect() };
            killed += group.kill_all();
            if group.remove().is_ok() {
                removed += 1;
            }
        }
        (killed, removed)
    }
}

impl Cgroups {
    /// Server shutdown, once its groups are gone: remove its parent group
    /// too. Each work dir has a parent of its own, so without this every
    /// server ever started on a new work dir would leave one. A parent
    /// still holding a busy group stays, for the next start on this work
    /// dir to reclaim. True if every parent went.
    pub fn remove_parents(&self) -> bool {
        // Every one tried, whatever the others did.
        self.parents.iter().filter(|p| fs::remove_dir(p).is_err()).count() == 0
    }
}

impl Cgroup {
    fn set_limits(&self, limits: CgroupLimits) -> io::Result<()> {
        let memory = limits.memory.to_string();
        let pids = limits.pids.to_string();
        match self.flavor {
            Flavor::V2 => {
                let d = &self.dirs[0];
                write_file(&d.join("memory.max"), &memory)?;
                // No swap: a job's memory is what it touches.
                let _ = write_file(&d.join("memory.swap.max"), "0");
                write_file(&d.join("pids.max"), &pids)
            }
            Flavor::V1 => {
                let (mem, pid) = (&self.dirs[0], &self.dirs[1]);
                // memsw must stay >= the memory limit: lower it second when
                // shrinking, first when growing. Try both orders.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                let _ = write_file(&memsw, &memory);
                write_file(&mem.join("memory.limit_in_bytes"), &memory)?;
                let _ = write_file(&memsw, &memory);
                write_file(&pid.join("pids.max"), &pids)
            }
        }
    }

    /// Descriptors of the files a process writes "0" to in order to join
    /// this group; open them before forking, write them in the child with
    /// [`join`].
    pub fn open_join(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                use std::os::unix::fs::OpenOptionsExt;
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// SIGKILL every process in the group (v2: `cgroup.kill` where the
    /// kernel has it). Returns how many were signalled one by one.
    pub fn kill_all(&self) -> usize {
        if self.flavor == Flavor::V2 && write_file(&self.dirs[0].join("cgroup.kill"), "1").is_ok() {
            return 0;
        }
        let mut n = 0;
        for pid in self.pids() {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// SIGKILL every process in the group but `spare` (a slot's group:
    /// its launcher stays). Never `cgroup.kill`, which would take the
    /// launcher too. Returns how many were signalled.
    pub fn kill_all_but(&self, spare: Pid) -> usize {
        let mut n = 0;
        for pid in self.pids().into_iter().filter(|&p| p != spare.as_raw()) {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// The processes in the group now.
    pub fn pids(&self) -> Vec<i32> {
        let text = fs::read_to_string(self.dirs[0].join("cgroup.procs")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Did the kernel's OOM killer kill a process of this group?
    pub fn oom_killed(&self) -> bool {
        self.oom_kill_count() > 0
    }

    /// How many processes of this group the kernel's OOM killer has killed
    /// so far (a slot's group lives on: compare a replica's start and end).
    pub fn oom_kill_count(&self) -> u64 {
        let file = match self.flavor {
            Flavor::V2 => "memory.events",
            Flavor::V1 => "memory.oom_control",
        };
        // One read of a small buffer: the file is a few lines (no stat for
        // a size hint, no reads of 32 bytes at a time).
        let mut buf = [0u8; 512];
        let mut len = 0;
        if let Ok(mut f) = fs::File::open(self.dirs[0].join(file)) {
            while len < buf.len() {
                match f.read(&mut buf[len..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) if len + n < buf.len() && buf[len + n - 1] == b'\n' => {
                        len += n; // all of it: a kernfs file is read whole
                        break;
                    }
                    Ok(n) => len += n,
                }
            }
        }
        oom_kills(&String::from_utf8_lossy(&buf[..len]))
    }

    /// Remove the group; `Err(self)` while processes are still leaving it
    /// (try again later).
    pub fn remove(self) -> Result<(), Cgroup> {
        let mut busy = false;
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => busy = true,
            }
        }
        if busy {
            Err(self)
        } else {
            Ok(())
        }
    }

    /// The group's directory (the first hierarchy's), for messages.
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }
}

/// The `oom_kill N` count of memory.events (v2) or memory.oom_control (v1).
fn oom_kills(text: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Join a group in a forked child: write "0" (this process) to each
/// descriptor from [`Cgroup::open_join`]. Only system calls, no allocation.
pub fn join(fds: &[OwnedFd]) -> nix::Result<()> {
    for fd in fds {
        nix::unistd::write(fd, b"0")?;
    }
    Ok(())
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// A short stable tag for a work dir, so a restarted server finds the groups
/// its earlier run left (FNV-1a of the canonical path).
pub fn tag_for(work_dir: &Path) -> String {
    let path = fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/2cb1\n0::/\n";

    #[test]
    fn hybrid_host_without_v2_controllers_uses_v1_under_our_own_groups() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 4);
        let (flavor, dirs) = plan(&mounts, HYBRID_SELF, |_| Some("hugetlb\n".into())).unwrap();
        assert_eq!(flavor, Flavor::V1);
        assert_eq!(
            dirs,
            vec![PathBuf::from("/sys/fs/cgroup/memory/process_api/2cb1"), PathBuf::from("/sys/fs/cgroup/pids")]
        );
    }

    #[test]
    fn unified_host_with_memory_and_pids_uses_v2_at_the_root() {
        let info = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/user.slice/user-1000.slice/session-2.scope\n";
        let (flavor, dirs) = plan(&parse_mountinfo(info), own, |_| Some("cpuset cpu io memory pids".into())).unwrap();
        assert_eq!((flavor, dirs), (Flavor::V2, vec![PathBuf::from("/sys/fs/cgroup")]));
    }

    #[test]
    fn no_usable_hierarchy_is_a_reason_not_a_panic() {
        let info = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let err = plan(&parse_mountinfo(info), "0::/\n", |_| Some("cpu io".into())).unwrap_err();
        assert!(err.contains("memory"), "{err}");
        assert!(plan(&[], "", |_| None).is_err());
    }

    #[test]
    fn a_namespaced_mount_root_is_stripped_from_our_path() {
        let m =
            Mount { point: "/sys/fs/cgroup/memory".into(), root: "/docker/abc".into(), v2: false, controllers: vec![] };
        assert_eq!(dir_of(&m, "/docker/abc/x"), PathBuf::from("/sys/fs/cgroup/memory/x"));
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn oom_kill_counts_are_read_from_either_file() {
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"), 3);
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"), 1);
        assert_eq!(oom_kills("oom_kill_disable 0\n"), 0);
    }

    /// On a host with cgroups, as root: a forked child joins a group, the
    /// group sees it, kill_all ends it, the group goes away.
    #[test]
    fn a_child_joins_is_killed_through_the_group_and_the_group_is_removed() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root to create cgroups");
            return;
        }
        let groups = match Cgroups::detect(&format!("unittest-{}", std::process::id())) {
            Ok(g) => g,
            Err(why) => {
                assert!(std::env::var("CI").is_err(), "CI hosts have cgroups: {why}");
                eprintln!("SKIPPED: {why}");
                return;
            }
        };
        let group = groups.create("probe", CgroupLimits { memory: 64 << 20, pids: 16 }).unwrap();
        let fds = group.open_join().unwrap();
        // SAFETY: the child only writes to pre-opened descriptors and pauses.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = i32::from(join(&fds).is_err());
                if code == 0 {
                    nix::unistd::pause();
                }
                // SAFETY: ends the test's child without running the harness's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(fds);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !group.pids().contains(&child.as_raw()) {
            assert!(std::time::Instant::now() < deadline, "child never joined");
            std::thread::yield_now();
        }
        group.kill_all();
        let status = nix::sys::wait::waitpid(child, None).unwrap();
        assert!(matches!(status, nix::sys::wait::WaitStatus::Signaled(_, Signal::SIGKILL, _)), "{status:?}");
        assert!(!group.oom_killed());
        group.remove().expect("empty group is removed");
        for p in &groups.parents {
            fs::remove_dir(p).unwrap();
        }
    }
}
