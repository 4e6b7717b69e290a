//! Gang placement: all ranks of a group get their resources, or none do. A pure function, so
//! every case is unit-tested without processes.

/// What one node offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeResources {
    pub cpus: usize,
    pub gpus: usize,
}

impl NodeResources {
    /// This machine: online CPU cores and visible NVIDIA GPUs (the driver's `/dev/nvidiaN`
    /// device nodes, narrowed by `CUDA_VISIBLE_DEVICES` when it is set).
    pub fn local() -> Self {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let nodes = std::fs::read_dir("/dev")
            .map(|dir| {
                dir.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_prefix("nvidia"))
                            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count()
            })
            .unwrap_or(0);
        let gpus = visible_gpus(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(), nodes);
        Self { cpus, gpus }
    }

    /// The devices of [`NodeResources::local`], as [`visible_devices`] names them.
    pub fn local_devices() -> Vec<String> {
        visible_devices(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(), Self::local().gpus)
    }
}

/// GPUs a process may use: `CUDA_VISIBLE_DEVICES` lists them up to its first invalid entry (as
/// CUDA reads it: `""` and `"-1"` hide every device), capped by the devices present.
fn visible_gpus(cuda_visible: Option<&str>, present: usize) -> usize {
    visible_devices(cuda_visible, present).len()
}

/// The devices this process may use, as CUDA names them to its children: the entries of
/// `CUDA_VISIBLE_DEVICES` (ordinals or `GPU-` UUIDs) up to the first invalid one, capped by the
/// devices present, or `0..present` when it is unset. The scheduler hands out indices into this
/// list; a worker's `CUDA_VISIBLE_DEVICES` names the entries, so `CUDA_VISIBLE_DEVICES=4,5,6,7`
/// around the launcher gives its workers devices 4 to 7, not 0 to 3.
pub fn visible_devices(cuda_visible: Option<&str>, present: usize) -> Vec<String> {
    match cuda_visible {
        None => (0..present).map(|d| d.to_string()).collect(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .take_while(|d| !d.is_empty() && (d.starts_with("GPU-") || d.parse::<usize>().is_ok()))
            .take(present)
            .map(str::to_string)
            .collect(),
    }
}

/// `CUDA_VISIBLE_DEVICES` for a process given the scheduler's device `indices` into `visible`.
pub fn device_list(indices: &[usize], visible: &[String]) -> String {
    let mut indices = indices.to_vec();
    indices.sort_unstable();
    indices.iter().filter_map(|i| visible.get(*i).cloned()).collect::<Vec<_>>().join(",")
}

/// What one role asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRequest {
    pub role: String,
    /// Fewest and most processes; the role gets as many as fit within them.
    pub min_workers: usize,
    pub max_workers: usize,
    pub cpus_per_worker: f64,
    pub gpus_per_worker: usize,
    /// Config keys named in messages: the size and the CPU share (`train.workers`, ...).
    pub size_key: String,
    pub cpus_key: String,
}

/// Where one rank runs and what it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlacement {
    pub rank: usize,
    pub local_rank: usize,
    /// Threads for intra-op parallelism (OMP_NUM_THREADS): the cores it was given.
    pub threads: usize,
    /// Cores it is pinned to, as indices into the cores this process may use.
    pub cores: Vec<usize>,
    /// CUDA device indices, sorted; LOCAL_RANK indexes them.
    pub gpus: Vec<usize>,
    /// The host it runs on: an index into the hosts it was placed over (0: the driver's).
    pub node: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "role {role} needs at least {needed} workers but its {hosts} hosts hold only {fits} ({cpus_key} each{gpus}); \
         lower {size_key}, or add hosts"
    )]
    NotEnoughHosts {
        role: String,
        needed: usize,
        fits: usize,
        hosts: usize,
        size_key: String,
        cpus_key: String,
        gpus: String,
    },
    #[error(
        "role {role} needs {needed} CPU cores ({workers} × {per_worker} {cpus_key}) but only {available} of \
         this machine's {total} are left for it; lower {size_key} or {cpus_key}"
    )]
    NotEnoughCpus {
        role: String,
        needed: f64,
        available: f64,
        total: usize,
        workers: usize,
        per_worker: f64,
        size_key: String,
        cpus_key: String,
    },
    #[error(
        "role {role} needs {needed} GPUs ({workers} × {per_worker}) but only {available} of the {total} visible are \
         left for it; lower {size_key}, or use train.device = \"cpu\""
    )]
    NotEnoughGpus {
        role: String,
        needed: usize,
        available: usize,
        total: usize,
        workers: usize,
        per_worker: usize,
        size_key: String,
    },
    #[error(
        "role {role} runs on the training role's GPUs ({key}), but no training rank with a GPU is on the driver's \
         host, where {role} runs"
    )]
    NoTrainingGpus { role: String, key: String },
}

