//! Slot launchers (issue 11): each node slot has one long-lived launcher
//! process that starts its contained replicas, in the slot's cgroup, so
//! that no replica is moved into a cgroup of its own (a cgroup v1 attach
//! can wait an RCU grace period) and the reactor does not clone. Tried as
//! a user and as a job would: where a replica runs, that a job cannot
//! reach the launcher, and that a launcher that dies does not hang a node.
//! Tests that need root say so when skipped; CI runs as root.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The server's parent cgroup (first hierarchy), from its ready line.
fn parent_group(c: &Cluster) -> Option<PathBuf> {
    let log = c.log();
    let at = log.find("(memory, pids) under ")? + "(memory, pids) under ".len();
    let path: String = log[at..].chars().take_while(|ch| !ch.is_whitespace() && *ch != ';').collect();
    Some(PathBuf::from(path))
}

/// The group names under the server's parent group.
fn groups(parent: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A replica's processes are in its slot's group, made when the node
/// started; no group is made for the replica (before: `<port>-<ticket>`,
/// created, joined and removed per replica).
#[test]
fn a_replica_runs_in_its_slots_cgroup_and_no_group_is_made_per_replica() {
    if !need_root("a_replica_runs_in_its_slots_cgroup_and_no_group_is_made_per_replica") {
        return;
    }
    let c = Cluster::start_slots(&[2], &["--allow-network"]);
    let Some(parent) = parent_group(&c) else {
        assert!(std::env::var("CI").is_err(), "CI hosts have cgroups: {}", c.log());
        eprintln!("SKIPPED a_replica_runs_in_its_slots_cgroup...: no cgroups: {}", c.log());
        return;
    };
    let port = c.ports[0];
    let slots = vec![format!("{port}-slot0"), format!("{port}-slot1")];
    assert_eq!(groups(&parent), slots, "one group per slot, made at start");
    let gate = Gate::new();
    let mut recipe = vec!["@grep -E ':(memory|pids):' /proc/self/cgroup".to_string()];
    recipe.extend(gate.wait_recipe("a"));
    let t = c.deploy(1, &job(c.dir.path(), "cg.tar.gz", &recipe));
    let (_, conn) = gate.arrive();
    assert_eq!(groups(&parent), slots, "a group was made for the running replica");
    release(conn);
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    let lines: Vec<&str> = outs[0].1.lines().filter(|l| l.contains(":memory:") || l.contains(":pids:")).collect();
    assert_eq!(lines.len(), 2, "{}", outs[0].1);
    for l in lines {
        assert!(l.ends_with(&format!("/{port}-slot0")), "the job is not in its slot's group: {l}");
    }
    assert_eq!(groups(&parent), slots);
    // A clean stop removes them, and the server's parent group itself
    // (each work dir has its own: every server ever started on a new work
    // dir would otherwise leave one behind).
    let mut c = c;
    c.terminate();
    assert!(!parent.exists(), "{} left after a clean stop", parent.display());
}

/// A job cannot signal, ptrace or even see its slot's launcher: it is
/// outside the job's PID namespace (and root's, not the slot user's).
#[test]
fn a_job_cannot_reach_its_launcher() {
    let c = Cluster::start(1);
    let launchers = c.wait_launchers(1);
    assert_eq!(launchers.len(), 1, "one launcher per slot");
    let l = launchers[0];
    let recipe = [format!(
        "@kill -KILL {l} 2>&1 || echo kill refused; kill -STOP {l} 2>&1 || echo stop refused; \
         test -e /proc/{l} && echo launcher visible; echo oom $$(cat /proc/self/oom_score_adj)"
    )];
    let t = c.deploy(1, &job(c.dir.path(), "kill.tar.gz", &recipe));
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    let out = &outs[0].1;
    assert!(out.contains("kill refused") && out.contains("stop refused"), "{out}");
    // Not in its /proc: no pid to ptrace either.
    assert!(!out.contains("launcher visible"), "{out}");
    // The launcher may be spared by the OOM killer; the job is not.
    let server_adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", c.pid())).unwrap();
    assert!(out.contains(&format!("oom {}", server_adj.trim())), "{out}");
    // Still there, not stopped, and the slot goes on.
    assert_eq!(c.launchers(), vec![l]);
    let state = processes().into_iter().find(|p| p.pid == l).map(|p| p.state);
    assert!(matches!(state, Some('S' | 'R')), "launcher state {state:?}");
    let t2 = c.deploy(1, &job(c.dir.path(), "after.tar.gz", &["@echo after"]));
    let (ok, outs) = c.retrieve(t2);
    assert!(ok && outs[0].1 == "after\n", "{outs:?}");
}

/// A launcher that dies (killed by an operator, say) takes its running
/// replica with it, which ends as killed instead of hanging, and the slot
/// gets a new launcher for its next replica.
#[test]
fn a_launcher_that_dies_kills_its_replica_and_is_replaced() {
    if !need_root("a_launcher_that_dies_kills_its_replica_and_is_replaced") {
        return;
    }
    let c = Cluster::start_with(1, &["--allow-network"]);
    let old = c.wait_launchers(1);
    assert_eq!(old.len(), 1, "one launcher per slot");
    let gate = Gate::new();
    let t = c.deploy(1, &job(c.dir.path(), "held.tar.gz", &gate.wait_recipe("held")));
    let (_, conn) = gate.arrive();
    kill(Pid::from_raw(old[0] as i32), Signal::SIGKILL).unwrap();
    let r = c.wait_status(t, |s| s["status"] != "RUNNING");
    assert_eq!(r["status"], "INVALID", "{r}");
    let message = r["replicas"][0]["message"].as_str().unwrap_or("");
    assert!(message.contains("SIGKILL"), "{r}");
    drop(conn);
    wait_until("the server logs the launcher's end", || c.log().contains("launcher (pid"));
    let t2 = c.deploy(1, &job(c.dir.path(), "next.tar.gz", &["@echo next"]));
    let (ok, outs) = c.retrieve(t2);
    assert!(ok && outs[0].1 == "next\n", "{outs:?}");
    let new = c.launchers();
    assert_eq!(new.len(), 1);
    assert_ne!(new, old, "the slot has a new launcher");
}

/// The field `name` of /proc/PID/status text, trimmed.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// Root: a slot's launcher empties its capability bounding set and loads
/// the job's seccomp filter once, at start, so each replica inherits them
/// instead of setting them up again (41 prctl calls and a filter compiled
/// per job). The job ends up exactly as restricted as before: no
/// capability in its bounding set, no new privileges, and one filter
/// (not two) that still refuses the keyrings.
#[test]
fn a_launcher_gives_its_replicas_the_bounding_set_and_filter_once() {
    if !need_root("a_launcher_gives_its_replicas_the_bounding_set_and_filter_once") {
        return;
    }
    let c = Cluster::start(1);
    let launchers = c.wait_launchers(1);
    assert_eq!(launchers.len(), 1, "one launcher per slot");
    let t = c.deploy(
        1,
        &job(c.dir.path(), "caps.tar.gz", &["@grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp)' /proc/self/status"]),
    );
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    // Read once it has served a replica: its set-up is over by then (read
    // at once, a launcher still starting was seen with its bounding set).
    assert_eq!(c.launchers(), launchers, "the same launcher");
    let own = std::fs::read_to_string(format!("/proc/{}/status", launchers[0])).unwrap();
    assert_eq!(status_field(&own, "CapBnd"), Some("0000000000000000"), "{own}");
    assert_eq!(status_field(&own, "Seccomp"), Some("2"), "{own}");
    // The launcher keeps what it needs to contain replicas.
    assert_ne!(status_field(&own, "CapEff"), Some("0000000000000000"), "{own}");
    let out = &outs[0].1;
    assert_eq!(status_field(out, "CapBnd"), Some("0000000000000000"), "{out}");
    assert_eq!(status_field(out, "CapEff"), Some("0000000000000000"), "{out}");
    assert_eq!(status_field(out, "NoNewPrivs"), Some("1"), "{out}");
    assert_eq!(status_field(out, "Seccomp"), Some("2"), "{out}");
    if let Some(n) = status_field(out, "Seccomp_filters") {
        assert_eq!(n, "1", "the filter is loaded once, by the launcher: {out}");
    }
}

/// A slot's launcher starts afresh from the server's binary instead of
/// staying a fork of the server (issue 11): every replica's init is a
/// clone of its launcher and forks the job, so whatever the launcher
/// carries (the server's heap, libraries the server loaded for itself) is
/// copied twice per replica and torn down at the job's exec. It names
/// itself in `ps`, holds less anonymous memory than the server, and still serves replicas.
#[test]
fn a_launcher_is_started_afresh_not_a_copy_of_the_server() {
    let c = Cluster::start(1);
    let launchers = c.wait_launchers(1);
    assert_eq!(launchers.len(), 1, "one launcher per slot");
    let l = launchers[0];
    let cmdline = std::fs::read(format!("/proc/{l}/cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"cloud-launcher\0--slot-launcher-v1\0"),
        "not re-executed: {}",
        String::from_utf8_lossy(&cmdline)
    );
    // A fork shares (and counts) every anonymous page the server had; a
    // fresh start has only its own.
    let (own, server) = (rss_anon(l), rss_anon(c.pid()));
    assert!(own < server, "the launcher holds {own} bytes of anonymous memory, the server {server}");
    let t = c.deploy(1, &job(c.dir.path(), "fresh.tar.gz", &["@echo fresh"]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1 == "fresh\n", "{outs:?}");
}

/// Started by hand with a launcher's arguments, `cloud-server` is no
/// launcher: it has no launcher socket, says so and ends.
#[test]
fn a_launcher_started_by_hand_refuses() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-server"))
        .arg0("cloud-launcher")
        .args(["--slot-launcher-v1", "1", "0", "-", "-", "1", "1", "1", "1", "1", "1", "1", "-", "0", "1", "1"])
        .args(["-", "0", "uncontained", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not started by cloud-server"), "{err}");
}
