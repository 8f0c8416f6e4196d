//! Test harness: a real `cloud-server` on free ports, the real client
//! programs, job archives built from strings, and a TCP "gate" that jobs
//! connect to so tests learn, by events, when a job really runs.
#![allow(dead_code)]

pub mod node_proc;
pub mod tarkit;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SERVER: &str = env!("CARGO_BIN_EXE_cloud-server");

/// The `cloud` client program under test: this build's, or the one
/// `CLOUD_TEST_CLIENT` names (`make test` runs the client's tests a second
/// time with the musl build of it: Makefile, README "The client program and musl").
pub fn client() -> &'static str {
    static CLIENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| match std::env::var("CLOUD_TEST_CLIENT") {
        Ok(path) if !path.is_empty() => path,
        _ => env!("CARGO_BIN_EXE_cloud").to_string(),
    })
}

pub struct Cluster {
    pub child: Child,
    pub addr: SocketAddr,
    pub ports: Vec<u16>,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<String>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
    /// The server's flags, for `restart`.
    args: Vec<std::ffi::OsString>,
}

type Started = (Child, SocketAddr, Arc<Mutex<String>>, std::thread::JoinHandle<()>);

/// Start `cloud-server` with `args` and wait for its ready line; `Err`:
/// the line it gave up with.
fn spawn_server(args: &[std::ffi::OsString], tweak: &dyn Fn(&mut Command)) -> Result<Started, String> {
    let mut cmd = Command::new(SERVER);
    cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    tweak(&mut cmd);
    let mut child = cmd.spawn().expect("spawn cloud-server");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    let mut got = String::new();
    // The ready line is the server's first line; an error line means it gave up.
    while lines.read_line(&mut first).unwrap_or(0) > 0 {
        if first.contains("listening on") || first.starts_with("cloud-server:") {
            got = first.clone();
            break;
        }
        first.clear();
    }
    if let Some(addr) = got.split("listening on ").nth(1).and_then(|r| r.split(' ').next()) {
        let addr: SocketAddr = addr.parse().expect("address in ready line");
        let log = Arc::new(Mutex::new(got.clone()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = lines.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        return Ok((child, addr, log, reader));
    }
    let _ = child.wait();
    Err(got)
}

fn free_ports(n: usize) -> Vec<u16> {
    // Hold all listeners at once so the kernel hands out distinct ports.
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    ls.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

impl Cluster {
    pub fn start(nodes: usize) -> Cluster {
        Self::start_with(nodes, &[])
    }

    /// Start a server with `nodes` nodes on free ports and extra flags.
    /// Retries if a port was taken between picking and binding.
    pub fn start_with(nodes: usize, extra: &[&str]) -> Cluster {
        Self::start_tweaked(nodes, extra, |_| {})
    }

    /// As `start_with`, with `tweak` applied to the server's command first
    /// (e.g. a `pre_exec` that lowers a resource limit).
    pub fn start_tweaked(nodes: usize, extra: &[&str], tweak: impl Fn(&mut Command)) -> Cluster {
        Self::start_full(&vec![1; nodes], extra, tweak)
    }

    /// As `start_with`, node i with `slots[i]` slots (`PORT slots=K` lines).
    pub fn start_slots(slots: &[u32], extra: &[&str]) -> Cluster {
        Self::start_full(slots, extra, |_| {})
    }

    /// As `start`, with the work dir on the build's disk (under
    /// `CARGO_TARGET_TMPDIR`) rather than in the temp dir, which may be a
    /// tmpfs: for what only a disk does (the journal's syncer).
    pub fn start_on_disk(nodes: usize) -> Cluster {
        ON_DISK.with(|d| d.set(true));
        let c = Self::start(nodes);
        ON_DISK.with(|d| d.set(false));
        c
    }

    fn start_full(slots: &[u32], extra: &[&str], tweak: impl Fn(&mut Command)) -> Cluster {
        let nodes = slots.len();
        for _attempt in 0..5 {
            let ports = free_ports(nodes);
            let lines: Vec<String> = ports
                .iter()
                .zip(slots)
                .map(|(p, k)| match k {
                    1 => p.to_string(),
                    k => format!("{p} slots={k}"),
                })
                .collect();
            // Servers running side by side must not share slot uids (a
            // uid-wide kill in one would hit the other's replicas): derive
            // the base from this cluster's first port, which is unique while held.
            let slot_base = 1_000_000 + u32::from(ports[0]) * 64;
            match Self::launch(&lines, ports, slot_base, extra, &tweak) {
                Ok(c) => return c,
                // A port picked by two clusters at once (free_ports lets go
                // before the server binds): the one that loses the race on
                // the port or on the slot uids derived from it picks again.
                Err(got) if got.contains("already in use") || got.contains("is in use by cloud-server") => continue,
                Err(got) => panic!("cloud-server did not start: {got}"),
            }
        }
        panic!("could not find free ports for cloud-server");
    }

    /// A server whose nodes file lists `lines` (e.g. remote `HOST:PORT`
    /// nodes): no local ports of its own to pick.
    pub fn start_lines(lines: &[String], extra: &[&str]) -> Cluster {
        Self::start_lines_tweaked(lines, extra, |_| {})
    }

    /// As `start_lines`, with `tweak` applied to the server's command first
    /// (e.g. `SLURM_CONF` in its environment).
    pub fn start_lines_tweaked(lines: &[String], extra: &[&str], tweak: impl Fn(&mut Command)) -> Cluster {
        let slot_base = 1_000_000 + u32::from(free_ports(1)[0]) * 64;
        Self::launch(lines, Vec::new(), slot_base, extra, &tweak)
            .unwrap_or_else(|got| panic!("cloud-server did not start: {got}"))
    }

    /// Start a server with this nodes file; `Err`: the line it gave up with.
    fn launch(
        lines: &[String],
        ports: Vec<u16>,
        slot_base: u32,
        extra: &[&str],
        tweak: &dyn Fn(&mut Command),
    ) -> Result<Cluster, String> {
        let dir = match ON_DISK.with(|d| d.get()) {
            true => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")),
            false => tempfile::tempdir(),
        }
        .expect("tempdir");
        let mut text = format!("{}\n", lines.len());
        for l in lines {
            text.push_str(&format!("{l}\n"));
        }
        let nodes_file = dir.path().join("nodes.txt");
        std::fs::write(&nodes_file, text).expect("write nodes file");
        let mut args: Vec<std::ffi::OsString> =
            vec!["--slot-uids".into(), slot_base.to_string().into(), "--nodes".into()];
        args.push(nodes_file.into_os_string());
        args.extend(["--listen".into(), "127.0.0.1:0".into(), "--work-dir".into()]);
        args.push(dir.path().join("work").into_os_string());
        args.extend(extra.iter().map(|a| a.into()));
        let (child, addr, log, reader) = spawn_server(&args, tweak)?;
        Ok(Cluster { child, addr, ports, dir, log, log_reader: Some(reader), args })
    }

    /// Stop the server with `sig` (SIGKILL: a crash), then start it again
    /// with the same flags, nodes and work dir.
    pub fn restart(&mut self, sig: nix::sys::signal::Signal) {
        self.stop_with(sig);
        let (child, addr, log, reader) =
            spawn_server(&self.args, &|_: &mut Command| {}).unwrap_or_else(|got| panic!("no restart: {got}"));
        (self.child, self.addr, self.log, self.log_reader) = (child, addr, log, Some(reader));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Run a client program (`deploy`, `status`, `retrieve`) against this server.
    pub fn cloud(&self, args: &[&str]) -> Output {
        Command::new(client()).args(args).arg("--server").arg(self.addr.to_string()).output().expect("run cloud client")
    }

    pub fn cloud_spawn(&self, args: &[&str]) -> Child {
        Command::new(client())
            .args(args)
            .arg("--server")
            .arg(self.addr.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cloud client")
    }

    /// Deploy and return the ticket.
    pub fn deploy(&self, replicas: u32, archive: &Path) -> u32 {
        let out = self.cloud(&["deploy", &replicas.to_string(), archive.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "deploy failed: {}", String::from_utf8_lossy(&out.stderr));
        let first = stdout.lines().next().unwrap_or("");
        first
            .strip_prefix("Job ticket#: ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("bad deploy output {stdout:?}"))
    }

    pub fn status_json(&self, ticket: u32) -> serde_json::Value {
        let out = self.cloud(&["status", &ticket.to_string(), "--json"]);
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Wait (by asking, as a user would) until the job is in `state`.
    pub fn wait_status(&self, ticket: u32, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self.status_json(ticket);
            if pred(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "timed out waiting on status: {st}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Retrieve into a fresh directory: (exit success, outputs by port).
    pub fn retrieve(&self, ticket: u32) -> (bool, Vec<(u16, String)>) {
        let out_dir = self.dir.path().join(format!("out-{ticket}"));
        let out = self.cloud(&["retrieve", &ticket.to_string(), out_dir.to_str().unwrap()]);
        let mut files = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&out_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let port = name.trim_start_matches("output_").trim_end_matches(".txt").parse().unwrap_or(0);
                files.push((port, std::fs::read_to_string(e.path()).unwrap_or_default()));
            }
        }
        files.sort();
        (out.status.success(), files)
    }

    /// The server's replicas' inits (children of its slots' launchers)
    /// and its other children, launchers left out: (pid, state).
    pub fn children(&self) -> Vec<(u32, char)> {
        replica_parents_children(self.pid())
    }

    /// The server's slot launchers (pids).
    pub fn launchers(&self) -> Vec<u32> {
        let me = self.pid();
        processes().into_iter().filter(|p| p.ppid == me && p.comm == LAUNCHER).map(|p| p.pid).collect()
    }

    /// The launchers once there are `n` of them: a launcher names itself
    /// just after its fork, so right after the ready line one may still
    /// carry the server's name.
    pub fn wait_launchers(&self, n: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let launchers = self.launchers();
            if launchers.len() == n || Instant::now() > deadline {
                return launchers;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's journal syncer, if one runs (and has named itself).
    pub fn syncer(&self) -> Option<u32> {
        let me = self.pid();
        processes().into_iter().find(|p| p.ppid == me && p.comm == SYNCER).map(|p| p.pid)
    }

    /// Wait until the server has no children at all (every replica reaped).
    pub fn wait_no_children(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.children().is_empty() {
            assert!(Instant::now() < deadline, "server still has children: {:?}", self.children());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// SIGTERM, as Ctrl-C would, and wait for a clean exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Send `sig` and wait for the server to exit.
    pub fn stop_with(&mut self, sig: nix::sys::signal::Signal) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        // Never signal a pid already reaped (it may be another process now).
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(pid, sig);
            // A test that failed while it had the server stopped: it must
            // still end (a stopped process acts on SIGTERM only once woken).
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
        let status = self.child.wait().ok();
        // The server's stderr is complete once the reader sees EOF.
        if let Some(r) = self.log_reader.take() {
            let _ = r.join();
        }
        status
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// One line of `ps`, read from /proc.
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    pub uid: u32,
    /// The process's name (`/proc/PID/comm`).
    pub comm: String,
}

thread_local! {
    /// `Cluster::start_on_disk` is starting a cluster on this thread.
    static ON_DISK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The name of a server's slot launchers.
pub const LAUNCHER: &str = "cloud-launcher";
/// The name of the main server's journal syncer.
pub const SYNCER: &str = "cloud-syncer";

/// What a server (`server`, a pid) runs besides its launchers and its
/// journal syncer: its other children, and the launchers' children
/// (replicas' inits): (pid, state).
pub fn replica_parents_children(server: u32) -> Vec<(u32, char)> {
    let all = processes();
    let launchers: Vec<u32> = all.iter().filter(|p| p.ppid == server && p.comm == LAUNCHER).map(|p| p.pid).collect();
    all.iter()
        .filter(|p| (p.ppid == server && p.comm != LAUNCHER && p.comm != SYNCER) || launchers.contains(&p.ppid))
        .map(|p| (p.pid, p.state))
        .collect()
}

/// Every process on the machine (those that vanish while read are skipped).
pub fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        // After "pid (comm) ": state, ppid, ...; comm may hold spaces.
        let Some((before, after)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = before.split_once(" (").map_or("", |(_, c)| c).to_string();
        let mut f = after.split(' ');
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or(u32::MAX);
        out.push(Proc { pid, ppid, state, uid, comm });
    }
    out
}

/// Build a .tar.gz from (path, contents) pairs; returns its path.
pub fn archive(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create archive");
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, body.as_bytes()).expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip");
    path
}

/// An archive whose makefile's `run` recipe is `recipe` (lines, bash).
pub fn job(dir: &Path, name: &str, recipe: &[impl AsRef<str>]) -> PathBuf {
    let mut mk = String::from("SHELL := /bin/bash\nrun:\n");
    for line in recipe {
        mk.push('\t');
        mk.push_str(line.as_ref());
        mk.push('\n');
    }
    archive(dir, name, &[("Makefile", &mk)])
}

/// A TCP gate: jobs connect and say hello; the test decides when they go on.
pub struct Gate {
    pub listener: TcpListener,
}

impl Gate {
    pub fn new() -> Gate {
        Gate { listener: TcpListener::bind("127.0.0.1:0").expect("bind gate") }
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// Recipe lines: connect, announce `who`, block until the test sends a line.
    pub fn wait_recipe(&self, who: &str) -> Vec<String> {
        vec![format!("exec 3<>/dev/tcp/127.0.0.1/{}; echo {who} >&3; read -r go <&3; echo released {who}", self.port())]
    }

    /// Accept the next job that arrives and read its announcement.
    pub fn arrive(&self) -> (String, TcpStream) {
        self.listener.set_nonblocking(false).unwrap();
        let (s, _) = self.listener.accept().expect("gate accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("job announces itself");
        (line.trim().to_string(), s)
    }

    /// True if no job is waiting to be accepted right now.
    pub fn nobody_waiting(&self) -> bool {
        self.listener.set_nonblocking(true).unwrap();
        let r = matches!(self.listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        self.listener.set_nonblocking(false).unwrap();
        r
    }
}

/// Start `cmd`, whose program is a copy this test process just wrote (to
/// run it as another user): until a child that another test thread forked
/// meanwhile execs, it holds that copy open for writing, and exec fails with
/// ETXTBSY. Try again then, within a deadline.
pub fn spawn_copied(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => std::thread::yield_now(),
            Err(e) => panic!("cannot start {:?}: {e}", cmd.get_program()),
        }
    }
}

/// Wait (up to 20 s) for a condition the server reaches asynchronously.
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    wait_within(Duration::from_secs(20), what, cond);
}

/// Wait (up to `limit`) for a condition the server reaches asynchronously.
pub fn wait_within(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Entries left in every node's directory, but for the empty files of
/// its pool (`free-<n>`, reused by later tickets).
pub fn node_leftovers(c: &Cluster) -> Vec<PathBuf> {
    c.ports
        .iter()
        .flat_map(|p| std::fs::read_dir(c.work().join(format!("output_{p}"))).into_iter().flatten().flatten())
        .filter(|e| !(e.file_name().to_string_lossy().starts_with("free-") && empty_file(&e.path())))
        .map(|e| e.path())
        .collect()
}

fn empty_file(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() == 0)
}

/// What the spool holds but for the empty files of its pool (reused by
/// later uploads): data an upload or a retrieve left behind.
pub fn spool_data(c: &Cluster) -> Vec<PathBuf> {
    std::fs::read_dir(c.work().join("spool"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !empty_file(p))
        .collect()
}

pub fn release(mut s: TcpStream) {
    let _ = s.write_all(b"go\n");
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// True if the test may go on: it runs as root. Under CI (which is root) a
/// missing root is a failure, elsewhere the test says it is skipped.
pub fn need_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root, and CI runs as root");
    }
    eprintln!("SKIPPED {test}: needs root (slot uids, namespaces, other uids)");
    false
}

/// One reply record read from a raw connection, or None if the connection
/// closed, failed, or `limit` passed.
pub fn read_reply(mut s: &TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use cloudinfra::record::{Event, RecordDecoder, Shape};
    s.set_read_timeout(Some(limit)).ok()?;
    let mut d = RecordDecoder::new(1 << 20, 0);
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        if let (_, Some(Event::Record(r))) = d.decode(&buf[..n], &mut |_| Shape::Whole) {
            return Some(r);
        }
    }
}

/// A child process that is killed and reaped when dropped, so a failing
/// test leaves no server behind.
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Make `cmd` run as `uid` (and gid `uid`; std drops the supplementary
/// groups when root changes uid).
pub fn as_user(cmd: &mut Command, uid: u32) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.uid(uid).gid(uid)
}

/// Start `cloud-server` as `cmd` says, expecting it to refuse: returns what
/// it printed up to its `cloud-server: ...` line, once it has exited with a
/// failure (the test fails if it starts serving instead).
pub fn refused_start(cmd: &mut Command) -> String {
    let mut server = Reaped(
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn cloud-server"),
    );
    let mut err = BufReader::new(server.stderr.take().expect("stderr"));
    let mut text = String::new();
    while err.read_line(&mut text).unwrap_or(0) > 0 && !text.contains("cloud-server:") {}
    assert!(!text.contains("listening on"), "the server started: {text}");
    assert!(!server.wait().expect("wait").success(), "the server exited successfully: {text}");
    text
}

/// A `--secret-file` for node links and off-loopback listens: `text` in
/// `dir/name`, mode 0600, owned by `owner` (e.g. the uid a server runs as)
/// or by whoever runs the test.
pub fn secret_file(dir: &Path, name: &str, text: &str, owner: Option<u32>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n")).expect("write the secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600 the secret file");
    if let Some(uid) = owner {
        let id = Some(nix::unistd::Uid::from_raw(uid));
        nix::unistd::chown(&path, id, Some(nix::unistd::Gid::from_raw(uid))).expect("chown the secret file");
    }
    path
}

/// Creations and removals in watched folders (inotify: IN_CREATE covers
/// open(O_CREAT), mkdir and link; IN_DELETE unlink and rmdir; a rename
/// is IN_MOVED_*, which allocates and frees no inode).
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
    dirs: Vec<(i32, String)>,
}

impl DirWatch {
    pub fn new(dirs: &[&Path]) -> DirWatch {
        // SAFETY: plain syscall; the descriptor is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(raw >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let mut watched = Vec::new();
        for d in dirs {
            let c = std::ffi::CString::new(d.to_str().unwrap()).unwrap();
            // SAFETY: valid descriptor and NUL-terminated path.
            let wd = unsafe {
                libc::inotify_add_watch(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    c.as_ptr(),
                    libc::IN_CREATE | libc::IN_DELETE,
                )
            };
            assert!(wd >= 0, "inotify_add_watch {}: {}", d.display(), std::io::Error::last_os_error());
            watched.push((wd, d.display().to_string()));
        }
        DirWatch { fd, dirs: watched }
    }

    /// Every event so far, as "created DIR/NAME" or "removed DIR/NAME".
    pub fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n =
                unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&self.fd), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut at = 0;
            let head = std::mem::size_of::<libc::inotify_event>();
            while at + head <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copies one header.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + head..at + head + ev.len as usize];
                let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_string();
                let dir = self.dirs.iter().find(|(wd, _)| *wd == ev.wd).map_or("?", |(_, d)| d.as_str());
                let what = if ev.mask & libc::IN_CREATE != 0 { "created" } else { "removed" };
                out.push(format!("{what} {dir}/{name}"));
                at += head + ev.len as usize;
            }
        }
    }
}

/// A process's anonymous memory (heap, stacks), in bytes.
pub fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib =
        status.lines().find_map(|l| l.strip_prefix("RssAnon:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
    kib.expect("RssAnon in /proc/PID/status") * 1024
}
