//! Files on the work dir reused from job to job, never created or deleted
//! per job (issue 11): on ext4 each inode allocation walks recently
//! deleted inodes (220 to 570 us a create), and a removal frees one.
//!
//! Owns: one directory's pool of regular files. A file is taken (emptied,
//! opened read-write), used, and given back; the next job takes it again.
//! Two kinds: an in-place pool (the main server's spool: a file keeps its
//! `<prefix><n>` name while used, the journal names it) and a renaming
//! pool (a node's folder: a taken file is renamed to the ticket's name,
//! `<ticket>.out`, so a restart finds it; given back, it is renamed to a
//! free `<prefix><n>` name: a rename allocates no inode).
//! A file is reused only when nobody has it open: before it is emptied, a
//! write lease (`F_SETLEASE`, `F_WRLCK`) is asked for, which the kernel
//! grants only if no other descriptor anywhere (a reply still streaming
//! it, a replica's init still extracting it) is open on it; otherwise it
//! waits in `dirty` and is tried again when a file is taken or on a timer
//! (`retry_at`, `on_timer`: 200 ms doubling up to 10 s, none when no file
//! waits). SIGIO (a lease break's signal) is blocked in the process.
//! A pool grows to its peak of files in use at once (warm-up); at start
//! it keeps at most `KEEP` free files and removes the rest. Where leases do not work
//! (a file system without them) a given-back file is removed, as before.
//! Files of `large` bytes or more are never emptied on the reactor thread
//! (freeing 1 GiB of blocks took 0.16 s): a pool made `with_spares` (the
//! main server's spool: `SPARES`) keeps one whole as its *spare*, under
//! the same lease, link and settle rules, and the next stream of a known
//! large length (`take_for`) writes over it from offset 0 without
//! truncation (blocks and pages already there: 1 GiB overwritten costs
//! about half the system time of a fresh file); its taker cuts it to the
//! bytes it wrote (`cut`) before anything reads it. Others (beyond the
//! bound, or all of them in a pool without spares) are removed by a child
//! (`rm`).
//! Files given back with `give_after_sync` are reused only after
//! `settle` (the main service calls it once the journal is synced): a
//! spooled archive is not overwritten while the journal on disk may still
//! name it as the archive of a job that would run again after a crash.
//! With the sync made by another process (`syncer`), `seal` marks the
//! files given back before it was asked for and `settle_sealed` reuses
//! only those once it is done.
//! Must not touch: what the files hold or mean (callers), other
//! directories, the journal.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A pool shared by its owner and the connections' sinks.
pub type Shared = Rc<RefCell<Pool>>;

/// Files at least this large are removed by a child (`rm`), not emptied
/// for reuse on the reactor thread.
pub const LARGE: u64 = 64 << 20;

/// First wait before dirty files are tried again; it doubles up to
/// `RETRY_MAX` while one stays open, and starts over once none is left.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Free files a start keeps (`adopt`); more (left by a burst) are
/// removed then, so a pool is as large as its recent peak at most.
pub const KEEP: usize = 256;

/// Dirty files tried per `take` before a new file is made instead.
const DIRTY_TRIES: usize = 4;

/// Large files the main server's spool keeps whole for reuse (its
/// spares). One: large uploads come one after another (one client's
/// stream fills the link), and a spare holds up to `--max-archive` of
/// disk while idle; more large files given back at once are removed by a
/// child as before. A node's pools keep none: its large archives come
/// mostly as stages, whose whole length NODE_STAGE does not carry, so a
/// spare would seldom be written over and would hold up to
/// `--max-archive` of the node's archive tmpfs (memory) for nothing.
pub const SPARES: usize = 1;

/// A file taken by `take_for`.
#[derive(Debug)]
pub struct Taken {
    pub file: File,
    pub path: PathBuf,
    /// A spare written over, not emptied: its old bytes past what the
    /// taker writes are still there until it cuts the file (`cut`).
    pub spare: bool,
}

