//! The coordinator's picture of a job: which roles it has, which attempt (or incarnation) of each
//! rank is current, the rendezvous of gang roles, and the address book. Plain data, changed only
//! through these methods (under the coordinator's lock), so every rule is unit-tested here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use crate::proto::{EncodedPeers, Endpoint, WorkerId};

/// Why a call from a process was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown role `{0}`")]
    UnknownRole(String),
    #[error("rank {rank} is outside role {role} of {size}")]
    OutOfRange { role: String, rank: u32, size: usize },
    #[error("{role}:{rank} attempt {attempt} is stale; the current one is {current}")]
    Stale { role: String, rank: u32, attempt: u32, current: u32 },
    #[error("{role}:{rank} already registered in attempt {attempt}")]
    AlreadyRegistered { role: String, rank: u32, attempt: u32 },
}

/// One role as the coordinator tracks it.
struct Role {
    /// Registration waits for every rank (a gang with a collective).
    gang: bool,
    size: usize,
    /// Current attempt (or incarnation) per rank; a call from any other is stale.
    current: Vec<u32>,
    /// The rendezvous of a gang role's current attempt: collective addresses by rank.
    joined: BTreeMap<u32, String>,
    /// Set once every rank of the attempt has joined, encoded once for all their replies;
    /// registrations wait on it.
    complete: watch::Sender<Option<EncodedPeers>>,
    /// The address book: what each live rank published, under its attempt.
    published: BTreeMap<u32, (u32, BTreeMap<String, String>)>,
    /// Last heartbeat per rank of the current attempt, by rank.
    pulses: Vec<Arc<Pulse>>,
}

/// The last heartbeat of one rank's attempt (or incarnation). Heartbeats update it without the
/// book's lock: 4096 ranks beating at 1 Hz would otherwise queue on it.
#[derive(Debug)]
pub struct Pulse {
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last beat, plus one; 0 while the rank is not watched.
    at: AtomicU64,
    step: AtomicU64,
    /// The attempt was replaced: its beats are refused.
    retired: AtomicBool,
}

