//! Who may do what, and at-most-once: a ticket belongs to the uid that
//! deployed it (verified by the kernel for loopback clients), ticket numbers
//! are never issued twice (restarts, kill -9), a retried DEPLOY or CLOSE
//! happens once, and servers do not share a work dir or slot uids.
//! Tests that run clients as another uid need root; CI runs as root.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cloudinfra::proto::{self, CloudStat};
use cloudinfra::rpc::{self, AuthSys};
use common::*;

const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;

/// Run the real client as `uid` against `c`.
fn cloud_as(c: &Cluster, uid: u32, args: &[&str]) -> Output {
    Command::new(client())
        .args(args)
        .arg("--server")
        .arg(c.addr.to_string())
        .uid(uid)
        .gid(uid)
        .current_dir("/")
        .output()
        .expect("run cloud client as another uid")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A directory everybody may read and enter (tempdirs are 0700).
fn open_dir(c: &Cluster) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = c.dir.path().join("shared");
    std::fs::create_dir_all(&d).unwrap();
    for p in [c.dir.path(), d.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    d
}

fn ticket_of(out: &Output) -> u32 {
    assert!(out.status.success(), "deploy failed: {}", text(&out.stderr));
    text(&out.stdout).trim().strip_prefix("Job ticket#: ").and_then(|t| t.parse().ok()).expect("ticket line")
}

#[test]
fn another_uid_cannot_retrieve_or_close_a_ticket_but_root_can_and_status_is_open() {
    if !need_root("another_uid_cannot_retrieve_or_close_a_ticket_but_root_can_and_status_is_open") {
        return;
    }
    let c = Cluster::start(1);
    let dir = open_dir(&c);
    let job = job(&dir, "hello.tar.gz", &["@echo hello from the owner"]);
    let t = ticket_of(&cloud_as(&c, NOBODY, &["deploy", "1", job.to_str().unwrap()]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");
    let ts = t.to_string();

    // Another user: STATUS yes, RETRIEVE and CLOSE no.
    let st = cloud_as(&c, OTHER, &["status", &ts]);
    assert!(st.status.success(), "status is open to all: {}", text(&st.stderr));
    let out_dir = dir.join("stolen");
    let r = cloud_as(&c, OTHER, &["retrieve", &ts, out_dir.to_str().unwrap()]);
    let why = text(&r.stderr);
    assert!(!r.status.success(), "another uid retrieved ticket {t}: {}", text(&r.stdout));
    assert!(
        why.contains(&format!("ticket {t} belongs to uid {NOBODY}; only its owner or root may retrieve or close it")),
        "{why}"
    );
    assert!(!out_dir.exists(), "a refused retrieve made {}", out_dir.display());
    let close = cloud_as(&c, OTHER, &["retrieve", &ts]);
    assert!(!close.status.success(), "another uid closed ticket {t}");
    assert!(text(&close.stderr).contains("belongs to uid 65534"), "{}", text(&close.stderr));

    // The ticket is intact, and root may retrieve it.
    assert_eq!(c.status_json(t)["status"], "COMPLETED");
    let (ok, files) = c.retrieve(t);
    assert!(ok, "root retrieves any ticket");
    assert_eq!(files.len(), 1);
    assert!(files[0].1.contains("hello from the owner"), "{files:?}");
}

#[test]
fn the_owner_retrieves_and_closes_its_own_ticket() {
    if !need_root("the_owner_retrieves_and_closes_its_own_ticket") {
        return;
    }
    let c = Cluster::start(1);
    let dir = open_dir(&c);
    let job = job(&dir, "mine.tar.gz", &["@echo mine"]);
    let t = ticket_of(&cloud_as(&c, NOBODY, &["deploy", "1", job.to_str().unwrap()]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");
    let out = cloud_as(&c, NOBODY, &["retrieve", &t.to_string()]);
    assert!(out.status.success(), "the owner may close: {}", text(&out.stderr));
}

/// A STATUS call with an AUTH_SYS credential claiming `uid`, framed.
fn status_claiming(xid: u32, uid: u32, ticket: u32) -> Vec<u8> {
    let cred = AuthSys { stamp: 1, machinename: "forger".into(), uid, gid: uid, gids: vec![] };
    let mut w = rpc::call_sys(xid, proto::CLOUD_PROG, proto::CLOUD_VERS, proto::STATUS, &cred);
    w.u32(ticket);
    frame(&w.into_bytes())
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32 | 0x8000_0000).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// The reply words after the record mark: xid, REPLY, reply_stat, ...
fn reply_words(bytes: &[u8]) -> Vec<u32> {
    bytes[4..].chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn a_forged_auth_sys_uid_is_refused() {
    let c = Cluster::start(1);
    let me = nix::unistd::Uid::effective().as_raw();
    // This process claims to be someone else: MSG_DENIED, AUTH_ERROR, AUTH_BADCRED.
    let mut s = TcpStream::connect(c.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&status_claiming(0x51, me.wrapping_add(1), 1)).unwrap();
    let mut reply = [0u8; 24];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply_words(&reply), vec![0x51, 1, 1, 1, rpc::AUTH_BADCRED], "a lie about the uid is refused");
    // The truth is served on the same connection.
    s.write_all(&status_claiming(0x52, me, 1)).unwrap();
    let mut head = [0u8; 36];
    s.read_exact(&mut head).unwrap();
    let w = reply_words(&head);
    assert_eq!((w[0], w[2], w[5], w[6]), (0x52, 0, 0, CloudStat::NoSuchTicket as u32));
    wait_until("the server logs the forgery", || c.log().contains("AUTH_SYS claims uid"));

    if !need_root("a_forged_auth_sys_uid_is_refused (as a non-root claiming root)") {
        return;
    }
    // A non-root process claiming uid 0, with nothing but bash.
    let hex: String = status_claiming(0x53, 0, 1).iter().map(|b| format!("\\x{b:02x}")).collect();
    let script =
        format!("exec 3<>/dev/tcp/127.0.0.1/{}; printf '{hex}' >&3; head -c 24 <&3 | od -An -tx1 -v", c.addr.port());
    let out = Command::new("bash").args(["-c", &script]).uid(NOBODY).gid(NOBODY).current_dir("/").output().unwrap();
    let got: String = text(&out.stdout).split_whitespace().collect();
    // Record mark, xid, REPLY, MSG_DENIED, AUTH_ERROR, AUTH_BADCRED.
    assert_eq!(got, "800000140000005300000001000000010000000100000001", "{}", text(&out.stderr));
}

#[test]
fn retrieve_of_an_unknown_ticket_creates_no_directory() {
    let c = Cluster::start(1);
    let dir = c.dir.path().join("never-made");
    let out = c.cloud(&["retrieve", "4242", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no such ticket: 4242"), "{}", text(&out.stderr));
    assert!(!dir.exists(), "retrieve of an unknown ticket made {}", dir.display());
}

/// A DEPLOY with fixed xid and credentials, as bytes on the wire.
fn deploy_bytes(xid: u32, archive: &[u8]) -> Vec<u8> {
    let me = nix::unistd::Uid::effective().as_raw();
    let cred = AuthSys { stamp: 7, machinename: "retry".into(), uid: me, gid: 0, gids: vec![] };
    let mut w = rpc::call_sys(xid, proto::CLOUD_PROG, proto::CLOUD_VERS, proto::DEPLOY, &cred);
    w.u32(1).opaque(archive);
    frame(&w.into_bytes())
}

fn close_bytes(xid: u32, ticket: u32) -> Vec<u8> {
    let me = nix::unistd::Uid::effective().as_raw();
    let cred = AuthSys { stamp: 7, machinename: "retry".into(), uid: me, gid: 0, gids: vec![] };
    let mut w = rpc::call_sys(xid, proto::CLOUD_PROG, proto::CLOUD_VERS, proto::CLOSE, &cred);
    w.u32(ticket);
    frame(&w.into_bytes())
}

/// Send one call on a new connection; the reply's result words.
fn one_call(addr: SocketAddr, bytes: &[u8]) -> Vec<u32> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut mark = [0u8; 4];
    s.read_exact(&mut mark).unwrap();
    let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
    s.read_exact(&mut body).unwrap();
    body.chunks(4).skip(6).map(|c| u32::from_be_bytes(c.try_into().unwrap_or([0; 4]))).collect()
}

#[test]
fn the_same_deploy_sent_three_times_makes_one_job_and_a_retried_close_succeeds() {
    let c = Cluster::start(1);
    let archive = std::fs::read(job(c.dir.path(), "once.tar.gz", &["@echo once"])).unwrap();
    let call = deploy_bytes(0xD0D0_0001, &archive);
    let replies: Vec<_> = (0..3).map(|_| one_call(c.addr, &call)).collect();
    let t = replies[0][1];
    assert_eq!(replies[0][0], CloudStat::Ok as u32);
    assert_eq!(replies, vec![vec![0, t]; 3], "a retried DEPLOY gets the first reply");
    assert_eq!(c.wait_status(t, |s| s["status"] == "COMPLETED")["replicas"].as_array().unwrap().len(), 1);
    // No other job was made: the next deploy gets the next number.
    let next = c.deploy(1, &job(c.dir.path(), "next.tar.gz", &["@true"]));
    assert_eq!(next, t + 1, "the retries made jobs of their own");
    // The same xid from another call is not a retry.
    let other = one_call(c.addr, &deploy_bytes(0xD0D0_0002, &archive));
    assert_eq!(other, vec![0, t + 2]);

    let close = close_bytes(0xC105_0001, t);
    assert_eq!(one_call(c.addr, &close), vec![0]);
    assert_eq!(one_call(c.addr, &close), vec![0], "a retried CLOSE is answered OK again");
    // A new CLOSE of the same ticket is told the truth.
    let again = one_call(c.addr, &close_bytes(0xC105_0002, t));
    assert_eq!(again[0], CloudStat::NoSuchTicket as u32);
}

/// A proxy that breaks the first connection right after the server's
/// reply arrives (the client never sees it), then forwards the next one.
fn reply_eating_proxy(upstream: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (first, _) = l.accept().unwrap();
        let up = TcpStream::connect(upstream).unwrap();
        let mut to_server = up.try_clone().unwrap();
        let mut from_client = first.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_server);
        });
        let mut byte = [0u8; 1];
        let _ = (&up).read(&mut byte); // the reply begins: drop both ends
        let _ = first.shutdown(std::net::Shutdown::Both);
        let _ = up.shutdown(std::net::Shutdown::Both);
        let (second, _) = l.accept().unwrap();
        let up = TcpStream::connect(upstream).unwrap();
        let (mut a, mut b) = (second.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut a, &mut b);
        });
        let (mut a, mut b) = (up, second);
        let _ = std::io::copy(&mut a, &mut b);
    });
    addr
}