/// A spare is written over by a stream of `len` bytes only if the stream
/// is large and the spare at most twice as long: cutting its tail then
/// frees no more blocks than the stream has just written (a 1 GiB spare
/// cut to 4 MiB would cost 0.14 s on tmpfs, 0.35 s on ext4, on the
/// reactor thread).
pub fn spare_fits(spare_len: u64, len: u64, large: u64) -> bool {
    len >= large && spare_len <= len.saturating_mul(2)
}

/// A spare's stream is whole: `file` cut to the bytes written into it
/// (its position), so that none of its previous user's bytes stay past
/// them.
pub fn cut(file: &mut File) -> io::Result<()> {
    use std::io::Seek;
    let written = file.stream_position()?;
    file.set_len(written)
}

#[derive(Debug)]
pub struct Pool {
    dir: PathBuf,
    prefix: &'static str,
    /// Taken files are renamed (a node's folder) or keep their name (the spool).
    renames: bool,
    /// Files of this size or more are removed in the background, not reused.
    large: u64,
    /// Emptied, and open nowhere when they were: taken first.
    free: Vec<PathBuf>,
    /// Given back while still open somewhere: emptied when taken, if
    /// nobody holds them by then.
    dirty: VecDeque<PathBuf>,
    /// Large files kept whole, open nowhere when they were given back (at
    /// most `max_spares`), and their lengths then.
    spares: Vec<(PathBuf, u64)>,
    max_spares: usize,
    /// Given back, reusable after the next `settle`.
    settling: Vec<PathBuf>,
    /// The first this many of `settling` are covered by the journal sync
    /// in flight (`seal`, `settle_sealed`).
    sealed: usize,
    next: u64,
    /// When dirty files are tried again (`on_timer`), and the wait after.
    retry: Option<(Instant, Duration)>,
    /// Files made because none could be reused (warm-up), for tests and logs.
    pub created: u64,
}

/// What `reset` found.
enum Reset {
    Emptied(File),
    /// Open elsewhere: not now.
    Busy,
    /// Too large to empty on the reactor thread, and open nowhere: kept
    /// whole as a spare (of this length), if there is room.
    Spare(u64),
    /// Too large to empty, and no room for another spare: removed by a
    /// child.
    Large,
}

