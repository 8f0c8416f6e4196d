//! A `cloud-server node` process for tests of remote nodes and staged
//! transfers: started on a free port of a 127.0.0.x address, its log
//! collected, stopped (SIGTERM, and SIGCONT should a test have stopped
//! it) when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::SERVER;

/// A `cloud-server node` process; stopped (SIGTERM) when dropped.
pub struct NodeProc {
    pub child: Child,
    pub addr: String,
    pub work: PathBuf,
    log: Arc<Mutex<String>>,
}

impl NodeProc {
    /// Start a node on `ip` (a free port, or `port`), work dir `work`;
    /// returns once its ready line is out.
    pub fn start(ip: &str, port: Option<u16>, work: &Path) -> NodeProc {
        Self::start_with(ip, port, work, &[])
    }

    /// As `start`, with extra flags (e.g. `--secret-file F`).
    pub fn start_with(ip: &str, port: Option<u16>, work: &Path, extra: &[&str]) -> NodeProc {
        for _ in 0..5 {
            let chosen =
                port.unwrap_or_else(|| TcpListener::bind((ip, 0)).expect("bind").local_addr().expect("addr").port());
            let addr = format!("{ip}:{chosen}");
            // Slot uids of its own, derived from its port (unique while held).
            let slot_base = (1_000_000 + u32::from(chosen) * 64 + 32).to_string();
            let mut child = Command::new(SERVER)
                .args(["node", "--listen", &addr, "--slot-uids", &slot_base, "--allow-network", "--work-dir"])
                .arg(work)
                .args(extra)
                .env("RUST_LOG", "info,cloudinfra::node_service=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn cloud-server node");
            let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
            let mut got = String::new();
            let mut line = String::new();
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("listening on") || line.starts_with("cloud-server") {
                    got = line.clone();
                    break;
                }
                line.clear();
            }
            if got.contains("listening on") {
                let log = Arc::new(Mutex::new(got));
                let sink = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = lines.read(&mut buf) {
                        sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                });
                return NodeProc { child, addr, work: work.to_path_buf(), log };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(got.contains("already in use") && port.is_none(), "node did not start: {got}");
        }
        panic!("no free port for a node");
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// What the node logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Its folder on the host, `output_<port>`.
    pub fn folder(&self) -> PathBuf {
        self.work.join(format!("output_{}", self.port()))
    }

    /// Where the node keeps received archives and stages, as the node sees
    /// it: as root, a tmpfs of its own mount namespace (`archives_<port>`,
    /// seen through /proc/PID/root); else its folder.
    pub fn archives(&self) -> PathBuf {
        let work = std::fs::canonicalize(&self.work).expect("work dir");
        PathBuf::from(format!("/proc/{}/root{}/archives_{}", self.child.id(), work.display(), self.port()))
    }

    /// The bytes in the node's folder and its archives' (its own view),
    /// but for its pools' empty files.
    pub fn held(&self) -> Vec<(String, u64)> {
        [self.folder(), self.archives()]
            .iter()
            .flat_map(std::fs::read_dir)
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
            .filter(|(name, len)| !(name.starts_with("free-") && *len == 0))
            .collect()
    }

    /// The largest stage file the node holds now.
    pub fn staged(&self) -> u64 {
        self.held().iter().filter(|(n, _)| n.starts_with("stage-")).map(|(_, l)| *l).max().unwrap_or(0)
    }
}

impl Drop for NodeProc {
    /// SIGTERM: a clean stop removes its workspaces and cgroups.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            // A test that failed with it stopped must not wait on it forever.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
        let _ = self.child.wait();
    }
}