/// Gives each process of a role that runs on the training role's GPUs (`placements`, all on the
/// driver's host) the GPUs of training rank i mod k, over the k training ranks on that host.
pub fn share_training_gpus(
    role: &str,
    key: &str,
    placements: &mut [RankPlacement],
    training: &[RankPlacement],
) -> Result<(), ScheduleError> {
    let beside: Vec<&RankPlacement> = training.iter().filter(|t| t.node == 0 && !t.gpus.is_empty()).collect();
    if beside.is_empty() && !placements.is_empty() {
        return Err(ScheduleError::NoTrainingGpus { role: role.into(), key: key.into() });
    }
    for (i, p) in placements.iter_mut().enumerate() {
        p.gpus = beside[i % beside.len()].gpus.clone();
    }
    Ok(())
}

/// Shares are compared with this slack, so 4 × 0.25 fills a core.
const EPS: f64 = 1e-9;

/// Places every role of a job on `node`, all or nothing: each role first gets its `min_workers`,
/// then roles grow towards `max_workers` in order while resources last. Returns each role's ranks.
pub fn place_job(groups: &[GroupRequest], node: NodeResources) -> Result<Vec<Vec<RankPlacement>>, ScheduleError> {
    let (mut cpus_left, mut gpus_left) = (node.cpus as f64, node.gpus);
    for g in groups {
        let (needed_cpus, needed_gpus) = (g.min_workers as f64 * g.cpus_per_worker, g.min_workers * g.gpus_per_worker);
        if needed_cpus > cpus_left + EPS {
            return Err(ScheduleError::NotEnoughCpus {
                role: g.role.clone(),
                needed: needed_cpus,
                available: cpus_left.max(0.0),
                total: node.cpus,
                workers: g.min_workers,
                per_worker: g.cpus_per_worker,
                size_key: g.size_key.clone(),
                cpus_key: g.cpus_key.clone(),
            });
        }
        if needed_gpus > gpus_left {
            return Err(ScheduleError::NotEnoughGpus {
                role: g.role.clone(),
                needed: needed_gpus,
                available: gpus_left,
                total: node.gpus,
                workers: g.min_workers,
                per_worker: g.gpus_per_worker,
                size_key: g.size_key.clone(),
            });
        }
        cpus_left -= needed_cpus;
        gpus_left -= needed_gpus;
    }
    let mut sizes: Vec<usize> = groups.iter().map(|g| g.min_workers).collect();
    for (g, size) in groups.iter().zip(&mut sizes) {
        while *size < g.max_workers && g.cpus_per_worker <= cpus_left + EPS && g.gpus_per_worker <= gpus_left {
            *size += 1;
            cpus_left -= g.cpus_per_worker;
            gpus_left -= g.gpus_per_worker;
        }
    }
    let shares: Vec<f64> =
        groups.iter().zip(&sizes).flat_map(|(g, n)| std::iter::repeat_n(g.cpus_per_worker, *n)).collect();
    let mut cores = assign_cores(&shares, node.cpus).into_iter();
    let mut next_gpu = 0;
    Ok(groups
        .iter()
        .zip(&sizes)
        .map(|(g, n)| {
            (0..*n)
                .map(|rank| {
                    let (cores, threads) = cores.next().unwrap_or_default();
                    let gpus = (next_gpu..next_gpu + g.gpus_per_worker).collect();
                    next_gpu += g.gpus_per_worker;
                    RankPlacement { rank, local_rank: rank, threads, cores, gpus, node: 0 }
                })
                .collect()
        })
        .collect())
}

