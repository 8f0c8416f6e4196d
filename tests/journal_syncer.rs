//! Issue 11: the journal's fdatasync is made by a child process (the
//! syncer), so the server's one thread never waits for the disk. A DEPLOY
//! is still answered only once its record is synced; everything else is
//! served meanwhile; a syncer that dies (even with a sync in flight) costs
//! no client an answer, and another one takes over.

mod common;

use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).expect("signal the syncer");
}

/// Bytes of the journal's records (the file runs on in zeros written
/// ahead, `journal::PREALLOCATE`).
fn journal_len(c: &Cluster) -> u64 {
    let bytes = std::fs::read(c.work().join("journal")).unwrap_or_default();
    cloudinfra::journal::replay(&bytes).map_or(0, |r| r.valid_len as u64)
}

fn ticket_of(child: Child) -> u32 {
    let out = child.wait_with_output().expect("deploy ends");
    assert!(out.status.success(), "deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.trim().strip_prefix("Job ticket#: ").and_then(|t| t.parse().ok()).expect("a ticket")
}

/// A deploy whose record is written and whose sync is asked of a stopped
/// syncer: returns the client, still waiting for its answer.
fn deploy_against_a_stopped_syncer(c: &Cluster, archive: &std::path::Path, syncer: u32) -> Child {
    signal(syncer, Signal::SIGSTOP);
    let before = journal_len(c);
    let deploy = c.cloud_spawn(&["deploy", "1", archive.to_str().unwrap()]);
    // The record is written before the sync is asked for.
    wait_until("the DEPLOY's record is written", || journal_len(c) > before);
    deploy
}

#[test]
fn a_deploy_waits_for_the_syncers_report_while_the_server_serves_everyone_else() {
    let c = Cluster::start_on_disk(1);
    let d = c.dir.path().to_path_buf();
    let archive = job(&d, "a.tar.gz", &["@echo synced"]);
    let first = c.deploy(1, &archive);
    c.wait_status(first, |s| s["status"] == "COMPLETED");
    wait_until("the syncer runs", || c.syncer().is_some());
    let syncer = c.syncer().unwrap_or_default();

    let mut deploy = deploy_against_a_stopped_syncer(&c, &archive, syncer);
    // The server is not blocked: a STATUS is answered at once ...
    let started = Instant::now();
    assert_eq!(c.status_json(first)["status"], "COMPLETED");
    assert!(started.elapsed() < Duration::from_secs(5), "STATUS took {:?}", started.elapsed());
    // ... while the DEPLOY is not answered before its record is synced.
    assert!(deploy.try_wait().expect("try_wait").is_none(), "a DEPLOY was answered before its sync");
    let (ok, outs) = c.retrieve(first);
    assert!(ok && outs[0].1.contains("synced"), "{outs:?}");
    assert!(deploy.try_wait().expect("try_wait").is_none(), "a DEPLOY was answered before its sync");

    signal(syncer, Signal::SIGCONT);
    let t = ticket_of(deploy);
    assert!(t > first);
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1.contains("synced"), "{outs:?}\n{}", c.log());
}

