//! The hosts of a job beyond the driver's own: one per `rtrain agent` that joined the
//! coordinator. Each keeps its agent's session, through which the driver starts and signals
//! processes there and learns of their exits. A host whose session ends is lost: every process
//! it had is reported as [`ExitKind::Lost`], and it takes no part in later attempts until an
//! agent joins again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::agent::{ExitKind, ProcId, WorkerExit, WorkerLaunch};
use crate::proto::{AgentCommand, AgentEnd, SignalProcess, SpawnProcess, agent_command};
use crate::scheduler::NodeResources;

/// What an agent says of its host when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub name: String,
    /// Where other hosts reach it.
    pub address: String,
    pub cpus: usize,
    /// Its GPUs, as its CUDA_VISIBLE_DEVICES names them.
    pub devices: Vec<String>,
}

impl HostInfo {
    pub fn resources(&self) -> NodeResources {
        NodeResources { cpus: self.cpus, gpus: self.devices.len() }
    }
}

/// One host's agent, as the driver sees it.
pub struct RemoteHost {
    pub info: HostInfo,
    /// The shipped working directory: its archive's digest and its path here.
    shipped: Option<(String, std::path::PathBuf)>,
    commands: mpsc::UnboundedSender<AgentCommand>,
    /// Processes started there and not yet reported ended: their id, name and where the exit goes.
    pending: Mutex<HashMap<u64, (ProcId, mpsc::UnboundedSender<WorkerExit>)>>,
    next_id: AtomicU64,
    lost: AtomicBool,
}

impl RemoteHost {
    /// Asks the agent to start `launch`; returns the id that names the process from now on.
    pub(crate) fn spawn(&self, launch: &WorkerLaunch, exits: mpsc::UnboundedSender<WorkerExit>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (launch.id.clone(), exits));
        let spawn = SpawnProcess {
            id,
            role: launch.id.role.clone(),
            rank: launch.id.rank as u32,
            command: launch.command.clone(),
            env: launch.env.iter().cloned().collect(),
            cwd: launch.cwd.display().to_string(),
            log_path: launch.log_path.display().to_string(),
            cores: launch.cpus.iter().map(|&c| c as u32).collect(),
            working_dir_digest: self.shipped.as_ref().map_or(String::new(), |s| s.0.clone()),
            working_dir_root: self.shipped.as_ref().map_or(String::new(), |s| s.1.display().to_string()),
        };
        let sent = self.commands.send(AgentCommand { command: Some(agent_command::Command::Spawn(spawn)) });
        if sent.is_err() || self.lost.load(Ordering::SeqCst) {
            self.exited(id, ExitKind::Lost);
        }
        id
    }

    /// Tells the agent the job is over (it stops its processes and leaves).
    fn end(&self, reason: &str) {
        let command = agent_command::Command::End(AgentEnd { reason: reason.to_string() });
        let _ = self.commands.send(AgentCommand { command: Some(command) });
    }

    /// Sends `signal` to the process group of process `id` there.
    pub(crate) fn signal(&self, id: u64, signal: i32) {
        let command = agent_command::Command::Signal(SignalProcess { id, signal });
        let _ = self.commands.send(AgentCommand { command: Some(command) });
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// The agent reported that process `id` ended.
    pub(crate) fn exited(&self, id: u64, kind: ExitKind) {
        if let Some((proc_id, exits)) = self.lock().remove(&id) {
            let _ = exits.send(WorkerExit { id: proc_id, kind });
        }
    }

    /// The agent's session ended: every process it had is lost with it.
    fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        let pending: Vec<_> = self.lock().drain().collect();
        for (_, (id, exits)) in pending {
            let _ = exits.send(WorkerExit { id, kind: ExitKind::Lost });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (ProcId, mpsc::UnboundedSender<WorkerExit>)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why an agent may not join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("this job runs on one host (cluster.hosts = 1): it takes no agents")]
    SingleHost,
    #[error("the job already has its {hosts} hosts (cluster.hosts = {hosts})")]
    Full { hosts: usize },
    #[error("a host named {0} is already in the job (give each agent its own --name)")]
    SameName(String),
}

/// Every host that joined, live or lost, in the order they joined.
pub struct Hosts {
    /// `cluster.hosts`: the driver's own host and `expected - 1` agents.
    expected: usize,
    /// What every host's processes run in (see [`RemoteHost`]).
    shipped: Option<(String, std::path::PathBuf)>,
    joined: Mutex<Vec<Arc<RemoteHost>>>,
    /// Bumped on every join and loss.
    changed: watch::Sender<u64>,
    /// The job is over: its agents are leaving.
    ending: AtomicBool,
}

impl Hosts {
    /// `expected` hosts counting the driver's; `shipped`: the digest of the working directory's
    /// archive and its path on the driver's host, when it is shipped.
    pub fn new(expected: usize, shipped: Option<(String, std::path::PathBuf)>) -> Self {
        Self {
            expected,
            shipped,
            joined: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            ending: AtomicBool::new(false),
        }
    }

