//! Rewards computed from the response and the record alone: exact match, the last number against
//! a numeric answer, and a regex format check. Each scores 1 or 0.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::{RewardError, RewardFn, RewardInput, Scored};

/// 1 when the trimmed response equals the record's `field` as text (a string, trimmed, or a
/// number or boolean as JSON writes it).
#[derive(Debug, Clone)]
pub struct ExactMatch {
    field: String,
}

impl ExactMatch {
    pub fn new(field: &str) -> Self {
        Self { field: field.to_string() }
    }
}

impl RewardFn for ExactMatch {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        judge_each(&self.field, inputs, |response, value| {
            let answer = match value {
                Value::String(s) => s.trim().to_string(),
                v @ (Value::Number(_) | Value::Bool(_)) => v.to_string(),
                other => return Err(format!("is {other}, not an answer (use a string or a number)")),
            };
            Ok(response.trim() == answer)
        })
    }
}

/// 1 when the last number in the response is within `tolerance` of the record's `field` (a JSON
/// number, or a string holding one). A response without a number scores 0.
#[derive(Debug, Clone)]
pub struct NumericAnswer {
    field: String,
    tolerance: f64,
}

impl NumericAnswer {
    pub fn new(field: &str, tolerance: f64) -> Self {
        Self { field: field.to_string(), tolerance }
    }
}

impl RewardFn for NumericAnswer {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        let tolerance = self.tolerance;
        judge_each(&self.field, inputs, |response, value| {
            let answer = match value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => parse_number(s),
                _ => None,
            };
            let Some(answer) = answer.filter(|a| a.is_finite()) else {
                return Err(format!("is {value}, not a finite number"));
            };
            // A non-finite guess (an overflowing exponent) is never within tolerance.
            Ok(last_number(response).is_some_and(|g| (g - answer).abs() <= tolerance))
        })
    }
}

/// 1 when the response matches `pattern` anywhere (anchor it with `^...$` for the whole
/// response). A format reward: `correct` is `None`.
#[derive(Debug, Clone)]
pub struct RegexFormat {
    pattern: Regex,
}

impl RegexFormat {
    pub fn new(pattern: &str) -> Result<Self, RewardError> {
        let compiled = Regex::new(pattern)
            .map_err(|e| RewardError::Pattern { pattern: pattern.to_string(), message: e.to_string() })?;
        Ok(Self { pattern: compiled })
    }
}

impl RewardFn for RegexFormat {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        Ok(inputs
            .iter()
            .map(|i| Scored { reward: if self.pattern.is_match(i.response) { 1.0 } else { 0.0 }, correct: None })
            .collect())
    }
}

/// Scores each input by `judge(response, the record's field)`: right or wrong, or a problem with
/// the field, which becomes an error naming the input and the field (as does a missing field).
fn judge_each(
    field: &str,
    inputs: &[RewardInput<'_>],
    judge: impl Fn(&str, &Value) -> Result<bool, String>,
) -> Result<Vec<Scored>, RewardError> {
    inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let bad = |problem: String| RewardError::Record { index, field: field.to_string(), problem };
            let value = input.record.get(field).ok_or_else(|| bad("is missing".into()))?;
            judge(input.response, value).map(verdict).map_err(bad)
        })
        .collect()
}

fn verdict(correct: bool) -> Scored {
    Scored { reward: if correct { 1.0 } else { 0.0 }, correct: Some(correct) }
}

/// A signed decimal number: thousands groups with commas (`1,234,567`), an optional fraction and
/// exponent; the sign may be the Unicode minus `−` (U+2212). Digits are ASCII only.
#[allow(clippy::expect_used)] // a constant pattern, covered by the tests
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[-+\x{2212}]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
        .expect("the number pattern compiles")
});

/// The last number written in `text`, as GSM8K-style graders take the final answer:
/// "The answer is -12.5." → -12.5, "1,234 apples" → 1234. A sign directly after a letter or
/// digit is a hyphen, not a minus ("pages 3-5" → 5).
pub fn last_number(text: &str) -> Option<f64> {
    let m = NUMBER.find_iter(text).last()?;
    let mut number = m.as_str();
    let after_word = text[..m.start()].chars().next_back().is_some_and(char::is_alphanumeric);
    if after_word && number.starts_with(['-', '+', '\u{2212}']) {
        number = number.trim_start_matches(['-', '+', '\u{2212}']);
    }
    parse_number(number)
}

/// `s` as a number after removing thousands commas and surrounding space, with `−` read as `-`.
fn parse_number(s: &str) -> Option<f64> {
    let cleaned: String =
        s.trim().chars().filter(|&c| c != ',').map(|c| if c == '\u{2212}' { '-' } else { c }).collect();
    cleaned.parse().ok()
}
