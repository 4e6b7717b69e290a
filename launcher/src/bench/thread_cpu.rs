//! CPU time used by the threads of one tokio runtime, so a benchmark can tell what its
//! coordinator costs apart from the simulated clients in the same process.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The threads of a runtime enrol when they start and retire when they stop, adding what they
/// used to `retired`: a reading covers threads that came and went between two readings.
#[derive(Default)]
pub(crate) struct RuntimeCpu {
    threads: Mutex<Threads>,
}

#[derive(Default)]
struct Threads {
    live: Vec<libc::pthread_t>,
    retired: Duration,
}

impl RuntimeCpu {
    /// A multi-threaded runtime of `workers` threads named `name`, its CPU time counted here.
    pub(crate) fn runtime(self: &Arc<Self>, name: &str, workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
        let (start, stop) = (self.clone(), self.clone());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .on_thread_start(move || start.enrol())
            .on_thread_stop(move || stop.retire())
            .enable_all()
            .build()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Threads> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enrol(&self) {
        // SAFETY: returns the calling thread's handle; no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().live.push(me);
    }

    fn retire(&self) {
        // SAFETY: as in `enrol`.
        let me = unsafe { libc::pthread_self() };
        let used = cpu_time(me);
        let mut threads = self.lock();
        threads.live.retain(|t| *t != me);
        threads.retired += used;
    }

    /// CPU time (user + system) of every thread of the runtime so far.
    pub(crate) fn total(&self) -> Duration {
        // Held while reading: a live thread cannot get past `retire` and exit, so its handle is valid.
        let threads = self.lock();
        threads.retired + threads.live.iter().map(|t| cpu_time(*t)).sum::<Duration>()
    }
}

/// CPU time a live thread has used (zero if the clock cannot be read).
fn cpu_time(thread: libc::pthread_t) -> Duration {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `thread` is a live thread of this process (see `total`); both out-pointers are valid.
    let ok =
        unsafe { libc::pthread_getcpuclockid(thread, &mut clock) == 0 && libc::clock_gettime(clock, &mut ts) == 0 };
    if !ok {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the calling thread busy until it has used `d` of CPU.
    fn spin(d: Duration) {
        // SAFETY: the calling thread's handle.
        let me = unsafe { libc::pthread_self() };
        let start = cpu_time(me);
        while cpu_time(me) - start < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn counts_the_work_of_the_runtime_threads_only() {
        let cpu = Arc::new(RuntimeCpu::default());
        let runtime = cpu.runtime("cpu-test", 1).unwrap();
        let idle = cpu.total();
        spin(Duration::from_millis(100));
        assert!(cpu.total() - idle < Duration::from_millis(50), "the test's own thread is not counted");
        runtime.block_on(runtime.spawn(async { spin(Duration::from_millis(200)) })).unwrap();
        let busy = cpu.total() - idle;
        assert!(busy >= Duration::from_millis(200), "{busy:?}");
        drop(runtime);
        assert!(cpu.total() - idle >= busy, "stopped threads keep their time");
    }
}
