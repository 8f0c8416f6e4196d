//! Remote nodes: a main server whose nodes are `cloud-server node`
//! processes on 127.0.0.x addresses, linked over TCP (issue 9).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::node_proc::NodeProc;
use common::*;

/// Times the main server logged that the link to `addr` came up.
fn ups(c: &Cluster, addr: &str) -> usize {
    c.log().matches(&format!("link to node {addr} is up")).count()
}

fn replica_on<'a>(st: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    st["replicas"].as_array().unwrap().iter().find(|r| r["node"] == addr).expect("a replica on that node")
}

#[test]
fn jobs_run_on_remote_nodes_a_killed_node_loses_only_its_replica_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = NodeProc::start("127.0.0.2", None, &dir.path().join("a"));
    let b = NodeProc::start("127.0.0.3", None, &dir.path().join("b"));
    let c = Cluster::start_lines(&[a.addr.clone(), b.addr.clone()], &["--allow-network"]);
    wait_until("both links are up", || ups(&c, &a.addr) == 1 && ups(&c, &b.addr) == 1);

    // A job runs there: each replica on its own node, output retrieved.
    let quick = job(c.dir.path(), "q.tar.gz", &["@echo hi from $$CLOUD_NODE_PORT"]);
    let t = c.deploy(2, &quick);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    let ports: Vec<u16> = outs.iter().map(|(p, _)| *p).collect();
    assert_eq!(ports, {
        let mut v = vec![a.port(), b.port()];
        v.sort();
        v
    });
    assert!(outs.iter().all(|(p, text)| text.contains(&format!("hi from {p}"))), "{outs:?}");

    // kill -9 of a node mid-job: its replica is INVALID "node lost", the other finishes.
    let gate = Gate::new();
    let held = job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g"));
    let t = c.deploy(2, &held);
    let (_, g1) = gate.arrive();
    let (_, g2) = gate.arrive();
    let killed_at = Instant::now();
    a.kill9();
    let st = c.wait_status(t, |st| replica_on(st, &a.addr)["status"] == "INVALID");
    assert!(killed_at.elapsed() < Duration::from_secs(15), "noticed within the documented bound");
    let lost = replica_on(&st, &a.addr);
    assert!(lost["message"].as_str().unwrap().contains("node lost"), "{lost}");
    assert_eq!(replica_on(&st, &b.addr)["status"], "RUNNING", "{st}");
    release(g1);
    release(g2);
    let st = c.wait_status(t, |st| replica_on(st, &b.addr)["status"] == "COMPLETED");
    assert_eq!(replica_on(&st, &a.addr)["status"], "INVALID", "{st}");
    let (_, outs) = c.retrieve(t);
    assert!(outs.iter().any(|(p, text)| *p == b.port() && text.contains("released g")), "{outs:?}");

    // The restarted node rejoins by itself and takes work.
    let a2 = NodeProc::start("127.0.0.2", Some(a.port()), &dir.path().join("a"));
    wait_until("the restarted node rejoins", || ups(&c, &a2.addr) == 2);
    let t = c.deploy(2, &quick);
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    assert!(outs.iter().any(|(p, text)| *p == a2.port() && text.contains("hi from")), "{outs:?}");
    drop(a2);
    drop(b);
    assert!(a.log().contains("listening on"));
}

#[test]
fn a_node_down_at_start_joins_later_and_runs_the_waiting_job() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.4:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.4:{port}");
    // Start-up does not wait for it.
    let started = Instant::now();
    let c = Cluster::start_lines(std::slice::from_ref(&addr), &[]);
    assert!(started.elapsed() < Duration::from_secs(10));
    let t = c.deploy(1, &job(c.dir.path(), "w.tar.gz", &["@echo waited"]));
    assert_eq!(c.status_json(t)["status"], "WAITING");
    let node = NodeProc::start("127.0.0.4", Some(port), &dir.path().join("n"));
    wait_until("the node joins", || ups(&c, &node.addr) == 1);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    assert_eq!(outs.len(), 1);
    assert!(outs[0].1.contains("waited"), "{outs:?}");
}

