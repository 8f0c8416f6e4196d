//! Client connection timeouts, sans-I/O: connection phases and byte counts
//! in, deadlines and the connections to close out; unit-tested with a
//! virtual clock (time only ever comes in as `now`).
//!
//! Owns: one deadline per client connection, by phase: `Idle` (no call in
//! progress, no reply owed) closes after `--idle-timeout`; `Reading` (a call
//! partly received) and `Writing` (our reply not yet taken by the peer)
//! close after `--call-timeout` without progress, where progress is at least
//! `PROGRESS_BYTES` more moved; `Owed` (the server owes a deferred reply,
//! e.g. RETRIEVE with wait) has no deadline. Also which idle connection has
//! been idle the longest (evicted first when `--max-connections` is hit).
//! Must not touch: sockets, the poll, what a call means. The reactor says
//! what phase a connection is in and how many bytes moved; it asks here
//! for the next deadline and for what is due.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Bytes a call (or our reply) must move to earn a fresh call timeout.
pub const PROGRESS_BYTES: u64 = 64 * 1024;

/// What a client connection is doing, as far as timeouts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Between calls: nothing read of a next call, nothing owed.
    Idle,
    /// A call is partly received.
    Reading,
    /// A reply is queued and the peer is not taking it.
    Writing,
    /// The server owes a reply it has not produced yet: no deadline.
    Owed,
}

#[derive(Debug)]
struct Entry {
    phase: Phase,
    deadline: Option<Instant>,
    /// Bytes moved since the deadline was last set.
    moved: u64,
    /// Since when it is owed a reply (phase `Owed`).
    owed_since: Option<Instant>,
}

/// Deadlines of every client connection, by key.
#[derive(Debug)]
pub struct ConnTimers {
    idle_timeout: Duration,
    call_timeout: Duration,
    entries: HashMap<usize, Entry>,
    /// Deadlines of idle connections: the first is idle the longest.
    idle: BTreeSet<(Instant, usize)>,
    /// Deadlines of reading and writing connections.
    busy: BTreeSet<(Instant, usize)>,
    /// Connections owed a deferred reply, oldest first (no deadline; when
    /// no connection is idle, the oldest makes room for a new client).
    owed: BTreeSet<(Instant, usize)>,
}

impl ConnTimers {
    pub fn new(idle_timeout: Duration, call_timeout: Duration) -> Self {
        ConnTimers {
            idle_timeout,
            call_timeout,
            entries: HashMap::new(),
            idle: BTreeSet::new(),
            busy: BTreeSet::new(),
            owed: BTreeSet::new(),
        }
    }

    /// Client connections tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A new client connection: idle from `now`.
    pub fn add(&mut self, key: usize, now: Instant) {
        self.remove(key);
        let deadline = now + self.idle_timeout;
        self.idle.insert((deadline, key));
        self.entries.insert(key, Entry { phase: Phase::Idle, deadline: Some(deadline), moved: 0, owed_since: None });
    }

    /// The connection is gone.
    pub fn remove(&mut self, key: usize) {
        if let Some(e) = self.entries.remove(&key) {
            self.unlist(key, &e);
        }
    }

    fn unlist(&mut self, key: usize, e: &Entry) {
        if let (Phase::Owed, Some(t)) = (e.phase, e.owed_since) {
            self.owed.remove(&(t, key));
        }
        if let Some(d) = e.deadline {
            match e.phase {
                Phase::Idle => self.idle.remove(&(d, key)),
                _ => self.busy.remove(&(d, key)),
            };
        }
    }

    /// The connection is now in `phase`, having moved `moved` bytes (read
    /// or written) since the last update. A phase change starts its timeout
    /// afresh; within `Reading`/`Writing` the deadline moves forward once
    /// `PROGRESS_BYTES` more have moved; an `Idle` connection that moved
    /// bytes completed a call, so its idle time starts again.
    pub fn update(&mut self, key: usize, phase: Phase, moved: u64, now: Instant) {
        let Some(mut e) = self.entries.remove(&key) else { return };
        self.unlist(key, &e);
        let restart = if e.phase != phase {
            e.moved = 0;
            true
        } else {
            e.moved += moved;
            match phase {
                Phase::Idle => moved > 0,
                Phase::Reading | Phase::Writing => e.moved >= PROGRESS_BYTES,
                Phase::Owed => false,
            }
        };
        if restart {
            e.moved = 0;
            e.owed_since = (phase == Phase::Owed).then_some(now);
            e.deadline = match phase {
                Phase::Idle => Some(now + self.idle_timeout),
                Phase::Reading | Phase::Writing => Some(now + self.call_timeout),
                Phase::Owed => None,
            };
        }
        e.phase = phase;
        if let (Phase::Owed, Some(t)) = (phase, e.owed_since) {
            self.owed.insert((t, key));
        }
        if let Some(d) = e.deadline {
            match phase {
                Phase::Idle => self.idle.insert((d, key)),
                _ => self.busy.insert((d, key)),
            };
        }
        self.entries.insert(key, e);
    }

