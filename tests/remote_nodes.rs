//! Remote nodes: a main server whose nodes are `cloud-server node`
//! processes on 127.0.0.x addresses, linked over TCP (issue 9).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A `cloud-server node` process; stopped (SIGTERM) when dropped.
struct NodeProc {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl NodeProc {
    /// Start a node on `ip` (a free port, or `port`), work dir `work`;
    /// returns once its ready line is out.
    fn start(ip: &str, port: Option<u16>, work: &std::path::Path) -> NodeProc {
        for _ in 0..5 {
            let chosen =
                port.unwrap_or_else(|| TcpListener::bind((ip, 0)).expect("bind").local_addr().expect("addr").port());
            let addr = format!("{ip}:{chosen}");
            // Slot uids of its own, derived from its port (unique while held).
            let slot_base = (1_000_000 + u32::from(chosen) * 64 + 32).to_string();
            let mut child = Command::new(SERVER)
                .args(["node", "--listen", &addr, "--slot-uids", &slot_base, "--allow-network", "--work-dir"])
                .arg(work)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn cloud-server node");
            let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
            let mut got = String::new();
            let mut line = String::new();
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("listening on") || line.starts_with("cloud-server") {
                    got = line.clone();
                    break;
                }
                line.clear();
            }
            if got.contains("listening on") {
                let log = Arc::new(Mutex::new(got));
                let sink = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = lines.read(&mut buf) {
                        sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                });
                return NodeProc { child, addr, log };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(got.contains("already in use") && port.is_none(), "node did not start: {got}");
        }
        panic!("no free port for a node");
    }

    fn port(&self) -> u16 {
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    /// SIGTERM: a clean stop removes its workspaces and cgroups.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

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
    assert!(a.log.lock().unwrap().contains("listening on"));
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
    assert!(err.contains("loopback"), "{err}");
    // Nor does a main server link to a node on another host without one.
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, "1\n192.0.2.1:9001\n").unwrap();
    let mut cmd = Command::new(SERVER);
    cmd.args(["--listen", "127.0.0.1:0", "--nodes"]).arg(&nodes).arg("--work-dir").arg(dir.path().join("m"));
    let err = refused_start(&mut cmd);
    assert!(err.contains("line 2") && err.contains("not on loopback"), "{err}");
}

#[test]
fn a_node_kills_the_replica_of_a_main_server_that_is_gone_and_serves_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.5", None, &dir.path().join("n"));
    let mut first = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || ups(&first, &node.addr) == 1);
    let gate = Gate::new();
    first.deploy(1, &job(first.dir.path(), "g.tar.gz", &gate.wait_recipe("g")));
    let (_, conn) = gate.arrive();
    first.stop_with(nix::sys::signal::Signal::SIGKILL);
    // Nobody awaits that replica any more: the node kills it (the job's
    // end of the gate connection closes).
    let mut r = BufReader::new(conn);
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "the replica is gone: {rest}");
    wait_until("the node logs it", || node.log.lock().unwrap().contains("link is gone; killing ticket"));
    // A new main server links to the same node and runs a job there.
    let second = Cluster::start_lines(std::slice::from_ref(&node.addr), &[]);
    wait_until("the new link is up", || ups(&second, &node.addr) == 1);
    let t = second.deploy(1, &job(second.dir.path(), "q.tar.gz", &["@echo second"]));
    let (ok, outs) = second.retrieve(t);
    assert!(ok, "{outs:?}");
    assert!(outs[0].1.contains("second"), "{outs:?}");
}
