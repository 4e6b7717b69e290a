//! The beats a process sends on its `Heartbeats` stream: one long-lived call per process, so a
//! beat costs the coordinator one HTTP/2 frame instead of a whole call.

use std::time::Duration;

use tokio_stream::{Stream, StreamExt, wrappers::IntervalStream};

use crate::proto::{HeartbeatRequest, WorkerId};

/// A beat every `every` with the step `step` returns then; only the first names `id`, as the
/// coordinator remembers it for the stream. Beats fall on multiples of `every` of the wall
/// clock, so the coordinator reads the beats of many processes in one wakeup instead of waking
/// for each: spread over the period, 4096 ranks cost it about twice the CPU.
pub fn beats(
    id: WorkerId,
    every: Duration,
    mut step: impl FnMut() -> u64 + Send + 'static,
) -> impl Stream<Item = HeartbeatRequest> + Send + 'static {
    // An interval of period zero panics.
    let every = every.max(Duration::from_millis(1));
    let first = tokio::time::Instant::now() + until_aligned(std::time::SystemTime::now(), every);
    let mut ticks = tokio::time::interval_at(first, every);
    // A process that was paused (or a loaded machine) beats once when it resumes, not in a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = Some(id);
    IntervalStream::new(ticks).map(move |_| HeartbeatRequest { id: id.take(), step: step() })
}

/// Time from `now` to the next multiple of `every` since the Unix epoch (`every` if the clock
/// is before it).
fn until_aligned(now: std::time::SystemTime, every: Duration) -> Duration {
    let (Ok(since), Ok(every_ns)) = (now.duration_since(std::time::UNIX_EPOCH), u64::try_from(every.as_nanos())) else {
        return every;
    };
    match u64::try_from(since.as_nanos()) {
        Ok(since_ns) if every_ns > 0 => Duration::from_nanos(every_ns - since_ns % every_ns),
        _ => every,
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn beats_fall_on_multiples_of_the_period() {
        let second = Duration::from_secs(1);
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(until_aligned(at(5_250), second), Duration::from_millis(750));
        assert_eq!(until_aligned(at(5_000), second), second, "on a multiple: the next one");
        assert_eq!(until_aligned(at(5_250), Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn only_the_first_beat_names_the_worker() {
        let id = WorkerId { role: "trainer".into(), rank: 3, attempt: 1 };
        let mut step = 0;
        let beats = beats(id.clone(), Duration::from_millis(1), move || {
            step += 5;
            step
        });
        let beats: Vec<_> =
            tokio::time::timeout(Duration::from_secs(10), beats.take(3).collect()).await.expect("three beats come");
        let expected: Vec<_> = [(Some(id), 5), (None, 10), (None, 15)]
            .into_iter()
            .map(|(id, step)| HeartbeatRequest { id, step })
            .collect();
        assert_eq!(beats, expected);
    }
}
