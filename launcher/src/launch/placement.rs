//! Where each attempt's processes run: every role on this host, or, for a job over several hosts,
//! the training gang over the driver's host and the hosts whose agents joined (the other roles
//! stay on the driver's). The gang waits for its hosts up to `rendezvous.timeout_s`; after a host
//! is lost, an elastic gang goes on over the hosts left, a fixed one waits for the host to join
//! again.

use std::sync::Arc;

use super::{Launch, group_requests};
use crate::config::JobSpec;
use crate::hosts::RemoteHost;
use crate::scheduler::{NodeResources, RankPlacement, ScheduleError, place_job, place_over_hosts, share_training_gpus};

/// Every role's ranks, in the order of `spec.roles`, over `hosts` (the driver's first); `fixed`
/// pins the sizes of the roles besides the training role.
pub(super) fn place_roles(
    spec: &JobSpec,
    fixed: Option<&[usize]>,
    hosts: &[NodeResources],
) -> Result<Vec<Vec<RankPlacement>>, ScheduleError> {
    let requests = group_requests(spec, fixed);
    let training = spec.roles.iter().position(|r| r.training);
    let mut placed = match (training, hosts.len() > 1) {
        (Some(t), true) => {
            let side: Vec<_> = requests.iter().enumerate().filter(|(i, _)| *i != t).map(|(_, g)| g.clone()).collect();
            let (gang, side) = place_over_hosts(&requests[t], &side, hosts)?;
            let mut side = side.into_iter();
            (0..requests.len()).map(|i| if i == t { gang.clone() } else { side.next().unwrap_or_default() }).collect()
        }
        _ => place_job(&requests, hosts.first().copied().unwrap_or_else(NodeResources::local))?,
    };
    // Roles beside the trainer on its GPUs (colocated rollout actors) took none of their own.
    if let Some(t) = training {
        let gang = placed[t].clone();
        for (role, ranks) in spec.roles.iter().zip(placed.iter_mut()) {
            if role.on_training_gpus {
                share_training_gpus(&role.name, "rl.colocate", ranks, &gang)?;
            }
        }
    }
    Ok(placed)
}

/// Why an attempt's gang could not be placed.
pub(super) enum Unplaced {
    Schedule(ScheduleError),
    /// Hosts are missing past `rendezvous.timeout_s`.
    Hosts(String),
    Interrupted(i32),
}

impl Launch<'_> {
    /// The ranks of this attempt's gang and the hosts besides the driver's they use (a rank's
    /// `node` k > 0 runs on the (k−1)th).
    pub(super) async fn place_gang(
        &mut self,
        side_sizes: &[usize],
    ) -> Result<(Vec<RankPlacement>, Vec<Arc<RemoteHost>>), Unplaced> {
        let spec = &self.loaded.spec;
        let t = spec.roles.iter().position(|r| r.training).unwrap_or(0);
        if !self.job.cluster.multi_host() {
            let mut all = place_roles(spec, Some(side_sizes), &[NodeResources::local()]).map_err(Unplaced::Schedule)?;
            return Ok((all.swap_remove(t), Vec::new()));
        }
        let hosts = self.job.hosts.clone();
        let wanted = self.job.cluster.hosts - 1;
        let remotes = hosts.live();
        let over = |remotes: &[Arc<RemoteHost>]| {
            let mut nodes = vec![NodeResources::local()];
            nodes.extend(remotes.iter().map(|h| h.info.resources()));
            place_roles(spec, Some(side_sizes), &nodes).map(|mut all| all.swap_remove(t))
        };
        // After a loss, an elastic gang goes on over the hosts it has.
        let lost = hosts.lost();
        if remotes.len() < wanted
            && !self.attempts.is_empty()
            && spec.min_workers < spec.workers
            && let Ok(gang) = over(&remotes)
        {
            let names: Vec<&str> = lost.iter().map(|h| h.name.as_str()).collect();
            self.job.println(&format!(
                "continuing on {} of cluster.hosts = {} hosts (lost: {})",
                remotes.len() + 1,
                self.job.cluster.hosts,
                names.join(", ")
            ));
            return Ok((gang, remotes));
        }
        if remotes.len() < wanted {
            self.job.progress.set_phase("waiting for hosts");
            let missing = wanted - remotes.len();
            self.job.println(&format!(
                "waiting up to {:.0} s (rendezvous.timeout_s) for {missing} more host(s): {}",
                spec.rendezvous_timeout.as_secs_f64(),
                self.job.agents_hint()
            ));
            let deadline = tokio::time::Instant::now() + spec.rendezvous_timeout;
            let joined = tokio::select! {
                joined = hosts.wait_for(wanted, deadline) => joined,
                _ = self.sigint.recv() => return Err(Unplaced::Interrupted(libc::SIGINT)),
                _ = self.sigterm.recv() => return Err(Unplaced::Interrupted(libc::SIGTERM)),
            };
            if !joined {
                let live = hosts.live();
                let lost: Vec<String> = hosts.lost().into_iter().map(|h| h.name).collect();
                let lost = if lost.is_empty() { String::new() } else { format!(" (lost: {})", lost.join(", ")) };
                return Err(Unplaced::Hosts(format!(
                    "only {} of cluster.hosts = {} hosts joined within rendezvous.timeout_s = {:.0} s{lost}: {}",
                    live.len() + 1,
                    self.job.cluster.hosts,
                    spec.rendezvous_timeout.as_secs_f64(),
                    self.job.agents_hint()
                )));
            }
        }
        let remotes: Vec<Arc<RemoteHost>> = hosts.live().into_iter().take(wanted).collect();
        let names: Vec<String> = remotes.iter().map(|h| format!("{} ({})", h.info.name, h.info.address)).collect();
        self.job.println(&format!("hosts: this one and {}", names.join(", ")));
        over(&remotes).map(|gang| (gang, remotes)).map_err(Unplaced::Schedule)
    }
}
