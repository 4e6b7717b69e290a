//! The rollout controller, on the trainer's rank 0: it hands prompts to the rollout actors,
//! collects their samples into each step's batch, and holds generation back to the staleness the
//! config allows.
//!
//! Work is leased, not given: the prompts an actor holds go back to the queue when its connection
//! closes (the actor died or restarted), and are generated again by whoever asks next. A result
//! is taken once, for a lease that is still live, so no sample is lost or counted twice. The
//! controller lives and dies with the trainer process: after a trainer restart a new one starts
//! from the checkpoint's step, and samples made for steps past it are never asked for again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::RolloutError;
use super::wire::{Conn, FromActor, GroupResult, ToActor, WireError, WorkItem, nonce, verify};
use crate::prompts::PromptOrder;

/// How an actor that has nothing to do is told to wait.
const IDLE_WAIT_MS: u64 = 20;
/// How long an actor may take to prove it belongs to the job.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller hands out: which steps, how many prompts each, how far ahead.
#[derive(Debug, Clone)]
pub struct RolloutPlan {
    /// The step training resumes at (0 for a fresh run).
    pub first_step: u64,
    /// Steps of the whole run (no work is made for steps at or past it).
    pub steps: u64,
    pub prompts_per_step: usize,
    pub group_size: usize,
    pub max_staleness: u64,
    pub seed: u64,
    /// Training prompts.
    pub prompt_count: usize,
    /// The trainer gang's attempt, told to actors so they can tell restarts apart.
    pub trainer_attempt: u32,
    /// Token ids at or past this are refused (they would index past the model's embeddings).
    pub vocab_size: usize,
    /// The longest response a sample may have (`rl.max_new_tokens`).
    pub max_response: usize,
}

/// The samples of one step, in slot order, and what making them cost.
#[derive(Debug)]
pub struct StepRollouts {
    pub groups: Vec<GroupResult>,
    /// From the moment the step's work could be handed out to its last group.
    pub wall_seconds: f64,
}

struct State {
    plan: RolloutPlan,
    order: PromptOrder,
    /// The newest weights published: (generation, version).
    published: Option<(u64, u64)>,
    /// Steps below this have had their work queued.
    next_step: u64,
    queue: VecDeque<WorkItem>,
    /// Lease id → (connection, item).
    leased: HashMap<u64, (u64, WorkItem)>,
    done: BTreeMap<u64, BTreeMap<usize, GroupResult>>,
    /// When each step's work was queued.
    opened: HashMap<u64, Instant>,
    next_id: u64,
    stopped: bool,
    /// Results refused (stale, duplicate or unknown), for the logs.
    rejected: u64,
}

