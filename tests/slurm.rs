//! The Slurm node against a real one-host Slurm: tests/slurm/up.sh brings
//! munged, slurmctld and slurmd up in a temporary folder (as root), once
//! for the whole test binary (the first test that needs it), and
//! tests/slurm/down.sh runs when the binary exits, whether tests passed or
//! failed. One test drives `SlurmNode`s the way the reactor does (pipes
//! polled, children reaped, timers from `deadline()`); another runs a whole
//! cluster whose nodes are `slurm:cloudtest` lines. Under CI=true a Slurm
//! that cannot start fails the test with the script's reason; elsewhere,
//! without root or without the Slurm packages, the test says it is skipped.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudinfra::proto::{JobState, RunArgs};
use cloudinfra::slurm::{parse_node_line, SlurmConfig, SlurmFinished, SlurmNode};
use common::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/slurm");

/// `drive` reaps any child of the test process: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running one-host Slurm; dropping it runs down.sh.
struct Slurm {
    dir: tempfile::TempDir,
}

/// The one Slurm of this test binary, or why there is none (skipped).
static SHARED: std::sync::OnceLock<Result<Slurm, String>> = std::sync::OnceLock::new();

/// Slurm, brought up by the first test that asks; `None`: skip.
fn shared_slurm() -> Option<&'static Slurm> {
    let slurm = SHARED.get_or_init(|| {
        let up = Slurm::up();
        if up.is_ok() {
            // SAFETY: registers a plain `extern "C" fn()` that touches only
            // the static above, which lives until the process ends.
            if unsafe { libc::atexit(tear_down) } != 0 {
                eprintln!("cannot register Slurm's tear-down: run tests/slurm/down.sh by hand");
            }
        }
        up
    });
    slurm.as_ref().ok()
}

/// At exit (passed or failed): down.sh, then the folder goes.
extern "C" fn tear_down() {
    if let Some(Ok(slurm)) = SHARED.get() {
        slurm.down();
        let _ = std::fs::remove_dir_all(slurm.dir.path());
    }
}

impl Slurm {
    /// Bring Slurm up, or say why not: `Err` means skip (outside CI).
    fn up() -> Result<Slurm, String> {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        if !need_root("slurm") {
            return Err("needs root".into());
        }
        if !ci
            && Command::new("sh")
                .args(["-c", "command -v slurmctld && command -v sbatch"])
                .output()
                .is_ok_and(|o| !o.status.success())
        {
            let why = "the Slurm packages are not installed (apt-get install slurmctld slurmd slurm-client munge)";
            eprintln!("SKIPPED slurm: {why}");
            return Err(why.into());
        }
        let dir = tempfile::Builder::new().prefix("cloudinfra-slurm").tempdir().expect("temp dir");
        let started = Instant::now();
        let out = Command::new(format!("{SCRIPTS}/up.sh")).arg(dir.path()).output().expect("run tests/slurm/up.sh");
        let slurm = Slurm { dir };
        assert!(
            out.status.success(),
            "Slurm could not start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        eprintln!("{} (bring-up took {:?})", String::from_utf8_lossy(&out.stdout).trim(), started.elapsed());
        Ok(slurm)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    fn node(&self, line: &str, name: &str, time_limit: Duration) -> SlurmNode {
        let line = parse_node_line(line).expect("node line").expect("a slurm line");
        let mut cfg = SlurmConfig::new(line, self.dir.path().join(name), time_limit);
        cfg.env = vec![(OsString::from("SLURM_CONF"), self.conf().into_os_string())];
        cfg.kill_grace = Duration::from_secs(20);
        SlurmNode::new(cfg).expect("slurm node")
    }

    /// Run a Slurm client command against this cluster.
    fn command(&self, argv: &[&str]) -> String {
        let out = Command::new(argv[0]).args(&argv[1..]).env("SLURM_CONF", self.conf()).output().expect(argv[0]);
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        self.down();
    }
}

impl Slurm {
    fn down(&self) {
        let out = Command::new(format!("{SCRIPTS}/down.sh")).arg(self.dir.path()).output();
        match out {
            Ok(o) => eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim()),
            Err(e) => eprintln!("tests/slurm/down.sh: {e}"),
        }
    }
}

/// Stage a job's archive on a node for a ticket, then submit the replica.
fn submit(node: &mut SlurmNode, archive: &Path, ticket: u32, replica: u32, replicas: u32) {
    let (_, path) = node.prepare_archive(ticket).expect("prepare archive");
    std::fs::copy(archive, path).expect("stage archive");
    node.start(RunArgs { ticket, replica, replicas }, (0, ticket), Instant::now())
        .unwrap_or_else(|r| panic!("{}: start failed: {r:?}", node.name()));
}

/// What the reactor does for Slurm nodes, until `done` holds or `limit`
/// passes: wait on the commands' pipes and the nodes' deadlines, hand
/// readiness, exits and timers to the nodes. Returns each node's results.
fn drive(
    nodes: &mut [&mut SlurmNode],
    limit: Duration,
    mut step: impl FnMut(&mut [&mut SlurmNode]),
    done: impl Fn(&[Vec<SlurmFinished>]) -> bool,
) -> Vec<Vec<SlurmFinished>> {
    let end = Instant::now() + limit;
    let mut results: Vec<Vec<SlurmFinished>> = vec![Vec::new(); nodes.len()];
    let mut pipes: BTreeMap<RawFd, usize> = BTreeMap::new();
    loop {
        for (i, n) in nodes.iter_mut().enumerate() {
            pipes.extend(n.take_new_pipes().into_iter().map(|fd| (fd, i)));
        }
        if done(&results) {
            return results;
        }
        let now = Instant::now();
        assert!(now < end, "not done within {limit:?}; so far: {results:?}; jobs: {}", jobs(nodes));
        let next = nodes.iter().filter_map(|n| n.deadline()).chain([end]).min().unwrap_or(end);
        let wait = next.saturating_duration_since(now).min(Duration::from_secs(5));
        let fds: Vec<RawFd> = pipes.keys().copied().collect();
        // SAFETY: every fd in `pipes` is a pipe its node keeps open until
        // on_exit hands it back, when it leaves `pipes` below.
        let mut polled: Vec<PollFd> =
            fds.iter().map(|&fd| PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLIN)).collect();
        let ms = PollTimeout::try_from(wait.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut polled, ms);
        let ready: Vec<RawFd> = polled
            .iter()
            .zip(&fds)
            .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, fd)| *fd)
            .collect();
        drop(polled);
        for fd in ready {
            nodes[pipes[&fd]].on_readable(fd);
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { break };
                    for (i, n) in nodes.iter_mut().enumerate() {
                        if let Some(exited) = n.on_exit(pid, status, Instant::now()) {
                            pipes.remove(&std::os::fd::AsRawFd::as_raw_fd(&exited.pipe));
                            results[i].extend(exited.finished);
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.deadline().is_some_and(|d| d <= now) {
                results[i].extend(n.on_timer(now));
            }
        }
        step(nodes);
    }
}

