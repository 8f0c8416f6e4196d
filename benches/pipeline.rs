//! `make bench`: 200 tiny jobs through the cluster (deploy -> retrieve, 4
//! concurrent clients, 4 nodes) against the pipeline a user would script
//! instead (`xargs -P4` of mkdir; tar xzf; make run > out), side by side in
//! one run; then the server's peak RSS and its system calls per job; then
//! the STATUS round trip alone and with 10,000 idle connections held.
//! Figures are printed, not asserted: machines are noisy, ratios travel.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const SERVER: &str = env!("CARGO_BIN_EXE_cloud-server");
const CLIENT: &str = env!("CARGO_BIN_EXE_cloud");
const JOBS: usize = 200;
const CLIENTS: usize = 4;
const STRACED_JOBS: usize = 40;
const IDLE_CONNECTIONS: usize = 10_000;
const STATUS_CALLS: usize = 200;

fn tiny_archive(dir: &Path) -> PathBuf {
    let src = dir.join("tiny");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("Makefile"), "run:\n\t@echo tiny job $$CLOUD_REPLICA\n").unwrap();
    let path = dir.join("tiny.tar.gz");
    let ok = Command::new("tar").arg("czf").arg(&path).arg("-C").arg(&src).arg(".").status().unwrap();
    assert!(ok.success());
    path
}

fn start_server(dir: &Path) -> (Child, String) {
    let ls: Vec<TcpListener> = (0..4).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let mut text = "4\n".to_string();
    for l in &ls {
        text.push_str(&format!("{}\n", l.local_addr().unwrap().port()));
    }
    // Slot uids of our own, from the first port (as the tests' `Cluster`
    // does): the default base may belong to a server already running here.
    let slot_base = (1_000_000 + u32::from(ls[0].local_addr().unwrap().port()) * 64).to_string();
    drop(ls);
    std::fs::write(dir.join("nodes.txt"), text).unwrap();
    let mut child = Command::new(SERVER)
        .args(["--slot-uids", &slot_base])
        .arg("--nodes")
        .arg(dir.join("nodes.txt"))
        .args(["--listen", "127.0.0.1:0", "--work-dir"])
        .arg(dir.join("work"))
        .args(["--max-connections", &(2 * IDLE_CONNECTIONS).to_string()])
        .args(std::env::var("CLOUD_BENCH_ARGS").unwrap_or_default().split_whitespace())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).expect("ready line").to_string();
    eprintln!("{}", line.trim());
    (child, addr)
}

