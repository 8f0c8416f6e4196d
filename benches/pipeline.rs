//! `make bench`: what a user measures, side by side with what they would
//! script instead, in one run (docs/PERFORMANCE.md reads the results).
//!
//! Every cluster figure uses the real client programs as separate
//! processes (`cloud deploy`, then `cloud retrieve`), as a user runs them:
//! - 200 echo jobs, 4 at a time, 4 nodes, against `xargs -P4` of
//!   `mkdir; tar xzf; make run` (jobs/s, and CPU per job);
//! - one echo job alone, deploy -> retrieve, against the direct run;
//! - a compile job (a one-file C program) alone, against the direct run;
//! - a 1 GiB archive of incompressible data, client -> main -> node,
//!   against a raw loopback TCP stream of the same bytes: to in-process
//!   nodes (until the DEPLOY is answered: their replica reads the spooled
//!   archive in place), and through a `cloud-server node` process (until
//!   that node holds the whole archive); each also on to the retrieve
//!   (printed), with the peak RSS (VmHWM, reset before the transfer); the
//!   node process figure beside a bare splice relay in the same rounds
//!   (printed: the cheapest any path through a middle process can be;
//!   both its hops use what our programs give loopback connections,
//!   `congestion.rs`) and beside a raw stream using that too (printed);
//! - 10,000 idle connections: the server's RSS and the STATUS round trip;
//! - an idle server: no wake-ups (so no system calls) for 3 seconds;
//! - the client program's start-up CPU, and a call (`cloud status`:
//!   connect, one round trip, exit), against a small C program's start-up.
//!
//! Rounds alternate (ours, reference, ours, ...) and each figure is the
//! median of at least 3, after untimed warm-up rounds of both (for the
//! 1 GiB transfer one whole round: a server's first large upload makes
//! its spool's large file, written over by later ones). Each is measured on the configured work dir
//! (`CLOUD_BENCH_WORKDIR`, default under target/bench: the disk's file
//! system, ext4 on our machines) and on a tmpfs (`CLOUD_BENCH_TMPFS`,
//! default /dev/shm; `none` skips it): the server's work dir, the client's
//! output dirs and the reference's dirs all live there.
//!
//! Output: a table (figure, ours, reference, ratio, target, pass) on
//! stdout, target/bench/results.json and target/bench/ratios.svg.
//! Figures are printed, not asserted: the exit status is 0 even when a
//! target is missed.
//!
//! Environment:
//! - `CLOUD_BENCH_QUICK=1`: skip the 1 GiB transfer;
//! - `CLOUD_BENCH_ONLY=big,burst`: only those figures (burst, single,
//!   compile, big, idle);
//! - `CLOUD_BENCH_ROUNDS=N`: rounds per figure (default 3, at least 3;
//!   the burst gets two more, the compile job two more);
//! - `CLOUD_BENCH_ARGS`: more cloud-server options;
//! - `CLOUD_BENCH_PROFILE=1`: also count system calls per job (`strace -c`
//!   of the server alone and with `-f`) and `perf record -g` the server
//!   during a burst (target/bench/perf.data; with inferno installed,
//!   target/bench/flame.svg and perf.folded).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SERVER: &str = env!("CARGO_BIN_EXE_cloud-server");

/// The client program measured: the one `make` links into client/ (the
/// Makefile names it in CLOUD_BENCH_CLIENT: its musl build where Rust's
/// musl target is installed), else this build's.
fn client() -> &'static str {
    static CLIENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| match std::env::var("CLOUD_BENCH_CLIENT") {
        Ok(path) if !path.is_empty() => path,
        _ => env!("CARGO_BIN_EXE_cloud").to_string(),
    })
}

const NODES: usize = 4;
const JOBS: usize = 200;
const CLIENTS: usize = 4;
const STRACED_JOBS: usize = 40;
const IDLE_CONNECTIONS: usize = 10_000;
const STATUS_CALLS: usize = 200;
const BIG_FILES: usize = 8;
const BIG_FILE_BYTES: u64 = 128 << 20;
const IDLE_WINDOW: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- results

/// Which way a ratio must go to pass.
#[derive(Clone, Copy)]
enum Target {
    /// ratio >= value
    AtLeast(f64),
    /// ratio (or the figure itself, when there is no reference) <= value
    AtMost(f64),
    /// printed only
    None,
}

