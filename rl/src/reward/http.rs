//! A remote reward endpoint over plain HTTP, for scorers written in any language.
//!
//! The protocol: one `POST url` per batch, `Content-Type: application/json`,
//!
//! ```json
//! {"items": [{"prompt": "...", "response": "...", "record": {"answer": "42", ...}}, ...]}
//! ```
//!
//! answered with status 200 and
//!
//! ```json
//! {"rewards": [1.0, 0.0, ...], "correct": [true, false, ...]}
//! ```
//!
//! one finite number per item, in order; `correct` is optional (entries may be `null`) and is
//! reported as accuracy. A timeout (the whole exchange), a failed connection or status 408, 429 or
//! 5xx is retried up to `retries` times after 100 ms, 200 ms, 400 ms, ... (at most 2 s); any
//! other answer fails at once, naming the URL and what was wrong.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{EndpointFailure, RewardError, RewardFn, RewardInput, Scored};

/// The most bytes of a response read; a reward list is far smaller.
const MAX_BODY: u64 = 64 << 20;
/// Bytes of an error response quoted in the error.
const QUOTED: usize = 200;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Scores by POSTing each batch to an HTTP endpoint (see the module documentation).
#[derive(Debug)]
pub struct HttpReward {
    url: String,
    timeout: Duration,
    retries: u32,
    agent: ureq::Agent,
}

#[derive(Serialize)]
struct Request<'a> {
    items: Vec<Item<'a>>,
}

#[derive(Serialize)]
struct Item<'a> {
    prompt: &'a str,
    response: &'a str,
    record: &'a Map<String, Value>,
}

#[derive(Deserialize)]
struct Reply {
    rewards: Vec<Value>,
    #[serde(default)]
    correct: Option<Vec<Option<bool>>>,
}

impl HttpReward {
    /// An endpoint at `url` (`http://`), each attempt given `timeout` in all, failed attempts
    /// tried again up to `retries` times.
    pub fn new(url: &str, timeout: Duration, retries: u32) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // A redirect would turn the POST into a GET; report it as the status it is.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .build();
        Self { url: url.to_string(), timeout, retries, agent: config.into() }
    }

    /// One request and its checked answer.
    fn attempt(&self, body: &[u8], expected: usize) -> Result<Vec<Scored>, EndpointFailure> {
        let mut response = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| self.failure(e))?;
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(MAX_BODY).read_to_string().map_err(|e| self.failure(e))?;
        if status != 200 {
            let quoted: String = text.chars().take(QUOTED).collect();
            return Err(EndpointFailure::Status { status, body: quoted });
        }
        let reply: Reply = serde_json::from_str(&text).map_err(|e| {
            // Python's json.dumps writes NaN and Infinity, which are not JSON.
            if ["NaN", "Infinity"].iter().any(|t| text.contains(t)) {
                EndpointFailure::NonFinite { index: 0, value: format!("NaN or Infinity in the body: {e}") }
            } else {
                EndpointFailure::BadJson(e.to_string())
            }
        })?;
        if reply.rewards.len() != expected {
            return Err(EndpointFailure::WrongCount { expected, got: reply.rewards.len() });
        }
        let correct = reply.correct.unwrap_or_else(|| vec![None; expected]);
        if correct.len() != expected {
            return Err(EndpointFailure::BadJson(format!(
                "`correct` has {} entries for {expected} items",
                correct.len()
            )));
        }
        reply
            .rewards
            .iter()
            .zip(correct)
            .enumerate()
            .map(|(index, (reward, correct))| match reward {
                // serde_json holds only finite numbers.
                Value::Number(n) => match n.as_f64() {
                    Some(reward) if reward.is_finite() => Ok(Scored { reward, correct }),
                    _ => Err(EndpointFailure::NonFinite { index, value: n.to_string() }),
                },
                // What JavaScript's JSON.stringify writes for NaN and ±Infinity.
                Value::Null => Err(EndpointFailure::NonFinite { index, value: "null".into() }),
                other => Err(EndpointFailure::BadJson(format!("reward {index} is {other}, not a number"))),
            })
            .collect()
    }

    fn failure(&self, e: ureq::Error) -> EndpointFailure {
        use std::io::ErrorKind;
        match e {
            ureq::Error::Timeout(_) => EndpointFailure::Timeout(self.timeout),
            ureq::Error::Io(io) if matches!(io.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                EndpointFailure::Timeout(self.timeout)
            }
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    ErrorKind::ConnectionRefused
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::NotConnected
                ) =>
            {
                EndpointFailure::Connect(io.to_string())
            }
            ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => EndpointFailure::Connect(e.to_string()),
            other => EndpointFailure::Transport(other.to_string()),
        }
    }
}

impl RewardFn for HttpReward {
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<Scored>, RewardError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let request = Request {
            items: inputs.iter().map(|i| Item { prompt: i.prompt, response: i.response, record: i.record }).collect(),
        };
        let endpoint = |attempts: u32, failure: EndpointFailure| RewardError::Endpoint {
            url: self.url.clone(),
            attempts,
            failure,
        };
        let body = serde_json::to_vec(&request).map_err(|e| endpoint(0, EndpointFailure::Transport(e.to_string())))?;
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(&body, inputs.len()) {
                Ok(scores) => return Ok(scores),
                Err(failure) if failure.is_retryable() && attempts <= self.retries => {
                    tracing::warn!(url = %self.url, attempt = attempts, error = %failure, "reward endpoint failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(failure) => return Err(endpoint(attempts, failure)),
            }
        }
    }
}
