//! A `RegisterReply` read without keeping it: the number of peers and a hash of them in order.
//! Thousands of simulated ranks in one process would otherwise allocate N × N strings to check
//! their peer lists, on the cores the coordinator needs; a real worker decodes its one list on its
//! own host.

use prost::bytes::Buf;
use prost::encoding::{DecodeContext, WireType};

/// Decodes like `RegisterReply` (field 1: repeated string `peers`), keeping only a digest.
#[derive(Debug, Default)]
pub(crate) struct PeerDigest {
    pub(crate) count: usize,
    hash: u64,
    /// The peer being read; reused, so decoding does not allocate per peer.
    scratch: Vec<u8>,
}

/// A word-at-a-time multiplicative hash (as rustc's FxHash): checking 4096 lists of 4096
/// addresses byte by byte would cost the simulated ranks about as much CPU as decoding them.
const SEED: u64 = 0x517c_c1b7_2722_0a95;

impl PeerDigest {
    /// The digest a reply holding `peers` in this order decodes to.
    pub(crate) fn of(peers: &[String]) -> Self {
        let mut digest = Self::default();
        peers.iter().for_each(|p| digest.add(p.as_bytes()));
        digest
    }

    /// Same peers, in the same order (up to a 64-bit hash collision).
    pub(crate) fn matches(&self, other: &Self) -> bool {
        self.count == other.count && self.hash == other.hash
    }

    fn add(&mut self, peer: &[u8]) {
        // The length first: it keeps where one address ends and the next begins.
        let mut hash = mix(self.hash, peer.len() as u64);
        let words = peer.chunks_exact(8);
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        for word in words.map(|w| w.try_into().unwrap_or_default()).chain([tail]) {
            hash = mix(hash, u64::from_le_bytes(word));
        }
        self.hash = hash;
        self.count += 1;
    }
}

fn mix(hash: u64, word: u64) -> u64 {
    (hash.rotate_left(5) ^ word).wrapping_mul(SEED)
}

impl prost::Message for PeerDigest {
    fn encode_raw(&self, _buf: &mut impl prost::bytes::BufMut) {
        // Only ever decoded: a simulated rank receives replies, it does not send them.
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag != 1 {
            return prost::encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut peer = std::mem::take(&mut self.scratch);
        prost::encoding::bytes::merge(wire_type, &mut peer, buf, ctx)?;
        self.add(&peer);
        self.scratch = peer;
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::RegisterReply;

    #[test]
    fn digests_a_reply_as_its_peer_list() {
        let peers: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", ""].map(String::from).to_vec();
        let bytes = RegisterReply::new(peers.clone()).encode_to_vec();
        let decoded = PeerDigest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.count, 3);
        assert!(decoded.matches(&PeerDigest::of(&peers)));
        let swapped = [&peers[1], &peers[0], &peers[2]].map(|p| p.clone());
        assert!(!decoded.matches(&PeerDigest::of(&swapped)));
        let empty = PeerDigest::decode(RegisterReply::new(vec![]).encode_to_vec().as_slice()).unwrap();
        assert!(empty.matches(&PeerDigest::of(&[])));
    }
}