    /// The earliest deadline, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        let a = self.idle.first().map(|&(d, _)| d);
        let b = self.busy.first().map(|&(d, _)| d);
        a.into_iter().chain(b).min()
    }

    /// Connections whose deadline has passed, with the phase they timed out
    /// in; they are forgotten here (the caller closes them).
    pub fn expired(&mut self, now: Instant) -> Vec<(usize, Phase)> {
        let mut due = Vec::new();
        for set in [&self.idle, &self.busy] {
            due.extend(set.iter().take_while(|&&(d, _)| d <= now).map(|&(_, k)| k));
        }
        due.into_iter()
            .filter_map(|k| {
                let phase = self.entries.get(&k)?.phase;
                self.remove(k);
                Some((k, phase))
            })
            .collect()
    }

    /// The connection idle the longest, if any is idle.
    pub fn oldest_idle(&self) -> Option<usize> {
        self.idle.first().map(|&(_, k)| k)
    }

    /// The connection owed a deferred reply the longest, if any.
    pub fn oldest_owed(&self) -> Option<usize> {
        self.owed.first().map(|&(_, k)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers() -> (ConnTimers, Instant) {
        (ConnTimers::new(Duration::from_secs(300), Duration::from_secs(30)), Instant::now())
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn an_idle_connection_expires_after_the_idle_timeout_and_a_call_restarts_it() {
        let (mut t, t0) = timers();
        t.add(1, t0);
        assert_eq!(t.next_deadline(), Some(t0 + s(300)));
        // A whole call read and answered within one turn: still idle, but fresh.
        t.update(1, Phase::Idle, 60, t0 + s(200));
        assert!(t.expired(t0 + s(300)).is_empty());
        assert_eq!(t.expired(t0 + s(500)), vec![(1, Phase::Idle)]);
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn a_slowloris_is_closed_after_the_call_timeout_but_a_real_upload_is_not() {
        let (mut t, t0) = timers();
        t.add(1, t0); // slowloris
        t.add(2, t0); // slow upload
        for sec in 1..=40u64 {
            let now = t0 + s(sec);
            t.update(1, Phase::Reading, 1, now);
            t.update(2, Phase::Reading, 70_000, now);
            let due = t.expired(now);
            if sec < 31 {
                assert!(due.is_empty(), "second {sec}: {due:?}");
            } else {
                assert_eq!(due, vec![(1, Phase::Reading)], "second {sec}");
                break;
            }
        }
        assert_eq!(t.len(), 1, "the upload goes on");
    }

    #[test]
    fn a_peer_that_reads_nothing_is_closed_after_the_call_timeout() {
        let (mut t, t0) = timers();
        t.add(1, t0);
        t.update(1, Phase::Writing, 0, t0 + s(1));
        t.update(1, Phase::Writing, 100, t0 + s(20));
        assert!(t.expired(t0 + s(30)).is_empty());
        assert_eq!(t.expired(t0 + s(31)), vec![(1, Phase::Writing)]);
    }

    #[test]
    fn a_connection_owed_a_reply_never_times_out() {
        let (mut t, t0) = timers();
        t.add(1, t0);
        t.update(1, Phase::Owed, 40, t0 + s(1));
        assert_eq!(t.next_deadline(), None);
        assert!(t.expired(t0 + s(100_000)).is_empty());
        assert_eq!(t.oldest_idle(), None, "not idle either");
        t.update(1, Phase::Idle, 0, t0 + s(100_000));
        assert_eq!(t.next_deadline(), Some(t0 + s(100_300)));
    }

    #[test]
    fn the_oldest_idle_connection_is_evicted_first() {
        let (mut t, t0) = timers();
        t.add(1, t0);
        t.add(2, t0 + s(1));
        t.add(3, t0 + s(2));
        assert_eq!(t.oldest_idle(), Some(1));
        t.update(1, Phase::Idle, 10, t0 + s(3)); // made a call: now the freshest
        assert_eq!(t.oldest_idle(), Some(2));
        t.update(2, Phase::Reading, 0, t0 + s(4)); // mid-call: not idle
        assert_eq!(t.oldest_idle(), Some(3));
        t.remove(3);
        assert_eq!(t.oldest_idle(), Some(1));
    }
}
