//! The system end to end: the real server, the real client programs.

mod common;

use common::*;

fn sample_archive(dir: &std::path::Path) -> std::path::PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/client/sample");
    let path = dir.join("sample.tar.gz");
    let out = std::process::Command::new("tar").arg("czf").arg(&path).args(["-C", src, "."]).status().unwrap();
    assert!(out.success());
    path
}

#[test]
fn one_replica_of_the_sample_runs_and_its_output_is_retrieved() {
    let c = Cluster::start(2);
    let t = c.deploy(1, &sample_archive(c.dir.path()));
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    assert_eq!(outs.len(), 1);
    let (port, text) = &outs[0];
    assert!(c.ports.contains(port));
    assert!(text.contains(&format!("ticket {t} replica 0 of 1 (node port {port})")), "{text}");
    assert!(text.contains("partial pi estimate 3.1"), "{text}");
    // Retrieve closed the ticket.
    let st = c.cloud(&["status", &t.to_string()]);
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("no such ticket"));
}

#[test]
fn n_replicas_each_get_their_own_node_and_environment() {
    let c = Cluster::start(4);
    let a = job(
        c.dir.path(),
        "env.tar.gz",
        &["echo \"$$CLOUD_TICKET $$CLOUD_REPLICA $$CLOUD_REPLICAS $$CLOUD_NODE_PORT\""],
    );
    let t = c.deploy(4, &a);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    let mut replicas_seen: Vec<String> = Vec::new();
    for (port, text) in &outs {
        let line = text.lines().find(|l| l.starts_with(&t.to_string())).expect("env line");
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[2], "4");
        assert_eq!(f[3], port.to_string());
        replicas_seen.push(f[1].to_string());
    }
    replicas_seen.sort();
    assert_eq!(replicas_seen, ["0", "1", "2", "3"]);
    let mut ports: Vec<u16> = outs.iter().map(|o| o.0).collect();
    ports.sort();
    let mut want = c.ports.clone();
    want.sort();
    assert_eq!(ports, want, "one replica per node");
}

#[test]
fn a_job_that_fails_to_compile_is_invalid_with_the_compiler_message() {
    let c = Cluster::start(1);
    let a = archive(
        c.dir.path(),
        "broken.tar.gz",
        &[
            ("Makefile", "run: broken\n\t./broken\nbroken: broken.c\n\tcc -o broken broken.c\n"),
            ("broken.c", "int main(void) { return undeclared_thing; }\n"),
        ],
    );
    let t = c.deploy(1, &a);
    let st = c.wait_status(t, |s| s["status"] != "RUNNING" && s["status"] != "WAITING");
    assert_eq!(st["status"], "INVALID");
    assert_eq!(st["replicas"][0]["status"], "INVALID");
    assert_eq!(st["replicas"][0]["exit_code"], 2);
    assert!(st["replicas"][0]["message"].as_str().unwrap().contains("make run exited with status 2"));
    let (ok, outs) = c.retrieve(t);
    assert!(!ok, "retrieve exits non-zero when a replica is INVALID");
    assert!(outs[0].1.contains("undeclared_thing"), "compiler message in output: {}", outs[0].1);
}

#[test]
fn too_many_replicas_and_missing_files_are_clear_errors() {
    let c = Cluster::start(4);
    let a = job(c.dir.path(), "ok.tar.gz", &["echo hi"]);
    let out = c.cloud(&["deploy", "5", a.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("5 replicas") && err.contains("4 nodes"), "{err}");
    assert_eq!(err.lines().count(), 1);
    let out = c.cloud(&["deploy", "1", "/no/such/archive.tar.gz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/archive.tar.gz"));
    let out = c.cloud(&["status", "999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such ticket: 999"));
}

#[test]
fn a_directory_is_packed_on_the_fly() {
    let c = Cluster::start(1);
    let src = c.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("Makefile"), "run:\n\t@echo packed directory works\n").unwrap();
    let t = c.deploy(1, &src);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    assert!(outs[0].1.contains("packed directory works"));
}