impl Pool {
    /// The pool of `dir` (which must exist), its free files named
    /// `<prefix><n>`.
    pub fn new(dir: &Path, prefix: &'static str, renames: bool, large: u64) -> Pool {
        // Someone opening a file in the two system calls we hold its lease
        // would break it, and the kernel tells the holder with SIGIO, whose
        // default ends the process: blocked here (a pending SIGIO is never
        // read; children set their own mask), the opener waits for our
        // F_UNLCK.
        let mut sigio = nix::sys::signal::SigSet::empty();
        sigio.add(nix::sys::signal::Signal::SIGIO);
        let _ = nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&sigio), None);
        Pool {
            dir: dir.to_path_buf(),
            prefix,
            renames,
            large,
            free: Vec::new(),
            dirty: VecDeque::new(),
            spares: Vec::new(),
            max_spares: 0,
            settling: Vec::new(),
            sealed: 0,
            next: 1,
            retry: None,
            created: 0,
        }
    }

    /// Keep up to `n` large files whole as spares rather than remove them.
    pub fn with_spares(mut self, n: usize) -> Pool {
        self.max_spares = n;
        self
    }

    pub fn shared(self) -> Shared {
        Rc::new(RefCell::new(self))
    }

    /// Whether `name` is one of this pool's free-file names.
    pub fn is_pool_name(&self, name: &str) -> bool {
        name.strip_prefix(self.prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// At start: a file an earlier run left (a pool file, or one no job
    /// needs any more) joins the pool, emptied; names go on after the
    /// highest. A renaming pool's non-pool names are renamed first.
    /// Beyond `KEEP` free files, it is removed instead.
    pub fn adopt(&mut self, path: &Path) {
        if self.holds(path) {
            return; // already ours (a clean stop sweeps again), even with KEEP free
        }
        if self.idle() >= KEEP {
            return self.discard(path);
        }
        if let Some(n) = path.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_prefix(self.prefix)) {
            if let Ok(n) = n.parse::<u64>() {
                self.next = self.next.max(n.saturating_add(1));
            }
        }
        self.give(path);
    }

    /// A file to write from its start: reused if one is free, else made.
    /// Returns it opened read-write and empty, and its path.
    pub fn take(&mut self) -> io::Result<(File, PathBuf)> {
        self.take_for(None).map(|t| (t.file, t.path))
    }

    /// As `take`, for a stream of `len` bytes if known: a large one gets
    /// the spare if it fits (`spare_fits`), opened read-write at offset 0
    /// and not emptied (`Taken::spare`: the taker must `cut` it once the
    /// stream is whole, before anything reads it).
    pub fn take_for(&mut self, len: Option<u64>) -> io::Result<Taken> {
        if let Some(len) = len {
            if let Some(i) = self.spares.iter().position(|&(_, n)| spare_fits(n, len, self.large)) {
                let (path, _) = self.spares.swap_remove(i);
                match open_rw(&path) {
                    Ok(file) => return Ok(Taken { file, path, spare: true }),
                    Err(e) => self.unusable(&path, &e),
                }
            }
        }
        let (file, path) = self.take_empty()?;
        Ok(Taken { file, path, spare: false })
    }

    fn take_empty(&mut self) -> io::Result<(File, PathBuf)> {
        while let Some(path) = self.free.pop() {
            match open_rw(&path) {
                Ok(f) => return Ok((f, path)),
                Err(e) => log::debug!("pool file {}: {e}; skipped", path.display()),
            }
        }
        for _ in 0..DIRTY_TRIES.min(self.dirty.len()) {
            let Some(path) = self.dirty.pop_front() else { break };
            match self.reset(&path) {
                Ok(Reset::Emptied(f)) => {
                    self.retry = self.retry.filter(|_| !self.dirty.is_empty());
                    return Ok((f, path));
                }
                Ok(Reset::Busy) => self.dirty.push_back(path),
                Ok(Reset::Spare(len)) => self.spares.push((path, len)),
                Ok(Reset::Large) => self.discard(&path),
                Err(e) => self.unusable(&path, &e),
            }
        }
        loop {
            let path = self.next_name();
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(f) => {
                    self.created += 1;
                    return Ok((f, path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A renaming pool: a file taken and renamed to `to` (which must not
    /// exist), opened read-write and empty.
    pub fn take_as(&mut self, to: &Path) -> io::Result<File> {
        self.take_as_for(to, None).map(|t| t.file)
    }

    /// As `take_as`, for a stream of `len` bytes if known (`take_for`).
    pub fn take_as_for(&mut self, to: &Path, len: Option<u64>) -> io::Result<Taken> {
        let Taken { file, path, spare } = self.take_for(len)?;
        if let Err(e) = rename_noreplace(&path, to) {
            // Back where it was (empty, or the spare still whole): nothing lost.
            match spare {
                true => self.spares.push((path, file.metadata().map_or(0, |m| m.len()))),
                false => self.free.push(path),
            }
            return Err(e);
        }
        Ok(Taken { file, path: to.to_path_buf(), spare })
    }

    /// A file no longer needed: emptied and reused (a renaming pool
    /// renames it to a free name first); a large one is removed by a child.
    pub fn give(&mut self, path: &Path) {
        let path = match self.renames && !self.is_own(path) {
            true => match self.rename_to_free(path) {
                Ok(to) => to,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => return log::warn!("cannot move {} back into the pool: {e}", path.display()),
            },
            false => path.to_path_buf(),
        };
        self.recycle(path);
    }

    /// A given-back file: emptied now if nobody holds it (or kept whole
    /// as the spare), else dirty. One given back twice (a stream that
    /// failed, then ended) is listed once: two takers never share it.
    fn recycle(&mut self, path: PathBuf) {
        if self.holds(&path) {
            return;
        }
        match self.reset(&path) {
            Ok(Reset::Emptied(_)) => self.free.push(path),
            Ok(Reset::Spare(len)) => self.spares.push((path, len)),
            Ok(Reset::Busy) => {
                self.dirty.push_back(path);
                if self.retry.is_none() {
                    self.retry = Some((Instant::now() + RETRY_FIRST, RETRY_FIRST));
                }
            }
            Ok(Reset::Large) => self.discard(&path),
            Err(e) => self.unusable(&path, &e),
        }
    }

    /// When `on_timer` has dirty files to try again: a file given back
    /// while still open is emptied soon after its last reader closes it,
    /// not left holding a closed ticket's bytes until it is taken.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry.map(|(at, _)| at)
    }

    /// Try the dirty files again if it is time.
    pub fn on_timer(&mut self, now: Instant) {
        let Some((at, wait)) = self.retry else { return };
        if at > now {
            return;
        }
        for _ in 0..self.dirty.len() {
            let Some(path) = self.dirty.pop_front() else { break };
            match self.reset(&path) {
                Ok(Reset::Emptied(_)) => self.free.push(path),
                Ok(Reset::Spare(len)) => self.spares.push((path, len)),
                Ok(Reset::Busy) => self.dirty.push_back(path),
                Ok(Reset::Large) => self.discard(&path),
                Err(e) => self.unusable(&path, &e),
            }
        }
        let wait = (wait * 2).min(RETRY_MAX);
        self.retry = (!self.dirty.is_empty()).then_some((now + wait, wait));
    }

    /// A file that must not be reused (it may have other links): removed,
    /// by a child if large.
    pub fn discard(&mut self, path: &Path) {
        let large = fs::symlink_metadata(path).is_ok_and(|m| m.len() >= self.large);
        let removed = match large {
            true => crate::spawn::remove_tree_in_background(path).map(drop).map_err(io::Error::from),
            false => fs::remove_file(path),
        };
        if let Err(e) = removed {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    /// As `give`, but reusable only after the next `settle`.
    pub fn give_after_sync(&mut self, path: &Path) {
        if !self.holds(path) && !self.settling.iter().any(|p| p == path) {
            self.settling.push(path.to_path_buf());
        }
    }

    /// Whether `path` is one of the pool's free files already.
    fn holds(&self, path: &Path) -> bool {
        self.free.iter().chain(self.dirty.iter()).chain(self.spares.iter().map(|(p, _)| p)).any(|p| p == path)
    }

    /// The journal is synced: files given back before are reusable.
    pub fn settle(&mut self) {
        self.sealed = 0;
        for path in std::mem::take(&mut self.settling) {
            self.give(&path);
        }
    }

    /// A journal sync was asked for (it runs elsewhere): the files given
    /// back so far are reusable once it is done (`settle_sealed`); those
    /// given back later wait for the sync after.
    pub fn seal(&mut self) {
        self.sealed = self.settling.len();
    }

    /// The sync asked for at `seal` is done: the files given back before
    /// it are reusable.
    pub fn settle_sealed(&mut self) {
        let sealed: Vec<PathBuf> = self.settling.drain(..std::mem::take(&mut self.sealed)).collect();
        for path in sealed {
            self.give(&path);
        }
    }

    /// Free files (emptied, kept as spares, or waiting for their last
    /// reader).
    pub fn idle(&self) -> usize {
        self.free.len() + self.dirty.len() + self.spares.len()
    }

    /// Large files kept whole for reuse (at most `with_spares`).
    pub fn spares(&self) -> usize {
        self.spares.len()
    }

    /// Empty the file at `path` if no descriptor anywhere but ours is open
    /// on it (the kernel's write-lease rule), and return it open
    /// read-write; a large one is not emptied but kept whole as a spare
    /// if there is room, under the same rule.
    fn reset(&self, path: &Path) -> io::Result<Reset> {
        reset(path, self.large, self.spares.len() < self.max_spares)
    }

    fn is_own(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
            && path.file_name().and_then(|f| f.to_str()).is_some_and(|f| self.is_pool_name(f))
    }

    fn next_name(&mut self) -> PathBuf {
        let path = self.dir.join(format!("{}{}", self.prefix, self.next));
        self.next += 1;
        path
    }

    /// A renaming pool: `path` renamed to a free name nothing has.
    fn rename_to_free(&mut self, path: &Path) -> io::Result<PathBuf> {
        loop {
            let to = self.next_name();
            match rename_noreplace(path, &to) {
                Ok(()) => return Ok(to),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// No lease here (or the file cannot be opened): removed, as files
    /// were before pools.
    fn unusable(&mut self, path: &Path, e: &io::Error) {
        if e.kind() == io::ErrorKind::NotFound {
            return;
        }
        log::debug!("pool: {} cannot be reused ({e}); removed", path.display());
        let _ = fs::remove_file(path);
    }
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Empty the file at `path` if no descriptor anywhere but ours is open on
/// it (the kernel's write-lease rule), and return it open read-write. A
/// large one is not emptied: with `room` for a spare it is kept whole
/// under the same rule, else removed by a child.
fn reset(path: &Path, large: u64, room: bool) -> io::Result<Reset> {
    use std::os::unix::fs::MetadataExt;
    let f = open_rw(path)?;
    let meta = f.metadata()?;
    if meta.nlink() != 1 {
        // Another name shares it (a link made elsewhere): reusing it would
        // show the next job's bytes there. Never reused.
        return Err(io::Error::other("it has other links"));
    }
    let len = meta.len();
    if len >= large && !room {
        return Ok(Reset::Large);
    }
    // SAFETY: fcntl on a descriptor we own; F_SETLEASE takes an int.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EBUSY) => Ok(Reset::Busy),
            _ => Err(e),
        };
    }
    if len >= large {
        // Nobody holds it: kept whole, written over by its next taker.
        // SAFETY: as above; drops the lease.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Ok(Reset::Spare(len));
    }
    let emptied = f.set_len(0);
    // SAFETY: as above; drops the lease.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    emptied.map(|()| Reset::Emptied(f))
}

/// rename(2) that never replaces an existing `to`. The system call itself:
/// nix wraps renameat2 only for glibc, and the `cloud` client program is
/// also built for musl (README, "The client program and musl").
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both paths are NUL-terminated and outlive the call, which
    // only reads them; the flags are renameat2's own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn inode(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn a_given_back_file_is_taken_again_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        let (mut f, a) = pool.take().unwrap();
        f.write_all(b"secret of job 1").unwrap();
        drop(f);
        let ino = inode(&a);
        pool.give(&a);
        let (mut f, b) = pool.take().unwrap();
        assert_eq!((&b, inode(&b)), (&a, ino), "the same file, not a new one");
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "", "emptied");
        assert_eq!(pool.created, 1);
    }

    /// A clean stop sweeps the directory again: a file the pool lists is
    /// left alone even when the pool is full (it was removed while still
    /// listed, and a later take found it gone).
    #[test]
    fn a_full_pool_sweeping_its_own_files_again_removes_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        for i in 0..KEEP {
            let path = dir.path().join(format!("p-{i}"));
            fs::write(&path, b"").unwrap();
            pool.adopt(&path);
        }
        assert_eq!(pool.idle(), KEEP);
        for i in 0..KEEP {
            pool.adopt(&dir.path().join(format!("p-{i}")));
        }
        let left = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, KEEP, "every listed file is still there");
        // Beyond KEEP, a file of its own is still removed.
        let extra = dir.path().join("p-9999");
        fs::write(&extra, b"").unwrap();
        pool.adopt(&extra);
        assert!(!extra.exists(), "removed: the pool is full");
    }

    #[test]
    fn a_file_still_open_elsewhere_is_not_reused_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        let (mut f, a) = pool.take().unwrap();
        f.write_all(b"output being sent").unwrap();
        drop(f);
        // A reply still streaming it.
        let mut reader = File::open(&a).unwrap();
        pool.give(&a);
        let (_, b) = pool.take().unwrap();
        assert_ne!(a, b, "busy: a new file instead");
        let mut s = String::new();
        reader.read_to_string(&mut s).unwrap();
        assert_eq!(s, "output being sent", "the reader's bytes are intact");
        drop(reader);
        let (mut f, c) = pool.take().unwrap();
        assert_eq!(c, a, "reused once closed");
        assert_eq!(f.seek(io::SeekFrom::End(0)).unwrap(), 0);
    }

    #[test]
    fn a_renaming_pool_names_files_by_use_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "free-", true, 1 << 20);
        let out = dir.path().join("7.out");
        let mut f = pool.take_as(&out).unwrap();
        f.write_all(b"x").unwrap();
        drop(f);
        let ino = inode(&out);
        pool.give(&out);
        assert!(!out.exists());
        let again = dir.path().join("8.out");
        pool.take_as(&again).unwrap();
        assert_eq!(inode(&again), ino);
        assert_eq!(fs::metadata(&again).unwrap().len(), 0);
        // Never over an existing name.
        fs::write(dir.path().join("9.out"), "kept").unwrap();
        assert!(pool.take_as(&dir.path().join("9.out")).is_err());
        assert_eq!(fs::read_to_string(dir.path().join("9.out")).unwrap(), "kept");
    }

    #[test]
    fn a_busy_file_is_emptied_by_the_timer_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        let (mut f, a) = pool.take().unwrap();
        f.write_all(b"bytes of a closed ticket").unwrap();
        pool.give(&a);
        let at = pool.retry_at().expect("a retry is due");
        pool.on_timer(at);
        assert!(fs::metadata(&a).unwrap().len() > 0, "still open: kept");
        let later = pool.retry_at().expect("tried again later");
        assert!(later > at);
        drop(f);
        pool.on_timer(later);
        assert_eq!(fs::metadata(&a).unwrap().len(), 0);
        assert_eq!(pool.retry_at(), None, "nothing left to do: no timer");
    }

    #[test]
    fn a_file_given_back_twice_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        let (_, a) = pool.take().unwrap();
        // A write failed (given back), then the stream ended (again).
        pool.give(&a);
        pool.give(&a);
        pool.give_after_sync(&a);
        pool.settle();
        assert_eq!(pool.idle(), 1);
        let (_, b) = pool.take().unwrap();
        let (_, c) = pool.take().unwrap();
        assert_eq!(b, a);
        assert_ne!(c, a, "two uploads never share one file");
    }

    #[test]
    fn a_file_with_another_link_is_removed_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        let (mut f, a) = pool.take().unwrap();
        f.write_all(b"archive of job 1").unwrap();
        drop(f);
        let elsewhere = dir.path().join("linked");
        fs::hard_link(&a, &elsewhere).unwrap();
        pool.give(&a);
        assert!(!a.exists(), "our name goes");
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "archive of job 1", "the other name keeps its bytes");
        let (mut f, b) = pool.take().unwrap();
        assert_ne!(b, a);
        f.write_all(b"job 2").unwrap();
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "archive of job 1");
    }

    #[test]
    fn files_given_after_a_sync_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        let (_, a) = pool.take().unwrap();
        pool.give_after_sync(&a);
        let (_, b) = pool.take().unwrap();
        assert_ne!(a, b);
        pool.settle();
        assert_eq!(pool.take().unwrap().1, a);
    }

    #[test]
    fn files_given_after_a_sync_was_asked_for_wait_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, LARGE);
        let (_, a) = pool.take().unwrap();
        let (_, b) = pool.take().unwrap();
        pool.give_after_sync(&a);
        pool.seal();
        pool.give_after_sync(&b);
        assert_eq!(pool.idle(), 0);
        pool.settle_sealed();
        assert_eq!(pool.idle(), 1, "only the file given back before the sync was asked for");
        assert_eq!(pool.take().unwrap().1, a);
        pool.settle_sealed();
        assert_eq!(pool.idle(), 0, "nothing sealed: nothing settled");
        pool.seal();
        pool.settle_sealed();
        assert_eq!(pool.take().unwrap().1, b);
    }

    #[test]
    fn a_start_keeps_at_most_keep_free_files() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..KEEP + 3 {
            fs::write(dir.path().join(format!("p-{n}")), "").unwrap();
        }
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        for n in 0..KEEP + 3 {
            pool.adopt(&dir.path().join(format!("p-{n}")));
        }
        assert_eq!(pool.idle(), KEEP);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), KEEP);
    }

    /// A pool whose large files are those of `LARGE_T` bytes or more.
    const LARGE_T: u64 = 4096;

    fn large_pool(dir: &Path) -> Pool {
        Pool::new(dir, "p-", false, LARGE_T).with_spares(SPARES)
    }

    /// A large stream: `n` bytes of `b`, written into a file taken for it.
    fn stream(pool: &mut Pool, n: usize, b: u8) -> (PathBuf, bool) {
        let Taken { mut file, path, spare } = pool.take_for(Some(n as u64)).unwrap();
        file.write_all(&vec![b; n]).unwrap();
        if spare {
            cut(&mut file).unwrap();
        }
        (path, spare)
    }

    fn gone_soon(p: &Path) -> bool {
        // The `rm` child's work: waited for with a deadline.
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        !p.exists()
    }

    #[test]
    fn a_large_file_is_kept_whole_and_written_over_by_a_large_stream() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = large_pool(dir.path());
        let (a, spare) = stream(&mut pool, 6000, b'1');
        assert!(!spare, "nothing to write over yet");
        let ino = inode(&a);
        pool.give(&a);
        assert_eq!(pool.spares(), 1);
        assert_eq!(fs::metadata(&a).unwrap().len(), 6000, "kept whole, not emptied");
        let Taken { mut file, path, spare } = pool.take_for(Some(5000)).unwrap();
        assert!(spare);
        assert_eq!((&path, inode(&path)), (&a, ino), "the same file, not a new one");
        assert_eq!(file.stream_position().unwrap(), 0, "written from its start");
        assert_eq!(file.metadata().unwrap().len(), 6000, "not truncated when taken");
        file.write_all(&[b'2'; 5000]).unwrap();
        cut(&mut file).unwrap();
        drop(file);
        assert_eq!(fs::read(&a).unwrap(), vec![b'2'; 5000], "no byte of the first stream past the second's");
        assert_eq!(pool.created, 1);
        assert_eq!(pool.spares(), 0, "lent out");
    }

    #[test]
    fn the_spare_is_not_taken_by_a_small_stream_nor_one_under_half_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = large_pool(dir.path());
        let (a, _) = stream(&mut pool, 10_000, b'1');
        pool.give(&a);
        let (small, spare) = stream(&mut pool, 100, b's');
        assert!(!spare && small != a, "a small stream gets an empty file");
        let (_, b) = pool.take().unwrap();
        assert!(b != a, "so does an unknown length");
        let (half, spare) = stream(&mut pool, 4999, b'h');
        assert!(!spare && half != a, "cutting 10000 to 4999 would free more than it wrote");
        assert_eq!(pool.spares(), 1);
        assert_eq!(fs::metadata(&a).unwrap().len(), 10_000, "untouched");
        let (c, spare) = stream(&mut pool, 5000, b'c');
        assert!(spare && c == a);
        assert_eq!(fs::read(&a).unwrap(), vec![b'c'; 5000]);
    }

    #[test]
    fn the_spare_is_not_written_over_while_open_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = large_pool(dir.path());
        let (a, _) = stream(&mut pool, 6000, b'1');
        // A reply still sending it, a replica's init still extracting it.
        let mut reader = File::open(&a).unwrap();
        pool.give(&a);
        assert_eq!(pool.spares(), 0);
        let (b, spare) = stream(&mut pool, 6000, b'2');
        assert!(!spare && b != a, "busy: a new file instead");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![b'1'; 6000], "the reader's bytes are intact");
        drop(reader);
        let at = pool.retry_at().expect("tried again");
        pool.on_timer(at);
        assert_eq!(pool.spares(), 1, "closed: kept as the spare");
        assert_eq!(stream(&mut pool, 6000, b'3'), (a, true));
    }

    #[test]
    fn at_most_one_spare_is_kept_the_others_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = large_pool(dir.path());
        let (a, _) = stream(&mut pool, 6000, b'a');
        let (b, _) = stream(&mut pool, 6000, b'b');
        pool.give(&a);
        pool.give(&b);
        assert_eq!(pool.spares(), SPARES);
        assert!(gone_soon(&b), "beyond the bound: removed by a child");
        assert_eq!(stream(&mut pool, 6000, b'c'), (a, true));
    }

    #[test]
    fn a_pool_without_spares_removes_its_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, LARGE_T);
        let (a, _) = stream(&mut pool, 6000, b'a');
        pool.give(&a);
        assert_eq!(pool.spares(), 0);
        assert!(gone_soon(&a), "removed by a child");
    }

    #[test]
    fn a_spare_given_after_a_sync_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = large_pool(dir.path());
        let (a, _) = stream(&mut pool, 6000, b'a');
        pool.give_after_sync(&a);
        let (b, spare) = stream(&mut pool, 6000, b'b');
        assert!(!spare && b != a, "the journal may still name it");
        assert_eq!(fs::read(&a).unwrap(), vec![b'a'; 6000]);
        pool.settle();
        assert_eq!(stream(&mut pool, 6000, b'c'), (a, true));
    }

    #[test]
    fn a_large_file_with_another_link_is_never_a_spare() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = large_pool(dir.path());
        let (a, _) = stream(&mut pool, 6000, b'a');
        let elsewhere = dir.path().join("linked");
        fs::hard_link(&a, &elsewhere).unwrap();
        pool.give(&a);
        assert_eq!(pool.spares(), 0);
        let (b, spare) = stream(&mut pool, 6000, b'b');
        assert!(!spare && b != a);
        assert_eq!(fs::read(&elsewhere).unwrap(), vec![b'a'; 6000]);
    }

    #[test]
    fn a_start_keeps_one_large_file_as_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        for n in 1..=3 {
            fs::write(dir.path().join(format!("p-{n}")), vec![b'0' + n as u8; 6000]).unwrap();
        }
        fs::write(dir.path().join("p-4"), "small").unwrap();
        let mut pool = large_pool(dir.path());
        for n in 1..=4 {
            pool.adopt(&dir.path().join(format!("p-{n}")));
        }
        assert_eq!((pool.spares(), pool.idle()), (1, 2), "one spare, one emptied small file");
        assert!(gone_soon(&dir.path().join("p-2")) && gone_soon(&dir.path().join("p-3")));
        let (a, spare) = stream(&mut pool, 5000, b'n');
        assert_eq!((a.clone(), spare), (dir.path().join("p-1"), true));
        assert_eq!(fs::read(&a).unwrap(), vec![b'n'; 5000]);
    }

    #[test]
    fn a_renaming_pool_lends_its_spare_under_the_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::new(dir.path(), "free-", true, LARGE_T).with_spares(1);
        let one = dir.path().join("1.tar.gz");
        let mut t = pool.take_as_for(&one, Some(6000)).unwrap();
        assert!(!t.spare);
        t.file.write_all(&[b'1'; 6000]).unwrap();
        drop(t);
        let ino = inode(&one);
        pool.give(&one);
        assert_eq!(pool.spares(), 1);
        let two = dir.path().join("2.tar.gz");
        let mut t = pool.take_as_for(&two, Some(4500)).unwrap();
        assert!(t.spare && t.path == two && inode(&two) == ino);
        t.file.write_all(&[b'2'; 4500]).unwrap();
        cut(&mut t.file).unwrap();
        assert_eq!(fs::read(&two).unwrap(), vec![b'2'; 4500]);
    }

    #[test]
    fn adopted_files_continue_the_numbering() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("p-41"), "left by a crash").unwrap();
        let mut pool = Pool::new(dir.path(), "p-", false, 1 << 20);
        pool.adopt(&dir.path().join("p-41"));
        let (_, a) = pool.take().unwrap();
        assert_eq!(a, dir.path().join("p-41"));
        assert_eq!(fs::metadata(&a).unwrap().len(), 0);
        assert_eq!(pool.take().unwrap().1, dir.path().join("p-42"));
    }
}