/// Places the training role `trainer` over `hosts` (the driver's first) and the other roles
/// (`side`) on the driver's host: the gang gets as many workers as fit (between its min and max),
/// spread evenly over the hosts, with the ranks of each host contiguous and hosts in order, as
/// torchrun numbers them. Returns the gang's ranks and each side role's.
pub fn place_over_hosts(
    trainer: &GroupRequest,
    side: &[GroupRequest],
    hosts: &[NodeResources],
) -> Result<(Vec<RankPlacement>, Vec<Vec<RankPlacement>>), ScheduleError> {
    let Some((driver, others)) = hosts.split_first() else {
        return Err(ScheduleError::NotEnoughHosts {
            role: trainer.role.clone(),
            needed: trainer.min_workers,
            fits: 0,
            hosts: 0,
            size_key: trainer.size_key.clone(),
            cpus_key: trainer.cpus_key.clone(),
            gpus: String::new(),
        });
    };
    // The side roles come first on the driver's host (their smallest sizes).
    let side_min: Vec<GroupRequest> =
        side.iter().map(|g| GroupRequest { max_workers: g.min_workers, ..g.clone() }).collect();
    place_job(&side_min, *driver)?;
    let driver_gpus = driver.gpus.saturating_sub(side.iter().map(|g| g.min_workers * g.gpus_per_worker).sum::<usize>());
    let driver_cpus = driver.cpus as f64 - side.iter().map(|g| g.min_workers as f64 * g.cpus_per_worker).sum::<f64>();
    let fits = |cpus: f64, gpus: usize| {
        let by_cpu = ((cpus + EPS) / trainer.cpus_per_worker).floor().max(0.0) as usize;
        let by_gpu = gpus.checked_div(trainer.gpus_per_worker).unwrap_or(usize::MAX);
        by_cpu.min(by_gpu)
    };
    let capacity: Vec<usize> = std::iter::once(fits(driver_cpus, driver_gpus))
        .chain(others.iter().map(|h| fits(h.cpus as f64, h.gpus)))
        .collect();
    let total = capacity.iter().sum::<usize>().min(trainer.max_workers);
    if total < trainer.min_workers {
        return Err(ScheduleError::NotEnoughHosts {
            role: trainer.role.clone(),
            needed: trainer.min_workers,
            fits: total,
            hosts: hosts.len(),
            size_key: trainer.size_key.clone(),
            cpus_key: format!("{} = {}", trainer.cpus_key, trainer.cpus_per_worker),
            gpus: if trainer.gpus_per_worker > 0 {
                format!(", {} GPUs", trainer.gpus_per_worker)
            } else {
                String::new()
            },
        });
    }
    // One worker at a time to the host with the fewest that has room (the first, on ties).
    let mut counts = vec![0usize; hosts.len()];
    for _ in 0..total {
        let next = (0..hosts.len()).filter(|&h| counts[h] < capacity[h]).min_by_key(|&h| (counts[h], h));
        if let Some(h) = next {
            counts[h] += 1;
        }
    }
    let fixed = |n: usize| GroupRequest { min_workers: n, max_workers: n, ..trainer.clone() };
    let mut driver_groups = vec![fixed(counts[0])];
    driver_groups.extend(side.iter().cloned());
    let mut on_driver = place_job(&driver_groups, *driver)?.into_iter();
    let mut gang = on_driver.next().unwrap_or_default();
    let side_placed: Vec<Vec<RankPlacement>> = on_driver.collect();
    for (h, host) in others.iter().enumerate() {
        let node = h + 1;
        let placed = place_job(&[fixed(counts[node])], *host)?.into_iter().next().unwrap_or_default();
        let offset = gang.len();
        gang.extend(placed.into_iter().map(|p| RankPlacement { rank: offset + p.rank, node, ..p }));
    }
    Ok((gang, side_placed))
}

