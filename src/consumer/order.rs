//! Per-key order (`order_by = "<field>"`): entries with the same value of the field are
//! handled one at a time, in id order, even across retries.
//!
//! The loop asks [`Order`] before starting an admitted entry. An entry whose key has
//! nothing in flight starts; otherwise it waits in its key's queue (sorted by id, so an
//! older entry that a reclaim brings in late still goes first). A key stays busy from its
//! entry's start until that entry's settlement (ack or dead letter) has *reached Redis*:
//! then, after a crash, the entry that may be handled again is always the newest one its
//! key has seen, never an older one behind a newer.
//!
//! A retry is not parked in Redis (another replica, or this one's reclaim, could then take
//! it while later entries of its key go on here): it is held in this process for its
//! backoff with its key still busy, and kept pending on this consumer, its idle time
//! refreshed and its delivery count kept up to date (`Client::touch`), so nobody reclaims
//! it.
//!
//! Entries without the field have no key: they are handled like in any group.
//!
//! On start an ordered group first takes over the whole pending list of its group (any
//! idle time, in id order) before reading anything new, so entries a killed replica left
//! pending go before newer entries of their keys. That is why an ordered stream (or
//! partition) must have one replica reading it at a time (README, docs/partitions.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use streamworker_handlers::{Entry, EntryId, Ordering};
use tokio::time::Instant;

/// An entry and its consumer span.
pub(super) type Started = (Entry, tracing::Span);

pub(super) struct Order {
    ordering: Ordering,
    /// Every entry this loop holds (running, waiting, held for a retry, settled but not
    /// yet told Redis), with its key: a reclaim or resync bringing one again is dropped.
    keys: HashMap<EntryId, Option<Vec<u8>>>,
    /// Keys with an entry in flight, and the entries of the key waiting behind it.
    busy: HashMap<Vec<u8>, BTreeMap<EntryId, Started>>,
    waiting: usize,
    /// Retries held for their backoff: when due, the entry (its delivery count already the
    /// next delivery's).
    held: Vec<(Instant, Entry)>,
    /// Settled entries whose settlement is not yet known to have reached Redis.
    settling: HashSet<EntryId>,
    /// Entries free to start now (their key's turn came, or their retry is due).
    ready: Vec<Started>,
    /// Until the first pass over the group's pending list is done, nothing new is read.
    pub(super) takeover: bool,
    pub(super) touch_at: Instant,
    /// How many entries may wait (plus be held) before reading stops.
    cap: usize,
}

impl Order {
    pub(super) fn new(ordering: Ordering, cap: usize, now: Instant) -> Self {
        Self {
            ordering,
            keys: HashMap::new(),
            busy: HashMap::new(),
            waiting: 0,
            held: Vec::new(),
            settling: HashSet::new(),
            ready: Vec::new(),
            takeover: true,
            touch_at: now,
            cap,
        }
    }

    /// Whether this entry is already held here (a duplicate delivery by a reclaim or a
    /// resync of this consumer's own pending list).
    pub(super) fn holds(&self, id: EntryId) -> bool {
        self.keys.contains_key(&id)
    }

    /// An admitted entry: returned when it may start now, else queued behind its key.
    pub(super) fn admit(&mut self, entry: Entry, span: tracing::Span) -> Option<Started> {
        // The key is the field's value (looked up as every handler does, so a JSON
        // payload's key works too), or the partition that value falls in.
        let key = entry
            .get(&self.ordering.field)
            .map(|value| match self.ordering.partitions {
                Some(n) => streamworker_handlers::partition_of(value.as_bytes(), n)
                    .to_be_bytes()
                    .to_vec(),
                None => value.as_bytes().to_vec(),
            });
        self.keys.insert(entry.id, key.clone());
        let Some(key) = key else {
            return Some((entry, span));
        };
        match self.busy.get_mut(&key) {
            Some(queue) => {
                queue.insert(entry.id, (entry, span));
                self.waiting += 1;
                None
            }
            None => {
                self.busy.insert(key, BTreeMap::new());
                Some((entry, span))
            }
        }
    }

