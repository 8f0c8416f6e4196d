//! Ticket numbers that are never issued twice, across restarts and crashes.
//!
//! Owns: `<work-dir>/tickets`, which holds a high-water mark: no ticket at
//! or above it has been issued. Numbers are leased in blocks: before the
//! first ticket of a block is issued, the new mark (next + LEASE) is written
//! to a temporary file, fsynced, renamed over `tickets` and the directory
//! fsynced; the tickets of the block then cost no I/O. After a restart
//! with kill -9, numbering continues from the mark, so at most one block
//! is skipped; a clean stop gives the unused rest back (`release`).
//! Must not touch: the job table (the scheduler issues the numbers; the
//! server asks `ensure` before a DEPLOY can take one).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::scheduler::Ticket;

/// Tickets leased per write.
pub const LEASE: u32 = 1024;

#[derive(Debug)]
pub struct TicketStore {
    path: PathBuf,
    /// Tickets below this may be issued without another write.
    limit: Ticket,
}

/// The mark to write so that `next` may be issued, if `limit` does not
/// already cover it.
pub fn lease_needed(next: Ticket, limit: Ticket) -> Option<Ticket> {
    (next >= limit).then(|| next.saturating_add(LEASE))
}

/// Parse the file's text: one decimal number, at least 1.
pub fn parse(text: &str) -> Result<Ticket, String> {
    match text.trim().parse::<Ticket>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected one number, found {:?}", text.chars().take(40).collect::<String>())),
    }
}

impl TicketStore {
    /// Open the counter of `work_dir`; returns the store and the first
    /// ticket this run may issue. A damaged file is an error for the
    /// operator: guessing could reissue a ticket someone still holds.
    pub fn open(work_dir: &Path) -> Result<(TicketStore, Ticket), String> {
        let path = work_dir.join("tickets");
        let next = match fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|e| {
                format!(
                    "the ticket counter {} is damaged ({e}): write into it a number above every ticket ever issued here, then start again",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(e) => return Err(format!("cannot read the ticket counter {}: {e}", path.display())),
        };
        let mut store = TicketStore { path, limit: next };
        store.ensure(next).map_err(|e| format!("cannot write the ticket counter {}: {e}", store.path.display()))?;
        Ok((store, next))
    }

    /// Make sure ticket `next` is covered by a persisted lease.
    pub fn ensure(&mut self, next: Ticket) -> io::Result<()> {
        match lease_needed(next, self.limit) {
            Some(mark) => self.write(mark),
            None => Ok(()),
        }
    }

    /// A clean stop: give back the unused part of the lease, so the next
    /// run continues at `next` instead of skipping to the mark.
    pub fn release(&mut self, next: Ticket) -> io::Result<()> {
        if next < self.limit {
            self.write(next)?;
        }
        Ok(())
    }

    /// Persist `mark` (temp file, fsync, rename, fsync of the directory).
    fn write(&mut self, mark: Ticket) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        // Never through a link planted in the work dir.
        let mut f =
            fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(format!("{mark}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.limit = mark;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_come_in_blocks() {
        assert_eq!(lease_needed(1, 1), Some(1 + LEASE));
        assert_eq!(lease_needed(5, 1025), None);
        assert_eq!(lease_needed(1025, 1025), Some(1025 + LEASE));
        assert_eq!(lease_needed(u32::MAX, 5), Some(u32::MAX));
    }

    #[test]
    fn a_restart_continues_after_every_ticket_issued() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, next) = TicketStore::open(dir.path()).unwrap();
        assert_eq!(next, 1);
        for t in 1..1500 {
            s.ensure(t).unwrap();
        }
        // Crash here: the file holds the last lease's mark.
        let (_, next) = TicketStore::open(dir.path()).unwrap();
        assert!(next >= 1500, "{next}");
        assert_eq!(fs::read_to_string(dir.path().join("tickets")).unwrap().trim(), (next + LEASE).to_string());
    }

    #[test]
    fn a_clean_stop_gives_the_rest_of_the_lease_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = TicketStore::open(dir.path()).unwrap();
        for t in 1..=3 {
            s.ensure(t).unwrap();
        }
        s.release(4).unwrap();
        let (_, next) = TicketStore::open(dir.path()).unwrap();
        assert_eq!(next, 4, "continues where it stopped");
    }

    #[test]
    fn a_damaged_counter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tickets"), "garbage").unwrap();
        let e = TicketStore::open(dir.path()).unwrap_err();
        assert!(e.contains("damaged") && e.contains("write into it a number"), "{e}");
        assert!(parse("0").is_err());
        assert_eq!(parse(" 77\n"), Ok(77));
    }
}