impl State {
    /// Queues the work of every step the newest version lets generation reach.
    fn open_steps(&mut self) {
        let Some((_, version)) = self.published else { return };
        let reach = version.saturating_add(self.plan.max_staleness);
        while self.next_step <= reach && self.next_step < self.plan.steps {
            let step = self.next_step;
            for slot in 0..self.plan.prompts_per_step {
                let prompt = self.order.prompt_at(step, slot);
                let seed = self.plan.seed ^ (step.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ (slot as u64).rotate_left(32);
                self.queue.push_back(WorkItem { id: self.next_id, step, slot, prompt, seed });
                self.next_id += 1;
            }
            self.opened.insert(step, Instant::now());
            self.next_step += 1;
        }
    }

    /// The lowest policy version samples for `step` may come from.
    fn min_version(&self, step: u64) -> u64 {
        step.saturating_sub(self.plan.max_staleness)
    }

    fn accept(&mut self, conn: u64, result: GroupResult) -> Result<(), String> {
        let Some((holder, item)) = self.leased.get(&result.id).cloned() else {
            return Err(format!("work {} is not leased (already done, or handed to another actor)", result.id));
        };
        if holder != conn {
            return Err(format!("work {} is leased to another connection", result.id));
        }
        if result.samples.len() != self.plan.group_size {
            return Err(format!("{} samples for a group of {}", result.samples.len(), self.plan.group_size));
        }
        for sample in &result.samples {
            sample.validate().map_err(|e| e.to_string())?;
            if sample.prompt_token_ids.is_empty() || sample.response_token_ids.len() > self.plan.max_response {
                return Err(format!(
                    "a sample with {} prompt and {} response tokens (at least 1, and at most {})",
                    sample.prompt_token_ids.len(),
                    sample.response_token_ids.len(),
                    self.plan.max_response
                ));
            }
            let ids = sample.prompt_token_ids.iter().chain(&sample.response_token_ids);
            if let Some(id) = ids.copied().find(|&id| id as usize >= self.plan.vocab_size) {
                return Err(format!("token id {id} is past the model's vocabulary of {}", self.plan.vocab_size));
            }
            if sample.policy_version < self.min_version(item.step) {
                return Err(format!(
                    "samples of policy version {} are too old for step {} (rl.max_staleness = {})",
                    sample.policy_version, item.step, self.plan.max_staleness
                ));
            }
        }
        self.leased.remove(&result.id);
        self.done.entry(item.step).or_default().insert(item.slot, result);
        Ok(())
    }

    /// Puts a closed connection's leases back at the front of the queue.
    fn release(&mut self, conn: u64) {
        let mut back: Vec<WorkItem> =
            self.leased.iter().filter(|(_, (c, _))| *c == conn).map(|(_, (_, item))| item.clone()).collect();
        back.sort_by_key(|i| std::cmp::Reverse((i.step, i.slot)));
        for item in back {
            self.leased.remove(&item.id);
            tracing::info!(step = item.step, slot = item.slot, "work of a lost rollout actor queued again");
            self.queue.push_front(item);
        }
    }
}

/// Shared by the trainer thread and the connection threads.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    token: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A connection thread that panicked leaves consistent data behind (every change is one
        // statement under the lock): keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The trainer's side of rollouts (see the module docs).
pub struct RolloutController {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for RolloutController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutController").field("addr", &self.addr).finish()
    }
}

