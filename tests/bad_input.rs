//! Bad input on the wire never panics the server and never hurts other
//! clients: each gets the RFC's error reply or a clear CLOUD_* status.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use cloudinfra::proto::{self, CloudStat};
use cloudinfra::record::{frame, Event, RecordDecoder, Shape};
use cloudinfra::rpc;
use cloudinfra::xdr::XdrReader;
use common::*;

/// The next reply, however long the server takes.
fn read_reply_now(s: &mut TcpStream) -> Option<Vec<u8>> {
    read_reply(s, std::time::Duration::from_secs(60))
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect()
}

/// Reads until the server closes the connection.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn null_works(c: &Cluster) {
    let mut s = TcpStream::connect(c.addr).unwrap();
    s.write_all(&frame(&rpc::call(77, proto::CLOUD_PROG, 1, 0).into_bytes())).unwrap();
    let r = read_reply_now(&mut s).expect("NULL answered");
    assert_eq!(words(&r), vec![77, 1, 0, 0, 0, 0]);
}

#[test]
fn oversized_archive_gets_too_large_then_the_connection_closes() {
    let c = Cluster::start_with(1, &["--max-archive", "1K"]);
    let mut s = TcpStream::connect(c.addr).unwrap();
    let mut w = rpc::call(5, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(1).u32(1 << 20);
    let mut head = w.into_bytes();
    let mut wire = ((head.len() as u32 + (1 << 20)) | 0x8000_0000).to_be_bytes().to_vec();
    wire.append(&mut head);
    s.write_all(&wire).unwrap();
    let r = read_reply_now(&mut s).expect("a reply before closing");
    let mut x = XdrReader::new(&r[rpc::SUCCESS_HEADER_LEN..]);
    let Err((stat, msg)) = proto::decode_stat(&mut x).unwrap() else { panic!("expected an error") };
    assert_eq!(stat, CloudStat::TooLarge);
    assert!(msg.contains("--max-archive"), "{msg}");
    assert!(closed_by_server(&mut s));
    // The client program says the same in one line.
    let big = c.dir.path().join("big.tar.gz");
    let mut bytes = vec![0u8; 4096];
    bytes[..2].copy_from_slice(&[0x1f, 0x8b]); // gzip magic: past the client's own check
    std::fs::write(&big, bytes).unwrap();
    let out = c.cloud(&["deploy", "1", big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("archive too large"));
    null_works(&c);
}

#[test]
fn garbage_bytes_close_only_that_connection() {
    let c = Cluster::start(1);
    let mut bad = TcpStream::connect(c.addr).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let filler = vec![b'x'; 100 * 1024];
    let _ = bad.write_all(&filler);
    null_works(&c);
    assert!(closed_by_server(&mut bad));
    null_works(&c);
}

#[test]
fn bad_arguments_and_credentials_get_rfc_errors() {
    let c = Cluster::start(1);
    let mut s = TcpStream::connect(c.addr).unwrap();
    // STATUS without its ticket: GARBAGE_ARGS.
    s.write_all(&frame(&rpc::call(9, proto::CLOUD_PROG, 1, proto::STATUS).into_bytes())).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).unwrap()), vec![9, 1, 0, 0, 0, 4]);
    // RETRIEVE with a bool of 7: GARBAGE_ARGS.
    let mut w = rpc::call(10, proto::CLOUD_PROG, 1, proto::RETRIEVE);
    w.u32(1).u32(7);
    s.write_all(&frame(&w.into_bytes())).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).unwrap()), vec![10, 1, 0, 0, 0, 4]);
    // AUTH_DH credentials: MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK.
    let mut call = rpc::call(11, proto::CLOUD_PROG, 1, 0).into_bytes();
    call[24..28].copy_from_slice(&3u32.to_be_bytes());
    s.write_all(&frame(&call)).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).unwrap()), vec![11, 1, 1, 1, 5]);
    // A DEPLOY of 0 replicas: CLOUD_BAD_REPLICAS.
    let mut w = rpc::call(12, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(0).opaque(b"x");
    s.write_all(&frame(&w.into_bytes())).unwrap();
    let r = read_reply_now(&mut s).unwrap();
    assert_eq!(words(&r[rpc::SUCCESS_HEADER_LEN..rpc::SUCCESS_HEADER_LEN + 4]), vec![2]);
    // The connection is still good.
    s.write_all(&frame(&rpc::call(13, proto::CLOUD_PROG, 1, 0).into_bytes())).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).unwrap()), vec![13, 1, 0, 0, 0, 0]);
}