/// 4 client threads, each deploying and retrieving its share of the jobs.
fn run_cluster(addr: &str, archive: &Path, dir: &Path, jobs: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            s.spawn(move || {
                for j in (c..jobs).step_by(CLIENTS) {
                    let out = Command::new(CLIENT)
                        .args(["deploy", "1"])
                        .arg(archive)
                        .args(["--server", addr])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    let ticket = stdout.trim().trim_start_matches("Job ticket#: ").to_string();
                    let outdir = dir.join(format!("out{j}"));
                    let ok = Command::new(CLIENT)
                        .args(["retrieve", &ticket])
                        .arg(&outdir)
                        .args(["--server", addr])
                        .stdout(Stdio::null())
                        .status()
                        .unwrap();
                    assert!(ok.success());
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
}

fn run_direct(archive: &Path, dir: &Path) -> f64 {
    let base = dir.join("direct");
    std::fs::create_dir_all(&base).unwrap();
    let script = format!(
        "seq {JOBS} | xargs -P{CLIENTS} -I{{}} sh -c 'mkdir {b}/d{{}} && tar xzf {a} -C {b}/d{{}} && make -s -C {b}/d{{}} run > {b}/d{{}}/out 2>&1'",
        b = base.display(),
        a = archive.display()
    );
    let start = Instant::now();
    assert!(Command::new("sh").arg("-c").arg(&script).status().unwrap().success());
    start.elapsed().as_secs_f64()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// System calls per job counted by strace: of the server process alone
/// (`follow` false), or with everything it forks (`-f`: replica setup,
/// extraction, make and the job itself).
fn syscalls_per_job(pid: u32, addr: &str, archive: &Path, dir: &Path, follow: bool) -> Option<(f64, String)> {
    let jobs = STRACED_JOBS;
    let report = dir.join(format!("strace-{follow}.txt"));
    let mut strace = Command::new("strace")
        .args(if follow { &["-f", "-c", "-o"][..] } else { &["-c", "-o"][..] })
        .arg(&report)
        .args(["-p", &pid.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    // strace prints "Process N attached" once it is tracing (and again for
    // every child with -f): wait for the first, then keep draining.
    let mut lines = BufReader::new(strace.stderr.take()?);
    let mut line = String::new();
    lines.read_line(&mut line).ok()?;
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    run_cluster(addr, archive, &dir.join(format!("strace-run-{follow}")), jobs);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(strace.id() as i32), nix::sys::signal::Signal::SIGINT).ok()?;
    strace.wait().ok()?;
    let text = std::fs::read_to_string(&report).ok()?;
    let total: f64 = text.lines().find(|l| l.trim_end().ends_with("total"))?.split_whitespace().nth(3)?.parse().ok()?;
    let top: Vec<String> = text
        .lines()
        .skip(2)
        .filter(|l| !l.starts_with('-') && !l.contains("total"))
        .take(6)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{} {}", f.last()?, f.get(3)?))
        })
        .collect();
    Some((total / jobs as f64, top.join(", ")))
}

/// STATUS round trips on one connection while `idle` other connections are
/// held open: (median ms, worst ms, connections actually held).
fn status_round_trip(addr: &str, idle: usize) -> (f64, f64, usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let held: Vec<TcpStream> = (0..idle).map_while(|_| TcpStream::connect(addr).ok()).collect();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut w = cloudinfra::rpc::call(1, cloudinfra::proto::CLOUD_PROG, 1, cloudinfra::proto::STATUS);
    w.u32(999_999);
    let call = cloudinfra::record::frame(&w.into_bytes());
    let mut times = Vec::with_capacity(STATUS_CALLS);
    let mut buf = vec![0u8; 4096];
    for _ in 0..STATUS_CALLS {
        let t = Instant::now();
        s.write_all(&call).unwrap();
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).unwrap();
        let len = (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize;
        s.read_exact(&mut buf[..len]).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[times.len() - 1], held.len())
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let archive = tiny_archive(dir.path());
    let (mut server, addr) = start_server(dir.path());
    // Warm up (page cache, first fork) before timing.
    run_cluster(&addr, &archive, &dir.path().join("warm"), 8);
    let cluster = run_cluster(&addr, &archive, &dir.path().join("timed"), JOBS);
    let direct = run_direct(&archive, dir.path());
    let rss = vm_hwm_kib(server.id());
    let sys = syscalls_per_job(server.id(), &addr, &archive, dir.path(), false);
    let sys_all = syscalls_per_job(server.id(), &addr, &archive, dir.path(), true);
    let alone = status_round_trip(&addr, 0);
    let crowded = status_round_trip(&addr, IDLE_CONNECTIONS);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = server.wait();

    let (cj, dj) = (JOBS as f64 / cluster, JOBS as f64 / direct);
    println!("{JOBS} tiny jobs, {CLIENTS} concurrent clients, 4 nodes");
    println!("  cloudinfra deploy->retrieve : {cj:8.1} jobs/s ({cluster:.2} s)");
    println!("  xargs -P4 tar+make          : {dj:8.1} jobs/s ({direct:.2} s)");
    println!("  ratio cloudinfra / direct   : {:8.2}", cj / dj);
    println!("  server peak RSS (VmHWM)     : {rss} KiB");
    for (what, counted) in [("server syscalls per job      ", sys), ("  ... with its children (-f)", sys_all)] {
        match counted {
            Some((per_job, top)) => {
                println!("  {what}: {per_job:.0}  (most time, calls in {STRACED_JOBS} jobs: {top})")
            }
            None => println!("  {what}: strace unavailable (apt-get install strace)"),
        }
    }
    println!("  STATUS round trip alone     : {:6.3} ms median, {:6.3} ms worst of {STATUS_CALLS}", alone.0, alone.1);
    println!("  ... with {} idle connections: {:6.3} ms median, {:6.3} ms worst", crowded.2, crowded.0, crowded.1);
}
