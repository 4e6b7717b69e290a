//! The rollout controller over real sockets: authentication, leases that come back when an
//! actor's connection closes, results taken once, and generation held to the staleness bound.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rtrain_rl::rollout::wire::{Conn, FromActor, GroupResult, ToActor, WorkItem, proof};
use rtrain_rl::rollout::{RolloutController, RolloutPlan};
use rtrain_rl::{FinishReason, Reward, Sample};

const TOKEN: &str = "job-token";

fn plan(max_staleness: u64) -> RolloutPlan {
    RolloutPlan {
        first_step: 0,
        steps: 100,
        prompts_per_step: 4,
        group_size: 2,
        max_staleness,
        seed: 1,
        prompt_count: 10,
        trainer_attempt: 0,
        vocab_size: 10,
        max_response: 3,
    }
}

fn start(max_staleness: u64) -> RolloutController {
    RolloutController::start(SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN, plan(max_staleness)).unwrap()
}

fn connect(controller: &RolloutController, token: &str) -> Conn {
    let stream = TcpStream::connect(controller.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut conn = Conn::new(stream).unwrap();
    let ToActor::Challenge { nonce } = conn.recv().unwrap() else { panic!("no challenge") };
    conn.send(&FromActor::Hello { rank: 0, attempt: 0, proof: proof(token, &nonce) }).unwrap();
    conn
}

fn welcomed(controller: &RolloutController) -> Conn {
    let mut conn = connect(controller, TOKEN);
    assert!(matches!(conn.recv::<ToActor>().unwrap(), ToActor::Welcome { .. }));
    conn
}

fn want(conn: &mut Conn, max: usize) -> ToActor {
    conn.send(&FromActor::Want { max }).unwrap();
    conn.recv().unwrap()
}

fn samples(item: &WorkItem, version: u64) -> Vec<Sample> {
    (0..2)
        .map(|k| Sample {
            prompt_id: format!("p{}", item.prompt),
            group_id: item.id,
            prompt_token_ids: vec![1, 2],
            response_token_ids: vec![3],
            loss_mask: vec![true],
            behaviour_log_probs: vec![-0.5],
            policy_version: version,
            reward: Reward { total: k as f64, components: Default::default() },
            finish_reason: FinishReason::Stop,
        })
        .collect()
}

fn done(conn: &mut Conn, item: &WorkItem, version: u64) -> ToActor {
    hand_in(conn, item, samples(item, version))
}

fn hand_in(conn: &mut Conn, item: &WorkItem, samples: Vec<Sample>) -> ToActor {
    let result = GroupResult { id: item.id, samples, gen_seconds: 0.0, sync_seconds: 0.0, actor: 0 };
    conn.send(&FromActor::Done(result)).unwrap();
    conn.recv().unwrap()
}

fn items(reply: ToActor) -> Vec<WorkItem> {
    match reply {
        ToActor::Work { items, .. } => items,
        other => panic!("expected work, got {other:?}"),
    }
}

#[test]
fn an_actor_without_the_token_gets_nothing() {
    let controller = start(0);
    controller.published(1, 0);
    let mut conn = connect(&controller, "wrong");
    assert!(conn.recv::<ToActor>().is_err(), "the connection must close");
}

#[test]
fn nothing_is_handed_out_before_weights_are_published() {
    let controller = start(0);
    let mut conn = welcomed(&controller);
    assert!(matches!(want(&mut conn, 4), ToActor::Wait { .. }));
    controller.published(1, 0);
    assert_eq!(items(want(&mut conn, 4)).len(), 4);
}

#[test]
fn a_closed_connection_gives_its_prompts_back_and_results_count_once() {
    let controller = start(0);
    controller.published(1, 0);
    let mut first = welcomed(&controller);
    let held = items(want(&mut first, 3));
    assert_eq!(held.len(), 3);
    // One group is handed in; then the actor dies with two in hand.
    assert_eq!(done(&mut first, &held[0], 0), ToActor::Accepted);
    drop(first);
    let mut second = welcomed(&controller);
    let mut got = Vec::new();
    while got.len() < 3 {
        match want(&mut second, 4) {
            ToActor::Work { items, .. } => got.extend(items),
            ToActor::Wait { .. } => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("{other:?}"),
        }
    }
    let mut slots: Vec<usize> = got.iter().map(|i| i.slot).collect();
    slots.sort_unstable();
    assert_eq!(slots, vec![1, 2, 3], "the lost actor's two prompts and the untouched one");
    for item in &got {
        assert_eq!(done(&mut second, item, 0), ToActor::Accepted);
    }
    // A second copy of a taken result is refused.
    assert!(matches!(done(&mut second, &got[0], 0), ToActor::Rejected { .. }));
    let step = controller.take_step(0, Duration::from_secs(10)).unwrap();
    assert_eq!(step.groups.len(), 4);
    assert_eq!(step.groups.iter().map(|g| g.samples.len()).sum::<usize>(), 8);
    assert_eq!(controller.rejected(), 1);
}

#[test]
fn generation_runs_at_most_max_staleness_versions_ahead() {
    let controller = start(1);
    controller.published(1, 0);
    let mut conn = welcomed(&controller);
    // Versions 0 and 1 may make step 0 and step 1; step 2 waits for version 1.
    let mut steps = std::collections::BTreeSet::new();
    for _ in 0..2 {
        match want(&mut conn, 4) {
            ToActor::Work { items, min_version, .. } => {
                assert_eq!(min_version, items[0].step.saturating_sub(1));
                steps.extend(items.iter().map(|i| i.step));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(steps.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    assert!(matches!(want(&mut conn, 4), ToActor::Wait { .. }));
    controller.published(1, 1);
    let next = items(want(&mut conn, 4));
    assert!(next.iter().all(|i| i.step == 2));
    // A step-2 result made with version 0 is too old.
    match done(&mut conn, &next[0], 0) {
        ToActor::Rejected { reason } => assert!(reason.contains("too old"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_step_without_progress_fails_with_a_message_naming_the_actors() {
    let controller = start(0);
    controller.published(1, 0);
    let err = controller.take_step(0, Duration::from_millis(300)).unwrap_err().to_string();
    assert!(err.contains("0 of 4 prompt groups") && err.contains("rollout-*.log"), "{err}");
}

#[test]
fn samples_the_model_cannot_take_are_refused() {
    let controller = start(0);
    controller.published(1, 0);
    let mut conn = welcomed(&controller);
    let item = items(want(&mut conn, 1)).remove(0);
    let mut past_vocab = samples(&item, 0);
    past_vocab[1].response_token_ids = vec![10];
    match hand_in(&mut conn, &item, past_vocab) {
        ToActor::Rejected { reason } => assert!(reason.contains("token id 10"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut too_long = samples(&item, 0);
    too_long[0].response_token_ids = vec![1, 2, 3, 4];
    too_long[0].loss_mask = vec![true; 4];
    too_long[0].behaviour_log_probs = vec![-0.1; 4];
    assert!(matches!(hand_in(&mut conn, &item, too_long), ToActor::Rejected { .. }));
    // The lease survives refusals: the right samples are still taken.
    assert_eq!(done(&mut conn, &item, 0), ToActor::Accepted);
}