#[test]
fn a_node_refuses_a_non_loopback_listen_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(SERVER);
    cmd.args(["node", "--listen", "0.0.0.0:0", "--work-dir"]).arg(dir.path().join("w"));
    let err = refused_start(&mut cmd);
    assert!(err.contains("refusing to listen on 0.0.0.0:0 without a shared secret"), "{err}");
    assert!(err.contains("--secret-file"), "{err}");
    // Nor does a main server link to a node on another host without one.
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, "1\n192.0.2.1:9001\n").unwrap();
    let mut cmd = Command::new(SERVER);
    cmd.args(["--listen", "127.0.0.1:0", "--nodes"]).arg(&nodes).arg("--work-dir").arg(dir.path().join("m"));
    let err = refused_start(&mut cmd);
    assert!(err.contains("line 2") && err.contains("not on loopback"), "{err}");
}

#[test]
fn a_replica_outlives_its_main_server_until_a_new_one_drops_it_and_the_node_serves_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.5", None, &dir.path().join("n"));
    let mut first = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&first, &node.addr) == 1);
    let gate = Gate::new();
    first.deploy(1, &job(first.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
    let (_, conn) = gate.arrive();
    first.stop_with(nix::sys::signal::Signal::SIGKILL);
    // The replica runs on: a main server that comes back asks for it.
    wait_until("the node logs it", || node.log().contains("link is gone; ticket 1's replica runs on"));
    // Another main server (no journal of that job) links: the node drops
    // the ticket it does not want (the job's end of the gate closes) ...
    let second = Cluster::start_lines(std::slice::from_ref(&node.addr), &[]);
    wait_until("the new link is up", || ups(&second, &node.addr) == 1);
    let mut r = BufReader::new(conn);
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "the replica is gone: {rest}");
    wait_until("the node logs the drop", || node.log().contains("does not want it (any more): dropped"));
    // ... and runs its job there.
    let t = second.deploy(1, &job(second.dir.path(), "q.tar.gz", &["@echo second"]));
    let (ok, outs) = second.retrieve(t);
    assert!(ok, "{outs:?}");
    assert!(outs[0].1.contains("second"), "{outs:?}");
}

#[test]
fn a_remote_replica_survives_a_kill_9_of_the_main_server_and_is_reported_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.14", None, &dir.path().join("n"));
    let mut c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&c, &node.addr) == 1);
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
    let (_, held) = gate.arrive();
    // The start is in the journal (its record names the node; synced
    // within a second).
    let journal = c.work().join("journal");
    let on_disk =
        |what: &str| std::fs::read(&journal).is_ok_and(|b| b.windows(what.len()).any(|w| w == what.as_bytes()));
    wait_until("the start is journaled", || on_disk(&node.addr));
    c.restart(nix::sys::signal::Signal::SIGKILL);
    wait_until("the restarted server links again", || ups(&c, &node.addr) >= 1);
    let st = c.status_json(t);
    assert_eq!(st["replicas"][0]["status"], "RUNNING", "still running over there: {st}");
    release(held);
    let st = c.wait_status(t, |st| st["status"] == "COMPLETED");
    assert_eq!(st["replicas"][0]["node"], node.addr.as_str(), "{st}");
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1.contains("released g"), "{outs:?}");
}

/// `cloud-server` (or `cloud-server node`) as `args` say: up to and with
/// its first `cloud-server...` line; it is killed once that line is read.
fn first_line(args: &[&str]) -> String {
    let mut server = Reaped(
        Command::new(SERVER)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cloud-server"),
    );
    let mut err = BufReader::new(server.stderr.take().expect("stderr"));
    let mut text = String::new();
    while err.read_line(&mut text).unwrap_or(0) > 0 && !text.contains("cloud-server") {}
    text
}