    /// The live hosts besides the driver's, in the order they joined.
    pub fn live(&self) -> Vec<Arc<RemoteHost>> {
        self.lock().iter().filter(|h| !h.is_lost()).cloned().collect()
    }

    /// Hosts that were in the job and are lost (and have not joined again).
    pub fn lost(&self) -> Vec<HostInfo> {
        self.lock().iter().filter(|h| h.is_lost()).map(|h| h.info.clone()).collect()
    }

    /// Waits until `count` hosts besides the driver's are live, or `deadline`; returns whether
    /// they are.
    pub async fn wait_for(&self, count: usize, deadline: tokio::time::Instant) -> bool {
        let mut changed = self.changed.subscribe();
        loop {
            if self.live().len() >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return self.live().len() >= count;
            }
        }
    }

    /// An agent joins with `info`; its commands go to `commands`. A host of the same name that
    /// was lost is replaced (it came back).
    pub(crate) fn join(
        &self,
        info: HostInfo,
        commands: mpsc::UnboundedSender<AgentCommand>,
    ) -> Result<Arc<RemoteHost>, JoinRefusal> {
        let mut joined = self.lock();
        if self.expected <= 1 {
            return Err(JoinRefusal::SingleHost);
        }
        if joined.iter().any(|h| !h.is_lost() && h.info.name == info.name) {
            return Err(JoinRefusal::SameName(info.name));
        }
        if joined.iter().filter(|h| !h.is_lost()).count() + 1 >= self.expected {
            return Err(JoinRefusal::Full { hosts: self.expected });
        }
        joined.retain(|h| !(h.is_lost() && h.info.name == info.name));
        let host = Arc::new(RemoteHost {
            info,
            shipped: self.shipped.clone(),
            commands,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            lost: AtomicBool::new(false),
        });
        joined.push(host.clone());
        drop(joined);
        self.changed.send_modify(|n| *n += 1);
        Ok(host)
    }

    /// Tells every live agent that the job is over; returns how many were told.
    pub fn end_all(&self, reason: &str) -> usize {
        self.ending.store(true, Ordering::SeqCst);
        let live = self.live();
        for host in &live {
            host.end(reason);
        }
        live.len()
    }

    /// Whether [`Hosts::end_all`] was called.
    pub fn ending(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }

    /// The session of `host` ended.
    pub(crate) fn leave(&self, host: &Arc<RemoteHost>) {
        host.lose();
        self.changed.send_modify(|n| *n += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RemoteHost>>> {
        self.joined.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> HostInfo {
        HostInfo { name: name.into(), address: "10.0.0.2".into(), cpus: 4, devices: Vec::new() }
    }

    fn launch(rank: usize) -> WorkerLaunch {
        WorkerLaunch {
            id: ProcId::new("trainer", rank),
            command: vec!["true".into()],
            env: Vec::new(),
            log_path: "/tmp/x.log".into(),
            echo: None,
            cpus: Vec::new(),
            cwd: "/".into(),
        }
    }

    #[test]
    fn joins_are_counted_against_the_hosts_expected_and_names_are_unique() {
        let hosts = Hosts::new(3, None);
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = hosts.join(info("a"), tx.clone()).unwrap();
        assert_eq!(hosts.join(info("a"), tx.clone()).err(), Some(JoinRefusal::SameName("a".into())));
        hosts.join(info("b"), tx.clone()).unwrap();
        assert_eq!(hosts.join(info("c"), tx.clone()).err(), Some(JoinRefusal::Full { hosts: 3 }));
        // A lost host leaves room, and the same name may come back.
        hosts.leave(&a);
        assert_eq!(hosts.live().len(), 1);
        assert_eq!(hosts.lost(), vec![info("a")]);
        hosts.join(info("a"), tx).unwrap();
        assert_eq!(hosts.live().len(), 2);
        assert!(hosts.lost().is_empty());
        assert_eq!(
            Hosts::new(1, None).join(info("a"), mpsc::unbounded_channel().0).err(),
            Some(JoinRefusal::SingleHost)
        );
    }

    #[test]
    fn a_lost_host_reports_every_process_it_had_as_lost() {
        let hosts = Hosts::new(2, None);
        let (tx, mut commands) = mpsc::unbounded_channel();
        let host = hosts.join(info("a"), tx).unwrap();
        let (exits, mut rx) = mpsc::unbounded_channel();
        let first = host.spawn(&launch(0), exits.clone());
        host.spawn(&launch(1), exits.clone());
        assert!(
            matches!(commands.try_recv().unwrap().command, Some(agent_command::Command::Spawn(s)) if s.id == first)
        );
        host.exited(first, ExitKind::Code(0));
        assert_eq!(rx.try_recv().unwrap().kind, ExitKind::Code(0));
        hosts.leave(&host);
        let lost = rx.try_recv().unwrap();
        assert_eq!((lost.id.rank, lost.kind), (1, ExitKind::Lost));
        // A spawn on a lost host is lost at once.
        host.spawn(&launch(2), exits);
        assert_eq!(rx.try_recv().unwrap().kind, ExitKind::Lost);
    }
}