#[test]
fn a_client_whose_connection_breaks_retries_once_and_the_job_runs_once() {
    let c = Cluster::start(1);
    let proxy = reply_eating_proxy(c.addr);
    let job = job(c.dir.path(), "retry.tar.gz", &["@echo retried"]);
    let out = Command::new(client())
        .args(["deploy", "1", job.to_str().unwrap(), "--server", &proxy.to_string()])
        .output()
        .unwrap();
    let t = ticket_of(&out);
    assert!(text(&out.stderr).contains("retried once with the same xid"), "{}", text(&out.stderr));
    let next = c.deploy(1, &job);
    assert_eq!(next, t + 1, "the retried DEPLOY ran twice");
    wait_until("both jobs are logged", || c.log().matches("accepted from").count() >= 2);
    assert_eq!(c.log().matches("accepted from").count(), 2, "{}", c.log());
}

/// Start a server on `work` with the nodes of `nodes_file`; the child and
/// its first line (ready line or error). Callers wait for the child.
#[allow(clippy::zombie_processes)]
fn server(nodes_file: &Path, work: &Path, slot_base: u32) -> (Reaped, String, BufReader<std::process::ChildStderr>) {
    let mut child = Reaped(
        Command::new(SERVER)
            .args(["--slot-uids", &slot_base.to_string(), "--listen", "127.0.0.1:0", "--nodes"])
            .arg(nodes_file)
            .arg("--work-dir")
            .arg(work)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0
            || line.contains("listening on")
            || line.starts_with("cloud-server:")
        {
            return (child, line, lines);
        }
    }
}