#[test]
fn a_main_server_and_a_node_with_the_same_secret_run_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), "secret", "the same secret, 32 bytes long!!", None);
    let secret = secret.to_str().unwrap();
    let node = NodeProc::start_with("127.0.0.6", None, &dir.path().join("n"), &["--secret-file", secret]);
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--secret-file", secret]);
    wait_until("the authenticated link is up", || ups(&c, &node.addr) == 1);
    wait_until("the node logs the handshake", || node.log().contains("awaiting its proof of the shared secret"));
    let t = c.deploy(1, &job(c.dir.path(), "q.tar.gz", &["@echo authenticated on $$CLOUD_NODE_PORT"]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    assert_eq!(outs.len(), 1);
    assert!(outs[0].1.contains(&format!("authenticated on {}", node.port())), "{outs:?}");
    assert!(!c.log().contains("did not prove"), "{}", c.log());
}

#[test]
fn a_node_with_another_secret_gets_no_job_until_restarted_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let right = secret_file(dir.path(), "right", "the main server's secret, 0123456789", None);
    let wrong = secret_file(dir.path(), "wrong", "some other secret, 0123456789abcdef", None);
    let (right, wrong) = (right.to_str().unwrap(), wrong.to_str().unwrap());
    let mut node = NodeProc::start_with("127.0.0.7", None, &dir.path().join("n"), &["--secret-file", wrong]);
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--secret-file", right]);
    let refusal = format!("node {} did not prove the shared secret", node.addr);
    wait_until("the main server logs the refusal", || c.log().contains(&refusal));
    wait_until("the node logs the peer", || node.log().contains("node link from 127.0.0.1:"));
    wait_until("the node logs the refusal", || node.log().contains("did not accept this node's proof"));
    // Refused again and again (backoff), but warned about once.
    wait_until("a second attempt", || node.log().matches("did not accept this node's proof").count() >= 2);
    assert_eq!(c.log().matches(&refusal).count(), 1, "{}", c.log());
    assert_eq!(ups(&c, &node.addr), 0);

    // No job runs there: it waits.
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
    wait_until("another refused attempt after the deploy", || {
        node.log().matches("did not accept this node's proof").count() >= 3
    });
    assert_eq!(c.status_json(t)["status"], "WAITING", "{}", c.status_json(t));
    assert!(gate.nobody_waiting(), "a replica started on a node that did not prove the secret");
    let children = replica_parents_children(node.child.id()).len();
    assert_eq!(children, 0, "the node runs something");

    // Restarted with the right secret, it joins and the job runs.
    let port = node.port();
    node.kill9();
    let node = NodeProc::start_with("127.0.0.7", Some(port), &dir.path().join("n"), &["--secret-file", right]);
    wait_until("the node joins", || ups(&c, &node.addr) == 1);
    let (who, conn) = gate.arrive();
    assert_eq!(who, "g");
    release(conn);
    let st = c.wait_status(t, |st| st["status"] == "COMPLETED");
    assert_eq!(st["replicas"][0]["node"], node.addr.as_str(), "{st}");
}

