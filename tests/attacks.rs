//! Attacks on the merged containment and server, each one a hole that was
//! open before its fix: writing the host's file system (a world-writable
//! directory as root; the server user's own files without root), a key
//! left in the per-uid kernel keyring for the next tenant, a local user
//! passing for a network peer through the host's own address, host
//! services on unix sockets under /run, the host's ptys, forks without
//! limit without root, one tenant using up a shared uid's processes, and
//! nested user namespaces, control characters from archive names in STATUS
//! and the log, a work dir another user planted links in, a network peer
//! claiming uid 0 on a server without root, one user filling the disk with
//! unretrieved tickets, a link planted where `cloud retrieve` writes, slot
//! uids that are host accounts, a job deploying jobs to its own server.
//! Tests that need root say so when skipped; CI runs as root.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A directory on the host, in `parent` (not /tmp, which a job sees as
/// its own tmpfs), removed when dropped.
struct HostDir(PathBuf);

impl HostDir {
    fn new(parent: &str, name: &str, mode: u32, owner: Option<u32>) -> HostDir {
        let path = PathBuf::from(format!("{parent}/cloudinfra-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create a directory on the host");
        if let Some(id) = owner {
            let id = Some(nix::unistd::Uid::from_raw(id));
            nix::unistd::chown(&path, id, Some(nix::unistd::Gid::from_raw(65534))).expect("chown");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        HostDir(path)
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn output(c: &Cluster, t: u32) -> String {
    let (_, outs) = c.retrieve(t);
    outs.into_iter().map(|(_, o)| o).collect()
}

/// As root, a job (slot uid, or `nobody` without slot uids) cannot leave a
/// file in a world-writable host directory outside its private temp dirs:
/// the host's file system is read-only in the replica's mount namespace.
#[test]
fn a_job_cannot_write_into_world_writable_host_directories() {
    if !need_root("a_job_cannot_write_into_world_writable_host_directories") {
        return;
    }
    let shared = HostDir::new("/var/lib", "world-writable", 0o1777, None);
    for extra in [&[][..], &["--no-slot-uids", "--run-as", "nobody"][..]] {
        let c = Cluster::start_with(1, extra);
        let left = shared.0.join("left-by-a-job");
        let recipe = [
            format!("@echo planted > {} || echo refused", left.display()),
            "@echo scratch > /tmp/scratch && cat /tmp/scratch".to_string(),
            "@echo work > $$HOME/work && cat $$HOME/work".to_string(),
        ];
        let t = c.deploy(1, &job(c.dir.path(), "plant.tar.gz", &recipe));
        let out = output(&c, t);
        assert!(!left.exists(), "a job left a file in a world-writable host directory ({extra:?}): {out}");
        assert!(out.contains("Read-only file system") && out.contains("refused"), "{out}");
        // Its own mounts stay writable.
        assert!(out.contains("scratch\n") && out.contains("work\n"), "{out}");
        assert!(c.log().contains("host file system read-only"), "{}", c.log());
    }
}

/// A server started as `nobody` (user-namespace containment), and its
/// ready line.
struct UserServer {
    child: Child,
    addr: SocketAddr,
    ready: String,
}

impl Drop for UserServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_as_nobody(top: &Path) -> Result<UserServer, String> {
    start_server(top, "127.0.0.1:0", true, &[])
}

/// A server on `listen` with one node and its work dir under `top`; as
/// `nobody` (a copy of the binary, a work dir nobody owns) if `nobody`.
fn start_server(top: &Path, listen: &str, nobody: bool, extra: &[&str]) -> Result<UserServer, String> {
    let bin = top.join("cloud-server");
    std::fs::copy(SERVER, &bin).unwrap();
    let work = top.join("work");
    std::fs::create_dir(&work).unwrap();
    if nobody {
        let id = Some(nix::unistd::Uid::from_raw(65534));
        nix::unistd::chown(&work, id, Some(nix::unistd::Gid::from_raw(65534))).unwrap();
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes = top.join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["--listen", listen, "--time-limit", "30"]).arg("--nodes").arg(&nodes).arg("--work-dir").arg(&work);
    // Off loopback only with a secret (issue 9's binding rule).
    if !listen.starts_with("127.") {
        let secret = secret_file(top, "secret", "attack-tests-secret-0123456789", nobody.then_some(65534));
        cmd.arg("--secret-file").arg(secret);
    }
    cmd.args(["--slot-uids", &(1_000_000 + u32::from(port) * 64).to_string()]).args(extra);
    if nobody {
        as_user(&mut cmd, 65534);
    }
    let mut child = spawn_copied(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()));
    let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while lines.read_line(&mut line).unwrap_or(0) > 0 {
        if line.contains("listening on") || line.starts_with("cloud-server:") {
            break;
        }
        line.clear();
    }
    let addr = line.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).and_then(|a| a.parse().ok());
    // Keep draining the log so the server never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    match addr {
        Some(addr) => Ok(UserServer { child, addr, ready: line }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(line)
        }
    }
}

/// Without root, the job runs as the server's user (uid 0 of a user
/// namespace): it still cannot write that user's files on the host.
#[test]
fn without_root_a_job_cannot_write_the_server_users_files() {
    if !need_root("without_root_a_job_cannot_write_the_server_users_files") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path();
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).unwrap();
    let own = HostDir::new("/var/lib", "server-user", 0o700, Some(65534));
    let victim = own.0.join("victim");
    std::fs::write(&victim, "original\n").unwrap();
    nix::unistd::chown(&victim, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let s = match start_as_nobody(top) {
        Ok(s) => s,
        Err(e) if e.contains("user namespaces") => {
            eprintln!("SKIPPED: this kernel refuses unprivileged user namespaces: {e}");
            return;
        }
        Err(e) => panic!("cloud-server did not start: {e}"),
    };
    let recipe = [
        format!("@echo pwned > {} || echo refused", victim.display()),
        format!("@touch {}/planted || echo refused", own.0.display()),
        format!("@cat {}", victim.display()),
    ];
    let text = run_as_nobody(&s, top, &job(top, "overwrite.tar.gz", &recipe));
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "original\n",
        "the job overwrote the server user's file: {text}"
    );
    assert!(!own.0.join("planted").exists(), "the job created a file in the server user's directory: {text}");
    assert!(text.contains("Read-only file system") && text.contains("original"), "{text}");
    assert!(s.ready.contains("host file system read-only"), "{}", s.ready);
}