#[test]
fn a_client_that_vanishes_mid_archive_leaves_nothing_and_hurts_no_one() {
    let c = Cluster::start(1);
    let mut stalled = TcpStream::connect(c.addr).unwrap();
    let mut w = rpc::call(5, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(1).u32(1 << 20);
    let head = w.into_bytes();
    let mut wire = ((head.len() as u32 + (1 << 20)) | 0x8000_0000).to_be_bytes().to_vec();
    wire.extend_from_slice(&head);
    wire.extend_from_slice(&[1u8; 5000]);
    stalled.write_all(&wire).unwrap();
    // While that client stalls mid-record, others are served.
    let t = c.deploy(1, &job(c.dir.path(), "ok.tar.gz", &["@echo served"]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1 == "served\n");
    drop(stalled);
    null_works(&c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !spool_data(&c).is_empty() {
        assert!(std::time::Instant::now() < deadline, "partial archive left in the spool");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn queue_full_is_a_clear_error() {
    let c = Cluster::start_with(1, &["--max-queue", "1", "--allow-network"]);
    let gate = Gate::new();
    let blocker = job(c.dir.path(), "b.tar.gz", &gate.wait_recipe("b"));
    let t1 = c.deploy(1, &blocker);
    let (_, conn) = gate.arrive();
    let quick = job(c.dir.path(), "q.tar.gz", &["@echo q"]);
    let t2 = c.deploy(1, &quick);
    let out = c.cloud(&["deploy", "1", quick.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue full"), "{err}");
    release(conn);
    assert!(c.retrieve(t1).0);
    assert!(c.retrieve(t2).0);
}

/// Start a server that must refuse to start; its stderr. Slot uids of its
/// own (from `port`, as `Cluster` does): the default base may belong to a
/// server already running here.
fn refused_start(nodes: &std::path::Path, listen: &str, port: u16, work: &std::path::Path) -> String {
    let slot_base = (1_000_000 + u32::from(port) * 64).to_string();
    let out = std::process::Command::new(SERVER)
        .args(["--slot-uids", &slot_base, "--nodes"])
        .arg(nodes)
        .args(["--listen", listen, "--work-dir"])
        .arg(work)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_nodes_files_are_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for (text, want) in [
        ("2\n9001\n".to_string(), "announces 2 nodes"),
        ("1\nnine\n".to_string(), "line 2: 'nine' is not a port"),
        (format!("1\n{port}\n"), "already in use"),
    ] {
        let f = dir.path().join("nodes.txt");
        std::fs::write(&f, &text).unwrap();
        let err = refused_start(&f, "127.0.0.1:0", port, &dir.path().join("w"));
        assert!(err.contains(want), "{err:?} should contain {want:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    drop(taken);
    // A node process takes as many slots as a nodes file line may give.
    let out = std::process::Command::new(common::SERVER)
        .args(["node", "--listen", "127.0.0.1:0", "--slots", "257"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("257 is not in 1..=256"), "{err}");
}

/// A --listen port in use is refused in one line, before any slot
/// launcher starts (none adds a line of its own): held by a listener, the
/// line says to stop it or pick another; held only by a connection that
/// just closed (TIME-WAIT, which `ss -ltn` does not show), it says that.
#[test]
fn a_listen_port_in_use_is_refused_in_one_line_that_says_why() {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, "1\n0\n").unwrap();
    let refusal = |port: u16| refused_start(&nodes, &format!("127.0.0.1:{port}"), port, &dir.path().join("w"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = refusal(taken.local_addr().unwrap().port());
    assert!(err.contains("is already in use: stop what uses it or pick another port"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // A connection from a port of our choosing, closed by us first: the
    // port stays in TIME-WAIT with no listener.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    let port = nix::sys::socket::getsockname::<SockaddrIn>(fd.as_raw_fd()).unwrap().port();
    let to = peer.local_addr().unwrap().port();
    connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, to)).unwrap();
    let (mut accepted, _) = peer.accept().unwrap();
    drop(fd);
    assert_eq!(accepted.read(&mut [0u8; 1]).unwrap(), 0);
    drop(accepted);
    let time_wait = || {
        std::fs::read_to_string("/proc/net/tcp").unwrap().lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].ends_with(&format!(":{port:04X}")) && f[3] == "06"
        })
    };
    wait_until("the closed connection's port in TIME-WAIT", time_wait);
    let err = refusal(port);
    assert!(err.contains("held by a connection that just closed (TIME-WAIT"), "{err}");
    assert!(err.contains("pick another port"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn pipelined_calls_are_answered_in_order_one_at_a_time() {
    let c = Cluster::start(1);
    let t = c.deploy(1, &job(c.dir.path(), "p.tar.gz", &["@echo p"]));
    let mut s = TcpStream::connect(c.addr).unwrap();
    let mut wire = Vec::new();
    for xid in 0..500u32 {
        let mut w = rpc::call(1000 + xid, proto::CLOUD_PROG, 1, proto::STATUS);
        w.u32(t);
        wire.extend(frame(&w.into_bytes()));
    }
    // One write of 500 calls; the server reads on only as it answers.
    s.write_all(&wire).unwrap();
    let mut d = RecordDecoder::new(1 << 20, 0);
    let mut xids = Vec::new();
    let mut buf = [0u8; 4096];
    while xids.len() < 500 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "server closed after {} replies", xids.len());
        let mut rest = &buf[..n];
        loop {
            let (used, ev) = d.decode(rest, &mut |_| Shape::Whole);
            rest = &rest[used..];
            match ev {
                Some(Event::Record(r)) => xids.push(words(&r[..4])[0]),
                Some(other) => panic!("{other:?}"),
                None => break,
            }
        }
    }
    assert_eq!(xids, (1000..1500).collect::<Vec<u32>>(), "replies come in call order");
}

#[test]
fn a_half_closed_client_still_gets_its_answer() {
    let c = Cluster::start(1);
    let mut s = TcpStream::connect(c.addr).unwrap();
    let mut w = rpc::call(31, proto::CLOUD_PROG, 1, proto::STATUS);
    w.u32(12345);
    s.write_all(&frame(&w.into_bytes())).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = read_reply_now(&mut s).expect("answered after our FIN");
    assert_eq!(words(&r[..4]), vec![31]);
    let mut x = XdrReader::new(&r[rpc::SUCCESS_HEADER_LEN..]);
    assert!(matches!(proto::decode_stat(&mut x).unwrap(), Err((CloudStat::NoSuchTicket, _))));
    assert!(closed_by_server(&mut s));
}

#[test]
fn a_refused_deploy_is_refused_before_its_upload() {
    let c = Cluster::start_with(2, &["--max-archive", "1G"]);
    // 32 MiB that the server never needs to receive.
    let big = c.dir.path().join("big.tar.gz");
    let mut f = std::fs::File::create(&big).unwrap();
    f.write_all(&[0x1f, 0x8b]).unwrap(); // gzip magic: past the client's own check
    f.set_len(32 << 20).unwrap();
    let out = c.cloud(&["deploy", "3", big.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot run 3 replicas") && err.contains("2 nodes"), "{err}");
    assert_eq!(spool_data(&c), Vec::<std::path::PathBuf>::new());
    null_works(&c);
}

#[test]
fn nodes_serve_only_their_main_server() {
    let c = Cluster::start(1);
    let mut s = TcpStream::connect(("127.0.0.1", c.ports[0])).unwrap();
    let mut w = rpc::call(1, proto::NODE_PROG, 1, proto::NODE_NULL);
    w.u32(0);
    let _ = s.write_all(&frame(&w.into_bytes()));
    assert!(closed_by_server(&mut s), "a node answered a stranger");
    null_works(&c);
}

#[test]
fn a_client_that_pipelines_without_end_does_not_starve_others() {
    let c = Cluster::start(1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = TcpStream::connect(c.addr).unwrap();
    let mut reader = flood.try_clone().unwrap();
    let writer = {
        let stop = stop.clone();
        let mut flood = flood;
        std::thread::spawn(move || {
            let mut w = rpc::call(1, proto::CLOUD_PROG, 1, proto::STATUS);
            w.u32(1);
            let batch: Vec<u8> = (0..200).flat_map(|_| frame(&w.clone().into_bytes())).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if flood.write_all(&batch).is_err() {
                    break;
                }
            }
        })
    };
    // Drain the flooder's replies so the server is never held up by it.
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            let _ = n;
        }
    });
    for _ in 0..20 {
        let mut s = TcpStream::connect(c.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        s.write_all(&frame(&rpc::call(5, proto::CLOUD_PROG, 1, 0).into_bytes())).unwrap();
        assert!(read_reply_now(&mut s).is_some(), "starved by the flooding client");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn every_rpc_version_but_2_is_rpc_mismatch_2_2_even_on_a_streamed_deploy() {
    let c = Cluster::start(1);
    let mut s = TcpStream::connect(c.addr).unwrap();
    let v3 = |w: cloudinfra::xdr::XdrWriter| {
        let mut call = w.into_bytes();
        call[8..12].copy_from_slice(&3u32.to_be_bytes());
        call
    };
    s.write_all(&frame(&v3(rpc::call(1, proto::CLOUD_PROG, 1, proto::CLOUD_NULL)))).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).expect("NULL answered")), vec![1, 1, 1, 0, 2, 2]);
    let mut w = rpc::call(2, proto::CLOUD_PROG, 1, proto::STATUS);
    w.u32(1);
    s.write_all(&frame(&v3(w))).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).expect("STATUS answered")), vec![2, 1, 1, 0, 2, 2]);
    // A DEPLOY header that would stream a 1 MiB archive (more than any
    // buffered call may hold): the same answer, and the connection goes on.
    let len = 1u32 << 20;
    let mut w = rpc::call(3, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(1).u32(len);
    let head = v3(w);
    let mut wire = ((head.len() as u32 + len) | 0x8000_0000).to_be_bytes().to_vec();
    wire.extend_from_slice(&head);
    wire.extend(std::iter::repeat_n(0u8, len as usize));
    s.write_all(&wire).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).expect("DEPLOY answered")), vec![3, 1, 1, 0, 2, 2]);
    s.write_all(&frame(&rpc::call(77, proto::CLOUD_PROG, 1, 0).into_bytes())).unwrap();
    assert_eq!(words(&read_reply_now(&mut s).expect("then a NULL call")), vec![77, 1, 0, 0, 0, 0]);
}

#[test]
fn a_node_line_on_the_client_port_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    // A free port, used for both the client port and a node line.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let f = dir.path().join("nodes.txt");
    std::fs::write(&f, format!("1\n{port}\n")).unwrap();
    let err = refused_start(&f, &format!("127.0.0.1:{port}"), port, &dir.path().join("w"));
    assert!(err.contains(&format!("line 2: port {port} is also the client port")), "{err}");
    assert!(!err.contains("already in use"), "{err}");
}