/// Each node's tickets and Slurm job ids, for failure messages.
fn jobs(nodes: &[&mut SlurmNode]) -> String {
    nodes.iter().map(|n| format!("{}: {:?}", n.name(), n.jobs())).collect::<Vec<_>>().join("; ")
}

/// The Slurm job id a result's message names.
fn job_id(f: &SlurmFinished) -> u64 {
    let rest = f.result.message.strip_prefix("slurm job ").unwrap_or_else(|| panic!("no job id in {f:?}"));
    rest.split(':').next().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("no job id in {f:?}"))
}

fn output(node: &SlurmNode, ticket: u32) -> String {
    let (file, len) = node.fetch(ticket).unwrap_or_else(|e| panic!("fetch {ticket}: {e:?}"));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, len), &mut text).expect("read output");
    text
}

#[test]
fn slurm_runs_replicas_and_maps_failures_and_cancels() {
    let _one = one_at_a_time();
    let Some(slurm) = shared_slurm() else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let hello = job(
        work.path(),
        "hello.tar.gz",
        &["@echo replica $$CLOUD_REPLICA of $$CLOUD_REPLICAS ticket $$CLOUD_TICKET slurm job $$SLURM_JOB_ID"],
    );
    let fails = job(work.path(), "fails.tar.gz", &["@echo about to fail", "@exit 3"]);
    let sleeps = job(work.path(), "sleeps.tar.gz", &["@echo sleeping", "@sleep 600"]);

    // Two replicas of ticket 1 on two Slurm nodes, a failing ticket 2, and
    // a partition Slurm does not have.
    let mut a = slurm.node("slurm:cloudtest slots=2", "a", Duration::from_secs(60));
    let mut b = slurm.node("slurm:cloudtest", "b", Duration::from_secs(60));
    let mut bad = slurm.node("slurm:nosuchpartition", "bad", Duration::from_secs(60));
    submit(&mut a, &hello, 1, 0, 2);
    submit(&mut b, &hello, 1, 1, 2);
    submit(&mut a, &fails, 2, 0, 1);
    submit(&mut bad, &hello, 3, 0, 1);
    let started = Instant::now();
    let results = drive(
        &mut [&mut a, &mut b, &mut bad],
        Duration::from_secs(90),
        |_| {},
        |r| r[0].len() == 2 && r[1].len() == 1 && r[2].len() == 1,
    );
    eprintln!("three Slurm jobs and a refused one done in {:?}", started.elapsed());
    let by_ticket = |v: &[SlurmFinished], t: u32| v.iter().find(|f| f.ticket == t).cloned().expect("result");
    for (node, f, replica) in [(&a, by_ticket(&results[0], 1), 0), (&b, by_ticket(&results[1], 1), 1)] {
        assert_eq!(f.result.state, JobState::Completed, "{f:?}");
        assert_eq!(f.result.exit_code, 0);
        assert!(f.result.message.contains(": COMPLETED"), "{f:?}");
        let out = output(node, 1);
        assert_eq!(out, format!("replica {replica} of 2 ticket 1 slurm job {}\n", job_id(&f)), "{f:?}");
    }
    let failed = by_ticket(&results[0], 2);
    assert_eq!(failed.result.state, JobState::Invalid);
    // make reports a failed recipe with status 2; the recipe's 3 is in its message.
    assert_eq!(failed.result.exit_code, 2);
    assert_eq!(failed.result.message, format!("slurm job {}: FAILED, exit 2", job_id(&failed)));
    let out = output(&a, 2);
    assert!(out.contains("about to fail") && out.contains("Error 3"), "{out}");
    let refused = by_ticket(&results[2], 3);
    assert_eq!(refused.result.state, JobState::Invalid);
    assert!(
        refused.result.message.contains("sbatch failed") && refused.result.message.contains("partition"),
        "{refused:?}"
    );

    // Cancelled three ways: scancel by someone else, CLOSE (drop_ticket),
    // and our time limit.
    let mut limited = slurm.node("slurm:cloudtest", "limited", Duration::from_secs(2));
    submit(&mut limited, &sleeps, 10, 0, 1);
    submit(&mut a, &sleeps, 11, 0, 1);
    submit(&mut b, &sleeps, 12, 0, 1);
    let started = Instant::now();
    let mut cancelled = false;
    let mut closed = false;
    let results = drive(
        &mut [&mut limited, &mut a, &mut b],
        Duration::from_secs(120),
        |nodes| {
            if !cancelled {
                if let Some((_, Some(id))) = nodes[1].jobs().first() {
                    slurm.command(&["scancel", &id.to_string()]);
                    cancelled = true;
                }
            }
            if !closed && nodes[2].jobs().first().is_some_and(|(_, id)| id.is_some()) {
                nodes[2].drop_ticket(12, Instant::now());
                closed = true;
            }
        },
        |r| r.iter().all(|v| v.len() == 1),
    );
    eprintln!("three cancels done in {:?}", started.elapsed());
    let limit = &results[0][0];
    assert_eq!(limit.result.state, JobState::Invalid);
    assert_eq!(
        limit.result.message,
        format!("slurm job {}: cancelled: time limit of 2s exceeded (--time-limit)", job_id(limit))
    );
    let by_hand = &results[1][0];
    assert_eq!(by_hand.result.state, JobState::Invalid);
    assert!(by_hand.result.message.contains("CANCELLED, cancelled in Slurm"), "{by_hand:?}");
    let close = &results[2][0];
    assert_eq!(close.result.state, JobState::Invalid);
    assert_eq!(close.result.message, format!("slurm job {}: cancelled: the ticket was closed", job_id(close)));
    // A closed ticket's folder goes once Slurm confirms (removed by a child).
    let folder = b.cfg.dir.join("12");
    wait_until("the closed ticket's folder is gone", || {
        let _ = waitpid(None, Some(WaitPidFlag::WNOHANG));
        !folder.exists()
    });
    for n in [&a, &b, &limited] {
        assert_eq!(n.busy(), 0);
        assert!(n.command_pids().is_empty(), "{}: commands left: {:?}", n.name(), n.command_pids());
    }
    // Nothing of ours is left in Slurm.
    let left = slurm.command(&["squeue", "-h", "-o", "%i %T"]);
    assert_eq!(left.trim(), "", "jobs left in Slurm");
}

