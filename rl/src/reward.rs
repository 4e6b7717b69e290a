//! Rewards of rollout samples (exact and numeric answers).

use rtrain_core::config::reward::RewardSpec;

/// What a reward sees of one sample.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub response: &'a str,
    pub record: &'a serde_json::Map<String, serde_json::Value>,
}

/// A sample's reward, and whether it is correct where that is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub reward: f64,
    pub correct: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("{0}")]
    Unsupported(String),
}

/// Scores samples.
pub trait RewardFn: Send {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError>;
}

struct Verifiable(RewardSpec);

impl RewardFn for Verifiable {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        Ok(inputs
            .iter()
            .map(|i| {
                let ok = match &self.0 {
                    RewardSpec::Exact { field } => i.record.get(field).is_some_and(|v| match v {
                        serde_json::Value::String(s) => s.trim() == i.response.trim(),
                        other => other.to_string() == i.response.trim(),
                    }),
                    RewardSpec::Numeric { field, tolerance } => {
                        let want =
                            i.record.get(field).and_then(|v| v.as_f64().or_else(|| v.as_str()?.trim().parse().ok()));
                        let got = i
                            .response
                            .split(|c: char| !(c.is_ascii_digit() || c == '-' || c == '.'))
                            .filter(|t| !t.is_empty())
                            .last()
                            .and_then(|t| t.parse::<f64>().ok());
                        matches!((want, got), (Some(w), Some(g)) if (w - g).abs() <= *tolerance)
                    }
                    _ => false,
                };
                Scored { reward: f64::from(u8::from(ok)), correct: Some(ok) }
            })
            .collect())
    }
}

pub fn build_reward(spec: &RewardSpec) -> Result<Box<dyn RewardFn>, RewardError> {
    match spec {
        RewardSpec::Exact { .. } | RewardSpec::Numeric { .. } => Ok(Box::new(Verifiable(spec.clone()))),
        other => Err(RewardError::Unsupported(format!("{other:?}"))),
    }
}
