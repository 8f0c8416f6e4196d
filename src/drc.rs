//! The duplicate request cache: at-most-once execution for calls that are
//! not idempotent (DEPLOY, CLOSE), as NFS servers keep one. Sans-I/O: time
//! comes in as `now`.
//!
//! Owns: replies already given, keyed by (xid, caller uid, procedure), and
//! the bounds on them (entries and age, oldest evicted first).
//! Must not touch: connections, tickets, what a reply means. The
//! coordinator keeps one: it looks a call up before carrying it out and
//! records the reply it gives.
//!
//! A client that lost its connection retries the call with the same xid on
//! a new connection; the cache answers it with the first reply instead of
//! running it again. Only successful replies are kept: a refused call
//! changed nothing, so running it again is harmless.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Who made a call and which call it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub xid: u32,
    /// The caller's uid; `None` for an anonymous caller.
    pub uid: Option<u32>,
    pub proc_num: u32,
}

/// Default bounds: entries kept, and how long.
pub const MAX_ENTRIES: usize = 4096;
pub const MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct Drc<V> {
    entries: HashMap<Key, (Instant, V)>,
    /// Insertion order, for eviction; stale pairs (replaced keys) are skipped.
    order: VecDeque<(Instant, Key)>,
    max_entries: usize,
    max_age: Duration,
}

impl<V: Clone> Drc<V> {
    pub fn new(max_entries: usize, max_age: Duration) -> Self {
        Drc { entries: HashMap::new(), order: VecDeque::new(), max_entries, max_age }
    }

    /// The reply already given to this call, if it is still remembered.
    pub fn lookup(&mut self, key: &Key, now: Instant) -> Option<V> {
        self.expire(now);
        self.entries.get(key).map(|(_, v)| v.clone())
    }

    /// Remember the reply given to a call.
    pub fn insert(&mut self, key: Key, reply: V, now: Instant) {
        self.expire(now);
        self.entries.insert(key, (now, reply));
        self.order.push_back((now, key));
        while self.entries.len() > self.max_entries {
            self.pop_oldest();
        }
        // Replaced keys leave stale pairs behind; never let them pile up.
        if self.order.len() > 2 * self.max_entries.max(1) {
            let entries = &self.entries;
            self.order.retain(|(at, k)| entries.get(k).is_some_and(|(t, _)| t == at));
        }
    }

    /// Forget a reply (its call's effect was undone).
    pub fn remove(&mut self, key: &Key) {
        self.entries.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.order.front() {
            if now.saturating_duration_since(at) < self.max_age {
                return;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((at, key)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|(t, _)| *t == at) {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(xid: u32, uid: Option<u32>) -> Key {
        Key { xid, uid, proc_num: 1 }
    }

    #[test]
    fn a_retry_gets_the_first_reply() {
        let t0 = Instant::now();
        let mut d = Drc::new(10, MAX_AGE);
        assert_eq!(d.lookup(&key(7, Some(1000)), t0), None);
        d.insert(key(7, Some(1000)), "ticket 3", t0);
        assert_eq!(d.lookup(&key(7, Some(1000)), t0 + Duration::from_secs(5)), Some("ticket 3"));
    }

    #[test]
    fn same_xid_from_another_user_or_procedure_is_another_call() {
        let t0 = Instant::now();
        let mut d = Drc::new(10, MAX_AGE);
        d.insert(key(7, Some(1000)), 1, t0);
        assert_eq!(d.lookup(&key(7, Some(1001)), t0), None);
        assert_eq!(d.lookup(&key(7, None), t0), None);
        assert_eq!(d.lookup(&Key { xid: 7, uid: Some(1000), proc_num: 4 }, t0), None);
    }

    #[test]
    fn entries_expire_with_age() {
        let t0 = Instant::now();
        let mut d = Drc::new(10, Duration::from_secs(60));
        d.insert(key(1, None), 1, t0);
        d.insert(key(2, None), 2, t0 + Duration::from_secs(30));
        assert_eq!(d.lookup(&key(1, None), t0 + Duration::from_secs(59)), Some(1));
        assert_eq!(d.lookup(&key(1, None), t0 + Duration::from_secs(60)), None);
        assert_eq!(d.lookup(&key(2, None), t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn the_oldest_entries_go_first_when_full() {
        let t0 = Instant::now();
        let mut d = Drc::new(3, MAX_AGE);
        for xid in 0..5 {
            d.insert(key(xid, None), xid, t0 + Duration::from_millis(xid.into()));
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.lookup(&key(1, None), t0), None);
        assert_eq!(d.lookup(&key(2, None), t0), Some(2));
        assert_eq!(d.lookup(&key(4, None), t0), Some(4));
    }

    #[test]
    fn replacing_a_key_stays_bounded() {
        let t0 = Instant::now();
        let mut d = Drc::new(2, MAX_AGE);
        for i in 0..1000u32 {
            d.insert(key(1, None), i, t0 + Duration::from_millis(i.into()));
        }
        assert_eq!(d.lookup(&key(1, None), t0), Some(999));
        assert!(d.order.len() <= 4);
    }
}
