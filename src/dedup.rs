//! Duplicate suppression for the routers.
//!
//! NNG's REQ resends a request that is slow to answer, and a client retrying
//! after a timeout sends it again: both reach the router as new messages with
//! the same `job_uuid` or `request_id`. The cache answers a duplicate with the
//! first reply, or parks it until that reply exists, so the handler runs once.
//!
//! Memory is bounded twice: a finished entry expires after `ttl`, and past
//! `capacity` finished entries the oldest are evicted first. Entries still
//! waiting for their handler are never evicted; the router's in-flight limit
//! bounds them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to do with a request whose key was just looked up.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<R, W> {
    /// First time seen: run the handler for this waiter, then call
    /// [`DedupCache::complete`].
    New(W),
    /// The same request is running; the waiter is parked until it completes.
    Parked,
    /// Already answered: send this reply to the waiter.
    Answered(R, W),
}

enum Entry<R, W> {
    Running { waiters: Vec<W> },
    Done { reply: R, at: Instant },
}

/// A time- and size-bounded map from request key to reply.
///
/// A key is allocated once, when first admitted, and shared by the map and
/// the eviction queue.
pub struct DedupCache<R, W> {
    entries: HashMap<Arc<str>, Entry<R, W>>,
    finished: VecDeque<(Arc<str>, Instant)>,
    capacity: usize,
    ttl: Duration,
    hits: u64,
}

impl<R: Clone, W> DedupCache<R, W> {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            finished: VecDeque::new(),
            capacity,
            ttl,
            hits: 0,
        }
    }

    /// Look `key` up; park `waiter` if the same request is running.
    pub fn admit(&mut self, key: &str, waiter: W, now: Instant) -> Admission<R, W> {
        self.expire(now);
        match self.entries.get_mut(key) {
            None => {
                self.entries.insert(
                    Arc::from(key),
                    Entry::Running {
                        waiters: Vec::new(),
                    },
                );
                Admission::New(waiter)
            }
            Some(Entry::Running { waiters }) => {
                self.hits += 1;
                waiters.push(waiter);
                Admission::Parked
            }
            Some(Entry::Done { reply, .. }) => {
                self.hits += 1;
                Admission::Answered(reply.clone(), waiter)
            }
        }
    }

    /// Record the reply for `key` and return the waiters parked on it.
    pub fn complete(&mut self, key: &str, reply: R, now: Instant) -> Vec<W> {
        let (shared, waiters) = match self.entries.remove_entry(key) {
            Some((shared, Entry::Running { waiters })) => (shared, waiters),
            Some((shared, Entry::Done { .. })) => (shared, Vec::new()),
            None => (Arc::from(key), Vec::new()),
        };
        if self.capacity > 0 {
            self.entries
                .insert(shared.clone(), Entry::Done { reply, at: now });
            self.finished.push_back((shared, now));
            self.evict_over_capacity();
        }
        waiters
    }

    /// Forget a running `key` without recording a reply, and return the
    /// waiters parked on it: its outcome ("try again") must not answer the
    /// retries still to come.
    pub fn abandon(&mut self, key: &str) -> Vec<W> {
        if !matches!(self.entries.get(key), Some(Entry::Running { .. })) {
            return Vec::new();
        }
        match self.entries.remove(key) {
            Some(Entry::Running { waiters }) => waiters,
            _ => Vec::new(),
        }
    }

    /// Entries held, running and finished.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Duplicates recognised so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, at)) = self.finished.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            self.pop_oldest_finished();
        }
    }

    fn evict_over_capacity(&mut self) {
        while self.finished.len() > self.capacity {
            self.pop_oldest_finished();
        }
    }

    fn pop_oldest_finished(&mut self) {
        let Some((key, at)) = self.finished.pop_front() else {
            return;
        };
        // The key may have been completed again since; remove only the entry
        // this queue position stands for.
        if matches!(self.entries.get(&*key), Some(Entry::Done { at: done_at, .. }) if *done_at == at)
        {
            self.entries.remove(&*key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> DedupCache<&'static str, u32> {
        DedupCache::new(capacity, Duration::from_secs(10))
    }

    #[test]
    fn a_duplicate_of_a_running_request_is_parked_and_released_once() {
        let mut cache = cache(10);
        let now = Instant::now();
        assert_eq!(cache.admit("a", 1, now), Admission::New(1));
        assert_eq!(cache.admit("a", 2, now), Admission::Parked);
        assert_eq!(cache.admit("a", 3, now), Admission::Parked);
        assert_eq!(cache.complete("a", "reply", now), vec![2, 3]);
        assert_eq!(cache.admit("a", 4, now), Admission::Answered("reply", 4));
        assert_eq!(cache.hits(), 3);
    }

    #[test]
    fn finished_entries_expire_after_the_ttl() {
        let mut cache = cache(10);
        let start = Instant::now();
        cache.admit("a", 1, start);
        cache.complete("a", "first", start);
        let later = start + Duration::from_secs(11);
        assert_eq!(cache.admit("a", 2, later), Admission::New(2));
    }

    #[test]
    fn the_oldest_finished_entry_is_evicted_past_capacity() {
        let mut cache = cache(2);
        let now = Instant::now();
        for key in ["a", "b", "c"] {
            cache.admit(key, 0, now);
            cache.complete(key, "r", now);
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.admit("a", 0, now), Admission::New(0));
        assert_eq!(cache.admit("c", 0, now), Admission::Answered("r", 0));
    }

    #[test]
    fn running_entries_are_never_evicted() {
        let mut cache = cache(1);
        let now = Instant::now();
        cache.admit("running", 0, now);
        for key in ["a", "b", "c"] {
            cache.admit(key, 0, now);
            cache.complete(key, "r", now);
        }
        assert_eq!(cache.admit("running", 1, now), Admission::Parked);
    }

    #[test]
    fn an_abandoned_request_releases_its_waiters_and_runs_again_when_retried() {
        let mut cache = cache(10);
        let now = Instant::now();
        assert_eq!(cache.admit("a", 1, now), Admission::New(1));
        assert_eq!(cache.admit("a", 2, now), Admission::Parked);
        assert_eq!(cache.abandon("a"), vec![2]);
        assert_eq!(cache.admit("a", 3, now), Admission::New(3));
    }

    #[test]
    fn abandoning_leaves_a_finished_entry_alone() {
        let mut cache = cache(10);
        let now = Instant::now();
        cache.admit("a", 1, now);
        cache.complete("a", "reply", now);
        assert!(cache.abandon("a").is_empty());
        assert_eq!(cache.admit("a", 2, now), Admission::Answered("reply", 2));
    }

    #[test]
    fn zero_capacity_remembers_nothing_after_completion() {
        let mut cache = cache(0);
        let now = Instant::now();
        cache.admit("a", 0, now);
        cache.complete("a", "r", now);
        assert!(cache.is_empty());
    }
}