impl RolloutController {
    /// Listens on `bind` (port 0 for any) for actors that know `token`.
    pub fn start(bind: SocketAddr, token: &str, plan: RolloutPlan) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let order = PromptOrder::new(plan.seed, plan.prompt_count, plan.prompts_per_step);
        let next_step = plan.first_step;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                plan,
                order,
                published: None,
                next_step,
                queue: VecDeque::new(),
                leased: HashMap::new(),
                done: BTreeMap::new(),
                opened: HashMap::new(),
                next_id: 0,
                stopped: false,
                rejected: 0,
            }),
            changed: Condvar::new(),
            token: token.to_string(),
        });
        let accepting = shared.clone();
        std::thread::Builder::new().name("rollout-accept".into()).spawn(move || accept_actors(listener, accepting))?;
        Ok(Self { shared, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// New weights are out: generation may now reach `version + rl.max_staleness`.
    pub fn published(&self, generation: u64, version: u64) {
        let mut state = self.shared.lock();
        state.published = Some((generation, version));
        state.open_steps();
        self.shared.changed.notify_all();
    }

    /// Waits for every group of `step`, up to `patience` without any new group arriving.
    pub fn take_step(&self, step: u64, patience: Duration) -> Result<StepRollouts, RolloutError> {
        let mut state = self.shared.lock();
        let mut have = 0;
        let mut last_progress = Instant::now();
        loop {
            let done = state.done.get(&step).map_or(0, BTreeMap::len);
            if done == state.plan.prompts_per_step {
                let groups = state.done.remove(&step).unwrap_or_default().into_values().collect();
                let wall_seconds = state.opened.remove(&step).map_or(0.0, |t| t.elapsed().as_secs_f64());
                return Ok(StepRollouts { groups, wall_seconds });
            }
            if done != have {
                have = done;
                last_progress = Instant::now();
            }
            let waited = last_progress.elapsed();
            if waited >= patience {
                return Err(RolloutError::NoProgress {
                    step,
                    have,
                    want: state.plan.prompts_per_step,
                    waited,
                    queued: state.queue.len(),
                    leased: state.leased.len(),
                });
            }
            let (next, _) = self
                .shared
                .changed
                .wait_timeout(state, (patience - waited).min(Duration::from_secs(1)))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state = next;
        }
    }

    /// Tells every actor that asks from now on that training is over.
    pub fn stop(&self) {
        let mut state = self.shared.lock();
        state.stopped = true;
        self.shared.changed.notify_all();
    }

    /// Results refused so far (stale, duplicate or unknown work).
    pub fn rejected(&self) -> u64 {
        self.shared.lock().rejected
    }
}

impl Drop for RolloutController {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_actors(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_conn = 0u64;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        next_conn += 1;
        let (conn, shared) = (next_conn, shared.clone());
        // One thread per actor: a handful of actors per trainer, each mostly waiting.
        let spawned = std::thread::Builder::new().name(format!("rollout-conn-{conn}")).spawn(move || {
            let peer = stream.peer_addr().ok();
            match serve_actor(stream, &shared, conn) {
                Ok(()) | Err(WireError::Closed) => {}
                Err(e) => tracing::warn!(?peer, error = %e, "rollout actor connection ended"),
            }
            shared.lock().release(conn);
            shared.changed.notify_all();
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve a rollout actor");
        }
    }
}

fn serve_actor(stream: TcpStream, shared: &Shared, conn_id: u64) -> Result<(), WireError> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let mut conn = Conn::new(stream)?;
    let challenge = nonce()?;
    conn.send(&ToActor::Challenge { nonce: challenge.clone() })?;
    let FromActor::Hello { rank, proof, .. } = conn.recv()? else {
        return Err(WireError::Auth("the first message was not a hello".into()));
    };
    if !verify(&shared.token, &challenge, &proof) {
        return Err(WireError::Auth("wrong proof of the job token".into()));
    }
    conn.stream().set_read_timeout(None)?;
    let attempt = shared.lock().plan.trainer_attempt;
    conn.send(&ToActor::Welcome { trainer_attempt: attempt })?;
    tracing::info!(actor = rank, "rollout actor connected");
    loop {
        let reply = match conn.recv::<FromActor>()? {
            FromActor::Hello { .. } => return Err(WireError::Malformed("a second hello".into())),
            FromActor::Want { max } => {
                let mut state = shared.lock();
                if state.stopped { ToActor::Stop } else { hand_out(&mut state, conn_id, max.max(1)) }
            }
            FromActor::Done(result) => {
                let mut state = shared.lock();
                match state.accept(conn_id, result) {
                    Ok(()) => {
                        shared.changed.notify_all();
                        ToActor::Accepted
                    }
                    Err(reason) => {
                        state.rejected += 1;
                        tracing::warn!(actor = rank, %reason, "rollout result refused");
                        ToActor::Rejected { reason }
                    }
                }
            }
        };
        let stop = reply == ToActor::Stop;
        conn.send(&reply)?;
        if stop {
            return Ok(());
        }
    }
}

/// Leases up to `max` queued prompts of one step to a connection.
fn hand_out(state: &mut State, conn: u64, max: usize) -> ToActor {
    let Some((generation, _)) = state.published else { return ToActor::Wait { ms: IDLE_WAIT_MS } };
    let Some(step) = state.queue.front().map(|i| i.step) else { return ToActor::Wait { ms: IDLE_WAIT_MS } };
    let mut items = Vec::new();
    while items.len() < max && state.queue.front().is_some_and(|i| i.step == step) {
        if let Some(item) = state.queue.pop_front() {
            state.leased.insert(item.id, (conn, item.clone()));
            items.push(item);
        }
    }
    ToActor::Work { items, generation, min_version: state.min_version(step) }
}
