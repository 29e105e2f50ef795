//! Which replica runs which partition of a partitioned group.
//!
//! Each partition has a lease ([`crate::keys::partition_lease_key`]) whose value is the
//! consumer name of the replica running it. Every third of a lease lifetime, each replica:
//!
//! 1. heartbeats into the group's members ([`crate::keys::members_key`], `members.lua`),
//!    which also tells it the live replicas;
//! 2. renews the leases it holds (`lease.lua`: renewed only if still its own). A lease
//!    someone else holds now is lost: that partition stops at once. A renewal Redis does
//!    not answer is retried next turn; once less than a third of the lease may be left,
//!    the partition stops reading (fencing), so it stops before anyone can take it over;
//! 3. aims at its fair share of the partitions: with `P` partitions and `M` live replicas
//!    sorted by name, the first `P mod M` replicas run `ceil(P/M)`, the others `floor(P/M)`.
//!    Partitions over the share are released: the partition's loop drains (in-flight work
//!    finishes and is settled), then the lease is deleted if still ours. Free partitions
//!    are taken, up to the share, with `lease.lua` (which takes a lease only when nobody
//!    holds it).
//!
//! Each partition this replica runs is the ordinary consumer loop ([`crate::consumer::run`])
//! on a [`GroupConfig`] whose stream is the partition's (`partition::group_of`), with a
//! shutdown of its own, triggered to release the partition or by the process's shutdown.
//! On shutdown every partition drains, its lease is deleted and the replica leaves the
//! members, so the others take its partitions at their next turn.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::client::Client;
use crate::config::GroupConfig;
use crate::consumer::{GroupError, GroupExit};
use crate::health::Heartbeat;
use crate::keys::{members_key, partition_lease_key};
use crate::shutdown::Shutdown;

/// How long a lease release or leaving the members may take: with Redis unreachable at
/// shutdown they expire by themselves, and the process must still exit in time.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// Starts one partition's consumer loop: the partition's configuration and the shutdown
/// that stops it.
pub type Start = Arc<
    dyn Fn(Arc<GroupConfig>, Shutdown) -> BoxFuture<'static, Result<GroupExit, GroupError>>
        + Send
        + Sync,
>;

/// What the owner of a group's partitions needs.
pub struct Owner {
    pub group: Arc<GroupConfig>,
    pub client: Client,
    pub consumer: String,
    pub shutdown: Shutdown,
    pub heartbeat: Heartbeat,
    /// `streamworker_partitions_owned{group}`.
    pub owned: Gauge,
    pub start: Start,
}

/// The share of `partitions` that the replica at `index` of `members` live replicas (sorted
/// by name) aims at: the first `partitions mod members` get one more.
pub fn fair_share(partitions: u32, members: usize, index: usize) -> u32 {
    let members = members.max(1) as u32;
    let index = index as u32;
    partitions / members + u32::from(index < partitions % members)
}

/// One turn's aim: this replica's share of the partitions among the live members.
#[derive(Debug, Clone, Copy)]
struct Plan {
    partitions: u32,
    share: u32,
    /// This replica's place among the live members sorted by name.
    index: usize,
    members: usize,
    lease: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Running; counts towards the share.
    Active,
    /// Draining because it was over the share, its renewal failed too long, or shutdown;
    /// the lease is still ours and is deleted once the loop ends.
    Releasing,
    /// Another replica holds the lease now: draining, and the lease is not ours to delete.
    Lost,
}

struct Running {
    stop: Shutdown,
    task: JoinHandle<Result<GroupExit, GroupError>>,
    /// When the last renewal that succeeded was sent: the lease lives at least until then
    /// plus its lifetime.
    renewed_at: Instant,
    state: State,
}

