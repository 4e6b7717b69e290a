//! The handshake that opens each ring connection, and proves that both ends hold the job token.
//!
//! ```text
//! dialer (rank r)                       acceptor (rank r + 1)
//!   hello {r, world, session, nonce_d}  →
//!                                       ←  hello {r + 1, world, session, nonce_a}
//!   proof HMAC(token, "dialer" ‖ t)     →     checked; a wrong proof is refused and dropped
//!                                       ←  verdict {accepted, HMAC(token, "acceptor" ‖ t)}
//! ```
//!
//! `t` holds both nonces, both ranks, the world size and the session (attempt), so a proof is
//! good for one connection only: it cannot be replayed, reflected (the labels differ) or moved
//! to another rank or attempt. The acceptor proves itself only to a dialer that proved itself
//! first. The token never crosses the wire. Connections are not encrypted or authenticated
//! after the handshake: this keeps other local users' processes out of the gang, it is no
//! defence against someone who can rewrite loopback traffic.

use std::io::{self, Read};
use std::net::TcpStream;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ring_transfer::write_all;

/// Native-endian on the wire: a peer with the other byte order sees a wrong magic and is refused,
/// since tensor data is sent in native order too.
const MAGIC: u32 = 0x5254_5243; // "RTRC"
const VERSION: u32 = 2;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const HELLO_LEN: usize = 24 + NONCE_LEN;
const VERDICT_LEN: usize = 4 + MAC_LEN;
const ACCEPTED: u32 = 1;
const REFUSED: u32 = 2;

/// The job token as an HMAC key.
#[derive(Clone)]
pub(super) struct JobKey(Vec<u8>);

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobKey(..)")
    }
}

impl JobKey {
    /// `None` for an empty token, which would prove nothing.
    pub(super) fn new(token: &str) -> Option<Self> {
        (!token.is_empty()).then(|| JobKey(token.as_bytes().to_vec()))
    }

    fn mac(&self, label: &[u8], transcript: &[u8]) -> Hmac<Sha256> {
        // An HMAC key may have any length: `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(label);
        mac.update(transcript);
        mac
    }

    fn prove(&self, label: &[u8], transcript: &[u8]) -> [u8; MAC_LEN] {
        self.mac(label, transcript).finalize().into_bytes().into()
    }

    /// Constant-time comparison of `proof` with the expected one.
    fn verify(&self, label: &[u8], transcript: &[u8], proof: &[u8]) -> bool {
        self.mac(label, transcript).verify_slice(proof).is_ok()
    }
}

const DIALER: &[u8] = b"rtrain ring dialer v2";
const ACCEPTOR: &[u8] = b"rtrain ring acceptor v2";

/// One side's opening message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hello {
    pub rank: u32,
    pub world: u32,
    pub session: u64,
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// A hello to send, with a fresh random nonce.
    pub(super) fn fresh(rank: usize, world: usize, session: u64) -> io::Result<Hello> {
        let mut hello = Hello::expected(rank, world, session);
        std::fs::File::open("/dev/urandom")?.read_exact(&mut hello.nonce)?;
        Ok(hello)
    }

    /// What a peer's hello must say (its nonce is its own, and not compared).
    pub(super) fn expected(rank: usize, world: usize, session: u64) -> Hello {
        Hello { rank: rank as u32, world: world as u32, session, nonce: [0; NONCE_LEN] }
    }

    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        out[4..8].copy_from_slice(&VERSION.to_ne_bytes());
        out[8..12].copy_from_slice(&self.rank.to_ne_bytes());
        out[12..16].copy_from_slice(&self.world.to_ne_bytes());
        out[16..24].copy_from_slice(&self.session.to_ne_bytes());
        out[24..].copy_from_slice(&self.nonce);
        out
    }

    fn read(stream: &TcpStream) -> io::Result<Hello> {
        let mut raw = [0u8; HELLO_LEN];
        read_exact(stream, &mut raw)?;
        let u32_at = |i: usize| u32::from_ne_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        if u32_at(0) != MAGIC || u32_at(4) != VERSION {
            return Err(invalid("not an rtrain tcp collective peer of this version and byte order".into()));
        }
        let mut session = [0u8; 8];
        session.copy_from_slice(&raw[16..24]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&raw[24..]);
        Ok(Hello { rank: u32_at(8), world: u32_at(12), session: u64::from_ne_bytes(session), nonce })
    }

    /// Same rank, world and session (the nonce is the sender's own).
    fn is(&self, expected: &Hello) -> bool {
        (self.rank, self.world, self.session) == (expected.rank, expected.world, expected.session)
    }
}