struct Row {
    figure: String,
    fs: String,
    unit: &'static str,
    ours: Vec<f64>,
    reference: Vec<f64>,
    /// true: more is better (jobs/s, MB/s); the ratio is ours / reference.
    /// false: less is better (seconds); the ratio is ours / reference too,
    /// except where `speed_ratio` turns it into reference / ours.
    higher_is_better: bool,
    /// Report reference/ours for a time (so "0.95x direct" reads as speed).
    speed_ratio: bool,
    target: Target,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

impl Row {
    fn ours(&self) -> Option<f64> {
        median(&self.ours)
    }
    fn reference(&self) -> Option<f64> {
        median(&self.reference)
    }
    fn ratio(&self) -> Option<f64> {
        let (o, r) = (self.ours()?, self.reference()?);
        if o == 0.0 || r == 0.0 {
            return None;
        }
        Some(if self.speed_ratio { r / o } else { o / r })
    }
    /// What the target is compared with: the ratio, or the figure itself
    /// where there is no reference.
    fn judged(&self) -> Option<f64> {
        if self.reference.is_empty() {
            self.ours()
        } else {
            self.ratio()
        }
    }
    fn pass(&self) -> Option<bool> {
        let v = self.judged()?;
        match self.target {
            Target::AtLeast(t) => Some(v >= t),
            Target::AtMost(t) => Some(v <= t),
            Target::None => None,
        }
    }
    fn target_text(&self) -> String {
        let x = if self.reference.is_empty() { format!(" {}", self.unit) } else { "x".to_string() };
        match self.target {
            Target::AtLeast(t) => format!(">= {t}{x}"),
            Target::AtMost(t) => format!("<= {t}{x}"),
            Target::None => "-".to_string(),
        }
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v.abs() < 1e-9 => "0".to_string(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn print_table(rows: &[Row]) {
    let head = ["figure", "fs", "ours", "reference", "unit", "ratio", "target", "pass"];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.clone(),
                r.fs.clone(),
                fmt_num(r.ours()),
                fmt_num(r.reference()),
                r.unit.to_string(),
                r.ratio().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
                r.target_text(),
                match r.pass() {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i == 0 || i == 1 || i == 4 {
                s.push_str(&format!("{cell:<w$}  "));
            } else {
                s.push_str(&format!("{cell:>w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(&head.map(String::from));
    println!("{}", "-".repeat(width.iter().sum::<usize>() + 2 * (width.len() - 1)));
    for c in &cells {
        line(c);
    }
}

fn row_json(r: &Row) -> Value {
    let (op, value) = match r.target {
        Target::AtLeast(t) => ("ge", Some(t)),
        Target::AtMost(t) => ("le", Some(t)),
        Target::None => ("none", None),
    };
    json!({
        "figure": r.figure,
        "fs": r.fs,
        "unit": r.unit,
        "ours": r.ours(),
        "reference": r.reference(),
        "ratio": r.ratio(),
        "ratio_is": if r.reference.is_empty() { "none" } else if r.speed_ratio { "reference/ours" } else { "ours/reference" },
        "higher_is_better": r.higher_is_better,
        "target": { "op": op, "value": value, "applies_to": if r.reference.is_empty() { "ours" } else { "ratio" } },
        "pass": r.pass(),
        "ours_samples": r.ours,
        "reference_samples": r.reference,
    })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A bar per figure that has a target: the ratio (or the figure over its
/// limit) against the target, drawn as a black tick. Green passes.
fn svg_chart(rows: &[Row], title: &str) -> String {
    let bars: Vec<(&Row, f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            let v = r.judged()?;
            let t = match r.target {
                Target::AtLeast(t) | Target::AtMost(t) => t,
                Target::None => return None,
            };
            // Figures without a reference are drawn as figure / limit.
            if r.reference.is_empty() {
                if t == 0.0 {
                    Some((r, if v == 0.0 { 0.0 } else { 2.0 }, 1.0))
                } else {
                    Some((r, v / t, 1.0))
                }
            } else {
                Some((r, v, t))
            }
        })
        .collect();
    let (left, bar_w, row_h, top) = (360.0, 420.0, 26.0, 48.0);
    let scale_max = bars.iter().map(|b| b.1.max(b.2)).fold(1.5f64, f64::max).min(4.0) * 1.1;
    let height = top + row_h * bars.len() as f64 + 40.0;
    let width = left + bar_w + 150.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n\
         <text x=\"10\" y=\"36\" fill=\"#555\">bar: ratio ours/reference (or figure/limit where there is no reference); tick: target; green passes</text>\n",
        xml_escape(title)
    );
    for (i, (r, v, t)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let w = (v.min(scale_max) / scale_max * bar_w).max(1.0);
        let tx = left + t / scale_max * bar_w;
        let color = if r.pass() == Some(true) { "#3a9d4a" } else { "#d04040" };
        let label = format!("{} [{}]", r.figure, r.fs);
        let dir = match r.target {
            Target::AtLeast(_) => "&#8805;",
            _ => "&#8804;",
        };
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{left}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/>\n\
             <line x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"black\" stroke-width=\"2\"/>\n\
             <text x=\"{}\" y=\"{}\">{v:.2} (target {dir} {t})</text>\n",
            left - 8.0,
            y + 16.0,
            xml_escape(&label),
            y + 4.0,
            row_h - 8.0,
            y + 1.0,
            y + row_h - 1.0,
            left + bar_w + 8.0,
            y + 16.0,
        ));
    }
    let axis_y = top + row_h * bars.len() as f64 + 4.0;
    for k in 0..=((scale_max * 2.0) as usize) {
        let x = left + (k as f64 / 2.0) / scale_max * bar_w;
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{axis_y}\" stroke=\"#ddd\"/>\n<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>\n",
            top - 2.0,
            axis_y + 14.0,
            k as f64 / 2.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------- setup

fn target_dir() -> PathBuf {
    // target/release/cloud-server -> target
    Path::new(SERVER).parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("target"))
}

fn fs_name(p: &Path) -> String {
    match nix::sys::statfs::statfs(p) {
        Ok(s) => {
            let t = s.filesystem_type();
            if t == nix::sys::statfs::TMPFS_MAGIC {
                "tmpfs".into()
            } else if t == nix::sys::statfs::EXT4_SUPER_MAGIC {
                "ext4".into()
            } else if t == nix::sys::statfs::BTRFS_SUPER_MAGIC {
                "btrfs".into()
            } else if t == nix::sys::statfs::XFS_SUPER_MAGIC {
                "xfs".into()
            } else if t == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC {
                "overlay".into()
            } else {
                format!("fs 0x{:x}", t.0)
            }
        }
        Err(_) => "?".into(),
    }
}

fn make_archive(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let src = dir.join(name);
    std::fs::create_dir_all(&src).unwrap();
    for (f, text) in files {
        std::fs::write(src.join(f), text).unwrap();
    }
    let path = dir.join(format!("{name}.tar.gz"));
    let ok = Command::new("tar").arg("czf").arg(&path).arg("-C").arg(&src).arg(".").status().unwrap();
    assert!(ok.success());
    path
}

/// Incompressible bytes, fast (xorshift64*), so making 1 GiB takes a second.
struct Noise {
    state: u64,
    left: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len().min(self.left as usize)) & !7;
        let n = if n == 0 { buf.len().min(self.left as usize) } else { n };
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A .tar.gz of BIG_FILES files of incompressible data (1 GiB in all) and
/// a Makefile; gzip level 0, which is what deflate makes of such data anyway.
fn big_archive(dir: &Path) -> PathBuf {
    let path = dir.join("big.tar.gz");
    let file = std::fs::File::create(&path).unwrap();
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::with_capacity(1 << 20, file), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let makefile = b"run:\n\t@ls data* | wc -l\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(makefile.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "Makefile", &makefile[..]).unwrap();
    for i in 0..BIG_FILES {
        let mut h = tar::Header::new_gnu();
        h.set_size(BIG_FILE_BYTES);
        h.set_mode(0o644);
        h.set_cksum();
        let noise = Noise { state: 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1), left: BIG_FILE_BYTES };
        tar.append_data(&mut h, format!("data{i}"), noise).unwrap();
    }
    let gz = tar.into_inner().unwrap();
    let mut w = gz.finish().unwrap();
    w.flush().unwrap();
    path
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Room for the 1 GiB archive (it unpacks into the replica's tmpfs, which
/// counts against its memory).
const BIG_LIMITS: [&str; 8] = ["--max-archive", "2G", "--max-extract", "2G", "--max-disk", "2G", "--max-memory", "4G"];

/// Start `cloud-server` with `args`; returns once its ready line names the
/// address it listens on.
fn spawn_server(args: &[std::ffi::OsString]) -> Server {
    let mut child = Command::new(SERVER)
        .args(args)
        .args(BIG_LIMITS)
        .args(std::env::var("CLOUD_BENCH_ARGS").unwrap_or_default().split_whitespace())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut seen = String::new();
    let mut line = String::new();
    while addr.is_none() {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("cloud-server ended before its ready line:\n{seen}");
        }
        seen.push_str(&line);
        addr = line.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).map(str::to_string);
    }
    eprintln!("{}", line.trim());
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            eprintln!("  server: {l}");
        }
    });
    Server { child, addr: addr.unwrap().trim_end_matches([',', ';']).to_string() }
}

/// A `cloud-server node` process and a main server whose one node it is
/// (NODE_PROG over loopback TCP): (node, main).
fn start_remote_pair(base: &Path) -> (Server, Server) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let os = |s: &str| std::ffi::OsString::from(s);
    let node_uids = (1_000_000 + u32::from(port) * 64 + 32).to_string();
    let node = spawn_server(&[
        os("node"),
        os("--listen"),
        os(&format!("127.0.0.1:{port}")),
        os("--slot-uids"),
        os(&node_uids),
        os("--work-dir"),
        base.join("node-work").into_os_string(),
    ]);
    std::fs::write(base.join("remote-nodes.txt"), format!("1\n127.0.0.1:{port}\n")).unwrap();
    let main_uids = (1_000_000 + u32::from(port) * 64).to_string();
    let main = spawn_server(&[
        os("--slot-uids"),
        os(&main_uids),
        os("--nodes"),
        base.join("remote-nodes.txt").into_os_string(),
        os("--listen"),
        os("127.0.0.1:0"),
        os("--work-dir"),
        base.join("remote-work").into_os_string(),
    ]);
    (node, main)
}

/// The first file under `dir` (recursively) of at least `len` bytes.
fn holds_file_of(dir: &Path, len: u64) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| match e.file_type() {
        Ok(t) if t.is_dir() => holds_file_of(&e.path(), len),
        Ok(t) if t.is_file() => e.metadata().is_ok_and(|m| m.len() >= len),
        _ => false,
    })
}