/// The server must refuse to start: its one line, once it has exited.
fn refused(mut child: Reaped, line: String) -> String {
    if line.contains("listening on") {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the server started: {line}");
    }
    assert!(!child.wait().unwrap().success());
    line
}

fn nodes_file(dir: &Path, n: usize) -> PathBuf {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let mut text = format!("{n}\n");
    for l in &ls {
        text.push_str(&format!("{}\n", l.local_addr().unwrap().port()));
    }
    let path = dir.join(format!("nodes-{}.txt", ls[0].local_addr().unwrap().port()));
    std::fs::write(&path, text).unwrap();
    path
}

fn addr_of(ready: &str) -> String {
    ready.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).expect("ready line").to_string()
}

fn deploy_to(addr: &str, job: &Path) -> u32 {
    let out = Command::new(client()).args(["deploy", "1", job.to_str().unwrap(), "--server", addr]).output().unwrap();
    ticket_of(&out)
}

#[test]
fn ticket_numbers_are_never_reused_across_restarts_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let nodes = nodes_file(dir.path(), 1);
    let slot = 6_000_000 + std::process::id() % 10_000 * 8;
    let job = job(dir.path(), "t.tar.gz", &["@true"]);

    let (mut first, ready, _l1) = server(&nodes, &work, slot);
    let a = addr_of(&ready);
    let issued = [deploy_to(&a, &job), deploy_to(&a, &job)];
    first.kill().unwrap(); // SIGKILL: no clean shutdown
    first.wait().unwrap();

    let (mut second, ready, _l2) = server(&nodes, &work, slot);
    let b = addr_of(&ready);
    let after_crash = deploy_to(&b, &job);
    assert!(after_crash > issued[1], "ticket {after_crash} after a kill -9 reuses a number up to {}", issued[1]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    second.wait().unwrap();

    let (mut third, ready, _l3) = server(&nodes, &work, slot);
    let after_stop = deploy_to(&addr_of(&ready), &job);
    assert!(after_stop > after_crash, "ticket {after_stop} after a restart reuses a number up to {after_crash}");
    assert_eq!(
        after_stop,
        after_crash + 1,
        "a clean stop gives unused numbers back: numbering goes on where it stopped"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(third.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    third.wait().unwrap();

    // A damaged counter stops the server with a line that says what to do.
    std::fs::write(work.join("tickets"), "not a number").unwrap();
    let (fourth, line, _l4) = server(&nodes, &work, slot);
    let line = refused(fourth, line);
    assert!(line.contains("ticket counter") && line.contains("damaged"), "{line}");
}

#[test]
fn a_second_server_on_the_same_work_dir_or_slot_uids_is_refused() {
    let c = Cluster::start(1);
    let other = tempfile::tempdir().unwrap();
    let nodes = nodes_file(other.path(), 1);
    let (second, line, _l) = server(&nodes, &c.work(), 7_000_000 + std::process::id() % 10_000 * 8);
    let line = refused(second, line);
    let want = format!("work dir {} is in use by another cloud-server (pid {})", c.work().display(), c.pid());
    assert!(line.contains(&want) && line.contains("pick another --work-dir"), "{line}");
    // The first one is untouched.
    let t = c.deploy(1, &job(c.dir.path(), "still.tar.gz", &["@true"]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");

    if !need_root("a_second_server_on_the_same_work_dir_or_slot_uids_is_refused (slot uids)") {
        return;
    }
    // Cluster::start derives its slot uid base from its first port.
    let base = 1_000_000 + u32::from(c.ports[0]) * 64;
    let (third, line, _l) = server(&nodes, &other.path().join("work"), base);
    let line = refused(third, line);
    let want = format!("slot uid {base} is in use by cloud-server pid {}: pick another --slot-uids base", c.pid());
    assert!(line.contains(&want), "{line}");
}

#[test]
fn a_client_that_sends_a_close_and_hangs_up_at_once_is_nobody() {
    if !need_root("a_client_that_sends_a_close_and_hangs_up_at_once_is_nobody") {
        return;
    }
    // Once its process has closed it, the kernel shows a socket as a
    // time-wait socket owned by uid 0: that must not pass for root.
    let c = Cluster::start(1);
    let dir = open_dir(&c);
    let job = job(&dir, "keep.tar.gz", &["@echo kept"]);
    let t = ticket_of(&cloud_as(&c, NOBODY, &["deploy", "1", job.to_str().unwrap()]));
    let mut w = rpc::call(0x99, proto::CLOUD_PROG, proto::CLOUD_VERS, proto::CLOSE);
    w.u32(t);
    let hex: String = frame(&w.into_bytes()).iter().map(|b| format!("\\x{b:02x}")).collect();
    let script = format!(
        "for i in $(seq 50); do exec 3<>/dev/tcp/127.0.0.1/{}; printf '{hex}' >&3; exec 3>&-; done",
        c.addr.port()
    );
    // The server is stopped while they connect, send and hang up, so it
    // accepts each only after its socket was closed.
    let pid = nix::unistd::Pid::from_raw(c.pid() as i32);
    let fds = c.fd_count();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let out = Command::new("bash").args(["-c", &script]).uid(OTHER).gid(OTHER).current_dir("/").output();
    // Until their FINs are acknowledged the closed sockets are still full
    // sockets (FIN_WAIT1); after, the kernel keeps only time-wait stubs.
    let rem = if cfg!(target_endian = "little") {
        format!("0100007F:{:04X}", c.addr.port())
    } else {
        format!("7F000001:{:04X}", c.addr.port())
    };
    wait_until("the hang-ups are acknowledged", || {
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        !tcp.lines().any(|l| l.split_whitespace().nth(2) == Some(&rem) && l.split_whitespace().nth(3) == Some("04"))
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the server has read and closed every connection", || c.fd_count() <= fds);
    assert!(cloud_as(&c, OTHER, &["status", &t.to_string()]).status.success(), "ticket {t} was closed by uid {OTHER}");
    assert!(!c.log().contains(&format!("ticket {t}: closed")), "{}", c.log());
}

#[test]
fn a_large_retried_deploy_is_answered_before_its_upload() {
    let c = Cluster::start(1);
    // Incompressible filler makes the archive larger than one buffered call (64 KiB).
    let mut noise = String::new();
    let mut x: u32 = 12345;
    while noise.len() < 200_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push_str(&format!("{x:08x}"));
    }
    let path = archive(c.dir.path(), "big.tar.gz", &[("Makefile", "run:\n\t@echo big\n"), ("noise.txt", &noise)]);
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.len() > 64 * 1024, "{} bytes", bytes.len());
    let call = deploy_bytes(0xB16_0001, &bytes);
    let first = one_call(c.addr, &call);
    assert_eq!(first[0], CloudStat::Ok as u32);
    assert_eq!(one_call(c.addr, &call), first, "the retry gets the first reply");
    c.wait_status(first[1], |s| s["status"] == "COMPLETED");
    assert_eq!(c.deploy(1, &job(c.dir.path(), "after.tar.gz", &["@true"])), first[1] + 1);
}

#[test]
fn the_client_gives_up_on_a_silent_server() {
    // Accepts (the kernel does, from the backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let out = Command::new(client()).args(["status", "1", "--timeout", "1", "--server", &addr]).output().unwrap();
    assert!(!out.status.success());
    let why = text(&out.stderr);
    assert!(why.contains(&format!("no answer from the cloud server at {addr} within 1s")), "{why}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    drop(silent);
}

#[test]
fn a_failed_write_leaves_no_part_file_and_the_ticket_open() {
    let c = Cluster::start(1);
    let t = c.deploy(1, &job(c.dir.path(), "much.tar.gz", &["@seq 1 20000"]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");
    let dir = c.dir.path().join("full");
    // Files over 1 KiB cannot be written (EFBIG; SIGXFSZ ignored).
    let script =
        format!("trap '' XFSZ; ulimit -f 1; exec {} retrieve {t} {} --server {}", client(), dir.display(), c.addr);
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(!out.status.success(), "the write should have failed");
    assert!(text(&out.stderr).contains("cannot write"), "{}", text(&out.stderr));
    let left: Vec<_> =
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The ticket stays open: a retry with room succeeds.
    let (ok, files) = c.retrieve(t);
    assert!(ok);
    assert!(files[0].1.contains("\n20000\n"));
}

#[test]
fn the_same_deploy_uploaded_on_two_connections_at_once_makes_one_job() {
    let c = Cluster::start(1);
    let archive = std::fs::read(job(c.dir.path(), "twice.tar.gz", &["@echo twice"])).unwrap();
    let call = deploy_bytes(0x2222_0001, &archive);
    let (head, last) = call.split_at(call.len() - 1);
    let mut conns: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(c.addr).unwrap()).collect();
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(head).unwrap();
    }
    let mut tickets = Vec::new();
    for s in &mut conns {
        s.write_all(last).unwrap();
        let mut reply = [0u8; 36];
        s.read_exact(&mut reply).unwrap();
        let w = reply_words(&reply);
        assert_eq!(w[6], CloudStat::Ok as u32);
        tickets.push(w[7]);
    }
    assert_eq!(tickets[0], tickets[1], "two jobs from one call");
    assert_eq!(c.deploy(1, &job(c.dir.path(), "then.tar.gz", &["@true"])), tickets[0] + 1);
}

/// The slot uid range a ready line names ("slot uids A..B").
fn slot_range(ready: &str) -> std::ops::RangeInclusive<u32> {
    let r = ready.split("slot uids ").nth(1).and_then(|r| r.split([',', ';', ' ']).next()).expect("slot uids");
    let (a, b) = r.split_once("..").expect("A..B");
    a.parse().unwrap()..=b.parse().unwrap()
}

#[test]
fn servers_without_slot_uids_given_take_blocks_of_their_own() {
    if !need_root("servers_without_slot_uids_given_take_blocks_of_their_own") {
        return;
    }
    // Two students' servers on one lab machine, neither naming a base.
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let nodes = nodes_file(dir.path(), 2);
        let mut child = Reaped(
            Command::new(SERVER)
                .args(["--listen", "127.0.0.1:0", "--nodes"])
                .arg(&nodes)
                .arg("--work-dir")
                .arg(dir.path().join(name))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
            assert!(!line.starts_with("cloud-server:"), "refused: {line}");
            line.clear();
        }
        (child, line, lines)
    };
    let (_a, first, _la) = start("a");
    let (_b, second, _lb) = start("b");
    let (x, y) = (slot_range(&first), slot_range(&second));
    assert!(x.end() < y.start() || y.end() < x.start(), "{first}\n{second}");
}