impl Owner {
    /// Runs the group's share of partitions until shutdown, then hands them over.
    pub async fn run(self) -> Result<GroupExit, GroupError> {
        let partitions = self.group.partitions.unwrap_or(1).max(1);
        let lease = self.group.partition_lease();
        let turn = lease / 3;
        let members = members_key(&self.group.stream, &self.group.name);
        let done = Arc::new(Notify::new());
        let mut running: BTreeMap<u32, Running> = BTreeMap::new();
        let mut last_members = vec![self.consumer.clone()];
        let mut fatal: Option<GroupError> = None;
        let mut cut_off = false;
        // Partitions whose loop failed, not taken again by this replica until then.
        let mut failed: BTreeMap<u32, Instant> = BTreeMap::new();
        tracing::info!(
            stream = %self.group.stream, group = %self.group.name, partitions,
            lease_ms = lease.as_millis() as u64,
            "running a partitioned group: taking a fair share of its partitions"
        );
        self.heartbeat.set_running(true);
        loop {
            let started = Instant::now();
            self.reap(&mut running, &mut fatal, &mut cut_off, &mut failed, lease)
                .await;
            if self.shutdown.is_triggered() || fatal.is_some() {
                break;
            }
            let beat = self.client.members(&members, &self.consumer, lease, false);
            match tokio::time::timeout(lease / 6, beat).await {
                Ok(Ok(live)) => last_members = live,
                Ok(Err(e)) => {
                    tracing::debug!(group = %self.group.name, error = %e, "could not heartbeat into the group's members")
                }
                Err(_) => {
                    tracing::debug!(group = %self.group.name, "heartbeat into the group's members timed out")
                }
            }
            self.renew(&mut running, lease).await;
            // This replica counts as live even when its heartbeat did not get through.
            if let Err(i) = last_members.binary_search(&self.consumer) {
                last_members.insert(i, self.consumer.clone());
            }
            let index = last_members
                .binary_search(&self.consumer)
                .expect("inserted above");
            failed.retain(|_, until| *until > Instant::now());
            let plan = Plan {
                partitions,
                share: fair_share(partitions, last_members.len(), index),
                index,
                members: last_members.len(),
                lease,
            };
            self.rebalance(&mut running, &plan, &failed, &done).await;
            let active = count(&running, State::Active);
            self.owned.set(i64::from(active));
            self.heartbeat.set_running(true);
            self.heartbeat.beat();
            if active == 0 {
                // Owning nothing is this replica's fair share, not a stuck loop.
                self.heartbeat.progress();
            }
            // Wait for the next turn, waking early for shutdown or a partition's loop
            // ending (so its lease is handed over at once); beat meanwhile, as a turn may be
            // longer than the stall limit of `/livez`.
            let next = started + turn;
            while Instant::now() < next {
                let fence_at = self.fence(&mut running, lease).unwrap_or(next);
                let wake = next
                    .min(fence_at)
                    .min(Instant::now() + Duration::from_secs(1));
                tokio::select! {
                    _ = sleep_until(wake) => {}
                    _ = self.shutdown.triggered() => break,
                    _ = done.notified() => break,
                }
                self.heartbeat.beat();
            }
        }
        // Shutdown (or a failure no restart fixes): drain every partition, keep renewing
        // their leases meanwhile, then delete them and leave the members.
        for r in running.values_mut() {
            r.stop.trigger();
            if r.state == State::Active {
                r.state = State::Releasing;
            }
        }
        let mut renew_at = Instant::now() + turn;
        while !running.is_empty() {
            self.reap(&mut running, &mut fatal, &mut cut_off, &mut failed, lease)
                .await;
            if running.is_empty() {
                break;
            }
            if Instant::now() >= renew_at {
                self.renew(&mut running, lease).await;
                renew_at = Instant::now() + turn;
            }
            tokio::select! {
                _ = sleep_until(renew_at.min(Instant::now() + Duration::from_secs(1))) => {}
                _ = done.notified() => {}
            }
            self.heartbeat.beat();
        }
        self.owned.set(0);
        let leave = self.client.members(&members, &self.consumer, lease, true);
        if !matches!(tokio::time::timeout(LAST_WORDS, leave).await, Ok(Ok(_))) {
            tracing::debug!(group = %self.group.name, "could not leave the group's members; the heartbeat expires by itself");
        }
        self.heartbeat.set_running(false);
        match fatal {
            Some(e) => Err(e),
            None if cut_off => Ok(GroupExit::CutOff {
                abandoned: 1,
                unsettled: 0,
            }),
            None => Ok(GroupExit::Drained),
        }
    }