/// Deploy `archive` through the remote pair, then retrieve it: (seconds
/// until the node's work dir holds the whole archive, seconds until the
/// retrieve is done).
fn remote_round(main: &Server, node_work: &Path, archive: &Path, outdir: &Path) -> (f64, f64) {
    let bytes = std::fs::metadata(archive).unwrap().len();
    // The last round's copy is removed in the background: gone first.
    let since = Instant::now();
    while holds_file_of(node_work, bytes) {
        assert!(since.elapsed() < Duration::from_secs(60), "the last archive is still on the node");
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    let watch = node_work.to_path_buf();
    let landed = std::thread::spawn(move || loop {
        if holds_file_of(&watch, bytes) {
            return start.elapsed().as_secs_f64();
        }
        if start.elapsed() > Duration::from_secs(600) {
            panic!("the node never held the whole archive");
        }
        std::thread::sleep(Duration::from_millis(1));
    });
    let ticket = deploy(&main.addr, archive);
    retrieve(&main.addr, &ticket, outdir);
    let total = start.elapsed().as_secs_f64();
    (landed.join().unwrap(), total)
}

fn start_server(base: &Path) -> Server {
    let ls: Vec<TcpListener> = (0..NODES).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let mut text = format!("{NODES}\n");
    for l in &ls {
        text.push_str(&format!("{}\n", l.local_addr().unwrap().port()));
    }
    // Slot uids of our own, from the first port (as the tests' `Cluster`
    // does): the default base may belong to a server already running here.
    let slot_base = (1_000_000 + u32::from(ls[0].local_addr().unwrap().port()) * 64).to_string();
    drop(ls);
    std::fs::write(base.join("nodes.txt"), text).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["--slot-uids".into(), slot_base.into(), "--nodes".into()];
    args.push(base.join("nodes.txt").into());
    args.extend(["--listen", "127.0.0.1:0", "--work-dir"].map(Into::into));
    args.push(base.join("work").into());
    args.extend(["--max-connections".into(), (2 * IDLE_CONNECTIONS).to_string().into()]);
    spawn_server(&args)
}

// ---------------------------------------------------------------- measures

fn deploy(addr: &str, archive: &Path) -> String {
    let out = Command::new(client()).args(["deploy", "1"]).arg(archive).args(["--server", addr]).output().unwrap();
    assert!(out.status.success(), "deploy: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.trim().trim_start_matches("Job ticket#: ").to_string()
}

fn retrieve(addr: &str, ticket: &str, outdir: &Path) {
    let out = Command::new(client())
        .args(["retrieve", ticket])
        .arg(outdir)
        .args(["--server", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "retrieve: {}", String::from_utf8_lossy(&out.stderr));
}

/// `jobs` jobs, CLIENTS threads each running deploy then retrieve (real
/// processes) for its share: seconds.
fn run_cluster(addr: &str, archive: &Path, dir: &Path, jobs: usize) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            s.spawn(move || {
                for j in (c..jobs).step_by(CLIENTS) {
                    let ticket = deploy(addr, archive);
                    retrieve(addr, &ticket, &dir.join(format!("out{j}")));
                }
            });
        }
    });
    let t = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir).unwrap();
    t
}

fn direct_one(archive: &Path, d: &Path) -> String {
    format!(
        "mkdir {d} && tar xzf {a} -C {d} && make -s -C {d} run > {d}/out 2>&1",
        d = d.display(),
        a = archive.display()
    )
}

/// What a user would script instead: `xargs -P4` of mkdir; tar xzf; make run.
fn run_direct(archive: &Path, dir: &Path, jobs: usize) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let script = format!(
        "seq {jobs} | xargs -P{CLIENTS} -I{{}} sh -c '{}'",
        direct_one(archive, &dir.join("d{}")).replace('\'', "'\\''")
    );
    let start = Instant::now();
    assert!(Command::new("sh").arg("-c").arg(&script).status().unwrap().success());
    let t = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir).unwrap();
    t
}

fn one_cluster(addr: &str, archive: &Path, dir: &Path) -> f64 {
    let start = Instant::now();
    let ticket = deploy(addr, archive);
    retrieve(addr, &ticket, dir);
    let t = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir).unwrap();
    t
}

fn one_direct(archive: &Path, dir: &Path) -> f64 {
    let start = Instant::now();
    assert!(Command::new("sh").arg("-c").arg(direct_one(archive, dir)).status().unwrap().success());
    let t = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir).unwrap();
    t
}

