//! The terminal view of a run: an indicatif bar fed by rank 0's step metrics, or plain lines
//! every tenth of the run when stderr is not a terminal (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use crate::proto::StepMetrics;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The launcher's terminal view: the training role's bar and one line per other role.
/// A role's line: its name, its bar and the (status, metrics) texts the bar shows.
type RoleLine = (String, ProgressBar, std::sync::Mutex<(String, String)>);

pub struct RunProgress {
    bar: ProgressBar,
    total: u64,
    interactive: bool,
    restarts: std::sync::atomic::AtomicU32,
    /// One line per role beside the trainer: its processes, restarts and latest metrics.
    roles: Vec<RoleLine>,
    /// The training role's own headline metrics (an RL trainer's reward and accuracy), shown
    /// on the bar after the loss.
    trainer_metrics: std::sync::Mutex<String>,
}

/// Prints lines above the run's bar (or plainly when stderr is not a terminal).
#[derive(Clone, Debug)]
pub struct Printer {
    bar: ProgressBar,
    interactive: bool,
}

impl Printer {
    pub fn println(&self, line: &str) {
        if self.interactive {
            self.bar.println(line);
        } else {
            plain_line(line);
        }
    }
}

/// Writes a line to stderr; a reader that went away (`| head`, a closed ssh session) costs the
/// line, never the launch (`eprintln!` would panic and take every worker with it).
fn plain_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Metrics of the training role worth a place on the bar, in this order.
const BAR_METRICS: &[(&str, &str)] = &[("reward_mean", "reward"), ("accuracy", "accuracy"), ("staleness", "staleness")];

impl RunProgress {
    /// `total_steps` of the training role (`None`: the job has none); `roles`: the other roles.
    pub fn new(total_steps: Option<u64>, roles: &[String]) -> Self {
        let interactive = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let total_steps = total_steps.unwrap_or(0);
        let bar = multi.add(ProgressBar::new(total_steps));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner:.green} {prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix("starting");
        let roles = roles
            .iter()
            .map(|name| {
                let line = multi.add(ProgressBar::new_spinner());
                line.set_style(
                    ProgressStyle::with_template("  {prefix:>10} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                line.set_prefix(name.clone());
                (name.clone(), line, std::sync::Mutex::new((String::new(), String::new())))
            })
            .collect();
        if interactive {
            bar.enable_steady_tick(Duration::from_millis(200));
        } else {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self {
            bar,
            total: total_steps,
            interactive,
            restarts: Default::default(),
            roles,
            trainer_metrics: Default::default(),
        }
    }

    /// A role's processes and restarts, shown on its line.
    pub fn set_role_status(&self, role: &str, status: &str) {
        self.update_role(role, |line| line.0 = status.to_string());
    }

    /// The latest metrics a process of `role` reported, shown on the role's line.
    pub fn on_role_metrics(&self, role: &str, metrics: &std::collections::HashMap<String, f64>) {
        if role == crate::config::TRAINING_ROLE {
            let shown: Vec<String> = BAR_METRICS
                .iter()
                .filter_map(|(key, label)| metrics.get(*key).map(|v| format!("{label} {v:.3}")))
                .collect();
            if !shown.is_empty() {
                *self.trainer_metrics.lock().unwrap_or_else(|p| p.into_inner()) = shown.join(" ");
            }
            return;
        }
        let mut named: Vec<(&String, &f64)> = metrics.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let text: Vec<String> = named.iter().map(|(k, v)| format!("{k} {}", human(**v))).collect();
        self.update_role(role, |line| line.1 = text.join(" | "));
    }

    fn update_role(&self, role: &str, change: impl FnOnce(&mut (String, String))) {
        if let Some((_, bar, text)) = self.roles.iter().find(|(name, _, _)| name == role) {
            let mut text = text.lock().unwrap_or_else(|p| p.into_inner());
            change(&mut text);
            let message = match (text.0.is_empty(), text.1.is_empty()) {
                (false, false) => format!("{} | {}", text.0, text.1),
                (false, true) => text.0.clone(),
                _ => text.1.clone(),
            };
            bar.set_message(message);
        }
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
        let extra = self.trainer_metrics.lock().unwrap_or_else(|p| p.into_inner());
        if !extra.is_empty() {
            message.push_str(&format!(" | {extra}"));
        }
        drop(extra);
        if restarts > 0 {
            message.push_str(&format!(" | attempt {} ({restarts} restarts)", m.id.as_ref().map_or(0, |id| id.attempt)));
        }
        self.bar.set_message(message.clone());
        let every = (self.total / 10).max(1);
        if !self.interactive && (m.step.is_multiple_of(every) || m.step == self.total) {
            plain_line(&format!("step {}/{} {message} lr {:.3e}", m.step, self.total, m.lr));
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        self.printer().println(line);
    }

    /// A handle that prints above the bar from any thread.
    pub fn printer(&self) -> Printer {
        Printer { bar: self.bar.clone(), interactive: self.interactive }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        for (_, line, _) in &self.roles {
            line.finish_and_clear();
        }
    }
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if x.fract() == 0.0 || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}
