//! Training from preference pairs (`train.trainer = "dpo"` or `"rm"`): a Hugging Face model
//! folder learns from JSONL lines of a prompt with a chosen and a rejected response. `"rm"`
//! trains a reward model (the folder's body under a scalar head, Bradley–Terry loss); `"dpo"`
//! trains the policy directly against a frozen copy of itself, with the settings of `[dpo]`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::choice::choice;
use super::rl::EvalSet;

choice!(
    /// `dpo.loss`: the preference loss on the log-ratio margin.
    DpoLossChoice, "a DPO loss", { Sigmoid = "sigmoid", Robust = "robust", Ipo = "ipo" }
);

/// The file in the run directory where a preference trainer records its held-out scores before
/// and after training; `summary.json` carries them as `preference`.
pub const EVAL_FILE: &str = "preference_eval.json";

/// Share of the pairs held out when the config names neither `data.eval_fraction` nor
/// `data.eval_path`.
const DEFAULT_EVAL_FRACTION: f64 = 0.05;

/// `[dpo]` as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSection {
    /// Strength of the pull towards the reference model (DPO's β).
    pub beta: f64,
    /// `"sigmoid"` (DPO), `"robust"` (robust DPO, with `label_smoothing`) or `"ipo"` (IPO's
    /// squared loss on length-averaged log-ratios).
    pub loss: DpoLossChoice,
    /// Robust DPO: the share of pairs assumed mislabelled.
    pub label_smoothing: f64,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self { beta: 0.1, loss: DpoLossChoice::Sigmoid, label_smoothing: 0.0 }
    }
}

/// What the pairs train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// A reward model: scalar head, Bradley–Terry loss (minus a `margin` field when lines have one).
    RewardModel,
    Dpo {
        beta: f64,
        loss: DpoLossChoice,
        label_smoothing: f64,
    },
}

/// A resolved preference job.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceSpec {
    pub model: PathBuf,
    /// Prompt and response together are cut to this many tokens.
    pub max_len: usize,
    pub objective: Objective,
    pub eval: EvalSet,
}

/// Checks `[dpo]` (present only for DPO) and the held-out split; errors name `(key, message)`.
pub fn resolve_objective(
    dpo: Option<&DpoSection>,
    is_dpo: bool,
    eval_path: &str,
    eval_fraction: Option<f64>,
) -> Result<(Objective, EvalSet), (String, String)> {
    let objective = match (is_dpo, dpo) {
        (false, Some(_)) => {
            return Err(("dpo".into(), "is read only by train.trainer = \"dpo\"; remove the section".into()));
        }
        (false, None) => Objective::RewardModel,
        (true, section) => {
            let d = section.cloned().unwrap_or_default();
            if !(d.beta.is_finite() && d.beta > 0.0 && d.beta <= 1e3) {
                return Err(("dpo.beta".into(), format!("must be above 0 (typically 0.01 to 0.5), got {}", d.beta)));
            }
            if !(d.label_smoothing.is_finite() && (0.0..0.5).contains(&d.label_smoothing)) {
                return Err((
                    "dpo.label_smoothing".into(),
                    format!("must be from 0 up to (not including) 0.5, got {}", d.label_smoothing),
                ));
            }
            if (d.loss == DpoLossChoice::Robust) != (d.label_smoothing > 0.0) {
                let message = if d.loss == DpoLossChoice::Robust {
                    "must be above 0 with loss = \"robust\" (the share of pairs assumed mislabelled)".to_string()
                } else {
                    format!(
                        "applies to loss = \"robust\" (robust DPO) only; set loss = \"robust\" or remove it (loss is \"{}\")",
                        d.loss.as_str()
                    )
                };
                return Err(("dpo.label_smoothing".into(), message));
            }
            Objective::Dpo { beta: d.beta, loss: d.loss, label_smoothing: d.label_smoothing }
        }
    };
    let eval = match (eval_path, eval_fraction) {
        ("", None) => EvalSet::Fraction(DEFAULT_EVAL_FRACTION),
        ("", Some(f)) if f.is_finite() && f > 0.0 && f < 1.0 => EvalSet::Fraction(f),
        ("", Some(f)) => {
            return Err((
                "data.eval_fraction".into(),
                format!("must be above 0 and below 1 (or name data.eval_path), got {f}"),
            ));
        }
        (_, Some(_)) => {
            return Err((
                "data.eval_fraction".into(),
                "set either data.eval_path or data.eval_fraction, not both".into(),
            ));
        }
        (path, None) => EvalSet::File(PathBuf::from(path)),
    };
    Ok((objective, eval))
}