    /// A retry to run again after `after`, its key kept busy.
    pub(super) fn hold(&mut self, entry: Entry, after: Duration, now: Instant) {
        self.held.push((now + after, entry));
    }

    /// The entry's fate is final (acked, dropped, dead-lettered): its key is released once
    /// Redis has it ([`Order::flushed`]).
    pub(super) fn settled(&mut self, id: EntryId) {
        if self.keys.contains_key(&id) {
            self.settling.insert(id);
        }
    }

    /// A flush came back; `unsent` are the entries whose settlements still wait. The keys
    /// of all other settled entries pass to their next entry.
    pub(super) fn flushed(&mut self, unsent: &HashSet<EntryId>) {
        let done: Vec<EntryId> = self
            .settling
            .iter()
            .filter(|id| !unsent.contains(id))
            .copied()
            .collect();
        for id in done {
            self.settling.remove(&id);
            if let Some(Some(key)) = self.keys.remove(&id) {
                self.release(key);
            }
        }
    }

    /// An entry handed back at shutdown: forgotten (its key does not pass on; the loop is
    /// draining).
    pub(super) fn forget(&mut self, id: EntryId) {
        self.keys.remove(&id);
    }

    fn release(&mut self, key: Vec<u8>) {
        let Some(queue) = self.busy.get_mut(&key) else {
            return;
        };
        match queue.pop_first() {
            Some((_, next)) => {
                self.waiting -= 1;
                self.ready.push(next);
            }
            None => {
                self.busy.remove(&key);
            }
        }
    }

    /// Entries that may start now: keys whose turn came, and retries that are due (only
    /// when `retries` allows, e.g. not while the circuit is open).
    /// At most `slots` of them (the handler slots free); the rest stay ready.
    pub(super) fn take_ready(&mut self, now: Instant, retries: bool, slots: usize) -> Vec<Started> {
        if retries && self.held.iter().any(|(at, _)| *at <= now) {
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            self.held = later;
            self.ready
                .extend(due.into_iter().map(|(_, e)| (e, tracing::Span::none())));
        }
        let rest = self.ready.split_off(slots.min(self.ready.len()));
        std::mem::replace(&mut self.ready, rest)
    }

    /// Entries ready to start but waiting for a handler slot.
    pub(super) fn ready(&self) -> usize {
        self.ready.len()
    }

