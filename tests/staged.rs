//! Staged transfers (issue 11): a DEPLOY whose job would start at once on
//! a remote node has its archive sent on to that node while the client is
//! still uploading it (NODE_STAGE), then run from there (NODE_RUN_STAGED).
//! What a user sees does not change: the DEPLOY is answered only once the
//! archive is whole and checked, a refused or abandoned upload runs nowhere
//! and leaves nothing on the node, and a node lost mid-stage costs nothing
//! but the overlap.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use cloudinfra::proto::{self, CloudStat};
use cloudinfra::record::LAST_FRAGMENT;
use cloudinfra::rpc;
use cloudinfra::xdr::XdrReader;
use common::node_proc::NodeProc;
use common::*;

fn link_up(c: &Cluster, node: &NodeProc) -> usize {
    c.log().matches(&format!("link to node {} is up", node.addr)).count()
}

/// A job archive (gzip without compression, so its size is what is
/// uploaded): a Makefile whose `run` prints the checksum of `data`
/// (`size` bytes of a pattern), then `tail` entries (names, bodies).
fn big_job(size: usize, tail: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let makefile = b"run:\n\t@cksum data\n".to_vec();
    let mut entries = vec![("Makefile", makefile), ("data", data)];
    entries.extend(tail.iter().map(|(n, b)| (*n, b.to_vec())));
    for (name, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        // Set by hand: `append_data` refuses a name with `..`, which a
        // hostile archive has.
        h.as_gnu_mut().expect("gnu header").name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, &body[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// A DEPLOY of `archive` by hand, of which the first `first` bytes are
/// sent now; the rest with `finish`.
struct Upload {
    s: TcpStream,
    archive: Vec<u8>,
    sent: usize,
}

impl Upload {
    fn start(c: &Cluster, archive: Vec<u8>, first: usize) -> Upload {
        let mut s = TcpStream::connect(c.addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = rpc::call(0x57a6e, proto::CLOUD_PROG, 1, proto::DEPLOY);
        w.u32(1).u32(archive.len() as u32);
        let head = w.into_bytes();
        let pad = archive.len().next_multiple_of(4) - archive.len();
        let total = head.len() + archive.len() + pad;
        let mut wire = ((total as u32) | LAST_FRAGMENT).to_be_bytes().to_vec();
        wire.extend_from_slice(&head);
        wire.extend_from_slice(&archive[..first]);
        s.write_all(&wire).unwrap();
        Upload { s, archive, sent: first }
    }

    /// No answer has come yet.
    fn unanswered(&self) -> bool {
        self.s.set_nonblocking(true).unwrap();
        let none = matches!(self.s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        self.s.set_nonblocking(false).unwrap();
        none
    }

    /// Send the rest (as far as the server takes it) and read the answer:
    /// the ticket, or the refusal.
    fn finish(mut self) -> Result<u32, (CloudStat, String)> {
        let pad = self.archive.len().next_multiple_of(4) - self.archive.len();
        let mut rest = self.archive[self.sent..].to_vec();
        rest.extend(std::iter::repeat_n(0u8, pad));
        // A refusal may close before all of it is taken.
        let _ = self.s.write_all(&rest);
        let reply = read_reply(&self.s, Duration::from_secs(60)).expect("the DEPLOY is answered");
        let mut x = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
        proto::decode_stat(&mut x).expect("a cloud_stat")?;
        Ok(x.u32().expect("a ticket"))
    }
}

/// The node's folder holds nothing but empty pool files: no stage, no
/// archive, no output.
fn clean(node: &NodeProc) -> bool {
    node.held().is_empty()
}

#[test]
fn a_staged_deploy_is_answered_after_the_whole_archive_and_its_output_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.2", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || link_up(&c, &node) == 1);

    let archive = big_job(24 << 20, &[]);
    let path = dir.path().join("big.tar.gz");
    std::fs::write(&path, &archive).unwrap();
    // What the job prints when run directly.
    let direct = dir.path().join("direct");
    std::fs::create_dir(&direct).unwrap();
    assert!(Command::new("tar").arg("xzf").arg(&path).arg("-C").arg(&direct).status().unwrap().success());
    let want = Command::new("make").args(["-s", "run"]).current_dir(&direct).output().unwrap();
    assert!(want.status.success());

    // Half the archive: the node holds part of it while the DEPLOY is not
    // answered yet (the old path sent nothing before the answer).
    let up = Upload::start(&c, archive.clone(), archive.len() / 2);
    wait_until("the node holds part of the archive", || node.staged() >= 4 << 20);
    assert!(up.unanswered(), "answered before the archive was whole");
    let ticket = up.finish().expect("deployed");
    let (ok, outs) = c.retrieve(ticket);
    assert!(ok, "{outs:?}");
    assert_eq!(outs, vec![(node.port(), String::from_utf8_lossy(&want.stdout).into_owned())]);
    assert!(node.log().contains("stage"), "{}", node.log());
    // A normal deploy by the real client: byte-identical too.
    let t = c.deploy(1, &path);
    let (ok, outs2) = c.retrieve(t);
    assert!(ok);
    assert_eq!(outs2, outs);
    c.cloud(&["close", &ticket.to_string()]);
    c.cloud(&["close", &t.to_string()]);
    wait_until("the node is clean after the closes", || clean(&node));
}

#[test]
fn a_refused_archive_staged_halfway_runs_nowhere_and_leaves_the_node_clean() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.2", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || link_up(&c, &node) == 1);

    // Good for its first 16 MiB, then a path out of the workspace.
    let archive = big_job(16 << 20, &[("../escape", b"boo")]);
    let up = Upload::start(&c, archive, 12 << 20);
    wait_until("the node holds part of the archive", || node.staged() >= 4 << 20);
    let (stat, msg) = up.finish().expect_err("refused");
    assert_eq!(stat, CloudStat::BadArchive, "{msg}");
    wait_until("the stage is dropped", || clean(&node));
    assert!(!c.log().contains("ticket 1:"), "no ticket was issued: {}", c.log());
    assert!(!node.log().contains("ticket 1"), "nothing ran on the node: {}", node.log());
    // The node serves the next job.
    let ok = job(c.dir.path(), "ok.tar.gz", &["@echo fine"]);
    let t = c.deploy(1, &ok);
    assert_eq!(t, 1, "the refused upload took no ticket");
    assert_eq!(c.retrieve(t), (true, vec![(node.port(), "fine\n".to_string())]));
}

#[test]
fn a_client_gone_mid_upload_leaves_nothing_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.2", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || link_up(&c, &node) == 1);

    let up = Upload::start(&c, big_job(24 << 20, &[]), 12 << 20);
    wait_until("the node holds part of the archive", || node.staged() >= 4 << 20);
    drop(up); // the client is gone
    wait_until("the stage is dropped", || clean(&node));
    assert!(!node.log().contains("ticket 1"), "nothing ran on the node: {}", node.log());
    let ok = job(c.dir.path(), "ok.tar.gz", &["@echo fine"]);
    let t = c.deploy(1, &ok);
    assert_eq!(c.retrieve(t), (true, vec![(node.port(), "fine\n".to_string())]));
}

#[test]
fn a_node_lost_mid_stage_gets_the_job_whole_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("n");
    let mut node = NodeProc::start("127.0.0.2", None, &work);
    let port = node.port();
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || link_up(&c, &node) == 1);

    let archive = big_job(24 << 20, &[]);
    let up = Upload::start(&c, archive, 12 << 20);
    wait_until("the node holds part of the archive", || node.staged() >= 4 << 20);
    node.kill9();
    wait_until("the main server saw the link go", || c.log().contains("is down"));
    // The upload goes on without its stage: answered, the job waits.
    let ticket = up.finish().expect("deployed");
    let node = NodeProc::start("127.0.0.2", Some(port), &work);
    wait_until("the link is up again", || link_up(&c, &node) == 2);
    let st = c.wait_status(ticket, |s| s["status"] != "WAITING" && s["status"] != "RUNNING");
    assert_eq!(st["status"], "COMPLETED", "{st}");
    let (ok, outs) = c.retrieve(ticket);
    assert!(ok, "{outs:?}");
    assert!(outs[0].1.ends_with(&format!(" {} data\n", 24 << 20)), "{outs:?}");
    // The earlier run's stage went at the node's start.
    assert!(node.held().iter().all(|(n, _)| !n.starts_with("stage-")), "{:?}", node.held());
}