#[test]
fn a_syncer_killed_mid_sync_and_mid_burst_leaves_no_client_stuck_and_no_answered_ticket_lost() {
    let mut c = Cluster::start_on_disk(2);
    let d = c.dir.path().to_path_buf();
    let archive = job(&d, "a.tar.gz", &["@echo survived"]);
    let warm = c.deploy(1, &archive);
    assert!(c.retrieve(warm).0);
    wait_until("the syncer runs", || c.syncer().is_some());

    // Killed with a sync in flight: the server syncs that record itself
    // and answers.
    let syncer = c.syncer().unwrap_or_default();
    let deploy = deploy_against_a_stopped_syncer(&c, &archive, syncer);
    signal(syncer, Signal::SIGKILL);
    let in_flight = ticket_of(deploy);
    wait_until("the log says the syncer ended", || c.log().contains("journal syncer"));

    // Another syncer takes over (about a second after the death).
    let mut kept = vec![in_flight];
    let wait_for_syncer = |kept: &mut Vec<u32>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.syncer().is_none() {
            assert!(Instant::now() < deadline, "no syncer came back:\n{}", c.log());
            let t = c.deploy(1, &archive);
            match kept.len() < 4 {
                true => kept.push(t),
                false => assert!(c.retrieve(t).0, "ticket {t}"),
            }
        }
    };
    wait_for_syncer(&mut kept);

    // A burst of 4 clients while every syncer that starts is killed, until
    // two have been (or a minute has passed).
    let (killed, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|k| {
                let (c, archive, killed) = (&c, &archive, &killed);
                s.spawn(move || {
                    let mut tickets = Vec::new();
                    let mut n = 0;
                    while n < 4 || (killed.load(Ordering::Relaxed) < 2 && Instant::now() < deadline) {
                        let t = c.deploy(1, archive);
                        // A few jobs are left for the restart below.
                        if (k + n) % 2 == 0 || tickets.len() >= 4 {
                            let (ok, outs) = c.retrieve(t);
                            assert!(ok && outs[0].1.contains("survived"), "ticket {t}: {outs:?}");
                        } else {
                            tickets.push(t);
                        }
                        n += 1;
                    }
                    tickets
                })
            })
            .collect();
        s.spawn(|| {
            let mut seen = Vec::new();
            while done.load(Ordering::Relaxed) == 0 {
                if let Some(p) = c.syncer().filter(|p| !seen.contains(p)) {
                    signal(p, Signal::SIGKILL);
                    seen.push(p);
                    killed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // Every client joined before the killer is told to stop, even one
        // that panicked (its panic follows).
        let results: Vec<_> = clients.into_iter().map(|client| client.join()).collect();
        done.store(1, Ordering::Relaxed);
        for r in results {
            kept.extend(r.unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
    });
    assert!(killed.load(Ordering::Relaxed) >= 2, "syncers killed during the burst: {killed:?}");
    wait_for_syncer(&mut kept);

    // Every answered ticket is in the journal: a crash keeps them all.
    c.restart(Signal::SIGKILL);
    for t in kept {
        let out = c.cloud(&["status", &t.to_string()]);
        assert!(out.status.success(), "ticket {t} lost: {}", String::from_utf8_lossy(&out.stderr));
        let (ok, outs) = c.retrieve(t);
        assert!(outs.len() == 1, "ticket {t}: {ok} {outs:?}");
    }
}

#[test]
fn a_clean_stop_answers_the_deploy_whose_sync_was_in_flight_and_its_job_runs_after_the_restart() {
    let mut c = Cluster::start_on_disk(1);
    let d = c.dir.path().to_path_buf();
    let archive = job(&d, "a.tar.gz", &["@echo answered at the stop"]);
    let first = c.deploy(1, &archive);
    assert!(c.retrieve(first).0);
    wait_until("the syncer runs", || c.syncer().is_some());
    let syncer = c.syncer().unwrap_or_default();
    let deploy = deploy_against_a_stopped_syncer(&c, &archive, syncer);
    // SIGTERM: the server syncs the journal itself and answers before it ends.
    c.restart(Signal::SIGTERM);
    let t = ticket_of(deploy);
    assert!(t > first);
    // Its job is in the journal: it ran before the stop (or was stopped
    // with the server, which the restart reports).
    let st = c.wait_status(t, |s| s["status"] == "COMPLETED" || s["status"] == "INVALID");
    if st["status"] == "COMPLETED" {
        let (ok, outs) = c.retrieve(t);
        assert!(ok && outs[0].1.contains("answered at the stop"), "{outs:?}\n{}", c.log());
    } else {
        assert!(st.to_string().contains("server restarted"), "{st}");
    }
}