/// CPU seconds (user + system) of the server and the descendants it
/// reaped, and of its slot launchers (`cloud-launcher`) and the replicas'
/// inits they reaped, and its journal syncer (`cloud-syncer`): theirs
/// reach the server only when they end.
fn proc_cpu(pid: u32) -> f64 {
    launchers(pid).into_iter().map(own_cpu).sum::<f64>() + own_cpu(pid)
}

/// The server's long-lived children: its slot launchers (the processes
/// its replicas descend from) and its journal syncer.
fn launchers(pid: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let ours = |n: &str| matches!(n.trim(), "cloud-launcher" | "cloud-syncer");
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .filter(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| ours(&n)))
        .collect()
}

/// The server's pid, and with `follow` its launchers' too, as `-p`
/// arguments for strace (repeated) or perf (one comma list): tracing the
/// server alone would miss replicas, which the launchers (made at start,
/// before the tracer attached) clone.
fn traced_pids(server: &Server, follow: bool) -> Vec<String> {
    let pid = server.pid();
    let mut pids = vec![pid.to_string()];
    if follow {
        pids.extend(launchers(pid).iter().map(u32::to_string));
    }
    pids
}

/// CPU seconds of one process and the children it reaped.
fn own_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // After ")": state is field 0, utime 11, stime 12, cutime 13, cstime 14.
    let ticks: u64 = f.get(11..15).map(|s| s.iter().sum()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    ticks as f64 / hz
}

/// CPU seconds of this process's reaped children (the clients, the shells).
/// Seconds all CPUs were idle since boot (/proc/stat: idle + iowait).
fn machine_idle() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    (cpu.get(3).unwrap_or(&0.0) + cpu.get(4).unwrap_or(&0.0)) / hz
}

fn children_cpu() -> f64 {
    rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
}

/// This process's own CPU seconds (its threads starting and waiting for
/// the client processes).
fn own_process_cpu() -> f64 {
    rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_SELF)
}

fn rusage_cpu(who: nix::sys::resource::UsageWho) -> f64 {
    let u = nix::sys::resource::getrusage(who).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A thread that takes one loopback connection and reads it to its end in
/// 1 MiB blocks, discarding them: (its address, and the thread, which
/// returns when it had the last byte and how many bytes came).
fn discarding_receiver() -> (std::net::SocketAddr, std::thread::JoinHandle<(Instant, u64)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf).unwrap() {
                0 => break,
                k => n += k as u64,
            }
        }
        (Instant::now(), n)
    });
    (addr, receiver)
}

/// The congestion control our programs give a loopback connection, as the
/// servers decide it from `--tcp-congestion` in `CLOUD_BENCH_ARGS` (default
/// auto; the client follows auto): `None` where they keep the system's.
fn loopback_congestion() -> Option<String> {
    let args = std::env::var("CLOUD_BENCH_ARGS").unwrap_or_default();
    let mut words = args.split_whitespace();
    let mut policy = cloudinfra::congestion::Policy::Auto;
    while let Some(w) = words.next() {
        let value = match w.strip_prefix("--tcp-congestion") {
            Some("") => words.next(),
            Some(v) => v.strip_prefix('='),
            None => None,
        };
        if let Some(v) = value {
            policy = v.parse().unwrap();
        }
    }
    let choice = cloudinfra::congestion::choose(&policy).unwrap();
    if let Some(line) = &choice.line {
        eprintln!("  {line}");
    }
    choice.for_peer(std::net::Ipv4Addr::LOCALHOST.into()).map(str::to_owned)
}

/// A raw loopback TCP stream of the file's bytes: a sender reading the file
/// in 1 MiB blocks, a receiver discarding them. Seconds until the receiver
/// has the last byte.
fn raw_tcp(path: &Path) -> f64 {
    raw_tcp_using(path, None)
}

/// `raw_tcp` with the sender's congestion control set to `cc` (what our
/// programs give loopback connections), instead of the system's.
fn raw_tcp_using(path: &Path, cc: Option<&str>) -> f64 {
    let (addr, receiver) = discarding_receiver();
    let start = Instant::now();
    let mut f = std::fs::File::open(path).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    if let Some(cc) = cc {
        cloudinfra::congestion::set(&s, cc).unwrap();
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        s.write_all(&buf[..k]).unwrap();
    }
    drop(s);
    let (end, n) = receiver.join().unwrap();
    assert_eq!(n, std::fs::metadata(path).unwrap().len());
    (end - start).as_secs_f64()
}

/// Any path with a hop in the middle, at its cheapest here: a sender
/// `sendfile`s the file to a relay, which splices the bytes through a pipe
/// on to a receiver that discards them, as `raw_tcp`'s does (nothing is
/// checked, kept or written). Threads of this process, as `raw_tcp`'s.
/// Both hops use `link_cc`, as our client and node links do on loopback
/// (`congestion`).
/// Seconds until the receiver has the last byte.
fn splice_relay(path: &Path, link_cc: Option<&str>) -> f64 {
    use nix::fcntl::{splice, SpliceFFlags};
    let (sink_addr, sink) = discarding_receiver();
    let relay_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay_l.local_addr().unwrap();
    let hop_cc = link_cc.map(str::to_owned);
    let relay = std::thread::spawn(move || {
        let (from, _) = relay_l.accept().unwrap();
        let to = TcpStream::connect(sink_addr).unwrap();
        if let Some(cc) = &hop_cc {
            cloudinfra::congestion::set(&to, cc).unwrap();
        }
        let (r, w) = nix::unistd::pipe().unwrap();
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        loop {
            let k = splice(&from, None, &w, None, 1 << 20, SpliceFFlags::SPLICE_F_MOVE).unwrap();
            if k == 0 {
                break;
            }
            let mut left = k;
            while left > 0 {
                left -= splice(&r, None, &to, None, left, SpliceFFlags::SPLICE_F_MOVE).unwrap();
            }
        }
    });
    let start = Instant::now();
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let s = TcpStream::connect(relay_addr).unwrap();
    if let Some(cc) = link_cc {
        cloudinfra::congestion::set(&s, cc).unwrap();
    }
    let mut sent = 0;
    while sent < len {
        sent += nix::sys::sendfile::sendfile(&s, &f, None, len - sent).unwrap();
    }
    drop(s);
    relay.join().unwrap();
    let (end, n) = sink.join().unwrap();
    assert_eq!(n, len as u64);
    (end - start).as_secs_f64()
}

