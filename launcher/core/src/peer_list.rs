//! `RegisterReply` of `rtrain.proto`, written by hand so that the coordinator encodes a gang's
//! peer list once and sends the same bytes to every rank: built per rank, 4096 replies of 4096
//! addresses are 16 M strings cloned and encoded. On the wire it is the message the proto
//! declares (field 1, `repeated string peers`), so any client decodes it.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, skip_field, string};

/// The encoded `peers` field of a gang's `RegisterReply`: cheap to clone (a reference count).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedPeers(Bytes);

impl EncodedPeers {
    pub fn new(peers: &[String]) -> Self {
        let mut buf = Vec::with_capacity(string::encoded_len_repeated(1, peers));
        string::encode_repeated(1, peers, &mut buf);
        Self(Bytes::from(buf))
    }
}

/// Collective addresses of the caller's role, indexed by rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegisterReply {
    /// Decoded peers, or peers added after `shared`'s.
    pub peers: Vec<String>,
    /// Peers encoded once for many replies; sent before `peers`.
    shared: Option<EncodedPeers>,
}

impl RegisterReply {
    pub fn new(peers: Vec<String>) -> Self {
        Self { peers, shared: None }
    }

    /// A reply that sends `peers` as they were encoded.
    pub fn shared(peers: EncodedPeers) -> Self {
        Self { peers: Vec::new(), shared: Some(peers) }
    }
}

impl prost::Message for RegisterReply {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(EncodedPeers(bytes)) = &self.shared {
            buf.put_slice(bytes);
        }
        string::encode_repeated(1, &self.peers, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            1 => string::merge_repeated(wire_type, &mut self.peers, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |EncodedPeers(b)| b.len()) + string::encoded_len_repeated(1, &self.peers)
    }

    fn clear(&mut self) {
        self.peers.clear();
        self.shared = None;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The message prost generates from the proto's declaration.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Declared {
        #[prost(string, repeated, tag = "1")]
        peers: Vec<String>,
    }

    #[test]
    fn a_shared_reply_is_the_declared_message() {
        let peers: Vec<String> = (0..300).map(|r| format!("10.0.{}.{}:29500", r / 256, r % 256)).collect();
        let shared = RegisterReply::shared(EncodedPeers::new(&peers));
        let bytes = shared.encode_to_vec();
        assert_eq!(bytes.len(), shared.encoded_len());
        assert_eq!(bytes, Declared { peers: peers.clone() }.encode_to_vec());
        assert_eq!(RegisterReply::decode(bytes.as_slice()).map(|r| r.peers), Ok(peers.clone()));
        assert_eq!(RegisterReply::new(peers.clone()).encode_to_vec(), bytes);
        assert_eq!(RegisterReply::shared(EncodedPeers::new(&[])).encode_to_vec(), Vec::<u8>::new());
    }
}
