//! The rollout protocol between the trainer's rollout controller and the actors: JSON lines over
//! TCP. The controller opens with a random challenge; an actor answers with an HMAC of it under
//! the job token before anything else is read, so only processes of the job can take work or
//! hand in samples.
//!
//! After the greeting the actor asks and the controller answers, one line each:
//! `want` → `work` (prompts to generate for) | `wait` | `stop`; `done` (the samples of a work
//! item) → `accepted` | `rejected` (with why: stale, unknown or duplicate work).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::sample::Sample;

/// The longest line either side accepts (a work item's samples); larger ones are refused.
pub const MAX_LINE: usize = 64 << 20;

/// One prompt to generate `group_size` samples for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// Unique within a controller's life; results are matched by it.
    pub id: u64,
    /// The RL step whose batch the samples go into.
    pub step: u64,
    /// Position of the prompt in the step's batch.
    pub slot: usize,
    /// Index of the prompt in the training prompts.
    pub prompt: usize,
    /// Seed of the sampling streams of this group.
    pub seed: u64,
}

/// Messages from the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToActor {
    Challenge {
        nonce: String,
    },
    Welcome {
        trainer_attempt: u32,
    },
    /// Generate for these prompts with weights of publisher `generation`, version at least
    /// `min_version`.
    Work {
        items: Vec<WorkItem>,
        generation: u64,
        min_version: u64,
    },
    /// Nothing to do yet; ask again after this many milliseconds.
    Wait {
        ms: u64,
    },
    /// Training is over.
    Stop,
    Accepted,
    Rejected {
        reason: String,
    },
}

/// Messages from an actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromActor {
    Hello {
        rank: u32,
        attempt: u32,
        proof: String,
    },
    /// Up to `max` prompts.
    Want {
        max: usize,
    },
    Done(GroupResult),
}

/// The samples of one work item and what they cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupResult {
    pub id: u64,
    pub samples: Vec<Sample>,
    /// Seconds the actor spent generating and scoring the work it got with this item (shared
    /// equally by the items generated together).
    pub gen_seconds: f64,
    /// Seconds the actor spent loading new weights before generating.
    pub sync_seconds: f64,
    /// The rollout actor that made it.
    pub actor: u32,
}

/// Errors of the rollout protocol.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("a message of more than {MAX_LINE} bytes")]
    TooLong,
    #[error("authentication failed: {0}")]
    Auth(String),
}

/// One side of a connection: buffered reads of lines, writes of one line per message.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.writer.peer_addr().ok()).finish()
    }
}

impl Conn {
    pub fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    pub fn send<T: Serialize>(&mut self, message: &T) -> Result<(), WireError> {
        let mut line = serde_json::to_vec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, WireError> {
        let mut line = Vec::new();
        // `take` bounds what a peer can make us buffer.
        let n = Read::by_ref(&mut self.reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(WireError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if line.len() > MAX_LINE { WireError::TooLong } else { WireError::Closed });
        }
        serde_json::from_slice(&line).map_err(|e| WireError::Malformed(e.to_string()))
    }
}

/// HMAC-SHA256 of `nonce` under the job token, in hex.
pub fn proof(token: &str, nonce: &str) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(b"rtrain-rollout-v1:");
    mac.update(nonce.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Whether `proof` is the HMAC of `nonce` under `token` (compared in constant time).
pub fn verify(token: &str, nonce: &str, proof: &str) -> bool {
    let expected = self::proof(token, nonce);
    expected.len() == proof.len() && expected.bytes().zip(proof.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// 16 random bytes in hex, from the kernel.
pub fn nonce() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_token_and_nonce() {
        let p = proof("token", "abc");
        assert!(verify("token", "abc", &p));
        assert!(!verify("other", "abc", &p));
        assert!(!verify("token", "abd", &p));
        assert!(!verify("token", "abc", &p[..10]));
    }

    #[test]
    fn messages_round_trip_as_single_lines() {
        let m = ToActor::Work {
            items: vec![WorkItem { id: 1, step: 2, slot: 3, prompt: 4, seed: 5 }],
            generation: 6,
            min_version: 7,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<ToActor>(&text).unwrap(), m);
    }
}
