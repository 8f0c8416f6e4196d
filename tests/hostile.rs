//! Hostile archives and hostile jobs: each fails on its own replica with a
//! clear message, the workspace boundary holds, jobs beside it finish
//! normally, and nothing is left behind (processes, zombies, fds, files).
//! Tests that need root (slot uids, RLIMIT_NPROC, network namespaces) say
//! so when skipped; CI runs as root.

mod common;

use std::path::{Path, PathBuf};

use common::tarkit;
use common::*;

const LIMITS: &[&str] = &[
    "--time-limit",
    "3",
    "--kill-grace",
    "1",
    "--max-output",
    "64K",
    "--max-file-size",
    "1M",
    "--max-memory",
    "64M",
    "--max-procs",
    "64",
    "--max-extract",
    "1M",
    "--max-entries",
    "100",
    "--max-path",
    "200",
];

/// Processes (other than the test's) whose real uid is in [lo, hi).
fn processes_with_uid(lo: u32, hi: u32) -> Vec<u32> {
    processes().into_iter().filter(|p| p.uid >= lo && p.uid < hi).map(|p| p.pid).collect()
}

fn slot_range(c: &Cluster) -> (u32, u32) {
    let base = 1_000_000 + u32::from(c.ports[0]) * 64;
    (base, base + c.ports.len() as u32)
}

/// Wait for a job to end; return its replica 0 status object.
fn finished(c: &Cluster, t: u32) -> serde_json::Value {
    let st = c.wait_status(t, |s| s["status"] == "COMPLETED" || s["status"] == "INVALID");
    st["replicas"][0].clone()
}

/// A raw entry; `kind` is the ustar type flag ('0' file, '1' link, ...).
fn raw_tar_entry(name: &str, kind: u8, mode: u32, data: &[u8], link: &str) -> Vec<u8> {
    tarkit::entry(name, tar::EntryType::new(kind), mode, data, link)
}

/// A tar.gz: a working Makefile plus the hostile entries, then the end marker.
fn hostile_archive(dir: &Path, name: &str, entries: &[Vec<u8>]) -> PathBuf {
    let mk = b"run:\n\t@echo this should not run\n";
    let mut all = vec![raw_tar_entry("Makefile", b'0', 0o644, mk, "")];
    all.extend_from_slice(entries);
    let path = dir.join(name);
    std::fs::write(&path, tarkit::tar_gz(&all)).unwrap();
    path
}