#[test]
fn a_stranger_without_the_handshake_gets_auth_error_and_nothing_runs() {
    use cloudinfra::proto::{self, RunArgs};
    use cloudinfra::rpc;
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), "secret", "a node's secret, 0123456789abcdef", None);
    let node =
        NodeProc::start_with("127.0.0.8", None, &dir.path().join("n"), &["--secret-file", secret.to_str().unwrap()]);
    let archive = std::fs::read(job(dir.path(), "x.tar.gz", &["@echo ran > /tmp/never"])).unwrap();
    let record = |w: cloudinfra::xdr::XdrWriter| {
        let payload = w.into_bytes();
        let mut v = (payload.len() as u32 | 0x8000_0000).to_be_bytes().to_vec();
        v.extend_from_slice(&payload);
        v
    };
    let mut s = std::net::TcpStream::connect(&node.addr).unwrap();
    // NODE_RUN with its archive, then NODE_NULL, on one connection.
    let mut run = rpc::call(7, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_RUN);
    RunArgs { ticket: 1, replica: 0, replicas: 1 }.encode(&mut run);
    run.opaque(&archive);
    let null = rpc::call(8, proto::NODE_PROG, proto::NODE_VERS, proto::NODE_NULL);
    for (xid, call) in [(7u32, record(run)), (8, record(null))] {
        s.write_all(&call).unwrap();
        let reply =
            read_reply(&s, Duration::from_secs(20)).unwrap_or_else(|| panic!("no reply to {xid}: {}", node.log()));
        // xid, REPLY, MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK.
        let words: Vec<u32> = reply.chunks(4).take(5).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, [xid, 1, 1, 1, 5], "{reply:?}");
    }
    // Refused calls do not end the link, but a link without a handshake
    // does not last: closed within 10 s (then the poll's turn).
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let held = Instant::now();
    assert_eq!(s.read_to_end(&mut rest).map(|_| rest.len()).ok(), Some(0), "the node closes the link");
    assert!(held.elapsed() < Duration::from_secs(15), "closed after {:?}", held.elapsed());
    // Logged before the close; the log reader may lag behind the socket.
    wait_until("the node logs the close", || node.log().contains("no handshake within 10 s"));
    wait_until("the node logs the stranger", || node.log().contains("before authentication"));
    let log = node.log();
    assert!(log.contains("node link from 127.0.0.1:") && log.contains("procedure 1"), "{log}");
    // Nothing ran, nothing was stored.
    let children = replica_parents_children(node.child.id()).len();
    assert_eq!(children, 0);
    let stored: Vec<_> = std::fs::read_dir(dir.path().join("n").join(format!("output_{}", node.port())))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "{stored:?}");
}

#[test]
fn a_secret_on_one_end_only_is_named_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), "secret", "only one end has it, 0123456789", None);
    let secret = secret.to_str().unwrap();
    // The node has one, the main server not.
    let node = NodeProc::start_with("127.0.0.9", None, &dir.path().join("a"), &["--secret-file", secret]);
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &[]);
    let line = format!("node {} takes orders only from a main server that proves a shared secret", node.addr);
    wait_until("the main server says why", || c.log().contains(&line));
    assert!(c.log().contains("start the main server with the node's --secret-file"), "{}", c.log());
    assert!(!c.log().contains("root from another host"), "{}", c.log());
    assert_eq!(ups(&c, &node.addr), 0);
    // The main server has one, the node not.
    let bare = NodeProc::start("127.0.0.10", None, &dir.path().join("b"));
    let c = Cluster::start_lines(std::slice::from_ref(&bare.addr), &["--secret-file", secret]);
    let line = format!("node {} refused the handshake", bare.addr);
    wait_until("the main server says why", || c.log().contains(&line));
    assert!(c.log().contains("this node has no --secret-file"), "{}", c.log());
    assert_eq!(ups(&c, &bare.addr), 0);
}

