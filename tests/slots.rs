//! Node slots (`PORT slots=K` in the nodes file), fair election and
//! `deploy --fail-fast`, with the real binaries. Overlap is proven with
//! gates (every replica is blocked on the test at once), never with timing.

mod common;

use common::*;

/// The node each replica of `ticket` runs on, as status shows it.
fn nodes_of(c: &Cluster, ticket: u32) -> Vec<String> {
    let st = c.status_json(ticket);
    st["replicas"].as_array().expect("replicas").iter().map(|r| r["node"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn a_node_with_two_slots_runs_two_jobs_at_once_each_as_its_own_uid() {
    let c = Cluster::start_slots(&[2], &["--allow-network"]);
    let gate = Gate::new();
    let d = c.dir.path();
    let recipe = |who: &str| {
        let mut r = vec!["@echo uid $$(id -u)".to_string()];
        r.extend(gate.wait_recipe(who));
        r
    };
    let ta = c.deploy(1, &job(d, "a.tar.gz", &recipe("a")));
    let tb = c.deploy(1, &job(d, "b.tar.gz", &recipe("b")));
    // Both are blocked on the gate at the same moment: they overlap.
    let mut arrived = vec![gate.arrive(), gate.arrive()];
    arrived.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(arrived.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let node = format!("127.0.0.1:{}", c.ports[0]);
    for t in [ta, tb] {
        assert_eq!(c.status_json(t)["status"], "RUNNING");
        assert_eq!(nodes_of(&c, t), vec![node.clone()]);
    }
    // A third job finds both slots taken and waits.
    let tc = c.deploy(1, &job(d, "c.tar.gz", &["@echo c ran"]));
    assert_eq!(c.status_json(tc)["status"], "WAITING");
    // `status` counts the node once, and its slots in the states.
    let out = c.cloud(&["status"]);
    let summary = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
    assert!(summary.starts_with("nodes: 1, 2 slots (0 free, 2 busy, 0 down); jobs: 1 waiting, 2 running"), "{summary}");
    for (_, conn) in arrived {
        release(conn);
    }
    c.wait_status(tc, |s| s["status"] == "COMPLETED");
    // Each replica kept its own output.
    let (ok_a, out_a) = c.retrieve(ta);
    let (ok_b, out_b) = c.retrieve(tb);
    assert!(ok_a && ok_b);
    assert!(out_a[0].1.contains("released a") && !out_a[0].1.contains("released b"), "{out_a:?}");
    assert!(out_b[0].1.contains("released b") && !out_b[0].1.contains("released a"), "{out_b:?}");
    if is_root() {
        // Slot uids: the two slots of one node are two uids.
        let uid = |out: &str| out.lines().find_map(|l| l.strip_prefix("uid ")).map(str::to_string);
        assert_ne!(uid(&out_a[0].1), uid(&out_b[0].1), "{out_a:?} {out_b:?}");
    }
}

#[test]
fn a_burst_of_jobs_spreads_evenly_across_nodes() {
    let c = Cluster::start_slots(&[2, 2, 2], &["--allow-network"]);
    let gate = Gate::new();
    let d = c.dir.path();
    let a = job(d, "spread.tar.gz", &gate.wait_recipe("j"));
    let mut held = Vec::new();
    let mut tickets = Vec::new();
    for round in 0..2 {
        for _ in 0..3 {
            tickets.push(c.deploy(1, &a));
            held.push(gate.arrive());
        }
        // After each round of three, every node runs exactly `round + 1`:
        // the most free slots win, ties go round robin.
        let mut per_node = std::collections::BTreeMap::new();
        for &t in &tickets {
            *per_node.entry(nodes_of(&c, t)[0].clone()).or_insert(0) += 1;
        }
        assert_eq!(per_node.len(), 3, "{per_node:?}");
        assert!(per_node.values().all(|&n| n == round + 1), "{per_node:?}");
    }
    for (_, conn) in held {
        release(conn);
    }
    for t in tickets {
        c.wait_status(t, |s| s["status"] == "COMPLETED");
    }
}

#[test]
fn fail_fast_stops_the_other_replicas_when_one_fails() {
    let c = Cluster::start_with(2, &["--allow-network"]);
    let gate = Gate::new();
    // Both replicas block on the gate; released, replica 0 exits 1. Replica
    // 1 is never released: only fail-fast can end it.
    let recipe =
        [format!("@echo replica $$CLOUD_REPLICA was here; exec 3<>/dev/tcp/127.0.0.1/{}; echo r$$CLOUD_REPLICA >&3; read -r go <&3; exit 1", gate.port())];
    let a = job(c.dir.path(), "ff.tar.gz", &recipe);
    let out = c.cloud(&["deploy", "--fail-fast", "2", a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("Job ticket#: ")
        .and_then(|t| t.parse().ok())
        .expect("ticket");
    let mut arrived = vec![gate.arrive(), gate.arrive()];
    arrived.sort_by(|x, y| x.0.cmp(&y.0));
    let (_, r1) = arrived.pop().expect("r1");
    let (who, r0) = arrived.pop().expect("r0");
    assert_eq!(who, "r0");
    release(r0);
    let st = c.wait_status(t, |s| s["replicas"][1]["status"] == "INVALID");
    assert_eq!(st["status"], "INVALID");
    assert_eq!(st["replicas"][1]["message"], "stopped: replica 0 failed", "{st}");
    assert_eq!(st["replicas"][0]["status"], "INVALID");
    assert_ne!(st["replicas"][0]["message"], "stopped: replica 1 failed", "{st}");
    drop(r1);
    c.wait_no_children();
    // The stopped replica's output is kept, as the failed one's.
    // (retrieve exits 1: the job is INVALID.)
    let (_, outs) = c.retrieve(t);
    assert_eq!(outs.len(), 2, "{outs:?}");
    // (Files are named by node port; either replica may be on either node.)
    let all: String = outs.iter().map(|(_, text)| text.as_str()).collect();
    for i in 0..2 {
        assert!(all.contains(&format!("replica {i} was here")), "replica {i}: {outs:?}");
    }
}

/// accept_stat of a reply record (MSG_ACCEPTED with an empty verifier).
fn accept_stat(reply: &[u8]) -> u32 {
    u32::from_be_bytes(reply[20..24].try_into().expect("a whole accepted reply"))
}

#[test]
fn deploy_opts_refuses_unknown_flags_and_procedures_past_it_are_unavailable() {
    use cloudinfra::{proto, record, rpc};
    use std::io::Write;
    let c = Cluster::start(1);
    let mut s = std::net::TcpStream::connect(c.addr).expect("connect");
    let limit = std::time::Duration::from_secs(30);
    // Flag bit 2 means nothing: GARBAGE_ARGS (4), and no job.
    let mut w = rpc::call(1, proto::CLOUD_PROG, proto::CLOUD_VERS, proto::DEPLOY_OPTS);
    w.u32(1).u32(2).opaque(&vec![b'x'; 60_000]);
    s.write_all(&record::frame(&w.into_bytes())).expect("send");
    assert_eq!(accept_stat(&read_reply(&s, limit).expect("answered")), 4);
    // The refused upload (under 64 KiB) was let in and dropped: the connection goes on.
    // Past DEPLOY_OPTS (10) nothing exists: PROC_UNAVAIL (3).
    for proc_num in 11..14 {
        let mut w = rpc::call(10 + proc_num, proto::CLOUD_PROG, proto::CLOUD_VERS, proc_num);
        w.u32(1);
        s.write_all(&record::frame(&w.into_bytes())).expect("send");
        assert_eq!(accept_stat(&read_reply(&s, limit).expect("answered")), 3, "proc {proc_num}");
    }
    let st = c.cloud(&["status", "1"]);
    assert!(!st.status.success(), "no job was made");
}

#[test]
fn replicas_in_two_slots_of_one_node_do_not_share_loopback() {
    if !need_root("replicas_in_two_slots_of_one_node_do_not_share_loopback") {
        return;
    }
    let c = Cluster::start_slots(&[2], &[]);
    let listen = "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1:5555', Listen => 5) \
                  or die \"no listen: $!\"; print \"listening\\n\"; sleep 15;\n";
    let reach = "use IO::Socket::INET; for (1..40) { if (IO::Socket::INET->new(PeerAddr => '127.0.0.1:5555')) \
                 { print \"reached\\n\"; exit } select(undef, undef, undef, 0.25) } print \"isolated\\n\";\n";
    let x = archive(c.dir.path(), "x.tar.gz", &[("Makefile", "run:\n\t@perl x.pl\n"), ("x.pl", listen)]);
    let v = archive(c.dir.path(), "v.tar.gz", &[("Makefile", "run:\n\t@perl v.pl\n"), ("v.pl", reach)]);
    let tx = c.deploy(1, &x);
    let tv = c.deploy(1, &v);
    // Both run at once, in the node's two slots.
    let st = c.status_json(tv);
    assert_eq!(st["status"], "RUNNING", "{st}");
    let (_, outs) = c.retrieve(tv);
    assert_eq!(outs[0].1, "isolated\n", "another slot's loopback was reachable: {outs:?}");
    let _ = c.cloud(&["cancel", &tx.to_string()]);
}
