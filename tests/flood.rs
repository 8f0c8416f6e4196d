//! Floods and starvation from the network: idle connections by the
//! thousand, a slowloris, endless empty fragments, and a server at its
//! descriptor limit. Whatever they do, new clients are answered (or turned
//! away at once, never left hanging), normal jobs run and are retrieved, and
//! no answer claims an output that could not be read.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use cloudinfra::proto::{self, CloudStat};
use cloudinfra::record::{frame, LAST_FRAGMENT};
use cloudinfra::rpc;
use cloudinfra::xdr::XdrReader;
use common::*;

/// The server's descriptor limit (soft and hard) in these tests.
const NOFILE: u64 = 256;

/// Start the server with RLIMIT_NOFILE lowered to `n`, soft and hard, so it
/// cannot raise it again.
fn limit_fds(cmd: &mut Command, n: u64) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// This test process holds thousands of sockets: use its whole allowance.
fn raise_own_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    assert!(hard >= 3500, "these tests need RLIMIT_NOFILE >= 3500 (hard limit is {hard})");
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect within 5 s (not stuck in the backlog)")
}

/// The CLOUD_* status and message of an error reply.
fn error_of(reply: &[u8]) -> (CloudStat, String) {
    let mut x = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
    match proto::decode_stat(&mut x).expect("a cloud result") {
        Err(e) => e,
        Ok(()) => panic!("expected an error reply, got OK"),
    }
}

fn null_call(xid: u32) -> Vec<u8> {
    frame(&rpc::call(xid, proto::CLOUD_PROG, 1, proto::CLOUD_NULL).into_bytes())
}

/// A new client connects and its NULL call is answered within 5 s.
fn null_answered(addr: SocketAddr) -> bool {
    let mut s = connect(addr);
    s.write_all(&null_call(0x4e55)).is_ok() && read_reply(&s, Duration::from_secs(5)).is_some()
}