/// Everything a proof covers; identical on both ends of a genuine connection.
fn transcript(dialer: &Hello, acceptor: &Hello) -> Vec<u8> {
    let mut t = Vec::with_capacity(2 * HELLO_LEN);
    t.extend_from_slice(&dialer.encode());
    t.extend_from_slice(&acceptor.encode());
    t
}

/// Why a handshake did not produce a link.
#[derive(Debug)]
pub(super) enum Refusal {
    /// The other end proved it does not hold our token (or refused our proof): a definite
    /// misconfiguration, not worth retrying.
    WrongToken(String),
    /// Anything else (wrong rank or session, garbage, a closed or silent connection).
    Other(io::Error),
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Refusal::Other(e)
    }
}

/// The dialer's side on a connected `stream` (timeouts already set): `me` is this rank's hello,
/// `expected` the successor's rank, world and session.
pub(super) fn dial(stream: &TcpStream, me: &Hello, expected: &Hello, key: &JobKey) -> Result<(), Refusal> {
    write_all(stream, &me.encode())?;
    let theirs = Hello::read(stream)?;
    if !theirs.is(expected) {
        return Err(Refusal::Other(invalid(format!(
            "the successor answered as rank {} of {} in session {}",
            theirs.rank, theirs.world, theirs.session
        ))));
    }
    let t = transcript(me, &theirs);
    write_all(stream, &key.prove(DIALER, &t))?;
    let mut verdict = [0u8; VERDICT_LEN];
    read_exact(stream, &mut verdict)?;
    let status = u32::from_ne_bytes([verdict[0], verdict[1], verdict[2], verdict[3]]);
    match status {
        ACCEPTED if key.verify(ACCEPTOR, &t, &verdict[4..]) => Ok(()),
        ACCEPTED => Err(Refusal::WrongToken(format!(
            "rank {} answered without proof that it holds this job's token",
            theirs.rank
        ))),
        REFUSED => Err(Refusal::WrongToken(format!("rank {} refused this rank's proof of the job token", theirs.rank))),
        other => Err(Refusal::Other(invalid(format!("unknown handshake verdict {other}")))),
    }
}

/// The acceptor's side on an accepted `stream` (timeouts already set): `expected` is the
/// predecessor's rank, world and session; `me` this rank's hello.
pub(super) fn accept(stream: &TcpStream, expected: &Hello, me: &Hello, key: &JobKey) -> Result<(), Refusal> {
    let theirs = Hello::read(stream)?;
    if !theirs.is(expected) {
        return Err(Refusal::Other(invalid(format!(
            "a connection said it was rank {} of {} in session {}",
            theirs.rank, theirs.world, theirs.session
        ))));
    }
    write_all(stream, &me.encode())?;
    let t = transcript(&theirs, me);
    let mut proof = [0u8; MAC_LEN];
    read_exact(stream, &mut proof)?;
    let mut verdict = [0u8; VERDICT_LEN];
    if !key.verify(DIALER, &t, &proof) {
        verdict[..4].copy_from_slice(&REFUSED.to_ne_bytes());
        // Best effort: the dialer learns why, and stops instead of retrying until its timeout.
        let _ = write_all(stream, &verdict);
        return Err(Refusal::WrongToken(format!(
            "a connection as rank {} did not prove it holds the job token",
            theirs.rank
        )));
    }
    verdict[..4].copy_from_slice(&ACCEPTED.to_ne_bytes());
    verdict[4..].copy_from_slice(&key.prove(ACCEPTOR, &t));
    write_all(stream, &verdict)?;
    Ok(())
}

fn read_exact(stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut reader = stream;
    reader.read_exact(buf)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_token_the_direction_and_both_nonces() {
        let key = JobKey::new("secret").unwrap();
        let d = Hello::fresh(0, 2, 7).unwrap();
        let a = Hello::fresh(1, 2, 7).unwrap();
        assert_ne!(d.nonce, a.nonce, "nonces are fresh");
        let t = transcript(&d, &a);
        let proof = key.prove(DIALER, &t);
        assert!(key.verify(DIALER, &t, &proof));
        assert!(!key.verify(ACCEPTOR, &t, &proof), "a dialer's proof is no acceptor's");
        assert!(!JobKey::new("other").unwrap().verify(DIALER, &t, &proof));
        let replayed = transcript(&d, &Hello::fresh(1, 2, 7).unwrap());
        assert!(!key.verify(DIALER, &replayed, &proof), "another acceptor nonce needs another proof");
        assert!(JobKey::new("").is_none());
    }
}