#[test]
fn listening_off_loopback_needs_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, "1\n192.0.2.1:9001\n").unwrap();
    let nodes = nodes.to_str().unwrap();
    let work = dir.path().join("m");
    let work = work.to_str().unwrap();
    // Clients on 0.0.0.0 without a secret: refused, one line.
    let mut cmd = Command::new(SERVER);
    cmd.args(["--listen", "0.0.0.0:0", "--nodes", nodes, "--work-dir", work]);
    let err = refused_start(&mut cmd);
    assert!(err.contains("refusing to listen on 0.0.0.0:0 without a shared secret"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // With one, it starts (and links to a node on another host).
    let secret = secret_file(dir.path(), "secret", "a secret for 0.0.0.0, 0123456789", None);
    let secret = secret.to_str().unwrap();
    let line = first_line(&["--listen", "0.0.0.0:0", "--nodes", nodes, "--work-dir", work, "--secret-file", secret]);
    assert!(line.contains("listening on 0.0.0.0:"), "{line}");
    // A node too.
    let nwork = dir.path().join("n");
    let nwork = nwork.to_str().unwrap();
    let line =
        first_line(&["node", "--listen", "0.0.0.0:0", "--work-dir", nwork, "--no-slot-uids", "--secret-file", secret]);
    assert!(line.contains("listening on 0.0.0.0:"), "{line}");
    // A secret file others may read is refused, saying what to do.
    let open = secret_file(dir.path(), "open", "a secret for 0.0.0.0, 0123456789", None);
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(SERVER);
    cmd.args(["node", "--listen", "127.0.0.1:0", "--work-dir", nwork, "--secret-file", open.to_str().unwrap()]);
    let err = refused_start(&mut cmd);
    assert!(err.contains(&format!("chmod 600 {}", open.display())), "{err}");
}

#[test]
fn a_silent_peer_on_a_nodes_address_is_given_up_and_tried_again() {
    // Something holds the node's port and accepts (the kernel's backlog),
    // but never answers.
    let squatter = TcpListener::bind("127.0.0.11:0").unwrap();
    let addr = squatter.local_addr().unwrap().to_string();
    let c = Cluster::start_lines(std::slice::from_ref(&addr), &[]);
    let line = format!("node {addr}: no link within 10 s of connecting");
    wait_within(Duration::from_secs(30), "the main server gives the link up", || c.log().contains(&line));
    assert_eq!(ups(&c, &addr), 0);
    drop(squatter);
}

#[test]
fn with_a_secret_a_node_serves_a_main_server_of_another_user() {
    use std::os::unix::fs::PermissionsExt;
    if !need_root("with_a_secret_a_node_serves_a_main_server_of_another_user") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = "a secret across users, 0123456789";
    let for_node = secret_file(dir.path(), "node-secret", text, None);
    let for_main = secret_file(dir.path(), "main-secret", text, Some(65534));
    // The node runs as root; its main server as nobody: the kernel's
    // socket owner is not the node's user, the secret is what counts.
    let node =
        NodeProc::start_with("127.0.0.13", None, &dir.path().join("n"), &["--secret-file", for_node.to_str().unwrap()]);
    let bin = dir.path().join("cloud-server");
    std::fs::copy(SERVER, &bin).unwrap();
    let work = dir.path().join("m");
    std::fs::create_dir(&work).unwrap();
    nix::unistd::chown(&work, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534)))
        .unwrap();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{}\n", node.addr)).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["--listen", "127.0.0.1:0", "--nodes"]).arg(&nodes).arg("--work-dir").arg(&work);
    cmd.arg("--secret-file").arg(&for_main).env("RUST_LOG", "info");
    as_user(&mut cmd, 65534);
    let mut main = Reaped(spawn_copied(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped())));
    let mut lines = BufReader::new(main.stderr.take().expect("stderr"));
    let mut ready = String::new();
    while lines.read_line(&mut ready).unwrap_or(0) > 0 && !ready.contains("cloud-server") {}
    let addr = ready.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).map(str::to_string);
    let addr = addr.unwrap_or_else(|| panic!("the main server did not start as nobody: {ready}"));
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = lines.read(&mut buf) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let up = format!("link to node {} is up", node.addr);
    wait_until("the link of another user's main server is up", || log.lock().unwrap().contains(&up));
    assert!(!node.log().contains("refused a connection"), "{}", node.log());
    // And a job runs there.
    let archive = job(dir.path(), "q.tar.gz", &["@echo across users"]);
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out =
        Command::new(client()).args(["deploy", "1", archive.to_str().unwrap(), "--server", &addr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("Job ticket#: ").to_string();
    let into = dir.path().join("out");
    let out =
        Command::new(client()).args(["retrieve", &t, into.to_str().unwrap(), "--server", &addr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: String =
        std::fs::read_dir(&into).unwrap().flatten().map(|e| std::fs::read_to_string(e.path()).unwrap()).collect();
    assert!(got.contains("across users"), "{got}");
    let pid = nix::unistd::Pid::from_raw(main.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = main.wait();
}

#[test]
fn requeue_lost_runs_a_lost_replica_again_on_another_node_and_status_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProc> = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .enumerate()
        .map(|(i, ip)| NodeProc::start(ip, None, &dir.path().join(format!("n{i}"))))
        .collect();
    let lines: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let c = Cluster::start_lines(&lines, &["--allow-network", "--requeue-lost"]);
    wait_until("every link is up", || nodes.iter().all(|n| ups(&c, &n.addr) == 1));

    // Two replicas held at a gate, on two of the three nodes.
    let gate = Gate::new();
    let held = job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g"));
    let t = c.deploy(2, &held);
    let (_, first) = gate.arrive();
    let (_, second) = gate.arrive();
    let st = c.status_json(t);
    let lost_addr = st["replicas"][0]["node"].as_str().unwrap().to_string();
    let victim = nodes.iter().position(|n| n.addr == lost_addr).unwrap();
    let spare = nodes.iter().position(|n| !st["replicas"].as_array().unwrap().iter().any(|r| r["node"] == n.addr));
    let spare = nodes[spare.expect("a node with no replica of the job")].addr.clone();
    nodes[victim].kill9();

    // Replica 0 runs again on the spare node, and says why.
    let (_, again) = gate.arrive();
    let st = c.wait_status(t, |st| st["replicas"][0]["node"] == spare.as_str());
    let msg = st["replicas"][0]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("requeued after node {lost_addr} was lost")), "{st}");
    assert_eq!(st["replicas"][0]["status"], "RUNNING", "{st}");
    for g in [first, second, again] {
        release(g);
    }
    let st = c.wait_status(t, |st| st["status"] == "COMPLETED");
    assert_eq!(st["replicas"][0]["node"], spare.as_str(), "{st}");
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs.len() == 2, "{outs:?}");
}