/// The start of a DEPLOY of a `len`-byte archive, with `sent` bytes of it.
fn deploy_start(xid: u32, len: u32, sent: usize) -> Vec<u8> {
    let mut w = rpc::call(xid, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(1).u32(len);
    let head = w.into_bytes();
    let pad = (4 - len % 4) % 4;
    let mut wire = ((head.len() as u32 + len + pad) | LAST_FRAGMENT).to_be_bytes().to_vec();
    wire.extend_from_slice(&head);
    // The upload begins like a real one (a gzip header), so the server's
    // archive check waits for more rather than refusing it at once.
    const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    wire.extend(GZIP_HEADER.iter().copied().chain(std::iter::repeat(0)).take(sent.min(GZIP_HEADER.len())));
    wire
}

/// A valid job archive of at least `size` bytes on the wire (stored, not
/// compressed, so its size is what is uploaded).
fn slow_archive(size: usize) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    for (name, body) in [("Makefile", b"run:\n\t@true\n".to_vec()), ("data", vec![7u8; size])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, &body[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// A whole DEPLOY call with this archive.
fn deploy_call(xid: u32, archive: &[u8]) -> Vec<u8> {
    let mut w = rpc::call(xid, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(1).opaque(archive);
    frame(&w.into_bytes())
}

/// Reads until the peer closes; true if that happens within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return true,
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn idle_floods_a_slowloris_and_few_descriptors_leave_jobs_and_new_clients_unharmed() {
    raise_own_nofile();
    let c = Cluster::start_tweaked(2, &["--idle-timeout", "3", "--call-timeout", "2"], |cmd| limit_fds(cmd, NOFILE));
    let base = c.fd_count();
    // The limit is lowered to what 256 descriptors leave room for, and logged.
    wait_until("the effective limit is logged", || c.log().contains("client connections (--max-connections 4096"));
    let logged = c.log();
    let max: usize = logged.split("up to ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
    assert!(max > 50 && max < 200, "{logged}");

    // 3,000 idle connections against a server allowed 256 descriptors.
    let idle: Vec<TcpStream> = (0..3000).map(|_| connect(c.addr)).collect();
    assert!(null_answered(c.addr), "a new client is answered during the flood");

    // A slowloris: one byte of a call every second.
    let addr = c.addr;
    let slowloris = std::thread::spawn(move || {
        let mut s = connect(addr);
        let call = null_call(0x510);
        let start = Instant::now();
        for b in call.iter() {
            if s.write_all(&[*b]).is_err() || closed_within(&mut s, Duration::from_secs(1)) {
                return Some(start.elapsed());
            }
        }
        None
    });

    // Normal jobs meanwhile.
    for round in 0..2 {
        let job = job(c.dir.path(), &format!("job{round}.tar.gz"), &["@echo hello-$$CLOUD_REPLICA"]);
        let t = c.deploy(2, &job);
        let (ok, outs) = c.retrieve(t);
        assert!(ok, "retrieve of ticket {t} succeeds");
        let mut texts: Vec<&str> = outs.iter().map(|(_, o)| o.trim()).collect();
        texts.sort();
        assert_eq!(texts, vec!["hello-0", "hello-1"], "{outs:?}");
        assert!(null_answered(c.addr));
    }

    let closed_after = slowloris.join().unwrap().expect("the slowloris is closed before finishing its call");
    assert!(closed_after >= Duration::from_millis(1500), "not before the call timeout: {closed_after:?}");
    assert!(closed_after <= Duration::from_secs(6), "within the call timeout (2 s) and a margin: {closed_after:?}");

    // The flood's survivors go after the idle timeout.
    wait_until("idle connections are closed", || c.fd_count() <= base + 2);
    drop(idle);
    let mut fresh = connect(c.addr);
    let start = Instant::now();
    assert!(closed_within(&mut fresh, Duration::from_secs(10)), "an idle connection is closed");
    let idle_for = start.elapsed();
    assert!(idle_for >= Duration::from_millis(2500), "not before --idle-timeout 3: {idle_for:?}");
    assert!(null_answered(c.addr));
}

#[test]
fn a_call_in_progress_or_a_reply_owed_is_not_idle() {
    let c = Cluster::start_with(1, &["--idle-timeout", "1", "--call-timeout", "2", "--allow-network"]);
    let gate = Gate::new();
    let job = job(c.dir.path(), "wait.tar.gz", &gate.wait_recipe("job"));
    let t = c.deploy(1, &job);
    let (_, held) = gate.arrive();
    // A RETRIEVE with wait is owed its reply for longer than both timeouts.
    let mut s = connect(c.addr);
    let mut w = rpc::call(0x77, proto::CLOUD_PROG, 1, proto::RETRIEVE);
    w.u32(t).u32(1);
    s.write_all(&frame(&w.into_bytes())).unwrap();
    assert!(!closed_within(&mut s, Duration::from_millis(3500)), "still open while its reply is owed");
    release(held);
    let reply = read_reply(&s, Duration::from_secs(20)).expect("the retrieve is answered");
    let mut x = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
    assert_eq!(x.u32().unwrap(), CloudStat::Ok as u32);
    // A slow but real upload: 64 KiB every 600 ms (4 s in all, over the 2 s
    // call timeout) is progress, not a slowloris.
    let mut up = connect(c.addr);
    let archive = slow_archive(6 * 65536);
    up.write_all(&deploy_start(0x88, archive.len() as u32, 0)).unwrap();
    for chunk in archive.chunks(65536) {
        std::thread::sleep(Duration::from_millis(600)); // the pace of a slow link, not synchronisation
        up.write_all(chunk).unwrap();
    }
    let pad = (4 - archive.len() % 4) % 4;
    up.write_all(&[0u8; 3][..pad]).unwrap();
    let reply = read_reply(&up, Duration::from_secs(10)).expect("the slow upload is answered");
    let mut x = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
    assert_eq!(&reply[..4], &0x88u32.to_be_bytes());
    assert_eq!(x.u32().unwrap(), CloudStat::Ok as u32, "heard out and accepted");
}

#[test]
fn endless_empty_fragments_are_refused_and_hurt_no_one() {
    let c = Cluster::start(1);
    let mut s = connect(c.addr);
    // A NULL call's head in a first fragment, then empty fragments without end.
    let call = rpc::call(0xe0, proto::CLOUD_PROG, 1, proto::CLOUD_NULL).into_bytes();
    let mut wire = (call.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&call);
    wire.extend(std::iter::repeat_n(0u8, 4 * 100_000));
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = s.write_all(&wire); // the server may hang up first
        })
    };
    let reply = read_reply(&s, Duration::from_secs(10)).expect("refused with an answer");
    assert_eq!(&reply[..4], &0xe0u32.to_be_bytes());
    assert_eq!(error_of(&reply).0, CloudStat::TooLarge);
    assert!(closed_within(&mut s, Duration::from_secs(10)), "and closed");
    writer.join().unwrap();
    assert!(null_answered(c.addr), "others are unaffected");
}

#[test]
fn at_the_descriptor_limit_deploy_and_retrieve_answer_errors_and_a_retry_gets_the_outputs() {
    raise_own_nofile();
    let c = Cluster::start_tweaked(1, &[], |cmd| limit_fds(cmd, NOFILE));
    let job = job(c.dir.path(), "real.tar.gz", &["@echo the-real-output"]);
    let archive = std::fs::read(&job).unwrap();
    // Raw connections, kept open: no client closes while descriptors are counted.
    let mut retr = connect(c.addr);
    let mut dep = connect(c.addr);
    dep.write_all(&deploy_call(0xd0, &archive)).unwrap();
    let reply = read_reply(&dep, Duration::from_secs(10)).expect("deployed");
    let mut x = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
    assert_eq!(x.u32().unwrap(), CloudStat::Ok as u32);
    let t = x.u32().unwrap();
    wait_until("the job completes", || {
        let mut w = rpc::call(0x5a, proto::CLOUD_PROG, 1, proto::STATUS);
        w.u32(t);
        (&retr).write_all(&frame(&w.into_bytes())).unwrap();
        let reply = read_reply(&retr, Duration::from_secs(10)).expect("status");
        let mut x = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
        assert_eq!(x.u32().unwrap(), CloudStat::Ok as u32);
        proto::JobStatus::decode(&mut x).unwrap().state == proto::JobState::Completed
    });
    let base = c.fd_count();

    // Uploads in progress, each holding a connection and a spool file...
    let mut hogs = Vec::new();
    while c.fd_count() as u64 + 2 <= NOFILE {
        let before = c.fd_count();
        let mut s = connect(c.addr);
        s.write_all(&deploy_start(hogs.len() as u32, 1 << 20, 10)).unwrap();
        wait_until("an upload is under way", || c.fd_count() >= before + 2);
        hogs.push(s);
    }
    // ...then connections until not one descriptor is left, each served
    // (a NULL call answered) so it is surely held. One that comes while
    // the server briefly holds one more descriptor (deferred work) is
    // turned away at EMFILE, and an upload cut by its call timeout frees
    // one: the loop goes on until the count is full.
    while (c.fd_count() as u64) < NOFILE {
        let mut s = connect(c.addr);
        if s.write_all(&null_call(0x4e)).is_ok() && read_reply(&s, Duration::from_secs(10)).is_some() {
            hogs.push(s);
        }
    }

    // A new client is turned away at once, not left in the backlog.
    let mut late = connect(c.addr);
    let _ = late.write_all(&null_call(1));
    assert!(closed_within(&mut late, Duration::from_secs(5)), "closed at once at EMFILE");

    // DEPLOY: a clear error, no ticket.
    dep.write_all(&deploy_call(0xde, &archive)).unwrap();
    let reply = read_reply(&dep, Duration::from_secs(10)).expect("the deploy is answered");
    let (stat, msg) = error_of(&reply);
    assert_eq!(stat, CloudStat::Internal, "{msg}");
    assert!(msg.contains("out of file descriptors") && msg.contains("retry"), "{msg}");

    // RETRIEVE: an error, never OK with a lost output.
    let mut w = rpc::call(0x7e, proto::CLOUD_PROG, 1, proto::RETRIEVE);
    w.u32(t).u32(1);
    retr.write_all(&frame(&w.into_bytes())).unwrap();
    let reply = read_reply(&retr, Duration::from_secs(10)).expect("the retrieve is answered");
    let (stat, msg) = error_of(&reply);
    assert_eq!(stat, CloudStat::Internal, "{msg}");
    assert!(msg.contains("could not read the outputs") && msg.contains("retry"), "{msg}");

    // Once the pressure goes, a retry gets the real outputs.
    drop(hogs);
    wait_until("the uploads are gone", || c.fd_count() <= base + 3);
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "the retry succeeds");
    assert_eq!(outs.len(), 1);
    assert!(outs[0].1.lines().any(|l| l == "the-real-output"), "{outs:?}");
    assert!(c.log().contains("out of file descriptors"), "{}", c.log());
}

#[test]
fn parked_waits_cannot_lock_other_clients_out() {
    // Every connection the server may hold is owed a deferred reply (a
    // JOB_INFO wait on a job that does not end); a new client still gets in:
    // the connection owed a reply the longest makes room.
    let c = Cluster::start_with(1, &["--max-connections", "8", "--allow-network"]);
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "hold.tar.gz", &gate.wait_recipe("held")));
    let (_, held) = gate.arrive();
    let mut parked = Vec::new();
    for i in 0..8u32 {
        let mut s = connect(c.addr);
        let mut w = rpc::call(0x900 + i, proto::CLOUD_PROG, 1, proto::JOB_INFO);
        w.u32(t).u32(1);
        s.write_all(&frame(&w.into_bytes())).unwrap();
        parked.push(s);
    }
    // Every call read by the server (its end of each connection has an
    // empty receive queue): all eight are parked, none idle.
    let sport = format!("sport = :{}", c.addr.port());
    wait_until("all eight calls are parked", || {
        let out = std::process::Command::new("ss").args(["-Htn", "state", "established", &sport]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let queues: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
        queues.len() == 8 && queues.iter().all(|q| *q == "0")
    });
    let out = c.cloud(&["status", &t.to_string()]);
    assert!(out.status.success(), "a new client is served: {}", String::from_utf8_lossy(&out.stderr));
    release(held);
}