/// Deploy `archive` to `s` as `nobody`, retrieve it, and return the output.
fn run_as_nobody(s: &UserServer, top: &Path, archive: &Path) -> String {
    let cloud = |args: &[&str]| {
        let mut cmd = Command::new(client());
        cmd.args(args).arg("--server").arg(s.addr.to_string());
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
        cmd.output().expect("client")
    };
    std::fs::set_permissions(archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cloud(&["deploy", "1", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").replace("Job ticket#: ", "");
    let outs = top.join(format!("outs-{t}"));
    std::fs::create_dir(&outs).unwrap();
    std::fs::set_permissions(&outs, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Nonzero when the replica is INVALID: its output is written all the same.
    let _ = cloud(&["retrieve", &t, outs.join("r").to_str().unwrap()]);
    let mut text = String::new();
    for e in std::fs::read_dir(outs.join("r")).unwrap() {
        text.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    text
}

/// Without root and without cgroups, `--max-procs` still bounds a job: on
/// Linux 5.14+ RLIMIT_NPROC counts per user namespace, and each replica
/// has one of its own (before: no limit at all, only the host's).
#[test]
fn without_root_max_procs_bounds_a_job() {
    if !need_root("without_root_max_procs_bounds_a_job") {
        return;
    }
    if !cloudinfra::spawn::nproc_per_user_namespace() {
        eprintln!(
            "SKIPPED without_root_max_procs_bounds_a_job: RLIMIT_NPROC is per user namespace only from Linux 5.14"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path();
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = match start_server(top, "127.0.0.1:0", true, &["--max-procs", "40"]) {
        Ok(s) => s,
        Err(e) if e.contains("user namespaces") => {
            eprintln!("SKIPPED: this kernel refuses unprivileged user namespaces: {e}");
            return;
        }
        Err(e) => panic!("cloud-server did not start: {e}"),
    };
    // Fork until refused; the children sleep until the replica ends.
    let script = "my $n = 0;\nfor (1..200) { my $p = fork(); last unless defined $p; if ($p == 0) { sleep 60; exit 0 } $n++ }\nprint \"held $n\\n\";\n";
    let many = archive(top, "many.tar.gz", &[("Makefile", "run:\n\t@perl many.pl\n"), ("many.pl", script)]);
    let text = run_as_nobody(&s, top, &many);
    let held: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("held "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(held < 40, "a job without root forked {held} processes under --max-procs 40: {text}");
}

/// Kernel keyrings are per uid and not namespaced: before the fix, a key
/// a job added to its user keyring was still there for the next tenant's
/// job on the same node (same slot uid). add_key, request_key and keyctl
/// now fail with EPERM.
#[test]
#[cfg(target_arch = "x86_64")]
fn a_key_left_in_the_user_keyring_does_not_reach_the_next_job() {
    if !need_root("a_key_left_in_the_user_keyring_does_not_reach_the_next_job") {
        return;
    }
    let c = Cluster::start(1);
    // add_key = 248, keyctl = 250 (KEYCTL_SEARCH = 10, KEYCTL_READ = 11),
    // KEY_SPEC_USER_KEYRING = -4.
    let plant = r#"my ($t, $d, $v) = ("user", "cloudinfra-attack", "tenant-secret");
my $r = syscall(248, $t, $d, $v, length($v), -4);
print "add_key: $r $!\n";
"#;
    let find = r#"my ($t, $d) = ("user", "cloudinfra-attack");
my $id = syscall(250, 10, -4, $t, $d, 0);
my $b = "\0" x 64;
my $n = $id > 0 ? syscall(250, 11, $id, $b, 64) : -1;
print "found: ", ($n > 0 ? substr($b, 0, $n) : "nothing ($!)"), "\n";
"#;
    let perl_job = |name: &str, script: &str| {
        archive(c.dir.path(), name, &[("Makefile", "run:\n\t@perl key.pl\n"), ("key.pl", script)])
    };
    let first = output(&c, c.deploy(1, &perl_job("plant.tar.gz", plant)));
    assert!(first.contains("add_key: -1 Operation not permitted"), "{first}");
    let next = output(&c, c.deploy(1, &perl_job("find.tar.gz", find)));
    assert!(next.contains("found: nothing"), "{next}");
    assert!(!next.contains("tenant-secret"), "the next tenant read a key the last job left: {next}");
}

/// A job cannot make a nested user namespace (kernel attack surface, and
/// mounts of its own choosing), while ordinary processes and threads still
/// work: the C library falls back from clone3 to clone.
#[test]
fn a_job_cannot_make_a_user_namespace_but_threads_and_forks_work() {
    let c = Cluster::start(1);
    let recipe = [
        "@unshare -U true && echo nested userns made || echo nested userns refused",
        "@unshare -r true && echo root userns made || echo root userns refused",
        "@seq 1 300000 | sort --parallel=4 -S 16M -n | tail -n 1",
        "@(echo forked) | cat",
    ];
    let out = output(&c, c.deploy(1, &job(c.dir.path(), "userns.tar.gz", &recipe)));
    assert!(out.contains("nested userns refused") && out.contains("root userns refused"), "{out}");
    assert!(!out.contains("made"), "{out}");
    assert!(out.lines().any(|l| l == "300000"), "threads (sort --parallel) work: {out}");
    assert!(out.lines().any(|l| l == "forked"), "{out}");
}

/// One of this host's own addresses that is not loopback (IPv4, up).
fn non_loopback_address() -> Option<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let up = ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        let v4 = ifa.address.as_ref()?.as_sockaddr_in()?.ip();
        (up && !v4.is_loopback()).then_some(std::net::IpAddr::V4(v4))
    })
}

/// A local user must not pass for a network peer (whose AUTH_SYS is taken
/// as claimed) by connecting to one of the host's own addresses instead of
/// loopback, when the server listens on more than loopback: the kernel
/// knows that socket too, and a lie about the uid is refused.
#[test]
fn a_local_user_cannot_forge_auth_sys_through_a_non_loopback_address() {
    use cloudinfra::proto;
    use cloudinfra::rpc::{self, AuthSys};
    use std::io::{Read, Write};
    let Some(ip) = non_loopback_address() else {
        eprintln!("SKIPPED a_local_user_cannot_forge_auth_sys_through_a_non_loopback_address: no address but loopback");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = match start_server(dir.path(), "0.0.0.0:0", false, &[]) {
        Ok(s) => s,
        Err(e) => panic!("cloud-server did not start: {e}"),
    };
    let me = nix::unistd::Uid::effective().as_raw();
    let claim = |xid: u32, uid: u32| {
        let cred = AuthSys { stamp: 1, machinename: "forger".into(), uid, gid: uid, gids: vec![] };
        let mut w = rpc::call_sys(xid, proto::CLOUD_PROG, proto::CLOUD_VERS, proto::STATUS, &cred);
        w.u32(1);
        let payload = w.into_bytes();
        let mut v = (payload.len() as u32 | 0x8000_0000).to_be_bytes().to_vec();
        v.extend_from_slice(&payload);
        v
    };
    let mut c =
        std::net::TcpStream::connect(SocketAddr::new(ip, s.addr.port())).expect("connect to the host's own address");
    c.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    c.write_all(&claim(0x61, me.wrapping_add(1))).unwrap();
    let mut reply = [0u8; 24];
    c.read_exact(&mut reply).unwrap();
    let words: Vec<u32> = reply[4..].chunks(4).map(|w| u32::from_be_bytes(w.try_into().unwrap())).collect();
    // xid, REPLY, MSG_DENIED, AUTH_ERROR, AUTH_BADCRED.
    assert_eq!(words, vec![0x61, 1, 1, 1, rpc::AUTH_BADCRED], "a local lie about the uid via {ip} was believed");
}

/// A network namespace does not stop unix sockets on the file system: a
/// job with the network isolated must not reach a host service listening
/// under /run (D-Bus, the journal, container runtimes), even one anybody
/// may connect to.
#[test]
fn an_isolated_job_cannot_reach_host_services_on_unix_sockets_in_run() {
    if !need_root("an_isolated_job_cannot_reach_host_services_on_unix_sockets_in_run") {
        return;
    }
    let svc = HostDir::new("/run", "service", 0o755, None);
    let sock = svc.0.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind a unix socket in /run");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let c = Cluster::start(1);
    let script = format!(
        "use IO::Socket::UNIX; my $s = IO::Socket::UNIX->new(Peer => '{}') or die \"cannot connect: $!\\n\"; print $s \"hello from a job\\n\"; print \"connected\\n\";\n",
        sock.display()
    );
    let a = archive(
        c.dir.path(),
        "dial.tar.gz",
        &[("Makefile", "run:\n\t-@perl dial.pl\n\t@echo tried\n"), ("dial.pl", &script)],
    );
    let out = output(&c, c.deploy(1, &a));
    assert!(out.contains("tried"), "{out}");
    assert!(listener.accept().is_err(), "a job reached a host service on a unix socket: {out}");
    assert!(!out.contains("connected"), "{out}");
}

/// A job must not take every pseudo-terminal of the host (ssh and tmux
/// logins then fail): its /dev/pts is a devpts instance of its own, which
/// the kernel keeps `kernel.pty.reserve` ptys away from. Before, a job's
/// processes could open the host's ptys up to `kernel.pty.max`.
#[test]
fn a_job_cannot_take_the_hosts_terminals() {
    if !need_root("a_job_cannot_take_the_hosts_terminals") {
        return;
    }
    let sysctl = |name: &str| -> usize {
        std::fs::read_to_string(format!("/proc/sys/kernel/pty/{name}")).unwrap().trim().parse().unwrap()
    };
    let (max, reserve) = (sysctl("max"), sysctl("reserve"));
    let c = Cluster::start(1);
    // 24 processes open up to 250 ptys each and hold them until all are counted.
    let script = r#"use POSIX;
pipe(my $cr, my $cw); pipe(my $gr, my $gw);
for my $k (1..24) {
    my $p = fork(); die "fork: $!" unless defined $p; next if $p;
    close $gw; my @t; my $n = 0;
    while ($n < 250) { open(my $f, "+<", "/dev/ptmx") or last; push @t, $f; $n++ }
    syswrite $cw, "$n\n"; my $x; sysread $gr, $x, 1; POSIX::_exit(0);
}
close $cw; close $gr; my $sum = 0;
for (1..24) { my $l = <$cr>; $sum += $l }
print "held $sum\n"; close $gw; 1 while wait() > 0;
"#;
    let a = archive(c.dir.path(), "ptys.tar.gz", &[("Makefile", "run:\n\t@perl ptys.pl\n"), ("ptys.pl", script)]);
    let out = output(&c, c.deploy(1, &a));
    let held: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("held "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(held > 0, "a job can still open terminals of its own: {out}");
    assert!(held <= max - reserve, "a job held {held} ptys: kernel.pty.max {max}, of which {reserve} are the host's");
}

/// Forks until refused (at most 200; the children sleep until the replica
/// ends) and prints "held N".
const FORKS: &str = "my $n = 0;\nfor (1..200) { my $p = fork(); last unless defined $p; if ($p == 0) { sleep 60; exit 0 } $n++ }\nprint \"held $n\\n\";\n";

fn held(out: &str) -> usize {
    out.lines()
        .find_map(|l| l.strip_prefix("held "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"))
}

/// With `--no-slot-uids` every node runs as one uid, and RLIMIT_NPROC
/// counts every process of that uid: one tenant holding `--max-procs`
/// processes left the next tenant's job on another node unable to fork
/// at all. Where cgroups bound each job's processes, RLIMIT_NPROC is not
/// set for a shared uid.
#[test]
fn with_one_shared_uid_a_tenant_cannot_use_up_the_others_processes() {
    if !need_root("with_one_shared_uid_a_tenant_cannot_use_up_the_others_processes") {
        return;
    }
    let c = Cluster::start_with(2, &["--no-slot-uids", "--run-as", "nobody", "--max-procs", "40", "--allow-network"]);
    if !c.log().contains("per-job memory and process totals") {
        eprintln!("SKIPPED with_one_shared_uid_...: no cgroups here, so RLIMIT_NPROC is the only bound: {}", c.log());
        return;
    }
    let gate = Gate::new();
    let mut mk = String::from("SHELL := /bin/bash\nrun:\n\t@perl forks.pl\n");
    for line in gate.wait_recipe("holder") {
        mk.push_str(&format!("\t@{line}\n"));
    }
    let holder = archive(c.dir.path(), "holder.tar.gz", &[("Makefile", &mk), ("forks.pl", FORKS)]);
    let t1 = c.deploy(1, &holder);
    let (who, s) = gate.arrive();
    assert_eq!(who, "holder");
    let next = archive(c.dir.path(), "next.tar.gz", &[("Makefile", "run:\n\t@perl forks.pl\n"), ("forks.pl", FORKS)]);
    let t2 = c.deploy(1, &next);
    let out = output(&c, t2);
    release(s);
    let first = output(&c, t1);
    assert!(held(&first) < 40, "--max-procs still bounds a job: {first}");
    assert!(held(&out) > 20, "a tenant could not fork while another held its processes: {out}");
}

/// A tenant chooses the names in its archive, and an extraction error
/// quotes them in the replica's message, which STATUS shows to anyone and
/// the server logs: escape sequences and newlines there would write on
/// another user's terminal and forge status and log lines. They come out
/// escaped, on one line.
#[test]
fn archive_names_cannot_put_control_characters_in_status_or_log() {
    let c = Cluster::start(1);
    let evil = "x\n\x1b[31mFORGED ticket 1: COMPLETED\x1b]0;pwned\x07\n\u{1}cloud-init wait status 0";
    // The same file twice: the deploy-time check lets clashes through,
    // extraction refuses the second one and quotes its name.
    let a = archive(c.dir.path(), "evil.tar.gz", &[("Makefile", "run:\n\techo hi\n"), (evil, "a"), (evil, "b")]);
    let t = c.deploy(1, &a);
    c.wait_status(t, |s| s["status"] == "INVALID");
    let out = c.cloud(&["status", &t.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains('\x1b') && !text.contains('\x07') && !text.contains('\u{1}'), "{text:?}");
    assert_eq!(text.lines().count(), 2, "a ticket line and one replica line: {text:?}");
    assert!(text.contains("cannot create x\\n\\u{1b}[31mFORGED"), "{text:?}");
    let log = c.log();
    assert!(!log.contains('\x1b') && !log.lines().any(|l| l.starts_with("FORGED") || l.contains("\u{1}")), "{log:?}");
}

/// Another local user makes the work dir first (in a shared directory, as
/// /tmp or the `work` of a shared cwd) and plants a link where the server
/// writes its ticket counter: root then overwrote the link's target. The
/// server now refuses a work dir within other users' reach.
#[test]
fn a_work_dir_planted_by_another_user_is_refused() {
    if !need_root("a_work_dir_planted_by_another_user_is_refused") {
        return;
    }
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = top.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let shared = top.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // What user nobody can do in a sticky shared directory.
    let work = shared.join("work");
    std::fs::create_dir(&work).unwrap();
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    let nogroup = Some(nix::unistd::Gid::from_raw(65534));
    nix::unistd::chown(&work, nobody, nogroup).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&victim, work.join("tickets.tmp")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes = top.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    let first = refused_start(
        Command::new(SERVER)
            .args(["--slot-uids", &(1_000_000 + u32::from(port) * 64).to_string(), "--listen", "127.0.0.1:0"])
            .arg("--nodes")
            .arg(&nodes)
            .arg("--work-dir")
            .arg(&work),
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "the server wrote through the link");
    assert!(first.contains("another user could plant links") && first.contains("--work-dir"), "{first}");
}

/// A network namespace joined to the host's by a veth pair: a client run
/// in it is a real network peer to the server (its socket is not in the
/// host's table). Removed when dropped.
struct RemoteNet {
    ns: String,
    host_ip: String,
}

impl RemoteNet {
    fn new() -> Option<RemoteNet> {
        // Unique per instance: tests of this binary run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id().wrapping_mul(8).wrapping_add(n);
        let ns = format!("cloudi-remote-{id}");
        let (h, n) = (format!("crh{}", id % 100_000), format!("crn{}", id % 100_000));
        let net = format!("10.{}.{}", 200 + (id / 250) % 50, id % 250);
        let host_ip = format!("{net}.1");
        let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        if !ip(&["netns", "add", &ns]) {
            return None;
        }
        // From here on, dropping `me` removes the namespace (and the veth with it).
        let me = RemoteNet { ns: ns.clone(), host_ip: host_ip.clone() };
        let ok = ip(&["link", "add", &h, "type", "veth", "peer", "name", &n])
            && ip(&["link", "set", &n, "netns", &ns])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &h])
            && ip(&["link", "set", &h, "up"])
            && ip(&["netns", "exec", &ns, "ip", "addr", "add", &format!("{net}.2/30"), "dev", &n])
            && ip(&["netns", "exec", &ns, "ip", "link", "set", &n, "up"]);
        ok.then_some(me)
    }

    /// `cloud ARGS` run in the remote namespace.
    fn cloud(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip").args(["netns", "exec", &self.ns, client()]).args(args).output().expect("run cloud remotely")
    }
}

impl Drop for RemoteNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A server without root takes jobs only from its own user; a network
/// peer's AUTH_SYS uid is a mere claim, and claiming uid 0 (or the
/// server's uid) got a job run as the server's user, whose output the
/// peer then retrieved: any file that user can read. A network peer is
/// now refused there, whatever it claims.
#[test]
fn a_network_peer_cannot_claim_its_way_into_a_server_without_root() {
    if !need_root("a_network_peer_cannot_claim_its_way_into_a_server_without_root") {
        return;
    }
    let Some(net) = RemoteNet::new() else {
        assert!(std::env::var("CI").is_err(), "cannot make a network namespace with ip(8) (iproute2)");
        eprintln!("SKIPPED a_network_peer_cannot_claim_its_way_into_a_server_without_root: no ip(8) netns");
        return;
    };
    let secret = HostDir::new("/var/lib", "server-user-secret", 0o700, Some(65534));
    std::fs::write(secret.0.join("key"), "SECRET of the server's user\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = match start_server(dir.path(), "0.0.0.0:0", true, &[]) {
        Ok(s) => s,
        Err(e) => panic!("cloud-server did not start as nobody: {e}"),
    };
    assert!(s.ready.contains("jobs taken only from uid 65534"), "{}", s.ready);
    let steal = job(dir.path(), "steal.tar.gz", &[format!("cat {}/key", secret.0.display())]);
    std::fs::set_permissions(&steal, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = format!("{}:{}", net.host_ip, s.addr.port());
    let out = net.cloud(&["deploy", "--server", &server, "1", &steal.display().to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        let into = dir.path().join("stolen");
        let _ = net.cloud(&["retrieve", "--server", &server, "1", &into.display().to_string()]);
        let got: String = std::fs::read_dir(&into)
            .map(|d| d.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect())
            .unwrap_or_default();
        panic!("a network peer (as uid 0) ran a job as the server's user: {text} {got}");
    }
    // Refused as root from another host (squashed), or, for any other uid
    // it claims, as not the server's own (verified) user.
    let squashed = text.contains("does not take calls from this user");
    assert!(squashed || (text.contains("takes them only from that user") && text.contains("unverified")), "{text}");
}

/// A network peer's AUTH_SYS uid is taken as claimed, except root: a
/// claim of uid 0 from another host would retrieve and close every
/// ticket, local users' included (NFS squashes remote root for the same
/// reason).
#[test]
fn a_network_peer_is_never_root() {
    if !need_root("a_network_peer_is_never_root") {
        return;
    }
    let Some(net) = RemoteNet::new() else {
        assert!(std::env::var("CI").is_err(), "cannot make a network namespace with ip(8) (iproute2)");
        eprintln!("SKIPPED a_network_peer_is_never_root: no ip(8) netns");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = start_server(dir.path(), "0.0.0.0:0", false, &[]).expect("cloud-server starts as root");
    let local = s.addr.to_string();
    let mine = job(dir.path(), "mine.tar.gz", &["@echo a local user's output"]);
    let out =
        Command::new(client()).args(["deploy", "1", mine.to_str().unwrap(), "--server", &local]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("Job ticket#: ").to_string();
    let remote = format!("{}:{}", net.host_ip, s.addr.port());
    for args in [vec!["retrieve", t.as_str()], vec!["status", t.as_str()]] {
        let mut a = args.clone();
        a.extend(["--server", remote.as_str()]);
        let out = net.cloud(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        if args[0] == "retrieve" {
            assert!(!out.status.success(), "a remote root closed a local user's ticket");
            assert!(err.contains("does not take calls from this user"), "{err}");
        } else {
            assert!(!out.status.success(), "remote root is refused for every call: {err}");
        }
    }
    let out = Command::new(client()).args(["status", &t, "--server", &local]).output().unwrap();
    assert!(out.status.success(), "the ticket is still there: {}", String::from_utf8_lossy(&out.stderr));
}

/// Any user could deploy tiny jobs that print `--max-output` and never
/// retrieve them: each finished ticket keeps its outputs on disk for
/// `--ticket-ttl` (a day), and one user filled about 150 MB/s of the work
/// dir's file system (the host's, by default). One user now holds at most
/// `--max-tickets-per-user` (64) tickets; others are not held back, and a
/// retrieved ticket frees a place.
#[test]
fn one_user_cannot_fill_the_disk_with_unretrieved_tickets() {
    let c = Cluster::start(2);
    let quiet = job(c.dir.path(), "quiet.tar.gz", &["@echo done"]);
    let mut tickets = Vec::new();
    let refused = loop {
        let out = c.cloud(&["deploy", "1", quiet.to_str().unwrap()]);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        tickets.push(String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("Job ticket#: ").to_string());
        assert!(tickets.len() <= 64, "one user holds {} tickets nobody retrieved", tickets.len());
    };
    assert_eq!(tickets.len(), 64, "{refused}");
    assert!(refused.contains("--max-tickets-per-user 64") && refused.contains("retrieve or close"), "{refused}");
    // Retrieving one makes room.
    let into = c.dir.path().join("out");
    let out = c.cloud(&["retrieve", &tickets[0], into.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.deploy(1, &quiet);
}

/// `cloud retrieve N DIR` into a directory someone else can write (a
/// shared one, or one they made in /tmp): a link planted at the
/// predictable `output_PORT.txt.part` made the client (often root) write
/// the job's output, chosen by its tenant, into the link's target. The
/// client now writes only a file it created itself.
#[test]
fn retrieve_does_not_write_through_a_planted_link() {
    let c = Cluster::start(1);
    let t = c.deploy(1, &job(c.dir.path(), "says.tar.gz", &["@echo 'root::0:0::/root:/bin/bash'"]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");
    let into = c.dir.path().join("shared-out");
    std::fs::create_dir(&into).unwrap();
    let victim = c.dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let port = c.ports[0];
    std::os::unix::fs::symlink(&victim, into.join(format!("output_{port}.txt.part"))).unwrap();
    let out = c.cloud(&["retrieve", &t.to_string(), into.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "the client wrote through a planted link");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = std::fs::read_to_string(into.join(format!("output_{port}.txt"))).unwrap();
    assert!(got.contains("root::0:0"), "{got}");
}

/// A slot uid base that overlaps the host's accounts (`--slot-uids 1`:
/// daemon, bin, ...; or a real user's uid) ran every job as that user,
/// with its files and groups (gid 42 is shadow's on Debian), and each
/// start killed that user's processes. Refused at start now.
#[test]
fn slot_uids_that_belong_to_host_accounts_are_refused() {
    if !need_root("slot_uids_that_belong_to_host_accounts_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    let daemon = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(1)).ok().flatten().map(|u| u.name);
    let Some(daemon) = daemon else {
        eprintln!("SKIPPED slot_uids_that_belong_to_host_accounts_are_refused: no user with uid 1 here");
        return;
    };
    let first = refused_start(
        Command::new(SERVER)
            .args(["--slot-uids", "1", "--listen", "127.0.0.1:0", "--nodes"])
            .arg(&nodes)
            .arg("--work-dir")
            .arg(dir.path().join("work")),
    );
    assert!(
        first.contains(&format!("uid 1 is user {daemon}'s")) && first.contains("pick another --slot-uids base"),
        "{first}"
    );
}

/// `--run-as` names a user looked up through the name service (in a
/// child, so the server never carries nsswitch's modules): one that does
/// not exist is refused at start in one line, and the server keeps no
/// name-service library mapped.
#[test]
fn run_as_is_looked_up_in_a_child() {
    if !need_root("run_as_is_looked_up_in_a_child") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    let refused = refused_start(
        Command::new(SERVER)
            .args(["--no-slot-uids", "--run-as", "no-such-user-here", "--listen", "127.0.0.1:0", "--nodes"])
            .arg(&nodes)
            .arg("--work-dir")
            .arg(dir.path().join("work")),
    );
    assert!(refused.contains("--run-as user 'no-such-user-here' does not exist"), "{refused}");
    let c = Cluster::start_with(1, &["--no-slot-uids", "--run-as", "nobody"]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", c.pid())).unwrap();
    assert!(!maps.contains("libnss_"), "the server mapped a name-service module:\n{maps}");
    let t = c.deploy(1, &job(c.dir.path(), "id.tar.gz", &["@id -un"]));
    let (_, outs) = c.retrieve(t);
    assert_eq!(outs[0].1.trim(), "nobody");
}

/// A perl DEPLOY of `Makefile` to 127.0.0.1:`port`, as the uid it runs as;
/// prints the reply's words.
const SELF_DEPLOY: &str = r#"use IO::Socket::INET;
my ($port) = @ARGV;
system("tar czf /tmp/child.tar.gz Makefile") == 0 or die "tar failed\n";
open my $f, '<:raw', '/tmp/child.tar.gz' or die; local $/; my $a = <$f>; close $f;
my $cred = pack('N N N N N', 0, 0, $<, $(+0, 0);
my $body = pack('N N N N N N', 0x5151, 0, 2, 0x2000C10D, 1, 1) . pack('N N', 1, length $cred) . $cred . pack('N N', 0, 0)
  . pack('N', 1) . pack('N', length $a) . $a . ("\0" x ((4 - length($a) % 4) % 4));
my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port") or die "connect: $!\n";
print $s pack('N', 0x80000000 | length $body) . $body;
read($s, my $m, 4) == 4 or die "no reply\n";
read($s, my $r, unpack('N', $m) & 0x7fffffff);
print "reply: @{[unpack('N*', $r)]}\n";
"#;

/// With `--allow-network` a job reached its own server as its slot uid and
/// deployed: a chain of jobs, each deploying the next, outlived every
/// ticket its deployer could close (they belonged to the slot uid), and
/// the uid's next tenants could retrieve or close them. Calls from the
/// uids replicas run as are refused (AUTH_TOOWEAK).
#[test]
fn a_job_cannot_deploy_jobs_to_its_own_server() {
    if !need_root("a_job_cannot_deploy_jobs_to_its_own_server") {
        return;
    }
    let c = Cluster::start_with(2, &["--allow-network"]);
    let port = c.addr.port();
    let mk = format!("run:\n\t@perl deploy.pl {port} || echo failed\n");
    let a = archive(c.dir.path(), "nest.tar.gz", &[("Makefile", &mk), ("deploy.pl", SELF_DEPLOY)]);
    let t = c.deploy(1, &a);
    let out = output(&c, t);
    let status = c.cloud(&["status", &(t + 1).to_string()]);
    assert!(!status.status.success(), "a job deployed ticket {}: {out}", t + 1);
    // xid, REPLY, MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK.
    assert!(out.contains("reply: 20817 1 1 1 5"), "{out}");
    assert!(c.log().contains("a replica's: refused"), "{}", c.log());
}