/// Stand-ins for the Slurm commands (no root, no Slurm): each a shell script.
fn fake_slurm(dir: &Path, scripts: &[(&str, &str)], time_limit: Duration) -> SlurmNode {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    for (name, body) in scripts {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write fake");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let line = parse_node_line("slurm:fake").expect("line").expect("slurm line");
    let mut cfg = SlurmConfig::new(line, dir.join("node"), time_limit);
    cfg.env = vec![("PATH".into(), format!("{}:/usr/bin:/bin", bin.display()).into())];
    cfg.command_timeout = Duration::from_secs(1);
    cfg.kill_grace = Duration::from_secs(2);
    SlurmNode::new(cfg).expect("node")
}

#[test]
fn a_hung_sbatch_is_killed_and_a_purged_job_is_reported_unknown() {
    let _one = one_at_a_time();
    let work = tempfile::tempdir().expect("temp dir");
    let hello = job(work.path(), "hello.tar.gz", &["@echo hi"]);
    let mut hung = fake_slurm(&work.path().join("hung"), &[("sbatch", "exec sleep 600")], Duration::from_secs(60));
    let invalid = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1";
    let mut purged = fake_slurm(
        &work.path().join("purged"),
        &[("sbatch", "echo 77"), ("squeue", invalid), ("scontrol", invalid)],
        Duration::from_secs(60),
    );
    // Slurm never confirms the cancel of a job past our time limit.
    let mut stuck = fake_slurm(
        &work.path().join("stuck"),
        &[("sbatch", "echo 78"), ("squeue", "echo 78 RUNNING None"), ("scancel", "exit 0")],
        Duration::from_secs(1),
    );
    submit(&mut hung, &hello, 1, 0, 1);
    submit(&mut purged, &hello, 2, 0, 1);
    submit(&mut stuck, &hello, 3, 0, 1);
    let started = Instant::now();
    let results = drive(
        &mut [&mut hung, &mut purged, &mut stuck],
        Duration::from_secs(30),
        |_| {},
        |r| r.iter().all(|v| v.len() == 1),
    );
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let result = |i: usize| results[i][0].result.clone();
    assert_eq!(result(0).state, JobState::Invalid);
    assert_eq!(result(0).message, "slurm:fake: sbatch failed: no answer within 1s (is slurmctld up?); killed");
    assert_eq!(result(1).state, JobState::Invalid);
    assert_eq!(result(1).message, "slurm job 77: no longer known to Slurm; its outcome is unknown");
    assert_eq!(result(2).state, JobState::Invalid);
    assert_eq!(result(2).message, "slurm job 78: scancel sent, but Slurm still says RUNNING; given up");
    for n in [&hung, &purged, &stuck] {
        assert_eq!((n.busy(), n.command_pids().len(), n.deadline()), (0, 0, None), "{}: idle at the end", n.name());
    }
    // What status showed while it ran: its Slurm job, each state once.
    let notes = stuck.take_notes();
    assert_eq!(notes, [(3, "slurm job 78: PENDING".to_string()), (3, "slurm job 78: RUNNING".to_string())]);
}

/// Whether every replica of a status has ended.
fn ended(st: &serde_json::Value) -> bool {
    st["replicas"]
        .as_array()
        .is_some_and(|rs| rs.iter().all(|r| r["status"] == "COMPLETED" || r["status"] == "INVALID"))
}

/// The Slurm job id a status message names ("slurm job 42: ...").
fn named_job(message: &serde_json::Value) -> u64 {
    let m = message.as_str().unwrap_or_default();
    m.strip_prefix("slurm job ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no Slurm job id in {message}"))
}

