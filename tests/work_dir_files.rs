//! Issue 11: once warmed up, a job creates and deletes no file or folder
//! on the work dir (each ext4 inode allocation cost 220 to 570 us there):
//! the spool's and the node folders' files are reused from job to job,
//! and every promise still holds (outputs retrieved whole, a closed
//! ticket's output gone, a refused upload's bytes gone).

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use common::*;

/// Creations and removals in watched folders (inotify: IN_CREATE covers
/// open(O_CREAT), mkdir and link; IN_DELETE unlink and rmdir; a rename
/// is IN_MOVED_*, which allocates and frees no inode).
struct Watch {
    fd: OwnedFd,
    dirs: Vec<(i32, String)>,
}

impl Watch {
    fn new(dirs: &[&Path]) -> Watch {
        // SAFETY: plain syscall; the descriptor is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(raw >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut watched = Vec::new();
        for d in dirs {
            let c = std::ffi::CString::new(d.to_str().unwrap()).unwrap();
            // SAFETY: valid descriptor and NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_CREATE | libc::IN_DELETE) };
            assert!(wd >= 0, "inotify_add_watch {}: {}", d.display(), std::io::Error::last_os_error());
            watched.push((wd, d.display().to_string()));
        }
        Watch { fd, dirs: watched }
    }

    /// Every event so far, as "created DIR/NAME" or "removed DIR/NAME".
    fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut at = 0;
            let head = std::mem::size_of::<libc::inotify_event>();
            while at + head <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copies one header.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + head..at + head + ev.len as usize];
                let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_string();
                let dir = self.dirs.iter().find(|(wd, _)| *wd == ev.wd).map_or("?", |(_, d)| d.as_str());
                let what = if ev.mask & libc::IN_CREATE != 0 { "created" } else { "removed" };
                out.push(format!("{what} {dir}/{name}"));
                at += head + ev.len as usize;
            }
        }
    }
}

fn one_job(c: &Cluster, archive: &Path, n: usize) {
    let t = c.deploy(1, archive);
    let (ok, outs) = c.retrieve(t);
    assert!(ok && outs.len() == 1 && outs[0].1 == "hello\n", "job {n}, ticket {t}: {outs:?}");
}

#[test]
fn a_warmed_up_server_creates_and_deletes_no_file_on_the_work_dir_per_job() {
    let c = Cluster::start(2);
    if c.log().contains("uncontained") {
        // An uncontained replica's workspace is a real folder per job.
        eprintln!("SKIPPED a_warmed_up_server_creates_and_deletes_no_file_on_the_work_dir_per_job: uncontained");
        return;
    }
    let archive = job(c.dir.path(), "hello.tar.gz", &["@echo hello"]);
    for n in 0..3 {
        one_job(&c, &archive, n);
    }
    let work = c.work();
    let mut dirs = vec![work.clone(), work.join("spool")];
    dirs.extend(c.ports.iter().map(|p| work.join(format!("output_{p}"))));
    let dirs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let watch = Watch::new(&dirs);
    for n in 0..8 {
        one_job(&c, &archive, n);
    }
    // Each CLOSE is answered after the turn that gave the files back.
    let events = watch.events();
    assert!(events.is_empty(), "8 jobs created or removed on the work dir: {events:#?}");
    // Nothing of theirs is kept: the outputs went back to the pools, empty.
    assert!(node_leftovers(&c).is_empty(), "{:?}", node_leftovers(&c));
    assert!(spool_data(&c).is_empty(), "{:?}", spool_data(&c));
}
