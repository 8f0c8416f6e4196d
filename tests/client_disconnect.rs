//! A client program killed mid-call (issue 9, "Faults"): killed during its
//! upload, no job comes of the partial archive and its spool file is emptied;
//! killed during a retrieve, the ticket stays and a second retrieve gets
//! every byte; a STATUS cut off mid-record hurts no one.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Bytes no compressor shrinks (xorshift), so an archive of them is large
/// on the wire and takes a while to upload.
fn incompressible(len: usize) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    (0..len / 8)
        .flat_map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()
        })
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn a_deploy_killed_mid_upload_makes_no_job_and_leaves_nothing_in_the_spool() {
    let c = Cluster::start(1);
    let src = c.dir.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("Makefile"), "run:\n\t@echo should never run\n").unwrap();
    std::fs::write(src.join("noise.bin"), incompressible(48 << 20)).unwrap();
    let archive = c.dir.path().join("big.tar.gz");
    let ok = Command::new("tar").arg("czf").arg(&archive).arg("-C").arg(&src).arg(".").status().unwrap();
    assert!(ok.success());

    // However fast uploads are, this one is caught midway: the server is
    // paused while the client fills the socket's buffers (its short send
    // queue toward a server on this host, and the server's receive buffer:
    // under 1 MiB of the 48), then the client is paused and the server goes
    // on, taking what was sent; only then is the client killed.
    let server = Pid::from_raw(c.pid() as i32);
    kill(server, Signal::SIGSTOP).unwrap();
    let mut deploy = Reaped(c.cloud_spawn(&["deploy", "1", archive.to_str().unwrap()]));
    let sent = |pid: u32| {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    let client = Pid::from_raw(deploy.0.id() as i32);
    wait_within(Duration::from_secs(30), "the upload to be under way", || sent(deploy.0.id()) >= 256 << 10);
    kill(client, Signal::SIGSTOP).unwrap();
    kill(server, Signal::SIGCONT).unwrap();
    // Mid-upload: the server has started spooling this archive.
    wait_within(Duration::from_secs(30), "the upload to start spooling", || !spool_data(&c).is_empty());
    deploy.0.kill().unwrap();
    let _ = deploy.0.wait();

    wait_within(Duration::from_secs(10), "the partial upload's spool file to be emptied", || spool_data(&c).is_empty());
    // No ticket was issued for it: the next deploy gets the first one.
    let t = c.deploy(1, &job(c.dir.path(), "next.tar.gz", &["@echo next"]));
    assert_eq!(t, 1, "a ticket was issued to the killed upload");
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1 == "next\n", "{outs:?}");
    assert!(!c.log().contains("should never run"));
}

#[test]
fn a_retrieve_killed_mid_transfer_can_simply_be_repeated() {
    let c = Cluster::start_with(1, &["--max-output", "64M"]);
    // 32 MiB of output: long enough on the wire to be caught mid-transfer.
    let t = c.deploy(1, &job(c.dir.path(), "loud.tar.gz", &["@head -c 33554432 /dev/zero | tr '\\0' x"]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");
    let out_dir = c.dir.path().join("first");
    let mut first = Reaped(c.cloud_spawn(&["retrieve", &t.to_string(), out_dir.to_str().unwrap()]));
    wait_within(Duration::from_secs(30), "the retrieve to start writing", || {
        files_in(&out_dir).iter().any(|f| f.ends_with(".part"))
    });
    first.0.kill().unwrap();
    let _ = first.0.wait();

    // The ticket is still there, and a second retrieve gets every byte.
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "second retrieve failed: {}", c.log());
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].1.len(), 32 << 20);
    assert!(outs[0].1.bytes().all(|b| b == b'x'));
    // Retrieved with a directory: the ticket is closed now.
    let gone = c.cloud(&["status", &t.to_string()]);
    assert!(!gone.status.success());
}

#[test]
fn a_status_cut_off_mid_record_hurts_no_one() {
    let c = Cluster::start(1);
    let t = c.deploy(1, &job(c.dir.path(), "j.tar.gz", &["@echo fine"]));
    for cut in [2usize, 4, 20, 40] {
        let mut w = cloudinfra::rpc::call(7, cloudinfra::proto::CLOUD_PROG, 1, cloudinfra::proto::STATUS);
        w.u32(t);
        let body = w.into_bytes();
        let mut wire = ((body.len() as u32) | 0x8000_0000).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let mut s = TcpStream::connect(c.addr).unwrap();
        s.write_all(&wire[..cut.min(wire.len() - 1)]).unwrap();
        drop(s);
    }
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1 == "fine\n", "{outs:?}");
}