impl Pulse {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            at: AtomicU64::new(0),
            step: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        })
    }

    fn stamp(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Records a beat at `step`; false once the attempt is retired.
    pub fn beat(&self, step: u64) -> bool {
        if self.retired.load(Ordering::Acquire) {
            return false;
        }
        self.step.store(step, Ordering::Relaxed);
        self.at.store(self.stamp(), Ordering::Release);
        true
    }

    /// Starts watching a rank that has not beaten yet, as if it had at step 0.
    fn watch(&self) {
        let _ = self.at.compare_exchange(0, self.stamp(), Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Seconds since the last beat and its step; `None` while not watched.
    fn last(&self) -> Option<(f64, u64)> {
        let at = self.at.load(Ordering::Acquire).checked_sub(1)?;
        let age = self.epoch.elapsed().as_nanos().saturating_sub(u128::from(at));
        Some((age as f64 / 1e9, self.step.load(Ordering::Relaxed)))
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

/// Every role of the job.
#[derive(Default)]
pub struct JobBook {
    roles: BTreeMap<String, Role>,
    /// Grows with every change of the address book.
    version: u64,
}

/// What a registration gets: a gang rank waits on `complete`; any other rank has its answer.
pub enum Registered {
    Wait(watch::Receiver<Option<EncodedPeers>>),
    /// The gang completed with this registration.
    Complete(EncodedPeers),
    /// A process that restarts alone: its role's addresses known so far.
    Alone(Vec<String>),
}

impl JobBook {
    /// Declares a role of `size` ranks, all at attempt `attempt`.
    pub fn add_role(&mut self, name: &str, size: usize, gang: bool, attempt: u32) {
        let (complete, _) = watch::channel(None);
        let role = Role {
            gang,
            size,
            current: vec![attempt; size],
            joined: BTreeMap::new(),
            complete,
            published: BTreeMap::new(),
            pulses: (0..size).map(|_| Pulse::new()).collect(),
        };
        if let Some(old) = self.roles.insert(name.to_string(), role) {
            old.pulses.iter().for_each(|p| p.retire());
        }
        self.version += 1;
    }

    /// Starts a new attempt of a whole role with `size` ranks: the older attempt's registrations,
    /// addresses and heartbeats are dropped, and its waiting registrations are released.
    pub fn begin_attempt(&mut self, name: &str, attempt: u32, size: usize) {
        let gang = self.roles.get(name).is_none_or(|r| r.gang);
        self.add_role(name, size, gang, attempt);
    }

    /// Starts incarnation `attempt` of one rank of a role that restarts alone.
    pub fn restart_rank(&mut self, name: &str, rank: u32, attempt: u32) {
        if let Some(role) = self.roles.get_mut(name)
            && let Some(slot) = role.current.get_mut(rank as usize)
        {
            *slot = attempt;
            role.published.remove(&rank);
            if let Some(pulse) = role.pulses.get_mut(rank as usize) {
                pulse.retire();
                *pulse = Pulse::new();
            }
            role.joined.remove(&rank);
            self.version += 1;
        }
    }

    /// Checks that `id` is a current process of the job.
    pub fn admit(&self, id: &WorkerId) -> Result<(), Refusal> {
        let role = self.roles.get(&id.role).ok_or_else(|| Refusal::UnknownRole(id.role.clone()))?;
        let current = *role.current.get(id.rank as usize).ok_or_else(|| Refusal::OutOfRange {
            role: id.role.clone(),
            rank: id.rank,
            size: role.size,
        })?;
        if id.attempt != current {
            return Err(Refusal::Stale { role: id.role.clone(), rank: id.rank, attempt: id.attempt, current });
        }
        Ok(())
    }

    /// Registers a process with its collective address.
    pub fn register(&mut self, id: &WorkerId, collective_addr: &str) -> Result<Registered, Refusal> {
        self.admit(id)?;
        let Some(role) = self.roles.get_mut(&id.role) else { return Err(Refusal::UnknownRole(id.role.clone())) };
        if role.joined.contains_key(&id.rank) {
            return Err(Refusal::AlreadyRegistered { role: id.role.clone(), rank: id.rank, attempt: id.attempt });
        }
        role.joined.insert(id.rank, collective_addr.to_string());
        role.published
            .entry(id.rank)
            .or_insert_with(|| (id.attempt, BTreeMap::new()))
            .1
            .insert("collective".into(), collective_addr.into());
        self.version += 1;
        let addrs = || role.joined.values().cloned().collect::<Vec<String>>();
        // A registered process is watched from the moment it may start working, so one that
        // falls silent before its first heartbeat is still found hung.
        if !role.gang {
            if let Some(pulse) = role.pulses.get(id.rank as usize) {
                pulse.watch();
            }
            return Ok(Registered::Alone(addrs()));
        }
        if role.joined.len() == role.size {
            role.pulses.iter().for_each(|p| p.watch());
            // Encoded once per gang, not per registration or per reply.
            let peers = EncodedPeers::new(&addrs());
            role.complete.send_replace(Some(peers.clone()));
            return Ok(Registered::Complete(peers));
        }
        Ok(Registered::Wait(role.complete.subscribe()))
    }

    /// Records a named address of a process in the address book.
    pub fn publish(&mut self, id: &WorkerId, name: &str, addr: &str) -> Result<(), Refusal> {
        self.admit(id)?;
        if let Some(role) = self.roles.get_mut(&id.role) {
            let entry = role.published.entry(id.rank).or_insert_with(|| (id.attempt, BTreeMap::new()));
            entry.1.insert(name.to_string(), addr.to_string());
            self.version += 1;
        }
        Ok(())
    }

    /// The address book of one role (or all, for an empty name), and its version.
    pub fn lookup(&self, role: &str) -> (Vec<Endpoint>, u64) {
        let endpoints = self
            .roles
            .iter()
            .filter(|(name, _)| role.is_empty() || name.as_str() == role)
            .flat_map(|(name, r)| {
                r.published.iter().map(|(rank, (attempt, addrs))| Endpoint {
                    role: name.clone(),
                    rank: *rank,
                    attempt: *attempt,
                    addrs: addrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
            })
            .collect();
        (endpoints, self.version)
    }

    pub fn heartbeat(&self, id: &WorkerId, step: u64) -> Result<(), Refusal> {
        self.pulse(id)?.beat(step);
        Ok(())
    }

    /// Where the heartbeats of `id` go, for a caller that beats many times without the book's
    /// lock: [`Pulse::beat`] refuses them once this attempt is retired.
    pub fn pulse(&self, id: &WorkerId) -> Result<Arc<Pulse>, Refusal> {
        self.admit(id)?;
        self.roles
            .get(&id.role)
            .and_then(|r| r.pulses.get(id.rank as usize))
            .cloned()
            .ok_or_else(|| Refusal::UnknownRole(id.role.clone()))
    }

    /// Ranks of a role's current attempt that have not registered.
    pub fn missing_ranks(&self, role: &str) -> Vec<u32> {
        self.roles
            .get(role)
            .map(|r| (0..r.size as u32).filter(|rank| !r.joined.contains_key(rank)).collect())
            .unwrap_or_default()
    }

    /// Last heartbeat of each rank of a role: its age in seconds and the step it reported.
    pub fn heartbeats(&self, role: &str) -> BTreeMap<u32, (f64, u64)> {
        self.roles
            .get(role)
            .map(|r| r.pulses.iter().zip(0..).filter_map(|(p, rank)| Some((rank, p.last()?))).collect())
            .unwrap_or_default()
    }

    /// The number of ranks of `role`; `None` for a role the job does not have.
    pub fn size(&self, role: &str) -> Option<usize> {
        self.roles.get(role).map(|r| r.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: &str, rank: u32, attempt: u32) -> WorkerId {
        WorkerId { role: role.into(), rank, attempt }
    }

    #[test]
    fn a_gang_completes_when_every_rank_registered() {
        let mut book = JobBook::default();
        book.add_role("trainer", 2, true, 0);
        assert!(matches!(book.register(&id("trainer", 1, 0), "b"), Ok(Registered::Wait(_))));
        assert!(book.heartbeats("trainer").is_empty(), "a waiting rank is not watched yet");
        assert_eq!(book.missing_ranks("trainer"), vec![0]);
        match book.register(&id("trainer", 0, 0), "a") {
            Ok(Registered::Complete(peers)) => assert_eq!(peers, EncodedPeers::new(&["a".into(), "b".into()])),
            _ => panic!("gang not complete"),
        }
        assert!(matches!(book.register(&id("trainer", 0, 0), "a"), Err(Refusal::AlreadyRegistered { .. })));
        // Both ranks are watched from the gang's completion, heartbeat or not.
        assert_eq!(book.heartbeats("trainer").keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn a_pulse_refuses_beats_once_its_attempt_is_retired() {
        let mut book = JobBook::default();
        book.add_role("trainer", 2, true, 0);
        book.add_role("actor", 2, false, 0);
        let trainer = book.pulse(&id("trainer", 1, 0)).unwrap();
        let actor = book.pulse(&id("actor", 0, 0)).unwrap();
        assert!(trainer.beat(7) && actor.beat(3));
        assert_eq!(book.heartbeats("trainer").get(&1).map(|(_, step)| *step), Some(7));
        assert!(book.pulse(&id("trainer", 1, 1)).is_err(), "a stale caller gets no pulse");

        book.restart_rank("actor", 0, 1);
        assert!(!actor.beat(4), "the dead incarnation's stream is refused");
        assert!(book.heartbeats("actor").is_empty(), "the new incarnation is not watched yet");
        assert!(book.pulse(&id("actor", 0, 1)).unwrap().beat(1));

        book.begin_attempt("trainer", 1, 2);
        assert!(!trainer.beat(8), "the old attempt's stream is refused");
        assert!(book.heartbeats("trainer").is_empty());
        assert!(book.heartbeat(&id("trainer", 1, 1), 1).is_ok());
    }

    #[test]
    fn stale_unknown_and_out_of_range_callers_are_refused() {
        let mut book = JobBook::default();
        book.add_role("trainer", 2, true, 3);
        assert!(matches!(book.admit(&id("trainer", 0, 2)), Err(Refusal::Stale { current: 3, .. })));
        assert!(matches!(book.admit(&id("critic", 0, 3)), Err(Refusal::UnknownRole(_))));
        assert!(matches!(book.admit(&id("trainer", 2, 3)), Err(Refusal::OutOfRange { size: 2, .. })));
        book.begin_attempt("trainer", 4, 1);
        assert!(book.admit(&id("trainer", 0, 4)).is_ok());
        assert!(book.admit(&id("trainer", 1, 4)).is_err(), "the new attempt has one rank");
    }

    #[test]
    fn a_rank_that_restarts_alone_moves_in_the_address_book() {
        let mut book = JobBook::default();
        book.add_role("actor", 2, false, 0);
        book.add_role("trainer", 1, true, 0);
        assert!(matches!(book.register(&id("actor", 0, 0), "x"), Ok(Registered::Alone(_))));
        book.publish(&id("actor", 1, 0), "data", "127.0.0.1:9").unwrap();
        let (all, v1) = book.lookup("");
        assert_eq!(all.len(), 2);
        let (actors, _) = book.lookup("actor");
        assert_eq!(actors[1].addrs["data"], "127.0.0.1:9");

        book.restart_rank("actor", 1, 1);
        let (actors, v2) = book.lookup("actor");
        assert!(v2 > v1);
        assert_eq!(actors.len(), 1, "the dead incarnation's addresses are gone");
        assert!(book.publish(&id("actor", 1, 0), "data", "old").is_err());
        book.publish(&id("actor", 1, 1), "data", "127.0.0.1:10").unwrap();
        let (actors, _) = book.lookup("actor");
        assert_eq!((actors[1].attempt, actors[1].addrs["data"].as_str()), (1, "127.0.0.1:10"));
        // The other role is untouched.
        assert!(book.admit(&id("actor", 0, 0)).is_ok());
        assert!(book.lookup("trainer").0.is_empty());
    }
}