#[test]
fn a_hung_node_is_lost_within_the_heartbeat_bound_and_rejoins_when_it_resumes() {
    use nix::sys::signal::{kill, Signal};
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.15", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&c, &node.addr) == 1);
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
    let (_, held) = gate.arrive();
    // Its kernel still answers TCP (keepalive sees nothing wrong); only the
    // heartbeat can tell.
    let pid = nix::unistd::Pid::from_raw(node.child.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let stopped_at = Instant::now();
    let st = c.wait_status(t, |st| st["replicas"][0]["status"] == "INVALID");
    let bound = cloudinfra_heartbeat_bound();
    assert!(stopped_at.elapsed() < bound + Duration::from_secs(2), "lost after {:?}", stopped_at.elapsed());
    assert!(st["replicas"][0]["message"].as_str().unwrap().contains("node lost"), "{st}");
    wait_until("the main server logs the heartbeat", || c.log().contains("did not answer a heartbeat"));
    // Resumed, it rejoins, and drops the replica its main server gave up.
    kill(pid, Signal::SIGCONT).unwrap();
    wait_until("the node rejoins", || ups(&c, &node.addr) == 2);
    let mut r = BufReader::new(held);
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "the lost replica is dropped there: {rest}");
}

/// `HEARTBEAT_IDLE + HEARTBEAT_WAIT` of src/main_service.rs (5 s + 10 s).
fn cloudinfra_heartbeat_bound() -> Duration {
    Duration::from_secs(15)
}

#[test]
fn without_a_secret_a_node_port_held_by_another_user_is_not_used() {
    if !need_root("without_a_secret_a_node_port_held_by_another_user_is_not_used") {
        return;
    }
    // Another local user listens where a node that is down should be.
    let port = TcpListener::bind("127.0.0.16:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.16:{port}");
    let script = format!(
        "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '{addr}', Listen => 5, ReuseAddr => 1) \
         or die $!; while (my $c = $s->accept) {{ while (sysread($c, my $m, 4) == 4) {{ \
         my $n = unpack('N', $m) & 0x7fffffff; sysread($c, my $b, $n); my $x = substr($b, 0, 4); \
         syswrite($c, pack('N', 0x80000018) . $x . pack('N5', 1, 0, 0, 0, 0)) }} }}"
    );
    let mut cmd = Command::new("perl");
    cmd.args(["-e", &script]).stdin(Stdio::null());
    as_user(&mut cmd, 65534);
    let _squatter = Reaped(cmd.spawn().expect("perl"));
    wait_until("the squatter listens", || std::net::TcpStream::connect(&addr).is_ok());
    let c = Cluster::start_lines(std::slice::from_ref(&addr), &[]);
    let refusal = format!("node {addr}: its port is uid 65534's, not this server's user's");
    wait_until("the main server refuses the port's owner", || c.log().contains(&refusal));
    // No job goes there: it waits for a node of ours.
    let t = c.deploy(1, &job(c.dir.path(), "j.tar.gz", &["@echo secret work"]));
    assert_eq!(c.status_json(t)["status"], "WAITING");
    assert_eq!(ups(&c, &addr), 0, "{}", c.log());
}

