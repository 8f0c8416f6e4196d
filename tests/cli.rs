//! The client programs as a user sees them: the cluster view (`status`
//! without a ticket, `--mine`), `status --wait`, `deploy --wait`, `cancel`,
//! `retrieve` without a directory, their human and JSON formats and exit codes.

mod common;

use std::io::Write;
use std::process::Output;

use common::{job, wait_until, Cluster, Gate};
use serde_json::Value;

/// Jobs that use the gate reach it over loopback.
const NET: &[&str] = &["--allow-network"];

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

fn release(mut s: std::net::TcpStream) {
    let _ = s.write_all(b"go\n");
}

#[test]
fn cluster_view_shows_running_and_queued_jobs_in_text_and_json() {
    let c = Cluster::start_with(1, NET);
    let gate = Gate::new();
    let running = c.deploy(1, &job(c.dir.path(), "a.tar.gz", &gate.wait_recipe("a")));
    let (_, held) = gate.arrive();
    let queued = c.deploy(1, &job(c.dir.path(), "b.tar.gz", &["true"]));

    let v = json(&c.cloud(&["status", "--json"]));
    let node = &v["nodes"][0];
    assert_eq!(node["name"], format!("127.0.0.1:{}", c.ports[0]));
    assert_eq!(node["state"], "busy");
    assert_eq!(node["slots"], 1);
    assert_eq!(node["running"][0]["ticket"], running);
    assert_eq!(node["running"][0]["replica"], 0);
    assert!(node["running"][0]["since"].as_u64().unwrap() > 1_700_000_000, "{v}");
    assert_eq!(v["queue"][0]["ticket"], queued);
    assert_eq!(v["queue"][0]["position"], 1);
    assert_eq!(v["queue"][0]["replicas"], 1);
    let uid = nix::unistd::geteuid().as_raw();
    assert_eq!(v["queue"][0]["owner"], uid);
    assert_eq!(v["totals"]["busy"], 1);
    assert_eq!(v["totals"]["free"], 0);
    assert_eq!(v["totals"]["waiting"], 1);
    assert_eq!(v["totals"]["running"], 1);

    let out = c.cloud(&["status"]);
    assert!(out.status.success());
    let t = text(&out);
    assert!(t.contains(&format!("127.0.0.1:{}", c.ports[0])) && t.contains("busy"), "{t}");
    let queue_line = t.lines().find(|l| l.starts_with("1 ")).unwrap_or_else(|| panic!("no queue line: {t}"));
    assert!(queue_line.contains(&queued.to_string()) && queue_line.contains(&format!("uid {uid}")), "{t}");
    assert!(t.contains("nodes: 1 (0 free, 1 busy, 0 down); jobs: 1 waiting, 1 running, 0 finished"), "{t}");

    // --mine: the caller's tickets, with state and age.
    let mine = json(&c.cloud(&["status", "--mine", "--json"]));
    let tickets = mine["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 2, "{mine}");
    assert_eq!(tickets[0]["ticket"], running);
    assert_eq!(tickets[0]["status"], "RUNNING");
    assert_eq!(tickets[1]["ticket"], queued);
    assert_eq!(tickets[1]["status"], "WAITING");
    let t = text(&c.cloud(&["status", "--mine"]));
    assert!(t.lines().any(|l| l.starts_with(&running.to_string()) && l.contains("RUNNING")), "{t}");

    release(held);
    wait_until("both jobs end", || {
        let v = json(&c.cloud(&["status", "--json"]));
        v["totals"]["finished"] == 2 && v["nodes"][0]["state"] == "free"
    });
    let t = text(&c.cloud(&["status"]));
    assert!(t.contains("queue: empty") && t.contains("free"), "{t}");
}

#[test]
fn a_waiting_replica_has_null_node_and_exit_code_in_json() {
    let c = Cluster::start_with(1, NET);
    let gate = Gate::new();
    let first = c.deploy(1, &job(c.dir.path(), "a.tar.gz", &gate.wait_recipe("a")));
    let (_, held) = gate.arrive();
    let second = c.deploy(1, &job(c.dir.path(), "b.tar.gz", &["true"]));
    let st = c.status_json(second);
    assert_eq!(st["replicas"][0]["node"], Value::Null, "{st}");
    assert_eq!(st["replicas"][0]["exit_code"], Value::Null, "{st}");
    let st = c.status_json(first);
    assert_eq!(st["replicas"][0]["node"], format!("127.0.0.1:{}", c.ports[0]));
    assert_eq!(st["replicas"][0]["exit_code"], Value::Null, "running: {st}");
    release(held);
    let st = c.wait_status(second, |s| s["status"] == "COMPLETED");
    assert_eq!(st["replicas"][0]["exit_code"], 0);
}

#[test]
fn status_wait_blocks_until_the_job_ends_and_exits_with_its_outcome() {
    // Debug logging names each call: the test sees the WAIT arrive.
    let c = Cluster::start_tweaked(1, NET, |cmd| {
        cmd.env("RUST_LOG", "debug");
    });
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "a.tar.gz", &gate.wait_recipe("a")));
    let (_, held) = gate.arrive();
    let mut waiter = c.cloud_spawn(&["status", &t.to_string(), "--wait", "--json"]);
    // It is parked on the server while the job runs.
    wait_until("the server has the JOB_INFO call", || c.log().contains(" JOB_INFO"));
    assert!(waiter.try_wait().unwrap().is_none(), "status --wait returned while the job runs");
    release(held);
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["status"], "COMPLETED");

    // A failing job: exit code 3, and the human output says FAILED with
    // make's code and the recipe's own.
    let bad = c.deploy(1, &job(c.dir.path(), "bad.tar.gz", &["exit 5"]));
    let out = c.cloud(&["status", &bad.to_string(), "--wait"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("FAILED exit 2 (recipe exit 5)"), "{}", text(&out));
}