#[test]
fn outputs_appear_exactly_once_and_in_order() {
    let c = Cluster::start(1);
    let a = job(c.dir.path(), "lines.tar.gz", &["@echo one; echo two >&2; echo three; printf 'no newline'"]);
    let t = c.deploy(1, &a);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    assert_eq!(outs[0].1, "one\ntwo\nthree\nno newline");
}

#[test]
fn jobs_wait_in_fifo_order_with_queue_positions() {
    let c = Cluster::start_with(2, &["--allow-network"]);
    let gate = Gate::new();
    let d = c.dir.path();
    let a = job(d, "a.tar.gz", &gate.wait_recipe("a$$CLOUD_REPLICA"));
    let b = job(d, "b.tar.gz", &gate.wait_recipe("b$$CLOUD_REPLICA"));
    let cj = job(d, "c.tar.gz", &gate.wait_recipe("c"));
    let ta = c.deploy(2, &a);
    let tb = c.deploy(2, &b);
    let tc = c.deploy(1, &cj);
    let mut a_conns: Vec<_> = (0..2).map(|_| gate.arrive()).collect();
    a_conns.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a_conns.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["a0", "a1"]);
    let st = c.status_json(tb);
    assert_eq!(st["status"], "WAITING");
    assert_eq!(st["queue_position"], 1);
    assert_eq!(c.status_json(tc)["queue_position"], 2);
    assert_eq!(c.status_json(ta)["queue_position"], 0);

    // Free one node: c would fit, but b is ahead and needs two. No overtaking.
    let (_, a0) = a_conns.remove(0);
    release(a0);
    c.wait_status(ta, |s| s["replicas"][0]["status"] == "COMPLETED");
    assert_eq!(c.status_json(tc)["status"], "WAITING");
    assert_eq!(c.status_json(tb)["status"], "WAITING");

    let (_, a1) = a_conns.remove(0);
    release(a1);
    let mut b_conns: Vec<_> = (0..2).map(|_| gate.arrive()).collect();
    b_conns.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(b_conns.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["b0", "b1"]);
    assert_eq!(c.status_json(tc)["queue_position"], 1);
    for (_, s) in b_conns {
        release(s);
    }
    let (who, s) = gate.arrive();
    assert_eq!(who, "c");
    release(s);
    for t in [ta, tb, tc] {
        let (ok, _) = c.retrieve(t);
        assert!(ok);
    }
}

#[test]
fn retrieve_waits_for_a_running_job_without_polling() {
    let c = Cluster::start_with(1, &["--allow-network"]);
    let gate = Gate::new();
    let a = job(c.dir.path(), "w.tar.gz", &gate.wait_recipe("w"));
    let t = c.deploy(1, &a);
    let (_, conn) = gate.arrive();
    let out_dir = c.dir.path().join("waited");
    let mut retr = c.cloud_spawn(&["retrieve", &t.to_string(), out_dir.to_str().unwrap()]);
    // The job is provably still running (it is blocked on us), so retrieve
    // must still be waiting: a RUNNING status proves the server got that far.
    assert_eq!(c.status_json(t)["status"], "RUNNING");
    assert!(retr.try_wait().unwrap().is_none(), "retrieve returned before the job ended");
    release(conn);
    let status = retr.wait().unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(out_dir.join(format!("output_{}.txt", c.ports[0]))).unwrap();
    assert!(text.contains("released w"));
}