#[test]
fn a_warmed_up_remote_node_and_its_main_server_create_and_delete_no_file_per_job() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.6", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&c, &node.addr) == 1);
    let a = job(c.dir.path(), "r.tar.gz", &["@echo remote"]);
    let one = |n: usize| {
        let t = c.deploy(1, &a);
        let (ok, outs) = c.retrieve(t);
        assert!(ok && outs.len() == 1 && outs[0].1 == "remote\n", "job {n}: {outs:?}");
    };
    (0..3).for_each(one);
    let node_dir = dir.path().join("n").join(format!("output_{}", node.port()));
    let dirs = [c.work(), c.work().join("spool"), dir.path().join("n"), node_dir.clone()];
    let watch = DirWatch::new(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    (0..6).for_each(one);
    // The node drops the ticket when its NODE_DROP arrives, after CLOSE's answer.
    let leftovers = || {
        std::fs::read_dir(&node_dir)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with("free-"))
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    wait_until("the node's outputs went back to its pool", || leftovers().is_empty());
    let events = watch.events();
    assert!(events.is_empty(), "6 jobs created or removed files: {events:#?}");
    assert!(spool_data(&c).is_empty(), "{:?}", spool_data(&c));
}

/// Issue 11: a `cloud-server node` as root keeps the archive its main
/// server sends in a tmpfs of its own mount namespace (huge pages, no ext4
/// block allocation per byte), not in its folder on the work dir: the host
/// sees an empty `archives_<port>` and no such mount; the node sees its
/// archive there until the replica ends.
#[test]
fn a_node_as_root_keeps_archives_in_a_tmpfs_only_it_sees() {
    if !need_root("a_node_as_root_keeps_archives_in_a_tmpfs_only_it_sees") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("n");
    let node = NodeProc::start("127.0.0.7", None, &work);
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&c, &node.addr) == 1);
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
    let (_, held) = gate.arrive();

    let pid = node.child.id();
    let archives = work.join(format!("archives_{}", node.port()));
    let seen_by_node = std::path::Path::new(&format!("/proc/{pid}/root")).join(archives.strip_prefix("/").unwrap());
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let line = mounts.lines().find(|l| l.contains(&format!(" {} ", archives.display())));
    assert!(line.is_some_and(|l| l.contains(" - tmpfs ")), "the node's mounts: {mounts}");
    let archive = seen_by_node.join(format!("{t}.tar.gz"));
    assert!(archive.metadata().is_ok_and(|m| m.len() > 0), "{} while its replica runs", archive.display());
    // The host: an empty folder, no mount, no archive in the node's folder.
    assert_eq!(std::fs::read_dir(&archives).unwrap().count(), 0);
    let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!ours.contains(&archives.display().to_string()), "{ours}");
    let folder = work.join(format!("output_{}", node.port()));
    let on_disk: Vec<_> = std::fs::read_dir(&folder).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!on_disk.iter().any(|n| n.to_string_lossy().ends_with(".tar.gz")), "{on_disk:?}");

    release(held);
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs.len() == 1 && outs[0].1.contains("released g"), "{outs:?}");
    // Given back to the tmpfs's pool once the replica ended.
    wait_until("the archive went back to the pool", || !archive.exists());
}

