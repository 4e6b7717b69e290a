//! How the ranks of a gang agree to create an NCCL communicator, over a CPU collective (the TCP
//! ring they already share): one all-gather in which every rank says whether its device and NCCL
//! are ready, with its reason when not, and rank 0 adds the NCCL unique id.
//!
//! Without it, a rank that cannot open its GPU would leave the others blocked in
//! `ncclCommInitRank` until a timeout, reported as a lost peer and retried; with it every rank
//! fails at once with the failing ranks' own messages. Needs no GPU, so it is tested on CPU.

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;
/// Bytes of a failure message carried per rank; longer ones are cut at a character boundary.
pub const MESSAGE_BYTES: usize = 2048 - 1 - NCCL_ID_BYTES - 2;
/// One rank's record: ready flag, id, message length (u16 little-endian), message.
const RECORD_BYTES: usize = 1 + NCCL_ID_BYTES + 2 + MESSAGE_BYTES;

/// What this rank brings to communicator set-up: `Ok(Some(id))` from rank 0, `Ok(None)` from the
/// others (an id from them is ignored), or why it cannot take part.
pub type InitReadiness = Result<Option<[u8; NCCL_ID_BYTES]>, String>;

/// Every rank calls this with its readiness; all get rank 0's id when every rank is ready, and
/// otherwise the same [`CollectiveError::Unavailable`] naming each failed rank and its reason.
/// Errors of the bootstrap itself (a peer lost, a timeout) are returned as they are.
pub fn agree_on_nccl_id(
    bootstrap: &mut dyn Collective,
    local: InitReadiness,
) -> Result<[u8; NCCL_ID_BYTES], CollectiveError> {
    let rank = bootstrap.rank();
    let record = encode(rank, &local);
    let gathered = bootstrap.all_gather(&Tensor::from_slice(&record))?;
    let torch_err = |e: tch::TchError| CollectiveError::Unsupported { op: "nccl init", reason: e.to_string() };
    let mut records = Vec::with_capacity(gathered.len());
    for tensor in gathered {
        let tensor = tensor.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Uint8)).map_err(torch_err)?;
        let mut bytes = [0u8; RECORD_BYTES];
        if tensor.numel() != RECORD_BYTES {
            return Err(CollectiveError::Unsupported {
                op: "nccl init",
                reason: format!("a rank sent {} bytes, expected {RECORD_BYTES}", tensor.numel()),
            });
        }
        tensor.f_copy_data(&mut bytes, RECORD_BYTES).map_err(torch_err)?;
        records.push(bytes);
    }
    decide(&records)
}

fn encode(rank: usize, local: &InitReadiness) -> [u8; RECORD_BYTES] {
    let mut record = [0u8; RECORD_BYTES];
    match local {
        Ok(id) => {
            record[0] = 1;
            if let (0, Some(id)) = (rank, id) {
                record[1..1 + NCCL_ID_BYTES].copy_from_slice(id);
            } else if rank == 0 {
                // Rank 0 must bring the id; without one nobody can join.
                record[0] = 0;
                put_message(&mut record, "rank 0 is ready but created no NCCL id");
            }
        }
        Err(reason) => put_message(&mut record, reason),
    }
    record
}

fn put_message(record: &mut [u8; RECORD_BYTES], message: &str) {
    let mut end = message.len().min(MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let start = 1 + NCCL_ID_BYTES;
    record[start..start + 2].copy_from_slice(&(end as u16).to_le_bytes());
    record[start + 2..start + 2 + end].copy_from_slice(&message.as_bytes()[..end]);
}

fn decide(records: &[[u8; RECORD_BYTES]]) -> Result<[u8; NCCL_ID_BYTES], CollectiveError> {
    let start = 1 + NCCL_ID_BYTES;
    // Failed ranks grouped by message, in rank order: a gang failing alike says it once.
    let mut failures: Vec<(Vec<usize>, String)> = Vec::new();
    for (rank, r) in records.iter().enumerate().filter(|(_, r)| r[0] != 1) {
        let len = usize::from(u16::from_le_bytes([r[start], r[start + 1]])).min(MESSAGE_BYTES);
        let text = String::from_utf8_lossy(&r[start + 2..start + 2 + len]).into_owned();
        let text = if text.is_empty() { "no reason given".to_string() } else { text };
        match failures.iter_mut().find(|(_, t)| *t == text) {
            Some((ranks, _)) => ranks.push(rank),
            None => failures.push((vec![rank], text)),
        }
    }
    let Some(first) = records.first().filter(|_| failures.is_empty()) else {
        let reason = if failures.is_empty() {
            "the gang is empty".to_string()
        } else {
            let named = failures.iter().map(|(ranks, text)| {
                let list = ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
                format!("{} {list}: {text}", if ranks.len() == 1 { "rank" } else { "ranks" })
            });
            named.collect::<Vec<_>>().join("; ")
        };
        return Err(CollectiveError::Unavailable { backend: "nccl", reason });
    };
    let mut id = [0u8; NCCL_ID_BYTES];
    id.copy_from_slice(&first[1..1 + NCCL_ID_BYTES]);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MESSAGE_BYTES); // two bytes each
        let record = encode(1, &Err(long));
        let err = decide(&[encode(0, &Ok(Some([7; NCCL_ID_BYTES]))), record]).unwrap_err().to_string();
        let cut = err.split("rank 1: ").nth(1).unwrap();
        assert_eq!(cut.chars().count(), MESSAGE_BYTES / 2); // MESSAGE_BYTES is odd: the last é is dropped
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn rank_zero_without_an_id_fails_the_gang() {
        let err = decide(&[encode(0, &Ok(None)), encode(1, &Ok(None))]).unwrap_err().to_string();
        assert!(err.contains("rank 0: rank 0 is ready but created no NCCL id"), "{err}");
    }
}