#[test]
fn a_node_that_hangs_mid_stage_is_lost_within_the_heartbeat_bound_and_the_upload_goes_on() {
    use nix::sys::signal::{kill, Signal};
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("127.0.0.2", None, &dir.path().join("n"));
    let c = Cluster::start_lines(std::slice::from_ref(&node.addr), &["--allow-network"]);
    wait_until("the link is up", || link_up(&c, &node) == 1);

    let archive = big_job(48 << 20, &[]);
    let up = Upload::start(&c, archive, 8 << 20);
    wait_until("the node holds part of the archive", || node.staged() >= 4 << 20);
    // It stops taking the stage (its kernel still answers TCP): the main
    // server stops reading the upload while the node is too far behind ...
    let pid = nix::unistd::Pid::from_raw(node.child.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let stopped_at = std::time::Instant::now();
    // ... until the heartbeat finds it hung (15 s), well before the
    // client's call timeout (30 s): the upload goes on and is answered.
    let ticket = up.finish().expect("deployed");
    assert!(stopped_at.elapsed() < Duration::from_secs(25), "answered after {:?}", stopped_at.elapsed());
    assert!(c.log().contains("did not answer a heartbeat"), "{}", c.log());
    // Resumed, it rejoins and runs the job, sent whole.
    kill(pid, Signal::SIGCONT).unwrap();
    wait_until("the node rejoins", || link_up(&c, &node) == 2);
    let st = c.wait_status(ticket, |s| s["status"] != "WAITING" && s["status"] != "RUNNING");
    assert_eq!(st["status"], "COMPLETED", "{st}");
    let (ok, outs) = c.retrieve(ticket);
    assert!(ok && outs[0].1.ends_with(&format!(" {} data\n", 48 << 20)), "{outs:?}");
}