    /// When the next held retry is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.held.iter().map(|(at, _)| *at).min()
    }

    /// Everything not started, for shutdown: waiting entries (their delivery given back)
    /// and held retries (their next delivery given back).
    pub(super) fn drain(&mut self) -> Vec<(EntryId, u64)> {
        let mut out: Vec<(EntryId, u64)> = Vec::new();
        for queue in self.busy.values_mut() {
            out.extend(
                std::mem::take(queue)
                    .into_values()
                    .map(|(e, _)| (e.id, e.delivery_count)),
            );
        }
        self.waiting = 0;
        out.extend(
            std::mem::take(&mut self.held)
                .into_iter()
                .map(|(_, e)| (e.id, e.delivery_count)),
        );
        out.extend(
            std::mem::take(&mut self.ready)
                .into_iter()
                .map(|(e, _)| (e.id, e.delivery_count)),
        );
        for (id, _) in &out {
            self.keys.remove(id);
        }
        out
    }

    /// Whether the queues are full: reading waits until keys move on.
    pub(super) fn full(&self) -> bool {
        !self.takeover && self.waiting + self.held.len() >= self.cap
    }

    /// Entries waiting or held here, with the delivery count Redis should show (held
    /// retries: the deliveries made so far), to keep them pending on this consumer.
    pub(super) fn idle_entries(&self) -> Vec<(EntryId, Option<u64>)> {
        let waiting = self
            .busy
            .values()
            .flat_map(|q| q.keys().map(|id| (*id, None)));
        let held = self
            .held
            .iter()
            .map(|(_, e)| (e.id, Some(e.delivery_count.saturating_sub(1).max(1))));
        waiting.chain(held).collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting == 0 && self.held.is_empty() && self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use streamworker_handlers::Origin;

    use super::*;

    fn entry(ms: u64, key: Option<&str>) -> Entry {
        let origin = Arc::new(Origin {
            stream: "s".into(),
            group: "g".into(),
            consumer: "c".into(),
        });
        let fields = key
            .map(|k| vec![(b"k".to_vec(), k.as_bytes().to_vec())])
            .unwrap_or_default();
        Entry::new(origin, EntryId { ms, seq: 0 }, 1, fields)
    }

    fn by(field: &str) -> Ordering {
        Ordering {
            field: field.into(),
            partitions: None,
        }
    }

    fn ids(started: &[Started]) -> Vec<u64> {
        started.iter().map(|(e, _)| e.id.ms).collect()
    }

    #[test]
    fn a_key_runs_one_entry_at_a_time_in_id_order_and_passes_on_when_redis_has_it() {
        let now = Instant::now();
        let mut o = Order::new(by("k"), 10, now);
        o.takeover = false;
        let none = tracing::Span::none;
        assert!(o.admit(entry(1, Some("a")), none()).is_some());
        assert!(o.admit(entry(3, Some("a")), none()).is_none());
        assert!(o.admit(entry(4, Some("b")), none()).is_some());
        assert!(
            o.admit(entry(5, None), none()).is_some(),
            "no key: no order"
        );
        // A late older entry (a reclaim) goes before the newer one already waiting.
        assert!(o.admit(entry(2, Some("a")), none()).is_none());
        assert!(o.holds(EntryId { ms: 3, seq: 0 }));

        // Entry 1 fails: held for its backoff, key a still busy.
        o.hold(entry(1, Some("a")), Duration::from_secs(1), now);
        assert!(o.take_ready(now, true, 10).is_empty());
        assert_eq!(o.next_due(), Some(now + Duration::from_secs(1)));
        assert_eq!(o.idle_entries().len(), 3);
        let later = now + Duration::from_secs(1);
        assert!(
            o.take_ready(later, false, 10).is_empty(),
            "not while retries wait"
        );
        assert_eq!(ids(&o.take_ready(later, true, 10)), [1]);

        // Acked, but not yet flushed: key a stays busy.
        o.settled(EntryId { ms: 1, seq: 0 });
        let unsent: HashSet<EntryId> = [EntryId { ms: 1, seq: 0 }].into();
        o.flushed(&unsent);
        assert!(o.take_ready(later, true, 10).is_empty());
        o.flushed(&HashSet::new());
        assert_eq!(ids(&o.take_ready(later, true, 10)), [2]);
        o.settled(EntryId { ms: 2, seq: 0 });
        o.flushed(&HashSet::new());
        assert_eq!(ids(&o.take_ready(later, true, 10)), [3]);
        assert!(!o.holds(EntryId { ms: 1, seq: 0 }));
        assert!(o.is_empty());
    }

    #[test]
    fn queues_fill_up_and_drain_hands_everything_back() {
        let now = Instant::now();
        let mut o = Order::new(by("k"), 2, now);
        let none = tracing::Span::none;
        o.admit(entry(1, Some("a")), none());
        o.admit(entry(2, Some("a")), none());
        o.admit(entry(3, Some("a")), none());
        assert!(!o.full(), "no bound while taking over the pending list");
        o.takeover = false;
        assert!(o.full());
        let mut retry = entry(1, Some("a"));
        retry.delivery_count = 2;
        o.hold(retry, Duration::from_secs(5), now);
        let mut back = o.drain();
        back.sort();
        assert_eq!(
            back,
            [
                (EntryId { ms: 1, seq: 0 }, 2),
                (EntryId { ms: 2, seq: 0 }, 1),
                (EntryId { ms: 3, seq: 0 }, 1)
            ]
        );
        assert!(o.is_empty() && !o.full());
    }
}
