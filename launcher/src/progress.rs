//! The terminal view of a run: an indicatif bar fed by rank 0's step metrics, or plain lines
//! every tenth of the run when stderr is not a terminal (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use crate::proto::StepMetrics;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct RunProgress {
    bar: ProgressBar,
    total: u64,
    interactive: bool,
    restarts: std::sync::atomic::AtomicU32,
}

impl RunProgress {
    pub fn new(total_steps: u64) -> Self {
        let interactive = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr_with_hz(8));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner:.green} {prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix("starting");
        if interactive {
            bar.enable_steady_tick(Duration::from_millis(200));
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self { bar, total: total_steps, interactive, restarts: Default::default() }
    }

    /// Shows the phase the launch is in (scheduling, rendezvous, training, ...).
    pub fn set_phase(&self, phase: &str) {
        self.bar.set_prefix(phase.to_string());
    }

    /// Shows which attempt is running and how many restarts came before it.
    pub fn set_attempt(&self, attempt: u32, restarts: u32) {
        if restarts > 0 {
            self.println(&format!(
                "attempt {attempt} starting ({restarts} restart{} so far)",
                if restarts == 1 { "" } else { "s" }
            ));
        }
        self.restarts.store(restarts, std::sync::atomic::Ordering::Relaxed);
    }

    /// Moves the bar to `step` (a resumed run).
    pub fn set_position(&self, step: u64) {
        self.bar.set_position(step);
    }

    pub fn on_step(&self, m: &StepMetrics) {
        self.bar.set_position(m.step);
        let restarts = self.restarts.load(std::sync::atomic::Ordering::Relaxed);
        let mut message = format!("loss {:.4} | {} tok/s", m.loss, human(m.tokens_per_s));
        if restarts > 0 {
            message.push_str(&format!(" | attempt {} ({restarts} restarts)", m.id.as_ref().map_or(0, |id| id.attempt)));
        }
        self.bar.set_message(message.clone());
        let every = (self.total / 10).max(1);
        if !self.interactive && (m.step.is_multiple_of(every) || m.step == self.total) {
            eprintln!("step {}/{} {message} lr {:.3e}", m.step, self.total, m.lr);
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        if self.interactive {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