/// STATUS round trips on one connection while `idle` other connections are
/// held open: (median ms, 99th percentile ms, connections held, server RSS
/// KiB while they are held).
fn status_round_trip(server: &Server, idle: usize) -> (f64, f64, usize, u64) {
    let addr = server.addr.as_str();
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
    // The server has accepted every connection once it has answered calls
    // made after them; its RSS now holds them all.
    let rss = proc_status_kib(server.pid(), "VmRSS:");
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[times.len() * 99 / 100], held.len(), rss)
}

/// Context switches of every thread of `pid`: a process blocked in
/// epoll_wait makes no system call without first being woken up.
fn switches(pid: u32) -> u64 {
    let mut n = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for l in status.lines() {
                if let Some(v) =
                    l.strip_prefix("voluntary_ctxt_switches:").or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    n += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    n
}

/// read/write system calls counted by /proc/PID/io (syscr + syscw).
fn io_calls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .filter_map(|l| l.strip_prefix("syscr:").or_else(|| l.strip_prefix("syscw:")))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Wake-ups and read/write calls of an idle server over IDLE_WINDOW.
/// Idle means no work left, deferred work included: after the last job
/// the server still syncs the journal within a second (the last CLOSE's
/// record) and empties the files its pools got back. So the window starts
/// once the server is blocked in `epoll_wait` without a timeout (it has no
/// timer pending), or after 5 s, whichever comes first.
fn idle_calls(pid: u32) -> (f64, String) {
    let settle = Instant::now();
    let mut blocked_in = String::new();
    while settle.elapsed() < Duration::from_secs(5) {
        blocked_in = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        // "nr epfd events maxevents timeout ...": 232 epoll_wait, 281
        // epoll_pwait, 441 epoll_pwait2 (a null timeout) on x86_64.
        let f: Vec<&str> = blocked_in.split_whitespace().collect();
        let forever = match f.first().copied() {
            // The timeout is an int: -1, however the register shows it.
            Some("232" | "281") => matches!(f.get(4).copied(), Some("0xffffffff" | "0xffffffffffffffff")),
            Some("441") => f.get(4) == Some(&"0x0"),
            _ => false,
        };
        if forever {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s0, io0) = (switches(pid), io_calls(pid));
    std::thread::sleep(IDLE_WINDOW);
    let (s1, io1) = (switches(pid), io_calls(pid));
    let nr = blocked_in.split_whitespace().next().unwrap_or("?").to_string();
    (
        (s1 - s0 + io1 - io0) as f64,
        format!(
            "blocked in system call {nr} (232 = epoll_wait, 281 = epoll_pwait on x86_64), no timer pending, after {:.1} s",
            settle.elapsed().as_secs_f64() - IDLE_WINDOW.as_secs_f64()
        ),
    )
}

/// Median wall seconds and CPU seconds of starting a program `n` times.
fn start_cost(program: &str, args: &[&str], n: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let c0 = children_cpu();
        let t = Instant::now();
        let ok = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        cpu.push((children_cpu() - c0) * 1000.0);
        assert!(ok.success(), "{program} {args:?}");
    }
    (wall, cpu)
}

// ---------------------------------------------------------------- profile

/// System calls per job counted by strace: of the server process alone
/// (`follow` false), or with its launchers and everything they and it fork
/// (`-f`: replica setup, extraction, make and the job itself). The full table goes to `out`.
fn syscalls_per_job(server: &Server, archive: &Path, base: &Path, follow: bool, out: &Path) -> Option<f64> {
    let mut strace = Command::new("strace")
        .args(if follow { &["-f", "-c", "-S", "calls", "-o"][..] } else { &["-c", "-S", "calls", "-o"][..] })
        .arg(out)
        .args(traced_pids(server, follow).iter().flat_map(|p| ["-p", p.as_str()]))
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    // strace prints "Process N attached" once it is tracing (and again for
    // every child with -f): wait for the first, then keep draining.
    let mut lines = BufReader::new(strace.stderr.take()?);
    let mut line = String::new();
    lines.read_line(&mut line).ok()?;
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    run_cluster(&server.addr, archive, &base.join("strace-run"), STRACED_JOBS);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(strace.id() as i32), nix::sys::signal::Signal::SIGINT).ok()?;
    strace.wait().ok()?;
    let text = std::fs::read_to_string(out).ok()?;
    let total: f64 = text.lines().find(|l| l.trim_end().ends_with("total"))?.split_whitespace().nth(3)?.parse().ok()?;
    Some(total / STRACED_JOBS as f64)
}

/// `perf record -g` of the server and its launchers (and the replicas they fork) during a
/// burst of echo jobs; folded stacks and a flame graph if inferno is there.
fn perf_profile(server: &Server, archive: &Path, base: &Path, outdir: &Path) {
    let data = outdir.join("perf.data");
    let mut perf = match Command::new("perf")
        .args(["record", "-g", "-F", "2000", "-o"])
        .arg(&data)
        .args(["-p", &traced_pids(server, true).join(",")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("perf: {e} (apt-get install linux-perf)");
            return;
        }
    };
    // perf has no ready line; give it time to attach (it is not a measure).
    std::thread::sleep(Duration::from_millis(500));
    let t = run_cluster(&server.addr, archive, &base.join("perf-run"), JOBS);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(perf.id() as i32), nix::sys::signal::Signal::SIGINT);
    let _ = perf.wait();
    eprintln!("perf: {JOBS} jobs in {t:.2} s recorded in {}", data.display());
    let home_bin = std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")).unwrap_or_default();
    let tool = |name: &str| {
        let p = home_bin.join(name);
        if p.exists() {
            p
        } else {
            PathBuf::from(name)
        }
    };
    let script = Command::new("perf").args(["script", "-i"]).arg(&data).stderr(Stdio::null()).output();
    let Ok(script) = script else { return };
    let folded = Command::new(tool("inferno-collapse-perf"))
        .arg("--all")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            let mut stdin = c.stdin.take().unwrap();
            let bytes = script.stdout.clone();
            let w = std::thread::spawn(move || stdin.write_all(&bytes));
            let out = c.wait_with_output();
            let _ = w.join();
            out
        });
    let Ok(folded) = folded else {
        eprintln!("perf: no flame graph (cargo install inferno)");
        return;
    };
    std::fs::write(outdir.join("perf.folded"), &folded.stdout).unwrap();
    let svg = Command::new(tool("inferno-flamegraph"))
        .args(["--title", "cloud-server during 200 echo jobs (perf record -g)", "--width", "1600"])
        .arg(outdir.join("perf.folded"))
        .output();
    if let Ok(svg) = svg {
        std::fs::write(outdir.join("flame.svg"), svg.stdout).unwrap();
        eprintln!("perf: flame graph in {}", outdir.join("flame.svg").display());
    }
}