/// Issue 11: a node process splices the archive from its main server's
/// link into its file (no copy through its memory), fragment headers and
/// all taken out by the record decoder: 20 MiB of incompressible data in
/// 8 MiB link fragments reaches the replica byte for byte, and the next
/// call on the link (the job's end, a second job) is read as before.
#[test]
fn a_large_archive_reaches_a_remote_replica_intact() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.8", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&c, &node.addr) == 1);
    // xorshift noise: deflate stores it, so the archive is about 20 MiB.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..20 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let path = c.dir.path().join("big.tar.gz");
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    for (name, body) in [("Makefile", &b"run:\n\t@sha256sum data.bin\n"[..]), ("data.bin", &data[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, body).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    let hex: String = sha2::Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let want = format!("{hex}  data.bin\n");
    for _ in 0..2 {
        let t = c.deploy(1, &path);
        let (ok, outs) = c.retrieve(t);
        assert!(ok && outs.len() == 1 && outs[0].1 == want, "{outs:?}");
    }
}

/// The congestion control of both ends of every established TCP connection
/// with port `port` at one end, as `ss -tin` reports them.
fn congestion_on_port(port: u16) -> Vec<String> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new("ss").args(["-tinH", "state", "established", &filter]).output().expect("ss (iproute2)");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    // A line per socket ("0 0 LOCAL PEER"), then its tab-indented details,
    // which begin with the congestion control's name.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().filter(|l| l.starts_with('\t')).map(|l| l.split_whitespace().next().unwrap_or("").to_owned()).collect()
}

/// What our connections on loopback should use, as the server decides it
/// (`congestion::choose`), or else the system's default.
fn loopback_congestion(policy: &str) -> String {
    let choice = cloudinfra::congestion::choose(&policy.parse().unwrap()).unwrap();
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    choice.for_peer(std::net::Ipv4Addr::LOCALHOST.into()).unwrap_or(system.trim()).to_owned()
}

/// `--tcp-congestion`: both ends of a node link and the server's end of a
/// client's connection use what it says: a name, or with `auto` (the
/// default) on a host whose default is BBR (paced by a timer per socket
/// without fq), CUBIC or Reno on loopback; elsewhere the system's own.
/// The `cloud` program's end follows `auto`.
#[test]
fn both_ends_of_links_and_client_connections_use_the_chosen_congestion_control() {
    let dir = tempfile::tempdir().unwrap();
    for (policy, ip) in [("reno", "127.0.0.9"), ("auto", "127.0.0.10")] {
        let want = loopback_congestion(policy);
        let flag = ["--tcp-congestion", policy];
        let node = NodeProc::start_with(ip, None, &dir.path().join(policy), &flag);
        let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &flag);
        wait_until("the link is up", || ups(&c, &node.addr) == 1);
        assert_eq!(congestion_on_port(node.port()), [want.as_str(), want.as_str()], "{policy}: the link's two ends");
        // A client's connection, held open by `status --wait` on a job
        // held at a gate: the `cloud` program's end and the server's.
        let gate = Gate::new();
        let t = c.deploy(1, &job(c.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
        let (_, held) = gate.arrive();
        let mut waiting = c.cloud_spawn(&["status", &t.to_string(), "--wait"]);
        wait_until("the client is connected", || congestion_on_port(c.addr.port()).len() == 2);
        // (The `cloud` program follows `auto` whatever the server says.)
        let mut ends = congestion_on_port(c.addr.port());
        ends.sort();
        let mut expected = [want.clone(), loopback_congestion("auto")];
        expected.sort();
        assert_eq!(ends, expected, "{policy}: a client's connection");
        release(held);
        assert!(waiting.wait().unwrap().success());
    }
    // A name this kernel does not have is refused in one line, by a main
    // server and by a node, whether the option comes before `node` or after.
    for args in [
        &["--tcp-congestion", "nosuchcc", "--nodes", "/nonexistent"][..],
        &["--tcp-congestion", "nosuchcc", "node", "--listen", "127.0.0.1:1"],
        &["node", "--listen", "127.0.0.1:1", "--tcp-congestion", "nosuchcc"],
    ] {
        let err = refused_start(Command::new(SERVER).args(args));
        assert!(err.starts_with("cloud-server: --tcp-congestion nosuchcc: this kernel has no such"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