#[test]
fn hostile_archives_are_refused_with_clear_messages_and_nothing_escapes() {
    let c = Cluster::start_with(4, LIMITS);
    let d = c.dir.path();
    let canary = format!("cloud-canary-{}", c.ports[0]);
    let mut cases: Vec<(PathBuf, &str)> = vec![
        (
            hostile_archive(
                d,
                "traversal.tar.gz",
                &[raw_tar_entry(&format!("../../../../{canary}"), b'0', 0o644, b"x", "")],
            ),
            "'..'",
        ),
        (
            hostile_archive(d, "abs.tar.gz", &[raw_tar_entry(&format!("/tmp/{canary}"), b'0', 0o644, b"x", "")]),
            "absolute",
        ),
        (hostile_archive(d, "symlink.tar.gz", &[raw_tar_entry("evil", b'2', 0o777, b"", "/etc")]), "symbolic link"),
        (hostile_archive(d, "hardlink.tar.gz", &[raw_tar_entry("hard", b'1', 0o644, b"", "/etc/passwd")]), "hard link"),
        (hostile_archive(d, "device.tar.gz", &[raw_tar_entry("dev", b'3', 0o644, b"", "")]), "character device"),
        (hostile_archive(d, "fifo.tar.gz", &[raw_tar_entry("fifo", b'6', 0o644, b"", "")]), "FIFO"),
        (hostile_archive(d, "deep.tar.gz", &[raw_tar_entry(&"d/".repeat(49).to_string(), b'5', 0o755, b"", "")]), "ok"),
    ];
    // Deeply nested paths beyond --max-path (200) need a GNU long name.
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h, "n/".repeat(150) + "f", &b"x"[..]).unwrap();
    let deep = d.join("toodeep.tar.gz");
    std::fs::write(&deep, tarkit::gz(&t.into_inner().unwrap())).unwrap();
    cases.push((deep, "longer than the limit"));
    // Gzip bomb: 8 MiB of zeros compress to a few KiB; --max-extract is 1M.
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(8 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h, "bomb", std::io::repeat(0).take_bytes(8 << 20)).unwrap();
    let bomb = d.join("bomb.tar.gz");
    std::fs::write(&bomb, tarkit::gz(&t.into_inner().unwrap())).unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 64 * 1024);
    cases.push((bomb, "extraction limit"));
    // A tar header that declares a huge size.
    let mut huge = raw_tar_entry("huge", b'0', 0o644, b"", "");
    let size = format!("{:011o}\0", 1u64 << 32);
    huge[124..136].copy_from_slice(size.as_bytes());
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&huge[..512]);
    h.set_cksum();
    huge[..512].copy_from_slice(h.as_bytes());
    cases.push((hostile_archive(d, "hugedecl.tar.gz", &[huge]), "extraction limit"));
    let not_gzip = d.join("notgzip.tar.gz");
    std::fs::write(&not_gzip, b"PK\x03\x04 definitely a zip file").unwrap();
    cases.push((not_gzip, "not a gzip"));
    let good = std::fs::read(job(d, "tmp.tar.gz", &["echo fine"])).unwrap();
    let trunc = d.join("truncated.tar.gz");
    std::fs::write(&trunc, &good[..good.len() / 2]).unwrap();
    cases.push((trunc, "truncated"));
    let empty = d.join("empty.tar.gz");
    std::fs::write(&empty, b"").unwrap();
    cases.push((empty, "empty"));

    // A normal job beside every hostile one. Hostile archives are refused
    // at DEPLOY (no ticket) with the reason in one line.
    let normal = job(d, "normal.tar.gz", &["@echo normal job fine"]);
    let mut tickets = Vec::new();
    for (path, why) in &cases {
        if *why == "ok" {
            tickets.push((c.deploy(1, path), *why, path.clone()));
        } else {
            let out = c.cloud(&["deploy", "1", path.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && out.stdout.is_empty(), "{}: {err}", path.display());
            assert!(
                err.starts_with("deploy: bad archive") && err.contains(why),
                "{}: {err:?} should say {why:?}",
                path.display()
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        tickets.push((c.deploy(1, &normal), "normal", normal.clone()));
    }
    for (t, why, path) in tickets {
        let r = finished(&c, t);
        let msg = r["message"].as_str().unwrap().to_string();
        assert_eq!(r["status"], "COMPLETED", "{}: {msg}", path.display());
        let (ok, outs) = c.retrieve(t);
        assert!(ok);
        if why == "normal" {
            assert_eq!(outs[0].1, "normal job fine\n");
        }
    }
    // Nothing was written outside a workspace.
    assert!(!Path::new(&format!("/tmp/{canary}")).exists());
    for dir in [c.dir.path().to_path_buf(), c.work(), PathBuf::from("/")] {
        assert!(!dir.join(&canary).exists(), "{}", dir.display());
    }
    // Closed tickets leave no files in node workspaces.
    // Nodes drop a ticket's folder just after CLOSE is answered.
    wait_until("node workspaces are empty", || node_leftovers(&c).is_empty());
}

#[test]
fn setuid_bits_are_dropped() {
    let c = Cluster::start_with(1, LIMITS);
    let mk = b"run:\n\t@stat -c %a tool\n";
    let tar = tarkit::tar_gz(&[
        raw_tar_entry("Makefile", b'0', 0o644, mk, ""),
        raw_tar_entry("tool", b'0', 0o6755, b"#!/bin/sh\n", ""),
    ]);
    let path = c.dir.path().join("suid.tar.gz");
    std::fs::write(&path, tar).unwrap();
    let t = c.deploy(1, &path);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    assert_eq!(outs[0].1.trim(), "755");
}

#[test]
fn hostile_jobs_fail_alone_and_leave_nothing_behind() {
    if !need_root("hostile_jobs_fail_alone_and_leave_nothing_behind") {
        return;
    }
    let c = Cluster::start_with(4, LIMITS);
    let d = c.dir.path();
    let fds_before = c.fd_count();
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        ("loop", vec!["while :; do :; done".into()], "INVALID", "time limit of 3s exceeded"),
        (
            "ignore-term",
            vec!["trap '' TERM; exec bash -c \"trap '' TERM; while :; do :; done\"".into()],
            "INVALID",
            "time limit",
        ),
        ("forkbomb", vec!["bomb() { bomb | bomb & }; bomb; sleep 1000".into()], "INVALID", "time limit"),
        ("memory", vec!["a=x; while :; do a=$$a$$a; done".into()], "INVALID", "make run exited"),
        ("flood", vec!["@head -c 1000000 /dev/zero | tr '\\0' a".into()], "COMPLETED", ""),
        (
            "disk",
            vec!["@dd if=/dev/zero of=big bs=64k count=100 2>/dev/null || true; stat -c 'size %s' big".into()],
            "COMPLETED",
            "",
        ),
        (
            "daemon",
            vec!["setsid bash -c 'sleep 1000 & disown' < /dev/null > /dev/null 2>&1; echo daemon left".into()],
            "COMPLETED",
            "",
        ),
        ("closed-stdout", vec!["exec >&- 2>&-; sleep 1000".into()], "INVALID", "time limit"),
        ("crash", vec!["kill -SEGV $$$$".into()], "INVALID", "make run exited"),
    ];
    let normal = job(d, "normal.tar.gz", &["@echo normal job fine"]);
    let mut tickets = Vec::new();
    for (name, recipe, _, _) in &cases {
        let a = job(d, &format!("{name}.tar.gz"), recipe);
        tickets.push(c.deploy(1, &a));
        tickets.push(c.deploy(1, &normal));
    }
    for (i, (name, _, state, msg)) in cases.iter().enumerate() {
        let r = finished(&c, tickets[2 * i]);
        assert_eq!(r["status"], *state, "{name}: {r}");
        assert!(r["message"].as_str().unwrap().contains(msg), "{name}: {r}");
        let (_, outs) = c.retrieve(tickets[2 * i]);
        let out = &outs[0].1;
        match *name {
            "flood" => {
                assert!(out.len() <= 64 * 1024 + 200, "flood output is capped: {} bytes", out.len());
                assert!(out.contains("output truncated at 65536 bytes"), "marker line");
            }
            "disk" => assert!(out.contains("size 1048576"), "file size capped at 1M: {out}"),
            "ignore-term" => assert!(r["message"].as_str().unwrap().contains("SIG"), "{r}"),
            _ => {}
        }
        let n = finished(&c, tickets[2 * i + 1]);
        assert_eq!(n["status"], "COMPLETED", "normal job beside {name}");
        let (ok, outs) = c.retrieve(tickets[2 * i + 1]);
        assert!(ok && outs[0].1 == "normal job fine\n");
    }
    c.wait_no_children();
    let (lo, hi) = slot_range(&c);
    assert!(processes_with_uid(lo, hi).is_empty(), "replica processes remain: {:?}", processes_with_uid(lo, hi));
    // The last client's connection closes asynchronously; a leak never would.
    wait_until("the server's fd count is back to its start", || c.fd_count() == fds_before);
}

#[test]
fn jobs_cannot_reach_the_cluster_or_other_tenants() {
    if !need_root("jobs_cannot_reach_the_cluster_or_other_tenants") {
        return;
    }
    let c = Cluster::start_with(2, &["--time-limit", "60"]);
    let d = c.dir.path();
    // Tenant A on node 0: writes a secret, then idles until closed.
    let a = job(d, "a.tar.gz", &["@echo s3cret > secret.txt; chmod 644 secret.txt; sleep 1000"]);
    let ta = c.deploy(1, &a);
    // A's workspace is a tmpfs in A's own mount namespace: seen from the
    // host only through one of A's processes.
    let secret = c.work().join(format!("output_{}/{ta}/work/secret.txt", c.ports[0]));
    let (lo, _) = slot_range(&c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let victim = loop {
        let found = processes_with_uid(lo, lo + 1)
            .into_iter()
            .find(|p| Path::new(&format!("/proc/{p}/cwd/secret.txt")).exists());
        if let Some(p) = found {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "tenant A never wrote its secret");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Tenant B on node 1: tries to read A's files, signal A, and reach the
    // main server and a node over the network.
    let recipe = [
        format!("@-cat {} /proc/{victim}/cwd/secret.txt", secret.display()),
        format!("@-ls {}", secret.parent().unwrap().display()),
        format!("@-kill -9 {victim} && echo signalled A"),
        format!("@-exec 3<>/dev/tcp/127.0.0.1/{} && echo reached main server", c.addr.port()),
        format!("@-exec 3<>/dev/tcp/127.0.0.1/{} && echo reached a node", c.ports[0]),
        "@echo done".into(),
    ];
    let b = job(d, "b.tar.gz", &recipe);
    let tb = c.deploy(1, &b);
    let (_, outs) = c.retrieve(tb);
    let out = &outs[0].1;
    assert!(!out.contains("s3cret"), "B read A's secret: {out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(!out.contains("signalled A"), "B could signal A: {out}");
    assert!(!out.contains("reached"), "B reached the cluster: {out}");
    assert!(out.contains("done"));
    assert_eq!(c.status_json(ta)["status"], "RUNNING", "A survived B");
    let close = c.cloud(&["retrieve", &ta.to_string()]);
    assert!(close.status.success());
    c.wait_no_children();
    assert!(processes_with_uid(lo, lo + 2).is_empty());
}

#[test]
fn the_environment_is_clean_and_fds_are_not_inherited() {
    let c = Cluster::start(1);
    let a = job(
        c.dir.path(),
        "env.tar.gz",
        &[
            "@env | sort | grep -v '^MAKE\\|^MFLAGS\\|^SHLVL\\|^_=\\|^PWD\\|^OLDPWD'",
            "@ls /proc/self/fd | sort -n | tr '\\n' ' '",
        ],
    );
    let t = c.deploy(1, &a);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    let out = &outs[0].1;
    let names: Vec<&str> = out.lines().filter_map(|l| l.split_once('=').map(|x| x.0)).collect();
    for n in &names {
        assert!(
            ["PATH", "HOME", "LANG", "CLOUD_TICKET", "CLOUD_REPLICA", "CLOUD_REPLICAS", "CLOUD_NODE_PORT"].contains(n),
            "unexpected variable {n} in {out}"
        );
    }
    assert!(names.contains(&"CLOUD_TICKET") && names.contains(&"HOME"));
    // ls itself opens one directory fd (3); nothing else beyond 0, 1, 2.
    let fds = out.lines().last().unwrap().trim();
    assert_eq!(fds, "0 1 2 3", "{out}");
}

#[test]
fn hundreds_of_mixed_jobs_leak_nothing() {
    let c = Cluster::start_with(4, &["--time-limit", "1", "--kill-grace", "1"]);
    let d = c.dir.path();
    let fds_before = c.fd_count();
    let ok = job(d, "ok.tar.gz", &["@echo ok"]);
    let fail = job(d, "fail.tar.gz", &["@exit 3"]);
    let crash = job(d, "crash.tar.gz", &["@kill -KILL $$$$"]);
    let slow = job(d, "slow.tar.gz", &["@sleep 30"]);
    let bad = d.join("bad.tar.gz");
    // Past the client's magic check; the server refuses it as it arrives.
    std::fs::write(&bad, b"\x1f\x8b not an archive").unwrap();
    let mut tickets = Vec::new();
    for i in 0..200 {
        let (a, close_early) = match i % 10 {
            0 => (&slow, false),
            1 => (&slow, true),
            2 => (&fail, false),
            3 => (&crash, false),
            4 => (&bad, false),
            _ => (&ok, false),
        };
        if i % 10 == 4 {
            let out = c.cloud(&["deploy", "1", a.to_str().unwrap()]);
            assert!(!out.status.success(), "a bad archive got a ticket");
            continue;
        }
        let t = c.deploy(1, a);
        if close_early {
            assert!(c.cloud(&["retrieve", &t.to_string()]).status.success());
        } else {
            tickets.push((t, i % 10));
        }
        // Keep the queue bounded: collect the oldest now and then.
        if tickets.len() > 16 {
            let (t, kind) = tickets.remove(0);
            let (okay, _) = c.retrieve(t);
            assert_eq!(okay, kind >= 5, "ticket {t} kind {kind}");
        }
    }
    for (t, kind) in tickets {
        let (okay, _) = c.retrieve(t);
        assert_eq!(okay, kind >= 5, "ticket {t} kind {kind}");
    }
    c.wait_no_children();
    // The last client's connection closes asynchronously; a leak never would.
    wait_until("the server's fd count is back to its start", || c.fd_count() == fds_before);
    // Nodes drop a ticket's folder just after CLOSE is answered.
    wait_until("node workspaces are empty", || node_leftovers(&c).is_empty());
    let spool = spool_data(&c);
    assert!(spool.is_empty(), "spool kept {spool:?}");
    if is_root() {
        let (lo, hi) = slot_range(&c);
        assert!(processes_with_uid(lo, hi).is_empty());
    }
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}

#[test]
fn run_as_user_and_slot_uids_decide_who_a_replica_is() {
    if !need_root("run_as_user_and_slot_uids_decide_who_a_replica_is") {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
    let c = Cluster::start_with(2, &["--no-slot-uids", "--run-as", "nobody"]);
    assert!(c.log().contains("replicas run as nobody"), "{}", c.log());
    let a = job(c.dir.path(), "id.tar.gz", &["@id -u; ls -ld . | cut -d' ' -f1,3"]);
    let t = c.deploy(2, &a);
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    for (_, out) in &outs {
        assert!(out.starts_with(&format!("{}\n", nobody.uid)), "{out}");
        assert!(out.contains("drwx------ nobody"), "workspace is the user's, mode 0700: {out}");
    }
    // With slot uids (the default), each node has a uid of its own.
    let c = Cluster::start(2);
    let (lo, _) = slot_range(&c);
    let t = c.deploy(2, &job(c.dir.path(), "id.tar.gz", &["@id -u"]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    let mut uids: Vec<u32> = outs.iter().map(|(_, o)| o.trim().parse().unwrap()).collect();
    uids.sort();
    assert_eq!(uids, vec![lo, lo + 1]);
}

/// `--max-procs N` is N processes of the job's own: make, perl and what
/// perl forks, not counting the replica's init or the slot's launcher
/// (which share its cgroup, and init its uid).
#[test]
fn max_procs_counts_the_jobs_own_processes() {
    let c = Cluster::start_with(1, &["--max-procs", "10"]);
    let script = "my $n = 0;\nfor (1..100) { my $p = fork(); last unless defined $p; if ($p == 0) { sleep 60; exit 0 } $n++ }\nprint \"held $n\\n\";\nkill 'KILL', -$$;\n";
    let archive =
        common::archive(c.dir.path(), "procs.tar.gz", &[("Makefile", "run:\n\t@perl many.pl\n"), ("many.pl", script)]);
    let t = c.deploy(1, &archive);
    finished(&c, t);
    let (_, outs) = c.retrieve(t);
    let held: usize = outs[0]
        .1
        .lines()
        .find_map(|l| l.strip_prefix("held "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", outs[0].1));
    assert_eq!(held, 8, "make + perl + 8 = 10: {}", outs[0].1);
}

/// The job's own limits are the job's: a small `--max-open-files` or
/// `--max-memory` still leaves its archive (a 2 MB file too) unpacked
/// and `make run` run, whatever init had open or mapped while it unpacked.
#[test]
fn tight_open_file_and_memory_limits_still_unpack_and_run_the_job() {
    for args in [&["--max-open-files", "6"][..], &["--max-memory", "8M"]] {
        let c = Cluster::start_with(1, args);
        let d = c.dir.path();
        let data = d.join("data");
        std::fs::create_dir(&data).unwrap();
        let noise: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(data.join("big"), noise).unwrap();
        // (No shell redirection: dash saves descriptors at 10 and up.)
        std::fs::write(data.join("Makefile"), "run:\n\t@wc -c big\n").unwrap();
        let archive = d.join("big.tar.gz");
        let packed = std::process::Command::new("tar")
            .arg("czf")
            .arg(&archive)
            .arg("-C")
            .arg(&data)
            .args(["Makefile", "big"])
            .status();
        assert!(packed.unwrap().success());
        let t = c.deploy(1, &archive);
        let r = finished(&c, t);
        assert_eq!(r["status"], "COMPLETED", "{args:?}: {r}");
        let (_, outs) = c.retrieve(t);
        assert_eq!(outs[0].1.trim(), "2000000 big", "{args:?}");
    }
}

#[test]
fn cpu_time_is_limited() {
    let c = Cluster::start_with(1, &["--max-cpu", "1", "--time-limit", "60"]);
    let t = c.deploy(1, &job(c.dir.path(), "spin.tar.gz", &["@while :; do :; done"]));
    let r = finished(&c, t);
    assert_eq!(r["status"], "INVALID", "{r}");
    let (_, outs) = c.retrieve(t);
    assert!(outs[0].1.contains("CPU time limit exceeded"), "{}", outs[0].1);
    // The server's log names the outcome as the client does.
    let line = format!("ticket {t}: replica 0 on 127.0.0.1:{} FAILED: make run exited", c.ports[0]);
    assert!(c.log().contains(&line), "no {line:?} in:\n{}", c.log());
}

/// Processes whose environment carries this node port (replicas and
/// anything they started).
fn tagged_with_port(port: u16) -> Vec<u32> {
    let tag = format!("CLOUD_NODE_PORT={port}");
    processes()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == tag.as_bytes()))
        })
        .map(|p| p.pid)
        .collect()
}

#[test]
fn without_slot_uids_escaped_daemons_are_still_killed() {
    // As root this runs replicas as nobody, shared by all nodes; as another
    // user, in a user namespace. Either way the daemon is in the replica's
    // pid namespace, which the kernel empties when the replica ends.
    let c = Cluster::start_with(1, &["--no-slot-uids", "--run-as", "nobody"]);
    let daemon = "setsid bash -c 'sleep 1000 & disown' < /dev/null > /dev/null 2>&1; echo daemon left";
    let t = c.deploy(1, &job(c.dir.path(), "d.tar.gz", &[format!("@{daemon}")]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1.contains("daemon left"), "{outs:?}");
    wait_until("the escaped daemon is gone", || tagged_with_port(c.ports[0]).is_empty());
    c.wait_no_children();
}