// ---------------------------------------------------------------- main

struct Archives {
    echo: PathBuf,
    compile: PathBuf,
    big: Option<PathBuf>,
}

#[allow(clippy::too_many_arguments)]
fn row(
    rows: &mut Vec<Row>,
    figure: &str,
    fs: &str,
    unit: &'static str,
    ours: Vec<f64>,
    reference: Vec<f64>,
    higher_is_better: bool,
    speed_ratio: bool,
    target: Target,
) {
    let r = Row { figure: figure.into(), fs: fs.into(), unit, ours, reference, higher_is_better, speed_ratio, target };
    eprintln!(
        "  {} [{}]: ours {} reference {} {} ratio {}",
        r.figure,
        r.fs,
        fmt_num(r.ours()),
        fmt_num(r.reference()),
        r.unit,
        r.ratio().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
    );
    rows.push(r);
}

fn bench_work_dir(rows: &mut Vec<Row>, base: &Path, a: &Archives, rounds: usize, first: bool, outdir: &Path) {
    let fs = fs_name(base);
    eprintln!("== work dir {} ({fs})", base.display());
    let server = start_server(base);
    let addr = server.addr.clone();
    let pid = server.pid();

    // Warm up both (page cache, first forks, the client binary).
    run_cluster(&addr, &a.echo, &base.join("warm"), 8);
    run_direct(&a.echo, &base.join("warm-direct"), 8);

    // 200 echo jobs, 4 at a time.
    let (mut ours, mut reference, mut ours_cpu, mut ref_cpu) = (vec![], vec![], vec![], vec![]);
    // Two more rounds than the others: on a shared VM the burst is the
    // noisiest figure, and its rounds are short (about a second each).
    for r in 0..if only("burst") { rounds + 2 } else { 0 } {
        let (s0, c0, b0, i0) = (proc_cpu(pid), children_cpu(), own_process_cpu(), machine_idle());
        let t = run_cluster(&addr, &a.echo, &base.join(format!("burst{r}")), JOBS);
        let (s1, c1, b1, i1) = (proc_cpu(pid), children_cpu(), own_process_cpu(), machine_idle());
        ours.push(JOBS as f64 / t);
        // The clients' starts by this process count too, as xargs's do in
        // the reference's (a child of this process, so in RUSAGE_CHILDREN).
        ours_cpu.push((s1 - s0 + c1 - c0 + b1 - b0) * 1000.0 / JOBS as f64);
        let per_job = |cpu: f64| cpu * 1000.0 / JOBS as f64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let idle_ours = (i1 - i0) / (t * cpus) * 100.0;
        let t = run_direct(&a.echo, &base.join(format!("direct{r}")), JOBS);
        let idle_ref = (machine_idle() - i1) / (t * cpus) * 100.0;
        reference.push(JOBS as f64 / t);
        ref_cpu.push((children_cpu() - c1) * 1000.0 / JOBS as f64);
        eprintln!(
            "  burst {r}: server {:.2} ms of CPU a job, clients {:.2}, this bench starting them {:.2}; \
             the machine idle {idle_ours:.0}% (the pipeline's round: {idle_ref:.0}%)",
            per_job(s1 - s0),
            per_job(c1 - c0),
            per_job(b1 - b0),
        );
    }
    if only("burst") {
        let burst = format!("{JOBS} echo jobs, {CLIENTS} clients, {NODES} nodes");
        row(rows, &burst, &fs, "jobs/s", ours, reference, true, false, Target::AtLeast(1.2));
        row(rows, "  CPU per echo job (server+clients)", &fs, "ms", ours_cpu, ref_cpu, false, false, Target::None);
    }

    // One echo job alone.
    let (mut ours, mut reference) = (vec![], vec![]);
    for r in 0..if only("single") { rounds * 3 } else { 0 } {
        ours.push(one_cluster(&addr, &a.echo, &base.join(format!("alone{r}"))) * 1000.0);
        reference.push(one_direct(&a.echo, &base.join(format!("alone-direct{r}"))) * 1000.0);
    }
    if only("single") {
        row(
            rows,
            "one echo job alone, deploy->retrieve",
            &fs,
            "ms",
            ours,
            reference,
            false,
            false,
            Target::AtMost(1.0),
        );
    }

    // A compile job alone.
    let (mut ours, mut reference) = (vec![], vec![]);
    for r in 0..if only("compile") { rounds + 2 } else { 0 } {
        ours.push(one_cluster(&addr, &a.compile, &base.join(format!("cc{r}"))) * 1000.0);
        reference.push(one_direct(&a.compile, &base.join(format!("cc-direct{r}"))) * 1000.0);
    }
    if only("compile") {
        row(rows, "compile job (one-file C), speed", &fs, "ms", ours, reference, false, true, Target::AtLeast(0.95));
    }

    // 1 GiB of incompressible data.
    if let Some(big) = a.big.as_ref().filter(|_| only("big")) {
        let bytes = std::fs::metadata(big).unwrap().len() as f64;
        // Reset the server's VmHWM ("5" to clear_refs) so the peak is this transfer's.
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        // One untimed round first, for both: the input's pages come into
        // the page cache, and the server's first large upload makes the
        // spool's large file, which later ones write over (pool.rs: the
        // spare; the first two large uploads of a server's life write
        // fresh files, docs/PERFORMANCE.md).
        let warm = base.join("big-warm");
        let ticket = deploy(&addr, big);
        retrieve(&addr, &ticket, &warm);
        std::fs::remove_dir_all(&warm).unwrap();
        raw_tcp(big);
        let (mut ours, mut reference, mut deploy_only) = (vec![], vec![], vec![]);
        for r in 0..rounds {
            let dir = base.join(format!("big{r}"));
            let start = Instant::now();
            let ticket = deploy(&addr, big);
            deploy_only.push(bytes / start.elapsed().as_secs_f64() / 1e6);
            retrieve(&addr, &ticket, &dir);
            ours.push(bytes / start.elapsed().as_secs_f64() / 1e6);
            std::fs::remove_dir_all(&dir).unwrap();
            reference.push(bytes / raw_tcp(big) / 1e6);
        }
        let hwm = proc_status_kib(pid, "VmHWM:") as f64 / 1024.0;
        // Issue 11's figure is the transfer client -> main -> node. An
        // in-process node's replica reads the main server's spool file in
        // place, so for it the transfer ends when the DEPLOY is answered
        // (the archive whole, checked and on disk); the unpacking and the
        // job's run that follow are printed, without a target.
        row(
            rows,
            "1 GiB archive, client->main (in-process node)",
            &fs,
            "MB/s",
            deploy_only,
            reference.clone(),
            true,
            false,
            Target::AtLeast(0.5),
        );
        row(rows, "  on to retrieve (unpacked, run)", &fs, "MB/s", ours, reference, true, false, Target::None);
        row(rows, "  server peak RSS during 1 GiB", &fs, "MiB", vec![hwm], vec![], false, false, Target::AtMost(32.0));

        // The same through a node in its own process (NODE_PROG over
        // loopback TCP): until the node's work dir holds the whole archive
        // (client -> main -> node, the transfer issue 11 names), and on to
        // the retrieve.
        let (node, main) = start_remote_pair(base);
        // Seen as the node sees it: a node as root keeps archives in a
        // tmpfs of its own mount namespace (`node::archive_tmpfs`).
        let own = std::fs::canonicalize(base.join("node-work")).unwrap();
        let node_work = PathBuf::from(format!("/proc/{}/root", node.pid())).join(own.strip_prefix("/").unwrap());
        let t = remote_round(&main, &node_work, &a.echo, &base.join("remote-warm"));
        eprintln!("  remote node warm-up: {:.3} s", t.1);
        // And one untimed large round, as above.
        let t = remote_round(&main, &node_work, big, &base.join("remote-warm-big"));
        std::fs::remove_dir_all(base.join("remote-warm-big")).unwrap();
        eprintln!("  remote node large warm-up: {:.3} s to the node", t.0);
        let _ = std::fs::write(format!("/proc/{}/clear_refs", main.pid()), "5");
        let _ = std::fs::write(format!("/proc/{}/clear_refs", node.pid()), "5");
        // What our programs use on loopback, for the relay's hops and a
        // second raw stream.
        let link_cc = loopback_congestion();
        let link_cc = link_cc.as_deref();
        splice_relay(big, link_cc);
        let (mut transfer, mut whole, mut reference, mut relay, mut same_cc) = (vec![], vec![], vec![], vec![], vec![]);
        for r in 0..rounds {
            let dir = base.join(format!("big-remote{r}"));
            let (landed, total) = remote_round(&main, &node_work, big, &dir);
            transfer.push(bytes / landed / 1e6);
            whole.push(bytes / total / 1e6);
            std::fs::remove_dir_all(&dir).unwrap();
            reference.push(bytes / raw_tcp(big) / 1e6);
            relay.push(bytes / splice_relay(big, link_cc) / 1e6);
            if link_cc.is_some() {
                same_cc.push(bytes / raw_tcp_using(big, link_cc) / 1e6);
            }
        }
        let hwm = (proc_status_kib(main.pid(), "VmHWM:").max(proc_status_kib(node.pid(), "VmHWM:"))) as f64 / 1024.0;
        let figure = "1 GiB archive, client->main->node process";
        let transfer_too = transfer.clone();
        row(rows, figure, &fs, "MB/s", transfer, reference.clone(), true, false, Target::AtLeast(0.5));
        row(rows, "  the same, on to retrieve", &fs, "MB/s", whole, reference.clone(), true, false, Target::None);
        // The cheapest path through a middle hop here (`splice_relay`), and
        // how close ours comes to it.
        let through = "  a bare splice relay (checks, keeps nothing)";
        row(rows, through, &fs, "MB/s", relay.clone(), reference, true, false, Target::None);
        row(rows, "  ours against that relay", &fs, "MB/s", transfer_too.clone(), relay, true, false, Target::None);
        // Our connections replace the system's congestion control on
        // loopback (BBR, paced by a timer per socket without fq): ours
        // against a raw stream that replaces it too.
        if let Some(cc) = link_cc {
            let label = format!("  ours against a raw stream using {cc} too");
            row(rows, &label, &fs, "MB/s", transfer_too, same_cc, true, false, Target::None);
        }
        row(
            rows,
            "  main and node peak RSS (the larger)",
            &fs,
            "MiB",
            vec![hwm],
            vec![],
            false,
            false,
            Target::AtMost(32.0),
        );
        drop(main);
        drop(node);
    }

    if first && only("idle") {
        let (calls, what) = idle_calls(pid);
        eprintln!("  idle server: {what}");
        row(
            rows,
            "idle server: wake-ups + reads/writes in 3 s",
            &fs,
            "calls",
            vec![calls],
            vec![],
            false,
            false,
            Target::AtMost(0.0),
        );

        let before = proc_status_kib(pid, "VmRSS:") as f64 / 1024.0;
        let alone = status_round_trip(&server, 0);
        let crowded = status_round_trip(&server, IDLE_CONNECTIONS);
        let held = crowded.2;
        row(
            rows,
            "STATUS round trip, no other connection",
            &fs,
            "ms",
            vec![alone.0],
            vec![],
            false,
            false,
            Target::AtMost(1.0),
        );
        row(
            rows,
            &format!("STATUS round trip, {held} idle connections"),
            &fs,
            "ms",
            vec![crowded.0],
            vec![],
            false,
            false,
            Target::AtMost(1.0),
        );
        row(
            rows,
            &format!("  99th percentile, {held} idle"),
            &fs,
            "ms",
            vec![crowded.1],
            vec![],
            false,
            false,
            Target::None,
        );
        let rss = crowded.3 as f64 / 1024.0;
        row(
            rows,
            &format!("server RSS with {held} idle connections"),
            &fs,
            "MiB",
            vec![rss],
            vec![],
            false,
            false,
            Target::AtMost(7.0),
        );
        row(rows, "  server RSS before them", &fs, "MiB", vec![before], vec![], false, false, Target::None);

        // The client program against a small C program, both printing a version.
        let (mut ours_wall, mut ours_cpu, mut c_wall, mut c_cpu) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            let (w, c) = start_cost(client(), &["--version"], 20);
            ours_wall.push(median(&w).unwrap());
            ours_cpu.push(median(&c).unwrap());
            let (w, c) = start_cost("true", &["--version"], 20);
            c_wall.push(median(&w).unwrap());
            c_cpu.push(median(&c).unwrap());
        }
        row(
            rows,
            "client start-up (cloud --version vs true)",
            &fs,
            "ms",
            ours_wall,
            c_wall,
            false,
            false,
            Target::None,
        );
        row(rows, "  its CPU", &fs, "ms", ours_cpu, c_cpu, false, false, Target::None);
        // What a client process costs a user with its call: start-up,
        // connect, one round trip (CLUSTER), print, exit; against the same
        // small C program's start-up.
        let (mut call_wall, mut call_cpu, mut c_wall, mut c_cpu) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            let (w, c) = start_cost(client(), &["status", "--server", &addr], 20);
            call_wall.push(median(&w).unwrap());
            call_cpu.push(median(&c).unwrap());
            let (w, c) = start_cost("true", &["--version"], 20);
            c_wall.push(median(&w).unwrap());
            c_cpu.push(median(&c).unwrap());
        }
        row(rows, "client call (cloud status vs true)", &fs, "ms", call_wall, c_wall, false, false, Target::None);
        row(rows, "  its CPU", &fs, "ms", call_cpu, c_cpu, false, false, Target::None);

        if std::env::var("CLOUD_BENCH_PROFILE").is_ok_and(|v| v == "1") {
            for follow in [false, true] {
                let out = outdir.join(if follow { "strace-f.txt" } else { "strace-server.txt" });
                match syscalls_per_job(&server, &a.echo, base, follow, &out) {
                    Some(n) => {
                        let what = if follow {
                            "system calls per job, server and its children (strace -f)"
                        } else {
                            "system calls per job, server alone"
                        };
                        row(rows, what, &fs, "calls", vec![n], vec![], false, false, Target::None);
                        eprintln!("  strace table in {}", out.display());
                    }
                    None => eprintln!("strace unavailable (apt-get install strace)"),
                }
            }
            perf_profile(&server, &a.echo, base, outdir);
        }
    }
    drop(server);
}