    /// Collects partition loops that ended: deletes the lease if still ours, remembers a
    /// failure no restart fixes. A loop that failed otherwise is simply not running any
    /// more; its partition is free for whoever takes it next (this replica included).
    async fn reap(
        &self,
        running: &mut BTreeMap<u32, Running>,
        fatal: &mut Option<GroupError>,
        cut_off: &mut bool,
        failed: &mut BTreeMap<u32, Instant>,
        lease: Duration,
    ) {
        let ended: Vec<u32> = running
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            let r = running.remove(&p).expect("listed above");
            let stream = self.stream(p);
            match r.task.await {
                Ok(Ok(GroupExit::Drained)) => {}
                Ok(Ok(GroupExit::CutOff { .. })) => *cut_off = true,
                Ok(Err(e)) if e.is_fatal() => {
                    tracing::error!(stream = %stream, group = %self.group.name, error = %e, "partition cannot run");
                    fatal.get_or_insert(e);
                }
                Ok(Err(e)) => {
                    tracing::warn!(stream = %stream, group = %self.group.name, error = %e, "partition failed; releasing it, not taking it again for a lease lifetime");
                    failed.insert(p, Instant::now() + lease);
                }
                Err(e) => {
                    tracing::error!(stream = %stream, group = %self.group.name, error = %e, "partition's task ended abnormally; releasing it, not taking it again for a lease lifetime");
                    failed.insert(p, Instant::now() + lease);
                }
            }
            if r.state != State::Lost {
                let key = self.lease_key(p);
                let release = self.client.release_lease(&key, &self.consumer);
                match tokio::time::timeout(LAST_WORDS, release).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(lease = %key, error = %e, "could not release the partition's lease; it expires by itself")
                    }
                    Err(_) => {
                        tracing::debug!(lease = %key, "releasing the partition's lease timed out; it expires by itself")
                    }
                }
            }
            tracing::info!(stream = %stream, group = %self.group.name, "partition released");
        }
    }

    /// Renews every lease still ours, all at once and within a sixth of the lease; stops
    /// partitions whose lease another replica holds now, then fences (see [`Self::fence`]).
    async fn renew(&self, running: &mut BTreeMap<u32, Running>, lease: Duration) {
        let ours: Vec<(u32, String)> = running
            .iter()
            .filter(|(_, r)| r.state != State::Lost)
            .map(|(p, _)| (*p, self.lease_key(*p)))
            .collect();
        let sent = Instant::now();
        let renewals = futures_util::future::join_all(
            ours.iter()
                .map(|(_, key)| self.client.lease(key, &self.consumer, lease)),
        );
        let results = match tokio::time::timeout(lease / 6, renewals).await {
            Ok(results) => results,
            Err(_) => {
                tracing::warn!(group = %self.group.name, "renewing the partitions' leases timed out");
                Vec::new()
            }
        };
        for ((p, key), result) in ours.iter().zip(results) {
            let r = running.get_mut(p).expect("listed above");
            match result {
                Ok(None) => r.renewed_at = sent,
                Ok(Some(_)) => {
                    tracing::error!(stream = %self.stream(*p), group = %self.group.name, lease = %key, "another replica holds this partition's lease now; stopping the partition");
                    r.state = State::Lost;
                    r.stop.trigger();
                }
                Err(e) => {
                    tracing::warn!(stream = %self.stream(*p), group = %self.group.name, error = %e, "could not renew the partition's lease")
                }
            }
        }
        self.fence(running, lease);
    }

    /// Stops reading every partition whose lease was last renewed half a lease ago: with
    /// renewals every third of a lease, that is two turns missed, and at worst (a renewal
    /// timing out) a third of the lease is still left. Handlers end within
    /// `handler_timeout`, at most a third of the lease (`check` enforces it), so before
    /// anyone else can take the partition. Returns when the next partition would be fenced.
    fn fence(&self, running: &mut BTreeMap<u32, Running>, lease: Duration) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for (p, r) in running.iter_mut().filter(|(_, r)| r.state == State::Active) {
            let deadline = r.renewed_at + lease / 2;
            if now >= deadline {
                tracing::error!(stream = %self.stream(*p), group = %self.group.name, "the partition's lease could not be renewed and may expire; stopping the partition");
                r.state = State::Releasing;
                r.stop.trigger();
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        next
    }

    fn stream(&self, p: u32) -> String {
        crate::partition::partition_stream(&self.group.stream, p)
    }

    fn lease_key(&self, p: u32) -> String {
        partition_lease_key(&self.stream(p), &self.group.name)
    }

    /// Releases partitions over the share and takes free ones up to it, except those whose
    /// loop failed lately here (another replica may take them meanwhile).
    async fn rebalance(
        &self,
        running: &mut BTreeMap<u32, Running>,
        plan: &Plan,
        failed: &BTreeMap<u32, Instant>,
        done: &Arc<Notify>,
    ) {
        let Plan {
            partitions,
            share,
            index,
            members,
            lease,
        } = *plan;
        let mut active = count(running, State::Active);
        // Release the highest-numbered extras: deterministic, and it leaves the low ones
        // where they are.
        for (p, r) in running.iter_mut().rev() {
            if active <= share {
                break;
            }
            if r.state == State::Active {
                tracing::info!(stream = %crate::partition::partition_stream(&self.group.stream, *p), group = %self.group.name, share, "over the fair share; releasing the partition");
                r.state = State::Releasing;
                r.stop.trigger();
                active -= 1;
            }
        }
        if active >= share {
            return;
        }
        // Start looking where this replica's share would begin if partitions were dealt
        // out in order, so replicas joining together do not all race for partition 0.
        let offset = (index as u64 * u64::from(partitions) / members.max(1) as u64) as u32;
        let mut candidates = (0..partitions)
            .map(|i| (offset + i) % partitions)
            .filter(|p| !running.contains_key(p) && !failed.contains_key(p))
            .collect::<Vec<_>>()
            .into_iter();
        // Ask for as many leases as the share lacks at once (one round trip, not one per
        // partition: 16 partitions took 16 on start-up), then for more in place of those
        // another replica holds.
        while active < share {
            let batch: Vec<(u32, String)> = candidates
                .by_ref()
                .take((share - active) as usize)
                .map(|p| (p, self.lease_key(p)))
                .collect();
            if batch.is_empty() {
                break;
            }
            self.fence(running, lease);
            let sent = Instant::now();
            let takes = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|(_, key)| self.client.lease(key, &self.consumer, lease)),
            );
            // On a timeout they may have been taken: those leases are then ours for a
            // lifetime, unused.
            let Ok(results) = tokio::time::timeout(lease / 6, takes).await else {
                break;
            };
            let mut trouble = false;
            for ((p, key), result) in batch.into_iter().zip(results) {
                match result {
                    Ok(None) => {
                        let stream = self.stream(p);
                        tracing::info!(stream = %stream, group = %self.group.name, "partition taken");
                        let stop = Shutdown::new(self.shutdown.timeout());
                        let config = crate::partition::group_of(&self.group, p);
                        let run = (self.start)(config, stop.clone());
                        let done = Arc::clone(done);
                        let task = tokio::spawn(async move {
                            let result = run.await;
                            done.notify_one();
                            result
                        });
                        running.insert(
                            p,
                            Running {
                                stop,
                                task,
                                renewed_at: sent,
                                state: State::Active,
                            },
                        );
                        active += 1;
                    }
                    Ok(Some(_)) => {}
                    Err(e) => {
                        tracing::debug!(lease = %key, error = %e, "could not take the partition's lease");
                        trouble = true;
                    }
                }
            }
            if trouble {
                break;
            }
        }
    }
}

fn count(running: &BTreeMap<u32, Running>, state: State) -> u32 {
    running.values().filter(|r| r.state == state).count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for partitions in [1, 2, 7, 8, 16, 1024] {
            for members in 1..=10 {
                let shares: Vec<u32> = (0..members)
                    .map(|i| fair_share(partitions, members, i))
                    .collect();
                assert_eq!(shares.iter().sum::<u32>(), partitions);
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.unwrap() - min.unwrap() <= 1, "{shares:?}");
            }
        }
        assert_eq!(fair_share(8, 3, 0), 3);
        assert_eq!(fair_share(8, 3, 1), 3);
        assert_eq!(fair_share(8, 3, 2), 2);
    }
}