#[test]
fn retrieve_without_a_directory_closes_a_running_job_and_kills_it() {
    let c = Cluster::start_with(1, &["--allow-network"]);
    let gate = Gate::new();
    let a = job(
        c.dir.path(),
        "k2.tar.gz",
        &[&format!("sleep 1000 & exec 3<>/dev/tcp/127.0.0.1/{}; echo k >&3; read -r go <&3", gate.port())],
    );
    let t = c.deploy(1, &a);
    let (_, mut conn) = gate.arrive();
    assert!(!c.children().is_empty());
    let out = c.cloud(&["retrieve", &t.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The job's end of the gate closes when its processes die.
    let mut buf = [0u8; 16];
    use std::io::Read;
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0, "job still alive after close");
    c.wait_no_children();
    let output = c.work().join(format!("output_{}/{t}.out", c.ports[0]));
    wait_until("the closed ticket's output is gone", || !output.exists());
    // The node is free again.
    let t2 = c.deploy(1, &job(c.dir.path(), "after.tar.gz", &["echo after"]));
    assert!(c.retrieve(t2).0);
}

#[test]
fn the_server_has_one_thread_and_no_zombies_after_jobs() {
    let c = Cluster::start(2);
    let a = job(c.dir.path(), "z.tar.gz", &["(sleep 0.1 &) ; echo parent done"]);
    let tickets: Vec<u32> = (0..6).map(|_| c.deploy(1, &a)).collect();
    for t in tickets {
        assert!(c.retrieve(t).0);
    }
    let tasks = std::fs::read_dir(format!("/proc/{}/task", c.pid())).unwrap().count();
    assert_eq!(tasks, 1, "the server must be single-threaded");
    c.wait_no_children();
}

#[test]
fn sigterm_sigint_and_sighup_stop_the_server_and_kill_running_jobs() {
    use nix::sys::signal::Signal;
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let mut c = Cluster::start_with(1, &["--allow-network"]);
        let gate = Gate::new();
        let a = job(c.dir.path(), "s.tar.gz", &gate.wait_recipe("s"));
        let t = c.deploy(1, &a);
        let (_, mut conn) = gate.arrive();
        let status = c.stop_with(sig).expect("server exits");
        assert!(status.success(), "clean exit on {sig}");
        let mut buf = [0u8; 4];
        use std::io::Read;
        assert_eq!(conn.read(&mut buf).unwrap_or(0), 0, "the job died with the server ({sig})");
        assert!(c.log().contains("stopped"));
        // The ticket is not closed: a restart answers for it (tests/restart.rs).
        assert!(c.work().join(format!("output_{}/{t}.out", c.ports[0])).exists(), "output kept");
    }
}

#[test]
fn large_outputs_arrive_whole_across_many_fragments() {
    let c = Cluster::start(2);
    let a = job(c.dir.path(), "big.tar.gz", &["@head -c $$((3000000 + $$CLOUD_REPLICA)) /dev/zero | tr '\\0' x"]);
    let t = c.deploy(2, &a);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    let mut sizes: Vec<usize> = outs.iter().map(|(_, o)| o.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![3_000_000, 3_000_001], "sizes need padding 0 and 3");
    assert!(outs.iter().all(|(_, o)| o.bytes().all(|b| b == b'x')));
    let leftovers: Vec<_> = std::fs::read_dir(c.dir.path().join(format!("out-{t}")))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn unretrieved_tickets_expire_with_a_clear_answer() {
    let c = Cluster::start_with(1, &["--ticket-ttl", "1"]);
    let t = c.deploy(1, &job(c.dir.path(), "e.tar.gz", &["@echo soon gone"]));
    // Wait, by asking as a user would, until the server has expired it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let err = loop {
        let out = c.cloud(&["status", &t.to_string()]);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(std::time::Instant::now() < deadline, "ticket never expired");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(err.contains(&format!("ticket {t} expired")) && err.contains("--ticket-ttl"), "{err}");
    let (ok, _) = c.retrieve(t);
    assert!(!ok);
    wait_until("the expired ticket's workspace is gone", || node_leftovers(&c).is_empty());
}

/// Established TCP connections with `port` at either end, from
/// /proc/net/tcp and tcp6 (ports are hex, after the colon; state 01).
/// TIME_WAIT leftovers of other tests' clients do not count.
fn tcp_connections_on(port: u16) -> usize {
    let hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[3] == "01" && (cols[1].ends_with(&hex) || cols[2].ends_with(&hex))
        })
        .count()
}

#[test]
fn local_nodes_are_called_in_process_without_a_loopback_link() {
    let c = Cluster::start(2);
    let t = c.deploy(2, &job(c.dir.path(), "two.tar.gz", &["@echo replica $$CLOUD_REPLICA"]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    assert_eq!(outs.len(), 2);
    // Each node's port is held (nothing else may take it) but no link
    // connects to it: the main server calls its nodes directly.
    for &port in &c.ports {
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err(), "node port {port} is held");
        assert_eq!(tcp_connections_on(port), 0, "no connection on node port {port}");
    }
}
