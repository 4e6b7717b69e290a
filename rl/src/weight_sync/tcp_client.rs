//! The rollout actor's side of cross-host weight sync: asks a [`super::WeightServer`] for a
//! version newer than the one it holds and reads it straight into its tensors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tch::{Device, Tensor};

use super::error::{SyncResult, WeightSyncError};
use super::shm_subscriber::{SyncOutcome, SyncedVersion};
use super::table::{WeightTable, direct_ptr};
use super::wire::{self, CHUNK, ClientHello, MAC, NONCE, net};

/// What a fetch brought back.
#[derive(Debug)]
pub enum FetchedWeights {
    NotPublished,
    UpToDate(SyncedVersion),
    Weights { version: SyncedVersion, tensors: Vec<(String, Tensor)> },
}

/// Fetches weights from one server with the job token.
#[derive(Clone)]
pub struct WeightClient {
    addr: SocketAddr,
    token: Vec<u8>,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl std::fmt::Debug for WeightClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightClient").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl WeightClient {
    /// A client of the server at `addr`; timeouts default to 5 s to connect and 30 s for each
    /// read.
    pub fn new(addr: SocketAddr, token: impl Into<Vec<u8>>) -> Self {
        WeightClient {
            addr,
            token: token.into(),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
        }
    }