#[test]
fn a_cluster_hands_replicas_to_slurm_nodes() {
    let _one = one_at_a_time();
    let Some(slurm) = shared_slurm() else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let hello = job(work.path(), "hello.tar.gz", &["@echo replica $$CLOUD_REPLICA slurm job $$SLURM_JOB_ID"]);
    let lines = ["slurm:cloudtest".to_string(), "slurm:cloudtest".to_string()];
    let conf = slurm.conf();
    // A root server refuses Slurm lines unless told that Slurm runs them as root.
    let nodes = work.path().join("nodes.txt");
    std::fs::write(&nodes, format!("2\n{}\n", lines.join("\n"))).expect("nodes file");
    let refused = refused_start(
        Command::new(SERVER)
            .args(["--listen", "127.0.0.1:0", "--nodes"])
            .arg(&nodes)
            .arg("--work-dir")
            .arg(work.path().join("refused")),
    );
    assert!(
        refused.contains("line 2: slurm:cloudtest: as root, replicas on a Slurm node would run as root"),
        "{refused}"
    );
    let mut c = Cluster::start_lines_tweaked(&lines, &["--time-limit", "120", "--slurm-as-root"], |cmd| {
        cmd.env("SLURM_CONF", &conf);
    });
    let ready = c.log();
    assert!(ready.contains("2 nodes: slurm:cloudtest#1 slurm:cloudtest#2"), "{ready}");
    assert!(ready.contains("replicas run in Slurm"), "{ready}");

    // Two replicas, one on each Slurm node: both complete, status names
    // their Slurm jobs, retrieve gets both outputs.
    let started = Instant::now();
    let t = c.deploy(2, &hello);
    let st = c.wait_status(t, ended);
    eprintln!("two replicas through Slurm in {:?}", started.elapsed());
    let replicas = st["replicas"].as_array().expect("replicas").clone();
    let mut nodes: Vec<&str> = replicas.iter().map(|r| r["node"].as_str().unwrap_or_default()).collect();
    nodes.sort();
    assert_eq!(nodes, ["slurm:cloudtest#1", "slurm:cloudtest#2"], "{st}");
    let mut want = Vec::new();
    for r in &replicas {
        assert_eq!(r["status"], "COMPLETED", "{st}");
        assert!(r["message"].as_str().is_some_and(|m| m.contains(": COMPLETED")), "{st}");
        want.push(format!("replica {} slurm job {}\n", r["replica"], named_job(&r["message"])));
    }
    assert_ne!(named_job(&replicas[0]["message"]), named_job(&replicas[1]["message"]), "{st}");
    let (ok, files) = c.retrieve(t);
    assert!(ok, "retrieve failed: {files:?}");
    let mut got: Vec<String> = files.into_iter().map(|(_, text)| text).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let out_dir = c.dir.path().join(format!("out-{t}"));
    for name in ["output_cloudtest#1.txt", "output_cloudtest#2.txt"] {
        assert!(out_dir.join(name).exists(), "{name} not retrieved");
    }

    // --fail-fast: replica 0 fails, so replica 1 (pending or running in
    // Slurm) is scancelled and reported stopped.
    let fails = job(
        work.path(),
        "failfast.tar.gz",
        &["@if [ $$CLOUD_REPLICA = 0 ]; then echo failing; exit 3; fi; echo waiting; sleep 600"],
    );
    let out = c.cloud(&["deploy", "2", fails.to_str().expect("path"), "--fail-fast"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let t = stdout.trim().strip_prefix("Job ticket#: ").and_then(|n| n.parse::<u32>().ok());
    let t = t.unwrap_or_else(|| panic!("deploy --fail-fast: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    let st = c.wait_status(t, ended);
    let first = &st["replicas"][0];
    assert_eq!(first["status"], "INVALID", "{st}");
    assert!(first["message"].as_str().is_some_and(|m| m.ends_with(": FAILED, exit 2")), "{st}");
    assert_eq!(st["replicas"][1]["status"], "INVALID", "{st}");
    assert!(st["replicas"][1]["message"].as_str().is_some_and(|m| m.contains("stopped: replica 0 failed")), "{st}");
    let in_slurm = || slurm.command(&["squeue", "-h", "-o", "%i %T"]);
    wait_within(Duration::from_secs(30), "Slurm has no job left after fail-fast", || in_slurm().trim().is_empty());
    assert!(c.cloud(&["retrieve", &t.to_string()]).status.success());

    // CLOSE of a running replica and server shutdown are scancels.
    let sleeps = job(work.path(), "sleeps.tar.gz", &["@echo sleeping", "@sleep 600"]);
    let closed = c.deploy(1, &sleeps);
    let _kept = c.deploy(1, &sleeps);
    wait_within(Duration::from_secs(60), "both jobs run in Slurm", || in_slurm().matches("RUNNING").count() == 2);
    // While it runs, status names its Slurm job.
    let running =
        |st: &serde_json::Value| st["replicas"][0]["message"].as_str().is_some_and(|m| m.ends_with(": RUNNING"));
    let st = c.wait_status(closed, running);
    let id = named_job(&st["replicas"][0]["message"]);
    assert!(in_slurm().contains(&format!("{id} RUNNING")), "{st} not in {}", in_slurm());
    assert!(c.cloud(&["retrieve", &closed.to_string()]).status.success());
    wait_within(Duration::from_secs(30), "the closed job leaves Slurm", || in_slurm().lines().count() == 1);
    let folders = || {
        ["slurm_cloudtest#1", "slurm_cloudtest#2"].iter().any(|n| c.work().join(n).join(closed.to_string()).exists())
    };
    wait_until("the closed ticket's folder is gone", || !folders());
    let stopping = Instant::now();
    assert!(c.terminate().is_some_and(|s| s.success()), "{}", c.log());
    eprintln!("server with a replica in Slurm stopped in {:?}", stopping.elapsed());
    wait_within(Duration::from_secs(30), "Slurm has no job left after shutdown", || in_slurm().trim().is_empty());
}