/// Cores and thread counts for processes with CPU `shares`, in order. Shares are scaled up to
/// fill the node when they ask for less, so a lone gang spreads over every core. A process whose
/// share is a core or more gets that many cores of its own; smaller shares are packed first-fit
/// onto the cores left, one core each (one thread).
fn assign_cores(shares: &[f64], cores: usize) -> Vec<(Vec<usize>, usize)> {
    let total: f64 = shares.iter().sum();
    let scale = if total > 0.0 { (cores as f64 / total).max(1.0) } else { 1.0 };
    let mut free = vec![1.0f64; cores];
    let mut out = vec![(Vec::new(), 1); shares.len()];
    for (i, share) in shares.iter().map(|s| s * scale).enumerate() {
        if share + EPS >= 1.0 {
            let wanted = (share + EPS).floor() as usize;
            let mine: Vec<usize> = (0..cores).filter(|c| free[*c] >= 1.0 - EPS).take(wanted).collect();
            for c in &mine {
                free[*c] = 0.0;
            }
            let threads = mine.len().max(1);
            out[i] = (mine, threads);
        }
    }
    for (i, share) in shares.iter().map(|s| s * scale).enumerate() {
        if share + EPS < 1.0 {
            let fits = (0..cores).find(|c| free[*c] + EPS >= share);
            let roomiest = (0..cores).max_by(|a, b| free[*a].total_cmp(&free[*b]));
            if let Some(c) = fits.or(roomiest) {
                free[c] -= share;
                out[i] = (vec![c], 1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_the_launchers_devices_not_placement_indices() {
        let visible = visible_devices(Some("4,5,6,7"), 8);
        assert_eq!(device_list(&[1, 0], &visible), "4,5");
        assert_eq!(device_list(&[2, 3], &visible), "6,7");
        let uuids = visible_devices(Some("GPU-aa,GPU-bb,-1,GPU-cc"), 8);
        assert_eq!(uuids, ["GPU-aa", "GPU-bb"]);
        assert_eq!(device_list(&[1], &uuids), "GPU-bb");
        assert_eq!(visible_devices(None, 3), ["0", "1", "2"]);
        assert_eq!(visible_devices(Some("3,1"), 1), ["3"], "capped by the devices present");
        assert_eq!(device_list(&[5], &visible), "", "an index past the list names nothing");
    }

    #[test]
    fn visible_gpus_follow_cuda_visible_devices() {
        assert_eq!(visible_gpus(None, 4), 4);
        assert_eq!(visible_gpus(Some("0,2"), 4), 2);
        assert_eq!(visible_gpus(Some("1,-1,2"), 4), 1);
        assert_eq!(visible_gpus(Some(""), 4), 0);
        assert_eq!(visible_gpus(Some("-1"), 4), 0);
        assert_eq!(visible_gpus(Some("0,1,2,3"), 2), 2);
        assert_eq!(visible_gpus(Some("GPU-8f2a,GPU-11bc"), 8), 2);
    }

    fn group(role: &str, min: usize, max: usize, cpus: f64, gpus: usize) -> GroupRequest {
        GroupRequest {
            role: role.into(),
            min_workers: min,
            max_workers: max,
            cpus_per_worker: cpus,
            gpus_per_worker: gpus,
            size_key: format!("roles.{role}.size"),
            cpus_key: format!("roles.{role}.cpus_per_worker"),
        }
    }

    fn node(cpus: usize, gpus: usize) -> NodeResources {
        NodeResources { cpus, gpus }
    }

    fn sizes(p: &[Vec<RankPlacement>]) -> Vec<usize> {
        p.iter().map(Vec::len).collect()
    }

    #[test]
    fn elastic_roles_take_what_fits_within_bounds() {
        let place = |g: GroupRequest, n| place_job(&[g], n).map(|p| sizes(&p));
        assert_eq!(place(group("t", 1, 4, 1.0, 0), node(8, 0)), Ok(vec![4]));
        assert_eq!(place(group("t", 1, 4, 1.0, 0), node(3, 0)), Ok(vec![3]));
        assert_eq!(place(group("t", 1, 4, 2.0, 0), node(3, 0)), Ok(vec![1]));
        assert_eq!(place(group("t", 2, 8, 1.0, 1), node(16, 3)), Ok(vec![3]));
        let e = place_job(&[group("t", 2, 4, 1.0, 0)], node(1, 0)).unwrap_err();
        assert!(matches!(e, ScheduleError::NotEnoughCpus { workers: 2, total: 1, .. }), "{e:?}");
    }

    #[test]
    fn a_lone_gang_spreads_over_every_core() {
        let p = place_job(&[group("t", 2, 2, 1.0, 0)], node(8, 0)).unwrap();
        assert_eq!(p[0][0].threads, 4);
        assert_eq!(p[0][0].cores, vec![0, 1, 2, 3]);
        assert_eq!(p[0][1].cores, vec![4, 5, 6, 7]);
        assert_eq!(p[0][1].local_rank, 1);
        assert!(p[0][0].gpus.is_empty());
    }

    #[test]
    fn fractional_shares_pack_light_processes_beside_the_gang() {
        // A trainer gang of 2 and 2 actors on a 2-core machine.
        let jobs = [group("trainer", 2, 2, 0.75, 0), group("actor", 2, 2, 0.25, 0)];
        let p = place_job(&jobs, node(2, 0)).unwrap();
        assert_eq!(sizes(&p), vec![2, 2]);
        assert_eq!((p[0][0].cores.clone(), p[0][1].cores.clone()), (vec![0], vec![1]));
        assert_eq!((p[1][0].cores.clone(), p[1][1].cores.clone()), (vec![0], vec![1]));
        assert!(p.iter().flatten().all(|r| r.threads == 1));
        // Whole-core gang plus quarter-core actors on 4 cores: the gang keeps its own cores.
        let jobs = [group("trainer", 2, 2, 1.0, 0), group("actor", 4, 4, 0.25, 0)];
        let p = place_job(&jobs, node(3, 0)).unwrap();
        assert_eq!((p[0][0].cores.clone(), p[0][1].cores.clone()), (vec![0], vec![1]));
        assert!(p[1].iter().all(|r| r.cores == vec![2]));
    }

    #[test]
    fn a_role_that_does_not_fit_is_named_with_what_is_left() {
        let jobs = [group("trainer", 2, 2, 1.0, 0), group("actor", 2, 2, 0.5, 0)];
        let e = place_job(&jobs, node(2, 0)).unwrap_err();
        assert!(
            matches!(&e, ScheduleError::NotEnoughCpus { role, available, .. } if role == "actor" && *available == 0.0)
        );
        let text = e.to_string();
        assert!(text.contains("role actor") && text.contains("roles.actor.cpus_per_worker"), "{text}");
        let e = place_job(&[group("trainer", 1, 1, 1.0, 1), group("actor", 1, 1, 1.0, 1)], node(8, 1)).unwrap_err();
        assert!(matches!(&e, ScheduleError::NotEnoughGpus { role, .. } if role == "actor"), "{e:?}");
    }

    #[test]
    fn gpus_are_handed_out_one_range_per_rank_across_roles() {
        let p = place_job(&[group("t", 2, 2, 1.0, 2), group("a", 1, 1, 1.0, 1)], node(8, 5)).unwrap();
        assert_eq!(p[0][0].gpus, vec![0, 1]);
        assert_eq!(p[0][1].gpus, vec![2, 3]);
        assert_eq!(p[1][0].gpus, vec![4]);
    }

    #[test]
    fn colocated_processes_share_the_gpus_of_the_training_ranks_on_the_drivers_host() {
        // One GPU: the trainer takes it, two actors asking for none run beside it.
        let mut p = place_job(&[group("trainer", 1, 1, 1.0, 1), group("rollout", 2, 2, 0.5, 0)], node(4, 1)).unwrap();
        let gang = p[0].clone();
        share_training_gpus("rollout", "rl.colocate", &mut p[1], &gang).unwrap();
        assert_eq!(p[1].iter().map(|r| r.gpus.clone()).collect::<Vec<_>>(), vec![vec![0], vec![0]]);
        // Three actors over two trainer ranks: round robin.
        let mut p = place_job(&[group("trainer", 2, 2, 1.0, 1), group("rollout", 3, 3, 0.5, 0)], node(4, 2)).unwrap();
        let gang = p[0].clone();
        share_training_gpus("rollout", "rl.colocate", &mut p[1], &gang).unwrap();
        assert_eq!(p[1].iter().map(|r| r.gpus.clone()).collect::<Vec<_>>(), vec![vec![0], vec![1], vec![0]]);
        // No training rank with a GPU on the driver's host: named, not a panic.
        let mut cpu = place_job(&[group("trainer", 1, 1, 1.0, 0), group("rollout", 1, 1, 0.5, 0)], node(4, 0)).unwrap();
        let gang = cpu[0].clone();
        let e = share_training_gpus("rollout", "rl.colocate", &mut cpu[1], &gang).unwrap_err().to_string();
        assert!(e.contains("rollout") && e.contains("rl.colocate"), "{e}");
    }

    #[test]
    fn a_gang_over_hosts_is_spread_evenly_with_contiguous_ranks_per_host() {
        let trainer = group("trainer", 4, 4, 1.0, 0);
        let (gang, side) = place_over_hosts(&trainer, &[], &[node(2, 0), node(2, 0)]).unwrap();
        let where_: Vec<(usize, usize, usize)> = gang.iter().map(|p| (p.rank, p.node, p.local_rank)).collect();
        assert_eq!(where_, vec![(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]);
        assert!(side.is_empty());
        // Uneven: the driver's host takes the extra one.
        let (gang, _) = place_over_hosts(&group("trainer", 3, 3, 1.0, 0), &[], &[node(4, 0), node(4, 0)]).unwrap();
        assert_eq!(gang.iter().map(|p| p.node).collect::<Vec<_>>(), vec![0, 0, 1]);
    }

    #[test]
    fn side_roles_stay_on_the_drivers_host_and_take_their_share_first() {
        let trainer = group("trainer", 2, 4, 1.0, 0);
        let actor = group("actor", 1, 1, 1.0, 0);
        let (gang, side) = place_over_hosts(&trainer, &[actor], &[node(2, 0), node(2, 0)]).unwrap();
        // The driver's host holds the actor and one trainer rank; the other host two.
        assert_eq!(gang.iter().map(|p| p.node).collect::<Vec<_>>(), vec![0, 1, 1]);
        assert_eq!(side[0].len(), 1);
        assert!(side[0][0].cores.iter().all(|c| !gang[0].cores.contains(c)), "pinned apart: {side:?} {gang:?}");
    }

    #[test]
    fn an_elastic_gang_shrinks_to_the_hosts_left_and_names_what_is_missing() {
        let trainer = group("trainer", 2, 4, 1.0, 0);
        let (gang, _) = place_over_hosts(&trainer, &[], &[node(2, 0)]).unwrap();
        assert_eq!(gang.len(), 2);
        let fixed = group("trainer", 4, 4, 1.0, 0);
        let e = place_over_hosts(&fixed, &[], &[node(2, 0)]).unwrap_err();
        assert!(matches!(e, ScheduleError::NotEnoughHosts { needed: 4, fits: 2, hosts: 1, .. }), "{e}");
        assert!(e.to_string().contains("add hosts"), "{e}");
        // GPUs bound it too.
        let gpus = group("trainer", 1, 8, 1.0, 1);
        let (gang, _) = place_over_hosts(&gpus, &[], &[node(16, 2), node(16, 3)]).unwrap();
        assert_eq!(
            gang.iter().map(|p| (p.node, p.gpus.clone())).collect::<Vec<_>>(),
            vec![(0, vec![0]), (0, vec![1]), (1, vec![0]), (1, vec![1]), (1, vec![2])]
        );
    }
}
