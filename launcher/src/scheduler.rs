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
}

/// GPUs a process may use: `CUDA_VISIBLE_DEVICES` lists them up to its first invalid entry (as
/// CUDA reads it: `""` and `"-1"` hide every device), capped by the devices present.
fn visible_gpus(cuda_visible: Option<&str>, present: usize) -> usize {
    match cuda_visible {
        None => present,
        Some(list) => {
            let listed = list
                .split(',')
                .map(str::trim)
                .take_while(|d| !d.is_empty() && (d.starts_with("GPU-") || d.parse::<usize>().is_ok()))
                .count();
            listed.min(present)
        }
    }
}

/// What a gang asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GangRequest {
    pub workers: usize,
    pub cpus_per_worker: usize,
    pub gpus_per_worker: usize,
}

/// Where one rank runs and what it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlacement {
    pub rank: usize,
    pub local_rank: usize,
    /// Threads for intra-op parallelism (OMP_NUM_THREADS): the node's cores shared evenly.
    pub threads: usize,
    /// CUDA device indices, sorted; LOCAL_RANK indexes them.
    pub gpus: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "the gang needs {needed} CPU cores ({workers} workers × {per_worker} train.cpus_per_worker) \
         but this machine has {available}; lower train.workers or train.cpus_per_worker"
    )]
    NotEnoughCpus { needed: usize, available: usize, workers: usize, per_worker: usize },
    #[error(
        "the gang needs {needed} GPUs ({workers} workers × {per_worker}) but {available} are visible; \
         lower train.workers, or use train.device = \"cpu\""
    )]
    NotEnoughGpus { needed: usize, available: usize, workers: usize, per_worker: usize },
}

/// Places every rank of `request` on `node`, or explains what is missing.
pub fn place_gang(request: GangRequest, node: NodeResources) -> Result<Vec<RankPlacement>, ScheduleError> {
    let GangRequest { workers, cpus_per_worker, gpus_per_worker } = request;
    let cpus_needed = workers * cpus_per_worker;
    if cpus_needed > node.cpus {
        return Err(ScheduleError::NotEnoughCpus {
            needed: cpus_needed,
            available: node.cpus,
            workers,
            per_worker: cpus_per_worker,
        });
    }
    let gpus_needed = workers * gpus_per_worker;
    if gpus_needed > node.gpus {
        return Err(ScheduleError::NotEnoughGpus {
            needed: gpus_needed,
            available: node.gpus,
            workers,
            per_worker: gpus_per_worker,
        });
    }
    let threads = (node.cpus / workers.max(1)).max(1);
    Ok((0..workers)
        .map(|rank| RankPlacement {
            rank,
            local_rank: rank,
            threads,
            gpus: (rank * gpus_per_worker..(rank + 1) * gpus_per_worker).collect(),
        })
        .collect())
}

/// The gang size to start with: `max` workers if they fit on `node`, else as many as fit, but
/// never fewer than `min` (then the error says what `min` workers would need).
pub fn elastic_size(
    min: usize,
    max: usize,
    cpus_per_worker: usize,
    gpus_per_worker: usize,
    node: NodeResources,
) -> Result<usize, ScheduleError> {
    let by_cpus = node.cpus / cpus_per_worker.max(1);
    let by_gpus = node.gpus.checked_div(gpus_per_worker).unwrap_or(usize::MAX);
    let fits = by_cpus.min(by_gpus).min(max);
    if fits >= min {
        return Ok(fits);
    }
    // Not even `min` fit: let place_gang name the missing resource.
    place_gang(GangRequest { workers: min, cpus_per_worker, gpus_per_worker }, node).map(|p| p.len())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn elastic_gangs_take_what_fits_within_bounds() {
        let node = |cpus, gpus| NodeResources { cpus, gpus };
        assert_eq!(elastic_size(1, 4, 1, 0, node(8, 0)), Ok(4));
        assert_eq!(elastic_size(1, 4, 1, 0, node(3, 0)), Ok(3));
        assert_eq!(elastic_size(1, 4, 2, 0, node(3, 0)), Ok(1));
        assert_eq!(elastic_size(2, 8, 1, 1, node(16, 3)), Ok(3));
        let e = elastic_size(2, 4, 1, 0, node(1, 0)).unwrap_err();
        assert_eq!(e, ScheduleError::NotEnoughCpus { needed: 2, available: 1, workers: 2, per_worker: 1 });
        assert_eq!(elastic_size(4, 4, 1, 0, node(8, 0)), Ok(4));
    }

    fn req(workers: usize, cpus: usize, gpus: usize) -> GangRequest {
        GangRequest { workers, cpus_per_worker: cpus, gpus_per_worker: gpus }
    }

    #[test]
    fn places_all_ranks_and_shares_cores() {
        let p = place_gang(req(2, 1, 0), NodeResources { cpus: 8, gpus: 0 }).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].local_rank, 1);
        assert_eq!(p[0].threads, 4);
        assert!(p[0].gpus.is_empty());
    }

    #[test]
    fn gpus_are_handed_out_one_range_per_rank() {
        let p = place_gang(req(2, 1, 2), NodeResources { cpus: 8, gpus: 4 }).unwrap();
        assert_eq!(p[0].gpus, vec![0, 1]);
        assert_eq!(p[1].gpus, vec![2, 3]);
    }

    #[test]
    fn all_or_nothing_with_a_reason() {
        let e = place_gang(req(4, 1, 0), NodeResources { cpus: 2, gpus: 0 }).unwrap_err();
        assert_eq!(e, ScheduleError::NotEnoughCpus { needed: 4, available: 2, workers: 4, per_worker: 1 });
        assert!(e.to_string().contains("train.workers"));
        let e = place_gang(req(2, 1, 1), NodeResources { cpus: 8, gpus: 1 }).unwrap_err();
        assert!(matches!(e, ScheduleError::NotEnoughGpus { needed: 2, available: 1, .. }));
    }
}
