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
//! Kept small, as thousands of idle clients may be held: 32 bytes a
//! connection in a vector by key, idle ones linked in deadline order.
//! Must not touch: sockets, the poll, what a call means. The reactor says
//! what phase a connection is in and how many bytes moved; it asks here
//! for the next deadline and for what is due.

use std::collections::BTreeSet;
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

/// No neighbour in the idle list.
const NIL: u32 = u32::MAX;

/// One client connection's timer: 32 bytes, kept in a vector by key (keys
/// are the reactor's slab keys, dense), so that 10,000 idle connections
/// cost 320 KB here, not a hash map and a tree of their deadlines.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The deadline (`Idle`, `Reading`, `Writing`), or since when a reply
    /// is owed (`Owed`, which has no deadline).
    at: Instant,
    /// Neighbours in the idle list (keys), `NIL` at its ends.
    prev: u32,
    next: u32,
    /// Bytes moved since the deadline was last set (saturating).
    moved: u32,
    phase: Phase,
}

/// Deadlines of every client connection, by key.
///
/// Idle connections, nearly all of them when many are held, are a doubly
/// linked list through the entries in deadline order (every idle deadline
/// is `now + idle_timeout`, so a new one goes at the tail): the head is
/// idle the longest and due first. Connections reading, writing or owed a
/// reply are few and live in ordered sets.
#[derive(Debug)]
pub struct ConnTimers {
    idle_timeout: Duration,
    call_timeout: Duration,
    entries: Vec<Option<Entry>>,
    /// Connections tracked.
    count: usize,
    /// The idle list: the connection idle the longest, and the freshest.
    head: u32,
    tail: u32,
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
            entries: Vec::new(),
            count: 0,
            head: NIL,
            tail: NIL,
            busy: BTreeSet::new(),
            owed: BTreeSet::new(),
        }
    }

    /// Client connections tracked.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn get(&self, key: u32) -> Option<&Entry> {
        self.entries.get(key as usize).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, key: u32) -> Option<&mut Entry> {
        self.entries.get_mut(key as usize).and_then(Option::as_mut)
    }

    /// A new client connection: idle from `now`.
    pub fn add(&mut self, key: usize, now: Instant) {
        self.remove(key);
        // Slab keys are below the descriptor limit: one that is not is
        // never timed (it cannot happen).
        let Ok(k) = u32::try_from(key) else { return };
        if k == NIL {
            return;
        }
        if key >= self.entries.len() {
            // Grow by an eighth rather than doubling (see `Entry`).
            let more = (key + 1 - self.entries.len()).max(self.entries.len() / 8);
            self.entries.reserve_exact(more);
            self.entries.resize(key + 1, None);
        }
        let deadline = now + self.idle_timeout;
        self.entries[key] = Some(Entry { at: deadline, prev: NIL, next: NIL, moved: 0, phase: Phase::Idle });
        self.count += 1;
        self.link_idle(k);
    }

    /// The connection is gone.
    pub fn remove(&mut self, key: usize) {
        let Ok(k) = u32::try_from(key) else { return };
        let Some(e) = self.get(k).copied() else { return };
        self.unlist(k, &e);
        self.entries[key] = None;
        self.count -= 1;
    }

    /// Put `k` (idle, its deadline set) in the idle list, in deadline
    /// order: from the tail, where a fresh deadline belongs.
    fn link_idle(&mut self, k: u32) {
        let Some(at) = self.get(k).map(|e| e.at) else { return };
        let mut after = self.tail;
        while let Some(a) = self.get(after) {
            if a.at <= at {
                break;
            }
            after = a.prev;
        }
        let before = match self.get(after) {
            Some(a) => a.next,
            None => self.head,
        };
        if let Some(e) = self.get_mut(k) {
            e.prev = after;
            e.next = before;
        }
        match self.get_mut(after) {
            Some(a) => a.next = k,
            None => self.head = k,
        }
        match self.get_mut(before) {
            Some(b) => b.prev = k,
            None => self.tail = k,
        }
    }

    fn unlink_idle(&mut self, k: u32, e: &Entry) {
        match self.get_mut(e.prev) {
            Some(p) => p.next = e.next,
            None => self.head = e.next,
        }
        match self.get_mut(e.next) {
            Some(n) => n.prev = e.prev,
            None => self.tail = e.prev,
        }
        if let Some(me) = self.get_mut(k) {
            me.prev = NIL;
            me.next = NIL;
        }
    }

    fn unlist(&mut self, k: u32, e: &Entry) {
        match e.phase {
            Phase::Idle => self.unlink_idle(k, e),
            Phase::Owed => {
                self.owed.remove(&(e.at, k as usize));
            }
            Phase::Reading | Phase::Writing => {
                self.busy.remove(&(e.at, k as usize));
            }
        }
    }

    /// The connection is now in `phase`, having moved `moved` bytes (read
    /// or written) since the last update. A phase change starts its timeout
    /// afresh; within `Reading`/`Writing` the deadline moves forward once
    /// `PROGRESS_BYTES` more have moved; an `Idle` connection that moved
    /// bytes completed a call, so its idle time starts again.
    pub fn update(&mut self, key: usize, phase: Phase, moved: u64, now: Instant) {
        let Ok(k) = u32::try_from(key) else { return };
        let Some(mut e) = self.get(k).copied() else { return };
        let restart = if e.phase != phase {
            true
        } else {
            e.moved = e.moved.saturating_add(u32::try_from(moved).unwrap_or(u32::MAX));
            match phase {
                Phase::Idle => moved > 0,
                Phase::Reading | Phase::Writing => u64::from(e.moved) >= PROGRESS_BYTES,
                Phase::Owed => false,
            }
        };
        if !restart {
            // Same phase, same deadline: it keeps its place.
            if let Some(me) = self.get_mut(k) {
                me.moved = e.moved;
            }
            return;
        }
        self.unlist(k, &e);
        e.moved = 0;
        e.prev = NIL;
        e.next = NIL;
        e.phase = phase;
        e.at = match phase {
            Phase::Idle => now + self.idle_timeout,
            Phase::Reading | Phase::Writing => now + self.call_timeout,
            Phase::Owed => now,
        };
        self.entries[key] = Some(e);
        match phase {
            Phase::Idle => self.link_idle(k),
            Phase::Owed => {
                self.owed.insert((e.at, key));
            }
            Phase::Reading | Phase::Writing => {
                self.busy.insert((e.at, key));
            }
        }
    }

    /// The earliest deadline, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        let a = self.get(self.head).map(|e| e.at);
        let b = self.busy.first().map(|&(d, _)| d);
        a.into_iter().chain(b).min()
    }

    /// Connections whose deadline has passed, with the phase they timed out
    /// in; they are forgotten here (the caller closes them).
    pub fn expired(&mut self, now: Instant) -> Vec<(usize, Phase)> {
        let mut due = Vec::new();
        let mut k = self.head;
        while let Some(e) = self.get(k) {
            if e.at > now {
                break;
            }
            due.push(k as usize);
            k = e.next;
        }
        due.extend(self.busy.iter().take_while(|&&(d, _)| d <= now).map(|&(_, k)| k));
        due.into_iter()
            .filter_map(|k| {
                let phase = self.get(u32::try_from(k).ok()?)?.phase;
                self.remove(k);
                Some((k, phase))
            })
            .collect()
    }

    /// The connection idle the longest, if any is idle.
    pub fn oldest_idle(&self) -> Option<usize> {
        self.get(self.head).map(|_| self.head as usize)
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

    /// 10,000 idle connections cost 32 bytes each here (a spare eighth of
    /// the vector at most), not a hash map entry and a tree node.
    #[test]
    fn a_connections_timer_is_32_bytes() {
        assert!(std::mem::size_of::<Option<Entry>>() <= 32, "{}", std::mem::size_of::<Option<Entry>>());
        let (mut t, t0) = timers();
        for k in 0..10_000 {
            t.add(k, t0);
        }
        assert!(t.entries.capacity() <= 10_000 + 10_000 / 8, "capacity {}", t.entries.capacity());
    }

    /// The timers as they were (a map of entries, ordered sets of
    /// deadlines): what the linked list must agree with.
    #[derive(Default)]
    struct Model {
        entries: std::collections::HashMap<usize, (Phase, Option<Instant>, u64, Option<Instant>)>,
    }

    impl Model {
        fn update(&mut self, key: usize, phase: Phase, moved: u64, now: Instant) {
            let Some(e) = self.entries.get_mut(&key) else { return };
            let restart = if e.0 != phase {
                e.2 = 0;
                true
            } else {
                e.2 += moved;
                match phase {
                    Phase::Idle => moved > 0,
                    Phase::Reading | Phase::Writing => e.2 >= PROGRESS_BYTES,
                    Phase::Owed => false,
                }
            };
            if restart {
                e.2 = 0;
                e.3 = (phase == Phase::Owed).then_some(now);
                e.1 = match phase {
                    Phase::Idle => Some(now + s(300)),
                    Phase::Reading | Phase::Writing => Some(now + s(30)),
                    Phase::Owed => None,
                };
            }
            e.0 = phase;
        }

        fn first(&self, phase: Phase) -> Option<Instant> {
            self.entries.values().filter(|e| e.0 == phase).filter_map(|e| e.1.or(e.3)).min()
        }
    }

    proptest::proptest! {
        /// Any sequence of adds, removes, updates and expiries (time only
        /// going forward, as `Instant::now()` does) gives the same answers
        /// as the map and sets did; ties between equal deadlines may come
        /// out in another order.
        #[test]
        fn the_idle_list_agrees_with_ordered_sets(
            ops in proptest::collection::vec((0u8..6, 0usize..12, 0u8..4, 0u64..100_000, 0u64..200), 1..200),
        ) {
            let (mut t, t0) = timers();
            let mut m = Model::default();
            let mut now = t0;
            for (op, key, phase, moved, step) in ops {
                now += Duration::from_millis(step * 1000 / 7);
                let phase = [Phase::Idle, Phase::Reading, Phase::Writing, Phase::Owed][phase as usize];
                match op {
                    0 => {
                        t.add(key, now);
                        m.entries.insert(key, (Phase::Idle, Some(now + s(300)), 0, None));
                    }
                    1 => {
                        t.remove(key);
                        m.entries.remove(&key);
                    }
                    5 => {
                        let mut got = t.expired(now);
                        let mut want: Vec<(usize, Phase)> = m
                            .entries
                            .iter()
                            .filter(|(_, e)| e.1.is_some_and(|d| d <= now))
                            .map(|(&k, e)| (k, e.0))
                            .collect();
                        got.sort_by_key(|&(k, _)| k);
                        want.sort_by_key(|&(k, _)| k);
                        proptest::prop_assert_eq!(&got, &want);
                        for (k, _) in want {
                            m.entries.remove(&k);
                        }
                    }
                    _ => {
                        t.update(key, phase, moved, now);
                        m.update(key, phase, moved, now);
                    }
                }
                proptest::prop_assert_eq!(t.len(), m.entries.len());
                let busy = m.first(Phase::Reading).into_iter().chain(m.first(Phase::Writing));
                proptest::prop_assert_eq!(t.next_deadline(), m.first(Phase::Idle).into_iter().chain(busy).min());
                let oldest = t.oldest_idle().map(|k| m.entries[&k]);
                proptest::prop_assert_eq!(oldest.map(|e| e.0), m.first(Phase::Idle).map(|_| Phase::Idle));
                proptest::prop_assert_eq!(oldest.and_then(|e| e.1), m.first(Phase::Idle));
                let owed = t.oldest_owed().map(|k| m.entries[&k]);
                proptest::prop_assert_eq!(owed.and_then(|e| e.3), m.first(Phase::Owed));
            }
        }
    }
}
