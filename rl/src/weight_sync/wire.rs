//! The weight stream's handshake: both sides prove knowledge of the job token with HMAC-SHA256
//! over fresh nonces (the token never crosses the wire), then the server answers with the
//! newest version's header, table and image, or says there is nothing newer.
//!
//! ```text
//! server → client  "RTRWSRV1", hello status u8 (0 ready, 1 busy), server nonce [32]
//! client → server  "RTRWCLI1", client nonce [32], HMAC(token, "client" ‖ s_nonce ‖ c_nonce) [32],
//!                  has_version u8, generation u64, version u64
//! server → client  status u8 (3: token refused, and nothing more), then
//!                  HMAC(token, "server" ‖ c_nonce ‖ s_nonce) [32] and, by status,
//!                  0 nothing published | 1 up to date: generation, version |
//!                  2 weights: generation, version, image bytes u64, table bytes u32, table, image
//! ```

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::error::{SyncResult, WeightSyncError};
use super::shm_subscriber::SyncedVersion;

/// The image is written and read in pieces of this size, each under the I/O timeout.
pub(crate) const CHUNK: usize = 4 << 20;
pub(crate) const NONCE: usize = 32;
pub(crate) const MAC: usize = 32;
const SERVER_MAGIC: [u8; 8] = *b"RTRWSRV1";
const CLIENT_MAGIC: [u8; 8] = *b"RTRWCLI1";
pub(crate) const SERVER_HELLO: usize = 8 + 1 + NONCE;
pub(crate) const CLIENT_HELLO: usize = 8 + NONCE + MAC + 1 + 16;
/// A table larger than this is refused before allocating for it.
pub(crate) const MAX_TABLE: u32 = 256 << 20;

pub(crate) const HELLO_READY: u8 = 0;
pub(crate) const HELLO_BUSY: u8 = 1;
pub(crate) const NOT_PUBLISHED: u8 = 0;
pub(crate) const UP_TO_DATE: u8 = 1;
pub(crate) const WEIGHTS: u8 = 2;
pub(crate) const TOKEN_REFUSED: u8 = 3;

/// Fills `buf` from the kernel's random source.
pub(crate) fn fill_random(buf: &mut [u8]) -> SyncResult<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the rest of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(WeightSyncError::Net { op: "getrandom for", peer: "a nonce".into(), source: e });
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

pub(crate) fn random_u64() -> SyncResult<u64> {
    let mut b = [0u8; 8];
    fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn keyed(token: &[u8], label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token).unwrap_or_else(|_| unreachable!());
    mac.update(label);
    mac.update(first);
    mac.update(second);
    mac
}

pub(crate) fn sign(token: &[u8], label: &[u8], first: &[u8], second: &[u8]) -> [u8; MAC] {
    keyed(token, label, first, second).finalize().into_bytes().into()
}

/// Constant-time check of a received tag.
pub(crate) fn verify(token: &[u8], label: &[u8], first: &[u8], second: &[u8], tag: &[u8]) -> bool {
    keyed(token, label, first, second).verify_slice(tag).is_ok()
}

pub(crate) fn server_hello(status: u8, nonce: &[u8; NONCE]) -> [u8; SERVER_HELLO] {
    let mut out = [0u8; SERVER_HELLO];
    out[..8].copy_from_slice(&SERVER_MAGIC);
    out[8] = status;
    out[9..].copy_from_slice(nonce);
    out
}

/// `(status, server nonce)` of a server hello.
pub(crate) fn parse_server_hello(bytes: &[u8; SERVER_HELLO]) -> Option<(u8, [u8; NONCE])> {
    let mut nonce = [0u8; NONCE];
    nonce.copy_from_slice(&bytes[9..]);
    (bytes[..8] == SERVER_MAGIC).then_some((bytes[8], nonce))
}

/// The client's hello: its nonce, its proof for `server_nonce`, and the version it holds.
pub(crate) struct ClientHello {
    pub(crate) nonce: [u8; NONCE],
    pub(crate) mac: [u8; MAC],
    pub(crate) have: Option<SyncedVersion>,
}

impl ClientHello {
    pub(crate) fn encode(&self) -> [u8; CLIENT_HELLO] {
        let mut out = [0u8; CLIENT_HELLO];
        out[..8].copy_from_slice(&CLIENT_MAGIC);
        out[8..8 + NONCE].copy_from_slice(&self.nonce);
        out[8 + NONCE..8 + NONCE + MAC].copy_from_slice(&self.mac);
        let at = 8 + NONCE + MAC;
        out[at] = u8::from(self.have.is_some());
        let have = self.have.unwrap_or(SyncedVersion { generation: 0, version: 0 });
        out[at + 1..at + 9].copy_from_slice(&have.generation.to_le_bytes());
        out[at + 9..].copy_from_slice(&have.version.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8; CLIENT_HELLO]) -> Option<Self> {
        if bytes[..8] != CLIENT_MAGIC {
            return None;
        }
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&bytes[8..8 + NONCE]);
        let mut mac = [0u8; MAC];
        mac.copy_from_slice(&bytes[8 + NONCE..8 + NONCE + MAC]);
        let at = 8 + NONCE + MAC;
        let have = match bytes[at] {
            0 => None,
            1 => {
                Some(SyncedVersion { generation: le_u64(&bytes[at + 1..at + 9])?, version: le_u64(&bytes[at + 9..])? })
            }
            _ => return None,
        };
        Some(ClientHello { nonce, mac, have })
    }
}

pub(crate) fn le_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}

/// `io::Result` to [`WeightSyncError::Net`] naming the operation and the peer.
pub(crate) fn net<T>(result: std::io::Result<T>, op: &'static str, peer: &str) -> SyncResult<T> {
    result.map_err(|source| WeightSyncError::Net { op, peer: peer.to_string(), source })
}

/// Reads and drops `n` bytes (the padding between tensors of the image).
pub(crate) fn skip(r: &mut impl Read, mut n: u64) -> std::io::Result<()> {
    let mut scratch = [0u8; 256];
    while n > 0 {
        let take = n.min(scratch.len() as u64) as usize;
        r.read_exact(&mut scratch[..take])?;
        n -= take as u64;
    }
    Ok(())
}

/// Writes `bytes` in [`CHUNK`] pieces, calling `before_chunk` (which sets the socket's deadline)
/// before each.
pub(crate) fn write_chunked(
    w: &mut impl Write,
    bytes: &[u8],
    mut before_chunk: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<()> {
    for chunk in bytes.chunks(CHUNK) {
        before_chunk()?;
        w.write_all(chunk)?;
    }
    Ok(())
}
