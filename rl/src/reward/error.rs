//! What can go wrong while scoring, naming the input, record field or endpoint involved.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the reward functions. [`RewardError::is_retryable`] tells a rollout actor whether
/// scoring the same batch again may succeed.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// A record lacks the field a verifiable reward compares against, or holds no usable answer.
    #[error("input {index}: record field `{field}` {problem}")]
    Record { index: usize, field: String, problem: String },

    /// A regex reward's pattern does not compile.
    #[error("reward pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },

    /// The remote reward endpoint failed on every attempt; `failure` is the last attempt's.
    #[error("reward endpoint {url}: {failure} (after {attempts} attempt{})", if *attempts == 1 { "" } else { "s" })]
    Endpoint { url: String, attempts: u32, failure: EndpointFailure },

    /// A reward model folder failed to load or to score (bad config, weights or input).
    #[error("reward model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },
}

impl RewardError {
    /// Whether the same batch may score on a later try (the endpoint was down or slow).
    pub fn is_retryable(&self) -> bool {
        matches!(self, RewardError::Endpoint { failure, .. } if failure.is_retryable())
    }
}

/// Why one request to a reward endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointFailure {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, or the host not found.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// A status other than 200; `body` is the start of what it sent.
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("response is not {{\"rewards\": [numbers...]}}: {0}")]
    BadJson(String),
    #[error("{got} rewards for {expected} items")]
    WrongCount { expected: usize, got: usize },
    #[error("reward {index} is not a finite number ({value})")]
    NonFinite { index: usize, value: String },
    /// Any other failure of the HTTP exchange.
    #[error("{0}")]
    Transport(String),
}

impl EndpointFailure {
    /// Failures worth another attempt: the endpoint was unreachable, slow, overloaded or
    /// failing internally. A malformed answer is not retried: it would come back the same.
    pub fn is_retryable(&self) -> bool {
        match self {
            EndpointFailure::Timeout(_) | EndpointFailure::Connect(_) | EndpointFailure::Transport(_) => true,
            EndpointFailure::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            EndpointFailure::BadJson(_) | EndpointFailure::WrongCount { .. } | EndpointFailure::NonFinite { .. } => {
                false
            }
        }
    }
}