#[test]
fn idle_connections_cost_the_server_little_memory() {
    // Issue 11: 10,000 idle connections within 7 MiB. A connection between
    // calls holds its socket and its peer's uid, not a reader, an outbox
    // and buffers: 50 to 120 bytes of the server's memory each, where it
    // was 620 (never called) to 890 (after a call).
    raise_own_nofile();
    let c = Cluster::start(1);
    // What one connection's first call makes the server allocate for good
    // (the read buffer, the coordinator's first reply) is in the baseline.
    for _ in 0..3 {
        assert!(null_answered(c.addr));
    }
    let before = rss_anon(c.pid());
    const HELD: usize = 3000;
    let mut held: Vec<TcpStream> = (0..HELD).map(|_| connect(c.addr)).collect();
    // Each makes a call and goes idle again: at rest like a new one.
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(&null_call(i as u32)).unwrap();
        assert!(read_reply(s, Duration::from_secs(10)).is_some(), "connection {i} is answered");
    }
    assert!(null_answered(c.addr), "a new client is answered with them held");
    let grown = rss_anon(c.pid()).saturating_sub(before);
    let per = grown / HELD as u64;
    assert!(per <= 250, "{HELD} idle connections grew the server's anonymous memory by {grown} bytes ({per} each)");
    drop(held);
}