    /// Limits for connecting and for each read (the handshake, every chunk of the image).
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        self.connect_timeout = connect;
        self.io_timeout = io;
        self
    }

    /// Reads the server's newest version into `tensors` (matched by name, dtype and shape, as
    /// for [`super::WeightSubscriber::sync_into`]) if it supersedes `have`. A mismatched set is
    /// refused before any tensor is written; after a network error during the image, the
    /// tensors hold a mix of versions and must not be used until a fetch succeeds.
    pub fn fetch_into(&self, have: Option<SyncedVersion>, tensors: &mut [(String, Tensor)]) -> SyncResult<SyncOutcome> {
        let (mut stream, answer) = self.request(have)?;
        let (version, table) = match answer {
            Answer::NotPublished => return Ok(SyncOutcome::NotPublished),
            Answer::UpToDate(v) => return Ok(SyncOutcome::UpToDate(v)),
            Answer::Weights(version, table) => (version, table),
        };
        self.receive_image(&mut stream, &table, tensors)?;
        let restarted = have.is_some_and(|h| h.generation != version.generation);
        Ok(SyncOutcome::Loaded { version, restarted })
    }

    /// Like [`Self::fetch_into`], into newly allocated CPU tensors.
    pub fn fetch(&self, have: Option<SyncedVersion>) -> SyncResult<FetchedWeights> {
        let (mut stream, answer) = self.request(have)?;
        match answer {
            Answer::NotPublished => Ok(FetchedWeights::NotPublished),
            Answer::UpToDate(v) => Ok(FetchedWeights::UpToDate(v)),
            Answer::Weights(version, table) => {
                let mut tensors = table
                    .entries()
                    .iter()
                    .map(|e| {
                        Tensor::f_empty(&e.shape, (e.dtype.kind(), Device::Cpu))
                            .map(|t| (e.name.clone(), t))
                            .map_err(|source| WeightSyncError::Torch { name: e.name.clone(), source })
                    })
                    .collect::<SyncResult<Vec<_>>>()?;
                self.receive_image(&mut stream, &table, &mut tensors)?;
                Ok(FetchedWeights::Weights { version, tensors })
            }
        }
    }

    fn peer(&self) -> String {
        self.addr.to_string()
    }

    /// Connects, authenticates both ways and reads the answer's header.
    fn request(&self, have: Option<SyncedVersion>) -> SyncResult<(TcpStream, Answer)> {
        let peer = self.peer();
        let mut stream = net(TcpStream::connect_timeout(&self.addr, self.connect_timeout), "cannot connect to", &peer)?;
        net(stream.set_nodelay(true), "cannot configure", &peer)?;
        net(stream.set_read_timeout(Some(self.io_timeout)), "cannot configure", &peer)?;
        net(stream.set_write_timeout(Some(self.io_timeout)), "cannot configure", &peer)?;
        let mut hello = [0u8; wire::SERVER_HELLO];
        net(stream.read_exact(&mut hello), "no hello from", &peer)?;
        let (status, server_nonce) =
            wire::parse_server_hello(&hello).ok_or_else(|| WeightSyncError::corrupt(&peer, "not a weight server"))?;
        if status == wire::HELLO_BUSY {
            return Err(WeightSyncError::Busy { peer });
        }
        let mut nonce = [0u8; NONCE];
        wire::fill_random(&mut nonce)?;
        let mac = wire::sign(&self.token, b"client", &server_nonce, &nonce);
        net(stream.write_all(&ClientHello { nonce, mac, have }.encode()), "cannot send a hello to", &peer)?;
        let mut status = [0u8; 1];
        net(stream.read_exact(&mut status), "no answer from", &peer)?;
        if status[0] == wire::TOKEN_REFUSED {
            return Err(WeightSyncError::AuthFailed { peer, detail: "the server refused this token" });
        }
        let mut proof = [0u8; MAC];
        net(stream.read_exact(&mut proof), "no answer from", &peer)?;
        if !wire::verify(&self.token, b"server", &nonce, &server_nonce, &proof) {
            return Err(WeightSyncError::AuthFailed { peer, detail: "the server does not know the token" });
        }
        let answer = match status[0] {
            wire::NOT_PUBLISHED => Answer::NotPublished,
            wire::UP_TO_DATE => Answer::UpToDate(read_version(&mut stream, &peer)?),
            wire::WEIGHTS => {
                let version = read_version(&mut stream, &peer)?;
                let mut sizes = [0u8; 12];
                net(stream.read_exact(&mut sizes), "truncated header from", &peer)?;
                let data_bytes = wire::le_u64(&sizes[..8]).unwrap_or(0);
                let table_len = u32::from_le_bytes([sizes[8], sizes[9], sizes[10], sizes[11]]);
                if table_len > wire::MAX_TABLE {
                    return Err(WeightSyncError::corrupt(&peer, format!("a {table_len}-byte tensor table")));
                }
                let mut encoded = vec![0u8; table_len as usize];
                net(stream.read_exact(&mut encoded), "truncated tensor table from", &peer)?;
                Answer::Weights(version, WeightTable::decode(&encoded, data_bytes, &peer)?)
            }
            other => return Err(WeightSyncError::corrupt(&peer, format!("answer status {other}"))),
        };
        Ok((stream, answer))
    }

    /// Reads the image that follows a weights header into `tensors`.
    fn receive_image(
        &self,
        stream: &mut TcpStream,
        table: &WeightTable,
        tensors: &mut [(String, Tensor)],
    ) -> SyncResult<()> {
        let peer = self.peer();
        let entries = table.match_tensors(tensors)?;
        // The image comes in offset order: write each tensor as its bytes arrive.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].offset);
        let mut at = 0u64;
        let _guard = tch::no_grad_guard();
        for i in order {
            let ((name, t), entry) = (&mut tensors[i], entries[i]);
            net(wire::skip(stream, entry.offset - at), "truncated weights from", &peer)?;
            at = entry.offset + entry.bytes;
            if entry.bytes == 0 {
                continue;
            }
            let torch = |source| WeightSyncError::Torch { name: name.clone(), source };
            let staged = match direct_ptr(t) {
                Some(_) => None,
                None => Some(Tensor::f_empty(&entry.shape, (entry.dtype.kind(), Device::Cpu)).map_err(torch)?),
            };
            let dst = staged.as_ref().unwrap_or(t);
            let Some(ptr) = direct_ptr(dst) else { continue };
            // SAFETY: `dst` is a contiguous CPU tensor of entry.bytes bytes (dtype and shape
            // matched) in this process's memory; nothing else reads it during the fetch.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, entry.bytes as usize) };
            for chunk in bytes.chunks_mut(CHUNK) {
                net(stream.read_exact(chunk), "truncated weights from", &peer)?;
            }
            if let Some(staged) = staged {
                t.f_copy_(&staged).map_err(torch)?;
            }
        }
        net(wire::skip(stream, table.data_bytes() - at), "truncated weights from", &peer)?;
        Ok(())
    }
}

enum Answer {
    NotPublished,
    UpToDate(SyncedVersion),
    Weights(SyncedVersion, WeightTable),
}

fn read_version(stream: &mut TcpStream, peer: &str) -> SyncResult<SyncedVersion> {
    let mut b = [0u8; 16];
    net(stream.read_exact(&mut b), "truncated header from", peer)?;
    let generation = wire::le_u64(&b[..8]).unwrap_or(0);
    let version = wire::le_u64(&b[8..]).unwrap_or(0);
    Ok(SyncedVersion { generation, version })
}

/// One fetch from `addr`: the newest version if it supersedes `have`, in new CPU tensors.
pub fn fetch_weights(addr: SocketAddr, token: &[u8], have: Option<SyncedVersion>) -> SyncResult<FetchedWeights> {
    WeightClient::new(addr, token).fetch(have)
}