/// The figures `CLOUD_BENCH_ONLY` may name.
const SECTIONS: [&str; 5] = ["burst", "single", "compile", "big", "idle"];

/// `CLOUD_BENCH_ONLY=big,burst` runs only those figures (`SECTIONS`);
/// unset, all of them.
fn only(section: &str) -> bool {
    std::env::var("CLOUD_BENCH_ONLY").map_or(true, |v| v.is_empty() || v.split(',').any(|s| s.trim() == section))
}

fn main() {
    // Room for 10,000 idle connections, here and in the servers we start
    // (they inherit it; their --max-connections is lowered to fit it).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            eprintln!("could not raise the open files limit from {soft} to {hard}");
        }
    }
    if let Ok(names) = std::env::var("CLOUD_BENCH_ONLY") {
        if let Some(bad) = names.split(',').map(str::trim).find(|n| !n.is_empty() && !SECTIONS.contains(n)) {
            eprintln!("CLOUD_BENCH_ONLY: no figure is called {bad:?}; name some of {}", SECTIONS.join(", "));
            std::process::exit(2);
        }
    }
    let rounds = std::env::var("CLOUD_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3usize).max(3);
    let quick = std::env::var("CLOUD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let outdir = target_dir().join("bench");
    std::fs::create_dir_all(&outdir).unwrap();

    let mut bases: Vec<(tempfile::TempDir, bool)> = Vec::new();
    let configured = std::env::var_os("CLOUD_BENCH_WORKDIR").map(PathBuf::from).unwrap_or_else(|| outdir.clone());
    std::fs::create_dir_all(&configured).unwrap();
    bases.push((tempfile::Builder::new().prefix("run-").tempdir_in(&configured).unwrap(), true));
    match std::env::var("CLOUD_BENCH_TMPFS").unwrap_or_else(|_| "/dev/shm".into()).as_str() {
        "none" | "" => {}
        t => {
            let t = Path::new(t);
            if fs_name(t) == "tmpfs" {
                bases.push((tempfile::Builder::new().prefix("cloud-bench-").tempdir_in(t).unwrap(), false));
            } else {
                eprintln!("CLOUD_BENCH_TMPFS={} is not a tmpfs: skipped", t.display());
            }
        }
    }

    let inputs = tempfile::Builder::new().prefix("inputs-").tempdir_in(&configured).unwrap();
    let echo = make_archive(inputs.path(), "echo", &[("Makefile", "run:\n\t@echo tiny job $$CLOUD_REPLICA\n")]);
    let compile = make_archive(
        inputs.path(),
        "compile",
        &[
            ("Makefile", "run:\n\t@cc -O2 -o hello hello.c && ./hello\n"),
            ("hello.c", "#include <stdio.h>\nint main(void) { printf(\"hello from a compiled job\\n\"); return 0; }\n"),
        ],
    );
    let big = if quick || !only("big") {
        None
    } else {
        let t = Instant::now();
        let p = big_archive(inputs.path());
        eprintln!(
            "made {} ({} bytes) in {:.1} s",
            p.display(),
            std::fs::metadata(&p).unwrap().len(),
            t.elapsed().as_secs_f64()
        );
        Some(p)
    };
    let archives = Archives { echo, compile, big };

    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rows = Vec::new();
    for (base, first) in &bases {
        bench_work_dir(&mut rows, base.path(), &archives, rounds, *first, &outdir);
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    println!();
    println!(
        "cloudinfra bench: {cpus} CPUs, Linux {kernel}, load {} before, {} after; {rounds} rounds per figure \
         ({} for the burst and the compile job, {} for one job alone), medians; {:.0} s",
        load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        rounds + 2,
        rounds * 3,
        started.elapsed().as_secs_f64()
    );
    println!("client: {}", client());
    println!("ratio: ours/reference, except 'speed' rows (reference time / ours); rows without a reference are judged on ours");
    print_table(&rows);

    let results = json!({
        "machine": { "cpus": cpus, "kernel": kernel, "loadavg_before": load_before.trim(), "loadavg_after": load_after.trim() },
        "config": { "rounds": rounds, "quick": quick, "jobs": JOBS, "clients": CLIENTS, "nodes": NODES,
                    "work_dirs": bases.iter().map(|(b, _)| json!({"path": b.path(), "fs": fs_name(b.path())})).collect::<Vec<_>>(),
                    "server_args": std::env::var("CLOUD_BENCH_ARGS").unwrap_or_default(), "client": client() },
        "seconds": started.elapsed().as_secs_f64(),
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
    });
    std::fs::write(outdir.join("results.json"), serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    std::fs::write(outdir.join("ratios.svg"), svg_chart(&rows, "cloudinfra make bench: ratios against targets"))
        .unwrap();
    println!("wrote {} and {}", outdir.join("results.json").display(), outdir.join("ratios.svg").display());
}