#[test]
fn cancel_kills_running_replicas_keeps_their_output_and_never_starts_waiting_ones() {
    let c = Cluster::start_with(1, NET);
    let gate = Gate::new();
    let mut recipe = vec!["echo printed-before-cancel".to_string()];
    recipe.extend(gate.wait_recipe("a"));
    let running = c.deploy(1, &job(c.dir.path(), "a.tar.gz", &recipe));
    let (_, _held) = gate.arrive();
    let queued = c.deploy(1, &job(c.dir.path(), "b.tar.gz", &gate.wait_recipe("b")));

    let out = c.cloud(&["cancel", &queued.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = c.status_json(queued);
    assert_eq!(st["status"], "INVALID");
    assert!(st["replicas"][0]["message"].as_str().unwrap().contains("cancelled before it started"), "{st}");

    let out = c.cloud(&["cancel", &running.to_string(), "--json"]);
    assert_eq!(json(&out)["cancelled"], true);
    let st = c.wait_status(running, |s| s["status"] == "INVALID");
    assert!(st["replicas"][0]["message"].as_str().unwrap().contains("cancelled"), "{st}");
    // The node is free again, and the cancelled waiting job never ran.
    wait_until("the node is free", || json(&c.cloud(&["status", "--json"]))["nodes"][0]["state"] == "free");
    assert!(gate.nobody_waiting(), "a cancelled waiting job started");

    assert_eq!(st["replicas"][0]["outcome"], "KILLED", "{st}");
    // Cancelling it again says there was nothing left to cancel.
    let again = json(&c.cloud(&["cancel", &running.to_string(), "--json"]));
    assert_eq!((&again["cancelled"], &again["already_ended"]), (&false.into(), &true.into()), "{again}");
    assert!(text(&c.cloud(&["cancel", &running.to_string()])).contains("had already ended"));
    // What it printed before is kept for retrieve, which exits 4 (killed).
    let dir = c.dir.path().join("out");
    let out = c.cloud(&["retrieve", &running.to_string(), dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let kept = std::fs::read_to_string(dir.join(format!("output_{}.txt", c.ports[0]))).unwrap();
    assert!(kept.contains("printed-before-cancel"), "{kept:?}");
}

/// `deploy ... > /dev/full`: the job is accepted and runs, so its number
/// goes to stderr with the failure (exit 1), not nowhere.
#[test]
fn a_deploy_whose_stdout_fails_still_says_its_ticket() {
    let c = Cluster::start(1);
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let archive = job(c.dir.path(), "a.tar.gz", &["echo ran"]);
    let out = std::process::Command::new(common::client())
        .args(["deploy", "1", archive.to_str().unwrap(), "--server", &c.addr.to_string()])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let ticket: u32 = err
        .split("accepted as ticket ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no ticket in: {err}"));
    assert_eq!(err.lines().count(), 1, "{err}");
    let st = c.wait_status(ticket, |s| s["status"] == "COMPLETED");
    assert_eq!(st["replicas"][0]["status"], "COMPLETED", "{st}");
}

/// `status > /dev/full`: one line under the command's name, exit 1.
#[test]
fn a_status_whose_stdout_fails_says_so_under_its_name() {
    let c = Cluster::start(1);
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = std::process::Command::new(common::client())
        .args(["status", "--server", &c.addr.to_string()])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("status: cannot write to stdout: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A job of 2 replicas cancelled while it waits never ran on a node: its
/// replicas have no port to name their files by, and each still gets a
/// file of its own (`output_replica<N>.txt`), so retrieve writes both and
/// closes the ticket (it once named both `output_unknown.txt`, failed on
/// the second, and failed the same way on every retry).
#[test]
fn retrieve_names_each_replica_of_a_job_cancelled_while_waiting_apart() {
    let c = Cluster::start_with(2, NET);
    let gate = Gate::new();
    let running = c.deploy(2, &job(c.dir.path(), "a.tar.gz", &gate.wait_recipe("a")));
    let (_, held_a) = gate.arrive();
    let (_, held_b) = gate.arrive();
    let waiting = c.deploy(2, &job(c.dir.path(), "b.tar.gz", &["echo never"]));
    let out = c.cloud(&["cancel", &waiting.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = c.dir.path().join("cancelled");
    let out = c.cloud(&["retrieve", &waiting.to_string(), dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["output_replica0.txt", "output_replica1.txt"], "{}", text(&out));
    let st = c.cloud(&["status", &waiting.to_string()]);
    assert!(!st.status.success(), "the ticket was closed: {}", text(&st));
    release(held_a);
    release(held_b);
    c.wait_status(running, |s| s["status"] == "COMPLETED");
}

#[test]
fn deploy_wait_writes_outputs_into_ticket_dir_and_exits_with_the_outcome() {
    let c = Cluster::start(2);
    let cwd = tempfile::tempdir().unwrap();
    let archive = job(c.dir.path(), "a.tar.gz", &["echo hello from $CLOUD_REPLICA"]);
    let out = std::process::Command::new(common::client())
        .args(["deploy", "2", archive.to_str().unwrap(), "--wait", "--server", &c.addr.to_string()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let t = text(&out);
    let ticket: u32 = t.lines().next().unwrap().strip_prefix("Job ticket#: ").unwrap().parse().unwrap();
    for port in &c.ports {
        let f = cwd.path().join(format!("ticket_{ticket}/output_{port}.txt"));
        assert!(std::fs::read_to_string(&f).unwrap().contains("hello from"), "{}", f.display());
    }
    // Closed after: the ticket is gone.
    assert!(!c.cloud(&["status", &ticket.to_string()]).status.success());

    let bad = job(c.dir.path(), "bad.tar.gz", &["exit 4"]);
    let out = std::process::Command::new(common::client())
        .args(["deploy", "1", bad.to_str().unwrap(), "--wait", "--json", "--server", &c.addr.to_string()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replicas"][0]["status"], "INVALID");

    // A ./ticket_N left from an earlier server (its work dir wiped, the
    // numbers start again) is not written into: ./ticket_N-2 is.
    let next = ticket + 2;
    let stale = cwd.path().join(format!("ticket_{next}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("output_1.txt"), "an earlier job's").unwrap();
    let out = std::process::Command::new(common::client())
        .args(["deploy", "1", archive.to_str().unwrap(), "--wait", "--server", &c.addr.to_string()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(text(&out).starts_with(&format!("Job ticket#: {next}\n")), "{}", text(&out));
    assert_eq!(std::fs::read_dir(&stale).unwrap().count(), 1, "the stale dir was written into");
    let fresh = cwd.path().join(format!("ticket_{next}-2"));
    assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 1, "{}", text(&out));
}

#[test]
fn each_outcome_kind_shows_in_status_and_sets_the_exit_code() {
    let c = Cluster::start_with(1, &["--time-limit", "1"]);
    let ok = c.deploy(1, &job(c.dir.path(), "ok.tar.gz", &["echo fine"]));
    let out = c.cloud(&["status", &ok.to_string(), "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    let r = &v["replicas"][0];
    assert_eq!(r["outcome"], "COMPLETED", "{v}");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["recipe_exit_code"], Value::Null);
    let (sub, start, end) =
        (v["submitted"].as_u64().unwrap(), r["started"].as_u64().unwrap(), r["ended"].as_u64().unwrap());
    assert!(sub <= start && start <= end && sub > 1_700_000_000, "{v}");

    let failed = c.deploy(1, &job(c.dir.path(), "f.tar.gz", &["exit 3"]));
    let out = c.cloud(&["status", &failed.to_string(), "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replicas"][0]["outcome"], "FAILED", "{v}");
    assert_eq!(v["replicas"][0]["exit_code"], 2, "make's own code");
    assert_eq!(v["replicas"][0]["recipe_exit_code"], 3, "the recipe's code, from make's Error line");

    let killed = c.deploy(1, &job(c.dir.path(), "k.tar.gz", &["sleep 60"]));
    let out = c.cloud(&["status", &killed.to_string(), "--wait"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("KILLED") && t.contains("time limit"), "{t}");
}

#[test]
fn retrieve_without_a_directory_says_what_it_discarded() {
    let c = Cluster::start(2);
    let t = c.deploy(2, &job(c.dir.path(), "a.tar.gz", &["echo hi"]));
    c.wait_status(t, |s| s["status"] == "COMPLETED");
    let out = c.cloud(&["retrieve", &t.to_string()]);
    assert!(out.status.success());
    let said = text(&out);
    assert!(said.contains(&format!("ticket {t} closed: discarded the outputs of 2 ended replica(s)")), "{said}");
    assert!(said.contains("cloud retrieve"), "says how to keep them: {said}");
}

#[test]
fn every_command_has_help_with_examples_and_exit_codes() {
    for cmd in ["deploy", "status", "retrieve", "cancel"] {
        let out = std::process::Command::new(common::client()).args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success());
        let t = text(&out);
        assert!(t.contains("Examples:") && t.contains("Exit codes:") && t.contains("--json"), "{cmd}: {t}");
    }
}

/// `cloud --help | head -1`, `cloud status | true`: a reader that stops
/// early ends the client by SIGPIPE, as it would a C tool, not with a
/// panic and a backtrace on stderr.
#[test]
fn a_closed_stdout_ends_the_client_by_sigpipe_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(common::client())
        .args(["deploy", "--help"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
    assert!(out.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}
#[test]
fn retrieve_follow_streams_a_running_replicas_output_and_ends_with_it() {
    use std::io::BufRead;
    let c = Cluster::start_with(1, NET);
    let gate = Gate::new();
    let mut recipe = vec!["@echo line-one".to_string()];
    recipe.extend(gate.wait_recipe("a").into_iter().map(|l| format!("@{l}")));
    recipe.push("@echo line-two".into());
    let t = c.deploy(1, &job(c.dir.path(), "a.tar.gz", &recipe));
    let (_, held) = gate.arrive();
    let mut follower = c.cloud_spawn(&["retrieve", &t.to_string(), "--follow", "--replica", "0"]);
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let limit = std::time::Duration::from_secs(30);
    // Streamed while the replica still runs (it is held at the gate).
    assert_eq!(rx.recv_timeout(limit).expect("line-one streamed while running"), "line-one");
    assert!(follower.try_wait().unwrap().is_none(), "follow ended while the replica runs");
    release(held);
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(limit) {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l == "line-two"), "{rest:?}");
    let status = follower.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // The ticket stays open: its outputs are still there to retrieve.
    assert_eq!(c.status_json(t)["status"], "COMPLETED");
    // A replica that does not exist: a one-line error.
    let out = c.cloud(&["retrieve", &t.to_string(), "--follow", "--replica", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no replica 3"));
}

#[test]
fn deploy_of_a_large_archive_prints_no_progress_when_stderr_is_not_a_terminal() {
    let c = Cluster::start(1);
    // 5 MiB that gzip cannot shrink: over the progress bar's threshold.
    let mut noise = vec![0u8; 5 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let noise = String::from_utf8_lossy(&noise).into_owned();
    let archive = common::archive(c.dir.path(), "big.tar.gz", &[("Makefile", "run:\n\ttrue\n"), ("blob", &noise)]);
    assert!(std::fs::metadata(&archive).unwrap().len() > 4 << 20);
    let out = c.cloud(&["deploy", "1", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "stderr: {:?}", String::from_utf8_lossy(&out.stderr));
    assert!(text(&out).starts_with("Job ticket#: "));
}
